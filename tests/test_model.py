import json
import re
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import omnivae
from fixtures import synthetic_omniglot
from omnivae.config import ConfigError, make_config
from omnivae.model import (Discriminator, ModelConfig, Noise, ResidualBlock, StructuredVAE, StyleAdversary, conv4_sizes,
                           feature_sizes, fold_batch_norm)
from omnivae.train import train


def small(**overrides):
    return ModelConfig(**{"channels": 4, "hidden": 16, "content_dim": 6, "style_dim": 3, **overrides})


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("size", [28, 32, 64, 105])
def test_every_image_size_round_trips_its_shape(size):
    model = StructuredVAE(small(image_size=size))
    x = torch.rand(2, 1, size, size)
    out = model(x)
    assert out.logits.shape == x.shape
    assert out.content.shape == (2, 6) and out.style.shape == (2, 3)


def test_feature_sizes():
    assert feature_sizes(28) == [28, 14, 7]
    assert feature_sizes(105) == [105, 53, 27, 14, 7]
    assert feature_sizes(64) == [64, 32, 16, 8]


# The default model's state dict before the encoder became a choice: runs saved then must load.
CONV_KEYS = {
    **{f"features.{i}.{k}": shape for i, (cin, c) in enumerate([(1, 32), (32, 64), (64, 128)])
       for k, shape in [("0.weight", (c, cin, 3, 3)), ("1.weight", (c,)), ("1.bias", (c,)), ("1.running_mean", (c,)),
                        ("1.running_var", (c,)), ("1.num_batches_tracked", ())]},
    "trunk.1.weight": (256, 6272), "trunk.1.bias": (256,),
    "content_head.weight": (64, 256), "content_head.bias": (64,),
    "style_head.weight": (32, 256), "style_head.bias": (32,),
    "expand.0.weight": (256, 48), "expand.0.bias": (256,), "expand.2.weight": (6272, 256), "expand.2.bias": (6272,),
    **{f"upsample.{i}.{k}": shape for i, (cin, c) in enumerate([(128, 64), (64, 32)])
       for k, shape in [("0.weight", (cin, c, 3, 3)), ("1.weight", (c,)), ("1.bias", (c,)), ("1.running_mean", (c,)),
                        ("1.running_var", (c,)), ("1.num_batches_tracked", ())]},
    "to_logits.weight": (1, 32, 3, 3), "to_logits.bias": (1,),
}


def test_default_conv_encoder_keeps_its_state_dict():
    state = StructuredVAE(ModelConfig()).state_dict()
    assert ModelConfig().encoder == "conv"
    assert list(state) == list(CONV_KEYS)
    assert {k: tuple(v.shape) for k, v in state.items()} == CONV_KEYS


class OldConvVAE(torch.nn.Module):
    """The StructuredVAE's layers as they were built before `encoder` existed, in the same order."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        sizes = feature_sizes(c.image_size)
        widths = [c.channels * 2**i for i in range(len(sizes))]

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, widths[0], 1), *[block(widths[i - 1], widths[i], 2)
                                                                for i in range(1, len(sizes))])
        flat = widths[-1] * sizes[-1] ** 2
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(flat, c.hidden), nn.ReLU())
        self.content_head = nn.Linear(c.hidden, 2 * c.content_dim)
        self.style_head = nn.Linear(c.hidden, 2 * c.style_dim)
        self.expand = nn.Sequential(nn.Linear(c.content_dim + c.style_dim, c.hidden), nn.ReLU(),
                                    nn.Linear(c.hidden, flat), nn.ReLU())
        self.upsample = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose2d(widths[i], widths[i - 1], 3, 2, 1, bias=False,
                                             output_padding=sizes[i - 1] - (2 * sizes[i] - 1)),
                          nn.BatchNorm2d(widths[i - 1]), nn.ReLU())
            for i in range(len(sizes) - 1, 0, -1)])
        self.to_logits = nn.Conv2d(widths[0], 1, 3, 1, 1)


@pytest.mark.parametrize("size", [28, 105])
def test_conv_encoder_is_bit_for_bit_the_old_model(size):
    config = small(image_size=size)
    torch.manual_seed(0)
    old = OldConvVAE(config).eval()
    torch.manual_seed(0)
    new = StructuredVAE(config).eval()
    assert_same_state(old, new)
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        h = old.trunk(old.features(x))
        q = new.posterior(x)
        torch.testing.assert_close(q.content_mean, old.content_head(h).chunk(2, 1)[0], rtol=0, atol=0)
        torch.testing.assert_close(q.style_mean, old.style_head(h).chunk(2, 1)[0], rtol=0, atol=0)
        z = torch.randn(3, config.content_dim + config.style_dim)
        sizes, widths = feature_sizes(size), [config.channels * 2**i for i in range(len(feature_sizes(size)))]
        h = old.expand(z).view(-1, widths[-1], sizes[-1], sizes[-1])
        logits = new.decode_logits(z[:, : config.content_dim], z[:, config.content_dim :])
        torch.testing.assert_close(logits, old.to_logits(old.upsample(h)), rtol=0, atol=0)


def test_conv4_sizes():
    assert conv4_sizes(28) == [28, 14, 7, 3, 1]
    assert conv4_sizes(32) == [32, 16, 8, 4, 2]
    assert conv4_sizes(64) == [64, 32, 16, 8, 4]
    assert conv4_sizes(105) == [105, 52, 26, 13, 6]


@pytest.mark.parametrize("size, side", [(28, 1), (32, 2), (64, 4), (105, 6)])
def test_conv4_encoder_shapes_at_every_image_size(size, side):
    model = StructuredVAE(small(image_size=size, encoder="conv4"))
    x = torch.rand(2, 1, size, size)
    features = model.features(x)
    assert features.shape == (2, 8, side, side)  # 2 * channels filters after four 2x2 max-pools
    assert len(model.features) == 4 and all(isinstance(b[3], nn.MaxPool2d) for b in model.features)
    assert model.trunk[1].in_features == 8 * side * side
    out = model(x, group_size=2)
    assert out.logits.shape == x.shape
    assert out.content_mean.shape == (2, 6) and out.style.shape == (2, 3)


def test_default_width_of_conv4_is_the_literatures_64():
    model = StructuredVAE(ModelConfig(encoder="conv4"))
    assert [block[0].out_channels for block in model.features] == [64, 64, 64, 64]
    assert model.trunk[1].in_features == 64  # 28 -> 14 -> 7 -> 3 -> 1


def test_the_decoder_does_not_depend_on_the_encoder():
    conv, conv4 = StructuredVAE(small()).state_dict(), StructuredVAE(small(encoder="conv4")).state_dict()
    decoder = [k for k in conv if k.split(".")[0] in ("expand", "upsample", "to_logits")]
    assert decoder and {k: conv[k].shape for k in decoder} == {k: conv4[k].shape for k in decoder}
    assert conv["features.0.0.weight"].shape != conv4["features.0.0.weight"].shape


def test_unknown_encoder_is_one_clear_error():
    with pytest.raises(ConfigError, match="encoder must be one of conv, resnet, conv4, got 'vit'"):
        ModelConfig(encoder="vit")


def test_grouped_forward_shares_content_within_groups_only():
    torch.manual_seed(0)
    model = StructuredVAE(small())
    out = model(torch.rand(6, 1, 28, 28), group_size=3)
    assert torch.equal(out.content[0], out.content[2]) and torch.equal(out.content_mean[0], out.content_mean[1])
    assert not torch.equal(out.content[0], out.content[3])
    assert not torch.equal(out.style[0], out.style[1])  # style stays per drawing
    # Each drawing's own content mean is kept for the content-level terms.
    assert not torch.equal(out.drawing_content_mean[0], out.drawing_content_mean[1])


def test_group_posterior_is_the_product_of_the_drawings_posteriors():
    torch.manual_seed(0)
    model = StructuredVAE(small()).eval()
    x = torch.rand(4, 1, 28, 28)
    q = model.posterior(x)
    precision = (-q.content_logvar).exp()
    expected = (q.content_mean * precision).sum(0) / precision.sum(0)
    torch.testing.assert_close(model(x, group_size=4).content_mean[0], expected)


def test_encode_is_deterministic_and_decode_gives_probabilities():
    model = StructuredVAE(small()).eval()
    x = torch.rand(3, 1, 28, 28)
    c1, s1 = model.encode(x)
    c2, s2 = model.encode(x)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    p = model.decode(c1, s1)
    assert p.shape == (3, 1, 28, 28) and p.min() >= 0 and p.max() <= 1


def test_style_adversary_reverses_gradients():
    adversary = StyleAdversary(3, 5, hidden=8)
    style = torch.randn(4, 3, requires_grad=True)
    adversary(style, scale=1.0).sum().backward()
    reversed_grad = style.grad.clone()
    style.grad = None
    adversary.net(style).sum().backward()
    torch.testing.assert_close(reversed_grad, -style.grad)


def test_discriminator_outputs_one_logit_per_code():
    assert Discriminator(6, 8)(torch.randn(5, 6)).shape == (5,)


def test_model_is_built_from_its_own_config():
    model = StructuredVAE(ModelConfig())
    assert model.config == ModelConfig() and not hasattr(model, "cfg")
    assert (model.image_size, model.content_dim, model.style_dim) == (28, 32, 16)
    cfg = make_config("quick", {"content_dim": 5, "grouping": "average"})
    assert ModelConfig.from_config(cfg) == ModelConfig(28, 5, cfg.style_dim, cfg.channels, cfg.hidden, "average")
    with pytest.raises(ValueError, match="grouping"):
        ModelConfig(grouping="sum")


def test_gradients_flow_through_encode_and_decode():
    torch.manual_seed(0)
    model = StructuredVAE(small())
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    content, style = model.encode(x)
    model.decode(content, style).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0  # the model can sit inside a larger differentiable pipeline


def outputs(model, x):
    with torch.no_grad():
        content, style = model.encode(x)
        return content, style, model.decode_logits(content, style, x)  # deterministic for every decoder


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def assert_same_model(a, b, x):
    assert a.config == b.config
    assert_same_state(a, b)
    for u, v in zip(outputs(a.eval(), x), outputs(b.eval(), x)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("decoder", ["deconv", "resnet", "pixelcnn"])
def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, no_network, decoder):
    torch.manual_seed(0)
    model = StructuredVAE(small(grouping="average", decoder=decoder, pixelcnn_layers=2, pixelcnn_channels=5))
    x = torch.rand(5, 1, 28, 28)
    model(x)  # moves the batch-norm running statistics away from their initial values
    model.save_pretrained(tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "config.json").read_text()) == vars(model.config)
    loaded = StructuredVAE.from_pretrained(tmp_path / "hub")
    assert not loaded.training
    assert loaded.config.decoder == decoder and loaded.config.pixelcnn_channels == 5
    assert_same_model(model, loaded, x)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    content, style = torch.randn(4, 6), torch.randn(4, 3)
    assert torch.equal(model.eval().sample(content, style, generator()), loaded.sample(content, style, generator()))


def test_a_config_without_decoder_fields_loads_as_deconv(tmp_path, no_network):
    """Configs written before the decoder choice (no decoder keys) still load, as the deconv decoder."""
    model = StructuredVAE(small())
    model.save_pretrained(tmp_path / "hub")
    path = tmp_path / "hub" / "config.json"
    values = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in values.items() if not k.startswith(("decoder", "pixelcnn"))}))
    loaded = StructuredVAE.from_pretrained(tmp_path / "hub")
    assert loaded.config.decoder == "deconv" and not loaded.autoregressive
    assert_same_model(model, loaded, torch.rand(3, 1, 28, 28))


# The deconv decoder's state-dict names, as runs saved before the decoder choice hold them.
DECONV_KEYS = (
    [f"features.{i}.0.weight" for i in range(3)]
    + [f"features.{i}.1.{k}" for i in range(3) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + ["trunk.1.weight", "trunk.1.bias", "content_head.weight", "content_head.bias", "style_head.weight",
       "style_head.bias", "expand.0.weight", "expand.0.bias", "expand.2.weight", "expand.2.bias"]
    + [f"upsample.{i}.0.weight" for i in range(2)]
    + [f"upsample.{i}.1.{k}" for i in range(2) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    + ["to_logits.weight", "to_logits.bias"]
)


def test_deconv_decoder_keeps_its_state_dict_names_and_network():
    model = StructuredVAE(small())
    assert sorted(model.state_dict()) == sorted(DECONV_KEYS)
    assert ModelConfig().decoder == "deconv" and not model.autoregressive
    # The network as it was: the codes through expand, the transposed convolutions and to_logits.
    content, style = torch.randn(3, 6), torch.randn(3, 3)
    model.eval()
    with torch.no_grad():
        h = model.expand(torch.cat([content, style], 1)).view(3, 16, 7, 7)
        expected = model.to_logits(model.upsample(h))
        assert torch.equal(model.decode_logits(content, style), expected)
        assert torch.equal(model.decode(content, style), torch.sigmoid(expected))
    # The other decoders add their own modules beside these names and change none of them.
    for decoder, prefix in (("resnet", "residual."), ("pixelcnn", "head.")):
        keys = set(StructuredVAE(small(decoder=decoder)).state_dict())
        assert set(DECONV_KEYS) < keys and all(k.startswith(prefix) for k in keys - set(DECONV_KEYS))


def test_model_config_refuses_bad_decoder_values():
    with pytest.raises(ValueError, match="decoder must be one of deconv, resnet, pixelcnn, got 'gan'"):
        ModelConfig(decoder="gan")
    for name in ("pixelcnn_layers", "pixelcnn_channels"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            ModelConfig(**{name: 0})


@pytest.mark.parametrize("decoder", ["deconv", "resnet", "pixelcnn"])
def test_every_decoder_gives_logits_decodings_and_samples(decoder):
    torch.manual_seed(0)
    model = StructuredVAE(small(decoder=decoder)).eval()
    x = (torch.rand(4, 1, 28, 28) < 0.3).float()
    content, style = model.encode(x)
    logits = model.decode_logits(content, style, x)
    assert logits.shape == (4, 1, 28, 28) and torch.isfinite(logits).all()
    assert model.autoregressive == (decoder == "pixelcnn")
    drawings = model.sample(content, style, torch.Generator().manual_seed(0))
    assert drawings.shape == (4, 1, 28, 28) and set(drawings.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(drawings, model.sample(content, style, torch.Generator().manual_seed(0)))  # seeded
    decoded = model.decode(content, style, generator=torch.Generator().manual_seed(0))
    if decoder == "pixelcnn":  # no probability map: decode samples
        assert torch.equal(decoded, drawings)
        with pytest.raises(ValueError, match="needs the images x"):
            model.decode_logits(content, style)
    else:  # probabilities; a sample is one Bernoulli draw of them with the generator's uniforms
        torch.testing.assert_close(decoded, torch.sigmoid(logits))
        uniform = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        assert torch.equal(drawings, (uniform < decoded).float())


def _pixelcnn(size=16, layers=3, channels=4):
    torch.manual_seed(0)
    return StructuredVAE(small(image_size=size, decoder="pixelcnn", pixelcnn_layers=layers,
                               pixelcnn_channels=channels)).eval()


def test_pixelcnn_logits_are_causal_with_a_few_rows_of_reach():
    """d logit(p) / d x(q) is exactly 0 for every q at or after p in raster order, and for q more
    than layers + 1 rows above p; it is not 0 for the pixel left of p nor for the farthest row seen."""
    size, layers = 10, 3
    model = _pixelcnn(size, layers).double()
    content, style = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    x = (torch.rand(1, 1, size, size) < 0.4).double()
    jacobian = torch.autograd.functional.jacobian(lambda image: model.decode_logits(content, style, image), x)
    jacobian = jacobian.reshape(size * size, size * size)  # (logit p, pixel q), raster order
    p, q = torch.meshgrid(torch.arange(size * size), torch.arange(size * size), indexing="ij")
    seen = (q < p) & (p // size - q // size <= layers + 1)  # before p, within the reach
    assert torch.all(jacobian[~seen] == 0)
    for row, col in ((5, 4), (9, 9)):
        at = row * size + col
        assert jacobian[at, at - 1] != 0  # the pixel on its left
        assert jacobian[at, (row - layers - 1) * size + col].abs() > 0  # the farthest row it sees
    assert model.head.reach == layers + 1


def _naive_sample(model, content, style, uniform):
    """Pixel by pixel in raster order, each from a full teacher-forced pass over the image so far."""
    x = torch.zeros_like(uniform)
    size = x.shape[-1]
    with torch.no_grad():
        for i in range(size):
            for j in range(size):
                p = torch.sigmoid(model.decode_logits(content, style, x)[:, :, i, j])
                x[:, :, i, j] = (uniform[:, :, i, j] < p).float()
    return x


@pytest.mark.parametrize("layers", [1, 3])
def test_pixelcnn_slab_sampling_equals_naive_sampling(layers):
    model = _pixelcnn(16, layers)
    with torch.no_grad():  # a sharper head, so that the pixels before a pixel, up to the farthest row, matter
        for conv in [*model.head.horizontal, *model.head.vertical, model.head.out]:
            conv.weight.mul_(3.0)
    generator = torch.Generator().manual_seed(1)
    content, style = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    uniform = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(7))  # what sample draws first
    fast = model.sample(content, style, torch.Generator().manual_seed(7))
    assert torch.equal(fast, _naive_sample(model, content, style, uniform))
    assert 0.05 < fast.mean() < 0.95
    # Teacher forcing on the drawings gives what the sampler used: the logits are the same function.
    logits = model.decode_logits(content, style, fast)
    assert torch.equal(fast, (uniform < torch.sigmoid(logits)).float())


def test_conv4_round_trips_through_from_pretrained(tmp_path, no_network):
    torch.manual_seed(0)
    model = StructuredVAE(small(encoder="conv4", image_size=32))
    x = torch.rand(4, 1, 32, 32)
    model(x)
    model.save_pretrained(tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["encoder"] == "conv4"
    loaded = StructuredVAE.from_pretrained(tmp_path / "hub")
    assert loaded.config.encoder == "conv4"
    assert_same_model(model, loaded, x)


def test_a_config_json_without_encoder_loads_the_conv_encoder(tmp_path, no_network):
    """Folders saved before `encoder` existed have no such key: they hold the conv encoder."""
    model = StructuredVAE(small())
    model.save_pretrained(tmp_path / "hub")
    path = tmp_path / "hub" / "config.json"
    values = json.loads(path.read_text())
    del values["encoder"]
    path.write_text(json.dumps(values))
    loaded = StructuredVAE.from_pretrained(tmp_path / "hub")
    assert loaded.config == model.config and loaded.config.encoder == "conv"
    assert_same_model(model, loaded, torch.rand(2, 1, 28, 28))


def test_from_pretrained_reads_a_training_run_folder(tmp_path, no_network):
    cfg = make_config("quick", dict(channels=4, hidden=16, content_dim=4, style_dim=2, groups=4, group_size=4, epochs=1,
                                    rotations=False, device="cpu", content_regularizer="adversarial",
                                    style_adversary_weight=1.0))
    data = synthetic_omniglot()
    run = train(cfg, tmp_path / "run", dataset=data, progress=False)
    model = StructuredVAE.from_pretrained(run)
    assert model.config == ModelConfig.from_config(cfg) and not model.training
    # model.safetensors holds the VAE's own state dict; the helpers' weights live in train_state.pt.
    assert load_file(run / "model.safetensors").keys() == model.state_dict().keys()
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert set(state["modules"]) == {"style_adversary", "discriminator_content"}
    assert_same_model(model, omnivae.load(run), data.tensors()[:6])


def test_from_pretrained_refuses_weights_under_other_names(tmp_path, no_network):
    model = StructuredVAE(small())
    model.save_pretrained(tmp_path / "hub")
    prefixed = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(prefixed, str(tmp_path / "hub" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="Missing key"):
        StructuredVAE.from_pretrained(tmp_path / "hub")
    with pytest.raises(ConfigError, match="cannot load the model"):
        omnivae.load(tmp_path / "hub")


def test_detail_code_is_decoded_with_its_prior_mean_unless_given():
    torch.manual_seed(0)
    plain = StructuredVAE(small())
    assert plain.posterior(torch.rand(3, 1, 28, 28)).detail_mean.shape == (3, 0)
    assert plain.expand[0].in_features == 9 and not hasattr(plain, "detail_head")  # weights as before
    model = StructuredVAE(small(detail_dim=5)).eval()
    x = torch.rand(4, 1, 28, 28)
    q = model.posterior(x)
    assert q.detail_mean.shape == q.detail_logvar.shape == (4, 5)
    content, style = torch.randn(4, 6), torch.randn(4, 3)
    assert torch.equal(model.decode(content, style), model.decode(content, style, detail=torch.zeros(4, 5)))
    assert not torch.allclose(model.decode(content, style), model.decode(content, style, detail=torch.randn(4, 5)))
    # Rows kept get their sampled detail code, the others its prior mean 0.
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    noise = Noise(torch.randn(4, 6), torch.randn(4, 3), torch.randn(4, 5))
    out = model(x, 1, noise, detail_keep=keep)
    expected = q.detail_mean + (0.5 * q.detail_logvar).exp() * noise.detail
    assert torch.allclose(out.detail[0], expected[0]) and torch.equal(out.detail[1], torch.zeros(5))
    assert torch.equal(out.detail_keep, keep)
    assert torch.allclose(out.logits, model.decode_logits(out.content, out.style, detail=out.detail))
    # A reconstruction decodes all three posterior means.
    assert torch.allclose(model.reconstruct(x), model.decode(q.content_mean, q.style_mean, detail=q.detail_mean))
    assert torch.allclose(plain.eval().reconstruct(x), plain.decode(*plain.encode(x)))
    with pytest.raises(ValueError, match="detail_dim"):
        small(detail_dim=-1)


@pytest.mark.parametrize("encoder_blocks,decoder_blocks", [(2, 1), (1, 2), (3, 3)])
def test_deeper_conv_stacks_add_stride_one_blocks_at_each_level(encoder_blocks, decoder_blocks):
    """encoder_blocks / decoder_blocks add 3x3 stride-1 blocks at each level's size and width: at 28 px and
    4 channels the encoder's levels are 28, 14, 7 px at 4, 8, 16 channels, the decoder's after upsampling
    14 and 28 px at 8 and 4."""
    model = StructuredVAE(small(encoder_blocks=encoder_blocks, decoder_blocks=decoder_blocks)).eval()
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (1, 1) and module.in_channels == module.out_channels:
            module.register_forward_hook(lambda m, i, o, seen=seen: seen.append((o.shape[1], o.shape[-1])))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        q = model.posterior(x)
        logits = model.decode_logits(q.content_mean, q.style_mean)
    assert logits.shape == (2, 1, 28, 28)
    extra = encoder_blocks - 1
    assert seen == [(4, 28)] * extra + [(8, 14)] * extra + [(16, 7)] * extra + \
        [(8, 14)] * (decoder_blocks - 1) + [(4, 28)] * (decoder_blocks - 1)
    assert len(model.features) == 3 * encoder_blocks
    refine = {id(p) for p in model.refine.parameters()} if decoder_blocks > 1 else set()
    assert refine <= {id(p) for p in model.decoder_parameters()}
    assert hasattr(model, "refine") == (decoder_blocks > 1)


def test_deeper_stacks_keep_the_one_block_model_and_refuse_conv4():
    torch.manual_seed(0)
    one = StructuredVAE(small())
    torch.manual_seed(0)
    same = StructuredVAE(small(encoder_blocks=1, decoder_blocks=1))
    assert_same_state(one, same)
    with pytest.raises(ConfigError, match=re.escape("encoder_blocks=2 is for encoder=conv or resnet, got encoder='conv4' (set encoder_blocks=1 with it)")):
        small(encoder="conv4", encoder_blocks=2)
    with pytest.raises(ValueError, match="decoder_blocks must be >= 1, got 0"):
        small(decoder_blocks=0)


@pytest.mark.parametrize("encoder_blocks", [1, 2, 3])
def test_resnet_encoder_adds_residual_blocks_at_each_level(encoder_blocks):
    """encoder=resnet: the conv encoder's levels (28, 14, 7 px at 4, 8, 16 channels), each level's first
    block followed by encoder_blocks - 1 residual blocks of two 3x3 convolutions; one block per level is
    the conv encoder itself."""
    model = StructuredVAE(small(encoder="resnet", encoder_blocks=encoder_blocks)).eval()
    blocks = [m for m in model.features if isinstance(m, ResidualBlock)]
    seen = []
    for block in blocks:
        block.register_forward_hook(lambda m, i, o, seen=seen: seen.append((o.shape[1], o.shape[-1])))
    with torch.no_grad():
        q = model.posterior(torch.rand(2, 1, 28, 28))
    extra = encoder_blocks - 1
    assert seen == [(4, 28)] * extra + [(8, 14)] * extra + [(16, 7)] * extra
    assert q.content_mean.shape == (2, 6) and len(model.features) == 3 * encoder_blocks
    if encoder_blocks == 1:
        torch.manual_seed(0)
        conv = StructuredVAE(small())
        torch.manual_seed(0)
        assert_same_state(conv, StructuredVAE(small(encoder="resnet")))


def test_residual_block_adds_its_branch_to_its_input():
    """relu(h + branch(h)): with the branch's last batch norm scaled to 0 the block is relu(h)."""
    torch.manual_seed(0)
    block = ResidualBlock(4).eval()
    h = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert torch.allclose(block(h), F.relu(h + block.branch(h)))
        block.branch[-1].weight.zero_(), block.branch[-1].bias.zero_()
        assert torch.equal(block(h), F.relu(h))


def test_resnet_decoder_with_refine_blocks_decodes():
    model = StructuredVAE(small(decoder="resnet", decoder_blocks=2)).eval()
    with torch.no_grad():
        assert model.decode(torch.randn(3, 6), torch.randn(3, 3)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("overrides", [{}, {"decoder": "resnet", "encoder_blocks": 2}, {"decoder_blocks": 2},
                                       {"encoder": "resnet", "encoder_blocks": 2},
                                       {"decoder": "pixelcnn", "pixelcnn_layers": 2, "pixelcnn_channels": 4}])
def test_folded_batch_norm_computes_what_the_model_computes_in_eval_mode(overrides):
    """Each conv or transposed conv that a batch norm follows absorbs it: the copy gives the eval-mode
    posterior and logits up to float rounding, has no batch norm left, and leaves the model alone."""
    torch.manual_seed(0)
    model = StructuredVAE(small(**overrides))
    with torch.no_grad():  # running statistics and affine parameters far from their initial 0 / 1
        for _ in range(3):
            model(torch.rand(8, 1, 28, 28) * 3, group_size=2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0), m.bias.uniform_(-1.0, 1.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    x = (torch.rand(5, 1, 28, 28) < 0.3).float()
    with torch.no_grad():
        q, p = model.posterior(x), folded.posterior(x)
        torch.testing.assert_close(p.content_mean, q.content_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(p.style_logvar, q.style_logvar, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.decode_logits(q.content_mean, q.style_mean, x),
                                   model.decode_logits(q.content_mean, q.style_mean, x), rtol=1e-4, atol=1e-4)
