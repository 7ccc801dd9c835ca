//! The handover claim of a store-and-forward migration in the bucket
//! (format and rules: [`convoy_protocol::snapshot::claim`]): written
//! create-only, read back and checked when another claim was there first.

use bytes::Bytes;
use convoy_protocol::names::SpiffeId;
use convoy_protocol::signed::{ChainVerifier, Signed, Signer};
use convoy_protocol::snapshot::claim::{
    claim_object, open_claim, Claim, Handover, SignedClaim, Verdict,
};

use super::{SnapshotError, SnapshotStore};

/// The largest claim object read.
const MAX_CLAIM: u64 = 16 << 10;

/// Tries to make `verdict` the handover's outcome: `Ok(None)` if this
/// call's claim was written (it won), `Ok(Some(winner))` with the claim
/// that was there first, checked.
pub async fn claim(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    signer: &(dyn Signer + Sync),
    me: &SpiffeId,
    h: &Handover<'_>,
    verdict: Verdict,
    now_unix: u64,
) -> Result<Option<Claim>, SnapshotError> {
    let c = Claim {
        migration: h.migration,
        snapshot: h.snapshot,
        manifest: h.manifest,
        by: me.clone(),
        verdict,
        at: now_unix,
    };
    let signed = Signed::sign(&c, signer)
        .map_err(|e| SnapshotError::from(super::SealingError::Sign(Box::new(e))))?;
    let bytes = postcard::to_stdvec(&signed).map_err(|e| SnapshotError::Task(e.to_string()))?;
    if store
        .put_new(&claim_object(&h.snapshot), Bytes::from(bytes))
        .await?
    {
        return Ok(None);
    }
    match read(store, verifier, h).await? {
        Some(winner) => Ok(Some(winner)),
        // Refused as existing, and not there: still being written (S3
        // answers 409 to a create while another is in progress), or
        // removed by the bucket. Undecided until a later claim reads it.
        None => Err(SnapshotError::Claim {
            object: claim_object(&h.snapshot),
            why: "the claim that was there first cannot be read (still being written, or removed)"
                .into(),
        }),
    }
}

/// The handover's claim, if one was made; one that does not check out is
/// an error naming the object (it blocks the handover: the VM stays where
/// it is, paused at the source).
pub async fn read(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    h: &Handover<'_>,
) -> Result<Option<Claim>, SnapshotError> {
    read_checked(store, verifier, h, false).await
}

/// The handover's claim as [`read`] checks it, except that the manifest it
/// names is taken as it is: for a source that lost its manifest's digest
/// (killed between the push and recording it, and the manifest gone from
/// the bucket since). The snapshot id is random and the manifest was ours,
/// so migration, snapshot, signer and side still bind the claim.
pub async fn read_any_manifest(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    h: &Handover<'_>,
) -> Result<Option<Claim>, SnapshotError> {
    read_checked(store, verifier, h, true).await
}

async fn read_checked(
    store: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    h: &Handover<'_>,
    any_manifest: bool,
) -> Result<Option<Claim>, SnapshotError> {
    let object = claim_object(&h.snapshot);
    let bytes = match store.get(&object, MAX_CLAIM).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let decode = |source| SnapshotError::Decode {
        object: object.clone(),
        source,
    };
    let signed: SignedClaim = postcard::from_bytes(&bytes).map_err(decode)?;
    let mut h = *h;
    if any_manifest {
        // Its manifest, unchecked, only to check the rest against.
        h.manifest = postcard::from_bytes::<Claim>(&signed.body)
            .map_err(decode)?
            .manifest;
    }
    open_claim(&signed, verifier, &h)
        .map(Some)
        .map_err(|e| SnapshotError::Claim {
            object,
            why: e.to_string(),
        })
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use convoy_protocol::digest::Digest;
    use convoy_protocol::fuzz::InsecureCrypto;
    use convoy_protocol::names::MigrationId;
    use convoy_protocol::snapshot::SnapshotId;

    /// How the claimants of a round go.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(in crate::snapshot) enum Claims {
        /// All at once.
        Racing,
        /// One after another, each after the last has its answer.
        InTurn,
    }

    /// `claimants` claims (even ones by the destination, odd ones by the
    /// source) on each of `rounds` handovers in `store`, going as `how`
    /// says: exactly one is written (the first, in turn), and every loser
    /// reads that one.
    pub(in crate::snapshot) async fn race(
        store: &SnapshotStore,
        rounds: u8,
        claimants: u64,
        how: Claims,
    ) {
        let (a, b): (SpiffeId, SpiffeId) = (
            "spiffe://lab/agent/a".parse().unwrap(),
            "spiffe://lab/agent/b".parse().unwrap(),
        );
        for round in 0..rounds {
            let mut tasks = Vec::new();
            for i in 0..claimants {
                let (store, a, b) = (store.clone(), a.clone(), b.clone());
                tasks.push(tokio::spawn(async move {
                    let h = Handover {
                        migration: MigrationId([7; 16]),
                        snapshot: SnapshotId([round; 16]),
                        manifest: Digest([8; 32]),
                        source: &a,
                        destination: &b,
                    };
                    let (me, verdict) = if i % 2 == 0 {
                        (&b, Verdict::Started)
                    } else {
                        (&a, Verdict::Aborted)
                    };
                    let r = claim(
                        &store,
                        &InsecureCrypto(String::new()),
                        &InsecureCrypto(me.to_string()),
                        me,
                        &h,
                        verdict,
                        1_700_000_000 + i,
                    )
                    .await
                    .unwrap();
                    (i, r.map(|c| c.at))
                }));
                if how == Claims::InTurn {
                    let done = tasks.pop().unwrap().await;
                    tasks.push(tokio::spawn(async move { done.unwrap() }));
                }
            }
            let mut winners = Vec::new();
            let mut read = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    (i, None) => winners.push(i),
                    (_, Some(at)) => read.push(at),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            if how == Claims::InTurn {
                assert_eq!(winners, [0], "the first claim wins");
            }
            let w = winners[0];
            assert!(read.iter().all(|at| *at == 1_700_000_000 + w), "{read:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_claims_racing_exactly_one_wins_and_the_losers_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&format!("file://{}/b", dir.path().display())).unwrap();
        race(&store, 20, 8, Claims::Racing).await;
    }
    /// A claim read by a source that lost its manifest's digest: bound by
    /// migration, snapshot, signer and side, whatever manifest it names.
    #[tokio::test]
    async fn a_claim_is_read_without_the_manifest_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&format!("file://{}", dir.path().display())).unwrap();
        let (a, b): (SpiffeId, SpiffeId) = (
            "spiffe://lab/agent/a".parse().unwrap(),
            "spiffe://lab/agent/b".parse().unwrap(),
        );
        let crypto = InsecureCrypto(b.to_string());
        let h = Handover {
            migration: MigrationId([1; 16]),
            snapshot: SnapshotId([2; 16]),
            manifest: Digest([3; 32]),
            source: &a,
            destination: &b,
        };
        assert!(claim(&store, &crypto, &crypto, &b, &h, Verdict::Started, 1)
            .await
            .unwrap()
            .is_none());
        let unknown = Handover {
            manifest: Digest([0; 32]),
            ..h
        };
        assert!(read(&store, &crypto, &unknown).await.is_err());
        let c = read_any_manifest(&store, &crypto, &unknown)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((c.verdict, c.manifest), (Verdict::Started, Digest([3; 32])));
        // Another migration's claim under that snapshot still does not
        // pass.
        let other = Handover {
            migration: MigrationId([9; 16]),
            ..unknown
        };
        assert!(read_any_manifest(&store, &crypto, &other).await.is_err());
    }
}
