//! Transports: QUIC (the tuned quinn endpoint) and TLS 1.3 over TCP
//! ([`tcp`]), one connection type over both ([`Connection`]), dialing by
//! either or both raced ([`dial`]), authorizing accepted peers by ALPN and
//! SPIFFE ID, and framed message I/O on streams. QUIC's congestion
//! controller is chosen in [`congestion`]: by default by the path, CUBIC
//! under a millisecond of RTT and quinn's BBR bounded to the path's
//! delivery rate above.
//!
//! Tuning, measured on a 2-core loopback (see `docs/benchmarks.md`):
//! socket buffers raised to 4 MiB (the 208 KiB default drops packets), GSO
//! left on (quinn-udp's default), path-MTU discovery capped at 6500 bytes
//! (above that GSO batches exceed 64 KiB and quinn falls back to 1200-byte
//! packets), large flow-control windows so one stream can fill a
//! long-fat WAN pipe, a 30 s idle timeout and 5 s keep-alives so a dead
//! peer is noticed while a quiet control stream is not mistaken for one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use convoy_protocol::ctl::CtlMessage;
use convoy_protocol::frame::{frame_len, LEN_PREFIX};
use convoy_protocol::message::{EncodeError, Message};
use convoy_protocol::names::{Role, SpiffeId};
use convoy_protocol::DecodeError;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, TransportConfig, VarInt};
use thiserror::Error;

use crate::trust::identity::{IdentityError, TrustBundle};

pub mod congestion;
mod conn;
pub mod dial;
pub mod tcp;

pub use congestion::Congestion;

pub use conn::{link_report, Carried, Connection, Kind, RecvStream, SendStream, Stats};
pub use dial::{Choice, Dialer};

/// ALPN between agents.
pub const ALPN_AGENT: &[u8] = b"convoy/1";
/// ALPN from `convoyctl` to an agent.
pub const ALPN_CTL: &[u8] = b"convoy-ctl/1";

/// Transport errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Socket setup.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The system has no randomness for a key.
    #[error(transparent)]
    NoRandomness(#[from] NoRandomness),
    /// No tokio runtime to run the endpoint on.
    #[error("QUIC crypto configuration: no async runtime")]
    NoRuntime,
    /// quinn refused the TLS configuration.
    #[error("QUIC crypto configuration: {0}")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// Could not start connecting.
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// The handshake or connection failed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The peer's identity is unusable or not allowed here.
    #[error("peer refused: {0}")]
    Unauthorized(#[from] PeerRefused),
    /// The TCP connection or its TLS handshake failed.
    #[error("TCP: {0}")]
    Tcp(std::io::Error),
    /// Both transports failed (a raced dial).
    #[error("QUIC: {quic}; TCP: {tcp}")]
    Both {
        /// Why QUIC failed.
        quic: Box<TransportError>,
        /// Why TCP failed.
        tcp: Box<TransportError>,
    },
}

/// The system has no randomness for a key.
#[derive(Debug, Error)]
#[error("QUIC crypto configuration: no system randomness")]
pub struct NoRandomness;

/// Why an accepted peer is refused ([`authorize_peer`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PeerRefused {
    /// The handshake negotiated no ALPN.
    #[error("no ALPN negotiated")]
    NoAlpn,
    /// The peer presented no certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// The peer's certificate chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// The chain does not lead to the CA of the domain it claims (the
    /// trust bundle's account of why).
    #[error("{0}")]
    Chain(convoy_protocol::signed::ChainError),
    /// An ALPN that is neither an agent's nor an operator's.
    #[error("unknown ALPN")]
    UnknownAlpn,
    /// The identity's role does not speak that ALPN.
    #[error("{id} may not use {}", String::from_utf8_lossy(.alpn))]
    WrongRole {
        /// The peer.
        id: SpiffeId,
        /// The ALPN it negotiated.
        alpn: Vec<u8>,
    },
}

/// Why a key file (the stateless-reset key, the sealing key) could not be
/// read or made ([`key_file`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ResetKeyError {
    /// The file holds something other than a key.
    #[error(
        "{}: {len} bytes where a key of 32 was expected (the file is left as it is)",
        .path.display()
    )]
    WrongSize {
        /// The key file.
        path: std::path::PathBuf,
        /// Its size.
        len: usize,
    },
    /// No randomness for a new key.
    #[error(transparent)]
    Random(#[from] NoRandomness),
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The key file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Errors of framed stream I/O.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WireError {
    /// Reading failed.
    #[error("read: {}", read_detail(.0))]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("write: {}", write_detail(.0))]
    Write(#[from] quinn::WriteError),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The bytes are not a valid message.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// The stream is closed.
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
    /// Reading a stream that is not QUIC failed.
    #[error("read: {0}")]
    Io(std::io::Error),
}

impl WireError {
    /// A read error from a stream's `AsyncRead`: QUIC's own error when
    /// the stream is QUIC's (quinn wraps it in the `io::Error`).
    fn from_io(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|i| i.downcast_ref::<quinn::ReadError>())
        {
            Some(read) => WireError::Read(read.clone()),
            None => WireError::Io(e),
        }
    }
}

/// A read error with the reason a lost connection was lost (timed out,
/// reset, closed by the peer), which operators need to tell a dead host
/// from a restarted or a refusing one.
fn read_detail(e: &quinn::ReadError) -> String {
    match e {
        quinn::ReadError::ConnectionLost(c) => format!("connection lost: {c}"),
        other => other.to_string(),
    }
}

/// As [`read_detail`], for writes.
fn write_detail(e: &quinn::WriteError) -> String {
    match e {
        quinn::WriteError::ConnectionLost(c) => format!("connection lost: {c}"),
        other => other.to_string(),
    }
}

/// Transport tuning.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// UDP socket send and receive buffer, bytes.
    pub socket_buffer: usize,
    /// Upper bound for path-MTU discovery, bytes of UDP payload.
    pub max_udp_payload: u16,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Per-stream receive window, bytes.
    pub stream_window: u32,
    /// Per-connection receive and send window, bytes.
    pub connection_window: u32,
    /// How long a connection attempt (handshake included) may take.
    pub connect_timeout: Duration,
    /// QUIC's congestion controller.
    pub congestion: Congestion,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            socket_buffer: 4 << 20,
            max_udp_payload: 6500,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            congestion: Congestion::default(),
        }
    }
}

impl Tuning {
    /// The quinn transport configuration.
    pub fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        // Fits: 30 s is far below VarInt's range.
        t.max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t.keep_alive_interval(Some(self.keep_alive));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.connection_window));
        t.send_window(u64::from(self.connection_window));
        t.max_concurrent_uni_streams(VarInt::from_u32(MIGRATION_STREAMS));
        t.max_concurrent_bidi_streams(VarInt::from_u32(MIGRATION_STREAMS));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        t.congestion_controller_factory(self.congestion.factory());

        t
    }
}

/// The key of an endpoint's QUIC stateless resets.
///
/// A peer keeps, for each connection ID we issued, a token derived from
/// this key. When our process restarts and a packet of a connection it no
/// longer knows arrives, the new endpoint answers with that token, and the
/// peer ends the connection at once instead of after its 30 s idle
/// timeout (which a lost `CONNECTION_CLOSE`, or a killed process, would
/// otherwise leave it to). That only works if the key survives the
/// restart, so an agent with a state directory keeps it there
/// ([`ResetKey::load_or_create`]); without one the key is random per run.
pub struct ResetKey([u8; 32]);

impl ResetKey {
    /// A fresh random key.
    pub fn random() -> Result<Self, NoRandomness> {
        let mut k = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
            .map_err(|_| NoRandomness)?;
        Ok(ResetKey(k))
    }

    /// Reads the key at `path`, or makes one there (mode 0600) if there is
    /// no file. A file of the wrong size is an error, never replaced.
    pub fn load_or_create(path: &std::path::Path) -> Result<Self, ResetKeyError> {
        key_file(path).map(ResetKey)
    }
}

/// Reads the 32-byte secret at `path`, or draws one and writes it there
/// (mode 0600, synced) if there is no file. A file of the wrong size is an
/// error, never replaced: it may be a key someone still needs.
pub fn key_file(path: &std::path::Path) -> Result<[u8; 32], ResetKeyError> {
    use std::io::Write;
    let io = |source| ResetKeyError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| ResetKeyError::WrongSize {
                path: path.to_owned(),
                len: bytes.len(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = ResetKey::random()?.0;
            let mut f = std::fs::OpenOptions::new();
            f.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
            let written = f
                .open(path)
                .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()));
            written.map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

/// Binds a UDP socket with raised buffers and makes a quinn endpoint that
/// serves `server` (if any) and can connect out.
pub fn endpoint(
    bind: SocketAddr,
    server: Option<rustls::ServerConfig>,
    tuning: &Tuning,
) -> Result<Endpoint, TransportError> {
    endpoint_with_reset_key(bind, server, tuning, &ResetKey::random()?)
}

/// Binds a QUIC endpoint and a TCP listener on the same port of `listen`'s
/// address. With port 0 the kernel picks the UDP port, and a TCP port that
/// is taken means another pick.
pub fn bind_both(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    tuning: &Tuning,
    reset_key: &ResetKey,
) -> Result<(Endpoint, tokio::net::TcpListener), TransportError> {
    let tries = if listen.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let endpoint = endpoint_with_reset_key(listen, Some(tls.clone()), tuning, reset_key)?;
        let addr = endpoint.local_addr()?;
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok((endpoint, l)),
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::Tcp(
        last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
    ))
}

/// [`endpoint`], with the stateless-reset key given (an agent's, kept
/// across restarts).
pub fn endpoint_with_reset_key(
    bind: SocketAddr,
    server: Option<rustls::ServerConfig>,
    tuning: &Tuning,
    reset: &ResetKey,
) -> Result<Endpoint, TransportError> {
    let domain = if bind.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at rmem_max/wmem_max.
    if let Err(e) = sock.set_recv_buffer_size(tuning.socket_buffer) {
        tracing::warn!("cannot raise UDP receive buffer: {e}");
    }
    if let Err(e) = sock.set_send_buffer_size(tuning.socket_buffer) {
        tracing::warn!("cannot raise UDP send buffer: {e}");
    }
    sock.bind(&bind.into())?;
    let server_config = match server {
        Some(tls) => Some(quic_server_config(tls, tuning)?),
        None => None,
    };
    let runtime = quinn::default_runtime().ok_or(TransportError::NoRuntime)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset.0);
    // Connection IDs are keyed too (quinn drops a packet whose ID its
    // generator does not recognise before it would reset): the key is
    // derived from the reset key, so a restarted agent recognises the IDs
    // its previous run issued, and answers them with a reset.
    let tag = ring::hmac::sign(&reset_key, b"convoy quic connection-id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(Endpoint::new(config, server_config, sock.into(), runtime)?)
}

/// Bidirectional streams a connection may open before it is authorized
/// (its credit at the handshake): enough for operator requests and a
/// migration's control stream.
pub const HANDSHAKE_STREAMS: u32 = 8;
/// Bytes a connection may have buffered here, unread, before it is
/// authorized: a few of the largest requests (a migrate request carries a
/// ticket and its chain; a proposal, its manifest).
pub const HANDSHAKE_WINDOW: u32 = 1 << 20;

/// The quinn server configuration for a rustls one (also used to swap in
/// reloaded certificates and CRLs on a running endpoint).
///
/// The credit a client gets at the handshake is small
/// ([`HANDSHAKE_STREAMS`] bidirectional streams, no unidirectional one,
/// [`HANDSHAKE_WINDOW`] bytes): QUIC's transport parameters are one set
/// per endpoint, sent before anyone knows whether the client is an
/// operator or an agent, and credit once granted cannot be taken back. A
/// connection authorized for migrations gets the migration credit
/// afterwards ([`grant_migration_credit`]).
pub fn quic_server_config(
    tls: rustls::ServerConfig,
    tuning: &Tuning,
) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = tuning.transport_config();
    t.receive_window(VarInt::from_u32(
        HANDSHAKE_WINDOW.min(tuning.connection_window),
    ));
    t.max_concurrent_bidi_streams(VarInt::from_u32(HANDSHAKE_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    sc.transport_config(Arc::new(t));
    Ok(sc)
}

/// Raises an accepted connection's credit from the handshake's to a
/// migration's (the streams and the window of `tuning`); the migration
/// budget then sets its window share ([`crate::host::budget`]). Call only
/// once the peer is authorized to migrate.
pub fn grant_migration_credit(conn: &Connection, tuning: &Tuning) {
    conn.set_max_concurrent_streams(
        VarInt::from_u32(MIGRATION_STREAMS),
        VarInt::from_u32(MIGRATION_STREAMS),
    );
    conn.set_receive_window(VarInt::from_u32(tuning.connection_window));
}

/// Streams of each kind a migration connection may have open at once.
pub(crate) const MIGRATION_STREAMS: u32 = 64;

/// Connects to `addr` over QUIC alone, accepting only a server that
/// proves `expected` (agents and `convoyctl` dial through a [`Dialer`]).
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    expected: SpiffeId,
    alpn: &[u8],
    identity: &crate::trust::identity::Identity,
    trust: &TrustBundle,
    tuning: &Tuning,
) -> Result<Connection, TransportError> {
    Dialer::new(endpoint.clone(), Choice::Quic, tuning.clone())
        .connect(addr, expected, alpn, identity, trust)
        .await
}

/// Who is on the other end of an accepted connection, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its SPIFFE ID (from a certificate chain already verified by rustls).
    pub id: SpiffeId,
    /// The ALPN it negotiated.
    pub alpn: Vec<u8>,
}

/// Whether a QUIC handshake ended because the peer closed it. A dialer
/// that raced QUIC against TCP and went with TCP drops its QUIC attempt,
/// which closes it with an application's code (sent during a handshake as
/// a transport close with `APPLICATION_ERROR`, RFC 9000 §10.2.3). The agent
/// refused nothing; a peer refusing the agent's certificate closes with a
/// TLS alert's code instead, and that stays a refusal.
pub fn quic_handshake_abandoned(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ApplicationClosed(_) => true,
        quinn::ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
        }
        _ => false,
    }
}

/// Whether a TLS-over-TCP handshake ended because the peer hung up before
/// finishing it: the loser of a dial race, or a port probe. A handshake
/// the agent refused ends in `InvalidData` (a certificate, an alert), one
/// that took too long in `TimedOut`; both stay refusals.
pub fn tcp_handshake_abandoned(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Reads the verified peer identity and ALPN of a connection and checks the
/// peer may use that ALPN: agents (`/agent/…`) speak `convoy/1`, operators
/// (`/operator/…`) speak `convoy-ctl/1`, both from our trust domain.
pub fn authorize_peer(conn: &Connection, trust: &TrustBundle) -> Result<Peer, TransportError> {
    authorize(conn.alpn(), conn.peer_chain(), trust)
}

/// [`authorize_peer`] on what a handshake gave: the negotiated ALPN and
/// the peer's certificate chain.
pub fn authorize(
    alpn: Option<Vec<u8>>,
    chain: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    trust: &TrustBundle,
) -> Result<Peer, TransportError> {
    let alpn = alpn.ok_or(PeerRefused::NoAlpn)?;
    let chain = chain.ok_or(PeerRefused::NoCertificate)?;
    let leaf = chain.first().ok_or(PeerRefused::EmptyChain)?;
    // The handshake accepted a chain to any trusted CA; the chain must lead
    // to the CA of the domain the identity claims (and a federated
    // identity must be one of those named).
    let id = trust
        .verify_peer(
            leaf,
            &chain[1..],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(PeerRefused::Chain)?;
    let wanted = if alpn == ALPN_AGENT {
        Role::Agent
    } else if alpn == ALPN_CTL {
        Role::Operator
    } else {
        return Err(PeerRefused::UnknownAlpn.into());
    };
    if id.role() != wanted {
        return Err(PeerRefused::WrongRole { id, alpn }.into());
    }
    Ok(Peer { id, alpn })
}

/// Reads one frame (tag and body, without the length prefix); `Ok(None)`
/// at a clean end of stream.
///
/// Generic over the stream so that engine parts can be tested over
/// [`tokio::io::duplex`] with paused time ([`crate::engine::clock`]); on a
/// QUIC stream the QUIC read error comes back as [`WireError::Read`].
async fn read_frame<R>(recv: &mut R) -> Result<Option<Vec<u8>>, WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut prefix = [0u8; LEN_PREFIX];
    match fill(recv, &mut prefix).await? {
        0 => return Ok(None),
        LEN_PREFIX => {}
        _ => return Err(WireError::Truncated),
    }
    // Checked against the hard limit before anything is allocated.
    let len = frame_len(prefix).map_err(DecodeError::from)?;
    let mut buf = vec![0u8; len];
    if fill(recv, &mut buf).await? != len {
        return Err(WireError::Truncated);
    }
    Ok(Some(buf))
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
async fn fill<R>(recv: &mut R, buf: &mut [u8]) -> Result<usize, WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    while n < buf.len() {
        match recv.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(WireError::from_io(e)),
        }
    }
    Ok(n)
}

/// Reads one migration message; `Ok(None)` at a clean end of stream.
pub async fn read_message<R>(recv: &mut R) -> Result<Option<Message>, WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match read_frame(recv).await? {
        Some(buf) => Ok(Some(Message::decode(Bytes::from(buf))?)),
        None => Ok(None),
    }
}

/// Reads one operator protocol frame; `Ok(None)` at a clean end of stream.
pub async fn read_ctl<R>(recv: &mut R) -> Result<Option<CtlMessage>, WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    match read_frame(recv).await? {
        Some(buf) => Ok(Some(CtlMessage::decode(&buf)?)),
        None => Ok(None),
    }
}

/// Writes one encoded frame; returns the bytes written.
async fn write_frame(send: &mut SendStream, bytes: Vec<u8>) -> Result<usize, WireError> {
    let n = bytes.len();
    send.write_chunk(Bytes::from(bytes)).await?;
    Ok(n)
}

/// Writes one migration message; returns the bytes written.
pub async fn write_message(send: &mut SendStream, msg: &Message) -> Result<usize, WireError> {
    write_frame(send, msg.encode()?).await
}

/// Writes one operator protocol frame; returns the bytes written.
pub async fn write_ctl(send: &mut SendStream, msg: &CtlMessage) -> Result<usize, WireError> {
    write_frame(send, msg.encode()?).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::ResetKey;

    #[test]
    fn only_a_peer_hanging_up_abandons_a_handshake() {
        use quinn::{ConnectionClose, ConnectionError, TransportErrorCode};
        let closed = |error_code| {
            ConnectionError::ConnectionClosed(ConnectionClose {
                error_code,
                frame_type: None,
                reason: bytes::Bytes::new(),
            })
        };
        // The dialer dropped its attempt (quinn sends that as
        // APPLICATION_ERROR while the handshake runs).
        assert!(super::quic_handshake_abandoned(&closed(
            TransportErrorCode::APPLICATION_ERROR
        )));
        // The peer refused our certificate (a TLS alert), or the
        // handshake broke the protocol, or went silent: refusals.
        for e in [
            closed(TransportErrorCode::crypto(42)),
            closed(TransportErrorCode::PROTOCOL_VIOLATION),
            ConnectionError::TimedOut,
            ConnectionError::VersionMismatch,
        ] {
            assert!(!super::quic_handshake_abandoned(&e), "{e}");
        }
        use std::io::{Error, ErrorKind};
        for k in [ErrorKind::UnexpectedEof, ErrorKind::ConnectionReset] {
            assert!(super::tcp_handshake_abandoned(&Error::from(k)), "{k}");
        }
        for k in [ErrorKind::InvalidData, ErrorKind::TimedOut] {
            assert!(!super::tcp_handshake_abandoned(&Error::from(k)), "{k}");
        }
    }

    #[test]
    fn the_reset_key_survives_a_restart_and_a_bad_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quic-reset.key");
        let first = ResetKey::load_or_create(&path).unwrap();
        let again = ResetKey::load_or_create(&path).unwrap();
        assert_eq!(first.0, again.0, "a restart must reuse the key");
        assert_ne!(first.0, ResetKey::random().unwrap().0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"short").unwrap();
        let e = ResetKey::load_or_create(&path).unwrap_err();
        assert!(
            matches!(e, super::ResetKeyError::WrongSize { len: 5, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("5 bytes"), "{e}");
        // Left as it was for the operator to look at.
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }
}

/// QUIC application close codes.
pub(crate) mod close {
    /// The peer is not allowed here.
    pub const UNAUTHORIZED: u32 = 0x10;
    /// Too many connections (in total, or from this identity).
    pub const BUSY: u32 = 0x11;
    /// The peer sent nothing within the deadline.
    pub const TIMED_OUT: u32 = 0x12;
    /// This side gave the link up as broken and dials again (a
    /// migration's recovery): the peer waits for it rather than ending
    /// the migration.
    pub const LINK_LOST: u32 = 0x13;
    /// Normal end.
    pub const DONE: u32 = 0;
}
