//! The sim guest's service: a steady stream of requests the vCPU serves
//! (see `convoy_protocol::ctl::service` for what is measured).
//!
//! Request `k` arrives at `epoch + (k + 1) / rate` on the wall clock,
//! whether the VM runs or not: clients keep sending. Each vCPU tick
//! serves the requests that have arrived, in order, up to four times the
//! arrival rate (so a backlog drains, at a finite pace); serving one
//! reads and writes a word of a page of the hot set chosen by the request
//! (so it dirties memory, and waits for the page after a post-copy switch
//! if it is still owed), then records the time from its arrival. What
//! the service has done is in the control words (`control::Svc`), so a
//! helper process runs it too, and travels in the device state, so the
//! destination serves on from the next request with the counters so far.
//!
//! The wall clock is the hosts' shared time (as NTP keeps it): a request
//! that arrived at the source and is served at the destination is timed
//! across both, which on one machine (the tests, the demo) is exact.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use convoy_protocol::ctl::service::{bucket, ServiceStats, BUCKETS, SERVICE_TIMEOUT_MS};

use super::control::{Control, Svc};
use super::Shared;

/// Microseconds since the Unix epoch.
pub(super) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, convoy_protocol::units::micros)
}

/// Requests arrived by `now` of a stream at `rate` since `epoch`.
fn arrived(epoch: u64, now: u64, rate: u64) -> u64 {
    let n = u128::from(now.saturating_sub(epoch)) * u128::from(rate) / 1_000_000;
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// When request `k` arrived.
fn arrival(epoch: u64, k: u64, rate: u64) -> u64 {
    let at = (u128::from(k) + 1) * 1_000_000 / u128::from(rate.max(1));
    epoch.saturating_add(u64::try_from(at).unwrap_or(u64::MAX))
}

/// A 64-bit mix of `k` (SplitMix64's finaliser): which page a request
/// touches.
fn mix(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Starts a service of `rate` requests a second now (0: none).
pub(super) fn start(ctl: &Control, rate: u64) {
    ctl.svc(Svc::EpochUs).store(now_us(), Ordering::Relaxed);
    ctl.svc(Svc::Rate).store(rate, Ordering::Relaxed);
}

/// One vCPU tick's share of the service: serves what has arrived.
pub(super) fn serve(shared: &Shared) {
    let ctl = &shared.ctl;
    let rate = ctl.svc(Svc::Rate).load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let epoch = ctl.svc(Svc::EpochUs).load(Ordering::Relaxed);
    let now = now_us();
    let mut next = ctl.svc(Svc::Next).load(Ordering::Relaxed);
    // Clients gave up on what waited past the timeout.
    let stale = arrived(epoch, now.saturating_sub(SERVICE_TIMEOUT_MS * 1000), rate);
    if next < stale {
        ctl.svc(Svc::Dropped)
            .fetch_add(stale - next, Ordering::Relaxed);
        next = stale;
    }
    // Never backwards (a wall clock stepped back, or a destination's
    // behind the source's): what was served is not served again.
    let end = arrived(epoch, now, rate)
        .min(next.saturating_add((4 * rate / 1000).max(4)))
        .max(next);
    let pages = shared.geometry.page_count();
    let page = shared.geometry.page_size().bytes();
    let hot = (pages * ctl.hot_set_pct().load(Ordering::Relaxed) / 100).max(1);
    let histogram = ctl.svc_histogram();
    for k in next..end {
        let h = mix(k);
        let p = h % hot;
        // A word of a 64-byte chunk other than the first (page 0's holds
        // the counter).
        let chunk = 1 + ((h >> 40) as usize % (page / 64 - 1));
        let w = (convoy_protocol::page::saturating_usize(p) * page + chunk * 64) / 8;
        let v = shared.mem.load_word(w);
        shared.mem.store_word(w, v.wrapping_add(k | 1));
        ctl.mark_dirty(p);
        let took = now_us().saturating_sub(arrival(epoch, k, rate));
        ctl.svc(Svc::Served).fetch_add(1, Ordering::Relaxed);
        ctl.svc(Svc::SumUs).fetch_add(took, Ordering::Relaxed);
        if let Some(b) = histogram.get(bucket(took)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
    ctl.svc(Svc::Next).store(end, Ordering::Relaxed);
}

/// The service's counters now (`None`: the VM has none).
pub(super) fn stats(ctl: &Control) -> Option<ServiceStats> {
    let rate = ctl.svc(Svc::Rate).load(Ordering::Relaxed);
    if rate == 0 {
        return None;
    }
    let epoch = ctl.svc(Svc::EpochUs).load(Ordering::Relaxed);
    let now = now_us();
    // Requests past the timeout are given up on whether or not the vCPU
    // runs to notice (a paused VM's clients give up too).
    let stale = arrived(epoch, now.saturating_sub(SERVICE_TIMEOUT_MS * 1000), rate);
    let next = ctl.svc(Svc::Next).load(Ordering::Relaxed);
    let given_up = stale.saturating_sub(next);
    let next = next.max(stale);
    let waiting = arrived(epoch, now, rate).saturating_sub(next);
    Some(ServiceStats {
        requests_per_sec: rate,
        served: ctl.svc(Svc::Served).load(Ordering::Relaxed),
        response_us_sum: ctl.svc(Svc::SumUs).load(Ordering::Relaxed),
        dropped: ctl
            .svc(Svc::Dropped)
            .load(Ordering::Relaxed)
            .saturating_add(given_up),
        waiting,
        oldest_waiting_us: if waiting > 0 {
            now.saturating_sub(arrival(epoch, next, rate))
        } else {
            0
        },
        histogram: ctl
            .svc_histogram()
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect(),
    })
}

/// The service as it travels in the device state.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct ServiceState {
    pub(super) rate: u64,
    pub(super) epoch_us: u64,
    pub(super) next: u64,
    pub(super) served: u64,
    pub(super) sum_us: u64,
    pub(super) dropped: u64,
    /// [`BUCKETS`] long.
    pub(super) histogram: Vec<u64>,
}

impl ServiceState {
    /// The service of `ctl` as it is now (meaningful while paused).
    pub(super) fn of(ctl: &Control) -> ServiceState {
        let w = |s| ctl.svc(s).load(Ordering::Relaxed);
        ServiceState {
            rate: w(Svc::Rate),
            epoch_us: w(Svc::EpochUs),
            next: w(Svc::Next),
            served: w(Svc::Served),
            sum_us: w(Svc::SumUs),
            dropped: w(Svc::Dropped),
            histogram: ctl
                .svc_histogram()
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// Whether a peer's state is within what the service relies on.
    pub(super) fn is_sane(&self) -> bool {
        self.rate <= convoy_protocol::ctl::service::MAX_SERVICE_REQUESTS_PER_SEC
            && self.histogram.len() == BUCKETS
    }

    /// Makes `ctl`'s service this one (a staging VM about to start).
    pub(super) fn restore(&self, ctl: &Control) {
        for (s, v) in [
            (Svc::Rate, self.rate),
            (Svc::EpochUs, self.epoch_us),
            (Svc::Next, self.next),
            (Svc::Served, self.served),
            (Svc::SumUs, self.sum_us),
            (Svc::Dropped, self.dropped),
        ] {
            ctl.svc(s).store(v, Ordering::Relaxed);
        }
        for (w, v) in ctl.svc_histogram().iter().zip(&self.histogram) {
            w.store(*v, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use convoy_protocol::ctl::ContentProfile;

    use super::super::testing::spec;
    use super::super::SimVm;
    use super::*;
    use crate::backend::VmBackend;

    #[test]
    fn arrivals_are_evenly_spaced() {
        assert_eq!(arrived(1_000, 1_000, 1000), 0);
        assert_eq!(arrived(1_000, 2_000, 1000), 1);
        assert_eq!(arrived(1_000, 1_001_000, 1000), 1000);
        assert_eq!(arrival(1_000, 0, 1000), 2_000);
        assert_eq!(arrival(1_000, 999, 1000), 1_001_000);
        assert_eq!(arrived(5, 1, 1000), 0, "a clock behind the epoch");
    }

    #[test]
    fn a_pause_queues_requests_and_the_backlog_drains_after_it() {
        let mut s = spec(4 << 20, 0, ContentProfile::Zero);
        s.service_requests_per_sec = 2000;
        let vm = SimVm::create(&s, None, None).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let before = vm.service().unwrap();
        assert!(before.served > 200, "{before:?}");
        assert!(before.percentile_us(0.5).unwrap() < 20_000, "{before:?}");
        vm.pause().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let paused = vm.service().unwrap();
        // No more served while paused; those waiting grow, the oldest is
        // as old as the pause.
        assert!(paused.served <= before.served + 10, "{paused:?}");
        assert!(paused.waiting >= 200, "{paused:?}");
        assert!(paused.oldest_waiting_us >= 140_000, "{paused:?}");
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let after = vm.service().unwrap().since(&paused);
        assert!(after.served >= 500, "{after:?}");
        // The backlog's requests waited out the pause.
        assert!(after.percentile_us(1.0).unwrap() >= 100_000, "{after:?}");
        assert!(after.waiting < 50, "{after:?}");
        // A VM without a service reports none.
        let quiet = SimVm::create(&spec(1 << 20, 0, ContentProfile::Zero), None, None).unwrap();
        assert!(quiet.service().is_none());
    }
}
