//! The plain-data model: what the watches saw, trimmed to what the operator reads (pods,
//! namespaces, nodes, NodeClocks, TimeServices). Facts only, with no judgement and no cache; every
//! other module may read it, and it imports none of them but the label types and names.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use stratum_api::{NodeClock, TimeServiceSpec};

use crate::names;
use crate::selector::Labels;

/// A pod as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// Pod labels.
    pub labels: Labels,
    /// Every address of `status.podIPs` (falling back to `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// The node the pod runs on.
    pub node_name: Option<String>,
    /// The Ready condition is True.
    pub ready: bool,
    /// Phase Succeeded or Failed: its addresses may belong to someone else by now.
    pub terminated: bool,
    /// Being deleted (deletionTimestamp set): it may still serve, but takes no new clients.
    pub terminating: bool,
}

impl PodInfo {
    /// Trims a Pod to what the operator needs; `None` without a namespace.
    pub fn from_pod(pod: &Pod) -> Option<(String, PodInfo)> {
        let namespace = pod.metadata.namespace.clone()?;
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        let phase = status.and_then(|s| s.phase.as_deref());
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        Some((
            namespace,
            PodInfo {
                name: pod.name_any(),
                labels: pod.labels().clone(),
                ips,
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                ready,
                terminated: matches!(phase, Some("Succeeded" | "Failed")),
                terminating: pod.metadata.deletion_timestamp.is_some(),
            },
        ))
    }
}

/// A Node as the operator sees it: its labels, and the taints that keep pods off it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// Node labels.
    pub labels: Labels,
    /// Its `NoSchedule` and `NoExecute` taints, without `timeAdded` (`PreferNoSchedule` keeps
    /// no DaemonSet pod off a node).
    pub taints: Vec<Taint>,
}

impl NodeInfo {
    /// Trims a Node to what placement needs: a status heartbeat leaves it unchanged.
    pub fn from_node(node: &Node) -> NodeInfo {
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"))
            .map(|t| Taint {
                time_added: None,
                ..t.clone()
            })
            .collect();
        NodeInfo {
            labels: node.labels().clone(),
            taints,
        }
    }
}

impl From<Labels> for NodeInfo {
    fn from(labels: Labels) -> Self {
        NodeInfo {
            labels,
            taints: Vec::new(),
        }
    }
}

/// The Kubernetes version the API server serves, read once at start: what the cluster can do
/// that a tenant's spec may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl ServerVersion {
    /// The version whose features the server serves: its emulated version when it has one
    /// (a newer binary emulating an older release serves that release's features), else its
    /// own, read from `major`/`minor` ("1", "31+" on some providers) or else `gitVersion`
    /// ("v1.31.2-gke.1"). `None` when none of them parses.
    pub fn from_info(info: &k8s_openapi::apimachinery::pkg::version::Info) -> Option<Self> {
        fn number(s: &str) -> Option<u32> {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        }
        let pair = |major: &str, minor: &str| {
            Some(ServerVersion {
                major: number(major)?,
                minor: number(minor)?,
            })
        };
        if let (Some(major), Some(minor)) = (&info.emulation_major, &info.emulation_minor)
            && let Some(v) = pair(major, minor)
        {
            return Some(v);
        }
        pair(&info.major, &info.minor).or_else(|| {
            let mut parts = info.git_version.trim_start_matches('v').splitn(3, '.');
            pair(parts.next()?, parts.next()?)
        })
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A NodeClock as the operator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClockInfo {
    /// The node (the NodeClock's name).
    pub node: String,
    /// The TimeService whose agent wrote it.
    pub time_service: String,
    /// The agent reports a synchronized clock.
    pub synchronized: bool,
    /// Offset from true time.
    pub offset_nanos: i64,
    /// Stratum served.
    pub stratum: i32,
    /// Root delay / 2 + root dispersion: the bound on the node clock's error.
    pub root_distance_nanos: i64,
    /// The agent config revision in force.
    pub config_revision: Option<String>,
    /// Its sources' configured hosts (`status.sources[].name`), to check against the
    /// upstreams its TimeService designates.
    pub sources: Vec<String>,
    /// The agent sees another time daemon on the node (its `OtherTimeDaemon` condition).
    pub other_time_daemon: bool,
}

impl ClockInfo {
    /// Trims a NodeClock.
    pub fn from_node_clock(clock: &NodeClock) -> ClockInfo {
        let status = clock.status.clone().unwrap_or_default();
        let other_time_daemon = status
            .conditions
            .iter()
            .any(|c| c.type_ == "OtherTimeDaemon" && c.status == "True");
        ClockInfo {
            node: clock.metadata.name.clone().unwrap_or_default(),
            time_service: clock.spec.time_service.clone(),
            synchronized: status.synchronized,
            offset_nanos: status.offset_nanos,
            stratum: status.stratum,
            root_distance_nanos: status.root_delay_nanos.saturating_abs() / 2
                + status.root_dispersion_nanos.saturating_abs(),
            config_revision: status.config_revision,
            sources: status.sources.into_iter().map(|s| s.name).collect(),
            other_time_daemon,
        }
    }

    /// Whether this node may serve a tenant requiring at most `max_root_distance_nanos`.
    pub fn serves(&self, max_root_distance_nanos: Option<i64>) -> bool {
        self.synchronized
            && max_root_distance_nanos.is_none_or(|max| self.root_distance_nanos <= max)
    }

    /// The part of a clock report that TimeService status, endpoint readiness and the
    /// designated-sources check track; other changes (offset drift, heartbeats) are picked up
    /// at the next periodic reconcile.
    pub fn summary(&self) -> (&str, bool, i32, Option<&str>, &[String], bool) {
        (
            &self.time_service,
            self.synchronized,
            self.stratum,
            self.config_revision.as_deref(),
            &self.sources,
            self.other_time_daemon,
        )
    }
}

/// Namespaces and their pods.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    namespaces: BTreeMap<String, Labels>,
    pods: HashMap<String, BTreeMap<String, PodInfo>>,
}

impl Cluster {
    /// Every known namespace with its labels.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Labels)> {
        self.namespaces.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Labels of one namespace.
    pub fn namespace_labels(&self, ns: &str) -> Option<&Labels> {
        self.namespaces.get(ns)
    }

    /// Pods of one namespace.
    pub fn pods_in(&self, ns: &str) -> impl Iterator<Item = &PodInfo> {
        self.pods.get(ns).into_iter().flat_map(|m| m.values())
    }

    /// Number of pods indexed.
    pub fn pod_count(&self) -> usize {
        self.pods.values().map(BTreeMap::len).sum()
    }

    /// Inserts or replaces a pod; returns the previous version when something changed.
    pub fn upsert_pod(&mut self, ns: &str, pod: PodInfo) -> Option<Option<PodInfo>> {
        let pods = self.pods.entry(ns.to_owned()).or_default();
        match pods.get(&pod.name) {
            Some(old) if *old == pod => None,
            _ => Some(pods.insert(pod.name.clone(), pod)),
        }
    }

    /// Removes a pod, returning it.
    pub fn remove_pod(&mut self, ns: &str, name: &str) -> Option<PodInfo> {
        let pods = self.pods.get_mut(ns)?;
        let old = pods.remove(name);
        if pods.is_empty() {
            self.pods.remove(ns);
        }
        old
    }

    /// Inserts or replaces a namespace; returns the previous labels when they changed.
    pub fn upsert_namespace(&mut self, ns: &str, labels: Labels) -> Option<Option<Labels>> {
        match self.namespaces.get(ns) {
            Some(old) if *old == labels => None,
            _ => Some(self.namespaces.insert(ns.to_owned(), labels)),
        }
    }

    /// Removes a namespace, returning its labels.
    pub fn remove_namespace(&mut self, ns: &str) -> Option<Labels> {
        self.namespaces.remove(ns)
    }
}

/// A TimeService as indexed.
#[derive(Clone, Debug)]
pub struct TimeServiceEntry {
    /// Name.
    pub name: String,
    /// creationTimestamp.
    pub created: Option<Timestamp>,
    /// The spec.
    pub spec: TimeServiceSpec,
}

/// Whether `labels` are those of an agent pod of `time_service`.
pub fn is_agent_of(labels: &Labels, time_service: &str) -> bool {
    labels.get("app.kubernetes.io/name").map(String::as_str) == Some(names::AGENT_APP_NAME)
        && labels.get(names::TIME_SERVICE_LABEL).map(String::as_str) == Some(time_service)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::apimachinery::pkg::version::Info;

    use super::ServerVersion;

    fn info(major: &str, minor: &str, git: &str) -> Info {
        Info {
            major: major.into(),
            minor: minor.into(),
            git_version: git.into(),
            ..Info::default()
        }
    }

    #[test]
    fn the_server_version_is_read_from_what_providers_report() {
        let v = |major, minor| Some(ServerVersion { major, minor });
        assert_eq!(
            ServerVersion::from_info(&info("1", "36", "v1.36.4")),
            v(1, 36)
        );
        assert_eq!(
            ServerVersion::from_info(&info("1", "31+", "v1.31.2-gke.1200")),
            v(1, 31)
        );
        assert_eq!(
            ServerVersion::from_info(&info("", "", "v1.33.1-eks-abc")),
            v(1, 33),
            "gitVersion when major and minor are empty"
        );
        let mut emulating = info("1", "35", "v1.35.0");
        emulating.emulation_major = Some("1".into());
        emulating.emulation_minor = Some("33".into());
        assert_eq!(
            ServerVersion::from_info(&emulating),
            v(1, 33),
            "a server emulating an older release serves that release's features"
        );
        assert_eq!(ServerVersion::from_info(&info("", "", "devel")), None);
        assert!(v(1, 33) < v(1, 34) && v(1, 34) < v(2, 0));
        assert_eq!(v(1, 34).unwrap().to_string(), "1.34");
    }
}
