"""The content/style VAE: a conv encoder with two Gaussian heads, a transposed-conv decoder.

The model returns tensors, never losses (those live in losses.py). Its sizes come from a small
ModelConfig; the training config (config.py) holds everything else. It saves and loads in the
Hugging Face Hub layout (a JSON config beside a safetensors file), which a training run folder also
has (see rundir).
"""
# No `from __future__ import annotations` here: the Hub mixin reads the annotation of
# StructuredVAE.__init__'s `config` to rebuild a ModelConfig from the saved JSON config.
import os
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors.torch import load_file

from .config import ConfigError
from .losses import GROUPINGS, reparameterize


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's `device`: auto is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available")
    return torch.device(name)


@dataclass
class ModelConfig:
    """What the network needs and nothing else."""

    image_size: int = 28  # side of the square input images, in pixels
    content_dim: int = 32  # size of the content code (which character)
    style_dim: int = 16  # size of the style code (how it was drawn)
    channels: int = 32  # width of the first conv layer; doubles at each downsampling
    hidden: int = 256  # width of the fully connected layer between conv stack and heads
    grouping: str = "product"  # how a group's content posteriors combine in forward: product | average
    encoder: str = "conv"  # conv (stride-2 blocks down to 8 px or less) | conv4 (four conv + max-pool blocks)

    def __post_init__(self):
        for name in ("image_size", "content_dim", "style_dim", "channels", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        """The model's fields of a training config (any object with these attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class Posterior(NamedTuple):
    content_mean: torch.Tensor  # (B, Dc)
    content_logvar: torch.Tensor  # (B, Dc)
    style_mean: torch.Tensor  # (B, Ds)
    style_logvar: torch.Tensor  # (B, Ds)


class Noise(NamedTuple):
    """The N(0, I) draws of one forward pass's samples (training passes them to share one
    random stream across processes, see distributed)."""

    content: torch.Tensor | None  # (G, Dc) one per group, or (B, Dc) when not grouped
    style: torch.Tensor | None  # (B, Ds)


class VAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1, S, S) Bernoulli logits of the reconstruction
    content_mean: torch.Tensor  # (B, Dc) per drawing, or the group's shared posterior repeated
    content_logvar: torch.Tensor  # (B, Dc)
    style_mean: torch.Tensor  # (B, Ds)
    style_logvar: torch.Tensor  # (B, Ds)
    content: torch.Tensor  # (B, Dc) sampled content code fed to the decoder
    style: torch.Tensor  # (B, Ds) sampled style code fed to the decoder
    drawing_content_mean: torch.Tensor  # (B, Dc) each drawing's own content mean, before grouping


def feature_sizes(image_size: int) -> list[int]:
    """Spatial sizes through the encoder: halve (rounding up) until 8 or less. 28 -> [28, 14, 7]."""
    sizes = [image_size]
    while sizes[-1] > 8:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def conv_levels(config: "ModelConfig") -> tuple[list[int], list[int]]:
    """Spatial sizes and channel widths of the `conv` encoder's levels; the decoder mirrors them
    whatever the encoder. 28 px, 32 channels -> [28, 14, 7], [32, 64, 128]."""
    sizes = feature_sizes(config.image_size)
    return sizes, [config.channels * 2**i for i in range(len(sizes))]


def conv_encoder(config: "ModelConfig") -> tuple[nn.Sequential, int]:
    """The `conv` encoder: a stride-1 block, then a stride-2 block per further level of
    `conv_levels`, the width doubling at each. Returns the stack and its flattened output size."""
    sizes, widths = conv_levels(config)
    layers = [_block(1, widths[0], 1)]
    for i in range(1, len(sizes)):
        layers.append(_block(widths[i - 1], widths[i], 2))
    return nn.Sequential(*layers), widths[-1] * sizes[-1] ** 2


def conv4_sizes(image_size: int) -> list[int]:
    """Spatial sizes through the `conv4` encoder: four 2x2 max-pools, rounding down.
    28 -> [28, 14, 7, 3, 1], 105 -> [105, 52, 26, 13, 6]."""
    sizes = [image_size]
    for _ in range(4):
        sizes.append(sizes[-1] // 2)
    return sizes


def conv4_encoder(config: "ModelConfig") -> tuple[nn.Sequential, int]:
    """The four-block encoder of few-shot learning (Vinyals et al. 2016, "Matching Networks for One
    Shot Learning", section 4; Snell et al. 2017, "Prototypical Networks for Few-shot Learning",
    section 3.2): four blocks of 3x3 conv, batch norm, ReLU and 2x2 max-pooling, each with
    2 * channels filters, so the default 32 channels give the literature's 64. Returns the stack
    and its flattened output size."""
    width = 2 * config.channels
    blocks = [
        nn.Sequential(nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                      nn.MaxPool2d(2))
        for cin in (1, width, width, width)
    ]
    return nn.Sequential(*blocks), width * conv4_sizes(config.image_size)[-1] ** 2


# Encoders by name (ModelConfig.encoder): config -> (conv stack, its flattened output size).
# The fully connected trunk and the two heads follow either.
ENCODERS = {"conv": conv_encoder, "conv4": conv4_encoder}


def _up_block(cin: int, cout: int, out_size: int, in_size: int) -> nn.Sequential:
    # ConvTranspose2d(k=3, s=2, p=1) maps n -> 2n - 1 + output_padding; choose it to hit out_size.
    pad = out_size - (2 * in_size - 1)
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class StructuredVAE(nn.Module, PyTorchModelHubMixin, library_name="omnivae", tags=["omniglot", "vae"]):
    """Encoder -> (content, style) Gaussians -> decoder on [z_content, z_style].

    Public API: `encode(x) -> (content_mean, style_mean)`, `decode(content, style) -> probabilities`
    (both differentiable), `image_size`, `config`. `posterior` and `forward` give the full
    distributions for training. `StructuredVAE.from_pretrained(folder_or_repo)` loads a folder
    written by `save_pretrained`, a training run folder, or a Hub repository; the result is in
    eval mode.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.content_dim, self.style_dim = config.content_dim, config.style_dim
        # The decoder's levels: the `conv` encoder's, whichever encoder is chosen.
        sizes, widths = conv_levels(config)
        self.sizes, self.widths = sizes, widths

        self.features, encoded = ENCODERS[config.encoder](config)  # encoded: its flattened output size
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(encoded, config.hidden), nn.ReLU(inplace=True))
        self.content_head = nn.Linear(config.hidden, 2 * config.content_dim)  # mean and logvar
        self.style_head = nn.Linear(config.hidden, 2 * config.style_dim)

        z_dim = config.content_dim + config.style_dim
        flat = widths[-1] * sizes[-1] ** 2  # the decoder's first feature map, flattened
        self.expand = nn.Sequential(
            nn.Linear(z_dim, config.hidden), nn.ReLU(inplace=True), nn.Linear(config.hidden, flat), nn.ReLU(inplace=True)
        )
        ups = []
        for i in range(len(sizes) - 1, 0, -1):
            ups.append(_up_block(widths[i], widths[i - 1], sizes[i - 1], sizes[i]))
        self.upsample = nn.Sequential(*ups)
        self.to_logits = nn.Conv2d(widths[0], 1, 3, 1, 1)

    def posterior(self, x: torch.Tensor) -> Posterior:
        """q(z_content | x) and q(z_style | x) for images x: (B, 1, S, S) in [0, 1], ink = 1."""
        h = self.trunk(self.features(x))  # (B, hidden)
        # float(): under bf16 autocast the Gaussians' arithmetic still runs in float32 (a no-op otherwise).
        content_mean, content_logvar = self.content_head(h).float().chunk(2, dim=1)  # (B, Dc) each
        style_mean, style_logvar = self.style_head(h).float().chunk(2, dim=1)  # (B, Ds) each
        # Bound log-variances so exp() can neither overflow nor reach zero precision.
        return Posterior(content_mean, content_logvar.clamp(-12, 8), style_mean, style_logvar.clamp(-12, 8))

    def decode_logits(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = self.expand(torch.cat([content, style], dim=1))  # (B, C * s * s)
        h = h.view(-1, self.widths[-1], self.sizes[-1], self.sizes[-1])  # (B, C, s, s)
        return self.to_logits(self.upsample(h))  # (B, 1, S, S)

    def forward(self, x: torch.Tensor, group_size: int = 1, noise: Noise | None = None) -> VAEOutput:
        """Encode, sample and decode. With group_size > 1, rows come in groups of that many
        drawings of one character and share one content posterior (config.grouping). `noise`
        gives the N(0, I) draws of the two samples; None draws them here, in the same order."""
        q = self.posterior(x)
        content_mean, content_logvar = q.content_mean, q.content_logvar
        noise = noise or Noise(None, None)
        if group_size > 1:
            group_mean, group_logvar = GROUPINGS[self.config.grouping](content_mean, content_logvar, group_size)
            # One content sample per group, repeated for each of its drawings.
            group_code = reparameterize(group_mean, group_logvar, noise.content)  # (G, Dc)
            content = group_code.repeat_interleave(group_size, 0)  # (B, Dc)
            content_mean = group_mean.repeat_interleave(group_size, 0)
            content_logvar = group_logvar.repeat_interleave(group_size, 0)
        else:
            content = reparameterize(content_mean, content_logvar, noise.content)
        style = reparameterize(q.style_mean, q.style_logvar, noise.style)
        logits = self.decode_logits(content, style)
        return VAEOutput(
            logits, content_mean, content_logvar, q.style_mean, q.style_logvar, content, style, q.content_mean
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means (content_mean, style_mean) of images x: (N, 1, S, S) in [0, 1], ink = 1.

        Differentiable, so the model can sit inside a larger network; wrap calls in
        `torch.no_grad()` when only the codes are wanted."""
        q = self.posterior(x.to(self.device))
        return q.content_mean, q.style_mean

    def decode(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities (N, 1, S, S) of images with the given codes. Differentiable."""
        return torch.sigmoid(self.decode_logits(content.to(self.device), style.to(self.device)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location="cpu", strict: bool = True, **kwargs):
        """The weights step of `from_pretrained`. Unlike the mixin's own it is strict (weights under
        other names are an error, not a silently untrained model), reads a local folder quietly
        (the mixin's prints a line) and moves the model to `map_location` (the mixin's copies the
        weights into a model left on the CPU)."""
        if not os.path.isdir(model_id):
            model = super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
            return model.to(map_location)
        if "config" not in kwargs:
            raise FileNotFoundError(f"{model_id} holds no {CONFIG_NAME}")
        model = cls(kwargs["config"]).to(map_location)
        model.load_state_dict(load_file(os.path.join(model_id, SAFETENSORS_SINGLE_FILE), device=str(map_location)), strict=strict)
        return model.eval()


class GradientReversal(torch.autograd.Function):
    """Identity forward, -scale * gradient backward (Ganin and Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class StyleAdversary(nn.Module):
    """Predicts the character from the style code through a gradient-reversal layer: the
    classifier learns to find character identity in the style code while the encoder learns
    to remove it."""

    def __init__(self, style_dim: int, classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(style_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def forward(self, style: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(GradientReversal.apply(style, scale))  # (B, classes) logits


class Discriminator(nn.Module):
    """Tells codes drawn from the prior (label 1) from codes made by the encoder (label 0)
    (Makhzani et al. 2016, "Adversarial Autoencoders")."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)  # (B,) logits
