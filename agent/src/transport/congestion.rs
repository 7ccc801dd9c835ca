//! QUIC's congestion controllers: quinn's three, BBR bounded to what the
//! path delivers ([`BoundedBbr`], the `bbr` an operator chooses), and the
//! agents' default, `auto` ([`ByPath`]): CUBIC on a sub-millisecond path,
//! the bounded BBR on a longer one.
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
//! minimum RTT of the last [`RTT_WINDOW`] (at least [`MIN_INTERVAL`]),
//! plus two packets ([`DeliveryRate::limit`] says why); on a path shorter
//! than [`MIN_INTERVAL`] it holds the window at least at what the path
//! delivers in that time. In flight is then at most a quarter of a BDP over the
//! pipe: the link stays full, a queue of a quarter BDP at most, and quinn's
//! pacer (1.25 × window / RTT) no longer outruns the link by much. Loss
//! still does not shrink it, which is why it keeps a long lossy link full
//! where Cubic backs off.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};

mod by_path;
pub use by_path::{ByPath, ByPathConfig, PathClass, SHORT_PATH_RTT};

/// QUIC congestion controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: loss-based.
    Cubic,
    /// NewReno (RFC 9002's): loss-based, halves at each loss.
    NewReno,
    /// BBR bounded to the path's delivery rate ([`BoundedBbr`]):
    /// model-based, does not take random loss for congestion.
    Bbr,
    /// quinn's BBR as it is (experimental v1): overruns short router
    /// queues under quinn's pacer; kept to measure against.
    QuinnBbr,
    /// By the path ([`ByPath`]): CUBIC while the connection's lowest RTT
    /// is under [`SHORT_PATH_RTT`], the bounded BBR otherwise. The agents'
    /// default.
    #[default]
    Auto,
}

impl Congestion {
    /// Every controller, in the order `--congestion` lists them.
    pub const ALL: [Congestion; 5] = [
        Congestion::Cubic,
        Congestion::NewReno,
        Congestion::Bbr,
        Congestion::QuinnBbr,
        Congestion::Auto,
    ];

    /// The quinn factory of this controller.
    pub fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
            Congestion::Bbr => Arc::new(BoundedBbrConfig::default()),
            Congestion::QuinnBbr => Arc::new(BbrConfig::default()),
            Congestion::Auto => Arc::new(ByPathConfig::default()),
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
                    "unknown congestion controller {s:?}: expected cubic, newreno, bbr, quinn-bbr or auto"
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
            Congestion::Auto => "auto",
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
        self.rate.on_ack(now, sent, bytes);
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
        self.rate.limit(self.inner.window(), self.mtu, BOUND_GAIN)
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
/// maximum over the last [`FILTER_RTTS`] intervals the sender filled,
/// whether it stopped growing, and the path's minimum RTT over the last
/// [`RTT_WINDOW`]. Sans-IO: the caller passes the time.
#[derive(Debug, Clone, Default)]
pub struct DeliveryRate {
    /// The minimum RTT seen, and when.
    min_rtt: Option<(Duration, Instant)>,
    /// The interval being measured: its start, bytes acked, and whether
    /// the sender ran out of data in it.
    start: Option<Instant>,
    bytes: u64,
    app_limited: bool,
    /// When the packets acknowledged in the interval were sent: the
    /// first and the last.
    sent: Option<(Instant, Instant)>,
    /// Samples (end of interval, bytes per second), oldest first.
    samples: VecDeque<(Instant, f64)>,
    /// The rate at the last growth check, and flat round trips since.
    full: f64,
    flat: u32,
    /// The pipe was found full: the bound applies from now on.
    filled: bool,
}

/// The minimum RTT is kept this long, then the next sample replaces it
/// (BBR's RTprop filter): a path whose base RTT rose (a new route, a
/// standing queue of others) is measured again, instead of a bound on a
/// round trip that is gone shrinking the window interval by interval.
pub const RTT_WINDOW: Duration = Duration::from_secs(10);

impl DeliveryRate {
    /// `bytes` of a packet sent at `sent` were acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.bytes += bytes;
        self.sent = Some(match self.sent {
            None => (sent, sent),
            Some((first, last)) => (first.min(sent), last.max(sent)),
        });
        let rtt = now.saturating_duration_since(sent);
        if rtt.is_zero() {
            return;
        }
        let replace = match self.min_rtt {
            None => true,
            Some((min, at)) => rtt <= min || now.saturating_duration_since(at) > RTT_WINDOW,
        };
        if replace {
            self.min_rtt = Some((rtt, now));
        }
    }

    /// The interval measured: the minimum RTT, and at least
    /// [`MIN_INTERVAL`].
    fn span(&self) -> Option<Duration> {
        self.min_rtt.map(|(rtt, _)| rtt.max(MIN_INTERVAL))
    }

    /// A batch of acknowledgements ended at `now`. Closes the interval
    /// once it is a minimum RTT long.
    pub fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        self.app_limited |= app_limited;
        let Some(span) = self.span() else {
            return;
        };
        let Some(start) = self.start else {
            // The first interval starts at the first acknowledgement.
            self.restart(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < span {
            return;
        }
        // The rate is the lower of the rates the packets were sent and
        // acknowledged at: acknowledgements held back and then sent
        // together (a stalled peer) do not make a burst of rate.
        let sent_over = self.sent.map_or(Duration::ZERO, |(first, last)| {
            last.saturating_duration_since(first)
        });
        let measured = elapsed.max(sent_over);
        // An interval that spans a silence (an outage, a stalled peer, an
        // idle sender) measures the silence, not the path: dropped.
        if measured <= span * 2 {
            let rate = self.bytes as f64 / measured.as_secs_f64();
            // An interval the sender could not fill says little about the
            // path, unless it still beat what was measured.
            if !self.app_limited || rate > self.max() {
                self.sample(now, rate, span, self.app_limited);
            }
        }
        self.restart(now);
    }

    fn restart(&mut self, now: Instant) {
        self.start = Some(now);
        self.bytes = 0;
        self.app_limited = false;
        self.sent = None;
    }

    fn sample(&mut self, now: Instant, rate: f64, span: Duration, app_limited: bool) {
        let keep = span * FILTER_RTTS;
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, rate));
        // Only an interval the sender filled can show the pipe full (BBR's
        // rule too): a connection carrying only control messages, each
        // interval a little busier, would latch a tiny rate.
        if self.filled || app_limited {
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

    /// The window for packets of `mtu` bytes when BBR's is `inner`: BBR's
    /// until the pipe was found full; then at most `gain` × the highest
    /// rate × the span, plus two packets, and on a path shorter than
    /// [`MIN_INTERVAL`] at least what the highest rate delivers in it.
    ///
    /// The two packets: quinn sends a full packet only while in flight
    /// and a packet fit under the window, so `gain` × what a window
    /// delivered alone has a fixed point at five packets, below which it
    /// would never grow again.
    pub fn limit(&self, inner: u64, mtu: u64, gain: f64) -> u64 {
        let Some((rtt, _)) = self.min_rtt.filter(|_| self.filled) else {
            return inner;
        };
        let span = rtt.max(MIN_INTERVAL);
        let max = self.max();
        // CAST: a rate of bytes per second times seconds, far below u64's
        // range; a negative or NaN product saturates to 0.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bound = ((gain * max * span.as_secs_f64()) as u64)
            .saturating_add(2 * mtu)
            .max(MIN_PACKETS * mtu);
        let floor = if rtt < MIN_INTERVAL {
            // CAST: as above.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let f = (max * MIN_INTERVAL.as_secs_f64()) as u64;
            f
        } else {
            0
        };
        inner.max(floor).min(bound)
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
    use super::{Congestion, DeliveryRate, BOUND_GAIN, MIN_INTERVAL};
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    const MTU: u64 = 1200;
    /// 100 Mbit/s.
    const LINK: f64 = 12_500_000.0;
    /// The router's queue.
    const QUEUE: Duration = Duration::from_millis(50);

    /// A bottleneck of `rate` bytes per second with a [`QUEUE`] and a base
    /// RTT, and a sender that sends a full packet only while in flight and
    /// the packet fit under the window (quinn's rule) and the queue has
    /// room, in steps of a millisecond.
    struct Path {
        rate: f64,
        rtt: Duration,
        t: Instant,
        link_free: Instant,
        flight: VecDeque<(Instant, Instant, u64)>,
        in_flight: u64,
    }

    impl Path {
        fn new(rtt_ms: u64) -> Path {
            let t = Instant::now();
            Path {
                rate: LINK,
                rtt: Duration::from_millis(rtt_ms),
                t,
                link_free: t,
                flight: VecDeque::new(),
                in_flight: 0,
            }
        }

        /// Runs `secs` with BBR's window `inner`; the sender has `offer`
        /// bytes a millisecond (`None`: always more). Returns the bytes
        /// per second delivered in the last second.
        fn run(&mut self, d: &mut DeliveryRate, inner: u64, secs: f64, offer: Option<u64>) -> f64 {
            let step = Duration::from_millis(1);
            let steps = (secs * 1000.0) as u64;
            let mut delivered = VecDeque::new();
            for _ in 0..steps {
                self.t += step;
                let mut acked = 0;
                while self.flight.front().is_some_and(|(at, _, _)| *at <= self.t) {
                    let (_, sent, bytes) = self.flight.pop_front().unwrap();
                    d.on_ack(self.t, sent, bytes);
                    self.in_flight -= bytes;
                    acked += bytes;
                }
                if acked > 0 {
                    d.on_end_acks(self.t, offer.is_some());
                }
                delivered.push_back(acked);
                if delivered.len() > 1000 {
                    delivered.pop_front();
                }
                let window = d.limit(inner, MTU, BOUND_GAIN);
                let mut budget = offer.unwrap_or(u64::MAX);
                while self.in_flight + MTU < window && budget >= MTU {
                    // The router's queue (tbf's 50 ms in the WAN lab) is
                    // full: a paced sender waits.
                    if self.link_free.saturating_duration_since(self.t) > QUEUE {
                        break;
                    }
                    budget -= MTU;
                    let start = self.link_free.max(self.t);
                    self.link_free = start + Duration::from_secs_f64(MTU as f64 / self.rate);
                    self.flight
                        .push_back((self.link_free + self.rtt, self.t, MTU));
                    self.in_flight += MTU;
                }
            }
            delivered.iter().sum::<u64>() as f64 * 1000.0 / delivered.len() as f64
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
        assert!(e.contains("cubic, newreno, bbr, quinn-bbr or auto"), "{e}");
    }

    #[test]
    fn bbrs_window_until_the_pipe_is_full_then_a_quarter_bdp_over_it() {
        let mut path = Path::new(100);
        let mut d = DeliveryRate::default();
        let big = 1 << 30;
        path.run(&mut d, big, 0.25, None);
        assert_eq!(d.limit(big, MTU, BOUND_GAIN), big, "bounded too early");
        let rate = path.run(&mut d, big, 3.0, None);
        assert!(rate > LINK * 0.95, "{rate}");
        let b = d.limit(big, MTU, BOUND_GAIN) as f64;
        let want = 1.25 * LINK * 0.1;
        assert!((b - want).abs() < want * 0.05, "{b} against {want}");
        // Under the bound, BBR's own window stands.
        assert_eq!(d.limit(100 * MTU, MTU, BOUND_GAIN), 100 * MTU);
    }

    #[test]
    fn a_window_of_a_few_packets_grows_again() {
        // BBR's window held at four packets (after an outage, say) long
        // enough for the pipe to be found "full" at three packets a
        // round trip; then BBR opens up. Without the two packets of
        // headroom this stays at three packets a round trip for good.
        let mut path = Path::new(150);
        let mut d = DeliveryRate::default();
        path.run(&mut d, 4 * MTU, 3.0, None);
        assert!(d.limit(1 << 30, MTU, BOUND_GAIN) < 10 * MTU);
        let rate = path.run(&mut d, 1 << 30, 15.0, None);
        assert!(rate > LINK * 0.9, "{rate} B/s of {LINK}");
    }

    #[test]
    fn a_silence_or_an_idle_sender_keeps_the_estimate() {
        let mut path = Path::new(100);
        let mut d = DeliveryRate::default();
        path.run(&mut d, 1 << 30, 3.0, None);
        let full = d.limit(1 << 30, MTU, BOUND_GAIN);
        // Two seconds without an acknowledgement (an outage), then one:
        // that interval measured the silence and is dropped.
        let t = path.t + Duration::from_secs(2);
        d.on_ack(t, t - path.rtt - Duration::from_millis(1), MTU);
        d.on_end_acks(t, false);
        assert_eq!(d.limit(1 << 30, MTU, BOUND_GAIN), full);
        // Out of data for seconds (between two rounds): what the sender
        // could not fill does not lower it either.
        path.t = t;
        path.run(&mut d, 1 << 30, 3.0, Some(MTU));
        assert_eq!(d.limit(1 << 30, MTU, BOUND_GAIN), full);
    }

    #[test]
    fn a_sender_short_of_data_never_finds_the_pipe_full() {
        // Control messages only, a little more each second: the pipe was
        // never filled, so nothing bounds the bulk that follows.
        let mut path = Path::new(150);
        let mut d = DeliveryRate::default();
        for packets in 1..6 {
            path.run(&mut d, 1 << 30, 1.0, Some(packets * MTU));
        }
        assert_eq!(d.limit(1 << 30, MTU, BOUND_GAIN), 1 << 30);
        let rate = path.run(&mut d, 1 << 30, 3.0, None);
        assert!(rate > LINK * 0.95, "{rate}");
    }

    #[test]
    fn a_rise_in_the_base_rtt_is_measured_again() {
        // A new route: 100 ms becomes 150 ms. A bound on the old round
        // trip would shrink the window interval by interval.
        let mut path = Path::new(100);
        let mut d = DeliveryRate::default();
        path.run(&mut d, 1 << 30, 5.0, None);
        path.rtt = Duration::from_millis(150);
        let rate = path.run(&mut d, 1 << 30, 20.0, None);
        assert!(rate > LINK * 0.9, "{rate} B/s of {LINK}");
    }

    #[test]
    fn a_short_path_keeps_at_least_what_delayed_acks_hold_back() {
        // 2 ms: BBR's window of two round trips is 50 KB; the window is
        // at least what the path delivers in 25 ms.
        let mut path = Path::new(2);
        let mut d = DeliveryRate::default();
        let bbr = (2.0 * LINK * 0.002) as u64;
        path.run(&mut d, bbr, 2.0, None);
        let w = d.limit(bbr, MTU, BOUND_GAIN) as f64;
        let floor = d.max() * MIN_INTERVAL.as_secs_f64();
        assert!(w >= floor && floor > LINK * 0.02, "{w} against {floor}");
        // On a long path BBR's smaller window (its probe of the RTT) is
        // kept: no floor there.
        let mut path = Path::new(100);
        let mut d = DeliveryRate::default();
        path.run(&mut d, 1 << 30, 3.0, None);
        assert_eq!(d.limit(10 * MTU, MTU, BOUND_GAIN), 10 * MTU);
    }
}
