//! The secrets of a local cluster, kept in its data dir: the cookie, the two API tokens, the
//! named clients' file,
//! cluster CA and each node's certificate (`certs/`). Made on first use (keys and tokens mode
//! 0600) and reused by every later launch on the same data dir, so a restarted demo keeps them.

use std::path::{Path, PathBuf};

use bulkhead_cluster::secret::{random_token, read_secret, write_secret};

use crate::config::NodeConfig;
use crate::error::LaunchError;

/// Where a local cluster's secrets live (all under its data dir).
#[derive(Debug, Clone)]
pub struct LocalSecrets {
    pub cookie_file: PathBuf,
    pub client_token_file: PathBuf,
    pub admin_token_file: PathBuf,
    /// The named clients (`bulkhead tokens --add`), shared by the local cluster's nodes.
    pub clients_file: PathBuf,
    /// `ca.pem`, `ca.key`, and `<node>.pem` / `<node>.key` for each node.
    pub certs_dir: PathBuf,
}

impl LocalSecrets {
    /// The secrets of `data_dir`, made where missing, with a certificate for each of `nodes`.
    pub fn ensure(data_dir: &Path, nodes: &[&str]) -> Result<LocalSecrets, LaunchError> {
        std::fs::create_dir_all(data_dir).map_err(LaunchError::io("create", data_dir))?;
        let s = LocalSecrets {
            cookie_file: data_dir.join("cookie"),
            client_token_file: data_dir.join("client.token"),
            admin_token_file: data_dir.join("admin.token"),
            clients_file: data_dir.join("clients.tokens"),
            certs_dir: data_dir.join("certs"),
        };
        for file in [&s.cookie_file, &s.client_token_file, &s.admin_token_file] {
            if !file.exists() {
                write_secret(file, format!("{}\n", random_token()).as_bytes()).map_err(LaunchError::Secret)?;
            } else if bulkhead_cluster::secret::check_private(file, "secret").is_err() {
                // A data dir from an earlier release wrote its cookie 0644; the node now refuses
                // that, and this is our own local cluster's file: make it private.
                bulkhead_cluster::secret::make_private(file).map_err(LaunchError::Secret)?;
            }
        }
        if !s.clients_file.exists() {
            write_secret(&s.clients_file, b"# NAME SCOPE SHA256-of-token: `bulkhead tokens DIR --add NAME`\n")
                .map_err(LaunchError::Secret)?;
        }
        std::fs::create_dir_all(&s.certs_dir).map_err(LaunchError::io("create", &s.certs_dir))?;
        let (ca, ca_key) = (s.certs_dir.join("ca.pem"), s.certs_dir.join("ca.key"));
        if !ca.exists() || !ca_key.exists() {
            let (cert, key) = bulkhead_cluster::tls::new_ca().map_err(LaunchError::Secret)?;
            write_secret(&ca_key, key.as_bytes()).map_err(LaunchError::Secret)?;
            std::fs::write(&ca, cert).map_err(LaunchError::io("write", &ca))?;
        }
        for node in nodes {
            let (cert, key) = s.node_cert(node);
            if !cert.exists() || !key.exists() {
                let read = |p: &Path| std::fs::read_to_string(p).map_err(LaunchError::io("read", p));
                let (c, k) =
                    bulkhead_cluster::tls::issue(&read(&ca)?, &read(&ca_key)?, node).map_err(LaunchError::Secret)?;
                write_secret(&key, k.as_bytes()).map_err(LaunchError::Secret)?;
                std::fs::write(&cert, c).map_err(LaunchError::io("write", &cert))?;
            }
        }
        Ok(s)
    }

    /// `<node>.pem` and `<node>.key` under `certs/`.
    pub fn node_cert(&self, node: &str) -> (PathBuf, PathBuf) {
        (self.certs_dir.join(format!("{node}.pem")), self.certs_dir.join(format!("{node}.key")))
    }

    pub fn admin_token(&self) -> Result<String, LaunchError> {
        read_secret(&self.admin_token_file, "admin_token_file").map_err(LaunchError::Secret)
    }

    pub fn client_token(&self) -> Result<String, LaunchError> {
        read_secret(&self.client_token_file, "client_token_file").map_err(LaunchError::Secret)
    }

    /// Points `cfg` at these secrets (no secret goes into the config file itself).
    pub fn apply(&self, cfg: &mut NodeConfig) {
        cfg.cookie = None;
        cfg.cookie_file = Some(self.cookie_file.clone());
        cfg.client_token_file = Some(self.client_token_file.clone());
        cfg.admin_token_file = Some(self.admin_token_file.clone());
        cfg.clients_file = Some(self.clients_file.clone());
        let (cert, key) = self.node_cert(&cfg.name);
        cfg.tls = bulkhead_cluster::TlsMode::Mutual;
        cfg.tls_ca_file = Some(self.certs_dir.join("ca.pem"));
        cfg.tls_cert_file = Some(cert);
        cfg.tls_key_file = Some(key);
    }
}

/// A token file an operator hands a tool (`--admin-token-file`), read with the node's own checks:
/// no symlink, owned by this user, not readable by group or others.
pub fn read_token_file(path: &Path, what: &str) -> Result<String, LaunchError> {
    read_secret(path, what).map_err(LaunchError::Secret)
}

/// An HTTP client that sends `Authorization: Bearer <token>` with every request.
pub fn authorized(builder: reqwest::ClientBuilder, token: &str) -> Result<reqwest::Client, LaunchError> {
    let mut value =
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| LaunchError::TokenNotAHeader)?;
    value.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
    builder.default_headers(headers).build().map_err(LaunchError::HttpClient)
}
