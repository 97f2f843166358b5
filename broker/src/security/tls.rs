//! TLS material for the QUIC endpoint.
//!
//! Production: a PEM certificate chain and key from the configuration,
//! re-read by [`CertReloader::reload`] (on SIGHUP): new handshakes get the
//! new certificate, established connections are not touched. Development
//! (neither configured): a self-signed certificate for `localhost`,
//! `127.0.0.1` and `::1`, generated on first start and kept as
//! `DATA_DIR/dev-cert.pem` / `dev-key.pem` so that clients that trust it
//! (`volna --ca DATA_DIR/dev-cert.pem`) keep working across restarts.
//!
//! Mutual TLS (`tls.client_ca`): client certificates are asked for but not
//! required; one that chains to the configured CA makes the connection a
//! backend service's ([`client_identity`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tracing::{info, warn};

use crate::config::Config;

/// File name of the development certificate inside the data directory.
pub const DEV_CERT_FILE: &str = "dev-cert.pem";
/// File name of the development key inside the data directory.
pub const DEV_KEY_FILE: &str = "dev-key.pem";

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        /// Certificate or key.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The development certificate could not be generated or saved.
    #[error("cannot create the development certificate in {path}: {reason}")]
    DevCert {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the material.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's TLS configuration and, in development mode, where the
/// self-signed certificate is.
#[derive(Debug)]
pub struct ServerTls {
    /// For the QUIC endpoint.
    pub config: rustls::ServerConfig,
    /// Set in development mode.
    pub dev_cert: Option<PathBuf>,
    /// Re-reads the certificate and key.
    pub reloader: CertReloader,
}

/// The certificate in force, swapped by [`CertReloader::reload`].
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Re-reads the certificate chain and key from their files.
#[derive(Debug, Clone)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Arc<CurrentCert>,
}

impl CertReloader {
    /// Loads the files again and, if they are a valid pair, serves them to
    /// new handshakes. On error the certificate in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let certified = load_certified_key(&self.cert, &self.key, &self.provider)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        info!(cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }
}

fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Load {
        what: "private key",
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(CertifiedKey::from_der(chain, key, provider)?)
}

/// Builds the server's TLS configuration (TLS 1.3, ALPN `volna/1`).
pub fn server_tls(config: &Config) -> Result<ServerTls, TlsError> {
    let (cert_path, key_path, dev) = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), false),
        _ => {
            let (cert, key) = ensure_dev_cert(&config.data_dir)?;
            (cert, key, true)
        }
    };
    let provider = Arc::new(prefer_sha256_suites(
        rustls::crypto::ring::default_provider(),
    ));
    let current = Arc::new(CurrentCert(RwLock::new(Arc::new(load_certified_key(
        &cert_path, &key_path, &provider,
    )?))));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match &config.tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| TlsError::Load {
                        what: "client CA",
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_cert_resolver(current.clone());
    tls.alpn_protocols = vec![volna_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // Our order, not the client's: see `prefer_sha256_suites`.
    tls.ignore_client_order = true;
    // Stateless resumption tickets: a client that reconnects (a phone
    // changing networks, every client after a restart storm) skips the
    // certificate signature and verification. The default stateful cache
    // holds 256 sessions, far fewer than the clients that come back at
    // once. Tickets are sealed with a key that lives only in this process
    // (rotated by rustls), so a restarted broker does full handshakes.
    tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(ServerTls {
        config: tls,
        dev_cert: dev.then_some(cert_path.clone()),
        reloader: CertReloader {
            cert: cert_path,
            key: key_path,
            provider,
            current,
        },
    })
}

/// `provider` with TLS_AES_128_GCM_SHA256 first. ring's default puts
/// AES-256-GCM-SHA384 first, whose key schedule runs on SHA-512, which
/// x86 CPUs have no instructions for (SHA-256 has them): in a reconnect
/// storm SHA-512 alone was 4.9% of the broker's CPU. AES-128-GCM is the
/// suite QUIC's Initial packets use anyway.
fn prefer_sha256_suites(
    mut provider: rustls::crypto::CryptoProvider,
) -> rustls::crypto::CryptoProvider {
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// The name of a verified client certificate: its subject's common name,
/// else its first DNS name, else `cert:` and its fingerprint's first 16 hex
/// digits.
pub fn client_identity(cert: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    if let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) {
        if let Some(cn) = parsed
            .subject()
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok())
        {
            return cn.to_owned();
        }
        if let Ok(Some(san)) = parsed.subject_alternative_name()
            && let Some(dns) = san.value.general_names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
        {
            return dns.to_owned();
        }
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(cert.as_ref());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("cert:{hex}")
}

/// The SHA-256 fingerprint of the first certificate in a PEM file, as hex:
/// what a client pins with `volna --pin` (`Trust::Pinned`).
pub fn fingerprint_hex(path: &Path) -> Result<String, TlsError> {
    use sha2::{Digest, Sha256};
    let certs = load_certs(path)?;
    let digest = Sha256::digest(certs[0].as_ref());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let load_err = |reason: String| TlsError::Load {
        what: "certificate chain",
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(load_err("no certificate in the file".into()));
    }
    Ok(certs)
}

fn ensure_dev_cert(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join(DEV_CERT_FILE);
    let key = dir.join(DEV_KEY_FILE);
    let dev_err = |reason: String| TlsError::DevCert {
        path: dir.to_owned(),
        reason,
    };
    if cert.exists() && key.exists() {
        warn!(cert = %cert.display(), "DEVELOPMENT MODE: using the self-signed certificate; configure tls.cert and tls.key for production");
        return Ok((cert, key));
    }
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| dev_err(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| dev_err(e.to_string()))?;
    write_private(&key, generated.key_pair.serialize_pem().as_bytes())
        .map_err(|e| dev_err(e.to_string()))?;
    std::fs::write(&cert, generated.cert.pem()).map_err(|e| dev_err(e.to_string()))?;
    warn!(cert = %cert.display(), "DEVELOPMENT MODE: generated a self-signed certificate; clients must trust it (volna --ca {}); configure tls.cert and tls.key for production", cert.display());
    Ok((cert, key))
}

/// Writes a file only its owner may read (keys, secrets).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}
