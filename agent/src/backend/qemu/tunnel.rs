//! Carrying a byte stream — QEMU's migration stream, its return path, an
//! NBD connection — between a local unix socket and an authenticated QUIC
//! stream, both directions at once, with a BLAKE3 digest and a count of
//! every byte carried each way. Both agents compute the same digests over
//! the same bytes; receipts bind them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Copy buffer per direction.
const BUF: usize = 256 << 10;

/// What went one way through a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    /// Bytes.
    pub bytes: u64,
    /// BLAKE3 of all of them, in order.
    pub digest: [u8; 32],
}

/// Both directions of one spliced stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// From the local socket to the peer.
    pub out: Carried,
    /// From the peer to the local socket.
    pub back: Carried,
}

/// The last bytes sent one way, kept so that after a cut the digest of
/// any prefix the peer may have received can be computed: a hasher that
/// lags `limit` bytes behind, and the bytes since. Bytes in flight are
/// bounded by the transport's windows, so a prefix the peer holds ends
/// within the tail when `limit` covers them.
#[derive(Debug, Clone)]
pub struct Tail {
    behind: blake3::Hasher,
    behind_bytes: u64,
    chunks: std::collections::VecDeque<Vec<u8>>,
    held: usize,
    limit: usize,
}

impl Tail {
    /// A tail that keeps at least the last `limit` bytes.
    pub fn new(limit: usize) -> Tail {
        Tail {
            behind: blake3::Hasher::new(),
            behind_bytes: 0,
            chunks: std::collections::VecDeque::new(),
            held: 0,
            limit,
        }
    }

    fn push(&mut self, b: &[u8]) {
        self.chunks.push_back(b.to_vec());
        self.held += b.len();
        while let Some(front) = self.chunks.front() {
            if self.held - front.len() < self.limit {
                break;
            }
            self.behind.update(front);
            self.behind_bytes += front.len() as u64;
            self.held -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Keeps `b` as if it were sent (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn push_for_test(&mut self, b: &[u8]) {
        self.push(b);
    }

    /// Every byte taken to send, including any whose write failed.
    pub fn total(&self) -> u64 {
        self.behind_bytes + self.held as u64
    }

    /// The digest of the first `n` bytes sent; `None` when `n` is past
    /// what was sent or before what the tail still holds.
    pub fn prefix(&self, n: u64) -> Option<[u8; 32]> {
        if n < self.behind_bytes || n > self.total() {
            return None;
        }
        let mut h = self.behind.clone();
        let mut left = n - self.behind_bytes;
        for c in &self.chunks {
            if left == 0 {
                break;
            }
            let take = usize::try_from(left).map_or(c.len(), |l| l.min(c.len()));
            h.update(&c[..take]);
            left -= take as u64;
        }
        Some(h.finalize().into())
    }
}

/// How far one channel's sender may run ahead of what the far QEMU has
/// read: a window per channel, kept by the far agent's reports
/// ([`Credit::read`]). QUIC's own credit is granted as the far *agent*
/// reads, up to a whole stream window (16 MiB) beyond, and the far QEMU
/// may read more slowly than the link delivers: what waits in between
/// must still be read after the source QEMU is done, inside the
/// downtime. A window shared by the channels would not do: QEMU's multifd
/// receivers stop reading at each sync until the main channel catches up,
/// and their unread bytes could hold all the credit the main channel
/// needs.
#[derive(Debug)]
pub struct Credit {
    read: AtomicU64,
    limit: AtomicU64,
    more: tokio::sync::Notify,
}

impl Credit {
    /// A channel's credit, `limit` bytes ahead of what was read.
    pub fn new(limit: u64) -> Arc<Credit> {
        Arc::new(Credit {
            read: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            more: tokio::sync::Notify::new(),
        })
    }

    /// The far QEMU has read `bytes` of the channel (a report that goes
    /// back counts for nothing).
    pub fn read(&self, bytes: u64) {
        if self.read.fetch_max(bytes, Ordering::AcqRel) < bytes {
            self.more.notify_waiters();
        }
    }

    /// What the far QEMU has read, as reported.
    pub fn reported(&self) -> u64 {
        self.read.load(Ordering::Acquire)
    }

    /// Sets how far ahead of what was read the sender may be.
    pub fn set_limit(&self, limit: u64) {
        if self.limit.swap(limit, Ordering::AcqRel) < limit {
            self.more.notify_waiters();
        }
    }

    /// Waits until `sent` is within the limit of what was read.
    pub(crate) async fn wait(&self, sent: u64) {
        loop {
            let more = self.more.notified();
            let ahead = sent.saturating_sub(self.read.load(Ordering::Acquire));
            if ahead < self.limit.load(Ordering::Acquire) {
                return;
            }
            more.await;
        }
    }
}

/// What a splice is told beyond its streams: the credit its out direction
/// keeps to, whom to tell how much its back direction has written and
/// when its out direction has ended, and whether the local end may close
/// first.
#[derive(Clone, Default)]
pub struct Pacing {
    /// The out direction sends only within it (none: as QUIC allows).
    pub credit: Option<Arc<Credit>>,
    /// Called with the back direction's total bytes written after each
    /// write (the near QEMU read them).
    pub delivered: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    /// Called once the out direction has ended cleanly (the local end's
    /// end of stream read, the peer's stream finished), with what it
    /// carried: final, whatever the back direction still does.
    pub sent: Option<Arc<dyn Fn(Carried) + Send + Sync>>,
    /// The local end may close before the peer's bytes end, some of them
    /// unread: a destination QEMU that has loaded the whole stream closes
    /// its channels, and QEMU 7.2's multifd sender can follow a channel's
    /// last sync packet with an empty one that the receiver never reads
    /// (its socket then resets ours). With this set, a reset of the local
    /// socket ends the out direction like an end of stream, and the back
    /// direction, once the local socket is closed, goes on reading what
    /// the peer sends and counts it without writing it: both agents hash
    /// the same bytes, and whether the stream was complete is QEMU's to say
    /// (its migration status; a QEMU that failed to load exits).
    pub local_may_close: bool,
}

impl std::fmt::Debug for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacing")
            .field("credit", &self.credit)
            .field("delivered", &self.delivered.is_some())
            .field("sent", &self.sent.is_some())
            .field("local_may_close", &self.local_may_close)
            .finish()
    }
}

/// What one direction carried so far: it survives the pump's future, so
/// a direction stopped by the other's failure still says what it carried.
struct Count {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Count {
    fn new() -> Count {
        Count {
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    fn carried(&self) -> Carried {
        Carried {
            bytes: self.bytes,
            digest: self.hasher.finalize().into(),
        }
    }
}

/// Which end of a pump is the local socket, when it may close first
/// ([`Pacing::local_may_close`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalEnd {
    /// Neither may close first: any error is the splice's failure.
    Strict,
    /// The pump reads from the local socket: its reset is its end.
    Reads,
    /// The pump writes to the local socket: once it is closed, what comes
    /// is read and counted, not written.
    Writes,
}

/// Whether `e` says the local socket was closed by the other process.
fn closed_by_peer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// How one direction of a splice goes: the credit its reads wait for,
/// whom its writes are told to, and which of its ends may close first.
struct Direction<'p> {
    credit: Option<&'p Credit>,
    delivered: Option<&'p (dyn Fn(u64) + Send + Sync)>,
    local: LocalEnd,
}

/// Copies `from` to `to` until `from` ends, counting in `count` what was
/// written; with a `tail`, every byte read is kept there first; `how`
/// says what reading waits for, whom each write is told and which end may
/// close first.
async fn pump<R, W>(
    mut from: R,
    to: &mut W,
    count: &mut Count,
    mut tail: Option<&mut Tail>,
    how: Direction<'_>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    // Bytes counted after the local socket closed (never written).
    let mut dropped: Option<u64> = None;
    let local = how.local;
    loop {
        if let Some(c) = how.credit {
            c.wait(count.bytes).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            Err(e) if local == LocalEnd::Reads && closed_by_peer(&e) => {
                tracing::info!(
                    bytes = count.bytes,
                    "the local end reset its channel: taken as its end"
                );
                0
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            if let Some(d) = dropped.filter(|d| *d > 0) {
                tracing::info!(
                    bytes = count.bytes,
                    "{d} bytes came after the local end closed its channel: counted, not written"
                );
            }
            return Ok(());
        }
        if let Some(t) = tail.as_deref_mut() {
            t.push(&buf[..n]);
        }
        // Counted as each part is written, so a write cut part way (the
        // other direction failed, and this future is dropped) still counts
        // what reached `to`.
        let mut off = 0;
        while off < n {
            if let Some(d) = dropped.as_mut() {
                count.hasher.update(&buf[off..n]);
                count.bytes += (n - off) as u64;
                *d += (n - off) as u64;
                break;
            }
            let k = match to.write(&buf[off..n]).await {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if local == LocalEnd::Writes && closed_by_peer(&e) => {
                    tracing::info!(
                        bytes = count.bytes,
                        "the local end closed its channel: the rest is counted, not written"
                    );
                    dropped = Some(0);
                    continue;
                }
                Err(e) => return Err(e),
            };
            count.hasher.update(&buf[off..off + k]);
            count.bytes += k as u64;
            off += k;
        }
        if let (Some(tell), None) = (how.delivered, dropped) {
            tell(count.bytes);
        }
    }
}

/// QUIC error code for a stream cut by a failure (never a clean end).
pub const CUT: u32 = 1;

/// A splice that broke: why, what each way carried until then, and the
/// tail of what went out (when one was kept).
#[derive(Debug)]
pub struct Cut {
    /// The first failure.
    pub error: std::io::Error,
    /// What was carried in full each way before it.
    pub partial: Spliced,
    /// The last bytes taken to send out ([`splice`]'s `keep`).
    pub tail: Option<Tail>,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // How far each way got says which end stopped short.
        write!(
            f,
            "{} (carried until then: {} bytes from the local socket, {} bytes to it)",
            self.error, self.partial.out.bytes, self.partial.back.bytes
        )
    }
}

/// Splices `local` with a QUIC stream pair until both directions end;
/// with `keep` > 0, the last `keep` bytes sent out are kept ([`Tail`]) so
/// that a broken splice can be checked against what the peer received.
///
/// A failure in either direction resets the QUIC stream (and stops the
/// peer's), so the peer never takes a cut stream for a complete one; quinn
/// would otherwise finish a dropped stream cleanly.
pub async fn splice(
    local: UnixStream,
    send: crate::transport::SendStream,
    recv: crate::transport::RecvStream,
    keep: usize,
) -> Result<Spliced, Box<Cut>> {
    splice_paced(local, send, recv, keep, Pacing::default()).await
}

/// [`splice`], the out direction within `pacing`'s credit (by the far
/// QEMU's reads) and the back direction's writes told to it.
pub async fn splice_paced(
    local: UnixStream,
    mut send: crate::transport::SendStream,
    mut recv: crate::transport::RecvStream,
    keep: usize,
    pacing: Pacing,
) -> Result<Spliced, Box<Cut>> {
    let (lr, mut lw) = local.into_split();
    let mut tail = (keep > 0).then(|| Tail::new(keep));
    let (mut out, mut back) = (Count::new(), Count::new());
    let may_close = pacing.local_may_close;
    let (reads, writes) = if may_close {
        (LocalEnd::Reads, LocalEnd::Writes)
    } else {
        (LocalEnd::Strict, LocalEnd::Strict)
    };
    let r = {
        let out = async {
            let how = Direction {
                credit: pacing.credit.as_deref(),
                delivered: None,
                local: reads,
            };
            pump(lr, &mut send, &mut out, tail.as_mut(), how).await?;
            send.finish().map_err(std::io::Error::other)?;
            if let Some(tell) = &pacing.sent {
                tell(out.carried());
            }
            Ok(())
        };
        let back = async {
            let how = Direction {
                credit: None,
                delivered: pacing.delivered.as_deref(),
                local: writes,
            };
            pump(&mut recv, &mut lw, &mut back, None, how).await?;
            match lw.shutdown().await {
                Err(e)
                    if may_close
                        && (closed_by_peer(&e) || e.kind() == std::io::ErrorKind::NotConnected) =>
                {
                    Ok(())
                }
                r => r,
            }
        };
        // The first failure ends both directions at once.
        tokio::try_join!(out, back)
    };
    match r {
        Ok(((), ())) => Ok(Spliced {
            out: out.carried(),
            back: back.carried(),
        }),
        Err(e) => {
            let _ = send.reset(quinn::VarInt::from_u32(CUT));
            let _ = recv.stop(quinn::VarInt::from_u32(CUT));
            Err(Box::new(Cut {
                error: e,
                partial: Spliced {
                    out: out.carried(),
                    back: back.carried(),
                },
                tail,
            }))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::Tail;

    #[test]
    fn a_tail_gives_the_digest_of_any_prefix_it_still_holds() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut t = Tail::new(3000);
        for c in data.chunks(700) {
            t.push(c);
        }
        assert_eq!(t.total(), 10_000);
        for n in [7_000u64, 7_001, 8_400, 9_999, 10_000] {
            let n_us = usize::try_from(n).unwrap();
            let want: [u8; 32] = blake3::hash(&data[..n_us]).into();
            assert_eq!(t.prefix(n), Some(want), "prefix of {n}");
        }
        // Before what it holds, or past what was sent: no answer.
        assert_eq!(t.prefix(10_001), None);
        assert_eq!(t.prefix(100), None);
        // It holds at least `limit` bytes, and not much more.
        assert!(t.held >= 3000 && t.held < 3000 + 700, "{}", t.held);
    }
}
