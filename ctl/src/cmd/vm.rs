//! `convoyctl vm`: simulated and QEMU VMs on an agent.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use convoy_protocol::ctl::{Accel, ContentProfile, QemuVmSpec, SimDiskSpec, SimVmSpec};
use convoy_protocol::names::VmName;
use convoy_protocol::vm::{VmAttributes, RETAIN_LABEL};

use crate::conn::{client, Global};
use crate::render;

/// VM commands.
#[derive(Subcommand, Debug)]
pub enum Vm {
    /// Create and start a VM (simulated, or QEMU with --backend qemu).
    Create(Box<Create>),
    /// List VMs.
    List,
    /// Stop a VM for good and wipe its memory (and its disks).
    Delete {
        /// VM name.
        name: VmName,
    },
    /// Pause a running VM: it keeps its memory and disks, and nothing
    /// writes them until it is resumed (a paused VM does not migrate).
    Pause {
        /// VM name.
        name: VmName,
    },
    /// Resume a paused VM.
    Resume {
        /// VM name.
        name: VmName,
    },
}

/// Initial memory content.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Content {
    /// 25% zero, 40% text-like, 35% random pages.
    Mixed,
    /// Incompressible.
    Random,
    /// All zero.
    Zero,
}

impl From<Content> for ContentProfile {
    fn from(c: Content) -> Self {
        match c {
            Content::Mixed => ContentProfile::Mixed,
            Content::Random => ContentProfile::Random,
            Content::Zero => ContentProfile::Zero,
        }
    }
}

/// `vm create` flags.
#[derive(clap::Args, Debug)]
pub struct Create {
    /// VM name.
    pub name: VmName,
    /// Backend: `sim` (simulated, the default) or `qemu`.
    #[arg(long, default_value = "sim", value_parser = ["sim", "qemu"])]
    pub backend: String,
    /// qemu: the QEMU binary (one the agent allows).
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu_binary: String,
    /// qemu: virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// qemu: kernel, relative to the agent's image directory.
    #[arg(long)]
    pub kernel: Option<String>,
    /// qemu: initial ramdisk, relative to the image directory.
    #[arg(long)]
    pub initrd: Option<String>,
    /// qemu: kernel command line.
    #[arg(long, default_value = "console=ttyS0 quiet panic=-1")]
    pub append: String,
    /// A disk (repeatable). qemu: an image, relative to the image
    /// directory. sim: `NAME=SIZE[,writes=N][,used=PCT][,base=BASE]`, a
    /// sparse raw file in the agent's disk directory that migrates with the
    /// VM, whose workload writes N blocks a second and which starts with
    /// PCT% of its blocks written (default 10; the rest are holes), or as a
    /// copy of base image BASE (of SIZE bytes) from the agent's base image
    /// directory: a destination holding the same base receives only the
    /// blocks that differ from it.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// qemu: adopt the QEMU already running on the agent's host whose QMP
    /// socket is PATH (absolute, on that host) instead of launching one.
    /// It must run an allowed binary and the VM these flags define (memory,
    /// vCPUs, accelerator, exactly these raw disks); its device model must
    /// be the one Convoy launches for the definition, or migrations of it
    /// fail (and it keeps running).
    #[arg(long, value_name = "PATH")]
    pub adopt_qmp: Option<String>,
    /// qemu: accelerator (tcg works everywhere; kvm needs /dev/kvm).
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    pub accel: String,
    /// Guest memory.
    #[arg(long, default_value = "512MiB", value_parser = convoy_agent::units::parse_size)]
    pub memory: u64,
    /// Pages the workload writes per second (0 = idle).
    #[arg(long, default_value_t = 0)]
    pub dirty_rate: u64,
    /// Percent of memory that takes 90% of the writes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub hot_set: u8,
    /// sim: requests per second a service in the guest takes (0 = none):
    /// each touches a page of the hot set, waits while the VM is paused,
    /// and its response time is recorded (`vm ls --json`, `migrate
    /// --plot`).
    #[arg(long, default_value_t = 0)]
    pub service_rps: u64,
    /// Initial content.
    #[arg(long, value_enum, default_value = "mixed")]
    pub content: Content,
    /// Seed for content and workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The tenant that owns the VM (policies compare it with operators'
    /// tenants).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// The VM's security level (0-100; policies compare it with hosts').
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub security_level: u8,
    /// A label KEY=VALUE (repeatable; policies read them as tags).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Let a host this VM leaves keep its last image, encrypted under a
    /// key that travels with the VM, so that coming back sends only the
    /// pages that changed (sets the label `convoy.retain-on-leave=true`;
    /// the host must allow it with `convoy-agent --retain-images`).
    #[arg(long)]
    pub retain_on_leave: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    VmAttributes::parse_label(s).map_err(|e| e.to_string())
}

impl Create {
    fn attributes(&self) -> Result<VmAttributes> {
        let a = VmAttributes {
            tenant: self.tenant.clone(),
            security_level: self.security_level,
            labels: self.labels.iter().cloned().collect(),
        };
        let mut a = a;
        if self.retain_on_leave {
            a.labels.insert(RETAIN_LABEL.to_owned(), "true".to_owned());
        }
        a.validate()?;
        Ok(a)
    }

    /// The wire spec of a QEMU VM.
    pub fn qemu_spec(&self) -> Result<QemuVmSpec> {
        if self.memory % (1 << 20) != 0 {
            anyhow::bail!("--memory must be a whole number of MiB for QEMU");
        }
        if self.service_rps != 0 {
            anyhow::bail!("--service-rps takes the sim backend");
        }
        Ok(QemuVmSpec {
            name: self.name.clone(),
            binary: self.qemu_binary.clone(),
            memory_mib: self.memory >> 20,
            vcpus: self.vcpus,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            disks: self.disks.clone(),
            accel: if self.accel == "kvm" {
                Accel::Kvm
            } else {
                Accel::Tcg
            },
            attributes: self.attributes()?,
        })
    }

    /// The wire spec (attributes checked here too, for a clear error
    /// before anything is sent).
    pub fn spec(&self) -> Result<SimVmSpec> {
        let attributes = self.attributes()?;
        Ok(SimVmSpec {
            name: self.name.clone(),
            memory_bytes: self.memory,
            dirty_pages_per_sec: self.dirty_rate,
            hot_set_pct: self.hot_set,
            content: self.content.into(),
            seed: self.seed,
            attributes,
            disks: self
                .disks
                .iter()
                .map(|d| parse_sim_disk(d))
                .collect::<Result<_>>()?,
            service_requests_per_sec: self.service_rps,
        })
    }
}

/// A sim disk: `NAME=SIZE[,writes=N][,used=PCT][,base=BASE]`.
pub fn parse_sim_disk(s: &str) -> Result<SimDiskSpec> {
    let (name, rest) = s.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("--disk {s:?}: expected NAME=SIZE[,writes=N][,used=PCT][,base=BASE]")
    })?;
    let mut parts = rest.split(',');
    let size = parts.next().unwrap_or_default();
    let mut disk = SimDiskSpec {
        name: name
            .parse()
            .map_err(|e| anyhow::anyhow!("--disk {s:?}: {e}"))?,
        bytes: convoy_agent::units::parse_size(size)
            .map_err(|e| anyhow::anyhow!("--disk {s:?}: {e}"))?,
        writes_per_sec: 0,
        used_pct: 10,
        base: None,
    };
    for p in parts {
        match p.split_once('=') {
            Some(("writes", n)) => {
                disk.writes_per_sec = n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--disk {s:?}: writes={n:?} is not a number"))?;
            }
            Some(("base", n)) => {
                disk.base = Some(
                    n.parse()
                        .map_err(|e| anyhow::anyhow!("--disk {s:?}: base={n:?}: {e}"))?,
                );
            }
            Some(("used", n)) => {
                disk.used_pct =
                    n.parse().ok().filter(|p| *p <= 100).ok_or_else(|| {
                        anyhow::anyhow!("--disk {s:?}: used={n:?} is not 0..=100")
                    })?;
            }
            _ => {
                anyhow::bail!("--disk {s:?}: unknown option {p:?} (writes=N, used=PCT, base=NAME)")
            }
        }
    }
    if disk.base.is_some() && rest.split(',').any(|p| p.starts_with("used=")) {
        anyhow::bail!("--disk {s:?}: a disk cloned from a base has the base's content: no used=");
    }
    if disk.bytes == 0 || disk.bytes % 4096 != 0 {
        anyhow::bail!("--disk {s:?}: the size must be a positive multiple of 4 KiB");
    }
    Ok(disk)
}

async fn set_paused(
    g: &Global,
    cl: &convoy_agent::client::CtlClient,
    name: VmName,
    pause: bool,
) -> Result<()> {
    let info = cl.vm_pause(name.clone(), pause).await?;
    if g.json {
        render::json(&info)?;
    } else {
        println!("{name} is {:?}", info.state);
    }
    Ok(())
}

/// Runs a VM command.
pub async fn run(g: &Global, c: Vm) -> Result<()> {
    let cl = client(g).await?;
    match c {
        Vm::Create(c) => {
            let info = if c.backend == "qemu" {
                match &c.adopt_qmp {
                    Some(sock) => cl.vm_adopt_qemu(c.qemu_spec()?, sock.clone()).await?,
                    None => cl.vm_create_qemu(c.qemu_spec()?).await?,
                }
            } else if c.adopt_qmp.is_some() {
                anyhow::bail!("--adopt-qmp needs --backend qemu");
            } else {
                cl.vm_create(c.spec()?).await?
            };
            if g.json {
                render::json(&info)?;
            } else {
                print!("{}", render::vms(&[info]));
            }
        }
        Vm::List => {
            let v = cl.vm_list().await?;
            if g.json {
                render::json(&v)?;
            } else {
                print!("{}", render::vms(&v));
            }
        }
        Vm::Delete { name } => {
            cl.vm_delete(name.clone()).await?;
            if g.json {
                render::json(&serde_json::json!({ "deleted": name }))?;
            } else {
                println!("deleted {name}");
            }
        }
        Vm::Pause { name } => set_paused(g, &cl, name, true).await?,
        Vm::Resume { name } => set_paused(g, &cl, name, false).await?,
    }
    cl.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_disk_flags_parse_and_bad_ones_say_why() {
        let d = parse_sim_disk("root=64MiB,writes=200,used=30").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.name.as_str(), d.bytes, d.writes_per_sec, d.used_pct),
            ("root", 64 << 20, 200, 30)
        );
        let d = parse_sim_disk("data=1GiB").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((d.bytes, d.writes_per_sec, d.used_pct), (1 << 30, 0, 10));
        assert_eq!(d.base, None);
        let d = parse_sim_disk("root=4GiB,base=debian-12").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.base.as_ref().map(|b| b.as_str()), Some("debian-12"));
        for (bad, why) in [
            ("root=1MiB,base=../etc", "base="),
            ("root=1MiB,base=deb,used=5", "no used="),
            ("root", "expected NAME=SIZE"),
            ("../x=1MiB", "--disk"),
            ("root=lots", "--disk"),
            ("root=4097", "multiple of 4 KiB"),
            ("root=0", "multiple of 4 KiB"),
            ("root=1MiB,writes=-1", "not a number"),
            ("root=1MiB,used=101", "0..=100"),
            ("root=1MiB,speed=3", "unknown option"),
        ] {
            let e = parse_sim_disk(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(why), "{bad}: {e:?}");
        }
    }
}
