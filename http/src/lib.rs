//! The HTTP front: an actor on every node that owns the axum server for API v1.
//!
//! Every node serves the whole API; a request for a capability elsewhere goes through the cluster
//! call path (always timed). [`router`] builds the routes from an [`AppState`]; [`serve`] runs them on
//! a listener the caller bound (tests pass port 0); [`HttpFront`] is the actor that owns a running
//! server and stops it gracefully when it stops.
//!
//! - [`api`]: the handlers; [`validate`]: strict body checks; [`error`]: the one error type.
//! - [`config`]: this layer's settings (`[http]`, `auth`, the tokens, `[rate_limit]`).
//! - [`auth`]: API tokens (client and admin scopes) and the rate limits per address and token;
//!   [`clients`]: named clients' tokens, made and revoked while the node runs.
//! - [`edge`]: what every connection and request passes first (caps, timeouts, request ids, JSON
//!   errors, panics).
//! - [`observe`]: per request, its trace (W3C `traceparent`), span, access line and latency.
//! - [`metrics`]: `/metrics` in Prometheus text; the dashboard at `/` is static.
//! - [`spec`]: `/openapi.json`, generated from the handlers and their types; [`views`]: the JSON
//!   bodies the handlers answer with.
//! - [`ready`]: readiness judged from gathered facts (`/readyz`, and the node's systemd `READY=1`).
//! - [`drain`]: stopping without failing an accepted request (the gate, the phase, the in-flight count).

pub mod api;
pub mod auth;
pub mod clients;
pub mod config;
pub mod drain;
pub mod edge;
pub mod error;
pub mod metrics;
pub mod observe;
pub mod ready;
pub mod spec;
pub mod validate;
pub mod views;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::Html;
use axum::{Extension, Router};
use bulkhead_cluster::Cluster;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::net::TcpListener;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::{ApiTokens, AuthMode, HttpEdge, RateLimit};

/// Largest request body accepted (an order of 100 items is far smaller).
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct HttpMetrics {
    pub placed: AtomicU64,
    pub confirmed: AtomicU64,
    pub pending: AtomicU64,
    pub cancelled: AtomicU64,
    /// `POST /v1/orders` refused with 429 because `limits.orders_in_flight` were already running.
    pub shed: AtomicU64,
    /// Connections to the API open now, and those refused at `[http] max_connections`.
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connections refused because their address held `[http] max_connections_per_address`.
    pub connections_refused_per_address: AtomicU64,
    /// Requests answered `408` (`[http] request_timeout_ms`), and `500`s (a handler panicked).
    pub request_timeouts: AtomicU64,
    pub internal_errors: AtomicU64,
    /// Requests refused `401` (no or unknown token), `403` (too small a scope), `429` (a rate limit).
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// `[limits] orders_in_flight`: one permit per `POST /v1/orders` being handled.
#[derive(Debug)]
pub struct OrdersInFlight {
    limit: usize,
    permits: Arc<tokio::sync::Semaphore>,
}

impl OrdersInFlight {
    pub fn new(limit: usize) -> Self {
        Self { limit, permits: Arc::new(tokio::sync::Semaphore::new(limit)) }
    }

    /// A permit held while one order is handled, or `None` at the limit.
    pub fn try_enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Orders being handled now.
    pub fn running(&self) -> usize {
        self.limit.saturating_sub(self.permits.available_permits())
    }
}

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    pub cluster: Cluster,
    pub fault_injection: bool,
    pub metrics: Arc<HttpMetrics>,
    /// One permit per `POST /v1/orders` being handled (`limits.orders_in_flight`).
    pub orders_in_flight: Arc<OrdersInFlight>,
    /// The edge's bounds (`[http]`).
    pub edge: edge::EdgeConfig,
    /// Tokens and rate limits ([`auth`]).
    pub guard: Arc<auth::Guard>,
    /// Where the front is in a drain ([`drain`]).
    pub drain: Arc<drain::Drain>,
}

/// The API's routes and its OpenAPI document, made together: `routes!` takes each route's path and
/// methods from its handler's `#[utoipa::path]`, so the document lists exactly what is routed. The
/// fault-injection routes exist only with `fault_injection`.
pub fn routes(fault_injection: bool) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let mut r = OpenApiRouter::with_openapi(spec::base())
        .routes(routes!(api::place_order, api::list_orders))
        .routes(routes!(api::get_order))
        .routes(routes!(api::get_stock, api::put_stock))
        .routes(routes!(api::list_payments))
        .routes(routes!(api::list_shipments))
        .routes(routes!(api::list_notifications))
        .routes(routes!(api::list_dead_letters))
        .routes(routes!(api::cluster))
        .routes(routes!(api::digests))
        .routes(routes!(api::healthz))
        .routes(routes!(api::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(spec::openapi))
        .routes(routes!(dashboard));
    if fault_injection {
        r = r.routes(routes!(api::inject_panic)).routes(routes!(api::partition, api::heal_partition));
    }
    let (router, mut doc) = r.split_for_parts();
    spec::finish(&mut doc);
    (router, doc)
}

pub fn router(state: AppState) -> Router {
    let (routes, doc) = routes(state.fault_injection);
    let r = routes
        .layer(Extension(spec::Document::new(&doc)))
        .fallback(|| async { error::ApiError::not_found("no such endpoint; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(state.guard.clone(), auth::guard))
        // Outside the token check: a stopping node refuses without spending work on the request.
        .layer(axum::middleware::from_fn_with_state(state.drain.clone(), drain::gate))
        .with_state(state.clone());
    edge::harden(r, &state.edge, BODY_LIMIT, state.metrics.clone())
}

#[utoipa::path(
    get, path = "/", tag = "ops", operation_id = "dashboard",
    summary = "The dashboard",
    description = "A self-contained page; its data calls need a token (pasted into its token field).",
    responses((status = 200, description = "The dashboard's HTML.", body = String, content_type = "text/html"))
)]
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// Serves the API on `listener` until `shutdown` resolves, behind the edge's connection bounds
/// ([`edge::serve`]).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (edge, metrics) = (state.edge, state.metrics.clone());
    edge::serve(listener, router(state), edge, metrics, shutdown).await
}

/// The front actor: owns one running server. It stops itself if the server ends on its own, so
/// that its status says whether the API is served (the systemd watchdog looks at it); stopping it
/// stops the server and waits until the server has closed (bounded by `drain_timeout`).
pub struct HttpFront;

#[derive(RactorMessage)]
pub enum HttpMsg {}

pub struct HttpFrontState {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for HttpFront {
    type Msg = HttpMsg;
    type State = HttpFrontState;
    type Arguments = (TcpListener, AppState);

    async fn pre_start(
        &self,
        myself: ActorRef<HttpMsg>,
        (listener, state): Self::Arguments,
    ) -> Result<HttpFrontState, ActorProcessingErr> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = serve(listener, state, async move {
                let _ = rx.await;
            })
            .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
            myself.stop(Some("the HTTP server ended".into()));
        });
        tracing::info!(%addr, "HTTP API serving");
        Ok(HttpFrontState { stop: Some(tx), server: Some(server) })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<HttpMsg>,
        state: &mut HttpFrontState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(tx) = state.stop.take() {
            let _ = tx.send(());
        }
        if let Some(server) = state.server.take() {
            let _ = server.await;
        }
        Ok(())
    }
}
