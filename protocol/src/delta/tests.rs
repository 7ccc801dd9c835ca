//! Unit tests of the delta codec and the page cache.

use super::*;

/// splitmix64 bytes: incompressible.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    (0..n.div_ceil(8) as u64)
        .flat_map(|i| {
            let mut z = (i + seed * 1_000_003)
                .wrapping_add(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .take(n)
        .collect()
}

fn round_trip(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    assert!(encode(old, new, &mut d, usize::MAX));
    let mut page = old.to_vec();
    apply(&mut page, &d).unwrap();
    assert_eq!(page, new);
    d
}

#[test]
fn equal_pages_give_the_empty_delta() {
    let p = noise(4096, 1);
    assert!(round_trip(&p, &p).is_empty());
}

#[test]
fn a_few_changed_bytes_cost_a_few_bytes() {
    let old = noise(4096, 1);
    let mut new = old.clone();
    new[0] ^= 1;
    new[4095] ^= 0x80;
    // [0, 1, x] then [4094, 1, y]: 4094 takes two varint bytes.
    assert_eq!(round_trip(&old, &new), vec![0, 1, 1, 0xfe, 0x1f, 1, 0x80]);
}

#[test]
fn short_unchanged_stretches_stay_in_the_literal() {
    let old = vec![0u8; 64];
    for gap in 1..6 {
        let mut new = old.clone();
        new[10] = 1;
        new[11 + gap] = 2;
        let d = round_trip(&old, &new);
        let pairs = if gap < MIN_ZERO_RUN { 1 } else { 2 };
        let literal = if gap < MIN_ZERO_RUN { gap + 2 } else { 2 };
        assert_eq!(d.len(), pairs * 2 + literal, "gap {gap}: {d:?}");
    }
}

#[test]
fn sixty_four_scattered_bytes() {
    let old = noise(4096, 2);
    let mut new = old.clone();
    for i in 0..64 {
        new[i * 61 + 7] ^= 0x5a;
    }
    let d = round_trip(&old, &new);
    // Three bytes a changed byte: two lengths and the literal.
    assert_eq!(d.len(), 64 * 3);
}

#[test]
fn the_limit_is_respected_and_out_is_kept() {
    let old = noise(4096, 3);
    let new = noise(4096, 4);
    let mut out = vec![9, 9];
    assert!(!encode(&old, &new, &mut out, 1024));
    assert_eq!(out, vec![9, 9]);
    let mut small = old.clone();
    small[100] ^= 1;
    assert!(!encode(&old, &small, &mut out, 2));
    assert!(encode(&old, &small, &mut out, 3));
    assert_eq!(out, vec![9, 9, 100, 1, 1]);
    assert!(!encode(&old, &new[..10], &mut out, usize::MAX));
}

#[test]
fn whole_page_changes_round_trip() {
    round_trip(&noise(4096, 5), &noise(4096, 6));
    round_trip(&[], &[]);
    round_trip(&[1], &[2]);
    round_trip(&[1, 2, 3, 4], &[1, 9, 9, 4]);
}

fn refused(page_len: usize, delta: &[u8]) -> DeltaError {
    let mut page = noise(page_len, 7);
    let before = page.clone();
    let e = apply(&mut page, delta).unwrap_err();
    assert_eq!(page, before, "a refused delta must leave the page alone");
    assert_eq!(check(delta, page_len), Err(e.clone()));
    e
}

#[test]
fn hostile_deltas_are_typed_errors_and_change_nothing() {
    // A good first pair, then a pair that runs past the end.
    assert_eq!(
        refused(16, &[0, 2, 1, 1, 10, 5, 1, 1, 1, 1, 1]),
        DeltaError::PastPageEnd {
            offset: 12,
            len: 5,
            page: 16
        }
    );
    assert!(matches!(
        refused(16, &[16, 1, 1]),
        DeltaError::PastPageEnd { len: 16, .. }
    ));
    assert_eq!(refused(16, &[0x80]), DeltaError::TruncatedVarint { at: 0 });
    assert_eq!(refused(16, &[0]), DeltaError::TruncatedVarint { at: 1 });
    assert_eq!(refused(16, &[0xff; 11]), DeltaError::BadVarint { at: 0 });
    let mut big = vec![0xff; 9];
    big.push(0x02);
    assert_eq!(refused(16, &big), DeltaError::BadVarint { at: 0 });
    assert_eq!(refused(16, &[0x81, 0]), DeltaError::BadVarint { at: 0 });
    assert_eq!(refused(16, &[1, 0]), DeltaError::EmptyLiteral { at: 1 });
    assert_eq!(
        refused(16, &[0, 1, 1, 0, 1, 1]),
        DeltaError::EmptyZeroRun { at: 3 }
    );
    assert_eq!(
        refused(16, &[1, 4, 1, 1]),
        DeltaError::TruncatedLiteral { at: 2, len: 4 }
    );
    assert_eq!(
        refused(4, &[0, 4, 1, 1, 1, 1, 0]),
        DeltaError::TrailingBytes { extra: 1 }
    );
    // u64::MAX lengths do not overflow the offset arithmetic.
    let mut huge = vec![1];
    huge.extend([0xff; 9]);
    huge.push(1);
    assert!(matches!(refused(16, &huge), DeltaError::PastPageEnd { .. }));
    // Any delta is refused by an empty page, except the empty delta.
    assert!(apply(&mut [], &[]).is_ok());
    assert!(matches!(
        refused(0, &[0, 1, 1]),
        DeltaError::TrailingBytes { .. }
    ));
}

#[test]
fn varints_round_trip_at_their_edges() {
    for v in [0, 1, 127, 128, 16383, 16384, u64::MAX / 2, u64::MAX] {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        assert_eq!(out.len(), varint_len(v));
        let mut pos = 0;
        assert_eq!(read_varint(&out, &mut pos), Ok(v));
        assert_eq!(pos, out.len());
    }
}

#[test]
fn the_cache_never_grows_past_its_capacity() {
    let mut c = PageCache::new(4 * 4096 + 100, PageSize::SIZE_4K);
    assert_eq!(c.capacity(), 4);
    let (slab, bytes) = (c.slab.as_ptr(), c.allocated_bytes());
    assert!(bytes < 4 * 4096 + 4 * 64, "{bytes}");
    for i in 0..100u64 {
        c.insert(PageIndex(i), &noise(4096, i));
        assert!(c.len() <= 4);
    }
    assert_eq!(c.len(), 4);
    assert_eq!(c.slab.as_ptr(), slab, "the slab never moves");
    assert_eq!(c.allocated_bytes(), bytes, "nothing grows");
    assert_eq!(c.stats().evictions, 96);
    // The last four are there, intact.
    for i in 96..100u64 {
        assert_eq!(c.get(PageIndex(i)), Some(&noise(4096, i)[..]));
    }
    assert_eq!(c.get(PageIndex(0)), None);
    assert_eq!(
        c.stats(),
        CacheStats {
            hits: 4,
            misses: 1,
            evictions: 96
        }
    );
}

#[test]
fn clock_keeps_pages_that_are_sent_again() {
    let page = |b: u8| vec![b; 4096];
    let mut c = PageCache::new(3 * 4096, PageSize::SIZE_4K);
    for i in 0..3u8 {
        c.insert(PageIndex(u64::from(i)), &page(i));
    }
    // Page 1 is sent again: looked up, then replaced.
    assert!(c.get(PageIndex(1)).is_some());
    c.insert(PageIndex(1), &page(11));
    // Two new pages evict 0 and 2, not the hot page 1.
    c.insert(PageIndex(3), &page(3));
    c.insert(PageIndex(4), &page(4));
    assert_eq!(c.get(PageIndex(1)), Some(&page(11)[..]));
    assert!(c.get(PageIndex(0)).is_none());
    assert!(c.get(PageIndex(2)).is_none());
    assert!(c.get(PageIndex(3)).is_some());
    assert_eq!(c.stats().evictions, 2);
}

#[test]
fn removed_pages_free_their_slot() {
    let mut c = PageCache::new(2 * 4096, PageSize::SIZE_4K);
    c.insert(PageIndex(1), &[1; 4096]);
    c.insert(PageIndex(2), &[2; 4096]);
    c.remove(PageIndex(1));
    c.insert(PageIndex(3), &[3; 4096]);
    assert_eq!(c.stats().evictions, 0);
    assert_eq!(c.len(), 2);
    // A slice of the wrong length is not stored and drops the old one.
    c.insert(PageIndex(2), &[2; 10]);
    assert!(c.get(PageIndex(2)).is_none());
    assert_eq!(c.len(), 1);
}

#[test]
fn churn_keeps_the_index_consistent() {
    // Few slots, many colliding probes: every lookup must return the
    // last version inserted, or nothing, never another page's.
    let mut c = PageCache::new(37 * 4096, PageSize::SIZE_4K);
    let bytes = c.allocated_bytes();
    let mut last = std::collections::HashMap::new();
    let mut x = 1u64;
    for step in 0..20_000u64 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let idx = PageIndex((x >> 33) % 200);
        match (x >> 20) % 4 {
            0 => {
                c.remove(idx);
                last.remove(&idx);
            }
            1 => {
                if let Some(p) = c.get(idx) {
                    assert_eq!(Some(&p[..8]), last.get(&idx).map(|v: &[u8; 8]| &v[..]));
                }
            }
            _ => {
                let mut p = vec![0u8; 4096];
                p[..8].copy_from_slice(&step.to_le_bytes());
                c.insert(idx, &p);
                last.insert(idx, step.to_le_bytes());
            }
        }
        assert!(c.len() <= 37);
    }
    let held = (0..200).filter(|&i| c.get(PageIndex(i)).is_some()).count();
    assert_eq!(held, c.len());
    assert!(c.stats().evictions > 1000, "{:?}", c.stats());
    assert_eq!(c.allocated_bytes(), bytes);
}

#[test]
fn a_cache_under_one_page_holds_nothing() {
    let mut c = PageCache::new(100, PageSize::SIZE_4K);
    c.insert(PageIndex(1), &[1; 4096]);
    assert!(c.is_empty());
    assert!(c.get(PageIndex(1)).is_none());
}

#[test]
fn a_sweep_admitted_by_what_is_left_keeps_what_one_storing_all_keeps() {
    // 1 000 pages sent once each through 64 slots (round 1), every third
    // one as zero (removed, not stored): storing the pages until the
    // cache is full and then only those with at most 128 left, themselves
    // counted, ends with the same versions as storing every one, after
    // 85 evictions instead of 602.
    let (slots, n) = (64usize, 1_000u64);
    let mut all = PageCache::new(slots * 4096, PageSize::SIZE_4K);
    let mut some = PageCache::new(slots * 4096, PageSize::SIZE_4K);
    for i in 0..n {
        let p = noise(4096, i);
        some.admit_within(usize::try_from(n - i).unwrap());
        for c in [&mut all, &mut some] {
            if i % 3 == 0 {
                c.remove(PageIndex(i));
            } else {
                c.insert(PageIndex(i), &p);
            }
        }
    }
    assert_eq!(all.stats().evictions, 666 - slots as u64);
    assert_eq!(some.stats().evictions, 85);
    for i in 0..n {
        assert_eq!(all.get(PageIndex(i)), some.get(PageIndex(i)), "page {i}");
    }
    assert_eq!(all.len(), slots);
    assert_eq!(some.len(), slots);
}

#[test]
fn a_sweep_whose_last_pages_are_all_zero_still_leaves_the_cache_full() {
    // Memory written low and zero high: the last 2 × 4 pages store
    // nothing, and the pages that filled the cache stay.
    let mut c = PageCache::new(4 * 4096, PageSize::SIZE_4K);
    let n = 100u64;
    for i in 0..n {
        c.admit_within(usize::try_from(n - i).unwrap());
        if i < 20 {
            c.insert(PageIndex(i), &noise(4096, i));
        } else {
            c.remove(PageIndex(i));
        }
    }
    assert_eq!(c.len(), 4);
    for i in 0..4u64 {
        assert_eq!(c.get(PageIndex(i)), Some(&noise(4096, i)[..]), "page {i}");
    }
}

#[test]
fn a_page_not_admitted_drops_its_older_version_and_only_it() {
    let mut c = PageCache::new(4 * 4096, PageSize::SIZE_4K);
    for i in 1..=4u8 {
        c.insert(PageIndex(u64::from(i)), &[i; 4096]);
    }
    // Full: 9 pages left is past twice the capacity.
    c.admit_within(9);
    // Page 1's new version is not stored, and its old one must not stay
    // (the destination no longer holds it).
    c.insert(PageIndex(1), &[9; 4096]);
    assert!(c.get(PageIndex(1)).is_none());
    assert_eq!(c.get(PageIndex(2)), Some(&[2u8; 4096][..]));
    // The refusal was for that insert only.
    c.insert(PageIndex(5), &[5; 4096]);
    assert_eq!(c.get(PageIndex(5)), Some(&[5u8; 4096][..]));
    c.admit_within(8);
    c.insert(PageIndex(1), &[9; 4096]);
    assert_eq!(c.get(PageIndex(1)), Some(&[9u8; 4096][..]));
}
