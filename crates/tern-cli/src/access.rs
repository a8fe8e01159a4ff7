//! `tern users`, `tern permissions` and `tern vhosts`: the broker's users,
//! their per-vhost permissions and the vhosts, managed through the HTTP
//! API of a running `tern serve` (as an administrator), in the manner of
//! `rabbitmqctl add_user` / `set_permissions` / `add_vhost`.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::api_client::{segment, ApiClient};
use crate::endpoint::Endpoint;
use crate::operator::{emit, runtime};

/// `tern users`.
#[derive(Debug, Subcommand)]
pub(crate) enum UsersCommand {
    /// Lists users and their tags.
    List(ListArgs),
    /// Creates a user (an error if it exists; see `passwd`).
    Add(UserAddArgs),
    /// Deletes a user and their permissions.
    Delete(NameArgs),
    /// Changes a user's password.
    Passwd(PasswdArgs),
}

/// `tern permissions`.
#[derive(Debug, Subcommand)]
pub(crate) enum PermissionsCommand {
    /// Lists permissions (every vhost, or --vhost's).
    List(PermissionListArgs),
    /// Sets a user's configure, write and read patterns in a vhost.
    Set(PermissionSetArgs),
    /// Removes a user's permissions in a vhost.
    Clear(PermissionClearArgs),
}

/// `tern vhosts`.
#[derive(Debug, Subcommand)]
pub(crate) enum VhostsCommand {
    /// Lists vhosts.
    List(ListArgs),
    /// Creates a vhost.
    Add(NameArgs),
    /// Deletes a vhost with everything in it (queues, messages, permissions).
    Delete(NameArgs),
}

/// A listing.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    api: Endpoint,
    /// Prints the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A command on one named user or vhost.
#[derive(Debug, Args)]
pub(crate) struct NameArgs {
    #[command(flatten)]
    api: Endpoint,
    /// The name.
    name: String,
}

/// `tern users add`.
#[derive(Debug, Args)]
pub(crate) struct UserAddArgs {
    #[command(flatten)]
    api: Endpoint,
    /// The user's name.
    name: String,
    /// The password (read from the first line of stdin if not given, which
    /// keeps it out of the process list).
    #[arg(long)]
    password: Option<String>,
    /// Comma-separated tags: administrator, management, monitoring, policymaker.
    #[arg(long, default_value = "")]
    tags: String,
}

/// `tern users passwd`.
#[derive(Debug, Args)]
pub(crate) struct PasswdArgs {
    #[command(flatten)]
    api: Endpoint,
    /// The user's name.
    name: String,
    /// The new password (read from the first line of stdin if not given).
    #[arg(long)]
    password: Option<String>,
}

/// `tern permissions list`.
#[derive(Debug, Args)]
pub(crate) struct PermissionListArgs {
    #[command(flatten)]
    api: Endpoint,
    /// Only this vhost.
    #[arg(long)]
    vhost: Option<String>,
    /// Prints the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `tern permissions set`.
#[derive(Debug, Args)]
pub(crate) struct PermissionSetArgs {
    #[command(flatten)]
    api: Endpoint,
    /// The vhost.
    #[arg(long, default_value = "/")]
    vhost: String,
    /// The user.
    user: String,
    /// The configure pattern (a regex matched anywhere in a name; "" grants nothing).
    configure: String,
    /// The write pattern.
    write: String,
    /// The read pattern.
    read: String,
}

/// `tern permissions clear`.
#[derive(Debug, Args)]
pub(crate) struct PermissionClearArgs {
    #[command(flatten)]
    api: Endpoint,
    /// The vhost.
    #[arg(long, default_value = "/")]
    vhost: String,
    /// The user.
    user: String,
}

/// The password from the flag, or the first line of stdin.
fn password(flag: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let p = line.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        bail!("no password: give --password, or the password as the first line of stdin");
    }
    Ok(p)
}

fn tags_text(v: &Value) -> String {
    v["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn print_json(v: &Value) -> anyhow::Result<ExitCode> {
    emit(&format!("{v}\n"))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_users(command: UsersCommand) -> anyhow::Result<ExitCode> {
    // Read before the runtime starts: stdin is blocking.
    let secret = match &command {
        UsersCommand::Add(a) => Some(password(a.password.clone())?),
        UsersCommand::Passwd(a) => Some(password(a.password.clone())?),
        _ => None,
    };
    runtime()?.block_on(async move {
        match command {
            UsersCommand::List(a) => {
                let users = ApiClient::new(&a.api)?
                    .ok(Method::GET, "/api/users", None)
                    .await?;
                if a.json {
                    return print_json(&users);
                }
                let mut out = String::from("NAME\tTAGS\n");
                for u in users.as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{}\t{}\n",
                        u["name"].as_str().unwrap_or_default(),
                        tags_text(u)
                    ));
                }
                emit(&out)?;
            }
            UsersCommand::Add(a) => {
                let api = ApiClient::new(&a.api)?;
                let path = format!("/api/users/{}", segment(&a.name));
                let existing = api.send(Method::GET, &path, None).await?;
                match existing.status {
                    StatusCode::OK => bail!(
                        "user '{}' exists; change its password with `tern users passwd {}`",
                        a.name,
                        a.name
                    ),
                    StatusCode::NOT_FOUND => {}
                    _ => return Err(api.explain(&existing)),
                }
                let body = json!({"password": secret, "tags": a.tags});
                api.ok(Method::PUT, &path, Some(&body)).await?;
                emit(&format!("tern: user '{}' created\n", a.name))?;
            }
            UsersCommand::Delete(a) => {
                let path = format!("/api/users/{}", segment(&a.name));
                ApiClient::new(&a.api)?
                    .ok(Method::DELETE, &path, None)
                    .await?;
                emit(&format!("tern: user '{}' deleted\n", a.name))?;
            }
            UsersCommand::Passwd(a) => {
                let api = ApiClient::new(&a.api)?;
                let path = format!("/api/users/{}", segment(&a.name));
                // The PUT replaces the user: keep its tags.
                let user = api.ok(Method::GET, &path, None).await?;
                let body = json!({"password": secret, "tags": user["tags"]});
                api.ok(Method::PUT, &path, Some(&body)).await?;
                emit(&format!("tern: password of user '{}' changed\n", a.name))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn run_permissions(command: PermissionsCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match command {
            PermissionsCommand::List(a) => {
                let all = ApiClient::new(&a.api)?
                    .ok(Method::GET, "/api/permissions", None)
                    .await?;
                let shown: Vec<Value> = all
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        a.vhost
                            .as_deref()
                            .is_none_or(|v| p["vhost"].as_str() == Some(v))
                    })
                    .cloned()
                    .collect();
                if a.json {
                    return print_json(&Value::Array(shown));
                }
                let mut out = String::from("VHOST\tUSER\tCONFIGURE\tWRITE\tREAD\n");
                for p in &shown {
                    let f = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                    out.push_str(&format!(
                        "{}\t{}\t{}\t{}\t{}\n",
                        f("vhost"),
                        f("user"),
                        f("configure"),
                        f("write"),
                        f("read")
                    ));
                }
                emit(&out)?;
            }
            PermissionsCommand::Set(a) => {
                let path = format!(
                    "/api/permissions/{}/{}",
                    segment(&a.vhost),
                    segment(&a.user)
                );
                let body = json!({"configure": a.configure, "write": a.write, "read": a.read});
                ApiClient::new(&a.api)?
                    .ok(Method::PUT, &path, Some(&body))
                    .await?;
                emit(&format!(
                    "tern: permissions of user '{}' in vhost '{}' set\n",
                    a.user, a.vhost
                ))?;
            }
            PermissionsCommand::Clear(a) => {
                let path = format!(
                    "/api/permissions/{}/{}",
                    segment(&a.vhost),
                    segment(&a.user)
                );
                ApiClient::new(&a.api)?
                    .ok(Method::DELETE, &path, None)
                    .await?;
                emit(&format!(
                    "tern: permissions of user '{}' in vhost '{}' cleared\n",
                    a.user, a.vhost
                ))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn run_vhosts(command: VhostsCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match command {
            VhostsCommand::List(a) => {
                let all = ApiClient::new(&a.api)?
                    .ok(Method::GET, "/api/vhosts", None)
                    .await?;
                if a.json {
                    return print_json(&all);
                }
                let mut out = String::from("NAME\tQUEUES\tMESSAGES\n");
                for v in all.as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{}\t{}\t{}\n",
                        v["name"].as_str().unwrap_or_default(),
                        v["queues"],
                        v["messages"]
                    ));
                }
                emit(&out)?;
            }
            VhostsCommand::Add(a) => {
                let path = format!("/api/vhosts/{}", segment(&a.name));
                let api = ApiClient::new(&a.api)?;
                let answer = api.send(Method::PUT, &path, Some(&json!({}))).await?;
                match answer.status {
                    StatusCode::CREATED => emit(&format!("tern: vhost '{}' created\n", a.name))?,
                    StatusCode::NO_CONTENT => {
                        emit(&format!("tern: vhost '{}' exists already\n", a.name))?
                    }
                    _ => return Err(api.explain(&answer)),
                };
            }
            VhostsCommand::Delete(a) => {
                let path = format!("/api/vhosts/{}", segment(&a.name));
                ApiClient::new(&a.api)?
                    .ok(Method::DELETE, &path, None)
                    .await?;
                emit(&format!("tern: vhost '{}' deleted\n", a.name))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
