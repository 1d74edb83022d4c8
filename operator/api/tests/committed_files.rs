//! The committed YAML (CRDs and examples) must match the Rust types.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use stratum_api::{TenantTimePolicy, TimeService};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crds_equal_the_generated_ones() {
    let dir = repo_root().join("crds");
    let mut expected_files = Vec::new();
    for crd in stratum_api::crds() {
        let name = stratum_api::crd_file_name(&crd);
        let committed = std::fs::read_to_string(dir.join(&name))
            .unwrap_or_else(|e| panic!("crds/{name} is missing ({e}); run `make crds`"));
        assert!(
            committed == stratum_api::crd_yaml(&crd).unwrap(),
            "crds/{name} differs from the Rust types; run `make crds` and commit the result"
        );
        expected_files.push(name);
    }
    let mut present: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files no type generates"
    );
}

#[test]
fn crds_have_status_subresources_short_names_and_printer_columns() {
    for crd in stratum_api::crds() {
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{}",
            crd.spec.names.kind
        );
        assert!(
            !crd.spec
                .names
                .short_names
                .clone()
                .unwrap_or_default()
                .is_empty()
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(columns.contains(&"Age"), "{columns:?}");
    }
    let node_clock = stratum_api::NodeClock::crd();
    let columns: Vec<_> = node_clock.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    // The owner and the last write: a stale agent's NodeClock looks healthy otherwise.
    assert_eq!(
        columns,
        [
            "Synced",
            "Offset",
            "Stratum",
            "Source",
            "TimeService",
            // While migrating (`-o wide`): the host daemon's view beside the agent's.
            "Daemon",
            "Daemon Offset",
            "Updated",
            "Age"
        ]
    );
    let wide: Vec<_> = node_clock.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(wide, ["Daemon", "Daemon Offset"], "shown only with -o wide");
}

/// Parses an example into its typed kind and checks it against the CRD's rules.
fn check_example<K>(file: &str) -> K
where
    K: CustomResourceExt + serde::de::DeserializeOwned,
{
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    let raw: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let typed: K = serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    if let Err(errors) = stratum_api::validate_object::<K>(&raw) {
        panic!("{file} breaks a CRD rule: {errors:?}");
    }
    typed
}

#[test]
fn every_example_parses_and_passes_the_crd_rules() {
    let service: TimeService = check_example("timeservice.yaml");
    assert!(
        service.spec.egress_tier.is_some(),
        "the example shows an egress tier"
    );
    assert!(
        service
            .spec
            .upstreams
            .iter()
            .any(|u| u.kind == stratum_api::time_service::UpstreamKind::Pool)
    );

    let own: TenantTimePolicy = check_example("tenant-own-namespace.yaml");
    assert!(
        own.spec.allowed_clients.is_empty(),
        "empty allowedClients means this namespace"
    );

    let cross: TenantTimePolicy = check_example("tenant-cross-namespace.yaml");
    assert!(
        cross
            .spec
            .allowed_clients
            .iter()
            .any(|p| p.namespace_selector.is_some())
    );
    assert!(
        cross
            .spec
            .allowed_clients
            .iter()
            .any(|p| p.ip_block.is_some())
    );

    // NTS: a cert-manager Certificate, then the policy naming the Secret it writes.
    let text = std::fs::read_to_string(repo_root().join("examples/tenant-nts.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let [certificate, policy] = &documents[..] else {
        panic!("tenant-nts.yaml: a Certificate and a TenantTimePolicy")
    };
    assert_eq!(certificate["kind"], "Certificate");
    if let Err(errors) = stratum_api::validate_object::<TenantTimePolicy>(policy) {
        panic!("tenant-nts.yaml breaks a CRD rule: {errors:?}");
    }
    let nts: TenantTimePolicy = serde_json::from_value(policy.clone()).unwrap();
    let auth = nts.spec.nts().expect("the example asks for NTS");
    assert_eq!(
        auth.nts_certificate_secret.as_deref(),
        certificate["spec"]["secretName"].as_str(),
        "the policy names the Secret the Certificate writes"
    );
    let service_name = format!(
        "{}.{}.svc.cluster.local",
        nts.spec.service.name,
        policy["metadata"]["namespace"].as_str().unwrap()
    );
    assert!(
        certificate["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .contains(&service_name.into()),
        "the certificate names the Service clients use"
    );

    // Symmetric keys: the Secret with its key file, then the policy naming it.
    let text =
        std::fs::read_to_string(repo_root().join("examples/tenant-symmetric-keys.yaml")).unwrap();
    let documents: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let [secret, policy] = &documents[..] else {
        panic!("tenant-symmetric-keys.yaml: a Secret and a TenantTimePolicy")
    };
    if let Err(errors) = stratum_api::validate_object::<TenantTimePolicy>(policy) {
        panic!("tenant-symmetric-keys.yaml breaks a CRD rule: {errors:?}");
    }
    let keyed: TenantTimePolicy = serde_json::from_value(policy.clone()).unwrap();
    let auth = keyed
        .spec
        .symmetric_keys()
        .expect("the example names a key Secret");
    assert_eq!(
        auth.symmetric_keys_secret.as_deref(),
        secret["metadata"]["name"].as_str()
    );
    let keys = stratum_ntp::symmetric::SymmetricKeys::parse(
        secret["stringData"]["keys"].as_str().unwrap(),
    )
    .expect("the example's key file reads");
    let algorithms: Vec<_> = keys.algorithms().map(|(id, a)| (id, a.name())).collect();
    assert_eq!(algorithms, [(1, "AES128"), (2, "SHA1")]);

    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            // Client-side recipes: run as written by the e2e test `client_recipes`.
            "clients",
            // Patches applied as written by the e2e test `migration`, and below.
            "migration",
            "tenant-cross-namespace.yaml",
            "tenant-nts.yaml",
            "tenant-own-namespace.yaml",
            "tenant-symmetric-keys.yaml",
            "timeservice.yaml"
        ],
        "an example has no test"
    );
}

/// RFC 7396 JSON merge patch, as `kubectl patch --type merge` applies it.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (key, value) in p {
                if value.is_null() {
                    t.remove(key);
                } else {
                    merge_patch(
                        t.entry(key.clone()).or_insert(serde_json::Value::Null),
                        value,
                    );
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[test]
fn the_migration_patches_turn_the_example_time_service_to_monitor_and_back() {
    use stratum_api::time_service::DisciplineMode;
    let text = std::fs::read_to_string(repo_root().join("examples/timeservice.yaml")).unwrap();
    let mut service: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let dir = repo_root().join("examples/migration");
    for (file, mode) in [
        ("1-monitor.yaml", DisciplineMode::Monitor),
        ("2-discipline.yaml", DisciplineMode::Discipline),
    ] {
        let patch: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        merge_patch(&mut service, &patch);
        let typed: TimeService = serde_json::from_value(service.clone()).unwrap();
        assert_eq!(typed.spec.discipline.mode, mode, "{file}");
        if let Err(errors) = stratum_api::validate_object::<TimeService>(&service) {
            panic!("{file} on examples/timeservice.yaml breaks a CRD rule: {errors:?}");
        }
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(
            readme.contains(file),
            "examples/migration/README.md names {file}"
        );
    }
}

#[test]
fn every_client_recipe_is_listed_in_its_readme_and_its_yaml_parses() {
    let dir = repo_root().join("examples/clients");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name == "README.md" {
            continue;
        }
        assert!(
            readme.contains(&format!("[`{name}`]({name})")),
            "examples/clients/README.md does not list {name}"
        );
        if name.ends_with(".yaml") {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            let doc: serde_yaml::Value = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("examples/clients/{name}: {e}"));
            assert!(doc["kind"].is_string(), "{name} names no kind");
        }
    }
}

#[test]
fn every_kind_is_in_the_stratum_category() {
    // `kubectl get stratum` lists every kind through this category.
    for crd in stratum_api::crds() {
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["stratum".to_string()][..]),
            "{}",
            crd.spec.names.kind
        );
    }
}
