//! The simulated guest's vCPU: a loop that ticks every millisecond,
//! steps the device counter (kept in the first word of page 0) and
//! dirties memory at the VM's rate, 90% of it in a hot set; its disks'
//! block writes come from the same ticks with the same skew. The same
//! loop ([`run`]) runs on a thread of the agent or in a helper process
//! (`helper`): it reads and writes only the VM's memfd and disk files.
//!
//! Writes and the dirty bitmap: a page's bit is set after the write, with
//! release ordering, and collected by swap with acquire ordering (see
//! `source`), so a page read after its bit was collected is either current
//! or will be sent again. Each tick is bracketed by `control`'s
//! cross-process pause protocol, so once `pause` returns no write is in
//! flight. Auto-converge skips `throttle`% of the ticks.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use super::{Shared, SimVm};

impl SimVm {
    /// The workload's parameters (before it is spawned).
    pub(super) fn set_workload(&self, dirty_pages_per_sec: u64, hot_set_pct: u8, seed: u64) {
        let s = &self.shared.ctl;
        s.rate().store(dirty_pages_per_sec, Ordering::Relaxed);
        s.hot_set_pct()
            .store(u64::from(hot_set_pct), Ordering::Relaxed);
        s.seed().store(seed, Ordering::Relaxed);
    }

    /// Starts the vCPU thread (at creation, or when a staging image
    /// starts).
    pub(super) fn spawn_workload(&self) {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("sim-vcpu".into())
            .spawn(move || run(&shared, super::control::THREAD));
        match handle {
            Ok(h) => {
                if let Ok(mut w) = self.worker.lock() {
                    *w = Some(h);
                }
            }
            Err(e) => tracing::error!("cannot start the sim workload thread: {e}"),
        }
    }

    /// Stops the vCPU thread and waits for it (a helper process is
    /// stopped by `stop_helper`).
    pub(super) fn stop_workload(&self) {
        self.shared.local_stop.store(true, Ordering::Relaxed);
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The vCPU, host `me` ([`super::control::THREAD`] or a helper's pid):
/// one tick a millisecond while `owner` names it, until the VM stops.
pub(super) fn run(shared: &Shared, me: u64) {
    let ctl = &shared.ctl;
    let pages = shared.geometry.page_count();
    let page = shared.geometry.page_size().bytes();
    let mut rng = SmallRng::seed_from_u64(
        ctl.seed().load(Ordering::Relaxed) ^ ctl.counter().load(Ordering::Relaxed),
    );
    let mut next = Instant::now();
    let mut carry = 0.0f64;
    let mut disk_carry = vec![0.0f64; shared.disks.len()];
    let mut credit = 0.0f64;
    while !ctl.is_stopped()
        && !shared.local_stop.load(Ordering::Relaxed)
        && ctl.owner().load(Ordering::SeqCst) == me
    {
        next += Duration::from_millis(1);
        // A throttled vCPU runs only (100 - t)% of its ticks.
        credit += (100.0 - ctl.throttle().load(Ordering::Relaxed).min(99) as f64) / 100.0;
        let runs = credit >= 1.0;
        if runs {
            credit -= 1.0;
        }
        if runs && ctl.begin_tick() {
            {
                let c = ctl.counter().fetch_add(1, Ordering::Relaxed) + 1;
                shared.mem.store_word(0, c);
                ctl.mark_dirty(0);
                carry += ctl.rate().load(Ordering::Relaxed) as f64 / 1000.0;
                // CAST: `carry` is a sum of non-negative rates less its
                // whole part, so finite and not negative.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = carry as u64;
                carry -= n as f64;
                let hot = (pages * ctl.hot_set_pct().load(Ordering::Relaxed) / 100).max(1);
                for _ in 0..n {
                    let r = rng.next_u64();
                    let p = if r % 10 < 9 {
                        (r >> 8) % hot
                    } else {
                        (r >> 8) % pages
                    };
                    // A 64-byte chunk, never the counter word of page 0.
                    let chunk = 1 + ((r >> 40) as usize % (page / 64 - 1));
                    let base = (convoy_protocol::page::saturating_usize(p) * page + chunk * 64) / 8;
                    for k in 0..8 {
                        shared.mem.store_word(base + k, rng.next_u64());
                    }
                    ctl.mark_dirty(p);
                }
                // Disk writes, with the memory's hot-set skew.
                for (i, (d, c)) in shared.disks.iter().zip(disk_carry.iter_mut()).enumerate() {
                    *c += ctl.disk_rate(i) as f64 / 1000.0;
                    // CAST: as `carry` above, finite and not negative.
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let n = *c as u64;
                    *c -= n as f64;
                    let hot = (d.blocks() * ctl.hot_set_pct().load(Ordering::Relaxed) / 100).max(1);
                    for _ in 0..n {
                        let r = rng.next_u64();
                        let b = if r % 10 < 9 {
                            (r >> 8) % hot
                        } else {
                            (r >> 8) % d.blocks()
                        };
                        if d.guest_write(b, &mut rng) {
                            ctl.mark_written(i, b);
                        }
                    }
                }
                super::service::serve(shared);
            }
            ctl.end_tick();
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use convoy_protocol::ctl::ContentProfile;
    use convoy_protocol::page::PageIndex;

    use super::super::testing::spec;
    use super::*;
    use crate::backend::VmBackend;

    #[test]
    fn workload_dirties_and_pause_stops_writes() {
        let vm = SimVm::create(&spec(4 << 20, 20_000, ContentProfile::Mixed), None, None).unwrap();
        vm.start_dirty_log();
        std::thread::sleep(Duration::from_millis(50));
        let d = vm.collect_dirty_log();
        assert!(d.count() > 10, "{d:?}");
        assert!(d.contains(PageIndex(0)));
        vm.pause().unwrap();
        let c = vm.counter();
        let _ = vm.collect_dirty_log();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vm.counter(), c);
        assert!(vm.collect_dirty_log().is_empty());
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(vm.counter() > c);
    }

    #[test]
    fn a_throttled_vcpu_runs_fewer_ticks() {
        let vm = SimVm::create(&spec(1 << 20, 0, ContentProfile::Zero), None, None).unwrap();
        let ticks = |vm: &SimVm| {
            let c = vm.counter();
            std::thread::sleep(Duration::from_millis(200));
            vm.counter() - c
        };
        let free = ticks(&vm);
        vm.set_throttle(80);
        let throttled = ticks(&vm);
        vm.set_throttle(0);
        let lifted = ticks(&vm);
        // 80% throttled runs a fifth of the ticks; allow for a busy host.
        assert!(throttled * 3 < free, "free {free}, throttled {throttled}");
        assert!(lifted * 3 > free * 2, "free {free}, lifted {lifted}");
    }
}
