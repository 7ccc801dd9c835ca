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
//!
//! Storage post-copy (destination): [`SimDisk::begin_demand`] marks the
//! blocks still owed at the switch missing. A guest write to a missing
//! block asks for it (once) on the post-copy fault queue and waits until
//! [`SimDisk::install`] wrote it: a sector write is a read-modify-write of
//! its block, so the rest of the block must be the source's first. A
//! block already present is never overwritten by a late copy.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use convoy_protocol::ctl::SimDiskSpec;
use convoy_protocol::disk::DiskGeometry;
use convoy_protocol::page::{PageBitmap, PageIndex};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::backend::base::{copy_sparse, BaseIndex};
use crate::backend::{BackendError, DiskFileError, SpecError};

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
    /// Blocks the workload writes per second, as made (the VM's control
    /// words hold the rate in force, see `control`).
    made_rate: u64,
    /// Storage post-copy: the blocks still to come.
    demand: Mutex<Option<Arc<Demand>>>,
}

/// Storage post-copy: blocks of a disk still to come from the source.
#[derive(Debug)]
pub(crate) struct Demand {
    state: Mutex<DemandState>,
    arrived: Condvar,
    faults: tokio::sync::mpsc::UnboundedSender<PageIndex>,
    stopped: AtomicBool,
}

#[derive(Debug, Default)]
struct DemandState {
    /// One bit a block.
    missing: Vec<u64>,
    /// Blocks a guest write asked for, and since when.
    asked: HashMap<u64, Instant>,
    /// Ask-to-installed times, microseconds.
    samples: Vec<u64>,
}

impl DemandState {
    fn is_missing(&self, b: u64) -> bool {
        self.missing
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn clear(&mut self, b: u64) {
        if let Some(w) = self.missing.get_mut((b / 64) as usize) {
            *w &= !(1 << (b % 64));
        }
    }
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk")
            .field("name", &self.geometry.name)
            .field("bytes", &self.geometry.bytes)
            .finish()
    }
}

fn io_err(path: &Path, action: &'static str, e: io::Error) -> BackendError {
    DiskFileError::io(action, path, e).into()
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
            return Err(SpecError::UsedShare {
                disk: spec.name.clone(),
                pct: spec.used_pct,
            }
            .into());
        }
        let geometry = DiskGeometry {
            name: spec.name.clone(),
            bytes: spec.bytes,
            base: base.map(|b| b.reference.clone()),
        };
        let mut disk = SimDisk::open_new(dir, geometry, first, block)?;
        disk.made_rate = spec.writes_per_sec;
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
                buf[block / 2..].fill(b.to_le_bytes()[0]);
                disk.file
                    .write_all_at(&buf, b * block as u64)
                    .map_err(|e| io_err(&disk.path, "cannot write", e))?;
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
        let path = crate::private::join_one(dir, &format!("{}.img", geometry.name))
            .map_err(|e| io_err(dir, "cannot name a disk in", e))?;
        let file =
            crate::private::create_new(&path).map_err(|e| io_err(&path, "cannot create", e))?;
        file.set_len(geometry.bytes)
            .map_err(|e| io_err(&path, "cannot size", e))?;
        Ok(SimDisk::of_file(geometry, path, file, first, block))
    }

    fn of_file(
        geometry: DiskGeometry,
        path: PathBuf,
        file: File,
        first: u64,
        block: usize,
    ) -> SimDisk {
        SimDisk {
            geometry,
            path,
            file,
            first,
            block,
            made_rate: 0,
            demand: Mutex::new(None),
        }
    }

    /// The disk of a running VM found again (by its vCPU helper, or by an
    /// agent re-attaching it): `path` must be a regular file of
    /// `geometry`'s size.
    pub(crate) fn open_existing(
        path: &Path,
        geometry: DiskGeometry,
        first: u64,
        block: usize,
    ) -> Result<SimDisk, BackendError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "cannot open", e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err(path, "cannot stat", e))?;
        if !meta.is_file() || meta.len() != geometry.bytes {
            return Err(io_err(
                path,
                "cannot use",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a disk file of the recorded size",
                ),
            ));
        }
        Ok(SimDisk::of_file(
            geometry,
            path.to_owned(),
            file,
            first,
            block,
        ))
    }

    /// Copies base `b` (this disk's size) into the disk, holes kept.
    pub(crate) fn fill_from(&self, b: &BaseIndex) -> Result<(), BackendError> {
        if b.bytes != self.geometry.bytes {
            return Err(SpecError::BaseSize {
                disk: self.geometry.name.clone(),
                base: b.reference.name.clone(),
                base_bytes: b.bytes,
                disk_bytes: self.geometry.bytes,
            }
            .into());
        }
        let from = b.open()?;
        copy_sparse(&from, &self.file, b.bytes).map_err(|e| io_err(&b.path, "cannot copy", e))?;
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

    /// Its first leaf.
    pub(crate) fn first_leaf(&self) -> u64 {
        self.first
    }

    /// Blocks written per second by the workload, as made.
    pub(crate) fn made_rate(&self) -> u64 {
        self.made_rate
    }

    /// Its file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads block `b` into `buf` (one block long); a short file is an
    /// error, never zeros.
    pub(crate) fn read(&self, b: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file
            .read_exact_at(buf, b * self.block as u64)
            .map_err(|e| io_err(&self.path, "cannot read", e))
    }

    /// Writes block `b`: `None` makes it zeros, as a hole.
    pub(crate) fn write(&self, b: u64, data: Option<&[u8]>) -> Result<(), BackendError> {
        let off = b * self.block as u64;
        match data {
            Some(d) => self
                .file
                .write_all_at(d, off)
                .map_err(|e| io_err(&self.path, "cannot write", e)),
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
                        .map_err(|e| io_err(&self.path, "cannot write", e)),
                }
            }
        }
    }

    fn demand(&self) -> Option<Arc<Demand>> {
        self.demand.lock().ok().and_then(|d| d.clone())
    }

    /// Storage post-copy: the blocks of this disk among `owed` (leaves)
    /// are missing from now; a guest write to one asks for its leaf on
    /// `faults` and waits for [`SimDisk::install`].
    pub(crate) fn begin_demand(
        &self,
        owed: &PageBitmap,
        faults: tokio::sync::mpsc::UnboundedSender<PageIndex>,
    ) {
        let mut missing =
            vec![0u64; convoy_protocol::page::saturating_usize(self.blocks().div_ceil(64))];
        for b in 0..self.blocks() {
            if owed.contains(PageIndex(self.first + b)) {
                missing[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        let demand = Demand {
            state: Mutex::new(DemandState {
                missing,
                ..DemandState::default()
            }),
            arrived: Condvar::new(),
            faults,
            stopped: AtomicBool::new(false),
        };
        if let Ok(mut d) = self.demand.lock() {
            *d = Some(Arc::new(demand));
        }
    }

    /// Storage post-copy: writes block `b` (`None`: zeros) if it is still
    /// missing and wakes the guest write waiting for it. Returns whether
    /// it was written; a block already present is left alone.
    pub(crate) fn install(&self, b: u64, data: Option<&[u8]>) -> Result<bool, BackendError> {
        let Some(d) = self.demand() else {
            return Err(BackendError::State("disk blocks are not paged on demand"));
        };
        let mut st = d
            .state
            .lock()
            .map_err(|_| BackendError::State("demand state poisoned"))?;
        if !st.is_missing(b) {
            return Ok(false);
        }
        // Under the lock: the guest waits on this block meanwhile.
        self.write(b, data)?;
        st.clear(b);
        if let Some(t) = st.asked.remove(&b) {
            let us = convoy_protocol::units::micros(t.elapsed());
            st.samples.push(us);
        }
        d.arrived.notify_all();
        Ok(true)
    }

    /// Storage post-copy ends (every block in, or the VM stops): a guest
    /// write no longer waits. Returns the fault times seen, microseconds.
    pub(crate) fn end_demand(&self) -> Vec<u64> {
        let Some(d) = self.demand.lock().ok().and_then(|mut d| d.take()) else {
            return Vec::new();
        };
        d.stopped.store(true, Ordering::Release);
        d.arrived.notify_all();
        d.state
            .lock()
            .map(|s| s.samples.clone())
            .unwrap_or_default()
    }

    /// Storage post-copy fault times so far, microseconds.
    pub(crate) fn demand_samples(&self) -> Vec<u64> {
        self.demand()
            .and_then(|d| d.state.lock().ok().map(|s| s.samples.clone()))
            .unwrap_or_default()
    }

    /// Storage post-copy: waits until block `b` is present (asking for it
    /// once), or demand paging ends.
    fn wait_present(&self, b: u64) {
        let Some(d) = self.demand() else {
            return;
        };
        let Ok(mut st) = d.state.lock() else {
            return;
        };
        if !st.is_missing(b) {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = st.asked.entry(b) {
            e.insert(Instant::now());
            let _ = d.faults.send(PageIndex(self.first + b));
        }
        while st.is_missing(b) && !d.stopped.load(Ordering::Acquire) {
            st = match d.arrived.wait_timeout(st, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }

    /// One guest write: a sector of block `b`. True if written (the
    /// caller marks it in the VM's written-blocks bitmap).
    pub(crate) fn guest_write(&self, b: u64, rng: &mut SmallRng) -> bool {
        // Storage post-copy: the rest of the block must be there first.
        self.wait_present(b);
        let mut sector = [0u8; SECTOR];
        rng.fill_bytes(&mut sector);
        let at = (rng.next_u32() as usize % (self.block / SECTOR)) * SECTOR;
        if let Err(e) = self
            .file
            .write_all_at(&sector, b * self.block as u64 + at as u64)
        {
            // Not marked: the block keeps its old, consistent contents.
            tracing::warn!(disk = %self.geometry.name, "guest write failed: {e}");
            return false;
        }
        true
    }

    /// Flushes the file to stable storage.
    pub(crate) fn sync(&self) -> Result<(), BackendError> {
        self.file
            .sync_all()
            .map_err(|e| io_err(&self.path, "cannot sync", e))
    }

    /// Writes its data (not necessarily its metadata) to stable storage.
    pub(crate) fn flush(&self) -> Result<(), BackendError> {
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "cannot flush", e))
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
        assert!(d.guest_write(5, &mut rng));
        assert!(d.guest_write(700, &mut rng));
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
    fn a_guest_write_to_a_block_still_owed_asks_for_it_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let d =
            Arc::new(SimDisk::create(dir.path(), &spec(1 << 20, 0), 10, 4096, 1, None).unwrap());
        let (tx, mut faults) = tokio::sync::mpsc::unbounded_channel();
        let mut owed = PageBitmap::empty(10 + d.blocks());
        owed.insert(PageIndex(13));
        d.begin_demand(&owed, tx);
        // A block not owed is written at once.
        let mut rng = SmallRng::seed_from_u64(3);
        d.guest_write(2, &mut rng);
        assert!(faults.try_recv().is_err());
        // An owed one: asked for (its leaf), and the write waits.
        let (d2, done) = (d.clone(), Arc::new(AtomicBool::new(false)));
        let done2 = done.clone();
        let writer = std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(4);
            d2.guest_write(3, &mut rng);
            done2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(faults.try_recv().unwrap(), PageIndex(13));
        assert!(
            !done.load(Ordering::SeqCst),
            "the write waits for the block"
        );
        let block = vec![0xAB; 4096];
        assert!(d.install(3, Some(&block)).unwrap());
        writer.join().unwrap();
        // The guest's sector landed on the source's block, not on zeros.
        let mut buf = vec![0u8; 4096];
        d.read(3, &mut buf).unwrap();
        let kept = buf.iter().filter(|b| **b == 0xAB).count();
        assert!((4096 - 512..4096).contains(&kept), "{kept}");
        // A late copy never overwrites what the guest wrote since.
        assert!(!d.install(3, Some(&[0u8; 4096])).unwrap());
        let mut again = vec![0u8; 4096];
        d.read(3, &mut again).unwrap();
        assert_eq!(again, buf);
        assert_eq!(d.demand_samples().len(), 1, "one fault, timed");
        // Ending demand frees a write still waiting.
        let mut owed = PageBitmap::empty(10 + d.blocks());
        owed.insert(PageIndex(15));
        d.begin_demand(&owed, tokio::sync::mpsc::unbounded_channel().0);
        let d3 = d.clone();
        let writer = std::thread::spawn(move || {
            let mut rng = SmallRng::seed_from_u64(5);
            d3.guest_write(5, &mut rng);
        });
        std::thread::sleep(Duration::from_millis(100));
        d.end_demand();
        writer.join().unwrap();
        assert!(d.install(5, None).is_err(), "no longer paged on demand");
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
