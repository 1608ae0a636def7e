//! `bulkhead tokens` and `bulkhead certs`: making and rotating the files a node's secrets live in.
//!
//! Every secret is written mode 0600 from its creation ([`write_secret`]) and never overwritten by
//! accident: making a file that exists is refused or skipped, with a message that says which.

use std::io::Write;
use std::path::Path;

use bulkhead_cluster::secret::{random_token, read_secret, write_secret};
use bulkhead_http::auth::Scope;
use bulkhead_http::clients::{check_name, token_hash, Clients, NamedClient};

/// Which token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenScope {
    Client,
    Admin,
}

impl TokenScope {
    fn file(self) -> &'static str {
        match self {
            TokenScope::Client => "client.token",
            TokenScope::Admin => "admin.token",
        }
    }
}

/// What `bulkhead tokens` does to a token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAction {
    /// Make both files where missing; keep any that exist.
    Init,
    /// Put a new token first in the file and keep the newest old one after it: nodes restarted
    /// with the file accept both, so clients can move over at their own pace.
    Rotate(TokenScope),
    /// Keep only the first (newest) token: the old one stops working at each node's next start.
    Retire(TokenScope),
    /// Make a named client in `clients.tokens`; its token is written to the output, once.
    Add { name: String, scope: TokenScope },
    /// Remove a named client from `clients.tokens`.
    Revoke(String),
    /// The named clients of `clients.tokens`.
    List,
}

/// The named clients' file in a token directory.
pub const CLIENTS_FILE: &str = "clients.tokens";

fn read_clients(path: &Path) -> Result<Clients, String> {
    if !path.exists() {
        return Ok(Clients::default());
    }
    bulkhead_http::clients::read(path)
}

pub fn tokens(dir: &Path, action: TokenAction, out: &mut dyn Write) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    match action {
        TokenAction::Init => {
            for scope in [TokenScope::Client, TokenScope::Admin] {
                let path = dir.join(scope.file());
                if path.exists() {
                    say(out, format!("kept {} (it exists; use --rotate to replace a token)", path.display()));
                } else {
                    write_secret(&path, format!("{}\n", random_token()).as_bytes())?;
                    say(out, format!("wrote {} (mode 0600)", path.display()));
                }
            }
            let path = dir.join(CLIENTS_FILE);
            if path.exists() {
                say(out, format!("kept {} (it exists; use --add and --revoke to change it)", path.display()));
            } else {
                write_secret(&path, Clients::default().render().as_bytes())?;
                say(out, format!("wrote {} (mode 0600; no named client yet: --add NAME)", path.display()));
            }
        }
        TokenAction::Rotate(scope) => {
            let path = dir.join(scope.file());
            let old = read_secret(&path, scope.file())?;
            let newest_old = old.lines().next().unwrap_or_default().trim().to_string();
            write_secret(&path, format!("{}\n{newest_old}\n", random_token()).as_bytes())?;
            say(
                out,
                format!(
                    "{}: a new token is first, the previous one second. Copy the file to every node and restart \
                     them one at a time; move clients to the first line; then `--retire {}`.",
                    path.display(),
                    if scope == TokenScope::Client { "client" } else { "admin" }
                ),
            );
        }
        TokenAction::Add { name, scope } => {
            let path = dir.join(CLIENTS_FILE);
            let mut clients = read_clients(&path)?;
            check_name(&name)?;
            let token = random_token();
            let scope = if scope == TokenScope::Admin { Scope::Admin } else { Scope::Client };
            clients.add(NamedClient { name: name.as_str().into(), scope }, token_hash(&token))?;
            write_secret(&path, clients.render().as_bytes())?;
            // The token alone on the first line (`| head -1` in a script), the advice after it.
            say(out, token);
            say(
                out,
                format!(
                    "{}: client `{name}` added; its token (above) is shown only now. Copy the file to every node's \
                     clients_file: each takes it within a second, no restart.",
                    path.display()
                ),
            );
        }
        TokenAction::Revoke(name) => {
            let path = dir.join(CLIENTS_FILE);
            let mut clients = read_clients(&path)?;
            if !clients.revoke(&name) {
                return Err(format!("{} has no client `{name}`", path.display()));
            }
            write_secret(&path, clients.render().as_bytes())?;
            say(
                out,
                format!(
                    "{}: client `{name}` revoked. Copy the file to every node's clients_file: each refuses the token \
                     within a second, no restart.",
                    path.display()
                ),
            );
        }
        TokenAction::List => {
            let clients = read_clients(&dir.join(CLIENTS_FILE))?;
            for c in clients.list() {
                say(out, format!("{} {}", c.name, if c.scope == Scope::Admin { "admin" } else { "client" }));
            }
        }
        TokenAction::Retire(scope) => {
            let path = dir.join(scope.file());
            let old = read_secret(&path, scope.file())?;
            let first = old.lines().next().unwrap_or_default().trim().to_string();
            let dropped = old.lines().filter(|l| !l.trim().is_empty()).count().saturating_sub(1);
            write_secret(&path, format!("{first}\n").as_bytes())?;
            say(
                out,
                format!(
                    "{}: kept the first token, dropped {dropped}. Copy the file to every node and restart them one at a time.",
                    path.display()
                ),
            );
        }
    }
    Ok(())
}

/// `bulkhead certs init DIR`: a new cluster CA, `DIR/ca.pem` and `DIR/ca.key` (0600). Refused if
/// either exists: a second CA would split the cluster in two.
pub fn certs_init(dir: &Path, out: &mut dyn Write) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() || key.exists() {
        return Err(format!(
            "{} or {} exists: a cluster has one CA; issue node certificates from it with `bulkhead certs issue`",
            cert.display(),
            key.display()
        ));
    }
    let (c, k) = bulkhead_cluster::tls::new_ca()?;
    write_secret(&key, k.as_bytes())?;
    std::fs::write(&cert, c).map_err(|e| format!("cannot write {}: {e}", cert.display()))?;
    let _ = writeln!(
        out,
        "wrote {} (give it to every node) and {} (mode 0600: keep it off the nodes, it signs new members)",
        cert.display(),
        key.display()
    );
    Ok(())
}

/// `bulkhead certs issue DIR NODE`: `DIR/NODE.pem` and `DIR/NODE.key` (0600), signed by the CA in
/// DIR. Re-issuing replaces both (a rotation: the node uses them from its next start).
pub fn certs_issue(dir: &Path, node: &str, out: &mut dyn Write) -> Result<(), String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let ca_key = dir.join("ca.key");
    bulkhead_cluster::secret::check_private(&ca_key, "the CA key")?;
    let (c, k) = bulkhead_cluster::tls::issue(&read(&dir.join("ca.pem"))?, &read(&ca_key)?, node)?;
    let (cert, key) = (dir.join(format!("{node}.pem")), dir.join(format!("{node}.key")));
    write_secret(&key, k.as_bytes())?;
    std::fs::write(&cert, c).map_err(|e| format!("cannot write {}: {e}", cert.display()))?;
    let _ = writeln!(
        out,
        "wrote {} and {} (mode 0600) for node `{node}`: install them with ca.pem on that node only \
         (tls_cert_file, tls_key_file, tls_ca_file)",
        cert.display(),
        key.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_ca_is_made_once_and_issues_certificates_a_node_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        certs_init(dir.path(), &mut out).unwrap();
        assert!(certs_init(dir.path(), &mut out).unwrap_err().contains("one CA"));
        certs_issue(dir.path(), "n2", &mut out).unwrap();
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        assert!(
            bulkhead_cluster::tls::TlsLinks::from_pem(&read("ca.pem"), &read("n2.pem"), &read("n2.key"), "n2").is_ok()
        );
        assert!(read_secret(&dir.path().join("n2.key"), "key").is_ok(), "the key is private");
        assert!(certs_issue(dir.path(), "not_a_dns_name", &mut out).is_err());
    }

    use super::*;

    #[test]
    fn tokens_are_made_once_rotated_with_an_overlap_and_retired() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        tokens(dir.path(), TokenAction::Init, &mut out).unwrap();
        let first = read_secret(&dir.path().join("client.token"), "t").unwrap();
        let admin = read_secret(&dir.path().join("admin.token"), "t").unwrap();
        tokens(dir.path(), TokenAction::Init, &mut out).unwrap();
        assert_eq!(read_secret(&dir.path().join("client.token"), "t").unwrap(), first, "init keeps what exists");

        tokens(dir.path(), TokenAction::Rotate(TokenScope::Client), &mut out).unwrap();
        let both = read_secret(&dir.path().join("client.token"), "t").unwrap();
        let lines: Vec<&str> = both.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], first);
        // What a node reads from the pair: both are client tokens.
        let t = bulkhead_http::ApiTokens::new(both.clone(), admin.clone()).unwrap();
        assert_eq!(t.client.len(), 2);

        tokens(dir.path(), TokenAction::Retire(TokenScope::Client), &mut out).unwrap();
        assert_eq!(read_secret(&dir.path().join("client.token"), "t").unwrap(), lines[0]);
        assert_eq!(read_secret(&dir.path().join("admin.token"), "t").unwrap(), admin, "the other scope is untouched");
    }
}
