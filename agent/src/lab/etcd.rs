//! A real etcd for tests: one member, or a cluster of several on
//! loopback, each a child process of the installed `etcd` (Debian's
//! `etcd-server`, which `scripts/test` installs) with its own data
//! directory and log file. A test may kill a member, or stop and continue
//! it (SIGSTOP/SIGCONT: a member that is there but does not answer).
//!
//! Whether a test runs at all is decided in one place, [`etcd_binary`]:
//! without `etcd` a test fails under `CI=true` and is skipped elsewhere,
//! with a line saying so.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The variable that may name the etcd program (default: `etcd` on PATH).
pub const ETCD_VAR: &str = "CONVOY_ETCD";

/// How long a cluster may take to elect a leader on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the etcd lab could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdLabError {
    /// No etcd under `CI=true`.
    #[error("CI=true but no etcd program ({ETCD_VAR} unset and none on PATH): run the tests through scripts/test, which installs etcd-server")]
    Missing,
    /// A member could not be started.
    #[error("{program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A member ended before the cluster was ready.
    #[error("etcd member {member} exited before the cluster was ready: {status} (log: {})", log.display())]
    Exited {
        /// Which.
        member: usize,
        /// How it ended.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
    },
    /// The cluster did not become healthy in time.
    #[error("etcd did not become healthy within {READY_TIMEOUT:?} (logs in {})", dir.display())]
    NotReady {
        /// Where the logs are.
        dir: PathBuf,
    },
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The etcd program to run: `Ok(None)` (skip) when there is none outside
/// CI, an error under `CI=true`.
pub fn etcd_binary(test: &str) -> Result<Option<PathBuf>, EtcdLabError> {
    if let Some(p) = std::env::var_os(ETCD_VAR) {
        return Ok(Some(PathBuf::from(p)));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Ok(Some(p)),
        None if std::env::var("CI").as_deref() == Ok("true") => Err(EtcdLabError::Missing),
        None => {
            eprintln!("{test}: skipped, no etcd (scripts/test installs etcd-server)");
            Ok(None)
        }
    }
}

#[derive(Debug)]
struct Member {
    client: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

/// A running etcd cluster; its members are killed when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
}

fn free_port() -> std::io::Result<SocketAddr> {
    // Bound and released: a port nobody holds now (the member binds it a
    // moment later; a collision fails the start loudly, never silently).
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

impl EtcdCluster {
    /// Starts `members` members of one new cluster (program `etcd`), data
    /// and logs under `dir`, and waits until every one is healthy.
    pub async fn start(etcd: &Path, dir: &Path, members: usize) -> Result<Self, EtcdLabError> {
        let mut addrs = Vec::new();
        for _ in 0..members {
            addrs.push((free_port()?, free_port()?));
        }
        let initial: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
            .collect();
        let token = format!("convoy-lab-{}", std::process::id());
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for (i, (client, peer)) in addrs.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            std::fs::create_dir_all(&data)?;
            let log = dir.join(format!("m{i}.log"));
            let out = std::fs::File::create(&log)?;
            let child = Command::new(etcd)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-token")
                .arg(&token)
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .map_err(|source| EtcdLabError::Spawn {
                    program: etcd.display().to_string(),
                    source,
                })?;
            cluster.members.push(Member {
                client: *client,
                child: Some(child),
                log,
            });
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    async fn wait_healthy(&mut self) -> Result<(), EtcdLabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut healthy = 0;
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(c) = m.child.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        return Err(EtcdLabError::Exited {
                            member: i,
                            status,
                            log: m.log.clone(),
                        });
                    }
                }
                if health(m.client).await {
                    healthy += 1;
                }
            }
            if healthy == self.members.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EtcdLabError::NotReady {
                    dir: self.dir.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// Whether member `i` answers its health check.
    pub async fn healthy(&self, i: usize) -> bool {
        match self.members.get(i) {
            Some(m) => health(m.client).await,
            None => false,
        }
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` (`true`: SIGSTOP, there but silent) or lets it
    /// go on (`false`: SIGCONT).
    pub fn pause(&self, i: usize, stop: bool) -> std::io::Result<()> {
        let Some(pid) = self
            .members
            .get(i)
            .and_then(|m| m.child.as_ref())
            .map(Child::id)
        else {
            return Err(std::io::Error::other(format!("no member {i} running")));
        };
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0))
            .ok_or_else(|| std::io::Error::other("bad pid"))?;
        let signal = if stop {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, signal)?;
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A stopped member must go on to die.
            let _ = self.pause(i, false);
            self.kill(i);
        }
    }
}

/// etcd's `/health` on `addr` says `"health":"true"` (a leader is known
/// and the member serves).
async fn health(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.take(64 << 10).read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        Some(text.contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}
