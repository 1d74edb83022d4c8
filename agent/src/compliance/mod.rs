//! `stratumctl report`: a compliance report of time synchronization for a period (PCI DSS
//! 10.6.1–10.6.3, ISO 27001:2022 A.8.17).
//!
//! Shaped like the rest of Stratum: [`fetch`] is the only IO (the API server with the user's
//! kubeconfig, Prometheus over HTTP, the audit log file) and gathers typed [`Evidence`];
//! [`builder::build`] turns it into one [`Report`] value; the JSON output is that value
//! serialized (its schema is docs/report.schema.json) and [`markdown::render`] prints the same
//! value for people.

pub mod audit_log;
pub mod builder;
pub mod fetch;
pub mod markdown;
pub mod model;
pub mod prometheus;
pub mod rbac;

pub use builder::{Evidence, build};
pub use model::Report;

/// The JSON Schema of the report's JSON output (committed as docs/report.schema.json).
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Report)).unwrap_or_default();
    if let Some(obj) = schema.as_object_mut() {
        obj.insert(
            "$id".into(),
            "https://stratum.io/schemas/report.schema.json".into(),
        );
    }
    schema
}
