//! Page migrations of sim VMs: the source and destination drivers of
//! [`convoy_protocol::source::Source`] and
//! [`convoy_protocol::destination::Destination`], and the bandwidth cap
//! their streams share.

pub(crate) mod destination;
mod pacer;
pub(crate) mod source;
