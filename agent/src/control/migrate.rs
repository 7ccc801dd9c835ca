//! Migration requests: `migrate` (run by [`crate::engine::outgoing::migrate`],
//! its progress streamed to the operator) and `abort`.

use std::sync::Arc;

use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, MigrateRequest, VmState};
use convoy_protocol::names::{SpiffeId, VmName};

use crate::transport::SendStream;

use super::{error, may_act_on, respond};
use crate::host::Host;
use crate::transport::WireError;
use crate::trust::policy::Query;

/// Cancels the outgoing migration of `name`, and waits until the VM runs
/// here again (or the cancel came too late: the VM was handed over).
pub(super) async fn abort(host: &Arc<Host>, name: &VmName, operator: &SpiffeId) -> CtlResponse {
    if let Some(r) = may_act_on(host, name, operator, |operator, vm, host| Query::Abort {
        operator,
        vm,
        host,
    }) {
        return r;
    }
    let Some(cancel) = host.vms().get(name).and_then(|e| e.cancel.clone()) else {
        return error(
            CtlErrorKind::BadRequest,
            format!("VM {name} is not migrating out of this agent"),
        );
    };
    cancel.notify_one();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = host.vms().get(name).map(|e| (e.state, e.cancel.is_some()));
        match state {
            Some((VmState::Running, false)) => {
                // Running again: by this cancel, or did it end otherwise?
                let ours = host.recent().iter().rev().find(|r| &r.vm == name).map(|r| {
                    matches!(&r.outcome, convoy_protocol::ctl::Outcome::Aborted(w) if w.contains("cancelled"))
                });
                return match ours {
                    Some(true) | None => CtlResponse::Aborted(name.clone()),
                    Some(false) => error(
                        CtlErrorKind::BadRequest,
                        format!("VM {name}'s migration ended on its own before the cancel; it runs here"),
                    ),
                };
            }
            None => {
                return error(
                    CtlErrorKind::BadRequest,
                    format!("too late: VM {name} was already handed over to its destination"),
                )
            }
            _ if tokio::time::Instant::now() > deadline => {
                return error(
                    CtlErrorKind::Internal,
                    format!("VM {name} did not come back within 30 s; see `convoyctl status`"),
                )
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// Runs `req` for `operator`, streaming its progress on `send`, then its
/// report (or its error).
pub(super) async fn migrate(
    host: &Arc<Host>,
    req: MigrateRequest,
    operator: &SpiffeId,
    send: &mut SendStream,
) -> Result<(), WireError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    // Its id and the destination's identity are recorded once its ticket
    // checks out.
    let span = tracing::info_span!(
        "migration",
        role = "source",
        vm = %req.vm,
        peer = tracing::field::Empty,
        migration = tracing::field::Empty,
    );
    let task = tokio::spawn(tracing::Instrument::instrument(
        crate::engine::outgoing::migrate(host.clone(), req, operator.clone(), tx),
        span,
    ));
    while let Some(p) = rx.recv().await {
        // The operator may go away; the migration goes on.
        let _ = respond(send, CtlResponse::Progress(p)).await;
    }
    let r = match task.await {
        Ok(Ok(report)) => CtlResponse::Report(Box::new(report)),
        Ok(Err(e)) => error(e.kind(), e.to_string()),
        Err(e) => error(
            CtlErrorKind::Internal,
            format!("migration task failed: {e}"),
        ),
    };
    respond(send, r).await
}
