//! `natter chat` in a terminal: a status bar (peer, path, round trip,
//! cipher), the scrollback, and an input line that incoming text never
//! breaks (ratatui on crossterm). A line gets its tick once the peer has
//! confirmed it. When the session ends the chat says so and connects again
//! on its own, with backoff; lines typed meanwhile wait in the queue (on
//! disk) and go out in order when the peer is back.
//!
//! `/send PATH` offers a file or a directory: the peer sees the offer and
//! `/accept`s (into the current directory) or `/decline`s; the files go
//! over a session of their own, met with a code made up for it and told
//! over the chat, exactly as `natter send` and `natter receive` do.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use natter::chat::{ChatEvent, OutLine};
use natter::code::{random_nameplate, PairingCode};
use natter::identity::PublicKey;
use natter::punch::{CandidateKind, Path};
use natter::session::{Received, Session, SessionSender};
use natter::transfer::Outgoing;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;
use tokio::sync::mpsc;

use super::chat::{clock, now_ms, Options, Shown, Talk};
use super::dial::Dialer;
use super::report::{human_bytes, Note, Reporter};
use super::{receive, send};

/// First wait before connecting again after a failure; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the round trip in the status bar is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How long leaving waits for the session to close.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// A line on the screen.
enum Entry {
    Mine { seq: u64, at_ms: u64, text: String },
    Theirs { at_ms: u64, text: String },
    Notice { at_ms: u64, text: String },
}

/// Where the connection to the peer stands.
enum Connection {
    Dialing,
    Up {
        sender: SessionSender,
        incoming: mpsc::Receiver<Result<Received, natter::Error>>,
        path: Path,
        cipher: &'static str,
        rtt: Option<Duration>,
    },
}

struct Screen {
    peer_name: String,
    /// The peer's file offer waiting for /accept or /decline: its code and
    /// what it is.
    offered: Option<(String, String)>,
    entries: Vec<Entry>,
    input: String,
    /// Screen lines scrolled up from the bottom.
    scroll: usize,
    /// The peer has every line of ours up to this.
    delivered_up_to: u64,
}

pub async fn run(dialer: Dialer, options: Options) -> Result<Option<String>> {
    let peer_name = dialer
        .contact()
        .map(|(name, _)| name.to_owned())
        .unwrap_or_else(|| "peer".into());
    let mut talk = match dialer.contact() {
        Some((_, key)) => Some(Talk::open(key, options)?),
        None => None,
    };
    let mut screen = Screen {
        peer_name,
        offered: None,
        entries: Vec::new(),
        input: String::new(),
        scroll: 0,
        delivered_up_to: 0,
    };
    if let Some(talk) = &talk {
        show_queued(&mut screen, talk.unconfirmed());
    }
    // Lines typed before the peer (met by code) is known.
    let mut early: Vec<String> = Vec::new();

    let (notes_tx, mut notes) = mpsc::unbounded_channel();
    let files = Files {
        dialer: dialer.clone(),
        reporter: Reporter::to_screen(notes_tx.clone(), false),
        sending: HashMap::new(),
    };
    let mut files = files;
    let (sessions, redial) = spawn_dialer(dialer, Reporter::to_screen(notes_tx, true));
    let mut sessions = sessions;
    let mut keys = spawn_key_reader();
    let mut connection = Connection::Dialing;
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    let mut terminal = ratatui::init();
    let result: Result<()> = async {
        loop {
            terminal.draw(|frame| draw(frame, &screen, &connection))?;
            tokio::select! {
                Some(key) = keys.recv() => {
                    let Some(action) = screen.key(key) else { continue };
                    match action {
                        Action::Quit => break,
                        Action::SendFiles(path) => {
                            let up = matches!(connection, Connection::Up { .. });
                            match (talk.as_mut(), up) {
                                (Some(talk), true) => {
                                    if let Err(error) = files.offer(talk, &path, &mut screen).await {
                                        screen.notice(format!("cannot send {path}: {error:#}"));
                                    }
                                    if let Connection::Up { sender, .. } = &connection {
                                        let _ = talk.flush(sender).await;
                                    }
                                }
                                _ => screen.notice(format!("{} is not connected: offer files once they are", screen.peer_name)),
                            }
                        }
                        Action::Accept => match screen.offered.take() {
                            Some((code, summary)) => {
                                if let Err(error) = files.accept(&code, &summary, &mut screen) {
                                    screen.notice(format!("cannot receive {summary}: {error:#}"));
                                }
                            }
                            None => screen.notice("no files offered to accept".into()),
                        },
                        Action::Decline => match (screen.offered.take(), talk.as_mut()) {
                            (Some((code, summary)), Some(talk)) => {
                                talk.decline_files(&code);
                                screen.notice(format!("declined {summary}"));
                                if let Connection::Up { sender, .. } = &connection {
                                    let _ = talk.flush(sender).await;
                                }
                            }
                            _ => screen.notice("no files offered to decline".into()),
                        },
                        Action::Send(text) => match talk.as_mut() {
                            Some(talk) => {
                                let line = talk.type_line(&text)?;
                                screen.mine(&line);
                                if let Connection::Up { sender, .. } = &connection {
                                    let _ = talk.flush(sender).await;
                                }
                            }
                            None => {
                                screen.notice(format!("\"{text}\" will go out once {} is connected", screen.peer_name));
                                early.push(text);
                            }
                        },
                    }
                }
                Some(dialed) = sessions.recv() => match dialed {
                    Ok(session) => {
                        let info = session.path();
                        // Met by code, the peer may be another one than
                        // the last time (someone else with the code, or the
                        // peer with another key): its own conversation.
                        let talk = match &mut talk {
                            Some(talk) if talk.peer() == info.remote_key => talk,
                            other => {
                                if other.is_some() {
                                    // Only by code: a contact's key is pinned.
                                    screen.notice(format!(
                                        "this is another peer than before (fingerprint {})",
                                        info.remote_key.fingerprint()
                                    ));
                                    screen.peer_name = short_fingerprint(&info.remote_key);
                                }
                                let opened = other.insert(Talk::open(info.remote_key, options)?);
                                show_queued(&mut screen, opened.unconfirmed());
                                opened
                            }
                        };
                        if screen.peer_name == "peer" {
                            screen.peer_name = short_fingerprint(&info.remote_key);
                        }
                        for text in early.drain(..) {
                            let line = talk.type_line(&text)?;
                            screen.mine(&line);
                        }
                        let (sender, incoming) = forward_incoming(session);
                        talk.connected();
                        let _ = talk.flush(&sender).await;
                        connection = Connection::Up {
                            sender,
                            incoming,
                            path: info.path,
                            cipher: info.cipher.name(),
                            rtt: None,
                        };
                    }
                    Err(error) => screen.notice(format!("{error:#}; trying again")),
                },
                Some(received) = next_incoming(&mut connection) => {
                    let talk = talk.as_mut().expect("a session opens the conversation");
                    match received {
                        Ok(Received::Data(bytes)) => {
                            for shown in talk.handle(&bytes)? {
                                match shown {
                                    Shown::Event(ChatEvent::FileDeclined { code }) => files.declined(&code, &mut screen),
                                    shown => screen.show(shown),
                                }
                            }
                            if let Connection::Up { sender, .. } = &connection {
                                let _ = talk.flush(sender).await;
                            }
                        }
                        Ok(Received::End) => screen.notice(format!("{} stopped typing", screen.peer_name)),
                        Err(error) => {
                            let why = match error {
                                natter::Error::Closed(reason) => reason.to_string(),
                                other => other.to_string(),
                            };
                            screen.notice(format!("{} left ({why}); waiting for {} to come back", screen.peer_name, screen.peer_name));
                            talk.disconnected();
                            connection = Connection::Dialing;
                            let _ = redial.send(()).await;
                        }
                    }
                }
                Some(note) = notes.recv() => match note {
                    Note::Line(text) => screen.notice(text),
                    Note::Path(new) => {
                        if let Connection::Up { path, .. } = &mut connection {
                            *path = new;
                        }
                    }
                },
                _ = status_tick.tick() => {
                    if let Connection::Up { sender, rtt, .. } = &mut connection {
                        *rtt = sender.stats().await.map(|stats| stats.smoothed_rtt);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    // Leave: close the session so what was sent arrives, and take the
    // confirmations that come back meanwhile.
    if let (
        Connection::Up {
            sender, incoming, ..
        },
        Some(talk),
    ) = (&mut connection, &mut talk)
    {
        sender.close().await;
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(Received::Data(bytes))) = incoming.recv().await {
                let _ = talk.handle(&bytes);
            }
        })
        .await;
    }
    ratatui::restore();
    result?;
    let mut report = talk
        .as_ref()
        .and_then(|talk| talk.leaving_report(&screen.peer_name));
    if !early.is_empty() {
        report = Some(format!(
            "{} line(s) typed before {} connected were not sent (nobody to queue them for yet)",
            early.len(),
            screen.peer_name
        ));
    }
    Ok(report)
}

/// Dials in a task of its own: a session each time the screen asks (after
/// the previous one ended), with backoff after failures.
fn spawn_dialer(
    mut dialer: Dialer,
    reporter: Reporter,
) -> (mpsc::Receiver<Result<Session>>, mpsc::Sender<()>) {
    let (sessions_tx, sessions) = mpsc::channel(1);
    let (redial, mut redials) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match dialer.dial(&reporter).await {
                Ok(session) => {
                    backoff = FIRST_BACKOFF;
                    if sessions_tx.send(Ok(session)).await.is_err()
                        || redials.recv().await.is_none()
                    {
                        return;
                    }
                }
                Err(error) => {
                    if sessions_tx.send(Err(error)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    });
    (sessions, redial)
}

/// Dials with `dialer` and runs `transfer` (of `what`) on the session, in
/// a task; says how it ended (`verbs`: done, and under way).
fn spawn_transfer<F, Fut>(
    mut dialer: Dialer,
    reporter: Reporter,
    what: &str,
    [done, doing]: [&'static str; 2],
    transfer: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnOnce(Session, Reporter) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let what = what.to_owned();
    tokio::spawn(async move {
        let result = async {
            let session = dialer.dial(&reporter).await?;
            transfer(session, reporter.clone()).await
        };
        match result.await {
            Ok(()) => reporter.hint(&format!("{done} {what}: every file saved and verified")),
            Err(error) => reporter.hint(&format!("{doing} {what} failed: {error:#}")),
        }
    })
}

/// The session's incoming messages on a channel the screen can poll with
/// everything else; the last item is the error that ended it.
fn forward_incoming(
    session: Session,
) -> (
    SessionSender,
    mpsc::Receiver<Result<Received, natter::Error>>,
) {
    let (sender, mut receiver) = session.split();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let received = receiver.recv().await;
            let last = received.is_err();
            if tx.send(received).await.is_err() || last {
                return;
            }
        }
    });
    (sender, rx)
}

async fn next_incoming(connection: &mut Connection) -> Option<Result<Received, natter::Error>> {
    match connection {
        Connection::Up { incoming, .. } => incoming.recv().await,
        Connection::Dialing => std::future::pending().await,
    }
}

/// Key presses from a thread of its own (crossterm's read blocks).
fn spawn_key_reader() -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        while let Ok(event) = event::read() {
            if tx.blocking_send(event).is_err() {
                return;
            }
        }
    });
    rx
}

enum Action {
    Send(String),
    /// `/send PATH`
    SendFiles(String),
    Accept,
    Decline,
    Quit,
}

/// Files offered and taken from within the chat, each over a session of
/// its own.
struct Files {
    /// Dials like the chat, but with a transfer's code.
    dialer: Dialer,
    /// Status lines of transfers go to the screen.
    reporter: Reporter,
    /// Offers made here, by code: what they are, and the task sending them.
    sending: HashMap<String, (String, tokio::task::JoinHandle<()>)>,
}

impl Files {
    /// Gathers `path`, offers it over the chat with a new code, and waits
    /// (in a task) for the peer to come for it.
    async fn offer(&mut self, talk: &mut Talk, path: &str, screen: &mut Screen) -> Result<()> {
        let local = std::path::PathBuf::from(path);
        let outgoing = tokio::task::spawn_blocking(move || Outgoing::gather(&local)).await??;
        let mut rng = rand::thread_rng();
        let code = PairingCode::generate(random_nameplate(&mut rng), 2, &mut rng);
        let top = outgoing
            .offer
            .entries
            .first()
            .map_or("", |entry| entry.path());
        let summary = format!(
            "{top} ({} file(s), {})",
            outgoing.files.len(),
            human_bytes(outgoing.total_bytes())
        );
        if !talk.offer_files(&code.to_string(), &summary) {
            anyhow::bail!("{} is not connected", screen.peer_name);
        }
        screen.notice(format!(
            "offered {summary}; waiting for {} to accept",
            screen.peer_name
        ));
        let dialer = self.dialer.with_code(code.clone(), "receive")?;
        let task = spawn_transfer(
            dialer,
            self.reporter.clone(),
            &summary,
            ["sent", "sending"],
            |session, reporter| send::run(session, reporter, outgoing),
        );
        self.sending.insert(code.to_string(), (summary, task));
        Ok(())
    }

    /// The peer's offer with `code`, into the current directory.
    fn accept(&mut self, code: &str, summary: &str, screen: &mut Screen) -> Result<()> {
        let code: PairingCode = code.parse().map_err(natter::Error::from)?;
        let dialer = self.dialer.with_code(code, "send")?;
        let out = std::env::current_dir()?;
        screen.notice(format!("receiving {summary} into {}", out.display()));
        let options = receive::Options {
            out,
            yes: true,
            overwrite: false,
        };
        spawn_transfer(
            dialer,
            self.reporter.clone(),
            summary,
            ["received", "receiving"],
            |session, reporter| receive::run(session, reporter, options),
        );
        Ok(())
    }

    fn declined(&mut self, code: &str, screen: &mut Screen) {
        if let Some((summary, task)) = self.sending.remove(code) {
            task.abort();
            screen.notice(format!("{} declined {summary}", screen.peer_name));
        }
    }
}

impl Screen {
    fn key(&mut self, event: Event) -> Option<Action> {
        let Event::Key(KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press | KeyEventKind::Repeat,
            ..
        }) = event
        else {
            return None;
        };
        let ctrl = modifiers.contains(KeyModifiers::CONTROL);
        match code {
            KeyCode::Char('c') if ctrl => return Some(Action::Quit),
            KeyCode::Char('d') if ctrl && self.input.is_empty() => return Some(Action::Quit),
            KeyCode::Char(c) if !ctrl => self.input.push(c),
            KeyCode::Backspace => {
                self.input.pop();
            }
            KeyCode::PageUp => self.scroll += 10,
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::Enter => {
                let text = std::mem::take(&mut self.input);
                self.scroll = 0;
                match text.trim() {
                    "/quit" => return Some(Action::Quit),
                    "/accept" => return Some(Action::Accept),
                    "/decline" => return Some(Action::Decline),
                    command if command.starts_with("/send ") => {
                        return Some(Action::SendFiles(
                            command["/send ".len()..].trim().to_owned(),
                        ))
                    }
                    "" => {}
                    _ => return Some(Action::Send(text)),
                }
            }
            _ => {}
        }
        None
    }

    fn mine(&mut self, line: &OutLine) {
        self.entries.push(Entry::Mine {
            seq: line.seq,
            at_ms: line.typed_at_ms,
            text: line.text.clone(),
        });
    }

    fn notice(&mut self, text: String) {
        self.entries.push(Entry::Notice {
            at_ms: now_ms(),
            text,
        });
    }

    fn show(&mut self, shown: Shown) {
        match shown {
            Shown::Event(ChatEvent::Incoming { text, .. }) => self.entries.push(Entry::Theirs {
                at_ms: now_ms(),
                text,
            }),
            Shown::Event(ChatEvent::Delivered { up_to }) => {
                self.delivered_up_to = self.delivered_up_to.max(up_to)
            }
            Shown::Event(ChatEvent::FileOffer { code, summary }) => {
                let here = std::env::current_dir()
                    .map_or_else(|_| ".".into(), |d| d.display().to_string());
                self.notice(format!(
                    "{} offers {summary}: /accept to receive it into {here}, or /decline",
                    self.peer_name
                ));
                self.offered = Some((code, summary));
            }
            // Handled by the screen's owner, which knows the offers.
            Shown::Event(ChatEvent::FileDeclined { .. }) => {}
            Shown::Unreadable(why) => self.notice(format!(
                "{} sent a message this natter cannot read ({why})",
                self.peer_name
            )),
        }
    }

    /// The entries as screen lines `width` wide, oldest first.
    fn lines(&self, width: usize) -> Vec<Line<'_>> {
        let mut lines = Vec::new();
        for entry in &self.entries {
            let (text, style) = match entry {
                Entry::Mine { seq, at_ms, text } => {
                    let tick = if *seq <= self.delivered_up_to {
                        "✓"
                    } else {
                        "…"
                    };
                    (
                        format!("[{}] me: {text} {tick}", clock(*at_ms)),
                        Style::new(),
                    )
                }
                Entry::Theirs { at_ms, text } => (
                    format!("[{}] {}: {text}", clock(*at_ms), self.peer_name),
                    Style::new().bold(),
                ),
                Entry::Notice { at_ms, text } => {
                    (format!("[{}] -- {text}", clock(*at_ms)), Style::new().dim())
                }
            };
            // A notice may hold several lines (an offer's names); each is
            // wrapped at the width.
            for text_line in text.split('\n') {
                let chars: Vec<char> = text_line.chars().collect();
                for piece in chars.chunks(width.max(1)) {
                    lines.push(Line::from(Span::styled(
                        piece.iter().collect::<String>(),
                        style,
                    )));
                }
            }
        }
        lines
    }
}

fn show_queued<'a>(screen: &mut Screen, queued: impl ExactSizeIterator<Item = &'a OutLine>) {
    if queued.len() > 0 {
        screen.notice(format!(
            "{} line(s) from before, not confirmed yet:",
            queued.len()
        ));
        for line in queued {
            screen.mine(line);
        }
    }
}

fn draw(frame: &mut Frame, screen: &Screen, connection: &Connection) {
    let [status, body, input] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let state = match connection {
        Connection::Dialing => format!("waiting for {}", screen.peer_name),
        Connection::Up {
            path, cipher, rtt, ..
        } => {
            let route = match path.kind {
                CandidateKind::Relayed => "relayed".to_owned(),
                _ if path.remote.is_ipv6() && !is_mapped_v4(path) => "direct IPv6".to_owned(),
                _ => "direct IPv4".to_owned(),
            };
            let rtt = rtt.map_or("RTT …".to_owned(), |rtt| {
                format!("RTT {:.1} ms", rtt.as_secs_f64() * 1000.0)
            });
            format!("connected · {route} · {rtt} · {cipher}")
        }
    };
    frame.render_widget(
        Paragraph::new(format!(" natter · {} · {state}", screen.peer_name))
            .style(Style::new().reversed()),
        status,
    );
    let lines = screen.lines(body.width as usize);
    let height = body.height as usize;
    let end = lines
        .len()
        .saturating_sub(screen.scroll.min(lines.len().saturating_sub(height)));
    let start = end.saturating_sub(height);
    frame.render_widget(Paragraph::new(lines[start..end].to_vec()), body);
    let prompt = format!("> {}", screen.input);
    // Keep the end of a long input in view.
    let width = input.width as usize;
    let shown: String = prompt
        .chars()
        .skip(
            prompt
                .chars()
                .count()
                .saturating_sub(width.saturating_sub(1)),
        )
        .collect();
    let cursor = shown.chars().count() as u16;
    frame.render_widget(Paragraph::new(shown), input);
    frame.set_cursor_position((input.x + cursor, input.y));
}

fn is_mapped_v4(path: &Path) -> bool {
    match path.remote.ip() {
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
        std::net::IpAddr::V4(_) => true,
    }
}

/// The first two groups of a fingerprint, to name a peer met by code.
fn short_fingerprint(key: &PublicKey) -> String {
    let fingerprint = key.fingerprint();
    fingerprint.split(' ').take(2).collect::<Vec<_>>().join(" ")
}
