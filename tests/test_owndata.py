"""Training, evaluating and reporting on an image folder of your own (data.load_folder)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from omnivae import cli
from omnivae import data as omni_data
from omnivae.demo import Demo

MODES = ("L", "RGB", "RGBA", "1", "P", "dark")  # "dark": light ink on a black background


def glyph(template: np.ndarray, rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    """One drawing of a character: its strokes (S, P, 2) in [0, 1], jittered, drawn in `mode`."""
    strokes = template + rng.normal(0, 0.03, template.shape)
    scale = min(width, height) * 0.8
    offset = ((width - scale) / 2, (height - scale) / 2)
    paper, ink = {"dark": (0, 255), "RGB": ((250, 245, 235), (20, 30, 120))}.get(mode, (255, 0))
    image = Image.new("RGB" if mode == "RGB" else "L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line([(offset[0] + x * scale, offset[1] + y * scale) for x, y in stroke], fill=ink,
                  width=max(2, width // 20))
    if mode == "RGBA":  # ink on a transparent background
        alpha = Image.eval(image, lambda v: 255 - v)
        image = Image.merge("RGBA", (image, image, image, alpha))
    elif mode in ("1", "P"):
        image = image.convert(mode)
    return image


def make_glyph_folder(root: Path, groups: int = 2, classes: int = 6, images: int = 6, seed: int = 0) -> Path:
    """root/<group>/<class>/<n>.png (groups=0: root/<class>/<n>.png): random strokes per class,
    drawn in every mode and at several sizes, some of them not square."""
    rng = np.random.default_rng(seed)
    for g in range(max(groups, 1)):
        for c in range(classes):
            folder = root / f"group{g}" / f"class{c}" if groups else root / f"class{g * classes + c}"
            folder.mkdir(parents=True)
            template = rng.random((3, 4, 2))  # 3 strokes of 4 points
            for n in range(images):
                width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
                glyph(template, rng, MODES[n % len(MODES)], width, height).save(folder / f"{n}.png")
    return root


@pytest.fixture
def glyphs(tmp_path):
    return make_glyph_folder(tmp_path / "glyphs")


def test_any_image_becomes_bright_ink_on_black_the_same_way(tmp_path):
    # One glyph, 60 px wide and 30 px high, drawn in three ways.
    ink = np.zeros((30, 60), dtype=bool)
    ink[10:20, 5:55] = True
    pictures = {
        "dark_on_light.png": Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L"),
        "light_on_dark.png": Image.fromarray(np.where(ink, 255, 0).astype(np.uint8), "L").convert("RGB"),
        "transparent.png": Image.fromarray(np.stack([np.zeros_like(ink, np.uint8), np.where(ink, 255, 0)], -1)
                                           .astype(np.uint8), "LA"),
    }
    decoded = []
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
        decoded.append(omni_data._decode_any((tmp_path / name).read_bytes(), 28, name))
    for array in decoded[1:]:
        np.testing.assert_array_equal(array, decoded[0])
    # Grey paper becomes 0 and full ink stays 255.
    Image.fromarray(np.where(ink, 0, 200).astype(np.uint8), "L").save(tmp_path / "grey.png")
    np.testing.assert_array_equal(omni_data._decode_any((tmp_path / "grey.png").read_bytes(), 28, "grey"), decoded[0])
    # A huge side is refused on the header.
    Image.new("L", (4097, 2), 255).save(tmp_path / "wide.png")
    with pytest.raises(omni_data.DataError, match="wide.png is 4097x2; images over 4096 pixels a side are refused"):
        omni_data._decode_any((tmp_path / "wide.png").read_bytes(), 28, "wide.png")
    # Padded to 60x60 (15 rows of paper above and below), then box-filtered to 28x28: ink fills
    # rows 25..35 of 60, i.e. about rows 11.7..16.3 of 28, and columns 5..55 of 60.
    rows = decoded[0].astype(float).mean(1)
    assert rows[:11].max() == 0 and rows[17:].max() == 0 and rows[13] > 200
    assert decoded[0][14, 3:25].min() == 255 and decoded[0][14, 0] < 128


def test_load_folder_reads_both_layouts_and_caches(tmp_path, glyphs):
    data = omni_data.load_folder(glyphs, 28, tmp_path / "cache", progress=False)
    assert data.images.shape == (2 * 6 * 6, 28, 28) and data.images.dtype == np.uint8
    assert data.alphabet_names == ["group0", "group1"]
    np.testing.assert_array_equal(data.character, np.repeat(np.arange(1, 13), 6))
    np.testing.assert_array_equal(data.alphabet, np.repeat([0, 1], 36))
    assert not data.has_drawers() and (data.drawer == 0).all()
    # Ink is bright in every mode: the border (paper) is dark, and every image holds ink.
    assert data.images[:, 0, :].mean() < 1 and (data.images.reshape(len(data), -1).max(1) > 128).all()
    cached = list((tmp_path / "cache").glob("folder_*_28_*.npz"))
    assert len(cached) == 1
    again = omni_data.load_folder(glyphs, 28, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again.images, data.images)

    flat = omni_data.load_folder(make_glyph_folder(tmp_path / "flat", groups=0, classes=3, images=2), 32,
                                 tmp_path / "cache", progress=False)
    assert flat.alphabet_names == ["flat"] and len(flat) == 6 and flat.images.shape[1:] == (32, 32)
    assert omni_data.is_image_folder(glyphs) and not omni_data.is_image_folder(tmp_path / "cache")


def test_held_out_classes_are_a_fixed_draw():
    data = omni_data.Omniglot(np.zeros((40, 2, 2), np.uint8), np.repeat(np.arange(1, 11), 4).astype(np.int16),
                              np.zeros(40, np.int8), np.zeros(40, np.int16), ["a"])
    rest, held = omni_data.split_by_class(data, 0.3)
    assert len(np.unique(held.character)) == 3 and len(rest) + len(held) == 40
    assert not set(held.character) & set(rest.character)
    np.testing.assert_array_equal(omni_data.split_by_class(data, 0.3)[1].character, held.character)
    assert len(np.unique(omni_data.split_by_class(data, 0.01)[1].character)) == 1  # at least one
    assert len(np.unique(omni_data.split_by_class(data, 0.99)[0].character)) == 1  # one left to train on


def test_train_evaluate_report_and_demo_on_an_image_folder(tmp_path, glyphs, capsys):
    run = tmp_path / "run"
    common = ["--data-dir", str(glyphs), "--cache-dir", str(tmp_path / "cache")]
    small = ["--set", "epochs=1", "--set", "channels=4", "--set", "hidden=16", "--set", "content_dim=8",
             "--set", "style_dim=4", "--set", "groups=3", "--set", "group_size=2", "--set", "test_classes=0.5"]
    evaluate = ["--nll-k", "5", "--nll-images", "10", "--episodes", "20", "--swap-pairs", "20"]
    assert cli.main(["--quiet", "run", "--preset", "quick", "--out", str(run), *small, *evaluate, *common]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == "folder"

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 6 * 6 and metrics["split_description"].startswith("6 held-out classes")
    for key in ("kl_total", "content_kmeans_accuracy", "content_nmi", "style_nmi", "pixel_nmi", "content_5way_1shot",
                "pixel_5way_1shot", "nll_iwae", "elbo_nll", "prior_mmd2_content", "prior_mmd2_style"):
        assert key in metrics, key
    for key, value in metrics.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    # Six held-out classes hold no 20-way episode; the data records no drawers, so neither the
    # drawer reference nor the swap judge (trained on held-out drawers) applies.
    for key in ("content_20way_1shot", "style_20way_1shot", "drawer_code_20way_1shot", "swap_consistency",
                "classifier_accuracy"):
        assert key not in metrics, key
    for figure in ("reconstructions", "samples", "swap", "one_shot", "tsne_content_characters", "training_curves"):
        assert (run / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    html = (run / "report.html").read_text()
    assert 'id="metrics"' in html and "content_5way_1shot" in html and "on an image folder" in html

    # The log's validation numbers come from the held-out classes.
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[-1]["val_recon"])

    # The demo shows the held-out classes, every drawing of each numbered for the picker.
    demo = Demo.build(run, glyphs, tmp_path / "cache")
    assert demo.info()["drawers"] == [1, 2, 3, 4, 5, 6] and demo.info()["gallery_size"] == 6
    character = next(c for a in demo.info()["alphabets"] for c in a["characters"])
    answer = demo.answer_pick(character, 2)
    assert len(answer["neighbours"]) == 5 and answer["picked"]["drawer"] == 2

    # Scoring the run needs its folder again, and it has one held-out split.
    capsys.readouterr()
    assert cli.main(["--quiet", "evaluate", str(run), "--no-figures", *evaluate]) == 1
    assert "no image folder given" in capsys.readouterr().err
    assert cli.main(["--quiet", "evaluate", str(run), "--split", "validation", *evaluate, *common]) == 2
    assert "held-out classes" in capsys.readouterr().err


def _error(capsys, folder: Path, tmp_path: Path, *extra: str) -> str:
    """The one error line of `omnivae train` on folder (exit status 1)."""
    capsys.readouterr()
    code = cli.main(["--quiet", "train", "--preset", "quick", "--out", str(tmp_path / "run"), "--data-dir", str(folder),
                     "--cache-dir", str(tmp_path / "cache"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("omnivae: error: "), err
    return err.strip()


def test_a_single_class_is_refused(tmp_path, capsys):
    folder = make_glyph_folder(tmp_path / "one", groups=0, classes=1, images=4)
    assert _error(capsys, folder, tmp_path).endswith("holds 1 class; it needs at least 2 (one sub-folder of images "
                                                     "per class)")


def test_a_class_smaller_than_the_group_is_refused(tmp_path, capsys):
    folder = make_glyph_folder(tmp_path / "small", groups=0, classes=3, images=4)
    (folder / "class1" / "3.png").unlink()
    err = _error(capsys, folder, tmp_path, "--set", "group_size=4")
    assert err == (f"omnivae: error: class class1 in {folder} has 3 images; every class needs at least 4 "
                   "(the group size)")


def test_an_unreadable_image_is_named(tmp_path, capsys):
    folder = make_glyph_folder(tmp_path / "broken", groups=0, classes=2, images=4)
    (folder / "class0" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    err = _error(capsys, folder, tmp_path, "--set", "groups=2", "--set", "group_size=2")
    assert str(folder / "class0" / "9.png") in err and "PNG" in err


def test_mixed_layouts_are_refused(tmp_path, capsys):
    folder = make_glyph_folder(tmp_path / "mixed", groups=2, classes=2, images=2)
    stray = folder / "loose"
    stray.mkdir()
    (folder / "group0" / "class0" / "0.png").rename(stray / "0.png")
    err = _error(capsys, folder, tmp_path)
    assert err == (f"omnivae: error: {folder} mixes two layouts: loose/0.png is <class>/<image> but "
                   "group0/class0/1.png is <group>/<class>/<image>; use one of them for every image")


def test_other_files_and_empty_folders_are_refused(tmp_path, capsys):
    folder = make_glyph_folder(tmp_path / "jpeg", groups=0, classes=2, images=2)
    (folder / "README.txt").write_text("a note beside the classes is fine")
    (folder / "class0" / "2.jpg").write_bytes(b"jpeg")
    assert _error(capsys, folder, tmp_path).endswith(f"{folder / 'class0' / '2.jpg'} is not a PNG; an image folder "
                                                     "holds PNG images only (<class>/<image>.png or "
                                                     "<group>/<class>/<image>.png)")
    empty = tmp_path / "empty"
    (empty / "class0").mkdir(parents=True)
    assert _error(capsys, empty, tmp_path).endswith(f"no PNG images found in {empty}: expected <class>/<image>.png "
                                                    "or <group>/<class>/<image>.png")


def test_config_checks_the_held_out_share_and_val_holdout():
    from omnivae.config import ConfigError, make_config

    for value in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="test_classes must be between 0 and 1"):
            make_config("quick", [f"test_classes={value}"])
    with pytest.raises(ConfigError, match="val_holdout holds out Omniglot alphabets"):
        make_config("quick", ["data=folder", "val_holdout=true"])
    with pytest.raises(ConfigError, match="data must be one of omniglot, folder"):
        make_config("quick", ["data=zips"])
