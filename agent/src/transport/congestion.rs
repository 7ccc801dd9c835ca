//! QUIC's congestion controllers: quinn's three, and BBR bounded to what
//! the path delivers ([`BoundedBbr`], the `bbr` an operator chooses).
//!
//! # Why BBR needs a bound under quinn
//! quinn's BBR computes a pacing rate but quinn's pacer does not use it:
//! the connection paces at 1.25 × window / smoothed RTT, whatever the
//! controller. BBR's window is twice the bandwidth-delay product (plus the
//! ack aggregation it saw), so in steady state quinn sends at about 2.5 ×
//! the bottleneck's rate and keeps a whole BDP queued. A router queue
//! shorter than that drops the excess; BBR does not take loss for
//! congestion, and resends it. Through the WAN lab at 150 ms with a 50 ms
//! queue that put twice the memory's size on the wire (docs/benchmarks.md).
//!
//! [`BoundedBbr`] leaves BBR's model and state machine as they are and
//! bounds its window, once the path's rate stopped growing (BBR's own
//! rule: three round trips without 25% more), to [`BOUND_GAIN`] × the
//! highest delivery rate of the last [`FILTER_RTTS`] round trips × the
//! minimum RTT. In flight is then at most a quarter of a BDP over the
//! pipe: the link stays full, a queue of a quarter BDP at most, and quinn's
//! pacer (1.25 × window / RTT) no longer outruns the link by much. Loss
//! still does not shrink it, which is why it keeps a long lossy link full
//! where Cubic backs off.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};

/// QUIC congestion controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: loss-based.
    Cubic,
    /// NewReno (RFC 9002's): loss-based, halves at each loss.
    NewReno,
    /// BBR bounded to the path's delivery rate ([`BoundedBbr`]):
    /// model-based, does not take random loss for congestion. The agents'
    /// default.
    #[default]
    Bbr,
    /// quinn's BBR as it is (experimental v1): overruns short router
    /// queues under quinn's pacer; kept to measure against.
    QuinnBbr,
}

impl Congestion {
    /// Every controller, in the order `--congestion` lists them.
    pub const ALL: [Congestion; 4] = [
        Congestion::Cubic,
        Congestion::NewReno,
        Congestion::Bbr,
        Congestion::QuinnBbr,
    ];

    /// The quinn factory of this controller.
    pub fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
            Congestion::Bbr => Arc::new(BoundedBbrConfig::default()),
            Congestion::QuinnBbr => Arc::new(BbrConfig::default()),
        }
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Congestion::ALL
            .into_iter()
            .find(|c| c.to_string() == s)
            .ok_or_else(|| {
                format!(
                    "unknown congestion controller {s:?}: expected cubic, newreno, bbr or quinn-bbr"
                )
            })
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
            Congestion::QuinnBbr => "quinn-bbr",
        })
    }
}

/// In flight at most this many times the path's BDP, once bounded.
pub const BOUND_GAIN: f64 = 1.25;
/// Intervals (round trips, at least [`MIN_INTERVAL`] each) the delivery
/// rate's maximum is kept over (BBR's bandwidth filter is ten round
/// trips).
pub const FILTER_RTTS: u32 = 10;
/// The rate grew by less than this factor in a round trip…
const GROWTH: f64 = 1.25;
/// …this many round trips in a row: the pipe is full (BBR's startup exit).
const FLAT_ROUNDS: u32 = 3;
/// Never bound the window below this many full-size packets.
const MIN_PACKETS: u64 = 4;
/// Rates are measured over at least this long, and the bound holds at
/// least this long's delivery: a QUIC peer may hold an acknowledgement
/// back up to 25 ms (the default `max_ack_delay`), so on a short path
/// acknowledgements come in bursts, and a window of one short round trip
/// would idle between them.
pub const MIN_INTERVAL: Duration = Duration::from_millis(25);

/// Builds [`BoundedBbr`]s.
#[derive(Debug, Default)]
pub struct BoundedBbrConfig {
    inner: Arc<BbrConfig>,
}

impl ControllerFactory for BoundedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(BoundedBbr {
            inner: self.inner.clone().build(now, current_mtu),
            rate: DeliveryRate::default(),
            mtu: u64::from(current_mtu),
        })
    }
}

/// quinn's BBR with its window bounded to [`BOUND_GAIN`] × the delivered
/// BDP (the module's text says why).
pub struct BoundedBbr {
    inner: Box<dyn Controller>,
    rate: DeliveryRate,
    mtu: u64,
}

impl std::fmt::Debug for BoundedBbr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedBbr")
            .field("inner_window", &self.inner.window())
            .field("rate", &self.rate)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl BoundedBbr {
    /// The bound on the window, once the pipe was found full.
    fn bound(&self) -> Option<u64> {
        self.rate
            .bound(BOUND_GAIN)
            .map(|b| b.max(MIN_PACKETS * self.mtu))
    }
}

impl Controller for BoundedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.rate.on_ack(bytes, rtt.min());
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.rate.on_end_acks(now, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let inner = self.inner.window();
        match self.bound() {
            // At least what the path delivers in [`MIN_INTERVAL`]: on a
            // short path (loopback, a LAN) BBR's window of two minimum
            // RTTs is less than what delayed acknowledgements and a busy
            // receiver hold back, and quinn paces at window / RTT.
            Some(b) => inner.max(self.rate.floor()).min(b),
            None => inner,
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(BoundedBbr {
            inner: self.inner.clone_box(),
            rate: self.rate.clone(),
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The path's delivery rate, measured from acknowledgements over
/// intervals of at least one minimum RTT (and [`MIN_INTERVAL`]), its
/// maximum over the last [`FILTER_RTTS`] intervals, and whether it
/// stopped growing. Sans-IO:
/// the caller passes the time.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    min_rtt: Option<Duration>,
    /// The interval being measured: its start, bytes acked, and whether
    /// the sender ran out of data in it.
    start: Option<Instant>,
    bytes: u64,
    app_limited: bool,
    /// Samples (end of interval, bytes per second), oldest first.
    samples: VecDeque<(Instant, f64)>,
    /// The rate at the last growth check, and flat round trips since.
    full: f64,
    flat: u32,
    /// The pipe was found full: the bound applies from now on.
    filled: bool,
}

impl DeliveryRate {
    /// Bytes acknowledged; `min_rtt` as the RTT estimator has it.
    pub fn on_ack(&mut self, bytes: u64, min_rtt: Duration) {
        self.bytes += bytes;
        if !min_rtt.is_zero() {
            self.min_rtt = Some(min_rtt);
        }
    }

    /// A batch of acknowledgements ended at `now`. Closes the interval
    /// once it is a minimum RTT long.
    pub fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        self.app_limited |= app_limited;
        let Some(rtt) = self.min_rtt else {
            return;
        };
        let span = rtt.max(MIN_INTERVAL);
        let Some(start) = self.start else {
            // The first interval starts at the first acknowledgement.
            self.start = Some(now);
            self.bytes = 0;
            self.app_limited = false;
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < span {
            return;
        }
        let rate = self.bytes as f64 / elapsed.as_secs_f64();
        // An interval the sender could not fill says little about the
        // path, unless it still beat what was measured.
        if !self.app_limited || rate > self.max() {
            self.sample(now, rate, span);
        }
        self.start = Some(now);
        self.bytes = 0;
        self.app_limited = false;
    }

    fn sample(&mut self, now: Instant, rate: f64, span: Duration) {
        let keep = span * FILTER_RTTS;
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, rate));
        if self.filled {
            return;
        }
        let max = self.max();
        if max >= self.full * GROWTH {
            self.full = max;
            self.flat = 0;
        } else {
            self.flat += 1;
            self.filled = self.flat >= FLAT_ROUNDS;
        }
    }

    /// The highest rate of the kept samples, bytes per second (0 before
    /// any).
    pub fn max(&self) -> f64 {
        self.samples.iter().map(|(_, r)| *r).fold(0.0, f64::max)
    }

    /// What the highest rate delivers in [`MIN_INTERVAL`], bytes.
    pub fn floor(&self) -> u64 {
        // CAST: as in `bound`.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let f = (self.max() * MIN_INTERVAL.as_secs_f64()) as u64;
        f
    }

    /// `gain` × the highest rate × the minimum RTT (at least
    /// [`MIN_INTERVAL`]), in bytes, once the pipe was found full; `None`
    /// before.
    pub fn bound(&self, gain: f64) -> Option<u64> {
        let rtt = self.min_rtt?.max(MIN_INTERVAL);
        if !self.filled {
            return None;
        }
        // CAST: a rate of bytes per second times seconds, far below u64's
        // range; a negative or NaN product saturates to 0.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let b = (gain * self.max() * rtt.as_secs_f64()) as u64;
        Some(b)
    }
}

#[cfg(test)]
// Tests: a failed unwrap is a failed test; rates are small positive
// figures.
#[allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
mod tests {
    use super::{Congestion, DeliveryRate, BOUND_GAIN, FILTER_RTTS, MIN_INTERVAL};
    use std::time::{Duration, Instant};

    /// Feeds `rate` bytes per second for `rtts` round trips of `rtt`,
    /// acknowledged every millisecond.
    fn feed(d: &mut DeliveryRate, t: &mut Instant, rtt: Duration, rate: f64, rtts: u32, app: bool) {
        let step = Duration::from_millis(1);
        let per_step = (rate * step.as_secs_f64()) as u64;
        for _ in 0..(rtts * rtt.as_millis() as u32) {
            *t += step;
            d.on_ack(per_step, rtt);
            d.on_end_acks(*t, app);
        }
    }

    #[test]
    fn controllers_parse_and_others_are_refused() {
        for c in Congestion::ALL {
            assert_eq!(c.to_string().parse::<Congestion>().unwrap(), c);
            // Each makes a transport configuration (quinn takes the factory).
            let _ = crate::transport::Tuning {
                congestion: c,
                ..crate::transport::Tuning::default()
            }
            .transport_config();
        }
        let e = "vegas".parse::<Congestion>().unwrap_err();
        assert!(e.contains("cubic, newreno, bbr or quinn-bbr"), "{e}");
    }

    #[test]
    fn no_bound_while_the_rate_grows_then_a_quarter_bdp_over_the_pipe() {
        let rtt = Duration::from_millis(100);
        let mut d = DeliveryRate::default();
        let mut t = Instant::now();
        // Startup: the rate doubles each round trip; never bounded.
        let mut rate = 100_000.0;
        for _ in 0..7 {
            feed(&mut d, &mut t, rtt, rate, 1, false);
            assert_eq!(d.bound(BOUND_GAIN), None, "bounded at {rate} B/s");
            rate *= 2.0;
        }
        // The link is full at 12.5 MB/s (100 Mbit/s): one more doubling,
        // three flat round trips, and the bound is 1.25 × 12.5 MB/s ×
        // 100 ms.
        feed(&mut d, &mut t, rtt, 12_500_000.0, 1, false);
        assert_eq!(d.bound(BOUND_GAIN), None);
        feed(&mut d, &mut t, rtt, 12_500_000.0, 4, false);
        let b = d.bound(BOUND_GAIN).expect("the pipe was found full");
        let want = 1.25 * 12_500_000.0 * 0.1;
        assert!((b as f64 - want).abs() < want * 0.02, "{b} against {want}");
    }

    #[test]
    fn an_idle_sender_keeps_its_estimate_and_a_slower_path_lowers_it() {
        let rtt = Duration::from_millis(50);
        let mut d = DeliveryRate::default();
        let mut t = Instant::now();
        feed(&mut d, &mut t, rtt, 10_000_000.0, 6, false);
        let full = d.bound(BOUND_GAIN).unwrap();
        // Out of data for many round trips (between two rounds): what the
        // sender could not fill does not lower the bound.
        feed(&mut d, &mut t, rtt, 1_000_000.0, 3 * FILTER_RTTS, true);
        assert_eq!(d.bound(BOUND_GAIN), Some(full));
        // The path slows (another flow shares it): after the filter's
        // round trips the bound follows it down.
        feed(&mut d, &mut t, rtt, 5_000_000.0, FILTER_RTTS + 2, false);
        let slow = d.bound(BOUND_GAIN).unwrap();
        assert!(
            (slow as f64) < full as f64 * 0.55,
            "{slow} after {full}: the old maximum was kept"
        );
    }

    #[test]
    fn a_short_path_bounds_at_least_what_delayed_acks_hold_back() {
        // 2 ms RTT, 12.5 MB/s, but the peer acknowledges every 25 ms.
        let rtt = Duration::from_millis(2);
        let mut d = DeliveryRate::default();
        let mut t = Instant::now();
        for _ in 0..40 {
            t += MIN_INTERVAL;
            d.on_ack((12_500_000.0 * MIN_INTERVAL.as_secs_f64()) as u64, rtt);
            d.on_end_acks(t, false);
        }
        // A bound of one 2 ms round trip (31 KB) would leave the link
        // idle between acknowledgements, measure less, and shrink again.
        let b = d.bound(BOUND_GAIN).unwrap();
        let want = 1.25 * 12_500_000.0 * MIN_INTERVAL.as_secs_f64();
        assert!((b as f64 - want).abs() < want * 0.02, "{b} against {want}");
    }

    #[test]
    fn no_rtt_no_samples_no_bound() {
        let mut d = DeliveryRate::default();
        let t = Instant::now();
        d.on_end_acks(t, false);
        d.on_end_acks(t + Duration::from_secs(1), false);
        assert_eq!(d.bound(BOUND_GAIN), None);
        assert_eq!(d.max(), 0.0);
    }
}
