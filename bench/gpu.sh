#!/usr/bin/env bash
# The GPU check, in one go, on a machine with one or more NVIDIA GPUs. Stages, most wanted first:
#
#   1. the default preset end to end (decode the data, then train, evaluate with the likelihood,
#      report), timed per stage;
#   2. the training loop against a hand-written loop (bench/speed.py), bf16 and fp32, eager and
#      compiled (torch.compile's default mode, and reduce-overhead: CUDA graphs), and the host
#      waits per step (CUDA sync debug mode);
#   3. the DDP path with every visible GPU (torchrun): a short run, resumed once;
#   4. the `large` preset's training;
#   5. stage 1's training again through DDP (its log against stage 1's);
#   6. the metrics of bf16 and compile against fp32, two seeds each (bench/ablation.py, validation
#      split; hours, so only without --budget).
#
# Writes bench/results/gpu_<date>.txt: every stage's command, exit status, seconds and output tail
# (the logs, progress bars included, stay in WORK). A stage that fails or runs past its time limit
# is recorded and the next one starts.
#
#   OMNIVAE_DATA_DIR=/path/to/omniglot bash bench/gpu.sh [--dry-run] [--quick] [--budget SECONDS]
#
# The Omniglot zips must already be in OMNIVAE_DATA_DIR (the check never downloads).
# --quick: fewer epochs everywhere (2; the `large` preset 3), to check that every stage runs.
# --budget SECONDS: stop starting stages after that many seconds; each stage's limit is cut to what
#   is left (for a lent machine with a fixed time; stage 6 is skipped).
# --dry-run: no GPU, no data: writes the results file with the commands each stage would run,
#   after running the checks that need neither (the scripts' --help, the package's import).
# Environment: PYTHON (default python), WORK (run folders; default a new folder under /tmp),
# EPOCHS (the default preset's epochs; default the preset's own), LARGE_EPOCHS (default the
# preset's own, 3 with --quick or --budget: its time per epoch is the number), SEEDS (stage 6's;
# default "0 1"), PRIMED_CACHE (a folder whose files go into the cache after decoding, for example
# a swap judge trained before: stage 1 then times evaluation "after the data are cached").
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
QUICK=0
BUDGET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    *) echo "usage: bench/gpu.sh [--dry-run] [--quick] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "--budget needs whole seconds, got $BUDGET" >&2; exit 2 ;; esac

PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
WORK=${WORK:-$(mktemp -d /tmp/omnivae_gpu.XXXXXX)}
SEEDS=${SEEDS:-"0 1"}
START=$(date +%s)
EPOCH_SET=()
if [ "$QUICK" = 1 ]; then
  EPOCHS=${EPOCHS:-2}; LARGE_EPOCHS=${LARGE_EPOCHS:-3}; STEPS=30
else
  STEPS=200
  if [ "$BUDGET" != 0 ]; then LARGE_EPOCHS=${LARGE_EPOCHS:-3}; STEPS=100; fi
fi
[ -n "${EPOCHS:-}" ] && EPOCH_SET=(--set epochs="$EPOCHS")
LARGE_SET=()
[ -n "${LARGE_EPOCHS:-}" ] && LARGE_SET=(--set epochs="$LARGE_EPOCHS")
mkdir -p bench/results "$WORK"
RESULTS=bench/results/gpu_$(date +%Y%m%d_%H%M%S)$([ "$DRY" = 1 ] && echo _dry).txt

say() { echo "$*" | tee -a "$RESULTS"; }

# stage NAME LIMIT_SECONDS COMMAND...: run it (or, dry, record it), time it, keep its output's tail.
# With --budget, the limit is cut to the seconds left, and a stage with under 20 left is skipped.
stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$BUDGET" != 0 ]; then
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
      say ""; say "## $name: skipped (budget of ${BUDGET}s spent)"; return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  say ""
  say "## $name (limit ${limit}s)"
  say "\$ $(printf '%q ' "$@")"
  if [ "$DRY" = 1 ]; then
    say "(dry run: not run)"
    return 0
  fi
  local log="$WORK/$name.log" start rc ms
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  tr '\r' '\n' <"$log" | grep -v '^\s*$' | tail -n 30 | tee -a "$RESULTS"
  if [ "$rc" != 0 ]; then  # the cause, often above the tail (torchrun prints its own traceback last)
    grep -m 3 -E '^(\[rank[0-9]+\]: )?[A-Za-z.]*(Error|Exception)|error:' "$log" | sed 's/^/first error: /' | tee -a "$RESULTS"
  fi
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
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with changes)'), default epochs ${EPOCHS:-preset}, large epochs ${LARGE_EPOCHS:-preset}, budget ${BUDGET}s, work $WORK"

# Checks that need neither a GPU nor data: the package imports, the scripts parse their options.
$PY -c "import omnivae, omnivae.distributed, omnivae.train" || { say "omnivae does not import"; exit 1; }
$PY bench/speed.py --help >/dev/null && $PY bench/ablation.py --help >/dev/null || { say "a bench script is broken"; exit 1; }
$PY -m torch.distributed.run --help >/dev/null || { say "torchrun is missing"; exit 1; }

if [ "$DRY" = 1 ]; then
  GPUS=1
else
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
  say "$($PY -c "import os, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count(), 'CPU cores', os.cpu_count())")"
  if [ "$GPUS" -lt 1 ]; then say "no CUDA device: nothing to measure"; exit 1; fi
  if ! ls "${OMNIVAE_DATA_DIR:-/nonexistent}"/images_background* >/dev/null 2>&1 \
     || ! ls "${OMNIVAE_DATA_DIR}"/images_evaluation* >/dev/null 2>&1; then
    say "OMNIVAE_DATA_DIR must hold images_background and images_evaluation (zips or folders)"; exit 1
  fi
fi
export OMNIVAE_CACHE_DIR=${OMNIVAE_CACHE_DIR:-$WORK/cache}

# 1. The default preset end to end, one GPU. (`fetch` finds the zips and decodes them into the cache.)
stage data 300 $PY -m omnivae --quiet fetch
if [ -n "${PRIMED_CACHE:-}" ] && [ "$DRY" = 0 ]; then
  cp "$PRIMED_CACHE"/* "$OMNIVAE_CACHE_DIR"/ && say "cache primed with: $(ls "$PRIMED_CACHE" | tr '\n' ' ')"
fi
stage train_default 600 $PY -m omnivae --quiet train --preset default --out "$WORK/default" "${EPOCH_SET[@]}"
stage evaluate_default 600 $PY -m omnivae evaluate "$WORK/default"  # progress bars: each part's time is in the log
stage report_default 300 $PY -m omnivae --quiet report "$WORK/default"
show "$WORK/default/run.json" "$WORK/default/metrics.json"

# 2. Throughput of the loop and host waits: bf16 (the default's) and fp32, eager and compiled (its
#    first steps compile; speed.py warms up before timing).
speed() {  # speed LIMIT_SECONDS KEY=VALUE...
  local limit=$1
  shift
  local sets=() name="$*"
  for s in "$@"; do sets+=(--set "$s"); done
  stage "speed_${name// /_}" "$limit" $PY bench/speed.py --skip-data --skip-sampling --device cuda --steps "$STEPS" "${sets[@]}"
}
speed 120 precision=bf16 compile=false
speed 120 precision=fp32 compile=false
speed 180 precision=bf16 compile=true
speed 180 precision=bf16 compile=true compile_mode=reduce-overhead

# 3. DDP with every visible GPU (one GPU still goes through DDP, with one process): a short run,
#    resumed for one more epoch.
TORCHRUN=($PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m omnivae --quiet)
stage ddp_short 300 "${TORCHRUN[@]}" train --preset default --out "$WORK/ddp_resumed" --set epochs=1
stage ddp_resume 300 "${TORCHRUN[@]}" train --resume "$WORK/ddp_resumed" --set epochs=2
show "$WORK/ddp_resumed/log.jsonl" "$WORK/ddp_resumed/run.json"

# 4. The large preset's training.
stage train_large 1800 $PY -m omnivae --quiet train --preset large --out "$WORK/large" "${LARGE_SET[@]}"
show "$WORK/large/run.json"

# 5. Stage 1's training again through DDP: its log is to match stage 1's.
stage train_ddp 600 "${TORCHRUN[@]}" train --preset default --out "$WORK/ddp" "${EPOCH_SET[@]}"
show "$WORK/ddp/run.json" "$WORK/ddp/log.jsonl" "$WORK/default/log.jsonl"

speed 180 precision=fp32 compile=true
speed 180 precision=fp32 compile=true compile_mode=reduce-overhead

# 6. Do bf16 and compile change the metrics beyond seed noise? (Scored on the validation alphabets.)
if [ "$BUDGET" = 0 ]; then
  stage ablation_precision 5400 $PY bench/ablation.py --out "$WORK/precision" --seeds $SEEDS --jobs 1 --quick-eval \
    --epochs "${EPOCHS:-28}" --variant fp32:precision=fp32 --variant bf16:precision=bf16 \
    --variant compile:precision=fp32,compile=true --variant bf16_compile:precision=bf16,compile=true
fi

say ""
say "results: $RESULTS ($(( $(date +%s) - START )) s)"
