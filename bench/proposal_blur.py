"""The likelihood's importance proposal at several blurs of the binary drawings, on validation.

    python bench/proposal_blur.py RUN_DIR [RUN_DIR ...] [--blur 0 0.5 0.6 0.7 0.8 1.0]
                                  [--k 200] [--images 200] [--data-dir DIR] [--cache-dir DIR]

For each run (trained with val_holdout=true) and each blur (pixels at 28 px; 0 = the binary
drawing itself), the k-sample importance-weighted NLL and the -ELBO of the same dynamically
binarised validation drawings with the same noise (`metrics.iwae_nll`): every row bounds the
same likelihood, so the lowest is the tightest. This is how `nll_blur` was chosen. Also prints
the drawings' binarisation entropy, sum over pixels of H(grey level): the expected NLL of their
binary draws under a model that knew each grey drawing exactly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omnivae import metrics, rundir
from omnivae.evaluate import load_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders trained with val_holdout=true")
    p.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.5, 0.6, 0.7, 0.8, 1.0])
    p.add_argument("--k", type=int, default=200, help="importance samples per drawing")
    p.add_argument("--images", type=int, default=200, help="validation drawings (a fixed random choice)")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    args = p.parse_args()
    print(f"$ python bench/proposal_blur.py RUNS --blur {' '.join(map(str, args.blur))} --k {args.k} --images {args.images}")
    for run in args.runs:
        cfg = rundir.read_config(run)
        test = load_split(cfg, "validation", args.data_dir, args.cache_dir, progress=False)
        model = rundir.load(run, "cpu")
        rows = np.sort(np.random.default_rng(0).choice(len(test), min(args.images, len(test)), replace=False))
        grey = test.tensors()[rows]
        binary = metrics.binarize(grey, seed=1)
        p = grey.clamp(1e-6, 1 - 1e-6)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log()).flatten(1).sum(1).mean().item()
        print(f"{Path(run).name:24s} binarisation entropy of the grey drawings: {entropy:.2f} nats (a floor for any model's expected NLL of their binary draws)")
        for blur in args.blur:
            result = metrics.iwae_nll(model, binary, k=args.k, seed=2, blur=blur * cfg.image_size / 28)
            print(f"{Path(run).name:24s} blur {blur:4.2f} px: NLL {result['nll']:7.2f}  -ELBO {result['elbo_nll']:7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
