#!/usr/bin/env bash
# Chat latency through the NAT lab (as root): how long a small message takes
# from send to delivery when the path loses packets.
#
# For each loss rate, a lab with two full-cone NATs and random loss on the
# public bridge (both directions); in it, host a sends MESSAGES messages of
# 100 bytes to host b, one every INTERVAL_MS ms, with
# `examples/natter_mem.rs chat-send`, and b reports each one's latency from
# the send stamp (CLOCK_MONOTONIC, which the lab's namespaces share). Prints
# the minimum (the path's one-way floor), p50, p99 and the maximum in ms,
# and p50 and p99 as multiples of the floor; medians of RUNS runs.
#
# Usage: scripts/natlab-latency.sh [MESSAGES] [INTERVAL_MS] [LOSS_PERCENT...]
#        (default: 1000 messages, one every 10 ms, at 0 1 5 %; RUNS=N
#        repeats each case)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [[ ${NATLAB_LATENCY_INNER:-} != 1 ]]; then
    messages=${1:-1000}
    interval=${2:-10}
    shift 2 || shift $# || true
    losses=("$@")
    [[ $# -eq 0 ]] && losses=(0 1 5)
    runs=${RUNS:-1}
    (cd "$root" && cargo build --quiet --workspace --release && cargo build --quiet --release --example natter_mem)
    export NATLAB_LATENCY_INNER=1 LATENCY_MESSAGES=$messages LATENCY_INTERVAL_MS=$interval
    export NATTER_RENDEZVOUS_BIN=$root/target/release/natter-rendezvous
    export NATTER_MEM_BIN=$root/target/release/examples/natter_mem
    results=$(mktemp)
    trap 'rm -f "$results"' EXIT
    for loss in "${losses[@]}"; do
        for run in $(seq "$runs"); do
            echo "loss $loss %, run $run of $runs" >&2
            LATENCY_LOSS=$loss "$here/natlab.sh" run --nat-a full-cone --nat-b full-cone \
                --loss "$loss" -- "$0" >>"$results"
        done
    done
    python3 - "$results" "$messages" "$interval" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{sys.argv[2]} messages of 100 bytes, one every {sys.argv[3]} ms, through two full-cone NATs, "
      "random loss both ways; ms from send to delivery (median of runs)")
print(f"{'loss':>5} {'min':>7} {'p50':>7} {'p99':>7} {'max':>8}  {'p50/min':>7} {'p99/min':>7}")
for loss in sorted({r["loss"] for r in rows}, key=float):
    runs = [r for r in rows if r["loss"] == loss]
    m = lambda key: statistics.median(r[key] for r in runs)
    floor = max(m("min_ms"), 0.001)
    print(f"{loss:>4}% {m('min_ms'):>7.2f} {m('p50_ms'):>7.2f} {m('p99_ms'):>7.2f} {m('max_ms'):>8.2f}"
          f"  {m('p50_ms') / floor:>7.1f} {m('p99_ms') / floor:>7.1f}")
EOF
    exit 0
fi

# Inside the lab: natlab.sh run put LAB_ID, RV_IP, ... in the environment.
# shellcheck source=natlab-inner.sh
source "$here/natlab-inner.sh"

start_rendezvous

code="$((RANDOM % 900 + 100))-latency-$RANDOM"
in_ns b "$NATTER_MEM_BIN" chat-receive --code "$code" --rendezvous "$RV_IP:7777" \
    >"$work/b.out" 2>"$work/b.err" &
receiver=$!
in_ns a "$NATTER_MEM_BIN" chat-send --code "$code" --rendezvous "$RV_IP:7777" \
    --messages "$LATENCY_MESSAGES" --interval-ms "$LATENCY_INTERVAL_MS" \
    2>"$work/a.err" || { cat "$work/a.err" "$work/b.err" >&2; exit 1; }
wait "$receiver" || { cat "$work/a.err" "$work/b.err" >&2; exit 1; }
python3 - "$work/b.out" "$LATENCY_LOSS" <<'EOF'
import json, sys
row = json.load(open(sys.argv[1]))
row["loss"] = sys.argv[2]
print(json.dumps(row))
EOF
