"""The command line, end to end: on tiny zips in the upstream layout (always), and on the real
Omniglot data when OMNIVAE_TEST_DATA names its folder (slow)."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import omnivae
from fixtures import make_tiny_omniglot, real_data
from omnivae import cli
from omnivae import data as omni_data
from omnivae.registry import METRICS

COMMANDS = ("fetch", "config", "train", "evaluate", "run", "sample", "swap", "one-shot", "interpolate", "report",
            "compare", "demo")
ROOT = Path(__file__).resolve().parents[1]


def exit_code(argv) -> int:
    """The exit status of `omnivae ARGV`, whether argparse exits or main returns."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as done:
        return done.code


def error_line(capsys) -> str:
    """The one line the command wrote to stderr (no traceback, nothing else)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_help_lists_every_command_and_the_exit_codes(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "exit status:" in out and "usage error" in out


def test_every_command_and_argument_has_help():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert {c.dest for c in commands._choices_actions} == set(COMMANDS)
    for choice in commands._choices_actions:
        assert choice.help, choice.dest
    for name, sub in commands.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.dest}"
            assert sub.get_default("func") is not None


def test_version(capsys):
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"omnivae {omnivae.__version__}"


def test_help_imports_no_heavy_module():
    """`omnivae --help` and `omnivae COMMAND --help` load neither torch nor NumPy (checked in a fresh
    interpreter, since this one has them loaded already)."""
    code = (
        "import contextlib, io, sys\n"
        "from omnivae import cli\n"
        f"for argv in [['--help'], *[[c, '--help'] for c in {COMMANDS!r}]]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            cli.main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = ('torch', 'numpy', 'scipy', 'sklearn', 'matplotlib', 'PIL', 'safetensors', 'tqdm')\n"
        "print(' '.join(m for m in heavy if m in sys.modules) or 'none')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"
    done = subprocess.run([sys.executable, "-m", "omnivae", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "exit status:" in done.stdout


def test_bad_override_is_one_line_error(capsys, tmp_path):
    assert exit_code(["train", "--preset", "quick", "--out", tmp_path / "r", "--set", "epochs=many"]) == 2
    assert error_line(capsys) == "omnivae: error: epochs expects int, got 'many'"


@pytest.mark.parametrize("override, message", [
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=-1", "lr must be > 0, got -1.0"),
    ("lr=inf", "lr must be a finite number, got inf"),
    ("device=banana", "device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    ("threads=-2", "threads must be >= 0, got -2"),
    ("temperature=0", "temperature must be > 0, got 0.0"),
    ("style_weight=-1", "style_weight must be >= 0, got -1.0"),
])
def test_bad_config_values_are_one_line_errors(capsys, override, message):
    assert exit_code(["config", "--preset", "quick", "--set", override]) == 2
    assert error_line(capsys) == f"omnivae: error: {message}"


def test_missing_run_folder_is_one_line_error(capsys, tmp_path):
    assert exit_code(["sample", tmp_path / "nothing", "--out", tmp_path / "s.png"]) == 2
    assert error_line(capsys) == (f"omnivae: error: argument RUN_DIR: {tmp_path / 'nothing'} is not a run folder "
                                  "(no config.json) (see 'omnivae sample --help')")


def test_config_prints_the_preset_with_overrides(capsys):
    assert cli.main(["config", "--preset", "seed", "--set", "epochs=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 3 and printed["content_regularizer"] == "mmd"


def test_config_starts_from_a_file(capsys, tmp_path):
    path = tmp_path / "start.json"
    assert cli.main(["config", "--preset", "quick", "--set", "content_dim=7"]) == 0
    path.write_text(capsys.readouterr().out)
    assert cli.main(["config", "--config", str(path), "--set", "epochs=9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["content_dim"] == 7 and printed["epochs"] == 9 and printed["channels"] == 16  # quick's width
    assert exit_code(["config", "--config", path, "--preset", "seed"]) == 2
    assert error_line(capsys) == ("omnivae: error: argument --preset: not allowed with argument --config "
                                  "(see 'omnivae config --help')")
    path.write_text('{"lr": 0}')
    assert exit_code(["config", "--config", path]) == 2
    assert error_line(capsys) == "omnivae: error: lr must be > 0, got 0.0"
    assert exit_code(["config", "--config", "/dev/zero"]) == 2
    assert error_line(capsys) == ("omnivae: error: argument --config: /dev/zero is not a regular file "
                                  "(see 'omnivae config --help')")


@pytest.fixture
def run_folder(tmp_path):
    """A folder that passes the CLI's run-folder check (enough for options checked while parsing)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize("argv, message", [
    (["sample", "{run}", "--n", "-1"], "argument --n: must be between 1 and 4096, got -1"),
    (["sample", "{run}", "--n", "0"], "argument --n: must be between 1 and 4096, got 0"),
    (["sample", "{run}", "--n", "5000"], "argument --n: must be between 1 and 4096, got 5000"),
    (["sample", "{run}", "--n", "many"], "argument --n: expects an integer, got 'many'"),
    (["sample", "{run}", "--temperature", "nan"], "argument --temperature: must be a finite number > 0, got nan"),
    (["sample", "{run}", "--temperature", "0"], "argument --temperature: must be a finite number > 0, got 0"),
    (["sample", "{run}", "--temperature", "-1"], "argument --temperature: must be a finite number > 0, got -1"),
    (["sample", "{run}", "--temperature", "inf"], "argument --temperature: must be a finite number > 0, got inf"),
    (["sample", "{run}", "--seed", "-1"], "argument --seed: must be between 0 and 9223372036854775807, got -1"),
    (["one-shot", "{run}", "{png}", "--n", "0"], "argument --n: must be between 1 and 4096, got 0"),
    (["interpolate", "{run}", "{png}", "{png}", "--steps", "0"], "argument --steps: must be between 2 and 256, got 0"),
    (["interpolate", "{run}", "{png}", "{png}", "--steps", "-3"], "argument --steps: must be between 2 and 256, got -3"),
    (["interpolate", "{run}", "{png}", "{png}", "--steps", "300"],
     "argument --steps: must be between 2 and 256, got 300"),
    (["evaluate", "{run}", "--subset", "-1"], "argument --subset: must be >= 0, got -1"),
    (["evaluate", "{run}", "--nll-k", "-1"], "argument --nll-k: must be >= 0, got -1"),
    (["evaluate", "{run}", "--nll-images", "-1"], "argument --nll-images: must be >= 0, got -1"),
    (["evaluate", "{run}", "--episodes", "0"], "argument --episodes: must be >= 1, got 0"),
    (["evaluate", "{run}", "--episodes", "-5"], "argument --episodes: must be >= 1, got -5"),
    (["evaluate", "{run}", "--swap-pairs", "-1"], "argument --swap-pairs: must be >= 0, got -1"),
    (["run", "--out", "{run}", "--episodes", "0"], "argument --episodes: must be >= 1, got 0"),
    (["fetch", "--size", "30"], "argument --size: invalid choice: 30 (choose from 28, 32, 64, 105)"),
])
def test_out_of_range_options_are_one_line_usage_errors(capsys, tmp_path, run_folder, argv, message):
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    argv = [a.format(run=run_folder, png=png) for a in argv]
    if argv[0] in ("sample", "one-shot", "interpolate"):
        argv += ["--out", str(tmp_path / "out.png")]
    assert exit_code(argv) == 2
    command = argv[0]
    assert error_line(capsys) == f"omnivae: error: {message} (see 'omnivae {command} --help')"


def test_image_arguments_must_be_small_regular_files(capsys, tmp_path, run_folder):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(21 * 2**20)  # sparse: no disk used
    cases = {
        "/dev/zero": "/dev/zero is not a regular file",
        str(fifo): f"{fifo} is not a regular file",
        str(tmp_path): f"{tmp_path} is not a regular file",
        str(tmp_path / "missing.png"): f"cannot read {tmp_path / 'missing.png'} (No such file or directory)",
        str(huge): f"{huge} is 21.0 MB; images over 20 MB are refused",
    }
    for path, message in cases.items():
        assert exit_code(["one-shot", run_folder, path, "--out", tmp_path / "o.png"]) == 2
        assert error_line(capsys) == f"omnivae: error: argument PNG: {message} (see 'omnivae one-shot --help')"
    assert exit_code(["swap", run_folder, "--content", "/dev/zero", "--style", huge, "--out", tmp_path / "s.png"]) == 2
    assert error_line(capsys) == ("omnivae: error: argument --content: /dev/zero is not a regular file "
                                  "(see 'omnivae swap --help')")


def test_a_missing_report_extra_is_one_line_with_the_install_command(capsys, tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"content_nmi": 0.5}))
        runs.append(tmp_path / name)
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # imports of it now fail as if it were not installed
    assert exit_code(["compare", *runs, "--html", tmp_path / "compare.html"]) == 1
    assert error_line(capsys) == ("omnivae: error: omnivae compare needs matplotlib, part of the report extra: "
                                  "pip install 'omnivae[report]'")


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
    # Every key evaluate writes is a registry record, and a full evaluation writes every record
    # but the optional ones of models it is not (kl_detail: no detail code here).
    expected = {key for key, record in METRICS.items() if not record.optional}
    assert set(metrics) == expected, set(metrics) ^ expected
    for key in ("kl_total", "content_kmeans_accuracy", "content_nmi", "content_20way_1shot", "style_20way_1shot",
                "pixel_kmeans_accuracy", "swap_consistency", "nll_iwae", "elbo_nll", "prior_mmd2_content"):
        assert np.isfinite(metrics[key]), key
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


def test_validation_split_scores_held_out_alphabets_only(tmp_path, monkeypatch, capsys):
    # Background: 2 alphabets x 20 characters, so the held-out alphabet supports 20-way episodes.
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, "background", alphabets=2, characters=20, drawers=4)
    monkeypatch.setattr(omni_data, "load_set", functools.partial(omni_data.load_set, check_counts=False))
    common = ["--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")]
    small = ["--set", "epochs=1", "--set", "val_drawers=4", "--set", "channels=4", "--set", "hidden=16",
             "--set", "groups=2", "--set", "group_size=2"]
    evaluate = ["--nll-k", "5", "--nll-images", "10", "--episodes", "20", "--swap-pairs", "20", "--no-figures"]
    held = tmp_path / "held"
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(held), *small, "--set", "val_holdout=true",
                     "--set", "val_alphabets=Alphabet_01", *common]) == 0
    assert cli.main(["--quiet", "evaluate", str(held), "--split", "validation", *evaluate, *common]) == 0
    metrics = json.loads((held / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["protocol_version"] == 5
    assert metrics["test_images"] == 20 * 4  # every drawing of the held-out alphabet, nothing else

    full = tmp_path / "full"
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(full), *small, *common]) == 0
    capsys.readouterr()
    assert cli.main(["--quiet", "evaluate", str(full), "--split", "validation", *evaluate, *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnivae: error: this run trained on the validation alphabets") and "\n" not in err


def test_resume_from_the_cli(tmp_path, tiny_sets, capsys):
    run = tmp_path / "run"
    common = ["--data-dir", str(tiny_sets), "--cache-dir", str(tmp_path / "cache")]
    base = ["--quiet", "train", "--preset", "quick", "--set", "val_drawers=4", "--set", "channels=4", "--set", "groups=2",
            "--set", "group_size=2"]
    assert cli.main([*base, "--out", str(run), "--set", "epochs=1", *common]) == 0
    capsys.readouterr()
    resume = ["--quiet", "train", "--resume", str(run), *common]

    # Finished: says so, trains nothing, keeps run.json.
    info = (run / "run.json").read_text()
    assert cli.main(resume) == 0
    assert capsys.readouterr().out.strip() == (f"{run} has already finished 1/1 epochs; nothing to train "
                                               "(add epochs with --set epochs=N)")
    assert (run / "run.json").read_text() == info

    # Options that would change the run are refused; ones that match it are not.
    assert exit_code([*resume, "--set", "lr=0.01"]) == 2
    assert error_line(capsys) == (f"omnivae: error: --resume continues {run} as configured; only --set epochs=N may "
                                  "change it, not lr (0.001 -> 0.01)")
    assert exit_code([*resume, "--preset", "quick"]) == 2
    assert error_line(capsys) == (f"omnivae: error: --resume continues {run} as configured; only --set epochs=N may "
                                  "change it, not val_drawers ((4,) -> (19, 20)), channels (4 -> 16), groups (2 -> 16), "
                                  "group_size (2 -> 4)")
    assert exit_code([*resume, "--set", "channels=4"]) == 0
    assert exit_code([*resume, "--config", run / "config.json"]) == 0
    assert exit_code([*resume, "--set", "epochs=0"]) == 2
    assert error_line(capsys) == "omnivae: error: epochs must be >= 1, got 0"
    assert exit_code(["train", "--resume", run, "--out", tmp_path / "other"]) == 2
    assert error_line(capsys) == ("omnivae: error: argument --out: not allowed with argument --resume "
                                  "(see 'omnivae train --help')")

    # More epochs: applied explicitly and written to config.json.
    assert cli.main([*resume, "--set", "epochs=2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"resuming {run} with epochs=2 (was 1); config.json updated", f"trained: {run}"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]

    # The trained run also serves the generation commands' run-time errors: exit 1, one line.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert exit_code(["one-shot", run, bad, "--out", tmp_path / "o.png"]) == 1
    assert error_line(capsys).startswith(f"omnivae: error: {bad} is not a PNG, or its header is damaged")
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert exit_code(["sample", run, "--n", "2", "--out", blocked / "s.png"]) == 1
    assert error_line(capsys) == f"omnivae: error: {blocked}: File exists"


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
