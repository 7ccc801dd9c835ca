//! `Admission`: would the agent asked let a migration go (as its source)
//! or come (as its destination)? Answered from its policy and, at a
//! destination, its room; nothing is recorded, consumed or reserved —
//! the migration itself is checked again in full. `convoyctl evacuate`
//! asks before it places each VM, so its plan (and `--dry-run`) leaves
//! out the destinations the policies refuse.

use serde::{Deserialize, Serialize};

/// The question: a ticket signed for the move by the operator who asks,
/// and what the VM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionQuery {
    /// Names the VM, its source and its destination; the agent asked is
    /// one of the two. Verified (signature, validity), never consumed.
    pub ticket: crate::ticket::SignedTicket,
    /// The VM's tenant, security level and labels (a destination's policy
    /// reads these; a source reads its own VM's).
    pub attributes: crate::vm::VmAttributes,
    /// Its guest memory, bytes (a destination's room).
    pub memory_bytes: u64,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Whether the move would be let through here now.
    pub permitted: bool,
    /// Why: the deciding policies, or what else refuses it.
    pub why: String,
}
