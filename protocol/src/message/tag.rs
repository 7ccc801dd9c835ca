//! Message tags: the first byte of a frame (0 is invalid).

#![allow(missing_docs)]

pub const INVALID: u8 = 0;
pub const PROPOSE: u8 = 1;
pub const ACCEPT: u8 = 2;
pub const REJECT: u8 = 3;
pub const FINISH: u8 = 4;
pub const READY: u8 = 5;
pub const HANDOVER: u8 = 6;
pub const STARTED: u8 = 7;
pub const ABORT: u8 = 8;
pub const STREAMS_DONE: u8 = 9;
pub const SWITCH: u8 = 10;
pub const POSTCOPY_SWITCH: u8 = 11;
pub const POSTCOPY_RUNNING: u8 = 12;
pub const FETCH: u8 = 13;
pub const ROUND_END: u8 = 14;
pub const ROUND_APPLIED: u8 = 15;
pub const DATA_STREAM_OPEN: u8 = 16;
pub const PAGE_BATCH: u8 = 17;
pub const CHANNEL_OPEN: u8 = 18;
pub const RESUME: u8 = 19;
pub const RESUMED: u8 = 20;
pub const INQUIRE: u8 = 21;
pub const STATEMENT: u8 = 22;
pub const PRECOPY_RESUMED: u8 = 23;
pub const LINK_CUT: u8 = 24;
pub const PROBE: u8 = 25;
pub const LANE: u8 = 26;
pub const CHANNEL_READ: u8 = 27;
// 32 and 33: the operator protocol's request and response
// (`crate::ctl::frame::tag`), never a migration message's.
