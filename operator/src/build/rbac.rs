//! The agents' identity and least-privilege RBAC: read and watch their own ConfigMap (a Role
//! scoped to that name), write NodeClocks and Events (a ClusterRole: NodeClocks are
//! cluster-scoped; which NodeClock an agent may write is enforced by the chart's admission
//! policy, as RBAC cannot express "the object named after my node").

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use stratum_api::TimeService;

use super::{OperatorSettings, agent_meta};
use crate::error::{Error, Result};
use crate::names;

/// The agents' ServiceAccount, Role, RoleBinding and ClusterRoleBinding.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRbac {
    /// ServiceAccount the DaemonSet runs as.
    pub service_account: ServiceAccount,
    /// Read access to the agent ConfigMap.
    pub role: Role,
    /// Binds `role`.
    pub role_binding: RoleBinding,
    /// Binds the chart's static agent ClusterRole.
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

/// Builds the agent identity and permissions of `ts`.
pub fn build_rbac(ts: &TimeService, settings: &OperatorSettings) -> Result<AgentRbac> {
    let name = ts
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingMetadata("TimeService name"))?;
    let ns = Some(settings.namespace.as_str());
    let agent = names::agent_name(name);
    let cluster_name = names::agent_cluster_name(name);
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: agent.clone(),
        namespace: Some(settings.namespace.clone()),
        ..Subject::default()
    };
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
            subjects: Some(vec![subject.clone()]),
        },
        // The cluster-wide rights (NodeClocks, Events) live in one static ClusterRole shipped
        // by the chart: the operator only binds it (RBAC `bind` on that name), so it never
        // needs, or could hand out, more than the agents get.
        cluster_role_binding: ClusterRoleBinding {
            metadata: agent_meta(ts, cluster_name, None)?,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: settings.agent_cluster_role.clone(),
            },
            subjects: Some(vec![subject]),
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
        let rbac = build_rbac(&ts, &fixtures::settings()).unwrap();
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
            Some("stratum-agent-cluster")
        );
        assert_eq!(rbac.cluster_role_binding.role_ref.name, "stratum-agent");
        assert_eq!(
            rbac.cluster_role_binding.subjects.as_ref().unwrap()[0].name,
            "cluster-agent"
        );
        assert_eq!(rbac.role_binding.role_ref.name, "cluster-agent");
    }
}
