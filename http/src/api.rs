//! Handlers of API v1. Each one validates, resolves which shard owns the request (shard map), makes
//! one timed call to that shard's leader (listing a customer's orders, or every dead letter: one per
//! orders shard, at once), and maps the answer to HTTP. None of them touches a store directly.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bulkhead_actors::consumer::{ConsumerReply, ConsumerRequest};
use bulkhead_actors::inventory::{InventoryReply, InventoryRequest};
use bulkhead_actors::orders::{
    shard_of_order, DeadLetter, IdemKey, OrderStatus, OrderView, OrdersReply, OrdersRequest, PlaceOrder,
    MAX_ORDERS_LISTED,
};
use bulkhead_actors::payments::{PaymentReply, PaymentRequest};
use bulkhead_cluster::config::stable_hash;
use bulkhead_cluster::membership::NodeView;
use bulkhead_cluster::wire::new_traceparent;
use bulkhead_cluster::{BreakerState, Capability};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

pub use bulkhead_storage::rfc3339;

use crate::error::ApiError;
use crate::ready::{self, Readiness};
use crate::validate;
use crate::AppState;

pub fn order_json(o: &OrderView) -> Value {
    let mut v = json!({
        "order_id": o.order_id.to_string(),
        "customer_id": o.customer_id,
        "items": o.items.iter().map(|i| json!({"sku": i.sku, "quantity": i.quantity})).collect::<Vec<_>>(),
        "lines": o.lines.iter().map(|l| json!({"sku": l.sku, "quantity": l.quantity, "unit_price_cents": l.unit_price_cents})).collect::<Vec<_>>(),
        "total_cents": o.total_cents,
        "status": o.status,
        "history": o.history.iter().map(|h| json!({"at": rfc3339(h.at_ms), "event": h.event})).collect::<Vec<_>>(),
    });
    if let Some(r) = &o.reason {
        v["reason"] = json!(r);
    }
    if let Some(p) = &o.payment_id {
        v["payment_id"] = json!(p);
    }
    v
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    Ok(())
}

/// The raw body, or a JSON error (413 when over the limit) instead of axum's plain-text one.
pub type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn body_bytes(body: Body) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "too_large", format!("the body is larger than {} bytes", crate::BODY_LIMIT))
        } else {
            ApiError::bad_request("the body could not be read")
        }
    })
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request(format!("`{}` is not an order id (a UUID)", raw.chars().take(64).collect::<String>()))
    })
}

/// The orders shard for a new order without an Idempotency-Key: one this node leads if any (no
/// extra hop), else one with a known leader, spread by the order's own randomness.
fn pick_orders_shard(st: &AppState) -> u32 {
    let cluster = &st.cluster;
    let shards: Vec<u32> = cluster.config().capabilities.shards(Capability::Orders).iter().map(|p| p.shard).collect();
    let led_here: Vec<u32> = shards
        .iter()
        .copied()
        .filter(|s| cluster.leader_of(Capability::Orders, *s).as_deref() == Some(cluster.name()))
        .collect();
    let led: Vec<u32> =
        shards.iter().copied().filter(|s| cluster.leader_of(Capability::Orders, *s).is_some()).collect();
    let pool = [led_here, led, shards].into_iter().find(|p| !p.is_empty()).unwrap_or_else(|| vec![0]);
    let spread = Uuid::new_v4().as_u128() as usize;
    pool[spread % pool.len()]
}

fn order_response(st: &AppState, view: OrderView) -> Response {
    let id = view.order_id;
    let body = order_json(&view);
    match (view.status, view.reason.as_deref()) {
        (OrderStatus::Confirmed, _) => {
            st.metrics.confirmed.fetch_add(1, Relaxed);
            (StatusCode::CREATED, Json(body)).into_response()
        }
        (OrderStatus::Pending, _) => {
            st.metrics.pending.fetch_add(1, Relaxed);
            (StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/orders/{id}"))], Json(body)).into_response()
        }
        (OrderStatus::Cancelled, reason) => {
            st.metrics.cancelled.fetch_add(1, Relaxed);
            let (status, code) = match reason {
                Some("payment_declined") => (StatusCode::PAYMENT_REQUIRED, "payment_declined"),
                Some("out_of_stock") => (StatusCode::CONFLICT, "out_of_stock"),
                _ => (StatusCode::CONFLICT, "cancelled"),
            };
            let mut e =
                ApiError::new(status, code, format!("order {id} was cancelled: {}", reason.unwrap_or("cancelled")));
            e.extra = Some(json!({"order_id": id.to_string(), "order": body}));
            e.into_response()
        }
    }
}

pub async fn place_order(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    // Shed before any work on the body (axum has read it, within the edge's body limit and request
    // timeout, so a slow upload never held this permit): past the bound, queueing only makes every
    // answer late. The permit is held until the answer is built (dropped with this future if the
    // client leaves).
    let Ok(_permit) = st.orders_in_flight.clone().try_acquire_owned() else {
        st.metrics.shed.fetch_add(1, Relaxed);
        return Err(ApiError::overloaded());
    };
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let order = validate::new_order(&parse_json(&body)?)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(validate::idempotency_key(v.as_bytes())?),
        None => None,
    };
    // One key, one shard: the key's claim is a write in that shard's Raft group.
    let shard = match key.as_deref() {
        Some(k) => st.cluster.shard_of(Capability::Orders, k.as_bytes()),
        None => pick_orders_shard(&st),
    };
    let body_hash = stable_hash(&serde_json::to_vec(&order).unwrap_or_default());
    let wait_ms = st.cluster.config().timing.wait_budget_ms;
    let place = PlaceOrder {
        shard,
        customer_id: order.customer_id,
        items: order.items,
        payment_token: order.payment_token,
        idempotency: key.map(|key| IdemKey { key, body_hash }),
        wait_ms,
    };
    let timeout = Duration::from_millis(wait_ms + st.cluster.config().timing.call_timeout_ms);
    let req = OrdersRequest::Place(place);
    let started = Instant::now();
    match st.cluster.call_leader::<_, OrdersReply>(Capability::Orders, shard, &req, &new_traceparent(), timeout).await {
        Ok(OrdersReply::Order(view)) => {
            st.metrics.placed.fetch_add(1, Relaxed);
            let left = Duration::from_millis(wait_ms).saturating_sub(started.elapsed());
            let view = match view.status {
                OrderStatus::Pending if left > AWAIT_AGAIN_FROM => await_order(&st, shard, view, left).await,
                _ => view,
            };
            Ok(order_response(&st, view))
        }
        Ok(OrdersReply::IdempotencyConflict { order_id }) => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            );
            e.extra = Some(json!({"order_id": order_id.to_string()}));
            Err(e)
        }
        Ok(OrdersReply::Unavailable(reason)) => Err(ApiError::unavailable(format!(
            "orders shard {shard} could not take the order ({reason}); nothing was recorded, retry later"
        ))),
        Ok(OrdersReply::Uncertain(reason)) => {
            let mut e = ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("orders shard {shard} did not confirm the order in time ({reason}); it may have been recorded: retry with the same Idempotency-Key"),
            );
            e.retry_after = Some(1);
            Err(e)
        }
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_call(e)),
    }
}

/// Below this much of its wait left, a pending order is answered `202` as it is.
const AWAIT_AGAIN_FROM: Duration = Duration::from_millis(20);

/// A `Place` answered pending before its wait was over: the shard's leadership moved mid-saga
/// (a hand-over, a failover). Waits out the rest on the shard's leader now; any failure keeps the
/// pending view (the order is recorded; `202` with its location is still the truth).
async fn await_order(st: &AppState, shard: u32, view: OrderView, left: Duration) -> OrderView {
    let req = OrdersRequest::Await { order_id: view.order_id, wait_ms: left.as_millis() as u64 };
    let timeout = left + Duration::from_millis(st.cluster.config().timing.call_timeout_ms);
    match st.cluster.call_leader::<_, OrdersReply>(Capability::Orders, shard, &req, &new_traceparent(), timeout).await {
        Ok(OrdersReply::Order(now)) if now.order_id == view.order_id => now,
        _ => view,
    }
}

fn unexpected<T: std::fmt::Debug>(reply: T) -> ApiError {
    tracing::warn!(?reply, "unexpected reply for an API request");
    ApiError::unavailable("the capability is not ready to answer; retry later")
}

/// One timed call to the leader of an orders shard.
async fn orders_call(
    st: &AppState,
    shard: u32,
    req: &OrdersRequest,
) -> Result<OrdersReply, bulkhead_cluster::CallError> {
    let t = Duration::from_millis(st.cluster.config().timing.call_timeout_ms);
    st.cluster.call_leader::<_, OrdersReply>(Capability::Orders, shard, req, &new_traceparent(), t).await
}

/// The orders shards, as the shard map lists them.
fn orders_shards(st: &AppState) -> Vec<u32> {
    st.cluster.config().capabilities.shards(Capability::Orders).iter().map(|p| p.shard).collect()
}

/// The shard an order id names, if the shard map has it (ids are not guessed at otherwise).
fn shard_of_id(st: &AppState, id: &Uuid) -> Option<u32> {
    let shard = shard_of_order(id);
    orders_shards(st).contains(&shard).then_some(shard)
}

pub async fn get_order(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    let shard = shard_of_id(&st, &id).ok_or_else(|| ApiError::not_found(format!("no order {id}")))?;
    match orders_call(&st, shard, &OrdersRequest::Get { order_id: id }).await {
        Ok(OrdersReply::Order(view)) => Ok(Json(order_json(&view)).into_response()),
        Ok(OrdersReply::NotFound) => Err(ApiError::not_found(format!("no order {id}"))),
        Ok(OrdersReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

#[derive(Deserialize)]
pub struct ByCustomer {
    customer_id: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /v1/orders?customer_id=[&limit=][&before=]`: a customer's orders, newest first. Every
/// orders shard's leader is asked at once (a linearizable read each) and the answers merged; a
/// shard that cannot answer makes the whole answer 503, never a silently shorter list. `next_before`
/// is the id to pass as `before` for the next page (`null` on the last page).
pub async fn list_orders(State(st): State<AppState>, Query(q): Query<ByCustomer>) -> Result<Response, ApiError> {
    let customer_id = validate::customer_id(q.customer_id.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => 50,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if (1..=MAX_ORDERS_LISTED).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`limit` must be a whole number from 1 to {MAX_ORDERS_LISTED}"
                )))
            }
        },
    };
    let before = q.before.as_deref().map(parse_order_id).transpose()?;
    let mut calls = tokio::task::JoinSet::new();
    for shard in orders_shards(&st) {
        let (st, customer_id) = (st.clone(), customer_id.clone());
        calls.spawn(async move {
            let req = OrdersRequest::ByCustomer { shard, customer_id, before, limit: limit + 1 };
            (shard, orders_call(&st, shard, &req).await)
        });
    }
    let mut orders = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let Ok((shard, r)) = joined else { return Err(ApiError::unavailable("a shard lookup failed; retry later")) };
        match r {
            Ok(OrdersReply::Orders(list)) => orders.extend(list),
            Ok(OrdersReply::Unavailable(reason)) => {
                return Err(ApiError::unavailable(format!("orders shard {shard}: {reason}; retry later")))
            }
            Ok(other) => return Err(unexpected(other)),
            Err(e) => return Err(ApiError::from_read(e)),
        }
    }
    orders.sort_by_key(|o| std::cmp::Reverse(o.order_id));
    let more = orders.len() > limit as usize;
    orders.truncate(limit as usize);
    let next = if more { orders.last().map(|o| json!(o.order_id.to_string())) } else { None };
    Ok(Json(json!({
        "customer_id": customer_id,
        "orders": orders.iter().map(order_json).collect::<Vec<_>>(),
        "next_before": next.unwrap_or(Value::Null),
    }))
    .into_response())
}

async fn inventory_call(st: &AppState, sku: &str, req: InventoryRequest) -> Result<Response, ApiError> {
    let shard = st.cluster.shard_of(Capability::Inventory, sku.as_bytes());
    let t = Duration::from_millis(st.cluster.config().timing.call_timeout_ms);
    match st.cluster.call_leader::<_, InventoryReply>(Capability::Inventory, shard, &req, &new_traceparent(), t).await {
        Ok(InventoryReply::Stock(s)) => Ok(Json(s).into_response()),
        Ok(InventoryReply::NotFound) => Err(ApiError::not_found(format!("no sku {sku}"))),
        Ok(InventoryReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

pub async fn get_stock(State(st): State<AppState>, Path(sku): Path<String>) -> Result<Response, ApiError> {
    let sku = validate::sku(&sku)?;
    inventory_call(&st, &sku.clone(), InventoryRequest::Get { sku }).await
}

pub async fn put_stock(
    State(st): State<AppState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sku = validate::sku(&sku)?;
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let (available, price_cents) = validate::stock_update(&parse_json(&body)?)?;
    inventory_call(&st, &sku.clone(), InventoryRequest::Set { sku, available, price_cents }).await
}

#[derive(Deserialize)]
pub struct ByOrder {
    order_id: Option<String>,
}

fn order_param(q: &ByOrder) -> Result<Uuid, ApiError> {
    match &q.order_id {
        Some(s) => parse_order_id(s),
        None => Err(ApiError::bad_request("the `order_id` query parameter is required")),
    }
}

pub async fn list_payments(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let id = order_param(&q)?;
    let shard = st.cluster.shard_of(Capability::Payments, id.as_bytes());
    let t = Duration::from_millis(st.cluster.config().timing.call_timeout_ms);
    let req = PaymentRequest::List { order_id: id };
    match st.cluster.call_leader::<_, PaymentReply>(Capability::Payments, shard, &req, &new_traceparent(), t).await {
        Ok(PaymentReply::Payments(list)) => Ok(Json(json!({"order_id": id.to_string(), "payments": list.iter().map(|p| json!({
            "payment_id": p.payment_id, "amount_cents": p.amount_cents, "status": p.status, "attempts": p.attempts, "at": rfc3339(p.at_ms),
        })).collect::<Vec<_>>()}))
        .into_response()),
        Ok(PaymentReply::TransientError { reason }) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

async fn list_deliveries(st: &AppState, cap: Capability, q: &ByOrder, field: &str) -> Result<Response, ApiError> {
    let id = order_param(q)?;
    let shard = st.cluster.shard_of(cap, id.as_bytes());
    let t = Duration::from_millis(st.cluster.config().timing.call_timeout_ms);
    let req = ConsumerRequest::List { order_id: id };
    match st.cluster.call_leader::<_, ConsumerReply>(cap, shard, &req, &new_traceparent(), t).await {
        Ok(ConsumerReply::Listed(list)) => {
            Ok(Json(json!({"order_id": id.to_string(), field: list.iter().map(|d| json!({
            "id": d.id, "event_id": d.event_id.to_string(), "detail": d.detail, "at": rfc3339(d.created_ms),
        })).collect::<Vec<_>>()}))
            .into_response())
        }
        Ok(ConsumerReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

pub async fn list_shipments(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    list_deliveries(&st, Capability::Shipping, &q, "shipments").await
}

pub async fn list_notifications(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    list_deliveries(&st, Capability::Notifications, &q, "notifications").await
}

fn dead_letter_json(shard: u32, d: &DeadLetter) -> Value {
    json!({
        "order_id": d.order_id.to_string(), "event_id": d.event_id.to_string(), "event": d.event,
        "destination": d.destination, "attempts": d.attempts, "last_error": d.last_error,
        "at": rfc3339(d.at_ms), "shard": shard,
    })
}

/// `GET /v1/dead-letters[?order_id=]`: what the outbox relays gave up on. With an order id, only
/// its shard's leader is asked; without, every orders shard's leader at once, and the answer lists
/// what the reachable ones hold plus the shards that could not be asked (503 only if none answered).
pub async fn list_dead_letters(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let order_id = q.order_id.as_deref().map(parse_order_id).transpose()?;
    let shards: Vec<u32> = match order_id {
        Some(id) => vec![shard_of_id(&st, &id).ok_or_else(|| ApiError::not_found(format!("no order {id}")))?],
        None => orders_shards(&st),
    };
    let mut calls = tokio::task::JoinSet::new();
    for shard in shards {
        let st = st.clone();
        calls.spawn(
            async move { (shard, orders_call(&st, shard, &OrdersRequest::DeadLetters { shard, order_id }).await) },
        );
    }
    let (mut list, mut unreachable, mut answered) = (Vec::new(), Vec::new(), 0usize);
    while let Some(joined) = calls.join_next().await {
        let Ok((shard, r)) = joined else { continue };
        match r {
            Ok(OrdersReply::DeadLetters(ds)) => {
                answered += 1;
                list.extend(ds.iter().map(|d| (d.order_id, d.at_ms, dead_letter_json(shard, d))));
            }
            Ok(other) => {
                tracing::warn!(?other, shard, "unexpected reply listing dead letters");
                unreachable.push(json!({"shard": shard, "error": format!("{other:?}")}));
            }
            Err(e) => {
                tracing::warn!(error = %e, shard, "cannot list dead letters");
                unreachable.push(json!({"shard": shard, "error": e.to_string()}));
            }
        }
    }
    if answered == 0 {
        return Err(ApiError::unavailable("no orders shard answered; retry later"));
    }
    list.sort_by_key(|(order, at, _)| (*order, *at));
    let list: Vec<Value> = list.into_iter().map(|(_, _, v)| v).collect();
    Ok(Json(json!({"dead_letters": list, "unreachable": unreachable})).into_response())
}

/// `GET /v1/cluster`: every node as this node sees it, and per capability who serves it.
pub fn cluster_json(st: &AppState) -> Value {
    let view = st.cluster.view();
    // `NodeView` serialises to exactly the API's node object (`reason` only when there is one).
    let nodes: Vec<&NodeView> = view.values().collect();
    let mut caps = serde_json::Map::new();
    let breakers = st.cluster.breaker_states();
    for cap in Capability::ALL {
        let members = st.cluster.config().capabilities.nodes(cap).to_vec();
        let healthy: Vec<&String> = members.iter().filter(|m| st.cluster.is_routable(cap, m)).collect();
        // Per member as this node's call path sees it; a member never called is closed.
        let per_member: serde_json::Map<String, Value> = members
            .iter()
            .map(|m| {
                let state = breakers.get(&(cap, m.clone())).copied().unwrap_or(BreakerState::Closed);
                (m.clone(), json!(state.as_str()))
            })
            .collect();
        let worst = members
            .iter()
            .filter_map(|m| breakers.get(&(cap, m.clone())).copied())
            .max()
            .unwrap_or(BreakerState::Closed);
        caps.insert(
            cap.to_string(),
            json!({"members": members, "healthy": healthy, "breaker": worst.as_str(), "breakers": per_member}),
        );
    }
    json!({"node": st.cluster.name(), "nodes": nodes, "capabilities": caps, "shards": shards_json(st)})
}

/// One entry per shard of every replicated capability: this node's replica's view of it (role and
/// lag of every replica are known on the leader), or only the leader this node would call.
fn shards_json(st: &AppState) -> Vec<Value> {
    let map = &st.cluster.config().capabilities;
    let mut out = Vec::new();
    for cap in Capability::ALL {
        for p in map.shards(cap) {
            let group = bulkhead_cluster::raft::GroupId { capability: cap, shard: p.shard };
            match st.cluster.raft().get(group) {
                Some(r) => out.push(json!(r.status())),
                None => out.push(json!({
                    "capability": cap, "shard": p.shard, "leader": st.cluster.leader_of(cap, p.shard),
                    "term": null, "replicas": p.replicas.iter().map(|n| json!({"node": n, "role": null, "lag": null})).collect::<Vec<_>>(),
                })),
            }
        }
    }
    out
}

pub async fn cluster(State(st): State<AppState>) -> Json<Value> {
    Json(cluster_json(&st))
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `/readyz`: 200 when [`crate::ready::judge`] says ready; 503 with the problems when not, and
/// 503 `{"status":"draining"}` from the moment the node starts stopping.
pub async fn readyz(State(st): State<AppState>) -> Response {
    match ready::judge(&ready::gather(&st.cluster, st.drain.is_draining())) {
        Readiness::Ready => (StatusCode::OK, Json(json!({"status": "ready"}))).into_response(),
        Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response(),
        Readiness::NotReady(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({"status": "not_ready", "problems": problems})),
        )
            .into_response(),
    }
}

/// The body every admin action takes: a JSON object (`{}` will do; a `"reason"` string is logged).
/// Insisting on `Content-Type: application/json` is what keeps a cross-site form or a plain
/// `<img>`/`fetch` without preflight from reaching an admin action (see [`crate::auth`]).
fn admin_body(headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    require_json(headers)?;
    let v = parse_json(&body_bytes(body)?)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad_request("the body must be a JSON object, e.g. {} or {\"reason\": \"...\"}"));
    };
    match obj.get("reason") {
        None => Ok(String::new()),
        Some(Value::String(r)) if r.len() <= 256 => Ok(r.clone()),
        Some(_) => Err(ApiError::bad_request("`reason` must be a string of at most 256 bytes")),
    }
}

/// `POST /admin/panic/{capability}`: makes this node's worker of that capability panic. Exists only
/// when the node was started with `fault_injection = true`.
pub async fn inject_panic(
    State(st): State<AppState>,
    Path(cap): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !st.fault_injection {
        return Err(ApiError::not_found("fault injection is not enabled on this node"));
    }
    let reason = admin_body(&headers, body)?;
    let cap: Capability = cap.parse().map_err(ApiError::bad_request)?;
    if !st.cluster.config().hosted().contains(&cap) {
        return Err(ApiError::not_found(format!("this node does not host {cap}")));
    }
    let node = st.cluster.name().to_string();
    let tp = new_traceparent();
    let t = Duration::from_millis(500);
    // The worker dies instead of answering; the call's failure is the expected outcome.
    let result = match cap {
        Capability::Orders => st
            .cluster
            .call_with_timeout::<_, OrdersReply>(cap, &node, &OrdersRequest::InjectPanic, &tp, t)
            .await
            .map(|_| ()),
        Capability::Inventory => st
            .cluster
            .call_with_timeout::<_, InventoryReply>(cap, &node, &InventoryRequest::InjectPanic, &tp, t)
            .await
            .map(|_| ()),
        Capability::Payments => st
            .cluster
            .call_with_timeout::<_, PaymentReply>(cap, &node, &PaymentRequest::InjectPanic, &tp, t)
            .await
            .map(|_| ()),
        Capability::Shipping | Capability::Notifications => st
            .cluster
            .call_with_timeout::<_, ConsumerReply>(cap, &node, &ConsumerRequest::InjectPanic, &tp, t)
            .await
            .map(|_| ()),
    };
    tracing::warn!(capability = %cap, ?result, %reason, "fault injected: worker panic");
    Ok((StatusCode::ACCEPTED, Json(json!({"injected": "panic", "capability": cap, "node": node}))).into_response())
}

/// `POST /admin/partition`: cuts every cluster link of this node silently (see `cluster::link`);
/// `DELETE /admin/partition` heals them. HTTP stays up. Exists only with `fault_injection = true`.
pub async fn partition(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    set_partition(&st, true, &headers, body)
}

pub async fn heal_partition(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    set_partition(&st, false, &headers, body)
}

fn set_partition(st: &AppState, cut: bool, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    if !st.fault_injection {
        return Err(ApiError::not_found("fault injection is not enabled on this node"));
    }
    let reason = admin_body(headers, body)?;
    st.cluster.link_faults().set_cut(cut);
    tracing::warn!(cut, %reason, "fault injected: cluster links {}", if cut { "cut" } else { "healed" });
    let node = st.cluster.name();
    Ok((StatusCode::ACCEPTED, Json(json!({"injected": "partition", "cut": cut, "node": node}))).into_response())
}
