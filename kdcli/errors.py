"""The one way a user-facing failure leaves the library."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class KdError(Exception):
    """A failure caused by the user's input or environment: the CLI prints it without a traceback.

    `exit_code` is 2 for bad input (the default) and 1 for a run that failed (e.g. diverged).
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A hint naming the closest valid choices, or listing them all when none is close."""
    choices = sorted(choices)
    by_lower = {c.lower(): c for c in choices}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.5)]
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "choose one of: " + ", ".join(choices)


def unknown(kind: str, name: str, choices: Iterable[str], listing: str | None = None) -> KdError:
    """KdError for an unknown name (model, method, dataset, preset, option)."""
    hint = did_you_mean(name, choices)
    if listing:
        hint += f" (see `{listing}`)"
    return KdError(f"unknown {kind} {name!r}", hint)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or the same error reported as text (safetensors' Rust writer)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "os error 28" in str(exc)
