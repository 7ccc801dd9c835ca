//! The fleet registry's records: who owns each VM, at which ownership
//! epoch, and which agents are alive. The agent keeps them in etcd (see
//! `agent::registry`); this module is their format only — keys, JSON
//! values, and the checks a value read back must pass.
//!
//! Keys, under a prefix (default [`DEFAULT_PREFIX`]):
//!
//! * `<prefix>vms/<vm>`: an [`OwnerRecord`]. Its `epoch` rises by one at
//!   every change of hands: a migration's commit (source → destination)
//!   and a source's reclaim after a migration that did not commit.
//! * `<prefix>agents/<agent name>`: an [`AgentRecord`], written under a
//!   lease the agent keeps alive: gone when the agent is.
//!
//! Values are JSON so that an operator can read them with `etcdctl`. A
//! value is bounded ([`MAX_RECORD`]) and must name the key it is under: a
//! record copied to another key is refused, not believed.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{SpiffeId, VmName};
use crate::vm::VmAttributes;

/// The prefix of every key, unless the agent is told another.
pub const DEFAULT_PREFIX: &str = "/convoy/";

/// The largest record value read back, in bytes.
pub const MAX_RECORD: usize = 64 * 1024;

/// Who owns a VM: the one agent that may run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The VM.
    pub vm: VmName,
    /// The agent that owns it (its SPIFFE ID).
    pub owner: SpiffeId,
    /// The ownership epoch: 1 at the first claim, one more at each change
    /// of hands.
    pub epoch: u64,
    /// The VM's tenant, level and labels, for policies that filter views.
    pub attributes: VmAttributes,
    /// Why the record last changed: `created`, `migrated <id>`,
    /// `reclaimed <id>`, `reconciled`.
    pub cause: String,
    /// When it last changed, seconds since the Unix epoch (the writer's
    /// clock).
    pub since_unix: u64,
}

/// An agent alive: written under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Where it serves migrations and operators.
    pub addr: String,
    /// Its memory for VMs, bytes, and how much of it is in use.
    pub capacity_bytes: u64,
    /// Bytes in use when the record was written.
    pub used_bytes: u64,
    /// When it started, seconds since the Unix epoch.
    pub started_unix: u64,
}

/// Why a value read from the registry was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// Larger than [`MAX_RECORD`].
    #[error("a registry record of {0} bytes, over the {MAX_RECORD}-byte limit")]
    TooLarge(usize),
    /// Not a record of this kind.
    #[error("a registry record that does not parse: {0}")]
    Malformed(String),
    /// A record under another record's key.
    #[error("the record under {key} names {named}")]
    Misplaced {
        /// The key it was read from.
        key: String,
        /// What it names.
        named: String,
    },
    /// A key that is not one of ours.
    #[error("not a registry key: {0}")]
    NotAKey(String),
}

/// The key of `vm`'s owner record.
pub fn vm_key(prefix: &str, vm: &VmName) -> String {
    format!("{prefix}vms/{vm}")
}

/// The prefix under which every owner record is.
pub fn vms_prefix(prefix: &str) -> String {
    format!("{prefix}vms/")
}

/// The key of an agent's liveness record.
pub fn agent_key(prefix: &str, id: &SpiffeId) -> String {
    format!("{prefix}agents/{}", id.name())
}

/// The prefix under which every liveness record is.
pub fn agents_prefix(prefix: &str) -> String {
    format!("{prefix}agents/")
}

impl OwnerRecord {
    /// The record's value.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and maps: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the value under `key`, refusing one that is too large, does
    /// not parse, or names another VM.
    pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<Self, RecordError> {
        let r: OwnerRecord = decode_bounded(value)?;
        let key = String::from_utf8_lossy(key).into_owned();
        if key != vm_key(prefix, &r.vm) {
            return Err(RecordError::Misplaced {
                key,
                named: r.vm.to_string(),
            });
        }
        Ok(r)
    }
}

impl AgentRecord {
    /// The record's value.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the value under `key` (see [`OwnerRecord::decode`]).
    pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<Self, RecordError> {
        let r: AgentRecord = decode_bounded(value)?;
        let key = String::from_utf8_lossy(key).into_owned();
        if key != agent_key(prefix, &r.id) {
            return Err(RecordError::Misplaced {
                key,
                named: r.id.to_string(),
            });
        }
        Ok(r)
    }
}

fn decode_bounded<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, RecordError> {
    if value.len() > MAX_RECORD {
        return Err(RecordError::TooLarge(value.len()));
    }
    serde_json::from_slice(value).map_err(|e| RecordError::Malformed(e.to_string()))
}

/// The VM name in an owner record's key (for reports about a record that
/// does not decode).
pub fn vm_of_key(prefix: &str, key: &[u8]) -> Result<VmName, RecordError> {
    let key = String::from_utf8_lossy(key);
    key.strip_prefix(&vms_prefix(prefix))
        .and_then(|n| n.parse::<VmName>().ok())
        .ok_or_else(|| RecordError::NotAKey(key.into_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record() -> OwnerRecord {
        OwnerRecord {
            vm: "web-1".parse::<VmName>().unwrap(),
            owner: "spiffe://convoy.internal/agent/a".parse().unwrap(),
            epoch: 3,
            attributes: VmAttributes::default(),
            cause: "created".into(),
            since_unix: 1_700_000_000,
        }
    }

    #[test]
    fn a_record_reads_back_as_written_under_its_own_key_only() {
        let r = record();
        let key = vm_key(DEFAULT_PREFIX, &r.vm);
        assert_eq!(key, "/convoy/vms/web-1");
        let back = OwnerRecord::decode(DEFAULT_PREFIX, key.as_bytes(), &r.encode()).unwrap();
        assert_eq!(back, r);
        let other = vm_key(DEFAULT_PREFIX, &"web-2".parse::<VmName>().unwrap());
        assert!(matches!(
            OwnerRecord::decode(DEFAULT_PREFIX, other.as_bytes(), &r.encode()),
            Err(RecordError::Misplaced { .. })
        ));
        assert_eq!(vm_of_key(DEFAULT_PREFIX, key.as_bytes()).unwrap(), r.vm);
    }

    #[test]
    fn hostile_values_are_refused_with_a_reason() {
        let key = b"/convoy/vms/web-1";
        for bad in [
            &b""[..],
            b"{}",
            b"null",
            b"{\"vm\":\"../etc\",\"owner\":\"x\",\"epoch\":1}",
            b"\xff\xfe",
        ] {
            assert!(matches!(
                OwnerRecord::decode(DEFAULT_PREFIX, key, bad),
                Err(RecordError::Malformed(_))
            ));
        }
        let big = vec![b' '; MAX_RECORD + 1];
        assert_eq!(
            OwnerRecord::decode(DEFAULT_PREFIX, key, &big),
            Err(RecordError::TooLarge(MAX_RECORD + 1))
        );
        assert!(vm_of_key(DEFAULT_PREFIX, b"/elsewhere/vms/x").is_err());
        assert!(vm_of_key(DEFAULT_PREFIX, b"/convoy/vms/../x").is_err());
    }

    #[test]
    fn an_agent_record_names_its_key() {
        let a = AgentRecord {
            id: "spiffe://convoy.internal/agent/b".parse().unwrap(),
            addr: "127.0.0.1:7000".into(),
            capacity_bytes: 1 << 30,
            used_bytes: 0,
            started_unix: 1,
        };
        let key = agent_key(DEFAULT_PREFIX, &a.id);
        assert_eq!(key, "/convoy/agents/b");
        assert_eq!(
            AgentRecord::decode(DEFAULT_PREFIX, key.as_bytes(), &a.encode()).unwrap(),
            a
        );
        assert!(AgentRecord::decode(DEFAULT_PREFIX, b"/convoy/agents/c", &a.encode()).is_err());
    }
}
