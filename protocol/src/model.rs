//! Shared vocabulary: how memory moves ([`MigrationMode`]) and the plan of
//! a migration ([`MigrationPlan`]) that the operator's ticket signs and both
//! agents check. A leaf module: it depends on nothing else in the crate, so
//! the operator protocol, tickets and wire messages can all use it.

use serde::{Deserialize, Serialize};

/// How memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Copy rounds while the VM runs at the source, then a short stop.
    #[default]
    Precopy,
    /// The VM starts at the destination early; the rest follows on demand.
    Postcopy,
    /// Pre-copy rounds, then post-copy when they do not converge.
    Hybrid,
}

impl std::fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        })
    }
}

/// A migration mode name that is none of precopy, postcopy or hybrid
/// (the text as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (precopy, postcopy or hybrid)")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for MigrationMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s {
            "precopy" => Ok(MigrationMode::Precopy),
            "postcopy" => Ok(MigrationMode::Postcopy),
            "hybrid" => Ok(MigrationMode::Hybrid),
            other => Err(UnknownMode(other.to_owned())),
        }
    }
}

/// The plan of one migration: every choice the operator makes for it.
///
/// convoyctl builds it from the flags, the operator's ticket signs all of
/// it ([`crate::ticket::Ticket::plan`]), the source runs it and announces it
/// in its manifest ([`crate::message::Manifest::plan`]), and the
/// destination's admission ([`crate::admission`]) refuses a proposal whose
/// plan or stream differs from the ticket's in any field. One value keeps
/// one name from the flag to the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// Parallel data streams (1..=16). For QEMU VMs, more than one means
    /// multifd with that many channels (pre-copy only), unless the source
    /// agent keeps to QEMU's one stream (`--qemu-multifd`).
    pub streams: u16,
    /// Downtime target in milliseconds.
    pub max_downtime_ms: u32,
    /// Most pre-copy rounds before stopping regardless.
    pub max_rounds: u32,
    /// zstd level, 0 for none.
    pub compression_level: i32,
    /// Pre-copy, post-copy or hybrid.
    pub mode: MigrationMode,
    /// Copy the VM's disks too (no shared storage).
    pub copy_storage: bool,
    /// Bandwidth cap, bytes per second (none when absent).
    pub bandwidth: Option<u64>,
    /// Hybrid: switch to post-copy after this many milliseconds of
    /// pre-copy (when absent: after the first full pass).
    pub postcopy_after_ms: Option<u32>,
    /// Throttle the guest in steps when pre-copy rounds stop shrinking.
    pub auto_converge: bool,
    /// Hold pages dirtied in several rounds back for the final round.
    pub hold_hot_pages: bool,
    /// At the round limit, stop and copy even if the downtime target
    /// cannot be met (otherwise the migration fails and the VM keeps
    /// running at the source).
    pub force_stop: bool,
    /// Choose the zstd level (up to `compression_level`, none included)
    /// from measured compression speed, ratio and link rate.
    pub adaptive_compression: bool,
    /// The VM arrives paused at the destination (pre-copy only), to be
    /// resumed with `vm resume`: like `virsh migrate --suspend`.
    pub start_paused: bool,
    /// Post-copy and hybrid with disks (sim VMs): the disk blocks left at
    /// the switch are fetched on demand after the VM resumes at the
    /// destination (a guest write to one waits for it), instead of going
    /// inside the downtime.
    pub storage_postcopy: bool,
    /// The migration must reach its handover (or post-copy switch)
    /// within this many milliseconds of its start, or it is cancelled and
    /// the VM runs on at the source. After the handover the VM is the
    /// destination's and the deadline no longer applies.
    pub deadline_ms: Option<u32>,
    /// Connections the data streams are spread over (1..=8, at most
    /// `streams`): each has its own congestion controller, so on a long
    /// lossy link several take a larger share of it than one. The control
    /// stream and the post-copy fault stream stay on the first; with
    /// post-copy in the plan the data streams leave it to one more
    /// connection ([`MigrationPlan::lanes`]). Page VMs only; a QEMU
    /// migration uses one.
    pub connections: u16,
}

impl Default for MigrationPlan {
    fn default() -> Self {
        MigrationPlan {
            streams: 2,
            max_downtime_ms: 300,
            max_rounds: 30,
            compression_level: 1,
            mode: MigrationMode::Precopy,
            copy_storage: false,
            bandwidth: None,
            postcopy_after_ms: None,
            auto_converge: true,
            hold_hot_pages: true,
            force_stop: false,
            adaptive_compression: true,
            start_paused: false,
            storage_postcopy: false,
            deadline_ms: None,
            connections: 1,
        }
    }
}

/// Most data streams a plan may ask for.
pub const MAX_STREAMS: u16 = 16;

/// Most connections a plan may spread its data streams over.
pub const MAX_CONNECTIONS: u16 = 8;

/// Why a plan cannot run, whatever the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Streams out of range.
    #[error("streams must be 1..={MAX_STREAMS} (not {0})")]
    Streams(u16),
    /// zstd level out of range.
    #[error("compression level must be 0..=19 (not {0})")]
    CompressionLevel(i32),
    /// Not a single round.
    #[error("max rounds must be at least 1")]
    MaxRounds,
    /// A demand-paged VM must run to fault its pages in.
    #[error("--start-paused is for pre-copy, not {0} (a demand-paged VM must run to fault its pages in)")]
    StartPaused(MigrationMode),
    /// Disk blocks are owed only after a post-copy switch, and only when
    /// disks travel.
    #[error(
        "--storage-postcopy fetches disk blocks on demand after a post-copy switch: it needs \
         disks and --mode postcopy or hybrid (and --copy-storage)"
    )]
    StoragePostcopy,
    /// A deadline of nothing.
    #[error("the deadline must be more than 0")]
    Deadline,
    /// Connections out of range, or more than the streams.
    #[error("connections must be 1..={MAX_CONNECTIONS} and at most the streams ({streams}), not {connections}")]
    Connections {
        /// Asked for.
        connections: u16,
        /// The plan's streams.
        streams: u16,
    },
}

impl MigrationPlan {
    /// Checks the rules that hold whatever the VM: streams, compression
    /// level and rounds in range, no start-paused outside pre-copy, storage
    /// post-copy only after a switch and with disks copied. The source
    /// checks them before it touches the VM, the destination at admission.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.streams == 0 || self.streams > MAX_STREAMS {
            return Err(PlanError::Streams(self.streams));
        }
        if !(0..=19).contains(&self.compression_level) {
            return Err(PlanError::CompressionLevel(self.compression_level));
        }
        if self.max_rounds == 0 {
            return Err(PlanError::MaxRounds);
        }
        if self.start_paused && self.mode != MigrationMode::Precopy {
            return Err(PlanError::StartPaused(self.mode));
        }
        if self.storage_postcopy && (self.mode == MigrationMode::Precopy || !self.copy_storage) {
            return Err(PlanError::StoragePostcopy);
        }
        if self.deadline_ms == Some(0) {
            return Err(PlanError::Deadline);
        }
        if self.connections == 0
            || self.connections > MAX_CONNECTIONS
            || self.connections > self.streams
        {
            return Err(PlanError::Connections {
                connections: self.connections,
                streams: self.streams,
            });
        }
        Ok(())
    }

    /// The lanes a page migration of this plan dials beside its first
    /// connection (numbered `1..=lanes()`): the plan's `connections`
    /// beyond the first, and with post-copy in the plan (post-copy or
    /// hybrid) one more. Then the first connection carries the control
    /// and fault streams alone and the data streams go on the lanes, so a
    /// vCPU's fault never waits behind the background push in one
    /// connection's send queue, congestion window or driver (the reason
    /// for QEMU's `postcopy-preempt` channel).
    pub fn lanes(&self) -> u16 {
        self.connections.saturating_sub(1) + u16::from(self.mode != MigrationMode::Precopy)
    }
}

/// How pre-copy converged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Convergence {
    /// Last estimated dirty rate, pages per second.
    pub dirty_rate: u64,
    /// Highest guest throttle applied, percent.
    pub throttle: u8,
    /// Page sends of pages already sent before (the re-sent pages).
    pub resent_pages: u64,
    /// Sends deferred by holding hot pages back for the final round.
    pub held_back: u64,
    /// Times a pre-copy link broke and the migration resumed on a new one.
    #[serde(default)]
    pub recoveries: u32,
    /// Pages asked again after those breaks: the pages of the round the
    /// destination did not hold (or the source was not sure it sent),
    /// with the dirty logs of the outages (zero pages of a first round
    /// among them go as nothing again).
    #[serde(default)]
    pub recovery_resent: u64,
    /// The shortest control round trip the source measured (`Propose` to
    /// `Accept`, a round's `RoundEnd` to its `RoundApplied`),
    /// microseconds: an upper bound on the path's RTT, queueing and the
    /// destination's work included (0: none measured).
    #[serde(default)]
    pub round_trip_us: u64,
    /// The downtime pre-copy expected when it paused the VM (or at its
    /// last decision), milliseconds: the pages left over the measured
    /// rate, plus the handover's two round trips (`Finish`/`Ready`,
    /// `Handover`/`Started`), the durable records (`records_us`) and the
    /// destination's apply lag (`apply_lag_us`).
    #[serde(default)]
    pub expected_downtime_ms: u64,
    /// The durable records the pause holds on both sides, as the source
    /// estimated them from its own, microseconds (counted in the
    /// expected downtime).
    #[serde(default)]
    pub records_us: u64,
    /// The shortest time the destination took, beyond the path's round
    /// trip, to confirm a round after its `RoundEnd` (applying what was
    /// still in flight), microseconds: the expected downtime counts it
    /// for the last round (0: not measured, or no probes).
    #[serde(default)]
    pub apply_lag_us: u64,
    /// Where a pre-copy pause went (all zero after a post-copy switch,
    /// or when the migration did not reach `Started`).
    #[serde(default)]
    pub pause: PauseParts,
}

/// A pre-copy pause in its parts, microseconds. The four main parts are
/// the source's, on its clock, and together they are the downtime; the
/// finer ones lie within them (zero: not measured), the destination's
/// reported in `Started` and bounded by the part they fall in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseParts {
    /// From the pause to `Finish` sent: the last round's pages, after the
    /// dirty log and the device state were read.
    pub last_round_us: u64,
    /// `Finish` to `Ready`: the destination took the last pages, checked
    /// the root and the device state, and signed its receipt.
    pub verify_us: u64,
    /// `Ready` to `Handover` sent: the source recorded the handover
    /// durably and signed its `Sent` receipt.
    pub commit_us: u64,
    /// `Handover` to `Started`: the destination recorded it, started the
    /// VM and signed its receipt.
    pub start_us: u64,
    /// In the last round: the VM paused, its dirty log and its device
    /// state read.
    #[serde(default)]
    pub device_state_us: u64,
    /// In verify, at the destination: the last pages applied after
    /// `Finish` came.
    #[serde(default)]
    pub drain_us: u64,
    /// In verify, at the destination: the root folded and checked, the
    /// device state's digest, the `Ready` receipt signed and written.
    #[serde(default)]
    pub root_check_us: u64,
    /// In start, at the destination: its durable record of the handover.
    #[serde(default)]
    pub record_us: u64,
    /// In start, at the destination: the VM started from staging.
    #[serde(default)]
    pub vm_start_us: u64,
}

impl PauseParts {
    /// The four main parts in order (last round, verify, commit, start),
    /// microseconds.
    pub fn parts_us(&self) -> [u64; 4] {
        [
            self.last_round_us,
            self.verify_us,
            self.commit_us,
            self.start_us,
        ]
    }

    /// Whether a pause was measured (not a post-copy switch, nor a
    /// migration that never reached `Started`).
    pub fn measured(&self) -> bool {
        self.parts_us().iter().any(|&us| us > 0)
    }

    /// What verify and start hold beyond the destination's work it
    /// reported: the two round trips, the messages' handling and the
    /// receipts checked and signed on the way, microseconds.
    pub fn exchanges_us(&self) -> u64 {
        let verify = self
            .verify_us
            .saturating_sub(self.drain_us.saturating_add(self.root_check_us));
        let start = self
            .start_us
            .saturating_sub(self.record_us.saturating_add(self.vm_start_us));
        verify.saturating_add(start)
    }
}

/// How a post-copy phase went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostcopySummary {
    /// Pages owed at the switch.
    pub owed: u64,
    /// Page sends on the fault stream (the asked pages and their pre-paged
    /// neighbours).
    pub served: u64,
    /// Fetch requests received.
    pub fetches: u64,
    /// The destination's figures, from its Ready.
    pub faults: Option<FaultFigures>,
    /// Times the link broke and the migration resumed on a new one.
    #[serde(default)]
    pub recoveries: u32,
}

/// How demand paging went at the destination after a post-copy switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultFigures {
    /// Pages the VM touched before they had arrived.
    pub faults: u64,
    /// Median time from fault to page installed, microseconds.
    pub median_us: u64,
    /// 99th percentile of the same, microseconds.
    pub p99_us: u64,
}

/// The handover's share of a pre-copy migration's downtime when one
/// control round trip takes `round_trip`: two of them (`Finish`→`Ready`,
/// `Handover`→`Started`). The page engine's estimate and QEMU's
/// `downtime-limit` ([`crate::stream::qemu_downtime_limit`]) both count
/// it so.
pub fn handover_time(round_trip: std::time::Duration) -> std::time::Duration {
    round_trip.saturating_mul(2)
}

/// Where the pre-copy downtime ramp starts, milliseconds
/// ([`ramp_pages`]).
pub const RAMP_START_MS: u64 = 30;

/// Rounds pre-copy aims at [`RAMP_START_MS`] before the aim grows.
pub const RAMP_HOLD_ROUNDS: u32 = 4;

/// The pages' share of the downtime the ramp aims at after round `round`
/// (from 1) of at most `max_rounds`: [`RAMP_START_MS`] for the first
/// [`RAMP_HOLD_ROUNDS`] rounds, then half as much again each round; `None`
/// for the last two rounds allowed, which aim at the target itself
/// (`SourceConfig::downtime_aim`; QEMU's `downtime-limit`,
/// [`crate::stream::qemu_downtime_ramp`]).
pub fn ramp_pages(round: u32, max_rounds: u32) -> Option<std::time::Duration> {
    if round.saturating_add(2) > max_rounds {
        return None;
    }
    let steps = round.saturating_sub(RAMP_HOLD_ROUNDS);
    let ms = RAMP_START_MS as f64 * 1.5f64.powi(i32::try_from(steps).unwrap_or(i32::MAX));
    // An absurd round saturates: `from_secs_f64` would panic past u64.
    Some(std::time::Duration::try_from_secs_f64(ms / 1e3).unwrap_or(std::time::Duration::MAX))
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn connections_must_be_one_to_eight_and_at_most_the_streams() {
        let plan = |streams, connections| MigrationPlan {
            streams,
            connections,
            ..MigrationPlan::default()
        };
        assert_eq!(MigrationPlan::default().connections, 1);
        assert_eq!(plan(2, 1).validate(), Ok(()));
        assert_eq!(plan(8, 8).validate(), Ok(()));
        for (streams, connections) in [(2, 0), (2, 3), (16, 9)] {
            let e = plan(streams, connections).validate();
            assert_eq!(
                e,
                Err(PlanError::Connections {
                    connections,
                    streams
                }),
                "{streams} streams, {connections} connections"
            );
        }
        let why = plan(2, 3).validate().unwrap_err().to_string();
        assert!(why.contains("at most the streams (2), not 3"), "{why}");
    }

    #[test]
    fn a_plan_with_postcopy_has_one_lane_more_for_its_data_streams() {
        let plan = |mode, connections| MigrationPlan {
            mode,
            streams: 4,
            connections,
            ..MigrationPlan::default()
        };
        assert_eq!(plan(MigrationMode::Precopy, 1).lanes(), 0);
        assert_eq!(plan(MigrationMode::Precopy, 3).lanes(), 2);
        assert_eq!(plan(MigrationMode::Postcopy, 1).lanes(), 1);
        assert_eq!(plan(MigrationMode::Hybrid, 1).lanes(), 1);
        assert_eq!(plan(MigrationMode::Hybrid, 4).lanes(), 4);
        // Never out of range, even from a plan that does not validate.
        assert_eq!(plan(MigrationMode::Postcopy, 0).lanes(), 1);
        assert_eq!(plan(MigrationMode::Postcopy, u16::MAX).lanes(), u16::MAX);
    }
}
