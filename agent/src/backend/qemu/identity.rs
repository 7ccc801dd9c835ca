//! Who a QEMU process is, in terms the kernel does not hand out twice: its
//! pid *and* the time it started in this boot, with the executable and
//! command line it runs ([`ProcessIdentity`]). Recorded when the agent
//! launches or adopts a QEMU, and checked when a restarted agent finds it
//! again (`QemuProcess::reattach`): a pid alone may name another process
//! by then (pids are reused once a process exits), a start time in the
//! same boot may not.
//!
//! Read from `/proc` while a pidfd holds the process, so the pid cannot
//! change hands between the pidfd and the read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A process, as the kernel names it once and only once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// Its process id.
    pub pid: u32,
    /// When it started, in clock ticks after boot (`/proc/PID/stat`,
    /// field 22).
    pub start_ticks: u64,
    /// The boot it started in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// Its executable.
    pub exe: PathBuf,
    /// Its command line, as the kernel reports it.
    pub cmdline: Vec<String>,
}

/// How the process found under a recorded pid is not the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NotTheSame {
    /// The machine rebooted since: every process of then is gone.
    #[error("the host rebooted since it was recorded")]
    Rebooted,
    /// The pid now names a process started later: the recorded one exited.
    #[error("pid {0} now belongs to a process started later")]
    PidReused(u32),
    /// The same process, but it runs another executable (it called exec).
    #[error("it runs {}, not {}", .now.display(), .recorded.display())]
    Exe {
        /// What it runs now.
        now: PathBuf,
        /// What was recorded.
        recorded: PathBuf,
    },
    /// The same process, with another command line.
    #[error("its command line is not the recorded one")]
    Cmdline,
}

impl NotTheSame {
    /// Whether this means the recorded process no longer exists (rather
    /// than that it exists and changed).
    pub fn is_gone(&self) -> bool {
        matches!(self, NotTheSame::Rebooted | NotTheSame::PidReused(_))
    }
}

impl ProcessIdentity {
    /// Reads process `pid`'s identity from `/proc`. Hold a pidfd on it
    /// first, or the answer may be another process's.
    pub fn read(pid: u32) -> std::io::Result<ProcessIdentity> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let stat = std::fs::read_to_string(proc.join("stat"))?;
        let start_ticks = start_ticks(&stat).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat has no start time"),
            )
        })?;
        Ok(ProcessIdentity {
            pid,
            start_ticks,
            boot_id: boot_id()?,
            exe: std::fs::read_link(proc.join("exe"))?,
            cmdline: split_cmdline(&std::fs::read(proc.join("cmdline"))?),
        })
    }

    /// Whether the process read `now` (under the same pid) is this one.
    pub fn check(&self, now: &ProcessIdentity) -> Result<(), NotTheSame> {
        if now.boot_id != self.boot_id {
            return Err(NotTheSame::Rebooted);
        }
        if now.pid != self.pid || now.start_ticks != self.start_ticks {
            return Err(NotTheSame::PidReused(self.pid));
        }
        if now.exe != self.exe {
            return Err(NotTheSame::Exe {
                now: now.exe.clone(),
                recorded: self.exe.clone(),
            });
        }
        if now.cmdline != self.cmdline {
            return Err(NotTheSame::Cmdline);
        }
        Ok(())
    }

    /// Whether its command line names `path` anywhere (a runtime
    /// directory, a file).
    pub fn mentions(&self, path: &Path) -> bool {
        let p = path.display().to_string();
        self.cmdline.iter().any(|a| a.contains(&p))
    }

    /// Whether it was started to receive a migration (`-incoming`).
    pub fn is_incoming(&self) -> bool {
        is_incoming(&self.cmdline)
    }

    /// The image files of its `-drive file=…` options.
    pub fn drive_files(&self) -> Vec<PathBuf> {
        drive_files(&self.cmdline)
    }
}

/// Whether a QEMU command line receives a migration (`-incoming`).
pub fn is_incoming(cmdline: &[String]) -> bool {
    cmdline.iter().any(|a| a == "-incoming")
}

/// The image files of a QEMU command line's `-drive file=…` options
/// (QEMU's `,,` escape undone).
pub fn drive_files(cmdline: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut args = cmdline.iter();
    while let Some(a) = args.next() {
        if a != "-drive" {
            continue;
        }
        let Some(opts) = args.next() else { break };
        if let Some(file) = option(opts, "file") {
            out.push(PathBuf::from(file));
        }
    }
    out
}

/// A NUL-separated command line, as `/proc/PID/cmdline` holds it.
pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value of `key=` in a QEMU option string, with `,,` read as a comma.
fn option(opts: &str, key: &str) -> Option<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = opts.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                fields.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    fields.push(cur);
    fields
        .into_iter()
        .find_map(|f| f.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// This boot's id.
fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may
/// hold spaces and parentheses: fields are counted after its last `)`.
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_a_hostile_command_name() {
        let stat = "4242 (qemu) x) 1 2 3) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    5 6 0 0 20 0 3 0 987654 123456 789 18446744073709551615";
        assert_eq!(start_ticks(stat), Some(987_654));
        assert_eq!(start_ticks("4242 (qemu"), None);
    }

    #[test]
    fn this_process_is_itself_and_not_a_later_one() {
        let me = ProcessIdentity::read(std::process::id()).unwrap();
        assert!(me
            .check(&ProcessIdentity::read(std::process::id()).unwrap())
            .is_ok());
        let later = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(later.check(&me), Err(NotTheSame::PidReused(me.pid)));
        assert!(later.check(&me).unwrap_err().is_gone());
        let rebooted = ProcessIdentity {
            boot_id: "another boot".into(),
            ..me.clone()
        };
        assert!(rebooted.check(&me).unwrap_err().is_gone());
        let other_args = ProcessIdentity {
            cmdline: vec!["qemu".into()],
            ..me.clone()
        };
        assert_eq!(other_args.check(&me), Err(NotTheSame::Cmdline));
        assert!(!NotTheSame::Cmdline.is_gone());
    }

    #[test]
    fn drive_files_undo_qemu_s_comma_escape() {
        let id = ProcessIdentity {
            pid: 1,
            start_ticks: 1,
            boot_id: String::new(),
            exe: "/usr/bin/qemu-system-x86_64".into(),
            cmdline: [
                "qemu-system-x86_64",
                "-drive",
                "file=/img/a,,b.img,if=none,id=disk0,format=raw",
                "-device",
                "virtio-blk-pci,drive=disk0",
                "-drive",
                "if=none,file=/img/c.img",
                "-incoming",
                "defer",
            ]
            .map(String::from)
            .to_vec(),
        };
        assert_eq!(
            id.drive_files(),
            vec![PathBuf::from("/img/a,b.img"), PathBuf::from("/img/c.img")]
        );
        assert!(id.is_incoming());
        assert!(id.mentions(Path::new("/img/c.img")));
    }
}
