//! Resident memory of this process, which runs the lab's agents: a field
//! of `/proc/self/status`, a reading taken once it has stopped moving, and
//! a sampler that keeps the highest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for freed memory to leave the process (mimalloc
/// returns freed pages to the OS after a short delay) before reading RSS.
pub const QUIET: Duration = Duration::from_millis(700);

/// RSS once it has stopped moving: the previous migrations' connections
/// and buffers are released a while after they end (a destination waits
/// up to 2 s for the source to close, and mimalloc returns freed pages
/// late), and a read taken while they go would count their release
/// against the next images. At least [`QUIET`], at most 5 s.
pub async fn settled_rss() -> u64 {
    tokio::time::sleep(QUIET).await;
    let mut last = proc_status("VmRSS").unwrap_or(0);
    for _ in 0..22 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = proc_status("VmRSS").unwrap_or(0);
        if now.abs_diff(last) < 1 << 20 {
            return now;
        }
        last = now;
    }
    last
}

/// A field of `/proc/self/status` given in kB (`VmRSS`, `VmHWM`), in
/// bytes; `None` where there is no such file or field.
pub fn proc_status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Reads VmRSS every `every` on its own thread (not a tokio task: the
/// runtime's workers are busy with the migrations) and keeps the highest.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(rss) = proc_status("VmRSS") {
                        m.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(every);
                }
            })
            .ok();
        Sampler { stop, max, thread }
    }

    /// Stops sampling; the highest RSS seen.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}
