"""Model names -> modules: the CIFAR zoo, `timm:NAME` and `tv:NAME`."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from kdcli.errors import KdError, did_you_mean, unknown

_ZOO: dict[str, Callable[..., nn.Module]] = {}

# RepDistiller's learning-rate exception for light students (CIFAR-100 protocol).
_LIGHT_STUDENTS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})


def register_model(name: str):
    """Decorator registering a zoo factory `fn(num_classes) -> nn.Module` under `name`."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ZOO:
            raise ValueError(f"model {name!r} registered twice")
        _ZOO[name] = fn
        return fn

    return decorate


def list_models() -> list[str]:
    """The CIFAR zoo names, in RepDistiller's order (timm and torchvision come by prefix)."""
    return list(_ZOO)


def default_lr(name: str) -> float:
    """Initial SGD lr of the CIFAR-100 protocol: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2, else 0.05."""
    return 0.01 if name in _LIGHT_STUDENTS else 0.05


def create_model(name: str, num_classes: int = 100, *, pretrained: bool = False, **kw) -> nn.Module:
    """Build a model by name: a CIFAR zoo name, `timm:NAME` or `tv:NAME` (torchvision).

    `pretrained=True` loads timm's / torchvision's default weights (the zoo has none built in;
    its trained teachers come from checkpoints). Extra keywords go to timm / torchvision.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdError(
            f"num_classes must be a positive integer, got {num_classes!r}", "it comes from the dataset's class count"
        )
    source, sep, arch = name.partition(":")
    if not sep:
        return _zoo_model(name, num_classes, pretrained, kw)
    if source == "timm":
        return _timm_model(arch, num_classes, pretrained, kw)
    if source == "tv":
        return _torchvision_model(arch, num_classes, pretrained, kw)
    raise KdError(
        f"unknown model source {source!r} in {name!r}",
        "use a CIFAR zoo name (see `kd list models`), `timm:NAME` or `tv:NAME`",
    )


def _zoo_model(name: str, num_classes: int, pretrained: bool, kw: dict) -> nn.Module:
    if name not in _ZOO:
        raise unknown("model", name, _ZOO, "kd list models")
    if pretrained:
        raise KdError(
            f"model {name!r} has no built-in pretrained weights",
            "load trained weights from a checkpoint instead (RepDistiller and mdistiller teacher "
            "checkpoints load as they are)",
        )
    if kw:
        raise KdError(
            f"model {name!r} takes no options, got {', '.join(sorted(kw))}",
            "CIFAR zoo models are fixed architectures; options apply to timm:NAME and tv:NAME models",
        )
    return _ZOO[name](num_classes=num_classes)


def _unknown_external(kind: str, name: str, choices: list[str], listing: str) -> KdError:
    """Like `errors.unknown`, but lists nothing when no name is close (the lists are long)."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = did_you_mean(name, close) + " " if close else ""
    return KdError(f"unknown {kind} {name!r}", hint + f"(see `{listing}`)")


def _download_error(name: str, err: Exception) -> KdError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return KdError(
        f"could not load the pretrained weights of {name!r}: {reason}",
        "weights download on first use: connect once to fill the cache (~/.cache/huggingface, "
        "~/.cache/torch); offline with a filled cache, set HF_HUB_OFFLINE=1; or build without pretrained weights",
    )


def _bad_options(name: str, err: TypeError) -> KdError:
    return KdError(f"bad options for model {name!r}: {err}", "check the extra keywords passed to the model")


def _timm_model(arch: str, num_classes: int, pretrained: bool, kw: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise _unknown_external(
            "timm model", arch, timm.list_models(), "python -c 'import timm; print(timm.list_models())'"
        )
    name = f"timm:{arch}"
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kw)
    except TypeError as err:
        raise _bad_options(name, err) from err
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise _download_error(name, err) from err
        raise


def _torchvision_model(arch: str, num_classes: int, pretrained: bool, kw: dict) -> nn.Module:
    import torchvision

    if arch not in torchvision.models.list_models():
        raise _unknown_external(
            "torchvision model", arch, torchvision.models.list_models(),
            "python -c 'import torchvision; print(torchvision.models.list_models())'",
        )
    name = f"tv:{arch}"
    try:
        if not pretrained:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        model = torchvision.models.get_model(arch, weights=weights, **kw)
    except TypeError as err:
        raise _bad_options(name, err) from err
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise _download_error(name, err) from err
        raise
    if len(weights.meta.get("categories", ())) != num_classes:
        _replace_head(model, num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap a pretrained model's final Linear for a freshly initialised one with `num_classes` outputs."""
    from kdcli.models.features import classifier_of

    head = classifier_of(model)
    path = next(name for name, module in model.named_modules() if module is head)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
