"""Recompute the batch norm statistics of a trained run's model, then score it on validation.

    python bench/refresh_bn.py RUN_DIR OUT_DIR [--data-dir D] [--cache-dir C] [--nll-k 200] [--nll-images 200]
                               [--swap-pairs 1000]

For runs of `bench/ablation.py` (trained without the validation alphabets) that kept a moving
average of their weights (`ema_decay`) before `train` recomputed the average's statistics itself:
OUT_DIR gets the run's config, log and run info and the model with the statistics that
`omnivae.train.refresh_batch_norm` computes from the run's training drawings, and is scored with
`evaluate --split validation` at the given (light) settings.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import save_file

from omnivae import data, rundir
from omnivae.evaluate import evaluate
from omnivae.train import refresh_batch_norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--nll-k", type=int, default=200)
    p.add_argument("--nll-images", type=int, default=200)
    p.add_argument("--swap-pairs", type=int, default=1000)
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "log.jsonl", "run.json"):
        shutil.copy(run / name, out / name)
    cfg = rundir.read_config(run)
    background = data.load_set("background", cfg.image_size, args.data_dir, args.cache_dir, progress=False)
    if cfg.val_holdout:
        background = data.split_by_alphabet(background, cfg.val_alphabets)[0]
    train_set = data.split_by_drawer(background, cfg.val_drawers)[0]  # the drawings the run trained on
    model = rundir.load(run)
    refresh_batch_norm(model, train_set.tensors())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    evaluate(out, args.data_dir, args.cache_dir, figures=False, progress=False, nll_k=args.nll_k,
             nll_images=args.nll_images, swap_pairs=args.swap_pairs, split="validation")
    print(f"{out}: 20-way 1-shot {rundir.read_metrics(out)['content_20way_1shot']:.4f}")


if __name__ == "__main__":
    main()
