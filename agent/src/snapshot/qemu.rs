//! QEMU VMs into and out of snapshots (the format:
//! [`convoy_protocol::snapshot::qemu`]).
//!
//! **Saving** ([`capture`]): QEMU migrates the VM — pre-copy, while the
//! guest runs, with auto-converge — to a unix socket of the agent's in the
//! VM's runtime directory, and the agent writes the stream to a private
//! file beside it. Once QEMU reports the migration completed the guest is
//! stopped and its disks are flushed and quiescent; [`CapturedQemu`]
//! presents the stream file and the raw disk files as the leaves a push
//! seals ([`super::push`]), exactly like a paused sim VM. The caller
//! resumes the guest (`cont`) afterwards if it ran. The stream file is
//! removed when the capture is dropped. The stream is staged on the
//! agent's disk (at most twice the guest's memory and 64 MiB: pre-copy
//! sends again what the guest rewrites; past that the save fails): its
//! length, and so the chunk layout, is known only at its end.
//!
//! **Restoring** ([`open`], then [`restore`]): the data key is unwrapped
//! and the sealed [`QemuImage`] checked against the manifest before
//! anything is reserved; then the leaves are written into a new stream
//! file and new disk files in the image directory (never over an existing
//! file), every chunk and the root are checked, and only then is QEMU
//! launched (`-incoming defer -S`, from the agent's own allow-lists, as
//! for a live migration) and fed the stream. Every failure kills that QEMU
//! and removes every file made for it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_protocol::disk::DiskGeometry;
use convoy_protocol::page::{MemoryGeometry, PageBitmap, PageIndex};
use convoy_protocol::snapshot::manifest::open_state;
use convoy_protocol::snapshot::qemu::disk_name;
use convoy_protocol::snapshot::{check_fresh, DataKey, QemuImage};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sealing::SealingKeys;
use super::{Found, SnapshotError};
use crate::backend::qemu::process::QemuProcess;
use crate::backend::qemu::vm::{QemuConfig, QemuVm};
use crate::backend::{BackendError, DiskFileError, VmBackend};

/// The longest QEMU may take to save or load a VM.
const QEMU_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest QEMU may take to connect to, or accept, the stream socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's `max-bandwidth` for a save: none (1 TiB/s).
const UNLIMITED: u64 = 1 << 40;
const PAGE: usize = 4096;

fn qemu_err(what: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Qemu(what.to_string())
}

/// A QEMU VM saved for a push: QEMU's stream (a file in the VM's runtime
/// directory, removed on drop) and its raw disks, as read-only leaves.
#[derive(Debug)]
pub struct CapturedQemu {
    stream: File,
    stream_path: Staged,
    image: QemuImage,
    memory: MemoryGeometry,
    disks: Vec<(File, PathBuf, DiskGeometry)>,
    state: Vec<u8>,
    /// How long QEMU took to save the VM, and the downtime it reports.
    pub saved: (Duration, Option<u64>),
}

/// A staged stream file, removed when dropped (a capture cancelled
/// mid-way included).
#[derive(Debug)]
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs QMP `command` on `vm`, its error in QEMU's words.
async fn qmp(vm: &QemuVm, command: &str, args: Option<Value>) -> Result<Value, SnapshotError> {
    vm.execute(command, args)
        .await
        .map_err(|e| qemu_err(format!("{command}: {e}")))
}

/// Polls `query-migrate` until QEMU's migration completes (its `downtime`
/// in ms if it says), fails or `deadline` passes.
async fn completed(vm: &QemuVm, deadline: Instant) -> Result<Option<u64>, SnapshotError> {
    loop {
        let q = qmp(vm, "query-migrate", None).await?;
        match q["status"].as_str() {
            Some("completed") => return Ok(q["downtime"].as_u64()),
            Some(s @ ("failed" | "cancelled")) => {
                return Err(qemu_err(format!(
                    "the migration {s}: {}",
                    q["error-desc"].as_str().unwrap_or("QEMU gave no reason")
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(qemu_err(format!(
                    "not done after {} s",
                    QEMU_TIMEOUT.as_secs()
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Saves `vm` (running or paused; `attributes` as the agent lists them)
/// for a push: see the module docs. On failure QEMU's migration is
/// cancelled and the stream file removed; the guest is left as QEMU left
/// it (the caller resumes it if it ran).
pub async fn capture(
    vm: &QemuVm,
    attributes: &convoy_protocol::vm::VmAttributes,
) -> Result<CapturedQemu, SnapshotError> {
    let dir = vm.dir();
    let room = free_bytes(dir)?;
    if room < stream_cap(vm) {
        return Err(qemu_err(format!(
            "saving the VM may take {} bytes, {room} free in {}",
            stream_cap(vm),
            dir.display()
        )));
    }
    let sock = dir.join("snapshot.sock");
    let stream_path = dir.join("snapshot.stream");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| qemu_err(format!("cannot listen on {}: {e}", sock.display())))?;
    let _sock = Staged(sock.clone());
    let file = crate::private::create_truncate(&stream_path)
        .map_err(|e| qemu_err(format!("cannot create {}: {e}", stream_path.display())))?;
    let stream_path = Staged(stream_path);
    let started = Instant::now();
    let (stream_bytes, downtime) = match save(vm, &listener, &sock, file).await {
        Ok(v) => v,
        Err(e) => {
            let _ = vm.execute("migrate_cancel", None).await;
            return Err(e);
        }
    };
    let took = started.elapsed();
    let stream = File::open(&stream_path.0)
        .map_err(|e| qemu_err(format!("cannot reopen {}: {e}", stream_path.0.display())))?;
    let mut definition = vm.definition.clone();
    definition.attributes = attributes.clone();
    let pages = stream_bytes.div_ceil(PAGE as u64).max(1);
    let memory = MemoryGeometry::from_bytes(pages * PAGE as u64)
        .map_err(|e| SnapshotError::Geometry(e.to_string()))?;
    // (Dropped on an error below: the staged file goes with it.)
    let mut c = CapturedQemu {
        stream,
        stream_path,
        image: QemuImage {
            definition,
            stream_bytes,
        },
        memory,
        disks: Vec::new(),
        state: Vec::new(),
        saved: (took, downtime),
    };
    for (i, path) in vm.spec.disks.iter().enumerate() {
        let f = File::open(path)
            .map_err(|e| qemu_err(format!("cannot open disk {}: {e}", path.display())))?;
        let bytes = f
            .metadata()
            .map_err(|e| qemu_err(format!("disk {}: {e}", path.display())))?
            .len();
        if bytes == 0 || bytes % PAGE as u64 != 0 {
            return Err(qemu_err(format!(
                "disk {} is {bytes} bytes, not a whole number of {PAGE}-byte blocks",
                path.display()
            )));
        }
        let name = disk_name(i).ok_or_else(|| qemu_err(format!("disk {i}: no name")))?;
        c.disks.push((
            f,
            path.clone(),
            DiskGeometry {
                name,
                bytes,
                base: None,
            },
        ));
    }
    c.state = c
        .image
        .encode()
        .map_err(|e| qemu_err(format!("the state does not encode: {e}")))?;
    Ok(c)
}

/// The most of QEMU's stream a save stages: twice the guest's memory
/// (pre-copy sends again what the guest rewrites, and auto-converge
/// throttles it until that is little) and 64 MiB for the devices.
fn stream_cap(vm: &QemuVm) -> u64 {
    vm.definition
        .memory_mib
        .saturating_mul(2 << 20)
        .saturating_add(64 << 20)
}

/// QEMU's stream into `file` through `sock`: the bytes written and QEMU's
/// downtime.
async fn save(
    vm: &QemuVm,
    listener: &tokio::net::UnixListener,
    sock: &Path,
    file: File,
) -> Result<(u64, Option<u64>), SnapshotError> {
    // Whatever a migration before left set: one plain stream, throttled
    // if the guest writes faster than it drains.
    qmp(
        vm,
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "multifd", "state": false },
            { "capability": "postcopy-ram", "state": false },
            { "capability": "auto-converge", "state": true },
        ]})),
    )
    .await?;
    qmp(
        vm,
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": UNLIMITED, "downtime-limit": 300 })),
    )
    .await?;
    qmp(
        vm,
        "migrate",
        Some(json!({ "uri": format!("unix:{}", sock.display()) })),
    )
    .await?;
    let (mut conn, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
        .await
        .map_err(|_| qemu_err("QEMU did not connect to save the VM"))?
        .map_err(|e| qemu_err(format!("accept: {e}")))?;
    let deadline = Instant::now() + QEMU_TIMEOUT;
    let mut out = tokio::fs::File::from_std(file);
    let cap = stream_cap(vm);
    let copy = async {
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let k = conn
                .read(&mut buf)
                .await
                .map_err(|e| qemu_err(format!("reading QEMU's stream: {e}")))?;
            if k == 0 {
                break;
            }
            out.write_all(&buf[..k])
                .await
                .map_err(|e| qemu_err(format!("writing QEMU's stream: {e}")))?;
            n += k as u64;
            if n > cap {
                return Err(qemu_err(format!(
                    "QEMU's stream passed {cap} bytes: the guest writes faster than it is saved"
                )));
            }
        }
        out.sync_all()
            .await
            .map_err(|e| qemu_err(format!("writing QEMU's stream: {e}")))?;
        Ok::<u64, SnapshotError>(n)
    };
    let (n, downtime) = tokio::time::timeout(QEMU_TIMEOUT, async {
        tokio::try_join!(copy, completed(vm, deadline))
    })
    .await
    .map_err(|_| qemu_err("saving the VM took too long"))??;
    if n == 0 {
        return Err(qemu_err("QEMU's stream is empty"));
    }
    Ok((n, downtime))
}

impl CapturedQemu {
    /// The state sealed in the manifest.
    pub fn image(&self) -> &QemuImage {
        &self.image
    }

    fn read(&self, leaf: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        buf.fill(0);
        let pages = self.memory.page_count();
        let (file, offset, len, path) = if leaf < pages {
            let off = leaf * PAGE as u64;
            let len = self.image.stream_bytes.saturating_sub(off).min(PAGE as u64);
            (&self.stream, off, len, &self.stream_path.0)
        } else {
            let mut at = pages;
            let mut found = None;
            for (f, p, d) in &self.disks {
                let n = d.bytes / PAGE as u64;
                if leaf < at + n {
                    found = Some((f, p, (leaf - at) * PAGE as u64));
                    break;
                }
                at += n;
            }
            let Some((f, p, off)) = found else {
                return Err(DiskFileError::PastLastDisk(leaf).into());
            };
            (f, off, PAGE as u64, p)
        };
        let len = usize::try_from(len).unwrap_or(PAGE).min(buf.len());
        file.read_exact_at(&mut buf[..len], offset)
            .map_err(|e| DiskFileError::io("cannot read", path, e).into())
    }
}

impl VmBackend for CapturedQemu {
    fn kind(&self) -> &'static str {
        "qemu"
    }
    fn geometry(&self) -> MemoryGeometry {
        self.memory
    }
    fn read_page(&self, page: PageIndex, buf: &mut [u8]) {
        if self.read(page.0, buf).is_err() {
            buf.fill(0);
        }
    }
    fn disks(&self) -> Vec<DiskGeometry> {
        self.disks.iter().map(|(_, _, d)| d.clone()).collect()
    }
    fn read_leaf(&self, leaf: PageIndex, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read(leaf.0, buf)
    }
    // Saved: nothing changes, nothing runs.
    fn start_dirty_log(&self) {}
    fn collect_dirty_log(&self) -> PageBitmap {
        PageBitmap::empty(0)
    }
    fn stop_dirty_log(&self) {}
    fn pause(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), BackendError> {
        Err(BackendError::State("a saved QEMU image does not run"))
    }
    fn device_state(&self) -> Result<Vec<u8>, BackendError> {
        Ok(self.state.clone())
    }
    fn counter(&self) -> u64 {
        0
    }
    fn is_running(&self) -> bool {
        false
    }
    fn dirty_rate(&self) -> u64 {
        0
    }
    fn set_throttle(&self, _percent: u8) {}
    fn destroy(&self) {}
}

/// A QEMU snapshot opened for a restore: fresh, its key unwrapped, its
/// state checked against its manifest. Nothing is reserved yet.
#[derive(Debug)]
pub struct Opened {
    /// The manifest.
    pub found: Found,
    /// The VM's QEMU state.
    pub image: QemuImage,
    key: DataKey,
}

/// Opens `found` for [`restore`]: freshness against `seen`, the data key
/// wrapped for `me`, the sealed state and its agreement with the manifest.
pub fn open(
    found: Found,
    me: &convoy_protocol::names::SpiffeId,
    keys: &SealingKeys,
    seen: Option<(u64, convoy_protocol::digest::Digest)>,
) -> Result<Opened, SnapshotError> {
    check_fresh(found.manifest.generation, &found.digest, seen).map_err(|source| {
        SnapshotError::Stale {
            object: found.object.clone(),
            source,
        }
    })?;
    let (image, key) = unseal(&found, me, keys)?;
    Ok(Opened { found, image, key })
}

/// The state of QEMU snapshot `found`, opened with the data key wrapped
/// for `me` and checked against its manifest.
pub fn image_of(
    found: &Found,
    me: &convoy_protocol::names::SpiffeId,
    keys: &SealingKeys,
) -> Result<QemuImage, SnapshotError> {
    unseal(found, me, keys).map(|(image, _)| image)
}

fn unseal(
    found: &Found,
    me: &convoy_protocol::names::SpiffeId,
    keys: &SealingKeys,
) -> Result<(QemuImage, DataKey), SnapshotError> {
    let m = &found.manifest;
    let key = keys.unwrap(me, &m.snapshot, &m.recipients)?;
    let state = open_state(&key, m)?;
    let image = QemuImage::decode(&state, m).map_err(|source| SnapshotError::QemuImage {
        object: found.object.clone(),
        source: Box::new(source),
    })?;
    Ok((image, key))
}

/// A restored QEMU VM.
#[derive(Debug)]
pub struct Restored {
    /// The VM, running (or paused).
    pub vm: Arc<QemuVm>,
    /// Chunks fetched, and those kept by an earlier pull.
    pub fetched: super::pull::Fetched,
    /// Fetching and checking the chunks.
    pub chunks_took: Duration,
    /// QEMU loading the stream.
    pub load_took: Duration,
}

/// Where a restore writes: the stream file, then each disk's file.
struct Files {
    stream: File,
    pages: u64,
    disks: Vec<(File, std::ops::Range<u64>)>,
}

impl super::pull::Sink for Files {
    fn write_leaf(&self, leaf: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let (f, off) = if leaf < self.pages {
            (&self.stream, leaf * PAGE as u64)
        } else {
            match self.disks.iter().find(|(_, r)| r.contains(&leaf)) {
                Some((f, r)) => (f, (leaf - r.start) * PAGE as u64),
                None => return Err(qemu_err(format!("leaf {leaf} is past the last disk"))),
            }
        };
        f.write_all_at(data, off)
            .map_err(|e| qemu_err(format!("cannot write leaf {leaf}: {e}")))
    }
}

/// Bytes free for unprivileged use in directory `dir`.
fn free_bytes(dir: &Path) -> Result<u64, SnapshotError> {
    crate::private::free_bytes(dir).map_err(|e| qemu_err(format!("{}: {e}", dir.display())))
}

/// Writes, in the VM's runtime directory `dir`, the incoming command line
/// the disks `paths` are made for, before any of them is: an agent killed
/// during the restore finds them at its next start as a destination's
/// residue (`host::reattach`) and removes them. QEMU's launch replaces it
/// with the command line it ran.
fn plan_incoming(dir: &Path, paths: &[PathBuf]) -> Result<(), SnapshotError> {
    use std::io::Write;
    let mut args: Vec<String> = vec!["qemu".into(), "-incoming".into(), "defer".into()];
    for p in paths {
        args.push("-drive".into());
        args.push(format!(
            "file={},format=raw",
            crate::backend::qemu::process::option_value(p)
        ));
    }
    let path = dir.join(crate::backend::qemu::process::LAUNCHED);
    let mut f = crate::private::create_truncate(&path).map_err(qemu_err)?;
    for a in args {
        f.write_all(a.as_bytes()).map_err(qemu_err)?;
        f.write_all(&[0]).map_err(qemu_err)?;
    }
    f.sync_all().map_err(qemu_err)
}

/// What a restore made, removed again if it fails.
#[derive(Default)]
struct Made {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    vm: Option<Arc<QemuVm>>,
}

impl Made {
    async fn undo(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.kill().await;
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Restores `o` with this agent's QEMU configuration `cfg`: disks made in
/// its image directory (at most `disk_limit` bytes in all, and what is
/// free), every chunk and the root checked, then QEMU launched and fed the
/// stream. The guest is left stopped (`-S`): the caller starts it once it
/// has recorded the snapshot and, for a handover, won the claim. The
/// memory must be reserved by the caller.
pub async fn restore(
    store: &super::SnapshotStore,
    o: Opened,
    cfg: &QemuConfig,
    disk_limit: u64,
    partial: Option<Arc<super::partial::Partial>>,
) -> Result<Restored, SnapshotError> {
    let mut made = Made::default();
    let r = restore_into(store, &o, cfg, disk_limit, partial, &mut made).await;
    if r.is_err() {
        made.undo().await;
    }
    r
}

async fn restore_into(
    store: &super::SnapshotStore,
    o: &Opened,
    cfg: &QemuConfig,
    disk_limit: u64,
    partial: Option<Arc<super::partial::Partial>>,
    made: &mut Made,
) -> Result<Restored, SnapshotError> {
    let m = &o.found.manifest;
    let def = &o.image.definition;
    let need = m.disks.iter().fold(0u64, |n, d| n.saturating_add(d.bytes));
    if need > disk_limit {
        return Err(qemu_err(format!(
            "{need} bytes of disks exceeds this agent's limit of {disk_limit}"
        )));
    }
    if need > 0 {
        let free = cfg.free_bytes().map_err(qemu_err)?;
        if need > free {
            return Err(qemu_err(format!(
                "{need} bytes of disks, {free} free in the image directory"
            )));
        }
    }
    let dir = crate::private::join_one(&cfg.runtime, m.vm.as_str()).map_err(qemu_err)?;
    if dir.exists() {
        return Err(qemu_err(format!(
            "{} exists already (the files of another VM of this name?)",
            dir.display()
        )));
    }
    crate::private::create_dir_all(&dir).map_err(qemu_err)?;
    made.dir = Some(dir.clone());
    let stream_room = free_bytes(&dir)?;
    if m.memory.bytes() > stream_room {
        return Err(qemu_err(format!(
            "the stream needs {} bytes, {stream_room} free in {}",
            m.memory.bytes(),
            dir.display()
        )));
    }
    let stream_path = dir.join("snapshot.stream");
    let stream = crate::private::create_new(&stream_path).map_err(qemu_err)?;
    let paths = def
        .disks
        .iter()
        .map(|rel| cfg.new_disk(rel).map_err(qemu_err))
        .collect::<Result<Vec<_>, _>>()?;
    plan_incoming(&dir, &paths)?;
    let ranges = convoy_protocol::disk::leaf_ranges(m.memory, &m.disks);
    let mut disks = Vec::new();
    for ((path, d), range) in paths.into_iter().zip(&m.disks).zip(ranges) {
        let f = crate::private::create_new(&path)
            .map_err(|e| qemu_err(format!("cannot create {}: {e}", path.display())))?;
        made.files.push(path.clone());
        f.set_len(d.bytes)
            .map_err(|e| qemu_err(format!("cannot size {}: {e}", path.display())))?;
        disks.push((f, range));
    }
    let files = Arc::new(Files {
        stream,
        pages: m.memory.page_count(),
        disks,
    });
    let t = Instant::now();
    let (fetched, _root) = super::pull::fetch_chunks(
        store,
        m,
        o.found.layout,
        &o.key,
        Some(files.clone()),
        partial,
    )
    .await?;
    let chunks_took = t.elapsed();
    for (f, _) in &files.disks {
        f.sync_all().map_err(qemu_err)?;
    }

    let mut spec = cfg.resolve(def).map_err(qemu_err)?;
    // Held paused until the whole state is loaded.
    spec.extra_args.push("-S".into());
    let t = Instant::now();
    let process = QemuProcess::launch(&spec, &dir, true)
        .await
        .map_err(|e| qemu_err(format!("cannot start QEMU: {e}")))?;
    let vm = QemuVm::adopt(process, def.clone(), spec);
    made.vm = Some(vm.clone());
    qmp(
        &vm,
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "multifd", "state": false },
            { "capability": "postcopy-ram", "state": false },
        ]})),
    )
    .await?;
    let sock = dir.join("incoming.sock");
    qmp(
        &vm,
        "migrate-incoming",
        Some(json!({ "uri": format!("unix:{}", sock.display()) })),
    )
    .await?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(&sock))
        .await
        .map_err(|_| qemu_err("QEMU does not listen for the stream"))?
        .map_err(|e| qemu_err(format!("cannot connect to {}: {e}", sock.display())))?;
    let feed = async {
        let mut src = tokio::fs::File::open(&stream_path)
            .await
            .map_err(qemu_err)?
            .take(o.image.stream_bytes);
        tokio::io::copy(&mut src, &mut conn)
            .await
            .map_err(|e| qemu_err(format!("feeding QEMU the stream: {e}")))?;
        conn.shutdown()
            .await
            .map_err(|e| qemu_err(format!("feeding QEMU the stream: {e}")))
    };
    let deadline = Instant::now() + QEMU_TIMEOUT;
    tokio::try_join!(feed, completed(&vm, deadline))?;
    let load_took = t.elapsed();
    let _ = std::fs::remove_file(&stream_path);
    // The VM's own now: the caller records, registers and starts it.
    made.vm = None;
    made.files.clear();
    made.dir = None;
    Ok(Restored {
        vm,
        fetched,
        chunks_took,
        load_took,
    })
}
