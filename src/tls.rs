//! TLS for the public webhook listener: loading the operator's PEM files, or generating a
//! self-signed certificate into the data directory on first start so the service runs out of the
//! box, and swapping it on SIGHUP without dropping a connection. rustls is pinned to the `ring`
//! provider explicitly: with two providers compiled in, `ServerConfig::builder()` would panic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// `--tls-cert` and `--tls-key`.
    Files { cert: PathBuf, key: PathBuf },
    /// Neither flag: a self-signed pair kept in the data directory.
    SelfSigned { dir: PathBuf },
}

impl CertSource {
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        data_dir: &Path,
    ) -> Result<Self, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(CertSource::Files { cert, key }),
            (None, None) => Ok(CertSource::SelfSigned {
                dir: data_dir.join("tls"),
            }),
            (Some(_), None) => Err("--tls-cert was given without --tls-key; give both, or neither for a self-signed certificate".into()),
            (None, Some(_)) => Err("--tls-key was given without --tls-cert; give both, or neither for a self-signed certificate".into()),
        }
    }

    /// Reads the certificate chain and key (generating the self-signed pair if needed) and checks
    /// that they belong together.
    fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
        let (cert_path, key_path) = match self {
            CertSource::Files { cert, key } => (cert.clone(), key.clone()),
            CertSource::SelfSigned { dir } => {
                let paths = (dir.join("cert.pem"), dir.join("key.pem"));
                if !paths.0.exists() || !paths.1.exists() {
                    generate_self_signed(dir, &paths.0, &paths.1)?;
                }
                (paths.0, paths.1)
            }
        };
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read TLS certificate {}: {e}", cert_path.display()))?;
        let Some(leaf) = certs.first() else {
            return Err(format!(
                "TLS certificate {} holds no certificate",
                cert_path.display()
            ));
        };
        if let CertSource::SelfSigned { .. } = self {
            tracing::warn!(
                "serving webhooks with the self-signed certificate {} (SHA-256 fingerprint {}); \
                 pass --tls-cert and --tls-key for a certificate providers trust",
                cert_path.display(),
                fingerprint(leaf)
            );
        }
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| format!("cannot read TLS private key {}: {e}", key_path.display()))?;
        CertifiedKey::from_der(certs, key, provider).map_err(|e| {
            format!(
                "TLS certificate {} and key {} do not form a usable pair: {e}",
                cert_path.display(),
                key_path.display()
            )
        })
    }
}

/// The webhook listener's TLS, with a certificate that can be swapped while connections stay
/// open: `reload` reads the files again and replaces the served pair only when the new one loads
/// completely, so a botched renewal keeps the old certificate in service. A reload starts a fresh
/// configuration, session cache included, so no session set up under the old certificate is
/// resumed: every new handshake after a reload presents the new certificate.
pub struct Tls {
    source: CertSource,
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
}

struct Current {
    acceptor: TlsAcceptor,
    fingerprint: String,
}

impl Tls {
    pub fn load(source: CertSource) -> Result<Tls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = Current::new(&source, &provider)?;
        Ok(Tls {
            source,
            provider,
            current: RwLock::new(current),
        })
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.read().acceptor.clone()
    }

    /// Re-reads the certificate and key; on success returns the new leaf's fingerprint.
    pub fn reload(&self) -> Result<String, String> {
        let next = Current::new(&self.source, &self.provider)?;
        let fingerprint = next.fingerprint.clone();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(fingerprint)
    }

    /// SHA-256 fingerprint of the certificate being served.
    pub fn fingerprint(&self) -> String {
        self.read().fingerprint.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Current {
    fn new(source: &CertSource, provider: &Arc<CryptoProvider>) -> Result<Current, String> {
        let key = source.certified_key(provider)?;
        let fingerprint = key.cert.first().map(fingerprint).unwrap_or_default();
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("cannot configure TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Current {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        })
    }
}

fn generate_self_signed(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("cannot generate a self-signed certificate: {e}"))?;
    let write = |path: &Path, contents: &str, mode: u32| -> Result<(), String> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut file| {
                file.write_all(contents.as_bytes())?;
                file.sync_all()
            })
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(key_path, &generated.key_pair.serialize_pem(), 0o600)?;
    write(cert_path, &generated.cert.pem(), 0o644)?;
    tracing::info!("generated a self-signed certificate in {}", dir.display());
    Ok(())
}

/// `AB:CD:…` SHA-256 of a certificate's DER bytes, as browsers and `openssl x509 -fingerprint`
/// show it.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
