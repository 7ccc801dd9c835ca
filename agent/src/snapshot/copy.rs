//! Snapshots copied from one bucket to another without being opened: the
//! copying agent needs no data key (it need not be a recipient). Each
//! manifest's signature chain is checked before anything of it is copied;
//! then its chunks that the destination lacks are copied — by the server
//! when both URLs are prefixes of one S3 bucket, otherwise streamed
//! through this agent one chunk at a time, each checked against the
//! length its signed manifest gives — and the manifest last, so a copy
//! cut short is never seen as a snapshot at the destination, and running
//! the copy again takes up where it stopped (what is there is not copied
//! again).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use convoy_protocol::signed::ChainVerifier;
use convoy_protocol::snapshot::{chunk_object, ChunkRef, SnapshotId};
use futures_util::StreamExt;

use super::{manifest_objects, read_manifest, Found, SnapshotError, SnapshotStore};

/// Chunks copied at once.
const PARALLEL: usize = 8;

/// What a copy did.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    /// Manifests copied (written at the destination by this copy).
    pub manifests: Vec<Found>,
    /// Manifests the destination held already.
    pub manifests_present: u64,
    /// Chunks copied, and their bytes (0 bytes counted for server-side
    /// copies: none passed through this agent).
    pub chunks_copied: u64,
    /// Bytes streamed through this agent.
    pub bytes_streamed: u64,
    /// Chunks the destination held already.
    pub chunks_present: u64,
    /// Whether the server copied.
    pub server_side: bool,
    /// The whole copy.
    pub took: Duration,
}

/// Copies snapshot `snapshot` (or every snapshot) from `from` to `to`.
pub async fn copy(
    from: &SnapshotStore,
    to: &SnapshotStore,
    verifier: &(dyn ChainVerifier + Sync),
    snapshot: Option<SnapshotId>,
) -> Result<CopyReport, SnapshotError> {
    let started = Instant::now();
    let mut objects = manifest_objects(from).await?;
    if let Some(id) = snapshot {
        objects.retain(|o| super::holds_snapshot(o, &id));
        if objects.is_empty() {
            return Err(SnapshotError::NotFound {
                url: from.url().to_owned(),
                what: format!("no snapshot {id}"),
            });
        }
    }
    // Oldest first: a later generation never lands before the one it
    // follows.
    objects.reverse();
    let present: HashSet<String> = manifest_objects(to).await?.into_iter().collect();
    let mut chunks_there: HashSet<String> = to.list("chunks").await?.into_iter().collect();
    let mut report = CopyReport {
        server_side: to.copies_server_side_from(from),
        ..CopyReport::default()
    };
    for object in objects {
        if present.contains(&object) {
            report.manifests_present += 1;
            continue;
        }
        let found = read_manifest(from, &object, verifier).await?;
        let max = found.layout.max_sealed() as u64;
        let wanted: Vec<(String, u32)> = found
            .manifest
            .chunks
            .iter()
            .filter_map(|c| match c {
                ChunkRef::Stored { name, len } => Some((chunk_object(name), *len)),
                ChunkRef::Zero => None,
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let (missing, there): (Vec<_>, Vec<_>) = wanted
            .into_iter()
            .partition(|(name, _)| !chunks_there.contains(name));
        report.chunks_present += there.len() as u64;
        let server = report.server_side;
        let manifest = object.as_str();
        let mut results = futures_util::stream::iter(missing)
            .map(|(name, len)| async move {
                if server {
                    to.copy_in(from, &name, max).await?;
                    return Ok::<_, SnapshotError>((name, 0u64));
                }
                let bytes = from.get(&name, max).await?;
                if bytes.len() != len as usize {
                    return Err(SnapshotError::ChunkLength {
                        object: name,
                        got: bytes.len() as u64,
                        expected: len,
                        manifest: manifest.to_owned(),
                    });
                }
                let n = bytes.len() as u64;
                to.put_new(&name, bytes).await?;
                Ok((name, n))
            })
            .buffer_unordered(PARALLEL);
        while let Some(r) = results.next().await {
            let (name, n) = r?;
            report.chunks_copied += 1;
            report.bytes_streamed += n;
            chunks_there.insert(name);
        }
        drop(results);
        let signed =
            postcard::to_stdvec(&found.signed).map_err(|source| SnapshotError::Decode {
                object: object.clone(),
                source,
            })?;
        if !to.put_new(&object, Bytes::from(signed)).await? {
            report.manifests_present += 1;
            continue;
        }
        report.manifests.push(found);
    }
    report.took = started.elapsed();
    Ok(report)
}
