//! Shipping: one shipment per confirmed order, made from the orders outbox's `OrderConfirmed`.
//! Its protocol, worker and supervisor shape are the shared consumer's ([`crate::consumer`]); what
//! is shipping's own is what a shipment says ([`MAKING`]).

use crate::consumer::{Making, OrderConfirmed};

fn detail(ev: &OrderConfirmed) -> String {
    let units: u64 = ev.lines.iter().map(|l| l.quantity).sum();
    format!("ship {units} unit(s) in {} line(s) to customer {}", ev.lines.len(), ev.customer_id)
}

pub const MAKING: Making = Making { kind: "shipping", one_per_order: true, detail };
