//! TLS 1.3 over TCP: the transport for networks that drop or throttle UDP.
//!
//! The TLS handshake is the QUIC one's — the same rustls configurations,
//! mutual authentication, SPIFFE identities and ALPNs
//! ([`crate::trust::identity`]). Streams are multiplexed over the TLS
//! connection by yamux (flow control per stream, windows tuned to the
//! bandwidth-delay product within a cap per connection). On top of yamux
//! this module adds what QUIC gives and the engines rely on:
//!
//! - **Stream kinds.** The opener's first byte says bidirectional
//!   ([`StreamKind::Bi`]) or unidirectional, so `accept_bi` and
//!   `accept_uni` see only their kind.
//! - **A clean end is explicit.** Data goes in chunks of `[u32 length]
//!   [bytes]`; `finish` sends a zero length. yamux reports a reset stream
//!   and a lost connection as an end of stream; here a stream that ends
//!   without its zero length is an error, so a cut stream is never taken
//!   for a complete one.
//! - **Closing with a code and a reason.** `close` sends them on a stream
//!   of their own before the connection ends; the peer's streams then fail
//!   with "closed by peer: reason (code N)" as over QUIC.
//! - **Dead peers** are noticed by TCP keep-alives and `TCP_USER_TIMEOUT`
//!   at the QUIC idle timeout.
//!
//! The credit a connection gets (streams, receive window) is fixed when
//! its session starts, after the peer is authorized: an operator's is
//! small, an agent's is a migration's ([`Credit`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::compat::TokioAsyncReadCompatExt;

use io::{Counted, Joined};

mod io;
mod session;
mod stream;

pub use session::Session;
pub use stream::{Pair, RecvHalf, SendHalf};

/// Largest chunk one write sends (a bound for the reader, too).
const MAX_CHUNK: u32 = 1 << 20;
/// Longest close reason sent or read.
const MAX_REASON: usize = 1024;
/// How long an accepted stream may take to say what it is.
const TAG_WITHIN: Duration = Duration::from_secs(30);
/// How long a close waits for its reason to leave before the connection
/// ends anyway.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

const TAG_BI: u8 = b'B';
const TAG_UNI: u8 = b'U';
const TAG_CLOSE: u8 = b'C';
const TAG_KEEPALIVE: u8 = b'K';

/// When a silent session is dead, and when to speak to show it is not.
///
/// TCP's own keep-alives are answered by whatever terminates the TCP
/// connection — a proxy, a relay — not by the peer; the session's own
/// keep-alive (an empty stream) crosses them, as QUIC's does.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Nothing received for this long: the session ends, timed out.
    pub idle: Duration,
    /// Nothing sent for this long: a keep-alive goes.
    pub keep_alive: Duration,
}

impl From<&super::Tuning> for Timing {
    fn from(t: &super::Tuning) -> Self {
        Timing {
            idle: t.idle_timeout,
            keep_alive: t.keep_alive,
        }
    }
}

/// A stream's kind, its first byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Both ways.
    Bi,
    /// Opener to acceptor only.
    Uni,
}

/// What a session lets its peer open and buffer.
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    /// Streams open at once.
    pub streams: usize,
    /// Bytes buffered unread across them.
    pub window: usize,
}

impl Credit {
    /// yamux's smallest window per stream: the connection's must cover it
    /// for every stream.
    const STREAM_FLOOR: usize = 256 << 10;

    fn config(self) -> yamux::Config {
        let streams = self.streams.max(1);
        let mut c = yamux::Config::default();
        c.set_split_send_size(io::FRAME_BODY);
        // Streams first: yamux checks window ≥ streams × 256 KiB at each
        // setter.
        c.set_max_num_streams(streams);
        c.set_max_connection_receive_window(Some(
            self.window.max(streams.saturating_mul(Self::STREAM_FLOOR)),
        ));
        c
    }
}

type Tls = tokio_rustls::TlsStream<tokio::io::BufReader<Counted<tokio::net::TcpStream>>>;

/// The socket under TLS: counted, read through a buffer ([`io`]).
fn socket(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<Counted<tokio::net::TcpStream>> {
    tokio::io::BufReader::with_capacity(io::READ_BUFFER, Counted::new(tcp))
}

/// Keep-alives and a user timeout at `idle`, no Nagle delay.
pub fn tune_socket(s: &tokio::net::TcpStream, idle: Duration) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let probe = (idle / 6).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe)
        .with_retries(5);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keep-alive: {e}");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(idle)) {
        tracing::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// Why a session ended, once it has: shared by the session, its driver
/// and its streams.
#[derive(Debug)]
pub(crate) struct Ended(watch::Sender<Option<quinn::ConnectionError>>);

impl Default for Ended {
    fn default() -> Self {
        Ended(watch::channel(None).0)
    }
}

impl Ended {
    /// Ends the session with `why` unless it has ended already.
    fn end(&self, why: quinn::ConnectionError) {
        self.0.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(why);
                true
            } else {
                false
            }
        });
    }

    fn reason(&self) -> Option<quinn::ConnectionError> {
        self.0.borrow().clone()
    }

    /// Waits until the session ends.
    async fn wait(&self) -> quinn::ConnectionError {
        let mut rx = self.0.subscribe();
        let why = rx.wait_for(Option::is_some).await.map(|s| s.clone());
        why.ok()
            .flatten()
            .unwrap_or(quinn::ConnectionError::LocallyClosed)
    }

    /// The error a stream operation reports: `lost` of the reason once the
    /// session is gone, `alive` while it lives.
    fn lost_or<T>(&self, alive: T, lost: impl FnOnce(quinn::ConnectionError) -> T) -> T {
        match self.reason() {
            Some(e) => lost(e),
            None => alive,
        }
    }
}

/// A TCP connection through its TLS handshake, before its session.
pub struct Handshaken {
    tls: Tls,
    remote: SocketAddr,
}

impl std::fmt::Debug for Handshaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaken")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Handshaken {
    /// Runs the server side of the handshake on an accepted socket.
    pub async fn accept(
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        within: Duration,
    ) -> std::io::Result<Handshaken> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let tls = tokio::time::timeout(within, acceptor.accept(socket(tcp)))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(Handshaken {
            tls: tls.into(),
            remote,
        })
    }

    /// Connects to `addr` and runs the client side of the handshake.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        idle: Duration,
    ) -> std::io::Result<Handshaken> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tune_socket(&tcp, idle);
        let connector = tokio_rustls::TlsConnector::from(tls);
        // Unused by the verifier (the identity is the SPIFFE ID), as for
        // QUIC.
        let name = rustls::pki_types::ServerName::try_from("convoy")
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = connector.connect(name, socket(tcp)).await?;
        Ok(Handshaken {
            tls: tls.into(),
            remote: addr,
        })
    }

    fn common(&self) -> &rustls::CommonState {
        match &self.tls {
            tokio_rustls::TlsStream::Client(c) => c.get_ref().1,
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1,
        }
    }

    /// The negotiated ALPN.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.common().alpn_protocol().map(<[u8]>::to_vec)
    }

    /// The peer's certificate chain.
    pub fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.common()
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
    }

    /// Starts the multiplexed session with `credit`. `shutdown` turning
    /// true closes it (the agent is stopping).
    pub fn session(
        self,
        credit: Credit,
        timing: Timing,
        shutdown: Option<watch::Receiver<bool>>,
    ) -> Session {
        let alpn = self.alpn();
        let chain = self.peer_chain();
        let mode = match &self.tls {
            tokio_rustls::TlsStream::Client(_) => yamux::Mode::Client,
            tokio_rustls::TlsStream::Server(_) => yamux::Mode::Server,
        };
        let mut tls = self.tls;
        let wire = match &mut tls {
            tokio_rustls::TlsStream::Client(c) => {
                c.get_mut().1.set_buffer_limit(Some(io::SEND_BUFFER));
                c.get_ref().0.get_ref().wire().clone()
            }
            tokio_rustls::TlsStream::Server(s) => {
                s.get_mut().1.set_buffer_limit(Some(io::SEND_BUFFER));
                s.get_ref().0.get_ref().wire().clone()
            }
        };
        let conn = yamux::Connection::new(Joined::new(tls).compat(), credit.config(), mode);
        Session::start(
            conn,
            session::Peer {
                remote: self.remote,
                alpn,
                chain,
                wire,
            },
            credit,
            timing,
            shutdown,
        )
    }
}

#[cfg(test)]
mod tests;
