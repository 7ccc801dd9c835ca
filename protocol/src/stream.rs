//! Migrations whose state is an opaque byte stream: the `qemu` backend,
//! where QEMU produces and consumes its own migration stream (the main
//! channel with its return path, multifd channels) and, for disks, NBD
//! connections. Convoy carries each such *channel* on one QUIC stream pair
//! and hashes every byte it carries, in each direction.
//!
//! The receipts of such a migration bind the channels through two roots
//! ([`roots`]): `memory_root` is the root over every byte sent from the
//! source to the destination, `device` the root over every byte the
//! destination sent back (QEMU's return path, NBD replies). The source and
//! the destination each compute them over what they carried. The source
//! announces what it sent in [`StreamsDone`] as soon as its own side of
//! every channel has ended (not waiting for the destination's QEMU to
//! close the way back: that would cost the pause a round trip); the
//! destination compares it with what it received ([`compare`]) before it
//! signs `Ready`, and the source compares the `Ready` receipt's roots,
//! both ways, with its own before it signs `Sent` (the way back is checked
//! there: the source is the side that received it). A single byte
//! changed, dropped or added on any channel, either way, stops the
//! migration with the VM still at the source.
//!
//! The message sequence (driven by the agent; QEMU does the copying):
//!
//! | step | message | meaning |
//! |------|---------|---------|
//! | 1 | `Propose` with a [`QemuManifest`] | the VM's definition, channels, mode |
//! | 2 | `Accept` / `Reject` | the destination's QEMU waits, paused (`-S`) |
//! | 3 | [`ChannelOpen`] on each stream | then raw bytes both ways |
//! | 4 | [`Switch`] both ways (post-copy only) | the source commits: the VM runs at the destination from now on |
//! | 5 | [`StreamsDone`] | QEMU finished at the source; what it sent on each channel |
//! | 6 | `Ready` | the destination's QEMU holds the state; its roots |
//! | 7 | `Handover` | the source's `Sent` receipt; it will never run the VM again |
//! | 8 | `Started` | the guest runs at the destination |

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::model::MigrationMode;
use crate::names::MigrationId;
use crate::vm::QemuVmSpec;

/// Most channels one stream migration may carry (the main channel, 16
/// multifd channels, 8 disks, with room to spare).
pub const MAX_CHANNELS: usize = 32;

/// Most disks a QEMU migration may copy.
pub const MAX_DISKS: usize = 8;

/// What a channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelKind {
    /// A QEMU migration connection, in the order QEMU opened them (0 is
    /// the main channel with the return path; then multifd channels).
    Migration(u16),
    /// The NBD connection that mirrors disk `n`.
    Nbd(u16),
    /// Post-copy recovery: the main migration channel of the `n`-th new
    /// link (from 1), after the one before it broke ([`LinkCut`]).
    Resumed(u16),
}

impl std::fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelKind::Migration(0) => f.write_str("main migration channel"),
            ChannelKind::Migration(n) => write!(f, "multifd channel {n}"),
            ChannelKind::Nbd(n) => write!(f, "disk {n} (NBD)"),
            ChannelKind::Resumed(n) => write!(f, "migration channel of recovery {n}"),
        }
    }
}

/// First frame of every stream of a stream migration; raw bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelOpen {
    /// The migration.
    pub migration: MigrationId,
    /// What the stream carries.
    pub kind: ChannelKind,
}

/// A disk the destination must create and the source mirrors into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// Virtual size, bytes.
    pub size: u64,
    /// Image format (`raw` or `qcow2`).
    pub format: String,
}

/// What a QEMU migration will carry, for the destination to launch an
/// identical QEMU (through its own allow-lists) and decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuManifest {
    /// The VM's definition, with paths relative to the image directory
    /// (the destination resolves them in its own).
    pub spec: QemuVmSpec,
    /// Pre-copy, post-copy or hybrid.
    pub mode: MigrationMode,
    /// Multifd channels (0: none).
    pub multifd_channels: u16,
    /// Disks copied (with `--copy-storage`; empty otherwise), in the order
    /// of `spec.disks`.
    pub disks: Vec<DiskManifest>,
}

/// Why a [`QemuManifest`] is out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// More multifd channels than a plan may have streams.
    #[error("{0} multifd channels, at most {max}", max = crate::model::MAX_STREAMS)]
    MultifdChannels(u16),
    /// Multifd asked with post-copy or hybrid.
    #[error("multifd channels with post-copy (QEMU cannot combine them)")]
    MultifdWithPostcopy,
    /// More disks than [`MAX_DISKS`].
    #[error("{0} disks, at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// The copied disks are not the VM's disks.
    #[error("copied disks do not match the VM's disks")]
    DisksMismatch,
    /// A disk image format other than raw or qcow2 (the peer's text).
    #[error("disk format {0:?} (raw or qcow2)")]
    DiskFormat(String),
    /// The disks' sizes do not add up in 64 bits.
    #[error("the disks' sizes overflow when added")]
    DiskBytesOverflow,
}

impl QemuManifest {
    /// Checks the bounds a decoder cannot.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if usize::from(self.multifd_channels) > usize::from(crate::model::MAX_STREAMS) {
            return Err(ManifestError::MultifdChannels(self.multifd_channels));
        }
        if self.multifd_channels > 0 && self.mode != MigrationMode::Precopy {
            return Err(ManifestError::MultifdWithPostcopy);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ManifestError::TooManyDisks(self.disks.len()));
        }
        if !self.disks.is_empty() && self.disks.len() != self.spec.disks.len() {
            return Err(ManifestError::DisksMismatch);
        }
        for d in &self.disks {
            if !matches!(d.format.as_str(), "raw" | "qcow2") {
                return Err(ManifestError::DiskFormat(d.format.clone()));
            }
        }
        if self.disk_bytes().is_none() {
            return Err(ManifestError::DiskBytesOverflow);
        }
        Ok(())
    }

    /// The copied disks' bytes together; `None` if the sum overflows.
    pub fn disk_bytes(&self) -> Option<u64> {
        self.disks
            .iter()
            .try_fold(0u64, |n, d| n.checked_add(d.size))
    }

    /// The channels the source will open, at most.
    pub fn channels(&self) -> usize {
        1 + usize::from(self.multifd_channels) + self.disks.len()
    }
}

/// What one side carried on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelDigests {
    /// The channel.
    pub kind: ChannelKind,
    /// Bytes from the source to the destination.
    pub out_bytes: u64,
    /// BLAKE3 of them, in order.
    pub out: Digest,
    /// Bytes from the destination back to the source.
    pub back_bytes: u64,
    /// BLAKE3 of them, in order.
    pub back: Digest,
}

/// What the source sent on one channel (its out direction, ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSent {
    /// The channel.
    pub kind: ChannelKind,
    /// Bytes from the source to the destination.
    pub bytes: u64,
    /// BLAKE3 of them, in order.
    pub digest: Digest,
}

impl ChannelDigests {
    /// Its way out alone.
    pub fn sent(&self) -> ChannelSent {
        ChannelSent {
            kind: self.kind,
            bytes: self.out_bytes,
            digest: self.out,
        }
    }
}

/// Source → destination: QEMU has finished sending; what the source sent
/// on every channel. (The way back is checked by the source, against
/// `Ready`'s root.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamsDone {
    /// Every channel, in the order [`ChannelKind`] sorts them.
    pub channels: Vec<ChannelSent>,
}

/// Destination → source, during the copy: the destination's QEMU has read
/// `bytes` of channel `kind` (from its start). The source sends each
/// channel only so far ahead of this (a window per channel), so that what
/// the destination's QEMU has yet to read when the source's is done is
/// small: it is read inside the downtime. Reports come as the reads
/// advance; one that goes back counts for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRead {
    /// The channel.
    pub kind: ChannelKind,
    /// Bytes of it the destination's QEMU has read.
    pub bytes: u64,
}

/// Post-copy: the source commits to the switch (it will not run the VM
/// again); the destination answers with the same message once its QEMU
/// will start the guest as soon as the device state arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    /// The migration.
    pub migration: MigrationId,
}

/// A control round trip timed by the source after `Accept`: the source
/// sends it, the destination sends the same message back at once. The
/// handover's two round trips fall inside a pre-copy migration's downtime,
/// so the source takes them off the downtime target it gives QEMU
/// ([`qemu_downtime_limit`]). (`Propose`→`Accept` cannot serve: the
/// destination launches its QEMU in between.) Page migrations time their
/// control path with it too, where the destination accepted
/// [`crate::message::Capabilities::PROBE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Which probe (the answer names the same).
    pub seq: u32,
}

/// The `downtime-limit` for QEMU, in milliseconds, when the plan's target
/// is `target_ms` and a control round trip takes `rtt`: the target less
/// the handover's two round trips (`StreamsDone`→`Ready`,
/// `Handover`→`Started`), or `None` when they alone take it all (QEMU
/// would have no time left to stop and copy).
pub fn qemu_downtime_limit(target_ms: u32, rtt: std::time::Duration) -> Option<u64> {
    let handover_ms = crate::model::handover_time(rtt).as_micros().div_ceil(1000);
    let left = u128::from(target_ms).checked_sub(handover_ms)?;
    (left > 0).then(|| u64::try_from(left).unwrap_or(u64::MAX))
}

/// QEMU's `downtime-limit` during pass `pass` (its `dirty-sync-count`, the
/// first pass being 1), milliseconds: the ramp pre-copy follows for sim
/// VMs ([`crate::model::ramp_pages`]) held under `limit_ms` (from
/// [`qemu_downtime_limit`]), and the limit itself for the last two passes
/// `max_rounds` allows. QEMU stops the guest once what is left fits the
/// limit at the rate it measures: a guest whose passes shrink gets a short
/// stop-and-copy after a few more short passes, one whose passes do not
/// still stops by the operator's target, a few passes later.
pub fn qemu_downtime_ramp(limit_ms: u64, pass: u64, max_rounds: u32) -> u64 {
    let pass = u32::try_from(pass).unwrap_or(u32::MAX);
    let Some(aim) = crate::model::ramp_pages(pass, max_rounds) else {
        return limit_ms;
    };
    u64::try_from(aim.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, limit_ms.max(1))
}

/// Post-copy recovery of a stream migration, both ways on the new link's
/// control stream (the destination first, once its QEMU listens for the
/// recovery; the source answers): what this side carried of each channel
/// of the link that broke. Bytes in flight at the cut are lost, so each
/// side checks that what the other *received* from it is a prefix of what
/// it sent (same length or shorter, same digest over that length). The
/// broken link's channels then count, in the roots, as they were received
/// ([`agreed`]): out as the destination received it, back as the source
/// did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCut {
    /// The migration.
    pub migration: MigrationId,
    /// The new link's number (from 1): its channel is
    /// [`ChannelKind::Resumed`] of it.
    pub link: u16,
    /// The broken link's channels, as this side carried them.
    pub channels: Vec<ChannelDigests>,
}

/// One channel of a broken link as both sides count it once each checked
/// the other's prefix: the source's digests (`source`) for what came back,
/// the destination's (`destination`) for what went out. `None` when they
/// name different channels.
pub fn agreed(source: &ChannelDigests, destination: &ChannelDigests) -> Option<ChannelDigests> {
    (source.kind == destination.kind).then_some(ChannelDigests {
        kind: source.kind,
        out_bytes: destination.out_bytes,
        out: destination.out,
        back_bytes: source.back_bytes,
        back: source.back,
    })
}

fn order(k: &ChannelKind) -> (u8, u16) {
    match k {
        ChannelKind::Migration(n) => (0, *n),
        ChannelKind::Nbd(n) => (1, *n),
        ChannelKind::Resumed(n) => (2, *n),
    }
}

/// Sorts channels into their canonical order.
pub fn canonical(mut channels: Vec<ChannelDigests>) -> Vec<ChannelDigests> {
    channels.sort_by_key(|c| order(&c.kind));
    channels
}

/// The two roots receipts bind: over every byte sent source → destination,
/// and over every byte sent back, each covering every channel (its kind,
/// length and digest) in canonical order.
pub fn roots(channels: &[ChannelDigests]) -> (Digest, Digest) {
    let mut out = blake3::Hasher::new_derive_key("convoy 2026-11 stream root out v1");
    let mut back = blake3::Hasher::new_derive_key("convoy 2026-11 stream root back v1");
    let sorted = canonical(channels.to_vec());
    for h in [&mut out, &mut back] {
        h.update(&(sorted.len() as u64).to_le_bytes());
    }
    for c in &sorted {
        let (kind, n) = order(&c.kind);
        for h in [&mut out, &mut back] {
            h.update(&[kind]);
            h.update(&n.to_le_bytes());
        }
        out.update(&c.out_bytes.to_le_bytes());
        out.update(&c.out.0);
        back.update(&c.back_bytes.to_le_bytes());
        back.update(&c.back.0);
    }
    (
        Digest(*out.finalize().as_bytes()),
        Digest(*back.finalize().as_bytes()),
    )
}

/// Why two sides' digests differ, naming the first difference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StreamMismatch(pub String);

/// Compares what the source says it sent with what the destination
/// received: the same channels, and on each the same bytes. (The way back
/// is the source's to check: [`roots`] in `Ready`.)
pub fn compare(
    source: &[ChannelSent],
    destination: &[ChannelDigests],
) -> Result<(), StreamMismatch> {
    let d = canonical(destination.to_vec());
    let mut s = source.to_vec();
    s.sort_by_key(|c| order(&c.kind));
    if s.len() > MAX_CHANNELS || d.len() > MAX_CHANNELS {
        return Err(StreamMismatch(format!("more than {MAX_CHANNELS} channels")));
    }
    for c in &s {
        let Some(o) = d.iter().find(|o| o.kind == c.kind) else {
            return Err(StreamMismatch(format!("the {} never arrived", c.kind)));
        };
        if (c.bytes, c.digest) != (o.out_bytes, o.out) {
            return Err(StreamMismatch(format!(
                "{}: the source sent {} bytes, the destination received {} different ones",
                c.kind, c.bytes, o.out_bytes
            )));
        }
    }
    if let Some(extra) = d.iter().find(|o| !s.iter().any(|c| c.kind == o.kind)) {
        return Err(StreamMismatch(format!(
            "the {} arrived but the source never sent it",
            extra.kind
        )));
    }
    Ok(())
}

/// The source's check of `Ready`: the destination's two roots
/// (`memory_root`, `device`) against those of what the source carried,
/// `ours` — the way out (which the destination compared already) and the
/// way back (which only the source, its receiver, can check). Returns
/// the two roots, which the receipts then bind.
pub fn check_ready(
    ours: &[ChannelDigests],
    memory_root: Digest,
    device: Digest,
) -> Result<(Digest, Digest), StreamMismatch> {
    let (out, back) = roots(ours);
    if memory_root != out {
        return Err(StreamMismatch(
            "the destination holds other bytes than were sent".into(),
        ));
    }
    if device != back {
        return Err(StreamMismatch(
            "the destination sent back other bytes than arrived here".into(),
        ));
    }
    Ok((out, back))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_gets_the_target_less_the_handovers_two_round_trips() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        assert_eq!(qemu_downtime_limit(300, ms(0)), Some(300));
        assert_eq!(qemu_downtime_limit(300, ms(100)), Some(100));
        // A part of a millisecond counts as a whole one.
        assert_eq!(
            qemu_downtime_limit(300, Duration::from_micros(100_100)),
            Some(99)
        );
        // The round trips alone take it all, or more.
        assert_eq!(qemu_downtime_limit(300, ms(150)), None);
        assert_eq!(qemu_downtime_limit(300, ms(151)), None);
        assert_eq!(qemu_downtime_limit(0, ms(0)), None);
        assert_eq!(qemu_downtime_limit(u32::MAX, Duration::MAX), None);
    }

    #[test]
    fn qemu_ramps_its_downtime_limit_up_to_the_ceiling() {
        // 30 ms for the first four passes, then half as much again each
        // pass, never above the limit; the last two passes allowed get the
        // limit itself.
        let ramp: Vec<u64> = (1..=12).map(|p| qemu_downtime_ramp(280, p, 30)).collect();
        assert_eq!(ramp, [30, 30, 30, 30, 45, 67, 101, 151, 227, 280, 280, 280]);
        assert_eq!(qemu_downtime_ramp(280, 28, 30), 280);
        assert_eq!(qemu_downtime_ramp(280, 2, 3), 280);
        // A limit under the ramp's start holds from the first pass.
        assert_eq!(qemu_downtime_ramp(10, 1, 30), 10);
        assert_eq!(qemu_downtime_ramp(1, 1, 30), 1);
        // Absurd passes saturate.
        assert_eq!(qemu_downtime_ramp(280, u64::MAX, u32::MAX), 280);
        assert_eq!(qemu_downtime_ramp(280, u64::from(u32::MAX), u32::MAX), 280);
    }

    fn ch(kind: ChannelKind, out: u8, back: u8) -> ChannelDigests {
        ChannelDigests {
            kind,
            out_bytes: u64::from(out) * 10,
            out: Digest([out; 32]),
            back_bytes: u64::from(back),
            back: Digest([back; 32]),
        }
    }

    #[test]
    fn roots_do_not_depend_on_order_but_on_every_byte() {
        let a = vec![
            ch(ChannelKind::Migration(0), 1, 2),
            ch(ChannelKind::Migration(1), 3, 0),
        ];
        let b = vec![a[1], a[0]];
        assert_eq!(roots(&a), roots(&b));
        let mut c = a.clone();
        c[1].out_bytes += 1;
        assert_ne!(roots(&a).0, roots(&c).0);
        assert_eq!(roots(&a).1, roots(&c).1);
        let mut d = a.clone();
        d[0].back.0[5] ^= 1;
        assert_eq!(roots(&a).0, roots(&d).0);
        assert_ne!(roots(&a).1, roots(&d).1);
        // A channel relabelled is a different stream.
        let mut e = a.clone();
        e[1].kind = ChannelKind::Nbd(1);
        assert_ne!(roots(&a), roots(&e));
        // One channel fewer is a different stream.
        assert_ne!(roots(&a), roots(&a[..1]));
    }

    #[test]
    fn compare_names_the_first_difference() {
        let d = vec![
            ch(ChannelKind::Migration(0), 1, 2),
            ch(ChannelKind::Nbd(0), 3, 4),
        ];
        let s: Vec<ChannelSent> = d.iter().map(ChannelDigests::sent).collect();
        assert_eq!(compare(&s, &[d[1], d[0]]), Ok(()));
        assert_eq!(compare(&[s[1], s[0]], &d), Ok(()));
        let mut other = d.clone();
        other[1].out.0[0] ^= 1;
        let e = compare(&s, &other).unwrap_err();
        assert!(
            e.0.contains("disk 0 (NBD)") && e.0.contains("received"),
            "{e}"
        );
        let mut more = d.clone();
        more[0].out_bytes += 1;
        let e = compare(&s, &more).unwrap_err();
        assert!(e.0.contains("main migration channel"), "{e}");
        // The way back is not the destination's to compare: the source
        // checks it against Ready's root.
        let mut back = d.clone();
        back[0].back_bytes += 1;
        assert_eq!(compare(&s, &back), Ok(()));
        assert_ne!(roots(&d).1, roots(&back).1);
        let e = compare(&s, &d[..1]).unwrap_err();
        assert!(e.0.contains("never arrived"), "{e}");
        let e = compare(&s[..1], &d).unwrap_err();
        assert!(e.0.contains("never sent"), "{e}");
    }

    #[test]
    fn the_source_checks_both_ways_against_ready() {
        let ours = vec![
            ch(ChannelKind::Migration(0), 1, 2),
            ch(ChannelKind::Migration(1), 3, 0),
        ];
        let (out, back) = roots(&ours);
        assert_eq!(check_ready(&ours, out, back), Ok((out, back)));
        // The destination received (or says it did) other bytes.
        let e = check_ready(&ours, back, back).unwrap_err();
        assert!(e.0.contains("other bytes than were sent"), "{e}");
        // It sent back bytes other than those that arrived here: one byte
        // of the return path changed on the way.
        let mut theirs = ours.clone();
        theirs[0].back.0[31] ^= 1;
        let e = check_ready(&ours, out, roots(&theirs).1).unwrap_err();
        assert!(e.0.contains("sent back"), "{e}");
        // Or more of them.
        theirs = ours.clone();
        theirs[1].back_bytes += 1;
        assert!(check_ready(&ours, out, roots(&theirs).1).is_err());
    }

    #[test]
    fn a_broken_channel_counts_as_received_each_way() {
        let src = ch(ChannelKind::Migration(0), 9, 2);
        let dst = ch(ChannelKind::Migration(0), 7, 4);
        let a = agreed(&src, &dst).unwrap();
        assert_eq!((a.out_bytes, a.out), (dst.out_bytes, dst.out));
        assert_eq!((a.back_bytes, a.back), (src.back_bytes, src.back));
        assert_eq!(agreed(&src, &ch(ChannelKind::Resumed(1), 7, 4)), None);
        // A recovery's channel sorts after the others and is its own stream.
        let r = ch(ChannelKind::Resumed(1), 1, 2);
        let sorted = canonical(vec![r, a]);
        assert_eq!(sorted[1].kind, ChannelKind::Resumed(1));
        let mut relabelled = r;
        relabelled.kind = ChannelKind::Migration(1);
        assert_ne!(roots(&[a, r]), roots(&[a, relabelled]));
    }

    #[test]
    fn manifests_are_bounded() {
        let spec = QemuVmSpec {
            name: "vm".parse().unwrap(),
            binary: "qemu-system-x86_64".into(),
            memory_mib: 128,
            vcpus: 1,
            kernel: Some("vmlinuz".into()),
            initrd: None,
            append: String::new(),
            disks: vec!["d.img".into()],
            accel: crate::ctl::Accel::Tcg,
            attributes: Default::default(),
        };
        let m = QemuManifest {
            spec,
            mode: MigrationMode::Precopy,
            multifd_channels: 2,
            disks: vec![DiskManifest {
                size: 1 << 20,
                format: "raw".into(),
            }],
        };
        assert_eq!(m.validate(), Ok(()));
        assert_eq!(m.channels(), 4);
        let mut bad = m.clone();
        bad.mode = MigrationMode::Postcopy;
        assert_eq!(bad.validate(), Err(ManifestError::MultifdWithPostcopy));
        let mut bad = m.clone();
        bad.multifd_channels = 17;
        assert_eq!(bad.validate(), Err(ManifestError::MultifdChannels(17)));
        let mut bad = m.clone();
        bad.disks[0].format = "vmdk".into();
        assert_eq!(
            bad.validate().map_err(|e| e.to_string()),
            Err("disk format \"vmdk\" (raw or qcow2)".to_string())
        );
        // Sizes a peer sends cannot overflow when added up.
        let mut bad = m.clone();
        bad.spec.disks.push("e.img".into());
        bad.disks[0].size = u64::MAX;
        bad.disks.push(DiskManifest {
            size: 1,
            format: "raw".into(),
        });
        assert_eq!(bad.disk_bytes(), None);
        assert_eq!(bad.validate(), Err(ManifestError::DiskBytesOverflow));
        let mut bad = m;
        bad.disks.push(bad.disks[0].clone());
        assert_eq!(bad.validate(), Err(ManifestError::DisksMismatch));
    }
}
