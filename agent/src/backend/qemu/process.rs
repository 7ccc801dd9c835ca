//! Launching and owning a QEMU process: a VM definition ([`QemuSpec`]) becomes
//! a command line with a QMP socket and a serial log in a runtime directory
//! the agent owns. A launched QEMU is killed when its handle is dropped, so
//! a failed migration never leaves a stray guest behind — until the VM is
//! recorded in the agent's durable registry ([`QemuProcess::outlive_agent`]):
//! from then on it outlives the agent, which finds it again when it starts
//! ([`QemuProcess::reattach`]). It runs in a process group of its own, so
//! a Ctrl-C meant for the agent in the operator's terminal does not reach
//! it, and nothing ties its life to the agent's (no parent-death signal,
//! no pipe to the agent).
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
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::identity::ProcessIdentity;
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

pub use super::error::{AdoptError, Gone, Mismatch, QemuError, ReattachError, SpecError};

/// A running QEMU, its QMP connection and its files.
#[derive(Debug)]
pub struct QemuProcess {
    handle: Handle,
    dir: PathBuf,
    qmp_socket: PathBuf,
    identity: ProcessIdentity,
    /// Left running when dropped (adopted, or recorded durably).
    outlive: bool,
    /// The negotiated QMP connection.
    pub qmp: Qmp,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // A QEMU the agent launched and no registry records would be an
        // orphan nobody finds again: it goes with its handle.
        if let (false, Handle::Child(c)) = (self.outlive, &mut self.handle) {
            let _ = c.start_kill();
        }
    }
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

/// The file in a runtime directory that holds the command line QEMU was
/// launched with (NUL-separated, as `/proc/PID/cmdline`).
pub const LAUNCHED: &str = "cmdline";

/// A QEMU being launched: killed if dropped before it is handed over.
struct Starting(Option<Child>);

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// The unix socket in a runtime directory connected to the guest's
/// second serial port (ttyS1).
pub const SERVICE_SOCKET: &str = "svc.sock";

/// `p` as the value of a QEMU option: a comma is QEMU's option separator,
/// so each is doubled (QEMU's own escape); nothing in a file name can then
/// add an option (`victim.img,file.locking=off` names one file).
pub(crate) fn option_value(p: &Path) -> String {
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
            // The second serial port (the guest's ttyS1), a unix socket
            // in the runtime directory: the channel by which a harness
            // reaches a service in the guest (the test guest answers
            // requests there). QEMU listens; nobody connected, the
            // guest's writes are dropped.
            "-chardev".into(),
            format!(
                "socket,id=svc,path={},server=on,wait=off",
                option_value(&dir.join(SERVICE_SOCKET))
            ),
            "-serial".into(),
            "chardev:svc".into(),
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
        // QEMU will not listen where a stale socket is left.
        let _ = std::fs::remove_file(dir.join(SERVICE_SOCKET));
        let stderr = crate::private::create_truncate(&dir.join("qemu.stderr"))?;
        // QEMU opens the serial log with the umask's mode; made here first,
        // it keeps ours.
        drop(crate::private::create_truncate(&dir.join("serial.log"))?);
        let args = spec.args(dir, incoming);
        // What was launched, kept beside its files: a restarted agent that
        // finds the directory without a VM that holds it knows what to
        // remove (a destination's disks) even if QEMU has exited.
        {
            use std::io::Write;
            let mut f = crate::private::create_truncate(&dir.join(LAUNCHED))?;
            for a in std::iter::once(spec.binary.display().to_string()).chain(args.iter().cloned())
            {
                f.write_all(a.as_bytes())?;
                f.write_all(&[0])?;
            }
        }
        let child = Command::new(&spec.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a Ctrl-C in the agent's terminal is
            // not for it. Killed on drop by `QemuProcess` (and `Starting`),
            // not by tokio, so that a recorded VM can outlive the agent.
            .process_group(0)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: spec.binary.clone(),
                source,
            })?;
        // Killed if this future is dropped or fails before the end.
        let mut starting = Starting(Some(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let Some(child) = starting.0.as_mut() else {
                return Err(QemuError::Qmp(QmpError::Closed));
            };
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
                    // Read once QEMU serves QMP: it has exec'd by then, and
                    // it is our child, so the pid is not reused before the
                    // read.
                    let pid = child.id().ok_or(QemuError::Qmp(QmpError::Closed))?;
                    let identity = ProcessIdentity::read(pid)?;
                    let Some(child) = starting.0.take() else {
                        return Err(QemuError::Qmp(QmpError::Closed));
                    };
                    return Ok(QemuProcess {
                        handle: Handle::Child(child),
                        dir: dir.to_owned(),
                        qmp_socket: sock,
                        identity,
                        outlive: false,
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
        let identity = ProcessIdentity::read(pid).map_err(process)?;
        let allowed = binary.canonicalize().unwrap_or_else(|_| binary.to_owned());
        if identity.exe != allowed {
            return Err(AdoptError::WrongBinary {
                socket: socket(),
                pid,
                exe: identity.exe,
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
            qmp_socket: sock.to_owned(),
            identity,
            outlive: true,
            qmp,
        })
    }

    /// Finds again the QEMU `recorded` names, after the agent restarted:
    /// the process with that pid *and* start time (in this boot), running
    /// the same executable and command line, serving QMP on `sock` (the
    /// kernel says who accepts there). Held by a pidfd, never killed when
    /// dropped. What VM it runs is checked by the caller.
    pub async fn reattach(
        recorded: &ProcessIdentity,
        sock: &Path,
        dir: &Path,
    ) -> Result<Self, ReattachError> {
        let pid = recorded.pid;
        let gone = |why| ReattachError::Gone { pid, why };
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(gone(Gone::Exited))?;
        let pidfd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Err(gone(Gone::Exited)),
            Err(e) => return Err(QemuError::Io(e.into()).into()),
        };
        let mut handle = Handle::Adopted { pid, pidfd };
        // Exited but not yet reaped (by whoever inherited it): gone too.
        if !handle.is_running() {
            return Err(gone(Gone::Exited));
        }
        let now = match ProcessIdentity::read(pid) {
            Ok(id) => id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone(Gone::Exited)),
            Err(e) => return Err(QemuError::Io(e).into()),
        };
        match recorded.check(&now) {
            Ok(()) => {}
            Err(why) if why.is_gone() => return Err(gone(Gone::Replaced(why))),
            Err(why) => return Err(ReattachError::Changed { pid, why }),
        }
        let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(sock))
            .await
            .map_err(|_| QemuError::Qmp(QmpError::Timeout(Waited::Socket)))?
            .map_err(|source| {
                QemuError::from(AdoptError::Connect {
                    socket: sock.to_owned(),
                    source,
                })
            })?;
        let found = stream
            .peer_cred()
            .map_err(QemuError::Io)?
            .pid()
            .and_then(|p| u32::try_from(p).ok());
        if found != Some(pid) {
            return Err(ReattachError::Socket {
                socket: sock.to_owned(),
                pid,
                found,
            });
        }
        let qmp = tokio::time::timeout(Duration::from_secs(10), Qmp::handshake(stream))
            .await
            .map_err(|_| QemuError::Qmp(QmpError::Timeout(Waited::Greeting)))?
            .map_err(QemuError::Qmp)?;
        Ok(QemuProcess {
            handle,
            dir: dir.to_owned(),
            qmp_socket: sock.to_owned(),
            identity: now,
            outlive: true,
            qmp,
        })
    }

    /// The process as the kernel names it (pid, start time, command line).
    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// Its QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// From now on the process is left running when its handle is dropped
    /// (the agent's registry records it, so a restarted agent finds it).
    pub fn outlive_agent(&mut self) {
        self.outlive = true;
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
