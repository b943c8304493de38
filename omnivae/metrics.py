"""Evaluation metrics: one function per metric, each citing its source.

Every metric has a pure core on plain arrays (tests call it with known answers) and, where it
needs a model, a public wrapper that takes the model and the data. Codes are encoded once with
`encode_images` and shared by the code-based metrics (clustering, few-shot, prior match).

Conventions: images are (N, 1, S, S) float tensors in [0, 1] with ink = 1 (`Omniglot.tensors()`;
uint8 arrays with ink = 255 and (N, S, S) arrays are accepted too); codes are (N, D) arrays;
labels are the raw integer ids of the data (`character` 1..1623, `drawer` 1..20, `alphabet`).
Every random choice is drawn from a generator seeded by an explicit `seed` argument, never
from global state, so each number is exactly reproducible on the same device. Evaluation gives
each random use its own seed (`eval_streams`), so no two uses draw the same numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import augment
from .losses import LOG_2PI, gaussian_kl, mmd

# ---------------------------------------------------------------------------------------------
# Random streams

# Every random use of an evaluation, in a fixed order: the i-th name gets child i of
# SeedSequence(eval_seed). New uses go at the end, so the existing ones keep their numbers.
EVAL_STREAMS = (
    "subset",  # the images of `evaluate --subset`
    "kmeans",  # k-means++ seeding
    "episodes",  # few-shot episodes (and, within them, tie-breaking)
    "random_codes",  # the random-code reference for style leakage
    "posterior_samples",  # z = mean + sigma * eps for the prior match
    "prior_match",  # subset and N(0, I) samples of the prior match
    "swap_pairs",  # the (A, B) pairs of swap consistency
    "nll_images",  # the images the likelihood uses
    "binarize",  # dynamic binarisation of those images
    "iwae",  # importance-sampling noise
    "figures",  # picks, samples and t-SNE seeds of the figures
    "alphabet_kmeans",  # k-means++ seeding of the per-alphabet clustering
    "episodes_5shot",  # 5-shot episodes (and, within them, tie-breaking)
    "digits",  # the episodes of the digits transfer
    "style_effect",  # the drawings of the style effect
    "set_nll_sets",  # the sets of drawings the set likelihood uses
    "set_binarize",  # dynamic binarisation of those drawings
    "set_iwae",  # importance-sampling noise of the set and conditional likelihoods
)


def child_seeds(seed, n: int) -> list[int]:
    """n independent integer seeds derived from `seed`: numpy's SeedSequence(seed).spawn(n).

    Child i is SeedSequence(seed, spawn_key=(i,)), whose state is hashed from both the seed and
    the key, so the children's streams are independent of each other and of `seed`'s own stream
    (numpy's "Parallel random number generation" guide). Each is one 32-bit word, usable by
    numpy, torch.Generator.manual_seed and scikit-learn's random_state. seed: an int >= 0.
    """
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n)]


def eval_streams(eval_seed: int) -> dict[str, int]:
    """One integer seed per named random use of an evaluation (see EVAL_STREAMS), from `child_seeds`."""
    return dict(zip(EVAL_STREAMS, child_seeds(eval_seed, len(EVAL_STREAMS))))


# ---------------------------------------------------------------------------------------------
# Helpers


def _as_images(images) -> torch.Tensor:
    """(N, 1, S, S) float32 in [0, 1] from a tensor or array; uint8 is read as ink = 255."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.float()
    if images.dim() == 3:  # (N, S, S) -> (N, 1, S, S)
        images = images[:, None]
    return images


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def unit_rows(codes: np.ndarray) -> np.ndarray:
    """Each vector along the last axis scaled to length 1 (zero vectors stay 0): what a cosine compares."""
    return codes / np.maximum(np.linalg.norm(codes, axis=-1, keepdims=True), 1e-12)


# Drawings per encoder pass. Each drawing's code does not depend on its batch (eval mode), and on a
# CPU small batches stay in cache: 128 encodes about twice as fast as 1,024 on a 2-core AMD EPYC.
ENCODE_BATCH = 128


@torch.no_grad()
def encode_images(model, images, batch_size: int = ENCODE_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means of every image: (content_mean (N, Dc), style_mean (N, Ds)) as float32 arrays.

    The model is put in eval mode for the pass (batch-norm statistics, not the batch's) and
    its previous mode is restored afterwards.
    """
    return _encoder_pass(model, images, model.encode, batch_size)


def view_codes(model, images, kinds: int, batch_size: int = ENCODE_BATCH, content=None) -> np.ndarray:
    """Content codes read in the `kinds` turned (and mirrored) views of each drawing: (N, kinds * Dc).

    A model trained with `rotations` (and `reflections`) learned each quarter turn (and mirror
    image) of a character as a character of its own (Vinyals et al. 2016), so each view of a
    drawing is one its encoder has learned to name. The code is the content means of the views
    (`augment.turned_views`), each scaled to length 1, side by side and divided by sqrt(kinds):
    a unit vector whose cosine with another drawing's is the mean of the views' cosines, and which
    k-means on these codes clusters by. Test-time augmentation over the transformations the model
    was trained on; kinds = 1 gives the unit content means. Averaging the views' codes instead
    would mix eight different characters' codes.
    images: (N, 1, S, S) in [0, 1] (or uint8); content: the drawings' own content means (N, Dc)
    where the caller has them (`encode_images`'), so the first view is not encoded again.
    Returns float32 (N, kinds * Dc).
    """
    images = _as_images(images)
    views = []
    for k, view in enumerate(augment.turned_views(images, kinds)):
        means = (_as_numpy(content).astype(np.float32) if k == 0 and content is not None
                 else encode_images(model, view, batch_size)[0])
        views.append(unit_rows(means))  # (N, Dc)
    return np.concatenate(views, 1) / np.float32(math.sqrt(kinds))  # (N, kinds * Dc)


def _all_means(model, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Posterior means (content, style, detail) of images x: `encode`'s two and the detail code's."""
    q = model.posterior(x)
    return q.content_mean, q.style_mean, q.detail_mean


@torch.no_grad()
def _encoder_pass(model, images, read, batch_size: int = ENCODE_BATCH) -> tuple[np.ndarray, ...]:
    """`read(x)`'s tensors for every batch of images, concatenated over the batches as float32
    arrays, with the model in eval mode for the pass (its mode restored afterwards)."""
    images = _as_images(images)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(images), batch_size):
            parts.append([t.float().cpu() for t in read(images[start:start + batch_size].to(model.device))])
    finally:
        model.train(was_training)
    return tuple(torch.cat(column).numpy() for column in zip(*parts))


# ---------------------------------------------------------------------------------------------
# Clustering


def cluster_accuracy(true, pred) -> float:
    """Accuracy of cluster ids `pred` against labels `true` under the best one-to-one matching.

    ACC = max over one-to-one maps m from clusters to labels of mean_i [true_i == m(pred_i)],
    found by the Hungarian algorithm on the (clusters x labels) contingency matrix
    (Yang et al. 2010, "Image Clustering Using Local Discriminant Models and Global
    Integration"; Xie et al. 2016, "Unsupervised Deep Embedding for Clustering Analysis",
    section 4.2). The numbers of clusters and labels may differ: the surplus ones stay
    unmatched and all their points count as errors. Ids may be any integers.
    """
    from scipy.optimize import linear_sum_assignment

    true, pred = _as_numpy(true).ravel(), _as_numpy(pred).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"true and pred differ in length: {true.shape[0]} vs {pred.shape[0]}")
    if true.size == 0:
        raise ValueError("cluster_accuracy needs at least one point")
    _, true_index = np.unique(true, return_inverse=True)
    _, pred_index = np.unique(pred, return_inverse=True)
    counts = np.zeros((pred_index.max() + 1, true_index.max() + 1), dtype=np.int64)  # (clusters, labels)
    np.add.at(counts, (pred_index, true_index), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / true.size)


def kmeans_scores(codes, labels, seed: int = 0, n_init: int = 3, max_iter: int = 300) -> dict:
    """k-means on the codes with K = number of distinct labels; accuracy and NMI against the labels.

    Clustering accuracy as in `cluster_accuracy` (Xie et al. 2016) and normalised mutual
    information (Strehl and Ghosh 2002, "Cluster Ensembles", arithmetic-mean normalisation as
    in scikit-learn). k-means is scikit-learn's Lloyd algorithm with k-means++ seeding, fixed
    random_state=seed and n_init=3 restarts (the best inertia wins): on 13,180 x 32 codes with
    K = 659 it takes a few seconds on two CPU cores, where Elkan's variant is slower (its
    bounds cost O(N K) memory and updates) and more restarts buy little. Deterministic for a
    seed on a given machine.
    codes: (N, D); labels: (N,) any integer ids.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    codes = _as_numpy(codes).astype(np.float32, copy=False)  # (N, D)
    labels = _as_numpy(labels).ravel()  # (N,)
    k = len(np.unique(labels))
    kmeans = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, algorithm="lloyd", random_state=seed)
    pred = kmeans.fit_predict(codes)  # (N,)
    return {
        "accuracy": cluster_accuracy(labels, pred),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "clusters": int(k),
    }


def alphabet_kmeans_scores(codes, character, alphabet, seed: int = 0, n_init: int = 3) -> dict:
    """k-means within each alphabet, K = its number of characters; accuracy averaged over alphabets.

    The unsupervised cross-task protocol on the Omniglot evaluation set of Hsu et al. 2019
    ("Multi-class classification without multi-class labels", ICLR; Hsu et al. 2018, "Learning
    to cluster in order to transfer across domains and tasks"): each alphabet is clustered on its
    own, scored with `cluster_accuracy` (Hungarian matching) and the scores are averaged over
    alphabets with equal weight. With K = the alphabet's character count (the known-K setting).
    Each alphabet is clustered by `kmeans_scores` (Lloyd, k-means++, n_init restarts,
    random_state=seed) on one thread: on problems this small (hundreds of points) the thread
    pool's start-up and waiting cost far more than the arithmetic (on two busy CPU cores, 20
    alphabets of raw pixels take about 3 s on one thread and over a minute on two). Easier than
    one k-means over all characters: an alphabet has 14 to 55 characters, and confusions with
    other alphabets cannot happen.
    codes: (N, D); character, alphabet: (N,) integer ids.
    Returns {"accuracy": mean over alphabets, "nmi": mean over alphabets, "alphabets"}.
    """
    from threadpoolctl import threadpool_limits

    codes = _as_numpy(codes)
    character, alphabet = _as_numpy(character).ravel(), _as_numpy(alphabet).ravel()
    with threadpool_limits(limits=1):
        scores = [kmeans_scores(codes[alphabet == a], character[alphabet == a], seed, n_init)
                  for a in np.unique(alphabet)]
    return {
        "accuracy": float(np.mean([s["accuracy"] for s in scores])),
        "nmi": float(np.mean([s["nmi"] for s in scores])),
        "alphabets": len(scores),
    }


# ---------------------------------------------------------------------------------------------
# Few-shot classification


def _drawing_cells(character: np.ndarray, drawer: np.ndarray, rows: np.ndarray):
    """The drawings `rows` arranged by (character, drawer), both numbered from 0 within them.

    Returns (sorted_rows, first, count, drawn): `rows` sorted by (character, drawer); for each
    (character, drawer) cell, where its drawings start in sorted_rows and how many it has, both
    (n_chars, n_hands); and drawn = count > 0.
    """
    _, char_index = np.unique(character[rows], return_inverse=True)
    _, hand_index = np.unique(drawer[rows], return_inverse=True)
    n_chars, n_hands = char_index.max() + 1, hand_index.max() + 1
    order = np.lexsort((hand_index, char_index))  # rows grouped by (character, drawer)
    cell = char_index[order] * n_hands + hand_index[order]  # (n,) flat cell index, sorted
    count = np.bincount(cell, minlength=n_chars * n_hands).reshape(n_chars, n_hands)  # drawings per cell
    first = np.searchsorted(cell, np.arange(n_chars * n_hands)).reshape(n_chars, n_hands)  # cell starts
    return rows[order], first, count, count > 0


def few_shot_episodes(character, alphabet, drawer, ways: int = 20, episodes: int = 1000, seed=0,
                      within_alphabet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (support, query), each (episodes, ways), for N-way one-shot episodes.

    The within-alphabet one-shot classification of Lake et al. 2015 ("Human-level concept
    learning through probabilistic program induction", 20 characters of one alphabet drawn by
    two people: one drawing per character to learn from, the other's to classify), drawn at
    random as N-way 1-shot episodes (Vinyals et al. 2016, "Matching Networks for One Shot
    Learning"). Each episode picks, uniformly at each step:
      1. an alphabet among the usable ones (within_alphabet=False: one pool of all characters);
      2. an ordered pair of distinct drawers (support drawer, query drawer) among the pairs
         that both drew at least `ways` characters of that alphabet;
      3. `ways` distinct characters among those both drawers drew, in random order.
    support[e, j] is the support drawer's drawing of character j, query[e, j] the query
    drawer's: within an episode all supports share one hand and all queries another, so a code
    that knows only the hand cannot tell the characters apart. An alphabet is usable when some
    pair of its drawers drew `ways` characters in common; a (character, drawer) with several
    drawings gives one of them at random. Raises ValueError when no episode can be built.
    Deterministic for a seed (numpy default_rng; an int or a SeedSequence).
    """
    character = _as_numpy(character).ravel()
    alphabet = _as_numpy(alphabet).ravel()
    drawer = _as_numpy(drawer).ravel()
    if not (len(character) == len(alphabet) == len(drawer)):
        raise ValueError("character, alphabet and drawer must have one entry per image")
    group = alphabet if within_alphabet else np.zeros_like(alphabet)
    rng = np.random.default_rng(seed)

    # Per usable group, characters and drawers numbered from 0: the rows sorted by (character,
    # drawer), where each (character, drawer) cell starts in them and how many drawings it has,
    # and the ordered drawer pairs that share `ways` characters.
    pools = []
    for g in np.unique(group):
        rows, first, count, drawn = _drawing_cells(character, drawer, np.flatnonzero(group == g))
        both = drawn.T.astype(np.int64) @ drawn  # (n_hands, n_hands) characters drawn by both
        np.fill_diagonal(both, 0)
        pairs = np.argwhere(both >= ways)  # (P, 2) ordered (support hand, query hand)
        if len(pairs):
            pools.append((rows, first, count, drawn, pairs))
    if not pools:
        where = "alphabet" if within_alphabet else "set"
        raise ValueError(f"no {ways}-way episode can be built: no {where} has two drawers who both drew "
                         f"{ways} of its characters")

    support = np.empty((episodes, ways), dtype=np.int64)
    query = np.empty((episodes, ways), dtype=np.int64)
    for e in range(episodes):
        rows, first, count, drawn, pairs = pools[rng.integers(len(pools))]
        support_hand, query_hand = pairs[rng.integers(len(pairs))]
        common = np.flatnonzero(drawn[:, support_hand] & drawn[:, query_hand])
        picked = rng.choice(common, size=ways, replace=False)  # (ways,) distinct, in random order
        for out, hand in ((support, support_hand), (query, query_hand)):
            offset = np.floor(rng.random(ways) * count[picked, hand]).astype(np.int64)  # which drawing, if several
            out[e] = rows[first[picked, hand] + offset]
    return support, query


def _has_drawer_group(masks: list[int], size: int, ways: int) -> bool:
    """Do `size` of the drawers share `ways` characters? masks[h]: the characters drawer h drew, as bits.

    A depth-first search over sets of drawers that stops at the first one found and prunes any
    partial set that already shares fewer than `ways` characters.
    """
    def search(start: int, common: int, left: int) -> bool:
        if common.bit_count() < ways:
            return False
        if left == 0:
            return True
        return any(search(h + 1, common & masks[h], left - 1) for h in range(start, len(masks)))

    return search(0, (1 << max(m.bit_length() for m in masks)) - 1 if masks else 0, size)


def multi_shot_episodes(character, alphabet, drawer, ways: int = 20, shots: int = 5, episodes: int = 1000, seed=0,
                        max_tries: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (support (episodes, ways, shots), query (episodes, ways)) for N-way K-shot episodes.

    `few_shot_episodes` (Lake et al. 2015) with K drawings to learn each character from: within an
    episode the supports come from K drawers, each of whom drew every character once for it, and
    the queries from another drawer, so the hands of the supports and of the query still differ,
    and a code that knows only the hand scores chance. Each episode picks, uniformly at each step:
      1. an alphabet among the usable ones;
      2. a query drawer and a set of `shots` other drawers (the support drawers) among those whose
         K + 1 drawers all drew at least `ways` characters of the alphabet in common, by rejection:
         uniform draws of (query drawer, support drawers) until one qualifies (at most
         `max_tries`, then ValueError);
      3. `ways` distinct characters among those all K + 1 drew, in random order.
    support[e, j, s] is support drawer s's drawing of character j, query[e, j] the query drawer's;
    a (character, drawer) with several drawings gives one of them at random. An alphabet is
    usable when some K + 1 of its drawers drew `ways` characters in common. Raises ValueError when
    no episode can be built. Deterministic for a seed (numpy default_rng). With shots = 1 use
    `few_shot_episodes`, whose draws these are not.
    """
    character = _as_numpy(character).ravel()
    alphabet = _as_numpy(alphabet).ravel()
    drawer = _as_numpy(drawer).ravel()
    if not (len(character) == len(alphabet) == len(drawer)):
        raise ValueError("character, alphabet and drawer must have one entry per image")
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    pools = []
    for a in np.unique(alphabet):
        rows, first, count, drawn = _drawing_cells(character, drawer, np.flatnonzero(alphabet == a))
        masks = [int(sum(1 << int(c) for c in np.flatnonzero(drawn[:, h]))) for h in range(drawn.shape[1])]
        if drawn.shape[1] > shots and _has_drawer_group(masks, shots + 1, ways):
            pools.append((rows, first, count, drawn))
    if not pools:
        raise ValueError(f"no {ways}-way {shots}-shot episode can be built: no alphabet has {shots + 1} drawers "
                         f"who all drew {ways} of its characters")

    support = np.empty((episodes, ways, shots), dtype=np.int64)
    query = np.empty((episodes, ways), dtype=np.int64)
    for e in range(episodes):
        rows, first, count, drawn = pools[rng.integers(len(pools))]
        for _ in range(max_tries):
            hands = rng.choice(drawn.shape[1], size=shots + 1, replace=False)  # (K + 1,) query first
            common = np.flatnonzero(drawn[:, hands].all(1))
            if len(common) >= ways:
                break
        else:
            raise ValueError(f"no {shots + 1} drawers sharing {ways} characters found in {max_tries} draws")
        picked = rng.choice(common, size=ways, replace=False)  # (ways,) distinct, in random order
        cells = count[picked[:, None], hands]  # (ways, K + 1) drawings per cell
        offset = np.floor(rng.random(cells.shape) * cells).astype(np.int64)  # which drawing, if several
        chosen = rows[first[picked[:, None], hands] + offset]  # (ways, K + 1)
        query[e], support[e] = chosen[:, 0], chosen[:, 1:]
    return support, query


def labelled_episodes(labels, ways: int = 10, shots: int = 1, episodes: int = 1000, seed=0):
    """Index arrays (support (episodes, ways, shots), query (episodes, ways)) for episodes on plain labels.

    For a set with class labels only (no drawers): each episode picks `ways` distinct classes
    among those with at least shots + 1 images, in random order, and for each class shots + 1
    distinct images at random, the first `shots` its supports and the last its query (Vinyals
    et al. 2016). Deterministic for a seed (numpy default_rng).
    """
    labels = _as_numpy(labels).ravel()
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    classes = [rows for rows in classes if len(rows) > shots]
    if len(classes) < ways:
        raise ValueError(f"no {ways}-way {shots}-shot episode: only {len(classes)} classes have {shots + 1} images")
    rng = np.random.default_rng(seed)
    support = np.empty((episodes, ways, shots), dtype=np.int64)
    query = np.empty((episodes, ways), dtype=np.int64)
    for e in range(episodes):
        for j, c in enumerate(rng.choice(len(classes), size=ways, replace=False)):
            drawn = rng.choice(classes[c], size=shots + 1, replace=False)
            support[e, j], query[e, j] = drawn[:shots], drawn[shots]
    return support, query


def _few_shot_correct(codes, support, query, seed=0, chunk: int = 100) -> np.ndarray:
    """(E, W) bool: is query[e, j]'s nearest support (cosine similarity) support[e, j]?

    codes: (N, D); support, query: (E, W) row indices with query[e, j] the same character as
    support[e, j]. With K supports per character, support (E, W, K), each character is its
    prototype: the mean of its K unit support codes, made unit again, so the query takes the
    character of the nearest prototype by cosine similarity (Snell et al. 2017, "Prototypical
    Networks for Few-shot Learning", with cosine in place of squared Euclidean distance).
    Ties (similarities within 1e-9 of the best, e.g. identical supports, or a zero code, whose
    similarity to everything is 0) are broken uniformly at random with numpy
    default_rng(seed), so a tie among t supports that include the right one scores 1 / t in
    expectation wherever the right one sits. The episodes are scored `chunk` at a time to
    bound memory; the result does not depend on `chunk`.
    """
    codes = _as_numpy(codes).astype(np.float64)  # (N, D)
    codes = unit_rows(codes)  # zeros stay 0
    support, query = _as_numpy(support), _as_numpy(query)
    episodes, ways = support.shape[:2]
    keys = np.random.default_rng(seed).random((episodes, ways, ways))  # (E, W queries, W supports)
    pred = np.empty((episodes, ways), dtype=np.int64)
    for start in range(0, episodes, chunk):
        s = codes[support[start:start + chunk]]  # (e, W, D), or (e, W, K, D) with K supports each
        if s.ndim == 4:  # prototypes: mean unit support code, made unit again
            s = s.mean(2)  # (e, W, D)
            s = unit_rows(s)
        q = codes[query[start:start + chunk]]  # (e, W, D)
        similarity = q @ s.transpose(0, 2, 1)  # (e, W queries, W supports)
        best = similarity.max(-1, keepdims=True)  # (e, W, 1)
        tied = similarity >= best - 1e-9  # (e, W, W), the best and anything equal to it up to round-off
        pred[start:start + chunk] = np.where(tied, keys[start:start + chunk], -1.0).argmax(-1)
    return pred == np.arange(ways)  # (E, W)


def mean_ci95(values) -> tuple[float, float]:
    """Mean of `values` and the half-width of its 95% normal confidence interval, 1.96 sd / sqrt(n).

    sd is the sample standard deviation (ddof = 1). This is the interval few-shot papers give
    over test episodes (e.g. Finn et al. 2017, "Model-Agnostic Meta-Learning", Table 1). With
    episodes drawn independently from one test set it measures the noise of the episode draw,
    not that of the test set or of training. The half-width is nan for a single value.
    """
    values = _as_numpy(values).astype(np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if values.size == 1:
        return float(values[0]), math.nan
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def few_shot_scores(codes, support, query, seed=0) -> dict:
    """Nearest-neighbour accuracy on given episodes: mean over episodes and its 95% half-width.

    Scores every query with `_few_shot_correct` (cosine nearest support, ties at random with
    `seed`); the per-episode accuracies go through `mean_ci95`. Scoring several codes on the
    same (support, query) compares them on the same episodes.
    Returns {"accuracy", "ci95", "episodes"}.
    """
    accuracy, ci95 = mean_ci95(_few_shot_correct(codes, support, query, seed).mean(1))  # (E,) per episode
    return {"accuracy": accuracy, "ci95": ci95, "episodes": int(len(support))}


def few_shot_accuracy(codes, character, alphabet, drawer, ways: int = 20, episodes: int = 1000, seed=0,
                      within_alphabet: bool = True, shots: int = 1) -> dict:
    """N-way K-shot accuracy of nearest-neighbour (cosine) classification on the codes.

    One shot: episodes from `few_shot_episodes` (Lake et al. 2015; Vinyals et al. 2016). K > 1
    shots: episodes from `multi_shot_episodes` (K support drawers, one query drawer, always within
    an alphabet), each query taking the character of the nearest prototype (Snell et al. 2017).
    Scored by `few_shot_scores`. The episodes and the tie-breaking draw from two children of
    `seed` (`child_seeds`), so every set of codes scored with the same labels, ways, shots,
    episodes and seed sees exactly the same episodes. Chance is 1 / ways.
    Returns {"accuracy": mean over episodes, "ci95": 95% half-width over episodes, "episodes"}.
    """
    episode_seed, tie_seed = child_seeds(seed, 2)
    if shots == 1:
        support, query = few_shot_episodes(character, alphabet, drawer, ways, episodes, episode_seed, within_alphabet)
    else:
        if not within_alphabet:
            raise ValueError("episodes with several shots are drawn within an alphabet only")
        support, query = multi_shot_episodes(character, alphabet, drawer, ways, shots, episodes, episode_seed)
    return few_shot_scores(codes, support, query, tie_seed)


def labelled_few_shot_accuracy(codes, labels, ways: int = 10, shots: int = 1, episodes: int = 1000, seed=0) -> dict:
    """N-way K-shot accuracy on a set with class labels only (`labelled_episodes`), as `few_shot_accuracy`.

    Nearest support (one shot) or nearest prototype (Snell et al. 2017) by cosine similarity; the
    episodes and the tie-breaking draw from two children of `seed`, so codes scored with the same
    labels, ways, shots, episodes and seed see the same episodes. Chance is 1 / ways.
    Returns {"accuracy", "ci95", "episodes"}.
    """
    episode_seed, tie_seed = child_seeds(seed, 2)
    support, query = labelled_episodes(labels, ways, shots, episodes, episode_seed)
    return few_shot_scores(codes, support, query, tie_seed)


# ---------------------------------------------------------------------------------------------
# KL and prior match


def per_image_kl(content_mean, content_logvar, style_mean, style_logvar, detail_mean=None, detail_logvar=None) -> dict:
    """Mean over images of the closed-form KL(q(z | x) || N(0, I)) of each latent part, in nats.

    KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1) (Kingma and Welling 2014,
    Appendix B), summed over dimensions, averaged over images. This is the per-image
    posterior KL, the ELBO's rate term: it is NOT a measure of prior match. A model whose
    every q(z | x) equals N(0, I) scores 0 while carrying no information, and a model with
    sharp posteriors scores high even when their aggregate is exactly N(0, I); see
    `prior_match` for the aggregate posterior. Inputs: (N, Dc) and (N, Ds) tensors or arrays, and
    (N, Dd) for a model with a detail code: then `kl_detail` too, and `kl_total` counts it.
    """
    def part(mean, logvar):
        mean = torch.as_tensor(_as_numpy(mean), dtype=torch.float64)
        logvar = torch.as_tensor(_as_numpy(logvar), dtype=torch.float64)
        return gaussian_kl(mean, logvar).mean().item()  # (N,) -> scalar

    kl_content, kl_style = part(content_mean, content_logvar), part(style_mean, style_logvar)
    result = {"kl_content": kl_content, "kl_style": kl_style, "kl_total": kl_content + kl_style}
    if detail_mean is not None and _as_numpy(detail_mean).shape[1]:
        result["kl_detail"] = part(detail_mean, detail_logvar)
        result["kl_total"] += result["kl_detail"]
    return result


def _fitted_gaussian_kl(codes: np.ndarray) -> float:
    """KL(N(mu_hat, S) || N(0, I)) = 1/2 (tr S + mu_hat^T mu_hat - d - log det S), full covariance.

    mu_hat, S: mean and (unbiased) covariance of the codes (N, d), in float64. Infinite when S
    is singular (collapsed codes, or fewer codes than dimensions).
    """
    codes = np.asarray(codes, dtype=np.float64)  # (N, d)
    n, d = codes.shape
    mean = codes.mean(0)  # (d,)
    centred = codes - mean
    cov = centred.T @ centred / (n - 1)  # (d, d)
    sign, logdet = np.linalg.slogdet(cov)
    if sign <= 0 or not np.isfinite(logdet):
        return math.inf
    return float(0.5 * (np.trace(cov) + mean @ mean - d - logdet))


def sample_posterior(mean, logvar, seed=0) -> np.ndarray:
    """One code per image drawn from its posterior: z = mean + exp(logvar / 2) * eps, eps ~ N(0, I).

    The reparameterisation of Kingma and Welling 2014. With one draw per image the codes are an
    exact sample of the aggregate posterior q(z) = (1/N) sum_n q(z | x_n), the mixture the
    prior should match; the means alone are a sample of a different distribution (too narrow
    by the average posterior variance). eps from numpy default_rng(seed), float64.
    mean, logvar: (N, d) -> (N, d).
    """
    mean = _as_numpy(mean).astype(np.float64)  # (N, d)
    logvar = _as_numpy(logvar).astype(np.float64)  # (N, d)
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar differ in shape: {mean.shape} vs {logvar.shape}")
    eps = np.random.default_rng(seed).standard_normal(mean.shape)  # (N, d)
    return mean + np.exp(0.5 * logvar) * eps


def prior_match(codes, seed=0, kernel: str = "imq", max_points: int = 5000, sampler=None, device=None) -> dict:
    """How far the aggregate posterior (the cloud of codes) is from the prior N(0, I), or from the
    prior that `sampler(n, generator) -> (n, d)` draws from (a learned mixture: `model.sample_content`).

    A generative VAE samples z ~ N(0, I), so what matters for sampling is the aggregate
    posterior q(z) = E_x q(z | x), not each q(z | x) (Makhzani et al. 2016, "Adversarial
    Autoencoders"; Tolstikhin et al. 2018, "Wasserstein Auto-Encoders"). Pass codes sampled
    from the posteriors (`sample_posterior`) to measure q(z) itself; posterior means measure
    only the spread of the means. Returns:
      mmd2: unbiased MMD^2 (Gretton et al. 2012, "A Kernel Two-Sample Test") between the codes
        and as many prior samples, with the kernel of `losses.mmd`;
      mmd2_floor: the same estimate between two independent prior samples of that size, the
        noise level an exact match would show (either may be slightly negative);
      gaussian_kl: KL(N(mu_hat, Sigma_hat) || N(0, I)) of the full-covariance Gaussian fitted to
        all codes, in nats (inf for singular covariance). It sees only the first two moments and
        always compares with N(0, I), whatever the prior.
    MMD costs O(n^2) memory, so when there are more than `max_points` codes a subset of that
    size is drawn without replacement; the subset and the prior samples (numpy default_rng and a
    torch.Generator) are seeded by two children of `seed` (`child_seeds`). The MMD's kernels run
    in float32 (their round-off, ~1e-6, is far below the floor), a block of 512 rows at a time,
    summed in float64; the fitted Gaussian in float64. codes: (N, d), N >= 2. device: where the
    kernels run (the draws are made on the CPU either way, so the estimate does not depend on it
    beyond round-off); None: the CPU.
    """
    codes = _as_numpy(codes).astype(np.float64)  # (N, d)
    n, d = codes.shape
    if n < 2:
        raise ValueError("prior_match needs at least two codes")
    subset_seed, prior_seed = child_seeds(seed, 2)
    rng = np.random.default_rng(subset_seed)
    subset = codes if n <= max_points else codes[np.sort(rng.choice(n, max_points, replace=False))]
    m = len(subset)
    generator = torch.Generator().manual_seed(prior_seed)
    draw = (lambda count: torch.randn(count, d, generator=generator)) if sampler is None else (
        lambda count: sampler(count, generator).float())
    prior = draw(m)  # (m, d)
    prior_again = draw(m)  # (m, d)
    subset, prior, prior_again = (t.to(device) for t in (torch.from_numpy(subset).float(), prior, prior_again))
    with torch.no_grad():
        mmd2 = mmd(subset, prior, kernel, block=512).item()
        floor = mmd(prior_again, prior, kernel, block=512).item()
    return {"mmd2": mmd2, "mmd2_floor": floor, "gaussian_kl": _fitted_gaussian_kl(codes), "points": m}


# ---------------------------------------------------------------------------------------------
# Likelihood


def binarize(images, seed: int = 0) -> torch.Tensor:
    """Dynamic binarisation: each pixel is 1 with probability its grey level, drawn with a fixed seed.

    (Salakhutdinov and Murray 2008; the usual protocol for Bernoulli likelihoods, as in Burda
    et al. 2016.) Returns (N, 1, S, S) float32 of 0s and 1s on the input's device; the draws
    are made on the CPU so they do not depend on the device.
    """
    images = _as_images(images)
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.cpu().clamp(0.0, 1.0), generator=generator).to(images.device)


def soften(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images blurred by a Gaussian of standard deviation `sigma` pixels (separable, kernel radius
    ceil(3 sigma), zero padding, the kernel normalised to sum 1); sigma 0 returns them as they are.

    What the likelihoods' importance proposal reads: an encoder trained on grey drawings
    proposes poorly for their binary draws, and a blurred binary drawing is close to the grey
    one. The proposal may be any distribution that depends on the scored drawing alone, so the
    estimates stay bounds on the same likelihood. images: (N, 1, S, S)."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    out = F.conv2d(images, g.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(out, g.view(1, 1, -1, 1), padding=(radius, 0))


def _drawing_logits(model, content: torch.Tensor, own: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """model.decode_logits for content codes (N, Dc) and each drawing's own codes (N, Ds + Dd),
    [z_style, z_detail] (no detail columns without a detail code), reading x (N, 1, S, S)."""
    if not getattr(model, "detail_dim", 0):
        return model.decode_logits(content, own, x)
    return model.decode_logits(content, own[:, :model.style_dim], x, own[:, model.style_dim:])


def _posterior_codes(q) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and log-variance of each drawing's own codes [z_style, z_detail]: (B, Ds + Dd) each."""
    if q.detail_mean is None:
        return q.style_mean, q.style_logvar
    return torch.cat([q.style_mean, q.detail_mean], 1), torch.cat([q.style_logvar, q.detail_logvar], 1)


def _content_prior_shift(model, content: torch.Tensor):
    """log p(c) - log N(c; 0, I) for content codes (..., Dc) under the model's learned mixture
    prior, added to a log-weight computed with N(0, I); 0 for a model without one."""
    if not getattr(getattr(model, "config", None), "prior_components", 0):
        return 0.0
    return 0.5 * (content.pow(2) + LOG_2PI).sum(-1) + model.content_log_prior(content)


# Drawings decoded per pass of the likelihoods when `chunk` is not given: passes of about 250
# drawings ran 1.3x as fast as passes of 1,000 on a 2-core CPU (the feature maps stay in cache).
DECODES_PER_PASS = 256


def _samples_per_pass(chunk: int | None, rows: int) -> int:
    """`chunk`, or the importance samples that decode about DECODES_PER_PASS drawings of `rows` per pass."""
    return chunk if chunk else max(1, DECODES_PER_PASS // rows)


def _log_weights(model, x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor):
    """log p(x | z_i) + log p(z_i) - log q(z_i | x) for z_i = mean + sigma * eps_i: (K, B) float64.

    z = [z_content, z_style, z_detail] (z_detail where the model has one); q = N(mean, exp(logvar))
    is the diagonal Gaussian of model.posterior, p(z) = N(0, I) (the content part's: the model's
    learned mixture where it has one), p(x | z) Bernoulli with logits model.decode_logits(z, x)
    (x read by an autoregressive decoder: teacher forcing), summed over pixels.
    x: (B, 1, S, S); mean, logvar: (B, D); eps: (K, B, D).
    """
    samples, b, d = eps.shape
    z = mean + (0.5 * logvar).exp() * eps  # (K, B, D)
    log_q = -0.5 * (eps.pow(2) + logvar + LOG_2PI).sum(-1)  # (K, B)
    log_p_z = -0.5 * (z.pow(2) + LOG_2PI).sum(-1) + _content_prior_shift(model, z[..., :model.content_dim])  # (K, B)
    flat = z.reshape(samples * b, d)  # (K * B, D)
    target = x.expand(samples, *x.shape).reshape(samples * b, *x.shape[1:])  # (K * B, 1, S, S)
    logits = _drawing_logits(model, flat[:, :model.content_dim], flat[:, model.content_dim:], target)  # (K * B, 1, S, S)
    log_p_x = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    log_p_x = log_p_x.flatten(1).sum(1).view(samples, b)  # (K, B)
    return (log_p_x + log_p_z - log_q).double()


@torch.no_grad()
def iwae_nll(model, images, k: int = 1000, batch_size: int = 10, chunk: int | None = None, seed: int = 0,
             progress: bool = False, blur: float = 0.0) -> dict:
    """Negative log-likelihood of binary images by importance sampling, in nats per image.

    log p(x) ~= log (1/k) sum_i p(x | z_i) p(z_i) / q(z_i | x), z_i ~ q(z | x)
    (Burda et al. 2016, "Importance Weighted Autoencoders", eq. 8), with the encoder's
    posterior as proposal. It is a stochastic lower bound on log p(x) that tightens as k grows.
    Returns:
      nll: -mean_x [logsumexp_i w_i - log k] (the k-sample IWAE bound, an upper bound on the NLL);
      elbo_nll: -mean_x mean_i w_i (the negative ELBO from the same samples: an upper bound that
        is never below `nll`; equal to it when k = 1);
      elbo: -elbo_nll, the ELBO itself.
    `images` must be binary (see `binarize`): with grey levels the Bernoulli term is a
    cross-entropy, not a likelihood. The model runs in eval mode (restored afterwards). The k
    samples are decoded `chunk` at a time for `batch_size` images, so memory stays at
    chunk * batch_size decoded images (None: about DECODES_PER_PASS per pass). Noise comes from a CPU torch.Generator(seed), drawn k
    at a time per batch, so the numbers are exactly reproducible for a given seed, k and
    batch_size on a given device, and do not depend on `chunk`. The content posterior is
    the single-drawing one (model.posterior), as for a model trained with grouping, of each
    drawing blurred by `blur` pixels (`soften`; 0: the binary drawing itself).
    """
    images = _as_images(images)
    if not torch.all((images == 0) | (images == 1)):
        raise ValueError("iwae_nll needs binary images; binarize them first (metrics.binarize)")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    iwae, elbo = [], []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="iwae", disable=not progress):
            x = images[start:start + batch_size].to(model.device)  # (B, 1, S, S)
            q = model.posterior(soften(x, blur))
            own_mean, own_logvar = _posterior_codes(q)  # (B, Ds + Dd) each
            mean = torch.cat([q.content_mean, own_mean], 1)  # (B, D)
            logvar = torch.cat([q.content_logvar, own_logvar], 1)  # (B, D)
            # All k draws at once, so the numbers do not depend on `chunk`.
            eps = torch.randn(k, *mean.shape, generator=generator).to(mean.device, mean.dtype)  # (k, B, D)
            step = _samples_per_pass(chunk, len(x))
            log_w = torch.cat([
                _log_weights(model, x, mean, logvar, eps[done:done + step]) for done in range(0, k, step)
            ])  # (k, B)
            iwae.append(log_w.logsumexp(0) - math.log(k))  # (B,)
            elbo.append(log_w.mean(0))  # (B,)
    finally:
        model.train(was_training)
    nll = -torch.cat(iwae).mean().item()
    elbo_mean = torch.cat(elbo).mean().item()
    return {"nll": nll, "elbo_nll": -elbo_mean, "elbo": elbo_mean, "k": k}


def character_sets(character, size: int = 5, seed=0) -> np.ndarray:
    """(n_sets, size) row indices: every character's drawings split at random into disjoint sets of `size`.

    As SCHA-VAE builds its test sets (Giannone and Winther 2022): each character's drawings in
    random order, cut into consecutive sets of `size`, the remainder dropped (20 drawings give 4
    sets of 5). The sets come in random order, so the first n are a random choice of n of them.
    Deterministic for a seed (numpy default_rng).
    """
    character = _as_numpy(character).ravel()
    rng = np.random.default_rng(seed)
    sets = []
    for c in np.unique(character):
        rows = rng.permutation(np.flatnonzero(character == c))
        whole = len(rows) // size * size
        sets.append(rows[:whole].reshape(-1, size))
    sets = np.concatenate(sets) if sets else np.empty((0, size), dtype=np.int64)
    return sets[rng.permutation(len(sets))]


def _set_log_weights(model, x: torch.Tensor, content_mean, content_logvar, style_mean, style_logvar,
                     eps: torch.Tensor) -> torch.Tensor:
    """Importance log-weights of sets of drawings that share one content code: (K, B) float64.

    For a set X = (x_1..x_M) with one content code c and a style code s_i per drawing (with a
    detail code, s_i is the drawing's [z_style, z_detail]),
      log w = log p(c) - log q(c | X) + sum_i [log p(x_i | c, s_i) + log p(s_i) - log q(s_i | x_i)],
    c = content_mean + sigma_c * eps_c, s_i = style_mean_i + sigma_i * eps_i; p = N(0, I) for both
    codes (the content's: the model's learned mixture where it has one), p(x | c, s) Bernoulli
    with logits model.decode_logits(c, s, x) (teacher forcing for an autoregressive decoder),
    summed over pixels.
    x: (B, M, 1, S, S); content_mean, content_logvar: (B, Dc), the proposal for the shared code;
    style_mean, style_logvar: (B, M, Ds); eps: (K, B, Dc + M * Ds), the content noise first, then
    each drawing's style noise (with M = 1 exactly the layout of `_log_weights`).
    """
    samples, b, _ = eps.shape
    m, dc, ds = x.shape[1], content_mean.shape[1], style_mean.shape[2]
    eps_c, eps_s = eps[..., :dc], eps[..., dc:].reshape(samples, b, m, ds)  # (K, B, Dc), (K, B, M, Ds)
    content = content_mean + (0.5 * content_logvar).exp() * eps_c  # (K, B, Dc)
    style = style_mean + (0.5 * style_logvar).exp() * eps_s  # (K, B, M, Ds)
    # log N(z; 0, I) - log N(z; mean, sigma^2) = -1/2 (z^2 - eps^2 - logvar): the 2 pi terms cancel.
    log_prior_over_q = (-0.5 * (content.pow(2) - eps_c.pow(2) - content_logvar).sum(-1)  # (K, B)
                        - 0.5 * (style.pow(2) - eps_s.pow(2) - style_logvar).sum((-2, -1))
                        + _content_prior_shift(model, content))
    flat_content = content[:, :, None].expand(samples, b, m, dc).reshape(-1, dc)  # (K * B * M, Dc)
    target = x.expand(samples, *x.shape).reshape(-1, *x.shape[2:])  # (K * B * M, 1, S, S)
    logits = _drawing_logits(model, flat_content, style.reshape(-1, ds), target)  # (K * B * M, 1, S, S)
    log_p_x = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    log_p_x = log_p_x.flatten(1).sum(1).view(samples, b, m).sum(-1)  # (K, B)
    return (log_p_x + log_prior_over_q).double()


def _set_log_likelihoods(model, images: torch.Tensor, sets: np.ndarray, k: int, batch_size: int, chunk: int | None,
                         generator: torch.Generator, progress: bool = False, blur: float = 0.0) -> torch.Tensor:
    """log p(x_1..x_M) of every set by importance sampling with the grouped posterior: (n_sets,) float64.

    images: (N, 1, S, S) binary; sets: (n_sets, M) row indices. The content proposal is the
    product of the M single-drawing content posteriors (`losses.product_of_gaussians`, what the
    model trains with when it groups drawings), each style proposal its drawing's own posterior;
    the posteriors of the drawings blurred by `blur` pixels (`soften`). log p ~= logsumexp_i log w_i - log k over k draws (Burda et al. 2016, eq. 8). The model must
    be in eval mode. Noise: k draws per batch of `batch_size` sets from `generator` (CPU).
    """
    from .losses import product_of_gaussians

    out = []
    m = sets.shape[1]
    for start in tqdm(range(0, len(sets), batch_size), desc="set likelihood", disable=not progress):
        rows = torch.as_tensor(sets[start:start + batch_size].reshape(-1))  # (B * M,) set-major
        x = images[rows].to(model.device)  # (B * M, 1, S, S)
        q = model.posterior(soften(x, blur))
        b = len(rows) // m
        content_mean, content_logvar = product_of_gaussians(q.content_mean, q.content_logvar, m)  # (B, Dc)
        own_mean, own_logvar = _posterior_codes(q)  # (B * M, Ds + Dd) each
        style_mean = own_mean.view(b, m, -1)  # (B, M, Ds + Dd)
        style_logvar = own_logvar.view(b, m, -1)  # (B, M, Ds + Dd)
        width = content_mean.shape[1] + m * style_mean.shape[2]
        eps = torch.randn(k, b, width, generator=generator).to(x.device, x.dtype)  # (k, B, Dc + M * Ds)
        step = _samples_per_pass(chunk, len(x))
        log_w = torch.cat([
            _set_log_weights(model, x.view(b, m, *x.shape[1:]), content_mean, content_logvar, style_mean,
                             style_logvar, eps[done:done + step])
            for done in range(0, k, step)
        ])  # (k, B)
        out.append((log_w.logsumexp(0) - math.log(k)).cpu())  # (B,)
    return torch.cat(out)


def _check_binary(images: torch.Tensor, name: str) -> None:
    if not torch.all((images == 0) | (images == 1)):
        raise ValueError(f"{name} needs binary images; binarize them first (metrics.binarize)")


@torch.no_grad()
def set_nll(model, images, sets, k: int = 1000, batch_size: int = 10, chunk: int | None = None, seed: int = 0,
            progress: bool = False, blur: float = 0.0) -> dict:
    """Negative log-likelihood of sets of drawings of one character that share one content code, per drawing.

    -log p(x_1..x_M) / M with p(x_1..x_M) = E_{p(c)} prod_i E_{p(s_i)} p(x_i | c, s_i): one content
    code for the set, a style code per drawing (the multi-level model of Bouchacourt et al. 2018),
    marginalised by importance sampling (Burda et al. 2016) with the grouped posterior as proposal:
    for the content the product of the M single-drawing posteriors (`losses.product_of_gaussians`),
    for each style its drawing's own posterior. A stochastic upper bound on the NLL that tightens as
    k grows; for M = 1 it is `iwae_nll`.

    The protocol of SCHA-VAE's likelihood on Omniglot (Giannone and Winther 2022; in their code,
    `experiment/marginal.py` scores the sets that `dataset/omniglot_ns.py` and, for the
    background/evaluation split, `dataset/base.py` build), and where it differs:
      - sets of M = 5 drawings of one test character (their `context_size`), every character's
        drawings cut into disjoint sets (`character_sets`): theirs in random order (omniglot_ns)
        or in stored order (back-eval, whose 659 test characters are our evaluation set); here in
        random order, and a random subset of the sets rather than all of them;
      - binary images: omniglot_ns binarises once with numpy's binomial when the test set is
        built (back-eval passes binarize=True, but its base class never applies it to test
        sets); here `binarize`, a dynamic binarisation drawn once with a fixed seed;
      - nats per drawing, -log p(X) / |X|: their models' per-element bound (the set's content KL
        shared out over its M drawings) averaged over drawings and sets;
      - k importance samples per set (1000 by default): their README says 1K importance samples,
        but `marginal.py` sets S = 1 inside the function, so the number it prints is a one-sample
        bound, an ELBO on log p(X) with the sampled KL; k = 1 here gives that one-sample bound.
    images: (N, 1, S, S) binary; sets: (n_sets, M) row indices of drawings of one character each.
    Noise from a CPU torch.Generator(seed), k draws per batch of `batch_size` sets; memory stays
    at chunk * batch_size * M decoded images (None: about DECODES_PER_PASS per pass); the model runs in eval mode (restored afterwards).
    Returns {"nll": nats per drawing, "k", "sets", "set_size"}.
    """
    images = _as_images(images)
    _check_binary(images, "set_nll")
    sets = _as_numpy(sets).astype(np.int64)
    if sets.ndim != 2 or len(sets) == 0:
        raise ValueError("sets must be a non-empty (n_sets, M) array of row indices")
    was_training = model.training
    model.eval()
    try:
        log_p = _set_log_likelihoods(model, images, sets, k, batch_size, chunk, torch.Generator().manual_seed(seed),
                                     progress, blur)
    finally:
        model.train(was_training)
    return {"nll": -log_p.mean().item() / sets.shape[1], "k": k, "sets": len(sets), "set_size": sets.shape[1]}


@torch.no_grad()
def conditional_nll(model, images, pairs, k: int = 1000, batch_size: int = 10, chunk: int | None = None, seed: int = 0,
                    progress: bool = False, blur: float = 0.0) -> dict:
    """Negative log-likelihood of a drawing given one other drawing of the same character, in nats.

    -log p(x | x') = -[log p(x, x') - log p(x')], the one-shot conditional likelihood of few-shot
    generative models (Edwards and Storkey 2017, "Towards a Neural Statistician"; Giannone and
    Winther 2022). Both terms are importance-sampling estimates as in `set_nll`: p(x, x') with one
    content code for the pair and the product of both drawings' content posteriors as proposal,
    p(x') with x' alone (the IWAE estimate). The estimator is the difference of the two log
    estimates, with independent noise: each is biased low by O(1 / k), so the difference is
    consistent as k grows but, unlike either term, not a bound in either direction.
    images: (N, 1, S, S) binary; pairs: (n, 2) row indices, pairs[i] = (x, x') of one character.
    Noise from two children of `seed` (`child_seeds`), one per term.
    Returns {"nll": mean of -log p(x | x') over pairs, "k", "pairs"}.
    """
    images = _as_images(images)
    _check_binary(images, "conditional_nll")
    pairs = _as_numpy(pairs).astype(np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError("pairs must be a non-empty (n, 2) array of row indices")
    joint_seed, single_seed = child_seeds(seed, 2)
    was_training = model.training
    model.eval()
    try:
        joint = _set_log_likelihoods(model, images, pairs, k, batch_size, chunk,
                                     torch.Generator().manual_seed(joint_seed), progress, blur)
        given = _set_log_likelihoods(model, images, pairs[:, 1:], k, batch_size, chunk,
                                     torch.Generator().manual_seed(single_seed), progress, blur)
    finally:
        model.train(was_training)
    return {"nll": -(joint - given).mean().item(), "k": k, "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------
# Swap consistency: does the content code carry the character?


class CharacterClassifier(nn.Module):
    """A compact CNN that names the character of an image: the judge of `swap_consistency`.

    Three conv blocks (3x3 conv, batch norm, ReLU; max-pooling between them), then
    AdaptiveAvgPool2d to 3x3 so any image side (28, 32, 64, 105) gives the same head, then
    a linear layer over the characters.

    Label space: `classes` is either the number of classes C (labels are then the indices
    0..C-1, e.g. `np.unique(character, return_inverse=True)[1]`) or an array of the raw
    character ids to tell apart (their sorted unique values). The ids are kept as a buffer,
    saved in the state dict; `forward` returns logits over indices 0..C-1 and `predict` maps
    the argmax back to the ids, so labels and predictions are always in the same space.
    """

    def __init__(self, classes, channels: int = 32):
        super().__init__()
        if np.ndim(classes) == 0:
            ids = torch.arange(int(classes))  # (C,) labels are indices
        else:
            ids = torch.as_tensor(np.unique(_as_numpy(classes)).astype(np.int64))  # (C,) sorted raw ids
        self.register_buffer("character_ids", ids)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(1, channels), nn.MaxPool2d(2),
            block(channels, 2 * channels), nn.MaxPool2d(2),
            block(2 * channels, 4 * channels), nn.AdaptiveAvgPool2d(3),
        )
        self.head = nn.Linear(4 * channels * 9, len(ids))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (N, C) logits

    def label_index(self, character) -> torch.Tensor:
        """Raw character ids -> class indices 0..C-1; ids the classifier does not know give -1."""
        character = torch.as_tensor(_as_numpy(character).astype(np.int64)).to(self.character_ids.device)
        index = torch.searchsorted(self.character_ids, character).clamp_max(len(self.character_ids) - 1)
        return torch.where(self.character_ids[index] == character, index, torch.full_like(index, -1))

    @torch.no_grad()
    def predict(self, images, batch_size: int = 1024) -> np.ndarray:
        """Raw character ids (N,) of the most likely character of each image; eval mode, restored after."""
        images = _as_images(images)
        was_training = self.training
        self.eval()
        device = self.character_ids.device
        try:
            index = [self(images[s:s + batch_size].to(device)).argmax(1) for s in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return self.character_ids[torch.cat(index)].cpu().numpy()


def augment_drawings(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random changes of the kinds decoded drawings show, for training the swap judge.

    Per image, in this order: a small affine change (rotation within 10 degrees, scale 0.9-1.1,
    shear within 0.1, shift within 5% of the side; `F.affine_grid` / `F.grid_sample`, bilinear,
    zeros outside), a stroke-width change (a blend, of random weight, towards a 3x3 max-pooling,
    thicker, or, less often and at most half-way, towards a 3x3 min-pooling, thinner), a Gaussian
    blur of standard deviation 0 to 1 pixel at 28 px (scaled with the side), and the ink scaled
    to a grey level of 0.6 to 1. Every amount includes the identity, so real drawings stay in
    the training distribution. images: (B, 1, S, S) in [0, 1]; the amounts are drawn on the
    CPU from `generator`, so they do not depend on the device. Returns (B, 1, S, S) in [0, 1].
    """
    b, _, side, _ = images.shape
    device = images.device

    def uniform(low, high, *shape):
        return (low + (high - low) * torch.rand(b, *shape, generator=generator)).to(device)

    angle = uniform(-math.pi / 18, math.pi / 18)  # (B,) within 10 degrees
    scale, shear = uniform(0.9, 1.1), uniform(-0.1, 0.1)  # (B,)
    shift = uniform(-0.1, 0.1, 2)  # (B, 2) in grid units, where the side spans 2: 5% of it
    x = augment.affine(images, angle, scale, shear, shift)  # (B, 1, S, S)
    x = augment.stroke_width(x, uniform(-0.5, 1.0))  # > 0 thicker, < 0 thinner

    sigma = uniform(0.0, 1.0).clamp_min(1e-3) * side / 28  # (B,) pixels
    radius = max(1, math.ceil(2 * side / 28))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)  # (B, k)
    kernel = kernel / kernel.sum(1, keepdim=True)
    x = x.view(1, b, side, side)  # one channel per image, so each gets its own kernel
    x = F.conv2d(x, kernel.view(b, 1, 1, -1), padding=(0, radius), groups=b)  # along rows
    x = F.conv2d(x, kernel.view(b, 1, -1, 1), padding=(radius, 0), groups=b)  # along columns
    x = x.view(b, 1, side, side)

    return (x * uniform(0.6, 1.0).view(b, 1, 1, 1)).clamp(0.0, 1.0)


def train_classifier(images, labels, epochs: int = 10, seed: int = 0, device="cpu", progress: bool = False,
                     batch_size: int = 256, lr: float = 1e-3, channels: int = 32,
                     augment: bool = False) -> CharacterClassifier:
    """Train a CharacterClassifier on images with integer labels (raw ids or indices 0..C-1).

    The label space is the sorted unique `labels` (see CharacterClassifier); every image must
    later be judged with labels in that same space.

    Adam, cross-entropy, `epochs` passes in batches of 256 shuffled by a numpy generator;
    weights initialised under torch.manual_seed(seed) in a forked RNG state, so the global
    state is untouched and training is deterministic on the CPU. Returned in eval mode.
    augment=True passes every batch through `augment_drawings` (noise from a CPU
    torch.Generator(seed)), so the judge has seen the blur, stroke widths, small affine changes
    and grey ink of decoded drawings and does not fail them for how they are rendered
    (the generation issue's judge; it adds about a tenth to the training time).
    For `swap_consistency` train it on the training drawers of the background set and check
    it on the held-out drawers (`classifier_accuracy`). At 28 px, 10 epochs on drawers 1-18
    reach about 81% on drawers 19-20 (964-way); that takes seconds on a GPU but roughly
    4 ms per image per epoch on two CPU cores (~12 minutes).
    """
    images = _as_images(images)
    labels = _as_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharacterClassifier(labels, channels).to(device)
    targets = model.label_index(labels)  # (N,) indices 0..C-1
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        order = torch.from_numpy(rng.permutation(len(images)))
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            x = images[batch].to(device)  # (b, 1, S, S)
            if augment:
                x = augment_drawings(x, generator)
            logits = model(x)  # (b, C)
            loss = F.cross_entropy(logits, targets[batch.to(targets.device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def classifier_accuracy(classifier: CharacterClassifier, images, labels) -> float:
    """Fraction of images whose predicted character id equals `labels` (raw ids)."""
    return float(np.mean(classifier.predict(images) == _as_numpy(labels).ravel()))


def _swap_consistency(predicted, content_character) -> float:
    """Fraction of swapped decodings classified as the character that gave the content code."""
    predicted, content_character = _as_numpy(predicted).ravel(), _as_numpy(content_character).ravel()
    return float(np.mean(predicted == content_character))


def _different_character_pairs(character: np.ndarray, pairs: int, rng: np.random.Generator):
    """(a, b) row indices, each (pairs,), uniform over ordered pairs whose characters differ."""
    if len(np.unique(character)) < 2:
        raise ValueError("swap pairs need at least two characters")
    a = rng.integers(len(character), size=pairs)
    b = rng.integers(len(character), size=pairs)
    same = character[a] == character[b]
    while same.any():  # redraw the partner until every pair has two characters
        b[same] = rng.integers(len(character), size=int(same.sum()))
        same = character[a] == character[b]
    return a, b


@torch.no_grad()
def swap_consistency(model, classifier: CharacterClassifier, images, character, pairs: int = 2000,
                     seed: int = 0, batch_size: int = 500) -> dict:
    """Does decoding (content of A, style of B) show A's character? A disentanglement check.

    The content/style swap grids shown qualitatively by Mathieu et al. 2016 ("Disentangling
    factors of variation in deep representations using adversarial training") and
    Bouchacourt et al. 2018 ("Multi-Level Variational Autoencoder"), made a number with an
    independent classifier. Protocol: draw `pairs` pairs
    (A, B) of images with different characters (numpy default_rng(seed)), decode
    (content mean of A, style mean of B) to pixel probabilities (`model.decode`; binary drawings
    sampled with torch.Generator(seed) for an autoregressive decoder) and let an independent
    CharacterClassifier name the character. The classifier is trained on the background
    set's training drawers and these `images` should be the held-out drawers of the same
    characters. Returns:
      swap_consistency: fraction classified as A's character (the content's);
      style_character_rate: fraction classified as B's character (content leaking into style);
      reconstruction_accuracy: the classifier on decode(content A, style A) (and A's detail code,
        for a model with one: its whole reconstruction);
      real_accuracy: the classifier on all the real `images`, its own ceiling;
      real_binarized_accuracy: the classifier on the real `images` dynamically binarised
        (`binarize` with `seed`): the ceiling for binary drawings, which
        is what an autoregressive decoder's samples are.
    character: (N,) labels in the classifier's label space (raw ids, or indices when the
    classifier was trained on indices).
    """
    images = _as_images(images)
    character = _as_numpy(character).ravel()
    rng = np.random.default_rng(seed)
    a, b = _different_character_pairs(character, pairs, rng)
    if getattr(model, "detail_dim", 0):  # reconstructions decode the detail code too: one pass for all three
        content, style, detail = _encoder_pass(model, images, lambda x: _all_means(model, x))  # (N, Dc), (N, Ds), (N, Dd)
    else:
        (content, style), detail = encode_images(model, images), None  # (N, Dc), (N, Ds)
    generator = torch.Generator().manual_seed(seed)  # an autoregressive decoder's samples
    was_training = model.training
    model.eval()
    swapped, plain = [], []
    try:
        for s in range(0, pairs, batch_size):
            ca = torch.from_numpy(content[a[s:s + batch_size]])  # (b, Dc)
            sa = torch.from_numpy(style[a[s:s + batch_size]])  # (b, Ds)
            sb = torch.from_numpy(style[b[s:s + batch_size]])  # (b, Ds)
            own = {} if detail is None else {"detail": torch.from_numpy(detail[a[s:s + batch_size]])}  # (b, Dd)
            swapped.append(classifier.predict(model.decode(ca, sb, generator=generator).cpu()))
            plain.append(classifier.predict(model.decode(ca, sa, generator=generator, **own).cpu()))
    finally:
        model.train(was_training)
    swapped, plain = np.concatenate(swapped), np.concatenate(plain)
    return {
        "swap_consistency": _swap_consistency(swapped, character[a]),
        "style_character_rate": _swap_consistency(swapped, character[b]),
        "reconstruction_accuracy": _swap_consistency(plain, character[a]),
        "real_accuracy": classifier_accuracy(classifier, images, character),
        "real_binarized_accuracy": classifier_accuracy(classifier, binarize(images, seed), character),
        "pairs": int(pairs),
    }


# ---------------------------------------------------------------------------------------------
# Style effect: does the style code change the drawing as much as a hand does?


def ink_masks(images) -> np.ndarray:
    """Each image's ink mask without a grey-level threshold: its round(sum of grey levels) darkest pixels.

    images: (..., P) grey levels in [0, 1] (ink = 1). A Bernoulli decoder's probabilities sum to
    the drawing's expected ink count, so the mask is where its most likely strokes are, however
    blurred: a map that spreads a stroke thinly at grey 0.3 still marks the stroke, where a fixed
    threshold of 0.5 would mark nothing. On a binary drawing the mask is its ink. Ties keep pixel
    order (a stable sort), so the mask is deterministic. Returns a bool array of the same shape.
    """
    images = np.asarray(images, dtype=np.float64)
    count = np.rint(images.sum(-1)).astype(np.int64)  # (...,) expected ink pixels
    order = np.argsort(-images, axis=-1, kind="stable")  # darkest first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(images.shape[-1]), axis=-1)  # each pixel's place in that order
    return rank < count[..., None]


def _ink_distance(images: np.ndarray) -> np.ndarray:
    """Mean pairwise Jaccard distance 1 - |A & B| / |A | B| between the ink masks of each row's images.

    images: (C, S, P) grey levels in [0, 1] (C groups of S images of P pixels); masks from
    `ink_masks`. Two empty masks are at distance 0. Returns (C,): the mean over the S (S - 1) / 2
    pairs of each group (Jaccard 1912).
    """
    ink = ink_masks(images)  # (C, S, P)
    first, second = np.triu_indices(ink.shape[1], k=1)  # the pairs (i < j)
    a, b = ink[:, first], ink[:, second]  # (C, pairs, P)
    union = (a | b).sum(-1)
    overlap = (a & b).sum(-1)
    distance = np.where(union > 0, 1.0 - overlap / np.maximum(union, 1), 0.0)  # (C, pairs)
    return distance.mean(1)


def _style_effect(decoded, real) -> dict:
    """How much drawings of one content differ across style codes, relative to real drawings across hands.

    decoded: (C, S, ...) decodings of C contents, each with S style codes; real: (C, S, ...) real
    drawings of the same C characters by S drawers. Each group's spread is `_ink_distance`, the
    mean pairwise Jaccard distance of the ink masks; style_effect = mean over contents of the
    decoded spread / mean over characters of the real spread: 0 when the decoder ignores the
    style, about 1 when styles vary a drawing as much as hands vary a character.
    Returns {"style_effect", "decoded_distance", "real_distance"}.
    """
    decoded, real = _as_numpy(decoded), _as_numpy(real)
    decoded_distance = float(_ink_distance(decoded.reshape(*decoded.shape[:2], -1)).mean())
    real_distance = float(_ink_distance(real.reshape(*real.shape[:2], -1)).mean())
    if real_distance == 0:
        raise ValueError("the real drawings of each character are identical: no spread to compare with")
    return {"style_effect": decoded_distance / real_distance, "decoded_distance": decoded_distance,
            "real_distance": real_distance}


def stroke_measures(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stroke thickness, slant and height of each drawing; images (N, S, S), ink in [0, 1].

    thickness: mean ink of the pixels the drawing touches. A thin stroke half-covers the pixels
    it crosses, a thick one covers them fully, whatever the character.
    slant: shear of the ink, -cov(x, y) / var(y) from the second moments (x right, y down), the
    angle that deskewing would undo: > 0 leans right (top right of the bottom), 0 is upright.
    height: standard deviation of the ink's rows, in pixels; slant means little when it is small.
    """
    ink = images.astype(np.float64)  # (N, S, S)
    touched = (ink > 0).sum((1, 2))
    total = ink.sum((1, 2))
    thickness = total / np.maximum(touched, 1)
    y, x = np.mgrid[0:images.shape[1], 0:images.shape[2]].astype(np.float64)  # (S, S) each
    weight = ink / np.maximum(total, 1e-9)[:, None, None]
    mean_x, mean_y = (weight * x).sum((1, 2)), (weight * y).sum((1, 2))  # (N,)
    dx, dy = x - mean_x[:, None, None], y - mean_y[:, None, None]  # (N, S, S)
    var_y = (weight * dy**2).sum((1, 2))
    cov_xy = (weight * dx * dy).sum((1, 2))
    slant = -cov_xy / np.maximum(var_y, 1e-9)
    return thickness, slant, np.sqrt(var_y)


def hand_measures(images, groups=None) -> dict[str, np.ndarray]:
    """What makes hands look different, from `stroke_measures`: {"thickness", "slant", "size"}, (N,) each.

    images: (N, 1, S, S) or (N, S, S) ink in [0, 1]; size is the ink's height (its rows' standard
    deviation, in pixels). groups: (N,) labels (e.g. the character) to measure each drawing
    against its group's mean: thickness and slant minus it, size divided by it.
    """
    images = _as_numpy(images).astype(np.float64)
    thickness, slant, height = stroke_measures(images.reshape(len(images), *images.shape[-2:]))
    measures = {"thickness": thickness, "slant": slant, "size": height}
    return measures if groups is None else against_groups(measures, groups)


def against_groups(measures: dict[str, np.ndarray], groups) -> dict[str, np.ndarray]:
    """Each (N,) measure against its group's mean (groups: (N,) labels): "size" divided by it,
    any other measure minus it."""
    _, inverse = np.unique(_as_numpy(groups).ravel(), return_inverse=True)
    counts = np.bincount(inverse)
    relative = {}
    for name, values in measures.items():
        mean = (np.bincount(inverse, weights=values) / counts)[inverse]  # (N,) each drawing's group mean
        relative[name] = values / np.maximum(mean, 1e-12) if name == "size" else values - mean
    return relative


HANDS = (("thick", "thickness", -1), ("thin", "thickness", 1), ("slant /", "slant", -1),
         ("slant \\", "slant", 1), ("large", "size", -1), ("small", "size", 1))  # name, measure, sort sign


def distinct_hands(images, count: int = 6, groups=None) -> tuple[np.ndarray, list[str]]:
    """Indices of up to `count` drawings whose hands differ visibly, and what each one is.

    In the order of HANDS: the thickest, thinnest, most right- and left-leaning ("slant /",
    "slant \\"), largest and smallest drawing by `hand_measures`, each one not picked before; for
    a swap grid whose style sources differ in the ways hands do. groups: (N,) labels, e.g. the
    character, to measure each drawing against its group (`hand_measures`), so that a character
    drawn diagonally or large does not pass for a slanted or large hand.
    Returns (indices (K,), names (K,)), K = min(count, N, 6).
    """
    measures = hand_measures(images, groups)
    picked, names = [], []
    for name, measure, sign in HANDS[:count]:
        for i in np.argsort(sign * measures[measure], kind="stable"):
            if i not in picked:
                picked.append(int(i))
                names.append(name)
                break
    return np.array(picked, dtype=np.int64), names


def style_effect_drawings(character, alphabet, drawer, styles: int = 5, seed=0):
    """Which drawings `style_effect` uses: (content (C,), style (C, S), real (C, S)) row indices.

    For every character drawn by at least S + 1 drawers: S + 1 of its drawers at random, one
    drawing each; the first gives the content, the drawings of the other S are the real
    reference (real[c, j] by drawer j). Style j comes from drawer j too, from a drawing of another
    character: of the same alphabet when drawer j drew one, else of any alphabet, else any other
    character's drawing. Deterministic for a seed (numpy default_rng).
    """
    character = _as_numpy(character).ravel()
    alphabet = _as_numpy(alphabet).ravel()
    drawer = _as_numpy(drawer).ravel()
    rng = np.random.default_rng(seed)
    by_hand = {h: np.flatnonzero(drawer == h) for h in np.unique(drawer)}  # every drawing of each drawer
    content, style, real = [], [], []
    for c in np.unique(character):
        rows = np.flatnonzero(character == c)
        hands = np.unique(drawer[rows])
        if len(hands) <= styles:
            continue
        picked = rng.choice(hands, size=styles + 1, replace=False)  # (S + 1,) content hand first
        drawings = [rng.choice(rows[drawer[rows] == h]) for h in picked]
        content.append(drawings[0])
        real.append(drawings[1:])
        a = alphabet[rows[0]]
        chosen = []
        for h in picked[1:]:
            hand = by_hand[h][character[by_hand[h]] != c]  # drawer h's drawings of other characters
            for candidates in (hand[alphabet[hand] == a], hand, np.flatnonzero(character != c)):
                if len(candidates):
                    chosen.append(rng.choice(candidates))
                    break
        style.append(chosen)
    if not content or len(np.unique(character)) < 2:
        raise ValueError(f"the style effect needs characters drawn by {styles + 1} drawers, and two characters")
    return np.array(content), np.array(style), np.array(real)


@torch.no_grad()
def style_effect(model, images, character, alphabet, drawer, styles: int = 5, seed: int = 0,
                 batch_size: int = 1000, codes=None) -> dict:
    """How much the style code changes a drawing, relative to how much hands change a real character.

    The content/style swap grids of Mathieu et al. 2016 and Bouchacourt et al. 2018 read as a
    number: for every test character, decode (content mean of one drawing, style mean of S
    drawings of other characters, by S other drawers: `style_effect_drawings`) and compare the
    spread of those S decodings with the spread of the same character's real drawings by the
    same S drawers (`_style_effect`). The spread is the mean pairwise Jaccard distance between
    ink masks (`ink_masks`: each drawing's expected ink count of darkest pixels), not a pixel
    distance: the decoder's blur would shrink pixel distances and read as less style, while the
    masks compare where the strokes are, with no grey-level threshold for the blur to fall under.
    0: the style code does nothing; about 1: styles vary a drawing as much as hands do; above
    1: the decodings differ more than hands make a character differ (the style carries more
    than the hand, e.g. the character; see `swap_consistency`). An autoregressive decoder's
    decodings are binary drawings sampled with torch.Generator(seed), and differ even where the
    style changes nothing: `floor` is the same ratio for S samples of each content with one
    style (0 for a deterministic decoder), the style effect's noise floor. codes: the posterior
    means (content (N, Dc), style (N, Ds)) of `images` when already computed; else they are encoded.
    Returns {"style_effect", "floor", "decoded_distance", "real_distance", "characters", "styles"}.
    """
    images = _as_images(images)
    content_rows, style_rows, real_rows = style_effect_drawings(character, alphabet, drawer, styles, seed)
    if codes is None:
        needed = np.unique(np.concatenate([content_rows, style_rows.ravel()]))  # only these are encoded
        content, style = encode_images(model, images[torch.as_tensor(needed)])  # (n, Dc), (n, Ds)
        content_code, style_code = np.searchsorted(needed, content_rows), np.searchsorted(needed, style_rows)
    else:
        content, style = (_as_numpy(part).astype(np.float32) for part in codes)  # (N, Dc), (N, Ds)
        content_code, style_code = content_rows, style_rows
    c = np.repeat(content[content_code], styles, axis=0)  # (C * S, Dc)
    s = style[style_code.ravel()]  # (C * S, Ds)
    generator = torch.Generator().manual_seed(seed)  # an autoregressive decoder's samples

    def decode(style_codes: np.ndarray) -> np.ndarray:  # (C * S, Ds) -> (C, S, H * W), in eval mode
        was_training = model.training
        model.eval()
        try:
            decoded = torch.cat([
                model.decode(torch.from_numpy(c[i:i + batch_size]), torch.from_numpy(style_codes[i:i + batch_size]),
                             generator=generator).cpu()
                for i in range(0, len(c), batch_size)])  # (C * S, 1, H, W)
        finally:
            model.train(was_training)
        return decoded.numpy().reshape(len(content_rows), styles, -1)

    real = images[torch.as_tensor(real_rows.reshape(-1))]  # (C * S, 1, H, W)
    result = _style_effect(decode(s), real.numpy().reshape(len(content_rows), styles, -1))
    floor = 0.0  # a deterministic decoder draws the same codes the same way
    if getattr(model, "autoregressive", False):  # samples differ even where the style does not: sampling alone
        same = np.repeat(s[::styles], styles, axis=0)  # (C * S, Ds) each content's first style, S times
        floor = float(_ink_distance(decode(same)).mean()) / result["real_distance"]
    return {**result, "floor": floor, "characters": len(content_rows), "styles": styles}
