"""What the engine and methods see of a network: `Outputs(logits, features, embedding)`."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from kdcli.errors import KdError
from kdcli.models.cifar import CifarNet


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
    """Run `model` on `x` and return its `Outputs`.

    CIFAR zoo: the full feature list (pre-activation variants with `preact=True`), called
    through `model(...)` so DDP and torch.compile wrappers stay in the path.
    timm and torchvision: minimal adapter for now, `features` is `[]` (a feature adapter comes
    later) and `preact` is ignored. timm: embedding from `forward_head(pre_logits=True)`, called
    on the unwrapped module. torchvision: embedding = the input of the final Linear, captured by
    a pre-hook installed on first use.
    """
    inner = _unwrap(model)
    if isinstance(inner, CifarNet):
        return Outputs(*model(x, features=True, preact=preact))
    if hasattr(inner, "forward_head") and hasattr(inner, "forward_features"):
        feature_map = inner.forward_features(x)
        embedding = inner.forward_head(feature_map, pre_logits=True)
        return Outputs(inner.forward_head(feature_map), [], embedding)
    head = _keeping_input(classifier_of(inner))
    logits = model(x)
    return Outputs(logits, [], head.__dict__.pop("_kdcli_input"))


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _keeping_input(head: nn.Linear) -> nn.Linear:
    """`head`, with a pre-hook (installed once) that leaves its input in `head._kdcli_input`."""
    if not getattr(head, "_kdcli_keeps_input", False):
        head.register_forward_pre_hook(_keep_input)
        head._kdcli_keeps_input = True
    return head


def _keep_input(module: nn.Module, args: tuple) -> None:
    # A plain function, not a closure, so deep copies of the model (EMA, averaging) keep working.
    module._kdcli_input = args[0]
