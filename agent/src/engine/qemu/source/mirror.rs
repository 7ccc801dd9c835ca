//! The disk mirrors: one QEMU `blockdev-mirror` per disk into the
//! destination's NBD exports, brought in sync before memory moves and
//! ended after it.

use crate::engine::clock;
use std::time::{Duration, Instant};

use convoy_protocol::ctl::Progress;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Run, State, MIGRATION_TIMEOUT, PEER, POLL};
use crate::engine::qemu::common::{ChanEvent, Control, Fail};

impl Run {
    /// Starts one mirror per disk into the destination's NBD exports and
    /// waits until each is in sync; returns the channels opened.
    pub(super) async fn mirror_disks(
        &self,
        nbd_sock: &std::path::Path,
        ctl: &mut mpsc::Receiver<Control>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        st: &mut State,
    ) -> Result<usize, Fail> {
        let mut opened = 0;
        for i in 0..self.prepared.disks.len() {
            self.qmp(
                "blockdev-add",
                json!({
                    "driver": "nbd",
                    "node-name": mirror_node(i),
                    "server": { "type": "unix", "path": nbd_sock.display().to_string() },
                    "export": format!("disk{i}"),
                }),
            )
            .await?;
            self.qmp(
                "blockdev-mirror",
                json!({
                    "job-id": mirror_job(i),
                    // Its drive, or its node when it was adopted so.
                    "device": self.vm.block_devices.get(i).cloned().unwrap_or_else(|| format!("disk{i}")),
                    "target": mirror_node(i),
                    "sync": "full",
                    "auto-dismiss": true,
                }),
            )
            .await?;
        }
        self.phase(st, "mirroring disks");
        let end = clock::now() + MIGRATION_TIMEOUT;
        let mut last: Option<(Instant, u64)> = None;
        let mut rate = 0;
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.cancel.notified() => return Err(Fail::cancelled()),
                c = ctl.recv() => {
                    let m = Fail::from_control(c, PEER)?;
                    return Err(Fail::violation(PEER, format!("unexpected {} while mirroring", m.kind())));
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Opened) => opened += 1,
                    Some(ChanEvent::Sent(kind, c)) => st.sent.push(crate::engine::qemu::common::sent(kind, c)),
                    Some(ChanEvent::Done(kind, Ok(_))) => return Err(Fail::link(format!("{kind} ended while mirroring"))),
                    Some(ChanEvent::Done(kind, Err(e))) => return Err(Fail::link(format!("{kind}: {e}"))),
                    Some(ChanEvent::Bad(e)) => return Err(Fail::link(e)),
                    None => {}
                },
            }
            if clock::now() > end {
                return Err(Fail::local("disk mirrors did not reach sync in time"));
            }
            let jobs = self.qmp("query-block-jobs", Value::Null).await?;
            let jobs = jobs.as_array().cloned().unwrap_or_default();
            // Progress as for memory: bytes mirrored of the disks' total,
            // in 4 KiB units.
            let ours = || {
                jobs.iter().filter(|j| {
                    (0..self.prepared.disks.len()).any(|i| j["device"] == mirror_job(i).as_str())
                })
            };
            let done: u64 = ours().filter_map(|j| j["offset"].as_u64()).sum();
            let len: u64 = ours().filter_map(|j| j["len"].as_u64()).sum();
            let now = clock::now();
            if let Some((at, before)) = last {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    // CAST: bytes over a positive time are finite and not
                    // negative; `as` saturates at u64::MAX.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let r = (done.saturating_sub(before) as f64 / secs) as u64;
                    rate = r;
                }
            }
            last = Some((now, done));
            let _ = self.progress.try_send(Progress {
                phase: "mirroring disks".into(),
                round: 0,
                pages_sent: done / 4096,
                remaining_pages: len.saturating_sub(done) / 4096,
                total_pages: len / 4096,
                payload_bytes: done,
                rate_bytes_per_sec: rate,
                sample: None,
            });
            let mut ready = 0;
            for i in 0..self.prepared.disks.len() {
                match jobs.iter().find(|j| j["device"] == mirror_job(i).as_str()) {
                    Some(j) if j["ready"] == true => ready += 1,
                    Some(j) if j["status"] == "concluded" || j["status"] == "aborting" => {
                        return Err(Fail::local(format!(
                            "the mirror of disk {i} failed: {}",
                            j["error"].as_str().unwrap_or("?")
                        )))
                    }
                    Some(_) => {}
                    None => return Err(Fail::local(format!("the mirror of disk {i} vanished"))),
                }
            }
            if ready == self.prepared.disks.len() {
                break;
            }
        }
        self.phase(st, "disks in sync; memory next");
        Ok(opened)
    }

    /// After memory: the guest is stopped, so the mirrors are complete;
    /// end them without pivoting (the destination owns its copies) and
    /// close the NBD connections.
    pub(super) async fn complete_mirrors(&self) -> Result<(), Fail> {
        for i in 0..self.prepared.disks.len() {
            self.qmp("block-job-cancel", json!({ "device": mirror_job(i) }))
                .await?;
        }
        let end = clock::now() + Duration::from_secs(30);
        loop {
            let jobs = self.qmp("query-block-jobs", Value::Null).await?;
            if jobs.as_array().is_none_or(|j| j.is_empty()) {
                break;
            }
            if clock::now() > end {
                return Err(Fail::local("disk mirrors did not complete"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for e in self.vm.take_events().await {
            if e["event"] == "BLOCK_JOB_ERROR" {
                return Err(Fail::local(format!("a disk mirror failed: {}", e["data"])));
            }
        }
        for i in 0..self.prepared.disks.len() {
            self.qmp("blockdev-del", json!({ "node-name": mirror_node(i) }))
                .await?;
        }
        Ok(())
    }
}

pub(super) fn mirror_node(i: usize) -> String {
    format!("convoy-mirror-target{i}")
}

pub(super) fn mirror_job(i: usize) -> String {
    format!("convoy-mirror{i}")
}
