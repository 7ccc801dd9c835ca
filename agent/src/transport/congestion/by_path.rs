//! The controller chosen by the path ([`ByPath`], `--congestion auto`,
//! the agents' default): CUBIC on a path whose round trip is under
//! [`SHORT_PATH_RTT`] (a LAN, loopback), the bounded BBR above.
//!
//! # Why two
//! On loopback, where both agents share the CPU and nothing is lost, the
//! bounded BBR moved migrations 0–9% and bare transfers 10–16% slower than
//! CUBIC on the machine it was first measured on (not seen again on the
//! next one: docs/benchmarks.md), and the LAN's figures were measured
//! with CUBIC. On a long link CUBIC is what cannot stay: it
//! backs off at every random loss, and at 50–150 ms with 0.1% loss it did
//! not finish a 64 MiB transfer in 40 s. Between the two the RTT decides:
//! a sub-millisecond path is a LAN, where a loss-based controller regrows
//! its window within microseconds of a loss.
//!
//! Both controllers see every event while the path counts as long, so
//! CUBIC takes over without a cold start; once the path is short (for
//! good) the BBR is no longer fed. The path's class is
//! decided by the lowest RTT seen on the connection ([`PathClass`]): it
//! only falls, so a path found short stays short, and a long one becomes
//! short the first time a round trip says so (before any sample the path
//! counts as long: BBR's is the safer window on a path not yet measured).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics, CubicConfig};

use super::BoundedBbrConfig;

/// A path whose lowest round trip is under this is short: CUBIC's. The
/// WAN lab's shortest cell is 2 ms; loopback and a LAN answer in tens to
/// hundreds of microseconds.
pub const SHORT_PATH_RTT: Duration = Duration::from_millis(1);

/// The lowest RTT a connection saw (time from a packet's sending to its
/// acknowledgement), and whether that makes its path short. Sans-IO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathClass {
    min_rtt: Option<Duration>,
}

impl PathClass {
    /// A packet sent at `sent` was acknowledged at `now`. (quinn's own
    /// RTT samples are the same time for the largest packet each
    /// acknowledgement covers, so its minimum is never lower than this
    /// one; both include the peer's ack delay.)
    pub fn on_ack(&mut self, now: Instant, sent: Instant) {
        let rtt = now.saturating_duration_since(sent);
        if rtt.is_zero() {
            return;
        }
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
    }

    /// Whether the path is short (false before any sample).
    pub fn short(&self) -> bool {
        self.min_rtt.is_some_and(|m| m < SHORT_PATH_RTT)
    }

    /// The lowest RTT seen.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }
}

/// Builds [`ByPath`] controllers.
#[derive(Debug, Default)]
pub struct ByPathConfig {
    cubic: Arc<CubicConfig>,
    bbr: Arc<BoundedBbrConfig>,
}

impl ControllerFactory for ByPathConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ByPath {
            cubic: self.cubic.clone().build(now, current_mtu),
            bbr: self.bbr.clone().build(now, current_mtu),
            class: PathClass::default(),
        })
    }
}

/// CUBIC on a short path, the bounded BBR on a long one (the module's text
/// says why).
pub struct ByPath {
    cubic: Box<dyn Controller>,
    bbr: Box<dyn Controller>,
    class: PathClass,
}

impl ByPath {
    /// What the connection's round trips made of its path.
    pub fn class(&self) -> PathClass {
        self.class
    }

    /// The bounded BBR while its window may still be used: a path found
    /// short stays short, so from then on feeding it would be work on
    /// every acknowledgement for a window nobody reads.
    fn bbr_in_use(&mut self) -> Option<&mut Box<dyn Controller>> {
        (!self.class.short()).then_some(&mut self.bbr)
    }

    fn chosen(&self) -> &dyn Controller {
        match self.class.short() {
            true => self.cubic.as_ref(),
            false => self.bbr.as_ref(),
        }
    }
}

impl std::fmt::Debug for ByPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByPath")
            .field("class", &self.class)
            .field("cubic_window", &self.cubic.window())
            .field("bbr_window", &self.bbr.window())
            .finish()
    }
}

impl Controller for ByPath {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.cubic.on_sent(now, bytes, last_packet_number);
        if let Some(bbr) = self.bbr_in_use() {
            bbr.on_sent(now, bytes, last_packet_number);
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.class.on_ack(now, sent);
        self.cubic.on_ack(now, sent, bytes, app_limited, rtt);
        if let Some(bbr) = self.bbr_in_use() {
            bbr.on_ack(now, sent, bytes, app_limited, rtt);
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.cubic
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        if let Some(bbr) = self.bbr_in_use() {
            bbr.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        }
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.cubic
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        if let Some(bbr) = self.bbr_in_use() {
            bbr.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.cubic.on_mtu_update(new_mtu);
        self.bbr.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.chosen().window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.chosen().metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(ByPath {
            cubic: self.cubic.clone_box(),
            bbr: self.bbr.clone_box(),
            class: self.class,
        })
    }

    fn initial_window(&self) -> u64 {
        // Before any round trip the path counts as long.
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::{PathClass, SHORT_PATH_RTT};
    use std::time::{Duration, Instant};

    #[test]
    fn a_path_is_long_until_a_round_trip_under_a_millisecond() {
        let t = Instant::now();
        let mut c = PathClass::default();
        assert!(!c.short(), "not measured: long");
        c.on_ack(t + Duration::from_millis(2), t);
        assert!(!c.short(), "2 ms (the WAN lab's shortest): long");
        c.on_ack(t + SHORT_PATH_RTT, t);
        assert!(!c.short(), "exactly the threshold: long");
        c.on_ack(t + Duration::from_micros(150), t);
        assert!(c.short(), "loopback: short");
        // Once short, a slower round trip (a queue, a busy CPU, an
        // acknowledgement held back) does not make it long again.
        c.on_ack(t + Duration::from_millis(40), t);
        assert!(c.short());
        assert_eq!(c.min_rtt(), Some(Duration::from_micros(150)));
    }

    #[test]
    fn a_clock_that_did_not_move_is_no_sample() {
        let t = Instant::now();
        let mut c = PathClass::default();
        c.on_ack(t, t + Duration::from_millis(1));
        c.on_ack(t, t);
        assert_eq!(c.min_rtt(), None);
        assert!(!c.short());
    }
}
