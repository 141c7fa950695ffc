//! TLS for tests: a CA and certificates made with rcgen at test time, rustls configs for TLS
//! replicas, and a TLS client that reports what the handshake chose (certificate, ALPN,
//! version) and sends requests over HTTP/1.1 or h2 as ALPN decided.

use super::client::{Reply, empty};
use super::proxy::Palisade;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, ProtocolVersion, SignatureScheme, SupportedProtocolVersion};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate as `dir/ca.pem` (for a `ca =` key); returns its path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A certificate for `names` (DNS names, wildcards or IP addresses), valid from yesterday
    /// for a year.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let now = time_now();
        self.issue_valid(names, now - 86_400, now + 365 * 86_400)
    }

    /// A certificate for `names` valid between two UNIX times.
    pub fn issue_valid(&self, names: &[&str], not_before: i64, not_after: i64) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.not_before =
            rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_before as u64);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after as u64);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A root store holding this CA.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }
}

/// Unix time now, in seconds (for certificate validity windows).
pub fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Writes `leaf` as `dir/STEM.pem` and `dir/STEM.key`; returns both paths.
pub fn write_pair(dir: &Path, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    replace_file(&cert, &leaf.cert_pem);
    replace_file(&key, &leaf.key_pem);
    (cert, key)
}

/// Writes a file atomically (write + rename), as a deploy tool would.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS replica's server config: `leaf` as its certificate, and with `client_ca` it requires
/// a client certificate issued by that CA.
pub fn replica_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider(),
            )
            .build()
            .unwrap(),
        ),
    };
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = builder
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Accepts any server certificate (the test looks at which one it got), but still checks
/// the handshake signatures, so the server must hold the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client connects.
pub struct ClientOpts<'a> {
    /// The SNI name; `None` sends no SNI.
    pub sni: Option<&'a str>,
    /// ALPN protocols offered.
    pub alpn: &'a [&'a [u8]],
    /// Versions offered.
    pub versions: &'a [&'static SupportedProtocolVersion],
    /// Verify against this CA (and the SNI name); `None` accepts any certificate.
    pub verify_with: Option<&'a Ca>,
}

impl Default for ClientOpts<'_> {
    fn default() -> Self {
        ClientOpts {
            sni: Some("a.test"),
            alpn: &[b"h2", b"http/1.1"],
            versions: rustls::DEFAULT_VERSIONS,
            verify_with: None,
        }
    }
}

/// An open TLS connection and what its handshake chose.
pub struct TlsConn {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The server's leaf certificate.
    pub peer_cert: CertificateDer<'static>,
    /// The ALPN protocol chosen, if any.
    pub alpn: Option<Vec<u8>>,
    /// The protocol version.
    pub version: ProtocolVersion,
}

/// Connects to `addr` and completes a TLS handshake (panics if it fails).
pub async fn connect(addr: SocketAddr, opts: &ClientOpts<'_>) -> TlsConn {
    try_connect(addr, opts)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr} failed: {e}"))
}

/// Connects to `addr` and runs a TLS handshake.
pub async fn try_connect(addr: SocketAddr, opts: &ClientOpts<'_>) -> Result<TlsConn, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(opts.versions)
        .unwrap();
    let mut config = match opts.verify_with {
        Some(ca) => builder.with_root_certificates(ca.roots()),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))),
    }
    .with_no_client_auth();
    config.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    let name = match opts.sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => {
            config.enable_sni = false;
            ServerName::try_from("no-sni.invalid").unwrap()
        }
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (_, session) = stream.get_ref();
    Ok(TlsConn {
        peer_cert: session.peer_certificates().unwrap()[0].clone().into_owned(),
        alpn: session.alpn_protocol().map(|p| p.to_vec()),
        version: session.protocol_version().unwrap(),
        stream,
    })
}

impl TlsConn {
    /// Sends `GET path` with `Host: host` on this connection (h2 if ALPN chose it, else
    /// HTTP/1.1) and reads the whole response.
    pub async fn get(self, path: &str, host: &str) -> Reply {
        let io = TokioIo::new(self.stream);
        let resp = if self.alpn.as_deref() == Some(b"h2") {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("https://{host}{path}"))
                .body(empty())
                .unwrap();
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", host)
                .body(empty())
                .unwrap();
            sender.send_request(req).await.unwrap()
        };
        let version = resp.version();
        let (mut parts, body) = resp.into_parts();
        parts.headers.insert(
            "x-test-http-version",
            http::HeaderValue::from_str(&format!("{version:?}")).unwrap(),
        );
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// The address of Palisade's TLS listener (the last one it logged).
pub fn tls_addr(p: &Palisade) -> SocketAddr {
    p.logs()
        .iter()
        .rev()
        .find(|l| l["message"] == "listening" && l["listener"] == "tls")
        .and_then(|l| l["addr"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no TLS listener in the log:\n{}", p.stdout_text()))
}
