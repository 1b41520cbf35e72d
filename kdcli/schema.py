"""Typed value checks shared by CLI flags, presets, config.toml, method options and file metadata.

Every value that crosses into kd is checked here before any work starts: its type (a TOML `true`
is no integer, `3.0` no epoch count), that it is finite, and that it lies in its range. Errors name
where the value came from (`--epochs`, `preset.toml: epochs`) so the user can find it.
Stdlib only: it runs before torch is imported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from kdcli.errors import KdError


class Invalid(Exception):
    """Raised by a kind's `check`; its text says what was expected ("an integer of 1 or more")."""


@dataclass(frozen=True)
class Int:
    """An integer (never a bool or a float) in [low, high]."""

    low: int | None = None
    high: int | None = None

    def check(self, value: Any) -> int:
        bad_type = isinstance(value, bool) or not isinstance(value, int)
        if bad_type or (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise Invalid("an integer" + _bounds(self.low, self.high))
        return value


@dataclass(frozen=True)
class Float:
    """A finite number in its range (`low_open`/`high_open`: strictly inside); integers are accepted as floats."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: Any) -> float:
        expected = Invalid("a finite number" + _bounds(self.low, self.high, self.low_open, self.high_open))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise expected
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            raise expected from None
        if not math.isfinite(value):
            raise expected
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise expected
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise expected
        return value


@dataclass(frozen=True)
class Bool:
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid("true or false")
        return value


@dataclass(frozen=True)
class Str:
    """A string, optionally one of `choices` or matching `pattern` (shown as `shown`, e.g. `cuda:N`)."""

    choices: tuple[str, ...] = ()
    pattern: str | None = None
    shown: str = ""

    def check(self, value: Any) -> str:
        listed = isinstance(value, str) and (value in self.choices or (self.pattern and re.fullmatch(self.pattern, value)))
        if self.choices and not listed:
            raise Invalid("one of " + ", ".join(self.choices + ((self.shown,) if self.shown else ())))
        if not isinstance(value, str):
            raise Invalid("a string")
        if "\x00" in value:
            raise Invalid("a string without NUL characters")
        if not _utf8(value):
            raise Invalid("UTF-8 text (this one holds bytes that are not UTF-8, e.g. from a file name)")
        return value


@dataclass(frozen=True)
class Optional:
    """`inner`, or None (TOML has no null: None only comes from flags and API callers)."""

    inner: Any

    def check(self, value: Any) -> Any:
        return None if value is None else self.inner.check(value)


@dataclass(frozen=True)
class ListOf:
    inner: Any

    def check(self, value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise Invalid("a list")
        try:
            return [self.inner.check(item) for item in value]
        except Invalid as exc:
            raise Invalid(f"a list, each item {exc}") from None


@dataclass(frozen=True)
class Table:
    """A mapping of string keys to plain TOML scalars or lists of them (method options)."""

    def check(self, value: Any) -> dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise Invalid("a table of KEY = VALUE")
        for item in value.values():
            items = item if isinstance(item, (list, tuple)) else [item]
            if not all(isinstance(v, (str, int, float, bool)) for v in items):
                raise Invalid("a table of numbers, strings, booleans or lists of them")
            if not all(_utf8(v) for v in items if isinstance(v, str)):
                raise Invalid("a table of UTF-8 text")
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise Invalid("a table of finite numbers")
        return dict(value)


def _utf8(text: str) -> bool:
    """Whether `text` can be written to a UTF-8 file (argv bytes that are not UTF-8 arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        if isinstance(low, float) or isinstance(high, float):
            return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return f" from {low} to {high}"
    if low is not None:
        return f" above {low:g}" if low_open else f" of {low:g} or more"
    if high is not None:
        return f" of {high:g} or less"
    return ""


def shown(value: Any) -> str:
    """A value as the user wrote it: numbers bare (long ones cut), booleans as TOML, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = str(value) if isinstance(value, float) or abs(value) < 10**40 else f"{str(value)[:12]}...({len(str(value))} digits)"
        return text
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "...'"


def checked(kind: Any, value: Any, where: str) -> Any:
    """`value` checked (and normalised, e.g. 1 -> 1.0 for a float) against `kind`; a KdError naming `where`."""
    try:
        return kind.check(value)
    except Invalid as exc:
        raise KdError(f"{where} {shown(value)} is invalid", f"use {exc}") from None
