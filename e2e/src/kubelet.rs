//! A kubelet stand-in for the pods Stratum runs on kwok's fake nodes: the agent DaemonSet's
//! pods and the operator Deployment's pods (installed by `helm install`).
//!
//! For every such pod with a node, it runs the binary exactly as the pod spec says — the
//! container's args with `$(VAR)` expanded from its env (downward API fields resolved as the
//! kubelet would), hostPath mounts mapped to a per-node directory (one machine plays every
//! node's filesystem), Secret volumes projected into a directory of the pod's own and
//! bind-mounted at their mount path in the process's private mount namespace (as the
//! kubelet does: one `..data` link swapped at each update, so a reader never sees half of
//! one), the pod's service account through a pod-bound token (so the API server
//! adds the node claim the admission policy checks), the user and group of its security
//! context — inside a network namespace that owns the pod's address (the node's for
//! hostNetwork pods), without CAP_SYS_TIME. Agents get `--clock simulated`. A deleted pod's
//! process gets SIGTERM; one that exits is restarted with a backoff, as `restartPolicy:
//! Always` does. The pure part, turning a pod into a command line, is [`pod_command`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};

/// Label that tells Stratum's pods apart (`app.kubernetes.io/name`).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";

/// Which of Stratum's binaries a pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodKind {
    /// A TimeService's agent (DaemonSet, hostNetwork).
    Agent,
    /// The operator (the chart's Deployment, a pod network address of its own).
    Operator,
}

impl PodKind {
    /// From the pod's `app.kubernetes.io/name` label; `None` for any other pod.
    pub fn of(pod: &Pod) -> Option<PodKind> {
        match pod.metadata.labels.as_ref()?.get(NAME_LABEL)?.as_str() {
            "stratum-agent" => Some(PodKind::Agent),
            "stratum-operator" => Some(PodKind::Operator),
            _ => None,
        }
    }
}

/// What to run for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCommand {
    /// Node the pod is bound to.
    pub node: String,
    /// Arguments after the binary, in order.
    pub args: Vec<String>,
    /// Environment, as the container would see it.
    pub env: BTreeMap<String, String>,
    /// Host directories standing in for hostPath volumes (to create before start).
    pub host_dirs: Vec<PathBuf>,
    /// Secret volumes, to project and bind-mount before start.
    pub secret_mounts: Vec<SecretMount>,
    /// `runAsUser` of the container (its own security context, else the pod's).
    pub run_as_user: Option<i64>,
    /// `runAsGroup`, likewise.
    pub run_as_group: Option<i64>,
}

/// A Secret volume of the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMount {
    /// The volume's name (the directory it is projected into is named after it).
    pub volume: String,
    /// The Secret, in the pod's namespace.
    pub secret_name: String,
    /// Where the container sees it.
    pub mount_path: String,
    /// An optional Secret that does not exist is an empty directory; a required one keeps
    /// the container from starting.
    pub optional: bool,
    /// File mode of each member (`defaultMode`, the kubelet's 0644 when unset).
    pub mode: u32,
}

/// The files a Secret volume holds: one per data member, named by its key (what the
/// kubelet writes without `items`). `None` when the Secret is missing and required.
pub fn secret_volume_files(
    mount: &SecretMount,
    secret: Option<&Secret>,
) -> Option<BTreeMap<String, Vec<u8>>> {
    let Some(secret) = secret else {
        return mount.optional.then(BTreeMap::new);
    };
    Some(
        secret
            .data
            .iter()
            .flatten()
            .map(|(key, value)| (key.clone(), value.0.clone()))
            // Keys a path could escape with never become files.
            .filter(|(key, _)| !key.is_empty() && !key.contains('/') && !key.starts_with(".."))
            .collect(),
    )
}

/// The agent's command is a [`PodCommand`] with the clock replaced.
pub type AgentCommand = PodCommand;

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

/// How long to wait before the `restarts`-th restart of an exited process: 1 s, doubling,
/// at most 10 s (the kubelet's 10 s .. 5 min is too slow for tests that kill on purpose).
pub fn restart_delay(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(4)).min(Duration::from_secs(10))
}

/// The agent's command line for `pod` ([`pod_command`]) with the clock replaced by the
/// simulated backend.
pub fn agent_command(
    pod: &Pod,
    node_root: &Path,
    sim_offset: f64,
    sim_ppm: f64,
) -> Result<AgentCommand, PodError> {
    let mut command = pod_command(pod, node_root)?;
    // The only deviation from the pod spec: a simulated clock instead of the node's, whatever
    // the pod asks for (`--clock=X` or `--clock X`).
    let mut args = std::mem::take(&mut command.args).into_iter();
    while let Some(arg) = args.next() {
        if arg == "--clock" {
            args.next();
        } else if !arg.starts_with("--clock=") {
            command.args.push(arg);
        }
    }
    command.args.push("--clock=simulated".into());
    command.args.push(format!("--sim-offset={sim_offset}"));
    command.args.push(format!("--sim-frequency-ppm={sim_ppm}"));
    Ok(command)
}

/// The command line, environment and identity of `pod`'s first container, with hostPath
/// volumes under `node_root` (`<node_root>/<node>/<hostPath>`).
pub fn pod_command(pod: &Pod, node_root: &Path) -> Result<PodCommand, PodError> {
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

    let secret_mounts = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|mount| {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)?;
            let secret = volume.secret.as_ref()?;
            Some(SecretMount {
                volume: volume.name.clone(),
                secret_name: secret.secret_name.clone()?,
                mount_path: mount.mount_path.clone(),
                optional: secret.optional == Some(true),
                mode: secret
                    .default_mode
                    .and_then(|m| u32::try_from(m).ok())
                    .unwrap_or(0o644),
            })
        })
        .collect();

    let args: Vec<String> = container
        .command
        .iter()
        .flatten()
        .skip(1) // the binary itself
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &env))
        .map(|a| remap_paths(&a, &mounts))
        .collect();
    let pod_context = spec.security_context.as_ref();
    let own_context = container.security_context.as_ref();
    Ok(PodCommand {
        node,
        args,
        env,
        host_dirs,
        secret_mounts,
        run_as_user: own_context
            .and_then(|c| c.run_as_user)
            .or_else(|| pod_context.and_then(|c| c.run_as_user)),
        run_as_group: own_context
            .and_then(|c| c.run_as_group)
            .or_else(|| pod_context.and_then(|c| c.run_as_group)),
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
                             "--node-name=$(NODE_NAME)", "--state-dir", "/var/lib/stratum"],
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

    /// The pod is shaped like the operator's DaemonSet, which leaves the clock to the agent
    /// config (`system` on a real node): the harness adds the simulated clock, which overrides
    /// the config, so no e2e agent ever opens the system clock.
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
        assert_eq!(cmd.run_as_user, None, "agents run as the pod says: root");
        assert_eq!(
            cmd.host_dirs,
            [PathBuf::from("/run/e2e/nodes/kwok-node-1/var/lib/stratum")]
        );
    }

    /// The agent pod as the operator's DaemonSet makes it, with its key material volume.
    #[test]
    fn a_secret_volume_becomes_a_mount_and_its_members_files() {
        let mut p = pod();
        let spec = p.spec.as_mut().unwrap();
        spec.containers[0].volume_mounts.as_mut().unwrap().push(
            serde_json::from_value(serde_json::json!(
                {"name": "nts", "mountPath": "/etc/stratum/nts", "readOnly": true}
            ))
            .unwrap(),
        );
        spec.volumes.as_mut().unwrap().push(
            serde_json::from_value(serde_json::json!({"name": "nts", "secret": {
                "secretName": "cluster-agent-nts", "optional": true, "defaultMode": 0o400}}))
            .unwrap(),
        );
        let cmd = agent_command(&p, Path::new("/x"), 0.0, 0.0).unwrap();
        let mount = SecretMount {
            volume: "nts".into(),
            secret_name: "cluster-agent-nts".into(),
            mount_path: "/etc/stratum/nts".into(),
            optional: true,
            mode: 0o400,
        };
        assert_eq!(cmd.secret_mounts, std::slice::from_ref(&mount));
        assert!(
            cmd.args.iter().all(|a| !a.contains("/etc/stratum")),
            "a Secret mount is not remapped like a hostPath: {:?}",
            cmd.args
        );

        // Missing: an empty directory when optional, no start when required.
        assert_eq!(secret_volume_files(&mount, None), Some(BTreeMap::new()));
        let required = SecretMount {
            optional: false,
            ..mount.clone()
        };
        assert_eq!(secret_volume_files(&required, None), None);
        // Each data member is a file; a key that would leave the directory is not.
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cluster-agent-nts"},
            "data": {"cookie-keys.json": "e30=", "..data": "eA==", "tenant-4460.crt": "Y2VydA=="}
        }))
        .unwrap();
        let files = secret_volume_files(&mount, Some(&secret)).unwrap();
        assert_eq!(
            files,
            BTreeMap::from([
                ("cookie-keys.json".to_string(), b"{}".to_vec()),
                ("tenant-4460.crt".to_string(), b"cert".to_vec()),
            ])
        );
    }

    #[test]
    fn a_clock_the_pod_asks_for_is_replaced_in_either_form() {
        for asked in [&["--clock=readonly"][..], &["--clock", "readonly"]] {
            let mut p = pod();
            let container = &mut p.spec.as_mut().unwrap().containers[0];
            let args = container.args.as_mut().unwrap();
            args.extend(asked.iter().map(|a| a.to_string()));
            let cmd = agent_command(&p, Path::new("/x"), 0.0, 0.0).unwrap();
            let clock: Vec<_> = cmd
                .args
                .iter()
                .filter(|a| a.starts_with("--clock") || *a == "readonly")
                .collect();
            assert_eq!(clock, ["--clock=simulated"], "pod asked for {asked:?}");
        }
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

    /// The operator pod as the chart's Deployment makes it: its args run unchanged (no clock
    /// flag to replace), with the pod's user unless the container names its own.
    #[test]
    fn an_operator_pod_runs_its_args_as_the_security_context_user() {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "stratum-operator-5d4-x2", "namespace": "stratum-system",
                         "labels": {"app.kubernetes.io/name": "stratum-operator"}},
            "spec": {
                "nodeName": "kwok-node-2",
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true},
                "containers": [{
                    "name": "operator", "image": "stratum-operator:0.1.0",
                    "args": ["--namespace=stratum-system", "--metrics-addr=0.0.0.0:8080", "--leader-election=true"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "RUST_LOG", "value": "info"}
                    ]
                }]
            }
        }))
        .unwrap();
        assert_eq!(PodKind::of(&p), Some(PodKind::Operator));
        let cmd = pod_command(&p, Path::new("/x")).unwrap();
        assert_eq!(
            cmd.args,
            [
                "--namespace=stratum-system",
                "--metrics-addr=0.0.0.0:8080",
                "--leader-election=true"
            ]
        );
        assert_eq!(cmd.env["POD_NAME"], "stratum-operator-5d4-x2");
        assert_eq!(
            (cmd.run_as_user, cmd.run_as_group),
            (Some(65532), Some(65532))
        );
        p.spec.as_mut().unwrap().containers[0].security_context =
            serde_json::from_value(serde_json::json!({"runAsUser": 1000})).unwrap();
        let cmd = pod_command(&p, Path::new("/x")).unwrap();
        assert_eq!(
            (cmd.run_as_user, cmd.run_as_group),
            (Some(1000), Some(65532))
        );
    }

    #[test]
    fn only_stratum_pods_have_a_kind() {
        assert_eq!(PodKind::of(&pod()), None, "the fixture has no name label");
        let mut p = pod();
        p.metadata.labels = Some([(NAME_LABEL.to_string(), "stratum-agent".to_string())].into());
        assert_eq!(PodKind::of(&p), Some(PodKind::Agent));
        p.metadata.labels = Some([(NAME_LABEL.to_string(), "other".to_string())].into());
        assert_eq!(PodKind::of(&p), None);
    }

    #[test]
    fn restarts_back_off_from_one_to_ten_seconds() {
        let delays: Vec<u64> = (0..6).map(|r| restart_delay(r).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(restart_delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn unknown_variables_stay_as_written() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y$(B)z$(", &env), "x1y$(B)z$(");
    }
}
