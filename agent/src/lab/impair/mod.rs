//! A userspace impairment relay for UDP datagrams and IP packets (the
//! kernel here has no netem):
//! one-way delay, jitter, reordering, random and bursty loss, duplication,
//! a rate limit with a tail-drop queue, and cuts, per direction, changeable
//! while it runs, with counters, and deterministic under a seed. The tests,
//! the benchmark and [`super::link::CuttableLink`] share it.
//!
//! # Layout
//! - [`model`]: the decisions without sockets or a clock — one [`Line`] per
//!   direction, fed `(now, length)`, holding datagrams in a heap until due.
//! - [`relay`]: the [`Relay`] on sockets, one release task per direction.
//! - [`tun`]: the [`PacketRelay`] on a TUN device, the same lines for
//!   whole IP packets (TCP included), used by the WAN lab of namespaces
//!   ([`super::wan`]).
//!
//! # What it models, and what not
//! It models one bottleneck per direction: loss and duplication are drawn
//! first, then the token bucket (a router's egress: a datagram that would
//! wait longer than the queue drains is tail-dropped), then the propagation
//! delay and its jitter. It does not model the sockets' own buffers (a
//! datagram the kernel drops before the relay reads it is not counted), a
//! congested path's queueing delay varying with other traffic, or MTU and
//! fragmentation. It runs in userspace: its own CPU time adds to what is
//! measured, and its timers are tokio's (1 ms resolution).
//!
//! Memory is bounded per direction by [`RelayConfig::max_held_bytes`]
//! (64 MiB by default) besides the rate limit's queue; beyond it, datagrams
//! are dropped and counted as queue drops.

pub mod model;
pub mod relay;
#[allow(unsafe_code)] // TUNSETIFF, and nothing else.
pub mod tun;

pub use model::{
    Counters, DropReason, GilbertElliott, Impairment, Jitter, Line, Loss, Probability, RateLimit,
    Reorder, Verdict,
};
pub use relay::{Direction, Relay, RelayConfig};
pub use tun::{PacketRelay, Tun};
