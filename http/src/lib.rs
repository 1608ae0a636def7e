//! The HTTP front: an actor on every node that owns the axum server for API v1.
//!
//! Every node serves the whole API; a request for a capability elsewhere goes through the cluster
//! call path (always timed). [`router`] builds the routes from an [`AppState`]; [`serve`] runs them on
//! a listener the caller bound (tests pass port 0); [`HttpFront`] is the actor that owns a running
//! server and stops it gracefully when it stops.
//!
//! - [`api`]: the handlers; [`validate`]: strict body checks; [`error`]: the one error type.
//! - [`auth`]: API tokens (client and admin scopes) and the rate limits per address and token.
//! - [`edge`]: what every connection and request passes first (caps, timeouts, request ids, JSON
//!   errors, panics).
//! - [`metrics`]: `/metrics` in Prometheus text; `/openapi.json` and the dashboard at `/` are static.
//! - [`ready`]: readiness judged from gathered facts (`/readyz`, and the node's systemd `READY=1`).
//! - [`drain`]: stopping without failing an accepted request (the gate, the phase, the in-flight count).

pub mod api;
pub mod auth;
pub mod drain;
pub mod edge;
pub mod error;
pub mod metrics;
pub mod ready;
pub mod validate;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::Router;
use bulkhead_cluster::Cluster;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::net::TcpListener;

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
    /// Requests answered `408` (`[http] request_timeout_ms`), and `500`s (a handler panicked).
    pub request_timeouts: AtomicU64,
    pub internal_errors: AtomicU64,
    /// Requests refused `401` (no or unknown token), `403` (too small a scope), `429` (a rate limit).
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub rate_limited: AtomicU64,
}

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    pub cluster: Cluster,
    pub fault_injection: bool,
    pub metrics: Arc<HttpMetrics>,
    /// One permit per `POST /v1/orders` being handled (`limits.orders_in_flight`).
    pub orders_in_flight: Arc<tokio::sync::Semaphore>,
    /// The edge's bounds (`[http]`).
    pub edge: edge::EdgeConfig,
    /// Tokens and rate limits ([`auth`]).
    pub guard: Arc<auth::Guard>,
    /// Where the front is in a drain ([`drain`]).
    pub drain: Arc<drain::Drain>,
}

pub fn router(state: AppState) -> Router {
    let admin = state.fault_injection;
    let mut r = Router::new()
        .route("/v1/orders", post(api::place_order).get(api::list_orders))
        .route("/v1/orders/{id}", get(api::get_order))
        .route("/v1/inventory/{sku}", get(api::get_stock).put(api::put_stock))
        .route("/v1/payments", get(api::list_payments))
        .route("/v1/shipments", get(api::list_shipments))
        .route("/v1/notifications", get(api::list_notifications))
        .route("/v1/dead-letters", get(api::list_dead_letters))
        .route("/v1/cluster", get(api::cluster))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(dashboard));
    if admin {
        r = r
            .route("/admin/panic/{capability}", post(api::inject_panic))
            .route("/admin/partition", post(api::partition).delete(api::heal_partition));
    }
    let r = r
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

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}

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
