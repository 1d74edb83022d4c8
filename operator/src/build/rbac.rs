//! The agents' identity and least-privilege RBAC: read and watch their own ConfigMap (a Role
//! scoped to that name), write NodeClocks and Events (a ClusterRole: NodeClocks are
//! cluster-scoped; which NodeClock an agent may write is enforced by the chart's admission
//! policy, as RBAC cannot express "the object named after my node").
//!
//! The cluster-wide rights come from one ClusterRoleBinding that the chart ships under the
//! agent ClusterRole's name. The operator keeps only its subject list, one ServiceAccount per
//! TimeService, so it needs write access to that single binding by name and to no other.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use stratum_api::TimeService;

use super::{OperatorSettings, agent_meta};
use crate::error::{Error, Result};
use crate::names;

/// The agents' ServiceAccount, Role and RoleBinding, and the shared ClusterRoleBinding.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRbac {
    /// ServiceAccount the DaemonSet runs as.
    pub service_account: ServiceAccount,
    /// Read access to the agent ConfigMap.
    pub role: Role,
    /// Binds `role`.
    pub role_binding: RoleBinding,
    /// The chart's binding of its static agent ClusterRole, listing every TimeService's agents.
    pub cluster_role_binding: ClusterRoleBinding,
}

fn rule(group: &str, resources: &[&str], verbs: &[&str], names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        resource_names: names,
        ..PolicyRule::default()
    }
}

/// Builds the agent identity and permissions of `ts`; `all_time_services` names every
/// TimeService, whose agents share the cluster-wide binding.
pub fn build_rbac<'a>(
    ts: &TimeService,
    settings: &OperatorSettings,
    all_time_services: impl IntoIterator<Item = &'a str>,
) -> Result<AgentRbac> {
    let name = ts
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TimeService name"))?;
    let ns = Some(settings.namespace.as_str());
    let agent = names::agent_name(name);
    let subject = |time_service: &str| Subject {
        kind: "ServiceAccount".into(),
        name: names::agent_name(time_service),
        namespace: Some(settings.namespace.clone()),
        ..Subject::default()
    };
    let mut time_services: Vec<&str> = all_time_services.into_iter().collect();
    time_services.push(name);
    time_services.sort_unstable();
    time_services.dedup();
    Ok(AgentRbac {
        service_account: ServiceAccount {
            metadata: agent_meta(ts, agent.clone(), ns)?,
            // Agents talk to the API server with their token; nothing else needs it mounted.
            automount_service_account_token: Some(true),
            ..ServiceAccount::default()
        },
        role: Role {
            metadata: agent_meta(ts, agent.clone(), ns)?,
            // list+watch with resourceNames is how a single-object watch
            // (fieldSelector=metadata.name=...) is authorized.
            rules: Some(vec![rule(
                "",
                &["configmaps"],
                &["get", "list", "watch"],
                Some(vec![names::agent_config_map_name(name)]),
            )]),
        },
        role_binding: RoleBinding {
            metadata: agent_meta(ts, agent.clone(), ns)?,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: agent,
            },
            subjects: Some(vec![subject(name)]),
        },
        // The cluster-wide rights (NodeClocks, Events) live in one static ClusterRole shipped
        // by the chart, bound by the chart's binding of the same name: the operator applies
        // only the subjects (no labels or owner: the chart owns the object), so it never needs,
        // or could hand out, more than the agents get.
        cluster_role_binding: ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(settings.agent_cluster_role.clone()),
                ..ObjectMeta::default()
            },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: settings.agent_cluster_role.clone(),
            },
            subjects: Some(time_services.into_iter().map(subject).collect()),
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn agents_may_only_read_their_own_config_map_and_write_clocks_and_events() {
        let ts = fixtures::time_service("cluster");
        let rbac = build_rbac(&ts, &fixtures::settings(), ["cluster"]).unwrap();
        let role_rules = rbac.role.rules.as_ref().unwrap();
        assert_eq!(role_rules.len(), 1);
        assert_eq!(
            role_rules[0].resource_names.as_deref(),
            Some(&["cluster-agent-config".to_string()][..])
        );
        assert!(
            role_rules[0]
                .verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str()))
        );
        assert_eq!(
            rbac.cluster_role_binding.metadata.name.as_deref(),
            Some("stratum-agent")
        );
        assert_eq!(rbac.cluster_role_binding.role_ref.name, "stratum-agent");
        assert_eq!(
            rbac.cluster_role_binding.subjects.as_ref().unwrap()[0].name,
            "cluster-agent"
        );
        assert_eq!(rbac.role_binding.role_ref.name, "cluster-agent");
    }

    #[test]
    fn one_shared_binding_lists_every_time_services_agents_and_claims_nothing_else() {
        let ts = fixtures::time_service("b");
        let rbac = build_rbac(&ts, &fixtures::settings(), ["c", "a", "b"]).unwrap();
        let binding = &rbac.cluster_role_binding;
        let subjects: Vec<_> = binding
            .subjects
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(subjects, ["a-agent", "b-agent", "c-agent"]);
        // The chart owns the object: no labels or owner references that would take it over,
        // and the same bytes from every TimeService's reconcile.
        assert_eq!(binding.metadata.labels, None);
        assert_eq!(binding.metadata.owner_references, None);
        let from_a = build_rbac(
            &fixtures::time_service("a"),
            &fixtures::settings(),
            ["b", "c"],
        )
        .unwrap()
        .cluster_role_binding;
        assert_eq!(&from_a, binding);
    }
}
