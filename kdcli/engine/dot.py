"""The step of the student's optimizer: plain SGD with momentum, or DOT.

DOT (Zhao et al., ICCV 2023, mdistiller's DistillationOrientedTrainer) keeps two momentum buffers per
parameter: the task gradient (the `ce` term) is accumulated with momentum mu - delta, the
distillation gradient (every other term) with mu + delta. Two backward passes per step. Works with
any method; a step without distillation terms (AB/FSP main stage) reduces to SGD with momentum mu.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdcli.errors import KdError

TASK_TERM = "ce"


class DOT(torch.optim.Optimizer):
    """SGD with separate task / distillation momenta (no dampening, no nesterov), as mdistiller.

    Buffers: `momentum_buffer` (task, weight decay applied there) and `momentum_kd_buffer`
    (distillation); a parameter reached by one loss only keeps plain momentum mu on that buffer.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise KdError(f"--dot-delta {delta} with momentum {momentum} gives momenta outside [0, 1)",
                          "use a delta below min(momentum, 1 - momentum), e.g. 0.075 with momentum 0.9")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    def backward_step(self, terms: dict[str, Tensor]) -> None:
        """Backpropagate the distillation terms, then the task term, and apply the DOT update."""
        task = terms.get(TASK_TERM)
        distill = [value for name, value in terms.items() if name != TASK_TERM]
        self.zero_grad(set_to_none=True)
        distill_grads = {}
        if distill:
            sum(distill).backward(retain_graph=task is not None)
            distill_grads = self._take_grads()
        task_grads = {}
        if task is not None:
            task.backward()
            task_grads = self._take_grads()
        self._update(task_grads, distill_grads)

    def _take_grads(self) -> dict[int, Tensor]:
        """The current gradients by parameter id; the parameters' .grad are cleared (set to None), so
        the next backward writes fresh tensors instead of accumulating into these."""
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[id(p)] = p.grad
                    p.grad = None
        return grads

    @torch.no_grad()
    def _update(self, task_grads: dict[int, Tensor], distill_grads: dict[int, Tensor]) -> None:
        for group in self.param_groups:
            lr, mu, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                g_t, g_d = task_grads.get(id(p)), distill_grads.get(id(p))
                state = self.state[p]
                if g_t is not None:
                    d = g_t.add(p, alpha=wd) if wd else g_t
                    v = state.get("momentum_buffer")
                    if v is None:
                        v = state["momentum_buffer"] = d.clone()
                    else:
                        v.mul_(mu - delta if g_d is not None else mu).add_(d)
                    p.add_(v, alpha=-lr)
                if g_d is not None:
                    u = state.get("momentum_kd_buffer")
                    if u is None:  # the reference: no weight decay on u's first use, whatever the case (dot.md)
                        u = state["momentum_kd_buffer"] = g_d.clone()
                    elif g_t is not None:
                        u.mul_(mu + delta).add_(g_d)
                    else:
                        u.mul_(mu).add_(g_d.add(p, alpha=wd) if wd else g_d)
                    p.add_(u, alpha=-lr)


def optimize(optimizer: torch.optim.Optimizer, terms: dict[str, Tensor]) -> None:
    """One optimizer step on the summed terms (DOT: on the task and distillation terms separately)."""
    if isinstance(optimizer, DOT):
        optimizer.backward_step(terms)
        return
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
