//! The agent DaemonSet: one agent per selected node, with only the capabilities it needs.

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    HostPathVolumeSource, Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use stratum_api::TimeService;
use stratum_api::agent_config::NTS_MATERIAL_DIR;
use stratum_api::time_service::{DisciplineMode, PullPolicy};

/// The agents' volume of the TimeService's NTS key material Secret.
const NTS_VOLUME: &str = "nts";

use super::{OperatorSettings, agent_meta};
use crate::error::{Error, Result};
use crate::names;

/// Seconds a deleted agent pod keeps serving before the kubelet sends SIGTERM: time for the
/// operator to mark its endpoints terminating and for service proxies to stop sending to it,
/// so no client's request meets a closed port. Well inside the grace period.
pub const AGENT_DRAIN_SECONDS: i64 = 2;
/// The agent pod's grace period: the drain, then the agent's own exit (it reports itself
/// unsynchronized and saves its drift file, in well under a second).
pub const AGENT_GRACE_SECONDS: i64 = 10;

// Default resources of the agent container, from `bench/agent-memory.sh` (the release agent on
// a simulated clock, synchronized to a loopback chronyd; every tenant port asked, which makes
// its rate table and client log, about 0.3 MiB each; a reload of every tenant's allow list half
// way). Peak RSS (VmHWM): 100 tenants with 100 allowed prefixes each 43 MiB, with 1,000 each
// 54 MiB, with 5,000 each (500,000 prefixes, about the agent config's 1 MB limit) 123 MiB;
// 500 tenants (the default port range, full) with 20 each 172 MiB. CPU: 20 millicores on
// average while serving 250,000 requests, about 1 when idle.

/// CPU request of an agent container whose TimeService sets no `spec.agent.resources`. No CPU
/// limit: throttling would delay replies and the clock loop.
pub const AGENT_CPU_REQUEST: &str = "10m";
/// Memory request of an agent container whose TimeService sets no `spec.agent.resources`: 100
/// busy tenants with room for the Kubernetes client, which the benchmark does not run.
pub const AGENT_MEMORY_REQUEST: &str = "64Mi";
/// Memory limit of an agent container whose TimeService sets no `spec.agent.resources`: twice
/// the largest figure the default port range and the config size limit lead to, so only a leak
/// meets it.
pub const AGENT_MEMORY_LIMIT: &str = "384Mi";

/// The agent container's resources: the TimeService's exactly as given (an empty object too),
/// otherwise the defaults above, so agents are never BestEffort, the first pods evicted.
pub fn agent_resources(ts: &TimeService) -> ResourceRequirements {
    if let Some(own) = &ts.spec.agent.resources {
        return own.clone();
    }
    let quantity = |q: &str| Quantity(q.to_owned());
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_owned(), quantity(AGENT_CPU_REQUEST)),
                ("memory".to_owned(), quantity(AGENT_MEMORY_REQUEST)),
            ]
            .into(),
        ),
        limits: Some([("memory".to_owned(), quantity(AGENT_MEMORY_LIMIT))].into()),
        ..ResourceRequirements::default()
    }
}

/// Whether agents must bind a port below 1024 (so need NET_BIND_SERVICE).
pub fn needs_net_bind(ports: impl IntoIterator<Item = u16>) -> bool {
    ports.into_iter().any(|p| p < 1024)
}

/// The agent DaemonSet of `ts`. `config_revision` goes into a pod annotation only for humans:
/// agents hot-reload their ConfigMap, so a config change never restarts them.
pub fn build_daemonset(
    ts: &TimeService,
    settings: &OperatorSettings,
    net_bind: bool,
) -> Result<DaemonSet> {
    let name = ts
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TimeService name"))?;
    let labels = names::agent_labels(name);
    let spec = &ts.spec;
    let mut capabilities = Vec::new();
    if spec.discipline.mode == DisciplineMode::Discipline {
        capabilities.push("SYS_TIME".to_owned());
    }
    if net_bind {
        capabilities.push("NET_BIND_SERVICE".to_owned());
    }
    let env_from_field = |env: &str, path: &str| EnvVar {
        name: env.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    let container = Container {
        name: "agent".into(),
        image: Some(
            spec.agent
                .image
                .clone()
                .unwrap_or_else(|| settings.agent_image.clone()),
        ),
        image_pull_policy: spec.agent.image_pull_policy.map(|p| {
            match p {
                PullPolicy::Always => "Always",
                PullPolicy::IfNotPresent => "IfNotPresent",
                PullPolicy::Never => "Never",
            }
            .to_owned()
        }),
        args: Some(
            [
                "run".to_owned(),
                "--config-map".to_owned(),
                format!(
                    "{}/{}",
                    settings.namespace,
                    names::agent_config_map_name(name)
                ),
                "--metrics-addr".to_owned(),
                format!("0.0.0.0:{}", names::AGENT_METRICS_PORT),
                "--status-addr".to_owned(),
                format!("127.0.0.1:{}", names::AGENT_STATUS_PORT),
                "--state-dir".to_owned(),
                names::AGENT_STATE_DIR.to_owned(),
                "--log-format".to_owned(),
                "json".to_owned(),
            ]
            .into(),
        ),
        env: Some(vec![
            env_from_field("NODE_NAME", "spec.nodeName"),
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: names::AGENT_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: AGENT_DRAIN_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        readiness_probe: Some(probe("/readyz", 10, 1)),
        liveness_probe: Some(probe("/healthz", 20, 3)),
        resources: Some(agent_resources(ts)),
        security_context: Some(SecurityContext {
            // SYS_TIME is not usable by a non-root user on most runtimes (no ambient
            // capabilities), so the agent runs as root with every other capability dropped.
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: (!capabilities.is_empty()).then_some(capabilities),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "state".into(),
                mount_path: names::AGENT_STATE_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: NTS_VOLUME.into(),
                mount_path: NTS_MATERIAL_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let host_network = spec.agent.host_network;
    // The TimeService's own list wins, even when empty; otherwise the operator's defaults.
    let pull_secrets = spec
        .agent
        .image_pull_secrets
        .as_ref()
        .unwrap_or(&settings.agent_image_pull_secrets);
    Ok(DaemonSet {
        metadata: agent_meta(ts, names::agent_name(name), Some(&settings.namespace))?,
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::agent_name(name)),
                    image_pull_secrets: (!pull_secrets.is_empty()).then(|| {
                        pull_secrets
                            .iter()
                            .map(|secret| LocalObjectReference {
                                name: secret.clone(),
                            })
                            .collect()
                    }),
                    host_network: Some(host_network),
                    dns_policy: Some(
                        if host_network {
                            "ClusterFirstWithHostNet"
                        } else {
                            "ClusterFirst"
                        }
                        .into(),
                    ),
                    // The TimeService's own, even "" (none); otherwise the operator's default.
                    priority_class_name: Some(
                        spec.placement
                            .priority_class_name
                            .as_ref()
                            .unwrap_or(&settings.agent_priority_class)
                            .clone(),
                    )
                    .filter(|p| !p.is_empty()),
                    node_selector: Some(spec.placement.agent_node_selector()),
                    tolerations: Some(spec.placement.agent_tolerations()),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "state".into(),
                            host_path: Some(HostPathVolumeSource {
                                path: spec.discipline.drift_directory.clone(),
                                type_: Some("DirectoryOrCreate".into()),
                            }),
                            ..Volume::default()
                        },
                        // Always mounted, so the first NTS tenant restarts no agent: the
                        // kubelet fills in and updates the files as the operator writes the
                        // Secret, and the agents read them again when they change. Owner-only:
                        // it holds private keys.
                        Volume {
                            name: NTS_VOLUME.into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(names::nts_secret_name(name)),
                                optional: Some(true),
                                default_mode: Some(0o400),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    termination_grace_period_seconds: Some(AGENT_GRACE_SECONDS),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    fn pod_spec(ds: &DaemonSet) -> &PodSpec {
        ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn agents_get_sys_time_only_never_privileged_and_a_read_only_root() {
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        let sc = pod_spec(&ds).containers[0]
            .security_context
            .as_ref()
            .unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(caps.add.as_deref(), Some(&["SYS_TIME".to_string()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn a_deleted_agent_drains_before_sigterm_within_its_grace_period() {
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        let pod = pod_spec(&ds);
        let sleep = pod.containers[0]
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .unwrap();
        assert_eq!(sleep.seconds, AGENT_DRAIN_SECONDS);
        let grace = pod.termination_grace_period_seconds.unwrap();
        assert!(
            sleep.seconds > 0 && sleep.seconds * 2 < grace,
            "{sleep:?} of {grace} s"
        );
    }

    #[test]
    fn a_simulated_clock_keeps_the_production_pod_spec() {
        let production = fixtures::time_service("cluster");
        let mut trial = production.clone();
        trial.spec.discipline.clock = Some(stratum_api::time_service::ClockSource::Simulated);
        let settings = fixtures::settings();
        assert_eq!(
            build_daemonset(&trial, &settings, false).unwrap(),
            build_daemonset(&production, &settings, false).unwrap()
        );
    }

    #[test]
    fn net_bind_service_is_added_only_for_ports_below_1024_and_monitor_drops_sys_time() {
        let mut ts = fixtures::time_service("cluster");
        assert!(needs_net_bind([12300, 123]) && !needs_net_bind([12300]));
        ts.spec.discipline.mode = DisciplineMode::Monitor;
        let ds = build_daemonset(&ts, &fixtures::settings(), true).unwrap();
        let caps = pod_spec(&ds).containers[0]
            .security_context
            .clone()
            .unwrap()
            .capabilities
            .unwrap();
        assert_eq!(caps.add.unwrap(), ["NET_BIND_SERVICE"]);
    }

    #[test]
    fn agents_tolerate_every_taint_unless_the_time_service_lists_its_own() {
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        let everything = k8s_openapi::api::core::v1::Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        assert_eq!(
            pod_spec(&ds).tolerations.as_deref(),
            Some(&[everything][..]),
            "no key and no effect: control-plane, NoSchedule and NoExecute taints alike"
        );

        let mut own = ts;
        let listed = k8s_openapi::api::core::v1::Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("time".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        own.spec.placement.tolerations = vec![listed.clone()];
        let ds = build_daemonset(&own, &fixtures::settings(), false).unwrap();
        assert_eq!(
            pod_spec(&ds).tolerations.as_deref(),
            Some(&[listed][..]),
            "exactly the listed ones, without the catch-all"
        );
    }

    #[test]
    fn agents_select_linux_nodes_whatever_else_the_node_selector_says() {
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        assert_eq!(
            pod_spec(&ds).node_selector,
            Some([("kubernetes.io/os".to_string(), "linux".to_string())].into())
        );

        let mut labelled = ts;
        labelled.spec.placement.node_selector = [
            ("time".to_string(), "yes".to_string()),
            ("kubernetes.io/os".to_string(), "windows".to_string()),
        ]
        .into();
        let ds = build_daemonset(&labelled, &fixtures::settings(), false).unwrap();
        assert_eq!(
            pod_spec(&ds).node_selector,
            Some(
                [
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    ("time".to_string(), "yes".to_string()),
                ]
                .into()
            ),
            "the user's labels are kept and the OS is always Linux"
        );
    }

    #[test]
    fn the_priority_class_is_the_time_services_own_else_the_operators_default() {
        let mut settings = fixtures::settings();
        let ts = fixtures::time_service("cluster");
        let class = |ts: &TimeService, settings: &OperatorSettings| {
            pod_spec(&build_daemonset(ts, settings, false).unwrap())
                .priority_class_name
                .clone()
        };
        assert_eq!(
            class(&ts, &settings).as_deref(),
            Some("system-node-critical")
        );
        settings.agent_priority_class = "stratum-node".into();
        assert_eq!(class(&ts, &settings).as_deref(), Some("stratum-node"));
        settings.agent_priority_class = String::new();
        assert_eq!(class(&ts, &settings), None, "an empty default sets none");

        let mut own = ts;
        own.spec.placement.priority_class_name = Some("time-critical".into());
        assert_eq!(class(&own, &settings).as_deref(), Some("time-critical"));
        settings.agent_priority_class = "stratum-node".into();
        own.spec.placement.priority_class_name = Some(String::new());
        assert_eq!(
            class(&own, &settings),
            None,
            "the TimeService's \"\" wins over the default"
        );
    }

    fn quantities(map: Option<&std::collections::BTreeMap<String, Quantity>>) -> Vec<(&str, &str)> {
        map.into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.0.as_str()))
            .collect()
    }

    #[test]
    fn agents_without_resources_get_small_requests_and_a_memory_limit() {
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        let resources = pod_spec(&ds).containers[0].resources.clone().unwrap();
        assert_eq!(
            quantities(resources.requests.as_ref()),
            [("cpu", "10m"), ("memory", "64Mi")],
            "requests: never BestEffort"
        );
        assert_eq!(
            quantities(resources.limits.as_ref()),
            [("memory", "384Mi")],
            "a memory limit and no CPU limit"
        );
    }

    #[test]
    fn resources_the_time_service_sets_are_used_exactly_as_given() {
        let mut ts = fixtures::time_service("cluster");
        ts.spec.agent = serde_json::from_value(serde_json::json!({
            "resources": { "limits": { "cpu": "1", "memory": "1Gi" } }
        }))
        .unwrap();
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        let resources = pod_spec(&ds).containers[0].resources.clone().unwrap();
        assert_eq!(resources.requests, None, "no default request is mixed in");
        assert_eq!(
            quantities(resources.limits.as_ref()),
            [("cpu", "1"), ("memory", "1Gi")]
        );

        // An explicit empty object is a choice too: no requests, no limits.
        ts.spec.agent = serde_json::from_value(serde_json::json!({ "resources": {} })).unwrap();
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        assert_eq!(
            pod_spec(&ds).containers[0].resources,
            Some(ResourceRequirements::default())
        );
    }

    fn pull_secret_names(ds: &DaemonSet) -> Option<Vec<&str>> {
        pod_spec(ds)
            .image_pull_secrets
            .as_ref()
            .map(|secrets| secrets.iter().map(|s| s.name.as_str()).collect())
    }

    #[test]
    fn agents_pull_with_the_operator_default_secrets_unless_the_time_service_names_its_own() {
        let mut settings = fixtures::settings();
        let ts = fixtures::time_service("cluster");
        let ds = build_daemonset(&ts, &settings, false).unwrap();
        assert_eq!(pull_secret_names(&ds), None, "no secrets anywhere: none");

        settings.agent_image_pull_secrets = vec!["regcred".into(), "mirror".into()];
        let ds = build_daemonset(&ts, &settings, false).unwrap();
        assert_eq!(pull_secret_names(&ds), Some(vec!["regcred", "mirror"]));

        let mut own = ts.clone();
        own.spec.agent.image_pull_secrets = Some(vec!["team-registry".into()]);
        let ds = build_daemonset(&own, &settings, false).unwrap();
        assert_eq!(pull_secret_names(&ds), Some(vec!["team-registry"]));

        let mut none = ts;
        none.spec.agent.image_pull_secrets = Some(Vec::new());
        let ds = build_daemonset(&none, &settings, false).unwrap();
        assert_eq!(
            pull_secret_names(&ds),
            None,
            "an explicit empty list turns the operator's defaults off"
        );
    }

    #[test]
    fn agent_image_pull_secrets_are_read_from_the_time_service_spec() {
        let mut ts = fixtures::time_service("cluster");
        ts.spec.agent = serde_json::from_value(serde_json::json!({
            "image": "registry.example.com/stratum/agent:0.1.0",
            "imagePullSecrets": ["regcred"]
        }))
        .unwrap();
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        assert_eq!(pull_secret_names(&ds), Some(vec!["regcred"]));
        assert_eq!(
            pod_spec(&ds).containers[0].image.as_deref(),
            Some("registry.example.com/stratum/agent:0.1.0")
        );
    }

    #[test]
    fn daemonset_follows_the_contract_names_args_env_and_placement() {
        let mut ts = fixtures::time_service("cluster");
        ts.spec
            .placement
            .node_selector
            .insert("time".into(), "yes".into());
        ts.spec
            .placement
            .tolerations
            .push(k8s_openapi::api::core::v1::Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            });
        let ds = build_daemonset(&ts, &fixtures::settings(), false).unwrap();
        assert_eq!(ds.metadata.name.as_deref(), Some("cluster-agent"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("stratum-system"));
        let spec = ds.spec.as_ref().unwrap();
        assert_eq!(
            spec.selector.match_labels.as_ref(),
            Some(&names::agent_labels("cluster"))
        );
        assert_eq!(
            spec.update_strategy.as_ref().unwrap().type_.as_deref(),
            Some("RollingUpdate")
        );
        let pod = pod_spec(&ds);
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("cluster-agent"));
        assert_eq!(pod.node_selector.as_ref().unwrap()["time"], "yes");
        assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("stratum/agent:test"));
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "run");
        assert!(
            args.windows(2)
                .any(|w| w == ["--config-map", "stratum-system/cluster-agent-config"])
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--state-dir", "/var/lib/stratum"])
        );
        let node_name = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .unwrap();
        assert_eq!(
            node_name
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "spec.nodeName"
        );
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
        let volume = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(volume.host_path.as_ref().unwrap().path, "/var/lib/stratum");
        assert_eq!(
            volume.host_path.as_ref().unwrap().type_.as_deref(),
            Some("DirectoryOrCreate")
        );
        // The NTS key material: the operator's Secret of this TimeService, optional (the pods
        // start before it exists), owner-read-only, mounted read-only where the config's
        // paths point.
        let nts = &pod.volumes.as_ref().unwrap()[1];
        let secret = nts.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("cluster-agent-nts"));
        assert_eq!(
            (secret.optional, secret.default_mode),
            (Some(true), Some(0o400))
        );
        let mount = &c.volume_mounts.as_ref().unwrap()[1];
        assert_eq!(
            (
                mount.name.as_str(),
                mount.mount_path.as_str(),
                mount.read_only
            ),
            ("nts", NTS_MATERIAL_DIR, Some(true))
        );
    }
}
