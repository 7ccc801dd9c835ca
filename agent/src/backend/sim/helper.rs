//! A sim VM's vCPU in a helper process of its own, so that the VM outlives
//! its agent: the agent binary re-executed with [`HELPER_ARG`], the VM's
//! memfd (control words and guest memory, see `control`) as its standard
//! input, its disk files' paths as arguments. It maps the memfd, says it
//! is ready (`ready` = its pid), waits until `owner` names it, then runs
//! the same loop as the agent's thread (`workload::run`) until `stop`.
//!
//! - **Moving the vCPU** ([`SimVm::move_vcpu`]): the helper is spawned
//!   while the thread still runs the VM; once it is ready, `owner` goes
//!   to `HANDOFF` (the thread ends after its tick in progress), then to
//!   the helper's pid. The guest misses at most a tick or two; a helper
//!   that does not become ready is killed and the thread keeps the VM.
//! - **Its own process group**, no parent-death signal: a Ctrl-C to the
//!   agent's terminal and the agent's own end leave it running; its
//!   standard output and error go nowhere (a pipe the agent held must not
//!   be kept open by it).
//! - **Stopping it** ([`SimVm::destroy`]): `stop`, then a bounded wait on
//!   its pidfd, then `SIGKILL` through the pidfd.
//! - **Finding it again** ([`SimVm::reattach`]): the recorded pid held by
//!   a pidfd, checked to be the recorded process (boot, start time,
//!   command line) and not a zombie; its memfd reopened through
//!   `/proc/PID/fd/0` (same user) and its header checked against the
//!   record.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_protocol::disk::DiskGeometry;
use serde::{Deserialize, Serialize};

use super::control::{Control, HANDOFF};
use super::disk::SimDisk;
use super::{Shared, SimVm};
use crate::backend::qemu::identity::ProcessIdentity;
use crate::backend::{BackendError, VcpuError};

/// The hidden first argument that makes the agent binary a vCPU helper.
pub const HELPER_ARG: &str = "__sim-vcpu";

/// How long a helper may take to map the memfd.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// How long a helper told to stop may take before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(2);

/// Where sim VMs' vCPUs run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimVcpuHost {
    /// A thread of the agent: the VM ends with the agent process (the
    /// in-process lab, tests, benchmarks).
    #[default]
    Thread,
    /// A helper process per VM: this executable (the agent binary),
    /// re-executed with [`HELPER_ARG`].
    Process(PathBuf),
}

/// What a restarted agent needs to find a sim VM's helper again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRecord {
    /// The helper process.
    pub process: ProcessIdentity,
    /// Guest memory, bytes.
    pub bytes: u64,
    /// Its disks, in leaf order, and their files.
    pub disks: Vec<(DiskGeometry, PathBuf)>,
}

/// The helper process running a VM's vCPU.
pub(super) struct Helper {
    /// Ours to reap, when this agent spawned it.
    child: Option<Child>,
    pidfd: OwnedFd,
    identity: ProcessIdentity,
}

/// Whether the process behind `pidfd` exits within `within`.
fn exits_within(pidfd: &OwnedFd, within: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let t = Timespec {
        tv_sec: i64::try_from(within.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(within.subsec_nanos()),
    };
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&t)), Ok(n) if n > 0)
}

fn pidfd_of(pid: u32) -> std::io::Result<OwnedFd> {
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        raw,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Whether `/proc/PID/stat` says the process is a zombie (exited, not yet
/// reaped).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(true)
}

impl SimVm {
    /// Whether a helper process runs the vCPU.
    pub(super) fn has_helper(&self) -> bool {
        self.helper.lock().is_ok_and(|h| h.is_some())
    }

    /// Whether the vCPU still lives (a thread always does).
    pub(super) fn vcpu_alive(&self) -> bool {
        match self.helper.lock() {
            Ok(h) => h
                .as_ref()
                .is_none_or(|h| !exits_within(&h.pidfd, Duration::ZERO)),
            Err(_) => true,
        }
    }

    /// Moves the vCPU to where `host` says: for [`SimVcpuHost::Process`],
    /// from the agent's thread into a new helper process (see the module
    /// docs). Not during post-copy demand paging: the helper's touches of
    /// a missing page would not fault. Blocking (an exec, milliseconds).
    pub fn move_vcpu(&self, host: &SimVcpuHost) -> Result<(), BackendError> {
        let SimVcpuHost::Process(exe) = host else {
            return Ok(());
        };
        if self.has_helper() || self.paging().is_some_and(|p| p.is_active()) {
            return Ok(());
        }
        let ctl = &self.shared.ctl;
        let stdin = ctl.file().try_clone().map_err(VcpuError::Spawn)?;
        let mut child = Command::new(exe)
            .arg(HELPER_ARG)
            .args(self.shared.disks.iter().map(|d| d.path()))
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(VcpuError::Spawn)?;
        let pid = child.id();
        let ready = (|| {
            let pidfd = pidfd_of(pid).map_err(|_| VcpuError::NotReady(pid))?;
            let t = Instant::now(); // a deadline on a local process, not protocol time
            while ctl.ready().load(Ordering::SeqCst) != u64::from(pid) {
                if t.elapsed() > READY_WITHIN || exits_within(&pidfd, Duration::from_millis(1)) {
                    return Err(VcpuError::NotReady(pid));
                }
            }
            // Read while unreaped: the pid is still this child's.
            let identity = ProcessIdentity::read(pid).map_err(|_| VcpuError::NotReady(pid))?;
            Ok((pidfd, identity))
        })();
        let (pidfd, identity) = match ready {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        // The thread ends after its tick in progress; then the helper runs.
        ctl.owner().store(HANDOFF, Ordering::SeqCst);
        self.stop_workload();
        ctl.owner().store(u64::from(pid), Ordering::SeqCst);
        if let Ok(mut h) = self.helper.lock() {
            *h = Some(Helper {
                child: Some(child),
                pidfd,
                identity,
            });
        }
        Ok(())
    }

    /// Ends the helper process, if one runs the vCPU: told to stop (the
    /// caller set `stop`), killed if it has not within a bound, reaped if
    /// it is ours.
    pub(super) fn stop_helper(&self) {
        let Some(mut h) = self.helper.lock().ok().and_then(|mut h| h.take()) else {
            return;
        };
        if !exits_within(&h.pidfd, STOP_WITHIN) {
            tracing::warn!(
                pid = h.identity.pid,
                "a sim vCPU helper did not stop: killed"
            );
            let _ = rustix::process::pidfd_send_signal(&h.pidfd, rustix::process::Signal::KILL);
            let _ = exits_within(&h.pidfd, STOP_WITHIN);
        }
        if let Some(c) = h.child.as_mut() {
            let _ = c.wait();
        }
    }

    /// What a restarted agent needs to find this VM again, when a helper
    /// runs its vCPU.
    pub(super) fn record(&self) -> Option<VcpuRecord> {
        let h = self.helper.lock().ok()?;
        let h = h.as_ref()?;
        Some(VcpuRecord {
            process: h.identity.clone(),
            bytes: self.shared.geometry.bytes(),
            disks: self
                .shared
                .disks
                .iter()
                .map(|d| (d.geometry().clone(), d.path().to_owned()))
                .collect(),
        })
    }

    /// Finds the VM `rec` records again, its vCPU still running in its
    /// helper (see the module docs); its disks in `disk_dir`.
    pub fn reattach(
        rec: &VcpuRecord,
        disk_dir: Option<PathBuf>,
    ) -> Result<Arc<SimVm>, BackendError> {
        let pid = rec.process.pid;
        let gone = |why: &str| BackendError::from(VcpuError::Gone(format!("pid {pid}: {why}")));
        let differs = |why: &str| {
            BackendError::from(VcpuError::Differs {
                pid,
                why: why.into(),
            })
        };
        let pidfd = pidfd_of(pid).map_err(|_| gone("exited"))?;
        let now = ProcessIdentity::read(pid).map_err(|_| gone("exited"))?;
        let was = &rec.process;
        if now.boot_id != was.boot_id {
            return Err(gone("the host rebooted since"));
        }
        if now.start_ticks != was.start_ticks {
            return Err(gone("the pid is another process's now"));
        }
        if is_zombie(pid) {
            return Err(gone("exited"));
        }
        // Not the executable: an upgraded agent binary still finds the
        // helpers of the one before (the memfd's header has a version).
        if now.cmdline != was.cmdline || now.cmdline.get(1).map(String::as_str) != Some(HELPER_ARG)
        {
            return Err(differs("its command line is not the recorded one"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/fd/0"))
            .map_err(VcpuError::Map)?;
        let file = Arc::new(file);
        let (ctl, mem, geometry) = Control::open(&file)?;
        if geometry.bytes() != rec.bytes {
            return Err(differs("its memory is not the recorded size"));
        }
        if ctl.owner().load(Ordering::SeqCst) != u64::from(pid) || ctl.is_stopped() {
            return Err(differs("it does not run the vCPU"));
        }
        let block = geometry.page_size().bytes();
        let mut disks = Vec::new();
        for (i, (g, path)) in rec.disks.iter().enumerate() {
            let Some((first, blocks)) = ctl.disk_extent(i) else {
                return Err(differs("its disks are not the recorded ones"));
            };
            if blocks.checked_mul(block as u64) != Some(g.bytes) {
                return Err(differs("its disks are not the recorded ones"));
            }
            disks.push(SimDisk::open_existing(path, g.clone(), first, block)?);
        }
        if ctl.disk_extent(rec.disks.len()).is_some() {
            return Err(differs("its disks are not the recorded ones"));
        }
        let vm = SimVm::of_parts(mem, ctl, geometry, disks, disk_dir);
        if let Ok(mut h) = vm.helper.lock() {
            *h = Some(Helper {
                child: None,
                pidfd,
                identity: rec.process.clone(),
            });
        }
        Ok(Arc::new(vm))
    }
}

/// The helper process's `main`: `args` are what follows [`HELPER_ARG`]
/// (the disk files, in leaf order), the memfd is standard input. Returns
/// when the VM is stopped (or the vCPU given to another host).
pub fn run_helper(args: &[std::ffi::OsString]) -> Result<(), BackendError> {
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(VcpuError::Map)?;
    let file = Arc::new(File::from(fd));
    let (ctl, mem, geometry) = Control::open(&file)?;
    let block = geometry.page_size().bytes();
    let mut disks = Vec::new();
    for (i, path) in args.iter().enumerate() {
        let path = Path::new(path);
        let bad = || BackendError::from(VcpuError::Header("disk arguments"));
        let (first, blocks) = ctl.disk_extent(i).ok_or_else(bad)?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let g = DiskGeometry {
            name,
            bytes: blocks.saturating_mul(block as u64),
            base: None,
        };
        disks.push(SimDisk::open_existing(path, g, first, block)?);
    }
    if ctl.disk_extent(args.len()).is_some() {
        return Err(VcpuError::Header("disk arguments").into());
    }
    let me = u64::from(std::process::id());
    let shared = Shared {
        mem,
        ctl,
        geometry,
        local_stop: AtomicBool::new(false),
        paging: Mutex::new(None),
        leaves: 0,
        disks,
        disk_dir: None,
    };
    shared.ctl.ready().store(me, Ordering::SeqCst);
    // Standby until the vCPU is ours; an agent that gave up on us (it
    // kills us then, but may have died first) leaves it elsewhere.
    let t = Instant::now(); // a local deadline, not protocol time
    while shared.ctl.owner().load(Ordering::SeqCst) != me {
        if shared.ctl.is_stopped() || t.elapsed() > READY_WITHIN * 3 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    super::workload::run(&shared, me);
    Ok(())
}
