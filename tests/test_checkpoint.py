import pytest
import torch

from kdcli.engine.checkpoint import atomic_write, load_state, rng_state, save_state, set_rng_state
from kdcli.errors import KdError


def _trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_nested_state_round_trips_without_pickle(tmp_path):
    model, opt = _trained_optimizer()
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    adam.step()
    state = {"epoch": 3, "best": 51.5, "name": "x", "none": None, "model": model.state_dict(),
             "sgd": opt.state_dict(), "adam": adam.state_dict(), "rng": rng_state(), "nested": [1, [2.5, "a"]]}
    path = tmp_path / "c.safetensors"
    save_state(path, state)
    assert path.read_bytes()[:8] != b"\x80\x02"  # not a pickle stream
    loaded = load_state(path)
    assert loaded["epoch"] == 3 and loaded["best"] == 51.5 and loaded["none"] is None
    assert loaded["nested"] == [1, [2.5, "a"]]
    assert set(loaded["sgd"]["state"]) == {0, 1}  # integer keys survive
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(loaded["adam"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"])


def test_rng_state_restores_the_stream(tmp_path):
    torch.manual_seed(5)
    path = tmp_path / "r.safetensors"
    save_state(path, {"rng": rng_state()})
    expected = torch.rand(4)
    set_rng_state(load_state(path)["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.safetensors"
    save_state(path, {"epoch": 1})

    def broken(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert load_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.safetensors"
    save_state(path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(KdError, match="unreadable"):
        load_state(path)
