//! What the migration source sees of a simulated VM: [`VmBackend`] —
//! pages and the disks' blocks as leaves, the dirty log (memory's atomic
//! bitmap and each disk's write bitmap), pause and resume, the throttle,
//! the device state, and `destroy`, which wipes memory and removes the
//! VM's disk files.

use std::sync::atomic::Ordering;

use convoy_protocol::page::{MemoryGeometry, PageBitmap, PageIndex};

use super::device::DeviceState;
use super::SimVm;
use crate::backend::{BackendError, VmBackend};

impl VmBackend for SimVm {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn geometry(&self) -> MemoryGeometry {
        self.shared.geometry
    }

    fn read_page(&self, page: PageIndex, buf: &mut [u8]) {
        let size = self.shared.geometry.page_size().bytes();
        self.shared
            .mem
            .read(convoy_protocol::page::saturating_usize(page.0) * size, buf);
    }

    fn disks(&self) -> Vec<convoy_protocol::disk::DiskGeometry> {
        self.shared
            .disks
            .iter()
            .map(|d| d.geometry().clone())
            .collect()
    }

    fn read_leaf(&self, leaf: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        if leaf.0 < self.shared.geometry.page_count() {
            self.read_page(leaf, buf);
            return Ok(());
        }
        let (d, b) = self.disk_block(leaf)?;
        d.read(b, buf)
    }

    fn start_dirty_log(&self) {
        self.shared.ctl.clear_logs();
    }

    fn collect_dirty_log(&self) -> PageBitmap {
        let words = self
            .shared
            .ctl
            .dirty_words()
            .iter()
            .map(|w| w.swap(0, Ordering::Acquire))
            .collect();
        let memory = PageBitmap::from_words(words, self.shared.geometry.page_count());
        if self.shared.disks.is_empty() {
            return memory;
        }
        let mut log = PageBitmap::empty(self.shared.leaves);
        for p in memory.iter() {
            log.insert(p);
        }
        for i in 0..self.shared.disks.len() {
            self.shared.ctl.take_written(i, &mut log);
        }
        log
    }

    fn stop_dirty_log(&self) {
        // The sim always records; clearing is enough.
        self.start_dirty_log();
    }

    fn pause(&self) -> Result<(), BackendError> {
        // Wait out a tick in progress: after this no write is in flight
        // (a helper that died mid-tick is not waited for).
        if !self.shared.ctl.pause(|| self.vcpu_alive()) {
            tracing::warn!("a sim VM's vCPU helper is gone");
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), BackendError> {
        if self.shared.ctl.is_stopped() {
            return Err(BackendError::State("destroyed"));
        }
        self.shared.ctl.resume();
        Ok(())
    }

    fn device_state(&self) -> Result<Vec<u8>, BackendError> {
        DeviceState::of(&self.shared).encode()
    }

    fn counter(&self) -> u64 {
        self.shared.ctl.counter().load(Ordering::Relaxed)
    }

    fn is_running(&self) -> bool {
        !self.shared.ctl.is_paused() && !self.shared.ctl.is_stopped()
    }

    fn dirty_rate(&self) -> u64 {
        self.shared.ctl.rate().load(Ordering::Relaxed)
    }

    fn service(&self) -> Option<convoy_protocol::ctl::service::ServiceStats> {
        super::service::stats(&self.shared.ctl)
    }

    fn set_throttle(&self, percent: u8) {
        self.shared
            .ctl
            .throttle()
            .store(u64::from(percent.min(99)), Ordering::Relaxed);
    }

    fn destroy(&self) {
        // A vCPU blocked on a missing page holds the tick: wake it first.
        self.end_postcopy();
        let _ = self.pause();
        self.shared.ctl.stop();
        self.stop_workload();
        self.stop_helper();
        self.shared.mem.wipe();
        // Its disks go with it (a VM that moved runs on the copies).
        if let Some(dir) = &self.shared.disk_dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }

    fn vcpu_record(&self) -> Option<super::VcpuRecord> {
        self.record()
    }
}

#[cfg(test)]
mod tests {
    use convoy_protocol::ctl::ContentProfile;

    use super::super::testing::spec;
    use super::*;
    use crate::backend::Staging;

    fn all_zero(vm: &SimVm) -> bool {
        let mut buf = vec![0u8; 4096];
        (0..vm.geometry().page_count()).all(|p| {
            vm.read_page(PageIndex(p), &mut buf);
            convoy_protocol::page::is_zero(&buf)
        })
    }

    #[test]
    fn a_handed_over_vm_and_a_discarded_staging_image_are_wiped() {
        // Source side: after handover the engine destroys the VM.
        let vm = SimVm::create(&spec(1 << 20, 5000, ContentProfile::Random), None, None).unwrap();
        assert!(!all_zero(&vm));
        vm.destroy();
        assert!(all_zero(&vm), "guest memory readable after destroy");
        assert!(vm.resume().is_err(), "a destroyed VM never runs again");
        // Destination side: a staging image discarded on abort.
        let staging = SimVm::incoming(vm.geometry()).unwrap();
        staging
            .write_page(PageIndex(3), Some(&[7u8; 4096]))
            .unwrap();
        assert!(!all_zero(&staging));
        staging.discard();
        assert!(all_zero(&staging), "staging readable after discard");
    }
}
