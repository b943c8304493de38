"""The learned mixture prior of the content code (prior_components > 0): its density, its KL
estimate, its samples, and every place that reads the prior (training, likelihoods, generation)."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from omnivae import generate, losses, metrics
from omnivae.config import ConfigError, make_config
from omnivae.model import ModelConfig, StructuredVAE


def test_mixture_log_density_known_answers():
    # One dimension, two components: p(z) = 1/2 N(z; -1, 1) + 1/2 N(z; 2, 4), by hand.
    means, logvars = torch.tensor([[-1.0], [2.0]]), torch.tensor([[0.0], [math.log(4.0)]])
    z = torch.tensor([[0.0], [1.5], [-3.0]])

    def normal(x, mu, var):
        return math.exp(-(x - mu) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)

    expected = [math.log(0.5 * normal(v, -1, 1) + 0.5 * normal(v, 2, 4)) for v in (0.0, 1.5, -3.0)]
    torch.testing.assert_close(losses.mixture_log_density(z, means, logvars), torch.tensor(expected))
    # Weights softmax(logits) = (1/4, 3/4).
    weighted = [math.log(0.25 * normal(v, -1, 1) + 0.75 * normal(v, 2, 4)) for v in (0.0, 1.5, -3.0)]
    logits = torch.tensor([0.0, math.log(3.0)]) + 5.0  # a constant shift changes nothing
    torch.testing.assert_close(losses.mixture_log_density(z, means, logvars, logits), torch.tensor(weighted))
    # K identical components are that one Gaussian; K standard normals are N(0, I).
    z = torch.randn(5, 3, 4)
    mean, logvar = torch.randn(1, 4), torch.randn(1, 4)
    single = losses.gaussian_log_density(z, mean[0], logvar[0])  # (5, 3)
    torch.testing.assert_close(losses.mixture_log_density(z, mean.repeat(7, 1), logvar.repeat(7, 1)), single)
    standard = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(losses.mixture_log_density(z, torch.zeros(3, 4), torch.zeros(3, 4)), standard)


def test_sampled_kl_is_unbiased_for_the_closed_form():
    # A one-component "mixture" N(m, s^2): the one-sample estimates average to the closed-form KL.
    torch.manual_seed(0)
    mean, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[-0.5, 0.3, -2.0]])
    prior_mean, prior_logvar = torch.tensor([[1.0, 0.0, 1.5]]), torch.tensor([[0.2, -0.4, 0.0]])
    n = 200_000
    z = losses.reparameterize(mean.expand(n, 3), logvar.expand(n, 3))
    estimate = losses.sampled_kl(z, mean, logvar, lambda v: losses.mixture_log_density(v, prior_mean, prior_logvar))
    exact = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(prior_mean, (0.5 * prior_logvar).exp())).sum()
    assert estimate.shape == (n,)
    assert estimate.mean().item() == pytest.approx(exact.item(), abs=0.02)


def test_the_model_prior_density_samples_and_kl():
    normal = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=3, style_dim=2))
    z = torch.randn(6, 3)
    torch.testing.assert_close(normal.content_log_prior(z), Normal(0.0, 1.0).log_prob(z).sum(-1))
    assert normal.prior_parameters() == []
    # N(0, I) samples are temperature * randn from the generator, as generation always drew them.
    drawn = normal.sample_content(4, torch.Generator().manual_seed(3), temperature=0.5)
    torch.testing.assert_close(drawn, 0.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(3)))

    mixture = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=3, style_dim=2, prior_components=5))
    assert [p.shape for p in mixture.prior_parameters()] == [(5, 3), (5, 3), (5,)]
    with torch.no_grad():
        mixture.prior_logvars.fill_(-12.0)  # components of near zero width: samples sit on their means
    drawn = mixture.sample_content(50, torch.Generator().manual_seed(0))
    gaps = torch.cdist(drawn, mixture.prior_means.detach()).min(1).values  # (50,) to the nearest mean
    assert drawn.shape == (50, 3) and gaps.max() < 0.01
    assert len({tuple(row) for row in drawn.round(decimals=2).tolist()}) > 1  # several components drawn
    torch.testing.assert_close(mixture.sample_content(50, torch.Generator().manual_seed(0)), drawn)
    with torch.no_grad():
        mixture.prior_logits.copy_(torch.tensor([0.0, 0.0, 30.0, 0.0, 0.0]))  # all the weight on component 2
    drawn = mixture.sample_content(20, torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn, mixture.prior_means[2].detach().expand(20, 3), atol=0.01, rtol=0)
    # The KL estimate: mean over many rows of one sample each -> the closed form, for a prior made N(0, I).
    with torch.no_grad():
        mixture.prior_means.zero_()
        mixture.prior_logvars.zero_()
    mean, logvar = torch.randn(1, 3).expand(100_000, 3), torch.full((100_000, 3), -0.7)
    estimate = mixture.content_kl(mean, logvar, torch.Generator().manual_seed(1)).mean()
    assert estimate.item() == pytest.approx(losses.gaussian_kl(mean[:1], logvar[:1]).item(), abs=0.02)


def test_a_mixture_of_standard_normals_scores_as_the_standard_normal_prior():
    # The same weights under N(0, I) and under a mixture whose every component is N(0, I): every
    # likelihood is the same number, so the metrics read the model's prior and nothing else.
    torch.manual_seed(0)
    normal = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2)).eval()
    mixture = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2, prior_components=3)).eval()
    # (any weights: every component is N(0, I))
    state = {**normal.state_dict(), "prior_means": torch.zeros(3, 4), "prior_logvars": torch.zeros(3, 4),
             "prior_logits": torch.randn(3)}
    mixture.load_state_dict(state)
    images = metrics.binarize(torch.rand(6, 1, 28, 28) * 0.3, seed=1)
    for fn, kwargs in ((metrics.iwae_nll, {}), (metrics.set_nll, {"sets": np.arange(6).reshape(3, 2)})):
        a = fn(normal, images, k=20, batch_size=3, chunk=7, seed=2, **kwargs)["nll"]
        b = fn(mixture, images, k=20, batch_size=3, chunk=7, seed=2, **kwargs)["nll"]
        assert a == pytest.approx(b, rel=1e-5)
    # With the components moved, the likelihood changes (the prior is read, not ignored).
    with torch.no_grad():
        mixture.prior_means.fill_(3.0)
    moved = metrics.iwae_nll(mixture, images, k=20, batch_size=3, chunk=7, seed=2)["nll"]
    assert moved > metrics.iwae_nll(normal, images, k=20, batch_size=3, chunk=7, seed=2)["nll"] + 1.0
    # Prior samples for figures come from the components.
    with torch.no_grad():
        mixture.prior_logvars.fill_(-12.0)
    drawn = generate.sample(mixture, 4, seed=0)
    expected = mixture.decode(mixture.sample_content(4, torch.Generator().manual_seed(0)),
                              torch.randn(4, 2, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(drawn, expected)


def test_training_with_the_mixture_prior():
    from omnivae.train import _loss, build_parts

    cfg = make_config("quick", dict(channels=4, hidden=32, content_dim=4, style_dim=2, groups=4, group_size=2,
                                    contrastive_weight=1.0, content_regularizer="kl", content_weight=0.5,
                                    prior_components=6, weight_decay=0.5, lr=0.1, device="cpu"))
    parts = build_parts(cfg, classes=4, device=torch.device("cpu"))
    prior = {id(p) for p in parts.model.prior_parameters()}
    decayed = [g for g in parts.optimizer.param_groups if g["weight_decay"] > 0]
    assert prior and not prior & {id(p) for g in decayed for p in g["params"]}  # the prior never decays
    torch.manual_seed(0)
    x, label = torch.rand(8, 1, 28, 28), torch.arange(4).repeat_interleave(2)
    out = parts.model(x, group_size=2)
    _, terms = _loss(parts, cfg, x, label, 1.0, out)
    # The content term: one sample per group of log q(z | X) - log p(z), counted once per group.
    mean, logvar, z = out.content_mean[::2], out.content_logvar[::2], out.content[::2]
    expected = losses.gaussian_log_density(z, mean, logvar) - parts.model.content_log_prior(z)
    torch.testing.assert_close(terms["content"], expected.mean() / 2)
    torch.testing.assert_close(terms["kl_content"], expected.mean().detach())
    terms["content"].backward()
    assert parts.model.prior_means.grad.abs().sum() > 0 and parts.model.prior_logvars.grad.abs().sum() > 0


def test_the_mixture_prior_needs_the_kl_regulariser():
    with pytest.raises(ConfigError, match="prior_components .* needs content_regularizer=kl, got 'mmd'"):
        make_config("quick", dict(content_regularizer="mmd", prior_components=8))
    with pytest.raises(ConfigError, match="prior_components must be >= 0"):
        make_config("quick", dict(content_regularizer="kl", prior_components=-1))
