#!/usr/bin/env bash
# The first thing to run on a GPU machine: does the runner work there, and how fast is it?
#
#   bash scripts/gpu_check.sh [REPORT]        # REPORT: where the numbers go (default docs/benchmarks.md, appended)
#
# In order, each step bounded by a timeout (about 8 minutes in all on one H100/H200):
#   1. the card (nvidia-smi), torch and CUDA versions;
#   2. the default experiment through the CLI on the GPU (trainer.device=cuda), checked to complete;
#   3. the tests that need CUDA (bf16 curvature, landscapes, long-tailed data on the device);
#   4. scripts/bench_train.py --device cuda, SGD then SAM (runner vs a minimal loop vs the DataLoader pipeline);
#   5. scripts/bench_analysis.py --device cuda (landscape grid, HVPs, Lanczos);
#   6. scripts/bench_grokking.py --device cuda for a few thousand full-batch steps;
#   7. scripts/bench_data.py: the streamed image folder against timm's loader and a DataLoader, training a timm
#      ResNet-50 at 224 px, and device-resident batches of the same shape (is the loader the bottleneck?);
#   8. with 2+ GPUs: trainer.devices=2 (nccl), the default run and SAM with both perturbation syncs.
# A section "GPU check, <card>, <date>" with every step's output is appended to REPORT (step by step); the script exits non-zero
# if any step failed (the section says which), and at once, with one line, where there is no CUDA device.
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs the same steps on the CPU with tiny sizes (tests/test_gpu_check.py),
# so everything but the device itself is tested here.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-docs/benchmarks.md}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine" >&2
  exit 2
fi

if [ "$QUICK" = 1 ]; then
  TRAIN_ARGS="--quick --size 256 --batch-size 64 --rounds 1 --epochs 1 --workers 1"
  ANALYSIS_ARGS="--grid 3 --samples 64 --hvp-samples 64 --batch-size 64 --repeats 1 --naive-points 2 --lanczos-iterations 3"
  GROK_ARGS="--experiments grok_adamw --max-steps 10 --timing-steps 5 --rounds 1"; RUN_ARGS="trainer.epochs=1"; LIMIT=300
  DATA_ARGS="--images 120 --size 32 --batch 32 --workers 1 --epochs 1 --model resnet18"
else  # per-step limits: 30 + 7 x 90 s at most, inside the device tool's 10 minutes per command
  TRAIN_ARGS="--rounds 2 --epochs 3"; ANALYSIS_ARGS="--model resnet18 --dataset synthetic"
  GROK_ARGS="--max-steps 3000"; RUN_ARGS="trainer.epochs=3"; LIMIT=90
  DATA_ARGS="--images 2000 --size 224 --batch 128 --workers 8 --epochs 2 --model resnet50"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$REPORT")"
SECTION=$REPORT  # each step is appended as it ends: a run cut short still leaves the steps it finished
FAILED=()

card=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (CPU)')" 2>/dev/null)
versions=$("$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')" 2>/dev/null)
{
  echo
  echo "## GPU check, $card, $(date -u +%Y-%m-%d)"
  echo
  echo "\`bash scripts/gpu_check.sh\` ($versions; trainer.device=$DEVICE$([ "$QUICK" = 1 ] && echo ', quick sizes')). Each step's output:"
} >> "$SECTION"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep its output's tail in the section, note a failure
  local name=$1 limit=$2; shift 2
  local log=$WORK/step.log start rc
  start=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  echo "gpu_check: $name: exit $rc in ${took} s" >&2
  {
    echo
    echo "### $name (exit $rc, ${took} s)"
    echo '```'
    tail -n 40 "$log"
    echo '```'
  } >> "$SECTION"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

step "the card" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'nvidia-smi: not here'; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), \"device(s)\")'"
step "default experiment through the CLI" "$LIMIT" "$PY" -m runner "trainer.device=$DEVICE" logger=none \
  trainer.progress=false $RUN_ARGS "hydra.run.dir=$WORK/run"
step "the tests that need CUDA" "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_curvature.py::test_random_vectors_identical_on_cuda \
  tests/test_landscape.py::test_directions_identical_on_cpu_and_gpu \
  tests/test_long_tailed.py::test_metric_updates_do_not_sync_the_host_on_cuda
step "bench_train SGD" "$LIMIT" "$PY" scripts/bench_train.py --device "$DEVICE" --optimizer sgd $TRAIN_ARGS
step "bench_train SAM" "$LIMIT" "$PY" scripts/bench_train.py --device "$DEVICE" --optimizer sam $TRAIN_ARGS \
  --no-dataloader
step "bench_analysis" "$LIMIT" "$PY" scripts/bench_analysis.py --device "$DEVICE" $ANALYSIS_ARGS
step "bench_grokking" "$LIMIT" "$PY" scripts/bench_grokking.py --device "$DEVICE" $GROK_ARGS
step "bench_data" "$LIMIT" "$PY" scripts/bench_data.py --device "$DEVICE" --root "$WORK/images" $DATA_ARGS
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "${gpus:-0}" -ge 2 ]; then  # nccl over 2 GPUs: the default run, then SAM, local and global
  step "trainer.devices=2 (nccl)" "$LIMIT" bash -c "$PY -m runner trainer.device=cuda trainer.devices=2 logger=none \
    trainer.progress=false $RUN_ARGS hydra.run.dir=$WORK/run2 && $PY -m runner -m trainer.device=cuda \
    trainer.devices=2 optimizer=sam optimizer.perturbation_sync=local,global logger=none trainer.progress=false \
    $RUN_ARGS hydra.sweep.dir=$WORK/sweep2"
else
  { echo; echo "### trainer.devices=2: not run (${gpus:-0} CUDA device(s) here; nccl needs one GPU per process)"; } >> "$SECTION"
fi
{
  echo
  if [ ${#FAILED[@]} -eq 0 ]; then echo "Every step passed."; else echo "Failed: ${FAILED[*]}."; fi
} >> "$SECTION"
echo "gpu_check: section appended to $REPORT" >&2
if [ ${#FAILED[@]} -ne 0 ]; then
  echo "gpu_check: failed: ${FAILED[*]}" >&2
  exit 1
fi
