//! TLS with rustls (ring provider), both ways.
//!
//! - Listeners ([`ServerTls`]): certificates chosen by SNI against each certificate's DNS
//!   names (exact, then `*.` wildcards of one label), a default certificate for clients without
//!   SNI or with an unknown name, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 only.
//! - Replicas ([`UpstreamTls`], [`TlsConnect`]): system roots or a configured CA file, SNI and
//!   verification against the replica's host (or `server_name`), an optional client
//!   certificate, ALPN `http/1.1`; handshake failures are described in words ([`describe`]).
//!
//! Every file is read and checked when the config is loaded, and the rustls configs are built
//! then, so a reload re-reads the files and a broken one fails the reload (the running
//! certificates stay), and the hot path only clones an `Arc`.

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;

/// The protocol versions offered and accepted, both ways: TLS 1.3 and TLS 1.2.
pub static PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{path} holds no PEM certificate (a \"-----BEGIN CERTIFICATE-----\" block)")]
    NoCertificate {
        /// The file.
        path: String,
    },
    /// The file's PEM is malformed.
    #[error("{path} is not valid PEM: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What the PEM parser said.
        reason: String,
    },
    /// A certificate is not a well-formed X.509 certificate.
    #[error("{path} holds a certificate that cannot be parsed: {reason}")]
    Certificate {
        /// The file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// The file holds no private key.
    #[error(
        "{path} holds no PEM private key (a \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)"
    )]
    NoKey {
        /// The file.
        path: String,
    },
    /// The private key is of a kind rustls cannot sign with.
    #[error("{path} holds a private key that cannot be used: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What rustls said.
        reason: String,
    },
    /// The private key is not the certificate's.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
    /// No system CA certificate could be loaded.
    #[error(
        "no system CA certificates found ({reason}); install them (the ca-certificates package) or set a ca file"
    )]
    NoSystemRoots {
        /// What the loader said.
        reason: String,
    },
    /// rustls refused to build a config.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoCertificate {
            path: path.display().to_string(),
        },
        other => TlsError::Pem {
            path: path.display().to_string(),
            reason: other.to_string(),
        },
    }
}

/// Reads a PEM file of certificates (a chain, leaf first, or CA certificates); each must
/// parse as X.509.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    for c in &certs {
        webpki::EndEntityCert::try_from(c).map_err(|e| TlsError::Certificate {
            path: path.display().to_string(),
            reason: format!("{e:?}"),
        })?;
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.display().to_string(),
        },
        other => TlsError::Pem {
            path: path.display().to_string(),
            reason: other.to_string(),
        },
    })
}

/// A fingerprint of file contents, so that a reload can tell whether a file changed.
fn digest(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = sha1_smol::Sha1::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest().bytes()
}

/// One `[server.tls]` certificate: its chain and key, loaded and checked to match.
#[derive(Clone)]
pub struct ServerCert {
    /// The certificate file.
    pub cert_path: PathBuf,
    /// The key file.
    pub key_path: PathBuf,
    /// The DNS names of its subjectAltName, lower-case (`*.example.com` for wildcards).
    pub names: Vec<String>,
    key: Arc<CertifiedKey>,
    digest: [u8; 20],
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerCert {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.digest == other.digest
    }
}

/// Which of a [`ServerCert`]'s two files a load error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFile {
    /// The certificate file.
    Cert,
    /// The key file.
    Key,
}

impl ServerCert {
    /// Loads a certificate chain and its private key, and checks that they belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ServerCert, (CertFile, TlsError)> {
        let chain = read_certificates(cert_path).map_err(|e| (CertFile::Cert, e))?;
        let key_der = read_private_key(key_path).map_err(|e| (CertFile::Key, e))?;
        let fingerprint = {
            let mut parts: Vec<&[u8]> = chain.iter().map(|c| c.as_ref()).collect();
            parts.push(key_der.secret_der());
            digest(&parts)
        };
        let signing = provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| {
                let reason = e.to_string();
                (
                    CertFile::Key,
                    TlsError::Key {
                        path: key_path.display().to_string(),
                        reason,
                    },
                )
            })?;
        let key = CertifiedKey::new(chain, signing);
        match key.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err((
                    CertFile::Key,
                    TlsError::KeyMismatch {
                        cert: cert_path.display().to_string(),
                        key: key_path.display().to_string(),
                    },
                ));
            }
        }
        let leaf = webpki::EndEntityCert::try_from(&key.cert[0]).map_err(|e| {
            (
                CertFile::Cert,
                TlsError::Certificate {
                    path: cert_path.display().to_string(),
                    reason: format!("{e:?}"),
                },
            )
        })?;
        let names = leaf
            .valid_dns_names()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        Ok(ServerCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            names,
            key: Arc::new(key),
            digest: fingerprint,
        })
    }
}

/// Picks the certificate for a handshake by its SNI name.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    default: usize,
}

impl SniResolver {
    fn new(certs: &[ServerCert], default: usize) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in certs.iter().enumerate() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        SniResolver {
            keys: certs.iter().map(|c| c.key.clone()).collect(),
            exact,
            wildcard,
            default,
        }
    }

    /// The index of the certificate for `name`: an exact name, else a wildcard for its parent.
    fn lookup(&self, name: &str) -> Option<usize> {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            &lower
        } else {
            name
        };
        let name = name.trim_end_matches('.');
        self.exact.get(name).copied().or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent).copied()
        })
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let i = hello
            .server_name()
            .and_then(|n| self.lookup(n))
            .unwrap_or(self.default);
        Some(self.keys[i].clone())
    }
}

/// `[server.tls]`, compiled: the listen addresses, the certificates and the rustls config
/// every TLS connection is accepted with.
#[derive(Clone)]
pub struct ServerTls {
    /// TLS listen addresses.
    pub listen: Vec<std::net::SocketAddr>,
    /// The certificates, in file order.
    pub certificates: Vec<ServerCert>,
    /// Index of the certificate for clients without SNI or with an unknown name.
    pub default: usize,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("listen", &self.listen)
            .field("certificates", &self.certificates)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.listen == other.listen
            && self.certificates == other.certificates
            && self.default == other.default
    }
}

impl ServerTls {
    /// Builds the server config: SNI resolver, ALPN h2 then http/1.1, TLS 1.2 and 1.3.
    pub fn new(
        listen: Vec<std::net::SocketAddr>,
        certificates: Vec<ServerCert>,
        default: usize,
    ) -> Result<ServerTls, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver::new(&certificates, default)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            listen,
            certificates,
            default,
            config: Arc::new(config),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// The rustls config (for tests and the summary).
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }
}

fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = match found.errors.first() {
                    Some(e) => e.to_string(),
                    None => "the system store is empty".to_owned(),
                };
                return Err(reason);
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// `[upstreams.NAME.tls]`, compiled: how Palisade talks TLS to an upstream's `https://`
/// replicas.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The CA file whose certificates replace the system roots, if set.
    pub ca: Option<PathBuf>,
    /// The client certificate file (mTLS), if set.
    pub client_cert: Option<PathBuf>,
    /// The name sent as SNI and verified in the replica's certificate instead of its host.
    pub server_name: Option<ServerName<'static>>,
    config: Arc<ClientConfig>,
    digest: [u8; 20],
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.client_cert == other.client_cert
            && self.server_name == other.server_name
            && self.digest == other.digest
    }
}

/// Which file of `[upstreams.NAME.tls]` a load error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTlsFile {
    /// `ca`.
    Ca,
    /// `client_cert`.
    ClientCert,
    /// `client_key`.
    ClientKey,
}

impl UpstreamTls {
    /// Loads the CA (else the system roots) and the client certificate and key, and builds
    /// the client config: TLS 1.2 and 1.3, ALPN http/1.1.
    pub fn load(
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
        server_name: Option<ServerName<'static>>,
    ) -> Result<UpstreamTls, (UpstreamTlsFile, TlsError)> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let roots = match ca {
            Some(path) => {
                let certs = read_certificates(path).map_err(|e| (UpstreamTlsFile::Ca, e))?;
                let mut roots = RootCertStore::empty();
                for c in certs {
                    parts.push(c.to_vec());
                    roots.add(c).map_err(|e| {
                        (
                            UpstreamTlsFile::Ca,
                            TlsError::Certificate {
                                path: path.display().to_string(),
                                reason: e.to_string(),
                            },
                        )
                    })?;
                }
                Arc::new(roots)
            }
            None => system_roots()
                .map_err(|reason| (UpstreamTlsFile::Ca, TlsError::NoSystemRoots { reason }))?,
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(|e| (UpstreamTlsFile::Ca, e.into()))?
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let cert = ServerCert::load(cert_path, key_path).map_err(|(which, e)| {
                    let which = match which {
                        CertFile::Cert => UpstreamTlsFile::ClientCert,
                        CertFile::Key => UpstreamTlsFile::ClientKey,
                    };
                    (which, e)
                })?;
                parts.push(cert.digest.to_vec());
                builder.with_client_cert_resolver(Arc::new(ClientCert(cert.key)))
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        Ok(UpstreamTls {
            ca: ca.map(Path::to_path_buf),
            client_cert: client.map(|(c, _)| c.to_path_buf()),
            server_name,
            config: Arc::new(config),
            digest: digest(&refs),
        })
    }

    /// The connector for one replica whose host is `host`.
    pub fn connect_to(&self, host: &str) -> TlsConnect {
        let server_name = self.server_name.clone().unwrap_or_else(|| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
                ServerName::try_from("invalid.invalid").expect("a valid DNS name")
            })
        });
        TlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            server_name,
        }
    }
}

/// Presents one client certificate to every server that asks.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How to open TLS to one replica: the client config and the name to send and verify.
#[derive(Clone)]
pub struct TlsConnect {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsConnect {
    /// Runs the handshake over an open TCP connection; the error says why it failed.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| describe(&e).unwrap_or_else(|| format!("TLS handshake failed: {e}")))
    }
}

/// The rustls error somewhere in `e`'s chain of sources, if any.
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        source = s.source();
    }
    None
}

/// Says in words why a TLS exchange with a replica failed, when `e` holds a rustls error:
/// "TLS handshake failed: certificate expired: ...", "... certificate not valid for name ...".
pub fn describe(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let why = match rustls_error(e)? {
        E::InvalidCertificate(c) => match c {
            C::NotValidForName => "certificate not valid for the replica's name".to_owned(),
            C::NotValidForNameContext {
                expected,
                presented,
            } => {
                let names: Vec<&str> = presented.iter().map(|p| presented_name(p)).collect();
                let valid_for = match names.as_slice() {
                    [] => "no name".to_owned(),
                    names => names.join(", "),
                };
                format!(
                    "certificate not valid for name {:?}; certificate is only valid for {valid_for}",
                    expected.to_str()
                )
            }
            C::Expired => "certificate expired".to_owned(),
            C::NotValidYet => "certificate not valid yet".to_owned(),
            C::UnknownIssuer => "certificate signed by an unknown CA (not in the system roots, or not in tls.ca when it is set)".to_owned(),
            C::BadSignature => "certificate has a bad signature".to_owned(),
            C::Revoked => "certificate revoked".to_owned(),
            other => other.to_string(),
        },
        E::AlertReceived(A::CertificateRequired) => {
            "the replica requires a client certificate (set tls.client_cert and tls.client_key)"
                .to_owned()
        }
        E::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::AccessDenied),
        ) => format!("the replica refused the client certificate (alert {a:?})"),
        E::AlertReceived(a) => format!("the replica sent the alert {a:?}"),
        E::InvalidMessage(_) => "the replica does not speak TLS (is it an http:// replica?)".to_owned(),
        E::NoApplicationProtocol => "the replica does not offer http/1.1 by ALPN".to_owned(),
        other => other.to_string(),
    };
    Some(format!("TLS handshake failed: {why}"))
}

/// `other.test` out of rustls's `DnsName("other.test")` (or `IpAddress(..)`).
fn presented_name(p: &str) -> &str {
    match (p.find('('), p.rfind(')')) {
        (Some(open), Some(close)) if open < close => p[open + 1..close].trim_matches('"'),
        _ => p,
    }
}
