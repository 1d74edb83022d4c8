//! A tenant checked on its own, before it enters anything shared. What is checked is what the
//! agents would refuse in the tenant's entry (`stratum_api::agent_config::policy_problems`, the
//! same check `AgentConfig::validate` runs on every entry), what the operator cannot build
//! (peers that do not compile, too many prefixes), and what no agent can serve (a timezone
//! that is not one). A tenant failing any of it is refused alone: it claims no port
//! and no Service name, and is left out of the agent config and the NetworkPolicy, so it can
//! never make its TimeService's config invalid or change another tenant's output.

use stratum_api::agent_config::policy_problems;
use stratum_api::tenant_time_policy::{Routing, TenantTimePolicySpec};

use crate::build::networkpolicy::{MAX_TENANT_RULE_BYTES, TenantRule, json_bytes, tenant_rule};
use crate::build::time_config::is_iana_timezone;
use crate::model::ServerVersion;
use crate::resolve::{CompiledPolicy, MAX_TENANT_PREFIXES, ResolveError};

/// Why a tenant is not accepted: condition reason and message.
pub type Refusal = (&'static str, String);

/// Why a tenant with this spec (and these compiled peers) cannot be served, whatever else
/// exists: its own faults only.
pub fn spec_refusal(
    policy: &Result<CompiledPolicy, ResolveError>,
    spec: &TenantTimePolicySpec,
) -> Option<Refusal> {
    let policy = match policy {
        Ok(policy) => policy,
        Err(e) => return Some((e.reason(), e.to_string())),
    };
    let problems = policy_problems(spec);
    if !problems.is_empty() {
        let why: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Some(("InvalidSpec", why.join("; ")));
    }
    let rule = tenant_rule(&TenantRule {
        namespace: &policy.namespace,
        peers: &spec.allowed_clients,
        port: u16::MAX,
        nts: spec.nts().is_some(),
    });
    let rule_bytes = json_bytes(&rule);
    if rule_bytes > MAX_TENANT_RULE_BYTES {
        return Some((
            "NetworkPolicyRuleTooLarge",
            format!(
                "spec.allowedClients: as a NetworkPolicy rule these peers take {rule_bytes} bytes, \
                 over the limit of {MAX_TENANT_RULE_BYTES} per tenant; use fewer or smaller selectors"
            ),
        ));
    }
    if let Some(tz) = &spec.timezone
        && !is_iana_timezone(tz)
    {
        return Some((
            "InvalidTimezone",
            format!("spec.timezone: {tz:?} is not a time zone of the IANA database"),
        ));
    }
    if let Some(auth) = &spec.authentication {
        // The schema says the same; kept for objects stored before it.
        if auth.nts && auth.nts_certificate_secret.is_none() {
            return Some((
                "InvalidSpec",
                "spec.authentication.ntsCertificateSecret: must name the kubernetes.io/tls \
                 Secret of the NTS-KE endpoint when nts is true"
                    .into(),
            ));
        }
    }
    None
}

/// The first Kubernetes release that serves `trafficDistribution: PreferSameNode` by default
/// (beta; alpha behind a feature gate in 1.33): what routing `Closest` builds.
pub const PREFER_SAME_NODE_SINCE: ServerVersion = ServerVersion {
    major: 1,
    minor: 34,
};

/// Why a tenant with this spec cannot be served by this cluster's API server (`None`: its
/// version is unknown, and the tenant is not refused on a guess). The version is read once at
/// start, so this is as fixed as the spec: the tenant is refused alone, like an invalid one.
pub fn cluster_refusal(
    spec: &TenantTimePolicySpec,
    server: Option<ServerVersion>,
) -> Option<Refusal> {
    let server = server?;
    (spec.service.routing == Routing::Closest && server < PREFER_SAME_NODE_SINCE).then(|| {
        (
            "UnsupportedByCluster",
            format!(
                "spec.service.routing: Closest needs the Service field trafficDistribution: \
                 PreferSameNode, which Kubernetes serves from {PREFER_SAME_NODE_SINCE} on; this \
                 cluster's API server is {server}. Use routing NodeLocal, or upgrade the cluster"
            ),
        )
    })
}

/// Why a tenant whose lists resolve to `allowed` and `denied` prefixes is refused, when they
/// are more than [`MAX_TENANT_PREFIXES`] together. Pods change this, so it is checked at each
/// plan, after the spec.
pub fn prefix_refusal(allowed: usize, denied: usize) -> Option<Refusal> {
    (allowed + denied > MAX_TENANT_PREFIXES).then(|| {
        (
            "TooManyPrefixes",
            format!(
                "spec.allowedClients: resolves to {allowed} prefixes (ipBlocks and the addresses \
                 of the selected pods, aggregated) and spec.deniedClients to {denied}, over the \
                 limit of {MAX_TENANT_PREFIXES} prefixes per tenant; select fewer pods or allow \
                 ranges that aggregate (an ipBlock of the pod network)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refusal(spec: serde_json::Value) -> Option<Refusal> {
        let spec: TenantTimePolicySpec = serde_json::from_value(spec).unwrap();
        let policy = CompiledPolicy::compile("a", &spec.allowed_clients, &spec.denied_clients);
        spec_refusal(&policy, &spec)
    }

    #[test]
    fn a_zero_interval_is_refused_naming_the_field_and_the_bound() {
        let (reason, message) =
            refusal(serde_json::json!({ "rateLimit": { "perClient": { "interval": "0s" } } }))
                .unwrap();
        assert_eq!(reason, "InvalidSpec");
        assert_eq!(
            message,
            "spec.rateLimit.perClient.interval: must be at least 1ms"
        );
    }

    #[test]
    fn a_zero_max_root_distance_is_refused_naming_the_field() {
        let (reason, message) =
            refusal(serde_json::json!({ "requirements": { "maxRootDistance": "0s" } })).unwrap();
        assert_eq!(reason, "InvalidSpec");
        assert_eq!(
            message,
            "spec.requirements.maxRootDistance: must be at least 1ms"
        );
    }

    #[test]
    fn an_unknown_timezone_is_refused_and_symmetric_keys_are_served() {
        let (reason, message) = refusal(serde_json::json!({ "timezone": "Mars/Olympus" })).unwrap();
        assert_eq!(reason, "InvalidTimezone");
        assert!(message.starts_with("spec.timezone: "), "{message}");
        assert!(refusal(serde_json::json!({ "timezone": "Europe/Berlin" })).is_none());
        for unauthenticated in ["Serve", "Deny", "Ignore"] {
            assert!(
                refusal(serde_json::json!({ "authentication": {
                    "symmetricKeysSecret": "device-keys",
                    "unauthenticated": unauthenticated } }))
                .is_none(),
                "{unauthenticated}"
            );
        }
    }

    #[test]
    fn nts_is_served_and_needs_its_certificate_secret() {
        let (reason, message) =
            refusal(serde_json::json!({ "authentication": { "nts": true } })).unwrap();
        assert_eq!(reason, "InvalidSpec");
        assert!(message.contains("ntsCertificateSecret"), "{message}");
        for unauthenticated in ["Serve", "Deny", "Ignore"] {
            assert!(
                refusal(serde_json::json!({ "authentication": {
                    "nts": true, "ntsCertificateSecret": "ntp-tls",
                    "unauthenticated": unauthenticated } }))
                .is_none(),
                "{unauthenticated}"
            );
        }
    }

    #[test]
    fn peers_that_do_not_compile_are_refused_before_the_rest() {
        let (reason, message) = refusal(serde_json::json!({
            "allowedClients": [{ "podSelector": { "matchExpressions": [
                { "key": "app", "operator": "Near", "values": ["x"] }] } }],
            "rateLimit": { "perClient": { "interval": "0s" } }
        }))
        .unwrap();
        assert_eq!(reason, "InvalidClients");
        assert!(
            message.contains("spec.allowedClients[0].podSelector"),
            "{message}"
        );
    }

    #[test]
    fn a_tenant_whose_network_policy_rule_is_too_large_is_refused() {
        let labels: serde_json::Map<String, serde_json::Value> = (0..40)
            .map(|i| {
                (
                    format!("label-{i:03}-{}", "k".repeat(40)),
                    "v".repeat(60).into(),
                )
            })
            .collect();
        let peer = serde_json::json!({ "podSelector": { "matchLabels": labels } });
        let (reason, message) =
            refusal(serde_json::json!({ "allowedClients": vec![peer.clone(); 64] })).unwrap();
        assert_eq!(reason, "NetworkPolicyRuleTooLarge");
        assert!(message.starts_with("spec.allowedClients: "), "{message}");
        assert!(refusal(serde_json::json!({ "allowedClients": vec![peer; 4] })).is_none());
    }

    #[test]
    fn closest_routing_is_refused_below_1_34_naming_the_servers_version() {
        let spec = |routing: &str| -> TenantTimePolicySpec {
            serde_json::from_value(serde_json::json!({ "service": { "routing": routing } }))
                .unwrap()
        };
        let v = |minor| Some(ServerVersion { major: 1, minor });
        let (reason, message) = cluster_refusal(&spec("Closest"), v(33)).unwrap();
        assert_eq!(reason, "UnsupportedByCluster");
        assert!(
            message.starts_with("spec.service.routing: Closest needs")
                && message.contains("from 1.34 on")
                && message.contains("API server is 1.33"),
            "{message}"
        );
        assert!(cluster_refusal(&spec("Closest"), v(34)).is_none());
        assert!(
            cluster_refusal(&spec("NodeLocal"), v(30)).is_none(),
            "internalTrafficPolicy: Local is served by every supported version"
        );
        assert!(
            cluster_refusal(&spec("Closest"), None).is_none(),
            "an unknown version refuses nothing"
        );
    }

    #[test]
    fn too_many_resolved_prefixes_are_refused_with_the_counts() {
        assert!(prefix_refusal(MAX_TENANT_PREFIXES - 1, 1).is_none());
        let (reason, message) = prefix_refusal(MAX_TENANT_PREFIXES, 1).unwrap();
        assert_eq!(reason, "TooManyPrefixes");
        assert!(message.contains("resolves to 10000 prefixes"), "{message}");
        assert!(message.contains("limit of 10000"), "{message}");
    }
}
