"""Figures: each function takes arrays and a path, draws one PNG there and returns the path.

Drawing uses matplotlib's object API (`Figure` + the Agg canvas) and never pyplot, so importing
or calling these functions leaves the user's interactive backend and global figure state alone.
Every PNG is written through `rundir.atomic_write` (a temporary file in the target folder, renamed
into place), so a crash never leaves half a figure. `embed_tsne` is the one helper that computes: it turns codes
into the 2-D points that `tsne_plot` draws.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .rundir import atomic_write

# Colours of the image grids, RGB in [0, 1]: characters are dark ink on white paper.
PAPER = np.array([1.0, 1.0, 1.0])
INK = np.array([0.06, 0.07, 0.20])  # a blue-black, like a pen
GAP = np.array([0.86, 0.87, 0.89])  # between cells and around blank cells
DPI = 100  # figure pixels per inch; image grids are laid out in pixels, so this only sets text size
MIN_CELL_PX = 56  # every image cell is drawn at least this many pixels wide, in whole pixels per image pixel
FONT_PT = 9  # text size in the image grids
_CHAR_PX = 0.62 * FONT_PT * DPI / 72  # rough width of one character of text, for margins
_LINE_PX = int(round(1.6 * FONT_PT * DPI / 72))  # height of one line of text


def _new_figure(width_in: float, height_in: float):
    """A matplotlib Figure attached to an Agg canvas: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return path


# ----------------------------------------------------------------------------- image grids


def _as_images(images, dims: int) -> np.ndarray:
    """Float array of `dims` dimensions (..., S, S), a singleton channel axis dropped, clipped to [0, 1]."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == dims + 1 and array.shape[-3] == 1:
        array = array[..., 0, :, :]
    if array.ndim != dims:
        raise ValueError(f"expected images of {dims} dimensions (... S, S), got shape {array.shape}")
    return np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0)


def _draw_cells(cells, path, pad: int = 2, titles=None, row_labels=None, col_labels=None,
                row_gaps=(), col_gaps=(), col_header: str | None = None, row_header: str | None = None,
                title: str | None = None) -> Path:
    """Draw a (R, C) table of images into a PNG, pixel for pixel (no resampling blur).

    cells: (R, C, S, S) ink in [0, 1]; a cell that is all NaN is left blank. titles: (R, C) strings
    shown above cells, or None. row_gaps / col_gaps: indices after which an extra gap separates
    rows / columns. The whole figure is one RGB canvas placed with `figimage`, with text on top.
    """
    cells = np.asarray(cells, dtype=np.float32)
    rows, cols, size = cells.shape[0], cells.shape[1], cells.shape[-1]
    scale = max(1, math.ceil(MIN_CELL_PX / size))  # screen pixels per image pixel
    cell = size * scale
    gap = max(1, pad) * scale
    wide_gap = 3 * gap

    # Layout in screen pixels, top-down.
    left = gap
    if row_labels is not None:
        left += int(max(len(str(s)) for s in row_labels) * _CHAR_PX) + 2 * gap
    if row_header:
        left += _LINE_PX + gap
    top = gap + (_LINE_PX + gap if title else 0)
    top += (_LINE_PX if col_labels is not None else 0) + (_LINE_PX if col_header else 0)
    title_band = _LINE_PX if titles is not None else 0
    xs, x = [], left
    for c in range(cols):
        xs.append(x)
        x += cell + (wide_gap if c in col_gaps else gap)
    ys, y = [], top
    for r in range(rows):
        ys.append(y + title_band)
        y += title_band + cell + (wide_gap if r in row_gaps else gap)
    width, height = x, y

    canvas = np.ones((height, width, 3)) * PAPER
    canvas[top - gap: height, left - gap: width] = GAP
    for r in range(rows):
        for c in range(cols):
            ink = cells[r, c]
            if np.isnan(ink).all():
                continue
            ink = np.clip(np.nan_to_num(ink), 0, 1).repeat(scale, 0).repeat(scale, 1)[..., None]  # (cell, cell, 1)
            canvas[ys[r]: ys[r] + cell, xs[c]: xs[c] + cell] = PAPER * (1 - ink) + INK * ink

    fig = _new_figure(width / DPI, height / DPI)
    fig.figimage(canvas, 0, 0, origin="upper", resize=False)

    def text(px, py, s, **kw):  # pixel coordinates from the top-left corner
        kw.setdefault("fontsize", FONT_PT)
        fig.text(px / width, 1 - py / height, str(s), **kw)

    if title:
        text(width / 2, gap, title, ha="center", va="top", fontweight="bold")
    if col_header:
        first = min(c for c in range(cols) if c > max(col_gaps, default=-1)) if col_gaps else 0
        centre = (xs[first] + xs[-1] + cell) / 2
        text(centre, top - (_LINE_PX if col_labels is not None else 0) - 2, col_header, ha="center", va="bottom")
    if col_labels is not None:
        for c, label in enumerate(col_labels[:cols]):
            text(xs[c] + cell / 2, top - 2, label, ha="center", va="bottom")
    if row_labels is not None:
        for r, label in enumerate(row_labels[:rows]):
            text(left - 2 * gap, ys[r] + cell / 2, label, ha="right", va="center")
    if row_header:
        first = min(r for r in range(rows) if r > max(row_gaps, default=-1)) if row_gaps else 0
        centre = (ys[first] + ys[-1] + cell) / 2
        text(gap + _LINE_PX / 2, centre, row_header, ha="center", va="center", rotation=90)
    if titles is not None:
        for r in range(rows):
            for c in range(cols):
                if titles[r][c]:
                    text(xs[c] + cell / 2, ys[r] - 1, titles[r][c], ha="center", va="bottom", fontsize=FONT_PT - 1)
    return _save(fig, path)


def image_grid(images, path, ncols=None, pad=2, titles=None, row_labels=None, col_labels=None, title=None) -> Path:
    """Draw images as a grid of dark ink on white paper, crisp (each image pixel a block of pixels).

    images: (N, S, S) or (N, 1, S, S), ink in [0, 1] (1 = ink). ncols: images per row (default
    about the square root of N). pad: gap between cells in image pixels. titles: N strings drawn
    above the cells; row_labels / col_labels: strings to the left of rows / above columns.
    """
    images = _as_images(images, 3)  # (N, S, S)
    n, size = len(images), images.shape[-1]
    ncols = int(ncols or max(1, math.ceil(math.sqrt(n))))
    nrows = max(1, math.ceil(n / ncols))
    cells = np.full((nrows * ncols, size, size), np.nan, dtype=np.float32)
    cells[:n] = images
    grid_titles = None
    if titles is not None:
        flat = [str(t) for t in titles] + [""] * (nrows * ncols - len(titles))
        grid_titles = [flat[r * ncols:(r + 1) * ncols] for r in range(nrows)]
    return _draw_cells(cells.reshape(nrows, ncols, size, size), path, pad=pad, titles=grid_titles,
                       row_labels=row_labels, col_labels=col_labels, title=title)


def reconstruction_grid(inputs, outputs, path, ncols=16, output_label="output", title=None) -> Path:
    """Inputs above their reconstructions: rows alternate "input" / `output_label`, ncols images per row.

    inputs, outputs: (N, S, S) or (N, 1, S, S) in [0, 1]; outputs are probabilities (or means), or
    samples. title: a line above the grid, or None.
    """
    inputs, outputs = _as_images(inputs, 3), _as_images(outputs, 3)  # (N, S, S)
    if inputs.shape != outputs.shape:
        raise ValueError(f"inputs {inputs.shape} and outputs {outputs.shape} differ in shape")
    n, size = len(inputs), inputs.shape[-1]
    ncols = max(1, min(int(ncols), n))
    pairs = max(1, math.ceil(n / ncols))
    cells = np.full((2 * pairs, ncols, size, size), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        cells[2 * r, c], cells[2 * r + 1, c] = inputs[i], outputs[i]
    labels = ["input", output_label] * pairs
    return _draw_cells(cells, path, row_labels=labels, row_gaps=range(1, 2 * pairs - 1, 2), title=title)


def swap_grid(content_images, style_images, swapped, path, title=None, style_labels=None) -> Path:
    """Content/style swaps: the top row holds the style images, the left column the content images,
    and cell (r, c) the decoding of content r's content code with style c's style code.

    content_images: (R, S, S); style_images: (C, S, S); swapped: (R, C, S, S) (channel axes allowed).
    title: a line above the grid, or None; style_labels: C words above the style columns, or None.
    """
    content, style = _as_images(content_images, 3), _as_images(style_images, 3)
    swapped = _as_images(swapped, 4)  # (R, C, S, S)
    rows, cols, size = swapped.shape[0], swapped.shape[1], swapped.shape[-1]
    if len(content) != rows or len(style) != cols:
        raise ValueError(f"swapped {swapped.shape[:2]} does not match {len(content)} content and {len(style)} style images")
    cells = np.full((rows + 1, cols + 1, size, size), np.nan, dtype=np.float32)
    cells[0, 1:] = style
    cells[1:, 0] = content
    cells[1:, 1:] = swapped
    if style_labels is not None and len(style_labels) != cols:
        raise ValueError(f"{len(style_labels)} style labels for {cols} style images")
    labels = None if style_labels is None else ["", *style_labels]
    return _draw_cells(cells, path, row_gaps=(0,), col_gaps=(0,), col_header="style \u2192", row_header="content",
                       title=title, col_labels=labels)


def interpolation_grid(rows, path, row_labels=None, title=None) -> Path:
    """Rows of interpolations: rows (R, T, S, S), each row T steps from one end to the other; title
    a line above the grid, or None."""
    rows = _as_images(rows, 4)  # (R, T, S, S)
    return _draw_cells(rows, path, row_labels=row_labels, title=title)


# ----------------------------------------------------------------------------- t-SNE


def embed_tsne(codes, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding of codes (N, D) -> (N, 2), deterministic for a seed.

    t-SNE as in "Visualizing Data using t-SNE" (JMLR 2008), computed with openTSNE: PCA initialisation,
    random_state=seed, Barnes-Hut gradients below 10k points and FFT above, two threads (one
    below 5k points, where starting threads costs more than it saves). Perplexity is 30,
    lowered to about N / 3 for small N; with N < 4 there is nothing to embed and the first two
    principal components are returned.
    """
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.float64)
    n = len(codes)
    if n == 0:
        return np.zeros((0, 2))
    codes = codes.reshape(n, -1)  # (N, D)
    if n < 4:
        centred = codes - codes.mean(0, keepdims=True)
        out = np.zeros((n, 2))
        if n > 1:
            u, s, _ = np.linalg.svd(centred, full_matrices=False)  # (N, k), (k,)
            k = min(2, len(s))
            out[:, :k] = u[:, :k] * s[:k]
        return out
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    import openTSNE
    # Below ~10k points Barnes-Hut takes a fraction of a second where FFT takes many seconds.
    method = "bh" if n < 10_000 else "fft"
    jobs = 1 if n < 5_000 else 2
    embedding = openTSNE.TSNE(n_components=2, perplexity=perplexity, initialization="pca", n_jobs=jobs,
                              negative_gradient_method=method, random_state=seed, verbose=False).fit(codes)
    return np.asarray(embedding, dtype=np.float64)


LEGEND_MAX = 20  # up to this many labels get distinct colours and a legend


def tsne_plot(points, labels, path, title, label_names=None, legend=True) -> Path:
    """Scatter 2-D points coloured by label.

    points: (N, 2); labels: (N,) ints or strings. label_names maps a label to the name shown in
    the legend (dict, or list indexed by an int label). Up to 20 labels get a categorical palette
    and a legend; more (e.g. 20 alphabets with legend=False, or 659 characters) get small points
    coloured around a cyclic colour map in a scrambled order, so neighbouring labels differ, and
    no legend.
    """
    from matplotlib import colormaps

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels)
    if len(labels) != len(points):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    classes, index = np.unique(labels, return_inverse=True)
    k = len(classes)
    few = k <= LEGEND_MAX
    if few:
        palette = colormaps["tab10" if k <= 10 else "tab20"]
        colours = palette(np.arange(k) % palette.N)
    else:
        golden = (np.sqrt(5) - 1) / 2  # a step of the golden ratio spreads consecutive labels around the wheel
        colours = colormaps["hsv"]((np.arange(k) * golden) % 1.0)
    show_legend = legend and few
    fig = _new_figure(8.6 if show_legend else 7.0, 6.4)
    ax = fig.add_axes([0.04, 0.04, 0.68 if show_legend else 0.92, 0.86])
    n = len(points)
    marker = (18 if n < 2000 else 8) if few else (6 if n < 5000 else 3)
    if show_legend:
        for i, name in enumerate(classes):
            mask = index == i
            ax.scatter(points[mask, 0], points[mask, 1], s=marker, color=colours[i], linewidths=0,
                       label=_label_name(name, label_names), rasterized=True)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  markerscale=1.5, handletextpad=0.2, borderaxespad=0.0)
    else:
        ax.scatter(points[:, 0], points[:, 1], s=marker, c=colours[index], linewidths=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle(str(title), fontsize=11, x=0.04, ha="left", y=0.985)
    ax.set_title(f"{n} points, {k} labels", fontsize=8, loc="left", color="0.35")
    return _save(fig, path)


def _label_name(label, label_names) -> str:
    if label_names is None:
        return str(label)
    try:
        return str(label_names[label])
    except (KeyError, IndexError, TypeError):
        return str(label)


# ----------------------------------------------------------------------------- curves and bars

_NOT_CURVES = ("epoch", "step", "seconds")  # training-log keys that are not loss terms


def training_curves(records, path) -> Path:
    """One small panel per logged term against epoch, from training-log records (a list of dicts).

    A term and its validation twin (`recon` and `val_recon`) share a panel. The y axis is log
    scaled when every value is positive and they span more than two decades.
    """
    records = [r for r in records if isinstance(r, dict)]
    series: dict[str, dict[str, tuple[list, list]]] = {}  # term -> {"train"|"val": (xs, ys)}
    for i, record in enumerate(records):
        x = record.get("epoch", i + 1)
        for key, value in record.items():
            if key in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            split, term = ("val", key[4:]) if key.startswith("val_") else ("train", key)
            xs, ys = series.setdefault(term, {}).setdefault(split, ([], []))
            xs.append(x)
            ys.append(float(value))
    terms = list(series)
    ncols = min(4, max(1, len(terms)))
    nrows = max(1, math.ceil(len(terms) / ncols))
    fig = _new_figure(3.2 * ncols, 2.5 * nrows + 0.3)
    if not terms:
        fig.text(0.5, 0.5, "no numeric records in the training log", ha="center", va="center")
        return _save(fig, path)
    styles = {"train": dict(color="tab:blue", marker="o"), "val": dict(color="tab:orange", marker="s")}
    for i, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = []
        for split, (xs, ys) in series[term].items():
            ax.plot(xs, ys, label=split, markersize=3 if len(xs) < 40 else 0, linewidth=1.3, **styles[split])
            values.extend(ys)
        values = np.asarray(values)
        if (values > 0).all() and values.max() / values.min() > 100:
            ax.set_yscale("log")
        ax.set_title(term, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series[term]) > 1:
            ax.legend(fontsize=7, frameon=False)
        if i >= len(terms) - ncols:
            ax.set_xlabel("epoch", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def bar_chart(names, values, path, title="", ylabel="", reference: float | None = None,
              reference_label: str = "") -> Path:
    """One bar per name (e.g. one per run) with its value written on top; NaN or None draws no bar.

    reference: an optional horizontal line (e.g. the raw-pixel baseline) labelled reference_label.
    """
    names = [str(n) for n in names]
    values = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    fig = _new_figure(max(4.0, 0.9 * len(names) + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(names))
    shown = np.nan_to_num(values, nan=0.0)
    bars = ax.bar(positions, shown, color="tab:blue", width=0.65)
    for bar, value in zip(bars, values):
        text = "-" if np.isnan(value) else f"{value:.3g}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1, label=reference_label or None)
        if reference_label:
            ax.legend(fontsize=7, frameon=False)
    ax.set_xticks(positions)
    ax.set_xticklabels(names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center", fontsize=8)
    ax.set_title(str(title), fontsize=10)
    ax.set_ylabel(str(ylabel), fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)
    fig.tight_layout()
    return _save(fig, path)
