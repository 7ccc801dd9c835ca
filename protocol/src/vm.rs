//! What access-control policies know of a VM: its tenant, security level and
//! labels ([`VmAttributes`]). They are set when the VM is created, travel
//! with it in `Propose`, and are checked again by every agent that reads
//! them, since they cross the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::VmName;
use thiserror::Error;

/// Most labels on one VM.
pub const MAX_LABELS: usize = 32;
/// Longest tenant, label key or label value, in bytes.
pub const MAX_ATTR_LEN: usize = 64;
/// Highest security level.
pub const MAX_SECURITY_LEVEL: u8 = 100;

/// The label that opts a VM in to retention where it leaves
/// (`convoy.retain-on-leave=true`, see [`crate::reuse`]): a per-VM choice
/// that travels with the VM and that policies see as a tag.
pub const RETAIN_LABEL: &str = "convoy.retain-on-leave";

/// A VM's attributes as policies see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAttributes {
    /// The tenant that owns the VM.
    pub tenant: String,
    /// Its security level, 0 (lowest) to [`MAX_SECURITY_LEVEL`]; policies
    /// compare it with host levels.
    pub security_level: u8,
    /// Free-form `key → value` labels (Cedar entity tags).
    pub labels: BTreeMap<String, String>,
}

impl Default for VmAttributes {
    fn default() -> Self {
        VmAttributes {
            tenant: "default".into(),
            security_level: 0,
            labels: BTreeMap::new(),
        }
    }
}

/// Why attributes were refused. The values quoted are the operator's
/// (or the source's), echoed back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AttributeError {
    /// A tenant, label key or value that is empty or too long.
    #[error("invalid VM attributes: {what} {value:?} must be 1 to {MAX_ATTR_LEN} bytes")]
    Length {
        /// Which token.
        what: &'static str,
        /// Its first 80 characters.
        value: String,
    },
    /// A token with a character outside the allowed set.
    #[error(
        "invalid VM attributes: {what} {value:?} may hold only ASCII letters, digits and - _ . / :"
    )]
    Characters {
        /// Which token.
        what: &'static str,
        /// The token.
        value: String,
    },
    /// A security level past [`MAX_SECURITY_LEVEL`].
    #[error("invalid VM attributes: security level {0} is above {MAX_SECURITY_LEVEL}")]
    SecurityLevel(u8),
    /// More than [`MAX_LABELS`] labels.
    #[error("invalid VM attributes: {0} labels, at most {MAX_LABELS}")]
    Labels(usize),
    /// A label that is not `key=value`.
    #[error("invalid VM attributes: label {0:?} is not key=value")]
    NotKeyValue(String),
}

fn token(what: &'static str, v: &str) -> Result<(), AttributeError> {
    if v.is_empty() || v.len() > MAX_ATTR_LEN {
        return Err(AttributeError::Length {
            what,
            value: v.chars().take(80).collect(),
        });
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'))
    {
        return Err(AttributeError::Characters {
            what,
            value: v.to_owned(),
        });
    }
    Ok(())
}

impl VmAttributes {
    /// Whether the VM opts in to retention where it leaves
    /// ([`RETAIN_LABEL`] is `true`).
    pub fn retain_on_leave(&self) -> bool {
        self.labels.get(RETAIN_LABEL).is_some_and(|v| v == "true")
    }

    /// Checks every bound (call on anything received).
    pub fn validate(&self) -> Result<(), AttributeError> {
        token("tenant", &self.tenant)?;
        if self.security_level > MAX_SECURITY_LEVEL {
            return Err(AttributeError::SecurityLevel(self.security_level));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(AttributeError::Labels(self.labels.len()));
        }
        for (k, v) in &self.labels {
            token("label key", k)?;
            token("label value", v)?;
        }
        Ok(())
    }

    /// Parses `key=value` into a label.
    pub fn parse_label(s: &str) -> Result<(String, String), AttributeError> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| AttributeError::NotKeyValue(s.to_owned()))?;
        token("label key", k)?;
        token("label value", v)?;
        Ok((k.to_owned(), v.to_owned()))
    }
}

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// QEMU's translator (works everywhere).
    Tcg,
}

/// A QEMU VM to create. Paths name files on the agent's host: the binary
/// must be one the agent allows, the kernel, initrd and disks are relative
/// to its image directory; nothing else of the command line crosses the
/// wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVmSpec {
    /// Its name, unique on the agent.
    pub name: VmName,
    /// QEMU binary: a file name or path from the agent's allow-list.
    pub binary: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Kernel, relative to the agent's image directory.
    pub kernel: Option<String>,
    /// Initial ramdisk, relative to the image directory.
    pub initrd: Option<String>,
    /// Kernel command line (given to the guest; printable ASCII).
    pub append: String,
    /// Disk images, relative to the image directory.
    pub disks: Vec<String>,
    /// Accelerator.
    pub accel: Accel,
    /// Tenant, security level and labels, for policies.
    pub attributes: VmAttributes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced() {
        let mut a = VmAttributes::default();
        assert!(a.validate().is_ok());
        a.tenant = String::new();
        assert!(a.validate().is_err());
        a.tenant = "t".repeat(MAX_ATTR_LEN + 1);
        assert!(a.validate().is_err());
        a.tenant = "acme corp".into();
        assert!(a.validate().is_err());
        a.tenant = "acme".into();
        a.security_level = MAX_SECURITY_LEVEL + 1;
        assert!(a.validate().is_err());
        a.security_level = 3;
        for i in 0..=MAX_LABELS {
            a.labels.insert(format!("k{i}"), "v".into());
        }
        assert!(matches!(a.validate(), Err(AttributeError::Labels(33))));
        a.labels.clear();
        a.labels.insert("env".into(), "pro\nd".into());
        assert!(a.validate().is_err());
    }

    #[test]
    fn labels_parse() {
        assert_eq!(
            VmAttributes::parse_label("env=prod").unwrap(),
            ("env".into(), "prod".into())
        );
        assert!(VmAttributes::parse_label("env").is_err());
        assert!(VmAttributes::parse_label("=x").is_err());
        assert!(VmAttributes::parse_label("a=").is_err());
    }
}

/// What a ticket binds about the VM it moves, besides its name: its size,
/// its disks and the attributes the source will claim for it. The
/// destination refuses a proposal whose manifest or attributes differ
/// ([`crate::admission`]), and the source refuses a ticket issued for
/// another incarnation of the VM (the same name, re-created).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmSubject {
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// Its disks, in order: names (a sim disk's name, a QEMU disk's path
    /// relative to the image directory) and sizes in bytes.
    pub disks: Vec<DiskSubject>,
    /// [`VmAttributes::digest`] of the attributes the source claims.
    pub attributes: Digest,
}

impl VmSubject {
    /// A VM of `memory_bytes` with no disks and default attributes.
    pub fn plain(memory_bytes: u64) -> Self {
        VmSubject {
            memory_bytes,
            disks: Vec::new(),
            attributes: VmAttributes::default().digest(),
        }
    }
}

/// One disk of a [`VmSubject`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskSubject {
    /// Name (sim) or path relative to the image directory (QEMU).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Domain separation for [`VmAttributes::digest`].
const ATTRIBUTES_CONTEXT: &str = "convoy vm attributes v1";

impl VmAttributes {
    /// A digest of the tenant, security level and every label, for a
    /// ticket to bind ([`VmSubject::attributes`]). Each string is
    /// length-prefixed, so no two attribute sets share a digest by
    /// moving bytes between fields.
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new_derive_key(ATTRIBUTES_CONTEXT);
        let mut put = |s: &str| {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        put(&self.tenant);
        put(&self.security_level.to_string());
        put(&self.labels.len().to_string());
        for (k, v) in &self.labels {
            put(k);
            put(v);
        }
        Digest(*h.finalize().as_bytes())
    }
}

impl std::fmt::Display for VmSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes of memory, disks [", self.memory_bytes)?;
        for (i, d) in self.disks.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} ({} bytes)", d.name, d.bytes)?;
        }
        write!(f, "], attributes {}", self.attributes.to_hex())
    }
}

#[cfg(test)]
mod subject_tests {
    use super::*;

    #[test]
    fn the_attribute_digest_changes_with_every_field_and_not_by_shifting_bytes() {
        let base = VmAttributes::default();
        let mut tenant = base.clone();
        tenant.tenant = "other".into();
        let mut level = base.clone();
        level.security_level = 3;
        let mut label = base.clone();
        label.labels.insert("a".into(), "bc".into());
        let mut shifted = base.clone();
        shifted.labels.insert("ab".into(), "c".into());
        let all = [&base, &tenant, &level, &label, &shifted].map(VmAttributes::digest);
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(base.digest(), VmAttributes::default().digest());
    }
}
