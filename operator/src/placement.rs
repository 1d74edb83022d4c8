//! Which nodes a TimeService's agents belong on, decided as the DaemonSet controller decides
//! it: the agents' node selector (always Linux) matches the node's labels, and each of its
//! `NoSchedule` and `NoExecute` taints is tolerated, by the agents' own tolerations or by those
//! Kubernetes gives every daemon pod. A node placed here that runs no agent is one the
//! scheduler or the kubelet refused (resources, a quota, an image): TimeService status names it.

use k8s_openapi::api::core::v1::{Taint, Toleration};
use stratum_api::TimeServiceSpec;

use crate::model::NodeInfo;
use crate::selector::Selector;

/// Taints every DaemonSet pod tolerates, added by the DaemonSet controller itself (key,
/// effect), so node problems and a cordon never take a node's daemons away.
const DAEMON_POD_TOLERATIONS: [(&str, &str); 6] = [
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];
/// Tolerated by host-network daemon pods too: they need no pod network.
const HOST_NETWORK_TOLERATION: (&str, &str) =
    ("node.kubernetes.io/network-unavailable", "NoSchedule");

/// The nodes one TimeService's agents belong on.
#[derive(Clone, Debug)]
pub struct AgentPlacement {
    selector: Selector,
    tolerations: Vec<Toleration>,
}

impl AgentPlacement {
    /// The placement of `spec`'s agent pods, with the tolerations their DaemonSet gets.
    pub fn of(spec: &TimeServiceSpec) -> Self {
        let mut tolerations = spec.placement.agent_tolerations();
        let host_network = spec.agent.host_network.then_some(HOST_NETWORK_TOLERATION);
        for (key, effect) in DAEMON_POD_TOLERATIONS.into_iter().chain(host_network) {
            tolerations.push(Toleration {
                key: Some(key.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some(effect.to_owned()),
                ..Toleration::default()
            });
        }
        Self {
            selector: Selector::from_labels(&spec.placement.agent_node_selector()),
            tolerations,
        }
    }

    /// Whether an agent belongs on `node`.
    pub fn admits(&self, node: &NodeInfo) -> bool {
        self.selector.matches(&node.labels)
            && node
                .taints
                .iter()
                .all(|taint| self.tolerations.iter().any(|t| tolerates(t, taint)))
    }
}

/// Kubernetes' rule (`Toleration.ToleratesTaint`): an empty effect or key matches any;
/// `Exists` matches any value, `Equal` (or no operator) only the same one. An operator this
/// version does not know tolerates nothing.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    fn set(s: &Option<String>) -> Option<&str> {
        s.as_deref().filter(|s| !s.is_empty())
    }
    if set(&toleration.effect).is_some_and(|e| e != taint.effect) {
        return false;
    }
    if set(&toleration.key).is_some_and(|k| k != taint.key) {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or_default() {
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        "Exists" => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::selector::Labels;

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: (!value.is_empty()).then(|| value.into()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn node(labels: &[(&str, &str)], taints: Vec<Taint>) -> NodeInfo {
        NodeInfo {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
            taints,
        }
    }

    fn spec(placement: serde_json::Value) -> TimeServiceSpec {
        serde_json::from_value(serde_json::json!({
            "upstreams": [{ "host": "pool.ntp.org" }], "placement": placement
        }))
        .unwrap()
    }

    const LINUX: (&str, &str) = ("kubernetes.io/os", "linux");

    #[test]
    fn by_default_every_linux_node_is_placed_whatever_its_taints() {
        let placement = AgentPlacement::of(&spec(serde_json::json!({})));
        let control_plane = taint("node-role.kubernetes.io/control-plane", "", "NoSchedule");
        let evicting = taint("dedicated", "db", "NoExecute");
        assert!(placement.admits(&node(&[LINUX], vec![control_plane, evicting])));
        assert!(!placement.admits(&node(&[("kubernetes.io/os", "windows")], vec![])));
        assert!(
            !placement.admits(&node(&[], vec![])),
            "a node without the OS label gets no agent pod either"
        );
    }

    #[test]
    fn listed_tolerations_place_only_nodes_whose_taints_they_all_tolerate() {
        let placement = AgentPlacement::of(&spec(serde_json::json!({
            "nodeSelector": { "pool": "a" },
            "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "time", "effect": "NoSchedule" }]
        })));
        let pool_a = [LINUX, ("pool", "a")];
        assert!(placement.admits(&node(&pool_a, vec![])));
        assert!(placement.admits(&node(
            &pool_a,
            vec![taint("dedicated", "time", "NoSchedule")]
        )));
        assert!(!placement.admits(&node(&pool_a, vec![taint("dedicated", "db", "NoSchedule")])));
        assert!(!placement.admits(&node(
            &pool_a,
            vec![taint("dedicated", "time", "NoExecute")]
        )));
        assert!(!placement.admits(&node(&[LINUX], vec![])), "not in pool a");
        // What every daemon pod tolerates: a cordon, a node going not ready.
        let cordoned = vec![
            taint("node.kubernetes.io/unschedulable", "", "NoSchedule"),
            taint("node.kubernetes.io/not-ready", "", "NoExecute"),
            taint("node.kubernetes.io/network-unavailable", "", "NoSchedule"),
        ];
        assert!(placement.admits(&node(&pool_a, cordoned.clone())));
        let mut pod_network = spec(serde_json::json!({
            "nodeSelector": { "pool": "a" },
            "tolerations": [{ "key": "dedicated", "operator": "Exists" }]
        }));
        pod_network.agent.host_network = false;
        assert!(
            !AgentPlacement::of(&pod_network).admits(&node(&pool_a, cordoned)),
            "only host-network pods tolerate a node without its pod network"
        );
    }

    #[test]
    fn tolerations_match_as_kubernetes_matches_them() {
        let t = |key: &str, op: &str, value: &str, effect: &str| Toleration {
            key: (!key.is_empty()).then(|| key.into()),
            operator: (!op.is_empty()).then(|| op.into()),
            value: (!value.is_empty()).then(|| value.into()),
            effect: (!effect.is_empty()).then(|| effect.into()),
            ..Toleration::default()
        };
        let gpu = taint("gpu", "a100", "NoSchedule");
        assert!(tolerates(&t("", "Exists", "", ""), &gpu));
        assert!(tolerates(&t("gpu", "Exists", "", ""), &gpu));
        assert!(tolerates(&t("gpu", "", "a100", "NoSchedule"), &gpu));
        assert!(tolerates(&t("gpu", "Equal", "a100", ""), &gpu));
        assert!(!tolerates(&t("gpu", "Equal", "h100", ""), &gpu));
        assert!(!tolerates(&t("gpu", "Exists", "", "NoExecute"), &gpu));
        assert!(!tolerates(&t("tpu", "Exists", "", ""), &gpu));
        assert!(
            !tolerates(&t("gpu", "Gt", "1", ""), &gpu),
            "unknown operator"
        );
    }
}
