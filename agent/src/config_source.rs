//! Where the agent's config comes from: a file (tests, bare metal) or, in a cluster, its
//! TimeService's ConfigMap, watched as a single object. Every change is parsed and validated
//! here; the run loop only ever sees a valid config or the reason one was rejected.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use stratum_api::agent_config::{AgentConfig, config_map_payload};
use tokio::sync::mpsc;

use crate::config_cache::ConfigOrigin;

/// How often the file source checks for changes.
const FILE_POLL: Duration = Duration::from_millis(500);

/// A config source.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A file holding the JSON document, plain or gzipped.
    File(PathBuf),
    /// `namespace/name` of a ConfigMap holding the document (see
    /// [`AgentConfig::from_config_map`]).
    ConfigMap {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "file {}", p.display()),
            ConfigSource::ConfigMap { namespace, name } => {
                write!(f, "ConfigMap {namespace}/{name}")
            }
        }
    }
}

/// One observed change.
#[derive(Clone, Debug)]
pub enum ConfigUpdate {
    /// A valid config (possibly equal to the previous one).
    Valid(Box<AgentConfig>),
    /// The last good config of an earlier run ([`crate::config_cache`]), while the source has
    /// given none: run it, but do not store it again.
    Cached(Box<AgentConfig>),
    /// The source changed to something unusable; the previous config stays in force.
    Rejected(String),
}

impl ConfigUpdate {
    /// The config to run and where it came from, or why the change was rejected.
    pub fn into_config(self) -> Result<(AgentConfig, ConfigOrigin), String> {
        match self {
            ConfigUpdate::Valid(c) => Ok((*c, ConfigOrigin::Source)),
            ConfigUpdate::Cached(c) => Ok((*c, ConfigOrigin::Cache)),
            ConfigUpdate::Rejected(why) => Err(why),
        }
    }
}

/// Parses one document (plain JSON or gzip) into an update.
pub fn parse(bytes: &[u8]) -> ConfigUpdate {
    match AgentConfig::from_bytes(bytes) {
        Ok(config) => ConfigUpdate::Valid(Box::new(config)),
        Err(e) => ConfigUpdate::Rejected(e.to_string()),
    }
}

/// The update one observed ConfigMap causes, given the payload last parsed (`None` when it is
/// unchanged); `last` is updated.
pub fn config_map_update(
    cm: &ConfigMap,
    what: &str,
    last: &mut Option<Vec<u8>>,
) -> Option<ConfigUpdate> {
    let Some(payload) = config_map_payload(cm) else {
        *last = None;
        return Some(ConfigUpdate::Rejected(format!(
            "{what}: {}",
            stratum_api::ConfigError::Missing
        )));
    };
    if last.as_ref() == Some(&payload) {
        return None;
    }
    let update = match parse(&payload) {
        ConfigUpdate::Rejected(why) => ConfigUpdate::Rejected(format!("{what}: {why}")),
        valid => valid,
    };
    *last = Some(payload);
    Some(update)
}

/// Watches `source` until `tx` closes, sending an update whenever the content changes.
pub async fn watch(
    source: ConfigSource,
    client: Option<kube::Client>,
    tx: mpsc::Sender<ConfigUpdate>,
) {
    match source {
        ConfigSource::File(path) => watch_file(path, tx).await,
        ConfigSource::ConfigMap { namespace, name } => match client {
            Some(client) => watch_config_map(client, &namespace, &name, tx).await,
            None => {
                let _ = tx
                    .send(ConfigUpdate::Rejected(
                        "a ConfigMap source needs a Kubernetes client".into(),
                    ))
                    .await;
            }
        },
    }
}

async fn watch_file(path: PathBuf, tx: mpsc::Sender<ConfigUpdate>) {
    let mut last: Option<Result<Vec<u8>, String>> = None;
    loop {
        let now = tokio::fs::read(&path)
            .await
            .map_err(|e| format!("reading {}: {e}", path.display()));
        if last.as_ref() != Some(&now) {
            let update = match &now {
                Ok(bytes) => parse(bytes),
                Err(e) => ConfigUpdate::Rejected(e.clone()),
            };
            if tx.send(update).await.is_err() {
                return;
            }
            last = Some(now);
        }
        tokio::time::sleep(FILE_POLL).await;
    }
}

async fn watch_config_map(
    client: kube::Client,
    namespace: &str,
    name: &str,
    tx: mpsc::Sender<ConfigUpdate>,
) {
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let what = format!("ConfigMap {namespace}/{name}");
    let mut last: Option<Vec<u8>> = None;
    let mut stream = watcher(api, config).boxed();
    while let Some(event) = stream.next().await {
        let cm = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
            Ok(watcher::Event::Delete(_)) => {
                let _ = tx
                    .send(ConfigUpdate::Rejected(format!(
                        "ConfigMap {namespace}/{name} was deleted"
                    )))
                    .await;
                last = None;
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                // The watcher retries by itself; a lost watch is not a config problem.
                tracing::warn!(error = %e, "ConfigMap watch interrupted; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Some(update) = config_map_update(&cm, &what, &mut last)
            && tx.send(update).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::ByteString;
    use stratum_api::agent_config::{AGENT_CONFIG_GZIP_KEY, AGENT_CONFIG_KEY};

    fn config(revision: &str) -> AgentConfig {
        let mut c =
            AgentConfig::from_json(include_str!("../tests/data/agent-config.json")).unwrap();
        c.revision = revision.into();
        c
    }

    fn gz_map(bytes: Vec<u8>) -> ConfigMap {
        ConfigMap {
            binary_data: Some([(AGENT_CONFIG_GZIP_KEY.to_string(), ByteString(bytes))].into()),
            ..ConfigMap::default()
        }
    }

    fn valid_revision(update: Option<ConfigUpdate>) -> String {
        match update {
            Some(ConfigUpdate::Valid(c)) => c.revision,
            other => panic!("expected a valid config, got {other:?}"),
        }
    }

    #[test]
    fn a_config_map_is_read_in_the_gzip_form_and_the_plain_form() {
        let mut last = None;
        let gz = gz_map(config("r1").to_gzip());
        assert_eq!(
            valid_revision(config_map_update(&gz, "cm", &mut last)),
            "r1"
        );
        assert!(
            config_map_update(&gz, "cm", &mut last).is_none(),
            "an unchanged payload is not an update"
        );
        let plain = ConfigMap {
            data: Some([(AGENT_CONFIG_KEY.to_string(), config("r0").to_json())].into()),
            ..ConfigMap::default()
        };
        assert_eq!(
            valid_revision(config_map_update(&plain, "cm", &mut last)),
            "r0"
        );
    }

    #[test]
    fn corrupt_gzip_is_rejected_with_the_reason_and_the_source_named() {
        let mut last = None;
        let good = config("r1").to_gzip();
        valid_revision(config_map_update(
            &gz_map(good.clone()),
            "ConfigMap s/c",
            &mut last,
        ));
        let truncated = gz_map(good[..good.len() - 9].to_vec());
        match config_map_update(&truncated, "ConfigMap s/c", &mut last) {
            Some(ConfigUpdate::Rejected(why)) => {
                assert!(why.starts_with("ConfigMap s/c: "), "{why}");
                assert!(why.contains("not a valid gzip stream"), "{why}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        match config_map_update(&ConfigMap::default(), "ConfigMap s/c", &mut last) {
            Some(ConfigUpdate::Rejected(why)) => assert!(why.contains("neither"), "{why}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_file_source_reads_gzip_and_rejects_a_corrupt_rewrite() {
        let dir = std::env::temp_dir().join(format!("stratum-cfgsrc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent-config.json.gz");
        let good = config("r1").to_gzip();
        std::fs::write(&path, &good).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(watch(ConfigSource::File(path.clone()), None, tx));
        assert_eq!(valid_revision(rx.recv().await), "r1");
        let mut corrupt = good.clone();
        corrupt[good.len() / 2] ^= 0xff;
        std::fs::write(&path, &corrupt).unwrap();
        match rx.recv().await {
            Some(ConfigUpdate::Rejected(why)) => assert!(!why.is_empty()),
            other => panic!("expected a rejection, got {other:?}"),
        }
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
