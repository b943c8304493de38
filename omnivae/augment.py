"""Random changes of drawings: affine distortions, stroke width, dynamic binarisation.

Every function takes its random amounts as tensors, so the caller decides where they come from
(a CPU generator for the swap judge, the global batch's stream under torchrun for training).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ranges of the training distortions at augment=1, those of Koch et al. 2015 ("Siamese Neural
# Networks for One-shot Image Recognition", section 4.3) at 105 px: rotation within 10 degrees,
# shear within 0.3, scale 0.8-1.2 and a shift within 2 of 105 pixels, scaled to the side.
DISTORTION = dict(angle=math.pi / 18, shear=0.3, scale=0.2, shift=2 / 105 * 2)  # shift in grid units (the side spans 2)


def affine(images: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
           shift: torch.Tensor) -> torch.Tensor:
    """Each image turned by `angle` (radians), scaled by `scale`, sheared by `shear` and shifted by
    `shift` (grid units: the side spans 2), resampled bilinearly with zeros outside
    (`F.affine_grid` / `F.grid_sample`). images: (B, 1, S, S); angle, scale, shear: (B,); shift: (B, 2)."""
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin + shear * cos, shift[:, 0]], 1),
                         torch.stack([sin, cos + shear * sin, shift[:, 1]], 1)], 1)  # (B, 2, 3) output -> input
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_width(images: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Strokes made thicker (width > 0: a blend of that weight towards a 3x3 max-pooling) or
    thinner (width < 0: towards a 3x3 min-pooling). images: (B, 1, S, S); width: (B,) in [-1, 1]."""
    width = width.view(-1, 1, 1, 1)
    thicker = F.max_pool2d(images, 3, 1, 1)
    thinner = -F.max_pool2d(-images, 3, 1, 1)
    return torch.where(width > 0, images + width * (thicker - images), images - width * (thinner - images))


def distort(images: torch.Tensor, uniform: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Training distortions as extra drawings (Koch et al. 2015; Lake et al. 2015 use the same
    kind): per image an affine change within `DISTORTION` times `strength`, then a stroke-width
    change, thicker up to a full 3x3 dilation or thinner up to half an erosion, times `strength`.

    images: (B, 1, S, S) in [0, 1]; uniform: (B, 6) U(0, 1) draws (angle, scale, shear, shift x,
    shift y, width). strength 0 returns the images unchanged. Returns (B, 1, S, S) in [0, 1].
    """
    if strength == 0:
        return images
    u = 2 * uniform.to(images.dtype) - 1  # (B, 6) in [-1, 1]
    s = strength
    x = affine(images, u[:, 0] * s * DISTORTION["angle"], 1 + u[:, 1] * s * DISTORTION["scale"],
               u[:, 2] * s * DISTORTION["shear"], u[:, 3:5] * s * DISTORTION["shift"])
    width = torch.where(u[:, 5] > 0, u[:, 5], 0.5 * u[:, 5]) * min(s, 1.0)  # (B,) thicker up to 1, thinner up to 0.5
    return stroke_width(x, width).clamp(0.0, 1.0)


def paired(uniform: torch.Tensor, group_size: int) -> torch.Tensor:
    """Random amounts shared by pairs of groups: the rows of groups 2i and 2i + 1 both take those of
    group 2i, so drawing m of one group and drawing m of its pair get the same distortion.
    uniform: (G * M, ...) with G even, group-major; returns the same shape."""
    rows = uniform.shape[0]
    if rows % (2 * group_size):
        raise ValueError(f"{rows} rows are not pairs of groups of {group_size}")
    pairs = uniform.view(rows // (2 * group_size), 2, group_size, *uniform.shape[1:])
    return pairs[:, :1].expand_as(pairs).reshape(uniform.shape)


def turned_views(images: torch.Tensor, kinds: int) -> list[torch.Tensor]:
    """The `kinds` views of each drawing that training with turned characters names as characters
    of their own (`train.rotate_as_new_characters`), in the order of their labels. kinds = 4: the
    drawing turned by 0, 90, 180 and 270 degrees (`torch.rot90` on the last two dimensions); 8:
    those four, then the mirror image (left to right) of each; 2: the drawing and its mirror
    image; 1: the drawing. images: (B, 1, S, S); returns `kinds` tensors of that shape."""
    if kinds not in (1, 2, 4, 8):
        raise ValueError(f"kinds must be 1, 2, 4 or 8, got {kinds}")
    quarter = 4 if kinds >= 4 else 1  # distinct quarter turns
    views = [torch.rot90(images, k % quarter, dims=(-2, -1)) for k in range(kinds)]
    return [v.flip(-1) if k >= quarter else v for k, v in enumerate(views)]


def binarize(images: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Dynamic binarisation: each pixel is 1 with probability its grey level, a fresh draw each
    time a drawing is used (as the likelihood literature on Omniglot trains, e.g. Burda et al.
    2016, "Importance Weighted Autoencoders"). images: (B, 1, S, S) in [0, 1]; uniform: U(0, 1)
    draws of the same number of elements."""
    return (uniform.view_as(images) < images).to(images.dtype)
