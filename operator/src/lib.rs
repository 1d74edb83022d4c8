//! The Stratum operator: reconciles TimeServices into agent fleets (DaemonSet, RBAC, agent
//! config, NetworkPolicy) and TenantTimePolicies into per-tenant ports, allow lists, Services,
//! EndpointSlices and `time-config` ConfigMaps.
//!
//! Shape (see shared STYLE.md): watches feed the pure [`index`]; reconcilers in [`controller`]
//! read it, call the pure [`build`] functions and apply every child with server-side apply under
//! one field manager; status is computed as a value and written only when it changed.

pub mod build;
pub mod clock;
pub mod coalesce;
pub mod controller;
pub mod error;
pub mod freshness;
pub mod http;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod names;
pub mod owned;
pub mod ports;
pub mod resolve;
pub mod selector;
pub mod validate;

pub use error::{Error, Result};
pub mod plan;
