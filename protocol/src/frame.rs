//! Length-prefixed framing.
//!
//! Every message on every Convoy stream is one frame:
//!
//! ```text
//! +----------------+--------+----------------------+
//! | length: u32 BE | tag u8 | body (length-1 bytes) |
//! +----------------+--------+----------------------+
//! ```
//!
//! `length` counts the tag and the body. It is checked against
//! [`MAX_FRAME_LEN`] *before* any buffer is sized from it, so a hostile peer
//! cannot make a receiver allocate more than one maximal frame. A length of 0
//! (no room for a tag) is an error, and so is tag 0 ([`crate::message`]).

use thiserror::Error;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// The largest frame (tag + body) any Convoy peer sends or accepts: 4 MiB.
///
/// The largest legitimate frame is a page batch of
/// [`crate::page::MAX_BATCH_BYTES`] of raw pages plus its header, which is
/// well below this.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Why a frame could not be split off the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    Oversized {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A length prefix of zero: there is no room for a tag.
    #[error("empty frame (length 0)")]
    Empty,
}

/// Checks a length prefix and returns the number of bytes that follow it.
pub fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    check_len(u32::from_be_bytes(prefix) as usize)
}

/// A frame length must leave room for a tag and stay within the limit.
fn check_len(len: usize) -> Result<usize, FrameError> {
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Splits one frame off the front of `input`.
///
/// Returns `Ok(None)` when `input` does not yet hold a whole frame, or
/// `Ok(Some((frame, consumed)))` where `frame` is the tag and body.
pub fn split_frame(input: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = input.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut p = [0u8; LEN_PREFIX];
    p.copy_from_slice(prefix);
    let len = frame_len(p)?;
    match input.get(LEN_PREFIX..LEN_PREFIX + len) {
        Some(frame) => Ok(Some((frame, LEN_PREFIX + len))),
        None => Ok(None),
    }
}

/// Writes the length prefix for a frame whose tag+body is `len` bytes.
///
/// # Panics
/// Never for frames built by this crate; a caller asking for a frame over
/// [`MAX_FRAME_LEN`] gets [`FrameError::Oversized`].
#[allow(clippy::cast_possible_truncation)]
pub fn prefix_for(len: usize) -> Result<[u8; LEN_PREFIX], FrameError> {
    // CAST: lossless after the check, MAX_FRAME_LEN (4 MiB) < u32::MAX.
    Ok((check_len(len)? as u32).to_be_bytes())
}

#[cfg(test)]
mod tests {
    // Test code: test lengths are small constants.
    #![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    use super::*;

    #[test]
    fn split_waits_for_whole_frame() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&prefix_for(3).unwrap());
        buf.extend_from_slice(&[1, 2]);
        assert_eq!(split_frame(&buf), Ok(None));
        buf.push(3);
        buf.push(99);
        let (frame, used) = split_frame(&buf).unwrap().unwrap();
        assert_eq!(frame, &[1, 2, 3]);
        assert_eq!(used, 7);
    }

    #[test]
    fn oversized_and_empty_are_errors() {
        let big = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            split_frame(&big),
            Err(FrameError::Oversized { .. })
        ));
        assert_eq!(split_frame(&[0, 0, 0, 0]), Err(FrameError::Empty));
        assert!(prefix_for(MAX_FRAME_LEN + 1).is_err());
    }
}
