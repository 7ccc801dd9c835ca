//! The relay on sockets: a front socket that clients send to, one back
//! socket per client connected to the target, and per direction one
//! [`Line`] behind a mutex and one task that releases what is due.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::model::{Counters, Impairment, Line};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

/// A relay's two directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Direction {
    /// From the clients to the target.
    ToTarget,
    /// From the target back to the clients.
    ToClient,
}

impl Direction {
    /// Its slot in a pair of [`Way`]s.
    pub(super) fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::ToClient => 1,
        }
    }
}

/// How a [`Relay`] starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    /// Where the front socket listens (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Where datagrams go.
    pub target: SocketAddr,
    /// Seed of both directions' randomness (each direction derives its own,
    /// so one direction's pattern does not depend on the other's traffic).
    pub seed: u64,
    /// Impairments from clients to the target.
    pub to_target: Impairment,
    /// Impairments from the target to the clients.
    pub to_client: Impairment,
    /// Most bytes each direction holds (delayed or queued); beyond it,
    /// datagrams are dropped and counted as queue drops.
    pub max_held_bytes: usize,
}

impl RelayConfig {
    /// A clean link on loopback to `target`, seed 0, 64 MiB per direction
    /// (a 1 Gbit/s link's 500 ms of bytes).
    pub fn new(target: SocketAddr) -> RelayConfig {
        RelayConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            target,
            seed: 0,
            to_target: Impairment::default(),
            to_client: Impairment::default(),
            max_held_bytes: 64 << 20,
        }
    }
}

/// Where a held datagram goes: the client it came from or goes to.
type Held = (SocketAddr, Bytes);

/// One direction: its [`Line`] and the wake-up of the task releasing it
/// (shared with the packet relay).
pub(super) struct Way<P> {
    line: Mutex<Line<P>>,
    wake: Notify,
}

impl<P: Clone> Way<P> {
    /// A direction with `impairment`, its randomness from `seed`.
    fn new(impairment: Impairment, seed: u64, max_held_bytes: usize) -> Way<P> {
        Way {
            line: Mutex::new(Line::new(impairment, seed, max_held_bytes)),
            wake: Notify::new(),
        }
    }

    /// Both directions, indexed by [`Direction::index`], their randomness
    /// from `seed` (each its own stream).
    pub(super) fn pair(
        to_target: Impairment,
        to_client: Impairment,
        seed: u64,
        max_held_bytes: usize,
    ) -> [Way<P>; 2] {
        [
            Way::new(to_target, seed, max_held_bytes),
            Way::new(to_client, seed ^ 0x9e37_79b9_7f4a_7c15, max_held_bytes),
        ]
    }

    pub(super) fn line(&self) -> MutexGuard<'_, Line<P>> {
        // The lock is never held across a panic point that leaves the line
        // inconsistent, so a poisoned one is still usable.
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a datagram of `len` bytes and wakes the release task if it is
    /// due first.
    pub(super) fn push(&self, len: usize, payload: P) {
        let mut line = self.line();
        let before = line.next_release();
        let _ = line.push(Instant::now().into_std(), len, payload);
        if line.next_release() != before {
            self.wake.notify_one();
        }
    }

    /// Moves what is due into `due`; with nothing due, first waits for the
    /// next release or a datagram due sooner (and may then return none).
    pub(super) async fn due(&self, due: &mut Vec<P>) {
        let next = self.pop_due(due);
        if !due.is_empty() {
            return;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(Instant::from_std(at)) => {}
                    () = self.wake.notified() => {}
                }
            }
            None => self.wake.notified().await,
        }
        let _ = self.pop_due(due);
    }

    fn pop_due(&self, due: &mut Vec<P>) -> Option<std::time::Instant> {
        let mut line = self.line();
        let now = Instant::now().into_std();
        while let Some(held) = line.pop_due(now) {
            due.push(held);
        }
        line.next_release()
    }
}

struct Shared {
    ways: [Way<Held>; 2],
    target: SocketAddr,
    front: UdpSocket,
    backs: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    /// The relay's tasks; `None` once it is dropped, so a back socket's
    /// task made during the drop is stopped at once.
    tasks: Mutex<Option<Vec<JoinHandle<()>>>>,
}

impl Shared {
    fn way(&self, d: Direction) -> &Way<Held> {
        &self.ways[d.index()]
    }

    fn backs(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<UdpSocket>>> {
        self.backs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(&self, task: JoinHandle<()>) {
        match &mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(tasks) => tasks.push(task),
            None => task.abort(),
        }
    }
}

/// A userspace UDP impairment relay: datagrams sent to [`Relay::addr`] go
/// to the target, answers come back to their client, each direction
/// through its own [`Line`] (delay, jitter, loss, duplication, rate limit,
/// cut). The impairments can be changed while it runs; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the front socket and starts relaying.
    pub async fn start(config: RelayConfig) -> std::io::Result<Relay> {
        let front = UdpSocket::bind(config.listen).await?;
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            ways: Way::pair(
                config.to_target,
                config.to_client,
                config.seed,
                config.max_held_bytes,
            ),
            target: config.target,
            front,
            backs: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Some(Vec::new())),
        });
        shared.spawn(tokio::spawn(receive_front(shared.clone())));
        shared.spawn(tokio::spawn(release(shared.clone(), Direction::ToTarget)));
        shared.spawn(tokio::spawn(release(shared.clone(), Direction::ToClient)));
        Ok(Relay { addr, shared })
    }

    /// Where to send instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The impairments of one direction.
    pub fn impairment(&self, d: Direction) -> Impairment {
        *self.shared.way(d).line().config()
    }

    /// Changes the impairments of one direction; datagrams in flight keep
    /// their release times, but a cut drops them too.
    pub fn set(&self, d: Direction, impairment: Impairment) {
        self.shared.way(d).line().set(impairment);
    }

    /// Cuts (`true`) or restores both directions, keeping the rest.
    pub fn set_cut(&self, cut: bool) {
        for d in [Direction::ToTarget, Direction::ToClient] {
            let mut line = self.shared.way(d).line();
            let config = Impairment {
                cut,
                ..*line.config()
            };
            line.set(config);
        }
    }

    /// One direction's counters so far.
    pub fn counters(&self, d: Direction) -> Counters {
        self.shared.way(d).line().counters()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let tasks = self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for t in tasks.into_iter().flatten() {
            t.abort();
        }
    }
}

/// Receives from clients; makes a client's back socket on its first
/// datagram.
async fn receive_front(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = match shared.front.recv_from(&mut buf).await {
            Ok(got) => got,
            // An ICMP error for an earlier send to a client that left.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
            Err(_) => break,
        };
        let Some(data) = buf.get(..n).map(Bytes::copy_from_slice) else {
            continue;
        };
        let known = shared.backs().contains_key(&client);
        if !known && back(&shared, client).await.is_err() {
            continue;
        }
        shared
            .way(Direction::ToTarget)
            .push(data.len(), (client, data));
    }
}

/// Makes and registers a back socket for `client`, connected to the target,
/// and starts receiving on it.
async fn back(shared: &Arc<Shared>, client: SocketAddr) -> std::io::Result<()> {
    let local = match shared.target.ip() {
        ip if ip.is_loopback() && ip.is_ipv4() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip if ip.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let socket = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
    socket.connect(shared.target).await?;
    let socket = Arc::new(socket);
    shared.backs().insert(client, socket.clone());
    shared.spawn(tokio::spawn(receive_back(shared.clone(), socket, client)));
    Ok(())
}

/// Receives the target's answers to one client.
async fn receive_back(shared: Arc<Shared>, socket: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                if let Some(data) = buf.get(..n).map(Bytes::copy_from_slice) {
                    shared
                        .way(Direction::ToClient)
                        .push(data.len(), (client, data));
                }
            }
            // The target's port closed for a while (an agent restarting
            // there): keep relaying.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(_) => break,
        }
    }
}

/// Releases one direction's datagrams when due: one task and one timer per
/// direction, whatever the number of datagrams held.
async fn release(shared: Arc<Shared>, d: Direction) {
    let way = shared.way(d);
    let mut due = Vec::new();
    loop {
        way.due(&mut due).await;
        for (client, data) in due.drain(..) {
            // Send errors (a closed port, a full buffer) are the datagram's
            // loss on the wire, as on a real link.
            let _ = match d {
                Direction::ToTarget => {
                    let socket = shared.backs().get(&client).cloned();
                    match socket {
                        Some(s) => s.send(&data).await,
                        None => Ok(0),
                    }
                }
                Direction::ToClient => shared.front.send_to(&data, client).await,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::model::{Loss, Probability};
    use super::*;

    /// A UDP echo server on loopback, and how many datagrams it echoed.
    async fn echo() -> (
        SocketAddr,
        Arc<std::sync::atomic::AtomicU64>,
        JoinHandle<()>,
    ) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                seen2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        (addr, seen, task)
    }

    /// An echo server behind a relay with `impairment` both ways, and a
    /// client connected to the relay.
    async fn through(
        seed: u64,
        impairment: Impairment,
    ) -> (
        Relay,
        UdpSocket,
        Arc<std::sync::atomic::AtomicU64>,
        JoinHandle<()>,
    ) {
        let (target, seen, server) = echo().await;
        let relay = Relay::start(RelayConfig {
            seed,
            to_target: impairment,
            to_client: impairment,
            ..RelayConfig::new(target)
        })
        .await
        .expect("relay");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(relay.addr()).await.expect("connect");
        (relay, client, seen, server)
    }

    /// The most a clean relay carries one way on this machine: 1200-byte
    /// datagrams as fast as one sender can for 3 s, counted at the sink.
    /// Run with `-- --ignored --nocapture relay_throughput`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn relay_throughput() {
        let sink = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let relay = Relay::start(RelayConfig::new(sink.local_addr().expect("addr")))
            .await
            .expect("relay");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(relay.addr()).await.expect("connect");
        let run = Duration::from_secs(3);
        let sender = tokio::spawn(async move {
            let start = std::time::Instant::now();
            let data = [0u8; 1200];
            let mut sent = 0u64;
            while start.elapsed() < run {
                for _ in 0..64 {
                    if client.send(&data).await.is_ok() {
                        sent += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
            sent
        });
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (mut got, mut first, mut last) = (0u64, None, std::time::Instant::now());
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sink.recv(&mut buf)).await
        {
            first.get_or_insert_with(std::time::Instant::now);
            got += n as u64;
            last = std::time::Instant::now();
        }
        let sent = sender.await.expect("sender");
        let secs = first.map_or(1.0, |f| (last - f).as_secs_f64());
        let c = relay.counters(Direction::ToTarget);
        println!(
            "relay: {:.0} Mbit/s delivered ({:.0} kdatagrams/s); sent {sent}, relay read {}, sink got {}",
            got as f64 * 8.0 / secs / 1e6,
            got as f64 / 1200.0 / secs / 1e3,
            c.in_datagrams,
            got / 1200,
        );
    }

    /// 50 ms each way: every round trip takes at least 100 ms, and the
    /// median less than 100 ms + 50 ms of slack (a shared two-core machine).
    #[tokio::test]
    async fn delay_through_sockets() {
        let delay = Impairment {
            delay: Duration::from_millis(50),
            ..Impairment::default()
        };
        let (relay, client, _, server) = through(0, delay).await;
        let mut rtts = Vec::new();
        let mut buf = [0u8; 16];
        for i in 0u8..7 {
            let sent = std::time::Instant::now();
            client.send(&[i]).await.expect("send");
            let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("an answer")
                .expect("recv");
            assert_eq!(buf.get(..n), Some(&[i][..]));
            rtts.push(sent.elapsed());
        }
        rtts.sort();
        assert!(rtts[0] >= Duration::from_millis(100), "{rtts:?}");
        assert!(rtts[3] < Duration::from_millis(150), "{rtts:?}");
        assert_eq!(relay.counters(Direction::ToClient).delivered_datagrams, 7);
        server.abort();
    }

    /// 10% loss each way over 2000 datagrams (seed 1): the echo server sees
    /// 10% ± 3 points fewer than were sent, the client 10% ± 3 fewer than
    /// the server echoed (3 points: over 4 standard deviations), and the
    /// relay's counters agree with both ends.
    #[tokio::test]
    async fn loss_through_sockets() {
        let loss = Impairment {
            loss: Loss::Bernoulli(Probability::new(0.1).expect("p")),
            ..Impairment::default()
        };
        let (relay, client, seen, server) = through(1, loss).await;
        let mut got = 0u64;
        let mut buf = [0u8; 16];
        for i in 0u16..2000 {
            client.send(&i.to_be_bytes()).await.expect("send");
            // Paced so that no socket buffer overflows on the way.
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::ZERO, client.recv(&mut buf)).await
            {
                got += 1;
            }
        }
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
        {
            got += 1;
        }
        let seen = seen.load(std::sync::atomic::Ordering::Relaxed);
        let up = relay.counters(Direction::ToTarget);
        let down = relay.counters(Direction::ToClient);
        let lost_up = 1.0 - seen as f64 / 2000.0;
        let lost_down = 1.0 - got as f64 / seen as f64;
        assert!((0.07..=0.13).contains(&lost_up), "{lost_up} {up:?}");
        assert!((0.07..=0.13).contains(&lost_down), "{lost_down} {down:?}");
        assert_eq!((up.in_datagrams, up.delivered_datagrams), (2000, seen));
        assert_eq!((down.in_datagrams, down.delivered_datagrams), (seen, got));
        server.abort();
    }

    /// A cut drops both ways; the link comes back when restored, and a
    /// target that went away and came back is reached again.
    #[tokio::test]
    async fn cut_and_restart_behind_the_relay() {
        let (target, _, server) = echo().await;
        let relay = Relay::start(RelayConfig::new(target)).await.expect("relay");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(relay.addr()).await.expect("connect");
        let mut buf = [0u8; 16];
        let ask = |b: u8| {
            let client = &client;
            async move {
                client.send(&[b]).await.expect("send");
                let mut buf = [0u8; 16];
                tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf))
                    .await
                    .is_ok()
            }
        };
        assert!(ask(1).await);
        relay.set_cut(true);
        assert!(!ask(2).await);
        assert_eq!(relay.counters(Direction::ToTarget).dropped_cut, 1);
        relay.set_cut(false);
        assert!(ask(3).await);
        // The target's port closes (an agent restarting) and opens again.
        server.abort();
        let _ = server.await;
        assert!(!ask(4).await);
        let socket = UdpSocket::bind(target).await.expect("rebind the target");
        client.send(&[5]).await.expect("send");
        let (_, from) = socket.recv_from(&mut buf).await.expect("relayed again");
        socket.send_to(&[5], from).await.expect("answer");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), client.recv(&mut buf))
                .await
                .is_ok()
        );
    }
}
