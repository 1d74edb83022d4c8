//! The key material of a TimeService's agents: one Secret in the operator's namespace
//! (`<ts>-agent-nts`), mounted by every agent, holding the NTS cookie master keys the operator
//! generates and rotates, a copy of each NTS tenant's certificate and key, and each
//! symmetric-key tenant's keys (checked and rewritten in one spelling). Agents never read
//! tenant namespaces; the operator reads each tenant's Secrets by the names its
//! TenantTimePolicy gives and copies what checks out.
//!
//! Everything here is pure: the controller reads the Secrets, passes them in with the time
//! and a source of fresh keys, and applies what comes out. Key material stays out of every
//! message: problems name Secrets and members, never their contents, and [`CookieKeyFile`]
//! does not print its keys.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rustls_pki_types::pem::SectionKind;
use serde::{Deserialize, Serialize};
use stratum_api::TimeService;
use stratum_api::agent_config::{
    NTS_COOKIE_KEYS_KEY, nts_certificate_key, nts_private_key_key, symmetric_keys_key,
    upstream_keys_key,
};
use stratum_ntp::symmetric::{KeyFileError, SymmetricKeys};

use super::{OperatorSettings, agent_meta};
use crate::error::{Error, Result};
use crate::names;
use crate::ports::TenantKey;

/// The Secret type cert-manager and `kubectl create secret tls` write.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// Member of a TLS Secret holding the certificate chain.
pub const TLS_CERT: &str = "tls.crt";
/// Member of a TLS Secret holding the private key.
pub const TLS_KEY: &str = "tls.key";
/// Largest certificate chain plus key copied for one tenant: an RSA-4096 chain of three with
/// its key is about 10 KiB.
pub const MAX_TENANT_MATERIAL_BYTES: usize = 32 * 1024;
/// Largest total copied into the Secret: the API server takes objects up to about 1.5 MiB
/// and a Secret's data travels base64-encoded (4/3), so this leaves room to spare.
pub const MAX_SECRET_MATERIAL_BYTES: usize = 700 * 1024;
/// Annotation on the Secret: when the cookie keys last rotated (RFC 3339).
pub const ROTATED_AT_ANNOTATION: &str = "stratum.io/cookie-keys-rotated-at";
/// Annotation on a TimeService asking for a cookie key rotation now: any value the operator
/// has not yet acted on (the time is the usual one, as `kubectl rollout restart` writes).
pub const ROTATE_REQUEST_ANNOTATION: &str = "stratum.io/rotate-cookie-keys";
/// Annotation on the Secret: the value of [`ROTATE_REQUEST_ANNOTATION`] last acted on, so that
/// one request rotates once however often the TimeService is reconciled.
pub const ROTATE_REQUEST_SEEN_ANNOTATION: &str = "stratum.io/cookie-keys-rotate-request";
/// The least time between a rotation and one on request. A rotation makes current the key
/// published at the rotation before it, and agents hold a new key only after the kubelet's
/// next Secret volume refresh (about a minute): sooner, some agents would get cookies they
/// cannot open yet.
pub const ROTATION_REQUEST_SPACING: Duration = Duration::from_secs(120);
/// Length of an AES-SIV-CMAC-256 master key.
pub const COOKIE_KEY_LEN: usize = 32;
/// Member of a tenant's symmetric key Secret holding its key file.
pub const KEYS_MEMBER: &str = "keys";

/// Why a symmetric-key tenant's devices get no authenticated time. Each is the tenant's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysProblem {
    /// The Secret does not exist.
    Missing { secret: String },
    /// The operator may not read it.
    Forbidden { secret: String },
    /// It has no `keys` member, or an empty one.
    MissingMember { secret: String },
    /// The key file does not read (the line and why; never a key).
    Invalid { secret: String, error: KeyFileError },
    /// The key file is over [`MAX_TENANT_MATERIAL_BYTES`].
    TooLarge { secret: String, bytes: usize },
    /// Older tenants' material fills the Secret (see [`MAX_SECRET_MATERIAL_BYTES`]).
    NoRoom { secret: String },
    /// An upstream names a key id the file does not have.
    MissingKeyId { secret: String, id: u32 },
}

impl KeysProblem {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "KeysSecretMissing",
            Self::Forbidden { .. } => "KeysSecretForbidden",
            Self::MissingMember { .. } | Self::Invalid { .. } => "KeysSecretInvalid",
            Self::TooLarge { .. } => "KeysTooLarge",
            Self::NoRoom { .. } => "KeyMaterialFull",
            Self::MissingKeyId { .. } => "KeyIdMissing",
        }
    }
}

impl fmt::Display for KeysProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { secret } => write!(
                f,
                "Secret {secret} does not exist in this namespace; create it with a `{KEYS_MEMBER}` \
                 member holding the key file"
            ),
            Self::Forbidden { secret } => write!(
                f,
                "the operator may not read Secret {secret}; its ClusterRole needs get on secrets"
            ),
            Self::MissingMember { secret } => {
                write!(f, "Secret {secret} has no {KEYS_MEMBER} (or it is empty)")
            }
            Self::Invalid { secret, error } => {
                write!(f, "Secret {secret}: {KEYS_MEMBER}: {error}")
            }
            Self::TooLarge { secret, bytes } => write!(
                f,
                "Secret {secret}: the key file is {bytes} bytes, over the limit of \
                 {MAX_TENANT_MATERIAL_BYTES}"
            ),
            Self::NoRoom { secret } => write!(
                f,
                "Secret {secret} is not distributed: the key material of older tenants of this \
                 TimeService fills its key material Secret ({MAX_SECRET_MATERIAL_BYTES} bytes)"
            ),
            Self::MissingKeyId { secret, id } => {
                write!(f, "Secret {secret}: {KEYS_MEMBER} has no key {id}")
            }
        }
    }
}

/// A tenant's symmetric keys as copied to the agents: checked, and written in one spelling
/// (`ID TYPE HEX:...`). Debug shows the ids' count, never a key.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantKeys {
    file: String,
    keys: usize,
    legacy: usize,
    ids: Vec<u32>,
}

impl fmt::Debug for TenantKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKeys")
            .field("keys", &self.keys)
            .field("legacy", &self.legacy)
            .finish_non_exhaustive()
    }
}

impl TenantKeys {
    /// How many keys, and how many of them SHA1 or MD5.
    pub fn counts(&self) -> (usize, usize) {
        (self.keys, self.legacy)
    }
}

/// Checks a tenant's symmetric key Secret named `name` (`None`: it does not exist): its
/// `keys` member must be a key file that reads (see [`stratum_ntp::symmetric`]) within
/// [`MAX_TENANT_MATERIAL_BYTES`].
pub fn check_symmetric_keys(
    name: &str,
    secret: Option<&Secret>,
) -> std::result::Result<TenantKeys, KeysProblem> {
    let secret_name = name.to_owned();
    let Some(secret) = secret else {
        return Err(KeysProblem::Missing {
            secret: secret_name,
        });
    };
    let Some(text) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEYS_MEMBER))
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
    else {
        return Err(KeysProblem::MissingMember {
            secret: secret_name,
        });
    };
    if text.len() > MAX_TENANT_MATERIAL_BYTES {
        return Err(KeysProblem::TooLarge {
            secret: secret_name,
            bytes: text.len(),
        });
    }
    let keys = std::str::from_utf8(text)
        .map_err(|_| KeyFileError::Shape { line: 1 })
        .and_then(SymmetricKeys::parse)
        .map_err(|error| KeysProblem::Invalid {
            secret: secret_name,
            error,
        })?;
    Ok(TenantKeys {
        file: keys.to_key_file(),
        keys: keys.len(),
        legacy: keys.algorithms().filter(|(_, a)| a.is_legacy()).count(),
        ids: keys.algorithms().map(|(id, _)| id).collect(),
    })
}

/// Why an NTS tenant's key exchange has no certificate. Each is the tenant's own: the others'
/// endpoints and the cookie keys are unaffected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateProblem {
    /// The Secret does not exist (yet: cert-manager may still be issuing).
    Missing { secret: String },
    /// The operator may not read it.
    Forbidden { secret: String },
    /// It is not a `kubernetes.io/tls` Secret.
    WrongType { secret: String, found: String },
    /// A member is absent or empty.
    MissingMember {
        secret: String,
        member: &'static str,
    },
    /// A member holds no PEM of the kind it should.
    NotPem {
        secret: String,
        member: &'static str,
    },
    /// Chain and key together are over [`MAX_TENANT_MATERIAL_BYTES`].
    TooLarge { secret: String, bytes: usize },
    /// Older tenants' certificates fill the Secret (see [`MAX_SECRET_MATERIAL_BYTES`]).
    NoRoom { secret: String },
}

impl CertificateProblem {
    /// Condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "CertificateSecretMissing",
            Self::Forbidden { .. } => "CertificateSecretForbidden",
            Self::WrongType { .. } | Self::MissingMember { .. } | Self::NotPem { .. } => {
                "CertificateSecretInvalid"
            }
            Self::TooLarge { .. } => "CertificateTooLarge",
            Self::NoRoom { .. } => "KeyMaterialFull",
        }
    }
}

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { secret } => write!(
                f,
                "Secret {secret} does not exist in this namespace; create it (a cert-manager \
                 Certificate, or kubectl create secret tls) and the key exchange starts"
            ),
            Self::Forbidden { secret } => write!(
                f,
                "the operator may not read Secret {secret}; its ClusterRole needs get on secrets"
            ),
            Self::WrongType { secret, found } => write!(
                f,
                "Secret {secret} has type {found:?}; the key exchange needs a {TLS_SECRET_TYPE} \
                 Secret"
            ),
            Self::MissingMember { secret, member } => {
                write!(f, "Secret {secret} has no {member} (or it is empty)")
            }
            Self::NotPem { secret, member } => write!(
                f,
                "Secret {secret}: {member} holds no PEM {}",
                if *member == TLS_CERT {
                    "certificate"
                } else {
                    "private key"
                }
            ),
            Self::TooLarge { secret, bytes } => write!(
                f,
                "Secret {secret}: certificate chain and key are {bytes} bytes, over the limit of \
                 {MAX_TENANT_MATERIAL_BYTES}"
            ),
            Self::NoRoom { secret } => write!(
                f,
                "Secret {secret} is not distributed: the certificates of older NTS tenants of \
                 this TimeService fill its key material Secret ({MAX_SECRET_MATERIAL_BYTES} bytes)"
            ),
        }
    }
}

/// A tenant's certificate chain and key as copied to the agents. Debug never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantCertificate {
    chain: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for TenantCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantCertificate")
            .field("chain_bytes", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TenantCertificate {
    fn bytes(&self) -> usize {
        self.chain.len() + self.key.len()
    }
}

/// Checks a tenant's Secret named `name` (`None`: it does not exist) and takes its chain and
/// key: a `kubernetes.io/tls` Secret whose `tls.crt` holds PEM certificates and whose
/// `tls.key` a PEM private key, both within [`MAX_TENANT_MATERIAL_BYTES`]. Whether key and
/// certificate match is for the agent's TLS stack to say (it refuses that tenant's endpoint
/// alone).
pub fn check_certificate(
    name: &str,
    secret: Option<&Secret>,
) -> std::result::Result<TenantCertificate, CertificateProblem> {
    let secret_name = name.to_owned();
    let Some(secret) = secret else {
        return Err(CertificateProblem::Missing {
            secret: secret_name,
        });
    };
    let found = secret.type_.as_deref().unwrap_or("Opaque");
    if found != TLS_SECRET_TYPE {
        return Err(CertificateProblem::WrongType {
            secret: secret_name,
            found: found.to_owned(),
        });
    }
    let member = |member: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(member))
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| CertificateProblem::MissingMember {
                secret: name.to_owned(),
                member,
            })
    };
    let (chain, key) = (member(TLS_CERT)?, member(TLS_KEY)?);
    let bytes = chain.len() + key.len();
    if bytes > MAX_TENANT_MATERIAL_BYTES {
        return Err(CertificateProblem::TooLarge {
            secret: secret_name,
            bytes,
        });
    }
    if !has_pem(chain, |k| k == SectionKind::Certificate) {
        return Err(CertificateProblem::NotPem {
            secret: secret_name,
            member: TLS_CERT,
        });
    }
    let is_key = |k| {
        matches!(
            k,
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
        )
    };
    if !has_pem(key, is_key) {
        return Err(CertificateProblem::NotPem {
            secret: secret_name,
            member: TLS_KEY,
        });
    }
    Ok(TenantCertificate {
        chain: chain.to_vec(),
        key: key.to_vec(),
    })
}

fn has_pem(bytes: &[u8], wanted: impl Fn(SectionKind) -> bool) -> bool {
    let mut reader = bytes;
    std::iter::from_fn(|| rustls_pki_types::pem::from_buf(&mut reader).transpose())
        .take(64)
        .any(|section| matches!(section, Ok((kind, _)) if wanted(kind)))
}

/// One master key as the agents read it: an id and 32 bytes in hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieKey {
    pub id: u32,
    key: String,
}

impl CookieKey {
    fn new(id: u32, key: [u8; COOKIE_KEY_LEN]) -> Self {
        Self {
            id,
            key: key.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    fn is_well_formed(&self) -> bool {
        self.key.len() == 2 * COOKIE_KEY_LEN && self.key.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CookieKey {{ id: {}, key: <redacted> }}", self.id)
    }
}

/// The cookie key file (`cookie-keys.json`): the current key seals, all three open; `next`
/// becomes current at the next rotation, published a period ahead so that every agent holds
/// it before any seals with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CookieKeyFile {
    pub current: CookieKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<CookieKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<CookieKey>,
}

impl CookieKeyFile {
    /// Every key the file holds: current, previous, next.
    pub fn keys(&self) -> impl Iterator<Item = &CookieKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .chain(&self.next)
    }
}

/// The cookie keys to write and when they next rotate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieKeyPlan {
    pub file: CookieKeyFile,
    /// When `file.current` became current.
    pub rotated_at: Timestamp,
    /// Time left until the next rotation.
    pub rotate_in: Duration,
    /// Whether this plan rotated (or made the first keys): worth a log line.
    pub rotated: bool,
    /// The rotation request acted on, recorded on the Secret ([`ROTATE_REQUEST_SEEN_ANNOTATION`]).
    pub request_seen: Option<String>,
    /// Whether this plan rotated because of a request rather than its period.
    pub requested: bool,
    /// When a request not acted on yet, because the last rotation is too recent
    /// ([`ROTATION_REQUEST_SPACING`]), will be.
    pub request_waits_until: Option<Timestamp>,
}

/// The cookie keys after `now`: those in `existing` (the Secret as last written) while their
/// period runs, rotated once it is over or when `request` (the TimeService's
/// [`ROTATE_REQUEST_ANNOTATION`]) differs from the request last acted on, but never sooner
/// than [`ROTATION_REQUEST_SPACING`] after the last rotation (previous ← current ← next ←
/// fresh); fresh ones when there are none or they do not read. Key ids count up, so an agent
/// can tell keys apart. A request present when the first keys are made is taken as acted on:
/// there is nothing yet to rotate away from.
pub fn plan_cookie_keys(
    existing: Option<&Secret>,
    now: Timestamp,
    period: Duration,
    request: Option<&str>,
    fresh_key: &mut dyn FnMut() -> [u8; COOKIE_KEY_LEN],
) -> CookieKeyPlan {
    let period_signed = SignedDuration::try_from(period).unwrap_or(SignedDuration::MAX);
    let held = existing.and_then(|s| {
        let file: CookieKeyFile =
            serde_json::from_slice(&s.data.as_ref()?.get(NTS_COOKIE_KEYS_KEY)?.0).ok()?;
        let annotations = s.metadata.annotations.as_ref()?;
        let rotated_at: Timestamp = annotations.get(ROTATED_AT_ANNOTATION)?.parse().ok()?;
        let seen = annotations.get(ROTATE_REQUEST_SEEN_ANNOTATION).cloned();
        let well_formed = file.keys().all(CookieKey::is_well_formed);
        well_formed.then_some((file, rotated_at, seen))
    });
    let Some((file, rotated_at, seen)) = held else {
        let current = CookieKey::new(1, fresh_key());
        return CookieKeyPlan {
            file: CookieKeyFile {
                current,
                previous: None,
                next: Some(CookieKey::new(2, fresh_key())),
            },
            rotated_at: now,
            rotate_in: period,
            rotated: true,
            request_seen: request.map(str::to_owned),
            requested: false,
            request_waits_until: None,
        };
    };
    // A removed annotation is no request; the last one acted on stays recorded, so putting the
    // same value back does not rotate again.
    let requested = request.is_some_and(|r| seen.as_deref() != Some(r));
    let due = rotated_at.saturating_add(period_signed).unwrap_or(now);
    let spacing = SignedDuration::try_from(ROTATION_REQUEST_SPACING).unwrap_or(SignedDuration::MAX);
    let request_due = rotated_at.saturating_add(spacing).unwrap_or(now).min(due);
    let next_due = if requested { request_due } else { due };
    if now < next_due {
        return CookieKeyPlan {
            file,
            rotated_at,
            rotate_in: now.duration_until(next_due).unsigned_abs(),
            rotated: false,
            request_seen: seen,
            requested: false,
            request_waits_until: requested.then_some(next_due),
        };
    }
    // A rotated_at in the future (a clock step back) is not waited for: `now < due` holds
    // only until one period after it, never longer.
    let current = file
        .next
        .unwrap_or_else(|| CookieKey::new(file.current.id.wrapping_add(1), fresh_key()));
    let next = CookieKey::new(current.id.wrapping_add(1), fresh_key());
    CookieKeyPlan {
        file: CookieKeyFile {
            previous: Some(file.current),
            current,
            next: Some(next),
        },
        rotated_at: now,
        rotate_in: period,
        rotated: true,
        // A request pending when the period ends is served by that rotation.
        request_seen: if requested {
            request.map(str::to_owned)
        } else {
            seen
        },
        requested: requested && now < due,
        request_waits_until: None,
    }
}

/// Checks an upstream key Secret `name` in the operator's namespace as
/// [`check_symmetric_keys`] does, and that it holds every id in `ids` (those the TimeService's
/// upstreams name).
pub fn check_upstream_keys(
    name: &str,
    ids: &[u32],
    secret: Option<&Secret>,
) -> std::result::Result<TenantKeys, KeysProblem> {
    let keys = check_symmetric_keys(name, secret)?;
    match ids.iter().find(|id| !keys.ids.contains(id)) {
        Some(&id) => Err(KeysProblem::MissingKeyId {
            secret: name.to_owned(),
            id,
        }),
        None => Ok(keys),
    }
}

/// A tenant of the TimeService with key material: NTS, symmetric keys or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NtsTenant {
    pub key: TenantKey,
    /// Its port: names its members in the Secret.
    pub port: u16,
    /// Its `kubernetes.io/tls` Secret, in its namespace, when it has NTS.
    pub certificate_secret: Option<String>,
    /// Its symmetric key Secret, in its namespace, when it has one.
    pub keys_secret: Option<String>,
}

/// What the operator read of one tenant's Secrets.
#[derive(Debug)]
pub struct TenantMaterial {
    pub tenant: NtsTenant,
    /// The certificate, when the tenant has NTS.
    pub certificate: Option<std::result::Result<TenantCertificate, CertificateProblem>>,
    /// The symmetric keys, when the tenant has them.
    pub keys: Option<std::result::Result<TenantKeys, KeysProblem>>,
}

/// The Secret to apply and what became of each tenant's certificate and keys, and of each
/// upstream key Secret.
#[derive(Debug)]
pub struct NtsMaterial {
    pub secret: Secret,
    pub outcomes: BTreeMap<TenantKey, std::result::Result<(), CertificateProblem>>,
    pub key_outcomes: BTreeMap<TenantKey, std::result::Result<(), KeysProblem>>,
    pub upstream_outcomes: BTreeMap<String, std::result::Result<(), KeysProblem>>,
}

/// The key material Secret of `ts`: the cookie keys and the upstreams' keys (by Secret name;
/// the TimeService's own, so first), then tenants' certificates and keys in the order given
/// (oldest tenant first) while they fit [`MAX_SECRET_MATERIAL_BYTES`], so a newcomer can
/// never push out an older tenant's material.
pub fn build_nts_secret(
    ts: &TimeService,
    settings: &OperatorSettings,
    cookie_keys: &CookieKeyPlan,
    upstream_keys: Vec<(String, std::result::Result<TenantKeys, KeysProblem>)>,
    tenants: Vec<TenantMaterial>,
) -> Result<NtsMaterial> {
    let name = ts.metadata.name.clone().unwrap_or_default();
    let mut meta = agent_meta(ts, names::nts_secret_name(&name), Some(&settings.namespace))?;
    let mut annotations = BTreeMap::from([(
        ROTATED_AT_ANNOTATION.to_owned(),
        cookie_keys.rotated_at.to_string(),
    )]);
    if let Some(seen) = &cookie_keys.request_seen {
        annotations.insert(ROTATE_REQUEST_SEEN_ANNOTATION.to_owned(), seen.clone());
    }
    meta.annotations = Some(annotations);
    let mut data = BTreeMap::from([(
        NTS_COOKIE_KEYS_KEY.to_owned(),
        ByteString(
            serde_json::to_vec(&cookie_keys.file).map_err(|source| Error::Serialize {
                what: "the NTS cookie key file",
                source,
            })?,
        ),
    )]);
    let mut used = 0;
    let mut outcomes = BTreeMap::new();
    let mut key_outcomes = BTreeMap::new();
    let mut upstream_outcomes = BTreeMap::new();
    for (secret, keys) in upstream_keys {
        let outcome = keys.and_then(|k| {
            if used + k.file.len() > MAX_SECRET_MATERIAL_BYTES {
                return Err(KeysProblem::NoRoom {
                    secret: secret.clone(),
                });
            }
            used += k.file.len();
            data.insert(upstream_keys_key(&secret), ByteString(k.file.into_bytes()));
            Ok(())
        });
        upstream_outcomes.insert(secret, outcome);
    }
    for TenantMaterial {
        tenant,
        certificate,
        keys,
    } in tenants
    {
        if let Some(certificate) = certificate {
            let outcome = certificate.and_then(|c| {
                if used + c.bytes() > MAX_SECRET_MATERIAL_BYTES {
                    return Err(CertificateProblem::NoRoom {
                        secret: tenant.certificate_secret.clone().unwrap_or_default(),
                    });
                }
                used += c.bytes();
                data.insert(nts_certificate_key(tenant.port), ByteString(c.chain));
                data.insert(nts_private_key_key(tenant.port), ByteString(c.key));
                Ok(())
            });
            outcomes.insert(tenant.key.clone(), outcome);
        }
        if let Some(keys) = keys {
            let outcome = keys.and_then(|k| {
                if used + k.file.len() > MAX_SECRET_MATERIAL_BYTES {
                    return Err(KeysProblem::NoRoom {
                        secret: tenant.keys_secret.clone().unwrap_or_default(),
                    });
                }
                used += k.file.len();
                data.insert(
                    symmetric_keys_key(tenant.port),
                    ByteString(k.file.into_bytes()),
                );
                Ok(())
            });
            key_outcomes.insert(tenant.key.clone(), outcome);
        }
    }
    Ok(NtsMaterial {
        secret: Secret {
            metadata: meta,
            type_: Some("Opaque".into()),
            data: Some(data),
            immutable: Some(false),
            ..Secret::default()
        },
        outcomes,
        key_outcomes,
        upstream_outcomes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    // A real chain and key are not needed here: the checks read PEM framing, not DER.
    const CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUAA==\n-----END CERTIFICATE-----\n";
    const KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgE=\n-----END PRIVATE KEY-----\n";

    fn tls_secret(type_: &str, members: &[(&str, &[u8])]) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(
                members
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn good() -> Secret {
        tls_secret(
            TLS_SECRET_TYPE,
            &[(TLS_CERT, CERT.as_bytes()), (TLS_KEY, KEY.as_bytes())],
        )
    }

    #[test]
    fn a_tls_secret_with_pem_chain_and_key_is_taken_and_every_fault_is_named() {
        let cert = check_certificate("ntp-tls", Some(&good())).unwrap();
        assert_eq!(cert.chain, CERT.as_bytes());
        assert!(!format!("{cert:?}").contains("MIGH"), "Debug hides the key");

        let problem = |s: Option<&Secret>| check_certificate("ntp-tls", s).unwrap_err();
        assert_eq!(problem(None).reason(), "CertificateSecretMissing");
        let opaque = tls_secret(
            "Opaque",
            &[(TLS_CERT, CERT.as_bytes()), (TLS_KEY, KEY.as_bytes())],
        );
        assert_eq!(
            problem(Some(&opaque)),
            CertificateProblem::WrongType {
                secret: "ntp-tls".into(),
                found: "Opaque".into()
            }
        );
        let no_key = tls_secret(
            TLS_SECRET_TYPE,
            &[(TLS_CERT, CERT.as_bytes()), (TLS_KEY, b"")],
        );
        assert_eq!(
            problem(Some(&no_key)),
            CertificateProblem::MissingMember {
                secret: "ntp-tls".into(),
                member: TLS_KEY
            }
        );
        // A key where the chain goes, garbage, a certificate where the key goes.
        for (chain, key, member) in [
            (KEY, KEY, TLS_CERT),
            ("not pem", KEY, TLS_CERT),
            (CERT, CERT, TLS_KEY),
        ] {
            let s = tls_secret(
                TLS_SECRET_TYPE,
                &[(TLS_CERT, chain.as_bytes()), (TLS_KEY, key.as_bytes())],
            );
            let p = problem(Some(&s));
            assert_eq!(
                p,
                CertificateProblem::NotPem {
                    secret: "ntp-tls".into(),
                    member
                }
            );
            // Messages name the Secret and member, never the contents.
            assert!(p.to_string().contains("ntp-tls") && !p.to_string().contains("MIGH"));
        }
        let huge = "A".repeat(MAX_TENANT_MATERIAL_BYTES);
        let big = tls_secret(
            TLS_SECRET_TYPE,
            &[
                (TLS_CERT, (CERT.to_owned() + &huge).as_bytes()),
                (TLS_KEY, KEY.as_bytes()),
            ],
        );
        assert_eq!(problem(Some(&big)).reason(), "CertificateTooLarge");
    }

    fn counter() -> impl FnMut() -> [u8; COOKIE_KEY_LEN] {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; COOKIE_KEY_LEN]
        }
    }

    fn written(plan: &CookieKeyPlan) -> Secret {
        let ts = fixtures::time_service("cluster");
        build_nts_secret(&ts, &fixtures::settings(), plan, Vec::new(), Vec::new())
            .unwrap()
            .secret
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn cookie_keys_are_made_once_kept_for_a_period_then_rotated_through_next() {
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let mut keys = counter();
        let first = plan_cookie_keys(None, t0, DAY, None, &mut keys);
        assert!(first.rotated);
        assert_eq!(
            (
                first.file.current.id,
                first.file.previous.as_ref().map(|k| k.id),
                first.file.next.as_ref().map(|k| k.id)
            ),
            (1, None, Some(2))
        );
        // Read back from the Secret it writes: kept while the period runs.
        let later = t0 + SignedDuration::from_hours(20);
        let kept = plan_cookie_keys(Some(&written(&first)), later, DAY, None, &mut keys);
        assert!(!kept.rotated);
        assert_eq!(kept.file, first.file);
        assert_eq!(kept.rotated_at, t0);
        assert_eq!(kept.rotate_in, Duration::from_secs(4 * 3600));
        // Period over: the published next key seals now, the old current still opens, and a
        // fresh key is published for the rotation after.
        let due = t0 + SignedDuration::from_hours(24);
        let rotated = plan_cookie_keys(Some(&written(&kept)), due, DAY, None, &mut keys);
        assert!(rotated.rotated);
        assert_eq!(rotated.file.current, first.file.next.clone().unwrap());
        assert_eq!(rotated.file.previous, Some(first.file.current.clone()));
        assert_eq!(rotated.file.next.as_ref().unwrap().id, 3);
        assert_eq!((rotated.rotated_at, rotated.rotate_in), (due, DAY));
        // Two rotations on, the first key is gone: its cookies get the NAK.
        let again = plan_cookie_keys(
            Some(&written(&rotated)),
            due + SignedDuration::from_hours(24),
            DAY,
            None,
            &mut keys,
        );
        let held: Vec<u32> = again.file.keys().map(|k| k.id).collect();
        assert_eq!(held, [3, 2, 4]);
        // No two keys ever alike.
        let mut material: Vec<&str> = [&first.file, &rotated.file, &again.file]
            .iter()
            .flat_map(|f| f.keys())
            .map(|k| k.key.as_str())
            .collect();
        material.sort_unstable();
        material.dedup();
        assert_eq!(material.len(), 4);
    }

    #[test]
    fn a_rotation_request_rotates_once_and_restarts_the_period() {
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let mut keys = counter();
        // A request already there when the first keys are made is taken as done.
        let first = plan_cookie_keys(None, t0, DAY, Some("a"), &mut keys);
        let t1 = t0 + SignedDuration::from_hours(1);
        let kept = plan_cookie_keys(Some(&written(&first)), t1, DAY, Some("a"), &mut keys);
        assert!(!kept.rotated && !kept.requested);
        assert_eq!(kept.file, first.file);
        // A new value rotates at once, through the published next key, and the period
        // starts over from the rotation.
        let asked = plan_cookie_keys(Some(&written(&kept)), t1, DAY, Some("b"), &mut keys);
        assert!(asked.rotated && asked.requested);
        assert_eq!(asked.file.current, first.file.next.clone().unwrap());
        assert_eq!(asked.file.previous, Some(first.file.current.clone()));
        assert_eq!((asked.rotated_at, asked.rotate_in), (t1, DAY));
        assert_eq!(asked.request_seen.as_deref(), Some("b"));
        // Reconciled again with the same request: acted on already, so kept.
        let t2 = t1 + SignedDuration::from_mins(1);
        let same = plan_cookie_keys(Some(&written(&asked)), t2, DAY, Some("b"), &mut keys);
        assert!(!same.rotated);
        assert_eq!(same.file, asked.file);
        // The annotation removed: no request, and the one acted on stays recorded, so putting
        // it back does not rotate either.
        let removed = plan_cookie_keys(Some(&written(&same)), t2, DAY, None, &mut keys);
        assert!(!removed.rotated);
        assert_eq!(removed.request_seen.as_deref(), Some("b"));
        let back = plan_cookie_keys(Some(&written(&removed)), t2, DAY, Some("b"), &mut keys);
        assert!(!back.rotated);
        // A second request a minute after the first rotation waits out the spacing: the key
        // it would make current was published only a minute ago.
        let early = plan_cookie_keys(Some(&written(&back)), t2, DAY, Some("c"), &mut keys);
        assert!(!early.rotated);
        assert_eq!(
            early.request_waits_until,
            Some(t1 + SignedDuration::try_from(ROTATION_REQUEST_SPACING).unwrap())
        );
        assert_eq!(early.file, asked.file);
        assert_eq!(
            early.rotate_in,
            ROTATION_REQUEST_SPACING - Duration::from_secs(60)
        );
        assert_eq!(early.request_seen.as_deref(), Some("b"));
        // Once the spacing is over it rotates: the first key, two rotations back, no longer
        // opens anything.
        let t2 = t1 + SignedDuration::try_from(ROTATION_REQUEST_SPACING).unwrap();
        let second = plan_cookie_keys(Some(&written(&early)), t2, DAY, Some("c"), &mut keys);
        assert!(second.requested && second.request_waits_until.is_none());
        let held: Vec<u32> = second.file.keys().map(|k| k.id).collect();
        assert_eq!(held, [3, 2, 4]);
        // A rotation by period keeps the request recorded.
        let t3 = t2 + SignedDuration::from_hours(24);
        let periodic = plan_cookie_keys(Some(&written(&second)), t3, DAY, Some("c"), &mut keys);
        assert!(periodic.rotated && !periodic.requested);
        assert_eq!(periodic.request_seen.as_deref(), Some("c"));
    }

    #[test]
    fn a_tampered_or_unreadable_key_file_is_replaced_not_trusted() {
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let mut keys = counter();
        let first = plan_cookie_keys(None, t0, DAY, None, &mut keys);
        let mut secret = written(&first);
        let data = secret.data.as_mut().unwrap();
        data.insert(
            NTS_COOKIE_KEYS_KEY.into(),
            ByteString(br#"{"current": {"id": 1, "key": "00"}}"#.to_vec()),
        );
        let replaced = plan_cookie_keys(Some(&secret), t0, DAY, None, &mut keys);
        assert!(replaced.rotated);
        assert!(replaced.file.current.is_well_formed());
        // Without its annotation the age is unknown: fresh keys too.
        let mut unannotated = written(&first);
        unannotated.metadata.annotations = None;
        assert!(plan_cookie_keys(Some(&unannotated), t0, DAY, None, &mut keys).rotated);
    }

    #[test]
    fn the_secret_holds_keys_and_certificates_oldest_tenants_first_and_never_prints_them() {
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let cookie = plan_cookie_keys(None, t0, DAY, None, &mut counter());
        let cert = |bytes: usize| TenantCertificate {
            chain: vec![b'c'; bytes],
            key: vec![b'k'; 10],
        };
        let tenant = |ns: &str, port: u16| NtsTenant {
            key: (ns.into(), "p".into()),
            port,
            certificate_secret: Some("tls".into()),
            keys_secret: None,
        };
        let with_certificate = |tenant, certificate| TenantMaterial {
            tenant,
            certificate: Some(certificate),
            keys: None,
        };
        let ts = fixtures::time_service("cluster");
        // Oldest first: a and b fit, c (younger, large) does not; d (broken) fails alone.
        let half = MAX_SECRET_MATERIAL_BYTES / 2;
        let material = build_nts_secret(
            &ts,
            &fixtures::settings(),
            &cookie,
            Vec::new(),
            vec![
                with_certificate(tenant("a", 12300), Ok(cert(half - 100))),
                with_certificate(tenant("b", 12302), Ok(cert(1000))),
                with_certificate(tenant("c", 12301), Ok(cert(half))),
                with_certificate(
                    tenant("d", 12303),
                    Err(CertificateProblem::Missing {
                        secret: "tls".into(),
                    }),
                ),
            ],
        )
        .unwrap();
        let outcome = |ns: &str| material.outcomes[&(ns.to_owned(), "p".to_owned())].clone();
        assert_eq!(outcome("a"), Ok(()));
        assert_eq!(outcome("b"), Ok(()));
        assert_eq!(outcome("c").unwrap_err().reason(), "KeyMaterialFull");
        assert_eq!(
            outcome("d").unwrap_err().reason(),
            "CertificateSecretMissing"
        );
        let secret = &material.secret;
        assert_eq!(secret.metadata.name.as_deref(), Some("cluster-agent-nts"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("stratum-system"));
        let members: Vec<&str> = secret
            .data
            .as_ref()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            members,
            [
                "cookie-keys.json",
                "tenant-12300.crt",
                "tenant-12300.key",
                "tenant-12302.crt",
                "tenant-12302.key"
            ]
        );
        // The members hold what the agents read: the key file round-trips.
        let file: CookieKeyFile =
            serde_json::from_slice(&secret.data.as_ref().unwrap()["cookie-keys.json"].0).unwrap();
        assert_eq!(file, cookie.file);
        assert!(!format!("{:?}", cookie.file).contains(&"01".repeat(8)));
    }

    fn keys_secret(members: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                members
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_key_secret_is_checked_rewritten_in_one_spelling_and_every_fault_is_named() {
        let good = keys_secret(&[(
            KEYS_MEMBER,
            b"# lab switches\n10 aes128 HEX:000102030405060708090A0B0C0D0E0F\n11 md5 secret7\n",
        )]);
        let keys = check_symmetric_keys("device-keys", Some(&good)).unwrap();
        assert_eq!(keys.counts(), (2, 1));
        assert_eq!(
            keys.file,
            "10 AES128 HEX:000102030405060708090a0b0c0d0e0f\n11 MD5 HEX:73656372657437\n"
        );
        assert!(!format!("{keys:?}").contains("7365"), "{keys:?}");
        let problem =
            |secret: Option<&Secret>| check_symmetric_keys("device-keys", secret).unwrap_err();
        assert_eq!(problem(None).reason(), "KeysSecretMissing");
        assert_eq!(
            problem(Some(&keys_secret(&[("other", b"1 MD5 x")]))).reason(),
            "KeysSecretInvalid"
        );
        let invalid = problem(Some(&keys_secret(&[(
            KEYS_MEMBER,
            b"1 MD5 x\n2 SHA256 topsecret",
        )])));
        assert_eq!(invalid.reason(), "KeysSecretInvalid");
        let message = invalid.to_string();
        assert!(
            message.contains("line 2") && !message.contains("topsecret"),
            "{message}"
        );
        assert_eq!(
            problem(Some(&keys_secret(&[(KEYS_MEMBER, &[0xff, 0xfe])]))).reason(),
            "KeysSecretInvalid"
        );
        let huge = vec![b'#'; MAX_TENANT_MATERIAL_BYTES + 1];
        assert_eq!(
            problem(Some(&keys_secret(&[(KEYS_MEMBER, &huge)]))).reason(),
            "KeysTooLarge"
        );
    }

    /// Certificates and keys share one budget, oldest tenant first: a newcomer's large
    /// certificate never pushes out an older tenant's keys, and a tenant with both gets both.
    #[test]
    fn keys_and_certificates_share_the_room_oldest_tenant_first() {
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let cookie = plan_cookie_keys(None, t0, DAY, None, &mut counter());
        let keys = check_symmetric_keys("k", Some(&keys_secret(&[(KEYS_MEMBER, b"1 MD5 device")])))
            .unwrap();
        let tenant = |ns: &str, port: u16, cert: bool, keys: bool| NtsTenant {
            key: (ns.into(), "p".into()),
            port,
            certificate_secret: cert.then(|| "tls".into()),
            keys_secret: keys.then(|| "k".into()),
        };
        let big = TenantCertificate {
            chain: vec![b'c'; MAX_SECRET_MATERIAL_BYTES - 10],
            key: vec![b'k'; 5],
        };
        let material = build_nts_secret(
            &fixtures::time_service("cluster"),
            &fixtures::settings(),
            &cookie,
            Vec::new(),
            vec![
                TenantMaterial {
                    tenant: tenant("old", 12300, false, true),
                    certificate: None,
                    keys: Some(Ok(keys.clone())),
                },
                TenantMaterial {
                    tenant: tenant("new", 12301, true, true),
                    certificate: Some(Ok(big)),
                    keys: Some(Ok(keys)),
                },
                // A clumsy tenant's broken key file fails that tenant alone.
                TenantMaterial {
                    tenant: tenant("broken", 12302, false, true),
                    certificate: None,
                    keys: Some(check_symmetric_keys(
                        "k",
                        Some(&keys_secret(&[(KEYS_MEMBER, b"1 MD5")])),
                    )),
                },
            ],
        )
        .unwrap();
        let key = |ns: &str| (ns.to_owned(), "p".to_owned());
        assert_eq!(material.key_outcomes[&key("old")], Ok(()));
        assert_eq!(
            material.outcomes[&key("new")].clone().unwrap_err().reason(),
            "KeyMaterialFull"
        );
        assert_eq!(material.key_outcomes[&key("new")], Ok(()));
        assert!(
            !material.outcomes.contains_key(&key("old")),
            "no NTS, no outcome"
        );
        let data = material.secret.data.as_ref().unwrap();
        assert_eq!(
            data["tenant-12300.keys"].0,
            b"1 MD5 HEX:646576696365\n".to_vec()
        );
        assert!(data.contains_key("tenant-12301.keys"));
        assert!(!data.contains_key("tenant-12301.crt"));
        assert_eq!(
            material.key_outcomes[&key("broken")]
                .clone()
                .unwrap_err()
                .reason(),
            "KeysSecretInvalid"
        );
        assert!(!data.contains_key("tenant-12302.keys"));
    }

    /// Upstream keys: checked for the ids the upstreams name, copied first (the TimeService's
    /// own), and a Secret without one of its ids is named with the id, never a key.
    #[test]
    fn upstream_keys_must_hold_every_named_id_and_come_before_tenants() {
        let secret = keys_secret(&[(
            KEYS_MEMBER,
            b"1 AES128 HEX:000102030405060708090a0b0c0d0e0f\n",
        )]);
        let keys = check_upstream_keys("upstream-keys", &[1], Some(&secret)).unwrap();
        let missing = check_upstream_keys("upstream-keys", &[1, 5], Some(&secret)).unwrap_err();
        assert_eq!(missing.reason(), "KeyIdMissing");
        assert!(missing.to_string().contains("no key 5"), "{missing}");
        assert_eq!(
            check_upstream_keys("upstream-keys", &[1], None)
                .unwrap_err()
                .reason(),
            "KeysSecretMissing"
        );
        let t0: Timestamp = "2026-12-03T00:00:00Z".parse().unwrap();
        let cookie = plan_cookie_keys(None, t0, DAY, None, &mut counter());
        let big = TenantCertificate {
            chain: vec![b'c'; MAX_SECRET_MATERIAL_BYTES - 10],
            key: vec![b'k'; 5],
        };
        let material = build_nts_secret(
            &fixtures::time_service("cluster"),
            &fixtures::settings(),
            &cookie,
            vec![
                ("upstream-keys".into(), Ok(keys)),
                ("gone".into(), Err(missing)),
            ],
            vec![TenantMaterial {
                tenant: NtsTenant {
                    key: ("t".into(), "p".into()),
                    port: 12300,
                    certificate_secret: Some("tls".into()),
                    keys_secret: None,
                },
                certificate: Some(Ok(big)),
                keys: None,
            }],
        )
        .unwrap();
        assert_eq!(material.upstream_outcomes["upstream-keys"], Ok(()));
        assert_eq!(
            material.upstream_outcomes["gone"]
                .clone()
                .unwrap_err()
                .reason(),
            "KeyIdMissing"
        );
        let data = material.secret.data.as_ref().unwrap();
        assert!(data.contains_key("upstream-upstream-keys.keys"));
        assert_eq!(
            material.outcomes[&("t".to_owned(), "p".to_owned())]
                .clone()
                .unwrap_err()
                .reason(),
            "KeyMaterialFull",
            "the tenant's large certificate does not push the upstream key out"
        );
    }
}
