//! QEMU VMs in a snapshot.
//!
//! A QEMU VM is pushed as QEMU's own migration stream (QEMU saves it
//! while the guest runs: its pre-copy, into the agent) followed by the
//! VM's raw disks. The stream's bytes are the snapshot's *memory* leaves,
//! zero-padded to whole pages, and disk `i`'s blocks the leaves after
//! them under the name `disk<i>`, so chunking, sealing, dedup (disks dedup
//! across generations; a stream is not page-aligned and mostly does not),
//! the Merkle root and every check a puller makes are those of a sim VM's
//! snapshot. The manifest says which backend it is
//! ([`SnapshotBackend`]); the sealed device state of a QEMU snapshot is a
//! [`QemuImage`]: the VM's definition (paths relative to an agent's image
//! directory, as a live migration carries it) and the stream's exact
//! length.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::SnapshotManifest;
use crate::names::DiskName;
use crate::vm::QemuVmSpec;

/// What kind of VM a snapshot holds (clear in the manifest: the bucket
/// learns it, as it learns the geometry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotBackend {
    /// A simulated VM: memory pages, disk blocks, the sim's device state.
    Sim,
    /// A QEMU VM: QEMU's migration stream, then its raw disks; the device
    /// state is a [`QemuImage`].
    Qemu,
}

impl std::fmt::Display for SnapshotBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotBackend::Sim => "sim",
            SnapshotBackend::Qemu => "qemu",
        })
    }
}

/// The sealed device state of a QEMU snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuImage {
    /// The VM as its operator defined it; its disks are the manifest's,
    /// in order.
    pub definition: QemuVmSpec,
    /// Bytes of QEMU's stream: the first this many bytes of the memory
    /// leaves (the rest of the last page is padding).
    pub stream_bytes: u64,
}

/// Why a QEMU snapshot's device state is refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QemuImageError {
    /// The manifest is not a QEMU snapshot's.
    #[error("the snapshot holds a {0} VM, not a QEMU VM")]
    NotQemu(SnapshotBackend),
    /// The state does not decode.
    #[error("the QEMU state does not decode: {0}")]
    Decode(#[source] postcard::Error),
    /// It disagrees with the manifest.
    #[error("the QEMU state disagrees with the manifest: {0}")]
    Inconsistent(String),
}

/// The name disk `i` of a QEMU VM has in a snapshot.
pub fn disk_name(i: usize) -> Option<DiskName> {
    format!("disk{i}").parse().ok()
}

impl QemuImage {
    /// The VM as a ticket names it (as its source agent reports a QEMU
    /// VM): the guest's memory, each disk by its name in the definition
    /// with the size it has in `m`, the attributes.
    pub fn subject(&self, m: &SnapshotManifest) -> crate::vm::VmSubject {
        crate::vm::VmSubject {
            memory_bytes: self.definition.memory_mib.saturating_mul(1 << 20),
            disks: self
                .definition
                .disks
                .iter()
                .zip(&m.disks)
                .map(|(name, d)| crate::vm::DiskSubject {
                    name: name.clone(),
                    bytes: d.bytes,
                })
                .collect(),
            attributes: m.attributes.digest(),
        }
    }

    /// The sealed device state's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// Decodes the opened device state of `m` and checks it against the
    /// manifest: the same VM, name and attributes; a stream length that
    /// fills the memory leaves but their last page's padding; one disk
    /// per disk of the definition, named `disk<i>`, from no base image;
    /// 4 KiB leaves.
    pub fn decode(bytes: &[u8], m: &SnapshotManifest) -> Result<QemuImage, QemuImageError> {
        if m.backend != SnapshotBackend::Qemu {
            return Err(QemuImageError::NotQemu(m.backend));
        }
        let (q, rest): (QemuImage, _) =
            postcard::take_from_bytes(bytes).map_err(QemuImageError::Decode)?;
        let bad = |s: String| Err(QemuImageError::Inconsistent(s));
        if !rest.is_empty() {
            return bad(format!("{} bytes after the state", rest.len()));
        }
        if q.definition.name != m.vm {
            return bad(format!(
                "the definition is of VM {}, the manifest of {}",
                q.definition.name, m.vm
            ));
        }
        if q.definition.attributes != m.attributes {
            return bad("the definition's attributes are not the manifest's".into());
        }
        let page = m.memory.page_size().bytes() as u64;
        if page != 4096 {
            return bad(format!("{page}-byte leaves (a QEMU snapshot's are 4096)"));
        }
        let total = m.memory.bytes();
        if q.stream_bytes == 0 || q.stream_bytes > total || q.stream_bytes <= total - page {
            return bad(format!(
                "a stream of {} bytes in {} pages of {page}",
                q.stream_bytes,
                m.memory.page_count()
            ));
        }
        if q.definition.disks.len() != m.disks.len() {
            return bad(format!(
                "{} disks defined, {} in the snapshot",
                q.definition.disks.len(),
                m.disks.len()
            ));
        }
        for (i, d) in m.disks.iter().enumerate() {
            if Some(&d.name) != disk_name(i).as_ref() || d.base.is_some() {
                return bad(format!(
                    "disk {i} is {} (expected disk{i}, no base)",
                    d.name
                ));
            }
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::disk::DiskGeometry;
    use crate::page::MemoryGeometry;

    fn image() -> QemuImage {
        QemuImage {
            definition: QemuVmSpec {
                name: "vm-1".parse().unwrap(),
                ..crate::fuzz::qemu_spec(1)
            },
            stream_bytes: 3 * 4096 + 1,
        }
    }

    #[test]
    fn a_state_must_match_its_manifest() {
        let mut m = super::super::tests::manifest_for_tests();
        m.backend = SnapshotBackend::Qemu;
        m.vm = "vm-1".parse().unwrap();
        m.memory = MemoryGeometry::from_bytes(4 * 4096).unwrap();
        m.disks = vec![DiskGeometry {
            name: disk_name(0).unwrap(),
            bytes: 8192,
            base: None,
        }];
        let q = image();
        assert_eq!(QemuImage::decode(&q.encode().unwrap(), &m).unwrap(), q);

        let refused = |q: &QemuImage, m: &SnapshotManifest| {
            QemuImage::decode(&q.encode().unwrap(), m)
                .unwrap_err()
                .to_string()
        };
        // A stream longer than the leaves, or one that leaves a whole
        // page of padding.
        for n in [4 * 4096 + 1, 3 * 4096, 0] {
            let e = refused(
                &QemuImage {
                    stream_bytes: n,
                    ..image()
                },
                &m,
            );
            assert!(e.contains("stream of"), "{e}");
        }
        let mut other = image();
        other.definition.name = "vm-2".parse().unwrap();
        assert!(refused(&other, &m).contains("VM vm-2"));
        let mut other = image();
        other.definition.attributes.tenant = "acme".into();
        assert!(refused(&other, &m).contains("attributes"));
        let mut other = image();
        other.definition.disks.push("d1.img".into());
        assert!(refused(&other, &m).contains("2 disks defined"));
        let mut renamed = m.clone();
        renamed.disks[0].name = "root".parse().unwrap();
        assert!(refused(&image(), &renamed).contains("disk 0 is root"));
        let mut trailing = image().encode().unwrap();
        trailing.push(0);
        assert!(QemuImage::decode(&trailing, &m)
            .unwrap_err()
            .to_string()
            .contains("after the state"));
        let mut pages = m.clone();
        pages.memory =
            MemoryGeometry::new(crate::page::PageSize::try_from(8192).unwrap(), 2).unwrap();
        assert!(refused(&image(), &pages).contains("8192-byte leaves"));
        let mut sim = m.clone();
        sim.backend = SnapshotBackend::Sim;
        assert!(matches!(
            QemuImage::decode(&image().encode().unwrap(), &sim),
            Err(QemuImageError::NotQemu(SnapshotBackend::Sim))
        ));
        assert!(matches!(
            QemuImage::decode(&[0xff; 3], &m),
            Err(QemuImageError::Decode(_))
        ));
    }
}
