//! The invariant checker of the brief. It reads only the public HTTP API (any node will do; it
//! rotates over them and retries 503s), so it can judge any cluster:
//!
//! 1. no acknowledged order lost (and an acknowledged outcome never changes: 201 stays confirmed,
//!    402/409 stay cancelled);
//! 2. at most one successful charge per order (confirmed: exactly one; cancelled: none left);
//! 3. per SKU, initial = available + reserved + sold (and, when every key was answered, the units
//!    sold during the run = the units of the confirmed orders);
//! 4. every confirmed order has exactly one shipment and at least one notification;
//! 5. every acknowledged order is terminal within `settle` after the last heal;
//! 6. retries are idempotent: one order id per key (in the answers, and in the cluster's own
//!    listing of the key's customer), and no well-formed request refused (400/422);
//! 7. every shard's replicas agree: one applied index, one state digest (`/admin/digests` on every
//!    node: the one place it reads beyond the orders API, with the operator's token).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::load::OrderRec;
use crate::report::Invariant;

const CONCURRENCY: usize = 32;

/// An order id, whether it is confirmed, its payments answer, and (shipments, notifications).
type OrderFacts = (String, bool, Option<Value>, Option<(usize, usize)>);
const MAX_OFFENDING: usize = 100;

/// Per SKU, what the inventory said before the load: `available + reserved + sold`, and `sold`.
pub type StockBaseline = BTreeMap<String, (u64, u64)>;

pub struct Checked {
    pub invariants: Vec<Invariant>,
    /// Seconds (since t = 0) when the last acknowledged order was seen terminal.
    pub all_terminal_s: Option<f64>,
    pub confirmed: u64,
    pub cancelled: u64,
    pub pending: u64,
    pub dead_letters: u64,
}

/// GETs `path` from the nodes in turn until one gives a definitive answer (200 or 404) or the
/// deadline passes. A `429` (an attached cluster's rate limit) is waited out as its `Retry-After`
/// says, up to the deadline, like any careful client.
async fn get(http: &reqwest::Client, urls: &[String], path: &str, deadline: Instant) -> Option<(u16, Value)> {
    let mut i = path.len();
    loop {
        let url = &urls[i % urls.len()];
        i += 1;
        let mut pause = Duration::from_millis(100);
        if let Ok(r) = http.get(format!("{url}{path}")).timeout(Duration::from_secs(2)).send().await {
            let code = r.status().as_u16();
            if code == 200 || code == 404 {
                return Some((code, r.json().await.unwrap_or(Value::Null)));
            }
            if code == 429 {
                let secs = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                pause = Duration::from_secs(secs.unwrap_or(1).clamp(1, 10));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        tokio::time::sleep(pause.min(left)).await;
    }
}

/// An invariant that held when nothing offends it; `judged` says whether there was anything to
/// judge (a check over no orders holds vacuously, and the report says so).
fn invariant(name: &str, offending: Vec<String>, judged: bool, detail: String) -> Invariant {
    let held = offending.is_empty();
    let mut offending = offending;
    offending.truncate(MAX_OFFENDING);
    let detail = if judged { detail } else { format!("not judged: nothing to check ({detail})") };
    Invariant { name: name.to_string(), held, judged, detail, offending }
}

pub async fn check(
    http: &reqwest::Client,
    urls: &[String],
    orders: &[OrderRec],
    baseline: &StockBaseline,
    t0: Instant,
    deadline: Instant,
) -> Checked {
    let acked: Vec<&OrderRec> = orders.iter().filter(|o| o.order_id.is_some()).collect();

    // 1 + 5: poll every acknowledged order until it is terminal (or 404, or the deadline).
    let mut last: BTreeMap<String, (u16, Value)> = BTreeMap::new();
    let mut all_terminal_s = None;
    loop {
        let todo: Vec<String> = acked
            .iter()
            .filter_map(|o| o.order_id.clone())
            .filter(|id| match last.get(id) {
                None => true,
                Some((404, _)) => false,
                Some((_, v)) => v["status"].as_str() == Some("pending"),
            })
            .collect();
        if todo.is_empty() {
            all_terminal_s = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        let got: Vec<(String, Option<(u16, Value)>)> = futures::stream::iter(todo)
            .map(|id| async move {
                let r = get(http, urls, &format!("/v1/orders/{id}"), deadline).await;
                (id, r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut progressed = false;
        for (id, r) in got {
            if let Some(r) = r {
                let terminal = r.0 == 404 || r.1["status"].as_str() != Some("pending");
                progressed |= terminal;
                last.insert(id, r);
            }
        }
        if !progressed {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let status_of = |id: &str| -> Option<&str> {
        match last.get(id) {
            Some((200, v)) => v["status"].as_str(),
            _ => None,
        }
    };
    let mut lost = Vec::new();
    let mut changed = Vec::new();
    let mut not_terminal = Vec::new();
    let (mut confirmed, mut cancelled, mut pending) = (Vec::new(), 0u64, 0u64);
    for o in &acked {
        let id = o.order_id.clone().unwrap_or_default();
        match last.get(&id) {
            Some((404, _)) => lost.push(format!("{id} (acknowledged {} then not found)", o.acked_http.unwrap_or(0))),
            None => not_terminal.push(format!("{id} (no node answered)")),
            Some(_) => {
                let now = status_of(&id).unwrap_or("?");
                let was = o.acked_status.as_deref().unwrap_or("?");
                if (was == "confirmed" || was == "cancelled") && now != was {
                    changed.push(format!("{id} (acknowledged {was}, now {now})"));
                }
                match now {
                    "confirmed" => confirmed.push(*o),
                    "cancelled" => cancelled += 1,
                    _ => {
                        pending += 1;
                        not_terminal.push(format!("{id} ({now})"));
                    }
                }
            }
        }
    }
    let mut inv = Vec::new();
    let n_lost = lost.len() + changed.len();
    lost.extend(changed);
    inv.push(invariant(
        "no_acknowledged_order_lost",
        lost,
        !acked.is_empty(),
        format!("{} acknowledged orders read back; {n_lost} missing or with a changed outcome", acked.len()),
    ));

    let mut idem_listing: Vec<String> = Vec::new();
    // One order per key as the cluster itself records it: every key is its own customer, so the
    // customer's list shows a second order for the key even if no client answer named it.
    let listed: Vec<(&OrderRec, Option<(u16, Value)>)> = futures::stream::iter(orders)
        .map(|o| async move { (o, get(http, urls, &format!("/v1/orders?customer_id={}", o.key), deadline).await) })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut customer_orders: Vec<(String, Vec<String>)> = Vec::new();
    for (o, r) in listed {
        let ids: Vec<String> = match r {
            Some((200, v)) => v["orders"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["order_id"].as_str().map(str::to_string))
                .collect(),
            _ => {
                idem_listing.push(format!("key {}: its orders could not be listed", o.key));
                continue;
            }
        };
        match (&o.order_id, ids.as_slice()) {
            (_, [_, _, ..]) => idem_listing.push(format!("key {} has {} orders: {ids:?}", o.key, ids.len())),
            (Some(acked), [listed]) if listed != acked => {
                idem_listing.push(format!("key {} was answered with {acked} but its order is {listed}", o.key))
            }
            (Some(acked), []) => {
                idem_listing.push(format!("key {} was answered with {acked}, which is not listed", o.key))
            }
            _ => {}
        }
        customer_orders.push((o.key.clone(), ids));
    }
    // 2 + 4: payments of every answered order; deliveries of every confirmed one (asynchronous,
    // so polled until they show up or the deadline passes).
    let ids: Vec<(String, bool)> = acked
        .iter()
        .filter_map(|o| o.order_id.clone())
        .filter(|id| last.get(id).map(|(c, _)| *c == 200).unwrap_or(false))
        .map(|id| {
            let conf = status_of(&id) == Some("confirmed");
            (id, conf)
        })
        .collect();
    let per_order: Vec<OrderFacts> = futures::stream::iter(ids)
        .map(|(id, conf)| async move {
            let pay = get(http, urls, &format!("/v1/payments?order_id={id}"), deadline).await.map(|r| r.1);
            let mut deliveries = None;
            if !conf {
                // A cancelled order must never be shipped.
                let s = get(http, urls, &format!("/v1/shipments?order_id={id}"), deadline).await;
                let shipped = s.as_ref().and_then(|r| r.1["shipments"].as_array().map(Vec::len)).unwrap_or(0);
                deliveries = Some((shipped, 0));
            }
            if conf {
                loop {
                    let s = get(http, urls, &format!("/v1/shipments?order_id={id}"), deadline).await;
                    let n = get(http, urls, &format!("/v1/notifications?order_id={id}"), deadline).await;
                    let count = |r: &Option<(u16, Value)>, f: &str| {
                        r.as_ref().and_then(|r| r.1[f].as_array().map(Vec::len)).unwrap_or(0)
                    };
                    let got = (count(&s, "shipments"), count(&n, "notifications"));
                    deliveries = Some(got);
                    if (got.0 >= 1 && got.1 >= 1) || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            (id, conf, pay, deliveries)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    // Deliveries were polled until one showed up; read them once more at the end, so that a second
    // shipment arriving late is seen too.
    let confirmed_ids: Vec<String> = per_order.iter().filter(|o| o.1).map(|o| o.0.clone()).collect();
    let recount: BTreeMap<String, usize> = futures::stream::iter(confirmed_ids)
        .map(|id| async move {
            let s = get(http, urls, &format!("/v1/shipments?order_id={id}"), deadline).await;
            let n = s.and_then(|r| r.1["shipments"].as_array().map(Vec::len)).unwrap_or(0);
            (id, n)
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let per_order: Vec<OrderFacts> = per_order
        .into_iter()
        .map(|(id, conf, pay, d)| {
            let d = d.map(|(s, n)| (recount.get(&id).copied().unwrap_or(s).max(s), n));
            (id, conf, pay, d)
        })
        .collect();
    let mut money = Vec::new();
    let mut shipping = Vec::new();
    for (id, conf, pay, deliveries) in &per_order {
        let Some(pay) = pay else {
            money.push(format!("{id} (payments unreadable)"));
            continue;
        };
        let charged = pay["payments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"].as_str().map(|s| s.eq_ignore_ascii_case("charged")).unwrap_or(false))
            .count();
        if charged > 1 {
            money.push(format!("{id} (charged {charged} times)"));
        } else if *conf && charged != 1 {
            money.push(format!("{id} (confirmed, {charged} charges)"));
        } else if !*conf && charged != 0 {
            money.push(format!("{id} (cancelled but still charged)"));
        }
        match deliveries {
            Some((s, n)) if *conf && (*s != 1 || *n < 1) => {
                shipping.push(format!("{id} (confirmed: {s} shipments, {n} notifications)"))
            }
            Some((s, _)) if !*conf && *s != 0 => shipping.push(format!("{id} (cancelled, but {s} shipments)")),
            _ => {}
        }
    }
    // Charges per key, from the payments API, over every order the key's customer has (a key
    // placed twice would be charged twice under two order ids, each looking fine on its own).
    let charged_in = |v: &Value| {
        v["payments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["status"].as_str().is_some_and(|s| s.eq_ignore_ascii_case("charged")))
            .count()
    };
    let known: BTreeMap<&str, usize> =
        per_order.iter().filter_map(|(id, _, pay, _)| pay.as_ref().map(|p| (id.as_str(), charged_in(p)))).collect();
    let per_key: Vec<(String, usize)> = futures::stream::iter(customer_orders.iter())
        .map(|(key, ids)| {
            let known = &known;
            async move {
                let mut n = 0;
                for id in ids {
                    n += match known.get(id.as_str()) {
                        Some(c) => *c,
                        None => get(http, urls, &format!("/v1/payments?order_id={id}"), deadline)
                            .await
                            .map(|r| charged_in(&r.1))
                            .unwrap_or(0),
                    };
                }
                (key.clone(), n)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    money.extend(
        per_key.iter().filter(|(_, n)| *n > 1).map(|(k, n)| format!("key {k} (charged {n} times over its orders)")),
    );
    inv.push(invariant(
        "at_most_one_charge_per_order",
        money,
        !per_order.is_empty(),
        format!(
            "payments read for {} orders and {} keys: confirmed orders charged once, cancelled ones not at all, no key charged twice",
            per_order.len(),
            per_key.len()
        ),
    ));

    // 3: stock.
    let unanswered = orders.iter().filter(|o| o.order_id.is_none()).count();
    let mut sold_by_us: BTreeMap<&str, u64> = BTreeMap::new();
    for o in &confirmed {
        for (sku, q) in &o.items {
            *sold_by_us.entry(sku.as_str()).or_default() += q;
        }
    }
    let mut stock_bad = Vec::new();
    for (sku, (total, sold_before)) in baseline {
        // Every hold is committed or released once the sagas are done (asynchronously, through
        // the outbox): poll until nothing is reserved, or the deadline.
        let mut read = get(http, urls, &format!("/v1/inventory/{sku}"), deadline).await;
        while let Some((200, v)) = &read {
            if v["reserved"].as_u64() == Some(0) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            read = get(http, urls, &format!("/v1/inventory/{sku}"), deadline).await;
        }
        match read {
            Some((200, v)) => {
                let f = |k: &str| v[k].as_u64().unwrap_or(0);
                let (a, r, s) = (f("available"), f("reserved"), f("sold"));
                if r != 0 {
                    stock_bad.push(format!("{sku} ({r} still reserved after the settle)"));
                }
                if a + r + s != *total {
                    stock_bad.push(format!("{sku} (started with {total}, now {a} + {r} + {s} = {})", a + r + s));
                } else if unanswered == 0
                    && s - sold_before.min(&s) != sold_by_us.get(sku.as_str()).copied().unwrap_or(0)
                {
                    stock_bad.push(format!(
                        "{sku} (sold {} during the run, confirmed orders hold {})",
                        s - sold_before.min(&s),
                        sold_by_us.get(sku.as_str()).copied().unwrap_or(0)
                    ));
                }
            }
            other => stock_bad.push(format!("{sku} (unreadable: {:?})", other.map(|o| o.0))),
        }
    }
    let sold_note = if unanswered == 0 {
        "and units sold = units in confirmed orders".to_string()
    } else {
        format!("(sold-vs-orders skipped: {unanswered} keys never answered)")
    };
    inv.push(invariant(
        "stock_conserved",
        stock_bad,
        !baseline.is_empty(),
        format!("{} SKUs: initial = available + reserved + sold, nothing left reserved, {sold_note}", baseline.len()),
    ));
    inv.push(invariant(
        "one_shipment_per_confirmed_order",
        shipping,
        !confirmed.is_empty(),
        format!(
            "{} confirmed orders: exactly one shipment and at least one notification each; {} cancelled: no shipment",
            confirmed.len(),
            per_order.len() - confirmed.len().min(per_order.len())
        ),
    ));
    let n_nt = not_terminal.len();
    inv.push(invariant(
        "all_orders_terminal_after_heal",
        not_terminal,
        !acked.is_empty(),
        format!("{} acknowledged orders; {n_nt} not confirmed or cancelled by the deadline", acked.len()),
    ));
    let mut idem: Vec<String> = orders
        .iter()
        .filter(|o| o.ids_seen.len() > 1 || !o.rejected.is_empty())
        .map(|o| {
            if o.ids_seen.len() > 1 {
                format!("key {} answered with orders {:?}", o.key, o.ids_seen)
            } else {
                format!("key {} refused: {}", o.key, o.rejected.join("; "))
            }
        })
        .collect();
    idem.extend(idem_listing);
    inv.push(invariant(
        "retries_idempotent",
        idem,
        !orders.is_empty(),
        format!(
            "{} keys: one order id per key (in the client's answers and in each key's customer listing), no well-formed request refused",
            orders.len()
        ),
    ));

    let dead_letters = match get(http, urls, "/v1/dead-letters", deadline).await {
        Some((200, v)) => v["dead_letters"].as_array().map(Vec::len).unwrap_or(0) as u64,
        _ => 0,
    };
    Checked { invariants: inv, all_terminal_s, confirmed: confirmed.len() as u64, cancelled, pending, dead_letters }
}

/// One replica's digest as a node reported it (`GET /admin/digests`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenDigest {
    pub node: String,
    /// `capability/shard`.
    pub shard: String,
    pub applied_index: Option<u64>,
    pub sha256: String,
}

/// What one round of digests says, per shard.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DigestRound {
    /// Every replica at one applied index, with one digest.
    pub agreed: Vec<String>,
    /// Replicas at the same applied index with different digests: they diverged.
    pub diverged: Vec<String>,
    /// Replicas still at different applied indexes (one is catching up): ask again.
    pub unsettled: Vec<String>,
}

/// Judges one round of digests from every node (pure). Replicas at the same index must agree
/// whatever the others do, so a divergence is found even while another replica catches up.
pub fn judge_digests(seen: &[SeenDigest]) -> DigestRound {
    let mut by_shard: BTreeMap<&str, Vec<&SeenDigest>> = BTreeMap::new();
    for d in seen {
        by_shard.entry(d.shard.as_str()).or_default().push(d);
    }
    let mut round = DigestRound::default();
    for (shard, replicas) in by_shard {
        let mut at_index: BTreeMap<Option<u64>, Vec<&SeenDigest>> = BTreeMap::new();
        for r in &replicas {
            at_index.entry(r.applied_index).or_default().push(r);
        }
        let split: Vec<String> = at_index
            .iter()
            .filter(|(_, rs)| rs.iter().any(|r| r.sha256 != rs[0].sha256))
            .map(|(i, rs)| {
                let who: Vec<String> = rs
                    .iter()
                    .map(|r| format!("{} {}", r.node, r.sha256.chars().take(12).collect::<String>()))
                    .collect();
                format!("{shard} at index {}: {}", i.map_or("none".into(), |i| i.to_string()), who.join(", "))
            })
            .collect();
        if !split.is_empty() {
            round.diverged.extend(split);
        } else if at_index.len() == 1 {
            round.agreed.push(shard.to_string());
        } else {
            let idx: Vec<String> = replicas
                .iter()
                .map(|r| format!("{} {}", r.node, r.applied_index.map_or("none".into(), |i| i.to_string())))
                .collect();
            round.unsettled.push(format!("{shard}: applied indexes {}", idx.join(", ")));
        }
    }
    round
}

/// Invariant 7, replicas agree: once the load has stopped, every replica of every shard reaches
/// one applied index with one state digest (`GET /admin/digests`, asked of every node). Asked
/// again until `deadline` while some replica is still catching up; replicas at the same index with
/// different digests fail it at once.
pub async fn replicas_agree(http: &reqwest::Client, urls: &[String], deadline: Instant) -> Invariant {
    const NAME: &str = "replicas_agree";
    loop {
        let mut seen = Vec::new();
        let mut missing = Vec::new();
        for url in urls {
            let answer = http.get(format!("{url}/admin/digests")).timeout(Duration::from_secs(30)).send().await;
            match answer {
                Ok(r) if r.status().as_u16() == 200 => match r.json::<Value>().await {
                    Ok(v) => seen.extend(digests_of(&v)),
                    Err(e) => missing.push(format!("{url}: {e}")),
                },
                Ok(r) if r.status().as_u16() == 404 => {
                    return invariant(NAME, vec![], false, format!("{url} has no /admin/digests (an older build)"));
                }
                Ok(r) => missing.push(format!("{url}: HTTP {}", r.status().as_u16())),
                Err(e) => missing.push(format!("{url}: {e}")),
            }
        }
        let round = judge_digests(&seen);
        let detail = format!(
            "{} shards: {} agreed, {} diverged, {} still catching up; {} replicas from {} of {} nodes",
            round.agreed.len() + round.diverged.len() + round.unsettled.len(),
            round.agreed.len(),
            round.diverged.len(),
            round.unsettled.len(),
            seen.len(),
            urls.len() - missing.len(),
            urls.len()
        );
        if !round.diverged.is_empty() {
            return invariant(NAME, round.diverged, true, detail);
        }
        if round.unsettled.is_empty() && missing.is_empty() {
            return invariant(NAME, vec![], !round.agreed.is_empty(), detail);
        }
        if Instant::now() >= deadline {
            let mut offending = round.unsettled;
            offending.extend(missing.into_iter().map(|m| format!("no digests from {m}")));
            return invariant(NAME, offending, true, detail);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The digests in one node's answer.
fn digests_of(v: &Value) -> Vec<SeenDigest> {
    let node = v["node"].as_str().unwrap_or("?").to_string();
    v["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| SeenDigest {
                    node: node.clone(),
                    shard: format!("{}/{}", r["capability"].as_str().unwrap_or("?"), r["shard"].as_u64().unwrap_or(0)),
                    applied_index: r["applied_index"].as_u64(),
                    sha256: r["sha256"].as_str().unwrap_or("").to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    fn d(node: &str, shard: &str, index: u64, sha: &str) -> SeenDigest {
        SeenDigest { node: node.into(), shard: shard.into(), applied_index: Some(index), sha256: sha.into() }
    }

    #[test]
    fn replicas_at_one_index_with_one_digest_agree() {
        let r =
            judge_digests(&[d("n1", "orders/0", 9, "aa"), d("n2", "orders/0", 9, "aa"), d("n3", "orders/0", 9, "aa")]);
        assert_eq!(r, DigestRound { agreed: vec!["orders/0".into()], ..Default::default() });
    }

    #[test]
    fn a_replica_behind_is_unsettled_not_diverged() {
        let r =
            judge_digests(&[d("n1", "orders/0", 9, "aa"), d("n2", "orders/0", 9, "aa"), d("n3", "orders/0", 7, "bb")]);
        assert!(r.agreed.is_empty() && r.diverged.is_empty());
        assert_eq!(r.unsettled, vec!["orders/0: applied indexes n1 9, n2 9, n3 7".to_string()]);
    }

    #[test]
    fn two_replicas_at_one_index_with_different_digests_diverged_even_while_a_third_catches_up() {
        let r = judge_digests(&[
            d("n1", "payments/0", 9, "aaaa"),
            d("n2", "payments/0", 9, "bbbb"),
            d("n3", "payments/0", 4, "cccc"),
            d("n1", "orders/0", 3, "ee"),
            d("n2", "orders/0", 3, "ee"),
        ]);
        assert_eq!(r.agreed, vec!["orders/0".to_string()]);
        assert_eq!(r.diverged, vec!["payments/0 at index 9: n1 aaaa, n2 bbbb".to_string()]);
        assert!(r.unsettled.is_empty());
    }

    #[test]
    fn the_answer_of_a_node_is_read_by_shard() {
        let v = serde_json::json!({"node": "n2", "replicas": [
            {"capability": "inventory", "shard": 1, "applied_index": 12, "records": 3, "sha256": "ab"},
            {"capability": "orders", "shard": 0, "applied_index": null, "records": 0, "sha256": "cd"}
        ]});
        let got = digests_of(&v);
        assert_eq!(got[0], d("n2", "inventory/1", 12, "ab"));
        assert_eq!(got[1].applied_index, None);
    }
}
