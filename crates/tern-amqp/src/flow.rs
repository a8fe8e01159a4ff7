//! Publisher flow control under resource alarms, as RabbitMQ does it: while
//! any alarm is raised, a connection that publishes is blocked. The server
//! stops reading from it (so its publishes wait in the socket, neither
//! routed nor confirmed), tells it with `connection.blocked` if the client
//! announced the `connection.blocked` capability, and resumes with
//! `connection.unblocked` once every alarm has cleared. Connections that
//! never published (consumers) are read as usual, so they keep draining
//! queues and acking.

use amq_protocol::protocol::{connection, AMQPClass};
use tern_broker::alarm::{AlarmSet, Alarms};
use tokio::sync::watch;

use crate::frame::short;

/// One connection's view of the broker's alarms.
#[derive(Debug)]
pub(crate) struct Blocking {
    alarms: watch::Receiver<AlarmSet>,
    /// The client announced the `connection.blocked` capability.
    notify: bool,
    /// The connection has sent `basic.publish`.
    publisher: bool,
    /// `connection.blocked` was sent and `connection.unblocked` not yet.
    told_blocked: bool,
}

impl Blocking {
    pub(crate) fn new(alarms: &Alarms) -> Blocking {
        Blocking {
            alarms: alarms.subscribe(),
            notify: false,
            publisher: false,
            told_blocked: false,
        }
    }

    /// Whether the client asked to hear about blocking.
    pub(crate) fn set_notify(&mut self, notify: bool) {
        self.notify = notify;
    }

    /// The connection published: from now on, alarms block it.
    pub(crate) fn published(&mut self) {
        self.publisher = true;
    }

    /// Whether the connection must not be read now.
    pub(crate) fn blocked(&self) -> bool {
        self.publisher && !self.alarms.borrow().is_empty()
    }

    /// Waits until the alarm set changes; never, if the broker is gone.
    pub(crate) async fn changed(&mut self) {
        if self.alarms.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// What to tell the client now, if anything: `connection.blocked` with
    /// the raised alarms as the reason, or `connection.unblocked`.
    pub(crate) fn notification(&mut self) -> Option<AMQPClass> {
        if !self.notify {
            return None;
        }
        let blocked = self.blocked();
        if blocked && !self.told_blocked {
            self.told_blocked = true;
            let raised: Vec<&str> = self
                .alarms
                .borrow()
                .raised()
                .into_iter()
                .map(|r| r.as_str())
                .collect();
            let reason = format!("low on {}", raised.join(" and "));
            return Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(
                connection::Blocked {
                    reason: short(&reason),
                },
            )));
        }
        if !blocked && self.told_blocked {
            self.told_blocked = false;
            return Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                connection::Unblocked {},
            )));
        }
        None
    }
}
