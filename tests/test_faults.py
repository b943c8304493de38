"""Faults during training: kills at any moment (also inside a checkpoint write), a loss that goes
NaN, a run killed before its first checkpoint, run folders that cannot be written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import omnivae
from fixtures import killed_write, synthetic_omniglot
from omnivae import cli, rundir
from omnivae import data as omni_data
from omnivae.train import TrainingError, batches, train
from test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_omniglot()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models train fastest on one thread


def flat(tree, name=""):
    """{"a/b/0": leaf} of nested dicts and lists."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{name}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in flat(value, f"{name}/{i}").items()}
    return {name: tree}


def assert_identical(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def without_seconds(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="the helper forks and reads /proc/self/fd")
def test_kills_at_any_moment_resume_to_the_weights_of_an_uninterrupted_run(tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_run.py"), str(run), str(reference), "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    # The first writes of the config and of a checkpoint were killed, then every step of a
    # checkpoint write, then some moments at random.
    from crash_run import FIRST_KILLS, WRITE_KILLS

    assert tuple(report["kills"][:2]) == FIRST_KILLS and set(WRITE_KILLS) <= set(report["kills"])
    assert len(report["kills"]) > len(FIRST_KILLS) + len(WRITE_KILLS)

    # The same checkpoint bit for bit (every module, optimiser state and the epoch), the same export.
    a, b = (torch.load(r / rundir.CHECKPOINT_FILE, weights_only=True) for r in (run, reference))
    a["record"].pop("seconds"), b["record"].pop("seconds")
    assert_identical(a, b)
    assert a["epoch"] == report["epochs"]
    assert_identical(load_file(run / rundir.WEIGHTS_FILE), load_file(reference / rundir.WEIGHTS_FILE))
    assert_identical(load_file(run / rundir.WEIGHTS_FILE), a["model"])
    # Each epoch logged exactly once, with the numbers of the uninterrupted run.
    records = rundir.read_log(run)
    assert [r["epoch"] for r in records] == list(range(1, report["epochs"] + 1))
    assert without_seconds(records) == without_seconds(rundir.read_log(reference))
    assert len((run / rundir.LOG_FILE).read_text().splitlines()) == report["epochs"]
    # Killed writers' temporary files are gone; every file is 0644.
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run.iterdir())


def test_a_nan_loss_stops_training_in_one_line_and_keeps_the_last_checkpoint(tmp_path, synthetic, monkeypatch):
    import omnivae.train as training

    cfg = tiny_config(epochs=3, val_drawers=(20,))
    train_set = omni_data.split_by_drawer(synthetic, cfg.val_drawers)[0]
    steps = len(batches(cfg, train_set.character, 0))
    real, calls = training.supervised_contrastive, []

    def nan_at_epoch_2_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == steps + 3 else loss

    monkeypatch.setattr(training, "supervised_contrastive", nan_at_epoch_2_step_3)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as failure:
        train(cfg, run, dataset=synthetic, progress=False)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"training diverged at epoch 2, step 3 of {steps}: the loss term contrastive is nan;")
    assert "keeps its checkpoint of epoch 1" in message
    # Epoch 1 stays as it was written: checkpoint, export and log; nothing non-finite anywhere.
    assert rundir.finished_epochs(run) == 1
    assert [r["epoch"] for r in rundir.read_log(run)] == [1]
    model = omnivae.load(run)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert not (run / rundir.RUN_INFO_FILE).exists()
    # Without the fault, resuming gives what an uninterrupted run gives.
    monkeypatch.setattr(training, "supervised_contrastive", real)
    train(None, run, dataset=synthetic, progress=False, resume=True)
    straight = train(cfg, tmp_path / "straight", dataset=synthetic, progress=False)
    assert_identical(load_file(run / rundir.WEIGHTS_FILE), load_file(straight / rundir.WEIGHTS_FILE))
    assert [r["epoch"] for r in rundir.read_log(run)] == [1, 2, 3]


@pytest.fixture
def synthetic_background(monkeypatch, synthetic):
    """`omnivae train` on the synthetic set, whatever --data-dir says."""
    monkeypatch.setattr(omni_data, "load_set", lambda *args, **kwargs: synthetic)


SMALL = ["--set", "channels=4", "--set", "hidden=32", "--set", "content_dim=4", "--set", "style_dim=2",
         "--set", "groups=4", "--set", "group_size=4", "--set", "val_drawers=20", "--set", "device=cpu"]


def test_cli_divergence_is_one_line_and_the_folder_starts_again(tmp_path, capsys, synthetic_background):
    run = tmp_path / "run"
    train_args = ["--quiet", "train", "--preset", "quick", "--out", str(run), *SMALL, "--set", "epochs=1"]
    assert cli.main([*train_args, "--set", "lr=1e9"]) == 1
    line = one_line(capsys)
    assert line.startswith("omnivae: error: training diverged at epoch 1, step ")
    assert "nothing was saved: the run stopped before its first checkpoint" in line
    assert sorted(p.name for p in run.iterdir()) == [rundir.CONFIG_FILE]
    # As after a kill before the first checkpoint (a killed write's temporary file included):
    # the same --out starts the folder again, with a message instead of "already holds a trained run".
    leftover = killed_write(run / rundir.CHECKPOINT_FILE)
    assert cli.main(train_args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{run} holds a run stopped before its first checkpoint; starting it again"
    assert rundir.finished_epochs(run) == 1 and not leftover.exists()
    assert cli.main(train_args) == 2
    assert "already holds a trained run" in one_line(capsys)


def test_cli_divergence_on_resume_keeps_the_checkpoint_intact(tmp_path, capsys, synthetic_background):
    run = tmp_path / "run"
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(run), *SMALL, "--set", "epochs=1"]) == 0
    saved = {name: (run / name).read_bytes() for name in (rundir.CHECKPOINT_FILE, rundir.WEIGHTS_FILE, rundir.LOG_FILE)}
    values = json.loads((run / rundir.CONFIG_FILE).read_text())
    (run / rundir.CONFIG_FILE).write_text(json.dumps({**values, "lr": 1e9}))
    capsys.readouterr()
    assert cli.main(["--quiet", "train", "--resume", str(run), "--set", "epochs=3"]) == 1
    line = one_line(capsys)
    assert line.startswith("omnivae: error: training diverged at epoch 2, step ")
    assert line.endswith("epoch 2 was not saved and the run folder keeps its checkpoint of epoch 1 (a lower lr may help)")
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert omnivae.load(run) is not None


def unwritable(monkeypatch, folder: Path):
    """Make new files in `folder` fail as on a read-only file system (tests run as root, where
    permissions do not stop writes)."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)


def test_evaluate_and_report_refuse_an_unwritable_run_folder_before_any_work(tmp_path, capsys, synthetic_background,
                                                                             monkeypatch):
    run = tmp_path / "run"
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(run), *SMALL, "--set", "epochs=1"]) == 0
    capsys.readouterr()

    def no_data(*args, **kwargs):
        raise AssertionError("evaluation started")

    monkeypatch.setattr(omni_data, "load_set", no_data)
    unwritable(monkeypatch, run)
    for command in (["evaluate", str(run)], ["report", str(run)]):
        assert cli.main(["--quiet", *command]) == 1
        assert one_line(capsys).startswith(f"omnivae: error: {run}: cannot write into this run folder "
                                           "(Read-only file system);")
    assert not (run / rundir.REPORT_FILE).exists() and not (run / rundir.METRICS_FILE).exists()


def test_an_interrupted_write_of_weights_never_shows(tmp_path, synthetic, monkeypatch):
    """A full disk while the export is written: the error surfaces, and the folder keeps whole files."""
    import safetensors.torch

    run = train(tiny_config(epochs=1), tmp_path / "run", dataset=synthetic, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(None, run, dataset=synthetic, progress=False, resume=True, epochs=2)
    # The checkpoint of epoch 2 is in place (the export lags); nothing partial is visible.
    assert rundir.finished_epochs(run) == 2
    assert (run / rundir.WEIGHTS_FILE).read_bytes() == before[rundir.WEIGHTS_FILE]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    # The next resume brings the export and the log in line with the checkpoint.
    train(None, run, dataset=synthetic, progress=False, resume=True)
    checkpoint = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)
    assert_identical(load_file(run / rundir.WEIGHTS_FILE), checkpoint["model"])
    assert [r["epoch"] for r in rundir.read_log(run)] == [1, 2]
    assert np.isfinite(rundir.read_log(run)[1]["val_recon"])


def test_the_guard_reads_nothing_off_the_device_per_step(monkeypatch):
    """Steps keep their loss terms and the guard's flag on the device: omnivae's own code turns no
    tensor into a Python value until the epoch ends (checked on the CPU by counting conversions)."""
    import omnivae.train as training

    package = str(Path(training.__file__).parent)
    reads = []
    for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = tiny_config(content_regularizer="adversarial", style_adversary_weight=1.0, cross_weight=1.0)
    parts = training.build_parts(cfg, classes=4, device=torch.device("cpu"))
    x, label = torch.rand(16, 1, 28, 28), torch.arange(4).repeat_interleave(4)
    totals = training.EpochTotals()
    for step in range(5):
        totals.add(step, training.update(parts, cfg, x, label))
    assert reads == []
    means = totals.means(epoch=1)
    assert len(reads) == 2 and np.isfinite(list(means.values())).all()  # the flag, then the sums: once per epoch
