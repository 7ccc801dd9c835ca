//! The one way this crate turns a secret into an AES-256-GCM key: derive
//! 32 bytes for one purpose with BLAKE3's key derivation, make the `ring`
//! key, and wipe the derived bytes. Used by retained images (`reuse`),
//! snapshot chunks and sealed device state.

use ring::aead;
use zeroize::Zeroize;

/// The AES-256-GCM key for `context`, derived from `secret`.
pub(crate) fn derived(context: &str, secret: &[u8; 32]) -> aead::LessSafeKey {
    let mut k = blake3::derive_key(context, secret);
    // AES-256 takes any 32-byte key; `ring` refuses only a wrong length,
    // so the fallback is never reached.
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, &k)
        .map(aead::LessSafeKey::new)
        .unwrap_or_else(|_| unreachable_key());
    k.zeroize();
    key
}

fn unreachable_key() -> aead::LessSafeKey {
    // A 32-byte array is always a valid AES-256 key.
    #[allow(clippy::unwrap_used)]
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &[0; 32]).unwrap())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn contexts_give_different_keys() {
        let secret = [7u8; 32];
        let a = derived("convoy test a", &secret);
        let b = derived("convoy test b", &secret);
        let nonce = [0u8; 12];
        let mut x = b"same".to_vec();
        let mut y = b"same".to_vec();
        a.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::empty(),
            &mut x,
        )
        .unwrap();
        b.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::empty(),
            &mut y,
        )
        .unwrap();
        assert_ne!(x, y);
    }
}
