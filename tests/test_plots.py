"""Each plot function writes a readable PNG; image grids put ink where the input has it."""
import numpy as np
import pytest
from PIL import Image

from omnivae import plots


def read_png(path):
    """(H, W, 3) uint8 pixels of a PNG, checked to be a real, non-empty, non-uniform image."""
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 50 and pixels.shape[1] >= 50
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, "image is one colour"
    return pixels


def strokes(n, size=28, seed=0):
    """n images of random strokes in [0, 1]."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size)) > 0.85).astype(np.float32)


def no_temporaries(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_image_grid_draws_dark_ink_on_white_paper(tmp_path):
    images = np.stack([np.ones((28, 28)), np.zeros((28, 28))])[:, None]  # (2, 1, 28, 28): all ink, blank
    path = plots.image_grid(images, tmp_path / "grid.png", ncols=2)
    assert path == tmp_path / "grid.png"
    pixels = read_png(path).astype(int)
    height, width, _ = pixels.shape
    assert width >= 2 * plots.MIN_CELL_PX and height >= plots.MIN_CELL_PX  # cells are at least 56 px
    ink_centre = pixels[height // 2, width // 4]  # the margins are symmetric, so these are the cell centres
    paper_centre = pixels[height // 2, 3 * width // 4]
    assert ink_centre.max() < 80, ink_centre
    assert paper_centre.min() > 240, paper_centre
    # Drawn pixel for pixel, not resampled: only paper, ink and the gap colour, no blurred edges.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) <= 3
    assert no_temporaries(tmp_path)


def test_image_grid_accepts_titles_and_labels(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.float32)
    images[:, :, :14] = 1.0  # left half ink
    path = plots.image_grid(images, tmp_path / "g.png", ncols=3, titles=["a", "b", "c"],
                            row_labels=["row"], col_labels=["x", "y", "z"])
    plain = read_png(plots.image_grid(images, tmp_path / "plain.png", ncols=3))
    labelled = read_png(path)
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]  # room for the text


def test_reconstruction_swap_and_interpolation_grids(tmp_path):
    images = strokes(10)
    read_png(plots.reconstruction_grid(images, images * 0.5, tmp_path / "recon.png", ncols=4))
    read_png(plots.swap_grid(images[:3], images[3:7], strokes(12).reshape(3, 4, 28, 28), tmp_path / "swap.png"))
    read_png(plots.interpolation_grid(strokes(12).reshape(2, 6, 1, 28, 28), tmp_path / "interp.png",
                                      row_labels=["content", "style"]))
    with pytest.raises(ValueError):
        plots.swap_grid(images[:2], images[3:7], strokes(12).reshape(3, 4, 28, 28), tmp_path / "bad.png")
    plain = read_png(tmp_path / "swap.png")
    labelled = read_png(plots.swap_grid(images[:3], images[3:7], strokes(12).reshape(3, 4, 28, 28),
                                        tmp_path / "hands.png", style_labels=["thick", "thin", "large", "small"]))
    assert labelled.shape[0] > plain.shape[0]  # a line of labels above the style images
    with pytest.raises(ValueError, match="4 style images"):
        plots.swap_grid(images[:3], images[3:7], strokes(12).reshape(3, 4, 28, 28), tmp_path / "bad.png",
                        style_labels=["thick"])
    assert no_temporaries(tmp_path)


def test_reconstruction_grid_layout(tmp_path):
    inputs, outputs = np.ones((4, 28, 28)), np.zeros((4, 28, 28))
    pixels = read_png(plots.reconstruction_grid(inputs, outputs, tmp_path / "r.png", ncols=4)).astype(int)
    column = pixels[:, -pixels.shape[1] // 8]  # through the middle of the last column of cells
    dark = (column.max(1) < 80).nonzero()[0]
    white = (column.min(1) > 240).nonzero()[0]
    assert len(dark) >= plots.MIN_CELL_PX and len(white) >= plots.MIN_CELL_PX
    assert dark.mean() < white.mean()  # inputs (all ink) above outputs (blank)


@pytest.mark.parametrize("classes, legend", [(5, True), (20, True), (300, False)])
def test_tsne_plot(tmp_path, classes, legend):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(600, 2))
    labels = rng.integers(0, classes, 600)
    names = {i: f"character {i}" for i in range(classes)}
    read_png(plots.tsne_plot(points, labels, tmp_path / "t.png", "content codes", label_names=names, legend=legend))


def test_embed_tsne_is_finite_and_deterministic():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(0, 1, (60, 8)), rng.normal(6, 1, (60, 8))])  # two clusters
    first, second = plots.embed_tsne(codes, seed=3), plots.embed_tsne(codes, seed=3)
    assert first.shape == (120, 2) and np.isfinite(first).all()
    np.testing.assert_allclose(first, second)
    # The two clusters stay apart: each point's nearest neighbour is in its own cluster.
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(120) * 1e9
    nearest = distances.argmin(1)
    assert ((nearest < 60) == (np.arange(120) < 60)).mean() > 0.95


@pytest.mark.parametrize("n", [0, 1, 3, 10])
def test_embed_tsne_small_inputs(n):
    points = plots.embed_tsne(np.random.default_rng(0).normal(size=(n, 5)))
    assert points.shape == (n, 2) and np.isfinite(points).all()


def test_training_curves(tmp_path):
    records = [dict(epoch=e, seconds=2.0, recon=100.0 / e, val_recon=110.0 / e, kl_content=1e3 / e**4,
                    contrastive=2.0 - 0.1 * e, disc=0.69) for e in range(1, 6)]
    read_png(plots.training_curves(records, tmp_path / "curves.png"))
    read_png(plots.training_curves([], tmp_path / "empty.png"))  # still a figure, saying there is nothing
    assert no_temporaries(tmp_path)


def test_bar_chart(tmp_path):
    read_png(plots.bar_chart(["a", "b", "c"], [0.5, None, 0.7], tmp_path / "bar.png", title="accuracy",
                             reference=0.3, reference_label="raw pixels"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with plots.atomic_write(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_importing_plots_leaves_pyplot_alone():
    import subprocess
    import sys

    code = "import sys, omnivae.plots; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_grids_take_a_title_line(tmp_path):
    images = strokes(6)
    plain = [read_png(plots.reconstruction_grid(images, images, tmp_path / "r.png", ncols=3)),
             read_png(plots.swap_grid(images[:2], images[2:5], strokes(6).reshape(2, 3, 28, 28), tmp_path / "s.png")),
             read_png(plots.interpolation_grid(strokes(6).reshape(2, 3, 28, 28), tmp_path / "i.png"))]
    titled = [read_png(plots.reconstruction_grid(images, images, tmp_path / "r.png", ncols=3, output_label="sample",
                                                 title="reconstructions: binary samples")),
              read_png(plots.swap_grid(images[:2], images[2:5], strokes(6).reshape(2, 3, 28, 28), tmp_path / "s.png",
                                       title="swap")),
              read_png(plots.interpolation_grid(strokes(6).reshape(2, 3, 28, 28), tmp_path / "i.png", title="walk"))]
    for a, b in zip(plain, titled):
        assert b.shape[0] > a.shape[0] and b.shape[1] == a.shape[1]  # a line of text above the same grid
        assert (b[: b.shape[0] - a.shape[0]] < 128).any()  # the title's dark text
