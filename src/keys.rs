//! `bulkhead tokens` and `bulkhead certs`: making and rotating the files a node's secrets live in.
//!
//! Every secret is written mode 0600 from its creation ([`write_secret`]) and never overwritten by
//! accident: making a file that exists is refused or skipped, with a message that says which.

use std::io::Write;
use std::path::Path;

use bulkhead_cluster::secret::{random_token, read_secret, write_secret};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAction {
    /// Make both files where missing; keep any that exist.
    Init,
    /// Put a new token first in the file and keep the newest old one after it: nodes restarted
    /// with the file accept both, so clients can move over at their own pace.
    Rotate(TokenScope),
    /// Keep only the first (newest) token: the old one stops working at each node's next start.
    Retire(TokenScope),
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

#[cfg(test)]
mod tests {
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
        let t = bulkhead_cluster::ApiTokens::new(both.clone(), admin.clone()).unwrap();
        assert_eq!(t.client.len(), 2);

        tokens(dir.path(), TokenAction::Retire(TokenScope::Client), &mut out).unwrap();
        assert_eq!(read_secret(&dir.path().join("client.token"), "t").unwrap(), lines[0]);
        assert_eq!(read_secret(&dir.path().join("admin.token"), "t").unwrap(), admin, "the other scope is untouched");
    }
}
