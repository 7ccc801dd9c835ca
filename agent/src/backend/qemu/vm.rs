//! QEMU VMs that operators create through the agent: what the agent allows
//! ([`QemuConfig`]), how an operator's [`QemuVmSpec`] becomes a command
//! line without letting the operator run anything else ([`QemuConfig::resolve`]),
//! and the running VM ([`QemuVm`]): what the agent records of it to find it
//! again after a restart ([`QemuVmRecord`]) and how it does
//! ([`QemuVm::reattach`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::ctl::QemuVmSpec;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::identity::ProcessIdentity;
use super::process::{AdoptError, Mismatch, QemuError, QemuProcess, QemuSpec, ReattachError};
use super::qmp::{QmpError, Waited};

/// Longest kernel command line accepted.
pub const MAX_APPEND: usize = 1024;
/// Most disks per VM.
pub const MAX_DISKS: usize = 8;

/// What an agent lets operators run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// QEMU binaries operators may name (by file name or full path).
    pub binaries: Vec<PathBuf>,
    /// The only directory kernels, initrds and disk images may come from.
    pub images: PathBuf,
    /// Where each VM's QMP socket and serial log live (one directory per
    /// VM, created by the agent).
    pub runtime: PathBuf,
    /// When a pre-copy migration of more than one stream uses QEMU's
    /// multifd channels.
    pub multifd: Multifd,
}

/// When a QEMU pre-copy migration asked for more than one stream uses
/// QEMU's multifd channels through the tunnel (the agent's
/// `--qemu-multifd`; [`multifd_busy_waits`] says which QEMU spins).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Multifd {
    /// Not when the source QEMU's multifd sender busy-waits for a free
    /// channel (QEMU before 8.1): a tunnel that pushes back would keep it
    /// spinning on a core the agents need. One channel then.
    #[default]
    Auto,
    /// Whenever more than one stream is asked for.
    Always,
}

/// Whether QEMU `version` (`major.minor.micro`, as its QMP greeting
/// gives it) is one whose multifd sender, once every channel is busy
/// writing, spins on their locks instead of sleeping: a semaphore that
/// each sync posts and nothing waits for lets `multifd_send_pages` go
/// round the channels without blocking (reported and patched on
/// qemu-devel in April 2023; QEMU 8.1 has the fix). A version that cannot
/// be read (the greeting reads a missing number as 0) is taken as
/// affected: one channel works with every QEMU.
pub fn multifd_busy_waits(version: &str) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < (8, 1),
        _ => true,
    }
}

/// Why an operator's QEMU definition is not allowed
/// ([`QemuConfig::resolve`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// A binary the agent does not allow.
    #[error(
        "QEMU binary {name:?} is not one this agent allows ({})",
        .allowed.iter().map(|b| b.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Binary {
        /// The binary as the operator named it.
        name: String,
        /// The binaries the agent allows.
        allowed: Vec<PathBuf>,
    },
    /// Memory out of range.
    #[error("memory {0} MiB out of 16..=1048576")]
    Memory(u64),
    /// vCPUs out of range.
    #[error("{0} vCPUs out of 1..=64")]
    Vcpus(u32),
    /// A kernel command line too long or not printable ASCII.
    #[error("kernel command line must be printable ASCII of at most {MAX_APPEND} bytes")]
    Append,
    /// Too many disks.
    #[error("{0} disks, at most {MAX_DISKS}")]
    Disks(usize),
    /// A kernel, initrd or disk that is not a file in the image directory.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Why a name does not lead to a file in the image directory, or cannot
/// become a new one there.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image directory itself cannot be used.
    #[error("image directory {}: {source}", .dir.display())]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Not a file inside the directory (one answer for every refusal: an
    /// operator learns nothing about files outside it).
    #[error("image {name:?} is not a file inside {}", .root.display())]
    NotInside {
        /// The name as given.
        name: String,
        /// The image directory.
        root: PathBuf,
    },
    /// A disk arriving by migration that cannot be created there.
    #[error("disk {name:?} cannot be created inside {}", .root.display())]
    CannotCreate {
        /// The name as given.
        name: String,
        /// The image directory.
        root: PathBuf,
    },
    /// A disk arriving by migration whose file exists.
    #[error("disk {0:?} already exists here; refusing to overwrite it")]
    Exists(String),
}

impl QemuConfig {
    /// Turns an operator's request into a QEMU definition, or says exactly
    /// what is not allowed. No free-form argument reaches the command line.
    pub fn resolve(&self, s: &QemuVmSpec) -> Result<QemuSpec, ResolveError> {
        let binary = self
            .binaries
            .iter()
            .find(|b| {
                b.as_os_str() == s.binary.as_str()
                    || b.file_name().is_some_and(|f| f == s.binary.as_str())
            })
            .cloned()
            .ok_or_else(|| ResolveError::Binary {
                name: s.binary.clone(),
                allowed: self.binaries.clone(),
            })?;
        if !(16..=1 << 20).contains(&s.memory_mib) {
            return Err(ResolveError::Memory(s.memory_mib));
        }
        if !(1..=64).contains(&s.vcpus) {
            return Err(ResolveError::Vcpus(s.vcpus));
        }
        if s.append.len() > MAX_APPEND || !s.append.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ResolveError::Append);
        }
        if s.disks.len() > MAX_DISKS {
            return Err(ResolveError::Disks(s.disks.len()));
        }
        let image = |rel: &str| self.image(rel);
        Ok(QemuSpec {
            binary,
            memory_mib: s.memory_mib,
            vcpus: s.vcpus,
            kernel: s.kernel.as_deref().map(image).transpose()?,
            initrd: s.initrd.as_deref().map(image).transpose()?,
            append: s.append.clone(),
            disks: s.disks.iter().map(|d| image(d)).collect::<Result<_, _>>()?,
            accel: s.accel,
            extra_args: Vec::new(),
        })
    }

    /// Where a disk arriving by migration is created: a new file inside
    /// the image directory (never an existing one, never outside).
    pub fn new_disk(&self, rel: &str) -> Result<PathBuf, ImageError> {
        let refuse = |root: &Path| ImageError::CannotCreate {
            name: rel.to_owned(),
            root: root.to_owned(),
        };
        let (root, rel_path) = self.relative(rel, refuse)?;
        let refuse = || refuse(&root);
        let (Some(parent), Some(file)) = (rel_path.parent(), rel_path.file_name()) else {
            return Err(refuse());
        };
        let parent = root.join(parent).canonicalize().map_err(|_| refuse())?;
        if !parent.starts_with(&root) {
            return Err(refuse());
        }
        let p = parent.join(file);
        if p.symlink_metadata().is_ok() {
            return Err(ImageError::Exists(rel.to_owned()));
        }
        Ok(p)
    }

    /// The canonical image directory and `rel` as a plain relative path
    /// (no root, no `..`, no `.`), or `refuse`'s message.
    fn relative<'r>(
        &self,
        rel: &'r str,
        refuse: impl Fn(&Path) -> ImageError,
    ) -> Result<(PathBuf, &'r Path), ImageError> {
        let root = self.images.canonicalize().map_err(|e| self.directory(e))?;
        let rel_path = Path::new(rel);
        // A comma is QEMU option syntax: no image or disk name carries one
        // (the command line escapes it too), nor control characters.
        if rel.contains(',') || rel.chars().any(char::is_control) {
            return Err(refuse(&root));
        }
        if rel_path.is_absolute()
            || rel_path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(refuse(&root));
        }
        Ok((root, rel_path))
    }

    /// Bytes free for unprivileged use in the image directory.
    pub fn free_bytes(&self) -> Result<u64, ImageError> {
        crate::private::free_bytes(&self.images).map_err(|e| self.directory(e))
    }

    fn directory(&self, source: std::io::Error) -> ImageError {
        ImageError::Directory {
            dir: self.images.clone(),
            source,
        }
    }

    /// A file inside the image directory (after resolving `..` and links).
    fn image(&self, rel: &str) -> Result<PathBuf, ImageError> {
        // One answer for every refusal: an operator learns nothing about
        // files outside the directory.
        let refuse = |root: &Path| ImageError::NotInside {
            name: rel.to_owned(),
            root: root.to_owned(),
        };
        let (root, rel_path) = self.relative(rel, refuse)?;
        let refuse = || refuse(&root);
        // Symbolic links inside may still lead out: checked after resolving.
        let p = root.join(rel_path).canonicalize().map_err(|_| refuse())?;
        if !p.starts_with(&root) || !p.is_file() {
            return Err(refuse());
        }
        Ok(p)
    }
}

/// Checks over QMP that `p` runs the VM `spec` defines, running or
/// paused; returns whether it is paused and the block device of each of
/// `spec.disks`.
async fn matches_spec(
    p: &mut QemuProcess,
    spec: &QemuSpec,
) -> Result<(bool, Vec<String>), QemuError> {
    let (status, devices) = inspect(p, spec).await?;
    match status.as_deref() {
        Some("running") => Ok((false, devices)),
        Some("paused") => Ok((true, devices)),
        _ => Err(QemuError::Adopt(AdoptError::Differs(Mismatch::Status(
            status,
        )))),
    }
}

/// Checks over QMP that `p` runs the VM `spec` defines (memory, vCPUs,
/// accelerator, exactly its disks, raw); returns its run status in QEMU's
/// words (`running`, `paused`, `postmigrate`, …) and the block device of
/// each of `spec.disks`.
async fn inspect(
    p: &mut QemuProcess,
    spec: &QemuSpec,
) -> Result<(Option<String>, Vec<String>), QemuError> {
    use serde_json::Value;
    let differs = |m: Mismatch| Err(QemuError::Adopt(AdoptError::Differs(m)));
    let status = p.qmp.execute("query-status", None).await?;
    let status = status
        .get("status")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mem = p.qmp.execute("query-memory-size-summary", None).await?;
    let base = mem.get("base-memory").and_then(Value::as_u64);
    if base != Some(spec.memory_mib << 20) {
        return differs(Mismatch::Memory {
            found: base,
            want: spec.memory_mib,
        });
    }
    let cpus = p.qmp.execute("query-cpus-fast", None).await?;
    let n = cpus.as_array().map_or(0, Vec::len);
    if n != spec.vcpus as usize {
        return differs(Mismatch::Vcpus {
            found: n,
            want: spec.vcpus,
        });
    }
    let kvm = p.qmp.execute("query-kvm", None).await?;
    let on_kvm = kvm.get("enabled").and_then(Value::as_bool) == Some(true);
    if on_kvm != (spec.accel == super::process::Accel::Kvm) {
        return differs(Mismatch::Accel { kvm: on_kvm });
    }
    // Every disk with a medium, by the file it reads: exactly the
    // definition's (one it does not name would not migrate).
    let blocks = p.qmp.execute("query-block", None).await?;
    let mut found: Vec<(PathBuf, String)> = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else {
            continue;
        };
        let file = ins.get("file").and_then(Value::as_str).unwrap_or_default();
        let name = match b.get("device").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => d,
            _ => ins
                .get("node-name")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        };
        let path = Path::new(file);
        let drv = ins.get("drv").and_then(Value::as_str).unwrap_or("?");
        if drv != "raw" {
            // Destinations open every disk as raw.
            return differs(Mismatch::NotRaw {
                file: file.to_owned(),
                driver: drv.to_owned(),
            });
        }
        found.push((
            path.canonicalize().unwrap_or_else(|_| path.to_owned()),
            name.to_owned(),
        ));
    }
    let mut devices = Vec::with_capacity(spec.disks.len());
    for d in &spec.disks {
        match found.iter().position(|(f, _)| f == d) {
            Some(i) => devices.push(found.remove(i).1),
            None => return differs(Mismatch::MissingDisk(d.clone())),
        }
    }
    if let Some((f, _)) = found.first() {
        return differs(Mismatch::ExtraDisk(f.clone()));
    }
    if devices.iter().any(String::is_empty) {
        return differs(Mismatch::UnnamedDisk);
    }
    Ok((status, devices))
}

/// Longest a QMP command may take before the agent gives up on it.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the agent records of a QEMU VM to find it again after a restart:
/// its definitions, its files, and the process as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVmRecord {
    /// The operator's definition.
    pub definition: QemuVmSpec,
    /// The resolved command-line definition.
    pub spec: QemuSpec,
    /// Its runtime directory.
    pub dir: PathBuf,
    /// Its QMP socket (in `dir`, unless it was adopted).
    pub qmp_socket: PathBuf,
    /// The block device of each disk.
    pub block_devices: Vec<String>,
    /// Adopted through its QMP socket rather than launched by the agent.
    pub adopted: bool,
    /// The process.
    pub process: ProcessIdentity,
}

/// A QEMU VM the agent launched (or adopted) and owns.
#[derive(Debug)]
pub struct QemuVm {
    process: tokio::sync::Mutex<Option<QemuProcess>>,
    exited: AtomicBool,
    /// Left running when the agent lets go of it (see
    /// [`QemuVm::outlive_agent`]).
    outlive: AtomicBool,
    dir: PathBuf,
    qmp_socket: PathBuf,
    identity: ProcessIdentity,
    /// The operator's definition (paths relative to the image directory):
    /// what a destination needs to launch the same VM.
    pub definition: QemuVmSpec,
    /// The resolved command-line definition.
    pub spec: QemuSpec,
    /// The block device (or node) of each of `spec.disks`, in order: what
    /// a disk mirror starts from.
    pub block_devices: Vec<String>,
    /// Adopted through its QMP socket rather than launched here.
    pub adopted: bool,
    /// QEMU's version, from its QMP greeting (`major.minor.micro`).
    pub version: String,
}

impl QemuVm {
    /// Launches `spec` (resolved from `definition`) with its runtime files
    /// in `dir`.
    pub async fn launch(
        definition: QemuVmSpec,
        spec: QemuSpec,
        dir: &Path,
    ) -> Result<Arc<QemuVm>, QemuError> {
        let p = QemuProcess::launch(&spec, dir, false).await?;
        Ok(Self::adopt(p, definition, spec))
    }

    /// Takes ownership of a running process the agent launched (a VM
    /// created or arrived here).
    pub fn adopt(p: QemuProcess, definition: QemuVmSpec, spec: QemuSpec) -> Arc<QemuVm> {
        let block_devices = (0..spec.disks.len()).map(|i| format!("disk{i}")).collect();
        Arc::new(Self::holding(p, definition, spec, block_devices))
    }

    fn holding(
        p: QemuProcess,
        definition: QemuVmSpec,
        spec: QemuSpec,
        block_devices: Vec<String>,
    ) -> QemuVm {
        QemuVm {
            dir: p.dir().to_owned(),
            qmp_socket: p.qmp_socket().to_owned(),
            identity: p.identity().clone(),
            adopted: p.is_adopted(),
            version: p.qmp.version.clone(),
            block_devices,
            process: tokio::sync::Mutex::new(Some(p)),
            exited: AtomicBool::new(false),
            outlive: AtomicBool::new(false),
            definition,
            spec,
        }
    }

    /// Adopts the QEMU listening on `qmp_socket`: it must run `spec`'s
    /// binary and the VM `spec` defines (memory, vCPUs, accelerator and
    /// exactly its disks), running or paused. Returns the VM and whether
    /// it is paused. A QEMU that differs is refused with what differs, and
    /// left as it was.
    pub async fn adopt_running(
        definition: QemuVmSpec,
        spec: QemuSpec,
        qmp_socket: &Path,
        dir: &Path,
    ) -> Result<(Arc<QemuVm>, bool), QemuError> {
        let mut p = QemuProcess::adopt(qmp_socket, &spec.binary, dir).await?;
        let checked = tokio::time::timeout(QMP_TIMEOUT, matches_spec(&mut p, &spec)).await;
        let (paused, block_devices) = match checked {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(QemuError::Qmp(QmpError::Timeout(Waited::CheckingVm))),
        };
        Ok((
            Arc::new(Self::holding(p, definition, spec, block_devices)),
            paused,
        ))
    }

    /// Finds the VM `record` describes again, after the agent restarted:
    /// the same process ([`QemuProcess::reattach`]: pid, start time,
    /// executable, command line, the QMP socket served by it), running the
    /// same VM (memory, vCPUs, accelerator, exactly its disks). Returns it
    /// with its run status in QEMU's words (`running`, `paused`,
    /// `postmigrate`, …): what the VM's state is then is the caller's
    /// decision. Left running when dropped.
    pub async fn reattach(record: &QemuVmRecord) -> Result<(Arc<QemuVm>, String), ReattachError> {
        let mut p = QemuProcess::reattach(&record.process, &record.qmp_socket, &record.dir).await?;
        let (status, block_devices) =
            match tokio::time::timeout(QMP_TIMEOUT, inspect(&mut p, &record.spec)).await {
                Ok(r) => r?,
                Err(_) => return Err(QemuError::Qmp(QmpError::Timeout(Waited::CheckingVm)).into()),
            };
        let mut vm = Self::holding(
            p,
            record.definition.clone(),
            record.spec.clone(),
            block_devices,
        );
        vm.adopted = record.adopted;
        vm.outlive = AtomicBool::new(true);
        Ok((Arc::new(vm), status.unwrap_or_default()))
    }

    /// What the agent records to find this VM again after a restart.
    pub fn record(&self) -> QemuVmRecord {
        QemuVmRecord {
            definition: self.definition.clone(),
            spec: self.spec.clone(),
            dir: self.dir.clone(),
            qmp_socket: self.qmp_socket.clone(),
            block_devices: self.block_devices.clone(),
            adopted: self.adopted,
            process: self.identity.clone(),
        }
    }

    /// From now on QEMU is left running when the agent lets go of this
    /// VM without stopping it (the agent exits): called once the VM is
    /// recorded durably, so a restarted agent finds it again. Until then a
    /// launched QEMU dies with its handle.
    pub fn outlive_agent(&self) {
        self.outlive.store(true, Ordering::Relaxed);
    }

    /// The QEMU process as the kernel names it.
    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// The runtime directory (QMP socket, serial log, migration sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs a QMP command, bounded by [`QMP_TIMEOUT`].
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        self.run(false, command, arguments).await
    }

    /// Like [`QemuVm::execute`], out of band when QEMU offers it (see
    /// [`super::qmp::Qmp::execute_oob`]).
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        self.run(true, command, arguments).await
    }

    async fn run(
        &self,
        oob: bool,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        let mut g = self.process.lock().await;
        let p = g.as_mut().ok_or(QemuError::Qmp(QmpError::Closed))?;
        let qmp = &mut p.qmp;
        let call = async {
            if oob {
                qmp.execute_oob(command, arguments).await
            } else {
                qmp.execute(command, arguments).await
            }
        };
        match tokio::time::timeout(QMP_TIMEOUT, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(QemuError::Qmp(QmpError::Timeout(Waited::Command(
                command.to_owned(),
            )))),
        }
    }

    /// The first event `wanted` takes within `timeout` (`None`: none
    /// came), kept or new; the others are kept. Holds this QEMU's QMP
    /// connection meanwhile: other commands wait.
    pub async fn next_event(
        &self,
        wanted: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> Result<Option<serde_json::Value>, QemuError> {
        let mut g = self.process.lock().await;
        let p = g.as_mut().ok_or(QemuError::Qmp(QmpError::Closed))?;
        Ok(p.qmp.next_event(wanted, timeout).await?)
    }

    /// QMP events received so far.
    pub async fn take_events(&self) -> Vec<serde_json::Value> {
        match self.process.lock().await.as_mut() {
            Some(p) => p.qmp.take_events(),
            None => Vec::new(),
        }
    }

    /// Kills QEMU at once and removes its runtime directory.
    pub async fn kill(&self) {
        if let Some(p) = self.process.lock().await.take() {
            p.kill().await;
        }
        self.exited.store(true, Ordering::Relaxed);
        self.log_stderr("killed");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Logs what QEMU wrote on its standard error, if anything, before its
    /// runtime directory goes: QEMU says there why it failed a migration
    /// or closed a channel, and nowhere else.
    fn log_stderr(&self, how: &str) {
        if let Some(tail) = stderr_tail(&self.dir.join("qemu.stderr")) {
            tracing::warn!(dir = %self.dir.display(), "QEMU {how}; its standard error ended with:\n{tail}");
        }
    }

    /// Whether the process is still alive (checked now).
    pub async fn alive(&self) -> bool {
        match self.process.lock().await.as_mut() {
            Some(p) => p.is_running(),
            None => false,
        }
    }

    /// Whether QEMU has exited, allowing up to `grace` for it: a killed
    /// QEMU's QMP socket breaks a moment before its exit can be seen, so a
    /// QMP failure is followed by this check rather than by [`QemuVm::alive`].
    pub async fn exited_within(&self, grace: Duration) -> bool {
        let end = std::time::Instant::now() + grace;
        loop {
            if !self.alive().await {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// False once QEMU has exited (checked by [`QemuVm::watch`]).
    pub fn is_running(&self) -> bool {
        !self.exited.load(Ordering::Relaxed)
    }

    /// The guest's serial console output.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// Polls the process every `every` until it exits, then calls
    /// `on_exit` once.
    pub async fn watch(self: Arc<Self>, every: Duration, on_exit: impl FnOnce()) {
        loop {
            tokio::time::sleep(every).await;
            let mut g = self.process.lock().await;
            let gone = match g.as_mut() {
                Some(p) => !p.is_running(),
                // Stopped or killed by the agent: not an exit to report.
                None => return,
            };
            if gone {
                self.exited.store(true, Ordering::Relaxed);
                drop(g);
                on_exit();
                return;
            }
        }
    }

    /// The QEMU process id, while it runs.
    pub async fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .await
            .as_ref()
            .and_then(QemuProcess::pid)
    }

    /// Quits QEMU (killing it after a grace period) and removes its runtime
    /// directory.
    pub async fn stop(&self) {
        if let Some(p) = self.process.lock().await.take() {
            p.quit().await;
        }
        self.exited.store(true, Ordering::Relaxed);
        self.log_stderr("stopped");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// At most this much of the end of QEMU's standard error is logged.
pub const STDERR_TAIL: u64 = 4096;

/// The last [`STDERR_TAIL`] bytes of the file at `path` (a QEMU's
/// `qemu.stderr`), as text; `None` when it is missing or holds only white
/// space.
pub fn stderr_tail(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL)))
        .ok()?;
    let mut buf = Vec::new();
    f.take(STDERR_TAIL).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if *self.outlive.get_mut() {
            if let Some(p) = self.process.get_mut() {
                p.outlive_agent();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_and_disk_names_with_qemu_syntax_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("victim.img"), b"x").unwrap();
        std::fs::write(dir.path().join("a,b.img"), b"x").unwrap();
        let cfg = QemuConfig {
            binaries: Vec::new(),
            images: dir.path().into(),
            runtime: dir.path().join("run"),
            multifd: Multifd::Auto,
        };
        assert!(cfg.image("victim.img").is_ok());
        for bad in [
            "a,b.img",
            "victim.img,file.locking=off",
            "x\n.img",
            "../victim.img",
        ] {
            assert!(cfg.image(bad).is_err(), "{bad}");
            assert!(cfg.new_disk(bad).is_err(), "{bad}");
        }
        assert!(cfg.new_disk("new.img").is_ok());
    }

    #[test]
    fn the_end_of_qemus_standard_error_is_what_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.stderr");
        assert_eq!(stderr_tail(&path), None, "no file");
        std::fs::write(&path, b" \n\t\n").unwrap();
        assert_eq!(stderr_tail(&path), None, "only white space");
        let mut long = "x".repeat(10_000);
        long.push_str("\nqemu-system-x86_64: load of migration failed: Input/output error\n");
        std::fs::write(&path, &long).unwrap();
        let tail = stderr_tail(&path).unwrap();
        assert!(tail.len() <= 4096, "{}", tail.len());
        assert!(
            tail.ends_with("load of migration failed: Input/output error"),
            "{tail}"
        );
    }
}
