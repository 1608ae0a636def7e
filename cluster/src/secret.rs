//! Secrets kept in files: the cluster cookie, the API tokens, a node's TLS key.
//!
//! Reading: a secret file is opened without following a symlink, and refused, with a message that
//! says so and how to fix it, unless it is a regular file owned by this process's user that its
//! group and others cannot read: a secret readable by every account on the host is not a secret,
//! and one an other account owns (or points us at through a link) could be swapped under us.
//! The checks are made on the opened file itself, so nothing can change between check and read.
//!
//! Writing ([`write_secret`]): the contents go to a new file beside the target, created with
//! `O_EXCL | O_NOFOLLOW` and mode 0600 from the start (never chmod-ed after), flushed, then renamed
//! over the target, and the directory flushed. A replaced file's owner is kept. A crash at any point leaves the old file or the new
//! one, whole, never an empty or half-written one, and a symlink planted at the temporary name is
//! refused rather than written through.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Opens `path` for reading without following a final symlink, and without blocking on a FIFO
/// planted there (the type check that follows refuses it).
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    opts.open(path)
}

/// Judges an opened secret file: a regular file, owned by this process's user, private.
fn check_opened(file: &File, path: &Path, what: &str) -> Result<(), String> {
    let meta = file.metadata().map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{what} {} is not a regular file", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(format!(
                "{what} {} is owned by uid {}, not by this node's user (uid {me}): another account could replace it; `chown` it to the node's user",
                path.display(),
                meta.uid()
            ));
        }
        let mode = meta.mode() & 0o777;
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

/// Refuses `path` unless it is a private regular file of this process's user (not a symlink).
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    let f = open_nofollow(path).map_err(|e| open_error(path, what, &e))?;
    check_opened(&f, path, what)
}

fn open_error(path: &Path, what: &str, e: &std::io::Error) -> String {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::ELOOP) {
        return format!("{what} {} is a symlink: refused (point the config at the file itself)", path.display());
    }
    format!("cannot read {what} {}: {e}", path.display())
}

/// Reads a secret file (surrounding whitespace trimmed), refused if empty or not private.
pub fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    let mut f = open_nofollow(path).map_err(|e| open_error(path, what, &e))?;
    check_opened(&f, path, what)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(text)
}

/// Writes a secret file readable by its owner only: a new file (mode 0600, `O_EXCL | O_NOFOLLOW`)
/// beside `path`, flushed, renamed over `path`, the directory flushed. An existing file is
/// replaced whole, atomically.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| format!("cannot write {}: not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.{:016x}.tmp", name.to_string_lossy(), rand::random::<u64>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    let mut f = opts.open(&tmp).map_err(fail)?;
    // A file being replaced keeps its owner (an operator running `bulkhead tokens` as root must
    // not hand the node a file it then refuses as another account's).
    #[cfg(unix)]
    if let Some(old) = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file()) {
        use std::os::unix::fs::MetadataExt;
        if let Err(e) = std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid())) {
            tracing::debug!(path = %path.display(), error = %e, "could not keep the replaced file's owner");
        }
    }
    let written = f.write_all(contents).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    // The rename is durable once the directory is.
    File::open(&dir).and_then(|d| d.sync_all()).map_err(fail)
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

    /// A rewrite replaces the file whole through a rename: no temporary file is left behind, and
    /// at every moment the path holds the old contents or the new ones.
    #[test]
    fn a_rewrite_is_atomic_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.token");
        write_secret(&path, b"first\n").unwrap();
        let inode = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().ino()
        };
        let before = inode(&path);
        write_secret(&path, b"second\n").unwrap();
        assert_eq!(read_secret(&path, "t").unwrap(), "second");
        assert_ne!(inode(&path), before, "a new file was renamed over the old one, not truncated in place");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    /// A symlink is refused when read (it could point anywhere), and a symlink in place of the
    /// target is replaced by the file, never written through.
    #[cfg(unix)]
    #[test]
    fn symlinks_are_neither_read_nor_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        write_secret(&real, b"secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = read_secret(&link, "admin_token_file").unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        assert!(check_private(&link, "x").unwrap_err().contains("symlink"));
        write_secret(&link, b"other").unwrap();
        assert_eq!(read_secret(&real, "t").unwrap(), "secret", "the link's target is untouched");
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    }

    /// A FIFO in place of a secret is refused at once, not waited on.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cookie");
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path in a fresh temp dir.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_secret(&path, "cookie_file").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }

    /// A secret owned by another account is refused (it could be replaced by that account). Only
    /// root can hand a file to another user, so the check runs where the tests run as root (CI).
    #[cfg(unix)]
    #[test]
    fn a_secret_owned_by_another_account_is_refused() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cookie");
        write_secret(&path, b"secret").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let e = read_secret(&path, "cookie_file").unwrap_err();
        assert!(e.contains("owned by uid 65534") && e.contains("chown"), "{e}");
        // Rewriting a file keeps its owner: root rotating a token hands the node a file it reads.
        write_secret(&path, b"rotated").unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 65534);
    }
}
