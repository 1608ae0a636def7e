//! Secrets kept in files: the cluster cookie, the API tokens, a node's TLS key.
//!
//! A secret file that its group or anyone else may read is refused with a message that says so
//! and how to fix it: a secret readable by every account on the host is not a secret. New secret
//! files are created with mode 0600 from the start ([`write_secret`]), never chmod-ed after.

use std::io::Write;
use std::path::Path;

/// Refuses `path` if its group or others have any permission on it.
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{what} {} has mode {mode:04o}: its group or others may read it; `chmod 600 {}` (and keep it owned by the node's user)",
                path.display(),
                path.display()
            ));
        }
    }
    Ok(())
}

/// Reads a secret file (surrounding whitespace trimmed), refused if empty or not private.
pub fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    check_private(path, what)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(text)
}

/// Writes a new secret file readable by its owner only (mode 0600 from creation). An existing
/// file is replaced.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // An existing file keeps its mode on open: make sure it is private too.
    make_private(path)?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Makes an existing file readable by its owner only (mode 0600).
pub fn make_private(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A fresh random secret: 256 bits as 64 hex digits.
pub fn random_token() -> String {
    format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_others_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        write_secret(&path, b" abc\n").unwrap();
        assert_eq!(read_secret(&path, "token").unwrap(), "abc");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = read_secret(&path, "client_token_file").unwrap_err();
            assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
            // Rewriting makes it private again.
            write_secret(&path, b"abc").unwrap();
            assert!(read_secret(&path, "token").is_ok());
        }
        write_secret(&path, b"  \n").unwrap();
        assert!(read_secret(&path, "token").unwrap_err().contains("empty"));
        assert!(read_secret(&dir.path().join("missing"), "token").unwrap_err().contains("cannot read token"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }
}
