//! Ownership of tenant children: which Services, EndpointSlices and `time-config` ConfigMaps
//! exist (trimmed from metadata-only watches), which of them are Stratum's, and from that
//! which ones a tenant's plan must leave alone (a user's object of the same name: `Conflict`)
//! or delete (Stratum's children of the tenant that its plan no longer has).
//!
//! An object is Stratum's when it carries `app.kubernetes.io/managed-by=stratum-operator`, an
//! owner reference to one of Stratum's kinds, or fields managed by the operator's field
//! manager. Anything else is never applied over, patched or deleted.
//!
//! The residual race: ownership is read from a watch cache, so a user object created in the
//! moment between the cache's last event and our server-side apply (a cache lag, normally
//! milliseconds) would be applied over. Deletes cannot hit a user's object: they carry the
//! uid of the object the cache saw as ours as a precondition.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::names;

/// The kinds of tenant children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    /// The tenant's NTP Service.
    Service,
    /// One of its EndpointSlices.
    EndpointSlice,
    /// The namespace's `time-config` ConfigMap.
    ConfigMap,
}

impl ChildKind {
    /// The Kubernetes kind, for messages.
    pub fn kind(self) -> &'static str {
        match self {
            ChildKind::Service => "Service",
            ChildKind::EndpointSlice => "EndpointSlice",
            ChildKind::ConfigMap => "ConfigMap",
        }
    }
}

/// One existing object, trimmed to what ownership needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildMeta {
    /// Its uid: the precondition of any delete.
    pub uid: Option<String>,
    /// Stratum created it (see the module docs).
    pub stratums: bool,
    /// `stratum.io/tenant`: the tenant (of the object's namespace) it belongs to.
    pub tenant: Option<String>,
}

impl ChildMeta {
    /// Trims an object's metadata.
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        Self {
            uid: meta.uid.clone(),
            stratums: is_stratums(meta),
            tenant: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(names::TENANT_LABEL))
                .cloned(),
        }
    }
}

/// Whether Stratum created the object: it carries our managed-by label, which Stratum sets on
/// every child it creates and which the chart's admission policy checks before any write. An
/// owner reference to one of our kinds, or fields of our field manager, prove nothing: a user
/// may add the first to their own object, and an older operator force-applied the second onto
/// users' Services it took over. One marker, the same one the API server enforces.
pub fn is_stratums(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == names::MANAGED_BY)
}

/// A child named for a delete: kind, namespace, name and the uid it must still have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChildRef {
    /// Kind.
    pub kind: ChildKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The uid seen; the delete's precondition.
    pub uid: Option<String>,
}

impl std::fmt::Display for ChildRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.kind(), self.namespace, self.name)
    }
}

/// Every watched Service, every Stratum EndpointSlice and every `time-config` ConfigMap, by
/// namespace, kind and name (nested, so that lookups by `&str` allocate nothing).
#[derive(Clone, Debug, Default)]
pub struct Children {
    objects: HashMap<String, BTreeMap<ChildKind, BTreeMap<String, ChildMeta>>>,
}

impl Children {
    /// Records an object; returns the previous version when something that matters changed.
    pub fn upsert(
        &mut self,
        kind: ChildKind,
        namespace: &str,
        name: &str,
        meta: ChildMeta,
    ) -> Option<Option<ChildMeta>> {
        if self.get(kind, namespace, name) == Some(&meta) {
            return None;
        }
        Some(
            self.objects
                .entry(namespace.to_owned())
                .or_default()
                .entry(kind)
                .or_default()
                .insert(name.to_owned(), meta),
        )
    }

    /// Forgets an object, returning it.
    pub fn remove(&mut self, kind: ChildKind, namespace: &str, name: &str) -> Option<ChildMeta> {
        let kinds = self.objects.get_mut(namespace)?;
        let names = kinds.get_mut(&kind)?;
        let old = names.remove(name);
        if names.is_empty() {
            kinds.remove(&kind);
            if kinds.is_empty() {
                self.objects.remove(namespace);
            }
        }
        old
    }

    /// The object, if it exists.
    pub fn get(&self, kind: ChildKind, namespace: &str, name: &str) -> Option<&ChildMeta> {
        self.objects.get(namespace)?.get(&kind)?.get(name)
    }

    /// An object of this name that exists and is not Stratum's: the plan must not touch it.
    pub fn foreign(&self, kind: ChildKind, namespace: &str, name: &str) -> Option<ChildRef> {
        self.get(kind, namespace, name)
            .filter(|m| !m.stratums)
            .map(|m| ChildRef {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: m.uid.clone(),
            })
    }

    /// Stratum's children of tenant `tenant` in `namespace` that `keep` does not hold: what
    /// the tenant's reconcile deletes after applying its plan.
    pub fn orphans(
        &self,
        namespace: &str,
        tenant: &str,
        keep: &BTreeSet<(ChildKind, String)>,
    ) -> Vec<ChildRef> {
        let mut out = Vec::new();
        for (kind, names) in self.objects.get(namespace).into_iter().flatten() {
            for (name, meta) in names {
                if meta.stratums
                    && meta.tenant.as_deref() == Some(tenant)
                    && !keep.contains(&(*kind, name.clone()))
                {
                    out.push(ChildRef {
                        kind: *kind,
                        namespace: namespace.to_owned(),
                        name: name.clone(),
                        uid: meta.uid.clone(),
                    });
                }
            }
        }
        out
    }

    /// Number of objects known.
    pub fn len(&self) -> usize {
        self.objects
            .values()
            .flat_map(BTreeMap::values)
            .map(BTreeMap::len)
            .sum()
    }

    /// Nothing known.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};

    use super::*;

    fn meta(labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            uid: Some("u1".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn only_our_managed_by_label_makes_an_object_stratums() {
        assert!(is_stratums(&meta(&[(
            "app.kubernetes.io/managed-by",
            "stratum-operator"
        )])));
        // A user's Service pointing its owner reference at their TenantTimePolicy, or one that
        // an older operator force-applied fields onto: still the user's.
        let mut owned = meta(&[]);
        owned.owner_references = Some(vec![OwnerReference {
            api_version: "stratum.io/v1alpha1".into(),
            kind: "TenantTimePolicy".into(),
            name: "t".into(),
            uid: "x".into(),
            ..OwnerReference::default()
        }]);
        assert!(!is_stratums(&owned));
        let mut managed = meta(&[]);
        managed.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("stratum-operator".into()),
            operation: Some("Apply".into()),
            ..ManagedFieldsEntry::default()
        }]);
        assert!(!is_stratums(&managed));

        let mut users = meta(&[("app.kubernetes.io/managed-by", "helm")]);
        users.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl-client-side-apply".into()),
            ..ManagedFieldsEntry::default()
        }]);
        users.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            ..OwnerReference::default()
        }]);
        assert!(!is_stratums(&users));
    }

    fn ours(tenant: &str, uid: &str) -> ChildMeta {
        ChildMeta {
            uid: Some(uid.into()),
            stratums: true,
            tenant: Some(tenant.into()),
        }
    }

    #[test]
    fn orphans_are_the_tenants_own_children_the_plan_does_not_keep() {
        let mut c = Children::default();
        c.upsert(ChildKind::Service, "vms", "ntp", ours("t", "s1"));
        c.upsert(ChildKind::Service, "vms", "time", ours("t", "s2"));
        c.upsert(
            ChildKind::EndpointSlice,
            "vms",
            "ntp-stratum-ipv4",
            ours("t", "e1"),
        );
        c.upsert(ChildKind::ConfigMap, "vms", "time-config", ours("t", "c1"));
        // Another tenant's, a user's and another namespace's objects are never orphans of t.
        c.upsert(ChildKind::Service, "vms", "other", ours("u", "s3"));
        c.upsert(
            ChildKind::Service,
            "vms",
            "users",
            ChildMeta {
                uid: Some("s4".into()),
                stratums: false,
                tenant: Some("t".into()),
            },
        );
        c.upsert(ChildKind::Service, "vms-2", "ntp", ours("t", "s5"));
        c.upsert(ChildKind::Service, "vm", "ntp", ours("t", "s6"));
        let keep = BTreeSet::from([
            (ChildKind::Service, "time".to_owned()),
            (ChildKind::ConfigMap, "time-config".to_owned()),
        ]);
        let orphans: Vec<String> = c
            .orphans("vms", "t", &keep)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            orphans,
            ["Service vms/ntp", "EndpointSlice vms/ntp-stratum-ipv4"]
        );
        assert_eq!(c.orphans("vms", "t", &BTreeSet::new()).len(), 4);
        assert_eq!(
            c.orphans("vms", "t", &BTreeSet::new())[0].uid.as_deref(),
            Some("s1")
        );
    }

    #[test]
    fn a_users_object_of_the_name_is_foreign_and_ours_is_not() {
        let mut c = Children::default();
        c.upsert(ChildKind::Service, "vms", "ntp", ours("t", "s1"));
        c.upsert(
            ChildKind::ConfigMap,
            "vms",
            "time-config",
            ChildMeta {
                uid: Some("c1".into()),
                stratums: false,
                tenant: None,
            },
        );
        assert_eq!(c.foreign(ChildKind::Service, "vms", "ntp"), None);
        assert_eq!(c.foreign(ChildKind::Service, "vms", "absent"), None);
        let clash = c
            .foreign(ChildKind::ConfigMap, "vms", "time-config")
            .unwrap();
        assert_eq!(clash.to_string(), "ConfigMap vms/time-config");
        assert!(
            c.upsert(ChildKind::Service, "vms", "ntp", ours("t", "s1"))
                .is_none(),
            "an unchanged object is no change"
        );
        assert_eq!(c.len(), 2);
        assert!(c.remove(ChildKind::Service, "vms", "ntp").is_some());
        assert!(
            c.remove(ChildKind::ConfigMap, "vms", "time-config")
                .is_some()
        );
        assert!(c.is_empty(), "a namespace without objects is forgotten");
    }
}
