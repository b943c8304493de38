"""Train a tiny run and kill it again and again, for test_faults.py (Linux: it forks and reads /proc).

    python tests/crash_run.py RUN_DIR REFERENCE_DIR SEED

Imports torch once, then forks one child per attempt. Each child trains the same tiny model on
synthetic data into RUN_DIR, resuming from the checkpoint when there is one and otherwise starting
the folder again (as `omnivae train --out RUN_DIR` does); the parent SIGKILLs it at a chosen moment.
Before every os.fsync and os.replace the child tells the parent which file it is about to make
durable or rename and waits for an answer, so a kill can land exactly inside a checkpoint write:
after the checkpoint's temporary file is written and before its rename, between the checkpoint and
the weights export, before the log line. Other kills come after a random delay (mid-step,
mid-write). Then one child trains RUN_DIR to the end and another trains REFERENCE_DIR without a
stop. Prints one JSON line: {"kills": [where each kill landed], "epochs": EPOCHS}.
"""
from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import sys
import time
import traceback
from pathlib import Path

EPOCHS = 10
# Kill just before these steps (the first or second time each comes in a child): inside the writes of a checkpoint.
WRITE_KILLS = (
    "fsync temporary train_state.pt",  # the checkpoint's temporary file written, not yet flushed
    "replace train_state.pt",  # ... flushed, not yet renamed
    "fsync folder after train_state.pt",  # the checkpoint in place; the weights export not yet written
    "replace model.safetensors",  # the export written, not yet renamed: it lags the checkpoint
    "fsync folder after model.safetensors",  # the export in place; the log line not yet appended
    "fsync log.jsonl",  # the log line appended, not yet flushed
)
# Before those, in this order: the config's first write killed (the folder holds only a
# temporary file), then the first checkpoint's (the folder holds a config and no checkpoint).
FIRST_KILLS = ("replace config.json", "replace train_state.pt")
TIME_KILLS = 4  # then this many kills after a random delay (an epoch takes about 0.1 s)
TEMPORARY = re.compile(r"^\.(.+)\.[0-9a-f]{8}-\d+\.[0-9a-f]{8}\.tmp$")


def child(run_dir: Path, cfg, dataset, report: int, answer: int) -> None:
    """Train into run_dir, asking the parent before each fsync and rename."""
    real_fsync, real_replace = os.fsync, os.replace

    def ask(event: str) -> None:
        os.write(report, (event + "\n").encode())
        if os.read(answer, 1) != b"g":
            os._exit(3)

    def name(path) -> str:
        path = Path(path)
        if path.is_dir():
            return "folder"
        found = TEMPORARY.match(path.name)
        return f"temporary {found[1]}" if found else path.name

    def fsync(fd):
        ask(f"fsync {name(os.readlink(f'/proc/self/fd/{fd}'))}")
        real_fsync(fd)

    def replace(src, dst):
        ask(f"replace {name(dst)}")
        real_replace(src, dst)

    os.fsync, os.replace = fsync, replace
    from omnivae import rundir
    from omnivae.train import train

    train(cfg, run_dir, dataset=dataset, progress=False, resume=rundir.is_trained(run_dir))


def attempt(run_dir: Path, cfg, dataset, kill_at: str | None = None, nth: int = 1,
            delay: float | None = None) -> str | None:
    """One child; killed before its `nth` `kill_at` step or after `delay` seconds. Returns where
    the kill landed, or None when the child finished."""
    report_r, report_w = os.pipe()
    answer_r, answer_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r), os.close(answer_w)
        try:
            child(run_dir, cfg, dataset, report_w, answer_r)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(report_w), os.close(answer_r)
    deadline = None if delay is None else time.monotonic() + delay
    landed, buffer, last_replaced, previous, seen = None, b"", "nothing", "start", 0
    while landed is None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([report_r], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            landed = f"after {delay:.2f} s, after {previous}"
            break
        chunk = os.read(report_r, 4096)
        if not chunk:
            break  # the child exited
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            event = line.decode()
            if event.startswith("replace "):
                last_replaced = event.split(" ", 1)[1]
            elif event == "fsync folder":
                event = f"fsync folder after {last_replaced}"
            seen += event == kill_at
            if event == kill_at and seen == nth:
                os.kill(pid, signal.SIGKILL)
                landed = event
                break
            os.write(answer_w, b"g")
            previous = event
    _, status = os.waitpid(pid, 0)
    os.close(report_r), os.close(answer_w)
    if landed is None and status != 0:
        raise SystemExit(f"a training child failed (status {status})")
    return landed


def main(run_dir: str, reference_dir: str, seed: str) -> None:
    # What every child needs loads once, before the forks (Adam's first use loads torch._dynamo).
    import safetensors.torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    import omnivae.train  # noqa: F401
    from fixtures import synthetic_omniglot
    from test_train import tiny_config

    run_dir, rng, dataset = Path(run_dir), random.Random(int(seed)), synthetic_omniglot()
    cfg = tiny_config(epochs=EPOCHS, threads=1, val_drawers=(20,))
    plan = [(event, 1, None) for event in FIRST_KILLS]
    plan += [(event, rng.choice((1, 2)), None) for event in rng.sample(WRITE_KILLS, len(WRITE_KILLS))]
    plan += [(None, 1, rng.uniform(0.05, 0.5)) for _ in range(TIME_KILLS)]
    kills = []
    for kill_at, nth, delay in plan:
        landed = attempt(run_dir, cfg, dataset, kill_at, nth, delay)
        if landed is None:
            break  # it finished before the kill came
        kills.append(landed)
    attempt(run_dir, cfg, dataset)  # to the end
    attempt(Path(reference_dir), cfg, dataset)  # never stopped
    print(json.dumps({"kills": kills, "epochs": EPOCHS}))


if __name__ == "__main__":
    main(*sys.argv[1:])
