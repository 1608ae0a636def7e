//! The client: a steady, open-loop stream of orders, each with its own Idempotency-Key, retried on
//! 429/5xx/timeouts/refused connections with the same key and the same body (rotating over the
//! nodes' HTTP fronts, with exponential backoff and jitter), the way a careful real client would.
//! Everything it sees is logged for the checker and the report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::scenario::Load;

/// One order the client tried to place.
#[derive(Debug, Clone, Default)]
pub struct OrderRec {
    pub key: String,
    pub items: Vec<(String, u64)>,
    pub token: String,
    /// First send, seconds since t = 0.
    pub sent_s: f64,
    /// When the definitive answer arrived.
    pub acked_s: Option<f64>,
    pub order_id: Option<String>,
    /// HTTP status of the definitive answer (201, 202, 402, 409).
    pub acked_http: Option<u16>,
    /// `status` in that answer (`confirmed`, `pending`, `cancelled`).
    pub acked_status: Option<String>,
    /// Every order id any answer for this key named (more than one is a broken idempotency).
    pub ids_seen: Vec<String>,
    /// Answers that say the request itself was wrong (400, 422, other 4xx): never expected.
    pub rejected: Vec<String>,
    pub attempts: u32,
}

/// One HTTP attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub t_s: f64,
    /// `201`, `503`, ..., `timeout`, `connect`.
    pub outcome: String,
    pub definitive: bool,
}

#[derive(Debug, Default)]
pub struct LoadLog {
    pub orders: Vec<OrderRec>,
    pub attempts: Vec<Attempt>,
    /// Ticks skipped because `max_in_flight` orders were already in flight.
    pub skipped: u64,
}

pub struct LoadHandle {
    pub log: Arc<Mutex<LoadLog>>,
    stop: watch::Sender<bool>,
    give_up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl LoadHandle {
    /// No new orders from now on; those in flight keep retrying.
    pub fn stop_new(&self) {
        let _ = self.stop.send(true);
    }

    /// Orders still in flight stop retrying (they stay unanswered).
    pub fn give_up(&self) {
        let _ = self.give_up.send(true);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for the generator (not the orders in flight) to end.
    pub async fn join(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the stream against `urls`, ordering from `skus` (the last one may be the scarce one).
pub fn start(spec: &Load, urls: Vec<String>, skus: Vec<String>, t0: Instant, http: reqwest::Client) -> LoadHandle {
    let log = Arc::new(Mutex::new(LoadLog::default()));
    let (stop, mut stop_rx) = watch::channel(false);
    let (give_up, give_up_rx) = watch::channel(false);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let spec = spec.clone();
    let tokens: Vec<(String, u32)> = spec.tokens.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let total_weight: u32 = tokens.iter().map(|(_, w)| w).sum();
    let (log2, in_flight2) = (log.clone(), in_flight.clone());
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let ctx = Arc::new(Ctx { urls, http, t0, timeout: spec.attempt_timeout.0, log: log2.clone() });
        let mut seq: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_rx.changed() => return,
            }
            if *stop_rx.borrow() {
                return;
            }
            if in_flight2.load(std::sync::atomic::Ordering::Relaxed) >= spec.max_in_flight {
                if let Ok(mut l) = log2.lock() {
                    l.skipped += 1;
                }
                continue;
            }
            seq += 1;
            let order = {
                let mut rng = rand::thread_rng();
                let lines = rng.gen_range(1..=2usize).min(skus.len());
                let mut items: Vec<(String, u64)> = Vec::new();
                while items.len() < lines {
                    let sku = &skus[rng.gen_range(0..skus.len())];
                    if !items.iter().any(|(s, _)| s == sku) {
                        items.push((sku.clone(), rng.gen_range(1..=3)));
                    }
                }
                let mut pick = rng.gen_range(0..total_weight);
                let token = tokens
                    .iter()
                    .find(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .map(|(t, _)| t.clone())
                    .unwrap_or_else(|| "tok_ok".into());
                OrderRec {
                    key: format!("chaos-{}", uuid::Uuid::new_v4().simple()),
                    items,
                    token,
                    sent_s: t0.elapsed().as_secs_f64(),
                    ..Default::default()
                }
            };
            let idx = match log2.lock() {
                Ok(mut l) => {
                    l.orders.push(order.clone());
                    l.orders.len() - 1
                }
                Err(_) => return,
            };
            in_flight2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (ctx, give_up_rx, in_flight3) = (ctx.clone(), give_up_rx.clone(), in_flight2.clone());
            let twice = rand::thread_rng().gen_bool(spec.parallel_share);
            tokio::spawn(async move {
                if twice {
                    // The same key and body through two fronts at once.
                    tokio::join!(
                        place(&ctx, idx, seq, 0, order.clone(), give_up_rx.clone()),
                        place(&ctx, idx, seq, 1, order, give_up_rx)
                    );
                } else {
                    place(&ctx, idx, seq, 0, order, give_up_rx).await;
                }
                in_flight3.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    LoadHandle { log, stop, give_up, task, in_flight }
}

struct Ctx {
    urls: Vec<String>,
    http: reqwest::Client,
    t0: Instant,
    timeout: Duration,
    log: Arc<Mutex<LoadLog>>,
}

/// Places order `seq` (its body is the same on every attempt), starting at front `seq + front`.
async fn place(ctx: &Ctx, idx: usize, seq: u64, front: usize, order: OrderRec, mut give_up: watch::Receiver<bool>) {
    let body = json!({
        // Every key its own customer: the checker lists the customer's orders, which finds a
        // second order for the key even if no answer ever named it.
        "customer_id": order.key,
        "items": order.items.iter().map(|(s, q)| json!({"sku": s, "quantity": q})).collect::<Vec<_>>(),
        "payment_token": order.token,
    });
    let mut attempt: u32 = 0;
    loop {
        if *give_up.borrow() {
            return;
        }
        let url = &ctx.urls[(seq as usize + front + attempt as usize) % ctx.urls.len()];
        let resp = ctx
            .http
            .post(format!("{url}/v1/orders"))
            .header("Idempotency-Key", &order.key)
            .json(&body)
            .timeout(ctx.timeout)
            .send()
            .await;
        let now = ctx.t0.elapsed().as_secs_f64();
        let mut retry_after: Option<Duration> = None;
        let (outcome, definitive) = match resp {
            Ok(r) => {
                let code = r.status().as_u16();
                retry_after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let id = v["order_id"].as_str().map(str::to_string);
                let mut l = match ctx.log.lock() {
                    Ok(l) => l,
                    Err(_) => return,
                };
                let rec = &mut l.orders[idx];
                rec.attempts += 1;
                if let Some(id) = &id {
                    if !rec.ids_seen.contains(id) {
                        rec.ids_seen.push(id.clone());
                    }
                }
                match code {
                    201 | 202 | 402 | 409 if id.is_some() => {
                        // With two sends of one key, the first definitive answer is the acknowledgement.
                        if rec.acked_s.is_none() {
                            rec.acked_s = Some(now);
                            rec.order_id = id;
                            rec.acked_http = Some(code);
                            rec.acked_status = v["status"].as_str().map(str::to_string);
                        }
                        (code.to_string(), true)
                    }
                    429 | 500..=599 => (code.to_string(), false),
                    _ => {
                        rec.rejected.push(format!("{code}: {}", v["error"]["message"].as_str().unwrap_or("")));
                        (code.to_string(), true)
                    }
                }
            }
            Err(e) => {
                if let Ok(mut l) = ctx.log.lock() {
                    l.orders[idx].attempts += 1;
                }
                (if e.is_timeout() { "timeout" } else { "connect" }.to_string(), false)
            }
        };
        if let Ok(mut l) = ctx.log.lock() {
            l.attempts.push(Attempt { t_s: now, outcome, definitive });
        }
        if definitive {
            return;
        }
        // Exponential backoff with jitter, at least what Retry-After asks (capped: the client
        // wants to see the cluster come back, not sleep through it).
        let base = Duration::from_millis(100 * 2u64.pow(attempt.min(5))).min(Duration::from_secs(2));
        let wait = base.mul_f64(rand::thread_rng().gen_range(0.5..1.5)).max(retry_after.unwrap_or_default());
        let wait = wait.min(Duration::from_secs(3));
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = give_up.changed() => return,
        }
    }
}
