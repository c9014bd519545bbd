//! Verifies that the NAT lab (`scripts/natlab.sh`) really behaves like the
//! NAT types it claims to model (RFC 4787 mapping and filtering), using real
//! UDP sockets created inside the lab's network namespaces.
//!
//! Needs root, `ip` and `nft`; otherwise every test is skipped with a reason
//! (or fails, when `NATTER_REQUIRE_NATLAB=1`). The lab tests share the kernel
//! and run one at a time (global mutex).

mod support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::netns::{natlab_available, Lab};

/// How long we wait for a datagram that must arrive.
const ARRIVE: Duration = Duration::from_secs(2);
/// How long we wait to be sure a datagram does not arrive.
const NOT_ARRIVE: Duration = Duration::from_millis(300);

const NAT_TYPES: [&str; 4] = [
    "full-cone",
    "address-restricted",
    "port-restricted",
    "symmetric",
];

static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Serialises lab tests; a panicking test must not block the others.
fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

fn any(port: u16) -> SocketAddr {
    sa(Ipv4Addr::UNSPECIFIED, port)
}

/// Waits up to `timeout` for a datagram whose payload is `label`; returns its
/// source. Any other datagram arriving meanwhile is a test failure (it means
/// something got through that should not have).
fn wait_for(sock: &UdpSocket, label: &str, timeout: Duration) -> Option<SocketAddr> {
    let mut buf = [0u8; 1500];
    sock.set_read_timeout(Some(timeout)).unwrap();
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => {
            let got = String::from_utf8_lossy(&buf[..n]);
            assert_eq!(
                got, label,
                "unexpected datagram {got:?} from {from} while waiting for {label:?}"
            );
            Some(from)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv_from while waiting for {label:?}: {e}"),
    }
}

/// Sends `label` from `from` to `to` and returns the source address the
/// receiver saw (the NAT mapping), panicking if it does not arrive.
fn mapped_addr(from: &UdpSocket, to_sock: &UdpSocket, label: &str) -> SocketAddr {
    let to = to_sock.local_addr().unwrap();
    from.send_to(label.as_bytes(), to).unwrap();
    wait_for(to_sock, label, ARRIVE).unwrap_or_else(|| panic!("{label:?} to {to} did not arrive"))
}

/// What a NAT did, as observed from the public side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Behaviour {
    /// Same external ip:port towards rv:P1, rv:P2 and another public IP.
    endpoint_independent_mapping: bool,
    /// The external port equals the LAN host's source port.
    port_preserved: bool,
    /// After the host sent to rv:P1, inbound to its mapping from ...
    /// ... rv:P1 arrives
    from_same_endpoint: bool,
    /// ... rv:P2 (same IP, other port) arrives
    from_same_ip_other_port: bool,
    /// ... another public IP arrives
    from_other_ip: bool,
}

fn expected(nat: &str) -> Behaviour {
    let b = |eim, pp, same_ip, other_ip| Behaviour {
        endpoint_independent_mapping: eim,
        port_preserved: pp,
        from_same_endpoint: true,
        from_same_ip_other_port: same_ip,
        from_other_ip: other_ip,
    };
    match nat {
        "full-cone" => b(true, true, true, true),
        "address-restricted" => b(true, true, true, false),
        "port-restricted" => b(true, true, false, false),
        // ports are random, so "preserved" is (almost surely) false; see observe()
        "symmetric" => b(false, false, false, false),
        _ => panic!("unknown NAT type {nat}"),
    }
}

/// Observes NAT behaviour of home network A in `lab` (which needs `--public-peer`);
/// `nat` is the type it should have (it decides how long to wait for inbound
/// datagrams), `tag` labels the printed lines.
///
/// Host-side ports are fixed so port preservation can be checked; every phase
/// uses fresh ports on all ends so earlier traffic opens no holes for later checks.
fn observe(lab: &Lab, nat: &str, tag: &str) -> Behaviour {
    let rv_ip = lab.ip("RV_IP");
    let pub_ip = lab.ip("PUB_IP");
    let wan_ip = lab.ip("A_PUBLIC_IP");
    const HOST_PORT_MAP: u16 = 40001;
    const HOST_PORT_FILTER: u16 = 40002;

    // --- mapping, with an early unsolicited probe first -------------------
    let host = lab.udp_socket("a", any(HOST_PORT_MAP));
    let rv1 = lab.udp_socket("rv", sa(rv_ip, 3478));
    let rv2 = lab.udp_socket("rv", sa(rv_ip, 3479));
    let pub1 = lab.udp_socket("pub", sa(pub_ip, 3478));

    // An unsolicited packet to the router's WAN on the port the host is about
    // to use must neither reach the host nor leave state on the router that
    // would change the host's mapping (router input hook: ct state new drop).
    rv1.send_to(b"early-probe", sa(wan_ip, HOST_PORT_MAP))
        .unwrap();
    assert_eq!(
        wait_for(&host, "early-probe", NOT_ARRIVE),
        None,
        "[{tag}] unsolicited probe reached the LAN host"
    );

    let m1 = mapped_addr(&host, &rv1, "map-rv-p1");
    let m2 = mapped_addr(&host, &rv2, "map-rv-p2");
    let m3 = mapped_addr(&host, &pub1, "map-pub");
    eprintln!("[{tag}] host 192.168.1.2:{HOST_PORT_MAP} mapped to: rv:3478 sees {m1}, rv:3479 sees {m2}, pub:3478 sees {m3}");
    for m in [m1, m2, m3] {
        assert_eq!(
            m.ip(),
            std::net::IpAddr::V4(wan_ip),
            "[{tag}] mapping not on the public WAN address"
        );
    }
    let eim = m1 == m2 && m2 == m3;
    let distinct_ports: BTreeSet<u16> = [m1.port(), m2.port(), m3.port()].into_iter().collect();
    if !eim {
        // A symmetric NAT must use a new port per destination, not just "not the same for all".
        assert_eq!(
            distinct_ports.len(),
            3,
            "[{tag}] mapping neither endpoint-independent nor per-destination: {m1} {m2} {m3}"
        );
    }
    let port_preserved = [m1, m2, m3].iter().all(|m| m.port() == HOST_PORT_MAP);

    // --- filtering ---------------------------------------------------------
    let host = lab.udp_socket("a", any(HOST_PORT_FILTER));
    let r1 = lab.udp_socket("rv", sa(rv_ip, 3490));
    let r2 = lab.udp_socket("rv", sa(rv_ip, 3491));
    let p = lab.udp_socket("pub", sa(pub_ip, 3490));
    let mapped = mapped_addr(&host, &r1, "hello-rv-p1");
    eprintln!(
        "[{tag}] host 192.168.1.2:{HOST_PORT_FILTER} sent to rv:3490 only, mapped to {mapped}"
    );

    let inbound = |sock: &UdpSocket, label: &str, expect: bool| -> bool {
        let sender = sock.local_addr().unwrap();
        sock.send_to(label.as_bytes(), mapped).unwrap();
        let got = wait_for(&host, label, if expect { ARRIVE } else { NOT_ARRIVE });
        if let Some(src) = got {
            assert_eq!(src, sender, "[{tag}] {label}: source address rewritten");
        }
        eprintln!(
            "[{tag}]   inbound from {sender} to {mapped}: {}",
            if got.is_some() { "ARRIVED" } else { "dropped" }
        );
        got.is_some()
    };
    let exp = expected(nat);
    let from_same_endpoint = inbound(&r1, "in-rv-p1", exp.from_same_endpoint);
    let from_same_ip_other_port = inbound(&r2, "in-rv-p2", exp.from_same_ip_other_port);
    let from_other_ip = inbound(&p, "in-pub", exp.from_other_ip);

    Behaviour {
        endpoint_independent_mapping: eim,
        port_preserved,
        from_same_endpoint,
        from_same_ip_other_port,
        from_other_ip,
    }
}

#[test]
fn expectations_distinguish_every_nat_type() {
    // If the four expected behaviours are pairwise different, a lab whose NAT
    // is any other type than claimed fails `nat_types_behave_as_specified`.
    for (i, a) in NAT_TYPES.iter().enumerate() {
        for b in &NAT_TYPES[i + 1..] {
            assert_ne!(expected(a), expected(b), "{a} and {b} indistinguishable");
        }
    }
}

#[test]
fn nat_types_behave_as_specified() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    let mut wrong = Vec::new();
    for nat in NAT_TYPES {
        let t = Instant::now();
        let lab = Lab::up(&["--nat-a", nat, "--public-peer"]);
        let got = observe(&lab, nat, nat);
        eprintln!("[{nat}] observed {got:?} in {:?}", t.elapsed());
        if got != expected(nat) {
            wrong.push(format!(
                "{nat}: observed {got:?}, expected {:?}",
                expected(nat)
            ));
        }
        lab.down().unwrap();
    }
    assert!(
        wrong.is_empty(),
        "NAT types misbehave:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn nat_behaviour_behind_cgnat() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    // Home NAT (full cone) behind a port-restricted CGNAT: the combination
    // filters like the stricter one and maps endpoint-independently.
    let lab = Lab::up(&[
        "--nat-a",
        "full-cone",
        "--nat-cgn",
        "port-restricted",
        "--double-nat",
        "--public-peer",
    ]);
    assert_eq!(lab.var("A_PUBLIC_IP"), lab.var("CGN_WAN_IP"));
    let got = observe(
        &lab,
        "port-restricted",
        "full-cone behind port-restricted CGNAT",
    );
    eprintln!("[full-cone behind port-restricted CGNAT] observed {got:?}");
    assert_eq!(got, expected("port-restricted"));
}

/// Without the router's input-hook drop, an early unsolicited probe leaves a
/// conntrack entry on the router that steals the host's port: check that the
/// lab's rule prevents this, and that the check would notice otherwise.
#[test]
fn router_input_drop_keeps_mapping_port() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    let lab = Lab::up(&["--nat-a", "port-restricted", "--nat-b", "port-restricted"]);
    // Break router B on purpose: no WAN input filtering.
    lab.exec_ok("rb", "nft", ["flush", "chain", "ip", "natlab", "input"]);

    let rv_ip = lab.ip("RV_IP");
    let rv = lab.udp_socket("rv", sa(rv_ip, 3478));
    let mut ports = Vec::new();
    for (host, wan) in [("a", "RA_WAN_IP"), ("b", "RB_WAN_IP")] {
        let sock = lab.udp_socket(host, any(45000));
        rv.send_to(b"early-probe", sa(lab.ip(wan), 45000)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let m = mapped_addr(&sock, &rv, &format!("from-{host}"));
        eprintln!("[input-drop] early probe rv:3478 -> {}:45000, then host {host} :45000 -> rv:3478 is seen as {m}", lab.var(wan));
        ports.push(m.port());
    }
    assert_eq!(
        ports[0], 45000,
        "router A (with the input drop) changed the host's port"
    );
    assert_ne!(
        ports[1], 45000,
        "control: router B without the input drop kept the port, so the check proves nothing"
    );
}

/// Sends `n` datagrams from host `a` to rv and returns how many arrived.
fn count_delivered(lab: &Lab, n: u32) -> u32 {
    let rv_ip = lab.ip("RV_IP");
    let rv = lab.udp_socket("rv", sa(rv_ip, 3478));
    let host = lab.udp_socket("a", any(0));
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut seen = BTreeSet::new();
        rv.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok((len, _)) = rv.recv_from(&mut buf) {
            if let Ok(s) = std::str::from_utf8(&buf[..len]) {
                if let Some(i) = s.strip_prefix("seq-").and_then(|x| x.parse::<u32>().ok()) {
                    seen.insert(i);
                }
            }
        }
        seen.len() as u32
    });
    for i in 0..n {
        host.send_to(format!("seq-{i}").as_bytes(), sa(rv_ip, 3478))
            .unwrap();
        // pace a little so no socket or backlog queue overflows
        std::thread::sleep(Duration::from_micros(100));
    }
    receiver.join().unwrap()
}

#[test]
fn loss_option_drops_about_that_share() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    const N: u32 = 1000;
    for (loss, lo, hi) in [(0u32, 0.0, 0.01), (20, 0.10, 0.30)] {
        let lab = Lab::up(&["--loss", &loss.to_string()]);
        let delivered = count_delivered(&lab, N);
        let lost = 1.0 - f64::from(delivered) / f64::from(N);
        eprintln!(
            "[loss {loss}%] {delivered}/{N} delivered, observed loss {:.1}%",
            lost * 100.0
        );
        assert!(
            (lo..=hi).contains(&lost),
            "--loss {loss}: observed {:.1}% lost, want {lo}..{hi}",
            lost * 100.0
        );
    }
}

#[test]
fn topology_extras_work() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    let lab = Lab::up(&[
        "--double-nat",
        "--same-nat",
        "--public-peer",
        "--nat-b",
        "symmetric",
        "--rate",
        "50",
    ]);
    let rv_ip = lab.ip("RV_IP");
    let rv = lab.udp_socket("rv", sa(rv_ip, 3478));

    // Who is seen with which public address.
    let cases = [
        ("a", "A_PUBLIC_IP"),
        ("a2", "A_PUBLIC_IP"),
        ("b", "B_PUBLIC_IP"),
        ("pub", "PUB_IP"),
    ];
    for (host, key) in cases {
        let s = lab.udp_socket(host, any(40100));
        let m = mapped_addr(&s, &rv, &format!("hi-from-{host}"));
        eprintln!("[extras] {host} :40100 -> rv seen as {m}");
        assert_eq!(
            m.ip(),
            std::net::IpAddr::V4(lab.ip(key)),
            "{host} seen from the wrong address"
        );
    }
    assert_eq!(
        lab.var("A_PUBLIC_IP"),
        "203.0.113.13",
        "double NAT: A is seen as the CGNAT's address"
    );

    // Peers behind the same NAT reach each other directly on the LAN.
    let a = lab.udp_socket("a", any(40200));
    let a2 = lab.udp_socket("a2", any(40200));
    a.send_to(b"lan-hello", sa(lab.ip("A2_IP"), 40200)).unwrap();
    assert_eq!(
        wait_for(&a2, "lan-hello", ARRIVE),
        Some(sa(lab.ip("A_IP"), 40200))
    );

    // Rate cap present on every router WAN.
    for r in ["ra", "rb", "cgn"] {
        let q = lab.exec_ok(r, "tc", ["qdisc", "show", "dev", "wan0"]);
        assert!(
            q.contains("tbf") && q.contains("50Mbit"),
            "{r}: no tbf 50Mbit qdisc: {q}"
        );
    }

    // A process started in a namespace is killed when its guard is dropped.
    let mut child = lab.spawn("rv", "sleep", ["30"]).unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "sleep in rv exited early"
    );
    let pid = child.id();
    drop(child);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} still running"
    );

    // Nothing routes out of the lab (checked without sending anything).
    for host in ["rv", "pub", "rb", "cgn", "a", "b"] {
        let out = lab.exec(host, "ip", ["route", "get", "198.51.100.1"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // LAN hosts have a default route to their router, whose own table has none.
        if host == "a" || host == "b" {
            assert!(stdout.contains("via 192.168."), "{host}: {stdout}");
        } else {
            assert!(
                !out.status.success(),
                "{host} has a route out of the lab: {stdout}"
            );
        }
    }
    let id = lab.id().to_string();
    lab.down().unwrap();
    let left = std::process::Command::new(support::netns::find_program("ip").unwrap())
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("nl-{id}-")),
        "namespaces of lab {id} left behind"
    );
}

/// The `--ipv6` lab's home routers behave as stateful IPv6 firewalls: a
/// datagram the internet starts towards host A is dropped; once host A has
/// sent to that address, its answer passes.
#[test]
fn ipv6_firewall_drops_what_the_internet_starts() {
    if !natlab_available() {
        return;
    }
    let _g = lab_lock();
    let lab = Lab::up(&["--ipv6"]);
    let a_ip: Ipv6Addr = lab.var("A_IP6").parse().unwrap();
    let rv_ip: Ipv6Addr = lab.var("RV_IP6").parse().unwrap();
    let a = lab.udp_socket("a", SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 46000));
    let rv = lab.udp_socket("rv", SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 3478));
    let a_addr = SocketAddr::new(a_ip.into(), 46000);
    let rv_addr = SocketAddr::new(rv_ip.into(), 3478);
    rv.send_to(b"unsolicited", a_addr).unwrap();
    assert_eq!(
        wait_for(&a, "unsolicited", Duration::from_millis(300)),
        None,
        "router A let in a datagram the internet started"
    );
    a.send_to(b"outbound", rv_addr).unwrap();
    assert_eq!(
        wait_for(&rv, "outbound", Duration::from_secs(2)),
        Some(a_addr),
        "host A's datagram did not reach the rendezvous host unchanged (no NAT on IPv6)"
    );
    rv.send_to(b"answer", a_addr).unwrap();
    assert_eq!(
        wait_for(&a, "answer", Duration::from_secs(2)),
        Some(rv_addr),
        "the answer to host A's datagram was dropped"
    );
}
