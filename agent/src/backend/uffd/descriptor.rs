//! The userfaultfd descriptor: creating it (with the `UFFDIO_API`
//! handshake), registering ranges, filling missing pages
//! (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), waking waiters and unregistering.
//! Every ioctl of this module is here, each with its `// SAFETY:`
//! argument (see "Safety argument" in the parent module).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use linux_raw_sys::general as sys;
use rustix::io::Errno;
use rustix::ioctl::{self, Setter, Updater};
use rustix::mm::UserfaultfdFlags;

use super::abi::{
    bit, UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
#[cfg(doc)]
use super::Fault;
use super::{Region, UffdError};

/// How often a fill is retried when the kernel says `EAGAIN` (the address
/// space was changing under it); never happens without the non-cooperative
/// features, which this module does not enable.
const EAGAIN_RETRIES: usize = 16;

/// A userfaultfd descriptor, non-blocking and close-on-exec.
///
/// `Send` and `Sync`: the ioctls may be issued from several threads at
/// once, and each `read` returns whole messages, so several handlers may
/// share one descriptor (each fault is delivered to one reader).
#[derive(Debug)]
pub struct Uffd {
    pub(super) fd: OwnedFd,
    /// Process-unique, to tie each [`Region`] to the descriptor that registered it.
    pub(super) id: u64,
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
                // SAFETY: as the first attempt: a new descriptor has no power
                // over memory until `register`, whose contract the caller meets.
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
    /// * the range lies in a private anonymous mapping, or a shared mapping
    ///   of a memfd (shmem), that the caller owns and keeps mapped;
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
    pub(super) fn own<'r>(&self, r: &'r Region) -> Result<&'r Region, UffdError> {
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

/// A fill that reported success but a byte count other than one page.
fn short_fill(done: i64) -> UffdError {
    UffdError::Io(io::Error::other(format!(
        "userfaultfd filled {done} bytes of a page"
    )))
}
