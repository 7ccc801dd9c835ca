//! Memory reuse when a VM comes back: only changed pages travel, and a
//! retained page that is altered, stale or under the wrong key is refused.

use convoy_protocol::ctl::Outcome;
use convoy_protocol::destination::DestinationError;
use convoy_protocol::digest::{leaf_digest, Digest};
use convoy_protocol::message::Capabilities;
use convoy_protocol::reuse::{RetainedId, RetainedImage, ReuseError, ReuseKey, ReuseOffer};

use crate::harness::{root_of, Pair, PAGE};

// ---- Memory reuse when a VM comes back ----

const PAGES_REUSE: usize = 2048;

/// The first trip, a→b, with a retaining the image under a fresh key: a
/// finished Pair (a's image sealed, b's key and arrival leaves taken).
fn first_trip() -> (Pair, ReuseOffer, Vec<Digest>) {
    let mut p = Pair::new(PAGES_REUSE, 0, 100e6, 1 << 30);
    let offer = ReuseOffer {
        image: RetainedId([5; 16]),
        key: ReuseKey::from_bytes([0x42; 32]),
    };
    p.src.retain_image(offer.clone());
    p.retain = Some(offer);
    p.run();
    assert_eq!(p.summary().outcome, Outcome::Completed);
    let key = p.dst.take_reuse_key().expect("the key travels in Handover");
    let leaves = p.dst.verified_leaves().expect("verified leaves");
    assert_eq!(leaves.len(), PAGES_REUSE);
    (p, key, leaves)
}

/// The trip back, b→a: b's VM runs on from the image it received, with
/// `changed` pages rewritten; a holds `image`; b offers `offer`.
fn trip_back(
    first: &Pair,
    image: RetainedImage,
    offer: Option<ReuseOffer>,
    leaves: Vec<Digest>,
    changed: usize,
) -> Pair {
    let mut p = Pair::with(PAGES_REUSE, 0, 100e6, 1 << 30, |c| {
        c.manifest.reuse = offer.map(Box::new);
    });
    p.vm.pages = first.staging.clone().unwrap();
    // Spread the changes: every tenth-odd page gets a new first word.
    for i in 0..changed {
        let page = (i * 13 + 1) % PAGES_REUSE;
        p.vm.pages[page][..8].copy_from_slice(&(0xdead_0000 + i as u64).to_le_bytes());
    }
    p.arrival_leaves = Some(leaves);
    p.held_image = Some(image);
    p
}

#[test]
fn a_vm_that_comes_back_sends_only_its_changed_pages() {
    let (mut first, offer, leaves) = first_trip();
    let image = first.retained_here.take().expect("a sealed the image");
    // The retained image holds no plaintext page: look for every non-zero
    // page's first 64 bytes in it.
    let sealed = image.sealed_bytes();
    for page in first.paused_image.as_ref().unwrap().iter().step_by(97) {
        if page.iter().any(|b| *b != 0) {
            assert!(!sealed.windows(64).any(|w| w == &page[..64]));
        }
    }
    let there = first.summary().clone();
    // Under 10% of the pages change at b.
    let changed = PAGES_REUSE / 20;
    let mut back = trip_back(&first, image, Some(offer), leaves, changed);
    back.run();
    let s = back.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(s.verified);
    assert_eq!(back.staging.as_ref().unwrap(), &back.vm.pages);
    assert_eq!(s.memory_root, Some(root_of(&back.vm.pages)));
    assert!(s.encodings.retained > 0, "{:?}", s.encodings);
    // Every non-zero unchanged page was retained; changed ones were sent.
    let nonzero = back
        .vm
        .pages
        .iter()
        .filter(|p| p.iter().any(|b| *b != 0))
        .count() as u64;
    assert!(s.encodings.retained + changed as u64 >= nonzero - changed as u64);
    println!(
        "reuse: first trip {} bytes, trip back {} bytes ({} of {} pages changed, {} retained)",
        there.payload_bytes, s.payload_bytes, changed, PAGES_REUSE, s.encodings.retained
    );
    assert!(
        s.payload_bytes * 5 < there.payload_bytes,
        "{} bytes back vs {} there",
        s.payload_bytes,
        there.payload_bytes
    );
}

#[test]
fn an_offer_for_an_image_the_destination_does_not_hold_is_a_normal_migration() {
    let (mut first, offer, leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let other = ReuseOffer {
        image: RetainedId([6; 16]),
        key: offer.key.clone(),
    };
    let mut back = trip_back(&first, image, Some(other), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
    assert!(!back
        .src
        .accepted_capabilities()
        .unwrap()
        .has(Capabilities::REUSE));
    assert_eq!(s.encodings.retained, 0);
    assert_eq!(back.staging.as_ref().unwrap(), &back.vm.pages);
}

#[test]
fn a_retained_page_altered_at_rest_aborts_and_the_vm_stays() {
    let (mut first, offer, leaves) = first_trip();
    let mut image = first.retained_here.take().unwrap();
    // The holding host flips one ciphertext byte of page 2 (unchanged at
    // the source, so sent as retained).
    image.sealed_bytes_mut()[2 * (PAGE + 16) + 100] ^= 1;
    let mut back = trip_back(&first, image, Some(offer), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back.rolled_back && !back.vm.discarded);
    assert!(back
        .dst_errors
        .iter()
        .any(|e| matches!(e, DestinationError::Retained(ReuseError::Unauthentic(2)))));
    assert!(back.started.is_none() && back.staging.is_none());
}

#[test]
fn a_wrong_key_opens_nothing_and_the_vm_stays() {
    let (mut first, _, leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let forged = ReuseOffer {
        image: image.id(),
        key: ReuseKey::from_bytes([0x43; 32]),
    };
    let mut back = trip_back(&first, image, Some(forged), leaves, 10);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back.rolled_back && !back.vm.discarded && back.started.is_none());
}

#[test]
fn a_stale_leaf_at_the_source_is_caught_by_the_root_check() {
    // The source believes page 2 unchanged though it changed: the
    // destination opens the old version, and the root says no.
    let (mut first, offer, mut leaves) = first_trip();
    let image = first.retained_here.take().unwrap();
    let mut back = trip_back(&first, image, Some(offer), leaves.clone(), 0);
    back.vm.pages[2][0] ^= 0xff;
    leaves[2] = leaf_digest(&back.vm.pages[2]);
    back.arrival_leaves = Some(leaves);
    back.run();
    let s = back.summary().clone();
    assert!(matches!(s.outcome, Outcome::Aborted(_)), "{s:?}");
    assert!(back
        .dst_errors
        .iter()
        .any(|e| matches!(e, DestinationError::RootMismatch { .. })));
    assert!(back.rolled_back && !back.vm.discarded && back.started.is_none());
}

#[test]
fn without_an_offer_reuse_is_neither_offered_nor_accepted() {
    let mut p = Pair::new(256, 0, 100e6, 1 << 30);
    p.run();
    assert!(!p
        .src
        .accepted_capabilities()
        .unwrap()
        .has(Capabilities::REUSE));
    assert!(p.dst.take_reuse_key().is_none());
}
