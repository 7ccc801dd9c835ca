//! Resident memory of this process, which runs the lab's agents: fields
//! of `/proc/self/status`, readings taken once they have stopped moving,
//! and a sampler that keeps the highest.
//!
//! Which part is whose: a sim VM's memory is a memfd (shared memory, in
//! `RssShmem`), at the source and at the destination alike; what the
//! agents allocate for themselves — windows, queues, caches, trees, the
//! allocator's slack — is anonymous memory (`RssAnon`). The agents'
//! overhead is therefore the rise of `RssAnon`, and the images are
//! `RssShmem`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait for freed memory to leave the process (mimalloc
/// returns freed pages to the OS after a short delay) before reading RSS.
pub const QUIET: Duration = Duration::from_millis(700);

/// One reading of the process's resident memory, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    /// All of it (`VmRSS`).
    pub total: u64,
    /// Anonymous: what the process allocated for itself (`RssAnon`).
    pub anon: u64,
    /// Shared memory: here, the guest images (`RssShmem`).
    pub shmem: u64,
}

impl Rss {
    /// Now; zeros where `/proc/self/status` cannot be read.
    pub fn now() -> Rss {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Rss {
            total: field(&text, "VmRSS").unwrap_or(0),
            anon: field(&text, "RssAnon").unwrap_or(0),
            shmem: field(&text, "RssShmem").unwrap_or(0),
        }
    }

    /// The larger of each field.
    fn max(self, o: Rss) -> Rss {
        Rss {
            total: self.total.max(o.total),
            anon: self.anon.max(o.anon),
            shmem: self.shmem.max(o.shmem),
        }
    }
}

/// RSS once it has stopped moving: the previous migrations' connections
/// and buffers are released a while after they end (a destination waits
/// up to 2 s for the source to close, and mimalloc returns freed pages
/// late), and a read taken while they go would count their release
/// against the next images. At least [`QUIET`], at most 5 s.
pub async fn settled() -> Rss {
    tokio::time::sleep(QUIET).await;
    let mut last = Rss::now();
    for _ in 0..22 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Rss::now();
        if now.total.abs_diff(last.total) < 1 << 20 && now.anon.abs_diff(last.anon) < 1 << 20 {
            return now;
        }
        last = now;
    }
    last
}

/// A field of `/proc/self/status` given in kB (`VmRSS`, `VmHWM`), in
/// bytes; `None` where there is no such file or field.
pub fn proc_status(name: &str) -> Option<u64> {
    field(&std::fs::read_to_string("/proc/self/status").ok()?, name)
}

/// Field `name` of a `/proc/*/status` text, in bytes.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Reads the process's RSS every `every` on its own thread (not a tokio
/// task: the runtime's workers are busy with the migrations) and keeps
/// the highest of each field.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<[AtomicU64; 3]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let r = Rss::now();
                    m[0].fetch_max(r.total, Ordering::Relaxed);
                    m[1].fetch_max(r.anon, Ordering::Relaxed);
                    m[2].fetch_max(r.shmem, Ordering::Relaxed);
                    std::thread::sleep(every);
                }
            })
            .ok();
        Sampler { stop, max, thread }
    }

    /// Stops sampling; the highest of each field seen (with a last
    /// reading, so a sampler stopped at once still has one).
    pub fn stop(mut self) -> Rss {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Rss {
            total: self.max[0].load(Ordering::Relaxed),
            anon: self.max[1].load(Ordering::Relaxed),
            shmem: self.max[2].load(Ordering::Relaxed),
        }
        .max(Rss::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssShmem:\t 256 kB\n";
        assert_eq!(field(text, "VmRSS"), Some(1 << 20));
        assert_eq!(field(text, "RssAnon"), Some(512 << 10));
        assert_eq!(field(text, "RssShmem"), Some(256 << 10));
        assert_eq!(field(text, "RssFile"), None);
        // This process has anonymous memory, and a sampler sees it.
        let s = Sampler::start(Duration::from_millis(1));
        let held = vec![1u8; 8 << 20];
        std::thread::sleep(Duration::from_millis(20));
        let peak = s.stop();
        assert!(held.iter().all(|b| *b == 1));
        assert!(peak.anon >= 8 << 20 && peak.total >= peak.anon, "{peak:?}");
    }
}
