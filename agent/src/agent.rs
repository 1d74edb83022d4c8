//! The agent's run loop: owns the core [`System`] and the clock backend, drives polls and
//! replies through [`crate::upstream`], applies clock actions, follows config changes without
//! restarting, and publishes snapshots for metrics, the status endpoint and the reporter.
//!
//! Mapping the config contract onto the core ([`system_config`]) and naming sources is pure
//! and tested; the loop's state and decisions live in [`crate::driver`], and the loop itself
//! is only IO and timers.

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
use stratum_ntp::source::{SourceConfig, SourceId};
use stratum_ntp::system::{SourceState, System, SystemConfig, SystemState};
use stratum_ntp::time::ClockTime;
use tokio::sync::{mpsc, watch};

use crate::clock::Backend;
use crate::config_cache::{ConfigCache, ConfigOrigin};
use crate::config_source::ConfigUpdate;
use crate::driver::{Driver, DriverEvent, Fault, Now};
use crate::host_daemons::HostDaemonView;
use crate::metrics::Metrics;
use crate::nts_upstreams::{
    NtsUpstreams, Outgoing, ReplyCheck, failure_label as nts_failure_label,
};
use crate::report::AgentEvent;
use crate::resolver::{self, Resolver, SystemResolver};
use crate::server::{Server, ServerOptions};
use crate::status::{AgentStatus, Identity, Tracking, agreeing_sources, source_views};
use crate::upstream;

/// How long to wait for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_millis(1500);
/// The loop wakes at least this often to observe the clock and publish state.
const MAX_SLEEP: Duration = Duration::from_millis(500);

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
    /// Monotonic time since which no egress agent has been usable.
    unusable_since: Option<ClockTime>,
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

    /// When fallback starts if no egress agent becomes usable before (monotonic time).
    pub fn deadline(&self) -> Option<ClockTime> {
        match self.unusable_since {
            Some(since) if self.allowed && !self.active => {
                Some(since.add_secs(FALLBACK_GRACE.as_secs_f64()))
            }
            _ => None,
        }
    }

    /// Whether some egress agent is usable at `now`; the new state when it changes.
    pub fn observe(&mut self, tier_usable: bool, now: ClockTime) -> Option<bool> {
        if !self.allowed {
            return None;
        }
        if tier_usable {
            self.unusable_since = None;
            return std::mem::replace(&mut self.active, false).then_some(false);
        }
        let since = *self.unusable_since.get_or_insert(now);
        if !self.active && now.secs_since(since) >= FALLBACK_GRACE.as_secs_f64() {
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

/// Addresses of each configured upstream, keyed by `host:port`.
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

/// Options fixed for the life of the process.
pub struct AgentOptions {
    /// This node.
    pub node: String,
    /// Where drift is kept; `None` uses the config's driftFile.
    pub state_dir: Option<PathBuf>,
    /// Agent version string.
    pub version: String,
    /// Where the last applied config is kept for a start without the API server.
    pub config_cache: Option<Arc<ConfigCache>>,
}

/// State shared with the HTTP handlers.
pub struct Shared {
    /// The latest status.
    pub status: ArcSwap<AgentStatus>,
    /// Metrics.
    pub metrics: Metrics,
    /// Loop liveness: milliseconds from `started` to the end of the last loop turn, plus one
    /// (0: no turn yet). Monotonic, so a clock step (ours or anyone's) cannot fake a hang.
    heartbeat: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// The tenant NTP server (ports open on the first valid config).
    pub server: Server,
    /// Other time daemons on the node, as last observed.
    pub host_daemons: ArcSwap<HostDaemonView>,
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
            started: std::time::Instant::now(),
            server: Server::new(options),
            host_daemons: ArcSwap::from_pointee(HostDaemonView::default()),
        })
    }

    /// Ready: synchronized with at least minSources agreeing.
    pub fn ready(&self) -> bool {
        self.status.load().tracking.ready
    }

    /// Records that the loop turned now.
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat
            .store(ms.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since the loop last turned; `None` before its first turn.
    pub fn since_last_beat(&self) -> Option<Duration> {
        match self.heartbeat.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
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

/// What a poll's task hands back to the loop.
enum Reply {
    /// A reply for the core; for an NTS upstream, one that authenticated, with its header
    /// only and the cookies it brought.
    Time {
        source: stratum_ntp::source::SourceId,
        reply: upstream::Reply,
        nts: Option<(ReplyCheck, Vec<Vec<u8>>)>,
    },
    /// A reply from a keyed upstream that was not signed with its key: dropped, counted.
    MacRefused {
        source: String,
        error: crate::upstream_keys::MacReplyError,
    },
    /// A reply from an NTS upstream that did not authenticate: dropped, counted, and for a
    /// NAK, a reason to exchange keys again.
    NtsRefused {
        upstream: String,
        source: String,
        error: stratum_ntp::nts::ResponseError,
    },
}

/// A key exchange the loop started for an NTS upstream's "lookup".
struct KeyExchangeDone {
    request: resolver::LookupRequest,
    result: Result<crate::nts_ke::NtsSession, crate::nts_ke::KeError>,
}

/// The longest a key exchange (TCP, TLS and the records) may take.
const KEY_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until `shutdown` fires; persists drift on the way out. Names are resolved by the
/// host's resolver.
pub async fn run(
    opts: AgentOptions,
    backend: Backend,
    shared: Arc<Shared>,
    outputs: Outputs,
    config_rx: mpsc::Receiver<ConfigUpdate>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let resolver: Arc<dyn Resolver> = Arc::new(SystemResolver);
    run_with_resolver(
        opts, backend, shared, outputs, config_rx, shutdown, resolver,
    )
    .await
}

/// [`run`] with names resolved by `resolver`. The loop is a thin shell around
/// [`Driver`]'s handlers: it sends the polls and lookups they ask for and feeds back timer
/// ticks, replies, configs and DNS answers, and never waits on DNS itself.
pub async fn run_with_resolver(
    opts: AgentOptions,
    mut backend: Backend,
    shared: Arc<Shared>,
    outputs: Outputs,
    mut config_rx: mpsc::Receiver<ConfigUpdate>,
    mut shutdown: watch::Receiver<bool>,
    resolver: Arc<dyn Resolver>,
) -> anyhow::Result<()> {
    // Nothing can be polled before the first valid config.
    let (config, mut config_origin) = loop {
        tokio::select! {
            update = config_rx.recv() => match update.map(ConfigUpdate::into_config) {
                Some(Ok(first)) => break first,
                Some(Err(why)) => {
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
    // Tenants' NTS-KE endpoints and the cookie keys; after the ports, whose policies gate them.
    let mut nts_endpoints = crate::nts_server::NtsEndpoints::new(shared.clone());
    nts_endpoints.apply(&config.serving);
    // Tenants' symmetric keys, put in force on their ports whenever a file changes.
    let mut symmetric_keys = crate::symmetric_keys::SymmetricKeyFiles::new();
    if symmetric_keys.apply(&crate::symmetric_keys::key_files(&config)) {
        shared
            .server
            .set_symmetric_keys(symmetric_keys.loaded(), &config.serving);
    }
    let (lookup_tx, mut resolution_rx) = resolver::spawn(
        resolver,
        resolver::DEFAULT_CONCURRENCY,
        resolver::DEFAULT_TIMEOUT,
    );
    let seed: [u8; 32] = rand::random();
    let mut driver = Driver::new(&opts.node, config, Now::read(backend.clock()), seed)?;
    tracing::info!(revision = %driver.config().revision, source = config_origin.name(), "initial config in force");
    keep_config(&opts, driver.config(), config_origin, &shared);
    let drift_path = |config: &AgentConfig| match &opts.state_dir {
        Some(dir) => dir.join("drift.json"),
        None => PathBuf::from(&config.discipline.drift_file),
    };
    let now = backend.clock().now();
    match crate::drift::load(&drift_path(driver.config()), now.unix_secs_floor()) {
        Ok(drift) => match driver.system_mut().import_drift(drift, now) {
            Ok(actions) => {
                tracing::info!(ppm = drift.frequency_ppm, "drift restored");
                apply_all(&mut backend, &actions, &shared, &outputs);
            }
            Err(e) => tracing::warn!(error = %e, "drift file ignored"),
        },
        Err(e) => tracing::info!("{e}"),
    }
    let _ = outputs.heartbeat.send(Duration::from_secs_f64(
        driver.config().reporting.heartbeat_seconds.max(5.0),
    ));
    shared
        .metrics
        .info
        .with_label_values(&[
            &opts.version,
            &driver.config().time_service,
            &opts.node,
            clock_name(&backend),
        ])
        .set(1);

    let (reply_tx, mut reply_rx) = mpsc::channel::<Reply>(256);
    let (key_exchange_tx, mut key_exchange_rx) = mpsc::channel::<KeyExchangeDone>(16);
    let mut nts = NtsUpstreams::default();
    let mut nts_trust = NtsTrust::default();
    let mut last_drift_write = tokio::time::Instant::now();
    let mut was_synchronized = false;
    let mut known_falsetickers = BTreeSet::new();

    loop {
        let now = Now::read(backend.clock());
        for request in driver.lookups_due(now) {
            match request.nts_port {
                // An NTS upstream's lookup is its key exchange.
                Some(ke_port) => {
                    let tls = nts_trust.get(driver.config().nts_ca_bundle.as_deref());
                    spawn_key_exchange(request, ke_port, tls, &key_exchange_tx);
                }
                // The resolver task lives as long as this loop holds its sender.
                None => {
                    let _ = lookup_tx.send(request);
                }
            }
        }
        while let Some(request) = driver.poll_due(backend.clock().now()) {
            // A keyed upstream's polls are signed, or withheld while its key is not there.
            if let Some(upstream) = driver
                .upstream_of(request.address)
                .filter(|u| u.key.is_some())
            {
                match crate::upstream_keys::sign_poll(&request.bytes, upstream, |path| {
                    symmetric_keys.keys(path)
                }) {
                    Some(signed) => send_poll(
                        request.source,
                        request.address,
                        &signed.datagram,
                        Some(ReplyAuth::Mac(signed.check)),
                        &reply_tx,
                    ),
                    None => {
                        shared
                            .metrics
                            .upstream_key_polls_withheld
                            .with_label_values(&[upstream.host.as_str()])
                            .inc();
                        tracing::debug!(upstream = %upstream.host, "poll withheld: its key is not loaded");
                    }
                }
                continue;
            }
            match nts.outgoing(request.address, &request.bytes, &mut rand::rng()) {
                Outgoing::Plain => send_poll(
                    request.source,
                    request.address,
                    &request.bytes,
                    None,
                    &reply_tx,
                ),
                Outgoing::Nts { datagram, check } => {
                    send_poll(
                        request.source,
                        request.address,
                        &datagram,
                        Some(ReplyAuth::Nts(check)),
                        &reply_tx,
                    );
                }
                Outgoing::Withheld { upstream, source } => {
                    shared
                        .metrics
                        .nts_polls_withheld
                        .with_label_values(&[source.as_str()])
                        .inc();
                    tracing::debug!(%upstream, "NTS poll withheld: no cookie; exchanging keys again");
                    driver.rekey(&upstream, Now::read(backend.clock()));
                }
            }
        }
        let wait = Duration::from_secs_f64(driver.next_wake(now).min(MAX_SLEEP.as_secs_f64()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                let actions = driver.on_timer(Now::read(backend.clock()));
                apply_all(&mut backend, &actions, &shared, &outputs);
            }
            Some(reply) = reply_rx.recv() => match reply {
                Reply::Time { source, reply, nts: authenticated } => {
                    if let Some((check, cookies)) = authenticated {
                        nts.add_cookies(&check, cookies);
                    }
                    // The kernel stamped the reply on the host clock: carry it onto the clock
                    // the core steers by the host time elapsed since.
                    let now = Now::read(backend.clock());
                    let elapsed = crate::clock::host_realtime().secs_since(reply.host_rx).max(0.0);
                    let received_at = now.clock.add_secs(-elapsed);
                    let outcome = driver.on_reply(source, &reply.bytes, received_at, now);
                    apply_all(&mut backend, &outcome.actions, &shared, &outputs);
                }
                Reply::MacRefused { source, error } => {
                    shared.metrics.upstream_key_reply_failures.with_label_values(&[source.as_str(), error.label()]).inc();
                    tracing::debug!(%source, reason = error.label(), "reply from a keyed upstream dropped");
                }
                Reply::NtsRefused { upstream, source, error } => {
                    let reason = nts_failure_label(&error);
                    shared.metrics.nts_reply_failures.with_label_values(&[source.as_str(), reason]).inc();
                    tracing::debug!(%upstream, %error, "NTS reply dropped");
                    if error == stratum_ntp::nts::ResponseError::Nak {
                        driver.rekey(&upstream, Now::read(backend.clock()));
                    }
                }
            },
            Some(KeyExchangeDone { request, result }) = key_exchange_rx.recv() => {
                let outcome = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.metric_label(),
                };
                shared.metrics.nts_key_exchanges.with_label_values(&[request.host.as_str(), outcome]).inc();
                let result = match result {
                    Ok(session) => {
                        let address = session.address;
                        tracing::info!(upstream = %request.key, %address, cookies = session.jar.len(), "NTS key exchange done");
                        nts.install(&request.key, &request.host, address, session.jar);
                        nts.retain(&nts_upstream_keys(driver.config()));
                        Ok(vec![address])
                    }
                    Err(source) => {
                        tracing::warn!(upstream = %request.key, error = %source, "NTS key exchange failed; retrying with backoff, never polling it unauthenticated");
                        Err(resolver::ResolveError::KeyExchange { host: request.host.clone(), source })
                    }
                };
                let resolution = resolver::Resolution { key: request.key, result };
                let events = driver.on_resolution(resolution, Now::read(backend.clock()));
                log_driver_events(&events, &shared.metrics);
            }
            Some(resolution) = resolution_rx.recv() => {
                let events = driver.on_resolution(resolution, Now::read(backend.clock()));
                log_driver_events(&events, &shared.metrics);
            }
            update = config_rx.recv() => match update.map(ConfigUpdate::into_config) {
                Some(Ok((new, origin))) => {
                    let revision = new.revision.clone();
                    match driver.on_config(new, Now::read(backend.clock())) {
                        Ok(()) => {
                            tracing::info!(%revision, source = origin.name(), "config applied");
                            nts.retain(&nts_upstream_keys(driver.config()));
                            shared.server.apply(&driver.config().serving);
                            nts_endpoints.apply(&driver.config().serving);
                            // The server applied the keys it holds by path; only newly read (or
                            // forgotten) files change them.
                            if symmetric_keys.apply(&crate::symmetric_keys::key_files(driver.config())) {
                                shared.server.set_symmetric_keys(symmetric_keys.loaded(), &driver.config().serving);
                            }
                            shared.metrics.config_reloads.with_label_values(&["applied"]).inc();
                            keep_config(&opts, driver.config(), origin, &shared);
                            config_origin = origin;
                            config_error = None;
                            let _ = outputs.heartbeat.send(Duration::from_secs_f64(driver.config().reporting.heartbeat_seconds.max(5.0)));
                        }
                        Err(e) => {
                            let why = format!("config revision {revision} cannot drive the core: {e}");
                            reject(&shared, &outputs, &mut config_error, why);
                        }
                    }
                }
                Some(Err(why)) => reject(&shared, &outputs, &mut config_error, why),
                None => anyhow::bail!("config source ended"),
            },
            _ = shutdown.changed() => break,
        }

        let clock = backend.clock();
        if let Some(jump) = driver
            .system_mut()
            .observe_clock(clock.now(), clock.monotonic())
        {
            tracing::warn!(
                seconds = jump,
                "someone else changed the clock; filters reset"
            );
            let _ = outputs.events.try_send(AgentEvent::OtherDiscipliner {
                detail: format!("the clock jumped by {jump:+.3} s without the agent stepping it; filters were reset"),
            });
        }
        let now = Now::read(backend.clock());
        log_driver_events(&driver.housekeeping(now), &shared.metrics);
        let now = now.clock;
        let system = driver.system();
        let state = system.state(now);
        // What tenants are answered with from now until the next turn.
        shared
            .server
            .publish_clock(system.server_state(now), backend.timescale());
        // Ports that could not be bound are tried again on their backoff (a no-op while none
        // failed), so a port freed by another process is served without a config change.
        shared.server.retry_failed();
        // Rotated cookie keys, a renewed certificate, an endpoint that could not bind.
        nts_endpoints.refresh(&driver.config().serving);
        if symmetric_keys.refresh() {
            shared
                .server
                .set_symmetric_keys(symmetric_keys.loaded(), &driver.config().serving);
        }
        shared
            .metrics
            .symmetric_key_files_failed
            .set(i64::try_from(symmetric_keys.failed_count()).unwrap_or(i64::MAX));
        if state.synchronized != was_synchronized {
            let _ = outputs.events.try_send(if state.synchronized {
                AgentEvent::SyncRegained
            } else {
                AgentEvent::SyncLost {
                    why: sync_loss_reason(system, &state, now),
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
        shared.metrics.set_nts_cookies(nts.cookies_held());
        publish(
            &opts,
            driver.config(),
            config_origin,
            &config_error,
            &backend,
            &state,
            &shared,
            &outputs,
        );

        if last_drift_write.elapsed() >= crate::drift::WRITE_INTERVAL && state.synchronized {
            save_drift(&drift_path(driver.config()), driver.system(), now);
            last_drift_write = tokio::time::Instant::now();
        }
    }
    // Unsynchronized first, so the NodeClock the reporter writes on its way out takes this
    // node's endpoints out of the tenants' ready sets before the sockets close.
    publish_stopping(&shared, &outputs);
    nts_endpoints.stop_all();
    shared.server.stop_all();
    let now = backend.clock().now();
    save_drift(&drift_path(driver.config()), driver.system(), now);
    tracing::info!("drift saved; agent stopped");
    Ok(())
}

/// Stores a config that came from the source and now runs; marks where it came from.
fn keep_config(opts: &AgentOptions, config: &AgentConfig, origin: ConfigOrigin, shared: &Shared) {
    shared.metrics.set_config_origin(origin);
    if origin == ConfigOrigin::Source
        && let Some(cache) = &opts.config_cache
    {
        cache.store_in_background(config.clone());
    }
}

/// Publishes the status of an agent about to stop: unsynchronized and not ready, whatever the
/// clock's state, and replies from now on say so too.
fn publish_stopping(shared: &Shared, outputs: &Outputs) {
    let mut status = (**shared.status.load()).clone();
    status.tracking.synchronized = false;
    status.tracking.ready = false;
    status.tracking.leap = leap_name(LeapIndicator::Unknown).into();
    shared.status.store(Arc::new(status.clone()));
    let _ = outputs.snapshots.send(status);
    let timescale = shared.server.clock().timescale;
    shared.server.publish_clock(
        stratum_ntp::server::ServerClockState::unsynchronized(-20),
        timescale,
    );
}

/// How a poll's reply must authenticate to reach the core.
enum ReplyAuth {
    /// NTS, under the session of the request.
    Nts(ReplyCheck),
    /// Signed with the request's symmetric key.
    Mac(crate::upstream_keys::MacReplyCheck),
}

/// Sends `datagram` at once (synchronously, right after the core stamped it) and waits for
/// the reply in a task of its own. With `auth`, the reply must authenticate to reach the
/// core, and only its header does.
fn send_poll(
    source: SourceId,
    address: SocketAddr,
    datagram: &[u8],
    auth: Option<ReplyAuth>,
    reply_tx: &mpsc::Sender<Reply>,
) {
    let in_flight = match upstream::send(address, datagram) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "request not sent");
            return;
        }
    };
    let tx = reply_tx.clone();
    tokio::spawn(async move {
        let mut reply = match in_flight.reply(REPLY_TIMEOUT).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(error = %e, "no reply");
                return;
            }
        };
        let message = match auth {
            None => Reply::Time {
                source,
                reply,
                nts: None,
            },
            Some(ReplyAuth::Mac(check)) => match check.check(&reply.bytes) {
                Ok(header) => {
                    reply.bytes = header.to_vec();
                    Reply::Time {
                        source,
                        reply,
                        nts: None,
                    }
                }
                Err(error) => Reply::MacRefused {
                    source: check.source,
                    error,
                },
            },
            Some(ReplyAuth::Nts(check)) => match check.check(&reply.bytes) {
                Ok(authenticated) => {
                    reply.bytes = authenticated.header.to_vec();
                    Reply::Time {
                        source,
                        reply,
                        nts: Some((check, authenticated.cookies)),
                    }
                }
                Err(error) => Reply::NtsRefused {
                    upstream: check.upstream,
                    source: check.source,
                    error,
                },
            },
        };
        let _ = tx.send(message).await;
    });
}

/// Runs an NTS upstream's key exchange in a task of its own and hands the outcome back.
fn spawn_key_exchange(
    request: resolver::LookupRequest,
    ke_port: u16,
    tls: TlsConfig,
    done: &mpsc::Sender<KeyExchangeDone>,
) {
    let done = done.clone();
    tokio::spawn(async move {
        let result = match tls {
            Ok(config) => {
                crate::nts_ke::establish(&request.host, ke_port, config, KEY_EXCHANGE_TIMEOUT).await
            }
            Err(why) => Err(crate::nts_ke::KeError::Trust(why)),
        };
        let _ = done.send(KeyExchangeDone { request, result }).await;
    });
}

/// The keys of the upstreams configured with NTS (the egress tier never is).
fn nts_upstream_keys(config: &AgentConfig) -> Vec<String> {
    config
        .upstreams
        .iter()
        .filter(|u| u.nts)
        .map(upstream_key)
        .collect()
}

/// The NTS-KE TLS configuration, built again only when the CA bundle changes. A bundle that
/// does not parse fails every key exchange with its reason (counted as `trust`) until the
/// config brings a good one.
#[derive(Default)]
struct NtsTrust {
    /// The bundle the configuration was built from, and what came of it.
    built: Option<(Option<String>, TlsConfig)>,
}

/// A TLS configuration for NTS-KE, or why there is none.
type TlsConfig = Result<Arc<rustls::ClientConfig>, String>;

impl NtsTrust {
    fn get(&mut self, ca_bundle: Option<&str>) -> TlsConfig {
        match &self.built {
            Some((bundle, built)) if bundle.as_deref() == ca_bundle => built.clone(),
            _ => {
                let built = crate::nts_ke::trust(ca_bundle).map_err(|e| e.to_string());
                if let Err(why) = &built {
                    tracing::error!(error = %why, "no trust anchors for NTS key exchanges");
                }
                self.built = Some((ca_bundle.map(str::to_owned), built.clone()));
                built
            }
        }
    }
}

fn log_driver_events(events: &[DriverEvent], metrics: &Metrics) {
    for event in events {
        match event {
            DriverEvent::Resolved {
                upstream,
                addresses,
            } => {
                metrics.upstream_lookups.with_label_values(&["ok"]).inc();
                tracing::debug!(%upstream, addresses, "resolved");
            }
            DriverEvent::ResolveFailed { upstream, error } => {
                metrics
                    .upstream_lookups
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(%upstream, %error, "lookup failed; retrying with backoff");
            }
            DriverEvent::Dropped {
                upstream,
                address,
                fault,
                replacement,
            } => {
                let reason = match fault {
                    Fault::Unreachable => "unreachable",
                    Fault::Falseticker => "falseticker",
                    Fault::Outlier => "outlier",
                    Fault::Denied(_) => "denied",
                };
                metrics.upstream_drops.with_label_values(&[reason]).inc();
                tracing::warn!(
                    %upstream, %address, ?fault, replacement = ?replacement,
                    "upstream address dropped"
                );
            }
            DriverEvent::Fallback(true) => {
                tracing::warn!("no egress agent usable; polling the upstreams too")
            }
            DriverEvent::Fallback(false) => {
                tracing::info!("an egress agent is usable again; polling the tier only")
            }
        }
    }
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

#[allow(clippy::too_many_arguments)] // the loop's state, borrowed piece by piece
fn publish(
    opts: &AgentOptions,
    config: &AgentConfig,
    config_origin: ConfigOrigin,
    config_error: &Option<String>,
    backend: &Backend,
    state: &SystemState,
    shared: &Shared,
    outputs: &Outputs,
) {
    let agreeing = agreeing_sources(state);
    let min_sources = usize::from(config.selection.min_sources);
    let node_offset = backend.node_offset(-state.offset);
    let host_daemons = shared.host_daemons.load();
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
            config_source: config_origin,
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
            last_step_unix_nanos: state.last_step.map(|s| s.at.unix_nanos()),
            refusal: state.refusal.as_ref().map(refusal_text),
            other_time_daemon: host_daemons.detection.describe(),
            clock_yielded: host_daemons.yielded.clone(),
            host_daemon: host_daemons.clock.clone(),
            last_update_ago_seconds: state.last_update.map(|t| backend.now().secs_since(t)),
            simulated_error_seconds: backend.simulated_error(),
        },
        sources: {
            let mut views = source_views(state);
            crate::status::mark_authentication(&mut views, config);
            views
        },
        failed_ports: shared.server.failed_ports(),
    };
    shared.metrics.observe(
        state,
        node_offset,
        agreeing,
        min_sources,
        config.offset_bound_seconds(),
        status.tracking.last_update_ago_seconds,
    );
    shared.beat();
    shared.status.store(Arc::new(status.clone()));
    let _ = outputs.snapshots.send(status);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GRACE: f64 = FALLBACK_GRACE.as_secs_f64();

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
        let t0 = ClockTime::from_unix_secs(1_000);
        assert_eq!(fallback.observe(false, t0), None);
        assert_eq!(fallback.observe(true, t0.add_secs(GRACE / 2.0)), None);
        // Unusable again: the grace starts over.
        assert_eq!(fallback.observe(false, t0.add_secs(GRACE)), None);
        assert_eq!(
            fallback.observe(false, t0.add_secs(2.0 * GRACE - 0.001)),
            None
        );
        assert_eq!(
            fallback.observe(false, t0.add_secs(2.0 * GRACE)),
            Some(true)
        );
        assert!(fallback.active());
        assert_eq!(fallback.observe(false, t0.add_secs(3.0 * GRACE)), None);
        // One usable egress agent ends the fallback at once.
        assert_eq!(
            fallback.observe(true, t0.add_secs(3.0 * GRACE)),
            Some(false)
        );
        assert!(!fallback.active());
    }

    #[test]
    fn fallback_never_happens_when_not_allowed_or_on_an_egress_node_and_at_once_without_a_tier() {
        let t0 = ClockTime::from_unix_secs(1_000);
        let mut forbidden = Fallback::new(&tiered(false, &["10.0.0.1"]), "worker");
        assert_eq!(forbidden.observe(false, t0), None);
        assert_eq!(forbidden.observe(false, t0.add_secs(10.0 * GRACE)), None);
        let mut edge = Fallback::new(&tiered(true, &["10.0.0.1"]), "edge");
        assert_eq!(edge.observe(false, t0.add_secs(10.0 * GRACE)), None);
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
