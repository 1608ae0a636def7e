//! The API's one error type: a status, a stable code, a message for people, never internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bulkhead_cluster::CallError;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::views::Order;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u32>,
    /// The order concerned: a cancelled one (402/409), or the one first placed with a reused
    /// Idempotency-Key (422).
    pub order_id: Option<Uuid>,
    /// The cancelled order itself (402/409).
    pub order: Option<Box<Order>>,
}

/// The body of every error the API answers (`ApiError` in the spec).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ApiError, example = json!({"error": "unavailable", "message": "payments shard 0 has no leader right now; nothing was recorded, retry later"}))]
pub struct ErrorBody {
    /// A stable code for programs: `invalid_request`, `unauthenticated`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `request_timeout`, `too_large`, `unsupported_media_type`,
    /// `idempotency_key_reused`, `payment_declined`, `out_of_stock`, `cancelled`, `rate_limited`,
    /// `overloaded`, `unavailable`, `too_many_connections`, `timeout`, `lost`, `rejected`, `internal`.
    pub error: String,
    /// For people; never internals.
    pub message: String,
    /// The order concerned: the cancelled order (402/409), or the order first placed with this
    /// Idempotency-Key (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub order_id: Option<Uuid>,
    /// The cancelled order (402/409).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub order: Option<Order>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, order_id: None, order: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// For reads: any transient failure is "unavailable, retry" (nothing is at stake).
    pub fn from_read(e: CallError) -> Self {
        if e.is_transient() {
            tracing::warn!(error = %e, "cluster call failed for a read");
            return Self::unavailable(format!("{e}; retry later"));
        }
        Self::from_call(e)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(1);
        e
    }

    /// 429: this node already handles as many orders as `limits.orders_in_flight` allows.
    pub fn overloaded() -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            "this node is handling as many orders as it accepts at once; nothing was recorded, retry later",
        );
        e.retry_after = Some(1);
        e
    }

    /// Maps a failed cluster call. `Unreachable` means nothing was delivered (503, nothing recorded);
    /// `TimedOut` and `Lost` mean we do not know (504: retry with the same Idempotency-Key).
    pub fn from_call(e: CallError) -> Self {
        tracing::warn!(error = %e, "cluster call failed for an API request");
        match e {
            CallError::Unreachable { capability, node, .. } => {
                Self::unavailable(format!("{capability} on node {node} is unreachable; nothing was recorded, retry later"))
            }
            CallError::NoLeader { capability, shard, .. } => Self::unavailable(format!(
                "{capability} shard {shard} has no leader right now (an election is under way or a majority of its replicas is down); nothing was recorded, retry later"
            )),
            CallError::Busy { capability, node, .. } => Self::unavailable(format!(
                "{capability} on node {node} is restarting or overloaded; nothing was recorded, retry later"
            )),
            CallError::TimedOut { capability, node, .. } => {
                let mut e = Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("{capability} on node {node} did not answer in time; the request may have been applied: retry with the same Idempotency-Key"),
                );
                e.retry_after = Some(1);
                e
            }
            CallError::Lost { capability, node, .. } => {
                let mut e = Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "lost",
                    format!("{capability} on node {node} went away before answering; the request may have been applied: retry with the same Idempotency-Key"),
                );
                e.retry_after = Some(1);
                e
            }
            CallError::Rejected { capability, node, .. } => Self::new(
                StatusCode::BAD_GATEWAY,
                "rejected",
                format!("{capability} on node {node} could not handle the request"),
            ),
        }
    }
}

impl ApiError {
    /// The JSON body: `error` (the code), `message`, and the order concerned if any.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code.to_string(),
            message: self.message.clone(),
            order_id: self.order_id,
            order: self.order.as_deref().cloned(),
        }
    }

    pub fn body_json(&self) -> serde_json::Value {
        serde_json::to_value(self.body()).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        // Every 429 and 503 tells the client when to come back, even one built without it.
        let retry_after = match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => Some(self.retry_after.unwrap_or(1)),
            _ => self.retry_after,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(e: ApiError) -> Option<String> {
        e.into_response().headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    #[test]
    fn every_429_and_503_carries_retry_after() {
        assert_eq!(retry_after(ApiError::overloaded()), Some("1".into()));
        assert_eq!(retry_after(ApiError::unavailable("x")), Some("1".into()));
        // Even one built by hand without it.
        assert_eq!(retry_after(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "x")), Some("1".into()));
        assert_eq!(retry_after(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", "x")), Some("1".into()));
        assert_eq!(retry_after(ApiError::bad_request("x")), None);
        let shed = CallError::Busy {
            capability: bulkhead_actors::Capability::Orders.id(),
            node: "n1".into(),
            reason: "full".into(),
        };
        let e = ApiError::from_call(shed);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry_after(e), Some("1".into()));
        let e = ApiError::from_call(CallError::NoLeader {
            capability: bulkhead_actors::Capability::Payments.id(),
            shard: 0,
            node: "n1".into(),
        });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("payments shard 0 has no leader"), "{}", e.message);
    }

    #[test]
    fn overloaded_has_the_shape_of_every_other_error() {
        let e = ApiError::overloaded();
        assert_eq!((e.status, e.code), (StatusCode::TOO_MANY_REQUESTS, "overloaded"));
    }
}
