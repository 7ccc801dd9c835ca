//! Memory reuse when a VM comes back (see [`convoy_protocol::reuse`]): the
//! images this agent retained for VMs that left it, and the keys it holds
//! for VMs that arrived.
//!
//! Both live in memory only: an agent that restarts forgets them, and the
//! next migration back is an ordinary one. Retention is off unless the
//! agent allows it ([`RetentionLimits`], `convoy-agent --retain-images`)
//! *and* the VM opts in (its [`RETAIN_LABEL`] label is `true`); the images
//! are bounded in number and bytes, oldest evicted first, one per VM name.

use std::collections::VecDeque;
use std::sync::Arc;

use convoy_protocol::digest::Digest;
use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::page::MemoryGeometry;
use convoy_protocol::reuse::{RetainedId, RetainedImage, ReuseKey, ReuseOffer};
use ring::rand::{SecureRandom, SystemRandom};

pub use convoy_protocol::vm::RETAIN_LABEL;

/// How much this agent may retain for VMs that left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionLimits {
    /// Most images kept.
    pub max_images: usize,
    /// Most bytes kept (ciphertext and tags), all images together.
    pub max_bytes: u64,
}

/// A fresh image id and key for a VM about to leave.
pub(crate) fn fresh_offer() -> Option<ReuseOffer> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 16];
    let mut key = [0u8; 32];
    rng.fill(&mut id).ok()?;
    rng.fill(&mut key).ok()?;
    let offer = ReuseOffer {
        image: RetainedId(id),
        key: ReuseKey::from_bytes(key),
    };
    zeroize::Zeroize::zeroize(&mut key);
    Some(offer)
}

/// What an agent keeps for a VM that arrived from a host that retained its
/// image: the key, whom it is for, and the leaves of the image verified on
/// arrival (what that host holds).
#[derive(Debug, Clone)]
pub(crate) struct ArrivalKey {
    pub offer: ReuseOffer,
    pub holder: SpiffeId,
    pub leaves: Arc<Vec<Digest>>,
}

/// A handle on an agent's retained images that does not keep the agent
/// alive (for tests and inspection).
#[derive(Debug, Clone)]
pub struct RetainedImages(pub(crate) Arc<std::sync::Mutex<RetainedStore>>);

impl RetainedImages {
    /// The images held, oldest first (ciphertext only).
    pub fn images(&self) -> Vec<Arc<RetainedImage>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .images()
            .cloned()
            .collect()
    }
}

/// The images retained here, oldest first.
#[derive(Debug, Default)]
pub(crate) struct RetainedStore {
    images: VecDeque<Arc<RetainedImage>>,
}

impl RetainedStore {
    /// Keeps `image`, replacing any older image of the same VM, then evicts
    /// the oldest past `limits`. An image larger than `max_bytes` alone is
    /// not kept.
    pub fn insert(&mut self, image: RetainedImage, limits: RetentionLimits) {
        let vm = image.vm().clone();
        self.images.retain(|i| *i.vm() != vm);
        self.images.push_back(Arc::new(image));
        while self.images.len() > limits.max_images || self.bytes() > limits.max_bytes {
            if self.images.pop_front().is_none() {
                break;
            }
        }
    }

    /// The image `id` of `vm`, if it has this geometry.
    pub fn find(
        &self,
        vm: &VmName,
        id: RetainedId,
        geometry: MemoryGeometry,
    ) -> Option<Arc<RetainedImage>> {
        self.images
            .iter()
            .find(|i| i.vm() == vm && i.id() == id && i.geometry() == geometry)
            .cloned()
    }

    /// Drops the image of `vm` (the VM runs here again).
    pub fn remove(&mut self, vm: &VmName) {
        self.images.retain(|i| i.vm() != vm);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.images.iter().map(|i| i.bytes()).sum()
    }

    /// The images held, oldest first.
    pub fn images(&self) -> impl Iterator<Item = &Arc<RetainedImage>> {
        self.images.iter()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_protocol::page::PageSize;

    fn image(vm: &str, n: u8, pages: u64) -> RetainedImage {
        let g = MemoryGeometry::new(PageSize::SIZE_4K, pages).unwrap();
        let key = ReuseKey::from_bytes([n; 32]);
        RetainedImage::seal(RetainedId([n; 16]), vm.parse().unwrap(), g, &key, |_, b| {
            b.fill(n)
        })
        .unwrap()
    }

    #[test]
    fn limits_evict_the_oldest_and_a_vm_keeps_one_image() {
        let slot = 4096 + 16;
        let limits = RetentionLimits {
            max_images: 2,
            max_bytes: 10 * slot,
        };
        let mut s = RetainedStore::default();
        s.insert(image("a", 1, 2), limits);
        s.insert(image("b", 2, 2), limits);
        s.insert(image("c", 3, 2), limits);
        let names: Vec<String> = s.images().map(|i| i.vm().to_string()).collect();
        assert_eq!(names, ["b", "c"], "max_images evicts the oldest");
        s.insert(image("b", 4, 2), limits);
        let ids: Vec<u8> = s.images().map(|i| i.id().0[0]).collect();
        assert_eq!(ids, [3, 4], "a newer image of b replaces the older");
        s.insert(image("d", 5, 9), limits);
        assert!(s.bytes() <= 10 * slot);
        let names: Vec<String> = s.images().map(|i| i.vm().to_string()).collect();
        assert_eq!(names, ["d"], "max_bytes evicts the oldest");
        s.insert(image("e", 6, 11), limits);
        assert_eq!(s.images().count(), 0, "an image over max_bytes is not kept");
        let g = MemoryGeometry::new(PageSize::SIZE_4K, 2).unwrap();
        s.insert(image("f", 7, 2), limits);
        let vm: VmName = "f".parse().unwrap();
        assert!(s.find(&vm, RetainedId([7; 16]), g).is_some());
        assert!(s.find(&vm, RetainedId([8; 16]), g).is_none());
        let other = MemoryGeometry::new(PageSize::SIZE_4K, 3).unwrap();
        assert!(s.find(&vm, RetainedId([7; 16]), other).is_none());
        s.remove(&vm);
        assert!(s.find(&vm, RetainedId([7; 16]), g).is_none());
    }

    #[test]
    fn the_label_opts_in() {
        let mut a = convoy_protocol::vm::VmAttributes::default();
        assert!(!a.retain_on_leave());
        a.labels.insert(RETAIN_LABEL.into(), "true".into());
        assert!(a.retain_on_leave());
        assert!(a.validate().is_ok());
    }
}
