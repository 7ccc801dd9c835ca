//! The raw bulk transfer `convoyctl bench` compares migrations with:
//! endpoints tuned and authenticated exactly like the lab's agents, over
//! QUIC or TLS over TCP, on loopback (optionally through the UDP relay) or
//! from site a to site b of the lab's WAN.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::digest::{leaf_digest, Digest, MerkleTree};
use convoy_protocol::names::{AgentName, Role, SpiffeId};
use tokio::sync::oneshot;

use super::{impair, Lab, LabError};
use crate::backend::memory::GuestMemory;
use crate::cpu::CpuMeter;
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
    /// The receiver's root digest differs from the sender's.
    #[error("the receiver's root digest differs from the sender's")]
    Mismatch,
}

/// Where the raw baseline's receiver puts the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// Drops them (pure transport).
    Discard,
    /// Copies them into a fresh anonymous mapping, as a destination's
    /// staging image must.
    FreshMemory,
    /// The unavoidable work of a verified migration at both ends: the
    /// sender reads the pages from a memory image of random bytes and
    /// digests each (the BLAKE3 leaf digest the engine uses), the receiver
    /// copies them into fresh memory and digests each again, and both
    /// fold their digests into a Merkle root that must agree.
    VerifiedMemory,
}

/// CPU time each side of a metered raw transfer used
/// ([`Lab::raw_bulk_metered`]).
#[derive(Debug, Clone, Copy)]
pub struct BulkCpu {
    /// The sender's threads.
    pub sender: Duration,
    /// The receiver's threads.
    pub receiver: Duration,
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

/// The page the verified transfer digests, bytes.
const PAGE_BYTES: usize = 4096;
/// The same as a byte count of the stream.
const PAGE: u64 = PAGE_BYTES as u64;

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
    fn new(bytes: u64, streams: u16, connections: u16, sink: Sink) -> Self {
        let streams = streams.max(1);
        Shape {
            streams,
            connections: connections.clamp(1, streams),
            per_stream: bytes / u64::from(streams) / PAGE * PAGE,
            sink,
        }
    }

    /// Pages in `bytes`.
    fn pages(&self, bytes: u64) -> usize {
        convoy_protocol::page::saturating_usize(bytes / PAGE)
    }

    fn total(&self) -> u64 {
        self.per_stream * u64::from(self.streams)
    }
}

impl Lab {
    /// Raw QUIC bulk transfer between two endpoints authenticated exactly
    /// like this lab's agents and tuned with `tuning`: `bytes` over
    /// `streams` unidirectional streams, timed from the first write to the
    /// last byte received, through the impairment relay with `via`
    /// (towards the receiver, and back) when given.
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
        let shape = Shape::new(bytes, streams, connections, sink);
        self.raw_bulk_run(shape, tuning, kind, path, None).await
    }

    /// [`Lab::raw_bulk`] on loopback with each side on a runtime of its
    /// own (two workers, like a lab agent's), the CPU time of each side's
    /// threads measured.
    pub async fn raw_bulk_metered(
        &self,
        bytes: u64,
        streams: u16,
        sink: Sink,
        tuning: &Tuning,
        kind: Kind,
    ) -> Result<(Duration, BulkCpu), LabError> {
        let meters = (CpuMeter::new(), CpuMeter::new());
        let shape = Shape::new(bytes, streams, 1, sink);
        let d = self
            .raw_bulk_run(
                shape,
                tuning,
                kind,
                BulkPath::Loopback(None),
                Some(meters.clone()),
            )
            .await?;
        let cpu = BulkCpu {
            sender: meters.0.total(),
            receiver: meters.1.total(),
        };
        Ok((d, cpu))
    }

    async fn raw_bulk_run(
        &self,
        shape: Shape,
        tuning: &Tuning,
        kind: Kind,
        path: BulkPath,
        meters: Option<(CpuMeter, CpuMeter)>,
    ) -> Result<Duration, LabError> {
        let (na, nb): (AgentName, AgentName) = ("a".parse()?, "b".parse()?);
        let ida = self.pki.identity(Role::Agent, &na)?;
        let idb = self.pki.identity(Role::Agent, &nb)?;
        let server_tls =
            identity::server_config(&idb, &self.trust, &[ALPN_AGENT]).map_err(BenchError::from)?;
        let (addr_tx, addr_rx) = oneshot::channel();
        let send_side = Sender {
            identity: ida,
            peer: idb.id().clone(),
            trust: self.trust.clone(),
            tuning: tuning.clone(),
            kind,
            shape,
            image: match shape.sink {
                Sink::VerifiedMemory => Some(Arc::new(random_image(shape.total())?)),
                Sink::Discard | Sink::FreshMemory => None,
            },
        };
        let (send_meter, recv_meter) = meters.unzip();
        let ((start, sent_root), (received, done, received_root)) = match path {
            BulkPath::Loopback(via) => {
                if via.is_some() && kind == Kind::Tcp {
                    return Err(BenchError::Path("the UDP relay carries QUIC only").into());
                }
                let tuning = tuning.clone();
                let recv = on_own_runtime("bulk-recv", None, recv_meter, move || {
                    receive(server_tls, tuning, Ipv4Addr::LOCALHOST, shape, addr_tx)
                })?;
                let mut addr = addr_rx.await.map_err(|_| BenchError::Lost)?;
                let _relay = match via {
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
                let send =
                    on_own_runtime("bulk-send", None, send_meter, move || send_side.send(addr))?;
                let sent = send.await.map_err(|_| BenchError::Lost)??;
                (sent, recv.await.map_err(|_| BenchError::Lost)??)
            }
            BulkPath::Wan => {
                let wan = self.wan().ok_or(BenchError::Path("not a WAN lab"))?;
                let (ip, tuning) = (wan.b.addr, tuning.clone());
                let recv =
                    on_own_runtime("bulk-recv", Some(&wan.b.netns), recv_meter, move || {
                        receive(server_tls, tuning, ip, shape, addr_tx)
                    })?;
                let addr = addr_rx.await.map_err(|_| BenchError::Lost)?;
                let send =
                    on_own_runtime("bulk-send", Some(&wan.a.netns), send_meter, move || {
                        send_side.send(addr)
                    })?;
                let sent = send.await.map_err(|_| BenchError::Lost)??;
                (sent, recv.await.map_err(|_| BenchError::Lost)??)
            }
        };
        if received != shape.total() {
            return Err(BenchError::Short {
                received,
                total: shape.total(),
            }
            .into());
        }
        if sent_root != received_root {
            return Err(BenchError::Mismatch.into());
        }
        Ok(done - start)
    }
}

/// Runs the future `f` makes and sends its result back on the channel: as
/// a task of the calling runtime, or, in network namespace `netns` or
/// charged to `meter`, on a thread of its own with a runtime of that
/// thread (two workers charged to `meter` when given, else the thread
/// alone); the threads are named after `role`.
fn on_own_runtime<T, F>(
    role: &'static str,
    netns: Option<&str>,
    meter: Option<CpuMeter>,
    f: impl FnOnce() -> F + Send + 'static,
) -> Result<oneshot::Receiver<Result<T, BenchError>>, LabError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, BenchError>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    if netns.is_none() && meter.is_none() {
        // Unmetered on loopback: a task of the calling runtime.
        tokio::spawn(async move {
            let _ = tx.send(f().await);
        });
        return Ok(rx);
    }
    let ns = match netns {
        Some(n) => Some(std::fs::File::open(format!("/run/netns/{n}"))?),
        None => None,
    };
    std::thread::Builder::new()
        .name(format!("{role}@{}", netns.unwrap_or("lo")))
        .spawn(move || {
            let entered = match &ns {
                Some(ns) => super::wan::enter(ns),
                None => Ok(()),
            };
            let runtime = entered.and_then(|()| match &meter {
                Some(m) => {
                    m.enter();
                    let m = m.clone();
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name(role)
                        .enable_all()
                        .on_thread_start(move || m.enter())
                        .on_thread_stop(CpuMeter::leave)
                        .build()
                }
                None => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
            });
            let result = match runtime {
                Ok(rt) => {
                    let r = rt.block_on(f());
                    drop(rt);
                    r
                }
                Err(e) => Err(BenchError::Transport(e.into())),
            };
            CpuMeter::leave();
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
) -> Result<(u64, Instant, Option<Digest>), BenchError> {
    let memory = match shape.sink {
        Sink::Discard => None,
        Sink::FreshMemory | Sink::VerifiedMemory => Some(Arc::new(
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
    // However this returns (a stream failed, a bad index), the acceptors
    // end and the connections close, so the sender is not left waiting.
    let _cleanup = Cleanup(
        acceptors.iter().map(|a| a.abort_handle()).collect(),
        conns.clone(),
    );
    let mut n = 0;
    let mut tree = (shape.sink == Sink::VerifiedMemory)
        .then(|| MerkleTree::filled(shape.pages(shape.total()), Digest([0; 32])));
    for _ in 0..shape.streams {
        let read = rx.recv().await.ok_or(BenchError::Lost)??;
        n += read.bytes;
        if let Some(t) = &mut tree {
            let first = shape.pages(read.index * shape.per_stream);
            for (k, d) in read.leaves.into_iter().enumerate() {
                t.set_leaf(first + k, d);
            }
        }
    }
    for a in acceptors {
        a.abort();
    }
    let root = tree.as_mut().map(MerkleTree::root);
    let done = Instant::now();
    for conn in &conns {
        conn.close(0u32.into(), b"done");
    }
    // The sender hears the close before this side's sockets go.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok((n, done, root))
}

/// Ends a receiver's acceptor tasks and closes its connections when
/// dropped (closing one already closed does nothing).
struct Cleanup(Vec<tokio::task::AbortHandle>, Vec<transport::Connection>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for a in &self.0 {
            a.abort();
        }
        for c in &self.1 {
            c.close(1u32.into(), b"receiver failed");
        }
    }
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

/// What one stream brought.
struct StreamRead {
    /// Bytes of pages (a verified stream's index not counted).
    bytes: u64,
    /// The stream's place: the sender's index on a verified stream, the
    /// order of arrival otherwise.
    index: u64,
    /// The leaf digest of each of its pages, on a verified stream.
    leaves: Vec<Digest>,
}

/// Reads stream `i` to its end (into `memory` at its place when given,
/// digesting each page on a verified stream) and sends what it brought on
/// `tx`.
async fn read_stream(
    mut s: transport::RecvStream,
    i: u64,
    shape: Shape,
    memory: Option<Arc<GuestMemory>>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<StreamRead, BenchError>>,
) {
    let verified = shape.sink == Sink::VerifiedMemory;
    let read = async {
        let mut out = StreamRead {
            bytes: 0,
            index: i,
            leaves: Vec::new(),
        };
        let mut head = Vec::new();
        let mut buf = Vec::new();
        // Whole blocks into fresh memory, as a staging image takes them.
        let block = if verified { PAGE_BYTES } else { 1 << 16 };
        let put = |buf: &mut Vec<u8>, out: &mut StreamRead, all: bool| {
            let whole = if all {
                buf.len() / 8 * 8
            } else {
                buf.len() / block * block
            };
            if let Some(m) = &memory {
                let off = out.index * shape.per_stream + out.bytes;
                m.write(convoy_protocol::page::saturating_usize(off), &buf[..whole]);
            }
            if verified {
                out.leaves
                    .extend(buf[..whole].chunks(PAGE_BYTES).map(leaf_digest));
            }
            out.bytes += whole as u64;
            buf.drain(..whole);
        };
        while let Some(c) = s.read_chunk(1 << 20).await? {
            let mut c = &c[..];
            if verified && head.len() < 8 {
                let take = c.len().min(8 - head.len());
                head.extend_from_slice(&c[..take]);
                c = &c[take..];
                if let Ok(h) = <[u8; 8]>::try_from(head.as_slice()) {
                    out.index = u64::from_le_bytes(h);
                    if out.index >= u64::from(shape.streams) {
                        return Err(BenchError::Path("a stream index out of range"));
                    }
                }
            }
            if memory.is_none() && !verified {
                out.bytes += c.len() as u64;
                continue;
            }
            buf.extend_from_slice(c);
            if buf.len() >= block {
                put(&mut buf, &mut out, false);
            }
        }
        put(&mut buf, &mut out, true);
        out.bytes += buf.len() as u64;
        Ok::<StreamRead, BenchError>(out)
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
    /// What a verified transfer sends: a memory image of random bytes
    /// that exists before the transfer starts, as a VM's memory does
    /// (made outside the sender's meter).
    image: Option<Arc<GuestMemory>>,
}

impl Sender {
    /// Dials `addr` and sends; returns when the first write began, and on
    /// a verified transfer the root of the pages' digests.
    async fn send(self, addr: SocketAddr) -> Result<(Instant, Option<Digest>), BenchError> {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let client = transport::endpoint(any, None, &self.tuning)?;
        let dialer = transport::Dialer::new(client, self.kind.into(), self.tuning.clone());
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
        let mut rng = Xorshift(0x1234_5678_9abc_def1);
        for c in chunk.chunks_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
        }
        let chunk = Bytes::from(chunk);
        let image = self.image;
        let start = Instant::now();
        let mut senders = Vec::new();
        for i in 0..usize::from(self.shape.streams) {
            let mut s = conns[i % conns.len()].open_uni().await?;
            let chunk = chunk.clone();
            let (shape, image) = (self.shape, image.clone());
            senders.push(tokio::spawn(async move {
                let mut leaves = Vec::new();
                let mut done = 0;
                if image.is_some() {
                    s.write_chunk(Bytes::copy_from_slice(&(i as u64).to_le_bytes()))
                        .await?;
                }
                while done < shape.per_stream {
                    let n = usize::try_from(shape.per_stream - done)
                        .map_or(chunk.len(), |l| l.min(chunk.len()));
                    let data = match &image {
                        Some(m) => {
                            let mut buf = vec![0u8; n];
                            let off = i as u64 * shape.per_stream + done;
                            m.read(convoy_protocol::page::saturating_usize(off), &mut buf);
                            leaves.extend(buf.chunks(PAGE_BYTES).map(leaf_digest));
                            Bytes::from(buf)
                        }
                        None => chunk.slice(..n),
                    };
                    s.write_chunk(data).await?;
                    done += n as u64;
                }
                s.finish()?;
                Ok::<_, BenchError>(leaves)
            }));
        }
        let mut tree = image
            .as_ref()
            .map(|_| MerkleTree::filled(self.shape.pages(self.shape.total()), Digest([0; 32])));
        for (i, s) in senders.into_iter().enumerate() {
            let leaves = s.await??;
            if let Some(t) = &mut tree {
                let first = self.shape.pages(i as u64 * self.shape.per_stream);
                for (k, d) in leaves.into_iter().enumerate() {
                    t.set_leaf(first + k, d);
                }
            }
        }
        let root = tree.as_mut().map(MerkleTree::root);
        // Until the receiver has read everything and closed.
        for conn in &conns {
            let _ = conn.closed().await;
        }
        Ok((start, root))
    }
}

/// A memory image of `bytes` random bytes.
fn random_image(bytes: u64) -> Result<GuestMemory, BenchError> {
    let total = convoy_protocol::page::saturating_usize(bytes);
    let m = GuestMemory::new(total).map_err(BenchError::Memory)?;
    let mut rng = Xorshift(0x0bad_cafe_f00d_d00d);
    for i in 0..total / 8 {
        m.store_word(i, rng.next());
    }
    Ok(m)
}

/// The bytes the sender sends: xorshift64, incompressible.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
