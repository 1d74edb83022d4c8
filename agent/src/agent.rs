//! The agent's run loop: owns the core [`System`] and the clock backend, drives polls and
//! replies through [`crate::upstream`], applies clock actions, follows config changes without
//! restarting, and publishes snapshots for metrics, the status endpoint and the reporter.
//!
//! Mapping the config contract onto the core ([`system_config`]) and naming sources is pure
//! and tested; the loop itself is IO and timers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use stratum_api::agent_config::{
    AgentConfig, LeapMode as ApiLeapMode, UpstreamConfig, UpstreamKind,
};
use stratum_ntp::clock::{ClockAction, Refusal, apply_action};
use stratum_ntp::leap::LeapMode;
use stratum_ntp::packet::LeapIndicator;
use stratum_ntp::source::SourceConfig;
use stratum_ntp::system::{SourceState, System, SystemConfig, SystemState};
use stratum_ntp::time::ClockTime;
use tokio::sync::{mpsc, watch};

use crate::clock::Backend;
use crate::config_source::ConfigUpdate;
use crate::metrics::Metrics;
use crate::report::AgentEvent;
use crate::server::{Server, ServerOptions};
use crate::status::{AgentStatus, Identity, Tracking, agreeing_sources, source_views};
use crate::upstream;

/// How long to wait for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_millis(1500);
/// The loop wakes at least this often to observe the clock and publish state.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// A pool is re-resolved at most this often when a member is unreachable or a falseticker.
pub const POOL_RERESOLVE_INTERVAL: Duration = Duration::from_secs(1800);

/// How long no egress agent may be usable before an agent outside the tier polls the real
/// upstreams too: longer than a tier agent's first burst takes to answer after a start or a
/// new config (reachability starts empty), short next to the holdover.
pub const FALLBACK_GRACE: Duration = Duration::from_secs(30);

/// Whether an agent outside the egress tier also polls the real upstreams: only when the tier
/// allows it and no egress agent has been usable for [`FALLBACK_GRACE`] (or the tier has no
/// agent at all); back to the tier alone as soon as one is usable again. The tier's agents are
/// polled throughout, so their return is seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    allowed: bool,
    active: bool,
    unusable_since: Option<std::time::Instant>,
}

impl Fallback {
    /// The state for a first config.
    pub fn new(config: &AgentConfig, node: &str) -> Self {
        let mut fallback = Self {
            allowed: false,
            active: false,
            unusable_since: None,
        };
        fallback.reconfigure(config, node);
        fallback
    }

    /// Whether the real upstreams are polled now.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Takes a new config: fallback ends when it is no longer allowed, starts at once when
    /// the tier has no agent.
    pub fn reconfigure(&mut self, config: &AgentConfig, node: &str) {
        self.allowed = config.may_fall_back(node);
        if !self.allowed {
            self.active = false;
            self.unusable_since = None;
        } else if config.tier_for_node(node).is_empty() {
            self.active = true;
        }
    }

    /// Whether some egress agent is usable at `now`; the new state when it changes.
    pub fn observe(&mut self, tier_usable: bool, now: std::time::Instant) -> Option<bool> {
        if !self.allowed {
            return None;
        }
        if tier_usable {
            self.unusable_since = None;
            return std::mem::replace(&mut self.active, false).then_some(false);
        }
        let since = *self.unusable_since.get_or_insert(now);
        if !self.active && now.duration_since(since) >= FALLBACK_GRACE {
            self.active = true;
            return Some(true);
        }
        None
    }
}

/// Whether one of the egress agents at `tier` answers usable time: reachable, and neither
/// unsynchronized, too far, nor a falseticker.
pub fn tier_usable(state: &SystemState, tier: &[SocketAddr]) -> bool {
    state.sources.iter().any(|s| {
        tier.contains(&s.address)
            && matches!(
                s.state,
                SourceState::Selected
                    | SourceState::Combined
                    | SourceState::Candidate
                    | SourceState::Initializing
            )
    })
}

/// The resolved addresses of the egress agents the agent on `node` polls.
pub fn tier_addresses(config: &AgentConfig, node: &str, resolved: &Resolved) -> Vec<SocketAddr> {
    config
        .tier_for_node(node)
        .iter()
        .flat_map(|u| {
            resolved
                .get(&upstream_key(u))
                .into_iter()
                .flatten()
                .copied()
        })
        .collect()
}

/// Addresses each configured upstream resolved to, keyed by `host:port`.
pub type Resolved = BTreeMap<String, Vec<SocketAddr>>;

/// The key of an upstream in [`Resolved`].
pub fn upstream_key(u: &UpstreamConfig) -> String {
    format!("{}:{}", u.host, u.port)
}

/// The core's config for the upstreams this node polls and the resolved addresses.
/// Duplicate addresses (two names for one server) are polled once.
pub fn system_config(
    config: &AgentConfig,
    upstreams: &[UpstreamConfig],
    resolved: &Resolved,
) -> SystemConfig {
    let mut sources = Vec::new();
    let mut seen = BTreeSet::new();
    for u in upstreams {
        let limit = match u.kind {
            UpstreamKind::Server => 1,
            UpstreamKind::Pool => usize::from(u.max_sources),
        };
        for address in resolved
            .get(&upstream_key(u))
            .into_iter()
            .flatten()
            .take(limit)
        {
            if !seen.insert(*address) {
                continue;
            }
            let mut s = SourceConfig::new(u.host.clone(), *address);
            s.iburst = u.iburst;
            s.min_poll = u.min_poll;
            s.max_poll = u.max_poll;
            // Own LAN servers (the egress tier, or polls of 2^4 s and below) burst faster.
            if u.min_poll <= 4 {
                s.burst_interval = 0.5;
            }
            sources.push(s);
        }
    }
    let d = &config.discipline;
    let mut system = SystemConfig {
        sources,
        min_sources: usize::from(config.selection.min_sources),
        max_distance: config.selection.max_distance_seconds,
        leap_mode: match config.leap.mode {
            ApiLeapMode::Kernel => LeapMode::Kernel,
            ApiLeapMode::Smear => LeapMode::Smear,
            ApiLeapMode::Ignore => LeapMode::Ignore,
        },
        smear_window: config.leap.smear_window_seconds,
        holdover: Some(config.serving.holdover_seconds),
        local_stratum: config.serving.local_stratum,
        ..SystemConfig::default()
    };
    system.discipline.make_step_threshold = d.make_step_threshold_seconds;
    system.discipline.make_step_limit = d.make_step_limit;
    system.discipline.max_slew_ppm = d.max_slew_ppm;
    system.discipline.panic_runtime = Some(d.panic_runtime_seconds);
    system.discipline.panic_startup_backward = Some(d.panic_startup_seconds);
    system.discipline.panic_startup_forward = Some(d.panic_startup_seconds);
    system
}

/// Resolves every upstream; a host that fails to resolve keeps its previous addresses.
pub async fn resolve_all(
    upstreams: &[UpstreamConfig],
    previous: &Resolved,
) -> (Resolved, Vec<String>) {
    let mut out = Resolved::new();
    let mut errors = Vec::new();
    for u in upstreams {
        let key = upstream_key(u);
        let limit = match u.kind {
            UpstreamKind::Server => 1,
            UpstreamKind::Pool => usize::from(u.max_sources),
        };
        let lookup = tokio::time::timeout(
            Duration::from_secs(5),
            upstream::resolve(&u.host, u.port, limit),
        )
        .await;
        match lookup {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                out.insert(key, addrs);
            }
            other => {
                let why = match other {
                    Ok(Ok(_)) => "no addresses".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                errors.push(format!("resolving {key}: {why}"));
                if let Some(prev) = previous.get(&key) {
                    out.insert(key, prev.clone());
                }
            }
        }
    }
    (out, errors)
}

/// Options fixed for the life of the process.
pub struct AgentOptions {
    /// This node.
    pub node: String,
    /// Where drift is kept; `None` uses the config's driftFile.
    pub state_dir: Option<PathBuf>,
    /// Agent version string.
    pub version: String,
}

/// State shared with the HTTP handlers.
pub struct Shared {
    /// The latest status.
    pub status: ArcSwap<AgentStatus>,
    /// Metrics.
    pub metrics: Metrics,
    /// Loop liveness: host monotonic seconds of the last loop iteration.
    pub heartbeat: std::sync::atomic::AtomicU64,
    /// The tenant NTP server (ports open on the first valid config).
    pub server: Server,
}

impl Shared {
    /// Fresh shared state with a server of default options.
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Self::with_server(metrics, ServerOptions::default())
    }

    /// Fresh shared state with a server of `options`.
    pub fn with_server(metrics: Metrics, options: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            status: ArcSwap::from_pointee(AgentStatus::default()),
            metrics,
            heartbeat: std::sync::atomic::AtomicU64::new(0),
            server: Server::new(options),
        })
    }

    /// Ready: synchronized with at least minSources agreeing.
    pub fn ready(&self) -> bool {
        self.status.load().tracking.ready
    }
}

/// Outputs of the loop besides [`Shared`].
pub struct Outputs {
    /// Status for the reporter.
    pub snapshots: watch::Sender<AgentStatus>,
    /// Events for the reporter.
    pub events: mpsc::Sender<AgentEvent>,
    /// Heartbeat interval from the config, for the reporter.
    pub heartbeat: watch::Sender<Duration>,
}

struct Reply {
    source: stratum_ntp::source::SourceId,
    reply: upstream::Reply,
}

/// Runs until `shutdown` fires; persists drift on the way out.
pub async fn run(
    opts: AgentOptions,
    mut backend: Backend,
    shared: Arc<Shared>,
    outputs: Outputs,
    mut config_rx: mpsc::Receiver<ConfigUpdate>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Nothing can be polled before the first valid config.
    let mut config = loop {
        tokio::select! {
            update = config_rx.recv() => match update {
                Some(ConfigUpdate::Valid(c)) => break *c,
                Some(ConfigUpdate::Rejected(why)) => {
                    tracing::error!(reason = %why, "initial config rejected; waiting for a valid one");
                    shared.metrics.config_reloads.with_label_values(&["rejected"]).inc();
                    let _ = outputs.events.try_send(AgentEvent::ConfigRejected { reason: why.clone() });
                    let mut status = (**shared.status.load()).clone();
                    status.identity.config_error = Some(why);
                    shared.status.store(Arc::new(status));
                }
                None => anyhow::bail!("config source closed before a valid config arrived"),
            },
            _ = shutdown.changed() => return Ok(()),
        }
    };
    shared
        .metrics
        .config_reloads
        .with_label_values(&["applied"])
        .inc();
    let mut config_error: Option<String> = None;
    // Tenants are served from the first valid config on, as unsynchronized until the clock
    // is (LI=3, stratum 16: clients reject the answers rather than trust them).
    shared.server.apply(&config.serving);
    let mut fallback = Fallback::new(&config, &opts.node);
    let upstreams = config.upstreams_for_node(&opts.node, fallback.active());
    let (mut resolved, errors) = resolve_all(&upstreams, &Resolved::new()).await;
    for e in &errors {
        tracing::warn!("{e}");
    }
    let now = backend.clock().now();
    let seed: [u8; 32] = rand::random();
    let mut system = System::new(system_config(&config, &upstreams, &resolved), now, seed)
        .map_err(|e| anyhow::anyhow!("the config cannot drive the core: {e}"))?;
    let drift_path = |config: &AgentConfig| match &opts.state_dir {
        Some(dir) => dir.join("drift.json"),
        None => PathBuf::from(&config.discipline.drift_file),
    };
    match crate::drift::load(&drift_path(&config), now.unix_secs_floor()) {
        Ok(drift) => match system.import_drift(drift, now) {
            Ok(actions) => {
                tracing::info!(ppm = drift.frequency_ppm, "drift restored");
                apply_all(&mut backend, &actions, &shared, &outputs);
            }
            Err(e) => tracing::warn!(error = %e, "drift file ignored"),
        },
        Err(e) => tracing::info!("{e}"),
    }
    let _ = outputs.heartbeat.send(Duration::from_secs_f64(
        config.reporting.heartbeat_seconds.max(5.0),
    ));
    shared
        .metrics
        .info
        .with_label_values(&[
            &opts.version,
            &config.time_service,
            &opts.node,
            clock_name(&backend),
        ])
        .set(1);

    let (reply_tx, mut reply_rx) = mpsc::channel::<Reply>(256);
    let mut last_drift_write = tokio::time::Instant::now();
    let mut last_pool_resolve = tokio::time::Instant::now();
    let mut was_synchronized = false;
    let mut known_falsetickers = BTreeSet::new();

    loop {
        let now = backend.clock().now();
        while let Some(request) = system.poll_due(backend.clock().now()) {
            // Sent here, synchronously, right after the core stamped it.
            let in_flight = match upstream::send(request.address, &request.bytes) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "request not sent");
                    continue;
                }
            };
            let tx = reply_tx.clone();
            tokio::spawn(async move {
                match in_flight.reply(REPLY_TIMEOUT).await {
                    Ok(reply) => {
                        let _ = tx
                            .send(Reply {
                                source: request.source,
                                reply,
                            })
                            .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "no reply"),
                }
            });
        }
        let deadline = system.next_deadline(now);
        let wait =
            Duration::from_secs_f64(deadline.secs_since(now).clamp(0.0, MAX_SLEEP.as_secs_f64()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let now = backend.clock().now();
                let actions = system.on_timer(now);
                apply_all(&mut backend, &actions, &shared, &outputs);
            }
            Some(Reply { source, reply }) = reply_rx.recv() => {
                // The kernel stamped the reply on the host clock: carry it onto the clock the
                // core steers by the host time elapsed since.
                let now = backend.clock().now();
                let elapsed = crate::clock::host_realtime().secs_since(reply.host_rx).max(0.0);
                let received_at = now.add_secs(-elapsed);
                let outcome = system.handle_response(source, &reply.bytes, received_at, now);
                apply_all(&mut backend, &outcome.actions, &shared, &outputs);
            }
            update = config_rx.recv() => match update {
                Some(ConfigUpdate::Valid(new)) => {
                    let new = *new;
                    let mut next_fallback = fallback.clone();
                    next_fallback.reconfigure(&new, &opts.node);
                    let upstreams = new.upstreams_for_node(&opts.node, next_fallback.active());
                    let (fresh, errors) = resolve_all(&upstreams, &resolved).await;
                    for e in &errors { tracing::warn!("{e}"); }
                    let now = backend.clock().now();
                    match system.reconfigure(system_config(&new, &upstreams, &fresh), now) {
                        Ok(()) => {
                            tracing::info!(revision = %new.revision, "config applied");
                            shared.server.apply(&new.serving);
                            shared.metrics.config_reloads.with_label_values(&["applied"]).inc();
                            resolved = fresh;
                            config = new;
                            fallback = next_fallback;
                            config_error = None;
                            let _ = outputs.heartbeat.send(Duration::from_secs_f64(config.reporting.heartbeat_seconds.max(5.0)));
                        }
                        Err(e) => {
                            let why = format!("config revision {} cannot drive the core: {e}", new.revision);
                            reject(&shared, &outputs, &mut config_error, why);
                        }
                    }
                }
                Some(ConfigUpdate::Rejected(why)) => reject(&shared, &outputs, &mut config_error, why),
                None => anyhow::bail!("config source ended"),
            },
            _ = shutdown.changed() => break,
        }

        let now = backend.clock().now();
        let clock = backend.clock();
        if let Some(jump) = system.observe_clock(clock.now(), clock.monotonic()) {
            tracing::warn!(
                seconds = jump,
                "someone else changed the clock; filters reset"
            );
            let _ = outputs.events.try_send(AgentEvent::OtherDiscipliner {
                detail: format!("the clock jumped by {jump:+.3} s without the agent stepping it; filters were reset"),
            });
        }
        let state = system.state(now);
        let tier = tier_addresses(&config, &opts.node, &resolved);
        if let Some(active) =
            fallback.observe(tier_usable(&state, &tier), std::time::Instant::now())
        {
            let upstreams = config.upstreams_for_node(&opts.node, active);
            let (fresh, _) = resolve_all(&upstreams, &resolved).await;
            let now = backend.clock().now();
            match system.reconfigure(system_config(&config, &upstreams, &fresh), now) {
                Ok(()) => {
                    resolved = fresh;
                    if active {
                        tracing::warn!("no egress agent usable; polling the upstreams too");
                    } else {
                        tracing::info!("an egress agent is usable again; polling the tier only");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "switching upstreams failed"),
            }
        }
        // What tenants are answered with from now until the next turn.
        shared
            .server
            .publish_clock(system.server_state(now), backend.timescale());
        // Ports that could not be bound are tried again on their backoff (a no-op while none
        // failed), so a port freed by another process is served without a config change.
        shared.server.retry_failed();
        if state.synchronized != was_synchronized {
            let _ = outputs.events.try_send(if state.synchronized {
                AgentEvent::SyncRegained
            } else {
                AgentEvent::SyncLost {
                    why: sync_loss_reason(&system, &state, now),
                }
            });
            was_synchronized = state.synchronized;
        }
        for s in &state.sources {
            let is_false = s.state == SourceState::Falseticker;
            if is_false && known_falsetickers.insert(s.address) {
                shared.metrics.falseticker_detections.inc();
                let _ = outputs.events.try_send(AgentEvent::FalsetickerRejected {
                    source: s.address.to_string(),
                });
            } else if !is_false {
                known_falsetickers.remove(&s.address);
            }
        }
        publish(
            &opts,
            &config,
            &config_error,
            &backend,
            &state,
            &shared,
            &outputs,
        );

        if last_drift_write.elapsed() >= crate::drift::WRITE_INTERVAL && state.synchronized {
            save_drift(&drift_path(&config), &system, now);
            last_drift_write = tokio::time::Instant::now();
        }
        if last_pool_resolve.elapsed() >= POOL_RERESOLVE_INTERVAL && needs_reresolve(&state) {
            last_pool_resolve = tokio::time::Instant::now();
            let upstreams = config.upstreams_for_node(&opts.node, fallback.active());
            let (fresh, _) = resolve_all(&upstreams, &resolved).await;
            if fresh != resolved {
                let now = backend.clock().now();
                if system
                    .reconfigure(system_config(&config, &upstreams, &fresh), now)
                    .is_ok()
                {
                    tracing::info!("pool re-resolved after unreachable or falseticker members");
                    resolved = fresh;
                }
            }
        }
    }
    shared.server.stop_all();
    let now = backend.clock().now();
    save_drift(&drift_path(&config), &system, now);
    tracing::info!("drift saved; agent stopped");
    Ok(())
}

fn needs_reresolve(state: &SystemState) -> bool {
    state
        .sources
        .iter()
        .any(|s| matches!(s.state, SourceState::Unreachable | SourceState::Falseticker))
}

fn reject(shared: &Shared, outputs: &Outputs, config_error: &mut Option<String>, why: String) {
    tracing::error!(reason = %why, "config rejected; the previous config stays in force");
    shared
        .metrics
        .config_reloads
        .with_label_values(&["rejected"])
        .inc();
    let _ = outputs.events.try_send(AgentEvent::ConfigRejected {
        reason: why.clone(),
    });
    *config_error = Some(why);
}

fn save_drift(path: &std::path::Path, system: &System, now: ClockTime) {
    if let Err(e) = crate::drift::save(path, system.export_drift(), now.unix_secs_floor()) {
        tracing::warn!(error = %e, path = %path.display(), "saving drift failed");
    }
}

fn clock_name(backend: &Backend) -> &'static str {
    match backend.kind() {
        stratum_api::agent_config::ClockBackend::System => "system",
        stratum_api::agent_config::ClockBackend::Readonly => "readonly",
        stratum_api::agent_config::ClockBackend::Simulated => "simulated",
    }
}

fn apply_all(backend: &mut Backend, actions: &[ClockAction], shared: &Shared, outputs: &Outputs) {
    for action in actions {
        match action {
            ClockAction::Step { offset } => {
                shared.metrics.steps.inc();
                tracing::info!(seconds = offset, "stepping the clock");
                let _ = outputs
                    .events
                    .try_send(AgentEvent::Stepped { seconds: *offset });
            }
            ClockAction::Refuse(refusal) => {
                let reason = refusal_text(refusal);
                if matches!(refusal, Refusal::PanicThreshold { .. }) {
                    shared.metrics.panic_refusals.inc();
                }
                tracing::warn!(%reason, "correction refused");
                let _ = outputs
                    .events
                    .try_send(AgentEvent::CorrectionRefused { reason });
            }
            _ => {}
        }
        if let Err(e) = apply_action(backend.clock(), action) {
            tracing::error!(error = %e, ?action, "clock backend refused an action");
        }
    }
}

/// A sentence for a refusal.
pub fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::PanicThreshold { offset, threshold } => format!(
            "refused a correction of {offset:+.3} s beyond the panic threshold of {threshold} s; serving as unsynchronized"
        ),
        Refusal::ImplausibleOffset {
            offset,
            confirmations,
            needed,
        } => format!(
            "ignoring an implausible offset of {offset:+.6} s until confirmed ({confirmations}/{needed})"
        ),
    }
}

/// Why the clock counts as unsynchronized, for the SyncLost Event.
fn sync_loss_reason(system: &System, state: &SystemState, now: ClockTime) -> String {
    let Some(last_update) = state.last_update else {
        return "no clock update yet".into();
    };
    if let Some(refusal) = &state.refusal {
        return refusal_text(refusal);
    }
    let quiet = now.secs_since(last_update);
    match system.holdover_limit() {
        Some(limit) if quiet > limit => {
            let served = system.server_state(now);
            let answering = if served.synchronized {
                format!(
                    "serving the free-running clock at local stratum {}",
                    served.stratum
                )
            } else {
                "answering unsynchronized (LI=3, stratum 16)".to_string()
            };
            format!(
                "no agreeing source for {quiet:.0} s, beyond the holdover of {limit:.0} s; {answering}"
            )
        }
        _ => format!(
            "root distance {:.3} s reached the limit; no agreeing source for {quiet:.0} s",
            state.root_distance
        ),
    }
}

fn leap_name(leap: LeapIndicator) -> &'static str {
    match leap {
        LeapIndicator::NoWarning => "none",
        LeapIndicator::Insert => "insert",
        LeapIndicator::Delete => "delete",
        LeapIndicator::Unknown => "unsynchronized",
    }
}

fn publish(
    opts: &AgentOptions,
    config: &AgentConfig,
    config_error: &Option<String>,
    backend: &Backend,
    state: &SystemState,
    shared: &Shared,
    outputs: &Outputs,
) {
    let agreeing = agreeing_sources(state);
    let min_sources = usize::from(config.selection.min_sources);
    let node_offset = backend.node_offset(-state.offset);
    let peer = state
        .system_peer
        .and_then(|id| state.sources.iter().find(|s| s.id == id));
    let status = AgentStatus {
        identity: Identity {
            node: opts.node.clone(),
            time_service: config.time_service.clone(),
            version: opts.version.clone(),
            clock: clock_name(backend).into(),
            config_revision: config.revision.clone(),
            config_error: config_error.clone(),
        },
        tracking: Tracking {
            synchronized: state.synchronized,
            ready: state.synchronized && agreeing >= min_sources,
            reference_id: state.reference_id.display(),
            system_peer: peer.map(|p| format!("{} ({})", p.name, p.address)),
            stratum: state.stratum,
            offset_seconds: node_offset,
            frequency_ppm: state.frequency_ppm,
            frequency_error_ppm: state.frequency_error_ppm,
            jitter_seconds: state.jitter,
            root_delay_seconds: state.root_delay,
            root_dispersion_seconds: state.root_dispersion,
            root_distance_seconds: state.root_distance,
            leap: leap_name(state.leap).into(),
            agreeing_sources: agreeing,
            min_sources,
            steps: state.steps,
            last_step_seconds: state.last_step.map(|s| s.offset),
            refusal: state.refusal.as_ref().map(refusal_text),
            last_update_ago_seconds: state.last_update.map(|t| backend.now().secs_since(t)),
        },
        sources: source_views(state),
        failed_ports: shared.server.failed_ports(),
    };
    shared
        .metrics
        .observe(state, node_offset, agreeing, min_sources);
    shared.heartbeat.store(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::sync::atomic::Ordering::Relaxed,
    );
    shared.status.store(Arc::new(status.clone()));
    let _ = outputs.snapshots.send(status);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config_json() -> String {
        include_str!("../tests/data/agent-config.json").to_string()
    }

    fn tiered(fallback: bool, tier: &[&str]) -> AgentConfig {
        let mut config = AgentConfig::from_json(&config_json()).unwrap();
        config.egress = Some(stratum_api::agent_config::EgressConfig {
            nodes: vec!["edge".into()],
            tier_upstreams: tier
                .iter()
                .map(|host| UpstreamConfig {
                    host: (*host).into(),
                    kind: UpstreamKind::Server,
                    ..config.upstreams[0].clone()
                })
                .collect(),
            fallback_to_upstreams: fallback,
        });
        config
    }

    #[test]
    fn the_upstreams_are_polled_only_after_no_egress_agent_was_usable_for_the_grace() {
        let config = tiered(true, &["10.0.0.1"]);
        let mut fallback = Fallback::new(&config, "worker");
        assert!(!fallback.active(), "a start polls the tier alone");
        let t0 = std::time::Instant::now();
        assert_eq!(fallback.observe(false, t0), None);
        assert_eq!(fallback.observe(true, t0 + FALLBACK_GRACE / 2), None);
        // Unusable again: the grace starts over.
        assert_eq!(fallback.observe(false, t0 + FALLBACK_GRACE), None);
        assert_eq!(
            fallback.observe(false, t0 + FALLBACK_GRACE * 2 - Duration::from_millis(1)),
            None
        );
        assert_eq!(fallback.observe(false, t0 + FALLBACK_GRACE * 2), Some(true));
        assert!(fallback.active());
        assert_eq!(fallback.observe(false, t0 + FALLBACK_GRACE * 3), None);
        // One usable egress agent ends the fallback at once.
        assert_eq!(fallback.observe(true, t0 + FALLBACK_GRACE * 3), Some(false));
        assert!(!fallback.active());
    }

    #[test]
    fn fallback_never_happens_when_not_allowed_or_on_an_egress_node_and_at_once_without_a_tier() {
        let t0 = std::time::Instant::now();
        let mut forbidden = Fallback::new(&tiered(false, &["10.0.0.1"]), "worker");
        assert_eq!(forbidden.observe(false, t0), None);
        assert_eq!(forbidden.observe(false, t0 + FALLBACK_GRACE * 10), None);
        let mut edge = Fallback::new(&tiered(true, &["10.0.0.1"]), "edge");
        assert_eq!(edge.observe(false, t0 + FALLBACK_GRACE * 10), None);
        assert!(!edge.active());
        let empty = Fallback::new(&tiered(true, &[]), "worker");
        assert!(
            empty.active(),
            "no egress agent at all: the upstreams at once"
        );
        // A new config that forbids it ends it.
        let mut active = empty.clone();
        active.reconfigure(&tiered(false, &[]), "worker");
        assert!(!active.active());
    }

    #[test]
    fn pools_contribute_up_to_max_sources_and_servers_one_address() {
        let config = AgentConfig::from_json(&config_json()).unwrap();
        let mut upstreams = config.upstreams.clone();
        upstreams[0].kind = UpstreamKind::Pool;
        upstreams[0].max_sources = 2;
        let key = upstream_key(&upstreams[0]);
        let mut resolved = Resolved::new();
        resolved.insert(
            key,
            vec![
                "127.0.0.1:123".parse().unwrap(),
                "127.0.0.2:123".parse().unwrap(),
                "127.0.0.3:123".parse().unwrap(),
            ],
        );
        let sys = system_config(&config, &upstreams[..1], &resolved);
        assert_eq!(sys.sources.len(), 2);
        upstreams[0].kind = UpstreamKind::Server;
        assert_eq!(
            system_config(&config, &upstreams[..1], &resolved)
                .sources
                .len(),
            1
        );
    }

    #[test]
    fn the_same_address_under_two_names_is_polled_once() {
        let config = AgentConfig::from_json(&config_json()).unwrap();
        let mut a = config.upstreams[0].clone();
        a.host = "a.example".into();
        let mut b = a.clone();
        b.host = "b.example".into();
        let mut resolved = Resolved::new();
        resolved.insert(upstream_key(&a), vec!["192.0.2.1:123".parse().unwrap()]);
        resolved.insert(upstream_key(&b), vec!["192.0.2.1:123".parse().unwrap()]);
        assert_eq!(system_config(&config, &[a, b], &resolved).sources.len(), 1);
    }

    #[test]
    fn discipline_settings_reach_the_core() {
        let config = AgentConfig::from_json(&config_json()).unwrap();
        let sys = system_config(&config, &config.upstreams, &Resolved::new());
        assert_eq!(sys.min_sources, usize::from(config.selection.min_sources));
        assert_eq!(
            sys.discipline.make_step_threshold,
            config.discipline.make_step_threshold_seconds
        );
        assert_eq!(
            sys.discipline.panic_runtime,
            Some(config.discipline.panic_runtime_seconds)
        );
        assert_eq!(sys.max_distance, config.selection.max_distance_seconds);
    }

    #[test]
    fn holdover_and_local_stratum_reach_the_core() {
        let mut config = AgentConfig::from_json(&config_json()).unwrap();
        config.serving.holdover_seconds = 42.0;
        config.serving.local_stratum = Some(9);
        let sys = system_config(&config, &config.upstreams, &Resolved::new());
        assert_eq!(sys.holdover, Some(42.0));
        assert_eq!(sys.local_stratum, Some(9));
        assert!(sys.validate().is_ok());
    }
}
