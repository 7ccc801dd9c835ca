//! QEMU's own migration: its capabilities and parameters for the plan, and
//! its progress polled until it completes.

use crate::engine::clock;
use std::time::Duration;

use crate::transport::{write_message, SendStream};
use convoy_protocol::ctl::Progress;
use convoy_protocol::message::{Message, Reason};
use convoy_protocol::model::MigrationMode;
use convoy_protocol::stream::QemuManifest;
use convoy_protocol::stream::{qemu_downtime_limit, qemu_downtime_ramp, Probe};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Run, State, MIGRATION_TIMEOUT, PEER, POLL};
use crate::engine::qemu::common::{
    capabilities, digests, is_migration_event, sent, ChanEvent, Control, Fail,
};
use crate::engine::qemu::recovery::{is_loss, live_channel, Broken};
use tokio::task::JoinSet;

/// Control round trips timed before QEMU starts (the shortest counts).
const PROBES: u32 = 3;
/// How long one may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's `max-bandwidth` when the operator set no cap (1 TiB/s).
const UNLIMITED: u64 = 1 << 40;
/// The downtime limit that makes QEMU stop and copy whatever is left
/// (`--force-stop` past the rounds): QEMU's largest, 2000 s.
const FORCED_DOWNTIME_MS: u64 = 2_000_000;

/// Why pre-copy gave up, with QEMU's figures: the rounds, the dirty rate,
/// the send rate, the throttle and the downtime it expected.
fn no_convergence(q: &Value, max_rounds: u32, target_ms: u32) -> String {
    let ram = &q["ram"];
    format!(
        "pre-copy did not converge in {max_rounds} rounds: the guest dirties {} pages/s, the \
         link takes {:.1} Mbit/s, the guest is throttled {}%, and the expected downtime is {} ms \
         against a target of {target_ms} ms; the VM runs on at the source (--force-stop stops \
         anyway, auto-converge throttles the guest)",
        ram["dirty-pages-rate"].as_u64().unwrap_or(0),
        ram["mbps"].as_f64().unwrap_or(0.0),
        q["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        q["expected-downtime"].as_u64().unwrap_or(0),
    )
}

impl Run {
    /// Migration capabilities and parameters for this plan: those both
    /// QEMUs share, and the source's own auto-converge (QEMU throttles the
    /// guest's vCPUs, 20% then 20% more each round up to 99%, while the
    /// guest dirties memory faster than half the link takes it), as sim
    /// VMs do.
    pub(super) async fn configure(&self, m: &QemuManifest, limit_ms: u64) -> Result<(), Fail> {
        let mut caps = capabilities(m);
        if let Some(list) = caps.as_array_mut() {
            list.push(json!({
                "capability": "auto-converge",
                "state": self.plan.auto_converge && m.mode != MigrationMode::Postcopy,
            }));
        }
        self.qmp("migrate-set-capabilities", json!({ "capabilities": caps }))
            .await?;
        // The throttle's steps as the sim VMs': 20%, then 20% more a
        // round (QEMU's default step, 10%, takes twice the rounds).
        // The operator's cap holds after a post-copy switch too (QEMU
        // takes `max-postcopy-bandwidth` then; 0 is no cap).
        let mut p = json!({
            "downtime-limit": self.ramped(limit_ms, 1, m.mode),
            "max-bandwidth": self.plan.bandwidth.unwrap_or(UNLIMITED),
            "max-postcopy-bandwidth": self.plan.bandwidth.unwrap_or(0),
            "cpu-throttle-initial": 20,
            "cpu-throttle-increment": 20,
        });
        if m.multifd_channels > 0 {
            p["multifd-channels"] = json!(m.multifd_channels);
        }
        self.qmp("migrate-set-parameters", p).await?;
        Ok(())
    }

    /// QEMU's `downtime-limit` during its pass `pass`, under `limit_ms`:
    /// the ramp ([`qemu_downtime_ramp`]) before a post-copy switch (a
    /// post-copy migration stops the guest without it).
    pub(super) fn ramped(&self, limit_ms: u64, pass: u64, mode: MigrationMode) -> u64 {
        match mode {
            MigrationMode::Postcopy => limit_ms,
            _ => qemu_downtime_ramp(limit_ms, pass, self.plan.max_rounds),
        }
    }

    /// QEMU's `downtime-limit`: the plan's target less the handover's two
    /// round trips, each the shortest of [`PROBES`] control round trips
    /// timed now ([`convoy_protocol::stream::qemu_downtime_limit`]). When
    /// the round trips alone take the target, a pre-copy migration ends
    /// here, before QEMU sends anything (the VM runs on), unless
    /// `--force-stop` (or a post-copy switch) is asked for: then QEMU gets
    /// 1 ms and the round limit (or the switch) ends pre-copy.
    pub(super) async fn downtime_limit(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        st: &mut State,
    ) -> Result<u64, Fail> {
        let mut rtt = Duration::MAX;
        for seq in 0..PROBES {
            let sent = clock::now();
            let probe = Message::Probe(Probe { seq });
            st.control_bytes += write_message(send, &probe).await.map_err(Fail::link)? as u64;
            match self.next(ctl, PROBE_TIMEOUT, "Probe").await? {
                Message::Probe(p) if p.seq == seq => rtt = rtt.min(clock::since(sent)),
                other => {
                    return Err(Fail::violation(
                        PEER,
                        format!("{} instead of Probe {seq}", other.kind()),
                    ))
                }
            }
        }
        let target = self.plan.max_downtime_ms;
        let rtt_ms = rtt.as_secs_f64() * 1e3;
        match qemu_downtime_limit(target, rtt) {
            Some(limit) => {
                self.phase(
                    st,
                    &format!(
                        "control round trip {rtt_ms:.1} ms: QEMU's downtime limit {limit} ms \
                         (the {target} ms target less the handover's two round trips){}",
                        if self.plan.mode == MigrationMode::Postcopy {
                            String::new()
                        } else {
                            format!(
                                ", reached by a ramp from {} ms over QEMU's passes",
                                self.ramped(limit, 1, self.plan.mode)
                            )
                        }
                    ),
                );
                Ok(limit)
            }
            None if self.plan.mode == MigrationMode::Precopy && !self.plan.force_stop => {
                let why = format!(
                    "the handover's two round trips alone ({rtt_ms:.1} ms each) take the \
                     {target} ms downtime target; the VM runs on at the source (a larger \
                     --max-downtime, --force-stop or post-copy would move it)"
                );
                Err(Fail::new(Reason::CannotConverge(why.clone()), why))
            }
            None => {
                self.phase(
                    st,
                    &format!(
                        "control round trip {rtt_ms:.1} ms: the handover alone takes the {target} \
                         ms target; QEMU's downtime limit 1 ms"
                    ),
                );
                Ok(1)
            }
        }
    }

    /// QEMU's figures of a completed migration, `q` or a later query:
    /// QEMU reports `completed` a moment before it sets its total time
    /// (and under load a query lands in between, reading 0), so it is
    /// asked again, briefly, until the total is there.
    pub(super) async fn final_figures(&self, mut q: Value) -> Value {
        for _ in 0..25 {
            if q["total-time"].as_u64().is_some_and(|t| t > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            match self.qmp("query-migrate", Value::Null).await {
                Ok(again) if again["status"] == "completed" => q = again,
                _ => break,
            }
        }
        q
    }

    /// Polls QEMU's migration until it completes, reporting progress and
    /// switching to post-copy when the plan says so; returns QEMU's last
    /// `query-migrate`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn watch(
        &self,
        send: &mut SendStream,
        ctl: &mut mpsc::Receiver<Control>,
        (chan_tx, chans): (
            &mpsc::UnboundedSender<ChanEvent>,
            &mut mpsc::UnboundedReceiver<ChanEvent>,
        ),
        acceptors: &mut JoinSet<()>,
        st: &mut State,
        opened: &mut usize,
        total_pages: u64,
    ) -> Result<Value, Fail> {
        let m = &self.prepared.manifest;
        let begun = clock::now();
        let mut last_sample: Option<Duration> = None;
        let mut switched = false;
        let mut forced = false;
        if let Some(link) = &st.link {
            st.window.start(link);
        }
        let info = loop {
            tokio::select! {
                // Polled every `POLL`, and at once when QEMU's migration
                // changes state (its end, inside the downtime) or passes.
                _ = self.vm.next_event(is_migration_event, POLL) => {}
                () = self.cancel.notified() => {
                    if !st.handed_over {
                        return Err(Fail::cancelled());
                    }
                    tracing::warn!(migration = %self.migration, "cancel refused: already switched to post-copy");
                }
                c = ctl.recv() => {
                    if is_loss(&c) && self.recoverable(st) {
                        self.recover(send, ctl, chans, chan_tx, acceptors, st, opened, None).await?;
                        continue;
                    }
                    let m = Fail::from_control(c, PEER)?;
                    return Err(Fail::violation(PEER, format!("unexpected {} during the copy", m.kind())));
                }
                ev = chans.recv() => match ev {
                    Some(ChanEvent::Opened) => *opened += 1,
                    Some(ChanEvent::Sent(kind, c)) => st.sent.push(sent(kind, c)),
                    Some(ChanEvent::Done(kind, Ok(sp))) => st.channels.push(digests(kind, &sp)),
                    Some(ChanEvent::Done(kind, Err(e)))
                        if kind == live_channel(st.recoveries) && self.recoverable(st) =>
                    {
                        let broken = Broken::from_event(kind, e)
                            .map_err(|e| Fail::link(format!("{kind}: {e}")))?;
                        self.recover(send, ctl, chans, chan_tx, acceptors, st, opened, Some(broken))
                            .await?;
                        continue;
                    }
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
            if let Some(link) = &st.link {
                st.window.update(link, clock::since(begun));
                // Each channel may run a send window ahead of what the
                // destination's QEMU has read (over TCP, whose buffers
                // this window does not follow, as the transport allows).
                st.credits.set_window(if link.quic_path().is_some() {
                    st.window.current()
                } else {
                    u64::MAX
                });
            }
            let q = self.qmp("query-migrate", Value::Null).await?;
            let status = q["status"].as_str().unwrap_or("").to_owned();
            // A new pass: the ramp's next limit, until it is forced or
            // switched (a change QEMU takes at its next check).
            let pass = q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            if status == "active" && pass > st.pass && !switched && !forced {
                st.pass = pass;
                let next = self.ramped(st.limit_ms, pass, m.mode);
                if next != st.ramped_ms {
                    self.qmp("migrate-set-parameters", json!({ "downtime-limit": next }))
                        .await?;
                    st.ramped_ms = next;
                }
            }
            if status == "device" {
                if let Some(link) = &st.link {
                    st.window.open(link);
                }
            }
            // What a failed or cancelled migration reports: the last
            // figures, not none.
            st.qemu_info = q.clone();
            st.qemu_status.clone_from(&status);
            let ram = &q["ram"];
            let throttle = q["cpu-throttle-percentage"].as_u64().unwrap_or(0);
            st.throttle = st.throttle.max(u8::try_from(throttle).unwrap_or(u8::MAX));
            if let Some(rate) = ram["dirty-pages-rate"].as_u64().filter(|r| *r > 0) {
                st.dirty_rate = rate;
            }
            // CAST: `as` saturates, which is the reading wanted: a negative
            // or NaN rate from QEMU is 0, an absurd one u64::MAX.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rate_bytes_per_sec = (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64;
            let sample = sample(
                clock::since(begun),
                &mut last_sample,
                st.dirty_rate,
                &status,
                ram,
            );
            let _ = self.progress.try_send(Progress {
                phase: format!("qemu {status}"),
                round: u32::try_from(ram["dirty-sync-count"].as_u64().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                pages_sent: ram["transferred"].as_u64().unwrap_or(0) / 4096,
                remaining_pages: ram["remaining"].as_u64().unwrap_or(0) / 4096,
                total_pages,
                payload_bytes: ram["transferred"].as_u64().unwrap_or(0),
                rate_bytes_per_sec,
                sample,
            });
            match status.as_str() {
                // QEMU's final figures are read after the handover
                // ([`Run::final_figures`]): not inside the downtime.
                "completed" => break q,
                "failed" | "cancelled" => {
                    let why = q["error-desc"].as_str().unwrap_or(&status).to_owned();
                    st.qemu_status = status;
                    return Err(Fail::local(format!(
                        "QEMU's migration {}: {why}",
                        st.qemu_status
                    )));
                }
                // Pre-copy past its rounds (QEMU's dirty syncs: the first
                // pass is the first). Past them: stop and copy with
                // --force-stop (QEMU stops once the downtime limit admits
                // what is left, so the limit is lifted), or give up here.
                "active"
                    if !switched
                        && m.mode == MigrationMode::Precopy
                        && ram["dirty-sync-count"].as_u64().unwrap_or(0)
                            > u64::from(self.plan.max_rounds) =>
                {
                    if self.plan.force_stop {
                        if !forced {
                            forced = true;
                            self.qmp(
                                "migrate-set-parameters",
                                json!({ "downtime-limit": FORCED_DOWNTIME_MS }),
                            )
                            .await?;
                        }
                    } else {
                        let why =
                            no_convergence(&q, self.plan.max_rounds, self.plan.max_downtime_ms);
                        return Err(Fail::new(
                            convoy_protocol::message::Reason::CannotConverge(why.clone()),
                            why,
                        ));
                    }
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

/// A timeline sample of QEMU's migration every
/// [`convoy_protocol::ctl::SAMPLE_EVERY_MS`] (`last`: when the previous
/// one was taken): QEMU's dirty rate and post-copy page requests; the VM
/// is paused at the source once QEMU left `active` (stop-and-copy, or
/// since the post-copy switch). QEMU guests have no work counter.
fn sample(
    elapsed: Duration,
    last: &mut Option<Duration>,
    dirty_pages_per_sec: u64,
    status: &str,
    ram: &Value,
) -> Option<convoy_protocol::ctl::Sample> {
    let every = Duration::from_millis(convoy_protocol::ctl::SAMPLE_EVERY_MS);
    if last.is_some_and(|t| elapsed < t + every) {
        return None;
    }
    *last = Some(elapsed);
    Some(convoy_protocol::ctl::Sample {
        elapsed_ms: convoy_protocol::units::millis(elapsed),
        dirty_pages_per_sec,
        guest_work: 0,
        faults_served: ram["postcopy-requests"].as_u64().unwrap_or(0),
        paused: !matches!(status, "active" | "setup"),
    })
}
