//! Who may change TimeServices and TenantTimePolicies: a walk of every binding to its role's
//! rules, wildcards and aggregated ClusterRoles included, grouped by principal.
//!
//! A walk rather than SubjectAccessReviews: a review answers for one named user, and a
//! reviewer needs the list of everyone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::rbac::v1::{
    AggregationRule, ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef,
    Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::model::{Grant, PrincipalAccess};

/// Verbs that change an object.
pub const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// The RBAC objects of a cluster.
#[derive(Clone, Debug, Default)]
pub struct RbacObjects {
    /// Every ClusterRole.
    pub cluster_roles: Vec<ClusterRole>,
    /// Every Role.
    pub roles: Vec<Role>,
    /// Every ClusterRoleBinding.
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// Every RoleBinding.
    pub role_bindings: Vec<RoleBinding>,
}

/// Groups whose members are every (authenticated) user: a write grant to one of them is open
/// to all.
pub const EVERYONE_GROUPS: [&str; 2] = ["system:authenticated", "system:unauthenticated"];

/// Every principal that may write either kind, sorted.
pub fn principals(rbac: &RbacObjects) -> Vec<PrincipalAccess> {
    let cluster_roles: BTreeMap<&str, &ClusterRole> = rbac
        .cluster_roles
        .iter()
        .filter_map(|r| Some((r.metadata.name.as_deref()?, r)))
        .collect();
    let roles: BTreeMap<(&str, &str), &Role> = rbac
        .roles
        .iter()
        .filter_map(|r| {
            Some((
                (
                    r.metadata.namespace.as_deref()?,
                    r.metadata.name.as_deref()?,
                ),
                r,
            ))
        })
        .collect();
    let mut out: BTreeMap<(String, String), BTreeSet<Grant>> = BTreeMap::new();
    let mut add = |subjects: &[Subject], grants: Vec<Grant>, binding_ns: Option<&str>| {
        if grants.is_empty() {
            return;
        }
        for s in subjects {
            let name = if s.kind == "ServiceAccount" {
                // A ServiceAccount subject without a namespace is the binding's namespace's.
                let ns = s.namespace.as_deref().or(binding_ns).unwrap_or("");
                format!("{ns}/{}", s.name)
            } else {
                s.name.clone()
            };
            out.entry((s.kind.clone(), name))
                .or_default()
                .extend(grants.iter().cloned());
        }
    };
    for b in &rbac.cluster_role_bindings {
        let name = b.metadata.name.as_deref().unwrap_or("");
        let rules = role_rules(&b.role_ref, None, &cluster_roles, &roles);
        let via = format!("ClusterRoleBinding {name} → {}", role_label(&b.role_ref));
        let grants = grants_of(&rules, "cluster", None, &via);
        add(b.subjects.as_deref().unwrap_or_default(), grants, None);
    }
    for b in &rbac.role_bindings {
        let ns = b.metadata.namespace.as_deref().unwrap_or("");
        let name = b.metadata.name.as_deref().unwrap_or("");
        let rules = role_rules(&b.role_ref, Some(ns), &cluster_roles, &roles);
        let via = format!("RoleBinding {ns}/{name} → {}", role_label(&b.role_ref));
        let grants = grants_of(&rules, &format!("namespace {ns}"), Some(ns), &via);
        add(b.subjects.as_deref().unwrap_or_default(), grants, Some(ns));
    }
    out.into_iter()
        .map(|((kind, name), grants)| PrincipalAccess {
            kind,
            name,
            grants: grants.into_iter().collect(),
        })
        .collect()
}

fn role_label(r: &RoleRef) -> String {
    format!("{} {}", r.kind, r.name)
}

/// The rules a binding's role grants: a Role of the binding's namespace, or a ClusterRole
/// with its aggregated roles' rules (the API server copies those into the aggregate, but a
/// report should not depend on its controller having run).
fn role_rules<'a>(
    role_ref: &RoleRef,
    binding_ns: Option<&str>,
    cluster_roles: &BTreeMap<&str, &'a ClusterRole>,
    roles: &BTreeMap<(&str, &str), &'a Role>,
) -> Vec<&'a PolicyRule> {
    match role_ref.kind.as_str() {
        "ClusterRole" => {
            let mut seen = BTreeSet::new();
            let mut rules = Vec::new();
            collect_cluster_role(&role_ref.name, cluster_roles, &mut seen, &mut rules);
            rules
        }
        "Role" => binding_ns
            .and_then(|ns| roles.get(&(ns, role_ref.name.as_str())))
            .and_then(|r| r.rules.as_ref())
            .map(|rules| rules.iter().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn collect_cluster_role<'a>(
    name: &str,
    cluster_roles: &BTreeMap<&str, &'a ClusterRole>,
    seen: &mut BTreeSet<String>,
    rules: &mut Vec<&'a PolicyRule>,
) {
    // Aggregation may be circular; each role counts once.
    if !seen.insert(name.to_owned()) {
        return;
    }
    let Some(role) = cluster_roles.get(name) else {
        return;
    };
    rules.extend(role.rules.iter().flatten());
    if let Some(AggregationRule {
        cluster_role_selectors: Some(selectors),
    }) = &role.aggregation_rule
    {
        for (other, r) in cluster_roles {
            let labels = r.metadata.labels.clone().unwrap_or_default();
            if selectors.iter().any(|s| selects(s, &labels)) {
                collect_cluster_role(other, cluster_roles, seen, rules);
            }
        }
    }
}

/// Label selector semantics; an empty selector selects everything.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            // An operator the API server would refuse selects nothing.
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// What `rules` grant on Stratum's two configuration kinds. A namespaced binding grants
/// nothing on the cluster-scoped TimeServices.
fn grants_of(
    rules: &[&PolicyRule],
    scope: &str,
    binding_ns: Option<&str>,
    via: &str,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for resource in ["timeservices", "tenanttimepolicies"] {
        if resource == "timeservices" && binding_ns.is_some() {
            continue;
        }
        let mut verbs = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut unrestricted = false;
        for rule in rules {
            let groups = rule.api_groups.as_deref().unwrap_or_default();
            let resources = rule.resources.as_deref().unwrap_or_default();
            if !groups.iter().any(|g| g == "*" || g == stratum_api::GROUP)
                || !resources.iter().any(|r| r == "*" || r == resource)
            {
                continue;
            }
            let granted: Vec<&str> = if rule.verbs.iter().any(|v| v == "*") {
                WRITE_VERBS.to_vec()
            } else {
                WRITE_VERBS
                    .iter()
                    .copied()
                    .filter(|w| rule.verbs.iter().any(|v| v == w))
                    .collect()
            };
            if granted.is_empty() {
                continue;
            }
            verbs.extend(granted);
            match rule.resource_names.as_deref() {
                Some(n) if !n.is_empty() => names.extend(n.iter().cloned()),
                _ => unrestricted = true,
            }
        }
        if !verbs.is_empty() {
            out.push(Grant {
                resource: resource.to_owned(),
                // In the order of WRITE_VERBS, which reads as create → delete.
                verbs: WRITE_VERBS
                    .iter()
                    .filter(|v| verbs.contains(*v))
                    .map(|v| (*v).to_owned())
                    .collect(),
                scope: scope.to_owned(),
                resource_names: if unrestricted {
                    Vec::new()
                } else {
                    names.into_iter().collect()
                },
                via: via.to_owned(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn objects() -> RbacObjects {
        RbacObjects {
            cluster_roles: vec![
                from(json!({"metadata": {"name": "cluster-admin"},
                    "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]})),
                from(json!({"metadata": {"name": "view"},
                    "rules": [{"apiGroups": ["stratum.io"], "resources": ["*"], "verbs": ["get", "list"]}]})),
                // An aggregate whose own rules are empty (the controller has not filled them).
                from(json!({"metadata": {"name": "edit"},
                    "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"aggregate-to-edit": "true"}}]}})),
                from(
                    json!({"metadata": {"name": "stratum-edit", "labels": {"aggregate-to-edit": "true"}},
                    "rules": [{"apiGroups": ["stratum.io"], "resources": ["tenanttimepolicies"],
                        "verbs": ["create", "patch", "delete"]}]}),
                ),
                from(json!({"metadata": {"name": "one-service"},
                    "rules": [{"apiGroups": ["stratum.io"], "resources": ["timeservices"],
                        "verbs": ["update"], "resourceNames": ["shared"]}]})),
            ],
            roles: vec![from(
                json!({"metadata": {"name": "tenant-admin", "namespace": "team-a"},
                "rules": [{"apiGroups": ["stratum.io"], "resources": ["tenanttimepolicies", "timeservices"],
                    "verbs": ["update"]}]}),
            )],
            cluster_role_bindings: vec![
                from(json!({"metadata": {"name": "admins"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                    "subjects": [{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "ops"}]})),
                from(json!({"metadata": {"name": "viewers"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                    "subjects": [{"kind": "Group", "name": "system:authenticated"}]})),
                from(json!({"metadata": {"name": "shared-owner"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "one-service"},
                    "subjects": [{"kind": "ServiceAccount", "name": "ci", "namespace": "build"}]})),
            ],
            role_bindings: vec![
                from(
                    json!({"metadata": {"name": "editors", "namespace": "team-a"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                    "subjects": [{"kind": "User", "name": "bob"}, {"kind": "ServiceAccount", "name": "deployer"}]}),
                ),
                from(json!({"metadata": {"name": "local", "namespace": "team-a"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant-admin"},
                    "subjects": [{"kind": "User", "name": "carol"}]})),
            ],
        }
    }

    fn find<'a>(p: &'a [PrincipalAccess], kind: &str, name: &str) -> Option<&'a PrincipalAccess> {
        p.iter().find(|p| p.kind == kind && p.name == name)
    }

    #[test]
    fn wildcard_rules_grant_every_write_verb_on_both_kinds_cluster_wide() {
        let p = principals(&objects());
        let alice = find(&p, "User", "alice").unwrap();
        assert_eq!(alice.grants.len(), 2);
        for g in &alice.grants {
            assert_eq!(g.verbs, WRITE_VERBS.map(str::to_owned));
            assert_eq!(g.scope, "cluster");
            assert_eq!(
                g.via,
                "ClusterRoleBinding admins → ClusterRole cluster-admin"
            );
        }
        assert!(find(&p, "Group", "ops").is_some());
    }

    #[test]
    fn read_only_grants_are_not_listed() {
        let p = principals(&objects());
        assert!(find(&p, "Group", "system:authenticated").is_none(), "{p:?}");
    }

    #[test]
    fn aggregated_cluster_roles_bring_their_rules_and_namespaced_bindings_stay_in_their_namespace()
    {
        let p = principals(&objects());
        let bob = find(&p, "User", "bob").unwrap();
        assert_eq!(bob.grants.len(), 1);
        assert_eq!(bob.grants[0].resource, "tenanttimepolicies");
        assert_eq!(bob.grants[0].scope, "namespace team-a");
        assert_eq!(bob.grants[0].verbs, ["create", "patch", "delete"]);
        // The subject's namespace defaults to the binding's.
        assert!(
            find(&p, "ServiceAccount", "team-a/deployer").is_some(),
            "{p:?}"
        );
    }

    #[test]
    fn a_role_binding_grants_nothing_on_cluster_scoped_time_services() {
        let p = principals(&objects());
        let carol = find(&p, "User", "carol").unwrap();
        let resources: Vec<_> = carol.grants.iter().map(|g| g.resource.as_str()).collect();
        assert_eq!(resources, ["tenanttimepolicies"]);
    }

    #[test]
    fn resource_names_restrict_a_grant_to_those_objects() {
        let p = principals(&objects());
        let ci = find(&p, "ServiceAccount", "build/ci").unwrap();
        assert_eq!(ci.grants[0].resource_names, ["shared"]);
        assert_eq!(ci.grants[0].verbs, ["update"]);
    }

    #[test]
    fn circular_aggregation_terminates() {
        let mut rbac = objects();
        rbac.cluster_roles.push(from(json!({"metadata": {"name": "loop", "labels": {"aggregate-to-edit": "true"}},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"aggregate-to-edit": "true"}}]}})));
        let p = principals(&rbac);
        assert!(find(&p, "User", "bob").is_some());
    }
}
