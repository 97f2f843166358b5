//! Mutual TLS between nodes, from the cluster's CA (`cluster.tls`).
//!
//! Every node presents a certificate signed by the cluster CA, as a server
//! to the nodes that dial it and as a client to the nodes it dials, and
//! accepts only peers whose certificate chains to that CA. A dialing node
//! also checks that the peer is the node it meant: node `N`'s certificate
//! names `node-N` (a DNS subject alternative name).
//!
//! [`DevCa`] makes such a CA and certificates for development and tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;

use crate::placement::NodeId;

/// ALPN of the inter-node protocol.
pub const PEER_ALPN: &[u8] = b"volna-peer/1";

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

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| PeerTlsError::Config(e.to_string()))?;
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

/// A development cluster CA: signs node certificates valid both for the
/// inter-node endpoint (`node-<id>`) and for devices (the names given).
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

    /// Node `id`'s certificate, also valid for `names` (hosts and IP
    /// addresses devices dial).
    pub fn issue(&self, id: NodeId, names: &[&str]) -> Result<IssuedCert, PeerTlsError> {
        let key = rcgen::KeyPair::generate()?;
        let mut sans = vec![node_name(id)];
        sans.extend(names.iter().map(|n| (*n).to_owned()));
        let mut params = rcgen::CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node_name(id));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
