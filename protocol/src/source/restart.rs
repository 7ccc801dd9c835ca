//! A source that restarts after the post-copy switch: the process that
//! made the switch died (or gave the link up), the VM is paused here and
//! runs at the destination, which waits for the pages it lacks. A new
//! source takes the migration up from the paused image and the journal.
//!
//! What the process that died knew and this one does not: which pages it
//! owed at the switch and which it pushed since. It therefore owes every
//! page (or, with storage post-copy, every leaf), rebuilds its Merkle tree
//! from the paused image, and takes the destination's word in `Resumed`
//! for what it already holds. That word is not checked page by page here
//! (the first source checked that every held page had been sent since the
//! switch); the root check at `Finish` covers it instead: a page the
//! destination holds in another version than the paused one gives another
//! leaf there, so the roots differ and the migration ends in doubt, never
//! verified.

use std::time::Instant;

use crate::digest::Digest;
use crate::page::PageBitmap;

use super::{Phase, Source, SourceAction, SourceConfig, SourceError};

impl Source {
    /// A source for `cfg`'s migration, restarted after its post-copy
    /// switch: `leaves` are the leaf digests of the paused image (memory
    /// pages, then disk blocks), `device_state` the paused VM's. It dials
    /// the destination at once ([`SourceAction::Reconnect`]) and has the
    /// recovery window to reach it; then it goes on as after any
    /// post-copy recovery.
    pub fn restarted_after_switch(
        cfg: SourceConfig,
        leaves: &[Digest],
        device_state: Vec<u8>,
        now: Instant,
    ) -> Result<Source, SourceError> {
        let mut s = Source::new(cfg);
        if !s.cfg.manifest.postcopy {
            return Err(SourceError::BadRestart("the plan has no post-copy switch"));
        }
        if s.cfg.recovery.is_zero() {
            return Err(SourceError::BadRestart("no recovery window"));
        }
        if leaves.len() != s.tree.len() {
            return Err(SourceError::BadRestart("the leaves do not fit the image"));
        }
        if device_state.len() > crate::message::MAX_DEVICE_STATE {
            return Err(SourceError::DeviceStateTooLarge(device_state.len()));
        }
        for (i, d) in leaves.iter().enumerate() {
            s.tree.set_leaf(i, *d);
        }
        s.tree.fold_if_due();
        // Over what the destination reads as owed: the memory's pages, or
        // every leaf with storage post-copy.
        let owed = if s.cfg.plan().storage_postcopy {
            s.tree.len() as u64
        } else {
            s.cfg.manifest.memory.page_count()
        };
        let owed = PageBitmap::full(owed);
        s.postcopy.owed = owed.count();
        s.owed = Some(owed);
        s.device_state = device_state;
        s.started_at = Some(now);
        s.handed_over = true;
        s.switched = true;
        s.restarted = true;
        s.phase = Phase::Reconnecting {
            round: 0,
            deadline: now + s.cfg.recovery,
        };
        s.progress(
            "restarted after the post-copy switch, reconnecting",
            s.postcopy.owed,
        );
        s.actions.push_back(SourceAction::Reconnect);
        Ok(s)
    }
}
