//! The raw bulk transfer `convoyctl bench` compares migrations with:
//! endpoints tuned and authenticated exactly like the lab's agents, over
//! QUIC or TLS over TCP, on loopback (optionally through the UDP relay) or
//! from site a to site b of the lab's WAN.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::names::{AgentName, Role, SpiffeId};
use tokio::sync::oneshot;

use super::{impair, Lab, LabError};
use crate::backend::memory::GuestMemory;
use crate::transport::{self, Kind, Tuning, ALPN_AGENT};
use crate::trust::identity::{self, Identity, TrustBundle};

/// Why the raw baseline failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The receiver's TLS configuration.
    #[error("{0}")]
    Tls(#[from] identity::IdentityError),
    /// An endpoint or the connection could not be made.
    #[error("{0}")]
    Transport(#[from] transport::TransportError),
    /// The receiver's memory could not be mapped.
    #[error("{0}")]
    Memory(#[source] std::io::Error),
    /// The receiver's endpoint closed before a connection came.
    #[error("no connection")]
    NoConnection,
    /// A TCP connection's handshake failed at the receiver.
    #[error("TCP accept: {0}")]
    Accept(#[source] std::io::Error),
    /// The connection failed.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream could not be read.
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    /// A stream could not be written.
    #[error("{0}")]
    Write(#[from] quinn::WriteError),
    /// A stream could not be finished.
    #[error("{0}")]
    Finish(#[from] quinn::ClosedStream),
    /// A sender or receiver task failed.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// Fewer bytes arrived than were sent.
    #[error("received {received} of {total} bytes")]
    Short {
        /// Bytes received.
        received: u64,
        /// Bytes sent.
        total: u64,
    },
    /// The path cannot carry this transfer.
    #[error("{0}")]
    Path(&'static str),
    /// A side of the transfer ended without its result.
    #[error("a side of the transfer ended without its result")]
    Lost,
}

/// Where the raw baseline's receiver puts the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Drops them (pure transport).
    Discard,
    /// Copies them into a fresh anonymous mapping, as a destination's
    /// staging image must.
    FreshMemory,
}

/// Where a raw transfer runs.
#[derive(Debug, Clone)]
pub enum BulkPath {
    /// On loopback; through the UDP impairment relay (towards the receiver,
    /// and back) when given, which carries QUIC only.
    Loopback(Option<Box<(impair::Impairment, impair::Impairment)>>),
    /// From site a to site b of the lab's WAN ([`Lab::start_wan`]).
    Wan,
}

/// The transfer's shape, shared by both sides.
#[derive(Debug, Clone, Copy)]
struct Shape {
    streams: u16,
    /// Connections the streams are spread over (stream `i` on the
    /// `i % connections`th), as a migration spreads its over lanes.
    connections: u16,
    per_stream: u64,
    sink: Sink,
}

impl Shape {
    fn total(&self) -> u64 {
        self.per_stream * u64::from(self.streams)
    }
}

impl Lab {
    /// Raw QUIC bulk transfer between two endpoints tuned and authenticated
    /// exactly like this lab's agents: `bytes` over `streams`
    /// unidirectional streams, timed from the first write to the last byte
    /// received. The baseline `convoyctl bench` compares migrations with.
    pub async fn raw_quic_bulk(
        &self,
        bytes: u64,
        streams: u16,
        sink: Sink,
    ) -> Result<Duration, LabError> {
        self.raw_bulk(
            bytes,
            streams,
            sink,
            &Tuning::default(),
            Kind::Quic,
            BulkPath::Loopback(None),
        )
        .await
    }

    /// [`Lab::raw_quic_bulk`] with `tuning`, and through the impairment
    /// relay with `via` (towards the receiver, and back) when given.
    pub async fn raw_quic_bulk_with(
        &self,
        bytes: u64,
        streams: u16,
        sink: Sink,
        tuning: &Tuning,
        via: Option<(impair::Impairment, impair::Impairment)>,
    ) -> Result<Duration, LabError> {
        self.raw_bulk(
            bytes,
            streams,
            sink,
            tuning,
            Kind::Quic,
            BulkPath::Loopback(via.map(Box::new)),
        )
        .await
    }

    /// A raw bulk transfer over `kind` (QUIC, or TLS over TCP) on `path`,
    /// from an endpoint with agent a's identity to one with b's.
    pub async fn raw_bulk(
        &self,
        bytes: u64,
        streams: u16,
        sink: Sink,
        tuning: &Tuning,
        kind: Kind,
        path: BulkPath,
    ) -> Result<Duration, LabError> {
        self.raw_bulk_over(bytes, streams, 1, sink, tuning, kind, path)
            .await
    }

    /// [`Lab::raw_bulk`] with its streams spread over `connections`
    /// connections.
    #[allow(clippy::too_many_arguments)]
    pub async fn raw_bulk_over(
        &self,
        bytes: u64,
        streams: u16,
        connections: u16,
        sink: Sink,
        tuning: &Tuning,
        kind: Kind,
        path: BulkPath,
    ) -> Result<Duration, LabError> {
        let (na, nb): (AgentName, AgentName) = ("a".parse()?, "b".parse()?);
        let ida = self.pki.identity(Role::Agent, &na)?;
        let idb = self.pki.identity(Role::Agent, &nb)?;
        let server_tls =
            identity::server_config(&idb, &self.trust, &[ALPN_AGENT]).map_err(BenchError::from)?;
        let streams = streams.max(1);
        let shape = Shape {
            streams,
            connections: connections.clamp(1, streams),
            per_stream: bytes / u64::from(streams),
            sink,
        };
        let (addr_tx, addr_rx) = oneshot::channel();
        let send_side = Sender {
            identity: ida,
            peer: idb.id().clone(),
            trust: self.trust.clone(),
            tuning: tuning.clone(),
            kind,
            shape,
        };
        let (start, (received, done)) = match path {
            BulkPath::Loopback(via) => {
                let recv = tokio::spawn(receive(
                    server_tls,
                    tuning.clone(),
                    Ipv4Addr::LOCALHOST,
                    shape,
                    addr_tx,
                ));
                let mut addr = addr_rx.await.map_err(|_| BenchError::Lost)?;
                let _relay = match via {
                    Some(_) if kind == Kind::Tcp => {
                        return Err(BenchError::Path("the UDP relay carries QUIC only").into())
                    }
                    Some(lines) => {
                        let (to_target, to_client) = *lines;
                        let mut config = impair::RelayConfig::new(addr);
                        config.to_target = to_target;
                        config.to_client = to_client;
                        let relay = impair::Relay::start(config).await?;
                        addr = relay.addr();
                        Some(relay)
                    }
                    None => None,
                };
                let start = send_side.send(addr).await?;
                (start, recv.await.map_err(BenchError::from)??)
            }
            BulkPath::Wan => {
                let wan = self.wan().ok_or(BenchError::Path("not a WAN lab"))?;
                let (ip, tuning) = (wan.b.addr, tuning.clone());
                let recv = in_netns_runtime(&wan.b.netns, move || {
                    receive(server_tls, tuning, ip, shape, addr_tx)
                })?;
                let addr = addr_rx.await.map_err(|_| BenchError::Lost)?;
                let send = in_netns_runtime(&wan.a.netns, move || send_side.send(addr))?;
                let start = send.await.map_err(|_| BenchError::Lost)??;
                (start, recv.await.map_err(|_| BenchError::Lost)??)
            }
        };
        if received != shape.total() {
            return Err(BenchError::Short {
                received,
                total: shape.total(),
            }
            .into());
        }
        Ok(done - start)
    }
}

/// Runs the future `f` makes on a thread of its own in network namespace
/// `netns`, on a runtime of that thread; its result comes back on the
/// channel.
fn in_netns_runtime<T, F>(
    netns: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> Result<oneshot::Receiver<Result<T, BenchError>>, LabError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, BenchError>>,
{
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("bulk@{netns}"))
        .spawn(move || {
            let runtime = super::wan::enter(&ns).and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            });
            let result = match runtime {
                Ok(rt) => rt.block_on(f()),
                Err(e) => Err(BenchError::Transport(e.into())),
            };
            let _ = tx.send(result);
        })?;
    Ok(rx)
}

/// Accepts one connection on `ip` (QUIC or TCP, on one port sent back on
/// `addr`) and reads `shape`'s streams: the bytes received and when the
/// last arrived.
async fn receive(
    tls: rustls::ServerConfig,
    tuning: Tuning,
    ip: Ipv4Addr,
    shape: Shape,
    addr: oneshot::Sender<SocketAddr>,
) -> Result<(u64, Instant), BenchError> {
    let memory = match shape.sink {
        Sink::Discard => None,
        Sink::FreshMemory => Some(Arc::new(
            GuestMemory::new(
                convoy_protocol::page::saturating_usize(shape.total().div_ceil(8)) * 8,
            )
            .map_err(BenchError::Memory)?,
        )),
    };
    let tcp_tls = Arc::new(tls.clone());
    let (endpoint, listener) = transport::bind_both(
        SocketAddr::from((ip, 0)),
        tls,
        &tuning,
        &transport::ResetKey::random().map_err(transport::TransportError::from)?,
    )?;
    let _ = addr.send(
        endpoint
            .local_addr()
            .map_err(transport::TransportError::from)?,
    );
    let mut conns = Vec::new();
    for _ in 0..shape.connections {
        conns.push(accept_one(&endpoint, &listener, &tcp_tls, &tuning).await?);
    }
    // Streams arrive on any of the connections: numbered as they come.
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut acceptors = Vec::new();
    for conn in &conns {
        let (conn, next, tx, memory) = (conn.clone(), next.clone(), tx.clone(), memory.clone());
        acceptors.push(tokio::spawn(async move {
            loop {
                let s = match conn.accept_uni().await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(BenchError::from(e)));
                        return;
                    }
                };
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= u64::from(shape.streams) {
                    return;
                }
                tokio::spawn(read_stream(s, i, shape, memory.clone(), tx.clone()));
            }
        }));
    }
    drop(tx);
    let mut n = 0;
    for _ in 0..shape.streams {
        n += rx.recv().await.ok_or(BenchError::Lost)??;
    }
    for a in acceptors {
        a.abort();
    }
    let done = Instant::now();
    for conn in &conns {
        conn.close(0u32.into(), b"done");
    }
    // The sender hears the close before this side's sockets go.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok((n, done))
}

/// Accepts one connection over QUIC or TCP, whichever comes.
async fn accept_one(
    endpoint: &quinn::Endpoint,
    listener: &tokio::net::TcpListener,
    tcp_tls: &Arc<rustls::ServerConfig>,
    tuning: &Tuning,
) -> Result<transport::Connection, BenchError> {
    Ok(tokio::select! {
        incoming = endpoint.accept() => {
            let conn = incoming.ok_or(BenchError::NoConnection)?.await?;
            let conn = transport::Connection::Quic(conn);
            transport::grant_migration_credit(&conn, tuning);
            conn
        }
        tcp = listener.accept() => {
            let (stream, remote) = tcp.map_err(BenchError::Accept)?;
            let hs = transport::tcp::Handshaken::accept(stream, remote, tcp_tls.clone(), tuning.connect_timeout)
                .await
                .map_err(BenchError::Accept)?;
            let credit = transport::dial::credit(ALPN_AGENT, tuning);
            transport::Connection::Tcp(hs.session(credit, tuning.into(), None))
        }
    })
}

/// Reads stream `i` to its end (into `memory` at its place when given)
/// and sends the byte count on `tx`.
async fn read_stream(
    mut s: transport::RecvStream,
    i: u64,
    shape: Shape,
    memory: Option<Arc<GuestMemory>>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<u64, BenchError>>,
) {
    let read = async {
        let mut n = 0u64;
        let mut buf = Vec::new();
        while let Some(c) = s.read_chunk(1 << 20).await? {
            n += c.len() as u64;
            if let Some(m) = &memory {
                // Staging-like: whole 64 KiB blocks into fresh memory.
                buf.extend_from_slice(&c);
                if buf.len() >= 1 << 16 {
                    let off = i * shape.per_stream + n - buf.len() as u64;
                    let whole = buf.len() / 8 * 8;
                    m.write(convoy_protocol::page::saturating_usize(off), &buf[..whole]);
                    buf.drain(..whole);
                }
            }
        }
        Ok::<u64, BenchError>(n)
    };
    let _ = tx.send(read.await);
}

/// The sending side.
struct Sender {
    identity: Identity,
    peer: SpiffeId,
    trust: TrustBundle,
    tuning: Tuning,
    kind: Kind,
    shape: Shape,
}

impl Sender {
    /// Dials `addr` and sends; returns when the first write began.
    async fn send(self, addr: SocketAddr) -> Result<Instant, BenchError> {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let client = transport::endpoint(any, None, &self.tuning)?;
        let choice = match self.kind {
            Kind::Quic => transport::Choice::Quic,
            Kind::Tcp => transport::Choice::Tcp,
        };
        let dialer = transport::Dialer::new(client, choice, self.tuning.clone());
        let mut conns = Vec::new();
        for _ in 0..self.shape.connections {
            let conn = dialer
                .connect(
                    addr,
                    self.peer.clone(),
                    ALPN_AGENT,
                    &self.identity,
                    &self.trust,
                )
                .await?;
            conns.push(conn);
        }
        let mut chunk = vec![0u8; 1 << 20];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for c in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let chunk = Bytes::from(chunk);
        let start = Instant::now();
        let mut senders = Vec::new();
        for i in 0..usize::from(self.shape.streams) {
            let mut s = conns[i % conns.len()].open_uni().await?;
            let chunk = chunk.clone();
            let per_stream = self.shape.per_stream;
            senders.push(tokio::spawn(async move {
                let mut left = per_stream;
                while left > 0 {
                    let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
                    s.write_chunk(chunk.slice(..n)).await?;
                    left -= n as u64;
                }
                s.finish()?;
                Ok::<(), BenchError>(())
            }));
        }
        for s in senders {
            s.await??;
        }
        // Until the receiver has read everything and closed.
        for conn in &conns {
            let _ = conn.closed().await;
        }
        Ok(start)
    }
}
