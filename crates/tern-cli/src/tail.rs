//! `tern tail`: prints messages as they arrive.
//!
//! On an exchange (`--exchange`) it declares an exclusive, auto-delete
//! queue bound with `--binding-key`, so it sees copies and takes nothing
//! from anyone. On a queue it would have to consume: AMQP cannot peek, and
//! a consumer that requeues would see the same messages again and again.
//! So tailing a queue takes and acknowledges its messages, and only with
//! `--consume`; without it the command refuses and points to the exchange
//! form.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

use crate::endpoint::Endpoint;
use crate::operator::{connect, emit, explain, message_json, message_text, runtime};

/// How many unacknowledged messages `--consume` lets the broker send ahead.
const PREFETCH: u16 = 100;

/// Arguments of `tern tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    url: Endpoint,

    /// The queue to consume from, or with --exchange the exchange to watch.
    name: String,

    /// NAME is an exchange: watch it through a temporary queue.
    #[arg(long)]
    exchange: bool,

    /// With --exchange: the binding key of the temporary queue (`#` sees
    /// everything on a topic exchange; a fanout exchange ignores it; a
    /// direct exchange needs the exact routing key).
    #[arg(long, value_name = "KEY", default_value = "#", requires = "exchange")]
    binding_key: String,

    /// NAME is a queue: consume its messages, acknowledging each once
    /// printed (they are gone from the queue afterwards).
    #[arg(long, conflicts_with = "exchange")]
    consume: bool,

    /// Stops after N messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,

    /// Prints one JSON object per message and line.
    #[arg(long)]
    json: bool,
}

/// Tails until `--count` messages or Ctrl-C.
pub(crate) fn run(args: TailArgs) -> anyhow::Result<ExitCode> {
    if !args.exchange && !args.consume {
        bail!(
            "tailing queue {:?} would take its messages (AMQP cannot read a queue without consuming it); pass --consume to take and acknowledge them, or watch copies of what is published with `tern tail --exchange EXCHANGE --binding-key KEY`",
            args.name
        );
    }
    runtime()?.block_on(async {
        tokio::select! {
            result = tail(&args) => result,
            _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
        }
    })
}

async fn tail(args: &TailArgs) -> anyhow::Result<ExitCode> {
    let conn = connect(&args.url).await?;
    let ch = conn.create_channel().await.context("opening a channel")?;
    let name = &args.name;
    let (queue, no_ack) = if args.exchange {
        let declared = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the temporary queue")?;
        let queue = declared.name().to_string();
        ch.queue_bind(
            queue.as_str().into(),
            name.as_str().into(),
            args.binding_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                &format!("binding to exchange {name:?}"),
                &format!("exchange {name:?}"),
            )
        })?;
        let _ = writeln!(
            std::io::stderr(),
            "tern: tailing exchange {name:?} with binding key {:?} (Ctrl-C stops)",
            args.binding_key
        );
        (queue, true)
    } else {
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("setting the prefetch")?;
        let _ = writeln!(
            std::io::stderr(),
            "tern: consuming queue {name:?} (Ctrl-C stops)"
        );
        (name.clone(), false)
    };
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "tern-tail".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                &format!("consuming from queue {queue:?}"),
                &format!("queue {queue:?}"),
            )
        })?;
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let Some(delivery) = consumer.next().await else {
            bail!("the broker ended the subscription to queue {queue:?}");
        };
        let delivery = delivery.context("receiving a message")?;
        seen += 1;
        let text = if args.json {
            format!("{}\n", message_json(&delivery))
        } else {
            message_text(&delivery, seen)
        };
        if !emit(&text)? {
            // Nobody reads any more: stop, leaving a queue's message
            // unacknowledged, so the broker requeues it.
            break;
        }
        if !no_ack {
            delivery
                .ack(BasicAckOptions::default())
                .await
                .with_context(|| format!("acknowledging a message from queue {queue:?}"))?;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(ExitCode::SUCCESS)
}
