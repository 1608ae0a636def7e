//! API tokens against real node processes: what each scope may do, how a refusal looks, and that
//! a node refuses to start on a token file others may read.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bulkhead_launch::{authorized, LocalSecrets};
use common::start;
use serde_json::{json, Value};

fn client(token: Option<&str>) -> reqwest::Client {
    let b = reqwest::Client::builder().timeout(Duration::from_secs(15));
    match token {
        Some(t) => authorized(b, t).expect("client"),
        None => b.build().expect("client"),
    }
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Option<String>, Value) {
    let r = req.send().await.expect("send");
    let status = r.status().as_u16();
    let challenge = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, challenge, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_does_what_it_may_and_is_refused_the_rest_as_json() {
    let tc = start().await;
    let secrets = tc.lc.secrets();
    let (anon, cli, adm) = (
        client(None),
        client(Some(&secrets.client_token().expect("client token"))),
        client(Some(&secrets.admin_token().expect("admin token"))),
    );
    let url = tc.url(0);
    let order =
        json!({"customer_id": "c-auth", "items": [{"sku": "auth-1", "quantity": 1}], "payment_token": "tok_ok"});

    // No token: 401 with a challenge, as JSON; nothing placed.
    let (s, challenge, body) = send(anon.post(format!("{url}/v1/orders")).json(&order)).await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="bulkhead""#));
    assert_eq!(body["error"], "unauthenticated");
    // A wrong token is no better.
    let wrong = client(Some("0123456789abcdef0123456789abcdef-not-ours"));
    let (s, challenge, _) = send(wrong.get(format!("{url}/v1/orders?customer_id=c-auth"))).await;
    assert_eq!(s, 401);
    assert!(challenge.unwrap_or_default().contains("invalid_token"));

    // The client token may not set stock: 403 as JSON; the admin token may.
    let stock = json!({"available": 5, "price_cents": 100});
    let (s, _, body) = send(cli.put(format!("{url}/v1/inventory/auth-1")).json(&stock)).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    let (s, _, body) = send(adm.put(format!("{url}/v1/inventory/auth-1")).json(&stock)).await;
    assert_eq!(s, 200, "{body}");

    // The client token places and reads orders, reads stock and payments.
    let (s, _, placed) = send(cli.post(format!("{url}/v1/orders")).json(&order)).await;
    assert_eq!(s, 201, "{placed}");
    let id = placed["order_id"].as_str().expect("order id").to_string();
    assert_eq!(send(cli.get(format!("{}/v1/orders/{id}", tc.url(1)))).await.0, 200);
    assert_eq!(send(cli.get(format!("{url}/v1/inventory/auth-1"))).await.0, 200);
    assert_eq!(send(cli.get(format!("{url}/v1/payments?order_id={id}"))).await.0, 200);
    // ... but not the operator's views.
    for path in ["/v1/cluster", "/metrics", "/v1/dead-letters"] {
        assert_eq!(send(cli.get(format!("{url}{path}"))).await.0, 403, "{path}");
        assert_eq!(send(adm.get(format!("{url}{path}"))).await.0, 200, "{path}");
    }
    // Probes, the spec and the dashboard's page need no token.
    for path in ["/healthz", "/readyz", "/openapi.json", "/"] {
        assert_eq!(send(anon.get(format!("{url}{path}"))).await.0, 200, "{path}");
    }

    // An admin action without a JSON body is refused even with the admin token: a cross-site
    // form cannot send one.
    let r = adm.post(format!("{url}/admin/partition")).header("content-type", "text/plain").body("x");
    let (s, _, body) = send(r).await;
    assert_eq!(s, 415, "{body}");
    // The refusals are counted.
    let metrics = adm.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let count = |reason: &str| -> u64 {
        let prefix = format!("bulkhead_http_refused_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(count("unauthenticated") >= 2 && count("forbidden") >= 4, "{metrics}");
}

/// Runs `bulkhead node --config <cfg>` and returns its exit and stderr (killed and reaped after
/// 30 s, or when the test fails).
async fn run_node(cfg: &std::path::Path) -> (bool, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["node", "--config"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the node did not refuse its config within 30 s")
        .expect("wait");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_node_refuses_a_token_file_others_may_read_and_says_how_to_fix_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = LocalSecrets::ensure(dir.path(), &bulkhead_launch::topology::NODES).expect("secrets");
    let ports = common::ports();
    let mut cfg = bulkhead_launch::topology::local_configs(
        dir.path(),
        &secrets,
        &ports,
        bulkhead_cluster::Timing::default(),
        false,
    )
    .remove(0);
    let path = dir.path().join("n1.toml");
    bulkhead_launch::topology::write_config(&cfg, &path).expect("write config");
    std::fs::set_permissions(&secrets.admin_token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (ok, err) = run_node(&path).await;
    assert!(!ok, "started with a world-readable admin token");
    assert!(err.contains("admin_token_file") && err.contains("0644") && err.contains("chmod 600"), "{err}");

    // The same for the cookie, and for a config that asks for no auth without saying so.
    std::fs::set_permissions(&secrets.admin_token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(&secrets.cookie_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (ok, err) = run_node(&path).await;
    assert!(!ok && err.contains("cookie_file") && err.contains("0640"), "{err}");
    std::fs::set_permissions(&secrets.cookie_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    cfg.client_token_file = None;
    bulkhead_launch::topology::write_config(&cfg, &path).expect("write config");
    let (ok, err) = run_node(&path).await;
    assert!(!ok && err.contains("auth = \"off\""), "{err}");
}

/// `bulkhead tokens DIR ARGS`, its output.
fn tokens_cmd(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("tokens")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("bulkhead tokens");
    assert!(out.status.success(), "bulkhead tokens {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Named clients (issue 17, item 7): two clients made with `bulkhead tokens --add` while the nodes
/// run can use the API within a second, each with its own Idempotency-Keys (the same key gives
/// each its own order, and neither reaches the other's through it); a client-scoped one may not
/// use admin routes; a revoke stops one token on every node without a restart, and leaves the
/// other working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_clients_are_made_and_revoked_without_a_restart_and_their_keys_are_their_own() {
    let tc = start().await;
    let pids: Vec<_> = (0..3).map(|i| tc.lc.pid(i)).collect();
    let dir = tc.lc.secrets().clients_file.parent().expect("the secrets dir").to_path_buf();
    let token_of = |out: String| out.lines().next().expect("the token line").trim().to_string();
    let (a, b) = (
        client(Some(&token_of(tokens_cmd(&dir, &["--add", "shop-a"])))),
        client(Some(&token_of(tokens_cmd(&dir, &["--add", "shop-b"])))),
    );
    assert_eq!(tokens_cmd(&dir, &["--list"]), "shop-a client\nshop-b client\n");
    tc.stock("named-1", 100, 100).await;
    let url = |i: usize| tc.url(i);
    // Every node takes the new clients without a restart.
    for i in 0..3 {
        common::eventually(Duration::from_secs(5), "a new named client is accepted", || async {
            let (s, _, _) = send(a.get(format!("{}/v1/orders?customer_id=c-named", url(i)))).await;
            (s == 200).then_some(())
        })
        .await;
    }
    let order =
        json!({"customer_id": "c-named", "items": [{"sku": "named-1", "quantity": 1}], "payment_token": "tok_ok"});
    let place = |c: &reqwest::Client, node: usize| {
        c.post(format!("{}/v1/orders", url(node))).header("Idempotency-Key", "same-key").json(&order)
    };
    let (s, _, first) = send(place(&a, 0)).await;
    assert_eq!(s, 201, "{first}");
    let (s, _, other) = send(place(&b, 1)).await;
    assert_eq!(s, 201, "{other}");
    assert_ne!(first["order_id"], other["order_id"], "the same key from another client is another order");
    let (_, _, again) = send(place(&a, 2)).await;
    assert_eq!(again["order_id"], first["order_id"], "a client's own key still answers its order");
    // A client-scoped named token is a client: no admin route.
    let (s, _, body) = send(a.get(format!("{}/v1/cluster", url(0)))).await;
    assert_eq!(s, 403, "{body}");

    // Revoke shop-a: refused everywhere within seconds; shop-b unaffected; no node restarted.
    let said = tokens_cmd(&dir, &["--revoke", "shop-a"]);
    assert!(said.contains("revoked"), "{said}");
    for i in 0..3 {
        common::eventually(Duration::from_secs(5), "a revoked client is refused", || async {
            let (s, _, _) = send(a.get(format!("{}/v1/orders?customer_id=c-named", url(i)))).await;
            (s == 401).then_some(())
        })
        .await;
        let (s, _, body) = send(b.get(format!("{}/v1/orders?customer_id=c-named", url(i)))).await;
        assert_eq!(s, 200, "{body}");
    }
    assert_eq!((0..3).map(|i| tc.lc.pid(i)).collect::<Vec<_>>(), pids, "no node restarted");
    assert_eq!(tokens_cmd(&dir, &["--list"]), "shop-b client\n");
}
