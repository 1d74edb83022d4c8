//! The last good config, kept in the state directory so that an agent started while the API
//! server is unreachable (a node rebooted during a control-plane outage) disciplines and serves
//! its tenants with what it ran before, instead of waiting for a ConfigMap it cannot read.
//!
//! Only a config the run loop has applied is stored: one the core refused must never become
//! the config the next start is stuck with. The file is the gzipped document the ConfigMap
//! carries, validated again on load, and written atomically (temporary file, fsync, rename,
//! fsync of the directory), so a crash mid-write leaves the previous file whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use stratum_api::agent_config::AgentConfig;

use crate::config_source::ConfigSource;

/// Where the config in force came from; shown in status (`configSource`) and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigOrigin {
    /// No config yet.
    #[default]
    None,
    /// The configured source (the TimeService's ConfigMap, or a file).
    Source,
    /// The last good config of an earlier run, while the source has given none.
    Cache,
}

impl ConfigOrigin {
    /// Every value, for metrics that export one series each.
    pub const ALL: [ConfigOrigin; 3] = [Self::None, Self::Source, Self::Cache];

    /// Lowercase name, as status and the metric label show it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Source => "source",
            Self::Cache => "cache",
        }
    }
}

/// Why a cached config was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheLoadError {
    /// Unreadable (permissions, IO).
    #[error("reading the cached config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not a valid config (truncated, corrupt, or written by an incompatible version).
    #[error("the cached config {0} is not usable: {1}")]
    Invalid(PathBuf, stratum_api::ConfigError),
}

/// The last good config of one source.
#[derive(Debug)]
pub struct ConfigCache {
    path: PathBuf,
    /// Serializes writers; with `written` it keeps a slow older write from replacing a newer one.
    lock: Mutex<()>,
    /// Sequence number of the newest store started and of the newest written.
    started: AtomicU64,
    written: AtomicU64,
}

impl ConfigCache {
    /// The cache of `source` under `state_dir`; `None` for a file source, which is on disk
    /// already. The name carries the ConfigMap's, so a node moved to another TimeService
    /// never starts from the previous one's config.
    pub fn for_source(state_dir: &Path, source: &ConfigSource) -> Option<Arc<Self>> {
        match source {
            ConfigSource::File(_) => None,
            ConfigSource::ConfigMap { namespace, name } => Some(Arc::new(Self::at(
                state_dir.join(format!("last-config.{namespace}.{name}.json.gz")),
            ))),
        }
    }

    /// A cache in the file `path`.
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
            started: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached config, `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<AgentConfig>, CacheLoadError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheLoadError::Read(self.path.clone(), e)),
        };
        AgentConfig::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| CacheLoadError::Invalid(self.path.clone(), e))
    }

    /// Stores `config` now, atomically.
    pub fn store(&self, config: &AgentConfig) -> std::io::Result<()> {
        let seq = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        self.store_numbered(seq, config)
    }

    /// Stores `config` on a blocking thread, off the clock loop; failures are logged (the
    /// agent runs on without a cache, as before it had one).
    pub fn store_in_background(self: &Arc<Self>, config: AgentConfig) {
        let seq = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        let cache = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = cache.store_numbered(seq, &config) {
                tracing::warn!(path = %cache.path.display(), error = %e, "caching the config failed");
            }
        });
    }

    fn store_numbered(&self, seq: u64, config: &AgentConfig) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.written.load(Ordering::Relaxed) > seq {
            return Ok(()); // a newer config is on disk already
        }
        crate::state_file::write_atomically(&self.path, &config.to_gzip())?;
        self.written.store(seq, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(revision: &str) -> AgentConfig {
        let mut c =
            AgentConfig::from_json(include_str!("../tests/data/agent-config.json")).unwrap();
        c.revision = revision.into();
        c
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stratum-cfgcache-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_stored_config_loads_back_and_a_missing_one_is_none() {
        let dir = temp_dir("roundtrip");
        let source = ConfigSource::ConfigMap {
            namespace: "stratum-system".into(),
            name: "cluster-agent-config".into(),
        };
        let cache = ConfigCache::for_source(&dir, &source).unwrap();
        assert!(cache.load().unwrap().is_none());
        cache.store(&config("r7")).unwrap();
        assert_eq!(cache.load().unwrap().unwrap().revision, "r7");
        assert_eq!(
            cache.path(),
            dir.join("last-config.stratum-system.cluster-agent-config.json.gz")
        );
        // Nothing but the file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_source_has_no_cache_and_each_config_map_its_own() {
        let dir = Path::new("/var/lib/stratum");
        assert!(ConfigCache::for_source(dir, &ConfigSource::File("/etc/x.json".into())).is_none());
        let a = ConfigCache::for_source(
            dir,
            &ConfigSource::ConfigMap {
                namespace: "s".into(),
                name: "a-agent-config".into(),
            },
        )
        .unwrap();
        let b = ConfigCache::for_source(
            dir,
            &ConfigSource::ConfigMap {
                namespace: "s".into(),
                name: "b-agent-config".into(),
            },
        )
        .unwrap();
        assert_ne!(a.path(), b.path());
    }

    #[test]
    fn a_corrupt_or_truncated_cache_is_refused_with_the_file_named() {
        let dir = temp_dir("corrupt");
        let cache = ConfigCache::at(dir.join("c.json.gz"));
        let good = config("r1").to_gzip();
        std::fs::write(cache.path(), &good[..good.len() / 2]).unwrap();
        let e = cache.load().unwrap_err();
        assert!(matches!(e, CacheLoadError::Invalid(..)), "{e}");
        assert!(e.to_string().contains("c.json.gz"), "{e}");
        // A valid document that fails validation is refused too.
        let mut bad = config("r2");
        bad.upstreams.clear();
        std::fs::write(cache.path(), bad.to_gzip()).unwrap();
        assert!(matches!(cache.load(), Err(CacheLoadError::Invalid(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_older_store_finishing_last_does_not_replace_a_newer_one() {
        let dir = temp_dir("order");
        let cache = ConfigCache::at(dir.join("c.json.gz"));
        // Sequence numbers as two background stores would take them: r1 first, r2 second,
        // with r2's write landing first.
        cache.store_numbered(2, &config("r2")).unwrap();
        cache.store_numbered(1, &config("r1")).unwrap();
        assert_eq!(cache.load().unwrap().unwrap().revision, "r2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
