//! Strict validation of request bodies: every refusal names the field and says why.
//! Nothing is recorded for a request that fails here.

use bulkhead_actors::inventory::Item;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::ApiError;

pub const MAX_ITEMS: usize = 100;
pub const MAX_QUANTITY: u64 = 1_000_000;

fn no_unknown_fields(obj: &Map<String, Value>, known: &[&str], what: &str) -> Result<(), ApiError> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown field `{k}` in {what} (expected: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

fn string(obj: &Map<String, Value>, field: &str, max: usize) -> Result<String, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("`{field}` is required"))),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(ApiError::bad_request(format!("`{field}` must not be empty")))
        }
        Some(Value::String(s)) if s.chars().count() > max => {
            Err(ApiError::bad_request(format!("`{field}` is longer than {max} characters")))
        }
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            Err(ApiError::bad_request(format!("`{field}` must not contain control characters")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::bad_request(format!("`{field}` must be a string"))),
    }
}

fn integer(obj: &Map<String, Value>, field: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("`{field}` is required"))),
        Some(Value::Number(n)) => match whole(n) {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(ApiError::bad_request(format!("`{field}` must be a whole number from {min} to {max}"))),
        },
        Some(_) => Err(ApiError::bad_request(format!("`{field}` must be a number"))),
    }
}

/// A JSON number that is a whole number, `2` or `2.0` alike (JSON Schema's `integer` is a value, not
/// a spelling: the spec calls `2.0` an integer, so it is one here too).
fn whole(n: &serde_json::Number) -> Option<u64> {
    n.as_u64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f)).map(|f| f as u64))
}

/// The `customer_id` query parameter of `GET /v1/orders`: required, with the rules of the order
/// body's `customer_id` (a string of at most 128 characters, no control characters).
pub fn customer_id(raw: Option<&str>) -> Result<String, ApiError> {
    let mut obj = Map::new();
    if let Some(v) = raw {
        obj.insert("customer_id".into(), Value::String(v.to_string()));
    }
    let id = string(&obj, "customer_id", 128)?;
    if id.is_empty() {
        return Err(ApiError::bad_request("`customer_id` must not be empty"));
    }
    Ok(id)
}

/// A SKU: 1-64 characters of letters, digits, `-`, `_`, `.`.
pub fn sku(s: &str) -> Result<String, ApiError> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(ApiError::bad_request(format!(
            "sku `{}` must be 1-64 characters of letters, digits, '-', '_' or '.'",
            s.chars().take(80).collect::<String>()
        )));
    }
    Ok(s.to_string())
}

// The schemas below say what the validators here accept: keep their `pattern`s and bounds in step
// with `string`, `sku` and `integer` (utoipa takes literals only).

/// A validated `POST /v1/orders` body (unknown fields, nulls and wrong types are refused with 400;
/// nothing is recorded). Its serialization is what an Idempotency-Key's body hash is taken of:
/// changing it makes every stored key look reused with another body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"customer_id": "c-42", "items": [{"sku": "widget-1", "quantity": 2}], "payment_token": "tok_ok"}))]
pub struct NewOrder {
    /// 1-128 characters, not only whitespace, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub customer_id: String,
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<NewItem>,
    /// A simulated payment token, 1-64 characters, not only whitespace, no control characters:
    /// `tok_decline` is declined, `tok_slow` answers after 3 s, `tok_error` fails transiently
    /// twice, then succeeds; `tok_ok` and anything else succeeds.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub payment_token: String,
}

/// One line of a new order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewItem {
    /// 1-64 ASCII letters, digits, `-`, `_` or `.`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "widget-1")]
    pub sku: String,
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub quantity: u64,
}

impl From<NewItem> for Item {
    fn from(i: NewItem) -> Self {
        Item { sku: i.sku, quantity: i.quantity }
    }
}

/// A validated `PUT /v1/inventory/{sku}` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"available": 500, "price_cents": 1250}))]
pub struct StockUpdate {
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub available: u64,
    #[schema(minimum = 0, maximum = 100_000_000_000.0)]
    pub price_cents: u64,
}

/// The body every admin action takes: a JSON object (`{}` will do). It is required so that a
/// cross-site form cannot reach an admin action.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, ToSchema)]
pub struct AdminAction {
    /// Logged with the action.
    #[schema(max_length = 256, nullable = false)]
    pub reason: Option<String>,
}

pub fn new_order(body: &Value) -> Result<NewOrder, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    no_unknown_fields(obj, &["customer_id", "items", "payment_token"], "the order")?;
    let customer_id = string(obj, "customer_id", 128)?;
    let payment_token = string(obj, "payment_token", 64)?;
    let items = match obj.get("items") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("`items` is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad_request("`items` must list at least one item"))
        }
        Some(Value::Array(a)) if a.len() > MAX_ITEMS => {
            return Err(ApiError::bad_request(format!("`items` lists more than {MAX_ITEMS} items")))
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad_request("`items` must be an array")),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let o = it.as_object().ok_or_else(|| ApiError::bad_request(format!("`items[{i}]` must be an object")))?;
        no_unknown_fields(o, &["sku", "quantity"], &format!("items[{i}]"))?;
        let s = string(o, "sku", 64).map_err(|e| ApiError::bad_request(format!("items[{i}]: {}", e.message)))?;
        let sku = sku(&s).map_err(|e| ApiError::bad_request(format!("items[{i}]: {}", e.message)))?;
        let quantity = integer(o, "quantity", 1, MAX_QUANTITY)
            .map_err(|e| ApiError::bad_request(format!("items[{i}]: {}", e.message)))?;
        out.push(NewItem { sku, quantity });
    }
    Ok(NewOrder { customer_id, items: out, payment_token })
}

pub fn stock_update(body: &Value) -> Result<StockUpdate, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    no_unknown_fields(obj, &["available", "price_cents"], "the stock update")?;
    Ok(StockUpdate {
        available: integer(obj, "available", 0, 1_000_000_000)?,
        price_cents: integer(obj, "price_cents", 0, 100_000_000_000)?,
    })
}

/// `Idempotency-Key`: 1-128 visible ASCII characters.
pub fn idempotency_key(raw: &[u8]) -> Result<String, ApiError> {
    let ok = !raw.is_empty() && raw.len() <= 128 && raw.iter().all(|b| (0x21..=0x7e).contains(b));
    if !ok {
        return Err(ApiError::bad_request("the Idempotency-Key header must be 1-128 visible ASCII characters"));
    }
    Ok(String::from_utf8_lossy(raw).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_a_good_order() {
        let o = new_order(
            &json!({"customer_id": "c1", "items": [{"sku": "widget-1", "quantity": 2}], "payment_token": "tok_ok"}),
        )
        .unwrap();
        assert_eq!(o.items, vec![NewItem { sku: "widget-1".into(), quantity: 2 }]);
    }

    #[test]
    fn every_refusal_names_the_field() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({"items": [], "payment_token": "t", "customer_id": "c"}), "`items`"),
            (
                json!({"items": [{"sku": "a", "quantity": 0}], "payment_token": "t", "customer_id": "c"}),
                "items[0]: `quantity`",
            ),
            (json!({"items": [{"sku": "a", "quantity": 1.5}], "payment_token": "t", "customer_id": "c"}), "`quantity`"),
            (
                json!({"items": [{"sku": "a b", "quantity": 1}], "payment_token": "t", "customer_id": "c"}),
                "items[0]: sku",
            ),
            (json!({"items": [{"sku": "a", "quantity": 1}], "payment_token": "t"}), "`customer_id`"),
            (
                json!({"items": [{"sku": "a", "quantity": 1}], "payment_token": 5, "customer_id": "c"}),
                "`payment_token`",
            ),
            (
                json!({"items": [{"sku": "a", "quantity": 1}], "payment_token": "t", "customer_id": "c", "x": 1}),
                "unknown field `x`",
            ),
            (json!({"items": [{"sku": "a", "quantity": -1}], "payment_token": "t", "customer_id": "c"}), "`quantity`"),
        ];
        for (body, needle) in cases {
            let e = new_order(&body).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_whole_number_may_be_spelled_as_a_float() {
        let o = new_order(
            &json!({"customer_id": "c1", "items": [{"sku": "w", "quantity": 2.0}], "payment_token": "tok_ok"}),
        )
        .unwrap();
        assert_eq!(o.items[0].quantity, 2);
        assert_eq!(stock_update(&json!({"available": 5.0, "price_cents": 0.0})).unwrap().available, 5);
        assert!(stock_update(&json!({"available": 5.5, "price_cents": 0})).is_err());
        assert!(stock_update(&json!({"available": 1e300, "price_cents": 0})).is_err());
    }

    #[test]
    fn idempotency_key_rules() {
        assert!(idempotency_key(b"abc-123").is_ok());
        assert!(idempotency_key(b"").is_err());
        assert!(idempotency_key(&[b'a'; 129]).is_err());
        assert!(idempotency_key(b"has space").is_err());
    }
}
