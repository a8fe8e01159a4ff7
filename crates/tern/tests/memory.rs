//! The conformance suite on the in-memory transport that the test harness
//! uses, so that what users' unit tests see matches the real transports.
#![allow(clippy::unwrap_used)]

mod conformance;

use tern::transport::memory::Memory;
use tern::{Bus, Envelope};

struct MemoryFixture {
    memory: Memory,
}

impl conformance::Fixture for MemoryFixture {
    async fn bus(&self) -> Bus {
        Bus::new(self.memory.clone())
    }

    async fn dead_letters(&self, service: &str) -> Vec<Envelope> {
        self.memory
            .take_dead_letters(service)
            .into_iter()
            .map(|d| d.envelope)
            .collect()
    }

    async fn cleanup(&self, _service: &str) {}

    fn replays(&self) -> conformance::Replays {
        conformance::Replays::No
    }
}

conformance_tests!(Some(MemoryFixture {
    memory: Memory::new()
}));
