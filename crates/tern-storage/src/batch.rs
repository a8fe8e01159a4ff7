//! The batch frame: the unit that is written, checksummed and read back.
//!
//! A batch is framed with its length and a CRC32C so that a torn or corrupted
//! write is detected. The same bytes are written to the journal and to the
//! log's segment, so recovery never needs to re-encode.
//!
//! ```text
//! offset size field
//!      0    4 frame_len      bytes in the whole frame, header included
//!      4    4 crc32c         over bytes [8, frame_len)
//!      8    1 magic          0xB7
//!      9    1 version        1
//!     10    2 reserved       0
//!     12    4 record_count   >= 1
//!     16    8 base_offset    offset of the first record
//!     24    8 max_timestamp  largest record timestamp in the batch
//!     32    . records        record_count times:
//!                              u64 timestamp, u32 headers_len, u32 body_len,
//!                              headers, body
//! ```
//! All integers are little-endian.

use bytes::{BufMut, Bytes, BytesMut};

use crate::record::{Message, Offset, Record, Timestamp};

pub(crate) const HEADER_LEN: usize = 32;
const RECORD_OVERHEAD: usize = 16;
const MAGIC: u8 = 0xB7;
const VERSION: u8 = 1;

/// The largest frame the engine writes or accepts when reading. A length field
/// beyond it is treated as damage rather than trusted for an allocation.
pub(crate) const MAX_FRAME_LEN: usize = 256 * 1024 * 1024;

/// The parsed, not yet checksum-verified, header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) count: u32,
    pub(crate) base: Offset,
    pub(crate) max_timestamp: Timestamp,
}

impl FrameHeader {
    /// Parses a header, rejecting anything structurally impossible.
    pub(crate) fn parse(bytes: &[u8]) -> Option<FrameHeader> {
        let h = bytes.get(..HEADER_LEN)?;
        let len = u32_at(h, 0)?;
        let crc = u32_at(h, 4)?;
        if h.get(8) != Some(&MAGIC) || h.get(9) != Some(&VERSION) {
            return None;
        }
        let count = u32_at(h, 12)?;
        let base = Offset(u64_at(h, 16)?);
        let max_timestamp = Timestamp(u64_at(h, 24)?);
        let min_len = HEADER_LEN as u64 + u64::from(count) * RECORD_OVERHEAD as u64;
        if count == 0 || u64::from(len) < min_len || len as usize > MAX_FRAME_LEN {
            return None;
        }
        Some(FrameHeader {
            len,
            crc,
            count,
            base,
            max_timestamp,
        })
    }

    /// One past the offset of the last record in the frame.
    pub(crate) fn end(&self) -> Offset {
        self.base.plus(u64::from(self.count))
    }

    /// Whether the full frame bytes match the header's checksum.
    pub(crate) fn verify(&self, frame: &[u8]) -> bool {
        frame.len() == self.len as usize
            && frame
                .get(8..)
                .is_some_and(|rest| crc32c::crc32c(rest) == self.crc)
    }
}

/// What an encoded frame covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EncodedFrame {
    pub(crate) len: usize,
    pub(crate) count: u32,
    pub(crate) base: Offset,
    pub(crate) max_timestamp: Timestamp,
}

impl EncodedFrame {
    pub(crate) fn end(&self) -> Offset {
        self.base.plus(u64::from(self.count))
    }
}

/// The encoded size of a batch, used to refuse oversized batches before encoding.
pub(crate) fn encoded_len(messages: &[Message]) -> usize {
    HEADER_LEN
        + messages
            .iter()
            .map(|m| RECORD_OVERHEAD + m.headers.len() + m.body.len())
            .sum::<usize>()
}

/// Appends one frame holding `messages` (non-empty, within limits) to `buf`.
pub(crate) fn encode(buf: &mut BytesMut, base: Offset, messages: &[Message]) -> EncodedFrame {
    let start = buf.len();
    let len = encoded_len(messages);
    buf.reserve(len);
    let max_timestamp = messages
        .iter()
        .map(|m| m.timestamp)
        .max()
        .unwrap_or_default();
    buf.put_u32_le(len as u32);
    buf.put_u32_le(0); // checksum, patched below
    buf.put_u8(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u16_le(0);
    buf.put_u32_le(messages.len() as u32);
    buf.put_u64_le(base.0);
    buf.put_u64_le(max_timestamp.0);
    for m in messages {
        buf.put_u64_le(m.timestamp.0);
        buf.put_u32_le(m.headers.len() as u32);
        buf.put_u32_le(m.body.len() as u32);
        buf.put_slice(&m.headers);
        buf.put_slice(&m.body);
    }
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    EncodedFrame {
        len,
        count: messages.len() as u32,
        base,
        max_timestamp,
    }
}

/// Decodes the records of a verified frame. Returns `None` if the record
/// layout disagrees with the header, which a matching checksum makes
/// near-impossible but which is still never trusted blindly.
pub(crate) fn decode(header: &FrameHeader, frame: &Bytes) -> Option<Vec<Record>> {
    let mut records = Vec::with_capacity(header.count as usize);
    let mut pos = HEADER_LEN;
    for i in 0..u64::from(header.count) {
        let timestamp = Timestamp(u64_at(frame, pos)?);
        let hlen = u32_at(frame, pos + 8)? as usize;
        let blen = u32_at(frame, pos + 12)? as usize;
        let hstart = pos + RECORD_OVERHEAD;
        let bstart = hstart.checked_add(hlen)?;
        let end = bstart.checked_add(blen)?;
        if end > frame.len() {
            return None;
        }
        records.push(Record {
            offset: header.base.plus(i),
            timestamp,
            headers: frame.slice(hstart..bstart),
            body: frame.slice(bstart..end),
        });
        pos = end;
    }
    (pos == frame.len()).then_some(records)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ts: u64, h: &[u8], b: &[u8]) -> Message {
        Message {
            timestamp: Timestamp(ts),
            headers: Bytes::copy_from_slice(h),
            body: Bytes::copy_from_slice(b),
        }
    }

    #[test]
    fn a_frame_round_trips_its_records() {
        let mut buf = BytesMut::new();
        let msgs = [msg(5, b"h", b"body"), msg(3, b"", b""), msg(9, b"hh", b"x")];
        let enc = encode(&mut buf, Offset(40), &msgs);
        assert_eq!(enc.len, buf.len());
        let frame = buf.freeze();
        let header = FrameHeader::parse(&frame).unwrap();
        assert!(header.verify(&frame));
        assert_eq!(header.base, Offset(40));
        assert_eq!(header.max_timestamp, Timestamp(9));
        let records = decode(&header, &frame).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].offset, Offset(42));
        assert_eq!(&records[0].body[..], b"body");
        assert_eq!(&records[2].headers[..], b"hh");
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let mut buf = BytesMut::new();
        encode(&mut buf, Offset(0), &[msg(1, b"abc", b"defgh")]);
        let good = buf.freeze();
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] ^= 0x40;
            let ok = FrameHeader::parse(&bad).is_some_and(|h| h.verify(&bad));
            assert!(!ok, "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn garbage_headers_are_rejected_without_panicking() {
        assert!(FrameHeader::parse(&[]).is_none());
        assert!(FrameHeader::parse(&[0xff; 32]).is_none());
        assert!(FrameHeader::parse(&[0; 64]).is_none());
    }
}
