//! Sealing keys published in the bucket. An agent that is to open
//! snapshots pushed elsewhere publishes its signed sealing-key statement
//! under `keys/<trust domain>/<agent name>` of the URL (`snapshot
//! enroll`); a pusher that names it as a recipient reads the statement
//! from there and accepts it only if that agent's certificate, under the
//! trust bundle, signed it. The bucket can withhold a statement (the push
//! fails, naming the agent) or offer an older one of the same agent (the
//! data key is then wrapped to that older key; the agent refuses it with
//! `OtherKey` unless it still holds it), but cannot substitute a key of
//! its own.

use bytes::Bytes;
use convoy_protocol::digest::Digest;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::signed::{ChainVerifier, Signer};
use convoy_protocol::snapshot::{SealingKeyStatement, SignedSealingKey};

use super::sealing::{open_statement, SealingKeys};
use super::{SnapshotError, SnapshotStore};

/// The largest statement object read.
const MAX_STATEMENT: u64 = 64 << 10;

/// The object holding `agent`'s statement.
pub fn key_object(agent: &SpiffeId) -> String {
    format!("keys/{}/{}", agent.domain(), agent.name())
}

/// Publishes this agent's statement (replacing an older one). Returns the
/// object and the key's id.
pub async fn enroll(
    store: &SnapshotStore,
    keys: &SealingKeys,
    identity: &(dyn Signer + Sync),
    me: &SpiffeId,
    now_unix: u64,
) -> Result<(String, Digest), SnapshotError> {
    let st = keys.statement(identity, me.clone(), now_unix)?;
    let bytes = postcard::to_stdvec(&st).map_err(|e| SnapshotError::Task(e.to_string()))?;
    let object = key_object(me);
    store.put(&object, Bytes::from(bytes)).await?;
    Ok((object, keys.key_id()))
}

/// `agent`'s sealing key as published under the URL, checked.
pub async fn recipient(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    agent: &SpiffeId,
) -> Result<SealingKeyStatement, SnapshotError> {
    let object = key_object(agent);
    let bytes = match store.get(&object, MAX_STATEMENT).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => {
            return Err(SnapshotError::NotFound {
                url: store.url().to_owned(),
                what: format!(
                    "no sealing key of {agent} ({object}): run `convoyctl --agent {} snapshot enroll {}` first",
                    agent.name(),
                    store.url()
                ),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let signed: SignedSealingKey =
        postcard::from_bytes(&bytes).map_err(|source| SnapshotError::Decode {
            object: object.clone(),
            source,
        })?;
    Ok(open_statement(&signed, verifier, agent)?)
}
