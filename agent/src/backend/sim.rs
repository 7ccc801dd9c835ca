//! The simulated VM: the embedded default for demos, tests and benchmarks.
//!
//! - Guest memory is an anonymous mapping ([`super::memory`]) filled at
//!   creation with realistic mixed content (zero, compressible text-like,
//!   random pages), or all random, or all zero.
//! - A workload thread (the "vCPU") ticks every millisecond: it increments
//!   a monotonic counter, stores it in the first word of page 0, and writes
//!   `dirty_pages_per_sec / 1000` 64-byte chunks, 90% of them into a hot
//!   set of pages.
//! - An atomic dirty bitmap records every page written (set after the
//!   write, with release ordering; collected with swap, acquire ordering,
//!   so a page read after its bit was collected is either current or will
//!   be sent again).
//! - Auto-converge throttles the vCPU: at `t`% it skips that share of its
//!   ticks (no counter step, no writes), as QEMU's CPU throttle sleeps a
//!   vCPU. The throttle is the source host's, not the guest's: it is not
//!   in the device state and is lifted on rollback.
//! - Post-copy (destination): [`SimVm::begin_postcopy`] registers the
//!   image with userfaultfd ([`super::uffd`]), makes the owed pages
//!   missing and starts a fault-handler thread. The vCPU then runs on
//!   demand paging: a touch of an owed page blocks it in the kernel until
//!   the page arrives ([`SimVm::install_page`]); a missing page that is not
//!   owed is a zero page never sent, filled with zeros at once. Each fault
//!   is timed from the handler reading it to the page being installed.
//!   With storage post-copy the owed set covers disk blocks too: a guest
//!   write to one waits for it (see `simdisk`), timed the same way.
//! - The device state is the counter and the workload's parameters, so the
//!   counter and the workload continue where they stopped after migration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use convoy_protocol::ctl::{ContentProfile, SimVmSpec};
use convoy_protocol::page::{MemoryGeometry, PageBitmap, PageIndex};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use super::memory::GuestMemory;
use super::simdisk::SimDisk;
use super::uffd::{Region, Uffd};
use super::{BackendError, Staging, VmBackend};

/// Device state of a simulated VM, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DeviceState {
    version: u8,
    counter: u64,
    dirty_pages_per_sec: u64,
    hot_set_pct: u8,
    seed: u64,
    /// Each disk's block writes per second, in manifest order.
    disk_writes_per_sec: Vec<u64>,
}

/// The device-state version this build writes and reads.
const DEVICE_STATE_VERSION: u8 = 2;

struct Shared {
    mem: GuestMemory,
    geometry: MemoryGeometry,
    dirty: Vec<AtomicU64>,
    counter: AtomicU64,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Held by the workload for each tick; `pause` takes it to wait out a
    /// tick in progress.
    tick: Mutex<()>,
    rate: AtomicU64,
    /// Auto-converge throttle, percent of ticks skipped.
    throttle: AtomicU64,
    hot_set_pct: AtomicU64,
    seed: AtomicU64,
    /// Demand paging after a post-copy switch.
    paging: Mutex<Option<Arc<Paging>>>,
    /// Its disks, and the directory that holds their files (removed with
    /// the VM).
    disks: Vec<SimDisk>,
    disk_dir: Option<std::path::PathBuf>,
    /// Memory pages and disk blocks.
    leaves: u64,
}

/// Demand paging of an incoming image after a post-copy switch.
struct Paging {
    /// Closed (dropped) when paging ends: that wakes any blocked toucher.
    uffd: Mutex<Option<Arc<Uffd>>>,
    region: Region,
    page: usize,
    /// Pages owed at the switch: a fault on one asks the source.
    owed: PageBitmap,
    /// Faults asked for and not yet filled: page → first seen.
    waiting: Mutex<HashMap<u64, Instant>>,
    /// Fault-to-install times, microseconds.
    samples: Mutex<Vec<u64>>,
    stop: AtomicBool,
    handler: Mutex<Option<JoinHandle<()>>>,
}

/// Demand-paging figures of a post-copy destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Faults on owed pages (asked of the source).
    pub faults: u64,
    /// Median fault-to-install time, microseconds.
    pub median_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
}

/// A simulated VM (running, paused, or an incoming staging image).
pub struct SimVm {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SimVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimVm")
            .field("bytes", &self.shared.geometry.bytes())
            .field("counter", &self.counter())
            .finish()
    }
}

impl SimVm {
    /// Creates, fills and starts a VM. Its disks, if any, are made in
    /// `disk_dir/NAME/`, which must not exist yet; a disk with a base is a
    /// copy of that base from `bases`.
    pub fn create(
        spec: &SimVmSpec,
        disk_dir: Option<&std::path::Path>,
        bases: Option<&super::base::BaseImages>,
    ) -> Result<Arc<SimVm>, BackendError> {
        if !(1..=100).contains(&spec.hot_set_pct) {
            return Err(BackendError::Spec("hot set must be 1..=100 percent".into()));
        }
        let geometry = MemoryGeometry::from_bytes(spec.memory_bytes)
            .map_err(|e| BackendError::Spec(e.to_string()))?;
        let wanted: Vec<convoy_protocol::disk::DiskGeometry> = spec
            .disks
            .iter()
            .map(|d| convoy_protocol::disk::DiskGeometry {
                name: d.name.clone(),
                bytes: d.bytes,
                base: None,
            })
            .collect();
        convoy_protocol::disk::check(geometry, &wanted)
            .map_err(|e| BackendError::Spec(e.to_string()))?;
        let block = geometry.page_size().bytes();
        // Bases first (indexing may read them whole): nothing made yet.
        let base_of: Vec<Option<Arc<super::base::BaseIndex>>> = spec
            .disks
            .iter()
            .map(|d| match (&d.base, bases) {
                (None, _) => Ok(None),
                (Some(_), None) => Err(BackendError::Spec(
                    "this agent has no base image directory (start it with --base-dir)".into(),
                )),
                (Some(b), Some(bases)) => bases.index(b, block).map(Some),
            })
            .collect::<Result<_, _>>()?;
        let (disks, dir) = if spec.disks.is_empty() {
            (Vec::new(), None)
        } else {
            let Some(root) = disk_dir else {
                return Err(BackendError::Spec(
                    "this agent has no disk directory (start it with --state-dir or --disk-dir)"
                        .into(),
                ));
            };
            let dir = make_vm_dir(root, spec.name.as_str())?;
            let ranges = convoy_protocol::disk::leaf_ranges(geometry, &wanted);
            let made: Result<Vec<SimDisk>, BackendError> = spec
                .disks
                .iter()
                .zip(ranges)
                .zip(&base_of)
                .enumerate()
                .map(|(i, ((d, r), base))| {
                    SimDisk::create(
                        &dir,
                        d,
                        r.start,
                        block,
                        spec.seed ^ i as u64,
                        base.as_deref(),
                    )
                })
                .collect();
            match made {
                Ok(d) => (d, Some(dir)),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            }
        };
        let vm = SimVm::blank(spec.memory_bytes, disks, dir)?;
        vm.fill(spec.content, spec.seed);
        vm.set_workload(spec.dirty_pages_per_sec, spec.hot_set_pct, spec.seed);
        let vm = Arc::new(vm);
        vm.spawn_workload();
        Ok(vm)
    }

    /// A zeroed, stopped image of `bytes` to migrate into.
    pub fn incoming(geometry: MemoryGeometry) -> Result<Arc<SimVm>, BackendError> {
        SimVm::incoming_with_disks(geometry, &[], None)
    }

    /// As [`SimVm::incoming`], with empty (all-hole) `disks` made in
    /// `disk_dir/NAME/` (`vm`'s directory, which must not exist yet).
    pub fn incoming_with_disks(
        geometry: MemoryGeometry,
        disks: &[convoy_protocol::disk::DiskGeometry],
        disk_dir: Option<(&std::path::Path, &str)>,
    ) -> Result<Arc<SimVm>, BackendError> {
        convoy_protocol::disk::check(geometry, disks)
            .map_err(|e| BackendError::Spec(e.to_string()))?;
        let (made, dir) = match (disks.is_empty(), disk_dir) {
            (true, _) => (Vec::new(), None),
            (false, None) => {
                return Err(BackendError::Disk(
                    "this agent has no disk directory for the VM's disks".into(),
                ))
            }
            (false, Some((root, vm))) => {
                check_room(root, disks.iter().map(|d| d.bytes).sum())?;
                let dir = make_vm_dir(root, vm)?;
                let block = geometry.page_size().bytes();
                let ranges = convoy_protocol::disk::leaf_ranges(geometry, disks);
                let made: Result<Vec<SimDisk>, BackendError> = disks
                    .iter()
                    .zip(ranges)
                    .map(|(d, r)| SimDisk::incoming(&dir, d.clone(), r.start, block))
                    .collect();
                match made {
                    Ok(m) => (m, Some(dir)),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e);
                    }
                }
            }
        };
        let vm = SimVm::blank(geometry.bytes(), made, dir)?;
        vm.shared.paused.store(true, Ordering::Relaxed);
        Ok(Arc::new(vm))
    }

    fn blank(
        bytes: u64,
        disks: Vec<SimDisk>,
        disk_dir: Option<std::path::PathBuf>,
    ) -> Result<SimVm, BackendError> {
        let geometry =
            MemoryGeometry::from_bytes(bytes).map_err(|e| BackendError::Spec(e.to_string()))?;
        let mem = usize::try_from(bytes)
            .map_err(|_| BackendError::Spec("too large".into()))
            .and_then(|len| GuestMemory::new(len).map_err(BackendError::Alloc));
        let mem = match mem {
            Ok(m) => m,
            Err(e) => {
                // Nothing is left behind by a VM that could not be made.
                if let Some(dir) = &disk_dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        let words = geometry.page_count().div_ceil(64) as usize;
        Ok(SimVm {
            shared: Arc::new(Shared {
                mem,
                geometry,
                dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
                counter: AtomicU64::new(0),
                paused: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                tick: Mutex::new(()),
                rate: AtomicU64::new(0),
                throttle: AtomicU64::new(0),
                hot_set_pct: AtomicU64::new(10),
                seed: AtomicU64::new(0),
                paging: Mutex::new(None),
                leaves: geometry.page_count() + disks.iter().map(SimDisk::blocks).sum::<u64>(),
                disks,
                disk_dir,
            }),
            worker: Mutex::new(None),
        })
    }

    fn fill(&self, content: ContentProfile, seed: u64) {
        let page = self.shared.geometry.page_size().bytes();
        let mut rng = SmallRng::seed_from_u64(seed);
        let text = text_template(&mut rng);
        let mut buf = vec![0u8; page];
        for p in 0..self.shared.geometry.page_count() {
            let kind = match content {
                ContentProfile::Zero => 0,
                ContentProfile::Random => 99,
                _ => (splitmix(seed ^ p) % 100) as u8,
            };
            match kind {
                0..=24 => continue,
                25..=64 => {
                    let off = (splitmix(p) as usize % (text.len() - page)) & !7;
                    buf.copy_from_slice(&text[off..off + page]);
                    // Make pages distinct: stamp the page number.
                    buf[..8].copy_from_slice(&p.to_le_bytes());
                }
                _ => rng.fill_bytes(&mut buf),
            }
            self.shared.mem.write(p as usize * page, &buf);
        }
    }

    /// The workload's parameters (before it is spawned).
    fn set_workload(&self, dirty_pages_per_sec: u64, hot_set_pct: u8, seed: u64) {
        let s = &self.shared;
        s.rate.store(dirty_pages_per_sec, Ordering::Relaxed);
        s.hot_set_pct
            .store(u64::from(hot_set_pct), Ordering::Relaxed);
        s.seed.store(seed, Ordering::Relaxed);
    }

    fn spawn_workload(&self) {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("sim-vcpu".into())
            .spawn(move || workload(&shared));
        match handle {
            Ok(h) => {
                if let Ok(mut w) = self.worker.lock() {
                    *w = Some(h);
                }
            }
            Err(e) => tracing::error!("cannot start the sim workload thread: {e}"),
        }
    }

    fn paging(&self) -> Option<Arc<Paging>> {
        self.shared.paging.lock().ok().and_then(|p| p.clone())
    }

    /// Post-copy: registers this image for demand paging, makes the `owed`
    /// pages missing, and starts the fault handler, which sends each owed
    /// page the VM waits for on `faults`. Call before [`Staging::start`].
    pub fn begin_postcopy(
        &self,
        owed: &PageBitmap,
        faults: tokio::sync::mpsc::UnboundedSender<PageIndex>,
    ) -> Result<(), BackendError> {
        let page = self.shared.geometry.page_size().bytes();
        let pages = self.shared.geometry.page_count();
        let paging_err = |e: super::uffd::UffdError| BackendError::Paging(e.to_string());
        let uffd = Arc::new(Uffd::new().map_err(paging_err)?);
        let region = self.shared.mem.register(&uffd, page).map_err(paging_err)?;
        // Drop the owed pages staged before the switch, run by run.
        let mut run: Option<(u64, u64)> = None;
        let drop_run = |(start, end): (u64, u64)| {
            self.shared.mem.drop_range(
                &region,
                start as usize * page,
                (end - start) as usize * page,
            )
        };
        // Memory pages first in the bitmap; disk blocks (storage
        // post-copy) after them.
        for p in owed.iter().take_while(|p| p.0 < pages) {
            run = match run {
                Some((s, e)) if e == p.0 => Some((s, e + 1)),
                Some(r) => {
                    drop_run(r).map_err(paging_err)?;
                    Some((p.0, p.0 + 1))
                }
                None => Some((p.0, p.0 + 1)),
            };
        }
        if let Some(r) = run {
            drop_run(r).map_err(paging_err)?;
        }
        if owed.len() > pages {
            for d in &self.shared.disks {
                d.begin_demand(owed, faults.clone());
            }
        }
        let paging = Arc::new(Paging {
            uffd: Mutex::new(Some(uffd.clone())),
            region,
            page,
            owed: owed.clone(),
            waiting: Mutex::new(HashMap::new()),
            samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            handler: Mutex::new(None),
        });
        let handler = {
            let paging = paging.clone();
            std::thread::Builder::new()
                .name("convoy-faults".into())
                .spawn(move || serve_faults(&paging, &uffd, &faults))
                .map_err(|e| BackendError::Paging(e.to_string()))?
        };
        if let Ok(mut h) = paging.handler.lock() {
            *h = Some(handler);
        }
        if let Ok(mut p) = self.shared.paging.lock() {
            *p = Some(paging);
        }
        Ok(())
    }

    /// Post-copy: installs `page` (`None`: zeros) if it is still missing,
    /// and wakes whoever waits for it. Returns whether it was installed; a
    /// page already present (a fault and a push crossed) is left alone.
    pub fn install_page(&self, page: PageIndex, data: Option<&[u8]>) -> Result<bool, BackendError> {
        if page.0 >= self.shared.geometry.page_count() {
            // Storage post-copy: a disk block.
            return match self.disk_block(page) {
                Some((d, b)) => d.install(b, data),
                None => Err(BackendError::Disk(format!(
                    "leaf {} is past the last disk",
                    page.0
                ))),
            };
        }
        let Some(paging) = self.paging() else {
            return Err(BackendError::State("not demand paged"));
        };
        let uffd = paging.uffd.lock().ok().and_then(|u| u.clone());
        let Some(uffd) = uffd else {
            return Err(BackendError::State("demand paging has ended"));
        };
        let off = page.0 as usize * paging.page;
        let installed = match data {
            Some(d) => uffd.copy(&paging.region, off, d),
            None => uffd.zero(&paging.region, off),
        }
        .map_err(|e| BackendError::Paging(e.to_string()))?;
        if installed {
            let since = paging
                .waiting
                .lock()
                .ok()
                .and_then(|mut w| w.remove(&page.0));
            if let Some(t) = since {
                if let Ok(mut s) = paging.samples.lock() {
                    s.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
            }
        }
        Ok(installed)
    }

    /// Post-copy fault figures so far.
    pub fn fault_stats(&self) -> Option<FaultStats> {
        let paging = self.paging()?;
        let mut samples = paging.samples.lock().ok()?.clone();
        // Disk blocks a guest write waited for, too.
        for d in &self.shared.disks {
            samples.extend(d.demand_samples());
        }
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        Some(FaultStats {
            faults: samples.len() as u64,
            median_us: at(0.5),
            p99_us: at(0.99),
        })
    }

    /// Whether the VM has disks.
    pub fn has_disks(&self) -> bool {
        !self.shared.disks.is_empty()
    }

    /// Starts incoming disk `disk` as a copy of `base` (before any block
    /// of it arrives). Blocking.
    pub fn stage_base(
        &self,
        disk: usize,
        base: &super::base::BaseIndex,
    ) -> Result<(), BackendError> {
        match self.shared.disks.get(disk) {
            Some(d) => d.fill_from(base),
            None => Err(BackendError::Spec(format!("no disk {disk}"))),
        }
    }

    /// Puts an arrived VM's disks on stable storage, and their names (the
    /// VM's directory and its entry in the disk directory, both made for
    /// this migration). The destination does this once the VM runs, and
    /// says Started (on which the source discards its copy) only after.
    /// Blocking.
    pub fn sync_disks(&self) -> Result<(), BackendError> {
        for d in &self.shared.disks {
            d.sync()?;
        }
        if let Some(dir) = &self.shared.disk_dir {
            for d in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
                std::fs::File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| BackendError::Disk(format!("cannot sync {}: {e}", d.display())))?;
            }
        }
        Ok(())
    }

    /// Writes the disks' data written so far to stable storage. An
    /// incoming VM's disks are flushed while they arrive, so that the
    /// sync before Started ([`SimVm::sync_disks`]) has only the last
    /// blocks to write, not the whole disk.
    pub fn flush_disks(&self) -> Result<(), BackendError> {
        for d in &self.shared.disks {
            d.flush()?;
        }
        Ok(())
    }

    /// Ends demand paging: stops the handler and closes the userfaultfd
    /// (which wakes any blocked toucher; a page still missing then reads
    /// as zeros, so call this once every page is in, or to stop the VM).
    pub fn end_postcopy(&self) {
        // A guest write waiting for a disk block holds the tick: free it.
        for d in &self.shared.disks {
            d.end_demand();
        }
        let Some(paging) = self.paging() else {
            return;
        };
        paging.stop.store(true, Ordering::Relaxed);
        let handler = paging.handler.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handler {
            let _ = h.join();
        }
        let closed = paging.uffd.lock().ok().and_then(|mut u| u.take());
        drop(closed);
    }

    /// The disk and block of a leaf past the memory's pages.
    fn disk_block(&self, leaf: PageIndex) -> Option<(&SimDisk, u64)> {
        self.shared
            .disks
            .iter()
            .find_map(|d| d.block_of(leaf).map(|b| (d, b)))
    }

    /// The directory of its disk files, if it has disks.
    pub fn disk_dir(&self) -> Option<&std::path::Path> {
        self.shared.disk_dir.as_deref()
    }

    fn stop_workload(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        // A vCPU blocked on a page that will never come (the source is
        // gone) is woken by ending demand paging; without that, joining it
        // would wait forever.
        self.shared.stop.store(true, Ordering::Relaxed);
        self.end_postcopy();
        self.stop_workload();
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 KiB of log-like text: compresses about 3-5x with zstd level 1.
fn text_template(rng: &mut SmallRng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "GET",
        "POST",
        "/api/v1/items",
        "200",
        "404",
        "user",
        "session",
        "cache",
        "hit",
        "miss",
        "INFO",
        "WARN",
        "request",
        "completed",
        "in",
        "ms",
        "bytes",
        "id",
        "ok",
        "error",
        "connection",
        "reset",
        "timeout",
        "the",
        "a",
        "of",
        "and",
        "to",
    ];
    let mut out = Vec::with_capacity(70_000);
    while out.len() < 65_536 + 8 {
        let w = WORDS[(rng.next_u32() as usize) % WORDS.len()];
        out.extend_from_slice(w.as_bytes());
        if rng.next_u32() % 5 == 0 {
            out.extend_from_slice(format!(" {}", rng.next_u32() % 10_000).as_bytes());
        }
        out.push(if rng.next_u32() % 12 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(65_536);
    out
}

/// The fault handler: asks for owed pages, zero-fills the others.
fn serve_faults(
    paging: &Paging,
    uffd: &Uffd,
    faults: &tokio::sync::mpsc::UnboundedSender<PageIndex>,
) {
    while !paging.stop.load(Ordering::Relaxed) {
        let fault = match uffd.next_fault(&paging.region, Duration::from_millis(50)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("post-copy fault handler stops: {e}");
                return;
            }
        };
        let page = (fault.offset / paging.page) as u64;
        if paging.owed.contains(PageIndex(page)) {
            let first = paging
                .waiting
                .lock()
                .map(|mut w| {
                    let fresh = !w.contains_key(&page);
                    w.entry(page).or_insert_with(Instant::now);
                    fresh
                })
                .unwrap_or(false);
            if first && faults.send(PageIndex(page)).is_err() {
                // Nobody to ask: the VM waits until paging ends.
                tracing::warn!(page, "post-copy fault with no migration to ask");
            }
        } else if let Err(e) = uffd.zero(&paging.region, fault.offset) {
            tracing::error!(page, "cannot zero-fill a page never sent: {e}");
        }
    }
}

/// Makes `root/vm`, the directory of one VM's disk files; it must not
/// exist (a leftover is for the operator to look at, never reused).
fn make_vm_dir(root: &std::path::Path, vm: &str) -> Result<std::path::PathBuf, BackendError> {
    std::fs::create_dir_all(root)
        .map_err(|e| BackendError::Disk(format!("cannot create {}: {e}", root.display())))?;
    let dir = root.join(vm);
    std::fs::create_dir(&dir).map_err(|e| {
        BackendError::Disk(if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} exists already (disks of another VM of this name?)",
                dir.display()
            )
        } else {
            format!("cannot create {}: {e}", dir.display())
        })
    })?;
    Ok(dir)
}

/// Refuses disks that would not fit in the free space under `root`: they
/// are sparse as they arrive but may fill, and running out of space in
/// the middle of a migration would fail it late.
fn check_room(root: &std::path::Path, need: u64) -> Result<(), BackendError> {
    std::fs::create_dir_all(root)
        .map_err(|e| BackendError::Disk(format!("cannot create {}: {e}", root.display())))?;
    let st = rustix::fs::statvfs(root)
        .map_err(|e| BackendError::Disk(format!("cannot stat {}: {e}", root.display())))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if need > free {
        return Err(BackendError::Disk(format!(
            "no room for the disks: they need {need} bytes, {} has {free} free",
            root.display()
        )));
    }
    Ok(())
}

fn mark_dirty(shared: &Shared, page: u64) {
    if let Some(w) = shared.dirty.get((page / 64) as usize) {
        w.fetch_or(1 << (page % 64), Ordering::Release);
    }
}

fn workload(shared: &Shared) {
    let pages = shared.geometry.page_count();
    let page = shared.geometry.page_size().bytes();
    let mut rng = SmallRng::seed_from_u64(
        shared.seed.load(Ordering::Relaxed) ^ shared.counter.load(Ordering::Relaxed),
    );
    let mut next = Instant::now();
    let mut carry = 0.0f64;
    let mut disk_carry = vec![0.0f64; shared.disks.len()];
    let mut credit = 0.0f64;
    while !shared.stop.load(Ordering::Relaxed) {
        next += Duration::from_millis(1);
        // A throttled vCPU runs only (100 - t)% of its ticks.
        credit += (100.0 - shared.throttle.load(Ordering::Relaxed).min(99) as f64) / 100.0;
        let runs = credit >= 1.0;
        if runs {
            credit -= 1.0;
        }
        if runs {
            let _tick = shared.tick.lock();
            if !shared.paused.load(Ordering::Acquire) {
                let c = shared.counter.fetch_add(1, Ordering::Relaxed) + 1;
                shared.mem.store_word(0, c);
                mark_dirty(shared, 0);
                carry += shared.rate.load(Ordering::Relaxed) as f64 / 1000.0;
                let n = carry as u64;
                carry -= n as f64;
                let hot = (pages * shared.hot_set_pct.load(Ordering::Relaxed) / 100).max(1);
                for _ in 0..n {
                    let r = rng.next_u64();
                    let p = if r % 10 < 9 {
                        (r >> 8) % hot
                    } else {
                        (r >> 8) % pages
                    };
                    // A 64-byte chunk, never the counter word of page 0.
                    let chunk = 1 + ((r >> 40) as usize % (page / 64 - 1));
                    let base = (p as usize * page + chunk * 64) / 8;
                    for k in 0..8 {
                        shared.mem.store_word(base + k, rng.next_u64());
                    }
                    mark_dirty(shared, p);
                }
                // Disk writes, with the memory's hot-set skew.
                for (d, c) in shared.disks.iter().zip(disk_carry.iter_mut()) {
                    *c += d.rate() as f64 / 1000.0;
                    let n = *c as u64;
                    *c -= n as f64;
                    let hot =
                        (d.blocks() * shared.hot_set_pct.load(Ordering::Relaxed) / 100).max(1);
                    for _ in 0..n {
                        let r = rng.next_u64();
                        let b = if r % 10 < 9 {
                            (r >> 8) % hot
                        } else {
                            (r >> 8) % d.blocks()
                        };
                        d.guest_write(b, &mut rng);
                    }
                }
            }
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            next = now;
        }
    }
}

impl VmBackend for SimVm {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn geometry(&self) -> MemoryGeometry {
        self.shared.geometry
    }

    fn read_page(&self, page: PageIndex, buf: &mut [u8]) {
        let size = self.shared.geometry.page_size().bytes();
        self.shared.mem.read(page.0 as usize * size, buf);
    }

    fn disks(&self) -> Vec<convoy_protocol::disk::DiskGeometry> {
        self.shared
            .disks
            .iter()
            .map(|d| d.geometry().clone())
            .collect()
    }

    fn read_leaf(&self, leaf: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        if leaf.0 < self.shared.geometry.page_count() {
            self.read_page(leaf, buf);
            return Ok(());
        }
        match self.disk_block(leaf) {
            Some((d, b)) => d.read(b, buf),
            None => Err(BackendError::Disk(format!(
                "leaf {} is past the last disk",
                leaf.0
            ))),
        }
    }

    fn start_dirty_log(&self) {
        for w in &self.shared.dirty {
            w.store(0, Ordering::Release);
        }
        for d in &self.shared.disks {
            d.clear_written();
        }
    }

    fn collect_dirty_log(&self) -> PageBitmap {
        let words = self
            .shared
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Acquire))
            .collect();
        let memory = PageBitmap::from_words(words, self.shared.geometry.page_count());
        if self.shared.disks.is_empty() {
            return memory;
        }
        let mut log = PageBitmap::empty(self.shared.leaves);
        for p in memory.iter() {
            log.insert(p);
        }
        for d in &self.shared.disks {
            d.take_written(&mut log);
        }
        log
    }

    fn stop_dirty_log(&self) {
        // The sim always records; clearing is enough.
        self.start_dirty_log();
    }

    fn pause(&self) -> Result<(), BackendError> {
        self.shared.paused.store(true, Ordering::Release);
        // Wait out a tick in progress: after this no write is in flight.
        drop(self.shared.tick.lock());
        Ok(())
    }

    fn resume(&self) -> Result<(), BackendError> {
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(BackendError::State("destroyed"));
        }
        self.shared.paused.store(false, Ordering::Release);
        Ok(())
    }

    fn device_state(&self) -> Result<Vec<u8>, BackendError> {
        let s = DeviceState {
            version: DEVICE_STATE_VERSION,
            counter: self.shared.counter.load(Ordering::Relaxed),
            dirty_pages_per_sec: self.shared.rate.load(Ordering::Relaxed),
            hot_set_pct: self.shared.hot_set_pct.load(Ordering::Relaxed) as u8,
            seed: self.shared.seed.load(Ordering::Relaxed),
            disk_writes_per_sec: self.shared.disks.iter().map(SimDisk::rate).collect(),
        };
        postcard::to_stdvec(&s).map_err(|e| BackendError::DeviceState(e.to_string()))
    }

    fn counter(&self) -> u64 {
        self.shared.counter.load(Ordering::Relaxed)
    }

    fn is_running(&self) -> bool {
        !self.shared.paused.load(Ordering::Relaxed) && !self.shared.stop.load(Ordering::Relaxed)
    }

    fn dirty_rate(&self) -> u64 {
        self.shared.rate.load(Ordering::Relaxed)
    }

    fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle
            .store(u64::from(percent.min(99)), Ordering::Relaxed);
    }

    fn destroy(&self) {
        // A vCPU blocked on a missing page holds the tick: wake it first.
        self.end_postcopy();
        let _ = self.pause();
        self.stop_workload();
        self.shared.mem.wipe();
        // Its disks go with it (a VM that moved runs on the copies).
        if let Some(dir) = &self.shared.disk_dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

impl Staging for SimVm {
    fn write_page(&self, page: PageIndex, data: Option<&[u8]>) -> Result<(), BackendError> {
        let size = self.shared.geometry.page_size().bytes();
        if page.0 < self.shared.geometry.page_count() {
            let off = page.0 as usize * size;
            match data {
                Some(d) => self.shared.mem.write(off, d),
                None => self.shared.mem.zero(off, size),
            }
            return Ok(());
        }
        match self.disk_block(page) {
            Some((d, b)) => d.write(b, data),
            None => Err(BackendError::Disk(format!(
                "leaf {} is past the last disk",
                page.0
            ))),
        }
    }

    fn read_staged(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read_leaf(page, buf)
    }

    fn start(
        self: Arc<Self>,
        device_state: &[u8],
        paused: bool,
    ) -> Result<(Arc<dyn VmBackend>, u64), BackendError> {
        let (s, rest): (DeviceState, &[u8]) = postcard::take_from_bytes(device_state)
            .map_err(|e| BackendError::DeviceState(e.to_string()))?;
        if !rest.is_empty()
            || s.version != DEVICE_STATE_VERSION
            || !(1..=100).contains(&s.hot_set_pct)
            || s.disk_writes_per_sec.len() != self.shared.disks.len()
        {
            return Err(BackendError::DeviceState(
                "unknown version, bad hot set, disks that do not match, or trailing bytes".into(),
            ));
        }
        // Memory and device state must agree: page 0 holds the counter.
        // (After a post-copy switch page 0 may still be on its way; the
        // root check at the end covers it.)
        if self.paging().is_none() && self.shared.mem.load_word(0) != s.counter {
            return Err(BackendError::DeviceState(format!(
                "counter {} does not match memory ({})",
                s.counter,
                self.shared.mem.load_word(0)
            )));
        }
        self.shared.counter.store(s.counter, Ordering::Relaxed);
        self.set_workload(s.dirty_pages_per_sec, s.hot_set_pct, s.seed);
        for (d, r) in self.shared.disks.iter().zip(&s.disk_writes_per_sec) {
            d.set_rate(*r);
        }
        self.shared.paused.store(paused, Ordering::Release);
        self.spawn_workload();
        Ok((self, s.counter))
    }

    fn discard(&self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bytes: u64, rate: u64, content: ContentProfile) -> SimVmSpec {
        SimVmSpec {
            name: "t".parse().unwrap(),
            memory_bytes: bytes,
            dirty_pages_per_sec: rate,
            hot_set_pct: 10,
            content,
            seed: 7,
            attributes: Default::default(),
            disks: Vec::new(),
        }
    }

    #[test]
    fn workload_dirties_and_pause_stops_writes() {
        let vm = SimVm::create(&spec(4 << 20, 20_000, ContentProfile::Mixed), None, None).unwrap();
        vm.start_dirty_log();
        std::thread::sleep(Duration::from_millis(50));
        let d = vm.collect_dirty_log();
        assert!(d.count() > 10, "{d:?}");
        assert!(d.contains(PageIndex(0)));
        vm.pause().unwrap();
        let c = vm.counter();
        let _ = vm.collect_dirty_log();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vm.counter(), c);
        assert!(vm.collect_dirty_log().is_empty());
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(vm.counter() > c);
    }

    #[test]
    fn a_throttled_vcpu_runs_fewer_ticks() {
        let vm = SimVm::create(&spec(1 << 20, 0, ContentProfile::Zero), None, None).unwrap();
        let ticks = |vm: &SimVm| {
            let c = vm.counter();
            std::thread::sleep(Duration::from_millis(200));
            vm.counter() - c
        };
        let free = ticks(&vm);
        vm.set_throttle(80);
        let throttled = ticks(&vm);
        vm.set_throttle(0);
        let lifted = ticks(&vm);
        // 80% throttled runs a fifth of the ticks; allow for a busy host.
        assert!(throttled * 3 < free, "free {free}, throttled {throttled}");
        assert!(lifted * 3 > free * 2, "free {free}, lifted {lifted}");
    }

    #[test]
    fn mixed_content_has_zero_text_and_random_pages() {
        let vm = SimVm::create(&spec(4 << 20, 0, ContentProfile::Mixed), None, None).unwrap();
        vm.pause().unwrap();
        let mut zero = 0;
        let mut buf = vec![0u8; 4096];
        for p in 1..1024 {
            vm.read_page(PageIndex(p), &mut buf);
            if convoy_protocol::page::is_zero(&buf) {
                zero += 1;
            }
        }
        assert!((150..350).contains(&zero), "{zero} zero pages of 1023");
    }

    fn all_zero(vm: &SimVm) -> bool {
        let mut buf = vec![0u8; 4096];
        (0..vm.geometry().page_count()).all(|p| {
            vm.read_page(PageIndex(p), &mut buf);
            convoy_protocol::page::is_zero(&buf)
        })
    }

    #[test]
    fn a_handed_over_vm_and_a_discarded_staging_image_are_wiped() {
        // Source side: after handover the engine destroys the VM.
        let vm = SimVm::create(&spec(1 << 20, 5000, ContentProfile::Random), None, None).unwrap();
        assert!(!all_zero(&vm));
        vm.destroy();
        assert!(all_zero(&vm), "guest memory readable after destroy");
        assert!(vm.resume().is_err(), "a destroyed VM never runs again");
        // Destination side: a staging image discarded on abort.
        let staging = SimVm::incoming(vm.geometry()).unwrap();
        staging
            .write_page(PageIndex(3), Some(&[7u8; 4096]))
            .unwrap();
        assert!(!all_zero(&staging));
        staging.discard();
        assert!(all_zero(&staging), "staging readable after discard");
    }

    #[test]
    fn a_vm_with_a_disk_copied_leaf_by_leaf_starts_paused_with_the_same_disk() {
        let root = tempfile::tempdir().unwrap();
        let mut s = spec(1 << 20, 2000, ContentProfile::Mixed);
        s.disks = vec![convoy_protocol::ctl::SimDiskSpec {
            name: "root".parse().unwrap(),
            bytes: 64 * 4096,
            writes_per_sec: 2000,
            used_pct: 50,
            base: None,
        }];
        let src = SimVm::create(&s, Some(&root.path().join("a")), None).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        src.pause().unwrap();
        let disks = src.disks();
        assert_eq!(disks.len(), 1);
        let leaves = convoy_protocol::disk::check(src.geometry(), &disks).unwrap();
        let ranges = convoy_protocol::disk::leaf_ranges(src.geometry(), &disks);
        let dst =
            SimVm::incoming_with_disks(src.geometry(), &disks, Some((&root.path().join("b"), "t")))
                .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut disk_leaves = Vec::new();
        for l in 0..leaves {
            src.read_leaf(PageIndex(l), &mut buf).unwrap();
            dst.write_page(PageIndex(l), Some(&buf)).unwrap();
            if ranges[0].contains(&l) {
                disk_leaves.push(convoy_protocol::digest::leaf_digest(&buf));
            }
        }
        let want = convoy_protocol::disk::disk_root(&disk_leaves);
        let file = root.path().join("b/t/root.img");
        let got = |f: &std::path::Path| {
            convoy_protocol::disk::file_root(std::fs::File::open(f).unwrap(), 64 * 4096, 4096)
                .unwrap()
        };
        let (vm, from) = dst
            .clone()
            .start(&src.device_state().unwrap(), true)
            .unwrap();
        assert_eq!(from, src.counter());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.counter(), from, "a VM started paused does not run");
        assert_eq!(got(&file), want, "the disk file holds what was copied");
        assert_eq!(got(&root.path().join("a/t/root.img")), want);
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(vm.counter() > from, "runs once resumed");
        assert_ne!(got(&file), want, "and its workload writes its disk");
        vm.destroy();
        src.destroy();
        assert!(!file.exists() && !root.path().join("a/t").exists());
    }

    /// Whether userfaultfd can be used here; in CI (root) its absence is
    /// a failure, elsewhere the test is skipped.
    fn uffd_here() -> bool {
        if crate::backend::uffd::available() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "userfaultfd unavailable in CI"
        );
        eprintln!("skipped: userfaultfd unavailable (not root)");
        false
    }

    #[test]
    fn a_postcopy_image_runs_on_demand_paging_and_asks_only_for_owed_pages() {
        if !uffd_here() {
            return;
        }
        // No writes but the counter's, so the pages stay as sent.
        let src = SimVm::create(&spec(1 << 20, 0, ContentProfile::Random), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        src.pause().unwrap();
        let pages = src.geometry().page_count();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        // Pre-copy staged every page; pages 0..8 were dirtied since and are
        // owed, so their stale staged copies must not be seen.
        let mut buf = vec![0u8; 4096];
        for p in 0..pages {
            src.read_page(PageIndex(p), &mut buf);
            let stale: Vec<u8> = buf.iter().map(|b| !b).collect();
            dst.write_page(PageIndex(p), Some(if p < 8 { &stale } else { &buf }))
                .unwrap();
        }
        let mut owed = PageBitmap::empty(pages);
        for p in 0..8 {
            owed.insert(PageIndex(p));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        dst.begin_postcopy(&owed, tx).unwrap();
        let (vm, from) = dst
            .clone()
            .start(&src.device_state().unwrap(), false)
            .unwrap();
        assert_eq!(from, src.counter());
        // The vCPU writes the counter into page 0 every tick: it faults.
        let asked = rx.blocking_recv().unwrap();
        assert_eq!(asked, PageIndex(0));
        let c = vm.counter();
        std::thread::sleep(Duration::from_millis(30));
        assert!(vm.counter() <= c + 1, "blocked on its missing page");
        for p in 0..8 {
            src.read_page(PageIndex(p), &mut buf);
            let fresh = dst.install_page(PageIndex(p), Some(&buf)).unwrap();
            assert!(fresh, "page {p} was present before it arrived");
        }
        // A second copy (a push that crossed a fault) is not installed.
        assert!(!dst.install_page(PageIndex(3), Some(&[7u8; 4096])).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        assert!(vm.counter() > c + 5, "runs once its page is in");
        let f = dst.fault_stats().unwrap();
        assert!(f.faults >= 1 && f.median_us > 0, "{f:?}");
        // Page 3 holds the source's bytes, not the stale or the late copy.
        src.read_page(PageIndex(3), &mut buf);
        let mut got = vec![0u8; 4096];
        dst.read_staged(PageIndex(3), &mut got).unwrap();
        assert!(got == buf, "page 3 is not the source's");
        dst.end_postcopy();
        vm.destroy();
    }

    /// A VM started on demand paging with every page owed and nobody to
    /// serve its faults: its vCPU blocks on its first touch. Returns the
    /// running VM and the incoming image it was started from.
    fn blocked_postcopy_vm() -> (Arc<dyn VmBackend>, Arc<SimVm>) {
        let src = SimVm::create(&spec(1 << 20, 0, ContentProfile::Zero), None, None).unwrap();
        src.pause().unwrap();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        let owed = PageBitmap::full(src.geometry().page_count());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Asked, never answered.
        std::mem::forget(rx);
        dst.begin_postcopy(&owed, tx).unwrap();
        let (vm, _) = dst
            .clone()
            .start(&src.device_state().unwrap(), false)
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        (vm, dst)
    }

    #[test]
    fn a_vcpu_blocked_on_a_missing_page_does_not_hang_destroy() {
        if !uffd_here() {
            return;
        }
        let (vm, _dst) = blocked_postcopy_vm();
        // Never served: destroy must still return.
        vm.destroy();
        assert!(!vm.is_running());
    }

    #[test]
    fn dropping_a_vm_blocked_on_a_missing_page_does_not_hang() {
        if !uffd_here() {
            return;
        }
        let (vm, dst) = blocked_postcopy_vm();
        // Never served, never destroyed: the last reference going away
        // (an agent's task cancelled at shutdown) must still end the VM.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(vm);
            drop(dst);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(20)).is_ok(),
            "dropping a demand-paged VM hung on its blocked vCPU"
        );
    }

    #[test]
    fn staging_starts_from_device_state_and_checks_it() {
        let src = SimVm::create(&spec(1 << 20, 1000, ContentProfile::Mixed), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        src.pause().unwrap();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        let mut buf = vec![0u8; 4096];
        for p in 0..src.geometry().page_count() {
            src.read_page(PageIndex(p), &mut buf);
            dst.write_page(PageIndex(p), Some(&buf)).unwrap();
        }
        let state = src.device_state().unwrap();
        assert!(dst.clone().start(b"garbage", false).is_err());
        let (started, resumed_from) = dst.start(&state, false).unwrap();
        assert_eq!(resumed_from, src.counter());
        std::thread::sleep(Duration::from_millis(10));
        assert!(started.counter() > src.counter());
    }
}
