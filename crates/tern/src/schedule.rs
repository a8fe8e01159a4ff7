//! Recurring schedules kept in the broker, with no store of their own.
//!
//! [`Bus::schedule`] sends a command on a [`Cadence`] (a fixed interval or
//! a cron expression, read by the `croner` crate, in UTC) for as long as the
//! broker keeps running its delayed messages, across restarts of the
//! services and of the broker. The schedule *is* a message: a tick waiting
//! in the broker's durable delay log. The scheduler service
//! ([`scheduler`], started like any service, on one or more instances)
//! handles each fire time in two steps:
//! 1. the *wake* tick comes out of the delay log when due, and the scheduler
//!    sends the *fire* tick through its own queue, which is deduplicating:
//!    of several wakes for one fire time, one fire gets in;
//! 2. on the fire tick it delays the wake for the cadence's next fire time
//!    after both this one and now (so a broker that was down for a day
//!    fires once for the time missed, then keeps to the cadence), sends the
//!    command with the dedup id `schedule:NAME@MILLIS`, and only then
//!    acknowledges the tick.
//!
//! Guarantees:
//! - **At least once, never twice.** A fire tick handled twice (its
//!   instance died before the ack) sends the next wake and the command
//!   again: the second wake's fire is dropped by the scheduler's queue, so
//!   the chain does not fork, and a target service started with
//!   [`crate::Service::deduplicate`] drops the second command. A target
//!   without deduplication may see that one fire twice.
//! - **On time.** A fire is never handled before its time; it comes as late
//!   as the broker's delay log and the scheduler's instances allow.
//! - **Idempotent set-up.** Fire times are a grid (multiples of the
//!   interval since the Unix epoch, or the cron expression's times), and
//!   fires are deduplicated by their time, so calling [`Bus::schedule`]
//!   again (at every start, say) does not start a second chain: its wake
//!   merges with the chain's at the next fire time.
//!
//! A schedule cannot change its cadence or command under the same name (the
//! old chain would go on beside the new one), and there is no unschedule
//! yet: the chain ends only when the scheduler's queue (`tern.scheduler`)
//! and the ticks delayed for it are purged.
//!
//! Where it works: the embedded transport, and AMQP against a broker that
//! delays messages and deduplicates ([`crate::transport::amqp::AmqpOptions::tern`]).
//! RabbitMQ without the delayed-message and deduplication plugins, NATS
//! (JetStream has no delayed publish) and the memory transport refuse it
//! with [`crate::TransportError::Unsupported`], naming what they lack.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use crate::context::Context;
use crate::envelope::Envelope;
use crate::error::{BusError, HandlerError};
use crate::message::{Codec, Command, Message};
use crate::router::Service;
use crate::transport::Route;

/// The scheduler service's name: its queue holds the ticks.
pub const SCHEDULER_SERVICE: &str = "tern.scheduler";

/// How long the scheduler's queue remembers a tick's dedup id. Duplicates
/// of a tick arrive at its due time (they wait in the delay log for it),
/// so this only needs to cover a crash-and-redeliver.
pub const TICK_DEDUP_WINDOW: Duration = Duration::from_secs(3600);

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cadence {
    /// Every so many milliseconds, at multiples of it since the Unix epoch.
    EveryMillis(u64),
    /// A cron expression (five fields, or six with seconds first), in UTC.
    Cron(String),
}

impl Cadence {
    /// Every `interval` (at least one millisecond), at its multiples since
    /// the Unix epoch.
    pub fn every(interval: Duration) -> Cadence {
        Cadence::EveryMillis(
            u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        )
    }

    /// The times a cron expression names, in UTC. Fails naming the
    /// expression if it does not parse.
    pub fn cron(expression: &str) -> Result<Cadence, BusError> {
        let cadence = Cadence::Cron(expression.to_string());
        cadence.check()?;
        Ok(cadence)
    }

    fn check(&self) -> Result<(), BusError> {
        match self {
            Cadence::EveryMillis(_) => Ok(()),
            Cadence::Cron(expr) => {
                croner::Cron::from_str(expr)
                    .map(|_| ())
                    .map_err(|e| BusError::InvalidSchedule {
                        reason: format!("cron expression `{expr}`: {e}"),
                    })
            }
        }
    }

    /// The first fire time strictly after `after` (milliseconds since the
    /// epoch), if there is one.
    pub fn next_after(&self, after: u64) -> Option<u64> {
        match self {
            Cadence::EveryMillis(every) => {
                let every = (*every).max(1);
                (after / every).checked_add(1)?.checked_mul(every)
            }
            Cadence::Cron(expr) => {
                let cron = croner::Cron::from_str(expr).ok()?;
                let at = chrono::DateTime::from_timestamp_millis(i64::try_from(after).ok()?)?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }
}

/// A tick's two steps. A fire time's [`TickPhase::Wake`] waits in the delay
/// log and may come more than once (a redelivered tick sends its successor
/// again); its [`TickPhase::Fire`] is sent through the scheduler's queue at
/// once, where its dedup id lets one copy in per fire time. Duplicates are
/// stopped there rather than on the way out of the delay log, which does not
/// deduplicate on every broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickPhase {
    /// Due: let the fire through the scheduler's deduplicating queue.
    Wake,
    /// Send the command and delay the next wake.
    Fire,
}

/// The command to send when a schedule fires, in its encoded form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduledCommand {
    /// Its CloudEvents type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Its media type.
    pub datacontenttype: Option<String>,
    /// Its encoded data.
    pub data: Vec<u8>,
}

/// A schedule's tick: the message that carries a schedule through the
/// broker. Handled by the [`scheduler`] service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleTick {
    /// The schedule's name.
    pub schedule: String,
    /// Its cadence.
    pub cadence: Cadence,
    /// The fire time this tick is for, in milliseconds since the epoch.
    pub fire_at_ms: u64,
    /// Whether it wakes the schedule or fires it.
    pub phase: TickPhase,
    /// What to send.
    pub command: ScheduledCommand,
}
crate::message!(command ScheduleTick = "tern.schedule-tick.v1");

impl ScheduleTick {
    /// The dedup id of the tick for `at` in `phase`.
    fn dedup_id(&self, phase: TickPhase, at: u64) -> String {
        let phase = match phase {
            TickPhase::Wake => "wake",
            TickPhase::Fire => "fire",
        };
        format!("{phase}:{}@{at}", self.schedule)
    }

    /// The tick for `at` in `phase`, as an effect of `cause` if given.
    fn envelope(
        &self,
        phase: TickPhase,
        at: u64,
        cause: Option<&Envelope>,
    ) -> Result<Envelope, String> {
        let next = ScheduleTick {
            fire_at_ms: at,
            phase,
            ..self.clone()
        };
        let data = <<ScheduleTick as Message>::Codec as Codec>::encode(&next).map_err(|e| e.0)?;
        let mut envelope = Envelope::new(
            format!("tern://schedule/{}", self.schedule),
            ScheduleTick::TYPE,
            data,
        );
        if let Some(cause) = cause {
            envelope = envelope.caused_by(cause);
        }
        envelope.datacontenttype =
            Some(<<ScheduleTick as Message>::Codec as Codec>::CONTENT_TYPE.into());
        envelope.set_dedup_id(self.dedup_id(phase, at));
        Ok(envelope)
    }
}

/// The dedup id a schedule's command carries for the fire at `at_ms`.
pub fn fire_dedup_id(schedule: &str, at_ms: u64) -> String {
    format!("schedule:{schedule}@{at_ms}")
}

/// The fire time in a scheduled command's dedup id, if it is one (a
/// handler can read it from its envelope's [`Envelope::dedup_id`]).
pub fn fire_time(dedup_id: &str) -> Option<SystemTime> {
    let (_, millis) = dedup_id.strip_prefix("schedule:")?.rsplit_once('@')?;
    Some(UNIX_EPOCH + Duration::from_millis(millis.parse().ok()?))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The scheduler service. Start it (on one instance or several) wherever
/// schedules should run; ticks wait in its queue while none runs.
pub fn scheduler() -> Service {
    Service::new(SCHEDULER_SERVICE)
        .deduplicate(TICK_DEDUP_WINDOW)
        .on_command(handle_tick)
}

async fn handle_tick(tick: ScheduleTick, ctx: Context) -> Result<(), HandlerError> {
    let transport = ctx.bus().transport();
    let now = now_ms();
    let delay_until = |at: u64| Duration::from_millis(at.saturating_sub(now_ms()));
    let tick_for = |phase: TickPhase, at: u64| {
        tick.envelope(phase, at, Some(ctx.envelope()))
            .map_err(HandlerError::permanent)
    };
    if now < tick.fire_at_ms {
        // Never early (a clock step between broker and scheduler, say):
        // wait out the rest in the broker.
        let again = tick_for(TickPhase::Wake, tick.fire_at_ms)?;
        transport
            .send_after(Route::Command, again, delay_until(tick.fire_at_ms))
            .await?;
        return Ok(());
    }
    match tick.phase {
        TickPhase::Wake => {
            // Through the deduplicating queue: one fire per fire time.
            transport
                .send(Route::Command, tick_for(TickPhase::Fire, tick.fire_at_ms)?)
                .await?;
        }
        TickPhase::Fire => {
            // The next wake first: a failing command must not end the chain.
            if let Some(next) = tick.cadence.next_after(tick.fire_at_ms.max(now)) {
                transport
                    .send_after(
                        Route::Command,
                        tick_for(TickPhase::Wake, next)?,
                        delay_until(next),
                    )
                    .await?;
            }
            let mut command = Envelope::new(
                format!("tern://schedule/{}", tick.schedule),
                tick.command.ty.clone(),
                tick.command.data.clone().into(),
            )
            .caused_by(ctx.envelope());
            command
                .datacontenttype
                .clone_from(&tick.command.datacontenttype);
            command.time = Some(UNIX_EPOCH + Duration::from_millis(tick.fire_at_ms));
            command.set_dedup_id(fire_dedup_id(&tick.schedule, tick.fire_at_ms));
            transport.send(Route::Command, command).await?;
        }
    }
    Ok(())
}

impl Bus {
    /// Sends `command` on `cadence` from now on, under `name`.
    /// Idempotent: calling it again with the same arguments (at every
    /// start) keeps one schedule. The commands are sent by the [`scheduler`]
    /// service, which must run somewhere. See [`crate::schedule`].
    pub async fn schedule<C: Command>(
        &self,
        name: &str,
        cadence: Cadence,
        command: &C,
    ) -> Result<(), BusError> {
        cadence.check()?;
        if !crate::message::valid_type_name(name) {
            return Err(BusError::InvalidSchedule {
                reason: format!("name `{name}`: use lower-case letters, digits, `-` and `.`"),
            });
        }
        let data = <C::Codec as Codec>::encode(command).map_err(|e| BusError::Codec {
            direction: "encode",
            ty: C::TYPE.to_string(),
            reason: e.0,
        })?;
        let Some(first) = cadence.next_after(now_ms()) else {
            return Err(BusError::InvalidSchedule {
                reason: format!("schedule `{name}` never fires"),
            });
        };
        let tick = ScheduleTick {
            schedule: name.to_string(),
            cadence,
            fire_at_ms: first,
            phase: TickPhase::Wake,
            command: ScheduledCommand {
                ty: C::TYPE.to_string(),
                datacontenttype: Some(<C::Codec as Codec>::CONTENT_TYPE.to_string()),
                data: data.to_vec(),
            },
        };
        let transport = self.transport();
        if !transport.delays_messages() {
            return Err(crate::TransportError::Unsupported {
                transport: transport.name(),
                what: format!(
                    "keep schedule `{name}`: a schedule is a chain of messages held for \
                     later, and this transport cannot send a message for later (use the \
                     embedded transport, or AMQP with AmqpOptions::tern())"
                ),
            }
            .into());
        }
        // Declares the scheduler's queue, deduplicating, so that the tick
        // has somewhere to go when due even if no scheduler runs yet (a
        // delayed command is not checked for a handler).
        let spec = scheduler().subscription_spec();
        let mut declared = transport.subscribe(spec).await?;
        declared.cancel().await?;
        drop(declared);
        let envelope = tick
            .envelope(TickPhase::Wake, first, None)
            .map_err(|reason| BusError::Codec {
                direction: "encode",
                ty: ScheduleTick::TYPE.to_string(),
                reason,
            })?;
        let delay = Duration::from_millis(first.saturating_sub(now_ms()));
        transport
            .send_after(Route::Command, envelope, delay)
            .await?;
        Ok(())
    }
}
