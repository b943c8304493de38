import json

import pytest

from omnivae.config import PRESETS, Config, ConfigError, make_config


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        cfg = make_config(name)
        assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = make_config("quick", ["epochs=7", "lr=0.01", "mmd_kernel=rbf", "val_drawers=18,19,20"])
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.lr == 0.01 and isinstance(cfg.lr, float)
    assert cfg.mmd_kernel == "rbf"
    assert cfg.val_drawers == (18, 19, 20)


@pytest.mark.parametrize("override, words", [
    (["epochs=two"], "epochs expects int"),
    (["epochs=1.5"], "epochs expects int"),
    (["nonsense=1"], "unknown config keys: nonsense"),
    (["content_regularizer=vq"], "content_regularizer must be one of"),
    (["epochs"], "not key=value"),
    (["content_dim=0"], "content_dim must be >= 1"),
])
def test_bad_overrides_raise_one_clear_error(override, words):
    with pytest.raises(ConfigError, match=words):
        make_config("quick", override)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        make_config("huge")


def test_save_load_round_trip(tmp_path):
    cfg = make_config("default", ["seed=3", "val_drawers=20"])
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 3
    assert Config.load(tmp_path / "config.json") == cfg


def test_seed_preset_is_the_seed_design():
    cfg = make_config("seed")
    assert cfg.content_regularizer == cfg.style_regularizer == "mmd"
    assert cfg.group_size == 1 and cfg.contrastive_weight == 0 and cfg.style_adversary_weight == 0
