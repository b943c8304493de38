"""Generation from a trained model: prior samples, style transfer, one-shot, interpolation.

Every function takes a model and images (N, 1, S, S) in [0, 1] with ink = 1 and returns pixel
probabilities of the same layout; plots.py turns them into pictures.
"""
from __future__ import annotations

import torch

from .model import StructuredVAE

BATCH = 256  # codes decoded at a time, so memory stays bounded however many drawings are asked for


def _decode(model: StructuredVAE, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """model.decode over (N, Dc) and (N, Ds) codes in batches of BATCH rows -> (N, 1, S, S) on the CPU."""
    return torch.cat([model.decode(content[i : i + BATCH], style[i : i + BATCH]).cpu()
                      for i in range(0, max(len(content), 1), BATCH)])


def _prior(n: int, dim: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return temperature * torch.randn(n, dim, generator=generator)  # (n, dim)


@torch.no_grad()
def sample(model: StructuredVAE, n: int = 64, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """New characters in new styles: content and style both drawn from the prior N(0, I)."""
    content = _prior(n, model.content_dim, seed, temperature)
    style = _prior(n, model.style_dim, seed + 1, temperature)
    return _decode(model, content, style)  # (n, 1, S, S)


@torch.no_grad()
def swap(model: StructuredVAE, content_images: torch.Tensor, style_images: torch.Tensor) -> torch.Tensor:
    """Cell (r, c) draws content image r's character in style image c's hand: (R, C, 1, S, S)."""
    content, _ = model.encode(content_images)  # (R, Dc)
    _, style = model.encode(style_images)  # (C, Ds)
    rows, cols = len(content), len(style)
    grid = _decode(model, content.repeat_interleave(cols, 0), style.repeat(rows, 1))  # (R * C, 1, S, S)
    return grid.view(rows, cols, *grid.shape[1:])


@torch.no_grad()
def one_shot(model: StructuredVAE, image: torch.Tensor, n: int = 16, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """From one drawing (1, S, S) of a possibly unseen character, n new drawings of it in sampled styles."""
    content, _ = model.encode(image.view(1, *image.shape[-3:]))  # (1, Dc)
    style = _prior(n, model.style_dim, seed, temperature)
    return _decode(model, content.expand(n, -1), style)  # (n, 1, S, S)


@torch.no_grad()
def interpolate(model: StructuredVAE, first: torch.Tensor, second: torch.Tensor, steps: int = 8, part: str = "content") -> torch.Tensor:
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
    return _decode(model, content, style)  # (T, 1, S, S)
