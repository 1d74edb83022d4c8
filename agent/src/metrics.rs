//! The agent's Prometheus metrics, named as in docs/contracts.md. Labels are bounded: `source`
//! comes from the config's upstreams, `tenant` from its tenants, `state`/`outcome`/`code`/`result`
//! from closed sets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use stratum_ntp::system::{SourceState, SystemState};

use crate::config_cache::ConfigOrigin;
use crate::host_daemons::{Detection, Evidence};
use crate::status::HostDaemonClock;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Every registered metric's name and label names, for the contract test.
    registered: BTreeMap<String, BTreeSet<String>>,
    /// Identity.
    pub info: IntGaugeVec,
    synchronized: IntGauge,
    offset: prometheus::Gauge,
    frequency: prometheus::Gauge,
    jitter: prometheus::Gauge,
    last_update: prometheus::Gauge,
    stratum: IntGauge,
    root_delay: prometheus::Gauge,
    root_dispersion: prometheus::Gauge,
    leap: IntGauge,
    agreeing: IntGauge,
    min_sources: IntGauge,
    offset_bound: prometheus::Gauge,
    /// Steps applied.
    pub steps: IntCounter,
    /// Corrections refused beyond a panic threshold.
    pub panic_refusals: IntCounter,
    /// Selections that marked a source falseticker.
    pub falseticker_detections: IntCounter,
    source_reach: IntGaugeVec,
    source_offset: GaugeVec,
    source_delay: GaugeVec,
    source_jitter: GaugeVec,
    source_state: IntGaugeVec,
    /// The `member` label of each source address, kept stable between observations.
    members: std::sync::Mutex<MemberIndex>,
    /// Held while a labelled family is cleared and refilled, and while a scrape gathers: a
    /// scrape between the clear and the refill would otherwise see sources vanish.
    rebuilding: std::sync::Mutex<()>,
    /// Config changes by result.
    pub config_reloads: IntCounterVec,
    /// Tenant packets by outcome.
    pub tenant_requests: IntCounterVec,
    /// Kiss-o'-Death replies by code.
    pub tenant_kod: IntCounterVec,
    config_source: IntGaugeVec,
    other_time_daemon: IntGaugeVec,
    host_daemon_offset: GaugeVec,
    /// Upstream name lookups by result.
    pub upstream_lookups: IntCounterVec,
    /// Upstream addresses dropped, by reason.
    pub upstream_drops: IntCounterVec,
    /// NTS key exchanges by upstream and result.
    pub nts_key_exchanges: IntCounterVec,
    /// NTS replies refused before the core saw them, by upstream and reason.
    pub nts_reply_failures: IntCounterVec,
    /// Polls of NTS upstreams not sent for want of a cookie.
    pub nts_polls_withheld: IntCounterVec,
    /// Cookies held per NTS upstream.
    nts_cookies: IntGaugeVec,
    /// Key exchanges at tenants' NTS-KE endpoints, by tenant and result.
    pub tenant_nts_key_exchanges: IntCounterVec,
    /// NTS-authenticated replies per tenant (also counted as served).
    pub tenant_nts_authenticated: IntCounterVec,
    /// Whether the TimeService's NTS cookie master keys are loaded (1) or not (0; every
    /// cookie then gets the NTS NAK).
    pub nts_cookie_keys_loaded: IntGauge,
    /// The id of the cookie master key new cookies are sealed with (0 without keys). Not
    /// secret: ids count up, so agents that disagree show a rotation still on its way.
    pub nts_cookie_key_id: IntGauge,
    /// Replies from keyed upstreams dropped before the core saw them, by upstream and reason.
    pub upstream_key_reply_failures: IntCounterVec,
    /// Polls of keyed upstreams not sent for want of their key.
    pub upstream_key_polls_withheld: IntCounterVec,
    /// Replies signed with a tenant's symmetric key, per tenant (also counted as served).
    pub tenant_symmetric_authenticated: IntCounterVec,
    /// Tenants' symmetric key files that did not read at their last change.
    pub symmetric_key_files_failed: IntGauge,
    /// Configured tenant ports not bound (retried with backoff).
    pub tenant_port_bind_failures: IntGauge,
}

/// The `member` label of the per-source series: the configured name (`source`) stays, and
/// each address resolved from it gets the lowest index free among that name's members,
/// which it keeps while it stays. A pool whose members churn reuses the same few series
/// (at most its `maxSources` at a time) instead of adding one per address ever seen.
#[derive(Debug, Default)]
pub struct MemberIndex {
    slots: BTreeMap<String, Vec<Option<SocketAddr>>>,
}

impl MemberIndex {
    /// The member index of each `(name, address)`, in order. Addresses no longer listed
    /// free their index first.
    pub fn assign(&mut self, sources: &[(&str, SocketAddr)]) -> Vec<usize> {
        for (name, slots) in self.slots.iter_mut() {
            for slot in slots.iter_mut() {
                if slot.is_some_and(|a| !sources.contains(&(name.as_str(), a))) {
                    *slot = None;
                }
            }
            while slots.last().is_some_and(Option::is_none) {
                slots.pop();
            }
        }
        self.slots.retain(|_, slots| !slots.is_empty());
        sources
            .iter()
            .map(|(name, address)| {
                let slots = self.slots.entry((*name).to_owned()).or_default();
                if let Some(i) = slots.iter().position(|s| *s == Some(*address)) {
                    return i;
                }
                match slots.iter().position(Option::is_none) {
                    Some(i) => {
                        slots[i] = Some(*address);
                        i
                    }
                    None => {
                        slots.push(Some(*address));
                        slots.len() - 1
                    }
                }
            })
            .collect()
    }
}

const SOURCE_STATES: [&str; 6] = [
    "selected",
    "combined",
    "candidate",
    "falseticker",
    "unreachable",
    "demobilized",
];

fn state_label(state: SourceState) -> &'static str {
    match state {
        // Not yet usable sources count as unreachable for alerting purposes.
        SourceState::Initializing | SourceState::Unusable => "unreachable",
        other => crate::status::state_name(other),
    }
}

impl Metrics {
    /// Every registered metric's name and label names.
    pub fn registered(&self) -> &BTreeMap<String, BTreeSet<String>> {
        &self.registered
    }

    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let mut registered = BTreeMap::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                for desc in m.desc() {
                    registered.insert(
                        desc.fq_name.clone(),
                        desc.variable_labels.iter().cloned().collect(),
                    );
                }
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let g = |name: &str, help: &str| prometheus::Gauge::new(name, help);
        let gv =
            |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels);
        let igv = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let icv = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        // CPU, memory, descriptors and threads under the names every exporter uses.
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            for desc in process.desc() {
                registered.insert(
                    desc.fq_name.clone(),
                    desc.variable_labels.iter().cloned().collect(),
                );
            }
            registry.register(Box::new(process))?;
        }
        Ok(Self {
            config_source: reg!(igv(
                "stratum_agent_config_source",
                "1 for where the config in force came from: the source (its ConfigMap), the \
                 cache of the last good config (while the source gives none), or none yet.",
                &["source"]
            )?),
            other_time_daemon: reg!(igv(
                "stratum_agent_other_time_daemon",
                "1 for each sign of another time daemon on the node: the kernel PLL or FLL on, \
                 chronyd's command port, or the NTP port bound by another program.",
                &["evidence"]
            )?),
            host_daemon_offset: reg!(gv(
                "stratum_agent_host_daemon_offset_seconds",
                "The node clock's offset as another time daemon on the node estimates it (chronyd \
                 asked on its command port, or the correction ntpd or systemd-timesyncd left in \
                 the kernel), beside stratum_agent_offset_seconds. Absent when none is seen.",
                &["daemon"]
            )?),
            info: reg!(igv(
                "stratum_agent_info",
                "Agent identity (always 1).",
                &["version", "time_service", "node", "clock"]
            )?),
            synchronized: reg!(IntGauge::new(
                "stratum_agent_synchronized",
                "1 when the clock is synchronized with enough agreeing sources."
            )?),
            offset: reg!(g(
                "stratum_agent_offset_seconds",
                "Estimated offset of the node clock from true time (positive: ahead)."
            )?),
            frequency: reg!(g(
                "stratum_agent_frequency_adjustment_ratio",
                "Frequency adjustment in force as a ratio, as node_exporter's node_timex_frequency_adjustment_ratio: 1 + the correction (above 1: the clock runs faster)."
            )?),
            jitter: reg!(g("stratum_agent_jitter_seconds", "System jitter.")?),
            last_update: reg!(g(
                "stratum_agent_last_update_timestamp_seconds",
                "Unix time of the last clock update from the sources (0: none yet)."
            )?),
            stratum: reg!(IntGauge::new(
                "stratum_agent_stratum",
                "Stratum served (16 = unsynchronized)."
            )?),
            root_delay: reg!(g("stratum_agent_root_delay_seconds", "Root delay.")?),
            root_dispersion: reg!(g(
                "stratum_agent_root_dispersion_seconds",
                "Root dispersion."
            )?),
            leap: reg!(IntGauge::new(
                "stratum_agent_leap_status",
                "Leap indicator: 0 none, 1 insert, 2 delete, 3 unsynchronized."
            )?),
            agreeing: reg!(IntGauge::new(
                "stratum_agent_agreeing_sources",
                "Sources in the majority clique."
            )?),
            min_sources: reg!(IntGauge::new(
                "stratum_agent_min_sources",
                "Configured minimum of agreeing sources."
            )?),
            offset_bound: reg!(prometheus::Gauge::new(
                "stratum_agent_offset_bound_seconds",
                "Tightest configured bound on the clock error: selection.maxDistance and the tenants' maxRootDistance."
            )?),
            steps: reg!(IntCounter::new(
                "stratum_agent_clock_steps_total",
                "Clock steps applied."
            )?),
            panic_refusals: reg!(IntCounter::new(
                "stratum_agent_panic_refusals_total",
                "Corrections refused beyond a panic threshold."
            )?),
            falseticker_detections: reg!(IntCounter::new(
                "stratum_agent_falseticker_detections_total",
                "Selections that marked a source falseticker."
            )?),
            source_reach: reg!(igv(
                "stratum_agent_source_reach",
                "8-bit reachability register of a source.",
                &["source", "member"]
            )?),
            source_offset: reg!(gv(
                "stratum_agent_source_offset_seconds",
                "Offset of a source.",
                &["source", "member"]
            )?),
            source_delay: reg!(gv(
                "stratum_agent_source_delay_seconds",
                "Round-trip delay to a source.",
                &["source", "member"]
            )?),
            source_jitter: reg!(gv(
                "stratum_agent_source_jitter_seconds",
                "Jitter of a source.",
                &["source", "member"]
            )?),
            source_state: reg!(igv(
                "stratum_agent_source_state",
                "1 for the source's current selection role.",
                &["source", "member", "state"]
            )?),
            config_reloads: reg!(icv(
                "stratum_agent_config_reloads_total",
                "Config changes seen, by result.",
                &["result"]
            )?),
            tenant_requests: reg!(icv(
                "stratum_agent_tenant_requests_total",
                "Packets received on a tenant port, by outcome.",
                &["tenant", "outcome"]
            )?),
            tenant_kod: reg!(icv(
                "stratum_agent_tenant_kod_sent_total",
                "Kiss-o'-Death replies sent, by code.",
                &["tenant", "code"]
            )?),
            upstream_lookups: reg!(icv(
                "stratum_agent_upstream_lookups_total",
                "Upstream name lookups, by result.",
                &["result"]
            )?),
            upstream_drops: reg!(icv(
                "stratum_agent_upstream_drops_total",
                "Upstream addresses dropped (and replaced where the name had a spare), by reason.",
                &["reason"]
            )?),
            nts_key_exchanges: reg!(icv(
                "stratum_agent_nts_key_exchanges_total",
                "NTS key exchanges with upstreams, by configured name and result (ok or why not).",
                &["source", "result"]
            )?),
            tenant_nts_key_exchanges: reg!(icv(
                "stratum_agent_tenant_nts_key_exchanges_total",
                "Connections to tenants' NTS-KE endpoints, by tenant and result (ok, or why not: not_allowed, rate_limited, busy, tls, alpn, bad_request, no_keys, timeout, io).",
                &["tenant", "result"]
            )?),
            tenant_nts_authenticated: reg!(icv(
                "stratum_agent_tenant_nts_authenticated_total",
                "NTS-authenticated replies per tenant (also counted as served in stratum_agent_tenant_requests_total).",
                &["tenant"]
            )?),
            upstream_key_reply_failures: reg!(icv(
                "stratum_agent_upstream_key_reply_failures_total",
                "Replies from upstreams polled with a symmetric key, dropped because they were not signed with it (unsigned, crypto_nak, other_key, bad_mac, malformed), by configured name.",
                &["source", "reason"]
            )?),
            upstream_key_polls_withheld: reg!(icv(
                "stratum_agent_upstream_key_polls_withheld_total",
                "Polls of upstreams with a symmetric key not sent because the key is not loaded (never sent unsigned), by configured name.",
                &["source"]
            )?),
            tenant_symmetric_authenticated: reg!(icv(
                "stratum_agent_tenant_symmetric_authenticated_total",
                "Replies signed with the tenant's symmetric key (RFC 8573 AES-CMAC or a legacy digest), per tenant (also counted as served in stratum_agent_tenant_requests_total).",
                &["tenant"]
            )?),
            symmetric_key_files_failed: reg!(IntGauge::new(
                "stratum_agent_symmetric_key_files_failed",
                "Tenants' symmetric key files that did not read (missing or invalid); their tenants keep the keys last read, or fail every MAC."
            )?),
            nts_cookie_keys_loaded: reg!(IntGauge::new(
                "stratum_agent_nts_cookie_keys_loaded",
                "1 when the TimeService's NTS cookie master keys are loaded; 0 when an NTS tenant waits for them (its cookies get the NTS NAK)."
            )?),
            nts_cookie_key_id: reg!(IntGauge::new(
                "stratum_agent_nts_cookie_key_id",
                "Id of the NTS cookie master key new cookies are sealed with (ids count up at each rotation; 0 without keys)."
            )?),
            nts_reply_failures: reg!(icv(
                "stratum_agent_nts_reply_failures_total",
                "Replies from NTS upstreams dropped unauthenticated, by configured name and reason.",
                &["source", "reason"]
            )?),
            nts_polls_withheld: reg!(icv(
                "stratum_agent_nts_polls_withheld_total",
                "Polls of NTS upstreams not sent for want of a cookie (never sent unauthenticated).",
                &["source"]
            )?),
            nts_cookies: reg!(igv(
                "stratum_agent_nts_cookies",
                "Cookies held for each NTS upstream (8 when healthy).",
                &["source"]
            )?),
            tenant_port_bind_failures: reg!(IntGauge::new(
                "stratum_agent_tenant_port_bind_failures",
                "Configured tenant ports that could not be bound and are being retried.",
            )?),
            members: std::sync::Mutex::new(MemberIndex::default()),
            rebuilding: std::sync::Mutex::new(()),
            registry,
            registered,
        })
        .inspect(|m| {
            m.set_config_origin(ConfigOrigin::None);
            m.set_host_daemons(&Detection::default());
        })
    }

    /// Mirrors the last look for other time daemons (every evidence label, 0 or 1).
    pub fn set_host_daemons(&self, detection: &Detection) {
        for label in Evidence::LABELS {
            let seen = detection.evidence.iter().any(|e| e.label() == label);
            self.other_time_daemon
                .with_label_values(&[label])
                .set(i64::from(seen));
        }
    }

    /// Mirrors the other daemon's view of the clock: one series for the daemon read, none when
    /// no daemon is seen or its view could not be read.
    pub fn set_host_daemon_clock(&self, clock: Option<&HostDaemonClock>) {
        let _rebuilding = self.rebuilding();
        self.host_daemon_offset.reset();
        if let Some((daemon, offset)) = clock.and_then(|c| Some((&c.daemon, c.offset_seconds?))) {
            self.host_daemon_offset
                .with_label_values(&[daemon.as_str()])
                .set(offset);
        }
    }

    /// Marks where the config in force came from (one series at 1, the others at 0).
    pub fn set_config_origin(&self, origin: ConfigOrigin) {
        for o in ConfigOrigin::ALL {
            self.config_source
                .with_label_values(&[o.name()])
                .set(i64::from(o == origin));
        }
    }

    /// Mirrors a system snapshot into the gauges. `node_offset` is the node clock's offset
    /// (which differs from the core's estimate for the readonly backend).
    /// `last_update_ago` is how long ago the clock was last updated from the sources;
    /// `offset_bound` the config's [`stratum_api::AgentConfig::offset_bound_seconds`].
    pub fn observe(
        &self,
        state: &SystemState,
        node_offset: f64,
        agreeing: usize,
        min_sources: usize,
        offset_bound: f64,
        last_update_ago: Option<f64>,
    ) {
        self.synchronized.set(i64::from(state.synchronized));
        // On the host's clock, which is what Prometheus compares it with (`time() - …`).
        self.last_update.set(last_update_ago.map_or(0.0, |ago| {
            crate::clock::host_realtime().unix_nanos() as f64 * 1e-9 - ago
        }));
        self.offset.set(node_offset);
        // A base unit, comparable with node_exporter's timex series: 12.5 ppm is 1.0000125.
        self.frequency.set(1.0 + state.frequency_ppm * 1e-6);
        self.jitter.set(state.jitter);
        self.stratum.set(i64::from(state.stratum));
        self.root_delay.set(state.root_delay);
        self.root_dispersion.set(state.root_dispersion);
        self.leap.set(state.leap as i64);
        self.agreeing.set(agreeing as i64);
        self.min_sources.set(min_sources as i64);
        self.offset_bound.set(offset_bound);
        // Sources come and go with config and pool re-resolution: rebuild the per-source series
        // so removed sources do not linger.
        let _rebuilding = self.rebuilding();
        self.source_reach.reset();
        self.source_offset.reset();
        self.source_delay.reset();
        self.source_jitter.reset();
        self.source_state.reset();
        let named: Vec<(&str, SocketAddr)> = state
            .sources
            .iter()
            .map(|s| (s.name.as_str(), s.address))
            .collect();
        let members = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign(&named);
        for (s, member) in state.sources.iter().zip(members) {
            let member = member.to_string();
            let l = [s.name.as_str(), member.as_str()];
            self.source_reach
                .with_label_values(&l)
                .set(i64::from(s.reach));
            if let Some(v) = s.offset {
                self.source_offset.with_label_values(&l).set(v);
            }
            if let Some(v) = s.delay {
                self.source_delay.with_label_values(&l).set(v);
            }
            if let Some(v) = s.jitter {
                self.source_jitter.with_label_values(&l).set(v);
            }
            let current = state_label(s.state);
            for candidate in SOURCE_STATES {
                self.source_state
                    .with_label_values(&[s.name.as_str(), member.as_str(), candidate])
                    .set(i64::from(candidate == current));
            }
        }
    }

    /// Replaces the cookies-held series with one per NTS upstream in `held`, so upstreams
    /// removed from the config do not linger.
    pub fn set_nts_cookies<'a>(&self, held: impl IntoIterator<Item = (&'a str, usize)>) {
        let _rebuilding = self.rebuilding();
        self.nts_cookies.reset();
        for (source, count) in held {
            self.nts_cookies
                .with_label_values(&[source])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    fn rebuilding(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rebuilding.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The text exposition of every metric, never caught halfway through a rebuild.
    pub fn render(&self) -> String {
        let families = {
            let _rebuilding = self.rebuilding();
            self.registry.gather()
        };
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The process_* table of docs/contracts.md, which both binaries export.
    fn process_metrics() -> BTreeMap<String, BTreeSet<String>> {
        stratum_api::contracts::documented_metrics(
            include_str!("../../docs/contracts.md"),
            "process_",
        )
    }

    #[test]
    fn pool_members_reuse_the_few_member_indexes_as_addresses_churn() {
        let a = |last: u8| SocketAddr::from(([192, 0, 2, last], 123));
        let mut index = MemberIndex::default();
        let pool = "0.pool.ntp.org";
        assert_eq!(
            index.assign(&[(pool, a(1)), (pool, a(2)), ("ntp.example", a(9))]),
            [0, 1, 0]
        );
        // Order does not matter, an address keeps its index.
        assert_eq!(index.assign(&[(pool, a(2)), (pool, a(1))]), [1, 0]);
        // .1 replaced by .3 (pool re-resolution): .3 takes the freed 0, .2 keeps 1.
        assert_eq!(index.assign(&[(pool, a(3)), (pool, a(2))]), [0, 1]);
        // A thousand churning members of a 4-member pool use indexes 0..4 only.
        let mut seen = BTreeSet::new();
        for round in 0..250u16 {
            let members: Vec<SocketAddr> = (0..4)
                .map(|i| SocketAddr::from(([10, 0, (round >> 8) as u8, (round as u8)], 100 + i)))
                .collect();
            let named: Vec<(&str, SocketAddr)> = members.iter().map(|m| (pool, *m)).collect();
            seen.extend(index.assign(&named));
        }
        assert_eq!(seen, BTreeSet::from([0, 1, 2, 3]));
        // Names gone are forgotten.
        assert_eq!(index.assign(&[]), Vec::<usize>::new());
        assert!(index.slots.is_empty());
    }

    /// A scrape racing the per-source rebuild sees every source or none, never a few: a
    /// dashboard would otherwise show sources vanishing and a falseticker series missing.
    #[test]
    fn a_scrape_never_sees_the_per_source_series_half_rebuilt() {
        use stratum_ntp::SourceConfig;
        use stratum_ntp::system::{System, SystemConfig};
        use stratum_ntp::time::ClockTime;
        let sources: Vec<SourceConfig> = (1..=4)
            .map(|i| {
                serde_json::from_value(serde_json::json!({
                    "name": format!("s{i}"),
                    "address": format!("192.0.2.{i}:123"),
                }))
                .unwrap()
            })
            .collect();
        let now = ClockTime::from_unix_secs(1_800_000_000);
        let config = SystemConfig {
            sources,
            ..SystemConfig::default()
        };
        let state = System::new(config, now, [7; 32]).unwrap().state(now);
        let metrics = Metrics::new().unwrap();
        metrics.observe(&state, 0.0, 0, 3, 1.0, None);
        let per_source = |text: &str, family: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .count()
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    metrics.observe(&state, 0.0, 0, 3, 1.0, None);
                    metrics.set_nts_cookies([("nts-a", 3), ("nts-b", 8)]);
                }
            });
            // Every scrape is checked before the writer stops, so a failure cannot hang it.
            let torn = (0..1000).map(|_| metrics.render()).find(|text| {
                let cookies = per_source(text, "stratum_agent_nts_cookies");
                per_source(text, "stratum_agent_source_reach") != 4
                    || per_source(text, "stratum_agent_source_state") != 4 * SOURCE_STATES.len()
                    || (cookies != 0 && cookies != 2)
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(torn, None);
        });
    }

    #[test]
    fn docs_contracts_lists_exactly_the_metrics_the_agent_exposes() {
        let documented = stratum_api::contracts::documented_metrics(
            include_str!("../../docs/contracts.md"),
            "stratum_agent_",
        )
        .into_iter()
        .chain(process_metrics())
        .collect();
        let problems = stratum_api::contracts::metric_differences(
            Metrics::new().unwrap().registered(),
            &documented,
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
