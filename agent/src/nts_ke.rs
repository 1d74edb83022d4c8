//! NTS-KE client IO (RFC 8915 §4): one TLS 1.3 connection per key exchange, with ALPN
//! `ntske/1`, and the session keys from the TLS exporter. What to send and how to read the
//! answer is `stratum_ntp::nts::ke`'s; this module only moves the bytes and derives the keys.
//!
//! There is no fallback anywhere here: a certificate that does not verify, a server that does
//! not speak NTS-KE, or an answer without cookies is an error, and the caller backs off and
//! tries again without ever polling that upstream unauthenticated.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use stratum_ntp::nts::aead::KEY_LEN;
use stratum_ntp::nts::ke::{
    self, ALPN, Agreement, EXPORTER_LABEL, KeFailure, MAX_MESSAGE_LEN, RecordError,
};
use stratum_ntp::nts::{AeadKey, CookieJar, SessionKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The NTP port when the key exchange names none.
const NTP_PORT: u16 = 123;

/// What a key exchange gives: the server's agreement and the two session keys.
#[derive(Debug, Clone)]
pub struct KeyExchange {
    pub agreement: Agreement,
    pub keys: SessionKeys,
    /// The peer the TLS session ran with, for logs and for the default NTP address.
    pub ke_peer: SocketAddr,
}

/// Why a key exchange failed. Labels are bounded ([`KeError::metric_label`]).
#[derive(Debug, thiserror::Error)]
pub enum KeError {
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("no NTS-KE connection to {host}:{port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {host}:{port} failed: {source}")]
    Tls {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} did not agree on ALPN ntske/1")]
    NoAlpn(String),
    #[error("the NTS-KE answer is malformed: {0}")]
    Record(#[from] RecordError),
    #[error("the connection closed before the NTS-KE answer ended")]
    Truncated,
    #[error("NTS-KE refused: {0}")]
    Refused(#[from] KeFailure),
    #[error("exporting the session keys failed: {0}")]
    Export(rustls::Error),
    #[error("no NTS-KE answer within {0:?}")]
    Timeout(Duration),
    #[error("the NTP server {name} the key exchange named does not resolve: {source}")]
    NtpServer {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no trust anchors for NTS-KE: {0}")]
    Trust(String),
}

impl KeError {
    /// A fixed label per kind, for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ServerName(_) => "server_name",
            Self::Connect { .. } => "connect",
            Self::Tls { .. } => "tls",
            Self::NoAlpn(_) => "alpn",
            Self::Record(_) | Self::Truncated => "malformed",
            Self::Refused(_) => "refused",
            Self::Export(_) => "export",
            Self::Timeout(_) => "timeout",
            Self::NtpServer { .. } => "ntp_server",
            Self::Trust(_) => "trust",
        }
    }
}

/// Why trust anchors could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading CA bundle {path}: {reason}")]
    Bundle { path: String, reason: String },
    #[error("CA bundle {0} holds no certificate")]
    EmptyBundle(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS configuration for NTS-KE: trust anchors from `ca_bundle` (PEM), or the public web
/// PKI. The agent image is a static binary with no system trust store, and the node's is not
/// mounted, so "the system's roots" are Mozilla's, as the `webpki-roots` crate ships them.
pub fn trust(ca_bundle: Option<&str>) -> Result<Arc<ClientConfig>, TrustError> {
    let roots = match ca_bundle {
        Some(pem) => roots_from_pem(pem.as_bytes(), "ntsCaBundle")?,
        None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    Ok(client_config(roots)?)
}

/// What the run loop keeps from a key exchange: where to send NTP, and the cookie jar.
#[derive(Debug)]
pub struct NtsSession {
    pub address: SocketAddr,
    pub jar: CookieJar,
}

/// A key exchange with `host:ke_port`, then the NTP address it named: the server record's
/// name (resolved) or the key exchange's own peer, and the port record or 123.
pub async fn establish(
    host: &str,
    ke_port: u16,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<NtsSession, KeError> {
    let exchange = key_exchange(host, ke_port, config, timeout).await?;
    let port = exchange.agreement.ntp_port.unwrap_or(NTP_PORT);
    let ip = match &exchange.agreement.ntp_server {
        None => exchange.ke_peer.ip(),
        Some(name) => {
            let resolved = tokio::time::timeout(timeout, crate::upstream::resolve(name, port, 1))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let ntp_server_error = |source| KeError::NtpServer {
                name: name.clone(),
                source,
            };
            match resolved.map_err(ntp_server_error)?.first() {
                Some(address) => address.ip(),
                None => return Err(ntp_server_error(std::io::ErrorKind::NotFound.into())),
            }
        }
    };
    Ok(NtsSession {
        address: SocketAddr::new(ip, port),
        jar: CookieJar::new(exchange.keys, exchange.agreement.cookies),
    })
}

/// Trust anchors from PEM text (the TimeService's `spec.nts.caBundle`); `origin` names it in
/// errors.
pub fn roots_from_pem(pem: &[u8], origin: &str) -> Result<RootCertStore, TrustError> {
    let bundle_error = |reason: String| TrustError::Bundle {
        path: origin.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bundle_error(e.to_string()))?;
        roots.add(cert).map_err(|e| bundle_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TrustError::EmptyBundle(origin.to_owned()));
    }
    Ok(roots)
}

/// Trust anchors from a PEM file.
pub fn roots_from_pem_file(path: &Path) -> Result<RootCertStore, TrustError> {
    let pem = std::fs::read(path).map_err(|e| TrustError::Bundle {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    roots_from_pem(&pem, &path.display().to_string())
}

/// The TLS client configuration NTS-KE needs: TLS 1.3 only (RFC 8915 §3), ALPN `ntske/1`.
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Runs one key exchange with `host:port`, all of it within `timeout`.
pub async fn key_exchange(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> Result<KeyExchange, KeError> {
    tokio::time::timeout(timeout, exchange(host, port, config))
        .await
        .map_err(|_| KeError::Timeout(timeout))?
}

async fn exchange(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> Result<KeyExchange, KeError> {
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| KeError::ServerName(host.to_owned()))?;
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|source| KeError::Connect {
            host: host.to_owned(),
            port,
            source,
        })?;
    let ke_peer = tcp.peer_addr().map_err(|source| KeError::Connect {
        host: host.to_owned(),
        port,
        source,
    })?;
    let tls_error = |source| KeError::Tls {
        host: host.to_owned(),
        port,
        source,
    };
    let mut tls = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(tls_error)?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(KeError::NoAlpn(format!("{host}:{port}")));
    }
    tls.write_all(&ke::client_request())
        .await
        .map_err(tls_error)?;
    tls.flush().await.map_err(tls_error)?;

    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let records = loop {
        if let Some((records, _)) = ke::decode_message(&buffer)? {
            break records;
        }
        let read = tls.read(&mut chunk).await.map_err(tls_error)?;
        if read == 0 {
            return Err(KeError::Truncated);
        }
        // decode_message refuses anything past MAX_MESSAGE_LEN, so the buffer stays bounded.
        buffer.extend_from_slice(&chunk[..read.min(MAX_MESSAGE_LEN)]);
    };
    let agreement = ke::client_agreement(&records)?;

    let connection = tls.get_ref().1;
    let export = |server_to_client| -> Result<AeadKey, KeError> {
        let mut key = [0u8; KEY_LEN];
        connection
            .export_keying_material(
                &mut key,
                EXPORTER_LABEL,
                Some(&ke::exporter_context(agreement.aead, server_to_client)),
            )
            .map_err(KeError::Export)?;
        Ok(AeadKey::from_bytes(key))
    };
    let keys = SessionKeys {
        c2s: export(false)?,
        s2c: export(true)?,
    };
    // A clean close; the server closes too, and nothing more is read.
    let _ = tls.shutdown().await;
    Ok(KeyExchange {
        agreement,
        keys,
        ke_peer,
    })
}
