#!/usr/bin/env bash
# natter against quinn through the NAT lab (as root), one table in one run.
#
# For each loss rate, a lab with two full-cone NATs and random loss on the
# public bridge (both directions); in it, one way from host a to host b:
# `natter pipe` (figure: its `transferred` elapsed time, connected to all
# acknowledged, with the channel's counters), `examples/natter_mem.rs` (the
# same library transfer with its bytes made and dropped in memory, as
# quinn_pipe's are; connected to all acknowledged) and `examples/quinn_pipe.rs`
# with quinn's Cubic and BBR (figure: connected to the server confirming the
# byte count). Prints MiB/s for each, the better quinn, and natter's ratio to
# it (pipe and in memory); medians of RUNS runs, with the pipe's counters in
# its median run and the probe timeouts of every in-memory run.
#
# Usage: scripts/natlab-goodput.sh [MIB] [LOSS_PERCENT...]
#        (default: 64 MiB at 0 1 5 10 %; RUNS=N repeats each case;
#        RATE=MBIT [QUEUE_MS=MS] puts a tc tbf bottleneck on each router's
#        WAN, with a queue of MS ms, default 200)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [[ ${NATLAB_GOODPUT_INNER:-} != 1 ]]; then
    mib=${1:-64}
    shift || true
    losses=("${@:-0 1 5 10}")
    [[ $# -eq 0 ]] && losses=(0 1 5 10)
    runs=${RUNS:-1}
    (cd "$root" && cargo build --quiet --workspace --release && cargo build --quiet --release --example quinn_pipe --example natter_mem)
    export NATLAB_GOODPUT_INNER=1 GOODPUT_MIB=$mib
    export NATTER_BIN=$root/target/release/natter
    export NATTER_RENDEZVOUS_BIN=$root/target/release/natter-rendezvous
    export QUINN_BIN=$root/target/release/examples/quinn_pipe
    export NATTER_MEM_BIN=$root/target/release/examples/natter_mem
    results=$(mktemp)
    trap 'rm -f "$results"' EXIT
    for loss in "${losses[@]}"; do
        for run in $(seq "$runs"); do
            echo "loss $loss %, run $run of $runs" >&2
            GOODPUT_LOSS=$loss "$here/natlab.sh" run --nat-a full-cone --nat-b full-cone \
                --loss "$loss" ${RATE:+--rate "$RATE" --queue-ms "${QUEUE_MS:-200}"} -- "$0" >>"$results"
        done
    done
    bottleneck=${RATE:+, a ${RATE} Mbit/s tbf bottleneck with a ${QUEUE_MS:-200} ms queue}
    python3 - "$results" "$mib" "$bottleneck" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
mib = float(sys.argv[2])
print(f"{mib:.0f} MiB one way through two full-cone NATs{sys.argv[3]}, random loss both ways; MiB/s (median of runs)")
print(f"{'loss':>5} {'pipe':>8} {'memory':>8} {'cubic':>8} {'bbr':>8} {'ratio':>6} {'memory':>6}  natter pipe: lost (reorder/time/spurious) PTOs cuts; in memory: PTOs per run")
for loss in sorted({r["loss"] for r in rows}, key=float):
    runs = [r for r in rows if r["loss"] == loss]
    rate = lambda key: statistics.median(mib / (r[key] / 1000) for r in runs)
    natter, memory, cubic, bbr = rate("natter_ms"), rate("memory_ms"), rate("cubic_ms"), rate("bbr_ms")
    c = runs[len(runs) // 2]["channel"]
    print(f"{loss:>4}% {natter:>8.1f} {memory:>8.1f} {cubic:>8.1f} {bbr:>8.1f} {natter / max(cubic, bbr):>5.2f}x {memory / max(cubic, bbr):>5.2f}x"
          f"  {c['packets_lost']} ({c['lost_by_reordering']}/{c['lost_by_time']}/{c['spurious_losses']})"
          f" {c['probe_timeouts']} {c['congestion_events']};"
          f" {' '.join(str(r['memory_channel']['probe_timeouts']) for r in runs)}")
EOF
    exit 0
fi

# Inside the lab: natlab.sh run put LAB_ID, RV_IP, ... in the environment.
# shellcheck source=natlab-inner.sh
source "$here/natlab-inner.sh"
bytes=$((GOODPUT_MIB * 1024 * 1024))

start_rendezvous

# natter: b receives and sends nothing, a sends.
code="$((RANDOM % 900 + 100))-goodput-$RANDOM"
in_ns b "$NATTER_BIN" pipe --code "$code" --rendezvous "$RV_IP:7777" --json \
    </dev/null >/dev/null 2>"$work/b.err" &
receiver=$!
in_ns a bash -c "head -c $bytes /dev/zero | '$NATTER_BIN' pipe --code '$code' \
    --rendezvous '$RV_IP:7777' --json >/dev/null" 2>"$work/a.err"
wait "$receiver"
natter=$(grep '"transferred"' "$work/a.err") || { cat "$work/a.err" "$work/b.err" >&2; exit 1; }

# natter's library with its bytes in memory.
code="$((RANDOM % 900 + 100))-goodput-$RANDOM"
in_ns b "$NATTER_MEM_BIN" receive --code "$code" --rendezvous "$RV_IP:7777" 2>"$work/mb.err" &
receiver=$!
in_ns a "$NATTER_MEM_BIN" send --code "$code" --rendezvous "$RV_IP:7777" --bytes "$bytes" \
    >"$work/ma.out" 2>"$work/ma.err" || { cat "$work/ma.err" "$work/mb.err" >&2; exit 1; }
wait "$receiver"
memory=$(cat "$work/ma.out")

quinn_ms() { # CC
    in_ns b "$QUINN_BIN" serve --stun "$RV_IP:7777" --cert "$work/cert.der" --cc "$1" \
        >"$work/serve.out" 2>"$work/serve.err" &
    local server=$!
    for _ in $(seq 50); do
        grep -q reflexive "$work/serve.out" 2>/dev/null && break
        sleep 0.1
    done
    local addr
    addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["reflexive"])' "$work/serve.out")
    in_ns a "$QUINN_BIN" send --server "$addr" --cert "$work/cert.der" --bytes "$bytes" --cc "$1" \
        >"$work/send.out" 2>"$work/send.err" || { cat "$work/serve.err" "$work/send.err" >&2; exit 1; }
    wait "$server" || true
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["elapsed_ms"])' "$work/send.out"
}
cubic=$(quinn_ms cubic)
bbr=$(quinn_ms bbr)

python3 - "$natter" "$cubic" "$bbr" "$GOODPUT_LOSS" "$memory" <<'EOF'
import json, sys
natter, memory = json.loads(sys.argv[1]), json.loads(sys.argv[5])
print(json.dumps({"loss": sys.argv[4], "natter_ms": max(natter["elapsed_ms"], 1),
                  "memory_ms": max(memory["elapsed_ms"], 1), "memory_channel": memory["channel"],
                  "cubic_ms": max(int(sys.argv[2]), 1), "bbr_ms": max(int(sys.argv[3]), 1),
                  "channel": natter["channel"]}))
EOF
