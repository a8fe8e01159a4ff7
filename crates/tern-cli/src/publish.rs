//! `tern publish EXCHANGE ROUTING_KEY [BODY|-]`: a message (or `--count`
//! copies of it, paced by `--rate`, with a progress bar on a terminal),
//! published mandatory and with publisher confirms, and a report of what
//! became of it (confirmed, returned as unroutable, or nacked), each with its
//! own exit code.

use std::collections::VecDeque;
use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};

use crate::endpoint::Endpoint;
use crate::operator::{connect, explain, runtime};
use crate::progress::Progress;

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
    url: Endpoint,

    /// The exchange to publish to; "" is the default exchange, which
    /// routes to the queue named by the routing key. With -e or -k, the
    /// only positional argument is the body.
    #[arg(value_name = "EXCHANGE")]
    exchange_arg: Option<String>,

    /// The routing key.
    #[arg(value_name = "ROUTING_KEY")]
    routing_key_arg: Option<String>,

    /// The body; `-` or nothing reads it from stdin.
    #[arg(value_name = "BODY|-")]
    body_arg: Option<String>,

    /// The exchange, as a flag (then the positional argument is the body);
    /// "" (the default) is the default exchange.
    #[arg(long, short = 'e', value_name = "EXCHANGE")]
    exchange: Option<String>,

    /// The routing key, as a flag (then the positional argument is the
    /// body).
    #[arg(long, short = 'k', value_name = "ROUTING_KEY")]
    routing_key: Option<String>,

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
}

/// Where a message goes and what it says, from positionals or flags.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    exchange: String,
    routing_key: String,
    /// `None`: read stdin.
    body: Option<String>,
}

impl PublishArgs {
    /// `EXCHANGE ROUTING_KEY [BODY|-]`, or with `-e`/`-k` just `[BODY|-]`.
    fn target(&self) -> anyhow::Result<Target> {
        let positionals: Vec<&String> = [&self.exchange_arg, &self.routing_key_arg, &self.body_arg]
            .into_iter()
            .flatten()
            .collect();
        let body = |b: Option<&String>| b.filter(|b| b.as_str() != "-").cloned();
        if self.exchange.is_some() || self.routing_key.is_some() {
            if positionals.len() > 1 {
                bail!(
                    "with -e/--exchange or -k/--routing-key the only positional argument is the body, but {} were given; write e.g. `tern publish -k my-queue hello`, or `tern publish EXCHANGE ROUTING_KEY BODY` without the flags",
                    positionals.len()
                );
            }
            return Ok(Target {
                exchange: self.exchange.clone().unwrap_or_default(),
                routing_key: self.routing_key.clone().unwrap_or_default(),
                body: body(positionals.first().copied()),
            });
        }
        match positionals.as_slice() {
            [exchange, key, rest @ ..] => Ok(Target {
                exchange: (*exchange).clone(),
                routing_key: (*key).clone(),
                body: body(rest.first().copied()),
            }),
            _ => bail!(
                "give the exchange and the routing key: `tern publish EXCHANGE ROUTING_KEY [BODY|-]` (\"\" is the default exchange, e.g. `tern publish \"\" my-queue hello`), or -k ROUTING_KEY [BODY|-]"
            ),
        }
    }
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
    let target = args.target()?;
    let body = if let Some(body) = &target.body {
        body.clone().into_bytes()
    } else {
        if std::io::stdin().is_terminal() {
            bail!("no body given and stdin is a terminal; give BODY, or pipe it in with `-`");
        }
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the body from stdin")?;
        buf
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
    runtime()?.block_on(publish(&args, &target, &body, properties))
}

async fn publish(
    args: &PublishArgs,
    target: &Target,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<ExitCode> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    let exchange = &target.exchange;
    let key = &target.routing_key;
    let target = format!("exchange {exchange:?} with routing key {key:?}");
    let doing = format!("publishing to {target}");
    let entity = format!("exchange {exchange:?}");
    let started = Instant::now();
    let mut pending: VecDeque<PublisherConfirm> = VecDeque::new();
    let mut tally = Tally::default();
    let progress = Progress::new(args.count, "publishing");
    for i in 0..args.count {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if pending.len() >= IN_FLIGHT {
            if let Some(confirm) = pending.pop_front() {
                tally.add(confirm.await.map_err(|e| explain(e, &doing, &entity))?);
                progress.inc();
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
        progress.inc();
    }
    progress.finish();
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

    fn parse(args: &[&str]) -> PublishArgs {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            publish: PublishArgs,
        }
        let all = std::iter::once("publish").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(all).unwrap().publish
    }

    fn target(exchange: &str, key: &str, body: Option<&str>) -> Target {
        Target {
            exchange: exchange.into(),
            routing_key: key.into(),
            body: body.map(str::to_string),
        }
    }

    #[test]
    fn positionals_are_exchange_key_and_body() {
        assert_eq!(
            parse(&["orders", "new", "hi"]).target().unwrap(),
            target("orders", "new", Some("hi"))
        );
        assert_eq!(
            parse(&["", "q", "-"]).target().unwrap(),
            target("", "q", None)
        );
        assert_eq!(parse(&["", "q"]).target().unwrap(), target("", "q", None));
        let err = parse(&["hi"]).target().unwrap_err().to_string();
        assert!(err.contains("EXCHANGE ROUTING_KEY"), "{err}");
    }

    #[test]
    fn with_the_flags_the_positional_is_the_body() {
        assert_eq!(
            parse(&["-k", "q", "hi"]).target().unwrap(),
            target("", "q", Some("hi"))
        );
        assert_eq!(
            parse(&["-e", "x", "--routing-key", "k"]).target().unwrap(),
            target("x", "k", None)
        );
        let err = parse(&["-k", "q", "a", "b"])
            .target()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only positional argument is the body"),
            "{err}"
        );
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
