//! Notifications: at least one notification per confirmed order (one per distinct event), made from
//! the orders outbox's `OrderConfirmed`. Shape shared with shipping ([`crate::consumer`]).

use crate::consumer::{Making, OrderConfirmed};

fn detail(ev: &OrderConfirmed) -> String {
    format!("email to {}: order {} confirmed, {} cents charged", ev.customer_id, ev.order_id, ev.total_cents)
}

pub const MAKING: Making = Making { kind: "notifications", one_per_order: false, detail };
