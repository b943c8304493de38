"""The `omnivae` command line: every sub-command is a thin wrapper around a Python function.

Only argparse and the config module load at start; each handler imports what it needs, so
`omnivae --help` is quick and never imports torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from pathlib import Path

from . import __version__, rundir
from .config import IMAGE_SIZES, PRESETS, Config, ConfigError, make_config, override

MAX_DRAWINGS = 4096  # --n of sample and one-shot: one picture
MAX_STEPS = 256  # --steps of interpolate
MAX_IMAGE_BYTES = 20 * 2**20  # an upstream Omniglot PNG is about 1 kB
MAX_CONFIG_BYTES = 2**20
REPORT_MODULES = ("scipy", "sklearn", "matplotlib", "openTSNE")  # the `report` extra

EPILOG = """examples:
  omnivae run --preset default --out runs/default        # data, training, evaluation, report
  omnivae run --data-dir my_glyphs --out runs/mine        # your own images: my_glyphs/<class>/<image>.png
  omnivae train --preset quick --out runs/quick --set epochs=1 --set content_dim=16
  omnivae train --resume runs/quick --set epochs=4       # continue, with more epochs
  torchrun --nproc_per_node 2 -m omnivae train --out runs/two  # one run on 2 GPUs (DDP)
  omnivae evaluate runs/quick --subset 2000 --nll-k 100
  omnivae sample runs/quick --n 64 --out samples.png
  omnivae demo runs/quick                                 # a local page: draw, see neighbours and styles
  omnivae swap runs/quick --content a.png b.png --style c.png d.png --out swap.png

exit status:
  0    success
  1    data or run-time error: a missing or damaged data file, a file that cannot be read or
       written, out of memory, a missing optional package (pip install 'omnivae[report]')
  2    usage error: a bad option, config key or value, or a folder that holds no run
  130  interrupted
"""


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error on one line, `omnivae: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"omnivae: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------- checked values


def _count(low: int, high: int | None = None):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _regular_file(limit: int, what: str):
    """argparse type: a path to a regular file of at most `limit` bytes, checked with stat before
    anything reads it (a FIFO or /dev/zero is refused at once instead of blocking or filling memory)."""

    def check(text: str) -> Path:
        try:
            info = os.stat(text)
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {text} ({err.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise argparse.ArgumentTypeError(f"{text} is not a regular file")
        if info.st_size > limit:
            raise argparse.ArgumentTypeError(f"{text} is {info.st_size / 2**20:.1f} MB; {what} over "
                                             f"{limit / 2**20:g} MB are refused")
        return Path(text)

    return check


_image_file = _regular_file(MAX_IMAGE_BYTES, "images")
_config_file = _regular_file(MAX_CONFIG_BYTES, "config files")


def _folder(text: str) -> Path:
    """argparse type: an existing folder."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def _run_folder(text: str) -> Path:
    """argparse type: a run folder (one that holds a config)."""
    if not rundir.is_run_folder(text):
        raise argparse.ArgumentTypeError(f"{text} is not a run folder (no {rundir.CONFIG_FILE})")
    return Path(text)


# ------------------------------------------------------------------------- options


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="folder with the Omniglot zips or their extracted "
                   "folders (default: $OMNIVAE_DATA_DIR, else a cache folder; downloaded when missing), or an image "
                   "folder of your own: DIR/<class>/<image>.png or DIR/<group>/<class>/<image>.png")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="folder for decoded arrays and cached helpers "
                   "(default: $OMNIVAE_CACHE_DIR, else ~/.cache/omnivae/arrays)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subset", type=_count(0), metavar="N",
                   help="evaluate on N test images (a fixed random choice) for a quick look; 0 = all (default: all)")
    p.add_argument("--nll-k", type=_count(0), metavar="K", help="importance samples per image for the likelihood; "
                   "0 skips it (default: the run's config, 1000 in most presets)")
    p.add_argument("--nll-images", type=_count(0), metavar="N", help="test images used for the likelihood (a fixed "
                   "subset), 0 = all (default: the run's config, 500 in most presets)")
    p.add_argument("--nll-blur", type=float, metavar="PIXELS", help="blur (pixels at 28 px) of the binary drawings "
                   "the likelihoods' importance proposal reads; 0 reads them as they are (default: the run's config, 0.7)")
    p.add_argument("--episodes", type=_count(1), metavar="N",
                   help="few-shot episodes per test, >= 1 (default: the run's config, 1000)")
    p.add_argument("--swap-pairs", type=_count(0), metavar="N",
                   help="pairs for swap consistency, 0 skips it (default: the run's config, 2000)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--split", choices=("evaluation", "validation"), default="evaluation",
                   help="evaluation: the 20 unseen alphabets, for the numbers you report; validation: the held-out "
                   "background alphabets, for every choice (runs trained with --set val_holdout=true)")


def _config_options(p: argparse.ArgumentParser) -> None:
    start = p.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), help="named configuration to start from (default: default)")
    start.add_argument("--config", type=_config_file, metavar="FILE", help=f"a {rundir.CONFIG_FILE} to start from instead "
                       "of a preset (as `omnivae config` prints it or a run folder holds it); keys it leaves out take "
                       "the defaults of omnivae.Config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field on top, e.g. --set epochs=5 (repeatable; `omnivae config` "
                   "lists the fields)")


def _picture_options(p: argparse.ArgumentParser, drawings: int | None = None) -> None:
    p.add_argument("run_dir", type=_run_folder, metavar="RUN_DIR", help="a trained run folder")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    if drawings is not None:
        p.add_argument("--n", type=_count(1, MAX_DRAWINGS), default=drawings,
                       help=f"how many drawings, 1 to {MAX_DRAWINGS} (default {drawings})")
        p.add_argument("--seed", type=_count(0, 2**63 - 1), default=0, help="seed of the random codes (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="omnivae",
        description="Variational autoencoders with a content/style latent space on Omniglot.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"omnivae {__version__}",
                        help="print the version and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    def command(name: str, func, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description, parents=[quiet])
        p.set_defaults(func=func)
        return p

    p = command("fetch", cmd_fetch, "download (or find) the Omniglot zips and decode them",
                "Find the Omniglot zips (or their extracted folders) in the data folder, downloading them when "
                "missing, and decode both sets into the cache.")
    _data_options(p)
    p.add_argument("--size", type=int, choices=IMAGE_SIZES, default=28,
                   help="also decode and cache this image size (default 28)")

    p = command("config", cmd_config, "print a full config as JSON (a preset or file, with --set overrides)",
                "Print the config that `train` would use with the same options, as JSON.")
    _config_options(p)

    p = command("train", cmd_train, "train a model into a run folder",
                "Train a model into a new run folder, or continue a stopped one with --resume. A resumed run "
                f"keeps its own {rundir.CONFIG_FILE}: only --set epochs=N may change it (more epochs, written to "
                f"{rundir.CONFIG_FILE}); any other --set, --preset or --config that would change the run is "
                "refused. A folder whose run stopped before its first checkpoint can be given to --out again.")
    _config_options(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, metavar="RUN_DIR", help=f"run folder to create ({rundir.CONFIG_FILE}, checkpoint, weights, {rundir.LOG_FILE})")
    where.add_argument("--resume", type=_run_folder, metavar="RUN_DIR", help="continue a stopped run from its last epoch")
    _data_options(p)

    p = command("evaluate", cmd_evaluate, f"metrics on the evaluation set -> RUN_DIR/{rundir.METRICS_FILE} and figures",
                "Evaluate a trained run on the Omniglot evaluation set: clustering, few-shot classification, swap "
                f"consistency, likelihood and prior match, written to RUN_DIR/{rundir.METRICS_FILE}, with figures.")
    p.add_argument("run_dir", type=_run_folder, metavar="RUN_DIR", help="a trained run folder")
    _eval_options(p)
    _data_options(p)

    p = command("run", cmd_run, "the main job: data, training, evaluation, report",
                "Train a model into a new run folder, evaluate it and write its report.")
    _config_options(p)
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run folder to create")
    _eval_options(p)
    _data_options(p)

    p = command("sample", cmd_sample, "new characters in new styles, drawn from the prior",
                "Draw content and style codes from the prior N(0, I) and decode them into one PNG grid.")
    _picture_options(p, drawings=64)
    p.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="scale of the prior samples, a finite number > 0 (default 1)")

    p = command("swap", cmd_swap, "grid: one row per content image, one column per style image",
                "Draw each content image's character in each style image's hand: one row per content image, "
                "one column per style image.")
    _picture_options(p)
    p.add_argument("--content", type=_image_file, nargs="+", required=True, metavar="PNG",
                   help="Omniglot PNGs (105x105) whose characters to draw")
    p.add_argument("--style", type=_image_file, nargs="+", required=True, metavar="PNG",
                   help="Omniglot PNGs (105x105) whose hands to draw in")

    p = command("one-shot", cmd_one_shot, "new drawings of a character from a single drawing of it",
                "Encode one drawing of a (possibly unseen) character and draw it again in styles from the prior.")
    _picture_options(p, drawings=16)
    p.add_argument("image", type=_image_file, metavar="PNG",
                   help="one Omniglot PNG (105x105), for example from the evaluation set")

    p = command("interpolate", cmd_interpolate, "walk between two drawings in content or in style",
                "Decode points on the straight line between the codes of two drawings, in the content code, "
                "the style code or both.")
    _picture_options(p)
    p.add_argument("first", type=_image_file, metavar="FIRST_PNG", help="the drawing the walk starts from (105x105)")
    p.add_argument("second", type=_image_file, metavar="SECOND_PNG", help="the drawing the walk ends at (105x105)")
    p.add_argument("--part", choices=("content", "style", "both"), default="content",
                   help="which code walks; the other stays at the first drawing's (default: content)")
    p.add_argument("--steps", type=_count(2, MAX_STEPS), default=10,
                   help=f"drawings along the walk, both ends included, 2 to {MAX_STEPS} (default 10)")

    p = command("report", cmd_report, f"write RUN_DIR/{rundir.REPORT_FILE}: config, metrics, figures, one page",
                f"Write RUN_DIR/{rundir.REPORT_FILE}, one self-contained page with the run's config, training, "
                "metrics and figures.")
    p.add_argument("run_dir", type=_folder, metavar="RUN_DIR", help="a run folder")

    p = command("compare", cmd_compare, "a table of several runs' metrics",
                "Print the metrics of several runs as one table, one row per run.")
    p.add_argument("run_dirs", type=_folder, nargs="+", metavar="RUN_DIR", help="run folders to compare")
    p.add_argument("--format", choices=("table", "markdown", "csv"), default="table",
                   help="how to print the table (default: table)")
    p.add_argument("--html", type=Path, metavar="FILE", help="also write a comparison page with bar charts here")

    p = command("demo", cmd_demo, "a local web page: draw a character, see its neighbours and other hands",
                "Serve a page on this machine where you draw a character (or pick an evaluation drawing) and see "
                "its reconstruction, its 5 nearest evaluation characters by content code, and the drawing redrawn "
                "in sampled styles, in the styles of 4 example drawings, and along the style code's main "
                "directions.")
    p.add_argument("run_dir", type=_run_folder, metavar="RUN_DIR", help="a trained run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_count(0, 65535), default=0, help="port to listen on (default 0: a free one)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL, do not open a browser")
    _data_options(p)
    return parser


# ------------------------------------------------------------------------- handlers


def _config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The config the options ask for: --config FILE, else --preset, else `base` (else the
    default preset), with the --set overrides on top."""
    if args.config is not None:
        return override(Config.load(args.config), args.overrides)
    if args.preset is not None or base is None:
        return make_config(args.preset or "default", args.overrides)
    return override(base, args.overrides)


def cmd_fetch(args: argparse.Namespace) -> None:
    from .data import fetch, load_set

    progress = not args.quiet
    folder = fetch(args.data_dir, progress=progress)
    for name in ("background", "evaluation"):
        found = load_set(name, args.size, folder, args.cache_dir, progress=progress)
        print(f"{name}: {len(found)} images, {len(set(found.character.tolist()))} characters, "
              f"{len(found.alphabet_names)} alphabets")


def cmd_config(args: argparse.Namespace) -> None:
    print(json.dumps(_config(args).to_dict(), indent=2))


def _say(*args) -> None:
    """Print, in torchrun's process 0 only (or in a plain single process)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args)


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume is not None:
        _resume(args)
        return
    _train(args)
    _say(f"trained: {args.out}")


def _train(args: argparse.Namespace) -> None:
    from .train import train

    if rundir.is_run_folder(args.out) and not rundir.is_trained(args.out):
        _say(f"{args.out} holds a run stopped before its first checkpoint; starting it again")
    train(_config(args), args.out, args.data_dir, args.cache_dir, progress=not args.quiet)


def _resume(args: argparse.Namespace) -> None:
    """Continue a run with its own config; only the number of epochs may change."""
    from .train import train

    run_dir = args.resume
    saved = rundir.read_config(run_dir)
    wanted = _config(args, base=saved)
    changed = [f"{key} ({value!r} -> {getattr(wanted, key)!r})" for key, value in saved.to_dict().items()
               if key != "epochs" and getattr(wanted, key) != getattr(saved, key)]
    if changed:
        raise ConfigError(f"--resume continues {run_dir} as configured; only --set epochs=N may change it, "
                          f"not {', '.join(changed)}")
    finished = rundir.finished_epochs(run_dir)
    if wanted.epochs != saved.epochs:
        if wanted.epochs < finished:
            raise ConfigError(f"epochs={wanted.epochs} is fewer than the {finished} epochs {run_dir} has finished")
        _say(f"resuming {run_dir} with epochs={wanted.epochs} (was {saved.epochs}); {rundir.CONFIG_FILE} updated")
    elif finished >= saved.epochs:
        _say(f"{run_dir} has already finished {finished}/{saved.epochs} epochs; nothing to train "
             "(add epochs with --set epochs=N)")
        return
    train(None, run_dir, args.data_dir, args.cache_dir, resume=True, progress=not args.quiet, epochs=wanted.epochs)
    _say(f"trained: {run_dir}")


def _evaluate(args: argparse.Namespace, run_dir: Path) -> None:
    from .evaluate import evaluate

    results = evaluate(run_dir, args.data_dir, args.cache_dir, subset=args.subset, nll_k=args.nll_k,
                       nll_images=args.nll_images, episodes=args.episodes, swap_pairs=args.swap_pairs,
                       figures=not args.no_figures, progress=not args.quiet, split=args.split, nll_blur=args.nll_blur)
    for key, value in results.items():
        if isinstance(value, float):
            print(f"  {key:32s} {value:.4f}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    _evaluate(args, args.run_dir)
    print(f"wrote {args.run_dir / rundir.METRICS_FILE}")


def cmd_run(args: argparse.Namespace) -> None:
    from .report import write_report

    _train(args)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, process 0 alone evaluates and reports
    _evaluate(args, args.out)
    print(f"wrote {write_report(args.out)}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(f"wrote {write_report(args.run_dir)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .report import compare, protocol_warnings, write_compare_page

    for line in protocol_warnings(args.run_dirs):
        print(f"omnivae: {line}", file=sys.stderr)
    print(compare(args.run_dirs, args.format))
    if args.html:
        print(f"wrote {write_compare_page(args.run_dirs, args.html)}")


def cmd_demo(args: argparse.Namespace) -> None:
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


def cmd_sample(args: argparse.Namespace) -> None:
    from . import generate, plots
    from .rundir import load

    model = load(args.run_dir)
    plots.image_grid(generate.sample(model, args.n, args.seed, args.temperature), args.out)
    print(f"wrote {args.out}")


def cmd_swap(args: argparse.Namespace) -> None:
    from . import generate, plots
    from .rundir import load

    model = load(args.run_dir)
    content = _load_images(args.content, model.image_size)
    style = _load_images(args.style, model.image_size)
    plots.swap_grid(content, style, generate.swap(model, content, style), args.out)
    print(f"wrote {args.out}")


def cmd_one_shot(args: argparse.Namespace) -> None:
    from . import generate, plots
    from .rundir import load

    model = load(args.run_dir)
    image = _load_images([args.image], model.image_size)
    plots.image_grid(generate.one_shot(model, image[0], args.n, args.seed), args.out)
    print(f"wrote {args.out}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    from . import generate, plots
    from .rundir import load

    model = load(args.run_dir)
    first, second = _load_images([args.first, args.second], model.image_size)
    walk = generate.interpolate(model, first, second, args.steps, args.part)
    plots.interpolation_grid(walk[None], args.out, row_labels=[args.part])
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------- entry point


def _fail(message, code: int) -> int:
    text = " ".join(str(message).split()) or type(message).__name__  # one line, whatever the error holds
    print(f"omnivae: error: {text}", file=sys.stderr)
    return code


def _is_data_error(err: Exception) -> bool:
    # A DataError can only come from omnivae.data, so the module is loaded when one is raised;
    # looking it up here keeps torch out of the CLI's start-up.
    data = sys.modules.get(f"{__package__}.data")
    return data is not None and isinstance(err, data.DataError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (usage errors exit from argparse with 2)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:  # bad option or config value
        return _fail(err, 2)
    except KeyboardInterrupt:
        print("omnivae: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in REPORT_MODULES:
            raise
        return _fail(f"omnivae {args.command} needs {missing}, part of the report extra: "
                     "pip install 'omnivae[report]'", 1)
    except OSError as err:
        return _fail(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else err, 1)
    except (MemoryError, RuntimeError) as err:  # out of memory, failures inside torch
        return _fail(err, 1)
    except Exception as err:
        if _is_data_error(err):
            return _fail(err, 1)
        demo = sys.modules.get(f"{__package__}.demo")
        if demo is not None and isinstance(err, demo.DemoError):  # a run or port the page cannot use
            return _fail(err, 2)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
