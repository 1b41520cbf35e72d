"""Fold a frozen network's BatchNorm layers into the convolutions that feed them.

In eval mode BatchNorm is a per-channel affine map, so `bn(conv(x))` equals one convolution with
rescaled weights and a bias. The frozen teacher runs every training step, and dropping its BN
passes saves a memory-bound pass per layer. Which conv feeds which BN is read from one traced
forward pass (a BN whose input tensor is a conv's output), so no model needs to declare it; the
folded copy's outputs are then checked against the original's, and the original is kept if they
disagree (e.g. a conv output that something else also reads).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from kdcli.engine.backend import strict_fp32
from kdcli.errors import KdError
from kdcli.models.features import Outputs, forward_outputs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, x: Tensor, preact: bool = False) -> tuple[nn.Module, int]:
    """A copy of the frozen `model` with its conv -> BatchNorm2d pairs folded, and how many were.

    Returns `model` itself (and 0) when there is nothing to fold or the folded copy's outputs
    (logits, features with `preact`, embedding) on the sample batch `x` differ from the original's.
    Both passes run in strict fp32 (TF32 off): TF32's rounding alone would fail the check of a
    correct fold on a GPU and silently leave the teacher unfolded.
    """
    model.eval()
    with strict_fp32():
        return _fold_checked(model, x, preact)


def _fold_checked(model: nn.Module, x: Tensor, preact: bool) -> tuple[nn.Module, int]:
    before = _outputs(model, x, preact)
    folded = copy.deepcopy(model)
    pairs = _conv_bn_pairs(folded, x)
    names = _single_names(folded)
    pairs = [(conv, bn) for conv, bn in pairs if bn in names]
    if not pairs:
        return model, 0
    for conv, bn in pairs:
        _fold_into(conv, bn)
        parent, attr = names[bn]
        setattr(parent, attr, nn.Identity())
    if not _same_outputs(before, _outputs(folded, x, preact)):
        return model, 0
    return folded, len(pairs)


def _conv_bn_pairs(model: nn.Module, x: Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) where, in one forward pass, the BN (plain BatchNorm2d with running stats) was called
    exactly once, on the very tensor a conv (called once) had just returned."""
    calls: list[tuple[nn.Module, Tensor, Tensor]] = []

    def record(module: nn.Module, args: tuple, output: Tensor) -> None:
        calls.append((module, args[0], output))

    watched = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(record) for m in watched]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    count: dict[nn.Module, int] = {}
    for module, _, _ in calls:
        count[module] = count.get(module, 0) + 1
    made_by = {id(out): m for m, _, out in calls if isinstance(m, nn.Conv2d) and count[m] == 1}
    pairs = []
    for module, inp, _ in calls:
        conv = made_by.get(id(inp))
        if type(module) is nn.BatchNorm2d and conv is not None and count[module] == 1 and _foldable(module):
            pairs.append((conv, module))
    return pairs


def _foldable(bn: nn.BatchNorm2d) -> bool:
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv's weight and bias become those of bn(conv(.)) in eval mode (computed in float64)."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    old_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    bias = (old_bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=False)
    else:
        conv.bias.copy_(bias)


def _single_names(model: nn.Module) -> dict[nn.Module, tuple[nn.Module, str]]:
    """Each submodule's (parent, attribute name); modules registered under several names are left out."""
    seen: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent.named_children():
            seen.setdefault(child, []).append((parent, attr))
    return {child: places[0] for child, places in seen.items() if len(places) == 1}


def _outputs(model: nn.Module, x: Tensor, preact: bool) -> Outputs:
    """What the methods read (logits, features, embedding), or the plain output of a model without taps."""
    try:
        return forward_outputs(model, x, preact=preact)
    except KdError:
        return Outputs(model(x), [], None)


def _same_outputs(a: Outputs, b: Outputs) -> bool:
    tensors_a = [a.logits, *a.features] + ([a.embedding] if a.embedding is not None else [])
    tensors_b = [b.logits, *b.features] + ([b.embedding] if b.embedding is not None else [])
    return len(tensors_a) == len(tensors_b) and all(
        u.shape == v.shape and torch.allclose(u.float(), v.float(), rtol=1e-3, atol=1e-3 * float(u.abs().max()) + 1e-6)
        for u, v in zip(tensors_a, tensors_b)
    )
