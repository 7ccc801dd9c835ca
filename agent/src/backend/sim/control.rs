//! A sim VM's control words: everything its vCPU and the agent share
//! besides guest memory — the counter, pause, stop and tick-in-progress
//! flags, the workload's parameters, which host runs the vCPU, the memory
//! dirty bitmap and each disk's written-blocks bitmap — as atomic words
//! at the start of the VM's memfd, guest memory after them:
//!
//! ```text
//! memfd: [ header (32 + 128 words) | disks (3 words each) | dirty bitmap | written bitmaps | pad ][ guest memory ]
//!          └───────────── control, rounded up to a guest page ────────────────────────────┘
//! ```
//!
//! So the same workload code runs on a thread of the agent or in a helper
//! process (`helper`), and a restarted agent that maps the memfd again
//! finds the VM as its vCPU left it. The header says what the rest is
//! (magic, version, memory size, page size, disks), and [`Control::open`]
//! checks it against the file before anything is mapped past it.
//!
//! # Pause across processes
//!
//! The tick lock of an in-process vCPU becomes two flags (Dekker's
//! protocol, every access `SeqCst`): the vCPU sets `busy`, then reads
//! `paused`, and runs its tick only if clear, clearing `busy` after;
//! [`Control::pause`] sets `paused`, then waits until `busy` is clear. One
//! of the two sees the other's store, so once `pause` returns no tick is
//! in progress and none starts. A vCPU that died mid-tick leaves `busy`
//! set: `pause` asks whether it still lives and, if not, ignores it.
//!
//! # Which host runs the vCPU
//!
//! `owner` is [`THREAD`] (the agent's thread), [`HANDOFF`] while it moves,
//! or a helper's pid: a vCPU runs only while `owner` names it, so two
//! never tick at once.

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use convoy_protocol::page::{MemoryGeometry, PageBitmap, PageIndex};

use crate::backend::memory::{memfd, GuestMemory};
use crate::backend::{BackendError, VcpuError};

/// "convoyVM", little-endian.
const MAGIC: u64 = u64::from_le_bytes(*b"convoyVM");
/// The layout this build writes and reads (2: the service's words).
const VERSION: u64 = 2;
/// The most disks a header may name (a sim VM has a handful).
const MAX_DISKS: u64 = 64;
/// Where the service's response-time histogram starts.
const HISTOGRAM: usize = 32;
/// Words before the disks'.
const HEADER: usize = HISTOGRAM + convoy_protocol::ctl::service::BUCKETS;

/// `owner`: the agent's own thread runs the vCPU.
pub(super) const THREAD: u64 = 0;
/// `owner`: the vCPU is moving; nobody runs it.
pub(super) const HANDOFF: u64 = u64::MAX;

/// The header's words.
#[derive(Clone, Copy)]
enum Word {
    Magic = 0,
    Version,
    MemBytes,
    PageSize,
    Disks,
    Counter,
    Paused,
    Stop,
    Busy,
    Rate,
    Throttle,
    HotSet,
    Seed,
    Owner,
    /// A helper's pid, once it mapped the memfd and waits for `owner`.
    Ready,
    /// The service (`service`): requests per second (0: none), when its
    /// stream started (µs since the Unix epoch), the next request to
    /// serve, and its counters.
    SvcRate,
    SvcEpochUs,
    SvcNext,
    SvcServed,
    SvcSumUs,
    SvcDropped,
}

/// The service's words (see `service`).
#[derive(Clone, Copy, Debug)]
pub(super) enum Svc {
    Rate,
    EpochUs,
    Next,
    Served,
    SumUs,
    Dropped,
}

/// Where one disk's words are.
#[derive(Debug, Clone)]
struct DiskWords {
    first: u64,
    blocks: u64,
    written: Range<usize>,
}

/// A sim VM's control words (see the module docs).
pub(super) struct Control {
    map: GuestMemory,
    dirty: Range<usize>,
    disks: Vec<DiskWords>,
}

/// The layout of the control words for memory of `pages` and disks of
/// `(first leaf, blocks)`: the dirty bitmap's words, each disk's, and the
/// control's size in bytes, rounded up to `page`.
fn layout(pages: u64, disks: &[(u64, u64)], page: u64) -> (Range<usize>, Vec<DiskWords>, u64) {
    let words = |bits: u64| convoy_protocol::page::saturating_usize(bits.div_ceil(64));
    let mut at = HEADER + 3 * disks.len();
    let dirty = at..at + words(pages);
    at = dirty.end;
    let disks = disks
        .iter()
        .map(|&(first, blocks)| {
            let written = at..at + words(blocks);
            at = written.end;
            DiskWords {
                first,
                blocks,
                written,
            }
        })
        .collect();
    (dirty, disks, (at as u64 * 8).div_ceil(page) * page)
}

impl Control {
    /// A new memfd for a VM of `geometry` with disks of `(first leaf,
    /// blocks)`, named after `vm`: its control words (header written,
    /// the rest zero) and its guest memory (zero).
    pub(super) fn create(
        vm: &str,
        geometry: MemoryGeometry,
        disks: &[(u64, u64)],
    ) -> Result<(Control, GuestMemory), BackendError> {
        let page = geometry.page_size().bytes() as u64;
        let (dirty, disk_words, ctl) = layout(geometry.page_count(), disks, page);
        let alloc = |e| BackendError::Alloc(e);
        let file =
            Arc::new(memfd(&format!("convoy-sim:{vm}"), ctl + geometry.bytes()).map_err(alloc)?);
        let ctl_len = usize::try_from(ctl).map_err(|_| VcpuError::Header("too large"))?;
        let mem_len =
            usize::try_from(geometry.bytes()).map_err(|_| VcpuError::Header("too large"))?;
        let c = Control {
            map: GuestMemory::map(&file, 0, ctl_len).map_err(alloc)?,
            dirty,
            disks: disk_words,
        };
        let mem = GuestMemory::map(&file, ctl, mem_len).map_err(alloc)?;
        for (w, v) in [
            (Word::Magic, MAGIC),
            (Word::Version, VERSION),
            (Word::MemBytes, geometry.bytes()),
            (Word::PageSize, page),
            (Word::Disks, disks.len() as u64),
            (Word::HotSet, 10),
        ] {
            c.word(w).store(v, Ordering::Relaxed);
        }
        for (i, d) in c.disks.iter().enumerate() {
            c.at(HEADER + 3 * i).store(d.first, Ordering::Relaxed);
            c.at(HEADER + 3 * i + 1).store(d.blocks, Ordering::Relaxed);
        }
        Ok((c, mem))
    }

    /// Maps the memfd `file` of a VM made by [`Control::create`]: its
    /// header is checked (magic, version, sizes, the file's length) before
    /// anything past it is trusted.
    pub(super) fn open(
        file: &Arc<File>,
    ) -> Result<(Control, GuestMemory, MemoryGeometry), BackendError> {
        let bad = |why| BackendError::from(VcpuError::Header(why));
        let len = file.metadata().map_err(VcpuError::Map)?.len();
        let head = GuestMemory::map(file, 0, HEADER * 8).map_err(VcpuError::Map)?;
        let h = |w: Word| head.load_word(w as usize);
        if h(Word::Magic) != MAGIC || h(Word::Version) != VERSION {
            return Err(bad("not a sim VM's memfd of this version"));
        }
        let geometry =
            MemoryGeometry::from_bytes(h(Word::MemBytes)).map_err(|_| bad("memory size"))?;
        let page = geometry.page_size().bytes() as u64;
        if h(Word::PageSize) != page {
            return Err(bad("page size"));
        }
        let n = h(Word::Disks);
        if n > MAX_DISKS {
            return Err(bad("too many disks"));
        }
        let n = convoy_protocol::page::saturating_usize(n);
        // The disks' extents, from a map just long enough to hold them.
        let extents = GuestMemory::map(file, 0, (HEADER + 3 * n) * 8).map_err(VcpuError::Map)?;
        let disks: Vec<(u64, u64)> = (0..n)
            .map(|i| {
                (
                    extents.load_word(HEADER + 3 * i),
                    extents.load_word(HEADER + 3 * i + 1),
                )
            })
            .collect();
        let leaves = disks
            .iter()
            .try_fold(geometry.page_count(), |at, &(first, blocks)| {
                (first == at).then(|| at.checked_add(blocks)).flatten()
            });
        if leaves.is_none_or(|l| l > 1 << 40) {
            return Err(bad("disk extents"));
        }
        let (dirty, disk_words, ctl) = layout(geometry.page_count(), &disks, page);
        if ctl.checked_add(geometry.bytes()) != Some(len) {
            return Err(bad("the memfd's length"));
        }
        let ctl_len = usize::try_from(ctl).map_err(|_| bad("too large"))?;
        let mem_len = usize::try_from(geometry.bytes()).map_err(|_| bad("too large"))?;
        let c = Control {
            map: GuestMemory::map(file, 0, ctl_len).map_err(VcpuError::Map)?,
            dirty,
            disks: disk_words,
        };
        let mem = GuestMemory::map(file, ctl, mem_len).map_err(VcpuError::Map)?;
        Ok((c, mem, geometry))
    }

    /// The memfd.
    pub(super) fn file(&self) -> &Arc<File> {
        self.map.file()
    }

    fn at(&self, i: usize) -> &AtomicU64 {
        // Every index used is inside the header or a range `layout` made,
        // all inside the mapping.
        &self.map.words()[i]
    }

    fn word(&self, w: Word) -> &AtomicU64 {
        self.at(w as usize)
    }

    pub(super) fn counter(&self) -> &AtomicU64 {
        self.word(Word::Counter)
    }
    pub(super) fn rate(&self) -> &AtomicU64 {
        self.word(Word::Rate)
    }
    /// Auto-converge throttle, percent of ticks skipped.
    pub(super) fn throttle(&self) -> &AtomicU64 {
        self.word(Word::Throttle)
    }
    pub(super) fn hot_set_pct(&self) -> &AtomicU64 {
        self.word(Word::HotSet)
    }
    pub(super) fn seed(&self) -> &AtomicU64 {
        self.word(Word::Seed)
    }
    /// Which host runs the vCPU: [`THREAD`], [`HANDOFF`] or a helper's pid.
    pub(super) fn owner(&self) -> &AtomicU64 {
        self.word(Word::Owner)
    }
    /// A helper's pid once it is ready to take the vCPU.
    pub(super) fn ready(&self) -> &AtomicU64 {
        self.word(Word::Ready)
    }

    /// One of the service's words.
    pub(super) fn svc(&self, w: Svc) -> &AtomicU64 {
        self.word(match w {
            Svc::Rate => Word::SvcRate,
            Svc::EpochUs => Word::SvcEpochUs,
            Svc::Next => Word::SvcNext,
            Svc::Served => Word::SvcServed,
            Svc::SumUs => Word::SvcSumUs,
            Svc::Dropped => Word::SvcDropped,
        })
    }

    /// The service's response-time histogram.
    pub(super) fn svc_histogram(&self) -> &[AtomicU64] {
        self.map.words().get(HISTOGRAM..HEADER).unwrap_or_default()
    }

    pub(super) fn is_paused(&self) -> bool {
        self.word(Word::Paused).load(Ordering::SeqCst) != 0
    }

    /// Sets `paused` without waiting (a VM not running yet).
    pub(super) fn set_paused(&self, paused: bool) {
        self.word(Word::Paused)
            .store(u64::from(paused), Ordering::SeqCst);
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.word(Word::Stop).load(Ordering::Relaxed) != 0
    }

    /// Tells every vCPU of the VM to end.
    pub(super) fn stop(&self) {
        self.word(Word::Stop).store(1, Ordering::SeqCst);
    }

    /// The vCPU, before a tick: whether it may run it. If so it must call
    /// [`Control::end_tick`] after.
    pub(super) fn begin_tick(&self) -> bool {
        let busy = self.word(Word::Busy);
        busy.store(1, Ordering::SeqCst);
        if self.is_paused() {
            busy.store(0, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The vCPU, after a tick.
    pub(super) fn end_tick(&self) {
        self.word(Word::Busy).store(0, Ordering::SeqCst);
    }

    /// Pauses the vCPU: once this returns, no tick is in progress and
    /// none starts until [`Control::resume`]. `alive` says whether the
    /// vCPU still lives; a dead one's `busy` is ignored. False if it was.
    pub(super) fn pause(&self, alive: impl Fn() -> bool) -> bool {
        self.set_paused(true);
        let busy = self.word(Word::Busy);
        let mut spins = 0u32;
        while busy.load(Ordering::SeqCst) != 0 {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
                continue;
            }
            // A tick takes microseconds; a vCPU that is gone, for ever.
            if spins % 1000 == 0 && !alive() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        true
    }

    /// Lets the vCPU run again.
    pub(super) fn resume(&self) {
        self.set_paused(false);
    }

    /// Sets `page`'s bit in the dirty log, after its write (release).
    pub(super) fn mark_dirty(&self, page: u64) {
        if let Some(w) = self.dirty_words().get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    /// The dirty bitmap of memory.
    pub(super) fn dirty_words(&self) -> &[AtomicU64] {
        self.map.words().get(self.dirty.clone()).unwrap_or_default()
    }

    fn disk(&self, i: usize) -> Option<&DiskWords> {
        self.disks.get(i)
    }

    /// Disk `i`'s writes per second.
    pub(super) fn disk_rate(&self, i: usize) -> u64 {
        self.disk(i)
            .map_or(0, |_| self.at(HEADER + 3 * i + 2).load(Ordering::Relaxed))
    }

    pub(super) fn set_disk_rate(&self, i: usize, rate: u64) {
        if self.disk(i).is_some() {
            self.at(HEADER + 3 * i + 2).store(rate, Ordering::Relaxed);
        }
    }

    /// Disk `i`'s first leaf and blocks.
    pub(super) fn disk_extent(&self, i: usize) -> Option<(u64, u64)> {
        self.disk(i).map(|d| (d.first, d.blocks))
    }

    fn written(&self, i: usize) -> &[AtomicU64] {
        self.disk(i)
            .and_then(|d| self.map.words().get(d.written.clone()))
            .unwrap_or_default()
    }

    /// Marks block `b` of disk `i` written, after the write (release).
    pub(super) fn mark_written(&self, i: usize, b: u64) {
        if let Some(w) = self.written(i).get((b / 64) as usize) {
            w.fetch_or(1 << (b % 64), Ordering::Release);
        }
    }

    /// Moves the blocks of disk `i` written since the last call into `log`
    /// (a bitmap over the whole leaf space), as leaves.
    pub(super) fn take_written(&self, i: usize, log: &mut PageBitmap) {
        let first = self.disk(i).map_or(0, |d| d.first);
        for (k, w) in self.written(i).iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Acquire);
            while bits != 0 {
                let b = k as u64 * 64 + u64::from(bits.trailing_zeros());
                log.insert(PageIndex(first + b));
                bits &= bits - 1;
            }
        }
    }

    /// Forgets every block and page written so far.
    pub(super) fn clear_logs(&self) {
        for w in self.dirty_words() {
            w.store(0, Ordering::Release);
        }
        for i in 0..self.disks.len() {
            for w in self.written(i) {
                w.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn control() -> (Control, GuestMemory) {
        let g = MemoryGeometry::from_bytes(64 * 4096).unwrap();
        Control::create("t", g, &[(64, 100), (164, 3)]).unwrap()
    }

    #[test]
    fn a_control_opened_again_is_the_same_and_a_bad_header_is_refused() {
        let (c, mem) = control();
        c.counter().store(41, Ordering::Relaxed);
        c.set_disk_rate(1, 9);
        c.mark_written(1, 2);
        mem.store_word(0, 41);
        let (again, mem2, g) = Control::open(c.file()).unwrap();
        assert_eq!(g.bytes(), 64 * 4096);
        assert_eq!(again.counter().load(Ordering::Relaxed), 41);
        assert_eq!(mem2.load_word(0), 41);
        assert_eq!(again.disk_rate(1), 9);
        assert_eq!(again.disk_extent(1), Some((164, 3)));
        let mut log = PageBitmap::empty(167);
        again.take_written(1, &mut log);
        assert_eq!(log.iter().collect::<Vec<_>>(), vec![PageIndex(166)]);
        // Another file, a wrong magic, an extent past the memory.
        let other = Arc::new(memfd("x", 8192).unwrap());
        assert!(Control::open(&other).is_err());
        c.at(HEADER).store(65, Ordering::Relaxed);
        assert!(Control::open(c.file()).is_err(), "disk extents");
        c.at(HEADER).store(64, Ordering::Relaxed);
        c.word(Word::Magic).store(1, Ordering::Relaxed);
        assert!(Control::open(c.file()).is_err(), "magic");
    }

    #[test]
    fn pause_waits_out_a_tick_and_no_tick_starts_after_it() {
        let (c, _mem) = control();
        let c = Arc::new(c);
        // A vCPU: counts ticks, each tick writes `in_tick` around a sleep.
        let in_tick = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let (c, in_tick, done) = (c.clone(), in_tick.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    if c.begin_tick() {
                        in_tick.store(true, Ordering::SeqCst);
                        c.counter().fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(300));
                        in_tick.store(false, Ordering::SeqCst);
                        c.end_tick();
                    }
                    std::thread::yield_now();
                }
            })
        };
        for _ in 0..200 {
            assert!(c.pause(|| true));
            assert!(!in_tick.load(Ordering::SeqCst), "a tick runs after pause");
            let n = c.counter().load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(c.counter().load(Ordering::SeqCst), n, "a tick started");
            c.resume();
            std::thread::sleep(Duration::from_micros(500));
        }
        done.store(true, Ordering::SeqCst);
        vcpu.join().unwrap();
        assert!(c.counter().load(Ordering::SeqCst) > 50);
    }

    #[test]
    fn a_dead_vcpu_s_stale_busy_does_not_hold_pause() {
        let (c, _mem) = control();
        // Died mid-tick.
        assert!(c.begin_tick());
        let t = std::time::Instant::now();
        assert!(!c.pause(|| false), "reported dead");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(c.is_paused());
    }
}
