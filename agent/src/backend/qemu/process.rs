//! Launching and owning a QEMU process: a VM definition ([`QemuSpec`]) becomes
//! a command line with a QMP socket and a serial log in a runtime directory
//! the agent owns; the process is killed when its handle is dropped, so a
//! failed migration never leaves a stray guest behind.
//!
//! A QEMU someone else started can be *adopted* through its QMP socket
//! ([`QemuProcess::adopt`]): the agent learns the process behind the
//! socket from the kernel (`SO_PEERCRED`), holds it by a pidfd (never by
//! a bare pid, which the kernel may hand to another process once it
//! exits), and checks that it runs an allowed QEMU binary before it says a
//! word of QMP. An adopted QEMU is not killed when its handle is dropped
//! (the agent did not start it); it is quit when it migrates away or is
//! deleted, like a launched one.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::qmp::{Qmp, QmpError, Waited};

/// The accelerator (the wire type: TCG works everywhere; KVM needs
/// `/dev/kvm`, and hung at boot under nested virtualisation on the
/// machines Convoy is tested on).
pub use convoy_protocol::ctl::Accel;

/// A VM QEMU can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSpec {
    /// QEMU binary.
    pub binary: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Kernel to boot directly (with `initrd` and `append`).
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: String,
    /// Disk images (raw or qcow2), attached as virtio disks in order.
    pub disks: Vec<PathBuf>,
    /// Accelerator.
    pub accel: Accel,
    /// Further arguments, passed as they are (after Convoy's own).
    pub extra_args: Vec<String>,
}

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

/// Why a definition cannot start ([`QemuSpec::validate`]).
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
/// ([`QemuProcess::adopt`], and the VM check of
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

/// A running QEMU, its QMP connection and its files.
#[derive(Debug)]
pub struct QemuProcess {
    handle: Handle,
    dir: PathBuf,
    /// The negotiated QMP connection.
    pub qmp: Qmp,
}

/// How the agent holds a QEMU process.
#[derive(Debug)]
enum Handle {
    /// Launched by the agent (killed when dropped).
    Child(Child),
    /// Started by someone else, adopted through its QMP socket.
    Adopted {
        /// Its process id (for display and `/proc`).
        pid: u32,
        /// The process itself: signals go here, and it polls readable
        /// once the process has exited.
        pidfd: OwnedFd,
    },
}

impl Handle {
    fn is_running(&mut self) -> bool {
        match self {
            Handle::Child(c) => matches!(c.try_wait(), Ok(None)),
            Handle::Adopted { pidfd, .. } => {
                let mut fds = [rustix::event::PollFd::new(
                    &*pidfd,
                    rustix::event::PollFlags::IN,
                )];
                let zero = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // Readable (or an error) means it has exited.
                matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
            }
        }
    }

    /// Waits up to `grace` for the process to exit; true once it has.
    async fn exited_within(&mut self, grace: Duration) -> bool {
        match self {
            Handle::Child(c) => tokio::time::timeout(grace, c.wait()).await.is_ok(),
            Handle::Adopted { .. } => {
                let end = Instant::now() + grace;
                while self.is_running() {
                    if Instant::now() >= end {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                true
            }
        }
    }

    async fn kill(&mut self) {
        match self {
            Handle::Child(c) => {
                let _ = c.kill().await;
            }
            Handle::Adopted { pidfd, .. } => {
                let _ = rustix::process::pidfd_send_signal(&*pidfd, rustix::process::Signal::KILL);
                // Reaped by its parent, not by us: wait until it is gone.
                let _ = self.exited_within(Duration::from_secs(5)).await;
            }
        }
    }
}

/// `p` as the value of a QEMU option: a comma is QEMU's option separator,
/// so each is doubled (QEMU's own escape); nothing in a file name can then
/// add an option (`victim.img,file.locking=off` names one file).
fn option_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl QemuSpec {
    /// Checks what can be checked before starting anything.
    pub fn validate(&self) -> Result<(), QemuError> {
        if self.memory_mib == 0 || self.memory_mib > 1 << 20 {
            return Err(SpecError::Memory(self.memory_mib).into());
        }
        if self.vcpus == 0 || self.vcpus > 256 {
            return Err(SpecError::Vcpus(self.vcpus).into());
        }
        for p in self.kernel.iter().chain(&self.initrd).chain(&self.disks) {
            if !p.is_file() {
                return Err(SpecError::Missing(p.clone()).into());
            }
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            return Err(SpecError::NothingToBoot.into());
        }
        Ok(())
    }

    /// The command line, for `dir` (runtime files) and, on a destination,
    /// `-incoming defer`.
    pub fn args(&self, dir: &Path, incoming: bool) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-machine".into(),
            format!(
                "pc,accel={}",
                match self.accel {
                    Accel::Kvm => "kvm",
                    Accel::Tcg => "tcg",
                }
            ),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-serial".into(),
            format!("file:{}", dir.join("serial.log").display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
            "-no-reboot".into(),
        ];
        if let Some(k) = &self.kernel {
            a.extend(["-kernel".into(), k.display().to_string()]);
            if let Some(i) = &self.initrd {
                a.extend(["-initrd".into(), i.display().to_string()]);
            }
            a.extend(["-append".into(), self.append.clone()]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            a.extend([
                "-drive".into(),
                format!(
                    "file={},if=none,id=disk{i},node-name=convoy-disk{i},format=raw,aio=threads",
                    option_value(d)
                ),
                "-device".into(),
                format!("virtio-blk-pci,drive=disk{i},id=vdisk{i}"),
            ]);
        }
        if incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

impl QemuProcess {
    /// Starts QEMU for `spec` with runtime files in `dir` (created; it must
    /// be private to the agent), waits for its QMP socket and negotiates.
    pub async fn launch(spec: &QemuSpec, dir: &Path, incoming: bool) -> Result<Self, QemuError> {
        spec.validate()?;
        crate::private::create_dir_all(dir)?;
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let stderr = crate::private::create_truncate(&dir.join("qemu.stderr"))?;
        // QEMU opens the serial log with the umask's mode; made here first,
        // it keeps ours.
        drop(crate::private::create_truncate(&dir.join("serial.log"))?);
        let mut child = Command::new(&spec.binary)
            .args(spec.args(dir, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: spec.binary.clone(),
                source,
            })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let stderr = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                return Err(QemuError::Exited {
                    status,
                    stderr: stderr.lines().last().unwrap_or("").to_owned(),
                });
            }
            if sock.exists() {
                // QEMU may accept on the socket and then hang before its
                // greeting (KVM under nested virtualisation): bounded.
                let left = deadline.saturating_duration_since(Instant::now());
                if let Ok(Ok(qmp)) = tokio::time::timeout(left, Qmp::connect(&sock)).await {
                    return Ok(QemuProcess {
                        handle: Handle::Child(child),
                        dir: dir.to_owned(),
                        qmp,
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(QemuError::Qmp(QmpError::Timeout(Waited::Socket)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Adopts the QEMU listening on the QMP socket `sock`, if it runs
    /// `binary` (an allowed one); `dir` becomes its runtime directory (for
    /// the migration sockets; its serial console stays wherever it was).
    /// Nothing but the process's identity is checked here: the VM it runs
    /// is checked against its definition by the caller.
    pub async fn adopt(sock: &Path, binary: &Path, dir: &Path) -> Result<Self, QemuError> {
        let socket = || sock.to_owned();
        let meta = std::fs::metadata(sock).map_err(|source| AdoptError::Socket {
            socket: socket(),
            source,
        })?;
        if !meta.file_type().is_socket() {
            return Err(AdoptError::NotASocket(socket()).into());
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(sock))
            .await
            .map_err(|_| QemuError::Qmp(QmpError::Timeout(Waited::Socket)))?
            .map_err(|source| AdoptError::Connect {
                socket: socket(),
                source,
            })?;
        // The process that listens on the socket, from the kernel.
        let pid = stream
            .peer_cred()?
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| AdoptError::NoProcess(socket()))?;
        let raw = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| AdoptError::NoProcess(socket()))?;
        let process = |source| AdoptError::Process {
            pid,
            socket: socket(),
            source,
        };
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
            .map_err(|e| process(e.into()))?;
        // Read once the pidfd holds the process: the pid cannot be another
        // process's by now.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(process)?;
        let allowed = binary.canonicalize().unwrap_or_else(|_| binary.to_owned());
        if exe != allowed {
            return Err(AdoptError::WrongBinary {
                socket: socket(),
                pid,
                exe,
                allowed,
            }
            .into());
        }
        let qmp = tokio::time::timeout(Duration::from_secs(10), Qmp::handshake(stream))
            .await
            .map_err(|_| QemuError::Qmp(QmpError::Timeout(Waited::Greeting)))??;
        crate::private::create_dir_all(dir)?;
        Ok(QemuProcess {
            handle: Handle::Adopted { pid, pidfd },
            dir: dir.to_owned(),
            qmp,
        })
    }

    /// The guest's serial console output.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU's process id.
    pub fn pid(&self) -> Option<u32> {
        match &self.handle {
            Handle::Child(c) => c.id(),
            Handle::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Whether the agent adopted this QEMU rather than launching it.
    pub fn is_adopted(&self) -> bool {
        matches!(self.handle, Handle::Adopted { .. })
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        self.handle.is_running()
    }

    /// Asks QEMU to quit, then kills it if it has not within 5 s.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp.execute("quit", None)).await;
        if !self.handle.exited_within(Duration::from_secs(5)).await {
            self.handle.kill().await;
        }
    }

    /// Kills QEMU at once (a crash, for tests; cleanup on failure).
    pub async fn kill(mut self) {
        self.handle.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_path_cannot_add_options_to_the_drive() {
        let spec = QemuSpec {
            binary: "qemu-system-x86_64".into(),
            memory_mib: 16,
            vcpus: 1,
            kernel: None,
            initrd: None,
            append: String::new(),
            disks: vec!["/img/victim.img,file.locking=off".into()],
            accel: Accel::Tcg,
            extra_args: Vec::new(),
        };
        let args = spec.args(Path::new("/run/vm"), true);
        let drive = args
            .iter()
            .skip_while(|a| *a != "-drive")
            .nth(1)
            .expect("a -drive");
        assert!(
            drive.starts_with("file=/img/victim.img,,file.locking=off,if=none,"),
            "{drive}"
        );
    }
}
