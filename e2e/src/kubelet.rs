//! A kubelet stand-in for the agent DaemonSet's pods on kwok's fake nodes.
//!
//! For every agent pod with a node, it runs `stratum-agent` exactly as the pod spec says — the
//! container's args with `$(VAR)` expanded from its env (downward API fields resolved as the
//! kubelet would), hostPath mounts mapped to a per-node directory (one machine plays every
//! node's filesystem), the pod's service account through a pod-bound token (so the API server
//! adds the node claim the admission policy checks) — inside the network namespace that owns
//! the node's address, without CAP_SYS_TIME and with `--clock simulated`. A deleted pod's agent
//! gets SIGTERM. The pure part, turning a pod into a command line, is [`agent_command`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// What to run for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCommand {
    /// Node the pod is bound to.
    pub node: String,
    /// Arguments after the binary, in order.
    pub args: Vec<String>,
    /// Environment, as the container would see it.
    pub env: BTreeMap<String, String>,
    /// Host directories standing in for hostPath volumes (to create before start).
    pub host_dirs: Vec<PathBuf>,
}

/// Why a pod cannot be run (yet).
#[derive(Debug, PartialEq, Eq)]
pub enum PodError {
    /// Not scheduled yet.
    NotBound,
    /// The pod has no container.
    NoContainer,
}

impl std::error::Error for PodError {}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodError::NotBound => write!(f, "pod is not bound to a node"),
            PodError::NoContainer => write!(f, "pod has no container"),
        }
    }
}

/// The command line and environment for `pod`, with hostPath volumes under `node_root`
/// (`<node_root>/<node>/<hostPath>`) and the clock replaced by the simulated backend.
pub fn agent_command(
    pod: &Pod,
    node_root: &Path,
    sim_offset: f64,
    sim_ppm: f64,
) -> Result<AgentCommand, PodError> {
    let spec = pod.spec.as_ref().ok_or(PodError::NoContainer)?;
    let node = spec.node_name.clone().ok_or(PodError::NotBound)?;
    let container = spec.containers.first().ok_or(PodError::NoContainer)?;
    let meta = &pod.metadata;

    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            v.clone()
        } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
            match field.field_path.as_str() {
                "spec.nodeName" => node.clone(),
                "metadata.name" => meta.name.clone().unwrap_or_default(),
                "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
                "metadata.uid" => meta.uid.clone().unwrap_or_default(),
                _ => continue,
            }
        } else {
            continue;
        };
        env.insert(var.name.clone(), value);
    }

    // hostPath volumes: mountPath in the container -> this node's stand-in directory.
    let mut mounts = Vec::new();
    let mut host_dirs = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let host_path = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone());
        if let Some(host_path) = host_path {
            let dir = node_root
                .join(&node)
                .join(host_path.trim_start_matches('/'));
            mounts.push((mount.mount_path.clone(), dir.clone()));
            host_dirs.push(dir);
        }
    }

    let mut args: Vec<String> = container
        .command
        .iter()
        .flatten()
        .skip(1) // the binary itself
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &env))
        .map(|a| remap_paths(&a, &mounts))
        .collect();
    // The only deviation from the pod spec: a simulated clock instead of the node's.
    args.retain(|a| !a.starts_with("--clock"));
    args.push("--clock=simulated".into());
    args.push(format!("--sim-offset={sim_offset}"));
    args.push(format!("--sim-frequency-ppm={sim_ppm}"));
    Ok(AgentCommand {
        node,
        args,
        env,
        host_dirs,
    })
}

/// Expands `$(NAME)` references like the kubelet; unknown names stay as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                let name = &after[..end];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Rewrites an argument that names a path under a hostPath mount.
fn remap_paths(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount_path, dir) in mounts {
        let dir = dir.display().to_string();
        if arg == mount_path.as_str() {
            return dir;
        }
        if let Some(rest) = arg.strip_prefix(&format!("{mount_path}/")) {
            return format!("{dir}/{rest}");
        }
        if let Some((flag, value)) = arg.split_once('=')
            && (value == mount_path.as_str() || value.starts_with(&format!("{mount_path}/")))
        {
            return format!("{flag}={}", remap_paths(value, mounts));
        }
    }
    arg.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cluster-agent-abc", "namespace": "stratum-system", "uid": "u1"},
            "spec": {
                "nodeName": "kwok-node-1",
                "containers": [{
                    "name": "agent", "image": "stratum-agent:0.1.0",
                    "args": ["run", "--config-map", "stratum-system/cluster-agent-config",
                             "--node-name=$(NODE_NAME)", "--state-dir", "/var/lib/stratum", "--clock=system"],
                    "env": [
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "RUST_LOG", "value": "info"}
                    ],
                    "volumeMounts": [{"name": "state", "mountPath": "/var/lib/stratum"}]
                }],
                "volumes": [{"name": "state", "hostPath": {"path": "/var/lib/stratum", "type": "DirectoryOrCreate"}}]
            }
        }))
        .unwrap()
    }

    /// The fixture pod asks for `--clock=system`, as a real DaemonSet would; the test pins that
    /// the harness replaces it, so no e2e agent ever opens the system clock.
    #[test]
    fn pod_args_env_and_host_paths_become_the_agent_command_with_a_simulated_clock() {
        let cmd = agent_command(&pod(), Path::new("/run/e2e/nodes"), 0.3, 50.0).unwrap();
        assert_eq!(cmd.node, "kwok-node-1");
        assert_eq!(
            cmd.args,
            [
                "run",
                "--config-map",
                "stratum-system/cluster-agent-config",
                "--node-name=kwok-node-1",
                "--state-dir",
                "/run/e2e/nodes/kwok-node-1/var/lib/stratum",
                "--clock=simulated",
                "--sim-offset=0.3",
                "--sim-frequency-ppm=50",
            ]
        );
        assert_eq!(cmd.env["NODE_NAME"], "kwok-node-1");
        assert_eq!(cmd.env["POD_NAMESPACE"], "stratum-system");
        assert_eq!(cmd.env["RUST_LOG"], "info");
        assert_eq!(
            cmd.host_dirs,
            [PathBuf::from("/run/e2e/nodes/kwok-node-1/var/lib/stratum")]
        );
    }

    #[test]
    fn an_unscheduled_pod_is_not_run() {
        let mut p = pod();
        p.spec.as_mut().unwrap().node_name = None;
        assert_eq!(
            agent_command(&p, Path::new("/x"), 0.0, 0.0),
            Err(PodError::NotBound)
        );
    }

    #[test]
    fn unknown_variables_stay_as_written() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y$(B)z$(", &env), "x1y$(B)z$(");
    }
}
