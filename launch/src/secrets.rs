//! The secrets of a local cluster, kept in its data dir: the cookie, the two API tokens (and, with
//! TLS, the cluster CA and each node's certificate). Made on first use, mode 0600, and reused by
//! every later launch on the same data dir, so a restarted demo keeps its tokens.

use std::path::{Path, PathBuf};

use bulkhead_cluster::secret::{random_token, read_secret, write_secret};
use bulkhead_cluster::NodeConfig;

/// Where a local cluster's secrets live (all under its data dir).
#[derive(Debug, Clone)]
pub struct LocalSecrets {
    pub cookie_file: PathBuf,
    pub client_token_file: PathBuf,
    pub admin_token_file: PathBuf,
}

impl LocalSecrets {
    /// The secrets of `data_dir`, made where missing.
    pub fn ensure(data_dir: &Path) -> Result<LocalSecrets, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let s = LocalSecrets {
            cookie_file: data_dir.join("cookie"),
            client_token_file: data_dir.join("client.token"),
            admin_token_file: data_dir.join("admin.token"),
        };
        for file in [&s.cookie_file, &s.client_token_file, &s.admin_token_file] {
            if !file.exists() {
                write_secret(file, format!("{}\n", random_token()).as_bytes())?;
            }
        }
        Ok(s)
    }

    pub fn admin_token(&self) -> Result<String, String> {
        read_secret(&self.admin_token_file, "admin_token_file")
    }

    pub fn client_token(&self) -> Result<String, String> {
        read_secret(&self.client_token_file, "client_token_file")
    }

    /// Points `cfg` at these secrets (no secret goes into the config file itself).
    pub fn apply(&self, cfg: &mut NodeConfig) {
        cfg.cookie = None;
        cfg.cookie_file = Some(self.cookie_file.clone());
        cfg.client_token_file = Some(self.client_token_file.clone());
        cfg.admin_token_file = Some(self.admin_token_file.clone());
        // Mutual TLS comes with the cluster CA (`certs`); until then the links are plain.
        cfg.tls = bulkhead_cluster::TlsMode::Off;
    }
}

/// An HTTP client that sends `Authorization: Bearer <token>` with every request.
pub fn authorized(builder: reqwest::ClientBuilder, token: &str) -> Result<reqwest::Client, String> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
    value.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
    builder.default_headers(headers).build().map_err(|e| format!("cannot build an HTTP client: {e}"))
}
