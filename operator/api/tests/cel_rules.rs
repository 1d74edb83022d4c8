//! Every CEL rule of the CRDs, evaluated client-side with the same rule strings the API server
//! gets: one object that passes and one that fails with the rule's message.

#![allow(clippy::unwrap_used)]

use kube::core::cel::ValidationErrors;
use serde_json::{Value, json};
use stratum_api::{TenantTimePolicy, TimeService};

fn time_service(spec: Value) -> Checked {
    Checked(stratum_api::validate_object::<TimeService>(&json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TimeService",
        "metadata": {"name": "t"}, "spec": spec
    })))
}

fn tenant(spec: Value) -> Checked {
    Checked(stratum_api::validate_object::<TenantTimePolicy>(&json!({
        "apiVersion": "stratum.io/v1alpha1", "kind": "TenantTimePolicy",
        "metadata": {"name": "ntp", "namespace": "a"}, "spec": spec
    })))
}

/// The outcome of validating one object; named like the typed API so tests read naturally.
struct Checked(Result<(), ValidationErrors>);

impl Checked {
    fn validate_cel(self) -> Result<(), ValidationErrors> {
        self.0
    }
}

fn upstream(extra: Value) -> Value {
    let mut u = json!({"host": "ntp.example.org"});
    u.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    u
}

/// Asserts the object is accepted, or shows every rule that refused it.
fn accepted(result: Result<(), ValidationErrors>) {
    if let Err(errors) = result {
        panic!("expected valid, got: {errors:?}");
    }
}

/// Asserts the object is refused, with `message` among the reasons.
fn refused_with(result: Result<(), ValidationErrors>, message: &str) {
    let errors = result.expect_err("expected the object to be refused");
    let text = format!("{errors:?}");
    assert!(text.contains(message), "expected {message:?} among {text}");
}

#[test]
fn at_least_one_upstream_is_required() {
    accepted(time_service(json!({"upstreams": [upstream(json!({}))]})).validate_cel());
    refused_with(
        time_service(json!({"upstreams": []})).validate_cel(),
        "at least one upstream server or pool is required",
    );
}

#[test]
fn min_poll_must_not_exceed_max_poll() {
    accepted(
        time_service(json!({"upstreams": [upstream(json!({"minPoll": 4, "maxPoll": 4}))]}))
            .validate_cel(),
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"minPoll": 8, "maxPoll": 6}))]}))
            .validate_cel(),
        "minPoll must be less than or equal to maxPoll",
    );
}

#[test]
fn poll_exponents_stay_in_range() {
    accepted(
        time_service(json!({"upstreams": [upstream(json!({"minPoll": 0, "maxPoll": 17}))]}))
            .validate_cel(),
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"minPoll": -1}))]})).validate_cel(),
        "minPoll must be between 0 (1 s) and 17 (36 h)",
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"maxPoll": 18}))]})).validate_cel(),
        "maxPoll must be between 0 (1 s) and 17 (36 h)",
    );
}

#[test]
fn upstream_host_must_be_an_ip_or_dns_name() {
    accepted(
        time_service(json!({"upstreams": [upstream(json!({"host": "192.0.2.1"}))]})).validate_cel(),
    );
    accepted(
        time_service(json!({"upstreams": [upstream(json!({"host": "2001:db8::1"}))]}))
            .validate_cel(),
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"host": "not a host!"}))]}))
            .validate_cel(),
        "host must be an IP address or a DNS name",
    );
}

#[test]
fn upstream_port_and_pool_size_stay_in_range() {
    accepted(
        time_service(json!({"upstreams": [upstream(json!({"port": 4123, "maxSources": 16}))]}))
            .validate_cel(),
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"port": 0}))]})).validate_cel(),
        "port must be between 1 and 65535",
    );
    refused_with(
        time_service(json!({"upstreams": [upstream(json!({"maxSources": 17}))]})).validate_cel(),
        "maxSources must be between 1 and 16",
    );
}

#[test]
fn min_sources_must_be_at_least_one() {
    let spec = |n: i32| json!({"upstreams": [upstream(json!({}))], "selection": {"minSources": n}});
    accepted(time_service(spec(1)).validate_cel());
    refused_with(
        time_service(spec(0)).validate_cel(),
        "minSources must be between 1 and 16",
    );
}

#[test]
fn durations_must_be_well_formed() {
    let spec =
        |d: &str| json!({"upstreams": [upstream(json!({}))], "selection": {"maxDistance": d}});
    accepted(time_service(spec("1.5s")).validate_cel());
    accepted(time_service(spec("250ms")).validate_cel());
    refused_with(
        time_service(spec("1.5 seconds")).validate_cel(),
        "maxDistance must be a duration of at least 1ms",
    );
    refused_with(
        time_service(spec("-1s")).validate_cel(),
        "maxDistance must be a duration of at least 1ms",
    );
}

#[test]
fn durations_that_break_at_zero_have_a_lower_bound_of_one_millisecond() {
    let ts = |spec: Value| {
        let mut s = json!({"upstreams": [upstream(json!({}))]});
        s.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        time_service(s).validate_cel()
    };
    let cases = [
        (
            json!({"selection": {"maxDistance": "1ms"}}),
            json!({"selection": {"maxDistance": "999us"}}),
            "maxDistance must be a duration of at least 1ms",
        ),
        (
            json!({"discipline": {"panicThreshold": {"startup": "1ms"}}}),
            json!({"discipline": {"panicThreshold": {"startup": "0s"}}}),
            "panicThreshold.startup must be a duration of at least 1ms",
        ),
        (
            json!({"discipline": {"panicThreshold": {"runtime": "0.001s"}}}),
            json!({"discipline": {"panicThreshold": {"runtime": "0s"}}}),
            "panicThreshold.runtime must be a duration of at least 1ms",
        ),
    ];
    for (at_bound, below, message) in cases {
        accepted(ts(at_bound));
        refused_with(ts(below), message);
    }
    let tenant_cases = [
        (
            json!({"rateLimit": {"perClient": {"interval": "1ms"}}}),
            json!({"rateLimit": {"perClient": {"interval": "0s"}}}),
            "rateLimit.perClient.interval must be a duration of at least 1ms",
        ),
        (
            json!({"rateLimit": {"perClient": {"interval": "1000us"}}}),
            json!({"rateLimit": {"perClient": {"interval": "999999ns"}}}),
            "rateLimit.perClient.interval must be a duration of at least 1ms",
        ),
        (
            json!({"requirements": {"maxRootDistance": "1ms"}}),
            json!({"requirements": {"maxRootDistance": "0s"}}),
            "requirements.maxRootDistance must be a duration of at least 1ms",
        ),
        (
            json!({"requirements": {"maxRootDistance": "0.001s"}}),
            json!({"requirements": {"maxRootDistance": "500us"}}),
            "requirements.maxRootDistance must be a duration of at least 1ms",
        ),
    ];
    for (at_bound, below, message) in tenant_cases {
        accepted(tenant(at_bound).validate_cel());
        refused_with(tenant(below).validate_cel(), message);
    }
}

#[test]
fn discipline_bounds_are_enforced() {
    let spec = |d: Value| json!({"upstreams": [upstream(json!({}))], "discipline": d});
    accepted(
        time_service(spec(
            json!({"maxSlewPpm": 83333, "makeStep": {"threshold": "100ms", "limit": 0}}),
        ))
        .validate_cel(),
    );
    refused_with(
        time_service(spec(json!({"maxSlewPpm": 0}))).validate_cel(),
        "maxSlewPpm must be between 1 and 100000",
    );
    refused_with(
        time_service(spec(json!({"makeStep": {"limit": 101}}))).validate_cel(),
        "makeStep.limit must be between 0 and 100",
    );
    refused_with(
        time_service(spec(json!({"makeStep": {"threshold": "soon"}}))).validate_cel(),
        "makeStep.threshold must be a non-negative duration",
    );
    refused_with(
        time_service(spec(json!({"panicThreshold": {"runtime": "x"}}))).validate_cel(),
        "panicThreshold.runtime must be a duration of at least 1ms",
    );
    refused_with(
        time_service(spec(json!({"panicThreshold": {"startup": "1d"}}))).validate_cel(),
        "panicThreshold.startup must be a duration of at least 1ms",
    );
    refused_with(
        time_service(spec(json!({"driftDirectory": "var/lib"}))).validate_cel(),
        "driftDirectory must be an absolute path",
    );
}

#[test]
fn smear_window_stays_between_one_and_forty_eight_hours() {
    let spec = |w: &str| json!({"upstreams": [upstream(json!({}))], "leap": {"mode": "Smear", "smearWindow": w}});
    accepted(time_service(spec("17h")).validate_cel());
    refused_with(
        time_service(spec("30m")).validate_cel(),
        "smearWindow must be a duration between 1h and 48h",
    );
    refused_with(
        time_service(spec("49h")).validate_cel(),
        "smearWindow must be a duration between 1h and 48h",
    );
    refused_with(
        time_service(spec("a day")).validate_cel(),
        "smearWindow must be a duration between 1h and 48h",
    );
}

#[test]
fn tenant_port_range_must_be_ordered_and_valid() {
    let spec = |s: i32, e: i32| json!({"upstreams": [upstream(json!({}))], "serving": {"tenantPorts": {"start": s, "end": e}}});
    accepted(time_service(spec(20000, 20000)).validate_cel());
    refused_with(
        time_service(spec(20001, 20000)).validate_cel(),
        "tenantPorts.start must be less than or equal to tenantPorts.end",
    );
    refused_with(
        time_service(spec(0, 20000)).validate_cel(),
        "port must be between 1 and 65535",
    );
    refused_with(
        time_service(spec(1000, 70000)).validate_cel(),
        "port must be between 1 and 65535",
    );
}

#[test]
fn serving_holdover_local_stratum_and_reporting_are_bounded() {
    let spec = |s: Value, r: Value| json!({"upstreams": [upstream(json!({}))], "serving": s, "reporting": r});
    accepted(
        time_service(spec(
            json!({"holdover": "2h", "localStratum": 10}),
            json!({"interval": "5s"}),
        ))
        .validate_cel(),
    );
    refused_with(
        time_service(spec(json!({"localStratum": 16}), json!({}))).validate_cel(),
        "localStratum must be between 1 and 15",
    );
    refused_with(
        time_service(spec(json!({"holdover": "forever"}), json!({}))).validate_cel(),
        "holdover must be a non-negative duration",
    );
    refused_with(
        time_service(spec(json!({}), json!({"interval": "1s"}))).validate_cel(),
        "reporting.interval must be a duration of at least 5s",
    );
}

#[test]
fn egress_tier_needs_a_node_selector_label() {
    let spec = |sel: Value| json!({"upstreams": [upstream(json!({}))], "egressTier": {"nodeSelector": sel}});
    accepted(time_service(spec(json!({"stratum.io/egress": "true"}))).validate_cel());
    refused_with(
        time_service(spec(json!({}))).validate_cel(),
        "egressTier.nodeSelector needs at least one label",
    );
}

#[test]
fn placement_may_name_only_linux_as_the_node_os() {
    let spec = |sel: Value| json!({"upstreams": [upstream(json!({}))], "placement": {"nodeSelector": sel}});
    accepted(time_service(spec(json!({}))).validate_cel());
    accepted(time_service(spec(json!({"kubernetes.io/os": "linux", "pool": "a"}))).validate_cel());
    refused_with(
        time_service(spec(json!({"kubernetes.io/os": "windows"}))).validate_cel(),
        "agents run only on Linux nodes; kubernetes.io/os must be linux or left out",
    );
}

#[test]
fn a_peer_needs_a_selector_or_an_ip_block() {
    accepted(tenant(json!({"allowedClients": [{"podSelector": {}}]})).validate_cel());
    refused_with(
        tenant(json!({"allowedClients": [{}]})).validate_cel(),
        "a peer needs at least one of podSelector, namespaceSelector or ipBlock",
    );
}

#[test]
fn ip_block_cannot_be_mixed_with_selectors() {
    accepted(
        tenant(json!({"allowedClients": [{"namespaceSelector": {}, "podSelector": {}}]}))
            .validate_cel(),
    );
    refused_with(
        tenant(json!({"allowedClients": [{"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}))
            .validate_cel(),
        "ipBlock cannot be combined with podSelector or namespaceSelector",
    );
}

#[test]
fn ip_block_cidrs_must_be_well_formed() {
    accepted(
        tenant(json!({"allowedClients": [{"ipBlock": {"cidr": "2001:db8::/32"}}]})).validate_cel(),
    );
    refused_with(
        tenant(json!({"allowedClients": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]})).validate_cel(),
        "cidr must be a CIDR such as 10.0.0.0/24",
    );
    refused_with(
        tenant(json!({"deniedClients": [{"cidr": "banana"}]})).validate_cel(),
        "cidr must be a CIDR such as 10.0.0.0/24",
    );
}

#[test]
fn ip_block_exceptions_must_lie_strictly_inside_the_cidr() {
    let block = |except: Value| {
        tenant(json!({"allowedClients": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": except}}]}))
    };
    accepted(block(json!(["10.0.1.0/24", "10.0.2.7/32"])).validate_cel());
    refused_with(
        block(json!(["10.1.0.0/24"])).validate_cel(),
        "every except entry must be a CIDR strictly inside cidr",
    );
    refused_with(
        block(json!(["10.0.0.0/16"])).validate_cel(),
        "every except entry must be a CIDR strictly inside cidr",
    );
    refused_with(
        block(json!(["nonsense"])).validate_cel(),
        "every except entry must be a CIDR strictly inside cidr",
    );
    refused_with(
        tenant(json!({"deniedClients": [{"cidr": "10.0.0.0/16", "except": ["192.168.0.0/24"]}]}))
            .validate_cel(),
        "every except entry must be a CIDR strictly inside cidr",
    );
}

#[test]
fn service_name_must_be_a_dns_label() {
    accepted(tenant(json!({"service": {"name": "ntp-vms"}})).validate_cel());
    refused_with(
        tenant(json!({"service": {"name": "NTP_Service"}})).validate_cel(),
        "service.name must be a DNS-1035 label",
    );
}

#[test]
fn rate_limits_are_bounded() {
    accepted(tenant(json!({"rateLimit": {"perClient": {"interval": "8s", "burst": 8}, "perTenant": {"requestsPerSecond": 100, "burst": 100}}})).validate_cel());
    refused_with(
        tenant(json!({"rateLimit": {"perClient": {"burst": 0}}})).validate_cel(),
        "rateLimit.perClient.burst must be between 1 and 1024",
    );
    refused_with(
        tenant(json!({"rateLimit": {"perClient": {"interval": "often"}}})).validate_cel(),
        "rateLimit.perClient.interval must be a duration of at least 1ms",
    );
    refused_with(
        tenant(json!({"rateLimit": {"perTenant": {"requestsPerSecond": 100, "burst": 10}}}))
            .validate_cel(),
        "rateLimit.perTenant.burst must be at least requestsPerSecond",
    );
    refused_with(
        tenant(json!({"rateLimit": {"perTenant": {"requestsPerSecond": 0, "burst": 10}}}))
            .validate_cel(),
        "rateLimit.perTenant.requestsPerSecond must be at least 1",
    );
}

#[test]
fn max_root_distance_must_be_a_duration() {
    accepted(tenant(json!({"requirements": {"maxRootDistance": "50ms"}})).validate_cel());
    refused_with(
        tenant(json!({"requirements": {"maxRootDistance": "fast"}})).validate_cel(),
        "requirements.maxRootDistance must be a duration of at least 1ms",
    );
}

#[test]
fn timezone_must_not_be_empty_when_set() {
    accepted(tenant(json!({"timezone": "America/New_York"})).validate_cel());
    refused_with(
        tenant(json!({"timezone": ""})).validate_cel(),
        "timezone must not be empty when set",
    );
}

#[test]
fn the_system_clock_needs_the_discipline_mode() {
    let with = |discipline: Value| {
        time_service(json!({"upstreams": [upstream(json!({}))], "discipline": discipline}))
            .validate_cel()
    };
    for ok in [
        json!({"clock": "System"}),
        json!({"mode": "Discipline", "clock": "System"}),
        json!({"mode": "Monitor", "clock": "Readonly"}),
        json!({"mode": "Monitor", "clock": "Simulated"}),
        json!({"mode": "Discipline", "clock": "Simulated"}),
        json!({"mode": "Monitor"}),
    ] {
        accepted(with(ok));
    }
    refused_with(
        with(json!({"mode": "Monitor", "clock": "System"})),
        "clock System steers the node clock, which mode Monitor never does",
    );
}

#[test]
fn nts_names_its_certificate_secret_and_requiring_authentication_needs_a_method() {
    let auth = |a: Value| tenant(json!({ "authentication": a })).validate_cel();
    accepted(auth(
        json!({"nts": true, "ntsCertificateSecret": "ntp-tls"}),
    ));
    accepted(auth(
        json!({"nts": true, "ntsCertificateSecret": "ntp-tls", "unauthenticated": "Deny"}),
    ));
    refused_with(
        auth(json!({"nts": true})),
        "authentication.ntsCertificateSecret must name the kubernetes.io/tls Secret",
    );
    refused_with(
        auth(json!({"nts": true, "ntsCertificateSecret": "Not_A_Name"})),
        "authentication.ntsCertificateSecret must be a Secret name",
    );
    // Requiring authentication with none offered would refuse every client.
    accepted(auth(json!({"unauthenticated": "Serve"})));
    refused_with(
        auth(json!({"unauthenticated": "Ignore"})),
        "Deny and Ignore need an authentication method",
    );
}

#[test]
fn cookie_keys_rotate_no_faster_than_a_secret_volume_reaches_every_agent() {
    let serving = |rotation: &str| {
        time_service(json!({
            "upstreams": [upstream(json!({}))],
            "serving": {"ntsCookieKeyRotation": rotation}
        }))
        .validate_cel()
    };
    accepted(serving("24h"));
    accepted(serving("5m"));
    refused_with(
        serving("1m"),
        "serving.ntsCookieKeyRotation must be a duration of at least 5m",
    );
}

#[test]
fn symmetric_keys_name_a_secret_and_an_upstream_key_is_not_nts() {
    let auth = |a: Value| tenant(json!({ "authentication": a })).validate_cel();
    accepted(auth(
        json!({"symmetricKeysSecret": "device-keys", "unauthenticated": "Ignore"}),
    ));
    refused_with(
        auth(json!({"symmetricKeysSecret": "Device_Keys"})),
        "authentication.symmetricKeysSecret must be a Secret name",
    );
    // A name only: the Secret is read in the policy's own namespace, and no spelling reaches
    // another tenant's (or the operator's) Secret.
    for elsewhere in [
        "team-b/device-keys",
        "../team-b/device-keys",
        "/device-keys",
    ] {
        refused_with(
            auth(json!({"symmetricKeysSecret": elsewhere})),
            "authentication.symmetricKeysSecret must be a Secret name",
        );
        refused_with(
            auth(json!({"nts": true, "ntsCertificateSecret": elsewhere})),
            "authentication.ntsCertificateSecret must be a Secret name",
        );
    }
    let keyed = |extra: Value| time_service(json!({"upstreams": [upstream(extra)]})).validate_cel();
    accepted(keyed(
        json!({"key": {"secretName": "upstream-keys", "id": 1}}),
    ));
    accepted(keyed(
        json!({"key": {"secretName": "upstream-keys", "id": 4294967295u64}}),
    ));
    refused_with(
        keyed(json!({"key": {"secretName": "upstream-keys", "id": 0}})),
        "upstreams[].key.id must be between 1 and 4294967295",
    );
    refused_with(
        keyed(json!({"key": {"secretName": "Upstream Keys", "id": 1}})),
        "upstreams[].key.secretName must be a Secret name",
    );
    refused_with(
        keyed(json!({"nts": true, "key": {"secretName": "upstream-keys", "id": 1}})),
        "an upstream authenticates with nts or with a key, not both",
    );
}
