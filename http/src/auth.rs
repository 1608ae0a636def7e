//! Who may call what: API tokens with two scopes (shared token files, and named clients), and a
//! rate limit per address and per token.
//!
//! Every request passes [`guard`] before its handler:
//! 1. the **address limit** (`[rate_limit] per_address`), before the token is even looked at, so
//!    guessing tokens costs a guesser its quota like any other request;
//! 2. the **token**: [`required`] says what the route needs ([`Scope`]), [`identify`] says who the
//!    `Authorization: Bearer` header proves the caller is ([`Caller`]), [`decide`] judges the two.
//!    A missing or unknown token is `401` with `WWW-Authenticate`; a client token on an admin
//!    route is `403`. Both are the API's JSON errors. Tokens are compared in constant time;
//! 3. the **token limit** (`[rate_limit] per_token`).
//!
//! Past a limit: `429` with `Retry-After` in whole seconds. Limits are governor's GCRA, a burst of
//! one second's worth.
//!
//! Admin routes that change something also take a JSON body (the handlers insist on
//! `Content-Type: application/json`): a cross-site form cannot send one without a CORS preflight,
//! which this API never grants, and it cannot send a bearer token at all.
//!
//! Named clients ([`crate::clients`]) each have a token of their own, with a scope, made and
//! revoked while the node runs; the per-token limit counts each apart, and each one's
//! Idempotency-Keys are its own (the [`KeyScope`] extension tells the handlers whose they are).
//!
//! Caveats: the shared token files hold one client token and one admin token (two each while
//! rotating), so everyone who holds the shared client token shares its quota on each node. The
//! address limit keys on the TCP peer: behind a proxy every client is the proxy. The limiter
//! forgets idle addresses only when it holds more than [`MAX_TRACKED`] of them.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ApiTokens, RateLimit};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use subtle::ConstantTimeEq;

pub use crate::clients::Scope;
use crate::clients::{Clients, ClientsFile, KeyScope, NamedClient};
use crate::error::ApiError;
use crate::HttpMetrics;

/// The scope a request needs, from its method and path alone. A path the API does not have needs
/// the client scope, so a caller without a token learns nothing about which paths exist.
pub fn required(method: &Method, path: &str) -> Scope {
    let path = path.trim_end_matches('/');
    match path {
        "" | "/healthz" | "/readyz" | "/openapi.json" if method == Method::GET || method == Method::HEAD => {
            return Scope::Public
        }
        "/v1/cluster" | "/v1/dead-letters" | "/metrics" => return Scope::Admin,
        _ => {}
    }
    if path.starts_with("/admin/") || path == "/admin" {
        return Scope::Admin;
    }
    if path.starts_with("/v1/inventory/") && method != Method::GET && method != Method::HEAD {
        return Scope::Admin;
    }
    Scope::Client
}

/// Who the request's credentials prove the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// No `Authorization` header.
    Anonymous,
    /// A header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that is neither of ours.
    Unknown,
    /// A token of the shared client or admin token file.
    Client,
    Admin,
    /// A named client's token ([`crate::clients`]).
    Named(NamedClient),
    /// `auth = "off"`: everyone is admin.
    Unchecked,
}

/// Reads the `Authorization` header against the tokens (`None`: auth is off). Every shared token
/// is compared every time, each in constant time, so the answer's timing says nothing about any
/// of them (only, as ever, about how many there are); a named client's token is found by its
/// SHA-256 ([`Clients::find`]).
pub fn identify(tokens: Option<&ApiTokens>, clients: Option<&Clients>, authorization: Option<&HeaderValue>) -> Caller {
    let Some(tokens) = tokens else { return Caller::Unchecked };
    let Some(value) = authorization else { return Caller::Anonymous };
    let Some(presented) = value.to_str().ok().and_then(bearer) else { return Caller::Malformed };
    let matches = |list: &[String]| {
        list.iter().fold(subtle::Choice::from(0), |any, t| any | presented.as_bytes().ct_eq(t.as_bytes()))
    };
    let (is_client, is_admin) = (matches(&tokens.client), matches(&tokens.admin));
    if bool::from(is_admin) {
        Caller::Admin
    } else if bool::from(is_client) {
        Caller::Client
    } else if let Some(named) = clients.and_then(|c| c.find(presented)) {
        Caller::Named(named.clone())
    } else {
        Caller::Unknown
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Why a request is refused before its handler, or that it may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `401`: no usable credentials for a route that needs them.
    Unauthenticated(Caller),
    /// `403`: a valid token whose scope is too small.
    Forbidden {
        needs: Scope,
    },
}

/// The scope a caller's credentials give.
pub fn scope_of(caller: &Caller) -> Scope {
    match caller {
        Caller::Unchecked | Caller::Admin => Scope::Admin,
        Caller::Client => Scope::Client,
        Caller::Named(c) => c.scope,
        Caller::Anonymous | Caller::Malformed | Caller::Unknown => Scope::Public,
    }
}

/// Judges a caller against a route's scope.
pub fn decide(needs: Scope, caller: &Caller) -> Verdict {
    let has = scope_of(caller);
    if has >= needs {
        Verdict::Allow
    } else if has == Scope::Public {
        Verdict::Unauthenticated(caller.clone())
    } else {
        Verdict::Forbidden { needs }
    }
}

/// Addresses the limiter tracks before it forgets the idle ones.
pub const MAX_TRACKED: usize = 100_000;

type Limiter<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// The tokens and the two limiters: what [`guard`] needs.
pub struct Guard {
    tokens: Option<ApiTokens>,
    /// The named clients (`clients_file`), read again when the file changes.
    clients: Option<Arc<ClientsFile>>,
    per_address: Limiter<IpAddr>,
    per_token: Limiter<Caller>,
    metrics: Arc<HttpMetrics>,
}

impl Guard {
    /// `tokens`: `None` when `auth = "off"`.
    pub fn new(tokens: Option<ApiTokens>, limits: RateLimit, metrics: Arc<HttpMetrics>) -> Self {
        let per_second = |n: u32| Quota::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Self::with_quotas(tokens, per_second(limits.per_address), per_second(limits.per_token), metrics)
    }

    pub fn with_quotas(tokens: Option<ApiTokens>, address: Quota, token: Quota, metrics: Arc<HttpMetrics>) -> Self {
        Self {
            tokens,
            clients: None,
            per_address: RateLimiter::keyed(address),
            per_token: RateLimiter::keyed(token),
            metrics,
        }
    }

    /// With named clients read from `file` (see [`crate::clients`]).
    pub fn with_clients(mut self, file: Arc<ClientsFile>) -> Self {
        self.clients = Some(file);
        self
    }

    /// `Err(wait)` when `key` has used its quota.
    fn admit<K: std::hash::Hash + Eq + Clone>(limiter: &Limiter<K>, key: &K) -> Result<(), Duration> {
        if limiter.len() > MAX_TRACKED {
            limiter.retain_recent();
        }
        limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The middleware: limits, then the token, then the token's limit (see the module docs).
pub async fn guard(State(g): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        if let Err(wait) = Guard::admit(&g.per_address, &peer.ip()) {
            g.metrics.rate_limited.fetch_add(1, Relaxed);
            return too_many(wait, "this address");
        }
    }
    let needs = required(req.method(), req.uri().path());
    // Without a clients file there is nothing to look up (and nothing to allocate per request).
    let clients = g.clients.as_ref().map(|f| f.current());
    let caller = identify(g.tokens.as_ref(), clients.as_deref(), req.headers().get(header::AUTHORIZATION));
    match decide(needs, &caller) {
        Verdict::Allow => {}
        Verdict::Unauthenticated(caller) => {
            g.metrics.unauthenticated.fetch_add(1, Relaxed);
            return unauthenticated(caller);
        }
        Verdict::Forbidden { needs } => {
            g.metrics.forbidden.fetch_add(1, Relaxed);
            return forbidden(needs);
        }
    }
    if matches!(caller, Caller::Client | Caller::Admin | Caller::Named(_)) {
        if let Err(wait) = Guard::admit(&g.per_token, &caller) {
            g.metrics.rate_limited.fetch_add(1, Relaxed);
            return too_many(wait, "this token");
        }
    }
    // What the caller may see, for handlers that answer everyone but say more to the operator.
    req.extensions_mut().insert(scope_of(&caller));
    // Whose Idempotency-Keys these are (a named client's own; the shared tokens' as before).
    let keys = match &caller {
        Caller::Named(c) => KeyScope(Some(c.name.clone())),
        _ => KeyScope(None),
    };
    req.extensions_mut().insert(keys);
    next.run(req).await
}

fn unauthenticated(caller: Caller) -> Response {
    let (message, challenge) = match caller {
        Caller::Unknown => (
            "this token is not valid here; send a client or admin token of this cluster",
            r#"Bearer realm="bulkhead", error="invalid_token""#,
        ),
        Caller::Malformed => {
            ("the Authorization header must be `Bearer <token>`", r#"Bearer realm="bulkhead", error="invalid_request""#)
        }
        _ => ("this endpoint needs a token: send `Authorization: Bearer <token>`", r#"Bearer realm="bulkhead""#),
    };
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message).into_response();
    res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    res
}

fn forbidden(needs: Scope) -> Response {
    let mut res = ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("this endpoint needs the {} token; the token sent has a smaller scope", needs.as_str()),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        r#"Bearer realm="bulkhead", error="insufficient_scope", scope="{}""#,
        needs.as_str()
    )) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

fn too_many(wait: Duration, whom: &str) -> Response {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{whom} sent more requests than this node's rate limit allows; nothing was done, retry after the wait"),
    );
    // Whole seconds, rounded up, never 0: a client that waits `Retry-After` is admitted.
    e.retry_after = Some(wait.as_secs_f64().ceil().clamp(1.0, 3600.0) as u32);
    e.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, put};
    use axum::Router;
    use tower::ServiceExt;

    const CLIENT: &str = "client-token-0123456789abcdef0123456789";
    const ADMIN: &str = "admin-token-0123456789abcdef0123456789ab";

    const OLD_CLIENT: &str = "old-client-token-0123456789abcdef0123456";

    fn tokens() -> ApiTokens {
        // The client file mid-rotation: the new token and the old one.
        ApiTokens::new(format!("{CLIENT}\n{OLD_CLIENT}\n"), ADMIN.into()).unwrap()
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn routes_need_the_scope_the_issue_gives_them() {
        use Method as M;
        for (m, p, s) in [
            (M::GET, "/healthz", Scope::Public),
            (M::GET, "/readyz", Scope::Public),
            (M::GET, "/openapi.json", Scope::Public),
            (M::GET, "/", Scope::Public),
            (M::POST, "/", Scope::Client),
            (M::POST, "/v1/orders", Scope::Client),
            (M::GET, "/v1/orders/abc", Scope::Client),
            (M::GET, "/v1/inventory/x", Scope::Client),
            (M::PUT, "/v1/inventory/x", Scope::Admin),
            (M::DELETE, "/v1/inventory/x", Scope::Admin),
            (M::GET, "/v1/payments", Scope::Client),
            (M::GET, "/v1/shipments", Scope::Client),
            (M::GET, "/v1/notifications", Scope::Client),
            (M::GET, "/v1/dead-letters", Scope::Admin),
            (M::GET, "/v1/cluster", Scope::Admin),
            (M::GET, "/v1/cluster/", Scope::Admin),
            (M::GET, "/metrics", Scope::Admin),
            (M::POST, "/admin/partition", Scope::Admin),
            (M::POST, "/admin/panic/orders", Scope::Admin),
            (M::GET, "/no/such/thing", Scope::Client),
        ] {
            assert_eq!(required(&m, p), s, "{m} {p}");
        }
    }

    #[test]
    fn a_bearer_token_names_its_scope_and_anything_else_names_nobody() {
        let t = tokens();
        assert_eq!(identify(None, None, None), Caller::Unchecked);
        assert_eq!(identify(Some(&t), None, None), Caller::Anonymous);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("Bearer {CLIENT}")))), Caller::Client);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("Bearer {OLD_CLIENT}")))), Caller::Client);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("bearer  {ADMIN} ")))), Caller::Admin);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("Bearer {}", &ADMIN[1..])))), Caller::Unknown);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("Bearer {ADMIN}x")))), Caller::Unknown);
        assert_eq!(identify(Some(&t), None, Some(&hv(&format!("Basic {ADMIN}")))), Caller::Malformed);
        assert_eq!(identify(Some(&t), None, Some(&hv(ADMIN))), Caller::Malformed);
        assert_eq!(identify(Some(&t), None, Some(&hv("Bearer "))), Caller::Malformed);
    }

    #[test]
    fn the_verdict_is_401_without_a_token_and_403_with_too_small_a_one() {
        assert_eq!(decide(Scope::Public, &Caller::Anonymous), Verdict::Allow);
        assert_eq!(decide(Scope::Client, &Caller::Anonymous), Verdict::Unauthenticated(Caller::Anonymous));
        assert_eq!(decide(Scope::Client, &Caller::Unknown), Verdict::Unauthenticated(Caller::Unknown));
        assert_eq!(decide(Scope::Client, &Caller::Client), Verdict::Allow);
        assert_eq!(decide(Scope::Admin, &Caller::Client), Verdict::Forbidden { needs: Scope::Admin });
        assert_eq!(decide(Scope::Admin, &Caller::Admin), Verdict::Allow);
        assert_eq!(decide(Scope::Admin, &Caller::Unchecked), Verdict::Allow);
    }

    fn app(guard: Guard) -> Router {
        Router::new()
            .route("/v1/orders", get(|| async { "ok" }))
            .route("/v1/inventory/{sku}", put(|| async { "set" }))
            .layer(axum::middleware::from_fn_with_state(Arc::new(guard), super::guard))
    }

    async fn send(app: &Router, method: Method, uri: &str, token: Option<&str>, from: [u8; 4]) -> Response {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((from, 4000))));
        app.clone().oneshot(req).await.unwrap()
    }

    async fn json(res: Response) -> serde_json::Value {
        serde_json::from_slice(&axum::body::to_bytes(res.into_body(), 4096).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_guard_answers_json_401_403_and_lets_the_right_token_through() {
        let metrics = Arc::new(HttpMetrics::default());
        let app = app(Guard::new(Some(tokens()), RateLimit::default(), metrics.clone()));
        let res = send(&app, Method::GET, "/v1/orders", None, [10, 0, 0, 1]).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(res.headers()[header::WWW_AUTHENTICATE], r#"Bearer realm="bulkhead""#);
        assert_eq!(json(res).await["error"], "unauthenticated");
        let res =
            send(&app, Method::GET, "/v1/orders", Some("guess-guess-guess-guess-guess-guess"), [10, 0, 0, 1]).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert!(res.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().contains("invalid_token"));
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(CLIENT), [10, 0, 0, 1]).await.status(), StatusCode::OK);
        let res = send(&app, Method::PUT, "/v1/inventory/x", Some(CLIENT), [10, 0, 0, 1]).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(json(res).await["error"], "forbidden");
        assert_eq!(
            send(&app, Method::PUT, "/v1/inventory/x", Some(ADMIN), [10, 0, 0, 1]).await.status(),
            StatusCode::OK
        );
        assert_eq!(metrics.unauthenticated.load(Relaxed), 2);
        assert_eq!(metrics.forbidden.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn past_a_limit_the_answer_is_429_with_retry_after_per_address_and_per_token() {
        let metrics = Arc::new(HttpMetrics::default());
        // Per hour, so the test's own speed cannot refill a quota between two requests.
        let per_hour = |n| Quota::per_hour(NonZeroU32::new(n).unwrap());
        let app = app(Guard::with_quotas(Some(tokens()), per_hour(3), per_hour(4), metrics.clone()));
        // The address quota counts requests without a token too (guessing costs quota).
        let a = [10, 0, 0, 1];
        assert_eq!(send(&app, Method::GET, "/v1/orders", None, a).await.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(CLIENT), a).await.status(), StatusCode::OK);
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(CLIENT), a).await.status(), StatusCode::OK);
        let res = send(&app, Method::GET, "/v1/orders", Some(CLIENT), a).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u32 = res.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        assert_eq!(json(res).await["error"], "rate_limited");
        // Another address has its own quota; the client token's fourth request is still allowed,
        // its fifth is not, from any address.
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(CLIENT), [10, 0, 0, 2]).await.status(), StatusCode::OK);
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(CLIENT), [10, 0, 0, 2]).await.status(), StatusCode::OK);
        let res = send(&app, Method::GET, "/v1/orders", Some(CLIENT), [10, 0, 0, 3]).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        // The admin token's quota is its own.
        assert_eq!(send(&app, Method::GET, "/v1/orders", Some(ADMIN), [10, 0, 0, 3]).await.status(), StatusCode::OK);
        assert_eq!(metrics.rate_limited.load(Relaxed), 2);
    }
}
