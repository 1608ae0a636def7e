//! Handlers of API v1. Each one validates, resolves which shard owns the request (shard map), makes
//! one timed call to that shard's leader (listing a customer's orders, or every dead letter: one per
//! orders shard, at once), and maps the answer to HTTP. None of them touches a store directly.
//!
//! Each handler's `#[utoipa::path]` is its part of `/openapi.json`: its path and method (from which
//! [`crate::router`] also routes it), parameters, body, and the answers it makes itself. What every
//! route can answer (401/403 by its scope, 408, 413, 429, 500, 503) is added by [`crate::spec`].

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bulkhead_actors::consumer::{self, ConsumerReply};
use bulkhead_actors::inventory::{self, InventoryReply};
use bulkhead_actors::orders::client::{NewOrder as Ordered, Placement};
use bulkhead_actors::orders::{self, CancelReason, IdemKey, OrderStatus, OrderView, OrdersReply, MAX_ORDERS_LISTED};
use bulkhead_actors::payments::{self, PaymentReply};
use bulkhead_actors::Capability;
use bulkhead_cluster::BreakerState;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;
use uuid::Uuid;

pub use crate::views::rfc3339;

use crate::auth::Scope;
use crate::clients::{key_scope, KeyScope};
use crate::error::{ApiError, ErrorBody};
use crate::observe::{carry, traceparent};
use crate::ready;
use crate::validate::{self, AdminAction, NewOrder, StockUpdate};
use crate::views::{
    CapabilityView, ClusterNode, ClusterView, DeadLetter as DeadLetterView, DeadLetterList, Delivery, Digests, Health,
    Liveness, NotificationList, Order, OrderList, PanicFault, PanicInjected, PartitionFault, PartitionSet, Payment,
    PaymentList, Readiness, ReadyState, ReplicaDigest, Shard, ShipmentList, Stock, UnreachableShard,
};
use crate::AppState;

/// `Query`, with its rejection (a repeated or malformed parameter) as the API's JSON `400`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(q)) => Ok(Query(q)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// `Path`, with its rejection (a segment that is not UTF-8 once decoded) as the API's JSON `400`.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(p)) => Ok(Path(p)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
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

fn order_response(st: &AppState, view: OrderView) -> Response {
    let id = view.order_id;
    let body = Order::from(&view);
    match (view.status, view.reason) {
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
                Some(CancelReason::PaymentDeclined) => (StatusCode::PAYMENT_REQUIRED, "payment_declined"),
                Some(CancelReason::OutOfStock) => (StatusCode::CONFLICT, "out_of_stock"),
                Some(CancelReason::ReservationExpired | CancelReason::ReservationWindowPassed) | None => {
                    (StatusCode::CONFLICT, "cancelled")
                }
            };
            let why = reason.map_or("cancelled", CancelReason::as_str);
            let mut e = ApiError::new(status, code, format!("order {id} was cancelled: {why}"));
            e.order_id = Some(id);
            e.order = Some(Box::new(body));
            e.into_response()
        }
    }
}

/// The optional header of `POST /v1/orders` (read by hand: [`validate::idempotency_key`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// 1-128 visible ASCII characters. The same key with the same body answers the same order
    /// (placed once); with another body, 422.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 128,
        pattern = "^[\\x21-\\x7e]{1,128}$")]
    pub key: Option<String>,
}

#[utoipa::path(
    post, path = "/v1/orders", tag = "orders", operation_id = "placeOrder",
    summary = "Place an order",
    description = "Runs the order saga (persist pending → reserve stock → charge → confirm) and waits for it up to the wait budget (default 2 s). The order is durable before any 201/202/402/409 answer.",
    params(IdempotencyKey),
    request_body(content = NewOrder, content_type = "application/json"),
    responses(
        (status = 201, description = "Confirmed within the wait budget (`status: confirmed`).", body = Order),
        (status = 202, description = "Still `pending` when the wait budget ran out; the saga goes on. Poll `Location`.", body = Order,
            headers(("Location" = String, description = "`/v1/orders/{id}` of the order."))),
        (status = 400, description = "The body or the Idempotency-Key is invalid (`invalid_request`); nothing was recorded."),
        (status = 402, description = "Payment declined (`payment_declined`): the order exists, `cancelled`; `order_id` and `order` say which.", body = ErrorBody),
        (status = 409, description = "Out of stock (`out_of_stock`) or otherwise cancelled (`cancelled`): the order exists, `cancelled`; `order_id` and `order` say which.", body = ErrorBody),
        (status = 415, description = "The body is not `Content-Type: application/json` (`unsupported_media_type`)."),
        (status = 422, description = "This Idempotency-Key was used with another body (`idempotency_key_reused`); `order_id` is the order it placed."),
        (status = 429, description = "This node already handles `[limits] orders_in_flight` orders (`overloaded`), or a rate limit was passed (`rate_limited`); nothing was recorded."),
        (status = 502, description = "The orders shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The order's shard found no leader within the order's budget (a majority of its replicas is down or unreachable), or the node sheds load (`unavailable`); nothing was recorded. The front itself retries through an election within the budget."),
        (status = 504, description = "The leader did not answer in time (`timeout`, `lost`): the order may exist; retry with the same Idempotency-Key. A keyed order is asked again on the new leader by the front itself within its budget, so it sees 504 only when no majority answered in that time."),
    )
)]
pub async fn place_order(
    State(st): State<AppState>,
    keys: Option<Extension<KeyScope>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Shed before any work on the body (axum has read it, within the edge's body limit and request
    // timeout, so a slow upload never held this permit): past the bound, queueing only makes every
    // answer late. The permit is held until the answer is built (dropped with this future if the
    // client leaves).
    let Some(_permit) = st.orders_in_flight.try_enter() else {
        st.metrics.shed.fetch_add(1, Relaxed);
        return Err(ApiError::overloaded());
    };
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let order = validate::new_order(&parse_json(&body)?)?;
    // A named client's keys are its own: scoped by its name before they meet anyone else's.
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let key = validate::idempotency_key(v.as_bytes())?;
            Some(key_scope(&keys.map(|Extension(k)| k).unwrap_or(KeyScope(None)), key))
        }
        None => None,
    };
    // The validated order, re-serialized: one body, one fingerprint, however the client spaced it
    // (only a key is compared with a body, so only a keyed order is fingerprinted).
    let key = key.map(|key| {
        let body = bulkhead_storage::BodyFingerprint::of(&serde_json::to_vec(&order).unwrap_or_default());
        IdemKey { key, body }
    });
    let keyed = key.is_some();
    let NewOrder { customer_id, items, payment_token } = order;
    let order = Ordered { customer_id, items: items.into_iter().map(Into::into).collect(), payment_token };
    let placement = orders::client::Client::new(&st.cluster).place(order, key, &traceparent()).await;
    let shard = placement.shard;
    let placed = placed_answer(&st, placement).await;
    placed.map_err(|e| if keyed { e } else { advise_without_key(e, shard) })
}

/// "Retry with the same Idempotency-Key" is no advice for an order sent without one: a `504` of
/// an unkeyed order says what the client can do instead.
fn advise_without_key(mut e: ApiError, shard: u32) -> ApiError {
    if e.status == StatusCode::GATEWAY_TIMEOUT {
        e.message = format!(
            "orders shard {shard} did not confirm the order in time; it may have been recorded, and this order \
             had no Idempotency-Key, so a retry could place a second one: look it up by customer, and send a key \
             with every order"
        );
    }
    e
}

/// The answer to a `Place`, from what [`orders::client::Client::place`] came back with.
async fn placed_answer(st: &AppState, placement: Placement) -> Result<Response, ApiError> {
    let Placement { shard, budget, placed } = placement;
    match placed {
        Ok(OrdersReply::Order(view)) => {
            st.metrics.placed.fetch_add(1, Relaxed);
            let left = budget.wait_until.saturating_duration_since(Instant::now());
            let view = match view.status {
                OrderStatus::Pending if left > AWAIT_AGAIN_FROM => {
                    orders::client::Client::new(&st.cluster).await_order(shard, view, left, &traceparent()).await
                }
                _ => view,
            };
            Ok(order_response(st, view))
        }
        Ok(OrdersReply::IdempotencyConflict { order_id }) => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request body",
            );
            e.order_id = Some(order_id);
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

fn unexpected<T: std::fmt::Debug>(reply: T) -> ApiError {
    tracing::warn!(?reply, "unexpected reply for an API request");
    ApiError::unavailable("the capability is not ready to answer; retry later")
}

#[utoipa::path(
    get, path = "/v1/orders/{id}", tag = "orders", operation_id = "getOrder",
    summary = "One order, read on its shard's leader",
    params(("id" = Uuid, Path, description = "The order id.")),
    responses(
        (status = 200, description = "The order.", body = Order),
        (status = 400, description = "`id` is not a UUID (`invalid_request`)."),
        (status = 404, description = "No such order (`not_found`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The order's shard cannot answer right now (`unavailable`)."),
    )
)]
pub async fn get_order(State(st): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_order_id(&id)?;
    let read = orders::client::Client::new(&st.cluster).get(id, &traceparent()).await;
    match read.ok_or_else(|| ApiError::not_found(format!("no order {id}")))? {
        Ok(OrdersReply::Order(view)) => Ok(Json(Order::from(&view)).into_response()),
        Ok(OrdersReply::NotFound) => Err(ApiError::not_found(format!("no order {id}"))),
        Ok(OrdersReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

/// The query of `GET /v1/orders`. Every field is read as text and checked by the handler, so each
/// refusal is its own JSON `400` naming the parameter.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ByCustomer {
    /// The customer: 1-128 characters, not only whitespace, no control characters.
    #[param(value_type = String, required = true, min_length = 1, max_length = 128,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$")]
    customer_id: Option<String>,
    /// Orders per page, 1-500 (`MAX_ORDERS_LISTED`); 50 when absent.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// Only orders older than this order id: the `next_before` of the page before.
    #[param(value_type = Uuid, required = false)]
    before: Option<String>,
}

/// `GET /v1/orders?customer_id=[&limit=][&before=]`: a customer's orders, newest first. Every
/// orders shard's leader is asked at once (a linearizable read each) and the answers merged; a
/// shard that cannot answer makes the whole answer 503, never a silently shorter list. `next_before`
/// is the id to pass as `before` for the next page (`null` on the last page).
#[utoipa::path(
    get, path = "/v1/orders", tag = "orders", operation_id = "listOrders",
    summary = "A customer's orders, newest first",
    description = "Every orders shard's leader is asked at once (a linearizable read each); a shard that cannot answer makes the whole answer 503, never a shorter list.",
    params(ByCustomer),
    responses(
        (status = 200, description = "One page of the customer's orders.", body = OrderList),
        (status = 400, description = "A parameter is missing, repeated or invalid (`invalid_request`)."),
        (status = 502, description = "A shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "An orders shard cannot answer right now (`unavailable`)."),
    )
)]
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
    let client = orders::client::Client::new(&st.cluster);
    for shard in client.shards() {
        let (client, customer_id) = (client.clone(), customer_id.clone());
        calls.spawn(carry(async move {
            (shard, client.by_customer(shard, customer_id, before, limit + 1, &traceparent()).await)
        }));
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
    let next_before = if more { orders.last().map(|o| o.order_id) } else { None };
    let orders = orders.iter().map(Order::from).collect();
    Ok(Json(OrderList { customer_id, orders, next_before }).into_response())
}

/// A SKU's stock as the inventory shard's leader answered a read or a setting of it.
fn stock_answer(
    sku: &str,
    answered: Result<InventoryReply, bulkhead_cluster::CallError>,
) -> Result<Response, ApiError> {
    match answered {
        Ok(InventoryReply::Stock(s)) => Ok(Json(Stock::from(s)).into_response()),
        Ok(InventoryReply::NotFound) => Err(ApiError::not_found(format!("no sku {sku}"))),
        Ok(InventoryReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

#[utoipa::path(
    get, path = "/v1/inventory/{sku}", tag = "inventory", operation_id = "getStock",
    summary = "One SKU's stock",
    params(SkuParam),
    responses(
        (status = 200, description = "The stock.", body = Stock),
        (status = 400, description = "`sku` is not a SKU (`invalid_request`)."),
        (status = 404, description = "No such SKU (`not_found`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The SKU's shard cannot answer right now (`unavailable`)."),
    )
)]
pub async fn get_stock(State(st): State<AppState>, Path(sku): Path<String>) -> Result<Response, ApiError> {
    let sku = validate::sku(&sku)?;
    stock_answer(&sku, inventory::client::Client::new(&st.cluster).stock(&sku, &traceparent()).await)
}

/// The `{sku}` of `/v1/inventory/{sku}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SkuParam {
    /// 1-64 ASCII letters, digits, `-`, `_` or `.` (what `validate::sku` accepts).
    #[param(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "widget-1")]
    pub sku: String,
}

#[utoipa::path(
    put, path = "/v1/inventory/{sku}", tag = "inventory", operation_id = "putStock",
    summary = "Set one SKU's stock and price",
    description = "Creates the SKU if it does not exist.",
    params(SkuParam),
    request_body(content = StockUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The stock after the update.", body = Stock),
        (status = 400, description = "`sku` or the body is invalid (`invalid_request`); nothing was changed."),
        (status = 415, description = "The body is not `Content-Type: application/json` (`unsupported_media_type`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The SKU's shard cannot answer right now (`unavailable`)."),
        (status = 504, description = "The leader did not answer in time (`timeout`, `lost`): the update may have been applied."),
    )
)]
pub async fn put_stock(
    State(st): State<AppState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sku = validate::sku(&sku)?;
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let StockUpdate { available, price_cents } = validate::stock_update(&parse_json(&body)?)?;
    let set = inventory::client::Client::new(&st.cluster).set_stock(&sku, available, price_cents, &traceparent()).await;
    stock_answer(&sku, set)
}

/// The query of the lists of one order's payments, shipments and notifications.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ByOrder {
    /// The order.
    #[param(value_type = Uuid, required = true)]
    order_id: Option<String>,
}

/// The query of `GET /v1/dead-letters`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterFilter {
    /// Only this order's dead letters.
    #[param(value_type = Uuid, required = false)]
    order_id: Option<String>,
}

fn order_param(q: &ByOrder) -> Result<Uuid, ApiError> {
    match &q.order_id {
        Some(s) => parse_order_id(s),
        None => Err(ApiError::bad_request("the `order_id` query parameter is required")),
    }
}

#[utoipa::path(
    get, path = "/v1/payments", tag = "payments", operation_id = "listPayments",
    summary = "The charges recorded for an order",
    params(ByOrder),
    responses(
        (status = 200, description = "The charges.", body = PaymentList),
        (status = 400, description = "`order_id` is missing, repeated or not a UUID (`invalid_request`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The payments shard cannot answer right now (`unavailable`)."),
    )
)]
pub async fn list_payments(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let id = order_param(&q)?;
    match payments::client::Client::new(&st.cluster).charges(id, &traceparent()).await {
        Ok(PaymentReply::Payments(list)) => {
            Ok(Json(PaymentList { order_id: id, payments: list.iter().map(Payment::from).collect() }).into_response())
        }
        Ok(PaymentReply::TransientError { reason }) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

async fn list_deliveries(st: &AppState, cap: Capability, q: &ByOrder) -> Result<(Uuid, Vec<Delivery>), ApiError> {
    let id = order_param(q)?;
    match consumer::client::Client::new(&st.cluster, cap).deliveries(id, &traceparent()).await {
        Ok(ConsumerReply::Listed(list)) => Ok((id, list.iter().map(Delivery::from).collect())),
        Ok(ConsumerReply::Unavailable(reason)) => Err(ApiError::unavailable(reason)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(ApiError::from_read(e)),
    }
}

#[utoipa::path(
    get, path = "/v1/shipments", tag = "shipping", operation_id = "listShipments",
    summary = "The shipments made for an order",
    params(ByOrder),
    responses(
        (status = 200, description = "The shipments.", body = ShipmentList),
        (status = 400, description = "`order_id` is missing, repeated or not a UUID (`invalid_request`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The shipping shard cannot answer right now (`unavailable`)."),
    )
)]
pub async fn list_shipments(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let (order_id, shipments) = list_deliveries(&st, Capability::Shipping, &q).await?;
    Ok(Json(ShipmentList { order_id, shipments }).into_response())
}

#[utoipa::path(
    get, path = "/v1/notifications", tag = "notifications", operation_id = "listNotifications",
    summary = "The notifications sent for an order",
    params(ByOrder),
    responses(
        (status = 200, description = "The notifications.", body = NotificationList),
        (status = 400, description = "`order_id` is missing, repeated or not a UUID (`invalid_request`)."),
        (status = 502, description = "The shard's leader could not handle the request (`rejected`)."),
        (status = 503, description = "The notifications shard cannot answer right now (`unavailable`)."),
    )
)]
pub async fn list_notifications(State(st): State<AppState>, Query(q): Query<ByOrder>) -> Result<Response, ApiError> {
    let (order_id, notifications) = list_deliveries(&st, Capability::Notifications, &q).await?;
    Ok(Json(NotificationList { order_id, notifications }).into_response())
}

/// `GET /v1/dead-letters[?order_id=]`: what the outbox relays gave up on. With an order id, only
/// its shard's leader is asked; without, every orders shard's leader at once, and the answer lists
/// what the reachable ones hold plus the shards that could not be asked (503 only if none answered).
#[utoipa::path(
    get, path = "/v1/dead-letters", tag = "orders", operation_id = "listDeadLetters",
    summary = "Outbox entries the relays gave up on",
    description = "An outbox entry (e.g. `OrderConfirmed` for shipping) whose destination answered with a failure 5 times in a row is moved to its orders shard's dead letters instead of blocking that destination; unreachable destinations are retried forever instead. Without `order_id`, every orders shard's leader is asked at once and the shards that could not be asked are listed in `unreachable`; with it, only the order's shard.",
    params(DeadLetterFilter),
    responses(
        (status = 200, description = "The dead letters, by order id, then time.", body = DeadLetterList),
        (status = 400, description = "`order_id` is repeated or not a UUID (`invalid_request`)."),
        (status = 404, description = "`order_id` names no orders shard (`not_found`)."),
        (status = 503, description = "No orders shard answered (`unavailable`)."),
    )
)]
pub async fn list_dead_letters(
    State(st): State<AppState>,
    Query(q): Query<DeadLetterFilter>,
) -> Result<Response, ApiError> {
    let order_id = q.order_id.as_deref().map(parse_order_id).transpose()?;
    let client = orders::client::Client::new(&st.cluster);
    let shards: Vec<u32> = match order_id {
        Some(id) => vec![client.shard_of_id(&id).ok_or_else(|| ApiError::not_found(format!("no order {id}")))?],
        None => client.shards(),
    };
    let mut calls = tokio::task::JoinSet::new();
    for shard in shards {
        let client = client.clone();
        calls.spawn(carry(async move { (shard, client.dead_letters(shard, order_id, &traceparent()).await) }));
    }
    let (mut list, mut unreachable, mut answered) = (Vec::new(), Vec::new(), 0usize);
    while let Some(joined) = calls.join_next().await {
        let Ok((shard, r)) = joined else { continue };
        match r {
            Ok(OrdersReply::DeadLetters(ds)) => {
                answered += 1;
                list.extend(ds.iter().map(|d| (d.order_id, d.at_ms, DeadLetterView::new(shard, d))));
            }
            Ok(other) => {
                tracing::warn!(?other, shard, "unexpected reply listing dead letters");
                unreachable.push(UnreachableShard { shard, error: format!("{other:?}") });
            }
            Err(e) => {
                tracing::warn!(error = %e, shard, "cannot list dead letters");
                unreachable.push(UnreachableShard { shard, error: e.to_string() });
            }
        }
    }
    if answered == 0 {
        return Err(ApiError::unavailable("no orders shard answered; retry later"));
    }
    list.sort_by_key(|(order, at, _)| (*order, *at));
    let dead_letters = list.into_iter().map(|(_, _, v)| v).collect();
    Ok(Json(DeadLetterList { dead_letters, unreachable }).into_response())
}

/// `GET /v1/cluster`: every node as this node sees it, and per capability who serves it.
pub fn cluster_view(st: &AppState) -> ClusterView {
    let view = st.cluster.view();
    let nodes = view.values().map(ClusterNode::from).collect();
    let breakers = st.cluster.breaker_states();
    let mut capabilities = std::collections::BTreeMap::new();
    for cap in Capability::ALL {
        let members = st.cluster.config().shard_map.nodes(cap).to_vec();
        let healthy = members.iter().filter(|m| st.cluster.is_routable(cap, m)).cloned().collect();
        // Per member as this node's call path sees it; a member never called is closed.
        let per_member = members
            .iter()
            .map(|m| (m.clone(), breakers.get(&(cap.id(), m.clone())).copied().unwrap_or(BreakerState::Closed).into()))
            .collect();
        let worst = members
            .iter()
            .filter_map(|m| breakers.get(&(cap.id(), m.clone())).copied())
            .max()
            .unwrap_or(BreakerState::Closed);
        capabilities
            .insert(cap.to_string(), CapabilityView { members, healthy, breaker: worst.into(), breakers: per_member });
    }
    ClusterView { node: st.cluster.name().to_string(), nodes, capabilities, shards: shards(st) }
}

/// One entry per shard of every replicated capability: this node's replica's view of it (role and
/// lag of every replica are known on the leader), or only the leader this node would call.
fn shards(st: &AppState) -> Vec<Shard> {
    let map = &st.cluster.config().shard_map;
    let mut out = Vec::new();
    for cap in Capability::ALL {
        for p in map.shards(cap) {
            let group = bulkhead_cluster::raft::GroupId::new(cap, p.shard);
            match st.cluster.raft().get(group) {
                Some(r) => out.push(Shard::of_replica(cap, &r.status())),
                None => out.push(Shard::elsewhere(cap, p.shard, st.cluster.leader_of(cap, p.shard), &p.replicas)),
            }
        }
    }
    out
}

#[utoipa::path(
    get, path = "/v1/cluster", tag = "cluster", operation_id = "getCluster",
    summary = "Every node, capability and shard as this node sees them",
    responses((status = 200, description = "The cluster view.", body = ClusterView))
)]
pub async fn cluster(State(st): State<AppState>) -> Json<ClusterView> {
    Json(cluster_view(&st))
}

#[utoipa::path(
    get, path = "/admin/digests", tag = "admin", operation_id = "getDigests",
    summary = "A digest of the state of every replica on this node",
    description = "For each replica this node hosts: its applied Raft index and a SHA-256 of its whole state at that index. Replicas of a shard at the same index must agree; `bulkhead-chaos` compares them after every run. Reads every replica's whole state (without stopping its applies): an operator's check, not for a hot loop.",
    responses(
        (status = 200, description = "Every local replica's digest.", body = Digests),
        (status = 503, description = "A replica's state could not be read (`unavailable`)."),
    )
)]
pub async fn digests(State(st): State<AppState>) -> Result<Json<Digests>, ApiError> {
    let mut local = st.cluster.raft().all();
    local.sort_by_key(|r| r.id);
    let mut replicas = Vec::new();
    for r in local {
        // Every local replica is of a capability this build started.
        let Some(capability) = Capability::of(r.id.capability) else { continue };
        let d = r.digest().await.map_err(|e| ApiError::unavailable(format!("{}: {e}", r.id)))?;
        replicas.push(ReplicaDigest {
            capability: capability.into(),
            shard: r.id.shard,
            applied_index: d.applied_index,
            records: d.records,
            sha256: d.sha256,
        });
    }
    Ok(Json(Digests { node: st.cluster.name().to_string(), replicas }))
}

#[utoipa::path(
    get, path = "/healthz", tag = "ops", operation_id = "healthz",
    summary = "Liveness",
    responses((status = 200, description = "The process serves HTTP.", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: Liveness::Ok })
}

#[utoipa::path(
    get, path = "/readyz", tag = "ops", operation_id = "readyz",
    summary = "Readiness",
    description = "Ready when every capability this node hosts is serving, every shard it holds has a leader, no peer was refused for another shard map, and (with seeds) it has joined a peer. `draining` (503) from the moment the node starts stopping (SIGTERM).",
    responses(
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready, or draining. `problems` says why, to a caller with the admin token only (they name paths, peers and shards).", body = Readiness,
            headers(("Retry-After" = u32, description = "Seconds to wait before asking again."))),
    )
)]
/// `/readyz`: 200 when [`crate::ready::judge`] says ready; 503 with the problems when not, and
/// 503 `{"status":"draining"}` from the moment the node starts stopping.
pub async fn readyz(State(st): State<AppState>, scope: Option<Extension<Scope>>) -> Response {
    // The reasons name paths, peers and shards: for the operator only. Anyone else (a load
    // balancer, a stranger) learns ready or not, and why not only with the admin token.
    let operator = scope.is_some_and(|Extension(s)| s == Scope::Admin);
    let unavailable = |status, problems: Vec<String>| {
        let problems = if operator { problems } else { Vec::new() };
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(Readiness { status, problems }))
            .into_response()
    };
    match ready::judge(&ready::gather(&st.cluster)) {
        ready::Readiness::Ready => {
            (StatusCode::OK, Json(Readiness { status: ReadyState::Ready, problems: Vec::new() })).into_response()
        }
        ready::Readiness::Draining => unavailable(ReadyState::Draining, Vec::new()),
        ready::Readiness::NotReady(problems) => unavailable(ReadyState::NotReady, problems),
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
    let action = match obj.get("reason") {
        None => AdminAction::default(),
        Some(Value::String(r)) if r.chars().count() <= 256 => AdminAction { reason: Some(r.clone()) },
        Some(_) => return Err(ApiError::bad_request("`reason` must be a string of at most 256 characters")),
    };
    Ok(action.reason.unwrap_or_default())
}

/// `POST /admin/panic/{capability}`: makes this node's worker of that capability panic. Exists only
/// when the node was started with `fault_injection = true`.
#[utoipa::path(
    post, path = "/admin/panic/{capability}", tag = "admin", operation_id = "injectPanic",
    summary = "Make this node's worker of a capability panic (fault injection)",
    description = "Exists only on a node started with `fault_injection = true`. The worker dies instead of answering and its supervisor restarts it.",
    params(("capability" = crate::views::Capability, Path, description = "The capability whose worker panics.")),
    request_body(content = AdminAction, content_type = "application/json"),
    responses(
        (status = 202, description = "The panic was injected.", body = PanicInjected),
        (status = 400, description = "The body is not a JSON object with at most a `reason` string, or no such capability (`invalid_request`)."),
        (status = 404, description = "This node does not host that capability (`not_found`)."),
        (status = 415, description = "The body is not `Content-Type: application/json` (`unsupported_media_type`)."),
    )
)]
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
    if !st.cluster.config().hosted().contains(&cap.id()) {
        return Err(ApiError::not_found(format!("this node does not host {cap}")));
    }
    let node = st.cluster.name().to_string();
    // The worker dies instead of answering; the call's failure is the expected outcome.
    let result = bulkhead_actors::inject_panic(&st.cluster, cap, &traceparent()).await;
    tracing::warn!(capability = %cap, ?result, %reason, "fault injected: worker panic");
    let injected = PanicInjected { injected: PanicFault::Panic, capability: cap.into(), node };
    Ok((StatusCode::ACCEPTED, Json(injected)).into_response())
}

/// `POST /admin/partition`: cuts every cluster link of this node silently (see `cluster::link`);
/// `DELETE /admin/partition` heals them. HTTP stays up. Exists only with `fault_injection = true`.
#[utoipa::path(
    post, path = "/admin/partition", tag = "admin", operation_id = "partition",
    summary = "Cut every cluster link of this node (fault injection)",
    description = "Exists only on a node started with `fault_injection = true`. The links go silent (nothing is closed); HTTP stays up.",
    request_body(content = AdminAction, content_type = "application/json"),
    responses(
        (status = 202, description = "The links are cut.", body = PartitionSet),
        (status = 400, description = "The body is not a JSON object with at most a `reason` string (`invalid_request`)."),
        (status = 415, description = "The body is not `Content-Type: application/json` (`unsupported_media_type`)."),
    )
)]
pub async fn partition(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    set_partition(&st, true, &headers, body)
}

#[utoipa::path(
    delete, path = "/admin/partition", tag = "admin", operation_id = "healPartition",
    summary = "Heal this node's cluster links (fault injection)",
    description = "Exists only on a node started with `fault_injection = true`.",
    request_body(content = AdminAction, content_type = "application/json"),
    responses(
        (status = 202, description = "The links are healed.", body = PartitionSet),
        (status = 400, description = "The body is not a JSON object with at most a `reason` string (`invalid_request`)."),
        (status = 415, description = "The body is not `Content-Type: application/json` (`unsupported_media_type`)."),
    )
)]
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
    let set = PartitionSet { injected: PartitionFault::Partition, cut, node: st.cluster.name().to_string() };
    Ok((StatusCode::ACCEPTED, Json(set)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_of_an_unkeyed_order_does_not_advise_a_key_it_never_had() {
        let lost = ApiError::from_call(bulkhead_cluster::CallError::Lost {
            capability: Capability::Orders.id(),
            node: "n1".into(),
            reason: "link closed".into(),
        });
        assert!(lost.message.contains("retry with the same Idempotency-Key"));
        let advised = advise_without_key(lost, 1);
        assert_eq!(advised.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(advised.message.contains("had no Idempotency-Key") && advised.message.contains("send a key"));
        // Other answers are left as they are.
        let busy = advise_without_key(ApiError::unavailable("shard 1 has no leader"), 1);
        assert_eq!(busy.message, "shard 1 has no leader");
    }
}
