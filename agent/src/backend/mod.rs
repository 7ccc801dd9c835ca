//! VM backends: what a VMM must give Convoy to be migrated.
//!
//! [`VmBackend`] is a running (or paused) VM at the source: memory pages,
//! a dirty log, pause/resume, device state. [`Staging`] is the image a
//! destination writes into: pages in, digests of what it holds out, and
//! `start` once the roots are verified and the source has handed over.
//!
//! The built-in [`sim`] backend is the embedded default for demos, tests
//! and benchmarks.

pub mod base;
mod error;
#[allow(unsafe_code)] // The atomic view of the guest mapping, its registration, madvise.
pub mod memory;
pub mod qemu;
pub mod sim;
// Its `unsafe` is fenced inside it: `descriptor`, `region`, the tests.
pub mod uffd;

use std::sync::Arc;

use convoy_protocol::page::{MemoryGeometry, PageBitmap, PageIndex};

pub use error::{
    BackendError, BaseImageError, DeviceStateError, DiskFileError, PagingError, SpecError,
    VcpuError,
};

/// A VM as the migration source sees it.
pub trait VmBackend: Send + Sync + std::fmt::Debug {
    /// Backend name (`sim`).
    fn kind(&self) -> &'static str;
    /// Memory geometry.
    fn geometry(&self) -> MemoryGeometry;
    /// Copies page `page` into `buf` (one page long).
    fn read_page(&self, page: PageIndex, buf: &mut [u8]);
    /// Its disks, whose blocks are the leaves after the memory's pages
    /// (see [`convoy_protocol::disk`]).
    fn disks(&self) -> Vec<convoy_protocol::disk::DiskGeometry> {
        Vec::new()
    }
    /// Copies leaf `leaf` — a memory page, or a disk block after them —
    /// into `buf` (one page long).
    fn read_leaf(&self, leaf: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read_page(leaf, buf);
        Ok(())
    }
    /// Clears the dirty log; from now on every write is recorded.
    fn start_dirty_log(&self);
    /// Returns and clears the leaves (pages, and disk blocks) written
    /// since the last call.
    fn collect_dirty_log(&self) -> PageBitmap;
    /// Stops recording writes.
    fn stop_dirty_log(&self);
    /// Pauses the guest; when this returns no write is in flight.
    fn pause(&self) -> Result<(), BackendError>;
    /// Resumes the guest.
    fn resume(&self) -> Result<(), BackendError>;
    /// The device state (only meaningful while paused).
    fn device_state(&self) -> Result<Vec<u8>, BackendError>;
    /// The guest's monotonic device counter.
    fn counter(&self) -> u64;
    /// Whether the guest is executing.
    fn is_running(&self) -> bool;
    /// Workload dirty rate, pages per second.
    fn dirty_rate(&self) -> u64;
    /// The guest's service's counters (a sim VM with a service).
    fn service(&self) -> Option<convoy_protocol::ctl::service::ServiceStats> {
        None
    }
    /// Throttles the guest's CPU: `percent` of its time is taken away
    /// (auto-converge); 0 lifts the throttle.
    fn set_throttle(&self, percent: u8);
    /// Stops the guest for good and wipes its memory.
    fn destroy(&self);
    /// A sim VM whose vCPU runs in a helper process: what a restarted
    /// agent needs to find it again (`None`: it dies with the agent).
    fn vcpu_record(&self) -> Option<sim::VcpuRecord> {
        None
    }
}

/// The image a destination builds before the VM may start.
pub trait Staging: Send + Sync + std::fmt::Debug {
    /// Writes leaf `page` (a memory page, or a disk block after them);
    /// `None` is zeros.
    fn write_page(&self, page: PageIndex, data: Option<&[u8]>) -> Result<(), BackendError>;
    /// Copies what staging holds at leaf `page` into `buf` (one page
    /// long).
    fn read_staged(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Starts the VM from this image and `device_state` (`paused`: ready,
    /// but the guest does not run until resumed); returns it with the
    /// device counter it resumed from.
    fn start(
        self: Arc<Self>,
        device_state: &[u8],
        paused: bool,
    ) -> Result<(Arc<dyn VmBackend>, u64), BackendError>;
    /// Wipes and releases the image.
    fn discard(&self);
}
