r"""Train several variants x seeds with the same budget and print one table of their metrics.

    python bench/ablation.py --out runs/ablation --epochs 10 --seeds 0 1 2 \
        --variant kl:content_regularizer=kl,style_regularizer=kl \
        --variant mmd:content_regularizer=mmd,style_regularizer=mmd
    python bench/ablation.py --out runs/encoders --epochs 10 --quick-eval \
        --variant default --variant conv4 --variant proto --variant proto_only --variant conv4_proto

The decoder and style-capacity candidates, each on top of the default preset:

    python bench/ablation.py --out runs/decoders --epochs 20 --seeds 0 1 2 --variant default \
        --variant style_kl1 --variant free_bits --variant resnet --variant pixelcnn

Each variant is NAME:KEY=VALUE,KEY=VALUE applied on top of --preset; a NAME of the VARIANTS table
below starts from its settings (`--variant conv4` alone is encoder=conv4). Runs train without the
validation alphabets (val_holdout=true) and are scored on them: every choice is made there.
`--split evaluation` trains on all 30 background alphabets and scores on the evaluation set:
for the final numbers of a chosen preset only. Every run is a normal
run folder (see omnivae.rundir: config, checkpoint, weights, log, metrics), so `omnivae compare` and
`omnivae report` work on them too. `--quick-eval` measures only the code-structure metrics
(few-shot, clustering, prior match; no likelihood, swap or figures), for sweeps.
The table is what the script printed: mean and spread (sample standard deviation) over seeds.

`--jobs N` runs N at a time, each on its own device: job k on GPU k mod (visible GPUs), round robin;
the CPU cores are split between the jobs (`--threads` per job). Run the same command again to
finish a sweep that stopped: finished runs (metrics written) are skipped, stopped ones resume from
their checkpoint.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from omnivae.registry import METRICS

# The table's columns: metric keys, headed by their registry labels, then training time.
COLUMNS = [(key, METRICS[key].label) for key in (
    "content_20way_1shot", "content_5way_1shot", "content_20way_5shot", "style_20way_1shot", "content_kmeans_accuracy",
    "content_nmi", "content_alphabet_kmeans_accuracy", "content_views_20way_1shot", "content_views_kmeans_accuracy",
    "classifier_accuracy", "recon_consistency", "swap_consistency",
    "style_character_rate", "style_effect", "nll_iwae", "set_nll_5", "kl_content", "kl_style")]
COLUMNS.append(("train_seconds", "train s"))  # from the run info, not a metric


def quick_metrics(run_dir: Path, data_dir, cache_dir, split: str) -> dict:
    """The code-structure metrics of `omnivae evaluate` (few-shot, clustering, prior match, KL, and
    the content codes read in the turned views) on the split, without likelihood, swaps or figures."""
    import torch

    from omnivae import rundir
    from omnivae.evaluate import PROTOCOL_VERSION, code_metrics, encode_all, load_split, view_metrics
    from omnivae.train import new_character_kinds

    cfg = rundir.read_config(run_dir)
    model = rundir.load(run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    test = load_split(cfg, split, data_dir, cache_dir, progress=False)
    out = {"protocol_version": PROTOCOL_VERSION, "split": split}
    images = test.tensors()  # (N, 1, S, S)
    codes = encode_all(model, images)
    out.update(code_metrics(codes, test, cfg.eval_seed, cfg.episodes))
    out.update(view_metrics(model, test, images, new_character_kinds(cfg), cfg.eval_seed, cfg.episodes,
                            codes["content_mean"]))
    rundir.write_metrics(run_dir, out)
    return out


def one_run(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    if job["gpu"] is not None:
        torch.cuda.set_device(job["gpu"])  # device "auto" (the config's) then means this GPU
    from omnivae import rundir
    from omnivae.config import make_config
    from omnivae.evaluate import evaluate
    from omnivae.train import train

    run_dir = Path(job["run_dir"])
    if rundir.read_metrics(run_dir) is None:
        holdout = job["split"] == "validation"
        cfg = make_config(job["preset"], {**job["overrides"], "seed": job["seed"], "epochs": job["epochs"],
                                          "val_holdout": holdout})
        # A stopped run goes on from its checkpoint; a finished one is left as it is.
        train(cfg, run_dir, job["data_dir"], job["cache_dir"], progress=False, resume=rundir.is_trained(run_dir),
              epochs=cfg.epochs)
        if job["quick"]:
            quick_metrics(run_dir, job["data_dir"], job["cache_dir"], job["split"])
        else:
            evaluate(run_dir, job["data_dir"], job["cache_dir"], figures=False, progress=False, nll_k=job["nll_k"],
                     nll_images=job["nll_images"], swap_pairs=job["swap_pairs"], split=job["split"])
    result = rundir.read_metrics(run_dir)
    result["train_seconds"] = rundir.read_run_info(run_dir)["train_seconds"]
    return {"variant": job["variant"], "seed": job["seed"], **result}


def _visible_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies). The jobs' processes are
    spawned, not forked, so asking here leaves their CUDA alone."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# Named variants, on top of --preset (meant for `default`): the encoder and the content-level term
# compared on the validation alphabets. proto_weight 10: from step 20 to 100 of the default preset
# (content means of norm about 11; at step 0, norm 0.85, it is the other way round), the gradient
# of the prototypical term on the content means was 12 to 17 times the contrastive term's per unit
# weight. At 10 it is 1.2 to 1.7 times the contrastive term's at its weight of 100: the same size.
# The network of the `default` before the depth table (bf16_e28: one block per level, the deconv
# decoder; run it with --epochs 28): the variants measured on top of it carry it, so they rerun
# the same network whatever today's `default` is.
SHALLOW = {"encoder_blocks": 1, "decoder": "deconv"}

VARIANTS: dict[str, dict] = {
    # The previous `default` (64 x 2, content KL at weight 1, turned characters only): every sweep
    # recorded before the lighter content KL ran on top of it; add these settings to rerun one.
    "g64m2": {"content_weight": 1.0, "reflections": False, "weight_decay": 0.0},
    "conv4": {**SHALLOW, "encoder": "conv4"},
    "proto": {"proto_weight": 10.0},
    "proto_only": {"proto_weight": 10.0, "contrastive_weight": 0.0},
    "conv4_proto": {**SHALLOW, "encoder": "conv4", "proto_weight": 10.0},
    # The decoder and the style code's room.
    "style_kl1": {"style_weight": 1.0},
    "free_bits": {"style_weight": 1.0, "style_free_bits": 0.5},
    "resnet": {**SHALLOW, "decoder": "resnet"},
    "pixelcnn": {"decoder": "pixelcnn", "binarize": True},  # the head sees binary drawings, as when it samples
    # Style with room, identity kept out: each drawing decoded with the style of another character's
    # drawing that shares its distortion (transfer_weight), with and without the distortions.
    "transfer": {"style_weight": 1.0, "transfer_weight": 1.0},
    "transfer_aug": {"style_weight": 1.0, "transfer_weight": 1.0, "augment": 1.0},
    # The reverse cycle: a prior style drawn with each group's content must be read back by the
    # style encoder (cycle_weight). Its term is about 8 nats per group when nothing is read back
    # (16 style dimensions), so weight 10 makes it of the order of the reconstruction at first.
    "cycle": {"style_weight": 1.0, "cycle_weight": 10.0},
    "cycle_sw3": {"cycle_weight": 10.0},
    # Style means kept from gathering by character (style_dependence_weight, losses.label_dependence).
    # Its D^2 on batches of 32 unseen characters x 4 drawings: 0.24 for the default's style means
    # (evaluation set, leakage 0.10), 0.46 at style_weight=1 (validation, leakage 0.30), 0.001 with
    # shuffled labels. Weight 100: 46 nats at 0.46, of the order of what the room for style gains.
    "dependence": {"style_weight": 1.0, "style_dependence_weight": 100.0},
    # The PixelCNN head with the codes made to draw the character themselves (base_weight), without
    # and with room for style kept free of the character (free bits and the dependence penalty).
    "pix_base": {"decoder": "pixelcnn", "binarize": True, "binarize_encoder": False, "base_weight": 1.0},
    "pix_dep_base": {"decoder": "pixelcnn", "binarize": True, "binarize_encoder": False, "base_weight": 1.0,
                     "style_weight": 1.0, "style_free_bits": 0.5, "style_dependence_weight": 100.0},
    # Batch composition and input resolution. The default's batches were 32 characters x 4
    # drawings (120 steps per epoch) until 64 x 2 (135 steps: no drawing left out) won on the
    # validation alphabets; the variants of the tables before that change ran on 32 x 4.
    "batches_32x4": {"groups": 32, "group_size": 4},
    "batches_64x4": {"groups": 64, "group_size": 4},  # twice the batch, 60 steps per epoch
    "batches_128x2": {"groups": 128, "group_size": 2},  # twice the batch, 67 steps per epoch
    "c16": {"channels": 16},
    "res64_c16": {"image_size": 64, "channels": 16},  # 64 px everywhere, half the width: ~2.9x a c32 step at 28 px
    # Posterior collapse at the start of training: the regularisers' weights ramped up over the
    # first 2 epochs (~270 steps), and a plain VAE (one Gaussian code in two parts, KL weight 1,
    # no groups, labels or turned characters; run with --epochs 25: 25 epochs of 106 steps are about
    # the default's 2,700) for reference, without and with the ramp.
    "warmup": {"warmup_epochs": 2},
    "plain_vae": {"group_size": 1, "contrastive_weight": 0.0, "style_weight": 1.0, "rotations": False},
    "plain_vae_warmup": {"group_size": 1, "contrastive_weight": 0.0, "style_weight": 1.0, "rotations": False,
                         "warmup_epochs": 2},
    # A third, per-drawing detail code that swaps never transfer (detail_dim), with the ramp; the
    # share of drawings decoded without it (detail_drop, 0.5 unless set), and with the room for
    # style of `dependence`.
    "detail": {"detail_dim": 16, "warmup_epochs": 2},
    "detail_drop0": {"detail_dim": 16, "detail_drop": 0.0, "warmup_epochs": 2},
    "detail_drop75": {"detail_dim": 16, "detail_drop": 0.75, "warmup_epochs": 2},
    "detail_dep": {"detail_dim": 16, "warmup_epochs": 2, "style_weight": 1.0, "style_dependence_weight": 100.0},
    # Issue 10's more training characters: mirror images of the turned characters as new characters
    # too (8 per drawn character), and mild distortions (a third of Koch et al.'s ranges).
    "reflections": {"reflections": True},
    "aug03": {"augment": 0.3},
    # Against fitting the training characters: decoupled weight decay (AdamW); at 0.5 the decay
    # alone would shrink the weights by about e^-0.75 over the default's 2,700 steps.
    "wd05": {"weight_decay": 0.5},
    # The same decay on the encoder alone: the decoder keeps its sharp probability maps.
    "wd05_enc": {"weight_decay": 0.5, "decay_decoder": False},
    "refl_wd05_enc": {"reflections": True, "weight_decay": 0.5, "decay_decoder": False},
    "refl_wd1_enc": {"reflections": True, "weight_decay": 1.0, "decay_decoder": False},
    # Decay compresses the content code (12 nats against 15) and blurs decodings to the judge:
    # give the content code room back with a lighter content KL.
    "refl_wd05_c05": {"reflections": True, "weight_decay": 0.5, "content_weight": 0.5},
    "refl_wd05_c03": {"reflections": True, "weight_decay": 0.5, "content_weight": 0.3},
    # On today's default (the three above together): the lighter content KL alone, without
    # mirroring and decay; and the regularisers' ramp on top.
    "c05_only": {"reflections": False, "weight_decay": 0.0},
    "default_warmup": {"warmup_epochs": 2},
    # More room for style now that the content code carries the detail: style weight 2, alone and
    # with the dependence penalty that held leakage down at style weight 1.
    "sw2": {"style_weight": 2.0},
    "sw2_dep": {"style_weight": 2.0, "style_dependence_weight": 100.0},
    # A learned prior for the content code: a mixture of 512 diagonal Gaussians (weights learned too)
    # (Tomczak and Welling 2018 compare it with the VampPrior), so that codes gathered by character
    # sit where the prior has mass; at the default's content weight 0.5, and at weight 1.
    "mog512": {"prior_components": 512},
    "mog512_c1": {"prior_components": 512, "content_weight": 1.0},
    # bf16 autocast of the training step (about 1.5x the steps per second on a CPU with native
    # bf16, AVX512-BF16); `bf16_e28` is the same run with --epochs 28, about the fp32 run's time.
    "bf16": {"precision": "bf16"},
    "bf16_e28": {"precision": "bf16"},
    # The contrastive term on a two-layer projection of the content means (SimCLR's head), so the
    # code itself keeps what telling the batch's characters apart alone would discard.
    "head": {"contrastive_head": 128},
    # The likelihood scores binary drawings with the encoder as proposal, and an encoder that has
    # only read grey drawings proposes poorly for them (bf16_e28 seed 0, validation, k = 200: 159.0
    # nats with the binary drawing's posterior, 143.3 with the grey drawing's). A share of the
    # training drawings reaches the encoder binarised; the decoder models the grey drawing.
    "eb025": {"encoder_binary": 0.25},
    "eb05": {"encoder_binary": 0.5},
    # The PixelCNN head on today's default, the encoder on grey drawings, now that the proposal
    # reads binary drawings blurred (protocol 5): without and with the base term.
    "pix_grey": {"decoder": "pixelcnn", "binarize": True, "binarize_encoder": False},
    # Depth at each level: a second 3x3 block after each upsampling (at 14 and 28 px) for sharper
    # decodings (issue 9), after each downsampling for the content code (issue 10).
    "shallow": SHALLOW,
    "dec2": {**SHALLOW, "decoder_blocks": 2},
    "enc2": {**SHALLOW, "encoder_blocks": 2},
    "enc2_e19": {**SHALLOW, "encoder_blocks": 2},  # --epochs 19: about the compute of 28 shallow epochs
    "enc2_res_e18": {"encoder_blocks": 2, "decoder": "resnet"},  # --epochs 18: the same compute
    "enc2_res_e28": {"encoder_blocks": 2, "decoder": "resnet"},  # --epochs 28: the `large` preset
    "enc3_res_e16": {"encoder_blocks": 3},  # --epochs 16: a third 3x3 block per encoder level
    "resenc2_e16": {"encoder": "resnet", "encoder_blocks": 2},  # --epochs 16: its two stride-1 blocks as one residual block
    "lr2e3": {"lr": 2e-3},  # twice the learning rate
    "ema995": {"ema_decay": 0.995},  # the run's model is a moving average of its weights (about 200 steps)
    "ema998": {"ema_decay": 0.998},  # the same over about 500 steps
    "hid512": {"hidden": 512},  # twice the fully connected layer before the heads (and after the codes)
}


def parse_variant(text: str) -> tuple[str, dict]:
    """NAME[:KEY=VALUE,...] -> (NAME, overrides): the VARIANTS settings of NAME, if any, then the given ones."""
    name, _, settings = text.partition(":")
    overrides = {**VARIANTS.get(name, {}), **dict(item.split("=", 1) for item in settings.split(",") if item)}
    return name, overrides


def table(rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    present = [(k, label) for k, label in COLUMNS if any(k in r for r in rows)]
    lines = ["| variant | seeds | " + " | ".join(label for _, label in present) + " |",
             "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = []
        for key, _ in present:
            values = np.array([r[key] for r in mine if key in r], dtype=float)
            if len(values) == 0:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3g}")
            else:
                cells.append(f"{values.mean():.3g} ± {values.std(ddof=1):.2g}")
        lines.append(f"| {v} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the run folders and results.jsonl")
    p.add_argument("--preset", default="default")
    p.add_argument("--variant", action="append", required=True, help="NAME:KEY=VALUE,... (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, required=True, help="same budget for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the CPU cores split between the jobs)")
    p.add_argument("--quick-eval", action="store_true", help="code-structure metrics only")
    p.add_argument("--split", choices=("validation", "evaluation"), default="validation",
                   help="validation (default): train without the validation alphabets and score on them; "
                   "evaluation: train on all 30 background alphabets and score on the evaluation set, "
                   "for the final numbers of a chosen preset only")
    p.add_argument("--nll-k", type=int, help="importance samples for the likelihood (default: the preset's)")
    p.add_argument("--nll-images", type=int, help="test images for the likelihood (default: the preset's)")
    p.add_argument("--swap-pairs", type=int, help="pairs for swap consistency (default: the preset's)")
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)

    gpus = _visible_gpus()
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = []
    for text in args.variant:
        name, overrides = parse_variant(text)
        for seed in args.seeds:
            jobs.append(dict(variant=name, seed=seed, overrides=overrides, preset=args.preset, epochs=args.epochs,
                             run_dir=str(args.out / (f"{name}_seed{seed}" + ("_final" if args.split == "evaluation" else ""))), threads=threads, quick=args.quick_eval,
                             split=args.split, nll_k=args.nll_k, nll_images=args.nll_images, swap_pairs=args.swap_pairs, data_dir=args.data_dir, cache_dir=args.cache_dir,
                             gpu=len(jobs) % gpus if gpus else None))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for row in pool.map(one_run, jobs):
            rows.append(row)
            print(f"[{time.time() - started:.0f}s] {row['variant']} seed {row['seed']}: "
                  f"20-way {row.get('content_20way_1shot', float('nan')):.3f}, "
                  f"style {row.get('style_20way_1shot', float('nan')):.3f}", flush=True)
    with open(args.out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"\n{args.preset} preset, {args.epochs} epochs, seeds {args.seeds}, scored on the {args.split} split:\n")
    print(table(rows))
    return 0


def _exit_with_parent(parent: int, every: float = 2.0) -> None:
    """In each job's process: end it when the sweep that started it ends (killed, not interrupted),
    so that no orphaned run goes on writing into a folder a rerun of the sweep resumes."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
