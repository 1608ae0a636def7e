//! `/openapi.json` against the router it describes: the document's (path, method) pairs are exactly
//! the routes [`bulkhead_http::routes`] makes (with and without fault injection), and the document
//! holds together as OpenAPI 3.x (every `$ref` resolves, every path parameter is declared, every
//! error is an `ApiError`). A test binary of its own: it starts one in-process node (ractor's
//! registries are per process).
//!
//! The router cannot list its routes, so it is probed at every path the document or [`ROUTES`]
//! names: a route at a path neither names would go unseen, which is why [`routes`] registers
//! every route through `routes!` and nothing else.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use bulkhead_actors::orders::MAX_ORDERS_LISTED;
use bulkhead_actors::{Capability, CapabilityMap};
use bulkhead_cluster::config::CapabilityPlacement;
use bulkhead_cluster::{Cluster, ClusterConfig};
use bulkhead_http::auth::Guard;
use bulkhead_http::validate::{MAX_ITEMS, MAX_QUANTITY};
use bulkhead_http::RateLimit;
use bulkhead_http::{routes, AppState, HttpMetrics};
use serde_json::Value;
use tower::ServiceExt;

/// What the API routes, written out: a route added or removed shows here, in review.
const ROUTES: &[(&str, &str)] = &[
    ("/", "get"),
    ("/admin/digests", "get"),
    ("/healthz", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
    ("/readyz", "get"),
    ("/v1/cluster", "get"),
    ("/v1/dead-letters", "get"),
    ("/v1/inventory/{sku}", "get"),
    ("/v1/inventory/{sku}", "put"),
    ("/v1/notifications", "get"),
    ("/v1/orders", "get"),
    ("/v1/orders", "post"),
    ("/v1/orders/{id}", "get"),
    ("/v1/payments", "get"),
    ("/v1/shipments", "get"),
];
const FAULT_ROUTES: &[(&str, &str)] =
    &[("/admin/panic/{capability}", "post"), ("/admin/partition", "delete"), ("/admin/partition", "post")];

/// Every method OpenAPI names.
const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// One node, no peers, nothing listening for HTTP: the routes only need an `AppState`.
fn config() -> ClusterConfig {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let on_a = CapabilityPlacement::on(&["a"]);
    let map = CapabilityMap(Capability::ALL.into_iter().map(|c| (c, on_a.clone())).collect()).shard_map();
    ClusterConfig::plain("a", std::net::SocketAddr::from(([127, 0, 0, 1], port)), "test", map)
}

fn state(cluster: &Cluster, fault_injection: bool) -> AppState {
    let metrics = Arc::new(HttpMetrics::default());
    AppState {
        cluster: cluster.clone(),
        fault_injection,
        guard: Arc::new(Guard::new(None, RateLimit::default(), metrics.clone())),
        metrics,
        orders_in_flight: Arc::new(bulkhead_http::OrdersInFlight::new(1)),
        edge: Default::default(),
        drain: Arc::new(bulkhead_http::drain::Drain::default()),
    }
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if METHODS.contains(&method.as_str()) {
                out.insert((path.clone(), method.clone()));
            }
        }
    }
    out
}

/// Which (path, method) pairs the routes match, of `candidates`. One request per path with a
/// method no route takes: a path the router has answers `405` with `Allow` listing the methods it
/// routes there (so no handler runs), any other path `404`.
async fn routed(st: AppState, candidates: &BTreeSet<String>) -> BTreeSet<(String, String)> {
    let (router, _) = routes(st.fault_injection);
    let router = router.with_state(st);
    let mut out = BTreeSet::new();
    for path in candidates {
        // Any segment will do for a parameter: no handler runs.
        let uri: String =
            path.split('/').map(|s| if s.starts_with('{') { "x1" } else { s }).collect::<Vec<_>>().join("/");
        let probe = Method::from_bytes(b"PROBE").expect("method");
        let req = Request::builder().method(probe).uri(&uri).body(Body::empty()).expect("request");
        let res = router.clone().oneshot(req).await.expect("infallible");
        match res.status() {
            StatusCode::METHOD_NOT_ALLOWED => {
                let allow = res.headers().get("allow").and_then(|v| v.to_str().ok()).expect("Allow on a 405");
                for method in allow.split(',').map(|m| m.trim().to_lowercase()) {
                    // HEAD is answered wherever GET is, as HTTP asks; the document lists GET.
                    if method != "head" {
                        out.insert((path.clone(), method));
                    }
                }
            }
            StatusCode::NOT_FOUND => {}
            other => panic!("{uri}: {other} is neither a 405 nor a 404"),
        }
    }
    out
}

fn expected(fault_injection: bool) -> BTreeSet<(String, String)> {
    let extra = if fault_injection { FAULT_ROUTES } else { &[] };
    ROUTES.iter().chain(extra).map(|(p, m)| (p.to_string(), m.to_string())).collect()
}

/// Every `$ref` in `v` names something in `doc`.
fn refs_resolve(doc: &Value, v: &Value, at: &str, broken: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(r) = o.get("$ref") {
                let target = r.as_str().and_then(|r| r.strip_prefix('#')).and_then(|p| doc.pointer(p));
                if target.is_none() {
                    broken.push(format!("{at}: {r}"));
                }
            }
            for (k, v) in o {
                refs_resolve(doc, v, &format!("{at}/{k}"), broken);
            }
        }
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| refs_resolve(doc, v, &format!("{at}/{i}"), broken)),
        _ => {}
    }
}

/// The document holds together: OpenAPI 3.x, refs resolve, path parameters declared and required,
/// unique operation ids, every error answered as JSON `ApiError`, every non-public operation secured
/// by a scheme the document defines.
fn check_document(doc: &Value) {
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut broken = Vec::new();
    refs_resolve(doc, doc, "", &mut broken);
    assert!(broken.is_empty(), "unresolved $refs: {broken:?}");
    let mut ids = BTreeSet::new();
    for (path, method) in operations(doc) {
        let op = &doc["paths"][&path][&method];
        let at = format!("{method} {path}");
        assert!(ids.insert(op["operationId"].as_str().expect("operationId").to_string()), "{at}: duplicate id");
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        for name in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            let p = params.iter().find(|p| p["name"] == name && p["in"] == "path");
            assert!(p.is_some_and(|p| p["required"] == true), "{at}: path parameter {name} not declared required");
        }
        let responses = op["responses"].as_object().expect("responses");
        assert!(responses.keys().any(|s| s.starts_with('2')), "{at}: no success answer");
        for (status, r) in responses.iter().filter(|(s, _)| s.starts_with('4') || s.starts_with('5')) {
            let schema = &r["content"]["application/json"]["schema"]["$ref"];
            let readiness = path == "/readyz" && status == "503";
            assert!(readiness || schema == "#/components/schemas/ApiError", "{at} {status}: {r}");
        }
        match op.get("security") {
            None => assert!(path_is_public(&path), "{at}: no security"),
            Some(s) => {
                let scheme = s[0].as_object().and_then(|o| o.keys().next()).expect("a scheme");
                assert!(doc["components"]["securitySchemes"][scheme].is_object(), "{at}: {scheme}");
                assert!(responses.contains_key("401"), "{at}: no 401");
            }
        }
        assert!(responses.contains_key("429") && responses.contains_key("503"), "{at}: 429/503 missing");
    }
}

fn path_is_public(path: &str) -> bool {
    ["/", "/healthz", "/readyz", "/openapi.json"].contains(&path)
}

/// One test: it starts the process's one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_exactly_the_routes_and_holds_together() {
    let cluster = Cluster::start(config()).await.expect("cluster");
    for fault_injection in [false, true] {
        let (_, doc) = routes(fault_injection);
        let doc: Value = serde_json::from_str(&doc.to_json().expect("json")).expect("parses");
        let listed = operations(&doc);
        assert_eq!(listed, expected(fault_injection), "fault_injection = {fault_injection}");
        // Every path either set names, so a route the document lacks (or the reverse) shows.
        let candidates: BTreeSet<String> =
            expected(true).into_iter().map(|(p, _)| p).chain(listed.iter().map(|(p, _)| p.clone())).collect();
        let routed = routed(state(&cluster, fault_injection), &candidates).await;
        assert_eq!(routed, listed, "fault_injection = {fault_injection}: routed vs documented");
        check_document(&doc);
    }
    // Scopes are the guard's: the document says what `auth::required` enforces.
    let (_, doc) = routes(true);
    let doc: Value = serde_json::from_str(&doc.to_json().expect("json")).expect("parses");
    let role = |path: &str, method: &str| doc["paths"][path][method]["security"][0]["bearer"][0].clone();
    assert_eq!(role("/v1/orders", "post"), "client");
    assert_eq!(role("/v1/inventory/{sku}", "get"), "client");
    assert_eq!(role("/v1/inventory/{sku}", "put"), "admin");
    assert_eq!(role("/v1/cluster", "get"), "admin");
    assert_eq!(role("/admin/partition", "delete"), "admin");
    assert!(doc["paths"]["/healthz"]["get"].get("security").is_none());
    assert!(doc["paths"]["/v1/inventory/{sku}"]["put"]["responses"]["403"].is_object());
    assert!(doc["paths"]["/v1/orders"]["post"]["responses"]["403"].is_null());

    // Bounds utoipa takes as literals only, against the constants the handlers check.
    let limit = &doc["paths"]["/v1/orders"]["get"]["parameters"][1];
    assert_eq!(
        (limit["name"].as_str(), limit["schema"]["maximum"].as_u64()),
        (Some("limit"), Some(MAX_ORDERS_LISTED.into()))
    );
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["NewOrder"]["properties"]["items"]["maxItems"].as_u64(), Some(MAX_ITEMS as u64));
    assert_eq!(schemas["NewItem"]["properties"]["quantity"]["maximum"].as_u64(), Some(MAX_QUANTITY));

    // The document `router` serves is the one `routes` makes.
    for fault_injection in [false, true] {
        let router = bulkhead_http::router(state(&cluster, fault_injection));
        let req = Request::builder().uri("/openapi.json").body(Body::empty()).expect("request");
        let res = router.oneshot(req).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/json");
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 22).await.expect("body");
        let served: Value = serde_json::from_slice(&bytes).expect("JSON");
        let (_, doc) = routes(fault_injection);
        assert_eq!(served, serde_json::from_str::<Value>(&doc.to_json().expect("json")).expect("parses"));
    }
    cluster.shutdown();
}
