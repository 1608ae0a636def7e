//! The HTTP layer's settings, as the node's config file gives them: the edge's bounds (`[http]`),
//! whether the API asks for tokens (`auth`) and the tokens themselves ([`ApiTokens`], read from
//! the token files), the rate limits (`[rate_limit]`) and how many orders the front places at
//! once (`[limits] orders_in_flight`). The binary assembles the whole file
//! (`bulkhead_launch::config::NodeConfig`) from these and the other layers' parts.

use std::fmt;

use bulkhead_cluster::Timing;
use serde::{Deserialize, Serialize};

/// `[limits] orders_in_flight` unless a config says otherwise: a few times the concurrency at
/// which the benchmarks saturate a 2-core node.
pub const ORDERS_IN_FLIGHT: usize = 1024;

/// The HTTP edge's bounds (`[http]`): what a slow or greedy client can hold, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpEdge {
    /// Open connections to the API; one more is answered `503` and closed.
    pub max_connections: usize,
    /// Of those, how many one client address may hold; one more from it is answered `503` and
    /// closed, so one address cannot take every connection. Behind a proxy, raise it.
    pub max_connections_per_address: usize,
    /// From the accept to the end of the first request's headers, and from an answer to the end of
    /// the next request's headers: a client slower than that (one byte a second, nothing at all,
    /// or an idle keep-alive) is disconnected.
    pub header_timeout_ms: u64,
    /// A whole request, body included, until its answer is ready: past it, `408`. Must leave room
    /// for `POST /v1/orders`, which may wait `wait_budget_ms + call_timeout_ms`.
    pub request_timeout_ms: u64,
    /// A connection on which no byte moves either way for this long is closed (one stuck mid-request,
    /// such as a client that stops reading its answer). Longer than `request_timeout_ms`, so it
    /// never cuts a request that is being answered.
    pub idle_timeout_ms: u64,
    /// On SIGTERM, how long `/readyz` answers `503 draining` while requests are still served, so
    /// that load balancers polling it stop sending here before anything is refused. At least the
    /// balancer's check interval times its failure threshold.
    pub drain_grace_ms: u64,
    /// After the grace, how long requests already being handled may take to finish; new ones are
    /// refused `503 draining` meanwhile. What is still running then is cut off.
    pub drain_timeout_ms: u64,
}

impl Default for HttpEdge {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_address: 256,
            header_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            drain_grace_ms: 1_000,
            drain_timeout_ms: 10_000,
        }
    }
}

impl HttpEdge {
    pub const MAX_CONNECTIONS: usize = 1 << 20;
    pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

    /// Checked against the order path's own budget (`timing`): a request timeout shorter than it
    /// would answer `408` for orders that are still being placed.
    pub fn validate(&self, timing: &Timing) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections_per_address == 0 || self.header_timeout_ms == 0 {
            return Err("http: max_connections, max_connections_per_address and header_timeout_ms must be > 0".into());
        }
        // Upper bounds: past them a deadline overflows the clock or the connection semaphore.
        if self.max_connections > Self::MAX_CONNECTIONS {
            return Err(format!("http: max_connections must be at most {}", Self::MAX_CONNECTIONS));
        }
        for (what, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("drain_grace_ms", self.drain_grace_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if ms > Self::MAX_TIMEOUT_MS {
                return Err(format!("http: {what} must be at most {} (a day)", Self::MAX_TIMEOUT_MS));
            }
        }
        let order_path = timing.wait_budget_ms.saturating_add(timing.call_timeout_ms);
        if self.request_timeout_ms <= order_path {
            return Err(format!(
                "http: request_timeout_ms ({}) must be longer than timing.wait_budget_ms + timing.call_timeout_ms ({order_path}), \
                 the longest a POST /v1/orders may legitimately take",
                self.request_timeout_ms
            ));
        }
        if self.idle_timeout_ms <= self.request_timeout_ms {
            return Err(format!(
                "http: idle_timeout_ms ({}) must be longer than request_timeout_ms ({}), or it would cut requests being answered",
                self.idle_timeout_ms, self.request_timeout_ms
            ));
        }
        Ok(())
    }
}

/// `auth`: whether the HTTP API asks for a token. On unless a config says `auth = "off"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every request but the probes, the spec and the dashboard's page needs `Authorization: Bearer`.
    #[default]
    Tokens,
    /// No token asked for: anyone who reaches the port is admin. Only for a private test bench.
    Off,
}

/// `[rate_limit]`: requests per second the API takes, per client address (every request, before
/// its token is looked at) and per token; a burst of one second's worth. Past either: `429`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_address: u32,
    pub per_token: u32,
}

impl RateLimit {
    /// For a local cluster under a load test (the bench, a chaos run): one client address and one
    /// token carry the whole load, and the run measures the cluster, not the limiter.
    pub const LOAD_TEST: RateLimit = RateLimit { per_address: 1_000_000, per_token: 1_000_000 };
}

impl Default for RateLimit {
    fn default() -> Self {
        // Above what one 2-core node serves (about 600 orders/s plus reads), so the limit binds
        // on a misbehaving client, not on a healthy load balancer or benchmark.
        Self { per_address: 2_000, per_token: 5_000 }
    }
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), String> {
        if self.per_address == 0 || self.per_token == 0 {
            return Err("rate_limit: per_address and per_token must be > 0".into());
        }
        Ok(())
    }
}

/// The API tokens of the two scopes. A token file may hold several tokens, one per line (a new
/// and an old one while rotating); any of them is accepted. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiTokens {
    pub client: Vec<String>,
    pub admin: Vec<String>,
}

impl ApiTokens {
    /// Shortest token accepted: 128 bits as hex. `bulkhead tokens` makes 256.
    pub const MIN_LEN: usize = 32;

    /// From the token files' contents: one token per non-empty line.
    pub fn new(client: String, admin: String) -> Result<Self, String> {
        let lines = |what: &str, text: &str| -> Result<Vec<String>, String> {
            let tokens: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if tokens.is_empty() {
                return Err(format!("the {what} token file holds no token"));
            }
            if let Some(bad) =
                tokens.iter().find(|t| t.len() < Self::MIN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(format!(
                    "a {what} token of {} characters is refused: each must be at least {} printable characters without spaces (`bulkhead tokens` makes them)",
                    bad.len(),
                    Self::MIN_LEN
                ));
            }
            Ok(tokens)
        };
        let (client, admin) = (lines("client", &client)?, lines("admin", &admin)?);
        if client.iter().any(|c| admin.contains(c)) {
            return Err("a token is in both the client and the admin file: a client could do what an admin does".into());
        }
        Ok(Self { client, admin })
    }
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiTokens { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_one_token_a_line_long_enough_and_never_in_both_scopes() {
        let (a, b, c) = ("a".repeat(32), "b".repeat(40), "c".repeat(32));
        let t = ApiTokens::new(format!("{a}\n\n {c} \n"), b.clone()).unwrap();
        assert_eq!(t.client, vec![a.clone(), c.clone()]);
        assert_eq!(format!("{t:?}"), "ApiTokens { .. }", "Debug shows no token");
        assert!(ApiTokens::new("short".into(), b.clone()).unwrap_err().contains("at least 32"));
        assert!(ApiTokens::new(format!("{a}\n"), format!("{b}\n{a}")).unwrap_err().contains("both"));
        assert!(ApiTokens::new("\n".into(), b).unwrap_err().contains("no token"));
    }
}
