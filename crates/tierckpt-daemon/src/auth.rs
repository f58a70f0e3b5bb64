//! Who may call what on the HTTP API: bearer tokens by role, and the client
//! certificate the peer endpoints require under mutual TLS.
//!
//! Roles: `peer` (the peer endpoints: `/v1/peer/...`, `/v1/replicas/...`,
//! `/v1/hyperpod/namespaces/...`, deletes with `?scope=node`), `write`
//! (shard writes, reads and deletes, and everything `read` may call), and
//! `read` (status, metrics and listings). `token`/`token_file` is one token
//! good for every role. A given token is compared in constant time with
//! every configured one.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tierckpt_tiers::{ErrorKind, WireError};

use crate::DaemonConfig;

/// What a token may do, or what an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Daemon-to-daemon traffic.
    Peer,
    /// Client shard writes, reads and deletes, and what `Read` may do.
    Write,
    /// Status, metrics and listings.
    Read,
    /// The `token` setting: every role.
    All,
}

impl Role {
    /// The role's name in messages, with the setting that holds its token.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Peer => "peer (peer_token_file)",
            Role::Write => "write (write_token_file)",
            Role::Read => "read (read_token_file)",
            Role::All => "every-role (token_file)",
        }
    }

    /// Whether a token of this role may call an endpoint that needs `needed`.
    pub fn grants(self, needed: Role) -> bool {
        matches!((self, needed), (Role::All, _) | (Role::Write, Role::Write | Role::Read)) || self == needed
    }
}

/// The role an endpoint needs.
pub fn needed(method: &Method, path: &str, query: Option<&str>) -> Role {
    let node_scope = query.is_some_and(|q| q.split('&').any(|kv| kv == "scope=node"));
    if path.starts_with("/v1/peer/")
        || path.starts_with("/v1/replicas/")
        || path.starts_with("/v1/hyperpod/namespaces/")
        || (method == Method::DELETE && node_scope)
    {
        return Role::Peer;
    }
    let reading = method == Method::GET || method == Method::HEAD;
    let listing = path == "/v1/namespaces"
        || (path.starts_with("/v1/namespaces/")
            && ["/steps", "/latest", "/advice", "/pins"].iter().any(|end| path.ends_with(end)));
    if reading && (path == "/v1/status" || path == "/metrics" || listing) {
        return Role::Read;
    }
    Role::Write
}

/// The configured tokens with their roles.
pub fn tokens(cfg: &DaemonConfig) -> Vec<(Role, &str)> {
    [
        (Role::All, &cfg.token),
        (Role::Peer, &cfg.peer_token),
        (Role::Write, &cfg.write_token),
        (Role::Read, &cfg.read_token),
    ]
    .into_iter()
    .filter_map(|(r, t)| t.as_deref().map(|t| (r, t)))
    .collect()
}

/// The role of `given`, compared in constant time with every configured
/// token (no early exit).
pub fn role_of(configured: &[(Role, &str)], given: &str) -> Option<Role> {
    let mut found = None;
    for (role, t) in configured {
        if constant_time_eq::constant_time_eq(given.as_bytes(), t.as_bytes()) {
            found = Some(*role);
        }
    }
    found
}

/// Whether the connection a request came on presented a client certificate
/// that `tls_ca` verified (a request extension set per connection).
#[derive(Debug, Clone, Copy)]
pub struct ClientCert(pub bool);

/// A 403 with a JSON `WireError`.
pub fn forbidden(message: String) -> Response {
    (StatusCode::FORBIDDEN, Json(WireError { kind: ErrorKind::Unauthorized, message })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_their_role() {
        let get = Method::GET;
        assert_eq!(needed(&get, "/v1/peer/holdings", None), Role::Peer);
        assert_eq!(needed(&Method::PUT, "/v1/replicas/a/1/0", None), Role::Peer);
        assert_eq!(needed(&Method::DELETE, "/v1/namespaces/a/steps/1", Some("scope=node")), Role::Peer);
        assert_eq!(needed(&Method::DELETE, "/v1/namespaces/a/steps/1", None), Role::Write);
        assert_eq!(needed(&Method::PUT, "/v1/shards/a/1/0", Some("world_size=1")), Role::Write);
        assert_eq!(needed(&get, "/v1/shards/a/1/0", None), Role::Write);
        let read = [
            "/v1/status",
            "/metrics",
            "/v1/namespaces",
            "/v1/namespaces/a/steps",
            "/v1/namespaces/a/latest",
            "/v1/namespaces/a/advice",
            "/v1/namespaces/a/pins",
        ];
        for p in read {
            assert_eq!(needed(&get, p, None), Role::Read, "{p}");
        }
    }

    #[test]
    fn roles_grant_what_they_should() {
        assert!(Role::All.grants(Role::Peer) && Role::Write.grants(Role::Read) && Role::Peer.grants(Role::Peer));
        assert!(!Role::Write.grants(Role::Peer) && !Role::Read.grants(Role::Write) && !Role::Peer.grants(Role::Read));
        let configured = [(Role::All, "a"), (Role::Read, "r")];
        assert_eq!(role_of(&configured, "r"), Some(Role::Read));
        assert_eq!(role_of(&configured, "x"), None);
    }
}
