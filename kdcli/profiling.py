"""Cost of a network: parameters, MACs of one image, latency at batch 1, throughput at a large batch.

MACs come from `torch.utils.flop_counter.FlopCounterMode` on one forward of a single image:
MACs = FLOPs / 2. It counts the matrix products (convolutions, linear layers, matmuls, attention),
not element-wise work (BatchNorm, activations, pooling, additions): the convention of the
published MAC/FLOP counts (fvcore, ptflops, the papers' tables).

Timings run the model in eval mode under `torch.inference_mode` on its current device, after
warm-up forwards; on CUDA every timed forward is bracketed by `torch.cuda.synchronize`. Each
measurement stops after `repeats` forwards or once `budget_s` seconds are spent (at least one
timed forward), so a large model on a CPU does not take minutes. A single figure swings widely on a
busy machine, so each timing is reported as its median with the interquartile range and the number of
timed runs, beside the device's thread count and the precision (fp32).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

LATENCY_REPEATS = 50
THROUGHPUT_BATCH = 256
THROUGHPUT_REPEATS = 10
WARMUP = 5


@dataclass(frozen=True)
class Spread:
    """A quantity timed over repeated runs: median and interquartile range (q1, q3)."""

    median: float
    q1: float
    q3: float
    runs: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if len(values) < 2:
            return cls(values[0], values[0], values[0], len(values))
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, len(values))

    def inverse(self, numerator: float) -> Spread:
        """numerator / x of every run (seconds -> rate): the quartiles swap places."""
        return Spread(numerator / self.median, numerator / self.q3, numerator / self.q1, self.runs)


@dataclass
class Profile:
    params: int
    macs: int  # multiply-accumulates of one forward of one image
    latency_ms: Spread | None  # one batch-1 forward
    throughput: Spread | None  # images per second at batch `throughput_batch`
    throughput_batch: int | None
    device: str
    threads: int  # torch's intra-op threads the timings ran with


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward of one input of `input_shape` (C, H, W)."""
    x = _input(model, 1, input_shape)
    with _evaluating(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def latency_ms(
    model: nn.Module, input_shape: tuple[int, ...], repeats: int = LATENCY_REPEATS, warmup: int = WARMUP, budget_s: float = 5.0
) -> Spread:
    """Milliseconds of a batch-1 forward."""
    seconds = _times(model, _input(model, 1, input_shape), repeats, warmup, budget_s)
    return Spread.of([1000.0 * t for t in seconds])


def throughput(
    model: nn.Module, input_shape: tuple[int, ...], batch: int = THROUGHPUT_BATCH, repeats: int = THROUGHPUT_REPEATS,
    warmup: int = 1, budget_s: float = 10.0,
) -> tuple[Spread, int]:
    """(images per second, batch size used) at `batch`; on CUDA out of memory the batch is halved."""
    while True:
        try:
            seconds = _times(model, _input(model, batch, input_shape), repeats, warmup, budget_s)
            return Spread.of(seconds).inverse(batch), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2


def profile(model: nn.Module, input_shape: tuple[int, ...], timing: bool = True) -> Profile:
    """Parameters, MACs and (with `timing`) latency and throughput on the model's device."""
    rate, batch = throughput(model, input_shape) if timing else (None, None)
    return Profile(
        params=count_params(model),
        macs=count_macs(model, input_shape),
        latency_ms=latency_ms(model, input_shape) if timing else None,
        throughput=rate,
        throughput_batch=batch,
        device=str(_device(model)),
        threads=torch.get_num_threads(),
    )


def _times(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int, budget_s: float) -> list[float]:
    times: list[float] = []
    with _evaluating(model), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        spent = 0.0
        while len(times) < max(1, repeats) and (not times or spent < budget_s):
            _sync(x.device)
            started = time.perf_counter()
            model(x)
            _sync(x.device)
            times.append(time.perf_counter() - started)
            spent += times[-1]
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _input(model: nn.Module, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(_device(model), dtype)


class _evaluating:
    """Context manager: the model in eval mode, its previous mode restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
