//! The relay's decisions without sockets or a clock: one [`Line`] per
//! direction is fed `(now, datagram length)` and says whether the datagram
//! is dropped (and why) or when it is released, then holds it in a
//! `BinaryHeap` until [`Line::pop_due`] is asked at or after that time.
//!
//! Per datagram, in this order (as netem does): cut → loss (Bernoulli or
//! Gilbert–Elliott) → duplication → rate limit (token bucket in front of a
//! tail-drop queue) → one-way delay plus jitter → the memory bound. Each
//! step is O(1) but the heap push and pop, O(log n) in the datagrams held.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A probability in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Probability(f64);

impl Probability {
    /// Never.
    pub const ZERO: Probability = Probability(0.0);
    /// Always.
    pub const ONE: Probability = Probability(1.0);

    /// `p`, if it is in `[0, 1]` (not NaN).
    pub fn new(p: f64) -> Option<Probability> {
        (0.0..=1.0).contains(&p).then_some(Probability(p))
    }

    /// The value in `[0, 1]`.
    pub fn value(self) -> f64 {
        self.0
    }

    fn sample(self, rng: &mut SmallRng) -> bool {
        self.0 > 0.0 && rng.random_bool(self.0)
    }
}

/// Variation of the one-way delay, drawn per datagram and added to it (the
/// sum is never below zero).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Every datagram takes exactly the delay.
    #[default]
    None,
    /// Uniform in `[-max, +max]`.
    Uniform {
        /// Largest deviation either way.
        max: Duration,
    },
    /// Normal with mean 0 and deviation `sigma`, clamped to `[-max, +max]`.
    Normal {
        /// Standard deviation.
        sigma: Duration,
        /// Largest deviation either way.
        max: Duration,
    },
}

/// Whether jitter may reorder datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Reorder {
    /// One FIFO line: a datagram is never released before one sent earlier
    /// in its direction (its jittered time is raised to the previous one's),
    /// so jitter changes spacing, never order.
    #[default]
    Never,
    /// Each datagram keeps its own jittered time: two sent closer together
    /// than the difference of their jitters swap. With uniform jitter of
    /// `±j` and datagrams `g` apart, neighbours swap when `g < 2j`.
    ByJitter,
}

/// Random loss.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Loss {
    /// No random loss.
    #[default]
    None,
    /// Each datagram lost independently with this probability.
    Bernoulli(Probability),
    /// Bursty loss.
    GilbertElliott(GilbertElliott),
}

/// A two-state Markov chain (good, bad), each state with its own loss
/// probability; the state moves once per datagram, after its loss is drawn.
/// With `loss_good = 0` and `loss_bad = 1`, losses come in bursts of mean
/// length `1 / bad_to_good`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// p(good → bad) per datagram.
    pub good_to_bad: Probability,
    /// p(bad → good) per datagram.
    pub bad_to_good: Probability,
    /// Loss in the good state.
    pub loss_good: Probability,
    /// Loss in the bad state.
    pub loss_bad: Probability,
}

impl GilbertElliott {
    /// The long-run loss: the stationary mix of the two states' losses.
    pub fn mean_loss(&self) -> f64 {
        let (gb, bg) = (self.good_to_bad.0, self.bad_to_good.0);
        if gb + bg == 0.0 {
            return self.loss_good.0;
        }
        let bad = gb / (gb + bg);
        (1.0 - bad) * self.loss_good.0 + bad * self.loss_bad.0
    }
}

/// A token bucket in front of a tail-drop queue, like a router's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Long-run rate.
    pub bytes_per_sec: NonZeroU64,
    /// Bucket depth: bytes that may leave at once after the line was idle.
    pub burst_bytes: u64,
    /// Bytes that may wait for tokens; a datagram that would wait longer
    /// than `queue_bytes / bytes_per_sec` is dropped (tail drop).
    pub queue_bytes: u64,
}

/// One direction's impairments; [`Default`] is a clean link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Variation of the delay.
    pub jitter: Jitter,
    /// Whether jitter may reorder.
    pub reorder: Reorder,
    /// Random loss.
    pub loss: Loss,
    /// Probability that a datagram is sent twice (the copy goes through the
    /// rate limit and jitter on its own).
    pub duplicate: Probability,
    /// Rate limit, if any.
    pub rate: Option<RateLimit>,
    /// Drop everything, including what is already in flight.
    pub cut: bool,
}

/// Counters of one direction since the line was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Datagrams offered.
    pub in_datagrams: u64,
    /// Bytes offered.
    pub in_bytes: u64,
    /// Datagrams released (copies included).
    pub delivered_datagrams: u64,
    /// Bytes released.
    pub delivered_bytes: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a cut (offered while cut, or in flight when cut).
    pub dropped_cut: u64,
    /// Dropped because the rate limit's queue or the line's memory bound
    /// was full.
    pub dropped_queue: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Released after a datagram offered later.
    pub reordered: u64,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Random loss.
    Loss,
    /// The direction is cut.
    Cut,
    /// The rate limit's queue or the memory bound was full.
    Queue,
}

/// What becomes of one offered datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Verdict {
    /// Dropped.
    Drop(DropReason),
    /// Released at `at`, and a copy at `copy_at` if it was duplicated.
    Release {
        /// When the datagram leaves the relay.
        at: Instant,
        /// When its copy leaves, if any.
        copy_at: Option<Instant>,
    },
}

struct Held<P> {
    at: Instant,
    seq: u64,
    len: usize,
    payload: P,
}

impl<P> PartialEq for Held<P> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<P> Eq for Held<P> {}
impl<P> PartialOrd for Held<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<P> Ord for Held<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One direction of the relay: its impairments, random state, token bucket,
/// the datagrams it holds (at most `max_held_bytes` of them) and counters.
pub struct Line<P> {
    config: Impairment,
    rng: SmallRng,
    bad: bool,
    /// Token bucket as a virtual finish time: when everything admitted so
    /// far would have left at the full rate with an empty bucket.
    finish: Option<Instant>,
    last_release: Option<Instant>,
    held: BinaryHeap<Reverse<Held<P>>>,
    held_bytes: usize,
    max_held_bytes: usize,
    next_seq: u64,
    released_seq: Option<u64>,
    counters: Counters,
}

impl<P> std::fmt::Debug for Line<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("config", &self.config)
            .field("held", &self.held.len())
            .field("held_bytes", &self.held_bytes)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<P: Clone> Line<P> {
    /// A line with these impairments, its randomness seeded by `seed`,
    /// holding at most `max_held_bytes` of datagrams.
    pub fn new(config: Impairment, seed: u64, max_held_bytes: usize) -> Line<P> {
        Line {
            config,
            rng: SmallRng::seed_from_u64(seed),
            bad: false,
            finish: None,
            last_release: None,
            held: BinaryHeap::new(),
            held_bytes: 0,
            max_held_bytes,
            next_seq: 0,
            released_seq: None,
            counters: Counters::default(),
        }
    }

    /// The impairments in force.
    pub fn config(&self) -> &Impairment {
        &self.config
    }

    /// Changes the impairments; datagrams already held keep their release
    /// times (but a cut drops them).
    pub fn set(&mut self, config: Impairment) {
        self.config = config;
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Decides the fate of a datagram of `len` bytes offered at `now`,
    /// counting it, without holding it ([`Line::push`] holds it). The memory
    /// bound counts what is held, so it only bites through `push`.
    pub fn decide(&mut self, now: Instant, len: usize) -> Verdict {
        let c = &mut self.counters;
        c.in_datagrams += 1;
        c.in_bytes += len as u64;
        if self.config.cut {
            c.dropped_cut += 1;
            return Verdict::Drop(DropReason::Cut);
        }
        if self.lost() {
            self.counters.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        let copy = self.config.duplicate.sample(&mut self.rng);
        let fits = |copies: usize| {
            self.held_bytes.saturating_add(len.saturating_mul(copies)) <= self.max_held_bytes
        };
        let (fits_one, fits_two) = (fits(1), fits(2));
        let Some(at) = fits_one.then(|| self.schedule(now, len)).flatten() else {
            self.counters.dropped_queue += 1;
            return Verdict::Drop(DropReason::Queue);
        };
        let copy_at = if copy {
            let at = fits_two.then(|| self.schedule(now, len)).flatten();
            match at {
                Some(_) => self.counters.duplicated += 1,
                None => self.counters.dropped_queue += 1,
            }
            at
        } else {
            None
        };
        Verdict::Release { at, copy_at }
    }

    /// Decides and, unless dropped, holds `payload` (of `len` bytes) until
    /// its release.
    pub fn push(&mut self, now: Instant, len: usize, payload: P) -> Verdict {
        let verdict = self.decide(now, len);
        if let Verdict::Release { at, copy_at } = verdict {
            if let Some(copy_at) = copy_at {
                self.hold(copy_at, len, payload.clone());
            }
            self.hold(at, len, payload);
        }
        verdict
    }

    /// When the next held datagram is due.
    pub fn next_release(&self) -> Option<Instant> {
        self.held.peek().map(|h| h.0.at)
    }

    /// The next datagram due at `now`, if any (a cut drops those due).
    pub fn pop_due(&mut self, now: Instant) -> Option<P> {
        while self.held.peek().is_some_and(|h| h.0.at <= now) {
            let Reverse(held) = self.held.pop()?;
            self.held_bytes -= held.len;
            if self.config.cut {
                self.counters.dropped_cut += 1;
                continue;
            }
            if self.released_seq.is_some_and(|s| held.seq < s) {
                self.counters.reordered += 1;
            }
            self.released_seq = Some(self.released_seq.map_or(held.seq, |s| s.max(held.seq)));
            self.counters.delivered_datagrams += 1;
            self.counters.delivered_bytes += held.len as u64;
            return Some(held.payload);
        }
        None
    }

    fn hold(&mut self, at: Instant, len: usize, payload: P) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.held_bytes += len;
        self.held.push(Reverse(Held {
            at,
            seq,
            len,
            payload,
        }));
    }

    fn lost(&mut self) -> bool {
        match self.config.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => p.sample(&mut self.rng),
            Loss::GilbertElliott(ge) => {
                let (loss, leave) = if self.bad {
                    (ge.loss_bad, ge.bad_to_good)
                } else {
                    (ge.loss_good, ge.good_to_bad)
                };
                let lost = loss.sample(&mut self.rng);
                if leave.sample(&mut self.rng) {
                    self.bad = !self.bad;
                }
                lost
            }
        }
    }

    /// The release time of a datagram that passed loss, or `None` when the
    /// rate limit's queue is full.
    fn schedule(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let depart = match self.config.rate {
            None => now,
            Some(rate) => self.admit(now, len, rate)?,
        };
        let candidate = depart + self.delay();
        let at = match (self.config.reorder, self.last_release) {
            (Reorder::Never, Some(last)) => candidate.max(last),
            _ => candidate,
        };
        self.last_release = Some(self.last_release.map_or(at, |l| l.max(at)));
        Some(at)
    }

    /// Token bucket as GCRA: the datagram leaves when the bucket holds its
    /// bytes; it is dropped when it would wait longer than the queue drains.
    fn admit(&mut self, now: Instant, len: usize, rate: RateLimit) -> Option<Instant> {
        let per = |bytes: u64| {
            let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate.bytes_per_sec.get());
            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        };
        let finish = self.finish.map_or(now, |f| f.max(now)) + per(len as u64);
        let depart = finish
            .checked_sub(per(rate.burst_bytes))
            .map_or(now, |d| d.max(now));
        if depart - now > per(rate.queue_bytes) {
            return None;
        }
        self.finish = Some(finish);
        Some(depart)
    }

    fn delay(&mut self) -> Duration {
        let base = self.config.delay.as_secs_f64();
        let deviation = match self.config.jitter {
            Jitter::None => return self.config.delay,
            Jitter::Uniform { max } => (self.rng.random::<f64>() * 2.0 - 1.0) * max.as_secs_f64(),
            Jitter::Normal { sigma, max } => {
                // Box–Muller; u1 in (0, 1] so the logarithm is finite.
                let u1 = 1.0 - self.rng.random::<f64>();
                let u2 = self.rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let max = max.as_secs_f64();
                (z * sigma.as_secs_f64()).clamp(-max, max)
            }
        };
        Duration::from_secs_f64((base + deviation).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn p(v: f64) -> Probability {
        Probability::new(v).expect("a probability")
    }

    fn line(config: Impairment) -> Line<u64> {
        Line::new(config, 7, usize::MAX)
    }

    /// Offers `n` datagrams of `len` bytes `gap` apart from `start`; the
    /// verdicts in order.
    fn offer(l: &mut Line<u64>, start: Instant, n: u64, gap: Duration, len: usize) -> Vec<Verdict> {
        (0..n)
            .map(|i| l.push(start + gap * u32::try_from(i).expect("few"), len, i))
            .collect()
    }

    /// Everything held, in release order, with the clock stepped to each
    /// release time.
    fn drain(l: &mut Line<u64>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(at) = l.next_release() {
            while let Some(i) = l.pop_due(at) {
                out.push(i);
            }
        }
        out
    }

    /// 1 MB/s, a 3000-byte bucket, a 30 kB queue.
    fn rate_limited() -> Line<u64> {
        let rate = RateLimit {
            bytes_per_sec: NonZeroU64::new(1_000_000).expect("non-zero"),
            burst_bytes: 3000,
            queue_bytes: 30_000,
        };
        line(Impairment {
            rate: Some(rate),
            ..Impairment::default()
        })
    }

    fn lost(v: &Verdict) -> bool {
        matches!(v, Verdict::Drop(DropReason::Loss))
    }

    #[test]
    fn probability_is_checked() {
        assert!(Probability::new(1.5).is_none());
        assert!(Probability::new(-0.1).is_none());
        assert!(Probability::new(f64::NAN).is_none());
        assert_eq!(Probability::new(0.25).map(Probability::value), Some(0.25));
    }

    /// Bernoulli 1% over 1e5 datagrams: within ±0.1 points (3 standard
    /// deviations), and the same seed gives the same pattern.
    #[test]
    fn bernoulli_one_percent() {
        let cfg = Impairment {
            loss: Loss::Bernoulli(p(0.01)),
            ..Impairment::default()
        };
        let t0 = Instant::now();
        let mut a = line(cfg);
        let va = offer(&mut a, t0, 100_000, MS, 100);
        let losses = va.iter().filter(|v| lost(v)).count();
        assert!((900..=1100).contains(&losses), "{losses} lost of 1e5");
        assert_eq!(a.counters().dropped_loss, losses as u64);
        let mut b = line(cfg);
        assert_eq!(
            va,
            offer(&mut b, t0, 100_000, MS, 100),
            "seeded: same pattern"
        );
        let mut c = Line::new(cfg, 8, usize::MAX);
        assert_ne!(
            va,
            offer(&mut c, t0, 100_000, MS, 100),
            "another seed differs"
        );
    }

    /// Gilbert–Elliott with p(g→b) = 1%, p(b→g) = 25%, no loss when good,
    /// all lost when bad: mean loss 1/26 ≈ 3.85% within ±15% of itself and
    /// mean burst 4 within ±10%, over 1e5 datagrams.
    #[test]
    fn gilbert_elliott_mean_loss_and_bursts() {
        let ge = GilbertElliott {
            good_to_bad: p(0.01),
            bad_to_good: p(0.25),
            loss_good: Probability::ZERO,
            loss_bad: Probability::ONE,
        };
        let mut l = line(Impairment {
            loss: Loss::GilbertElliott(ge),
            ..Impairment::default()
        });
        let v = offer(&mut l, Instant::now(), 100_000, MS, 100);
        let losses = v.iter().filter(|v| lost(v)).count();
        let mean = losses as f64 / 1e5;
        assert!(
            (mean / ge.mean_loss() - 1.0).abs() < 0.15,
            "mean loss {mean}, expected {}",
            ge.mean_loss()
        );
        let mut bursts = Vec::new();
        let mut run = 0;
        for v in &v {
            if lost(v) {
                run += 1;
            } else if run > 0 {
                bursts.push(run);
                run = 0;
            }
        }
        let burst = f64::from(bursts.iter().sum::<u32>()) / bursts.len() as f64;
        assert!(
            (burst / 4.0 - 1.0).abs() < 0.10,
            "mean burst {burst} over {} bursts",
            bursts.len()
        );
    }

    /// 1 MB/s with a 3000-byte bucket and a 30 kB queue, offered 2 MB/s for
    /// 20 s: the bytes admitted are within 2% of 20 MB, about half are
    /// tail-dropped, and no datagram waits longer than the queue drains.
    #[test]
    fn token_bucket_limits_long_run_rate() {
        let t0 = Instant::now();
        let mut l = rate_limited();
        let gap = Duration::from_micros(600); // 1200 B each: 2 MB/s
        let v = offer(&mut l, t0, 33_333, gap, 1200);
        let c = l.counters();
        let admitted = c.in_bytes - c.dropped_queue * 1200;
        let ratio = admitted as f64 / 20e6;
        assert!((ratio - 1.0).abs() < 0.02, "admitted {admitted} B in 20 s");
        assert!(c.dropped_queue > 15_000, "{c:?}");
        for (i, v) in v.iter().enumerate() {
            if let Verdict::Release { at, .. } = v {
                let sent = t0 + gap * u32::try_from(i).expect("few");
                assert!(
                    *at - sent <= Duration::from_millis(30),
                    "datagram {i} waited {:?}",
                    *at - sent
                );
            }
        }
    }

    /// A burst at one instant: the bucket's 3000 B and the queue's 30 kB
    /// (27 datagrams of 1200 B) go, every later one is tail-dropped.
    #[test]
    fn token_bucket_tail_drops_beyond_the_queue() {
        let t0 = Instant::now();
        let mut l = rate_limited();
        let v = offer(&mut l, t0, 100, Duration::ZERO, 1200);
        let kept = v
            .iter()
            .take_while(|v| matches!(v, Verdict::Release { .. }))
            .count();
        assert_eq!(kept, 27);
        assert!(v[kept..]
            .iter()
            .all(|v| *v == Verdict::Drop(DropReason::Queue)));
        assert_eq!(l.counters().dropped_queue, 73);
        assert_eq!(
            v[0],
            Verdict::Release {
                at: t0,
                copy_at: None
            },
            "the bucket starts full"
        );
        // After the queue drained, the line takes datagrams again.
        let later = t0 + Duration::from_millis(40);
        assert!(matches!(l.push(later, 1200, 0), Verdict::Release { at, .. } if at == later));
    }

    /// Release times are the offer time plus the delay, and datagrams come
    /// out of the line at those times and not before.
    #[test]
    fn delay_schedules_release() {
        let t0 = Instant::now();
        let mut l = line(Impairment {
            delay: 50 * MS,
            ..Impairment::default()
        });
        assert_eq!(
            l.push(t0, 10, 1),
            Verdict::Release {
                at: t0 + 50 * MS,
                copy_at: None
            }
        );
        assert_eq!(l.pop_due(t0 + 49 * MS), None);
        assert_eq!(l.next_release(), Some(t0 + 50 * MS));
        assert_eq!(l.pop_due(t0 + 50 * MS), Some(1));
        assert_eq!(l.counters().delivered_bytes, 10);
    }

    /// Uniform jitter of ±20 ms on 50 ms, datagrams 1 ms apart: never
    /// reordered with `Reorder::Never`; with `ByJitter`, many are.
    #[test]
    fn jitter_reorders_only_when_allowed() {
        let jitter = Jitter::Uniform { max: 20 * MS };
        let cfg = Impairment {
            delay: 50 * MS,
            jitter,
            ..Impairment::default()
        };
        let t0 = Instant::now();
        let mut fifo = line(cfg);
        let _ = offer(&mut fifo, t0, 10_000, MS, 100);
        let order = drain(&mut fifo);
        assert!(order.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(fifo.counters().reordered, 0);
        assert_eq!(fifo.counters().delivered_datagrams, 10_000);

        let mut free = line(Impairment {
            reorder: Reorder::ByJitter,
            ..cfg
        });
        let _ = offer(&mut free, t0, 10_000, MS, 100);
        let order = drain(&mut free);
        assert_eq!(order.len(), 10_000);
        assert!(free.counters().reordered > 1000, "{:?}", free.counters());
    }

    /// Normal jitter stays within its bound.
    #[test]
    fn normal_jitter_is_bounded() {
        let jitter = Jitter::Normal {
            sigma: 10 * MS,
            max: 15 * MS,
        };
        let cfg = Impairment {
            delay: 50 * MS,
            jitter,
            reorder: Reorder::ByJitter,
            ..Impairment::default()
        };
        let t0 = Instant::now();
        let mut l = line(cfg);
        for v in offer(&mut l, t0, 10_000, Duration::ZERO, 100) {
            let Verdict::Release { at, .. } = v else {
                panic!("{v:?}")
            };
            assert!(at >= t0 + 35 * MS && at <= t0 + 65 * MS, "{:?}", at - t0);
        }
    }

    /// A cut drops what is offered and what is in flight, and counts both.
    #[test]
    fn cut_drops_everything() {
        let t0 = Instant::now();
        let mut l = line(Impairment {
            delay: 10 * MS,
            ..Impairment::default()
        });
        let _ = offer(&mut l, t0, 10, MS, 100);
        l.set(Impairment {
            cut: true,
            ..*l.config()
        });
        let v = offer(&mut l, t0 + 10 * MS, 1000, MS, 100);
        assert!(v.iter().all(|v| *v == Verdict::Drop(DropReason::Cut)));
        assert!(drain(&mut l).is_empty());
        let c = l.counters();
        assert_eq!(
            (c.in_datagrams, c.dropped_cut, c.delivered_datagrams),
            (1010, 1010, 0)
        );
    }

    /// Duplication at 5% makes about 5% copies, each delivered.
    #[test]
    fn duplication() {
        let mut l = line(Impairment {
            duplicate: p(0.05),
            ..Impairment::default()
        });
        let _ = offer(&mut l, Instant::now(), 100_000, MS, 100);
        let c = l.counters();
        assert!((4700..=5300).contains(&c.duplicated), "{c:?}");
        assert_eq!(drain(&mut l).len() as u64, 100_000 + c.duplicated);
    }

    /// The memory bound drops what would exceed it.
    #[test]
    fn memory_is_bounded() {
        let mut l: Line<u64> = Line::new(
            Impairment {
                delay: 10 * MS,
                ..Impairment::default()
            },
            1,
            1000,
        );
        let v = offer(&mut l, Instant::now(), 20, Duration::ZERO, 100);
        assert_eq!(
            v.iter()
                .filter(|v| matches!(v, Verdict::Release { .. }))
                .count(),
            10
        );
        assert_eq!(l.counters().dropped_queue, 10);
    }
}
