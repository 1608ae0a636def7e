//! The cluster port against strangers, on a real three-node cluster with mutual TLS: garbage, a
//! certificate from another CA, a certificate for another node than the one claimed, a valid
//! certificate for a node the shard map does not name, a wrong cookie, and a flood of half-open
//! connections are each refused and counted, while the node keeps serving orders and its peers;
//! ractor_cluster's own listener gives no session at all; and a member bounded by its role cannot
//! send what only an orders host sends.

mod common;

use std::time::Duration;

use bulkhead_cluster::tls::TlsLinks;
use common::{eventually, start, TestCluster};
use ractor::Actor;
use ractor_cluster::NodeServer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// `bulkhead_cluster_links_refused_total{reason=...}` on node `i`.
async fn refused(tc: &TestCluster, i: usize, reason: &str) -> u64 {
    let page = tc.http.get(format!("{}/metrics", tc.url(i))).send().await.expect("metrics").text().await.expect("text");
    let prefix = format!("bulkhead_cluster_links_refused_total{{reason=\"{reason}\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Waits until the counter of `reason` on node `i` has grown past `before` by at least `by`.
async fn counted(tc: &TestCluster, i: usize, reason: &str, before: u64, by: u64) {
    eventually(Duration::from_secs(10), &format!("{reason} counted"), || async {
        (refused(tc, i, reason).await >= before + by).then_some(())
    })
    .await;
}

/// The node still serves: ready, and an order placed through it confirms.
async fn still_serving(tc: &TestCluster, i: usize, n: u32) {
    assert_eq!(tc.get(i, "/readyz").await.status, 200);
    let r = tc.order(i, Some(&format!("sec-{n}")), "sec-1", 1, "tok_ok").await;
    assert_eq!(r.status, 201, "{}", r.body);
}

/// TLS links of a node named `node` whose certificate is issued by the CA in `certs` for
/// `cert_for` (the same name unless an impostor).
fn links(certs: &std::path::Path, cert_for: &str) -> TlsLinks {
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("read");
    let (cert, key) = bulkhead_cluster::tls::issue(&read("ca.pem"), &read("ca.key"), cert_for).expect("issue");
    TlsLinks::from_pem(read("ca.pem").as_bytes(), cert.as_bytes(), key.as_bytes(), cert_for).expect("links")
}

/// A ractor node named `claim` that dials `addr` over `tls` with `cookie`, as a real peer would.
/// Stop the returned node server once the verdict is in.
async fn play_peer(
    tls: &TlsLinks,
    claim: &str,
    cookie: &str,
    addr: std::net::SocketAddr,
) -> ractor::ActorRef<ractor_cluster::NodeServerMessage> {
    let server = NodeServer::new(0, cookie.into(), claim.into(), "127.0.0.1".into(), None, None)
        .with_listen_addr(std::net::IpAddr::from([127, 0, 0, 1]));
    let (server, _) = Actor::spawn(None, server, ()).await.expect("node server");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    if let Ok(link) = bulkhead_cluster::link::dial_tls(tls, tcp).await {
        // Refused or not, the peer's side says nothing useful here; the node's counters do.
        let _ = ractor_cluster::client_connect_external(&server, Box::new(link)).await;
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_cluster_port_are_refused_and_counted_while_the_node_serves() {
    let mut tc = start().await;
    tc.stock("sec-1", 1_000, 100).await;
    let addr = tc.lc.configs[0].cluster_listen;
    let certs = tc.lc.secrets().certs_dir.clone();
    let cookie = std::fs::read_to_string(&tc.lc.secrets().cookie_file).expect("cookie").trim().to_string();
    still_serving(&tc, 0, 0).await;

    // Garbage instead of a TLS handshake.
    let before = refused(&tc, 0, "tls").await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: n1\r\n\r\n").await.expect("write");
    counted(&tc, 0, "tls", before, 1).await;
    drop(s);

    // A certificate from another CA (the right cookie does not help).
    let (other_ca, other_key) = bulkhead_cluster::tls::new_ca().expect("ca");
    let (c, k) = bulkhead_cluster::tls::issue(&other_ca, &other_key, "n2").expect("issue");
    let stranger = TlsLinks::from_pem(other_ca.as_bytes(), c.as_bytes(), k.as_bytes(), "n2").expect("links");
    let before = refused(&tc, 0, "tls").await;
    let peer = play_peer(&stranger, "n2", &cookie, addr).await;
    counted(&tc, 0, "tls", before, 1).await;
    peer.stop(None);
    still_serving(&tc, 0, 1).await;

    // Garbage after a good TLS handshake.
    let before = refused(&tc, 0, "garbage").await;
    let mut link = links(&certs, "n3")
        .connector
        .connect(TlsLinks::dial_name(), TcpStream::connect(addr).await.expect("c"))
        .await
        .expect("tls");
    link.write_all(&[0xff; 64]).await.expect("write");
    // Out of rustls's buffer and onto the socket: nothing else polls this stream while we wait.
    link.flush().await.expect("flush");
    counted(&tc, 0, "garbage", before, 1).await;
    drop(link);

    // A certificate of the cluster for n3, used to claim to be n2, with the right cookie.
    let before = refused(&tc, 0, "wrong_name").await;
    let peer = play_peer(&links(&certs, "n3"), "n2", &cookie, addr).await;
    counted(&tc, 0, "wrong_name", before, 1).await;
    peer.stop(None);
    still_serving(&tc, 0, 2).await;

    // A cluster certificate and claim that agree, with the right cookie, for a node the shard map
    // does not name (n9): a stranger, refused at the claim.
    let before = refused(&tc, 0, "stranger").await;
    let peer = play_peer(&links(&certs, "n9"), "n9", &cookie, addr).await;
    counted(&tc, 0, "stranger", before, 1).await;
    peer.stop(None);

    // A flood of half-open connections from one address: past its share of handshakes
    // (`cluster_handshakes_per_address`, 4) they are closed at once, the rest at the handshake
    // deadline; meanwhile orders go on and the peers stay up.
    let before = refused(&tc, 0, "address_cap").await;
    let flood: Vec<TcpStream> =
        futures::future::join_all((0..48).map(|_| TcpStream::connect(addr))).await.into_iter().flatten().collect();
    counted(&tc, 0, "address_cap", before, 40).await;
    still_serving(&tc, 0, 3).await;
    for peer in ["n2", "n3"] {
        assert_eq!(tc.status_of(0, peer).await, "up", "{peer} during the flood");
    }
    drop(flood);
    // Nothing above made a session: the node's view still has exactly its two peers up.
    let view = tc.get(0, "/v1/cluster").await.body;
    let names: Vec<&str> = view["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["name"].as_str()).collect();
    assert_eq!(names, ["n1", "n2", "n3"], "{view}");
    still_serving(&tc, 0, 4).await;

    // A node's own certificate and name with the wrong cookie (n3 stopped, so that this is the
    // only link claiming n3): the cluster handshake fails.
    // All the nodes share 127.0.0.1 here, and the flood's connections hold that address's
    // handshake slots until their deadline: a try refused `address_cap` meanwhile is tried again.
    tc.lc.stop(2);
    let before = refused(&tc, 0, "handshake").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let peer = play_peer(&links(&certs, "n3"), "n3", "not-the-cookie", addr).await;
        let seen = tokio::time::timeout(Duration::from_secs(3), async {
            // Poll the counter itself, at most every 50 ms.
            let mut poll = tokio::time::interval(Duration::from_millis(50));
            loop {
                poll.tick().await;
                if refused(&tc, 0, "handshake").await > before {
                    break;
                }
            }
        })
        .await;
        peer.stop(None);
        if seen.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a wrong cookie was never counted as `handshake`");
    }
    still_serving(&tc, 0, 5).await;
}

/// The TCP ports process `pid` listens on: its sockets' inodes (`/proc/<pid>/fd`) against the
/// LISTEN rows of `/proc/net/tcp` and `tcp6`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the node's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for row in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            // local_address is f[1] (hex addr:port), st is f[3] (0A = LISTEN), inode is f[9].
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

/// ractor_cluster's `NodeServer` always opens a listener of its own (127.0.0.1, a random port),
/// which takes sessions on the cookie alone. A peer that finds it and dials it with the right
/// cookie and a real node's name gets no session: the node seals it with a TLS handshake nobody
/// can complete (`tls::sealed_acceptor`), so every session goes through the cluster port's TLS,
/// identity gate and caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ractor_clusters_own_listener_gives_no_session_around_tls_and_the_gate() {
    let tc = start().await;
    tc.stock("sec-1", 1_000, 100).await;
    let cfg = &tc.lc.configs[0];
    let ours = [cfg.cluster_listen.port(), cfg.http_listen.port()];
    let inner: Vec<u16> =
        listening_ports(tc.lc.pid(0).expect("n1 runs")).into_iter().filter(|p| !ours.contains(p)).collect();
    assert!(!inner.is_empty(), "ractor_cluster's own listener was not found among n1's sockets");
    let cookie = std::fs::read_to_string(&tc.lc.secrets().cookie_file).expect("cookie").trim().to_string();
    let log = tc.lc.log_path(0);
    let refusals =
        || std::fs::read_to_string(&log).unwrap_or_default().matches("Error establishing secure socket").count();
    for port in inner {
        let before = refusals();
        let server = NodeServer::new(0, cookie.clone(), "n2".into(), "127.0.0.1".into(), None, None)
            .with_listen_addr(std::net::IpAddr::from([127, 0, 0, 1]));
        let (server, _) = Actor::spawn(None, server, ()).await.expect("node server");
        let _ = ractor_cluster::client_connect(&server, format!("127.0.0.1:{port}")).await;
        eventually(Duration::from_secs(10), "n1 refused the handshake on its inner listener", || async {
            (refusals() > before).then_some(())
        })
        .await;
        let sessions =
            ractor::call_t!(server, ractor_cluster::NodeServerMessage::GetSessions, 1_000).expect("sessions");
        assert!(sessions.is_empty(), "a session was made around TLS on port {port}");
        server.stop(None);
    }
    still_serving(&tc, 0, 100).await;
}

/// A connection from `from` (a loopback address of its own) to `to`.
async fn connect_from(from: std::net::IpAddr, to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Keeps `n` silent connections from `from` open to each of `targets`, opening a new one as soon
/// as the node closes one (at its handshake deadline, or at once past a cap), until dropped.
struct Flood(Vec<tokio::task::JoinHandle<()>>);

impl Flood {
    fn start(from: std::net::IpAddr, targets: &[std::net::SocketAddr], n: usize) -> Flood {
        let mut tasks = Vec::new();
        for &to in targets {
            for _ in 0..n {
                tasks.push(tokio::spawn(async move {
                    // At most one connection every 20 ms per task: a flood, not a busy loop.
                    let mut pace = tokio::time::interval(Duration::from_millis(20));
                    loop {
                        pace.tick().await;
                        if let Ok(mut s) = connect_from(from, to).await {
                            use tokio::io::AsyncReadExt;
                            let mut buf = [0u8; 64];
                            // Say nothing; wait for the node to close it.
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                    }
                }));
            }
        }
        Flood(tasks)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// Issue 17, item 4: one address floods every node's cluster port and n1's API with silent
/// connections, reopening each as soon as it is closed. Its share of handshakes and of API
/// connections is capped per address, so n2 restarted in the middle of it rejoins (every node
/// sees it up again, it is ready), and a client from another address is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_during_a_flood_of_silent_connections_rejoins() {
    let mut tc = start().await;
    tc.stock("sec-1", 1_000, 100).await;
    let attacker: std::net::IpAddr = "127.0.0.2".parse().expect("address");
    let ports: Vec<std::net::SocketAddr> = tc.lc.configs.iter().map(|c| c.cluster_listen).collect();
    let before = refused(&tc, 0, "address_cap").await;
    let flood = Flood::start(attacker, &ports, 24);
    counted(&tc, 0, "address_cap", before, 20).await;

    // The API: past its share (`max_connections_per_address`, 256) the attacker gets 503s, and
    // a client from another address is still answered.
    let api = tc.lc.configs[0].http_listen;
    let held: Vec<TcpStream> =
        futures::future::join_all((0..300).map(|_| connect_from(attacker, api))).await.into_iter().flatten().collect();
    eventually(Duration::from_secs(10), "the attacker's connections past its share are refused", || async {
        let page = tc.http.get(format!("{}/metrics", tc.url(0))).send().await.ok()?.text().await.ok()?;
        let refused = page
            .lines()
            .find_map(|l| l.strip_prefix("bulkhead_http_connections_refused_per_address_total "))
            .and_then(|v| v.parse::<u64>().ok())?;
        (refused >= 40).then_some(())
    })
    .await;
    still_serving(&tc, 0, 200).await;

    tc.lc.stop(1);
    tc.lc.start(1).expect("start n2");
    for i in [0, 2] {
        eventually(Duration::from_secs(30), "n2 is up again for every node", || async {
            (tc.status_of(i, "n2").await == "up").then_some(())
        })
        .await;
    }
    eventually(Duration::from_secs(30), "n2 is ready again", || async {
        (tc.get(1, "/readyz").await.status == 200).then_some(())
    })
    .await;
    still_serving(&tc, 1, 201).await;
    drop(held);
    drop(flood);
}

/// `bulkhead_cluster_requests_refused_total` of `capability` and `reason` on node `i`.
async fn requests_refused(tc: &TestCluster, i: usize, capability: &str, reason: &str) -> u64 {
    let page = tc.http.get(format!("{}/metrics", tc.url(i))).send().await.expect("metrics").text().await.expect("text");
    let labels = [format!("capability=\"{capability}\""), format!("reason=\"{reason}\"")];
    page.lines()
        .filter(|l| l.starts_with("bulkhead_cluster_requests_refused_total{"))
        .filter(|l| labels.iter().all(|x| l.contains(x.as_str())))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}

/// A member of the cluster, with its own certificate, cookie and real links, that hosts no orders:
/// its charges, holds and deliveries are refused by the capabilities' gateways before any worker
/// sees them, while what the front of any node may send still passes; and a request that names
/// another node than the link it came over is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_hosts_no_orders_cannot_charge_reserve_or_deliver() {
    use bulkhead_actors::consumer::{ConsumerReply, ConsumerRequest, OrderConfirmed};
    use bulkhead_actors::inventory::{InventoryReply, InventoryRequest, Item};
    use bulkhead_actors::payments::{PaymentReply, PaymentRequest};
    use bulkhead_actors::Capability;
    use bulkhead_cluster::config::CapabilityPlacement;
    use bulkhead_cluster::{CallError, Cluster};

    // Orders on n1 and n2 only; n3 hosts every other capability.
    let mut tc = common::start_configured(bulkhead_cluster::Timing::default(), |configs| {
        for cfg in configs.iter_mut() {
            let orders = CapabilityPlacement {
                shards: Some(2),
                leaders: vec!["n1".into(), "n2".into()],
                ..CapabilityPlacement::on(&["n1", "n2"])
            };
            cfg.capabilities.0.insert(Capability::Orders, orders);
        }
    })
    .await;
    tc.stock("sec-1", 1_000, 100).await;
    still_serving(&tc, 0, 10).await;

    // The test process becomes n3: n3's config, certificate and cookie, real TLS links.
    let n3 = bulkhead_launch::config::NodeConfig::load(tc.lc.config_path(2)).expect("n3's config");
    tc.lc.stop(2);
    let forger = Cluster::start(n3.cluster()).await.expect("n3 in the test process");
    eventually(Duration::from_secs(20), "the test's n3 is up on n1 and n2", || async {
        let both = tc.status_of(0, "n3").await == "up" && tc.status_of(1, "n3").await == "up";
        let seen = ["n1", "n2"].iter().all(|n| forger.status_of(n) == bulkhead_cluster::Status::Up);
        (both && seen).then_some(())
    })
    .await;

    let t = Duration::from_secs(3);
    let order_id = uuid::Uuid::now_v7();
    let role = |e: Option<&CallError>| matches!(e, Some(CallError::Rejected { reason, .. }) if reason.contains("hosts no orders replica"));
    let before =
        requests_refused(&tc, 0, "payments", "role").await + requests_refused(&tc, 1, "payments", "role").await;
    for node in ["n1", "n2"] {
        let charge = PaymentRequest::Charge { order_id, amount_cents: 100, token: "tok_ok".into() };
        let r = forger.call_with_timeout::<_, PaymentReply>(Capability::Payments, node, &charge, "", t).await;
        assert!(role(r.as_ref().err()), "a charge from n3 on {node}: {r:?}");
        let refund = PaymentRequest::Refund { order_id };
        let r = forger.call_with_timeout::<_, PaymentReply>(Capability::Payments, node, &refund, "", t).await;
        assert!(role(r.as_ref().err()), "a refund from n3 on {node}: {r:?}");
        let hold = InventoryRequest::Reserve {
            order_id,
            items: vec![Item { sku: "sec-1".into(), quantity: 5 }],
            ttl_ms: u64::MAX,
        };
        let r = forger.call_with_timeout::<_, InventoryReply>(Capability::Inventory, node, &hold, "", t).await;
        assert!(role(r.as_ref().err()), "a hold from n3 on {node}: {r:?}");
        let deliver = ConsumerRequest::Deliver(OrderConfirmed {
            event_id: order_id,
            order_id,
            customer_id: "c".into(),
            lines: Vec::new(),
            total_cents: 0,
            payment_id: "p".into(),
        });
        let r = forger.call_with_timeout::<_, ConsumerReply>(Capability::Shipping, node, &deliver, "", t).await;
        assert!(role(r.as_ref().err()), "a delivery from n3 on {node}: {r:?}");
        // A drill makes a worker panic (fault injection is on here): only a node's own front sends it.
        let drill = PaymentRequest::InjectPanic;
        let r = forger.call_with_timeout::<_, PaymentReply>(Capability::Payments, node, &drill, "", t).await;
        assert!(
            matches!(&r, Err(CallError::Rejected { reason, .. }) if reason.contains("only this node")),
            "a drill from n3 on {node}: {r:?}"
        );
        // What the front of any node sends passes the check (the worker answers, led here or not).
        let list = PaymentRequest::List { order_id };
        let r = forger.call_with_timeout::<_, PaymentReply>(Capability::Payments, node, &list, "", t).await;
        assert!(r.is_ok(), "a listing from n3 on {node}: {r:?}");
    }
    let after = requests_refused(&tc, 0, "payments", "role").await + requests_refused(&tc, 1, "payments", "role").await;
    assert_eq!(after, before + 6, "three refused payments requests per node, counted");

    // A request that names n1 but comes over n3's link: its binding proves n3, not n1.
    let (gateway, mut sender) = forger.member(Capability::Payments, "n2").expect("n2's payments gateway");
    sender.node = "n1".into();
    let list = PaymentRequest::List { order_id };
    let r = bulkhead_cluster::call::call::<_, PaymentReply>(&gateway, Capability::Payments, "n2", sender, &list, "", t)
        .await;
    assert!(
        matches!(&r, Err(CallError::Busy { reason, .. }) if reason.contains("did not come over a link with n1")),
        "{r:?}"
    );
    assert!(requests_refused(&tc, 1, "payments", "not_vouched").await >= 1);

    // Nothing of it landed: no charge for the order, the stock untouched.
    let charges = tc.get(0, &format!("/v1/payments?order_id={order_id}")).await;
    assert_eq!(charges.status, 200, "{}", charges.body);
    assert_eq!(charges.body["payments"], serde_json::json!([]), "{}", charges.body);
    let stock = tc.get(0, "/v1/inventory/sec-1").await;
    assert_eq!(stock.body["reserved"], 0, "{}", stock.body);
    forger.shutdown();
}
