"""Data parallelism on PyTorch's own engine: torchrun sets RANK/WORLD_SIZE, we join the process group.

Everything here is a no-op in a single process, so callers (trainer, memory bank, ITKD's agent)
use the same code path with and without DDP.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdcli.errors import KdError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def setup(device: str) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); World() without torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():  # a later run in the same process (Python API) reuses the group
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def teardown() -> None:
    """Leave the process group once every rank is done with it: the `kd` command does, after its
    one run (NCCL warns at exit about a group never destroyed). Python API callers that run
    several times keep the group and call this (or destroy_process_group) at their end."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is left alone)."""
    if not enabled():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's rows of `tensor`, concatenated in rank order along dim 0.

    The ranks must hold the same shape, as the trainer guarantees under DDP (equal per-rank
    batches, a partial last global batch dropped); nothing is read back to the host, so the
    step does not wait for the collective to finish.
    """
    if not enabled():
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def average_parameter_gradients(params) -> None:
    """Mean of each gradient over ranks, for parameters stepped outside DDP (ITKD's agent)."""
    if not enabled():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (`[obj]` in a single process). Small, trusted objects only:
    they travel pickled between this run's own processes."""
    if not enabled():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a run folder named after the time)."""
    if not enabled():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if enabled():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any rank (a stop request must stop every rank at the same step)."""
    if not enabled():
        return flag
    return bool(all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


def wrap(module: nn.Module, world: World, device: torch.device, heads: bool = False, stepped_apart=()) -> nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself otherwise.

    heads=True for a method's own trainable modules: they may skip parameters on some steps
    (schedules), and memory banks stay in sync through all-gathered updates, so their buffers are
    not broadcast from rank 0 each step. `stepped_apart`: parameters the method steps with its own
    optimizers and averages over ranks itself (ITKD's agent, trained inside the forward): DDP's
    hooks would fire on them twice a step, so DDP leaves them alone.
    """
    apart = {id(p) for p in stepped_apart}
    if not world.enabled or not any(p.requires_grad and id(p) not in apart for p in module.parameters()):
        return module
    if apart:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, [name for name, p in module.named_parameters() if id(p) in apart])
    ids = [device.index] if device.type == "cuda" else None
    if not heads:
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    # Newer torch deprecates broadcast_buffers; its replacement is missing from older torch and would
    # still copy rank 0's buffers at wrap time. The heads need no buffer traffic at all (see above),
    # so the old flag stays, with one meaning on every supported torch, and its warning is dropped.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)


def check_batch(batch_size: int, world: World) -> int:
    """The per-rank batch of a global `batch_size`."""
    if batch_size % world.size:
        raise KdError(
            f"--batch-size {batch_size} does not split over {world.size} processes",
            f"use a multiple of {world.size} (the batch size is the global one)",
        )
    return batch_size // world.size
