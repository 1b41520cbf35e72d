"""What a checkpoint keeps of each data-parallel rank, so that a resumed run continues exactly.

Weights, optimizer and method state are the same on every rank (DDP keeps them so) and are saved
once. Three things are a rank's own: its random streams (CPU and its own GPU's generator; the
ranks draw different negatives, agent noise and dropout masks), and, when a run stops inside an
epoch, the epoch's running sums and the method's running state (ITKD's pending rollout holds this
rank's samples). Every rank's share is gathered into rank 0's checkpoint, in rank order.

Resumed on as many processes, each rank takes back its own share: bit-exact. Resumed on a different
number (a GPU fewer), the global batches are the same (kdcli.data.loaders), rank r takes saved rank r's
streams (rank 0's beyond the saved count) and rank 0 takes the whole of the epoch's sums, so the
epoch's metrics still count every sample once; batch-norm statistics and random draws then differ
from an uninterrupted run, as they would between any two process counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kdcli.engine import distributed
from kdcli.engine.checkpoint import rng_state, set_rng_state


@dataclass
class EpochSums:
    """Running totals of one training epoch on one rank, on the device."""

    terms: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    correct5: Tensor | None = None  # top-5 hits

    def add(self, terms: dict[str, Tensor], correct: Tensor, samples: int, correct5: Tensor | None = None) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        self.correct = correct if self.correct is None else self.correct + correct
        self.correct5 = correct5 if self.correct5 is None else self.correct5 + correct5
        self.samples += samples
        self.steps += 1

    def state(self) -> dict[str, Any]:
        return {"terms": self.terms, "correct": self.correct, "samples": self.samples,
                "steps": self.steps, "seconds": self.seconds, "correct5": self.correct5}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "EpochSums":
        return cls(
            {k: v.to(device) for k, v in state["terms"].items()},
            None if state["correct"] is None else state["correct"].to(device),
            state["samples"], state["steps"], state["seconds"],
            None if state.get("correct5") is None else state["correct5"].to(device),
        )

    @classmethod
    def regrouped(cls, saved: list[dict[str, Any]], rank: int, world: int, device: torch.device) -> "EpochSums":
        """Rank `rank` of `world`'s share of the sums `len(saved)` ranks checkpointed.

        The trainer divides the ranks' summed loss terms by `world`; rank 0 therefore takes the terms'
        mean over the saved ranks times `world`, and all the hits and samples. Other ranks start at zero.
        """
        parts = [cls.from_state(s, device) for s in saved]
        first = parts[0]
        if rank != 0:
            return cls({k: torch.zeros_like(v) for k, v in first.terms.items()},
                       None if first.correct is None else torch.zeros_like(first.correct), 0, first.steps,
                       first.seconds, None if first.correct5 is None else torch.zeros_like(first.correct5))
        scale = world / len(parts)

        def total(values):
            return None if values[0] is None else torch.stack(values).sum(0)

        return cls({k: total([p.terms[k] for p in parts]) * scale for k in first.terms},
                   total([p.correct for p in parts]), sum(p.samples for p in parts), first.steps,
                   max(p.seconds for p in parts), total([p.correct5 for p in parts]))


def _on_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def gathered(device: torch.device, sums: EpochSums | None = None, method: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rank's own state, in rank order (one collective under DDP; called on every rank)."""
    mine = _on_cpu({"rng": rng_state(device), "sums": None if sums is None else sums.state(), "method": method})
    return distributed.all_gather_objects(mine)


@dataclass
class Restored:
    """This rank's share of a checkpoint: its streams are set; the stopped epoch's state, if any."""

    sums: EpochSums | None
    method: dict[str, Any] | None
    saved_world: int


def restore(saved: list[dict[str, Any]], world: distributed.World, device: torch.device, mid_epoch: bool) -> Restored:
    """Set this rank's random streams from `saved` (every rank's share) and return the rest of its share."""
    same = len(saved) == world.size
    mine = saved[world.rank] if world.rank < len(saved) else saved[0]
    set_rng_state(mine["rng"], device)
    if not mid_epoch:
        return Restored(None, None, len(saved))
    if same:
        return Restored(EpochSums.from_state(mine["sums"], device), mine["method"], len(saved))
    sums = EpochSums.regrouped([s["sums"] for s in saved], world.rank, world.size, device)
    return Restored(sums, mine["method"] if world.rank < len(saved) else None, len(saved))
