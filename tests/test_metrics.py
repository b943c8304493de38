"""Known-answer tests for omnivae/metrics.py."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from omnivae import metrics
from omnivae.model import ModelConfig, Posterior, StructuredVAE


# ---- clustering ------------------------------------------------------------------------------


def test_cluster_accuracy_perfect_and_permuted():
    true = np.repeat(np.arange(5), 4)
    assert metrics.cluster_accuracy(true, true) == 1.0
    permuted = np.array([3, 0, 4, 1, 2])[true] + 100  # renamed cluster ids
    assert metrics.cluster_accuracy(true, permuted) == 1.0


def test_cluster_accuracy_constant_prediction_is_one_over_k():
    true = np.repeat(np.arange(4), 25)
    assert metrics.cluster_accuracy(true, np.zeros(100, dtype=int)) == pytest.approx(0.25)


def test_cluster_accuracy_hand_computed():
    # Contingency (clusters x labels): c0 -> {a: 2, b: 1}, c1 -> {b: 2}, c2 -> {a: 1, c: 1}.
    # Best matching: c0->a (2), c1->b (2), c2->c (1): 5 of 7.
    true = np.array([0, 0, 1, 1, 1, 0, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 2])
    assert metrics.cluster_accuracy(true, pred) == pytest.approx(5 / 7)
    # More clusters than labels: the surplus cluster's points are errors.
    assert metrics.cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)
    # Fewer clusters than labels.
    assert metrics.cluster_accuracy([0, 1, 2, 2], [5, 5, 5, 7]) == pytest.approx(2 / 4)


def test_kmeans_scores_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 4)) * 50.0
    labels = np.repeat(np.arange(6) + 10, 30)
    codes = centres[labels - 10] + rng.normal(size=(180, 4))
    scores = metrics.kmeans_scores(codes, labels, seed=0)
    assert scores["accuracy"] == 1.0
    assert scores["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert scores["clusters"] == 6


def test_kmeans_scores_collapsed_codes():
    labels = np.repeat(np.arange(5), 20)
    codes = np.ones((100, 3))
    with pytest.warns(Warning):  # scikit-learn warns it finds fewer distinct points than clusters
        scores = metrics.kmeans_scores(codes, labels, seed=0)
    assert scores["accuracy"] == pytest.approx(0.2)
    assert scores["nmi"] == pytest.approx(0.0, abs=1e-9)


# ---- few-shot --------------------------------------------------------------------------------


def _labels(alphabets=(8, 25, 30), drawers=6):
    """Labels of a fake set: alphabet a has alphabets[a] characters, each drawn by `drawers` people."""
    character, alphabet, drawer = [], [], []
    c = 1
    for a, count in enumerate(alphabets):
        for _ in range(count):
            for d in range(1, drawers + 1):
                character.append(c)
                alphabet.append(a)
                drawer.append(d)
            c += 1
    return np.array(character), np.array(alphabet), np.array(drawer)


def test_few_shot_episodes_follow_lake_et_al():
    # One alphabet, one support drawer and another query drawer per episode (Lake et al. 2015).
    character, alphabet, drawer = _labels()
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=20, episodes=300, seed=1)
    assert support.shape == query.shape == (300, 20)
    assert np.all(character[support] == character[query])
    for e in range(300):
        assert len(np.unique(character[support[e]])) == 20
        assert len(np.unique(alphabet[support[e]])) == 1
        assert len(np.unique(drawer[support[e]])) == 1  # every support by the same drawer
        assert len(np.unique(drawer[query[e]])) == 1  # every query by another one
        assert drawer[support[e, 0]] != drawer[query[e, 0]]
    # Alphabet 0 has only 8 characters: never used for 20-way episodes; the others both are.
    assert set(np.unique(alphabet[support])) == {1, 2}
    # Every ordered (support drawer, query drawer) pair of the 6 drawers turns up.
    assert len(set(zip(drawer[support[:, 0]], drawer[query[:, 0]]))) == 6 * 5


def test_few_shot_episodes_seeded():
    character, alphabet, drawer = _labels()
    first = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=3)
    again = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=3)
    other = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_few_shot_episodes_need_two_drawers_sharing_enough_characters():
    # One alphabet of 25 characters by drawers 1-4; drawer 5 drew only characters 1-10.
    character, alphabet, drawer = _labels(alphabets=(25,), drawers=5)
    keep = (drawer != 5) | (character <= 10)
    character, alphabet, drawer = character[keep], alphabet[keep], drawer[keep]
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=20, episodes=200, seed=0)
    assert 5 not in drawer[support] and 5 not in drawer[query]  # it shares 10 < 20 characters with anyone
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=200, seed=0)
    assert 5 in drawer[support] and 5 in drawer[query]
    assert np.all(character[support[drawer[support[:, 0]] == 5]] <= 10)

    # 30 characters, each by two of three drawers, but any two drawers share only 10: every
    # character has a (support, query) pair, yet no 20-way episode has a single pair of drawers.
    character = np.repeat(np.arange(1, 31), 2)
    drawer = np.array([[1, 2]] * 10 + [[2, 3]] * 10 + [[1, 3]] * 10).ravel()
    alphabet = np.zeros_like(character)
    with pytest.raises(ValueError, match="no 20-way episode"):
        metrics.few_shot_episodes(character, alphabet, drawer, ways=20, episodes=1)
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=10, episodes=20, seed=0)
    assert np.all(character[support] == character[query])


def test_few_shot_episodes_across_alphabets_and_repeated_drawings():
    character, alphabet, drawer = _labels(alphabets=(3, 4), drawers=3)
    with pytest.raises(ValueError):  # no alphabet has 5 characters
        metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=1)
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=100, seed=0,
                                               within_alphabet=False)
    assert all(len(np.unique(character[s])) == 5 for s in support)
    assert any(len(np.unique(alphabet[s])) == 2 for s in support)
    assert all(len(np.unique(drawer[s])) == 1 for s in support)
    # A character drawn twice by a drawer: either drawing can be the one picked.
    character, alphabet, drawer = _labels(alphabets=(6,), drawers=2)
    again = drawer == 1
    character, alphabet, drawer = (np.concatenate([x, x[again]]) for x in (character, alphabet, drawer))
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=6, episodes=200, seed=0)
    by_one = np.concatenate([support[drawer[support[:, 0]] == 1], query[drawer[query[:, 0]] == 1]])
    assert len(np.unique(by_one)) == 12  # all 6 x 2 drawings of drawer 1
    assert np.all(character[support] == character[query])


def test_few_shot_accuracy_perfect_and_constant_codes():
    character, alphabet, drawer = _labels()
    rng = np.random.default_rng(0)
    perfect = np.eye(character.max() + 1)[character] + 1e-3 * rng.normal(size=(len(character), character.max() + 1))
    score = metrics.few_shot_accuracy(perfect, character, alphabet, drawer, ways=20, episodes=100, seed=0)
    assert score == {"accuracy": 1.0, "ci95": 0.0, "episodes": 100}
    # Constant and zero codes tie everywhere: chance, 1/20, with ties broken at random.
    for codes in (np.ones((len(character), 4)), np.zeros((len(character), 4))):
        score = metrics.few_shot_accuracy(codes, character, alphabet, drawer, ways=20, episodes=2000, seed=0)
        assert score["accuracy"] == pytest.approx(1 / 20, abs=0.005)
        assert score["ci95"] == pytest.approx(1.96 * math.sqrt(0.05 * 0.95 / 20 / 2000), rel=0.15)


def test_few_shot_ties_are_broken_fairly():
    # Supports in a fixed order and identical codes: every position wins 1/W of the time,
    # not position 0 always.
    ways, episodes = 5, 4000
    support = np.tile(np.arange(ways), (episodes, 1))  # (E, W), the same order in every episode
    query = support + ways
    correct = metrics._few_shot_correct(np.ones((2 * ways, 3)), support, query, seed=0)  # (E, W)
    assert correct.shape == (episodes, ways)
    assert np.allclose(correct.mean(0), 1 / ways, atol=0.025)
    # A tie between two supports, one of them right, scores 1/2; the untied query scores 1.
    codes = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    correct = metrics._few_shot_correct(codes, np.tile([0, 1, 2], (episodes, 1)), np.tile([3, 4, 5], (episodes, 1)), seed=1)
    assert correct.mean(0) == pytest.approx([0.5, 0.5, 1.0], abs=0.03)
    # Deterministic for a seed; scoring in chunks does not change it.
    again = metrics._few_shot_correct(codes, np.tile([0, 1, 2], (episodes, 1)), np.tile([3, 4, 5], (episodes, 1)), seed=1,
                                      chunk=7)
    assert np.array_equal(correct, again)


def test_few_shot_accuracy_hand_computed():
    # One 2-way episode: supports 0 and 1; query 2 points near support 1 (wrong), query 3 near 1 (right).
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert metrics._few_shot_correct(codes, np.array([[0, 1]]), np.array([[2, 3]])).tolist() == [[False, True]]
    # Cosine, not Euclidean: a long vector along support 0's direction still picks support 0.
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 1.0], [0.0, 5.0]])
    assert metrics._few_shot_correct(codes, np.array([[0, 1]]), np.array([[2, 3]])).tolist() == [[True, True]]


def test_mean_ci95_known_values():
    mean, half = metrics.mean_ci95([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5
    assert half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)  # sample sd sqrt(1/3), n = 4
    assert metrics.mean_ci95([0.3, 0.3, 0.3]) == (pytest.approx(0.3), 0.0)
    assert math.isnan(metrics.mean_ci95([0.7])[1])


def test_few_shot_ci_is_over_episodes_not_queries():
    # Codes perfect on alphabet 1 and constant on alphabet 2: a whole episode is right (1.0)
    # or at chance (~0.05), each half the time. The spread between episodes is sd ~0.476, far
    # more than queries drawn independently would give (sqrt(p (1 - p) / 20) ~0.11).
    character, alphabet, drawer = _labels()
    codes = np.eye(character.max() + 1)[character]
    codes[alphabet == 2] = 1.0
    episodes = 400
    score = metrics.few_shot_accuracy(codes, character, alphabet, drawer, ways=20, episodes=episodes, seed=2)
    assert score["accuracy"] == pytest.approx(0.525, abs=0.06)
    sd = math.sqrt(0.25 * 0.95 ** 2 + 0.5 * 0.05 * 0.95 / 20)
    assert score["ci95"] == pytest.approx(1.96 * sd / math.sqrt(episodes), rel=0.1)
    assert abs(score["accuracy"] - 0.525) < 2 * score["ci95"]


# ---- KL and prior match ----------------------------------------------------------------------


def test_per_image_kl_matches_torch_distributions():
    torch.manual_seed(0)
    cm, cl, sm, sl = torch.randn(7, 5), torch.randn(7, 5), torch.randn(7, 3), torch.randn(7, 3)
    std_normal = lambda t: torch.distributions.Normal(torch.zeros_like(t), torch.ones_like(t))  # noqa: E731
    expected_c = torch.distributions.kl_divergence(torch.distributions.Normal(cm, (0.5 * cl).exp()), std_normal(cm))
    expected_s = torch.distributions.kl_divergence(torch.distributions.Normal(sm, (0.5 * sl).exp()), std_normal(sm))
    kl = metrics.per_image_kl(cm, cl, sm, sl)
    assert kl["kl_content"] == pytest.approx(expected_c.sum(1).mean().item(), rel=1e-5)
    assert kl["kl_style"] == pytest.approx(expected_s.sum(1).mean().item(), rel=1e-5)
    assert kl["kl_total"] == pytest.approx(kl["kl_content"] + kl["kl_style"])


def test_prior_match_known_answers():
    rng = np.random.default_rng(0)
    d = 8
    codes = rng.normal(size=(4000, d))
    matched = metrics.prior_match(codes, seed=1, max_points=1000)
    assert matched["points"] == 1000
    floor = abs(matched["mmd2_floor"]) + 1e-4
    assert abs(matched["mmd2"]) < 5 * floor
    assert matched["gaussian_kl"] < 0.05

    shifted = metrics.prior_match(codes + 2.0, seed=1, max_points=1000)
    assert shifted["mmd2"] > 100 * floor
    assert shifted["gaussian_kl"] == pytest.approx(0.5 * d * 4, abs=0.3)  # 1/2 |mu|^2 = 16

    collapsed = metrics.prior_match(np.zeros((500, d)), seed=1)
    assert collapsed["mmd2"] > 100 * floor
    assert collapsed["gaussian_kl"] == math.inf

    # Deterministic for a seed.
    assert metrics.prior_match(codes, seed=1, max_points=1000) == matched


def test_sample_posterior_draws_from_each_posterior():
    mean = np.array([[3.0, -1.0]]).repeat(20000, 0)  # (N, 2)
    logvar = np.log(np.array([[4.0, 0.01]])).repeat(20000, 0)  # sd 2 and 0.1
    z = metrics.sample_posterior(mean, logvar, seed=0)
    assert z.mean(0) == pytest.approx([3.0, -1.0], abs=0.03)
    assert z.std(0) == pytest.approx([2.0, 0.1], rel=0.02)
    assert np.array_equal(z, metrics.sample_posterior(mean, logvar, seed=0))
    assert not np.array_equal(z, metrics.sample_posterior(mean, logvar, seed=1))
    assert np.array_equal(metrics.sample_posterior(mean, np.full_like(mean, -np.inf), seed=0), mean)


def test_prior_match_on_sampled_codes_sees_the_aggregate_posterior():
    # Means ~ N(0, 0.5 I) and every posterior variance 0.5: the aggregate posterior, the mixture
    # of the q(z | x), is exactly N(0, I), while the means alone are N(0, 0.5 I).
    n, d = 600, 4
    floors = [metrics.prior_match(np.random.default_rng(100 + s).normal(size=(n, d)), seed=s)["mmd2"] for s in range(6)]
    spread = np.std(floors)  # how far an exact match strays from 0 at this size
    means = np.random.default_rng(0).normal(size=(n, d)) * math.sqrt(0.5)
    logvar = np.full((n, d), math.log(0.5))
    sampled = metrics.prior_match(metrics.sample_posterior(means, logvar, seed=1), seed=2)
    means_only = metrics.prior_match(means, seed=2)
    assert abs(sampled["mmd2"]) < 4 * spread
    assert means_only["mmd2"] > 20 * spread
    assert sampled["gaussian_kl"] < 0.05
    # KL(N(0, 0.5 I) || N(0, I)) = d/2 (0.5 - 1 - log 0.5) ~ 0.386 d.
    assert means_only["gaussian_kl"] == pytest.approx(0.5 * d * (0.5 - 1 - math.log(0.5)), abs=0.1)


def test_fitted_gaussian_kl_exact():
    # Codes whose sample mean is m and sample covariance is exactly diag(v).
    base = np.array([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])  # mean 0, covariance I (ddof=1: 4/3)
    base = base / np.sqrt(4 / 3)
    v, m = np.array([4.0, 0.25]), np.array([1.0, -2.0])
    codes = base * np.sqrt(v) + m
    expected = 0.5 * (v.sum() + m @ m - 2 - np.log(v).sum())
    assert metrics._fitted_gaussian_kl(codes) == pytest.approx(expected, rel=1e-12)


# ---- likelihood ------------------------------------------------------------------------------


class ConstantDecoder(nn.Module):
    """Duck-typed model whose decoder ignores z, so p(x) = p(x | z) = Bernoulli(x; logits) exactly.

    With prior_posterior=True, q(z | x) = N(0, I) = p(z): every importance weight is then p(x)
    and the IWAE estimate is exact for any k. Otherwise q comes from a small linear encoder.
    """

    def __init__(self, logits: torch.Tensor, content_dim=3, style_dim=2, prior_posterior=False):
        super().__init__()
        self.logits = nn.Parameter(logits)  # (1, S, S)
        self.content_dim, self.style_dim = content_dim, style_dim
        self.prior_posterior = prior_posterior
        self.encoder = nn.Linear(logits.numel(), 2 * (content_dim + style_dim))

    @property
    def device(self):
        return self.logits.device

    def posterior(self, x):
        h = 0.3 * self.encoder(x.flatten(1))  # (B, 2 * (Dc + Ds))
        if self.prior_posterior:
            h = torch.zeros_like(h)
        cm, cl, sm, sl = h.split([self.content_dim, self.content_dim, self.style_dim, self.style_dim], 1)
        return Posterior(cm, cl, sm, sl)

    def decode_logits(self, content, style):
        return self.logits.expand(len(content), *self.logits.shape)  # (N, 1, S, S)


def _exact_nll(logits, images):
    log_p = -F.binary_cross_entropy_with_logits(logits.expand_as(images), images, reduction="none")
    return -log_p.flatten(1).sum(1).mean().item()


def test_iwae_exact_when_the_posterior_is_the_prior():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6)
    model = ConstantDecoder(logits, prior_posterior=True)
    images = metrics.binarize(torch.rand(9, 1, 6, 6), seed=0)
    result = metrics.iwae_nll(model, images, k=50, batch_size=4, chunk=16, seed=0)
    assert result["nll"] == pytest.approx(_exact_nll(logits, images), abs=1e-4)
    assert result["elbo_nll"] == pytest.approx(result["nll"], abs=1e-4)


def test_iwae_and_elbo_with_a_decoder_that_ignores_z():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6)
    model = ConstantDecoder(logits)
    images = metrics.binarize(torch.rand(9, 1, 6, 6), seed=0)
    exact = _exact_nll(logits, images)
    result = metrics.iwae_nll(model, images, k=4000, batch_size=9, chunk=1000, seed=0)
    # E[log w] = log p(x) - KL(q(z|x) || p(z)): the negative ELBO is the NLL plus the per-image KL.
    q = model.posterior(images)
    kl = metrics.per_image_kl(*[t.detach() for t in q])["kl_total"]
    assert kl > 0.05
    assert result["elbo_nll"] == pytest.approx(exact + kl, abs=0.02)
    # The k-sample bound is within 0.01 nats of the exact NLL, far tighter than the ELBO.
    assert result["nll"] == pytest.approx(exact, abs=0.01)


class StyleOnlyDecoder(nn.Module):
    """Duck-typed model whose decoder reads only the style half of z: logits = weight @ z_style.

    q(z_content | x) = N(0, I), the prior, and q(z_style | x) = N(style_mean, e^-16 I), nearly a
    point, whatever x. Hence E_q[log p(x | z)] = log p(x | style_mean) up to ~1e-3 nats, and
    the negative ELBO is known: -log p(x | style_mean) + KL(q(z_style) || N(0, I)). A likelihood
    that fed the decoder the content half (z_content ~ N(0, I)) would see other images.
    With swapped=True the posterior swaps the two parts' roles: what a wrong split would compute.
    """

    def __init__(self, style_mean: torch.Tensor, weight: torch.Tensor, swapped: bool = False):
        super().__init__()
        self.content_dim = self.style_dim = len(style_mean)
        self.style_mean, self.weight, self.swapped = style_mean, weight, swapped  # (D,), (S * S, D)
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def posterior(self, x):
        b, d = len(x), self.content_dim
        prior = (torch.zeros(b, d), torch.zeros(b, d))
        point = (self.style_mean.expand(b, d), torch.full((b, d), -16.0))
        content, style = (point, prior) if self.swapped else (prior, point)
        return Posterior(content[0], content[1], style[0], style[1])

    def decode_logits(self, content, style):
        side = int(math.isqrt(self.weight.shape[0]))
        return (style @ self.weight.T).view(len(style), 1, side, side)  # (N, 1, S, S)


def _style_only_model(swapped=False):
    generator = torch.Generator().manual_seed(0)
    weight = 3.0 * torch.randn(16, 2, generator=generator)  # (S * S, Ds), S = 4
    return StyleOnlyDecoder(torch.tensor([1.5, -1.0]), weight, swapped)


def test_likelihood_decodes_z_as_content_then_style():
    model = _style_only_model()
    images = metrics.binarize(torch.rand(3, 1, 4, 4), seed=0)
    logits = model.decode_logits(None, model.style_mean.expand(3, 2))  # (3, 1, 4, 4) at the style mean
    log_p_x = -F.binary_cross_entropy_with_logits(logits, images, reduction="none").flatten(1).sum(1).mean().item()
    kl_style = metrics.per_image_kl(torch.zeros(1, 2), torch.zeros(1, 2), model.style_mean[None], torch.full((1, 2), -16.0))
    result = metrics.iwae_nll(model, images, k=2000, batch_size=3, chunk=500, seed=0)
    assert result["elbo_nll"] == pytest.approx(-log_p_x + kl_style["kl_total"], abs=0.05)
    # The same posteriors with the parts' roles swapped give a very different ELBO and IWAE bound.
    swapped = metrics.iwae_nll(_style_only_model(swapped=True), images, k=2000, batch_size=3, chunk=500, seed=0)
    assert abs(swapped["elbo_nll"] - result["elbo_nll"]) > 1.0
    assert abs(swapped["nll"] - result["nll"]) > 1.0


def test_log_weights_formula():
    # log w = log p(x | z) + log N(z; 0, I) - log N(z; mean, sigma^2), z = [content, style].
    model = _style_only_model()
    x = metrics.binarize(torch.rand(2, 1, 4, 4), seed=3)  # (B, 1, S, S)
    generator = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(2, 4, generator=generator), 0.3 * torch.randn(2, 4, generator=generator)  # (B, D)
    eps = torch.randn(5, 2, 4, generator=generator)  # (K, B, D)
    z = mean + (0.5 * logvar).exp() * eps  # (K, B, D)
    normal = torch.distributions.Normal
    expected = (torch.distributions.Bernoulli(logits=(z[..., 2:] @ model.weight.T).view(5, 2, 1, 4, 4)).log_prob(x).flatten(2).sum(2)
                + normal(0.0, 1.0).log_prob(z).sum(-1)
                - normal(mean, (0.5 * logvar).exp()).log_prob(z).sum(-1))  # (K, B)
    assert torch.allclose(metrics._log_weights(model, x, mean, logvar, eps), expected.double(), atol=1e-4)


def test_iwae_reproducible_and_independent_of_chunks():
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2))
    images = metrics.binarize(torch.rand(6, 1, 28, 28) * 0.3, seed=1)
    result = metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=20, seed=0)
    assert metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=20, seed=0) == result
    # Chunking changes only how the samples are grouped, not the estimate.
    assert metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=64, seed=0)["nll"] == pytest.approx(
        result["nll"], abs=1e-4)
    assert metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=20, seed=1) != result
    assert model.training  # mode restored


def test_iwae_rejects_grey_images():
    model = ConstantDecoder(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="binar"):
        metrics.iwae_nll(model, torch.full((2, 1, 4, 4), 0.5), k=2)


def test_binarize():
    grey = torch.rand(200, 1, 16, 16)
    first = metrics.binarize(grey, seed=5)
    assert torch.equal(first, metrics.binarize(grey, seed=5))
    assert not torch.equal(first, metrics.binarize(grey, seed=6))
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert first.mean().item() == pytest.approx(grey.mean().item(), abs=0.01)
    assert torch.equal(metrics.binarize(torch.ones(2, 1, 3, 3)), torch.ones(2, 1, 3, 3))
    assert torch.equal(metrics.binarize(torch.zeros(2, 1, 3, 3)), torch.zeros(2, 1, 3, 3))


# ---- swap consistency --------------------------------------------------------------------------


def test_swap_consistency_rate():
    assert metrics._swap_consistency([5, 6, 7, 8], [5, 6, 0, 0]) == 0.5
    assert metrics._swap_consistency(np.array([1, 1]), np.array([1, 1])) == 1.0


def _four_shapes(n_per_class=32, size=28, seed=0):
    """Four obviously different classes (raw ids 11..14): a square, a bar, a stripe, a cross, with noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    h = size // 2
    for label in range(4):
        for _ in range(n_per_class):
            x = np.zeros((size, size), dtype=np.float32)
            if label == 0:
                x[4:h, 4:h] = 1
            elif label == 1:
                x[h:size - 4, h:size - 4] = 1
            elif label == 2:
                x[h - 2:h + 2, :] = 1
            else:
                x[:, h - 2:h + 2] = 1
            x = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
            images.append(x)
            labels.append(label + 11)
    return torch.from_numpy(np.stack(images))[:, None], np.array(labels)


def test_train_classifier_learns_four_shapes():
    images, labels = _four_shapes()
    classifier = metrics.train_classifier(images, labels, epochs=4, seed=0, batch_size=32, channels=16)
    test_images, test_labels = _four_shapes(seed=1)
    assert metrics.classifier_accuracy(classifier, test_images, test_labels) == 1.0
    assert set(classifier.predict(test_images)) == {11, 12, 13, 14}
    again = metrics.train_classifier(images, labels, epochs=4, seed=0, batch_size=32, channels=16)
    for p, q in zip(classifier.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert classifier.label_index([12, 99]).tolist() == [1, -1]
    # Any image side through the adaptive pooling.
    assert classifier(torch.zeros(2, 1, 105, 105)).shape == (2, 4)


def test_swap_consistency_pipeline():
    torch.manual_seed(0)
    images, labels = _four_shapes(n_per_class=8)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2))
    classifier = metrics.train_classifier(images, labels, epochs=1, seed=0, channels=8)
    result = metrics.swap_consistency(model, classifier, images, labels, pairs=50, seed=0, batch_size=20)
    assert set(result) >= {"swap_consistency", "style_character_rate", "reconstruction_accuracy", "real_accuracy"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("swap_consistency", "style_character_rate"))
    # The pair sampler never pairs a character with itself.
    a, b = metrics._different_character_pairs(labels, 500, np.random.default_rng(0))
    assert np.all(labels[a] != labels[b])
    assert metrics.swap_consistency(model, classifier, images, labels, pairs=50, seed=0, batch_size=20) == result


class RevealingModel(nn.Module):
    """Duck-typed model whose codes are the image's character id (content) and 1000 + id (style),
    read from pixel (0, 0); decode(content, style) writes the content code into pixel (0, 0) and
    the style code into pixel (0, 1), so a decoded image shows which codes it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def encode(self, x):
        ids = x[:, 0, 0, 0:1]  # (B, 1)
        return ids, 1000.0 + ids

    def decode(self, content, style):
        out = torch.zeros(len(content), 1, 2, 2)
        out[:, 0, 0, 0], out[:, 0, 0, 1] = content[:, 0], style[:, 0]
        return out


class PixelReader:
    """A fake classifier: the character it names is pixel (0, column) minus `offset`, as an integer."""

    def __init__(self, column=0, offset=0):
        self.column, self.offset = column, offset

    def predict(self, images):
        return (metrics._as_images(images)[:, 0, 0, self.column] - self.offset).round().long().numpy()


def test_swap_consistency_decodes_content_of_a_with_style_of_b():
    character = np.repeat(np.arange(1, 6), 4)  # (20,) ids 1..5
    images = torch.zeros(20, 1, 2, 2)
    images[:, 0, 0, 0] = torch.from_numpy(character).float()
    result = metrics.swap_consistency(RevealingModel(), PixelReader(), images, character, pairs=200, seed=0,
                                      batch_size=64)
    # A classifier that reads the content code names A's character, never B's.
    assert result["swap_consistency"] == 1.0
    assert result["style_character_rate"] == 0.0
    assert result["reconstruction_accuracy"] == 1.0
    assert result["real_accuracy"] == 1.0
    # One that reads the style code names B's character in swaps and A's in reconstructions.
    result = metrics.swap_consistency(RevealingModel(), PixelReader(column=1, offset=1000), images, character,
                                      pairs=200, seed=0, batch_size=64)
    assert result["swap_consistency"] == 0.0
    assert result["style_character_rate"] == 1.0
    assert result["reconstruction_accuracy"] == 1.0


def test_classifier_on_indices_reloads_from_a_class_count():
    images, labels = _four_shapes(n_per_class=8)
    _, index = np.unique(labels, return_inverse=True)  # 0..3
    trained = metrics.train_classifier(images, index, epochs=1, seed=0, channels=8)
    reloaded = metrics.CharacterClassifier(4, channels=8)
    reloaded.load_state_dict(trained.state_dict())
    assert np.array_equal(reloaded.eval().predict(images), trained.predict(images))
    assert set(np.unique(trained.predict(images))) <= {0, 1, 2, 3}


# ---- code metrics end to end -------------------------------------------------------------------


def _known_codes(style: str, seed=0):
    """A fake test set (2 alphabets x 25 characters x 8 drawers) and codes with known answers.

    Content: one-hot character + small noise, nearly exact (log-variance -12). Style, by name:
    "random": means ~ N(0, 0.5 I) with every posterior variance 0.5, so the aggregate posterior
    is exactly N(0, I) while the means are not; "drawer": one-hot drawer id.
    The images put ink at one pixel per character, so raw pixels are perfect too.
    """
    from omnivae.data import Omniglot

    character, alphabet, drawer = _labels(alphabets=(25, 25), drawers=8)
    n, chars = len(character), character.max()
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    images.reshape(n, -1)[np.arange(n), character - 1] = 255
    test = Omniglot(images, character.astype(np.int16), drawer.astype(np.int8), alphabet.astype(np.int16), ["a", "b"])
    content = np.eye(chars)[character - 1] + 0.01 * rng.normal(size=(n, chars))  # (N, 50)
    if style == "random":
        style_mean, style_logvar = math.sqrt(0.5) * rng.normal(size=(n, 3)), np.full((n, 3), math.log(0.5))
    else:
        style_mean, style_logvar = np.eye(8)[drawer - 1], np.full((n, 8), -12.0)
    codes = dict(content_mean=content, content_logvar=np.full_like(content, -12.0),
                 style_mean=style_mean, style_logvar=style_logvar)
    return test, codes


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means of 8 distinct drawer codes into 50
def test_code_metrics_known_answers(tmp_path):
    from omnivae.evaluate import code_metrics, pixel_baseline
    from omnivae.registry import METRICS

    test, codes = _known_codes("random")
    results = code_metrics(codes, test, seed=0, episodes=500)
    assert set(results) <= set(METRICS)  # every key is a registry record
    # Content codes name the character: perfect few-shot and clustering.
    for key in ("content_20way_1shot", "content_5way_1shot"):
        assert results[key] == 1.0 and results[f"{key}_ci95"] == 0.0
    assert results["content_kmeans_accuracy"] > 0.95 and results["content_nmi"] > 0.95
    # Random style codes, drawer-only codes and random codes: chance, 1/20, within a few half-widths.
    for name in ("style", "drawer_code", "random_code"):
        accuracy, ci95 = results[f"{name}_20way_1shot"], results[f"{name}_20way_1shot_ci95"]
        assert 0.0 < ci95 < 0.01
        assert abs(accuracy - 0.05) < 3 * ci95, name
    # Prior match on the aggregate posterior (sampled codes) sees N(0, I); on the means it does not.
    floor = abs(results["prior_mmd2_floor_style"]) + 0.005
    assert abs(results["prior_mmd2_style"]) < floor
    assert results["prior_mmd2_means_style"] > 5 * floor
    assert results["prior_gaussian_kl_style"] < 0.1
    assert results["prior_gaussian_kl_means_style"] == pytest.approx(1.5 * (0.5 - 1 - math.log(0.5)), abs=0.15)

    # Style codes that know only the drawer: chance, since an episode's supports share one drawer.
    test, codes = _known_codes("drawer")
    again = code_metrics(codes, test, seed=0, episodes=500)
    assert abs(again["style_20way_1shot"] - 0.05) < 3 * again["style_20way_1shot_ci95"]
    assert again["style_20way_1shot"] == again["drawer_code_20way_1shot"]  # the same code on the same episodes
    # The drawer reference depends only on the labels and the evaluation seed: the same numbers again.
    assert again["drawer_code_20way_1shot"] == results["drawer_code_20way_1shot"]
    assert again["drawer_code_20way_1shot_ci95"] == results["drawer_code_20way_1shot_ci95"]

    # Raw pixels on the same episodes, cached under a protocol-versioned name.
    pixels = pixel_baseline(test, seed=0, cache_dir=tmp_path, episodes=500)
    assert set(pixels) <= set(METRICS)
    assert pixels["pixel_20way_1shot"] == pixels["pixel_5way_1shot"] == 1.0
    assert pixels["pixel_20way_1shot_ci95"] == 0.0 and pixels["pixel_kmeans_accuracy"] > 0.95
    (cached,) = tmp_path.glob("pixels_*.json")
    assert cached.name.startswith("pixels_v2_")
    assert pixel_baseline(test, seed=0, cache_dir=tmp_path, episodes=500) == pixels


# ---- random streams ----------------------------------------------------------------------------


def test_eval_streams_are_distinct_and_seeded():
    streams = metrics.eval_streams(0)
    assert tuple(streams) == metrics.EVAL_STREAMS
    for use in ("subset", "kmeans", "episodes", "random_codes", "posterior_samples", "prior_match", "swap_pairs",
                "nll_images", "binarize", "iwae", "figures"):
        assert use in streams
    assert len(set(streams.values())) == len(streams)
    assert all(0 <= seed < 2 ** 32 for seed in streams.values())
    assert metrics.eval_streams(0) == streams
    assert set(metrics.eval_streams(1).values()).isdisjoint(streams.values())
    # No two uses draw the same numbers, and none draws what the evaluation seed itself would.
    draws = [np.random.default_rng(seed).random(8) for seed in [0, *streams.values()]]
    assert len({tuple(d) for d in draws}) == len(draws)
    torch_draws = [torch.randn(8, generator=torch.Generator().manual_seed(seed)) for seed in [0, *streams.values()]]
    assert len({tuple(d.tolist()) for d in torch_draws}) == len(torch_draws)
    # A stream's seed is child i of SeedSequence(eval_seed); adding uses at the end keeps these.
    assert streams["subset"] == int(np.random.SeedSequence(0, spawn_key=(0,)).generate_state(1)[0])
    assert metrics.child_seeds(7, 3)[:2] == metrics.child_seeds(7, 2)
