//! `tern`: the command-line entry point of Tern.
//!
//! `tern serve` runs the broker: AMQP 0-9-1 on `127.0.0.1:5672` over a
//! durable data directory (`./tern-data`), until SIGINT or SIGTERM, when it
//! stops accepting, closes open connections, flushes and fsyncs the store and
//! exits 0. `tern completions SHELL` prints a shell completion script.
//!
//! Errors end the process with exit code 1 and one line on stderr that says
//! what went wrong and what to change.

mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    Serve(serve::ServeArgs),
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
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            match serve::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tern: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tern", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters (`info` when unset).
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
