"""Speed of the data path, the training loop and evaluation on this machine.

    python bench/speed.py [--run RUN_DIR] [--steps 60] [--device cuda] [--set precision=bf16 ...]
                          [--skip-data] [--skip-training] [--skip-sampling]

Prints:
- first decode and cached load time of the background and evaluation sets (28 px);
- training images per second of the project's training loop (`train_epoch`: batches gathered
  from the training set on the device, turned, one update each, loss terms kept on the device)
  with the `default` preset's model and grouped batch, next to a minimal hand-written PyTorch
  loop of the same network, the same batches, turns and loss terms, measured in the same run,
  alternating rounds; `--set` changes the preset for both (precision=bf16 autocasts both,
  compile=true compiles both models);
- on CUDA, how many times the loop made the host wait for the GPU (sync debug mode);
- seconds to draw 64 binary drawings from prior codes in one batch (`model.sample`) with the
  `default` preset's decoder and with decoder=pixelcnn (pixel by pixel), weights as initialised;
- with --run, wall time of `evaluate` on that run with and without the k=1000 likelihood.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from omnivae import data
from omnivae.config import make_config
from omnivae.distributed import Process
from omnivae.model import ModelConfig, StructuredVAE
from omnivae.train import build_parts, cpu_name, epoch_plan, lr_schedule, resolve_precision, train_epoch, wrap


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
    with torch.autocast(x.device.type, torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext():
        loss = minimal_loss(model, x, label, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def minimal_loss(model, x, label, cfg) -> torch.Tensor:
    q = model.posterior(x)
    M = cfg.group_size
    precision = (-q.content_logvar).exp().view(-1, M, cfg.content_dim)  # (G, M, Dc)
    group_var = 1.0 / precision.sum(1)  # (G, Dc)
    group_mean = (q.content_mean.view(-1, M, cfg.content_dim) * precision).sum(1) * group_var
    content = (group_mean + group_var.sqrt() * torch.randn_like(group_mean)).repeat_interleave(M, 0)
    style = q.style_mean + (0.5 * q.style_logvar).exp() * torch.randn_like(q.style_mean)
    logits = model.decode_logits(content, style, x)  # x: teacher forcing for an autoregressive decoder
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    # MMD (inverse multiquadric, 7 scales) between group means and prior samples.
    prior = torch.randn_like(group_mean)
    both = torch.cat([group_mean, prior])
    d2 = torch.cdist(both, both).pow(2)
    k = sum(2 * cfg.content_dim * s / (2 * cfg.content_dim * s + d2) for s in (0.1, 0.2, 0.5, 1, 2, 5, 10))
    n = len(group_mean)
    off = 1 - torch.eye(n, device=both.device)
    mmd = (k[:n, :n] * off).sum() / (n * (n - 1)) + (k[n:, n:] * off).sum() / (n * (n - 1)) - 2 * k[:n, n:].mean()
    kl_style = 0.5 * (q.style_mean.pow(2) + q.style_logvar.exp() - q.style_logvar - 1).sum(1).mean()
    z = F.normalize(q.content_mean, dim=1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = (z @ z.T / cfg.temperature).masked_fill(eye, float("-inf"))
    positives = (label[:, None] == label[None, :]) & ~eye
    log_prob = sim - sim.logsumexp(1, keepdim=True)
    supcon = (-log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)).mean()
    return recon + cfg.content_weight * mmd + cfg.style_weight * kl_style + cfg.contrastive_weight * supcon


def minimal_loop(model, optimizer, images, label, plan, cfg) -> None:
    """Gather each batch, turn each group a random quarter turn (a new character), one step."""
    M = cfg.group_size
    for idx in plan:
        x, y = images[idx], label[idx]
        turns = torch.randint(0, 4, (len(idx) // M,), device=idx.device).repeat_interleave(M)  # (B,)
        x = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], 1)[torch.arange(len(x), device=x.device), turns]
        minimal_step(model, optimizer, x, y * 4 + turns, cfg)


def time_training(steps: int, device: torch.device, overrides: list[str], rounds: int = 3) -> None:
    cfg = make_config("default", ["device=" + str(device), *overrides])
    cfg = resolve_precision(cfg, device)
    background = data.load_set("background", 28, progress=False)
    images = background.tensors().to(device)  # (N, 1, S, S)
    classes, label = np.unique(background.character, return_inverse=True)
    label = torch.as_tensor(label, device=device)
    process = Process(device=device)
    plan = epoch_plan(cfg, background.character, 0, process)[: steps + 3]  # (steps + 3, B) on the device
    ours = build_parts(cfg, 4 * len(classes), device)
    wrap(ours, cfg, process)
    schedule = lr_schedule(cfg, ours.optimizer, 10**6)
    theirs = build_parts(cfg, 4 * len(classes), device)
    hand_model = torch.compile(theirs.model, mode=cfg.compile_mode) if cfg.compile else theirs.model
    rates = {"omnivae train loop": [], "hand-written loop": []}

    def run(fn, name):
        fn(plan[:3])  # warm-up (and compilation)
        _wait(device)
        start = time.perf_counter()
        fn(plan[3 : 3 + steps])
        _wait(device)
        rates[name].append(steps * plan.shape[1] / (time.perf_counter() - start))

    for _ in range(rounds):
        run(lambda rows: train_epoch(ours, cfg, images, label, rows, 0, schedule, progress=False), "omnivae train loop")
        run(lambda rows: minimal_loop(hand_model, theirs.optimizer, images, label, rows, cfg), "hand-written loop")
    settings = f"batch {plan.shape[1]}, {device}, precision={cfg.precision}, compile={cfg.compile}" + (
        f" ({cfg.compile_mode})" if cfg.compile else "")
    for name, values in rates.items():
        print(f"train  {name:20s}: {np.median(values):7.1f} images/s (median of {rounds} rounds of {steps} steps, {settings})")
    ratio = np.median(rates["omnivae train loop"]) / np.median(rates["hand-written loop"])
    print(f"train  ratio omnivae / hand-written: {ratio:.3f} (target >= 0.95)")
    if device.type == "cuda":
        print(f"train  host waits in {steps} steps of the loop: {count_host_waits(ours, cfg, images, label, plan[3 : 3 + steps], schedule)} "
              "(2 expected: the epoch's sums, read once at its end)")


def count_host_waits(parts, cfg, images, label, plan, schedule) -> int:
    """How many times CUDA's sync debug mode saw the host wait for the GPU during the loop."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(parts, cfg, images, label, plan, 0, schedule, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_sampling(device: torch.device, overrides: list[str], rounds: int = 3, n: int = 64) -> None:
    """Seconds for `n` drawings from prior codes in one batch, with the default preset's model (and
    `--set` overrides) and with decoder=pixelcnn; weights as initialised (the time does not depend on them)."""
    for extra in ([], ["decoder=pixelcnn"]):
        cfg = make_config("default", ["device=" + str(device), *overrides, *extra])
        torch.manual_seed(0)
        model = StructuredVAE(ModelConfig.from_config(cfg)).to(device).eval()
        content, style = torch.randn(n, cfg.content_dim), torch.randn(n, cfg.style_dim)  # prior codes
        model.sample(content[:2], style[:2])  # warm-up
        seconds = []
        for r in range(rounds):
            _wait(device)
            start = time.perf_counter()
            model.sample(content, style, torch.Generator().manual_seed(r))
            _wait(device)
            seconds.append(time.perf_counter() - start)
        print(f"sample {cfg.decoder:8s}: {n} samples in {np.median(seconds):6.2f} s (median of {rounds} rounds, one batch, "
              f"{cfg.image_size} px, {device}, {torch.get_num_threads()} threads)")


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    p.add_argument("--rounds", type=int, default=3, help="rounds of each loop, alternating (the median is printed)")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change the default preset for both loops (precision=bf16, compile=true)")
    args = p.parse_args()
    device = torch.device(args.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"machine: {hardware}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.python_version()}")
    if not args.skip_data:
        time_data()
    if not args.skip_training:
        time_training(args.steps, device, args.overrides, args.rounds)
    if not args.skip_sampling:
        time_sampling(device, args.overrides, args.rounds)
    if args.run:
        time_evaluate(args.run)


if __name__ == "__main__":
    main()
