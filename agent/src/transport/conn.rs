//! One connection type over either transport: QUIC (quinn) or TLS 1.3
//! over TCP with streams multiplexed by yamux ([`super::tcp`]).
//!
//! The engines, the operator API and the in-doubt inquiries see
//! [`Connection`], [`SendStream`] and [`RecvStream`], which have the
//! methods of quinn's types that they use. Errors are quinn's types for
//! both transports: their variants say what any stream transport can say
//! (the peer closed with a code and a reason, the connection was reset or
//! timed out, a stream was reset or stopped), so the code that reports
//! them does not change with the transport.
//!
//! What TCP cannot do as QUIC does: stream priorities (ignored: one TCP
//! connection is one byte stream, yamux interleaves frames in order), and
//! per-stream reset codes (a reset ends the whole stream pair, which the
//! peer sees as reset with code 0 — a failure either way, never a clean
//! end). Receive windows are fixed per connection at its start (yamux
//! tunes each stream's window to the bandwidth-delay product within the
//! connection's cap) instead of following the migration budget.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::{ClosedStream, ConnectionError, ReadError, VarInt, WriteError};
use rustls::pki_types::CertificateDer;

use super::tcp;

/// Which transport carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP.
    Tcp,
}

impl Kind {
    /// `"quic"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quic => "quic",
            Kind::Tcp => "tcp",
        }
    }
}

impl From<Kind> for super::Choice {
    /// The dial choice that uses only this transport.
    fn from(k: Kind) -> Self {
        match k {
            Kind::Quic => super::Choice::Quic,
            Kind::Tcp => super::Choice::Tcp,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection has carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes sent on the wire (UDP payloads, or TLS records over TCP).
    pub sent: u64,
    /// Bytes received on the wire.
    pub received: u64,
}

impl Stats {
    /// Both directions.
    pub fn wire_bytes(&self) -> u64 {
        self.sent + self.received
    }
}

/// What the connections a migration closed along the way (a broken link,
/// its lanes) carried, each counted once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    /// Wire bytes, both directions.
    pub wire_bytes: u64,
    /// QUIC packets sent, and declared lost.
    pub sent_packets: u64,
    /// See `sent_packets`.
    pub lost_packets: u64,
}

impl Carried {
    /// Counts what `c` carried (once it is closed for good).
    pub fn add(&mut self, c: &Connection) {
        self.wire_bytes += c.stats().wire_bytes();
        if let Some((_, sent, lost)) = c.quic_path() {
            self.sent_packets += sent;
            self.lost_packets += lost;
        }
    }
}

/// The link `conns` (a migration's first connection, then its lanes) went
/// over, with what `earlier` connections carried: QUIC's figures, or over
/// TCP the shortest control round trip `control_rtt_us` the migration
/// measured (none measured: no report).
pub fn link_report<'a>(
    mut conns: impl Iterator<Item = &'a Connection>,
    earlier: Carried,
    control_rtt_us: u64,
) -> Option<convoy_protocol::ctl::LinkReport> {
    let first = conns.next()?;
    let Some((rtt, sent, lost)) = first.quic_path() else {
        return (control_rtt_us > 0).then_some(convoy_protocol::ctl::LinkReport {
            rtt_us: control_rtt_us,
            sent_packets: None,
            lost_packets: None,
        });
    };
    let (sent, lost) = conns.filter_map(Connection::quic_path).fold(
        (sent + earlier.sent_packets, lost + earlier.lost_packets),
        |(s, l), (_, s2, l2)| (s + s2, l + l2),
    );
    Some(convoy_protocol::ctl::LinkReport {
        rtt_us: convoy_protocol::units::micros(rtt),
        sent_packets: Some(sent),
        lost_packets: Some(lost),
    })
}

/// An authenticated connection over QUIC or TCP.
#[derive(Debug, Clone)]
pub enum Connection {
    /// QUIC.
    Quic(quinn::Connection),
    /// TLS over TCP, multiplexed.
    Tcp(tcp::Session),
}

impl Connection {
    /// Which transport.
    pub fn kind(&self) -> Kind {
        match self {
            Connection::Quic(_) => Kind::Quic,
            Connection::Tcp(_) => Kind::Tcp,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Connection::Tcp(t) => {
                let (s, r) = t.open(tcp::StreamKind::Bi).await?.split();
                Ok((SendStream::Tcp(s), RecvStream::Tcp(r)))
            }
        }
    }

    /// Accepts the peer's next bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Connection::Tcp(t) => {
                let (s, r) = t.accept(tcp::StreamKind::Bi).await?.split();
                Ok((SendStream::Tcp(s), RecvStream::Tcp(r)))
            }
        }
    }

    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<SendStream, ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(SendStream::Quic(c.open_uni().await?)),
            Connection::Tcp(t) => Ok(SendStream::Tcp(
                t.open(tcp::StreamKind::Uni).await?.split().0,
            )),
        }
    }

    /// Accepts the peer's next unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, ConnectionError> {
        match self {
            Connection::Quic(c) => Ok(RecvStream::Quic(c.accept_uni().await?)),
            Connection::Tcp(t) => Ok(RecvStream::Tcp(
                t.accept(tcp::StreamKind::Uni).await?.split().1,
            )),
        }
    }

    /// Closes the connection with `code` and `reason` for the peer.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(code, reason),
            Connection::Tcp(t) => t.close(code, reason),
        }
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> ConnectionError {
        match self {
            Connection::Quic(c) => c.closed().await,
            Connection::Tcp(t) => t.closed().await,
        }
    }

    /// Why the connection is closed, if it is.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match self {
            Connection::Quic(c) => c.close_reason(),
            Connection::Tcp(t) => t.close_reason(),
        }
    }

    /// Bytes carried on the wire so far.
    pub fn stats(&self) -> Stats {
        match self {
            Connection::Quic(c) => {
                let s = c.stats();
                Stats {
                    sent: s.udp_tx.bytes,
                    received: s.udp_rx.bytes,
                }
            }
            Connection::Tcp(t) => {
                let (sent, received) = t.counted();
                Stats { sent, received }
            }
        }
    }

    /// QUIC's smoothed round-trip time and the packets sent and lost so
    /// far (`None` over TCP).
    pub fn quic_path(&self) -> Option<(std::time::Duration, u64, u64)> {
        match self {
            Connection::Quic(c) => {
                let p = c.stats().path;
                Some((p.rtt, p.sent_packets, p.lost_packets))
            }
            Connection::Tcp(_) => None,
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Tcp(t) => t.remote_address(),
        }
    }

    /// The ALPN the handshake negotiated.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Connection::Quic(c) => c
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol),
            Connection::Tcp(t) => t.alpn().map(<[u8]>::to_vec),
        }
    }

    /// The certificate chain the peer presented (verified by rustls at
    /// the handshake).
    pub fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        match self {
            Connection::Quic(c) => c
                .peer_identity()
                .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
                .map(|b| *b),
            Connection::Tcp(t) => t.peer_chain().map(<[CertificateDer<'static>]>::to_vec),
        }
    }

    /// Sets the connection's receive window (QUIC; a TCP connection's is
    /// fixed at its start).
    pub fn set_receive_window(&self, window: VarInt) {
        if let Connection::Quic(c) = self {
            c.set_receive_window(window);
        }
    }

    /// Sets the connection's send window (QUIC; over TCP, yamux's
    /// per-stream credit bounds what is in flight).
    pub fn set_send_window(&self, window: u64) {
        if let Connection::Quic(c) = self {
            c.set_send_window(window);
        }
    }

    /// Raises the streams the peer may open (QUIC; a TCP connection's
    /// limit is fixed at its start).
    pub fn set_max_concurrent_streams(&self, bi: VarInt, uni: VarInt) {
        if let Connection::Quic(c) = self {
            c.set_max_concurrent_bi_streams(bi);
            c.set_max_concurrent_uni_streams(uni);
        }
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub enum SendStream {
    /// QUIC.
    Quic(quinn::SendStream),
    /// A yamux stream over TLS/TCP.
    Tcp(tcp::SendHalf),
}

impl SendStream {
    /// Writes all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_all(data).await,
            SendStream::Tcp(s) => s.write_all(data).await,
        }
    }

    /// Writes all of `chunk`.
    pub async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_chunk(chunk).await,
            SendStream::Tcp(s) => s.write_all(&chunk).await,
        }
    }

    /// Writes all of `chunks`, in order.
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_all_chunks(chunks).await,
            SendStream::Tcp(s) => {
                for c in chunks.iter_mut() {
                    s.write_all(c).await?;
                    *c = Bytes::new();
                }
                Ok(())
            }
        }
    }

    /// Ends the stream cleanly once what was written is sent.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.finish(),
            SendStream::Tcp(s) => s.finish(),
        }
    }

    /// Waits until the peer has what was written (QUIC: acknowledged or
    /// stopped; TCP: the end of the stream is on the wire).
    pub async fn stopped(&mut self) -> Result<Option<VarInt>, ClosedStream> {
        match self {
            SendStream::Quic(s) => s.stopped().await.map_err(|_| ClosedStream::default()),
            SendStream::Tcp(s) => s.stopped().await,
        }
    }

    /// Ends the stream as a failure: the peer never takes it for complete.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.reset(code),
            SendStream::Tcp(s) => {
                s.reset();
                Ok(())
            }
        }
    }

    /// The stream's priority among the connection's (QUIC only).
    pub fn set_priority(&self, priority: i32) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.set_priority(priority),
            SendStream::Tcp(_) => Ok(()),
        }
    }
}

impl tokio::io::AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => tokio::io::AsyncWrite::poll_write(Pin::new(s), cx, buf),
            SendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => tokio::io::AsyncWrite::poll_flush(Pin::new(s), cx),
            SendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => tokio::io::AsyncWrite::poll_shutdown(Pin::new(s), cx),
            SendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub enum RecvStream {
    /// QUIC.
    Quic(quinn::RecvStream),
    /// A yamux stream over TLS/TCP.
    Tcp(tcp::RecvHalf),
}

impl RecvStream {
    /// Reads into `buf`; `None` at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        match self {
            RecvStream::Quic(r) => r.read(buf).await,
            RecvStream::Tcp(r) => r.read(buf).await,
        }
    }

    /// Reads up to `max` bytes; `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        match self {
            RecvStream::Quic(r) => Ok(r.read_chunk(max, true).await?.map(|c| c.bytes)),
            RecvStream::Tcp(r) => r.read_chunk(max).await,
        }
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            RecvStream::Quic(r) => r.stop(code),
            RecvStream::Tcp(r) => {
                r.stop();
                Ok(())
            }
        }
    }
}

impl tokio::io::AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(r) => tokio::io::AsyncRead::poll_read(Pin::new(r), cx, buf),
            RecvStream::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}
