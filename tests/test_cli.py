"""The command line, end to end: on tiny zips in the upstream layout (always), and on the real
Omniglot data when OMNIVAE_TEST_DATA names its folder (slow)."""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import make_tiny_omniglot
from omnivae import cli
from omnivae import data as omni_data


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("fetch", "train", "evaluate", "run", "sample", "swap", "one-shot", "interpolate", "report", "compare"):
        assert command in out


def test_bad_override_is_one_line_error(capsys, tmp_path):
    assert cli.main(["train", "--preset", "quick", "--out", str(tmp_path / "r"), "--set", "epochs=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "omnivae: error: epochs expects int, got 'many'"


def test_missing_run_folder_is_one_line_error(capsys, tmp_path):
    assert cli.main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.png")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_config_prints_the_preset_with_overrides(capsys):
    assert cli.main(["config", "--preset", "seed", "--set", "epochs=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 3 and printed["content_regularizer"] == "mmd"


@pytest.fixture
def tiny_sets(tmp_path, monkeypatch):
    """Tiny background (2 alphabets x 4 characters x 4 drawers) and evaluation (1 alphabet x 20
    characters x 4 drawers) zips; count checks off since they are not the real sets."""
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, "background", alphabets=2, characters=4, drawers=4)
    make_tiny_omniglot(data_dir, "evaluation", alphabets=1, characters=20, drawers=4, start_charid=965)
    monkeypatch.setattr(omni_data, "load_set", functools.partial(omni_data.load_set, check_counts=False))
    return data_dir


def test_cli_smoke_run_on_tiny_data(tmp_path, tiny_sets, capsys):
    run = tmp_path / "run"
    common = ["--data-dir", str(tiny_sets), "--cache-dir", str(tmp_path / "cache")]
    args = ["--quiet", "run", "--preset", "quick", "--out", str(run), "--set", "epochs=1", "--set", "val_drawers=4",
            "--set", "channels=4", "--set", "hidden=16", "--set", "groups=2", "--set", "group_size=2", "--nll-k", "5", "--nll-images", "10",
            "--episodes", "20", "--swap-pairs", "20", *common]
    assert cli.main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("kl_total", "content_kmeans_accuracy", "content_nmi", "content_20way_1shot", "style_20way_1shot",
                "pixel_kmeans_accuracy", "swap_consistency", "nll_iwae", "elbo_nll", "prior_mmd2_content"):
        assert np.isfinite(metrics[key]), key
    assert metrics["nll_iwae"] <= metrics["elbo_nll"] + 1e-6  # importance sampling tightens the bound
    for figure in ("reconstructions", "samples", "swap", "one_shot", "interpolation", "tsne_content_characters",
                   "tsne_style_alphabets", "training_curves"):
        assert (run / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    html = (run / "report.html").read_text()
    assert 'id="metrics"' in html and "data:image/png;base64," in html

    # Evaluation is deterministic for a run folder: a second evaluation gives the same numbers.
    assert cli.main(["--quiet", "evaluate", str(run), "--nll-k", "5", "--nll-images", "10", "--episodes", "20",
                     "--swap-pairs", "20", "--no-figures", *common]) == 0
    again = json.loads((run / "metrics.json").read_text())
    metrics.pop("eval_seconds"), again.pop("eval_seconds")
    assert again == metrics

    # Generation commands on upstream-style PNGs.
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    evaluation = omni_data.load_set("evaluation", 105, tiny_sets, tmp_path / "cache", progress=False)
    paths = []
    for i in range(3):
        path = pngs / f"{i}.png"
        Image.fromarray(255 - evaluation.images[i * 4]).convert("1").save(path)  # ink black, as upstream
        paths.append(str(path))
    out = tmp_path / "out"
    assert cli.main(["sample", str(run), "--n", "8", "--out", str(out / "samples.png")]) == 0
    assert cli.main(["swap", str(run), "--content", *paths[:2], "--style", *paths, "--out", str(out / "swap.png")]) == 0
    assert cli.main(["one-shot", str(run), paths[0], "--n", "4", "--out", str(out / "one.png")]) == 0
    assert cli.main(["interpolate", str(run), paths[0], paths[1], "--part", "style", "--out", str(out / "i.png")]) == 0
    for name in ("samples", "swap", "one", "i"):
        assert Image.open(out / f"{name}.png").size[0] > 50
    capsys.readouterr()
    assert cli.main(["compare", str(run), str(run), "--format", "csv"]) == 0
    assert "content_20way_1shot" in capsys.readouterr().out


def test_resume_from_the_cli(tmp_path, tiny_sets):
    run = tmp_path / "run"
    common = ["--data-dir", str(tiny_sets), "--cache-dir", str(tmp_path / "cache")]
    base = ["--quiet", "train", "--preset", "quick", "--set", "val_drawers=4", "--set", "channels=4", "--set", "groups=2",
            "--set", "group_size=2"]
    assert cli.main([*base, "--out", str(run), "--set", "epochs=1", *common]) == 0
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 2
    (run / "config.json").write_text(json.dumps(config))
    assert cli.main(["--quiet", "train", "--resume", str(run), *common]) == 0
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


def real_data() -> Path:
    folder = os.environ.get("OMNIVAE_TEST_DATA")
    if not folder:
        pytest.skip("OMNIVAE_TEST_DATA is not set")
    assert Path(folder).is_dir(), f"OMNIVAE_TEST_DATA={folder} does not exist"
    return Path(folder)


@pytest.mark.slow
def test_seed_preset_does_not_collapse_on_real_data(tmp_path):
    """The seed design (MMD, flat split, no labels) with MMD on the aggregate of posterior means:
    codes must spread out and cluster by character far above the collapsed 0.0017 / NMI 0."""
    data_dir = real_data()
    import torch

    from omnivae import load, metrics
    from omnivae.train import train
    from omnivae.config import make_config

    cache = os.environ.get("OMNIVAE_CACHE_DIR") or tmp_path / "cache"
    run = train(make_config("seed", {"epochs": 1}), tmp_path / "seed", data_dir, cache, progress=False)
    model = load(run)
    test = omni_data.load_set("evaluation", 28, data_dir, cache, progress=False)
    pick = np.random.default_rng(0).choice(len(test), 3000, replace=False)
    test = test.subset(np.sort(pick))
    with torch.no_grad():
        content, _ = model.encode(test.tensors())
    content = content.numpy()
    assert content.std(0).mean() > 0.3  # not one code for every image
    scores = metrics.kmeans_scores(content, test.character, seed=0, n_init=1)
    assert scores["nmi"] > 0.5 and scores["accuracy"] > 0.05


@pytest.mark.slow
def test_cli_quick_preset_on_real_data(tmp_path):
    data_dir = real_data()
    run = tmp_path / "quick"
    cache = os.environ.get("OMNIVAE_CACHE_DIR") or str(tmp_path / "cache")
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(run), "--set", "epochs=1",
                     "--data-dir", str(data_dir), "--cache-dir", cache]) == 0
    assert cli.main(["--quiet", "evaluate", str(run), "--subset", "1500", "--nll-k", "20", "--nll-images", "100",
                     "--episodes", "200", "--swap-pairs", "0", "--no-figures", "--data-dir", str(data_dir),
                     "--cache-dir", cache]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # One epoch of the structured preset already beats raw pixels at one-shot classification.
    assert metrics["content_20way_1shot"] > metrics["pixel_20way_1shot"]
    assert metrics["content_nmi"] > 0.6
    assert 50 < metrics["nll_iwae"] < 400
