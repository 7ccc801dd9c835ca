//! The frame of a message: tag and postcard body, encoded
//! ([`Message::encode`], [`encode_batch_head`]) and decoded with its
//! bounds checked ([`Message::decode`]) into a typed [`DecodeError`]. The
//! operator protocol's frames ([`crate::ctl::CtlMessage`]) are framed the
//! same way, with the helpers at the bottom of this file.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::frame::{self, FrameError, LEN_PREFIX};
use crate::names::NameError;
use crate::page::BatchHeader;

use super::{
    tag, Fetch, Finish, Message, PostcopySwitch, RoundEnd, MAX_DATA_STREAMS, MAX_DEVICE_STATE,
    MAX_FETCH,
};

/// Why bytes did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame itself is bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Tag 0.
    #[error("tag 0 is reserved as invalid")]
    InvalidTag,
    /// A tag this build does not know.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// The body does not parse as the tagged message.
    #[error("malformed {message}: {cause}")]
    Malformed {
        /// Message kind.
        message: &'static str,
        /// What postcard, a name's own rule or a validity check refused.
        #[source]
        cause: MalformedCause,
    },
    /// An enum variant this build does not know (a newer peer's request
    /// or message).
    #[error("unknown {message} variant {variant}: the peer is newer than this agent")]
    UnknownVariant {
        /// Message kind.
        message: &'static str,
        /// The variant's index on the wire.
        variant: u32,
    },
    /// The body parsed but bytes were left over.
    #[error("{message} followed by {extra} trailing bytes")]
    Trailing {
        /// Message kind.
        message: &'static str,
        /// Bytes left.
        extra: usize,
    },
}

/// What was wrong with a body that did not parse as its message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MalformedCause {
    /// postcard could not parse it.
    #[error(transparent)]
    Postcard(postcard::Error),
    /// A name inside broke its own rule (postcard alone would only say
    /// "Serde Deserialization Error").
    #[error(transparent)]
    Refused(NameError),
    /// The data streams (and fault stream) number more than allowed.
    #[error("more streams than allowed")]
    TooManyStreams,
    /// The device state is larger than allowed.
    #[error("device state too large")]
    DeviceStateTooLarge,
    /// The channels number more than allowed.
    #[error("more channels than allowed")]
    TooManyChannels,
    /// A fetch of no pages or of more than allowed.
    #[error("a fetch of 1..={MAX_FETCH} pages")]
    FetchSize,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoding exceeds [`frame::MAX_FRAME_LEN`].
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// postcard failed.
    #[error("postcard: {0}")]
    Postcard(#[source] postcard::Error),
}

impl Message {
    /// The message's tag.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Propose(_) => tag::PROPOSE,
            Message::Accept(_) => tag::ACCEPT,
            Message::Reject(_) => tag::REJECT,
            Message::Finish(_) => tag::FINISH,
            Message::Ready(_) => tag::READY,
            Message::Handover(_) => tag::HANDOVER,
            Message::Started(_) => tag::STARTED,
            Message::Abort(_) => tag::ABORT,
            Message::StreamsDone(_) => tag::STREAMS_DONE,
            Message::Switch(_) => tag::SWITCH,
            Message::PostcopySwitch(_) => tag::POSTCOPY_SWITCH,
            Message::PostcopyRunning(_) => tag::POSTCOPY_RUNNING,
            Message::Fetch(_) => tag::FETCH,
            Message::RoundEnd(_) => tag::ROUND_END,
            Message::RoundApplied(_) => tag::ROUND_APPLIED,
            Message::Resume(_) => tag::RESUME,
            Message::Resumed(_) => tag::RESUMED,
            Message::PrecopyResumed(_) => tag::PRECOPY_RESUMED,
            Message::Inquire(_) => tag::INQUIRE,
            Message::Statement(_) => tag::STATEMENT,
            Message::ChannelOpen(_) => tag::CHANNEL_OPEN,
            Message::LinkCut(_) => tag::LINK_CUT,
            Message::Probe(_) => tag::PROBE,
            Message::Lane(_) => tag::LANE,
            Message::ChannelRead(_) => tag::CHANNEL_READ,
            Message::DataStreamOpen(_) => tag::DATA_STREAM_OPEN,
            Message::PageBatch(..) => tag::PAGE_BATCH,
        }
    }

    /// A short name for errors and logs.
    pub fn kind(&self) -> &'static str {
        name_of(self.tag())
    }

    /// The whole frame: length prefix, tag, body.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let out = frame_head(self.tag());
        let body = match self {
            Message::Propose(m) => postcard::to_extend(m, out),
            Message::Accept(m) => postcard::to_extend(m, out),
            Message::Reject(m) => postcard::to_extend(m, out),
            Message::Finish(m) => postcard::to_extend(m, out),
            Message::Ready(m) => postcard::to_extend(m, out),
            Message::Handover(m) => postcard::to_extend(m, out),
            Message::Started(m) => postcard::to_extend(m, out),
            Message::Abort(m) => postcard::to_extend(m, out),
            Message::StreamsDone(m) => postcard::to_extend(m, out),
            Message::Switch(m) => postcard::to_extend(m, out),
            Message::PostcopySwitch(m) => postcard::to_extend(m, out),
            Message::PostcopyRunning(m) => postcard::to_extend(m, out),
            Message::Fetch(m) => postcard::to_extend(m, out),
            Message::RoundEnd(m) => postcard::to_extend(m, out),
            Message::RoundApplied(m) => postcard::to_extend(m, out),
            Message::Resume(m) => postcard::to_extend(m, out),
            Message::Resumed(m) => postcard::to_extend(m, out),
            Message::PrecopyResumed(m) => postcard::to_extend(m, out),
            Message::Inquire(m) => postcard::to_extend(m, out),
            Message::Statement(m) => postcard::to_extend(m, out),
            Message::ChannelOpen(m) => postcard::to_extend(m, out),
            Message::LinkCut(m) => postcard::to_extend(m, out),
            Message::Probe(m) => postcard::to_extend(m, out),
            Message::Lane(m) => postcard::to_extend(m, out),
            Message::ChannelRead(m) => postcard::to_extend(m, out),
            Message::DataStreamOpen(m) => postcard::to_extend(m, out),
            Message::PageBatch(h, payload) => postcard::to_extend(h, out).map(|mut o| {
                o.extend_from_slice(payload);
                o
            }),
        };
        finish_frame(body)
    }

    /// Decodes one frame's tag and body (the length prefix already removed).
    pub fn decode(frame: Bytes) -> Result<Message, DecodeError> {
        let (t, body) = split_tag(&frame)?;
        Ok(match t {
            tag::INVALID => return Err(DecodeError::InvalidTag),
            tag::PROPOSE => Message::Propose(whole(t, body)?),
            tag::ACCEPT => Message::Accept(whole(t, body)?),
            tag::REJECT => Message::Reject(whole(t, body)?),
            tag::FINISH => {
                let f: Finish = whole(t, body)?;
                // The data streams and, after a post-copy switch, the fault
                // stream.
                if f.batches.len() > usize::from(MAX_DATA_STREAMS) + 1 {
                    return Err(malformed(t, MalformedCause::TooManyStreams));
                }
                if f.device_state.len() > MAX_DEVICE_STATE {
                    return Err(malformed(t, MalformedCause::DeviceStateTooLarge));
                }
                Message::Finish(f)
            }
            tag::READY => Message::Ready(whole(t, body)?),
            tag::HANDOVER => Message::Handover(whole(t, body)?),
            tag::STARTED => Message::Started(whole(t, body)?),
            tag::ABORT => Message::Abort(whole(t, body)?),
            tag::STREAMS_DONE => {
                let d: crate::stream::StreamsDone = whole(t, body)?;
                if d.channels.len() > crate::stream::MAX_CHANNELS {
                    return Err(malformed(t, MalformedCause::TooManyChannels));
                }
                Message::StreamsDone(d)
            }
            tag::LINK_CUT => {
                let c: crate::stream::LinkCut = whole(t, body)?;
                if c.channels.len() > crate::stream::MAX_CHANNELS {
                    return Err(malformed(t, MalformedCause::TooManyChannels));
                }
                Message::LinkCut(c)
            }
            tag::SWITCH => Message::Switch(whole(t, body)?),
            tag::PROBE => Message::Probe(whole(t, body)?),
            tag::LANE => Message::Lane(whole(t, body)?),
            tag::CHANNEL_READ => Message::ChannelRead(whole(t, body)?),
            tag::POSTCOPY_SWITCH => {
                let m: PostcopySwitch = whole(t, body)?;
                if m.batches.len() > usize::from(MAX_DATA_STREAMS) {
                    return Err(malformed(t, MalformedCause::TooManyStreams));
                }
                if m.device_state.len() > MAX_DEVICE_STATE {
                    return Err(malformed(t, MalformedCause::DeviceStateTooLarge));
                }
                Message::PostcopySwitch(m)
            }
            tag::POSTCOPY_RUNNING => Message::PostcopyRunning(whole(t, body)?),
            tag::ROUND_END => {
                let m: RoundEnd = whole(t, body)?;
                if m.batches.len() > usize::from(MAX_DATA_STREAMS) + 1 {
                    return Err(malformed(t, MalformedCause::TooManyStreams));
                }
                Message::RoundEnd(m)
            }
            tag::ROUND_APPLIED => Message::RoundApplied(whole(t, body)?),
            tag::RESUME => Message::Resume(whole(t, body)?),
            tag::RESUMED => Message::Resumed(whole(t, body)?),
            tag::PRECOPY_RESUMED => Message::PrecopyResumed(whole(t, body)?),
            tag::INQUIRE => Message::Inquire(whole(t, body)?),
            tag::STATEMENT => Message::Statement(whole(t, body)?),
            tag::FETCH => {
                let m: Fetch = whole(t, body)?;
                if m.pages.is_empty() || m.pages.len() > MAX_FETCH {
                    return Err(malformed(t, MalformedCause::FetchSize));
                }
                Message::Fetch(m)
            }
            tag::CHANNEL_OPEN => Message::ChannelOpen(whole(t, body)?),
            tag::DATA_STREAM_OPEN => Message::DataStreamOpen(whole(t, body)?),
            tag::PAGE_BATCH => {
                let (h, rest): (BatchHeader, &[u8]) = postcard::take_from_bytes(body)
                    .map_err(|e| malformed(t, MalformedCause::Postcard(e)))?;
                let offset = frame.len() - rest.len();
                Message::PageBatch(h, frame.slice(offset..))
            }
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

/// The name of a tag's message.
pub fn name_of(t: u8) -> &'static str {
    match t {
        tag::PROPOSE => "Propose",
        tag::ACCEPT => "Accept",
        tag::REJECT => "Reject",
        tag::FINISH => "Finish",
        tag::READY => "Ready",
        tag::HANDOVER => "Handover",
        tag::STARTED => "Started",
        tag::ABORT => "Abort",
        tag::STREAMS_DONE => "StreamsDone",
        tag::SWITCH => "Switch",
        tag::POSTCOPY_SWITCH => "PostcopySwitch",
        tag::POSTCOPY_RUNNING => "PostcopyRunning",
        tag::FETCH => "Fetch",
        tag::ROUND_END => "RoundEnd",
        tag::ROUND_APPLIED => "RoundApplied",
        tag::RESUME => "Resume",
        tag::RESUMED => "Resumed",
        tag::PRECOPY_RESUMED => "PrecopyResumed",
        tag::INQUIRE => "Inquire",
        tag::STATEMENT => "Statement",
        tag::CHANNEL_OPEN => "ChannelOpen",
        tag::LINK_CUT => "LinkCut",
        tag::PROBE => "Probe",
        tag::LANE => "Lane",
        tag::CHANNEL_READ => "ChannelRead",
        tag::DATA_STREAM_OPEN => "DataStreamOpen",
        tag::PAGE_BATCH => "PageBatch",
        _ => "unknown",
    }
}

fn malformed(t: u8, cause: MalformedCause) -> DecodeError {
    DecodeError::Malformed {
        message: name_of(t),
        cause,
    }
}

fn whole<T: DeserializeOwned>(t: u8, body: &[u8]) -> Result<T, DecodeError> {
    decode_whole(name_of(t), body)
}

/// Decodes `body` as a whole `T` named `message` in errors.
pub(crate) fn decode_whole<T: DeserializeOwned>(
    message: &'static str,
    body: &[u8],
) -> Result<T, DecodeError> {
    // A name or identity refused inside says why (postcard's own error
    // would only say "Serde Deserialization Error").
    let _ = crate::names::refusal::take();
    let (v, rest) = postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed {
        message,
        cause: crate::names::refusal::take()
            .map_or(MalformedCause::Postcard(e), MalformedCause::Refused),
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing {
            message,
            extra: rest.len(),
        });
    }
    Ok(v)
}

/// A frame's tag and body (the length prefix already removed), its size
/// checked.
pub(crate) fn split_tag(frame: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    let Some((&t, body)) = frame.split_first() else {
        return Err(DecodeError::Frame(FrameError::Empty));
    };
    if frame.len() > frame::MAX_FRAME_LEN {
        return Err(DecodeError::Frame(FrameError::Oversized {
            len: frame.len(),
            max: frame::MAX_FRAME_LEN,
        }));
    }
    Ok((t, body))
}

/// The start of a frame: room for the length prefix, then the tag.
fn frame_head(t: u8) -> Vec<u8> {
    let mut out = vec![0u8; LEN_PREFIX];
    out.push(t);
    out
}

/// Fills in the length prefix of a frame that [`frame_head`] started.
fn finish_frame(out: postcard::Result<Vec<u8>>) -> Result<Vec<u8>, EncodeError> {
    let mut out = out.map_err(EncodeError::Postcard)?;
    let prefix = frame::prefix_for(out.len() - LEN_PREFIX)?;
    out[..LEN_PREFIX].copy_from_slice(&prefix);
    Ok(out)
}

/// The whole frame of `value` under tag `t`: length prefix, tag, postcard
/// body.
pub(crate) fn encode_tagged<T: Serialize + ?Sized>(
    t: u8,
    value: &T,
) -> Result<Vec<u8>, EncodeError> {
    finish_frame(postcard::to_extend(value, frame_head(t)))
}

/// Encodes the frame head of a page batch (prefix, tag and header) for a
/// payload of `payload_len` bytes that the caller sends right after it, so
/// the payload is never copied.
pub fn encode_batch_head(header: &BatchHeader, payload_len: usize) -> Result<Vec<u8>, EncodeError> {
    let mut out =
        postcard::to_extend(header, frame_head(tag::PAGE_BATCH)).map_err(EncodeError::Postcard)?;
    let prefix = frame::prefix_for(out.len() - LEN_PREFIX + payload_len)?;
    out[..LEN_PREFIX].copy_from_slice(&prefix);
    Ok(out)
}
