//! The QEMU backend's errors: launching ([`QemuError`], [`SpecError`]),
//! adopting a running QEMU ([`AdoptError`], [`Mismatch`]), and finding one
//! again after a restart ([`ReattachError`], [`Gone`]).

use std::path::PathBuf;

use thiserror::Error;

use super::identity::NotTheSame;
use super::qmp::QmpError;

/// Launch failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QemuError {
    /// The spec is unusable.
    #[error("VM definition: {0}")]
    Spec(#[from] SpecError),
    /// The QEMU to adopt is not one the agent may take over.
    #[error("VM definition: {0}")]
    Adopt(#[from] AdoptError),
    /// QEMU could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// Binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU exited before its QMP socket came up.
    #[error("QEMU exited at start ({status}): {stderr}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its last error output.
        stderr: String,
    },
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// File system.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a definition cannot start ([`super::process::QemuSpec::validate`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// Memory out of range.
    #[error("memory {0} MiB out of range")]
    Memory(u64),
    /// vCPUs out of range.
    #[error("{0} vCPUs out of range")]
    Vcpus(u32),
    /// A kernel, initrd or disk that is not a file.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// Nothing to boot from.
    #[error("neither a kernel nor a disk to boot")]
    NothingToBoot,
}

/// Why the QEMU behind a QMP socket cannot be adopted
/// ([`super::process::QemuProcess::adopt`], and the VM check of
/// [`super::vm::QemuVm::adopt_running`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AdoptError {
    /// The socket cannot be looked at.
    #[error("QMP socket {}: {source}", .socket.display())]
    Socket {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Not a socket.
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Nobody accepts on it.
    #[error("cannot connect to {}: {source}", .socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel names no process behind it.
    #[error("no process behind {}", .0.display())]
    NoProcess(PathBuf),
    /// The process behind it cannot be held or read.
    #[error("process {pid} behind {}: {source}", .socket.display())]
    Process {
        /// Its process id.
        pid: u32,
        /// The socket.
        socket: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// It runs another binary than the allowed one.
    #[error(
        "the process behind {} ({pid}) runs {}, not the allowed QEMU binary {}",
        .socket.display(), .exe.display(), .allowed.display()
    )]
    WrongBinary {
        /// The socket.
        socket: PathBuf,
        /// Its process id.
        pid: u32,
        /// What it runs.
        exe: PathBuf,
        /// The allowed binary.
        allowed: PathBuf,
    },
    /// It runs another VM than the definition.
    #[error("the adopted QEMU {0}")]
    Differs(#[from] Mismatch),
}

/// How an adopted QEMU differs from its definition (QEMU's own words for
/// its status and block drivers).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Mismatch {
    /// Neither running nor paused.
    #[error(
        "is {}; only a running or paused VM can be adopted",
        .0.as_deref().unwrap_or("in an unknown state")
    )]
    Status(Option<String>),
    /// Another memory size.
    #[error(
        "has {} MiB of memory, the definition {want} MiB",
        .found.map_or("an unknown amount of".into(), |b| (b >> 20).to_string())
    )]
    Memory {
        /// Bytes, as QEMU reports them.
        found: Option<u64>,
        /// MiB, as defined.
        want: u64,
    },
    /// Another number of vCPUs.
    #[error("has {found} vCPUs, the definition {want}")]
    Vcpus {
        /// As QEMU reports them.
        found: usize,
        /// As defined.
        want: u32,
    },
    /// Another accelerator.
    #[error(
        "runs on {}, the definition on {}",
        if *.kvm { "kvm" } else { "tcg" },
        if *.kvm { "tcg" } else { "kvm" }
    )]
    Accel {
        /// QEMU runs on KVM.
        kvm: bool,
    },
    /// A disk opened with another driver than raw.
    #[error("opens {file} as {driver}; Convoy migrates raw images")]
    NotRaw {
        /// The file, as QEMU names it.
        file: String,
        /// QEMU's block driver.
        driver: String,
    },
    /// A disk of the definition is not attached.
    #[error("has no disk {}", .0.display())]
    MissingDisk(PathBuf),
    /// A disk the definition does not name.
    #[error("has a disk the definition does not name ({}); it would not migrate", .0.display())]
    ExtraDisk(PathBuf),
    /// A disk with neither a device nor a node name.
    #[error("has a disk with neither a device nor a node name")]
    UnnamedDisk,
}

/// Why a QEMU recorded before a restart cannot be driven again
/// ([`super::process::QemuProcess::reattach`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReattachError {
    /// The recorded process no longer runs.
    #[error("QEMU (pid {pid}) is gone: {why}")]
    Gone {
        /// The recorded pid.
        pid: u32,
        /// How it is known to be gone.
        why: Gone,
    },
    /// A process with the recorded pid and start time runs, but it is not
    /// the recorded QEMU any more.
    #[error("QEMU (pid {pid}) changed: {why}")]
    Changed {
        /// The recorded pid.
        pid: u32,
        /// What changed.
        why: NotTheSame,
    },
    /// The recorded QMP socket is served by another process.
    #[error(
        "the QMP socket {} is not served by QEMU (pid {pid}) but by {}",
        .socket.display(),
        .found.map_or("an unknown process".into(), |p| format!("pid {p}"))
    )]
    Socket {
        /// The socket.
        socket: PathBuf,
        /// The recorded pid.
        pid: u32,
        /// The process behind the socket, if the kernel names one.
        found: Option<u32>,
    },
    /// Reaching it, or checking the VM it runs, failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
}

impl ReattachError {
    /// Whether the recorded QEMU is known to be gone (rather than running
    /// but not verifiable).
    pub fn is_gone(&self) -> bool {
        matches!(self, ReattachError::Gone { .. })
    }
}

/// How a recorded QEMU is known to be gone.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Gone {
    /// It exited.
    #[error("it exited")]
    Exited,
    /// Its pid names another process now, or the host rebooted.
    #[error(transparent)]
    Replaced(NotTheSame),
}
