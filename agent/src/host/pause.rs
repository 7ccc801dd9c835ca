//! Named points where a test may stop an agent's migration for ever
//! (`--dangerous-pause-at POINT`, [`crate::config::DangerousOptions::pause_at`]),
//! so that a fault — a kill, a cut link — lands exactly there rather than
//! after a sleep and a hope. The journal's points ([`JournalPoint`]) stop
//! right after a record is committed; the engine's ([`EnginePoint`]) at
//! steps that write nothing to the journal.

use std::str::FromStr;

use convoy_protocol::journal::JournalPoint;

/// A step of the page engine that writes nothing to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePoint {
    /// Source: before the pages of pre-copy round 2 leave (the first
    /// round went; the VM runs here).
    SourceRound2,
    /// Source: the VM is paused for the final copy, which has not left.
    SourceStopCopy,
    /// Destination: every page verified, before `Ready` leaves.
    DestinationReady,
    /// Source: after the post-copy switch, before its first push of owed
    /// pages.
    SourcePostcopyPush,
    /// Destination: the post-copy link was lost; the VM waits for the
    /// source's `Resume`. Not a stop (the destination waits there anyway):
    /// `paused at destination-recovering` only says it is there.
    DestinationRecovering,
}

impl EnginePoint {
    /// Every point.
    pub const ALL: [EnginePoint; 5] = [
        EnginePoint::SourceRound2,
        EnginePoint::SourceStopCopy,
        EnginePoint::DestinationReady,
        EnginePoint::SourcePostcopyPush,
        EnginePoint::DestinationRecovering,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EnginePoint::SourceRound2 => "source-round-2",
            EnginePoint::SourceStopCopy => "source-stop-copy",
            EnginePoint::DestinationReady => "destination-ready",
            EnginePoint::SourcePostcopyPush => "source-postcopy-push",
            EnginePoint::DestinationRecovering => "destination-recovering",
        }
    }
}

/// Where to pause: a journal point or an engine point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePoint {
    /// Right after this journal record is committed.
    Journal(JournalPoint),
    /// At this engine step.
    Engine(EnginePoint),
}

impl PausePoint {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PausePoint::Journal(p) => p.name(),
            PausePoint::Engine(p) => p.name(),
        }
    }
}

impl std::fmt::Display for PausePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<JournalPoint> for PausePoint {
    fn from(p: JournalPoint) -> Self {
        PausePoint::Journal(p)
    }
}

impl From<EnginePoint> for PausePoint {
    fn from(p: EnginePoint) -> Self {
        PausePoint::Engine(p)
    }
}

/// Not a point's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown point {0:?}: one of {list}", list = names())]
pub struct UnknownPausePoint(pub String);

fn names() -> String {
    JournalPoint::ALL
        .iter()
        .map(|p| p.name())
        .chain(EnginePoint::ALL.iter().map(|p| p.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for PausePoint {
    type Err = UnknownPausePoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(p) = s.parse::<JournalPoint>() {
            return Ok(PausePoint::Journal(p));
        }
        EnginePoint::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .map(PausePoint::Engine)
            .ok_or_else(|| UnknownPausePoint(s.to_owned()))
    }
}

/// The file whose appearance in the state directory releases a paused
/// migration (see the module docs); removed as it does.
pub const RELEASE_FILE: &str = "dangerous-release";

/// Stops the caller when the agent was told to pause at `point`; returns
/// at once otherwise.
pub(crate) async fn at(host: &crate::host::Host, point: EnginePoint) {
    if host.config.dangerous_options().pause_at == Some(PausePoint::Engine(point)) {
        hold(host, point.into()).await;
    }
}

/// Holds the caller at `point`: logs `paused at POINT` (to the log and to
/// stderr, where a test waits for it), then waits until a test releases it
/// by creating [`RELEASE_FILE`] in the state directory — after it killed
/// the other agent or cut the link, say — and for ever without a state
/// directory.
pub(crate) async fn hold(host: &crate::host::Host, point: PausePoint) {
    tracing::info!("paused at {point}");
    eprintln!("paused at {point}");
    let Some(release) = host.config.state_dir.as_ref().map(|d| d.join(RELEASE_FILE)) else {
        return std::future::pending().await;
    };
    loop {
        if std::fs::remove_file(&release).is_ok() {
            tracing::info!("released at {point}");
            eprintln!("released at {point}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// At a point the engine must not stop at (a synchronous step whose
/// waiting goes on elsewhere), only says it was reached, as [`at`] does,
/// so that a test knows the agent is there.
pub(crate) fn note(host: &crate::host::Host, point: EnginePoint) {
    if host.config.dangerous_options().pause_at == Some(PausePoint::Engine(point)) {
        tracing::info!("paused at {}", point.name());
        eprintln!("paused at {}", point.name());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn every_point_parses_from_its_name_and_nothing_else_does() {
        for p in JournalPoint::ALL {
            assert_eq!(
                p.name().parse::<PausePoint>().unwrap(),
                PausePoint::Journal(p)
            );
        }
        for p in EnginePoint::ALL {
            assert_eq!(
                p.name().parse::<PausePoint>().unwrap(),
                PausePoint::Engine(p)
            );
        }
        let e = "source-round-3".parse::<PausePoint>().unwrap_err();
        assert!(e.to_string().contains("destination-recovering"), "{e}");
        assert!(e.to_string().contains("source-claimed"), "{e}");
    }
}
