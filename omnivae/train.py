"""Training: one loop and small helpers; what it writes into the run folder is rundir's business."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as omni_data
from . import rundir
from .config import Config, ConfigError
from .losses import (
    REGULARIZERS,
    bernoulli_nll,
    discriminator_loss,
    gaussian_kl,
    generator_loss,
    r1_penalty,
    supervised_contrastive,
)
from .model import Discriminator, ModelConfig, StructuredVAE, StyleAdversary, resolve_device
from .rundir import finished_epochs  # noqa: F401  (importable from here, as before rundir existed)

PARTS = ("content", "style")
SHOWN = ("recon", "content", "style", "contrastive")  # loss terms on the progress bar
SHOW_EVERY = 50  # steps between progress-bar updates (each reads numbers off the device)


class TrainingError(RuntimeError):
    """Training cannot go on: a loss term or the gradient stopped being finite. Nothing of the
    epoch was written; the run folder keeps its last checkpoint."""


@dataclass
class Parts:
    """Everything that trains: the VAE, optional helpers, and one optimiser per player."""

    model: StructuredVAE
    style_adversary: StyleAdversary | None = None
    discriminators: dict = field(default_factory=dict)  # part -> Discriminator
    optimizer: torch.optim.Optimizer | None = None  # VAE (and style adversary, through its reversal layer)
    disc_optimizer: torch.optim.Optimizer | None = None

    def helpers(self) -> dict[str, torch.nn.Module]:
        """Every trained module but the VAE: the style adversary and the discriminators."""
        found = {}
        if self.style_adversary is not None:
            found["style_adversary"] = self.style_adversary
        found.update({f"discriminator_{p}": d for p, d in self.discriminators.items()})
        return found

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, **self.helpers()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        found = {"optimizer": self.optimizer}
        if self.disc_optimizer is not None:
            found["disc_optimizer"] = self.disc_optimizer
        return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_parts(cfg: Config, classes: int, device: torch.device) -> Parts:
    """Modules and optimisers for a config; `classes` is the number of training characters."""
    model = StructuredVAE(ModelConfig.from_config(cfg)).to(device)
    parts = Parts(model)
    params = list(model.parameters())
    if cfg.style_adversary_weight > 0:
        parts.style_adversary = StyleAdversary(cfg.style_dim, classes, cfg.hidden).to(device)
        params += list(parts.style_adversary.parameters())
    parts.optimizer = torch.optim.Adam(params, lr=cfg.lr)
    for part in PARTS:
        if getattr(cfg, f"{part}_regularizer") == "adversarial":
            dim = cfg.content_dim if part == "content" else cfg.style_dim
            parts.discriminators[part] = Discriminator(dim, cfg.disc_hidden).to(device)
    if parts.discriminators:
        disc_params = [p for d in parts.discriminators.values() for p in d.parameters()]
        parts.disc_optimizer = torch.optim.Adam(disc_params, lr=cfg.disc_lr, betas=(0.5, 0.9))
    return parts


def _codes(cfg: Config, out, part: str):
    """(mean, logvar, codes matched to the prior) of one part; one row per group for grouped content."""
    mean, logvar = getattr(out, f"{part}_mean"), getattr(out, f"{part}_logvar")
    code = getattr(out, part)
    if part == "content" and cfg.group_size > 1:  # rows repeat within a group: keep one
        mean, logvar, code = mean[:: cfg.group_size], logvar[:: cfg.group_size], code[:: cfg.group_size]
    return mean, logvar, (mean if cfg.match_codes == "mean" else code)


def update(parts: Parts, cfg: Config, x: torch.Tensor, label: torch.Tensor, ramp: float = 1.0) -> dict:
    """One update of the VAE (and its helpers), then of the discriminators. Returns the loss terms
    and the VAE's gradient norm as 0-d tensors left on the device: reading them waits for the
    device, so the training loop does it once per epoch (`train_step` reads them at once).

    x: (B, 1, S, S) in [0, 1]; label: (B,) training-character index, used only by the
    content-level terms. With cfg.group_size > 1 the batch is G groups of M drawings.
    """
    model, M = parts.model, cfg.group_size
    out = model(x, M)
    terms = {"recon": bernoulli_nll(out.logits, x)}
    loss = terms["recon"]
    for part in PARTS:
        name, weight = getattr(cfg, f"{part}_regularizer"), getattr(cfg, f"{part}_weight")
        mean, logvar, codes = _codes(cfg, out, part)
        if name == "adversarial":
            terms[part] = generator_loss(parts.discriminators[part](codes))
        else:
            # Grouped content has one posterior per M drawings: its KL counts once per group (see losses).
            rows_per = M if part == "content" else 1
            terms[part] = REGULARIZERS[name](mean, logvar, codes, kernel=cfg.mmd_kernel, sample_kl=cfg.sample_kl,
                                             group_size=rows_per)
        terms[f"kl_{part}"] = gaussian_kl(mean, logvar).mean().detach()  # per posterior (one per group), logged whatever the regulariser
        loss = loss + ramp * weight * terms[part]
    if cfg.contrastive_weight > 0:
        terms["contrastive"] = supervised_contrastive(out.drawing_content_mean, label, cfg.temperature)
        loss = loss + cfg.contrastive_weight * terms["contrastive"]
    if parts.style_adversary is not None:
        logits = parts.style_adversary(out.style_mean, ramp)  # gradient reversal inside
        terms["style_adversary"] = F.cross_entropy(logits, label)
        loss = loss + cfg.style_adversary_weight * terms["style_adversary"]
    if cfg.cross_weight > 0:
        # Content of each drawing with the style of the next drawing of its group -> that next drawing.
        style = out.style.view(-1, M, cfg.style_dim).roll(1, dims=1).reshape(-1, cfg.style_dim)  # (B, Ds)
        target = x.view(-1, M, *x.shape[1:]).roll(1, dims=1).reshape(x.shape)
        terms["cross"] = bernoulli_nll(model.decode_logits(out.drawing_content_mean, style), target)
        loss = loss + cfg.cross_weight * terms["cross"]

    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in parts.optimizer.param_groups for p in group["params"] if p.grad is not None]
    terms["grad_norm"] = torch.nn.utils.get_total_norm(grads)
    parts.optimizer.step()

    for _ in range(cfg.disc_steps if parts.discriminators else 0):
        terms["disc"] = discriminator_step(parts, cfg, out)
    terms["loss"] = loss
    return {k: v.detach() for k, v in terms.items()}


def train_step(parts: Parts, cfg: Config, x: torch.Tensor, label: torch.Tensor, ramp: float = 1.0) -> dict:
    """`update`, with the loss terms read back as numbers."""
    return {k: float(v) for k, v in update(parts, cfg, x, label, ramp).items()}


def discriminator_step(parts: Parts, cfg: Config, out) -> torch.Tensor:
    """Update each discriminator on prior samples vs the encoder's codes (detached: the encoder
    is not trained here). Returns the summed discriminator loss."""
    total = 0.0
    for part, disc in parts.discriminators.items():
        codes = _codes(cfg, out, part)[2].detach()
        prior = torch.randn_like(codes).requires_grad_(True)
        prior_logits = disc(prior)
        loss = discriminator_loss(prior_logits, disc(codes), cfg.disc_label_smoothing)
        if cfg.disc_grad_penalty > 0:
            loss = loss + cfg.disc_grad_penalty * r1_penalty(prior_logits, prior)
        total = total + loss
    parts.disc_optimizer.zero_grad(set_to_none=True)
    total.backward()
    parts.disc_optimizer.step()
    return total.detach()


@torch.no_grad()
def validate(model: StructuredVAE, images: torch.Tensor, batch: int = 512) -> dict:
    """Per-image reconstruction NLL (posterior means decoded) and KL of each part, on held-out drawers."""
    model.eval()
    sums = {"val_recon": 0.0, "val_kl_content": 0.0, "val_kl_style": 0.0}
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        q = model.posterior(x)
        logits = model.decode_logits(q.content_mean, q.style_mean)
        sums["val_recon"] += float(bernoulli_nll(logits, x)) * len(x)
        sums["val_kl_content"] += float(gaussian_kl(q.content_mean, q.content_logvar).sum())
        sums["val_kl_style"] += float(gaussian_kl(q.style_mean, q.style_logvar).sum())
    model.train()
    return {k: v / len(images) for k, v in sums.items()}


def batches(cfg: Config, labels: np.ndarray, epoch: int):
    """Index arrays of one epoch: G characters x M drawings when grouped, else shuffled batches."""
    if cfg.group_size > 1:
        sampler = omni_data.GroupBatchSampler(labels, cfg.groups, cfg.group_size, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return [np.asarray(b) for b in sampler]
    order = np.random.default_rng((cfg.seed, epoch)).permutation(len(labels))
    return [order[i : i + cfg.batch_size] for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]


def rotate_as_new_characters(x: torch.Tensor, label: torch.Tensor, group_size: int):
    """Turn each group of drawings by a random multiple of 90 degrees and count each turn as a
    new character (label * 4 + turns), which quadruples the training characters as in
    Vinyals et al. 2016 ("Matching Networks for One Shot Learning", section 4.1.1).
    x: (B, 1, S, S), label: (B,); a group is `group_size` consecutive rows (1: every row)."""
    turns = torch.randint(0, 4, (len(x) // group_size,), device=x.device).repeat_interleave(group_size)  # (B,)
    x = x.clone()
    for k in (1, 2, 3):
        rows = turns == k
        x[rows] = torch.rot90(x[rows], k, dims=(2, 3))
    return x, label * 4 + turns


def lr_schedule(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int, done_steps: int = 0):
    """Cosine decay of the learning rate from lr to lr * lr_min_ratio over `total_steps`, stepped
    once per batch ("SGDR", Loshchilov & Hutter 2017, without restarts).

    done_steps > 0 resumes it: the next step gets exactly the rate an uninterrupted run would use.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr  # the rate the factor scales, also when resuming

    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return cfg.lr_min_ratio + 0.5 * (1 - cfg.lr_min_ratio) * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


class EpochTotals:
    """Sums of the loss terms over an epoch, kept on the device so that a step waits for nothing,
    with the first step at which a sum stopped being finite (a loss term or the gradient norm went
    NaN or infinite) and which sums did. `means` reads them once, at the end of the epoch."""

    def __init__(self):
        self.names, self.steps = [], 0

    def add(self, step: int, terms: dict) -> None:
        values = torch.stack(list(terms.values()))  # (T,) one per loss term
        if not self.steps:
            self.names = list(terms)
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.tensor(-1, device=values.device)
            self.bad_sums = self.sums
        self.sums = self.sums + values
        self.steps += 1
        went_bad = (self.first_bad < 0) & ~torch.isfinite(self.sums).all()
        self.first_bad = torch.where(went_bad, step, self.first_bad)
        self.bad_sums = torch.where(went_bad, self.sums, self.bad_sums)

    def means(self, epoch: int) -> dict:
        """{term: mean over the epoch's steps}; TrainingError naming the epoch (counted from 1),
        step and term when a value was not finite."""
        if not self.steps:
            return {}
        step = int(self.first_bad)  # waits for the device, once per epoch
        if step >= 0:
            bad = {n: v for n, v in zip(self.names, self.bad_sums.tolist()) if not math.isfinite(v)}
            terms = [n for n in bad if n not in ("loss", "grad_norm")]  # the terms that broke, not their sum
            if len(terms) > 1:
                what = f"the loss terms {', '.join(terms[:-1])} and {terms[-1]} are"
            elif terms:
                what = f"the loss term {terms[0]} is"
            else:
                what = "the gradient norm is" if "grad_norm" in bad else "the total loss is"
            value = bad[(terms or list(bad))[0]]
            raise TrainingError(f"training diverged at epoch {epoch}, step {step + 1} of {self.steps}: {what} "
                                f"{value}; {_kept(epoch)}")
        return dict(zip(self.names, (self.sums / self.steps).tolist()))


def _kept(epoch: int) -> str:
    """What a run folder keeps when epoch `epoch` (counted from 1) fails."""
    if epoch == 1:
        return "nothing was saved: the run stopped before its first checkpoint (a lower lr may help)"
    return f"epoch {epoch} was not saved and the run folder keeps its checkpoint of epoch {epoch - 1} (a lower lr may help)"


def train_epoch(parts: Parts, cfg: Config, images: torch.Tensor, label: torch.Tensor, plan: list, epoch: int,
                schedule, progress: bool) -> dict:
    """One pass over `plan` (index arrays of the batches); returns the mean of each loss term.
    images: (N, 1, S, S) and label: (N,) on the training device; `epoch` counts from 0."""
    totals = EpochTotals()
    bar = tqdm(plan, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for i, idx in enumerate(bar):
        done = epoch + i / len(plan)
        ramp = min(1.0, done / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        idx = torch.as_tensor(idx, device=label.device)
        x, y = images[idx], label[idx]
        if cfg.rotations:
            x, y = rotate_as_new_characters(x, y, cfg.group_size)
        terms = update(parts, cfg, x, y, ramp)
        schedule.step()
        totals.add(i, terms)
        if progress and i % SHOW_EVERY == 0:
            bar.set_postfix({k: f"{float(v):.3g}" for k, v in terms.items() if k in SHOWN})
    return totals.means(epoch + 1)


def train(
    cfg: Config,
    run_dir,
    data_dir=None,
    cache_dir=None,
    resume: bool = False,
    progress: bool = True,
    dataset: omni_data.Omniglot | None = None,
    epochs: int | None = None,
) -> Path:
    """Train a model into run_dir, checkpointing every epoch (see rundir for the files).

    With resume=True the run's own config is used and training continues from the last
    checkpoint; a run that has finished its epochs is left as it is. A folder stopped before its
    first checkpoint starts again either way. `epochs` sets a new total (written to the config).
    `dataset` replaces the background set (tests use tiny data). When data_dir is an image folder
    (`data.is_image_folder`), a new run trains on it instead, with cfg.data set to "folder"; its
    held-out classes (cfg.test_classes) never enter training. Raises TrainingError, keeping the
    last checkpoint, when a loss or gradient stops being finite.
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = rundir.read_config(run_dir)
    elif rundir.is_trained(run_dir):
        raise ConfigError(f"{run_dir} already holds a trained run; use --resume or another --out")
    checkpoint = rundir.resume(run_dir)  # None for a new run, or one stopped before its first checkpoint
    start = checkpoint.epoch if checkpoint else 0
    if epochs is not None and epochs != cfg.epochs:
        if epochs < start:
            raise ConfigError(f"epochs={epochs} is fewer than the {start} epochs {run_dir} has finished")
        cfg = dataclasses.replace(cfg, epochs=epochs)
        cfg.validate()
    if not resume and dataset is None and cfg.data == "omniglot" and omni_data.is_image_folder(data_dir):
        cfg = dataclasses.replace(cfg, data="folder")  # recorded, so that evaluate scores its held-out classes
        cfg.validate()
    rundir.write_config(run_dir, cfg)
    if start >= cfg.epochs:  # nothing left to train; the run info keeps the timing of the training that ran
        if rundir.read_run_info(run_dir) is None:  # stopped after its last checkpoint: the log holds the timing
            seconds = sum(record.get("seconds", 0.0) for record in rundir.read_log(run_dir))
            write_run_info(run_dir, resolve_device(cfg.device), seconds)
        return run_dir
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    if dataset is None and cfg.data == "folder":
        dataset = omni_data.load_folder(data_dir, cfg.image_size, cache_dir, cfg.group_size, progress=progress)
    if dataset is None:
        dataset = omni_data.load_set("background", cfg.image_size, data_dir, cache_dir, progress=progress)
    if cfg.val_holdout:  # the validation alphabets never enter training
        dataset = omni_data.split_by_alphabet(dataset, cfg.val_alphabets)[0]
    if cfg.data == "folder":  # no drawers: validated on the held-out classes, which evaluate scores
        train_set, val_set = omni_data.split_by_class(dataset, cfg.test_classes)
    else:
        train_set, val_set = omni_data.split_by_drawer(dataset, cfg.val_drawers)
    classes, label = np.unique(train_set.character, return_inverse=True)
    images, label = train_set.tensors().to(device), torch.as_tensor(label, device=device)  # (N, 1, S, S), (N,)
    val_images = val_set.tensors().to(device)

    parts = build_parts(cfg, len(classes) * (4 if cfg.rotations else 1), device)
    if checkpoint:
        restore(parts, checkpoint)
        checkpoint = None  # the modules and optimisers hold it now
    steps_per_epoch = len(batches(cfg, train_set.character, 0))  # the same every epoch
    schedule = lr_schedule(cfg, parts.optimizer, cfg.epochs * steps_per_epoch, start * steps_per_epoch)
    started = time.time()
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # per-epoch seed: a resumed run repeats the same noise
        epoch_start = time.time()
        means = train_epoch(parts, cfg, images, label, batches(cfg, train_set.character, epoch), epoch, schedule, progress)
        record = {"epoch": epoch + 1, "seconds": round(time.time() - epoch_start, 2), **means}
        record.update(validate(parts.model, val_images))
        save_checkpoint(run_dir, parts, record)
        if progress:
            shown = ", ".join(f"{k} {record[k]:.2f}" for k in ("recon", "val_recon", "contrastive") if k in record)
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: {shown} ({record['seconds']:.0f}s)")
    write_run_info(run_dir, device, time.time() - started, len(images) * (cfg.epochs - start))
    return run_dir


def save_checkpoint(run_dir: Path, parts: Parts, record: dict) -> None:
    """Every module and optimiser with the epoch's log record, as one checkpoint (rundir.save).
    Refuses, with TrainingError, a state that is not finite: the last checkpoint stays."""
    checkpoint = rundir.Checkpoint(
        epoch=record["epoch"],
        model=parts.model.state_dict(),
        modules={name: m.state_dict() for name, m in parts.helpers().items()},
        optimizers={name: opt.state_dict() for name, opt in parts.optimizers().items()},
        record=record,
    )
    try:
        rundir.save(run_dir, checkpoint)
    except rundir.NonFiniteError as err:
        raise TrainingError(f"training diverged in epoch {record['epoch']}: {err}; {_kept(record['epoch'])}") from None


def restore(parts: Parts, checkpoint: rundir.Checkpoint) -> None:
    """Load a checkpoint into every module and optimiser."""
    rundir.load_weights(parts.model, checkpoint.model, "the checkpoint")
    try:
        for name, module in parts.helpers().items():
            module.load_state_dict(checkpoint.modules[name])
        for name, opt in parts.optimizers().items():
            opt.load_state_dict(checkpoint.optimizers[name])
    except (KeyError, RuntimeError, ValueError) as err:
        raise ConfigError(f"the checkpoint does not fit its {rundir.CONFIG_FILE}: "
                          f"{' '.join(str(err).split())}") from None


def load_state(run_dir, parts: Parts, device="cpu") -> int:
    """Restore every module and optimiser of a run from its checkpoint (read onto `device`);
    returns the number of finished epochs, 0 when it has no checkpoint yet."""
    checkpoint = rundir.resume(run_dir, device)
    if checkpoint is None:
        return 0
    restore(parts, checkpoint)
    return checkpoint.epoch


def write_run_info(run_dir: Path, device: torch.device, seconds: float, images: int | None = None) -> None:
    """Where and how long the (last part of the) training ran, for the report; the throughput
    only when the images trained on are counted (`images`)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info = {
        "device": str(device),
        "hardware": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
    }
    if images is not None:
        info["images_per_second"] = round(images / max(seconds, 1e-9), 1)
    rundir.write_run_info(run_dir, info)


def cpu_name() -> str:
    """The processor's model name and core count, as the OS reports it."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
