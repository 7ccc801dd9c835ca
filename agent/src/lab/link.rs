//! A relay on loopback, UDP and TCP on one port, whose link a test can
//! cut and restore, and delay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::impair::{Direction, Impairment, Relay, RelayConfig};

/// A UDP relay on loopback between an agent and one peer's address, whose
/// link an integration test can cut and restore (the kernel here has no
/// netem, and loopback cannot be cut per flow otherwise). While cut, every
/// datagram either way is dropped, as on a broken WAN link. A clean
/// [`Relay`] whose only impairment is the cut; the target's port closing
/// for a while (an agent restarting behind the link) does not end it.
///
/// TCP connections to the same port are relayed to the target's TCP port
/// (an agent listens on both): while cut, nothing is forwarded either way
/// and a new connection waits, its sockets held open, as over a link gone
/// dark (TCP's own keep-alives would be answered by the relay; the
/// session's keep-alives are not).
#[derive(Debug)]
pub struct CuttableLink {
    relay: Relay,
    cut: Arc<watch::Sender<bool>>,
    /// One-way delay of the TCP relay.
    delay: Arc<watch::Sender<Duration>>,
    tcp: tokio::task::JoinHandle<()>,
}

impl CuttableLink {
    /// Relays datagrams sent to [`CuttableLink::addr`] to `target`, and the
    /// answers back, each client through its own socket; and TCP
    /// connections to the same port to `target`'s.
    pub async fn start(target: SocketAddr) -> std::io::Result<CuttableLink> {
        let mut last = None;
        for _ in 0..20 {
            let relay = Relay::start(RelayConfig::new(target)).await?;
            match tokio::net::TcpListener::bind(relay.addr()).await {
                Ok(listener) => {
                    let cut = Arc::new(watch::channel(false).0);
                    let delay = Arc::new(watch::channel(Duration::ZERO).0);
                    let tcp = tokio::spawn(relay_tcp(listener, target, cut.clone(), delay.clone()));
                    return Ok(CuttableLink {
                        relay,
                        cut,
                        delay,
                        tcp,
                    });
                }
                // The UDP port's TCP twin is taken: another port.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
    }

    /// Where to send instead of the target.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.addr()
    }

    /// Cuts (`false`) or restores (`true`) the link.
    pub fn set_up(&self, up: bool) {
        self.relay.set_cut(!up);
        self.cut.send_replace(!up);
    }

    /// Delays every datagram, and every TCP segment relayed, by `one_way`
    /// each way (a round trip of twice that), from now on.
    pub fn set_delay(&self, one_way: Duration) {
        for d in [Direction::ToTarget, Direction::ToClient] {
            self.relay.set(
                d,
                Impairment {
                    delay: one_way,
                    ..self.relay.impairment(d)
                },
            );
        }
        self.delay.send_replace(one_way);
    }

    /// The relay underneath, for its counters.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.tcp.abort();
    }
}

/// Accepts TCP connections and relays each to `target` while the link is
/// up.
async fn relay_tcp(
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    delay: Arc<watch::Sender<Duration>>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (from, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let cut = cut.clone();
        let delay = delay.clone();
        conns.spawn(async move {
            let mut up = cut.subscribe();
            if up.wait_for(|c| !*c).await.is_err() {
                return;
            }
            let Ok(to) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let (fr, fw) = from.into_split();
            let (tr, tw) = to.into_split();
            tokio::join!(
                forward(fr, tw, cut.subscribe(), delay.subscribe()),
                forward(tr, fw, cut.subscribe(), delay.subscribe())
            );
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Copies `r` to `w`, each read `delay` later, holding the bytes while
/// the link is cut.
async fn forward(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    // Reads in flight: bounded, so a slow writer holds the reader back.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let due = tokio::time::Instant::now() + *delay.borrow();
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if cut.wait_for(|c| !*c).await.is_err() {
                return;
            }
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
