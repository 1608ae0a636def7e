//! Per request: the trace it belongs to, its span, its access line and its latency histogram.
//!
//! An incoming W3C `traceparent` is honored: the request's span becomes its child, and every
//! cluster call the handler makes carries the same trace on (see `bulkhead_cluster::trace`).
//! Without one, the request starts a trace. The answer names it in `traceresponse` (W3C Trace
//! Context level 2), so a client can find its request in the logs of every node it touched.
//!
//! Handlers reach the request's traceparent through [`traceparent`], a task-local set here: the
//! alternative, an extractor argument on every handler, would thread a string through every
//! signature for what is ambient context.
//!
//! One access line per request at info (message and target `access`): method, route, status, latency,
//! request id, trace id. The histogram `bulkhead_http_request_duration_seconds` is labelled by
//! the route *template* (`/v1/orders/{id}`), never the raw path, and by known methods only, so a
//! client cannot grow the label set.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use bulkhead_cluster::trace;
use tower_http::request_id::RequestId;
use tracing::Instrument;

tokio::task_local! {
    static TRACEPARENT: String;
}

/// The traceparent to send on from the request being handled (a new trace outside a request).
pub fn traceparent() -> String {
    TRACEPARENT.try_with(Clone::clone).unwrap_or_else(|_| trace::new_traceparent())
}

/// `fut` with the request's trace: for work a handler spawns onto other tasks.
pub fn carry<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    TRACEPARENT.scope(traceparent(), fut)
}

/// The route label: the matched template, `unmatched` for anything the router has no route for.
fn route_of(req: &Request) -> String {
    req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into())
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = route_of(&req);
    let request_id =
        req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("").to_owned();
    let incoming = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| trace::parse(v).is_some())
        .map(str::to_owned);
    let span = tracing::info_span!(
        "http",
        method,
        route = %route,
        request_id = %request_id,
        trace_id = tracing::field::Empty
    );
    // Link before asking for the span's context: asking starts the span, and its parent is fixed then.
    let tp = match incoming {
        Some(parent) => {
            trace::link(&span, &parent);
            trace::outgoing(&span, &parent)
        }
        None => trace::outgoing(&span, &trace::new_traceparent()),
    };
    let trace_id = trace::trace_id(&tp).to_owned();
    span.record("trace_id", trace_id.as_str());
    let mut res = TRACEPARENT.scope(tp.clone(), next.run(req)).instrument(span).await;
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    metrics::histogram!(
        "bulkhead_http_request_duration_seconds",
        "method" => method,
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .record(elapsed.as_secs_f64());
    tracing::info!(
        target: "access",
        method,
        route = %route,
        status,
        latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3,
        request_id = %request_id,
        trace_id = %trace_id,
        "access"
    );
    if let Ok(v) = HeaderValue::from_str(&tp) {
        res.headers_mut().insert("traceresponse", v);
    }
    res
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        Router::new()
            .route("/v1/orders/{id}", get(|| async { traceparent() }))
            .layer(axum::middleware::from_fn(observe))
    }

    async fn get_with(tp: Option<&str>) -> (String, String) {
        let mut req = Request::builder().uri("/v1/orders/abc");
        if let Some(tp) = tp {
            req = req.header("traceparent", tp);
        }
        let res = app().oneshot(req.body(Body::empty()).expect("request")).await.expect("answer");
        let echoed = res.headers().get("traceresponse").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = axum::body::to_bytes(res.into_body(), 1024).await.expect("body");
        (echoed, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn an_incoming_traceparent_is_continued_by_the_handler_and_named_in_the_answer() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (echoed, seen) = get_with(Some(tp)).await;
        assert_eq!(trace::trace_id(&seen), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace::trace_id(&echoed), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(seen, tp, "the handler sends on with a span id of its own");
    }

    #[tokio::test]
    async fn without_one_or_with_garbage_a_new_trace_starts() {
        for tp in [None, Some("00-zz-00f067aa0ba902b7-01")] {
            let (echoed, seen) = get_with(tp).await;
            assert!(trace::parse(&seen).is_some(), "{seen}");
            assert_eq!(trace::trace_id(&echoed), trace::trace_id(&seen));
        }
        let (_, a) = get_with(None).await;
        let (_, b) = get_with(None).await;
        assert_ne!(trace::trace_id(&a), trace::trace_id(&b));
    }

    #[test]
    fn only_known_methods_become_labels() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("method")), "other");
    }
}
