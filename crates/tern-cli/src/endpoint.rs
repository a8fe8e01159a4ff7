//! Which running broker an operator command talks to: one `--url`
//! (`TERN_URL`) on every command, either the AMQP URL
//! (`amqp://` or `amqps://USER:PASS@HOST:PORT/VHOST`) or the management
//! API's (`http://USER:PASS@HOST:PORT`), defaulting to the local broker as
//! `tern serve` starts it.
//!
//! Commands that speak AMQP (`publish`, `tail`, `dlq`) need an AMQP URL and
//! commands that speak HTTP (listings, declarations, users…) an HTTP one.
//! The other kind cannot be derived: the two listeners have independent
//! ports and the API does not publish the AMQP one. So given the wrong
//! kind, a command says which kind it needs and where `tern serve` prints
//! it. The older `--api` (`TERN_API_URL`) stays as an alias that names the
//! HTTP URL explicitly; it wins over `--url` for HTTP commands, which lets
//! one environment carry both (`TERN_URL=amqp://…` and
//! `TERN_API_URL=http://…`).

use std::fmt;

use anyhow::{anyhow, bail};
use clap::Args;

/// The local broker's AMQP URL, as `tern serve` starts it by default.
pub(crate) const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The local broker's management API, as `tern serve` starts it by default.
pub(crate) const DEFAULT_API_URL: &str = "http://guest:guest@127.0.0.1:15672";

/// The broker an operator command talks to.
#[derive(Debug, Clone, Args)]
pub(crate) struct Endpoint {
    /// The broker: its AMQP URL (amqp[s]://USER:PASS@HOST:PORT/VHOST) or its
    /// management API (http://USER:PASS@HOST:PORT) [default: the local
    /// broker, amqp://guest:guest@127.0.0.1:5672/%2f or
    /// http://guest:guest@127.0.0.1:15672, whichever the command speaks]
    #[arg(long, env = "TERN_URL", hide_env_values = true, value_name = "URL")]
    url: Option<String>,
    /// The management API's URL; an alias of --url for an http:// URL,
    /// taken before --url by commands that speak HTTP.
    #[arg(
        long = "api",
        env = "TERN_API_URL",
        hide_env_values = true,
        hide = true,
        value_name = "URL"
    )]
    api: Option<String>,
    /// A bearer token for the management API, sent instead of the URL's
    /// user and password (HTTP commands only).
    #[arg(long, env = "TERN_HTTP_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

/// A broker URL, by the protocol it speaks.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum BrokerUrl {
    /// `amqp://` or `amqps://`.
    Amqp(String),
    /// `http://`.
    Http(String),
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.as_str()))
    }
}

impl BrokerUrl {
    /// Sorts a URL by its scheme.
    pub(crate) fn parse(url: &str) -> anyhow::Result<BrokerUrl> {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("amqp" | "amqps") => Ok(BrokerUrl::Amqp(url.to_string())),
            Some("http") => Ok(BrokerUrl::Http(url.to_string())),
            Some("https") => bail!(
                "--url {}: the management API serves plain http:// only; put a TLS proxy's http:// side here, or use amqps:// for AMQP",
                redact(url)
            ),
            _ => bail!(
                "--url {} is neither an AMQP URL (amqp://USER:PASS@HOST:PORT/VHOST) nor a management API URL (http://USER:PASS@HOST:PORT)",
                redact(url)
            ),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            BrokerUrl::Amqp(u) | BrokerUrl::Http(u) => u,
        }
    }
}

impl Endpoint {
    /// The AMQP URL for a command that speaks AMQP.
    pub(crate) fn amqp(&self) -> anyhow::Result<String> {
        match self.url.as_deref().map(BrokerUrl::parse).transpose()? {
            Some(BrokerUrl::Amqp(url)) => Ok(url),
            Some(BrokerUrl::Http(url)) => Err(anyhow!(
                "this command speaks AMQP, but --url (or TERN_URL) is the management API's URL {}; give the broker's AMQP URL instead, e.g. amqp://USER:PASS@HOST:5672/%2f (`tern serve` prints it as \"AMQP listening on\")",
                redact(&url)
            )),
            None => Ok(DEFAULT_AMQP_URL.to_string()),
        }
    }

    /// The management API's URL for a command that speaks HTTP: `--api`,
    /// else an http:// `--url`, else the local broker's.
    pub(crate) fn http(&self) -> anyhow::Result<String> {
        if let Some(api) = &self.api {
            return Ok(api.clone());
        }
        match self.url.as_deref().map(BrokerUrl::parse).transpose()? {
            Some(BrokerUrl::Http(url)) => Ok(url),
            Some(BrokerUrl::Amqp(url)) => Err(anyhow!(
                "this command goes through the management HTTP API, but --url (or TERN_URL) is the AMQP URL {}; give the API's URL instead, e.g. http://USER:PASS@HOST:15672 (`tern serve` prints it as \"HTTP listening on\"), or set --api (TERN_API_URL) beside an AMQP TERN_URL",
                redact(&url)
            )),
            None => Ok(DEFAULT_API_URL.to_string()),
        }
    }
}

/// Replaces the password of a `scheme://user:pass@host/…` URL by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: Option<&str>, api: Option<&str>) -> Endpoint {
        Endpoint {
            url: url.map(str::to_string),
            api: api.map(str::to_string),
            token: None,
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:s3cret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("http://a:b@h:1"), "http://a:***@h:1");
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
        assert_eq!(redact("amqp://user@host"), "amqp://user@host");
    }

    #[test]
    fn without_a_url_each_command_gets_the_local_broker_in_its_protocol() {
        let e = endpoint(None, None);
        assert_eq!(e.amqp().unwrap(), DEFAULT_AMQP_URL);
        assert_eq!(e.http().unwrap(), DEFAULT_API_URL);
    }

    #[test]
    fn one_url_serves_the_commands_of_its_protocol_and_the_others_get_a_hint() {
        let e = endpoint(Some("amqps://u:s3cret@h:5671/v"), None);
        assert_eq!(e.amqp().unwrap(), "amqps://u:s3cret@h:5671/v");
        let err = e.http().unwrap_err().to_string();
        assert!(err.contains("management HTTP API"), "{err}");
        assert!(err.contains("http://USER:PASS@HOST:15672"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");

        let e = endpoint(Some("http://u:s3cret@h:15672"), None);
        assert_eq!(e.http().unwrap(), "http://u:s3cret@h:15672");
        let err = e.amqp().unwrap_err().to_string();
        assert!(
            err.contains("speaks AMQP") && err.contains("amqp://"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn the_api_alias_wins_for_http_commands_only() {
        let e = endpoint(Some("amqp://u:p@h:5672/%2f"), Some("http://u:p@h:9"));
        assert_eq!(e.http().unwrap(), "http://u:p@h:9");
        assert_eq!(e.amqp().unwrap(), "amqp://u:p@h:5672/%2f");
    }

    #[test]
    fn other_schemes_are_refused_with_both_forms() {
        for bad in ["ftp://h", "localhost:5672", "https://a:s3cret@h"] {
            let err = endpoint(Some(bad), None).amqp().unwrap_err();
            let err = err.to_string();
            assert!(err.contains("--url"), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }
}
