//! Snapshot requests of the operator protocol: an agent pushes one of its
//! VMs to a bucket, pulls one back, publishes its sealing key there, and
//! lists, verifies or deletes what the bucket holds (formats:
//! [`crate::snapshot`]). URLs are `file:///DIR` or `s3://BUCKET/PREFIX`;
//! credentials never travel in a request (the agent takes them from its
//! own environment).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{AgentName, VmName};
use crate::snapshot::{LineageId, SnapshotId};

/// The longest snapshot URL a request may carry.
pub const MAX_URL: usize = 1024;
/// The most recipients a push may name.
pub const MAX_RECIPIENTS: usize = 64;

/// Push a VM of the agent asked to a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// The VM (running: the agent pauses it for the copy and resumes it
    /// after; paused: it stays paused).
    pub vm: VmName,
    /// Where.
    pub url: String,
    /// The agents that may open it besides the pusher (each must have
    /// published its sealing key under the URL: `snapshot enroll`).
    pub recipients: Vec<AgentName>,
    /// Copy while the VM runs (pre-copy rounds into the bucket), then
    /// pause it only for the chunks it wrote last. A running VM only.
    pub live: bool,
}

/// Pull a snapshot out of a bucket and start it on the agent asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Where.
    pub url: String,
    /// This snapshot; `None`: the newest (of `vm`, if given) this agent
    /// can open.
    pub snapshot: Option<SnapshotId>,
    /// Only a snapshot of this VM.
    pub vm: Option<VmName>,
    /// Keep the VM paused once restored.
    pub paused: bool,
}

/// One snapshot as `snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// Its manifest object.
    pub object: String,
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Its lineage.
    pub lineage: LineageId,
    /// Its generation in the lineage.
    pub generation: u64,
    /// The VM.
    pub vm: VmName,
    /// What kind of VM.
    pub backend: crate::snapshot::SnapshotBackend,
    /// The agent that pushed it (its signature verified).
    pub source: String,
    /// Seconds since the Unix epoch, by the pusher's clock.
    pub created_at: u64,
    /// The agents that can open it.
    pub recipients: Vec<String>,
    /// Bytes of memory and disks it stands for.
    pub vm_bytes: u64,
    /// Chunks, and those that hold something.
    pub chunks: (u64, u64),
    /// The manifest's digest.
    pub digest: Digest,
}

/// A manifest object `snapshot list` could not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedObject {
    /// The object.
    pub object: String,
    /// Why it was refused.
    pub reason: String,
}

/// What `snapshot list` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotListing {
    /// Snapshots that verified, newest generation first.
    pub snapshots: Vec<SnapshotSummary>,
    /// Manifest objects that did not.
    pub refused: Vec<RefusedObject>,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushReport {
    /// The snapshot made.
    pub summary: SnapshotSummary,
    /// Stored chunks uploaded by this push (the rest were there).
    pub uploaded: u64,
    /// Their bytes.
    pub uploaded_bytes: u64,
    /// How long the VM was paused, milliseconds (0: it was paused before).
    pub paused_ms: f64,
    /// Live: copy rounds while it ran (0: a cold push).
    pub rounds: u32,
    /// Reading, sealing and uploading the chunks, milliseconds.
    pub chunks_ms: f64,
    /// The whole push, milliseconds.
    pub total_ms: f64,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullReport {
    /// The snapshot restored.
    pub summary: SnapshotSummary,
    /// The VM as it is now on the agent.
    pub vm: super::VmInfo,
    /// Chunks fetched and their bytes.
    pub fetched: (u64, u64),
    /// Chunks not fetched again: an earlier pull of this snapshot, cut
    /// short, had kept them (each opened and checked again).
    pub kept: u64,
    /// Fetching and checking the chunks, milliseconds.
    pub chunks_ms: f64,
    /// The whole pull, milliseconds.
    pub total_ms: f64,
}

/// What `snapshot verify` checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// The snapshot.
    pub summary: SnapshotSummary,
    /// Chunks fetched and opened, and their bytes.
    pub fetched: (u64, u64),
    /// The Merkle root recomputed (equal to the manifest's, or the
    /// request failed).
    pub root: Digest,
    /// Milliseconds.
    pub total_ms: f64,
}

/// What `snapshot delete` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReport {
    /// The manifest object removed.
    pub object: String,
    /// Chunks removed (those no other manifest under the URL names).
    pub chunks_deleted: u64,
    /// Chunks kept because another manifest names them.
    pub chunks_kept: u64,
}

/// What `snapshot copy` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// The snapshots copied (their manifests written by this copy), oldest
    /// first.
    pub copied: Vec<SnapshotSummary>,
    /// Manifests the destination held already.
    pub manifests_present: u64,
    /// Chunks copied.
    pub chunks_copied: u64,
    /// Chunks the destination held already.
    pub chunks_present: u64,
    /// Bytes that passed through the agent (0 when the server copied).
    pub bytes_streamed: u64,
    /// Whether the server copied (both URLs in one S3 bucket).
    pub server_side: bool,
    /// Milliseconds.
    pub total_ms: f64,
}

/// How a store-and-forward migration ended, from the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandoverReport {
    /// The migration (the ticket's id).
    pub migration: crate::names::MigrationId,
    /// The snapshot pushed.
    pub summary: SnapshotSummary,
    /// Stored chunks uploaded, and their bytes.
    pub uploaded: (u64, u64),
    /// `Completed`: the destination's claim won, the VM runs there and is
    /// gone here. `Aborted`: this agent's claim won, the VM runs here.
    /// `InDoubt`: no claim could be written or read; the VM stays paused
    /// here.
    pub outcome: super::Outcome,
    /// Pushing, milliseconds.
    pub push_ms: f64,
    /// Waiting for the claim, milliseconds.
    pub waited_ms: f64,
}

/// Snapshot requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SnapshotRequest {
    /// Publish this agent's signed sealing key under the URL, so pushers
    /// can name it as a recipient.
    Enroll {
        /// Where.
        url: String,
    },
    /// Push a VM.
    Push(PushRequest),
    /// Pull a snapshot.
    Pull(PullRequest),
    /// List the snapshots under a URL.
    List {
        /// Where.
        url: String,
    },
    /// Fetch and check every chunk of a snapshot this agent can open,
    /// without starting it.
    Verify {
        /// Where.
        url: String,
        /// This one; `None`: the newest this agent can open.
        snapshot: Option<SnapshotId>,
    },
    /// Delete a snapshot: its manifest, then the chunks no other manifest
    /// under the URL names.
    Delete {
        /// Where.
        url: String,
        /// Which.
        snapshot: SnapshotId,
    },
    /// Copy snapshots from one URL to another without opening them (the
    /// agent need not be a recipient): each manifest's signature checked,
    /// its missing chunks copied (by the server within one S3 bucket),
    /// the manifest last. Run again after a cut, it takes up where it
    /// stopped.
    Copy {
        /// From.
        url: String,
        /// To.
        to: String,
        /// This snapshot; `None`: every one.
        snapshot: Option<SnapshotId>,
    },
    /// Store-and-forward migration: push the VM (kept paused) sealed for
    /// the ticket's destination with the ticket in the manifest, then wait
    /// up to `wait_secs` for the destination's claim; without one, claim
    /// the VM back and resume it. One create-only claim object decides
    /// ([`crate::snapshot::claim`]).
    MigrateVia {
        /// The VM, destination and ticket, as for a live migration.
        migrate: super::MigrateRequest,
        /// Where.
        url: String,
        /// How long to wait for the destination (bounded by the ticket's
        /// expiry).
        wait_secs: u32,
    },
}

impl SnapshotRequest {
    /// The URL the request is about.
    pub fn url(&self) -> &str {
        match self {
            SnapshotRequest::Enroll { url }
            | SnapshotRequest::List { url }
            | SnapshotRequest::Verify { url, .. }
            | SnapshotRequest::Delete { url, .. }
            | SnapshotRequest::Copy { url, .. }
            | SnapshotRequest::MigrateVia { url, .. } => url,
            SnapshotRequest::Push(p) => &p.url,
            SnapshotRequest::Pull(p) => &p.url,
        }
    }

    /// The operation's name (`enroll`, `push`, …), as policies and the
    /// audit log see it.
    pub fn operation(&self) -> &'static str {
        match self {
            SnapshotRequest::Enroll { .. } => "enroll",
            SnapshotRequest::Push(_) => "push",
            SnapshotRequest::Pull(_) => "pull",
            SnapshotRequest::List { .. } => "list",
            SnapshotRequest::Verify { .. } => "verify",
            SnapshotRequest::Delete { .. } => "delete",
            SnapshotRequest::Copy { .. } => "copy",
            SnapshotRequest::MigrateVia { .. } => "migrate-via",
        }
    }
}

/// Snapshot answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SnapshotResponse {
    /// `Enroll`: the object written and the key's id.
    Enrolled {
        /// The statement's object.
        object: String,
        /// The sealing key's id.
        key_id: Digest,
    },
    /// `Push`.
    Pushed(Box<PushReport>),
    /// `Pull`.
    Pulled(Box<PullReport>),
    /// `List`.
    Listed(SnapshotListing),
    /// `Verify`.
    Verified(Box<VerifyReport>),
    /// `Delete`.
    Deleted(DeleteReport),
    /// `Copy`.
    Copied(Box<CopyReport>),
    /// `MigrateVia`.
    Handed(Box<HandoverReport>),
}
