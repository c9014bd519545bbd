//! The handshake that turns a punched path into an encrypted session.
//!
//! With a pairing code both peers first run SPAKE2 on the code: a passive
//! observer learns nothing, an active one gets a single guess per run, and
//! the result is a 32-byte key only the holders of the code share. That key
//! is the PSK of a Noise `XXpsk2` handshake, which exchanges and
//! authenticates the peers' long-term static keys: a wrong code fails on
//! both sides (the initiator cannot open message 2, and tells the responder
//! with `Reject`). Saved contacts skip SPAKE2 and run Noise `XX`, then check
//! the other side's static key against the pinned one.
//!
//! The payloads of messages 1 and 2 carry one byte of flags: whether the
//! sender has fast AES, which picks the data frames' cipher
//! ([`DataCipher::agree`]), and whether it answers path checks (a peer of
//! an older version does not, and its session keeps the path it started
//! on). Noise binds both payloads into the transcript, so nobody on the path
//! can alter them (to force the slower cipher) without the handshake
//! failing.
//!
//! The controlling peer initiates. Flights are retransmitted every
//! [`RETRANSMIT`] until the next message arrives; a duplicate of the peer's
//! previous message is answered with the same reply, so a lost message costs
//! one retransmission, never a new handshake.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use natter_wire::{HandshakeMessage, Role};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::seal::DataCipher;

pub const RETRANSMIT: Duration = Duration::from_millis(200);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A failed peer stops at once and cannot answer a retransmission, so its
/// `Reject` goes out several times: one lost datagram must not leave the
/// other side waiting out its timeout without learning why.
const REJECT_COPIES: usize = 3;

const CODE_PATTERN: &str = "Noise_XXpsk2_25519_ChaChaPoly_BLAKE2s";
const CONTACT_PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const SPAKE2_IDENTITY: &[u8] = b"natter pairing v1";
/// Flag in the payload of messages 1 and 2: the sender has fast AES. An
/// empty payload means no flags; unknown flags are ignored.
const FLAG_FAST_AES: u8 = 0x01;
/// Flag in the payload of messages 1 and 2: the sender answers path checks
/// and may move the session to another path.
const FLAG_PATH_CHECKS: u8 = 0x02;

/// How the two peers know each other.
#[derive(Clone)]
pub enum Trust {
    /// Both typed the same pairing code.
    Code(Vec<u8>),
    /// A saved contact: the other side must hold this static key.
    Pinned([u8; 32]),
}

/// What both sides agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub send: [u8; 32],
    pub receive: [u8; 32],
    pub cipher: DataCipher,
    /// The other peer answers path checks.
    pub remote_path_checks: bool,
    /// The other peer's long-term public key, authenticated.
    pub remote_static: [u8; 32],
    /// The round trip from our last Noise message to the answer that
    /// completed the handshake, if neither was repeated (Karn's rule): a
    /// first sample for the channel on a path the punch did not time (the
    /// relay).
    pub rtt: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("wrong code, or someone else tried this code: the two sides do not share it")]
    WrongCode,
    #[error("the contact's key changed: expected {expected}, the peer holds {actual}. Someone may be impersonating them; if they really changed keys, pair again with a code")]
    KeyChanged { expected: String, actual: String },
    #[error("the encrypted handshake did not finish within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    TimedOut,
    #[error("the handshake failed: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeEvent {
    Done(SessionKeys),
    Failed(HandshakeError),
}

enum Phase {
    /// Waiting for the other side's SPAKE2 message.
    Pake(Spake2<Ed25519Group>),
    /// Noise under way; `sent` is this side's latest message, repeated on
    /// retransmission.
    Noise(Box<snow::HandshakeState>),
    Done,
    Failed,
}

pub struct Handshake {
    session_id: u64,
    role: Role,
    trust: Trust,
    local_secret: [u8; 32],
    local_fast_aes: bool,
    remote_flags: u8,
    phase: Phase,
    our_pake: Option<Vec<u8>>,
    /// Our latest handshake message and its step, for retransmission.
    last_sent: Option<(u8, Vec<u8>)>,
    /// When that message went out, until it is repeated: the answer to it
    /// times a round trip.
    last_sent_at: Option<Instant>,
    /// Our reply to the peer's latest step, repeated on a duplicate of it.
    reply_to: Option<(u8, (u8, Vec<u8>))>,
    /// This side refused the peer's Noise message (wrong code).
    rejected: bool,
    deadline: Instant,
    next_retransmit: Instant,
    transmits: VecDeque<HandshakeMessage>,
    events: VecDeque<HandshakeEvent>,
}

impl Handshake {
    pub fn new(
        now: Instant,
        session_id: u64,
        role: Role,
        trust: Trust,
        local_secret: [u8; 32],
        local_fast_aes: bool,
    ) -> Self {
        let mut handshake = Self {
            session_id,
            role,
            local_secret,
            local_fast_aes,
            remote_flags: 0,
            phase: Phase::Failed,
            our_pake: None,
            last_sent: None,
            last_sent_at: None,
            reply_to: None,
            rejected: false,
            deadline: now + HANDSHAKE_TIMEOUT,
            next_retransmit: now + RETRANSMIT,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            trust: trust.clone(),
        };
        match trust {
            Trust::Code(code) => {
                let (spake, message) = Spake2::<Ed25519Group>::start_symmetric(
                    &Password::new(code),
                    &Identity::new(SPAKE2_IDENTITY),
                );
                handshake.phase = Phase::Pake(spake);
                handshake.transmits.push_back(HandshakeMessage::Pake {
                    session_id,
                    message: message.clone(),
                });
                handshake.our_pake = Some(message);
            }
            Trust::Pinned(_) => handshake.start_noise(now, None),
        }
        handshake
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub fn poll_transmit(&mut self) -> Option<HandshakeMessage> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<HandshakeEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Pake(_) | Phase::Noise(_) => Some(self.next_retransmit.min(self.deadline)),
            Phase::Done | Phase::Failed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Pake(_) | Phase::Noise(_)) {
            return;
        }
        if now >= self.deadline {
            return self.fail(HandshakeError::TimedOut);
        }
        if now >= self.next_retransmit {
            if let Some(message) = &self.our_pake {
                self.transmits.push_back(HandshakeMessage::Pake {
                    session_id: self.session_id,
                    message: message.clone(),
                });
            }
            if let Some((step, message)) = &self.last_sent {
                self.last_sent_at = None;
                self.transmits.push_back(HandshakeMessage::Noise {
                    session_id: self.session_id,
                    step: *step,
                    message: message.clone(),
                });
            }
            self.next_retransmit = now + RETRANSMIT;
        }
    }

    /// A handshake message from the path's remote address. Messages of
    /// other sessions are the caller's to filter.
    pub fn handle_message(&mut self, now: Instant, message: HandshakeMessage) {
        match message {
            HandshakeMessage::Pake { message, .. } => self.handle_pake(now, &message),
            HandshakeMessage::Noise { step, message, .. } => self.handle_noise(now, step, &message),
            HandshakeMessage::Reject { .. } => {
                if matches!(self.phase, Phase::Pake(_) | Phase::Noise(_))
                    && matches!(self.trust, Trust::Code(_))
                {
                    self.fail(HandshakeError::WrongCode);
                }
            }
        }
    }

    fn handle_pake(&mut self, now: Instant, message: &[u8]) {
        if !matches!(self.phase, Phase::Pake(_)) {
            return;
        }
        let Phase::Pake(spake) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            unreachable!("checked above")
        };
        match spake.finish(message) {
            Ok(key) => {
                let mut psk = [0u8; 32];
                psk.copy_from_slice(&key[..32]);
                self.start_noise(now, Some(psk));
            }
            Err(error) => self.fail(HandshakeError::Protocol(format!(
                "bad SPAKE2 message: {error:?}"
            ))),
        }
    }

    fn start_noise(&mut self, now: Instant, psk: Option<[u8; 32]>) {
        let pattern = if psk.is_some() {
            CODE_PATTERN
        } else {
            CONTACT_PATTERN
        };
        let params = pattern.parse().expect("the pattern names are valid");
        let prologue = [b"natter v1 ".as_slice(), &self.session_id.to_be_bytes()].concat();
        let mut builder = snow::Builder::new(params)
            .local_private_key(&self.local_secret)
            .and_then(|b| b.prologue(&prologue));
        if let Some(psk) = &psk {
            builder = builder.and_then(|b| b.psk(2, psk));
        }
        let state = match self.role {
            Role::Controlling => builder.and_then(|b| b.build_initiator()),
            Role::Controlled => builder.and_then(|b| b.build_responder()),
        };
        match state {
            Ok(state) => {
                self.phase = Phase::Noise(Box::new(state));
                if self.role == Role::Controlling {
                    self.write_step(now, 1);
                }
            }
            Err(error) => self.fail(HandshakeError::Protocol(error.to_string())),
        }
    }

    fn handle_noise(&mut self, now: Instant, step: u8, message: &[u8]) {
        if self.rejected {
            // Our Reject was lost: the responder is still retransmitting.
            self.transmits.push_back(HandshakeMessage::Reject {
                session_id: self.session_id,
            });
            return;
        }
        // A repeat of the peer's previous message: our reply was lost.
        if let Some((seen, reply)) = &self.reply_to {
            if *seen == step {
                let (reply_step, reply) = reply.clone();
                self.last_sent_at = None;
                self.transmits.push_back(HandshakeMessage::Noise {
                    session_id: self.session_id,
                    step: reply_step,
                    message: reply,
                });
                return;
            }
        }
        let expected = match self.role {
            Role::Controlling => 2,
            Role::Controlled if self.last_sent.is_none() => 1,
            Role::Controlled => 3,
        };
        let Phase::Noise(state) = &mut self.phase else {
            return;
        };
        if step != expected {
            return;
        }
        let mut payload = [0u8; natter_wire::MAX_HANDSHAKE_MESSAGE];
        let read = state.read_message(message, &mut payload);
        if let Ok(len) = read {
            if step <= 2 {
                self.remote_flags = if len > 0 { payload[0] } else { 0 };
            }
        }
        if let Err(error) = read {
            let wrong_code =
                matches!(self.trust, Trust::Code(_)) && matches!(error, snow::Error::Decrypt);
            if wrong_code && self.role == Role::Controlling {
                self.rejected = true;
                for _ in 0..REJECT_COPIES {
                    self.transmits.push_back(HandshakeMessage::Reject {
                        session_id: self.session_id,
                    });
                }
            }
            return self.fail(if wrong_code {
                HandshakeError::WrongCode
            } else {
                HandshakeError::Protocol(error.to_string())
            });
        }
        if let Some(error) = self.check_pin() {
            return self.fail(error);
        }
        // Steps 2 and 3 answer our last message, and complete the handshake.
        let rtt = self
            .last_sent_at
            .map(|sent| now.saturating_duration_since(sent));
        match step {
            1 => {
                self.write_step(now, 2);
                self.reply_to = self.last_sent.clone().map(|sent| (1, sent));
            }
            2 => {
                self.write_step(now, 3);
                self.reply_to = self.last_sent.clone().map(|sent| (2, sent));
                self.finish(rtt);
            }
            _ => self.finish(rtt),
        }
    }

    /// For a saved contact: the static key the peer just proved must be the
    /// pinned one.
    fn check_pin(&self) -> Option<HandshakeError> {
        let (Trust::Pinned(expected), Phase::Noise(state)) = (&self.trust, &self.phase) else {
            return None;
        };
        let actual = state.get_remote_static()?;
        (actual != expected).then(|| HandshakeError::KeyChanged {
            expected: hex(expected),
            actual: hex(actual),
        })
    }

    fn write_step(&mut self, now: Instant, step: u8) {
        let Phase::Noise(state) = &mut self.phase else {
            return;
        };
        let flags = FLAG_PATH_CHECKS
            | if self.local_fast_aes {
                FLAG_FAST_AES
            } else {
                0
            };
        let payload: &[u8] = if step <= 2 { &[flags] } else { &[] };
        let mut message = vec![0u8; natter_wire::MAX_HANDSHAKE_MESSAGE];
        match state.write_message(payload, &mut message) {
            Ok(len) => {
                message.truncate(len);
                self.transmits.push_back(HandshakeMessage::Noise {
                    session_id: self.session_id,
                    step,
                    message: message.clone(),
                });
                self.last_sent = Some((step, message));
                self.last_sent_at = Some(now);
                // Once Noise runs, the SPAKE2 message is no longer needed.
                if step >= 2 {
                    self.our_pake = None;
                }
            }
            Err(error) => self.fail(HandshakeError::Protocol(error.to_string())),
        }
    }

    /// `rtt`: the round trip of our last message, if it was not repeated.
    fn finish(&mut self, rtt: Option<Duration>) {
        let Phase::Noise(mut state) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let mut remote_static = [0u8; 32];
        remote_static.copy_from_slice(
            state
                .get_remote_static()
                .expect("XX transmits the static key"),
        );
        let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
        let (send, receive) = match self.role {
            Role::Controlling => (initiator_to_responder, responder_to_initiator),
            Role::Controlled => (responder_to_initiator, initiator_to_responder),
        };
        self.our_pake = None;
        self.events.push_back(HandshakeEvent::Done(SessionKeys {
            send,
            receive,
            cipher: DataCipher::agree(self.local_fast_aes, self.remote_flags & FLAG_FAST_AES != 0),
            remote_path_checks: self.remote_flags & FLAG_PATH_CHECKS != 0,
            remote_static,
            rtt,
        }));
    }

    fn fail(&mut self, error: HandshakeError) {
        self.phase = Phase::Failed;
        self.events.push_back(HandshakeEvent::Failed(error));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> ([u8; 32], [u8; 32]) {
        let builder = snow::Builder::new(CONTACT_PATTERN.parse().unwrap());
        let keypair = builder.generate_keypair().unwrap();
        (
            keypair.private.try_into().unwrap(),
            keypair.public.try_into().unwrap(),
        )
    }

    /// Runs two handshakes with fast AES on both sides against each other,
    /// losing each message with probability `loss.0` (seed `loss.1`).
    /// Returns both outcomes.
    fn run(
        a_trust: Trust,
        b_trust: Trust,
        a: [u8; 32],
        b: [u8; 32],
        loss: (f64, u64),
    ) -> (HandshakeEvent, HandshakeEvent) {
        run_with_aes(a_trust, b_trust, (a, true), (b, true), loss)
    }

    fn run_with_aes(
        a_trust: Trust,
        b_trust: Trust,
        (a, a_aes): ([u8; 32], bool),
        (b, b_aes): ([u8; 32], bool),
        loss: (f64, u64),
    ) -> (HandshakeEvent, HandshakeEvent) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(loss.1);
        let mut delivered = move || !rng.gen_bool(loss.0);
        let mut now = Instant::now();
        let mut hs_a = Handshake::new(now, 5, Role::Controlling, a_trust, a, a_aes);
        let mut hs_b = Handshake::new(now, 5, Role::Controlled, b_trust, b, b_aes);
        let (mut out_a, mut out_b) = (None, None);
        for _ in 0..1000 {
            loop {
                let mut moved = false;
                // A side that failed has stopped, like the peer process.
                let (a_live, b_live) = (!failed(&out_a), !failed(&out_b));
                while let Some(message) = hs_a.poll_transmit() {
                    moved = true;
                    if delivered() && b_live {
                        hs_b.handle_message(now, message);
                    }
                }
                while let Some(message) = hs_b.poll_transmit() {
                    moved = true;
                    if delivered() && a_live {
                        hs_a.handle_message(now, message);
                    }
                }
                out_a = out_a.or_else(|| hs_a.poll_event());
                out_b = out_b.or_else(|| hs_b.poll_event());
                if !moved {
                    break;
                }
            }
            out_a = out_a.or_else(|| hs_a.poll_event());
            out_b = out_b.or_else(|| hs_b.poll_event());
            if let (Some(a), Some(b)) = (&out_a, &out_b) {
                return (a.clone(), b.clone());
            }
            now += Duration::from_millis(50);
            hs_a.handle_timeout(now);
            hs_b.handle_timeout(now);
        }
        panic!("handshake never settled: {out_a:?} {out_b:?}");
    }

    fn failed(outcome: &Option<HandshakeEvent>) -> bool {
        matches!(outcome, Some(HandshakeEvent::Failed(_)))
    }

    #[test]
    fn same_code_agrees_on_keys_and_learns_static_keys() {
        let ((a, a_pub), (b, b_pub)) = (keypair(), keypair());
        let code = Trust::Code(b"7-crossword-lantern".to_vec());
        let (HandshakeEvent::Done(ka), HandshakeEvent::Done(kb)) =
            run(code.clone(), code, a, b, (0.0, 0))
        else {
            panic!("handshake failed");
        };
        assert_eq!(ka.send, kb.receive);
        assert_eq!(ka.receive, kb.send);
        assert_ne!(ka.send, ka.receive);
        assert_eq!((ka.remote_static, kb.remote_static), (b_pub, a_pub));
        assert_eq!(
            (ka.cipher, kb.cipher),
            (DataCipher::Aes256Gcm, DataCipher::Aes256Gcm)
        );
    }

    /// Either side without fast AES makes both use ChaCha20-Poly1305, with
    /// a code and with a contact.
    #[test]
    fn both_sides_agree_on_the_cipher_and_tell_they_answer_path_checks() {
        let ((a, a_pub), (b, b_pub)) = (keypair(), keypair());
        let code = Trust::Code(b"7-crossword-lantern".to_vec());
        for (a_aes, b_aes) in [(true, true), (true, false), (false, true), (false, false)] {
            let expected = DataCipher::agree(a_aes, b_aes);
            for (a_trust, b_trust) in [
                (code.clone(), code.clone()),
                (Trust::Pinned(b_pub), Trust::Pinned(a_pub)),
            ] {
                let outcome = run_with_aes(a_trust, b_trust, (a, a_aes), (b, b_aes), (0.0, 0));
                let (HandshakeEvent::Done(ka), HandshakeEvent::Done(kb)) = outcome else {
                    panic!("handshake failed: {outcome:?}");
                };
                assert_eq!(
                    (ka.cipher, kb.cipher),
                    (expected, expected),
                    "{a_aes} {b_aes}"
                );
                // Both answer path checks, whatever their ciphers.
                assert!(ka.remote_path_checks && kb.remote_path_checks);
            }
        }
    }

    #[test]
    fn lost_messages_are_retransmitted() {
        let ((a, _), (b, _)) = (keypair(), keypair());
        let code = Trust::Code(b"7-crossword-lantern".to_vec());
        for seed in 0..50 {
            let (ea, eb) = run(code.clone(), code.clone(), a, b, (0.3, seed));
            assert!(
                matches!(
                    (&ea, &eb),
                    (HandshakeEvent::Done(_), HandshakeEvent::Done(_))
                ),
                "seed {seed}: {ea:?} {eb:?}"
            );
        }
    }

    /// Delivers everything `from` has to send to `to` at `at`.
    fn deliver(from: &mut Handshake, to: &mut Handshake, at: Instant) {
        while let Some(message) = from.poll_transmit() {
            to.handle_message(at, message);
        }
    }

    fn rtt(handshake: &mut Handshake) -> Option<Duration> {
        match handshake.poll_event() {
            Some(HandshakeEvent::Done(keys)) => keys.rtt,
            other => panic!("not done: {other:?}"),
        }
    }

    #[test]
    fn the_last_round_trip_is_timed_unless_a_message_was_repeated() {
        let ((a, a_pub), (b, b_pub)) = (keypair(), keypair());
        let one_way = Duration::from_millis(15);
        let start = Instant::now();
        let pair = || {
            (
                Handshake::new(start, 5, Role::Controlling, Trust::Pinned(b_pub), a, true),
                Handshake::new(start, 5, Role::Controlled, Trust::Pinned(a_pub), b, true),
            )
        };

        // Message 1 at 0, 2 at 15 ms, 3 at 30 ms, arriving at 45 ms.
        let (mut hs_a, mut hs_b) = pair();
        deliver(&mut hs_a, &mut hs_b, start + one_way);
        deliver(&mut hs_b, &mut hs_a, start + 2 * one_way);
        deliver(&mut hs_a, &mut hs_b, start + 3 * one_way);
        assert_eq!(rtt(&mut hs_a), Some(2 * one_way));
        assert_eq!(rtt(&mut hs_b), Some(2 * one_way));

        // Message 1 is lost and repeated: which copy message 2 answers is
        // unknown, so the initiator takes no sample.
        let (mut hs_a, mut hs_b) = pair();
        while hs_a.poll_transmit().is_some() {}
        let repeat = start + RETRANSMIT;
        hs_a.handle_timeout(repeat);
        deliver(&mut hs_a, &mut hs_b, repeat + one_way);
        deliver(&mut hs_b, &mut hs_a, repeat + 2 * one_way);
        deliver(&mut hs_a, &mut hs_b, repeat + 3 * one_way);
        assert_eq!(rtt(&mut hs_a), None);
        assert_eq!(rtt(&mut hs_b), Some(2 * one_way));
    }

    #[test]
    fn wrong_code_fails_on_both_sides() {
        let ((a, _), (b, _)) = (keypair(), keypair());
        let (ea, eb) = run(
            Trust::Code(b"7-crossword-lantern".to_vec()),
            Trust::Code(b"7-crossword-lanterm".to_vec()),
            a,
            b,
            (0.0, 0),
        );
        assert_eq!(ea, HandshakeEvent::Failed(HandshakeError::WrongCode));
        assert_eq!(eb, HandshakeEvent::Failed(HandshakeError::WrongCode));
    }

    /// The rejecting side stops at once; its copies of `Reject` still tell
    /// the other side why when some datagrams are lost.
    #[test]
    fn a_wrong_code_is_told_to_both_sides_under_loss() {
        let ((a, _), (b, _)) = (keypair(), keypair());
        for seed in 0..50 {
            let (ea, eb) = run(
                Trust::Code(b"7-crossword-lantern".to_vec()),
                Trust::Code(b"7-crossword-lanterm".to_vec()),
                a,
                b,
                (0.1, seed),
            );
            let wrong_code = HandshakeEvent::Failed(HandshakeError::WrongCode);
            assert_eq!((&ea, &eb), (&wrong_code, &wrong_code), "seed {seed}");
        }
    }

    #[test]
    fn pinned_contacts_connect_and_a_changed_key_is_refused() {
        let ((a, a_pub), (b, b_pub)) = (keypair(), keypair());
        let (ea, eb) = run(Trust::Pinned(b_pub), Trust::Pinned(a_pub), a, b, (0.0, 0));
        assert!(matches!(
            (ea, eb),
            (HandshakeEvent::Done(_), HandshakeEvent::Done(_))
        ));
        let (impostor, _) = keypair();
        let (ea, _) = run(
            Trust::Pinned(b_pub),
            Trust::Pinned(a_pub),
            a,
            impostor,
            (0.0, 0),
        );
        assert!(
            matches!(
                ea,
                HandshakeEvent::Failed(HandshakeError::KeyChanged { .. })
            ),
            "{ea:?}"
        );
    }
}
