//! The symmetric key files (RFC 8573 AES-CMAC, legacy SHA1/MD5) of tenants and upstreams,
//! read from the Secret the operator gathers and mounts, and read again when they change.
//!
//! Each tenant with `symmetricKeys` and each upstream with a `key` names a file. Until a file
//! reads, the tenant's MACs all fail (crypto-NAK or silence, as the tenant chose) and the
//! upstream is not polled; a file that stops reading (half written, removed) keeps the keys
//! last read in force, so a bad update never cuts devices or upstreams off. Errors name the
//! file and the line, never a key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use stratum_api::AgentConfig;
use stratum_api::agent_config::ServingConfig;
use stratum_ntp::symmetric::SymmetricKeys;

use crate::nts_server::FILE_CHECK_INTERVAL;

/// Secret volumes swap a symlink to a new directory: the stamp follows the link.
type FileStamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.ino(), metadata.len()))
}

#[derive(Debug, Default)]
struct KeyFile {
    seen: Option<FileStamp>,
    keys: Option<Arc<SymmetricKeys>>,
    /// Why the last read failed, to log a failure once rather than every check.
    error: Option<String>,
}

/// The key files of the tenants in `serving`.
pub fn tenant_key_files(serving: &ServingConfig) -> Vec<&str> {
    serving
        .tenants
        .iter()
        .filter_map(|t| t.symmetric_keys.as_ref().map(|s| s.keys_file.as_str()))
        .collect()
}

/// Every key file `config` names: its tenants' and its upstreams' (the egress tier's too).
pub fn key_files(config: &AgentConfig) -> Vec<&str> {
    let upstreams = config
        .upstreams
        .iter()
        .chain(config.egress.iter().flat_map(|e| &e.tier_upstreams))
        .filter_map(|u| u.key.as_ref().map(|k| k.keys_file.as_str()));
    let mut files = tenant_key_files(&config.serving);
    files.extend(upstreams);
    files.sort_unstable();
    files.dedup();
    files
}

/// The key files the config in force names, with what each held when last read. The run loop
/// hands [`Self::loaded`] to the server whenever a call here says something changed.
#[derive(Debug, Default)]
pub struct SymmetricKeyFiles {
    files: BTreeMap<String, KeyFile>,
    last_check: Option<Instant>,
}

impl SymmetricKeyFiles {
    /// No files until [`Self::apply`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows the config: forgets files no longer `wanted` (see [`key_files`]) and reads new
    /// ones. Whether the keys in force changed.
    pub fn apply(&mut self, wanted: &[&str]) -> bool {
        let before = self.files.len();
        self.files.retain(|path, _| wanted.contains(&path.as_str()));
        let mut changed = self.files.len() != before;
        for path in wanted {
            self.files.entry((*path).to_owned()).or_default();
        }
        changed |= self.check_files();
        changed
    }

    /// Run-loop housekeeping, at most every [`FILE_CHECK_INTERVAL`]: files that changed are
    /// read again. Whether the keys in force changed.
    pub fn refresh(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_check
            .is_some_and(|at| now.duration_since(at) < FILE_CHECK_INTERVAL)
        {
            return false;
        }
        self.last_check = Some(now);
        self.check_files()
    }

    /// Reads every file whose stamp changed (or that never read). Whether the keys in force
    /// changed.
    pub fn check_files(&mut self) -> bool {
        let mut changed = false;
        for (path, file) in &mut self.files {
            let seen = stamp(Path::new(path));
            if seen.is_some() && seen == file.seen {
                continue;
            }
            file.seen = seen;
            let read = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {path}: {e}"))
                .and_then(|text| SymmetricKeys::parse(&text).map_err(|e| format!("{path}: {e}")));
            match read {
                Ok(keys) => {
                    if file.keys.as_deref() != Some(&keys) {
                        tracing::info!(file = %path, keys = keys.len(), "symmetric keys loaded");
                        file.keys = Some(Arc::new(keys));
                        changed = true;
                    }
                    file.error = None;
                }
                Err(error) => {
                    if file.error.as_ref() != Some(&error) {
                        // The keys last read stay in force.
                        tracing::warn!(%error, "symmetric keys not loaded");
                    }
                    file.error = Some(error);
                }
            }
        }
        changed
    }

    /// The keys last read from `path`, if any.
    pub fn keys(&self, path: &str) -> Option<Arc<SymmetricKeys>> {
        self.files.get(path)?.keys.clone()
    }

    /// The keys of every file read so far, by path.
    pub fn loaded(&self) -> BTreeMap<String, Arc<SymmetricKeys>> {
        self.files
            .iter()
            .filter_map(|(path, file)| file.keys.clone().map(|keys| (path.clone(), keys)))
            .collect()
    }

    /// How many files failed their last read (the `symmetric_key_files_failed` gauge).
    pub fn failed_count(&self) -> usize {
        self.failed().count()
    }

    /// Files whose last read failed, with why.
    pub fn failed(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files
            .iter()
            .filter_map(|(path, file)| file.error.as_deref().map(|e| (path.as_str(), e)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stratum_api::agent_config::{
        RateLimitConfig, TenantConfig, TenantSymmetricKeysConfig, Unauthenticated,
    };

    fn serving(files: &[&str]) -> ServingConfig {
        let mut serving: ServingConfig = serde_json::from_str(r#"{"holdoverSeconds":60}"#).unwrap();
        serving.tenants = files
            .iter()
            .enumerate()
            .map(|(i, file)| TenantConfig {
                id: format!("ns/t{i}"),
                port: 12300 + i as u16,
                allowed: Vec::new(),
                allowed_sets: Vec::new(),
                denied: Vec::new(),
                rate_limit: RateLimitConfig {
                    client_interval_seconds: 1.0,
                    client_burst: 1,
                    tenant_requests_per_second: None,
                    tenant_burst: None,
                    kiss_of_death: false,
                },
                max_root_distance_seconds: None,
                nts: None,
                symmetric_keys: Some(TenantSymmetricKeysConfig {
                    keys_file: (*file).to_owned(),
                    unauthenticated: Unauthenticated::Serve,
                }),
            })
            .collect();
        serving
    }

    #[test]
    fn files_load_a_bad_update_keeps_the_last_keys_and_unnamed_files_are_forgotten() {
        let dir = std::env::temp_dir().join(format!(
            "stratum-symkeys-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("tenant-1.keys");
        let b = dir.join("tenant-2.keys");
        std::fs::write(&a, "1 AES128 HEX:000102030405060708090a0b0c0d0e0f\n").unwrap();
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        let mut files = SymmetricKeyFiles::new();
        assert!(files.apply(&tenant_key_files(&serving(&[a, b]))));
        assert_eq!(files.loaded().keys().collect::<Vec<_>>(), [a]);
        let failed: Vec<_> = files.failed().map(|(path, _)| path).collect();
        assert_eq!(failed, [b], "a missing file fails alone");
        assert!(!files.check_files(), "nothing changed");

        std::fs::write(b, "7 MD5 ASCII:device-secret\n").unwrap();
        assert!(files.check_files());
        assert_eq!(files.loaded()[b].len(), 1);

        // Half written: the keys last read stay, and the error names the line, not the key.
        std::fs::write(b, "7 MD5 ASCII:device-secret\n8 MD5\n").unwrap();
        assert!(!files.check_files());
        assert_eq!(files.loaded()[b].len(), 1);
        let (_, error) = files.failed().next().unwrap();
        assert!(
            error.contains("line 2") && !error.contains("device-secret"),
            "{error}"
        );

        assert!(files.apply(&tenant_key_files(&serving(&[b]))));
        assert_eq!(files.loaded().keys().collect::<Vec<_>>(), [b]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
