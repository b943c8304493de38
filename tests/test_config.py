import json
import re

import pytest

from omnivae.config import PRESETS, Config, ConfigError, make_config, override


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


@pytest.mark.parametrize("overrides, words", [
    (["epochs=two"], "epochs expects int"),
    (["epochs=1.5"], "epochs expects int"),
    (["nonsense=1"], "unknown config keys: nonsense"),
    (["content_regularizer=vq"], "content_regularizer must be one of"),
    (["epochs"], "not key=value"),
    (["content_dim=0"], "content_dim must be >= 1"),
    (["lr=nan"], "lr must be a finite number, got nan"),
    (["lr=inf"], "lr must be a finite number, got inf"),
    (["lr=-1"], "lr must be > 0, got -1.0"),
    (["lr=0"], "lr must be > 0, got 0.0"),
    (["disc_lr=0"], "disc_lr must be > 0, got 0.0"),
    (["temperature=0"], "temperature must be > 0, got 0.0"),
    (["temperature=-inf"], "temperature must be a finite number, got -inf"),
    (["content_weight=-0.5"], "content_weight must be >= 0, got -0.5"),
    (["style_weight=nan"], "style_weight must be a finite number, got nan"),
    (["contrastive_weight=-1"], "contrastive_weight must be >= 0, got -1.0"),
    (["sample_kl=inf"], "sample_kl must be a finite number, got inf"),
    (["warmup_epochs=-1"], "warmup_epochs must be >= 0, got -1.0"),
    (["lr_min_ratio=2"], "lr_min_ratio must be between 0 and 1, got 2.0"),
    (["ema_decay=1"], "ema_decay must be below 1 (0 turns the average off), got 1.0"),
    (["ema_decay=-0.1"], "ema_decay must be >= 0, got -0.1"),
    (["disc_label_smoothing=1"], "disc_label_smoothing must be below 1, got 1.0"),
    (["device=banana"], "device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    (["device=cuda:x"], "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["threads=-1"], "threads must be >= 0, got -1"),
    (["nll_k=-1"], "nll_k must be >= 0, got -1"),
    (["nll_images=-5"], "nll_images must be >= 0, got -5"),
    (["swap_pairs=-1"], "swap_pairs must be >= 0, got -1"),
    (["episodes=-1"], "episodes must be >= 1, got -1"),
    (["episodes=0"], "episodes must be >= 1, got 0"),
    (["val_drawers=0,21"], "val_drawers must be drawers 1..20"),
    (["precision=fp16"], "precision must be one of fp32, bf16, auto, got 'fp16'"),
    (["compile=maybe"], "compile expects bool, got 'maybe'"),
    (["compile_mode=fast"], "compile_mode must be one of default, reduce-overhead, max-autotune, got 'fast'"),
    (["encoder=vit"], "encoder must be one of conv, resnet, conv4, got 'vit'"),
    (["proto_weight=-1"], "proto_weight must be >= 0, got -1.0"),
    (["proto_temperature=0"], "proto_temperature must be > 0, got 0.0"),
    (["proto_weight=1", "group_size=1"], "proto_weight needs group_size >= 2 and groups >= 2"),
    (["proto_weight=1", "groups=1"], "proto_weight needs group_size >= 2 and groups >= 2"),
    (["decoder=gan"], "decoder must be one of deconv, resnet, pixelcnn, got 'gan'"),
    (["pixelcnn_layers=0"], "pixelcnn_layers must be >= 1, got 0"),
    (["pixelcnn_channels=0"], "pixelcnn_channels must be >= 1, got 0"),
    (["pixelcnn_layers=2.5"], "pixelcnn_layers expects int"),
    (["style_free_bits=-0.5"], "style_free_bits must be >= 0, got -0.5"),
    (["style_free_bits=nan"], "style_free_bits must be a finite number, got nan"),
    (["style_free_bits=0.5", "style_regularizer=mmd"],
     "style_free_bits floors the style KL: it needs style_regularizer=kl, got 'mmd'"),
])
def test_bad_overrides_raise_one_clear_error(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        make_config("quick", overrides)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_that_validate(device):
    assert make_config("quick", [f"device={device}"]).device == device


def test_precision_and_compile_are_off_until_measured():
    # bf16 was measured on the validation alphabets for the `default` preset on a CPU, where it is
    # faster; on a GPU fp32 is faster (precision=auto picks). compile was slower on a CPU and, on a
    # GPU, its gain does not pay its compile time in the default's short run.
    for name in PRESETS:
        cfg = make_config(name)
        assert (cfg.precision, cfg.compile) == ("auto" if name in ("default", "large") else "fp32", False), name
    cfg = make_config("quick", ["precision=bf16", "compile=true"])
    assert (cfg.precision, cfg.compile) == ("bf16", True)


def test_presets_keep_the_conv_encoder_and_no_prototypical_term():
    for name in PRESETS:
        cfg = make_config(name)
        assert (cfg.encoder, cfg.proto_weight) == ("conv", 0.0), name
    cfg = make_config("default", ["encoder=conv4", "encoder_blocks=1", "proto_weight=10", "proto_temperature=2"])
    assert (cfg.encoder, cfg.proto_weight, cfg.proto_temperature) == ("conv4", 10.0, 2.0)


def test_decoder_and_free_bits_defaults_change_nothing():
    for name in PRESETS:
        cfg = make_config(name)
        # The residual decoder and second encoder block per level of `default` and `large` were chosen
        # on the validation alphabets (README, "Depth"); the other presets keep the network they were measured with.
        deep = name in ("default", "large")
        assert (cfg.decoder, cfg.encoder_blocks, cfg.decoder_blocks, cfg.style_free_bits) == (
            "resnet" if deep else "deconv", 2 if deep else 1, 1, 0.0), name
    cfg = make_config("quick", ["decoder=pixelcnn", "pixelcnn_layers=2", "pixelcnn_channels=12", "style_free_bits=0.5"])
    assert (cfg.decoder, cfg.pixelcnn_layers, cfg.pixelcnn_channels, cfg.style_free_bits) == ("pixelcnn", 2, 12, 0.5)
    assert make_config("seed", ["style_free_bits=0"]).style_free_bits == 0  # off is allowed with any regulariser


def test_zero_budgets_are_allowed_where_zero_skips():
    cfg = make_config("quick", ["nll_k=0", "nll_images=0", "swap_pairs=0", "threads=0", "content_weight=0"])
    assert cfg.nll_k == cfg.swap_pairs == 0


def test_override_starts_from_a_config_and_validates():
    base = make_config("seed")
    cfg = override(base, ["epochs=3"])
    assert cfg.epochs == 3 and cfg.content_regularizer == base.content_regularizer and base.epochs == 10
    with pytest.raises(ConfigError, match="lr must be > 0"):
        override(base, ["lr=-1"])


@pytest.mark.parametrize("text, words", [
    ("{not json", "is not a JSON config"),
    ("[1, 2]", "is not a JSON config (expected an object of key: value)"),
    ('{"lr": -1}', "lr must be > 0"),
    ('{"colour": 1}', "unknown config keys: colour"),
])
def test_bad_config_files_raise_one_clear_error(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)):
        Config.load(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*nothing.json"):
        Config.load(tmp_path / "nothing.json")


def test_config_module_imports_no_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, omnivae.config; print('torch' in sys.modules, 'numpy' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


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


def test_deeper_stacks_are_settable_and_checked():
    cfg = make_config("default", ["encoder_blocks=2", "decoder_blocks=3"])
    assert (cfg.encoder_blocks, cfg.decoder_blocks) == (2, 3)
    with pytest.raises(ConfigError, match=re.escape("encoder_blocks=2 is for encoder=conv or resnet, got encoder='conv4' (set encoder_blocks=1 with it)")):
        make_config("default", ["encoder=conv4", "encoder_blocks=2"])
    with pytest.raises(ConfigError, match="decoder_blocks must be >= 1, got 0"):
        make_config("default", ["decoder_blocks=0"])


def test_the_large_preset_is_the_default_for_more_epochs():
    large, default = make_config("large").to_dict(), make_config("default").to_dict()
    assert (large.pop("epochs"), default.pop("epochs")) == (28, 18)
    assert large == default
