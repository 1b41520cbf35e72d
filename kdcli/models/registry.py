"""Model names -> modules: the CIFAR zoo, `timm:NAME` and `tv:NAME`.

Pretrained weights load from the local cache without touching the network (huggingface_hub's cache
or torch.hub's `checkpoints/`). A timm file that is not cached is downloaded after a quick
connection test (CONNECT_TIMEOUT_S): offline, or with HF_HUB_OFFLINE=1, it fails at once with a
KdError instead of after huggingface_hub's ~50 s of retries. torchvision downloads with urllib,
which fails at once when the host cannot be resolved.
"""

from __future__ import annotations

import contextlib
import difflib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from kdcli.errors import KdError, did_you_mean, unknown

_ZOO: dict[str, Callable[..., nn.Module]] = {}

# RepDistiller's learning-rate exception for light students (CIFAR-100 protocol).
_LIGHT_STUDENTS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})
CONNECT_TIMEOUT_S = 3.0  # the connection test before downloading weights that are not cached


@dataclass(frozen=True)
class PretrainedInput:
    """What the pretrained weights of a timm/torchvision model expect: input side, normalisation, classes."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


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
    """Build a model by name: a CIFAR zoo name, `timm:NAME`, `tv:NAME` (torchvision), or the user's
    `pkg.module:factory` / `path/to/file.py:factory` (see kdcli.plugins).

    `pretrained=True` loads timm's / torchvision's default weights (the zoo has none built in;
    its trained teachers come from checkpoints). Extra keywords go to timm / torchvision.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KdError(
            f"num_classes must be a positive integer, got {num_classes!r}", "it comes from the dataset's class count"
        )
    from kdcli import plugins

    if plugins.is_plugin_spec(name):
        if pretrained or kw:
            raise KdError(f"{name} is your own model: kd has no pretrained weights or options for it", "drop --pretrained; set options inside the factory")
        return plugins.build_model(name, num_classes)
    source, sep, arch = name.partition(":")
    if not sep:
        return _zoo_model(name, num_classes, pretrained, kw)
    if source == "timm":
        return _timm_model(arch, num_classes, pretrained, kw)
    if source == "tv":
        return _torchvision_model(arch, num_classes, pretrained, kw)
    raise KdError(
        f"unknown model source {source!r} in {name!r}",
        "use a CIFAR zoo name (see `kd list models`), `timm:NAME`, `tv:NAME`, or your own pkg.module:factory / file.py:factory",
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


def _download_error(name: str, err: Exception | str) -> KdError:
    reason = err if isinstance(err, str) else (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return KdError(
        f"could not load the pretrained weights of {name!r}: {reason}",
        "weights download on first use: connect once to fill the cache (~/.cache/huggingface, "
        "~/.cache/torch); offline, cached weights load as they are; or build without pretrained weights",
    )


def pretrained_input(name: str) -> PretrainedInput | None:
    """The input size, normalisation and class count of a `timm:`/`tv:` model's default pretrained
    weights (timm's `pretrained_cfg`, torchvision's weights transforms); None for the zoo. No download."""
    source, _, arch = name.partition(":")
    if source == "timm":
        cfg = _timm_pretrained_cfg(arch)
        if cfg is None:
            return None
        return PretrainedInput(cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std), cfg.num_classes)
    if source == "tv":
        weights = _torchvision_weights(arch)
        transforms = weights.transforms()
        return PretrainedInput(
            transforms.crop_size[0], tuple(transforms.mean), tuple(transforms.std), len(weights.meta["categories"])
        )
    return None


def _timm_pretrained_cfg(arch: str):
    """timm's pretrained config of `arch` (NAME or NAME.TAG), None when it has none; a KdError for an unknown tag."""
    import timm

    try:
        return timm.get_pretrained_cfg(arch)
    except RuntimeError as err:  # timm: "Invalid pretrained tag (...) for ..."
        base = arch.partition(".")[0]
        raise KdError(
            f"timm:{arch}: {err}",
            f"list the published weights with python -c \"import timm; print(timm.list_pretrained('{base}*'))\"",
        ) from err


def _reachable(url: str) -> bool:
    """Whether a TCP connection to the host of `url` (or to the proxy serving it) opens quickly."""
    from urllib.request import getproxies, proxy_bypass

    target = urlparse(url)
    proxy = getproxies().get(target.scheme)
    if proxy and not proxy_bypass(target.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _hub_cached(url: str) -> Path:
    """Where torch.hub (and torchvision, and timm for URL weights) caches the file at `url`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _timm_weights_source(arch: str) -> dict:
    """timm's `pretrained_cfg_overlay`: the cached weight file when there is one, else {} (download).

    Raises a KdError at once when the file is not cached and cannot be downloaded.
    """
    import huggingface_hub

    cfg = _timm_pretrained_cfg(arch)
    if cfg is None:
        return {}
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached, str):
                return {"file": cached}
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise _download_error(f"timm:{arch}", "not in the Hugging Face cache and HF_HUB_OFFLINE is set")
        url = huggingface_hub.constants.ENDPOINT
    elif cfg.url:
        if _hub_cached(cfg.url).is_file():
            return {"file": str(_hub_cached(cfg.url))}
        url = cfg.url
    else:
        return {}
    if not _reachable(url):
        raise _download_error(f"timm:{arch}", f"not in the local cache and {urlparse(url).hostname} cannot be reached (offline?)")
    return {}


def _bad_options(name: str, err: TypeError) -> KdError:
    return KdError(f"bad options for model {name!r}: {err}", "check the extra keywords passed to the model")


def _timm_model(arch: str, num_classes: int, pretrained: bool, kw: dict) -> nn.Module:
    import timm

    if not timm.is_model(arch):
        raise _unknown_external(
            "timm model", arch, timm.list_models(), "python -c 'import timm; print(timm.list_models())'"
        )
    name = f"timm:{arch}"
    if pretrained:
        overlay = _timm_weights_source(arch)
        if overlay:
            kw = {**kw, "pretrained_cfg_overlay": {**kw.get("pretrained_cfg_overlay", {}), **overlay}}
    with _creation_errors(name, pretrained):
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kw)


@contextlib.contextmanager
def _creation_errors(name: str, pretrained: bool) -> Iterator[None]:
    """KdErrors for a timm/torchvision constructor: bad keyword options, or weights that failed to download."""
    try:
        yield
    except TypeError as err:
        raise _bad_options(name, err) from err
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise _download_error(name, err) from err
        raise


def _torchvision_weights(arch: str):
    import torchvision

    classifiers = torchvision.models.list_models(module=torchvision.models)  # not detection, segmentation, video
    if arch not in classifiers:
        raise _unknown_external(
            "torchvision classification model", arch, classifiers,
            "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'",
        )
    return torchvision.models.get_model_weights(arch).DEFAULT


def _torchvision_model(arch: str, num_classes: int, pretrained: bool, kw: dict) -> nn.Module:
    import torchvision

    weights = _torchvision_weights(arch)
    name = f"tv:{arch}"
    with _creation_errors(name, pretrained):
        if not pretrained:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
        model = torchvision.models.get_model(arch, weights=weights, **kw)
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
