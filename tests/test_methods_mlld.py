"""MLLD (Jin et al., multi-level logit distillation): its strong view and its loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from tests.conftest import LEARNED_TOP1
from kdcli.batch import Batch
from kdcli.data.augment import (
    CUTOUT_FILL,
    RAND_AUGMENT_OPS,
    VIEWS,
    cutout,
    rand_augment,
    random_crop_flip,
    strong_views,
)
from kdcli.data.loaders import TensorLoader
from kdcli.data.registry import InMemorySplit
from kdcli.errors import KdError
from kdcli.methods.base import Shapes, method_class
from kdcli.models.features import Outputs

OPS = {op.name: op for op in RAND_AUGMENT_OPS}


def _images(b=6, h=12, w=10, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(20, 220, (b, 3, h, w), generator=g, dtype=torch.uint8)
    images[:, :, 3:7, 2:6] = torch.tensor([250, 10, 128], dtype=torch.uint8).view(3, 1, 1)  # a coloured block
    return images


# --- strong view ---------------------------------------------------------------------------------


def test_op_list_and_ranges_are_the_references():
    expected = {
        "AutoContrast": (0, 1), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95), "Contrast": (0.05, 0.95),
        "Equalize": (0, 1), "Identity": (0, 1), "Posterize": (4, 8), "Rotate": (-30, 30),
        "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "Solarize": (0, 256),
        "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
    }
    assert {op.name: (op.low, op.high) for op in RAND_AUGMENT_OPS} == expected
    assert VIEWS["strong"] is strong_views


def _pil_reference(name: str, image: Image.Image, v: float) -> Image.Image:
    """The reference's op (FixMatch RandAugment in mdistiller's cifar100.py), on one PIL image."""
    w, h = image.size
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(image),
        "Brightness": lambda: ImageEnhance.Brightness(image).enhance(v),
        "Color": lambda: ImageEnhance.Color(image).enhance(v),
        "Contrast": lambda: ImageEnhance.Contrast(image).enhance(v),
        "Equalize": lambda: ImageOps.equalize(image),
        "Identity": lambda: image,
        "Posterize": lambda: ImageOps.posterize(image, int(v)),
        "Rotate": lambda: image.rotate(v),
        "Sharpness": lambda: ImageEnhance.Sharpness(image).enhance(v),
        "ShearX": lambda: image.transform(image.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "ShearY": lambda: image.transform(image.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(image, v),
        "TranslateX": lambda: image.transform(image.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "TranslateY": lambda: image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h)),
    }[name]()


# PIL rounds grey levels where torchvision's kernels truncate: at most one level apart.
_ROUNDING = {"AutoContrast": 1, "Color": 1, "Contrast": 1}


@pytest.mark.parametrize("name", [op.name for op in RAND_AUGMENT_OPS])
def test_each_op_matches_the_reference_pil_op_per_sample(name):
    op = OPS[name]
    images = _images(b=3)  # 12 x 10: not square, so x and y cannot be swapped unnoticed
    magnitudes = torch.tensor([op.low + (op.high - op.low) * f for f in (0.13, 0.5, 0.91)])
    out = op.fn(images, magnitudes)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i, v in enumerate(magnitudes.tolist()):
        expected = np.asarray(_pil_reference(name, Image.fromarray(images[i].permute(1, 2, 0).numpy()), v))
        diff = np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
        assert diff.max() <= _ROUNDING.get(name, 0), (name, v, diff.max())


def test_geometric_ops_move_content_as_named():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 8, 8)
    ones = torch.ones(2)
    # Rotate +90 degrees: counter-clockwise (the right column becomes the top row).
    assert torch.equal(OPS["Rotate"].fn(images, 90 * ones), torch.rot90(images, 1, dims=(2, 3)))
    # TranslateX +0.25 of 8 pixels: content moves 2 pixels left, black enters on the right.
    shifted = OPS["TranslateX"].fn(images, 0.25 * ones)
    assert torch.equal(shifted[..., :6], images[..., 2:]) and not shifted[..., 6:].any()
    shifted = OPS["TranslateY"].fn(images, -0.25 * ones)
    assert torch.equal(shifted[..., 2:, :], images[..., :6, :]) and not shifted[..., :2, :].any()
    # ShearX: row y shifts left by floor(0.5 + v * (y + 0.5)) pixels (PIL's pixel-centre convention).
    sheared = OPS["ShearX"].fn(images, 0.25 * ones)
    for y in range(8):
        k = math.floor(0.5 + 0.25 * (y + 0.5))
        assert torch.equal(sheared[:, :, y, : 8 - k], images[:, :, y, k:])


def test_value_ops_act_as_named():
    images = _images(b=2)
    # Posterize 4 bits: low nibble cleared; Solarize 128: values >= 128 inverted.
    masks = torch.tensor([0xF0, 0xFE], dtype=torch.uint8).view(2, 1, 1, 1)
    assert torch.equal(OPS["Posterize"].fn(images, torch.tensor([4.9, 7.2])), images & masks)
    solarized = OPS["Solarize"].fn(images, torch.full((2,), 128.0))
    assert torch.equal(solarized, torch.where(images >= 128, 255 - images, images))
    # Brightness 0.5 halves (truncating); AutoContrast stretches each channel to 0..255 (254: truncation).
    assert torch.equal(OPS["Brightness"].fn(images, torch.full((2,), 0.5)), images // 2)
    stretched = OPS["AutoContrast"].fn(images, torch.zeros(2)).flatten(2)
    assert (stretched.amin(2) == 0).all() and (stretched.amax(2) >= 254).all()


def test_cutout_paints_the_references_rectangle():
    images = _images(b=8, h=32, w=32)
    out = cutout(images, torch.Generator().manual_seed(5))
    fraction, u, v = torch.rand((3, 8), generator=torch.Generator().manual_seed(5)).double().tolist()
    for i in range(8):
        # The reference: v = U(0, 0.5) * W; x0 ~ np.random.uniform(W) (low=W, high=1); PIL rectangle.
        side = fraction[i] * 0.5 * 32
        x0, y0 = 32 + (1 - 32) * u[i], 32 + (1 - 32) * v[i]
        x0, y0 = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        ImageDraw.Draw(pil).rectangle((x0, y0, min(32, x0 + side), min(32, y0 + side)), CUTOUT_FILL)
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), np.asarray(pil)), i


def test_strong_views_shape_dtype_and_determinism():
    images = _images(b=16, h=32, w=32)
    view = strong_views(images, 4, torch.Generator().manual_seed(3))
    assert view.shape == images.shape and view.dtype == torch.uint8
    assert torch.equal(view, strong_views(images, 4, torch.Generator().manual_seed(3)))
    assert not torch.equal(view, strong_views(images, 4, torch.Generator().manual_seed(4)))
    # Beyond the crop/flip the same generator would give: RandAugment and Cutout change every image.
    weak = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    assert all(not torch.equal(a, b) for a, b in zip(view, weak))
    assert all(not torch.equal(a, b) for a, b in zip(view, images))


def test_rand_augment_draws_per_sample_and_gathering_changes_nothing():
    images = _images(b=64, h=16, w=16)
    gathered = rand_augment(images, torch.Generator().manual_seed(7), gather=True)
    selected = rand_augment(images, torch.Generator().manual_seed(7), gather=False)
    assert torch.equal(gathered, selected)
    same = images[:1].expand(64, -1, -1, -1).contiguous()
    out = rand_augment(same, torch.Generator().manual_seed(7))
    assert len({bytes(x.flatten().tolist()) for x in out}) > 32  # one image, many different results


def test_loader_serves_a_normalised_strong_view():
    split = InMemorySplit(_images(b=8, h=32, w=32), torch.arange(8))
    batch = next(iter(TensorLoader(split, 4, True, (0.5,) * 3, (0.25,) * 3, views="strong")))
    assert batch.views.shape == batch.x.shape and batch.views.dtype == torch.float32
    assert not torch.allclose(batch.views, batch.x)
    again = next(iter(TensorLoader(split, 4, True, (0.5,) * 3, (0.25,) * 3, views="strong")))
    assert torch.equal(batch.views, again.views)


# --- loss ------------------------------------------------------------------------------------------

B, C = 4, 3


def _logits():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2 * B, C, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(2 * B, C, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 2, 1, 2])
    return s, t, y


def _method(**options):
    shapes = Shapes(num_classes=C)
    return method_class("mlld")(shapes, shapes, 100, **options)


def _run(method, s, t, y):
    batch = Batch(torch.zeros(B, 3, 4, 4), y, torch.arange(B), torch.zeros(B, 3, 4, 4))
    return method(Outputs(s, [], None), Outputs(t, [], None), batch)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(zs, zt, T):
    ps, pt = _softmax(zs / T), _softmax(zt / T)
    return T * T * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))


def _gram_gap(zs, zt, T, classes):
    ps, pt = _softmax(zs / T), _softmax(zt / T)
    if classes:
        ps, pt = ps.T, pt.T
    return np.sum((pt @ pt.T - ps @ ps.T) ** 2)


def _ce(z, y):
    return -np.mean(np.log(_softmax(z)[np.arange(len(y)), y]))


def _zscore(z):
    return (z - z.mean(axis=1, keepdims=True)) / (1e-7 + z.std(axis=1, ddof=1, keepdims=True))


def _expected(s, t, y, ce=0.1, kd=0.9, T=4.0, rho=0.5, rho_cls=0.5, standardize=False):
    """The released code's total, written out in float64: a dict of the method's terms."""
    s, t, y = s.detach().numpy(), t.numpy(), y.numpy()
    sw, ss, tw, ts = s[:B], s[B:], t[:B], t[B:]
    temps = (T, 3.0, 5.0, 2.0, 6.0)
    isw, iss, itw, its = (_zscore(z) for z in (sw, ss, tw, ts)) if standardize else (sw, ss, tw, ts)
    weak_instance = rho * sum(_kl(isw, itw, k) for k in temps)
    # The code's "strong" instance term: strong logits at T, 3, 5 but weak logits at 2 and 6.
    strong_instance = sum(_kl(iss, its, k) for k in temps[:3]) + sum(_kl(isw, itw, k) for k in temps[3:])
    return {
        "ce": ce * (_ce(sw, y) + _ce(ss, y)),
        "instance": kd * (weak_instance + strong_instance),
        "class": kd * rho_cls * sum(_gram_gap(sw, tw, k, classes=True) for k in temps) / C,
        "batch": kd * rho * sum(_gram_gap(sw, tw, k, classes=False) for k in temps) / B,
    }


def _assert_terms(terms, expected):
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10, abs=1e-12), name


def test_terms_equal_the_code_total_written_out():
    s, t, y = _logits()
    method = _method()
    assert method.needs.views == "strong" and not method.needs.joint_views
    assert method.trainable_parameters() == [] and method.state_dict() == {}
    _assert_terms(_run(method, s, t, y), _expected(s, t, y))


def test_options_change_the_terms_as_written():
    s, t, y = _logits()
    terms = _run(_method(ce="0.5", kd="0.5", T="1", mask_fraction="1"), s, t, y)
    _assert_terms(terms, _expected(s, t, y, ce=0.5, kd=0.5, T=1.0, rho=1.0, rho_cls=1.0))


def test_ce_is_taken_on_both_views():
    s, t, y = _logits()
    ce = _run(_method(), s, t, y)["ce"]
    sw, ss = s.detach()[:B].numpy(), s.detach()[B:].numpy()
    assert ce.item() == pytest.approx(0.1 * (_ce(sw, y.numpy()) + _ce(ss, y.numpy())), rel=1e-12)
    assert "ce" not in _run(_method(ce=0.0), s, t, y)


def test_logit_standardisation_uses_its_own_defaults():
    s, t, y = _logits()
    method = _method(logit_std="true")
    assert (method.hp["kd"], method.hp["T"]) == (9.0, 2.0)
    _assert_terms(_run(method, s, t, y), _expected(s, t, y, kd=9.0, T=2.0, standardize=True))
    # Values set explicitly win over the logit-standardisation defaults.
    method = _method(logit_std="true", kd="6")
    assert (method.hp["kd"], method.hp["T"]) == (6.0, 2.0)
    _assert_terms(_run(method, s, t, y), _expected(s, t, y, kd=6.0, T=2.0, standardize=True))


def test_batch_masks_use_the_fraction_of_the_codes_masks():
    s, t, y = _logits()
    t = t.clone()
    t[1] = t[2] = t[0]  # ties at the median of the teacher's confidences: more than half at or below it
    p = _softmax(t[:B].numpy())
    confidence, class_conf = p.max(axis=1), p.sum(axis=0)
    rho = np.mean(confidence <= np.percentile(confidence, 50))
    rho_cls = np.mean(class_conf <= np.percentile(class_conf, 50))
    assert rho > 0.5
    terms = _run(_method(batch_masks="true"), s, t, y)
    _assert_terms(terms, _expected(s, t, y, rho=rho, rho_cls=rho_cls))


def test_gradient_reaches_the_student_logits_of_both_views():
    s, t, y = _logits()
    sum(_run(_method(), s, t, y).values()).backward()
    assert s.grad[:B].abs().sum(dim=1).gt(0).all() and s.grad[B:].abs().sum(dim=1).gt(0).all()
    s.grad = None
    _run(_method(ce=0.0), s, t, y)["instance"].backward()  # the strong rows get gradient from KD alone
    assert s.grad[B:].abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("options", [{"T": "0"}, {"mask_fraction": "1.5"}, {"logit_std": "maybe"}])
def test_bad_options_are_kderrors(options):
    with pytest.raises(KdError):
        _method(**options)


def test_short_digits_run_learns(distill_digits):
    """A real run at the reference's lr for same-family pairs (0.025): the eight KL terms give
    about 8x plain KD's gradient."""
    summary = distill_digits("mlld", lr=0.025)
    lines = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert {"train_ce", "train_instance", "train_class", "train_batch"} <= set(lines[-1])
    values = [v for line in lines for v in line.values() if isinstance(v, float)]
    assert values and all(math.isfinite(v) for v in values)
    assert summary["top1"] > LEARNED_TOP1, summary
