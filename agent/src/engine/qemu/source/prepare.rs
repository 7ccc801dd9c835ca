//! The plan checked against the VM before it is claimed: nothing is
//! touched.

use std::path::PathBuf;

use convoy_protocol::ctl::MigrateRequest;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::stream::{DiskManifest, QemuManifest};

use crate::backend::qemu::vm::{multifd_busy_waits, Multifd, QemuVm};
use crate::engine::error::{MigrateError, OptionsError};

/// What a QEMU migration will do, checked before the VM is claimed.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(super) manifest: QemuManifest,
    /// Disk image paths at the source, when copied.
    pub(super) disks: Vec<PathBuf>,
}

/// Checks the operator's plan against the VM (multifd as `multifd`
/// says); nothing is touched.
pub(crate) fn prepare(
    vm: &QemuVm,
    req: &MigrateRequest,
    o: &MigrationPlan,
    multifd: Multifd,
) -> Result<Prepared, MigrateError> {
    let multifd_channels = multifd_channels(o, multifd, &vm.version);
    if multifd_channels == 0 && o.streams > 1 && o.mode == MigrationMode::Precopy {
        tracing::info!(
            vm = %req.vm,
            qemu = %vm.version,
            "one migration channel, not multifd: this QEMU's multifd sender spins while the \
             tunnel pushes back (agent option --qemu-multifd always overrides)"
        );
    }
    if o.start_paused {
        return Err(OptionsError::StartPausedQemu.into());
    }
    if !vm.definition.disks.is_empty() && !o.copy_storage {
        return Err(OptionsError::DisksNeedCopyStorage {
            vm: req.vm.clone(),
            disks: vm.definition.disks.len(),
        }
        .into());
    }
    let mut disks = Vec::new();
    let mut manifests = Vec::new();
    if o.copy_storage {
        for d in &vm.spec.disks {
            let size = std::fs::metadata(d)
                .map_err(|error| OptionsError::Disk {
                    path: d.clone(),
                    error,
                })?
                .len();
            disks.push(d.clone());
            manifests.push(DiskManifest {
                size,
                format: "raw".into(),
            });
        }
    }
    let manifest = QemuManifest {
        spec: vm.definition.clone(),
        mode: o.mode,
        multifd_channels,
        disks: manifests,
    };
    manifest.validate().map_err(OptionsError::QemuManifest)?;
    Ok(Prepared { manifest, disks })
}

/// The multifd channels of a migration of plan `o` from a QEMU of
/// `version` (0: QEMU's one stream). More than one stream is multifd, for
/// pre-copy only (QEMU 7.2 cannot combine post-copy with multifd), and
/// with [`Multifd::Auto`] only from a QEMU whose multifd sender sleeps
/// while its channels are busy: through the tunnel they are busy whenever
/// the link, or the agents' CPU, is slower than QEMU, and a sender that
/// spins then takes a core from the agents (`docs/benchmarks.md`, target
/// 4).
fn multifd_channels(o: &MigrationPlan, multifd: Multifd, version: &str) -> u16 {
    let wanted = o.mode == MigrationMode::Precopy && o.streams > 1;
    if wanted && (multifd == Multifd::Always || !multifd_busy_waits(version)) {
        o.streams
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multifd_is_left_out_for_a_qemu_whose_sender_spins_unless_the_agent_says_always() {
        let plan = |mode, streams| MigrationPlan {
            mode,
            streams,
            ..MigrationPlan::default()
        };
        let precopy = plan(MigrationMode::Precopy, 2);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "7.2.22"), 0);
        assert_eq!(multifd_channels(&precopy, Multifd::Always, "7.2.22"), 2);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "8.0.5"), 0);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "8.1.0"), 2);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "10.0.2"), 2);
        // A version that cannot be read (or that the greeting gave as
        // 0.0.0) is taken as affected.
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, ""), 0);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "x.y"), 0);
        assert_eq!(multifd_channels(&precopy, Multifd::Auto, "0.0.0"), 0);
        assert_eq!(multifd_channels(&precopy, Multifd::Always, "0.0.0"), 2);
        // One stream, or post-copy: never multifd.
        let one = plan(MigrationMode::Precopy, 1);
        assert_eq!(multifd_channels(&one, Multifd::Always, "10.0.2"), 0);
        let post = plan(MigrationMode::Postcopy, 2);
        assert_eq!(multifd_channels(&post, Multifd::Always, "10.0.2"), 0);
    }
}
