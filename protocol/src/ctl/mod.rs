//! The operator protocol (`convoy-ctl/1`): what `convoyctl` asks an agent
//! and what the agent answers. One request per bidirectional stream; the
//! answer is one response, except `Migrate`, answered by any number of
//! [`CtlResponse::Progress`] frames and then one [`CtlResponse::Report`]
//! or [`CtlResponse::Error`]. Each travels as a [`CtlMessage`], a frame
//! type of its own ([`frame`]: the migration messages' framing, tags 32
//! and 33).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::model::MigrationMode;
use crate::names::{AgentName, MigrationId, VmName};
use crate::page::EncodingStats;
pub use crate::vm::{Accel, QemuVmSpec};
pub use frame::CtlMessage;

pub mod admission;
pub mod fleet;
pub mod frame;
pub mod service;
pub mod snapshot;

/// What a simulated VM's memory is filled with at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ContentProfile {
    /// About 25% zero pages, 40% compressible text-like pages, 35% random.
    Mixed,
    /// Every page random (incompressible).
    Random,
    /// Every page zero.
    Zero,
}

/// The fastest a sim VM's workload may dirty memory: 10 million pages a
/// second (40 GB/s of 4 KiB pages), far past any real guest. Held at VM
/// creation and on the device state a peer sends, so no rate can spin a
/// workload thread.
pub const MAX_DIRTY_PAGES_PER_SEC: u64 = 10_000_000;

/// The fastest a sim disk's workload may write: a million blocks a second.
pub const MAX_DISK_WRITES_PER_SEC: u64 = 1_000_000;

/// A simulated VM to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimVmSpec {
    /// Its name, unique on the agent.
    pub name: VmName,
    /// Guest memory in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// Pages the workload dirties per second (0 = idle).
    pub dirty_pages_per_sec: u64,
    /// Percentage of memory that takes 90% of the writes (1..=100).
    pub hot_set_pct: u8,
    /// Initial content.
    pub content: ContentProfile,
    /// Seed for content and workload.
    pub seed: u64,
    /// Tenant, security level and labels, for policies.
    pub attributes: crate::vm::VmAttributes,
    /// Its disks (sparse raw files in the agent's disk directory), which
    /// migrate with it.
    pub disks: Vec<SimDiskSpec>,
    /// Requests per second its service takes (0 = none; see
    /// [`service`]).
    pub service_requests_per_sec: u64,
}

/// A disk of a simulated VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimDiskSpec {
    /// Its name, unique in the VM.
    pub name: crate::names::DiskName,
    /// Size in bytes (a multiple of 4 KiB).
    pub bytes: u64,
    /// Blocks the workload writes per second (0 = none).
    pub writes_per_sec: u64,
    /// Share of the blocks written at creation, percent; the rest are
    /// holes (ignored with a base).
    pub used_pct: u8,
    /// A base image (in the agent's base image directory, the disk's
    /// size) the disk starts as a copy of.
    pub base: Option<crate::names::DiskName>,
}

/// A VM's lifecycle state on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VmState {
    /// Running.
    Running,
    /// Paused (stop-and-copy in progress).
    Paused,
    /// Being copied out to another agent, still running here.
    MigratingOut,
    /// Arriving: a staging image is being filled here.
    Incoming,
    /// Arrived by post-copy: runs here on demand paging while its last
    /// pages arrive; trusted once they verify.
    PostcopyIn,
    /// Arrived by post-copy and its link broke: it runs on the pages it
    /// has (a vCPU that touches a missing one waits) until its source
    /// reconnects and the missing pages come.
    Recovering,
    /// Handed over but the destination never confirmed the start: kept
    /// paused here until the outcome is known. Never resumed automatically.
    InDoubt,
    /// Its process exited (a QEMU that quit or crashed).
    Exited,
    /// Held by the agent's registry but not driven: a sim VM whose memory
    /// lived in an agent process that ended, or a QEMU found again after a
    /// restart that could not be verified. Listed until deleted; deleting
    /// it removes what is left of it.
    Lost,
}

/// One VM as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: VmName,
    /// Backend (`sim`).
    pub backend: String,
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// State.
    pub state: VmState,
    /// The device counter now.
    pub counter: u64,
    /// The counter when the VM started on this agent after arriving.
    pub counter_at_start: Option<u64>,
    /// The agent it came from, when it arrived by migration.
    pub arrived_from: Option<String>,
    /// Workload dirty rate, pages per second.
    pub dirty_pages_per_sec: u64,
    /// Tenant, security level and labels.
    pub attributes: crate::vm::VmAttributes,
    /// What a ticket to move it must bind (memory, disks, attribute
    /// digest); `None` while it is being created or arriving.
    pub subject: Option<crate::vm::VmSubject>,
    /// Its service's counters as this agent sees them (a sim VM with a
    /// service).
    pub service: Option<service::ServiceStats>,
}

/// Migrate a VM to another agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The VM, which must be running on the agent asked.
    pub vm: VmName,
    /// The destination agent's name (its SPIFFE ID is derived from it).
    pub to: AgentName,
    /// The destination's address, when the agent has no peer entry for it.
    pub to_addr: Option<String>,
    /// The operator's signed authorization: its VM and agents must match
    /// this request, and its plan ([`crate::ticket::Ticket::plan`]) is what
    /// the migration runs.
    pub ticket: crate::ticket::SignedTicket,
}

/// A progress update during a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Phase name (`precopy`, `stop-and-copy`, `verify`, `handover`).
    pub phase: String,
    /// Current round.
    pub round: u32,
    /// Pages sent so far, all rounds.
    pub pages_sent: u64,
    /// Pages dirty and not yet resent.
    pub remaining_pages: u64,
    /// Guest memory size in pages.
    pub total_pages: u64,
    /// Frame bytes sent so far.
    pub payload_bytes: u64,
    /// Measured rate of the last round, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// A periodic sample (native engine, every [`SAMPLE_EVERY_MS`]), for
    /// timelines; `None` on the frames that report a phase change, and
    /// for QEMU VMs.
    pub sample: Option<Sample>,
}

/// How often a native migration's source samples it, milliseconds.
pub const SAMPLE_EVERY_MS: u64 = 100;

/// One instant of a migration as its source saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Since the migration started at the source, milliseconds.
    pub elapsed_ms: u64,
    /// The dirty rate last estimated, pages per second.
    pub dirty_pages_per_sec: u64,
    /// The guest's work counter (a sim VM's vCPU loop), read at the
    /// source: it stands still while the VM is paused there, and after
    /// it left.
    pub guest_work: u64,
    /// Pages served on post-copy faults so far.
    pub faults_served: u64,
    /// The VM is paused at the source (stop-and-copy, the handover, or
    /// since a post-copy switch).
    pub paused: bool,
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// The VM runs at the destination; the source copy is gone.
    Completed,
    /// The VM still runs at the source; nothing is left at the destination.
    Aborted(String),
    /// Handed over, but the destination's start was never confirmed.
    InDoubt(String),
}

/// As audit records and reports say it: `completed`, `aborted: WHY`,
/// `in doubt: WHY`.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Completed => f.write_str("completed"),
            Outcome::Aborted(why) => write!(f, "aborted: {why}"),
            Outcome::InDoubt(why) => write!(f, "in doubt: {why}"),
        }
    }
}

/// The summary of one migration, from the source's point of view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Migration id (hex).
    pub migration: String,
    /// VM.
    pub vm: VmName,
    /// Source SPIFFE ID.
    pub source: String,
    /// Destination SPIFFE ID.
    pub destination: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Whether the destination confirmed a root equal to the source's.
    pub verified: bool,
    /// Whether pre-copy met the downtime target before the round limit.
    pub converged: bool,
    /// Propose to Started, milliseconds.
    pub total_ms: f64,
    /// Pause at the source to Started received, milliseconds.
    pub downtime_ms: f64,
    /// Copy rounds, the final one included.
    pub rounds: u32,
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// Pages sent, all rounds (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Pages by encoding.
    pub encodings: EncodingStats,
    /// Frame bytes on the control and data streams.
    pub payload_bytes: u64,
    /// Bytes the source's connection sent and received on the wire (UDP
    /// payloads, or TLS records over TCP).
    pub wire_bytes: u64,
    /// Merkle root of the memory image handed over.
    pub memory_root: Option<Digest>,
    /// The device counter when the source paused.
    pub counter_at_pause: Option<u64>,
    /// Signed receipts, each verified: the destination's Accepted, Ready
    /// and Started, and the source's own Sent. They verify offline with the
    /// CA bundle alone.
    pub receipts: Vec<crate::receipt::SignedReceipt>,
    /// For a QEMU VM: QEMU's own figures and what Convoy carried.
    pub qemu: Option<Box<QemuFigures>>,
    /// How pre-copy converged (native engine).
    pub convergence: crate::model::Convergence,
    /// After a post-copy switch (native engine): what was owed, served on
    /// faults, and the destination's fault figures.
    pub postcopy: Option<Box<crate::model::PostcopySummary>>,
    /// A sim VM's disks as moved: each one's size and its own root (the
    /// destination verified them within the root of the whole image).
    pub disks: Vec<DiskReport>,
    /// Disk blocks sent, all rounds (included in `pages_sent`).
    pub disk_blocks_sent: u64,
    /// The transport of the migration's connection, `"quic"` or `"tcp"`
    /// (`None`: the destination was never reached).
    pub transport: Option<String>,
    /// Connections the data streams of the last link went over beyond the
    /// first (its lanes: `--connections` less one, plus one with
    /// post-copy in the plan, less those left out; 0 after a link break
    /// past the post-copy switch or one whose streams opened only once
    /// the VM was paused, and for QEMU VMs).
    #[serde(default)]
    pub lanes: u16,
    /// The link as the migration's connections saw it (native engine).
    #[serde(default)]
    pub link: Option<LinkReport>,
}

/// The link a migration went over, at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// Round-trip time, microseconds: QUIC's smoothed estimate on the
    /// first connection; over TCP, the shortest control round trip.
    pub rtt_us: u64,
    /// QUIC packets sent on all the connections (`None` over TCP, whose
    /// kernel retransmits unseen).
    pub sent_packets: Option<u64>,
    /// Of those, declared lost by QUIC's loss detection.
    pub lost_packets: Option<u64>,
}

/// One disk in a migration report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    /// Its name.
    pub name: crate::names::DiskName,
    /// Its size, bytes.
    pub bytes: u64,
    /// Merkle root over its blocks as paused (see
    /// [`crate::disk::file_root`]): what the destination's file holds.
    pub root: Digest,
}

/// A QEMU migration as QEMU and Convoy each saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QemuFigures {
    /// Pre-copy, post-copy or hybrid.
    pub mode: MigrationMode,
    /// QEMU's final `query-migrate` status (`completed`, `failed`, ...).
    pub status: String,
    /// QEMU's `total-time`, milliseconds.
    pub total_ms: Option<u64>,
    /// QEMU's `downtime`, milliseconds (its own stop to its own end; the
    /// report's `downtime_ms` runs to the destination's `Started`).
    pub downtime_ms: Option<u64>,
    /// QEMU's `ram.transferred`, bytes.
    pub transferred_bytes: Option<u64>,
    /// Multifd channels (0: none).
    pub multifd_channels: u16,
    /// Disks mirrored to the destination.
    pub disks_copied: u16,
    /// Every channel Convoy carried, with its digests both ways.
    pub channels: Vec<crate::stream::ChannelDigests>,
}

/// An agent's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Its SPIFFE ID.
    pub identity: String,
    /// Address it listens on.
    pub listen: String,
    /// Crate version.
    pub version: String,
    /// VMs here.
    pub vms: Vec<VmInfo>,
    /// Migrations running now.
    pub active_migrations: u32,
    /// The latest finished migrations, newest last.
    pub recent: Vec<MigrationReport>,
    /// Guest memory it may hold (`--capacity`).
    pub capacity_bytes: u64,
    /// Guest memory its VMs hold or have reserved (arrivals included).
    pub used_bytes: u64,
}

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtlError {
    /// Machine-readable kind.
    pub kind: CtlErrorKind,
    /// For people.
    pub message: String,
}

/// Kinds of [`CtlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CtlErrorKind {
    /// The request is malformed or out of range.
    BadRequest,
    /// No such VM.
    NotFound,
    /// The name is taken.
    Exists,
    /// The agent lacks resources.
    NoCapacity,
    /// The migration failed.
    MigrationFailed,
    /// The ticket does not authorize the request.
    Unauthorized,
    /// Anything else.
    Internal,
    /// A policy denies the request.
    Forbidden,
}

/// Operator → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CtlRequest {
    /// Agent summary.
    Status,
    /// Create and start a simulated VM.
    VmCreate(SimVmSpec),
    /// List VMs.
    VmList,
    /// Migrate a VM.
    Migrate(MigrateRequest),
    /// Stop a VM for good and wipe its memory (not while it migrates).
    VmDelete(VmName),
    /// Cancel the outgoing migration of a VM (refused once handed over).
    Abort(VmName),
    /// Up to [`AUDIT_CHUNK`] bytes of the agent's audit log from `offset`.
    AuditRead {
        /// Byte offset.
        offset: u64,
    },
    /// Launch a QEMU VM.
    VmCreateQemu(QemuVmSpec),
    /// Pause a running VM (`true`) or resume a paused one (`false`); it
    /// keeps its memory and disks.
    VmPause(VmName, bool),
    /// Adopt a QEMU already running on the agent's host, by its QMP socket
    /// (an absolute path there); it must run an allowed binary and the VM
    /// the definition describes.
    VmAdoptQemu(QemuVmSpec, String),
    /// Resolve the migrations this agent holds unfinished (of one VM, or
    /// all): asks the other side where the rules need it, acts on the
    /// answer, and reports each decision. With `force_resume_here`, a
    /// source resumes its copy without the destination's word (for an
    /// operator who knows the other host is gone for good; audited).
    Recover {
        /// Only this VM's migrations; `None`: every one.
        vm: Option<VmName>,
        /// Resume the source's paused copy without a fence.
        force_resume_here: bool,
    },
    /// A snapshot in object storage: enroll, push, pull, list, verify,
    /// delete ([`snapshot`]).
    Snapshot(snapshot::SnapshotRequest),
    /// The fleet registry's VMs and agents (`fleet ls`, `where`).
    Fleet(fleet::FleetQuery),
    /// Would this agent let a migration go or come ([`admission`])?
    Admission(Box<admission::AdmissionQuery>),
}

/// What `Recover` decided about one migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RecoveryDecision {
    /// Source: the VM resumed here (it never left, the destination
    /// fenced the handoff, or the operator forced it).
    ResumedHere,
    /// Source: the VM runs at the destination; the copy here is gone.
    DiscardedHere,
    /// Nothing can be decided now: the VM stays paused here and the
    /// reason says why.
    StaysPaused,
    /// Destination: the VM was handed over and runs here.
    RunsHere,
    /// Destination: the staging here is fenced and discarded; it never
    /// runs here.
    Fenced,
    /// Destination: handed over, but the copy here is gone; the source
    /// will be told so (a fence) when it asks.
    AwaitsSource,
    /// Source: the destination runs the VM in post-copy and waits for its
    /// pages; the migration was taken up again from the paused copy here
    /// (kept until `Started`).
    PostcopyTakenUp,
}

impl RecoveryDecision {
    /// Whether the migration is still undecided after this: the VM stays
    /// paused here, for good or while a post-copy migration taken up again
    /// is still being finished.
    pub fn undecided(self) -> bool {
        matches!(
            self,
            RecoveryDecision::StaysPaused | RecoveryDecision::PostcopyTakenUp
        )
    }

    /// A short phrase for the operator.
    pub fn describe(self) -> &'static str {
        match self {
            RecoveryDecision::ResumedHere => "resumed here",
            RecoveryDecision::DiscardedHere => "discarded here (runs at the destination)",
            RecoveryDecision::StaysPaused => "stays paused",
            RecoveryDecision::RunsHere => "runs here",
            RecoveryDecision::Fenced => "fenced (never runs here)",
            RecoveryDecision::AwaitsSource => "awaits the source",
            RecoveryDecision::PostcopyTakenUp => "post-copy taken up again from here",
        }
    }
}

/// One migration `Recover` looked at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// The migration.
    pub migration: MigrationId,
    /// The VM.
    pub vm: VmName,
    /// `source` or `destination`.
    pub role: String,
    /// The other agent.
    pub peer: String,
    /// Where the journal had it before.
    pub phase: String,
    /// What was decided.
    pub decision: RecoveryDecision,
    /// Why, for the operator.
    pub reason: String,
}

/// Most audit log bytes in one [`CtlResponse::AuditChunk`].
pub const AUDIT_CHUNK: usize = 1 << 20;

/// Agent → operator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CtlResponse {
    /// Answer to `Status`.
    Status(AgentStatus),
    /// Answer to `VmCreate`.
    VmCreated(VmInfo),
    /// Answer to `VmList`.
    VmList(Vec<VmInfo>),
    /// Answer to `VmDelete`.
    VmDeleted(VmName),
    /// During `Migrate`.
    Progress(Progress),
    /// End of `Migrate`.
    Report(Box<MigrationReport>),
    /// Any request failed.
    Error(CtlError),
    /// Answer to `Abort`: the migration was cancelled, the VM runs here.
    Aborted(VmName),
    /// Answer to `VmPause`: the VM as it is now.
    VmPaused(VmInfo),
    /// Answer to `AuditRead`.
    AuditChunk {
        /// Offset of `bytes`.
        offset: u64,
        /// Length of the whole log now.
        total: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Answer to `Recover`: one report per migration looked at.
    Recovered(Vec<RecoveryReport>),
    /// Answer to `Snapshot`.
    Snapshot(Box<snapshot::SnapshotResponse>),
    /// Answer to `Fleet`.
    Fleet(Box<fleet::FleetView>),
    /// Answer to `Admission`.
    Admission(admission::Admission),
}
