//! QEMU's own migration: its capabilities and parameters for the plan, and
//! its progress polled until it completes.

use crate::engine::clock;
use std::time::Duration;

use crate::transport::SendStream;
use convoy_protocol::ctl::Progress;
use convoy_protocol::model::MigrationMode;
use convoy_protocol::stream::QemuManifest;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Run, State, MIGRATION_TIMEOUT, PEER, POLL};
use crate::engine::qemu::common::{capabilities, digests, ChanEvent, Control, Fail};

/// QEMU's `max-bandwidth` when the operator set no cap (1 TiB/s).
const UNLIMITED: u64 = 1 << 40;

impl Run {
    /// Migration capabilities and parameters for this plan.
    pub(super) async fn configure(&self, m: &QemuManifest) -> Result<(), Fail> {
        self.qmp(
            "migrate-set-capabilities",
            json!({ "capabilities": capabilities(m) }),
        )
        .await?;
        let mut p = json!({
            "downtime-limit": self.plan.max_downtime_ms,
            "max-bandwidth": self.plan.bandwidth.unwrap_or(UNLIMITED),
        });
        if m.multifd_channels > 0 {
            p["multifd-channels"] = json!(m.multifd_channels);
        }
        self.qmp("migrate-set-parameters", p).await?;
        Ok(())
    }

    /// Polls QEMU's migration until it completes, reporting progress and
    /// switching to post-copy when the plan says so; returns QEMU's last
    /// `query-migrate`.
    pub(super) async fn watch(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        st: &mut State,
        opened: &mut usize,
        total_pages: u64,
    ) -> Result<Value, Fail> {
        let m = &self.prepared.manifest;
        let begun = clock::now();
        let mut switched = false;
        let info = loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.cancel.notified() => {
                    if !st.handed_over {
                        return Err(Fail::cancelled());
                    }
                    tracing::warn!(migration = %self.migration, "cancel refused: already switched to post-copy");
                }
                c = ctl.recv() => {
                    let m = Fail::from_control(c, PEER)?;
                    return Err(Fail::violation(PEER, format!("unexpected {} during the copy", m.kind())));
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Opened) => *opened += 1,
                    Some(ChanEvent::Done(kind, Ok(sp))) => st.channels.push(digests(kind, &sp)),
                    Some(ChanEvent::Done(kind, Err(e))) => return Err(Fail::link(format!("{kind}: {e}"))),
                    Some(ChanEvent::Bad(e)) => return Err(Fail::link(e)),
                    None => {}
                },
            }
            if clock::since(begun) > MIGRATION_TIMEOUT {
                return Err(Fail::local("QEMU's migration took too long"));
            }
            if !self.vm.alive().await {
                return Err(Fail::source_exited());
            }
            let q = self.qmp("query-migrate", Value::Null).await?;
            let status = q["status"].as_str().unwrap_or("").to_owned();
            let ram = &q["ram"];
            // CAST: `as` saturates, which is the reading wanted: a negative
            // or NaN rate from QEMU is 0, an absurd one u64::MAX.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rate_bytes_per_sec = (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64;
            let _ = self.progress.try_send(Progress {
                phase: format!("qemu {status}"),
                round: u32::try_from(ram["dirty-sync-count"].as_u64().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                pages_sent: ram["transferred"].as_u64().unwrap_or(0) / 4096,
                remaining_pages: ram["remaining"].as_u64().unwrap_or(0) / 4096,
                total_pages,
                payload_bytes: ram["transferred"].as_u64().unwrap_or(0),
                rate_bytes_per_sec,
            });
            match status.as_str() {
                "completed" => break q,
                "failed" | "cancelled" => {
                    let why = q["error-desc"].as_str().unwrap_or(&status).to_owned();
                    st.qemu_status = status;
                    return Err(Fail::local(format!(
                        "QEMU's migration {}: {why}",
                        st.qemu_status
                    )));
                }
                "active" if !switched => {
                    let due = match m.mode {
                        MigrationMode::Precopy => false,
                        MigrationMode::Postcopy => true,
                        MigrationMode::Hybrid => match self.plan.postcopy_after_ms {
                            Some(ms) => clock::since(begun) >= Duration::from_millis(u64::from(ms)),
                            // After the first full pass.
                            None => ram["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
                        },
                    };
                    if due {
                        switched = true;
                        self.switch(send, ctl, st).await?;
                    }
                }
                _ => {}
            }
        };
        Ok(info)
    }
}
