"""omnivae.evaluate: which images a run is scored on."""
import numpy as np
import pytest

from fixtures import synthetic_omniglot
from omnivae.evaluate import whole_alphabets


def test_subset_takes_whole_alphabets_until_enough_images():
    data = synthetic_omniglot(characters=12, drawers=20, alphabets=4)  # 4 alphabets x 3 characters x 20 drawers
    for wanted, alphabets in ((1, 1), (60, 1), (61, 2), (150, 3), (240, 4)):
        picked = whole_alphabets(data, wanted, seed=3)
        assert len(np.unique(picked.alphabet)) == alphabets and len(picked) == 60 * alphabets
        for a in np.unique(picked.alphabet):  # every drawing of a picked alphabet, so episodes keep their drawers
            assert np.sum(picked.alphabet == a) == np.sum(data.alphabet == a)
    assert whole_alphabets(data, 1, seed=3).alphabet[0] == whole_alphabets(data, 1, seed=3).alphabet[0]
    firsts = {int(whole_alphabets(data, 1, seed=s).alphabet[0]) for s in range(20)}
    assert len(firsts) > 1  # the seed decides which alphabets


def _tiny_model(**overrides):
    import torch

    from omnivae.model import ModelConfig, StructuredVAE

    torch.manual_seed(0)
    return StructuredVAE(ModelConfig(channels=4, hidden=16, content_dim=4, style_dim=2, **overrides)).eval()


def test_set_likelihoods_and_their_absence():
    from omnivae.evaluate import set_likelihoods
    from omnivae.registry import METRICS

    data = synthetic_omniglot(characters=6, drawers=10)  # 2 sets of 5 per character
    images = data.tensors()
    results = set_likelihoods(_tiny_model(), images, data.character, k=8, sets=5, seed=0, progress=False)
    assert set(results) == {"set_nll_5", "conditional_nll_1shot", "set_nll_k", "set_nll_sets"} <= set(METRICS)
    assert results["set_nll_k"] == 8 and results["set_nll_sets"] == 5
    assert 0 < results["set_nll_5"] < 1000 and 0 < results["conditional_nll_1shot"] < 1000
    assert set_likelihoods(_tiny_model(), images, data.character, 8, 5, 0, False) == results  # seeded
    # No character with 5 drawings: the keys are there, with no value.
    few = synthetic_omniglot(characters=6, drawers=4)
    empty = set_likelihoods(_tiny_model(), few.tensors(), few.character, 8, 5, 0, False)
    assert set(empty) == set(results) and all(v is None for v in empty.values())


def test_style_effect_and_transfer_metrics_on_a_tiny_model():
    from omnivae.evaluate import style_effect_metrics, transfer_metrics
    from omnivae.registry import METRICS

    data = synthetic_omniglot(characters=6, drawers=4)  # 4 drawers: 3 styles per content
    result = style_effect_metrics(_tiny_model(), data, data.tensors(), seed=0)
    assert set(result) == {"style_effect", "style_effect_floor"} and result["style_effect"] >= 0
    assert result["style_effect_floor"] == 0.0  # the deconv decoder draws the same codes the same way
    sampled = style_effect_metrics(_tiny_model(decoder="pixelcnn", pixelcnn_layers=2, pixelcnn_channels=4), data,
                                   data.tensors(), seed=0)
    assert sampled["style_effect_floor"] > 0  # binary samples differ by chance
    two = synthetic_omniglot(characters=6, drawers=2)  # one style per content: no spread to measure
    assert style_effect_metrics(_tiny_model(), two, two.tensors(), seed=0) == {"style_effect": None,
                                                                                "style_effect_floor": None}
    digits = transfer_metrics(_tiny_model(), 28, seed=0, episodes=20)
    assert set(digits) <= set(METRICS) and len(digits) == 8
    for key in ("digits_10way_1shot", "digits_10way_5shot", "digits_pixel_10way_1shot", "digits_pixel_10way_5shot"):
        assert 0.0 <= digits[key] <= 1.0
    assert digits["digits_pixel_10way_5shot"] > 0.5  # raw digits are easy to tell apart


def test_five_shot_is_none_without_six_drawers():
    from omnivae.evaluate import _multi_shot

    data = synthetic_omniglot(characters=20, drawers=5, alphabets=1)
    codes = data.images.reshape(len(data), -1).astype(float)
    assert _multi_shot("pixel", codes, data, 20, 5, 10, seed=0) == {"pixel_20way_5shot": None,
                                                                     "pixel_20way_5shot_ci95": None}
    data = synthetic_omniglot(characters=20, drawers=6, alphabets=1)
    codes = np.eye(21)[data.character]  # codes that name the character
    assert _multi_shot("content", codes, data, 20, 5, 10, seed=0)["content_20way_5shot"] == 1.0


def test_figures_say_what_their_drawings_are(tmp_path, monkeypatch):
    """An autoregressive decoder's figures hold binary samples, and every grid's title says what its cells are."""
    from omnivae import evaluate, plots

    data = synthetic_omniglot(characters=12, drawers=4)
    seen = {}  # figure name -> (title, decoded cells)
    where = {"reconstruction_grid": (2, 1), "image_grid": (1, 0), "swap_grid": (3, 2), "interpolation_grid": (1, 0)}
    for name, (path_at, cells_at) in where.items():
        def wrapper(*args, _draw=getattr(plots, name), _path_at=path_at, _cells_at=cells_at, **kwargs):
            seen[args[_path_at].name] = (kwargs.get("title"), np.asarray(args[_cells_at]))
            return _draw(*args, **kwargs)

        monkeypatch.setattr(plots, name, wrapper)
    monkeypatch.setattr(plots, "embed_tsne", lambda codes, seed=0: np.zeros((len(codes), 2)))  # t-SNE is not the point
    for decoder, kind in (("pixelcnn", "binary samples, pixel by pixel"), ("deconv", "pixel probabilities")):
        model = _tiny_model(decoder=decoder, pixelcnn_layers=2, pixelcnn_channels=4)
        run = tmp_path / decoder
        run.mkdir()
        evaluate.make_figures(run, model, data, evaluate.encode_all(model, data.tensors()), seed=0, tsne_characters=4)
        assert {name: title for name, (title, _) in seen.items()} == {
            "reconstructions.png": f"reconstructions: {kind}", "samples.png": f"prior samples: {kind}",
            "swap.png": f"content/style swap: {kind}", "one_shot.png": f"one-shot: a drawing, then {kind}",
            "interpolation.png": f"interpolations: {kind}"}
        for name in ("reconstructions.png", "samples.png", "swap.png", "interpolation.png"):
            binary = set(np.unique(seen[name][1]).tolist()) <= {0.0, 1.0}
            assert binary == (decoder == "pixelcnn"), name


def test_proposal_blur_scales_with_the_image_and_is_off_for_binary_encoders():
    from omnivae.config import ConfigError, make_config
    from omnivae.evaluate import proposal_blur

    assert proposal_blur(make_config("default")) == 0.7
    assert proposal_blur(make_config("default", dict(image_size=64))) == pytest.approx(1.6)
    assert proposal_blur(make_config("default", dict(nll_blur=0.0))) == 0.0
    assert proposal_blur(make_config("default", dict(binarize=True))) == 0.0  # its encoder reads binary drawings
    assert proposal_blur(make_config("default", dict(binarize=True, binarize_encoder=False))) == 0.7
    with pytest.raises(ConfigError, match="nll_blur must be >= 0"):
        make_config("default", dict(nll_blur=-1.0))


def test_evaluate_checks_the_blur_it_is_given(tmp_path):
    from omnivae import rundir
    from omnivae.config import ConfigError, make_config
    from omnivae.evaluate import evaluate

    rundir.write_config(tmp_path, make_config("quick"))
    for bad in (-0.5, float("inf")):
        with pytest.raises(ConfigError, match="nll_blur must be"):
            evaluate(tmp_path, nll_blur=bad, progress=False)


def test_view_metrics_score_the_turned_views_on_the_content_episodes(monkeypatch):
    from omnivae import metrics
    from omnivae.evaluate import code_metrics, encode_all, view_metrics
    from omnivae.registry import METRICS

    data = synthetic_omniglot(characters=24, drawers=8, alphabets=1)
    model, images = _tiny_model(), data.tensors()
    assert view_metrics(model, data, images, kinds=1, seed=0, episodes=20) == {}  # trained without turns
    results = view_metrics(model, data, images, kinds=4, seed=0, episodes=20)
    views = {key for key in METRICS if key.startswith("content_views_")} | {"view_kinds"}
    assert set(results) == views and results["view_kinds"] == 4
    for key in views - {"view_kinds"}:
        assert results[key] is None or 0 <= results[key] <= 1, key
    assert view_metrics(model, data, images, kinds=4, seed=0, episodes=20) == results  # seeded
    # Read in one view, the codes are the content means scaled to length 1: the episodes (cosine)
    # are the content means' own, so their accuracies are exactly the same.
    plain = code_metrics(encode_all(model, images), data, 0, 20)
    one_view = metrics.view_codes
    monkeypatch.setattr(metrics, "view_codes", lambda model, images, kinds, content: one_view(model, images, 1))
    read = view_metrics(model, data, images, kinds=4, seed=0, episodes=20)
    for key in ("20way_1shot", "5way_1shot", "20way_5shot", "20way_1shot_ci95"):
        assert read[f"content_views_{key}"] == plain[f"content_{key}"], key
