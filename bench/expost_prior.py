"""How much likelihood a better content prior could buy a trained run: fit one after training.

    python bench/expost_prior.py RUN_DIR [--components 512] [--k 200] [--images 200]

Encodes the run's training drawings (the background set without the validation alphabets when
the run held them out, and without the held-out drawers), draws three codes per drawing from
q(z_content | x), and fits a mixture of diagonal Gaussians to them (scikit-learn's
GaussianMixture, EM; the "ex-post density estimation" of Ghosh et al. 2020). The run's weights
with that mixture as the content prior are a generative model of their own; both are scored
on the run's split (validation for a run that held it out) with the evaluation's likelihood
subset and seeds: IWAE NLL, -ELBO and the per-image content KL to each prior.
Data and cache folders: $OMNIVAE_DATA_DIR and $OMNIVAE_CACHE_DIR, or --data-dir, --cache-dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from omnivae import data as omni_data
from omnivae import evaluate, metrics, rundir
from omnivae.model import ModelConfig, StructuredVAE


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run folder")
    p.add_argument("--components", type=int, default=512)
    p.add_argument("--k", type=int, default=200, help="importance samples per image")
    p.add_argument("--images", type=int, default=200, help="test images for the likelihood")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)

    cfg = rundir.read_config(args.run)
    split = "validation" if cfg.val_holdout else "evaluation"
    model = rundir.load(args.run, "cpu")
    background = omni_data.load_set("background", cfg.image_size, args.data_dir, args.cache_dir, progress=False)
    train = omni_data.split_by_alphabet(background, cfg.val_alphabets)[0] if cfg.val_holdout else background
    train = omni_data.split_by_drawer(train, cfg.val_drawers)[0]
    codes = evaluate.encode_all(model, train.tensors())
    z = np.concatenate([metrics.sample_posterior(codes["content_mean"], codes["content_logvar"], seed=s)
                        for s in range(3)])  # (3 N, Dc)
    started = time.time()
    gmm = GaussianMixture(args.components, covariance_type="diag", max_iter=200, reg_covar=1e-4,
                          random_state=0).fit(z)
    print(f"run {Path(args.run).name}: mixture of {args.components} diagonal Gaussians fitted to {len(z)} codes of "
          f"{len(train)} training drawings in {time.time() - started:.0f} s (converged: {gmm.converged_})")

    mixture = StructuredVAE(ModelConfig(**{**dataclasses.asdict(model.config), "prior_components": args.components}))
    mixture.load_state_dict({**model.state_dict(),
                             "prior_means": torch.tensor(gmm.means_, dtype=torch.float32),
                             "prior_logvars": torch.tensor(np.log(gmm.covariances_), dtype=torch.float32),
                             "prior_logits": torch.tensor(np.log(gmm.weights_), dtype=torch.float32)})
    mixture.eval()

    test = evaluate.load_split(cfg, split, args.data_dir, args.cache_dir, progress=False)
    images = test.tensors()
    streams = metrics.eval_streams(cfg.eval_seed)  # the evaluation's subset, binarisation and noise
    chosen = np.sort(np.random.default_rng(streams["nll_images"]).choice(len(test), args.images, replace=False))
    binary = metrics.binarize(images[chosen], seed=streams["binarize"])
    print(f"scored on the {split} split: {args.images} images, k = {args.k}; content KL on all {len(test)} drawings")
    print("| prior | NLL (nats) | -ELBO (nats) | content KL (nats) |")
    print("| --- | --- | --- | --- |")
    for name, candidate in (("N(0, I) (trained with)", model), (f"mixture of {args.components}, fitted after", mixture)):
        result = metrics.iwae_nll(candidate, binary, k=args.k, seed=streams["iwae"])
        with torch.no_grad():
            q = candidate.posterior(images)
            kl = candidate.content_kl(q.content_mean, q.content_logvar, torch.Generator().manual_seed(0)).mean().item()
        print(f"| {name} | {result['nll']:.1f} | {result['elbo_nll']:.1f} | {kl:.1f} |", flush=True)


if __name__ == "__main__":
    main()
