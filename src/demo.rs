//! `bulkhead demo`: a local three-node cluster of real processes ([`LocalCluster`], from the
//! `bulkhead-launch` crate), a seeded catalog, and what to try.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use bulkhead_cluster::Timing;
use bulkhead_launch::topology::Ports;
pub use bulkhead_launch::{free_ports, LocalCluster};

pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub http_port: u16,
    pub cluster_port: u16,
    pub fault_injection: bool,
}

/// The demo catalog: (sku, price in cents).
pub fn catalog() -> Vec<(String, u64)> {
    (1..=10)
        .map(|i| (format!("widget-{i}"), 250 * i + 99))
        .chain((1..=5).map(|i| (format!("gadget-{i}"), 1000 * i + 500)))
        .collect()
}

pub const DEMO_STOCK: u64 = 1_000;

/// `bulkhead demo`: three nodes, a seeded catalog, instructions on `out`; runs until Ctrl-C.
pub async fn run(opts: DemoOptions, out: &mut dyn Write) -> Result<(), String> {
    let ports: [Ports; 3] =
        std::array::from_fn(|i| Ports { cluster: opts.cluster_port + i as u16, http: opts.http_port + i as u16 });
    for p in ports.iter().flat_map(|p| [p.http, p.cluster]) {
        TcpListener::bind(("127.0.0.1", p)).map_err(|e| {
            format!(
                "port {p} is not free ({e}); stop what uses it or choose other ports with --http-port/--cluster-port"
            )
        })?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| format!("cannot create {}: {e}", opts.data_dir.display()))?;
    // Absolute, so the node configs mean the same whatever directory a node is started from.
    let data_dir = std::fs::canonicalize(&opts.data_dir).map_err(|e| format!("{}: {e}", opts.data_dir.display()))?;
    let opts = DemoOptions { data_dir, ..opts };
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    say(
        out,
        format!("starting 3 nodes (data in {}, logs in {}/logs) ...", opts.data_dir.display(), opts.data_dir.display()),
    );
    let mut lc = LocalCluster::launch(&exe, &opts.data_dir, ports, Timing::default(), opts.fault_injection)?;
    let ready = lc.wait_ready(Duration::from_secs(60)).await;
    if let Err(e) = ready {
        lc.stop_all();
        return Err(format!("{e}\nsee the node logs in {}/logs", opts.data_dir.display()));
    }
    let mut seeded = 0;
    for (sku, price) in catalog() {
        if let Ok((404, _)) = lc.get_json(0, &format!("/v1/inventory/{sku}")).await {
            let body = serde_json::json!({"available": DEMO_STOCK, "price_cents": price});
            let (status, _) = lc.put_json(0, &format!("/v1/inventory/{sku}"), &body).await?;
            if !(200..300).contains(&status) {
                return Err(format!("seeding {sku} failed: {status}"));
            }
            seeded += 1;
        }
    }
    let base = lc.url(0);
    let (n2, n3) = (lc.url(1), lc.url(2));
    let (client_token, admin_token) =
        (lc.secrets().client_token_file.display().to_string(), lc.secrets().admin_token_file.display().to_string());
    say(
        out,
        format!(
            r#"
Bulkhead is up: 3 node processes on 127.0.0.1 ({seeded} SKUs seeded, {DEMO_STOCK} units each).

  n1  {base}   leads orders/0, inventory/0                 pid {}
  n2  {n2}   leads payments, inventory/1                 pid {}
  n3  {n3}   leads orders/1, shipping, notifications     pid {}
  (every shard has a replica on each node: kill any one node and its shards fail over)

API tokens (mode 0600): client {client_token}
                       admin  {admin_token}
Dashboard: {base}/  (paste the admin token into its token field)

Try:
  CLIENT="Authorization: Bearer $(cat {client_token})"
  ADMIN="Authorization: Bearer $(cat {admin_token})"
  # place an order (201 confirmed); the same Idempotency-Key replays the same order
  curl -si -X POST {base}/v1/orders -H "$CLIENT" -H 'content-type: application/json' -H 'Idempotency-Key: demo-1' \
       -d '{{"customer_id":"c1","items":[{{"sku":"widget-1","quantity":2}}],"payment_token":"tok_ok"}}'
  # read it back from another node, and see its shipment
  curl -s -H "$CLIENT" {n2}/v1/orders/ORDER_ID
  curl -s -H "$CLIENT" {base}/v1/shipments?order_id=ORDER_ID
  # a declined card: 402, and the stock is released
  curl -si -X POST {base}/v1/orders -H "$CLIENT" -H 'content-type: application/json' \
       -d '{{"customer_id":"c2","items":[{{"sku":"widget-2","quantity":1}}],"payment_token":"tok_decline"}}'
  curl -s -H "$CLIENT" {base}/v1/inventory/widget-2
  # a customer's orders, newest first
  curl -s -H "$CLIENT" '{base}/v1/orders?customer_id=c1'
  # setting stock takes the admin token (the client token gets 403, no token 401)
  curl -si -X PUT {base}/v1/inventory/widget-3 -H "$ADMIN" -H 'content-type: application/json' \
       -d '{{"available":500,"price_cents":1099}}'
  # who is up, and each shard's leader, term, replicas and lag (admin)
  curl -s -H "$ADMIN" {base}/v1/cluster

Press Ctrl-C to stop all three nodes."#,
            lc.pid(0).unwrap_or(0),
            lc.pid(1).unwrap_or(0),
            lc.pid(2).unwrap_or(0)
        ),
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    // One stream per signal for the whole loop: a future re-created per iteration would miss a
    // signal that lands between two iterations.
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => break,
            _ = tick.tick() => {
                if let Some((i, how)) = lc.exited() {
                    say(out, format!("node {} exited ({how}); the others keep serving. Its log: {}", lc.configs[i].name, lc.log_path(i).display()));
                }
            }
        }
    }
    say(out, "stopping ...".into());
    lc.stop_all();
    say(out, "all nodes stopped".into());
    Ok(())
}
