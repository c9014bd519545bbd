//! The reliable channel's packet codec: what goes in a data frame's payload.
//!
//! Hand-written rather than serde because every byte counts on the hot path
//! and because hostile input must be refused, never trusted: every read is
//! bounds-checked and every length is checked against what is left, so no
//! input can panic the decoder or make it allocate more than the datagram.
//!
//! ```text
//! packet := frame+
//! frame  := 0x01                                            PING
//!         | 0x02 largest:varint delay_us:varint count:varint
//!                first_len:varint (gap:varint len:varint){count}   ACK
//!         | 0x03 offset:varint length:varint data[length]   STREAM
//!         | 0x04 limit:varint                               MAX_DATA
//!         | 0x05 final_offset:varint                        CLOSE
//!         | 0x06 offset:varint data[to the end]             STREAM (last)
//! ```
//!
//! A packet's number is not in it: it is the sequence number of the sealed
//! frame that carries it (`seal`), which the header sends truncated. A
//! STREAM frame that ends the packet leaves its length out, as QUIC's
//! does; a full packet then carries two more bytes of data.
//!
//! Varints are QUIC's (RFC 9000 §16): the top two bits of the first byte give
//! the length (1, 2, 4 or 8 bytes), the rest is the value, big-endian.

use std::ops::Range;

/// Largest value a varint can carry.
pub(crate) const MAX_VARINT: u64 = (1 << 62) - 1;

/// Longest a varint can be.
pub(crate) const MAX_VARINT_LEN: usize = 8;

const FRAME_PING: u8 = 0x01;
const FRAME_ACK: u8 = 0x02;
const FRAME_STREAM: u8 = 0x03;
const FRAME_MAX_DATA: u8 = 0x04;
const FRAME_CLOSE: u8 = 0x05;
const FRAME_STREAM_TO_END: u8 = 0x06;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PacketError {
    #[error("payload ends inside a field")]
    Truncated,
    #[error("payload carries no frame")]
    NoFrames,
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    #[error("ACK ranges run below packet number zero")]
    AckUnderflow,
    #[error("STREAM frame ends past the largest representable offset")]
    OffsetOverflow,
}

/// Bytes a varint holding `value` takes.
pub(crate) fn varint_len(value: u64) -> usize {
    match value {
        0..=0x3f => 1,
        0x40..=0x3fff => 2,
        0x4000..=0x3fff_ffff => 4,
        _ => 8,
    }
}

/// Bytes a varint takes, read from its first byte.
pub(crate) fn varint_len_from_first(first: u8) -> usize {
    1 << (first >> 6)
}

/// Appends `value` as a varint. Values above [`MAX_VARINT`] are a caller bug.
pub(crate) fn write_varint(out: &mut Vec<u8>, value: u64) {
    debug_assert!(value <= MAX_VARINT, "varint {value} out of range");
    match varint_len(value) {
        1 => out.push(value as u8),
        2 => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Decodes a whole varint from exactly its bytes (as many as its first byte
/// says).
pub(crate) fn decode_varint(bytes: &[u8]) -> u64 {
    let mut value = u64::from(bytes[0] & 0x3f);
    for byte in &bytes[1..] {
        value = value << 8 | u64::from(*byte);
    }
    value
}

/// A bounds-checked cursor over a payload.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        let (first, rest) = self.bytes.split_first().ok_or(PacketError::Truncated)?;
        self.bytes = rest;
        Ok(*first)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], PacketError> {
        let len = usize::try_from(len).map_err(|_| PacketError::Truncated)?;
        if len > self.bytes.len() {
            return Err(PacketError::Truncated);
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn varint(&mut self) -> Result<u64, PacketError> {
        let first = *self.bytes.first().ok_or(PacketError::Truncated)?;
        let len = varint_len_from_first(first);
        Ok(decode_varint(self.take(len as u64)?))
    }
}

/// An ACK frame: the packet numbers received, as ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckFrame {
    /// How long the receiver held the largest packet before acking it.
    pub delay_micros: u64,
    /// Half-open ranges of acknowledged packet numbers, highest first, disjoint
    /// and not adjacent. Never empty.
    pub ranges: Vec<Range<u64>>,
}

impl AckFrame {
    /// The largest packet number acknowledged.
    pub fn largest(&self) -> u64 {
        self.ranges[0].end - 1
    }
}

/// One decoded frame, borrowing its data from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Ping,
    Ack(AckFrame),
    Stream { offset: u64, data: &'a [u8] },
    MaxData(u64),
    Close { final_offset: u64 },
}

impl Frame<'_> {
    /// Whether receiving this frame obliges the peer to acknowledge it.
    pub fn is_ack_eliciting(&self) -> bool {
        !matches!(self, Frame::Ack(_))
    }
}

/// Decodes a whole payload into its frames; any error refuses the whole
/// packet, so no frame of a malformed packet is ever acted on.
pub(crate) fn decode(payload: &[u8]) -> Result<Vec<Frame<'_>>, PacketError> {
    let mut reader = Reader { bytes: payload };
    let mut frames = Vec::new();
    while !reader.is_empty() {
        frames.push(decode_frame(&mut reader)?);
    }
    if frames.is_empty() {
        return Err(PacketError::NoFrames);
    }
    Ok(frames)
}

/// A STREAM frame's data, once its offset and length are known.
fn stream<'a>(reader: &mut Reader<'a>, offset: u64, len: u64) -> Result<Frame<'a>, PacketError> {
    if offset.checked_add(len).is_none_or(|end| end > MAX_VARINT) {
        return Err(PacketError::OffsetOverflow);
    }
    let data = reader.take(len)?;
    Ok(Frame::Stream { offset, data })
}

fn decode_frame<'a>(reader: &mut Reader<'a>) -> Result<Frame<'a>, PacketError> {
    match reader.u8()? {
        FRAME_PING => Ok(Frame::Ping),
        FRAME_ACK => decode_ack(reader).map(Frame::Ack),
        FRAME_STREAM => {
            let offset = reader.varint()?;
            let len = reader.varint()?;
            stream(reader, offset, len)
        }
        FRAME_STREAM_TO_END => {
            let offset = reader.varint()?;
            stream(reader, offset, reader.bytes.len() as u64)
        }
        FRAME_MAX_DATA => Ok(Frame::MaxData(reader.varint()?)),
        FRAME_CLOSE => Ok(Frame::Close {
            final_offset: reader.varint()?,
        }),
        other => Err(PacketError::UnknownFrame(other)),
    }
}

fn decode_ack(reader: &mut Reader<'_>) -> Result<AckFrame, PacketError> {
    let largest = reader.varint()?;
    let delay_micros = reader.varint()?;
    let count = reader.varint()?;
    let first_len = reader.varint()?;
    let mut smallest = largest
        .checked_sub(first_len)
        .ok_or(PacketError::AckUnderflow)?;
    // Each further range takes at least two bytes, so a count larger than
    // what is left is a lie; capping the reservation keeps allocation bounded.
    let mut ranges = Vec::with_capacity(count.min(reader.bytes.len() as u64 / 2) as usize + 1);
    ranges.push(smallest..largest + 1);
    for _ in 0..count {
        let gap = reader.varint()?;
        let len = reader.varint()?;
        let high = smallest
            .checked_sub(gap)
            .and_then(|v| v.checked_sub(2))
            .ok_or(PacketError::AckUnderflow)?;
        smallest = high.checked_sub(len).ok_or(PacketError::AckUnderflow)?;
        ranges.push(smallest..high + 1);
    }
    Ok(AckFrame {
        delay_micros,
        ranges,
    })
}

/// Appends an ACK frame for `ranges` (half-open, highest first, disjoint and
/// not adjacent, at least one), writing as many ranges as fit in `room` bytes.
/// Returns false, writing nothing, if not even the first range fits.
pub(crate) fn write_ack(
    out: &mut Vec<u8>,
    ranges: &[Range<u64>],
    delay_micros: u64,
    room: usize,
) -> bool {
    let Some(first) = ranges.first() else {
        return false;
    };
    let largest = first.end - 1;
    let delay_micros = delay_micros.min(MAX_VARINT);
    let first_len = largest - first.start;
    // The range count is written before we know how many fit; reserving its
    // largest encoding for a frame of at most `ranges.len()` keeps it exact.
    let head = 1
        + varint_len(largest)
        + varint_len(delay_micros)
        + varint_len(ranges.len() as u64)
        + varint_len(first_len);
    if head > room {
        return false;
    }
    let mut used = head;
    let mut extra = Vec::new();
    let mut previous_smallest = first.start;
    for range in &ranges[1..] {
        let gap = previous_smallest - range.end - 1;
        let len = range.end - 1 - range.start;
        let size = varint_len(gap) + varint_len(len);
        if used + size > room {
            break;
        }
        used += size;
        extra.push((gap, len));
        previous_smallest = range.start;
    }
    out.push(FRAME_ACK);
    write_varint(out, largest);
    write_varint(out, delay_micros);
    write_varint(out, extra.len() as u64);
    write_varint(out, first_len);
    for (gap, len) in extra {
        write_varint(out, gap);
        write_varint(out, len);
    }
    true
}

/// Where a STREAM frame's data ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// After this many bytes; more frames may follow.
    Length(u64),
    /// At the end of the packet.
    Packet,
}

/// Bytes a STREAM frame header takes.
pub(crate) fn stream_header_len(offset: u64, end: StreamEnd) -> usize {
    match end {
        StreamEnd::Length(len) => 1 + varint_len(offset) + varint_len(len),
        StreamEnd::Packet => 1 + varint_len(offset),
    }
}

/// Appends a STREAM frame's header; its data follows.
pub(crate) fn write_stream_header(out: &mut Vec<u8>, offset: u64, end: StreamEnd) {
    match end {
        StreamEnd::Length(len) => {
            out.push(FRAME_STREAM);
            write_varint(out, offset);
            write_varint(out, len);
        }
        StreamEnd::Packet => {
            out.push(FRAME_STREAM_TO_END);
            write_varint(out, offset);
        }
    }
}

pub(crate) fn write_ping(out: &mut Vec<u8>) {
    out.push(FRAME_PING);
}

pub(crate) fn write_max_data(out: &mut Vec<u8>, limit: u64) {
    out.push(FRAME_MAX_DATA);
    write_varint(out, limit);
}

pub(crate) fn write_close(out: &mut Vec<u8>, final_offset: u64) {
    out.push(FRAME_CLOSE);
    write_varint(out, final_offset);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for value in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, MAX_VARINT] {
            let mut out = Vec::new();
            write_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value));
            assert_eq!(varint_len_from_first(out[0]), out.len());
            assert_eq!(decode_varint(&out), value);
        }
    }

    #[test]
    fn every_frame_round_trips() {
        let mut out = Vec::new();
        write_ping(&mut out);
        assert!(write_ack(&mut out, &[10..12, 5..8, 0..1], 1234, 100));
        write_max_data(&mut out, 1 << 40);
        write_stream_header(&mut out, 99, StreamEnd::Length(3));
        out.extend_from_slice(b"abc");
        write_close(&mut out, 102);
        write_stream_header(&mut out, 1 << 20, StreamEnd::Packet);
        out.extend_from_slice(b"to the end");
        assert_eq!(
            decode(&out).unwrap(),
            vec![
                Frame::Ping,
                Frame::Ack(AckFrame {
                    delay_micros: 1234,
                    ranges: vec![10..12, 5..8, 0..1],
                }),
                Frame::MaxData(1 << 40),
                Frame::Stream {
                    offset: 99,
                    data: b"abc"
                },
                Frame::Close { final_offset: 102 },
                Frame::Stream {
                    offset: 1 << 20,
                    data: b"to the end"
                },
            ]
        );
        for end in [StreamEnd::Length(3), StreamEnd::Packet] {
            let mut out = Vec::new();
            write_stream_header(&mut out, 1 << 20, end);
            assert_eq!(out.len(), stream_header_len(1 << 20, end));
        }
    }

    #[test]
    fn ack_keeps_only_the_ranges_that_fit() {
        let ranges: Vec<_> = (0..50u64).rev().map(|i| i * 10..i * 10 + 5).collect();
        let mut out = Vec::new();
        assert!(write_ack(&mut out, &ranges, 0, 40));
        assert!(out.len() <= 40);
        let Frame::Ack(ack) = &decode(&out).unwrap()[0] else {
            panic!("not an ACK");
        };
        assert_eq!(ack.ranges[..], ranges[..ack.ranges.len()]);
        assert!(ack.ranges.len() > 5);
        assert!(!write_ack(&mut Vec::new(), &ranges, 0, 3));
    }

    #[test]
    fn hostile_payloads_are_refused() {
        assert_eq!(decode(&[]), Err(PacketError::NoFrames));
        assert_eq!(decode(&[0x3f]), Err(PacketError::UnknownFrame(0x3f)));
        // ACK whose first range runs below zero.
        assert_eq!(decode(&[2, 1, 0, 0, 2]), Err(PacketError::AckUnderflow));
        // ACK whose gap runs below zero.
        assert_eq!(
            decode(&[2, 5, 0, 1, 0, 4, 0]),
            Err(PacketError::AckUnderflow)
        );
        // ACK claiming a huge range count with no bytes behind it.
        let mut out = vec![2, 5, 0];
        write_varint(&mut out, MAX_VARINT);
        out.push(0);
        assert_eq!(decode(&out), Err(PacketError::Truncated));
        // STREAM claiming more bytes than the payload holds.
        assert_eq!(decode(&[3, 0, 5, 1, 2]), Err(PacketError::Truncated));
        // STREAM ending past the largest offset, with a length or without.
        let mut out = vec![3];
        write_varint(&mut out, MAX_VARINT);
        out.extend_from_slice(&[1, 0]);
        assert_eq!(decode(&out), Err(PacketError::OffsetOverflow));
        let mut out = vec![6];
        write_varint(&mut out, MAX_VARINT);
        out.push(0);
        assert_eq!(decode(&out), Err(PacketError::OffsetOverflow));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn ack_ranges_round_trip(
            starts in proptest::collection::btree_set(0u64..1_000_000, 1..40),
            delay in 0u64..1_000_000,
        ) {
            // Build disjoint, non-adjacent ranges from sorted start points.
            let points: Vec<u64> = starts.into_iter().map(|s| s * 4).collect();
            let ranges: Vec<Range<u64>> = points.iter().rev().map(|&s| s..s + 2).collect();
            let mut out = Vec::new();
            prop_assert!(write_ack(&mut out, &ranges, delay, 2000));
            prop_assert_eq!(&decode(&out).unwrap()[0], &Frame::Ack(AckFrame { delay_micros: delay, ranges }));
        }
    }
}
