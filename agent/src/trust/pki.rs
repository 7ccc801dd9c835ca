//! A small file-based PKI for a quick start (`convoyctl pki`): an Ed25519
//! CA and Ed25519 certificates carrying SPIFFE IDs, made with rcgen.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! trust-domain            the trust domain, one line
//! ca.crt  ca.key          the CA (ca.key 0600; keep it off agent hosts)
//! agents/<name>.crt|.key  agent identities: spiffe://<td>/agent/<name>
//! operators/<name>.crt|.key  operator identities: spiffe://<td>/operator/<name>
//! ```
//!
//! Production deployments can use any PKI that issues SPIFFE X.509 SVIDs
//! instead; agents only need a chain, a key and the CA bundle.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_protocol::names::{AgentName, NameError, Role, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ED25519,
};
use thiserror::Error;

use rustls::pki_types::pem::PemObject;

use crate::trust::identity::{Identity, IdentityError, TrustBundle};

/// The trust domain `convoyctl pki init` uses unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "convoy.internal";

/// Why a PKI operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Filesystem.
    #[error("{path}: {error}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause (shown in the message, not chained, to print once).
        error: std::io::Error,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// Not a PKI directory.
    #[error("{0} is not a Convoy PKI directory (run `convoyctl pki init` first)")]
    NotInitialized(PathBuf),
    /// rcgen.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Loading what was written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Io {
        path: path.into(),
        error,
    }
}

/// The DER of a PKCS#8 v1 (RFC 5208) Ed25519 private key up to its
/// 32-byte seed: version 0, algorithm id-Ed25519, the seed as an OCTET
/// STRING inside the privateKey OCTET STRING (RFC 8410 §7).
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A new Ed25519 key, encoded as PKCS#8 **v1**: the form OpenSSL 3
/// (`openssl pkey`) and Python's `cryptography` read. ring (and so rcgen)
/// generates v2 (RFC 5958, the public key attached), which they refuse;
/// the agent reads both.
fn new_key() -> Result<KeyPair, PkiError> {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let v2 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| rcgen::Error::RingUnspecified)?;
    // ring's v2 document: the same 16-byte header as v1 but version 1,
    // then the seed, then the public key.
    let seed = v2
        .as_ref()
        .get(16..48)
        .ok_or(rcgen::Error::CouldNotParseKeyPair)?;
    let mut v1 = ED25519_PKCS8_V1_PREFIX.to_vec();
    v1.extend_from_slice(seed);
    // The same key either way, or nothing is written.
    let from_v1 = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1)
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let from_v2 =
        Ed25519KeyPair::from_pkcs8(v2.as_ref()).map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    if from_v1.public_key().as_ref() != from_v2.public_key().as_ref() {
        return Err(rcgen::Error::CouldNotParseKeyPair.into());
    }
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(v1),
        &PKCS_ED25519,
    )?)
}

/// Writes `data` to a new file with `mode`; refuses to overwrite.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.into())
            } else {
                PkiError::Io {
                    path: path.into(),
                    error: e,
                }
            }
        })?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// A PKI directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    domain: TrustDomain,
}

/// Files of one issued identity.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, 0600).
    pub key: PathBuf,
}

impl Pki {
    /// Creates a CA in `dir` (created if missing) for `domain`.
    pub fn init(dir: &Path, domain: TrustDomain) -> Result<Pki, PkiError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let ca_key_path = dir.join("ca.key");
        if ca_key_path.exists() {
            return Err(PkiError::Exists(ca_key_path));
        }
        let key = new_key()?;
        let cert = ca_params(&domain)?.self_signed(&key)?;
        write_new(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&dir.join("ca.crt"), cert.pem().as_bytes(), 0o644)?;
        write_new(
            &dir.join("trust-domain"),
            format!("{domain}\n").as_bytes(),
            0o644,
        )?;
        for sub in ["agents", "operators"] {
            fs::create_dir_all(dir.join(sub)).map_err(io(dir))?;
        }
        Ok(Pki {
            dir: dir.into(),
            domain,
        })
    }

    /// Opens an existing PKI directory.
    pub fn open(dir: &Path) -> Result<Pki, PkiError> {
        let td = dir.join("trust-domain");
        let text = fs::read_to_string(&td).map_err(|_| PkiError::NotInitialized(dir.into()))?;
        Ok(Pki {
            dir: dir.into(),
            domain: TrustDomain::new(text.trim())?,
        })
    }

    /// The trust domain.
    pub fn domain(&self) -> &TrustDomain {
        &self.domain
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate file.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Where the files of `role`/`name` live.
    pub fn paths(&self, role: Role, name: &AgentName) -> Issued {
        let (sub, id) = match role {
            Role::Operator => (
                "operators",
                SpiffeId::operator(self.domain.clone(), name.clone()),
            ),
            _ => ("agents", SpiffeId::agent(self.domain.clone(), name.clone())),
        };
        Issued {
            id,
            cert: self.dir.join(sub).join(format!("{name}.crt")),
            key: self.dir.join(sub).join(format!("{name}.key")),
        }
    }

    /// Issues a certificate for `role`/`name`, valid for `validity`.
    /// Agents get both server and client authentication (they accept and
    /// open connections); operators only client authentication.
    pub fn issue(
        &self,
        role: Role,
        name: &AgentName,
        validity: Duration,
    ) -> Result<Issued, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_between(
            role,
            name,
            now - time::Duration::minutes(5),
            now + time::Duration::seconds(validity.as_secs() as i64),
        )
    }

    /// Issues a certificate valid from `not_before` to `not_after` (tests
    /// use a window in the past to make an expired certificate).
    pub fn issue_between(
        &self,
        role: Role,
        name: &AgentName,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let issuer = self.issuer()?;

        let out = self.paths(role, name);
        if out.cert.exists() || out.key.exists() {
            return Err(PkiError::Exists(out.cert));
        }
        if let Some(parent) = out.cert.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let key = new_key()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, out.id.to_string());
        params.subject_alt_names = vec![SanType::URI(out.id.to_string().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        // A random positive serial, so a revocation names exactly this
        // certificate.
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(out)
    }

    /// The CA as a signer of certificates and CRLs (its key must be 0600).
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let path = self.dir.join("ca.key");
        crate::trust::identity::check_key_permissions(&path)?;
        let pem = fs::read_to_string(&path).map_err(io(&path))?;
        Ok(Issuer::new(
            ca_params(&self.domain)?,
            KeyPair::from_pem(&pem)?,
        ))
    }

    /// Where the CRL lives (present once something was revoked).
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join("ca.crl")
    }

    /// Revokes the certificate of `role`/`name`: adds its serial to the
    /// PKI's revocation list and rewrites `ca.crl`, signed by the CA.
    /// Agents that watch the file refuse it from then on.
    pub fn revoke(&self, role: Role, name: &AgentName) -> Result<PathBuf, PkiError> {
        let p = self.paths(role, name);
        let pem = fs::read(&p.cert).map_err(io(&p.cert))?;
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice(&pem).map_err(|e| PkiError::Io {
                path: p.cert.clone(),
                error: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| PkiError::Io {
                path: p.cert.clone(),
                error: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
        let serial = hex(cert.raw_serial());
        let list = self.dir.join("revoked-serials");
        let mut serials: Vec<String> = fs::read_to_string(&list)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if !serials.contains(&serial) {
            serials.push(serial);
        }
        let issuer = self.issuer()?;
        let now = time::OffsetDateTime::now_utc();
        let revoked = serials
            .iter()
            .filter_map(|h| unhex(h))
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: serial.into(),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(30),
            crl_number: (serials.len() as u64).into(),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)?;
        // Write-then-rename: an agent never reads half a CRL.
        let tmp = self.dir.join("ca.crl.tmp");
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, crl.pem()?.as_bytes(), 0o644)?;
        fs::rename(&tmp, self.crl_path()).map_err(io(&tmp))?;
        let tmp = self.dir.join("revoked-serials.tmp");
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, (serials.join("\n") + "\n").as_bytes(), 0o644)?;
        fs::rename(&tmp, &list).map_err(io(&tmp))?;
        Ok(self.crl_path())
    }

    /// Loads an issued identity.
    pub fn identity(&self, role: Role, name: &AgentName) -> Result<Identity, PkiError> {
        let p = self.paths(role, name);
        Ok(Identity::load(&p.cert, &p.key)?)
    }

    /// The CA bundle of this PKI, with its CRL when there is one.
    pub fn trust(&self) -> Result<TrustBundle, PkiError> {
        let t = TrustBundle::load(&self.ca_cert(), self.domain.clone())?;
        let crl = self.crl_path();
        Ok(if crl.exists() {
            t.with_crl_file(&crl)?
        } else {
            t
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn ca_params(domain: &TrustDomain) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Convoy CA {domain}"));
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{domain}").try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_load_with_private_keys() {
        let (dir, pki, name, issued) = agent_a();
        assert_eq!(issued.id.to_string(), "spiffe://example.test/agent/a");
        let id = pki.identity(Role::Agent, &name).unwrap();
        assert_eq!(id.id(), &issued.id);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&issued.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            pki.issue(Role::Agent, &name, Duration::from_secs(1)),
            Err(PkiError::Exists(_))
        ));
        assert!(Pki::init(dir.path(), TrustDomain::new("x").unwrap()).is_err());
        // A key open to its group or to others is refused.
        for open in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&issued.key, fs::Permissions::from_mode(open)).unwrap();
            assert!(
                matches!(
                    pki.identity(Role::Agent, &name),
                    Err(PkiError::Identity(IdentityError::KeyPermissions { .. }))
                ),
                "{open:o}"
            );
        }
        fs::set_permissions(&issued.key, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(pki.identity(Role::Agent, &name).is_ok());
    }

    /// A new PKI in a temporary directory and agent `a` issued by it.
    fn agent_a() -> (tempfile::TempDir, Pki, AgentName, Issued) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), TrustDomain::new("example.test").unwrap()).unwrap();
        let name: AgentName = "a".parse().unwrap();
        let issued = pki
            .issue(Role::Agent, &name, Duration::from_secs(3600))
            .unwrap();
        (dir, pki, name, issued)
    }

    /// Runs `cmd` on a key; a missing tool fails the test under `CI=true`
    /// and skips it elsewhere.
    fn external(cmd: &mut std::process::Command) -> Option<std::process::Output> {
        match cmd.output() {
            Ok(out) => Some(out),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("skipped: {cmd:?}: {e}");
                None
            }
            Err(e) => panic!("{cmd:?}: {e}"),
        }
    }

    #[test]
    fn keys_are_pkcs8_v1_that_openssl_and_python_read_and_the_agent_reads_v2_too() {
        let (dir, pki, name, issued) = agent_a();
        for key in [dir.path().join("ca.key"), issued.key.clone()] {
            let pem = fs::read_to_string(&key).unwrap();
            let der =
                rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
            let der = der.secret_pkcs8_der();
            assert_eq!(der.len(), 48, "v1: header and seed, no public key");
            assert_eq!(der[..16], ED25519_PKCS8_V1_PREFIX);
        }
        // OpenSSL 3 reads the key and finds the certificate's public key.
        if let Some(out) = external(
            std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&issued.key),
        ) {
            assert!(out.status.success(), "{out:?}");
            let cert = external(
                std::process::Command::new("openssl")
                    .args(["x509", "-pubkey", "-noout", "-in"])
                    .arg(&issued.cert),
            )
            .unwrap();
            assert_eq!(out.stdout, cert.stdout);
        }
        // So does Python's cryptography.
        if let Some(out) = external(std::process::Command::new("python3").args([
            "-c",
            "import sys\nfrom cryptography.hazmat.primitives.serialization import load_pem_private_key\nload_pem_private_key(open(sys.argv[1], 'rb').read(), None)",
            issued.key.to_str().unwrap(),
        ])) {
            assert!(out.status.success(), "{out:?}");
        }
        // The v2 form of the same key (what earlier versions wrote) still
        // loads: header with version 1, seed, then the public key.
        let pem = fs::read_to_string(&issued.key).unwrap();
        let v1 = rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let seed = &v1.secret_pkcs8_der()[16..];
        let public = {
            use ring::signature::KeyPair as _;
            ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
                .unwrap()
                .public_key()
                .as_ref()
                .to_vec()
        };
        let mut v2 = vec![0x30, 0x53, 0x02, 0x01, 0x01];
        v2.extend_from_slice(&ED25519_PKCS8_V1_PREFIX[5..]);
        v2.extend_from_slice(seed);
        v2.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
        v2.extend_from_slice(&public);
        assert!(ring::signature::Ed25519KeyPair::from_pkcs8(&v2).is_ok());
        let v2_pem = KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(v2),
            &PKCS_ED25519,
        )
        .unwrap()
        .serialize_pem();
        fs::remove_file(&issued.key).unwrap();
        write_new(&issued.key, v2_pem.as_bytes(), 0o600).unwrap();
        let id = pki.identity(Role::Agent, &name).unwrap();
        assert_eq!(id.id(), &issued.id);
    }
}

#[cfg(test)]
mod revoke_tests {
    use super::*;

    #[test]
    fn a_revoked_intermediate_ca_revokes_what_it_issued() {
        use rustls::pki_types::{CertificateDer, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let domain = TrustDomain::new("example.test").unwrap();
        let pki = Pki::init(dir.path(), domain.clone()).unwrap();
        let root = pki.issuer().unwrap();
        // An intermediate CA under the root, and an agent under it.
        let inter_key = new_key().unwrap();
        let mut inter = ca_params(&domain).unwrap();
        inter.serial_number = Some(vec![0x42; 8].into());
        let inter_cert = inter.signed_by(&inter_key, &root).unwrap();
        let inter_issuer = Issuer::new(inter, inter_key);
        let id = SpiffeId::agent(domain.clone(), "a".parse().unwrap());
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_cert = leaf.signed_by(&new_key().unwrap(), &inter_issuer).unwrap();
        let leaf_der = CertificateDer::from(leaf_cert.der().to_vec());
        let chain = [CertificateDer::from(inter_cert.der().to_vec())];
        let usage = webpki::KeyUsage::client_auth();
        let trust = pki.trust().unwrap();
        assert_eq!(
            trust
                .verify_peer(&leaf_der, &chain, UnixTime::now(), usage)
                .unwrap(),
            id,
            "valid before the revocation"
        );
        // The root revokes the intermediate (not the leaf).
        let now = time::OffsetDateTime::now_utc();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: vec![0x42; 8].into(),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::CaCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&root)
        .unwrap();
        let trust = trust
            .with_crl_pem(crl.pem().unwrap().as_bytes(), Path::new("ca.crl"))
            .unwrap();
        let e = trust
            .verify_peer(&leaf_der, &chain, UnixTime::now(), usage)
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("revoked"), "{e}");
    }

    #[test]
    fn revocation_writes_a_crl_the_trust_bundle_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), TrustDomain::new("example.test").unwrap()).unwrap();
        let name: AgentName = "op".parse().unwrap();
        pki.issue(Role::Operator, &name, Duration::from_secs(3600))
            .unwrap();
        assert!(!pki.crl_path().exists());
        pki.revoke(Role::Operator, &name).unwrap();
        let trust = pki.trust().unwrap();
        assert!(format!("{trust:?}").contains("crls: 1"), "{trust:?}");
        let op = pki.identity(Role::Operator, &name).unwrap();
        let chain = convoy_protocol::signed::Signer::chain(&op);
        let now = crate::trust::authz::now_unix();
        let verdict = convoy_protocol::signed::ChainVerifier::verify_chain(&trust, &chain, now);
        assert_eq!(verdict, Err(convoy_protocol::signed::ChainError::Revoked));
        // Revoking a second identity keeps the first in the list.
        let other: AgentName = "op2".parse().unwrap();
        pki.issue(Role::Operator, &other, Duration::from_secs(3600))
            .unwrap();
        pki.revoke(Role::Operator, &other).unwrap();
        let serials = fs::read_to_string(dir.path().join("revoked-serials")).unwrap();
        assert_eq!(serials.lines().count(), 2);
    }
}

#[cfg(test)]
mod revoke_handshake_tests {
    use super::*;

    #[test]
    fn the_client_verifier_refuses_a_revoked_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), TrustDomain::new("example.test").unwrap()).unwrap();
        let name: AgentName = "op".parse().unwrap();
        pki.issue(Role::Operator, &name, Duration::from_secs(3600))
            .unwrap();
        pki.revoke(Role::Operator, &name).unwrap();
        let trust = pki.trust().unwrap();
        let v = trust.client_verifier().unwrap();
        let op = pki.identity(Role::Operator, &name).unwrap();
        let chain = convoy_protocol::signed::Signer::chain(&op);
        let der = rustls::pki_types::CertificateDer::from(chain[0].clone());
        let r = v.verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now());
        assert!(r.is_err(), "{r:?}");
    }
}
