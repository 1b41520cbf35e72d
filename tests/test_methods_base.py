import math

import pytest
import torch

from kdcli.batch import Batch
from kdcli.errors import KdError
from kdcli.methods import Shapes, list_methods, method_class
from kdcli.models.features import Outputs


def _build(name, **options):
    return method_class(name)(Shapes(num_classes=3), Shapes(num_classes=3), num_samples=10, **options)


def test_registry_has_the_walking_skeleton_methods():
    methods = list_methods()
    assert {"none", "kd"} <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name and cls.title and cls.paper


def test_unknown_method_suggests_the_closest():
    with pytest.raises(KdError) as err:
        method_class("kdd")
    assert "'kd'" in err.value.hint


def test_kd_defaults_are_repdistillers():
    assert method_class("kd").defaults == {"ce": 0.1, "kd": 0.9, "T": 4.0, "logit_std": False}


def test_set_options_are_coerced_and_checked():
    method = _build("kd", T="2", kd="0.5")
    assert method.hp["T"] == 2.0 and method.hp["kd"] == 0.5
    with pytest.raises(KdError, match="unknown option") as err:
        _build("kd", t="2")
    assert "'T'" in err.value.hint
    with pytest.raises(KdError, match="not a valid float"):
        _build("kd", T="warm")


def test_kd_terms_equal_the_hand_computed_value():
    """L = 0.1*CE + 0.9*T^2*KL(p_t||p_s), computed here from the definition with math only."""
    s = [[1.0, 2.0, 0.5]]
    t = [[2.0, 0.0, 1.0]]
    y = [1]
    T = 4.0

    def softmax(z, temp):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    p_s1 = softmax(s[0], 1.0)
    ce = -math.log(p_s1[y[0]])
    p_t, p_s = softmax(t[0], T), softmax(s[0], T)
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    method = _build("kd")
    batch = Batch(torch.zeros(1, 3, 4, 4), torch.tensor(y), torch.tensor([0]))
    terms = method(Outputs(torch.tensor(s, dtype=torch.float64), [], None),
                   Outputs(torch.tensor(t, dtype=torch.float64), [], None), batch)
    assert set(terms) == {"ce", "kd"}
    assert terms["ce"].item() == pytest.approx(0.1 * ce, rel=1e-12)
    assert terms["kd"].item() == pytest.approx(0.9 * T * T * kl, rel=1e-12)


def test_none_method_is_plain_cross_entropy_and_needs_no_teacher():
    method = _build("none")
    assert method.needs.teacher is False
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    terms = method(Outputs(logits, [], None), None, Batch(torch.zeros(4, 3, 2, 2), y, torch.arange(4)))
    assert set(terms) == {"ce"}
    assert torch.allclose(terms["ce"], torch.nn.functional.cross_entropy(logits, y))
    terms["ce"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
