//! What a backend's operations fail with ([`BackendError`]), one enum per
//! kind of failure under it.

use std::path::PathBuf;

use convoy_protocol::geometry::GeometryError;
use convoy_protocol::names::DiskName;
use thiserror::Error;

use super::uffd::UffdError;

/// Backend failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// Memory could not be mapped.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(std::io::Error),
    /// The device state does not parse.
    #[error("bad device state: {0}")]
    DeviceState(#[from] DeviceStateError),
    /// The VM is in the wrong state for the request.
    #[error("VM is {0}")]
    State(&'static str),
    /// A bad specification.
    #[error("invalid VM specification: {0}")]
    Spec(#[from] SpecError),
    /// Demand paging (userfaultfd) failed.
    #[error("demand paging: {0}")]
    Paging(#[from] PagingError),
    /// A disk file could not be made, read or written.
    #[error("disk: {0}")]
    Disk(#[from] DiskFileError),
    /// A sim VM's vCPU helper process or its memfd.
    #[error("vCPU: {0}")]
    Vcpu(#[from] VcpuError),
}

/// Why a sim VM's vCPU could not move to, or be found again in, its
/// helper process.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VcpuError {
    /// The memfd could not be mapped or opened.
    #[error("its memfd: {0}")]
    Map(#[source] std::io::Error),
    /// The memfd's control header is not what this build wrote.
    #[error("its memfd's header: bad {0}")]
    Header(&'static str),
    /// The helper process could not be started.
    #[error("cannot start the helper process: {0}")]
    Spawn(#[source] std::io::Error),
    /// The helper did not map the memory in time, or exited.
    #[error("the helper process (pid {0}) did not become ready")]
    NotReady(u32),
    /// The recorded helper is gone (exited, or its pid is another
    /// process's now).
    #[error("its helper process is gone: {0}")]
    Gone(String),
    /// The recorded helper runs but is not the VM that was recorded.
    #[error("its helper process (pid {pid}) differs: {why}")]
    Differs {
        /// Its pid.
        pid: u32,
        /// How.
        why: String,
    },
}

/// Why a device state cannot be encoded or is refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceStateError {
    /// The state could not be encoded.
    #[error("{0}")]
    Encode(#[source] postcard::Error),
    /// The bytes do not parse.
    #[error("{0}")]
    Decode(#[source] postcard::Error),
    /// It parses, but is not a state of this VM.
    #[error("unknown version, bad hot set, disks that do not match, or trailing bytes")]
    Mismatch,
    /// A rate that would spin the workload.
    #[error("a dirty or disk write rate past the limit")]
    RateTooHigh,
    /// The counter it carries is not the one in memory.
    #[error("counter {counter} does not match memory ({memory})")]
    Counter {
        /// The state's counter.
        counter: u64,
        /// The counter in page 0.
        memory: u64,
    },
}

/// Why a VM specification (or a disk of it) cannot be made.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The hot set is not a share.
    #[error("hot set must be 1..=100 percent")]
    HotSet,
    /// The memory size is not a geometry.
    #[error("{0}")]
    Geometry(#[from] GeometryError),
    /// The disks do not fit the memory's geometry.
    #[error("{0}")]
    Disks(#[from] convoy_protocol::disk::DiskError),
    /// More memory than this host can address.
    #[error("too large")]
    TooLarge,
    /// A disk with a base, and no base image directory.
    #[error("this agent has no base image directory (start it with --base-dir)")]
    NoBaseDir,
    /// Disks, and no disk directory.
    #[error("this agent has no disk directory (start it with --state-dir or --disk-dir)")]
    NoDiskDir,
    /// A disk's used share past 100%.
    #[error("disk {disk}: used share {pct}% is over 100%")]
    UsedShare {
        /// The disk.
        disk: DiskName,
        /// Its share.
        pct: u8,
    },
    /// A base of another size than the disk.
    #[error("disk {disk}: base {base} is {base_bytes} bytes, the disk {disk_bytes}")]
    BaseSize {
        /// The disk.
        disk: DiskName,
        /// Its base.
        base: DiskName,
        /// The base's size.
        base_bytes: u64,
        /// The disk's size.
        disk_bytes: u64,
    },
    /// No disk of that index.
    #[error("no disk {0}")]
    NoDisk(usize),
}

/// Why demand paging failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PagingError {
    /// A userfaultfd call.
    #[error("{0}")]
    Uffd(#[from] UffdError),
    /// The fault handler's thread could not be started.
    #[error("{0}")]
    Thread(#[source] std::io::Error),
}

/// Why a disk file (or its directory, or a base image) failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DiskFileError {
    /// A file system call on `path`.
    #[error("{action} {}: {error}", .path.display())]
    Io {
        /// What was being done (`cannot write`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// Disks arriving at an agent without a disk directory.
    #[error("this agent has no disk directory for the VM's disks")]
    NoDiskDir,
    /// The disks would not fit the free space.
    #[error("no room for the disks: they need {need} bytes, {} has {free} free", .root.display())]
    NoRoom {
        /// Bytes the disks need.
        need: u64,
        /// The disk directory.
        root: PathBuf,
        /// Bytes free there.
        free: u64,
    },
    /// A leaf past the last disk.
    #[error("leaf {0} is past the last disk")]
    PastLastDisk(u64),
    /// The VM's disk directory exists.
    #[error("{} exists already (disks of another VM of this name?)", .0.display())]
    VmDirExists(PathBuf),
    /// A base image that cannot be used.
    #[error("base image {}: {error}", .path.display())]
    Base {
        /// Its file.
        path: PathBuf,
        /// Why.
        #[source]
        error: BaseImageError,
    },
}

impl DiskFileError {
    /// `action` on `path` failed with `error`.
    pub(crate) fn io(action: &'static str, path: &std::path::Path, error: std::io::Error) -> Self {
        DiskFileError::Io {
            action,
            path: path.to_owned(),
            error,
        }
    }
}

/// Why a base image cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BaseImageError {
    /// A file system call.
    #[error("{action}: {error}")]
    Io {
        /// What was being done (`cannot read`).
        action: &'static str,
        /// Why.
        #[source]
        error: std::io::Error,
    },
    /// Not a regular file.
    #[error("not a file: a base image is a raw image file")]
    NotAFile,
    /// Empty, or not whole blocks.
    #[error("bad size: {bytes} bytes is not a whole number of {block}-byte blocks")]
    BadSize {
        /// Its size.
        bytes: u64,
        /// The block size.
        block: usize,
    },
    /// Written or replaced since it was indexed.
    #[error("changed: it changed since it was indexed")]
    Changed,
}
