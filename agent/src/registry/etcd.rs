//! The registry's operations as etcd v3 requests (the `etcd-client`
//! crate over gRPC). Every request is bounded by a timeout; every value
//! read back is decoded and checked ([`convoy_protocol::registry`]) before
//! it is believed.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use convoy_protocol::names::{SpiffeId, VmName};
use convoy_protocol::registry::{
    agent_key, agents_prefix, vm_key, vm_of_key, vms_prefix, AgentRecord, OwnerRecord,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, TxnOp,
    TxnOpResponse,
};

use super::{Contents, RegistryConfig, RegistryError};

/// A connection to etcd.
pub(super) struct Store {
    client: Client,
    /// The lease of this agent's liveness record (0: none yet).
    lease: AtomicI64,
}

fn unreachable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unreachable(e.to_string())
}

async fn bounded<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unreachable(e)),
        Err(_) => Err(RegistryError::Unreachable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

fn owner_of(prefix: &str, kv: &KeyValue) -> Result<(OwnerRecord, i64), RegistryError> {
    Ok((
        OwnerRecord::decode(prefix, kv.key(), kv.value())?,
        kv.mod_revision(),
    ))
}

/// The record a transaction's `else` branch read back, if any.
fn read_back(
    prefix: &str,
    ops: Vec<TxnOpResponse>,
) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
    for op in ops {
        if let TxnOpResponse::Get(g) = op {
            return g.kvs().first().map(|kv| owner_of(prefix, kv)).transpose();
        }
    }
    Ok(None)
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, RegistryError> {
    // PEM files of a few KiB; a larger one is not a certificate.
    let meta = std::fs::metadata(path)
        .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))?;
    if meta.len() > 1 << 20 {
        return Err(RegistryError::Config(format!(
            "{}: {} bytes, not a PEM file",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))
}

impl Store {
    pub(super) async fn connect(config: &RegistryConfig) -> Result<Store, RegistryError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(2), config.timeout);
        if let Some(tls) = &config.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read_file(&tls.ca)?));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd_client::Identity::from_pem(
                    read_file(cert)?,
                    read_file(key)?,
                ));
            }
            options = options.with_tls(t);
        }
        let client = bounded(
            config.timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await?;
        Ok(Store {
            client,
            lease: AtomicI64::new(0),
        })
    }

    pub(super) async fn get_owner(
        &self,
        prefix: &str,
        vm: &VmName,
        timeout: Duration,
    ) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
        let mut c = self.client.clone();
        let r = bounded(timeout, c.get(vm_key(prefix, vm), None)).await?;
        r.kvs().first().map(|kv| owner_of(prefix, kv)).transpose()
    }

    /// Writes `record` if its key is absent; else returns what is there.
    pub(super) async fn create(
        &self,
        prefix: &str,
        record: &OwnerRecord,
        timeout: Duration,
    ) -> Result<Option<(OwnerRecord, i64)>, RegistryError> {
        let key = vm_key(prefix, &record.vm);
        let txn = etcd_client::Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), record.encode(), None)])
            .or_else([TxnOp::get(key, None)]);
        let mut c = self.client.clone();
        let r = bounded(timeout, c.txn(txn)).await?;
        if r.succeeded() {
            return Ok(None);
        }
        read_back(prefix, r.op_responses())
    }

    /// Writes `new` if its key is still at `revision`: `None` when it
    /// was, else what is there now (`Some(None)`: nothing).
    pub(super) async fn swap(
        &self,
        prefix: &str,
        revision: i64,
        new: &OwnerRecord,
        timeout: Duration,
    ) -> Result<Option<Option<(OwnerRecord, i64)>>, RegistryError> {
        let key = vm_key(prefix, &new.vm);
        let txn = etcd_client::Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key.clone(), new.encode(), None)])
            .or_else([TxnOp::get(key, None)]);
        let mut c = self.client.clone();
        let r = bounded(timeout, c.txn(txn)).await?;
        if r.succeeded() {
            return Ok(None);
        }
        read_back(prefix, r.op_responses()).map(Some)
    }

    pub(super) async fn delete_if(
        &self,
        prefix: &str,
        vm: &VmName,
        revision: i64,
        timeout: Duration,
    ) -> Result<(), RegistryError> {
        let key = vm_key(prefix, vm);
        let txn = etcd_client::Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        let r = bounded(timeout, c.txn(txn)).await?;
        if r.succeeded() {
            Ok(())
        } else {
            // Not retried: the revision is stale (or the record gone).
            Err(RegistryError::Changed(vm.clone()))
        }
    }

    pub(super) async fn list(
        &self,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Contents, RegistryError> {
        let mut c = self.client.clone();
        let vms = bounded(
            timeout,
            c.get(vms_prefix(prefix), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let agents = bounded(
            timeout,
            c.get(agents_prefix(prefix), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut out = Contents::default();
        for kv in vms.kvs() {
            match OwnerRecord::decode(prefix, kv.key(), kv.value()) {
                Ok(r) => out.vms.push(r),
                Err(e) => out.bad.push(match vm_of_key(prefix, kv.key()) {
                    Ok(vm) => format!("{vm}: {e}"),
                    Err(k) => k.to_string(),
                }),
            }
        }
        for kv in agents.kvs() {
            match AgentRecord::decode(prefix, kv.key(), kv.value()) {
                Ok(r) => out.agents.push(r),
                Err(e) => out.bad.push(format!(
                    "{}: {e}",
                    String::from_utf8_lossy(kv.key()).escape_debug()
                )),
            }
        }
        Ok(out)
    }

    /// Takes a new lease and writes the liveness record under it.
    pub(super) async fn register(
        &self,
        prefix: &str,
        record: &AgentRecord,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<(), RegistryError> {
        let mut c = self.client.clone();
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = bounded(timeout, c.lease_grant(secs, None)).await?.id();
        let put = PutOptions::new().with_lease(lease);
        bounded(
            timeout,
            c.put(agent_key(prefix, &record.id), record.encode(), Some(put)),
        )
        .await?;
        self.lease.store(lease, Ordering::Release);
        Ok(())
    }

    /// Renews the lease once: `false` when it has expired.
    pub(super) async fn renew(&self, timeout: Duration) -> Result<bool, RegistryError> {
        let lease = self.lease.load(Ordering::Acquire);
        if lease == 0 {
            return Ok(false);
        }
        let mut c = self.client.clone();
        let renewed = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(timeout, renewed).await {
            Ok(Ok(Some(r))) => Ok(r.ttl() > 0),
            Ok(Ok(None)) => Err(RegistryError::Unreachable(
                "the lease's keep-alive stream closed".into(),
            )),
            // etcd answers an expired lease's keep-alive with "not found".
            Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(false),
            Ok(Err(e)) => Err(unreachable(e)),
            Err(_) => Err(RegistryError::Unreachable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Revokes the lease: the liveness record goes at once.
    pub(super) async fn leave(&self, _prefix: &str, _me: &SpiffeId, timeout: Duration) {
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease != 0 {
            let mut c = self.client.clone();
            if let Err(e) = bounded(timeout, c.lease_revoke(lease)).await {
                tracing::warn!("registry: the liveness lease was not revoked: {e}");
            }
        }
    }
}
