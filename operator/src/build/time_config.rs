//! The `time-config` ConfigMap in the tenant's namespace: where workloads find NTP, and their
//! time zone.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::core::v1::ConfigMap;
use stratum_api::TenantTimePolicy;

use super::tenant_meta;
use crate::error::Result;
use crate::names;

/// Whether `name` is a time zone of the IANA database (as compiled into chrono-tz).
pub fn is_iana_timezone(name: &str) -> bool {
    chrono_tz::Tz::from_str(name).is_ok()
}

/// The tenant's `time-config`: `NTP_SERVER` (the Service's DNS name), `NTP_PORT` and, when set,
/// `TZ`.
pub fn build_time_config(tenant: &TenantTimePolicy, time_service: &str) -> Result<ConfigMap> {
    let ns = tenant.metadata.namespace.as_deref().unwrap_or_default();
    let mut data = BTreeMap::from([
        (
            "NTP_SERVER".to_owned(),
            format!("{}.{ns}.svc", tenant.spec.service.name),
        ),
        ("NTP_PORT".to_owned(), names::NTP_SERVICE_PORT.to_string()),
    ]);
    if let Some(tz) = &tenant.spec.timezone {
        data.insert("TZ".to_owned(), tz.clone());
    }
    Ok(ConfigMap {
        metadata: tenant_meta(tenant, time_service, names::TIME_CONFIG_NAME.to_owned())?,
        data: Some(data),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn time_config_names_the_service_dns_name_port_and_timezone() {
        let tenant = fixtures::tenant(
            "team-a",
            "p",
            serde_json::json!({ "timezone": "Europe/Berlin" }),
        );
        let cm = build_time_config(&tenant, "cluster").unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("time-config"));
        let data = cm.data.unwrap();
        assert_eq!(data["NTP_SERVER"], "ntp.team-a.svc");
        assert_eq!(data["NTP_PORT"], "123");
        assert_eq!(data["TZ"], "Europe/Berlin");
    }

    #[test]
    fn timezones_are_checked_against_the_iana_database() {
        assert!(is_iana_timezone("America/Argentina/Buenos_Aires"));
        assert!(is_iana_timezone("UTC"));
        assert!(!is_iana_timezone("Europe/Atlantis"));
        assert!(!is_iana_timezone("CEST+2"));
    }
}
