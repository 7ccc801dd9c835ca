//! The report of one outgoing QEMU migration, from what the run gathered
//! and QEMU's own figures.

use crate::engine::clock;
use convoy_protocol::ctl::{MigrationReport, Outcome, QemuFigures};
use convoy_protocol::stream;

use super::{Finished, Run, State};

impl Run {
    pub(super) fn finish(self, st: State, outcome: Outcome) -> Finished {
        let outcome = match &st.unrecorded {
            Some(e) => Outcome::InDoubt(format!("{e}; the guest is kept paused here")),
            None => outcome,
        };
        let q = &st.qemu_info;
        let ram = &q["ram"];
        let (out_root, _) = stream::roots(&st.channels);
        let payload: u64 = st
            .channels
            .iter()
            .map(|c| c.out_bytes + c.back_bytes)
            .sum::<u64>()
            + st.control_bytes;
        let report = MigrationReport {
            migration: self.migration.to_string(),
            vm: self.req.vm.clone(),
            source: self.host.id.to_string(),
            destination: self.dest.to_string(),
            verified: st.verified,
            converged: st.qemu_status == "completed",
            total_ms: clock::since(self.started).as_secs_f64() * 1e3,
            downtime_ms: st.downtime_ms,
            rounds: u32::try_from(ram["dirty-sync-count"].as_u64().unwrap_or(0))
                .unwrap_or(u32::MAX),
            memory_bytes: self.prepared.manifest.spec.memory_mib << 20,
            pages_sent: ram["normal"].as_u64().unwrap_or(0)
                + ram["duplicate"].as_u64().unwrap_or(0),
            encodings: Default::default(),
            payload_bytes: payload,
            wire_bytes: st.wire_bytes,
            memory_root: (!st.channels.is_empty()).then_some(out_root),
            counter_at_pause: None,
            receipts: st.receipts,
            // QEMU's: its last dirty rate, its highest throttle.
            convergence: convoy_protocol::model::Convergence {
                dirty_rate: st.dirty_rate,
                throttle: st.throttle,
                pause: st.pause,
                ..Default::default()
            },
            postcopy: None,
            disks: Vec::new(),
            disk_blocks_sent: 0,
            lanes: 0,
            link: None,
            transport: st.transport.clone(),
            qemu: Some(Box::new(QemuFigures {
                mode: self.prepared.manifest.mode,
                status: st.qemu_status,
                total_ms: q["total-time"].as_u64(),
                downtime_ms: q["downtime"].as_u64(),
                transferred_bytes: ram["transferred"].as_u64(),
                multifd_channels: self.prepared.manifest.multifd_channels,
                disks_copied: u16::try_from(self.prepared.disks.len()).unwrap_or(u16::MAX),
                channels: st.channels,
            })),
            outcome,
        };
        Finished {
            report,
            phases: st.phases,
        }
    }
}
