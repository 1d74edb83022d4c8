//! From the agent config's `serving` section to the ports the server must run, and the
//! smallest change from what runs now to that (pure, so it is tested without sockets).
//!
//! A port is keyed by its number and owned by one tenant id. Rules that change under the same
//! id become a new policy generation on the running sockets (no socket churn, no lost
//! packets); a port whose owner id changes is closed and reopened, since its counters, client
//! log and rate table belong to another tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use stratum_api::agent_config::{ServingConfig, TenantConfig as ApiTenant, Unauthenticated};
use stratum_ntp::nts::CookieKeys;
use stratum_ntp::server::{ClientRateLimit, DenyAction, RefusalLimit, TenantBudget, TenantConfig};
use stratum_ntp::symmetric::SymmetricKeys;

/// Tenant id under which `serving.peerPort` (the fleet's other agents) is counted. Tenant ids
/// are `namespace/name`, so this one cannot collide.
pub const PEER_TENANT_ID: &str = "fleet-peers";

/// Over-limit requests still answered: 1 in 2^2, chrony's default `leak`, so a spoofer
/// cannot silence a victim whose address it forges.
const RATE_LIMIT_LEAK_LOG2: u8 = 2;

/// The server-side rules of one configured tenant; `allow` is its own prefixes only (see
/// [`desired_ports`] for those of its shared sets).
pub fn core_tenant(tenant: &ApiTenant) -> TenantConfig {
    let kod = tenant.rate_limit.kiss_of_death;
    let deny_action = if kod {
        DenyAction::Kod
    } else {
        DenyAction::Ignore
    };
    TenantConfig {
        name: tenant.id.clone(),
        allow: tenant.allowed.clone(),
        allow_except: Vec::new(),
        deny: tenant
            .denied
            .iter()
            .map(|net| (*net, deny_action))
            .collect(),
        kod_not_allowed: kod,
        client_rate_limit: Some(ClientRateLimit {
            interval: tenant.rate_limit.client_interval_seconds,
            burst: u16::try_from(tenant.rate_limit.client_burst).unwrap_or(u16::MAX),
            leak_log2: RATE_LIMIT_LEAK_LOG2,
            kod,
        }),
        budget: tenant
            .rate_limit
            .tenant_requests_per_second
            .map(|rps| TenantBudget {
                packets_per_second: f64::from(rps),
                burst: f64::from(tenant.rate_limit.tenant_burst.unwrap_or(rps)),
            }),
        max_root_distance: tenant.max_root_distance_seconds,
        refusals: RefusalLimit::default(),
    }
}

/// What an NTS tenant's port does with NTS (RFC 8915).
#[derive(Clone, Debug, PartialEq)]
pub struct PortNts {
    /// The TimeService's cookie keys bound to this tenant (a cookie of another tenant does not
    /// open here); `None` until the agent has loaded them, when every cookie gets an NTS NAK.
    pub keys: Option<Arc<CookieKeys>>,
    /// What requests without NTS fields get.
    pub unauthenticated: Unauthenticated,
}

/// What a symmetric-key tenant's port does with MACs (RFC 8573).
#[derive(Clone, Debug, PartialEq)]
pub struct PortSymmetric {
    /// The tenant's keys; `None` until the agent has read its key file, when every MAC fails.
    pub keys: Option<Arc<SymmetricKeys>>,
    /// What requests without a MAC (and, on an NTS port, without NTS) get.
    pub unauthenticated: Unauthenticated,
    /// Answer a failed MAC with a crypto-NAK (the tenant sends KoDs) rather than nothing.
    pub crypto_nak: bool,
}

/// Everything a port's policy generation is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct PortRules {
    /// Allow and deny lists, rate limits, accuracy requirement.
    pub core: TenantConfig,
    /// NTS, for a tenant that has it.
    pub nts: Option<PortNts>,
    /// Symmetric keys, for a tenant that has them.
    pub symmetric: Option<PortSymmetric>,
}

impl PortRules {
    /// Rules of a port without authentication.
    pub fn plain(core: TenantConfig) -> Self {
        Self {
            core,
            nts: None,
            symmetric: None,
        }
    }
}

/// The key material loaded from the files the config names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyMaterial {
    /// The TimeService's NTS cookie master keys.
    pub cookie_keys: Option<CookieKeys>,
    /// Each symmetric-key tenant's keys, by the key file they were read from.
    pub symmetric: BTreeMap<String, Arc<SymmetricKeys>>,
}

/// Every port the config asks for, with its rules; NTS tenants get the cookie keys bound to
/// their id, symmetric-key tenants the keys of their own file.
pub fn desired_ports(serving: &ServingConfig, material: &KeyMaterial) -> BTreeMap<u16, PortRules> {
    let mut ports: BTreeMap<u16, PortRules> = serving
        .tenants
        .iter()
        .map(|t| {
            let mut core = core_tenant(t);
            core.allow = stratum_api::AgentConfig::tenant_allowed(serving, t);
            let nts = t.nts.as_ref().map(|nts| PortNts {
                keys: material
                    .cookie_keys
                    .as_ref()
                    .map(|keys| Arc::new(keys.bound_to(t.id.as_bytes()))),
                unauthenticated: nts.unauthenticated,
            });
            let symmetric = t.symmetric_keys.as_ref().map(|sym| PortSymmetric {
                keys: material.symmetric.get(&sym.keys_file).cloned(),
                unauthenticated: sym.unauthenticated,
                crypto_nak: t.rate_limit.kiss_of_death,
            });
            (
                t.port,
                PortRules {
                    core,
                    nts,
                    symmetric,
                },
            )
        })
        .collect();
    if let Some(port) = serving.peer_port {
        // Other agents poll at their own configured rate: no limit, no KoD, no requirement.
        ports.insert(
            port,
            PortRules::plain(TenantConfig {
                name: PEER_TENANT_ID.into(),
                allow: serving.peer_allowed.clone(),
                allow_except: Vec::new(),
                deny: Vec::new(),
                kod_not_allowed: false,
                client_rate_limit: None,
                budget: None,
                max_root_distance: None,
                refusals: RefusalLimit::default(),
            }),
        );
    }
    ports
}

/// One step from the running ports to the desired ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortChange {
    /// Open the port's sockets and workers.
    Open(u16),
    /// Stop the workers and close the sockets.
    Close(u16),
    /// Another tenant now owns the port: close, then open.
    Reopen(u16),
    /// Same tenant, new rules: swap the policy generation.
    Update(u16),
}

/// The changes that turn `running` (port → rules in force) into `desired`; ports whose rules
/// are unchanged do not appear.
pub fn plan<'a>(
    running: impl IntoIterator<Item = (u16, &'a PortRules)>,
    desired: &BTreeMap<u16, PortRules>,
) -> Vec<PortChange> {
    let running: BTreeMap<u16, &PortRules> = running.into_iter().collect();
    let mut changes = Vec::new();
    for (port, current) in &running {
        match desired.get(port) {
            None => changes.push(PortChange::Close(*port)),
            Some(wanted) if wanted.core.name != current.core.name => {
                changes.push(PortChange::Reopen(*port));
            }
            Some(wanted) if wanted != *current => changes.push(PortChange::Update(*port)),
            Some(_) => {}
        }
    }
    for port in desired.keys() {
        if !running.contains_key(port) {
            changes.push(PortChange::Open(*port));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stratum_api::agent_config::RateLimitConfig;

    fn api_tenant(id: &str, port: u16) -> ApiTenant {
        ApiTenant {
            id: id.into(),
            port,
            allowed: vec!["10.0.0.0/8".parse().unwrap()],
            allowed_sets: vec![],
            denied: vec!["10.0.0.13/32".parse().unwrap()],
            rate_limit: RateLimitConfig {
                client_interval_seconds: 2.0,
                client_burst: 100_000,
                tenant_requests_per_second: Some(500),
                tenant_burst: None,
                kiss_of_death: true,
            },
            max_root_distance_seconds: Some(0.1),
            nts: None,
            symmetric_keys: None,
        }
    }

    fn serving(tenants: Vec<ApiTenant>) -> ServingConfig {
        ServingConfig {
            holdover_seconds: 0.0,
            local_stratum: None,
            peer_port: None,
            peer_allowed: vec![],
            tenants,
            cidr_sets: vec![],
            metrics_per_tenant: true,
            nts_cookie_keys_file: None,
        }
    }

    #[test]
    fn tenant_limits_and_kod_map_onto_the_core_policy() {
        let core = core_tenant(&api_tenant("ns/a", 12300));
        let limit = core.client_rate_limit.unwrap();
        assert_eq!(
            (limit.interval, limit.burst, limit.kod),
            (2.0, u16::MAX, true)
        );
        assert_eq!(core.deny[0].1, DenyAction::Kod);
        assert!(core.kod_not_allowed);
        let budget = core.budget.unwrap();
        assert_eq!((budget.packets_per_second, budget.burst), (500.0, 500.0));
        assert_eq!(core.max_root_distance, Some(0.1));
    }

    #[test]
    fn a_tenant_is_served_to_its_own_prefixes_and_those_of_its_shared_sets() {
        let mut t = api_tenant("ns/a", 12300);
        t.allowed_sets = vec![1];
        let mut s = serving(vec![t]);
        s.cidr_sets = vec![
            vec!["192.0.2.0/24".parse().unwrap()],
            vec!["fd00::/64".parse().unwrap()],
        ];
        let ports = desired_ports(&s, &KeyMaterial::default());
        let allow: Vec<String> = ports[&12300]
            .core
            .allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            allow,
            ["10.0.0.0/8", "fd00::/64"],
            "set 0 is not referenced"
        );
    }

    #[test]
    fn the_peer_port_is_served_to_peer_allowed_without_limits() {
        let mut s = serving(vec![api_tenant("ns/a", 12300)]);
        s.peer_port = Some(12399);
        s.peer_allowed = vec!["10.77.0.0/16".parse().unwrap()];
        let ports = desired_ports(&s, &KeyMaterial::default());
        let peers = &ports[&12399].core;
        assert_eq!(peers.name, PEER_TENANT_ID);
        assert_eq!(peers.allow, s.peer_allowed);
        assert!(peers.client_rate_limit.is_none());
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let running = desired_ports(
            &serving(vec![
                api_tenant("ns/a", 1),
                api_tenant("ns/b", 2),
                api_tenant("ns/c", 3),
                api_tenant("ns/d", 4),
            ]),
            &KeyMaterial::default(),
        );
        let mut b = api_tenant("ns/b", 2);
        b.allowed.push("192.0.2.0/24".parse().unwrap());
        let desired = desired_ports(
            &serving(vec![
                api_tenant("ns/a", 1),
                b,
                api_tenant("ns/other", 3),
                api_tenant("ns/e", 5),
            ]),
            &KeyMaterial::default(),
        );
        let changes = plan(running.iter().map(|(p, c)| (*p, c)), &desired);
        assert_eq!(
            changes,
            [
                PortChange::Update(2),
                PortChange::Reopen(3),
                PortChange::Close(4),
                PortChange::Open(5)
            ]
        );
    }

    fn nts_tenant(id: &str, port: u16) -> ApiTenant {
        ApiTenant {
            nts: Some(stratum_api::agent_config::TenantNtsConfig {
                ke_port: port + 1000,
                certificate_file: "/keys/tls.crt".into(),
                key_file: "/keys/tls.key".into(),
                ntp_server: None,
                ntp_port: None,
                unauthenticated: Unauthenticated::Deny,
            }),
            ..api_tenant(id, port)
        }
    }

    #[test]
    fn nts_tenants_get_the_keys_bound_to_their_id_and_a_rotation_updates_only_them() {
        use stratum_ntp::nts::{AeadKey, MasterKey};
        let key = |id: u32| MasterKey {
            id,
            key: AeadKey::from_bytes([id as u8; 32]),
        };
        let config = serving(vec![
            api_tenant("ns/plain", 1),
            nts_tenant("ns/a", 2),
            nts_tenant("ns/b", 3),
        ]);
        let before = desired_ports(&config, &KeyMaterial::default());
        assert_eq!(before[&1].nts, None);
        let a = before[&2].nts.as_ref().unwrap();
        assert_eq!(
            (a.keys.as_deref(), a.unauthenticated),
            (None, Unauthenticated::Deny),
            "no keys loaded yet: NTS stays on (and fails closed)"
        );
        let keys = CookieKeys::new(key(1), None);
        let loaded = desired_ports(
            &config,
            &KeyMaterial {
                cookie_keys: Some(keys.clone()),
                ..KeyMaterial::default()
            },
        );
        assert_eq!(
            loaded[&2].nts.as_ref().unwrap().keys.as_deref(),
            Some(&keys.bound_to(b"ns/a"))
        );
        assert_ne!(
            loaded[&2].nts.as_ref().unwrap().keys,
            loaded[&3].nts.as_ref().unwrap().keys,
            "each tenant its own binding"
        );
        let changes = plan(before.iter().map(|(p, r)| (*p, r)), &loaded);
        assert_eq!(changes, [PortChange::Update(2), PortChange::Update(3)]);
    }

    #[test]
    fn each_symmetric_key_tenant_gets_the_keys_of_its_own_file_only() {
        let with_keys = |id: &str, port: u16, kod: bool| {
            let mut t = api_tenant(id, port);
            t.rate_limit.kiss_of_death = kod;
            t.symmetric_keys = Some(stratum_api::agent_config::TenantSymmetricKeysConfig {
                keys_file: format!("/keys/tenant-{port}.keys"),
                unauthenticated: Unauthenticated::Ignore,
            });
            t
        };
        let config = serving(vec![
            api_tenant("ns/plain", 1),
            with_keys("ns/a", 2, true),
            with_keys("ns/b", 3, false),
        ]);
        let a_keys = Arc::new(SymmetricKeys::parse("1 MD5 ASCII:a").unwrap());
        let material = KeyMaterial {
            cookie_keys: None,
            symmetric: [("/keys/tenant-2.keys".to_owned(), a_keys.clone())].into(),
        };
        let ports = desired_ports(&config, &material);
        assert_eq!(ports[&1].symmetric, None);
        let a = ports[&2].symmetric.as_ref().unwrap();
        assert_eq!(
            (a.keys.as_ref(), a.unauthenticated, a.crypto_nak),
            (Some(&a_keys), Unauthenticated::Ignore, true)
        );
        let b = ports[&3].symmetric.as_ref().unwrap();
        assert_eq!(
            (b.keys.as_ref(), b.crypto_nak),
            (None, false),
            "b's file is not read yet: never a's keys"
        );
    }
}
