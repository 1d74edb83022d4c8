//! Operator metrics. Labels are bounded: controller name and error category, never object
//! names.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

// Names and labels are docs/contracts.md's: the chart's dashboard and alerts query them.

/// Prefix of every operator metric name.
const PREFIX: &str = "stratum_operator";

/// Every metric the operator exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// The process_* metrics, unprefixed (the main registry prefixes every name).
    process: Registry,
    /// Every registered metric's full name and label names, for the contract test.
    registered: BTreeMap<String, BTreeSet<String>>,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    /// Tenants indexed.
    pub tenants: IntGauge,
    /// CIDRs across the served tenants' resolved allow lists, set at each config build.
    pub allow_list_size: IntGauge,
    /// Agent config writes.
    pub config_writes: IntCounterVec,
    /// Seconds from writing an agent config revision until every agent of the TimeService
    /// reports running it.
    pub config_propagation: Histogram,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Nodes, across TimeServices, whose agent reports a source its TimeService does not
    /// designate (set by the leader's TimeService reconciles).
    pub nodes_off_designated: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciliations_total", "Reconciliations run"),
            &["controller"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciliations that failed, by error category",
            ),
            &["controller", "category"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "reconcile_duration_seconds",
                "Duration of one reconciliation",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["controller"],
        )?;
        let tenants = IntGauge::new("tenants", "TenantTimePolicies indexed")?;
        let allow_list_size =
            IntGauge::new("allow_list_cidrs", "CIDRs across all resolved allow lists")?;
        let config_writes = IntCounterVec::new(
            Opts::new(
                "agent_config_writes_total",
                "Agent config writes, and changes held back by coalescing",
            ),
            &["result"],
        )?;
        let config_propagation = Histogram::with_opts(
            HistogramOpts::new(
                "config_propagation_seconds",
                "Time from writing an agent config until every agent reports running it",
            )
            .buckets(vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]),
        )?;
        let leader = IntGauge::new("leader", "1 while this replica is the leader")?;
        let nodes_off_designated = IntGauge::new(
            "nodes_off_designated_sources",
            "Nodes whose agent reports a source their TimeService does not designate",
        )?;
        // Always 1; the version is in the label, so dashboards can join on it.
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "The operator's version (always 1)"),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: [Box<dyn Collector>; 10] = [
            Box::new(build_info),
            Box::new(reconciles.clone()),
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(tenants.clone()),
            Box::new(allow_list_size.clone()),
            Box::new(config_writes.clone()),
            Box::new(config_propagation.clone()),
            Box::new(leader.clone()),
            Box::new(nodes_off_designated.clone()),
        ];
        let mut registered = BTreeMap::new();
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let collector = prometheus::process_collector::ProcessCollector::for_self();
            for desc in collector.desc() {
                registered.insert(
                    desc.fq_name.clone(),
                    desc.variable_labels.iter().cloned().collect(),
                );
            }
            process.register(Box::new(collector))?;
        }
        for collector in collectors {
            for desc in collector.desc() {
                registered.insert(
                    format!("{PREFIX}_{}", desc.fq_name),
                    desc.variable_labels.iter().cloned().collect(),
                );
            }
            registry.register(collector)?;
        }
        Ok(Self {
            registry,
            process,
            registered,
            reconciles,
            failures,
            duration,
            tenants,
            allow_list_size,
            config_writes,
            config_propagation,
            leader,
            nodes_off_designated,
        })
    }

    /// Every registered metric's full name and label names.
    pub fn registered(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.registered
    }

    /// Counts a reconcile of `controller` and times it until the guard drops.
    pub fn measure(&self, controller: &'static str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.with_label_values(&[controller]),
        }
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, controller: &'static str, error: &crate::Error) {
        self.failures
            .with_label_values(&[controller, error.metric_label()])
            .inc();
    }

    /// Renders the registry in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "rendering metrics failed");
        }
        out
    }
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn build_info_carries_the_version() {
        let text = Metrics::new().unwrap().render();
        let line = format!(
            "stratum_operator_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
    }

    #[test]
    fn docs_contracts_lists_exactly_the_metrics_the_operator_exposes() {
        let documented = stratum_api::contracts::documented_metrics(
            include_str!("../../docs/contracts.md"),
            "stratum_operator_",
        )
        .into_iter()
        .chain(stratum_api::contracts::documented_metrics(
            include_str!("../../docs/contracts.md"),
            "process_",
        ))
        .collect();
        let problems = stratum_api::contracts::metric_differences(
            Metrics::new().unwrap().registered(),
            &documented,
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn process_metrics_are_rendered_under_their_standard_names() {
        let text = Metrics::new().unwrap().render();
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.contains("\nprocess_threads "), "{text}");
        assert!(!text.contains("stratum_operator_process_"), "{text}");
        assert!(text.contains("stratum_operator_leader "), "{text}");
    }

    #[test]
    fn errors_are_counted_by_bounded_category() {
        let m = Metrics::new().unwrap();
        drop(m.measure("tenant"));
        m.failed(
            "tenant",
            &crate::Error::InvalidSpec("whatever the user wrote".into()),
        );
        let text = m.render();
        assert!(
            text.contains(
                "stratum_operator_reconcile_errors_total{category=\"invalid_spec\",controller=\"tenant\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("whatever"));
        assert!(text.contains("stratum_operator_reconciliations_total{controller=\"tenant\"} 1"));
        assert!(text.contains("# TYPE stratum_operator_allow_list_cidrs gauge"));
        assert!(text.contains(
            "stratum_operator_reconcile_duration_seconds_count{controller=\"tenant\"} 1"
        ));
    }
}
