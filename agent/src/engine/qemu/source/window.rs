//! How much of QEMU's stream the source lets QUIC hold unacknowledged.
//!
//! QEMU paces itself by its socket: it measures the rate at which the
//! tunnel takes its bytes, and stops the guest when what is left fits the
//! downtime limit at that rate. A tunnel that accepts tens of MiB the
//! link has not carried yet (the connection's send window, 64 MiB by
//! default) both inflates that rate and leaves a backlog that must drain
//! while the guest is stopped: through Convoy QEMU reported 83–206 ms of
//! downtime where its own TLS migration of the same guest had 42–79. The
//! window is therefore kept near what the link needs in flight: twice its
//! bandwidth-delay product (the lowest round trip seen, the rate the
//! connection has been sending at), never below [`MIN_WINDOW`] nor above
//! the transport's window. Starting at the floor, a link that is
//! window-bound sends at `window / rtt`, so the window doubles each
//! sample until the link, not the window, limits the rate.
//!
//! Over TCP the kernel's socket buffers bound what is in flight, and this
//! does nothing.

use std::time::Duration;

use crate::transport::Connection;

/// The smallest send window: a loopback or LAN link runs at full rate
/// with it.
pub(super) const MIN_WINDOW: u64 = 1 << 20;

/// How long the send rate is averaged over before the window follows it.
const SAMPLE: Duration = Duration::from_millis(100);

/// The send window for a link of round trip `rtt` sending `rate` bytes per
/// second: twice the bandwidth-delay product, within `MIN_WINDOW..=max`.
pub(super) fn window_for(rtt: Duration, rate: f64, max: u64) -> u64 {
    // CAST: saturating; a NaN rate gives 0, the floor.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bdp2 = (2.0 * rtt.as_secs_f64() * rate) as u64;
    bdp2.clamp(MIN_WINDOW, max.max(MIN_WINDOW))
}

/// The source's send window for QEMU's stream, kept from the link's rate
/// and round trip.
#[derive(Debug)]
pub(super) struct SendWindow {
    max: u64,
    /// When the current sample began, and the bytes sent by then.
    since: Option<(Duration, u64)>,
    /// Bytes per second, smoothed over samples.
    rate: f64,
    min_rtt: Option<Duration>,
    set: u64,
}

impl SendWindow {
    /// A window no larger than `max` (the transport's connection window).
    pub(super) fn new(max: u64) -> Self {
        SendWindow {
            max,
            since: None,
            rate: 0.0,
            min_rtt: None,
            set: 0,
        }
    }

    /// Sets `conn`'s send window to the floor: the start of a migration,
    /// or a new link after a recovery.
    pub(super) fn start(&mut self, conn: &Connection) {
        self.since = None;
        self.rate = 0.0;
        self.min_rtt = None;
        self.set = MIN_WINDOW;
        conn.set_send_window(MIN_WINDOW);
    }

    /// Takes a reading of `conn` at `now` (time since any fixed point) and
    /// moves its window once a sample is complete; the window set.
    pub(super) fn update(&mut self, conn: &Connection, now: Duration) -> u64 {
        let Some((rtt, ..)) = conn.quic_path() else {
            return self.set;
        };
        if !rtt.is_zero() {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let sent = conn.stats().sent;
        let Some((t0, b0)) = self.since else {
            self.since = Some((now, sent));
            return self.set;
        };
        let span = now.saturating_sub(t0);
        if span < SAMPLE {
            return self.set;
        }
        // CAST: byte counts far below 2^52 are exact in an f64.
        #[allow(clippy::cast_precision_loss)]
        let rate = sent.saturating_sub(b0) as f64 / span.as_secs_f64();
        self.rate = if self.rate == 0.0 {
            rate
        } else {
            (self.rate + rate) / 2.0
        };
        self.since = Some((now, sent));
        let w = window_for(self.min_rtt.unwrap_or(rtt), self.rate, self.max);
        // Only a change of more than an eighth is worth a call into QUIC.
        if w.abs_diff(self.set) > self.set / 8 {
            conn.set_send_window(w);
            self.set = w;
        }
        self.set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_twice_the_bdp_within_its_bounds() {
        let max = 64 << 20;
        // Loopback: a few hundred microseconds at 300 MB/s is under the floor.
        assert_eq!(
            window_for(Duration::from_micros(300), 300e6, max),
            MIN_WINDOW
        );
        // 100 Mbit/s at 150 ms: 1.875 MB in flight, twice that.
        assert_eq!(
            window_for(Duration::from_millis(150), 12.5e6, max),
            3_750_000
        );
        // 1 Gbit/s at 150 ms would want 37.5 MB: under the transport's 64 MiB.
        assert_eq!(
            window_for(Duration::from_millis(150), 125e6, max),
            37_500_000
        );
        // 10 Gbit/s at 150 ms: the transport's window.
        assert_eq!(window_for(Duration::from_millis(150), 1.25e9, max), max);
        assert_eq!(
            window_for(Duration::from_millis(150), f64::NAN, max),
            MIN_WINDOW
        );
        assert_eq!(window_for(Duration::from_millis(150), 1e6, 0), MIN_WINDOW);
    }

    #[test]
    fn a_window_bound_link_doubles_its_window_each_sample_up_to_the_link() {
        // A 150 ms link of 12.5 MB/s: window-bound, it sends window/rtt.
        let (rtt, link, max) = (0.15, 12.5e6, 64 << 20);
        let mut w = MIN_WINDOW;
        let mut rate = 0.0;
        let mut trace = Vec::new();
        for _ in 0..20 {
            // CAST: test figures.
            #[allow(clippy::cast_precision_loss)]
            let sent = (w as f64 / rtt).min(link);
            rate = if rate == 0.0 {
                sent
            } else {
                (rate + sent) / 2.0
            };
            w = window_for(Duration::from_secs_f64(rtt), rate, max);
            trace.push(w);
        }
        // Within a second of samples the link, not the window, limits.
        let reached = trace.iter().position(|w| *w >= 3_300_000);
        assert!(reached.is_some_and(|i| i < 10), "{trace:?}");
        // And it stays at twice the link's BDP, never above.
        assert!(trace.iter().all(|w| *w <= 3_750_000), "{trace:?}");
        assert!(trace[19] >= 3_700_000, "{trace:?}");
    }
}
