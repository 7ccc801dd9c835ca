//! What peers may hold open: handshakes in flight, authenticated
//! connections (in total and per SPIFFE identity), and how long a
//! connection may stay without asking anything.
//!
//! QUIC keep-alives hold an idle connection open for as long as its peer's
//! process lives, so the transport's idle timeout alone never frees one;
//! these limits do, in the application:
//!
//! - **Handshakes** (`Connections::gate`): past
//!   [`ConnectionLimits::retry_above`] handshakes in flight, a client whose
//!   address QUIC has not validated is sent a Retry first (it must prove it
//!   receives at its address before the agent spends a TLS handshake on
//!   it); past [`ConnectionLimits::handshakes`], new handshakes are
//!   refused.
//! - **Connections** (`Connections::admit`): at most
//!   [`ConnectionLimits::connections`] authenticated connections, and
//!   [`ConnectionLimits::per_peer`] per identity, so one operator or agent
//!   cannot hold every slot (and the streams and frame buffers each one
//!   brings).
//! - **Deadlines**: an authenticated connection must open its first stream
//!   and send its first message within [`ConnectionLimits::first_message`];
//!   an operator connection with no request in flight is closed after
//!   [`ConnectionLimits::idle`]; a source that goes silent while the
//!   destination holds staging for it (before the VM runs there) loses its
//!   migration after [`ConnectionLimits::silence`].
//!
//! Every refusal is audited (rate-limited, `Host::audit_refusal`),
//! and the peer sees a close code with a reason
//! (`transport::close`), not a silent end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_protocol::names::SpiffeId;

/// The bounds; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Handshakes in flight at once; more are refused.
    pub handshakes: u32,
    /// Handshakes in flight past which an unvalidated address gets a
    /// Retry first.
    pub retry_above: u32,
    /// Authenticated connections at once.
    pub connections: u32,
    /// Authenticated connections at once from one identity.
    pub per_peer: u32,
    /// Time for a new connection's first stream and first message.
    pub first_message: Duration,
    /// Time an operator connection may stay with no request in flight.
    pub idle: Duration,
    /// Time a source may send nothing (no message, no page batch) while
    /// the destination holds staging for it and the VM does not run there
    /// yet; past it the migration is given up and staging discarded.
    pub silence: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshakes: 64,
            retry_above: 16,
            connections: 256,
            per_peer: 32,
            first_message: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            silence: Duration::from_secs(60),
        }
    }
}

/// What to do with a new handshake.
#[derive(Debug)]
pub(crate) enum Gate {
    /// Go ahead; the slot is held until the guard drops.
    Accept(HandshakeSlot),
    /// Ask the client to prove its address first.
    Retry,
    /// Too many handshakes: refuse.
    Refuse,
}

/// Why an authenticated connection is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Busy {
    /// Every connection slot is taken.
    #[error("too many connections ({0} open)")]
    Total(u32),
    /// This identity holds its share.
    #[error("too many connections from this identity ({0} open)")]
    PerPeer(u32),
}

/// The live counts.
#[derive(Debug)]
pub(crate) struct Connections {
    limits: ConnectionLimits,
    handshakes: Arc<AtomicU32>,
    open: Arc<Mutex<Open>>,
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    by_peer: HashMap<SpiffeId, u32>,
}

impl Connections {
    pub(crate) fn new(limits: ConnectionLimits) -> Self {
        Connections {
            limits,
            handshakes: Arc::new(AtomicU32::new(0)),
            open: Arc::new(Mutex::new(Open::default())),
        }
    }

    /// The bounds in force.
    pub(crate) fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Decides a new handshake from a client whose address QUIC has
    /// (`validated`) or has not yet validated.
    pub(crate) fn gate(&self, validated: bool) -> Gate {
        let in_flight = self.handshakes.fetch_add(1, Ordering::AcqRel);
        let slot = HandshakeSlot(self.handshakes.clone());
        if in_flight >= self.limits.handshakes {
            return Gate::Refuse;
        }
        if !validated && in_flight >= self.limits.retry_above {
            return Gate::Retry;
        }
        Gate::Accept(slot)
    }

    /// Admits an authenticated connection from `peer`, or says why not.
    pub(crate) fn admit(&self, peer: &SpiffeId) -> Result<ConnectionSlot, Busy> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.limits.connections {
            return Err(Busy::Total(open.total));
        }
        let mine = open.by_peer.get(peer).copied().unwrap_or(0);
        if mine >= self.limits.per_peer {
            return Err(Busy::PerPeer(mine));
        }
        open.total += 1;
        *open.by_peer.entry(peer.clone()).or_insert(0) += 1;
        Ok(ConnectionSlot {
            open: self.open.clone(),
            peer: peer.clone(),
        })
    }
}

/// A handshake in flight; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct HandshakeSlot(Arc<AtomicU32>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An authenticated connection; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    open: Arc<Mutex<Open>>,
    peer: SpiffeId,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            handshakes: 3,
            retry_above: 1,
            connections: 3,
            per_peer: 2,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn handshakes_past_the_threshold_need_a_validated_address_and_past_the_cap_are_refused() {
        let c = Connections::new(limits());
        let first = c.gate(false);
        assert!(matches!(first, Gate::Accept(_)));
        // Under load an unvalidated address is asked to prove itself; a
        // validated one (it answered the Retry) goes ahead.
        assert!(matches!(c.gate(false), Gate::Retry));
        let second = c.gate(true);
        let third = c.gate(true);
        assert!(matches!(
            (&second, &third),
            (Gate::Accept(_), Gate::Accept(_))
        ));
        assert!(matches!(c.gate(true), Gate::Refuse));
        // Finished handshakes free their slots.
        drop((first, second, third));
        assert!(matches!(c.gate(false), Gate::Accept(_)));
    }

    #[test]
    fn one_identity_cannot_hold_every_connection_and_slots_come_back() {
        let c = Connections::new(limits());
        let a: SpiffeId = "spiffe://t.test/operator/a".parse().unwrap();
        let b: SpiffeId = "spiffe://t.test/operator/b".parse().unwrap();
        let a1 = c.admit(&a).unwrap();
        let _a2 = c.admit(&a).unwrap();
        assert_eq!(c.admit(&a).unwrap_err(), Busy::PerPeer(2));
        let _b1 = c.admit(&b).unwrap();
        assert_eq!(c.admit(&b).unwrap_err(), Busy::Total(3));
        drop(a1);
        assert!(c.admit(&b).is_ok(), "a freed slot is anyone's");
    }
}
