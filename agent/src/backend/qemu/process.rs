//! Launching and owning a QEMU process: a VM definition ([`QemuSpec`]) becomes
//! a command line with a QMP socket and a serial log in a runtime directory
//! the agent owns; the process is killed when its handle is dropped, so a
//! failed migration never leaves a stray guest behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::process::{Child, Command};

use super::qmp::{Qmp, QmpError};

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
    Spec(String),
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
        status: String,
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

/// A running QEMU, its QMP connection and its files.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    dir: PathBuf,
    /// The negotiated QMP connection.
    pub qmp: Qmp,
}

impl QemuSpec {
    /// Checks what can be checked before starting anything.
    pub fn validate(&self) -> Result<(), QemuError> {
        let bad = |s: String| Err(QemuError::Spec(s));
        if self.memory_mib == 0 || self.memory_mib > 1 << 20 {
            return bad(format!("memory {} MiB out of range", self.memory_mib));
        }
        if self.vcpus == 0 || self.vcpus > 256 {
            return bad(format!("{} vCPUs out of range", self.vcpus));
        }
        for p in self.kernel.iter().chain(&self.initrd).chain(&self.disks) {
            if !p.is_file() {
                return bad(format!("{} does not exist", p.display()));
            }
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            return bad("neither a kernel nor a disk to boot".into());
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
                    d.display()
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
        std::fs::create_dir_all(dir)?;
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let stderr = std::fs::File::create(dir.join("qemu.stderr"))?;
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
                    status: status.to_string(),
                    stderr: stderr.lines().last().unwrap_or("").to_owned(),
                });
            }
            if sock.exists() {
                // QEMU may accept on the socket and then hang before its
                // greeting (KVM under nested virtualisation): bounded.
                let left = deadline.saturating_duration_since(Instant::now());
                if let Ok(Ok(qmp)) = tokio::time::timeout(left, Qmp::connect(&sock)).await {
                    return Ok(QemuProcess {
                        child,
                        dir: dir.to_owned(),
                        qmp,
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(QemuError::Qmp(QmpError::Timeout("QMP socket".into())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        self.child.id()
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks QEMU to quit, then kills it if it has not within 5 s.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// Kills QEMU at once (a crash, for tests; cleanup on failure).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
