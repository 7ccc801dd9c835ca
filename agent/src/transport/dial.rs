//! Dialing a peer: over QUIC, over TLS/TCP, or both raced.
//!
//! `auto` starts QUIC first and TCP [`HEAD_START`] later (at once if QUIC
//! fails first), Happy-Eyeballs style (RFC 8305), and keeps whichever
//! completes its handshake — mutual authentication included — first; the
//! other attempt is dropped. The winner is remembered per peer address
//! and goes first next time, so a peer behind a UDP-dropping firewall
//! costs the head start once, not at every dial. A TCP win is remembered
//! for [`REMEMBER_TCP`] only: past it QUIC goes first again, so a path
//! whose UDP came back is noticed (RFC 8305 §4 caches for ten minutes
//! too); with TCP first, QUIC would only win if TCP failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_protocol::names::SpiffeId;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::Endpoint;

use super::conn::{Connection, Kind};
use super::tcp::{Credit, Handshaken};
use super::{TransportError, Tuning, ALPN_CTL, MIGRATION_STREAMS};
use crate::trust::identity::{self, Identity, TrustBundle};

/// How long QUIC leads before TCP starts too.
pub const HEAD_START: Duration = Duration::from_millis(250);

/// How long a peer that TCP won for dials TCP first.
pub const REMEMBER_TCP: Duration = Duration::from_secs(600);

/// Which transport to dial with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
    /// Both raced, QUIC first.
    #[default]
    Auto,
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(Choice::Quic),
            "tcp" => Ok(Choice::Tcp),
            "auto" => Ok(Choice::Auto),
            other => Err(format!(
                "unknown transport {other:?}: expected quic, tcp or auto"
            )),
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Choice::Quic => "quic",
            Choice::Tcp => "tcp",
            Choice::Auto => "auto",
        })
    }
}

/// The credit of a TCP session by its ALPN: an operator's is a few
/// requests', an agent's a migration's (both kinds of streams).
pub fn credit(alpn: &[u8], tuning: &Tuning) -> Credit {
    if alpn == ALPN_CTL {
        Credit {
            streams: super::HANDSHAKE_STREAMS as usize,
            window: super::HANDSHAKE_WINDOW as usize,
        }
    } else {
        Credit {
            streams: 2 * MIGRATION_STREAMS as usize + super::HANDSHAKE_STREAMS as usize,
            window: tuning.connection_window as usize,
        }
    }
}

/// Dials peers by the configured [`Choice`], remembering which transport
/// won for each address.
#[derive(Debug, Clone)]
pub struct Dialer {
    endpoint: Endpoint,
    choice: Choice,
    tuning: Tuning,
    won: Arc<Mutex<HashMap<SocketAddr, (Kind, Instant)>>>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Dialer {
    /// A dialer over `endpoint` (for QUIC).
    pub fn new(endpoint: Endpoint, choice: Choice, tuning: Tuning) -> Self {
        Dialer {
            endpoint,
            choice,
            tuning,
            won: Arc::default(),
            shutdown: None,
        }
    }

    /// Closes the TCP sessions it dials when `shutdown` turns true (the
    /// agent stops; QUIC's close with the endpoint).
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// The transport it dials with.
    pub fn choice(&self) -> Choice {
        self.choice
    }

    /// The transport that last won for `addr` (a TCP win for
    /// [`REMEMBER_TCP`]).
    pub fn remembered(&self, addr: SocketAddr) -> Option<Kind> {
        self.remembered_at(addr, Instant::now())
    }

    fn remembered_at(&self, addr: SocketAddr, now: Instant) -> Option<Kind> {
        let won = self.won.lock().unwrap_or_else(|p| p.into_inner());
        match won.get(&addr) {
            Some(&(Kind::Tcp, at)) if now.saturating_duration_since(at) >= REMEMBER_TCP => None,
            Some(&(kind, _)) => Some(kind),
            None => None,
        }
    }

    fn remember(&self, addr: SocketAddr, kind: Kind, at: Instant) {
        self.won
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, (kind, at));
    }

    /// Connects to `addr`, accepting only a peer that proves `expected`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: SpiffeId,
        alpn: &[u8],
        identity: &Identity,
        trust: &TrustBundle,
    ) -> Result<Connection, TransportError> {
        let dial = |kind| self.dial(kind, addr, expected.clone(), alpn, identity, trust);
        let conn = match self.choice {
            Choice::Quic => dial(Kind::Quic).await?,
            Choice::Tcp => dial(Kind::Tcp).await?,
            Choice::Auto => {
                let first = self.remembered(addr).unwrap_or(Kind::Quic);
                let second = match first {
                    Kind::Quic => Kind::Tcp,
                    Kind::Tcp => Kind::Quic,
                };
                let failed = tokio::sync::Notify::new();
                let a = async {
                    let r = dial(first).await;
                    if r.is_err() {
                        failed.notify_one();
                    }
                    r
                };
                let b = async {
                    tokio::select! {
                        () = tokio::time::sleep(HEAD_START) => {}
                        () = failed.notified() => {}
                    }
                    dial(second).await
                };
                tokio::pin!(a, b);
                let (mut ea, mut eb) = (None, None);
                loop {
                    tokio::select! {
                        r = &mut a, if ea.is_none() => match r {
                            Ok(c) => break c,
                            Err(e) => ea = Some(e),
                        },
                        r = &mut b, if eb.is_none() => match r {
                            Ok(c) => break c,
                            Err(e) => eb = Some(e),
                        },
                    }
                    match (ea.take(), eb.take()) {
                        (Some(a), Some(b)) => {
                            let (quic, tcp) = match first {
                                Kind::Quic => (a, b),
                                Kind::Tcp => (b, a),
                            };
                            return Err(TransportError::Both {
                                quic: Box::new(quic),
                                tcp: Box::new(tcp),
                            });
                        }
                        (a, b) => (ea, eb) = (a, b),
                    }
                }
            }
        };
        tracing::debug!(peer = %addr, transport = %conn.kind(), "connected");
        self.remember(addr, conn.kind(), Instant::now());
        Ok(conn)
    }

    /// Connects to `addr` over `kind` only (a page migration's lanes go
    /// over the transport its first connection won with).
    pub async fn connect_over(
        &self,
        kind: Kind,
        addr: SocketAddr,
        expected: SpiffeId,
        alpn: &[u8],
        identity: &Identity,
        trust: &TrustBundle,
    ) -> Result<Connection, TransportError> {
        self.dial(kind, addr, expected, alpn, identity, trust).await
    }

    async fn dial(
        &self,
        kind: Kind,
        addr: SocketAddr,
        expected: SpiffeId,
        alpn: &[u8],
        identity: &Identity,
        trust: &TrustBundle,
    ) -> Result<Connection, TransportError> {
        let tls = identity::client_config(identity, trust, expected, alpn)?;
        let timeout = self.tuning.connect_timeout;
        match kind {
            Kind::Quic => {
                let crypto = QuicClientConfig::try_from(tls)?;
                let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
                cc.transport_config(Arc::new(self.tuning.transport_config()));
                // The server name is unused (no SNI, identity is the
                // SPIFFE ID) but quinn requires a syntactically valid one.
                let connecting = self.endpoint.connect_with(cc, addr, "convoy")?;
                match tokio::time::timeout(timeout, connecting).await {
                    Ok(conn) => Ok(Connection::Quic(conn?)),
                    Err(_) => Err(TransportError::Connection(quinn::ConnectionError::TimedOut)),
                }
            }
            Kind::Tcp => {
                let hs = tokio::time::timeout(
                    timeout,
                    Handshaken::connect(addr, Arc::new(tls), self.tuning.idle_timeout),
                )
                .await
                .map_err(|_| {
                    TransportError::Tcp(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "timed out",
                    ))
                })?
                .map_err(TransportError::Tcp)?;
                Ok(Connection::Tcp(hs.session(
                    credit(alpn, &self.tuning),
                    (&self.tuning).into(),
                    self.shutdown.clone(),
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_win_is_remembered_for_a_while_and_a_quic_win_for_good() {
        let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let d = Dialer::new(endpoint, Choice::Auto, Tuning::default());
        let (p, q): (SocketAddr, SocketAddr) = (
            "198.18.0.1:7000".parse().unwrap(),
            "198.18.0.2:7000".parse().unwrap(),
        );
        let t0 = Instant::now();
        assert_eq!(d.remembered_at(p, t0), None);
        d.remember(p, Kind::Tcp, t0);
        d.remember(q, Kind::Quic, t0);
        assert_eq!(d.remembered_at(p, t0 + REMEMBER_TCP / 2), Some(Kind::Tcp));
        // Past it, QUIC goes first again (None: the default order).
        assert_eq!(d.remembered_at(p, t0 + REMEMBER_TCP), None);
        assert_eq!(d.remembered_at(q, t0 + REMEMBER_TCP * 10), Some(Kind::Quic));
        // A new TCP win starts the time again.
        d.remember(p, Kind::Tcp, t0 + REMEMBER_TCP);
        assert_eq!(
            d.remembered_at(p, t0 + REMEMBER_TCP + Duration::from_secs(1)),
            Some(Kind::Tcp)
        );
    }
}
