//! What can go wrong while launching a local cluster: one error type for every function of this
//! crate that starts, edits or waits on nodes, so a caller can tell a port it could not find from
//! a node that never became ready.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot find a free port: {0}")]
    Ports(std::io::Error),
    #[error("cannot {action} {}: {source}", .path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot start {}: {source}", .exe.display())]
    Spawn { exe: PathBuf, source: std::io::Error },
    #[error("[cluster.timing]: {0}")]
    Timing(toml::de::Error),
    #[error("durability `{value}`: {source} (\"fsync\" or \"flush\")")]
    Durability { value: String, source: toml::de::Error },
    #[error("cannot encode config: {0}")]
    EncodeConfig(toml::ser::Error),
    /// A secret, key or certificate the cluster's own helpers would not read or make (their
    /// message says which file and why).
    #[error("{0}")]
    Secret(String),
    #[error("the token holds characters a header cannot carry")]
    TokenNotAHeader,
    #[error("cannot build an HTTP client: {0}")]
    HttpClient(reqwest::Error),
    /// A request to a node did not get an answer (refused, reset, timed out).
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("cluster not ready after {after:?}: {missing}")]
    NotReady { after: Duration, missing: String },
}

impl LaunchError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| LaunchError::Io { action, path, source }
    }
}

/// For callers whose own errors are still text (the bench, the demo): the message.
impl From<LaunchError> for String {
    fn from(e: LaunchError) -> String {
        e.to_string()
    }
}
