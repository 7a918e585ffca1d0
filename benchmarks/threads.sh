#!/usr/bin/env bash
# Center words/s of one short training run for train.threads 1 and 2, OMP_WAIT_POLICY at libgomp's
# default (what dist-w2v leaves it at) and PASSIVE, on a quiet machine and with one core kept
# busy by a competing process. Run it on an otherwise idle machine (it makes its own competing
# load): the numbers are only worth comparing within one invocation.
#
#   benchmarks/threads.sh                         # PTB from $DIST_W2V_DATA, defaults below
#   REPEATS=5 MAX_SENTENCES=20000 benchmarks/threads.sh train.batch_size=16384
#
# Knobs (environment): CONFIG, MAX_SENTENCES (the slice trained on), REPEATS (runs per cell; the
# median is printed), BUSY_CORE (the core the competing loop is pinned to), PYTHON, OUT (scratch
# folder, kept). Extra arguments are passed to `dist-w2v train` as config overrides.
set -euo pipefail

CONFIG=${CONFIG:-configs/ptb-best.yaml}
MAX_SENTENCES=${MAX_SENTENCES:-10000}
REPEATS=${REPEATS:-3}
BUSY_CORE=${BUSY_CORE:-0}
PYTHON=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t dist-w2v-threads.XXXXXX)}
mkdir -p "$OUT"

busy_pid=""
stop_busy() {
    if [[ -n "$busy_pid" ]]; then
        kill "$busy_pid" 2>/dev/null || true
        wait "$busy_pid" 2>/dev/null || true
        busy_pid=""
    fi
}
trap stop_busy EXIT

start_busy() {
    taskset -c "$BUSY_CORE" "$PYTHON" -c 'while True: pass' &
    busy_pid=$!
    sleep 1  # let it reach its core
}

# One run: prints the epoch's center words/s from metrics.jsonl.
words_per_s() {
    local threads=$1 policy=$2 run_dir=$3
    shift 3
    # An empty OMP_WAIT_POLICY is libgomp's own default (spin a while, then sleep): dist-w2v
    # sets PASSIVE only where the variable is not set at all.
    local value=$policy
    [[ "$policy" == libgomp-default ]] && value=""
    env OMP_WAIT_POLICY="$value" "$PYTHON" -m dist_w2v.cli train --config "$CONFIG" \
        --run-dir "$run_dir" train.epochs=1 "data.max_sentences=$MAX_SENTENCES" \
        "train.threads=$threads" eval.every_epochs=0 ckpt.keep=1 "$@" >"$run_dir.log" 2>&1
    "$PYTHON" - "$run_dir/metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print(round([r for r in records if r["kind"] == "epoch"][-1]["center_words_per_s"]))
EOF
}

median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

echo "dist-w2v threads benchmark: $CONFIG, $MAX_SENTENCES sentences, 1 epoch, median of" \
     "$REPEATS; $(nproc) cores; scratch in $OUT"
printf '| load | train.threads | OMP_WAIT_POLICY | center words/s (median) | runs |\n'
printf '|---|---:|---|---:|---|\n'
for load in quiet one-core-busy; do
    [[ "$load" == one-core-busy ]] && start_busy
    for threads in 1 2; do
        for policy in libgomp-default PASSIVE; do
            results=()
            for repeat in $(seq 1 "$REPEATS"); do
                run_dir="$OUT/$load-t$threads-$policy-$repeat"
                rm -rf "$run_dir"
                results+=("$(words_per_s "$threads" "$policy" "$run_dir" "$@")")
            done
            printf '| %s | %s | %s | %s | %s |\n' "$load" "$threads" "$policy" \
                "$(printf '%s\n' "${results[@]}" | median)" "${results[*]}"
        done
    done
    stop_busy
done
