//! Snapshot requests (`convoyctl snapshot …`): each asks the policy
//! (`PushSnapshot`, `PullSnapshot`, `ManageSnapshots`), and what changes a
//! bucket or starts a VM is audited. The formats and checks are in
//! [`crate::snapshot`]; this file takes the VM out of, or puts it into,
//! the registry around them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use convoy_protocol::audit::AuditEvent;
use convoy_protocol::ctl::snapshot::{
    CopyReport, DeleteReport, PullReport, PullRequest, PushReport, PushRequest, SnapshotListing,
    SnapshotRequest, SnapshotResponse, VerifyReport, MAX_RECIPIENTS, MAX_URL,
};
use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, VmState};
use convoy_protocol::names::{Role, SpiffeId};
use convoy_protocol::snapshot::{ChunkRef, SignedManifest};

mod qemu;

use super::hold::{claim_vm, failed, release, Claimed, Guest};
use super::{error, forbidden};
use crate::host::{Host, VmHandle};
use crate::snapshot::{self as snap, SnapshotError, SnapshotStore};
use crate::trust::authz::now_unix;
use crate::trust::policy::{Query, VmFacts};

/// Opens a snapshot URL from a request: bounded, checked, or the
/// operator's error.
#[allow(clippy::result_large_err)]
fn open_url(host: &Host, url: &str) -> Result<SnapshotStore, CtlResponse> {
    if url.len() > MAX_URL {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!("a snapshot URL has at most {MAX_URL} bytes"),
        ));
    }
    host.config
        .snapshot_profiles
        .open(url)
        .map_err(|e| error(CtlErrorKind::BadRequest, e.to_string()))
}

pub(super) async fn snapshot(
    host: &Arc<Host>,
    req: SnapshotRequest,
    operator: &SpiffeId,
) -> CtlResponse {
    let store = match open_url(host, req.url()) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let answer = match req {
        SnapshotRequest::Copy { to, snapshot, .. } => {
            copy(host, &store, &to, snapshot, operator).await
        }
        SnapshotRequest::Push(p) => push(host, &store, p, operator).await,
        SnapshotRequest::MigrateVia {
            migrate, wait_secs, ..
        } => super::via::migrate_via(host, &store, migrate, wait_secs, operator).await,
        SnapshotRequest::Pull(p) => pull(host, &store, p, operator).await,
        other => {
            let operation = other.operation();
            let d = host.decide(
                &Query::ManageSnapshots {
                    operator,
                    host: &host.id,
                    url: store.url(),
                    operation,
                },
                None,
            );
            if !d.permitted {
                return forbidden(&d);
            }
            match other {
                SnapshotRequest::Enroll { .. } => enroll(host, &store, operator).await,
                SnapshotRequest::List { .. } => list(host, &store).await,
                SnapshotRequest::Verify { snapshot, .. } => verify(host, &store, snapshot).await,
                SnapshotRequest::Delete { snapshot, .. } => {
                    delete(host, &store, snapshot, operator).await
                }
                _ => Err(error(
                    CtlErrorKind::BadRequest,
                    format!("unsupported snapshot request {operation}"),
                )),
            }
        }
    };
    match answer {
        Ok(r) => CtlResponse::Snapshot(Box::new(r)),
        Err(r) => r,
    }
}

/// Copies snapshots from `from` to the URL `to`: the policy is asked for
/// both (`ManageSnapshots`, `copy-from` and `copy-to`); each manifest
/// written is audited.
async fn copy(
    host: &Arc<Host>,
    from: &SnapshotStore,
    to: &str,
    snapshot: Option<convoy_protocol::snapshot::SnapshotId>,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    let to = open_url(host, to)?;
    for (url, operation) in [(from.url(), "copy-from"), (to.url(), "copy-to")] {
        let d = host.decide(
            &Query::ManageSnapshots {
                operator,
                host: &host.id,
                url,
                operation,
            },
            None,
        );
        if !d.permitted {
            return Err(forbidden(&d));
        }
    }
    let creds = host.creds();
    let r = snap::copy::copy(from, &to, &creds.trust, snapshot)
        .await
        .map_err(|e| failed("snapshot copy", &e))?;
    for f in &r.manifests {
        host.audit(AuditEvent::Snapshot {
            operation: "copy".into(),
            operator: operator.to_string(),
            url: to.url().to_owned(),
            vm: Some(f.manifest.vm.clone()),
            object: f.object.clone(),
            digest: f.digest,
        });
    }
    Ok(SnapshotResponse::Copied(Box::new(CopyReport {
        copied: r
            .manifests
            .iter()
            .map(|f| snap::summary(&f.object, &f.manifest, f.layout, f.digest))
            .collect(),
        manifests_present: r.manifests_present,
        chunks_copied: r.chunks_copied,
        chunks_present: r.chunks_present,
        bytes_streamed: r.bytes_streamed,
        server_side: r.server_side,
        total_ms: r.took.as_secs_f64() * 1e3,
    })))
}

async fn enroll(
    host: &Arc<Host>,
    store: &SnapshotStore,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    let creds = host.creds();
    let (object, key_id) = snap::enroll::enroll(
        store,
        &host.snapshots.sealing,
        &creds.identity,
        &host.id,
        now_unix(),
    )
    .await
    .map_err(|e| failed("snapshot enroll", &e))?;
    host.audit(AuditEvent::Snapshot {
        operation: "enroll".into(),
        operator: operator.to_string(),
        url: store.url().to_owned(),
        vm: None,
        object: object.clone(),
        digest: key_id,
    });
    Ok(SnapshotResponse::Enrolled { object, key_id })
}

/// The SPIFFE ID of the recipient agent called `name`: a federated peer
/// of that name, or this agent's own trust domain's.
fn recipient_id(host: &Host, name: &convoy_protocol::names::AgentName) -> SpiffeId {
    host.creds()
        .trust
        .federated_peer(Role::Agent, name)
        .unwrap_or_else(|| SpiffeId::agent(host.id.domain().clone(), name.clone()))
}

async fn push(
    host: &Arc<Host>,
    store: &SnapshotStore,
    p: PushRequest,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    if p.recipients.len() > MAX_RECIPIENTS {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!("at most {MAX_RECIPIENTS} recipients"),
        ));
    }
    let ids: Vec<SpiffeId> = p.recipients.iter().map(|n| recipient_id(host, n)).collect();
    let name = p.vm;
    let Some(attributes) = host.vms().get(&name).map(|e| e.attributes.clone()) else {
        return Err(error(
            CtlErrorKind::NotFound,
            format!("no VM named {name} here"),
        ));
    };
    let d = host.decide(
        &Query::PushSnapshot {
            operator,
            vm: VmFacts {
                name: &name,
                attributes: &attributes,
            },
            host: &host.id,
            url: store.url(),
            recipients: &ids,
        },
        None,
    );
    if !d.permitted {
        return Err(forbidden(&d));
    }
    let creds = host.creds();
    let mut statements = Vec::with_capacity(ids.len());
    for id in &ids {
        statements.push(
            snap::enroll::recipient(store, &creds.trust, id)
                .await
                .map_err(|e| failed("snapshot push", &e))?,
        );
    }
    // Taken as for a migration: paused here, so that nothing else (a
    // migration, a delete) acts on it until the copy is done; an abort
    // cancels the push.
    let claimed = claim_vm(host, &name)?;
    let vm = match &claimed.vm {
        Guest::Sim(vm) => vm.clone(),
        Guest::Qemu(q) => {
            let q = q.clone();
            return qemu::push(
                host, store, name, attributes, statements, operator, claimed, q,
            )
            .await;
        }
    };
    let Claimed {
        was_running,
        cancel,
        ..
    } = claimed;
    let live = p.live && was_running;
    let paused_at = Instant::now();
    if was_running && !live {
        if let Err(e) = vm.pause() {
            release(host, &name, VmState::Running);
            return Err(error(
                CtlErrorKind::Internal,
                format!("cannot pause VM {name}: {e}"),
            ));
        }
    }
    let req = snap::push::PushRequest {
        name: name.clone(),
        attributes,
        vm: vm.clone(),
        me: host.id.clone(),
        signer: Arc::new(creds.identity.clone()),
        keys: host.snapshots.sealing.clone(),
        recipients: statements,
        level: snap::push::DEFAULT_LEVEL,
        now_unix: now_unix(),
        ticket: None,
        snapshot: None,
        live,
        backend: convoy_protocol::snapshot::SnapshotBackend::Sim,
        journal: Some(host.snapshots.seen.clone()),
    };
    let done = tokio::select! {
        r = snap::push::push(store, &creds.trust, req) => Some(r),
        () = cancel.notified() => None,
    };
    let paused_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    // A live push paused the guest itself at its end (or not at all, if
    // it failed before).
    let resumed = if was_running && !vm.is_running() {
        vm.resume()
    } else {
        Ok(())
    };
    let state = if was_running && resumed.is_ok() {
        VmState::Running
    } else {
        VmState::Paused
    };
    release(host, &name, state);
    if let Err(e) = resumed {
        tracing::error!(vm = %name, "cannot resume after a snapshot push: {e}");
    }
    let r = match done {
        None => {
            return Err(error(
                CtlErrorKind::MigrationFailed,
                format!("snapshot push of {name} aborted; the VM runs here"),
            ))
        }
        Some(Err(e)) => return Err(failed(&format!("snapshot push of {name}"), &e)),
        Some(Ok(r)) => r,
    };
    let paused_ms = match r.paused {
        Some((d, _)) => d.as_secs_f64() * 1e3,
        None if was_running => paused_ms,
        None => 0.0,
    };
    Ok(pushed(host, store, operator, name, &r, paused_ms))
}

/// A push done: its generation recorded as the newest this agent saw of
/// the lineage, audited, reported.
fn pushed(
    host: &Arc<Host>,
    store: &SnapshotStore,
    operator: &SpiffeId,
    name: convoy_protocol::names::VmName,
    r: &snap::push::PushReport,
    paused_ms: f64,
) -> SnapshotResponse {
    if let Err(e) = host
        .snapshots
        .seen
        .record(&r.manifest.lineage, r.generation, &r.digest)
    {
        tracing::warn!("the snapshot record cannot be written: {e}");
    }
    host.audit(AuditEvent::Snapshot {
        operation: "push".into(),
        operator: operator.to_string(),
        url: store.url().to_owned(),
        vm: Some(name),
        object: r.object.clone(),
        digest: r.digest,
    });
    SnapshotResponse::Pushed(Box::new(PushReport {
        summary: snap::summary(&r.object, &r.manifest, r.layout, r.digest),
        uploaded: r.uploaded,
        uploaded_bytes: r.uploaded_bytes,
        paused_ms,
        rounds: r.rounds,
        chunks_ms: r.chunks_took.as_secs_f64() * 1e3,
        total_ms: r.took.as_secs_f64() * 1e3,
    }))
}

async fn pull(
    host: &Arc<Host>,
    store: &SnapshotStore,
    p: PullRequest,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    let creds = host.creds();
    let found = snap::pull::choose(store, &creds.trust, &host.id, p.snapshot, p.vm.as_ref())
        .await
        .map_err(|e| failed("snapshot pull", &e))?;
    let m = &found.manifest;
    let name = m.vm.clone();
    if let Err(e) = m.attributes.validate() {
        return Err(error(
            CtlErrorKind::BadRequest,
            format!("{}: the VM's attributes: {e}", found.object),
        ));
    }
    let qemu = m.backend == convoy_protocol::snapshot::SnapshotBackend::Qemu;
    // A manifest with a ticket is a store-and-forward migration to this
    // agent: the ticket must name it and the manifest's signer, and the
    // policy decides it as a migration in.
    let ticket = match &m.ticket {
        None => None,
        Some(t) => {
            // What the snapshot holds, as the source reported the VM: a
            // QEMU VM's memory and disks are in its sealed state.
            let subject = if qemu {
                qemu::subject(host, &found)?
            } else {
                m.subject()
            };
            Some(super::via::accept(host, m, t, &subject)?)
        }
    };
    let d = match &ticket {
        Some(v) => host.decide(
            &Query::MigrateIn {
                operator: &v.signer,
                vm: VmFacts {
                    name: &name,
                    attributes: &m.attributes,
                },
                source: &m.source,
                destination: &host.id,
                ticket: v,
            },
            Some(v.ticket.id),
        ),
        None => host.decide(
            &Query::PullSnapshot {
                operator,
                vm: VmFacts {
                    name: &name,
                    attributes: &m.attributes,
                },
                host: &host.id,
                url: store.url(),
                source: &m.source,
            },
            None,
        ),
    };
    if !d.permitted {
        return Err(forbidden(&d));
    }
    let seen = host
        .snapshots
        .seen
        .get(&m.lineage)
        .map_err(|e| error(CtlErrorKind::Internal, format!("the snapshot record: {e}")))?;
    if qemu {
        return qemu::pull(
            host,
            store,
            found,
            seen,
            p.paused,
            ticket.as_ref(),
            operator,
        )
        .await;
    }
    if let Some(r) = super::vm::reserve_error(host, &name, m.memory.bytes()) {
        return Err(r);
    }
    let (object, lineage, layout, attributes, source, snapshot) = (
        found.object.clone(),
        m.lineage,
        found.layout,
        m.attributes.clone(),
        m.source.clone(),
        m.snapshot,
    );
    let disk_dir = host.config.disk_dir();
    let partial = kept(host, found.digest, m.stored().1, found.layout).await;
    let pulled = snap::pull::restore(
        store,
        found,
        snap::pull::PullRequest {
            me: host.id.clone(),
            keys: &host.snapshots.sealing,
            verifier: &creds.trust,
            snapshot: p.snapshot,
            seen,
            // Memory is reserved above; disks are sparse files.
            capacity: u64::MAX,
            disk_dir: disk_dir.as_deref(),
            // A handover starts the VM only once its claim is written.
            paused: p.paused || ticket.is_some(),
            partial: partial.clone(),
        },
    )
    .await;
    let pulled = match pulled {
        Ok(v) => v,
        Err(e) => {
            host.remove(&name);
            return Err(failed(&format!("snapshot pull of {name}"), &e));
        }
    };
    // Recorded before the VM is: a later pull of an older generation is
    // refused even if the agent stops right after this one.
    if let Err(e) = host
        .snapshots
        .seen
        .record(&lineage, pulled.manifest.generation, &pulled.digest)
    {
        host.remove(&name);
        pulled.vm.destroy();
        return Err(error(
            CtlErrorKind::Internal,
            format!("the snapshot record cannot be written ({e}); VM {name} not started"),
        ));
    }
    // With a registry, the VM is this agent's (the name free, or already
    // its own) before it may run here.
    if let Some(r) = super::vm::claim(host, &name, &attributes, "restored").await {
        host.remove(&name);
        pulled.vm.destroy();
        return Err(r);
    }
    if let Some(v) = &ticket {
        let h = convoy_protocol::snapshot::claim::Handover {
            migration: v.ticket.id,
            snapshot,
            manifest: pulled.digest,
            source: &source,
            destination: &host.id,
        };
        if let Err(why) = super::via::claim_started(
            host,
            store,
            &h,
            &name,
            &Guest::Sim(pulled.vm.clone()),
            p.paused,
        )
        .await
        {
            host.remove(&name);
            pulled.vm.destroy();
            super::vm::unclaim(host, &name).await;
            return Err(why);
        }
    }
    let state = if p.paused {
        VmState::Paused
    } else {
        VmState::Running
    };
    let registered = super::vm::register(
        host,
        &name,
        VmHandle::Sim(pulled.vm.clone()),
        state,
        &attributes,
    )
    .await;
    if let Err(r) = registered {
        super::vm::unclaim(host, &name).await;
        return Err(r);
    }
    finish_kept(partial).await;
    pull_done(
        host,
        store,
        operator,
        &PullDone {
            object: &object,
            manifest: &pulled.manifest,
            layout,
            digest: pulled.digest,
            fetched: pulled.fetched,
            chunks_took: pulled.chunks_took,
            took: pulled.took,
        },
    )
}

/// What a pull did.
struct PullDone<'a> {
    object: &'a str,
    manifest: &'a convoy_protocol::snapshot::SnapshotManifest,
    layout: convoy_protocol::snapshot::ChunkLayout,
    digest: convoy_protocol::digest::Digest,
    fetched: snap::pull::Fetched,
    chunks_took: std::time::Duration,
    took: std::time::Duration,
}

/// The pull is done: its kept chunks go (off the async threads) before it
/// is reported.
async fn finish_kept(partial: Option<Arc<snap::partial::Partial>>) {
    if let Some(p) = partial {
        let _ = tokio::task::spawn_blocking(move || p.finish()).await;
    }
}

/// Where the pull of the manifest `digest` (`stored` sealed bytes) keeps
/// its chunks ([`snap::partial`]), opened off the async threads.
async fn kept(
    host: &Arc<Host>,
    digest: convoy_protocol::digest::Digest,
    stored: u64,
    layout: convoy_protocol::snapshot::ChunkLayout,
) -> Option<Arc<snap::partial::Partial>> {
    let root = host.snapshots.pulls.clone();
    let max = layout.max_sealed() as u64;
    tokio::task::spawn_blocking(move || snap::partial::Partial::open(&root, &digest, stored, max))
        .await
        .ok()
        .flatten()
        .map(Arc::new)
}

/// A pull done, the VM registered: audited, reported.
#[allow(clippy::result_large_err)]
fn pull_done(
    host: &Arc<Host>,
    store: &SnapshotStore,
    operator: &SpiffeId,
    d: &PullDone<'_>,
) -> Result<SnapshotResponse, CtlResponse> {
    let name = &d.manifest.vm;
    host.audit(AuditEvent::Snapshot {
        operation: "pull".into(),
        operator: operator.to_string(),
        url: store.url().to_owned(),
        vm: Some(name.clone()),
        object: d.object.to_owned(),
        digest: d.digest,
    });
    let vm = host
        .vm_info(name)
        .ok_or_else(|| error(CtlErrorKind::Internal, "VM vanished"))?;
    Ok(SnapshotResponse::Pulled(Box::new(PullReport {
        summary: snap::summary(d.object, d.manifest, d.layout, d.digest),
        vm,
        fetched: (d.fetched.chunks, d.fetched.bytes),
        kept: d.fetched.kept,
        chunks_ms: d.chunks_took.as_secs_f64() * 1e3,
        total_ms: d.took.as_secs_f64() * 1e3,
    })))
}

async fn list(host: &Arc<Host>, store: &SnapshotStore) -> Result<SnapshotResponse, CtlResponse> {
    let creds = host.creds();
    let objects = snap::manifest_objects(store)
        .await
        .map_err(|e| failed("snapshot list", &e))?;
    let mut listing = SnapshotListing {
        snapshots: Vec::new(),
        refused: Vec::new(),
    };
    for object in objects {
        match snap::read_manifest(store, &object, &creds.trust).await {
            Ok(f) => {
                listing
                    .snapshots
                    .push(snap::summary(&object, &f.manifest, f.layout, f.digest))
            }
            Err(e) => listing
                .refused
                .push(convoy_protocol::ctl::snapshot::RefusedObject {
                    object,
                    reason: e.to_string(),
                }),
        }
    }
    Ok(SnapshotResponse::Listed(listing))
}

async fn verify(
    host: &Arc<Host>,
    store: &SnapshotStore,
    snapshot: Option<convoy_protocol::snapshot::SnapshotId>,
) -> Result<SnapshotResponse, CtlResponse> {
    let t = Instant::now();
    let creds = host.creds();
    let found = snap::pull::choose(store, &creds.trust, &host.id, snapshot, None)
        .await
        .map_err(|e| failed("snapshot verify", &e))?;
    let (fetched, root) = snap::pull::verify(store, &found, &host.id, &host.snapshots.sealing)
        .await
        .map_err(|e| failed("snapshot verify", &e))?;
    Ok(SnapshotResponse::Verified(Box::new(VerifyReport {
        summary: snap::summary(&found.object, &found.manifest, found.layout, found.digest),
        fetched,
        root,
        total_ms: t.elapsed().as_secs_f64() * 1e3,
    })))
}

/// Deletes snapshot `id`'s manifest, then each chunk it names that no
/// other manifest under the URL names. A manifest that does not decode
/// keeps every chunk (what it names cannot be known). Not safe beside a
/// push of the same lineage, which may count on a chunk being deleted.
async fn delete(
    host: &Arc<Host>,
    store: &SnapshotStore,
    id: convoy_protocol::snapshot::SnapshotId,
    operator: &SpiffeId,
) -> Result<SnapshotResponse, CtlResponse> {
    let objects = snap::manifest_objects(store)
        .await
        .map_err(|e| failed("snapshot delete", &e))?;
    let Some(target) = objects
        .iter()
        .find(|o| snap::holds_snapshot(o, &id))
        .cloned()
    else {
        return Err(error(
            CtlErrorKind::NotFound,
            format!("{}: no snapshot {id}", store.url()),
        ));
    };
    type Named = (
        std::collections::BTreeSet<String>,
        convoy_protocol::digest::Digest,
    );
    let chunks_of = |bytes: &[u8]| -> Option<Named> {
        let signed: SignedManifest = postcard::from_bytes(bytes).ok()?;
        let m: convoy_protocol::snapshot::SnapshotManifest =
            postcard::from_bytes(&signed.body).ok()?;
        let names: std::collections::BTreeSet<String> = m
            .chunks
            .iter()
            .filter_map(|c| match c {
                ChunkRef::Stored { name, .. } => {
                    Some(convoy_protocol::snapshot::chunk_object(name))
                }
                ChunkRef::Zero => None,
            })
            .collect();
        Some((names, convoy_protocol::snapshot::manifest_digest(&signed)))
    };
    let read = |o: String| async move {
        store
            .get(&o, snap::MAX_MANIFEST_OBJECT)
            .await
            .map_err(|e| failed("snapshot delete", &SnapshotError::from(e)))
    };
    let mine = chunks_of(&read(target.clone()).await?);
    let mut others: HashSet<String> = HashSet::new();
    let mut unknown = false;
    for o in objects.iter().filter(|o| **o != target) {
        match chunks_of(&read(o.clone()).await?) {
            Some((names, _)) => others.extend(names),
            None => unknown = true,
        }
    }
    store
        .delete(&target)
        .await
        .map_err(|e| failed("snapshot delete", &SnapshotError::from(e)))?;
    let (mut deleted, mut kept) = (0u64, 0u64);
    let digest = mine
        .as_ref()
        .map_or(convoy_protocol::digest::Digest([0; 32]), |(_, d)| *d);
    for c in mine.map(|(names, _)| names).unwrap_or_default() {
        if unknown || others.contains(&c) {
            kept += 1;
            continue;
        }
        store
            .delete(&c)
            .await
            .map_err(|e| failed("snapshot delete", &SnapshotError::from(e)))?;
        deleted += 1;
    }
    host.audit(AuditEvent::Snapshot {
        operation: "delete".into(),
        operator: operator.to_string(),
        url: store.url().to_owned(),
        vm: None,
        object: target.clone(),
        digest,
    });
    Ok(SnapshotResponse::Deleted(DeleteReport {
        object: target,
        chunks_deleted: deleted,
        chunks_kept: kept,
    }))
}
