//! FIFO message groups (`x-message-group-header`): which ready messages of a
//! grouped queue may be delivered next. A message's group is the value of
//! the named header; a group has at most one message taken out of ready
//! (delivered and unacked, or fetched) at a time, and its messages leave in
//! offset (publish) order, a returned one first again. Messages without the
//! header belong to no group and are never held back.
//!
//! Only groups with ready or taken messages are kept, each as the offsets
//! of its ready messages; the queue hands messages over as its scan reaches
//! them ([`Groups::absorb`]) and asks for the next runnable one
//! ([`Groups::take`]), which is the lowest head offset among unlocked
//! groups: an ordered map of those heads makes each step logarithmic in the
//! number of runnable groups, whatever the backlog.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use crate::codec::StoredMeta;
use crate::value::FieldValue;

/// A group's identity: the header's value, as bytes (integers by their
/// decimal form, so `7` and `"7"` are one group).
pub(crate) type GroupKey = Arc<[u8]>;

/// The group a stored message belongs to under `header`, if any. Strings,
/// byte arrays and integers name a group; any other value, like a missing
/// header, names none.
pub(crate) fn group_of(meta: &StoredMeta, header: &str) -> Option<GroupKey> {
    let value = meta.properties.headers.as_ref()?.get(header)?;
    match value {
        FieldValue::String(s) => Some(Arc::from(s.as_bytes())),
        FieldValue::Bytes(b) => Some(Arc::from(b.as_ref())),
        other => other
            .as_i64()
            .map(|n| Arc::from(n.to_string().into_bytes().as_slice())),
    }
}

#[derive(Debug, Default)]
struct Group {
    /// Ready messages, in offset order.
    ready: VecDeque<u64>,
    /// The message taken out of ready and not yet settled or returned.
    taken: Option<u64>,
}

/// The ready messages of a grouped queue that its scan has reached, and the
/// lock each group holds while one of its messages is out.
#[derive(Debug)]
pub(crate) struct Groups {
    /// The header whose value names a message's group.
    header: String,
    groups: HashMap<GroupKey, Group>,
    /// The head of every group that may deliver now, and every ready
    /// message without a group, by offset.
    runnable: BTreeMap<u64, Option<GroupKey>>,
    /// Taken messages of a group, to find the group again on settle or return.
    taken: HashMap<u64, GroupKey>,
}

impl Groups {
    /// No groups yet, for messages grouped by `header`.
    pub(crate) fn new(header: String) -> Groups {
        Groups {
            header,
            groups: HashMap::new(),
            runnable: BTreeMap::new(),
            taken: HashMap::new(),
        }
    }

    /// The group of a stored message, if it has one.
    pub(crate) fn group_of(&self, meta: &StoredMeta) -> Option<GroupKey> {
        group_of(meta, &self.header)
    }

    /// Takes in a ready message the scan reached (offsets arrive in order).
    pub(crate) fn absorb(&mut self, offset: u64, key: Option<GroupKey>) {
        let Some(key) = key else {
            self.runnable.insert(offset, None);
            return;
        };
        let group = self.groups.entry(Arc::clone(&key)).or_default();
        group.ready.push_back(offset);
        if group.taken.is_none() && group.ready.len() == 1 {
            self.runnable.insert(offset, Some(key));
        }
    }

    /// The offset [`take`](Self::take) would return.
    pub(crate) fn first(&self) -> Option<u64> {
        self.runnable.first_key_value().map(|(o, _)| *o)
    }

    /// Whether some message may be taken now.
    pub(crate) fn has_runnable(&self) -> bool {
        !self.runnable.is_empty()
    }

    /// Takes the runnable message with the lowest offset, locking its group.
    pub(crate) fn take(&mut self) -> Option<u64> {
        let (offset, key) = self.runnable.pop_first()?;
        if let Some(key) = key {
            if let Some(group) = self.groups.get_mut(&key) {
                group.ready.pop_front();
                group.taken = Some(offset);
            }
            self.taken.insert(offset, key);
        }
        Some(offset)
    }

    /// A taken message came back: it is its group's next message again.
    pub(crate) fn put_back(&mut self, offset: u64) {
        let Some(key) = self.taken.remove(&offset) else {
            self.runnable.insert(offset, None);
            return;
        };
        let group = self.groups.entry(Arc::clone(&key)).or_default();
        group.taken = None;
        // The taken message was its group's oldest: it goes first again.
        group.ready.push_front(offset);
        if let Some(head) = group.ready.get(1) {
            self.runnable.remove(head);
        }
        self.runnable.insert(offset, Some(key));
    }

    /// A message was settled (acked, rejected, dead-lettered, expired,
    /// dropped): if it was taken, its group is unlocked.
    pub(crate) fn settle(&mut self, offset: u64) {
        let Some(key) = self.taken.remove(&offset) else {
            return;
        };
        let Some(group) = self.groups.get_mut(&key) else {
            return;
        };
        group.taken = None;
        match group.ready.front() {
            Some(&head) => {
                self.runnable.insert(head, Some(key));
            }
            None => {
                self.groups.remove(&key);
            }
        }
    }

    /// Forgets every ready message (a purge); taken ones keep their locks.
    pub(crate) fn purge(&mut self) {
        self.runnable.clear();
        self.groups.retain(|_, g| {
            g.ready.clear();
            g.taken.is_some()
        });
    }

    /// The offsets of up to `n` ready messages, in the order they would be
    /// taken if every message taken now were settled first: by offset. A
    /// merge of the groups' ordered offsets, so a peek costs the number of
    /// groups, not the backlog.
    pub(crate) fn ready_offsets(&self, n: usize) -> Vec<u64> {
        let mut heads: BinaryHeap<Reverse<(u64, usize, usize)>> = BinaryHeap::new();
        let lists: Vec<&VecDeque<u64>> = self.groups.values().map(|g| &g.ready).collect();
        for (i, list) in lists.iter().enumerate() {
            if let Some(&o) = list.front() {
                heads.push(Reverse((o, i, 0)));
            }
        }
        let mut ungrouped = self
            .runnable
            .iter()
            .filter(|(_, k)| k.is_none())
            .map(|(o, _)| *o)
            .peekable();
        let mut out = Vec::with_capacity(n.min(1024));
        while out.len() < n {
            let grouped = heads.peek().map(|Reverse((o, _, _))| *o);
            match (grouped, ungrouped.peek().copied()) {
                (Some(g), Some(u)) if u < g => {
                    out.push(u);
                    ungrouped.next();
                }
                (Some(g), _) => {
                    out.push(g);
                    if let Some(Reverse((_, i, k))) = heads.pop() {
                        if let Some(&o) = lists.get(i).and_then(|l| l.get(k + 1)) {
                            heads.push(Reverse((o, i, k + 1)));
                        }
                    }
                }
                (None, Some(u)) => {
                    out.push(u);
                    ungrouped.next();
                }
                (None, None) => break,
            }
        }
        out
    }

    /// Groups kept in memory (with ready or taken messages).
    #[cfg(test)]
    pub(crate) fn group_count(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Option<GroupKey> {
        Some(Arc::from(s.as_bytes()))
    }

    #[test]
    fn one_taken_per_group_in_offset_order_and_returns_go_first() {
        let mut g = Groups::new("g".into());
        g.absorb(0, key("a"));
        g.absorb(1, key("a"));
        g.absorb(2, key("b"));
        g.absorb(3, None);
        g.absorb(4, key("a"));
        assert_eq!(g.take(), Some(0));
        assert_eq!(g.take(), Some(2));
        assert_eq!(g.take(), Some(3));
        assert_eq!(g.take(), None);
        g.put_back(0);
        assert_eq!(g.take(), Some(0));
        g.settle(0);
        g.settle(2);
        assert_eq!(g.group_count(), 1);
        assert_eq!(g.take(), Some(1));
        assert_eq!(g.take(), None);
        g.settle(1);
        assert_eq!(g.take(), Some(4));
        g.settle(4);
        assert_eq!(g.group_count(), 0);
        assert!(!g.has_runnable());
    }

    #[test]
    fn a_purge_keeps_the_locks_of_taken_messages() {
        let mut g = Groups::new("g".into());
        g.absorb(0, key("a"));
        g.absorb(1, key("a"));
        assert_eq!(g.take(), Some(0));
        g.purge();
        g.absorb(2, key("a"));
        assert_eq!(g.take(), None);
        g.settle(0);
        assert_eq!(g.take(), Some(2));
    }

    #[test]
    fn ready_offsets_merge_the_groups_and_the_ungrouped_by_offset() {
        let mut g = Groups::new("g".into());
        for (o, k) in [(0, "a"), (1, "b"), (3, "a"), (5, "c"), (6, "b")] {
            g.absorb(o, key(k));
        }
        g.absorb(2, None);
        g.absorb(4, None);
        assert_eq!(g.take(), Some(0));
        assert_eq!(g.ready_offsets(10), [1, 2, 3, 4, 5, 6]);
        assert_eq!(g.ready_offsets(3), [1, 2, 3]);
        assert!(g.ready_offsets(0).is_empty());
    }
}
