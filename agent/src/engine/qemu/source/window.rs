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
//! the transport's window. Starting at the floor when QEMU starts sending
//! memory (disk mirrors before it keep the transport's window), a link
//! that is window-bound sends at `window / rtt`, so the window grows each
//! sample until the link, not the window, limits the rate; it follows the
//! highest rate of the last second, and does not shrink while the link
//! takes all it allows (other traffic's queues lengthen the round trip and
//! lower the rate with it). When QEMU stops the guest the window opens
//! fully: what is left should go as fast as the link takes it.
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
    /// The last [`RATE_SAMPLES`] send rates, bytes per second: the window
    /// follows the highest (a pause of QEMU's, a dirty-bitmap sync, does
    /// not shrink it).
    rates: std::collections::VecDeque<f64>,
    /// The lowest round trip seen, and when it was first seen (it expires
    /// after [`RTT_EXPIRY`], so a longer path is noticed).
    min_rtt: Option<(Duration, Duration)>,
    set: u64,
}

/// Rate samples the window follows the highest of (about a second).
const RATE_SAMPLES: usize = 10;

/// How long a lowest round trip holds before a new one replaces it.
const RTT_EXPIRY: Duration = Duration::from_secs(10);

impl SendWindow {
    /// A window no larger than `max` (the transport's connection window).
    pub(super) fn new(max: u64) -> Self {
        SendWindow {
            max: max.max(MIN_WINDOW),
            since: None,
            rates: std::collections::VecDeque::new(),
            min_rtt: None,
            set: 0,
        }
    }

    /// Sets `conn`'s send window to the floor: when QEMU starts sending
    /// memory, or a new link after a recovery. (Before, while disks
    /// mirror, the transport's own window holds.)
    pub(super) fn start(&mut self, conn: &Connection) {
        *self = SendWindow::new(self.max);
        self.set = MIN_WINDOW;
        conn.set_send_window(MIN_WINDOW);
    }

    /// The window set now, bytes (0 before [`SendWindow::start`]).
    pub(super) fn current(&self) -> u64 {
        self.set
    }

    /// Opens `conn`'s window fully: QEMU has stopped the guest, and what
    /// is left should go as fast as the link allows.
    pub(super) fn open(&mut self, conn: &Connection) {
        if self.set != self.max {
            self.set = self.max;
            conn.set_send_window(self.max);
        }
    }

    /// Takes a reading of `conn` at `now` (time since any fixed point) and
    /// moves its window once a sample is complete.
    pub(super) fn update(&mut self, conn: &Connection, now: Duration) {
        let Some((rtt, ..)) = conn.quic_path() else {
            return;
        };
        if let Some(w) = self.next(now, rtt, conn.stats().sent) {
            conn.set_send_window(w);
        }
    }

    /// The window after a reading at `now` of the smoothed round trip
    /// `srtt` and the bytes sent so far, if it changes.
    fn next(&mut self, now: Duration, srtt: Duration, sent: u64) -> Option<u64> {
        if !srtt.is_zero() {
            let keep = self
                .min_rtt
                .is_some_and(|(m, at)| m <= srtt && now.saturating_sub(at) < RTT_EXPIRY);
            if !keep {
                self.min_rtt = Some((srtt, now));
            }
        }
        let Some((t0, b0)) = self.since else {
            self.since = Some((now, sent));
            return None;
        };
        let span = now.saturating_sub(t0);
        if span < SAMPLE {
            return None;
        }
        self.since = Some((now, sent));
        // CAST: byte counts far below 2^52 are exact in an f64.
        #[allow(clippy::cast_precision_loss)]
        let rate = sent.saturating_sub(b0) as f64 / span.as_secs_f64();
        if self.rates.len() == RATE_SAMPLES {
            self.rates.pop_front();
        }
        self.rates.push_back(rate);
        let best = self.rates.iter().copied().fold(0.0, f64::max);
        let min_rtt = self.min_rtt.map_or(srtt, |(m, _)| m);
        let target = window_for(min_rtt, best, self.max);
        // Window-bound: the link took about all the window allows in a
        // round trip, so the window may be what limits the rate (queues of
        // other traffic lengthen the round trip, and the rate with it):
        // it does not shrink then.
        // CAST: as above.
        #[allow(clippy::cast_precision_loss)]
        let allowed = self.set as f64 / srtt.as_secs_f64().max(1e-6);
        let w = if rate >= 0.8 * allowed {
            target.max(self.set)
        } else {
            target
        };
        // Only a change of more than an eighth is worth a call into QUIC.
        if w.abs_diff(self.set) > self.set / 8 {
            self.set = w;
            return Some(w);
        }
        None
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

    /// Feeds `w` samples of a link that carries `min(window / srtt,
    /// link)` bytes per second, 100 ms apart; the windows set.
    fn run(
        w: &mut SendWindow,
        from: u64,
        samples: u64,
        srtt: Duration,
        link: f64,
        sent: &mut u64,
    ) -> Vec<u64> {
        let mut out = Vec::new();
        for i in from..from + samples {
            // CAST: test figures.
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let step = ((w.set as f64 / srtt.as_secs_f64()).min(link) * 0.1) as u64;
            *sent += step;
            let _ = w.next(Duration::from_millis(100 * i), srtt, *sent);
            out.push(w.set);
        }
        out
    }

    #[test]
    fn a_window_bound_long_link_grows_to_twice_its_bdp_and_stays() {
        // 100 Mbit/s, 150 ms: twice its BDP is 3.75 MB.
        let rtt = Duration::from_millis(150);
        let mut w = SendWindow::new(64 << 20);
        w.set = MIN_WINDOW;
        let mut sent = 0;
        let _ = w.next(Duration::ZERO, rtt, 0);
        let trace = run(&mut w, 1, 30, rtt, 12.5e6, &mut sent);
        let reached = trace.iter().position(|w| *w >= 3_300_000);
        assert!(reached.is_some_and(|i| i < 12), "{trace:?}");
        assert!(trace.iter().all(|w| *w <= 3_750_000), "{trace:?}");
        assert!(trace[29] >= 3_300_000, "{trace:?}");
    }

    #[test]
    fn loopback_stays_at_the_floor_and_queues_of_others_do_not_shrink_it() {
        // Loopback: 300 µs, 1 GB/s.
        let mut w = SendWindow::new(64 << 20);
        w.set = MIN_WINDOW;
        let mut sent = 0;
        let lo = Duration::from_micros(300);
        let _ = w.next(Duration::ZERO, lo, 0);
        let trace = run(&mut w, 1, 10, lo, 1e9, &mut sent);
        assert!(trace.iter().all(|w| *w == MIN_WINDOW), "{trace:?}");

        // A long link at its BDP, then other traffic triples the round
        // trip: the rate falls with it, the window holds.
        let mut w = SendWindow::new(64 << 20);
        w.set = MIN_WINDOW;
        let rtt = Duration::from_millis(150);
        let mut sent = 0;
        let _ = w.next(Duration::ZERO, rtt, 0);
        let grown = *run(&mut w, 1, 20, rtt, 12.5e6, &mut sent)
            .last()
            .expect("samples");
        let trace = run(&mut w, 21, 30, rtt * 3, 12.5e6, &mut sent);
        assert!(trace.iter().all(|x| *x >= grown), "{grown} then {trace:?}");
    }

    #[test]
    fn a_longer_path_is_noticed_once_the_lowest_round_trip_expires() {
        let mut w = SendWindow::new(64 << 20);
        let _ = w.next(Duration::ZERO, Duration::from_millis(10), 0);
        let _ = w.next(Duration::from_secs(5), Duration::from_millis(100), 0);
        assert_eq!(w.min_rtt.map(|(m, _)| m), Some(Duration::from_millis(10)));
        let _ = w.next(Duration::from_secs(11), Duration::from_millis(100), 0);
        assert_eq!(w.min_rtt.map(|(m, _)| m), Some(Duration::from_millis(100)));
    }
}
