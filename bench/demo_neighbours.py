"""How often the demo's neighbours hold the right character, for the drawings the page can pick.

    python bench/demo_neighbours.py RUN_DIR [RUN_DIR ...] [--data-dir D] [--cache-dir C]

`omnivae demo` shows, for a drawing, the 5 nearest characters of a gallery that holds one
drawing of each of the 659 evaluation characters (its lowest-numbered drawer's). For every
evaluation drawing by a drawer outside the gallery (12,521 drawings), this scores the page's
answer: `nearest`, the right character first (a 659-way one-shot classifier over all 20
alphabets at once, harder than the 20-way episodes within one alphabet), and `five`, the right
character among the 5 shown. Two readings of the content code: `plain`, the content means by
cosine (the demo before it read turned views), and `views`, what the demo uses, the codes read
in the turned views the run was trained on (`metrics.view_codes`). One line per run and reading.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from omnivae import metrics, rundir
from omnivae.demo import NEIGHBOURS, Demo, nearest
from omnivae.evaluate import load_split
from omnivae.train import new_character_kinds


def rates(codes: np.ndarray, gallery: np.ndarray, truth: np.ndarray, gallery_character: np.ndarray) -> dict:
    """Right character first, and among the NEIGHBOURS nearest (the demo's `nearest`, by cosine),
    for codes (N, D) against a gallery (G, D) of characters gallery_character (G,)."""
    top = np.stack([nearest(code, gallery, NEIGHBOURS)[0] for code in codes])  # (N, 5), as the page ranks
    hit = gallery_character[top] == truth[:, None]  # (N, 5)
    return {"nearest": float(hit[:, 0].mean()), "five": float(hit.any(1).mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data-dir", default=os.environ.get("OMNIVAE_DATA_DIR"))
    parser.add_argument("--cache-dir", default=os.environ.get("OMNIVAE_CACHE_DIR"))
    args = parser.parse_args(argv)
    for run in args.runs:
        cfg = rundir.read_config(run)
        model = rundir.load(run, "cpu")
        evaluation = load_split(cfg, "evaluation", args.data_dir, args.cache_dir, progress=False)
        kinds = new_character_kinds(cfg)
        demo = Demo(model, evaluation, views=kinds)
        rows = np.flatnonzero(~np.isin(evaluation.drawer, demo.gallery_drawers))  # drawings the gallery lacks
        images = evaluation.tensors()[rows]  # (N, 1, S, S)
        truth, gallery_character = evaluation.character[rows], evaluation.character[demo.gallery_rows]
        content = metrics.encode_images(model, images)[0]  # (N, Dc)
        gallery_content = metrics.encode_images(model, evaluation.tensors()[demo.gallery_rows])[0]  # (G, Dc)
        readings = {"plain": (metrics.unit_rows(content), metrics.unit_rows(gallery_content)),
                    "views": (metrics.view_codes(model, images, kinds, content=content), demo.gallery_codes)}
        for name, (codes, gallery) in readings.items():
            score = rates(codes, gallery, truth, gallery_character)
            print(f"{os.path.basename(os.path.normpath(run))} {name} (views {kinds if name == 'views' else 1}): "
                  f"drawings {len(rows)} nearest {score['nearest']:.4f} five {score['five']:.4f}", flush=True)


if __name__ == "__main__":
    main()
