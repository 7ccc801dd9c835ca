//! The simulated VM: the embedded default for demos, tests and benchmarks.
//!
//! - Guest memory is a memfd ([`super::memory`]) filled at creation with
//!   realistic mixed content (zero, compressible text-like, random pages),
//!   or all random, or all zero. The counter, flags, workload parameters
//!   and dirty bitmaps are atomic words at the start of the same memfd
//!   (`control`).
//! - A workload (the "vCPU") ticks every millisecond: it increments
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
//!   write to one waits for it, timed the same way.
//! - An optional service: requests arriving at a steady rate, served by
//!   the vCPU's ticks while the VM runs, each touching a page, their
//!   response times recorded (`service`).
//! - The device state is the counter, the workload's parameters and the
//!   service, so they continue where they stopped after migration.
//! - The vCPU runs on a thread of the agent, or in a helper process that
//!   maps the memfd (`helper`, [`SimVcpuHost`]): such a VM outlives its
//!   agent, and a restarted agent maps it again ([`SimVm::reattach`]).
//!
//! # Layout
//!
//! One type, [`SimVm`], whose `impl` is split by concern; this file holds
//! the state every part shares, creation, and teardown on drop.
//!
//! - `content`: what memory is filled with at creation.
//! - `control`: the control words in the memfd, the cross-process pause.
//! - `service`: the guest's request stream, served by the vCPU.
//! - `workload`: the vCPU loop — counter, hot set, rates, throttle — and
//!   its thread.
//! - `helper`: the vCPU's helper process — spawning it, moving the vCPU
//!   there, stopping it, finding it again after a restart.
//! - `source`: [`VmBackend`] — leaves, dirty log, pause, destroy.
//! - `device`: the device state that travels, its encoding and checks.
//! - `staging`: incoming images and [`Staging`] — leaves in, disks staged
//!   from a base and synced, `start` from a device state.
//! - `paging`: post-copy demand paging (userfaultfd glue, the fault
//!   handler thread, [`FaultStats`]).
//! - `disk`: one disk — a sparse image file, its write log, and storage
//!   post-copy's wait for blocks still owed.
//!
//! [`Staging`]: super::Staging

mod content;
mod control;
mod device;
mod disk;
mod helper;
mod paging;
mod service;
mod source;
mod staging;
mod workload;

pub use device::fuzz_device_state;
pub use helper::{run_helper, SimVcpuHost, VcpuRecord, HELPER_ARG};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use convoy_protocol::ctl::SimVmSpec;
use convoy_protocol::page::{MemoryGeometry, PageIndex};

use self::control::Control;
use self::disk::SimDisk;
pub use self::paging::FaultStats;
use self::paging::Paging;
use super::memory::GuestMemory;
use super::{BackendError, DiskFileError, SpecError, VmBackend};

/// The state the VM, its vCPU and its fault handler share.
struct Shared {
    mem: GuestMemory,
    /// The words shared with the vCPU wherever it runs (`control`).
    ctl: Control,
    geometry: MemoryGeometry,
    /// Ends this process's vCPU thread (never a helper: see `Drop`).
    local_stop: AtomicBool,
    /// Demand paging after a post-copy switch.
    paging: Mutex<Option<Arc<Paging>>>,
    /// Its disks, and the directory that holds their files (removed with
    /// the VM).
    disks: Vec<SimDisk>,
    disk_dir: Option<std::path::PathBuf>,
    /// Memory pages and disk blocks.
    leaves: u64,
}

/// A simulated VM (running, paused, or an incoming staging image).
pub struct SimVm {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The helper process running the vCPU, once it moved there.
    helper: Mutex<Option<helper::Helper>>,
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
            return Err(SpecError::HotSet.into());
        }
        let geometry = MemoryGeometry::from_bytes(spec.memory_bytes).map_err(SpecError::from)?;
        let wanted: Vec<convoy_protocol::disk::DiskGeometry> = spec
            .disks
            .iter()
            .map(|d| convoy_protocol::disk::DiskGeometry {
                name: d.name.clone(),
                bytes: d.bytes,
                base: None,
            })
            .collect();
        convoy_protocol::disk::check(geometry, &wanted).map_err(SpecError::from)?;
        let block = geometry.page_size().bytes();
        // Bases first (indexing may read them whole): nothing made yet.
        let base_of: Vec<Option<Arc<super::base::BaseIndex>>> = spec
            .disks
            .iter()
            .map(|d| match (&d.base, bases) {
                (None, _) => Ok(None),
                (Some(_), None) => Err(SpecError::NoBaseDir.into()),
                (Some(b), Some(bases)) => bases.index(b, block).map(Some),
            })
            .collect::<Result<_, _>>()?;
        let (disks, dir) = if spec.disks.is_empty() {
            (Vec::new(), None)
        } else {
            let Some(root) = disk_dir else {
                return Err(SpecError::NoDiskDir.into());
            };
            let ranges = convoy_protocol::disk::leaf_ranges(geometry, &wanted);
            make_disks(root, spec.name.as_str(), |dir| {
                spec.disks
                    .iter()
                    .zip(ranges)
                    .zip(&base_of)
                    .enumerate()
                    .map(|(i, ((d, r), base))| {
                        SimDisk::create(
                            dir,
                            d,
                            r.start,
                            block,
                            spec.seed ^ i as u64,
                            base.as_deref(),
                        )
                    })
                    .collect()
            })?
        };
        let vm = SimVm::blank(spec.name.as_str(), spec.memory_bytes, disks, dir)?;
        vm.fill(spec.content, spec.seed);
        // Page 0 holds the counter from the start (0 until the first
        // tick): memory and device state agree even for a VM paused, or
        // copied, before its vCPU first ran.
        vm.shared.mem.store_word(0, 0);
        vm.set_workload(spec.dirty_pages_per_sec, spec.hot_set_pct, spec.seed);
        service::start(&vm.shared.ctl, spec.service_requests_per_sec);
        for (i, d) in vm.shared.disks.iter().enumerate() {
            vm.shared.ctl.set_disk_rate(i, d.made_rate());
        }
        let vm = Arc::new(vm);
        vm.spawn_workload();
        Ok(vm)
    }

    /// As [`SimVm::create`], its vCPU then moved to where `vcpu` says.
    pub fn create_on(
        spec: &SimVmSpec,
        disk_dir: Option<&std::path::Path>,
        bases: Option<&super::base::BaseImages>,
        vcpu: &SimVcpuHost,
    ) -> Result<Arc<SimVm>, BackendError> {
        let vm = SimVm::create(spec, disk_dir, bases)?;
        if let Err(e) = vm.move_vcpu(vcpu) {
            vm.destroy();
            return Err(e);
        }
        Ok(vm)
    }

    /// A VM `name` of `bytes` of zeroed memory with `disks`, its workload
    /// not started; if memory cannot be mapped, `disk_dir` is removed.
    fn blank(
        name: &str,
        bytes: u64,
        disks: Vec<SimDisk>,
        disk_dir: Option<std::path::PathBuf>,
    ) -> Result<SimVm, BackendError> {
        let geometry = MemoryGeometry::from_bytes(bytes).map_err(SpecError::from)?;
        let extents: Vec<(u64, u64)> = disks.iter().map(|d| (d.first_leaf(), d.blocks())).collect();
        let mem = usize::try_from(bytes)
            .map_err(|_| BackendError::from(SpecError::TooLarge))
            .and_then(|_| Control::create(name, geometry, &extents));
        let (ctl, mem) = match mem {
            Ok(m) => m,
            Err(e) => {
                // Nothing is left behind by a VM that could not be made.
                if let Some(dir) = &disk_dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        Ok(SimVm::of_parts(mem, ctl, geometry, disks, disk_dir))
    }

    fn of_parts(
        mem: GuestMemory,
        ctl: Control,
        geometry: MemoryGeometry,
        disks: Vec<SimDisk>,
        disk_dir: Option<std::path::PathBuf>,
    ) -> SimVm {
        SimVm {
            shared: Arc::new(Shared {
                mem,
                ctl,
                geometry,
                local_stop: AtomicBool::new(false),
                paging: Mutex::new(None),
                leaves: geometry.page_count() + disks.iter().map(SimDisk::blocks).sum::<u64>(),
                disks,
                disk_dir,
            }),
            worker: Mutex::new(None),
            helper: Mutex::new(None),
        }
    }

    /// Whether the VM has disks.
    pub fn has_disks(&self) -> bool {
        !self.shared.disks.is_empty()
    }

    /// The disk and block of a leaf past the memory's pages.
    fn disk_block(&self, leaf: PageIndex) -> Result<(&SimDisk, u64), BackendError> {
        self.shared
            .disks
            .iter()
            .find_map(|d| d.block_of(leaf).map(|b| (d, b)))
            .ok_or_else(|| DiskFileError::PastLastDisk(leaf.0).into())
    }

    /// The directory of its disk files, if it has disks.
    pub fn disk_dir(&self) -> Option<&std::path::Path> {
        self.shared.disk_dir.as_deref()
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        // A vCPU in a helper process outlives this handle (and the agent):
        // only `destroy` ends it.
        if self.has_helper() {
            return;
        }
        // A vCPU blocked on a page that will never come (the source is
        // gone) is woken by ending demand paging; without that, joining it
        // would wait forever.
        self.shared.ctl.stop();
        self.shared.local_stop.store(true, Ordering::Relaxed);
        self.end_postcopy();
        self.stop_workload();
    }
}

/// Makes `root/vm`, the directory of one VM's disk files; it must not
/// exist (a leftover is for the operator to look at, never reused).
fn make_vm_dir(root: &std::path::Path, vm: &str) -> Result<std::path::PathBuf, BackendError> {
    crate::private::create_dir_all(root)
        .map_err(|e| DiskFileError::io("cannot create", root, e))?;
    let dir = crate::private::join_one(root, vm)
        .map_err(|e| DiskFileError::io("cannot name", root, e))?;
    crate::private::create_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            DiskFileError::VmDirExists(dir.clone())
        } else {
            DiskFileError::io("cannot create", &dir, e)
        }
    })?;
    Ok(dir)
}

/// Makes `root/vm` (see [`make_vm_dir`]) and the disks `make` creates in
/// it; if they cannot all be made, the directory goes again.
fn make_disks(
    root: &std::path::Path,
    vm: &str,
    make: impl FnOnce(&std::path::Path) -> Result<Vec<SimDisk>, BackendError>,
) -> Result<(Vec<SimDisk>, Option<std::path::PathBuf>), BackendError> {
    let dir = make_vm_dir(root, vm)?;
    match make(&dir) {
        Ok(disks) => Ok((disks, Some(dir))),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use convoy_protocol::ctl::{ContentProfile, SimVmSpec};

    /// A sim VM of `bytes` dirtying `rate` pages a second, no disks.
    pub(crate) fn spec(bytes: u64, rate: u64, content: ContentProfile) -> SimVmSpec {
        SimVmSpec {
            name: "t".parse().unwrap(),
            memory_bytes: bytes,
            dirty_pages_per_sec: rate,
            hot_set_pct: 10,
            content,
            seed: 7,
            attributes: Default::default(),
            disks: Vec::new(),
            service_requests_per_sec: 0,
        }
    }
}
