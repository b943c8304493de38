"""omnivae's command line with the data sets' count checks off, for the tiny test zips.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_cli.py train ...

Every process runs `omnivae ARGS` as `torchrun -m omnivae ARGS` would (test_distributed.py). With
STOP_AFTER_EPOCH=N in the environment, training stops (KeyboardInterrupt, exit status 130) right
after epoch N is saved, as a run interrupted there.
"""
import functools
import os
import sys

from omnivae import cli
from omnivae import data
from omnivae import train as training

data.load_set = functools.partial(data.load_set, check_counts=False)  # the tiny zips are not the real sets
if os.environ.get("STOP_AFTER_EPOCH"):
    save = training.save_checkpoint

    def save_then_stop(run_dir, parts, record):
        save(run_dir, parts, record)
        if record["epoch"] == int(os.environ["STOP_AFTER_EPOCH"]):
            raise KeyboardInterrupt

    training.save_checkpoint = save_then_stop
sys.exit(cli.main(sys.argv[1:]))
