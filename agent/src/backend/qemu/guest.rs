//! The tiny Linux guest of the demo, the benchmark and the tests, built
//! from installed Debian packages by `scripts/build-test-guest` (embedded
//! here, so `convoyctl` can build it from anywhere), and what can be read
//! from its serial console.

use std::path::{Path, PathBuf};

/// The build script, as committed.
const BUILD_SCRIPT: &str = include_str!("../../../../scripts/build-test-guest");

/// A built guest: a kernel and an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// The Debian kernel.
    pub kernel: PathBuf,
    /// The busybox initramfs.
    pub initrd: PathBuf,
}

/// Why the guest could not be built ([`build`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The output directory or the script in it could not be written.
    #[error("{}: {source}", .path.display())]
    Write {
        /// What was written.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// bash could not be started.
    #[error("cannot run bash: {0}")]
    Bash(#[source] std::io::Error),
    /// The script failed; its error output says what to do (which packages
    /// to install when some are missing).
    #[error("{0}")]
    Script(String),
}

/// `qemu-system-x86_64` is not on the `PATH`.
#[derive(Debug, thiserror::Error)]
#[error("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")]
pub struct QemuNotInstalled;

/// Builds the guest into `out`. On failure the message says what to do:
/// which packages to install when some are missing.
pub fn build(out: &Path) -> Result<TestGuest, BuildError> {
    let write = |path: &Path| {
        let path = path.to_owned();
        move |source| BuildError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(write(out))?;
    let script = out.join("build-test-guest");
    std::fs::write(&script, BUILD_SCRIPT).map_err(write(&script))?;
    let st = std::process::Command::new("bash")
        .arg(&script)
        .arg(out)
        .output()
        .map_err(BuildError::Bash)?;
    if !st.status.success() {
        return Err(BuildError::Script(
            String::from_utf8_lossy(&st.stderr).trim().to_owned(),
        ));
    }
    Ok(TestGuest {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
    })
}

/// `qemu-system-x86_64` on the `PATH`, or what to install.
pub fn find_qemu() -> Result<PathBuf, QemuNotInstalled> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .find(|f| f.is_file())
        })
        .ok_or(QemuNotInstalled)
}

/// Every `convoy-counter N` the guest printed on its serial console, in
/// order (an unreadable or missing log has none).
pub fn counters(serial_log: &Path) -> Vec<u64> {
    std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("convoy-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Whether the guest booted (again) in this log.
pub fn booted(serial_log: &Path) -> bool {
    std::fs::read_to_string(serial_log).is_ok_and(|t| t.contains("convoy-guest up"))
}

/// What a Linux guest's kernel prints on its console when it faults: an
/// oops, a BUG() or a panic. Not its warnings, soft-lockup or stall
/// reports, which a TCG guest starved on a loaded host (or throttled by
/// auto-converge) may print and survive.
pub const KERNEL_FAULT_MARKS: [&str; 7] = [
    "Oops",
    "general protection fault",
    "invalid opcode",
    "kernel BUG at",
    "BUG: unable to handle",
    "BUG: kernel NULL pointer",
    "Kernel panic",
];

/// Whether the guest's kernel reported a fault on its console (after a
/// migration whose stream arrived byte for byte as QEMU wrote it, that is
/// QEMU 7.2 under TCG losing a guest's write: docs/architecture.md, "What
/// the digests cannot see: QEMU losing a guest's write").
pub fn kernel_fault(serial_log: &Path) -> bool {
    std::fs::read_to_string(serial_log)
        .is_ok_and(|t| KERNEL_FAULT_MARKS.iter().any(|m| t.contains(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_in_order_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "boot noise\nconvoy-counter 1\nconvoy-counter x\r\nconvoy-counter 2\r\nconvoy-guest up, no disk\n",
        )
        .unwrap();
        assert_eq!(counters(&log), vec![1, 2]);
        assert!(booted(&log));
        assert!(counters(&dir.path().join("missing")).is_empty());
    }
}
