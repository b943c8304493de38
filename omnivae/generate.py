"""Generation from a trained model: prior samples, style transfer, one-shot, interpolation.

Every function takes a model and images (N, 1, S, S) in [0, 1] with ink = 1 and returns drawings
of the same layout, `model.decode`'s: pixel probabilities, or for an autoregressive decoder
(`model.autoregressive`) binary drawings sampled pixel by pixel, the same for the same seed.
plots.py turns them into pictures.
"""
from __future__ import annotations

import torch

from .model import StructuredVAE

BATCH = 256  # codes decoded at a time, so memory stays bounded however many drawings are asked for
SAMPLING_SEED = 1_000_003  # added to a call's seed for an autoregressive decoder's draws, away from the codes' seeds


def _decode(model: StructuredVAE, content: torch.Tensor, style: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """model.decode over (N, Dc) and (N, Ds) codes in batches of BATCH rows -> (N, 1, S, S) on the
    CPU; an autoregressive decoder samples with one torch.Generator(seed + SAMPLING_SEED) for all
    the batches."""
    generator = torch.Generator().manual_seed(seed + SAMPLING_SEED)
    return torch.cat([model.decode(content[i : i + BATCH], style[i : i + BATCH], generator=generator).cpu()
                      for i in range(0, max(len(content), 1), BATCH)])


def drawing_kind(model: StructuredVAE) -> str:
    """What this module's drawings are for `model`, in words, for figure titles."""
    return "binary samples, pixel by pixel" if model.autoregressive else "pixel probabilities"


def _prior(n: int, dim: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(n, dim, generator=generator)  # (n, dim)


@torch.no_grad()
def sample(model: StructuredVAE, n: int = 64, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """New characters in new styles: content and style both drawn from the prior (N(0, I), or for the
    content the model's learned mixture: `model.sample_content`)."""
    content = model.sample_content(n, torch.Generator().manual_seed(seed), temperature)  # (n, Dc)
    style = _prior(n, model.style_dim, seed + 1, temperature)
    return _decode(model, content, style, seed)  # (n, 1, S, S)


@torch.no_grad()
def swap(model: StructuredVAE, content_images: torch.Tensor, style_images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Cell (r, c) draws content image r's character in style image c's hand: (R, C, 1, S, S)."""
    content, _ = model.encode(content_images)  # (R, Dc)
    _, style = model.encode(style_images)  # (C, Ds)
    rows, cols = len(content), len(style)
    grid = _decode(model, content.repeat_interleave(cols, 0), style.repeat(rows, 1), seed)  # (R * C, 1, S, S)
    return grid.view(rows, cols, *grid.shape[1:])


@torch.no_grad()
def one_shot(model: StructuredVAE, image: torch.Tensor, n: int = 16, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """From one drawing (1, S, S) of a possibly unseen character, n new drawings of it in sampled styles."""
    content, _ = model.encode(image.view(1, *image.shape[-3:]))  # (1, Dc)
    style = _prior(n, model.style_dim, seed, temperature)
    return _decode(model, content.expand(n, -1), style, seed)  # (n, 1, S, S)


@torch.no_grad()
def interpolate(model: StructuredVAE, first: torch.Tensor, second: torch.Tensor, steps: int = 8, part: str = "content",
                seed: int = 0) -> torch.Tensor:
    """Walk linearly from `first` to `second` in one part of the code, the other part held at `first`'s.

    part: "content" (same hand, changing character), "style" (same character, changing hand)
    or "both". Returns (steps, 1, S, S).
    """
    if part not in ("content", "style", "both"):
        raise ValueError(f"part must be content, style or both, got {part!r}")
    codes = model.encode(torch.stack([first.view(first.shape[-3:]), second.view(second.shape[-3:])]))
    (c0, c1), (s0, s1) = codes[0], codes[1]
    t = torch.linspace(0, 1, steps, device=c0.device)[:, None]  # (T, 1)
    content = c0 + t * (c1 - c0) if part in ("content", "both") else c0.expand(steps, -1)
    style = s0 + t * (s1 - s0) if part in ("style", "both") else s0.expand(steps, -1)
    return _decode(model, content, style, seed)  # (T, 1, S, S)
