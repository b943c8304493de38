"""bench/ablation.py: a stopped sweep goes on where it stopped, each job on its own device."""
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fixtures import make_tiny_omniglot
from omnivae import data as omni_data
from omnivae import rundir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ablation(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir, "background", alphabets=2, characters=4, drawers=4)
    make_tiny_omniglot(data_dir, "evaluation", alphabets=1, characters=20, drawers=4, start_charid=965)
    monkeypatch.setattr(omni_data, "load_set", functools.partial(omni_data.load_set, check_counts=False))
    threads = torch.get_num_threads()
    yield module, data_dir
    torch.set_num_threads(threads)  # a job sets its own


def job(tmp_path, data_dir, name: str, epochs: int) -> dict:
    overrides = {"channels": 4, "hidden": 16, "groups": 2, "group_size": 2, "val_drawers": "4", "episodes": 20,
                 "device": "cpu"}
    return dict(variant=name, seed=0, overrides=overrides, preset="quick", epochs=epochs, run_dir=str(tmp_path / name),
                threads=1, quick=True, split="evaluation", nll_k=None, nll_images=None, swap_pairs=None,
                data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), gpu=None)


def test_finished_runs_are_skipped_and_stopped_ones_resume(tmp_path, ablation, monkeypatch):
    module, data_dir = ablation
    done = module.one_run(job(tmp_path, data_dir, "done", epochs=1))
    assert done["variant"] == "done" and "content_20way_1shot" in done
    metrics = (tmp_path / "done" / rundir.METRICS_FILE).read_text()

    # A stopped run: one epoch of two trained, no metrics yet.
    from omnivae.config import make_config
    from omnivae.train import train

    stopped = job(tmp_path, data_dir, "stopped", epochs=2)
    cfg = make_config("quick", {**stopped["overrides"], "seed": 0, "epochs": 1, "val_holdout": False})
    train(cfg, tmp_path / "stopped", str(data_dir), stopped["cache_dir"], progress=False)
    first = rundir.read_log(tmp_path / "stopped")

    import omnivae.train as training

    trained, real_train = [], training.train  # one_run imports train when it runs
    monkeypatch.setattr(training, "train", lambda *args, **kwargs: trained.append(Path(args[1]).name)
                        or real_train(*args, **kwargs))
    again = module.one_run(job(tmp_path, data_dir, "done", epochs=1))
    resumed = module.one_run(stopped)
    assert trained == ["stopped"]  # the finished run was not trained again
    assert (tmp_path / "done" / rundir.METRICS_FILE).read_text() == metrics and again == done
    log = rundir.read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in log] == [1, 2] and log[0] == first[0]  # went on from its checkpoint
    assert json.loads((tmp_path / "stopped" / rundir.CONFIG_FILE).read_text())["epochs"] == 2
    assert "content_20way_1shot" in resumed


def test_jobs_get_devices_round_robin_and_split_the_cores(ablation, monkeypatch, tmp_path):
    module, _ = ablation
    seen = []
    monkeypatch.setattr(module, "_visible_gpus", lambda: 2)
    monkeypatch.setattr(module.os, "cpu_count", lambda: 8)

    class Pool:  # runs nothing: records the jobs
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs):
            seen.extend(jobs)
            return []

    monkeypatch.setattr(module, "ProcessPoolExecutor", Pool)
    module.main(["--out", str(tmp_path / "sweep"), "--epochs", "1", "--seeds", "0", "1", "--jobs", "4",
                 "--variant", "a:", "--variant", "b:"])
    assert [j["gpu"] for j in seen] == [0, 1, 0, 1] and {j["threads"] for j in seen} == {2}
    monkeypatch.setattr(module, "_visible_gpus", lambda: 0)
    seen.clear()
    module.main(["--out", str(tmp_path / "sweep"), "--epochs", "1", "--seeds", "0", "--jobs", "2", "--variant", "a:"])
    assert [j["gpu"] for j in seen] == [None] and seen[0]["threads"] == 4


def test_named_variants_give_their_settings_and_build_valid_configs(ablation):
    module, _ = ablation
    from omnivae.config import make_config

    assert module.parse_variant("conv4") == ("conv4", {"encoder_blocks": 1, "decoder": "deconv", "encoder": "conv4"})
    assert module.parse_variant("enc2") == ("enc2", {"encoder_blocks": 2, "decoder": "deconv"})
    assert module.parse_variant("proto_only") == ("proto_only", {"proto_weight": 10.0, "contrastive_weight": 0.0})
    assert module.parse_variant("proto:proto_weight=3") == ("proto", {"proto_weight": "3"})  # given settings win
    assert module.parse_variant("mine:encoder=conv4,lr=0.01") == ("mine", {"encoder": "conv4", "lr": "0.01"})
    assert module.parse_variant("default") == ("default", {})  # the preset as it is
    for name in module.VARIANTS:
        cfg = make_config("default", module.parse_variant(name)[1])
        assert cfg.encoder == ("conv4" if "conv4" in name else "resnet" if name.startswith("resenc") else "conv")
        assert cfg.proto_weight == (10.0 if "proto" in name else 0.0)
        assert cfg.contrastive_weight == (0.0 if name == "proto_only" or name.startswith("plain_vae") else 100.0)
        assert (cfg.group_size == 1) == name.startswith("plain_vae")  # a plain VAE: no groups
        assert (cfg.detail_dim > 0) == name.startswith("detail")


def test_a_jobs_process_ends_when_its_sweep_is_gone():
    """A job's process watches the sweep's process: killed sweeps leave no orphan writing into a run folder."""
    import os
    import subprocess
    import sys

    def job_process(parent: int) -> subprocess.Popen:
        code = ("import importlib.util, time; spec = importlib.util.spec_from_file_location('ablation', {path!r}); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                "m._exit_with_parent({parent}, every=0.05); time.sleep(60)")
        return subprocess.Popen([sys.executable, "-c", code.format(path=str(ROOT / "bench" / "ablation.py"),
                                                                   parent=parent)])

    orphan = job_process(parent=-1)  # its parent is not the sweep it was told: as when the sweep died
    assert orphan.wait(timeout=30) == 1
    kept = job_process(parent=os.getpid())  # the sweep (this process) is alive: the job goes on
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            kept.wait(timeout=3)
    finally:
        kept.kill()
        kept.wait()
