"""Graceful stop: the first SIGINT/SIGTERM asks the loop to stop after the current step, the second stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


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
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.on_first(signal.Signals(signum).name)
