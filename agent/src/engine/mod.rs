//! Migration engines: thin drivers that move bytes between QUIC streams,
//! the VM backend and the sans-IO state machines of `convoy-protocol`.
//! No migration decision is taken here.
//!
//! - [`outgoing`]: a migration the operator asks of this agent — request,
//!   ticket, plan and policy checked, the VM claimed, the backend's engine
//!   run, the outcome audited.
//! - [`incoming`]: a connection from a source agent — the first message
//!   decides between a page migration, a QEMU stream and a post-copy
//!   resume.
//! - [`error`]: why an outgoing migration could not begin.
//! - [`admission`]: the destination's one check of a proposal (ticket,
//!   plan, policy) for every backend.
//! - [`native`]: page migrations of sim VMs, driving the state machines.
//! - [`qemu`]: QEMU's own migration stream carried through Convoy.

/// `tokio::spawn` inside the caller's span: a migration's tasks log with
/// its fields ([`crate::logging`]).
pub(crate) fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(tracing::Instrument::in_current_span(f))
}

pub(crate) mod admission;
pub(crate) mod clock;
pub(crate) mod error;
pub(crate) mod incoming;
pub(crate) mod native;
pub(crate) mod outgoing;
#[allow(unsafe_code)] // `sched_setscheduler` (and `sched_getscheduler` in its tests), nothing else.
pub(crate) mod priority;
pub(crate) mod qemu;

/// Lowers the calling thread's CPU priority for the rest of its life
/// (nice + [`BACKGROUND_NICE`], at most 19; Linux applies `setpriority` to
/// one thread by its id): what a post-copy push's threads do first once
/// the VM runs at the destination (then most go further: [`priority`]),
/// so that on a busy host
/// they yield the CPU to what a waiting vCPU needs — the fault path and
/// the guest — instead of sharing it evenly. A thread may always lower its
/// own priority; a failure only costs fault latency, so it is logged, not
/// fatal. Once per thread: later calls cost no system call, change
/// nothing and return `None`. Returns the thread's nice value after.
pub(crate) fn yield_to_faults() -> Option<i32> {
    thread_local! {
        static YIELDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if YIELDED.with(|y| y.replace(true)) {
        return None;
    }
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid)).ok()?;
    let lower = now.saturating_add(BACKGROUND_NICE).min(19);
    match rustix::process::setpriority_process(Some(tid), lower) {
        Ok(()) => Some(lower),
        Err(e) => {
            tracing::debug!("cannot lower a post-copy push thread's priority: {e}");
            Some(now)
        }
    }
}

/// How much a post-copy push's threads lower their priority
/// ([`yield_to_faults`]).
pub(crate) const BACKGROUND_NICE: i32 = 10;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// The calling thread's priority drops, and only its own: the thread
    /// that spawned it keeps its nice value.
    #[test]
    fn a_push_thread_lowers_only_its_own_priority() {
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let before = nice();
        let (reported, after) = std::thread::spawn(move || {
            let reported = super::yield_to_faults();
            // Once per thread: a second call lowers nothing more.
            assert_eq!(super::yield_to_faults(), None);
            (reported, nice())
        })
        .join()
        .unwrap();
        assert_eq!(reported, Some(after));
        assert_eq!(after, (before + super::BACKGROUND_NICE).min(19));
        assert_eq!(nice(), before);
    }
}
