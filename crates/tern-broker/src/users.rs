//! Users: a name, an argon2 password hash and RabbitMQ's management tags.
//!
//! Passwords never stay in memory or on disk; only their PHC strings
//! (`$argon2id$v=19$...`, with a random salt each) do.

use std::fmt;
use std::str::FromStr;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::access::AccessError;
use crate::name::UserName;

/// What a user may do in the management API, as RabbitMQ's user tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UserTag {
    /// Everything, including users, permissions and vhosts.
    Administrator,
    /// The management API for the vhosts the user may access.
    Management,
    /// Management, plus read-only views of every connection and node.
    Monitoring,
    /// Management, plus policies and parameters.
    Policymaker,
}

impl UserTag {
    /// The tag as RabbitMQ spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            UserTag::Administrator => "administrator",
            UserTag::Management => "management",
            UserTag::Monitoring => "monitoring",
            UserTag::Policymaker => "policymaker",
        }
    }

    /// Parses RabbitMQ's comma-separated tag list (`""` is no tags).
    pub fn parse_list(list: &str) -> Result<Vec<UserTag>, AccessError> {
        let mut tags: Vec<UserTag> = list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        tags.sort();
        tags.dedup();
        Ok(tags)
    }
}

impl fmt::Display for UserTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserTag {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<UserTag, AccessError> {
        match s {
            "administrator" => Ok(UserTag::Administrator),
            "management" => Ok(UserTag::Management),
            "monitoring" => Ok(UserTag::Monitoring),
            "policymaker" => Ok(UserTag::Policymaker),
            other => Err(AccessError::InvalidTag(other.to_string())),
        }
    }
}

/// An argon2 PHC string: algorithm, parameters, salt and hash.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PasswordHash(String);

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes are secrets too (offline guessing); logs never show them.
        f.write_str("PasswordHash(..)")
    }
}

impl PasswordHash {
    /// Hashes a password with a fresh random salt. Slow on purpose: call it
    /// off the async workers.
    pub(crate) fn new(user: &UserName, password: &str) -> Result<PasswordHash, AccessError> {
        if password.is_empty() {
            return Err(AccessError::InvalidPassword {
                user: user.to_string(),
                reason: "the password must not be empty".into(),
            });
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AccessError::InvalidPassword {
                user: user.to_string(),
                reason: e.to_string(),
            })?;
        Ok(PasswordHash(hash.to_string()))
    }

    /// A stored PHC string, checked to parse.
    pub(crate) fn from_phc(phc: String) -> Result<PasswordHash, String> {
        argon2::password_hash::PasswordHash::new(&phc)
            .map_err(|e| format!("stored password hash does not parse: {e}"))?;
        Ok(PasswordHash(phc))
    }

    /// The PHC string.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `password` is the one hashed. Slow on purpose.
    pub(crate) fn verify(&self, password: &str) -> bool {
        let Ok(parsed) = argon2::password_hash::PasswordHash::new(&self.0) else {
            return false;
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    }
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) name: UserName,
    /// `None`: the user cannot log in with a password (RabbitMQ allows such users).
    pub(crate) password: Option<PasswordHash>,
    pub(crate) tags: Vec<UserTag>,
}

/// A user as listed: never the password, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// The name.
    pub name: UserName,
    /// The management tags.
    pub tags: Vec<UserTag>,
    /// Whether the user has a password (a user without one cannot log in).
    pub has_password: bool,
}

impl From<&User> for UserInfo {
    fn from(u: &User) -> UserInfo {
        UserInfo {
            name: u.name.clone(),
            tags: u.tags.clone(),
            has_password: u.password.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let user = UserName::new("bob").unwrap();
        let h = PasswordHash::new(&user, "s3cret").unwrap();
        assert!(h.as_str().starts_with("$argon2id$"));
        assert!(h.verify("s3cret"));
        assert!(!h.verify("s3cret "));
        assert!(!h.verify(""));
        // A fresh salt each time.
        assert_ne!(h, PasswordHash::new(&user, "s3cret").unwrap());
        assert!(PasswordHash::from_phc(h.as_str().to_string()).is_ok());
        assert!(PasswordHash::from_phc("plain".into()).is_err());
        assert!(!format!("{h:?}").contains("argon2"));
    }

    #[test]
    fn tags_parse_as_rabbitmq_lists_them() {
        assert_eq!(UserTag::parse_list("").unwrap(), vec![]);
        assert_eq!(
            UserTag::parse_list("monitoring, administrator,monitoring").unwrap(),
            vec![UserTag::Administrator, UserTag::Monitoring]
        );
        let err = UserTag::parse_list("admin").unwrap_err();
        assert!(err.to_string().contains("'admin'"), "{err}");
    }
}
