//! Every checked-in fixture of this crate's records (`tests/fixtures/records.txt`) decodes with
//! today's decoders into the value it was made from; no version of any record lacks one. Orders'
//! version-1 requests and replies are written with copies of their enums
//! ([`crate::orders::protocol::v1`]).

use std::path::Path;

use bulkhead_storage::fixtures::{check_all, check_current, check_old, check_refused, Fixture};
use bulkhead_storage::{BodyFingerprint, CodecError, Record};
use uuid::Uuid;

use crate::consumer::machine::Seen;
use crate::consumer::{ConsumerCommand, ConsumerReply, ConsumerRequest, Delivery, OrderConfirmed};
use crate::inventory::machine::Held;
use crate::inventory::stock::{HoldState, Reservation, Stock};
use crate::inventory::{InventoryCommand, InventoryReply, InventoryRequest, Item, PricedLine, StockView};
use crate::orders::machine;
use crate::orders::machine::{DeadLetterRecord, Listed, OrdersApplied, Unfinished};

use crate::orders::protocol::{self, v1, HistoryEntry, IdemKeyV1};
use crate::orders::saga::{self, Dest, OrderRecord, OutboxEntry, OutboxEvent, Phase, ShardState, ShardStep};
use crate::orders::{
    CancelReason, DeadLetter, IdemKey, OrderStatus, OrderView, OrdersCommand, OrdersReply, OrdersRequest, PlaceOrder,
};
use crate::payments::ledger::{ChargeStatus, PaymentRecord};
use crate::payments::{PaymentCommand, PaymentReply, PaymentRequest, PaymentView};

const TYPES: &[(&str, u8)] = &[
    ("Seen", Seen::VERSION),
    ("ConsumerCommand", ConsumerCommand::VERSION),
    ("Delivery", Delivery::VERSION),
    ("ConsumerRequest", ConsumerRequest::VERSION),
    ("ConsumerReply", ConsumerReply::VERSION),
    ("OrderRecord", OrderRecord::VERSION),
    ("Unfinished", Unfinished::VERSION),
    ("Listed", Listed::VERSION),
    ("DeadLetterRecord", DeadLetterRecord::VERSION),
    ("OrdersCommand", OrdersCommand::VERSION),
    ("OrdersApplied", OrdersApplied::VERSION),
    ("OutboxEntry", OutboxEntry::VERSION),
    ("OrdersRequest", OrdersRequest::VERSION),
    ("OrdersReply", OrdersReply::VERSION),
    ("Stock", Stock::VERSION),
    ("Reservation", Reservation::VERSION),
    ("Held", Held::VERSION),
    ("InventoryCommand", InventoryCommand::VERSION),
    ("InventoryRequest", InventoryRequest::VERSION),
    ("InventoryReply", InventoryReply::VERSION),
    ("PaymentRecord", PaymentRecord::VERSION),
    ("PaymentCommand", PaymentCommand::VERSION),
    ("PaymentRequest", PaymentRequest::VERSION),
    ("PaymentReply", PaymentReply::VERSION),
];

const ORDER: Uuid = Uuid::from_u128(0x0192_d3c4_b5a6_7000_8000_0000_0000_0101);
const EVENT: Uuid = Uuid::from_u128(0x0192_d3c4_b5a6_7000_8000_0000_0000_0202);
const NOW: u64 = 1_764_547_200_000;
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn items() -> Vec<Item> {
    vec![Item { sku: "sku-1".into(), quantity: 2 }]
}
fn lines() -> Vec<PricedLine> {
    vec![PricedLine { sku: "sku-1".into(), quantity: 2, unit_price_cents: 1250 }]
}
fn history() -> Vec<HistoryEntry> {
    vec![HistoryEntry { at_ms: NOW, event: "placed".into() }]
}
/// A key as version 2 requests and version 1 commands carried it (FNV-1a only).
fn idem_v1() -> Option<IdemKeyV1> {
    Some(IdemKeyV1 { key: "k-1".into(), body_hash: 0x0123_4567_89ab_cdef })
}
/// What [`idem_v1`] reads as today.
fn idem_v1_read() -> Option<IdemKey> {
    Some(IdemKey { key: "k-1".into(), body: BodyFingerprint { sha256: None, fnv64: 0x0123_4567_89ab_cdef } })
}
fn idem() -> Option<IdemKey> {
    Some(IdemKey {
        key: "k-1".into(),
        body: BodyFingerprint { sha256: Some([0xab; 32]), fnv64: 0x0123_4567_89ab_cdef },
    })
}
fn order() -> OrderRecord {
    OrderRecord {
        id: ORDER,
        customer_id: "c-1".into(),
        items: items(),
        payment_token: "tok_ok".into(),
        status: OrderStatus::Pending,
        reason: None,
        payment_id: Some("pay-1".into()),
        lines: lines(),
        total_cents: 2500,
        phase: Phase::Charging,
        shards: vec![ShardStep {
            shard: 1,
            items: items(),
            state: ShardState::Reserved { lines: lines(), expires_ms: NOW + 30_000 },
        }],
        attempts: 1,
        retry_scheduled: false,
        hold_until_ms: NOW + 30_000,
        hold_margin_ms: 5_000,
        charge_attempted: true,
        last_wait: Some("payments: busy".into()),
        history: history(),
        created_ms: NOW,
        traceparent: TP.into(),
    }
}
/// [`order`] as version 1 laid it out, its shard step named by `label`.
fn order_v1(label: &str) -> saga::v1::OrderRecord {
    let mut o: saga::v1::OrderRecord = order().into();
    o.shards[0].node = label.into();
    o
}
/// The refusal of a version-1 record whose inventory label names no shard (the early fixtures
/// were made with node names).
fn no_shard(label: &str) -> CodecError {
    CodecError::Malformed(format!("`{label}` names no inventory shard"))
}
fn cancelled_order() -> OrderRecord {
    OrderRecord { status: OrderStatus::Cancelled, reason: Some(CancelReason::ReservationWindowPassed), ..order() }
}
fn cancelled_view() -> OrderView {
    OrderView { status: OrderStatus::Cancelled, reason: Some(CancelReason::PaymentDeclined), ..view() }
}
fn view() -> OrderView {
    OrderView {
        order_id: ORDER,
        customer_id: "c-1".into(),
        items: items(),
        lines: lines(),
        total_cents: 2500,
        status: OrderStatus::Confirmed,
        reason: None,
        payment_id: Some("pay-1".into()),
        history: history(),
    }
}
fn confirmed() -> OrderConfirmed {
    OrderConfirmed {
        event_id: EVENT,
        order_id: ORDER,
        customer_id: "c-1".into(),
        lines: lines(),
        total_cents: 2500,
        payment_id: "pay-1".into(),
    }
}
fn delivery() -> Delivery {
    Delivery {
        id: "ship-1".into(),
        order_id: ORDER,
        event_id: EVENT,
        kind: "shipment".into(),
        detail: "2 items to c-1".into(),
        created_ms: NOW,
    }
}
fn outbox_entry_v1(label: &str) -> saga::v1::OutboxEntry {
    saga::v1::OutboxEntry {
        dest: saga::v1::Dest::Inventory { node: label.into() },
        event: OutboxEvent::CommitReservation { order_id: ORDER },
        order_id: ORDER,
        created_ms: NOW,
        traceparent: TP.into(),
    }
}
fn outbox_entry() -> OutboxEntry {
    OutboxEntry {
        dest: Dest::Inventory { shard: 2 },
        event: OutboxEvent::CommitReservation { order_id: ORDER },
        order_id: ORDER,
        created_ms: NOW,
        traceparent: TP.into(),
    }
}
fn dead_letter() -> DeadLetter {
    DeadLetter {
        order_id: ORDER,
        event_id: EVENT,
        event: "order_confirmed".into(),
        destination: "shipping".into(),
        attempts: 5,
        last_error: "refused".into(),
        at_ms: NOW,
    }
}
fn place_v1() -> v1::PlaceOrder {
    v1::PlaceOrder {
        customer_id: "c-1".into(),
        items: items(),
        payment_token: "tok_ok".into(),
        idempotency: idem_v1(),
        wait_ms: 2_000,
    }
}
fn place_v2() -> protocol::v2::PlaceOrder {
    protocol::v2::PlaceOrder {
        shard: 1,
        customer_id: "c-1".into(),
        items: items(),
        payment_token: "tok_ok".into(),
        idempotency: idem_v1(),
        wait_ms: 2_000,
    }
}
fn place(idempotency: Option<IdemKey>) -> OrdersRequest {
    OrdersRequest::Place(PlaceOrder {
        shard: 1,
        customer_id: "c-1".into(),
        items: items(),
        payment_token: "tok_ok".into(),
        idempotency,
        wait_ms: 2_000,
    })
}

fn check(f: &Fixture) {
    let retired = |what| CodecError::Retired { version: 1, what };
    match (f.type_name.as_str(), f.label.as_str()) {
        ("Seen", "1") => check_current(f, &Seen { at_ms: NOW }),
        ("ConsumerCommand", "1") => {
            check_current(f, &ConsumerCommand::Deliver { event: confirmed(), now_ms: NOW, delivery_id: EVENT })
        }
        ("Delivery", "1") => check_current(f, &delivery()),
        ("ConsumerRequest", "1") => check_current(f, &ConsumerRequest::Deliver(confirmed())),
        ("ConsumerRequest", "1/deliver-many") => check_current(f, &ConsumerRequest::DeliverMany(vec![confirmed()])),
        ("ConsumerReply", "1") => check_current(f, &ConsumerReply::Listed(vec![delivery()])),
        ("ConsumerReply", "1/each") => {
            check_current(f, &ConsumerReply::Each(vec![ConsumerReply::Accepted { duplicate: true }]))
        }
        ("OrderRecord", "1") => check_refused::<_, OrderRecord>(f, &order_v1("n1"), &no_shard("n1")),
        ("OrderRecord", "1/labelled") => check_old(f, &order_v1("inventory/1"), &order()),
        ("OrderRecord", "2") => check_current(f, &order()),
        ("OrderRecord", "1/cancelled") => {
            let mut old = order_v1("inventory/1");
            (old.status, old.reason) = (OrderStatus::Cancelled, Some("reservation_window_passed".into()));
            check_old(f, &old, &cancelled_order())
        }
        ("OrderRecord", "1/unknown-reason") => {
            let mut old = order_v1("inventory/1");
            (old.status, old.reason) = (OrderStatus::Cancelled, Some("bored".into()));
            check_refused::<_, OrderRecord>(f, &old, &CodecError::Malformed("`bored` is no cancel reason".into()))
        }
        ("OrderRecord", "2/cancelled") => check_current(f, &cancelled_order()),
        ("Unfinished", "1") => check_current(f, &Unfinished { since_ms: NOW, steps: 3 }),
        ("Listed", "1") => check_current(f, &Listed),
        ("DeadLetterRecord", "1") => check_refused::<_, DeadLetterRecord>(
            f,
            &machine::v1::DeadLetterRecord { letter: dead_letter(), entry: outbox_entry_v1("n2") },
            &no_shard("n2"),
        ),
        ("DeadLetterRecord", "1/labelled") => check_old(
            f,
            &machine::v1::DeadLetterRecord { letter: dead_letter(), entry: outbox_entry_v1("inventory/2") },
            &DeadLetterRecord { letter: dead_letter(), entry: outbox_entry() },
        ),
        ("DeadLetterRecord", "2") => {
            check_current(f, &DeadLetterRecord { letter: dead_letter(), entry: outbox_entry() })
        }
        ("OrdersCommand", "1") => check_refused::<_, OrdersCommand>(
            f,
            &machine::v1::OrdersCommand::Place { order: order_v1("n1"), idempotency: idem_v1(), now_ms: NOW },
            &no_shard("n1"),
        ),
        ("OrdersCommand", "1/finish") => check_refused::<_, OrdersCommand>(
            f,
            &machine::v1::OrdersCommand::Finish { order: order_v1("n1"), step: 4, now_ms: NOW },
            &no_shard("n1"),
        ),
        ("OrdersCommand", "1/labelled") => check_old(
            f,
            &machine::v1::OrdersCommand::Place { order: order_v1("inventory/1"), idempotency: idem_v1(), now_ms: NOW },
            &OrdersCommand::Place { order: order(), idempotency: idem_v1_read(), now_ms: NOW },
        ),
        ("OrdersCommand", "1/sweep") => check_old(
            f,
            &machine::v1::OrdersCommand::Sweep {
                entries: vec![((NOW, ORDER), "k-1".into())],
                now_ms: NOW + 86_400_000,
            },
            &OrdersCommand::Sweep { entries: vec![((NOW, ORDER), "k-1".into())], now_ms: NOW + 86_400_000 },
        ),
        ("OrdersCommand", "2") => check_refused::<_, OrdersCommand>(
            f,
            &machine::v2::OrdersCommand::Place { order: order_v1("n1"), idempotency: idem(), now_ms: NOW },
            &no_shard("n1"),
        ),
        ("OrdersCommand", "2/finish") => check_refused::<_, OrdersCommand>(
            f,
            &machine::v2::OrdersCommand::Finish { order: order_v1("n1"), step: 4, now_ms: NOW },
            &no_shard("n1"),
        ),
        ("OrdersCommand", "2/labelled") => check_old(
            f,
            &machine::v2::OrdersCommand::Finish { order: order_v1("inventory/1"), step: 4, now_ms: NOW },
            &OrdersCommand::Finish { order: order(), step: 4, now_ms: NOW },
        ),
        ("OrdersCommand", "3") => {
            check_current(f, &OrdersCommand::Place { order: order(), idempotency: idem(), now_ms: NOW })
        }
        ("OrdersCommand", "3/finish") => {
            check_current(f, &OrdersCommand::Finish { order: order(), step: 4, now_ms: NOW })
        }
        ("OrdersApplied", "1") => check_current(f, &OrdersApplied::Existing { order_id: ORDER, same_body: true }),
        ("OutboxEntry", "1") => check_refused::<_, OutboxEntry>(f, &outbox_entry_v1("n2"), &no_shard("n2")),
        ("OutboxEntry", "1/labelled") => check_old(f, &outbox_entry_v1("inventory/2"), &outbox_entry()),
        ("OutboxEntry", "2") => check_current(f, &outbox_entry()),
        ("OrdersRequest", "1/get") => {
            check_old(f, &v1::OrdersRequest::Get { order_id: ORDER }, &OrdersRequest::Get { order_id: ORDER })
        }
        ("OrdersRequest", "1/place") => check_refused::<_, OrdersRequest>(
            f,
            &v1::OrdersRequest::Place(place_v1()),
            &retired("orders Place names no shard"),
        ),
        ("OrdersRequest", "1/witness") => check_refused::<_, OrdersRequest>(
            f,
            &v1::OrdersRequest::Witness { key: "k-1".into(), owner: "n1".into() },
            &retired("orders witness request"),
        ),
        ("OrdersRequest", "2") => check_old(f, &protocol::v2::OrdersRequest::Place(place_v2()), &place(idem_v1_read())),
        ("OrdersRequest", "2/await") => check_old(
            f,
            &protocol::v2::OrdersRequest::Await { order_id: ORDER, wait_ms: 2_000 },
            &OrdersRequest::Await { order_id: ORDER, wait_ms: 2_000 },
        ),
        ("OrdersRequest", "3") => check_current(f, &place(idem())),
        ("OrdersRequest", "3/await") => check_current(f, &OrdersRequest::Await { order_id: ORDER, wait_ms: 2_000 }),
        ("OrdersReply", "1/order") => check_old(f, &v1::OrdersReply::Order(view().into()), &OrdersReply::Order(view())),
        ("OrdersReply", "1/dead-letters") => check_old(
            f,
            &v1::OrdersReply::DeadLetters(vec![dead_letter()]),
            &OrdersReply::DeadLetters(vec![dead_letter()]),
        ),
        ("OrdersReply", "1/elsewhere") => check_refused::<_, OrdersReply>(
            f,
            &v1::OrdersReply::Elsewhere { owner: "n3".into() },
            &retired("orders witness reply"),
        ),
        ("OrdersReply", "2") => {
            check_old(f, &protocol::v2::OrdersReply::Order(view().into()), &OrdersReply::Order(view()))
        }
        ("OrdersReply", "2/not-leader") => check_old(
            f,
            &protocol::v2::OrdersReply::NotLeader { leader: Some("n2".into()) },
            &OrdersReply::NotLeader { leader: Some("n2".into()) },
        ),
        ("OrdersReply", "2/cancelled") => check_old(
            f,
            &protocol::v2::OrdersReply::Orders(vec![cancelled_view().into()]),
            &OrdersReply::Orders(vec![cancelled_view()]),
        ),
        ("OrdersReply", "3") => check_current(f, &OrdersReply::Order(view())),
        ("OrdersReply", "3/cancelled") => check_current(f, &OrdersReply::Order(cancelled_view())),
        ("Stock", "1") => check_current(f, &Stock { available: 10, reserved: 2, sold: 5, price_cents: 1250 }),
        ("Reservation", "1") => {
            check_current(f, &Reservation { lines: lines(), expires_ms: NOW + 30_000, state: HoldState::Committed })
        }
        ("Held", "1") => check_current(f, &Held),
        ("InventoryCommand", "1") => check_current(
            f,
            &InventoryCommand::Reserve { order_id: ORDER, items: items(), ttl_ms: 30_000, now_ms: NOW },
        ),
        ("InventoryRequest", "1") => {
            check_current(f, &InventoryRequest::Reserve { order_id: ORDER, items: items(), ttl_ms: 30_000 })
        }
        ("InventoryRequest", "1/commit-on") => {
            check_current(f, &InventoryRequest::CommitOn { shard: 1, order_id: ORDER })
        }
        ("InventoryRequest", "1/commit-many-on") => {
            check_current(f, &InventoryRequest::CommitManyOn { shard: 1, order_ids: vec![ORDER] })
        }
        ("InventoryReply", "1/each") => check_current(f, &InventoryReply::Each(vec![InventoryReply::Committed])),
        ("InventoryReply", "1") => {
            check_current(f, &InventoryReply::Reserved { lines: lines(), expires_ms: NOW + 30_000 })
        }
        ("InventoryReply", "1/stock") => check_current(
            f,
            &InventoryReply::Stock(StockView {
                sku: "sku-1".into(),
                available: 10,
                reserved: 2,
                sold: 5,
                price_cents: 1250,
            }),
        ),
        ("PaymentRecord", "1") => check_current(
            f,
            &PaymentRecord {
                payment_id: "pay-1".into(),
                order_id: ORDER,
                amount_cents: 2500,
                token: "tok_ok".into(),
                status: ChargeStatus::Processing { ready_ms: NOW + 50 },
                attempts: 1,
                at_ms: NOW,
            },
        ),
        ("PaymentCommand", "1") => check_current(
            f,
            &PaymentCommand::Charge {
                order_id: ORDER,
                amount_cents: 2500,
                token: "tok_ok".into(),
                now_ms: NOW,
                new_id: EVENT,
            },
        ),
        ("PaymentRequest", "1") => {
            check_current(f, &PaymentRequest::Charge { order_id: ORDER, amount_cents: 2500, token: "tok_ok".into() })
        }
        ("PaymentReply", "1") => check_current(
            f,
            &PaymentReply::Payments(vec![PaymentView {
                payment_id: "pay-1".into(),
                order_id: ORDER,
                amount_cents: 2500,
                status: "charged".into(),
                attempts: 1,
                at_ms: NOW,
            }]),
        ),
        (t, l) => panic!("{t} {l} (line {}): no check for this fixture", f.line),
    }
}

#[test]
fn every_fixture_of_every_version_decodes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    check_all(include_str!("../tests/fixtures/records.txt"), TYPES, &src, check);
}
