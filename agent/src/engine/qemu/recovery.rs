//! Post-copy recovery of a QEMU migration, what both sides share.
//!
//! After the post-copy switch the guest runs at the destination and its
//! memory is split between the hosts, so a broken link must not end the
//! migration. When Convoy's splice of QEMU's channel breaks, it closes
//! QEMU's socket and each QEMU pauses its migration (`postcopy-paused`);
//! the source dials again and sends `Resume` on a new connection; the
//! destination has its QEMU listen for the recovery (`migrate-recover`)
//! and states what it received ([`LinkCut`]); the source checks that, and
//! states what it received; the source's QEMU then resumes (`migrate`
//! with `resume`) over a new channel, [`ChannelKind::Resumed`], and QEMU
//! sends again what the destination lacks.
//!
//! Bytes in flight at the cut are lost, so the broken channel's digests
//! differ at the two ends. Each side keeps the last bytes it sent
//! ([`Tail`]) and checks that what the other received is a prefix of them;
//! the channel then counts, in the roots both receipts bind, as it was
//! received ([`convoy_protocol::stream::agreed`]).

use std::time::Duration;

use convoy_protocol::stream::{ChannelDigests, ChannelKind, LinkCut};
use serde_json::Value;
use tokio::sync::mpsc;

use super::common::{digests, ChanEvent, ChannelError, Fail};
use crate::backend::qemu::tunnel::{Spliced, Tail};
use crate::backend::qemu::vm::QemuVm;
use crate::engine::clock;

/// Most recoveries one migration may make.
pub(crate) const MAX_RECOVERIES: u16 = 8;
/// How long a QEMU may take to pause its migration after its channel
/// broke, and the broken splice to report.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(15);

/// A channel of a broken link, as this side carried it, with the tail of
/// what it sent.
pub(crate) struct Broken {
    pub kind: ChannelKind,
    /// What this side carried in full each way, from its own point of
    /// view (`out`: what it sent).
    pub carried: Spliced,
    pub tail: Tail,
}

impl Broken {
    /// From a splice that ended in a cut with its tail kept; any other end
    /// is handed back.
    pub fn from_event(kind: ChannelKind, e: ChannelError) -> Result<Broken, ChannelError> {
        match e {
            ChannelError::Splice(cut) => {
                let cut = *cut;
                match cut.tail {
                    Some(tail) => Ok(Broken {
                        kind,
                        carried: cut.partial,
                        tail,
                    }),
                    None => Err(ChannelError::Splice(Box::new(
                        crate::backend::qemu::tunnel::Cut { tail: None, ..cut },
                    ))),
                }
            }
            other => Err(other),
        }
    }

    /// Checks that what the peer says it received from us (`received`
    /// bytes with digest `digest`) is a prefix of what we sent.
    pub fn check_prefix(&self, received: u64, digest: [u8; 32]) -> Result<(), String> {
        match self.tail.prefix(received) {
            Some(d) if d == digest => Ok(()),
            Some(_) => Err(format!(
                "the {}: the {received} bytes the peer received are not what was sent",
                self.kind
            )),
            None => Err(format!(
                "the {}: the peer received {received} bytes, of {} sent, outside the last ones \
                 kept to check",
                self.kind,
                self.tail.total(),
            )),
        }
    }
}

/// The channel QEMU's migration runs on after `recoveries` recoveries.
pub(crate) fn live_channel(recoveries: u16) -> ChannelKind {
    match recoveries {
        0 => ChannelKind::Migration(0),
        n => ChannelKind::Resumed(n),
    }
}

/// Waits for `channel`'s splice to end after a cut; other channels ending
/// meanwhile are counted in `done`, a clean end of `channel` is refused.
pub(crate) async fn broken_channel(
    chans: &mut mpsc::UnboundedReceiver<ChanEvent>,
    channel: ChannelKind,
    done: &mut Vec<ChannelDigests>,
    opened: &mut usize,
) -> Result<Broken, Fail> {
    let end = tokio::time::Instant::now() + PAUSE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(end, chans.recv()).await {
            Err(_) => {
                return Err(Fail::local(format!(
                    "the {channel} did not end after the link broke"
                )))
            }
            Ok(None) => return Err(Fail::local("the channels' tasks ended")),
            Ok(Some(ChanEvent::Opened)) => *opened += 1,
            // (Its Done names what went out too.)
            Ok(Some(ChanEvent::Sent(..))) => {}
            Ok(Some(ChanEvent::Bad(e))) => return Err(Fail::link(e)),
            Ok(Some(ChanEvent::Done(kind, Ok(sp)))) if kind != channel => {
                done.push(digests(kind, &sp));
            }
            Ok(Some(ChanEvent::Done(kind, Ok(_)))) => {
                return Err(Fail::local(format!(
                    "the {kind} ended cleanly while its link broke"
                )))
            }
            Ok(Some(ChanEvent::Done(kind, Err(e)))) if kind == channel => {
                return Broken::from_event(kind, e).map_err(|e| Fail::link(format!("{kind}: {e}")));
            }
            Ok(Some(ChanEvent::Done(kind, Err(e)))) => {
                return Err(Fail::link(format!("{kind}: {e}")))
            }
        }
    }
}

/// Waits for QEMU's migration to be in `status` (`postcopy-paused`), and
/// returns QEMU's `query-migrate`; any other end is an error.
pub(crate) async fn until_status(qvm: &QemuVm, status: &str) -> Result<Value, Fail> {
    let end = clock::now() + PAUSE_TIMEOUT;
    loop {
        let q = qvm
            .execute("query-migrate", None)
            .await
            .map_err(|e| Fail::local(format!("QEMU query-migrate: {e}")))?;
        match q["status"].as_str() {
            Some(s) if s == status => return Ok(q),
            Some(s @ ("failed" | "cancelled" | "completed")) => {
                return Err(Fail::local(format!(
                    "QEMU's migration is {s}, not {status}, after the link broke"
                )))
            }
            s if clock::now() > end => {
                return Err(Fail::local(format!(
                    "QEMU's migration is {}, not {status}, {} s after the link broke",
                    s.unwrap_or("?"),
                    PAUSE_TIMEOUT.as_secs()
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether a control-stream event is the link's loss (not a message,
/// not bytes that do not decode: those are the peer's).
pub(crate) fn is_loss(c: &Option<super::common::Control>) -> bool {
    use crate::transport::WireError;
    matches!(
        c,
        None | Some(
            Ok(None)
                | Err(WireError::Read(_)
                    | WireError::Write(_)
                    | WireError::Io(_)
                    | WireError::Truncated
                    | WireError::Closed(_))
        )
    )
}

/// Checks the peer's [`LinkCut`] for the new link `link` against the one
/// channel that broke here.
pub(crate) fn their_view(
    cut: &LinkCut,
    migration: convoy_protocol::names::MigrationId,
    link: u16,
    broken: ChannelKind,
) -> Result<ChannelDigests, String> {
    if cut.migration != migration || cut.link != link {
        return Err(format!(
            "a link cut for link {} of another migration or link (expected {link})",
            cut.link
        ));
    }
    match cut.channels.as_slice() {
        [c] if c.kind == broken => Ok(*c),
        _ => Err(format!(
            "the link cut names other channels than the {broken} that broke"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;
    use crate::backend::qemu::tunnel::{Carried, Cut};
    use convoy_protocol::digest::Digest;
    use convoy_protocol::names::MigrationId;

    fn broken(sent: &[u8]) -> Broken {
        let mut tail = Tail::new(1 << 20);
        tail.push_for_test(sent);
        let carried = Carried {
            bytes: sent.len() as u64,
            digest: blake3::hash(sent).into(),
        };
        let cut = Cut {
            error: std::io::Error::other("cut"),
            partial: Spliced {
                out: carried,
                back: carried,
            },
            tail: Some(tail),
        };
        Broken::from_event(
            ChannelKind::Migration(0),
            ChannelError::Splice(Box::new(cut)),
        )
        .unwrap()
    }

    #[test]
    fn what_the_peer_received_must_be_a_prefix_of_what_was_sent() {
        let sent: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let b = broken(&sent);
        // Everything, or less: a prefix.
        for n in [50_000usize, 31_337, 0] {
            b.check_prefix(n as u64, blake3::hash(&sent[..n]).into())
                .unwrap();
        }
        // The right length with other bytes, or more than was sent.
        let mut other = sent[..1000].to_vec();
        other[10] ^= 1;
        let e = b
            .check_prefix(1000, blake3::hash(&other).into())
            .unwrap_err();
        assert!(e.contains("not what was sent"), "{e}");
        let e = b.check_prefix(50_001, [0; 32]).unwrap_err();
        assert!(e.contains("50001"), "{e}");
    }

    #[test]
    fn a_cut_without_a_tail_cannot_be_recovered() {
        let cut = Cut {
            error: std::io::Error::other("cut"),
            partial: Spliced {
                out: Carried {
                    bytes: 0,
                    digest: [0; 32],
                },
                back: Carried {
                    bytes: 0,
                    digest: [0; 32],
                },
            },
            tail: None,
        };
        let e = ChannelError::Splice(Box::new(cut));
        assert!(Broken::from_event(ChannelKind::Nbd(0), e).is_err());
    }

    #[test]
    fn a_link_cut_must_name_the_channel_that_broke_for_this_link() {
        let m = MigrationId([1; 16]);
        let c = ChannelDigests {
            kind: ChannelKind::Migration(0),
            out_bytes: 1,
            out: Digest([1; 32]),
            back_bytes: 2,
            back: Digest([2; 32]),
        };
        let cut = |migration, link, channels| LinkCut {
            migration,
            link,
            channels,
        };
        let kind = ChannelKind::Migration(0);
        assert_eq!(their_view(&cut(m, 1, vec![c]), m, 1, kind), Ok(c));
        assert!(their_view(&cut(m, 2, vec![c]), m, 1, kind).is_err());
        assert!(their_view(&cut(MigrationId([2; 16]), 1, vec![c]), m, 1, kind).is_err());
        assert!(their_view(&cut(m, 1, vec![c, c]), m, 1, kind).is_err());
        assert!(their_view(&cut(m, 1, vec![]), m, 1, kind).is_err());
        assert!(their_view(&cut(m, 1, vec![c]), m, 1, ChannelKind::Resumed(1)).is_err());
    }
}
