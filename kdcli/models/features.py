"""What the engine and methods see of a network: `Outputs(logits, features, embedding)`.

CIFAR zoo models return their outputs themselves (`model(x, features=True)`). timm and
torchvision models are read through forward hooks installed once per model ("taps"): the stage
modules record their outputs and the final Linear classifier records its input while `model(x)`
runs. Going through `model(x)` keeps DDP / torch.compile wrappers in the path (a direct call of the
inner module would bypass DDP's gradient synchronisation) and makes `logits` exactly `model(x)`,
with `logits == classifier(embedding)` by construction, in train mode too.

Which modules are stages:
- timm: the modules of the model's `feature_info` (the taps of timm's feature API: what
  `features_only=True` and `forward_intermediates` return for CNNs), preceded by the model's
  `stem` when timm does not list it (ConvNeXt). Transformer blocks output tokens [B, N, C]; those
  are laid out as maps [B, C, h, w] after dropping the prefix (class/register) tokens, as
  `forward_intermediates(output_fmt="NCHW")` does.
- torchvision: for each resolution of a 64x64 probe, the last module producing it, among the
  model's top-level children with one level of `nn.Sequential` unfolded (pooling layers left out).
  This gives stem + stage outputs for resnet*/resnext*/wide_resnet*, mobilenet_v2/v3, efficientnet*,
  convnext*, regnet*, vgg*, densenet*, shufflenet_v2*, mnasnet* (tested: resnet18,
  mobilenet_v3_small). Models whose probe finds fewer than two maps (e.g. vit_*, swin_* token
  models) give `features == []`, and methods that need feature maps refuse them with a KdError.
`preact` applies to the CIFAR zoo only (timm/torchvision features are the modules' outputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdcli.errors import KdError
from kdcli.models.cifar import CifarNet

# Stage boundaries are found on a probe image of this size (stride-32 nets still end above 1x1); models
# with a fixed input size (ViT) are probed at 224.
PROBE_SIZES = (64, 224)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class Outputs(NamedTuple):
    """One forward pass, in RepDistiller's `is_feat` order.

    features: the stem output followed by every stage output, before pooling
        (RepDistiller `feat[:-1]`; `features[1:]` are the *stage outputs*, `features[-1]` the
        *last-stage map*). Post-ReLU unless the pass asked for pre-activation features.
    embedding: the pooled penultimate vector fed to the classifier (RepDistiller `feat[-1]`).
    """

    logits: Tensor
    features: list[Tensor]
    embedding: Tensor


def forward_outputs(model: nn.Module, x: Tensor, preact: bool = False) -> Outputs:
    """Run `model` on `x` (through any DDP / DataParallel / compile wrapper) and return its `Outputs`.

    CIFAR zoo: the full feature list (pre-activation variants with `preact=True`). timm and
    torchvision: see the module doc; `preact` is ignored.
    """
    inner = _unwrap(model)
    if isinstance(inner, CifarNet):
        return Outputs(*model(x, features=True, preact=preact))
    taps = _taps_of(inner)
    taps.start()
    try:
        logits = model(x)
    finally:
        features, embedding = taps.stop()
    return Outputs(logits, [_as_map(inner, f) for f in features], embedding)


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final Linear layer: `get_classifier()` (zoo, timm), else the last Linear (torchvision)."""
    inner = _unwrap(model)
    get_classifier = getattr(inner, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
    else:
        head = next((m for m in reversed(list(inner.modules())) if isinstance(m, nn.Linear)), None)
    if not isinstance(head, nn.Linear):
        raise KdError(
            f"{type(inner).__name__} has no final nn.Linear classifier",
            "pick a model whose head is a Linear layer (most timm and torchvision classifiers)",
        )
    return head


def feature_modules(model: nn.Module) -> list[str]:
    """Names of the submodules whose outputs form `Outputs.features` of a timm/torchvision model."""
    inner = _unwrap(model)
    info = getattr(inner, "feature_info", None)
    if _is_timm(inner) and info:
        names = [entry["module"] for entry in info]
        stem = getattr(inner, "stem", None)
        if isinstance(stem, nn.Module) and not any(n == "stem" or n.startswith("stem.") for n in names):
            names.insert(0, "stem")
        return names
    return _probe_stages(inner)


# ---- taps ----------------------------------------------------------------------------------


class _Taps:
    """Recorder shared by the hooks of one model; records only between start() and stop().

    Outside a forward_outputs call the hooks store nothing, so plain `model(x)` calls (evaluation,
    logits-only methods) keep no activations alive.
    """

    def __init__(self):
        self.recording = False
        self.features: list[Tensor] = []
        self.embedding: Tensor | None = None

    def start(self) -> None:
        self.features, self.embedding, self.recording = [], None, True

    def stop(self) -> tuple[list[Tensor], Tensor | None]:
        found = (self.features, self.embedding)
        self.features, self.embedding, self.recording = [], None, False
        return found


# Plain functions, not closures, so deep copies of a model (EMA, averaging) keep working: the
# copy's hooks find the copy's recorder through `module._kdcli_taps`.
def _record_output(module: nn.Module, args: tuple, output) -> None:
    taps = module._kdcli_taps
    if taps.recording and isinstance(output, Tensor):
        taps.features.append(output)


def _record_input(module: nn.Module, args: tuple) -> None:
    taps = module._kdcli_taps
    if taps.recording:
        taps.embedding = args[0]


def _taps_of(inner: nn.Module) -> _Taps:
    """The model's recorder, installing its hooks on first use."""
    taps = inner.__dict__.get("_kdcli_taps")
    if taps is not None:
        return taps
    head = classifier_of(inner)
    names = feature_modules(inner)
    taps = _Taps()
    for name in names:
        module = inner.get_submodule(name)
        module._kdcli_taps = taps
        module.register_forward_hook(_record_output)
    head._kdcli_taps = taps
    head.register_forward_pre_hook(_record_input)
    inner._kdcli_taps = taps
    return taps


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


@torch.no_grad()
def _probe_stages(model: nn.Module) -> list[str]:
    """For each spatial resolution of a probe forward, the last candidate module that produced it."""
    candidates = []
    for name, child in model.named_children():
        if type(child) is nn.Sequential:
            candidates += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            candidates.append((name, child))
    candidates = [(name, m) for name, m in candidates if not isinstance(m, _POOLS)]
    calls: list[tuple[str, tuple[int, ...]]] = []  # (module, output H x W) in execution order

    def probe_hook(name: str):
        def hook(module, args, output):
            calls.append((name, tuple(output.shape[-2:]) if isinstance(output, Tensor) and output.ndim == 4 else ()))

        return hook

    handles = [m.register_forward_hook(probe_hook(name)) for name, m in candidates]
    was_training = model.training
    try:
        model.eval()
        _run_probe(model, calls)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    once = {name for name, _ in calls if sum(n == name for n, _ in calls) == 1}  # a reused module is no stage
    last_at: dict[tuple[int, ...], str] = {}
    for name, size in calls:
        if size and size != (1, 1) and name in once:  # 1x1: a globally pooled vector, not a stage
            last_at.pop(size, None)  # re-insert: dicts keep the order of the latest module per size
            last_at[size] = name
    names = list(last_at.values())
    return names if len(names) >= 2 else []


def _run_probe(model: nn.Module, calls: list) -> None:
    param = next(model.parameters(), None)
    where = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    for size in PROBE_SIZES:
        calls.clear()
        try:
            model(torch.zeros(1, 3, size, size, **where))
            return
        except (RuntimeError, AssertionError, ValueError):  # e.g. a ViT's fixed input size
            continue
    calls.clear()  # the model runs at none of the probe sizes: no feature maps


def _as_map(model: nn.Module, feature: Tensor) -> Tensor:
    """Transformer tokens [B, N, C] as a map [B, C, h, w] (prefix tokens dropped); maps unchanged."""
    if feature.ndim != 3:
        return feature
    tokens = feature[:, getattr(model, "num_prefix_tokens", 0) :]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        return feature
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile / compile-role wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "role_of", None), nn.Module):  # kdcli.engine.capture roles
            model = model.role_of
        else:
            return model
