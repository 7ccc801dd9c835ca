//! The byte layers of a session, from yamux down to the socket:
//!
//! ```text
//! yamux ── Joined ── TLS (tokio-rustls) ── BufReader ── Counted ── TCP
//! ```
//!
//! Each is there for the number of system calls and TLS records a byte
//! costs, which is most of this transport's CPU beyond the cipher:
//!
//! - [`Joined`]: yamux writes each frame as two writes, its 12-byte header
//!   and then its body, and tokio-rustls seals and sends each write as it
//!   comes — a record and a `sendmsg` for the header alone. `Joined` holds
//!   small writes and sends them with the next write (one vectored write,
//!   so the header and the body share records) or at the next flush,
//!   which yamux calls whenever it has nothing more to send.
//! - The TLS layer is given room for a whole yamux frame of
//!   [`FRAME_BODY`] bytes ([`SEND_BUFFER`]), so a frame is sealed as four
//!   full records and leaves in one vectored write.
//! - `BufReader`: rustls reads at most 4 KiB from its transport per
//!   call; reading the socket through a buffer makes that a copy and
//!   lets one `recvmsg` bring [`READ_BUFFER`] bytes.
//! - [`Counted`]: the bytes and the calls that reach the socket (the
//!   session's idle clock reads the bytes; the tests read the calls). It
//!   passes vectored writes through, so rustls's records leave together.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest TLS record's plaintext.
const RECORD: usize = 16 << 10;
/// yamux's frame header.
const FRAME_HEADER: usize = 12;
/// The most a yamux frame carries: with its header, four full records.
pub(super) const FRAME_BODY: usize = 4 * RECORD - FRAME_HEADER;
/// What TLS may hold sealed and unsent: a whole frame and some.
pub(super) const SEND_BUFFER: usize = 256 << 10;
/// How much one read of the socket may bring.
pub(super) const READ_BUFFER: usize = 128 << 10;
/// Writes this small wait for the next one (a frame header with a short
/// body, a window update).
const SMALL: usize = 64;

/// What reached the socket: bytes each way, and the calls that moved
/// them.
#[derive(Debug, Default)]
pub(crate) struct Wire {
    sent: AtomicU64,
    received: AtomicU64,
    /// Writes that moved bytes.
    writes: AtomicU64,
    /// Reads that moved bytes.
    reads: AtomicU64,
}

impl Wire {
    /// Bytes so far: sent, received.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Calls that moved bytes so far: writes, reads.
    #[cfg(test)]
    pub fn calls(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
        )
    }
}

/// A socket that counts what it carries in a [`Wire`].
#[derive(Debug)]
pub struct Counted<T> {
    inner: T,
    wire: Arc<Wire>,
}

impl<T> Counted<T> {
    pub(super) fn new(inner: T) -> Self {
        Counted {
            inner,
            wire: Arc::default(),
        }
    }

    pub(super) fn wire(&self) -> &Arc<Wire> {
        &self.wire
    }

    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if let Poll::Ready(Ok(n @ 1..)) = r {
            self.wire.sent.fetch_add(*n as u64, Ordering::Relaxed);
            self.wire.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.wire.received.fetch_add(n as u64, Ordering::Relaxed);
            this.wire.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A writer that holds writes of at most [`SMALL`] bytes until the next
/// write or flush, and then sends them with it; reads pass through.
#[derive(Debug)]
pub struct Joined<T> {
    inner: T,
    held: Vec<u8>,
}

impl<T> Joined<T> {
    pub(super) fn new(inner: T) -> Self {
        Joined {
            inner,
            held: Vec::with_capacity(SMALL),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Joined<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> Joined<T> {
    /// Sends what is held.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Joined<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held.len() + buf.len() <= SMALL {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        loop {
            if this.held.is_empty() {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
            let both = [IoSlice::new(&this.held), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &both))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            if n <= this.held.len() {
                // Only (some of) what was held went: `buf` is tried again.
                this.held.drain(..n);
                continue;
            }
            let of_buf = n - this.held.len();
            this.held.clear();
            return Poll::Ready(Ok(of_buf));
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer that records each write it is given and accepts at most
    /// `max` bytes of it (vectored writes across their slices).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        max: usize,
        flushed: usize,
        /// Every other write is refused with Pending first (woken at
        /// once), as a socket that is full now and then.
        stalls: bool,
        stalled: bool,
    }

    impl Recorder {
        /// Whether this write waits: alternately, when `stalls`.
        fn stall(&mut self, cx: &mut Context<'_>) -> bool {
            if !self.stalls {
                return false;
            }
            self.stalled = !self.stalled;
            if self.stalled {
                cx.waker().wake_by_ref();
            }
            self.stalled
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            if this.stall(cx) {
                return Poll::Pending;
            }
            let n = buf.len().min(this.max);
            this.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            if this.stall(cx) {
                return Poll::Pending;
            }
            let mut w = Vec::new();
            for b in bufs {
                let take = b.len().min(this.max - w.len());
                w.extend_from_slice(&b[..take]);
            }
            let n = w.len();
            this.writes.push(w);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.get_mut().flushed += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_header_leaves_with_its_body_and_a_lone_header_at_the_flush() {
        let mut j = Joined::new(Recorder {
            max: usize::MAX,
            ..Recorder::default()
        });
        j.write_all(&[1; FRAME_HEADER]).await.unwrap();
        assert!(j.inner.writes.is_empty(), "a header alone waits");
        j.write_all(&[2; 1000]).await.unwrap();
        assert_eq!(j.inner.writes.len(), 1, "header and body in one write");
        assert_eq!(j.inner.writes[0].len(), FRAME_HEADER + 1000);
        assert_eq!(&j.inner.writes[0][..FRAME_HEADER], &[1; FRAME_HEADER]);
        // A window update: held until the flush, which sends it.
        j.write_all(&[3; FRAME_HEADER]).await.unwrap();
        assert_eq!(j.inner.writes.len(), 1);
        j.flush().await.unwrap();
        assert_eq!(j.inner.writes.len(), 2);
        assert_eq!(j.inner.writes[1], vec![3; FRAME_HEADER]);
        assert_eq!(j.inner.flushed, 1);
        // Shutting down sends what is held, too.
        j.write_all(&[4; 5]).await.unwrap();
        j.shutdown().await.unwrap();
        assert_eq!(j.inner.writes[2], vec![4; 5]);
    }

    #[tokio::test]
    async fn partial_writes_lose_and_repeat_nothing() {
        partial_writes(false).await;
    }

    #[tokio::test]
    async fn partial_writes_that_wait_lose_and_repeat_nothing() {
        // Pending between the parts: while the held bytes are part sent,
        // and before `buf` is.
        partial_writes(true).await;
    }

    async fn partial_writes(stalls: bool) {
        // The inner writer takes 7 bytes at a time: the held bytes go
        // across several writes, and then the rest, in order.
        let mut j = Joined::new(Recorder {
            max: 7,
            stalls,
            ..Recorder::default()
        });
        let mut want = Vec::new();
        for (i, len) in [12usize, 100, 3, 4, 50, 12, 12, 1000, 64, 65]
            .iter()
            .enumerate()
        {
            let b = vec![u8::try_from(i).unwrap(); *len];
            j.write_all(&b).await.unwrap();
            want.extend_from_slice(&b);
        }
        j.flush().await.unwrap();
        assert!(j.held.is_empty());
        let got: Vec<u8> = j.inner.writes.concat();
        assert_eq!(got, want);
        assert!(j.inner.writes.iter().all(|w| w.len() <= 7 && !w.is_empty()));
    }

    #[tokio::test]
    async fn counted_counts_bytes_and_calls_and_keeps_vectored_writes_whole() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Counted::new(a);
        assert!(c.is_write_vectored());
        let parts = [IoSlice::new(b"abc"), IoSlice::new(b"defg")];
        let n = c.write_vectored(&parts).await.unwrap();
        assert_eq!(n, 7, "both slices in one call");
        c.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 9];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdefghi");
        b.write_all(b"xyz").await.unwrap();
        let mut back = [0u8; 3];
        c.read_exact(&mut back).await.unwrap();
        let w = c.wire();
        assert_eq!(w.bytes(), (9, 3));
        assert_eq!(w.calls(), (2, 1));
    }
}
