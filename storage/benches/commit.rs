//! Measures `Store::commit` (apply + wait for the group flush) per write, in groups of 1, 10 and 100 writers.
//! An order is acknowledged only after its commit is durable, so this is the storage share of every order's latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bulkhead_storage::{Batch, Durability, Record, Store, StoreOptions, Table};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::{Deserialize, Serialize};

/// A small record, about the size of an idempotency entry or an outbox marker.
#[derive(Debug, Serialize, Deserialize)]
struct Small {
    order: [u8; 16],
    status: u8,
    at_ms: u64,
    note: String,
}

impl Record for Small {
    const VERSION: u8 = 1;
}

const T: Table<u64, Small> = Table::new(1, "bench");

/// `n` tasks, each committing one record of its own; returns when all of them are durable.
async fn group(store: &Store, next_key: &AtomicU64, n: u64) {
    let first = next_key.fetch_add(n, Ordering::Relaxed);
    let tasks: Vec<_> = (first..first + n)
        .map(|k| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut batch = Batch::new();
                let mut order = [0x5a; 16];
                order[8..].copy_from_slice(&k.to_be_bytes());
                let rec = Small { order, status: 1, at_ms: k, note: "reserved".into() };
                T.put(&mut batch, &k, &rec);
                store.commit(batch).await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task").expect("commit");
    }
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for durability in [Durability::Fsync, Durability::Flush] {
        let name = format!("commit/{durability:?}").to_lowercase();
        let mut g = c.benchmark_group(name);
        g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        for n in [1u64, 10, 100] {
            // A fresh store per case, so one case's database size does not tax the next.
            let opts = StoreOptions { durability, ..StoreOptions::default() };
            let cap = format!("{durability:?}-{n}").to_lowercase();
            let store = rt.block_on(async { Store::open(dir.path(), &cap, &opts) }).unwrap();
            let next_key = AtomicU64::new(0);
            g.throughput(Throughput::Elements(n));
            g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
                b.iter(|| rt.block_on(group(&store, &next_key, n)))
            });
            let stats = store.stats();
            let (writes, flushes) = (stats.writes.load(Ordering::Relaxed), stats.flushes.load(Ordering::Relaxed));
            eprintln!(
                "commit/{durability:?}/{n}: {writes} writes, {flushes} flushes ({:.1} writes per flush)",
                writes as f64 / flushes.max(1) as f64
            );
        }
        g.finish();
    }
}

criterion_group!(benches, commit);
criterion_main!(benches);
