//! `tern dlq list`, `tern dlq show` and `tern dlq redrive`: dead-letter
//! queues, read and moved back.
//!
//! `list` and `show` fetch with `basic.get` and, at the end, nack
//! everything they fetched with requeue, so the queue is left as it was.
//!
//! `redrive` moves each message exactly once, however often it is killed
//! and re-run. Each move is one AMQP transaction on one channel: `basic.get`
//! the original, publish the copy to its target, ack the original, then
//! `tx.commit`. The broker applies the publish and the ack together at the
//! commit, or, when the connection goes before it, neither (the original is
//! requeued, unacked). So there is no moment at which the copy exists and
//! the original is still in the queue, which is where the older
//! confirm-then-ack sequence duplicated a message when killed, and a re-run
//! simply carries on with what is still there: the queue itself is the
//! checkpoint. The alternatives were weighed and set aside: a client-side
//! journal of published-but-not-yet-removed identities has its own window
//! (published, then killed before the journal write), and dead letters have
//! no identity of their own to key it by (identical bodies are legitimate,
//! message ids optional); stamping a redrive id and relying on broker-side
//! deduplication works only where the target is a deduplicating exchange.
//! The one case a transaction cannot cover is a target that routes the copy
//! nowhere: the return arrives with the commit, after the original was
//! acked, so the returned original is put back at the tail of the queue in
//! a second transaction and the run stops with the fix; only a kill between
//! those two commits of an unroutable message loses it. (Broker crashes are
//! the broker's durability: Tern answers commit-ok once the copy is
//! durable.)
//!
//! The target is `--to` if given, else for the toolkit's dead letters
//! (header `tern-failed-service`) the service's queue through the default
//! exchange, else the exchange and routing key of the most recent death in
//! `x-death` (RabbitMQ's dead-letter history, which Tern's broker writes
//! too). `--rate` paces the moves so a recovered service is not flooded; a
//! progress bar is drawn on stderr when it is a terminal, and one line per
//! move is printed otherwise.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use serde_json::{json, Value};

use crate::endpoint::Endpoint;
use crate::operator::{connect, emit, explain, header_str, message_json, message_text, runtime};
use crate::progress::Progress;

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
    /// Prints one message in full (properties, headers, its deaths decoded,
    /// the body pretty-printed if JSON) and leaves it in the queue.
    Show(ShowArgs),
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

/// Arguments of `tern dlq show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    url: Endpoint,
    /// The dead-letter queue.
    queue: String,
    /// The message at this position, 1 being the head of the queue (the
    /// numbering of `tern dlq list`).
    #[arg(long, short = 'p', value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "message_id")]
    position: u64,
    /// The first message with this message-id property instead.
    #[arg(long, value_name = "ID")]
    message_id: Option<String>,
    /// Prints one JSON object instead of text.
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
        DlqCommand::Show(args) => rt.block_on(show(&args)),
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

/// Finds one message by position or message id, prints it, and puts
/// everything it fetched back.
async fn show(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    let queue = &args.queue;
    let depth = u64::from(queue_depth(&ch, queue).await?);
    let mut last_tag = None;
    let mut found = None;
    let mut position = 0u64;
    // Only what is there now: requeued messages go back in their place, but
    // a scan must not run on into messages it has already seen.
    while position < depth {
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
        position += 1;
        last_tag = Some(got.delivery.delivery_tag);
        let wanted = match &args.message_id {
            Some(id) => got
                .delivery
                .properties
                .message_id()
                .as_ref()
                .is_some_and(|m| m.as_str() == id),
            None => position == args.position,
        };
        if wanted {
            found = Some(got.delivery);
            break;
        }
    }
    if let Some(tag) = last_tag {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .with_context(|| format!("returning the read messages to queue {queue:?}"))?;
    }
    let _ = conn.close(200, "bye".into()).await;
    let Some(delivery) = found else {
        match &args.message_id {
            Some(id) => bail!(
                "no message with message-id {id:?} among the {depth} messages of queue {queue:?}; `tern dlq list {queue}` shows them"
            ),
            None => bail!(
                "queue {queue:?} holds {depth} messages, so there is no message at position {}; `tern dlq list {queue}` shows them",
                args.position
            ),
        }
    };
    let text = if args.json {
        let mut m = message_json(&delivery);
        if let Value::Object(map) = &mut m {
            map.insert("position".to_string(), json!(position));
            map.insert("deaths".to_string(), Value::Array(deaths(&delivery)));
            if let Some(pretty) = json_body(&delivery.data) {
                map.insert("body_json".to_string(), pretty);
            }
        }
        format!("{m}\n")
    } else {
        show_text(&delivery, position, queue)
    };
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The body as JSON, if it is some (an object or array: a bare string or
/// number is shown as it is).
fn json_body(data: &[u8]) -> Option<Value> {
    match serde_json::from_slice::<Value>(data).ok()? {
        v @ (Value::Object(_) | Value::Array(_)) => Some(v),
        _ => None,
    }
}

/// Every `x-death` entry, most recent first, with its timestamp made
/// readable.
fn deaths(delivery: &Delivery) -> Vec<Value> {
    let Some(headers) = delivery.properties.headers().as_ref() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(list)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .filter_map(|entry| match entry {
            AMQPValue::FieldTable(t) => {
                let mut death = crate::operator::table_json(t);
                if let (Value::Object(map), Some(AMQPValue::Timestamp(ts))) =
                    (&mut death, t.inner().get("time"))
                {
                    map.insert("time".to_string(), json!(utc_time(*ts)));
                }
                Some(death)
            }
            _ => None,
        })
        .collect()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days,
/// proleptic Gregorian), without a date crate for one field.
fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// One message for a person: where it sits, its properties, its headers
/// (but `x-death`), each death on its own lines, then the body.
fn show_text(delivery: &Delivery, position: u64, queue: &str) -> String {
    let m = message_json(delivery);
    let mut out = format!(
        "message {position} of queue {queue:?} (first published to exchange {:?} with routing key {:?}{})\n",
        delivery.exchange.as_str(),
        delivery.routing_key.as_str(),
        if delivery.redelivered { ", redelivered" } else { "" }
    );
    out.push_str("properties:\n");
    if let Some(Value::Object(props)) = m.get("properties") {
        for (k, v) in props {
            out.push_str(&format!("  {k}: {v}\n"));
        }
    }
    out.push_str("headers:\n");
    if let Some(Value::Object(headers)) = m.get("headers") {
        for (k, v) in headers.iter().filter(|(k, _)| k.as_str() != "x-death") {
            out.push_str(&format!("  {k}: {v}\n"));
        }
    }
    let deaths = deaths(delivery);
    for (i, death) in deaths.iter().enumerate() {
        let field = |k: &str| match death.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".to_string(),
        };
        out.push_str(&format!(
            "death {} of {}: {} in queue {} at {} (count {}), from exchange {} with routing keys {}\n",
            i + 1,
            deaths.len(),
            field("reason"),
            field("queue"),
            field("time"),
            field("count"),
            field("exchange"),
            field("routing-keys"),
        ));
    }
    if deaths.is_empty() {
        out.push_str("deaths: none recorded (no x-death header)\n");
    }
    match (
        json_body(&delivery.data),
        std::str::from_utf8(&delivery.data),
    ) {
        (Some(v), _) => {
            let pretty = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
            out.push_str(&format!(
                "body (JSON, {} bytes):\n{pretty}\n",
                delivery.data.len()
            ));
        }
        (None, Ok(text)) => {
            out.push_str(&format!("body ({} bytes):\n{text}\n", delivery.data.len()));
        }
        (None, Err(_)) => out.push_str(&format!(
            "body ({} bytes, base64, not UTF-8):\n{}\n",
            delivery.data.len(),
            m.get("body").and_then(Value::as_str).unwrap_or("")
        )),
    }
    out
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
    ch.tx_select()
        .await
        .context("making the channel transactional (tx.select)")?;
    let queue = &args.queue;
    // Only what is there now: a message that dies again on its way back
    // lands at the tail of this queue and must not be redriven in a loop.
    let depth = u64::from(queue_depth(&ch, queue).await?);
    let goal = args.limit.map_or(depth, |l| l.min(depth));
    let interval = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let progress = Progress::new(goal, "redriving");
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
        let Some((exchange, key)) = target(args, &delivery) else {
            // Closing the connection hands the unacked message back.
            let _ = conn.close(200, "bye".into()).await;
            bail!(
                "a message in queue {queue:?} has neither an x-death nor a {FAILED_SERVICE_HEADER} header, so its origin is unknown; it was left in place ({moved} moved before it); give --to EXCHANGE [--routing-key KEY]"
            );
        };
        let mut properties = delivery.properties.clone();
        if let Some(headers) = redriven_headers(&delivery) {
            properties = properties.with_headers(headers);
        }
        let doing = format!("republishing to exchange {exchange:?}");
        let entity = format!("exchange {exchange:?}");
        ch.basic_publish(
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
        .map_err(|e| explain(e, &doing, &entity))?;
        ch.basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .with_context(|| format!("acknowledging a redriven message in queue {queue:?}"))?;
        // The copy and the removal of the original happen together here, or
        // (if this process dies first) not at all.
        ch.tx_commit()
            .await
            .map_err(|e| explain(e, &format!("{doing} (tx.commit)"), &entity))?;
        // Returns come before commit-ok: anything returned was unroutable,
        // and its original is already gone, so it goes back to the queue.
        let returned = ch
            .wait_for_confirms()
            .await
            .context("collecting returned messages")?;
        if !returned.is_empty() {
            put_back(&ch, queue, &delivery).await?;
            bail!(
                "exchange {exchange:?} routes routing key {key:?} to no queue, so the message was put back at the tail of queue {queue:?} ({moved} moved before it); bind a queue or give --to EXCHANGE --routing-key KEY"
            );
        }
        moved += 1;
        progress.inc();
        if !progress.is_drawn() {
            // Progress only: a closed stdout does not stop the move.
            emit(&format!(
                "redriven {moved}/{goal}: to exchange {exchange:?} with routing key {key:?}\n"
            ))?;
        }
    }
    progress.finish();
    emit(&format!(
        "tern: moved {moved} messages out of queue {queue:?}\n"
    ))?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
}

/// Publishes an unroutable message's original back to its dead-letter
/// queue, in a transaction of its own.
async fn put_back(ch: &Channel, queue: &str, delivery: &Delivery) -> anyhow::Result<()> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        },
        &delivery.data,
        delivery.properties.clone(),
    )
    .await
    .with_context(|| format!("putting an unroutable message back into queue {queue:?}"))?;
    ch.tx_commit()
        .await
        .with_context(|| format!("putting an unroutable message back into queue {queue:?}"))?;
    let returned = ch.wait_for_confirms().await.unwrap_or_default();
    if !returned.is_empty() {
        bail!(
            "queue {queue:?} refused an unroutable message put back into it; the message is lost"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_rate, utc_time};

    #[test]
    fn timestamps_read_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn rates_are_positive_numbers_per_second() {
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        for bad in ["0", "-1/s", "fast", "inf", "NaN/s", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
