//! A sim VM's service: the statistics of the steady stream of requests
//! its guest serves (see the agent's `backend::sim::service`), as an
//! agent reports them and as they travel in the device state.
//!
//! Requests arrive at a fixed rate on the wall clock from the moment the
//! service started, whatever the VM does; the guest serves them in order
//! while it runs (each touches guest memory), so a request that arrives
//! while the VM is paused waits, and one whose page is still owed after a
//! post-copy switch waits for the fault. Its response time is from its
//! arrival to the guest having served it. A client gives up on a request
//! after [`SERVICE_TIMEOUT_MS`]: it is counted as dropped.
//!
//! Response times go into a log-linear histogram of [`BUCKETS`] buckets of
//! microseconds (four per power of two, so a percentile read from it is
//! within 25% above the truth), the way HdrHistogram keeps latencies.

use serde::{Deserialize, Serialize};

/// The most requests per second a sim VM's service may take (held at
/// creation and on a peer's device state, like the dirty rate).
pub const MAX_SERVICE_REQUESTS_PER_SEC: u64 = 100_000;

/// A client gives up on a request this old, milliseconds.
pub const SERVICE_TIMEOUT_MS: u64 = 10_000;

/// Buckets of the response-time histogram.
pub const BUCKETS: usize = 128;

/// The bucket of a response time of `us` microseconds.
pub fn bucket(us: u64) -> usize {
    if us < 4 {
        // CAST: below 4.
        #[allow(clippy::cast_possible_truncation)]
        return us as usize;
    }
    let octave = 63 - us.leading_zeros() as usize; // ≥ 2
    let sub = ((us >> (octave - 2)) & 3) as usize;
    (4 * (octave - 1) + sub).min(BUCKETS - 1)
}

/// The largest response time, microseconds, bucket `i` holds.
pub fn bucket_ceiling(i: usize) -> u64 {
    if i < 4 {
        return i as u64;
    }
    if i >= BUCKETS - 1 {
        return u64::MAX;
    }
    let octave = i / 4 + 1;
    let sub = (i % 4) as u64;
    ((4 + sub + 1) << (octave - 2)) - 1
}

/// A service's counters at one host at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceStats {
    /// Requests arriving per second.
    pub requests_per_sec: u64,
    /// Requests served since the service started (wherever the VM ran).
    pub served: u64,
    /// The sum of their response times, microseconds.
    pub response_us_sum: u64,
    /// Requests given up on by their clients.
    pub dropped: u64,
    /// Requests arrived and not yet served, as this host sees it.
    pub waiting: u64,
    /// How long the oldest of them has waited, microseconds.
    pub oldest_waiting_us: u64,
    /// Served requests by response time ([`bucket`]); [`BUCKETS`] long.
    pub histogram: Vec<u64>,
}

impl ServiceStats {
    /// The requests served between `earlier` and `self` (two readings of
    /// the same service, counters only going up): their counts and
    /// histogram; `waiting` is `self`'s.
    pub fn since(&self, earlier: &ServiceStats) -> ServiceStats {
        ServiceStats {
            requests_per_sec: self.requests_per_sec,
            served: self.served.saturating_sub(earlier.served),
            response_us_sum: self.response_us_sum.saturating_sub(earlier.response_us_sum),
            dropped: self.dropped.saturating_sub(earlier.dropped),
            waiting: self.waiting,
            oldest_waiting_us: self.oldest_waiting_us,
            histogram: self
                .histogram
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.histogram.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The mean response time, microseconds (`None` with nothing served).
    pub fn mean_us(&self) -> Option<u64> {
        self.response_us_sum.checked_div(self.served)
    }

    /// The response time, microseconds, that a share `q` (0..=1) of the
    /// requests served did not exceed, as the ceiling of its bucket
    /// (`None` with nothing served).
    pub fn percentile_us(&self, q: f64) -> Option<u64> {
        let total = self
            .histogram
            .iter()
            .fold(0u64, |t, n| t.saturating_add(*n));
        if total == 0 {
            return None;
        }
        // CAST: a count of requests, exact enough in f64; the product is
        // within 0..=total.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, n) in self.histogram.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Some(bucket_ceiling(i));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_hold_their_values_within_a_quarter() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 20, 1 << 33, u64::MAX]) {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            assert!(b < BUCKETS);
            assert!(bucket_ceiling(b) >= us, "{us} in {b}");
            if us >= 4 && b < BUCKETS - 1 {
                assert!(
                    bucket_ceiling(b) <= us + us / 4,
                    "{us}: {}",
                    bucket_ceiling(b)
                );
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_and_differences() {
        let mut h = vec![0; BUCKETS];
        for us in [100u64, 200, 300, 400, 50_000] {
            h[bucket(us)] += 1;
        }
        let s = ServiceStats {
            requests_per_sec: 10,
            served: 5,
            response_us_sum: 51_000,
            histogram: h,
            ..ServiceStats::default()
        };
        assert_eq!(s.mean_us(), Some(10_200));
        let p50 = s.percentile_us(0.5).unwrap();
        assert!((300..=375).contains(&p50), "{p50}");
        let p99 = s.percentile_us(0.99).unwrap();
        assert!((50_000..=62_500).contains(&p99), "{p99}");
        let d = s.since(&s);
        assert_eq!(d.served, 0);
        assert_eq!(d.percentile_us(0.5), None);
        assert_eq!(d.mean_us(), None);
        assert_eq!(s.since(&ServiceStats::default()).served, 5);
    }
}
