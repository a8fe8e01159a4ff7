//! `tern list KIND` (also spelt `tern queues list`, `tern exchanges list`,
//! …), `tern declare`, `tern delete` and `tern purge`: the
//! broker's topology from a shell or a script, through the management HTTP
//! API (listing has no AMQP method, and one path for all four keeps their
//! errors alike).
//!
//! Lists print a table for people and, with `--json`, the API's own JSON
//! for scripts. Declarations are idempotent as in AMQP: declaring what
//! exists with the same properties succeeds and says so.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};

use crate::api_client::{segment, Answer, ApiClient};
use crate::endpoint::Endpoint;
use crate::operator::{emit, runtime};

/// What `tern list` can list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Listable {
    /// Queues, with their depth and consumers.
    Queues,
    /// Exchanges, with their type.
    Exchanges,
    /// Bindings from exchanges to queues and exchanges.
    Bindings,
    /// Open client connections.
    Connections,
    /// Open channels.
    Channels,
    /// Consumers, with their queue and prefetch.
    Consumers,
    /// Virtual hosts, with their queue and message counts.
    Vhosts,
}

/// Arguments of `tern list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// What to list.
    what: Listable,
    #[command(flatten)]
    options: ListOptions,
}

/// `tern queues|exchanges|bindings|connections|consumers list`: the same
/// listing as `tern list KIND`, named the way operators say it.
#[derive(Debug, Subcommand)]
pub(crate) enum KindCommand {
    /// Lists them as an aligned table (or JSON with --json).
    List(ListOptions),
}

/// How to list, whatever the kind.
#[derive(Debug, Args)]
pub(crate) struct ListOptions {
    #[command(flatten)]
    api: Endpoint,
    /// Only this vhost (default: every vhost).
    #[arg(long)]
    vhost: Option<String>,
    /// Only entries whose name contains this text.
    #[arg(long)]
    name: Option<String>,
    /// Prints the API's JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where a declared or deleted thing lives.
#[derive(Debug, Clone, Args)]
pub(crate) struct Target {
    #[command(flatten)]
    api: Endpoint,
    /// The vhost.
    #[arg(long, default_value = "/")]
    vhost: String,
}

/// What `tern declare` can declare.
#[derive(Debug, Subcommand)]
pub(crate) enum DeclareCommand {
    /// Declares a queue (durable unless --transient).
    Queue {
        #[command(flatten)]
        target: Target,
        /// The queue's name.
        name: String,
        /// A queue that does not survive a broker restart.
        #[arg(long)]
        transient: bool,
        /// Deleted when its last consumer goes.
        #[arg(long)]
        auto_delete: bool,
        /// An argument, as KEY=VALUE (numbers and true/false become
        /// numbers and booleans), e.g. x-max-length=1000; repeatable.
        #[arg(long = "arg", short = 'a', value_name = "KEY=VALUE")]
        arguments: Vec<String>,
    },
    /// Declares an exchange (durable unless --transient).
    Exchange {
        #[command(flatten)]
        target: Target,
        /// The exchange's name.
        name: String,
        /// direct, fanout, topic, headers, x-delayed-message (with --arg
        /// x-delayed-type=KIND), x-message-deduplication or x-super-stream
        /// (with --arg x-partitions=N: creates the streams NAME-0..N-1).
        #[arg(long = "type", short = 't', default_value = "direct")]
        kind: String,
        /// An exchange that does not survive a broker restart.
        #[arg(long)]
        transient: bool,
        /// Deleted when its last binding goes.
        #[arg(long)]
        auto_delete: bool,
        /// Only other exchanges may publish to it.
        #[arg(long)]
        internal: bool,
        /// An argument, as KEY=VALUE; repeatable.
        #[arg(long = "arg", short = 'a', value_name = "KEY=VALUE")]
        arguments: Vec<String>,
    },
    /// Binds a queue (or, with --to-exchange, an exchange) to an exchange.
    Binding(BindingArgs),
}

/// A binding, as `declare binding` and `delete binding` name it.
#[derive(Debug, Args)]
pub(crate) struct BindingArgs {
    #[command(flatten)]
    target: Target,
    /// The exchange messages come from.
    #[arg(long)]
    source: String,
    /// The queue (or exchange) they go to.
    #[arg(long)]
    destination: String,
    /// The destination is an exchange, not a queue.
    #[arg(long)]
    to_exchange: bool,
    /// The binding key.
    #[arg(long, short = 'k', default_value = "")]
    routing_key: String,
    /// A binding argument, as KEY=VALUE (for headers exchanges); repeatable.
    #[arg(long = "arg", short = 'a', value_name = "KEY=VALUE")]
    arguments: Vec<String>,
}

/// What `tern delete` can delete.
#[derive(Debug, Subcommand)]
pub(crate) enum DeleteCommand {
    /// Deletes a queue and the messages in it.
    Queue {
        #[command(flatten)]
        target: Target,
        /// The queue's name.
        name: String,
        /// Refuses while the queue has consumers.
        #[arg(long)]
        if_unused: bool,
        /// Refuses while the queue holds messages.
        #[arg(long)]
        if_empty: bool,
    },
    /// Deletes an exchange and its bindings.
    Exchange {
        #[command(flatten)]
        target: Target,
        /// The exchange's name.
        name: String,
        /// Refuses while the exchange has bindings.
        #[arg(long)]
        if_unused: bool,
    },
    /// Removes the bindings from --source to --destination with this
    /// routing key (and, if given, these arguments).
    Binding(BindingArgs),
}

/// Arguments of `tern purge`.
#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    target: Target,
    /// The queue to empty of its ready messages.
    queue: String,
}

/// Runs `tern list KIND`.
pub(crate) fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    list_kind(args.what, &args.options)
}

/// Runs `tern KIND list`.
pub(crate) fn list_command(what: Listable, command: KindCommand) -> anyhow::Result<ExitCode> {
    match command {
        KindCommand::List(options) => list_kind(what, &options),
    }
}

fn list_kind(what: Listable, args: &ListOptions) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.api)?;
    runtime()?.block_on(async {
        let base = match what {
            Listable::Queues => "/api/queues",
            Listable::Exchanges => "/api/exchanges",
            Listable::Bindings => "/api/bindings",
            Listable::Connections => "/api/connections",
            Listable::Channels => "/api/channels",
            Listable::Consumers => "/api/consumers",
            Listable::Vhosts => "/api/vhosts",
        };
        let items = api.ok(Method::GET, base, None).await?;
        let Value::Array(items) = items else {
            bail!("GET {base}: the API answered something other than a JSON array");
        };
        let items: Vec<Value> = items
            .into_iter()
            .filter(|item| match &args.vhost {
                None => true,
                Some(v) => {
                    let own = match what {
                        Listable::Vhosts => item.get("name"),
                        _ => item.get("vhost"),
                    };
                    own.and_then(Value::as_str) == Some(v.as_str())
                }
            })
            .filter(|item| match &args.name {
                None => true,
                Some(part) => name_of(what, item).contains(part.as_str()),
            })
            .collect();
        let text = if args.json {
            format!("{}\n", Value::Array(items))
        } else {
            table(what, &items)
        };
        emit(&text)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The name an entry is filtered by.
fn name_of(what: Listable, item: &Value) -> String {
    let key = match what {
        Listable::Bindings => "source",
        Listable::Consumers => "consumer_tag",
        _ => "name",
    };
    cell(item, key)
}

/// A field as table text: strings bare, numbers and booleans as JSON,
/// nothing as `-`.
fn cell(item: &Value, key: &str) -> String {
    match item.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) if s.is_empty() => "\"\"".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) if m.is_empty() => "-".to_string(),
        Some(v) => v.to_string(),
    }
}

/// The columns shown for each kind, as (heading, JSON field).
fn columns(what: Listable) -> &'static [(&'static str, &'static str)] {
    match what {
        Listable::Queues => &[
            ("vhost", "vhost"),
            ("name", "name"),
            ("type", "type"),
            ("durable", "durable"),
            ("ready", "messages_ready"),
            ("unacked", "messages_unacknowledged"),
            ("consumers", "consumers"),
            ("arguments", "arguments"),
        ],
        Listable::Exchanges => &[
            ("vhost", "vhost"),
            ("name", "name"),
            ("type", "type"),
            ("durable", "durable"),
            ("auto_delete", "auto_delete"),
            ("internal", "internal"),
            ("arguments", "arguments"),
        ],
        Listable::Bindings => &[
            ("vhost", "vhost"),
            ("source", "source"),
            ("destination", "destination"),
            ("type", "destination_type"),
            ("routing_key", "routing_key"),
            ("arguments", "arguments"),
        ],
        Listable::Connections => &[
            ("name", "name"),
            ("user", "user"),
            ("vhost", "vhost"),
            ("peer", "peer_host"),
            ("channels", "channels"),
            ("protocol", "protocol"),
        ],
        Listable::Channels => &[
            ("name", "name"),
            ("vhost", "vhost"),
            ("consumers", "consumer_count"),
            ("unacked", "messages_unacknowledged"),
        ],
        Listable::Consumers => &[
            ("vhost", "vhost"),
            ("queue", "queue"),
            ("consumer_tag", "consumer_tag"),
            ("channel", "channel"),
            ("ack_mode", "ack_mode"),
            ("prefetch", "prefetch_count"),
        ],
        Listable::Vhosts => &[
            ("name", "name"),
            ("queues", "queues"),
            ("messages", "messages"),
            ("ready", "messages_ready"),
            ("unacked", "messages_unacknowledged"),
        ],
    }
}

/// A plain-text table, columns padded to their widest cell.
fn table(what: Listable, items: &[Value]) -> String {
    let cols = columns(what);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| cols.iter().map(|(_, key)| cell(item, key)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (heading, _))| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([heading.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    if items.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

/// `KEY=VALUE` arguments as a JSON object; values that read as JSON
/// numbers or booleans become those, anything else a string.
fn arguments(pairs: &[String]) -> anyhow::Result<Value> {
    let mut map = Map::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("--arg {pair:?} is not KEY=VALUE; write e.g. --arg x-max-length=1000");
        };
        if k.is_empty() {
            bail!("--arg {pair:?} has an empty key; write e.g. --arg x-max-length=1000");
        }
        let value = match serde_json::from_str::<Value>(v) {
            Ok(n @ (Value::Number(_) | Value::Bool(_))) => n,
            _ => Value::String(v.to_string()),
        };
        map.insert(k.to_string(), value);
    }
    Ok(Value::Object(map))
}

/// The exchange's name in an API path: the default exchange is
/// `amq.default` there, as in RabbitMQ's API.
fn exchange_segment(name: &str) -> String {
    segment(if name.is_empty() { "amq.default" } else { name })
}

/// Runs `tern declare`.
pub(crate) fn declare(command: DeclareCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let message = match command {
            DeclareCommand::Queue {
                target,
                name,
                transient,
                auto_delete,
                arguments: args,
            } => {
                let api = ApiClient::new(&target.api)?;
                let path = format!("/api/queues/{}/{}", segment(&target.vhost), segment(&name));
                let body = json!({
                    "durable": !transient,
                    "auto_delete": auto_delete,
                    "arguments": arguments(&args)?,
                });
                let status = call(&api, Method::PUT, &path, Some(&body)).await?.status;
                outcome(status, &format!("queue {name:?} in vhost {:?}", target.vhost))
            }
            DeclareCommand::Exchange {
                target,
                name,
                kind,
                transient,
                auto_delete,
                internal,
                arguments: args,
            } => {
                if name.is_empty() {
                    bail!("the default exchange (\"\") always exists and cannot be declared; name the exchange");
                }
                let api = ApiClient::new(&target.api)?;
                let path = format!(
                    "/api/exchanges/{}/{}",
                    segment(&target.vhost),
                    segment(&name)
                );
                let body = json!({
                    "type": kind,
                    "durable": !transient,
                    "auto_delete": auto_delete,
                    "internal": internal,
                    "arguments": arguments(&args)?,
                });
                let status = call(&api, Method::PUT, &path, Some(&body)).await?.status;
                outcome(
                    status,
                    &format!("{kind} exchange {name:?} in vhost {:?}", target.vhost),
                )
            }
            DeclareCommand::Binding(b) => {
                let api = ApiClient::new(&b.target.api)?;
                let path = binding_path(&b);
                let body = json!({
                    "routing_key": b.routing_key,
                    "arguments": arguments(&b.arguments)?,
                });
                call(&api, Method::POST, &path, Some(&body)).await?;
                format!("bound: {}\n", binding_text(&b))
            }
        };
        emit(&message)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Sends a request that must succeed, keeping its status (a declaration
/// reports 201 and 204 differently).
async fn call(
    api: &ApiClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let answer = api.send(method.clone(), path, body).await?;
    if answer.status.is_success() {
        Ok(answer)
    } else {
        Err(api.explain(&answer)).with_context(|| format!("{method} {path}"))
    }
}

fn outcome(status: StatusCode, what: &str) -> String {
    if status == StatusCode::CREATED {
        format!("declared: {what}\n")
    } else {
        format!("exists: {what} (with the same properties)\n")
    }
}

fn binding_path(b: &BindingArgs) -> String {
    format!(
        "/api/bindings/{}/e/{}/{}/{}",
        segment(&b.target.vhost),
        exchange_segment(&b.source),
        if b.to_exchange { "e" } else { "q" },
        segment(&b.destination)
    )
}

fn binding_text(b: &BindingArgs) -> String {
    format!(
        "exchange {:?} -> {} {:?} with routing key {:?} in vhost {:?}",
        b.source,
        if b.to_exchange { "exchange" } else { "queue" },
        b.destination,
        b.routing_key,
        b.target.vhost
    )
}

/// Runs `tern delete`.
pub(crate) fn delete(command: DeleteCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let message = match command {
            DeleteCommand::Queue {
                target,
                name,
                if_unused,
                if_empty,
            } => {
                let api = ApiClient::new(&target.api)?;
                let path = format!(
                    "/api/queues/{}/{}?if-unused={if_unused}&if-empty={if_empty}",
                    segment(&target.vhost),
                    segment(&name)
                );
                call(&api, Method::DELETE, &path, None).await?;
                format!("deleted: queue {name:?} in vhost {:?}\n", target.vhost)
            }
            DeleteCommand::Exchange {
                target,
                name,
                if_unused,
            } => {
                let api = ApiClient::new(&target.api)?;
                let path = format!(
                    "/api/exchanges/{}/{}?if-unused={if_unused}",
                    segment(&target.vhost),
                    exchange_segment(&name)
                );
                call(&api, Method::DELETE, &path, None).await?;
                format!("deleted: exchange {name:?} in vhost {:?}\n", target.vhost)
            }
            DeleteCommand::Binding(b) => {
                let api = ApiClient::new(&b.target.api)?;
                let path = binding_path(&b);
                let wanted = arguments(&b.arguments)?;
                let existing = api.ok(Method::GET, &path, None).await?;
                let keys: Vec<String> = existing
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| {
                        x.get("routing_key").and_then(Value::as_str) == Some(&b.routing_key)
                    })
                    .filter(|x| b.arguments.is_empty() || x.get("arguments") == Some(&wanted))
                    .filter_map(|x| x.get("properties_key").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect();
                if keys.is_empty() {
                    bail!(
                        "no binding {}; `tern list bindings` shows the bindings there are",
                        binding_text(&b)
                    );
                }
                for key in &keys {
                    call(
                        &api,
                        Method::DELETE,
                        &format!("{path}/{}", segment(key)),
                        None,
                    )
                    .await
                    .with_context(|| format!("unbinding {}", binding_text(&b)))?;
                }
                format!("unbound: {}\n", binding_text(&b))
            }
        };
        emit(&message)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Runs `tern purge`.
pub(crate) fn purge(args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::new(&args.target.api)?;
    runtime()?.block_on(async {
        let vhost = &args.target.vhost;
        let queue = &args.queue;
        let path = format!("/api/queues/{}/{}/contents", segment(vhost), segment(queue));
        let answer = call(&api, Method::DELETE, &path, None).await?;
        let count = answer.body.get("message_count").and_then(Value::as_u64);
        let text = match count {
            Some(n) => format!("purged: {n} messages from queue {queue:?} in vhost {vhost:?}\n"),
            None => format!("purged: queue {queue:?} in vhost {vhost:?}\n"),
        };
        emit(&text)?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_numbers_and_booleans_typed() {
        let args = arguments(&[
            "x-max-length=1000".to_string(),
            "x-single-active-consumer=true".to_string(),
            "x-dead-letter-exchange=dlx".to_string(),
            "x-queue-mode=".to_string(),
        ])
        .unwrap();
        assert_eq!(
            args,
            json!({
                "x-max-length": 1000,
                "x-single-active-consumer": true,
                "x-dead-letter-exchange": "dlx",
                "x-queue-mode": "",
            })
        );
        let err = arguments(&["novalue".to_string()]).unwrap_err().to_string();
        assert!(err.contains("not KEY=VALUE"), "{err}");
    }

    #[test]
    fn tables_pad_columns_and_say_when_empty() {
        let items = vec![
            json!({"vhost": "/", "name": "orders", "type": "classic", "durable": true,
                   "messages_ready": 12, "messages_unacknowledged": 0, "consumers": 1,
                   "arguments": {}}),
            json!({"vhost": "/", "name": "q", "type": "classic", "durable": false,
                   "messages_ready": 0, "messages_unacknowledged": 3, "consumers": 0,
                   "arguments": {"x-max-length": 5}}),
        ];
        let text = table(Listable::Queues, &items);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("vhost  name    type     durable"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("/      orders  classic  true"),
            "{text}"
        );
        assert!(lines[2].ends_with("{\"x-max-length\":5}"), "{text}");
        assert!(table(Listable::Queues, &[]).ends_with("(none)\n"));
    }

    #[test]
    fn the_default_exchange_is_amq_default_in_paths() {
        assert_eq!(exchange_segment(""), "amq.default");
        assert_eq!(exchange_segment("a/b"), "a%2Fb");
    }
}
