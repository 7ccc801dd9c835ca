//! The bandwidth cap (`--bandwidth`): one pacer shared by every data
//! stream of a migration.
//!
//! A virtual clock: each frame reserves `bytes / rate` seconds after the
//! previous reservation and waits until its slot, less a small burst
//! allowance so that a short gap does not leave the link idle. Over any
//! window longer than the burst the streams together send at most `rate`
//! bytes per second (plus one burst).
//!
//! Post-copy's fault frames do not wait their turn ([`Pacer::charge`]): a
//! vCPU waits on each, and behind the push's reservations (a 1 MiB frame
//! per data stream, 100 ms each at 10 MiB/s) a fault would wait as long.
//! They are sent at once and charged to the clock, so the push's next
//! frames wait for them instead, and the cap holds over any window but
//! for the fault bytes sent ahead of their slot.

use crate::engine::clock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Unused allowance a stream may catch up on at once.
const BURST: Duration = Duration::from_millis(20);

/// Paces frames to a byte rate.
#[derive(Debug)]
pub(crate) struct Pacer {
    rate: u64,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second (at least 1).
    pub(crate) fn new(rate: u64) -> Self {
        Pacer {
            rate: rate.max(1),
            next: Mutex::new(None),
        }
    }

    /// Reserves a slot for `bytes` and returns when it may be sent.
    fn reserve(&self, now: Instant, bytes: u64) -> Instant {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = match *next {
            Some(t) if t > now => t,
            // Idle: allow a burst's worth of catching up, no more.
            Some(t) => t.max(now.checked_sub(BURST).unwrap_or(now)),
            None => now,
        };
        *next = Some(start + cost);
        start.checked_sub(BURST).unwrap_or(start)
    }

    /// Counts `bytes` sent now, ahead of their slot: the next frames to
    /// reserve wait for them.
    pub(crate) fn charge(&self, bytes: u64) {
        let _ = self.reserve(clock::now(), bytes);
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn take(&self, bytes: u64) {
        let at = self.reserve(clock::now(), bytes);
        if at > clock::now() {
            clock::sleep_until(at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_rate() {
        let p = Pacer::new(1_000_000);
        let t0 = clock::now();
        // 100 frames of 100 kB at 1 MB/s: the last one waits ~9.9 s minus
        // the burst, whoever sends them.
        let mut last = t0;
        for _ in 0..100 {
            last = p.reserve(t0, 100_000);
        }
        let waited = last.duration_since(t0);
        assert!(
            waited >= Duration::from_millis(9_800) && waited <= Duration::from_millis(9_900),
            "{waited:?}"
        );
    }

    #[test]
    fn an_idle_pacer_does_not_bank_more_than_a_burst() {
        let p = Pacer::new(1_000_000);
        let t0 = clock::now();
        let _ = p.reserve(t0, 1_000);
        // Ten idle seconds later, a 1 MB frame still costs ~1 s to the next.
        let later = t0 + Duration::from_secs(10);
        let _ = p.reserve(later, 1_000_000);
        let next = p.reserve(later, 1);
        let gap = next.duration_since(later);
        assert!(gap >= Duration::from_millis(940), "{gap:?}");
    }

    #[test]
    fn a_charged_frame_goes_now_and_the_next_reservation_waits_for_it() {
        let p = Pacer::new(1_000_000);
        let t0 = clock::now();
        // A push frame already holds the next second.
        let _ = p.reserve(t0, 1_000_000);
        // A fault's 100 kB: sent at once (`charge` does not wait), and
        // paid for by the push: its next slot is 0.1 s later than without.
        p.charge(100_000);
        let next = p.reserve(t0, 1);
        let gap = next.duration_since(t0);
        assert!(
            gap >= Duration::from_millis(1_075) && gap <= Duration::from_millis(1_085),
            "{gap:?}"
        );
        let without = Pacer::new(1_000_000);
        let _ = without.reserve(t0, 1_000_000);
        let next = without.reserve(t0, 1);
        assert!(next.duration_since(t0) < Duration::from_millis(985));
    }

    #[tokio::test(start_paused = true)]
    async fn streams_sharing_a_pacer_wait_on_the_engines_clock() {
        let p = std::sync::Arc::new(Pacer::new(1_000_000));
        let t0 = clock::now();
        // Two streams, 10 frames of 100 kB each at 1 MB/s: 2 s of link,
        // less the burst the first frame may take at once.
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let p = p.clone();
            tasks.push(crate::engine::spawn(async move {
                for _ in 0..10 {
                    p.take(100_000).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("stream task");
        }
        let took = clock::since(t0);
        assert!(
            took >= Duration::from_millis(1_880) && took <= Duration::from_millis(1_900),
            "{took:?}"
        );
    }
}
