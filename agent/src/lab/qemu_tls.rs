//! x509 credentials for QEMU's own TLS migration, the baseline
//! `convoyctl bench --backend qemu` measures Convoy against: a CA, a
//! server certificate for `localhost` and 127.0.0.1 and a client
//! certificate (ECDSA P-256), written where one `tls-creds-x509` object of
//! each endpoint reads them.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

/// Why the credentials could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QemuTlsError {
    /// A key or certificate.
    #[error("{0}")]
    Cert(#[from] rcgen::Error),
    /// Writing a file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// RFC 7919's `ffdhe2048` group, as `openssl genpkey -genparam -algorithm
/// DH -pkeyopt group:ffdhe2048` writes it: public, fixed parameters.
/// Without a `dh-params.pem`, a QEMU's server credentials generate
/// 2048-bit Diffie-Hellman parameters when they are added: 0.5–1.1 s of
/// CPU on this machine at every incoming migration, which an operator
/// avoids by giving the file (the benchmark's baseline must not pay it).
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Writes `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem`, `client-key.pem` and `dh-params.pem` into `dir`
/// (QEMU's names; keys mode 0600): a destination QEMU's `tls-creds-x509`
/// with `endpoint=server` and a source's with `endpoint=client`, both
/// `verify-peer=on`, over `tls-hostname=localhost`.
pub fn write_qemu_x509(dir: &Path) -> Result<(), QemuTlsError> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "Convoy bench QEMU CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca-cert.pem", ca_cert.pem().as_bytes(), 0o644)?;
    write(dir, "dh-params.pem", FFDHE2048_PEM.as_bytes(), 0o644)?;
    let issuer = Issuer::new(ca, ca_key);
    for (who, usage) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.distinguished_name
            .push(DnType::CommonName, format!("convoy bench {who}"));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer)?;
        write(
            dir,
            &format!("{who}-cert.pem"),
            cert.pem().as_bytes(),
            0o644,
        )?;
        write(
            dir,
            &format!("{who}-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dir.join(name))?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_six_files_are_written_once_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        write_qemu_x509(dir.path()).expect("write");
        for f in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
            "dh-params.pem",
        ] {
            let text = std::fs::read_to_string(dir.path().join(f)).expect(f);
            assert!(text.starts_with("-----BEGIN "), "{f}");
        }
        let mode = std::fs::metadata(dir.path().join("client-key.pem"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Never over credentials already there.
        assert!(write_qemu_x509(dir.path()).is_err());
    }
}
