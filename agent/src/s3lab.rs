//! A real S3 API on loopback for tests: moto's server (`moto[server]` from
//! PyPI, which `scripts/test` installs in a virtualenv and names in
//! `CONVOY_MOTO_SERVER`), run as a child process, and a flaky front that
//! fails a share of the connections made to it.
//!
//! A module of its own rather than part of [`crate::lab`]: the snapshot
//! store's tests use it, and `lab` depends on the host, which depends on
//! `snapshot` (a module cycle otherwise).
//!
//! Whether a test runs at all is decided in one place, [`moto_server`]:
//! without `CONVOY_MOTO_SERVER` a test fails under `CI=true` and is skipped
//! elsewhere, with a line saying so.
//!
//! The lab gives an S3 client what it needs as `object_store` settings
//! ([`S3Server::config`]): endpoint, region, dummy keys (moto checks none)
//! and plain HTTP.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3ConfigKey;
use object_store::ClientConfigKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The variable that names moto's server program.
pub const MOTO_SERVER_VAR: &str = "CONVOY_MOTO_SERVER";

/// The region the lab's clients name (moto takes any).
pub const REGION: &str = "us-east-1";

/// How long moto may take to answer after it starts (seconds on a busy
/// two-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest request head the flaky front reads.
const MAX_HEAD: usize = 64 << 10;

/// Why the S3 lab could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3LabError {
    /// `CONVOY_MOTO_SERVER` is unset under `CI=true`.
    #[error("CI=true but {MOTO_SERVER_VAR} is unset: run the tests through scripts/test, which installs moto[server]")]
    Missing,
    /// The server could not be started.
    #[error("{program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server ended before it answered.
    #[error("{program} exited before answering on {addr}: {status}")]
    Exited {
        /// The program.
        program: String,
        /// Where it was to listen.
        addr: SocketAddr,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// The server did not answer in time.
    #[error("{program} did not answer on {addr} within {READY_TIMEOUT:?}")]
    NotReady {
        /// The program.
        program: String,
        /// Where it was to listen.
        addr: SocketAddr,
    },
    /// A bucket could not be made.
    #[error("creating bucket {bucket}: {why}")]
    Bucket {
        /// The bucket.
        bucket: String,
        /// The server's status line, or the socket's error.
        why: String,
    },
    /// A socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The moto server program to run, from `CONVOY_MOTO_SERVER`. Unset: an
/// error under `CI=true` (the calling test fails), elsewhere `None` after a
/// line on stderr naming `test` (the caller skips).
pub fn moto_server(test: &str) -> Result<Option<PathBuf>, S3LabError> {
    match std::env::var_os(MOTO_SERVER_VAR) {
        Some(p) if !p.is_empty() => Ok(Some(PathBuf::from(p))),
        _ if std::env::var("CI").as_deref() == Ok("true") => Err(S3LabError::Missing),
        _ => {
            eprintln!("{test}: skipped, {MOTO_SERVER_VAR} is unset (scripts/test sets it)");
            Ok(None)
        }
    }
}

/// One moto server on `127.0.0.1`, killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
}

impl S3Server {
    /// Starts the server [`moto_server`] names, or `None` (skip) as it
    /// says.
    pub async fn for_test(test: &str) -> Result<Option<S3Server>, S3LabError> {
        match moto_server(test)? {
            Some(p) => Ok(Some(S3Server::start(&p).await?)),
            None => Ok(None),
        }
    }

    /// Starts `program -H 127.0.0.1 -p PORT` on a free port and waits
    /// until it answers.
    pub async fn start(program: &Path) -> Result<S3Server, S3LabError> {
        let name = program.display().to_string();
        // A port free a moment ago may be taken by the time moto binds it:
        // a server that exits at once is started again on another.
        let mut tries = 0;
        loop {
            tries += 1;
            let addr = free_port()?;
            let child = Command::new(program)
                .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| S3LabError::Spawn {
                    program: name.clone(),
                    source,
                })?;
            let mut s = S3Server { child, addr };
            match s.wait_ready(&name).await {
                Err(S3LabError::Exited { .. }) if tries < 3 => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(s),
            }
        }
    }

    async fn wait_ready(&mut self, program: &str) -> Result<(), S3LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(S3LabError::Exited {
                    program: program.to_owned(),
                    addr: self.addr,
                    status,
                });
            }
            if let Ok(head) = request(self.addr, "GET", "/").await {
                if status_code(&head) == Some(200) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(S3LabError::NotReady {
                    program: program.to_owned(),
                    addr: self.addr,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes bucket `name` (moto takes the unsigned request).
    pub async fn create_bucket(&self, name: &str) -> Result<(), S3LabError> {
        let bucket_err = |why: String| S3LabError::Bucket {
            bucket: name.to_owned(),
            why,
        };
        let head = request(self.addr, "PUT", &format!("/{name}"))
            .await
            .map_err(|e| bucket_err(e.to_string()))?;
        match status_code(&head) {
            Some(200) => Ok(()),
            _ => Err(bucket_err(
                head.lines().next().unwrap_or_default().to_owned(),
            )),
        }
    }

    /// What an S3 client needs to reach this server.
    pub fn config(&self) -> Vec<(AmazonS3ConfigKey, String)> {
        config_for(self.addr)
    }

    /// Starts a flaky front before this server.
    pub async fn flaky(&self, plan: FlakyPlan) -> Result<FlakyFront, S3LabError> {
        FlakyFront::start(self.addr, plan).await
    }
}

/// `object_store` settings for an S3 API at `addr`: plain HTTP, path-style
/// URLs, region [`REGION`] and dummy keys.
fn config_for(addr: SocketAddr) -> Vec<(AmazonS3ConfigKey, String)> {
    vec![
        (AmazonS3ConfigKey::Endpoint, format!("http://{addr}")),
        (AmazonS3ConfigKey::Region, REGION.to_owned()),
        (AmazonS3ConfigKey::AccessKeyId, "convoy-lab".to_owned()),
        (
            AmazonS3ConfigKey::SecretAccessKey,
            "convoy-lab-not-a-secret".to_owned(),
        ),
        (
            AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
            "true".to_owned(),
        ),
    ]
}

fn free_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    l.local_addr()
}

/// One HTTP/1.1 request without a body; the response's head.
async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The status code of an HTTP response head.
fn status_code(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

/// What the flaky front does to a connection it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Reads the request, then closes without an answer: the server never
    /// sees it (an idle connection cut by a load balancer).
    Hangup,
    /// Reads the request and answers `503 Slow Down`, as S3 does under
    /// load; the server never sees it.
    Unavailable,
    /// Passes the request on, then cuts the server's answer after this many
    /// bytes: the server did what was asked, the client cannot know it.
    Cut(usize),
}

/// Which connections the flaky front fails: connection `k` (counted from
/// 0) fails when `(k + seed) % one_in == 0`; `one_in` 1 fails them all.
#[derive(Debug, Clone, Copy)]
pub struct FlakyPlan {
    /// One connection in this many fails (0 is taken as 1).
    pub one_in: u64,
    /// Shifts which ones.
    pub seed: u64,
    /// What a failed one sees.
    pub fault: Fault,
}

impl FlakyPlan {
    fn fails(&self, k: u64) -> bool {
        k.wrapping_add(self.seed) % self.one_in.max(1) == 0
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    failed: AtomicU64,
}

/// A TCP proxy on `127.0.0.1` before an S3 server that fails connections
/// as its [`FlakyPlan`] says (moto closes each connection after one
/// answer, so a connection is a request). Stops when dropped.
#[derive(Debug)]
pub struct FlakyFront {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for FlakyFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FlakyFront {
    /// Starts a front before the S3 server at `upstream`.
    pub async fn start(upstream: SocketAddr, plan: FlakyPlan) -> Result<FlakyFront, S3LabError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let k = c.connections.fetch_add(1, Ordering::Relaxed);
                let fault = plan.fails(k).then_some(plan.fault);
                if fault.is_some() {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
                // A connection that breaks is what this front is for: its
                // errors are the client's to see.
                tokio::spawn(async move {
                    let _ = serve(client, upstream, fault).await;
                });
            }
        });
        Ok(FlakyFront {
            addr,
            counters,
            task,
        })
    }

    /// What an S3 client needs to reach the server through this front.
    pub fn config(&self) -> Vec<(AmazonS3ConfigKey, String)> {
        config_for(self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// Connections failed so far.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }
}

/// One connection through the front.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Option<Fault>,
) -> std::io::Result<()> {
    let Some(fault) = fault else {
        let mut server = TcpStream::connect(upstream).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        return Ok(());
    };
    let req = read_request(&mut client).await?;
    match fault {
        Fault::Hangup => {}
        Fault::Unavailable => {
            let body = "<Error><Code>SlowDown</Code><Message>flaky front</Message></Error>";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(resp.as_bytes()).await?;
        }
        Fault::Cut(n) => {
            let mut server = TcpStream::connect(upstream).await?;
            server.write_all(&req).await?;
            let mut resp = Vec::new();
            server.read_to_end(&mut resp).await?;
            resp.truncate(n);
            client.write_all(&resp).await?;
        }
    }
    client.shutdown().await
}

/// Reads one request, head and `Content-Length` body, and returns its
/// bytes (all of them read, so that closing sends no reset).
async fn read_request(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}
