//! Base images of sim disks: files in the agent's base image directory
//! (`--base-dir`) that a disk may be cloned from (`vm create --disk
//! NAME=SIZE,base=BASE`). A migration names a disk's base by name and root
//! ([`BaseRef`]); a destination holding the same base starts the disk as a
//! copy of it, and the blocks still equal to the base's do not travel (see
//! [`convoy_protocol::disk`]).
//!
//! Each base is indexed once — the leaf of every block and their root —
//! and the index is kept until the file changes (size or modification
//! time), so that a 4 GiB base is read once, not at every migration.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use convoy_protocol::digest::Digest;
use convoy_protocol::disk::{disk_root, file_leaves, BaseRef};
use convoy_protocol::names::DiskName;

use super::{BackendError, BaseImageError, DiskFileError};

/// A base image, indexed.
#[derive(Debug)]
pub struct BaseIndex {
    /// Its file.
    pub path: PathBuf,
    /// Its size, bytes.
    pub bytes: u64,
    /// The leaf of each block.
    pub leaves: Vec<Digest>,
    /// Its name and root, as a manifest names it.
    pub reference: BaseRef,
    /// When it was indexed: the file's size and modification time.
    stamp: (u64, Option<SystemTime>),
}

impl BaseIndex {
    /// Opens the base's file, refusing one that is no longer the file
    /// indexed (another size or modification time: replaced or written
    /// since), so that what is copied is what the leaves describe.
    pub fn open(&self) -> Result<File, BackendError> {
        let f = File::open(&self.path).map_err(|e| err(&self.path, io("cannot open", e)))?;
        self.check(&f)?;
        Ok(f)
    }

    /// Fails when `f` (opened by [`BaseIndex::open`]) changed since it was
    /// indexed: call it again after reading it, to catch a write meanwhile.
    pub fn check(&self, f: &File) -> Result<(), BackendError> {
        let meta = f
            .metadata()
            .map_err(|e| err(&self.path, io("cannot read", e)))?;
        if (meta.len(), meta.modified().ok()) != self.stamp {
            return Err(err(&self.path, BaseImageError::Changed));
        }
        Ok(())
    }
}

/// The agent's base image directory and the indexes of its files.
#[derive(Debug)]
pub struct BaseImages {
    dir: PathBuf,
    indexed: Mutex<HashMap<(DiskName, usize), Arc<BaseIndex>>>,
}

fn err(path: &Path, error: BaseImageError) -> BackendError {
    DiskFileError::Base {
        path: path.to_owned(),
        error,
    }
    .into()
}

fn io(action: &'static str, error: std::io::Error) -> BaseImageError {
    BaseImageError::Io { action, error }
}

impl BaseImages {
    /// The base images in `dir`.
    pub fn new(dir: PathBuf) -> BaseImages {
        BaseImages {
            dir,
            indexed: Mutex::new(HashMap::new()),
        }
    }

    /// The index of base `name` with `block`-byte blocks: made on first
    /// use and again when the file changed. Blocking (it may read the
    /// whole file).
    pub fn index(&self, name: &DiskName, block: usize) -> Result<Arc<BaseIndex>, BackendError> {
        // A disk name has no path separator and no dot: inside the directory.
        let path = crate::private::join_one(&self.dir, name.as_str())
            .map_err(|e| err(&self.dir, io("cannot name", e)))?;
        let meta = std::fs::metadata(&path).map_err(|e| err(&path, io("cannot read", e)))?;
        if !meta.is_file() {
            return Err(err(&path, BaseImageError::NotAFile));
        }
        let stamp = (meta.len(), meta.modified().ok());
        let key = (name.clone(), block);
        if let Some(i) = self.lock().get(&key).filter(|i| i.stamp == stamp) {
            return Ok(i.clone());
        }
        if meta.len() == 0 || meta.len() % block as u64 != 0 {
            return Err(err(
                &path,
                BaseImageError::BadSize {
                    bytes: meta.len(),
                    block,
                },
            ));
        }
        let file = File::open(&path).map_err(|e| err(&path, io("cannot open", e)))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        let leaves =
            file_leaves(reader, meta.len(), block).map_err(|e| err(&path, io("cannot read", e)))?;
        let index = Arc::new(BaseIndex {
            path,
            bytes: meta.len(),
            reference: BaseRef {
                name: name.clone(),
                root: disk_root(&leaves),
            },
            leaves,
            stamp,
        });
        self.lock().insert(key, index.clone());
        Ok(index)
    }

    /// Indexes every base in the directory (with `block`-byte blocks), so
    /// that the first migration that names one does not wait for it.
    /// Blocking; errors are left for when a base is used.
    pub fn index_all(&self, block: usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if let Some(name) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<DiskName>().ok())
            {
                let _ = self.index(&name, block);
            }
        }
    }

    /// The base `r` names, if this host holds it: same name, same root,
    /// `bytes` long. Blocking.
    pub fn find(&self, r: &BaseRef, bytes: u64, block: usize) -> Option<Arc<BaseIndex>> {
        self.index(&r.name, block)
            .ok()
            .filter(|i| i.reference.root == r.root && i.bytes == bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(DiskName, usize), Arc<BaseIndex>>> {
        // The map stays consistent across a panic (inserts are whole).
        self.indexed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Copies the first `bytes` of `from` into `to` (same offsets), leaving
/// holes where `from` has them: only its data segments are copied, in the
/// kernel (`copy_file_range`, a reflink where the file system can).
pub(crate) fn copy_sparse(from: &File, to: &File, bytes: u64) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let mut at = 0u64;
    while at < bytes {
        let data = match rustix::fs::seek(from.as_fd(), SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= bytes {
            break;
        }
        let hole = rustix::fs::seek(from.as_fd(), SeekFrom::Hole(data))?.min(bytes);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let left = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            let n = rustix::fs::copy_file_range(
                from.as_fd(),
                Some(&mut off_in),
                to.as_fd(),
                Some(&mut off_out),
                left.min(1 << 30),
            )?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "base image shorter than it was",
                ));
            }
        }
        at = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn an_index_follows_the_file_and_a_sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("debian");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        f.set_len(1 << 20).unwrap_or_else(|e| panic!("{e}"));
        f.write_all_at(&[7u8; 4096], 8 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        let bases = BaseImages::new(dir.path().to_owned());
        let name: DiskName = "debian".parse().unwrap_or_else(|e| panic!("{e}"));
        let first = bases.index(&name, 4096).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.leaves.len(), 256);
        assert_eq!(
            first.leaves[8],
            convoy_protocol::digest::leaf_digest(&[7u8; 4096])
        );
        assert!(bases.find(&first.reference, 1 << 20, 4096).is_some());
        assert!(bases.find(&first.reference, 2 << 20, 4096).is_none());
        // Another content: another root, and the old reference no longer
        // finds it.
        f.write_all_at(&[9u8; 4096], 3 * 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(bases.find(&first.reference, 1 << 20, 4096).is_none());
        let missing: DiskName = "nope".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(bases.index(&missing, 4096).is_err());

        let copy = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("copy"))
            .unwrap_or_else(|e| panic!("{e}"));
        copy.set_len(1 << 20).unwrap_or_else(|e| panic!("{e}"));
        copy_sparse(&f, &copy, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (
            std::fs::read(&path).unwrap_or_else(|e| panic!("{e}")),
            std::fs::read(dir.path().join("copy")).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(a, b);
        // Holes stay holes: two data blocks, not a megabyte.
        use std::os::unix::fs::MetadataExt;
        let used = copy.metadata().unwrap_or_else(|e| panic!("{e}")).blocks() * 512;
        assert!(used < 256 << 10, "{used} bytes allocated");
    }
}
