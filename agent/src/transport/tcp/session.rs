//! A TCP session: the handle the engines hold ([`Session`]), and its
//! driver task, which runs the yamux connection: opens what is asked,
//! sorts what the peer opens, keeps the session alive and closes it with a
//! reason.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::io::{AsyncReadExt as _, AsyncWriteExt as _};
use quinn::{ApplicationClose, ConnectionError, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot, watch};

use super::io::Wire;
use super::stream::Pair;
use super::{
    Credit, Ended, StreamKind, Timing, Tls, CLOSE_WITHIN, MAX_REASON, TAG_BI, TAG_CLOSE,
    TAG_KEEPALIVE, TAG_UNI, TAG_WITHIN,
};

/// What a session asks of its driver. When every handle of the session
/// is gone, the channel closes and the driver closes the connection (as
/// quinn does for a dropped connection).
enum Cmd {
    Open(oneshot::Sender<Result<yamux::Stream, ConnectionError>>),
    Close(VarInt, Vec<u8>),
}

/// What the tasks sorting accepted streams tell the driver.
enum Event {
    /// The peer closed (its reason is in the state).
    PeerClosed,
    /// The peer broke the protocol: close with this reason.
    Broken(&'static [u8]),
}

struct Inner {
    bi: tokio::sync::Mutex<mpsc::Receiver<yamux::Stream>>,
    uni: tokio::sync::Mutex<mpsc::Receiver<yamux::Stream>>,
    /// Why the session ended, once it has.
    state: Arc<Ended>,
    remote: SocketAddr,
    alpn: Option<Vec<u8>>,
    chain: Option<Vec<CertificateDer<'static>>>,
    wire: Arc<Wire>,
}

/// A multiplexed TLS/TCP connection (cheap to clone).
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl Inner {
    fn end(&self, why: ConnectionError) {
        self.state.end(why);
    }

    fn close_reason(&self) -> Option<ConnectionError> {
        self.state.reason()
    }

    async fn closed(&self) -> ConnectionError {
        self.state.wait().await
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("remote", &self.inner.remote)
            .field("closed", &self.close_reason())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.close_reason()
    }

    /// Waits until the session ends.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// Closes with `code` and `reason` for the peer.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        if self.close_reason().is_none() {
            let _ = self.cmds.send(Cmd::Close(code, reason.to_vec()));
        }
        self.inner.end(ConnectionError::LocallyClosed);
    }

    /// Opens a stream of `kind`.
    pub async fn open(&self, kind: StreamKind) -> Result<Pair, ConnectionError> {
        if let Some(e) = self.close_reason() {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Open(tx)).is_err() {
            return Err(self.close_reason().unwrap_or(ConnectionError::Reset));
        }
        let mut stream = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(self.close_reason().unwrap_or(ConnectionError::Reset)),
        };
        let tag = match kind {
            StreamKind::Bi => TAG_BI,
            StreamKind::Uni => TAG_UNI,
        };
        if stream.write_all(&[tag]).await.is_err() {
            return Err(self.close_reason().unwrap_or(ConnectionError::Reset));
        }
        Ok(self.pair(stream))
    }

    /// Accepts the peer's next stream of `kind`.
    pub async fn accept(&self, kind: StreamKind) -> Result<Pair, ConnectionError> {
        let queue = match kind {
            StreamKind::Bi => &self.inner.bi,
            StreamKind::Uni => &self.inner.uni,
        };
        let mut queue = queue.lock().await;
        tokio::select! {
            s = queue.recv() => match s {
                Some(stream) => Ok(self.pair(stream)),
                None => Err(self.close_reason().unwrap_or(ConnectionError::Reset)),
            },
            e = self.closed() => Err(e),
        }
    }

    /// Bytes on the wire so far: sent, received.
    pub fn counted(&self) -> (u64, u64) {
        self.inner.wire.bytes()
    }

    /// Socket calls that moved bytes so far: writes, reads.
    #[cfg(test)]
    pub(crate) fn wire_calls(&self) -> (u64, u64) {
        self.inner.wire.calls()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    /// The negotiated ALPN.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.inner.alpn.as_deref()
    }

    /// The peer's certificate chain.
    pub fn peer_chain(&self) -> Option<&[CertificateDer<'static>]> {
        self.inner.chain.as_deref()
    }

    /// A stream of this session: it shares the session's end, and keeps
    /// the session open while it lives (as a quinn stream does).
    fn pair(&self, stream: yamux::Stream) -> Pair {
        Pair {
            stream,
            ended: self.inner.state.clone(),
            keep: Box::new(self.clone()),
        }
    }
}

/// Runs the yamux connection: opens what is asked, sorts what the peer
/// opens, and closes with a reason.
async fn drive(
    mut conn: yamux::Connection<tokio_util::compat::Compat<super::Joined<Tls>>>,
    session: Arc<Inner>,
    timing: Timing,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    bi: mpsc::Sender<yamux::Stream>,
    uni: mpsc::Sender<yamux::Stream>,
) {
    // Accepted streams are numbered as yamux accepts them, their kinds
    // read concurrently, and queued back in that order.
    let (sorted_tx, sorted_rx) = mpsc::unbounded_channel();
    tokio::spawn(in_order(sorted_rx, bi, uni));
    let mut accepted: u64 = 0;
    let mut opens: std::collections::VecDeque<oneshot::Sender<_>> = Default::default();
    // A local close: its reason, then the stream carrying it, then its
    // sending task.
    let mut closing: Option<(VarInt, Vec<u8>)> = None;
    let mut close_opened = false;
    let mut close_deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(
        timing
            .keep_alive
            .min(timing.idle / 3)
            .max(Duration::from_millis(50)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let now = tokio::time::Instant::now();
    let (mut said, mut heard) = session.wire.bytes();
    let (mut said_at, mut heard_at) = (now, now);
    let mut ping_due = false;
    let result = std::future::poll_fn(|cx| {
        while tick.poll_tick(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let (w, r) = session.wire.bytes();
            if r != heard {
                (heard, heard_at) = (r, now);
            } else if now - heard_at >= timing.idle {
                session.end(ConnectionError::TimedOut);
                return Poll::Ready(Err("idle timeout".to_owned()));
            }
            if w != said {
                (said, said_at) = (w, now);
            }
            // A ping when this side was quiet, and also when the peer was:
            // a side that only sends (progress to a waiting operator) must
            // still make the peer answer within its idle timeout.
            if now - said_at >= timing.keep_alive || now - heard_at >= timing.keep_alive {
                ping_due = true;
            }
        }
        if ping_due && closing.is_none() {
            if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                ping_due = false;
                if let Ok(mut s) = r {
                    tokio::spawn(async move {
                        let _ = s.write_all(&[TAG_KEEPALIVE]).await;
                        let _ = s.close().await;
                    });
                }
            }
        }
        while let Poll::Ready(cmd) = cmds.poll_recv(cx) {
            match cmd {
                Some(Cmd::Open(tx)) => opens.push_back(tx),
                Some(Cmd::Close(code, reason)) => {
                    if closing.is_none() {
                        closing = Some((code, reason));
                    }
                }
                // Every handle dropped: closed without a reason.
                None => {
                    if closing.is_none() {
                        session.end(ConnectionError::LocallyClosed);
                        closing = Some((VarInt::from_u32(0), Vec::new()));
                    }
                    break;
                }
            }
        }
        while let Poll::Ready(Some(e)) = events.poll_recv(cx) {
            match e {
                Event::PeerClosed => return Poll::Ready(Ok(())),
                Event::Broken(why) => {
                    if closing.is_none() {
                        session.end(ConnectionError::LocallyClosed);
                        closing = Some((
                            VarInt::from_u32(super::super::close::UNAUTHORIZED),
                            why.to_vec(),
                        ));
                    }
                }
            }
        }
        if let Some((code, reason)) = &closing {
            opens.clear();
            if close_deadline.is_none() {
                close_deadline = Some(Box::pin(tokio::time::sleep(CLOSE_WITHIN)));
            }
            if !close_opened {
                if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    close_opened = true;
                    if let Ok(mut s) = r {
                        let mut msg = vec![TAG_CLOSE];
                        msg.extend_from_slice(&code.into_inner().to_be_bytes());
                        let reason = &reason[..reason.len().min(MAX_REASON)];
                        let len = u16::try_from(reason.len()).unwrap_or(u16::MAX);
                        msg.extend_from_slice(&len.to_be_bytes());
                        msg.extend_from_slice(reason);
                        tokio::spawn(async move {
                            let _ = s.write_all(&msg).await;
                            let _ = s.close().await;
                        });
                    }
                }
            }
            // The close waits for the peer to hang up: closing the socket
            // first, with the peer's last frames unread, would make the
            // kernel answer with a reset, and a reset discards what the
            // peer has not read yet, the reason included. Past the
            // deadline, the session closes anyway.
            let late = close_deadline
                .as_mut()
                .is_some_and(|d| d.as_mut().poll(cx).is_ready());
            if late {
                return conn.poll_close(cx).map(|r| r.map_err(|e| e.to_string()));
            }
        } else {
            while !opens.is_empty() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(r) => {
                        let r = r.map_err(|e| lost(&e));
                        if let Some(tx) = opens.pop_front() {
                            let _ = tx.send(r);
                        }
                    }
                    Poll::Pending => break,
                }
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                // While closing, a stream is read only for the peer's own
                // close (both ends closing at once each wait for the
                // other's).
                Poll::Ready(Some(Ok(s))) => {
                    tokio::spawn(sort(
                        s,
                        accepted,
                        session.clone(),
                        events_tx.clone(),
                        closing.is_none().then(|| sorted_tx.clone()),
                    ));
                    accepted += 1;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.to_string())),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(remote = %session.remote, "TCP session ended: {e}");
    }
    // The peer's close reason may still be in a stream being read.
    if session.close_reason().is_none() {
        let _ = tokio::time::timeout(Duration::from_millis(500), session.closed()).await;
    }
    // A peer that went without closing: the connection was reset.
    session.end(ConnectionError::Reset);
}

fn lost(e: &yamux::ConnectionError) -> ConnectionError {
    match e {
        yamux::ConnectionError::Closed => ConnectionError::LocallyClosed,
        _ => ConnectionError::Reset,
    }
}

/// What an accepted stream turned out to be.
enum Sorted {
    Bi(yamux::Stream),
    Uni(yamux::Stream),
    /// A keep-alive, the peer's close, a stream without a kind in time, or
    /// one accepted while closing: nothing to queue.
    Neither,
}

/// Queues the accepted streams of each kind in the order yamux accepted
/// them (the order the peer opened them), whatever order their kinds were
/// read in — as QUIC hands out a kind's streams in the order of their ids.
/// A peer may rely on it: a QEMU destination takes the first connection
/// the tunnel makes as the main migration channel, and a multifd channel
/// queued ahead of it made QEMU reset the stream.
async fn in_order(
    mut sorted: mpsc::UnboundedReceiver<(u64, Sorted)>,
    bi: mpsc::Sender<yamux::Stream>,
    uni: mpsc::Sender<yamux::Stream>,
) {
    let mut next = 0u64;
    let mut ready = std::collections::BTreeMap::new();
    while let Some((n, s)) = sorted.recv().await {
        ready.insert(n, s);
        while let Some(s) = ready.remove(&next) {
            next += 1;
            match s {
                Sorted::Bi(s) => {
                    let _ = bi.send(s).await;
                }
                Sorted::Uni(s) => {
                    let _ = uni.send(s).await;
                }
                Sorted::Neither => {}
            }
        }
    }
}

/// Reads accepted stream number `n`'s kind and hands it to `sorted` (or
/// takes the peer's close); without `sorted` (a closing session), only
/// the peer's close is taken.
async fn sort(
    mut s: yamux::Stream,
    n: u64,
    session: Arc<Inner>,
    events: mpsc::UnboundedSender<Event>,
    sorted: Option<mpsc::UnboundedSender<(u64, Sorted)>>,
) {
    let mut tag = [0u8; 1];
    let kind = match tokio::time::timeout(TAG_WITHIN, s.read_exact(&mut tag)).await {
        Ok(Ok(())) => take(tag[0], s, &session, &events).await,
        _ => Sorted::Neither,
    };
    if let Some(tx) = sorted {
        let _ = tx.send((n, kind));
    }
}

/// What a stream of kind `tag` is: one to queue, or the peer's close or a
/// keep-alive, taken here.
async fn take(
    tag: u8,
    mut s: yamux::Stream,
    session: &Inner,
    events: &mpsc::UnboundedSender<Event>,
) -> Sorted {
    match tag {
        TAG_BI => Sorted::Bi(s),
        TAG_UNI => Sorted::Uni(s),
        // A keep-alive: its bytes were the point.
        TAG_KEEPALIVE => Sorted::Neither,
        TAG_CLOSE => {
            let read = async {
                let mut code = [0u8; 8];
                s.read_exact(&mut code).await?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await?;
                let len = usize::from(u16::from_be_bytes(len)).min(MAX_REASON);
                let mut reason = vec![0u8; len];
                s.read_exact(&mut reason).await?;
                Ok::<_, std::io::Error>((u64::from_be_bytes(code), reason))
            };
            if let Ok(Ok((code, reason))) = tokio::time::timeout(TAG_WITHIN, read).await {
                session.end(ConnectionError::ApplicationClosed(ApplicationClose {
                    error_code: VarInt::from_u64(code).unwrap_or(VarInt::MAX),
                    reason: reason.into(),
                }));
            } else {
                session.end(ConnectionError::Reset);
            }
            let _ = events.send(Event::PeerClosed);
            Sorted::Neither
        }
        // Not a stream this protocol opens: the peer is broken.
        _ => {
            let _ = events.send(Event::Broken(b"unknown stream kind"));
            Sorted::Neither
        }
    }
}

impl Session {
    /// Runs `conn` as a session (its driver a task of its own).
    pub(super) fn start(
        conn: yamux::Connection<tokio_util::compat::Compat<super::Joined<Tls>>>,
        peer: Peer,
        credit: Credit,
        timing: Timing,
        shutdown: Option<watch::Receiver<bool>>,
    ) -> Session {
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (bi_tx, bi_rx) = mpsc::channel(credit.streams.max(1));
        let (uni_tx, uni_rx) = mpsc::channel(credit.streams.max(1));
        let state = Arc::new(Ended::default());
        let inner = Arc::new(Inner {
            bi: tokio::sync::Mutex::new(bi_rx),
            uni: tokio::sync::Mutex::new(uni_rx),
            state,
            remote: peer.remote,
            alpn: peer.alpn,
            chain: peer.chain,
            wire: peer.wire,
        });
        let session = Session {
            inner: inner.clone(),
            cmds,
        };
        tokio::spawn(drive(conn, inner, timing, cmd_rx, bi_tx, uni_tx));
        if let Some(mut shutdown) = shutdown {
            let s = session.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => {
                        s.close(VarInt::from_u32(0), b"agent shutting down");
                    }
                    _ = s.closed() => {}
                }
            });
        }
        session
    }
}

/// Who is on the other end of a session, and the counters of its TCP
/// connection.
pub(super) struct Peer {
    pub remote: SocketAddr,
    pub alpn: Option<Vec<u8>>,
    pub chain: Option<Vec<CertificateDer<'static>>>,
    pub wire: Arc<Wire>,
}
