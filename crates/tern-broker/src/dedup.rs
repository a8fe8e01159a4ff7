//! Message deduplication, with the names of RabbitMQ's deduplication
//! plugin: on a queue (`x-message-deduplication: true`) or on an exchange
//! (type `x-message-deduplication`). A message whose key was seen within the
//! window is confirmed to its publisher but not enqueued (not routed, for an
//! exchange).
//!
//! The key is the message's `x-deduplication-header` header, or else its
//! `message_id`; a message with neither is never a duplicate. The window is
//! `x-cache-ttl` milliseconds (none: until evicted; a message's own
//! `x-cache-ttl` header overrides it for its key) and at most
//! `x-cache-size` keys (default 1,000,000), the oldest evicted first.
//!
//! Every admitted key is one record of the window's log (a queue's
//! `u<id>`, an exchange's `xd-…`; fsynced like the messages, and in the same
//! group commit, appended after them), replayed on open, so the window
//! survives a restart. A key is admitted only once its message was stored
//! somewhere: one that reached no queue leaves no key, so its retry can. A duplicate appends an empty record and
//! is confirmed when that is durable: commits complete in order, so by then
//! the original message is durable too. The check, the message's append and
//! the key's record happen under one lock, so two concurrent publishes of a
//! key enqueue one message. On open, a log holding many more records than
//! live keys is rewritten as one batch of the live ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tern_storage::{Appended, Log, Message as StoredRecord, Timestamp};

use crate::error::BrokerError;
use crate::message::Message;
use crate::value::FieldValue;

/// The header that carries a message's deduplication key.
const KEY_HEADER: &str = "x-deduplication-header";
/// Keys kept when `x-cache-size` is not given.
const DEFAULT_CACHE_SIZE: u64 = 1_000_000;

/// A queue's deduplication settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupPolicy {
    /// How long a key is remembered, in milliseconds (`x-cache-ttl`).
    pub(crate) ttl: Option<u64>,
    /// The most keys remembered (`x-cache-size`).
    pub(crate) size: u64,
}

impl DedupPolicy {
    /// Settings from `x-cache-ttl` and `x-cache-size`, already checked.
    pub(crate) fn new(ttl: Option<u64>, size: Option<u64>) -> DedupPolicy {
        DedupPolicy {
            ttl,
            size: size.unwrap_or(DEFAULT_CACHE_SIZE),
        }
    }
}

/// A message's deduplication key, if it has one.
fn key_of(message: &Message) -> Option<String> {
    let header = message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get(KEY_HEADER))
        .and_then(|v| match v {
            FieldValue::String(s) => Some(s.clone()),
            FieldValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            other => other.as_i64().map(|n| n.to_string()),
        });
    header.or_else(|| message.properties.message_id.clone())
}

/// A message's own `x-cache-ttl` header, in milliseconds, if it is a
/// non-negative integer.
fn ttl_of(message: &Message) -> Option<u64> {
    let v = message.properties.headers.as_ref()?.get("x-cache-ttl")?;
    u64::try_from(v.as_i64()?).ok()
}

#[derive(Debug, Default)]
struct Window {
    /// Key to its expiry (`u64::MAX`: none).
    seen: HashMap<String, u64>,
    /// Keys in admission order, which is expiry order unless messages bring
    /// their own TTL (then a key may outlive its place in the queue, which
    /// only bounds how long it is kept).
    order: VecDeque<(u64, String)>,
}

impl Window {
    fn admit(&mut self, key: String, expires: u64) {
        self.seen.insert(key.clone(), expires);
        self.order.push_back((expires, key));
    }

    /// Forgets expired keys and the oldest beyond `size`.
    fn prune(&mut self, now: u64, size: u64) {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now && self.order.len() as u64 <= size {
                break;
            }
            if let Some((expires, key)) = self.order.pop_front() {
                if self.seen.get(&key) == Some(&expires) {
                    self.seen.remove(&key);
                }
            }
        }
    }
}

/// A queue's deduplication window and its log.
#[derive(Debug)]
pub(crate) struct Dedup {
    log: Log,
    policy: DedupPolicy,
    window: Mutex<Window>,
}

fn record(body: Bytes) -> StoredRecord {
    StoredRecord {
        timestamp: Timestamp::now(),
        headers: Bytes::new(),
        body,
    }
}

fn encode(expires: u64, key: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + key.len());
    b.put_u64_le(expires);
    b.put_slice(key.as_bytes());
    b.freeze()
}

impl Dedup {
    /// Replays the window from its log, compacting the log if it has grown
    /// to many times the live keys.
    pub(crate) fn open(log: Log, policy: DedupPolicy) -> Result<Dedup, BrokerError> {
        let mut window = Window::default();
        let now = Timestamp::now().0;
        let mut reader = log.reader(log.start())?;
        let mut records = 0u64;
        loop {
            let batch = reader.read(4096, 8 << 20)?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                records += 1;
                let mut b = rec.body.clone();
                if b.remaining() < 8 {
                    continue; // a duplicate's marker
                }
                let expires = b.get_u64_le();
                if let Ok(key) = String::from_utf8(b.to_vec()) {
                    window.admit(key, expires);
                }
            }
            window.prune(now, policy.size);
        }
        window.prune(now, policy.size);
        let live = window.order.len() as u64;
        if records > 2 * live + 1024 {
            let snapshot: Vec<StoredRecord> = window
                .order
                .iter()
                .map(|(expires, key)| record(encode(*expires, key)))
                .collect();
            // A snapshot too large for one batch is left for a later open.
            if let Ok(appended) = log.append(&snapshot) {
                let start = appended.offsets().start;
                if appended.wait().is_ok() {
                    log.delete_before(start)?;
                }
            } else if snapshot.is_empty() {
                log.delete_before(log.end())?;
            }
        }
        Ok(Dedup {
            log,
            policy,
            window: Mutex::new(window),
        })
    }

    /// Stores `message` with `append` unless its key was seen within the
    /// window. Returns the tickets to await before confirming: the message's
    /// appends and its key's, or a duplicate's marker; and whether it was a
    /// duplicate. A message that `append` stored nowhere admits no key.
    pub(crate) fn admit(
        &self,
        message: &Message,
        append: impl FnOnce() -> Result<Vec<Appended>, BrokerError>,
    ) -> Result<(Vec<Appended>, bool), BrokerError> {
        let Some(key) = key_of(message) else {
            return Ok((append()?, false));
        };
        let now = Timestamp::now().0;
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        window.prune(now, self.policy.size);
        if window.seen.get(&key).is_some_and(|expires| *expires > now) {
            return Ok((vec![self.log.append(&[record(Bytes::new())])?], true));
        }
        let mut tickets = append()?;
        if tickets.is_empty() {
            return Ok((tickets, false));
        }
        let ttl = ttl_of(message).or(self.policy.ttl);
        let expires = ttl.map_or(u64::MAX, |t| now.saturating_add(t));
        tickets.push(self.log.append(&[record(encode(expires, &key))])?);
        window.admit(key, expires);
        Ok((tickets, false))
    }
}
