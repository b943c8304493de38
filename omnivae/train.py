"""Training: one loop and small helpers; what it writes into the run folder is rundir's business."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as omni_data
from . import augment, distributed, rundir
from .config import Config, ConfigError
from .losses import (
    REGULARIZERS,
    bernoulli_nll,
    discriminator_loss,
    gaussian_kl,
    generator_loss,
    label_dependence,
    prototypical,
    r1_penalty,
    sampled_kl,
    style_cycle,
    supervised_contrastive,
)
from .model import Discriminator, ModelConfig, Noise, ProjectionHead, StructuredVAE, StyleAdversary
from .rundir import finished_epochs  # noqa: F401  (importable from here, as before rundir existed)

PARTS = ("content", "style")
SHOWN = ("recon", "content", "style", "contrastive", "proto")  # loss terms on the progress bar
SHOW_EVERY = 50  # steps between progress-bar updates (each reads numbers off the device)


class TrainingError(RuntimeError):
    """Training cannot go on: a loss term or the gradient stopped being finite. Nothing of the
    epoch was written; the run folder keeps its last checkpoint."""


@dataclass
class Parts:
    """Everything that trains: the VAE, optional helpers, and one optimiser per player."""

    model: StructuredVAE
    style_adversary: StyleAdversary | None = None
    projection: ProjectionHead | None = None  # the contrastive term's head (contrastive_head > 0)
    discriminators: dict = field(default_factory=dict)  # part -> Discriminator
    optimizer: torch.optim.Optimizer | None = None  # VAE (and style adversary, through its reversal layer)
    disc_optimizer: torch.optim.Optimizer | None = None
    ema: StructuredVAE | None = None  # the moving average of the VAE's weights (cfg.ema_decay > 0): the run's model
    process: distributed.Process = field(default_factory=distributed.Process)  # one of torchrun's, or the only one
    wrapped: dict = field(default_factory=dict)  # "model", "style_adversary" -> DDP and/or torch.compile of it (`wrap`)

    def run(self, name: str) -> torch.nn.Module:
        """What a training step calls for the module `name`: its wrapper, else the module itself."""
        return self.wrapped[name] if name in self.wrapped else getattr(self, name)

    def helpers(self) -> dict[str, torch.nn.Module]:
        """Every trained module but the VAE: the style adversary, the contrastive head and the discriminators."""
        found = {}
        if self.style_adversary is not None:
            found["style_adversary"] = self.style_adversary
        if self.projection is not None:
            found["projection"] = self.projection
        found.update({f"discriminator_{p}": d for p, d in self.discriminators.items()})
        if self.ema is not None:  # not trained itself, but checkpointed with them
            found["ema"] = self.ema
        return found

    def result(self) -> StructuredVAE:
        """The model a run keeps: the weights' moving average when there is one, else the VAE."""
        return self.ema if self.ema is not None else self.model

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
    if cfg.ema_decay > 0:
        parts.ema = copy.deepcopy(model).requires_grad_(False)
    # On a GPU the optimiser updates every parameter in one fused kernel (the same update rule, fewer
    # launches: a small network's step is bound by launches there); elsewhere torch's default.
    fused = True if device.type == "cuda" else None
    params = list(model.parameters())
    if cfg.style_adversary_weight > 0:
        parts.style_adversary = StyleAdversary(cfg.style_dim, classes, cfg.hidden).to(device)
        params += list(parts.style_adversary.parameters())
    if cfg.contrastive_head > 0 and cfg.contrastive_weight > 0:
        parts.projection = ProjectionHead(cfg.content_dim, cfg.contrastive_head).to(device)
        params += list(parts.projection.parameters())
    if cfg.weight_decay > 0:  # decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization")
        # The content prior's components never decay (decay would pull them toward N(0, 1) for no reason).
        kept = {id(p) for p in model.prior_parameters()}
        kept |= set() if cfg.decay_decoder else {id(p) for p in model.decoder_parameters()}
        groups = [{"params": [p for p in params if id(p) not in kept]},  # in a fixed order: checkpoints index by it
                  {"params": [p for p in params if id(p) in kept], "weight_decay": 0.0}]
        parts.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                            fused=fused)
    else:
        parts.optimizer = torch.optim.Adam(params, lr=cfg.lr, fused=fused)
    for part in PARTS:
        if getattr(cfg, f"{part}_regularizer") == "adversarial":
            dim = cfg.content_dim if part == "content" else cfg.style_dim
            parts.discriminators[part] = Discriminator(dim, cfg.disc_hidden).to(device)
    if parts.discriminators:
        disc_params = [p for d in parts.discriminators.values() for p in d.parameters()]
        parts.disc_optimizer = torch.optim.Adam(disc_params, lr=cfg.disc_lr, betas=(0.5, 0.9))
    return parts


def wrap(parts: Parts, cfg: Config, process: distributed.Process) -> None:
    """Prepare the modules for training steps: with more than one process their batch norms use the
    global batch; under torchrun the VAE and the style adversary are wrapped in DDP (the
    discriminators average their gradients by hand, see distributed); cfg.compile compiles the VAE.
    State dicts and checkpoints always come from the modules themselves."""
    parts.process = process
    if process.world_size > 1:
        distributed.global_batch_norm(parts.model)
    for name in ("model", "style_adversary", "projection"):
        module = getattr(parts, name)
        if module is not None and process.launched:
            ids = [process.device.index] if process.device.type == "cuda" else None
            # Buffers need no broadcast before each forward: global batch norm keeps the same running statistics everywhere.
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_buffer_sync())
        if module is not None and name == "model" and cfg.compile:
            module = torch.compile(module, mode=cfg.compile_mode)
        if module is not getattr(parts, name):
            parts.wrapped[name] = module


def _codes(cfg: Config, out, part: str):
    """(mean, logvar, codes matched to the prior) of one part; one row per group for grouped content."""
    mean, logvar = getattr(out, f"{part}_mean"), getattr(out, f"{part}_logvar")
    code = getattr(out, part)
    if part == "content" and cfg.group_size > 1:  # rows repeat within a group: keep one
        mean, logvar, code = mean[:: cfg.group_size], logvar[:: cfg.group_size], code[:: cfg.group_size]
    return mean, logvar, (mean if cfg.match_codes == "mean" else code)


def update(parts: Parts, cfg: Config, x: torch.Tensor, label: torch.Tensor, ramp: float = 1.0,
           target: torch.Tensor | None = None) -> dict:
    """One update of the VAE (and its helpers), then of the discriminators. Returns the loss terms
    and the VAE's gradient norm as 0-d tensors left on the device: reading them waits for the
    device, so the training loop does it once per epoch (`train_step` reads them at once).

    x: (B, 1, S, S) in [0, 1]; label: (B,) training-character index, used only by the
    content-level terms; target: (B, 1, S, S) the images the decoder models, when they are not x
    (binarize_encoder=false: a binary draw of x). With cfg.group_size > 1 the batch is G groups of M drawings. Under
    torchrun these are this process's rows of the global batch, and every random draw is made
    for the global batch (see distributed).
    """
    M, process = cfg.group_size, parts.process
    with _precision(cfg.precision, x.device):
        noise = Noise(process.randn(len(x) // M, cfg.content_dim, x.device), process.randn(len(x), cfg.style_dim, x.device))
        keep = None
        if cfg.detail_dim:  # drawn only then, so runs without a detail code keep their random stream
            noise = noise._replace(detail=process.randn(len(x), cfg.detail_dim, x.device))
            keep = (process.rand(len(x), 1, x.device)[:, 0] >= cfg.detail_drop).float()  # (B,) 1: decoded with its detail code
        out = parts.run("model")(x, M, noise, target, keep)
        loss, terms = _loss(parts, cfg, x if target is None else target, label, ramp, out)

    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in parts.optimizer.param_groups for p in group["params"] if p.grad is not None]
    terms["grad_norm"] = torch.nn.utils.get_total_norm(grads)
    parts.optimizer.step()
    if parts.ema is not None:
        average_weights(parts.ema, parts.model, cfg.ema_decay)

    for _ in range(cfg.disc_steps if parts.discriminators else 0):
        terms["disc"] = discriminator_step(parts, cfg, out)
    terms["loss"] = loss
    return {k: v.detach().float() for k, v in terms.items()}


def average_weights(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for every parameter and floating-point
    buffer (the batch norms' running statistics); integer buffers are copied. An exponential moving
    average of the weights (Polyak and Juditsky 1992; as the mean teacher of Tarvainen and Valpola
    2017 keeps it): it smooths the last steps' noise out of the weights at no cost to training."""
    with torch.no_grad():
        pairs = list(zip(average.state_dict().values(), model.state_dict().values()))
        floats = [(a, m) for a, m in pairs if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1.0 - decay)
        for a, m in pairs:
            if not a.is_floating_point():
                a.copy_(m)


def refresh_batch_norm(model: StructuredVAE, images: torch.Tensor, batch: int = 128) -> None:
    """Recompute every batch norm's running statistics of `model` from scratch: the mean over
    batches of `images` (a fixed random order) of each batch's statistics, the encoder reading the
    drawings and the decoder their posterior means. Averaged weights need it: the average of the
    statistics is not the statistics of the averaged weights (as for stochastic weight averaging,
    Izmailov et al. 2018; `torch.optim.swa_utils.update_bn`). On the validation alphabets an
    average over about 500 steps (ema_decay=0.998) scored 20-way 0.65 with averaged statistics and
    0.88 with recomputed ones (README, "Encoder depth, learning rate and weight averaging")."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    model.train()
    with torch.no_grad(), batch_norm_momentum(model, None) as norms:  # None: a cumulative average over the batches
        for m in norms:
            m.reset_running_stats()
        for i in range(0, len(images), batch):
            x = images[order[i : i + batch]]
            q = model.posterior(x)
            model.decode_logits(q.content_mean, q.style_mean, x, q.detail_mean)


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively here: a CUDA GPU that supports it, or a CPU whose
    oneDNN kernels have bf16 (AVX-512 and later; without it autocast would emulate it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def auto_precision(device: torch.device) -> str:
    """What precision=auto trains in: bf16 on a CPU with native bf16 (1.7x the float32 step on 2
    cores), float32 elsewhere (on a GPU this small network's step is bound by kernel launches, and
    autocast's casts made it 0.8x float32's speed on an H200: bench/results/gpu_h200.txt)."""
    return "bf16" if device.type == "cpu" and bf16_supported(device) else "fp32"


def resolve_precision(cfg: Config, device: torch.device) -> Config:
    """cfg with precision=auto replaced by what `auto_precision` picks on that device."""
    return dataclasses.replace(cfg, precision=auto_precision(device)) if cfg.precision == "auto" else cfg


def _precision(precision: str, device: torch.device):
    """bf16 autocast for precision "bf16" (no gradient scaling needed: bf16 has float32's range);
    "auto" as `auto_precision` resolves it on that device."""
    if precision == "auto":
        precision = auto_precision(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(parts: Parts, cfg: Config, x: torch.Tensor, label: torch.Tensor, ramp: float, out) -> tuple:
    """The VAE's total loss and its terms, from the forward pass `out`; x: the images the decoder models."""
    M, process = cfg.group_size, parts.process
    terms = {"recon": bernoulli_nll(out.logits, x)}
    loss = terms["recon"]
    if cfg.base_weight > 0:  # the codes' own drawing, before the autoregressive head
        terms["base"] = bernoulli_nll(out.base_logits, x)
        loss = loss + cfg.base_weight * terms["base"]
    for part in PARTS:
        name, weight = getattr(cfg, f"{part}_regularizer"), getattr(cfg, f"{part}_weight")
        mean, logvar, codes = _codes(cfg, out, part)
        if name == "adversarial":
            terms[part] = generator_loss(parts.discriminators[part](codes))
        elif part == "content" and cfg.prior_components:
            # The learned mixture prior has no closed-form KL: a one-sample estimate at the sampled
            # codes (one per group), counted once per group as the closed form is (see losses).
            z = out.content[::M]  # (G, Dc)
            kl = sampled_kl(z, mean, logvar, parts.model.content_log_prior)  # (G,)
            terms[part] = kl.mean() / M
            terms["kl_content"] = kl.mean().detach()
        else:
            # Grouped content has one posterior per M drawings: its KL counts once per group (see losses).
            rows_per = M if part == "content" else 1
            prior = process.randn(*codes.shape, codes.device) if name == "mmd" else None  # drawn as the global batch's
            options = dict(kernel=cfg.mmd_kernel, sample_kl=cfg.sample_kl, group_size=rows_per, prior=prior)
            if name == "kl" and part == "style":
                options["free_bits"] = cfg.style_free_bits  # 0: the plain KL
            terms[part] = REGULARIZERS[name](mean, logvar, codes, **options)
        if f"kl_{part}" not in terms:  # per posterior (one per group), logged whatever the regulariser
            terms[f"kl_{part}"] = gaussian_kl(mean, logvar).mean().detach()
        loss = loss + ramp * weight * terms[part]
    if cfg.detail_dim:
        # KL of the detail code, paid by the drawings decoded with it: the others were decoded with
        # its prior mean, so for them it carries nothing (their bound is that of the two codes alone).
        kl = gaussian_kl(out.detail_mean, out.detail_logvar)  # (B,)
        terms["detail"] = (kl * out.detail_keep.to(kl.dtype)).mean()
        terms["kl_detail"] = kl.mean().detach()
        loss = loss + ramp * cfg.detail_weight * terms["detail"]
    if cfg.contrastive_weight > 0:
        embedding = out.drawing_content_mean if parts.projection is None else parts.run("projection")(out.drawing_content_mean)
        terms["contrastive"] = supervised_contrastive(embedding, label, cfg.temperature)
        loss = loss + cfg.contrastive_weight * terms["contrastive"]
    if cfg.proto_weight > 0:
        # Each drawing against the prototypes of its group (itself left out) and of the other groups.
        terms["proto"] = prototypical(out.drawing_content_mean, M, cfg.proto_temperature)
        loss = loss + cfg.proto_weight * terms["proto"]
    if parts.style_adversary is not None:
        logits = parts.run("style_adversary")(out.style_mean, ramp)  # gradient reversal inside
        terms["style_adversary"] = F.cross_entropy(logits, label)
        loss = loss + cfg.style_adversary_weight * terms["style_adversary"]
    if cfg.style_dependence_weight > 0:
        # Style means that gather by character, beyond what the batch's style means share anyway.
        terms["style_dependence"] = label_dependence(out.style_mean, label)
        loss = loss + cfg.style_dependence_weight * terms["style_dependence"]
    if cfg.cross_weight > 0:
        # Content of each drawing with the style of the next drawing of its group -> that next drawing.
        style = out.style.view(-1, M, cfg.style_dim).roll(1, dims=1).reshape(-1, cfg.style_dim)  # (B, Ds)
        target = x.view(-1, M, *x.shape[1:]).roll(1, dims=1).reshape(x.shape)
        terms["cross"] = bernoulli_nll(parts.model.decode_logits(out.drawing_content_mean, style, target), target)
        loss = loss + cfg.cross_weight * terms["cross"]
    if cfg.transfer_weight > 0:
        # The content code the reconstruction decodes (the group's, shared by its drawings) with the
        # style of the same-place drawing of the paired group: another character, drawn with the same
        # distortion (augment.paired). Style that carries the character hurts here.
        style = out.style.view(-1, 2, M, cfg.style_dim).flip(1).reshape(-1, cfg.style_dim)  # (B, Ds)
        terms["transfer"] = bernoulli_nll(parts.model.decode_logits(out.content, style, x), x)
        loss = loss + cfg.transfer_weight * terms["transfer"]
    if cfg.cycle_weight > 0:
        # Reverse cycle: each group's content code (held fixed) drawn with a fresh prior style, whose
        # style the encoder must read back. The same style comes with every character, so a style
        # encoder that reads the character is wrong here; and the decoder must draw the style visibly.
        content = out.content[::M].detach()  # (G, Dc): one per group (per drawing when M = 1)
        style = process.randn(len(content), cfg.style_dim, x.device)  # (G, Ds)
        with running_statistics_kept(parts.model):
            drawn = torch.sigmoid(parts.model.decode_logits(content, style))  # (G, 1, S, S) probability maps
            terms["cycle"] = style_cycle(parts.model.posterior(drawn).style_mean, style)
        loss = loss + cfg.cycle_weight * terms["cycle"]
    return loss, terms


@contextlib.contextmanager
def batch_norm_momentum(module: torch.nn.Module, momentum: float | None):
    """Every batch norm inside `module` with this momentum for the duration (None: a cumulative
    average of the batches' statistics), as it was afterwards; yields the batch norms."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = momentum
    try:
        yield norms
    finally:
        for m, kept in zip(norms, saved):
            m.momentum = kept


def running_statistics_kept(module: torch.nn.Module):
    """Batch norm inside normalises with the batch's own statistics as in training, but its running
    statistics (what evaluation normalises with) stay as they are: momentum 0 for the duration. For
    passes over images that are not data, such as decodings."""
    return batch_norm_momentum(module, 0.0)


def train_step(parts: Parts, cfg: Config, x: torch.Tensor, label: torch.Tensor, ramp: float = 1.0) -> dict:
    """`update`, with the loss terms read back as numbers."""
    return {k: float(v) for k, v in update(parts, cfg, x, label, ramp).items()}


def discriminator_step(parts: Parts, cfg: Config, out) -> torch.Tensor:
    """Update each discriminator on prior samples vs the encoder's codes (detached: the encoder
    is not trained here). Returns the summed discriminator loss."""
    total = 0.0
    for part, disc in parts.discriminators.items():
        codes = _codes(cfg, out, part)[2].detach().float()
        prior = parts.process.randn(*codes.shape, codes.device).requires_grad_(True)
        prior_logits = disc(prior)
        loss = discriminator_loss(prior_logits, disc(codes), cfg.disc_label_smoothing)
        if cfg.disc_grad_penalty > 0:
            loss = loss + cfg.disc_grad_penalty * r1_penalty(prior_logits, prior)
        total = total + loss
    parts.disc_optimizer.zero_grad(set_to_none=True)
    total.backward()
    distributed.average_gradients([p for d in parts.discriminators.values() for p in d.parameters()], parts.process)
    parts.disc_optimizer.step()
    return total.detach()


@torch.no_grad()
def validate(model: StructuredVAE, images: torch.Tensor, batch: int = 512, precision: str = "fp32") -> dict:
    """Per-image reconstruction NLL (posterior means decoded; an autoregressive decoder reads the
    images themselves, teacher forcing) and KL of each part, on held-out drawers. The networks run
    in the training step's `precision` (bf16: about 2.7x faster on a CPU with native bf16, numbers
    within about 0.1% of float32's), the NLL and KLs in float32."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=images.device)  # summed on the device, read once
    generator = torch.Generator().manual_seed(0)  # a learned prior's sampled KL: the same draws every epoch
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        with _precision(precision, x.device):
            q = model.posterior(x)
            logits = model.decode_logits(q.content_mean, q.style_mean, x, q.detail_mean)
        q, logits = type(q)(*(None if t is None else t.float() for t in q)), logits.float()
        sums += torch.stack([bernoulli_nll(logits, x) * len(x), model.content_kl(q.content_mean, q.content_logvar, generator).sum(),
                             gaussian_kl(q.style_mean, q.style_logvar).sum()]).double()
    model.train()
    return {k: v / len(images) for k, v in zip(("val_recon", "val_kl_content", "val_kl_style"), sums.tolist())}


def batches(cfg: Config, labels: np.ndarray, epoch: int):
    """Index arrays of one epoch: G characters x M drawings when grouped, else shuffled batches."""
    if cfg.group_size > 1:
        sampler = omni_data.GroupBatchSampler(labels, cfg.groups, cfg.group_size, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return [np.asarray(b) for b in sampler]
    order = np.random.default_rng((cfg.seed, epoch)).permutation(len(labels))
    return [order[i : i + cfg.batch_size] for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]


def epoch_plan(cfg: Config, labels: np.ndarray, epoch: int, process: distributed.Process) -> torch.Tensor:
    """The epoch's batches as one (steps, rows) index tensor of this process's rows of each batch
    (all of it for a single process), on the training device: made once per epoch and copied in
    one go, asynchronously from pinned memory on CUDA, so that a step copies nothing from the host."""
    found = batches(cfg, labels, epoch)
    rows = cfg.groups * cfg.group_size if cfg.group_size > 1 else cfg.batch_size  # images per batch
    plan = torch.from_numpy(np.stack(found)) if found else torch.zeros(0, rows, dtype=torch.int64)  # (steps, B)
    plan = process.share(plan, dim=1).contiguous()  # (steps, B / world): whole groups
    if process.device.type == "cuda":
        return plan.pin_memory().to(process.device, non_blocking=True)
    return plan.to(process.device)


def new_character_kinds(cfg: Config) -> int:
    """How many training characters each drawn character becomes: 4 turns with rotations, times
    2 with reflections (the mirror image of each turn)."""
    return (4 if cfg.rotations else 1) * (2 if cfg.reflections else 1)


def rotate_as_new_characters(x: torch.Tensor, label: torch.Tensor, group_size: int, turns: torch.Tensor | None = None,
                             kinds: int = 4):
    """Turn each group of drawings by a random multiple of 90 degrees and count each turn as a
    new character (label * kinds + turn), which multiplies the training characters by `kinds` (4:
    the quarter turns of Vinyals et al. 2016, "Matching Networks for One Shot Learning", section
    4.1.1). kinds = 8 also mirrors (left to right) the turns 4-7 of the turns 0-3; kinds = 2 only
    mirrors (turn 1); kinds = 1 changes nothing.
    x: (B, 1, S, S), label: (B,); a group is `group_size` consecutive rows (1: every row).
    turns: (B / group_size,) in [0, kinds) per group, drawn here when None."""
    if turns is None:
        turns = torch.randint(0, kinds, (len(x) // group_size,), device=x.device)
    turns = turns.repeat_interleave(group_size)  # (B,)
    # Every drawing transformed every way, then each one's own transform picked: a gather, where
    # selecting the rows of each kind by a boolean mask would wait for the device to count them.
    every = torch.stack(augment.turned_views(x, kinds), dim=1)  # (B, kinds, 1, S, S)
    return every[torch.arange(len(x), device=x.device), turns], label * kinds + turns


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

    def __init__(self, process: distributed.Process | None = None):
        self.names, self.steps = [], 0
        self.process = process or distributed.Process()

    def add(self, step: int, terms: dict) -> None:
        values = torch.stack(list(terms.values()))  # (T,) one per loss term
        if not self.steps:
            self.names = list(terms)
            self.sums = torch.zeros_like(values)
            self.first_bad = torch.full((), -1, device=values.device)  # not torch.tensor: a copy from the host
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
        # Every process finds the same bad step (they share gradients); the sums are averaged over them.
        return dict(zip(self.names, (self.process.mean(self.sums) / self.steps).tolist()))


def no_buffer_sync() -> dict:
    """DistributedDataParallel's option that skips the buffers' broadcast before each forward:
    `forward_sync_buffers=False` where torch has it (2.13), else its older name `broadcast_buffers`
    (deprecated in 2.13; CUDA images often carry an older torch)."""
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _kept(epoch: int) -> str:
    """What a run folder keeps when epoch `epoch` (counted from 1) fails."""
    if epoch == 1:
        return "nothing was saved: the run stopped before its first checkpoint (a lower lr may help)"
    return f"epoch {epoch} was not saved and the run folder keeps its checkpoint of epoch {epoch - 1} (a lower lr may help)"


def train_epoch(parts: Parts, cfg: Config, images: torch.Tensor, label: torch.Tensor, plan: torch.Tensor, epoch: int,
                schedule, progress: bool) -> dict:
    """One pass over `plan` ((steps, B) indices on the device, see `epoch_plan`); returns the mean of
    each loss term. images: (N, 1, S, S) and label: (N,) on the training device; `epoch` counts from 0."""
    totals = EpochTotals(parts.process)
    kinds = new_character_kinds(cfg)
    bar = tqdm(plan, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for i, idx in enumerate(bar):  # idx: (B,) on the device already
        done = epoch + i / len(plan)
        ramp = min(1.0, done / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        x, y = images[idx], label[idx]
        if kinds > 1:  # turned and mirrored characters
            turns = parts.process.randint(kinds, len(idx) // cfg.group_size, idx.device)  # drawn as the global batch's
            x, y = rotate_as_new_characters(x, y, cfg.group_size, turns, kinds)
        if cfg.augment > 0:  # each drawing its own distortion (shared with its pair's for transfer_weight)
            amounts = parts.process.rand(len(x), 6, x.device)
            if cfg.transfer_weight > 0:
                amounts = augment.paired(amounts, cfg.group_size)
            x = augment.distort(x, amounts, cfg.augment)
        target = None
        if cfg.binarize or cfg.encoder_binary > 0:
            binary = augment.binarize(x, parts.process.rand(len(x), x[0].numel(), x.device))
            if cfg.binarize:
                x, target = (binary, None) if cfg.binarize_encoder else (x, binary)
            else:  # a share of the drawings reaches the encoder binarised; the decoder models the grey one
                chosen = parts.process.rand(len(x), 1, x.device).view(-1, 1, 1, 1) < cfg.encoder_binary  # (B, 1, 1, 1)
                x, target = torch.where(chosen, binary, x), x
        terms = update(parts, cfg, x, y, ramp, target)
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
    last checkpoint, when a loss or gradient stops being finite. Under torchrun every process
    calls it and trains its share of each batch; process 0 alone logs and writes the run folder
    (see distributed).
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = rundir.read_config(run_dir)
    elif rundir.is_trained(run_dir):
        raise ConfigError(f"{run_dir} already holds a trained run; use --resume or another --out")
    process = distributed.start(cfg.device)
    try:
        return _train(cfg, run_dir, data_dir, cache_dir, resume, progress and process.master, dataset, epochs, process)
    finally:
        distributed.stop(process)


def _train(cfg: Config, run_dir: Path, data_dir, cache_dir, resume: bool, progress: bool, dataset,
           epochs: int | None, process: distributed.Process) -> Path:
    # Process 0 brings the folder in line with its checkpoint (resume may repair it); the others then read it.
    checkpoint = rundir.resume(run_dir) if process.master else None  # None for a new run, or one stopped before its first checkpoint
    process.barrier()
    if not process.master:
        checkpoint = rundir.read_checkpoint(run_dir)
    start = checkpoint.epoch if checkpoint else 0
    if epochs is not None and epochs != cfg.epochs:
        if epochs < start:
            raise ConfigError(f"epochs={epochs} is fewer than the {start} epochs {run_dir} has finished")
        cfg = dataclasses.replace(cfg, epochs=epochs)
        cfg.validate()
    cfg = resolve_precision(cfg, process.device)  # the config records the precision the run trains in
    if cfg.precision == "bf16" and not bf16_supported(process.device):
        if process.master:
            print(f"omnivae: {cpu_name() if process.device.type == 'cpu' else process.device} has no bfloat16 "
                  f"support; training in fp32 (precision=fp32 is recorded in the run's config)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, precision="fp32")
    if not resume and dataset is None and cfg.data == "omniglot" and omni_data.is_image_folder(data_dir):
        cfg = dataclasses.replace(cfg, data="folder")  # recorded, so that evaluate scores its held-out classes
        cfg.validate()
    distributed.local_batch(cfg, process.world_size)  # each process takes whole groups, or ConfigError
    if process.master:
        rundir.write_config(run_dir, cfg)
    if start >= cfg.epochs:  # nothing left to train; the run info keeps the timing of the training that ran
        if process.master and rundir.read_run_info(run_dir) is None:  # stopped after its last checkpoint: the log holds the timing
            seconds = sum(record.get("seconds", 0.0) for record in rundir.read_log(run_dir))
            write_run_info(run_dir, process.device, seconds, processes=process.world_size)
        return run_dir
    seed_everything(cfg.seed)
    device = process.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    if not process.master:
        process.barrier()  # process 0 loads the data first (it may fetch and decode); the others read its cache
    if dataset is None and cfg.data == "folder":
        dataset = omni_data.load_folder(data_dir, cfg.image_size, cache_dir, cfg.group_size, progress=progress)
    if dataset is None:
        dataset = omni_data.load_set("background", cfg.image_size, data_dir, cache_dir, progress=progress)
    if process.master:
        process.barrier()
    if cfg.val_holdout:  # the validation alphabets never enter training
        dataset = omni_data.split_by_alphabet(dataset, cfg.val_alphabets)[0]
    if cfg.data == "folder":  # no drawers: validated on the held-out classes, which evaluate scores
        train_set, val_set = omni_data.split_by_class(dataset, cfg.test_classes)
    else:
        train_set, val_set = omni_data.split_by_drawer(dataset, cfg.val_drawers)
    classes, label = np.unique(train_set.character, return_inverse=True)
    images, label = train_set.tensors().to(device), torch.as_tensor(label, device=device)  # (N, 1, S, S), (N,)
    val_images = val_set.tensors().to(device)

    parts = build_parts(cfg, len(classes) * new_character_kinds(cfg), device)
    if checkpoint:
        restore(parts, checkpoint)
        checkpoint = None  # the modules and optimisers hold it now
    wrap(parts, cfg, process)
    steps_per_epoch = len(batches(cfg, train_set.character, 0))  # the same every epoch
    schedule = lr_schedule(cfg, parts.optimizer, cfg.epochs * steps_per_epoch, start * steps_per_epoch)
    started = time.time()
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # per-epoch seed: a resumed run repeats the same noise
        epoch_start = time.time()
        plan = epoch_plan(cfg, train_set.character, epoch, process)  # (steps, B) on the device
        means = train_epoch(parts, cfg, images, label, plan, epoch, schedule, progress)
        if parts.ema is not None and epoch == cfg.epochs - 1:
            refresh_batch_norm(parts.ema, images)  # the average's own statistics, before its last checkpoint
        record = {"epoch": epoch + 1, "seconds": round(time.time() - epoch_start, 2), **means}
        if process.master:
            record.update(validate(parts.result(), val_images, precision=cfg.precision))
        save_checkpoint(run_dir, parts, record)
        if progress:
            shown = ", ".join(f"{k} {record[k]:.2f}" for k in ("recon", "val_recon", "contrastive") if k in record)
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: {shown} ({record['seconds']:.0f}s)")
    if process.master:
        write_run_info(run_dir, device, time.time() - started, len(images) * (cfg.epochs - start), process.world_size)
    return run_dir


def save_checkpoint(run_dir: Path, parts: Parts, record: dict) -> None:
    """Every module and optimiser with the epoch's log record, as one checkpoint (rundir.save), by
    process 0. Refuses, with TrainingError, a state that is not finite: the last checkpoint stays
    (every process checks: they hold the same state, so all of them stop)."""
    checkpoint = rundir.Checkpoint(
        epoch=record["epoch"],
        model=parts.model.state_dict(),
        modules={name: m.state_dict() for name, m in parts.helpers().items()},
        optimizers={name: opt.state_dict() for name, opt in parts.optimizers().items()},
        record=record,
    )
    try:
        if parts.process.master:
            rundir.save(run_dir, checkpoint)
        elif bad := rundir.nonfinite(checkpoint.to_dict()):
            raise rundir.NonFiniteError(f"{bad} is not finite")
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


def write_run_info(run_dir: Path, device: torch.device, seconds: float, images: int | None = None,
                   processes: int = 1) -> None:
    """Where and how long the (last part of the) training ran, for the report; the throughput
    only when the images trained on are counted (`images`)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    info = {
        "device": str(device),
        "processes": processes,  # torchrun's WORLD_SIZE; one device each
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
