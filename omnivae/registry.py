"""The metric registry: one record per metric key a run's metrics file holds, read by everything that names a metric.

A record says which function computes the key (and which field of its result dict it is), which
way is better, which numbers to show beside it, a short label for tables, a one-line
description and the paper. `omnivae evaluate` names its keys with `named`, the report, the
comparison tables and bench/ablation.py read labels, directions, baselines and descriptions
from `METRICS`, and the README's metric table is `registry_markdown()`:

    python -m omnivae.registry

The functions live in `metrics.py` (and the bookkeeping in `evaluate.py`); the records sit here,
beside them, in a module that imports nothing heavy, so reports and `--help` stay quick.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

HIGHER, LOWER = "higher", "lower"

LAKE = "Lake et al. 2015; Vinyals et al. 2016"
XIE = "Xie et al. 2016"
NMI = "Strehl and Ghosh 2002"
CI95 = "Finn et al. 2017"
SWAP = "Mathieu et al. 2016; Bouchacourt et al. 2018"
IWAE = "Burda et al. 2016"
PRIOR = "Gretton et al. 2012; Makhzani et al. 2016"
KL = "Kingma and Welling 2014"
HSU = "Hsu et al. 2019; Xie et al. 2016"
PROTO = "Lake et al. 2015; Snell et al. 2017"
DIGITS = "Alpaydin and Kaynak 1998; Snell et al. 2017"
SET_NLL = "Bouchacourt et al. 2018; Giannone and Winther 2022; Burda et al. 2016"
STYLE_EFFECT = "Mathieu et al. 2016; Bouchacourt et al. 2018; Jaccard 1912"
VIEWS = "Krizhevsky et al. 2012; Vinyals et al. 2016"
VIEW_CODES = ("the content codes read in the drawing's turned (and mirrored) views, the characters of their own "
              "that training with `rotations` (and `reflections`) named: unit content means side by side "
              "(`metrics.view_codes`)")


@dataclass(frozen=True)
class Metric:
    """One metric key and everything a table, chart or document needs to show it."""

    key: str  # the key in the run's metrics file
    label: str  # short name for table headers and chart titles
    description: str  # one line: what the number measures
    direction: str | None  # HIGHER or LOWER is better; None for counts, settings, references and intervals
    function: str  # "module.function" in omnivae that computes it, e.g. "metrics.few_shot_accuracy"
    field: str | None = None  # the field of that function's result dict; None: evaluate writes it itself
    where: tuple = ()  # (name, value) pairs telling apart the records of one function (codes, ways, ...)
    baselines: tuple[str, ...] = ()  # keys of the reference numbers shown beside it
    ci95_of: str | None = None  # for a 95% half-width: the key of the value it qualifies
    paper: str = ""  # where the metric comes from
    seed_document: float | None = None  # the seed document's number for this measure
    chart: bool = False  # drawn as a bar chart on the comparison page
    optional: bool = False  # only some models have it (its function leaves the field out for the others)


def _few_shot(codes: str, ways: int, label: str, description: str, direction: str | None,
              baselines: tuple[str, ...] = (), chart: bool = False, shots: int = 1) -> list[Metric]:
    """The accuracy of `metrics.few_shot_accuracy` on one kind of code and its 95% half-width.

    `shots` joins the `where` values only when it is not 1, so the one-shot records keep theirs."""
    where = (("codes", codes), ("ways", ways)) + ((("shots", shots),) if shots != 1 else ())
    return _accuracy_ci95(f"{codes}_{ways}way_{shots}shot", label, description, direction,
                          "metrics.few_shot_accuracy", where, baselines, LAKE if shots == 1 else PROTO, chart)


def _digits(codes: str, shots: int, label: str, description: str, baselines: tuple[str, ...] = ()) -> list[Metric]:
    """`metrics.labelled_few_shot_accuracy` on the digits transfer set, one kind of code."""
    key = "digits" + ("" if codes == "content" else f"_{codes}") + f"_10way_{shots}shot"
    return _accuracy_ci95(key, label, description, HIGHER, "metrics.labelled_few_shot_accuracy",
                          (("codes", codes), ("shots", shots)), baselines, DIGITS)


def _accuracy_ci95(key: str, label: str, description: str, direction: str | None, function: str, where: tuple,
                   baselines: tuple[str, ...], paper: str, chart: bool = False) -> list[Metric]:
    """An episode accuracy and its 95% half-width."""
    return [
        Metric(key, label, description, direction, function, "accuracy", where, baselines, paper=paper, chart=chart),
        Metric(f"{key}_ci95", f"{label} ±", f"95% half-width of `{key}` over its episodes, 1.96 sd / sqrt(episodes): "
               "the noise of the episode draw, not of training.", None, function, "ci95", where,
               ci95_of=key, paper=CI95),
    ]


def _kmeans(codes: str, label: str, what: str, note: str, direction: str, beside_pixels: bool = False,
            seed_document: float | None = None, chart: bool = False) -> list[Metric]:
    """Accuracy and NMI of `metrics.kmeans_scores` on one kind of code, beside the raw pixels' if asked."""
    where = (("codes", codes),)
    return [
        Metric(f"{codes}_kmeans_accuracy", f"{label}k-means acc",
               f"k-means on {what} with K = number of characters, clusters matched one-to-one to characters "
               f"(Hungarian): the fraction matched.{note}", direction, "metrics.kmeans_scores", "accuracy", where,
               ("pixel_kmeans_accuracy",) if beside_pixels else (), paper=XIE, seed_document=seed_document,
               chart=chart),
        Metric(f"{codes}_nmi", f"{label}NMI", f"Normalised mutual information between the k-means clusters of "
               f"{what} and the characters.{note}", direction, "metrics.kmeans_scores", "nmi", where,
               ("pixel_nmi",) if beside_pixels else (), paper=NMI, chart=chart),
    ]


def _prior(part: str) -> list[Metric]:
    """`metrics.prior_match` of one part, on sampled codes and, secondary, on the means."""
    floor = f"prior_mmd2_floor_{part}"
    sampled = (("part", part), ("codes", "sampled"))
    means = (("part", part), ("codes", "means"))
    return [
        Metric(f"prior_mmd2_{part}", f"MMD2 {part}",
               f"Prior match of the aggregate posterior: unbiased MMD^2 (IMQ kernels) between one {part} code per "
               "image sampled from q(z|x), z = mu + sigma * eps, and as many N(0, I) samples; at the floor when "
               "they match.", LOWER, "metrics.prior_match", "mmd2", sampled, (floor,), paper=PRIOR),
        Metric(floor, f"MMD2 floor {part}", f"MMD^2 between two independent N(0, I) samples of the same size: the "
               f"noise floor of `prior_mmd2_{part}` and `prior_mmd2_means_{part}`.", None, "metrics.prior_match",
               "mmd2_floor", sampled, paper=PRIOR),
        Metric(f"prior_gaussian_kl_{part}", f"fitted KL {part}",
               f"KL(N(mean, covariance) || N(0, I)) of a full-covariance Gaussian fitted to the sampled {part} "
               "codes, in nats: the prior match of the first two moments.", LOWER, "metrics.prior_match",
               "gaussian_kl", sampled, paper=PRIOR),
        Metric(f"prior_mmd2_means_{part}", f"MMD2 {part} means",
               f"Secondary: `prior_mmd2_{part}` on the posterior means instead of sampled codes (same prior "
               "samples). The means are narrower than the aggregate posterior, so this is not the prior match.",
               LOWER, "metrics.prior_match", "mmd2", means, (floor,), paper=PRIOR),
        Metric(f"prior_gaussian_kl_means_{part}", f"fitted KL {part} means",
               f"Secondary: `prior_gaussian_kl_{part}` on the posterior means instead of sampled codes.",
               LOWER, "metrics.prior_match", "gaussian_kl", means, paper=PRIOR),
    ]


_RECORDS: list[Metric] = [
    # What the numbers were computed on.
    Metric("protocol_version", "protocol", "Version of the evaluation protocol (2: Lake et al. episodes with 95% "
           "intervals, leakage references, prior match on sampled codes, one random stream per use; 3: a swap "
           "judge trained with augmentations, per-alphabet clustering, 5-shot, digits transfer, set likelihood, "
           "style effect; 4: the style effect's ink masks without a grey-level threshold; 5: the likelihoods' "
           "importance proposal reads the binary drawings blurred); `omnivae compare` warns when runs differ.", None,
           "evaluate.evaluate"),
    Metric("split", "split", "The images scored: `evaluation` (20 unseen alphabets: the numbers to report) or "
           "`validation` (background alphabets a val_holdout run never trained on: for every choice).",
           None, "evaluate.evaluate"),
    Metric("split_description", "split (in words)", "The split in words.", None, "evaluate.evaluate"),
    Metric("test_images", "images", "Images in the scored split (fewer with --subset, which keeps whole "
           "alphabets).", None, "evaluate.evaluate"),
    # Rate.
    Metric("kl_total", "per-image KL", "Per-image KL(q(z|x) || N(0, I)), content plus style (plus detail), in nats: the seed "
           "document's \"KL divergence\". A rate, not a prior match: 0 means the codes carry no information.",
           None, "metrics.per_image_kl", "kl_total", paper=KL, seed_document=63.1432, chart=True),
    Metric("kl_content", "KL content", "Per-image posterior KL of the content code to its prior, in nats (with a learned mixture prior: a one-sample estimate per image).", None,
           "metrics.per_image_kl", "kl_content", paper=KL),
    Metric("kl_style", "KL style", "Per-image posterior KL of the style code, in nats.", None,
           "metrics.per_image_kl", "kl_style", paper=KL),
    Metric("kl_detail", "KL detail", "Per-image posterior KL of the detail code (detail_dim > 0), in nats.", None,
           "metrics.per_image_kl", "kl_detail", paper=KL, optional=True),
    # Structure: clustering.
    *_kmeans("content", "", "content means", "", HIGHER, beside_pixels=True, seed_document=0.0017, chart=True),
    *_kmeans("style", "style ", "style means", " Lower: less character in the style code.", LOWER,
             beside_pixels=True),
    *_kmeans("pixel", "pixel ", "raw pixels", " The baseline.", HIGHER),
    Metric("content_alphabet_kmeans_accuracy", "alphabet k-means acc", "k-means within each alphabet on content "
           "means, K = the alphabet's number of characters, clusters matched one-to-one to characters (Hungarian); "
           "the accuracy averaged over alphabets.", HIGHER, "metrics.alphabet_kmeans_scores", "accuracy",
           (("codes", "content"),), ("pixel_alphabet_kmeans_accuracy",), paper=HSU),
    Metric("pixel_alphabet_kmeans_accuracy", "pixel alphabet k-means acc", "The per-alphabet k-means on raw "
           "pixels: the baseline.", HIGHER, "metrics.alphabet_kmeans_scores", "accuracy", (("codes", "pixel"),),
           paper=HSU),
    # Structure: Lake et al. one-shot episodes.
    *_few_shot("content", 20, "20-way 1-shot", "Lake et al. episodes: 20 characters of one alphabet drawn by a "
               "support drawer and by a query drawer; each query takes the character of its nearest support "
               "(cosine, content means). Mean over episodes; chance 0.05.", HIGHER, ("pixel_20way_1shot",),
               chart=True),
    *_few_shot("content", 5, "5-way 1-shot", "The same episodes with 5 characters; chance 0.2.", HIGHER,
               ("pixel_5way_1shot",)),
    *_few_shot("content", 20, "20-way 5-shot", "Episodes of 20 characters of one alphabet with 5 support drawers "
               "(each drew every character once for it) and a sixth drawer's queries; each query takes the "
               "character of the nearest prototype, the mean of its 5 unit content means (cosine); chance 0.05.",
               HIGHER, ("pixel_20way_5shot",), shots=5),
    # The same structure measures on the content codes read in the turned and mirrored views (runs
    # trained with rotations or reflections only): test-time augmentation over the training's own turns.
    Metric("view_kinds", "views", "Views behind the `content_views_*` keys: 4 quarter turns with `rotations`, "
           "times 2 mirror images with `reflections`.", None, "evaluate.view_metrics", paper=VIEWS),
    *[replace(m, paper=f"{m.paper}; {VIEWS}")
      for m in _kmeans("content_views", "views ", VIEW_CODES, "", HIGHER, beside_pixels=True)],
    Metric("content_views_alphabet_kmeans_accuracy", "views alphabet k-means acc", "The per-alphabet k-means on "
           f"{VIEW_CODES}.", HIGHER, "metrics.alphabet_kmeans_scores", "accuracy", (("codes", "content_views"),),
           ("pixel_alphabet_kmeans_accuracy",), paper=f"{HSU}; {VIEWS}"),
    *_few_shot("content_views", 20, "views 20-way 1-shot", f"The 20-way 1-shot episodes on {VIEW_CODES}; the "
               "cosine of two such codes is the mean of their views' cosines.", HIGHER,
               ("pixel_20way_1shot",)),
    *_few_shot("content_views", 5, "views 5-way 1-shot", f"The 5-way 1-shot episodes on {VIEW_CODES}.", HIGHER,
               ("pixel_5way_1shot",)),
    *_few_shot("content_views", 20, "views 20-way 5-shot", f"The 20-way 5-shot episodes on {VIEW_CODES}.",
               HIGHER, ("pixel_20way_5shot",), shots=5),
    *_few_shot("style", 20, "style leakage", "Style leakage: the 20-way episodes on style means; a code of the "
               "hand alone scores chance (0.05), since an episode's supports share one drawer.", LOWER,
               ("drawer_code_20way_1shot", "random_code_20way_1shot"), chart=True),
    *_few_shot("drawer_code", 20, "drawer code", "Leakage reference: the same episodes on a one-hot code of the "
               "drawer alone, what a style code that knows only the hand scores (chance).", None),
    *_few_shot("random_code", 20, "random code", "Leakage reference: the same episodes on random N(0, I) codes of "
               "the style code's size (chance).", None),
    *_few_shot("pixel", 20, "pixel 20-way 1-shot", "The 20-way episodes on raw pixels: the baseline.", HIGHER),
    *_few_shot("pixel", 5, "pixel 5-way 1-shot", "The 5-way episodes on raw pixels: the baseline.", HIGHER),
    *_few_shot("pixel", 20, "pixel 20-way 5-shot", "The 20-way 5-shot episodes on raw pixels: the baseline.",
               HIGHER, shots=5),
    # Transfer to a handwriting set the model never saw: scikit-learn's 8x8 digits, upsampled.
    *_digits("content", 1, "digits 1-shot", "Transfer: 10-way 1-shot episodes on scikit-learn's handwritten digits "
             "(1,797, upsampled with a margin like Omniglot's), random drawings (no drawer labels); nearest "
             "support by cosine of content means; chance 0.1.", ("digits_pixel_10way_1shot",)),
    *_digits("content", 5, "digits 5-shot", "Transfer: the digits with 5 supports per class; nearest prototype "
             "(mean unit content mean, cosine); chance 0.1.", ("digits_pixel_10way_5shot",)),
    *_digits("pixel", 1, "digits pixel 1-shot", "The digits 1-shot episodes on raw pixels: the baseline."),
    *_digits("pixel", 5, "digits pixel 5-shot", "The digits 5-shot episodes on raw pixels: the baseline."),
    # Disentanglement: swaps judged by a character classifier.
    Metric("swap_consistency", "swap", "Decode (content of A, style of B) for pairs of different characters "
           "(held-out drawers of the training characters): how often an independent classifier, trained with "
           "augmentations like a decoder's (blur, stroke width, small affine changes, grey ink), names A's "
           "character.", HIGHER, "metrics.swap_consistency", "swap_consistency",
           baselines=("recon_consistency", "classifier_accuracy"), paper=SWAP, chart=True),
    Metric("style_character_rate", "swap names B", "The same swaps: how often the classifier names B's character "
           "(character in the style code).", LOWER, "metrics.swap_consistency", "style_character_rate", paper=SWAP),
    Metric("recon_consistency", "swap ceiling", "The classifier on decode(content A, style A): the ceiling a swap "
           "can reach given the decoder's blur.", HIGHER, "metrics.swap_consistency", "reconstruction_accuracy",
           paper=SWAP),
    Metric("classifier_accuracy", "judge accuracy", "The classifier that judges the swaps, on real held-out "
           "drawings: its own ceiling.", None, "metrics.swap_consistency", "real_accuracy", paper=SWAP),
    Metric("classifier_accuracy_binarized", "judge on binarised", "The same classifier on the real held-out "
           "drawings dynamically binarised (one Bernoulli draw per pixel): the ceiling for binary drawings, which an "
           "autoregressive decoder samples.", None, "metrics.swap_consistency", "real_binarized_accuracy",
           paper=SWAP),
    Metric("style_effect", "style effect", "How much decodings of one content differ across the style codes of 5 "
           "other drawers (drawings of other characters), over how much real drawings of the character by those "
           "drawers differ: mean pairwise Jaccard distance of ink masks (each drawing's expected ink count of darkest "
           "pixels). 0: the style code does nothing; about 1: as much as hands.", None, "metrics.style_effect",
           "style_effect", paper=STYLE_EFFECT),
    Metric("style_effect_floor", "style effect floor", "The style effect's noise floor: the same ratio for samples "
           "of each content with one style code. 0 for a deterministic decoder; an autoregressive decoder's samples "
           "differ by chance, and its style effect reads only above this.", None, "metrics.style_effect", "floor",
           paper=STYLE_EFFECT),
    # Likelihood.
    Metric("nll_iwae", "NLL (nats)", "Negative log-likelihood per dynamically binarised test image, k-sample "
           "importance-weighted bound with the encoder as proposal (reading the drawing blurred by `nll_blur` "
           "pixels), in nats.", LOWER, "metrics.iwae_nll", "nll", paper=IWAE, chart=True),
    Metric("elbo_nll", "-ELBO (nats)", "Negative ELBO per image from the same samples, in nats: never below "
           "`nll_iwae`.", LOWER, "metrics.iwae_nll", "elbo_nll", paper=IWAE),
    Metric("nll_k", "NLL samples", "Importance samples per image behind `nll_iwae`.", None, "metrics.iwae_nll", "k"),
    Metric("nll_images", "NLL images", "Test images behind `nll_iwae` (a fixed subset).", None, "evaluate.evaluate"),
    Metric("nll_blur", "NLL proposal blur", "Standard deviation, in pixels, of the Gaussian blur of the binary "
           "drawings that the likelihoods' importance proposal reads (0: the drawings themselves).", None,
           "evaluate.evaluate"),
    Metric("set_nll_5", "set NLL (nats)", "Negative log-likelihood of 5 binarised drawings of one test character "
           "sharing one content code (a style code each), per drawing, in nats: importance sampling with the "
           "product of the 5 content posteriors as proposal.", LOWER, "metrics.set_nll", "nll",
           baselines=("nll_iwae",), paper=SET_NLL),
    Metric("conditional_nll_1shot", "1-shot NLL (nats)", "-log p(x | x') for x, x' two drawings of one test "
           "character, in nats: log p(x, x') - log p(x'), each by importance sampling (the pair with one content "
           "code); below `nll_iwae` when one drawing helps to predict another.", LOWER, "metrics.conditional_nll",
           "nll", baselines=("nll_iwae",), paper=SET_NLL),
    Metric("set_nll_k", "set NLL samples", "Importance samples per set behind `set_nll_5` and "
           "`conditional_nll_1shot`.", None, "metrics.set_nll", "k"),
    Metric("set_nll_sets", "set NLL sets", "Sets of 5 drawings behind `set_nll_5`; `conditional_nll_1shot` "
           "uses the first two drawings of each.", None, "metrics.set_nll", "sets"),
    # Prior match of the aggregate posterior.
    *_prior("content"),
    *_prior("style"),
    Metric("eval_seconds", "eval s", "Seconds the evaluation took.", None, "evaluate.evaluate"),
]

METRICS: dict[str, Metric] = {m.key: m for m in _RECORDS}  # every metric key, in table order
CI95: dict[str, str] = {m.ci95_of: m.key for m in _RECORDS if m.ci95_of}  # value key -> its half-width's key


def _function_name(function: Callable) -> str:
    return f"{function.__module__.rpartition('.')[2]}.{function.__name__}"


def named(function: Callable, result: dict, **where) -> dict:
    """The metric entries of one call: {key: result[field]} for every record of `function`
    with these `where` values (e.g. codes="content", ways=20). This is the one place a result's
    fields become keys; fields no record names are not written, and an optional record whose
    field the result leaves out is skipped."""
    name = _function_name(function)
    chosen = [m for m in _RECORDS if m.function == name and m.field is not None and dict(m.where) == where]
    if not chosen:
        raise KeyError(f"the metric registry has no record of {name} with {where}")
    return {m.key: result[m.field] for m in chosen if not (m.optional and m.field not in result)}


def registry_markdown() -> str:
    """The README's metric table: one row per key (a 95% half-width shares its value's row)."""
    lines = ["| key | better | what it measures | shown beside | reference |", "| --- | --- | --- | --- | --- |"]
    for m in _RECORDS:
        if m.ci95_of:
            continue
        key = f"`{m.key}`" + (f" ± `{CI95[m.key]}`" if m.key in CI95 else "")
        beside = ", ".join(f"`{b}`" for b in m.baselines)
        if m.seed_document is not None:
            beside = ", ".join(filter(None, [beside, f"seed document: {m.seed_document:g}"]))
        cells = [key, m.direction or "", m.description, beside, m.paper]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(registry_markdown(), end="")
