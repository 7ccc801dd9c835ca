//! Round trips and typed refusals of the message codec.

use bytes::Bytes;

use super::*;
use crate::frame::LEN_PREFIX;
use crate::names::MigrationId;
use crate::page::{BatchHeader, MemoryGeometry};
use crate::page::{Compression, PageSize, Run, RunKind};
use crate::receipt::SignedReceipt;

fn propose() -> Message {
    Message::Propose(Propose {
        versions: VersionRange::OURS,
        capabilities: Capabilities::OURS,
        migration: MigrationId([7; 16]),
        vm: "vm1".parse().unwrap(),
        attributes: crate::vm::VmAttributes::default(),
        manifest: Manifest {
            memory: MemoryGeometry::new(PageSize::SIZE_4K, 100).unwrap(),
            data_streams: 2,
            qemu: None,
            postcopy: false,
            start_paused: false,
            plan: crate::model::MigrationPlan::default(),
            reuse: Some(Box::new(crate::reuse::ReuseOffer {
                image: crate::reuse::RetainedId([4; 16]),
                key: crate::reuse::ReuseKey::from_bytes([5; 32]),
            })),
            disks: vec![crate::disk::DiskGeometry {
                name: "root".parse().unwrap(),
                bytes: 8192,
                base: Some(crate::disk::BaseRef {
                    name: "debian".parse().unwrap(),
                    root: crate::digest::Digest([6; 32]),
                }),
            }],
        },
        ticket: crate::ticket::SignedTicket::from_parts(vec![1], vec![2; 64], vec![vec![3]]),
    })
}

fn strip(frame: Vec<u8>) -> Bytes {
    Bytes::from(frame).slice(LEN_PREFIX..)
}

#[test]
fn round_trips() {
    let header = BatchHeader {
        seq: 3,
        round: 2,
        runs: vec![Run {
            gap: 5,
            len: 1,
            kind: RunKind::Data,
        }],
        compression: Compression::None,
    };
    for m in [
        propose(),
        Message::Handover(Handover {
            receipt: SignedReceipt::from_parts(vec![1], vec![2; 64], vec![]),
            reuse: None,
        }),
        Message::Abort(Abort {
            reason: Reason::RootMismatch,
        }),
        Message::PageBatch(header, Bytes::from(vec![1u8; 4096])),
    ] {
        let bytes = m.encode().unwrap();
        assert_eq!(Message::decode(strip(bytes)).unwrap(), m);
    }
}

#[test]
fn bad_input_is_typed() {
    assert_eq!(
        Message::decode(Bytes::from_static(&[0])),
        Err(DecodeError::InvalidTag)
    );
    assert_eq!(
        Message::decode(Bytes::from_static(&[200, 1])),
        Err(DecodeError::UnknownTag(200))
    );
    let mut f = propose().encode().unwrap();
    f.push(0);
    assert!(matches!(
        Message::decode(strip(f)),
        Err(DecodeError::Trailing { extra: 1, .. })
    ));
    let f = propose().encode().unwrap();
    let short = Bytes::from(f[LEN_PREFIX..f.len() - 1].to_vec());
    assert!(matches!(
        Message::decode(short),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        Message::decode(Bytes::from_static(&[tag::HANDOVER, 0, 0, 0, 0, 0])),
        Err(DecodeError::Trailing { .. })
    ));
    // A fault request for no page, or for more than MAX_FETCH.
    for n in [0, MAX_FETCH + 1] {
        let f = Message::Fetch(Fetch {
            pages: (0..n as u64).map(crate::page::PageIndex).collect(),
        })
        .encode()
        .unwrap();
        assert!(
            matches!(
                Message::decode(strip(f)),
                Err(DecodeError::Malformed { .. })
            ),
            "{n} pages"
        );
    }
    let ok = Message::Fetch(Fetch {
        pages: vec![crate::page::PageIndex(9)],
    });
    assert_eq!(Message::decode(strip(ok.encode().unwrap())), Ok(ok));
    // A round end over more streams than any migration has.
    let many = Message::RoundEnd(RoundEnd {
        round: 1,
        batches: vec![1; usize::from(MAX_DATA_STREAMS) + 2],
    });
    assert!(matches!(
        Message::decode(strip(many.encode().unwrap())),
        Err(DecodeError::Malformed { .. })
    ));
    // A link cut naming more channels than a migration may carry.
    let cut = |n: usize| {
        let c = crate::stream::ChannelDigests {
            kind: crate::stream::ChannelKind::Resumed(1),
            out_bytes: 5,
            out: crate::digest::Digest([1; 32]),
            back_bytes: 6,
            back: crate::digest::Digest([2; 32]),
        };
        Message::LinkCut(crate::stream::LinkCut {
            migration: crate::names::MigrationId([7; 16]),
            link: 2,
            channels: vec![c; n],
        })
    };
    assert!(matches!(
        Message::decode(strip(
            cut(crate::stream::MAX_CHANNELS + 1).encode().unwrap()
        )),
        Err(DecodeError::Malformed { .. })
    ));
    for ok in [
        cut(1),
        Message::Probe(crate::stream::Probe { seq: 7 }),
        Message::ChannelRead(crate::stream::ChannelRead {
            kind: crate::stream::ChannelKind::Migration(2),
            bytes: 5 << 30,
        }),
        Message::Lane(Lane {
            migration: crate::names::MigrationId([7; 16]),
            lane: 3,
        }),
        Message::RoundEnd(RoundEnd {
            round: 3,
            batches: vec![4, 5],
        }),
        Message::RoundApplied(RoundApplied { round: 3 }),
        Message::Resume(Resume {
            migration: crate::names::MigrationId([7; 16]),
            ticket: crate::digest::Digest([9; 32]),
        }),
        Message::Resumed(Resumed {
            missing: vec![0b1011, 0],
        }),
        Message::PrecopyResumed(PrecopyResumed {
            confirmed: 2,
            held: vec![0b1011, 0],
        }),
        Message::Inquire(crate::indoubt::Inquiry {
            migration: crate::names::MigrationId([7; 16]),
            ticket: crate::digest::Digest([9; 32]),
            epoch: 2,
        }),
        Message::Statement(crate::signed::Signed::from_parts(
            vec![1, 2, 3],
            vec![4; 64],
            vec![vec![5; 10]],
        )),
    ] {
        assert_eq!(Message::decode(strip(ok.encode().unwrap())), Ok(ok));
    }
}

#[test]
fn invalid_geometry_does_not_decode() {
    // A page size of 3 must be refused while parsing, not later.
    let mut f = propose().encode().unwrap();
    // Find the page-size varint (4096 = 0x80 0x20) and change it to 3.
    let pos = f
        .windows(2)
        .position(|w| w == [0x80, 0x20])
        .expect("page size in encoding");
    f.splice(pos..pos + 2, [3u8]);
    assert!(matches!(
        Message::decode(strip(f)),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn negotiation() {
    let a = VersionRange { min: 1, max: 3 };
    assert_eq!(a.negotiate(VersionRange { min: 2, max: 5 }), Some(3));
    assert_eq!(a.negotiate(VersionRange { min: 4, max: 5 }), None);
}
