//! Finding and connecting to the other peer as the command line says: a
//! code given, a code made up here, or a saved contact. A `Dialer` can
//! connect again after a session ends, to the same peer the same way.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use natter::code::{random_nameplate, PairingCode};
use natter::contacts::Contacts;
use natter::identity::{config_dir, Identity, PublicKey};
use natter::link::LinkConfig;
use natter::session::{Error, Peer, PeerBuilder, Session};
use natter::wire::ServerErrorKind;
use natter::ConnectError;
use tokio::sync::mpsc;

use super::report::Reporter;
use super::SessionArgs;

/// How this run finds the other peer.
#[derive(Clone)]
enum Meeting {
    /// A code the user typed (the other side made it up), or one made up
    /// here and used once already.
    Given(PairingCode),
    /// A code this side makes up and prints; it claims the nameplate.
    Generated,
    Contact {
        name: String,
        key: PublicKey,
    },
}

/// Nameplates tried before giving up when each turns out to be in use.
const NAMEPLATE_ATTEMPTS: usize = 5;

#[derive(Clone)]
pub struct Dialer {
    meeting: Meeting,
    args: SessionArgs,
    config: LinkConfig,
    home: PathBuf,
    contacts: Contacts,
    /// What the other side runs with a code made up here.
    peer_command: &'static str,
    /// Say after pairing by code how to save the peer as a contact (not
    /// for the sessions of files offered in a chat).
    contact_hint: bool,
}

impl Dialer {
    pub fn new(
        code: Option<String>,
        args: SessionArgs,
        peer_command: &'static str,
    ) -> anyhow::Result<Self> {
        let home = config_dir()?;
        let contacts = Contacts::load(&home)?;
        let meeting = match (code.or(args.code.clone()), &args.to) {
            (_, Some(name)) => Meeting::Contact {
                name: name.clone(),
                key: contacts.get(name).with_context(|| {
                    format!("no contact named {name:?}; `natter contacts list` shows them")
                })?,
            },
            (Some(code), None) => Meeting::Given(code.parse::<PairingCode>().map_err(Error::from)?),
            (None, None) => Meeting::Generated,
        };
        let mut config = LinkConfig::default();
        config.rendezvous.wait_timeout = Duration::from_secs(args.wait_secs);
        config.punch.timeout = Duration::from_millis(args.punch_timeout_ms);
        config.relay = !args.no_relay;
        Ok(Self {
            contact_hint: !matches!(meeting, Meeting::Contact { .. }),
            meeting,
            args,
            config,
            home,
            contacts,
            peer_command,
        })
    }

    /// A dialer like this one (rendezvous, socket, timeouts) that meets
    /// whoever has `code`: files offered in a chat go over a session of
    /// their own.
    pub fn with_code(&self, code: PairingCode, peer_command: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            meeting: Meeting::Given(code),
            args: self.args.clone(),
            config: self.config.clone(),
            home: self.home.clone(),
            contacts: Contacts::load(&self.home)?,
            peer_command,
            contact_hint: false,
        })
    }

    /// The contact's name and key, when meeting a saved contact.
    pub fn contact(&self) -> Option<(&str, PublicKey)> {
        match &self.meeting {
            Meeting::Contact { name, key } => Some((name, *key)),
            _ => None,
        }
    }

    /// Connects (again). A code made up here is used again after the
    /// first time, so the other side finds this one where it first did.
    pub async fn dial(&mut self, reporter: &Reporter) -> anyhow::Result<Session> {
        let mut config = self.config.clone();
        config.rendezvous.claim = matches!(self.meeting, Meeting::Generated);
        let mut attempt = 0;
        let (session, code) = loop {
            attempt += 1;
            let builder = Peer::builder()
                .rendezvous(self.args.rendezvous.clone())
                .bind(self.args.bind)
                .port_mapping(!self.args.no_port_mapping)
                .config(config.clone())
                .identity(Identity::load_or_create(&self.home)?);
            let (builder, code) = match &self.meeting {
                Meeting::Given(code) => (builder.code(code.clone()), Some(code.clone())),
                Meeting::Contact { key, .. } => (builder.contact(*key), None),
                Meeting::Generated => {
                    let mut rng = rand::thread_rng();
                    let code = PairingCode::generate(random_nameplate(&mut rng), 2, &mut rng);
                    reporter.code(&code, self.peer_command);
                    (builder.code(code.clone()), Some(code))
                }
            };
            match connect_reporting(builder, reporter).await {
                // Someone else uses this nameplate: make up another code.
                Err(Error::Connect(ConnectError::Refused(ServerErrorKind::RoomTaken)))
                    if attempt < NAMEPLATE_ATTEMPTS
                        && matches!(self.meeting, Meeting::Generated) => {}
                result => break (result?, code),
            }
        };
        reporter.connected(&session.path());
        if let (Meeting::Generated, Some(code)) = (&self.meeting, code) {
            self.meeting = Meeting::Given(code);
        }
        if self.contact_hint {
            self.contacts.set_last_paired(session.path().remote_key);
            self.contacts.save()?;
            reporter.hint("to reach this peer later without a code: natter contacts add NAME");
        }
        Ok(session)
    }
}

/// Connects, reporting registration and introduction as they happen.
async fn connect_reporting(builder: PeerBuilder, reporter: &Reporter) -> Result<Session, Error> {
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let connecting = builder.progress(progress_tx).connect();
    tokio::pin!(connecting);
    let session = loop {
        tokio::select! {
            Some(step) = progress.recv() => reporter.progress(&step),
            result = &mut connecting => break result,
        }
    };
    while let Ok(step) = progress.try_recv() {
        reporter.progress(&step);
    }
    // Path changes are reported for as long as the session runs.
    let reporter = reporter.clone();
    tokio::spawn(async move {
        while let Some(step) = progress.recv().await {
            reporter.progress(&step);
        }
    });
    session
}
