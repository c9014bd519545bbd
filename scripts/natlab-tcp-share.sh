#!/usr/bin/env bash
# natter against a TCP flow through one bottleneck, in the NAT lab (as root).
#
# Router A's WAN egress is capped with tc tbf (natlab.sh --rate). Host a sends
# a natter pipe to host b (behind router B) and, at the same moment, a TCP
# stream (the kernel's default congestion control) to the rendezvous host.
# Both leave through router A's cap, so they compete for it. Prints each
# flow's goodput over the measurement window (after a warm-up) and natter's
# share of the two.
#
# Usage: scripts/natlab-tcp-share.sh [RATE_MBIT] [SECONDS] [WARMUP_SECONDS]
# QUEUE_MS sets how many milliseconds of traffic the cap's queue holds
# (default 200). TCP_CC picks the TCP flow's congestion control (one of
# /proc/sys/net/ipv4/tcp_available_congestion_control, set on its socket;
# default: the kernel's). COMPETITOR=natter runs a second natter pipe (a to
# b, started the same way) instead of the TCP flow. BASELINE_CC=CC puts a
# TCP flow with congestion control CC in natter's place, to show what a
# standard flow gets against the same competitor. RUNS=N repeats the
# measurement in a fresh lab each time and ends with the median share.
# NATTER_BIN / NATTER_RENDEZVOUS_BIN override the binaries (default:
# target/release/ of this checkout, built if missing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [[ ${NATLAB_TCP_SHARE_INNER:-} != 1 ]]; then
    rate=${1:-20}
    secs=${2:-30}
    warmup=${3:-5}
    natter=${NATTER_BIN:-$root/target/release/natter}
    rendezvous=${NATTER_RENDEZVOUS_BIN:-$root/target/release/natter-rendezvous}
    if [[ ! -x $natter || ! -x $rendezvous ]]; then
        (cd "$root" && cargo build --workspace --release)
    fi
    export NATLAB_TCP_SHARE_INNER=1 NATTER_BIN=$natter NATTER_RENDEZVOUS_BIN=$rendezvous
    export SHARE_RATE=$rate SHARE_SECS=$secs SHARE_WARMUP=$warmup
    runs=${RUNS:-1}
    shares=()
    for run in $(seq "$runs"); do
        [[ $runs == 1 ]] || echo "run $run of $runs"
        out=$("$here/natlab.sh" run --rate "$rate" --queue-ms "${QUEUE_MS:-200}" -- "$0")
        echo "$out"
        shares+=("$(sed -n 's/^  share of the first flow \([0-9.]*\),.*/\1/p' <<<"$out")")
    done
    if [[ $runs != 1 ]]; then
        python3 - "${shares[@]}" <<'EOF'
import statistics, sys
v = sorted(map(float, sys.argv[1:]))
listed = ", ".join(f"{x:.2f}" for x in v)
print(f"share of the first flow over {len(v)} runs: median {statistics.median(v):.2f} ({listed})")
EOF
    fi
    exit 0
fi

# Inside the lab: natlab.sh run put LAB_ID, RV_IP, ... in the environment.
# shellcheck source=natlab-inner.sh
source "$here/natlab-inner.sh"

# Reads a byte stream (stdin, or one TCP connection on PORT) and logs
# "seconds-since-start total-bytes" every 100 ms.
counter='
import socket, sys, time
port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if port:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1)
    conn, _ = server.accept()
    read = lambda: conn.recv(1 << 16)
else:
    read = lambda: sys.stdin.buffer.read1(1 << 16)
start, total, last = time.monotonic(), 0, 0.0
while True:
    chunk = read()
    if not chunk:
        break
    total += len(chunk)
    now = time.monotonic() - start
    if now - last >= 0.1:
        print(f"{now:.2f} {total}", flush=True)
        last = now
'
# Sends zeros to HOST:PORT for SECONDS.
tcp_source='
import socket, sys, time
sock = socket.socket()
if len(sys.argv) > 4:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[4].encode())
sock.connect((sys.argv[1], int(sys.argv[2])))
end, block = time.monotonic() + float(sys.argv[3]), bytes(1 << 16)
while time.monotonic() < end:
    sock.sendall(block)
'

start_rendezvous
in_ns rv python3 -c "$counter" 5001 >"$work/tcp.log" &
wait_listening rv t 5001
if [[ -n ${BASELINE_CC:-} ]]; then
    in_ns rv python3 -c "$counter" 5002 >"$work/natter.log" &
    wait_listening rv t 5002
    in_ns a python3 -c "$tcp_source" "$RV_IP" 5002 "$SHARE_SECS" "$BASELINE_CC" &
    first="TCP ($BASELINE_CC)"
else
    code="$((RANDOM % 900 + 100))-share-$RANDOM"
    in_ns b "$NATTER_BIN" pipe --code "$code" --rendezvous "$RV_IP:7777" --json \
        2>"$work/b.err" | python3 -c "$counter" >"$work/natter.log" &
    in_ns a bash -c "head -c $((SHARE_SECS * 1024 * 1024 * 1024)) /dev/zero | timeout $SHARE_SECS \
        '$NATTER_BIN' pipe --code '$code' --rendezvous '$RV_IP:7777' --json" 2>"$work/a.err" >/dev/null &
    # Start the other flow once natter is connected, so both run over the
    # same window.
    for _ in $(seq 100); do
        grep -q '"connected"' "$work/a.err" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '"connected"' "$work/a.err" || { cat "$work/a.err" "$work/b.err" >&2; exit 1; }
    first=natter
fi
if [[ ${COMPETITOR:-tcp} == natter ]]; then
    code2="$((RANDOM % 900 + 100))-share2-$RANDOM"
    in_ns b "$NATTER_BIN" pipe --code "$code2" --rendezvous "$RV_IP:7777" --json \
        2>"$work/b2.err" | python3 -c "$counter" >"$work/tcp.log" &
    in_ns a bash -c "head -c $((SHARE_SECS * 1024 * 1024 * 1024)) /dev/zero | timeout $SHARE_SECS \
        '$NATTER_BIN' pipe --code '$code2' --rendezvous '$RV_IP:7777' --json" 2>"$work/a2.err" >/dev/null &
else
    in_ns a python3 -c "$tcp_source" "$RV_IP" 5001 "$SHARE_SECS" ${TCP_CC:+"$TCP_CC"} &
fi
sleep "$SHARE_SECS"
sleep 1

# Goodput over [warmup, secs - 1] of each log's own clock.
rate_of() {
    python3 - "$1" "$SHARE_WARMUP" "$((SHARE_SECS - 1))" <<'EOF'
import sys
rows = [tuple(map(float, line.split())) for line in open(sys.argv[1]) if line.strip()]
lo, hi = float(sys.argv[2]), float(sys.argv[3])
a = next(r for r in rows if r[0] >= lo)
b = [r for r in rows if r[0] <= hi][-1]
print(f"{(b[1] - a[1]) * 8 / (b[0] - a[0]) / 1e6:.2f}")
EOF
}
first_mbit=$(rate_of "$work/natter.log")
other_mbit=$(rate_of "$work/tcp.log")
cc=${TCP_CC:-$(in_ns a cat /proc/sys/net/ipv4/tcp_congestion_control)}
if [[ ${COMPETITOR:-tcp} == natter ]]; then other="a second natter flow"; else other="TCP ($cc)"; fi

echo "bottleneck $SHARE_RATE Mbit/s (tc tbf on router A's WAN, queue of $QUEUE_MS ms), $SHARE_SECS s, measured after ${SHARE_WARMUP} s"
echo "  first: $first $first_mbit Mbit/s"
echo "  other: $other $other_mbit Mbit/s"
python3 -c "import sys; n, t = map(float, sys.argv[1:]); print(f'  share of the first flow {n / (n + t):.2f}, together {n + t:.2f} Mbit/s')" \
    "$first_mbit" "$other_mbit"
