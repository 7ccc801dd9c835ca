//! QEMU VMs that operators create through the agent: what the agent allows
//! ([`QemuConfig`]), how an operator's [`QemuVmSpec`] becomes a command
//! line without letting the operator run anything else ([`QemuConfig::resolve`]),
//! and the running VM ([`QemuVm`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::ctl::QemuVmSpec;

use super::process::{QemuError, QemuProcess, QemuSpec};

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
}

impl QemuConfig {
    /// Turns an operator's request into a QEMU definition, or says exactly
    /// what is not allowed. No free-form argument reaches the command line.
    pub fn resolve(&self, s: &QemuVmSpec) -> Result<QemuSpec, String> {
        let binary = self
            .binaries
            .iter()
            .find(|b| {
                b.as_os_str() == s.binary.as_str()
                    || b.file_name().is_some_and(|f| f == s.binary.as_str())
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "QEMU binary {:?} is not one this agent allows ({})",
                    s.binary,
                    self.binaries
                        .iter()
                        .map(|b| b.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        if !(16..=1 << 20).contains(&s.memory_mib) {
            return Err(format!("memory {} MiB out of 16..=1048576", s.memory_mib));
        }
        if !(1..=64).contains(&s.vcpus) {
            return Err(format!("{} vCPUs out of 1..=64", s.vcpus));
        }
        if s.append.len() > MAX_APPEND || !s.append.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!(
                "kernel command line must be printable ASCII of at most {MAX_APPEND} bytes"
            ));
        }
        if s.disks.len() > MAX_DISKS {
            return Err(format!("{} disks, at most {MAX_DISKS}", s.disks.len()));
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

    /// A file inside the image directory (after resolving `..` and links).
    fn image(&self, rel: &str) -> Result<PathBuf, String> {
        let root = self
            .images
            .canonicalize()
            .map_err(|e| format!("image directory {}: {e}", self.images.display()))?;
        // One answer for every refusal: an operator learns nothing about
        // files outside the directory.
        let refuse = || format!("image {rel:?} is not a file inside {}", root.display());
        let rel_path = Path::new(rel);
        if rel_path.is_absolute()
            || rel_path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(refuse());
        }
        // Symbolic links inside may still lead out: checked after resolving.
        let p = root.join(rel_path).canonicalize().map_err(|_| refuse())?;
        if !p.starts_with(&root) || !p.is_file() {
            return Err(refuse());
        }
        Ok(p)
    }
}

/// A QEMU VM the agent launched and owns.
#[derive(Debug)]
pub struct QemuVm {
    process: tokio::sync::Mutex<Option<QemuProcess>>,
    exited: AtomicBool,
    dir: PathBuf,
}

impl QemuVm {
    /// Launches `spec` with its runtime files in `dir`.
    pub async fn launch(spec: &QemuSpec, dir: &Path) -> Result<Arc<QemuVm>, QemuError> {
        let p = QemuProcess::launch(spec, dir, false).await?;
        Ok(Arc::new(QemuVm {
            process: tokio::sync::Mutex::new(Some(p)),
            exited: AtomicBool::new(false),
            dir: dir.to_owned(),
        }))
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
                None => true,
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
