//! `convoyctl ticket`: tickets that several parties approve before a
//! migration may run — `request` writes one unsigned, each party runs
//! `approve`, `show` says what it holds, and `migrate --ticket FILE`
//! submits it (protocol: [`convoy_protocol::ticket::approval`]).
//!
//! The file is a short header line and the postcard ticket, its approvals
//! inside; an approval signs the ticket without them, so parties may
//! approve in any order, and each rewrite of the file is atomic.

use std::io::Write as _;

use convoy_protocol::signed::{ChainVerifier, Signer};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use convoy_agent::trust::authz::{approve_ticket, new_ticket, now_unix};
use convoy_protocol::names::VmName;
use convoy_protocol::ticket::approval::{admissible, request_digest, ApprovalRole, Approver};
use convoy_protocol::ticket::{Ticket, MAX_TICKET_BODY};

use super::migrate::{destination, subject, Tuning};
use crate::conn::{operator, session, Global};

/// What a ticket file starts with.
const MAGIC: &[u8] = b"convoy ticket request v1\n";

/// `ticket` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TicketCmd {
    /// Write an unsigned ticket for moving VM (on --agent) --to AGENT
    /// that the --approver parties must approve before `migrate --ticket
    /// FILE` submits it.
    Request(Request),
    /// Approve a requested ticket as --operator (in --role, if given):
    /// adds the signed approval to FILE.
    Approve {
        /// The ticket file.
        file: PathBuf,
        /// The role approved in: tenant (an operator of the VM's tenant),
        /// donor (of the source's trust domain) or recipient (of the
        /// destination's). None: as the named operator.
        #[arg(long)]
        role: Option<ApprovalRole>,
        /// The ticket's request digest, as `ticket show` prints it (and
        /// `ticket request` did): what you checked is what you sign; a
        /// file changed since is refused.
        #[arg(long, value_name = "HEX")]
        digest: String,
    },
    /// Show what a ticket file authorizes, who must approve it, and who
    /// did (signatures are checked by the agents, offline).
    Show {
        /// The ticket file.
        file: PathBuf,
    },
}

/// `ticket request` flags.
#[derive(clap::Args, Debug)]
pub struct Request {
    /// The VM to move (running on --agent).
    pub vm: VmName,
    /// Destination agent: NAME, or a federated agent's SPIFFE ID.
    #[arg(long)]
    pub to: String,
    /// Who must approve: tenant, donor, recipient, or an operator's
    /// SPIFFE ID (repeatable; each needs an approval by its own key).
    #[arg(long = "approver", required = true)]
    pub approvers: Vec<Approver>,
    /// Where to write the ticket (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Validity of the ticket from now, seconds: the time the parties
    /// have to approve and the migration to start.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ticket_lifetime: u64,
    /// Keep the VM paused at the destination once it has arrived.
    #[arg(long)]
    pub start_paused: bool,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// Runs a `ticket` command.
pub async fn run(g: &Global, c: TicketCmd) -> Result<()> {
    match c {
        TicketCmd::Request(r) => request(g, r).await,
        TicketCmd::Approve { file, role, digest } => approve(g, &file, role, &digest),
        TicketCmd::Show { file } => {
            let t = read(&file)?;
            if g.json {
                crate::render::json(&describe(&t)?)?;
            } else {
                print!("{}", text(&t)?);
            }
            Ok(())
        }
    }
}

async fn request(g: &Global, r: Request) -> Result<()> {
    if r.approvers.len() > convoy_protocol::ticket::approval::MAX_APPROVERS {
        bail!(
            "{} approvers, more than {}",
            r.approvers.len(),
            convoy_protocol::ticket::approval::MAX_APPROVERS
        );
    }
    for (i, a) in r.approvers.iter().enumerate() {
        if matches!(a, Approver::Operator(_)) && r.approvers[..i].contains(a) {
            bail!("--approver {a} given twice: one operator approves once");
        }
    }
    let s = session(g).await?;
    let (dest, _) = destination(&r.to, &s.domain)?;
    let mut plan = r.tuning.options();
    plan.start_paused = r.start_paused;
    let t = new_ticket(
        &r.vm,
        subject(&s, &r.vm).await?,
        s.agent.clone(),
        dest,
        &plan,
        Duration::from_secs(r.ticket_lifetime),
        r.approvers,
    );
    s.client.close().await;
    write(&r.out, &t, true)?;
    if g.json {
        crate::render::json(&describe(&t)?)?;
    } else {
        print!("{}", text(&t)?);
        println!("written to {}", r.out.display());
    }
    Ok(())
}

fn approve(g: &Global, file: &Path, role: Option<ApprovalRole>, digest: &str) -> Result<()> {
    let (pki, me) = operator(g)?;
    let who = me.id().clone();
    // Read, approved and written back under a lock: parties approving at
    // once each add theirs.
    let mut locked = lock(file)?;
    let mut t = decode(file, &mut locked)?;
    // What you saw is what you sign: the digest `ticket show` printed.
    let request = request_digest(&t)?.to_hex();
    if !digest.eq_ignore_ascii_case(&request) {
        bail!(
            "{} is ticket {} (digest {request}), not the digest you approve ({digest}): \
             run `convoyctl ticket show {}` and check what it moves",
            file.display(),
            t.id,
            file.display()
        );
    }
    if t.expires_at <= now_unix() {
        bail!("the ticket expired at {}: request a new one", t.expires_at);
    }
    // What the agents will refuse, refused here first: a second approval
    // by this operator or by this key, a role not held, an approver the
    // ticket does not name.
    let trust = pki.trust()?;
    let key_of = |leaf: &[u8]| ChainVerifier::public_key(&trust, leaf).ok();
    let mine = Signer::chain(&me).first().and_then(|l| key_of(l));
    let named = who.to_string();
    for (a, (by, _)) in t.approvals.iter().zip(approvals(&t)) {
        let key = a.chain.first().and_then(|l| key_of(l));
        if by == named || (key.is_some() && key == mine) {
            bail!("{who} (or its key) already approved this ticket, as {by}");
        }
    }
    admissible(&t, &who, role).map_err(|e| anyhow!("{e}"))?;
    let approval = approve_ticket(&me, &t, role)?;
    t.approvals.push(approval);
    write(file, &t, false)?;
    drop(locked);
    let as_role = role.map(|r| format!(" as {r}")).unwrap_or_default();
    if g.json {
        crate::render::json(&describe(&t)?)?;
    } else {
        print!("{}", text(&t)?);
        println!("approved by {who}{as_role}");
    }
    Ok(())
}

/// Reads a ticket file, bounded and checked.
pub fn read(file: &Path) -> Result<Ticket> {
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    decode(file, &mut f)
}

/// `file`, opened and locked (exclusively, until dropped): the lock is on
/// the file the path names when it is taken (a rename by another approver
/// in between is noticed and the lock taken again).
fn lock(file: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", file.display()))?;
        let (held, named) = (f.metadata()?, std::fs::metadata(file)?);
        if (held.dev(), held.ino()) == (named.dev(), named.ino()) {
            return Ok(f);
        }
    }
}

/// Decodes the ticket `f` (the file `file`) holds, bounded and checked.
fn decode(file: &Path, f: &mut std::fs::File) -> Result<Ticket> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    let max = MAGIC.len() + MAX_TICKET_BODY;
    f.take(u64::try_from(max + 1).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", file.display()))?;
    if bytes.len() > max {
        bail!(
            "{}: larger than a ticket may be ({max} bytes)",
            file.display()
        );
    }
    let Some(body) = bytes.strip_prefix(MAGIC) else {
        bail!(
            "{}: not a ticket file (it does not start with {:?})",
            file.display(),
            String::from_utf8_lossy(MAGIC).trim_end()
        );
    };
    let (t, rest): (Ticket, _) = postcard::take_from_bytes(body)
        .map_err(|e| anyhow!("{}: not a valid ticket: {e}", file.display()))?;
    if !rest.is_empty() {
        bail!("{}: {} bytes after the ticket", file.display(), rest.len());
    }
    Ok(t)
}

/// Writes a ticket file whole or not at all: a new one only when `create`
/// (never over anything there), else replacing it. The bytes go to a
/// fresh temporary file beside it (removed if anything fails), are
/// fsynced, renamed into place, and the directory is fsynced.
fn write(file: &Path, t: &Ticket, create: bool) -> Result<()> {
    let body = postcard::to_stdvec(t)?;
    if body.len() > MAX_TICKET_BODY {
        bail!(
            "the ticket would be {} bytes, more than {MAX_TICKET_BODY}",
            body.len()
        );
    }
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing beside {}", file.display()))?;
    tmp.write_all(MAGIC)?;
    tmp.write_all(&body)?;
    tmp.as_file().sync_all()?;
    let placed = if create {
        tmp.persist_noclobber(file).map(drop)
    } else {
        tmp.persist(file).map(drop)
    };
    placed.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow!("{} exists: not overwritten", file.display()),
        _ => anyhow!("writing {}: {}", file.display(), e.error),
    })?;
    convoy_agent::private::sync_dir_of(file)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// The approvals as (who, role) read from their envelopes, unverified.
fn approvals(t: &Ticket) -> Vec<(String, String)> {
    t.approvals
        .iter()
        .map(|a| {
            let who = a
                .chain
                .first()
                .and_then(|leaf| {
                    convoy_agent::trust::identity::spiffe_id_of(&leaf.as_slice().into()).ok()
                })
                .map_or_else(|| "(unreadable certificate)".into(), |id| id.to_string());
            let role = postcard::from_bytes::<convoy_protocol::ticket::approval::Approval>(&a.body)
                .ok()
                .and_then(|a| a.role)
                .map_or_else(|| "-".into(), |r| r.to_string());
            (who, role)
        })
        .collect()
}

fn describe(t: &Ticket) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "migration": t.id.to_string(),
        "vm": t.vm.as_str(),
        "source": t.source.to_string(),
        "destination": t.destination.to_string(),
        "mode": t.plan.mode.to_string(),
        "issued_at": t.issued_at,
        "expires_at": t.expires_at,
        "request_digest": request_digest(t)?.to_hex(),
        "approvers": t.approvers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "approvals": approvals(t)
            .into_iter()
            .map(|(who, role)| serde_json::json!({ "operator": who, "role": role }))
            .collect::<Vec<_>>(),
    }))
}

fn text(t: &Ticket) -> Result<String> {
    let mut s = format!(
        "ticket {}: move {} from {} to {} ({}), valid {}..{}\ndigest approved: {}\nmust approve: {}\n",
        t.id,
        t.vm,
        t.source,
        t.destination,
        t.plan.mode,
        t.issued_at,
        t.expires_at,
        request_digest(t)?.to_hex(),
        t.approvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (who, role) in approvals(t) {
        s.push_str(&format!("approved by {who} (role {role})\n"));
    }
    Ok(s)
}
