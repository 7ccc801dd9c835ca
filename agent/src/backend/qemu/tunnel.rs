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

/// Copies `from` to `to` until `from` ends, hashing. The caller closes
/// `to`: cleanly after success, as a failure otherwise.
pub async fn pump<R, W>(mut from: R, to: &mut W) -> std::io::Result<Carried>
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
    Ok(Carried {
        bytes,
        digest: hasher.finalize().into(),
    })
}

/// QUIC error code for a stream cut by a failure (never a clean end).
pub const CUT: u32 = 1;

/// Splices `local` with a QUIC stream pair until both directions end.
///
/// A failure in either direction resets the QUIC stream (and stops the
/// peer's), so the peer never takes a cut stream for a complete one; quinn
/// would otherwise finish a dropped stream cleanly.
pub async fn splice(
    local: UnixStream,
    mut send: crate::transport::SendStream,
    mut recv: crate::transport::RecvStream,
) -> std::io::Result<Spliced> {
    let (lr, mut lw) = local.into_split();
    let out = async {
        let c = pump(lr, &mut send).await?;
        send.finish().map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>(c)
    };
    let back = async {
        let c = pump(&mut recv, &mut lw).await?;
        lw.shutdown().await?;
        Ok::<_, std::io::Error>(c)
    };
    // The first failure ends both directions at once.
    let r = tokio::try_join!(out, back);
    match r {
        Ok((out, back)) => Ok(Spliced { out, back }),
        Err(e) => {
            let _ = send.reset(quinn::VarInt::from_u32(CUT));
            let _ = recv.stop(quinn::VarInt::from_u32(CUT));
            Err(e)
        }
    }
}
