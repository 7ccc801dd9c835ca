//! `audit read`: the agent's signed log over the API, for operators the
//! policy lets read it.

use std::sync::Arc;

use convoy_protocol::ctl::{CtlErrorKind, CtlResponse, AUDIT_CHUNK};
use convoy_protocol::names::SpiffeId;

use super::{error, forbidden};
use crate::host::Host;
use crate::trust::policy::Query;

/// A chunk of the audit log, for operators the policy lets read it.
pub(super) async fn audit_read(host: &Arc<Host>, offset: u64, operator: &SpiffeId) -> CtlResponse {
    let d = host.decide(
        &Query::ReadAudit {
            operator,
            host: &host.id,
        },
        None,
    );
    if !d.permitted {
        return forbidden(&d);
    }
    let Some(log) = &host.audit else {
        return error(
            CtlErrorKind::NotFound,
            "this agent keeps no audit log (no state directory)",
        );
    };
    let path = log.path().to_owned();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, Vec<u8>)> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&path)?;
        let total = f.metadata()?.len();
        let mut bytes = Vec::new();
        if offset < total {
            f.seek(std::io::SeekFrom::Start(offset))?;
            f.take(AUDIT_CHUNK as u64).read_to_end(&mut bytes)?;
        }
        Ok((total, bytes))
    })
    .await;
    match read {
        Ok(Ok((total, bytes))) => CtlResponse::AuditChunk {
            offset,
            total,
            bytes,
        },
        Ok(Err(e)) => error(
            CtlErrorKind::Internal,
            format!("reading the audit log: {e}"),
        ),
        Err(e) => error(CtlErrorKind::Internal, e.to_string()),
    }
}
