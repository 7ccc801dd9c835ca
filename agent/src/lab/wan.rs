//! A WAN between network namespaces: two sites, `a` and `b`, each a
//! namespace of its own, joined through a third, the router, by veth pairs;
//! the packets between the sites go through the router's TUN device and
//! the [`PacketRelay`] (delay, jitter, loss, duplication, cuts), then
//! through `tbf` on the router's egress (the link's rate). A fourth veth
//! joins the router to the namespace of the process that made the WAN,
//! the management network an operator reaches both agents by, which the
//! relay does not impair.
//!
//! ```text
//!  ns a            ns router                              ns b
//!  .1 ──veth── .2 ─┐ rule: from a or b → TUN → relay ┌─ .6 ──veth── .5
//!                  └─────────── .10 ─────────────────┘
//!                                │ veth (management)
//!                        this process's namespace: .9
//! ```
//!
//! Each WAN takes a /28 of 198.18.0.0/16 (benchmarking addresses,
//! RFC 2544) and names its namespaces and devices `cv<k>…`, `k` the first
//! free of 4096 from a start drawn from the process id, so WANs of
//! several tests and processes coexist. Dropping the [`Wan`] deletes its
//! namespaces, and with them every device and route it made. It needs
//! root, `ip` and `tc` (iproute2); [`Wan::drop_udp`] needs `nft`.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::impair::{Direction, Impairment, PacketRelay, Tun};

/// Why a WAN could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WanError {
    /// A command failed (its arguments and what it printed).
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its standard error, or why it could not run.
        output: String,
    },
    /// Every name of the 4096 is taken.
    #[error("no free WAN lab slot (4096 in use)")]
    Full,
    /// A command's output did not hold the counter looked for (its
    /// format changed?): an error, never a zero that looks like a reading.
    #[error("cannot read {what} from `{command}`'s output: {output}")]
    Unreadable {
        /// The counter.
        what: &'static str,
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// A namespace could not be entered, or the TUN device made.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One site of the WAN.
#[derive(Debug, Clone)]
pub struct Site {
    /// Its network namespace (under `/run/netns`).
    pub netns: String,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// The WAN's link: impairments each way and the rate.
#[derive(Debug, Clone, Default)]
pub struct WanConfig {
    /// From a to b.
    pub to_b: Impairment,
    /// From b to a.
    pub to_a: Impairment,
    /// The link's rate each way, bits per second (`tbf`), if limited.
    pub rate_bits: Option<u64>,
    /// Seed of the relay's randomness.
    pub seed: u64,
}

/// Packets the kernel may queue for the relay on its device.
const TUN_QUEUE: &str = "10000";

/// A WAN of namespaces (see the module's documentation).
#[derive(Debug)]
pub struct Wan {
    /// Site a.
    pub a: Site,
    /// Site b.
    pub b: Site,
    /// The prefix of its names.
    tag: String,
    router: String,
    relay: Option<PacketRelay>,
    made: Vec<String>,
}

/// What the link's `tbf` did towards one site so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkCounters {
    /// Bytes put on the link (IP packets).
    pub bytes: u64,
    /// Packets dropped: its queue was full.
    pub dropped: u64,
}

/// Runs `ip`, `tc` or `nft` with `args`.
fn run(program: &str, args: &[&str]) -> Result<String, WanError> {
    let failed = |output: String| WanError::Command {
        command: command_line(program, args),
        output,
    };
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread of its own that has entered the network namespace
/// `netns` (a thread's sockets and devices are made in its namespace).
pub fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&ns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("a thread in a namespace panicked")))
    })
}

/// Moves the calling thread into the network namespace open as `ns`.
pub(super) fn enter(ns: &std::fs::File) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

impl Wan {
    /// Makes the namespaces, links and routes, and starts the relay (on
    /// the calling runtime).
    pub fn start(config: &WanConfig) -> Result<Wan, WanError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = std::process::id().wrapping_mul(97) + NEXT.fetch_add(1, Ordering::Relaxed);
        let mut wan = None;
        for i in 0..4096 {
            let k = start.wrapping_add(i) % 4096;
            let router = format!("cv{k}r");
            match run("ip", &["netns", "add", &router]) {
                Ok(_) => {
                    wan = Some((k, router));
                    break;
                }
                Err(WanError::Command { output, .. }) if output.contains("exists") => continue,
                Err(e) => return Err(e),
            }
        }
        let (k, router) = wan.ok_or(WanError::Full)?;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + k * 16;
        let ip = |i: u32| Ipv4Addr::from(base + i);
        let t = format!("cv{k}");
        let mut wan = Wan {
            a: Site {
                netns: format!("{t}a"),
                addr: ip(1),
            },
            b: Site {
                netns: format!("{t}b"),
                addr: ip(5),
            },
            tag: t.clone(),
            router: router.clone(),
            relay: None,
            made: vec![router.clone()],
        };
        // On failure from here, the drop deletes what was made.
        wan.build(&t, ip, config)?;
        Ok(wan)
    }

    fn build(
        &mut self,
        t: &str,
        ip: impl Fn(u32) -> Ipv4Addr,
        config: &WanConfig,
    ) -> Result<(), WanError> {
        let r = self.router.clone();
        let ipn = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            run("ip", &all).map(|_| ())
        };
        let cidr = |i: u32, len: u8| format!("{}/{len}", ip(i));
        for (site, near, far, gateway) in [(&self.a, 1, 2, 2), (&self.b, 5, 6, 6)] {
            run("ip", &["netns", "add", &site.netns])?;
            self.made.push(site.netns.clone());
            let (dev, peer) = (
                site.netns.clone(),
                format!("{t}r{}", &site.netns[t.len()..]),
            );
            run(
                "ip",
                &["link", "add", &dev, "type", "veth", "peer", "name", &peer],
            )?;
            run("ip", &["link", "set", &dev, "netns", &site.netns])?;
            run("ip", &["link", "set", &peer, "netns", &r])?;
            ipn(&site.netns, &["addr", "add", &cidr(near, 30), "dev", &dev])?;
            ipn(&site.netns, &["link", "set", "lo", "up"])?;
            ipn(&site.netns, &["link", "set", &dev, "up"])?;
            let gw = ip(gateway).to_string();
            ipn(&site.netns, &["route", "add", "default", "via", &gw])?;
            ipn(&r, &["addr", "add", &cidr(far, 30), "dev", &peer])?;
            ipn(&r, &["link", "set", &peer, "up"])?;
            if let Some(bits) = config.rate_bits {
                // The router's egress towards the site: the link's rate,
                // a burst of 4 ms of it (16 KiB at least) and a queue of
                // 50 ms (a router's buffer).
                let rate = format!("{bits}bit");
                let burst = (bits / 8 / 250).max(16 << 10).to_string();
                run(
                    "tc",
                    &[
                        "-n", &r, "qdisc", "add", "dev", &peer, "root", "tbf", "rate", &rate,
                        "burst", &burst, "latency", "50ms",
                    ],
                )?;
            }
        }
        // Management: this namespace's end, and a route to both sites.
        let (m, rm) = (format!("{t}m"), format!("{t}rm"));
        run(
            "ip",
            &["link", "add", &m, "type", "veth", "peer", "name", &rm],
        )?;
        run("ip", &["link", "set", &rm, "netns", &r])?;
        run("ip", &["addr", "add", &cidr(9, 30), "dev", &m])?;
        run("ip", &["link", "set", &m, "up"])?;
        ipn(&r, &["addr", "add", &cidr(10, 30), "dev", &rm])?;
        ipn(&r, &["link", "set", &rm, "up"])?;
        ipn(&r, &["link", "set", "lo", "up"])?;
        let via = ip(10).to_string();
        for site in [cidr(0, 30), cidr(4, 30)] {
            run("ip", &["route", "add", &site, "via", &via])?;
        }
        // The router forwards (its own sysctls: this namespace's are not
        // touched) and takes packets back from the TUN device whatever
        // their source.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let name = tun_name(t);
        let tun = in_netns(&r, || Tun::create(&name))?;
        // The kernel queues packets for the relay on the device, 500 by
        // default: at a gigabit that is 6 ms of packets, and the relay (a
        // task among the lab's others) fell behind it for longer, so the
        // kernel dropped 7% of a 100 ms path's packets before the relay
        // saw them. This queue is not the link's (that is `tbf`, after
        // the relay): it only has to outlast the relay's hiccups.
        ipn(&r, &["link", "set", &name, "txqueuelen", TUN_QUEUE])?;
        ipn(&r, &["link", "set", &name, "up"])?;
        // Site to site goes into the TUN device (table 100); site to
        // management falls through to the main table.
        for (from, to) in [
            (format!("{t}ra"), cidr(4, 30)),
            (format!("{t}rb"), cidr(0, 30)),
        ] {
            ipn(&r, &["route", "add", &to, "dev", &name, "table", "100"])?;
            ipn(&r, &["rule", "add", "iif", &from, "lookup", "100"])?;
        }
        self.relay = Some(PacketRelay::start(
            tun,
            (ip(4), 30),
            config.to_b,
            config.to_a,
            config.seed,
            64 << 20,
        )?);
        Ok(())
    }

    /// The relay between the sites ([`Direction::ToTarget`] is a → b).
    pub fn relay(&self) -> &PacketRelay {
        // Set by `start` before it returns the WAN.
        self.relay
            .as_ref()
            .unwrap_or_else(|| unreachable!("a started WAN has its relay"))
    }

    /// Changes the impairments from a to b and from b to a.
    pub fn set(&self, to_b: Impairment, to_a: Impairment) {
        self.relay().set(Direction::ToTarget, to_b);
        self.relay().set(Direction::ToClient, to_a);
    }

    /// The counters of the link's `tbf` towards site b (`true`) or a
    /// (zero without `rate_bits`: no `tbf` then).
    pub fn link_counters(&self, towards_b: bool) -> Result<LinkCounters, WanError> {
        let dev = format!("{}r{}", self.tag, if towards_b { "b" } else { "a" });
        let args = ["-n", &self.router, "-s", "qdisc", "show", "dev", &dev];
        read_counter("tc", &args, "the tbf counters", |out| {
            tbf_counters(out).unwrap_or_else(|| Some(LinkCounters::default()))
        })
    }

    /// Drops every UDP packet between the sites (nftables in the router:
    /// a firewall that lets only TCP through). Returns the packets dropped
    /// so far on each later call of [`Wan::udp_dropped`].
    pub fn drop_udp(&self) -> Result<(), WanError> {
        let rules = "table inet convoy_wan {\n chain forward {\n  type filter hook forward priority 0;\n  meta l4proto udp counter drop\n }\n}\n";
        let command = format!("ip netns exec {} nft -f -", self.router);
        let failed = |output: String| WanError::Command {
            command: command.clone(),
            output,
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.router, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, rules.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(())
    }

    /// Packets the kernel dropped before the relay read them (its device's
    /// queue full): loss of the lab's making, on neither site's link.
    pub fn relay_drops(&self) -> Result<u64, WanError> {
        let tun = tun_name(&self.tag);
        let args = ["-n", &self.router, "-s", "link", "show", "dev", &tun];
        read_counter("ip", &args, "the TX drops", tx_dropped)
    }

    /// UDP packets dropped by [`Wan::drop_udp`]'s rule so far.
    pub fn udp_dropped(&self) -> Result<u64, WanError> {
        let args = [
            "netns",
            "exec",
            &self.router,
            "nft",
            "list",
            "chain",
            "inet",
            "convoy_wan",
            "forward",
        ];
        read_counter("ip", &args, "the UDP drop counter", counter_packets)
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    format!("{program} {}", args.join(" "))
}

/// Runs `program` and reads `what` from its output; an output `parse`
/// cannot read is an error naming the command, never a zero.
fn read_counter<T>(
    program: &str,
    args: &[&str],
    what: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, WanError> {
    let output = run(program, args)?;
    parse(&output).ok_or_else(|| WanError::Unreadable {
        what,
        command: command_line(program, args),
        output,
    })
}

/// The `tbf` qdisc's counters in `tc -s qdisc show`: `None` without a
/// `tbf`, `Some(None)` when its counters cannot be read.
fn tbf_counters(tc_s_qdisc: &str) -> Option<Option<LinkCounters>> {
    let tbf = tc_s_qdisc.split("qdisc ").find(|q| q.starts_with("tbf"))?;
    let after = |word: &str| {
        let mut words = tbf.split_whitespace();
        words.position(|w| w.trim_start_matches('(') == word)?;
        words.next()?.trim_end_matches(',').parse().ok()
    };
    Some(
        after("Sent")
            .zip(after("dropped"))
            .map(|(bytes, dropped)| LinkCounters { bytes, dropped }),
    )
}

/// The packets of the first `counter` in `nft list chain`.
fn counter_packets(nft_list: &str) -> Option<u64> {
    let mut words = nft_list.split_whitespace();
    words.position(|w| w == "packets")?;
    words.next()?.parse().ok()
}

/// The relay's device in the router of the WAN tagged `tag`.
fn tun_name(tag: &str) -> String {
    format!("{tag}t")
}

/// The `dropped` count under `TX:` in `ip -s link show` (packets the
/// kernel queued for the device's reader and dropped).
fn tx_dropped(ip_s_link: &str) -> Option<u64> {
    let mut lines = ip_s_link.lines();
    let header = lines.find(|l| l.trim_start().starts_with("TX:"))?;
    let column = header
        .split_whitespace()
        .skip(1)
        .position(|w| w == "dropped")?;
    lines.next()?.split_whitespace().nth(column)?.parse().ok()
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.relay = None;
        for ns in self.made.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                tracing::warn!("WAN lab: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{counter_packets, tbf_counters, tx_dropped};

    #[test]
    fn the_links_counters_are_read_from_its_tbf_and_an_unreadable_one_is_not_zero() {
        let out = "qdisc tbf 8001: root refcnt 2 rate 100Mbit burst 125000b lat 50ms \n Sent 70123456 bytes 46789 pkt (dropped 7861, overlimits 9 requeues 0) \n backlog 0b 0p requeues 0\n";
        let c = tbf_counters(out).flatten().map(|c| (c.bytes, c.dropped));
        assert_eq!(c, Some((70_123_456, 7861)));
        // No tbf (no rate set): no counters, which is zero.
        assert!(tbf_counters("qdisc noqueue 0: root refcnt 2 \n Sent 0 bytes 0 pkt\n").is_none());
        // A tbf whose counters moved elsewhere: unreadable, not zero.
        assert!(matches!(
            tbf_counters("qdisc tbf 8001: root rate 100Mbit\n Octets 5\n"),
            Some(None)
        ));
    }

    #[test]
    fn the_udp_drop_counter_is_read_from_the_rule() {
        let out = "table inet convoy_wan {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tmeta l4proto udp counter packets 12 bytes 3456 drop\n\t}\n}\n";
        assert_eq!(counter_packets(out), Some(12));
        assert_eq!(counter_packets("meta l4proto udp drop"), None);
        assert_eq!(counter_packets("counter packets many"), None);
    }

    #[test]
    fn the_relays_drops_are_read_from_the_devices_tx_counters() {
        // `ip -s link show` of the relay's device after a gigabit run.
        let out = "2: cv995t: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1500 qdisc pfifo_fast state UNKNOWN mode DEFAULT group default qlen 500
    link/none 
    RX:  bytes packets errors dropped  missed   mcast           
     538492897  410122      0       5       0       0 
    TX:  bytes packets errors dropped carrier collsns           
     543458019  414130      0   27987       0       0 
";
        assert_eq!(tx_dropped(out), Some(27987));
        assert_eq!(tx_dropped("2: x: <UP>\n    RX: bytes\n 1\n"), None);
        assert_eq!(tx_dropped(""), None);
    }
}
