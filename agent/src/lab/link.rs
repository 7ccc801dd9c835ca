//! A UDP relay on loopback whose link a test can cut and restore.

use super::impair::{Relay, RelayConfig};

/// A UDP relay on loopback between an agent and one peer's address, whose
/// link an integration test can cut and restore (the kernel here has no
/// netem, and loopback cannot be cut per flow otherwise). While cut, every
/// datagram either way is dropped, as on a broken WAN link. A clean
/// [`Relay`] whose only impairment is the cut; the target's port closing
/// for a while (an agent restarting behind the link) does not end it.
#[derive(Debug)]
pub struct CuttableLink {
    relay: Relay,
}

impl CuttableLink {
    /// Relays datagrams sent to [`CuttableLink::addr`] to `target`, and the
    /// answers back, each client through its own socket.
    pub async fn start(target: std::net::SocketAddr) -> std::io::Result<CuttableLink> {
        let relay = Relay::start(RelayConfig::new(target)).await?;
        Ok(CuttableLink { relay })
    }

    /// Where to send instead of the target.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.addr()
    }

    /// Cuts (`false`) or restores (`true`) the link.
    pub fn set_up(&self, up: bool) {
        self.relay.set_cut(!up);
    }

    /// The relay underneath, for its counters.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }
}
