//! `convoyctl vm`: simulated VMs on an agent.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use convoy_protocol::ctl::{Accel, ContentProfile, QemuVmSpec, SimVmSpec};
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
    /// Stop a VM for good and wipe its memory.
    Delete {
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
    /// qemu: a disk image, relative to the image directory (repeatable).
    #[arg(long = "disk")]
    pub disks: Vec<String>,
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
        })
    }
}

/// Runs a VM command.
pub async fn run(g: &Global, c: Vm) -> Result<()> {
    let cl = client(g).await?;
    match c {
        Vm::Create(c) => {
            let info = if c.backend == "qemu" {
                cl.vm_create_qemu(c.qemu_spec()?).await?
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
    }
    cl.close().await;
    Ok(())
}
