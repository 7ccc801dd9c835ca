//! A QMP client: QEMU's JSON-lines control protocol over a unix socket
//! the agent owns. The greeting is read and capabilities negotiated on
//! connect; each command carries an id and its answer is matched to it;
//! asynchronous events that arrive meanwhile are kept in order.
//!
//! QEMU is a local process, but its output is still input: lines are
//! bounded ([`MAX_LINE`]), malformed JSON is a typed error, never a panic.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line accepted (1 MiB).
pub const MAX_LINE: usize = 1 << 20;
/// Events kept until taken; older ones are dropped (and counted) past it.
pub const MAX_EVENTS: usize = 1024;

/// QMP failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the socket (it exited or crashed).
    #[error("QMP: QEMU closed the connection")]
    Closed,
    /// A line longer than [`MAX_LINE`].
    #[error("QMP: a line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not QMP.
    #[error("QMP: malformed message: {0}")]
    Malformed(#[from] Malformed),
    /// QEMU refused the command.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer or event in time.
    #[error("QMP: {0} timed out")]
    Timeout(Waited),
}

/// How a QMP message is not what QMP says (QEMU's text kept as it came,
/// for the operator).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Malformed {
    /// Not JSON.
    #[error("{source}: {line}")]
    Json {
        /// Why.
        #[source]
        source: serde_json::Error,
        /// The line's first 200 bytes.
        line: String,
    },
    /// The first message is not a greeting.
    #[error("no QMP greeting: {0}")]
    NoGreeting(Value),
    /// A command we could not encode.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// An answer to a command we did not send.
    #[error("answer to another command: {0}")]
    OtherAnswer(Value),
    /// An answer with neither a return nor an error.
    #[error("neither return nor error: {0}")]
    NoResult(Value),
}

/// What was waited for when a QMP wait timed out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Waited {
    /// QEMU's QMP socket to appear and accept.
    #[error("QMP socket")]
    Socket,
    /// QEMU's greeting.
    #[error("QMP greeting")]
    Greeting,
    /// The answers that check an adopted VM.
    #[error("checking the VM")]
    CheckingVm,
    /// The answer to a command (its QMP name).
    #[error("{0}")]
    Command(String),
    /// An event (its QMP name).
    #[error("waiting for {0}")]
    Event(String),
}

/// A negotiated QMP connection.
///
/// Reads are cancel-safe: bytes already read stay in `pending`, so a
/// timed-out wait never loses half a line.
#[derive(Debug)]
pub struct Qmp {
    reader: OwnedReadHalf,
    pending: Vec<u8>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<Value>,
    /// Events dropped because nobody took them.
    pub events_dropped: u64,
    /// QEMU's version from the greeting (`major.minor.micro`).
    pub version: String,
    /// Out-of-band execution is on (QEMU offered it): commands that allow
    /// it run at once, even while the main loop is blocked (a post-copy
    /// destination waiting on a page that cannot come).
    pub oob: bool,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::handshake(UnixStream::connect(path).await?).await
    }

    /// Reads the greeting on a connected socket and enters command mode.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: r,
            pending: Vec::new(),
            writer: w,
            next_id: 0,
            events: VecDeque::new(),
            events_dropped: 0,
            version: String::new(),
            oob: false,
        };
        let greeting = qmp.read().await?;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| Malformed::NoGreeting(greeting.clone()))?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        qmp.version = format!("{}.{}.{}", n("major"), n("minor"), n("micro"));
        let offered = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        let enable = offered.then(|| json!({ "enable": ["oob"] }));
        qmp.execute("qmp_capabilities", enable).await?;
        qmp.oob = offered;
        Ok(qmp)
    }

    /// One message (bounded, cancel-safe).
    async fn read(&mut self) -> Result<Value, QmpError> {
        let line = loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                break self.pending.drain(..=end).collect::<Vec<u8>>();
            }
            if self.pending.len() > MAX_LINE {
                return Err(QmpError::TooLong);
            }
            let mut chunk = [0u8; 8192];
            let n = self.reader.read(&mut chunk).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.pending.extend_from_slice(&chunk[..n]);
        };
        if line.len() > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        serde_json::from_slice(&line).map_err(|source| {
            Malformed::Json {
                source,
                line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
            }
            .into()
        })
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.run("execute", command, arguments).await
    }

    /// Runs `command` out of band when QEMU offered it (`exec-oob`: only
    /// for commands that allow it), in band otherwise.
    pub async fn execute_oob(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let how = if self.oob { "exec-oob" } else { "execute" };
        self.run(how, command, arguments).await
    }

    async fn run(
        &mut self,
        how: &str,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = format!("convoy-{}", self.next_id);
        let mut msg = json!({ how: command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(Malformed::Encode)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            let m = self.read().await?;
            if m.get("event").is_some() {
                self.keep(m);
                continue;
            }
            if m.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                // The late answer to a command whose wait was cancelled:
                // skip it. Anything else is not ours.
                if stale(&m, self.next_id) {
                    continue;
                }
                return Err(Malformed::OtherAnswer(m).into());
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(Malformed::NoResult(m).into());
        }
    }

    fn keep(&mut self, event: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for the event called `name` (kept events first).
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        self.next_event(|e| e["event"] == name, timeout)
            .await?
            .ok_or_else(|| QmpError::Timeout(Waited::Event(name.to_owned())))
    }

    /// The first event `wanted` takes, kept ones first (the others read
    /// meanwhile are kept), or `None` when none came within `timeout`.
    pub async fn next_event(
        &mut self,
        wanted: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Option<Value>, QmpError> {
        if let Some(i) = self.events.iter().position(&wanted) {
            return Ok(self.events.remove(i));
        }
        let wait = async {
            loop {
                let m = self.read().await?;
                if m.get("event").is_none() {
                    // Not an event, and no command is waiting: a stale
                    // answer (its wait was cancelled).
                    continue;
                }
                if wanted(&m) {
                    return Ok(m);
                }
                self.keep(m);
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// A QMP event's timestamp, microseconds since the epoch (`None`: it has
/// none).
pub fn event_unix_us(e: &Value) -> Option<u64> {
    let t = &e["timestamp"];
    Some(t["seconds"].as_u64()? * 1_000_000 + t["microseconds"].as_u64()?)
}

/// An answer to one of our earlier commands (`convoy-N`, N below `next`).
fn stale(m: &Value, next: u64) -> bool {
    m.get("id")
        .and_then(Value::as_str)
        .and_then(|id| id.strip_prefix("convoy-"))
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n < next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    /// A fake QEMU: sends `script` lines after reading each command.
    async fn fake(dir: &Path, greeting: &str, answers: Vec<Vec<String>>) -> std::path::PathBuf {
        fake_recording(dir, greeting, answers, Default::default()).await
    }

    /// Like [`fake`], keeping every command read in `seen`.
    async fn fake_recording(
        dir: &Path,
        greeting: &str,
        answers: Vec<Vec<String>>,
        seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> std::path::PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let greeting = greeting.to_owned();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{greeting}\n").as_bytes())
                .await
                .unwrap();
            for batch in answers {
                let Ok(Some(cmd)) = lines.next_line().await else {
                    return;
                };
                seen.lock().unwrap().push(cmd);
                for l in batch {
                    if w.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
        path
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 19, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

    #[tokio::test]
    async fn commands_events_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(
            d.path(),
            GREETING,
            vec![
                vec![r#"{"return": {}, "id": "convoy-1"}"#.into()],
                vec![
                    r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
                    r#"{"return": {"status": "running", "running": true}, "id": "convoy-2"}"#.into(),
                ],
                vec![r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": "convoy-3"}"#.into()],
            ],
        )
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        assert_eq!(q.version, "7.2.19");
        let r = q.execute("query-status", None).await.unwrap();
        assert_eq!(r["status"], "running");
        match q.execute("nope", None).await {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        let ev = q
            .wait_event("RESUME", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(ev["timestamp"]["seconds"], 1);
        // QEMU gone: a typed error, not a hang.
        assert!(matches!(
            q.execute("query-status", None).await,
            Err(QmpError::Closed) | Err(QmpError::Io(_))
        ));
    }

    #[test]
    fn an_events_timestamp_in_microseconds() {
        let e = json!({ "event": "STOP", "timestamp": { "seconds": 3, "microseconds": 25 } });
        assert_eq!(event_unix_us(&e), Some(3_000_025));
        assert_eq!(event_unix_us(&json!({ "event": "STOP" })), None);
    }

    #[tokio::test]
    async fn the_next_wanted_event_is_taken_and_the_others_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(
            d.path(),
            GREETING,
            vec![
                vec![r#"{"return": {}, "id": "convoy-1"}"#.into()],
                vec![
                    r#"{"return": {}, "id": "convoy-2"}"#.into(),
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}"#.into(),
                    r#"{"event": "MIGRATION", "data": {"status": "completed"}}"#.into(),
                ],
                // Never sent: the connection stays open, quiet.
                vec![],
            ],
        )
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        q.execute("migrate", None).await.unwrap();
        let migration = |e: &Value| e["event"] == "MIGRATION";
        let short = Duration::from_millis(200);
        let ev = q.next_event(migration, short).await.unwrap().unwrap();
        assert_eq!(ev["data"]["status"], "completed");
        // None more: `None` after the wait, not an error.
        assert!(q.next_event(migration, short).await.unwrap().is_none());
        // The event read on the way was kept, in order.
        let kept = q.take_events();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0]["event"], "STOP");
    }

    #[tokio::test]
    async fn out_of_band_execution_is_enabled_when_offered_and_used_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let greeting = GREETING.replace(r#""capabilities": []"#, r#""capabilities": ["oob"]"#);
        let p = fake_recording(
            d.path(),
            &greeting,
            vec![
                vec![r#"{"return": {}, "id": "convoy-1"}"#.into()],
                vec![r#"{"return": {}, "id": "convoy-2"}"#.into()],
            ],
            seen.clone(),
        )
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        assert!(q.oob);
        q.execute_oob("migrate-recover", Some(json!({ "uri": "unix:/x" })))
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        let first: Value = serde_json::from_str(&seen[0]).unwrap();
        assert_eq!(first["arguments"]["enable"], json!(["oob"]));
        let second: Value = serde_json::from_str(&seen[1]).unwrap();
        assert_eq!(second["exec-oob"], "migrate-recover");
        // Not offered: neither enabled nor used.
        let d = tempfile::tempdir().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let p = fake_recording(
            d.path(),
            GREETING,
            vec![
                vec![r#"{"return": {}, "id": "convoy-1"}"#.into()],
                vec![r#"{"return": {}, "id": "convoy-2"}"#.into()],
            ],
            seen.clone(),
        )
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        assert!(!q.oob);
        q.execute_oob("migrate-recover", None).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let first: Value = serde_json::from_str(&seen[0]).unwrap();
        assert!(first.get("arguments").is_none(), "{first}");
        let second: Value = serde_json::from_str(&seen[1]).unwrap();
        assert_eq!(second["execute"], "migrate-recover");
    }

    #[tokio::test]
    async fn hostile_output_is_a_typed_error() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(d.path(), "not json", vec![]).await;
        assert!(matches!(
            Qmp::connect(&p).await,
            Err(QmpError::Malformed(_))
        ));
        let d = tempfile::tempdir().unwrap();
        let p = fake(d.path(), r#"{"hello": 1}"#, vec![]).await;
        assert!(matches!(
            Qmp::connect(&p).await,
            Err(QmpError::Malformed(_))
        ));
        let d = tempfile::tempdir().unwrap();
        let p = fake(d.path(), &"x".repeat(MAX_LINE + 10), vec![]).await;
        assert!(matches!(Qmp::connect(&p).await, Err(QmpError::TooLong)));
        // An answer with another id.
        let d = tempfile::tempdir().unwrap();
        let p = fake(
            d.path(),
            GREETING,
            vec![vec![r#"{"return": {}, "id": "other"}"#.into()]],
        )
        .await;
        assert!(matches!(
            Qmp::connect(&p).await,
            Err(QmpError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn a_cancelled_wait_loses_nothing_and_late_answers_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = tokio::spawn({
            let path = path.clone();
            async move { Qmp::connect(&path).await.unwrap() }
        });
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        lines.next_line().await.unwrap().unwrap();
        w.write_all(b"{\"return\": {}, \"id\": \"convoy-1\"}\n")
            .await
            .unwrap();
        let mut q = client.await.unwrap();
        // Half an event, then a wait that gives up in the middle of it.
        w.write_all(b"{\"event\": \"STOP\", \"timest")
            .await
            .unwrap();
        assert!(matches!(
            q.wait_event("STOP", Duration::from_millis(100)).await,
            Err(QmpError::Timeout(_))
        ));
        w.write_all(b"amp\": {}}\n").await.unwrap();
        let ev = q.wait_event("STOP", Duration::from_secs(1)).await.unwrap();
        assert_eq!(ev["event"], "STOP");
        // A late answer to an earlier command is skipped, not fatal.
        let server = tokio::spawn(async move {
            lines.next_line().await.unwrap().unwrap();
            w.write_all(b"{\"return\": {}, \"id\": \"convoy-1\"}\n")
                .await
                .unwrap();
            w.write_all(b"{\"return\": {\"status\": \"running\"}, \"id\": \"convoy-2\"}\n")
                .await
                .unwrap();
            (lines, w)
        });
        let r = q.execute("query-status", None).await.unwrap();
        assert_eq!(r["status"], "running");
        let _keep = server.await.unwrap();
    }

    #[tokio::test]
    async fn the_event_queue_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let mut batch = Vec::new();
        for i in 0..MAX_EVENTS + 10 {
            batch.push(format!(r#"{{"event": "E{i}", "timestamp": {{}}}}"#));
        }
        batch.push(r#"{"return": {}, "id": "convoy-2"}"#.into());
        let p = fake(
            d.path(),
            GREETING,
            vec![vec![r#"{"return": {}, "id": "convoy-1"}"#.into()], batch],
        )
        .await;
        let mut q = Qmp::connect(&p).await.unwrap();
        q.execute("query-status", None).await.unwrap();
        let events = q.take_events();
        assert_eq!(events.len(), MAX_EVENTS);
        assert_eq!(q.events_dropped, 10);
        assert_eq!(events[0]["event"], "E10", "the oldest were dropped");
    }
}
