//! What a caller may see and change, by RabbitMQ's management rules.
//!
//! Seeing: administrators and `monitoring` users see every vhost and every
//! connection. Any other management user (`management`, `policymaker`)
//! sees only the vhosts they have permissions in (the broker's
//! [`Broker::user_vhosts`]) and only their own connections and channels;
//! every listing across vhosts is filtered through a [`Scope`].
//!
//! Changing: administrators change anything. Other users may declare and
//! delete exchanges, queues and bindings, purge, publish and get where
//! their permission patterns allow, checked with the broker's own
//! [`Broker::check_user_permission`] exactly as over AMQP ([`RULES`] says
//! which access each route needs on which path parameter), and close their
//! own connections; every other change is for administrators.

use std::collections::{BTreeSet, HashMap};

use axum::http::{Method, StatusCode};
use tern_broker::{Access, Broker, BrokerError, Resource, UserTag, VhostName};

use crate::auth::Principal;
use crate::error::ApiError;

/// What one caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every vhost, connection and channel.
    Everything,
    /// Only these vhosts, and only this user's connections and channels.
    Own {
        user: String,
        vhosts: BTreeSet<VhostName>,
    },
}

impl Scope {
    /// The scope of `principal` now (permissions are read live, so a
    /// change applies to the next request or event).
    pub(crate) fn of(broker: &Broker, principal: &Principal) -> Scope {
        if sees_everything(principal) {
            return Scope::Everything;
        }
        Scope::Own {
            user: principal.user.clone(),
            vhosts: broker.user_vhosts(&principal.user).into_iter().collect(),
        }
    }

    /// Whether the caller sees the vhost and what is in it.
    pub(crate) fn sees_vhost(&self, vhost: &str) -> bool {
        match self {
            Scope::Everything => true,
            Scope::Own { vhosts, .. } => vhosts.iter().any(|v| v.as_str() == vhost),
        }
    }

    /// Whether the caller sees a connection (and its channels) of `user`.
    pub(crate) fn sees_connection_of(&self, user: &str) -> bool {
        match self {
            Scope::Everything => true,
            Scope::Own { user: me, .. } => me == user,
        }
    }

    /// The broker's vhosts the caller sees, by name.
    pub(crate) fn vhosts(&self, broker: &Broker) -> Vec<VhostName> {
        let mut all = broker.vhosts();
        all.retain(|v| self.sees_vhost(v.as_str()));
        all
    }
}

/// Administrators and monitoring users see the whole broker.
fn sees_everything(principal: &Principal) -> bool {
    principal
        .tags
        .iter()
        .any(|t| matches!(t, UserTag::Administrator | UserTag::Monitoring))
}

/// One permission a route needs: `access` on the exchange or queue named
/// by the path parameter `param`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need {
    param: &'static str,
    queue: bool,
    access: Access,
}

const fn queue(param: &'static str, access: Access) -> Need {
    Need {
        param,
        queue: true,
        access,
    }
}

const fn exchange(param: &'static str, access: Access) -> Need {
    Need {
        param,
        queue: false,
        access,
    }
}

/// The routes on which a user who is not an administrator needs
/// permissions on entities, as the same operation over AMQP would: declare
/// and delete need configure; publishing needs write on the exchange;
/// get, peek and purge need read on the queue; binding needs write on the
/// destination and read on the source exchange.
pub(crate) const RULES: &[(&str, &str, &[Need])] = &[
    (
        "PUT",
        "/api/exchanges/{vhost}/{name}",
        &[exchange("name", Access::Configure)],
    ),
    (
        "DELETE",
        "/api/exchanges/{vhost}/{name}",
        &[exchange("name", Access::Configure)],
    ),
    (
        "POST",
        "/api/exchanges/{vhost}/{name}/publish",
        &[exchange("name", Access::Write)],
    ),
    (
        "PUT",
        "/api/queues/{vhost}/{name}",
        &[queue("name", Access::Configure)],
    ),
    (
        "DELETE",
        "/api/queues/{vhost}/{name}",
        &[queue("name", Access::Configure)],
    ),
    (
        "DELETE",
        "/api/queues/{vhost}/{name}/contents",
        &[queue("name", Access::Read)],
    ),
    (
        "POST",
        "/api/queues/{vhost}/{name}/get",
        &[queue("name", Access::Read)],
    ),
    (
        "GET",
        "/api/queues/{vhost}/{name}/messages",
        &[queue("name", Access::Read)],
    ),
    (
        "POST",
        "/api/bindings/{vhost}/e/{source}/q/{destination}",
        &[
            queue("destination", Access::Write),
            exchange("source", Access::Read),
        ],
    ),
    (
        "DELETE",
        "/api/bindings/{vhost}/e/{source}/q/{destination}/{props}",
        &[
            queue("destination", Access::Write),
            exchange("source", Access::Read),
        ],
    ),
    (
        "POST",
        "/api/bindings/{vhost}/e/{source}/e/{destination}",
        &[
            exchange("destination", Access::Write),
            exchange("source", Access::Read),
        ],
    ),
    (
        "DELETE",
        "/api/bindings/{vhost}/e/{source}/e/{destination}/{props}",
        &[
            exchange("destination", Access::Write),
            exchange("source", Access::Read),
        ],
    ),
];

/// Changes whose handler decides who may make them: closing a connection
/// (one's own; `api::close_connection`).
const DECIDED_BY_HANDLER: &[(&str, &str)] = &[("DELETE", "/api/connections/{name}")];

/// Whether `principal`, who is not an administrator, may call `method` on
/// the route `route` with these (decoded) path parameters. Runs before the
/// handler, so a refusal never says whether the entity exists.
pub(crate) fn authorize(
    broker: &Broker,
    principal: &Principal,
    method: &Method,
    route: &str,
    params: &HashMap<String, String>,
) -> Result<(), ApiError> {
    // HEAD runs the GET handler: the same rules.
    let method = if *method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let needs = RULES
        .iter()
        .find(|(m, r, _)| *m == method.as_str() && *r == route)
        .map(|(_, _, needs)| *needs);
    let reading = *method == Method::GET;
    let decided_by_handler = DECIDED_BY_HANDLER
        .iter()
        .any(|(m, r)| *m == method.as_str() && *r == route);
    if needs.is_none() && !reading && !decided_by_handler {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_refused",
            format!(
                "user '{}' may not {method} {route}: that needs the administrator tag",
                principal.user
            ),
        ));
    }
    let Some(vhost) = params.get("vhost").filter(|_| route.contains("{vhost}")) else {
        return Ok(());
    };
    let name = VhostName::new(vhost.as_str()).map_err(BrokerError::from)?;
    // A vhost that does not exist is 404 for everyone, as in RabbitMQ.
    if !broker.vhosts().contains(&name) {
        return Err(BrokerError::VhostNotFound(vhost.clone()).into());
    }
    if needs.is_some() || !sees_everything(principal) {
        broker
            .check_user_vhost_access(&principal.user, vhost)
            .map_err(refused)?;
    }
    for need in needs.unwrap_or_default() {
        let Some(name) = params.get(need.param) else {
            continue;
        };
        let resource = if need.queue {
            Resource::queue(name)
        } else {
            Resource::exchange(crate::api::exchange_from_path(name))
        };
        broker
            .check_user_permission(&principal.user, vhost, &resource, need.access)
            .map_err(refused)?;
    }
    Ok(())
}

/// An access refusal as 403 (other access errors keep their own status).
fn refused(e: tern_broker::AccessError) -> ApiError {
    match e {
        tern_broker::AccessError::VhostRefused { .. }
        | tern_broker::AccessError::Refused { .. } => {
            ApiError::new(StatusCode::FORBIDDEN, "access_refused", e.to_string())
        }
        other => ApiError::from(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_names_parameters_of_its_route() {
        for (method, route, needs) in RULES {
            assert!(route.contains("{vhost}"), "{method} {route}");
            for need in *needs {
                assert!(
                    route.contains(&format!("{{{}}}", need.param)),
                    "{method} {route}: {}",
                    need.param
                );
            }
        }
    }

    #[test]
    fn monitoring_and_administrators_see_everything() {
        let p = |tags: Vec<UserTag>| Principal {
            user: "u".into(),
            tags,
        };
        assert!(sees_everything(&p(vec![UserTag::Administrator])));
        assert!(sees_everything(&p(vec![
            UserTag::Management,
            UserTag::Monitoring
        ])));
        assert!(!sees_everything(&p(vec![UserTag::Management])));
        assert!(!sees_everything(&p(vec![UserTag::Policymaker])));
    }
}
