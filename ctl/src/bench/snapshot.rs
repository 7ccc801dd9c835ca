//! `convoyctl bench --snapshot` (issue 18): a simulated VM pushed to,
//! pulled from and copied between object stores, each operation beside a
//! plain transfer of the same bytes through the same store, measured in
//! the same run.
//!
//! The plain baseline moves the snapshot's distinct stored chunks again —
//! as many objects, of the same sizes, [`PARALLEL`] at a time, through the
//! same [`SnapshotStore`] — with no VM to read and no sealing, compression
//! or hashing: the ratio of the two is what Convoy adds, not what the
//! store costs. Two rows without a store measure that cost alone on this
//! machine's cores: sealing every chunk (read, zstd, AEAD, BLAKE3) and
//! opening them again.
//!
//! Stores: a `file://` directory always; a cloud one as well when
//! `--snapshot-url` names one (its settings from the standard AWS
//! environment) or `CONVOY_MOTO_SERVER` names moto's server, started here
//! on loopback with a bucket of its own. Everything written is deleted
//! after each run.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use convoy_agent::backend::sim::SimVm;
use convoy_agent::backend::VmBackend;
use convoy_agent::s3lab::{S3Server, MOTO_SERVER_VAR};
use convoy_agent::snapshot::push::{PushReport, PushRequest, DEFAULT_LEVEL, PARALLEL};
use convoy_agent::snapshot::store::S3Options;
use convoy_agent::snapshot::{copy, pull, push, SealingKeys, SnapshotStore};
use convoy_agent::trust::identity::{Identity, TrustBundle};
use convoy_agent::trust::pki::Pki;
use convoy_protocol::ctl::{ContentProfile, SimVmSpec};
use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain};
use convoy_protocol::page::PageIndex;
use convoy_protocol::snapshot::{chunk_object, ChunkRef, DataKey, Opener, Sealer};
use futures_util::StreamExt;

use super::snapshot_rows::{Row, Samples, HEADERS};
use super::Bench;
use crate::conn::Global;
use crate::render;

/// The bucket made on moto's server.
const MOTO_BUCKET: &str = "convoy-bench";

/// Where snapshots go: a URL and how to reach it.
struct Site {
    /// Short name in the table (`file`, `s3`).
    label: String,
    /// The URL everything is made under.
    base: String,
    /// In-process S3 settings (moto), or `None` for the environment.
    options: Option<S3Options>,
}

impl Site {
    fn open(&self, sub: &str) -> Result<SnapshotStore> {
        let url = format!("{}/{sub}", self.base.trim_end_matches('/'));
        Ok(match &self.options {
            Some(o) => SnapshotStore::open_with(&url, o)?,
            None => SnapshotStore::open(&url)?,
        })
    }
}

/// The agent the bench acts as: its identity signs, its trust bundle
/// verifies, its sealing keys open.
struct Agent {
    me: SpiffeId,
    identity: Identity,
    trust: TrustBundle,
    keys: Arc<SealingKeys>,
}

impl Agent {
    fn new(dir: &std::path::Path) -> Result<Agent> {
        let pki = Pki::init(dir, TrustDomain::new("bench.internal")?)?;
        let name: AgentName = "bench".parse()?;
        pki.issue(Role::Agent, &name, Duration::from_secs(86400))?;
        let identity = pki.identity(Role::Agent, &name)?;
        Ok(Agent {
            me: identity.id().clone(),
            trust: pki.trust()?,
            identity,
            keys: Arc::new(SealingKeys::ephemeral()?),
        })
    }
}

/// Runs the snapshot benchmark.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    let memory = b.memory.unwrap_or(256 << 20);
    if let Some(path) = &b.plot {
        super::snapshot_plot::format(path)?;
    }
    let dir = tempfile::tempdir()?;
    let agent = Agent::new(&dir.path().join("pki"))?;
    let local = Site {
        label: "file".into(),
        base: format!("file://{}/bucket", dir.path().display()),
        options: None,
    };
    // Kept alive (the server is killed when dropped) for the whole run.
    let mut _moto = None;
    let cloud = match (&b.snapshot_url, std::env::var_os(MOTO_SERVER_VAR)) {
        (Some(url), _) => Some(Site {
            label: url.split("://").next().unwrap_or("cloud").to_owned(),
            base: format!(
                "{}/convoy-bench-{}",
                url.trim_end_matches('/'),
                std::process::id()
            ),
            options: None,
        }),
        (None, Some(program)) if !program.is_empty() => {
            if !g.json {
                eprintln!("starting moto's S3 server ({MOTO_SERVER_VAR}) …");
            }
            let s3 = S3Server::start(std::path::Path::new(&program)).await?;
            s3.create_bucket(MOTO_BUCKET).await?;
            let site = Site {
                label: "s3".into(),
                base: format!("s3://{MOTO_BUCKET}"),
                options: Some(S3Options {
                    config: s3.config(),
                    retry: None,
                }),
            };
            _moto = Some(s3);
            Some(site)
        }
        _ => None,
    };
    let mut samples = Samples::default();
    for (content, profile) in [
        ("mixed", ContentProfile::Mixed),
        ("random", ContentProfile::Random),
    ] {
        let spec = SimVmSpec {
            name: format!("bench-{content}").parse()?,
            memory_bytes: memory,
            dirty_pages_per_sec: 0,
            hot_set_pct: 10,
            content: profile,
            seed: 1,
            attributes: Default::default(),
            disks: Vec::new(),
            service_requests_per_sec: 0,
        };
        let vm: Arc<dyn VmBackend> = SimVm::create(&spec, None, None)?;
        vm.pause()?;
        let ctx = Ctx {
            agent: &agent,
            spec: &spec,
            vm: &vm,
            content,
        };
        let mut lens = Vec::new();
        for run in 0..b.runs {
            if !g.json {
                eprintln!("{content} memory, run {} of {} …", run + 1, b.runs);
            }
            let r = one_run(&ctx, (&local, cloud.as_ref()), run, &mut lens, &mut samples).await;
            if let Err(e) = r {
                vm.destroy();
                return Err(e);
            }
        }
        vm.destroy();
    }
    let rows = samples.rows();
    if let Some(path) = &b.plot {
        super::snapshot_plot::draw(path, &rows)?;
        if !g.json {
            eprintln!("chart written to {}", path.display());
        }
    }
    if g.json {
        return render::json(&rows);
    }
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    print!("{}", render::table(&HEADERS, &cells));
    Ok(())
}

/// What every operation of a run shares: the agent, the VM (paused) and
/// its content's name.
struct Ctx<'a> {
    agent: &'a Agent,
    spec: &'a SimVmSpec,
    vm: &'a Arc<dyn VmBackend>,
    content: &'a str,
}

/// The stores one run uses at one site, emptied after it.
struct RunStores {
    snap: SnapshotStore,
    plain: SnapshotStore,
    snap_copy: SnapshotStore,
    plain_copy: SnapshotStore,
}

impl RunStores {
    fn open(site: &Site, tag: &str) -> Result<RunStores> {
        Ok(RunStores {
            snap: site.open(&format!("{tag}/snap"))?,
            plain: site.open(&format!("{tag}/plain"))?,
            snap_copy: site.open(&format!("{tag}/snap-copy"))?,
            plain_copy: site.open(&format!("{tag}/plain-copy"))?,
        })
    }

    async fn clear(&self) -> Result<()> {
        for s in [&self.snap, &self.plain, &self.snap_copy, &self.plain_copy] {
            clear(s).await?;
        }
        Ok(())
    }
}

/// One run of every operation at `local` and, if given, `cloud`; odd
/// runs time the plain transfer first. `lens` holds the sizes of the
/// snapshot's distinct stored chunks, from the first push.
async fn one_run(
    ctx: &Ctx<'_>,
    (local, cloud): (&Site, Option<&Site>),
    run: u32,
    lens: &mut Vec<u32>,
    samples: &mut Samples,
) -> Result<()> {
    let flip = run % 2 == 1;
    let tag = format!("{}-{run}", ctx.content);
    let mut sites = vec![(local, RunStores::open(local, &tag)?)];
    if let Some(c) = cloud {
        sites.push((c, RunStores::open(c, &tag)?));
    }
    let mut reports = Vec::new();
    for (site, st) in &sites {
        reports.push(site_ops(ctx, site, st, flip, lens, samples).await?);
    }
    let stored: u64 = lens.iter().copied().map(u64::from).sum();
    if let (Some((csite, cst)), Some(r)) = (sites.get(1), reports.get(1)) {
        // Cloud to local: streamed through this host.
        let to = local.open(&format!("{tag}/from-cloud"))?;
        let plain_to = local.open(&format!("{tag}/plain-from-cloud"))?;
        let (c, p) = pair(
            flip,
            copy_once(ctx.agent, &cst.snap, &to, r),
            plain_copy(&cst.plain, &plain_to, lens),
        )
        .await?;
        let op = format!("copy {} -> {} (streamed)", csite.label, local.label);
        samples.add(&op, ctx.content, (r.vm_bytes, stored), c, Some(p));
        clear(&to).await?;
        clear(&plain_to).await?;
    }
    if let Some(r) = reports.first() {
        let (seal, open) = cpu_only(ctx, &sites[0].1.snap, r).await?;
        let bytes = (r.vm_bytes, stored);
        samples.add(
            "seal only (read, zstd, AEAD, BLAKE3)",
            ctx.content,
            bytes,
            seal,
            None,
        );
        samples.add(
            "open only (AEAD, zstd, BLAKE3)",
            ctx.content,
            bytes,
            open,
            None,
        );
    }
    for (_, st) in &sites {
        st.clear().await?;
    }
    Ok(())
}

/// Push, pull and copy within `site`, each beside its plain transfer;
/// the push's report.
async fn site_ops(
    ctx: &Ctx<'_>,
    site: &Site,
    st: &RunStores,
    flip: bool,
    lens: &mut Vec<u32>,
    samples: &mut Samples,
) -> Result<PushReport> {
    let l = &site.label;
    let pushing = async {
        let t = Instant::now();
        let r = push::push(&st.snap, &ctx.agent.trust, push_request(ctx)).await?;
        Ok::<_, anyhow::Error>((r, t.elapsed().as_secs_f64()))
    };
    // The baseline's sizes come from the first push; a later run may
    // put them first.
    let (r, c, p) = if flip && !lens.is_empty() {
        let p = plain_put(&st.plain, lens).await?;
        let (r, c) = pushing.await?;
        (r, c, p)
    } else {
        let (r, c) = pushing.await?;
        if lens.is_empty() {
            *lens = stored_lens(&r);
        }
        (r, c, plain_put(&st.plain, lens).await?)
    };
    let bytes = (r.vm_bytes, lens.iter().copied().map(u64::from).sum());
    samples.add(&format!("push VM -> {l}"), ctx.content, bytes, c, Some(p));
    let (c, p) = pair(
        flip,
        pull_once(ctx.agent, &st.snap, &r),
        plain_get(&st.plain, lens),
    )
    .await?;
    samples.add(&format!("pull {l} -> VM"), ctx.content, bytes, c, Some(p));
    let how = if st.snap_copy.copies_server_side_from(&st.snap) {
        "server-side"
    } else {
        "streamed"
    };
    let (c, p) = pair(
        flip,
        copy_once(ctx.agent, &st.snap, &st.snap_copy, &r),
        plain_copy(&st.plain, &st.plain_copy, lens),
    )
    .await?;
    samples.add(
        &format!("copy {l} -> {l} ({how})"),
        ctx.content,
        bytes,
        c,
        Some(p),
    );
    Ok(r)
}

/// Awaits `convoy` and `plain` in turn (`plain` first if `flip`): their
/// seconds.
async fn pair(
    flip: bool,
    convoy: impl Future<Output = Result<f64>>,
    plain: impl Future<Output = Result<f64>>,
) -> Result<(f64, f64)> {
    if flip {
        let p = plain.await?;
        Ok((convoy.await?, p))
    } else {
        let c = convoy.await?;
        Ok((c, plain.await?))
    }
}

fn push_request(ctx: &Ctx<'_>) -> PushRequest {
    PushRequest {
        name: ctx.spec.name.clone(),
        attributes: ctx.spec.attributes.clone(),
        vm: ctx.vm.clone(),
        me: ctx.agent.me.clone(),
        signer: Arc::new(ctx.agent.identity.clone()),
        keys: ctx.agent.keys.clone(),
        recipients: Vec::new(),
        level: DEFAULT_LEVEL,
        now_unix: convoy_agent::trust::authz::now_unix(),
        ticket: None,
        // Cold: the bench's VM is paused around each push.
        snapshot: None,
        live: false,
        backend: convoy_protocol::snapshot::SnapshotBackend::Sim,
        journal: None,
    }
}

/// Pulls `r`'s snapshot into a paused VM (then destroyed): seconds.
async fn pull_once(agent: &Agent, store: &SnapshotStore, r: &PushReport) -> Result<f64> {
    let t = Instant::now();
    let pulled = pull::pull(
        store,
        pull::PullRequest {
            me: agent.me.clone(),
            keys: &agent.keys,
            verifier: &agent.trust,
            snapshot: Some(r.snapshot),
            seen: None,
            capacity: u64::MAX,
            disk_dir: None,
            paused: true,
            partial: None,
        },
    )
    .await?;
    let took = t.elapsed().as_secs_f64();
    pulled.vm.destroy();
    Ok(took)
}

/// Copies `r`'s snapshot from `from` to `to`: seconds.
async fn copy_once(
    agent: &Agent,
    from: &SnapshotStore,
    to: &SnapshotStore,
    r: &PushReport,
) -> Result<f64> {
    let t = Instant::now();
    copy::copy(from, to, &agent.trust, Some(r.snapshot)).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// The sizes of the distinct chunks a push stored.
fn stored_lens(r: &PushReport) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    r.manifest
        .chunks
        .iter()
        .filter_map(|c| match c {
            ChunkRef::Stored { name, len } => seen.insert(name.0).then_some(*len),
            ChunkRef::Zero => None,
        })
        .collect()
}

/// The plain baseline's object `i`.
fn plain_object(i: usize) -> String {
    format!("chunks/{i:016x}")
}

/// Runs `f` on objects `0..lens.len()`, [`PARALLEL`] at a time: seconds.
async fn timed_each<F, Fut>(lens: &[u32], f: F) -> Result<f64>
where
    F: Fn(String, u32) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let t = Instant::now();
    let mut s = futures_util::stream::iter(lens.iter().enumerate())
        .map(|(i, &len)| f(plain_object(i), len))
        .buffer_unordered(PARALLEL);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Puts objects of `lens` bytes (slices of one incompressible buffer,
/// made before the clock starts): seconds.
async fn plain_put(store: &SnapshotStore, lens: &[u32]) -> Result<f64> {
    let max = lens.iter().copied().max().unwrap_or(0) as usize;
    let payload = Bytes::from(noise(max));
    timed_each(lens, |name, len| {
        let bytes = payload.slice(..len as usize);
        async move {
            anyhow::ensure!(store.put_new(&name, bytes).await?, "{name} exists");
            Ok(())
        }
    })
    .await
}

/// Gets the objects [`plain_put`] made: seconds.
async fn plain_get(store: &SnapshotStore, lens: &[u32]) -> Result<f64> {
    timed_each(lens, |name, len| async move {
        let b = store.get(&name, u64::from(len)).await?;
        anyhow::ensure!(b.len() == len as usize, "{name}: {} bytes", b.len());
        Ok(())
    })
    .await
}

/// Copies the objects [`plain_put`] made from `from` to `to` (by the
/// server within one S3 bucket): seconds.
async fn plain_copy(from: &SnapshotStore, to: &SnapshotStore, lens: &[u32]) -> Result<f64> {
    timed_each(lens, |name, len| async move {
        anyhow::ensure!(
            to.copy_in(from, &name, u64::from(len)).await?,
            "{name} exists"
        );
        Ok(())
    })
    .await
}

/// `len` bytes that do not compress (xorshift; only their size matters).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Deletes every object a run made under `store`.
async fn clear(store: &SnapshotStore) -> Result<()> {
    for dir in ["chunks", "manifests"] {
        let names = store.list(dir).await?;
        let mut s = futures_util::stream::iter(names)
            .map(|n| async move { store.delete(&n).await })
            .buffer_unordered(PARALLEL);
        while let Some(r) = s.next().await {
            r?;
        }
    }
    Ok(())
}

/// Seconds to seal every chunk of the VM (read, zstd, AEAD, BLAKE3) and
/// to open every stored chunk of `r` (fetched from `store` before the
/// clock starts), [`PARALLEL`] at a time on the blocking pool, as a push
/// and a pull do, with no store.
async fn cpu_only(ctx: &Ctx<'_>, store: &SnapshotStore, r: &PushReport) -> Result<(f64, f64)> {
    let layout = r.layout;
    // A throwaway key: only the speed is measured.
    let sealer = Arc::new(Sealer::new(
        &DataKey::from_bytes([7; 32]),
        layout,
        DEFAULT_LEVEL,
    ));
    let t = Instant::now();
    let mut s = futures_util::stream::iter(0..layout.chunks())
        .map(|i| {
            let (vm, sealer) = (ctx.vm.clone(), sealer.clone());
            tokio::task::spawn_blocking(move || -> Result<()> {
                let range = layout.range(i);
                let page = layout.page;
                let leaves = usize::try_from(range.end - range.start)?;
                let mut raw = vec![0u8; leaves * page];
                for (leaf, buf) in range.zip(raw.chunks_exact_mut(page)) {
                    vm.read_leaf(PageIndex(leaf), buf)?;
                }
                sealer.seal(i, &raw)?;
                Ok(())
            })
        })
        .buffer_unordered(PARALLEL);
    while let Some(x) = s.next().await {
        x??;
    }
    let seal = t.elapsed().as_secs_f64();

    let m = &r.manifest;
    let key = ctx
        .agent
        .keys
        .unwrap(&ctx.agent.me, &m.snapshot, &m.recipients)?;
    let opener = Arc::new(Opener::new(m, layout, &key));
    let mut sealed = Vec::new();
    for (i, name, _) in opener.stored() {
        let object = chunk_object(&name);
        let bytes = store.get(&object, layout.max_sealed() as u64).await?;
        sealed.push((i, bytes));
    }
    let t = Instant::now();
    let mut s = futures_util::stream::iter(sealed)
        .map(|(i, bytes)| {
            let opener = opener.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                opener
                    .open(i, &bytes)
                    .with_context(|| format!("chunk {i}"))?;
                Ok(())
            })
        })
        .buffer_unordered(PARALLEL);
    while let Some(x) = s.next().await {
        x??;
    }
    Ok((seal, t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_has_the_length_asked_for_and_does_not_repeat_a_word() {
        let n = noise(1001);
        assert_eq!(n.len(), 1001);
        assert_ne!(n[..8], n[8..16]);
    }
}
