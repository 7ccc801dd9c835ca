//! Recovery: when a broken link is waited out rather than ending the
//! migration (after a post-copy switch, or in pre-copy before `Finish`),
//! which `Resume` is accepted ([`ResumeRefused`] for the rest), and how
//! the migration goes on over the new link.

use thiserror::Error;

use crate::digest::Digest;
use crate::message::{Fetch, Message, MAX_FETCH};
use crate::page::{PageBitmap, PageIndex};

use super::{Destination, DestinationAction, DestinationError, Phase};

/// Most times one migration resumes on a new link: a fault that breaks
/// every link (a local one taken for the link's) ends in doubt, not in an
/// endless loop.
pub const MAX_RECOVERIES: u32 = 8;

/// Why a Resume was refused (the migration itself goes on waiting).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("resume refused: {0}")]
pub struct ResumeRefused(pub &'static str);

impl Destination {
    /// Times the migration resumed on a new connection after its link
    /// broke, both phases together.
    pub fn recoveries(&self) -> u32 {
        self.recoveries[0].saturating_add(self.recoveries[1])
    }

    /// Which count of `recoveries` the migration's phase uses: pre-copy,
    /// or after the switch (each bounded by [`MAX_RECOVERIES`] apart).
    fn phase_index(&self) -> usize {
        usize::from(self.switched)
    }

    /// Whether the machine waits for the source to reconnect.
    pub fn is_recovering(&self) -> bool {
        matches!(self.phase, Phase::Recovering { .. })
    }

    /// Recovery: a batch of a broken link, applied after the link was
    /// given up. Its pages are installed, so their leaves count (and
    /// before a switch they are held for the resumed round); its place in
    /// the old stream's sequence no longer matters.
    pub fn handle_stale_batch_applied(
        &mut self,
        leaves: &[(PageIndex, Digest)],
    ) -> Result<(), DestinationError> {
        if !self.phase.has_staging() || self.tree.is_none() {
            return Ok(());
        }
        if let Err(p) = self.set_leaves(leaves) {
            return Err(self.fail(DestinationError::PageOutOfRange(p)));
        }
        Ok(())
    }

    /// Whether a link lost now would be recovered from (rather than end
    /// the migration).
    pub(super) fn recoverable(&self) -> bool {
        let phase = if self.switched {
            matches!(
                self.phase,
                Phase::PostCopy | Phase::Draining(_) | Phase::AwaitHandover { .. }
            )
        } else {
            // Pre-copy rounds (the source has not paused the VM yet).
            matches!(self.phase, Phase::Receiving)
        };
        phase
            && !self.cfg.recovery.is_zero()
            && self.recoveries[self.phase_index()] < MAX_RECOVERIES
    }

    /// Post-copy recovery: whether a Resume from `peer` would be accepted:
    /// from the agent the migration came from, for this migration and
    /// ticket, while recovering or in a phase a broken link is recovered
    /// from. (The source may see the break, and come back, before this
    /// side noticed it: the driver then gives the old link up first, with
    /// [`Destination::handle_link_lost`], and resumes.)
    pub fn resume_acceptable(
        &self,
        peer: &crate::names::SpiffeId,
        r: &crate::message::Resume,
    ) -> Result<(), ResumeRefused> {
        if !matches!(self.phase, Phase::Recovering { .. }) && !self.recoverable() {
            return Err(ResumeRefused("no migration waits to be resumed"));
        }
        if *peer != self.cfg.peer {
            return Err(ResumeRefused("the migration came from another agent"));
        }
        if Some(r.migration) != self.migration() || r.ticket != self.ticket_digest() {
            return Err(ResumeRefused("not the migration or ticket waiting here"));
        }
        Ok(())
    }

    /// Recovery: the first message of a new connection from `peer` asks to
    /// resume. Accepted only while recovering (see
    /// [`Destination::resume_acceptable`]); a refusal changes nothing here
    /// (the migration waits for its own source) and the driver answers it
    /// with an Abort on that connection only. The driver must have
    /// reported every batch of the broken link its decoders applied
    /// ([`Destination::handle_stale_batch_applied`]) first: the missing
    /// set sent back is read now.
    pub fn handle_resume(
        &mut self,
        now: std::time::Instant,
        peer: &crate::names::SpiffeId,
        r: &crate::message::Resume,
    ) -> Result<(), ResumeRefused> {
        self.resume_acceptable(peer, r)?;
        let Phase::Recovering { .. } = self.phase else {
            return Err(ResumeRefused("the broken link was not given up first"));
        };
        let phase = self.phase_index();
        self.recoveries[phase] += 1;
        // The source is back: its silence counts from now, not from
        // before the break.
        self.heard = Some(now);
        // The new streams count from zero; nothing is expected on them yet.
        self.applied.iter_mut().for_each(|a| *a = 0);
        self.opened.iter_mut().for_each(|o| *o = false);
        if !self.switched {
            // Pre-copy: the round goes on; the source sends the rest.
            let count = self.tree.as_ref().map_or(0, |t| t.len() as u64);
            let held = self
                .fresh
                .clone()
                .unwrap_or_else(|| PageBitmap::empty(count));
            self.actions
                .push_back(DestinationAction::Send(Message::PrecopyResumed(
                    crate::message::PrecopyResumed {
                        confirmed: self.confirmed,
                        held: held.words().to_vec(),
                    },
                )));
            self.phase = Phase::Receiving;
            return Ok(());
        }
        // A Ready signed before the link broke is void: Finish comes again.
        if let Some(n) = self.ready_at.take() {
            self.receipts.truncate(n);
        }
        self.root = None;
        let missing = self.missing.clone().unwrap_or_else(|| PageBitmap::empty(0));
        self.actions
            .push_back(DestinationAction::Send(Message::Resumed(
                crate::message::Resumed {
                    missing: missing.words().to_vec(),
                },
            )));
        // (A VM still being started when the link broke reports nothing
        // more: Resumed tells the source it runs.)
        self.phase = Phase::PostCopy;
        // What the VM waits for, first.
        let asked: Vec<PageIndex> = self.asked.iter().map(|&p| PageIndex(p)).collect();
        for chunk in asked.chunks(MAX_FETCH) {
            self.actions
                .push_back(DestinationAction::Send(Message::Fetch(Fetch {
                    pages: chunk.to_vec(),
                })));
        }
        Ok(())
    }
}
