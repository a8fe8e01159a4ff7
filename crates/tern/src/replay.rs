//! Replay: read a recorded event stream from an offset or a time.
//!
//! [`Bus::record`] starts keeping every event of one type in a stream (a
//! stream queue `tern.stream.TYPE` on embedded and AMQP, a JetStream stream
//! sourced from the events stream on NATS); [`Bus::replay`] reads it from
//! [`ReplayFrom::First`], an offset, a time, or only what comes next.
//! Reading never removes anything: any number of replays read the same
//! stream independently, beside the services that handle the events live.
//!
//! Guarantees:
//! - **Ordered.** Events come in the order the stream recorded them, with
//!   increasing offsets.
//! - **At least once, for named replays.** [`Replay::named`] gives the
//!   replay a position the broker keeps: reading the next event commits the
//!   previous one, and a replay reopened under the same name (after the
//!   process or the broker restarted) resumes after the last committed
//!   event, so the event being handled when it stopped comes again.
//!   An unnamed replay keeps no position.
//!
//! Where it works: embedded; AMQP against Tern; AMQP against RabbitMQ
//! without names (RabbitMQ keeps stream offsets over its stream protocol
//! only, so a named replay is refused); NATS JetStream. The memory
//! transport has no streams and says so.

use std::marker::PhantomData;

use crate::bus::Bus;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::message::{Codec, Event};
use crate::transport::ReplaySource;

pub use crate::transport::{ReplayFrom, ReplaySpec};

/// How a replay reads ahead unless told otherwise.
pub const DEFAULT_REPLAY_PREFETCH: u16 = 256;

/// Which replay to open: where it starts, and its name if it resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    from: ReplayFrom,
    name: Option<String>,
    prefetch: u16,
}

impl Replay {
    /// An unnamed replay starting at `from`.
    pub fn from(from: ReplayFrom) -> Replay {
        Replay {
            from,
            name: None,
            prefetch: DEFAULT_REPLAY_PREFETCH,
        }
    }

    /// A named replay: it starts at `from` the first time, and afterwards
    /// resumes after the last event it moved past (the broker keeps its
    /// position).
    pub fn named(name: impl Into<String>, from: ReplayFrom) -> Replay {
        Replay {
            name: Some(name.into()),
            ..Replay::from(from)
        }
    }

    /// How many events the broker sends ahead (256 by default).
    pub fn prefetch(mut self, prefetch: u16) -> Replay {
        self.prefetch = prefetch.max(1);
        self
    }
}

/// One replayed event.
#[derive(Debug, Clone)]
pub struct Replayed<E> {
    /// Its offset in the stream of its type, from 0.
    pub offset: u64,
    /// The event.
    pub event: E,
    /// Its envelope.
    pub envelope: Envelope,
}

/// An open replay of events of type `E`.
pub struct Replaying<E> {
    source: Box<dyn ReplaySource>,
    _event: PhantomData<fn() -> E>,
}

impl<E> std::fmt::Debug for Replaying<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replaying").finish_non_exhaustive()
    }
}

impl<E: Event> Replaying<E> {
    /// The next event, waiting at the stream's end for a new one. Asking
    /// for it commits the one returned before. `None` once the transport's
    /// connection is gone.
    pub async fn next(&mut self) -> Option<Result<Replayed<E>, BusError>> {
        let recorded = match self.source.next().await? {
            Ok(recorded) => recorded,
            Err(e) => return Some(Err(e.into())),
        };
        let event = match <E::Codec as Codec>::decode(&recorded.envelope.data) {
            Ok(event) => event,
            Err(e) => {
                return Some(Err(BusError::Codec {
                    direction: "decode",
                    ty: format!("{} at offset {}", E::TYPE, recorded.offset),
                    reason: e.0,
                }))
            }
        };
        Some(Ok(Replayed {
            offset: recorded.offset,
            event,
            envelope: recorded.envelope,
        }))
    }
}

impl Bus {
    /// Starts recording events of type `E` for replay (idempotent): events
    /// published from now on are kept. See [`crate::replay`].
    pub async fn record<E: Event>(&self) -> Result<(), BusError> {
        self.transport().record_events(E::TYPE).await?;
        Ok(())
    }

    /// Opens a replay of the recorded events of type `E` (recording them
    /// from now on if they were not). See [`crate::replay`].
    pub async fn replay<E: Event>(&self, replay: Replay) -> Result<Replaying<E>, BusError> {
        let spec = ReplaySpec {
            ty: E::TYPE.to_string(),
            from: replay.from,
            name: replay.name,
            prefetch: replay.prefetch,
        };
        let source = self.transport().replay(spec).await?;
        Ok(Replaying {
            source,
            _event: PhantomData,
        })
    }
}
