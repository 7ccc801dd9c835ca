//! What a migration destination builds of a simulated VM: the incoming
//! image (zeroed, paused memory and all-hole disks in a directory made
//! for it, refused up front if the disks would not fit), [`Staging`] —
//! leaves written in, read back for digests — disks staged from a base
//! image, flushed while they arrive and synced before the destination
//! says Started, and `start` from the device state the source sent.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use convoy_protocol::page::{MemoryGeometry, PageIndex};

use super::device::DeviceState;
use super::disk::SimDisk;
use super::{make_disks, SimVm};
use crate::backend::{
    BackendError, DeviceStateError, DiskFileError, SpecError, Staging, VmBackend,
};

impl SimVm {
    /// A zeroed, stopped image of `bytes` to migrate into.
    pub fn incoming(geometry: MemoryGeometry) -> Result<Arc<SimVm>, BackendError> {
        SimVm::incoming_with_disks(geometry, &[], None)
    }

    /// As [`SimVm::incoming`], with empty (all-hole) `disks` made in
    /// `disk_dir/NAME/` (`vm`'s directory, which must not exist yet).
    pub fn incoming_with_disks(
        geometry: MemoryGeometry,
        disks: &[convoy_protocol::disk::DiskGeometry],
        disk_dir: Option<(&std::path::Path, &str)>,
    ) -> Result<Arc<SimVm>, BackendError> {
        convoy_protocol::disk::check(geometry, disks).map_err(SpecError::from)?;
        let (made, dir) = match (disks.is_empty(), disk_dir) {
            (true, _) => (Vec::new(), None),
            (false, None) => return Err(DiskFileError::NoDiskDir.into()),
            (false, Some((root, vm))) => {
                check_room(root, disks.iter().map(|d| d.bytes).sum())?;
                let block = geometry.page_size().bytes();
                let ranges = convoy_protocol::disk::leaf_ranges(geometry, disks);
                make_disks(root, vm, |dir| {
                    disks
                        .iter()
                        .zip(ranges)
                        .map(|(d, r)| SimDisk::incoming(dir, d.clone(), r.start, block))
                        .collect()
                })?
            }
        };
        let name = disk_dir.map_or("incoming", |(_, vm)| vm);
        let vm = SimVm::blank(name, geometry.bytes(), made, dir)?;
        vm.shared.ctl.set_paused(true);
        Ok(Arc::new(vm))
    }

    /// Starts incoming disk `disk` as a copy of `base` (before any block
    /// of it arrives). Blocking.
    pub fn stage_base(
        &self,
        disk: usize,
        base: &crate::backend::base::BaseIndex,
    ) -> Result<(), BackendError> {
        match self.shared.disks.get(disk) {
            Some(d) => d.fill_from(base),
            None => Err(SpecError::NoDisk(disk).into()),
        }
    }

    /// Puts an arrived VM's disks on stable storage, and their names (the
    /// VM's directory and its entry in the disk directory, both made for
    /// this migration). The destination does this once the VM runs, and
    /// says Started (on which the source discards its copy) only after.
    /// Blocking.
    pub fn sync_disks(&self) -> Result<(), BackendError> {
        for d in &self.shared.disks {
            d.sync()?;
        }
        if let Some(dir) = &self.shared.disk_dir {
            for d in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
                std::fs::File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| DiskFileError::io("cannot sync", d, e))?;
            }
        }
        Ok(())
    }

    /// Writes the disks' data written so far to stable storage. An
    /// incoming VM's disks are flushed while they arrive, so that the
    /// sync before Started ([`SimVm::sync_disks`]) has only the last
    /// blocks to write, not the whole disk.
    pub fn flush_disks(&self) -> Result<(), BackendError> {
        for d in &self.shared.disks {
            d.flush()?;
        }
        Ok(())
    }
}

/// Refuses disks that would not fit in the free space under `root`: they
/// are sparse as they arrive but may fill, and running out of space in
/// the middle of a migration would fail it late.
fn check_room(root: &std::path::Path, need: u64) -> Result<(), BackendError> {
    crate::private::create_dir_all(root)
        .map_err(|e| DiskFileError::io("cannot create", root, e))?;
    let st =
        rustix::fs::statvfs(root).map_err(|e| DiskFileError::io("cannot stat", root, e.into()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if need > free {
        return Err(DiskFileError::NoRoom {
            need,
            root: root.to_owned(),
            free,
        }
        .into());
    }
    Ok(())
}

impl Staging for SimVm {
    fn write_page(&self, page: PageIndex, data: Option<&[u8]>) -> Result<(), BackendError> {
        let size = self.shared.geometry.page_size().bytes();
        if page.0 < self.shared.geometry.page_count() {
            let off = convoy_protocol::page::saturating_usize(page.0) * size;
            match data {
                Some(d) => self.shared.mem.write(off, d),
                None => self.shared.mem.zero(off, size),
            }
            return Ok(());
        }
        let (d, b) = self.disk_block(page)?;
        d.write(b, data)
    }

    fn read_staged(&self, page: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read_leaf(page, buf)
    }

    fn start(
        self: Arc<Self>,
        device_state: &[u8],
        paused: bool,
    ) -> Result<(Arc<dyn VmBackend>, u64), BackendError> {
        let s = DeviceState::decode(device_state, self.shared.disks.len())?;
        // Memory and device state must agree: page 0 holds the counter.
        // (After a post-copy switch page 0 may still be on its way; the
        // root check at the end covers it.)
        if self.paging().is_none() && self.shared.mem.load_word(0) != s.counter {
            return Err(DeviceStateError::Counter {
                counter: s.counter,
                memory: self.shared.mem.load_word(0),
            }
            .into());
        }
        self.shared
            .ctl
            .counter()
            .store(s.counter, Ordering::Relaxed);
        self.set_workload(s.dirty_pages_per_sec, s.hot_set_pct, s.seed);
        for (i, r) in s.disk_writes_per_sec.iter().enumerate() {
            self.shared.ctl.set_disk_rate(i, *r);
        }
        s.service.restore(&self.shared.ctl);
        self.shared.ctl.set_paused(paused);
        self.spawn_workload();
        Ok((self, s.counter))
    }

    fn discard(&self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use convoy_protocol::ctl::ContentProfile;

    use super::super::testing::spec;
    use super::*;

    #[test]
    fn a_vm_with_a_disk_copied_leaf_by_leaf_starts_paused_with_the_same_disk() {
        let root = tempfile::tempdir().unwrap();
        let mut s = spec(1 << 20, 2000, ContentProfile::Mixed);
        s.disks = vec![convoy_protocol::ctl::SimDiskSpec {
            name: "root".parse().unwrap(),
            bytes: 64 * 4096,
            writes_per_sec: 2000,
            used_pct: 50,
            base: None,
        }];
        let src = SimVm::create(&s, Some(&root.path().join("a")), None).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        src.pause().unwrap();
        let disks = src.disks();
        assert_eq!(disks.len(), 1);
        let leaves = convoy_protocol::disk::check(src.geometry(), &disks).unwrap();
        let ranges = convoy_protocol::disk::leaf_ranges(src.geometry(), &disks);
        let dst =
            SimVm::incoming_with_disks(src.geometry(), &disks, Some((&root.path().join("b"), "t")))
                .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut disk_leaves = Vec::new();
        for l in 0..leaves {
            src.read_leaf(PageIndex(l), &mut buf).unwrap();
            dst.write_page(PageIndex(l), Some(&buf)).unwrap();
            if ranges[0].contains(&l) {
                disk_leaves.push(convoy_protocol::digest::leaf_digest(&buf));
            }
        }
        let want = convoy_protocol::disk::disk_root(&disk_leaves);
        let file = root.path().join("b/t/root.img");
        let got = |f: &std::path::Path| {
            convoy_protocol::disk::file_root(std::fs::File::open(f).unwrap(), 64 * 4096, 4096)
                .unwrap()
        };
        let (vm, from) = dst
            .clone()
            .start(&src.device_state().unwrap(), true)
            .unwrap();
        assert_eq!(from, src.counter());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.counter(), from, "a VM started paused does not run");
        assert_eq!(got(&file), want, "the disk file holds what was copied");
        assert_eq!(got(&root.path().join("a/t/root.img")), want);
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(vm.counter() > from, "runs once resumed");
        assert_ne!(got(&file), want, "and its workload writes its disk");
        vm.destroy();
        src.destroy();
        assert!(!file.exists() && !root.path().join("a/t").exists());
    }

    #[test]
    fn staging_starts_from_device_state_and_checks_it() {
        let src = SimVm::create(&spec(1 << 20, 1000, ContentProfile::Mixed), None, None).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        src.pause().unwrap();
        let dst = SimVm::incoming(src.geometry()).unwrap();
        let mut buf = vec![0u8; 4096];
        for p in 0..src.geometry().page_count() {
            src.read_page(PageIndex(p), &mut buf);
            dst.write_page(PageIndex(p), Some(&buf)).unwrap();
        }
        let state = src.device_state().unwrap();
        assert!(dst.clone().start(b"garbage", false).is_err());
        let (started, resumed_from) = dst.start(&state, false).unwrap();
        assert_eq!(resumed_from, src.counter());
        std::thread::sleep(Duration::from_millis(10));
        assert!(started.counter() > src.counter());
    }
}
