//! Delayed messages: the `x-delayed-message` exchange type (RabbitMQ's
//! plugin, with its `x-delayed-type` and `x-delay` names) and
//! [`Broker::publish_delayed`], both over one durable timer index.
//!
//! Every delayed message is one record of the broker-wide `delays` log
//! (fsynced before its publish is confirmed): the record's timestamp is the
//! message's due time, its headers the vhost and the stored metadata, its
//! body the body. A record is identified by its [`DueKey`], (due time,
//! offset), and messages fire in key order. Since a log is in arrival order
//! and not in due order, three things make firing in due order cheap:
//!
//! - **The watermark.** Firing is strictly in key order, so "fired" is one
//!   key: everything at or below it has fired. It is appended to the
//!   `delays-fired` log after the fired messages are durable in their
//!   queues (so a crash between the two fires them again: at least once),
//!   and a restart starts above it. A message published with a due time the
//!   firing has already passed gets the due time of the last key taken, so
//!   its key still lies above everything taken.
//! - **The window.** Memory holds the keys of the nearest pending messages
//!   only: every pending key below the *horizon*, at most
//!   [`DelayLimits::window`] of them. Keys at or above the horizon are on
//!   disk only. A new key below the horizon joins the window (which, when
//!   full, hands its largest keys back to disk and lowers the horizon to
//!   them); one above does not. Messages themselves are read back at fire
//!   time.
//! - **Chunk summaries.** The log is cut into chunks of
//!   [`DelayLimits::chunk`] offsets, and memory holds, per chunk, only the
//!   smallest key it has on disk only. When the window runs dry, a refill
//!   scans chunks in the order of those smallest keys, keeping the window's
//!   worth of smallest keys, and stops at the first chunk whose smallest key
//!   lies above all of them: the new horizon. When due times follow arrival
//!   order (a fixed retry backoff, say), a refill reads little more than
//!   the chunks it loads; when they do not, it reads every chunk with
//!   pending keys.
//!
//! The log is deleted from the front up to the first chunk that still has a
//! pending message, whole segments at a time.

use std::cmp::Ordering as KeyOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tern_storage::{
    Appended, Durability, Log, LogConfig, Message as StoredRecord, Offset, Reader, Store, Timestamp,
};
use tokio::sync::Notify;

use crate::broker::{Broker, Published};
use crate::codec::{self, StoredMeta};
use crate::error::BrokerError;
use crate::exchange::{Exchange, ExchangeFlavor};
use crate::message::Message;

/// The log of delayed messages.
pub(crate) const DELAY_LOG: &str = "delays";
/// The log of the firing watermark.
pub(crate) const FIRED_LOG: &str = "delays-fired";
/// The longest delay, as RabbitMQ's plugin allows: 2^32 - 1 milliseconds.
const MAX_DELAY_MS: u64 = u32::MAX as u64;
/// Messages fired (routed, then awaited) together.
const FIRE_BATCH: usize = 512;
/// Watermark records between compactions of the watermark log.
const WATERMARKS_PER_COMPACTION: u64 = 1024;
/// How often the watermark log reaches the disk: a crash re-fires at most
/// what fired in this window.
const FIRED_SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// How much of the timer index stays in memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DelayLimits {
    /// The most keys the window holds.
    pub(crate) window: usize,
    /// Offsets per chunk summary.
    pub(crate) chunk: u64,
    /// The most bytes of messages (headers and bodies) the window keeps
    /// beside their keys, so that firing them reads nothing back.
    pub(crate) held_bytes: usize,
}

impl Default for DelayLimits {
    fn default() -> Self {
        // 256 Ki keys in a BTreeSet is under 10 MiB; one summary per 4096
        // messages is a few hundred bytes per million.
        DelayLimits {
            window: 256 * 1024,
            chunk: 4096,
            held_bytes: 32 << 20,
        }
    }
}

/// A delayed message's place in firing order: its due time (milliseconds
/// since the epoch), then its offset in the delay log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct DueKey {
    pub(crate) due: u64,
    pub(crate) offset: u64,
}

/// The delay a message published to `exchange` asks for, if the exchange
/// delays and the message's `x-delay` header is a positive integer. Anything
/// else routes at once, as with RabbitMQ's plugin. Publishing to an internal
/// exchange is left to the router to refuse.
pub(crate) fn requested_delay(exchange: &Exchange, message: &Message) -> Option<u64> {
    if exchange.flavor != ExchangeFlavor::Delayed || exchange.internal {
        return None;
    }
    let ms = message
        .properties
        .headers
        .as_ref()?
        .get("x-delay")?
        .as_i64()?;
    (ms > 0).then(|| (ms as u64).min(MAX_DELAY_MS))
}

/// A delayed message's stored headers and body, copied into one buffer of
/// its own (out of the log's read buffers, so holding it holds nothing else).
#[derive(Debug, Clone)]
struct Held {
    bytes: Bytes,
    headers_len: usize,
}

/// What holding a message costs beyond its bytes (the buffer's allocation,
/// the map entry), counted against [`DelayLimits::held_bytes`].
const HELD_OVERHEAD: usize = 96;

impl Held {
    fn copy(headers: &[u8], body: &[u8]) -> Held {
        let mut bytes = BytesMut::with_capacity(headers.len() + body.len());
        bytes.put_slice(headers);
        bytes.put_slice(body);
        Held {
            bytes: bytes.freeze(),
            headers_len: headers.len(),
        }
    }

    fn size(&self) -> usize {
        self.bytes.len() + HELD_OVERHEAD
    }

    fn decode(&self) -> Option<(String, Message)> {
        decode_record(
            &self.bytes.slice(..self.headers_len),
            self.bytes.slice(self.headers_len..),
        )
    }
}

/// A key a refill may load, with its message if the byte budget allowed.
/// Ordered by key alone.
#[derive(Debug)]
struct Candidate(DueKey, Option<Held>);

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<KeyOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> KeyOrdering {
        self.0.cmp(&other.0)
    }
}

/// What [`DelayStore::take_due`] found.
#[derive(Debug)]
struct Taken {
    keys: Vec<(DueKey, Option<Held>)>,
    next: Option<u64>,
    refill: bool,
}

/// How the delay store hands a due message to the broker to route: the
/// returned tickets resolve when it is durable in every queue it reached.
#[derive(Clone)]
pub(crate) struct DueRouter(pub(crate) Arc<RouteFn>);

type RouteFn = dyn Fn(&str, Message) -> Vec<Appended> + Send + Sync;

impl std::fmt::Debug for DueRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DueRouter")
    }
}

#[derive(Debug)]
struct DelayState {
    /// Every pending key below the horizon, in firing order.
    window: BTreeSet<DueKey>,
    /// Some window messages themselves (by offset), within
    /// [`DelayLimits::held_bytes`]; the others are read back at fire time.
    held: HashMap<u64, Held>,
    held_bytes: usize,
    /// Pending keys at or above this are on disk only; `None`: none are.
    horizon: Option<DueKey>,
    /// Per chunk: the smallest key it has on disk only.
    chunk_min: BTreeMap<u64, DueKey>,
    /// The same, ordered by key, to refill in key order.
    chunks_by_key: BTreeSet<(DueKey, u64)>,
    /// Per chunk: how many of its keys are in the window.
    window_chunks: BTreeMap<u64, u32>,
    /// The largest key taken for firing; new keys go above it.
    taken: Option<DueKey>,
    /// Everything at or below this has fired and is durable where it went.
    watermark: Option<DueKey>,
    /// Messages waiting: in the window or on disk only (not those taken
    /// for firing, unless put back).
    pending: u64,
    /// One past the last offset handed out by an append (committed or not):
    /// a refill reads chunks up to here, waiting for commits if need be.
    reserved_end: u64,
    /// A refill is running (in the background); it alone removes chunk
    /// summaries, and the log is not truncated meanwhile.
    refilling: bool,
    /// Reads messages at fire time.
    random: Reader,
    watermarks_since_compaction: u64,
}

/// The durable timer index; see the module documentation.
#[derive(Debug)]
pub(crate) struct DelayStore {
    log: Log,
    fired: Log,
    limits: DelayLimits,
    state: Mutex<DelayState>,
    /// Reads chunks for refills, without the state lock held.
    scan: Mutex<Reader>,
    wake: Notify,
    closed: AtomicBool,
    /// Batches routed and not yet marked fired.
    unmarked: AtomicUsize,
}

fn storage(e: tern_storage::StorageError) -> BrokerError {
    BrokerError::from(e)
}

/// The record of a delayed message: vhost and stored metadata in the
/// headers (`u16` vhost length, vhost, [`codec::encode_meta`]).
fn encode_record(vhost: &str, message: &Message, due: u64) -> StoredRecord {
    let mut headers = BytesMut::new();
    headers.put_u16_le(vhost.len() as u16);
    headers.put_slice(vhost.as_bytes());
    codec::encode_meta(
        &StoredMeta {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            properties: message.properties.clone(),
            delivery_count: 0,
        },
        &mut headers,
    );
    StoredRecord {
        timestamp: Timestamp(due),
        headers: headers.freeze(),
        body: message.body.clone(),
    }
}

fn decode_record(headers: &Bytes, body: Bytes) -> Option<(String, Message)> {
    let mut h = headers.clone();
    if h.remaining() < 2 {
        return None;
    }
    let len = usize::from(h.get_u16_le());
    if h.remaining() < len {
        return None;
    }
    let vhost = String::from_utf8(h.split_to(len).to_vec()).ok()?;
    let meta = codec::decode_meta(&h).ok()?;
    Some((
        vhost,
        Message {
            exchange: meta.exchange,
            routing_key: meta.routing_key,
            properties: meta.properties,
            body,
        },
    ))
}

fn encode_watermark(key: DueKey) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u64_le(key.due);
    b.put_u64_le(key.offset);
    b.freeze()
}

fn read_all(log: &Log, mut each: impl FnMut(tern_storage::Record)) -> Result<(), BrokerError> {
    let mut reader = log.reader(log.start()).map_err(storage)?;
    loop {
        let batch = reader.read(4096, 8 << 20).map_err(storage)?;
        if batch.is_empty() {
            return Ok(());
        }
        batch.into_iter().for_each(&mut each);
    }
}

impl DelayStore {
    /// Opens the timer index: reads the watermark, then summarises every
    /// pending record of the delay log by chunk and loads the window.
    pub(crate) fn open(store: &Store, limits: DelayLimits) -> Result<Arc<DelayStore>, BrokerError> {
        let log = store.open_log(
            DELAY_LOG,
            LogConfig {
                // Smaller segments than queues', so fired ones go sooner.
                segment_bytes: 8 << 20,
                ..LogConfig::with_durability(Durability::Always)
            },
        )?;
        let fired = store.open_log(
            FIRED_LOG,
            LogConfig {
                segment_bytes: 64 * 1024,
                ..LogConfig::with_durability(Durability::Interval(FIRED_SYNC_INTERVAL))
            },
        )?;
        let mut watermark: Option<DueKey> = None;
        read_all(&fired, |rec| {
            let mut b = rec.body.clone();
            if b.remaining() >= 16 {
                let key = DueKey {
                    due: b.get_u64_le(),
                    offset: b.get_u64_le(),
                };
                watermark = watermark.max(Some(key));
            }
        })?;
        let mut state = DelayState {
            window: BTreeSet::new(),
            held: HashMap::new(),
            held_bytes: 0,
            horizon: None,
            chunk_min: BTreeMap::new(),
            chunks_by_key: BTreeSet::new(),
            window_chunks: BTreeMap::new(),
            taken: watermark,
            watermark,
            pending: 0,
            reserved_end: log.end().0,
            refilling: false,
            random: log.reader(log.start()).map_err(storage)?,
            watermarks_since_compaction: 0,
        };
        read_all(&log, |rec| {
            let key = DueKey {
                due: rec.timestamp.0,
                offset: rec.offset.0,
            };
            if Some(key) > watermark {
                state.pending += 1;
                state.add_on_disk(key, limits.chunk);
            }
        })?;
        if state.pending > 0 {
            // Everything pending is on disk: the horizon is the smallest key
            // above the watermark.
            state.horizon = Some(watermark.map_or(DueKey { due: 0, offset: 0 }, |w| DueKey {
                due: w.due,
                offset: w.offset + 1,
            }));
        }
        let delays = DelayStore {
            scan: Mutex::new(log.reader(log.start()).map_err(storage)?),
            log,
            fired,
            limits,
            state: Mutex::new(state),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            unmarked: AtomicUsize::new(0),
        };
        delays.refill()?;
        Ok(Arc::new(delays))
    }

    fn lock(&self) -> MutexGuard<'_, DelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages waiting for their due time.
    pub(crate) fn pending(&self) -> u64 {
        self.lock().pending
    }

    /// Keys held in memory (the window), for tests of the memory bound.
    #[cfg(test)]
    fn window_len(&self) -> usize {
        self.lock().window.len()
    }

    /// Stores a message to be routed at `due` (milliseconds since the
    /// epoch). The ticket resolves when it is durable.
    pub(crate) fn insert(
        &self,
        vhost: &str,
        message: &Message,
        due: u64,
    ) -> Result<Appended, BrokerError> {
        let mut st = self.lock();
        // Above everything already taken for firing, so that the watermark
        // never passes a key that has not fired.
        let due = due.max(st.taken.map_or(0, |k| k.due));
        let record = encode_record(vhost, message, due);
        let appended = self
            .log
            .append(std::slice::from_ref(&record))
            .map_err(storage)?;
        let key = DueKey {
            due,
            offset: appended.offsets().start.0,
        };
        st.reserved_end = st.reserved_end.max(appended.offsets().end.0);
        st.pending += 1;
        if st.horizon.is_none_or(|h| key < h) {
            let first = st.window.first().is_none_or(|f| key < *f);
            st.window.insert(key);
            st.hold(
                key,
                Held::copy(&record.headers, &record.body),
                self.limits.held_bytes,
            );
            *st.window_chunks
                .entry(key.offset / self.limits.chunk)
                .or_insert(0) += 1;
            self.shrink(&mut st);
            if first {
                self.wake.notify_one();
            }
        } else {
            st.add_on_disk(key, self.limits.chunk);
        }
        Ok(appended)
    }

    /// Hands the window's largest keys back to disk while it is over its size.
    fn shrink(&self, st: &mut DelayState) {
        while st.window.len() > self.limits.window {
            let Some(key) = st.window.pop_last() else {
                break;
            };
            st.unhold(key);
            st.remove_window_chunk(key, self.limits.chunk);
            st.add_on_disk(key, self.limits.chunk);
            st.horizon = Some(key);
        }
    }

    /// Loads the next window's worth of keys from disk; see the module
    /// documentation. Runs without the state lock held (taking it briefly
    /// per chunk), so firing and inserts go on meanwhile; only one refill
    /// runs at a time. Inserts and evictions that happen meanwhile land in
    /// the chunk summaries, and the new horizon is kept below them, so the
    /// window still holds exactly the pending keys below the horizon.
    fn refill(&self) -> Result<(), BrokerError> {
        let (horizon, capacity, end) = {
            let st = self.lock();
            let Some(horizon) = st.horizon else {
                return Ok(());
            };
            let capacity = self.limits.window.saturating_sub(st.window.len()).max(1);
            (horizon, capacity, st.reserved_end)
        };
        // The `capacity` smallest keys seen, and the smallest key dropped.
        let mut best: BinaryHeap<Candidate> = BinaryHeap::with_capacity(capacity + 1);
        // Messages are kept with their keys within the window's byte budget.
        let budget = self
            .limits
            .held_bytes
            .saturating_sub(self.lock().held_bytes);
        let mut best_bytes = 0usize;
        let mut cut: Option<DueKey> = None;
        // Per scanned chunk: its summary before, and the smallest of its
        // keys that did not stay among the best.
        let mut scanned: BTreeMap<u64, (DueKey, Option<DueKey>)> = BTreeMap::new();
        let chunk_size = self.limits.chunk;
        loop {
            let next = {
                let mut st = self.lock();
                match st.chunks_by_key.first().copied() {
                    Some((min, _))
                        if best.len() >= capacity && best.peek().is_some_and(|m| min > m.0) =>
                    {
                        None
                    }
                    Some((min, chunk)) => {
                        st.chunks_by_key.pop_first();
                        st.chunk_min.remove(&chunk);
                        Some((min, chunk))
                    }
                    None => None,
                }
            };
            let Some((min, chunk)) = next else {
                break;
            };
            scanned.insert(chunk, (min, None));
            let keys = match self.scan_chunk(chunk, horizon, end) {
                Ok(keys) => keys,
                Err(e) => {
                    // Put every summary back as it was; nothing was loaded.
                    let mut st = self.lock();
                    for (_, (min, _)) in scanned {
                        st.add_on_disk(min, chunk_size);
                    }
                    return Err(e);
                }
            };
            for (k, rec) in keys {
                let dropped = if best.len() >= capacity && best.peek().is_some_and(|m| k > m.0) {
                    // Not among the best: no need to copy it.
                    Some(k)
                } else {
                    let size = rec.headers.len() + rec.body.len() + HELD_OVERHEAD;
                    let held =
                        (best_bytes + size <= budget).then(|| Held::copy(&rec.headers, &rec.body));
                    best_bytes += held.as_ref().map_or(0, Held::size);
                    best.push(Candidate(k, held));
                    if best.len() > capacity {
                        best.pop().map(|Candidate(dropped, held)| {
                            best_bytes -= held.as_ref().map_or(0, Held::size);
                            dropped
                        })
                    } else {
                        None
                    }
                };
                if let Some(dropped) = dropped {
                    cut = cut.min(Some(dropped)).or(Some(dropped));
                    if let Some((_, rest)) = scanned.get_mut(&(dropped.offset / chunk_size)) {
                        *rest = (*rest).min(Some(dropped)).or(Some(dropped));
                    }
                }
            }
        }
        let mut st = self.lock();
        let next_on_disk = st.chunks_by_key.first().map(|(k, _)| *k);
        let new_horizon = match (cut, next_on_disk) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for Candidate(key, held) in best {
            if new_horizon.is_none_or(|h| key < h) {
                st.window.insert(key);
                *st.window_chunks.entry(key.offset / chunk_size).or_insert(0) += 1;
                if let Some(held) = held {
                    st.hold(key, held, self.limits.held_bytes);
                }
            } else {
                st.add_on_disk(key, chunk_size);
            }
        }
        for (_, (_, rest)) in scanned {
            if let Some(k) = rest {
                st.add_on_disk(k, chunk_size);
            }
        }
        st.horizon = new_horizon;
        self.shrink(&mut st);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// The keys at or above `horizon` among the records of one chunk below
    /// `end`, waiting for records appended but not yet committed.
    fn scan_chunk(
        &self,
        chunk: u64,
        horizon: DueKey,
        end: u64,
    ) -> Result<Vec<(DueKey, tern_storage::Record)>, BrokerError> {
        let first = (chunk * self.limits.chunk).max(self.log.start().0);
        let end = end.min((chunk + 1) * self.limits.chunk);
        let mut keys = Vec::new();
        if first >= end {
            return Ok(keys);
        }
        let mut scan = self.scan.lock().unwrap_or_else(|p| p.into_inner());
        scan.seek(Offset(first)).map_err(storage)?;
        while scan.position().0 < end {
            let want = (end - scan.position().0) as usize;
            let batch = scan.read(want.min(4096), 4 << 20).map_err(storage)?;
            if batch.is_empty() {
                // Appended, not yet committed: it will be, or the log closes.
                if !scan.wait(Duration::from_secs(1)) && self.closed.load(Ordering::Acquire) {
                    return Err(BrokerError::Storage(format!(
                        "the delay log closed while reading offsets up to {end}"
                    )));
                }
                continue;
            }
            for rec in batch {
                let key = DueKey {
                    due: rec.timestamp.0,
                    offset: rec.offset.0,
                };
                if rec.offset.0 < end && key >= horizon {
                    keys.push((key, rec));
                }
            }
        }
        Ok(keys)
    }

    /// Takes up to `max` keys that are due by `now` and committed, in key
    /// order. Also says when the next one is due, if one is waiting in the
    /// window and committed, and whether the caller should start a refill
    /// (the window is below half full and keys wait on disk).
    fn take_due(&self, now: u64, max: usize) -> Taken {
        let mut st = self.lock();
        let end = self.log.end().0;
        let mut keys = Vec::new();
        while keys.len() < max {
            let Some(&first) = st.window.first() else {
                break;
            };
            if first.due > now || first.offset >= end {
                break;
            }
            st.window.pop_first();
            st.remove_window_chunk(first, self.limits.chunk);
            st.taken = st.taken.max(Some(first));
            let held = st.unhold(first);
            // No longer waiting: it is being fired.
            st.pending = st.pending.saturating_sub(1);
            keys.push((first, held));
        }
        let next = st.window.first().filter(|k| k.offset < end).map(|k| k.due);
        let refill =
            st.horizon.is_some() && !st.refilling && st.window.len() < self.limits.window / 2;
        if refill {
            st.refilling = true;
        }
        Taken { keys, next, refill }
    }

    /// Runs a refill that [`take_due`](Self::take_due) asked for.
    fn run_refill(&self) -> Result<(), BrokerError> {
        let result = self.refill();
        self.lock().refilling = false;
        self.wake.notify_one();
        result
    }

    /// Puts keys whose routing failed back, to be fired again.
    fn put_back(&self, keys: &[DueKey]) {
        let mut st = self.lock();
        st.pending += keys.len() as u64;
        for &key in keys {
            st.window.insert(key);
            *st.window_chunks
                .entry(key.offset / self.limits.chunk)
                .or_insert(0) += 1;
        }
        self.shrink(&mut st);
    }

    /// A taken message: held in memory, or read back from the log.
    fn message(&self, key: DueKey, held: Option<Held>) -> Option<(String, Message)> {
        match held {
            Some(h) => h.decode(),
            None => self.read(key),
        }
    }

    /// Reads a taken message back from the log.
    fn read(&self, key: DueKey) -> Option<(String, Message)> {
        let mut st = self.lock();
        if st.random.position().0 != key.offset && st.random.seek(Offset(key.offset)).is_err() {
            return None;
        }
        let rec = st.random.read(1, 1).ok()?.pop()?;
        if rec.offset.0 != key.offset {
            return None;
        }
        decode_record(&rec.headers, rec.body)
    }

    /// Records that everything up to `key` fired and is durable where it
    /// went; drops what no pending message needs any more.
    fn mark_fired(&self, key: DueKey) {
        let mut st = self.lock();
        st.watermark = st.watermark.max(Some(key));
        // A lost watermark only fires messages again, so a failed write is
        // not fatal.
        if let Ok(appended) = self.fired.append(&[StoredRecord {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: encode_watermark(key),
        }]) {
            st.watermarks_since_compaction += 1;
            if st.watermarks_since_compaction >= WATERMARKS_PER_COMPACTION
                && self.fired.sync().is_ok()
            {
                let _ = self.fired.delete_before(appended.offsets().start);
                st.watermarks_since_compaction = 0;
            }
        }
        let floor = [
            st.window_chunks.keys().next().copied(),
            st.chunk_min.keys().next().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map_or(self.log.end().0, |chunk| chunk * self.limits.chunk);
        // A refill holds chunks that are in no summary while it reads them,
        // and batches routed after this one hold taken keys, which go back
        // to the window if their appends fail: their records must stay.
        if !st.refilling && self.unmarked.load(Ordering::Acquire) <= 1 {
            let _ = self.log.delete_before(Offset(floor));
        }
    }

    /// Stops the firing task, lets batches already routed be marked fired
    /// (waiting up to a second, so a clean shutdown does not fire them again
    /// on the next start), and fsyncs the watermark.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.unmarked.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.fired.sync();
        self.wake.notify_one();
    }

    /// Routes one batch of due messages. Returns the batch (to be marked
    /// fired once its tickets are durable) and when the next one is due.
    fn fire_due(self: &Arc<Self>, router: &DueRouter) -> (Option<Fired>, Option<u64>) {
        let Taken { keys, next, refill } = self.take_due(Timestamp::now().0, FIRE_BATCH);
        if refill {
            // Reading chunks is blocking I/O: off the async workers.
            let delays = Arc::clone(self);
            tokio::task::spawn_blocking(move || {
                let _ = delays.run_refill();
            });
        }
        let Some(&(last, _)) = keys.last() else {
            return (None, next);
        };
        let mut tickets = Vec::new();
        let mut fired = Vec::with_capacity(keys.len());
        for (key, held) in keys {
            // A record that no longer decodes cannot be routed; it is skipped.
            if let Some((vhost, message)) = self.message(key, held) {
                tickets.extend((router.0)(&vhost, message));
            }
            fired.push(key);
        }
        (
            Some(Fired {
                keys: fired,
                last,
                tickets,
            }),
            next,
        )
    }
}

/// A routed batch waiting to be durable before the watermark passes it.
#[derive(Debug)]
struct Fired {
    keys: Vec<DueKey>,
    last: DueKey,
    tickets: Vec<Appended>,
}

/// Batches routed and not yet durable, at most.
const BATCHES_IN_FLIGHT: usize = 8;

/// Marks routed batches fired, in order, once durable. If one fails, it and
/// every batch after it go back to the window, to be routed again (at least
/// once), and the watermark stays below them.
async fn mark_in_order(delays: Arc<DelayStore>, mut batches: tokio::sync::mpsc::Receiver<Fired>) {
    let mut failed = false;
    while let Some(batch) = batches.recv().await {
        if !failed {
            for ticket in batch.tickets {
                if ticket.durable().await.is_err() {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            delays.put_back(&batch.keys);
            if batches.is_empty() {
                // Everything routed so far is back: firing may start again.
                failed = false;
                delays.wake.notify_one();
            }
        } else {
            delays.mark_fired(batch.last);
        }
        delays.unmarked.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DelayState {
    /// Keeps a window message in memory if the byte budget allows.
    fn hold(&mut self, key: DueKey, held: Held, budget: usize) {
        if self.held_bytes + held.size() <= budget {
            self.held_bytes += held.size();
            self.held.insert(key.offset, held);
        }
    }

    fn unhold(&mut self, key: DueKey) -> Option<Held> {
        let held = self.held.remove(&key.offset)?;
        self.held_bytes -= held.size();
        Some(held)
    }

    fn add_on_disk(&mut self, key: DueKey, chunk_size: u64) {
        let chunk = key.offset / chunk_size;
        match self.chunk_min.get(&chunk) {
            Some(&min) if min <= key => {}
            old => {
                if let Some(&min) = old {
                    self.chunks_by_key.remove(&(min, chunk));
                }
                self.chunk_min.insert(chunk, key);
                self.chunks_by_key.insert((key, chunk));
            }
        }
    }

    fn remove_window_chunk(&mut self, key: DueKey, chunk_size: u64) {
        let chunk = key.offset / chunk_size;
        if let Some(n) = self.window_chunks.get_mut(&chunk) {
            *n -= 1;
            if *n == 0 {
                self.window_chunks.remove(&chunk);
            }
        }
    }
}

/// Sleeps until `at` (milliseconds since the epoch), or forever if `None`.
async fn sleep_until_ms(at: Option<u64>) {
    match at {
        Some(at) => {
            let wait = at.saturating_sub(Timestamp::now().0);
            tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
        }
        None => std::future::pending().await,
    }
}

/// Fires due messages until the broker closes.
pub(crate) async fn run(delays: Arc<DelayStore>, router: DueRouter) {
    let Ok(mut tail) = delays.log.reader(delays.log.end()) else {
        return;
    };
    // Routing the next batch overlaps the fsync of the previous ones.
    let (to_mark, batches) = tokio::sync::mpsc::channel(BATCHES_IN_FLIGHT);
    tokio::spawn(mark_in_order(Arc::clone(&delays), batches));
    loop {
        if delays.closed.load(Ordering::Acquire) {
            return;
        }
        // Read the end first: a commit landing meanwhile then wakes the wait.
        let end = delays.log.end();
        let next = match delays.fire_due(&router) {
            (Some(batch), _) => {
                delays.unmarked.fetch_add(1, Ordering::AcqRel);
                if to_mark.send(batch).await.is_err() {
                    return;
                }
                continue;
            }
            (None, next) => next,
        };
        if tail.seek(end).is_err() {
            return;
        }
        tokio::select! {
            more = tail.wait_async() => {
                if !more {
                    return;
                }
            }
            _ = delays.wake.notified() => {}
            _ = sleep_until_ms(next) => {}
        }
    }
}

impl Broker {
    /// Publishes a message to be routed `delay` from now, through the
    /// exchange it names, as if published then; for retries with backoff
    /// and scheduled work. To requeue into one queue later, publish to the
    /// default exchange with the queue's name as routing key.
    ///
    /// The message is kept in the broker's durable timer index: once
    /// [`Published::confirmed`] resolves it survives a restart, and a
    /// restart fires overdue messages at once. Messages fire in due order
    /// (ties in publish order), at least once: a crash just after a message
    /// was routed may route it again. The vhost and exchange must exist
    /// now; if the exchange is gone at the due time, the message is dropped.
    pub fn publish_delayed(
        &self,
        vhost: &str,
        message: Message,
        delay: Duration,
    ) -> Result<Published, BrokerError> {
        let vhost = self.check_exchange(vhost, &message)?;
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let due = Timestamp::now().0.saturating_add(ms.min(MAX_DELAY_MS));
        let ticket = self.delays().insert(vhost.as_str(), &message, due)?;
        Ok(Published::accepted(ticket))
    }

    /// Delayed messages waiting for their due time, in every vhost.
    pub fn delayed_count(&self) -> u64 {
        self.delays().pending()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test helper that fails should panic

    use super::*;
    use crate::name::ExchangeName;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use tern_storage::StoreConfig;

    fn message(id: u32) -> Message {
        Message {
            exchange: ExchangeName::new("x").unwrap(),
            routing_key: id.to_string(),
            properties: Default::default(),
            body: Bytes::from(id.to_string()),
        }
    }

    fn small() -> DelayLimits {
        DelayLimits {
            window: 8,
            chunk: 4,
            held_bytes: 600,
        }
    }

    /// Takes due keys as the firing task does, running the refills it asks
    /// for at once.
    fn take(delays: &DelayStore, now: u64, max: usize) -> Vec<(DueKey, Option<Held>)> {
        loop {
            let taken = delays.take_due(now, max);
            if taken.refill {
                delays.run_refill().unwrap();
            }
            if !taken.keys.is_empty() || !taken.refill {
                return taken.keys;
            }
        }
    }

    /// Takes everything due by `now` and marks it fired, returning the ids in
    /// firing order.
    fn fire(delays: &DelayStore, now: u64) -> Vec<u32> {
        let mut ids = Vec::new();
        loop {
            let keys = take(delays, now, 5);
            let Some(&(last, _)) = keys.last() else {
                return ids;
            };
            for (key, held) in keys {
                let (vhost, m) = delays.message(key, held).unwrap();
                assert_eq!(vhost, "/");
                assert!(key.due <= now);
                ids.push(m.routing_key.parse().unwrap());
            }
            delays.mark_fired(last);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Publish with this due time, relative to now.
        Publish(u64),
        /// Advance the clock.
        Advance(u64),
        /// Close and reopen the store.
        Restart,
        /// While a batch is being fired (taken, not yet marked), publish a
        /// message due this long ago (a clock step back), then restart.
        PublishWhileFiring(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..200).prop_map(Op::Publish),
            3 => (0u64..80).prop_map(Op::Advance),
            1 => Just(Op::Restart),
            1 => (0u64..50).prop_map(Op::PublishWhileFiring),
        ]
    }

    fn open(dir: &std::path::Path) -> (Store, Arc<DelayStore>) {
        let store = Store::open(dir, StoreConfig::default()).unwrap();
        let delays = DelayStore::open(&store, small()).unwrap();
        (store, delays)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Against a model (a sorted list of due times): every message fires
        /// once, never early, in (due, publish) order, across restarts, and
        /// the window never holds more than its limit.
        #[test]
        fn fires_every_message_once_in_due_order_across_restarts(
            ops in proptest::collection::vec(op(), 1..120)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut store, mut delays) = open(dir.path());
            let mut now = 1_000u64;
            let mut next_id = 0u32;
            // id -> (due, publish sequence)
            let mut model: HashMap<u32, u64> = HashMap::new();
            let mut fired: Vec<u32> = Vec::new();
            let mut fired_upto = 0u64; // the largest due fired so far
            for op in ops {
                match op {
                    Op::Publish(d) => {
                        let due = now + d;
                        let appended = delays.insert("/", &message(next_id), due).unwrap();
                        appended.wait().unwrap();
                        // A due time already passed by firing is moved up to it.
                        model.insert(next_id, due.max(fired_upto));
                        next_id += 1;
                    }
                    Op::Advance(d) => now += d,
                    Op::Restart => {
                        drop(delays);
                        store.close().unwrap();
                        (store, delays) = open(dir.path());
                    }
                    Op::PublishWhileFiring(back) => {
                        let keys = take(&delays, now, usize::MAX);
                        let last = keys.last().map(|(k, _)| *k);
                        for (key, held) in keys {
                            let (_, m) = delays.message(key, held).unwrap();
                            let id: u32 = m.routing_key.parse().unwrap();
                            fired_upto = fired_upto.max(model[&id]);
                            fired.push(id);
                        }
                        let due = now.saturating_sub(back);
                        delays.insert("/", &message(next_id), due).unwrap().wait().unwrap();
                        model.insert(next_id, due.max(fired_upto));
                        next_id += 1;
                        if let Some(last) = last {
                            delays.mark_fired(last);
                        }
                        drop(delays);
                        store.close().unwrap();
                        (store, delays) = open(dir.path());
                    }
                }
                let got = fire(&delays, now);
                for id in &got {
                    fired_upto = fired_upto.max(model[id]);
                }
                fired.extend(got);
                prop_assert!(delays.window_len() <= small().window);
                prop_assert!(delays.lock().held_bytes <= small().held_bytes);
                let due_now = model.values().filter(|d| **d <= now).count();
                prop_assert_eq!(fired.len(), due_now, "everything due has fired, nothing more");
                prop_assert_eq!(delays.pending(), model.len() as u64 - fired.len() as u64);
            }
            // Firing order is (due, publish order), and each id fires once.
            let mut expected: Vec<u32> = fired.clone();
            expected.sort_by_key(|id| (model[id], *id));
            prop_assert_eq!(&fired, &expected);
            let mut unique = fired.clone();
            unique.dedup();
            prop_assert_eq!(unique.len(), fired.len());
            drop(delays);
            store.close().unwrap();
        }
    }

    #[test]
    fn a_hundred_thousand_pending_delays_survive_a_reopen_with_a_bounded_window() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DelayLimits {
            window: 1024,
            chunk: 4096,
            held_bytes: 64 << 10,
        };
        let n = 100_000u32;
        {
            let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
            let delays = DelayStore::open(&store, limits).unwrap();
            let mut last = None;
            for id in 0..n {
                // Due times out of arrival order: a scatter over 1000 ms.
                let due = 10_000 + u64::from(id.wrapping_mul(7919) % 1000);
                last = Some(delays.insert("/", &message(id), due).unwrap());
            }
            last.unwrap().wait().unwrap();
            assert!(delays.window_len() <= limits.window);
            drop(delays);
            store.close().unwrap();
        }
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let delays = DelayStore::open(&store, limits).unwrap();
        assert_eq!(delays.pending(), u64::from(n));
        assert!(delays.window_len() <= limits.window);
        let mut previous = None;
        let mut count = 0u32;
        loop {
            let keys: Vec<DueKey> = take(&delays, 20_000, 4096)
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            let Some(&last) = keys.last() else { break };
            for key in &keys {
                assert!(Some(*key) > previous, "keys fire in order");
                previous = Some(*key);
            }
            count += keys.len() as u32;
            delays.mark_fired(last);
            assert!(delays.window_len() <= limits.window);
        }
        assert_eq!(count, n);
        assert_eq!(delays.pending(), 0);
        drop(delays);
        store.close().unwrap();
    }
}
