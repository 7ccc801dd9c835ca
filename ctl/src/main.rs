//! `convoyctl`: the Convoy operator command line. Thin: parses flags, talks
//! to agents over `convoy-ctl/1`, renders progress, tables and JSON. No
//! migration logic lives here.
//!
//! # Layout
//! - `cmd/`: one module per operator command (`pki`, `policy`, `vm`,
//!   `migrate`, `evacuate`, `fleet`/`where`, `ticket`, `abort`, `status`,
//!   `audit`, `snapshot`).
//! - [`demo`](mod@demo): `convoyctl demo`, a whole migration on this machine.
//! - [`bench`](mod@bench): `convoyctl bench`, one module per experiment.
//! - [`conn`]: operator identity and agent addressing shared by commands.
//! - [`render`]: tables, progress bars and JSON output.
//! - [`timeline`]: one migration over time, drawn (`migrate --plot`).
#![forbid(unsafe_code)]

// Every `print!`/`println!` of this crate goes through these (they shadow
// std's by textual scope, so they must come before the modules): a reader
// that closes the pipe early (`convoyctl … | head`) ends the command
// quietly instead of panicking in std's macros.
macro_rules! print {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            $crate::stdout_failed(e);
        }
    }};
}

mod bench;
mod cmd;
mod conn;
mod demo;
mod plot;
mod render;
mod timeline;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Operate Convoy agents: PKI, VMs, live migration, demo and benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    global: conn::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch, verify, read and prove agents' audit logs.
    #[command(subcommand)]
    Audit(cmd::audit::Audit),
    /// Create a CA and issue agent and operator certificates.
    #[command(subcommand)]
    Pki(cmd::pki::Pki),
    /// Create, list, pause, resume and delete VMs on an agent.
    #[command(subcommand)]
    Vm(cmd::vm::Vm),
    /// Live-migrate a VM from the agent (--agent) to another agent.
    Migrate(cmd::migrate::Migrate),
    /// Move every VM off a host (HOST, NAME@HOST:PORT) to the agents
    /// named with --to, a few at a time, placed by free memory; a VM that
    /// cannot move stays running where it is and is reported.
    Evacuate(cmd::evacuate::Evacuate),
    /// The fleet registry (agents started with --registry): every VM you
    /// may see, who owns it, and the agents alive.
    #[command(subcommand)]
    Fleet(cmd::fleet::Fleet),
    /// Which agent runs a VM, from the fleet registry.
    Where(cmd::fleet::Where),
    /// Tickets several parties approve before a migration may run:
    /// request, approve, show (submit with `migrate --ticket FILE`).
    #[command(subcommand)]
    Ticket(cmd::ticket::TicketCmd),
    /// Cancel a VM's outgoing migration on its source agent (--agent).
    Abort(cmd::abort::Abort),
    /// Resolve the migrations an agent (--agent) holds unfinished after a
    /// crash, a restart or a lost link: resume, discard or keep paused,
    /// by the destination's signed answer; says what it decided and why.
    Recover(cmd::recover::Recover),
    /// VMs as encrypted, signed snapshots in object storage: enroll,
    /// push, pull, list, verify, delete.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::Snapshot),
    /// Validate Cedar policies and check requests against them offline.
    #[command(subcommand)]
    Policy(cmd::policy::Policy),
    /// Show an agent's identity, VMs and recent migrations.
    Status,
    /// Run a complete live migration on this machine: throw-away PKI, two
    /// agents on loopback, a busy simulated VM.
    Demo(demo::Demo),
    /// Measure migrations against raw QUIC throughput and print a table;
    /// with --engine, by mode, dirty rate, technique and concurrency.
    Bench(Box<bench::Bench>),
}

/// mimalloc: the engines hand 128 KiB page batches between threads; glibc's
/// per-thread arenas trim and re-fault those pages on every batch (measured:
/// a fifth of all CPU time in `clear_page`), mimalloc keeps them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Standard output failed: a closed pipe ends the command (successfully:
/// the reader had what it wanted); anything else is reported.
fn stdout_failed(e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

fn main() -> std::process::ExitCode {
    // The agents of `demo` and `bench` run in this process.
    convoy_agent::alloc::tune();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes, one line, without a backtrace: an
            // operator needs the reason, not our stack.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Pki(c) => cmd::pki::run(&cli.global, c),
            Command::Audit(c) => cmd::audit::run(&cli.global, c).await,
            Command::Vm(c) => cmd::vm::run(&cli.global, c).await,
            Command::Migrate(c) => cmd::migrate::run(&cli.global, c).await,
            Command::Evacuate(c) => cmd::evacuate::run(&cli.global, c).await,
            Command::Fleet(c) => cmd::fleet::run(&cli.global, c).await,
            Command::Where(c) => cmd::fleet::run_where(&cli.global, c).await,
            Command::Ticket(c) => cmd::ticket::run(&cli.global, c).await,
            Command::Abort(c) => cmd::abort::run(&cli.global, c).await,
            Command::Recover(c) => cmd::recover::run(&cli.global, c).await,
            Command::Policy(c) => cmd::policy::run(&cli.global, c),
            Command::Snapshot(c) => cmd::snapshot::run(&cli.global, c).await,
            Command::Status => cmd::status::run(&cli.global).await,
            Command::Demo(c) => demo::run(&cli.global, c).await,
            Command::Bench(c) => bench::run(&cli.global, *c).await,
        }
    })
}
