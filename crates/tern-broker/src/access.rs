//! Access control: who may log in (users, passwords, the loopback-only
//! rule) and what they may touch (per-vhost permissions), kept durable in the
//! definitions log beside the vhosts they refer to.
//!
//! Every change is applied to memory and appended to the definitions log
//! under this module's write lock, so the log's order is the order of the
//! changes; the caller is answered once the append is fsynced. Checks read
//! the live state, so a permission change or a deleted user takes effect on
//! the next operation, as in RabbitMQ.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use blake2::{Blake2b512, Digest};

use crate::broker::Broker;
use crate::definitions::DefEvent;
use crate::error::BrokerError;
use crate::name::{NameError, UserName, VhostName};
use crate::permissions::{Access, PermissionInfo, Permissions, Resource};
use crate::users::{PasswordHash, User, UserInfo, UserTag};

/// The user created on a broker's first start, as RabbitMQ's `guest`.
pub const DEFAULT_USER: &str = "guest";

/// Why a login failed. Unknown users and wrong passwords give the same
/// error, so user names cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Unknown user, wrong password, or a user without a password.
    #[error("login refused for user '{user}': unknown user or wrong password")]
    Refused {
        /// The name the client gave.
        user: String,
    },
    /// A loopback-only user (such as `guest`) connected from another host.
    #[error("user '{user}' can only connect via localhost")]
    LoopbackOnly {
        /// The user.
        user: String,
    },
}

/// What went wrong managing or checking users and permissions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// A user or vhost name is invalid.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// No such user.
    #[error("no user '{0}'")]
    UserNotFound(String),
    /// No such vhost.
    #[error("no vhost '{0}'")]
    VhostNotFound(String),
    /// The user has no permissions in the vhost.
    #[error("no permissions for user '{user}' in vhost '{vhost}'")]
    PermissionsNotFound {
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// A tag RabbitMQ does not know.
    #[error("unknown user tag '{0}'; use administrator, management, monitoring or policymaker")]
    InvalidTag(String),
    /// A permission pattern is not a valid regular expression.
    #[error("invalid permission pattern '{pattern}': {reason}")]
    InvalidPattern {
        /// The pattern.
        pattern: String,
        /// What the regex compiler said.
        reason: String,
    },
    /// A password that cannot be set.
    #[error("invalid password for user '{user}': {reason}")]
    InvalidPassword {
        /// The user.
        user: String,
        /// Why.
        reason: String,
    },
    /// The user may not use the vhost (no permissions there).
    #[error("access to vhost '{vhost}' refused for user '{user}'")]
    VhostRefused {
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// The user may not do this to the resource.
    #[error("access to {resource} in vhost '{vhost}' refused for user '{user}'")]
    Refused {
        /// The exchange or queue, such as "queue 'q'".
        resource: Resource,
        /// The vhost.
        vhost: String,
        /// The user.
        user: String,
    },
    /// Storage failed underneath.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<BrokerError> for AccessError {
    fn from(e: BrokerError) -> AccessError {
        match e {
            BrokerError::VhostNotFound(v) => AccessError::VhostNotFound(v),
            BrokerError::InvalidName(n) => AccessError::InvalidName(n),
            other => AccessError::Storage(other.to_string()),
        }
    }
}

impl From<AccessError> for BrokerError {
    /// For front doors that report every refusal through the broker's codes:
    /// refusals are 403 (530 for a vhost), unknown names 404.
    fn from(e: AccessError) -> BrokerError {
        match e {
            AccessError::InvalidName(n) => BrokerError::InvalidName(n),
            AccessError::VhostNotFound(v) => BrokerError::VhostNotFound(v),
            AccessError::Refused { .. } => BrokerError::AccessRefused(e.to_string()),
            AccessError::VhostRefused { .. } => BrokerError::NotAllowed(e.to_string()),
            AccessError::Storage(s) => BrokerError::Storage(s),
            other => BrokerError::PreconditionFailed(other.to_string()),
        }
    }
}

/// Settings of access control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessConfig {
    /// Users who may log in only from a loopback address (RabbitMQ's
    /// `loopback_users`); default `["guest"]`.
    pub loopback_users: Vec<String>,
}

impl Default for AccessConfig {
    fn default() -> AccessConfig {
        AccessConfig {
            loopback_users: vec![DEFAULT_USER.to_string()],
        }
    }
}

/// A logged-in user: what front doors keep for the checks that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    name: UserName,
    tags: Vec<UserTag>,
}

impl AuthUser {
    /// The user's name.
    pub fn name(&self) -> &UserName {
        &self.name
    }

    /// The user's tags at login.
    pub fn tags(&self) -> &[UserTag] {
        &self.tags
    }

    /// Whether the user had the `administrator` tag at login.
    pub fn is_administrator(&self) -> bool {
        self.tags.contains(&UserTag::Administrator)
    }
}

/// Whether a user or permissions entry was created or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It did not exist.
    Created,
    /// It existed and was replaced.
    Updated,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the first start's `guest` was ever created: once it was,
    /// deleting every user does not bring it back.
    initialised: bool,
    users: BTreeMap<UserName, User>,
    permissions: BTreeMap<(VhostName, UserName), Permissions>,
}

/// The broker's users and permissions.
#[derive(Debug)]
pub(crate) struct AccessControl {
    state: RwLock<State>,
    config: AccessConfig,
    /// Successful logins, by user: the PHC string they were checked against
    /// and a fast digest of (PHC, password). Argon2 takes tens of
    /// milliseconds by design; an HTTP client sends its password with every
    /// request. A changed password changes the PHC string, which misses.
    verified: Mutex<HashMap<UserName, (String, [u8; 64])>>,
    /// Moves on every change of users or permissions (taken under the write
    /// lock), so front doors may cache check results under it.
    epoch: AtomicU64,
}

fn digest(phc: &str, password: &str) -> [u8; 64] {
    let mut h = Blake2b512::new();
    h.update(phc.as_bytes());
    h.update([0u8]);
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Users and permissions rebuilt from the definitions log.
#[derive(Debug, Default)]
pub(crate) struct AccessReplay {
    state: State,
}

impl AccessReplay {
    /// Applies one access event; `vhost_exists` tells whether a permission's
    /// vhost is live at this point of the log.
    pub(crate) fn apply(&mut self, event: DefEvent, vhost_exists: impl Fn(&str) -> bool) {
        let st = &mut self.state;
        match event {
            DefEvent::AccessInitialised => st.initialised = true,
            DefEvent::UserPut {
                name,
                password_hash,
                tags,
            } => {
                let (Ok(name), Ok(tags)) = (UserName::new(name), UserTag::parse_list(&tags)) else {
                    return;
                };
                let password = password_hash.and_then(|p| PasswordHash::from_phc(p).ok());
                st.users.insert(
                    name.clone(),
                    User {
                        name,
                        password,
                        tags,
                    },
                );
            }
            DefEvent::UserDeleted { name } => {
                if let Ok(name) = UserName::new(name) {
                    st.users.remove(&name);
                    st.permissions.retain(|(_, u), _| u != &name);
                }
            }
            DefEvent::PermissionSet {
                vhost,
                user,
                configure,
                write,
                read,
            } => {
                if !vhost_exists(&vhost) {
                    return;
                }
                let (Ok(vhost), Ok(user), Ok(p)) = (
                    VhostName::new(vhost),
                    UserName::new(user),
                    Permissions::new(&configure, &write, &read),
                ) else {
                    return;
                };
                if st.users.contains_key(&user) {
                    st.permissions.insert((vhost, user), p);
                }
            }
            DefEvent::PermissionCleared { vhost, user } => {
                if let (Ok(vhost), Ok(user)) = (VhostName::new(vhost), UserName::new(user)) {
                    st.permissions.remove(&(vhost, user));
                }
            }
            _ => {}
        }
    }

    /// A vhost was deleted: so are its permissions.
    pub(crate) fn vhost_deleted(&mut self, vhost: &str) {
        self.state
            .permissions
            .retain(|(v, _), _| v.as_str() != vhost);
    }

    /// A snapshot clears everything before it.
    pub(crate) fn clear(&mut self) {
        self.state = State::default();
    }

    /// The events that rebuild this state, for the log's snapshot.
    pub(crate) fn snapshot(&self) -> Vec<DefEvent> {
        snapshot(&self.state)
    }

    pub(crate) fn into_control(self, config: AccessConfig) -> AccessControl {
        AccessControl {
            state: RwLock::new(self.state),
            config,
            verified: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }
}

fn user_event(u: &User) -> DefEvent {
    DefEvent::UserPut {
        name: u.name.to_string(),
        password_hash: u.password.as_ref().map(|p| p.as_str().to_string()),
        tags: tags_string(&u.tags),
    }
}

fn tags_string(tags: &[UserTag]) -> String {
    tags.iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn permission_event(vhost: &VhostName, user: &UserName, p: &Permissions) -> DefEvent {
    DefEvent::PermissionSet {
        vhost: vhost.to_string(),
        user: user.to_string(),
        configure: p.configure.as_str().to_string(),
        write: p.write.as_str().to_string(),
        read: p.read.as_str().to_string(),
    }
}

fn snapshot(st: &State) -> Vec<DefEvent> {
    let mut events = Vec::new();
    if st.initialised {
        events.push(DefEvent::AccessInitialised);
    }
    events.extend(st.users.values().map(user_event));
    for ((vhost, user), p) in &st.permissions {
        events.push(permission_event(vhost, user, p));
    }
    events
}

fn user_name(name: &str) -> Result<UserName, AccessError> {
    Ok(UserName::new(name)?)
}

fn vhost_name(name: &str) -> Result<VhostName, AccessError> {
    Ok(VhostName::new(name)?)
}

/// Runs slow password hashing off the async workers when there are some.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AccessError> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(f)
            .await
            .map_err(|e| AccessError::Storage(format!("password hashing task failed: {e}"))),
        Err(_) => Ok(f()),
    }
}

impl AccessControl {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        let guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        // Under the lock: a reader that saw the new epoch waits for this
        // change before it can check, so it never caches the old answer
        // under the new epoch.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        guard
    }

    pub(crate) fn vhost_deleted(&self, vhost: &str) {
        self.write()
            .permissions
            .retain(|(v, _), _| v.as_str() != vhost);
    }
}

impl Broker {
    /// On a broker's first start (no user was ever defined, including a data
    /// directory from before users existed): `guest` / `guest`, tagged
    /// administrator, with full permissions on `/` if it exists. One append,
    /// so a crash keeps all of it or none, and then it is simply redone.
    pub(crate) fn seed_default_user(&self) -> Result<(), BrokerError> {
        let access = self.access();
        if access.read().initialised {
            return Ok(());
        }
        let name = UserName::new(DEFAULT_USER)?;
        let hash = PasswordHash::new(&name, DEFAULT_USER).map_err(BrokerError::from)?;
        let user = User {
            name: name.clone(),
            password: Some(hash),
            tags: vec![UserTag::Administrator],
        };
        let root = VhostName::new("/")?;
        let mut st = access.write();
        let mut events = vec![DefEvent::AccessInitialised, user_event(&user)];
        let grant = self.vhost(root.as_str()).is_ok();
        if grant {
            events.push(permission_event(&root, &name, &Permissions::full()));
        }
        // Opening is synchronous: durable by the next commit, like the first vhost.
        drop(self.persist_all(&events)?);
        st.initialised = true;
        st.users.insert(name.clone(), user);
        if grant {
            st.permissions.insert((root, name), Permissions::full());
        }
        Ok(())
    }

    /// Checks a user's password. Loopback-only users must come from a
    /// loopback address; `peer` is `None` for in-process callers, which are local.
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<AuthUser, AuthError> {
        let refused = || AuthError::Refused {
            user: user.to_string(),
        };
        let name = UserName::new(user).map_err(|_| refused())?;
        let access = self.access();
        let found = access.read().users.get(&name).and_then(|u| {
            u.password
                .as_ref()
                .map(|hash| (hash.clone(), u.tags.clone()))
        });
        let Some((phc, tags)) = found else {
            // An unknown user still costs a hash, so timing does not tell.
            let password = password.to_string();
            let _ = blocking(move || dummy_hash().is_some_and(|d| d.verify(&password))).await;
            return Err(refused());
        };
        let key = digest(phc.as_str(), password);
        let cached = access
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .is_some_and(|(p, d)| p == phc.as_str() && *d == key);
        if !cached {
            let (hash, pw) = (phc.clone(), password.to_string());
            let ok = blocking(move || hash.verify(&pw))
                .await
                .map_err(|_| refused())?;
            if !ok {
                return Err(refused());
            }
            access
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), (phc.as_str().to_string(), key));
        }
        let loopback_only = access.config.loopback_users.iter().any(|u| u == user);
        if loopback_only && !peer.is_none_or(|p| is_loopback(&p)) {
            return Err(AuthError::LoopbackOnly {
                user: user.to_string(),
            });
        }
        Ok(AuthUser { name, tags })
    }

    /// Whether the user may open connections to the vhost: it exists and the
    /// user has permissions there (of any kind, as in RabbitMQ).
    pub fn check_vhost_access(&self, user: &AuthUser, vhost: &str) -> Result<(), AccessError> {
        self.check_user_vhost_access(user.name.as_str(), vhost)
    }

    /// A number that changes whenever users or permissions change. A front
    /// door may remember successful [`Broker::check_permission`] results
    /// while it stays the same (read it before checking).
    pub fn access_epoch(&self) -> u64 {
        self.access().epoch.load(Ordering::SeqCst)
    }

    /// [`Broker::check_vhost_access`] for a user authenticated elsewhere
    /// (the management API's principal), by name.
    pub fn check_user_vhost_access(&self, user: &str, vhost: &str) -> Result<(), AccessError> {
        let vname = vhost_name(vhost)?;
        let uname = user_name(user)?;
        self.vhost(vhost)?;
        if self
            .access()
            .read()
            .permissions
            .contains_key(&(vname, uname))
        {
            Ok(())
        } else {
            Err(AccessError::VhostRefused {
                vhost: vhost.to_string(),
                user: user.to_string(),
            })
        }
    }

    /// The vhosts the user has permissions in (of any kind), by name: the
    /// ones a management user may see, as RabbitMQ's "login vhosts".
    pub fn user_vhosts(&self, user: &str) -> Vec<VhostName> {
        let Ok(uname) = user_name(user) else {
            return Vec::new();
        };
        self.access()
            .read()
            .permissions
            .keys()
            .filter(|(_, u)| *u == uname)
            .map(|(v, _)| v.clone())
            .collect()
    }

    /// Whether the user may have this access to the resource in the vhost.
    pub fn check_permission(
        &self,
        user: &AuthUser,
        vhost: &str,
        resource: &Resource,
        access: Access,
    ) -> Result<(), AccessError> {
        if self.permitted(&user.name, vhost, resource, access) {
            Ok(())
        } else {
            Err(AccessError::Refused {
                resource: resource.clone(),
                vhost: vhost.to_string(),
                user: user.name.to_string(),
            })
        }
    }

    fn permitted(&self, user: &UserName, vhost: &str, resource: &Resource, access: Access) -> bool {
        VhostName::new(vhost).is_ok_and(|v| {
            self.access()
                .read()
                .permissions
                .get(&(v, user.clone()))
                .is_some_and(|p| p.pattern(access).matches(resource.name()))
        })
    }

    /// [`Broker::check_permission`] for a user authenticated elsewhere (the
    /// management API's principal), by name: the same patterns, matched the
    /// same way.
    pub fn check_user_permission(
        &self,
        user: &str,
        vhost: &str,
        resource: &Resource,
        access: Access,
    ) -> Result<(), AccessError> {
        let allowed =
            UserName::new(user).is_ok_and(|u| self.permitted(&u, vhost, resource, access));
        if allowed {
            Ok(())
        } else {
            Err(AccessError::Refused {
                resource: resource.clone(),
                vhost: vhost.to_string(),
                user: user.to_string(),
            })
        }
    }

    /// Creates or replaces a user (RabbitMQ's `PUT /api/users/{name}`).
    /// `password: None` keeps an existing user's password, and creates a
    /// user who cannot log in with one.
    pub async fn put_user(
        &self,
        name: &str,
        password: Option<&str>,
        tags: Vec<UserTag>,
    ) -> Result<Change, AccessError> {
        let name = user_name(name)?;
        let hash = match password {
            Some(pw) => {
                let (n, pw) = (name.clone(), pw.to_string());
                Some(blocking(move || PasswordHash::new(&n, &pw)).await??)
            }
            None => None,
        };
        let mut tags = tags;
        tags.sort();
        tags.dedup();
        let ticket = {
            let mut st = self.access().write();
            let existing = st.users.get(&name);
            let change = if existing.is_some() {
                Change::Updated
            } else {
                Change::Created
            };
            let user = User {
                name: name.clone(),
                password: hash.or_else(|| existing.and_then(|u| u.password.clone())),
                tags,
            };
            let ticket = self.persist_all(&[user_event(&user)])?;
            st.users.insert(name, user);
            (ticket, change)
        };
        ticket.0.durable().await.map_err(BrokerError::from)?;
        Ok(ticket.1)
    }

    /// Changes an existing user's password.
    pub async fn change_password(&self, name: &str, password: &str) -> Result<(), AccessError> {
        let uname = user_name(name)?;
        let tags = self
            .access()
            .read()
            .users
            .get(&uname)
            .map(|u| u.tags.clone())
            .ok_or_else(|| AccessError::UserNotFound(name.to_string()))?;
        self.put_user(name, Some(password), tags).await?;
        Ok(())
    }

    /// Deletes a user and their permissions. Connections already open stay
    /// open but lose every permission, as in RabbitMQ.
    pub async fn delete_user(&self, name: &str) -> Result<(), AccessError> {
        let uname = user_name(name)?;
        let ticket = {
            let mut st = self.access().write();
            if !st.users.contains_key(&uname) {
                return Err(AccessError::UserNotFound(name.to_string()));
            }
            let ticket = self.persist_all(&[DefEvent::UserDeleted {
                name: name.to_string(),
            }])?;
            st.users.remove(&uname);
            st.permissions.retain(|(_, u), _| u != &uname);
            ticket
        };
        self.access()
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uname);
        ticket.durable().await.map_err(BrokerError::from)?;
        Ok(())
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<UserInfo> {
        self.access()
            .read()
            .users
            .values()
            .map(UserInfo::from)
            .collect()
    }

    /// One user.
    pub fn user(&self, name: &str) -> Result<UserInfo, AccessError> {
        let uname = user_name(name)?;
        self.access()
            .read()
            .users
            .get(&uname)
            .map(UserInfo::from)
            .ok_or_else(|| AccessError::UserNotFound(name.to_string()))
    }

    /// Sets a user's permissions in a vhost, replacing any.
    pub async fn set_permissions(
        &self,
        vhost: &str,
        user: &str,
        permissions: Permissions,
    ) -> Result<Change, AccessError> {
        let vname = vhost_name(vhost)?;
        let uname = user_name(user)?;
        let (ticket, change) = {
            let mut st = self.access().write();
            // Under the access lock: a vhost deleted meanwhile clears the
            // permissions after this (in memory and on replay).
            self.vhost(vhost)?;
            if !st.users.contains_key(&uname) {
                return Err(AccessError::UserNotFound(user.to_string()));
            }
            let ticket = self.persist_all(&[permission_event(&vname, &uname, &permissions)])?;
            let change = match st.permissions.insert((vname, uname), permissions) {
                Some(_) => Change::Updated,
                None => Change::Created,
            };
            (ticket, change)
        };
        ticket.durable().await.map_err(BrokerError::from)?;
        Ok(change)
    }

    /// Removes a user's permissions in a vhost.
    pub async fn clear_permissions(&self, vhost: &str, user: &str) -> Result<(), AccessError> {
        let key = (vhost_name(vhost)?, user_name(user)?);
        let ticket = {
            let mut st = self.access().write();
            if !st.permissions.contains_key(&key) {
                return Err(AccessError::PermissionsNotFound {
                    vhost: vhost.to_string(),
                    user: user.to_string(),
                });
            }
            let ticket = self.persist_all(&[DefEvent::PermissionCleared {
                vhost: vhost.to_string(),
                user: user.to_string(),
            }])?;
            st.permissions.remove(&key);
            ticket
        };
        ticket.durable().await.map_err(BrokerError::from)?;
        Ok(())
    }

    /// Every permissions entry, by vhost then user.
    pub fn permissions(&self) -> Vec<PermissionInfo> {
        self.access()
            .read()
            .permissions
            .iter()
            .map(|((vhost, user), p)| PermissionInfo {
                vhost: vhost.clone(),
                user: user.clone(),
                permissions: p.clone(),
            })
            .collect()
    }

    /// One user's permissions in one vhost.
    pub fn permission(&self, vhost: &str, user: &str) -> Result<PermissionInfo, AccessError> {
        let key = (vhost_name(vhost)?, user_name(user)?);
        self.access()
            .read()
            .permissions
            .get(&key)
            .map(|p| PermissionInfo {
                vhost: key.0.clone(),
                user: key.1.clone(),
                permissions: p.clone(),
            })
            .ok_or_else(|| AccessError::PermissionsNotFound {
                vhost: vhost.to_string(),
                user: user.to_string(),
            })
    }
}

fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        // `::ffff:127.0.0.1` is how a dual-stack listener sees IPv4 loopback.
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A fixed hash to verify against for unknown users, made once.
fn dummy_hash() -> Option<PasswordHash> {
    static DUMMY: std::sync::OnceLock<Option<PasswordHash>> = std::sync::OnceLock::new();
    DUMMY
        .get_or_init(|| {
            let name = UserName::new("-").ok()?;
            PasswordHash::new(&name, "no such user").ok()
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        for ip in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"] {
            assert!(!is_loopback(&ip.parse().unwrap()), "{ip}");
        }
    }
}
