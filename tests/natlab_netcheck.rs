//! `natter netcheck` behind each NAT type of the lab: the rendezvous listens
//! on two addresses and two ports (`RV_IP`, `RV_IP2`; 7777, 7778), and the
//! report must name the mapping and filtering behaviour the router really
//! has. An independent RFC 5780 client, the `stun-client` crate, runs its
//! own behaviour discovery against the same rendezvous from the same host
//! and must agree.
//!
//! Needs root, `ip` and `nft` (skipped with a reason otherwise, or failed
//! when `NATTER_REQUIRE_NATLAB=1`), and the `natter-rendezvous` binary.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use stun_client::nat_behavior_discovery::{
    check_nat_filtering_behavior, check_nat_mapping_behavior, NATFilteringType, NATMappingType,
};
use support::binaries::Binaries;
use support::netns::{in_netns, natlab_available, natlab_port_mapping_available, Lab, NsChild};

static LAB_LOCK: Mutex<()> = Mutex::new(());

fn lab_lock() -> MutexGuard<'static, ()> {
    LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const PORTS: [u16; 2] = [7777, 7778];

/// The lab's NAT types, and what netcheck and RFC 5780 call their mapping
/// and filtering.
const CASES: [(&str, &str, &str); 4] = [
    ("full-cone", "endpoint-independent", "endpoint-independent"),
    (
        "address-restricted",
        "endpoint-independent",
        "address-dependent",
    ),
    (
        "port-restricted",
        "endpoint-independent",
        "address-and-port-dependent",
    ),
    (
        "symmetric",
        "address-and-port-dependent",
        "address-and-port-dependent",
    ),
];

/// Starts the rendezvous on both of the lab's rendezvous addresses and both
/// ports, and waits until it answers STUN.
fn start_rendezvous(lab: &Lab, bins: &Binaries) -> NsChild {
    let mut args = vec!["--stats-secs".to_owned(), "0".to_owned()];
    for ip in [lab.ip("RV_IP"), lab.ip("RV_IP2")] {
        for port in PORTS {
            args.extend(["--bind".to_owned(), format!("{ip}:{port}")]);
        }
    }
    let child = lab
        .spawn("rv", bins.rendezvous.to_str().unwrap(), &args)
        .expect("cannot start natter-rendezvous");
    let probe: UdpSocket = lab.udp_socket("rv", "0.0.0.0:0".parse().unwrap());
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let server = SocketAddr::new(lab.ip("RV_IP2").into(), PORTS[1]);
    let request = natter::wire::stun::binding_request(natter::wire::stun::TransactionId::random());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        probe.send_to(&request, server).unwrap();
        if matches!(probe.recv_from(&mut buf), Ok((_, from)) if from == server) {
            return child;
        }
    }
    panic!("natter-rendezvous did not answer STUN at {server} within 5 s");
}

fn netcheck(lab: &Lab, bins: &Binaries, host: &str) -> Value {
    let rendezvous = format!("{}:{}", lab.ip("RV_IP"), PORTS[0]);
    let out: Output = lab.exec(
        host,
        bins.natter.to_str().unwrap(),
        ["netcheck", "--rendezvous", rendezvous.as_str(), "--json"],
    );
    assert!(
        out.status.success(),
        "natter netcheck failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "netcheck --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// stun-client's RFC 5780 mapping and filtering discovery from `ns`.
fn stun_client_behaviour(ns: &str, server: SocketAddr) -> (NATMappingType, NATFilteringType) {
    in_netns(ns, move || {
        async_std::task::block_on(async move {
            let opts = stun_client::Options {
                recv_timeout_ms: 1000,
                recv_buf_size: 1500,
            };
            let mut client = stun_client::Client::new("0.0.0.0:0", Some(opts.clone()))
                .await
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            let mapping = check_nat_mapping_behavior(&mut client, server)
                .await
                .map_err(|e| std::io::Error::other(format!("mapping: {e:?}")))?;
            let mut client = stun_client::Client::new("0.0.0.0:0", Some(opts))
                .await
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            let filtering = check_nat_filtering_behavior(&mut client, server)
                .await
                .map_err(|e| std::io::Error::other(format!("filtering: {e:?}")))?;
            Ok((mapping.mapping_type, filtering.filtering_type))
        })
    })
    .expect("stun-client behaviour discovery failed")
}

fn rfc5780_name(mapping: NATMappingType) -> &'static str {
    match mapping {
        NATMappingType::NoNAT => "no-nat",
        NATMappingType::EndpointIndependent => "endpoint-independent",
        NATMappingType::AddressDependent => "address-dependent",
        NATMappingType::AddressAndPortDependent => "address-and-port-dependent",
        NATMappingType::Unknown => "unknown",
    }
}

fn rfc5780_filtering_name(filtering: NATFilteringType) -> &'static str {
    match filtering {
        NATFilteringType::EndpointIndependent => "endpoint-independent",
        NATFilteringType::AddressDependent => "address-dependent",
        NATFilteringType::AddressAndPortDependent => "address-and-port-dependent",
        NATFilteringType::Unknown => "unknown",
    }
}

#[test]
fn netcheck_names_the_behaviour_of_every_nat_type() {
    if !natlab_available() {
        return;
    }
    let _guard = lab_lock();
    let bins = Binaries::find();
    let mut table = String::new();
    for (nat, mapping, filtering) in CASES {
        let lab = Lab::up(&["--nat-a", nat]);
        let mut rendezvous = start_rendezvous(&lab, &bins);
        let report = netcheck(&lab, &bins, "a");
        let v4 = &report["ipv4"];
        let server = SocketAddr::new(lab.ip("RV_IP").into(), PORTS[0]);
        let (their_mapping, their_filtering) = stun_client_behaviour(&lab.ns("a"), server);
        let _ = rendezvous.terminate(Duration::from_secs(2));
        table += &format!(
            "{nat:<20} netcheck {} / {} (port preserved {}, allocation {}, hairpin {}); stun-client {} / {}\n",
            v4["mapping"], v4["filtering"], v4["port_preserved"], v4["allocation"]["kind"],
            v4["hairpin"], rfc5780_name(their_mapping), rfc5780_filtering_name(their_filtering),
        );
        let context = format!("{nat}: {report}");
        assert_eq!(v4["mapping"], mapping, "{context}");
        assert_eq!(v4["filtering"], filtering, "{context}");
        assert_eq!(
            v4["reflexive"].as_str().and_then(|r| r.split(':').next()),
            Some(lab.var("A_PUBLIC_IP")),
            "{context}"
        );
        assert_eq!(
            v4["server_other"],
            format!("{}:{}", lab.ip("RV_IP2"), PORTS[1])
        );
        // Every router of the lab keeps a free source port, but the
        // symmetric one, which picks ports at random.
        assert_eq!(v4["port_preserved"], nat != "symmetric", "{context}");
        if nat == "symmetric" {
            assert_eq!(v4["allocation"]["kind"], "random", "{context}");
        }
        assert_eq!(v4["hairpin"], false, "no lab router hairpins: {context}");
        let none =
            serde_json::json!({"upnp": false, "pcp": false, "nat_pmp": false, "mapped": null});
        assert_eq!(
            report["port_mapping"], none,
            "no lab router maps ports: {context}"
        );
        assert_eq!(rfc5780_name(their_mapping), mapping, "stun-client, {nat}");
        assert_eq!(
            rfc5780_filtering_name(their_filtering),
            filtering,
            "stun-client, {nat}"
        );
        lab.down().expect("lab teardown");
    }
    eprintln!("{table}");
}

#[test]
fn netcheck_tells_a_rendezvous_without_a_second_address_apart() {
    if !natlab_available() {
        return;
    }
    let _guard = lab_lock();
    let bins = Binaries::find();
    let lab = Lab::up(&["--nat-a", "symmetric"]);
    let bind = format!("{}:{}", lab.ip("RV_IP"), PORTS[0]);
    let mut rendezvous = lab
        .spawn(
            "rv",
            bins.rendezvous.to_str().unwrap(),
            ["--bind", bind.as_str(), "--stats-secs", "0"],
        )
        .expect("cannot start natter-rendezvous");
    // Retried: the rendezvous may not be listening yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    let report = loop {
        let out = lab.exec(
            "a",
            bins.natter.to_str().unwrap(),
            ["netcheck", "--rendezvous", bind.as_str(), "--json"],
        );
        if out.status.success() || Instant::now() > deadline {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null);
        }
    };
    let _ = rendezvous.terminate(Duration::from_secs(2));
    let v4 = &report["ipv4"];
    assert_eq!(v4["mapping"], "unknown", "{report}");
    assert_eq!(v4["server_other"], Value::Null, "{report}");
    assert!(v4["reflexive"].is_string(), "{report}");
    lab.down().expect("lab teardown");
}

/// Router A runs miniupnpd: netcheck finds UPnP-IGD, PCP and NAT-PMP, gets
/// a test mapping at A's public address, and releases it.
#[test]
fn netcheck_reports_the_gateways_port_mapping() {
    if !natlab_port_mapping_available() {
        return;
    }
    let _guard = lab_lock();
    let bins = Binaries::find();
    let lab = Lab::up(&["--nat-a", "symmetric", "--port-mapping", "all"]);
    let mut rendezvous = start_rendezvous(&lab, &bins);
    let report = netcheck(&lab, &bins, "a");
    let _ = rendezvous.terminate(Duration::from_secs(2));
    let mapping = &report["port_mapping"];
    for protocol in ["upnp", "pcp", "nat_pmp"] {
        assert_eq!(mapping[protocol], true, "{protocol}: {report}");
    }
    let mapped: SocketAddr = mapping["mapped"]
        .as_str()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mapped address: {report}"));
    assert_eq!(mapped.ip().to_string(), lab.var("A_PUBLIC_IP"), "{report}");
    let rules = lab.exec_ok(
        "ra",
        "nft",
        ["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
    );
    assert!(
        !rules.contains("dnat"),
        "the test mapping was left behind:\n{rules}"
    );
    eprintln!("netcheck with miniupnpd: {mapping}");
    lab.down().expect("lab teardown");
}
