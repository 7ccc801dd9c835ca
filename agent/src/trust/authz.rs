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
//! The replay cache is durable (redb) when the agent has a state directory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use convoy_protocol::ctl::MigrateRequest;
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{MigrationId, Role, SpiffeId, VmName};
use convoy_protocol::ticket::approval::{approval_for, ApprovalRole, Approver, SignedApproval};
use convoy_protocol::ticket::{SignedTicket, Ticket, TicketError, VerifiedTicket};
use rand::RngCore;
use thiserror::Error;

use crate::trust::identity::{Identity, TrustBundle};

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
    /// The replay cache could not record the nonce: refused, fail closed.
    #[error("replay cache unavailable: {0}")]
    ReplayCache(#[source] redb::Error),
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
    subject: convoy_protocol::vm::VmSubject,
    source: SpiffeId,
    destination: SpiffeId,
    plan: &MigrationPlan,
    lifetime: Duration,
) -> Result<SignedTicket, TicketError> {
    let ticket = new_ticket(vm, subject, source, destination, plan, lifetime, Vec::new());
    Ok(SignedTicket::sign(&ticket, operator)?)
}

/// A ticket, not yet signed, with a fresh migration id and nonce, valid
/// from now for `lifetime`, that `approvers` must approve
/// ([`approve_ticket`]) before it is signed and submitted.
pub fn new_ticket(
    vm: &VmName,
    subject: convoy_protocol::vm::VmSubject,
    source: SpiffeId,
    destination: SpiffeId,
    plan: &MigrationPlan,
    lifetime: Duration,
    approvers: Vec<Approver>,
) -> Ticket {
    let mut id = [0u8; 16];
    let mut nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut nonce);
    let now = now_unix();
    Ticket {
        id: MigrationId(id),
        vm: vm.clone(),
        subject,
        source,
        destination,
        plan: plan.clone(),
        issued_at: now,
        expires_at: now + lifetime.as_secs().max(1),
        nonce,
        approvers,
        approvals: Vec::new(),
    }
}

/// `operator`'s signed approval of `ticket` (of its request digest), in
/// `role` if given.
pub fn approve_ticket(
    operator: &Identity,
    ticket: &Ticket,
    role: Option<ApprovalRole>,
) -> Result<SignedApproval, TicketError> {
    Ok(approval_for(ticket, role, now_unix(), operator)?)
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

/// Nonces seen, until their tickets expire: in memory, and, when the agent
/// has a state directory, durably in redb (fsynced before a ticket is
/// accepted), so a restart does not reopen a window for replays.
pub struct ReplayCache {
    seen: Mutex<HashMap<[u8; 16], u64>>,
    db: Option<redb::Database>,
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("durable", &self.db.is_some())
            .finish()
    }
}

const NONCES: redb::TableDefinition<'_, &[u8], u64> = redb::TableDefinition::new("ticket_nonces");

impl ReplayCache {
    /// A cache that forgets on restart (tests, and agents without a state
    /// directory, which log a warning).
    pub fn in_memory() -> Self {
        ReplayCache {
            seen: Mutex::new(HashMap::new()),
            db: None,
        }
    }

    /// Opens (or creates) the durable cache at `path` and loads it.
    pub fn open(path: &std::path::Path) -> Result<Self, redb::Error> {
        let db = redb::Database::create(path)?;
        let mut seen = HashMap::new();
        let tx = db.begin_write()?;
        {
            use redb::ReadableTable;
            let table = tx.open_table(NONCES)?;
            for row in table.iter()? {
                let (k, v) = row?;
                if let Ok(nonce) = <[u8; 16]>::try_from(k.value()) {
                    seen.insert(nonce, v.value());
                }
            }
        }
        tx.commit()?;
        Ok(ReplayCache {
            seen: Mutex::new(seen),
            db: Some(db),
        })
    }

    /// Records the nonce of `t`: `Ok(false)` when it was seen before, an
    /// error when it cannot be recorded durably (the ticket is refused:
    /// fail closed).
    pub fn first_use(&self, t: &Ticket, now: u64, skew: u64) -> Result<bool, redb::Error> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let live = |exp: u64| exp.saturating_add(skew) > now;
        seen.retain(|_, exp| live(*exp));
        if seen.contains_key(&t.nonce) {
            return Ok(false);
        }
        if let Some(db) = &self.db {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(NONCES)?;
                table.retain(|_, exp| live(exp))?;
                table.insert(t.nonce.as_slice(), t.expires_at)?;
            }
            tx.commit()?;
        }
        seen.insert(t.nonce, t.expires_at);
        Ok(true)
    }

    fn check(&self, t: &Ticket, now: u64, skew: u64) -> Result<(), AuthzError> {
        match self.first_use(t, now, skew) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AuthzError::Replayed(t.id)),
            Err(e) => Err(AuthzError::ReplayCache(e)),
        }
    }
}

/// What an agent checks tickets with: its CA bundle, its replay cache and
/// the clock skew it tolerates.
#[derive(Debug, Clone)]
pub struct Authority<'a> {
    /// CA bundle (with CRLs) in force.
    pub trust: TrustBundle,
    /// Nonces seen.
    pub replay: &'a ReplayCache,
    /// Tolerated clock skew.
    pub skew: Duration,
}

impl Authority<'_> {
    /// Checks a migration request at the source: `caller` is the connected
    /// operator, `me` this agent. The destination is the ticket's: an agent
    /// called `req.to`, of our trust domain or a federated one that names
    /// it, and not us.
    pub fn at_source(
        &self,
        caller: &SpiffeId,
        me: &SpiffeId,
        req: &MigrateRequest,
    ) -> Result<VerifiedTicket, AuthzError> {
        let now = now_unix();
        let v = req.ticket.verify(&self.trust, now, self.skew.as_secs())?;
        if &v.signer != caller {
            return Err(AuthzError::SignerNotCaller {
                signer: v.signer,
                caller: caller.clone(),
            });
        }
        expect("source", &v.ticket.source, me)?;
        let dest = &v.ticket.destination;
        if dest.name() != &req.to || dest.role() != Role::Agent || dest == me {
            return Err(AuthzError::Mismatch {
                what: "destination",
                ticket: dest.to_string(),
                expected: format!("agent {} (not this agent)", req.to),
            });
        }
        if !self.trust.vouches_for(dest) {
            return Err(AuthzError::Mismatch {
                what: "destination",
                ticket: dest.to_string(),
                expected: "an agent of our trust domain or a federated one naming it".into(),
            });
        }
        expect("VM", &v.ticket.vm, &req.vm)?;
        self.replay.check(&v.ticket, now, self.skew.as_secs())?;
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
        let v = ticket.verify(&self.trust, now, self.skew.as_secs())?;
        expect("source", &v.ticket.source, proposer)?;
        expect("destination", &v.ticket.destination, me)?;
        expect("VM", &v.ticket.vm, vm)?;
        expect("migration id", &v.ticket.id, &migration)?;
        self.replay.check(&v.ticket, now, self.skew.as_secs())?;
        Ok(v)
    }
}
