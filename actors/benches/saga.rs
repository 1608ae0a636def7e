//! Measures the pure order saga (`saga::step`, `saga::outbox`): one whole happy path, and single steps.
//! The orders worker runs these for every order on one actor, so their cost bounds that actor's order rate.

use std::hint::black_box;

use bulkhead_actors::inventory::{Item, PricedLine};
use bulkhead_actors::orders::saga::{new_order, outbox, step, ChargeOutcome, Event, OrderRecord, ReserveOutcome};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use uuid::Uuid;

const T0: u64 = 1_718_000_000_000;
const HOLD_MS: u64 = 10 * 60 * 1_000;

fn item(sku: &str, quantity: u64) -> Item {
    Item { sku: sku.into(), quantity }
}

fn line(sku: &str, quantity: u64, unit_price_cents: u64) -> PricedLine {
    PricedLine { sku: sku.into(), quantity, unit_price_cents }
}

/// What `new_order` is given: three items over two inventory shards.
type OrderInput = (Uuid, String, Vec<Item>, String, Vec<(u32, Vec<Item>)>);

fn input() -> OrderInput {
    let (a, b, c) = (item("SKU-RED-MUG-0001", 2), item("SKU-BLUE-PLATE-0007", 1), item("SKU-GREEN-BOWL-0013", 4));
    (
        Uuid::from_u128(0x0190_2a5c_7d33_7a10_9b44_e201_6f3c_88a7),
        "customer-000042".into(),
        vec![a.clone(), b.clone(), c.clone()],
        "tok_visa_4242".into(),
        vec![(0, vec![a, c]), (1, vec![b])],
    )
}

/// The answers of a happy path, in order: both shards reserve, then the charge lands.
fn answers() -> [Event; 3] {
    let reserved = |shard: u32, lines| Event::Reserve {
        shard,
        outcome: ReserveOutcome::Reserved { lines, expires_ms: T0 + HOLD_MS },
    };
    [
        reserved(0, vec![line("SKU-RED-MUG-0001", 2, 1_250), line("SKU-GREEN-BOWL-0013", 4, 899)]),
        reserved(1, vec![line("SKU-BLUE-PLATE-0007", 1, 3_400)]),
        Event::Charge(ChargeOutcome::Charged { payment_id: "pay_01902a5c7d337a10".into() }),
    ]
}

fn started() -> OrderRecord {
    let (id, customer, items, token, shards) = input();
    let mut o = new_order(id, customer, items, token, shards, T0);
    step(&mut o, Event::Start, T0 + 1, 1.0);
    o
}

fn saga(c: &mut Criterion) {
    let mut g = c.benchmark_group("saga");

    // new_order -> Start -> Reserved x2 -> Charged -> outbox(); the inputs are built outside the timing.
    g.bench_function("happy_path", |b| {
        b.iter_batched(
            || (input(), answers()),
            |((id, customer, items, token, shards), answers)| {
                let mut o = new_order(id, customer, items, token, shards, T0);
                let mut commands = step(&mut o, Event::Start, T0 + 1, 1.0).len();
                for (i, ev) in answers.into_iter().enumerate() {
                    commands += step(&mut o, ev, T0 + 2 + i as u64, 1.0).len();
                }
                let out = outbox(&o);
                assert_eq!((commands, out.len()), (4, 4));
                (o, out)
            },
            BatchSize::SmallInput,
        )
    });

    // The first step: the reserve commands for every shard.
    g.bench_function("step_start", |b| {
        b.iter_batched(
            || {
                let (id, customer, items, token, shards) = input();
                new_order(id, customer, items, token, shards, T0)
            },
            |mut o| {
                let cmds = step(&mut o, Event::Start, T0 + 1, 1.0);
                (o, cmds)
            },
            BatchSize::SmallInput,
        )
    });

    // The busiest single step: the last shard reserves, so the saga prices the order and asks for the charge.
    g.bench_function("step_last_reserve", |b| {
        b.iter_batched(
            || {
                let [first, last, _] = answers();
                let mut o = started();
                step(&mut o, first, T0 + 2, 1.0);
                (o, last)
            },
            |(mut o, last)| {
                let cmds = step(&mut o, last, T0 + 3, 1.0);
                (o, cmds)
            },
            BatchSize::SmallInput,
        )
    });

    // outbox() of a confirmed order alone.
    let mut done = started();
    for (i, ev) in answers().into_iter().enumerate() {
        step(&mut done, ev, T0 + 2 + i as u64, 1.0);
    }
    g.bench_function("outbox_confirmed", |b| b.iter(|| outbox(black_box(&done))));
    g.finish();
}

criterion_group!(benches, saga);
criterion_main!(benches);
