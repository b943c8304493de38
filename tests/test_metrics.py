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


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")  # k-means of one repeated point into 5
def test_alphabet_kmeans_scores_average_over_alphabets():
    # Alphabet 0: 3 characters as separated blobs (accuracy 1); alphabet 1: 5 characters with one
    # constant code (one cluster takes everything: accuracy 1/5). Each alphabet weighs the same,
    # although alphabet 1 has three times the points.
    rng = np.random.default_rng(0)
    blobs = np.repeat(np.eye(3) * 10, 10, axis=0) + 0.1 * rng.normal(size=(30, 3))  # (30, 3)
    codes = np.concatenate([blobs, np.ones((90, 3))])  # (120, 3)
    character = np.concatenate([np.repeat([1, 2, 3], 10), np.repeat([4, 5, 6, 7, 8], 18)])
    alphabet = np.repeat([0, 1], [30, 90])
    scores = metrics.alphabet_kmeans_scores(codes, character, alphabet, seed=0)
    assert scores["alphabets"] == 2
    assert scores["accuracy"] == pytest.approx((1.0 + 0.2) / 2)
    assert scores["nmi"] == pytest.approx(0.5)
    # K is each alphabet's character count: separated alphabets are each perfect.
    perfect = metrics.alphabet_kmeans_scores(blobs, character[:30], np.repeat([0, 1], [10, 20]), seed=0)
    assert perfect["accuracy"] == 1.0


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


def test_one_shot_episodes_keep_their_draws():
    # The one-shot episodes and scores are frozen: these are the numbers of the version 2 protocol.
    character, alphabet, drawer = _labels()
    support, query = metrics.few_shot_episodes(character, alphabet, drawer, ways=5, episodes=50, seed=3)
    assert support[:2].tolist() == [[234, 354, 336, 222, 228], [142, 82, 136, 94, 154]]
    assert query[:2].tolist() == [[237, 357, 339, 225, 231], [141, 81, 135, 93, 153]]
    weights = np.arange(1, 251).reshape(50, 5)
    assert int((support * weights).sum()) == 3739559 and int((query * weights).sum()) == 3756509
    codes = np.random.default_rng(0).normal(size=(len(character), 4))
    score = metrics.few_shot_accuracy(codes, character, alphabet, drawer, ways=5, episodes=200, seed=1)
    assert score["accuracy"] == 0.193 and score["ci95"] == pytest.approx(0.024757582626085226, rel=1e-12)


def test_multi_shot_episodes_follow_the_protocol():
    # K support drawers, each drawing every character once, and a query drawer who is none of them.
    character, alphabet, drawer = _labels(drawers=8)
    support, query = metrics.multi_shot_episodes(character, alphabet, drawer, ways=20, shots=5, episodes=200, seed=1)
    assert support.shape == (200, 20, 5) and query.shape == (200, 20)
    assert np.all(character[support] == character[query][:, :, None])
    for e in range(200):
        assert len(np.unique(character[query[e]])) == 20
        assert len(np.unique(alphabet[support[e]])) == 1 and alphabet[support[e, 0, 0]] == alphabet[query[e, 0]]
        hands = drawer[support[e]]  # (20, 5)
        assert np.all(hands == hands[0]) and len(np.unique(hands[0])) == 5  # the same 5 drawers for every character
        assert len(np.unique(drawer[query[e]])) == 1 and drawer[query[e, 0]] not in hands[0]
    assert set(np.unique(alphabet[support])) == {1, 2}  # alphabet 0 has only 8 characters
    assert len(set(drawer[query[:, 0]])) == 8  # every drawer asks queries
    again = metrics.multi_shot_episodes(character, alphabet, drawer, ways=20, shots=5, episodes=200, seed=1)
    assert np.array_equal(again[0], support) and np.array_equal(again[1], query)
    assert not np.array_equal(metrics.multi_shot_episodes(character, alphabet, drawer, 20, 5, 200, seed=2)[0], support)


def test_multi_shot_episodes_need_enough_drawers_sharing_characters():
    # 5 drawers cannot give 5 supports and a query; with 6, drawer 6 drew only characters 1-10,
    # so every episode's 6 drawers are drawers 1-6 with 10 characters, or fail at 20 ways.
    character, alphabet, drawer = _labels(alphabets=(25,), drawers=5)
    with pytest.raises(ValueError, match="5-shot"):
        metrics.multi_shot_episodes(character, alphabet, drawer, ways=5, shots=5, episodes=3)
    character, alphabet, drawer = _labels(alphabets=(25,), drawers=6)
    keep = (drawer != 6) | (character <= 10)
    character, alphabet, drawer = character[keep], alphabet[keep], drawer[keep]
    with pytest.raises(ValueError, match="20-way 5-shot"):
        metrics.multi_shot_episodes(character, alphabet, drawer, ways=20, shots=5, episodes=3)
    support, query = metrics.multi_shot_episodes(character, alphabet, drawer, ways=10, shots=5, episodes=50, seed=0)
    assert np.all(character[query] <= 10)
    # Several drawings of one (character, drawer) cell: any of them, at random.
    character, alphabet, drawer = (np.concatenate([x, x]) for x in _labels(alphabets=(6,), drawers=6))
    support, query = metrics.multi_shot_episodes(character, alphabet, drawer, ways=6, shots=5, episodes=100, seed=0)
    assert len(np.unique(support)) > 36  # more drawings than (character, drawer) cells: both copies turn up


def test_prototypes_are_the_mean_unit_support():
    # Query 0 (at 40 degrees) is nearest to a single support of class B (45 degrees), but to the
    # prototype of class A (0 and 60 degrees: 30 degrees); class B's prototype (45 and 180
    # degrees: about 112 degrees) is nearest to query 1 (150 degrees). Supports are normalised
    # before they are averaged: a long support does not pull its prototype.
    def at(degrees, length=1.0):
        return length * np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])

    codes = np.stack([at(0), at(60, 50.0), at(45), at(180), at(40), at(150)])
    support = np.array([[[0, 1], [2, 3]]])  # (1 episode, 2 classes, 2 shots)
    query = np.array([[4, 5]])
    assert metrics._few_shot_correct(codes, support, query).tolist() == [[True, True]]
    assert metrics._few_shot_correct(codes, support[:, :, [1, 0]], query).tolist() == [[True, True]]
    assert metrics._few_shot_correct(codes, np.array([[0, 2]]), query).tolist() == [[False, True]]  # one shot
    # One shot in a (E, W, 1) array scores as the (E, W) one.
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(60, 5))
    support, query = rng.permutation(60)[:40].reshape(4, 10), rng.permutation(60)[:40].reshape(4, 10)
    assert np.array_equal(metrics._few_shot_correct(codes, support[:, :, None], query, seed=2),
                          metrics._few_shot_correct(codes, support, query, seed=2))


def test_five_shot_accuracy_perfect_constant_and_better_than_one_shot():
    character, alphabet, drawer = _labels(drawers=8)
    rng = np.random.default_rng(0)
    perfect = np.eye(character.max() + 1)[character] + 1e-3 * rng.normal(size=(len(character), character.max() + 1))
    score = metrics.few_shot_accuracy(perfect, character, alphabet, drawer, ways=20, episodes=100, seed=0, shots=5)
    assert score == {"accuracy": 1.0, "ci95": 0.0, "episodes": 100}
    constant = np.ones((len(character), 4))
    score = metrics.few_shot_accuracy(constant, character, alphabet, drawer, ways=20, episodes=1000, seed=0, shots=5)
    assert score["accuracy"] == pytest.approx(1 / 20, abs=0.01)
    # Noisy codes: averaging five supports cancels part of the noise.
    noisy = np.eye(character.max() + 1)[character] + 0.5 * rng.normal(size=(len(character), character.max() + 1))
    one = metrics.few_shot_accuracy(noisy, character, alphabet, drawer, ways=20, episodes=300, seed=0)
    five = metrics.few_shot_accuracy(noisy, character, alphabet, drawer, ways=20, episodes=300, seed=0, shots=5)
    assert five["accuracy"] > one["accuracy"] + 5 * (one["ci95"] + five["ci95"])


def test_labelled_episodes_and_accuracy():
    labels = np.repeat(np.arange(12), 7)  # 12 classes of 7 images
    labels[:3] = 99  # classes 99 (3 images) and 0 (4): too few for 5 shots and a query
    support, query = metrics.labelled_episodes(labels, ways=10, shots=5, episodes=100, seed=0)
    assert support.shape == (100, 10, 5) and query.shape == (100, 10)
    assert np.all(labels[support] == labels[query][:, :, None])
    for e in range(100):
        assert len(np.unique(labels[query[e]])) == 10
        assert len(np.unique(np.concatenate([support[e].ravel(), query[e]]))) == 60  # no image twice
    assert not np.isin(labels[query], [0, 99]).any()
    with pytest.raises(ValueError, match="12-way"):
        metrics.labelled_episodes(labels, ways=12, shots=5, episodes=1)
    perfect = np.eye(100)[labels]
    for shots in (1, 5):
        score = metrics.labelled_few_shot_accuracy(perfect, labels, ways=10, shots=shots, episodes=50, seed=0)
        assert score == {"accuracy": 1.0, "ci95": 0.0, "episodes": 50}
    score = metrics.labelled_few_shot_accuracy(np.ones((len(labels), 3)), labels, 10, 1, 2000, seed=0)
    assert score["accuracy"] == pytest.approx(0.1, abs=0.01)


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
    assert kl["kl_total"] == pytest.approx(kl["kl_content"] + kl["kl_style"]) and "kl_detail" not in kl
    dm, dl = torch.randn(7, 2), torch.randn(7, 2)
    expected_d = torch.distributions.kl_divergence(torch.distributions.Normal(dm, (0.5 * dl).exp()), std_normal(dm))
    with_detail = metrics.per_image_kl(cm, cl, sm, sl, dm, dl)
    assert with_detail["kl_detail"] == pytest.approx(expected_d.sum(1).mean().item(), rel=1e-5)
    assert with_detail["kl_total"] == pytest.approx(kl["kl_total"] + with_detail["kl_detail"])
    assert "kl_detail" not in metrics.per_image_kl(cm, cl, sm, sl, dm[:, :0], dl[:, :0])  # no detail columns


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

    # Deterministic for a seed, and the draws do not depend on where the kernels run.
    assert metrics.prior_match(codes, seed=1, max_points=1000) == matched
    assert metrics.prior_match(codes, seed=1, max_points=1000, device="cpu") == matched
    if torch.cuda.is_available():
        on_gpu = metrics.prior_match(codes, seed=1, max_points=1000, device="cuda")
        assert on_gpu["mmd2"] == pytest.approx(matched["mmd2"], abs=1e-6)


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

    def decode_logits(self, content, style, x=None):
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
    kl = metrics.per_image_kl(*[t.detach() for t in q[:4]])["kl_total"]
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

    def decode_logits(self, content, style, x=None):
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


def test_soften_is_a_normalised_gaussian_blur():
    x = torch.zeros(2, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    assert metrics.soften(x, 0.0) is x
    out = metrics.soften(x, 0.7)
    assert out.shape == x.shape and torch.equal(out[1], x[1])
    spot = out[0, 0]
    assert spot.sum().item() == pytest.approx(1.0, abs=1e-6)  # the kernel sums to 1 (away from the border)
    torch.testing.assert_close(spot, spot.T)
    torch.testing.assert_close(spot, spot.flip(0))
    r = torch.arange(15.0) - 7
    variance = (spot.sum(0) * r**2).sum().item()  # along one axis
    assert variance == pytest.approx(0.7**2, rel=0.01)  # truncated at 3 sigma: nearly all the mass
    assert spot[7, 7] == spot.max() and spot[7, 8].item() == pytest.approx(spot[7, 7].item() * math.exp(-0.5 / 0.49), rel=1e-5)


def test_likelihood_proposals_read_the_blurred_drawing_and_the_decoder_the_binary_one():
    """blur changes only the proposal: k = 1 gives -log w with q(z | soften(x)) and a decoder
    teacher-forced on the binary x; a decoder that ignores z scores the exact NLL either way."""
    model = _tiny_pixelcnn()
    images = metrics.binarize(torch.rand(3, 1, 28, 28) * 0.4, seed=2)
    result = metrics.iwae_nll(model, images, k=1, batch_size=3, seed=4, blur=0.7)
    model.eval()
    with torch.no_grad():
        q = model.posterior(metrics.soften(images, 0.7))
        mean = torch.cat([q.content_mean, q.style_mean], 1)  # (3, 6)
        std = torch.cat([q.content_logvar, q.style_logvar], 1).mul(0.5).exp()
        z = mean + std * torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(4))[0]  # (3, 6)
        logits = model.decode_logits(z[:, :4], z[:, 4:], images)
        log_p_x = torch.distributions.Bernoulli(logits=logits).log_prob(images).flatten(1).sum(1)
        normal = torch.distributions.Normal
        log_w = log_p_x + normal(0.0, 1.0).log_prob(z).sum(1) - normal(mean, std).log_prob(z).sum(1)  # (3,)
    assert result["nll"] == pytest.approx(-log_w.mean().item(), abs=1e-3)
    assert result["nll"] != pytest.approx(metrics.iwae_nll(model, images, k=1, batch_size=3, seed=4)["nll"], abs=1e-3)
    # The set likelihood of single drawings is the IWAE estimate with the same proposal and noise.
    single = metrics.set_nll(model, images, np.arange(3)[:, None], k=8, batch_size=3, seed=5, blur=0.7)["nll"]
    assert single == pytest.approx(metrics.iwae_nll(model, images, k=8, batch_size=3, seed=5, blur=0.7)["nll"], abs=1e-3)
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6)
    binary = metrics.binarize(torch.rand(9, 1, 6, 6), seed=0)
    result = metrics.iwae_nll(ConstantDecoder(logits), binary, k=4000, batch_size=9, chunk=1000, seed=0, blur=1.0)
    assert result["nll"] == pytest.approx(_exact_nll(logits, binary), abs=0.01)


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
    # Without a chunk, passes of about DECODES_PER_PASS drawings: 256 // 3 = 85 samples, here all 64 at once.
    assert metrics._samples_per_pass(None, 3) == 85 and metrics._samples_per_pass(None, 50) == 5
    assert metrics._samples_per_pass(None, 1000) == 1 and metrics._samples_per_pass(7, 3) == 7
    assert metrics.iwae_nll(model, images, k=64, batch_size=3, seed=0)["nll"] == pytest.approx(result["nll"], abs=1e-4)
    sets = np.array([[0, 1, 2], [3, 4, 5]])
    assert metrics.set_nll(model, images, sets, k=32, batch_size=2, seed=0)["nll"] == pytest.approx(
        metrics.set_nll(model, images, sets, k=32, batch_size=2, chunk=3, seed=0)["nll"], abs=1e-4)


def _tiny_pixelcnn():
    torch.manual_seed(0)
    return StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2, decoder="pixelcnn",
                                     pixelcnn_layers=2, pixelcnn_channels=4))


def test_iwae_of_a_pixelcnn_with_one_sample_is_its_elbo_by_hand():
    """k = 1: -log w = -[log p(x | z) + log N(z; 0, I) - log N(z; mean, sigma^2)], with log p(x | z)
    the teacher-forced Bernoulli terms of each image's own pixels, for z drawn from the first
    torch.randn of Generator(seed)."""
    model = _tiny_pixelcnn()
    images = metrics.binarize(torch.rand(3, 1, 28, 28) * 0.4, seed=2)
    result = metrics.iwae_nll(model, images, k=1, batch_size=3, seed=4)
    model.eval()
    with torch.no_grad():
        q = model.posterior(images)
        mean = torch.cat([q.content_mean, q.style_mean], 1)  # (3, 6)
        std = torch.cat([q.content_logvar, q.style_logvar], 1).mul(0.5).exp()
        z = mean + std * torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(4))[0]  # (3, 6)
        logits = model.decode_logits(z[:, :4], z[:, 4:], images)  # (3, 1, 28, 28)
        log_p_x = torch.distributions.Bernoulli(logits=logits).log_prob(images).flatten(1).sum(1)
        normal = torch.distributions.Normal
        log_w = log_p_x + normal(0.0, 1.0).log_prob(z).sum(1) - normal(mean, std).log_prob(z).sum(1)  # (3,)
    assert result["nll"] == pytest.approx(-log_w.mean().item(), abs=1e-3)
    assert result["elbo_nll"] == pytest.approx(result["nll"], abs=1e-6)  # one sample: the bound is the ELBO


def test_pixelcnn_log_weights_read_each_image_for_each_sample():
    # _log_weights decodes K * B codes at once; each must be teacher-forced with its own image.
    model = _tiny_pixelcnn().eval()
    x = metrics.binarize(torch.rand(3, 1, 28, 28) * 0.4, seed=3)  # (B, 1, S, S)
    generator = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(3, 6, generator=generator), 0.3 * torch.randn(3, 6, generator=generator)
    eps = torch.randn(2, 3, 6, generator=generator)  # (K, B, D)
    with torch.no_grad():
        got = metrics._log_weights(model, x, mean, logvar, eps)  # (K, B)
        z = mean + (0.5 * logvar).exp() * eps
        normal = torch.distributions.Normal
        for k in range(2):
            for b in range(3):
                logits = model.decode_logits(z[k, b:b + 1, :4], z[k, b:b + 1, 4:], x[b:b + 1])
                expected = (torch.distributions.Bernoulli(logits=logits).log_prob(x[b:b + 1]).sum()
                            + normal(0.0, 1.0).log_prob(z[k, b]).sum()
                            - normal(mean[b], (0.5 * logvar[b]).exp()).log_prob(z[k, b]).sum())
                assert got[k, b].item() == pytest.approx(expected.item(), abs=1e-3)
        # The set weights with one drawing per set are the same numbers (their documented layout).
        one = metrics._set_log_weights(model, x[:, None], mean[:, :4], logvar[:, :4], mean[:, None, 4:],
                                       logvar[:, None, 4:], eps)
        torch.testing.assert_close(one, got)


def test_set_and_conditional_likelihoods_run_for_a_pixelcnn():
    model = _tiny_pixelcnn()
    images = metrics.binarize(torch.rand(10, 1, 28, 28) * 0.3, seed=1)
    sets = np.arange(10).reshape(2, 5)
    result = metrics.set_nll(model, images, sets, k=4, batch_size=2, seed=0)
    assert np.isfinite(result["nll"]) and result["nll"] > 0
    assert metrics.set_nll(model, images, sets, k=4, batch_size=2, seed=0) == result  # seeded
    pairs = metrics.conditional_nll(model, images, sets[:, :2], k=4, batch_size=2, seed=0)
    assert np.isfinite(pairs["nll"])


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


def test_character_sets_split_each_character_into_disjoint_sets():
    character = np.repeat([3, 5, 9], [20, 12, 4])  # 4 + 2 + 0 sets of 5
    sets = metrics.character_sets(character, size=5, seed=0)
    assert sets.shape == (6, 5)
    assert len(np.unique(sets)) == 30  # disjoint
    assert all(len(np.unique(character[s])) == 1 for s in sets)
    assert sorted(character[sets[:, 0]].tolist()) == [3, 3, 3, 3, 5, 5]
    assert np.array_equal(metrics.character_sets(character, 5, seed=0), sets)
    assert not np.array_equal(metrics.character_sets(character, 5, seed=1), sets)


def test_set_log_weights_formula():
    # log w = sum_i log p(x_i | c, s_i) + log N(c; 0, I) - log N(c; mean_c, sigma_c^2)
    #         + sum_i [log N(s_i; 0, I) - log N(s_i; mean_i, sigma_i^2)], with one c per set.
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 3, generator=generator)  # (S * S, Dc + Ds), S = 4

    class Linear(nn.Module):
        content_dim, style_dim = 1, 2

        def decode_logits(self, content, style, x=None):
            return (torch.cat([content, style], 1) @ weight.T).view(-1, 1, 4, 4)

    b, m, k = 2, 3, 5
    x = metrics.binarize(torch.rand(b, m, 1, 4, 4), seed=1)  # (B, M, 1, S, S)
    content_mean, content_logvar = torch.randn(b, 1, generator=generator), 0.3 * torch.randn(b, 1, generator=generator)
    style_mean, style_logvar = torch.randn(b, m, 2, generator=generator), 0.3 * torch.randn(b, m, 2, generator=generator)
    eps = torch.randn(k, b, 1 + m * 2, generator=generator)  # (K, B, Dc + M * Ds)
    c = content_mean + (0.5 * content_logvar).exp() * eps[..., :1]  # (K, B, Dc)
    s = style_mean + (0.5 * style_logvar).exp() * eps[..., 1:].view(k, b, m, 2)  # (K, B, M, Ds)
    z = torch.cat([c[:, :, None].expand(k, b, m, 1), s], -1)  # (K, B, M, D)
    normal = torch.distributions.Normal
    expected = (torch.distributions.Bernoulli(logits=(z @ weight.T).view(k, b, m, 1, 4, 4)).log_prob(x).flatten(3).sum((2, 3))
                + normal(0.0, 1.0).log_prob(c).sum(-1) - normal(content_mean, (0.5 * content_logvar).exp()).log_prob(c).sum(-1)
                + (normal(0.0, 1.0).log_prob(s) - normal(style_mean, (0.5 * style_logvar).exp()).log_prob(s)).sum((-2, -1)))
    got = metrics._set_log_weights(Linear(), x, content_mean, content_logvar, style_mean, style_logvar, eps)
    assert got.shape == (k, b) and torch.allclose(got, expected.double(), atol=1e-4)


class SetPriorDecoder(ConstantDecoder):
    """ConstantDecoder whose grouped posterior is the prior: each drawing's content posterior is
    N(0, M I), so the product of M of them is N(0, I), and each style posterior is N(0, I)."""

    def __init__(self, logits, set_size):
        super().__init__(logits)
        self.set_size = set_size

    def posterior(self, x):
        b = len(x)
        content = torch.zeros(b, self.content_dim)
        style = torch.zeros(b, self.style_dim)
        return Posterior(content, content + math.log(self.set_size), style, style)


def test_set_nll_of_a_decoder_that_ignores_the_codes():
    # p(x_1..x_5) = prod_i p(x_i) exactly when the decoder ignores z; when the grouped posterior is
    # the prior every weight is exact.
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6)
    images = metrics.binarize(torch.rand(20, 1, 6, 6), seed=0)
    sets = np.arange(20).reshape(4, 5)
    exact = _exact_nll(logits, images)  # nats per drawing
    result = metrics.set_nll(SetPriorDecoder(logits, 5), images, sets, k=20, batch_size=3, chunk=7)
    assert result == {"nll": pytest.approx(exact, abs=1e-4), "k": 20, "sets": 4, "set_size": 5}
    # With a learned posterior the content proposal is the product of 5 posteriors, far narrower
    # than the true posterior (the prior, here), so the weights have a heavy tail: the estimate is
    # an upper bound on the NLL that approaches it slowly as k grows.
    few = metrics.set_nll(ConstantDecoder(logits), images, sets, k=10, batch_size=4, seed=0)["nll"]
    many = metrics.set_nll(ConstantDecoder(logits), images, sets, k=4000, batch_size=4, chunk=1000, seed=0)["nll"]
    assert exact < many < few and many == pytest.approx(exact, abs=0.1)
    with pytest.raises(ValueError, match="binar"):
        metrics.set_nll(ConstantDecoder(logits), torch.full((5, 1, 6, 6), 0.5), sets[:1], k=2)


def test_set_nll_of_one_drawing_is_the_iwae_bound():
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2))
    images = metrics.binarize(torch.rand(6, 1, 28, 28) * 0.3, seed=1)
    single = metrics.set_nll(model, images, np.arange(6)[:, None], k=64, batch_size=3, chunk=20, seed=5)
    iwae = metrics.iwae_nll(model, images, k=64, batch_size=3, chunk=20, seed=5)
    assert single["nll"] == pytest.approx(iwae["nll"], abs=1e-3)  # the same noise, the same estimate
    assert model.training  # mode restored


def test_conditional_nll():
    # A decoder that ignores the codes: x and x' are independent, p(x | x') = p(x).
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6)
    images = metrics.binarize(torch.rand(10, 1, 6, 6), seed=0)
    pairs = np.arange(10).reshape(5, 2)
    exact = _exact_nll(logits, images[pairs[:, 0]])
    result = metrics.conditional_nll(ConstantDecoder(logits), images, pairs, k=4000, batch_size=5, chunk=1000)
    assert result["nll"] == pytest.approx(exact, abs=0.1) and result["k"] == 4000 and result["pairs"] == 5
    # Its two terms: the pair's set likelihood and the conditioning drawing's own.
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2)).eval()
    images = metrics.binarize(torch.rand(6, 1, 28, 28) * 0.3, seed=1)
    pairs = np.array([[0, 1], [2, 3], [5, 4]])
    joint_seed, single_seed = metrics.child_seeds(7, 2)
    joint = metrics.set_nll(model, images, pairs, k=50, seed=joint_seed)["nll"] * 2
    given = metrics.set_nll(model, images, pairs[:, 1:], k=50, seed=single_seed)["nll"]
    assert metrics.conditional_nll(model, images, pairs, k=50, seed=7)["nll"] == pytest.approx(joint - given, abs=1e-3)


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


def test_augment_drawings():
    images, _ = _four_shapes(n_per_class=4)
    images = (images > 0.5).float()  # (16, 1, 28, 28) clean shapes
    out = metrics.augment_drawings(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, metrics.augment_drawings(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, metrics.augment_drawings(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(out, images, atol=0.05)
    # Small changes: the ink stays where it was (centroid within 3 px), within a factor of 2 in amount,
    # and the maximum grey level is at least 0.6 * (blurred) ink.
    grid = torch.arange(28.0)

    def centroid(x):
        mass = x.sum((1, 2, 3))
        return torch.stack([(x.sum(3)[:, 0] * grid).sum(1) / mass, (x.sum(2)[:, 0] * grid).sum(1) / mass], 1)

    assert (centroid(out) - centroid(images)).norm(dim=1).max() < 3.0
    ratio = out.sum((1, 2, 3)) / images.sum((1, 2, 3))
    assert ratio.min() > 0.4 and ratio.max() < 2.0
    assert out.amax((1, 2, 3)).min() > 0.3


def test_train_classifier_with_augmentations_still_learns():
    images, labels = _four_shapes()
    classifier = metrics.train_classifier(images, labels, epochs=4, seed=0, batch_size=32, channels=16, augment=True)
    assert metrics.classifier_accuracy(classifier, *_four_shapes(seed=1)) == 1.0
    again = metrics.train_classifier(images, labels, epochs=4, seed=0, batch_size=32, channels=16, augment=True)
    assert all(torch.equal(p, q) for p, q in zip(classifier.parameters(), again.parameters()))


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

    def decode(self, content, style, generator=None):
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
    # Binarised, every id pixel (1..5, clamped to probability 1) becomes 1: only character 1's 4 of 20 are named.
    assert result["real_binarized_accuracy"] == 0.2
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


# ---- style effect ------------------------------------------------------------------------------


def test_ink_masks_need_no_threshold():
    stroke = np.zeros((28, 28))
    stroke[6:22, 12:14], stroke[13:15, 6:22] = 1, 1  # a cross of 60 ink pixels
    stroke = stroke.ravel()
    ink = int(stroke.sum())
    assert (metrics.ink_masks(stroke) == (stroke == 1)).all()  # a binary drawing's mask is its ink
    # A blurred map: the strokes at grey 0.45, the rest a faint haze, the same expected ink count.
    haze = 0.55 * ink / (stroke.size - ink)
    blurred = np.where(stroke == 1, 0.45, haze)
    assert blurred.sum() == pytest.approx(ink) and not (blurred >= 0.5).any()  # a 0.5 threshold sees nothing
    assert (metrics.ink_masks(blurred) == (stroke == 1)).all()
    assert (metrics.ink_masks(np.stack([stroke, blurred])) == (stroke == 1)).all()  # (..., P) batches
    assert metrics.ink_masks(np.array([0.5, 0.5, 0.5, 0.5])).tolist() == [True, True, False, False]  # ties: first
    assert not metrics.ink_masks(np.zeros(4)).any()


def _bar(shear=0.0, length=16, value=0.75, side=28):
    """A one-pixel-wide stroke `length` rows tall and `value` grey, its top shifted right by shear * length."""
    image = np.zeros((side, side))
    top = (side - length) // 2
    for row in range(top, top + length):
        image[row, 12 + int(round(shear * (top + length - 1 - row)))] = value
    return image


def test_hand_measures_known_answers():
    bars = np.stack([_bar(), _bar(value=1.0), _bar(0.5), _bar(-0.5), _bar(length=8)])
    measures = metrics.hand_measures(bars)
    assert measures["thickness"] == pytest.approx([0.75, 1.0, 0.75, 0.75, 0.75])  # the ink of the touched pixels
    assert measures["slant"] == pytest.approx([0.0, 0.0, 0.5, -0.5, 0.0], abs=0.05)
    assert measures["size"][0] == pytest.approx(np.sqrt((16 ** 2 - 1) / 12))  # the spread of 16 rows
    assert measures["size"][4] == pytest.approx(np.sqrt((8 ** 2 - 1) / 12))
    # Against their character: bars 24 and 22 long are one character, 8 and 9 another.
    sizes = np.stack([_bar(length=24), _bar(length=22), _bar(length=8), _bar(length=9)])
    spread = metrics.hand_measures(sizes)["size"]
    relative = metrics.hand_measures(sizes, groups=[7, 7, 3, 3])
    assert relative["size"] == pytest.approx(np.concatenate([spread[:2] / spread[:2].mean(), spread[2:] / spread[2:].mean()]))
    assert np.argmax(spread) == 0 and np.argmax(relative["size"]) == 3  # the 9-long bar is large for its character
    assert np.argmin(spread) == 2 and np.argmin(relative["size"]) == 2
    assert relative["thickness"] == pytest.approx(0.0) and relative["slant"] == pytest.approx(0.0, abs=1e-9)


def test_distinct_hands_pick_each_extreme_once():
    images = np.stack([_bar(length=10), _bar(value=1.0), _bar(0.5), _bar(-0.5), _bar(length=24), _bar(value=0.4)])
    picked, names = metrics.distinct_hands(images)
    assert names == ["thick", "thin", "slant /", "slant \\", "large", "small"]
    assert picked.tolist() == [1, 5, 2, 3, 4, 0]
    assert metrics.distinct_hands(images, 2)[1] == ["thick", "thin"]
    assert metrics.distinct_hands(images[:3])[1] == ["thick", "thin", "slant /"]  # one drawing per hand at most


def test_ink_distance_and_style_effect_known_answers():
    # Each mask is the round(sum) darkest pixels: {0, 1}, {1, 2}, {0, 1}.
    a, b, c = np.array([0.9, 0.9, 0.1, 0.1]), np.array([0.1, 0.7, 0.8, 0.4]), np.array([1.0, 1.0, 0.0, 0.0])
    # Pairs (a, b): 1 - 1/3; (a, c): 0; (b, c): 1 - 1/3.
    assert metrics._ink_distance(np.stack([a, b, c])[None]) == pytest.approx([4 / 9])
    assert metrics._ink_distance(np.stack([a, 0.4 * b])[None]) == pytest.approx([1.0])  # 0.4 b: mask {2}
    assert metrics._ink_distance(np.zeros((1, 2, 4))) == pytest.approx([0.0])  # two empty masks
    real = np.stack([np.stack([a, b, c]), np.stack([a, c, c])])  # (2 characters, 3 drawers, 4 pixels)
    result = metrics._style_effect(np.stack([np.stack([a, a, a])] * 2), real)  # the style changes nothing
    assert result["style_effect"] == 0.0 and result["real_distance"] == pytest.approx((4 / 9 + 0) / 2)
    assert metrics._style_effect(real, real)["style_effect"] == pytest.approx(1.0)
    assert metrics._style_effect(real[::-1, [1, 0, 2]], real)["style_effect"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="identical"):
        metrics._style_effect(real, np.stack([np.stack([a, a, a])] * 2))


def test_style_effect_drawings():
    character, alphabet, drawer = _labels(alphabets=(8, 5), drawers=8)
    content, style, real = metrics.style_effect_drawings(character, alphabet, drawer, styles=5, seed=0)
    assert content.shape == (13,) and style.shape == real.shape == (13, 5)
    assert np.all(character[real] == character[content][:, None])
    assert np.all(character[style] != character[content][:, None])
    assert np.all(alphabet[style] == alphabet[content][:, None])
    assert np.all(drawer[style] == drawer[real])  # style j from real drawing j's drawer
    for row in range(13):
        hands = np.concatenate([[drawer[content[row]]], drawer[real[row]]])
        assert len(np.unique(hands)) == 6
    again = metrics.style_effect_drawings(character, alphabet, drawer, styles=5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(again, (content, style, real)))
    with pytest.raises(ValueError, match="9 drawers"):
        metrics.style_effect_drawings(character, alphabet, drawer, styles=8)


class ImageCodes(nn.Module):
    """Duck-typed model whose content and style codes are both the image's pixels; decode returns
    the content image (style="ignored") or the style image (style="image")."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.anchor = nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def encode(self, x):
        return x.flatten(1), x.flatten(1)

    def decode(self, content, style, generator=None):
        side = math.isqrt(content.shape[1])
        return (style if self.style == "image" else content).view(-1, 1, side, side)


def test_style_effect_of_known_decoders():
    test, _ = _known_codes("random")  # 50 characters x 8 drawers, one ink pixel per character
    rng = np.random.default_rng(0)
    images = rng.random((len(test), 1, 8, 8)).astype(np.float32)  # every drawing its own pattern
    images[:, 0, 0, 0] = 1.0  # some ink in common
    args = (test.character, test.alphabet, test.drawer)
    assert metrics.style_effect(ImageCodes("ignored"), images, *args, styles=5, seed=0)["style_effect"] == 0.0
    result = metrics.style_effect(ImageCodes("image"), images, *args, styles=5, seed=0)
    # Decoding the style image: the spread of the style drawings over that of the real ones.
    content, style, real = metrics.style_effect_drawings(*args, styles=5, seed=0)
    flat = images.reshape(len(images), -1)
    expected = (metrics._ink_distance(flat[style]).mean() / metrics._ink_distance(flat[real]).mean())
    assert result["style_effect"] == pytest.approx(expected)
    assert 0.5 < result["style_effect"] < 2.0  # random patterns: about as spread as the real ones
    codes = tuple(torch.from_numpy(images).flatten(1).numpy() for _ in range(2))  # what encode gives
    assert metrics.style_effect(ImageCodes("image"), images, *args, styles=5, seed=0, codes=codes) == result
    assert result["characters"] == 50 and result["styles"] == 5 and result["floor"] == 0.0


class NoisyDecoder(ImageCodes):
    """An autoregressive stand-in that ignores the style: each decoding a fresh random binary pattern
    (half its pixels ink), so all its spread is sampling's."""

    autoregressive = True

    def decode(self, content, style, generator=None):
        side = math.isqrt(content.shape[1])
        return (torch.rand(len(content), 1, side, side, generator=generator) < 0.5).float()


def test_style_effect_floor_of_a_sampling_decoder():
    test, _ = _known_codes("random")
    images = np.random.default_rng(0).random((len(test), 1, 8, 8)).astype(np.float32)
    result = metrics.style_effect(NoisyDecoder("ignored"), images, test.character, test.alphabet, test.drawer,
                                  styles=5, seed=0)
    assert result["style_effect"] > 0.5  # samples differ though the style does nothing...
    assert result["floor"] == pytest.approx(result["style_effect"], rel=0.05)  # ...and the floor says so


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
    from omnivae import evaluate
    from omnivae.evaluate import code_metrics, pixel_baseline
    from omnivae.registry import METRICS

    test, codes = _known_codes("random")
    results = code_metrics(codes, test, seed=0, episodes=500)
    assert set(results) <= set(METRICS)  # every key is a registry record
    # Content codes name the character: perfect few-shot and clustering.
    for key in ("content_20way_1shot", "content_5way_1shot"):
        assert results[key] == 1.0 and results[f"{key}_ci95"] == 0.0
    assert results["content_kmeans_accuracy"] > 0.95 and results["content_nmi"] > 0.95
    # And so do 5-shot prototypes and k-means within each alphabet, on content means and on pixels.
    for key in ("content_20way_5shot", "pixel_20way_5shot"):
        assert results[key] == 1.0 and results[f"{key}_ci95"] == 0.0
    assert results["content_alphabet_kmeans_accuracy"] > 0.95 and results["pixel_alphabet_kmeans_accuracy"] == 1.0
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
    assert cached.name.startswith(f"pixels_v{evaluate.PIXEL_BASELINE_VERSION}_")
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


def test_likelihoods_marginalise_the_detail_code():
    """k = 1: -log w with z = [content, style, detail], each drawn from its posterior with the
    first torch.randn of Generator(seed), and the detail code decoded with the other two."""
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2, detail_dim=3))
    images = metrics.binarize(torch.rand(3, 1, 28, 28) * 0.4, seed=2)
    result = metrics.iwae_nll(model, images, k=1, batch_size=3, seed=4)
    model.eval()
    with torch.no_grad():
        q = model.posterior(images)
        mean = torch.cat([q.content_mean, q.style_mean, q.detail_mean], 1)  # (3, 9)
        std = torch.cat([q.content_logvar, q.style_logvar, q.detail_logvar], 1).mul(0.5).exp()
        z = mean + std * torch.randn(1, 3, 9, generator=torch.Generator().manual_seed(4))[0]  # (3, 9)
        logits = model.decode_logits(z[:, :4], z[:, 4:6], detail=z[:, 6:])  # (3, 1, 28, 28)
        log_p_x = torch.distributions.Bernoulli(logits=logits).log_prob(images).flatten(1).sum(1)
        normal = torch.distributions.Normal
        log_w = log_p_x + normal(0.0, 1.0).log_prob(z).sum(1) - normal(mean, std).log_prob(z).sum(1)  # (3,)
    assert result["nll"] == pytest.approx(-log_w.mean().item(), abs=1e-3)
    # A set of one drawing is the same estimate with the same noise.
    single = metrics.set_nll(model, images, np.arange(3)[:, None], k=1, batch_size=3, seed=4)
    assert single["nll"] == pytest.approx(result["nll"], abs=1e-3)


def test_swap_judge_scores_a_detail_models_whole_reconstructions():
    # Reconstructions decode each drawing's detail code (model.reconstruct); swaps decode its prior mean.
    torch.manual_seed(0)
    model = StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2, detail_dim=3)).eval()
    images, character = torch.rand(40, 1, 28, 28), np.repeat(np.arange(8), 5)
    class InkJudge:  # names a drawing by its total ink, finely: any change of the decoding changes its name
        def predict(self, x):
            return (torch.as_tensor(x).flatten(1).sum(1) * 1000).long().remainder(8).numpy()

    judge = InkJudge()
    result = metrics.swap_consistency(model, judge, images, character, pairs=30, seed=2)
    a, b = metrics._different_character_pairs(character, 30, np.random.default_rng(2))
    with torch.no_grad():
        whole = judge.predict(model.reconstruct(images[a]))
        content, style = model.encode(images)
        swapped = judge.predict(model.decode(content[a], style[b]))
    assert result["reconstruction_accuracy"] == pytest.approx(np.mean(whole == character[a]))
    assert result["swap_consistency"] == pytest.approx(np.mean(swapped == character[a]))


# ---- content codes read in turned views ------------------------------------------------------


class PixelEncoder(nn.Module):
    """encode(x) = (two fixed pixels of the drawing, nothing): a known content code for each view."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def encode(self, x):
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, 1]], 1) + 0.1, x.new_zeros(len(x), 1)  # (N, 2), (N, 1)


def test_view_codes_are_the_unit_codes_of_each_view_side_by_side():
    from omnivae import augment

    torch.manual_seed(0)
    images = torch.rand(5, 1, 4, 4)
    model = PixelEncoder().train()
    for kinds in (1, 2, 4, 8):
        codes = metrics.view_codes(model, images, kinds)
        assert codes.shape == (5, 2 * kinds) and codes.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, rtol=1e-6)
        for k, view in enumerate(augment.turned_views(images, kinds)):
            content = model.encode(view)[0].detach().numpy()
            expected = content / np.linalg.norm(content, axis=1, keepdims=True) / math.sqrt(kinds)
            np.testing.assert_allclose(codes[:, 2 * k:2 * k + 2], expected, rtol=1e-5)
        # The cosine of two view codes is the mean over views of the views' cosines.
        cosines = [F.cosine_similarity(model.encode(v)[0][:1], model.encode(v)[0][1:2]).item()
                   for v in augment.turned_views(images, kinds)]
        assert float(codes[0] @ codes[1]) == pytest.approx(np.mean(cosines), rel=1e-5)
        # Content means the caller already has stand for the first view, which is not encoded again.
        own = model.encode(images)[0].detach().numpy()
        np.testing.assert_array_equal(metrics.view_codes(model, images, kinds, content=own), codes)
        marked = metrics.view_codes(model, images, kinds, content=np.tile([[3.0, 4.0]], (5, 1)))
        np.testing.assert_allclose(marked[:, :2], np.tile([[0.6, 0.8]], (5, 1)) / math.sqrt(kinds), rtol=1e-6)
        assert marked.dtype == np.float32
        np.testing.assert_array_equal(marked[:, 2:], codes[:, 2:])
    assert model.training  # the mode is put back
