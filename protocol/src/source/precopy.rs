//! Pre-copy: rounds, the convergence controls applied to each dirty log
//! (hot-page ordering, auto-converge, the honest end at the round limit),
//! and the pause that ends pre-copy with a final round or a post-copy
//! switch.

use std::time::{Duration, Instant};

use crate::message::Reason;
use crate::page::PageBitmap;

use super::{Phase, Source, SourceAction, SourceError, Switchover};

/// The auto-converge throttle steps, percent of guest CPU taken away.
pub const THROTTLE_STEPS: [u8; 5] = [20, 40, 60, 80, 95];

/// Rounds in whose dirty logs a page must appear to be held back as hot.
pub const HOT_ROUNDS: u8 = 2;

impl Source {
    /// The dirty log collected after a round.
    pub fn handle_dirty_log(&mut self, now: Instant, mut dirty: PageBitmap) {
        if !self.switched
            && matches!(
                self.phase,
                Phase::Reconnecting { .. } | Phase::AwaitResumed { .. }
            )
        {
            // Collected and cleared while the link is down: kept for when
            // it is back (a page dropped here would never be sent again).
            match self.carried.as_mut() {
                Some(c) => c.union_with(&dirty),
                None => self.carried = Some(dirty),
            }
            return;
        }
        let Phase::Copying {
            round,
            sending: false,
            ..
        } = self.phase
        else {
            return;
        };
        if let Some(c) = self.carried.take() {
            dirty.union_with(&c);
        }
        let dirtied = dirty.count();
        if let Some(last) = self.last_log_at.replace(now) {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            if secs > 0.0 {
                // CAST: a count over a positive time is finite and not
                // negative; `as` saturates at u64::MAX.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let rate = (dirtied as f64 / secs) as u64;
                self.convergence.dirty_rate = rate;
            }
        }
        // Everything not yet sent in its current version: this log, and the
        // pages held back before.
        let mut left = dirty.clone();
        left.union_with(&self.held);
        let remaining = left.count();
        let page = self.cfg.manifest.memory.page_size().bytes() as f64;
        let per_page = if self.round_pages > 0 {
            (self.round_bytes as f64 / self.round_pages as f64).max(1.0)
        } else {
            page
        };
        // No measured rate (simulated time that did not advance) means the
        // round took no time: the rest will not either.
        let data = if remaining == 0 || self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(remaining as f64 * per_page / self.rate as f64)
        };
        // The pause lasts until `Started` is back: the pages left, then
        // the handover's two round trips (on a 150 ms path, 300 ms that
        // no rate makes shorter) and the durable records between them.
        let handover = self.handover_estimate();
        // The last pages wait behind the destination's apply lag too.
        let lag = self.apply_lag();
        let expected = data.saturating_add(lag).saturating_add(handover);
        self.convergence.expected_downtime_ms = crate::units::millis(expected);
        self.progress("precopy", remaining);
        // The aim ramps up to the target (see `downtime_aim`); one whose
        // handover alone misses the target is held to the target.
        let aim = match self.handover_alone_misses() {
            true => self.cfg.max_downtime(),
            false => self.cfg.downtime_aim(round, handover),
        };
        if expected <= aim {
            self.converged = true;
            self.pause(round, left, false);
            return;
        }
        if let Switchover::Hybrid { after } = self.cfg.switchover() {
            let ran = self
                .copy_started
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let due = match after {
                Some(limit) => ran >= limit,
                None => true,
            };
            let stalling = dirtied.saturating_mul(2) >= self.round_pages;
            let hopeless = self.handover_alone_misses();
            if due || round >= self.cfg.plan().max_rounds || stalling || hopeless {
                // A pause within the target itself beats a switch: the
                // ramp's lower aim is not worth post-copy's exposure.
                let fits = expected <= self.cfg.max_downtime();
                self.converged = fits;
                self.pause(round, left, !fits);
                return;
            }
        }
        // Past the rounds, or (measured often enough) the handover's round
        // trips alone miss the target: more rounds cannot help either.
        if round >= self.cfg.plan().max_rounds || self.handover_alone_misses() {
            if self.cfg.plan().force_stop {
                self.pause(round, left, false);
            } else {
                let detail = format!(
                    "cannot converge at this dirty rate and bandwidth: the guest dirties {} pages/s, \
                     {} bytes/s are sent, and the {} pages left would take {} ms against a target of {} ms \
                     ({} ms of pages, {} ms for the destination to apply them, and {} ms for the handover's \
                     two round trips and durable records) \
                     after {} rounds (throttle {}%); raise --max-downtime, throttle the workload, \
                     use --mode postcopy or hybrid, or pass --force-stop",
                    self.convergence.dirty_rate,
                    self.rate,
                    remaining,
                    expected.as_millis(),
                    self.cfg.plan().max_downtime_ms,
                    data.as_millis(),
                    lag.as_millis(),
                    handover.as_millis(),
                    round,
                    self.convergence.throttle,
                );
                self.fail_with(now, Reason::CannotConverge(detail.clone()), detail);
            }
            return;
        }
        // Auto-converge: the guest dirties at least half as fast as we send
        // and the pause would overrun the target itself (not only the
        // ramp's lower aim: the guest is not slowed for a pause shorter
        // than the operator asked for) — unless the handover's round trips
        // alone take the target: then no throttle can help, and it would
        // only slow the guest.
        let futile = handover >= self.cfg.max_downtime();
        let over = expected > self.cfg.max_downtime();
        if self.cfg.plan().auto_converge
            && !futile
            && over
            && dirtied.saturating_mul(2) >= self.round_pages
        {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        if self.stalled >= 2 {
            self.stalled = 0;
            let current = self.convergence.throttle;
            if let Some(&next) = THROTTLE_STEPS.iter().find(|&&t| t > current) {
                self.convergence.throttle = next;
                self.actions
                    .push_back(SourceAction::Throttle { percent: next });
            }
        }
        // Hot-page ordering: pages in several rounds' logs wait for the end.
        let mut send = left;
        if self.cfg.plan().hold_hot_pages {
            if self.dirty_rounds.is_empty() {
                self.dirty_rounds = vec![0; self.tree.len()];
            }
            let mut hot = PageBitmap::empty(dirty.len());
            for p in dirty.iter() {
                if let Some(n) = self
                    .dirty_rounds
                    .get_mut(crate::page::saturating_usize(p.0))
                {
                    *n = n.saturating_add(1);
                    if *n >= HOT_ROUNDS {
                        hot.insert(p);
                    }
                }
            }
            send.subtract(&hot);
            self.convergence.held_back += hot.count();
            self.held = hot;
        }
        self.begin_round(now, round + 1, send, false);
    }

    /// The VM is paused since `paused` (at or before `now`: its dirty log,
    /// collected after pausing, and its device state were read since,
    /// inside the downtime).
    pub fn handle_paused(
        &mut self,
        now: Instant,
        paused: Instant,
        dirty: PageBitmap,
        device_state: Vec<u8>,
    ) -> Result<(), SourceError> {
        let Phase::Pausing { round, postcopy } = self.phase else {
            return Err(SourceError::Unexpected {
                phase: self.phase.name(),
                message: "VM paused",
            });
        };
        if device_state.len() > crate::message::MAX_DEVICE_STATE {
            return Err(self.fail(now, SourceError::DeviceStateTooLarge(device_state.len())));
        }
        let paused = paused.min(now);
        self.paused_at = Some(paused);
        self.pause_read = now.saturating_duration_since(paused);
        self.device_state = device_state;
        let mut last = self.pending.take().unwrap_or_else(|| dirty.clone());
        last.union_with(&dirty);
        let round = round + 1;
        self.rounds = round;
        self.round_bytes = 0;
        self.round_pages = 0;
        if postcopy && self.cfg.plan().storage_postcopy {
            // Storage post-copy: every leaf left is owed, disk blocks too.
            self.postcopy.owed = last.count();
            self.owed = Some(last);
            self.begin_switch();
            return Ok(());
        }
        if postcopy {
            // Memory goes by demand paging; without storage post-copy disk
            // blocks are not, so those left go now, inside the downtime,
            // and the switch lists their batches (the destination applies
            // them before the VM runs there).
            // The owed set is over the memory's pages (as the
            // destination reads it).
            let memory = self.cfg.manifest.memory.page_count();
            let mut disks = PageBitmap::empty(last.len());
            let mut owed = PageBitmap::empty(memory);
            for p in last.iter() {
                if p.0 >= memory {
                    disks.insert(p);
                } else {
                    owed.insert(p);
                }
            }
            self.postcopy.owed = owed.count();
            self.owed = Some(owed);
            if disks.count() > 0 {
                self.phase = Phase::SwitchDisks { round };
                self.progress("sending the disk blocks left", disks.count());
                self.actions.push_back(SourceAction::SendPages {
                    round,
                    pages: disks,
                    skip_zero: false,
                });
                return Ok(());
            }
            self.begin_switch();
            return Ok(());
        }
        self.phase = Phase::FinalCopy { round };
        self.progress("stop-and-copy", last.count());
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages: last,
            skip_zero: false,
        });
        Ok(())
    }

    pub(super) fn begin_round(
        &mut self,
        now: Instant,
        round: u32,
        pages: PageBitmap,
        skip_zero: bool,
    ) {
        self.rounds = round;
        self.round_bytes = 0;
        self.round_pages = 0;
        self.round_set = pages.clone();
        self.round_skip_zero = skip_zero;
        self.round_began = Some(now);
        self.round_sent = PageBitmap::empty(pages.len());
        self.round_ended = false;
        self.phase = Phase::Copying {
            round,
            round_start: now,
            sending: true,
        };
        self.actions.push_back(SourceAction::SendPages {
            round,
            pages,
            skip_zero,
        });
    }

    pub(super) fn pause(&mut self, round: u32, left: PageBitmap, postcopy: bool) {
        // Every earlier round's leaves are in: rehash their paths now,
        // while the guest still runs, so that the root at `Finish` covers
        // only the last round's pages (up to `FOLD_EVERY` pending leaves
        // cost about 2 ms in the pause otherwise).
        self.tree.root();
        self.held = PageBitmap::empty(left.len());
        self.pending = Some(left);
        self.phase = Phase::Pausing { round, postcopy };
        self.actions.push_back(SourceAction::PauseVm);
    }
}
