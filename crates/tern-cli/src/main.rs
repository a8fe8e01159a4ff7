//! `tern`: the command-line entry point of Tern.
//!
//! `tern serve` runs the broker: AMQP 0-9-1 on `127.0.0.1:5672` and the
//! management HTTP API on `127.0.0.1:15672` over a durable data directory
//! (`./tern-data`), until SIGINT or SIGTERM, when it
//! stops accepting, closes open connections, flushes and fsyncs the store and
//! exits 0. Its configuration merges flags, `TERN_*` variables and a TOML
//! file (`config.rs`).
//!
//! The operator commands talk to a running broker named by one `--url`
//! (`TERN_URL`; `endpoint.rs`), an AMQP or a management API URL: `tern
//! publish`, `tern tail` and `tern dlq list|show|redrive` over AMQP; `tern
//! list` (and `tern queues|exchanges|bindings|connections|consumers list`),
//! `tern declare`, `tern delete` and `tern purge` manage the topology, and
//! `tern users`, `tern permissions` and `tern vhosts` access, through the
//! management HTTP API.
//! `tern completions SHELL` prints a shell completion script.
//!
//! Errors end the process with exit code 1 and one line on stderr that says
//! what went wrong and what to change (`tern publish` has more codes, for
//! what became of the message).

mod access;
mod api_client;
mod config;
mod dlq;
mod endpoint;
mod limits;
mod manage;
mod operator;
mod progress;
mod publish;
mod serve;
mod tail;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::manage::Listable;

/// Tern: a durable, RabbitMQ-compatible message broker.
#[derive(Debug, Parser)]
#[command(name = "tern", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the broker until SIGINT or SIGTERM.
    Serve(config::ServeArgs),
    /// Publishes a message (`tern publish EXCHANGE ROUTING_KEY BODY`) and
    /// waits for the broker's confirm.
    ///
    /// Exit codes: 0 confirmed, 1 error, 3 returned as unroutable, 4 nacked.
    Publish(publish::PublishArgs),
    /// Prints messages from an exchange (through a temporary queue) or
    /// consumes them from a queue.
    Tail(tail::TailArgs),
    /// Inspects and redrives dead-letter queues.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Lists queues, exchanges, bindings, connections, channels, consumers
    /// or vhosts (through the management HTTP API).
    List(manage::ListArgs),
    /// Lists queues, with their depth and consumers (`tern queues list`).
    Queues {
        #[command(subcommand)]
        command: manage::KindCommand,
    },
    /// Lists exchanges, with their type (`tern exchanges list`).
    Exchanges {
        #[command(subcommand)]
        command: manage::KindCommand,
    },
    /// Lists bindings (`tern bindings list`).
    Bindings {
        #[command(subcommand)]
        command: manage::KindCommand,
    },
    /// Lists client connections (`tern connections list`).
    Connections {
        #[command(subcommand)]
        command: manage::KindCommand,
    },
    /// Lists consumers, with their queue and prefetch (`tern consumers list`).
    Consumers {
        #[command(subcommand)]
        command: manage::KindCommand,
    },
    /// Declares a queue, an exchange or a binding.
    Declare {
        #[command(subcommand)]
        command: manage::DeclareCommand,
    },
    /// Deletes a queue, an exchange or a binding.
    Delete {
        #[command(subcommand)]
        command: manage::DeleteCommand,
    },
    /// Removes every ready message from a queue.
    Purge(manage::PurgeArgs),
    /// Manages the broker's users (over the HTTP API, as an administrator).
    Users {
        #[command(subcommand)]
        command: access::UsersCommand,
    },
    /// Manages users' permissions in vhosts (over the HTTP API).
    Permissions {
        #[command(subcommand)]
        command: access::PermissionsCommand,
    },
    /// Manages vhosts (over the HTTP API).
    Vhosts {
        #[command(subcommand)]
        command: access::VhostsCommand,
    },
    /// Prints a completion script for SHELL to stdout.
    ///
    /// For bash: `tern completions bash > ~/.local/share/bash-completion/completions/tern`.
    Completions {
        /// The shell to write completions for.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(&args),
        Command::Publish(args) => publish::run(args),
        Command::Tail(args) => tail::run(args),
        Command::Dlq { command } => dlq::run(command),
        Command::List(args) => manage::list(args),
        Command::Queues { command } => manage::list_command(Listable::Queues, command),
        Command::Exchanges { command } => manage::list_command(Listable::Exchanges, command),
        Command::Bindings { command } => manage::list_command(Listable::Bindings, command),
        Command::Connections { command } => manage::list_command(Listable::Connections, command),
        Command::Consumers { command } => manage::list_command(Listable::Consumers, command),
        Command::Declare { command } => manage::declare(command),
        Command::Delete { command } => manage::delete(command),
        Command::Purge(args) => manage::purge(args),
        Command::Users { command } => access::run_users(command),
        Command::Permissions { command } => access::run_permissions(command),
        Command::Vhosts { command } => access::run_vhosts(command),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tern", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn an error into a
            // panic.
            let _ = writeln!(std::io::stderr(), "tern: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: &config::ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    if args.print_config {
        print!("{}", config.to_toml()?);
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(config.log_format, &config.log_level);
    serve::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr in `format`, filtered by `filter` (already checked by
/// the configuration).
fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its definitions (clashing short options, say) only
    /// when a command is parsed; this checks every subcommand at once.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
