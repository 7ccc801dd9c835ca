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

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use linux_raw_sys::general as sys;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::ioctl::{self, opcode, Opcode, Setter, Updater};
use rustix::mm::{Advice, UserfaultfdFlags};

/// `UFFDIO_API`: `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: Opcode =
    opcode::read_write::<sys::uffdio_api>(sys::UFFDIO as u8, sys::_UFFDIO_API as u8);
/// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: Opcode =
    opcode::read_write::<sys::uffdio_register>(sys::UFFDIO as u8, sys::_UFFDIO_REGISTER as u8);
/// `UFFDIO_UNREGISTER`: `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: Opcode =
    opcode::read::<sys::uffdio_range>(sys::UFFDIO as u8, sys::_UFFDIO_UNREGISTER as u8);
/// `UFFDIO_WAKE`: `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: Opcode =
    opcode::read::<sys::uffdio_range>(sys::UFFDIO as u8, sys::_UFFDIO_WAKE as u8);
/// `UFFDIO_COPY`: `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: Opcode =
    opcode::read_write::<sys::uffdio_copy>(sys::UFFDIO as u8, sys::_UFFDIO_COPY as u8);
/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: Opcode =
    opcode::read_write::<sys::uffdio_zeropage>(sys::UFFDIO as u8, sys::_UFFDIO_ZEROPAGE as u8);

/// Size of one `struct uffd_msg`; `read(2)` on the descriptor returns whole messages.
const MSG_LEN: usize = 32;
/// Offsets of `arg.pagefault.flags` and `arg.pagefault.address` in `struct uffd_msg`.
const MSG_FLAGS: usize = 8;
const MSG_ADDRESS: usize = 16;
const _: () = {
    assert!(size_of::<sys::uffd_msg>() == MSG_LEN);
    assert!(std::mem::offset_of!(sys::uffd_msg, arg) == MSG_FLAGS);
    assert!(
        std::mem::offset_of!(sys::uffd_msg__bindgen_ty_1__bindgen_ty_1, address)
            == MSG_ADDRESS - MSG_FLAGS
    );
};

/// How often a fill is retried when the kernel says `EAGAIN` (the address
/// space was changing under it); never happens without the non-cooperative
/// features, which this module does not enable.
const EAGAIN_RETRIES: usize = 16;

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

/// A range registered with a [`Uffd`]: base address, length and page size.
///
/// Plain metadata: it borrows nothing, so it is up to the caller (by the
/// contract of [`Uffd::register`]) to keep the mapping alive. It remembers
/// which [`Uffd`] registered it; using it with another one is
/// [`UffdError::ForeignRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    base: usize,
    len: usize,
    page: usize,
    owner: u64,
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
    fn check(&self, offset: usize, len: usize) -> Result<u64, UffdError> {
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
    /// private and anonymous), and no Rust reference to these bytes is live:
    /// their contents change under the caller.
    pub unsafe fn drop_pages(&self, offset: usize, len: usize) -> Result<(), UffdError> {
        self.check(offset, len)?;
        let start = (self.base + offset) as *mut std::ffi::c_void;
        // SAFETY: the range is inside the region (checked above), which the
        // caller guarantees is a live private anonymous mapping with no Rust
        // references into it; MADV_DONTNEED on such memory only discards pages,
        // which become missing and fault on the next touch.
        unsafe { rustix::mm::madvise(start, len, Advice::LinuxDontNeed) }
            .map_err(|e| UffdError::Io(e.into()))
    }
}

/// A userfaultfd descriptor, non-blocking and close-on-exec.
///
/// `Send` and `Sync`: the ioctls may be issued from several threads at
/// once, and each `read` returns whole messages, so several handlers may
/// share one descriptor (each fault is delivered to one reader).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    /// Process-unique, to tie each [`Region`] to the descriptor that registered it.
    id: u64,
}

/// Source of [`Uffd::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Uffd {
    /// Creates the descriptor (`O_CLOEXEC | O_NONBLOCK`) and does the
    /// `UFFDIO_API` handshake.
    ///
    /// If the kernel refuses a full descriptor with `EPERM` (not root and
    /// `vm.unprivileged_userfaultfd=0`), retries with `UFFD_USER_MODE_ONLY`.
    /// Such a descriptor handles faults from user code only (per
    /// `userfaultfd(2)`; not exercised here, the tests run as root): a
    /// syscall that touches a missing page, say `write(2)` from guest memory,
    /// fails instead of waiting.
    pub fn new() -> Result<Uffd, UffdError> {
        let flags = UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK;
        // SAFETY: creating the descriptor is harmless; it only gains power over
        // memory through `register`, whose contract the caller must meet.
        let fd = match unsafe { rustix::mm::userfaultfd(flags) } {
            Err(Errno::PERM) => {
                let user_only =
                    flags | UserfaultfdFlags::from_bits_retain(sys::UFFD_USER_MODE_ONLY);
                // SAFETY: as above.
                unsafe { rustix::mm::userfaultfd(user_only) }
            }
            other => other,
        }
        .map_err(|e| UffdError::Unavailable(e.into()))?;

        let mut api = sys::uffdio_api {
            api: sys::UFFD_API.into(),
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API is _IOWR on `struct uffdio_api`, which `api` is;
        // the kernel reads and writes only that struct.
        unsafe { ioctl::ioctl(&fd, Updater::<UFFDIO_API, sys::uffdio_api>::new(&mut api)) }
            .map_err(|e| UffdError::Unavailable(e.into()))?;
        let needed = bit(sys::_UFFDIO_REGISTER) | bit(sys::_UFFDIO_UNREGISTER);
        if api.ioctls & needed != needed {
            return Err(UffdError::Unavailable(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks UFFDIO_REGISTER/UNREGISTER",
            )));
        }
        Ok(Uffd {
            fd,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Registers `[base, base + len)` in `MISSING` mode: from now on a touch
    /// of a page that is not present blocks the toucher and queues a
    /// [`Fault`]. Pages already present are unaffected.
    ///
    /// `page` must be a power of two and a multiple of the system page size
    /// (the kernel rejects the others); `base` and `len` must be non-zero
    /// multiples of it.
    ///
    /// # Safety
    ///
    /// Until [`unregister`](Self::unregister) or drop of this `Uffd`:
    ///
    /// * the range lies in a private anonymous mapping that the caller owns
    ///   and keeps mapped;
    /// * the range is accessed only through raw pointers or atomics, never
    ///   through `&`/`&mut` references, since missing pages are filled (and
    ///   [`Region::drop_pages`] empties them) behind the compiler's back, and
    ///   a read the compiler invents would block;
    /// * some thread serves the faults, or every toucher blocks forever.
    pub unsafe fn register(
        &self,
        base: *mut u8,
        len: usize,
        page: usize,
    ) -> Result<Region, UffdError> {
        let addr = base as usize;
        let ok = page.is_power_of_two()
            && addr % page == 0
            && len % page == 0
            && len != 0
            && addr.checked_add(len).is_some();
        if !ok {
            return Err(UffdError::BadRegion {
                base: addr,
                len,
                page,
            });
        }
        let mut reg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: addr as u64,
                len: len as u64,
            },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING.into(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER is _IOWR on `struct uffdio_register`, which
        // `reg` is. The caller guarantees the range is its own private
        // anonymous memory, handled as the contract above says.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Updater::<UFFDIO_REGISTER, sys::uffdio_register>::new(&mut reg),
            )
        }
        .map_err(|e| UffdError::Register(e.into()))?;
        let region = Region {
            base: addr,
            len,
            page,
            owner: self.id,
        };
        let needed = bit(sys::_UFFDIO_COPY) | bit(sys::_UFFDIO_ZEROPAGE) | bit(sys::_UFFDIO_WAKE);
        if reg.ioctls & needed != needed {
            // Best effort: the range is unusable either way.
            let _ = self.unregister(&region);
            return Err(UffdError::Register(io::Error::new(
                io::ErrorKind::Unsupported,
                "range does not support UFFDIO_COPY/ZEROPAGE/WAKE",
            )));
        }
        Ok(region)
    }

    /// Installs `data` (exactly one page) as the missing page at `offset`
    /// and wakes the threads waiting on it.
    ///
    /// Returns `Ok(false)` if the page was already present (`EEXIST`): a
    /// fault and a push raced, and the present page is left unchanged.
    pub fn copy(&self, r: &Region, offset: usize, data: &[u8]) -> Result<bool, UffdError> {
        let dst = self.own(r)?.check(offset, r.page)?;
        if data.len() != r.page {
            return Err(UffdError::PageLength {
                got: data.len(),
                page: r.page,
            });
        }
        for _ in 0..EAGAIN_RETRIES {
            let mut copy = sys::uffdio_copy {
                dst,
                src: data.as_ptr() as u64,
                len: r.page as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY is _IOWR on `struct uffdio_copy`, which `copy`
            // is. The kernel reads `len` bytes from `src`, which is `data`, one
            // page long, and writes them to `dst`, a checked page of a
            // registered range, only if that page is missing.
            let res = unsafe {
                ioctl::ioctl(
                    &self.fd,
                    Updater::<UFFDIO_COPY, sys::uffdio_copy>::new(&mut copy),
                )
            };
            match res {
                Ok(()) if copy.copy == r.page as i64 => return Ok(true),
                Ok(()) => return Err(short_fill(copy.copy)),
                Err(Errno::EXIST) => return Ok(false),
                Err(Errno::AGAIN) if copy.copy <= 0 => continue,
                Err(e) => return Err(UffdError::Io(e.into())),
            }
        }
        Err(UffdError::Io(Errno::AGAIN.into()))
    }

    /// Installs a zero page as the missing page at `offset`
    /// (`UFFDIO_ZEROPAGE`) and wakes the threads waiting on it.
    ///
    /// Returns `Ok(false)` if the page was already present (`EEXIST`).
    pub fn zero(&self, r: &Region, offset: usize) -> Result<bool, UffdError> {
        let start = self.own(r)?.check(offset, r.page)?;
        for _ in 0..EAGAIN_RETRIES {
            let mut zp = sys::uffdio_zeropage {
                range: sys::uffdio_range {
                    start,
                    len: r.page as u64,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE is _IOWR on `struct uffdio_zeropage`, which
            // `zp` is; it maps the zero page at a checked page of a registered
            // range, only if that page is missing.
            let res = unsafe {
                ioctl::ioctl(
                    &self.fd,
                    Updater::<UFFDIO_ZEROPAGE, sys::uffdio_zeropage>::new(&mut zp),
                )
            };
            match res {
                Ok(()) if zp.zeropage == r.page as i64 => return Ok(true),
                Ok(()) => return Err(short_fill(zp.zeropage)),
                Err(Errno::EXIST) => return Ok(false),
                Err(Errno::AGAIN) if zp.zeropage <= 0 => continue,
                Err(e) => return Err(UffdError::Io(e.into())),
            }
        }
        Err(UffdError::Io(Errno::AGAIN.into()))
    }

    /// Waits up to `timeout` for the next page fault in any range registered
    /// on this descriptor, and returns it relative to `r`.
    ///
    /// `Ok(None)` on timeout, or when another reader took the message first
    /// (`EAGAIN` after `poll`). Non-page-fault events are skipped (none are
    /// enabled). A fault outside `r` is [`UffdError::FaultOutsideRegion`].
    pub fn next_fault(&self, r: &Region, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        self.own(r)?;
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // `None`: wait forever (the timeout does not fit in a timespec).
            let remaining = match deadline {
                Some(d) => Timespec::try_from(d.saturating_duration_since(Instant::now())).ok(),
                None => None,
            };
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, remaining.as_ref()) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(UffdError::Io(e.into())),
            }
            let revents = fds[0].revents();
            if revents.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL) {
                return Err(UffdError::Io(io::Error::other(format!(
                    "poll on userfaultfd: {revents:?}"
                ))));
            }
            let mut msg = [0u8; MSG_LEN];
            let n = match rustix::io::read(self.fd.as_fd(), &mut msg) {
                Ok(n) => n,
                Err(Errno::AGAIN) => return Ok(None),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(UffdError::Io(e.into())),
            };
            if n != MSG_LEN {
                return Err(UffdError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("short userfaultfd message: {n} bytes"),
                )));
            }
            if u32::from(msg[0]) != sys::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = u64::from_ne_bytes(word(&msg, MSG_FLAGS));
            let address = u64::from_ne_bytes(word(&msg, MSG_ADDRESS));
            let offset = usize::try_from(address)
                .ok()
                .and_then(|a| a.checked_sub(r.base))
                .filter(|&o| o < r.len)
                .ok_or(UffdError::FaultOutsideRegion { address })?;
            return Ok(Some(Fault {
                offset: offset - offset % r.page,
                write: flags & u64::from(sys::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
            }));
        }
    }

    /// Unregisters the region. Threads blocked on its missing pages are woken
    /// and retry as ordinary faults, so they read zeros (demand-zero anonymous
    /// memory); no `SIGBUS`. Pages already present keep their contents.
    pub fn unregister(&self, r: &Region) -> Result<(), UffdError> {
        self.own(r)?;
        let range = sys::uffdio_range {
            start: r.base as u64,
            len: r.len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER is _IOR on `struct uffdio_range`, which
        // `range` is; the kernel only reads it. Unregistering memory is
        // harmless to it.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Setter::<UFFDIO_UNREGISTER, sys::uffdio_range>::new(range),
            )
        }
        .map_err(|e| UffdError::Io(e.into()))
    }

    /// Wakes the threads waiting on `[offset, offset + len)` without filling
    /// anything (`UFFDIO_WAKE`): they retry the access, and fault again if
    /// the page is still missing.
    pub fn wake(&self, r: &Region, offset: usize, len: usize) -> Result<(), UffdError> {
        let start = self.own(r)?.check(offset, len)?;
        let range = sys::uffdio_range {
            start,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE is _IOR on `struct uffdio_range`, which `range`
        // is; the kernel only reads it and changes no memory.
        unsafe {
            ioctl::ioctl(
                &self.fd,
                Setter::<UFFDIO_WAKE, sys::uffdio_range>::new(range),
            )
        }
        .map_err(|e| UffdError::Io(e.into()))
    }
}

impl Uffd {
    /// `r`, if this descriptor registered it.
    fn own<'r>(&self, r: &'r Region) -> Result<&'r Region, UffdError> {
        if r.owner == self.id {
            Ok(r)
        } else {
            Err(UffdError::ForeignRegion {
                base: r.base,
                len: r.len,
            })
        }
    }
}

/// The bit for ioctl number `nr` in `uffdio_api.ioctls` / `uffdio_register.ioctls`.
fn bit(nr: u32) -> u64 {
    1u64 << nr
}

/// Eight bytes of a message at `at`.
fn word(msg: &[u8; MSG_LEN], at: usize) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&msg[at..at + 8]);
    w
}

/// A fill that reported success but a byte count other than one page.
fn short_fill(done: i64) -> UffdError {
    UffdError::Io(io::Error::other(format!(
        "userfaultfd filled {done} bytes of a page"
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use memmap2::{MmapMut, MmapOptions};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::thread;

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
            // SAFETY: see `Guest::word`.
            unsafe { AtomicU64::from_ptr(addr as *mut u64) }.load(Ordering::SeqCst)
        })
    }

    fn page_of(byte: u8) -> Vec<u8> {
        (0..PAGE).map(|i| byte ^ (i as u8)).collect()
    }

    #[test]
    fn opcodes_match_kernel() {
        assert_eq!(UFFDIO_API as u64, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER as u64, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER as u64, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE as u64, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY as u64, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE as u64, 0xc020_aa04);
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
            // SAFETY: see `Guest::word`.
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
            // SAFETY: see `Guest::word`.
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
        assert_ne!(g.word(PAGE).load(Ordering::SeqCst), 0); // present: no fault
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
            // SAFETY: out of range, so nothing is touched.
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
        // SAFETY: misaligned, so nothing is registered.
        let bad = unsafe { g.uffd.register(m.as_mut_ptr().add(8), PAGE, PAGE) };
        assert!(matches!(bad, Err(UffdError::BadRegion { .. })));
        // SAFETY: as above (page size not a power of two).
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
                    // SAFETY: see `Guest::word`.
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
}
