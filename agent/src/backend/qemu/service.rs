//! The test guest's request/response service, reached from outside the
//! way a client of a real service would: a steady stream of requests
//! through the guest's second serial port ([`super::process::SERVICE_SOCKET`]
//! in each host's runtime directory), answered by the guest's vCPU only
//! while the VM runs.
//!
//! The guest answers the line `q<id>` with `ok q<id>`. A [`ServiceClient`]
//! follows the VM through a migration by talking to every host it may run
//! on at once: it connects to each socket as soon as it exists (the
//! destination's QEMU creates its own when it is launched) and takes the
//! first answer to each request. A host that has answered gets every
//! request; one that has not yet (an incoming QEMU, whose guest does not
//! run) gets one at a time, the oldest unanswered, again each second — so
//! it does not pile up a backlog it would answer first once it runs. The
//! source answers until it pauses; what it held in its serial port
//! travels in the device state and is answered at the destination. Bytes
//! a host had not yet handed to the guest are lost with it (or overwritten
//! when the destination loads the device state), so a host that answers
//! for the first time gets every request still unanswered again, and
//! requests unanswered for a second are sent again each second. Duplicate
//! answers are ignored. A request's response time runs from its first
//! sending to its first answer, so a pause or a post-copy fault shows as
//! it would to a client; requests unanswered after
//! [`SERVICE_TIMEOUT_MS`] are dropped.
//!
//! The statistics are the same [`ServiceStats`] a sim VM's service keeps,
//! so timelines draw both alike.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use convoy_protocol::ctl::service::{bucket, ServiceStats, BUCKETS, SERVICE_TIMEOUT_MS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// The most requests per second a client sends (the test guest serves a
/// few hundred under TCG).
pub const MAX_REQUESTS_PER_SEC: u32 = 1000;

/// How often a host not connected is tried again.
const CONNECT_EVERY: Duration = Duration::from_millis(20);

/// Requests unanswered this long are sent again (and again after as
/// long).
const RESEND_AFTER: Duration = Duration::from_secs(1);

/// The longest answer line taken; longer ones are not the guest's.
const MAX_LINE: usize = 64;

/// Lines queued for one host; more are dropped (and sent again later).
const QUEUE: usize = 4096;

/// What a client saw, at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service's statistics.
    pub stats: ServiceStats,
    /// Requests each socket answered first, in the order given.
    pub answered_by: Vec<u64>,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    first_sent: Instant,
    last_sent: Instant,
}

/// The client's books, shared with [`ServiceClient::stats`].
#[derive(Debug)]
struct Book {
    rate: u32,
    outstanding: BTreeMap<u64, Outstanding>,
    served: u64,
    response_us_sum: u64,
    dropped: u64,
    histogram: Vec<u64>,
    answered_by: Vec<u64>,
}

impl Book {
    fn stats(&self, now: Instant) -> ServiceStats {
        let oldest = self
            .outstanding
            .values()
            .map(|o| now.saturating_duration_since(o.first_sent))
            .max()
            .unwrap_or_default();
        ServiceStats {
            requests_per_sec: u64::from(self.rate),
            served: self.served,
            response_us_sum: self.response_us_sum,
            dropped: self.dropped,
            waiting: self.outstanding.len() as u64,
            oldest_waiting_us: micros(oldest),
            histogram: self.histogram.clone(),
        }
    }

    /// An answer to `id` from socket `from`: true if it was the first.
    fn answer(&mut self, id: u64, from: usize, now: Instant) -> bool {
        let Some(o) = self.outstanding.remove(&id) else {
            return false;
        };
        let us = micros(now.saturating_duration_since(o.first_sent));
        self.served = self.served.saturating_add(1);
        self.response_us_sum = self.response_us_sum.saturating_add(us);
        if let Some(h) = self.histogram.get_mut(bucket(us)) {
            *h = h.saturating_add(1);
        }
        if let Some(n) = self.answered_by.get_mut(from) {
            *n += 1;
        }
        true
    }

    /// Drops what waited past the timeout.
    fn expire(&mut self, now: Instant) {
        let timeout = Duration::from_millis(SERVICE_TIMEOUT_MS);
        let before = self.outstanding.len();
        self.outstanding
            .retain(|_, o| now.saturating_duration_since(o.first_sent) < timeout);
        self.dropped = self
            .dropped
            .saturating_add((before - self.outstanding.len()) as u64);
    }
}

fn micros(d: Duration) -> u64 {
    convoy_protocol::units::micros(d)
}

fn lock(b: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
    b.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection to one host's service socket.
struct Conn {
    /// Which connection this is (answers of an older one are told apart).
    generation: u64,
    lines: mpsc::Sender<String>,
    /// Whether this host answered anything yet.
    answered: bool,
    /// When a host that has not answered was last sent a request.
    probed_at: Option<Instant>,
}

impl Conn {
    /// Queues request `id`; a full queue drops it (it is sent again).
    fn send(&self, id: u64) {
        let _ = self.lines.try_send(format!("q{id}\n"));
    }

    /// A host that has not answered yet: the oldest request owed, if
    /// none went to it within [`RESEND_AFTER`].
    fn probe(&mut self, book: &Book, now: Instant) {
        if self.answered
            || self
                .probed_at
                .is_some_and(|t| now.saturating_duration_since(t) < RESEND_AFTER)
        {
            return;
        }
        if let Some(&id) = book.outstanding.keys().next() {
            self.send(id);
            self.probed_at = Some(now);
        }
    }
}

/// What a connection's reader reports: an answered id, or its end.
struct Heard {
    socket: usize,
    generation: u64,
    id: Option<u64>,
}

/// A client of the test guest's service on every host it may run on.
#[derive(Debug)]
pub struct ServiceClient {
    book: Arc<Mutex<Book>>,
    stop: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceClient {
    /// Starts sending `requests_per_sec` requests (1 to
    /// [`MAX_REQUESTS_PER_SEC`]; others are brought into that range) to
    /// the guest behind whichever of `sockets` exist.
    pub fn start(sockets: Vec<PathBuf>, requests_per_sec: u32) -> ServiceClient {
        let rate = requests_per_sec.clamp(1, MAX_REQUESTS_PER_SEC);
        let book = Arc::new(Mutex::new(Book {
            rate,
            outstanding: BTreeMap::new(),
            served: 0,
            response_us_sum: 0,
            dropped: 0,
            histogram: vec![0; BUCKETS],
            answered_by: vec![0; sockets.len()],
        }));
        let (stop, stopping) = watch::channel(None);
        let task = tokio::spawn(run(sockets, rate, book.clone(), stopping));
        ServiceClient { book, stop, task }
    }

    /// The statistics so far.
    pub fn stats(&self) -> ServiceStats {
        lock(&self.book).stats(Instant::now())
    }

    /// Stops sending new requests, waits up to `drain` for the answers
    /// still owed, and returns what was seen (what is still unanswered
    /// counts as waiting).
    pub async fn finish(self, drain: Duration) -> ServiceRecord {
        let _ = self.stop.send(Some(Instant::now() + drain));
        let _ = self.task.await;
        let b = lock(&self.book);
        ServiceRecord {
            stats: b.stats(Instant::now()),
            answered_by: b.answered_by.clone(),
        }
    }
}

/// The client's loop: requests on the clock, connections as hosts
/// appear, answers as they come.
async fn run(
    sockets: Vec<PathBuf>,
    rate: u32,
    book: Arc<Mutex<Book>>,
    mut stopping: watch::Receiver<Option<Instant>>,
) {
    let mut conns: Vec<Option<Conn>> = sockets.iter().map(|_| None).collect();
    let (heard_tx, mut heard) = mpsc::unbounded_channel::<Heard>();
    let mut generation = 0u64;
    let mut next_id = 0u64;
    let mut requests = tokio::time::interval(Duration::from_nanos(1_000_000_000 / u64::from(rate)));
    let mut upkeep = tokio::time::interval(CONNECT_EVERY);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drain_until: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = requests.tick(), if drain_until.is_none() => {
                let id = next_id;
                next_id += 1;
                let now = Instant::now();
                let mut b = lock(&book);
                b.outstanding.insert(id, Outstanding { first_sent: now, last_sent: now });
                for c in conns.iter_mut().flatten() {
                    match c.answered {
                        true => c.send(id),
                        false => c.probe(&b, now),
                    }
                }
            }
            _ = upkeep.tick() => {
                let now = Instant::now();
                for (i, slot) in conns.iter_mut().enumerate() {
                    if slot.is_none() {
                        *slot = connect(&sockets[i], i, &mut generation, &heard_tx).await;
                    }
                }
                let mut b = lock(&book);
                b.expire(now);
                for c in conns.iter_mut().flatten() {
                    c.probe(&b, now);
                }
                for (id, o) in b.outstanding.iter_mut() {
                    if now.saturating_duration_since(o.last_sent) >= RESEND_AFTER {
                        o.last_sent = now;
                        for c in conns.iter().flatten().filter(|c| c.answered) {
                            c.send(*id);
                        }
                    }
                }
                let done = drain_until.is_some_and(|d| b.outstanding.is_empty() || now >= d);
                drop(b);
                if done {
                    break;
                }
            }
            h = heard.recv() => {
                let Some(h) = h else { break };
                let Some(slot) = conns.get_mut(h.socket) else { continue };
                let Some(c) = slot.as_mut().filter(|c| c.generation == h.generation) else {
                    continue;
                };
                match h.id {
                    None => *slot = None,
                    Some(id) => {
                        let mut b = lock(&book);
                        b.answer(id, h.socket, Instant::now());
                        if !c.answered {
                            // The host runs the guest now: what it may
                            // have lost before is sent again.
                            c.answered = true;
                            for id in b.outstanding.keys() {
                                c.send(*id);
                            }
                        }
                    }
                }
            }
            r = stopping.changed() => {
                match r {
                    Ok(()) => drain_until = *stopping.borrow(),
                    Err(_) => break,
                }
            }
        }
    }
}

/// Connects to `path` if a host listens there: a writer task for the
/// requests and a reader task for the answers.
async fn connect(
    path: &std::path::Path,
    socket: usize,
    generation: &mut u64,
    heard: &mpsc::UnboundedSender<Heard>,
) -> Option<Conn> {
    if !path.exists() {
        return None;
    }
    let stream = UnixStream::connect(path).await.ok()?;
    *generation += 1;
    let generation = *generation;
    let (read, mut write) = stream.into_split();
    let (lines, mut queued) = mpsc::channel::<String>(QUEUE);
    tokio::spawn(async move {
        while let Some(l) = queued.recv().await {
            if write.write_all(l.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let heard = heard.clone();
    tokio::spawn(async move {
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            // At most MAX_LINE bytes of a line are kept: a guest cannot
            // make the client hold more.
            // An error ends the connection like its end.
            let n = (&mut read)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .unwrap_or_default();
            if n == 0 {
                let _ = heard.send(Heard {
                    socket,
                    generation,
                    id: None,
                });
                return;
            }
            if let Some(id) = parse(&line) {
                let _ = heard.send(Heard {
                    socket,
                    generation,
                    id: Some(id),
                });
            }
        }
    });
    Some(Conn {
        generation,
        lines,
        answered: false,
        probed_at: None,
    })
}

/// The id of an answer line `ok q<id>` (anything else: none).
fn parse(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?.trim_end();
    s.strip_prefix("ok q")?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answers_are_parsed_and_everything_else_ignored() {
        assert_eq!(parse(b"ok q17\n"), Some(17));
        assert_eq!(parse(b"ok q17\r\n"), Some(17));
        assert_eq!(parse(b"ok q\n"), None);
        assert_eq!(parse(b"q17\n"), None);
        assert_eq!(parse(b"ok q-1\n"), None);
        assert_eq!(parse(b"ok q99999999999999999999999\n"), None);
        assert_eq!(parse(&[0xff, b'\n']), None);
    }

    /// A fake guest on a unix socket: answers each request line, after
    /// `delay`, `copies` times.
    async fn guest(path: PathBuf, delay: Duration, copies: usize) {
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        tokio::time::sleep(delay).await;
                        for _ in 0..copies {
                            if w.write_all(format!("ok {l}\n").as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn a_host_that_appears_late_gets_what_is_owed_and_duplicates_count_once() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.sock"), d.path().join("b.sock"));
        let client = ServiceClient::start(vec![a.clone(), b.clone()], 100);
        // Nobody listens for 300 ms: ~30 requests wait.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = client.stats();
        assert_eq!(s.served, 0);
        assert!(s.waiting >= 10, "{s:?}");
        assert!(s.oldest_waiting_us >= 200_000, "{s:?}");
        // b appears, answering everything twice.
        guest(b.clone(), Duration::ZERO, 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = client.finish(Duration::from_secs(5)).await;
        assert_eq!(r.stats.waiting, 0, "{r:?}");
        assert_eq!(r.stats.dropped, 0);
        assert_eq!(r.answered_by[0], 0);
        assert_eq!(r.answered_by[1], r.stats.served);
        assert_eq!(r.stats.histogram.iter().sum::<u64>(), r.stats.served);
        // The first requests waited for b to appear.
        assert!(r.stats.percentile_us(1.0).unwrap() >= 200_000, "{r:?}");
        assert!(r.stats.served >= 40, "{r:?}");
    }

    #[tokio::test]
    async fn requests_are_not_answered_faster_than_the_guest_answers() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.sock");
        guest(a.clone(), Duration::from_millis(30), 1).await;
        let client = ServiceClient::start(vec![a], 20);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = client.finish(Duration::from_secs(5)).await;
        assert_eq!(r.stats.waiting, 0);
        assert!(r.stats.served >= 5, "{r:?}");
        assert!(r.stats.mean_us().unwrap() >= 30_000, "{r:?}");
    }

    /// A host that never answers (an incoming QEMU, whose guest does not
    /// run yet) is sent one request, not the stream: nothing piles up
    /// there to be answered first once it runs.
    #[tokio::test]
    async fn a_silent_host_gets_one_request_at_a_time_and_a_rate_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.sock");
        // Listens and reads, never answers.
        let l = tokio::net::UnixListener::bind(&a).unwrap();
        let heard = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut lines = BufReader::new(s).lines();
            let mut got = Vec::new();
            while let Ok(Ok(Some(l))) =
                tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
            {
                got.push(l);
            }
            got
        });
        let client = ServiceClient::start(vec![a], u32::MAX);
        assert_eq!(
            client.stats().requests_per_sec,
            u64::from(MAX_REQUESTS_PER_SEC)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = client.finish(Duration::from_millis(100)).await;
        assert_eq!(r.stats.served, 0);
        assert!(r.stats.waiting > 100, "{r:?}");
        assert_eq!(heard.await.unwrap(), ["q0"]);
    }
}
