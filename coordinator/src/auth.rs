//! Who may do what to the cluster: operators' API tokens with roles, one-time join tokens for
//! new hosts, and the host identities the cluster CA has issued. Kept in the store under its
//! own key ([`SECURITY_KEY`]) so a standby coordinator sees the same tokens.
//!
//! Secrets are never stored: a token is `NAME.SECRET` (an API token) or `join.ID.SECRET` (a
//! join token), and the store keeps the SHA-256 of the secret. Every decision here takes `now`
//! (ms since the Unix epoch) as an argument and is tested without sockets.
use ring::digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The store key of [`Security`].
pub const SECURITY_KEY: &str = "security";

/// Version of the [`Security`] record's layout.
pub const SECURITY_VERSION: u32 = 1;

/// What a token may do. Each role includes the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// GET only: status, lists, events.
    ReadOnly,
    /// VM and FT operations, and everything read-only may do.
    Operator,
    /// Everything, tokens and host join tokens too.
    Admin,
}

impl Role {
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        match s {
            "read-only" => Ok(Role::ReadOnly),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(AuthError::BadRequest(format!(
                "unknown role {s:?}: one of admin, operator, read-only"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created_ms: u64,
    /// Who created it (a token name, or `init`).
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256: String,
    pub created_by: String,
    pub expires_ms: u64,
    /// The host that joined with it: a join token is good once.
    pub used_by: Option<String>,
}

/// A host certificate the cluster CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    pub name: String,
    /// SHA-256 of the certificate's DER, hex.
    pub cert_sha256: String,
    pub issued_ms: u64,
    /// The join token it came with.
    pub join_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub version: u32,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub joins: BTreeMap<String, JoinToken>,
    pub hosts: BTreeMap<String, HostIdentity>,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            version: SECURITY_VERSION,
            tokens: BTreeMap::new(),
            joins: BTreeMap::new(),
            hosts: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that match nothing (HTTP 401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Known caller, not allowed (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    /// Malformed request (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// Conflicts with what exists (HTTP 409).
    #[error("{0}")]
    Conflict(String),
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random secret: 32 bytes from the system's CSPRNG, hex.
pub fn new_secret() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random number generator");
    hex(&b)
}

/// Token and host names: 1–63 of `[a-z0-9-]`, starting with a letter or digit.
pub fn valid_name(what: &str, name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadRequest(format!(
            "{what} name {name:?}: use 1-63 of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// Compares two equal-length hex digests without an early exit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Security {
    /// Creates API token `name` with `role`; returns the token (shown once).
    pub fn create_token(
        &mut self,
        name: &str,
        role: Role,
        by: &str,
        now_ms: u64,
    ) -> Result<String, AuthError> {
        valid_name("token", name)?;
        if let Some(t) = self.tokens.get(name) {
            return Err(AuthError::Conflict(match t.revoked_ms {
                None => format!("a token named {name:?} exists; revoke it first"),
                Some(_) => format!("a token named {name:?} was revoked; names are not reused"),
            }));
        }
        let secret = new_secret();
        self.tokens.insert(
            name.to_string(),
            TokenRecord {
                name: name.to_string(),
                role,
                secret_sha256: sha256_hex(secret.as_bytes()),
                created_ms: now_ms,
                created_by: by.to_string(),
                revoked_ms: None,
            },
        );
        Ok(format!("{name}.{secret}"))
    }

    pub fn revoke_token(&mut self, name: &str, now_ms: u64) -> Result<(), AuthError> {
        match self.tokens.get_mut(name) {
            None => Err(AuthError::BadRequest(format!("no token named {name:?}"))),
            Some(t) if t.revoked_ms.is_some() => Err(AuthError::Conflict(format!(
                "token {name:?} is already revoked"
            ))),
            Some(t) => {
                t.revoked_ms = Some(now_ms);
                Ok(())
            }
        }
    }

    /// The live token `bearer` is, if any.
    pub fn authenticate(&self, bearer: &str) -> Result<&TokenRecord, AuthError> {
        let bad = || AuthError::Unauthenticated("the API token is not valid".into());
        let (name, secret) = bearer.split_once('.').ok_or_else(bad)?;
        let t = self.tokens.get(name).ok_or_else(bad)?;
        if !same(&t.secret_sha256, &sha256_hex(secret.as_bytes())) {
            return Err(bad());
        }
        if t.revoked_ms.is_some() {
            return Err(AuthError::Unauthenticated(format!(
                "the API token {name:?} has been revoked"
            )));
        }
        Ok(t)
    }

    /// A new one-time join token, valid for `ttl_ms`.
    pub fn create_join(&mut self, by: &str, ttl_ms: u64, now_ms: u64) -> String {
        let (id, secret) = (new_secret()[..12].to_string(), new_secret());
        self.joins.insert(
            id.clone(),
            JoinToken {
                id: id.clone(),
                secret_sha256: sha256_hex(secret.as_bytes()),
                created_by: by.to_string(),
                expires_ms: now_ms.saturating_add(ttl_ms),
                used_by: None,
            },
        );
        // Expired and used tokens older than a day are dropped (bounded growth).
        self.joins
            .retain(|_, j| j.expires_ms.saturating_add(86_400_000) > now_ms);
        format!("join.{id}.{secret}")
    }

    /// Checks a join by `host` with `token` (before a certificate is issued); the caller
    /// then issues the certificate and calls [`Security::joined`].
    pub fn check_join(&self, token: &str, host: &str, now_ms: u64) -> Result<String, AuthError> {
        valid_name("host", host)?;
        let bad = || AuthError::Unauthenticated("the join token is not valid".into());
        let mut parts = token.splitn(3, '.');
        let (Some("join"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let j = self.joins.get(id).ok_or_else(bad)?;
        if !same(&j.secret_sha256, &sha256_hex(secret.as_bytes())) {
            return Err(bad());
        }
        if let Some(h) = &j.used_by {
            return Err(AuthError::Unauthenticated(format!(
                "the join token was already used (by host {h:?}); create a new one with `ftvm host join-token`"
            )));
        }
        if now_ms >= j.expires_ms {
            return Err(AuthError::Unauthenticated(
                "the join token has expired; create a new one with `ftvm host join-token`".into(),
            ));
        }
        if self.hosts.contains_key(host) {
            return Err(AuthError::Conflict(format!(
                "a host named {host:?} already has a certificate of this cluster; \
                 a new host needs a name of its own (or `ftvm host forget {host}` first)"
            )));
        }
        Ok(id.to_string())
    }

    /// Records that `host` joined with join token `id` and got the certificate `cert_der`.
    pub fn joined(&mut self, id: &str, host: &str, cert_der: &[u8], now_ms: u64) {
        if let Some(j) = self.joins.get_mut(id) {
            j.used_by = Some(host.to_string());
        }
        self.hosts.insert(
            host.to_string(),
            HostIdentity {
                name: host.to_string(),
                cert_sha256: sha256_hex(cert_der),
                issued_ms: now_ms,
                join_id: id.to_string(),
            },
        );
    }

    /// Is `cert_der` the certificate issued to `host` (and not forgotten since)?
    pub fn host_cert_current(&self, host: &str, cert_der: &[u8]) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| same(&h.cert_sha256, &sha256_hex(cert_der)))
    }

    pub fn forget_host(&mut self, host: &str) -> Result<(), AuthError> {
        self.hosts
            .remove(host)
            .map(|_| ())
            .ok_or_else(|| AuthError::BadRequest(format!("no host named {host:?} has joined")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_authenticate_by_secret_and_stop_when_revoked() {
        let mut s = Security::default();
        let t = s.create_token("ops", Role::Operator, "init", 1).unwrap();
        assert_eq!(s.authenticate(&t).unwrap().role, Role::Operator);
        assert!(!s.tokens["ops"]
            .secret_sha256
            .contains(t.split('.').nth(1).unwrap()));
        let wrong = format!("ops.{}", "0".repeat(64));
        assert!(matches!(
            s.authenticate(&wrong),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(s.authenticate("nodot").is_err());
        assert!(s.authenticate(&format!("other.{}", &t[4..])).is_err());
        assert!(matches!(
            s.create_token("ops", Role::Admin, "init", 2),
            Err(AuthError::Conflict(_))
        ));
        s.revoke_token("ops", 3).unwrap();
        let e = s.authenticate(&t).unwrap_err().to_string();
        assert!(e.contains("revoked"), "{e}");
        assert!(s.create_token("ops", Role::Admin, "init", 4).is_err());
        assert!(s.create_token("Bad Name", Role::Admin, "init", 4).is_err());
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::ReadOnly));
        assert!(!Role::ReadOnly.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        assert_eq!("read-only".parse::<Role>().unwrap(), Role::ReadOnly);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn a_join_token_is_good_once_before_it_expires_and_never_for_a_taken_name() {
        let mut s = Security::default();
        let t = s.create_join("admin", 1000, 10);
        let id = s.check_join(&t, "h1", 500).unwrap();
        s.joined(&id, "h1", b"cert", 500);
        assert!(s.host_cert_current("h1", b"cert"));
        assert!(!s.host_cert_current("h1", b"other"));
        assert!(!s.host_cert_current("h2", b"cert"));
        let e = s.check_join(&t, "h2", 600).unwrap_err().to_string();
        assert!(e.contains("already used"), "{e}");
        let t2 = s.create_join("admin", 1000, 600);
        let e = s.check_join(&t2, "h1", 700).unwrap_err().to_string();
        assert!(e.contains("already has a certificate"), "{e}");
        let e = s.check_join(&t2, "h3", 1600).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        assert!(s.check_join("join.x.y", "h3", 700).is_err());
        assert!(s
            .check_join(&t2.replace("join.", "jn."), "h3", 700)
            .is_err());
        s.forget_host("h1").unwrap();
        assert!(!s.host_cert_current("h1", b"cert"));
    }

    proptest! {
        #[test]
        fn garbage_tokens_are_refused_not_panicking(t in ".{0,80}", h in ".{0,20}") {
            let mut s = Security::default();
            s.create_token("a", Role::Admin, "init", 0).unwrap();
            s.create_join("a", 10, 0);
            prop_assert!(s.authenticate(&t).is_err());
            prop_assert!(s.check_join(&t, &h, 1).is_err());
        }
    }
}
