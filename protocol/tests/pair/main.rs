//! The `Pair` tests: source and destination state machines driven against
//! each other in memory ([`harness::Pair`]), by topic.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Tests: small sizes, indexes and simulated rates.

mod harness;

mod hostile;
mod links;
mod postcopy;
mod precopy;
mod precopy_recovery;
mod receipts;
mod recovery;
mod reuse;
