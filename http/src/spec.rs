//! `/openapi.json`, generated from the code: each handler's `#[utoipa::path]` (its path, method,
//! parameters, body and the answers it makes itself, see [`crate::api`]), the types the handlers
//! serialize ([`crate::views`], [`crate::error::ErrorBody`]), and here what every route shares:
//! who may call it ([`crate::auth::required`], the very function the guard asks) and what the edge
//! and the guard answer before a handler runs.
//!
//! [`fn@crate::routes`] registers each route and its operation in one step, so the document lists
//! exactly the routes the router has (the fault-injection routes only where they exist). The
//! document is built and serialized once per router ([`Document`]).

use axum::body::Bytes;
use axum::http::{header, Method};
use axum::response::IntoResponse;
use axum::Extension;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Header, OpenApi, Ref, RefOr, Response};
use utoipa::OpenApi as _;

use crate::auth::Scope;
use crate::error::ErrorBody;

/// What the derive can say: title, description, tags, and the error schema every added answer
/// refers to.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Bulkhead API",
        version = "1",
        description = "Order API v1 of a Bulkhead cluster. Every node serves all of it and forwards to the leader of the shard that owns the request (shard map) with a timed cluster call. Money is integer cents; times are RFC 3339 UTC.\n\nEvery error is JSON (`ApiError`: `error`, a stable code, and `message`); 429 and 503 carry `Retry-After`, 401 `WWW-Authenticate`. A path the API does not have answers 404 and a method a path does not take 405 (with `Allow`), both `ApiError` JSON. Request bodies are limited to 64 KiB (413), each request to `[http] request_timeout_ms` (408).\n\nEvery route but the probes, this document and the dashboard's page needs `Authorization: Bearer <token>`: the client token, or the admin token (which may do everything)."
    ),
    servers((url = "/", description = "The node serving this document")),
    tags(
        (name = "orders"), (name = "inventory"), (name = "payments"), (name = "shipping"),
        (name = "notifications"), (name = "cluster"), (name = "ops", description = "Probes, metrics, this document, the dashboard"),
        (name = "admin", description = "Fault injection: only on nodes started with `fault_injection = true`"),
    ),
    components(schemas(ErrorBody)),
)]
struct Base;

/// The document's start, before any route is registered.
pub fn base() -> OpenApi {
    Base::openapi()
}

/// Name of the bearer security scheme.
const BEARER: &str = "bearer";

/// Completes a document whose paths are registered: the security scheme, and on every operation
/// its scope and the answers every route of that scope can give besides its handler's own.
pub fn finish(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    let mut bearer = Http::new(HttpAuthScheme::Bearer);
    bearer.description = Some(
        "An API token: the client token (place and read orders; read stock, payments, shipments, notifications) or the admin token (everything). Made by `bulkhead tokens` or `bulkhead demo` (`<data-dir>/client.token`, `admin.token`). The role an operation names is the least it needs; the admin token has every role."
            .into(),
    );
    components.security_schemes.insert(BEARER.into(), SecurityScheme::Http(bearer));
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            (Method::GET, &mut item.get),
            (Method::PUT, &mut item.put),
            (Method::POST, &mut item.post),
            (Method::DELETE, &mut item.delete),
            (Method::PATCH, &mut item.patch),
            (Method::HEAD, &mut item.head),
            (Method::OPTIONS, &mut item.options),
            (Method::TRACE, &mut item.trace),
        ];
        for (method, op) in ops {
            if let Some(op) = op.as_mut() {
                complete(op, crate::auth::required(&method, path));
            }
        }
    }
}

/// One operation: its security and scope, the shared answers, and every error as `ApiError`.
fn complete(op: &mut Operation, scope: Scope) {
    let needs = match scope {
        Scope::Public => "Public: no token needed.",
        Scope::Client => "Needs the client or the admin token.",
        Scope::Admin => "Needs the **admin** token.",
    };
    op.description = Some(match op.description.take() {
        Some(d) => format!("{d}\n\n{needs}"),
        None => needs.to_string(),
    });
    if scope != Scope::Public {
        let role = if scope == Scope::Admin { "admin" } else { "client" };
        op.security = Some(vec![SecurityRequirement::new(BEARER, [role])]);
    }
    let mut shared = vec![
        ("408", "The request took longer than `[http] request_timeout_ms` to arrive or to answer (`request_timeout`)."),
        ("429", "This address or this token passed its `[rate_limit]` (`rate_limited`): retry after `Retry-After` seconds."),
        ("500", "The request failed inside this node (`internal`); it is logged."),
        ("503", "This node cannot take the request now (`unavailable`, `too_many_connections`): retry after `Retry-After` seconds."),
    ];
    if op.request_body.is_some() {
        shared.push(("413", "The body is larger than 64 KiB (`too_large`)."));
    }
    if scope != Scope::Public {
        shared.push(("401", "No valid token (`unauthenticated`)."));
    }
    if scope == Scope::Admin {
        shared.push(("403", "A client token on an admin route (`forbidden`)."));
    }
    let responses = &mut op.responses.responses;
    for (status, description) in shared {
        responses.entry(status.to_string()).or_insert_with(|| RefOr::T(Response::new(description)));
    }
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else { continue };
        if !(status.starts_with('4') || status.starts_with('5')) {
            continue;
        }
        if response.content.is_empty() {
            let schema = RefOr::Ref(Ref::from_schema_name("ApiError"));
            response.content.insert("application/json".into(), Content::new(Some(schema)));
        }
        let header = |description: &str| {
            let mut h = Header::new(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer));
            h.description = Some(description.into());
            h
        };
        if matches!(status.as_str(), "429" | "503" | "504") && !response.headers.contains_key("Retry-After") {
            response.headers.insert("Retry-After".into(), header("Seconds to wait before a retry."));
        }
        if status == "401" {
            let mut h = Header::new(utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::String));
            h.description = Some("`Bearer`, with the reason the token was refused.".into());
            response.headers.insert("WWW-Authenticate".into(), h);
        }
    }
}

/// The document, serialized once.
#[derive(Clone)]
pub struct Document(Bytes);

impl Document {
    pub fn new(doc: &OpenApi) -> Self {
        // An `OpenApi` is plain data: serializing it cannot fail.
        Self(doc.to_pretty_json().unwrap_or_default().into())
    }
}

#[utoipa::path(
    get, path = "/openapi.json", tag = "ops", operation_id = "openapi",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI 3.1 document of this node's API.", body = Object, content_type = "application/json"))
)]
pub async fn openapi(Extension(doc): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0)
}
