//! Reading page faults from a [`Uffd`]: wait with `poll`, read whole
//! messages, skip events other than page faults, and report each fault
//! relative to the region it hit. No `unsafe`: a message is parsed from
//! bytes at the offsets `abi` fixes.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use linux_raw_sys::general as sys;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::io::Errno;

use super::abi::{word, MSG_ADDRESS, MSG_FLAGS, MSG_LEN};
use super::{Fault, Region, Uffd, UffdError};

impl Uffd {
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
}
