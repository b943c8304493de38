"""Many processes, one run: torchrun with 2 Gloo processes on the CPU against one process on the same
global batch, on tiny zips (tests/torchrun_cli.py runs the command line in each process)."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixtures import make_tiny_omniglot
from omnivae import cli, rundir
from omnivae import data as omni_data
from omnivae.config import ConfigError, make_config
from omnivae.distributed import Process, local_batch

ROOT = Path(__file__).resolve().parents[1]
# 8 characters x 6 drawers; drawer 6 held out: 5 drawings per character, 2 groups of 2 each, so
# 4 steps per epoch of 4 groups x 2 drawings.
SMALL = ["--set", "val_drawers=6", "--set", "channels=4", "--set", "hidden=16", "--set", "content_dim=4",
         "--set", "style_dim=2", "--set", "groups=4", "--set", "group_size=2", "--set", "device=cpu",
         "--set", "threads=1", "--set", "lr=0.003"]
# Every term per image (see omnivae.distributed): two processes must give the one-process update.
PER_IMAGE = ["--set", "content_regularizer=adversarial", "--set", "style_regularizer=kl", "--set", "contrastive_weight=0",
             "--set", "rotations=true", "--set", "cross_weight=1", "--set", "style_adversary_weight=1"]
# The default preset's terms: MMD and the contrastive term are statistics of each process's share.
DEFAULT_LIKE = ["--set", "content_regularizer=mmd", "--set", "style_regularizer=kl", "--set", "contrastive_weight=10",
                "--set", "rotations=true"]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, "background", alphabets=2, characters=4, drawers=6)
    monkeypatch.setattr(omni_data, "load_set", functools.partial(omni_data.load_set, check_counts=False))
    return ["--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")]


def torchrun(*args, processes: int = 2, stop_after: int | None = None) -> subprocess.CompletedProcess:
    """`omnivae ARGS` in `processes` Gloo processes started by torchrun; with `stop_after`,
    interrupted once that epoch is saved (see torchrun_cli.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "STOP_AFTER_EPOCH": str(stop_after or "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "tests" / "torchrun_cli.py"), "--quiet", *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode != 0) == bool(stop_after), done.stdout + done.stderr
    return done


def weights(run: Path) -> dict:
    """The VAE's exported state and the helpers' states of the checkpoint, by name."""
    found = {f"model.{k}": v for k, v in load_file(run / rundir.WEIGHTS_FILE).items()}
    modules = torch.load(run / rundir.CHECKPOINT_FILE, weights_only=True)["modules"]
    found.update({f"{name}.{k}": v for name, state in modules.items() for k, v in state.items()})
    return found


def logged(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rundir.read_log(run)]


def test_two_processes_train_the_one_process_run_and_resume(tmp_path, tiny):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["--quiet", "train", "--preset", "quick", "--out", str(one), *SMALL, *PER_IMAGE, "--set", "epochs=2",
                     *tiny]) == 0
    # Two processes, interrupted once epoch 1 is saved, then resumed.
    torchrun("train", "--preset", "quick", "--out", two, *SMALL, *PER_IMAGE, "--set", "epochs=2", *tiny, stop_after=1)
    assert [r["epoch"] for r in rundir.read_log(two)] == [1]
    done = torchrun("train", "--resume", two, *tiny)
    assert done.stdout.count(f"trained: {two}") == 1  # process 0 alone speaks
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    # Only process 0 wrote the folder: the files of a one-process run, nothing else.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    # Tolerance: the processes add the same numbers in another order (batch-norm statistics as a
    # mean of two halves' statistics, gradients as a sum of two halves), float32 rounding of about
    # 1e-7 relative. Adam turns a gradient into a step of about lr whatever its size, so such
    # rounding moves a weight by far less than lr = 3e-3 per step; after 8 steps the runs agree to
    # about 1e-6. A real difference (other noise, per-process batch-norm statistics, a missing
    # gradient average) moves weights by about lr per step: 1e-3 and more.
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    for x, y in zip(logged(one), logged(two), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), key


def test_two_processes_with_batch_statistics_stay_close(tmp_path, tiny):
    """MMD and the contrastive term are computed over each process's share: not the one-process
    objective, but the same random stream and global batch keep the runs close."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--preset", "quick", *SMALL, *DEFAULT_LIKE, "--set", "epochs=2", *tiny]
    assert cli.main(["--quiet", "train", "--out", str(one), *common]) == 0
    torchrun("train", "--out", two, *common)
    # The reconstruction terms agree to 0.1% here; another seed moves them by about 5%. (The
    # contrastive term itself is not comparable: each drawing meets half as many negatives.)
    for x, y in zip(logged(one), logged(two), strict=True):
        assert y["recon"] == pytest.approx(x["recon"], rel=0.01)
        assert y["val_recon"] == pytest.approx(x["val_recon"], rel=0.01)
        assert y["contrastive"] != x["contrastive"]


def test_shares_are_whole_groups_and_draws_are_the_global_batches():
    cfg = make_config("quick", dict(groups=4, group_size=2))
    assert local_batch(cfg, 1) == 8 and local_batch(cfg, 2) == 4 and local_batch(cfg, 4) == 2
    with pytest.raises(ConfigError, match="groups=4 does not split evenly over 3 processes"):
        local_batch(cfg, 3)
    with pytest.raises(ConfigError, match="batch_size=10 does not split evenly over 4 processes"):
        local_batch(make_config("seed", dict(batch_size=10)), 4)

    from omnivae.train import epoch_plan

    labels = np.repeat(np.arange(8), 5)
    whole = epoch_plan(cfg, labels, 0, Process())  # (steps, 8)
    halves = [epoch_plan(cfg, labels, 0, Process(rank=r, world_size=2)) for r in (0, 1)]  # (steps, 4) each
    assert torch.equal(torch.cat(halves, 1), whole)
    for half in halves:  # each share holds whole groups: both drawings of a group are of one character
        assert (labels[half[:, 0::2].numpy()] == labels[half[:, 1::2].numpy()]).all()

    torch.manual_seed(0)
    full = torch.randn(6, 3)
    torch.manual_seed(0)
    assert torch.equal(Process(rank=1, world_size=2).randn(3, 3, "cpu"), full[3:])
    torch.manual_seed(0)
    assert torch.equal(Process().randn(6, 3, "cpu"), full)  # one process: plain torch.randn


def test_ddp_option_that_skips_buffer_sync_on_each_torch(monkeypatch):
    """torch 2.13 names it forward_sync_buffers; older torch (often on CUDA images) broadcast_buffers.
    Either way DDP is built without a buffer broadcast before each forward."""
    from omnivae.train import no_buffer_sync

    class NewerDDP:  # the signature of torch 2.13: both names, the older one deprecated
        def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None):
            pass

    class OlderDDP:  # the signature of torch before 2.13
        def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True):
            pass

    for ddp, expected in ((NewerDDP, {"forward_sync_buffers": False}), (OlderDDP, {"broadcast_buffers": False})):
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
        assert no_buffer_sync() == expected
        ddp(torch.nn.Linear(1, 1), **no_buffer_sync())  # accepted
    monkeypatch.undo()
    assert no_buffer_sync() == {"forward_sync_buffers": False}  # the pinned torch (2.13)
