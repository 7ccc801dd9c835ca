//! A torn last append (a crash in the middle of a write, see
//! [`convoy_protocol::audit`]): cut off the log at start, kept next to it.
//!
//! Each step is durable before the next, so that a crash anywhere is
//! finished by the next start and loses neither the bytes nor the record
//! of the cut:
//!
//! 1. [`cut`] copies the torn bytes to `audit.log.torn-OFFSET-DIGEST`
//!    (`0600`; OFFSET where they began, DIGEST the first 16 hex digits of
//!    their BLAKE3), whole or not at all;
//! 2. then truncates the log to OFFSET, fsyncing it and its directory;
//! 3. then [`super::AuditLog::open`] appends a signed `TornTailCut` record
//!    for every copy kept next to the log ([`kept`]) that no record of the
//!    log names yet.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use convoy_protocol::audit::torn_digest;
use convoy_protocol::digest::Digest;
use convoy_protocol::frame::{LEN_PREFIX, MAX_FRAME_LEN};

/// No torn tail is longer than a record and a head, each at most a frame.
const MAX_TORN: u64 = 2 * (LEN_PREFIX + MAX_FRAME_LEN) as u64;

/// A torn tail kept next to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Kept {
    /// Where it began in the log.
    pub(super) offset: u64,
    /// Its length.
    pub(super) bytes: u64,
    /// Its BLAKE3.
    pub(super) digest: Digest,
    /// The copy.
    pub(super) path: PathBuf,
}

/// Keeps `tail`, the bytes of `log` from `offset` on, next to it; then cuts
/// the log back to `offset`. Returns the copy's path.
pub(super) fn cut(log: &Path, offset: usize, tail: &[u8]) -> io::Result<PathBuf> {
    let digest = torn_digest(tail);
    let copy = copy_path(log, offset as u64, &digest);
    match std::fs::read(&copy) {
        // An earlier start kept it, then stopped before cutting.
        Ok(there) if there == tail => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists with other bytes", copy.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::private::create_durably(&copy, tail)?;
        }
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new().write(true).open(log)?;
    f.set_len(offset as u64)?;
    f.sync_all()?;
    crate::private::sync_dir_of(log)?;
    Ok(copy)
}

/// `audit.log.torn-OFFSET-DIGEST` next to `audit.log`.
fn copy_path(log: &Path, offset: u64, digest: &Digest) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_owned();
    name.push(format!(".torn-{offset}-{}", &digest.to_hex()[..16]));
    log.with_file_name(name)
}

/// The torn tails kept next to `log`, by offset. A file whose bytes do not
/// match the digest in its name is left alone (and named in the log).
pub(super) fn kept(log: &Path) -> io::Result<Vec<Kept>> {
    let dir = log
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut prefix = log.file_name().unwrap_or_default().to_owned();
    prefix.push(".torn-");
    let prefix = prefix.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some((offset, hex)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        let (Ok(offset), true) = (
            offset.parse::<u64>(),
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        ) else {
            continue;
        };
        let path = entry.path();
        if std::fs::metadata(&path)?.len() > MAX_TORN {
            tracing::warn!(path = %path.display(), "larger than any torn tail; left alone");
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let digest = torn_digest(&bytes);
        if !digest.to_hex().starts_with(hex) {
            tracing::warn!(path = %path.display(), "its bytes do not match its name; left alone");
            continue;
        }
        out.push(Kept {
            offset,
            bytes: bytes.len() as u64,
            digest,
            path,
        });
    }
    out.sort_by_key(|k| (k.offset, k.digest.0));
    Ok(out)
}
