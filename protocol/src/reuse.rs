//! Memory reuse when a VM comes back: the retained image, its key, and the
//! offer that names them.
//!
//! A host a VM left may keep the VM's last image ([`RetainedImage`]), every
//! page sealed with AES-256-GCM under a key ([`ReuseKey`]) drawn fresh for
//! that image. The retaining host then forgets the key: it travels with the
//! VM, in [`crate::message::Handover::reuse`], to the host the VM moved to,
//! which keeps it (with the leaf digests of the image it verified on
//! arrival) for as long as the VM runs there. The retaining host holds
//! ciphertext only, and no digest of a page, so it can neither read the
//! image nor test a guess about a page's contents.
//!
//! When the VM migrates back, the source puts the key in the manifest
//! ([`crate::message::Manifest::reuse`], inside TLS, to the one host that
//! holds the ciphertext) and offers [`crate::message::Capabilities::REUSE`].
//! A destination that holds the image for that VM and geometry accepts the
//! bit; the source then sends, in its first round, every page whose leaf
//! equals the leaf it verified on arrival as a
//! [`crate::page::RunKind::Retained`] page — no bytes. The destination
//! opens that page from its retained image (AES-GCM authenticates it,
//! bound to the image id and the page index) into staging, hashes it as any
//! other page, and the Merkle root check at the end covers it as usual. A
//! retained page the destination cannot open is a protocol violation: it
//! aborts and the VM stays at the source.
//!
//! Why the source compares against the leaves it verified on arrival
//! rather than asking the retaining host for keyed leaves: the image the
//! retaining host sealed is, page for page, the image whose root the
//! arriving host verified, so the arriving host already knows every leaf.
//! No leaves cross the wire (they would be 8 MiB per GiB of guest), and
//! the retaining host keeps no digest at all.

use std::fmt;

use ring::aead;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::names::VmName;
use crate::page::{MemoryGeometry, PageIndex};

/// Bytes AES-GCM adds to each sealed page.
pub const TAG_LEN: usize = 16;

const AEAD_CONTEXT: &str = "convoy 2026-11 retained image aes-256-gcm v1";

/// The name of one retained image (random, 16 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetainedId(pub [u8; 16]);

impl fmt::Debug for RetainedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RetainedId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The 32-byte key a retained image is sealed under. Zeroized on drop;
/// its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ReuseKey([u8; 32]);

impl ReuseKey {
    /// A key from 32 bytes (drawn from a secure random source).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ReuseKey(bytes)
    }

    fn aead_key(&self) -> aead::LessSafeKey {
        crate::aead_key::derived(AEAD_CONTEXT, &self.0)
    }
}

impl fmt::Debug for ReuseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReuseKey(<secret>)")
    }
}

/// An image and the key it is sealed under: what travels with the VM (in
/// Handover) and what the source offers when the VM goes back (in the
/// manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReuseOffer {
    /// The retained image.
    pub image: RetainedId,
    /// Its key.
    pub key: ReuseKey,
}

/// Why a retained image could not be made or a page not opened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReuseError {
    /// A page past the end of the image.
    #[error("page {0} is not in the retained image")]
    NoSuchPage(u64),
    /// The page does not authenticate: a wrong key, another image's page,
    /// or ciphertext altered at rest.
    #[error("retained page {0} does not authenticate")]
    Unauthentic(u64),
    /// The output buffer is not one page.
    #[error("a buffer of {got} bytes for a {page}-byte page")]
    PageLength {
        /// The page size.
        page: usize,
        /// The buffer's length.
        got: usize,
    },
    /// The image would not fit in memory.
    #[error("an image of {0} pages is too large to retain")]
    TooLarge(u64),
}

/// A VM's last image as the host it left keeps it: every page sealed with
/// AES-256-GCM, nonce the page index, additional data the image id and the
/// page index (a page cannot be moved to another index or image).
pub struct RetainedImage {
    id: RetainedId,
    vm: VmName,
    geometry: MemoryGeometry,
    /// `page_count` × (`page_size` + [`TAG_LEN`]).
    sealed: Vec<u8>,
}

impl fmt::Debug for RetainedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedImage")
            .field("id", &self.id)
            .field("vm", &self.vm)
            .field("geometry", &self.geometry)
            .field("bytes", &self.sealed.len())
            .finish()
    }
}

fn nonce(idx: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&idx.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aad(id: RetainedId, idx: u64) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..16].copy_from_slice(&id.0);
    a[16..].copy_from_slice(&idx.to_le_bytes());
    a
}

impl RetainedImage {
    /// Seals every page of a VM's image under `key`; `read` writes page
    /// `i` into the buffer it is given. `key` must be fresh for this image
    /// (the nonce is the page index).
    pub fn seal(
        id: RetainedId,
        vm: VmName,
        geometry: MemoryGeometry,
        key: &ReuseKey,
        mut read: impl FnMut(PageIndex, &mut [u8]),
    ) -> Result<Self, ReuseError> {
        let page = geometry.page_size().bytes();
        let slot = page + TAG_LEN;
        let total = usize::try_from(geometry.page_count())
            .ok()
            .and_then(|n| n.checked_mul(slot))
            .ok_or(ReuseError::TooLarge(geometry.page_count()))?;
        let aead = key.aead_key();
        let mut sealed = vec![0u8; total];
        for (i, chunk) in sealed.chunks_exact_mut(slot).enumerate() {
            let (body, tag_out) = chunk.split_at_mut(page);
            read(PageIndex(i as u64), body);
            let tag = aead
                .seal_in_place_separate_tag(
                    nonce(i as u64),
                    aead::Aad::from(aad(id, i as u64)),
                    body,
                )
                .map_err(|_| ReuseError::Unauthentic(i as u64))?;
            tag_out.copy_from_slice(tag.as_ref());
        }
        Ok(RetainedImage {
            id,
            vm,
            geometry,
            sealed,
        })
    }

    /// Opens page `idx` into `out` (one page). On error `out` holds no
    /// plaintext of the page (it is zeroed).
    pub fn open_into(
        &self,
        key: &ReuseKey,
        idx: PageIndex,
        out: &mut [u8],
    ) -> Result<(), ReuseError> {
        let page = self.geometry.page_size().bytes();
        if out.len() != page {
            return Err(ReuseError::PageLength {
                page,
                got: out.len(),
            });
        }
        let slot = page + TAG_LEN;
        let Some(chunk) = usize::try_from(idx.0)
            .ok()
            .filter(|_| idx.0 < self.geometry.page_count())
            .and_then(|i| self.sealed.get(i * slot..(i + 1) * slot))
        else {
            return Err(ReuseError::NoSuchPage(idx.0));
        };
        let mut buf = chunk.to_vec();
        let opened = key
            .aead_key()
            .open_in_place(nonce(idx.0), aead::Aad::from(aad(self.id, idx.0)), &mut buf)
            .map(|plain| out.copy_from_slice(plain));
        buf.zeroize();
        opened.map_err(|_| {
            out.fill(0);
            ReuseError::Unauthentic(idx.0)
        })
    }

    /// The image's id.
    pub fn id(&self) -> RetainedId {
        self.id
    }

    /// The VM it belongs to.
    pub fn vm(&self) -> &VmName {
        &self.vm
    }

    /// Its memory geometry.
    pub fn geometry(&self) -> MemoryGeometry {
        self.geometry
    }

    /// Bytes held (ciphertext and tags).
    pub fn bytes(&self) -> u64 {
        self.sealed.len() as u64
    }

    /// The bytes held, for inspection (they hold no plaintext).
    pub fn sealed_bytes(&self) -> &[u8] {
        &self.sealed
    }

    /// The bytes held, to alter at rest (tests of a tampering host).
    #[doc(hidden)]
    pub fn sealed_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.sealed
    }
}

#[cfg(test)]
mod tests {
    // Test code: test pages are few; their bytes wrap on purpose.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::page::PageSize;

    fn image(key: &ReuseKey) -> RetainedImage {
        let g = MemoryGeometry::new(PageSize::SIZE_4K, 4).unwrap();
        RetainedImage::seal(
            RetainedId([9; 16]),
            "vm".parse().unwrap(),
            g,
            key,
            |p, b| b.fill(p.0 as u8 + 1),
        )
        .unwrap()
    }

    #[test]
    fn pages_open_with_the_key_only() {
        let key = ReuseKey::from_bytes([7; 32]);
        let img = image(&key);
        assert_eq!(img.bytes(), 4 * (4096 + 16) as u64);
        let mut out = vec![0u8; 4096];
        img.open_into(&key, PageIndex(2), &mut out).unwrap();
        assert!(out.iter().all(|b| *b == 3));
        let wrong = ReuseKey::from_bytes([8; 32]);
        assert_eq!(
            img.open_into(&wrong, PageIndex(2), &mut out),
            Err(ReuseError::Unauthentic(2))
        );
        assert!(out.iter().all(|b| *b == 0));
        assert_eq!(
            img.open_into(&key, PageIndex(4), &mut out),
            Err(ReuseError::NoSuchPage(4))
        );
        // No plaintext page in the sealed bytes.
        let plain = vec![3u8; 4096];
        assert!(!img.sealed_bytes().windows(64).any(|w| w == &plain[..64]));
        assert_eq!(format!("{key:?}"), "ReuseKey(<secret>)");
    }

    #[test]
    fn an_altered_or_moved_page_does_not_open() {
        let key = ReuseKey::from_bytes([7; 32]);
        let mut img = image(&key);
        img.sealed_bytes_mut()[10] ^= 1;
        let mut out = vec![0u8; 4096];
        assert_eq!(
            img.open_into(&key, PageIndex(0), &mut out),
            Err(ReuseError::Unauthentic(0))
        );
        // Page 1's slot copied over page 2's.
        let mut img = image(&key);
        let slot = 4096 + TAG_LEN;
        let one = img.sealed_bytes()[slot..2 * slot].to_vec();
        img.sealed_bytes_mut()[2 * slot..3 * slot].copy_from_slice(&one);
        assert_eq!(
            img.open_into(&key, PageIndex(2), &mut out),
            Err(ReuseError::Unauthentic(2))
        );
    }
}
