//! Post-copy at the destination: demand paging of an incoming image.
//!
//! [`SimVm::begin_postcopy`] registers the image with userfaultfd
//! ([`crate::backend::uffd`]), makes the owed pages missing and starts a
//! fault-handler thread. The vCPU then runs on demand paging: a touch of
//! an owed page blocks it in the kernel until the page arrives
//! ([`SimVm::install_page`]); a missing page that is not owed is a zero
//! page never sent, filled with zeros at once. Each fault is timed from
//! the handler reading it to the page being installed. With storage
//! post-copy the owed set covers disk blocks too: a guest write to one
//! waits for it (see `disk`), timed the same way.
//! [`SimVm::end_postcopy`] closes the userfaultfd, which wakes any
//! blocked toucher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use convoy_protocol::page::{PageBitmap, PageIndex};

use super::SimVm;
use crate::backend::uffd::{Region, Uffd, UffdError};
use crate::backend::{BackendError, PagingError};

/// Demand paging of an incoming image after a post-copy switch.
pub(super) struct Paging {
    /// Closed (dropped) when paging ends: that wakes any blocked toucher.
    uffd: Mutex<Option<Arc<Uffd>>>,
    region: Region,
    page: usize,
    /// Pages owed at the switch: a fault on one asks the source.
    owed: PageBitmap,
    /// Faults asked for and not yet filled: page → first seen.
    waiting: Mutex<HashMap<u64, Instant>>,
    /// Fault-to-install times, microseconds.
    samples: Mutex<Vec<u64>>,
    stop: AtomicBool,
    handler: Mutex<Option<JoinHandle<()>>>,
}

impl Paging {
    /// Whether pages may still be missing (the userfaultfd is open).
    pub(super) fn is_active(&self) -> bool {
        self.uffd.lock().is_ok_and(|u| u.is_some())
    }
}

/// Demand-paging figures of a post-copy destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Faults on owed pages (asked of the source).
    pub faults: u64,
    /// Median fault-to-install time, microseconds.
    pub median_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
}

impl SimVm {
    /// Its demand paging, after a post-copy switch.
    pub(super) fn paging(&self) -> Option<Arc<Paging>> {
        self.shared.paging.lock().ok().and_then(|p| p.clone())
    }

    /// Post-copy: registers this image for demand paging, makes the `owed`
    /// pages missing, and starts the fault handler, which sends each owed
    /// page the VM waits for on `faults`. Call before
    /// [`Staging::start`](crate::backend::Staging::start).
    pub fn begin_postcopy(
        &self,
        owed: &PageBitmap,
        faults: tokio::sync::mpsc::UnboundedSender<PageIndex>,
    ) -> Result<(), BackendError> {
        let page = self.shared.geometry.page_size().bytes();
        let pages = self.shared.geometry.page_count();
        let paging_err = |e: UffdError| BackendError::from(PagingError::from(e));
        let uffd = Arc::new(Uffd::new().map_err(paging_err)?);
        let region = self.shared.mem.register(&uffd, page).map_err(paging_err)?;
        // Drop the owed pages staged before the switch, run by run.
        let mut run: Option<(u64, u64)> = None;
        let drop_run = |(start, end): (u64, u64)| {
            self.shared.mem.drop_range(
                &region,
                convoy_protocol::page::saturating_usize(start) * page,
                convoy_protocol::page::saturating_usize(end - start) * page,
            )
        };
        // Memory pages first in the bitmap; disk blocks (storage
        // post-copy) after them.
        for p in owed.iter().take_while(|p| p.0 < pages) {
            run = match run {
                Some((s, e)) if e == p.0 => Some((s, e + 1)),
                Some(r) => {
                    drop_run(r).map_err(paging_err)?;
                    Some((p.0, p.0 + 1))
                }
                None => Some((p.0, p.0 + 1)),
            };
        }
        if let Some(r) = run {
            drop_run(r).map_err(paging_err)?;
        }
        if owed.len() > pages {
            for d in &self.shared.disks {
                d.begin_demand(owed, faults.clone());
            }
        }
        let paging = Arc::new(Paging {
            uffd: Mutex::new(Some(uffd.clone())),
            region,
            page,
            owed: owed.clone(),
            waiting: Mutex::new(HashMap::new()),
            samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            handler: Mutex::new(None),
        });
        let handler = {
            let paging = paging.clone();
            crate::cpu::spawn(
                std::thread::Builder::new().name("convoy-faults".into()),
                move || serve_faults(&paging, &uffd, &faults),
            )
            .map_err(PagingError::Thread)?
        };
        if let Ok(mut h) = paging.handler.lock() {
            *h = Some(handler);
        }
        if let Ok(mut p) = self.shared.paging.lock() {
            *p = Some(paging);
        }
        Ok(())
    }

    /// Post-copy: installs `page` (`None`: zeros) if it is still missing,
    /// and wakes whoever waits for it. Returns whether it was installed; a
    /// page already present (a fault and a push crossed) is left alone.
    pub fn install_page(&self, page: PageIndex, data: Option<&[u8]>) -> Result<bool, BackendError> {
        if page.0 >= self.shared.geometry.page_count() {
            // Storage post-copy: a disk block.
            let (d, b) = self.disk_block(page)?;
            return d.install(b, data);
        }
        let Some(paging) = self.paging() else {
            return Err(BackendError::State("not demand paged"));
        };
        let uffd = paging.uffd.lock().ok().and_then(|u| u.clone());
        let Some(uffd) = uffd else {
            return Err(BackendError::State("demand paging has ended"));
        };
        let off = convoy_protocol::page::saturating_usize(page.0) * paging.page;
        let installed = match data {
            Some(d) => uffd.copy(&paging.region, off, d),
            None => uffd.zero(&paging.region, off),
        }
        .map_err(PagingError::from)?;
        if installed {
            let since = paging
                .waiting
                .lock()
                .ok()
                .and_then(|mut w| w.remove(&page.0));
            if let Some(t) = since {
                if let Ok(mut s) = paging.samples.lock() {
                    s.push(convoy_protocol::units::micros(t.elapsed()));
                }
            }
        }
        Ok(installed)
    }

    /// Post-copy fault figures so far.
    pub fn fault_stats(&self) -> Option<FaultStats> {
        let paging = self.paging()?;
        let mut samples = paging.samples.lock().ok()?.clone();
        // Disk blocks a guest write waited for, too.
        for d in &self.shared.disks {
            samples.extend(d.demand_samples());
        }
        samples.sort_unstable();
        // CAST: `q` is a quantile in 0..=1, so the index is in 0..len.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        Some(FaultStats {
            faults: samples.len() as u64,
            median_us: at(0.5),
            p99_us: at(0.99),
        })
    }

    /// Ends demand paging: stops the handler and closes the userfaultfd
    /// (which wakes any blocked toucher; a page still missing then reads
    /// as zeros, so call this once every page is in, or to stop the VM).
    pub fn end_postcopy(&self) {
        // A guest write waiting for a disk block holds the tick: free it.
        for d in &self.shared.disks {
            d.end_demand();
        }
        let Some(paging) = self.paging() else {
            return;
        };
        paging.stop.store(true, Ordering::Relaxed);
        let handler = paging.handler.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handler {
            let _ = h.join();
        }
        let closed = paging.uffd.lock().ok().and_then(|mut u| u.take());
        drop(closed);
    }
}

/// The fault handler: asks for owed pages, zero-fills the others.
fn serve_faults(
    paging: &Paging,
    uffd: &Uffd,
    faults: &tokio::sync::mpsc::UnboundedSender<PageIndex>,
) {
    while !paging.stop.load(Ordering::Relaxed) {
        let fault = match uffd.next_fault(&paging.region, Duration::from_millis(50)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("post-copy fault handler stops: {e}");
                return;
            }
        };
        let page = (fault.offset / paging.page) as u64;
        if paging.owed.contains(PageIndex(page)) {
            let first = paging
                .waiting
                .lock()
                .map(|mut w| {
                    let fresh = !w.contains_key(&page);
                    w.entry(page).or_insert_with(Instant::now);
                    fresh
                })
                .unwrap_or(false);
            if first && faults.send(PageIndex(page)).is_err() {
                // Nobody to ask: the VM waits until paging ends.
                tracing::warn!(page, "post-copy fault with no migration to ask");
            }
        } else if let Err(e) = uffd.zero(&paging.region, fault.offset) {
            tracing::error!(page, "cannot zero-fill a page never sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use convoy_protocol::ctl::ContentProfile;

    use super::super::testing::spec;
    use super::*;
    use crate::backend::{Staging, VmBackend};

    /// Whether userfaultfd can be used here; in CI (root) its absence is
    /// a failure, elsewhere the test is skipped.
    fn uffd_here() -> bool {
        if crate::backend::uffd::available() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "userfaultfd unavailable in CI"
        );
        eprintln!("skipped: userfaultfd unavailable (not root)");
        false
    }

    #[test]
    fn a_postcopy_image_runs_on_demand_paging_and_asks_only_for_owed_pages() {
        if !uffd_here() {
            return;
        }
        // No writes but the counter's, so the pages stay as sent.
        let src = SimVm::create(&spec(1 << 20, 0, ContentProfile::Random), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        src.pause().unwrap();
        let pages = src.geometry().page_count();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        // Pre-copy staged every page; pages 0..8 were dirtied since and are
        // owed, so their stale staged copies must not be seen.
        let mut buf = vec![0u8; 4096];
        for p in 0..pages {
            src.read_page(PageIndex(p), &mut buf);
            let stale: Vec<u8> = buf.iter().map(|b| !b).collect();
            dst.write_page(PageIndex(p), Some(if p < 8 { &stale } else { &buf }))
                .unwrap();
        }
        let mut owed = PageBitmap::empty(pages);
        for p in 0..8 {
            owed.insert(PageIndex(p));
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        dst.begin_postcopy(&owed, tx).unwrap();
        let (vm, from) = dst
            .clone()
            .start(&src.device_state().unwrap(), false)
            .unwrap();
        assert_eq!(from, src.counter());
        // The vCPU writes the counter into page 0 every tick: it faults.
        let asked = rx.blocking_recv().unwrap();
        assert_eq!(asked, PageIndex(0));
        let c = vm.counter();
        std::thread::sleep(Duration::from_millis(30));
        assert!(vm.counter() <= c + 1, "blocked on its missing page");
        for p in 0..8 {
            src.read_page(PageIndex(p), &mut buf);
            let fresh = dst.install_page(PageIndex(p), Some(&buf)).unwrap();
            assert!(fresh, "page {p} was present before it arrived");
        }
        // A second copy (a push that crossed a fault) is not installed.
        assert!(!dst.install_page(PageIndex(3), Some(&[7u8; 4096])).unwrap());
        std::thread::sleep(Duration::from_millis(30));
        assert!(vm.counter() > c + 5, "runs once its page is in");
        let f = dst.fault_stats().unwrap();
        assert!(f.faults >= 1 && f.median_us > 0, "{f:?}");
        // Page 3 holds the source's bytes, not the stale or the late copy.
        src.read_page(PageIndex(3), &mut buf);
        let mut got = vec![0u8; 4096];
        dst.read_staged(PageIndex(3), &mut got).unwrap();
        assert!(got == buf, "page 3 is not the source's");
        dst.end_postcopy();
        vm.destroy();
    }

    /// A VM started on demand paging with every page owed and nobody to
    /// serve its faults: its vCPU blocks on its first touch. Returns the
    /// running VM and the incoming image it was started from.
    fn blocked_postcopy_vm() -> (Arc<dyn VmBackend>, Arc<SimVm>) {
        let src = SimVm::create(&spec(1 << 20, 0, ContentProfile::Zero), None, None).unwrap();
        src.pause().unwrap();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        let owed = PageBitmap::full(src.geometry().page_count());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Asked, never answered.
        std::mem::forget(rx);
        dst.begin_postcopy(&owed, tx).unwrap();
        let (vm, _) = dst
            .clone()
            .start(&src.device_state().unwrap(), false)
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        (vm, dst)
    }

    #[test]
    fn a_vcpu_blocked_on_a_missing_page_does_not_hang_destroy() {
        if !uffd_here() {
            return;
        }
        let (vm, _dst) = blocked_postcopy_vm();
        // Never served: destroy must still return.
        vm.destroy();
        assert!(!vm.is_running());
    }

    #[test]
    fn dropping_a_vm_blocked_on_a_missing_page_does_not_hang() {
        if !uffd_here() {
            return;
        }
        let (vm, dst) = blocked_postcopy_vm();
        // Never served, never destroyed: the last reference going away
        // (an agent's task cancelled at shutdown) must still end the VM.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(vm);
            drop(dst);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(20)).is_ok(),
            "dropping a demand-paged VM hung on its blocked vCPU"
        );
    }
}
