#!/usr/bin/env bash
# Train on this machine under torchrun: one process per visible GPU, or 2 processes on a CPU box.
#
#   launch/train.sh --config configs/ptb.yaml --run-dir runs/ptb [key=value ...]
#   NPROC=4 launch/train.sh --config configs/ptb.yaml train.batch_size=2048
#
# Every argument goes to `dist-w2v train`. train.batch_size is the global batch: each of the
# NPROC processes takes batch_size / NPROC examples per step, so a config trains the same run on
# any number of processes (the batch size must divide by NPROC).
#
# The arguments are checked once (`dist-w2v train --check --world-size NPROC`: config, device,
# backend, shard split, run dir, data) before torchrun starts, so a mistake is one line here
# rather than one per worker followed by torchrun's own report.
set -euo pipefail

# GPUs CUDA will show the workers: CUDA_VISIBLE_DEVICES when it is set (CUDA stops at the first
# invalid entry, such as -1), else every GPU the driver lists. 0 without a driver.
visible_gpus() {
  local count=0 entry line listing
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local IFS=,
    for entry in $CUDA_VISIBLE_DEVICES; do
      [[ -z "$entry" || "$entry" == -* ]] && break
      count=$((count + 1))
    done
  elif listing=$(nvidia-smi -L 2>/dev/null); then
    while IFS= read -r line; do
      if [[ "$line" == "GPU "* ]]; then count=$((count + 1)); fi
    done <<< "$listing"
  fi
  echo "$count"
}

if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(visible_gpus)
  if (( NPROC == 0 )); then NPROC=2; fi
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "dist-w2v: error: NPROC=$NPROC must be a whole number of processes >= 1 (or unset:" \
    "one per GPU, else 2)" >&2
  exit 2
fi

dist-w2v train --check --world-size "$NPROC" "$@"

exec torchrun --standalone --nproc_per_node="$NPROC" -m dist_w2v.cli train "$@"
