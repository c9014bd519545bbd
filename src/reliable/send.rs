//! The send side: queued messages, framed as one byte stream.
//!
//! Each message goes on the stream as a varint length then its bytes, so a
//! zero-length message still takes a byte and fragmentation is just slicing
//! the stream into STREAM frames. The queue keeps every message until all of
//! its bytes *and all earlier bytes* are acknowledged, so `Acknowledged`
//! events come in order and the buffer is released from the front.
//!
//! Bytes are in one of three states: never sent (at or past `unsent`), sent
//! and in flight, or lost and waiting in `lost` to be sent again (always
//! before new data, so the receiver's head-of-line hole closes first).

use std::collections::VecDeque;
use std::ops::Range;

use super::ack::RangeSet;
use super::packet::{varint_len, write_varint, MAX_VARINT_LEN};
use super::MessageId;

#[derive(Debug)]
struct QueuedMessage {
    id: MessageId,
    /// Stream offset of the length prefix.
    start: u64,
    prefix: [u8; MAX_VARINT_LEN],
    prefix_len: u8,
    body: Vec<u8>,
}

impl QueuedMessage {
    fn end(&self) -> u64 {
        self.start + u64::from(self.prefix_len) + self.body.len() as u64
    }

    /// Appends the part of this message's stream bytes inside `range`.
    fn copy(&self, range: &Range<u64>, out: &mut Vec<u8>) {
        let prefix_len = usize::from(self.prefix_len);
        let from = (range.start.max(self.start) - self.start) as usize;
        let to = (range.end.min(self.end()) - self.start) as usize;
        if from < prefix_len {
            out.extend_from_slice(&self.prefix[from..to.min(prefix_len)]);
        }
        if to > prefix_len {
            out.extend_from_slice(&self.body[from.max(prefix_len) - prefix_len..to - prefix_len]);
        }
    }
}

/// The buffer is full; the message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferFull;

#[derive(Debug)]
pub(crate) struct SendStream {
    queue: VecDeque<QueuedMessage>,
    next_id: u64,
    /// Stream offset just past the last queued byte.
    end: u64,
    /// First byte never sent.
    unsent: u64,
    /// Every byte below is acknowledged and released.
    acked_prefix: u64,
    /// Acknowledged bytes at or above `acked_prefix`.
    acked: RangeSet,
    /// Bytes to send again.
    lost: RangeSet,
    capacity: u64,
}

impl SendStream {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            next_id: 0,
            end: 0,
            unsent: 0,
            acked_prefix: 0,
            acked: RangeSet::default(),
            lost: RangeSet::default(),
            capacity: capacity as u64,
        }
    }

    /// Bytes held: queued, in flight or awaiting retransmission.
    pub fn buffered(&self) -> u64 {
        self.end - self.acked_prefix
    }

    /// Stream offset just past every byte ever queued.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// First stream byte never sent.
    pub fn unsent(&self) -> u64 {
        self.unsent
    }

    /// Queues a message. A message larger than the whole buffer is accepted
    /// when the buffer is empty, so any message within the size limit can be
    /// sent eventually.
    pub fn push(&mut self, body: Vec<u8>) -> Result<MessageId, BufferFull> {
        let mut prefix = Vec::with_capacity(MAX_VARINT_LEN);
        write_varint(&mut prefix, body.len() as u64);
        let size = (prefix.len() + body.len()) as u64;
        let buffered = self.buffered();
        if buffered > 0 && buffered + size > self.capacity {
            return Err(BufferFull);
        }
        let id = MessageId(self.next_id);
        self.next_id += 1;
        let mut prefix_bytes = [0; MAX_VARINT_LEN];
        prefix_bytes[..prefix.len()].copy_from_slice(&prefix);
        self.queue.push_back(QueuedMessage {
            id,
            start: self.end,
            prefix: prefix_bytes,
            prefix_len: varint_len(body.len() as u64) as u8,
            body,
        });
        self.end += size;
        Ok(id)
    }

    /// Most bytes the STREAM frames for everything sendable now would take:
    /// the lost bytes, the new bytes `flow_limit` allows, and a worst-case
    /// frame header for each piece.
    pub fn pending_size_bound(&self, flow_limit: u64) -> u64 {
        let header = 1 + 2 * MAX_VARINT_LEN as u64;
        let lost: u64 = self.lost.iter().map(|r| r.end - r.start + header).sum();
        let new = self.end.min(flow_limit).saturating_sub(self.unsent);
        lost + new + header
    }

    /// Where the next STREAM frame would start: the first lost byte, else the
    /// first unsent byte if the peer's `flow_limit` allows any.
    pub fn next_offset(&self, flow_limit: u64) -> Option<u64> {
        if let Some(lost) = self.lost.first() {
            return Some(lost.start);
        }
        (self.unsent < self.end.min(flow_limit)).then_some(self.unsent)
    }

    /// Takes the next chunk of at most `max_len` bytes starting at `offset`
    /// (from [`next_offset`](Self::next_offset)) and marks it sent. Returns
    /// its range, to [`write`](Self::write), and whether it is a
    /// retransmission.
    pub fn take_chunk(&mut self, offset: u64, max_len: u64, flow_limit: u64) -> (Range<u64>, bool) {
        let (range, retransmission) = match self.lost.first() {
            Some(lost) => (lost.start..lost.end.min(offset + max_len), true),
            None => (
                offset..self.end.min(flow_limit).min(offset + max_len),
                false,
            ),
        };
        debug_assert_eq!(range.start, offset);
        self.lost.remove(range.clone());
        self.unsent = self.unsent.max(range.end);
        (range, retransmission)
    }

    /// Appends the stream bytes in `range` (all still buffered) to `out`.
    pub fn write(&self, range: &Range<u64>, out: &mut Vec<u8>) {
        let first = self.queue.partition_point(|m| m.end() <= range.start);
        for message in self.queue.range(first..) {
            if message.start >= range.end {
                break;
            }
            message.copy(range, out);
        }
    }

    /// Bytes in `range` arrived; returns the messages now wholly
    /// acknowledged, in order, and releases them.
    pub fn on_acked(&mut self, range: Range<u64>, released: &mut Vec<MessageId>) {
        let range = range.start.max(self.acked_prefix)..range.end;
        if range.is_empty() {
            return;
        }
        self.lost.remove(range.clone());
        self.acked.insert(range);
        if self
            .acked
            .first()
            .is_some_and(|r| r.start <= self.acked_prefix)
        {
            if let Some(prefix) = self.acked.pop_first() {
                self.acked_prefix = prefix.end;
            }
        }
        while let Some(message) = self.queue.front() {
            if message.end() > self.acked_prefix {
                break;
            }
            released.push(message.id);
            self.queue.pop_front();
        }
    }

    /// Bytes in `range` must be sent again (their packet was lost, or a probe
    /// repeats them). Already-acknowledged parts are skipped.
    pub fn on_lost(&mut self, range: Range<u64>) {
        let range = range.start.max(self.acked_prefix)..range.end;
        if range.is_empty() {
            return;
        }
        for gap in self.acked.gaps_within(range) {
            self.lost.insert(gap);
        }
    }

    /// Every queued byte is acknowledged.
    pub fn is_flushed(&self) -> bool {
        self.acked_prefix == self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(stream: &mut SendStream, max_len: u64) -> Option<(Range<u64>, bool, Vec<u8>)> {
        let offset = stream.next_offset(u64::MAX)?;
        let (range, retransmission) = stream.take_chunk(offset, max_len, u64::MAX);
        let mut out = Vec::new();
        stream.write(&range, &mut out);
        Some((range, retransmission, out))
    }

    #[test]
    fn messages_are_length_prefixed_and_fragmented() {
        let mut s = SendStream::new(1 << 20);
        assert_eq!(s.push(b"hello".to_vec()), Ok(MessageId(0)));
        assert_eq!(s.push(Vec::new()), Ok(MessageId(1)));
        assert_eq!(s.push(vec![7; 100]), Ok(MessageId(2)));
        assert_eq!(s.end(), 6 + 1 + 102);
        let (range, retransmission, bytes) = take(&mut s, 4).unwrap();
        assert_eq!((range, retransmission), (0..4, false));
        assert_eq!(bytes, b"\x05hel");
        let (range, _, bytes) = take(&mut s, 5).unwrap();
        assert_eq!(range, 4..9);
        assert_eq!(bytes, [b'l', b'o', 0, 0x40, 100]);
        let (range, _, bytes) = take(&mut s, 1000).unwrap();
        assert_eq!(range, 9..109);
        assert_eq!(bytes, vec![7; 100]);
        assert!(take(&mut s, 1000).is_none());
    }

    #[test]
    fn lost_bytes_go_first_and_acks_release_in_order() {
        let mut s = SendStream::new(1 << 20);
        s.push(vec![1; 10]).unwrap();
        s.push(vec![2; 10]).unwrap();
        let mut released = Vec::new();
        take(&mut s, 11).unwrap();
        take(&mut s, 11).unwrap();
        s.on_acked(11..22, &mut released);
        assert!(released.is_empty(), "first message not acknowledged yet");
        s.on_lost(0..11);
        s.push(vec![3; 10]).unwrap();
        let (range, retransmission, bytes) = take(&mut s, 100).unwrap();
        assert_eq!((range, retransmission), (0..11, true));
        assert_eq!(bytes[1..], [1; 10]);
        s.on_acked(0..11, &mut released);
        assert_eq!(released, vec![MessageId(0), MessageId(1)]);
        assert!(!s.is_flushed());
        s.on_lost(0..22);
        assert_eq!(
            take(&mut s, 100).unwrap().0,
            22..33,
            "acked bytes never resent"
        );
    }

    #[test]
    fn flow_limit_caps_new_data_only() {
        let mut s = SendStream::new(1 << 20);
        s.push(vec![0; 100]).unwrap();
        assert_eq!(s.next_offset(0), None);
        let (range, _) = s.take_chunk(0, 1000, 50);
        assert_eq!(range, 0..50);
        assert_eq!(s.next_offset(50), None);
        s.on_lost(10..20);
        assert_eq!(s.next_offset(50), Some(10));
    }

    #[test]
    fn pending_size_bound_covers_lost_and_new_bytes() {
        let mut s = SendStream::new(1 << 20);
        assert_eq!(s.pending_size_bound(u64::MAX), 17, "one empty frame header");
        s.push(vec![0; 100]).unwrap();
        assert_eq!(s.pending_size_bound(u64::MAX), 102 + 17);
        assert_eq!(
            s.pending_size_bound(50),
            50 + 17,
            "new bytes capped by flow control"
        );
        take(&mut s, 1000).unwrap();
        s.on_lost(10..20);
        s.on_lost(30..40);
        assert_eq!(s.pending_size_bound(u64::MAX), 2 * (10 + 17) + 17);
    }

    #[test]
    fn full_buffer_refuses_but_an_empty_one_takes_anything() {
        let mut s = SendStream::new(100);
        assert!(s.push(vec![0; 500]).is_ok());
        assert_eq!(s.push(vec![0; 1]), Err(BufferFull));
        take(&mut s, 1000).unwrap();
        let mut released = Vec::new();
        s.on_acked(0..502, &mut released);
        assert!(s.is_flushed());
        assert!(s.push(vec![0; 90]).is_ok());
        assert_eq!(s.push(vec![0; 10]), Err(BufferFull));
        assert!(s.push(vec![0; 7]).is_ok());
    }
}
