//! A post-copy push gives way to the fault path, without starving.
//!
//! After a post-copy switch a vCPU at the destination waits on every
//! fault, while the source's encoder threads compress and hash the
//! background push and the destination's decoder threads install it. At
//! nice + 10 ([`super::yield_to_faults`]) a fault's p99 stayed at 6–8 ms
//! on two shared cores: a woken fault-path thread still waited its turn
//! behind an encoder. At `SCHED_IDLE` a waking thread of any other policy
//! preempts the encoder at once, and the p99 at 25 000 and 100 000
//! pages/s fell to 3.1–5.2 ms (docs/benchmarks.md, "The source's encoders
//! at `SCHED_IDLE`"). With the encoders idle, the scheduler's record
//! showed the decoders at nice + 10 as what the runtime workers and the
//! vCPU most waited behind; the decoders now go idle too, except with
//! disks (a decoder writes a disk block under a lock the guest waits on),
//! and frames reach them without a lock shared with a runtime worker
//! (`native::destination::queue`). In 31 rows of each build, alternated,
//! no fault p99 was over 5 ms, against 6 before (docs/benchmarks.md, "The
//! destination's decoders at `SCHED_IDLE` too").
//!
//! `SCHED_IDLE` alone could starve the push on a host whose CPUs other
//! work keeps busy (its weight is 3 against 1024), and a post-copy VM
//! depends on both hosts until the push ends. So a [`PushPriority`] reads
//! its thread's scheduler figures (`/proc/thread-self/schedstat`: time on
//! a CPU, time runnable but waiting): once the thread ran less than
//! [`STARVED_PERCENT`]% of the time it wanted a CPU, over at least
//! [`WINDOW`], it goes back to the normal policy at nice + 10 for the rest
//! of the push. A thread goes idle only when it can come back: leaving
//! `SCHED_IDLE` needs `CAP_SYS_NICE` (in the initial user namespace) or a
//! `RLIMIT_NICE` that allows its nice value (sched(7)), so the thread
//! first proves it may lower its nice value by one, which the kernel
//! checks by the same rule, one step stricter. Without that, and without
//! figures that move, it stays at nice + 10.
//!
//! The one `unsafe` call of the engine lives here: `sched_setscheduler`,
//! which rustix does not offer (the `allow` is on this module's
//! declaration).

use std::time::{Duration, Instant};

/// The least time a thread must have wanted a CPU before its share is
/// judged: a starved push loses about this much before it comes back,
/// and a short crowd (the destination starting its VM at the switch) is
/// not taken for starvation. (With 100 ms, loopback runs fell back in
/// their first second, and their fault p99 with them.)
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// Below this share of the time it wanted a CPU, an idle push thread is
/// starved. Against one busy thread of the normal policy a thread gets
/// 110 / 1134 ≈ 10% at nice + 10, and 3 / 1027 ≈ 0.3% at `SCHED_IDLE`:
/// below 5% it is the idle policy that holds the push back. (On loopback,
/// where both agents and the guest share two cores, the encoders got
/// 13–18% at `SCHED_IDLE`, and the push took about as long as at nice +
/// 10.)
pub(crate) const STARVED_PERCENT: u64 = 5;

/// How often an idle push thread reads its figures at most.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// How a push thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Not yet background.
    Normal,
    /// `SCHED_IDLE`, watched for starvation.
    Idle,
    /// Nice + 10: where `SCHED_IDLE` is not possible, or after it
    /// starved the thread (the normal policy again, unless leaving
    /// `SCHED_IDLE` failed: logged).
    Nice,
}

/// A thread's scheduler figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SchedStat {
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable, waiting for a CPU.
    pub wait_ns: u64,
}

impl SchedStat {
    /// The calling thread's.
    fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// `/proc/…/schedstat`: run time, wait time, slices.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        Some(Self {
            run_ns: words.next()?.parse().ok()?,
            wait_ns: words.next()?.parse().ok()?,
        })
    }
}

/// Whether a thread was starved between two readings: `None` while it
/// wanted a CPU for less than [`WINDOW`] in all (too little to judge).
pub(crate) fn starved(before: SchedStat, now: SchedStat) -> Option<bool> {
    let run = now.run_ns.saturating_sub(before.run_ns);
    let wait = now.wait_ns.saturating_sub(before.wait_ns);
    let wanted = run.saturating_add(wait);
    if u128::from(wanted) < WINDOW.as_nanos() {
        return None;
    }
    Some(u128::from(run) * 100 < u128::from(wanted) * u128::from(STARVED_PERCENT))
}

/// One push thread's standing; [`PushPriority::background`] before each
/// batch of background work.
#[derive(Debug)]
pub(crate) struct PushPriority {
    standing: Standing,
    /// While idle: the start of the window judged, and when last checked.
    window: Option<(SchedStat, Instant)>,
}

impl Default for PushPriority {
    fn default() -> Self {
        Self {
            standing: Standing::Normal,
            window: None,
        }
    }
}

impl PushPriority {
    /// The thread's standing now.
    #[cfg(test)]
    pub(crate) fn standing(&self) -> Standing {
        self.standing
    }

    /// The calling thread does background work: the first call lowers it
    /// (nice + 10, then `SCHED_IDLE` where it can come back); later calls
    /// bring it back to nice + 10 once `SCHED_IDLE` starves it.
    pub(crate) fn background(&mut self) {
        match self.standing {
            Standing::Normal => self.enter(),
            Standing::Idle => self.check(),
            Standing::Nice => {}
        }
    }

    fn enter(&mut self) {
        super::yield_to_faults();
        self.standing = Standing::Nice;
        let Some(stat) = SchedStat::read() else {
            tracing::debug!("no scheduler figures for this thread: the push stays at nice + 10");
            return;
        };
        if !can_leave_idle() {
            tracing::debug!("SCHED_IDLE could not be left again: the push stays at nice + 10");
            return;
        }
        match set_policy(libc::SCHED_IDLE) {
            Ok(()) => {
                self.standing = Standing::Idle;
                self.window = Some((stat, Instant::now()));
            }
            Err(e) => tracing::debug!("cannot make a post-copy push thread SCHED_IDLE: {e}"),
        }
    }

    fn check(&mut self) {
        let Some((start, checked)) = self.window else {
            return;
        };
        if checked.elapsed() < CHECK_EVERY {
            return;
        }
        // The thread ran since the window began (it is running now): a
        // run time that did not move is figures that are not kept (an
        // old kernel without delay accounting prints zeros).
        let verdict = SchedStat::read()
            .filter(|now| now.run_ns > start.run_ns)
            .map(|now| (now, starved(start, now)));
        match verdict {
            Some((_, None)) => self.window = Some((start, Instant::now())),
            Some((now, Some(false))) => self.window = Some((now, Instant::now())),
            Some((now, Some(true))) => {
                let run = now.run_ns.saturating_sub(start.run_ns) / 1_000_000;
                let wait = now.wait_ns.saturating_sub(start.wait_ns) / 1_000_000;
                self.leave_idle(&format!(
                    "it ran {run} ms of the {} ms it wanted a CPU",
                    run + wait
                ));
            }
            None => self.leave_idle("its scheduler figures cannot be read or do not move"),
        }
    }

    fn leave_idle(&mut self, why: &str) {
        self.window = None;
        self.standing = Standing::Nice;
        match set_policy(libc::SCHED_OTHER) {
            Ok(()) => {
                tracing::info!("a post-copy push thread left SCHED_IDLE for nice + 10: {why}");
            }
            // Checked before it went idle; if the limits changed since,
            // the push goes on at the idle policy's pace.
            Err(e) => {
                tracing::warn!(
                    "a post-copy push thread {why} but cannot leave SCHED_IDLE ({e}): \
                     it goes on at the idle policy's pace"
                );
            }
        }
    }
}

/// Whether the calling thread could go back from `SCHED_IDLE` to the
/// normal policy at its nice value. The kernel allows that with
/// `CAP_SYS_NICE` in the initial user namespace, or a `RLIMIT_NICE` of at
/// least 20 − nice (sched(7)); a capability read with `capget` may be one
/// of a user namespace, which the kernel would refuse. So the thread
/// tries what the kernel checks the same way, one step stricter: its nice
/// value lowered by one, then put back.
fn can_leave_idle() -> bool {
    let tid = rustix::thread::gettid();
    let Ok(nice) = rustix::process::getpriority_process(Some(tid)) else {
        return false;
    };
    if rustix::process::setpriority_process(Some(tid), nice - 1).is_err() {
        return false;
    }
    // Raising one's own nice value needs no privilege.
    rustix::process::setpriority_process(Some(tid), nice).is_ok()
}

/// The calling thread's policy (its nice value is kept).
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` that outlives the call; pid
    // 0 is the calling thread (Linux applies the policy per thread); the
    // call reads `param` and touches no other memory.
    let r = unsafe { libc::sched_setscheduler(0, policy, &raw const param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The policy of thread `tid` (0: the calling thread).
#[cfg(test)]
fn policy_of(tid: libc::pid_t) -> libc::c_int {
    // SAFETY: no argument but a thread id; no memory is passed.
    unsafe { libc::sched_getscheduler(tid) }
}

/// The calling thread's policy.
#[cfg(test)]
fn policy() -> libc::c_int {
    policy_of(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn schedstat_is_parsed_and_bad_text_is_none() {
        let s = SchedStat::parse("913915860 517367 22\n").unwrap();
        assert_eq!((s.run_ns, s.wait_ns), (913_915_860, 517_367));
        assert!(SchedStat::parse("").is_none());
        assert!(SchedStat::parse("12 x 3").is_none());
        assert!(SchedStat::read().is_some(), "this kernel gives schedstat");
    }

    #[test]
    fn starvation_is_judged_on_a_whole_window_only() {
        let at = |run_ms: u64, wait_ms: u64| SchedStat {
            run_ns: run_ms * 1_000_000,
            wait_ns: wait_ms * 1_000_000,
        };
        let zero = SchedStat::default();
        // Too little wanted to judge, however starved.
        assert_eq!(starved(zero, at(1, 990)), None);
        // 2% of 2 s: starved; 15% (as on loopback): not; 5% exactly: not.
        assert_eq!(starved(zero, at(40, 1960)), Some(true));
        assert_eq!(starved(zero, at(300, 1700)), Some(false));
        assert_eq!(starved(zero, at(100, 1900)), Some(false));
        // Differences, not totals.
        assert_eq!(starved(at(1000, 0), at(1040, 1960)), Some(true));
        // A clock that went back is no time at all.
        assert_eq!(starved(at(5, 5), zero), None);
    }

    /// A push thread goes idle; pinned to one CPU with a thread of the
    /// normal policy that never sleeps, it is starved, and comes back to
    /// the normal policy at nice + 10. Where it could not come back (no
    /// `CAP_SYS_NICE`, a low `RLIMIT_NICE`) it never goes idle.
    #[test]
    fn an_idle_push_thread_starved_on_its_cpu_comes_back() {
        use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        /// Stops the busy thread however the test ends.
        struct Stop(Arc<AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        // One CPU this test may use, for both threads: the push thread
        // competes with the busy one whatever else runs or is limited.
        let allowed = sched_getaffinity(None).unwrap();
        let cpu = (0..CpuSet::MAX_CPU).find(|&c| allowed.is_set(c)).unwrap();
        let mut one = CpuSet::new();
        one.set(cpu);
        let stop = Stop(Arc::new(AtomicBool::new(false)));
        let busy = {
            let stop = stop.0.clone();
            std::thread::spawn(move || {
                sched_setaffinity(None, &one).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let test_thread = rustix::thread::gettid().as_raw_nonzero().get();
        let push = std::thread::spawn(move || {
            sched_setaffinity(None, &one).unwrap();
            let before = nice();
            let can = can_leave_idle();
            let mut p = PushPriority::default();
            p.background();
            // This thread's policy, and the test thread's (untouched).
            let went = (p.standing(), policy(), policy_of(test_thread));
            let begun = Instant::now();
            while p.standing() == Standing::Idle && begun.elapsed() < Duration::from_secs(20) {
                // A batch's worth of work.
                let mut x = 0u64;
                for i in 0..10_000u64 {
                    x = std::hint::black_box(x.wrapping_add(i));
                }
                p.background();
            }
            (can, went, p.standing(), policy(), before, nice())
        });
        let (can, went, standing, after, before, niced) = push.join().unwrap();
        drop(stop);
        busy.join().unwrap();
        assert_eq!(niced, (before + super::super::BACKGROUND_NICE).min(19));
        if can {
            assert_eq!(went, (Standing::Idle, libc::SCHED_IDLE, libc::SCHED_OTHER));
        } else {
            assert_eq!(went, (Standing::Nice, libc::SCHED_OTHER, libc::SCHED_OTHER));
        }
        assert_eq!((standing, after), (Standing::Nice, libc::SCHED_OTHER));
        // This suite runs as root, as an agent does.
        assert!(can, "this test runs where an agent may leave SCHED_IDLE");
    }
}
