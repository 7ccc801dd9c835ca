//! A UDP relay on loopback whose link a test can cut and restore.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A UDP relay on loopback between an agent and one peer's address, whose
/// link an integration test can cut and restore (the kernel here has no
/// netem, and loopback cannot be cut per flow otherwise). While cut, every
/// datagram either way is dropped, as on a broken WAN link.
#[derive(Debug)]
pub struct CuttableLink {
    addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableLink {
    /// Relays datagrams sent to [`CuttableLink::addr`] to `target`, and the
    /// answers back, each client through its own socket.
    pub async fn start(target: std::net::SocketAddr) -> std::io::Result<CuttableLink> {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let (front2, up2) = (front.clone(), up.clone());
        let task = tokio::spawn(async move {
            let mut backs: std::collections::HashMap<
                std::net::SocketAddr,
                (Arc<tokio::net::UdpSocket>, tokio::task::JoinHandle<()>),
            > = std::collections::HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front2.recv_from(&mut buf).await else {
                    break;
                };
                if !up2.load(Ordering::SeqCst) {
                    continue;
                }
                if let Some((back, _)) = backs.get(&client) {
                    let _ = back.send(&buf[..n]).await;
                    continue;
                }
                let Ok(back) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if back.connect(target).await.is_err() {
                    continue;
                }
                let back = Arc::new(back);
                let (b, f, u) = (back.clone(), front2.clone(), up2.clone());
                let reply = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match b.recv(&mut buf).await {
                            Ok(n) => {
                                if u.load(Ordering::SeqCst) {
                                    let _ = f.send_to(&buf[..n], client).await;
                                }
                            }
                            // The target's port closed for a while (an
                            // agent restarting there): keep relaying.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                            Err(_) => break,
                        }
                    }
                });
                let _ = back.send(&buf[..n]).await;
                backs.insert(client, (back, reply));
            }
            for (_, (_, t)) in backs {
                t.abort();
            }
        });
        Ok(CuttableLink { addr, up, task })
    }

    /// Where to send instead of the target.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Cuts (`false`) or restores (`true`) the link.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
