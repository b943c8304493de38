"""The content/style VAE: a conv encoder with two Gaussian heads and a decoder of three kinds.

Decoders (ModelConfig.decoder): `deconv`, transposed convolutions that mirror the encoder and give
independent Bernoulli pixels; `resnet`, the same upsampling path with a bottleneck residual block
before each upsampling; `pixelcnn`, the deconv decoder's last feature map conditioning a small gated
PixelCNN head, so that each pixel's Bernoulli depends on the pixels before it (an autoregressive
likelihood, sampled pixel by pixel).

The model returns tensors, never losses (those live in losses.py). Its sizes come from a small
ModelConfig; the training config (config.py) holds everything else. It saves and loads in the
Hugging Face Hub layout (a JSON config beside a safetensors file), which a training run folder also
has (see rundir).
"""
# No `from __future__ import annotations` here: the Hub mixin reads the annotation of
# StructuredVAE.__init__'s `config` to rebuild a ModelConfig from the saved JSON config.
import copy
import os
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors.torch import load_file
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import AUTOREGRESSIVE_DECODERS, DECODERS, ConfigError
from .losses import GROUPINGS, LOG_2PI, gaussian_kl, mixture_log_density, reparameterize, sampled_kl


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
    encoder: str = "conv"  # conv (stride-2 blocks down to 8 px or less) | resnet (the same levels with residual blocks) | conv4 (four conv + max-pool blocks)
    decoder: str = "deconv"  # deconv | resnet (residual blocks) | pixelcnn (an autoregressive head on deconv features)
    encoder_blocks: int = 1  # blocks per level of encoder=conv (1: the stride block alone; more add stride-1 blocks after it) or resnet (more add residual blocks)
    decoder_blocks: int = 1  # 3x3 conv blocks per decoder level (1: the upsampling block alone; more add stride-1 blocks after it, at 28 px too)
    pixelcnn_layers: int = 3  # gated layers of the pixelcnn head: a pixel sees the pixelcnn_layers + 1 rows above it
    pixelcnn_channels: int = 8  # width of the pixelcnn head
    detail_dim: int = 0  # size of the detail code (what this drawing adds to its content and style); 0: none
    prior_components: int = 0  # the content code's prior: 0 N(0, I); K > 0 a mixture of K diagonal Gaussians with learned means, variances and weights

    def __post_init__(self):
        for name in ("image_size", "content_dim", "style_dim", "channels", "hidden", "pixelcnn_layers",
                     "pixelcnn_channels", "encoder_blocks", "decoder_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("detail_dim", "prior_components"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.encoder_blocks > 1 and self.encoder == "conv4":
            raise ConfigError(f"encoder_blocks={self.encoder_blocks} is for encoder=conv or resnet, got encoder='conv4' "
                              "(set encoder_blocks=1 with it)")

    @classmethod
    def from_config(cls, cfg) -> "ModelConfig":
        """The model's fields of a training config (any object with these attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class Posterior(NamedTuple):
    content_mean: torch.Tensor  # (B, Dc)
    content_logvar: torch.Tensor  # (B, Dc)
    style_mean: torch.Tensor  # (B, Ds)
    style_logvar: torch.Tensor  # (B, Ds)
    detail_mean: torch.Tensor | None = None  # (B, Dd); StructuredVAE gives Dd = 0 columns without a detail code
    detail_logvar: torch.Tensor | None = None  # (B, Dd)


class Noise(NamedTuple):
    """The N(0, I) draws of one forward pass's samples (training passes them to share one
    random stream across processes, see distributed)."""

    content: torch.Tensor | None  # (G, Dc) one per group, or (B, Dc) when not grouped
    style: torch.Tensor | None  # (B, Ds)
    detail: torch.Tensor | None = None  # (B, Dd)


class VAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1, S, S) Bernoulli logits of the reconstruction
    content_mean: torch.Tensor  # (B, Dc) per drawing, or the group's shared posterior repeated
    content_logvar: torch.Tensor  # (B, Dc)
    style_mean: torch.Tensor  # (B, Ds)
    style_logvar: torch.Tensor  # (B, Ds)
    content: torch.Tensor  # (B, Dc) sampled content code fed to the decoder
    style: torch.Tensor  # (B, Ds) sampled style code fed to the decoder
    drawing_content_mean: torch.Tensor  # (B, Dc) each drawing's own content mean, before grouping
    base_logits: torch.Tensor  # (B, 1, S, S) the logits before an autoregressive head (= logits without one)
    detail_mean: torch.Tensor  # (B, Dd)
    detail_logvar: torch.Tensor  # (B, Dd)
    detail: torch.Tensor  # (B, Dd) sampled detail code fed to the decoder, zero where `detail_keep` is 0
    detail_keep: torch.Tensor  # (B,) 1 where the decoder got the sampled detail code, 0 where its prior mean 0


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
    `conv_levels`, the width doubling at each; `encoder_blocks` - 1 stride-1 blocks follow each
    level's first block (a VGG-style stack, Simonyan and Zisserman 2015). Returns the stack and its
    flattened output size."""
    return _levels(config, lambda width: _block(width, width, 1))


def _levels(config: "ModelConfig", extra) -> tuple[nn.Sequential, int]:
    """The levels of `conv_levels`, each a stride block (stride 1 at the first) followed by
    `encoder_blocks` - 1 modules extra(width); the stack and its flattened output size."""
    sizes, widths = conv_levels(config)
    layers = []
    for i in range(len(sizes)):
        layers.append(_block(widths[i - 1] if i else 1, widths[i], 2 if i else 1))
        layers += [extra(widths[i]) for _ in range(config.encoder_blocks - 1)]
    return nn.Sequential(*layers), widths[-1] * sizes[-1] ** 2


class ResidualBlock(nn.Module):
    """A basic residual block (He et al. 2016, "Deep Residual Learning for Image Recognition", fig. 2):
    relu(h + bn(conv(relu(bn(conv(h)))))), two 3x3 convolutions at the input's width and size."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h + self.branch(h))


def resnet_encoder(config: "ModelConfig") -> tuple[nn.Sequential, int]:
    """The `resnet` encoder: the levels of `conv_encoder`, each level's first block followed by
    `encoder_blocks` - 1 basic residual blocks (`ResidualBlock`, two convolutions each) instead of
    plain stride-1 blocks. encoder_blocks=2 has three convolutions per level. Returns the stack
    and its flattened output size."""
    return _levels(config, ResidualBlock)


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
ENCODERS = {"conv": conv_encoder, "resnet": resnet_encoder, "conv4": conv4_encoder}


def _up_block(cin: int, cout: int, out_size: int, in_size: int) -> nn.Sequential:
    # ConvTranspose2d(k=3, s=2, p=1) maps n -> 2n - 1 + output_padding; choose it to hit out_size.
    pad = out_size - (2 * in_size - 1)
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _residual_block(channels: int) -> nn.Sequential:
    """The residual branch of a bottleneck block (He et al. 2016, "Deep Residual Learning for Image
    Recognition", fig. 5 right): 1x1 down to half the channels, 3x3, 1x1 back up, each with batch
    norm. The block computes relu(h + branch(h)) (`StructuredVAE.decode_features`). Bottlenecks and
    no block at the image's own size keep training ~1.2x as long as the deconv decoder's on a CPU."""
    mid = max(1, channels // 2)
    return nn.Sequential(
        nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels),
    )


def _gate(pre: torch.Tensor) -> torch.Tensor:
    """Gated activation tanh(a) * sigmoid(b) of the two halves of `pre` (B, 2C, H, W) -> (B, C, H, W)
    (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", eq. 2)."""
    a, b = pre.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def _shift_down(h: torch.Tensor) -> torch.Tensor:
    """Row r takes row r - 1's values, row 0 zeros: (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(h, (0, 0, 1, 0))[:, :, :-1]


def _shift_right(h: torch.Tensor) -> torch.Tensor:
    """Column c takes column c - 1's values, column 0 zeros: (B, C, H, W) -> (B, C, H, W)."""
    return F.pad(h, (1, 0, 0, 0))[..., :-1]


class PixelCNNHead(nn.Module):
    """A small gated PixelCNN with a vertical and a horizontal stack (van den Oord et al. 2016,
    "Conditional Image Generation with PixelCNN Decoders", sec. 2.2 and fig. 2), conditioned on a
    spatial feature map, as PixelVAE (Gulrajani et al. 2017) and the Variational Homoencoder (Hewitt
    et al. 2018) condition theirs on the latent code. Its logits are added to the deconv decoder's.

    Layer l (from 0) has a vertical convolution (kernel 2x3, padded at the top), whose output holds
    the vertical gate's pre-activation and the term it sends to the horizontal stack (the paper's
    1x1 link folded into it: both are linear), and a horizontal convolution (kernel 1x2, padded on
    the left) feeding a gate tanh(a) * sigmoid(b) with a residual connection from layer 1 on. The
    features enter the first layer's gates through one 1x1 convolution (PixelVAE feeds them to its
    first layer); fewer, narrower layers than the paper's keep training within ~1.5x of the deconv
    decoder on a CPU.

    Causality: the vertical stack at row r sees the rows r - l - 1 .. r of the image after layer l
    and reaches the horizontal stack shifted down one row; the horizontal stack, whose input is
    the image shifted right one column, sees the pixels left of (i, j) in row i. So the logit of
    pixel (i, j) depends on the pixels before it in raster order, within the `reach` = layers + 1
    rows above it, and on the features at row i and above: a small receptive field, so that the
    codes must carry the character's shape.
    """

    def __init__(self, features: int, channels: int, layers: int):
        super().__init__()
        self.layers, self.channels = layers, channels
        self.reach = layers + 1  # rows above a pixel that its logit sees
        widths = [1] + [channels] * (layers - 1)  # input width of each layer: the image, then the stacks
        self.condition = nn.Conv2d(features, 4 * channels, 1)  # the first layer's vertical and horizontal gate terms
        # Out: the 2C term for the horizontal stack, then (not in the last layer) the 2C vertical gate pre-activation.
        self.vertical = nn.ModuleList(nn.Conv2d(w, (4 if l < layers - 1 else 2) * channels, (2, 3))
                                      for l, w in enumerate(widths))
        self.horizontal = nn.ModuleList(nn.Conv2d(w, 2 * channels, (1, 2)) for w in widths)
        self.out = nn.Conv2d(channels, 1, 1)

    def conditioning(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's gate terms from features (B, F, H, W): vertical and horizontal, (B, 2C, H, W) each."""
        vertical, horizontal = self.condition(features).chunk(2, dim=1)
        return vertical, horizontal

    def vertical_terms(self, x: torch.Tensor, cond_vertical: torch.Tensor) -> list:
        """The vertical stack's terms for each layer's horizontal gates, *before* the shift down:
        `layers` tensors (B, 2C, H, W); row r of layer l's sees the rows r - l - 1 .. r of the
        images x (B, 1, H, W). cond_vertical: `conditioning`'s vertical term, for the same rows."""
        v, terms = x, []
        for l, conv in enumerate(self.vertical):
            out = conv(F.pad(v, (1, 1, 1, 0)))  # (B, 4C or 2C, H, W): rows r - 1 .. r, columns c - 1 .. c + 1
            terms.append(out[:, :2 * self.channels])  # (B, 2C, H, W)
            if l < self.layers - 1:
                pre = out[:, 2 * self.channels:]  # (B, 2C, H, W)
                v = _gate(pre + cond_vertical if l == 0 else pre)  # (B, C, H, W)
        return terms

    def horizontal_logits(self, x: torch.Tensor, terms: list, cond_horizontal: torch.Tensor) -> torch.Tensor:
        """The head's logits (B, 1, H, W) from the horizontal stack on images x (B, 1, H, W), given
        the vertical terms of the same rows already shifted down (`terms`) and the first layer's
        horizontal conditioning term. Column j's logit sees x's columns before j."""
        h = _shift_right(x)  # (B, 1, H, W): no layer may see the pixel itself
        for l, (conv, term) in enumerate(zip(self.horizontal, terms)):
            pre = conv(F.pad(h, (1, 0, 0, 0))) + term  # (B, 2C, H, W): columns c - 1 .. c
            gated = _gate(pre + cond_horizontal if l == 0 else pre)  # (B, C, H, W)
            h = gated + h if l else gated  # a residual connection once the widths agree
        return self.out(F.relu(h))  # (B, 1, H, W)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, 1, H, W) of images x (B, 1, H, W) given features (B, F, H, W)."""
        cond_vertical, cond_horizontal = self.conditioning(features)
        terms = [_shift_down(t) for t in self.vertical_terms(x, cond_vertical)]
        return self.horizontal_logits(x, terms, cond_horizontal)

    @torch.no_grad()
    def sample(self, features: torch.Tensor, base_logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """Binary images (B, 1, H, W) drawn pixel by pixel in raster order: pixel (i, j) is ink when
        uniform[i, j] < sigmoid(base_logits[i, j] + head logit given the pixels drawn before it).

        The distribution of teacher-forced `forward` (tested against a full-image pass per pixel),
        computed with less work: the conditioning once; per row, the vertical stack on the slab of
        the `reach` rows above it alone (all that its logits see); per pixel, one column of the
        horizontal stack, each layer keeping its input at the previous column, as in the cached
        generation of Ramachandran et al. 2017 ("Fast Generation for Convolutional Autoregressive
        Models"). features: (B, F, H, W); base_logits, uniform: (B, 1, H, W).
        """
        cond_vertical, cond_horizontal = self.conditioning(features)  # (B, 2C, H, W) each
        x = torch.zeros_like(uniform)  # (B, 1, H, W), filled in raster order
        b, rows, cols = len(x), x.shape[-2], x.shape[-1]
        for i in range(rows):
            if i == 0:  # nothing above the first row: the shifted vertical terms are zeros
                terms = [torch.zeros_like(cond_horizontal[:, :, :1])] * self.layers
            else:
                top = max(0, i - self.reach)
                slab = self.vertical_terms(x[:, :, top:i], cond_vertical[:, :, top:i])
                terms = [t[:, :, -1:] for t in slab]  # row i - 1's, which the shift hands to row i
            terms[0] = terms[0] + cond_horizontal[:, :, i:i + 1]
            row = [t[:, :, 0].permute(2, 0, 1).contiguous() for t in terms]  # each layer's gate terms, (W, B, 2C)
            left = [x.new_zeros(b, conv.in_channels) for conv in self.horizontal]  # each layer's input at column j - 1
            for j in range(cols):
                here = x[:, :, i, j - 1] if j else x.new_zeros(b, 1)  # (B, 1): the image shifted right
                for l, conv in enumerate(self.horizontal):
                    gated = _gate(_conv_column(conv, left[l], here) + row[l][j])  # (B, C)
                    left[l], here = here, gated + here if l else gated
                logits = base_logits[:, :, i, j] + _conv_column(self.out, None, F.relu(here))  # (B, 1)
                x[:, :, i, j] = (uniform[:, :, i, j] < torch.sigmoid(logits)).to(x.dtype)
        return x


def _conv_column(conv: nn.Conv2d, left: torch.Tensor | None, here: torch.Tensor) -> torch.Tensor:
    """A convolution of kernel (1, 2), or (1, 1) with left None, evaluated at one position: its
    weight[..., 0] applies to the input one column left, weight[..., -1] to the input at the
    position. left, here: (B, Cin) -> (B, Cout)."""
    weight = conv.weight[:, :, 0]  # (Cout, Cin, kw)
    result = F.linear(here, weight[:, :, -1], conv.bias)
    return result if left is None else result + F.linear(left, weight[:, :, 0])


class StructuredVAE(nn.Module, PyTorchModelHubMixin, library_name="omnivae", tags=["omniglot", "vae"]):
    """Encoder -> (content, style) Gaussians -> decoder on [z_content, z_style].

    With `detail_dim` > 0 a third Gaussian head gives a per-drawing detail code z_detail, decoded
    with the other two: the bottom of a hierarchy, what one drawing adds to its character and hand.
    Its prior is N(0, I) and what it changes depends on content and style through the decoder (the
    non-centred form of a conditional prior p(z_detail | z_content, z_style), as in the
    hierarchical VAEs of Sønderby et al. 2016 and Vahdat and Kautz 2020). It is never transferred:
    every decoding that is not given a detail code (swaps, transfers, samples of new drawings)
    decodes with its prior mean 0.

    Public API: `encode(x) -> (content_mean, style_mean)`, `decode(content, style)` (pixel
    probabilities, differentiable; binary samples for an autoregressive decoder), `reconstruct(x)`,
    `sample(content, style, generator)` (binary drawings), `decode_logits(content, style, x)` (the
    likelihood's logits), `autoregressive`, `image_size`, `config`. `posterior` and `forward` give
    the full distributions for training. `StructuredVAE.from_pretrained(folder_or_repo)` loads a
    folder written by `save_pretrained`, a training run folder, or a Hub repository; the result is
    in eval mode.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.content_dim, self.style_dim, self.detail_dim = config.content_dim, config.style_dim, config.detail_dim
        # The decoder's levels: the `conv` encoder's, whichever encoder is chosen.
        sizes, widths = conv_levels(config)
        self.sizes, self.widths = sizes, widths

        self.features, encoded = ENCODERS[config.encoder](config)  # encoded: its flattened output size
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(encoded, config.hidden), nn.ReLU(inplace=True))
        self.content_head = nn.Linear(config.hidden, 2 * config.content_dim)  # mean and logvar
        self.style_head = nn.Linear(config.hidden, 2 * config.style_dim)
        if config.detail_dim:
            # Its own fully connected layer on the conv features: the trunk's is shaped by the content
            # terms to forget what one drawing adds to its character.
            self.detail_trunk = nn.Sequential(nn.Flatten(), nn.Linear(encoded, config.hidden), nn.ReLU(inplace=True))
            self.detail_head = nn.Linear(config.hidden, 2 * config.detail_dim)

        z_dim = config.content_dim + config.style_dim + config.detail_dim
        flat = widths[-1] * sizes[-1] ** 2  # the decoder's first feature map, flattened
        self.expand = nn.Sequential(
            nn.Linear(z_dim, config.hidden), nn.ReLU(inplace=True), nn.Linear(config.hidden, flat), nn.ReLU(inplace=True)
        )
        ups = []
        for i in range(len(sizes) - 1, 0, -1):
            ups.append(_up_block(widths[i], widths[i - 1], sizes[i - 1], sizes[i]))
        self.upsample = nn.Sequential(*ups)
        if config.decoder_blocks > 1:  # stride-1 blocks after each upsampling, at its size and width
            self.refine = nn.ModuleList(
                nn.Sequential(*[_block(widths[i - 1], widths[i - 1], 1) for _ in range(config.decoder_blocks - 1)])
                for i in range(len(sizes) - 1, 0, -1))
        if config.decoder == "resnet":  # one block at each size below the image's, before its upsampling
            self.residual = nn.ModuleList(_residual_block(widths[i]) for i in range(len(sizes) - 1, 0, -1))
        self.to_logits = nn.Conv2d(widths[0], 1, 3, 1, 1)
        if config.decoder == "pixelcnn":
            self.head = PixelCNNHead(widths[0], config.pixelcnn_channels, config.pixelcnn_layers)
        if config.prior_components:
            # The content prior's components, learned with the rest: means drawn from N(0, I), unit variances.
            self.prior_means = nn.Parameter(torch.randn(config.prior_components, config.content_dim))
            self.prior_logvars = nn.Parameter(torch.zeros(config.prior_components, config.content_dim))
            self.prior_logits = nn.Parameter(torch.zeros(config.prior_components))  # mixture weights softmax(logits)

    def prior_parameters(self) -> list[nn.Parameter]:
        """The content prior's learned parameters (none for the N(0, I) prior)."""
        return [self.prior_means, self.prior_logvars, self.prior_logits] if self.config.prior_components else []

    def content_log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z_content) for codes (..., Dc) -> (...): N(0, I), or the learned mixture
        (`losses.mixture_log_density`) with prior_components > 0."""
        if not self.config.prior_components:
            return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        logvars = self.prior_logvars.clamp(-12, 8)  # the posterior's bounds
        return mixture_log_density(z, self.prior_means.to(z.dtype), logvars.to(z.dtype), self.prior_logits.to(z.dtype))

    def content_kl(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """KL(q(z_content | x) || p(z_content)) per row (B,) for posteriors (B, Dc): the closed form for
        N(0, I); for the mixture a one-sample estimate (`losses.sampled_kl`) whose noise comes from
        `generator` (a CPU torch.Generator; None: torch's global one)."""
        if not self.config.prior_components:
            return gaussian_kl(mean, logvar)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)  # (B, Dc)
        return sampled_kl(reparameterize(mean, logvar, eps), mean, logvar, self.content_log_prior)

    @torch.no_grad()
    def sample_content(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n content codes (n, Dc) on the CPU drawn from the prior, its spread scaled by `temperature`:
        temperature * N(0, I), or for the mixture a component drawn with its weight, then its mean
        plus temperature * sigma * N(0, I)."""
        if not self.config.prior_components:
            return temperature * torch.randn(n, self.content_dim, generator=generator)  # (n, Dc)
        weights = torch.softmax(self.prior_logits.detach().cpu().double(), 0)  # (K,)
        which = torch.multinomial(weights, n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn(n, self.content_dim, generator=generator)  # (n, Dc)
        means, logvars = self.prior_means.detach().cpu().float(), self.prior_logvars.detach().cpu().float().clamp(-12, 8)
        return means[which] + temperature * (0.5 * logvars[which]).exp() * eps

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The parameters that map codes to pixels (everything after the Gaussian heads)."""
        parts = [self.expand, self.upsample, self.to_logits]
        parts += [getattr(self, name) for name in ("residual", "refine", "head") if hasattr(self, name)]
        return [p for part in parts for p in part.parameters()]

    def posterior(self, x: torch.Tensor) -> Posterior:
        """q(z_content | x), q(z_style | x) and q(z_detail | x) for images x: (B, 1, S, S) in [0, 1], ink = 1."""
        features = self.features(x)  # (B, C, s, s)
        h = self.trunk(features)  # (B, hidden)
        # float(): under bf16 autocast the Gaussians' arithmetic still runs in float32 (a no-op otherwise).
        content_mean, content_logvar = self.content_head(h).float().chunk(2, dim=1)  # (B, Dc) each
        style_mean, style_logvar = self.style_head(h).float().chunk(2, dim=1)  # (B, Ds) each
        if self.detail_dim:
            detail_mean, detail_logvar = self.detail_head(self.detail_trunk(features)).float().chunk(2, dim=1)  # (B, Dd) each
        else:
            detail_mean = detail_logvar = h.new_zeros(len(h), 0, dtype=torch.float32)
        # Bound log-variances so exp() can neither overflow nor reach zero precision.
        return Posterior(content_mean, content_logvar.clamp(-12, 8), style_mean, style_logvar.clamp(-12, 8),
                         detail_mean, detail_logvar.clamp(-12, 8))

    @property
    def autoregressive(self) -> bool:
        """True when a pixel's likelihood depends on the pixels before it (decoder `pixelcnn`): its
        logits need the images (`decode_logits(content, style, x)`) and `decode` samples."""
        return self.config.decoder in AUTOREGRESSIVE_DECODERS

    def _codes(self, content: torch.Tensor, style: torch.Tensor, detail: torch.Tensor | None) -> torch.Tensor:
        """[content, style, detail] (B, Dc + Ds + Dd), the detail code's prior mean 0 where it is not given."""
        if not self.detail_dim:
            return torch.cat([content, style], dim=1)
        if detail is None:
            detail = content.new_zeros(len(content), self.detail_dim)
        return torch.cat([content, style, detail], dim=1)

    def decode_features(self, content: torch.Tensor, style: torch.Tensor, detail: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last feature map (B, C0, S, S) for codes (B, Dc), (B, Ds) and (B, Dd) or None (its prior mean)."""
        h = self.expand(self._codes(content, style, detail))  # (B, C * s * s)
        # Channels-last: the transposed convolutions and the last 3x3 convolution run ~1.4x as fast on
        # a CPU in this layout (a decoding pass without gradients, as the likelihood makes a million of
        # them; a whole training run on 2 cores is not faster), the same numbers up to float rounding.
        h = h.view(-1, self.widths[-1], self.sizes[-1], self.sizes[-1]).contiguous(memory_format=torch.channels_last)
        for i, up in enumerate(self.upsample):
            if self.config.decoder == "resnet":
                h = F.relu(h + self.residual[i](h))
            h = up(h)  # (B, C_i, S_i, S_i), doubling the size
            if hasattr(self, "refine"):
                h = self.refine[i](h)
        return h  # (B, C0, S, S)

    def decode_logits(self, content: torch.Tensor, style: torch.Tensor, x: torch.Tensor | None = None,
                      detail: torch.Tensor | None = None) -> torch.Tensor:
        """Bernoulli logits (B, 1, S, S) of the likelihood p(x | z) for codes (B, Dc), (B, Ds) and
        the detail code (B, Dd) (None: its prior mean 0; not used without a detail code).

        deconv and resnet: independent pixels, x is not needed. pixelcnn: the logit of pixel (i, j)
        is that of p(x_ij = 1 | z, the pixels of x before it in raster order), so the images x
        (B, 1, S, S) must be given (teacher forcing); ValueError without them. Either way
        log p(x | z) = -BCE(logits, x) summed over pixels (losses.bernoulli_nll).
        """
        return self.decode_logit_parts(content, style, x, detail)[1]

    def decode_logit_parts(self, content: torch.Tensor, style: torch.Tensor, x: torch.Tensor | None = None,
                           detail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, full) Bernoulli logits (B, 1, S, S): the codes' own logits, before the
        autoregressive head, and `decode_logits`' (the base plus the head's, given x). The same
        tensor twice for a decoder without a head."""
        features = self.decode_features(content, style, detail)  # (B, C0, S, S)
        logits = self.to_logits(features)  # (B, 1, S, S)
        if not self.autoregressive:
            return logits, logits
        if x is None:
            raise ValueError("the pixelcnn decoder needs the images x for its logits (teacher forcing); "
                             "use sample() to draw new images")
        return logits, logits + self.head(x, features)

    def forward(self, x: torch.Tensor, group_size: int = 1, noise: Noise | None = None,
                target: torch.Tensor | None = None, detail_keep: torch.Tensor | None = None) -> VAEOutput:
        """Encode, sample and decode. With group_size > 1, rows come in groups of that many
        drawings of one character and share one content posterior (config.grouping). `noise`
        gives the N(0, I) draws of the samples; None draws them here, in the same order.
        `target`: the images an autoregressive decoder reads (teacher forcing) when they are not x.
        `detail_keep` (B,) of 0s and 1s: rows decoded with their sampled detail code (1) or its
        prior mean 0 (0), as swaps decode; None keeps every row's."""
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
        detail = reparameterize(q.detail_mean, q.detail_logvar, noise.detail) if self.detail_dim else q.detail_mean
        detail_keep = x.new_ones(len(x)) if detail_keep is None else detail_keep.to(x.dtype)  # (B,)
        detail = detail * detail_keep[:, None].to(detail.dtype)
        base, logits = self.decode_logit_parts(content, style, x if target is None else target, detail)  # teacher forcing
        return VAEOutput(
            logits, content_mean, content_logvar, q.style_mean, q.style_logvar, content, style, q.content_mean, base,
            q.detail_mean, q.detail_logvar, detail, detail_keep,
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means (content_mean, style_mean) of images x: (N, 1, S, S) in [0, 1], ink = 1.

        Differentiable, so the model can sit inside a larger network; wrap calls in
        `torch.no_grad()` when only the codes are wanted."""
        q = self.posterior(x.to(self.device))
        return q.content_mean, q.style_mean

    def decode(self, content: torch.Tensor, style: torch.Tensor, generator: torch.Generator | None = None,
               detail: torch.Tensor | None = None) -> torch.Tensor:
        """Drawings (N, 1, S, S) with the given codes (N, Dc), (N, Ds) and detail codes (N, Dd)
        (None: their prior mean 0, as for swaps; not used without a detail code).

        deconv and resnet: the pixel probabilities p(x_ij = 1 | z), differentiable (`generator` is
        not used). An autoregressive decoder (`autoregressive`, pixelcnn) has no such map: it
        returns binary drawings sampled pixel by pixel (`sample`, with `generator`), not
        differentiable.
        """
        if self.autoregressive:
            return self.sample(content, style, generator, detail)
        detail = None if detail is None else detail.to(self.device)
        return torch.sigmoid(self.decode_logits(content.to(self.device), style.to(self.device), detail=detail))

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`decode` of the posterior means of images x (N, 1, S, S): content, style and, for a model
        with one, the detail code (the drawing's own reconstruction, not a swap's)."""
        q = self.posterior(x.to(self.device))
        return self.decode(q.content_mean, q.style_mean, generator, q.detail_mean if self.detail_dim else None)

    @torch.no_grad()
    def sample(self, content: torch.Tensor, style: torch.Tensor, generator: torch.Generator | None = None,
               detail: torch.Tensor | None = None) -> torch.Tensor:
        """Binary drawings (N, 1, S, S) drawn from p(x | z) for codes (N, Dc), (N, Ds) and detail
        codes (N, Dd) (None: their prior mean 0).

        One uniform number u_ij per pixel is drawn first, all at once (torch.rand with
        `generator`, on its device), and pixel (i, j) is ink when u_ij < p(x_ij = 1 | z, pixels
        before it): a Bernoulli draw from the probabilities for deconv and resnet, pixel by pixel
        in raster order for pixelcnn (`PixelCNNHead.sample`). Same generator state, same drawings.
        """
        content, style = content.to(self.device), style.to(self.device)
        detail = None if detail is None else detail.to(self.device)
        shape = (len(content), 1, self.image_size, self.image_size)
        device = generator.device if generator is not None else self.device
        uniform = torch.rand(shape, generator=generator, device=device).to(self.device)  # (N, 1, S, S)
        features = self.decode_features(content, style, detail)  # (N, C0, S, S)
        logits = self.to_logits(features)  # (N, 1, S, S)
        if not self.autoregressive:
            return (uniform < torch.sigmoid(logits)).to(logits.dtype)
        return self.head.sample(features, logits, uniform)

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


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference, each convolution that a batch norm follows merged with it.

    In eval mode a batch norm is an affine map per channel, y = gamma (x - mu) / sqrt(var + eps) +
    beta, so the convolution before it can absorb it: w' = w gamma / sqrt(var + eps) per output
    channel, b' = (b - mu) gamma / sqrt(var + eps) + beta (`torch.nn.utils.fusion.fuse_conv_bn_eval`,
    transposed convolutions included). The copy computes what the model computes in eval mode, up
    to float rounding, with one pass less over each feature map (`bench/fold_check.py`: with passes
    of about 256 drawings, the likelihood takes two thirds of the time on a CPU). Only for scoring: the copy is in eval mode, without gradients, and its
    folded layers cannot be trained. The model itself is not changed."""
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(norm, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose2d))
                module[i + 1] = nn.Identity()
    return folded


class GradientReversal(torch.autograd.Function):
    """Identity forward, -scale * gradient backward (Ganin and Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class ProjectionHead(nn.Module):
    """A two-layer projection of the content means that the contrastive term acts on in place of
    the means themselves (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", section 4.2: the code before such a head keeps what the contrastive task
    alone would discard)."""

    def __init__(self, content_dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(content_dim, width), nn.ReLU(inplace=True), nn.Linear(width, width))

    def forward(self, content_mean: torch.Tensor) -> torch.Tensor:
        return self.net(content_mean)  # (B, width)


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
