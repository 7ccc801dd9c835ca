//! Disks of simulated VMs: sparse raw image files, one directory per VM
//! under the agent's disk directory, and a write bitmap the migration
//! source collects as its dirty-block log.
//!
//! A disk block is one memory page in size and is a *leaf* of the
//! migration after the memory's pages (see [`convoy_protocol::disk`]), so
//! the page pipeline moves it: holes and zero blocks are not sent in the
//! first round, written blocks go again in the dirty rounds, and the last
//! ones while the VM is paused. At the destination a zero block punches a
//! hole, so an image stays as sparse as it came, and the files are
//! fsynced before the VM may start there.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use convoy_protocol::ctl::SimDiskSpec;
use convoy_protocol::disk::DiskGeometry;
use convoy_protocol::page::{PageBitmap, PageIndex};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use super::base::{copy_sparse, BaseIndex};
use super::BackendError;

/// Bytes a guest write covers (one sector).
const SECTOR: usize = 512;

/// One disk of a simulated VM.
pub(crate) struct SimDisk {
    geometry: DiskGeometry,
    path: PathBuf,
    file: File,
    /// Its first leaf (the memory's page count, plus the disks before it).
    first: u64,
    block: usize,
    /// Blocks the workload writes per second.
    rate: AtomicU64,
    /// Blocks written since the log was last collected: one bit a block.
    written: Vec<AtomicU64>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk")
            .field("name", &self.geometry.name)
            .field("bytes", &self.geometry.bytes)
            .finish()
    }
}

fn io_err(path: &Path, what: &str, e: &io::Error) -> BackendError {
    BackendError::Disk(format!("{what} {}: {e}", path.display()))
}

impl SimDisk {
    /// Makes the file of a new disk (it must not exist), sparse, with
    /// `used_pct` of its blocks written from `seed`, or as a copy of
    /// `base` (the index of `spec.base`).
    pub(crate) fn create(
        dir: &Path,
        spec: &SimDiskSpec,
        first: u64,
        block: usize,
        seed: u64,
        base: Option<&BaseIndex>,
    ) -> Result<SimDisk, BackendError> {
        if spec.used_pct > 100 {
            return Err(BackendError::Spec(format!(
                "disk {}: used share {}% is over 100%",
                spec.name, spec.used_pct
            )));
        }
        let geometry = DiskGeometry {
            name: spec.name.clone(),
            bytes: spec.bytes,
            base: base.map(|b| b.reference.clone()),
        };
        let disk = SimDisk::open_new(dir, geometry, first, block)?;
        disk.rate.store(spec.writes_per_sec, Ordering::Relaxed);
        if let Some(b) = base {
            disk.fill_from(b)?;
            return Ok(disk);
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut buf = vec![0u8; block];
        for b in 0..disk.blocks() {
            if rng.next_u32() % 100 < u32::from(spec.used_pct) {
                // Half-compressible content: random, then a run of its
                // block number.
                rng.fill_bytes(&mut buf[..block / 2]);
                buf[block / 2..].fill(b as u8);
                disk.file
                    .write_all_at(&buf, b * block as u64)
                    .map_err(|e| io_err(&disk.path, "cannot write", &e))?;
            }
        }
        Ok(disk)
    }

    /// An empty (all-hole) disk to migrate into.
    pub(crate) fn incoming(
        dir: &Path,
        geometry: DiskGeometry,
        first: u64,
        block: usize,
    ) -> Result<SimDisk, BackendError> {
        SimDisk::open_new(dir, geometry, first, block)
    }

    fn open_new(
        dir: &Path,
        geometry: DiskGeometry,
        first: u64,
        block: usize,
    ) -> Result<SimDisk, BackendError> {
        let path = dir.join(format!("{}.img", geometry.name));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(&path, "cannot create", &e))?;
        file.set_len(geometry.bytes)
            .map_err(|e| io_err(&path, "cannot size", &e))?;
        let blocks = geometry.bytes / block as u64;
        Ok(SimDisk {
            written: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            geometry,
            path,
            file,
            first,
            block,
            rate: AtomicU64::new(0),
        })
    }

    /// Copies base `b` (this disk's size) into the disk, holes kept.
    pub(crate) fn fill_from(&self, b: &BaseIndex) -> Result<(), BackendError> {
        if b.bytes != self.geometry.bytes {
            return Err(BackendError::Spec(format!(
                "disk {}: base {} is {} bytes, the disk {}",
                self.geometry.name, b.reference.name, b.bytes, self.geometry.bytes
            )));
        }
        let from = b.open()?;
        copy_sparse(&from, &self.file, b.bytes).map_err(|e| io_err(&b.path, "cannot copy", &e))?;
        // Written while copied: what was copied is not what was indexed.
        b.check(&from)
    }

    /// Its name and size.
    pub(crate) fn geometry(&self) -> &DiskGeometry {
        &self.geometry
    }

    /// Its blocks.
    pub(crate) fn blocks(&self) -> u64 {
        self.geometry.bytes / self.block as u64
    }

    /// The disk block of `leaf`, if the leaf is one of this disk's.
    pub(crate) fn block_of(&self, leaf: PageIndex) -> Option<u64> {
        let b = leaf.0.checked_sub(self.first)?;
        (b < self.blocks()).then_some(b)
    }

    /// Blocks written per second by the workload.
    pub(crate) fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Sets the workload's write rate (from device state).
    pub(crate) fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Reads block `b` into `buf` (one block long); a short file is an
    /// error, never zeros.
    pub(crate) fn read(&self, b: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file
            .read_exact_at(buf, b * self.block as u64)
            .map_err(|e| io_err(&self.path, "cannot read", &e))
    }

    /// Writes block `b`: `None` makes it zeros, as a hole.
    pub(crate) fn write(&self, b: u64, data: Option<&[u8]>) -> Result<(), BackendError> {
        let off = b * self.block as u64;
        match data {
            Some(d) => self
                .file
                .write_all_at(d, off)
                .map_err(|e| io_err(&self.path, "cannot write", &e)),
            None => {
                let punched = rustix::fs::fallocate(
                    &self.file,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    off,
                    self.block as u64,
                );
                match punched {
                    Ok(()) => Ok(()),
                    // A file system without holes: write the zeros.
                    Err(_) => self
                        .file
                        .write_all_at(&vec![0u8; self.block], off)
                        .map_err(|e| io_err(&self.path, "cannot write", &e)),
                }
            }
        }
    }

    /// One guest write: a sector of block `b`, marked in the write bitmap.
    pub(crate) fn guest_write(&self, b: u64, rng: &mut SmallRng) {
        let mut sector = [0u8; SECTOR];
        rng.fill_bytes(&mut sector);
        let at = (rng.next_u32() as usize % (self.block / SECTOR)) * SECTOR;
        if let Err(e) = self
            .file
            .write_all_at(&sector, b * self.block as u64 + at as u64)
        {
            // Not marked: the block keeps its old, consistent contents.
            tracing::warn!(disk = %self.geometry.name, "guest write failed: {e}");
            return;
        }
        if let Some(w) = self.written.get((b / 64) as usize) {
            w.fetch_or(1 << (b % 64), Ordering::Release);
        }
    }

    /// Moves the blocks written since the last call into `log` (a bitmap
    /// over the whole leaf space), as leaves.
    pub(crate) fn take_written(&self, log: &mut PageBitmap) {
        for (i, w) in self.written.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Acquire);
            while bits != 0 {
                let b = i as u64 * 64 + u64::from(bits.trailing_zeros());
                log.insert(PageIndex(self.first + b));
                bits &= bits - 1;
            }
        }
    }

    /// Forgets the blocks written so far.
    pub(crate) fn clear_written(&self) {
        for w in &self.written {
            w.store(0, Ordering::Release);
        }
    }

    /// Flushes the file to stable storage.
    pub(crate) fn sync(&self) -> Result<(), BackendError> {
        self.file
            .sync_all()
            .map_err(|e| io_err(&self.path, "cannot sync", &e))
    }

    /// Writes its data (not necessarily its metadata) to stable storage.
    pub(crate) fn flush(&self) -> Result<(), BackendError> {
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "cannot flush", &e))
    }

    /// Its file.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn spec(bytes: u64, used_pct: u8) -> SimDiskSpec {
        SimDiskSpec {
            name: "root".parse().unwrap(),
            bytes,
            writes_per_sec: 0,
            used_pct,
            base: None,
        }
    }

    #[test]
    fn a_disk_is_sparse_logs_guest_writes_and_punches_zero_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let d = SimDisk::create(dir.path(), &spec(64 << 20, 0), 10, 4096, 1, None).unwrap();
        // All holes: nothing allocated.
        assert_eq!(std::fs::metadata(d.path()).unwrap().blocks(), 0);
        let mut rng = SmallRng::seed_from_u64(2);
        d.guest_write(5, &mut rng);
        d.guest_write(5, &mut rng);
        d.guest_write(700, &mut rng);
        let mut log = PageBitmap::empty(10 + d.blocks());
        d.take_written(&mut log);
        let got: Vec<u64> = log.iter().map(|p| p.0).collect();
        assert_eq!(got, vec![15, 710], "leaves after the 10 memory pages");
        let mut again = PageBitmap::empty(10 + d.blocks());
        d.take_written(&mut again);
        assert!(again.is_empty(), "taking clears");
        let mut buf = vec![0u8; 4096];
        d.read(5, &mut buf).unwrap();
        assert!(buf.iter().any(|b| *b != 0));
        d.write(5, None).unwrap();
        d.read(5, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        assert_eq!(d.block_of(PageIndex(9)), None);
        assert_eq!(d.block_of(PageIndex(10)), Some(0));
        assert_eq!(d.block_of(PageIndex(10 + d.blocks())), None);
    }

    #[test]
    fn an_existing_file_is_never_overwritten_and_bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = SimDisk::create(dir.path(), &spec(1 << 20, 50), 0, 4096, 1, None).unwrap();
        let before = std::fs::read(d.path()).unwrap();
        assert!(before.iter().any(|b| *b != 0), "half the blocks are used");
        assert!(matches!(
            SimDisk::create(dir.path(), &spec(1 << 20, 0), 0, 4096, 1, None),
            Err(BackendError::Disk(_))
        ));
        assert_eq!(std::fs::read(d.path()).unwrap(), before);
        assert!(matches!(
            SimDisk::create(dir.path(), &spec(1 << 20, 101), 0, 4096, 1, None),
            Err(BackendError::Spec(_))
        ));
    }
}
