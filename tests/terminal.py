"""Run the installed `kd` console script in a pseudo-terminal, as a person at a prompt does.

Rich only draws its live display when stderr is a terminal, so a pipe (how the in-process tests
run kd) never exercises it. Here the child's stdin, stdout and stderr are the slave side of a pty
with a fixed window size; everything it draws is read back from the master side.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")


def kd_executable() -> Path:
    """The `kd` console script of the environment running the tests (the real entry point)."""
    script = Path(sys.executable).parent / "kd"
    assert script.is_file(), f"the kd console script is not installed beside {sys.executable}"
    return script


@dataclass
class Screen:
    code: int
    raw: str  # everything drawn, escape sequences included

    @property
    def text(self) -> str:
        """What was drawn with the escape sequences removed; carriage returns become line breaks."""
        return ANSI.sub("", self.raw).replace("\r", "\n")


def run_in_terminal(*args: str, env: dict[str, str] | None = None, columns: int = 120, timeout: float = 300) -> Screen:
    """Run `kd ARGS...` on a pty of `columns` x 40; returns its exit code and what it drew."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    child_env = {**os.environ, **(env or {}), "TERM": "xterm-256color", "COLUMNS": str(columns)}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        child_env.pop(name, None)
    process = subprocess.Popen(
        [str(kd_executable()), *map(str, args)], stdin=slave, stdout=slave, stderr=slave, env=child_env,
        start_new_session=True, close_fds=True,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"kd {' '.join(args)} still running after {timeout}s:\n{b''.join(chunks).decode(errors='replace')[-2000:]}")
        code = process.wait(timeout=60)
    finally:
        os.close(master)
    return Screen(code, b"".join(chunks).decode("utf-8", errors="replace"))
