//! Reading a queue's ready messages without delivering them: what an
//! operator's peek sees. Kept beside the queue (it reads the queue's
//! private state) but apart from the delivery path: a peek takes no
//! message out, counts no delivery and records nothing in the ack log.

use tern_storage::Offset;

use super::{codec, Queue, QueueState};
use crate::error::BrokerError;
use crate::message::Message;

/// A ready message as a peek sees it.
#[derive(Debug, Clone)]
pub(crate) struct Peeked {
    /// Where it is in the queue's log.
    pub(crate) offset: Offset,
    /// How many times it was delivered before (and returned).
    pub(crate) delivery_count: u32,
    /// The message, as a consumer would receive it next.
    pub(crate) message: Message,
}

impl QueueState {
    /// The offsets of up to `n` ready messages, in delivery order: the
    /// requeued ones, then those from the scan position on.
    fn ready_offsets(&mut self, end: u64, n: usize) -> Result<Vec<u64>, BrokerError> {
        if self.max_priority.is_some() {
            // Priority order is known only once everything is absorbed.
            self.absorb(end)?;
        }
        let mut offsets: Vec<u64> = match &self.groups {
            // Groups deliver the messages they took in before any newer
            // one, each group in offset order: shown by offset.
            Some(groups) => groups.ready_offsets(n),
            None => self.requeued.iter().map(|(_, o)| *o).take(n).collect(),
        };
        let mut o = self.scan.max(self.floor);
        while offsets.len() < n && o < end {
            if !self.settled.contains(&o) && !self.unacked.contains_key(&o) {
                offsets.push(o);
            }
            o += 1;
        }
        Ok(offsets)
    }
}

impl Queue {
    /// Up to `n` of the messages a consumer would receive next, left where
    /// they are. Records that no longer decode are skipped.
    pub(crate) fn peek(&self, n: usize) -> Result<Vec<Peeked>, BrokerError> {
        let mut st = self.lock();
        let end = self.log.end().0;
        let offsets = if self.is_stream() {
            // A stream consumes nothing away: a peek shows its oldest
            // retained messages, what a consumer at `first` would see.
            let start = self.log.start().0;
            (start..end.min(start.saturating_add(n as u64))).collect()
        } else {
            st.ready_offsets(end, n)?
        };
        let mut out = Vec::with_capacity(offsets.len());
        for o in offsets {
            let Some(rec) = st.read_at(o) else {
                continue;
            };
            let rec = rec?;
            let Ok(meta) = codec::decode_meta(&rec.headers) else {
                continue;
            };
            let count = st.delivered.get(&o).copied().unwrap_or(0);
            let delivery_count = count + meta.delivery_count;
            out.push(Peeked {
                offset: rec.offset,
                delivery_count,
                message: self.outgoing(meta, rec.body, count),
            });
        }
        Ok(out)
    }
}
