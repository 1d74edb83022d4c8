//! `stratum-agent`: the node daemon around the sans-IO core in `stratum-ntp`. It disciplines
//! the node clock from upstream servers, reports its NodeClock and Events, and exposes
//! metrics, probes and a local status endpoint for `stratumctl`; it serves NTP to tenants
//! ([`server`]); [`loadgen`] is the load generator behind `stratumctl bench`.

pub mod agent;
pub mod clock;
pub mod compliance;
pub mod config_cache;
pub mod config_source;
pub mod delay_proxy;
pub mod drift;
pub mod driver;
pub mod host_daemons;
pub mod loadgen;
pub mod metrics;
pub mod nts_ke;
pub mod nts_server;
pub mod nts_upstreams;
pub mod ops;
pub mod query;
pub mod report;
pub mod resolver;
pub mod server;
pub mod state_file;
pub mod status;
pub mod symmetric_keys;
pub mod upstream;
pub mod upstream_keys;
pub mod wire_tap;

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
