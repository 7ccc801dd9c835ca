//! Secrets never reach the logs: with every log level on, a migration's
//! whole log output (and the `Debug` of identities and configurations)
//! holds no private key material of the CA, the agents or the operator.
//! The logs are the agent's JSON lines (`--log-format json`), and every
//! line the migration engine wrote on either side names the migration,
//! its peer and its role.
//!
//! A test binary of its own, not a module of `it`: it installs a global
//! TRACE subscriber (the agents log from every worker thread), which can
//! be set once per process and would then capture, and slow, every other
//! test's logs for the rest of the run.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::Write;
use std::sync::{Arc, Mutex};

use convoy_agent::lab::Lab;
use convoy_protocol::ctl::Outcome;
use convoy_tests::{migrate, sim_spec};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every private key file under `dir`, recursively.
fn key_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            key_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "key") {
            out.push(p);
        }
    }
}

/// Needles for one PEM private key: each base64 line of its body, and the
/// hex of the Ed25519 seed (the last 32 bytes of the PKCS#8 document).
fn needles(pem: &str) -> Vec<String> {
    let body: Vec<&str> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let mut out: Vec<String> = body.iter().map(|l| l.to_string()).collect();
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    use rustls::pki_types::pem::PemObject;
    let bytes = der.secret_der();
    let seed = &bytes[bytes.len() - 32..];
    out.push(seed.iter().map(|b| format!("{b:02x}")).collect());
    out
}

/// Every JSON line logged inside migration `migration` names it, its peer
/// and its role, on both sides, and every line of the page-migration
/// engine is inside it.
fn migration_lines_carry_the_migration(logs: &str, migration: &str) {
    let mut roles = std::collections::BTreeMap::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let span = &v["span"];
        let target = v["target"].as_str().unwrap_or_default();
        if target.starts_with("convoy_agent::engine::native") {
            assert_eq!(span["migration"], migration, "{line}");
        }
        if span["name"] != "migration" || span["migration"] != migration {
            continue;
        }
        assert!(
            span["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("spiffe://")),
            "{line}"
        );
        let role = span["role"].as_str().unwrap_or_default().to_owned();
        if role == "source" {
            assert_eq!(span["vm"], "vm", "{line}");
            if !roles.contains_key("source") {
                eprintln!("{line}");
            }
        }
        *roles.entry(role).or_insert(0) += 1;
    }
    assert!(
        roles.get("source").is_some_and(|n| *n > 2)
            && roles.get("destination").is_some_and(|n| *n > 0),
        "lines by role: {roles:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_private_key_material_in_logs_or_debug_output() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = convoy_agent::logging::subscriber(
        convoy_agent::logging::LogFormat::Json,
        tracing_subscriber::EnvFilter::new("trace"),
        move || writer.clone(),
    );
    // Global: the agents' tasks run on every worker thread. This file
    // holds this one test, so nothing else logs here.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::start(dir.path(), &["a", "b"], |_, _| {})
        .await
        .unwrap();
    let a = lab.client("a").await.unwrap();
    a.vm_create(sim_spec("vm", 8 << 20, 1000)).await.unwrap();
    let r = a
        .migrate(migrate(&lab, "vm", "a", "b"), |_| {})
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    // Refusals log their reasons too.
    assert!(a
        .migrate(migrate(&lab, "nope", "a", "b"), |_| {})
        .await
        .is_err());
    let debug = format!(
        "{:?} {:?} {:?}",
        lab.operator,
        lab.agent("a").unwrap(),
        lab.trust
    );
    lab.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.len() > 1000,
        "the capture saw the run: {} bytes",
        logs.len()
    );
    assert!(debug.contains("AgentName(\"operator\")"), "{debug}");
    migration_lines_carry_the_migration(&logs, &r.migration);
    let mut keys = Vec::new();
    key_files(dir.path(), &mut keys);
    assert!(keys.len() >= 4, "CA, two agents, operator: {keys:?}");
    assert!(
        keys.iter().any(|k| k.ends_with("quic-reset.key")),
        "the agents' reset keys are checked too: {keys:?}"
    );
    for k in keys {
        let bytes = std::fs::read(&k).unwrap();
        // PEM private keys, and each agent's binary QUIC stateless-reset
        // key (state/NAME/quic-reset.key: whoever holds it can end that
        // agent's connections), sought as hex and as a byte list.
        let found = match String::from_utf8(bytes.clone()) {
            Ok(pem) => needles(&pem),
            Err(_) => {
                assert_eq!(bytes.len(), 32, "{}", k.display());
                let list: Vec<String> = bytes.iter().map(u8::to_string).collect();
                vec![
                    bytes.iter().map(|b| format!("{b:02x}")).collect(),
                    list.join(", "),
                ]
            }
        };
        for n in found {
            assert!(!logs.contains(&n), "{} leaked into the logs", k.display());
            assert!(
                !debug.contains(&n),
                "{} leaked into Debug output",
                k.display()
            );
        }
    }
}
