import json
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnivae
from fixtures import synthetic_omniglot
from omnivae.config import ConfigError, make_config
from omnivae.model import Discriminator, ModelConfig, StructuredVAE, StyleAdversary, feature_sizes
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
        return content, style, model.decode(content, style)


def assert_same_model(a, b, x):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    for u, v in zip(outputs(a.eval(), x), outputs(b.eval(), x)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, no_network):
    torch.manual_seed(0)
    model = StructuredVAE(small(grouping="average"))
    x = torch.rand(5, 1, 28, 28)
    model(x)  # moves the batch-norm running statistics away from their initial values
    model.save_pretrained(tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "config.json").read_text()) == vars(model.config)
    loaded = StructuredVAE.from_pretrained(tmp_path / "hub")
    assert not loaded.training
    assert_same_model(model, loaded, x)


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
