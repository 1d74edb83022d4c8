//! The audit trail of agent config changes: every difference between two configs that changes
//! the time agents serve or who may ask for it (allow and deny lists, rate limits,
//! requirements, port, upstreams and egress tier, discipline, selection, leap, clock, holdover,
//! local stratum) and of a tenant's time zone, as values the reconcilers turn into Events.
//! Each names the fields with their old and new values; the agent config holds no secrets,
//! and anything secret-named would be redacted by [`stratum_api::diff`] all the same.
//!
//! Left out on purpose: the revision, reporting interval and log level (they change no time
//! or access), and `serving.peerAllowed`, the fleet's own pod addresses, which change with
//! every agent restart and grant nothing a user chose.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde_json::Value;
use stratum_api::AgentConfig;
use stratum_api::agent_config::TenantConfig;
use stratum_api::diff::{self, FieldChange};

/// One audited change.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A tenant's allow list changed.
    TenantClients {
        /// `namespace/name`.
        id: String,
        /// CIDRs newly allowed.
        allowed_added: Vec<IpNet>,
        /// CIDRs no longer allowed.
        allowed_removed: Vec<IpNet>,
        /// Size of the new allow list.
        allowed_size: usize,
    },
    /// A tenant's port, deny list, rate limits or requirements changed.
    TenantSettings {
        /// `namespace/name`.
        id: String,
        /// The changed fields of its agent config entry.
        fields: Vec<FieldChange>,
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
    /// The upstreams or the egress tier changed.
    Upstreams {
        /// The changed fields (`upstreams[…]`, `egress.…`).
        fields: Vec<FieldChange>,
    },
    /// Discipline, selection, leap or clock settings changed.
    Discipline {
        /// The changed fields.
        fields: Vec<FieldChange>,
    },
    /// Holdover, local stratum or the egress tier's peer port changed.
    Serving {
        /// The changed fields.
        fields: Vec<FieldChange>,
    },
    /// A tenant's time zone (its `time-config`'s `TZ`) changed.
    Timezone {
        /// `namespace/name`.
        id: String,
        /// Before; none when unset (or the tenant is new).
        before: Option<String>,
        /// After; none when unset.
        after: Option<String>,
    },
}

/// Longest Event note: Events hold at most 1 kB.
const MAX_NOTE_CHARS: usize = 1000;

impl Change {
    /// The tenant (`namespace/name`) a change is about; `None` for the TimeService's own.
    /// Every variant is listed so a new one must decide which side it is on.
    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            Change::TenantClients { id, .. }
            | Change::TenantSettings { id, .. }
            | Change::TenantAdded { id, .. }
            | Change::TenantRemoved { id }
            | Change::Timezone { id, .. } => Some(id),
            Change::Upstreams { .. } | Change::Discipline { .. } | Change::Serving { .. } => None,
        }
    }

    /// Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Change::TenantClients { .. } => "AllowListChanged",
            Change::TenantSettings { .. } => "TenantSettingsChanged",
            Change::TenantAdded { .. } => "TenantServed",
            Change::TenantRemoved { .. } => "TenantRemoved",
            Change::Upstreams { .. } => "UpstreamsChanged",
            Change::Discipline { .. } => "DisciplineChanged",
            Change::Serving { .. } => "ServingChanged",
            Change::Timezone { .. } => "TimezoneChanged",
        }
    }

    /// Event note, bounded in size: `field: old → new; …`.
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
                allowed_size,
            } => format!(
                "tenant {id}: allow list now {allowed_size} CIDRs; added [{}]; removed [{}]",
                list(allowed_added),
                list(allowed_removed),
            ),
            Change::TenantSettings { id, fields } => {
                format!("tenant {id}: {}", fields_note(fields))
            }
            Change::TenantAdded { id, port } => format!("tenant {id} is served on port {port}"),
            Change::TenantRemoved { id } => format!("tenant {id} is no longer served"),
            Change::Upstreams { fields }
            | Change::Discipline { fields }
            | Change::Serving { fields } => fields_note(fields),
            Change::Timezone { id, before, after } => format!(
                "tenant {id}: timezone: {} → {}",
                before.as_deref().unwrap_or("(unset)"),
                after.as_deref().unwrap_or("(unset)")
            ),
        };
        diff::cut(&text, MAX_NOTE_CHARS)
    }
}

/// `path: old → new; …`, absent values shown as `(unset)`.
fn fields_note(fields: &[FieldChange]) -> String {
    fields
        .iter()
        .map(|f| {
            format!(
                "{}: {} → {}",
                f.path,
                f.old.as_deref().unwrap_or("(unset)"),
                f.new.as_deref().unwrap_or("(unset)")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fleet-wide part of a config, as JSON: everything but tenants, their prefix sets and the
/// fleet's own addresses (see the module docs).
fn fleet_view(config: &AgentConfig) -> Value {
    let mut v = serde_json::to_value(config).unwrap_or_default();
    for key in [
        "version",
        "revision",
        "timeService",
        "reporting",
        "logLevel",
    ] {
        if let Some(m) = v.as_object_mut() {
            m.remove(key);
        }
    }
    if let Some(serving) = v.get_mut("serving").and_then(Value::as_object_mut) {
        for key in ["tenants", "cidrSets", "peerAllowed"] {
            serving.remove(key);
        }
    }
    v
}

/// A tenant's own settings, as JSON: everything but its identity and allow list (audited as
/// prefix sets, see [`Change::TenantClients`]).
fn tenant_view(t: &TenantConfig) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        for key in ["id", "allowed", "allowedSets"] {
            m.remove(key);
        }
    }
    v
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
    // Fleet settings, one Event per section in a fixed order.
    let new_view = fleet_view(new);
    let old_view = old.map(fleet_view);
    let fleet = match &old_view {
        Some(o) => diff::diff(Some(o), Some(&new_view)),
        // The first config: only where its time comes from is news.
        None => {
            let upstreams = serde_json::json!({ "upstreams": new_view.get("upstreams") });
            diff::diff(None, Some(&upstreams))
        }
    };
    let (mut upstreams, mut discipline, mut serving) = (Vec::new(), Vec::new(), Vec::new());
    for f in fleet.fields {
        match f.path.split(['.', '[']).next().unwrap_or("") {
            "upstreams" | "egress" => upstreams.push(f),
            "discipline" | "selection" | "leap" | "clock" => discipline.push(f),
            "serving" => serving.push(f),
            _ => {}
        }
    }
    for (fields, make) in [
        (
            upstreams,
            (|fields| Change::Upstreams { fields }) as fn(_) -> _,
        ),
        (discipline, |fields| Change::Discipline { fields }),
        (serving, |fields| Change::Serving { fields }),
    ] {
        if !fields.is_empty() {
            out.push(make(fields));
        }
    }
    for (id, t) in &new_tenants {
        let before = old_tenants.get(id);
        match before {
            None => out.push(Change::TenantAdded {
                id: (*id).to_owned(),
                port: t.port,
            }),
            Some(b) => {
                let d = diff::diff(Some(&tenant_view(b)), Some(&tenant_view(t)));
                if !d.fields.is_empty() {
                    out.push(Change::TenantSettings {
                        id: (*id).to_owned(),
                        fields: d.fields,
                    });
                }
            }
        }
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
        if before.is_some_and(|b| same_sets(b)) {
            continue;
        }
        let old_list = match (old, before) {
            (Some(o), Some(b)) => AgentConfig::tenant_allowed(&o.serving, b),
            _ => Vec::new(),
        };
        let new_list = AgentConfig::tenant_allowed(&new.serving, t);
        let old_allowed: BTreeSet<&IpNet> = old_list.iter().collect();
        let new_allowed: BTreeSet<&IpNet> = new_list.iter().collect();
        if old_allowed != new_allowed {
            out.push(Change::TenantClients {
                id: (*id).to_owned(),
                allowed_added: new_allowed.difference(&old_allowed).map(|n| **n).collect(),
                allowed_removed: old_allowed.difference(&new_allowed).map(|n| **n).collect(),
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

/// The time zone change of tenant `id`, from the `TZ` of its `time-config` before (`None`:
/// there was none, a new tenant) to the one planned now.
pub fn timezone_change(
    id: &str,
    before: Option<Option<&str>>,
    after: Option<&str>,
) -> Option<Change> {
    let before = before.flatten();
    (before != after).then(|| Change::Timezone {
        id: id.to_owned(),
        before: before.map(str::to_owned),
        after: after.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::agent_config::{FleetInput, TenantInput, build_agent_config};
    use crate::build::fixtures;
    use stratum_api::TimeServiceSpec;

    /// The config of TimeService `c` with one tenant `a/p` of `tenant_spec` allowing `allowed`.
    fn config(
        spec: &TimeServiceSpec,
        tenant_spec: serde_json::Value,
        allowed: &[IpNet],
    ) -> AgentConfig {
        config_denying(spec, tenant_spec, allowed, &[])
    }

    fn config_denying(
        spec: &TimeServiceSpec,
        tenant_spec: serde_json::Value,
        allowed: &[IpNet],
        denied: &[IpNet],
    ) -> AgentConfig {
        let tenant = fixtures::tenant("a", "p", tenant_spec);
        let input = TenantInput {
            id: "a/p",
            port: 12300,
            // As a shared pod set: the audit expands sets.
            allowed: &[],
            sets: &[std::sync::Arc::new(allowed.to_vec())],
            denied,
            spec: &tenant.spec,
            revision: None,
        };
        build_agent_config("c", spec, None, &[input], &FleetInput::default())
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn spec(change: serde_json::Value) -> TimeServiceSpec {
        let mut v = serde_json::to_value(fixtures::time_service("c").spec).unwrap();
        json_merge(&mut v, change);
        serde_json::from_value(v).unwrap()
    }

    fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    json_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p,
        }
    }

    /// The single change between two configs, as (reason, note).
    fn only(old: &AgentConfig, new: &AgentConfig) -> (&'static str, String) {
        let got = changes(Some(old), new);
        assert_eq!(got.len(), 1, "{got:?}");
        (got[0].reason(), got[0].note())
    }

    /// The config of TimeService `c` with tenants `a/p` and `b/p`: `a` of `a_spec` allowing
    /// `a_allowed`, `b` as it always is.
    fn two_tenants(
        spec: &TimeServiceSpec,
        a_spec: serde_json::Value,
        a_allowed: &[IpNet],
    ) -> AgentConfig {
        let a = fixtures::tenant("a", "p", a_spec);
        let b = fixtures::tenant("b", "p", serde_json::json!({}));
        let a_sets = [std::sync::Arc::new(a_allowed.to_vec())];
        let b_sets = [std::sync::Arc::new(nets(&["10.1.0.1/32"]))];
        let inputs = [
            TenantInput {
                id: "a/p",
                port: 12300,
                allowed: &[],
                sets: &a_sets,
                denied: &[],
                spec: &a.spec,
                revision: None,
            },
            TenantInput {
                id: "b/p",
                port: 12301,
                allowed: &[],
                sets: &b_sets,
                denied: &[],
                spec: &b.spec,
                revision: None,
            },
        ];
        build_agent_config("c", spec, None, &inputs, &FleetInput::default())
    }

    #[test]
    fn one_tenants_changes_are_audited_against_that_tenant_alone() {
        // Tenant a widens its allow list and its rate limit; b's Events must not name it, nor
        // show b anything of a's.
        let s = spec(serde_json::json!({}));
        let before = two_tenants(&s, serde_json::json!({}), &nets(&["10.0.0.1/32"]));
        let after = two_tenants(
            &s,
            serde_json::json!({"rateLimit": {"perClient": {"interval": "2s", "burst": 4}}}),
            &nets(&["10.0.0.0/16"]),
        );
        let got = changes(Some(&before), &after);
        assert!(!got.is_empty());
        for change in &got {
            let id = change.tenant_id().unwrap_or_else(|| {
                panic!("a tenant's change became a TimeService Event: {change:?}")
            });
            assert_eq!(id, "a/p", "{change:?}");
            assert!(!change.note().contains("b/p") && !change.note().contains("10.1.0.1"));
        }
    }

    #[test]
    fn no_change_no_event() {
        let c = config(
            &spec(serde_json::json!({})),
            serde_json::json!({}),
            &nets(&["10.0.0.1/32"]),
        );
        assert!(changes(Some(&c), &c).is_empty());
    }

    #[test]
    fn the_first_config_names_its_upstreams_and_tenants() {
        let c = config(&spec(serde_json::json!({})), serde_json::json!({}), &[]);
        let got = changes(None, &c);
        let reasons: Vec<_> = got.iter().map(Change::reason).collect();
        assert_eq!(reasons, ["UpstreamsChanged", "TenantServed"]);
        assert!(
            got[0]
                .note()
                .starts_with("upstreams[0]: (unset) → {\"host\":\"pool.ntp.org\""),
            "{}",
            got[0].note()
        );
    }

    #[test]
    fn an_allow_list_change_names_the_cidrs_added_and_removed() {
        let s = spec(serde_json::json!({}));
        let before = config(&s, serde_json::json!({}), &nets(&["10.0.0.1/32"]));
        let after = config(&s, serde_json::json!({}), &nets(&["10.0.0.2/32"]));
        assert_eq!(
            only(&before, &after),
            (
                "AllowListChanged",
                "tenant a/p: allow list now 1 CIDRs; added [10.0.0.2/32]; removed [10.0.0.1/32]"
                    .into()
            )
        );
    }

    #[test]
    fn a_deny_list_change_shows_the_cidrs() {
        let s = spec(serde_json::json!({}));
        let before = config(&s, serde_json::json!({}), &[]);
        let after = config_denying(&s, serde_json::json!({}), &[], &nets(&["10.9.0.0/16"]));
        assert_eq!(
            only(&before, &after),
            (
                "TenantSettingsChanged",
                "tenant a/p: denied[0]: (unset) → \"10.9.0.0/16\"".into()
            )
        );
    }

    #[test]
    fn rate_limit_changes_name_each_limit_with_old_and_new_values() {
        let s = spec(serde_json::json!({}));
        let before = config(&s, serde_json::json!({}), &[]);
        let after = config(
            &s,
            serde_json::json!({"rateLimit": {"perClient": {"interval": "2s", "burst": 4},
                "perTenant": {"requestsPerSecond": 100, "burst": 200}, "kissOfDeath": true}}),
            &[],
        );
        let (reason, note) = only(&before, &after);
        assert_eq!(reason, "TenantSettingsChanged");
        for part in [
            "rateLimit.clientBurst: 16 → 4",
            "rateLimit.clientIntervalSeconds: 1.0 → 2.0",
            "rateLimit.kissOfDeath: false → true",
            "rateLimit.tenantRequestsPerSecond: (unset) → 100",
            "rateLimit.tenantBurst: (unset) → 200",
        ] {
            assert!(note.contains(part), "{part} missing from {note}");
        }
    }

    #[test]
    fn a_requirement_change_names_max_root_distance() {
        let s = spec(serde_json::json!({}));
        let before = config(
            &s,
            serde_json::json!({"requirements": {"maxRootDistance": "50ms"}}),
            &[],
        );
        let after = config(
            &s,
            serde_json::json!({"requirements": {"maxRootDistance": "10ms"}}),
            &[],
        );
        assert_eq!(
            only(&before, &after),
            (
                "TenantSettingsChanged",
                "tenant a/p: maxRootDistanceSeconds: 0.05 → 0.01".into()
            )
        );
    }

    #[test]
    fn holdover_and_local_stratum_changes_are_serving_events() {
        let before = config(&spec(serde_json::json!({})), serde_json::json!({}), &[]);
        let after = config(
            &spec(serde_json::json!({"serving": {"holdover": "10m", "localStratum": 10}})),
            serde_json::json!({}),
            &[],
        );
        let (reason, note) = only(&before, &after);
        assert_eq!(reason, "ServingChanged");
        assert!(
            note.contains("serving.holdoverSeconds: ") && note.contains(" → 600.0"),
            "{note}"
        );
        assert!(
            note.contains("serving.localStratum: (unset) → 10"),
            "{note}"
        );
    }

    #[test]
    fn upstream_changes_name_hosts_and_their_settings() {
        let before = config(&spec(serde_json::json!({})), serde_json::json!({}), &[]);
        let mut s = spec(serde_json::json!({}));
        s.upstreams[0].max_poll = 8;
        s.upstreams.push(fixtures::upstream("time.example.org"));
        let after = config(&s, serde_json::json!({}), &[]);
        let (reason, note) = only(&before, &after);
        assert_eq!(reason, "UpstreamsChanged");
        assert!(note.contains("upstreams[0].maxPoll: 10 → 8"), "{note}");
        assert!(
            note.contains("upstreams[1]: (unset) → {\"host\":\"time.example.org\""),
            "{note}"
        );
    }

    #[test]
    fn discipline_selection_and_leap_changes_show_values() {
        let before = config(&spec(serde_json::json!({})), serde_json::json!({}), &[]);
        let after = config(
            &spec(
                serde_json::json!({"discipline": {"maxSlewPpm": 100}, "selection": {"minSources": 4},
                "leap": {"mode": "Smear"}}),
            ),
            serde_json::json!({}),
            &[],
        );
        let (reason, note) = only(&before, &after);
        assert_eq!(reason, "DisciplineChanged");
        for part in [
            "discipline.maxSlewPpm: 500.0 → 100.0",
            "selection.minSources: 3 → 4",
            "leap.mode: ",
        ] {
            assert!(note.contains(part), "{part} missing from {note}");
        }
    }

    #[test]
    fn several_sections_give_one_event_each_in_a_fixed_order() {
        let before = config(
            &spec(serde_json::json!({})),
            serde_json::json!({}),
            &nets(&["10.0.0.1/32"]),
        );
        let mut s = spec(
            serde_json::json!({"serving": {"holdover": "10m"}, "discipline": {"maxSlewPpm": 100}}),
        );
        s.upstreams.push(fixtures::upstream("time.example.org"));
        let after = config(
            &s,
            serde_json::json!({"rateLimit": {"kissOfDeath": true}}),
            &nets(&["10.0.0.2/32"]),
        );
        let reasons: Vec<_> = changes(Some(&before), &after)
            .iter()
            .map(Change::reason)
            .collect();
        assert_eq!(
            reasons,
            [
                "UpstreamsChanged",
                "DisciplineChanged",
                "ServingChanged",
                "TenantSettingsChanged",
                "AllowListChanged"
            ]
        );
        let mut gone = after.clone();
        gone.serving.tenants.clear();
        assert_eq!(
            changes(Some(&after), &gone),
            [Change::TenantRemoved { id: "a/p".into() }]
        );
    }

    #[test]
    fn the_reporting_interval_and_log_level_are_not_audited() {
        let before = config(&spec(serde_json::json!({})), serde_json::json!({}), &[]);
        let after = config(
            &spec(
                serde_json::json!({"reporting": {"interval": "60s"}, "agent": {"logLevel": "debug"}}),
            ),
            serde_json::json!({}),
            &[],
        );
        assert!(changes(Some(&before), &after).is_empty());
    }

    #[test]
    fn secrets_never_appear_in_a_note() {
        let s = spec(serde_json::json!({}));
        let before = config(&s, serde_json::json!({}), &[]);
        let after = config(
            &s,
            serde_json::json!({"authentication": {"symmetricKeysSecret": "tenant-keys-7f3a"},
                "rateLimit": {"kissOfDeath": true}}),
            &[],
        );
        for c in changes(None, &after)
            .iter()
            .chain(&changes(Some(&before), &after))
        {
            assert!(!c.note().contains("tenant-keys-7f3a"), "{}", c.note());
        }
        // Were a secret-named field ever in the config, its values would be redacted.
        let fields = diff::diff(
            Some(&serde_json::json!({"upstreams": [{"ntsKey": "k1"}]})),
            Some(&serde_json::json!({"upstreams": [{"ntsKey": "k2"}]})),
        )
        .fields;
        let note = Change::Upstreams { fields }.note();
        assert_eq!(note, "upstreams[0].ntsKey: <redacted> → <redacted>");
    }

    #[test]
    fn a_timezone_change_names_old_and_new_zones() {
        let c = timezone_change("a/p", Some(Some("Europe/Berlin")), Some("UTC")).unwrap();
        assert_eq!(c.reason(), "TimezoneChanged");
        assert_eq!(c.note(), "tenant a/p: timezone: Europe/Berlin → UTC");
        let set = timezone_change("a/p", None, Some("UTC")).unwrap();
        assert_eq!(set.note(), "tenant a/p: timezone: (unset) → UTC");
        let unset = timezone_change("a/p", Some(Some("UTC")), None).unwrap();
        assert_eq!(unset.note(), "tenant a/p: timezone: UTC → (unset)");
        assert!(timezone_change("a/p", Some(Some("UTC")), Some("UTC")).is_none());
        assert!(timezone_change("a/p", None, None).is_none());
    }

    #[test]
    fn a_long_note_is_cut_within_the_event_limit() {
        let fields = (0..200)
            .map(|i| FieldChange {
                path: format!("upstreams[{i}].host"),
                old: None,
                new: Some("\"x\"".into()),
            })
            .collect();
        let note = Change::Upstreams { fields }.note();
        assert!(
            note.chars().count() <= MAX_NOTE_CHARS + 40,
            "{}",
            note.len()
        );
        assert!(note.contains("bytes in all"), "the cut is marked");
    }
}
