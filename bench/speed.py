"""Speed of the data path, the training loop and evaluation on this machine.

    python bench/speed.py [--run RUN_DIR] [--steps 60]

Prints:
- first decode and cached load time of the background and evaluation sets (28 px);
- training images per second of the project's `train_step` with the `default` preset's
  model and grouped batch, next to a minimal hand-written PyTorch loop of the same network,
  the same batch and the same loss terms, measured in the same run, alternating rounds;
- with --run, wall time of `evaluate` on that run with and without the k=1000 likelihood.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from omnivae import data
from omnivae.config import make_config
from omnivae.train import batches, build_parts, cpu_name, train_step


def time_data() -> None:
    with tempfile.TemporaryDirectory() as cache:
        for name in ("background", "evaluation"):
            start = time.perf_counter()
            data.load_set(name, 28, cache_dir=cache, progress=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            data.load_set(name, 28, cache_dir=cache, progress=False)
            cached = time.perf_counter() - start
            print(f"data   {name:10s}: first decode {first:6.2f} s, cached load {cached:6.3f} s")


def minimal_step(model, optimizer, x, label, cfg) -> None:
    """The same objective as `default`, written out by hand with no helpers."""
    q = model.posterior(x)
    M = cfg.group_size
    precision = (-q.content_logvar).exp().view(-1, M, cfg.content_dim)  # (G, M, Dc)
    group_var = 1.0 / precision.sum(1)  # (G, Dc)
    group_mean = (q.content_mean.view(-1, M, cfg.content_dim) * precision).sum(1) * group_var
    content = (group_mean + group_var.sqrt() * torch.randn_like(group_mean)).repeat_interleave(M, 0)
    style = q.style_mean + (0.5 * q.style_logvar).exp() * torch.randn_like(q.style_mean)
    logits = model.decode_logits(content, style)
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    # MMD (inverse multiquadric, 7 scales) between group means and prior samples.
    prior = torch.randn_like(group_mean)
    both = torch.cat([group_mean, prior])
    d2 = torch.cdist(both, both).pow(2)
    k = sum(2 * cfg.content_dim * s / (2 * cfg.content_dim * s + d2) for s in (0.1, 0.2, 0.5, 1, 2, 5, 10))
    n = len(group_mean)
    off = 1 - torch.eye(n)
    mmd = (k[:n, :n] * off).sum() / (n * (n - 1)) + (k[n:, n:] * off).sum() / (n * (n - 1)) - 2 * k[:n, n:].mean()
    kl_style = 0.5 * (q.style_mean.pow(2) + q.style_logvar.exp() - q.style_logvar - 1).sum(1).mean()
    z = F.normalize(q.content_mean, dim=1)
    sim = (z @ z.T / cfg.temperature).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    positives = (label[:, None] == label[None, :]) & ~torch.eye(len(z), dtype=torch.bool)
    log_prob = sim - sim.logsumexp(1, keepdim=True)
    supcon = (-log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)).mean()
    loss = recon + cfg.content_weight * mmd + cfg.style_weight * kl_style + cfg.contrastive_weight * supcon
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_training(steps: int, rounds: int = 3) -> None:
    cfg = make_config("default", {"device": "cpu"})
    background = data.load_set("background", 28, progress=False)
    images = background.tensors()
    _, label = np.unique(background.character, return_inverse=True)
    label = torch.as_tensor(label)
    plan = batches(cfg, background.character, 0)[: steps + 5]
    ours = build_parts(cfg, int(label.max()) + 1, torch.device("cpu"))
    theirs = build_parts(cfg, int(label.max()) + 1, torch.device("cpu"))
    rates = {"omnivae train_step": [], "hand-written loop": []}

    def run(fn, name):
        for idx in plan[:3]:  # warm-up
            fn(torch.as_tensor(idx))
        start = time.perf_counter()
        for idx in plan[3 : 3 + steps]:
            fn(torch.as_tensor(idx))
        rates[name].append(steps * len(plan[0]) / (time.perf_counter() - start))

    for _ in range(rounds):
        run(lambda i: train_step(ours, cfg, images[i], label[i]), "omnivae train_step")
        run(lambda i: minimal_step(theirs.model, theirs.optimizer, images[i], label[i], cfg), "hand-written loop")
    for name, values in rates.items():
        print(f"train  {name:20s}: {np.median(values):7.1f} images/s (median of {rounds} rounds of {steps} steps, batch {len(plan[0])})")
    ratio = np.median(rates["omnivae train_step"]) / np.median(rates["hand-written loop"])
    print(f"train  ratio omnivae / hand-written: {ratio:.3f} (target >= 0.95)")


def time_evaluate(run_dir: str) -> None:
    from omnivae.evaluate import evaluate

    for nll_k in (0, 1000):
        start = time.perf_counter()
        evaluate(run_dir, nll_k=nll_k, figures=True, progress=False)
        print(f"eval   nll_k={nll_k:4d}: {time.perf_counter() - start:6.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a trained run folder to time `evaluate` on")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per round")
    p.add_argument("--skip-data", action="store_true")
    args = p.parse_args()
    print(f"machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.python_version()}")
    if not args.skip_data:
        time_data()
    time_training(args.steps)
    if args.run:
        time_evaluate(args.run)


if __name__ == "__main__":
    main()
