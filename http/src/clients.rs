//! Named API clients: one token per client, each with a name and a scope, made and revoked with
//! `bulkhead tokens --add NAME` / `--revoke NAME` while the nodes run.
//!
//! The clients file (`clients_file` in the config, mode 0600 like every secret) has one line per
//! client, `NAME SCOPE SHA256`: the name, `client` or `admin`, and the SHA-256 of the token in hex.
//! The file never holds a token, so a copy of it lets nobody in; the token is shown once, when it
//! is made. Lines starting with `#` are comments.
//!
//! A node reads the file at start and looks at it again every [`RELOAD_EVERY`] ([`watch`]): a
//! change (a new client, a revoked one) takes effect within that time, without a restart. A file
//! that no longer parses keeps the clients of its last good reading (logged at warn: the node
//! never falls open, and a revoke that failed to parse is visible); a file that was removed
//! revokes every named client (logged too). Copy the file to every node, as with the other token
//! files.
//!
//! What the name is for: the rate limit per token counts per client, and an Idempotency-Key is
//! the client's own ([`key_scope`]): two clients that send the same key get two orders, and one
//! cannot read the other's order through a key.
//!
//! The two shared token files of before (`client_token_file`, `admin_token_file`) still work, as
//! the clients `client` and `admin`, whose keys keep the meaning they always had (no scope).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Probes, the spec, the dashboard's page (its data calls need a token).
    Public,
    /// Place and read orders; read stock, payments, shipments, notifications.
    Client,
    /// Everything, including `PUT /v1/inventory`, dead letters, `/v1/cluster`, `/metrics`, `/admin/*`.
    Admin,
}

impl Scope {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scope::Public => "public",
            Scope::Client => "client",
            Scope::Admin => "admin",
        }
    }
}

/// How often a node looks at the clients file for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Longest client name; names are `[a-z0-9_-]`, so a scoped key reads back unambiguously.
pub const MAX_NAME: usize = 32;

/// The names the two shared token files answer to: not available to named clients.
pub const RESERVED: [&str; 2] = ["client", "admin"];

/// One named client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedClient {
    pub name: Arc<str>,
    pub scope: Scope,
}

/// The SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Whether `name` may name a client.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!(
            "`{}` is not a client name: 1-{MAX_NAME} characters of a-z, 0-9, - and _",
            name.chars().take(40).collect::<String>()
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!("`{name}` is the name of the shared {name} token file; choose another"));
    }
    Ok(())
}

/// The named clients, as one reading of the clients file found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clients {
    entries: Vec<(NamedClient, [u8; 32])>,
    by_hash: HashMap<[u8; 32], usize>,
}

impl Clients {
    /// Parses the file's text; any bad line refuses the whole file, saying which line and why.
    pub fn parse(text: &str) -> Result<Clients, String> {
        let mut c = Clients::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| format!("line {}: {why}", n + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, scope, hash] = fields[..] else {
                return Err(bad("expected `NAME SCOPE SHA256` (three fields)".into()));
            };
            check_name(name).map_err(bad)?;
            let scope = match scope {
                "client" => Scope::Client,
                "admin" => Scope::Admin,
                other => return Err(bad(format!("scope `{other}` is neither `client` nor `admin`"))),
            };
            let hash = unhex(hash).ok_or_else(|| bad("the token's SHA-256 must be 64 hex digits".into()))?;
            c.add(NamedClient { name: name.into(), scope }, hash).map_err(bad)?;
        }
        Ok(c)
    }

    /// Adds a client; refused if its name or its token is taken.
    pub fn add(&mut self, client: NamedClient, hash: [u8; 32]) -> Result<(), String> {
        if self.entries.iter().any(|(c, _)| c.name == client.name) {
            return Err(format!("client `{}` exists; revoke it first to give it a new token", client.name));
        }
        if self.by_hash.contains_key(&hash) {
            return Err("this token already belongs to another client".into());
        }
        self.by_hash.insert(hash, self.entries.len());
        self.entries.push((client, hash));
        Ok(())
    }

    /// Removes the client `name`; whether it was there.
    pub fn revoke(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(c, _)| &*c.name != name);
        self.by_hash = self.entries.iter().enumerate().map(|(i, (_, h))| (*h, i)).collect();
        self.entries.len() != before
    }

    /// The client whose token this is. The token is hashed first, so the lookup's timing says
    /// nothing about any stored token.
    pub fn find(&self, token: &str) -> Option<&NamedClient> {
        self.by_hash.get(&token_hash(token)).map(|&i| &self.entries[i].0)
    }

    pub fn list(&self) -> impl Iterator<Item = &NamedClient> {
        self.entries.iter().map(|(c, _)| c)
    }

    /// The file's text for these clients.
    pub fn render(&self) -> String {
        let mut out =
            String::from("# bulkhead named API clients: NAME SCOPE SHA256-of-token (made by `bulkhead tokens`)\n");
        for (c, h) in &self.entries {
            let scope = if c.scope == Scope::Admin { "admin" } else { "client" };
            out.push_str(&format!("{} {scope} {}\n", c.name, hex(h)));
        }
        out
    }
}

/// What an Idempotency-Key is scoped by: the named client that sent it, or nothing (the shared
/// tokens, and `auth = "off"`: keys as they always were).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope(pub Option<Arc<str>>);

/// The key as the cluster stores it: `NAME KEY` for a named client, the key itself otherwise. A
/// key is visible ASCII without spaces (`validate::idempotency_key`), so no key sent with a shared
/// token, and no other client's, can spell a named client's stored key.
pub fn key_scope(scope: &KeyScope, key: String) -> String {
    match &scope.0 {
        Some(name) => format!("{name} {key}"),
        None => key,
    }
}

/// The clients file of a running node and its last good reading.
pub struct ClientsFile {
    path: PathBuf,
    current: RwLock<Arc<Clients>>,
    /// What the file looked like at the last good reading, and at the last failed one (logged
    /// once), to read it again only when it changed.
    seen: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    good: Option<Stamp>,
    failed: Option<Stamp>,
}

/// Modification time, length, inode and change time (a `chown` or `chmod` changes the last).
type Stamp = (Option<std::time::SystemTime>, u64, u64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::symlink_metadata(path).ok()?;
    #[cfg(unix)]
    let (ino, ctime) = {
        use std::os::unix::fs::MetadataExt;
        (m.ino(), m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()))
    };
    #[cfg(not(unix))]
    let (ino, ctime) = (0, 0);
    Some((m.modified().ok(), m.len(), ino, ctime))
}

/// Reads and parses the clients file (a private regular file of the node's user, as every secret).
pub fn read(path: &Path) -> Result<Clients, String> {
    let text = match bulkhead_cluster::secret::read_secret(path, "clients_file") {
        Ok(t) => t,
        // A file with no client in it yet is fine.
        Err(e) if e.ends_with("is empty") => String::new(),
        Err(e) => return Err(e),
    };
    Clients::parse(&text).map_err(|e| format!("clients_file {}: {e}", path.display()))
}

impl ClientsFile {
    /// Reads the file once; a node does not start on a file it cannot read.
    pub fn open(path: PathBuf) -> Result<Arc<ClientsFile>, String> {
        let seen = stamp(&path);
        let clients = read(&path)?;
        let seen = Seen { good: seen, failed: None };
        Ok(Arc::new(ClientsFile { path, current: RwLock::new(Arc::new(clients)), seen: std::sync::Mutex::new(seen) }))
    }

    /// The clients now.
    pub fn current(&self) -> Arc<Clients> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the file again if it changed since the last good reading. A reading that fails is
    /// tried again at every look (a `chown` that fixes it takes effect), and logged once per change.
    pub fn reload_if_changed(&self) {
        let now = stamp(&self.path);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.good == now {
            return;
        }
        let next = if now.is_none() {
            tracing::warn!(path = %self.path.display(), "the clients file is gone: every named client is revoked");
            Clients::default()
        } else {
            match read(&self.path) {
                Ok(c) => c,
                Err(e) => {
                    if seen.failed != now {
                        seen.failed = now;
                        tracing::warn!(error = %e, "the clients file changed but cannot be read; the clients of its last good reading stay");
                    }
                    return;
                }
            }
        };
        seen.good = now;
        seen.failed = None;
        drop(seen);
        let names: Vec<&str> = next.list().map(|c| &*c.name).collect();
        tracing::info!(path = %self.path.display(), clients = ?names, "clients file read again");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }
}

/// Looks at the clients file every [`RELOAD_EVERY`] until the returned task is aborted.
pub fn watch(file: Arc<ClientsFile>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let f = file.clone();
            // A file read is blocking I/O: off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || f.reload_if_changed()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, scope: Scope) -> NamedClient {
        NamedClient { name: name.into(), scope }
    }

    #[test]
    fn a_file_round_trips_and_finds_clients_by_token_only() {
        let mut c = Clients::default();
        c.add(named("shop-eu", Scope::Client), token_hash("t-eu")).unwrap();
        c.add(named("ops", Scope::Admin), token_hash("t-ops")).unwrap();
        let text = c.render();
        assert!(!text.contains("t-eu") && !text.contains("t-ops"), "the file holds no token: {text}");
        let back = Clients::parse(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.find("t-eu"), Some(&named("shop-eu", Scope::Client)));
        assert_eq!(back.find("t-ops").map(|c| c.scope), Some(Scope::Admin));
        assert_eq!(back.find("t-other"), None);
    }

    #[test]
    fn names_and_tokens_are_one_per_client_and_a_revoke_removes_only_its_own() {
        let mut c = Clients::default();
        c.add(named("a", Scope::Client), token_hash("x")).unwrap();
        assert!(c.add(named("a", Scope::Client), token_hash("y")).unwrap_err().contains("exists"));
        assert!(c.add(named("b", Scope::Client), token_hash("x")).unwrap_err().contains("another client"));
        c.add(named("b", Scope::Client), token_hash("y")).unwrap();
        assert!(c.revoke("a"));
        assert!(!c.revoke("a"));
        assert_eq!(c.find("x"), None);
        assert_eq!(c.find("y").map(|c| &*c.name), Some("b"));
    }

    #[test]
    fn a_bad_line_refuses_the_file_and_says_where() {
        let h = hex(&token_hash("x"));
        for (text, says) in [
            (format!("a client {h} extra"), "three fields"),
            (format!("a root {h}"), "neither"),
            ("a client abc".to_string(), "64 hex"),
            (format!("A client {h}"), "not a client name"),
            (format!("a/b client {h}"), "not a client name"),
            (format!("client client {h}"), "shared client token"),
            (format!("# ok\n\na client {h}\na admin {h}"), "line 4"),
        ] {
            let e = Clients::parse(&text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn keys_of_named_clients_never_meet() {
        let a = KeyScope(Some("a".into()));
        let b = KeyScope(Some("b".into()));
        assert_ne!(key_scope(&a, "k".into()), key_scope(&b, "k".into()));
        assert_eq!(key_scope(&KeyScope(None), "k".into()), "k", "the shared tokens' keys are as before");
        // A shared token's key cannot be a named client's stored key: keys have no spaces.
        let stored = key_scope(&a, "k".into());
        assert!(crate::validate::idempotency_key(stored.as_bytes()).is_err(), "{stored}");
    }

    #[test]
    fn a_running_node_sees_a_new_client_and_a_revoke_and_keeps_the_last_good_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.tokens");
        bulkhead_cluster::secret::write_secret(&path, Clients::default().render().as_bytes()).unwrap();
        let file = ClientsFile::open(path.clone()).unwrap();
        assert_eq!(file.current().list().count(), 0);
        let mut c = Clients::default();
        c.add(named("a", Scope::Client), token_hash("x")).unwrap();
        bulkhead_cluster::secret::write_secret(&path, c.render().as_bytes()).unwrap();
        file.reload_if_changed();
        assert!(file.current().find("x").is_some(), "added without a restart");
        bulkhead_cluster::secret::write_secret(&path, b"garbage line\n").unwrap();
        file.reload_if_changed();
        assert!(file.current().find("x").is_some(), "a file that does not parse keeps the last good clients");
        c.revoke("a");
        bulkhead_cluster::secret::write_secret(&path, c.render().as_bytes()).unwrap();
        file.reload_if_changed();
        assert!(file.current().find("x").is_none(), "revoked without a restart");
        // A file the node refuses (here: others may read it) keeps the last good clients; fixing
        // its mode alone (no new contents) is enough for the next look to take it.
        c.add(named("b", Scope::Client), token_hash("y")).unwrap();
        bulkhead_cluster::secret::write_secret(&path, c.render().as_bytes()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            file.reload_if_changed();
            assert!(file.current().find("y").is_none(), "a file others may read is refused");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            file.reload_if_changed();
            assert!(file.current().find("y").is_some(), "taken once its mode is fixed");
        }
        std::fs::remove_file(&path).unwrap();
        file.reload_if_changed();
        assert_eq!(file.current().list().count(), 0);
    }
}
