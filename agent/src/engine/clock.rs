//! The engines' one clock.
//!
//! Every deadline, timeout and state-machine timestamp in `engine/` comes
//! from [`now`] and is waited on with [`sleep_until`] or tokio's timers, so
//! a test that pauses tokio's time (`#[tokio::test(start_paused = true)]`,
//! `tokio::time::advance`) moves all of them at once and a 30-second
//! timeout is tested in microseconds. Outside a paused test this is the
//! monotonic clock (`tokio::time::Instant` falls back to
//! `std::time::Instant`).
//!
//! What is *measured* rather than waited for — how long compressing a
//! batch or syncing a disk took — keeps `std::time::Instant`: paused time
//! would report that work as free.
//!
//! The QUIC connection itself keeps real time (quinn's timers and the UDP
//! socket cannot be paused), so a paused-time test drives an engine part
//! over an in-memory stream ([`tokio::io::duplex`]), never over QUIC.

use std::time::Instant;

/// Now, on the engines' clock.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Waits until `at` on the engines' clock.
pub(crate) async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// How long since `then` on the engines' clock (zero if `then` is later).
pub(crate) fn since(then: Instant) -> std::time::Duration {
    now().saturating_duration_since(then)
}

/// Waits until `deadline`, or forever when there is none (a state
/// machine's `poll_timeout()` in a `select!`).
pub(crate) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
