//! Mutual TLS between nodes, from the cluster's CA (`cluster.tls`), and
//! the node identity a peer's certificate proves.
//!
//! Every node presents a certificate signed by the cluster CA, as a server
//! to the nodes that dial it and as a client to the nodes it dials. Node
//! `N`'s certificate names `node-N` (a DNS subject alternative name): a
//! dialing node checks that the peer is the node it meant, and an accepting
//! node takes only certificates that chain to the CA *and* name a node —
//! a certificate for the public device listener, even one the cluster CA
//! signed, cannot open a peer link. [`proven_nodes`] reads the node ids a
//! peer's certificate proves; the peer protocol (`raft::network`) accepts a
//! call only for those ids.
//!
//! [`DevCa`] makes such a CA and certificates for development and tests:
//! peer certificates ([`DevCa::issue_peer`]) apart from public ones
//! ([`DevCa::issue_public`]), so the internet-facing key is no cluster
//! credential.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::placement::NodeId;

/// ALPN of the inter-node protocol. Version 2: every call names the node
/// that sends it.
pub const PEER_ALPN: &[u8] = b"volna-peer/2";

/// Why the cluster's TLS material is unusable.
#[derive(Debug, Error)]
pub enum PeerTlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Certificate generation failed (development CA).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The name node `id`'s certificate carries and a dialer checks.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}")
}

/// The node ids `cert` names (its `node-N` DNS subject alternative names),
/// in order; empty when it names none or does not parse. Only meaningful
/// for a certificate the cluster CA was checked to have signed.
pub fn proven_nodes(cert: &CertificateDer<'_>) -> Vec<NodeId> {
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => dns.strip_prefix("node-")?.parse().ok(),
            _ => None,
        })
        .collect()
}

/// The node ids a peer connection's client certificate proves (see
/// [`proven_nodes`]); empty when it presented none.
pub fn peer_nodes(conn: &quinn::Connection) -> Vec<NodeId> {
    conn.peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(proven_nodes))
        .unwrap_or_default()
}

/// Checks client certificates as WebPKI does against the cluster CA, and
/// then that the certificate names a node: a certificate the CA issued for
/// something else (a device listener, a service) is no peer.
#[derive(Debug)]
struct NodeCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for NodeCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if proven_nodes(end_entity).is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A node's TLS configurations for the inter-node endpoint.
#[derive(Debug, Clone)]
pub struct PeerTls {
    /// Accepting peers (client certificates required).
    pub server: quinn::ServerConfig,
    /// Dialing peers (presents this node's certificate).
    pub client: quinn::ClientConfig,
}

impl PeerTls {
    /// From PEM files: the cluster CA, this node's certificate chain and
    /// its private key.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, PeerTlsError> {
        let load = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| PeerTlsError::Load {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        Self::from_pem(
            &load("cluster CA", ca)?,
            &load("node certificate", cert)?,
            &load("node key", key)?,
        )
    }

    /// From PEM text, as [`PeerTls::from_files`].
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, PeerTlsError> {
        let bad = |what: &'static str, reason: String| PeerTlsError::Load {
            what,
            path: PathBuf::from("<pem>"),
            reason,
        };
        let certs = |what: &'static str, pem: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(what, e.to_string()))?;
            if certs.is_empty() {
                return Err(bad(what, "no certificate".into()));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs("cluster CA", ca)? {
            roots
                .add(ca)
                .map_err(|e| bad("cluster CA", e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let chain = certs("node certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("node key", e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_err = |e: rustls::Error| PeerTlsError::Config(e.to_string());

        let verifier = Arc::new(NodeCertVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| PeerTlsError::Config(e.to_string()))?,
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config_err)?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config_err)?;
        client.alpn_protocols = vec![PEER_ALPN.to_vec()];

        let quic_err =
            |e: quinn::crypto::rustls::NoInitialCipherSuite| PeerTlsError::Config(e.to_string());
        let server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(quic_err)?,
        ));
        let client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client).map_err(quic_err)?,
        ));
        Ok(Self { server, client })
    }

    /// The name to dial node `id` by.
    pub fn server_name(id: NodeId) -> Result<ServerName<'static>, PeerTlsError> {
        ServerName::try_from(node_name(id)).map_err(|e| PeerTlsError::Config(e.to_string()))
    }
}

/// A development CA: signs peer certificates (`node-<id>`), public
/// certificates for devices, or (for tests) one certificate for both.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
}

impl DevCa {
    /// A new CA, its key only in memory.
    pub fn generate() -> Result<Self, PeerTlsError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Volna development cluster CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate (PEM): what nodes and clients trust.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Node `id`'s certificate, valid both between nodes and for `names`
    /// (hosts and IP addresses devices dial): one key for both, for tests.
    /// A deployment issues [`DevCa::issue_peer`] and
    /// [`DevCa::issue_public`] instead (from separate CAs), so the key on
    /// the internet-facing listener cannot act as a node.
    pub fn issue(&self, id: NodeId, names: &[&str]) -> Result<IssuedCert, PeerTlsError> {
        let mut sans = vec![node_name(id)];
        sans.extend(names.iter().map(|n| (*n).to_owned()));
        self.sign(
            sans,
            &node_name(id),
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// Node `id`'s peer certificate: names only `node-<id>`, for the peer
    /// link in both directions.
    pub fn issue_peer(&self, id: NodeId) -> Result<IssuedCert, PeerTlsError> {
        self.sign(
            vec![node_name(id)],
            &node_name(id),
            vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A certificate for a node's public device listener, valid for
    /// `names` (hosts and IP addresses devices dial) and naming no node.
    pub fn issue_public(&self, names: &[&str]) -> Result<IssuedCert, PeerTlsError> {
        let common = names.first().copied().unwrap_or("volna");
        self.sign(
            names.iter().map(|n| (*n).to_owned()).collect(),
            common,
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A client certificate for `name` (a service or device dialing the
    /// public listener with mutual TLS), naming no node.
    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, PeerTlsError> {
        self.sign(
            vec![name.to_owned()],
            name,
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    fn sign(
        &self,
        sans: Vec<String>,
        common_name: &str,
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> Result<IssuedCert, PeerTlsError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("a certificate")
    }

    #[test]
    fn a_peer_certificate_proves_its_node_and_a_public_one_none() {
        let ca = DevCa::generate().expect("a CA");
        let peer = ca.issue_peer(3).expect("issued");
        assert_eq!(proven_nodes(&der(&peer.cert_pem)), vec![3]);
        let public = ca
            .issue_public(&["localhost", "127.0.0.1"])
            .expect("issued");
        assert!(proven_nodes(&der(&public.cert_pem)).is_empty());
        let both = ca.issue(2, &["localhost"]).expect("issued");
        assert_eq!(proven_nodes(&der(&both.cert_pem)), vec![2]);
        // Not a certificate at all.
        assert!(proven_nodes(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_empty());
    }
}
