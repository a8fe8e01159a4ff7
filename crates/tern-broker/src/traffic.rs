//! Bytes in and out of one client connection: counted by its front door as
//! it reads and writes the socket, read by operators through the registry
//! ([`crate::Broker::connections`]).
//!
//! The counters sit on the message path, so they cost one relaxed atomic
//! add per socket read or batched write, never one per frame or byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A connection's byte counters; clones share them.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTraffic(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
}

impl ConnectionTraffic {
    /// Counts `n` bytes read from the client.
    pub fn add_received(&self, n: usize) {
        self.0.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` bytes written to the client.
    pub fn add_sent(&self, n: usize) {
        self.0.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    /// Bytes written to the client so far.
    pub fn sent(&self) -> u64 {
        self.0.sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_count_into_the_same_totals() {
        let a = ConnectionTraffic::default();
        let b = a.clone();
        a.add_received(8);
        b.add_received(100);
        b.add_sent(7);
        assert_eq!((a.received(), a.sent()), (108, 7));
    }
}
