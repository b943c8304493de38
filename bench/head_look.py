"""What an autoregressive decoder's codes draw by themselves, as a picture.

    python bench/head_look.py RUN_DIR OUT.png [--drawings 12]

Rows, for drawings of held-out drawers of the training characters (every 97th, so many
characters): the real drawing; the probabilities of the logits *before* the PixelCNN head (what
the codes draw themselves); the teacher-forced probabilities (the head reading the real pixels
above each one, as training and the likelihood see it); a sample (the head reading its own
pixels, as every figure and the swap judge see it). A run trained without `base_weight` draws a
shapeless blob in the second row; the fourth row then has nothing to follow.
"""
from __future__ import annotations

import argparse
import os

import torch

from omnivae import data as omni_data
from omnivae import metrics, plots, rundir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--drawings", type=int, default=12)
    parser.add_argument("--data-dir", default=os.environ.get("OMNIVAE_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("OMNIVAE_CACHE_DIR"))
    args = parser.parse_args(argv)

    cfg = rundir.read_config(args.run_dir)
    model = rundir.load(args.run_dir, "cpu").eval()
    if not model.autoregressive:
        raise SystemExit(f"{args.run_dir}: decoder {cfg.decoder!r} has no autoregressive head to look at")
    background = omni_data.load_set("background", cfg.image_size, args.data_dir, args.cache_dir, progress=False)
    held_out = omni_data.split_by_drawer(background, cfg.val_drawers)[1]
    x = held_out.tensors()[::97][:args.drawings]  # (N, 1, S, S)
    with torch.no_grad():
        content, style = model.encode(x)
        binary = metrics.binarize(x, seed=0)  # what the head reads in training
        base, full = model.decode_logit_parts(content, style, binary)
        sample = model.sample(content, style, torch.Generator().manual_seed(0))
    rows = torch.cat([x, torch.sigmoid(base), torch.sigmoid(full), sample]).clamp(0, 1)
    plots.image_grid(rows, args.out, ncols=len(x), title=f"{cfg.decoder}, base_weight={cfg.base_weight}",
                     row_labels=["real", "before head", "teacher-forced", "sample"])
    print(args.out)


if __name__ == "__main__":
    main()
