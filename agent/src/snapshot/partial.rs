//! A pull's chunks kept on disk until the pull is done, so a pull cut
//! short (by the link, the bucket or the agent's own stop) fetches again
//! only what it lacked.
//!
//! Each chunk is kept as the bucket served it — sealed, under its keyed
//! name — in `STATE/pulls/SNAPSHOT/`, written only once it opened against
//! the manifest. Nothing kept is trusted: a later pull opens every kept
//! chunk again as it would a fetched one, and one that does not open is
//! removed and fetched. A pull that ends well removes its directory; one
//! left by a pull never retried is removed after [`KEEP`], by the next
//! pull. Chunks are kept only while the filesystem has twice the
//! snapshot's stored bytes free.

use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_protocol::snapshot::{ChunkName, SnapshotManifest};

/// How long the chunks of a pull that was never retried are kept.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);

/// The kept chunks of one snapshot's pull.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
}

impl Partial {
    /// The kept chunks of `m`'s pull under `root` (made if missing), after
    /// removing those of pulls older than [`KEEP`]. `None` (logged) when
    /// the directory cannot be made or the filesystem has too little room:
    /// the pull then goes on without keeping anything.
    pub fn open(root: &Path, m: &SnapshotManifest) -> Option<Self> {
        sweep(root, KEEP);
        let dir = root.join(m.snapshot.to_string());
        let (_, stored) = m.stored();
        let room = match crate::private::create_dir_all(&dir).and_then(|()| free_bytes(&dir)) {
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
        Some(Self { dir })
    }

    /// Chunk `name` as kept, if it is.
    pub fn get(&self, name: &ChunkName) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(name.to_hex())).ok()
    }

    /// Keeps chunk `name` (opened already). A chunk that cannot be kept
    /// is only logged: the pull goes on.
    pub fn put(&self, name: &ChunkName, sealed: &[u8]) {
        let path = self.dir.join(name.to_hex());
        let tmp = self.dir.join(format!("{}.part", name.to_hex()));
        let r = crate::private::create_new(&tmp)
            .or_else(|_| {
                // A `.part` left by a stop mid-write.
                std::fs::remove_file(&tmp)?;
                crate::private::create_new(&tmp)
            })
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

    /// Where they are.
    pub fn dir(&self) -> &Path {
        &self.dir
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

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}
