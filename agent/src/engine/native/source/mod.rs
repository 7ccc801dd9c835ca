//! Drives [`convoy_protocol::source::Source`] for one outgoing page
//! migration (a sim VM): [`Run`] holds the migration, [`driver`] the loop
//! and one method per action, [`streams`] the data and fault streams,
//! [`encode`] what each stream's thread does, [`lanes`] the plan's extra
//! connections, [`restart`] a post-copy
//! migration taken up again after its source agent restarted.
//!
//! Threads and tasks:
//! - this task: the state machine, the control stream's writes, the VM's
//!   dirty log, pause and resume;
//! - one reader task for the control stream (reads are not cancel-safe, so
//!   they never sit in a `select!`);
//! - per data stream, an encoder *thread* (reads guest pages, zero check,
//!   BLAKE3, zstd: CPU work kept off the async workers) feeding a writer
//!   task through a bounded channel, which writes frames with zero-copy
//!   `write_chunks` and reports each batch back here in order.

mod driver;
mod encode;
mod faults;
mod jobs;
mod lanes;
pub(crate) mod restart;
mod streams;

use crate::engine::clock;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::{Connection, SendStream};
use convoy_protocol::ctl::{MigrateRequest, MigrationReport, Outcome, Progress};
use convoy_protocol::model::MigrationPlan;
use convoy_protocol::names::{MigrationId, SpiffeId};
use tokio::sync::mpsc;

use crate::backend::VmBackend;
use crate::host::Host;

pub(crate) struct Run {
    pub(crate) host: Arc<Host>,
    pub(crate) vm: Arc<dyn VmBackend>,
    pub(crate) req: MigrateRequest,
    /// The operator's plan, as the ticket signed it.
    pub(crate) plan: MigrationPlan,
    pub(crate) migration: MigrationId,
    pub(crate) progress: mpsc::Sender<Progress>,
    pub(crate) counter_at_pause: Option<u64>,
    pub(crate) control_bytes: u64,
    pub(crate) cancel: Arc<tokio::sync::Notify>,
    pub(crate) attributes: convoy_protocol::vm::VmAttributes,
    /// Phase changes, audited when the migration ends.
    pub(crate) phases: Vec<(String, u64)>,
    pub(crate) started: Instant,
    /// The VM goes back to a host that retained its image: the key and the
    /// leaves of that image.
    pub(crate) back: Option<crate::host::retain::ArrivalKey>,
    /// Keep the image here after Started, sealed under this key (sent in
    /// Handover, then forgotten).
    pub(crate) retain: Option<convoy_protocol::reuse::ReuseOffer>,
    /// The destination's address (dialled again for post-copy recovery).
    pub(crate) addr: std::net::SocketAddr,
}

/// A new link to the destination: the connection and its control stream.
struct Link {
    conn: Connection,
    send: SendStream,
    recv: crate::transport::RecvStream,
}

impl Run {
    /// Seals the paused image under `offer`'s key (then dropped, zeroized)
    /// and keeps it within the agent's limits.
    async fn retain_image(&mut self, offer: convoy_protocol::reuse::ReuseOffer) {
        let Some(limits) = self.host.config.retain_images else {
            return;
        };
        let vm = self.vm.clone();
        let name = self.req.vm.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let geometry = vm.geometry();
            convoy_protocol::reuse::RetainedImage::seal(
                offer.image,
                name,
                geometry,
                &offer.key,
                |p, buf| vm.read_page(p, buf),
            )
        })
        .await;
        match sealed {
            Ok(Ok(image)) => {
                let bytes = image.bytes();
                self.host.retained().insert(image, limits);
                self.phase(&format!("image retained here, encrypted ({bytes} bytes)"));
            }
            Ok(Err(e)) => tracing::warn!("cannot retain the image: {e}"),
            Err(e) => tracing::warn!("cannot retain the image: {e}"),
        }
    }

    /// The bases of the disks whose base the destination holds (`held`,
    /// per disk), with their leaves, where this host's base is still the
    /// one the manifest named (same root); and the leaves of the others,
    /// which go whole, zero blocks included (the destination's copy of
    /// the base is not zero there).
    #[allow(clippy::type_complexity)]
    async fn held_bases(
        &self,
        held: &[bool],
    ) -> (
        Vec<(std::ops::Range<u64>, Arc<crate::backend::base::BaseIndex>)>,
        Vec<std::ops::Range<u64>>,
    ) {
        let disks = self.vm.disks();
        let memory = self.vm.geometry();
        let ranges = convoy_protocol::disk::leaf_ranges(memory, &disks);
        let wanted: Vec<_> = disks
            .into_iter()
            .zip(ranges)
            .zip(held)
            .filter(|(_, h)| **h)
            .map(|((d, r), _)| (r, d.base, d.bytes))
            .collect();
        // If the lookup itself fails, every held disk goes whole.
        let all: Vec<_> = wanted.iter().map(|(r, ..)| r.clone()).collect();
        let bases = self.host.bases.clone();
        let block = memory.page_size().bytes();
        let split = tokio::task::spawn_blocking(move || {
            let (mut found, mut whole) = (Vec::new(), Vec::new());
            for (r, base, bytes) in wanted {
                let index = bases
                    .as_ref()
                    .zip(base)
                    .and_then(|(bases, base)| bases.find(&base, bytes, block));
                match index {
                    Some(i) => found.push((r, i)),
                    None => whole.push(r),
                }
            }
            (found, whole)
        })
        .await;
        split.unwrap_or((Vec::new(), all))
    }

    /// Records `step` of this migration in the journal (see
    /// [`Host::journal_source`]).
    async fn journal(
        &self,
        step: convoy_protocol::journal::JournalStep,
    ) -> Result<convoy_protocol::journal::JournalRecord, crate::host::journal::JournalError> {
        self.host.journal_source(self.migration, step).await
    }

    fn phase(&mut self, what: &str) {
        let ms = convoy_protocol::units::millis(clock::since(self.started));
        self.phases.push((what.to_owned(), ms));
    }

    pub(crate) fn report_without_link(
        &self,
        dest: SpiffeId,
        started: Instant,
        why: String,
    ) -> MigrationReport {
        MigrationReport {
            migration: self.migration.to_string(),
            vm: self.req.vm.clone(),
            source: self.host.id.to_string(),
            destination: dest.to_string(),
            outcome: Outcome::Aborted(why),
            verified: false,
            converged: false,
            total_ms: clock::since(started).as_secs_f64() * 1e3,
            downtime_ms: 0.0,
            rounds: 0,
            memory_bytes: self.vm.geometry().bytes(),
            pages_sent: 0,
            encodings: Default::default(),
            payload_bytes: 0,
            wire_bytes: 0,
            memory_root: None,
            counter_at_pause: None,
            receipts: Vec::new(),
            qemu: None,
            convergence: Default::default(),
            postcopy: None,
            disks: Vec::new(),
            disk_blocks_sent: 0,
            lanes: 0,
            link: None,
            transport: None,
        }
    }

    /// Post-copy recovery: dials the destination again until `deadline`,
    /// each attempt a new mutually authenticated connection with a
    /// control stream; `None` when the deadline passed.
    async fn redial(&self, dest: &SpiffeId, deadline: Option<Instant>) -> Option<Link> {
        let deadline = deadline?;
        loop {
            let left = deadline.saturating_duration_since(clock::now());
            if left.is_zero() {
                return None;
            }
            let attempt = async {
                let conn = self
                    .host
                    .dial_agent(self.addr, dest)
                    .await
                    .map_err(|e| e.to_string())?;
                let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(Link { conn, send, recv })
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(link)) => return Some(link),
                Ok(Err(e)) => tracing::info!(migration = %self.migration, "reconnecting: {e}"),
                Err(_) => return None,
            }
            let pause =
                Duration::from_millis(500).min(deadline.saturating_duration_since(clock::now()));
            tokio::time::sleep(pause).await;
        }
    }

    /// Runs the migration over `conn` to `dest` and reports it.
    pub(crate) async fn drive(&mut self, conn: Connection, dest: SpiffeId) -> MigrationReport {
        driver::Driver::start(self, conn, dest).await.run().await
    }
}

/// Each disk of `vm` as moved, with its root.
fn disk_reports(
    vm: &dyn VmBackend,
    roots: Vec<convoy_protocol::digest::Digest>,
) -> Vec<convoy_protocol::ctl::DiskReport> {
    vm.disks()
        .into_iter()
        .zip(roots)
        .map(|(d, root)| convoy_protocol::ctl::DiskReport {
            name: d.name,
            bytes: d.bytes,
            root,
        })
        .collect()
}
