#!/usr/bin/env bash
# natlab-demo.sh - watch two natter peers chat across two NATs, in one command.
#
# Builds a NAT lab (scripts/natlab.sh), starts natter-rendezvous in host "rv"
# (203.0.113.10:7777), then runs "natter chat" in host "a" (behind NAT A) and
# host "b" (behind NAT B):
#   * interactive: a tmux session with one pane per peer (when tmux is
#     installed and this runs in a terminal); type in either pane. Ctrl-D or
#     /quit in a pane leaves the chat; the demo ends when both panes are
#     closed (or you detach).
#   * scripted (--scripted, or no tmux / no terminal): each peer sends a few
#     timestamped lines once connected; both sides' output is shown live.
# Everything (lab, processes, tmux session) is removed on exit and on Ctrl-C.
# Lab traffic stays inside the lab's namespaces.
set -euo pipefail

PROG=${0##*/}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATLAB=$ROOT/scripts/natlab.sh
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

usage() {
    cat <<EOF
Usage: $PROG [options]          (as root)

  --nat-a TYPE     NAT type in front of peer a (default port-restricted)
  --nat-b TYPE     NAT type in front of peer b (default port-restricted)
                   TYPE: full-cone | address-restricted | port-restricted | symmetric
                   (symmetric against port-restricted or symmetric cannot be
                   punched: the demo then shows natter relaying through the
                   rendezvous)
  --loss PCT       drop PCT % of the packets on the lab's public segment
  --scripted       do not use tmux: send a few scripted lines each way
  --tmux           insist on the interactive tmux mode
  --lines N        lines each peer sends in scripted mode (default 3)
  --build          run 'cargo build --workspace --release' even if the
                   binaries exist (otherwise only when they are missing)
  -h, --help       this help
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

NAT_A=port-restricted NAT_B=port-restricted LOSS=0 MODE=auto LINES=3 BUILD=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --nat-a) [[ $# -ge 2 ]] || die "--nat-a needs a TYPE"; NAT_A=$2; shift 2 ;;
        --nat-b) [[ $# -ge 2 ]] || die "--nat-b needs a TYPE"; NAT_B=$2; shift 2 ;;
        --loss) [[ $# -ge 2 ]] || die "--loss needs a percentage"; LOSS=$2; shift 2 ;;
        --scripted) MODE=scripted; shift ;;
        --tmux) MODE=tmux; shift ;;
        --lines) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--lines needs a number"; LINES=$2; shift 2 ;;
        --build) BUILD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

[[ $EUID -eq 0 ]] || die "run as root (network namespaces and nftables need it), e.g. sudo $0"
bash "$NATLAB" check >/dev/null || die "natlab prerequisites missing (see '$NATLAB check')"

if [[ $MODE == auto ]]; then
    if command -v tmux >/dev/null 2>&1 && [[ -t 0 && -t 1 ]]; then MODE=tmux; else MODE=scripted; fi
fi
if [[ $MODE == tmux ]]; then
    command -v tmux >/dev/null 2>&1 || die "--tmux given but tmux is not installed"
    [[ -t 0 && -t 1 ]] || die "--tmux needs a terminal"
fi

# ------------------------------------------------------------- binaries --
NATTER=$ROOT/target/release/natter
RENDEZVOUS=$ROOT/target/release/natter-rendezvous
if [[ $BUILD -eq 1 || ! -x $NATTER || ! -x $RENDEZVOUS ]]; then
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found in root's PATH; build first: cargo build --workspace --release"
    log "building: cargo build --workspace --release"
    (cd "$ROOT" && cargo build --workspace --release)
fi

# ------------------------------------------------------------- the lab --
ID=d$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
# a pairing code "NAMEPLATE-WORDS" both peers are given (as if read out loud)
CODE=$((RANDOM % 999 + 1))-demo-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
WORK=$(mktemp -d "/tmp/natlab-demo-$ID.XXXX")
SESSION=natlab-$ID
LAB_UP=0

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $MODE == tmux ]]; then
        tmux kill-session -t "$SESSION" 2>/dev/null || true
    fi
    local pids=()
    mapfile -t pids < <(jobs -pr)
    [[ ${#pids[@]} -eq 0 ]] || kill "${pids[@]}" 2>/dev/null || true
    if [[ $LAB_UP -eq 1 ]]; then
        bash "$NATLAB" down "$ID" || log "warning: could not remove lab $ID (try: $NATLAB down $ID)"
        log "lab $ID removed"
    fi
    wait 2>/dev/null || true
    log "logs kept in $WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lab_args=(--nat-a "$NAT_A" --nat-b "$NAT_B")
[[ $LOSS == 0 ]] || lab_args+=(--loss "$LOSS")
LAB_UP=1   # natlab.sh removes a half-built lab itself; down is harmless then
bash "$NATLAB" up "$ID" "${lab_args[@]}" >"$WORK/lab.env"
# shellcheck disable=SC1090
source <(grep -E '^[A-Z0-9_]+=' "$WORK/lab.env")
RV=$RV_IP:7777
log "lab $ID: a $A_IP behind $NAT_A NAT ($A_PUBLIC_IP), b $B_IP behind $NAT_B NAT ($B_PUBLIC_IP), rendezvous $RV, loss ${LOSS}%"

ip netns exec "$NS_RV" "$RENDEZVOUS" --bind "$RV" --stats-secs 0 >"$WORK/rendezvous.log" 2>&1 &
for _ in $(seq 1 20); do
    if ip netns exec "$NS_RV" "$NATTER" stun "$RV" --timeout-ms 300 >/dev/null 2>&1; then
        READY=1
        break
    fi
    sleep 0.2
done
[[ ${READY:-0} -eq 1 ]] || { cat "$WORK/rendezvous.log" >&2; die "the rendezvous did not come up"; }
log "rendezvous up; room code $CODE"

# each peer keeps its identity and contacts in its own directory, not in root's
mkdir -p "$WORK/home-a" "$WORK/home-b"

chat_cmd() { # SIDE NS
    printf '%q ' ip netns exec "$2" env NATTER_HOME="$WORK/home-$1" "$NATTER" chat --rendezvous "$RV" --code "$CODE"
}

# ------------------------------------------------------------ tmux mode --
if [[ $MODE == tmux ]]; then
    # shellcheck disable=SC2016  # expanded by the pane's shell
    hold='; status=$?; echo; echo "[natter exited with $status; press Enter to close this pane]"; read -r _'
    tmux new-session -d -s "$SESSION" -x "$(tput cols 2>/dev/null || echo 160)" -y "$(tput lines 2>/dev/null || echo 40)" \
        "echo 'peer a: $A_IP behind $NAT_A NAT'; $(chat_cmd a "$NS_A")$hold"
    tmux split-window -h -t "$SESSION" \
        "echo 'peer b: $B_IP behind $NAT_B NAT'; $(chat_cmd b "$NS_B")$hold"
    tmux set-option -t "$SESSION" status-left "[natlab $ID] " >/dev/null
    tmux set-option -t "$SESSION" status-right "a: $NAT_A | b: $NAT_B | loss ${LOSS}% | Ctrl-D leaves a chat " >/dev/null
    tmux set-option -t "$SESSION" status-right-length 80 >/dev/null
    tmux select-pane -t "$SESSION:0.0"
    log "attaching to tmux session $SESSION (detaching ends the demo)"
    TMUX='' tmux attach-session -t "$SESSION" || true
    exit 0
fi

# -------------------------------------------------------- scripted mode --
# Sends LINES timestamped lines once this side reported its connection,
# then keeps stdin open a little so the other side's lines arrive too.
feed() { # SIDE ERRLOG OFFSET
    local side=$1 errlog=$2 offset=$3 i
    for _ in $(seq 1 300); do
        grep -q 'connected' "$errlog" 2>/dev/null && break
        grep -q 'error' "$errlog" 2>/dev/null && return 0
        sleep 0.1
    done
    sleep "$offset"
    for i in $(seq 1 "$LINES"); do
        local line
        line="hello #$i from $side, typed at $(date -u +%H:%M:%S.%3N)"
        echo "  [$side types]    $line" >&2
        echo "$line"
        sleep 1
    done
    sleep 2
}

run_side() { # SIDE NS OFFSET
    local side=$1 ns=$2 offset=$3
    : >"$WORK/$side.err"
    feed "$side" "$WORK/$side.err" "$offset" |
        ip netns exec "$ns" env NATTER_HOME="$WORK/home-$side" "$NATTER" chat --rendezvous "$RV" --code "$CODE" \
            2> >(tee "$WORK/$side.err" | sed -u "s/^/  [$side status]   /" >&2) |
        sed -u "s/^/  [$side receives] /"
    return "${PIPESTATUS[1]}"
}

log "scripted chat: each peer sends $LINES lines once connected"
run_side a "$NS_A" 0 & PID_A=$!
run_side b "$NS_B" 0.5 & PID_B=$!
rc=0
deadline=$((SECONDS + 60))
for pid in $PID_A $PID_B; do
    while kill -0 "$pid" 2>/dev/null && [[ $SECONDS -lt $deadline ]]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        log "a peer is still running after 60 s; stopping"
        rc=1
        break
    fi
    wait "$pid" || rc=1
done
sleep 0.2
echo
if [[ $rc -eq 0 ]]; then
    log "both peers exited cleanly; status lines are in $WORK/a.err and $WORK/b.err"
else
    log "a peer failed; rendezvous log:"
    sed 's/^/  /' "$WORK/rendezvous.log" >&2
fi
exit "$rc"
