//! Where the agent's config comes from: a file (tests, bare metal) or, in a cluster, its
//! TimeService's ConfigMap, watched as a single object. Every change is parsed and validated
//! here; the run loop only ever sees a valid config or the reason one was rejected.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use stratum_api::agent_config::{AGENT_CONFIG_KEY, AgentConfig};
use tokio::sync::mpsc;

/// How often the file source checks for changes.
const FILE_POLL: Duration = Duration::from_millis(500);

/// A config source.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A JSON file.
    File(PathBuf),
    /// `namespace/name` of a ConfigMap holding [`AGENT_CONFIG_KEY`].
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
    /// The source changed to something unusable; the previous config stays in force.
    Rejected(String),
}

/// Parses one document into an update.
pub fn parse(text: &str) -> ConfigUpdate {
    match AgentConfig::from_json(text) {
        Ok(config) => ConfigUpdate::Valid(Box::new(config)),
        Err(e) => ConfigUpdate::Rejected(e.to_string()),
    }
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
    let mut last: Option<Result<String, String>> = None;
    loop {
        let now = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| format!("reading {}: {e}", path.display()));
        if last.as_ref() != Some(&now) {
            let update = match &now {
                Ok(text) => parse(text),
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
    let mut last: Option<String> = None;
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
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(AGENT_CONFIG_KEY))
            .cloned();
        let Some(text) = text else {
            let _ = tx
                .send(ConfigUpdate::Rejected(format!(
                    "ConfigMap {namespace}/{name} has no key {AGENT_CONFIG_KEY}"
                )))
                .await;
            continue;
        };
        if last.as_ref() == Some(&text) {
            continue;
        }
        if tx.send(parse(&text)).await.is_err() {
            return;
        }
        last = Some(text);
    }
}
