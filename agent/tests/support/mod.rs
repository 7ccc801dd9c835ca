//! Agents run as child processes of a test: the real `convoy-agent`
//! binary (Cargo builds it for this crate's tests and names it in
//! `CARGO_BIN_EXE_convoy-agent`, so a stale binary is never run), each in
//! a process group of its own with its own state directory, killed and
//! restarted at will.

#![allow(dead_code)] // Each test binary uses a part.

use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use convoy_agent::backend::qemu::guest::{self, TestGuest};
use convoy_agent::client::CtlClient;
use convoy_agent::lab::Lab;
use convoy_protocol::names::{AgentName, Role, SpiffeId};
use rustix::process::Signal;

/// A loopback address for an agent that is killed and restarted on it:
/// a port below Linux's ephemeral range (32768–60999 by default), free
/// for both UDP and TCP when picked. A port the kernel hands out
/// (`127.0.0.1:0`) is in that range, and while the agent is down any
/// outgoing TCP connection of the machine may take it as its source port
/// (seen in CI: "TCP: Address already in use" at the restart).
pub fn listen_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Ports 20000–32767, from a start that differs per process (test
    // binaries run one after another, but their agents may linger).
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = 12_768u16;
    let seed = u16::try_from(std::process::id() % u32::from(span)).unwrap_or(0);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n) % span);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let udp = std::net::UdpSocket::bind(addr);
        let tcp = std::net::TcpListener::bind(addr);
        if udp.is_ok() && tcp.is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in 20000–32767 for both UDP and TCP");
}

/// Polls `f` every 100 ms until it holds or `timeout` passed.
pub async fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f()
}

/// The QEMU test guest's kernel and initramfs, built once per test binary
/// (in the directory `tests/it` builds it in too); `None` (skip, with a
/// message) when QEMU or the guest is missing, except under `CI=true`,
/// where that fails the test.
pub fn test_guest() -> Option<TestGuest> {
    static GUEST: std::sync::OnceLock<Result<TestGuest, String>> = std::sync::OnceLock::new();
    let built = GUEST.get_or_init(|| {
        guest::find_qemu().map_err(|e| e.to_string())?;
        guest::build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-guest"))
            .map_err(|e| e.to_string())
    });
    match built {
        Ok(g) => Some(g.clone()),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipped (QEMU test guest unavailable): {e}");
            None
        }
        Err(e) => panic!("CI=true and the QEMU tests cannot run: {e}"),
    }
}

/// A PKI and a policy for agents run as processes.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub lab: Lab,
}

impl Setup {
    /// The lab's PKI and policy (no in-process agent), with agents
    /// `names` issued and in the inventory.
    pub async fn new(names: &[&str]) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::start(dir.path(), &[], |_, _| {}).await.unwrap();
        let mut inv = lab.inventory().unwrap();
        for n in names {
            let name: AgentName = n.parse().unwrap();
            lab.pki
                .issue(Role::Agent, &name, Duration::from_secs(86400))
                .unwrap();
            inv.agents.insert(
                SpiffeId::agent(lab.trust.domain().clone(), name),
                convoy_agent::trust::policy::HostFacts {
                    zone: "lab-a".into(),
                    security_level: 2,
                    groups: Default::default(),
                },
            );
        }
        lab.write_inventory(&inv).unwrap();
        Setup { dir, lab }
    }

    /// Agent `name` (not started): its own state directory, a free port
    /// ([`listen_addr`]), and `extra` arguments.
    pub fn agent(&self, name: &str, extra: &[String]) -> AgentProcess {
        let root = self.dir.path();
        let state = root.join("state").join(name);
        let addr = listen_addr();
        let policy = self.lab.policy_files();
        let mut args = [
            "--name",
            name,
            "--listen",
            &addr.to_string(),
            "--pki",
            &self.lab.pki.dir().display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--policy",
            &policy.policies.display().to_string(),
            "--inventory",
            &policy.inventory.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra);
        AgentProcess {
            id: SpiffeId::agent(self.lab.trust.domain().clone(), name.parse().unwrap()),
            log: root.join(format!("agent-{name}.log")),
            args,
            addr,
            state,
            child: None,
        }
    }

    /// An operator's client of `a`, once it answers.
    pub async fn client(&self, a: &AgentProcess) -> CtlClient {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match CtlClient::connect(a.addr, a.id.clone(), &self.lab.operator, &self.lab.trust)
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() < end => {
                    eprintln!("agent not answering yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("agent never answered: {e}\n{}", a.output()),
            }
        }
    }
}

/// `convoy-agent`, run as a child process in a process group of its own.
pub struct AgentProcess {
    pub id: SpiffeId,
    pub args: Vec<String>,
    pub addr: SocketAddr,
    pub state: PathBuf,
    /// Its output, every run appended.
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl AgentProcess {
    /// Starts it and waits until it listens.
    pub async fn start(&mut self) {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let from = out.seek(std::io::SeekFrom::End(0)).unwrap();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(env!("CARGO_BIN_EXE_convoy-agent"))
                .args(&self.args)
                .env("RUST_LOG", "info")
                // Inherited by its sim vCPU helpers, which outlive it by
                // design: how the test finds them to end them.
                .env(HELPER_MARK, &self.state)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        self.child = Some(child);
        assert!(
            self.wait_for_from(from, "agent listening", Duration::from_secs(60))
                .await,
            "the agent did not start:\n{}",
            self.output()
        );
    }

    /// The log's length now (a mark to wait for later lines from).
    pub fn mark(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Waits until `needle` appears in its output after byte `from`.
    pub async fn wait_for_from(&self, from: u64, needle: &str, timeout: Duration) -> bool {
        let log = self.log.clone();
        until(timeout, || {
            let Ok(mut f) = std::fs::File::open(&log) else {
                return false;
            };
            if f.seek(std::io::SeekFrom::Start(from)).is_err() {
                return false;
            }
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            s.contains(needle)
        })
        .await
    }

    /// Releases a migration held at a `--dangerous-pause-at` point.
    pub fn release(&self) {
        std::fs::write(self.state.join(convoy_agent::pause::RELEASE_FILE), b"").unwrap();
    }

    /// Sends `sig` to it (to its whole process group with `group`, as a
    /// terminal's Ctrl-C does) and waits for it to exit.
    pub async fn stop(&mut self, sig: Signal, group: bool) -> ExitStatus {
        let mut child = self.child.take().expect("the agent runs");
        let pid = rustix::process::Pid::from_child(&child);
        if group {
            rustix::process::kill_process_group(pid, sig).unwrap();
        } else {
            rustix::process::kill_process(pid, sig).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the agent did not stop:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything it wrote, every run.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_helpers(&self.state);
    }
}

/// The environment variable that marks an agent's processes with its
/// state directory ([`AgentProcess::start`]).
const HELPER_MARK: &str = "CONVOY_TEST_AGENT_STATE";

/// Kills every process left from the agent with state directory `state`:
/// its sim vCPU helpers keep a VM running after the agent is killed (what
/// the restart tests rely on), and would otherwise run on after the test,
/// taking CPU from every test after it.
fn kill_helpers(state: &std::path::Path) {
    let mark = format!("{HELPER_MARK}={}", state.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == mark.as_bytes()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
    }
}
