//! Measures the versioned bincode codec (`encode`/`decode`) on an order-sized record.
//! Every order is encoded on each saga step it persists and decoded on every read, so this is a per-order floor.

use std::hint::black_box;

use bulkhead_codec::{decode, encode, Record};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    sku: String,
    quantity: u64,
    unit_price_cents: u64,
}

/// Shaped like a stored order: id, customer, three lines, a short history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: [u8; 16],
    customer_id: String,
    lines: Vec<Line>,
    total_cents: u64,
    history: Vec<(u64, String)>,
}

impl Record for Order {
    const VERSION: u8 = 1;
}

fn order() -> Order {
    let at = 1_718_000_000_000u64;
    Order {
        id: *b"\x01\x90\x2a\x5c\x7d\x33\x7a\x10\x9b\x44\xe2\x01\x6f\x3c\x88\xa7",
        customer_id: "customer-000042".into(),
        lines: vec![
            Line { sku: "SKU-RED-MUG-0001".into(), quantity: 2, unit_price_cents: 1_250 },
            Line { sku: "SKU-BLUE-PLATE-0007".into(), quantity: 1, unit_price_cents: 3_400 },
            Line { sku: "SKU-GREEN-BOWL-0013".into(), quantity: 4, unit_price_cents: 899 },
        ],
        total_cents: 2 * 1_250 + 3_400 + 4 * 899,
        history: vec![
            (at, "created".into()),
            (at + 3, "reserved: 3 line(s), total 9496 cents".into()),
            (at + 7, "charged: pay_01902a5c7d337a10".into()),
            (at + 8, "confirmed".into()),
        ],
    }
}

fn codec(c: &mut Criterion) {
    let value = order();
    let bytes = encode(&value);
    assert_eq!(decode::<Order>(&bytes).unwrap(), value);

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode", |b| b.iter(|| encode(black_box(&value))));
    g.bench_function("decode", |b| b.iter(|| decode::<Order>(black_box(&bytes)).unwrap()));
    g.bench_function("round_trip", |b| b.iter(|| decode::<Order>(&encode(black_box(&value))).unwrap()));
    g.finish();
    eprintln!("codec: the order record is {} bytes encoded", bytes.len());
}

criterion_group!(benches, codec);
criterion_main!(benches);
