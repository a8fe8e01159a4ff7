//! `tern dlq list` and `tern dlq redrive`: dead-letter queues, read and
//! moved back.
//!
//! `list` fetches with `basic.get` and, at the end, nacks everything it
//! fetched with requeue, so the queue is left as it was. `redrive` moves
//! each message to its target with a publisher confirm and only then acks
//! the original: a crash in between leaves a copy in both places (at least
//! once), never in neither. The target is `--to` if given, else for the
//! toolkit's dead letters (header `tern-failed-service`) the service's
//! queue through the default exchange, else the exchange and routing key
//! of the most recent death in `x-death` (RabbitMQ's dead-letter history,
//! which Tern's broker writes too).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use serde_json::{json, Value};

use crate::endpoint::Endpoint;
use crate::operator::{connect, emit, explain, header_str, message_json, message_text, runtime};

/// The toolkit's dead-letter headers (see `tern::transport`): the service
/// that gave up, and why.
const FAILED_SERVICE_HEADER: &str = "tern-failed-service";
const ERROR_HEADER: &str = "tern-error";
/// The toolkit's attempt counter, reset on redrive so the service gets its
/// full retries again.
const ATTEMPT_HEADER: &str = "tern-attempt";

/// The `tern dlq` commands.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Prints the messages of a dead-letter queue, with why each died, and
    /// leaves them in the queue.
    List(ListArgs),
    /// Moves messages from a dead-letter queue back to where they came
    /// from (or to --to), each confirmed before it is removed.
    Redrive(RedriveArgs),
}

/// Arguments of `tern dlq list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    url: Endpoint,
    /// The dead-letter queue.
    queue: String,
    /// Prints at most N messages.
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u64,
    /// Prints one JSON object per message and line.
    #[arg(long)]
    json: bool,
}

/// Arguments of `tern dlq redrive`.
#[derive(Debug, Args)]
pub(crate) struct RedriveArgs {
    #[command(flatten)]
    url: Endpoint,
    /// The dead-letter queue to empty.
    queue: String,
    /// Publishes every message to this exchange ("" is the default
    /// exchange) instead of where each came from.
    #[arg(long, value_name = "EXCHANGE")]
    to: Option<String>,
    /// With --to: the routing key (default: each message's original key).
    #[arg(long, value_name = "KEY", requires = "to")]
    routing_key: Option<String>,
    /// At most this many messages per second, e.g. `50/s` or `50`.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Moves at most N messages.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

/// Runs a `tern dlq` command.
pub(crate) fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match command {
        DlqCommand::List(args) => rt.block_on(list(&args)),
        DlqCommand::Redrive(args) => rt.block_on(redrive(&args)),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let number = s.strip_suffix("/s").unwrap_or(s);
    match number.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate; write messages per second, e.g. 50/s"
        )),
    }
}

/// Checks that the queue exists (a passive declare) and returns how many
/// messages it holds.
async fn queue_depth(ch: &Channel, queue: &str) -> anyhow::Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                &format!("looking up queue {queue:?}"),
                &format!("queue {queue:?}"),
            )
        })?;
    Ok(q.message_count())
}

/// The first (most recent) `x-death` entry, if any.
fn last_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        },
        _ => None,
    }
}

/// Why a message died, from `x-death` and the toolkit's headers, as JSON.
fn death_summary(delivery: &Delivery) -> Value {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let mut summary = serde_json::Map::new();
    if let Some(death) = last_death(headers) {
        summary.insert("x-death".to_string(), crate::operator::table_json(death));
    }
    for key in [FAILED_SERVICE_HEADER, ERROR_HEADER] {
        if let Some(v) = header_str(headers, key) {
            summary.insert(key.to_string(), json!(v));
        }
    }
    Value::Object(summary)
}

async fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    let queue = &args.queue;
    let depth = queue_depth(&ch, queue).await?;
    if !args.json {
        println!("queue {queue:?}: {depth} messages");
    }
    let mut last_tag = None;
    let mut shown = 0u64;
    while shown < args.limit {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| {
                explain(
                    e,
                    &format!("reading queue {queue:?}"),
                    &format!("queue {queue:?}"),
                )
            })?;
        let Some(got) = got else { break };
        shown += 1;
        last_tag = Some(got.delivery.delivery_tag);
        let death = death_summary(&got.delivery);
        let text = if args.json {
            let mut m = message_json(&got.delivery);
            if let Value::Object(map) = &mut m {
                map.insert("death".to_string(), death);
            }
            format!("{m}\n")
        } else {
            let mut text = message_text(&got.delivery, shown);
            if let Value::Object(map) = &death {
                if let Some(d) = map.get("x-death") {
                    text.push_str(&format!("died: {d}\n"));
                }
                for key in [FAILED_SERVICE_HEADER, ERROR_HEADER] {
                    if let Some(Value::String(v)) = map.get(key) {
                        text.push_str(&format!("{key}: {v}\n"));
                    }
                }
            }
            text
        };
        if !emit(&text)? {
            break;
        }
    }
    // Everything fetched goes back, in one nack, so the listing changes
    // nothing (the broker marks them redelivered).
    if let Some(tag) = last_tag {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .with_context(|| format!("returning the listed messages to queue {queue:?}"))?;
    }
    if !args.json && u64::from(depth) > shown {
        println!(
            "({} more not shown; --limit raises the count)",
            u64::from(depth) - shown
        );
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
}

/// Where one message goes back to.
fn target(args: &RedriveArgs, delivery: &Delivery) -> Option<(String, String)> {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let death = last_death(headers);
    let original_key = || -> Option<String> {
        match death?.inner().get("routing-keys")? {
            AMQPValue::FieldArray(keys) => match keys.as_slice().first()? {
                AMQPValue::LongString(k) => Some(String::from_utf8_lossy(k.as_bytes()).into()),
                AMQPValue::ShortString(k) => Some(k.to_string()),
                _ => None,
            },
            _ => None,
        }
    };
    if let Some(to) = &args.to {
        let key = args
            .routing_key
            .clone()
            .or_else(original_key)
            .unwrap_or_else(|| delivery.routing_key.to_string());
        return Some((to.clone(), key));
    }
    if let Some(service) = header_str(headers, FAILED_SERVICE_HEADER) {
        return Some((String::new(), service.to_string()));
    }
    let exchange = header_str(death?, "exchange")?.to_string();
    Some((exchange, original_key()?))
}

/// The headers for the redriven copy: the toolkit's failure headers are
/// dropped (the message is live again; a later death writes them anew),
/// `x-death` is kept as history.
fn redriven_headers(delivery: &Delivery) -> Option<FieldTable> {
    let headers = delivery.properties.headers().as_ref()?;
    let mut kept = FieldTable::default();
    for (k, v) in headers {
        if ![FAILED_SERVICE_HEADER, ERROR_HEADER, ATTEMPT_HEADER].contains(&k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    Some(kept)
}

async fn redrive(args: &RedriveArgs) -> anyhow::Result<ExitCode> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let queue = &args.queue;
    // Only what is there now: a message that dies again on its way back
    // lands at the tail of this queue and must not be redriven in a loop.
    let depth = u64::from(queue_depth(&ch, queue).await?);
    let goal = args.limit.map_or(depth, |l| l.min(depth));
    let interval = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let started = tokio::time::Instant::now();
    let mut moved = 0u64;
    while moved < goal {
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(moved as f64);
            tokio::time::sleep_until(due).await;
        }
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| {
                explain(
                    e,
                    &format!("reading queue {queue:?}"),
                    &format!("queue {queue:?}"),
                )
            })?;
        let Some(got) = got else { break };
        let delivery = got.delivery;
        let tag = delivery.delivery_tag;
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let Some((exchange, key)) = target(args, &delivery) else {
            ch.basic_nack(tag, requeue).await.ok();
            bail!(
                "a message in queue {queue:?} has neither an x-death nor a {FAILED_SERVICE_HEADER} header, so its origin is unknown; it was left in place ({moved} moved before it); give --to EXCHANGE [--routing-key KEY]"
            );
        };
        let mut properties = delivery.properties.clone();
        if let Some(headers) = redriven_headers(&delivery) {
            properties = properties.with_headers(headers);
        }
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await
            .map_err(|e| {
                explain(
                    e,
                    &format!("republishing to exchange {exchange:?}"),
                    &format!("exchange {exchange:?}"),
                )
            })?;
        let outcome = confirm.await.map_err(|e| {
            explain(
                e,
                &format!("republishing to exchange {exchange:?}"),
                &format!("exchange {exchange:?}"),
            )
        })?;
        match outcome {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_)) => {
                ch.basic_nack(tag, requeue).await.ok();
                bail!(
                    "exchange {exchange:?} routes routing key {key:?} to no queue, so the message was left in queue {queue:?} ({moved} moved before it); bind a queue or give --to EXCHANGE --routing-key KEY"
                );
            }
            Confirmation::Nack(_) => {
                ch.basic_nack(tag, requeue).await.ok();
                bail!(
                    "the broker nacked the copy sent to exchange {exchange:?}, so the message was left in queue {queue:?} ({moved} moved before it)"
                );
            }
        }
        // Confirmed: only now may the original go.
        ch.basic_ack(tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acknowledging a redriven message in queue {queue:?}"))?;
        moved += 1;
        // Progress only: a closed stdout does not stop the move.
        emit(&format!(
            "redriven {moved}/{goal}: to exchange {exchange:?} with routing key {key:?}\n"
        ))?;
    }
    emit(&format!(
        "tern: moved {moved} messages out of queue {queue:?}\n"
    ))?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_are_positive_numbers_per_second() {
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        for bad in ["0", "-1/s", "fast", "inf", "NaN/s", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
