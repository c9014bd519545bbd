//! Status output on stderr: human lines, or one JSON object per line with
//! `--json`. Stdout is left to user data.

use std::net::SocketAddr;
use std::time::Duration;

use natter::birthday::{BirthdayEvent, LocalSocket};
use natter::code::PairingCode;
use natter::error::CloseReason;
use natter::punch::{CandidateKind, Path};
use natter::reliable::Stats as ChannelStats;
use natter::session::{PathInfo, Progress};
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct Reporter {
    pub json: bool,
    /// Where human lines go instead of stderr (the chat's screen).
    screen: Option<mpsc::UnboundedSender<Note>>,
    /// Path changes go to the screen as they are, too (the chat's own
    /// session, not a transfer's).
    screen_paths: bool,
}

/// What the reporter tells a screen.
#[derive(Debug)]
pub enum Note {
    Line(String),
    Path(Path),
}

impl Reporter {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            screen: None,
            screen_paths: false,
        }
    }

    /// Human lines go to `screen`, not to stderr; with `paths`, path
    /// changes as they are too.
    pub fn to_screen(screen: mpsc::UnboundedSender<Note>, paths: bool) -> Self {
        Self {
            json: false,
            screen: Some(screen),
            screen_paths: paths,
        }
    }

    /// Whether a terminal UI owns the terminal (no progress bars then).
    pub fn on_screen(&self) -> bool {
        self.screen.is_some()
    }

    pub fn progress(&self, progress: &Progress) {
        if let (Some(screen), Progress::PathChanged { path, .. }, true) =
            (&self.screen, progress, self.screen_paths)
        {
            let _ = screen.send(Note::Path(*path));
        }
        match progress {
            Progress::Registered { reflexive } => self.emit(
                json!({"event": "registered", "reflexive": reflexive.to_string()}),
                format!("registered at the rendezvous; it sees this machine as {reflexive}; waiting for the other peer"),
            ),
            Progress::Introduced { candidates } => self.emit(
                json!({"event": "introduced", "candidates": candidate_list(candidates)}),
                format!("introduced to the other peer; punching towards {}", candidate_list(candidates).join(", ")),
            ),
            Progress::Relaying { reports } => self.emit(
                json!({
                    "event": "relaying",
                    "candidates": reports.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
                format!(
                    "no direct path through the two NATs; relaying through the rendezvous (still end-to-end encrypted){}",
                    reports.iter().map(|r| format!("\n  {r}")).collect::<String>()
                ),
            ),
            Progress::PortPrediction(event) => self.port_prediction(event),
            Progress::PathChanged { path, reason } => {
                let (kind, human) = match path.kind {
                    CandidateKind::Relayed => (
                        "relayed",
                        format!("relaying through the rendezvous: {reason}"),
                    ),
                    via => {
                        let family = if path.remote.is_ipv6() { "IPv6" } else { "IPv4" };
                        let remote = path.remote;
                        let via = via.as_str();
                        let human = format!(
                            "now direct over {family} to {remote} ({via} candidate): {reason}"
                        );
                        ("direct", human)
                    }
                };
                self.emit(
                    json!({
                        "event": "path_changed",
                        "path": kind,
                        "remote": path.remote.to_string(),
                        "via": path.kind.as_str(),
                        "reason": reason.as_str(),
                    }),
                    human,
                )
            }
        }
    }

    fn port_prediction(&self, event: &BirthdayEvent) {
        match *event {
            BirthdayEvent::Won {
                socket,
                remote,
                after,
                probes_sent,
                sockets_opened,
            } => self.emit(
                json!({
                    "event": "port_prediction",
                    "outcome": "found",
                    "remote": remote.to_string(),
                    "socket": if socket == LocalSocket::Main { "main" } else { "extra" },
                    "after_ms": after.as_millis() as u64,
                    "probes_sent": probes_sent,
                    "sockets_opened": sockets_opened,
                }),
                format!(
                    "port prediction reached the other peer at {remote} after {} ms ({probes_sent} probes, {sockets_opened} extra sockets)",
                    after.as_millis()
                ),
            ),
            BirthdayEvent::GaveUp {
                probes_sent,
                sockets_opened,
            } => self.emit(
                json!({
                    "event": "port_prediction",
                    "outcome": "gave_up",
                    "probes_sent": probes_sent,
                    "sockets_opened": sockets_opened,
                }),
                format!(
                    "port prediction found no path ({probes_sent} probes sent, {sockets_opened} extra sockets opened, all closed)"
                ),
            ),
            BirthdayEvent::Stopped {
                probes_sent,
                sockets_opened,
            } => self.emit(
                json!({
                    "event": "port_prediction",
                    "outcome": "stopped",
                    "probes_sent": probes_sent,
                    "sockets_opened": sockets_opened,
                }),
                format!(
                    "port prediction stopped: not needed any more ({probes_sent} probes sent, {sockets_opened} extra sockets opened, all closed)"
                ),
            ),
        }
    }

    /// `peer_command`: what the other side runs with the code.
    pub fn code(&self, code: &PairingCode, peer_command: &str) {
        self.emit(
            json!({"event": "code", "code": code.to_string()}),
            format!("your code is {code}\nnatter: on the other machine run: natter {peer_command} {code}"),
        );
    }

    /// What a transfer offers: `names` are shown to a person (the first
    /// few), JSON has the counts.
    pub fn offer(&self, files: usize, bytes: u64, names: &[&str]) {
        const SHOWN: usize = 10;
        let mut listing: String = names
            .iter()
            .take(SHOWN)
            .map(|n| format!("\n  {n}"))
            .collect();
        if names.len() > SHOWN {
            listing += &format!("\n  … and {} more", names.len() - SHOWN);
        }
        self.emit(
            json!({"event": "offer", "files": files, "bytes": bytes}),
            format!("offer: {files} file(s), {}:{listing}", human_bytes(bytes)),
        );
    }

    /// JSON only: the bar shows progress to a person.
    pub fn progress_bytes(&self, bytes: u64, total: Option<u64>) {
        if self.json {
            eprintln!(
                "{}",
                json!({"event": "progress", "bytes": bytes, "total": total})
            );
        }
    }

    pub fn resumed(&self, path: &str, offset: u64) {
        self.emit(
            json!({"event": "resumed", "path": path, "offset": offset}),
            format!("resuming {path}: {} already here", human_bytes(offset)),
        );
    }

    pub fn saved(&self, path: &str, bytes: u64, blake3: &blake3::Hash) {
        self.emit(
            json!({"event": "saved", "path": path, "bytes": bytes, "blake3": blake3.to_hex().as_str()}),
            format!("saved {path} ({}, BLAKE3 verified)", human_bytes(bytes)),
        );
    }

    pub fn connected(&self, info: &PathInfo) {
        let via = info.path.kind.as_str();
        let elapsed_ms = info.elapsed.as_millis() as u64;
        let fingerprint = info.remote_key.fingerprint();
        let (path, how) = match info.path.kind {
            CandidateKind::Relayed => ("relayed", "through the rendezvous relay at"),
            _ => ("direct", "directly to"),
        };
        self.emit(
            json!({
                "event": "connected",
                "path": path,
                "remote": info.path.remote.to_string(),
                "local": info.local.to_string(),
                "via": via,
                "elapsed_ms": elapsed_ms,
                "encrypted": true,
                "cipher": info.cipher.name(),
                "peer_fingerprint": fingerprint,
                "peer_key": info.remote_key.to_hex(),
            }),
            format!(
                "connected {how} {} ({via} candidate) in {elapsed_ms} ms; end-to-end encrypted ({}); peer fingerprint {fingerprint}",
                info.path.remote,
                info.cipher.name()
            ),
        );
    }

    /// Advice for a person; nothing in JSON mode.
    pub fn hint(&self, text: &str) {
        if !self.json {
            self.emit(Value::Null, text.to_owned());
        }
    }

    pub fn closed(&self, reason: &CloseReason) {
        self.emit(
            json!({"event": "closed", "reason": reason.to_string(), "kind": reason.kind()}),
            format!("closed: {reason}"),
        );
    }

    pub fn error(&self, kind: &str, message: &str) {
        self.emit(
            json!({"event": "error", "kind": kind, "message": message}),
            format!("error: {message}"),
        );
    }

    /// `channel`: the reliable channel's counters at the end, in JSON only
    /// (for measurements).
    pub fn transferred(
        &self,
        sent: u64,
        received: u64,
        elapsed: Duration,
        channel: Option<&ChannelStats>,
    ) {
        let channel = channel.map(|c| {
            json!({
                "packets_sent": c.packets_sent,
                "packets_received": c.packets_received,
                "packets_retransmitted": c.packets_retransmitted,
                "packets_lost": c.packets_lost,
                "lost_by_reordering": c.losses.by_reordering,
                "lost_by_time": c.losses.by_time,
                "spurious_losses": c.losses.spurious,
                "probe_timeouts": c.probe_timeouts,
                "congestion_events": c.congestion_events,
                "rtt_drains": c.rtt_drains,
                "duplicate_packets": c.duplicate_packets,
                "cwnd": c.cwnd,
                "max_payload": c.max_payload,
                "smoothed_rtt_us": c.smoothed_rtt.as_micros() as u64,
                "min_rtt_us": c.min_rtt.as_micros() as u64,
            })
        });
        self.emit(
            json!({"event": "transferred", "sent_bytes": sent, "received_bytes": received, "elapsed_ms": elapsed.as_millis() as u64, "channel": channel}),
            format!("sent {sent} bytes, received {received} bytes in {:.2} s", elapsed.as_secs_f64()),
        );
    }

    fn emit(&self, json: Value, human: String) {
        if let Some(screen) = &self.screen {
            let _ = screen.send(Note::Line(human));
        } else if self.json {
            eprintln!("{json}");
        } else {
            eprintln!("natter: {human}");
        }
    }
}

/// `1.5 MiB`, `320 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn candidate_list(candidates: &[(SocketAddr, CandidateKind)]) -> Vec<String> {
    candidates
        .iter()
        .map(|(addr, kind)| format!("{} {addr}", kind.as_str()))
        .collect()
}
