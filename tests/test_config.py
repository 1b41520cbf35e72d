import pytest

from kdcli.config import (
    RunConfig,
    build_config,
    list_presets,
    load_preset,
    parse_set_options,
    read_config_file,
    to_toml,
)
from kdcli.engine.schedule import multistep_lr
from kdcli.errors import KdError


def test_milestones_scale_with_epochs():
    assert RunConfig(epochs=240).milestone_epochs() == [150, 180, 210]
    assert RunConfig(epochs=24).milestone_epochs() == [15, 18, 21]
    assert RunConfig(epochs=6).milestone_epochs() == [4, 5, 6]  # distinct: one decay at a time
    assert RunConfig(epochs=240, milestones=[200, 100]).milestone_epochs() == [100, 200]


def test_multistep_matches_repdistiller_rule():
    lrs = {e: multistep_lr(0.05, e, [150, 180, 210], 0.1) for e in (1, 150, 151, 180, 181, 211, 240)}
    assert lrs[1] == lrs[150] == 0.05
    assert lrs[151] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(0.005)
    assert lrs[181] == pytest.approx(0.0005)
    assert lrs[211] == lrs[240] == pytest.approx(0.00005)


def test_layers_merge_later_wins_and_none_is_absent():
    config = build_config({"epochs": 10, "options": {"T": "2"}}, {"epochs": None, "seed": 3, "options": {"kd": "1"}})
    assert config.epochs == 10 and config.seed == 3
    assert config.options == {"T": "2", "kd": "1"}


@pytest.mark.parametrize(
    "flags, name",
    [({"epochs": 0}, "--epochs"), ({"batch_size": 0}, "--batch-size"), ({"lr": 0.0}, "--lr"),
     ({"lr": -1.0}, "--lr"), ({"device": "tpu"}, "--device")],
)
def test_invalid_numbers_are_refused(flags, name):
    with pytest.raises(KdError, match=name):
        build_config(flags)


def test_shipped_presets_load():
    names = list_presets()
    assert {"quickstart", "cifar100", "smoke"} <= set(names)
    for name in names:
        build_config(load_preset(name))  # every shipped preset is valid
    assert load_preset("cifar100")["milestones"] == [150, 180, 210]


def test_unknown_preset_suggests(tmp_path):
    with pytest.raises(KdError) as err:
        load_preset("quickstrat")
    assert "quickstart" in err.value.hint


def test_preset_syntax_error_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(KdError, match="not valid TOML"):
        load_preset(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text("epoch = 3\n")
    with pytest.raises(KdError, match="unknown key 'epoch'") as err:
        load_preset(str(typo))
    assert "epochs" in err.value.hint


def test_set_options_parse():
    assert parse_set_options(["T=4", " beta = 3000 "]) == {"T": "4", "beta": "3000"}
    with pytest.raises(KdError):
        parse_set_options(["T4"])


def test_config_toml_round_trips(tmp_path):
    config = build_config({"student": "resnet8", "teacher": "a/b.pth", "milestones": [3, 4],
                           "options": {"T": 2.0, "note": 'quo"te'}})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert build_config(read_config_file(path)) == config
