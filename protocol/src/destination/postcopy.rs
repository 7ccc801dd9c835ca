//! Post-copy: the switch (once every batch sent before it is applied, the
//! VM starts on demand paging), pages the VM asks for (`Fetch`), and the
//! fault figures reported in Ready.

use std::time::Instant;

use crate::message::{FaultFigures, Fetch, Message, PostcopyRunning, MAX_FETCH};
use crate::page::{PageBitmap, PageIndex};

use super::{Destination, DestinationAction, DestinationError, Phase};

impl Destination {
    /// Whether the VM runs here since a post-copy switch.
    pub fn is_switched(&self) -> bool {
        self.switched
    }

    /// Post-copy: the VM waits for `pages`; ask the source for them.
    /// Ignored outside the post-copy phase (they are all on their way).
    pub fn request_pages(&mut self, pages: &[PageIndex]) {
        let recovering = matches!(self.phase, Phase::Recovering { .. });
        if !matches!(self.phase, Phase::PostCopy) && !recovering {
            return;
        }
        for p in pages {
            if self.missing.as_ref().is_some_and(|m| m.contains(*p)) {
                self.asked.insert(p.0);
            }
        }
        if recovering {
            // Asked again once the source is back.
            return;
        }
        for chunk in pages.chunks(MAX_FETCH) {
            self.actions
                .push_back(DestinationAction::Send(Message::Fetch(Fetch {
                    pages: chunk.to_vec(),
                })));
        }
    }

    /// Post-copy figures to report in Ready.
    pub fn set_fault_figures(&mut self, f: FaultFigures) {
        self.faults = Some(f);
    }

    /// Post-copy: the VM runs here on demand paging.
    pub fn handle_postcopy_started(&mut self, now: Instant) {
        if let Phase::PostcopyStarting { since } = self.phase {
            let ms = now.saturating_duration_since(since).as_millis();
            self.actions
                .push_back(DestinationAction::Send(Message::PostcopyRunning(
                    PostcopyRunning {
                        start_ms: u32::try_from(ms).unwrap_or(u32::MAX),
                    },
                )));
            self.phase = Phase::PostCopy;
        }
    }

    /// Starts the VM once every batch sent before the switch is applied.
    pub(super) fn try_switch(&mut self, now: Instant) -> Result<(), DestinationError> {
        let Phase::SwitchDraining(m) = &self.phase else {
            return Ok(());
        };
        let streams = self.data_streams();
        if self.applied.get(..streams) != Some(&m.batches[..]) {
            return Ok(());
        }
        let Phase::SwitchDraining(m) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return Ok(());
        };
        let count = self.proposal.as_ref().map_or(0, |p| {
            if m.storage {
                p.manifest
                    .leaf_count()
                    .unwrap_or(p.manifest.memory.page_count())
            } else {
                p.manifest.memory.page_count()
            }
        });
        self.switched = true;
        self.switch_state = Some(crate::digest::device_state_digest(&m.device_state));
        let owed = PageBitmap::from_words(m.owed, count);
        self.missing = Some(owed.clone());
        self.actions.push_back(DestinationAction::StartPostcopy {
            device_state: m.device_state,
            owed,
        });
        self.phase = Phase::PostcopyStarting { since: now };
        Ok(())
    }
}
