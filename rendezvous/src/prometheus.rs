//! The Prometheus endpoint (`--metrics ADDR`): the stats line's counters,
//! the server's gauges and the latency of introductions, served as the
//! Prometheus text format by `metrics-exporter-prometheus` on its own TCP
//! port.
//!
//! [`Stats`](crate::Stats) stays the one place datagrams are counted; [`publish`] copies
//! it into the exporter (the driver calls it every second and just before
//! each stats line, so a scrape and the log agree). Without an installed
//! exporter the `metrics` calls do nothing.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::{DropReason, Server};

const INTRODUCTION_LATENCY: &str = "natter_rendezvous_introduction_latency_seconds";

/// Serves the metrics on `addr` from the current tokio runtime.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        // From a fast answer on an idle server to one stuck behind a queue.
        .set_buckets_for_metric(
            Matcher::Full(INTRODUCTION_LATENCY.into()),
            &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
        )?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
}

/// Copies the server's counters and gauges into the exporter.
pub fn publish(server: &Server) {
    let stats = server.stats();
    let counters = [
        ("natter_rendezvous_datagrams_in_total", stats.datagrams_in),
        ("natter_rendezvous_datagrams_out_total", stats.datagrams_out),
        ("natter_rendezvous_bytes_in_total", stats.bytes_in),
        ("natter_rendezvous_bytes_out_total", stats.bytes_out),
        ("natter_rendezvous_accepted_total", stats.accepted),
        ("natter_rendezvous_refused_total", stats.refused),
        ("natter_rendezvous_registrations_total", stats.registrations),
        ("natter_rendezvous_introductions_total", stats.introductions),
        (
            "natter_rendezvous_stun_responses_total",
            stats.stun_responses,
        ),
        ("natter_rendezvous_expired_total", stats.expired),
        ("natter_rendezvous_relayed_total", stats.relayed),
        ("natter_rendezvous_relayed_bytes_total", stats.relayed_bytes),
        ("natter_rendezvous_busy_replies_total", stats.busy_replies),
    ];
    for (name, value) in counters {
        counter!(name).absolute(value);
    }
    for reason in DropReason::ALL {
        counter!("natter_rendezvous_dropped_total", "reason" => reason.name())
            .absolute(stats.dropped(reason));
    }
    let (sources, addresses) = server.tracked_sources();
    gauge!("natter_rendezvous_peers").set(server.peers() as f64);
    gauge!("natter_rendezvous_rooms").set(server.rooms() as f64);
    gauge!("natter_rendezvous_rate_limit_sources").set(sources as f64);
    gauge!("natter_rendezvous_rate_limit_addresses").set(addresses as f64);
}

/// From the arrival of the Register that completed a room to both
/// introductions handed to the socket: the server's own delay, queue
/// included.
pub fn observe_introduction(latency: Duration) {
    histogram!(INTRODUCTION_LATENCY).record(latency.as_secs_f64());
}
