"""One HTTP(S) download into a file: resumable (Range) into `<target>.part`, bounded, renamed atomically.

Progress (bytes, speed) goes to stderr; an interruption keeps the partial file so that the same
command continues where it stopped.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from kdcli import __version__
from kdcli.errors import KdError
from kdcli.report import stderr

CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per connection attempt and per read: a stalled server fails instead of hanging


def download(url: str, target: Path, max_bytes: int, hint: str, timeout: float = TIMEOUT_S) -> Path:
    """`target`, downloaded from `url` unless it is already there; `hint` says what to do offline."""
    if target.is_file():
        return target
    if urlsplit(url).scheme not in ("http", "https"):
        raise KdError(f"cannot download {url}: only http:// and https:// addresses are fetched", hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    response, offset, total = _open(url, part, timeout, hint)
    if total is not None and total > max_bytes:
        response.close()
        raise KdError(f"{url} is {total:,} bytes, more than the {max_bytes:,} expected", "check the address (--url / KD_TEACHERS_URL)")
    received = _stream(response, part, offset, total, max_bytes, url)
    if total is not None and received != total:
        raise KdError(
            f"the download of {url} stopped at {received:,} of {total:,} bytes",
            f"run the same command again to resume it (the partial file is {part})",
        )
    os.replace(part, target)
    return target


def _open(url: str, part: Path, timeout: float, hint: str):
    """(response, offset it starts at, total size or None); a server ignoring Range restarts at 0."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"kdcli/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is not a prefix this server knows: start over
            part.unlink()
            return _open(url, part, timeout, hint)
        raise KdError(f"could not download {url}: HTTP {exc.code} {exc.reason}", hint) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KdError(f"cannot reach {url} ({reason})", hint) from None
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if offset and response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            total = int(match.group(2)) if match.group(2).isdigit() else None
            return response, offset, total if total is not None else (offset + length if length is not None else None)
        response.close()
        part.unlink()
        return _open(url, part, timeout, hint)
    return response, 0, length


def _stream(response, part: Path, offset: int, total: int | None, max_bytes: int, url: str) -> int:
    received = offset
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    name = Path(urlsplit(url).path).name or url
    started = time.monotonic()
    with response, open(part, "ab" if offset else "wb") as out, Progress(
        *columns, console=stderr, transient=True, disable=not stderr.is_terminal
    ) as progress:
        task = progress.add_task(name, total=total, completed=offset)
        while True:
            try:
                chunk = response.read(CHUNK)
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                out.flush()
                raise KdError(
                    f"the download of {url} broke off at {received:,} bytes ({exc or type(exc).__name__})",
                    f"run the same command again to resume it (the partial file is {part})",
                ) from None
            if not chunk:
                break
            received += len(chunk)
            if received > max_bytes:
                out.close()
                part.unlink()
                raise KdError(f"{url} sent more than the {max_bytes:,} bytes expected", "check the address (--url / KD_TEACHERS_URL)")
            out.write(chunk)
            progress.update(task, completed=received)
        out.flush()
        os.fsync(out.fileno())
    seconds = max(time.monotonic() - started, 1e-6)
    stderr.print(f"downloaded {name}: {received / 1e6:.1f} MB ({(received - offset) / 1e6 / seconds:.1f} MB/s)", markup=False, soft_wrap=True)
    return received
