"""Peak memory of one epoch: reset before it, read after it.

CUDA: the caching allocator's peak, reset per device. CPU: the process's peak resident size
(VmHWM), which Linux resets when "5" is written to /proc/self/clear_refs; `ru_maxrss` cannot be
reset, so it is only the fallback where /proc is missing (it then counts the whole process).
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: what ran before (a teacher's evaluation, an earlier run) no longer counts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocations on a GPU, resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
