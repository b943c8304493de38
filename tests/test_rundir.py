"""The run folder: the atomic writer, the checkpoint format, repairs on resume, refusals on load."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnivae
from fixtures import killed_write, one_torch_thread, synthetic_omniglot
from omnivae import cli, rundir
from omnivae.config import ConfigError
from omnivae.model import StructuredVAE
from omnivae.train import train
from test_train import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models train fastest on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder after 2 epochs, with discriminators and a style adversary; tests copy it."""
    cfg = tiny_config(epochs=2, content_regularizer="adversarial", style_adversary_weight=1.0, val_drawers=(20,))
    with one_torch_thread():
        return train(cfg, tmp_path_factory.mktemp("trained") / "run", dataset=synthetic_omniglot(), progress=False)


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- the atomic writer


def test_atomic_write_shows_the_old_file_or_the_new_one_never_part(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with rundir.atomic_write(target) as tmp:
        tmp.write_text("new, half")
        assert target.read_text() == "old"  # mid-write, readers see the old file
        with open(tmp, "a") as f:
            f.write(" and the rest")
    assert target.read_text() == "new, half and the rest"
    assert temporaries(tmp_path) == []
    with pytest.raises(RuntimeError):
        with rundir.atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "new, half and the rest" and temporaries(tmp_path) == []


def test_every_file_written_is_0644_whatever_the_writer_or_umask(tmp_path):
    old = os.umask(0o077)
    try:
        rundir.write_text(tmp_path / "a.txt", "a")
        with rundir.atomic_write(tmp_path / "b.safetensors") as tmp:  # safetensors makes 0600 files itself
            save_file({"w": torch.zeros(2)}, str(tmp))
        rundir.append_log(tmp_path, {"epoch": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.safetensors", rundir.LOG_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_the_next_write_removes_what_killed_writers_left(tmp_path):
    leftover = killed_write(tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()  # the killed write never showed
    live = tmp_path / f".x.json.{leftover.name.split('.')[-3].split('-')[0]}-{os.getpid()}.0000beef.tmp"
    live.write_text("a write still going on in this process")
    rundir.write_text(tmp_path / "other.txt", "x")
    assert not leftover.exists() and live.exists()


def test_check_writable_is_one_line(tmp_path, monkeypatch):
    rundir.check_writable(tmp_path, "why")  # writable: nothing happens, nothing is left
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as failure:
        rundir.check_writable(tmp_path / "missing", "evaluate writes there")
    assert failure.value.filename == str(tmp_path / "missing")
    assert failure.value.strerror == "cannot write into this run folder (No such file or directory); evaluate writes there"


# ----------------------------------------------------------------------------- the checkpoint


def test_the_checkpoint_is_one_file_of_tensors_and_plain_values(run):
    state = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)
    assert set(state) == {"format", "epoch", "model", "modules", "optimizers", "record"}
    assert state["format"] == 2 and state["epoch"] == 2
    assert set(state["modules"]) == {"style_adversary", "discriminator_content"}
    assert set(state["optimizers"]) == {"optimizer", "disc_optimizer"}
    assert state["record"] == rundir.read_log(run)[-1]
    # The export is the checkpoint's VAE, unprefixed, for the Hub layout.
    export = load_file(run / rundir.WEIGHTS_FILE)
    assert export.keys() == state["model"].keys()
    assert all(torch.equal(export[k], state["model"][k]) for k in export)
    assert StructuredVAE.from_pretrained(run).state_dict().keys() == export.keys()


def test_resume_brings_a_lagging_export_and_a_broken_log_in_line(run):
    records = rundir.read_log(run)
    state = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)
    # A kill after the checkpoint: the export still of epoch 1, the epoch-2 line missing; and
    # an older layout's leftovers: a repeated epoch, a line of an epoch never checkpointed, half a line.
    save_file({k: v * 0 for k, v in state["model"].items()}, str(run / rundir.WEIGHTS_FILE), metadata={"epoch": "1"})
    lines = [records[0], records[0], {**records[1], "epoch": 3}]
    (run / rundir.LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "rec')
    checkpoint = rundir.resume(run)
    assert checkpoint.epoch == 2
    export = load_file(run / rundir.WEIGHTS_FILE)
    assert all(torch.equal(export[k], state["model"][k]) for k in export)
    assert (run / rundir.LOG_FILE).read_text() == "".join(json.dumps(r) + "\n" for r in records)
    # A folder that agrees is left alone.
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    rundir.resume(run)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_checkpoint_of_the_first_layout_still_resumes(run, tmp_path):
    state = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)
    old = {**state["optimizers"], "modules": state["modules"], "epoch": 2}  # weights only in model.safetensors
    torch.save(old, run / rundir.CHECKPOINT_FILE)
    checkpoint = rundir.read_checkpoint(run)
    assert checkpoint.epoch == 2 and checkpoint.record == rundir.read_log(run)[-1]
    assert all(torch.equal(checkpoint.model[k], v) for k, v in state["model"].items())
    train(None, run, dataset=synthetic_omniglot(), progress=False, resume=True, epochs=3)
    assert rundir.finished_epochs(run) == 3 and [r["epoch"] for r in rundir.read_log(run)] == [1, 2, 3]
    # Its two files from different epochs (a kill between the old layout's two renames) are refused.
    save_file(load_file(run / rundir.WEIGHTS_FILE), str(run / rundir.WEIGHTS_FILE), metadata={"epoch": "2"})
    torch.save({**old, "epoch": 3}, run / rundir.CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match="are not from the same epoch"):
        rundir.read_checkpoint(run)


# ----------------------------------------------------------------------------- refusals, one line each


class RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def refusal(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_pickle_as_the_checkpoint_runs_nothing_and_is_refused(run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    with open(run / rundir.CHECKPOINT_FILE, "wb") as f:
        pickle.dump({"epoch": 2, "model": RunsCode(marker)}, f)
    for read in (rundir.finished_epochs, rundir.resume):
        with pytest.raises(ConfigError) as error:
            read(run)
        message = refusal(error)
        assert "not a checkpoint of tensors and plain values (nothing in it was run)" in message
        assert "weights_only" not in message
    assert cli.main(["--quiet", "train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert not marker.exists()


@pytest.mark.parametrize("break_it, words", [
    ("nan_weights", "cannot load the model of .*: content_head.weight is not finite"),
    ("shapes", r"the weights do not fit its config.json: content_head.weight has shape \(8, 32\) where the config "
               r"makes \(6, 32\) \(and \d+ more\)"),
    ("renamed", "the weights do not fit its config.json: missing content_head.bias; unexpected head.bias"),
    ("empty_config", "is not a JSON config"),
    ("broken_config", "is not a JSON config"),
    ("list_config", "is not a JSON config"),
    ("bad_value_config", "content_dim"),
    ("pickle_weights", "cannot read .*model.safetensors"),
    ("no_weights", "holds no model.safetensors: not a trained run folder"),
])
def test_load_refuses_bad_run_folders_in_one_line(run, tmp_path, break_it, words):
    weights, config = run / rundir.WEIGHTS_FILE, run / rundir.CONFIG_FILE
    values = json.loads(config.read_text())
    if break_it == "nan_weights":
        state = load_file(weights)
        state["content_head.weight"][0, 0] = float("nan")
        save_file(state, str(weights))
    elif break_it == "shapes":
        config.write_text(json.dumps({**values, "content_dim": 3}))
    elif break_it == "renamed":
        state = load_file(weights)
        state["head.bias"] = state.pop("content_head.bias")
        save_file(state, str(weights))
    elif break_it == "empty_config":
        config.write_text("")
    elif break_it == "broken_config":
        config.write_text('{"content_dim": ')
    elif break_it == "list_config":
        config.write_text("[]")
    elif break_it == "bad_value_config":
        config.write_text(json.dumps({**values, "content_dim": "four"}))
    elif break_it == "pickle_weights":
        with open(weights, "wb") as f:
            pickle.dump(RunsCode(tmp_path / "code-ran"), f)
    elif break_it == "no_weights":
        weights.unlink()
    with pytest.raises(ConfigError, match=words) as error:
        omnivae.load(run)
    refusal(error)
    assert not (tmp_path / "code-ran").exists()


def test_resume_refuses_non_finite_or_misfitting_checkpoints_in_one_line(run):
    path = run / rundir.CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    bad = {**state, "optimizers": {**state["optimizers"]}}
    moments = bad["optimizers"]["optimizer"]["state"][0]["exp_avg"]
    moments[0] = float("inf")
    torch.save(bad, path)
    with pytest.raises(ConfigError, match=r"holds non-finite values \(optimizers/optimizer/state/0/exp_avg\)") as error:
        train(None, run, dataset=synthetic_omniglot(), progress=False, resume=True, epochs=3)
    refusal(error)
    moments[0] = 0.0
    values = json.loads((run / rundir.CONFIG_FILE).read_text())
    (run / rundir.CONFIG_FILE).write_text(json.dumps({**values, "style_dim": 3}))
    torch.save(bad, path)
    with pytest.raises(ConfigError, match="cannot load the checkpoint: the weights do not fit") as error:
        train(None, run, dataset=synthetic_omniglot(), progress=False, resume=True, epochs=3)
    refusal(error)
