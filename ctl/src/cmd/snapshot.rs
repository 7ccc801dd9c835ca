//! `convoyctl snapshot`: VMs as encrypted, signed snapshots in object
//! storage (`file:///DIR`, `s3://`, `gs://`, `az://`). Every command runs on
//! the agent named by `--agent`, which reads and writes the bucket with
//! its own credentials (the standard AWS environment of the agent's
//! process for `s3://`); nothing secret passes through convoyctl.

use anyhow::{bail, Result};
use convoy_protocol::ctl::snapshot::{
    PullRequest, PushRequest, SnapshotRequest, SnapshotResponse, SnapshotSummary,
};
use convoy_protocol::names::{AgentName, VmName};
use convoy_protocol::snapshot::SnapshotId;

use crate::conn::{client, Global};
use crate::render;

/// `snapshot` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Snapshot {
    /// Publish the agent's signed sealing key under URL, so that pushers
    /// can seal snapshots for it (`push --for AGENT`).
    Enroll {
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
    },
    /// Push a VM of the agent to URL: sealed chunks (unchanged ones of an
    /// earlier generation are not uploaded again) and a signed manifest.
    /// A running VM is paused for the copy and resumed after.
    Push {
        /// The VM.
        vm: VmName,
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
        /// An agent that may open the snapshot (repeatable; the pusher
        /// always can). It must have enrolled under URL.
        #[arg(long = "for", value_name = "AGENT")]
        recipients: Vec<AgentName>,
        /// Copy while the VM runs, in rounds, and pause it only for what
        /// it wrote last (a running VM; otherwise it is paused for the
        /// whole copy).
        #[arg(long)]
        live: bool,
    },
    /// Restore a snapshot on the agent: every chunk, the root and the
    /// device state are checked before the VM starts.
    Pull {
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
        /// This snapshot (32 hex digits); default: the newest the agent
        /// can open.
        #[arg(long)]
        snapshot: Option<SnapshotId>,
        /// Only a snapshot of this VM.
        #[arg(long)]
        vm: Option<VmName>,
        /// Keep the VM paused once restored.
        #[arg(long)]
        paused: bool,
    },
    /// List the snapshots under URL (each manifest's signature checked)
    /// and the manifest objects refused.
    List {
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
    },
    /// Fetch and check every chunk of a snapshot without starting it.
    Verify {
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
        /// This snapshot; default: the newest the agent can open.
        #[arg(long)]
        snapshot: Option<SnapshotId>,
    },
    /// Copy snapshots from URL to TO without opening them (the agent need
    /// not be a recipient): signatures checked, missing chunks copied (by
    /// the server within one S3 bucket), each manifest last. Run it again
    /// after a cut: it takes up where it stopped.
    Copy {
        /// From: `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
        /// To.
        to: String,
        /// Only this snapshot; default: every one.
        #[arg(long)]
        snapshot: Option<SnapshotId>,
    },
    /// Delete a snapshot: its manifest, and the chunks no other manifest
    /// under URL names.
    Delete {
        /// `file:///DIR`, `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
        url: String,
        /// The snapshot (32 hex digits).
        snapshot: SnapshotId,
    },
}

/// Runs a `snapshot` command.
pub async fn run(g: &Global, c: Snapshot) -> Result<()> {
    let req = match c {
        Snapshot::Enroll { url } => SnapshotRequest::Enroll { url },
        Snapshot::Push {
            vm,
            url,
            recipients,
            live,
        } => SnapshotRequest::Push(PushRequest {
            vm,
            url,
            recipients,
            live,
        }),
        Snapshot::Pull {
            url,
            snapshot,
            vm,
            paused,
        } => SnapshotRequest::Pull(PullRequest {
            url,
            snapshot,
            vm,
            paused,
        }),
        Snapshot::List { url } => SnapshotRequest::List { url },
        Snapshot::Verify { url, snapshot } => SnapshotRequest::Verify { url, snapshot },
        Snapshot::Delete { url, snapshot } => SnapshotRequest::Delete { url, snapshot },
        Snapshot::Copy { url, to, snapshot } => SnapshotRequest::Copy { url, to, snapshot },
    };
    let cl = client(g).await?;
    let r = cl.snapshot(req).await;
    cl.close().await;
    let r = r?;
    if g.json {
        return render::json(&json(&r));
    }
    match r {
        SnapshotResponse::Enrolled { object, key_id } => {
            println!(
                "sealing key {} published as {object}",
                short(&key_id.to_hex())
            );
        }
        SnapshotResponse::Pushed(p) => {
            describe(&p.summary);
            println!(
                "uploaded {} of {} stored chunks ({}){}, VM paused {:.0} ms, chunks {:.0} ms, total {:.0} ms",
                p.uploaded,
                p.summary.chunks.1,
                render::mib(p.uploaded_bytes),
                if p.rounds > 0 {
                    format!(" in {} rounds while it ran", p.rounds)
                } else {
                    String::new()
                },
                p.paused_ms,
                p.chunks_ms,
                p.total_ms
            );
        }
        SnapshotResponse::Pulled(p) => {
            describe(&p.summary);
            println!(
                "verified and restored: VM {} is {:?} here; fetched {} chunks ({}){} in {:.0} ms, total {:.0} ms",
                p.vm.name,
                p.vm.state,
                p.fetched.0,
                render::mib(p.fetched.1),
                if p.kept > 0 {
                    format!(
                        ", {} more kept by an earlier pull cut short (opened again)",
                        p.kept
                    )
                } else {
                    String::new()
                },
                p.chunks_ms,
                p.total_ms
            );
        }
        SnapshotResponse::Listed(l) => {
            let rows: Vec<Vec<String>> = l
                .snapshots
                .iter()
                .map(|s| {
                    vec![
                        s.snapshot.to_string(),
                        s.vm.to_string(),
                        s.generation.to_string(),
                        render::mib(s.vm_bytes),
                        format!("{}/{}", s.chunks.1, s.chunks.0),
                        s.source.clone(),
                        s.recipients.len().to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render::table(
                    &[
                        "snapshot",
                        "vm",
                        "gen",
                        "size",
                        "stored/chunks",
                        "pushed by",
                        "recipients"
                    ],
                    &rows
                )
            );
            for r in &l.refused {
                println!("refused {}: {}", r.object, r.reason);
            }
            if !l.refused.is_empty() {
                bail!("{} manifest object(s) refused", l.refused.len());
            }
        }
        SnapshotResponse::Verified(v) => {
            describe(&v.summary);
            println!(
                "verified: {} chunks ({}) opened, root {} as signed, in {:.0} ms",
                v.fetched.0,
                render::mib(v.fetched.1),
                short(&v.root.to_hex()),
                v.total_ms
            );
        }
        SnapshotResponse::Deleted(d) => {
            println!(
                "deleted {}: {} chunks removed, {} kept (named by other manifests)",
                d.object, d.chunks_deleted, d.chunks_kept
            );
        }
        SnapshotResponse::Copied(c) => {
            for s in &c.copied {
                describe(s);
            }
            println!(
                "copied {} snapshot(s) ({} already there), {} chunks ({} already there), {} through the agent{}, in {:.0} ms",
                c.copied.len(),
                c.manifests_present,
                c.chunks_copied,
                c.chunks_present,
                render::mib(c.bytes_streamed),
                if c.server_side { " (the server copied)" } else { "" },
                c.total_ms
            );
        }
        other => bail!("unexpected answer {other:?}"),
    }
    Ok(())
}

/// The JSON of an answer: ids and digests as hex.
fn json(r: &SnapshotResponse) -> serde_json::Value {
    use serde_json::json;
    match r {
        SnapshotResponse::Enrolled { object, key_id } => {
            json!({ "enrolled": object, "key_id": key_id.to_hex() })
        }
        SnapshotResponse::Pushed(p) => json!({
            "pushed": summary_json(&p.summary),
            "uploaded_chunks": p.uploaded,
            "uploaded_bytes": p.uploaded_bytes,
            "paused_ms": p.paused_ms,
            "rounds": p.rounds,
            "chunks_ms": p.chunks_ms,
            "total_ms": p.total_ms,
        }),
        SnapshotResponse::Pulled(p) => json!({
            "pulled": summary_json(&p.summary),
            "vm": p.vm.name,
            "state": format!("{:?}", p.vm.state),
            "fetched_chunks": p.fetched.0,
            "fetched_bytes": p.fetched.1,
            "kept_chunks": p.kept,
            "chunks_ms": p.chunks_ms,
            "total_ms": p.total_ms,
        }),
        SnapshotResponse::Listed(l) => json!({
            "snapshots": l.snapshots.iter().map(summary_json).collect::<Vec<_>>(),
            "refused": l.refused.iter().map(|r| json!({
                "object": r.object, "reason": r.reason,
            })).collect::<Vec<_>>(),
        }),
        SnapshotResponse::Verified(v) => json!({
            "verified": summary_json(&v.summary),
            "fetched_chunks": v.fetched.0,
            "fetched_bytes": v.fetched.1,
            "root": v.root.to_hex(),
            "total_ms": v.total_ms,
        }),
        SnapshotResponse::Deleted(d) => json!({
            "deleted": d.object,
            "chunks_deleted": d.chunks_deleted,
            "chunks_kept": d.chunks_kept,
        }),
        SnapshotResponse::Copied(c) => json!({
            "copied": c.copied.iter().map(summary_json).collect::<Vec<_>>(),
            "manifests_present": c.manifests_present,
            "chunks_copied": c.chunks_copied,
            "chunks_present": c.chunks_present,
            "bytes_streamed": c.bytes_streamed,
            "server_side": c.server_side,
            "total_ms": c.total_ms,
        }),
        other => json!({ "unexpected": format!("{other:?}") }),
    }
}

fn summary_json(s: &SnapshotSummary) -> serde_json::Value {
    serde_json::json!({
        "object": s.object,
        "snapshot": s.snapshot.to_string(),
        "lineage": s.lineage.to_string(),
        "generation": s.generation,
        "vm": s.vm,
        "backend": s.backend.to_string(),
        "source": s.source,
        "created_at": s.created_at,
        "recipients": s.recipients,
        "vm_bytes": s.vm_bytes,
        "chunks": s.chunks.0,
        "stored_chunks": s.chunks.1,
        "digest": s.digest.to_hex(),
    })
}

fn describe(s: &SnapshotSummary) {
    println!(
        "snapshot {} of {} {} (generation {}, {}, pushed by {}) as {}",
        s.snapshot,
        s.backend,
        s.vm,
        s.generation,
        render::mib(s.vm_bytes),
        s.source,
        s.object
    );
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}
