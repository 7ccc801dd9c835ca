//! A TCP session's streams: each yamux stream split into a sending and a
//! receiving half, with length-prefixed chunks and an explicit clean end.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::io::{AsyncRead as FRead, AsyncWrite as FWrite};
use quinn::{ClosedStream, ReadError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Ended, MAX_CHUNK};

/// Chunks of at most this many bytes go in one yamux frame with their
/// length prefix.
const JOIN_UP_TO: usize = super::io::FRAME_BODY - 4;

/// The most one [`RecvHalf::read_chunk`] returns, and so the size of the
/// buffer it keeps.
pub(crate) const SPARE_MAX: usize = 256 << 10;

/// An opened or accepted stream, before it is split.
pub struct Pair {
    pub(super) stream: yamux::Stream,
    pub(super) ended: Arc<Ended>,
    /// Keeps the session open while the stream lives.
    pub(super) keep: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Pair {
    /// Its two halves.
    pub fn split(self) -> (SendHalf, RecvHalf) {
        let shared = Arc::new(Shared::new(self.stream, self.ended, self.keep));
        (
            SendHalf {
                shared: shared.clone(),
                header: None,
                joined: Vec::new(),
                closing: None,
                done: false,
            },
            RecvHalf {
                shared,
                left: 0,
                header: [0; 4],
                header_got: 0,
                ended: false,
                stopped: false,
                cutting: None,
                failed: false,
                spare: Vec::new(),
            },
        )
    }
}

struct Shared {
    stream: Mutex<Option<yamux::Stream>>,
    ended: Arc<Ended>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
    wakers: Arc<Wakers>,
    /// Wakes both halves: what the stream is polled with.
    both: std::task::Waker,
}

/// Which half polls.
#[derive(Clone, Copy)]
enum Side {
    Read,
    Write,
}

/// The last waker of each half. A yamux stream's reads and writes both
/// poll its one frame sender, which keeps one waker: polled from two
/// tasks, the last would silence the other. Polled with [`Shared::both`]
/// instead, any wake-up reaches both halves (a spurious one is harmless).
#[derive(Default)]
struct Wakers {
    read: Mutex<Option<std::task::Waker>>,
    write: Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.read, &self.write] {
            let w = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

impl Shared {
    fn new(
        stream: yamux::Stream,
        ended: Arc<Ended>,
        keep: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        let wakers = Arc::new(Wakers::default());
        Shared {
            stream: Mutex::new(Some(stream)),
            ended,
            _keep: keep,
            both: std::task::Waker::from(wakers.clone()),
            wakers,
        }
    }

    /// Runs `f` on the stream for `side`, `None` once it was reset.
    fn with<T>(
        &self,
        side: Side,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut yamux::Stream, &mut Context<'_>) -> T,
    ) -> Option<T> {
        {
            let slot = match side {
                Side::Read => &self.wakers.read,
                Side::Write => &self.wakers.write,
            };
            let mut w = slot.lock().unwrap_or_else(|p| p.into_inner());
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        let mut both = Context::from_waker(&self.both);
        let mut g = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        g.as_mut().map(|s| f(s, &mut both))
    }

    /// Drops the stream: yamux resets one that is still open.
    fn reset(&self) {
        let s = self.stream.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(s);
    }
}

/// The sending half of a TCP stream.
pub struct SendHalf {
    shared: Arc<Shared>,
    /// A chunk's length prefix, partly written.
    header: Option<([u8; 4], usize, usize)>,
    /// A chunk that fits one yamux frame, its prefix first: written as
    /// one frame instead of a 4-byte frame and another.
    joined: Vec<u8>,
    closing: Option<tokio::task::JoinHandle<bool>>,
    done: bool,
}

impl std::fmt::Debug for SendHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHalf")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl SendHalf {
    fn io_error(&self, e: &std::io::Error) -> WriteError {
        tracing::trace!("TCP stream write: {e}");
        self.shared.ended.lost_or(
            WriteError::Stopped(VarInt::from_u32(0)),
            WriteError::ConnectionLost,
        )
    }

    /// Writes up to one chunk of `buf` (its length prefix first).
    fn poll_chunk(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<Result<usize, WriteError>> {
        if self.done {
            return Poll::Ready(Err(WriteError::ClosedStream));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = u32::try_from(buf.len()).map_or(MAX_CHUNK, |n| n.min(MAX_CHUNK));
        // Fits: MAX_CHUNK is far below usize's range.
        let (bytes, mut at, len) = self.header.unwrap_or((n.to_be_bytes(), 0, n as usize));
        let shared = self.shared.clone();
        let joined = &mut self.joined;
        let r = shared.with(Side::Write, cx, |s, cx| -> Poll<std::io::Result<usize>> {
            if at == 0 && len <= JOIN_UP_TO && len <= buf.len() {
                // A copy of at most one frame, to save a frame (and with
                // it a TLS record and a system call at each end).
                joined.clear();
                joined.extend_from_slice(&bytes);
                joined.extend_from_slice(&buf[..len]);
                match Pin::new(&mut *s).poll_write(cx, joined) {
                    Poll::Ready(Ok(k)) if k > 4 => return Poll::Ready(Ok(k - 4)),
                    Poll::Ready(Ok(k)) => at = k,
                    other => return other,
                }
            }
            while at < 4 {
                match Pin::new(&mut *s).poll_write(cx, &bytes[at..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                    }
                    Poll::Ready(Ok(k)) => at += k,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // The prefix promised `len` bytes: write exactly those.
            Pin::new(&mut *s).poll_write(cx, &buf[..len.min(buf.len())])
        });
        match r {
            None => Poll::Ready(Err(WriteError::ClosedStream)),
            Some(Poll::Pending) => {
                self.header = Some((bytes, at, len));
                Poll::Pending
            }
            Some(Poll::Ready(Ok(0))) => {
                Poll::Ready(Err(self.io_error(&std::io::ErrorKind::WriteZero.into())))
            }
            Some(Poll::Ready(Ok(k))) => {
                // A partial body: the rest of this chunk is owed first.
                self.header = if k < len {
                    // The prefix is written (`at` 4): only the length
                    // owed matters now.
                    Some(([0; 4], 4, len - k))
                } else {
                    None
                };
                Poll::Ready(Ok(k))
            }
            Some(Poll::Ready(Err(e))) => Poll::Ready(Err(self.io_error(&e))),
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&mut self, mut data: &[u8]) -> Result<(), WriteError> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_chunk(cx, data)).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends the stream cleanly: the zero-length chunk, then yamux's end,
    /// in the background (as quinn's `finish`).
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        if self.done {
            return Err(ClosedStream::default());
        }
        self.done = true;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(ClosedStream::default());
        };
        let shared = self.shared.clone();
        // A chunk cut short by a cancelled write cannot be completed:
        // then the stream is reset, never ended cleanly.
        let owed = self.header.take();
        self.closing = Some(rt.spawn(async move {
            if owed.is_some() {
                shared.reset();
                return false;
            }
            let mut at = 0;
            let end = [0u8; 4];
            let wrote = std::future::poll_fn(|cx| {
                shared
                    .with(Side::Write, cx, |s, cx| {
                        while at < 4 {
                            match Pin::new(&mut *s).poll_write(cx, &end[at..]) {
                                Poll::Ready(Ok(k)) if k > 0 => at += k,
                                Poll::Ready(_) => return Poll::Ready(false),
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                        Pin::new(&mut *s).poll_close(cx).map(|r| r.is_ok())
                    })
                    .unwrap_or(Poll::Ready(false))
            })
            .await;
            wrote
        }));
        Ok(())
    }

    /// Waits until the end of the stream is on the wire.
    pub async fn stopped(&mut self) -> Result<Option<VarInt>, ClosedStream> {
        match self.closing.take() {
            Some(h) => match h.await {
                Ok(true) => Ok(None),
                _ => Err(ClosedStream::default()),
            },
            None => Err(ClosedStream::default()),
        }
    }

    /// Ends the stream as a failure (both halves: yamux resets a stream,
    /// not one direction).
    pub fn reset(&mut self) {
        self.done = true;
        self.shared.reset();
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        // As quinn: a stream dropped without `finish` or `reset` is
        // finished.
        if !self.done {
            let _ = self.finish();
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .poll_chunk(cx, buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.shared
            .with(Side::Write, cx, |s, cx| Pin::new(s).poll_flush(cx))
            .unwrap_or(Poll::Ready(Ok(())))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.done {
            let _ = this.finish();
        }
        Poll::Ready(Ok(()))
    }
}

/// The receiving half of a TCP stream.
pub struct RecvHalf {
    shared: Arc<Shared>,
    /// Bytes left in the current chunk.
    left: usize,
    header: [u8; 4],
    header_got: usize,
    ended: bool,
    stopped: bool,
    /// A stream cut while the session seemed alive: waiting briefly for
    /// the session's own reason (a peer's close reaches it on a stream of
    /// its own, which may be read after this one fails).
    cutting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    failed: bool,
    /// What [`RecvHalf::read_chunk`] reads into: zeroed once and used
    /// again, so that a read does not zero a whole fresh buffer for the
    /// few bytes yamux may have (empty until that method is first used).
    spare: Vec<u8>,
}

impl std::fmt::Debug for RecvHalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvHalf")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl RecvHalf {
    fn cut(&self) -> ReadError {
        self.shared.ended.lost_or(
            ReadError::Reset(VarInt::from_u32(0)),
            ReadError::ConnectionLost,
        )
    }

    /// Reads into `buf`: `Ok(0)` only at the clean end (or for an empty
    /// `buf`). A cut stream's error names the session's end when it ends
    /// within half a second.
    fn poll_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<Result<usize, ReadError>> {
        if !self.failed && self.cutting.is_none() {
            match self.poll_raw(cx, buf) {
                Poll::Ready(Err(ReadError::Reset(_))) => {
                    let ended = self.shared.ended.clone();
                    self.cutting = Some(Box::pin(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(500), ended.wait()).await;
                    }));
                }
                other => return other,
            }
        }
        if let Some(w) = self.cutting.as_mut() {
            if w.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.cutting = None;
        }
        self.failed = true;
        Poll::Ready(Err(self.cut()))
    }

    /// [`RecvHalf::poll_into`] without the wait for the session's reason.
    fn poll_raw(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<Result<usize, ReadError>> {
        if self.stopped {
            return Poll::Ready(Err(ReadError::ClosedStream));
        }
        if self.ended || buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let shared = self.shared.clone();
        if self.left == 0 {
            let mut header = self.header;
            let mut got = self.header_got;
            let r = shared.with(Side::Read, cx, |s, cx| {
                while got < 4 {
                    match Pin::new(&mut *s).poll_read(cx, &mut header[got..]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(None)),
                        Poll::Ready(Ok(k)) => got += k,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(Some(e))),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Poll::Ready(Ok(()))
            });
            self.header = header;
            self.header_got = got;
            match r {
                None => return Poll::Ready(Err(self.cut())),
                Some(Poll::Pending) => return Poll::Pending,
                Some(Poll::Ready(Err(e))) => {
                    if let Some(e) = e {
                        tracing::trace!("TCP stream read: {e}");
                    }
                    return Poll::Ready(Err(self.cut()));
                }
                Some(Poll::Ready(Ok(()))) => {}
            }
            self.header_got = 0;
            let len = u32::from_be_bytes(self.header);
            if len == 0 {
                self.ended = true;
                return Poll::Ready(Ok(0));
            }
            if len > MAX_CHUNK {
                shared.reset();
                return Poll::Ready(Err(self.cut()));
            }
            // CAST: at most MAX_CHUNK.
            self.left = len as usize;
        }
        let want = buf.len().min(self.left);
        let r = shared.with(Side::Read, cx, |s, cx| {
            Pin::new(&mut *s).poll_read(cx, &mut buf[..want])
        });
        match r {
            None => Poll::Ready(Err(self.cut())),
            Some(Poll::Pending) => Poll::Pending,
            Some(Poll::Ready(Ok(0)) | Poll::Ready(Err(_))) => Poll::Ready(Err(self.cut())),
            Some(Poll::Ready(Ok(k))) => {
                self.left -= k;
                Poll::Ready(Ok(k))
            }
        }
    }

    /// Reads into `buf`; `None` at the clean end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        let n = std::future::poll_fn(|cx| self.poll_into(cx, buf)).await?;
        Ok(if n == 0 && !buf.is_empty() {
            None
        } else {
            Some(n)
        })
    }

    /// Reads up to `max` bytes (at most `SPARE_MAX`, 256 KiB) as a chunk of
    /// their own; `None` at the clean end of the stream. yamux can only
    /// copy into initialised memory, so the bytes go through a buffer
    /// kept for the next call and are copied out at their length.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        let cap = max.min(SPARE_MAX);
        let mut spare = std::mem::take(&mut self.spare);
        if spare.len() < cap {
            spare.resize(cap, 0);
        }
        let chunk = (self.read(&mut spare[..cap]).await)
            .map(|n| n.map(|n| Bytes::copy_from_slice(&spare[..n])));
        self.spare = spare;
        chunk
    }

    /// Reads no more.
    pub fn stop(&mut self) {
        self.stopped = true;
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.poll_into(cx, buf.initialize_unfilled()) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            // As quinn: the stream's error inside the io::Error, for
            // `WireError::from_io`.
            Poll::Ready(Err(e)) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                e,
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}
