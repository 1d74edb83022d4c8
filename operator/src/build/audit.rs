//! The audit trail of agent config changes: what changed in a tenant's allow list, the
//! upstreams or the discipline settings between two configs, as values the reconciler turns
//! into Events (what compliance reviews read).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use stratum_api::AgentConfig;
use stratum_api::agent_config::TenantConfig;

/// One audited change.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A tenant's allow or deny list changed.
    TenantClients {
        /// `namespace/name`.
        id: String,
        /// CIDRs newly allowed.
        allowed_added: Vec<IpNet>,
        /// CIDRs no longer allowed.
        allowed_removed: Vec<IpNet>,
        /// The deny list changed.
        denied_changed: bool,
        /// Size of the new allow list.
        allowed_size: usize,
    },
    /// A tenant started being served.
    TenantAdded {
        /// `namespace/name`.
        id: String,
        /// Its port.
        port: u16,
    },
    /// A tenant stopped being served.
    TenantRemoved {
        /// `namespace/name`.
        id: String,
    },
    /// The upstreams (or the egress tier's) changed.
    Upstreams {
        /// Hosts before.
        before: Vec<String>,
        /// Hosts after.
        after: Vec<String>,
    },
    /// Discipline, selection, leap or clock settings changed.
    Discipline {
        /// Which sections changed.
        sections: Vec<&'static str>,
    },
}

impl Change {
    /// Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Change::TenantClients { .. } => "AllowListChanged",
            Change::TenantAdded { .. } => "TenantServed",
            Change::TenantRemoved { .. } => "TenantRemoved",
            Change::Upstreams { .. } => "UpstreamsChanged",
            Change::Discipline { .. } => "DisciplineChanged",
        }
    }

    /// Event note, bounded in size (Events hold at most 1 kB).
    pub fn note(&self) -> String {
        let list = |nets: &[IpNet]| {
            let shown: Vec<String> = nets.iter().take(8).map(ToString::to_string).collect();
            let more = nets.len().saturating_sub(shown.len());
            if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        let text = match self {
            Change::TenantClients {
                id,
                allowed_added,
                allowed_removed,
                denied_changed,
                allowed_size,
            } => {
                format!(
                    "tenant {id}: allow list now {allowed_size} CIDRs; added [{}]; removed [{}]{}",
                    list(allowed_added),
                    list(allowed_removed),
                    if *denied_changed {
                        "; deny list changed"
                    } else {
                        ""
                    }
                )
            }
            Change::TenantAdded { id, port } => format!("tenant {id} is served on port {port}"),
            Change::TenantRemoved { id } => format!("tenant {id} is no longer served"),
            Change::Upstreams { before, after } => {
                format!(
                    "upstreams changed from [{}] to [{}]",
                    before.join(", "),
                    after.join(", ")
                )
            }
            Change::Discipline { sections } => format!("changed settings: {}", sections.join(", ")),
        };
        text.chars().take(1000).collect()
    }
}

fn hosts(config: &AgentConfig) -> Vec<String> {
    let mut out: Vec<String> = config
        .upstreams
        .iter()
        .map(|u| format!("{}:{}", u.host, u.port))
        .collect();
    if let Some(egress) = &config.egress {
        out.extend(
            egress
                .tier_upstreams
                .iter()
                .map(|u| format!("tier {}:{}", u.host, u.port)),
        );
    }
    out
}

/// Every audited difference from `old` (none: the first config, everything is new) to `new`.
pub fn changes(old: Option<&AgentConfig>, new: &AgentConfig) -> Vec<Change> {
    let empty = Vec::new();
    let old_tenants: BTreeMap<&str, &TenantConfig> = old
        .map(|o| &o.serving.tenants)
        .unwrap_or(&empty)
        .iter()
        .map(|t| (t.id.as_str(), t))
        .collect();
    let new_tenants: BTreeMap<&str, &TenantConfig> = new
        .serving
        .tenants
        .iter()
        .map(|t| (t.id.as_str(), t))
        .collect();
    let mut out = Vec::new();
    if old.is_none_or(|o| hosts(o) != hosts(new)) {
        out.push(Change::Upstreams {
            before: old.map(hosts).unwrap_or_default(),
            after: hosts(new),
        });
    }
    if let Some(o) = old {
        let mut sections = Vec::new();
        if o.discipline != new.discipline {
            sections.push("discipline");
        }
        if o.selection != new.selection {
            sections.push("selection");
        }
        if o.leap != new.leap {
            sections.push("leap");
        }
        if o.clock != new.clock {
            sections.push("clock");
        }
        if !sections.is_empty() {
            out.push(Change::Discipline { sections });
        }
    }
    for (id, t) in &new_tenants {
        let before = old_tenants.get(id);
        if before.is_none() {
            out.push(Change::TenantAdded {
                id: (*id).to_owned(),
                port: t.port,
            });
        }
        let denied_changed = before.map_or(!t.denied.is_empty(), |b| b.denied != t.denied);
        // Most tenants are untouched by a change: equal own prefixes and equal set contents
        // need no expansion.
        let same_sets = |b: &TenantConfig| {
            b.allowed == t.allowed
                && b.allowed_sets.len() == t.allowed_sets.len()
                && b.allowed_sets.iter().zip(&t.allowed_sets).all(|(x, y)| {
                    old.and_then(|o| o.serving.cidr_sets.get(*x as usize))
                        == new.serving.cidr_sets.get(*y as usize)
                })
        };
        if !denied_changed && before.is_some_and(|b| same_sets(b)) {
            continue;
        }
        let old_list = match (old, before) {
            (Some(o), Some(b)) => AgentConfig::tenant_allowed(&o.serving, b),
            _ => Vec::new(),
        };
        let new_list = AgentConfig::tenant_allowed(&new.serving, t);
        let old_allowed: BTreeSet<&IpNet> = old_list.iter().collect();
        let new_allowed: BTreeSet<&IpNet> = new_list.iter().collect();
        if old_allowed != new_allowed || denied_changed {
            out.push(Change::TenantClients {
                id: (*id).to_owned(),
                allowed_added: new_allowed.difference(&old_allowed).map(|n| **n).collect(),
                allowed_removed: old_allowed.difference(&new_allowed).map(|n| **n).collect(),
                denied_changed,
                allowed_size: new_list.len(),
            });
        }
    }
    for id in old_tenants.keys() {
        if !new_tenants.contains_key(id) {
            out.push(Change::TenantRemoved {
                id: (*id).to_owned(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::agent_config::{FleetInput, TenantInput, build_agent_config};
    use crate::build::fixtures;

    #[test]
    fn allow_list_upstream_and_discipline_changes_are_each_reported() {
        let ts = fixtures::time_service("c");
        let tenant = fixtures::tenant("a", "p", serde_json::json!({}));
        let one: Vec<IpNet> = vec!["10.0.0.1/32".parse().unwrap()];
        let two: Vec<IpNet> = vec!["10.0.0.2/32".parse().unwrap()];
        let cfg = |spec: &stratum_api::TimeServiceSpec, allowed: &[IpNet]| {
            let input = TenantInput {
                id: "a/p",
                port: 12300,
                // As a shared pod set: the audit expands sets.
                allowed: &[],
                sets: &[std::sync::Arc::new(allowed.to_vec())],
                denied: &[],
                spec: &tenant.spec,
                revision: None,
            };
            build_agent_config("c", spec, None, &[input], &FleetInput::default())
        };
        let before = cfg(&ts.spec, &one);
        assert!(
            changes(Some(&before), &before).is_empty(),
            "no change, no event"
        );
        let mut spec = ts.spec.clone();
        spec.upstreams.push(fixtures::upstream("time.example.org"));
        spec.discipline.max_slew_ppm = 100;
        let after = cfg(&spec, &two);
        let got = changes(Some(&before), &after);
        let reasons: Vec<_> = got.iter().map(Change::reason).collect();
        assert_eq!(
            reasons,
            ["UpstreamsChanged", "DisciplineChanged", "AllowListChanged"]
        );
        assert!(
            got[2]
                .note()
                .contains("added [10.0.0.2/32]; removed [10.0.0.1/32]"),
            "{}",
            got[2].note()
        );
        let gone = cfg(&spec, &two);
        let mut gone = gone.clone();
        gone.serving.tenants.clear();
        assert_eq!(
            changes(Some(&after), &gone),
            [Change::TenantRemoved { id: "a/p".into() }]
        );
    }
}
