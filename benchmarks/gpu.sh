#!/usr/bin/env bash
# The GPU check in one call: the CUDA tests (with the triton kernel's), then our trainer on the
# GPU: ptb-best and ptb-quick as CUDA graphs on the triton and static kernels (time to
# WordSim353 0.35; gensim on all the machine's cores), a per-phase step profile of the triton
# (at five launch shapes), static and index kernels, ptb-b64k on triton, then the static
# kernel eager and at 3 batch sizes (5 epochs, WordSim353 after every epoch), NCCL world size 1
# through the all-gather hook, the index kernel's trainer, and the padded path with and without
# torch.compile.
# Everything lands in OUTDIR; a summary is printed last.
#
#   benchmarks/gpu.sh OUTDIR            (or: OUT=OUTDIR benchmarks/gpu.sh)
#
# The package is used from this checkout (PYTHONPATH), not installed. Wheels for what the
# machine lacks (gensim, scipy, smart_open, wrapt, pyyaml, matplotlib, pytest, ..., built for
# its Python) can be put in .whl/ at the repository root; they go into a temporary folder.
# benchmarks/gpu_wheels.sh downloads the ones the GPU image lacks (gensim, which also holds
# WordSim353: without it no quality or time to quality is measured).
# PTB is read from $DIST_W2V_DATA, else shared/data/ptb or ../shared/data/ptb.
# Knobs: BATCHES ("4096 16384 65536"), EPOCHS (5), TTQ (0.35), COMPILE (1), PYTHON (python),
# BUDGET (500 s): each step has its own limit, cut to what is left of the budget; a step that
# would get under 20 s is skipped. The most important steps run first.
set -uo pipefail  # no -e: a failing step must not hide what the others measured

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
  echo "usage: benchmarks/gpu.sh OUTDIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python}
BATCHES=${BATCHES:-"4096 16384 65536"}
EPOCHS=${EPOCHS:-5}
TTQ=${TTQ:-0.35}
COMPILE=${COMPILE:-1}
BUDGET=${BUDGET:-500}
STARTED=$(date +%s)
STATUS=()

say() { echo "[gpu.sh +$(( $(date +%s) - STARTED ))s] $*"; }

# step NAME LIMIT_S COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - STARTED) ))
  if [ "$left" -lt 20 ]; then
    say "$name skipped: the ${BUDGET}s budget is spent"
    STATUS+=("$name: skipped (budget)")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s)"
  local begun=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  STATUS+=("$name: exit $rc, $(( $(date +%s) - begun ))s")
  tail -n 3 "$OUTDIR/$name.log"
  return 0
}

# -- environment ---------------------------------------------------------------------------
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  SITE=$(mktemp -d)
  say "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  for wheel in "$REPO"/.whl/*.whl; do
    # pip when it works; else a wheel is a zip laid out for import: unpack it.
    { "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$wheel" ||
      "$PY" -m zipfile -e "$wheel" "$SITE"; } >>"$OUTDIR/wheels.log" 2>&1 ||
      say "could not install $(basename "$wheel") (see wheels.log)"
  done
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
fi
if [ -z "${DIST_W2V_DATA:-}" ]; then
  for candidate in "$REPO/shared/data/ptb" "$REPO/../shared/data/ptb"; do
    if [ -f "$candidate/ptb.train.txt" ]; then export DIST_W2V_DATA=$candidate; break; fi
  done
fi
if [ ! -f "${DIST_W2V_DATA:-/nonexistent}/ptb.train.txt" ]; then
  echo "PTB not found: set DIST_W2V_DATA to a folder holding ptb.train.txt" >&2
  exit 2
fi
export WANDB_MODE=disabled
cd "$REPO" || exit 2

{
  nvidia-smi -L 2>&1
  "$PY" - <<'EOF'
import importlib, os, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda "
      f"{torch.version.cuda}, {os.cpu_count()} cores")
for name in ("numpy", "yaml", "matplotlib", "pytest", "scipy", "smart_open", "gensim"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', 'ok')}")
    except ImportError as exc:
        print(f"{name} MISSING ({exc})")
EOF
} | tee "$OUTDIR/environment.txt"
if grep -qE "^(numpy|yaml|matplotlib) MISSING" "$OUTDIR/environment.txt"; then
  # matplotlib: the trainer draws the loss curve when a run ends (dist_w2v/plot.py).
  echo "numpy, pyyaml and matplotlib are required: put their wheels in .whl/" >&2
  exit 2
fi
HAVE_PYTEST=1
grep -q "^pytest MISSING" "$OUTDIR/environment.txt" && HAVE_PYTEST=0
GENSIM_FLAG=()
grep -q "^gensim MISSING" "$OUTDIR/environment.txt" && GENSIM_FLAG=(--skip-gensim)

# lr for a global batch B: the seed's 0.002 at 512, scaled by sqrt(B / 512).
lr_for() { "$PY" -c "print(f'{0.002 * ($1 / 512) ** 0.5:.5f}')"; }

# Runs and checkpoints stay in a temp folder; their logs and metrics are copied to OUTDIR.
WORK=$(mktemp -d)
bench() {  # bench NAME LIMIT_S ARGS...
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" -m dist_w2v.cli bench --device cuda --out "$OUTDIR/$name.md" \
    --work-dir "$WORK/$name" "$@"
  mkdir -p "$OUTDIR/$name"
  cp "$WORK/$name"/*.log "$WORK/$name"/config.yaml "$OUTDIR/$name/" 2>/dev/null
  cp "$WORK/$name/ours/metrics.jsonl" "$OUTDIR/$name/" 2>/dev/null
  return 0
}

# -- tests ---------------------------------------------------------------------------------
if [ "$HAVE_PYTEST" = 1 ]; then
  step tests_gpu 200 "$PY" -m pytest -q -rA -s -p no:cacheprovider tests/test_gpu.py \
    tests/test_triton_kernel.py
else
  say "pytest missing: tests skipped (put a pytest wheel in .whl/)"
  STATUS+=("tests: skipped, no pytest")
fi

# -- throughput and quality ----------------------------------------------------------------
# Issue 10's targets first: ptb-best (B=4096, sgd, 20 epochs) and ptb-quick (B=8192, capped
# sgd, 8 epochs) captured as a CUDA graph, with time to 0.35, on the triton kernel and on the
# static kernel (CUDA's default), then the static kernel eager.
bench bench_best_triton_graph 100 --config configs/ptb-best.yaml --ttq "$TTQ" --skip-gensim \
  train.kernel=triton train.cuda_graph=true
bench bench_best_graph 100 --config configs/ptb-best.yaml --ttq "$TTQ" "${GENSIM_FLAG[@]}" \
  train.cuda_graph=true
bench bench_quick_triton_graph 60 --config configs/ptb-quick.yaml --ttq "$TTQ" --skip-gensim \
  train.kernel=triton train.cuda_graph=true train.threads=0
step step_profile 90 "$PY" benchmarks/step_profile.py --device cuda --batch-sizes 4096 65536 \
  --optimizers sgd rowwise_adagrad --kernels triton static index --rounds 3 --steps 5 \
  --triton-shapes 32x4 16x4 64x4 32x8 64x8
bench bench_triton_b65536 80 --config configs/ptb-b64k.yaml --ttq "$TTQ" \
  --skip-gensim train.kernel=triton train.cuda_graph=true
bench bench_quick_graph 60 --config configs/ptb-quick.yaml --ttq "$TTQ" --skip-gensim \
  train.cuda_graph=true train.threads=0
bench bench_best_eager 100 --config configs/ptb-best.yaml --ttq "$TTQ" --skip-gensim
for batch in $BATCHES; do
  bench "bench_b$batch" 100 --batch-size "$batch" --lr "$(lr_for "$batch")" --epochs "$EPOCHS" \
    --ttq "$TTQ" --skip-gensim
done
bench bench_nccl_allgather_b16384 90 --batch-size 16384 --lr "$(lr_for 16384)" --epochs 2 \
  --torchrun --exchange allgather --skip-gensim
bench bench_index_b16384 90 --batch-size 16384 --lr "$(lr_for 16384)" --epochs 2 \
  --skip-gensim train.kernel=index
bench bench_padded_b16384 90 --batch-size 16384 --lr "$(lr_for 16384)" --epochs 2 \
  --path padded --skip-gensim
if [ "$COMPILE" = 1 ]; then
  bench bench_padded_compiled_b16384 150 --batch-size 16384 --lr "$(lr_for 16384)" --epochs 2 \
    --path padded --skip-gensim train.compile=true
fi
if [ "$HAVE_PYTEST" = 1 ]; then  # the CPU equality tests, on this machine's torch
  step tests_fast_path 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py
fi

# -- summary -------------------------------------------------------------------------------
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  sed 's/^/    /' "$OUTDIR/environment.txt"
  echo
  echo "## Steps"
  printf -- '- %s\n' "${STATUS[@]}"
  for log in tests_gpu tests_fast_path; do
    [ -f "$OUTDIR/$log.log" ] || continue
    echo
    echo "## $log"
    grep -E "passed|failed|skipped|rror|PASSED|FAILED|SKIPPED|XFAIL|XPASS|host syncs|center words/s" \
      "$OUTDIR/$log.log" |
      sed 's/^/    /'
  done
  for table in "$OUTDIR"/bench_*.md; do
    [ -f "$table" ] || continue
    echo
    echo "## $(basename "$table" .md)"
    echo
    grep -v '^Machine:' "$table"
  done
  if [ -f "$OUTDIR/step_profile.log" ]; then
    echo
    echo "## step profile (ms per step, synchronised per phase)"
    echo
    grep -E '^(epoch build|\|)' "$OUTDIR/step_profile.log"
  fi
  echo
  grep -h '^Machine:' "$OUTDIR"/bench_*.md 2>/dev/null | head -1
  echo "Total: $(( $(date +%s) - STARTED )) s"
} >"$OUTDIR/summary.md"
cat "$OUTDIR/summary.md"
