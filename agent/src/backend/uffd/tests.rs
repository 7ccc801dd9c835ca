//! Tests of the whole module against the kernel: faults block until a
//! fill, fills never touch a present page, regions are tied to their
//! descriptor, and ending registration wakes every blocked reader.

#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Tests: small page counts and offsets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use rustix::io::Errno;

use super::{Fault, Region, Uffd, UffdError};

const PAGE: usize = 4096;
const WAIT: Duration = Duration::from_secs(5);

/// Fields drop in order: the descriptor goes before the mapping.
struct Guest {
    uffd: Uffd,
    region: Region,
    map: MmapMut,
}

impl Guest {
    fn new(pages: usize) -> Guest {
        let mut map = MmapOptions::new().len(pages * PAGE).map_anon().unwrap();
        let uffd = Uffd::new().unwrap();
        // SAFETY: `map` is private anonymous, lives as long as `uffd` (same
        // struct, dropped after), and tests touch it only via atomics.
        let region = unsafe { uffd.register(map.as_mut_ptr(), pages * PAGE, PAGE) }.unwrap();
        Guest { uffd, region, map }
    }

    /// The guest's view of the word at `offset`, as the sim VM sees memory.
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= self.map.len());
        // SAFETY: aligned, in bounds, the mapping outlives the borrow, and
        // all accesses to it go through atomics.
        unsafe { AtomicU64::from_ptr(self.map.as_ptr().add(offset) as *mut u64) }
    }

    fn addr(&self) -> usize {
        self.map.as_ptr() as usize
    }
}

/// A guest word read from another thread (the address travels as a
/// usize: the mapping outlives the thread, joined before drop).
fn spawn_load(addr: usize) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        // SAFETY: `addr` is an aligned word of a `Guest` mapping that outlives
        // this thread (joined before the guest drops) and is only ever
        // accessed through atomics, as in `Guest::word`.
        unsafe { AtomicU64::from_ptr(addr as *mut u64) }.load(Ordering::SeqCst)
    })
}

fn page_of(byte: u8) -> Vec<u8> {
    (0..PAGE).map(|i| byte ^ (i as u8)).collect()
}

#[test]
fn read_fault_blocks_until_copy() {
    let g = Guest::new(4);
    let reader = spawn_load(g.addr() + 2 * PAGE + 16);
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(
        fault,
        Fault {
            offset: 2 * PAGE,
            write: false
        }
    );
    thread::sleep(Duration::from_millis(20));
    assert!(
        !reader.is_finished(),
        "reader must block until the page is filled"
    );
    let data = page_of(0xA5);
    assert!(g.uffd.copy(&g.region, 2 * PAGE, &data).unwrap());
    let got = reader.join().unwrap();
    assert_eq!(got, u64::from_ne_bytes(data[16..24].try_into().unwrap()));
    // The whole page is exactly what was copied.
    for off in (0..PAGE).step_by(8) {
        let want = u64::from_ne_bytes(data[off..off + 8].try_into().unwrap());
        assert_eq!(g.word(2 * PAGE + off).load(Ordering::Relaxed), want);
    }
}

#[test]
fn write_fault_reports_write() {
    let g = Guest::new(2);
    let addr = g.addr() + PAGE + 8;
    let writer = thread::spawn(move || {
        // SAFETY: `addr` is an aligned word of a `Guest` mapping that outlives
        // this thread (joined before the guest drops) and is only ever
        // accessed through atomics, as in `Guest::word`.
        unsafe { AtomicU64::from_ptr(addr as *mut u64) }.store(7, Ordering::SeqCst)
    });
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(
        fault,
        Fault {
            offset: PAGE,
            write: true
        }
    );
    assert!(g.uffd.copy(&g.region, PAGE, &page_of(1)).unwrap());
    writer.join().unwrap();
    assert_eq!(g.word(PAGE + 8).load(Ordering::SeqCst), 7);
    assert_eq!(
        g.word(PAGE).load(Ordering::SeqCst),
        u64::from_ne_bytes(page_of(1)[..8].try_into().unwrap())
    );
    // An atomic read-modify-write is a write fault too.
    let addr = g.addr();
    let rmw = thread::spawn(move || {
        // SAFETY: `addr` is an aligned word of a `Guest` mapping that outlives
        // this thread (joined before the guest drops) and is only ever
        // accessed through atomics, as in `Guest::word`.
        unsafe { AtomicU64::from_ptr(addr as *mut u64) }.fetch_add(1, Ordering::SeqCst)
    });
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(
        fault,
        Fault {
            offset: 0,
            write: true
        }
    );
    assert!(g.uffd.zero(&g.region, 0).unwrap());
    assert_eq!(rmw.join().unwrap(), 0);
    assert_eq!(g.word(0).load(Ordering::SeqCst), 1);
}

#[test]
fn zero_serves_fault_and_copy_onto_present_page_is_false() {
    let g = Guest::new(2);
    let reader = spawn_load(g.addr() + PAGE + 64);
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(fault.offset, PAGE);
    assert!(g.uffd.zero(&g.region, PAGE).unwrap());
    assert_eq!(reader.join().unwrap(), 0);
    // Present (zero page): neither copy nor zero changes it.
    assert!(!g.uffd.copy(&g.region, PAGE, &page_of(9)).unwrap());
    assert!(!g.uffd.zero(&g.region, PAGE).unwrap());
    assert_eq!(g.word(PAGE + 64).load(Ordering::SeqCst), 0);
    // Present (copied data): a second copy is refused, data unchanged.
    assert!(g.uffd.copy(&g.region, 0, &page_of(3)).unwrap());
    assert!(!g.uffd.copy(&g.region, 0, &page_of(4)).unwrap());
    let want = u64::from_ne_bytes(page_of(3)[..8].try_into().unwrap());
    assert_eq!(g.word(0).load(Ordering::SeqCst), want);
    // Nothing faulted along the way.
    assert_eq!(
        g.uffd
            .next_fault(&g.region, Duration::from_millis(10))
            .unwrap(),
        None
    );
}

#[test]
fn drop_pages_makes_page_fault_again() {
    let g = Guest::new(3);
    assert!(g.uffd.copy(&g.region, PAGE, &page_of(5)).unwrap());
    // Present: no fault.
    assert_ne!(g.word(PAGE).load(Ordering::SeqCst), 0);
    // SAFETY: no references into the mapping; only atomics touch it.
    unsafe { g.region.drop_pages(PAGE, PAGE) }.unwrap();
    let reader = spawn_load(g.addr() + PAGE);
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(
        fault,
        Fault {
            offset: PAGE,
            write: false
        }
    );
    let fresh = page_of(6);
    assert!(g.uffd.copy(&g.region, PAGE, &fresh).unwrap());
    assert_eq!(
        reader.join().unwrap(),
        u64::from_ne_bytes(fresh[..8].try_into().unwrap())
    );
}

#[test]
fn out_of_range_is_an_error() {
    let g = Guest::new(2);
    let r = &g.region;
    let page = page_of(0);
    for off in [2 * PAGE, 100, usize::MAX - PAGE + 1] {
        assert!(
            matches!(
                g.uffd.copy(r, off, &page),
                Err(UffdError::OutOfRange { .. })
            ),
            "{off}"
        );
        assert!(
            matches!(g.uffd.zero(r, off), Err(UffdError::OutOfRange { .. })),
            "{off}"
        );
    }
    for (off, len) in [
        (0, 0),
        (0, 3 * PAGE),
        (PAGE, 2 * PAGE),
        (0, 100),
        (usize::MAX - PAGE + 1, PAGE),
    ] {
        assert!(
            matches!(g.uffd.wake(r, off, len), Err(UffdError::OutOfRange { .. })),
            "{off} {len}"
        );
        // SAFETY: each range is refused by the bounds check before
        // `madvise`, so no memory is touched.
        let dropped = unsafe { r.drop_pages(off, len) };
        assert!(
            matches!(dropped, Err(UffdError::OutOfRange { .. })),
            "{off} {len}"
        );
    }
    assert!(matches!(
        g.uffd.copy(r, 0, &page[..100]),
        Err(UffdError::PageLength { .. })
    ));
    let mut m = MmapOptions::new().len(2 * PAGE).map_anon().unwrap();
    // SAFETY: a misaligned base is refused before the ioctl, so nothing is
    // registered (the pointer stays inside `m`).
    let bad = unsafe { g.uffd.register(m.as_mut_ptr().add(8), PAGE, PAGE) };
    assert!(matches!(bad, Err(UffdError::BadRegion { .. })));
    // SAFETY: a page size that is not a power of two is refused before the
    // ioctl, so nothing is registered.
    let bad = unsafe { g.uffd.register(m.as_mut_ptr(), 2 * PAGE, 3000) };
    assert!(matches!(bad, Err(UffdError::BadRegion { .. })));
    // In range: fine.
    g.uffd.wake(r, 0, 2 * PAGE).unwrap();
}

#[test]
fn regions_are_tied_to_their_uffd() {
    let a = Guest::new(1);
    let b = Uffd::new().unwrap();
    let foreign = |r: Result<(), UffdError>| matches!(r, Err(UffdError::ForeignRegion { .. }));
    assert!(foreign(b.copy(&a.region, 0, &page_of(1)).map(drop)));
    assert!(foreign(b.zero(&a.region, 0).map(drop)));
    assert!(foreign(b.wake(&a.region, 0, PAGE)));
    assert!(foreign(b.unregister(&a.region)));
    assert!(foreign(b.next_fault(&a.region, Duration::ZERO).map(drop)));

    // Two regions on one descriptor: a fault is reported against the
    // region passed in, and one outside it is an error naming the address.
    let mut m2 = MmapOptions::new().len(PAGE).map_anon().unwrap();
    // SAFETY: private anonymous, outlives the registration (unregistered
    // below), touched only through atomics.
    let r2 = unsafe { a.uffd.register(m2.as_mut_ptr(), PAGE, PAGE) }.unwrap();
    let reader = spawn_load(m2.as_ptr() as usize);
    match a.uffd.next_fault(&a.region, WAIT) {
        Err(UffdError::FaultOutsideRegion { address }) => assert_eq!(address, r2.base() as u64),
        other => panic!("{other:?}"),
    }
    assert!(a.uffd.copy(&r2, 0, &page_of(2)).unwrap());
    assert_ne!(reader.join().unwrap(), 0);
    a.uffd.unregister(&r2).unwrap();
}

#[test]
fn next_fault_times_out() {
    let g = Guest::new(1);
    let t = Instant::now();
    assert_eq!(
        g.uffd
            .next_fault(&g.region, Duration::from_millis(50))
            .unwrap(),
        None
    );
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(g.uffd.next_fault(&g.region, Duration::ZERO).unwrap(), None);
}

#[test]
fn unregister_wakes_blocked_reader_with_zeros() {
    let g = Guest::new(2);
    let reader = spawn_load(g.addr() + PAGE);
    let fault = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
    assert_eq!(fault.offset, PAGE);
    assert!(g.uffd.copy(&g.region, 0, &page_of(2)).unwrap());
    g.uffd.unregister(&g.region).unwrap();
    assert_eq!(
        reader.join().unwrap(),
        0,
        "woken reader sees a demand-zero page"
    );
    // Present pages keep their contents; new touches are plain faults.
    assert_eq!(
        g.word(0).load(Ordering::SeqCst),
        u64::from_ne_bytes(page_of(2)[..8].try_into().unwrap())
    );
    // A fault still queued (not yet read) when unregistering: the reader
    // is woken, and the message is withdrawn.
    let h = Guest::new(2);
    let reader = spawn_load(h.addr());
    thread::sleep(Duration::from_millis(50));
    h.uffd.unregister(&h.region).unwrap();
    assert_eq!(reader.join().unwrap(), 0);
    assert_eq!(
        h.uffd
            .next_fault(&h.region, Duration::from_millis(10))
            .unwrap(),
        None
    );
    // Once unregistered, the kernel refuses to fill even a missing page.
    match h.uffd.copy(&h.region, PAGE, &page_of(1)) {
        Err(UffdError::Io(e)) => {
            assert_eq!(e.raw_os_error(), Some(Errno::NOENT.raw_os_error()))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn dropping_uffd_wakes_blocked_reader_with_zeros() {
    let Guest { uffd, region, map } = Guest::new(1);
    let reader = spawn_load(map.as_ptr() as usize);
    assert!(uffd.next_fault(&region, WAIT).unwrap().is_some());
    drop(uffd);
    assert_eq!(reader.join().unwrap(), 0);
}

#[test]
fn wake_without_fill_refaults() {
    let g = Guest::new(1);
    let reader = spawn_load(g.addr());
    assert_eq!(
        g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap().offset,
        0
    );
    g.uffd.wake(&g.region, 0, PAGE).unwrap();
    // Still missing: the reader faults again.
    assert_eq!(
        g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap().offset,
        0
    );
    assert!(g.uffd.copy(&g.region, 0, &page_of(8)).unwrap());
    assert_eq!(
        reader.join().unwrap(),
        u64::from_ne_bytes(page_of(8)[..8].try_into().unwrap())
    );
}

#[test]
fn fault_latency() {
    const N: usize = 2000;
    let g = Guest::new(N);
    let addr = g.addr();
    let data = page_of(0x5A);
    thread::scope(|s| {
        let handler = s.spawn(|| {
            for _ in 0..N {
                let f = g.uffd.next_fault(&g.region, WAIT).unwrap().unwrap();
                assert!(g.uffd.copy(&g.region, f.offset, &data).unwrap());
            }
        });
        let mut lat: Vec<Duration> = (0..N)
            .map(|i| {
                // SAFETY: `addr` is an aligned word of a `Guest` mapping that outlives
                // this thread (joined before the guest drops) and is only ever
                // accessed through atomics, as in `Guest::word`.
                let w = unsafe { AtomicU64::from_ptr((addr + i * PAGE) as *mut u64) };
                let t = Instant::now();
                std::hint::black_box(w.load(Ordering::SeqCst));
                t.elapsed()
            })
            .collect();
        handler.join().unwrap();
        lat.sort();
        println!(
            "userfaultfd fault served by handler thread, {N} faults: median {:?}, p99 {:?}, max {:?}",
            lat[N / 2],
            lat[N * 99 / 100],
            lat[N - 1]
        );
    });
}
