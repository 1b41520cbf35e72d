"""`kd export`: a trained network as a deployable TorchScript or ONNX file, checked against PyTorch.

The file takes normalised images (`(x/255 - mean) / std` for 0..255 images; the mean/std kd
recorded when it trained the network) and returns logits; that normalisation, the input shape and
the class count travel inside the file (TorchScript extra file `kdcli.json`, ONNX metadata_props).
After writing, the file is loaded back and run on random inputs beside the PyTorch model; the max
abs difference of the logits is reported (ONNX needs the `onnx` extra: onnx + onnxruntime).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.errors import KdError
from kdcli.teachers import read_input, read_metadata

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = 1e-3  # max abs logit difference accepted between the export and PyTorch (fp32)
CHECK_BATCHES = (2, 3)  # a dynamic batch dimension is checked at a second size the trace never saw


@dataclass
class Exported:
    path: Path
    format: str
    max_abs_diff: float
    checked_with: str
    metadata: dict[str, str]

    def summary(self) -> dict[str, Any]:
        diff = None if self.max_abs_diff != self.max_abs_diff else self.max_abs_diff  # NaN: not checked numerically
        return {"path": str(self.path), "format": self.format, "max_abs_diff": diff,
                "checked_with": self.checked_with, "tolerance": TOLERANCE, **{f"meta_{k}": v for k, v in self.metadata.items()}}


def weights_of(source: str) -> Path:
    """A run folder's student.safetensors (model.safetensors for kd train), or the weights file given."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("student.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise KdError(f"{path} holds no student.safetensors or model.safetensors", "pass a finished kd run folder or a kd weights file")
    if not path.is_file():
        raise KdError(f"{source} does not exist", "pass a kd run folder or its .safetensors weights")
    return path


def export(
    source: str, format: str = "torchscript", out: str | None = None, batch_size: str = "dynamic",
    input_size: str | None = None, arch: str | None = None,
) -> Exported:
    """Export the network in `source` (run folder or weights) to `format`; returns where and how close it is."""
    from kdcli.api import load_network  # the one way kd reads a weights file

    if format not in FORMATS:
        raise KdError(f"--format {format!r} is unknown", "use onnx or torchscript")
    dynamic, batch = _batch(batch_size)
    weights = weights_of(source)
    model, metadata = load_network(str(weights), metadata_data(weights), None, arch=arch)
    model.eval()
    shape = _input_shape(metadata, input_size)
    recorded = _recorded(metadata, shape)
    target = Path(out).expanduser() if out else weights.with_suffix(SUFFIX[format])
    target.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    if format == "torchscript":
        _torchscript(model, example, target, recorded)
        diff, checked = _check_torchscript(model, target, shape, dynamic, batch), "torch.jit"
    else:
        _onnx(model, example, target, recorded, dynamic)
        diff, checked = _check_onnx(model, target, shape, dynamic, batch)
    if diff > TOLERANCE or (diff != diff and checked == 'torch.jit'):
        raise KdError(
            f"the {format} export of {weights} differs from PyTorch by {diff:.3g} (more than {TOLERANCE:g}); {target} is kept for inspection",
            "the network likely has data-dependent control flow that tracing fixed; try the other --format",
            exit_code=1,
        )
    return Exported(target, format, diff, checked, recorded)


def metadata_data(weights: Path) -> str:
    """The dataset a kd weights file was trained on (how load_network looks up names), else ''."""
    return read_metadata(weights).get("dataset", "") if weights.suffix == ".safetensors" else ""


def _batch(batch_size: str) -> tuple[bool, int]:
    if batch_size == "dynamic":
        return True, CHECK_BATCHES[0]
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise KdError(f"--batch-size {batch_size!r} is invalid", "use dynamic or a positive integer")
    return False, int(batch_size)


def _input_shape(metadata: dict[str, str], given: str | None) -> tuple[int, ...]:
    text = given or metadata.get("input_shape")
    if not text and metadata.get("image_size"):
        text = f"3,{metadata['image_size']},{metadata['image_size']}"
    if not text:
        raise KdError("the weights do not record their input shape (written by an older kd)", "pass --input-size C,H,W, e.g. 3,32,32")
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise KdError(f"input size {text!r} is not C,H,W", "write e.g. --input-size 3,32,32")
    return shape


def _recorded(metadata: dict[str, str], shape: tuple[int, ...]) -> dict[str, str]:
    """What the deployed file says about itself: how to prepare its input, what comes out."""
    recorded = {key: metadata[key] for key in ("arch", "num_classes", "dataset", "method", "top1", "kdcli_version") if key in metadata}
    trained = read_input(metadata)
    if trained is not None:
        mean, std, _ = trained
        recorded["mean"] = ",".join(f"{v:g}" for v in mean)
        recorded["std"] = ",".join(f"{v:g}" for v in std)
        recorded["normalization"] = "input = (image / 255 - mean) / std per channel, image RGB uint8 [N, C, H, W]"
    recorded["input_shape"] = ",".join(map(str, shape))
    recorded["output"] = "logits [N, num_classes]"
    return recorded


def _failed(format: str, exc: Exception) -> KdError:
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    return KdError(f"the network cannot be exported to {format} ({reason})", "try the other --format, or simplify the model's forward")


class _LogitsOnly(nn.Module):
    """The network as deployed: logits only (kd's zoo models may return more on request)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _torchscript(model: nn.Module, example: torch.Tensor, target: Path, recorded: dict[str, str]) -> None:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_LogitsOnly(model).eval(), example, check_trace=False)
        traced.save(str(target), _extra_files={"kdcli.json": json.dumps(recorded)})
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways, all the model's
        raise _failed("torchscript", exc) from exc


def read_torchscript_metadata(path: Path) -> dict[str, str]:
    extra = {"kdcli.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["kdcli.json"] or "{}")


@torch.no_grad()
def _check_torchscript(model: nn.Module, target: Path, shape, dynamic: bool, batch: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        loaded = torch.jit.load(str(target)).eval()
    return max(_diff(model(x), loaded(x)) for x in _inputs(shape, dynamic, batch))


def _onnx(model: nn.Module, example: torch.Tensor, target: Path, recorded: dict[str, str], dynamic: bool) -> None:
    try:
        import onnx
    except ImportError:
        raise KdError("ONNX export needs the onnx package", "pip install 'kdcli[onnx]' (onnx and onnxruntime)") from None
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_LogitsOnly(model).eval(), (example,), str(target), input_names=["input"], output_names=["logits"],
                              dynamic_axes=axes, dynamo=False)
    except Exception as exc:  # noqa: BLE001
        raise _failed("onnx", exc) from exc
    graph = onnx.load(str(target))
    for key, value in recorded.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(target))


def _check_onnx(model: nn.Module, target: Path, shape, dynamic: bool, batch: int) -> tuple[float, str]:
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(str(target))
        return float("nan"), "onnx.checker only (install onnxruntime for the numeric check)"
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diffs = [_diff(model(x), torch.from_numpy(session.run(None, {"input": x.numpy()})[0])) for x in _inputs(shape, dynamic, batch)]
    return max(diffs), "onnxruntime"


def _inputs(shape, dynamic: bool, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sizes = CHECK_BATCHES if dynamic else (batch,)
    return [torch.randn(n, *shape, generator=g) for n in sizes]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise KdError(f"the export returns shape {tuple(b.shape)} where PyTorch returns {tuple(a.shape)}",
                      "the batch size may be fixed inside the model (e.g. a reshape with a literal); use --batch-size N")
    return float((a.float() - b.float()).abs().max())
