//! The configuration of `tern serve`: its flags, the TOML file `--config`
//! names, and how the two merge into one [`ServeConfig`].
//!
//! Precedence, highest first: a flag, its `TERN_*` variable (clap merges
//! these two), the file, the built-in default. The clap fields are all
//! `Option` without clap defaults, because a clap default would be
//! indistinguishable from a flag and would hide the file's value; defaults
//! are applied last, here.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::limits::{self, AlarmSettings, NumberOrText};

/// The built-in defaults, applied when neither flag, variable nor file
/// sets a value.
const DEFAULT_DATA_DIR: &str = "./tern-data";
const DEFAULT_AMQP_ADDR: &str = "127.0.0.1:5672";
const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:15672";
const DEFAULT_AMQPS_ADDR: &str = "127.0.0.1:5671";
const DEFAULT_LOG_LEVEL: &str = "info";

/// The keys a configuration file may hold, for error hints.
const FILE_KEYS: &str =
    "data_dir, amqp_addr, http_addr, http_token, log_format, log_level, amqps_addr, tls_cert, tls_key, vm_memory_high_watermark, disk_free_limit";

/// Flags of `tern serve`. Each has an environment variable; a flag given on
/// the command line wins over the variable, which wins over the file.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A TOML configuration file; flags and `TERN_*` variables override
    /// its keys (data_dir, amqp_addr, http_addr, http_token, log_format,
    /// log_level, amqps_addr, tls_cert, tls_key, vm_memory_high_watermark,
    /// disk_free_limit).
    #[arg(long, env = "TERN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Prints the effective configuration as TOML (the token redacted) and
    /// exits.
    #[arg(long)]
    pub(crate) print_config: bool,

    /// Directory holding the broker's durable data; created if missing
    /// [default: ./tern-data].
    #[arg(long, env = "TERN_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Address to accept AMQP 0-9-1 connections on; port 0 picks a free
    /// port [default: 127.0.0.1:5672].
    #[arg(long, env = "TERN_AMQP_ADDR", value_name = "HOST:PORT")]
    amqp_addr: Option<String>,

    /// Address to serve the management HTTP API and /metrics on; port 0
    /// picks a free port [default: 127.0.0.1:15672].
    #[arg(long, env = "TERN_HTTP_ADDR", value_name = "HOST:PORT")]
    http_addr: Option<String>,

    /// A bearer token the HTTP API accepts besides guest/guest (set it
    /// through the environment or the file, so that it does not show in
    /// `ps`).
    #[arg(
        long,
        env = "TERN_HTTP_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    http_token: Option<String>,

    /// How logs are written to stderr: `pretty` (human-readable, coloured
    /// on a terminal) or `json` (one JSON object per line) [default:
    /// pretty].
    #[arg(long, env = "TERN_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    /// Which logs are written: a level (error, warn, info, debug, trace,
    /// off) or `tracing` directives such as `info,tern_amqp=debug`.
    /// `RUST_LOG` is read when neither this flag nor its variable is set
    /// [default: info].
    #[arg(long, env = "TERN_LOG_LEVEL", value_name = "FILTER")]
    log_level: Option<String>,

    /// Address to accept AMQP over TLS (AMQPS) on; the listener starts only
    /// when --tls-cert and --tls-key are set [default: 127.0.0.1:5671].
    #[arg(long, env = "TERN_AMQPS_ADDR", value_name = "HOST:PORT")]
    amqps_addr: Option<String>,

    /// PEM file with the server's TLS certificate chain (its own
    /// certificate first), for AMQPS; needs --tls-key.
    #[arg(long, env = "TERN_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TERN_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,

    /// Memory alarm: publishers are blocked while the broker's resident
    /// memory is above this fraction of the machine's memory (0.4) or size
    /// (2GiB) [default: 0.4].
    #[arg(
        long,
        env = "TERN_VM_MEMORY_HIGH_WATERMARK",
        value_name = "FRACTION|SIZE"
    )]
    vm_memory_high_watermark: Option<String>,

    /// Disk alarm: publishers are blocked while the data directory's file
    /// system has less free space than this (kB, MB, GB, KiB, MiB, GiB...)
    /// [default: 50MB].
    #[arg(long, env = "TERN_DISK_FREE_LIMIT", value_name = "SIZE")]
    disk_free_limit: Option<String>,
}

/// The format of the logs on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines, coloured when stderr is a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The keys of a configuration file; every one optional, none other
/// allowed (a misspelt key is an error rather than silently ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    amqp_addr: Option<String>,
    http_addr: Option<String>,
    http_token: Option<String>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    amqps_addr: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    vm_memory_high_watermark: Option<NumberOrText>,
    disk_free_limit: Option<NumberOrText>,
}

/// The effective configuration of `tern serve`, every value resolved.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServeConfig {
    pub(crate) data_dir: PathBuf,
    pub(crate) amqp_addr: String,
    pub(crate) http_addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) http_token: Option<String>,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    /// AMQPS: set only when both a certificate and a key are.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) tls: Option<TlsSettings>,
    #[serde(flatten)]
    pub(crate) alarms: AlarmSettings,
}

/// Where AMQPS listens and the PEM files it serves.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TlsSettings {
    pub(crate) amqps_addr: String,
    pub(crate) tls_cert: PathBuf,
    pub(crate) tls_key: PathBuf,
}

/// Where a value came from, so that an invalid one is reported with what
/// to change.
#[derive(Debug, Clone, Copy)]
enum Origin<'a> {
    /// A flag or its variable.
    Flag {
        flag: &'static str,
        env: &'static str,
    },
    /// `RUST_LOG`.
    RustLog,
    /// A key in the configuration file.
    File(&'a Path),
    Default,
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag { flag, env } => write!(f, "{flag} (or {env})"),
            Origin::RustLog => f.write_str("RUST_LOG"),
            Origin::File(path) => write!(f, "the configuration file {}", path.display()),
            Origin::Default => f.write_str("the default"),
        }
    }
}

/// The value of one setting and where it came from: the flag (or its
/// variable), else the file, else nothing.
fn pick<'a, T>(
    flag: Option<T>,
    names: (&'static str, &'static str),
    file: Option<T>,
    path: Option<&'a Path>,
) -> Option<(T, Origin<'a>)> {
    let (flag_name, env) = names;
    match (flag, file, path) {
        (Some(v), _, _) => Some((
            v,
            Origin::Flag {
                flag: flag_name,
                env,
            },
        )),
        (None, Some(v), Some(path)) => Some((v, Origin::File(path))),
        _ => None,
    }
}

impl ServeArgs {
    /// Reads the file (if any) and merges it under the flags and the
    /// environment, then applies the defaults and checks every value.
    pub(crate) fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let path = self.config.as_deref();
        let key = |name: &str, origin: Origin<'_>| match origin {
            Origin::File(_) => format!("{origin}: key `{name}`"),
            other => other.to_string(),
        };

        let (data_dir, origin) = pick(
            self.data_dir.clone(),
            ("--data-dir", "TERN_DATA_DIR"),
            file.data_dir,
            path,
        )
        .unwrap_or((PathBuf::from(DEFAULT_DATA_DIR), Origin::Default));
        if data_dir.as_os_str().is_empty() {
            bail!(
                "{}: the data directory is empty; give a directory, e.g. \"{DEFAULT_DATA_DIR}\"",
                key("data_dir", origin)
            );
        }

        let mut addrs = Vec::new();
        for (name, flag, env, from_flag, from_file, default) in [
            (
                "amqp_addr",
                "--amqp-addr",
                "TERN_AMQP_ADDR",
                &self.amqp_addr,
                file.amqp_addr.clone(),
                DEFAULT_AMQP_ADDR,
            ),
            (
                "http_addr",
                "--http-addr",
                "TERN_HTTP_ADDR",
                &self.http_addr,
                file.http_addr.clone(),
                DEFAULT_HTTP_ADDR,
            ),
        ] {
            let (addr, origin) = pick(from_flag.clone(), (flag, env), from_file, path)
                .unwrap_or((default.to_string(), Origin::Default));
            if !is_host_port(&addr) {
                bail!(
                    "{}: {addr:?} is not a HOST:PORT address; write e.g. \"{default}\" (port 0 picks a free one)",
                    key(name, origin)
                );
            }
            addrs.push(addr);
        }
        let http_addr = addrs.pop().unwrap_or_default();
        let amqp_addr = addrs.pop().unwrap_or_default();

        let token = pick(
            self.http_token.clone(),
            ("--http-token", "TERN_HTTP_TOKEN"),
            file.http_token,
            path,
        );
        if let Some((token, origin)) = &token {
            if token.trim().is_empty() {
                bail!(
                    "{}: the HTTP token is empty; set a non-empty secret or leave it out",
                    key("http_token", *origin)
                );
            }
        }

        let log_format = pick(
            self.log_format,
            ("--log-format", "TERN_LOG_FORMAT"),
            file.log_format,
            path,
        )
        .map_or(LogFormat::Pretty, |(f, _)| f);

        let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
        let (log_level, origin) = match (&self.log_level, rust_log) {
            (Some(level), _) => (
                level.clone(),
                Origin::Flag {
                    flag: "--log-level",
                    env: "TERN_LOG_LEVEL",
                },
            ),
            (None, Some(level)) => (level, Origin::RustLog),
            (None, None) => match (file.log_level, path) {
                (Some(level), Some(path)) => (level, Origin::File(path)),
                _ => (DEFAULT_LOG_LEVEL.to_string(), Origin::Default),
            },
        };
        if let Err(why) = check_log_level(&log_level) {
            bail!(
                "{}: {log_level:?} is not a log filter: {why}; write a level (error, warn, info, debug, trace, off) or directives such as \"info,tern_amqp=debug\"",
                key("log_level", origin)
            );
        }

        let tls = resolve_tls(
            pick(
                self.amqps_addr.clone(),
                ("--amqps-addr", "TERN_AMQPS_ADDR"),
                file.amqps_addr,
                path,
            ),
            pick(
                self.tls_cert.clone(),
                ("--tls-cert", "TERN_TLS_CERT"),
                file.tls_cert,
                path,
            ),
            pick(
                self.tls_key.clone(),
                ("--tls-key", "TERN_TLS_KEY"),
                file.tls_key,
                path,
            ),
        )?;

        let (watermark, watermark_origin) = pick(
            self.vm_memory_high_watermark.clone(),
            (
                "--vm-memory-high-watermark",
                "TERN_VM_MEMORY_HIGH_WATERMARK",
            ),
            file.vm_memory_high_watermark.map(NumberOrText::into_text),
            path,
        )
        .unwrap_or((limits::DEFAULT_WATERMARK.to_string(), Origin::Default));
        let memory = limits::parse_watermark(&watermark).map_err(|why| {
            anyhow::anyhow!(
                "{}: {why}",
                key("vm_memory_high_watermark", watermark_origin)
            )
        })?;
        let (disk_free_limit, disk_origin) = pick(
            self.disk_free_limit.clone(),
            ("--disk-free-limit", "TERN_DISK_FREE_LIMIT"),
            file.disk_free_limit.map(NumberOrText::into_text),
            path,
        )
        .unwrap_or((limits::DEFAULT_DISK_FREE_LIMIT.to_string(), Origin::Default));
        let disk_free = limits::parse_size(&disk_free_limit).map_err(|why| {
            anyhow::anyhow!(
                "{}: {why}; write a size such as \"{}\"",
                key("disk_free_limit", disk_origin),
                limits::DEFAULT_DISK_FREE_LIMIT
            )
        })?;

        Ok(ServeConfig {
            data_dir,
            amqp_addr,
            http_addr,
            http_token: token.map(|(t, _)| t),
            log_format,
            log_level,
            tls,
            alarms: AlarmSettings {
                vm_memory_high_watermark: watermark,
                disk_free_limit,
                limits: tern_broker::alarm::AlarmLimits {
                    memory,
                    disk_free,
                    ..Default::default()
                },
            },
        })
    }
}

impl ServeConfig {
    /// The configuration as TOML, with the token replaced by `<redacted>`.
    pub(crate) fn to_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        if shown.http_token.is_some() {
            shown.http_token = Some("<redacted>".to_string());
        }
        let body = toml::to_string(&shown).context("rendering the configuration as TOML")?;
        Ok(format!(
            "# the effective configuration of `tern serve`\n# (flags > TERN_* variables > --config file > defaults)\n{body}"
        ))
    }
}

/// Reads and parses a configuration file; errors name the file, the line,
/// the key and what to write instead.
fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the configuration file {}; check the --config (or TERN_CONFIG) path",
            path.display()
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        let mut at = String::new();
        let mut key = None;
        if let Some(span) = e.span() {
            let before = text.get(..span.start).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            at = format!(":{line}");
            let line_text = text.lines().nth(line - 1).unwrap_or("");
            key = line_text
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_string())
                .filter(|k| !k.is_empty());
        }
        let message = e.message().trim().replace('\n', " ");
        let key = key.map(|k| format!("key `{k}`: ")).unwrap_or_default();
        let fix = if message.starts_with("unknown field") {
            format!("remove the key or correct its spelling (the keys are {FILE_KEYS})")
        } else {
            "fix the value on that line (`tern serve --help` says what each key takes)".to_string()
        };
        anyhow::anyhow!(
            "invalid configuration file {}{at}: {key}{message}; {fix}",
            path.display()
        )
    })
}

/// AMQPS needs a certificate and its key together; the address alone, or
/// one file without the other, is a mistake rather than a plain-only start.
fn resolve_tls(
    addr: Option<(String, Origin<'_>)>,
    cert: Option<(PathBuf, Origin<'_>)>,
    key: Option<(PathBuf, Origin<'_>)>,
) -> anyhow::Result<Option<TlsSettings>> {
    let (cert, key) = match (cert, key) {
        (Some((cert, _)), Some((key, _))) => (cert, key),
        (Some((_, origin)), None) => bail!(
            "{origin} sets a TLS certificate but no private key is set; give its key with --tls-key PATH, TERN_TLS_KEY or `tls_key` in the --config file"
        ),
        (None, Some((_, origin))) => bail!(
            "{origin} sets a TLS private key but no certificate is set; give the certificate with --tls-cert PATH, TERN_TLS_CERT or `tls_cert` in the --config file"
        ),
        (None, None) => match addr {
            Some((addr, origin)) => bail!(
                "{origin} asks for AMQPS on {addr:?} but no TLS certificate and key are set; give them with --tls-cert and --tls-key (or TERN_TLS_CERT and TERN_TLS_KEY, or `tls_cert` and `tls_key` in the --config file)"
            ),
            None => return Ok(None),
        },
    };
    let (amqps_addr, origin) = addr.unwrap_or((DEFAULT_AMQPS_ADDR.to_string(), Origin::Default));
    if !is_host_port(&amqps_addr) {
        bail!(
            "{origin}: {amqps_addr:?} is not a HOST:PORT address; write e.g. \"{DEFAULT_AMQPS_ADDR}\" (port 0 picks a free one)"
        );
    }
    Ok(Some(TlsSettings {
        amqps_addr,
        tls_cert: cert,
        tls_key: key,
    }))
}

/// Whether `addr` looks like HOST:PORT: an IP socket address, or a
/// non-empty host name and a port number (resolved later).
fn is_host_port(addr: &str) -> bool {
    if addr.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(|c: char| c.is_whitespace() || c == '/')
                && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// Checks a log filter: every comma-separated part is a level name or a
/// `target=level` directive. `EnvFilter` alone would take any word as a
/// target name, so a misspelt level would silently log nothing.
fn check_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if filter.trim().is_empty() {
        return Err("it is empty".to_string());
    }
    for part in filter.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let level = part.rsplit_once('=').map_or(part, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{level:?} is not a level"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{check_log_level, is_host_port};

    #[test]
    fn addresses_are_host_and_port() {
        for good in [
            "127.0.0.1:0",
            "[::1]:5672",
            "localhost:5672",
            "broker.internal:1",
        ] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "localhost",
            ":5672",
            "host:",
            "host:65536",
            "a b:1",
            "http://h:1",
            "",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn log_filters_are_levels_or_directives() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,tern_amqp=debug",
            "tern_broker=trace",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good}");
        }
        for bad in ["", "verbose", "info,tern_amqp=loud", "tern_amqp"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }
}
