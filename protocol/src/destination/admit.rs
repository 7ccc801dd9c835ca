//! Admission: the checks on `Propose` (version, streams, sizes, attributes)
//! and its answer once staging is ready, `Accept` with a signed receipt (or
//! `Reject`).

use std::time::Instant;

use crate::digest::{zero_leaf, Digest, MerkleTree};
use crate::message::{
    Accept, Capabilities, Message, Propose, Reason, Reject, VersionRange, MAX_DATA_STREAMS,
};
use crate::receipt::ReceiptKind;

use super::{Destination, DestinationAction, DestinationEvent, Phase};

impl Destination {
    /// Answers the proposal with a `Reject` and ends.
    fn refuse(&mut self, reason: Reason) {
        self.actions
            .push_back(DestinationAction::Send(Message::Reject(Reject {
                reason: reason.clone(),
            })));
        self.events
            .push_back(DestinationEvent::Failed(format!("refused: {reason}")));
        self.phase = Phase::Done;
    }

    pub(super) fn propose(&mut self, p: Propose) {
        let Some(version) = VersionRange::OURS.negotiate(p.versions) else {
            return self.refuse(Reason::UnsupportedVersion);
        };
        let _ = version;
        if p.manifest.qemu.is_some() {
            // A stream migration is driven elsewhere (see `crate::stream`);
            // its manifest never reaches a page-batch destination.
            return self.refuse(Reason::Unacceptable(
                "a QEMU stream migration to a page-batch destination".into(),
            ));
        }
        let streams = p.manifest.data_streams;
        if streams == 0 || streams > MAX_DATA_STREAMS {
            return self.refuse(Reason::Unacceptable(format!(
                "{streams} data streams (1..={MAX_DATA_STREAMS})"
            )));
        }
        if p.manifest.memory.bytes() > self.cfg.max_memory_bytes {
            return self.refuse(Reason::Unacceptable(format!(
                "{} bytes of memory exceeds this agent's limit of {}",
                p.manifest.memory.bytes(),
                self.cfg.max_memory_bytes
            )));
        }
        if let Err(e) = p.attributes.validate() {
            return self.refuse(Reason::Unacceptable(e.to_string()));
        }
        let leaves = match p.manifest.leaf_count() {
            Ok(n) => n,
            Err(e) => return self.refuse(Reason::Unacceptable(e.to_string())),
        };
        let bookkeeping = leaves.saturating_mul(super::BOOKKEEPING_PER_LEAF);
        if bookkeeping > self.cfg.max_bookkeeping_bytes {
            return self.refuse(Reason::Unacceptable(format!(
                "{leaves} pages and disk blocks need {bookkeeping} bytes of bookkeeping, \
                     past this agent's limit of {}",
                self.cfg.max_bookkeeping_bytes
            )));
        }
        let disk_bytes: u64 = p.manifest.disks.iter().map(|d| d.bytes).sum();
        if disk_bytes > self.cfg.max_disk_bytes {
            return self.refuse(Reason::Unacceptable(format!(
                "{disk_bytes} bytes of disks exceeds this agent's limit of {}",
                self.cfg.max_disk_bytes
            )));
        }
        if p.manifest.start_paused && p.manifest.postcopy {
            return self.refuse(Reason::Unacceptable(
                "a VM demand-paged in cannot start paused".into(),
            ));
        }
        // After a post-copy switch, one more: the fault stream.
        let all = usize::from(streams) + usize::from(p.manifest.postcopy);
        self.applied = vec![0; all];
        self.opened = vec![false; all];
        self.actions.push_back(DestinationAction::PrepareStaging {
            vm: p.vm.clone(),
            manifest: p.manifest.clone(),
            migration: p.migration,
            ticket: p.ticket.clone(),
            attributes: p.attributes.clone(),
        });
        self.proposal = Some(p);
        self.phase = Phase::Preparing;
    }

    /// Staging is reserved and zeroed: accept, with a signed `Accepted`
    /// receipt.
    pub fn handle_staging_ready(&mut self, now: Instant) {
        // Accept goes out now: the source's silence counts from here.
        self.heard(now);
        self.handle_staging_ready_reusing(now, false);
    }

    /// [`Destination::handle_staging_ready`] for a proposal that offers a
    /// retained image ([`crate::message::Manifest::reuse`]): `held` says
    /// this host holds that image, for that VM and geometry, and opens its
    /// pages with the offered key. Only then is
    /// [`Capabilities::REUSE`] accepted (and the driver must then accept
    /// retained pages on its receivers,
    /// [`crate::page::StreamReceiver::accept_retained`]).
    pub fn handle_staging_ready_reusing(&mut self, now: Instant, held: bool) {
        // Accept goes out now: the source's silence counts from here.
        self.heard(now);
        self.handle_staging_ready_holding(now, held, Vec::new());
    }

    /// [`Destination::handle_staging_ready_reusing`], and `bases`: for each
    /// of the manifest's disks, the leaves of the base image it was staged
    /// as a copy of, when this host holds that base (same name, root and
    /// size; [`crate::disk`]), else `None`. The tree starts from those
    /// leaves, so a block the source leaves out must equal the base's or
    /// the root check fails; the driver must accept retained blocks and
    /// take a retained block's leaf from what it staged. Leaves of the
    /// wrong count are not held.
    pub fn handle_staging_ready_holding(
        &mut self,
        now: Instant,
        held: bool,
        bases: Vec<Option<Vec<Digest>>>,
    ) {
        self.heard(now);
        let Phase::Preparing = self.phase else {
            return;
        };
        let Some(p) = &self.proposal else {
            return;
        };
        let page = p.manifest.memory.page_size().bytes();
        // Memory pages, then disk blocks (checked at Propose).
        let leaves = p
            .manifest
            .leaf_count()
            .unwrap_or(p.manifest.memory.page_count());
        let mut tree = MerkleTree::filled(crate::page::saturating_usize(leaves), zero_leaf(page));
        let version = VersionRange::OURS
            .negotiate(p.versions)
            .unwrap_or(crate::message::PROTOCOL_VERSION);
        // Only for disks that name a base, and nothing when none is held;
        // a held disk's leaves start as its base's.
        let ranges = crate::disk::leaf_ranges(p.manifest.memory, &p.manifest.disks);
        let mut bases: Vec<bool> = p
            .manifest
            .disks
            .iter()
            .zip(ranges)
            .zip(bases.into_iter().chain(std::iter::repeat(None)))
            .map(|((d, r), leaves)| match leaves {
                Some(l) if d.base.is_some() && l.len() as u64 == r.end - r.start => {
                    for (i, leaf) in l.into_iter().enumerate() {
                        tree.set_leaf(
                            crate::page::saturating_usize(r.start).saturating_add(i),
                            leaf,
                        );
                    }
                    true
                }
                _ => false,
            })
            .collect();
        tree.fold_if_due();
        self.tree = Some(tree);
        if !bases.contains(&true) {
            bases.clear();
        }
        let mut capabilities = self.cfg.capabilities.intersect(p.capabilities);
        if !(held && p.manifest.reuse.is_some()) {
            capabilities = Capabilities(capabilities.0 & !Capabilities::REUSE.0);
        }
        let receipt = match self.sign(now, ReceiptKind::Accepted, None) {
            Ok(r) => r,
            Err(e) => {
                self.handle_staging_failed(Reason::Internal(e.to_string()));
                self.actions.push_back(DestinationAction::DiscardStaging);
                return;
            }
        };
        self.actions
            .push_back(DestinationAction::Send(Message::Accept(Accept {
                version,
                capabilities,
                receipt,
                bases,
            })));
        self.phase = Phase::Receiving;
    }

    /// Staging could not be reserved.
    pub fn handle_staging_failed(&mut self, reason: Reason) {
        if let Phase::Preparing = self.phase {
            self.refuse(reason);
        }
    }
}
