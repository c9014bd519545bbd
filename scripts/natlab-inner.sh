# Sourced by the measurement scripts once `natlab.sh run` started them
# inside a lab (LAB_ID, RV_IP, ... in the environment; `here` set to the
# scripts directory): a work directory removed at exit with every job the
# script started, `in_ns NS CMD...`, `wait_listening NS PROTO PORT` and
# `start_rendezvous`.

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

in_ns() { "$here/natlab.sh" exec "$LAB_ID" "$@"; }

# Returns once something in namespace NS listens on PORT (PROTO u or t);
# fails after 5 s.
wait_listening() {
    local ns=$1 proto=$2 port=$3
    for _ in $(seq 50); do
        in_ns "$ns" ss -Hln"$proto" "sport = :$port" | grep -q . && return 0
        sleep 0.1
    done
    echo "nothing listens on port $port ($proto) in $ns after 5 s" >&2
    return 1
}

# The rendezvous on RV_IP:7777, its stderr in $work/rv.err; returns once it
# listens.
start_rendezvous() {
    in_ns rv "$NATTER_RENDEZVOUS_BIN" --bind "$RV_IP:7777" --stats-secs 0 2>"$work/rv.err" &
    wait_listening rv u 7777 || { cat "$work/rv.err" >&2; return 1; }
}
