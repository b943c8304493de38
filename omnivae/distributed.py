"""Many processes, one run: what training needs when `torchrun` starts it (DistributedDataParallel).

    torchrun --nproc_per_node N -m omnivae train --preset default --out runs/default

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `start` then joins the process group (NCCL on GPUs,
each process on the GPU of its LOCAL_RANK; Gloo on the CPU). Without them training is one plain
process and nothing here costs anything. The run is the one a single process trains on the same
global batch:

- every process builds the same epoch plan; each takes an equal, contiguous share of every batch,
  whole groups of drawings (`Process.share`), so the global batch does not depend on N;
- every random draw of a step (quarter turns, reparameterisation noise, prior samples) is made for
  the global batch on every process, which keeps its own rows (`Process.randn`): the random stream
  is the one a single process sees;
- gradients are averaged over the processes (DDP for the VAE and the style adversary,
  `average_gradients` for the discriminators): with losses that are means over the local batch, the
  average is the single-process gradient of the global mean;
- batch norm uses the statistics of the global batch (`GlobalBatchNorm2d`);
- process 0 alone logs, validates and writes the run folder; on resume it brings the folder in
  line with its checkpoint first, then every process reads it.

So per-image terms (reconstruction, KL regularisers, cross-reconstruction, style adversary,
adversarial regularisers) give the single-process update up to floating-point rounding. Three terms
are statistics of a whole batch and are computed per process, over its share: the MMD compares the
share's codes with as many prior samples (an unbiased estimate of the same MMD, noisier as N grows),
the supervised contrastive term contrasts each drawing with the other drawings of its share
only (positives stay complete since groups are never split; negatives are fewer), and the prototypical
term likewise sees only the prototypes of its share's groups. With those on,
N processes train a slightly different objective; `tests/test_distributed.py` bounds the gap.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .model import resolve_device


@dataclass(frozen=True)
class Process:
    """This process's place in the run; the defaults are a plain single-process run."""

    rank: int = 0  # 0 .. world_size - 1
    world_size: int = 1
    local_rank: int = 0  # index among the processes of this machine: the GPU it uses
    device: torch.device = torch.device("cpu")
    launched: bool = False  # started by torchrun (RANK set): training wraps its modules in DDP
    owned: bool = False  # `start` made the process group, so `stop` ends it

    @property
    def master(self) -> bool:
        """The process that logs and writes the run folder."""
        return self.rank == 0

    def share(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This process's rows (along `dim`) of a global-batch tensor: the rank-th of world_size equal runs."""
        if self.world_size == 1:
            return tensor
        size = tensor.shape[dim] // self.world_size
        return tensor.narrow(dim, self.rank * size, size)

    def randn(self, rows: int, dim: int, device) -> torch.Tensor:
        """(rows, dim) N(0, I) draws for this process's `rows` rows of the global batch: every
        process draws those of the whole batch and keeps its own, so the stream of random numbers
        is the same whatever the number of processes. One process: `torch.randn(rows, dim)`."""
        return self.share(torch.randn(rows * self.world_size, dim, device=device))

    def rand(self, rows: int, dim: int, device) -> torch.Tensor:
        """(rows, dim) U(0, 1) draws for this process's rows, drawn as `randn` is."""
        return self.share(torch.rand(rows * self.world_size, dim, device=device))

    def randint(self, high: int, rows: int, device) -> torch.Tensor:
        """(rows,) integers in [0, high) for this process's rows, drawn as `randn` is."""
        return self.share(torch.randint(0, high, (rows * self.world_size,), device=device))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a tensor that each one holds (a collective: every process calls it)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)  # a sum: Gloo has no average
        return tensor / self.world_size


def start(device: str) -> Process:
    """Join torchrun's process group when RANK is set (or use one made by the caller); else one
    plain process. `device` is the config's: auto and cuda mean each process's own GPU (LOCAL_RANK)."""
    if "RANK" not in os.environ and not (dist.is_available() and dist.is_initialized()):
        return Process(device=resolve_device(device))
    if not dist.is_available():
        raise ConfigError("this PyTorch has no torch.distributed: train with one process")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        if chosen.index is not None:
            raise ConfigError(f"device={device!r}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                              "set device=auto or device=cuda")
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return Process(dist.get_rank(), dist.get_world_size(), local_rank, chosen, launched=True, owned=owned)


def stop(process: Process) -> None:
    """Leave the process group `start` made."""
    if process.owned and dist.is_initialized():
        dist.destroy_process_group()


def local_batch(cfg, world_size: int) -> int:
    """Rows of each batch that one of `world_size` processes takes: whole groups, the same number
    on each. ConfigError when the groups (or images) of a batch do not split evenly."""
    if cfg.group_size > 1:
        if cfg.groups % world_size:
            raise ConfigError(f"groups={cfg.groups} does not split evenly over {world_size} processes: each takes "
                              "whole groups, so set groups to a multiple of torchrun's --nproc_per_node")
        return cfg.groups // world_size * cfg.group_size
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split evenly over {world_size} processes: set it "
                          "to a multiple of torchrun's --nproc_per_node")
    return cfg.batch_size // world_size


def average_gradients(params, process: Process) -> None:
    """Average the gradients of `params` over the processes, in one all-reduce (what DDP does
    for the modules it wraps; the discriminators' R1 penalty differentiates twice, which DDP does not support)."""
    grads = [p.grad for p in params if p.grad is not None]
    if process.world_size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])  # (P,)
    dist.all_reduce(flat)
    flat /= process.world_size
    for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(piece.view_as(grad))


class SumOverProcesses(torch.autograd.Function):
    """The sum over the processes of a tensor each one holds (an all-reduce), differentiable: the
    gradient each process gets is the sum of every process's gradient of the result."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch of all processes, with gradients through the statistics,
    for any backend (PyTorch's SyncBatchNorm runs on GPUs only, so it could not be tested on CPUs).

    Each process computes its share's per-channel mean and variance; one all-reduce gathers them
    (shares are equal, so the global mean is their mean and the global variance the mean variance
    plus the variance of the means, the law of total variance). The all-reduce is differentiable
    (`SumOverProcesses`): its backward sums the gradients of every process's loss, which DDP's
    average then divides, as the gradient of the global mean needs. Same parameters, buffers and state dict as BatchNorm2d;
    evaluation and single processes use BatchNorm2d's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        stats = torch.stack([x.float().mean((0, 2, 3)), x.float().var((0, 2, 3), correction=0)])  # (2, C)
        slots = F.pad(stats[None], (0, 0, 0, 0, rank, world - rank - 1))  # (world, 2, C), zero but for this rank
        means, variances = SumOverProcesses.apply(slots).unbind(1)  # (world, C) each: every process's statistics
        mean = means.mean(0)  # (C,)
        var = variances.mean(0) + means.var(0, correction=0)  # (C,)
        count = x.numel() // x.shape[1] * world  # values per channel in the global batch
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / max(count - 1, 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)  # (C,)
        shift = self.bias - mean * scale
        return (x * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of `module` into a GlobalBatchNorm2d in place, keeping its parameter
    and buffer objects (so an optimiser built on them still holds them). Returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if not (child.affine and child.track_running_stats and child.momentum is not None):
                raise ValueError("GlobalBatchNorm2d keeps BatchNorm2d's default kind: affine, running statistics, a momentum")
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device=child.weight.device)
            synced.weight, synced.bias = child.weight, child.bias
            synced.running_mean, synced.running_var = child.running_mean, child.running_var
            synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            global_batch_norm(child)
    return module
