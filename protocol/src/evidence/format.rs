//! The bundle's format: its types, the file encoding (magic, version,
//! postcard body), and the bounded decoder that refuses a sequence on its
//! announced length before anything is allocated for it.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::{
    EvidenceError, Undecodable, BUNDLE_MAGIC, BUNDLE_VERSION, MAX_BUNDLE_LEN, MAX_PROOF_LEN,
    MAX_RECORD_BODY, MAX_SIDE_RECORDS,
};
use crate::audit::SignedTreeHead;
use crate::digest::Digest;
use crate::names::MigrationId;
use crate::signed::MAX_CHAIN_LEN;
use crate::ticket::SignedTicket;

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// The evidence of one migration (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceBundle {
    /// The migration.
    pub migration: MigrationId,
    /// The operator's signed ticket.
    pub ticket: SignedTicket,
    /// The source's evidence, then the destination's.
    #[serde(deserialize_with = "de_sides")]
    pub sides: Vec<SideEvidence>,
}

/// What one agent's log says about the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideEvidence {
    /// The agent's certificate chain, from its log's header (DER, leaf
    /// first).
    #[serde(deserialize_with = "de_chain")]
    pub chain: Vec<Vec<u8>>,
    /// When the log was created (the chain is verified at that time).
    pub log_created_at_unix: u64,
    /// The log's records about the migration, by increasing leaf index.
    #[serde(deserialize_with = "de_records")]
    pub records: Vec<EvidenceRecord>,
    /// The signed tree head every inclusion proof leads to.
    pub head: SignedTreeHead,
}

/// One signed log record and its inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    /// Leaf index in the log (the record's sequence number).
    pub index: u64,
    /// Postcard [`crate::audit::AuditRecord`], as signed.
    #[serde(deserialize_with = "de_body")]
    pub body: Vec<u8>,
    /// Ed25519 over [`crate::audit::RECORD_CONTEXT`] ‖ body.
    #[serde(deserialize_with = "de_signature")]
    pub signature: Vec<u8>,
    /// RFC 9162 inclusion proof of the leaf in the tree head.
    #[serde(deserialize_with = "de_proof")]
    pub proof: Vec<Digest>,
}

thread_local! {
    /// The limit the last bounded decode on this thread ran into. Postcard
    /// drops the messages of serde's custom errors, so the bounded visitor
    /// leaves it here for [`EvidenceBundle::decode`] to report.
    static LIMIT_HIT: Cell<Option<(&'static str, usize)>> = const { Cell::new(None) };
}

/// A sequence of at most `max` elements: refused on its announced length,
/// before anything is allocated for it.
fn bounded<'de, D, T>(d: D, what: &'static str, max: usize) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(&'static str, usize, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {} {}", self.1, self.0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hit = || {
                LIMIT_HIT.with(|c| c.set(Some((self.0, self.1))));
                serde::de::Error::custom(format!("more than {} {}", self.1, self.0))
            };
            let announced = seq.size_hint().unwrap_or(0);
            if announced > self.1 {
                return Err(hit());
            }
            let mut out = Vec::with_capacity(announced);
            while let Some(x) = seq.next_element()? {
                if out.len() == self.1 {
                    return Err(hit());
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V(what, max, PhantomData))
}

fn de_sides<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SideEvidence>, D::Error> {
    bounded(d, "sides", 2)
}
fn de_chain<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
    bounded(d, "certificates in a chain", MAX_CHAIN_LEN)
}
fn de_records<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EvidenceRecord>, D::Error> {
    bounded(d, "records in one side", MAX_SIDE_RECORDS)
}
fn de_body<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounded(d, "bytes in a record body", MAX_RECORD_BODY)
}
fn de_signature<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounded(d, "bytes in a record signature", SIGNATURE_LEN)
}
fn de_proof<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
    bounded(d, "hashes in an inclusion proof", MAX_PROOF_LEN)
}

impl EvidenceBundle {
    /// The file bytes: magic, version, postcard body.
    pub fn encode(&self) -> Result<Vec<u8>, EvidenceError> {
        let mut out = BUNDLE_MAGIC.to_vec();
        out.extend_from_slice(&BUNDLE_VERSION.to_be_bytes());
        postcard::to_io(self, &mut out).map_err(EvidenceError::Encode)?;
        if out.len() > MAX_BUNDLE_LEN {
            return Err(EvidenceError::TooLarge {
                len: out.len(),
                max: MAX_BUNDLE_LEN,
            });
        }
        Ok(out)
    }

    /// Decodes a bundle file, within the bounds, with no trailing bytes.
    /// Nothing is verified yet: see [`EvidenceBundle::check`].
    pub fn decode(bytes: &[u8]) -> Result<EvidenceBundle, EvidenceError> {
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(EvidenceError::TooLarge {
                len: bytes.len(),
                max: MAX_BUNDLE_LEN,
            });
        }
        let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(EvidenceError::Magic);
        };
        if magic != &BUNDLE_MAGIC {
            return Err(EvidenceError::Magic);
        }
        let Some((version, body)) = rest.split_first_chunk::<2>() else {
            return Err(EvidenceError::NoVersion);
        };
        let version = u16::from_be_bytes(*version);
        if version != BUNDLE_VERSION {
            return Err(EvidenceError::Version(version));
        }
        LIMIT_HIT.with(|c| c.set(None));
        let decoded = postcard::take_from_bytes::<EvidenceBundle>(body);
        let limit = LIMIT_HIT.with(|c| c.take());
        match (decoded, limit) {
            (Ok((b, [])), _) => Ok(b),
            (Ok(_), _) => Err(EvidenceError::Malformed(Undecodable::TrailingBytes)),
            (Err(_), Some((what, max))) => Err(EvidenceError::Limit { what, max }),
            (Err(e), None) => Err(EvidenceError::Malformed(e.into())),
        }
    }
}
