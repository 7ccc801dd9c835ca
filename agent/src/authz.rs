//! Authorization of migrations by operator-signed tickets
//! ([`convoy_protocol::ticket`]): issuing them (for `convoyctl`), checking
//! them at the source and at the destination, and refusing replays.
//!
//! At the source: the ticket verifies to the CA bundle, is signed by the
//! operator *connected to us* (not merely by some operator), names us as
//! source, the requested VM and destination, and the requested limits; its
//! nonce is new. At the destination: the ticket verifies, names us as
//! destination, the proposing agent as source (an agent cannot launder its
//! own authority: it can only carry out what an operator asked of it), the
//! proposed VM and migration id; its nonce is new here too.
//!
//! The replay cache is in memory for now: it does not survive a restart
//! (the durable cache is part of issue 2/4, still open).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use convoy_protocol::ctl::{MigrateOptions, MigrateRequest};
use convoy_protocol::names::{MigrationId, SpiffeId, VmName};
use convoy_protocol::ticket::{SignedTicket, Ticket, TicketError, TicketLimits, VerifiedTicket};
use rand::RngCore;
use thiserror::Error;

use crate::identity::{Identity, TrustBundle};

/// Clock skew tolerated on ticket validity by default.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Default ticket lifetime when `convoyctl` issues one.
pub const DEFAULT_TICKET_LIFETIME: Duration = Duration::from_secs(300);

/// Why a ticket does not authorize this migration here.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// The ticket itself is invalid.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// Signed by an operator other than the one asking.
    #[error("ticket signed by {signer}, but the request comes from {caller}")]
    SignerNotCaller {
        /// Signer.
        signer: SpiffeId,
        /// Connected operator.
        caller: SpiffeId,
    },
    /// A field of the ticket disagrees with the request or with us.
    #[error("ticket {what} is {ticket}, expected {expected}")]
    Mismatch {
        /// Which field.
        what: &'static str,
        /// In the ticket.
        ticket: String,
        /// What it had to be.
        expected: String,
    },
    /// The nonce was used before.
    #[error("ticket {0} was already used (replay)")]
    Replayed(MigrationId),
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds and signs a ticket for moving `vm` from `source` to `destination`.
pub fn issue_ticket(
    operator: &Identity,
    vm: &VmName,
    source: SpiffeId,
    destination: SpiffeId,
    options: &MigrateOptions,
    lifetime: Duration,
) -> Result<SignedTicket, TicketError> {
    let mut id = [0u8; 16];
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut nonce);
    let now = now_unix();
    let ticket = Ticket {
        id: MigrationId(id),
        vm: vm.clone(),
        source,
        destination,
        limits: limits_of(options),
        issued_at: now,
        expires_at: now + lifetime.as_secs().max(1),
        nonce,
    };
    SignedTicket::sign(&ticket, operator)
}

fn limits_of(o: &MigrateOptions) -> TicketLimits {
    TicketLimits {
        streams: o.streams,
        max_downtime_ms: o.max_downtime_ms,
        max_rounds: o.max_rounds,
    }
}

fn expect<T: PartialEq + ToString>(
    what: &'static str,
    ticket: &T,
    expected: &T,
) -> Result<(), AuthzError> {
    if ticket == expected {
        Ok(())
    } else {
        Err(AuthzError::Mismatch {
            what,
            ticket: ticket.to_string(),
            expected: expected.to_string(),
        })
    }
}

/// Nonces seen, until their tickets expire.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<[u8; 16], u64>>,
}

impl ReplayCache {
    /// Records the nonce of `t`; false when it was seen before.
    pub fn first_use(&self, t: &Ticket, now: u64, skew: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, exp| exp.saturating_add(skew) > now);
        if seen.contains_key(&t.nonce) {
            return false;
        }
        seen.insert(t.nonce, t.expires_at);
        true
    }
}

/// What an agent checks tickets with: its CA bundle, its replay cache and
/// the clock skew it tolerates.
#[derive(Debug, Clone, Copy)]
pub struct Authority<'a> {
    /// CA bundle.
    pub trust: &'a TrustBundle,
    /// Nonces seen.
    pub replay: &'a ReplayCache,
    /// Tolerated clock skew.
    pub skew: Duration,
}

impl Authority<'_> {
    /// Checks a migration request at the source: `caller` is the connected
    /// operator, `me` this agent, `destination` the agent asked for.
    pub fn at_source(
        &self,
        caller: &SpiffeId,
        me: &SpiffeId,
        destination: &SpiffeId,
        req: &MigrateRequest,
    ) -> Result<VerifiedTicket, AuthzError> {
        let now = now_unix();
        let v = req.ticket.verify(self.trust, now, self.skew.as_secs())?;
        if &v.signer != caller {
            return Err(AuthzError::SignerNotCaller {
                signer: v.signer,
                caller: caller.clone(),
            });
        }
        expect("source", &v.ticket.source, me)?;
        expect("destination", &v.ticket.destination, destination)?;
        expect("VM", &v.ticket.vm, &req.vm)?;
        let want = limits_of(&req.options);
        if v.ticket.limits != want {
            return Err(AuthzError::Mismatch {
                what: "limits",
                ticket: format!("{:?}", v.ticket.limits),
                expected: format!("{want:?}"),
            });
        }
        if !self.replay.first_use(&v.ticket, now, self.skew.as_secs()) {
            return Err(AuthzError::Replayed(v.ticket.id));
        }
        Ok(v)
    }

    /// Checks a proposal at the destination: `proposer` is the connected
    /// source agent, `me` this agent.
    pub fn at_destination(
        &self,
        proposer: &SpiffeId,
        me: &SpiffeId,
        vm: &VmName,
        migration: MigrationId,
        ticket: &SignedTicket,
    ) -> Result<VerifiedTicket, AuthzError> {
        let now = now_unix();
        let v = ticket.verify(self.trust, now, self.skew.as_secs())?;
        expect("source", &v.ticket.source, proposer)?;
        expect("destination", &v.ticket.destination, me)?;
        expect("VM", &v.ticket.vm, vm)?;
        expect("migration id", &v.ticket.id, &migration)?;
        if !self.replay.first_use(&v.ticket, now, self.skew.as_secs()) {
            return Err(AuthzError::Replayed(v.ticket.id));
        }
        Ok(v)
    }
}
