#!/usr/bin/env bash
# natlab.sh - a throw-away NAT laboratory built from Linux network namespaces.
#
# Everything lives in namespaces named "nl-<LAB_ID>-<host>" that are not
# connected to the root namespace at all, and none of them has a default route
# towards anything outside the lab: lab traffic cannot leave the lab.
#
# Topology (addresses are documentation / private ranges only):
#
#   nl-ID-inet   "internet": bridge br0 on 203.0.113.0/24 (optional random loss)
#   nl-ID-rv     rendezvous host        203.0.113.10 and 203.0.113.9 (a second
#                address, for NAT behaviour discovery)
#   nl-ID-pub    public peer, no NAT    203.0.113.20     (--public-peer)
#   nl-ID-ra     NAT router A   WAN 203.0.113.11, LAN 192.168.1.1/24
#   nl-ID-a      host A         192.168.1.2 (default via 192.168.1.1)
#   nl-ID-a2     host A2        192.168.1.3 behind router A   (--same-nat)
#   nl-ID-rb     NAT router B   WAN 203.0.113.12, LAN 192.168.2.1/24
#   nl-ID-b      host B         192.168.2.2 (default via 192.168.2.1)
#   nl-ID-cgn    CGNAT router   WAN 203.0.113.13, LAN 100.64.0.1/24 (--double-nat;
#                router A's WAN then is 100.64.0.2 behind it)
#   nl-ID-hop    a plain router between the NATs (--router-hop): 203.0.113.1 on
#                the internet bridge, 198.51.100.1 on a second bridge br1,
#                where router B's WAN then is (198.51.100.12)
#
# With --ipv6 the lab is dual-stack: the internet is also 2001:db8::/64 (rv
# ::10, router A ::11, router B ::12), LAN A 2001:db8:1::/64 (host A ::2),
# LAN B 2001:db8:2::/64 (host B ::2), routed without NAT; each router's IPv6
# firewall is a home router's: forward what the LAN sends and what answers
# it (established, related), drop what the internet starts.
#
# Run "natlab.sh help" for usage.
set -euo pipefail
shopt -s inherit_errexit

PROG=${0##*/}
# ip/nft/tc usually live in sbin, which a non-login PATH may lack
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
STATE_DIR=/run/natlab
NET6=2001:db8
CGN_LAN_IP=100.64.0.1
RA_WAN_CGN=100.64.0.2

# The internet's addresses: documentation ranges, or with --upnp addresses
# outside every reserved range (miniupnpd will not map ports on a reserved
# WAN address). The lab has no route out, so none of them is ever reached.
set_addresses() { # NET_PUB NET_FAR
    NET_PUB=$1 NET_FAR=$2
    RV_IP=$NET_PUB.10
    RV_IP2=$NET_PUB.9
    PUB_IP=$NET_PUB.20
    RA_WAN_PUBLIC=$NET_PUB.11
    RB_WAN_PUBLIC=$NET_PUB.12
    CGN_WAN_IP=$NET_PUB.13
    HOP_NEAR_IP=$NET_PUB.1
    HOP_FAR_IP=$NET_FAR.1
    RB_WAN_FAR=$NET_FAR.12
}
set_addresses 203.0.113 198.51.100
NAT_TYPES="full-cone address-restricted port-restricted symmetric"
MAP_TIMEOUT=300s   # lifetime of a cone mapping/permission after the last outbound packet

usage() {
    cat <<EOF
Usage:
  $PROG up LAB_ID [options]     create lab LAB_ID, print KEY=VALUE lines on stdout
  $PROG down LAB_ID             remove lab LAB_ID (kills processes left in it)
  $PROG exec LAB_ID HOST cmd... run cmd inside HOST's namespace
  $PROG info LAB_ID             print the KEY=VALUE lines of a running lab again
  $PROG list                    list labs that exist on this machine
  $PROG run [options] -- cmd... create a lab with a random id, run cmd with the
                                KEY=VALUE lines in its environment, then remove the
                                lab (also on failure or Ctrl-C)
  $PROG check                   check prerequisites only

LAB_ID: 1-12 characters [a-z0-9]. Namespaces are named nl-LAB_ID-HOST.
HOST:   inet rv ra a rb b [pub] [a2] [cgn] [hop]

Options:
  --nat-a TYPE      NAT type of router A (default port-restricted)
  --nat-b TYPE      NAT type of router B (default port-restricted)
  --nat-cgn TYPE    NAT type of the CGNAT router (default port-restricted)
                    TYPE: full-cone | address-restricted | port-restricted | symmetric
  --public-peer     add host "pub" at $PUB_IP on the public segment (no NAT)
  --same-nat        add host "a2" at 192.168.1.3 behind router A
  --double-nat      put router A behind a CGNAT router "cgn" (100.64.0.0/24)
  --loss PCT        drop PCT % (0-100) of the IPv4 frames crossing the public bridge
                    (hosts then segment UDP batches before sending, so it is
                    per datagram)
  --rate MBIT       cap each router's WAN egress to MBIT Mbit/s (tc tbf)
  --queue-ms MS     with --rate: the cap's queue holds MS ms of traffic (default 200)
  --router-hop      a router between the NATs: router B sits on a second
                    segment ($NET_FAR.0/24) behind host "hop", one hop away
                    from everything else (probes with a small TTL die there)
  --no-input-firewall
                    routers without the input rule that drops what the
                    internet starts (many home routers): a datagram for the
                    router itself leaves a conntrack entry behind
  --port-mapping P  router A runs miniupnpd for its LAN, speaking P: upnp
                    (UPnP-IGD), pcp (PCP and NAT-PMP) or all; the internet
                    then uses 11.0.113.0/24 (and 11.0.114.0/24 behind
                    --router-hop), since miniupnpd refuses reserved WAN
                    addresses
  --ipv6            dual-stack lab: IPv6 everywhere besides IPv4, routers with
                    a stateful IPv6 firewall (not with --double-nat/--same-nat/
                    --public-peer)
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

check_prereqs() {
    local need_tc=${1:-0}
    [[ $EUID -eq 0 ]] || die "must run as root (network namespaces and nftables need CAP_NET_ADMIN/CAP_SYS_ADMIN)"
    command -v ip >/dev/null 2>&1 || die "'ip' (iproute2) not found in PATH"
    command -v nft >/dev/null 2>&1 || die "'nft' (nftables) not found in PATH"
    command -v ethtool >/dev/null 2>&1 || die "'ethtool' not found in PATH"
    if [[ $need_tc -eq 1 ]]; then
        command -v tc >/dev/null 2>&1 || die "'tc' (iproute2) not found in PATH but --rate was given"
    fi
}

valid_id() {
    [[ $1 =~ ^[a-z0-9]{1,12}$ ]] || die "bad LAB_ID '$1': use 1-12 characters [a-z0-9]"
}

ns_of() { echo "nl-$1-$2"; }

lab_namespaces() { # LAB_ID
    local prefix="nl-$1-"
    ip netns list 2>/dev/null | awk '{print $1}' | while read -r n; do
        [[ $n == "$prefix"* ]] && echo "$n"
    done
    return 0
}

teardown() { # LAB_ID
    local id=$1 ns pid
    for ns in $(lab_namespaces "$id"); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill "$pid" 2>/dev/null || true
        done
    done
    for ns in $(lab_namespaces "$id"); do
        ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
    done
    rm -f "$STATE_DIR/$id.env" "$STATE_DIR/$id"-miniupnpd.*
}

# ---------------------------------------------------------------- building --

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

new_ns() { # NS
    ip netns add "$1"
    ip -n "$1" link set lo up
    if [[ $IPV6 -eq 1 ]]; then
        # static addresses only, usable at once (no duplicate detection)
        local conf
        for conf in all default; do
            nsx "$1" sysctl -qw net.ipv6.conf.$conf.accept_ra=0 net.ipv6.conf.$conf.autoconf=0 \
                net.ipv6.conf.$conf.accept_dad=0 >/dev/null 2>&1 || true
        done
    else
        # keep the lab quiet and IPv4 only
        nsx "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1 || true
        nsx "$1" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
    fi
    # if br_netfilter is loaded, bridged frames (the internet bridge, a router's
    # LAN bridge) must not go through this namespace's IP hooks / forward policy
    if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
        nsx "$1" sysctl -qw net.bridge.bridge-nf-call-iptables=0 >/dev/null 2>&1 ||
            log "warning: cannot disable bridge-nf-call-iptables in $1"
    fi
}

# veth pair: IF1 in NS1, IF2 in NS2
veth() { # NS1 IF1 NS2 IF2
    ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
    ip -n "$1" link set "$2" up
    ip -n "$3" link set "$4" up
}

# attach a namespace to the public bridge with address ADDR/24 on eth0-like IF
attach_public() { # NS IF ADDR PORTNAME
    veth "$1" "$2" "$INET" "$4"
    ip -n "$INET" link set "$4" master br0
    ip -n "$1" addr add "$3/24" dev "$2"
}

# nftables ruleset of a NAT router.
#   $1 TYPE  $2 WAN_IF  $3 LAN_IF  $4 WAN_IP  $5.. LAN hosts that get inbound
#   mappings for full-cone / address-restricted (their ports are preserved)
nat_ruleset() {
    local type=$1 wan=$2 lan=$3 wan_ip=$4; shift 4
    local hosts=("$@") h tag sets="" pre="" fwd_upd="" post="" input_drop=""
    [[ $INPUT_FIREWALL -eq 1 ]] && input_drop="    iifname \"$wan\" ct state new drop"$'\n'
    case $type in
        port-restricted)
            post="oifname \"$wan\" masquerade" ;;
        symmetric)
            post="oifname \"$wan\" masquerade random,fully-random" ;;
        full-cone|address-restricted)
            post="oifname \"$wan\" snat to $wan_ip"
            for h in "${hosts[@]}"; do
                tag=${h//./_}
                if [[ $type == full-cone ]]; then
                    sets+="  set fc_$tag { type inet_service; flags dynamic,timeout; timeout $MAP_TIMEOUT; }"$'\n'
                    fwd_upd+="    iifname \"$lan\" oifname \"$wan\" ip saddr $h meta l4proto udp update @fc_$tag { udp sport timeout $MAP_TIMEOUT }"$'\n'
                    pre+="    iifname \"$wan\" ip daddr $wan_ip udp dport @fc_$tag dnat to $h"$'\n'
                else
                    sets+="  set ar_$tag { type ipv4_addr . inet_service; flags dynamic,timeout; timeout $MAP_TIMEOUT; }"$'\n'
                    fwd_upd+="    iifname \"$lan\" oifname \"$wan\" ip saddr $h meta l4proto udp update @ar_$tag { ip daddr . udp sport timeout $MAP_TIMEOUT }"$'\n'
                    pre+="    iifname \"$wan\" ip daddr $wan_ip ip saddr . udp dport @ar_$tag dnat to $h"$'\n'
                fi
            done ;;
        *) die "unknown NAT type '$type' (one of: $NAT_TYPES)" ;;
    esac
    cat <<EOF
table ip natlab {
$sets
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
$pre  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    $post
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
$fwd_upd    ct state established,related accept
    ct status dnat accept
    iifname "$lan" oifname "$wan" accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
$input_drop  }
}
EOF
}

# A home router's IPv6 firewall: no NAT; the LAN may start anything, the
# internet only answer (neighbour discovery aside).
firewall6_ruleset() {
    cat <<EOF
table ip6 natlab6 {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }
  chain input {
    type filter hook input priority filter; policy accept;
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept
    iifname "wan0" ct state new drop
  }
}
EOF
}

# IPv6 of a home: the router (WAN ::N on the internet, LAN PREFIX::1) and
# its host (PREFIX::2)
add_ipv6_home() { # ROUTER_NS HOST_NS WAN_SUFFIX PREFIX OTHER_PREFIX OTHER_WAN_SUFFIX
    local rns=$1 hns=$2 wan=$3 lan=$4 other_lan=$5 other_wan=$6
    nsx "$rns" sysctl -qw net.ipv6.conf.all.forwarding=1 >/dev/null
    ip -n "$rns" -6 addr add "$NET6::$wan/64" dev wan0 nodad
    ip -n "$rns" -6 addr add "$lan::1/64" dev lan0 nodad
    ip -n "$rns" -6 route add "$other_lan::/64" via "$NET6::$other_wan"
    firewall6_ruleset | nsx "$rns" nft -f -
    ip -n "$hns" -6 addr add "$lan::2/64" dev eth0 nodad
    ip -n "$hns" -6 route add default via "$lan::1"
}

make_router() { # NS TYPE WAN_IP LAN_IP HOSTS...
    local ns=$1 type=$2 wan_ip=$3 lan_ip=$4; shift 4
    nsx "$ns" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
    ip -n "$ns" addr add "$lan_ip/24" dev lan0
    nat_ruleset "$type" wan0 lan0 "$wan_ip" "$@" | nsx "$ns" nft -f -
}

# miniupnpd on router NS for its LAN 192.168.1.0/24, with the nftables
# chains its backend fills (table inet filter): its DNAT and SNAT rules run
# just before the router's own NAT, so a mapped port keeps its number both
# ways.
start_miniupnpd() { # NS LAB_ID PROTOCOLS
    local ns=$1 id=$2 upnp=yes pcp=yes conf
    case $3 in upnp) pcp=no ;; pcp) upnp=no ;; esac
    command -v miniupnpd >/dev/null 2>&1 || die "--port-mapping needs miniupnpd (Debian package miniupnpd-nftables)"
    nsx "$ns" nft -f - <<EOF
table inet filter {
  chain forward {
    type filter hook forward priority filter - 1; policy accept;
    jump miniupnpd
  }
  chain miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority dstnat - 1; policy accept;
    jump prerouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting {
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }
  chain postrouting_miniupnpd {
  }
}
EOF
    mkdir -p "$STATE_DIR"
    conf=$STATE_DIR/$id-miniupnpd.conf
    cat >"$conf" <<EOF
ext_ifname=wan0
listening_ip=lan0
http_port=0
enable_natpmp=$pcp
enable_upnp=$upnp
secure_mode=yes
system_uptime=yes
uuid=4e61e1a5-0000-4000-8000-$(printf '%012x' $$)
allow 1024-65535 192.168.1.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
    # background, in the router's namespace; "down" kills it with the lab
    nsx "$ns" miniupnpd -f "$conf" -P "$STATE_DIR/$id-miniupnpd.pid" -d \
        </dev/null >"$STATE_DIR/$id-miniupnpd.log" 2>&1 &
    # the lab is up once it answers: PCP/NAT-PMP on UDP 5351, UPnP on a TCP
    # port of its choosing (its log names it)
    local tries=0
    until { [[ $pcp == no ]] || nsx "$ns" ss -Hlnu 'sport = :5351' | grep -q .; } &&
          { [[ $upnp == no ]] || grep -q "HTTP listening" "$STATE_DIR/$id-miniupnpd.log"; }; do
        ((++tries <= 100)) || die "miniupnpd did not start in 5 s: $(tail -5 "$STATE_DIR/$id-miniupnpd.log")"
        sleep 0.05
    done
}

make_lan_host() { # ROUTER_NS HOST_NS PORT_ON_ROUTER_LAN_BRIDGE ADDR GATEWAY
    local rns=$1 hns=$2 port=$3 addr=$4 gw=$5
    veth "$hns" eth0 "$rns" "$port"
    ip -n "$rns" link set "$port" master lan0
    ip -n "$hns" addr add "$addr/24" dev eth0
    ip -n "$hns" route add default via "$gw"
}

validate_type() {
    local t
    for t in $NAT_TYPES; do [[ $1 == "$t" ]] && return 0; done
    die "unknown NAT type '$1' (one of: $NAT_TYPES)"
}

parse_opts() {
    NAT_A=port-restricted NAT_B=port-restricted NAT_CGN=port-restricted
    PUBLIC_PEER=0 SAME_NAT=0 DOUBLE_NAT=0 LOSS=0 RATE="" QUEUE_MS=200 IPV6=0 ROUTER_HOP=0 INPUT_FIREWALL=1 PORT_MAPPING=
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nat-a) [[ $# -ge 2 ]] || die "--nat-a needs a TYPE"; validate_type "$2"; NAT_A=$2; shift 2 ;;
            --nat-b) [[ $# -ge 2 ]] || die "--nat-b needs a TYPE"; validate_type "$2"; NAT_B=$2; shift 2 ;;
            --nat-cgn) [[ $# -ge 2 ]] || die "--nat-cgn needs a TYPE"; validate_type "$2"; NAT_CGN=$2; shift 2 ;;
            --public-peer) PUBLIC_PEER=1; shift ;;
            --same-nat) SAME_NAT=1; shift ;;
            --double-nat) DOUBLE_NAT=1; shift ;;
            --loss) [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -le 100 ]] || die "--loss needs a percentage 0-100"; LOSS=$2; shift 2 ;;
            --rate) [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -ge 1 ]] || die "--rate needs a whole number of Mbit/s >= 1"; RATE=$2; shift 2 ;;
            --queue-ms) [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -ge 1 ]] || die "--queue-ms needs a whole number of milliseconds >= 1"; QUEUE_MS=$2; shift 2 ;;
            --ipv6) IPV6=1; shift ;;
            --router-hop) ROUTER_HOP=1; shift ;;
            --port-mapping)
                [[ $# -ge 2 && $2 =~ ^(upnp|pcp|all)$ ]] || die "--port-mapping needs upnp, pcp or all"
                PORT_MAPPING=$2; set_addresses 11.0.113 11.0.114; shift 2 ;;
            --no-input-firewall) INPUT_FIREWALL=0; shift ;;
            --) shift; REST=("$@"); return 0 ;;
            *) die "unknown option '$1' (see '$PROG help')" ;;
        esac
    done
    REST=()
    if [[ -n $PORT_MAPPING && $DOUBLE_NAT -eq 1 ]]; then
        die "--port-mapping needs router A on the internet (not with --double-nat)"
    fi
    if [[ $IPV6 -eq 1 && $((DOUBLE_NAT + SAME_NAT + PUBLIC_PEER + ROUTER_HOP)) -gt 0 ]]; then
        die "--ipv6 builds the plain two-home lab only (no --double-nat, --same-nat, --public-peer or --router-hop)"
    fi
}

build_lab() { # LAB_ID  (options already parsed); prints KEY=VALUE lines
    local id=$1

    INET=$(ns_of "$id" inet)
    local RV RA A RB B PUB="" A2="" CGN=""
    RV=$(ns_of "$id" rv); RA=$(ns_of "$id" ra); A=$(ns_of "$id" a)
    RB=$(ns_of "$id" rb); B=$(ns_of "$id" b)

    # the internet: one bridge, no address, no route anywhere
    new_ns "$INET"
    ip -n "$INET" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$INET" link set br0 up
    if [[ $LOSS -gt 0 ]]; then
        nsx "$INET" nft -f - <<EOF
table bridge natlab {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ether type ip numgen random mod 100 < $LOSS drop
  }
}
EOF
    fi

    new_ns "$RV"
    attach_public "$RV" eth0 "$RV_IP" p-rv
    ip -n "$RV" addr add "$RV_IP2/24" dev eth0

    if [[ $PUBLIC_PEER -eq 1 ]]; then
        PUB=$(ns_of "$id" pub)
        new_ns "$PUB"
        attach_public "$PUB" eth0 "$PUB_IP" p-pub
    fi

    # home network A (optionally behind a CGNAT)
    local ra_wan a_public
    new_ns "$RA"
    ip -n "$RA" link add lan0 type bridge stp_state 0 forward_delay 0
    ip -n "$RA" link set lan0 up
    if [[ $DOUBLE_NAT -eq 1 ]]; then
        CGN=$(ns_of "$id" cgn)
        new_ns "$CGN"
        attach_public "$CGN" wan0 "$CGN_WAN_IP" p-cgn
        veth "$CGN" lan0 "$RA" wan0
        ip -n "$RA" addr add "$RA_WAN_CGN/24" dev wan0
        ip -n "$RA" route add default via "$CGN_LAN_IP"
        nsx "$CGN" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
        ip -n "$CGN" addr add "$CGN_LAN_IP/24" dev lan0
        nat_ruleset "$NAT_CGN" wan0 lan0 "$CGN_WAN_IP" "$RA_WAN_CGN" | nsx "$CGN" nft -f -
        ra_wan=$RA_WAN_CGN a_public=$CGN_WAN_IP
    else
        attach_public "$RA" wan0 "$RA_WAN_PUBLIC" p-ra
        ra_wan=$RA_WAN_PUBLIC a_public=$RA_WAN_PUBLIC
    fi
    local a_hosts=(192.168.1.2)
    [[ $SAME_NAT -eq 1 ]] && a_hosts+=(192.168.1.3)
    make_router "$RA" "$NAT_A" "$ra_wan" 192.168.1.1 "${a_hosts[@]}"
    [[ -z $PORT_MAPPING ]] || start_miniupnpd "$RA" "$id" "$PORT_MAPPING"
    new_ns "$A"
    make_lan_host "$RA" "$A" l-a 192.168.1.2 192.168.1.1
    if [[ $SAME_NAT -eq 1 ]]; then
        A2=$(ns_of "$id" a2)
        new_ns "$A2"
        make_lan_host "$RA" "$A2" l-a2 192.168.1.3 192.168.1.1
    fi

    # home network B, on the internet bridge or behind the hop router
    local rb_wan=$RB_WAN_PUBLIC HOP=""
    new_ns "$RB"
    ip -n "$RB" link add lan0 type bridge stp_state 0 forward_delay 0
    ip -n "$RB" link set lan0 up
    if [[ $ROUTER_HOP -eq 1 ]]; then
        HOP=$(ns_of "$id" hop)
        rb_wan=$RB_WAN_FAR
        new_ns "$HOP"
        nsx "$HOP" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
        attach_public "$HOP" eth0 "$HOP_NEAR_IP" p-hop
        ip -n "$INET" link add br1 type bridge stp_state 0 forward_delay 0
        ip -n "$INET" link set br1 up
        veth "$HOP" eth1 "$INET" p-hop1
        ip -n "$INET" link set p-hop1 master br1
        ip -n "$HOP" addr add "$HOP_FAR_IP/24" dev eth1
        veth "$RB" wan0 "$INET" p-rb
        ip -n "$INET" link set p-rb master br1
        ip -n "$RB" addr add "$rb_wan/24" dev wan0
        ip -n "$RB" route add default via "$HOP_FAR_IP"
        local near
        for near in "$RV" "$RA" ${PUB:+"$PUB"} ${CGN:+"$CGN"}; do
            ip -n "$near" route add "$NET_FAR.0/24" via "$HOP_NEAR_IP"
        done
    else
        attach_public "$RB" wan0 "$rb_wan" p-rb
    fi
    make_router "$RB" "$NAT_B" "$rb_wan" 192.168.2.1 192.168.2.2
    new_ns "$B"
    make_lan_host "$RB" "$B" l-b 192.168.2.2 192.168.2.1

    if [[ $IPV6 -eq 1 ]]; then
        ip -n "$RV" -6 addr add "$NET6::10/64" dev eth0 nodad
        ip -n "$RV" -6 route add "$NET6:1::/64" via "$NET6::11"
        ip -n "$RV" -6 route add "$NET6:2::/64" via "$NET6::12"
        add_ipv6_home "$RA" "$A" 11 "$NET6:1" "$NET6:2" 12
        add_ipv6_home "$RB" "$B" 12 "$NET6:2" "$NET6:1" 11
    fi

    if [[ $LOSS -gt 0 ]]; then
        # Loss is per datagram, as on a real wire: a batch sent with UDP
        # segmentation offload would otherwise cross the lab's veths and
        # bridge as one frame, and the loss rule would drop it whole (dozens
        # of datagrams at once). Hosts segment before sending instead.
        local h
        for h in "$A" "$B" ${PUB:+"$PUB"} ${A2:+"$A2"}; do
            nsx "$h" ethtool -K eth0 tx-udp-segmentation off >/dev/null
        done
    fi

    if [[ -n $RATE ]]; then
        local r
        for r in "$RA" "$RB" ${CGN:+"$CGN"}; do
            ip netns exec "$r" tc qdisc replace dev wan0 root tbf rate "${RATE}mbit" burst 32kbit latency "${QUEUE_MS}ms"
        done
    fi

    local host_list="inet,rv,ra,a,rb,b"
    [[ -z $PUB ]] || host_list+=",pub"
    [[ -z $A2 ]] || host_list+=",a2"
    [[ -z $CGN ]] || host_list+=",cgn"
    [[ -z $HOP ]] || host_list+=",hop"

    echo "LAB_ID=$id"
    echo "NS_PREFIX=nl-$id-"
    echo "HOSTS=$host_list"
    echo "NS_INET=$INET"
    echo "NS_RV=$RV"
    echo "RV_IP=$RV_IP"
    echo "RV_IP2=$RV_IP2"
    echo "NS_RA=$RA"
    echo "NAT_A=$NAT_A"
    echo "RA_WAN_IP=$ra_wan"
    echo "RA_LAN_IP=192.168.1.1"
    echo "NS_A=$A"
    echo "A_IP=192.168.1.2"
    echo "A_PUBLIC_IP=$a_public"
    if [[ -n $A2 ]]; then
        echo "NS_A2=$A2"
        echo "A2_IP=192.168.1.3"
    fi
    echo "NS_RB=$RB"
    echo "NAT_B=$NAT_B"
    echo "RB_WAN_IP=$rb_wan"
    echo "RB_LAN_IP=192.168.2.1"
    echo "NS_B=$B"
    echo "B_IP=192.168.2.2"
    echo "B_PUBLIC_IP=$rb_wan"
    if [[ -n $PUB ]]; then
        echo "NS_PUB=$PUB"
        echo "PUB_IP=$PUB_IP"
    fi
    if [[ -n $CGN ]]; then
        echo "NS_CGN=$CGN"
        echo "NAT_CGN=$NAT_CGN"
        echo "CGN_WAN_IP=$CGN_WAN_IP"
        echo "CGN_LAN_IP=$CGN_LAN_IP"
    fi
    if [[ $IPV6 -eq 1 ]]; then
        echo "RV_IP6=$NET6::10"
        echo "A_IP6=$NET6:1::2"
        echo "B_IP6=$NET6:2::2"
    fi
    if [[ -n $HOP ]]; then
        echo "NS_HOP=$HOP"
        echo "HOP_NEAR_IP=$HOP_NEAR_IP"
        echo "HOP_FAR_IP=$HOP_FAR_IP"
    fi
    echo "INPUT_FIREWALL=$INPUT_FIREWALL"
    echo "PORT_MAPPING=$PORT_MAPPING"
    echo "LOSS_PCT=$LOSS"
    echo "RATE_MBIT=${RATE:-0}"
    echo "QUEUE_MS=$QUEUE_MS"
}

# ---------------------------------------------------------------- commands --

cmd_up() {
    [[ $# -ge 1 ]] || die "usage: $PROG up LAB_ID [options]"
    local id=$1; shift
    valid_id "$id"
    parse_opts "$@"
    [[ ${#REST[@]} -eq 0 ]] || die "unexpected arguments after '--'"
    check_prereqs "$([[ -n $RATE ]] && echo 1 || echo 0)"
    [[ -z $(lab_namespaces "$id") ]] || die "lab '$id' already exists (run '$PROG down $id' first)"
    # remove whatever was built if anything fails or we are interrupted
    UP_ID=$id
    trap 'rc=$?; if [[ -n ${UP_ID:-} ]]; then log "setup of lab $UP_ID failed, tearing down"; teardown "$UP_ID"; fi; exit $rc' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local out
    out=$(build_lab "$id")
    mkdir -p "$STATE_DIR"
    printf '%s\n' "$out" >"$STATE_DIR/$id.env"
    UP_ID=""
    trap - EXIT INT TERM
    printf '%s\n' "$out"
}

cmd_down() {
    [[ $# -eq 1 ]] || die "usage: $PROG down LAB_ID"
    valid_id "$1"
    check_prereqs
    teardown "$1"
}

cmd_exec() {
    [[ $# -ge 3 ]] || die "usage: $PROG exec LAB_ID HOST cmd..."
    local id=$1 host=$2; shift 2
    valid_id "$id"
    check_prereqs
    [[ $host =~ ^[a-z0-9]+$ ]] || die "bad HOST '$host'"
    local ns
    ns=$(ns_of "$id" "$host")
    [[ -e /var/run/netns/$ns ]] || die "no namespace $ns (lab '$id' not up, or host '$host' not in it)"
    exec ip netns exec "$ns" "$@"
}

cmd_info() {
    [[ $# -eq 1 ]] || die "usage: $PROG info LAB_ID"
    valid_id "$1"
    [[ -f $STATE_DIR/$1.env ]] || die "no lab '$1' known"
    cat "$STATE_DIR/$1.env"
}

cmd_list() {
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n 's/^nl-\([a-z0-9]*\)-.*/\1/p' | sort -u
}

cmd_run() {
    parse_opts "$@"
    [[ ${#REST[@]} -ge 1 ]] || die "usage: $PROG run [options] -- cmd..."
    check_prereqs "$([[ -n $RATE ]] && echo 1 || echo 0)"
    local id
    id=r$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
    RUN_ID=$id
    trap 'rc=$?; teardown "$RUN_ID"; exit $rc' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local out line
    out=$(build_lab "$id")
    mkdir -p "$STATE_DIR"
    printf '%s\n' "$out" >"$STATE_DIR/$id.env"
    while IFS= read -r line; do
        export "${line%%=*}=${line#*=}"
    done <<<"$out"
    export NATLAB="$0"
    log "lab $id is up; running: ${REST[*]}"
    local rc=0
    "${REST[@]}" || rc=$?
    exit $rc
}

main() {
    [[ $# -ge 1 ]] || { usage >&2; exit 2; }
    local cmd=$1; shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        exec) cmd_exec "$@" ;;
        info) cmd_info "$@" ;;
        list) cmd_list ;;
        run) cmd_run "$@" ;;
        check) check_prereqs 1; echo "natlab prerequisites OK" ;;
        help|-h|--help) usage ;;
        *) usage >&2; die "unknown command '$cmd'" ;;
    esac
}

main "$@"
