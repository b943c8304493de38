"""`omnivae evaluate`: every metric on the evaluation set (unseen alphabets), figures, the run's metrics file.

A run trained on an image folder of your own is scored on its held-out classes instead; that data
records no drawers, so few-shot episodes take two random drawings of each class and the metrics
that need drawers (the drawer-code reference, swap consistency) are left out.

Every metric key is a record of `omnivae.registry`; `named` turns a metric function's result
into those keys, so nothing here renames them.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data as omni_data
from . import generate, metrics, plots, rundir
from .config import Config, ConfigError, override
from .losses import sampled_kl
from .model import fold_batch_norm, resolve_device
from .registry import named
from .rundir import load
from .train import new_character_kinds

TSNE_POINTS = 4000  # drawings in the by-alphabet t-SNE maps
SWAP_CANDIDATES = 15  # characters whose drawings the swap grid picks its 6 visibly different hands from
# Version of the evaluation protocol, written into the run's metrics: `omnivae compare` warns when
# runs were measured under different versions. 2: Lake-style few-shot episodes, prior match
# on sampled codes, one random stream per use, validation alphabets. 3: the swap judge trains
# with augmentations like a decoder's (so swap numbers moved), and new metrics: per-alphabet
# clustering, 20-way 5-shot, digits transfer, style effect, set and one-shot likelihoods. 4: the
# style effect's ink masks are each drawing's expected ink count of darkest pixels, not grey >= 0.5.
# 5: the likelihoods' importance proposal reads the binary drawings blurred (nll_blur): the
# likelihood numbers moved (tighter), nothing else did.
PROTOCOL_VERSION = 5
PIXEL_BASELINE_VERSION = 3  # the protocol that last changed the raw-pixel numbers: their cache key
SPLITS = {  # what `split` evaluates on; swap consistency always uses the training characters' held-out drawers
    "evaluation": "evaluation set (20 unseen alphabets, 659 characters)",
    "validation": "validation alphabets (held out of the background set by val_holdout)",
}
FOLDER_SPLIT = ("{classes} held-out classes of an image folder (test_classes); no drawers: few-shot episodes pair "
                "two random drawings of each class, swap consistency is skipped")


@torch.no_grad()
def encode_all(model, images: torch.Tensor, batch: int = metrics.ENCODE_BATCH) -> dict[str, np.ndarray]:
    """Posterior means and log-variances of every image, as float64 arrays (and the detail code's,
    for a model with one)."""
    names = ("content_mean", "content_logvar", "style_mean", "style_logvar")
    parts = {k: [] for k in names + (("detail_mean", "detail_logvar") if getattr(model, "detail_dim", 0) else ())}
    for i in range(0, len(images), batch):
        q = model.posterior(images[i : i + batch].to(model.device))
        for k in parts:
            parts[k].append(getattr(q, k).double().cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def load_split(cfg: Config, split: str, data_dir=None, cache_dir=None, progress: bool = True) -> omni_data.Omniglot:
    """The images a run is scored on: the evaluation set, or the validation alphabets of a run
    that never trained on them (cfg.val_holdout). A run trained on an image folder (cfg.data ==
    "folder", data_dir that folder) is scored on the classes it held out (cfg.test_classes)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.data == "folder":
        if split != "evaluation":
            raise ConfigError("a run trained on an image folder is scored on its held-out classes: "
                              "use --split evaluation")
        folder = omni_data.load_folder(data_dir, cfg.image_size, cache_dir, progress=progress)
        return omni_data.split_by_class(folder, cfg.test_classes)[1]
    if split == "evaluation":
        return omni_data.load_set("evaluation", cfg.image_size, data_dir, cache_dir, progress=progress)
    if not cfg.val_holdout:
        raise ConfigError("this run trained on the validation alphabets (val_holdout=false): score it on the "
                          "evaluation set, or train with --set val_holdout=true")
    background = omni_data.load_set("background", cfg.image_size, data_dir, cache_dir, progress=progress)
    return omni_data.split_by_alphabet(background, cfg.val_alphabets)[1]


def whole_alphabets(test: omni_data.Omniglot, images: int, seed: int) -> omni_data.Omniglot:
    """Alphabets drawn in random order (numpy default_rng(seed)) until they hold >= `images` drawings,
    every drawing of each: a smaller test set on which Lake-style episodes can still be drawn."""
    order = np.random.default_rng(seed).permutation(np.unique(test.alphabet))
    counts = np.array([np.sum(test.alphabet == a) for a in order])
    keep = order[: int(np.searchsorted(np.cumsum(counts), images)) + 1]
    return test.subset(np.isin(test.alphabet, keep))


def _few_shot(name: str, codes, test: omni_data.Omniglot, ways: int, episodes: int, seed: int) -> dict:
    """The registry's keys for the few-shot accuracy of codes `name` (and its 95% half-width) on the
    episodes of `seed`.

    Data without drawers (an image folder) gets a drawer-free variant: each character's drawings
    are put in a random order (child 2 of `seed`; the episodes use children 0 and 1) that stands
    in for the drawers, so an episode's support and query of a character are two distinct random
    drawings, and the characters come from the whole set rather than one alphabet. No keys when
    it holds fewer than `ways` characters.
    """
    drawer, within_alphabet = test.drawer, True
    if not test.has_drawers():
        if len(np.unique(test.character)) < ways:
            return {}
        drawer, within_alphabet = _drawing_order(test.character, metrics.child_seeds(seed, 3)[2]), False
    score = metrics.few_shot_accuracy(codes, test.character, test.alphabet, drawer, ways, episodes, seed,
                                      within_alphabet=within_alphabet)
    return named(metrics.few_shot_accuracy, score, codes=name, ways=ways)


def _drawing_order(character: np.ndarray, seed: int) -> np.ndarray:
    """(N,) each drawing's place, from 1, in a random order of its character's drawings (numpy
    default_rng(seed))."""
    order = np.lexsort((np.random.default_rng(seed).random(len(character)), character))  # by character, shuffled
    _, starts, counts = np.unique(character[order], return_index=True, return_counts=True)
    place = np.empty(len(character), dtype=np.int64)
    place[order] = np.arange(len(order)) - np.repeat(starts, counts) + 1
    return place


def pixel_baseline(test: omni_data.Omniglot, seed: int, cache_dir, episodes: int) -> dict:
    """The raw-pixel numbers (k-means, NMI, 20- and 5-way 1-shot with their 95% half-widths) on
    the same streams of `seed` (the evaluation seed) as `code_metrics`, hence on the same
    episodes. Cached per PIXEL_BASELINE_VERSION, data (a digest of its images and labels) and seed
    since they do not depend on the model."""
    cache_dir = Path(cache_dir or omni_data.default_cache_dir())
    digest = hashlib.sha1()  # of the images and labels: two image folders may share every count
    for array in (test.images, test.character, test.drawer, test.alphabet):
        digest.update(np.ascontiguousarray(array).tobytes())
    key = (f"pixels_v{PIXEL_BASELINE_VERSION}_{test.images.shape[1]}_{len(test)}_{digest.hexdigest()[:12]}"
           f"_{seed}_{episodes}.json")
    path = cache_dir / key
    if path.exists():
        return json.loads(path.read_text())
    streams = metrics.eval_streams(seed)
    pixels = test.images.reshape(len(test), -1).astype(np.float64) / 255.0
    clusters = metrics.kmeans_scores(pixels, test.character, seed=streams["kmeans"])
    result = named(metrics.kmeans_scores, clusters, codes="pixel")
    for ways in (20, 5):
        result.update(_few_shot("pixel", pixels, test, ways, episodes, streams["episodes"]))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(path, result)
    except OSError:
        pass  # a read-only cache only costs recomputation
    return result


JUDGE_EPOCHS, JUDGE_CHANNELS = 5, 16  # about 80 s on 2 CPU cores at 28 px, once per cache folder
SET_SIZE = 5  # drawings per set of the set likelihood, as SCHA-VAE's test sets
STYLE_EFFECT_STYLES = 5  # style codes per content in the style effect (fewer when characters have fewer drawers)


def judge(cfg: Config, train_set: omni_data.Omniglot, cache_dir, device, progress: bool):
    """The character classifier that judges swaps, trained once on the background set's training
    drawers (`train_set`) and cached by image size, drawers and seed (weights only, safetensors)."""
    ids = np.unique(train_set.character)
    cache_dir = Path(cache_dir or omni_data.default_cache_dir())
    drawers = "-".join(map(str, cfg.val_drawers))
    path = cache_dir / f"judge_{cfg.image_size}_{len(ids)}_{drawers}_{cfg.eval_seed}_{JUDGE_EPOCHS}x{JUDGE_CHANNELS}_aug.safetensors"
    if path.exists():
        classifier = metrics.CharacterClassifier(ids, JUDGE_CHANNELS).to(device)
        classifier.load_state_dict(load_file(str(path), device=str(device)))
        return classifier.eval()
    classifier = metrics.train_classifier(train_set.tensors(), train_set.character, epochs=JUDGE_EPOCHS,
                                          seed=cfg.eval_seed, device=device, progress=progress, channels=JUDGE_CHANNELS,
                                          augment=True)
    try:
        with rundir.atomic_write(path) as tmp:
            save_file({k: v.cpu().contiguous() for k, v in classifier.state_dict().items()}, str(tmp))
    except OSError:
        pass  # a read-only cache only costs retraining
    return classifier.eval()


def code_metrics(codes: dict, test: omni_data.Omniglot, seed: int, episodes: int, model=None) -> dict:
    """Metrics of the codes alone, every random use on its own stream of `seed` (the evaluation
    seed, see metrics.eval_streams). codes: encode_all's means and log-variances.

    Per-image KL; per part k-means accuracy and NMI on the means; few-shot accuracy on the means
    with its 95% half-width (20-way for both parts, 5-way for content), every code scored on the
    same episodes; two references for style leakage on those 20-way episodes: a code that knows
    only the drawer (one-hot drawer id; chance, since an episode's supports share one drawer)
    and random N(0, I) codes (chance); prior match of the aggregate posterior, on one code per
    image sampled from q(z | x) (`prior_*`) and, secondary, on the means (`prior_*_means_*`,
    with the same prior samples). Content means and raw pixels: per-alphabet k-means and 20-way
    5-shot episodes (both on the same episodes; None where the split has no 6 drawers sharing 20
    characters of an alphabet).
    """
    streams = metrics.eval_streams(seed)
    kl = metrics.per_image_kl(codes["content_mean"], codes["content_logvar"], codes["style_mean"], codes["style_logvar"],
                              codes.get("detail_mean"), codes.get("detail_logvar"))
    results = named(metrics.per_image_kl, kl)
    # One z ~ q(z | x) per image, content and style drawn together: a sample of the aggregate posterior.
    content_dim = codes["content_mean"].shape[1]
    sampled = metrics.sample_posterior(np.concatenate([codes["content_mean"], codes["style_mean"]], 1),
                                       np.concatenate([codes["content_logvar"], codes["style_logvar"]], 1),
                                       seed=streams["posterior_samples"])  # (N, Dc + Ds)
    sampled = {"content": sampled[:, :content_dim], "style": sampled[:, content_dim:]}
    samplers = {"content": None, "style": None}
    device = None if model is None else model.device  # the prior match's kernels run there
    if model is not None and model.config.prior_components:
        # A learned mixture prior has no closed-form KL: the content KL is the mean of log q(z | x) -
        # log p(z) at the sampled codes (one per image, unbiased), and prior samples come from it.
        kl_content = _sampled_content_kl(model, codes, sampled["content"])
        results.update(kl_content=kl_content, kl_total=results["kl_total"] - results["kl_content"] + kl_content)
        samplers["content"] = model.sample_content
    prior_seeds = dict(zip(("content", "style"), metrics.child_seeds(streams["prior_match"], 2)))
    for part in ("content", "style"):
        means = codes[f"{part}_mean"]
        scores = metrics.kmeans_scores(means, test.character, seed=streams["kmeans"])
        results.update(named(metrics.kmeans_scores, scores, codes=part))
        for ways in (20, 5) if part == "content" else (20,):
            results.update(_few_shot(part, means, test, ways, episodes, streams["episodes"]))
        match = metrics.prior_match(sampled[part], seed=prior_seeds[part], sampler=samplers[part], device=device)
        results.update(named(metrics.prior_match, match, part=part, codes="sampled"))
        match = metrics.prior_match(means, seed=prior_seeds[part], sampler=samplers[part], device=device)
        results.update(named(metrics.prior_match, match, part=part, codes="means"))

    if test.has_drawers():  # image folders record no drawers
        _, drawer_index = np.unique(test.drawer, return_inverse=True)
        drawer_code = np.eye(drawer_index.max() + 1)[drawer_index]  # (N, drawers) one-hot
        results.update(_few_shot("drawer_code", drawer_code, test, 20, episodes, streams["episodes"]))
    random_code = np.random.default_rng(streams["random_codes"]).standard_normal(codes["style_mean"].shape)  # (N, Ds)
    results.update(_few_shot("random_code", random_code, test, 20, episodes, streams["episodes"]))

    pixels = test.images.reshape(len(test), -1).astype(np.float64) / 255.0  # (N, S * S)
    for name, values in (("content", codes["content_mean"]), ("pixel", pixels)):
        scores = metrics.alphabet_kmeans_scores(values, test.character, test.alphabet, seed=streams["alphabet_kmeans"])
        results.update(named(metrics.alphabet_kmeans_scores, scores, codes=name))
        results.update(_multi_shot(name, values, test, 20, 5, episodes, streams["episodes_5shot"]))
    return results


def view_metrics(model, test: omni_data.Omniglot, images: torch.Tensor, kinds: int, seed: int, episodes: int,
                 content=None) -> dict:
    """The content structure measures on the codes read in the drawing's `kinds` turned (and
    mirrored) views (`metrics.view_codes`): k-means and NMI, per-alphabet k-means, 20- and 5-way
    1-shot and 20-way 5-shot, on the same streams of `seed` as `code_metrics`, hence on the same
    episodes as the content means. No keys for kinds = 1 (a run trained without turned characters,
    whose encoder never learned the turned views). content: the drawings' content means (N, Dc),
    if already encoded (`encode_all`'s), so the unturned view is not encoded twice."""
    if kinds == 1:
        return {}
    streams = metrics.eval_streams(seed)
    codes = metrics.view_codes(model, images, kinds, content=content)  # (N, kinds * Dc)
    results = {"view_kinds": kinds}
    results.update(named(metrics.kmeans_scores, metrics.kmeans_scores(codes, test.character, seed=streams["kmeans"]),
                         codes="content_views"))
    for ways in (20, 5):
        results.update(_few_shot("content_views", codes, test, ways, episodes, streams["episodes"]))
    per_alphabet = metrics.alphabet_kmeans_scores(codes, test.character, test.alphabet, seed=streams["alphabet_kmeans"])
    results.update(named(metrics.alphabet_kmeans_scores, per_alphabet, codes="content_views"))
    results.update(_multi_shot("content_views", codes, test, 20, 5, episodes, streams["episodes_5shot"]))
    return results


@torch.no_grad()
def _sampled_content_kl(model, codes: dict, sampled: np.ndarray, batch: int = 1024) -> float:
    """Mean over images of log q(z | x) - log p(z) at one sampled content code z per image (N, Dc)."""
    total = 0.0
    for start in range(0, len(sampled), batch):
        z, mean, logvar = (torch.as_tensor(a[start:start + batch], dtype=torch.float32, device=model.device)
                           for a in (sampled, codes["content_mean"], codes["content_logvar"]))
        total += sampled_kl(z, mean, logvar, model.content_log_prior).double().sum().item()
    return total / len(sampled)


def _multi_shot(name: str, codes, test: omni_data.Omniglot, ways: int, shots: int, episodes: int, seed: int) -> dict:
    """The registry's keys for the K-shot accuracy of codes `name` on the episodes of `seed`; None when the
    split has no `shots` + 1 drawers who drew `ways` characters of one alphabet in common."""
    try:
        score = metrics.few_shot_accuracy(codes, test.character, test.alphabet, test.drawer, ways, episodes, seed,
                                          shots=shots)
    except ValueError:  # no episode can be built on this split
        score = defaultdict(lambda: None)
    return named(metrics.few_shot_accuracy, score, codes=name, ways=ways, shots=shots)


def transfer_metrics(model, image_size: int, seed: int, episodes: int) -> dict:
    """Few-shot transfer to scikit-learn's handwritten digits (`data.load_digits`), a set the model never saw.

    10-way 1-shot and 5-shot episodes (`metrics.labelled_few_shot_accuracy`) on the content means
    and on the raw pixels, both on the same episodes; `seed` is the evaluation's "digits" stream."""
    images, labels = omni_data.load_digits(image_size)
    content, _ = metrics.encode_images(model, images)  # (1797, Dc)
    pixels = images.reshape(len(images), -1).astype(np.float64) / 255.0  # (1797, S * S)
    results = {}
    for shots, shot_seed in zip((1, 5), metrics.child_seeds(seed, 2)):
        for name, codes in (("content", content), ("pixel", pixels)):
            score = metrics.labelled_few_shot_accuracy(codes, labels, 10, shots, episodes, shot_seed)
            results.update(named(metrics.labelled_few_shot_accuracy, score, codes=name, shots=shots))
    return results


def style_effect_metrics(model, test: omni_data.Omniglot, images: torch.Tensor, seed: int, codes=None) -> dict:
    """`metrics.style_effect` with STYLE_EFFECT_STYLES styles, or as many as the characters' drawers allow
    (one fewer than the most drawers of a character); `seed` is the evaluation's "style_effect" stream;
    codes: encode_all's, when already computed."""
    cells = np.unique(np.stack([test.character, test.drawer], 1), axis=0)  # (character, drawer) pairs
    drawers = np.unique(cells[:, 0], return_counts=True)[1].max()  # the most drawers of one character
    styles = min(STYLE_EFFECT_STYLES, drawers - 1)
    if styles < 2:
        return named(metrics.style_effect, defaultdict(lambda: None))
    means = None if codes is None else (codes["content_mean"], codes["style_mean"])
    result = metrics.style_effect(model, images, test.character, test.alphabet, test.drawer, styles, seed, codes=means)
    return named(metrics.style_effect, result)


def set_likelihoods(model, images: torch.Tensor, character, k: int, sets: int, seed: int, progress: bool,
                    blur: float = 0.0) -> dict:
    """`set_nll_5` and `conditional_nll_1shot` on `sets` random sets of SET_SIZE drawings of one character.

    The sets are a random choice among every character's drawings split into disjoint sets
    (`metrics.character_sets`); their drawings are binarised once; the one-shot conditional uses the
    first two drawings of each set, -log p(first | second). Every random use on its own stream of
    `seed` (the evaluation seed); the proposal reads the drawings blurred by `blur` pixels
    (`metrics.soften`). None where no character has SET_SIZE drawings."""
    streams = metrics.eval_streams(seed)
    chosen = metrics.character_sets(character, SET_SIZE, streams["set_nll_sets"])[:sets]  # (n, SET_SIZE)
    if not len(chosen):
        return {**named(metrics.set_nll, defaultdict(lambda: None)),
                **named(metrics.conditional_nll, defaultdict(lambda: None))}
    rows = np.unique(chosen)  # the drawings used, sorted
    binary = metrics.binarize(images[torch.as_tensor(rows)], seed=streams["set_binarize"])
    local = np.searchsorted(rows, chosen)  # (n, SET_SIZE) rows of `binary`
    set_seed, pair_seed = metrics.child_seeds(streams["set_iwae"], 2)
    sets = metrics.set_nll(model, binary, local, k=k, seed=set_seed, progress=progress, blur=blur)
    results = named(metrics.set_nll, sets)
    pairs = metrics.conditional_nll(model, binary, local[:, :2], k=k, seed=pair_seed, progress=progress, blur=blur)
    results.update(named(metrics.conditional_nll, pairs))
    return results


def proposal_blur(cfg: Config) -> float:
    """Pixels of blur at the run's image size for the likelihoods' importance proposal: cfg.nll_blur,
    given at 28 px, scaled with cfg.image_size; 0 for an encoder that trained on binary drawings
    (binarize with binarize_encoder), which reads them as they are."""
    if cfg.binarize and cfg.binarize_encoder:
        return 0.0
    return cfg.nll_blur * cfg.image_size / 28


def evaluate(
    run_dir,
    data_dir=None,
    cache_dir=None,
    subset: int | None = None,
    nll_k: int | None = None,
    nll_images: int | None = None,
    episodes: int | None = None,
    swap_pairs: int | None = None,
    figures: bool = True,
    device: str = "auto",
    progress: bool = True,
    split: str = "evaluation",
    nll_blur: float | None = None,
) -> dict:
    """Evaluate a trained run on the evaluation set; writes the run's metrics file and figures.

    split: "evaluation" (the 20 unseen alphabets: the numbers to report, looked at once) or
    "validation" (the background alphabets `val_alphabets`, for every choice; only for runs
    trained with val_holdout=true, which never saw them). A run trained on an image folder (give
    it as data_dir again) is scored on its held-out classes, without the drawer metrics.

    subset: evaluate on about that many test images for a quick look: whole alphabets drawn at
    random until they hold at least `subset` images, so few-shot episodes keep their protocol.
    nll_k, nll_images, episodes, swap_pairs: the evaluation budget; None takes the run's config
    value (see Config): importance samples per image for the likelihood (0 skips it), test
    images it uses (a fixed subset; 0 means all), few-shot episodes, swap pairs (0 skips it).
    The set and one-shot likelihoods take their budget from the config (set_nll_k, set_nll_sets)
    and run with the likelihood (nll_k = 0 skips them too). nll_blur: pixels (at 28 px) of the
    blur the likelihoods' importance proposal reads the binary drawings with (`proposal_blur`);
    None takes the run's config value (ConfigError for a negative or infinite one).
    """
    started = time.time()
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir)
    rundir.check_writable(run_dir, "evaluate writes its results there")
    if figures and rundir.figures_dir(run_dir).is_dir():
        rundir.check_writable(rundir.figures_dir(run_dir), "evaluate writes its figures there")
    nll_k = cfg.nll_k if nll_k is None else nll_k
    nll_images = cfg.nll_images if nll_images is None else nll_images
    episodes = cfg.episodes if episodes is None else episodes
    swap_pairs = cfg.swap_pairs if swap_pairs is None else swap_pairs
    if nll_blur is not None:
        cfg = override(cfg, {"nll_blur": nll_blur})  # checked as the config's own value
    blur = proposal_blur(cfg)
    test = load_split(cfg, split, data_dir, cache_dir, progress)
    model = load(run_dir, str(resolve_device(device)))
    seed = cfg.eval_seed
    streams = metrics.eval_streams(seed)  # one independent seed per random use
    if subset and subset < len(test):
        test = whole_alphabets(test, subset, streams["subset"])
    images = test.tensors()  # (N, 1, S, S)
    step = tqdm(total=7, desc="evaluate", disable=not progress)

    def done(what: str) -> None:
        step.set_postfix_str(what)
        step.update()

    codes = encode_all(model, images)
    described = SPLITS[split] if cfg.data != "folder" else FOLDER_SPLIT.format(classes=len(np.unique(test.character)))
    results = {"protocol_version": PROTOCOL_VERSION, "split": split, "split_description": described,
               "test_images": len(test)}
    done("encoded")
    results.update(code_metrics(codes, test, seed, episodes, model))
    results.update(view_metrics(model, test, images, new_character_kinds(cfg), seed, episodes, codes["content_mean"]))
    done("clusters, few-shot, prior match")
    results.update(pixel_baseline(test, seed, cache_dir, episodes))
    done("pixel baseline")

    if test.has_drawers():  # styles come from drawers
        results.update(style_effect_metrics(model, test, images, streams["style_effect"], codes))
    results.update(transfer_metrics(model, cfg.image_size, streams["digits"], episodes))
    if swap_pairs and test.has_drawers():  # the judge and the swaps use held-out drawers
        background = omni_data.load_set("background", cfg.image_size, data_dir, cache_dir, progress=progress)
        train_set, held_out = omni_data.split_by_drawer(background, cfg.val_drawers)
        classifier = judge(cfg, train_set, cache_dir, model.device, progress)
        if cfg.val_holdout:  # swaps of the characters the model trained on, as for every run
            held_out = omni_data.split_by_alphabet(held_out, cfg.val_alphabets)[0]
        swap = metrics.swap_consistency(model, classifier, held_out.tensors(), held_out.character, pairs=swap_pairs,
                                        seed=streams["swap_pairs"])
        results.update(named(metrics.swap_consistency, swap))
    done("style effect, digits, swap consistency")

    if nll_k:
        scorer = fold_batch_norm(model)  # the same numbers, in about 2/3 of the time (bench/fold_check.py)
        chosen = np.arange(len(test)) if not nll_images or nll_images >= len(test) else (
            np.sort(np.random.default_rng(streams["nll_images"]).choice(len(test), nll_images, replace=False))
        )
        binary = metrics.binarize(images[chosen], seed=streams["binarize"])
        likelihood = metrics.iwae_nll(scorer, binary, k=nll_k, seed=streams["iwae"], progress=progress, blur=blur)
        results.update(named(metrics.iwae_nll, likelihood), nll_images=len(chosen), nll_blur=blur)
        if cfg.set_nll_k and cfg.set_nll_sets:
            results.update(set_likelihoods(scorer, images, test.character, cfg.set_nll_k, cfg.set_nll_sets, seed,
                                           progress, blur))
    done("likelihood")

    if figures:
        make_figures(run_dir, model, test, codes, seed, cfg.tsne_characters)
    done("figures")
    step.close()
    results["eval_seconds"] = round(time.time() - started, 1)
    rundir.write_metrics(run_dir, results)
    return results


def make_figures(run_dir: Path, model, test: omni_data.Omniglot, codes: dict, seed: int, tsne_characters: int = 20) -> None:
    """Every figure of the report, into the run's figures folder; `tsne_characters` characters in the labelled t-SNE plot."""
    out = rundir.figures_dir(run_dir)
    out.mkdir(exist_ok=True)
    picks_seed, samples_seed, one_shot_seed, tsne_seed, readable_seed = metrics.child_seeds(
        metrics.eval_streams(seed)["figures"], 5)
    rng = np.random.default_rng(picks_seed)
    images = test.tensors()
    pick = torch.as_tensor(np.sort(rng.choice(len(test), 32, replace=False)))
    # Decoded cells are pixel probabilities, or samples for an autoregressive decoder: each figure says which.
    kind = generate.drawing_kind(model)
    with torch.no_grad():
        recon = model.reconstruct(images[pick], generator=torch.Generator().manual_seed(picks_seed)).cpu()
    plots.reconstruction_grid(images[pick], recon, out / "reconstructions.png",
                              output_label="sample" if model.autoregressive else "output",
                              title=f"reconstructions: {kind}")
    plots.image_grid(generate.sample(model, 64, samples_seed), out / "samples.png", ncols=8,
                     title=f"prior samples: {kind}")

    # Swap: 6 characters (one drawing each) x 6 hands that differ visibly (thick, thin, leaning
    # right and left, large, small): every drawing of SWAP_CANDIDATES other characters, each
    # measured against the other drawings of its character, so the extremes are hands, not shapes.
    chars = rng.choice(np.unique(test.character), 12, replace=len(np.unique(test.character)) < 12)
    first = np.array([np.flatnonzero(test.character == c)[0] for c in chars])
    others = np.setdiff1d(np.unique(test.character), chars[:6])
    others = others if len(others) else np.unique(test.character)
    candidates = np.flatnonzero(np.isin(test.character, rng.choice(others, min(len(others), SWAP_CANDIDATES),
                                                                   replace=False)))
    hands, hand_names = metrics.distinct_hands(images[torch.as_tensor(candidates)], 6, test.character[candidates])
    content_images, style_images = images[first[:6]], images[torch.as_tensor(candidates[hands])]
    plots.swap_grid(content_images, style_images, generate.swap(model, content_images, style_images, picks_seed),
                    out / "swap.png", title=f"content/style swap: {kind}", style_labels=hand_names)

    # One-shot: 4 unseen characters, each from a single drawing, 8 new drawings each.
    rows = [torch.cat([images[i : i + 1].cpu(), generate.one_shot(model, images[i], 8, one_shot_seed + k)]) for k, i in enumerate(first[:4])]
    plots.image_grid(torch.cat(rows), out / "one_shot.png", ncols=9, title=f"one-shot: a drawing, then {kind}")
    a, b = images[first[0]], images[first[1]]
    same_char = images[np.flatnonzero(test.character == chars[0])[1]]
    plots.interpolation_grid(
        torch.stack([generate.interpolate(model, a, b, 10, "content", picks_seed),
                     generate.interpolate(model, a, same_char, 10, "style", picks_seed)]),
        out / "interpolation.png",
        row_labels=["content", "style"],
        title=f"interpolations: {kind}",
    )

    # t-SNE: a readable subset coloured by character, and everything coloured by alphabet.
    few = np.isin(test.character, _readable_characters(test, tsne_characters, readable_seed))
    names = np.array(test.alphabet_names)
    # The by-alphabet map uses a fixed sample of drawings: t-SNE of all 13,180 costs minutes on a CPU.
    many = np.sort(rng.choice(len(test), min(len(test), TSNE_POINTS), replace=False))
    for part in ("content", "style"):
        points = plots.embed_tsne(codes[f"{part}_mean"][few], seed=tsne_seed)
        title = f"{part} codes: {few.sum()} drawings of {len(np.unique(test.character[few]))} characters"
        plots.tsne_plot(points, test.character[few], out / f"tsne_{part}_characters.png", title)
        points = plots.embed_tsne(codes[f"{part}_mean"][many], seed=tsne_seed)
        title = f"{part} codes: {len(many)} drawings, coloured by alphabet"
        plots.tsne_plot(points, names[test.alphabet[many]], out / f"tsne_{part}_alphabets.png", title, legend=False)
    records = rundir.read_log(run_dir)
    if records:
        plots.training_curves(records, out / "training_curves.png")


def _readable_characters(test: omni_data.Omniglot, count: int, seed: int) -> np.ndarray:
    """`count` characters from two alphabets (10 each by default), so that colours stay distinguishable."""
    rng = np.random.default_rng(seed)
    present = np.unique(test.alphabet)
    alphabets = rng.choice(present, min(2, len(present)), replace=False)
    chosen = []
    for alphabet in alphabets:
        chars = np.unique(test.character[test.alphabet == alphabet])
        chosen.extend(rng.choice(chars, min(len(chars), count // 2), replace=False))
    return np.array(chosen)
