"""Graceful stop: the first SIGINT/SIGTERM asks the loop to stop after the current step, the second stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set by the `kd` command (one run per process): once a stop is under way, further signals are
# ignored, so a Ctrl-C pressed again while kd saves, prints and exits (interpreter shutdown joins
# threads) cannot raise inside that code and print a traceback. A library caller keeps its handlers.
_quiet_exit = {"on": False}


def exit_quietly_after_a_stop(on: bool = True) -> None:
    """For the `kd` command: after the first stop signal, let further ones neither raise nor print
    (`on=False` when the command returns, so that library use in the same process is unaffected)."""
    _quiet_exit["on"] = on


def ignore_signals() -> None:
    """Ignore SIGINT/SIGTERM from now on (the process is on its way out)."""
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag the training loop polls.

    A second signal raises KeyboardInterrupt wherever the program is; checkpoints are written
    atomically, so even that never leaves a half-written one behind.
    """

    def __init__(self, on_first: Callable[[str], None] = lambda name: None):
        self.requested = False
        self.on_first = on_first
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        stopping = self.requested and _quiet_exit["on"] and exc[0] is not None  # leaving on the stop
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            if _quiet_exit["on"]:
                ignore_signals()  # a third press while this one unwinds must not raise again
            raise KeyboardInterrupt
        self.requested = True
        self.on_first(signal.Signals(signum).name)
