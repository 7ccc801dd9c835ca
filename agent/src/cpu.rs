//! CPU time charged to a group of threads, from the threads' own clocks
//! (`/proc/thread-self/schedstat`, the scheduler's nanoseconds on a CPU).
//!
//! A [`CpuMeter`] counts the threads that [`CpuMeter::enter`] it — a
//! runtime's workers and blocking threads through its start and stop
//! hooks — and every thread those spawn through [`spawn`], so the
//! engine's encoder and decoder threads are charged to the agent that
//! made them. `convoyctl bench` runs each lab agent (and each side of its
//! raw baseline) on a runtime of its own with a meter, and reports CPU
//! time per GiB at the source and at the destination. Threads outside a
//! meter (the simulated guest's vCPU) are charged to nobody.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A group of threads whose CPU time is summed.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Nanoseconds of threads that have left.
    ended_ns: u64,
    /// Threads in the group now: their ids and their clock when they
    /// entered (a thread may enter after it ran for something else).
    live: HashMap<u64, u64>,
}

thread_local! {
    static CURRENT: RefCell<Option<(CpuMeter, u64)>> = const { RefCell::new(None) };
}

/// This thread's id and its CPU time so far, in nanoseconds.
fn this_thread() -> Option<(u64, u64)> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let tid = link.file_name()?.to_str()?.parse().ok()?;
    Some((tid, schedstat_ns("/proc/thread-self/schedstat")?))
}

/// The first field of a schedstat file: time on a CPU, nanoseconds.
fn schedstat_ns(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_ascii_whitespace().next()?.parse().ok()
}

impl CpuMeter {
    /// A meter no thread has entered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Charges the calling thread to this meter from now until it calls
    /// [`CpuMeter::leave`] or ends having entered through [`spawn`].
    pub fn enter(&self) {
        let Some((tid, now)) = this_thread() else {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("no /proc/thread-self/schedstat: CPU time is not counted");
            });
            return;
        };
        self.lock().live.insert(tid, now);
        CURRENT.with(|c| *c.borrow_mut() = Some((self.clone(), tid)));
    }

    /// Ends the calling thread's charge to the meter it entered, if any.
    pub fn leave() {
        let Some((meter, tid)) = CURRENT.with(|c| c.borrow_mut().take()) else {
            return;
        };
        // Read under the lock, so a total taken meanwhile sees the thread
        // either live or ended, never both or neither.
        let mut inner = meter.lock();
        let now = schedstat_ns("/proc/thread-self/schedstat");
        if let Some(start) = inner.live.remove(&tid) {
            inner.ended_ns += now.unwrap_or(start).saturating_sub(start);
        }
    }

    /// The meter the calling thread is charged to.
    pub fn current() -> Option<CpuMeter> {
        CURRENT.with(|c| c.borrow().as_ref().map(|(m, _)| m.clone()))
    }

    /// CPU time of the meter's threads so far: those that left, and those
    /// still in it read from their clocks now.
    pub fn total(&self) -> Duration {
        let inner = self.lock();
        let mut ns = inner.ended_ns;
        for (tid, start) in &inner.live {
            if let Some(now) = schedstat_ns(&format!("/proc/self/task/{tid}/schedstat")) {
                ns += now.saturating_sub(*start);
            }
        }
        Duration::from_nanos(ns)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Spawns a thread with `builder`, charged to the meter of the calling
/// thread if it has one.
pub fn spawn<F, T>(
    builder: std::thread::Builder,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let meter = CpuMeter::current();
    builder.spawn(move || {
        /// Leaves the meter however the thread ends, a panic included.
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                CpuMeter::leave();
            }
        }
        let _leave = meter.as_ref().map(|m| {
            m.enter();
            Leave
        });
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns `d` of this thread's own CPU time (not wall time: the tests
    /// share the machine).
    fn spin(d: Duration) {
        let ns = || schedstat_ns("/proc/thread-self/schedstat").expect("schedstat");
        let start = ns();
        let mut x = 0u64;
        while Duration::from_nanos(ns() - start) < d {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }

    #[test]
    fn a_meter_counts_its_threads_and_what_they_spawn_and_nothing_else() {
        let meter = CpuMeter::new();
        let m = meter.clone();
        let outer = std::thread::spawn(move || {
            m.enter();
            spin(Duration::from_millis(60));
            let inner = spawn(std::thread::Builder::new(), || {
                spin(Duration::from_millis(60));
            })
            .expect("spawn");
            inner.join().expect("join");
            CpuMeter::leave();
            // Not charged: the thread left.
            spin(Duration::from_millis(200));
        });
        // Not charged: never entered.
        let other = std::thread::spawn(|| spin(Duration::from_millis(200)));
        outer.join().expect("join");
        other.join().expect("join");
        let t = meter.total();
        assert!(
            t >= Duration::from_millis(120) && t < Duration::from_millis(320),
            "{t:?}"
        );
        assert!(CpuMeter::current().is_none());
    }

    #[test]
    fn a_live_thread_is_read_from_its_clock() {
        let meter = CpuMeter::new();
        let m = meter.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            m.enter();
            spin(Duration::from_millis(80));
            let _ = tx.send(());
            let _ = done_rx.recv();
        });
        rx.recv().expect("spun");
        assert!(meter.total() >= Duration::from_millis(80));
        let _ = done_tx.send(());
        t.join().expect("join");
    }
}
