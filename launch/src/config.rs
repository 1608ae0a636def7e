//! The node's config file (TOML), as an operator writes it: one [`NodeConfig`] whose sections
//! are each layer's own settings. The cluster layer's ([`ClusterConfig`], [`Timing`], its part of
//! `[limits]`, `tls`), the HTTP layer's (`[http]`, `auth`, the tokens, `[rate_limit]`), the orders
//! saga's (`[orders]`), the stores' (`durability`) and the binary's own (`[log]`, `[telemetry]`);
//! [`NodeConfig::cluster`] assembles what the cluster layer is started with. Kept here, below the
//! binary, because the launcher writes these files for local clusters (the demo, the tests, chaos).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bulkhead_actors::orders::OrdersConfig;
use bulkhead_actors::{Capability, CapabilityMap};
use bulkhead_cluster::{ClusterConfig, Timing, TlsMode};
use bulkhead_http::{ApiTokens, AuthMode, HttpEdge, RateLimit};
use serde::{Deserialize, Serialize};

/// `[limits]`: load-shedding bounds; past them a request is refused at once (429/503 +
/// `Retry-After`) instead of queueing without limit in an unbounded ractor mailbox. One table in
/// the file; the HTTP front enforces `orders_in_flight`, the cluster layer the rest
/// ([`bulkhead_cluster::Limits`], see [`Limits::cluster`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `POST /v1/orders` requests this node's HTTP front handles at once; one more is answered 429.
    pub orders_in_flight: usize,
    /// See [`bulkhead_cluster::Limits`].
    pub gateway_in_flight: usize,
    pub cluster_connections: usize,
    pub cluster_handshakes: usize,
    pub cluster_handshakes_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let c = bulkhead_cluster::Limits::default();
        Self {
            orders_in_flight: bulkhead_http::config::ORDERS_IN_FLIGHT,
            gateway_in_flight: c.gateway_in_flight,
            cluster_connections: c.cluster_connections,
            cluster_handshakes: c.cluster_handshakes,
            cluster_handshakes_per_address: c.cluster_handshakes_per_address,
        }
    }
}

impl Limits {
    /// The bounds the cluster layer enforces.
    pub fn cluster(&self) -> bulkhead_cluster::Limits {
        bulkhead_cluster::Limits {
            gateway_in_flight: self.gateway_in_flight,
            cluster_connections: self.cluster_connections,
            cluster_handshakes: self.cluster_handshakes,
            cluster_handshakes_per_address: self.cluster_handshakes_per_address,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.orders_in_flight == 0 {
            return Err("limits: every limit must be > 0".into());
        }
        self.cluster().validate()
    }
}

/// `[log]`: how the node writes its log (to stderr; journald or a file keeps it). Read by the
/// binary's telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// One line per event: `text` for people, `json` (one object per line) for log collectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[telemetry]`: OpenTelemetry export of the node's spans (HTTP requests, cluster calls, saga
/// steps, Raft proposals). Off unless `otlp_endpoint` is set. Read by the binary's telemetry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP (protobuf) collector, e.g. `http://127.0.0.1:4318`; spans go to
    /// `<endpoint>/v1/traces`. Plain HTTP only: run a collector agent next to the node.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), String> {
        match self.otlp_endpoint.as_deref() {
            None => Ok(()),
            Some(e) if e.starts_with("http://") && e.len() > "http://".len() => Ok(()),
            Some(e) if e.starts_with("https://") => Err(format!(
                "telemetry.otlp_endpoint `{e}`: https is not supported; run an OpenTelemetry collector agent on this host and give its http:// address"
            )),
            Some(e) => Err(format!("telemetry.otlp_endpoint `{e}` must be an http:// URL, e.g. http://127.0.0.1:4318")),
        }
    }
}

/// One node's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; unique in the cluster; the shard map refers to nodes by it.
    pub name: String,
    /// Address the cluster listener binds, e.g. `0.0.0.0:7101`.
    pub cluster_listen: SocketAddr,
    /// `host:port` peers dial to reach this node (defaults to `cluster_listen`).
    #[serde(default)]
    pub cluster_advertise: Option<String>,
    /// `host:port` of other nodes to dial at start; the rest of the mesh is learned from them.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Shared secret of the cluster handshake. Give this or `cookie_file`, not both.
    #[serde(default)]
    pub cookie: Option<String>,
    /// File holding the cookie (trimmed); relative paths are relative to the config file.
    #[serde(default)]
    pub cookie_file: Option<PathBuf>,
    /// Where this node's stores live: `<data_dir>/<capability>/`.
    pub data_dir: PathBuf,
    /// Address the HTTP API binds.
    pub http_listen: SocketAddr,
    /// Address clients should use for this node's API (defaults to `http_listen`).
    #[serde(default)]
    pub http_advertise: Option<String>,
    /// `fsync` (default) or `flush`.
    #[serde(default)]
    pub durability: bulkhead_storage::Durability,
    /// Enables `POST /admin/panic/{capability}` and the poison customers (`poison-shipping…`,
    /// `poison-notifications…`) the consumers fail on; never on in production.
    #[serde(default)]
    pub fault_injection: bool,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub orders: OrdersConfig,
    #[serde(default)]
    pub http: HttpEdge,
    /// `tokens` (default) or `off`.
    #[serde(default)]
    pub auth: AuthMode,
    /// Files holding the `client` and the `admin` API token (mode 0600; relative to the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// The named clients' file (`bulkhead tokens --add NAME`; mode 0600; relative to the
    /// config): one token per client, read again within a second of a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_file: Option<PathBuf>,
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// `[log] format = "text" | "json"`.
    #[serde(default)]
    pub log: LogConfig,
    /// `[telemetry] otlp_endpoint`: where spans are exported, if anywhere.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `mutual` (default) or `off`.
    #[serde(default)]
    pub tls: TlsMode,
    /// The cluster CA's certificate, this node's certificate (naming this node) and its private
    /// key (mode 0600), PEM; relative to the config. Made by `bulkhead certs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// The API tokens read from the token files by [`NodeConfig::load`] (never written back).
    #[serde(skip)]
    pub tokens: Option<ApiTokens>,
    /// The shard map: `[capabilities.inventory] nodes = ["n1", "n2"]`.
    pub capabilities: CapabilityMap,
}

impl NodeConfig {
    /// Reads and validates a config file; errors say which file and what is wrong.
    pub fn load(path: &Path) -> Result<NodeConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        let mut cfg: NodeConfig =
            toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        if cfg.cookie.is_some() && cfg.cookie_file.is_some() {
            return Err(format!("invalid config {}: give `cookie` or `cookie_file`, not both", path.display()));
        }
        if cfg.cookie.is_some() {
            // The secret is in the config itself: the config is then a secret file.
            bulkhead_cluster::secret::check_private(
                path,
                "the config (it holds `cookie` inline; prefer `cookie_file`)",
            )?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut cfg.cookie_file,
            &mut cfg.client_token_file,
            &mut cfg.admin_token_file,
            &mut cfg.clients_file,
            &mut cfg.tls_ca_file,
            &mut cfg.tls_cert_file,
            &mut cfg.tls_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = dir.join(&*file);
            }
        }
        cfg.validate().map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        cfg.read_secrets().map_err(|e| format!("invalid config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Reads the cookie and token files named by a validated config, each refused unless only its
    /// owner may read it.
    pub fn read_secrets(&mut self) -> Result<(), String> {
        if let Some(file) = &self.cookie_file {
            self.cookie = Some(bulkhead_cluster::secret::read_secret(file, "cookie_file")?);
        }
        if let (AuthMode::Tokens, Some(client), Some(admin)) =
            (self.auth, &self.client_token_file, &self.admin_token_file)
        {
            self.tokens = Some(ApiTokens::new(
                bulkhead_cluster::secret::read_secret(client, "client_token_file")?,
                bulkhead_cluster::secret::read_secret(admin, "admin_token_file")?,
            )?);
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("name `{}` must be non-empty ASCII letters, digits, - or _", self.name));
        }
        match (&self.cookie, &self.cookie_file) {
            (Some(c), _) if !c.is_empty() => {}
            (None, Some(_)) => {}
            _ => return Err("give a non-empty `cookie` or a `cookie_file`".into()),
        }
        if self.auth == AuthMode::Tokens && (self.client_token_file.is_none() || self.admin_token_file.is_none()) {
            return Err("auth is on: give client_token_file and admin_token_file (`bulkhead tokens`), \
                        or say auth = \"off\" to serve the API to anyone who reaches it"
                .into());
        }
        if self.tls == TlsMode::Mutual
            && (self.name.contains('_') || self.name.starts_with('-') || self.name.ends_with('-'))
        {
            return Err(format!(
                "name `{}`: with tls on, a node's name is its certificate's DNS name: letters, digits and inner hyphens",
                self.name
            ));
        }
        if self.tls == TlsMode::Mutual
            && (self.tls_ca_file.is_none() || self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err("tls is on: give tls_ca_file, tls_cert_file and tls_key_file (`bulkhead certs`), \
                        or say tls = \"off\" to run cluster links in plain TCP"
                .into());
        }
        self.rate_limit.validate()?;
        self.orders.validate()?;
        if self.cluster_advertise.is_none() && self.cluster_listen.ip().is_unspecified() {
            return Err(format!(
                "cluster_listen {} binds every interface: set cluster_advertise to the host:port peers should dial",
                self.cluster_listen
            ));
        }
        for (what, addr) in [("cluster_advertise", &self.cluster_advertise), ("http_advertise", &self.http_advertise)] {
            if let Some(a) = addr {
                match a.rsplit_once(':') {
                    Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                    _ => return Err(format!("{what} `{a}` must be host:port")),
                }
            }
        }
        for seed in &self.seeds {
            match seed.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(format!("seed `{seed}` must be host:port")),
            }
        }
        self.capabilities.validate()?;
        self.timing.validate()?;
        self.limits.validate()?;
        self.http.validate(&self.timing)?;
        self.telemetry.validate()?;
        if self.hosted().is_empty() {
            return Err(format!(
                "node `{}` is not listed in any [capabilities.*] nodes: a node the shard map does not name is refused by its peers; list it under a capability",
                self.name
            ));
        }
        Ok(())
    }

    /// Things that are allowed but probably not meant; logged at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.http_advertise.is_none() && self.http_listen.ip().is_unspecified() {
            w.push("http_listen binds every interface and http_advertise is not set: peers will show an unusable HTTP address".into());
        }
        let order_path = self.timing.wait_budget_ms.saturating_add(self.timing.call_timeout_ms);
        if self.http.drain_timeout_ms < order_path {
            w.push(format!(
                "http.drain_timeout_ms ({}) is shorter than an order may take (timing.wait_budget_ms + call_timeout_ms = {order_path}): \
                 a SIGTERM may cut orders being placed (their clients retry with the same Idempotency-Key)",
                self.http.drain_timeout_ms
            ));
        }
        w
    }

    pub fn cookie(&self) -> &str {
        self.cookie.as_deref().unwrap_or_default()
    }

    pub fn advertised_cluster_addr(&self) -> String {
        self.cluster_advertise.clone().unwrap_or_else(|| self.cluster_listen.to_string())
    }

    pub fn advertised_http_addr(&self) -> String {
        self.http_advertise.clone().unwrap_or_else(|| self.http_listen.to_string())
    }

    pub fn hosted(&self) -> Vec<Capability> {
        self.capabilities.hosted_by(&self.name)
    }

    /// What the cluster layer is started with (the cookie as read by [`NodeConfig::load`]).
    pub fn cluster(&self) -> ClusterConfig {
        ClusterConfig {
            name: self.name.clone(),
            cluster_listen: self.cluster_listen,
            cluster_advertise: self.cluster_advertise.clone(),
            seeds: self.seeds.clone(),
            cookie: self.cookie().to_string(),
            http_advertise: self.advertised_http_addr(),
            tls: self.tls,
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            timing: self.timing.clone(),
            limits: self.limits.cluster(),
            shard_map: self.capabilities.shard_map(),
        }
    }
}

#[cfg(test)]
mod tests {

    /// The example configs in deploy/ parse with every key they document (unknown keys are refused).
    #[test]
    fn the_deploy_examples_parse_and_validate() {
        for text in [
            include_str!("../../deploy/n1.toml"),
            include_str!("../../deploy/n2.toml"),
            include_str!("../../deploy/n3.toml"),
        ] {
            let mut cfg: NodeConfig = toml::from_str(text).unwrap();
            cfg.cookie = Some("c".into());
            cfg.cookie_file = None;
            cfg.validate().unwrap();
            assert_eq!(cfg.auth, AuthMode::Tokens);
            assert_eq!(cfg.rate_limit, RateLimit::default());
            assert_eq!(cfg.tls, TlsMode::Mutual);
            let mut open = cfg.clone();
            open.admin_token_file = None;
            assert!(open.validate().unwrap_err().contains("auth = \"off\""));
            open.tls_key_file = None;
            open.auth = AuthMode::Off;
            assert!(open.validate().unwrap_err().contains("tls = \"off\""));
            let mut underscored = cfg.clone();
            underscored.name = "n_1".into();
            assert!(underscored.validate().unwrap_err().contains("DNS name"));
            assert_eq!(cfg.limits, Limits::default());
            assert_eq!(cfg.timing, Timing::default());
            cfg.limits.orders_in_flight = 0;
            assert!(cfg.validate().unwrap_err().contains("limits"));
            cfg.limits = Limits::default();
            assert_eq!(cfg.http, HttpEdge::default());
            cfg.http.request_timeout_ms = cfg.timing.wait_budget_ms + cfg.timing.call_timeout_ms;
            assert!(cfg.validate().unwrap_err().contains("request_timeout_ms"), "would cut orders being placed");
            cfg.http = HttpEdge { idle_timeout_ms: HttpEdge::default().request_timeout_ms, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("idle_timeout_ms"));
            cfg.http = HttpEdge { max_connections: 0, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("max_connections"));
            cfg.http = HttpEdge { idle_timeout_ms: u64::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("at most"), "u64::MAX would overflow a deadline");
            cfg.http = HttpEdge { max_connections: usize::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("at most"));
            cfg.http = HttpEdge { drain_timeout_ms: u64::MAX, ..HttpEdge::default() };
            assert!(cfg.validate().unwrap_err().contains("drain_timeout_ms"));
            cfg.http = HttpEdge::default();
            assert!(cfg.validate().is_ok());
        }
    }

    use super::*;

    const SAMPLE: &str = r#"
name = "n1"
cluster_listen = "127.0.0.1:7101"
seeds = ["127.0.0.1:7102"]
cookie = "secret"
data_dir = "/tmp/x"
http_listen = "127.0.0.1:8080"
auth = "off"
tls = "off"

[capabilities.orders]
nodes = ["n1"]
[capabilities.inventory]
nodes = ["n1", "n2"]
shards = 2
[capabilities.payments]
nodes = ["n2"]
[capabilities.shipping]
nodes = ["n3"]
[capabilities.notifications]
nodes = ["n3"]
"#;

    #[cfg(unix)]
    #[test]
    fn a_config_with_the_cookie_inline_must_be_private_itself() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, SAMPLE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeConfig::load(&path).unwrap_err();
        assert!(e.contains("inline") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().cookie(), "secret");
    }

    #[test]
    fn parses_and_derives_hosted_capabilities() {
        let cfg: NodeConfig = toml::from_str(SAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.hosted(), vec![Capability::Orders, Capability::Inventory]);
        assert_eq!(cfg.capabilities.shard_map().all_nodes(), vec!["n1", "n2", "n3"]);
    }

    #[test]
    fn fingerprint_sees_any_difference() {
        let a: NodeConfig = toml::from_str(SAMPLE).unwrap();
        let b: NodeConfig =
            toml::from_str(&SAMPLE.replace(r#"nodes = ["n1", "n2"]"#, r#"nodes = ["n2", "n1"]"#)).unwrap();
        let fingerprint = |c: &NodeConfig| c.capabilities.shard_map().fingerprint();
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let slower = Timing { election_timeout_ms: a.timing.election_timeout_ms + 1, ..a.timing.clone() };
        assert_eq!(a.timing.fingerprint(), a.timing.clone().fingerprint());
        assert_ne!(a.timing.fingerprint(), slower.fingerprint());
    }

    #[test]
    fn node_for_is_stable_and_spreads() {
        let cfg: NodeConfig = toml::from_str(SAMPLE).unwrap();
        let m = &cfg.capabilities.shard_map();
        let on_n1 =
            (0..100).filter(|i| m.node_for(Capability::Inventory, format!("sku-{i}").as_bytes()) == Some("n1")).count();
        assert!((25..75).contains(&on_n1), "{on_n1}");
        assert_eq!(m.node_for(Capability::Inventory, b"sku-1"), m.node_for(Capability::Inventory, b"sku-1"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = toml::from_str::<NodeConfig>(&SAMPLE.replace("[capabilities.payments]", "[capabilities.paymnts]"))
            .unwrap_err();
        assert!(e.to_string().contains("paymnts"), "{e}");
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"cookie = "secret""#, "")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("cookie"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"nodes = ["n2"]"#, "nodes = []")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("payments"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace("127.0.0.1:7101", "0.0.0.0:7101")).unwrap();
        assert!(cfg.validate().unwrap_err().contains("cluster_advertise"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"["127.0.0.1:7102"]"#, r#"["nohost"]"#)).unwrap();
        assert!(cfg.validate().unwrap_err().contains("seed `nohost`"));
        let cfg: NodeConfig = toml::from_str(&SAMPLE.replace(r#"name = "n1""#, r#"name = "n9""#)).unwrap();
        assert!(cfg.validate().unwrap_err().contains("refused by its peers"));
    }
}
