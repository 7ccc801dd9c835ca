//! The guest's service through a migration, from a [`Probe`]'s polls:
//! requests served per second, their response times per interval, and
//! what waits — and one summary of the whole window.
//!
//! [`Probe`]: super::Probe

use std::time::Instant;

use convoy_protocol::ctl::service::ServiceStats;
use serde::Serialize;

use super::probe::Poll;

/// The service between two polls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServicePoint {
    /// Seconds since the migration started at the source (the later poll).
    pub t_s: f64,
    /// Requests served per second.
    pub served_per_sec: f64,
    /// Their mean response time, milliseconds (none served: `None`).
    pub mean_ms: Option<f64>,
    /// Their 99th percentile, milliseconds (a histogram bucket's ceiling).
    pub p99_ms: Option<f64>,
    /// Requests waiting at the later poll.
    pub waiting: u64,
    /// How long the oldest of them had waited, milliseconds.
    pub oldest_waiting_ms: f64,
}

/// The service over the whole time it was polled.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceSummary {
    /// Requests arriving per second.
    pub requests_per_sec: u64,
    /// Requests served.
    pub served: u64,
    /// Requests their clients gave up on.
    pub dropped: u64,
    /// Mean response time, milliseconds.
    pub mean_ms: Option<f64>,
    /// Median, 99th percentile and the largest, milliseconds (bucket
    /// ceilings: up to 25% above the truth).
    pub p50_ms: Option<f64>,
    /// See `p50_ms`.
    pub p99_ms: Option<f64>,
    /// See `p50_ms`.
    pub max_ms: Option<f64>,
}

/// Microseconds as milliseconds.
// CAST: response times, far below f64's exact range.
#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// The service points of `polls` on the time axis that starts at
/// `origin`.
pub fn series(polls: &[Poll], origin: Instant) -> Vec<ServicePoint> {
    polls
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (w[0].service.as_ref()?, w[1].service.as_ref()?);
            let d = b.since(a);
            let dt = w[1].at.saturating_duration_since(w[0].at).as_secs_f64();
            // CAST: a count of requests in 100 ms, exact in f64.
            #[allow(clippy::cast_precision_loss)]
            let served_per_sec = if dt > 0.0 { d.served as f64 / dt } else { 0.0 };
            Some(ServicePoint {
                t_s: w[1].at.saturating_duration_since(origin).as_secs_f64(),
                served_per_sec,
                mean_ms: d.mean_us().map(ms),
                p99_ms: d.percentile_us(0.99).map(ms),
                waiting: b.waiting,
                oldest_waiting_ms: ms(b.oldest_waiting_us),
            })
        })
        .collect()
}

/// The service between the first and the last poll that saw it.
pub fn summary(polls: &[Poll]) -> Option<ServiceSummary> {
    let first: &ServiceStats = polls.iter().find_map(|p| p.service.as_ref())?;
    let last = polls.iter().rev().find_map(|p| p.service.as_ref())?;
    let d = last.since(first);
    Some(ServiceSummary {
        requests_per_sec: last.requests_per_sec,
        served: d.served,
        dropped: d.dropped,
        mean_ms: d.mean_us().map(ms),
        p50_ms: d.percentile_us(0.5).map(ms),
        p99_ms: d.percentile_us(0.99).map(ms),
        max_ms: d.percentile_us(1.0).map(ms),
    })
}

impl std::fmt::Display for ServiceSummary {
    /// One line: `service (1000 req/s): 5210 served, 0 dropped; response
    /// mean 3.1 ms, p50 0.1 ms, p99 61.4 ms, max 76.8 ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1} ms"));
        write!(
            f,
            "service ({} req/s): {} served, {} dropped; response mean {}, p50 {}, p99 {}, max {}",
            self.requests_per_sec,
            self.served,
            self.dropped,
            v(self.mean_ms),
            v(self.p50_ms),
            v(self.p99_ms),
            v(self.max_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use convoy_protocol::ctl::service::{bucket, BUCKETS};

    use super::*;

    fn poll(at: Instant, served: u64, slow: u64, waiting: u64) -> Poll {
        let mut histogram = vec![0; BUCKETS];
        histogram[bucket(100)] = served - slow;
        histogram[bucket(200_000)] = slow;
        Poll {
            at,
            counter: served,
            service: Some(ServiceStats {
                requests_per_sec: 1000,
                served,
                response_us_sum: (served - slow) * 100 + slow * 200_000,
                dropped: 0,
                waiting,
                oldest_waiting_us: waiting * 1000,
                histogram,
            }),
        }
    }

    #[test]
    fn rates_and_response_times_per_interval_and_overall() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let polls = [
            poll(ms(0), 100, 0, 0),
            poll(ms(100), 200, 0, 0),
            // Paused: nothing served, a backlog.
            poll(ms(200), 200, 0, 100),
            // The backlog drains, slowly answered.
            poll(ms(300), 400, 100, 0),
        ];
        let s = series(&polls, t0);
        assert_eq!(s.len(), 3);
        assert!((s[0].served_per_sec - 1000.0).abs() < 1e-6);
        assert_eq!(s[1].served_per_sec, 0.0);
        assert_eq!(s[1].mean_ms, None);
        assert_eq!(s[1].waiting, 100);
        assert!(s[2].p99_ms.unwrap() >= 200.0);
        let sum = summary(&polls).unwrap();
        assert_eq!(sum.served, 300);
        assert!(sum.p50_ms.unwrap() < 1.0);
        assert!(sum.max_ms.unwrap() >= 200.0);
        assert!(sum.to_string().contains("300 served"), "{sum}");
        // No service: no series, no summary.
        let none: Vec<Poll> = polls
            .iter()
            .map(|p| Poll {
                service: None,
                ..p.clone()
            })
            .collect();
        assert!(series(&none, t0).is_empty());
        assert!(summary(&none).is_none());
    }
}
