//! `convoyctl bench`: one module per experiment, all on agents in this
//! process (the lab of `convoy_agent::lab`).
//! - [`raw`]: migrations of a simulated VM (idle with incompressible,
//!   mixed and zero memory; busy at several dirty rates) side by side with
//!   raw bulk transfers over the same transport (into nothing, into fresh
//!   memory, and digesting every page at both ends), measured in the same
//!   run with the same tuning and TLS, with each side's CPU time per GiB.
//!   The default.
//! - [`engine`] (`--engine`): what the native engine does with simulated
//!   VMs, a module per table.
//! - [`qemu`] (`--backend qemu`): one real guest migrated by QEMU natively
//!   and through Convoy.
//! - [`wan`] (`--wan`): raw QUIC through the lab's impairment relay, by
//!   RTT, loss and congestion controller.
//! - [`snapshot`] (`--snapshot`): snapshots pushed, pulled and copied
//!   through object stores beside plain transfers of the same bytes, as
//!   [`snapshot_rows`]; [`snapshot_plot`] draws them (`--plot`).
//! - [`table`] and [`rss`]: cells, medians and memory readings they share.

// Benchmark figures: f64 means, rates and percentages of measured runs,
// rounded into integers for display.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod engine;
mod proc_cpu;
mod qemu;
mod raw;
mod rss;
mod snapshot;
mod snapshot_plot;
mod snapshot_rows;
mod table;
mod wan;
mod wan_lab;

use anyhow::Result;
use convoy_protocol::model::MigrationMode;

use self::engine::NamedRate;
use crate::cmd::migrate::Tuning as MigrateTuning;
use crate::conn::Global;

/// `bench` flags.
#[derive(clap::Args, Debug)]
pub struct Bench {
    /// sim: migrations of simulated VMs against raw QUIC; qemu: the same
    /// real guest migrated by QEMU natively and through Convoy.
    #[arg(long, default_value = "sim", value_parser = ["sim", "qemu"])]
    pub backend: String,
    /// Guest memory of each VM (default: 1GiB for sim, 256MiB for qemu).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub memory: Option<u64>,
    /// Runs of each row (the median is reported): the default bench's
    /// raw transfers and migrations; qemu: migrations per path; --engine:
    /// migrations per A/B arm, and of one VM alone before the VMs at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: u32,
    /// qemu: MiB of random data the guest holds in memory.
    #[arg(long, default_value_t = 64)]
    pub fill_mib: u32,
    /// Busy dirty rates to measure, pages per second.
    #[arg(long, value_delimiter = ',', default_value = "25000,100000")]
    pub rates: Vec<u64>,
    /// Scenarios to run besides the baseline: random, mixed, zero, busy.
    #[arg(long, value_delimiter = ',', default_value = "random,mixed,zero,busy")]
    pub scenarios: Vec<String>,
    /// Bytes for the raw QUIC baseline (default: the VM size).
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub baseline_bytes: Option<u64>,
    /// sim: instead of the comparison with raw QUIC, the engine tables:
    /// one migration per mode and dirty rate, A/B runs of the pre-copy
    /// techniques, and several VMs migrated at once.
    #[arg(long)]
    pub engine: bool,
    /// --engine: migration modes (precopy, postcopy, hybrid); a mode the
    /// agent refuses is shown as not supported.
    #[arg(long, value_delimiter = ',', default_value = "precopy")]
    pub modes: Vec<MigrationMode>,
    /// --engine: dirty rates as NAME=PAGES_PER_SEC; the A/B runs use the
    /// highest.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle=0,moderate=25000,heavy=100000"
    )]
    pub dirty: Vec<NamedRate>,
    /// --engine: which tables to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "modes,ab,concurrent,reuse",
        value_parser = ["modes", "ab", "concurrent", "reuse"]
    )]
    pub tables: Vec<String>,
    /// --engine: how many VMs to migrate at once, one run per count, after
    /// --runs runs of one such VM alone (the baseline of "× one alone").
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5,10,15",
        value_parser = clap::value_parser!(u32).range(1..=64)
    )]
    pub concurrent: Vec<u32>,
    /// --engine: guest memory of each VM migrated at once.
    #[arg(long, default_value = "117MiB", value_parser = convoy_agent::units::parse_size)]
    pub concurrent_memory: u64,
    /// --engine: dirty rate of each VM migrated at once, pages per second.
    #[arg(long, default_value_t = 500)]
    pub concurrent_rate: u64,
    /// --engine: give each VM of the modes table a disk of this size (a
    /// quarter of it written, the rest holes), moved with its memory.
    #[arg(long, value_parser = convoy_agent::units::parse_size)]
    pub disk: Option<u64>,
    /// --engine: how long the reuse table's VMs run at b before they come
    /// back (milliseconds).
    #[arg(long = "reuse-dwell", default_value_t = 2000)]
    pub reuse_dwell_ms: u64,
    /// --engine: blocks the workload writes to that disk per second.
    #[arg(long, default_value_t = 2000)]
    pub disk_writes: u64,
    /// --engine: draw each migration of the modes and A/B tables over
    /// time into DIR (`engine-N-MODE-RATE.svg` and `.json`, as `migrate
    /// --plot` draws them).
    #[arg(long, value_name = "DIR", requires = "engine")]
    pub timelines: Option<std::path::PathBuf>,
    /// --engine: requests per second a service in each VM takes (0 =
    /// none; `--timelines` draws its throughput and response time). It
    /// dirties pages too, so rows with and without differ.
    #[arg(long, default_value_t = 0, requires = "engine")]
    pub service_rps: u64,
    /// Instead: migrations of an idle VM of random memory (--memory,
    /// 128MiB by default) across the WAN lab of network namespaces, one
    /// per --rtt, --loss and --transports, each beside a raw bulk transfer
    /// over the same transport through the same WAN: how much of a
    /// --link-mbit link they use (needs root). With --controllers, raw
    /// QUIC bulk transfers (64MiB by default) through the UDP relay
    /// instead, one per --rtt, --loss and --congestion.
    #[arg(long)]
    pub wan: bool,
    /// --wan: the raw QUIC table by congestion controller.
    #[arg(long, requires = "wan")]
    pub controllers: bool,
    /// Transports: of the default bench's migrations and raw transfers,
    /// one table part each (quic, tcp; auto is left out there); of
    /// --wan's migrations (quic, tcp, auto).
    #[arg(long, value_delimiter = ',', default_value = "quic,tcp,auto")]
    pub transports: Vec<convoy_agent::transport::Choice>,
    /// The agents' QUIC congestion controller: for the default bench's
    /// migrations and raw transfers, and --wan's migrations.
    #[arg(long, alias = "wan-congestion", default_value_t)]
    pub quic_congestion: convoy_agent::transport::Congestion,
    /// --wan: round-trip times, milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "2,50,100,150")]
    pub rtt: Vec<u64>,
    /// --wan: random loss, percent (both ways).
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,1")]
    pub loss: Vec<f64>,
    /// --wan: mean length of a loss burst, packets (1: each packet lost
    /// alone; more: a Gilbert model with the same long-run loss).
    #[arg(long, default_value_t = 1.0)]
    pub loss_burst: f64,
    /// --wan: what the VM's memory holds: random (incompressible) or
    /// mixed (a quarter zero pages, 40% text-like, the rest random), to
    /// see which encodings adaptive compression picks for the link.
    #[arg(long, default_value = "random", value_parser = ["random", "mixed"])]
    pub wan_content: String,
    /// --wan: the link's rate, Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub link_mbit: u64,
    /// --wan --controllers: congestion controllers (cubic, newreno, bbr,
    /// quinn-bbr, auto).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cubic,newreno,bbr,quinn-bbr,auto"
    )]
    pub congestion: Vec<convoy_agent::transport::Congestion>,
    /// --wan: seconds a transfer may take before its cell says so.
    #[arg(long, default_value_t = 120)]
    pub cell_timeout: u64,
    /// Instead: snapshots of a simulated VM (--memory, 256MiB by
    /// default; mixed and random memory) pushed, pulled and copied through
    /// a file:// directory and, with --snapshot-url or CONVOY_MOTO_SERVER
    /// (moto's S3 server, started here), an S3 bucket, each beside a plain
    /// put, get or copy of the same bytes through the same store; the
    /// median of --runs.
    #[arg(long)]
    pub snapshot: bool,
    /// --snapshot: the cloud store to measure (s3://BUCKET/PREFIX, its
    /// settings from the standard AWS environment) instead of moto; the
    /// bench writes under a prefix of its own there and deletes it.
    #[arg(long, requires = "snapshot")]
    pub snapshot_url: Option<String>,
    /// --snapshot: draw Convoy against the plain transfers as a bar chart
    /// (FILE.svg or FILE.png).
    #[arg(long, requires = "snapshot")]
    pub plot: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tuning: MigrateTuning,
}

/// Runs the benchmark the flags choose.
pub async fn run(g: &Global, b: Bench) -> Result<()> {
    if b.snapshot {
        return snapshot::run(g, b).await;
    }
    if b.wan && b.controllers {
        return wan::run(g, b).await;
    }
    if b.wan {
        return wan_lab::run(g, b).await;
    }
    if b.engine {
        return engine::run(g, b).await;
    }
    if b.backend == "qemu" {
        return qemu::run(g, b).await;
    }
    raw::run(g, b).await
}
