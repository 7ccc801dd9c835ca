//! Carrying a byte stream — QEMU's migration stream, its return path, an
//! NBD connection — between a local unix socket and an authenticated QUIC
//! stream, both directions at once, with a BLAKE3 digest and a count of
//! every byte carried each way. Both agents compute the same digests over
//! the same bytes; receipts bind them.

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

/// Copies `from` to `to` until `from` ends, hashing, then closes `to`'s
/// write side.
pub async fn pump<R, W>(mut from: R, mut to: W) -> std::io::Result<Carried>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).await?;
        bytes += n as u64;
    }
    to.shutdown().await?;
    Ok(Carried {
        bytes,
        digest: hasher.finalize().into(),
    })
}

/// Splices `local` with a QUIC stream pair until both directions end.
pub async fn splice(
    local: UnixStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> std::io::Result<Spliced> {
    let (lr, lw) = local.into_split();
    let (out, back) = tokio::try_join!(pump(lr, send), pump(recv, lw))?;
    Ok(Spliced { out, back })
}
