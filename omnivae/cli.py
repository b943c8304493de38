"""The `omnivae` command line: every sub-command is a thin wrapper around a Python function."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from .config import PRESETS, Config, ConfigError

EPILOG = """examples:
  omnivae run --preset default --out runs/default        # data, training, evaluation, report
  omnivae train --preset quick --out runs/quick --set epochs=1 --set content_dim=16
  omnivae evaluate runs/quick --subset 2000 --nll-k 100
  omnivae sample runs/quick --n 64 --out samples.png
  omnivae swap runs/quick --content a.png b.png --style c.png d.png --out swap.png
  omnivae demo runs/quick                                 # a local page: draw, see neighbours and styles
"""


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="folder with the Omniglot zips or their extracted folders "
                   "(default: $OMNIVAE_DATA_DIR, else a cache folder; downloaded when missing)")
    p.add_argument("--cache-dir", type=Path, help="folder for decoded arrays and cached helpers "
                   "(default: $OMNIVAE_CACHE_DIR, else ~/.cache/omnivae/arrays)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subset", type=int, help="evaluate on this many test images (fixed random choice) for a quick look")
    p.add_argument("--nll-k", type=int, help="importance samples per image for the likelihood; 0 skips it "
                   "(default: the run's config, 1000 in most presets)")
    p.add_argument("--nll-images", type=int, help="test images used for the likelihood (a fixed subset), 0 = all "
                   "(default: the run's config, 500 in most presets)")
    p.add_argument("--episodes", type=int, help="few-shot episodes per test (default: the run's config, 1000)")
    p.add_argument("--swap-pairs", type=int, help="pairs for swap consistency, 0 skips it (default: the run's config, 2000)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--split", choices=("evaluation", "validation"), default="evaluation",
                   help="evaluation: the 20 unseen alphabets, for the numbers you report; validation: the held-out "
                   "background alphabets, for every choice (runs trained with --set val_holdout=true)")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named configuration (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set epochs=5 (repeatable; see `omnivae config`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnivae",
        description="Variational autoencoders with a content/style latent space on Omniglot.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub.add_parser = functools.partial(sub.add_parser, parents=[quiet])

    p = sub.add_parser("fetch", help="download (or find) the Omniglot zips and decode them")
    _data_options(p)
    p.add_argument("--size", type=int, default=28, help="also decode and cache this image size (default 28)")

    p = sub.add_parser("config", help="print a preset's full config as JSON (with --set overrides)")
    _train_options(p)

    p = sub.add_parser("train", help="train a model into a run folder")
    _train_options(p)
    p.add_argument("--out", type=Path, help="run folder to create (config.json, weights, log.jsonl)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run from its last epoch")
    _data_options(p)

    p = sub.add_parser("evaluate", help="metrics on the evaluation set -> RUN_DIR/metrics.json and figures")
    p.add_argument("run_dir", type=Path)
    _eval_options(p)
    _data_options(p)

    p = sub.add_parser("run", help="the main job: data, training, evaluation, report")
    _train_options(p)
    p.add_argument("--out", type=Path, required=True, help="run folder to create")
    _eval_options(p)
    _data_options(p)

    p = sub.add_parser("sample", help="new characters in new styles, drawn from the prior")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=64, help="how many drawings (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the prior samples (default 1)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")

    p = sub.add_parser("swap", help="grid: one row per content image, one column per style image")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--content", type=Path, nargs="+", required=True, help="Omniglot PNGs whose characters to draw")
    p.add_argument("--style", type=Path, nargs="+", required=True, help="Omniglot PNGs whose hands to draw in")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")

    p = sub.add_parser("one-shot", help="new drawings of a character from a single drawing of it")
    p.add_argument("run_dir", type=Path)
    p.add_argument("image", type=Path, help="one Omniglot PNG (for example from the evaluation set)")
    p.add_argument("--n", type=int, default=16, help="how many drawings (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")

    p = sub.add_parser("interpolate", help="walk between two drawings in content or in style")
    p.add_argument("run_dir", type=Path)
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--part", choices=("content", "style", "both"), default="content")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")

    p = sub.add_parser("report", help="write RUN_DIR/report.html: config, metrics, figures, one page")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("compare", help="a table of several runs' metrics")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    p.add_argument("--html", type=Path, help="also write a comparison page here")

    p = sub.add_parser("demo", help="a local web page: draw a character, see its neighbours and other hands")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free one)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL, do not open a browser")
    _data_options(p)
    p.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> None:
    import os

    from .demo import serve

    # Open a browser only where one can show a window.
    can_open = sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    serve(args.run_dir, args.host, args.port, args.data_dir, args.cache_dir,
          open_browser=can_open and not args.no_browser, progress=not args.quiet)


def _load_images(paths, size: int):
    import torch

    from .data import prepare

    return torch.stack([prepare(p, size) for p in paths])  # (N, 1, S, S)


def run(args: argparse.Namespace) -> None:
    if getattr(args, "func", None) is not None:
        return args.func(args)
    progress = not args.quiet
    if args.command == "fetch":
        from .data import fetch, load_set

        folder = fetch(args.data_dir, progress=progress)
        for name in ("background", "evaluation"):
            found = load_set(name, args.size, folder, args.cache_dir, progress=progress)
            print(f"{name}: {len(found)} images, {len(set(found.character.tolist()))} characters, "
                  f"{len(found.alphabet_names)} alphabets")
        return
    if args.command == "config":
        import json

        from .config import make_config

        print(json.dumps(make_config(args.preset, args.overrides).to_dict(), indent=2))
        return
    if args.command in ("train", "run"):
        from .config import make_config
        from .train import train

        if args.command == "train" and args.resume:
            train(Config(), args.resume, args.data_dir, args.cache_dir, resume=True, progress=progress)
            return
        if args.out is None:
            raise ConfigError("train needs --out RUN_DIR (or --resume RUN_DIR)")
        train(make_config(args.preset, args.overrides), args.out, args.data_dir, args.cache_dir, progress=progress)
        if args.command == "train":
            print(f"trained: {args.out}")
            return
    if args.command in ("evaluate", "run"):
        from .evaluate import evaluate

        run_dir = args.run_dir if args.command == "evaluate" else args.out
        results = evaluate(run_dir, args.data_dir, args.cache_dir, subset=args.subset, nll_k=args.nll_k,
                           nll_images=args.nll_images, episodes=args.episodes, swap_pairs=args.swap_pairs,
                           figures=not args.no_figures, progress=progress, split=args.split)
        _print_metrics(results)
        if args.command == "evaluate":
            print(f"wrote {run_dir / 'metrics.json'}")
            return
    if args.command in ("report", "run"):
        from .report import write_report

        run_dir = args.run_dir if args.command == "report" else args.out
        print(f"wrote {write_report(run_dir)}")
        return
    if args.command == "compare":
        from .report import compare, protocol_warnings, write_compare_page

        for line in protocol_warnings(args.run_dirs):
            print(f"omnivae: {line}", file=sys.stderr)

        print(compare(args.run_dirs, args.format))
        if args.html:
            print(f"wrote {write_compare_page(args.run_dirs, args.html)}")
        return

    # Generation commands.
    from . import generate, plots
    from .train import load

    model = load(args.run_dir)
    if args.command == "sample":
        images = generate.sample(model, args.n, args.seed, args.temperature)
        plots.image_grid(images, args.out)
    elif args.command == "swap":
        content = _load_images(args.content, model.image_size)
        style = _load_images(args.style, model.image_size)
        plots.swap_grid(content, style, generate.swap(model, content, style), args.out)
    elif args.command == "one-shot":
        image = _load_images([args.image], model.image_size)
        plots.image_grid(generate.one_shot(model, image[0], args.n, args.seed), args.out)
    elif args.command == "interpolate":
        first, second = _load_images([args.first, args.second], model.image_size)
        plots.interpolation_grid(generate.interpolate(model, first, second, args.steps, args.part)[None], args.out,
                                 row_labels=[args.part])
    print(f"wrote {args.out}")


def _print_metrics(results: dict) -> None:
    for key, value in results.items():
        if isinstance(value, float):
            print(f"  {key:32s} {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError
    from .demo import DemoError

    try:
        run(args)
    except (ConfigError, DataError, DemoError, FileNotFoundError) as err:
        # Bad input: one line, no traceback.
        print(f"omnivae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omnivae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
