//! Identities and trust: certificate and key files, the CA bundle, SPIFFE
//! IDs, and the rustls configurations built from them.
//!
//! Every connection is mutual TLS 1.3 through rustls with the *ring*
//! provider. A peer's identity is the SPIFFE ID in its certificate's URI SAN
//! (`spiffe://<trust-domain>/agent/<name>` or `/operator/<name>`), never a
//! DNS name, so certificates can come from `convoyctl pki` or from an
//! existing PKI such as SPIRE.
//!
//! - A client (an agent connecting to a peer, or `convoyctl`) names the exact
//!   SPIFFE ID it expects; [`SpiffeServerVerifier`] checks the chain to the
//!   CA bundle and then that ID, inside the handshake. A valid certificate
//!   from the same CA with another ID is refused.
//! - A server requires a client certificate chaining to the CA bundle
//!   (rustls' `WebPkiClientVerifier`) and then authorizes the client's
//!   SPIFFE ID for the ALPN it asked for ([`crate::transport`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use convoy_protocol::names::{AgentName, NameError, Role, SpiffeId, TrustDomain};
use convoy_protocol::signed::{ChainError, ChainVerifier, SignError, SignatureError, Signer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use thiserror::Error;

/// Why an identity or trust bundle could not be loaded or used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause (shown in the message, not chained, to print once).
        error: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A private key file that others may read.
    #[error("{path} is open to its group or other users (mode {mode:o}); run: chmod 600 {path}")]
    KeyPermissions {
        /// File.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The certificate carries no (or more than one) SPIFFE ID.
    #[error("certificate has no usable SPIFFE ID: {0}")]
    NoSpiffeId(#[source] NoSpiffeId),
    /// The SPIFFE ID does not parse.
    #[error(transparent)]
    Name(#[from] NameError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// A federation setting is inconsistent.
    #[error("federation: {0}")]
    Federation(#[source] FederationError),
}

/// Why a certificate yields no single SPIFFE ID.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NoSpiffeId {
    /// The certificate does not parse.
    #[error("unparsable certificate: {0}")]
    Unparsable(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subject alternative name extension does not parse.
    #[error("bad SAN extension: {0}")]
    BadSan(#[source] x509_parser::error::X509Error),
    /// No subject alternative name extension.
    #[error("no SAN extension")]
    NoSan,
    /// No, or more than one, `spiffe://` URI among the SANs.
    #[error("exactly one spiffe:// URI SAN is required")]
    NotExactlyOne,
}

/// Why a federation cannot be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The other bundle is of our own trust domain.
    #[error("{0} is our own trust domain, not a federated one")]
    OwnDomain(TrustDomain),
    /// The domain is federated already.
    #[error("{0} is federated twice")]
    Twice(TrustDomain),
    /// No peer identity is trusted from the domain.
    #[error("federation with {0} names no peer identity")]
    NoPeers(TrustDomain),
    /// A peer identity of another domain than the bundle's.
    #[error("{peer} is not in trust domain {domain}")]
    ForeignPeer {
        /// The identity.
        peer: SpiffeId,
        /// The federated bundle's domain.
        domain: TrustDomain,
    },
}

/// This agent's (or operator's) certificate chain and private key.
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a PEM certificate chain and a PEM private key. The key file
    /// must be open to its owner only.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        let chain_pem = read(cert)?;
        check_key_permissions(key)?;
        let key_pem = read(key)?;
        Identity::from_pem(&chain_pem, &key_pem, cert, key)
    }

    /// Builds an identity from PEM text (paths are for error messages).
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, IdentityError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::Pem {
                path: cert_path.into(),
                what: format!("bad certificate PEM: {e}"),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(IdentityError::Pem {
                path: cert_path.into(),
                what: "no certificate found".into(),
            });
        };
        let id = spiffe_id_of(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::Pem {
            path: key_path.into(),
            what: format!("no usable private key: {e}"),
        })?;
        Ok(Identity { id, chain, key })
    }

    /// The SPIFFE ID in the certificate.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
}

/// The CA certificates a peer's chain must end in, the trust domain they
/// vouch for, and the certificate revocation lists in force.
///
/// **Federation:** a bundle may also trust other trust domains' CAs, each
/// for a list of named SPIFFE IDs only ([`TrustBundle::federate`]). Every
/// chain is checked against the CA of the domain its SPIFFE ID claims: a
/// federated CA cannot vouch for our domain or for an identity it was not
/// named for, and our CA cannot vouch for another domain.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    domain: TrustDomain,
    crls: Arc<Vec<CertificateRevocationListDer<'static>>>,
    parsed_crls: Arc<Vec<webpki::CertRevocationList<'static>>>,
    federated: Arc<Vec<Federated>>,
}

/// Another trust domain, trusted for named identities only.
#[derive(Clone, Debug)]
struct Federated {
    bundle: TrustBundle,
    peers: std::collections::BTreeSet<SpiffeId>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("domain", &self.domain)
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .field(
                "federated",
                &self
                    .federated
                    .iter()
                    .map(|f| (f.bundle.domain.to_string(), f.peers.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TrustBundle {
    /// Loads every certificate in a PEM file as a trust anchor for `domain`.
    pub fn load(path: &Path, domain: TrustDomain) -> Result<Self, IdentityError> {
        let pem = read(path)?;
        TrustBundle::from_pem(&pem, path, domain)
    }

    /// Builds a bundle from PEM text.
    pub fn from_pem(pem: &[u8], path: &Path, domain: TrustDomain) -> Result<Self, IdentityError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| IdentityError::Pem {
                path: path.into(),
                what: format!("bad CA PEM: {e}"),
            })?;
            roots.add(cert).map_err(|e| IdentityError::Pem {
                path: path.into(),
                what: format!("unusable CA certificate: {e}"),
            })?;
        }
        if roots.is_empty() {
            return Err(IdentityError::Pem {
                path: path.into(),
                what: "no CA certificate found".into(),
            });
        }
        Ok(TrustBundle {
            roots: Arc::new(roots),
            domain,
            crls: Arc::new(Vec::new()),
            parsed_crls: Arc::new(Vec::new()),
            federated: Arc::new(Vec::new()),
        })
    }

    /// Also trusts `other` (another trust domain's CA bundle, with its CRLs)
    /// for the identities in `peers` only, which must all be in `other`'s
    /// domain. Refused for our own domain, or a domain federated already.
    pub fn federate(
        mut self,
        other: TrustBundle,
        peers: impl IntoIterator<Item = SpiffeId>,
    ) -> Result<Self, IdentityError> {
        let bad = IdentityError::Federation;
        if other.domain == self.domain {
            return Err(bad(FederationError::OwnDomain(other.domain)));
        }
        if self
            .federated
            .iter()
            .any(|f| f.bundle.domain == other.domain)
        {
            return Err(bad(FederationError::Twice(other.domain)));
        }
        let peers: std::collections::BTreeSet<SpiffeId> = peers.into_iter().collect();
        if peers.is_empty() {
            return Err(bad(FederationError::NoPeers(other.domain)));
        }
        if let Some(p) = peers.iter().find(|p| p.domain() != &other.domain) {
            return Err(bad(FederationError::ForeignPeer {
                peer: p.clone(),
                domain: other.domain,
            }));
        }
        let mut f = (*self.federated).clone();
        f.push(Federated {
            bundle: TrustBundle {
                federated: Arc::new(Vec::new()),
                ..other
            },
            peers,
        });
        self.federated = Arc::new(f);
        Ok(self)
    }

    /// The federated identity called `name` with `role`, if exactly one
    /// federated domain names one.
    pub fn federated_peer(&self, role: Role, name: &AgentName) -> Option<SpiffeId> {
        let mut found = self
            .federated
            .iter()
            .flat_map(|f| f.peers.iter())
            .filter(|p| p.role() == role && p.name() == name);
        match (found.next(), found.next()) {
            (Some(p), None) => Some(p.clone()),
            _ => None,
        }
    }

    /// The bundle that may vouch for `id`: ours for our domain, a federated
    /// one for the identities it was named for, none otherwise.
    fn bundle_for(&self, id: &SpiffeId) -> Result<&TrustBundle, ChainError> {
        if id.domain() == &self.domain {
            return Ok(self);
        }
        match self
            .federated
            .iter()
            .find(|f| f.bundle.domain == *id.domain())
        {
            Some(f) if f.peers.contains(id) => Ok(&f.bundle),
            Some(_) => Err(ChainError::NotFederated { id: id.clone() }),
            None => Err(ChainError::ForeignDomain {
                id: id.clone(),
                ours: self.domain.clone(),
            }),
        }
    }

    /// True when a certificate for `id` could be trusted: our domain, or a
    /// federated identity named for its domain.
    pub fn vouches_for(&self, id: &SpiffeId) -> bool {
        self.bundle_for(id).is_ok()
    }

    /// Verifies a peer's chain (leaf first) against the bundle of the domain
    /// its SPIFFE ID claims (see the type's docs), for `usage` at `now`.
    pub fn verify_peer(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, ChainError> {
        let id = spiffe_id_of(leaf).map_err(|e| ChainError::Certificate(e.to_string()))?;
        self.bundle_for(&id)?
            .verify_chain_for(leaf, intermediates, now, usage)
            .map_err(|e| match e {
                webpki::Error::CertRevoked => ChainError::Revoked,
                webpki::Error::CertExpired { .. } => ChainError::Expired,
                webpki::Error::CertNotValidYet { .. } => ChainError::NotValidYet,
                webpki::Error::UnknownIssuer => ChainError::UnknownIssuer { id: id.clone() },
                other => ChainError::Invalid(format!("{other:?}")),
            })?;
        Ok(id)
    }

    /// Adds the CRLs in a PEM file: certificates they list are refused at
    /// the handshake and as ticket signers.
    pub fn with_crl_file(self, path: &Path) -> Result<Self, IdentityError> {
        let pem = read(path)?;
        self.with_crl_pem(&pem, path)
    }

    /// Adds CRLs from PEM text (the path is for error messages).
    pub fn with_crl_pem(mut self, pem: &[u8], path: &Path) -> Result<Self, IdentityError> {
        let mut crls: Vec<CertificateRevocationListDer<'static>> = (*self.crls).clone();
        for crl in CertificateRevocationListDer::pem_slice_iter(pem) {
            crls.push(crl.map_err(|e| IdentityError::Pem {
                path: path.into(),
                what: format!("bad CRL PEM: {e}"),
            })?);
        }
        let mut parsed: Vec<webpki::CertRevocationList<'static>> = Vec::new();
        for crl in &crls {
            let owned = webpki::OwnedCertRevocationList::from_der(crl.as_ref()).map_err(|e| {
                IdentityError::Pem {
                    path: path.into(),
                    what: format!("unusable CRL: {e:?}"),
                }
            })?;
            parsed.push(owned.into());
        }
        self.crls = Arc::new(crls);
        self.parsed_crls = Arc::new(parsed);
        Ok(self)
    }

    /// Verifies a chain (leaf first) to our CA bundle for `usage` at `now`,
    /// refusing revoked end-entity certificates.
    fn verify_chain_for(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), webpki::Error> {
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        let refs: Vec<&webpki::CertRevocationList<'_>> = self.parsed_crls.iter().collect();
        let revocation = if refs.is_empty() {
            None
        } else {
            webpki::RevocationOptionsBuilder::new(&refs).ok().map(|b| {
                // Every certificate of the chain, intermediates included:
                // a revoked intermediate CA revokes all it issued.
                b.with_depth(webpki::RevocationCheckDepth::Chain)
                    // A peer from a CA whose CRL we do not hold is judged by
                    // its chain alone; an expired CRL still lists revocations.
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        };
        ee.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map(|_| ())
    }

    /// The verifier of client certificates: chained to our CAs, every
    /// certificate of the chain (intermediates too) checked against our
    /// CRLs.
    ///
    /// With federation, the handshake accepts chains to any trusted CA; the
    /// binding of each domain to its CA and named identities is then checked
    /// by [`TrustBundle::verify_peer`] (see `transport::authorize_peer`).
    pub fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, IdentityError> {
        let mut roots = (*self.roots).clone();
        let mut crls: Vec<CertificateRevocationListDer<'static>> = (*self.crls).clone();
        for f in self.federated.iter() {
            roots.roots.extend(f.bundle.roots.roots.iter().cloned());
            crls.extend(f.bundle.crls.iter().cloned());
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        if !crls.is_empty() {
            builder = builder.with_crls(crls).allow_unknown_revocation_status();
        }
        builder.build().map_err(IdentityError::Verifier)
    }

    /// The trust domain.
    pub fn domain(&self) -> &TrustDomain {
        &self.domain
    }
}

/// The crypto provider every Convoy TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration: our chain, client certificates required and
/// chained to `trust`, TLS 1.3 only, the given ALPN protocols.
pub fn server_config(
    identity: &Identity,
    trust: &TrustBundle,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = trust.client_verifier()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// A client configuration that presents `identity` and accepts only a
/// server whose certificate chains to `trust` and names exactly `expected`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustBundle,
    expected: SpiffeId,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.clone(),
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.enable_sni = false;
    Ok(cfg)
}

/// Verifies a server's chain against the CA bundle, then that its SPIFFE
/// ID is exactly the one expected. (rustls' default verifier matches DNS
/// names, which SPIFFE certificates need not carry.)
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: TrustBundle,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

/// rustls' error for a webpki verdict, keeping the common cases precise.
fn cert_error(e: webpki::Error) -> rustls::Error {
    let c = match e {
        webpki::Error::CertExpired { .. } => CertificateError::Expired,
        webpki::Error::CertNotValidYet { .. } => CertificateError::NotValidYet,
        webpki::Error::CertRevoked => CertificateError::Revoked,
        webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let claimed = spiffe_id_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let bundle = self.trust.bundle_for(&claimed).map_err(|e| {
            tracing::warn!(presented = %claimed, "untrusted domain or identity: {e}");
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        })?;
        bundle
            .verify_chain_for(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map_err(cert_error)?;
        match spiffe_id_of(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(expected = %self.expected, presented = %id, "peer identity mismatch");
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ))
            }
            Err(e) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(e)),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated: both configs are TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ChainVerifier for TrustBundle {
    fn verify_chain(&self, chain: &[Vec<u8>], now_unix: u64) -> Result<SpiffeId, ChainError> {
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(ChainError::Empty);
        };
        let leaf = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        self.verify_peer(
            &leaf,
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_unix)),
            webpki::KeyUsage::client_auth(),
        )
    }

    fn verify_signature(
        &self,
        leaf: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let leaf = CertificateDer::from(leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| SignatureError::Certificate(e.to_string()))?;
        ee.verify_signature(webpki::ring::ED25519, message, signature)
            .map_err(|_| SignatureError::Invalid)
    }

    fn public_key(&self, leaf: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| SignatureError::Certificate(e.to_string()))?;
        Ok(parsed.public_key().raw.to_vec())
    }
}

impl Signer for Identity {
    fn chain(&self) -> Vec<Vec<u8>> {
        self.chain.iter().map(|c| c.as_ref().to_vec()).collect()
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let PrivateKeyDer::Pkcs8(k) = &self.key else {
            return Err(SignError::NotPkcs8);
        };
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der())
                .map_err(|e| SignError::NotEd25519(e.to_string()))?;
        Ok(pair.sign(message).as_ref().to_vec())
    }
}

/// The single SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| IdentityError::NoSpiffeId(NoSpiffeId::Unparsable(e)))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::NoSpiffeId(NoSpiffeId::BadSan(e)))?
        .ok_or(IdentityError::NoSpiffeId(NoSpiffeId::NoSan))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (Some(first), None) = (ids.next(), ids.next()) else {
        return Err(IdentityError::NoSpiffeId(NoSpiffeId::NotExactlyOne));
    };
    Ok(first.parse()?)
}

/// The body of the `spiffe_from_x509` fuzz target: a peer's leaf
/// certificate, as DER, through [`spiffe_id_of`]. It must not panic; an ID
/// it finds is a valid SPIFFE ID written as is in the certificate, and its
/// text parses back to the same ID.
pub fn fuzz_spiffe_id(der: &[u8]) {
    let Ok(id) = spiffe_id_of(&CertificateDer::from(der)) else {
        return;
    };
    let text = id.to_string();
    assert!(text.starts_with("spiffe://"), "{text}");
    assert!(
        der.windows(text.len()).any(|w| w == text.as_bytes()),
        "{text} is not in the certificate"
    );
    assert_eq!(text.parse::<SpiffeId>().ok(), Some(id));
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|error| IdentityError::Read {
        path: path.into(),
        error,
    })
}

/// Refuses a key file that anyone but its owner may read, write or run
/// (its group included, as ssh does).
pub fn check_key_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|error| IdentityError::Read {
        path: path.into(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::KeyPermissions {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::pki::Pki;

    fn pki(dir: &Path, domain: &str) -> Pki {
        Pki::init(dir, TrustDomain::new(domain).unwrap()).unwrap()
    }

    #[test]
    fn federation_settings_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let home = pki(&d.path().join("h"), "home.test").trust().unwrap();
        let other = pki(&d.path().join("o"), "other.test").trust().unwrap();
        let id = |s: &str| -> SpiffeId { s.parse().unwrap() };
        let e = |r: Result<TrustBundle, IdentityError>| r.unwrap_err().to_string();
        assert!(e(home
            .clone()
            .federate(home.clone(), [id("spiffe://home.test/agent/a")]))
        .contains("our own trust domain"));
        assert!(e(home.clone().federate(other.clone(), [])).contains("names no peer"));
        assert!(e(home
            .clone()
            .federate(other.clone(), [id("spiffe://third.test/agent/x")]))
        .contains("is not in trust domain other.test"));
        let f = home
            .clone()
            .federate(other.clone(), [id("spiffe://other.test/agent/x")])
            .unwrap();
        assert!(e(f
            .clone()
            .federate(other, [id("spiffe://other.test/agent/y")]))
        .contains("federated twice"));
        let x: AgentName = "x".parse().unwrap();
        assert_eq!(
            f.federated_peer(Role::Agent, &x),
            Some(id("spiffe://other.test/agent/x"))
        );
        assert_eq!(f.federated_peer(Role::Operator, &x), None);
        assert!(f.bundle_for(&id("spiffe://other.test/agent/y")).is_err());
        assert!(f.bundle_for(&id("spiffe://third.test/agent/x")).is_err());
    }
}
