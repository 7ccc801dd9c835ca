//! Guest memory in a shared mapping of a memfd, shared between the
//! guest's vCPU (a thread of the agent, or a helper process that maps the
//! same memfd: see `sim::helper`) and the migration engine. The memfd,
//! not the agent's address space, holds the memory, so it outlives an
//! agent that ends while a helper process holds it.
//!
//! This module and [`super::uffd`] hold the agent's only `unsafe` code.
//! The guest writes its
//! memory while the engine reads it (that is what live migration is), so
//! every access goes through `AtomicU64` words: a concurrent read may see a
//! page half old and half new — exactly as a real VMM's does — but never
//! undefined behaviour. The dirty log makes sure a torn read is sent again.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::MmapMut;

use super::uffd::{Region, Uffd, UffdError};

/// Word size.
const W: usize = 8;

/// A shared mapping of (part of) a memfd, accessed as atomic 64-bit
/// words.
pub struct GuestMemory {
    map: MmapMut,
    /// The memfd, and where in it the mapping starts.
    file: Arc<File>,
    offset: u64,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestMemory({} bytes)", self.map.len())
    }
}

impl GuestMemory {
    /// Maps `bytes` (a multiple of 8) of zeroed memory, in a memfd of
    /// its own.
    pub fn new(bytes: usize) -> std::io::Result<Self> {
        let file = Arc::new(memfd("convoy-guest", bytes as u64)?);
        GuestMemory::map(&file, 0, bytes)
    }

    /// Maps `bytes` (a non-zero multiple of 8) of `file` (a memfd, see
    /// [`memfd`]) from byte `offset` (a multiple of the page size), shared:
    /// what this mapping writes, every other mapping of the file sees.
    pub fn map(file: &Arc<File>, offset: u64, bytes: usize) -> std::io::Result<Self> {
        if bytes == 0 || bytes % W != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "guest memory size must be a non-zero multiple of 8",
            ));
        }
        let end = offset.checked_add(bytes as u64);
        if end.is_none_or(|end| end > file.metadata().map_or(0, |m| m.len())) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the mapping would reach past the end of its memfd",
            ));
        }
        // SAFETY: the file is a memfd of at least `offset + bytes` bytes
        // (checked above; memfds made here are never shrunk: `memfd` seals
        // them against it), so no access through the mapping can fault
        // with SIGBUS. Another process (a sim VM's vCPU helper) may write
        // it concurrently: all access goes through `AtomicU64` words
        // (`words`), never through the `MmapMut`'s byte slices.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(bytes)
                .map_mut(&**file)?
        };
        // Guest memory never lands in a core dump of the agent.
        map.advise(memmap2::Advice::DontDump)?;
        // No MADV_HUGEPAGE: measured on this machine (nested virtualisation)
        // touching 1 GiB took 3.3 s with transparent huge pages and 0.8 s
        // without.
        Ok(GuestMemory {
            map,
            file: file.clone(),
            offset,
        })
    }

    /// The memfd this maps.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping as atomic words.
    pub fn words(&self) -> &[AtomicU64] {
        let ptr = self.map.as_ptr();
        // SAFETY: the mapping is page-aligned (so 8-aligned), its length is a
        // multiple of 8 (checked in `new`), it lives as long as `self`, and
        // after creation it is only ever accessed through this slice of
        // atomics (never through `MmapMut`'s byte slices), so shared
        // concurrent access is data-race free. `AtomicU64` has the size and
        // alignment of `u64`, and any bit pattern is valid.
        unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), self.map.len() / W) }
    }

    /// Copies `buf.len()` bytes at byte offset `off` into `buf`. Both must
    /// be multiples of 8; out-of-range reads fill the rest with zeros.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        let words = self.words();
        let first = off / W;
        for (i, chunk) in buf.chunks_exact_mut(W).enumerate() {
            let v = words
                .get(first + i)
                .map_or(0, |w| w.load(Ordering::Relaxed));
            chunk.copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// Copies `data` to byte offset `off` (multiples of 8); out-of-range
    /// bytes are dropped.
    pub fn write(&self, off: usize, data: &[u8]) {
        let words = self.words();
        let first = off / W;
        for (i, chunk) in data.chunks_exact(W).enumerate() {
            if let Some(w) = words.get(first + i) {
                let mut b = [0u8; W];
                b.copy_from_slice(chunk);
                w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
            }
        }
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&self, off: usize, len: usize) {
        let words = self.words();
        for w in words.iter().skip(off / W).take(len / W) {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Stores one word at word index `i`.
    pub fn store_word(&self, i: usize, v: u64) {
        if let Some(w) = self.words().get(i) {
            w.store(v, Ordering::Relaxed);
        }
    }

    /// Loads one word at word index `i`.
    pub fn load_word(&self, i: usize) -> u64 {
        self.words().get(i).map_or(0, |w| w.load(Ordering::Relaxed))
    }

    /// Registers the whole mapping with `uffd` for demand paging (post-copy
    /// at a destination): from now on a touch of a missing page blocks the
    /// toucher until the page is filled through `uffd`. Pages already
    /// written stay present.
    pub fn register(&self, uffd: &Uffd, page: usize) -> Result<Region, UffdError> {
        // SAFETY: the mapping is a shared mapping of a memfd (`map`), stays
        // mapped as long as `self`, and is only ever accessed through the
        // atomics of `words` (never through references to its bytes). The
        // caller serves faults on `uffd` while pages can be missing (the
        // sim's fault handler thread), and closes `uffd` (which wakes any
        // toucher) before it stops serving.
        unsafe { uffd.register(self.map.as_ptr().cast_mut(), self.map.len(), page) }
    }

    /// Makes `[off, off + len)` of a region of this mapping missing again.
    pub fn drop_range(&self, region: &Region, off: usize, len: usize) -> Result<(), UffdError> {
        if region.base() != self.map.as_ptr() as usize || region.size() != self.map.len() {
            return Err(UffdError::OutOfRange { offset: off, len });
        }
        // SAFETY: `region` is this mapping, registered by `register` above,
        // whose contract holds; the range is bounds-checked by
        // `drop_pages`, and no reference to these bytes exists (all access
        // is atomic), so their contents may change under us.
        unsafe { region.drop_pages(off, len) }
    }

    /// Wipes the guest's memory: its pages are punched out of the memfd
    /// (`FALLOC_FL_PUNCH_HOLE`), so their contents are gone for every
    /// process that maps it and any later read sees zeros. Used on a copy
    /// that has been handed over or discarded.
    pub fn wipe(&self) {
        let punched = rustix::fs::fallocate(
            &*self.file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            self.offset,
            self.map.len() as u64,
        );
        if punched.is_err() {
            for w in self.words() {
                w.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A memfd of `bytes` zeroes named `name` (seen in `/proc/PID/fd` as
/// `/memfd:NAME`), sealed so that it can neither shrink (a mapping of it
/// would fault) nor grow.
pub fn memfd(name: &str, bytes: u64) -> std::io::Result<File> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, bytes)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    // Test code: byte patterns from small indexes.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    use super::*;

    #[test]
    fn guest_memory_is_left_out_of_core_dumps() {
        let m = GuestMemory::new(4096 * 4).unwrap();
        let start = format!("{:x}-", m.map.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let flags = smaps
            .split('\n')
            .skip_while(|l| !l.starts_with(&start))
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("the mapping is in smaps");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn two_mappings_of_one_memfd_see_each_other_and_a_wipe() {
        let file = Arc::new(memfd("t", 4096 * 3).unwrap());
        let a = GuestMemory::map(&file, 4096, 8192).unwrap();
        let b = GuestMemory::map(&file, 4096, 8192).unwrap();
        a.store_word(5, 42);
        assert_eq!(b.load_word(5), 42);
        b.wipe();
        assert_eq!(a.load_word(5), 0);
        assert!(GuestMemory::map(&file, 8192, 8192).is_err(), "past the end");
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let m = GuestMemory::new(4096 * 2).unwrap();
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        m.write(4096, &data);
        let mut out = vec![0u8; 4096];
        m.read(4096, &mut out);
        assert_eq!(out, data);
        m.read(0, &mut out);
        assert!(out.iter().all(|b| *b == 0));
        // Past the end: zeros, no panic.
        m.read(8192, &mut out);
        assert!(out.iter().all(|b| *b == 0));
        m.wipe();
        m.read(4096, &mut out);
        assert!(out.iter().all(|b| *b == 0));
        assert!(GuestMemory::new(7).is_err());
    }
}
