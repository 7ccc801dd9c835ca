//! A window per channel of a QEMU migration, kept by what the
//! destination's QEMU has read ([`Credit`]): the source's [`Credits`],
//! moved by the destination's `ChannelRead` reports, and the
//! destination's [`Reads`], which it reports as its QEMU reads.
//!
//! Without it, the bytes the destination's QEMU had not read yet waited in
//! QUIC's receive buffers, up to a stream window (16 MiB) per channel, and
//! were read after the source's QEMU was done: inside the downtime (40–80
//! ms of a 512 MiB guest's pause on this machine, docs/benchmarks.md).

use std::sync::{Arc, Mutex, MutexGuard};

use convoy_protocol::stream::{ChannelKind, ChannelRead};

use crate::backend::qemu::tunnel::{Credit, Pacing};

/// The least a channel's sender may run ahead of what the destination's
/// QEMU has read, bytes: enough on loopback and a LAN; a long path gets
/// the source's send window (twice its bandwidth-delay product) instead.
pub(crate) const CHANNEL_WINDOW_MIN: u64 = 2 << 20;

/// How much more of a channel the destination's QEMU reads before it is
/// reported (well under [`CHANNEL_WINDOW_MIN`], so the bytes not reported
/// yet never hold the sender back).
pub(crate) const READ_STEP: u64 = 128 << 10;

/// Only QEMU's migration channels are paced: a disk mirror's NBD channels
/// talk both ways, and a recovered channel resends what the destination
/// lacks, outside these counts.
fn paced(kind: ChannelKind) -> bool {
    matches!(kind, ChannelKind::Migration(_))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Whole at every point: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The source's credit for each of a migration's channels, and the window
/// each may run ahead (one lock for both: a channel opened while the
/// window changes gets the new one).
#[derive(Debug)]
pub(crate) struct Credits {
    by: Mutex<(u64, Vec<ChannelCredit>)>,
}

/// A paced channel and its credit.
type ChannelCredit = (ChannelKind, Arc<Credit>);

impl Credits {
    pub(crate) fn new() -> Arc<Credits> {
        Arc::new(Credits {
            by: Mutex::new((CHANNEL_WINDOW_MIN, Vec::new())),
        })
    }

    /// How channel `kind`'s splice sends: within a credit of its own when
    /// it is paced.
    pub(crate) fn pacing(&self, kind: ChannelKind) -> Pacing {
        if !paced(kind) {
            return Pacing::default();
        }
        let mut by = lock(&self.by);
        let credit = Credit::new(by.0);
        by.1.push((kind, credit.clone()));
        Pacing {
            credit: Some(credit),
            ..Pacing::default()
        }
    }

    /// The destination's report: its QEMU has read `r.bytes` of `r.kind`
    /// (a channel not carried here is ignored).
    pub(crate) fn read(&self, r: ChannelRead) {
        for (k, c) in lock(&self.by).1.iter() {
            if *k == r.kind {
                c.read(r.bytes);
            }
        }
    }

    /// Each channel may run `window` ahead (at least
    /// [`CHANNEL_WINDOW_MIN`]).
    pub(crate) fn set_window(&self, window: u64) {
        let limit = window.max(CHANNEL_WINDOW_MIN);
        let mut by = lock(&self.by);
        if by.0 != limit {
            by.0 = limit;
            for (_, c) in by.1.iter() {
                c.set_limit(limit);
            }
        }
    }
}

/// What the destination's QEMU has read of each paced channel, and what
/// of it was reported.
#[derive(Debug, Default)]
pub(crate) struct Reads {
    by: Mutex<Vec<(ChannelKind, u64, u64)>>,
    more: tokio::sync::Notify,
}

impl Reads {
    pub(crate) fn new() -> Arc<Reads> {
        Arc::new(Reads::default())
    }

    /// How channel `kind`'s splice tells its QEMU's reads.
    pub(crate) fn pacing(self: &Arc<Self>, kind: ChannelKind) -> Pacing {
        if !paced(kind) {
            return Pacing::default();
        }
        lock(&self.by).push((kind, 0, 0));
        let reads = self.clone();
        Pacing {
            delivered: Some(Arc::new(move |bytes| reads.note(kind, bytes))),
            ..Pacing::default()
        }
    }

    fn note(&self, kind: ChannelKind, bytes: u64) {
        let mut due = false;
        for (k, read, reported) in lock(&self.by).iter_mut() {
            if *k == kind {
                *read = bytes;
                due = bytes.saturating_sub(*reported) >= READ_STEP;
            }
        }
        if due {
            // A permit is kept when nobody waits: none is lost.
            self.more.notify_one();
        }
    }

    /// Waits until a report is due.
    pub(crate) async fn due_soon(&self) {
        self.more.notified().await;
    }

    /// The reports due now (each channel read [`READ_STEP`] or more since
    /// its last), marked as sent.
    pub(crate) fn take_due(&self) -> Vec<ChannelRead> {
        let mut out = Vec::new();
        for (kind, read, reported) in lock(&self.by).iter_mut() {
            if read.saturating_sub(*reported) >= READ_STEP {
                *reported = *read;
                out.push(ChannelRead {
                    kind: *kind,
                    bytes: *read,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_reported_by_steps_and_move_the_senders_credit() {
        let reads = Reads::new();
        let tell = reads.pacing(ChannelKind::Migration(1)).delivered.unwrap();
        assert!(reads.pacing(ChannelKind::Nbd(0)).delivered.is_none());
        tell(READ_STEP - 1);
        assert!(reads.take_due().is_empty(), "under a step");
        tell(READ_STEP + 5);
        let due = reads.take_due();
        assert_eq!(
            due,
            vec![ChannelRead {
                kind: ChannelKind::Migration(1),
                bytes: READ_STEP + 5
            }]
        );
        assert!(reads.take_due().is_empty(), "reported once");

        let credits = Credits::new();
        let credit = credits.pacing(ChannelKind::Migration(1)).credit.unwrap();
        assert!(credits.pacing(ChannelKind::Resumed(1)).credit.is_none());
        for r in due {
            credits.read(r);
        }
        assert_eq!(credit.reported(), READ_STEP + 5);
        // Another channel's report, or one that goes back, moves nothing.
        credits.read(ChannelRead {
            kind: ChannelKind::Migration(0),
            bytes: 1 << 40,
        });
        credits.read(ChannelRead {
            kind: ChannelKind::Migration(1),
            bytes: 1,
        });
        assert_eq!(credit.reported(), READ_STEP + 5);
    }

    #[tokio::test]
    async fn a_sender_waits_for_the_reads_it_runs_ahead_of() {
        let credits = Credits::new();
        let credit = credits.pacing(ChannelKind::Migration(0)).credit.unwrap();
        // Within the window: at once.
        credit.wait(CHANNEL_WINDOW_MIN - 1).await;
        // A window ahead: until the reads come.
        let ahead = CHANNEL_WINDOW_MIN + 10;
        let waiting = tokio::spawn({
            let c = credit.clone();
            async move { c.wait(ahead).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        credits.read(ChannelRead {
            kind: ChannelKind::Migration(0),
            bytes: 11,
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // A wider window lets a waiting sender go too.
        let waiting = tokio::spawn({
            let c = credit.clone();
            async move { c.wait(ahead + CHANNEL_WINDOW_MIN).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        credits.set_window(4 * CHANNEL_WINDOW_MIN);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // A channel opened after the window changed gets the new one.
        let later = credits.pacing(ChannelKind::Migration(1)).credit.unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            later.wait(4 * CHANNEL_WINDOW_MIN - 1),
        )
        .await
        .unwrap();
    }
}
