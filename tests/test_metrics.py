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


def test_few_shot_episodes_structure():
    character, alphabet, drawer = _labels()
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=20, episodes=200, seed=1)
    assert support.shape == query.shape == (200, 20)
    assert np.all(character[support] == character[query])
    assert np.all(support != query)
    assert np.all(drawer[support] != drawer[query])
    for e in range(200):
        assert len(np.unique(character[support[e]])) == 20
        assert len(np.unique(alphabet[support[e]])) == 1
    # Alphabet 0 has only 8 characters: never used for 20-way episodes; the others both are.
    assert set(np.unique(alphabet[support])) == {1, 2}


def test_few_shot_episodes_seeded():
    character, alphabet, drawer = _labels()
    first = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=3)
    again = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=3)
    other = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_few_shot_episodes_across_alphabets_and_single_drawer_characters():
    character, alphabet, drawer = _labels(alphabets=(3, 4), drawers=3)
    support, _ = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=100, seed=0,
                                           within_alphabet=False)
    assert all(len(np.unique(character[s])) == 5 for s in support)
    assert len(np.unique(alphabet[support])) == 2
    with pytest.raises(ValueError):
        metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=1)
    # A character drawn by a single drawer cannot give a (support, query) pair.
    keep = (drawer == 1) | (character != 1)
    support, query = metrics.few_shot_episodes(character[keep], alphabet[keep], drawer[keep], ways=6,
                                               episodes=100, seed=0, within_alphabet=False)
    assert 1 not in character[keep][support]


def test_few_shot_accuracy_perfect_and_constant_codes():
    character, alphabet, drawer = _labels()
    rng = np.random.default_rng(0)
    perfect = np.eye(character.max() + 1)[character] + 1e-3 * rng.normal(size=(len(character), character.max() + 1))
    acc = metrics.few_shot_accuracy(perfect, character, alphabet, drawer, ways=20, episodes=100, seed=0)
    assert acc == 1.0
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=20, episodes=100, seed=0)
    assert metrics._few_shot_accuracy(np.ones((len(character), 4)), support, query) == pytest.approx(1 / 20)
    assert metrics._few_shot_accuracy(np.zeros((len(character), 4)), support, query) == pytest.approx(1 / 20)


def test_few_shot_accuracy_hand_computed():
    # One 2-way episode: supports 0 and 1; query 2 points near support 1 (wrong), query 3 near 1 (right).
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert metrics._few_shot_accuracy(codes, np.array([[0, 1]]), np.array([[2, 3]])) == 0.5
    # Cosine, not Euclidean: a long vector along support 0's direction still picks support 0.
    codes = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 1.0], [0.0, 5.0]])
    assert metrics._few_shot_accuracy(codes, np.array([[0, 1]]), np.array([[2, 3]])) == 1.0


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
    assert exact - 1e-3 <= result["nll"] < exact + 0.01  # far tighter than the ELBO
    assert result["elbo"] == -result["elbo_nll"]
    one = metrics.iwae_nll(model, images, k=1, seed=0)
    assert one["nll"] == pytest.approx(one["elbo_nll"], abs=1e-9)


def test_iwae_tighter_than_elbo_and_reproducible():
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2))
    images = metrics.binarize(torch.rand(6, 1, 28, 28) * 0.3, seed=1)
    result = metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=20, seed=0)
    assert result["nll"] < result["elbo_nll"]
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


def test_classifier_on_indices_reloads_from_a_class_count():
    images, labels = _four_shapes(n_per_class=8)
    _, index = np.unique(labels, return_inverse=True)  # 0..3
    trained = metrics.train_classifier(images, index, epochs=1, seed=0, channels=8)
    reloaded = metrics.CharacterClassifier(4, channels=8)
    reloaded.load_state_dict(trained.state_dict())
    assert np.array_equal(reloaded.eval().predict(images), trained.predict(images))
    assert set(np.unique(trained.predict(images))) <= {0, 1, 2, 3}
