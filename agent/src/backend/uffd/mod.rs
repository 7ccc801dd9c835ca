//! Demand paging of guest memory with Linux `userfaultfd(2)`.
//!
//! This module owns the destination side of post-copy: a [`Uffd`] file
//! descriptor, the [`Region`]s of guest memory registered with it in
//! `MISSING` mode, and the operations a fault handler needs: wait for the
//! next [`Fault`], fill the page ([`Uffd::copy`], [`Uffd::zero`]), wake
//! waiters ([`Uffd::wake`]), and make staged pages missing again
//! ([`Region::drop_pages`]) when the source dirtied them after they were
//! sent in pre-copy.
//!
//! A guest thread that touches a missing page of a registered region is
//! put to sleep by the kernel, and a message is queued on the descriptor.
//! The handler reads it with [`Uffd::next_fault`], fetches the page from
//! the source and installs it atomically with [`Uffd::copy`], which wakes
//! the guest thread. A page that arrives by push before anyone touched it
//! is installed the same way; if a fault and a push race, the loser gets
//! `Ok(false)` (`EEXIST`), which is not an error.
//!
//! # Why not the `userfaultfd` crate
//!
//! Its `-sys` crate generates bindings with bindgen at build time, which
//! needs libclang. The kernel ABI is small and stable, so this module
//! builds it from what the workspace already has: `rustix` for the
//! syscall, `ioctl`, `poll`, `read` and `madvise`, and `linux-raw-sys` for
//! the structure layouts and constants. No `libc`.
//!
//! # Safety argument
//!
//! All `unsafe` in this module is of three kinds:
//!
//! * `ioctl` calls. Each passes a value of exactly the structure type the
//!   opcode encodes (the opcodes are built from `size_of` of that type and
//!   checked against the kernel's values in a test), and the kernel reads
//!   or writes only that structure. `UFFDIO_COPY` also reads one page from
//!   a `&[u8]` whose length is checked to be one page.
//! * Writes into guest memory by the kernel (`UFFDIO_COPY`,
//!   `UFFDIO_ZEROPAGE`). These only ever fill pages that are *missing*: the
//!   kernel refuses with `EEXIST` to touch a present page, and with `ENOENT`
//!   any address not in a userfaultfd-registered range. It does accept a
//!   range registered on *another* userfaultfd of the process, so each
//!   [`Region`] remembers its [`Uffd`], and every offset is checked against
//!   its region before the call. So the safe methods cannot write to memory that Rust
//!   code might hold as initialised, provided the contract of
//!   [`Uffd::register`] holds: the range is a private anonymous mapping
//!   that outlives the registration and is accessed through raw pointers
//!   or atomics, never through `&`/`&mut` references, while pages in it
//!   can be missing.
//! * `madvise(MADV_DONTNEED)` in [`Region::drop_pages`], which discards
//!   page contents and is therefore `unsafe` with the same contract.
//!
//! Reading fault messages needs no `unsafe`: they are parsed from bytes at
//! the offsets fixed by the kernel ABI, checked at compile time against
//! `linux_raw_sys::general::uffd_msg`.
//!
//! # Lifetimes
//!
//! Dropping a [`Uffd`] closes the descriptor: the kernel unregisters every
//! range and wakes every blocked thread, whose access is then retried as an
//! ordinary fault, so missing pages of a private anonymous mapping read as
//! zeros. [`Uffd::unregister`] does the same for one range. Neither leaves
//! a thread blocked or raises `SIGBUS`; both tests below prove it.
//!
//! # Layout
//!
//! - `abi`: the kernel ABI this module speaks — ioctl opcodes and the
//!   layout of a fault message, checked against `linux-raw-sys`.
//! - `descriptor`: [`Uffd`] — creating it, registering ranges, filling
//!   and waking pages. `unsafe`: the syscall and the ioctls.
//! - `region`: [`Region`] — a registered range, offset checks, and
//!   [`Region::drop_pages`]. `unsafe`: `madvise`.
//! - `fault`: [`Uffd::next_fault`] — waiting for and parsing a fault
//!   message; no `unsafe`.
//!
//! Only `descriptor`, `region` and the tests may use `unsafe` (each is
//! `#[allow(unsafe_code)]` under the crate's `deny`).

mod abi;
#[allow(unsafe_code)] // The syscall and its ioctls: see "Safety argument".
mod descriptor;
mod fault;
#[allow(unsafe_code)] // `madvise(MADV_DONTNEED)`: see "Safety argument".
mod region;
#[cfg(test)]
#[allow(unsafe_code)] // Test guests touch registered memory through raw atomics.
mod tests;

use std::io;

pub use self::descriptor::Uffd;
pub use self::region::Region;

/// Whether this process may use userfaultfd (tries to open one).
pub fn available() -> bool {
    Uffd::new().is_ok()
}

/// Userfaultfd failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// The syscall or the `UFFDIO_API` handshake failed.
    #[error("userfaultfd unavailable (needs root or vm.unprivileged_userfaultfd=1): {0}")]
    Unavailable(io::Error),
    /// The kernel refused to register the range, or registered it without
    /// the ioctls this module needs.
    #[error("cannot register range with userfaultfd: {0}")]
    Register(io::Error),
    /// A later operation on the descriptor failed.
    #[error("userfaultfd: {0}")]
    Io(io::Error),
    /// `[offset, offset + len)` is not page-aligned, empty, or not inside the region.
    #[error("range {offset:#x}+{len:#x} is not a page-aligned range inside the region")]
    OutOfRange {
        /// Offset from the region base.
        offset: usize,
        /// Length in bytes.
        len: usize,
    },
    /// `register` was given a page size that is not a power of two, or a
    /// base or length that is not a non-zero multiple of it.
    #[error("cannot register {len:#x} bytes at {base:#x} with page size {page:#x}")]
    BadRegion {
        /// Base address.
        base: usize,
        /// Length in bytes.
        len: usize,
        /// Page size.
        page: usize,
    },
    /// The data to install is not exactly one page.
    #[error("page data is {got} bytes, expected {page}")]
    PageLength {
        /// Length given.
        got: usize,
        /// Page size of the region.
        page: usize,
    },
    /// The region was registered on another [`Uffd`]. (The kernel would
    /// accept the fill: it only checks that the range is registered with
    /// some userfaultfd of this process.)
    #[error("region {base:#x}+{len:#x} belongs to another userfaultfd")]
    ForeignRegion {
        /// Base address.
        base: usize,
        /// Length in bytes.
        len: usize,
    },
    /// A fault arrived for an address outside the region passed to
    /// [`Uffd::next_fault`] (another region registered on the same
    /// descriptor). The faulting thread stays blocked until that page is
    /// filled or woken.
    #[error("page fault at {address:#x} is outside the region")]
    FaultOutsideRegion {
        /// The faulting address as the kernel reported it.
        address: u64,
    },
}

/// A page fault read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Offset of the faulting address from the region base, rounded down to the region's page.
    pub offset: usize,
    /// The access was a write (an atomic read-modify-write counts as one).
    pub write: bool,
}
