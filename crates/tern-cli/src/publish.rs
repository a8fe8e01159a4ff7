//! `tern publish`: a message (or `--count` copies of it, paced by
//! `--rate`), published mandatory and with publisher confirms, and a report
//! of what became of it (confirmed, returned as unroutable, or nacked), each
//! with its own exit code.

use std::collections::VecDeque;
use std::io::Read;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};

use crate::operator::{explain, runtime, BrokerUrl};

/// Exit code of a message the broker returned as unroutable.
const EXIT_RETURNED: u8 = 3;
/// Exit code of a message the broker nacked.
const EXIT_NACKED: u8 = 4;
/// Confirms awaited at most at once with `--count`: enough to keep the
/// pipe full, few enough to bound memory.
const IN_FLIGHT: usize = 1024;

/// Arguments of `tern publish`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    #[command(flatten)]
    url: BrokerUrl,

    /// The exchange to publish to; "" (the default) is the default
    /// exchange, which routes to the queue named by the routing key.
    #[arg(long, short = 'e', default_value = "")]
    exchange: String,

    /// The routing key.
    #[arg(long, short = 'k', default_value = "")]
    routing_key: String,

    /// A header, as KEY=VALUE (a string); repeatable.
    #[arg(long = "header", short = 'H', value_name = "KEY=VALUE")]
    headers: Vec<String>,

    /// The content-type property, e.g. application/json.
    #[arg(long, value_name = "TYPE")]
    content_type: Option<String>,

    /// Marks the message persistent (delivery mode 2).
    #[arg(long)]
    persistent: bool,

    /// Publishes the message N times (each confirmed), for load and smoke
    /// tests.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,

    /// Paces --count at this many messages per second (default: as fast as
    /// the broker confirms).
    #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
    rate: Option<f64>,

    /// The body; `-` reads it from stdin.
    body: String,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of messages per second; write e.g. --rate 500"
        )),
    }
}

/// What became of the messages published.
#[derive(Debug, Default)]
struct Tally {
    confirmed: u64,
    returned: u64,
    nacked: u64,
    /// The first return's reply code and text, for the report.
    first_return: Option<(u16, String)>,
}

impl Tally {
    fn add(&mut self, outcome: Confirmation) {
        match outcome {
            Confirmation::Ack(None) | Confirmation::NotRequested => self.confirmed += 1,
            Confirmation::Ack(Some(returned)) => {
                self.returned += 1;
                self.first_return
                    .get_or_insert((returned.reply_code, returned.reply_text.to_string()));
            }
            Confirmation::Nack(_) => self.nacked += 1,
        }
    }

    /// Nacks outrank returns: a nack means the broker lost track of the
    /// message, a return only that nothing wanted it.
    fn exit_code(&self) -> ExitCode {
        if self.nacked > 0 {
            ExitCode::from(EXIT_NACKED)
        } else if self.returned > 0 {
            ExitCode::from(EXIT_RETURNED)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Publishes and reports; the exit code says what happened.
pub(crate) fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let body = if args.body == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the body from stdin")?;
        buf
    } else {
        args.body.clone().into_bytes()
    };
    let mut headers = FieldTable::default();
    for header in &args.headers {
        let Some((k, v)) = header.split_once('=') else {
            bail!("--header {header:?} is not KEY=VALUE; write e.g. --header tenant=acme");
        };
        if k.is_empty() {
            bail!("--header {header:?} has an empty key; write e.g. --header tenant=acme");
        }
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let mut properties = BasicProperties::default();
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    if let Some(t) = &args.content_type {
        properties = properties.with_content_type(t.as_str().into());
    }
    if args.persistent {
        properties = properties.with_delivery_mode(2);
    }
    runtime()?.block_on(publish(&args, &body, properties))
}

async fn publish(
    args: &PublishArgs,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<ExitCode> {
    let conn = args.url.connect().await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let exchange = &args.exchange;
    let key = &args.routing_key;
    let target = format!("exchange {exchange:?} with routing key {key:?}");
    let doing = format!("publishing to {target}");
    let entity = format!("exchange {exchange:?}");
    let started = Instant::now();
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::new();
    let mut tally = Tally::default();
    for i in 0..args.count {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if pending.len() >= IN_FLIGHT {
            if let Some(confirm) = pending.pop_front() {
                tally.add(confirm.await.map_err(|e| explain(e, &doing, &entity))?);
            }
        }
        let confirm = ch
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.clone(),
            )
            .await
            .map_err(|e| explain(e, &doing, &entity))?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        tally.add(confirm.await.map_err(|e| explain(e, &doing, &entity))?);
    }
    let elapsed = started.elapsed();
    let _ = conn.close(200, "bye".into()).await;
    if args.count == 1 {
        report_one(&tally, body.len(), &target);
    } else {
        report_many(&tally, args.count, body.len(), &target, elapsed);
    }
    Ok(tally.exit_code())
}

fn report_one(tally: &Tally, bytes: usize, target: &str) {
    if tally.nacked > 0 {
        println!("nacked: the broker did not take the message published to {target}");
    } else if let Some((code, text)) = &tally.first_return {
        println!(
            "returned: unroutable ({code} {text}): no queue is bound to {target}; the message was dropped"
        );
    } else {
        println!("confirmed: {bytes} bytes published to {target}");
    }
}

fn report_many(tally: &Tally, count: u64, bytes: usize, target: &str, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "published {count} messages of {bytes} bytes to {target} in {secs:.3} s ({:.0} msg/s): {} confirmed, {} returned as unroutable, {} nacked",
        count as f64 / secs,
        tally.confirmed,
        tally.returned,
        tally.nacked
    );
    if let Some((code, text)) = &tally.first_return {
        println!("returned: {code} {text}: no queue is bound to {target}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_positive_finite_numbers() {
        assert_eq!(parse_rate("250"), Ok(250.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "fast"] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains("--rate 500"), "{bad}: {err}");
        }
    }

    #[test]
    fn nacks_outrank_returns_in_the_exit_code() {
        let mut tally = Tally::default();
        assert_eq!(tally.exit_code(), ExitCode::SUCCESS);
        tally.returned = 1;
        assert_eq!(tally.exit_code(), ExitCode::from(EXIT_RETURNED));
        tally.nacked = 1;
        assert_eq!(tally.exit_code(), ExitCode::from(EXIT_NACKED));
    }
}
