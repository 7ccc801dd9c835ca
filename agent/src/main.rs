//! `convoy-agent`: parses flags and calls [`convoy_agent::run`].

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use convoy_agent::backend::qemu::vm::Multifd;
use convoy_agent::config::{CredentialFiles, FederationFiles};
use convoy_agent::trust::pki::Pki;
use convoy_agent::AgentConfig;
use convoy_protocol::names::{AgentName, Role, SpiffeId, TrustDomain};

/// The Convoy agent: serves migrations and operators on one port, QUIC
/// over UDP and TLS over TCP.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This agent's name (its identity is spiffe://DOMAIN/agent/NAME).
    #[arg(long, env = "CONVOY_AGENT_NAME")]
    name: AgentName,
    /// Address to listen on (its UDP port for QUIC, the same TCP port for
    /// TLS over TCP).
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// How to dial peers: quic, tcp, or auto (QUIC raced with TCP after a
    /// short head start; the first to complete its handshake carries the
    /// connection).
    #[arg(long, default_value = "auto")]
    transport: convoy_agent::transport::Choice,
    /// QUIC congestion controller: auto (CUBIC on a path under 1 ms of
    /// RTT, the bounded bbr above), cubic (quinn's default), newreno, bbr
    /// (quinn's BBR bounded to the path's delivery rate) or quinn-bbr
    /// (quinn's as it is).
    #[arg(long, default_value_t)]
    congestion: convoy_agent::transport::Congestion,
    /// A `convoyctl pki` directory: uses agents/NAME.crt, NAME.key and ca.crt.
    #[arg(long, env = "CONVOY_PKI")]
    pki: Option<PathBuf>,
    /// Certificate chain (PEM), instead of --pki.
    #[arg(long, requires_all = ["key", "ca", "trust_domain"])]
    cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA bundle (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Trust domain of the CA bundle.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Certificate revocation list (PEM); with --pki, the PKI's ca.crl.
    #[arg(long)]
    crl: Option<PathBuf>,
    /// A peer agent: NAME=HOST:PORT (repeatable).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(AgentName, SocketAddr)>,
    /// Directory for durable state: the audit log, the ticket replay
    /// cache, the QUIC reset key, disks. Required: an agent without one
    /// would act unaudited.
    #[arg(long, env = "CONVOY_STATE_DIR")]
    state_dir: PathBuf,
    /// Cedar policy: a .cedar file or a directory of them (reloaded when
    /// changed). Without --policy the agent denies every migration, VM
    /// creation, abort and audit read.
    #[arg(long, requires = "inventory", env = "CONVOY_POLICY")]
    policy: Option<PathBuf>,
    /// Inventory for the policy (JSON: operators' tenants and groups,
    /// hosts' zones and security levels).
    #[arg(long, requires = "policy", env = "CONVOY_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Trust another trust domain's CA bundle: DOMAIN=CA.pem[,CRL.pem]
    /// (repeatable), for the identities named with --federated-peer only;
    /// its CRL, when given, is reloaded like ours.
    #[arg(long = "federate", value_parser = parse_federate)]
    federate: Vec<(TrustDomain, PathBuf, Option<PathBuf>)>,
    /// An identity of a federated domain to accept, as a SPIFFE ID
    /// (repeatable; agents and operators).
    #[arg(long = "federated-peer")]
    federated_peers: Vec<SpiffeId>,
    /// A QEMU binary operators may use (repeatable); enables the qemu
    /// backend together with --image-dir.
    #[arg(long = "qemu-binary", requires = "image_dir")]
    qemu_binaries: Vec<PathBuf>,
    /// The only directory QEMU kernels, initrds and disk images may come
    /// from.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// When a QEMU pre-copy migration of more than one stream uses QEMU's
    /// multifd channels: auto (not with a QEMU before 8.1, whose multifd
    /// sender spins on a core while the tunnel pushes back) or always.
    #[arg(long, value_enum, default_value_t = Multifd::Auto)]
    qemu_multifd: Multifd,
    /// Guest memory this agent may hold (e.g. 64GiB).
    #[arg(long, default_value = "64GiB", value_parser = convoy_agent::units::parse_size)]
    capacity: u64,
    /// Keep the last image of at most this many VMs that leave (those
    /// created with --retain-on-leave), encrypted under a key that travels
    /// with the VM, so that a VM coming back sends only its changed pages.
    /// Off (0) by default; memory only.
    #[arg(long, default_value_t = 0)]
    retain_images: usize,
    /// The most memory the retained images may take together (e.g. 8GiB).
    #[arg(long, default_value = "4GiB", value_parser = convoy_agent::units::parse_size)]
    retain_bytes: u64,
    /// Where sim VMs' disk files live, one directory per VM (default:
    /// STATE_DIR/disks).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// The most disk bytes one incoming VM may bring; VMs whose disks do
    /// not fit in the disk directory's free space are refused as well.
    #[arg(long, default_value = "1TiB", value_parser = convoy_agent::units::parse_size)]
    disk_capacity: u64,
    /// Reach snapshot bucket BUCKET with profile PROFILE of the AWS shared
    /// files (`~/.aws/credentials` and `~/.aws/config`, or
    /// `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`): its keys,
    /// region and `endpoint_url`. Repeatable: `s3://BUCKET=PROFILE`. Other
    /// buckets use `AWS_PROFILE` if set (and no keys are in the
    /// environment), else the AWS environment.
    #[arg(long = "snapshot-profile", value_name = "s3://BUCKET=PROFILE")]
    snapshot_profiles: Vec<String>,
    /// Log lines as `text` or `json` (one object per line; a migration's
    /// lines carry its id, VM, peer and role in `span`). `RUST_LOG` sets
    /// the level.
    #[arg(long, default_value = "text", value_name = "FORMAT")]
    log_format: convoy_agent::logging::LogFormat,
    /// Serve Prometheus metrics (plain HTTP, GET on any path) on this
    /// address, e.g. 127.0.0.1:9464. Off by default. The figures name no
    /// VM and no peer.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Only these networks may scrape the metrics (`10.0.0.0/8`,
    /// `192.0.2.7`); repeatable. Without it, anyone who reaches
    /// --metrics-addr may.
    #[arg(long, value_name = "CIDR", requires = "metrics_addr")]
    metrics_allow: Vec<String>,
    /// The fleet registry: etcd endpoints (`http://10.0.0.5:2379`,
    /// repeatable, or comma-separated). With it, a migration commits by
    /// one etcd transaction and VMs are registered where they run
    /// (docs/operations.md#the-fleet-registry). Needs an agent built with
    /// `--features convoy-agent/registry`.
    #[arg(long = "registry", value_name = "URL", value_delimiter = ',')]
    registry: Vec<String>,
    /// The prefix of the registry's keys.
    #[arg(long, default_value = convoy_protocol::registry::DEFAULT_PREFIX, requires = "registry")]
    registry_prefix: String,
    /// Seconds this agent's liveness record outlives its last renewal.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=3600), requires = "registry")]
    registry_lease: u64,
    /// Milliseconds a registry operation (a commit with its retries) may
    /// take before its outcome is unknown (the VM then stays paused).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000), requires = "registry")]
    registry_timeout_ms: u64,
    /// CA of the registry's TLS certificate (https:// endpoints).
    #[arg(long, value_name = "PEM", requires = "registry")]
    registry_ca: Option<PathBuf>,
    /// Client certificate and key for the registry, when etcd asks for one.
    #[arg(long, value_name = "PEM", requires_all = ["registry_ca", "registry_key"])]
    registry_cert: Option<PathBuf>,
    /// The key of --registry-cert.
    #[arg(long, value_name = "PEM", requires = "registry_cert")]
    registry_key: Option<PathBuf>,
    /// Base images sim disks may be cloned from (`vm create --disk
    /// NAME=SIZE,base=BASE`); an incoming disk cloned from a base held
    /// here (same name and content) starts from it, and its unchanged
    /// blocks do not travel (default: STATE_DIR/bases).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// What all migrations of this agent may buffer together (QUIC
    /// windows, delta caches): shared by the migrations in progress, so
    /// the agent's memory does not grow with how many VMs move at once.
    #[arg(long, default_value = "256MiB", value_parser = convoy_agent::units::parse_size)]
    migration_memory: u64,
    /// After a post-copy switch, how long a broken link may stay down
    /// before the migration is in doubt, seconds: the source dials the
    /// destination again, the destination keeps the VM (a vCPU on a
    /// missing page waits) for this long. 0: no recovery.
    #[arg(long, default_value_t = 60)]
    recovery_window: u64,
    /// Seconds of silence after which a peer link counts as broken (QUIC
    /// idle timeout; keep-alives go at a third of it, at most every 5 s).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    link_timeout: u64,
    /// Authenticated connections held at once, from all peers.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Authenticated connections held at once by one identity (operator
    /// or agent). A post-copy migration holds two (its faults' and its
    /// data streams'), so 32 lets 16 run at once from one source.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_peer: u32,
    /// Seconds an operator connection may stay open with no request in
    /// flight.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    operator_idle_timeout: u64,
    /// Seconds a source may send nothing while this agent holds staging
    /// for it (before the VM runs here); then the migration is given up.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    source_silence_timeout: u64,
    /// Most bookkeeping the migrations in progress may hold together,
    /// arriving and leaving (64 bytes per page or disk block); a proposal
    /// or a migrate request past it is refused.
    #[arg(long, default_value = "2GiB", value_parser = convoy_agent::units::parse_size)]
    max_bookkeeping: u64,
    /// DANGEROUS, tests only: stop every migration that reaches POINT
    /// for ever (`paused at POINT` on stderr), so a test can kill the
    /// agent or cut its link there. POINT: a journal record just committed
    /// (source-claimed, destination-staged, source-committed,
    /// destination-handover, destination-started, source-started) or an
    /// engine step (source-round-2, source-stop-copy, destination-ready,
    /// source-postcopy-push, destination-recovering).
    #[arg(long, hide = true, value_name = "POINT")]
    dangerous_pause_at: Option<convoy_agent::pause::PausePoint>,
}

fn parse_federate(s: &str) -> Result<(TrustDomain, PathBuf, Option<PathBuf>), String> {
    let (d, files) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected DOMAIN=CA.pem[,CRL.pem]"))?;
    let (ca, crl) = match files.split_once(',') {
        Some((ca, crl)) => (ca, Some(PathBuf::from(crl))),
        None => (files, None),
    };
    Ok((
        TrustDomain::new(d).map_err(|e| e.to_string())?,
        ca.into(),
        crl,
    ))
}

/// Each federated domain with the identities named for it.
fn federation(args: &Args) -> Result<Vec<FederationFiles>> {
    let mut out = Vec::new();
    for (domain, ca, crl) in &args.federate {
        let peers: Vec<SpiffeId> = args
            .federated_peers
            .iter()
            .filter(|p| p.domain() == domain)
            .cloned()
            .collect();
        if peers.is_empty() {
            bail!("--federate {domain} names no identity: add --federated-peer spiffe://{domain}/agent/NAME");
        }
        out.push(FederationFiles {
            domain: domain.clone(),
            ca: ca.clone(),
            crl: crl.clone(),
            peers,
        });
    }
    if let Some(p) = args
        .federated_peers
        .iter()
        .find(|p| !args.federate.iter().any(|(d, _, _)| d == p.domain()))
    {
        bail!(
            "--federated-peer {p}: its trust domain is not federated (add --federate {}=CA.pem)",
            p.domain()
        );
    }
    Ok(out)
}

fn parse_peer(s: &str) -> Result<(AgentName, SocketAddr), String> {
    let (n, a) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT"))?;
    Ok((
        n.parse().map_err(|e| format!("{e}"))?,
        a.parse().map_err(|e| format!("{a:?}: {e}"))?,
    ))
}

/// mimalloc: the engines hand 128 KiB page batches between threads; glibc's
/// per-thread arenas trim and re-fault those pages on every batch (measured:
/// a fifth of all CPU time in `clear_page`), mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let purge = convoy_agent::alloc::tune();
    // A sim VM's vCPU helper (see `convoy_agent::backend::sim`): not an
    // agent, and no flags of one.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == convoy_agent::backend::sim::HELPER_ARG)
    {
        return convoy_agent::backend::sim::run_helper(argv.get(2..).unwrap_or_default())
            .context("sim vCPU helper");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(agent_main(purge))
}

async fn agent_main(purge: convoy_agent::alloc::PurgeDelay) -> Result<()> {
    let args = Args::parse();
    // `try_init` also forwards the `log` records of quinn and rustls.
    tracing_subscriber::util::SubscriberInitExt::try_init(convoy_agent::logging::subscriber(
        args.log_format,
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        std::io::stdout,
    ))
    .context("installing the log subscriber")?;
    match purge {
        convoy_agent::alloc::PurgeDelay::Set => tracing::debug!(
            ms = convoy_agent::alloc::PURGE_DELAY_MS,
            "the allocator gives freed memory back after its purge delay"
        ),
        convoy_agent::alloc::PurgeDelay::FromEnvironment(ms) => {
            tracing::info!(ms, "the allocator's purge delay is the environment's")
        }
        convoy_agent::alloc::PurgeDelay::Unrecognised(ms) => tracing::warn!(
            ms,
            "the allocator's purge delay is not mimalloc 3's default: left as it is"
        ),
    }
    let (files, domain) = match (&args.pki, &args.cert) {
        (Some(dir), None) => {
            let pki = Pki::open(dir)?;
            let p = pki.paths(Role::Agent, &args.name);
            let files = CredentialFiles {
                cert: p.cert,
                key: p.key,
                ca: pki.ca_cert(),
                crl: Some(args.crl.clone().unwrap_or_else(|| pki.crl_path())),
                federation: federation(&args)?,
            };
            (files, pki.domain().clone())
        }
        (None, Some(cert)) => {
            let (Some(key), Some(ca), Some(td)) = (&args.key, &args.ca, &args.trust_domain) else {
                bail!("--cert needs --key, --ca and --trust-domain");
            };
            let files = CredentialFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                crl: args.crl.clone(),
                federation: federation(&args)?,
            };
            (files, TrustDomain::new(td)?)
        }
        _ => bail!("give either --pki DIR or --cert/--key/--ca/--trust-domain"),
    };
    // A CRL named on the command line must be there; the PKI's own ca.crl
    // appears only once something is revoked.
    if let Some(crl) = args.crl.as_ref().filter(|p| !p.exists()) {
        bail!("CRL file {} does not exist", crl.display());
    }
    let (identity, trust) = files.load(&domain)?;
    if identity.id().name() != &args.name {
        bail!(
            "the certificate names {}, not agent {}",
            identity.id(),
            args.name
        );
    }
    let mut config = AgentConfig::new(args.listen, identity, trust);
    config.registry = registry_config(&args)?;
    config.peers = args.peers.into_iter().collect::<HashMap<_, _>>();
    config.capacity_bytes = args.capacity;
    config.retain_images =
        (args.retain_images > 0).then_some(convoy_agent::host::retain::RetentionLimits {
            max_images: args.retain_images,
            max_bytes: args.retain_bytes,
        });
    config.state_dir = Some(args.state_dir.clone());
    config.disk_dir = args.disk_dir.clone();
    config.base_dir = args.base_dir.clone();
    config.migration_memory = args.migration_memory;
    config.transport = args.transport;
    config.tuning.congestion = args.congestion;
    config.limits.connections = args.max_connections;
    config.limits.per_peer = args.max_connections_per_peer;
    config.limits.idle = std::time::Duration::from_secs(args.operator_idle_timeout);
    config.limits.silence = std::time::Duration::from_secs(args.source_silence_timeout);
    config.max_bookkeeping_bytes = args.max_bookkeeping;
    config.recovery_window = std::time::Duration::from_secs(args.recovery_window);
    config.tuning.idle_timeout = std::time::Duration::from_secs(args.link_timeout);
    config.tuning.keep_alive =
        (config.tuning.idle_timeout / 3).min(std::time::Duration::from_secs(5));
    config.disk_capacity_bytes = args.disk_capacity;
    config.snapshot_profiles =
        convoy_agent::snapshot::profile::StoreProfiles::from_env(&args.snapshot_profiles)?;
    config.metrics = args
        .metrics_addr
        .map(|addr| convoy_agent::metrics::MetricsConfig {
            addr,
            allow: args.metrics_allow.clone(),
        });
    config.files = Some(files);
    // Sim VMs' vCPUs run in helper processes (this binary again), so that
    // they outlive this process and are found again when it restarts.
    config.sim_vcpu = convoy_agent::backend::sim::SimVcpuHost::Process(
        std::env::current_exe().context("finding this executable for sim VM helpers")?,
    );
    if let Some(point) = args.dangerous_pause_at {
        tracing::warn!("DANGEROUS: migrations pause for ever at {point} (tests only)");
        config.dangerous().pause_at(point);
    }
    if let Some(images) = args.image_dir.clone() {
        if args.qemu_binaries.is_empty() {
            bail!("--image-dir needs at least one --qemu-binary");
        }
        // Inside the (private) state directory, never a predictable
        // shared path another local user could have made first.
        let runtime = args.state_dir.join("qemu");
        config.qemu = Some(convoy_agent::backend::qemu::vm::QemuConfig {
            binaries: args.qemu_binaries.clone(),
            images,
            runtime,
            multifd: args.qemu_multifd,
        });
    }
    config.policy = match (args.policy, args.inventory) {
        (Some(policies), Some(inventory)) => Some(convoy_agent::trust::policy::PolicyFiles {
            policies,
            inventory,
        }),
        _ => None,
    };
    let stop = stop_signals()?;
    let agent = convoy_agent::Agent::bind(config).context("starting the agent")?;
    tracing::info!(id = %agent.id(), addr = %agent.local_addr()?, "agent listening");
    agent.run(stop).await;
    Ok(())
}

/// Completes at the first SIGTERM or SIGINT: the agent then stops serving
/// and leaves its VMs running (destroying one is an operator's `vm
/// delete`). A second signal while it winds down ends the process at
/// once; its QEMU guests still keep running. Installed before the agent
/// binds, so that no signal acts as the default (killing the process
/// mid-write) from then on.
fn stop_signals() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{which}: stopping; VMs keep running");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        });
    })
}

/// The registry's configuration from the flags (checked here: an agent
/// that cannot use it does not start).
fn registry_config(args: &Args) -> anyhow::Result<Option<convoy_agent::registry::RegistryConfig>> {
    if args.registry.is_empty() {
        return Ok(None);
    }
    if !cfg!(feature = "registry") {
        bail!(
            "--registry: {}",
            convoy_agent::registry::RegistryError::NotBuilt
        );
    }
    for e in &args.registry {
        let https = e.starts_with("https://");
        if !(https || e.starts_with("http://")) {
            bail!("--registry {e}: an endpoint is http://HOST:PORT or https://HOST:PORT");
        }
        if https != args.registry_ca.is_some() {
            bail!("--registry {e}: https:// endpoints need --registry-ca, http:// ones take none");
        }
    }
    if !args.registry_prefix.starts_with('/') || !args.registry_prefix.ends_with('/') {
        bail!("--registry-prefix must start and end with /");
    }
    let mut c = convoy_agent::registry::RegistryConfig::new(args.registry.clone());
    c.prefix = args.registry_prefix.clone();
    c.lease_ttl = std::time::Duration::from_secs(args.registry_lease);
    c.timeout = std::time::Duration::from_millis(args.registry_timeout_ms);
    c.tls = args
        .registry_ca
        .clone()
        .map(|ca| convoy_agent::registry::RegistryTls {
            ca,
            client: args.registry_cert.clone().zip(args.registry_key.clone()),
        });
    Ok(Some(c))
}
