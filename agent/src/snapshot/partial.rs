//! A pull's chunks kept on disk until the pull is done, so a pull cut
//! short (by the link, the bucket or the agent's own stop) fetches again
//! only what it lacked.
//!
//! Each chunk is kept as the bucket served it — sealed, under its keyed
//! name — in `STATE/pulls/MANIFEST/` (the signed manifest's digest),
//! written only once it opened against the manifest. Nothing kept is
//! trusted: a later pull opens every kept chunk again as it would a fetched
//! one, and one that does not open is removed and fetched. A pull that ends
//! well removes its directory; one left by a pull never retried is removed
//! after [`KEEP`], by the next pull. Chunks are kept only while the
//! filesystem has twice the snapshot's stored bytes free (those kept
//! already counted as free): the agent's journal and audit log share it.
//! The filesystem calls block: call these from blocking threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use convoy_protocol::digest::Digest;
use convoy_protocol::snapshot::ChunkName;

/// How long the chunks of a pull that was never retried are kept.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

/// The kept chunks of one snapshot's pull.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    /// The largest sealed chunk read back.
    max: u64,
    /// Numbers each write's temporary file.
    writes: AtomicU64,
}

impl Partial {
    /// The kept chunks of the pull of the manifest with digest `manifest`
    /// (`stored` sealed bytes, chunks of at most `max`) under `root` (made
    /// if missing, its time refreshed), after removing those of pulls
    /// older than [`KEEP`]. `None` (logged) when the directory cannot be
    /// made or the filesystem has too little room: the pull then goes on
    /// without keeping anything.
    pub fn open(root: &Path, manifest: &Digest, stored: u64, max: u64) -> Option<Self> {
        sweep(root, KEEP);
        let dir = root.join(manifest.to_hex());
        let room = crate::private::create_dir_all(&dir)
            .and_then(|()| touch(&dir))
            .and_then(|()| crate::private::free_bytes(&dir))
            .map(|free| free.saturating_add(kept_bytes(&dir)));
        let room = match room {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "a pull's chunks cannot be kept: a pull cut short will fetch them again");
                return None;
            }
        };
        if room / 2 < stored {
            tracing::info!(dir = %dir.display(), stored, room, "too little room to keep a pull's chunks: a pull cut short will fetch them again");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(Self {
            dir,
            max,
            writes: AtomicU64::new(0),
        })
    }

    /// Chunk `name` as kept, if it is (and is no longer than a chunk may
    /// be).
    pub fn get(&self, name: &ChunkName) -> Option<Vec<u8>> {
        let path = self.dir.join(name.to_hex());
        let len = std::fs::metadata(&path).ok()?.len();
        if len > self.max {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        std::fs::read(path).ok()
    }

    /// Keeps chunk `name` (opened already). A chunk that cannot be kept
    /// is only logged: the pull goes on.
    pub fn put(&self, name: &ChunkName, sealed: &[u8]) {
        let path = self.dir.join(name.to_hex());
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("{}.{n}.part", name.to_hex()));
        let r = crate::private::create_new(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, sealed))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(chunk = %name, error = %e, "a pulled chunk not kept");
        }
    }

    /// Forgets chunk `name` (it did not open).
    pub fn remove(&self, name: &ChunkName) {
        let _ = std::fs::remove_file(self.dir.join(name.to_hex()));
    }

    /// The pull is done: its chunks are not needed again.
    pub fn finish(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "a done pull's kept chunks not removed");
        }
    }
}

/// Removes the kept chunks of every pull under `root` untouched for longer
/// than `keep`.
pub fn sweep(root: &Path, keep: Duration) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > keep);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Marks `dir` as in use now (the sweep goes by its time).
fn touch(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.set_modified(std::time::SystemTime::now())
}

/// The bytes of the chunks kept in `dir` already.
fn kept_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}
