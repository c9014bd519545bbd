//! The receive side: stream reassembly, message parsing and flow control.
//!
//! STREAM frames may arrive in any order and overlap; each new byte is stored
//! once, in chunks keyed by stream offset. Bytes at the parse position are
//! cut into messages (varint length, then the body) and queued for the
//! application.
//!
//! Flow control is QUIC's MAX_DATA: the peer may send stream bytes only below
//! `limit`, which this side raises as the application takes messages, to
//! `consumed + window`. So every byte held here (out-of-order chunks, the
//! message being assembled, messages waiting to be taken) lies in
//! `consumed..limit`, and the memory held is at most the window plus a
//! bounded per-chunk and per-message overhead: chunk count and queued message
//! count are capped too, because a hostile peer could otherwise make each
//! stream byte cost a map node or a `Vec`.

use std::collections::{BTreeMap, VecDeque};

use super::packet::{decode_varint, varint_len_from_first, MAX_VARINT_LEN};

/// Flow-control credit a peer may assume before its first MAX_DATA arrives.
/// Small, so a tiny receive window is honoured from the first packet; the
/// receiver advertises its real window in its first packet, long before a
/// slow-starting sender could use more.
pub(crate) const INITIAL_CREDIT: u64 = 16 * 1024;

/// Parsed messages held for the application before parsing pauses. Paused
/// bytes stay in the chunk map, still inside the window.
const MAX_READY_MESSAGES: usize = 1024;

/// The smallest chunk size the out-of-order cap assumes, bytes: half of
/// the smallest payload the channel honours.
const MIN_CHUNK: u64 = 32;

/// Why a STREAM or CLOSE frame is refused before anything is changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Beyond the advertised limit or the final offset: a broken or hostile
    /// peer, since a correct one never sends such a frame.
    Violation,
    /// Would need more out-of-order chunks than allowed; the packet is dropped
    /// unacknowledged and its data comes again later.
    Overloaded,
}

/// A message longer than the limit was announced; the stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageTooLarge {
    pub len: u64,
    pub max: u64,
}

#[derive(Debug)]
enum Parser {
    /// Reading a length prefix; `have` bytes of it so far.
    Prefix {
        bytes: [u8; MAX_VARINT_LEN],
        have: usize,
    },
    /// Reading a body of `len` bytes.
    Body { message: Vec<u8>, len: usize },
}

impl Parser {
    fn fresh() -> Self {
        Parser::Prefix {
            bytes: [0; MAX_VARINT_LEN],
            have: 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct RecvStream {
    window: u64,
    max_message_size: u64,
    max_chunks: usize,
    /// The peer may send bytes below this offset.
    limit: u64,
    /// `limit` was raised (or its frame lost) and must be advertised.
    limit_pending: bool,
    /// Stream offset just past the last message the application took.
    consumed: u64,
    /// Next stream offset the parser needs.
    parsed: u64,
    /// Received, unparsed bytes at or above `parsed`, disjoint.
    chunks: BTreeMap<u64, Vec<u8>>,
    chunk_bytes: u64,
    parser: Parser,
    /// Parsed messages and the stream offset just past each.
    ready: VecDeque<(Vec<u8>, u64)>,
    ready_bytes: u64,
    /// Largest stream offset any frame reached.
    received_end: u64,
}

impl RecvStream {
    /// `window` must be at least one maximal message plus its prefix, or such
    /// a message could never be assembled; the caller guarantees it.
    /// `max_payload` is this side's packet payload, taken as the peer's too.
    pub fn new(window: u64, max_message_size: u64, max_payload: u64) -> Self {
        // Honest chunks are near-full datagrams; half a payload a chunk, at
        // most 512 bytes, leaves room for splits while capping the overhead
        // of hostile ones. With 512 bytes whatever the payload, a window
        // of 184-byte packets held a third of itself out of order, and at
        // 13 % loss the receiver dropped what the window let through (the
        // channel simulator: 3393 packets dropped, an hour without
        // finishing).
        let chunk = (max_payload / 2).clamp(MIN_CHUNK, 512);
        Self {
            window,
            max_message_size,
            max_chunks: (window / chunk) as usize + 64,
            limit: window,
            // Advertise the real window, which may exceed INITIAL_CREDIT.
            limit_pending: window > INITIAL_CREDIT,
            consumed: 0,
            parsed: 0,
            chunks: BTreeMap::new(),
            chunk_bytes: 0,
            parser: Parser::fresh(),
            ready: VecDeque::new(),
            ready_bytes: 0,
            received_end: 0,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn limit_pending(&self) -> bool {
        self.limit_pending
    }

    /// Asks for the current limit to be advertised (again).
    pub fn set_limit_pending(&mut self, pending: bool) {
        self.limit_pending = pending;
    }

    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    pub fn received_end(&self) -> u64 {
        self.received_end
    }

    /// Bytes held for the application, parsed or not.
    pub fn buffered(&self) -> u64 {
        let partial = match &self.parser {
            Parser::Prefix { have, .. } => *have as u64,
            Parser::Body { message, .. } => message.len() as u64,
        };
        self.chunk_bytes + self.ready_bytes + partial
    }

    /// Checks a STREAM frame against the limits without changing anything.
    pub fn check(&self, offset: u64, len: u64, final_offset: Option<u64>) -> Result<(), Refusal> {
        let end = offset + len;
        if end > self.limit || final_offset.is_some_and(|f| end > f) {
            return Err(Refusal::Violation);
        }
        if end > self.parsed && self.chunks.len() >= self.max_chunks {
            return Err(Refusal::Overloaded);
        }
        Ok(())
    }

    /// Stores a STREAM frame's bytes (checked with [`check`](Self::check))
    /// and parses what became contiguous.
    pub fn insert(&mut self, offset: u64, data: &[u8]) -> Result<(), MessageTooLarge> {
        let end = offset + data.len() as u64;
        self.received_end = self.received_end.max(end);
        if end <= self.parsed {
            return Ok(());
        }
        let skip = self.parsed.saturating_sub(offset);
        let (offset, data) = (offset + skip, &data[skip as usize..]);
        if offset == self.parsed && self.chunks.is_empty() && self.ready.len() < MAX_READY_MESSAGES
        {
            // Fast path: in order with nothing waiting, so no copy into a chunk.
            let used = self.feed(data)?;
            if used < data.len() {
                self.store(self.parsed, &data[used..]);
            }
            return Ok(());
        }
        self.store(offset, data);
        self.parse()
    }

    /// Stores the parts of `data` (at `offset`, at or above `parsed`) that no
    /// chunk holds yet.
    fn store(&mut self, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        let mut cursor = offset;
        if let Some((&start, chunk)) = self.chunks.range(..offset).next_back() {
            cursor = cursor.max(start + chunk.len() as u64);
        }
        while cursor < end {
            let next = self
                .chunks
                .range(cursor..end)
                .next()
                .map(|(&start, chunk)| (start, start + chunk.len() as u64));
            let gap_end = next.map_or(end, |(start, _)| start);
            if gap_end > cursor {
                let piece = data[(cursor - offset) as usize..(gap_end - offset) as usize].to_vec();
                self.chunk_bytes += piece.len() as u64;
                self.chunks.insert(cursor, piece);
            }
            match next {
                Some((_, chunk_end)) => cursor = chunk_end,
                None => break,
            }
        }
    }

    /// Parses contiguous chunks until none is contiguous or the ready queue
    /// is full.
    pub fn parse(&mut self) -> Result<(), MessageTooLarge> {
        while self.ready.len() < MAX_READY_MESSAGES {
            let Some(entry) = self.chunks.first_entry() else {
                break;
            };
            if *entry.key() != self.parsed {
                break;
            }
            let mut chunk = entry.remove();
            self.chunk_bytes -= chunk.len() as u64;
            let used = self.feed(&chunk)?;
            if used < chunk.len() {
                chunk.drain(..used);
                self.chunk_bytes += chunk.len() as u64;
                self.chunks.insert(self.parsed, chunk);
                break;
            }
        }
        Ok(())
    }

    /// Feeds in-order bytes to the parser; returns how many it took (all,
    /// unless the ready queue filled up) and advances `parsed` by that.
    fn feed(&mut self, data: &[u8]) -> Result<usize, MessageTooLarge> {
        let mut used = 0;
        while used < data.len() && self.ready.len() < MAX_READY_MESSAGES {
            match &mut self.parser {
                Parser::Prefix { bytes, have } => {
                    bytes[*have] = data[used];
                    *have += 1;
                    used += 1;
                    let need = varint_len_from_first(bytes[0]);
                    if *have < need {
                        continue;
                    }
                    let len = decode_varint(&bytes[..need]);
                    if len > self.max_message_size {
                        return Err(MessageTooLarge {
                            len,
                            max: self.max_message_size,
                        });
                    }
                    let len = len as usize;
                    if len == 0 {
                        self.parser = Parser::fresh();
                        self.push_ready(Vec::new(), self.parsed + used as u64);
                    } else {
                        // Grow as bytes arrive rather than trusting the
                        // announced length with one allocation.
                        let message = Vec::with_capacity(len.min(64 * 1024));
                        self.parser = Parser::Body { message, len };
                    }
                }
                Parser::Body { message, len } => {
                    let take = (*len - message.len()).min(data.len() - used);
                    message.extend_from_slice(&data[used..used + take]);
                    used += take;
                    if message.len() == *len {
                        let message = std::mem::take(message);
                        self.parser = Parser::fresh();
                        self.push_ready(message, self.parsed + used as u64);
                    }
                }
            }
        }
        self.parsed += used as u64;
        Ok(used)
    }

    fn push_ready(&mut self, message: Vec<u8>, end: u64) {
        self.ready_bytes += message.len() as u64;
        self.ready.push_back((message, end));
    }

    /// Hands the next message to the application, releasing its credit. Call
    /// [`parse`](Self::parse) afterwards: parsing may have paused.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let (message, end) = self.ready.pop_front()?;
        self.ready_bytes -= message.len() as u64;
        self.consumed = end;
        // Advertise in steps of an eighth of the window: often enough that
        // the sender never stalls on a full window, rarely enough to be cheap.
        let new_limit = self.consumed + self.window;
        if new_limit >= self.limit + self.window / 8 {
            self.limit = new_limit;
            self.limit_pending = true;
        }
        Some(message)
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether every byte before `final_offset` was received and parsed.
    pub fn is_complete(&self, final_offset: u64) -> bool {
        self.parsed == final_offset
            && self.chunks.is_empty()
            && matches!(self.parser, Parser::Prefix { have: 0, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            super::super::packet::write_varint(&mut out, m.len() as u64);
            out.extend_from_slice(m);
        }
        out
    }

    fn drain(r: &mut RecvStream) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = r.pop() {
            out.push(m);
            r.parse().unwrap();
        }
        out
    }

    #[test]
    fn reassembles_out_of_order_overlapping_fragments() {
        let big = vec![9u8; 300];
        let stream = framed(&[b"one", b"", &big, b"four"]);
        let mut r = RecvStream::new(1 << 20, 1 << 20, 1200);
        // Deliver in reverse, overlapping pieces, with duplicates.
        let cuts = [
            (250, stream.len()),
            (100, 260),
            (3, 120),
            (0, 5),
            (100, 200),
        ];
        for (from, to) in cuts {
            r.check(from as u64, (to - from) as u64, None).unwrap();
            r.insert(from as u64, &stream[from..to]).unwrap();
        }
        assert_eq!(r.buffered(), 3 + 300 + 4);
        assert_eq!(
            drain(&mut r),
            vec![b"one".to_vec(), Vec::new(), big, b"four".to_vec()]
        );
        assert!(r.is_complete(stream.len() as u64));
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn refuses_data_past_the_limit_or_the_final_offset() {
        let r = RecvStream::new(100, 50, 1200);
        assert_eq!(r.check(90, 10, None), Ok(()));
        assert_eq!(r.check(90, 11, None), Err(Refusal::Violation));
        assert_eq!(r.check(0, 11, Some(10)), Err(Refusal::Violation));
    }

    #[test]
    fn credit_is_released_as_messages_are_taken() {
        let mut r = RecvStream::new(80, 40, 1200);
        let stream = framed(&[&[1; 39], &[2; 39]]);
        r.insert(0, &stream).unwrap();
        assert_eq!(r.limit(), 80);
        r.set_limit_pending(false);
        assert_eq!(r.pop().unwrap(), vec![1; 39]);
        assert_eq!(
            (r.consumed(), r.limit(), r.limit_pending()),
            (40, 120, true)
        );
    }

    #[test]
    fn oversized_length_prefix_is_an_error() {
        let mut r = RecvStream::new(1000, 10, 1200);
        assert_eq!(
            r.insert(0, &framed(&[&[0; 11]])),
            Err(MessageTooLarge { len: 11, max: 10 })
        );
    }

    #[test]
    fn parsing_pauses_when_the_application_lags() {
        let mut r = RecvStream::new(1 << 20, 100, 1200);
        let empties = vec![0u8; MAX_READY_MESSAGES + 10];
        r.insert(0, &empties).unwrap();
        assert_eq!(r.buffered(), 10, "unparsed bytes stay buffered");
        assert_eq!(drain(&mut r).len(), MAX_READY_MESSAGES + 10);
        assert!(r.is_complete(empties.len() as u64));
    }

    #[test]
    fn chunk_count_is_bounded() {
        let r_window = 64 * 1024;
        let mut r = RecvStream::new(r_window, 1000, 1200);
        let mut refused = 0;
        for i in 0..r_window / 2 {
            let offset = 1 + i * 2;
            match r.check(offset, 1, None) {
                Ok(()) => r.insert(offset, &[0]).unwrap(),
                Err(refusal) => {
                    assert_eq!(refusal, Refusal::Overloaded);
                    refused += 1;
                }
            }
        }
        assert!(refused > 0);
        assert!(r.chunks.len() <= r.max_chunks);
    }
}
