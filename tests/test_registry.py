"""The metric registry: one complete record per metrics.json key, and the one place keys are named."""
import importlib
from pathlib import Path

import pytest

from omnivae import metrics, registry
from omnivae.registry import CI95, METRICS

ROOT = Path(__file__).resolve().parents[1]


def test_every_record_is_complete():
    assert len(METRICS) == len(registry._RECORDS)  # no key registered twice
    for key, metric in METRICS.items():
        assert metric.key == key
        assert metric.direction in ("higher", "lower", None), key
        assert metric.label.strip() and metric.description.strip(), key
        assert "\n" not in metric.description, key
        for baseline in metric.baselines:
            assert baseline in METRICS and baseline != key, (key, baseline)
        # The function that computes it exists where the record says.
        module, _, name = metric.function.partition(".")
        assert callable(getattr(importlib.import_module(f"omnivae.{module}"), name)), key


def test_half_widths_point_at_their_values():
    for key, metric in METRICS.items():
        if key.endswith("_ci95"):
            assert metric.ci95_of == key[: -len("_ci95")] and metric.ci95_of in METRICS, key
            assert metric.direction is None and metric.function == METRICS[metric.ci95_of].function
        else:
            assert metric.ci95_of is None, key
    assert CI95["content_20way_1shot"] == "content_20way_1shot_ci95"
    assert set(CI95.values()) == {k for k in METRICS if k.endswith("_ci95")}


def test_the_leakage_references_and_baselines():
    assert METRICS["style_20way_1shot"].direction == "lower"
    assert METRICS["style_20way_1shot"].baselines == ("drawer_code_20way_1shot", "random_code_20way_1shot")
    assert METRICS["content_20way_1shot"].baselines == ("pixel_20way_1shot",)
    assert METRICS["prior_mmd2_means_content"].baselines == ("prior_mmd2_floor_content",)
    assert METRICS["nll_iwae"].direction == "lower" and METRICS["kl_total"].direction is None
    # The new measures sit beside their baselines.
    assert METRICS["content_20way_5shot"].baselines == ("pixel_20way_5shot",)
    assert METRICS["content_alphabet_kmeans_accuracy"].baselines == ("pixel_alphabet_kmeans_accuracy",)
    assert METRICS["digits_10way_5shot"].baselines == ("digits_pixel_10way_5shot",)
    assert METRICS["set_nll_5"].baselines == METRICS["conditional_nll_1shot"].baselines == ("nll_iwae",)
    assert METRICS["swap_consistency"].baselines == ("recon_consistency", "classifier_accuracy")
    assert METRICS["set_nll_5"].direction == "lower" and METRICS["style_effect"].direction is None
    assert {m.key: m.seed_document for m in METRICS.values() if m.seed_document is not None} == {
        "kl_total": 63.1432, "content_kmeans_accuracy": 0.0017}


def test_named_maps_each_field_to_its_key_once():
    score = {"accuracy": 0.8, "ci95": 0.01, "episodes": 1000}
    assert registry.named(metrics.few_shot_accuracy, score, codes="content", ways=20) == {
        "content_20way_1shot": 0.8, "content_20way_1shot_ci95": 0.01}
    swap = {"swap_consistency": 0.5, "style_character_rate": 0.1, "reconstruction_accuracy": 0.6,
            "real_accuracy": 0.7, "real_binarized_accuracy": 0.3, "pairs": 20}
    assert registry.named(metrics.swap_consistency, swap) == {
        "swap_consistency": 0.5, "style_character_rate": 0.1, "recon_consistency": 0.6, "classifier_accuracy": 0.7,
        "classifier_accuracy_binarized": 0.3}
    match = {"mmd2": 0.2, "mmd2_floor": 0.0, "gaussian_kl": 3.0, "points": 10}
    assert registry.named(metrics.prior_match, match, part="style", codes="means") == {
        "prior_mmd2_means_style": 0.2, "prior_gaussian_kl_means_style": 3.0}  # the floor is the sampled one's
    assert registry.named(metrics.few_shot_accuracy, score, codes="pixel", ways=20, shots=5) == {
        "pixel_20way_5shot": 0.8, "pixel_20way_5shot_ci95": 0.01}
    assert registry.named(metrics.labelled_few_shot_accuracy, score, codes="pixel", shots=1) == {
        "digits_pixel_10way_1shot": 0.8, "digits_pixel_10way_1shot_ci95": 0.01}
    likelihood = {"nll": 90.0, "k": 100, "sets": 10, "set_size": 5}
    assert registry.named(metrics.set_nll, likelihood) == {"set_nll_5": 90.0, "set_nll_k": 100, "set_nll_sets": 10}
    with pytest.raises(KeyError, match="no record"):
        registry.named(metrics.few_shot_accuracy, score, codes="content", ways=7)
    with pytest.raises(KeyError):
        registry.named(metrics.few_shot_accuracy, {"accuracy": 0.8}, codes="content", ways=20)  # a field missing
    # Within one function and one set of `where` values, each field is one key.
    seen = set()
    for m in METRICS.values():
        if m.field is not None:
            assert (m.function, m.where, m.field) not in seen, m.key
            seen.add((m.function, m.where, m.field))


def test_readme_metric_table_is_the_registry():
    """The README's table is `python -m omnivae.registry`; regenerate it when a record changes."""
    assert registry.registry_markdown() in (ROOT / "README.md").read_text()
