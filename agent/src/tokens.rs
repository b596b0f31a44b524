//! Bearer tokens: made of 32 random bytes (the system's CSPRNG, through ring), written as 64
//! hex digits; kept only as their SHA-256 (a token has 256 bits of entropy, so a fast hash
//! is enough: there is nothing to guess from it); checked by comparing hashes in constant
//! time (`subtle`), against every known hash, so that the time taken says nothing of which
//! one matched or how much of one did.
//!
//! The admin token lives in a file of its own ([`admin_token`]): read at start, or created
//! with a new token, mode 0600, where there is none.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;

/// The SHA-256 of a token.
pub type TokenHash = [u8; 32];

/// Errors of the admin token file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the admin token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create the admin token file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The admin token file {path} is readable by others (mode {mode:o}): chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("The admin token file {path} holds no token")]
    Empty { path: PathBuf },
    #[error("The system's random generator failed")]
    Random,
}

/// A new token: 64 hex digits of 32 random bytes.
pub fn generate() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The hash a token is kept as.
pub fn hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Whether `token` hashes to `known`, compared in constant time.
pub fn matches(token_hash: &TokenHash, known: &TokenHash) -> bool {
    token_hash.ct_eq(known).into()
}

/// The hex form of a hash, as the state database keeps it.
pub fn to_hex(h: &TokenHash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hash of its hex form; `None` if it is not 64 hex digits.
pub fn from_hex(s: &str) -> Option<TokenHash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The admin token in `path`: read (its first line, trimmed), or, where the file does not
/// exist, a new one written to it with mode 0600 (whole or not at all: a temporary file,
/// synced, then linked at `path`). The file is opened without following a symlink, and one
/// that others can read, or that another user owns, is refused: the token would be theirs
/// too. Returns the token and whether it was created.
pub fn admin_token(path: &Path) -> Result<(String, bool), Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return create_admin_token(path),
        Err(source) => {
            return Err(Error::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let meta = f.metadata().map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o777;
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if mode & 0o077 != 0 || meta.uid() != me || !meta.is_file() {
        return Err(Error::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    Ok((token, false))
}

fn create_admin_token(path: &Path) -> Result<(String, bool), Error> {
    let token = generate()?;
    let create = |source| Error::Create {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()?;
        // Linked, not renamed: a token another start wrote meanwhile is not replaced.
        std::fs::hard_link(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(create)?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_token_matches_its_hash_only() {
        let t = generate().unwrap();
        assert!(matches(&hash(&t), &hash(&t)));
        assert!(!matches(&hash(&t), &hash(&format!("{t}x"))));
    }

    #[test]
    fn a_hash_reads_back_from_its_hex() {
        let h = hash("abc");
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn the_admin_token_file_is_created_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let (t, created) = admin_token(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(admin_token(&path).unwrap(), (t, false));
    }

    #[test]
    fn an_admin_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(admin_token(&path), Err(Error::Exposed { .. })));
    }

    #[test]
    fn an_admin_token_file_that_is_a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "secret\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("admin.token");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(admin_token(&path).is_err());
    }

    #[test]
    fn an_empty_admin_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(admin_token(&path), Err(Error::Empty { .. })));
    }
}
