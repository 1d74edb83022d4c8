//! The tenants' NTS-KE endpoints (RFC 8915 §4) and the TimeService's cookie master keys.
//!
//! Each tenant with `nts` gets a TLS 1.3 listener (ALPN `ntske/1`) on its `nts.kePort`, with
//! the certificate and key files the config names. A connection passes three gates before any
//! TLS work: the tenant's own deny and allow lists (the policy its NTP port runs, so the two
//! never disagree), a handshake budget per endpoint, and a bound on concurrent sessions; the
//! whole exchange then has a deadline. The answer carries cookies sealed with the
//! TimeService's master keys bound to the tenant ([`CookieKeys::bound_to`]), the NTP server
//! name and port the config names (the tenant's Service), or the KE host and 123.
//!
//! The master keys come from a file (the Secret the operator manages, mounted), read again
//! when it changes: the current key seals, the current and the previous open, so a rotation
//! never cuts off a client that holds cookies from just before it, and the next one opens
//! too, so an agent that reads the rotated file later than another still opens its cookies. Until the file is read,
//! key exchanges are refused with an internal-error record and NTS requests get the NAK;
//! nothing is ever served unauthenticated in their place.
//!
//! Key material stays out of logs: [`stratum_ntp::nts::AeadKey`] never prints its bytes, and
//! the errors here name files, never their contents.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use stratum_api::agent_config::{ServingConfig, TenantNtsConfig};
use stratum_ntp::nts::aead::KEY_LEN;
use stratum_ntp::nts::ke::{
    self, ALPN, COOKIES_PER_EXCHANGE, EXPORTER_LABEL, MAX_MESSAGE_LEN, Negotiation, Record,
    error_code,
};
use stratum_ntp::nts::{AeadKey, CookieKeys, MasterKey, SessionKeys};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::agent::Shared;

/// Whole key exchange, TLS handshake included: a client that stalls loses its slot.
pub const KE_DEADLINE: Duration = Duration::from_secs(5);
/// Concurrent key exchanges per endpoint.
pub const MAX_SESSIONS: usize = 64;
/// Sustained handshakes per second per endpoint (each costs a TLS handshake and 8 seals), and
/// the burst above it. A client needs one per rotation period, or on a NAK.
pub const HANDSHAKES_PER_SECOND: f64 = 100.0;
/// See [`HANDSHAKES_PER_SECOND`].
pub const HANDSHAKE_BURST: f64 = 200.0;
/// How often the key and certificate files are checked for a change.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The cookie key file as the operator writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    current: KeyEntry,
    #[serde(default)]
    previous: Option<KeyEntry>,
    /// The key the coming rotation makes current: opens, never seals (see
    /// [`CookieKeys::with_next`]).
    #[serde(default)]
    next: Option<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u32,
    /// 32 bytes, hex.
    key: String,
}

/// Why a key or certificate file is not usable. Names the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum NtsFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cookie key file ({reason})")]
    Keys { path: String, reason: String },
    #[error("{path}: {reason}")]
    Certificate { path: String, reason: String },
}

/// Parses a cookie key file: `{"current": {"id": N, "key": "<64 hex>"}, "previous": {...},
/// "next": {...}}`; `previous` and `next` are optional.
pub fn parse_cookie_keys(text: &[u8], path: &str) -> Result<CookieKeys, NtsFileError> {
    let bad = |reason: String| NtsFileError::Keys {
        path: path.to_owned(),
        reason,
    };
    // serde's message may quote the input; say only where it broke.
    let file: KeyFile = serde_json::from_slice(text).map_err(|e| {
        bad(format!(
            "invalid JSON at line {} column {}",
            e.line(),
            e.column()
        ))
    })?;
    let master = |entry: &KeyEntry, which: &str| -> Result<MasterKey, NtsFileError> {
        let key = decode_key(&entry.key)
            .ok_or_else(|| bad(format!("{which}.key must be {} hex digits", 2 * KEY_LEN)))?;
        Ok(MasterKey {
            id: entry.id,
            key: AeadKey::from_bytes(key),
        })
    };
    let current = master(&file.current, "current")?;
    let previous = file
        .previous
        .as_ref()
        .map(|p| master(p, "previous"))
        .transpose()?;
    let next = file.next.as_ref().map(|n| master(n, "next")).transpose()?;
    Ok(CookieKeys::new(current, previous).with_next(next))
}

fn decode_key(hex: &str) -> Option<[u8; KEY_LEN]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 2 * KEY_LEN {
        return None;
    }
    let mut key = [0u8; KEY_LEN];
    for (byte, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(key)
}

/// The TLS configuration of an endpoint: TLS 1.3 only, ALPN `ntske/1`, the chain and key from
/// PEM files.
pub fn server_tls(certificate: &Path, key: &Path) -> Result<Arc<ServerConfig>, NtsFileError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| NtsFileError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let cert_error = |path: &Path, reason: String| NtsFileError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let chain_pem = read(certificate)?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(certificate, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error(certificate, "holds no certificate".into()));
    }
    let key_pem = read(key)?;
    // The parser's error never includes the key's bytes.
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| cert_error(key, "holds no PEM private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cert_error(certificate, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| cert_error(key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A token bucket for handshakes; refilled from a monotonic clock.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn full(now: Instant) -> Self {
        Self {
            tokens: HANDSHAKE_BURST,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * HANDSHAKES_PER_SECOND).min(HANDSHAKE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What one endpoint's tasks share.
struct Endpoint {
    tenant: String,
    /// The tenant's NTP port, whose policy gates the endpoint.
    ntp_port: u16,
    settings: TenantNtsConfig,
    tls: ArcSwap<ServerConfig>,
    /// Keys bound to the tenant, or `None` before the key file is read.
    keys: ArcSwap<Option<CookieKeys>>,
    budget: Mutex<Budget>,
    sessions: Arc<Semaphore>,
    shared: Arc<Shared>,
}

impl Endpoint {
    /// Counts one connection's `result` (a fixed label).
    fn count(&self, result: &str) {
        self.shared
            .metrics
            .tenant_nts_key_exchanges
            .with_label_values(&[self.tenant.as_str(), result])
            .inc();
    }
}

/// Why a key exchange at an endpoint ended without cookies. Labels are bounded.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("TLS: {0}")]
    Tls(io::Error),
    #[error("the client did not offer ALPN ntske/1")]
    Alpn,
    #[error("request refused by the negotiation")]
    BadRequest,
    #[error("no cookie keys loaded")]
    NoKeys,
    #[error("exporting the session keys: {0}")]
    Export(rustls::Error),
    #[error("{0}")]
    Io(io::Error),
}

impl ServeError {
    fn label(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls",
            Self::Alpn => "alpn",
            Self::BadRequest => "bad_request",
            Self::NoKeys => "no_keys",
            Self::Export(_) | Self::Io(_) => "io",
        }
    }
}

struct Running {
    endpoint: Arc<Endpoint>,
    accept: JoinHandle<()>,
    /// Modification times of the certificate and key when last read.
    files_seen: (Option<FileStamp>, Option<FileStamp>),
}

/// Every NTS-KE endpoint of the agent and the cookie key file; driven by the run loop.
pub struct NtsEndpoints {
    shared: Arc<Shared>,
    /// The bind address of the NTP server (`::` serves both families).
    bind: IpAddr,
    running: BTreeMap<u16, Running>,
    /// Endpoints that could not start, by KE port, and why: retried on every refresh.
    failed: BTreeMap<u16, String>,
    wanted: BTreeMap<u16, (String, u16, TenantNtsConfig)>,
    keys_file: Option<PathBuf>,
    keys_seen: Option<FileStamp>,
    keys: Option<CookieKeys>,
    last_check: Option<Instant>,
}

impl NtsEndpoints {
    /// No endpoints until [`Self::apply`].
    pub fn new(shared: Arc<Shared>) -> Self {
        let bind = shared.server.options().bind;
        Self {
            shared,
            bind,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            wanted: BTreeMap::new(),
            keys_file: None,
            keys_seen: None,
            keys: None,
            last_check: None,
        }
    }

    /// Brings the endpoints in line with `serving`: starts new ones, stops removed ones,
    /// restarts those whose settings changed, and reads the key file if it is new.
    pub fn apply(&mut self, serving: &ServingConfig) {
        self.wanted = serving
            .tenants
            .iter()
            .filter_map(|t| {
                t.nts
                    .as_ref()
                    .map(|nts| (nts.ke_port, (t.id.clone(), t.port, nts.clone())))
            })
            .collect();
        let keys_file = serving.nts_cookie_keys_file.as_ref().map(PathBuf::from);
        if keys_file != self.keys_file {
            self.keys_file = keys_file;
            self.keys_seen = None;
            self.reload_keys(serving);
        }
        self.running.retain(|port, running| {
            let keep = self
                .wanted
                .get(port)
                .is_some_and(|(id, ntp_port, settings)| {
                    running.endpoint.tenant == *id
                        && running.endpoint.ntp_port == *ntp_port
                        && running.endpoint.settings == *settings
                });
            if !keep {
                running.accept.abort();
                tracing::info!(port, tenant = %running.endpoint.tenant, "NTS-KE endpoint stopped");
            }
            keep
        });
        self.failed.retain(|port, _| self.wanted.contains_key(port));
        self.start_missing();
    }

    /// Run-loop housekeeping, at most every [`FILE_CHECK_INTERVAL`]: a changed key file is
    /// read and put in force on the NTP ports of `serving` (the config in force) too; a
    /// changed certificate is loaded for new connections; endpoints that failed to start are
    /// tried again.
    pub fn refresh(&mut self, serving: &ServingConfig) {
        let now = Instant::now();
        if self
            .last_check
            .is_some_and(|at| now.duration_since(at) < FILE_CHECK_INTERVAL)
        {
            return;
        }
        self.last_check = Some(now);
        self.check_files(serving);
    }

    /// [`Self::refresh`] now, whenever it last ran.
    pub fn check_files(&mut self, serving: &ServingConfig) {
        if let Some(path) = &self.keys_file
            && modified(path) != self.keys_seen
        {
            self.reload_keys(serving);
        }
        for (port, running) in &mut self.running {
            let settings = &running.endpoint.settings;
            let seen = (
                modified(Path::new(&settings.certificate_file)),
                modified(Path::new(&settings.key_file)),
            );
            if seen == running.files_seen {
                continue;
            }
            match server_tls(
                Path::new(&settings.certificate_file),
                Path::new(&settings.key_file),
            ) {
                Ok(tls) => {
                    running.endpoint.tls.store(tls);
                    running.files_seen = seen;
                    tracing::info!(port, tenant = %running.endpoint.tenant, "NTS-KE certificate reloaded");
                }
                // The old certificate keeps serving until a good pair is in place.
                Err(e) => {
                    tracing::warn!(port, tenant = %running.endpoint.tenant, error = %e, "NTS-KE certificate not reloaded")
                }
            }
        }
        if !self.failed.is_empty() {
            self.start_missing();
        }
    }

    /// Endpoints that could not start (bind or certificate), by KE port.
    pub fn failed(&self) -> &BTreeMap<u16, String> {
        &self.failed
    }

    /// Stops every endpoint.
    pub fn stop_all(&mut self) {
        for running in std::mem::take(&mut self.running).into_values() {
            running.accept.abort();
        }
    }

    fn reload_keys(&mut self, serving: &ServingConfig) {
        let keys = match &self.keys_file {
            None => None,
            Some(path) => {
                self.keys_seen = modified(path);
                match std::fs::read(path)
                    .map_err(|source| NtsFileError::Read {
                        path: path.display().to_string(),
                        source,
                    })
                    .and_then(|text| parse_cookie_keys(&text, &path.display().to_string()))
                {
                    Ok(keys) => {
                        tracing::info!(current = keys.current_id(), previous = ?keys.previous_id(), next = ?keys.next_id(), "NTS cookie keys loaded");
                        Some(keys)
                    }
                    Err(e) => {
                        // Keep what was in force: a half-written file must not end every
                        // session. Without keys yet, NTS clients get NAKs until it reads.
                        tracing::warn!(error = %e, "NTS cookie keys not loaded");
                        self.keys.clone()
                    }
                }
            }
        };
        if keys == self.keys {
            return;
        }
        self.keys = keys;
        self.shared
            .metrics
            .nts_cookie_keys_loaded
            .set(i64::from(self.keys.is_some()));
        self.shared
            .metrics
            .nts_cookie_key_id
            .set(self.keys.as_ref().map_or(0, |k| i64::from(k.current_id())));
        self.shared
            .server
            .set_cookie_keys(self.keys.clone(), serving);
        for running in self.running.values() {
            running.endpoint.keys.store(Arc::new(
                self.keys
                    .as_ref()
                    .map(|k| k.bound_to(running.endpoint.tenant.as_bytes())),
            ));
        }
    }

    fn start_missing(&mut self) {
        let missing: Vec<u16> = self
            .wanted
            .keys()
            .filter(|port| !self.running.contains_key(port))
            .copied()
            .collect();
        for port in missing {
            let Some((tenant, ntp_port, settings)) = self.wanted.get(&port).cloned() else {
                continue;
            };
            match self.start(port, &tenant, ntp_port, settings) {
                Ok(running) => {
                    tracing::info!(port, %tenant, "NTS-KE endpoint serving");
                    self.failed.remove(&port);
                    self.running.insert(port, running);
                }
                Err(e) => {
                    if self.failed.get(&port) != Some(&e) {
                        tracing::warn!(port, %tenant, error = %e, "NTS-KE endpoint not started; retrying");
                    }
                    self.failed.insert(port, e);
                }
            }
        }
    }

    fn start(
        &self,
        port: u16,
        tenant: &str,
        ntp_port: u16,
        settings: TenantNtsConfig,
    ) -> Result<Running, String> {
        let files_seen = (
            modified(Path::new(&settings.certificate_file)),
            modified(Path::new(&settings.key_file)),
        );
        let tls = server_tls(
            Path::new(&settings.certificate_file),
            Path::new(&settings.key_file),
        )
        .map_err(|e| e.to_string())?;
        let listener = bind_tcp(SocketAddr::new(self.bind, port))
            .map_err(|e| format!("binding TCP port {port}: {e}"))?;
        let endpoint = Arc::new(Endpoint {
            tenant: tenant.to_owned(),
            ntp_port,
            settings,
            tls: ArcSwap::new(tls),
            keys: ArcSwap::from_pointee(self.keys.as_ref().map(|k| k.bound_to(tenant.as_bytes()))),
            budget: Mutex::new(Budget::full(Instant::now())),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
            shared: self.shared.clone(),
        });
        let accept = tokio::spawn(accept_loop(listener, endpoint.clone()));
        Ok(Running {
            endpoint,
            accept,
            files_seen,
        })
    }
}

impl Drop for NtsEndpoints {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What tells one revision of a file from the next: its modification time, inode and length.
/// Secret volumes swap a symlink to a new directory, and metadata follows the link, so a new
/// revision shows even within the file system's timestamp granularity.
type FileStamp = (SystemTime, u64, u64);

fn modified(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.ino(), metadata.len()))
}

/// A listening TCP socket on `addr`; on `::` it takes IPv4 clients too.
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(tenant = %endpoint.tenant, error = %e, "NTS-KE accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // The gates, cheapest first; a refused connection is closed without a TLS byte.
        if !endpoint.shared.server.allowed(endpoint.ntp_port, peer.ip()) {
            endpoint.count("not_allowed");
            continue;
        }
        let within_budget = endpoint
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        if !within_budget {
            endpoint.count("rate_limited");
            continue;
        }
        let Ok(permit) = endpoint.sessions.clone().try_acquire_owned() else {
            endpoint.count("busy");
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(KE_DEADLINE, exchange(stream, &endpoint)).await
            {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => {
                    tracing::debug!(tenant = %endpoint.tenant, %peer, error = %e, "NTS-KE exchange failed");
                    e.label()
                }
                Err(_) => "timeout",
            };
            // The slot is free before the end is counted: whoever sees the count (a test, a
            // dashboard) may rely on the session bound having room again.
            drop(permit);
            endpoint.count(result);
        });
    }
}

async fn exchange(stream: TcpStream, endpoint: &Endpoint) -> Result<(), ServeError> {
    let _ = stream.set_nodelay(true);
    let acceptor = TlsAcceptor::from(endpoint.tls.load_full());
    let mut tls = acceptor.accept(stream).await.map_err(ServeError::Tls)?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        return Err(ServeError::Alpn);
    }
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let records = loop {
        match ke::decode_message(&buffer) {
            Ok(Some((records, _))) => break records,
            Ok(None) => {}
            Err(_) => {
                send(
                    &mut tls,
                    &[Record::Error(error_code::BAD_REQUEST), Record::EndOfMessage],
                )
                .await?;
                return Err(ServeError::BadRequest);
            }
        }
        let read = tls.read(&mut chunk).await.map_err(ServeError::Io)?;
        if read == 0 {
            return Err(ServeError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        // decode_message refuses anything past MAX_MESSAGE_LEN, so this stays bounded.
        buffer.extend_from_slice(&chunk[..read.min(MAX_MESSAGE_LEN)]);
    };
    let aead = match ke::server_negotiate(&records) {
        Negotiation::Agreed { aead } => aead,
        Negotiation::Refused(answer) => {
            send(&mut tls, &answer).await?;
            return Err(ServeError::BadRequest);
        }
    };
    let keys = endpoint.keys.load_full();
    let Some(cookie_keys) = keys.as_ref() else {
        send(
            &mut tls,
            &[
                Record::Error(error_code::INTERNAL_SERVER_ERROR),
                Record::EndOfMessage,
            ],
        )
        .await?;
        return Err(ServeError::NoKeys);
    };
    let connection = tls.get_ref().1;
    let export = |server_to_client| -> Result<AeadKey, ServeError> {
        let mut key = [0u8; KEY_LEN];
        connection
            .export_keying_material(
                &mut key,
                EXPORTER_LABEL,
                Some(&ke::exporter_context(aead, server_to_client)),
            )
            .map_err(ServeError::Export)?;
        Ok(AeadKey::from_bytes(key))
    };
    let session = SessionKeys {
        c2s: export(false)?,
        s2c: export(true)?,
    };
    let cookies = {
        let mut rng = rand::rng();
        (0..COOKIES_PER_EXCHANGE)
            .map(|_| cookie_keys.seal(&session, &mut rng))
            .collect()
    };
    let settings = &endpoint.settings;
    let answer = ke::server_response(
        aead,
        cookies,
        settings.ntp_server.as_deref(),
        settings.ntp_port,
    );
    tls.write_all(&answer).await.map_err(ServeError::Io)?;
    tls.flush().await.map_err(ServeError::Io)?;
    let _ = tls.shutdown().await;
    Ok(())
}

async fn send(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    records: &[Record],
) -> Result<(), ServeError> {
    tls.write_all(&ke::encode_message(records))
        .await
        .map_err(ServeError::Io)?;
    let _ = tls.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_key_file_with_current_and_previous_parses_and_errors_never_show_the_key() {
        let text = format!(
            r#"{{"current": {{"id": 7, "key": "{KEY_A}"}}, "previous": {{"id": 6, "key": "{}"}}}}"#,
            "ff".repeat(32)
        );
        let keys = parse_cookie_keys(text.as_bytes(), "/keys/cookie-keys.json").unwrap();
        assert_eq!((keys.current_id(), keys.previous_id()), (7, Some(6)));
        assert_eq!(keys.next_id(), None);
        let with_next = format!(
            r#"{{"current": {{"id": 7, "key": "{KEY_A}"}}, "next": {{"id": 8, "key": "{}"}}}}"#,
            "ee".repeat(32)
        );
        let keys = parse_cookie_keys(with_next.as_bytes(), "f").unwrap();
        assert_eq!((keys.current_id(), keys.next_id()), (7, Some(8)));
        let bad_next = format!(
            r#"{{"current": {{"id": 7, "key": "{KEY_A}"}}, "next": {{"id": 8, "key": "ee"}}}}"#
        );
        let error = parse_cookie_keys(bad_next.as_bytes(), "f").unwrap_err();
        assert!(error.to_string().contains("next.key"), "{error}");
        let only_current = format!(r#"{{"current": {{"id": 1, "key": "{KEY_A}"}}}}"#);
        assert_eq!(
            parse_cookie_keys(only_current.as_bytes(), "f")
                .unwrap()
                .previous_id(),
            None
        );
        // A short key, a non-hex digit, an unknown field, not JSON: refused, and the message
        // names the file and the field but never repeats the key material.
        let short = r#"{"current": {"id": 1, "key": "0011223344"}}"#;
        let bad_digit = format!(r#"{{"current": {{"id": 1, "key": "zz{}"}}}}"#, &KEY_A[2..]);
        let unknown = format!(r#"{{"current": {{"id": 1, "key": "{KEY_A}", "x": 1}}}}"#);
        for text in [short, &bad_digit, &unknown, "not json"] {
            let error = parse_cookie_keys(text.as_bytes(), "/keys/k.json")
                .unwrap_err()
                .to_string();
            assert!(error.contains("/keys/k.json"), "{error}");
            assert!(
                !error.contains("0011223344") && !error.contains(&KEY_A[2..]),
                "{error}"
            );
        }
    }

    #[test]
    fn the_handshake_budget_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut budget = Budget::full(start);
        let burst = (0..1000).filter(|_| budget.take(start)).count();
        assert_eq!(burst, HANDSHAKE_BURST as usize);
        let later = start + Duration::from_millis(100);
        let refilled = (0..1000).filter(|_| budget.take(later)).count();
        assert_eq!(refilled, (HANDSHAKES_PER_SECOND / 10.0) as usize);
    }
}
