#!/usr/bin/env bash
# natlab-roaming.sh - run the NAT lab's roaming and IPv6 tests N times and
# print their figures: how long a session takes to follow a NAT that lost
# its mappings, to leave a dark direct path for the relay and to come back,
# to go direct once a block lifts, and to follow a host whose address
# changed. As root, after `cargo build --workspace --release`:
#
#   sudo scripts/natlab-roaming.sh 20
set -euo pipefail
runs=${1:-5}
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for ((i = 1; i <= runs; i++)); do
    echo "run $i of $runs" >&2
    NATTER_REQUIRE_NATLAB=1 cargo test --release -q -p natter --test natlab -- \
        a_transfer_survives a_blackholed a_pair_blocked a_session_survives_the_host ipv6 \
        --test-threads 1 2>&1 | grep -E "natlab (roaming|ipv6)|test result|FAILED|panicked" | tee -a "$log" >&2
done
# "...: to the relay after Some(3.0s), back to direct Some(1.04s) ..." -> seconds
figures() { # PATTERN FIELD-REGEX
    grep -F "$1" "$log" | grep -oE "$2 Some\(([0-9.]+)(ms|s)\)" |
        sed -E 's/.*Some\(([0-9.]+)(ms|s)\)/\1 \2/' |
        awk '{ v = ($2 == "ms") ? $1 / 1000 : $1; print v }' | sort -g
}
summary() { # LABEL PATTERN FIELD-REGEX
    local values
    values=$(figures "$2" "$3" | tr '\n' ' ')
    [[ -n $values ]] || { printf '%-62s no figures\n' "$1"; return; }
    echo "$values" | awk -v label="$1" '{
        n = NF; split($0, v, " ");
        printf "%-62s n=%d min %.2f s, median %.2f s, max %.2f s\n", label, n, v[1], v[int((n + 1) / 2)], v[n]
    }'
}
echo
summary "conntrack flushed, 4 MiB: full-cone side follows after" "4 MiB, conntrack flushed: b followed" "followed a's new mapping after"
summary "conntrack flushed, lines: full-cone side follows after" "lines every 0.5 s, conntrack flushed" "followed a's new mapping after"
summary "direct path dark: to the relay after" "dark for 12 s [" "to the relay after"
summary "direct path dark: back to direct after it reopened" "dark for 12 s [" "back to direct"
summary "blocked for the first 10 s: direct after the block lifted" "blocked for the first 10 s [" "direct"
summary "host address changed: other side on the new address after" "host a's address changed" "new address after"
echo "4 MiB each way at 8 Mbit/s, sender a's transfer ms without the flush: $(grep -F 'without the flush' "$log" |
    grep -oE 'takes Some\([0-9]+\)' | grep -oE '[0-9]+' | tr '\n' ' ')"
echo "4 MiB each way at 8 Mbit/s, sender a's transfer ms with the flush:    $(grep -F '4 MiB, conntrack flushed: b followed' "$log" |
    grep -oE 'transfer Some\([0-9]+\)' | grep -oE '[0-9]+' | tr '\n' ' ')"
grep -c "test result: ok" "$log" | xargs -I{} echo "{} of $runs runs passed"
