//! The message sequence at the source (see `convoy_protocol::stream`):
//! `Propose`, `Accept`, QEMU's stream carried, `StreamsDone`, `Ready`, the
//! handover and `Started`; for post-copy, the `Switch` in between.

use crate::engine::clock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::transport::{Connection, SendStream};
use convoy_protocol::ctl::{Outcome, VmState};
use convoy_protocol::journal::JournalStep;
use convoy_protocol::message::{Abort, Handover, Manifest, Message, Propose, Reason, VersionRange};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::page::{MemoryGeometry, PageSize};
use convoy_protocol::receipt::{ticket_digest, ReceiptKind};
use convoy_protocol::stream::{self, ChannelKind, Switch};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::channels::{accept_channels, listen};
use super::{Run, State, ACCEPT_TIMEOUT, PEER, STARTED_TIMEOUT};
use crate::engine::qemu::common::{ChanEvent, Control, Fail};
use crate::transport::write_message;

impl Run {
    /// Everything up to the source's commitment: accepted, QEMU's stream
    /// carried, and the destination's `Ready` agreeing with what was sent.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn before_handover(
        &self,
        conn: &Connection,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        chan_tx: &mpsc::UnboundedSender<ChanEvent>,
        chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
        acceptors: &mut JoinSet<()>,
        st: &mut State,
    ) -> Result<(), Fail> {
        let m = &self.prepared.manifest;
        let notary = self.notary();
        let td = ticket_digest(&self.req.ticket);
        let pages = m.spec.memory_mib * 256;
        let memory = MemoryGeometry::new(PageSize::SIZE_4K, pages)
            .map_err(|e| Fail::local(format!("memory geometry: {e}")))?;
        let propose = Message::Propose(Propose {
            versions: VersionRange::OURS,
            capabilities: crate::host::fleet::declared(&self.host),
            migration: self.migration,
            vm: self.req.vm.clone(),
            attributes: self.attributes.clone(),
            manifest: Manifest {
                memory,
                data_streams: u16::try_from(m.channels())
                    .map_err(|_| Fail::local("more channels than a manifest can name"))?,
                qemu: Some(Box::new(m.clone())),
                postcopy: false,
                start_paused: false,
                plan: self.plan.clone(),
                reuse: None,
                disks: Vec::new(),
            },
            ticket: self.req.ticket.clone(),
        });
        st.control_bytes += write_message(send, &propose).await.map_err(Fail::link)? as u64;
        match self.next(ctl, ACCEPT_TIMEOUT, "Accept").await? {
            Message::Accept(a) => {
                notary
                    .check(
                        &a.receipt,
                        &self.dest,
                        ReceiptKind::Accepted,
                        self.migration,
                        td,
                        None,
                    )
                    .map_err(|e| Fail::violation(PEER, format!("Accepted receipt: {e}")))?;
                st.receipts.push(a.receipt);
            }
            Message::Reject(r) => {
                return Err(Fail {
                    detail: format!("refused by the destination: {}", r.reason),
                    reason: r.reason,
                    tell: false,
                })
            }
            other => {
                return Err(Fail::violation(
                    PEER,
                    format!("{} instead of Accept", other.kind()),
                ))
            }
        }
        self.phase(st, "accepted: the destination's QEMU waits");
        let limit = self.downtime_limit(send, ctl, st).await?;

        // QEMU connects to sockets we own; each connection becomes a stream.
        let out_sock = self.vm.dir().join("migrate-out.sock");
        let migration_listener = listen(&out_sock)?;
        // Only the VM's own QEMU may connect (SO_PEERCRED).
        let qemu_pid = self.vm.pid().await;
        acceptors.spawn(accept_channels(
            migration_listener,
            qemu_pid,
            conn.clone(),
            self.migration,
            (0..=m.multifd_channels)
                .map(ChannelKind::Migration)
                .collect(),
            chan_tx.clone(),
            (m.mode, st.credits.clone()),
        ));
        let mut opened = 0usize;
        if !self.prepared.disks.is_empty() {
            let nbd_sock = self.vm.dir().join("nbd-out.sock");
            let nbd_listener = listen(&nbd_sock)?;
            acceptors.spawn(accept_channels(
                nbd_listener,
                qemu_pid,
                conn.clone(),
                self.migration,
                (0..)
                    .zip(&self.prepared.disks)
                    .map(|(i, _)| ChannelKind::Nbd(i))
                    .collect(),
                chan_tx.clone(),
                (m.mode, st.credits.clone()),
            ));
            opened += self.mirror_disks(&nbd_sock, ctl, chans, st).await?;
        }
        self.configure(m, limit).await?;
        (st.limit_ms, st.pass) = (limit, 1);
        st.ramped_ms = self.ramped(limit, 1, m.mode);
        self.qmp(
            "migrate",
            json!({ "uri": format!("unix:{}", out_sock.display()) }),
        )
        .await?;
        self.phase(st, "QEMU migrating");
        let info = self
            .watch(
                send,
                ctl,
                (chan_tx, chans),
                acceptors,
                st,
                &mut opened,
                pages,
            )
            .await?;
        st.qemu_status = "completed".into();
        st.qemu_info = info;
        for e in self.vm.take_events().await {
            if e["event"] == "STOP" {
                let t = &e["timestamp"];
                st.stop_at_unix_us = Some(
                    t["seconds"].as_u64().unwrap_or(0) * 1_000_000
                        + t["microseconds"].as_u64().unwrap_or(0),
                );
            }
        }
        self.phase(st, "QEMU finished sending");
        if !self.prepared.disks.is_empty() {
            self.complete_mirrors().await?;
        }
        self.streams_done(send, ctl, chans, st, (opened, td))
            .await?;
        self.phase(st, "the destination holds every byte sent");
        Ok(())
    }

    /// Post-copy: commit, have the destination start the guest as soon as
    /// it can, then let QEMU switch.
    pub(super) async fn switch(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        st: &mut State,
    ) -> Result<(), Fail> {
        // Recorded before the destination may start the guest.
        self.journal(JournalStep::Commit)
            .await
            .map_err(|e| Fail::local(format!("the switch could not be recorded: {e}")))?;
        st.committed = true;
        let m = Message::Switch(Switch {
            migration: self.migration,
        });
        st.control_bytes += write_message(send, &m).await.map_err(Fail::link)? as u64;
        match self.next(ctl, Duration::from_secs(10), "Switch").await? {
            Message::Switch(s) if s.migration == self.migration => {}
            other => {
                return Err(Fail::violation(
                    PEER,
                    format!("{} instead of Switch", other.kind()),
                ))
            }
        }
        // From the switch on the guest runs only at the destination.
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        st.handed_over = true;
        self.phase(
            st,
            "switched to post-copy: the guest runs at the destination",
        );
        self.qmp("migrate-start-postcopy", Value::Null).await?;
        Ok(())
    }

    /// Commits (precopy) and waits for `Started`.
    pub(super) async fn handover(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        st: &mut State,
    ) -> Outcome {
        let notary = self.notary();
        let td = ticket_digest(&self.req.ticket);
        let roots = stream::roots(&st.channels);
        // Recorded before anything is handed over (post-copy: at the
        // switch already).
        if !st.committed {
            if let Err(e) = self.journal(JournalStep::Commit).await {
                let why = format!("the handover could not be recorded: {e}");
                let abort = Message::Abort(Abort {
                    reason: Reason::Internal(why.clone()),
                });
                let _ = write_message(send, &abort).await;
                self.roll_back(st).await;
                return Outcome::Aborted(why);
            }
            st.committed = true;
        }
        // From here the guest must never run here again.
        self.host.set_state(&self.req.vm, VmState::InDoubt);
        st.handed_over = true;
        self.phase(st, "handed over");
        let sent = match notary.sign(
            clock::now(),
            ReceiptKind::Sent,
            self.migration,
            td,
            Some(roots),
        ) {
            Ok(r) => r,
            Err(e) => {
                // Not sent yet: the guest may still resume here.
                st.handed_over = false;
                let _ = write_message(
                    send,
                    &Message::Abort(Abort {
                        reason: Reason::Internal(e.to_string()),
                    }),
                )
                .await;
                self.roll_back(st).await;
                return Outcome::Aborted(format!("cannot sign the Sent receipt: {e}"));
            }
        };
        st.receipts.push(sent.clone());
        let h = Message::Handover(Handover {
            receipt: sent,
            reuse: None,
        });
        match write_message(send, &h).await {
            Ok(n) => st.control_bytes += n as u64,
            Err(e) => return self.in_doubt(st, format!("link lost at the handover: {e}")),
        }
        st.pause_marks[2] = Some(unix_us());
        let started = match self.next(ctl, STARTED_TIMEOUT, "Started").await {
            Ok(Message::Started(s)) => s,
            Ok(other) => return self.in_doubt(st, format!("{} instead of Started", other.kind())),
            Err(f) => return self.in_doubt(st, f.detail),
        };
        if let Err(e) = notary.check(
            &started.receipt,
            &self.dest,
            ReceiptKind::Started,
            self.migration,
            td,
            Some(roots),
        ) {
            return self.in_doubt(st, format!("Started receipt: {e}"));
        }
        let now_us = unix_us();
        // The downtime is over: QEMU's final figures may be waited for.
        st.qemu_info = self.final_figures(std::mem::take(&mut st.qemu_info)).await;
        // The guest ran at the destination while its start was recorded
        // there: not downtime.
        let ran_us = u64::from(started.synced_ms) * 1000;
        st.downtime_ms = match (self.prepared.manifest.mode, st.stop_at_unix_us) {
            (MigrationMode::Precopy, Some(stop)) => {
                if let [Some(f), Some(r), Some(h)] = st.pause_marks {
                    st.pause = pause_parts([stop, f, r, h, now_us], ran_us, started.pause);
                }
                let down = now_us.saturating_sub(stop);
                down.saturating_sub(ran_us) as f64 / 1e3
            }
            // Post-copy: the guest ran at the destination long before
            // Started; QEMU's own figure is the downtime.
            _ => st.qemu_info["downtime"].as_f64().unwrap_or(0.0),
        };
        st.receipts.push(started.receipt);
        // Recorded before the copy here goes; else it is kept paused.
        if let Err(e) = self.journal(JournalStep::Start).await {
            return self.in_doubt(
                st,
                format!("started at the destination, but that could not be recorded: {e}"),
            );
        }
        self.phase(st, "started at the destination: QEMU here quit");
        self.host.remove(&self.req.vm);
        self.vm.stop().await;
        Outcome::Completed
    }
}

/// Now on the wall clock, in microseconds since the epoch: the clock of
/// QEMU's `STOP` event, where a QEMU pause begins.
pub(super) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, convoy_protocol::units::micros)
}

/// A QEMU pre-copy pause in its parts, from its marks (QEMU's `STOP`,
/// `StreamsDone` sent, `Ready` come, `Handover` sent, `Started` come, each
/// in wall-clock microseconds), less `ran_us` the guest already ran at the
/// destination, with the destination's `share` put in. The last round is
/// QEMU's stop-and-copy and the tunnel's drain.
fn pause_parts(
    [stop, finish, ready, handover, started]: [u64; 5],
    ran_us: u64,
    share: convoy_protocol::message::DestinationPause,
) -> convoy_protocol::model::PauseParts {
    share.put_in(convoy_protocol::model::PauseParts {
        last_round_us: finish.saturating_sub(stop),
        verify_us: ready.saturating_sub(finish),
        commit_us: handover.saturating_sub(ready),
        start_us: started.saturating_sub(handover).saturating_sub(ran_us),
        ..Default::default()
    })
}
