//! What a simulated VM's memory holds when it is created: each page is
//! zero, log-like text (compressible, stamped with its page number so no
//! two are alike) or random bytes, in the shares of its
//! [`ContentProfile`]. Seeded, so the same spec fills the same memory.

use convoy_protocol::ctl::ContentProfile;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use super::SimVm;

impl SimVm {
    /// Fills memory by `content` from `seed` (at creation, before the
    /// workload runs): a quarter zero, two fifths text, the rest random,
    /// unless all zero or all random.
    pub(super) fn fill(&self, content: ContentProfile, seed: u64) {
        let page = self.shared.geometry.page_size().bytes();
        let mut rng = SmallRng::seed_from_u64(seed);
        let text = text_template(&mut rng);
        let mut buf = vec![0u8; page];
        for p in 0..self.shared.geometry.page_count() {
            let kind = match content {
                ContentProfile::Zero => 0,
                ContentProfile::Random => 99,
                _ => (splitmix(seed ^ p) % 100) as u8,
            };
            match kind {
                0..=24 => continue,
                25..=64 => {
                    let off = convoy_protocol::page::saturating_usize(
                        splitmix(p) % (text.len() - page) as u64,
                    ) & !7;
                    buf.copy_from_slice(&text[off..off + page]);
                    // Make pages distinct: stamp the page number.
                    buf[..8].copy_from_slice(&p.to_le_bytes());
                }
                _ => rng.fill_bytes(&mut buf),
            }
            self.shared
                .mem
                .write(convoy_protocol::page::saturating_usize(p) * page, &buf);
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 KiB of log-like text: compresses about 3-5x with zstd level 1.
fn text_template(rng: &mut SmallRng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "GET",
        "POST",
        "/api/v1/items",
        "200",
        "404",
        "user",
        "session",
        "cache",
        "hit",
        "miss",
        "INFO",
        "WARN",
        "request",
        "completed",
        "in",
        "ms",
        "bytes",
        "id",
        "ok",
        "error",
        "connection",
        "reset",
        "timeout",
        "the",
        "a",
        "of",
        "and",
        "to",
    ];
    let mut out = Vec::with_capacity(70_000);
    while out.len() < 65_536 + 8 {
        let w = WORDS[(rng.next_u32() as usize) % WORDS.len()];
        out.extend_from_slice(w.as_bytes());
        if rng.next_u32() % 5 == 0 {
            out.extend_from_slice(format!(" {}", rng.next_u32() % 10_000).as_bytes());
        }
        out.push(if rng.next_u32() % 12 == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(65_536);
    out
}

#[cfg(test)]
mod tests {
    use convoy_protocol::page::PageIndex;

    use super::super::testing::spec;
    use super::*;
    use crate::backend::VmBackend;

    #[test]
    fn mixed_content_has_zero_text_and_random_pages() {
        let vm = SimVm::create(&spec(4 << 20, 0, ContentProfile::Mixed), None, None).unwrap();
        vm.pause().unwrap();
        let mut zero = 0;
        let mut buf = vec![0u8; 4096];
        for p in 1..1024 {
            vm.read_page(PageIndex(p), &mut buf);
            if convoy_protocol::page::is_zero(&buf) {
                zero += 1;
            }
        }
        assert!((150..350).contains(&zero), "{zero} zero pages of 1023");
    }
}
