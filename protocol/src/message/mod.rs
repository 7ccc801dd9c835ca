//! Every message Convoy agents exchange in a migration, and its
//! (de)coding.
//!
//! A frame's first byte is a tag naming the message; the body is the
//! message's postcard encoding (for [`Message::PageBatch`], the postcard
//! header followed by the raw payload). Tag 0 is reserved as invalid so that
//! a zeroed buffer never parses; unknown tags, malformed bodies and trailing
//! bytes are typed errors.
//!
//! | tag | message | stream |
//! |-----|---------|--------|
//! | 1 | [`Propose`] | agent control, source → destination, first |
//! | 2 | [`Accept`] | agent control, destination → source |
//! | 3 | [`Reject`] | agent control, destination → source |
//! | 4 | [`Finish`] | agent control, source → destination |
//! | 5 | [`Ready`] | agent control, destination → source |
//! | 6 | `Handover` | agent control, source → destination |
//! | 7 | [`Started`] | agent control, destination → source |
//! | 8 | [`Abort`] | agent control, either way |
//! | 9 | [`crate::stream::StreamsDone`] | agent control, source → destination (stream migrations) |
//! | 10 | [`crate::stream::Switch`] | agent control, both ways (post-copy stream migrations) |
//! | 11 | [`PostcopySwitch`] | agent control, source → destination |
//! | 12 | [`PostcopyRunning`] | agent control, destination → source |
//! | 13 | [`Fetch`] | agent control, destination → source (answered on the fault stream) |
//! | 14 | [`RoundEnd`] | agent control, source → destination |
//! | 15 | [`RoundApplied`] | agent control, destination → source |
//! | 16 | [`DataStreamOpen`] | data stream, first frame |
//! | 17 | page batch | data stream |
//! | 18 | [`crate::stream::ChannelOpen`] | a stream migration's channel, first frame |
//! | 19 | [`Resume`] | agent control of a new connection, source → destination, first |
//! | 20 | [`Resumed`] | agent control, destination → source |
//! | 21 | [`crate::indoubt::Inquiry`] | an in-doubt inquiry's first frame |
//! | 22 | a signed statement | the answer to an inquiry |
//! | 23 | [`PrecopyResumed`] | agent control, destination → source |
//! | 24 | [`crate::stream::LinkCut`] | agent control of a new connection, both ways (stream migrations) |
//! | 25 | [`crate::stream::Probe`] | agent control, source → destination and back (stream migrations; page migrations with `Capabilities::PROBE`) |
//! | 26 | [`Lane`] | an extra connection's first frame, source → destination, and the answer |
//! | 27 | [`crate::stream::ChannelRead`] | agent control, destination → source (stream migrations) |
//!
//! Tags 32 and 33 belong to the operator protocol, a message type of its
//! own ([`crate::ctl::CtlMessage`]: request, response) framed the same way
//! on `convoy-ctl/1` connections; [`Message::decode`] refuses them as
//! unknown, so an agent's peer cannot speak the operator's messages, and
//! no tag here may take them.
//!
//! # Parts
//! - `propose`: versions, capabilities, the [`Manifest`], [`Propose`] and
//!   its answers, and the [`Reason`] of a refusal or an [`Abort`].
//! - `copy`: data streams, rounds, and [`Finish`].
//! - `postcopy`: the switch, faults, and recovery on a new connection.
//! - `handover`: [`Ready`], [`Handover`] and [`Started`].
//! - [`tag`]: the tag of each message.
//! - `codec`: encoding and bounded decoding, [`DecodeError`] (the
//!   framing the operator protocol shares).

use bytes::Bytes;

use crate::page::BatchHeader;

mod codec;
mod copy;
mod handover;
mod postcopy;
mod propose;
pub mod tag;

#[cfg(test)]
mod tests;

pub use crate::model::FaultFigures;
pub(crate) use codec::{decode_whole, encode_tagged, split_tag};
pub use codec::{encode_batch_head, name_of, DecodeError, EncodeError, MalformedCause};
pub use copy::{DataStreamOpen, Finish, Lane, RoundApplied, RoundEnd, MAX_DEVICE_STATE};
pub use handover::{DestinationPause, Handover, Ready, Started};
pub use postcopy::{
    Fetch, PostcopyRunning, PostcopySwitch, PrecopyResumed, Resume, Resumed, MAX_FETCH,
};
pub use propose::{
    Abort, Accept, Capabilities, Manifest, Propose, Reason, Reject, VersionRange, MAX_DATA_STREAMS,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Any message of a migration between agents.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Tag 1.
    Propose(Propose),
    /// Tag 2.
    Accept(Accept),
    /// Tag 3.
    Reject(Reject),
    /// Tag 4.
    Finish(Finish),
    /// Tag 5.
    Ready(Ready),
    /// Tag 6: the source has handed the VM over; start it.
    Handover(Handover),
    /// Tag 7.
    Started(Started),
    /// Tag 8.
    Abort(Abort),
    /// Tag 9.
    StreamsDone(crate::stream::StreamsDone),
    /// Tag 10.
    Switch(crate::stream::Switch),
    /// Tag 11.
    PostcopySwitch(PostcopySwitch),
    /// Tag 12.
    PostcopyRunning(PostcopyRunning),
    /// Tag 13.
    Fetch(Fetch),
    /// Tag 14.
    RoundEnd(RoundEnd),
    /// Tag 15.
    RoundApplied(RoundApplied),
    /// See [`Resume`].
    Resume(Resume),
    /// See [`Resumed`].
    Resumed(Resumed),
    /// See [`PrecopyResumed`].
    PrecopyResumed(PrecopyResumed),
    /// Tag 16.
    DataStreamOpen(DataStreamOpen),
    /// Tag 26.
    Lane(Lane),
    /// Tag 17: a page batch; the payload is carried without a copy.
    PageBatch(BatchHeader, Bytes),
    /// Tag 18.
    ChannelOpen(crate::stream::ChannelOpen),
    /// Tag 21: the first message of a connection that asks about a
    /// migration in doubt ([`crate::indoubt`]).
    Inquire(crate::indoubt::Inquiry),
    /// Tag 22: the signed answer to [`Message::Inquire`].
    Statement(crate::indoubt::SignedStatement),
    /// Tag 24.
    LinkCut(crate::stream::LinkCut),
    /// A control round trip timed, both ways (stream migrations, and page
    /// migrations whose destination accepted `Capabilities::PROBE`).
    Probe(crate::stream::Probe),
    /// Tag 27: how much of a channel the destination's QEMU has read.
    ChannelRead(crate::stream::ChannelRead),
}
