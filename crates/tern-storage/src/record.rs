//! The values a log stores: messages going in, records coming out, and the
//! offsets and timestamps that address them.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The position of a record in its log: dense, starting at 0, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset `n` records later.
    pub fn plus(self, n: u64) -> Offset {
        Offset(self.0 + n)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A message to append: the log assigns its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// When the message was published.
    pub timestamp: Timestamp,
    /// Opaque, already-encoded headers (the log does not interpret them).
    pub headers: Bytes,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// A message stamped with the current time.
    pub fn new(headers: impl Into<Bytes>, body: impl Into<Bytes>) -> Message {
        Message {
            timestamp: Timestamp::now(),
            headers: headers.into(),
            body: body.into(),
        }
    }
}

/// A stored message, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where the record sits in its log.
    pub offset: Offset,
    /// When the message was published.
    pub timestamp: Timestamp,
    /// The headers, byte for byte as appended.
    pub headers: Bytes,
    /// The body, byte for byte as appended.
    pub body: Bytes,
}

/// A half-open range of offsets `[start, end)`, as assigned to one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    /// The first offset assigned.
    pub start: Offset,
    /// One past the last offset assigned.
    pub end: Offset,
}

impl Offsets {
    /// How many offsets the range holds.
    pub fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The last offset in the range, if any.
    pub fn last(&self) -> Option<Offset> {
        (!self.is_empty()).then(|| Offset(self.end.0 - 1))
    }
}
