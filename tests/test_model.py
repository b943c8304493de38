import pytest
import torch

from omnivae.config import make_config
from omnivae.model import Discriminator, ModelConfig, StructuredVAE, StyleAdversary, feature_sizes


def small(**overrides):
    return ModelConfig(**{"channels": 4, "hidden": 16, "content_dim": 6, "style_dim": 3, **overrides})


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
