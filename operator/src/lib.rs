//! The Stratum operator: reconciles TimeServices into agent fleets (DaemonSet, RBAC, agent
//! config, NetworkPolicy) and TenantTimePolicies into per-tenant ports, allow lists, Services,
//! EndpointSlices and `time-config` ConfigMaps.
//!
//! Shape (see shared STYLE.md), one layer importing only those below it:
//!
//! - [`model`]: the plain facts the watches saw (pods, namespaces, NodeClocks, TimeServices);
//! - [`resolve`], [`build`], [`validate`], [`placement`]: pure functions over the model and the
//!   specs;
//! - [`index`]: private state with `&self` reads, written only by the watch feed, each write
//!   returning the `#[must_use]` [`index::Triggers`] it causes;
//! - [`plan`]: the [`plan::Planner`], which owns every planning cache and plans from a read of
//!   the index, encoding outside the index lock;
//! - [`controller`]: the feed of watches into the index and its triggers into the controllers,
//!   and thin reconcilers that apply a plan with server-side apply under one field manager and
//!   write status only when it changed. No reconciler writes the index.
//!
//! `tests/module_graph.rs` fails on any import cycle between these modules.

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
pub mod placement;
pub mod plan;
pub mod ports;
pub mod resolve;
pub mod selector;
pub mod validate;

pub use error::{Error, Result};
