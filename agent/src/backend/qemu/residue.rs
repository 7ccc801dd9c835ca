//! QEMU processes a restarted agent must end rather than drive: a guest
//! launched for a migration that never committed, or for a VM whose
//! creation never finished, and a lost VM an operator deletes. Each is
//! held by a pidfd before anything is decided, and only a process that is
//! provably the agent's is signalled: the one the kernel says serves a
//! QMP socket in the agent's private runtime directory (as the agent's own
//! user, running an allowed QEMU binary), or the one with a recorded pid
//! *and* start time ([`ProcessIdentity`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::identity::ProcessIdentity;

/// A QEMU process held by a pidfd, to be ended.
#[derive(Debug)]
pub struct Residue {
    pidfd: OwnedFd,
    /// The process.
    pub identity: ProcessIdentity,
}

impl Residue {
    /// The process listening on `sock`, if the kernel names one that runs
    /// as this process's user, runs one of the `allowed` QEMU binaries and
    /// names `dir` on its command line.
    pub async fn behind_socket(sock: &Path, dir: &Path, allowed: &[PathBuf]) -> Option<Residue> {
        let stream = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(sock),
        )
        .await
        .ok()?
        .ok()?;
        let cred = stream.peer_cred().ok()?;
        if cred.uid() != rustix::process::geteuid().as_raw() {
            return None;
        }
        let pid = u32::try_from(cred.pid()?).ok()?;
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)?;
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
        // Read once the pidfd holds it: the pid cannot change hands now.
        let identity = ProcessIdentity::read(pid).ok()?;
        let allowed = allowed
            .iter()
            .any(|b| b.canonicalize().unwrap_or_else(|_| b.clone()) == identity.exe);
        (allowed && identity.mentions(dir)).then_some(Residue { pidfd, identity })
    }

    /// The process `recorded` names, if it still runs as recorded (same
    /// pid, start time, executable and command line).
    pub fn still_running(recorded: &ProcessIdentity) -> Option<Residue> {
        let raw = i32::try_from(recorded.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)?;
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
        let identity = ProcessIdentity::read(recorded.pid).ok()?;
        recorded.check(&identity).ok()?;
        let r = Residue { pidfd, identity };
        (!r.exited()).then_some(r)
    }

    /// Whether it has exited (its pidfd polls readable).
    fn exited(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
    }

    /// Kills it (SIGKILL through the pidfd) and waits up to 5 s for it to
    /// exit; true once it has.
    pub async fn kill(self) -> bool {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        let end = Instant::now() + Duration::from_secs(5);
        while !self.exited() {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}
