//! The plan checked against the VM before it is claimed: nothing is
//! touched.

use std::path::PathBuf;

use convoy_protocol::ctl::MigrateRequest;
use convoy_protocol::model::{MigrationMode, MigrationPlan};
use convoy_protocol::stream::{DiskManifest, QemuManifest};

use crate::backend::qemu::vm::QemuVm;
use crate::engine::error::{MigrateError, OptionsError};

/// What a QEMU migration will do, checked before the VM is claimed.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(super) manifest: QemuManifest,
    /// Disk image paths at the source, when copied.
    pub(super) disks: Vec<PathBuf>,
}

/// Checks the operator's plan against the VM; nothing is touched.
pub(crate) fn prepare(
    vm: &QemuVm,
    req: &MigrateRequest,
    o: &MigrationPlan,
) -> Result<Prepared, MigrateError> {
    // More than one stream is multifd, for pre-copy only: QEMU 7.2 cannot
    // combine post-copy with multifd, which then uses one channel.
    let multifd_channels = if o.mode == MigrationMode::Precopy && o.streams > 1 {
        o.streams
    } else {
        0
    };
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
