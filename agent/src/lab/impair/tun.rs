//! The relay for IP packets: a TUN device in the WAN lab's router
//! namespace. Policy routing sends the packets between the two sites into
//! the device; the relay reads each one, passes it through the [`Line`](super::Line) of
//! its direction (chosen by the destination address) and writes it back
//! into the device, where the kernel routes it on to its site. TCP and UDP
//! cross the same impaired path, so both transports meet the same delay,
//! loss and cuts (the UDP relay only carries QUIC).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use rustix::ioctl::{ioctl, opcode, Opcode, Updater};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use super::model::{Counters, Impairment};
use super::relay::{Direction, Way};

/// Largest packet read (a TUN device hands over one packet per read, at
/// most its MTU; the margin covers a device configured larger).
const MAX_PACKET: usize = 65_536;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags in
/// the union that makes the struct 40 bytes long.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const TUNSETIFF: Opcode = opcode::write::<std::ffi::c_int>(b'T', 202);

/// An open TUN device (layer 3, no packet information header,
/// non-blocking), created in the network namespace of the thread that
/// made it.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates the TUN device `name` (at most 15 bytes) in the calling
    /// thread's network namespace. It goes when its last descriptor closes.
    pub fn create(name: &str) -> io::Result<Tun> {
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TUN | IFF_NO_PI,
            pad: [0; 22],
        };
        let bytes = name.as_bytes();
        let Some(slot) = req.name.get_mut(..bytes.len()).filter(|_| bytes.len() < 16) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN device name {name:?} is longer than 15 bytes"),
            ));
        };
        slot.copy_from_slice(bytes);
        let fd = rustix::fs::open(
            "/dev/net/tun",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        // SAFETY: TUNSETIFF takes a pointer to a `struct ifreq`, which
        // `IfReq` lays out (name, flags, padding to 40 bytes); the kernel
        // writes back at most that struct.
        unsafe { ioctl(&fd, Updater::<TUNSETIFF, IfReq>::new(&mut req)) }?;
        Ok(Tun {
            fd,
            name: name.to_owned(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A packet relay on a TUN device; dropping it stops it (and removes the
/// device).
#[derive(Debug)]
pub struct PacketRelay {
    ways: Arc<[Way<Bytes>; 2]>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Way<Bytes> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Way").field("line", &*self.line()).finish()
    }
}

impl PacketRelay {
    /// Relays the packets read from `tun`: those to an address in
    /// `target` (a network and its prefix length) through
    /// [`Direction::ToTarget`], all others through [`Direction::ToClient`]
    /// (non-IPv4 packets are dropped). Each direction holds at most
    /// `max_held_bytes`; `seed` makes the randomness repeatable.
    pub fn start(
        tun: Tun,
        target: (Ipv4Addr, u8),
        to_target: Impairment,
        to_client: Impairment,
        seed: u64,
        max_held_bytes: usize,
    ) -> io::Result<PacketRelay> {
        // SAFETY: an `OwnedFd` stays open, and is the same descriptor,
        // for as long as the `AsyncFd` owns it.
        let fd = Arc::new(unsafe { AsyncFd::register(tun.fd) }.map_err(io::Error::from)?);
        let ways = Arc::new(Way::pair(to_target, to_client, seed, max_held_bytes));
        let mask = u32::MAX
            .checked_shl(32 - u32::from(target.1.min(32)))
            .unwrap_or(0);
        let net = u32::from(target.0) & mask;
        let mut tasks = vec![tokio::spawn(read(fd.clone(), ways.clone(), net, mask))];
        for d in [Direction::ToTarget, Direction::ToClient] {
            tasks.push(tokio::spawn(release(fd.clone(), ways.clone(), d)));
        }
        Ok(PacketRelay { ways, tasks })
    }

    fn way(&self, d: Direction) -> &Way<Bytes> {
        &self.ways[d.index()]
    }

    /// The impairments of one direction.
    pub fn impairment(&self, d: Direction) -> Impairment {
        *self.way(d).line().config()
    }

    /// Changes the impairments of one direction; packets in flight keep
    /// their release times, but a cut drops them too.
    pub fn set(&self, d: Direction, impairment: Impairment) {
        self.way(d).line().set(impairment);
    }

    /// Cuts (`true`) or restores both directions, keeping the rest.
    pub fn set_cut(&self, cut: bool) {
        for d in [Direction::ToTarget, Direction::ToClient] {
            let mut line = self.way(d).line();
            let config = Impairment {
                cut,
                ..*line.config()
            };
            line.set(config);
        }
    }

    /// One direction's counters so far.
    pub fn counters(&self, d: Direction) -> Counters {
        self.way(d).line().counters()
    }
}

impl Drop for PacketRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Reads packets and holds each in its direction's line.
async fn read(fd: Arc<AsyncFd<OwnedFd>>, ways: Arc<[Way<Bytes>; 2]>, net: u32, mask: u32) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let Ok(mut ready) = fd.readable().await else {
            return;
        };
        let n = match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref().as_fd(), &mut buf)?)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        let Some(packet) = buf.get(..n) else { continue };
        // IPv4 only: the version nibble, and the destination at 16..20.
        let Some(dst) = packet
            .get(16..20)
            .filter(|_| packet.first().is_some_and(|b| b >> 4 == 4))
            .and_then(|d| <[u8; 4]>::try_from(d).ok())
        else {
            continue;
        };
        let d = if u32::from_be_bytes(dst) & mask == net {
            Direction::ToTarget
        } else {
            Direction::ToClient
        };
        ways[d.index()].push(n, Bytes::copy_from_slice(packet));
    }
}

/// Writes one direction's packets back into the device when due.
async fn release(fd: Arc<AsyncFd<OwnedFd>>, ways: Arc<[Way<Bytes>; 2]>, d: Direction) {
    let way = &ways[d.index()];
    let mut due = Vec::new();
    loop {
        way.due(&mut due).await;
        for packet in due.drain(..) {
            // A packet the kernel refuses is lost on the wire, as on a
            // real link.
            let _ = rustix::io::write(fd.get_ref().as_fd(), &packet);
        }
    }
}
