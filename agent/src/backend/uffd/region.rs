//! A range of guest memory registered with a [`Uffd`]: its bounds and
//! page size, the check every fill and wake makes on an offset, and
//! [`Region::drop_pages`], which makes pages missing again.

use rustix::mm::Advice;

#[cfg(doc)]
use super::Uffd;
use super::UffdError;

/// A range registered with a [`Uffd`]: base address, length and page size.
///
/// Plain metadata: it borrows nothing, so it is up to the caller (by the
/// contract of [`Uffd::register`]) to keep the mapping alive. It remembers
/// which [`Uffd`] registered it; using it with another one is
/// [`UffdError::ForeignRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub(super) base: usize,
    pub(super) len: usize,
    pub(super) page: usize,
    /// The [`Uffd::id`] of the descriptor that registered it.
    pub(super) owner: u64,
}

impl Region {
    /// Base address.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Length in bytes.
    pub fn size(&self) -> usize {
        self.len
    }

    /// Page size.
    pub fn page_size(&self) -> usize {
        self.page
    }

    /// Checks that `[offset, offset + len)` is a non-empty page-aligned range
    /// inside the region, and returns its absolute address.
    pub(super) fn check(&self, offset: usize, len: usize) -> Result<u64, UffdError> {
        let aligned = offset % self.page == 0 && len % self.page == 0 && len != 0;
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !(aligned && inside) {
            return Err(UffdError::OutOfRange { offset, len });
        }
        Ok((self.base + offset) as u64)
    }

    /// Discards the pages in `[offset, offset + len)` (`MADV_DONTNEED`) so
    /// that they are missing again: the next touch faults to the handler.
    ///
    /// For a page staged during pre-copy and dirtied again at the source
    /// before the post-copy switch. Dropping a page that is already missing
    /// is a no-op.
    ///
    /// # Safety
    ///
    /// The contract of [`Uffd::register`] still holds (the mapping is alive,
    /// private anonymous or a shared memfd), and no Rust reference to these bytes is live:
    /// their contents change under the caller.
    pub unsafe fn drop_pages(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len)?;
        let start = (self.base + offset) as *mut std::ffi::c_void;
        // SAFETY: the range is inside the region (checked above), which the
        // caller guarantees is a live private anonymous or shared memfd
        // mapping with no Rust references into it; MADV_REMOVE on shared
        // memory frees the pages from the file (MADV_DONTNEED would only
        // unmap them, and they would not fault), which become missing and
        // fault on the next touch.
        match unsafe { rustix::mm::madvise(start, len, Advice::LinuxRemove) } {
            // Not shared: private anonymous memory.
            // SAFETY: as above; MADV_DONTNEED on private anonymous memory
            // only discards pages, which become missing.
            Err(rustix::io::Errno::INVAL) => unsafe {
                rustix::mm::madvise(start, len, Advice::LinuxDontNeed)
            },
            other => other,
        }
        .map_err(|e| UffdError::Io(e.into()))
    }
}
