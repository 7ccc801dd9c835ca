//! The destination's control messages: every (phase, message) pair the
//! source accepts, and a typed refusal ([`SourceError::Unexpected`]) that
//! names both for the rest.

use std::time::{Duration, Instant};

use crate::ctl::Outcome;
use crate::digest::{device_state_digest, Digest};
use crate::message::{Message, VersionRange};
use crate::page::PageBitmap;
use crate::receipt::ReceiptKind;

use super::{Phase, Source, SourceAction, SourceError, Switchover};

/// Control round trips measured before the shortest is trusted to say
/// that the handover alone misses the downtime target: probes sent at
/// `Accept` and before the first two rounds' `RoundEnd` (with a
/// destination that does not answer probes, `Propose`→`Accept` and two
/// rounds' `RoundEnd`→`RoundApplied`, which hold its work too). Each is
/// an upper bound on the path's RTT, so a first one slowed by queues is
/// not taken for the path.
pub const TRUSTED_ROUND_TRIPS: u32 = 3;

/// Probes waiting for their answer at most: an older one is forgotten
/// (its answer then measures nothing).
pub const PROBES_IN_FLIGHT: usize = 4;

impl Source {
    /// A pre-copy round was applied at the destination: the rate it went
    /// at (an empty round measures nothing: the last rate stays).
    ///
    /// The round's time holds one round trip (the last page's way there,
    /// `RoundApplied`'s way back) that is not the link's rate: on a long
    /// path it would make a small round look slow, and the handover's
    /// round trips, counted apart, would be counted twice. So would the
    /// destination's apply lag, counted apart for the last round. Both
    /// are taken out, leaving at least a quarter of the time (the round
    /// trip is an upper bound).
    pub(super) fn measure_round(&mut self, now: Instant, round_start: Instant) {
        let took = now.saturating_duration_since(round_start);
        let counted_apart = self
            .round_trip
            .unwrap_or(Duration::ZERO)
            .saturating_add(self.apply_lag());
        let secs = took
            .saturating_sub(counted_apart)
            .max(took / 4)
            .as_secs_f64();
        if secs > 0.0 && self.round_bytes > 0 {
            // CAST: bytes over a positive time are finite and not
            // negative; `as` saturates at u64::MAX.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rate = (self.round_bytes as f64 / secs) as u64;
            self.rate = rate;
        }
    }

    /// Whether the destination answers probes at once: then only probes
    /// time the control path.
    fn probing(&self) -> bool {
        self.accepted
            .is_some_and(|c| c.has(crate::message::Capabilities::PROBE))
    }

    /// Sends a probe, when the destination answers them, and notes when.
    pub(super) fn send_probe(&mut self, now: Instant) {
        if !self.probing() {
            return;
        }
        self.probes_sent = self.probes_sent.wrapping_add(1);
        if self.probes.len() == PROBES_IN_FLIGHT {
            self.probes.pop_front();
        }
        self.probes.push_back((self.probes_sent, now));
        self.actions
            .push_back(SourceAction::Send(Box::new(Message::Probe(
                crate::stream::Probe {
                    seq: self.probes_sent,
                },
            ))));
    }

    /// A control exchange took `took`, from our message to the answer:
    /// the shortest so far bounds the path's round trip from above (it
    /// holds any queue on the path, as the handover's own exchanges will).
    /// Only a `trusted` one counts towards [`TRUSTED_ROUND_TRIPS`]: a
    /// probe, or where there are none, any exchange.
    pub(super) fn note_round_trip(&mut self, took: Duration, trusted: bool) {
        let rt = self.round_trip.map_or(took, |r| r.min(took));
        self.round_trip = Some(rt);
        if trusted {
            self.round_trips = self.round_trips.saturating_add(1);
        }
        self.convergence.round_trip_us = crate::units::micros(rt);
    }

    /// A round's `RoundEnd` to its `RoundApplied` took `took`: less the
    /// path's round trip (probes time it alone), the destination was
    /// still applying what was in flight. The last round waits for that
    /// too, inside the pause. The shortest so far is kept: like the round
    /// trip, an honest lower bound (a large round leaves more in flight
    /// than the last one will).
    fn note_apply_lag(&mut self, took: Duration) {
        let Some(rt) = self.round_trip else {
            return;
        };
        let lag = took.saturating_sub(rt);
        let lag = self.apply_lag.map_or(lag, |l| l.min(lag));
        self.apply_lag = Some(lag);
        self.convergence.apply_lag_us = crate::units::micros(lag);
    }

    /// The destination's apply lag ([`Source::note_apply_lag`]; zero
    /// before one is measured).
    pub(super) fn apply_lag(&self) -> Duration {
        self.apply_lag.unwrap_or(Duration::ZERO)
    }

    /// Whether the handover alone (its two round trips, the shortest of
    /// at least [`TRUSTED_ROUND_TRIPS`] exchanges, and its durable
    /// records) takes the downtime target: then no round, and no
    /// throttle, can bring the pause under the target.
    pub(super) fn handover_alone_misses(&self) -> bool {
        self.round_trips >= TRUSTED_ROUND_TRIPS
            && self.handover_estimate() >= self.cfg.max_downtime()
    }

    /// The handover's share of the downtime: `Finish` to `Ready` and
    /// `Handover` to `Started`, two round trips (none measured: none
    /// counted, as in simulated time that does not advance), and the
    /// durable records between them.
    pub(super) fn handover_estimate(&self) -> Duration {
        crate::model::handover_time(self.round_trip.unwrap_or(Duration::ZERO))
            .saturating_add(self.cfg.durable_records)
    }

    /// A message from the destination's control stream.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), SourceError> {
        if let Message::Probe(p) = msg {
            // The answer to a probe in flight times the path (and settles
            // the older ones: the stream is ordered); any other (late,
            // repeated, never sent) measures nothing.
            if let Some(i) = self.probes.iter().position(|(seq, _)| *seq == p.seq) {
                let (_, at) = self.probes[i];
                self.probes.drain(..=i);
                self.note_round_trip(now.saturating_duration_since(at), true);
            }
            return Ok(());
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, msg) {
            (Phase::Proposed { .. }, Message::Accept(a)) => {
                if !VersionRange::OURS.contains(a.version) {
                    return Err(self.fail(now, SourceError::Downgrade(a.version)));
                }
                if !self.cfg.capabilities.has(a.capabilities) {
                    return Err(self.fail(now, SourceError::Capabilities));
                }
                if let Err(e) = self.check_receipt(&a.receipt, ReceiptKind::Accepted, None) {
                    return Err(self.fail(now, e));
                }
                // A base held only for a disk that names one.
                let disks = &self.cfg.manifest.disks;
                if !a.bases.is_empty()
                    && (a.bases.len() != disks.len()
                        || a.bases
                            .iter()
                            .zip(disks)
                            .any(|(h, d)| *h && d.base.is_none()))
                {
                    return Err(self.fail(now, SourceError::Capabilities));
                }
                self.bases = a.bases;
                self.accepted = Some(a.capabilities);
                // Accept comes after the staging is made: an upper bound
                // of the path, and where the destination answers probes,
                // one times the path alone.
                if let Some(t) = self.started_at {
                    let probing = self.probing();
                    self.note_round_trip(now.saturating_duration_since(t), !probing);
                }
                self.send_probe(now);
                self.actions.push_back(SourceAction::StartDirtyLog);
                self.last_log_at = Some(now);
                self.copy_started = Some(now);
                let all = PageBitmap::full(self.tree.len() as u64);
                if self.cfg.switchover() == Switchover::Immediately {
                    // Every page is owed, zero pages included: the
                    // destination's memory starts missing, not zeroed.
                    self.pause(0, all, true);
                } else {
                    self.begin_round(now, 1, all, true);
                }
                Ok(())
            }
            (Phase::Proposed { .. }, Message::Reject(r)) => {
                self.finish_failed(now, format!("destination refused: {}", r.reason));
                Ok(())
            }
            (
                Phase::Draining {
                    round, round_start, ..
                },
                Message::RoundApplied(a),
            ) if a.round == round => {
                // RoundApplied waits for what was still in flight: an
                // upper bound, trusted only where no probe times the path.
                if let Some(t) = self.round_end_at.take() {
                    let probing = self.probing();
                    let took = now.saturating_duration_since(t);
                    self.note_round_trip(took, !probing);
                    if probing {
                        self.note_apply_lag(took);
                    }
                }
                self.measure_round(now, round_start);
                self.phase = Phase::Copying {
                    round,
                    round_start,
                    sending: false,
                };
                self.actions.push_back(SourceAction::CollectDirtyLog);
                Ok(())
            }
            (Phase::AwaitReady { .. }, Message::Ready(r)) => {
                let ours = self.root.unwrap_or(Digest([0; 32]));
                if r.memory_root != ours {
                    return Err(self.fail(
                        now,
                        SourceError::RootMismatch {
                            ours,
                            theirs: r.memory_root,
                        },
                    ));
                }
                if r.device_digest != device_state_digest(&self.device_state) {
                    return Err(self.fail(now, SourceError::DeviceStateMismatch));
                }
                let state = Some((ours, r.device_digest));
                if let Err(e) = self.check_receipt(&r.receipt, ReceiptKind::Ready, state) {
                    return Err(self.fail(now, e));
                }
                self.verified = true;
                self.pause_marks[1] = Some(now);
                self.postcopy.faults = r.faults;
                self.phase = Phase::Committing;
                if self.switched {
                    // Recorded at the switch already.
                    self.handle_handover_committed(now);
                } else {
                    self.actions.push_back(SourceAction::CommitHandover);
                }
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Started(s)) => {
                // The guest ran there while its disks were synced: that is
                // not downtime (bounded by the pause, a lie cannot make it
                // negative).
                let synced = Duration::from_millis(u64::from(s.synced_ms));
                if let (false, Some(p)) = (self.switched, self.paused_at) {
                    self.resumed_at =
                        Some(p + now.saturating_duration_since(p).saturating_sub(synced));
                }
                self.note_pause_parts(now, synced, s.pause);
                // Whatever the receipt, the VM is the destination's now: a
                // bad receipt leaves the outcome in doubt, never resumed.
                match self.check_receipt(&s.receipt, ReceiptKind::Started, self.state()) {
                    Ok(()) => {
                        self.actions.push_back(SourceAction::DiscardVm);
                        self.finish(now, Outcome::Completed);
                        Ok(())
                    }
                    Err(e) => {
                        self.finish(now, Outcome::InDoubt(e.to_string()));
                        Err(e)
                    }
                }
            }
            (Phase::AwaitRunning { .. }, Message::Abort(a)) => {
                // The destination could not start the VM on the switch and
                // discarded what it held: nothing ran there, the VM is ours.
                self.handed_over = false;
                self.switched = false;
                self.actions.push_back(SourceAction::RollBack);
                self.finish(
                    now,
                    Outcome::Aborted(format!("destination could not start: {}", a.reason)),
                );
                Ok(())
            }
            (Phase::AwaitRunning { round, .. }, Message::PostcopyRunning(_)) => {
                self.resumed_at = Some(now);
                self.phase = Phase::PostCopy {
                    round,
                    pushing: true,
                };
                let owed = self
                    .owed
                    .clone()
                    .unwrap_or_else(|| PageBitmap::empty(self.tree.len() as u64));
                self.progress("post-copy", owed.count());
                self.actions.push_back(SourceAction::SendPages {
                    round,
                    pages: owed,
                    skip_zero: false,
                });
                Ok(())
            }
            (Phase::AwaitResumed { round, .. }, Message::Resumed(r)) if self.switched => {
                self.resume(now, round, r)
            }
            (Phase::AwaitResumed { round, .. }, Message::PrecopyResumed(r)) if !self.switched => {
                self.resume_precopy(now, round, r)
            }
            // (Never for a source restarted after the switch: it resumes
            // only a destination that signed that it runs the VM.)
            (Phase::AwaitResumed { .. }, Message::PrecopyResumed(_))
                if self.switched && self.resumed_at.is_none() && !self.restarted =>
            {
                // The link broke before the destination took the switch:
                // it is still in pre-copy, and a destination that took it
                // would answer Resumed. Nothing ran there (as when it
                // cannot start the VM): it discards its copy, and the VM
                // is ours again.
                self.handed_over = false;
                self.switched = false;
                self.actions
                    .push_back(SourceAction::Send(Box::new(Message::Abort(
                        crate::message::Abort {
                            reason: crate::message::Reason::Cancelled,
                        },
                    ))));
                self.actions.push_back(SourceAction::RollBack);
                self.finish(
                    now,
                    Outcome::Aborted(
                        "the link broke before the destination took the post-copy switch; it \
                         never ran the VM"
                            .into(),
                    ),
                );
                Ok(())
            }
            (Phase::AwaitResumed { .. }, Message::Abort(a)) if !self.switched => {
                // Pre-copy: a destination that waits for us registered
                // the migration when it accepted it, and gives a broken
                // link up before it answers a Resume it can take; a
                // refusal is final. The VM runs on here.
                self.finish_failed(
                    now,
                    format!("the destination refused to resume: {}", a.reason),
                );
                Ok(())
            }
            (phase @ Phase::AwaitResumed { .. }, Message::Abort(a)) => {
                // Refused on that connection (the destination may not yet
                // have given the old link up): dial again within the
                // window; past it, in doubt.
                self.phase = phase;
                self.handle_link_lost(now, &format!("resume refused: {}", a.reason));
                Ok(())
            }
            (Phase::PostCopy { round, pushing }, Message::Fetch(f)) => {
                self.phase = Phase::PostCopy { round, pushing };
                self.serve(now, round, &f)
            }
            (
                phase @ (Phase::AwaitReady { .. } | Phase::Committing | Phase::AwaitStarted { .. }),
                Message::Fetch(_),
            ) if self.switched => {
                // Every page is on its way already.
                self.phase = phase;
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Abort(a)) if self.switched => {
                // The VM ran there: never resumed here.
                self.finish(
                    now,
                    Outcome::InDoubt(format!(
                        "destination aborted after the switch: {}",
                        a.reason
                    )),
                );
                Ok(())
            }
            (Phase::AwaitStarted { .. }, Message::Abort(a)) => {
                // The destination says it did not start the VM and has
                // discarded its copy: the VM is ours again. (A destination
                // that lies here could run a second copy, but it could do
                // that with the state it was handed anyway.)
                self.handed_over = false;
                self.actions.push_back(SourceAction::RollBack);
                self.finish(
                    now,
                    Outcome::Aborted(format!("destination could not start: {}", a.reason)),
                );
                Ok(())
            }
            (Phase::Done, _) => {
                self.phase = Phase::Done;
                Ok(())
            }
            (phase, Message::Abort(a)) => {
                self.phase = phase;
                self.finish_failed(now, format!("destination aborted: {}", a.reason));
                Ok(())
            }
            (phase, msg) => {
                let e = SourceError::Unexpected {
                    phase: phase.name(),
                    message: msg.kind(),
                };
                self.phase = phase;
                Err(self.fail(now, e))
            }
        }
    }
}
