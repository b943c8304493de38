"""How the content means are read for clustering and few-shot: raw, on the unit sphere, centred first.

    python bench/readout.py RUN_DIR [RUN_DIR ...] [--split validation] [--data-dir D] [--cache-dir C]
                                    [--episodes 1000] [--jitters]

The codes' own numbers do not change here, only how they are read. `omnivae evaluate` clusters
the raw content means with Euclidean k-means and runs the few-shot episodes with cosine
similarity. The contrastive term trains the means' directions (it compares unit vectors,
Khosla et al. 2020), while the KL pulls their lengths toward the prior's. For every run the
script scores, on the same streams as `evaluate`:

- `raw`: the means as they are (k-means as `evaluate` does it; episodes by cosine, as `evaluate`);
- `unit`: each mean scaled to length 1 (k-means on the sphere, spherical k-means in the sense of
  Dhillon and Modha 2001 up to its centroid step; the episodes do not change: cosine ignores length);
- `centred`: the mean code of the run's training drawings subtracted first, then scaled to length
  1 (CL2N of SimpleShot, Wang et al. 2019): episodes by cosine and k-means on the result;
- `views`: `metrics.view_codes`, what `evaluate` reports as `content_views_*`: the unit content
  means of the drawing turned by 0, 90, 180 and 270 degrees and of the mirror image of each turn
  (for a run trained with `rotations` and `reflections`), side by side and divided by sqrt(8):
  the cosine of two such codes is the mean of the eight views' cosines. Training made every
  turned and mirrored character a character of its own, so each view is one the encoder learned
  to name (test-time augmentation);
- `views_mean`: the mean of those unit means, a code of the content code's own size;
- with `--jitters`, `views+NAME`: test-time augmentation beyond the turns. In each turned view,
  the unit content means of the view and of the view changed by small fixed amounts of one kind
  (JITTERS: scale 0.9 and 1.1, rotation by +-7 degrees, shear +-0.15, a shift of half a pixel
  each way, strokes half a 3x3 dilation thicker or half an erosion thinner; `augment.affine`,
  `augment.stroke_width`), averaged and scaled to length 1 (the same character, unlike the turns),
  then side by side as in `views`.

Raw pixels get the same three readouts (centred on the training drawings' mean image) as a
reference. One line per run and readout, then the mean over runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from omnivae import augment, data, evaluate, metrics, rundir
from omnivae.train import new_character_kinds


def scores(codes: np.ndarray, test: data.Omniglot, seed: int, episodes: int) -> dict[str, float]:
    streams = metrics.eval_streams(seed)
    km = metrics.kmeans_scores(codes, test.character, seed=streams["kmeans"])
    per_alphabet = metrics.alphabet_kmeans_scores(codes, test.character, test.alphabet, seed=streams["alphabet_kmeans"])
    shot = metrics.few_shot_accuracy(codes, test.character, test.alphabet, test.drawer, 20, episodes, streams["episodes"])
    return {"20way": shot["accuracy"], "kmeans": km["accuracy"], "nmi": km["nmi"],
            "alphabet_kmeans": per_alphabet["accuracy"]}


# Small changes of a drawing that keep its character, as keyword arguments of `changed`.
HALF_PIXEL = 1 / 28  # grid units (the side spans 2) of half a pixel at 28 px
JITTERS = {
    "scale": [dict(scale=0.9), dict(scale=1.1)],
    "rotation": [dict(angle=0.12), dict(angle=-0.12)],
    "shear": [dict(shear=0.15), dict(shear=-0.15)],
    "shift": [dict(shift=(HALF_PIXEL, 0.0)), dict(shift=(-HALF_PIXEL, 0.0)), dict(shift=(0.0, HALF_PIXEL)),
              dict(shift=(0.0, -HALF_PIXEL))],
    "width": [dict(width=0.5), dict(width=-0.5)],
}


def changed(images: torch.Tensor, angle=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0), width=0.0) -> torch.Tensor:
    """Every drawing (N, 1, S, S) changed by the same fixed amounts (`augment.affine`, then
    `augment.stroke_width`), clipped to [0, 1]."""
    n = len(images)
    x = augment.affine(images, torch.full((n,), float(angle)), torch.full((n,), float(scale)),
                       torch.full((n,), float(shear)), torch.tensor(shift, dtype=images.dtype).expand(n, 2))
    return augment.stroke_width(x, torch.full((n,), float(width))).clamp(0.0, 1.0)


def jittered_views(model, images: torch.Tensor, kinds: int, jitters: list[dict]) -> np.ndarray:
    """`metrics.view_codes` with each turned view's unit code averaged over the view and its
    `jitters` (then scaled to length 1 again): (N, kinds * Dc)."""
    views = []
    for view in augment.turned_views(images, kinds):
        codes = [metrics.unit_rows(metrics.encode_images(model, x)[0]) for x in
                 [view] + [changed(view, **j) for j in jitters]]  # each (N, Dc)
        views.append(metrics.unit_rows(np.mean(codes, 0)))
    return np.concatenate(views, 1) / np.float32(np.sqrt(kinds))


def readouts(codes: np.ndarray, train_mean: np.ndarray) -> dict[str, np.ndarray]:
    return {"raw": codes, "unit": metrics.unit_rows(codes), "centred": metrics.unit_rows(codes - train_mean)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--split", default="validation", choices=tuple(evaluate.SPLITS))
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--jitters", action="store_true", help="also the views averaged over small fixed changes")
    args = p.parse_args()
    table: dict[str, list[dict]] = {}
    pixels_done = False
    for run in map(Path, args.runs):
        model, cfg = rundir.load(run), rundir.read_config(run)
        test = evaluate.load_split(cfg, args.split, args.data_dir, args.cache_dir, progress=False)
        background = data.load_set("background", cfg.image_size, args.data_dir, args.cache_dir, progress=False)
        train = data.split_by_alphabet(background, cfg.val_alphabets)[0] if cfg.val_holdout else background
        train = train.subset(~np.isin(train.drawer, cfg.val_drawers))  # the drawings training saw
        images = test.tensors()  # (N, 1, S, S)
        content = evaluate.encode_all(model, images)["content_mean"]  # (N, Dc)
        train_content = evaluate.encode_all(model, train.tensors())["content_mean"]  # (M, Dc)
        kinds = new_character_kinds(cfg)
        turned = metrics.view_codes(model, images, kinds, content=content)  # (N, kinds * Dc)
        views = {**readouts(content, train_content.mean(0)), "views": turned,
                 "views_mean": turned.reshape(len(test), kinds, -1).mean(1)}
        if args.jitters:
            views.update({f"views+{name}": jittered_views(model, images, kinds, jitters)
                          for name, jitters in JITTERS.items()})
        for name, codes in views.items():
            row = scores(codes, test, cfg.eval_seed, args.episodes)
            table.setdefault(name, []).append(row)
            print(run.name, name, " ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
        if not pixels_done:  # the same for every run of one split and eval seed
            pixels = test.images.reshape(len(test), -1).astype(np.float64) / 255.0
            train_pixels = train.images.reshape(len(train), -1).astype(np.float64) / 255.0
            for name, codes in readouts(pixels, train_pixels.mean(0)).items():
                row = scores(codes, test, cfg.eval_seed, args.episodes)
                print("pixels", name, " ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
            pixels_done = True
    print(f"mean over {len(args.runs)} runs ({args.split}):")
    for name, rows in table.items():
        keys = rows[0].keys()
        print(name, " ".join(f"{k} {np.mean([r[k] for r in rows]):.4f} ± {np.std([r[k] for r in rows], ddof=1) if len(rows) > 1 else 0:.4f}"
                             for k in keys))


if __name__ == "__main__":
    main()
