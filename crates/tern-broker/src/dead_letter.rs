//! Dead-lettering: what happens to a message that is rejected, expires,
//! overflows its queue or exceeds its delivery limit. It is republished to
//! the queue's dead-letter exchange with RabbitMQ's `x-death` history.
//!
//! `x-death` is an array of tables, most recent first, one per (queue,
//! reason): `count`, `reason`, `queue`, `time`, `exchange`, `routing-keys`
//! and, for messages that expired by their own TTL, `original-expiration`.
//! A repeat of the same (queue, reason) increments its `count` and moves it
//! to the front. `x-first-death-*` record the first and `x-last-death-*` the
//! latest.

use crate::message::Message;
use crate::name::ExchangeName;
use crate::value::{FieldTable, FieldValue};

/// Why a message was dead-lettered, with RabbitMQ's reason names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Rewrites `message` for republishing to `dlx` (with `routing_key`, or its
/// own if none), recording the death in its headers. `now` is in seconds.
pub(crate) fn dead_letter(
    mut message: Message,
    queue: &str,
    reason: Reason,
    dlx: &ExchangeName,
    routing_key: Option<&str>,
    now: u64,
) -> Message {
    let mut headers = message.properties.headers.take().unwrap_or_default();
    let mut deaths: Vec<FieldValue> = match headers.remove("x-death") {
        Some(FieldValue::Array(a)) => a,
        _ => Vec::new(),
    };
    let same = |d: &FieldValue| match d {
        FieldValue::Table(t) => {
            t.get("queue").and_then(FieldValue::as_str) == Some(queue)
                && t.get("reason").and_then(FieldValue::as_str) == Some(reason.as_str())
        }
        _ => false,
    };
    let mut entry = match deaths.iter().position(same) {
        Some(i) => match deaths.remove(i) {
            FieldValue::Table(t) => t,
            _ => FieldTable::new(),
        },
        None => FieldTable::new(),
    };
    let count = entry.get("count").and_then(FieldValue::as_i64).unwrap_or(0) + 1;
    entry.insert("count".into(), FieldValue::I64(count));
    entry.insert("reason".into(), FieldValue::String(reason.as_str().into()));
    entry.insert("queue".into(), FieldValue::String(queue.into()));
    entry.insert("time".into(), FieldValue::Timestamp(now));
    entry.insert(
        "exchange".into(),
        FieldValue::String(message.exchange.as_str().into()),
    );
    entry.insert(
        "routing-keys".into(),
        FieldValue::Array(vec![FieldValue::String(message.routing_key.clone())]),
    );
    if reason == Reason::Expired {
        // The message's own TTL ends here, or it would expire again at once.
        if let Some(exp) = message.properties.expiration.take() {
            entry.insert("original-expiration".into(), FieldValue::String(exp));
        }
    }
    deaths.insert(0, FieldValue::Table(entry));
    headers.insert("x-death".into(), FieldValue::Array(deaths));
    let death = [
        ("reason", reason.as_str().to_string()),
        ("queue", queue.to_string()),
        ("exchange", message.exchange.as_str().to_string()),
    ];
    for (field, value) in &death {
        headers
            .entry(format!("x-first-death-{field}"))
            .or_insert_with(|| FieldValue::String(value.clone()));
        headers.insert(
            format!("x-last-death-{field}"),
            FieldValue::String(value.clone()),
        );
    }
    message.properties.headers = Some(headers);
    if let Some(key) = routing_key {
        message.routing_key = key.to_string();
    }
    message.exchange = dlx.clone();
    message
}

/// Whether dead-lettering into `queue` would close a cycle that no client
/// takes part in: the message already died in that queue, and never by
/// rejection. RabbitMQ drops such messages rather than loop forever.
pub(crate) fn is_cycle(message: &Message, queue: &str) -> bool {
    let Some(FieldValue::Array(deaths)) = message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
    else {
        return false;
    };
    let tables = deaths.iter().filter_map(|d| match d {
        FieldValue::Table(t) => Some(t),
        _ => None,
    });
    let mut seen_queue = false;
    for t in tables {
        if t.get("reason").and_then(FieldValue::as_str) == Some(Reason::Rejected.as_str()) {
            return false;
        }
        if t.get("queue").and_then(FieldValue::as_str) == Some(queue) {
            seen_queue = true;
        }
    }
    seen_queue
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Properties;
    use bytes::Bytes;

    fn msg() -> Message {
        Message {
            exchange: ExchangeName::new("orders").unwrap(),
            routing_key: "order.placed".into(),
            properties: Properties {
                expiration: Some("100".into()),
                ..Properties::default()
            },
            body: Bytes::from_static(b"x"),
        }
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m.properties.headers.as_ref().unwrap().get("x-death") {
            Some(FieldValue::Array(a)) => a
                .iter()
                .map(|v| match v {
                    FieldValue::Table(t) => t.clone(),
                    _ => panic!("x-death holds a non-table"),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    #[test]
    fn a_first_death_records_every_field() {
        let dlx = ExchangeName::new("dlx").unwrap();
        let m = dead_letter(
            msg(),
            "work",
            Reason::Expired,
            &dlx,
            Some("dead"),
            1_700_000_000,
        );
        assert_eq!(m.exchange.as_str(), "dlx");
        assert_eq!(m.routing_key, "dead");
        assert_eq!(
            m.properties.expiration, None,
            "the per-message TTL is removed"
        );
        let d = deaths(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(
            d[0].get("reason").and_then(FieldValue::as_str),
            Some("expired")
        );
        assert_eq!(d[0].get("queue").and_then(FieldValue::as_str), Some("work"));
        assert_eq!(
            d[0].get("exchange").and_then(FieldValue::as_str),
            Some("orders")
        );
        assert_eq!(
            d[0].get("time"),
            Some(&FieldValue::Timestamp(1_700_000_000))
        );
        assert_eq!(
            d[0].get("routing-keys"),
            Some(&FieldValue::Array(vec![FieldValue::String(
                "order.placed".into()
            )]))
        );
        assert_eq!(
            d[0].get("original-expiration").and_then(FieldValue::as_str),
            Some("100")
        );
        let h = m.properties.headers.as_ref().unwrap();
        assert_eq!(
            h.get("x-first-death-reason").and_then(FieldValue::as_str),
            Some("expired")
        );
        assert_eq!(
            h.get("x-first-death-queue").and_then(FieldValue::as_str),
            Some("work")
        );
    }

    #[test]
    fn a_repeated_death_counts_up_and_moves_to_the_front() {
        let dlx = ExchangeName::new("dlx").unwrap();
        let m = dead_letter(msg(), "work", Reason::Rejected, &dlx, None, 1);
        let m = dead_letter(
            m,
            "retry",
            Reason::Expired,
            &ExchangeName::new("orders").unwrap(),
            None,
            2,
        );
        let m = dead_letter(m, "work", Reason::Rejected, &dlx, None, 3);
        let d = deaths(&m);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].get("queue").and_then(FieldValue::as_str), Some("work"));
        assert_eq!(d[0].get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(
            d[1].get("queue").and_then(FieldValue::as_str),
            Some("retry")
        );
        let h = m.properties.headers.as_ref().unwrap();
        assert_eq!(
            h.get("x-first-death-queue").and_then(FieldValue::as_str),
            Some("work")
        );
        assert_eq!(
            h.get("x-last-death-queue").and_then(FieldValue::as_str),
            Some("work")
        );
        assert_eq!(
            h.get("x-first-death-reason").and_then(FieldValue::as_str),
            Some("rejected")
        );
    }

    #[test]
    fn only_cycles_without_a_rejection_are_cycles() {
        let dlx = ExchangeName::new("dlx").unwrap();
        let expired = dead_letter(msg(), "a", Reason::Expired, &dlx, None, 1);
        assert!(is_cycle(&expired, "a"));
        assert!(!is_cycle(&expired, "b"));
        let rejected = dead_letter(expired, "b", Reason::Rejected, &dlx, None, 2);
        assert!(!is_cycle(&rejected, "a"));
    }
}
