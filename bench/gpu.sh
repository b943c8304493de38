#!/usr/bin/env bash
# The GPU check, in one go, on a machine with one or more NVIDIA GPUs:
#
#   1. the default preset end to end (train, evaluate with the likelihood, report), timed per stage;
#   2. the training loop against a hand-written loop (bench/speed.py) with precision=bf16 and
#      compile=true off and on, and the host waits per step (CUDA sync debug mode);
#   3. the metrics of bf16 and compile against fp32, two seeds each (bench/ablation.py, validation split);
#   4. the `large` preset's training;
#   5. the DDP path with every visible GPU (torchrun), resumed once, against stage 1's run.
#
# Writes bench/results/gpu_<date>.txt: every stage's command, exit status, seconds and output tail.
# A stage that fails or runs past its time limit is recorded and the next one starts.
#
#   OMNIVAE_DATA_DIR=/path/to/omniglot bash bench/gpu.sh [--dry-run] [--quick]
#
# The Omniglot zips must already be in OMNIVAE_DATA_DIR (the check never downloads).
# --quick: fewer epochs everywhere (2; the `large` preset 3), to check that every stage runs.
# --dry-run: no GPU, no data: writes the results file with the commands each stage would run,
#   after running the checks that need neither (the scripts' --help, the package's import).
# Environment: PYTHON (default python), WORK (run folders; default a new folder under /tmp),
# EPOCHS (the ablation's and DDP run's epochs; default the preset's 20), SEEDS (default "0 1").
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    *) echo "usage: bench/gpu.sh [--dry-run] [--quick]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
WORK=${WORK:-$(mktemp -d /tmp/omnivae_gpu.XXXXXX)}
SEEDS=${SEEDS:-"0 1"}
if [ "$QUICK" = 1 ]; then
  EPOCHS=${EPOCHS:-2}; LARGE_EPOCHS=3; STEPS=30
else
  EPOCHS=${EPOCHS:-20}; LARGE_EPOCHS=60; STEPS=100
fi
mkdir -p bench/results "$WORK"
RESULTS=bench/results/gpu_$(date +%Y%m%d_%H%M%S)$([ "$DRY" = 1 ] && echo _dry).txt

say() { echo "$*" | tee -a "$RESULTS"; }

# stage NAME LIMIT_SECONDS COMMAND...: run it (or, dry, record it), time it, keep its output's tail.
stage() {
  local name=$1 limit=$2
  shift 2
  say ""
  say "## $name (limit ${limit}s)"
  say "\$ $(printf '%q ' "$@")"
  if [ "$DRY" = 1 ]; then
    say "(dry run: not run)"
    return 0
  fi
  local log="$WORK/$name.log" start rc ms
  start=$(date +%s%N)
  timeout --kill-after=30 "$limit" "$@" >"$log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  tail -n 40 "$log" | tee -a "$RESULTS"
  say "-> $name: exit $rc$([ $rc = 124 ] && echo ' (time limit)'), $((ms / 1000)).$(printf %03d $((ms % 1000))) s"
  return $rc
}

# show FILE...: a run's small JSON files, as they are.
show() {
  for f in "$@"; do
    if [ -f "$f" ]; then say "$f:"; cat "$f" | tee -a "$RESULTS"; say ""; fi
  done
}

say "# omnivae GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ', dry run')"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with changes)'), epochs $EPOCHS, seeds $SEEDS, work $WORK"

# Checks that need neither a GPU nor data: the package imports, the scripts parse their options.
$PY -c "import omnivae, omnivae.distributed, omnivae.train" || { say "omnivae does not import"; exit 1; }
$PY bench/speed.py --help >/dev/null && $PY bench/ablation.py --help >/dev/null || { say "a bench script is broken"; exit 1; }
$PY -m torch.distributed.run --help >/dev/null || { say "torchrun is missing"; exit 1; }

if [ "$DRY" = 1 ]; then
  GPUS=1
else
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
  say "$($PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())")"
  if [ "$GPUS" -lt 1 ]; then say "no CUDA device: nothing to measure"; exit 1; fi
  if ! ls "${OMNIVAE_DATA_DIR:-/nonexistent}"/images_background* >/dev/null 2>&1 \
     || ! ls "${OMNIVAE_DATA_DIR}"/images_evaluation* >/dev/null 2>&1; then
    say "OMNIVAE_DATA_DIR must hold images_background and images_evaluation (zips or folders)"; exit 1
  fi
fi
export OMNIVAE_CACHE_DIR=${OMNIVAE_CACHE_DIR:-$WORK/cache}

# 1. The default preset end to end, one GPU. (`fetch` finds the zips and decodes them into the cache.)
stage data 600 $PY -m omnivae --quiet fetch
stage train_default 1800 $PY -m omnivae --quiet train --preset default --out "$WORK/default" --set epochs="$EPOCHS"
stage evaluate_default 1800 $PY -m omnivae --quiet evaluate "$WORK/default"
stage report_default 600 $PY -m omnivae --quiet report "$WORK/default"
show "$WORK/default/run.json" "$WORK/default/metrics.json"

# 2. Throughput of the loop and host waits, bf16 and compile off and on.
for settings in "precision=fp32 compile=false" "precision=bf16 compile=false" "precision=fp32 compile=true" \
                "precision=bf16 compile=true"; do
  sets=()
  for s in $settings; do sets+=(--set "$s"); done
  stage "speed_${settings// /_}" 900 $PY bench/speed.py --skip-data --device cuda --steps "$STEPS" "${sets[@]}"
done

# 3. Do bf16 and compile change the metrics beyond seed noise? (Scored on the validation alphabets.)
stage ablation_precision 5400 $PY bench/ablation.py --out "$WORK/precision" --epochs "$EPOCHS" --seeds $SEEDS \
  --jobs 1 --quick-eval --variant fp32: --variant bf16:precision=bf16 --variant compile:compile=true \
  --variant bf16_compile:precision=bf16,compile=true

# 4. The large preset's training.
stage train_large 3600 $PY -m omnivae --quiet train --preset large --out "$WORK/large" --set epochs="$LARGE_EPOCHS"
show "$WORK/large/run.json"

# 5. DDP with every visible GPU: stage 1's run again (its log and metrics are the reference; one GPU
#    still goes through DDP, with one process), then a short run resumed for one more epoch.
TORCHRUN=($PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m omnivae --quiet)
stage train_ddp 1800 "${TORCHRUN[@]}" train --preset default --out "$WORK/ddp" --set epochs="$EPOCHS"
stage evaluate_ddp 1800 $PY -m omnivae --quiet evaluate "$WORK/ddp" --nll-k 0 --no-figures
show "$WORK/ddp/run.json" "$WORK/ddp/log.jsonl" "$WORK/default/log.jsonl" "$WORK/ddp/metrics.json"
stage ddp_short 900 "${TORCHRUN[@]}" train --preset default --out "$WORK/ddp_resumed" --set epochs=1
stage ddp_resume 900 "${TORCHRUN[@]}" train --resume "$WORK/ddp_resumed" --set epochs=2
show "$WORK/ddp_resumed/log.jsonl"

say ""
say "results: $RESULTS"
