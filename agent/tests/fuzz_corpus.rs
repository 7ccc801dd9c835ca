//! Replays the committed corpora of the agent's cargo-fuzz targets
//! (`fuzz/corpus/<target>/`) as ordinary tests, and can regenerate the
//! X.509 seeds: `CONVOY_WRITE_SEEDS=1 cargo test -p convoy-agent --test
//! fuzz_corpus` (the device-state seeds come from the unit tests of
//! `backend::sim::device`, with the same variable).

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ED25519};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, f: fn(&[u8])) {
    convoy_protocol::fuzz::replay_corpus(env!("CARGO_MANIFEST_DIR"), target, f);
}

#[test]
fn replay_spiffe_from_x509() {
    replay(
        "spiffe_from_x509",
        convoy_agent::trust::identity::fuzz_spiffe_id,
    );
}

#[test]
fn replay_sim_device_state() {
    replay(
        "sim_device_state",
        convoy_agent::backend::sim::fuzz_device_state,
    );
}

/// A self-signed leaf with these subject alternative names, as DER.
fn leaf(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

/// Leaves with one SPIFFE ID, two, none, another URI, an invalid one, a
/// huge SAN, and cut short.
#[test]
fn write_seed_corpus_when_asked() {
    use convoy_agent::trust::identity::spiffe_id_of;
    if std::env::var_os("CONVOY_WRITE_SEEDS").is_none() {
        return;
    }
    let agent = "spiffe://example.org/agent/a";
    let one = leaf(vec![uri(agent)]);
    let huge = format!("spiffe://example.org/agent/{}", "a".repeat(60_000));
    let seeds: Vec<(&str, Vec<u8>, bool)> = vec![
        ("seed-agent", one.clone(), true),
        (
            "seed-operator",
            leaf(vec![
                SanType::DnsName("op.example.org".try_into().unwrap()),
                uri("spiffe://example.org/operator/op"),
            ]),
            true,
        ),
        (
            "seed-spiffe-and-https",
            leaf(vec![uri("https://example.org/x"), uri(agent)]),
            true,
        ),
        (
            "seed-two-spiffe",
            leaf(vec![uri(agent), uri("spiffe://example.org/agent/b")]),
            false,
        ),
        ("seed-no-san", leaf(Vec::new()), false),
        (
            "seed-https-only",
            leaf(vec![uri("https://example.org/agent/a")]),
            false,
        ),
        (
            "hostile-upper-case-domain",
            leaf(vec![uri("spiffe://Example.org/agent/a")]),
            false,
        ),
        (
            "hostile-bad-role",
            leaf(vec![uri("spiffe://example.org/admin/a")]),
            false,
        ),
        ("hostile-huge-san", leaf(vec![uri(&huge)]), false),
        (
            "hostile-huge-dns-san",
            leaf(vec![
                SanType::DnsName("a".repeat(60_000).try_into().unwrap()),
                uri(agent),
            ]),
            true,
        ),
        ("hostile-truncated", one[..one.len() / 2].to_vec(), false),
        ("hostile-empty", Vec::new(), false),
    ];
    std::fs::create_dir_all(corpus("spiffe_from_x509")).unwrap();
    for (name, der, has_id) in seeds {
        let found = spiffe_id_of(&der.clone().into());
        assert_eq!(found.is_ok(), has_id, "{name}: {found:?}");
        std::fs::write(corpus("spiffe_from_x509").join(name), der).unwrap();
    }
}
