//! The client facade: owns the sources, runs selection and the discipline, tracks the
//! system variables (stratum, refid, root delay/dispersion, leap) and exposes snapshots.
//!
//! Driving loop (the agent does the IO):
//! 1. sleep until [`System::next_deadline`], then call [`System::on_timer`] and apply actions;
//! 2. send every request from [`System::poll_due`] (call until `None`);
//! 3. feed each response with its receive timestamp to [`System::handle_response`] and apply
//!    the returned actions with [`crate::clock::apply_action`];
//! 4. call [`System::observe_clock`] with realtime and monotonic readings now and then;
//! 5. read [`System::state`] for status and [`System::server_state`] for the server snapshot.

use crate::clock::{ClockAction, ClockStatus, Refusal};
use crate::discipline::{
    Discipline, DisciplineConfig, DisciplineInput, DriftError, DriftState, UpdateOutcome,
};
use crate::filter::{FilterSample, SourceEstimate};
use crate::leap::{LeapMode, LeapState, ScheduledLeap};
use crate::packet::{LeapIndicator, ReferenceId};
use crate::refid::reference_id_for;
use crate::select::{Candidate, Combined, SelectError, SelectParams, SelectionRole, select};
use crate::server::ServerClockState;
use crate::source::{
    MAX_POLL_LIMIT, MIN_POLL_LIMIT, Measurement, PollRequest, Source, SourceConfig, SourceEvent,
    SourceId,
};
use crate::time::{ClockTime, NtpTimestamp, PHI};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use thiserror::Error;

/// Stratum published when unsynchronized.
pub const UNSYNCHRONIZED_STRATUM: u8 = 16;

/// Holdover is never shorter than this many of the slowest source's maximum poll intervals.
pub const HOLDOVER_MIN_POLLS: f64 = 4.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SystemConfig {
    pub sources: Vec<SourceConfig>,
    /// Agreeing sources needed to steer (ntpd-rs default 3).
    pub min_sources: usize,
    /// Root distance above which a source is unusable and we are unsynchronized, seconds.
    pub max_distance: f64,
    /// System-peer hysteresis, seconds (chrony `reselectdist`).
    pub reselect_distance: f64,
    /// log2 seconds of our clock reading precision.
    pub precision_log2: i8,
    pub discipline: DisciplineConfig,
    pub leap_mode: LeapMode,
    /// Smear window, seconds (used in smear mode).
    pub smear_window: f64,
    /// How long after the last clock update the clock still counts as synchronized, seconds;
    /// `None` leaves it to `max_distance` alone. Never shorter than four of the slowest
    /// source's maximum poll intervals, so a healthy source that missed a poll or two is
    /// never declared lost.
    pub holdover: Option<f64>,
    /// Stratum answered with once holdover has expired (the clock runs free but still serves,
    /// like chrony's `local stratum`); `None` answers unsynchronized (LI=3, stratum 16).
    pub local_stratum: Option<u8>,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            sources: Vec::new(),
            min_sources: 3,
            max_distance: 1.5,
            reselect_distance: 1e-4,
            precision_log2: -20,
            discipline: DisciplineConfig::default(),
            leap_mode: LeapMode::Kernel,
            smear_window: 86_400.0,
            holdover: None,
            local_stratum: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    #[error("minSources must be at least 1")]
    MinSources,
    #[error("maxDistance must be a positive number of seconds, got {0}")]
    MaxDistance(f64),
    #[error(
        "source {name}: poll range {min}..{max} must satisfy {MIN_POLL_LIMIT} <= min <= max <= {MAX_POLL_LIMIT}"
    )]
    PollRange { name: String, min: i8, max: i8 },
    #[error("source {name}: burst interval must be positive, got {interval}")]
    BurstInterval { name: String, interval: f64 },
    #[error("duplicate source address {0}")]
    DuplicateAddress(SocketAddr),
    #[error("{field} must be a positive finite number, got {value}")]
    NotPositive { field: &'static str, value: f64 },
    #[error("holdover must be a finite number of seconds >= 0, got {0}")]
    Holdover(f64),
    #[error("localStratum must be between 1 and 15, got {0}")]
    LocalStratum(u8),
}

impl SystemConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_sources == 0 {
            return Err(ConfigError::MinSources);
        }
        if !(self.max_distance.is_finite() && self.max_distance > 0.0) {
            return Err(ConfigError::MaxDistance(self.max_distance));
        }
        let d = &self.discipline;
        for (field, value) in [
            ("makeStepThreshold", d.make_step_threshold),
            ("maxSlewPpm", d.max_slew_ppm),
            ("offsetTolerance", d.offset_tolerance),
            ("meddlingThreshold", d.meddling_threshold),
            ("correctionTime", d.correction_time),
            ("smearWindow", self.smear_window),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::NotPositive { field, value });
            }
        }
        if let Some(holdover) = self.holdover
            && !(holdover.is_finite() && holdover >= 0.0)
        {
            return Err(ConfigError::Holdover(holdover));
        }
        if let Some(stratum) = self.local_stratum
            && !(1..UNSYNCHRONIZED_STRATUM).contains(&stratum)
        {
            return Err(ConfigError::LocalStratum(stratum));
        }
        for (i, source) in self.sources.iter().enumerate() {
            let (min, max) = (source.min_poll, source.max_poll);
            if !(MIN_POLL_LIMIT <= min && min <= max && max <= MAX_POLL_LIMIT) {
                return Err(ConfigError::PollRange {
                    name: source.name.clone(),
                    min,
                    max,
                });
            }
            if !(source.burst_interval.is_finite() && source.burst_interval > 0.0) {
                return Err(ConfigError::BurstInterval {
                    name: source.name.clone(),
                    interval: source.burst_interval,
                });
            }
            if self.sources[..i]
                .iter()
                .any(|s| s.address == source.address)
            {
                return Err(ConfigError::DuplicateAddress(source.address));
            }
        }
        Ok(())
    }
}

/// What a source is doing, as shown in status and NodeClock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceState {
    /// System peer.
    Selected,
    /// Survivor contributing to the combined estimate.
    Combined,
    /// Truechimer not among the survivors.
    Candidate,
    /// Outside the majority intersection.
    Falseticker,
    /// No response to the last 8 polls.
    Unreachable,
    /// Stopped by KoD DENY/RSTR.
    Demobilized,
    /// Reachable but no usable samples yet (still filling the filter).
    Initializing,
    /// Reachable but not usable: server unsynchronized or root distance too large.
    Unusable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    pub id: SourceId,
    pub name: String,
    pub address: SocketAddr,
    pub state: SourceState,
    pub reach: u8,
    /// log2 seconds.
    pub poll: i8,
    pub unanswered: u32,
    pub stratum: Option<u8>,
    /// Current offset estimate (true − local), seconds.
    pub offset: Option<f64>,
    pub delay: Option<f64>,
    pub jitter: Option<f64>,
    pub frequency_ppm: Option<f64>,
    pub skew_ppm: Option<f64>,
    pub root_distance: Option<f64>,
    pub samples: usize,
    /// Runs of residuals of one sign in the source's regression.
    #[serde(default)]
    pub residual_runs: Option<usize>,
    /// Seconds the source's regression spans.
    #[serde(default)]
    pub span: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastStep {
    pub at: ClockTime,
    pub offset: f64,
}

/// Snapshot for the status endpoint, metrics and NodeClock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemState {
    pub synchronized: bool,
    /// Combined offset at the last update (before its correction), seconds.
    pub offset: f64,
    /// Base frequency correction, ppm.
    pub frequency_ppm: f64,
    pub frequency_error_ppm: f64,
    pub stratum: u8,
    pub reference_id: ReferenceId,
    pub root_delay: f64,
    /// Grows at 15 ppm of elapsed time since the last update.
    pub root_dispersion: f64,
    pub root_distance: f64,
    pub jitter: f64,
    /// Leap indicator we publish downstream.
    pub leap: LeapIndicator,
    pub leap_scheduled: Option<ScheduledLeap>,
    pub smearing: bool,
    pub system_peer: Option<SourceId>,
    pub steps: u32,
    pub last_step: Option<LastStep>,
    pub refusal: Option<Refusal>,
    pub select_error: Option<SelectError>,
    pub last_update: Option<ClockTime>,
    pub sources: Vec<SourceStatus>,
}

/// What handling a response produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseOutcome {
    pub event: SourceEvent,
    pub update: Option<UpdateOutcome>,
    pub actions: Vec<ClockAction>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct SystemVars {
    stratum: u8,
    reference_id: ReferenceId,
    root_delay: f64,
    root_dispersion: f64,
    /// Step-free axis time of the last update, so dispersion growth ignores steps.
    updated_axis: ClockTime,
    updated_at: ClockTime,
    /// Ledger value when `offset` was measured, so the offset can be brought forward.
    correction_at_update: f64,
    offset: f64,
    jitter: f64,
}

/// λ, the half-width of a source's correctness interval: its root distance plus our
/// uncertainty about its offset (jitter and the regression's prediction error).
fn source_root_distance(estimate: &SourceEstimate, measurement: &Measurement) -> f64 {
    (measurement.root_delay + estimate.delay) / 2.0
        + measurement.root_dispersion
        + estimate.dispersion
        + estimate.jitter
        + estimate.offset_error
}

#[derive(Debug, Clone)]
pub struct System {
    config: SystemConfig,
    sources: Vec<Source>,
    roles: Vec<(SourceId, SelectionRole)>,
    next_id: u32,
    rng: StdRng,
    discipline: Discipline,
    leap: LeapState,
    vars: Option<SystemVars>,
    system_peer: Option<SourceId>,
    combined: Option<Combined>,
    select_error: Option<SelectError>,
    published_sync: Option<bool>,
}

impl System {
    /// `seed` must come from the OS RNG in production: it keys the random transmit
    /// timestamps that make spoofed responses detectable.
    pub fn new(config: SystemConfig, now: ClockTime, seed: [u8; 32]) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut system = Self {
            discipline: Discipline::new(config.discipline.clone()),
            leap: LeapState::new(config.leap_mode, config.smear_window),
            config: SystemConfig::default(),
            sources: Vec::new(),
            roles: Vec::new(),
            next_id: 0,
            rng: StdRng::from_seed(seed),
            vars: None,
            system_peer: None,
            combined: None,
            select_error: None,
            published_sync: None,
        };
        system.install_sources(config.sources.clone(), now);
        system.config = config;
        Ok(system)
    }

    pub fn config(&self) -> &SystemConfig {
        &self.config
    }

    pub fn discipline(&self) -> &Discipline {
        &self.discipline
    }

    fn install_sources(&mut self, configs: Vec<SourceConfig>, now: ClockTime) {
        let mut old = std::mem::take(&mut self.sources);
        for config in configs {
            match old
                .iter()
                .position(|s| s.config().address == config.address)
            {
                Some(index) => {
                    let mut source = old.swap_remove(index);
                    if *source.config() != config {
                        source.update_config(config);
                    }
                    self.sources.push(source);
                }
                None => {
                    let id = SourceId(self.next_id);
                    self.next_id += 1;
                    self.sources.push(Source::new(id, config, now));
                }
            }
        }
        let kept: Vec<SourceId> = self.sources.iter().map(Source::id).collect();
        self.roles.retain(|(id, _)| kept.contains(id));
        if self.system_peer.is_some_and(|peer| !kept.contains(&peer)) {
            self.system_peer = None;
        }
    }

    /// Applies a new configuration. Sources whose address is unchanged keep their samples,
    /// reachability and poll state; others are added or dropped.
    pub fn reconfigure(&mut self, config: SystemConfig, now: ClockTime) -> Result<(), ConfigError> {
        config.validate()?;
        self.install_sources(config.sources.clone(), now);
        self.discipline.reconfigure(config.discipline.clone());
        self.leap.reconfigure(config.leap_mode, config.smear_window);
        self.config = config;
        Ok(())
    }

    pub fn source(&self, id: SourceId) -> Option<&Source> {
        self.sources.iter().find(|s| s.id() == id)
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    fn local_precision(&self) -> f64 {
        2f64.powi(i32::from(self.config.precision_log2))
    }

    /// The next request due at `now`, if any; call until `None`.
    pub fn poll_due(&mut self, now: ClockTime) -> Option<PollRequest> {
        let rng = &mut self.rng;
        self.sources.iter_mut().find_map(|s| s.poll_due(now, rng))
    }

    /// The earliest time something needs doing.
    pub fn next_deadline(&self, now: ClockTime) -> ClockTime {
        let mut deadline = self
            .sources
            .iter()
            .filter_map(Source::next_poll)
            .min()
            .unwrap_or(now.add_secs(3600.0));
        let mut consider = |t: Option<ClockTime>| {
            if let Some(t) = t {
                deadline = deadline.min(t);
            }
        };
        consider(self.discipline.next_deadline());
        consider(self.leap.next_deadline());
        if let Some((start, end)) = self.leap.smear_edges() {
            consider(Some(start).filter(|t| *t > now));
            consider(Some(end).filter(|t| *t > now));
        }
        if self.published_sync == Some(true) {
            consider(self.sync_loss_time());
        }
        deadline
    }

    /// When root distance will cross `max_distance` without new updates.
    fn sync_loss_time(&self) -> Option<ClockTime> {
        let vars = self.vars?;
        let distance = vars.root_delay / 2.0 + vars.root_dispersion;
        let remaining = (self.config.max_distance - distance) / PHI;
        let axis_deadline = vars.updated_axis.add_secs(remaining.max(0.0));
        // Back to realtime: the axis differs from realtime by the known jumps.
        let shift = vars.updated_at.secs_since(vars.updated_axis);
        Some(axis_deadline.add_secs(shift))
    }

    /// Timer work: slew ends, leap arming/retirement, smear edges, loss of sync.
    pub fn on_timer(&mut self, now: ClockTime) -> Vec<ClockAction> {
        let mut actions = Vec::new();
        actions.extend(self.discipline.on_timer(now));
        actions.extend(self.leap.on_timer(now));
        actions.extend(
            self.discipline
                .set_feed_forward(now, self.leap.smear_rate_ppm(now)),
        );
        actions.extend(self.publish_status(now));
        actions
    }

    /// Validates a response from `source` received at `received_at` and runs an update.
    pub fn handle_response(
        &mut self,
        source: SourceId,
        bytes: &[u8],
        received_at: ClockTime,
        now: ClockTime,
    ) -> ResponseOutcome {
        let precision = self.local_precision();
        let max_distance = self.config.max_distance;
        let axis = self.discipline.axis(received_at);
        let correction = self.discipline.ledger().value_at(axis);
        let smear_target = self.leap.smear_target(received_at);
        let Some(slot) = self.sources.iter_mut().find(|s| s.id() == source) else {
            return ResponseOutcome {
                event: SourceEvent::Ignored(crate::source::IgnoreReason::BogusOrigin),
                update: None,
                actions: Vec::new(),
            };
        };
        let event = slot.handle_response(now, bytes, received_at, precision, max_distance);
        let SourceEvent::Measurement(measurement) = event else {
            return ResponseOutcome {
                event,
                update: None,
                actions: Vec::new(),
            };
        };
        slot.add_sample(FilterSample {
            time: axis,
            uncorrected_offset: measurement.offset - smear_target + correction,
            delay: measurement.delay,
            dispersion: measurement.dispersion,
        });
        let (update, actions) = self.update(now);
        ResponseOutcome {
            event,
            update,
            actions,
        }
    }

    fn candidates(&self, now: ClockTime) -> Vec<Candidate> {
        let axis = self.discipline.axis(now);
        let correction = self.discipline.ledger().value_at(axis);
        let smear_target = self.leap.smear_target(now);
        self.sources
            .iter()
            .filter(|s| s.is_reachable() && s.demobilized().is_none())
            .filter_map(|s| {
                let estimate = s.estimate(axis)?;
                let measurement = s.last_measurement()?;
                let root_distance = source_root_distance(&estimate, measurement);
                (root_distance < self.config.max_distance).then_some(Candidate {
                    id: s.id(),
                    offset: estimate.uncorrected_offset - correction + smear_target,
                    root_distance,
                    jitter: estimate.jitter,
                    stratum: measurement.stratum,
                    frequency_ppm: estimate.frequency_ppm,
                    skew_ppm: estimate.skew_ppm,
                    leap: measurement.leap,
                })
            })
            .collect()
    }

    fn update(&mut self, now: ClockTime) -> (Option<UpdateOutcome>, Vec<ClockAction>) {
        let candidates = self.candidates(now);
        let params = SelectParams {
            min_sources: self.config.min_sources,
            reselect_distance: self.config.reselect_distance,
        };
        let selection = select(&candidates, params, self.system_peer);
        self.roles = selection.roles;
        let combined = match selection.result {
            Ok(combined) => combined,
            Err(error) => {
                self.select_error = Some(error);
                return (None, self.publish_status(now).into_iter().collect());
            }
        };
        self.select_error = None;
        self.system_peer = Some(combined.system_peer);
        self.combined = Some(combined);

        let mut actions = self.leap.update(now, combined.leap);
        actions.extend(
            self.discipline
                .set_feed_forward(now, self.leap.smear_rate_ppm(now)),
        );
        let smear_target = self.leap.smear_target(now);
        let update_interval = self
            .source(combined.system_peer)
            .map_or(1.0, Source::current_interval);
        let input = DisciplineInput {
            offset: combined.offset - smear_target,
            frequency_ppm: combined.frequency_ppm,
            skew_ppm: combined.skew_ppm,
            update_interval,
        };
        let (outcome, discipline_actions) = self.discipline.update(now, input);
        actions.extend(discipline_actions);
        let residual = match outcome {
            UpdateOutcome::Refused(_) => None,
            UpdateOutcome::Stepped { .. } => Some(0.0),
            UpdateOutcome::Slewing { offset, .. } => Some(offset.abs()),
        };
        if let Some(residual) = residual {
            // After a step the clock already carries the correction: record what is left.
            let (after, recorded) = match outcome {
                UpdateOutcome::Stepped { offset } => (
                    now.add_secs(offset),
                    Combined {
                        offset: combined.offset - offset,
                        ..combined
                    },
                ),
                _ => (now, combined),
            };
            self.record_vars(after, &candidates, recorded, residual);
        }
        actions.extend(self.publish_status(now));
        (Some(outcome), actions)
    }

    fn record_vars(
        &mut self,
        now: ClockTime,
        candidates: &[Candidate],
        combined: Combined,
        residual: f64,
    ) {
        let Some(peer) = self.sources.iter().find(|s| s.id() == combined.system_peer) else {
            return;
        };
        let axis = self.discipline.axis(now);
        let (Some(measurement), Some(estimate)) = (peer.last_measurement(), peer.estimate(axis))
        else {
            return;
        };
        let peer_jitter = candidates
            .iter()
            .find(|c| c.id == combined.system_peer)
            .map_or(estimate.jitter, |c| c.jitter);
        self.vars = Some(SystemVars {
            stratum: measurement
                .stratum
                .saturating_add(1)
                .min(UNSYNCHRONIZED_STRATUM),
            reference_id: reference_id_for(peer.config().address.ip()),
            root_delay: measurement.root_delay + estimate.delay,
            root_dispersion: measurement.root_dispersion
                + estimate.dispersion
                + combined.jitter.max(peer_jitter)
                + residual,
            updated_axis: axis,
            updated_at: now,
            correction_at_update: self.discipline.ledger().value_at(axis),
            offset: combined.offset,
            jitter: combined.jitter,
        });
    }

    /// The offset measured at the last update, less the phase corrections applied since:
    /// slews through the ledger (minus its base-frequency part, which only cancels the
    /// oscillator's error), steps through the realtime/axis difference. This is what "the
    /// clock is X off" means between updates.
    fn current_offset(&self, vars: &SystemVars, now: ClockTime) -> f64 {
        let axis = self.discipline.axis(now);
        let base_ppm = self.discipline.drift().frequency_ppm;
        let since = axis.secs_since(vars.updated_axis);
        let slewed = self.discipline.ledger().value_at(axis)
            - vars.correction_at_update
            - base_ppm * 1e-6 * since;
        let stepped = now.secs_since(axis) - vars.updated_at.secs_since(vars.updated_axis);
        vars.offset - slewed - stepped
    }

    fn root_dispersion_at(&self, vars: &SystemVars, now: ClockTime) -> f64 {
        let elapsed = self
            .discipline
            .axis(now)
            .secs_since(vars.updated_axis)
            .max(0.0);
        vars.root_dispersion + PHI * elapsed
    }

    fn is_synchronized(&self, now: ClockTime) -> bool {
        let Some(vars) = &self.vars else {
            return false;
        };
        let distance = vars.root_delay / 2.0 + self.root_dispersion_at(vars, now);
        !self.panicked() && distance < self.config.max_distance && !self.holdover_expired(vars, now)
    }

    /// A panic refusal means the clock is known to be far off; an implausible offset waiting
    /// for confirmation does not (the clock is as good as before it).
    fn panicked(&self) -> bool {
        matches!(
            self.discipline.refusal(),
            Some(Refusal::PanicThreshold { .. })
        )
    }

    /// The longest the clock may go without an update before it counts as having lost its
    /// sources: the configured holdover, but at least four of the slowest source's maximum
    /// poll intervals (an update is due once per poll interval while agreeing sources answer,
    /// and a lost packet or two must not end synchronization).
    pub fn holdover_limit(&self) -> Option<f64> {
        let slowest_poll = self
            .config
            .sources
            .iter()
            .map(|s| 2f64.powi(i32::from(s.max_poll)))
            .fold(0.0, f64::max);
        self.config
            .holdover
            .map(|holdover| holdover.max(HOLDOVER_MIN_POLLS * slowest_poll))
    }

    fn holdover_expired(&self, vars: &SystemVars, now: ClockTime) -> bool {
        self.holdover_limit()
            .is_some_and(|limit| self.discipline.axis(now).secs_since(vars.updated_axis) > limit)
    }

    fn publish_status(&mut self, now: ClockTime) -> Option<ClockAction> {
        let synchronized = self.is_synchronized(now);
        let changed = self.published_sync != Some(synchronized);
        if !changed && !synchronized {
            return None;
        }
        self.published_sync = Some(synchronized);
        let (max_error, est_error) = self.vars.map_or((16.0, 16.0), |vars| {
            (
                vars.root_delay / 2.0 + self.root_dispersion_at(&vars, now),
                vars.jitter,
            )
        });
        Some(ClockAction::SetStatus(ClockStatus {
            synchronized,
            max_error,
            est_error,
        }))
    }

    /// Feeds realtime and monotonic readings for meddling detection; returns the size of an
    /// external clock jump when one is detected.
    pub fn observe_clock(&mut self, realtime: ClockTime, monotonic: ClockTime) -> Option<f64> {
        self.discipline.observe_clock(realtime, monotonic)
    }

    /// Frequency state for the drift file.
    pub fn export_drift(&self) -> DriftState {
        self.discipline.drift()
    }

    /// Applies a saved drift (call right after `new`).
    pub fn import_drift(
        &mut self,
        drift: DriftState,
        now: ClockTime,
    ) -> Result<Vec<ClockAction>, DriftError> {
        self.discipline.import_drift(drift, now)
    }

    /// The snapshot the NTP server answers from.
    pub fn server_state(&self, now: ClockTime) -> ServerClockState {
        let synchronized = self.is_synchronized(now);
        match (&self.vars, synchronized) {
            (Some(vars), true) => ServerClockState {
                synchronized: true,
                leap: self.leap.indicator(),
                stratum: vars.stratum,
                precision: self.config.precision_log2,
                root_delay: vars.root_delay,
                root_dispersion: self.root_dispersion_at(vars, now),
                reference_id: vars.reference_id,
                reference_time: NtpTimestamp::from_clock_time(vars.updated_at),
                updated_at: now,
            },
            // Holdover is over but the operator asked to keep serving the free-running clock
            // at a local stratum; a panic refusal or no update ever still answers LI=3.
            (Some(vars), false) if self.serves_local(vars, now) => ServerClockState {
                synchronized: true,
                leap: self.leap.indicator(),
                stratum: self.config.local_stratum.unwrap_or(UNSYNCHRONIZED_STRATUM),
                precision: self.config.precision_log2,
                root_delay: 0.0,
                root_dispersion: 0.0,
                reference_id: ReferenceId(*b"LOCL"),
                reference_time: NtpTimestamp::from_clock_time(now),
                updated_at: now,
            },
            _ => ServerClockState::unsynchronized(self.config.precision_log2),
        }
    }

    /// Whether the free-running clock is served at the configured local stratum: only after
    /// holdover expired, never when the discipline refused a correction at the panic threshold.
    fn serves_local(&self, vars: &SystemVars, now: ClockTime) -> bool {
        self.config.local_stratum.is_some() && !self.panicked() && self.holdover_expired(vars, now)
    }

    pub fn state(&self, now: ClockTime) -> SystemState {
        let axis = self.discipline.axis(now);
        let correction = self.discipline.ledger().value_at(axis);
        let smear_target = self.leap.smear_target(now);
        let sources = self
            .sources
            .iter()
            .map(|s| {
                let role = self.roles.iter().find(|(id, _)| *id == s.id()).map(|r| r.1);
                let estimate = s.estimate(axis);
                let measurement = s.last_measurement();
                let root_distance = estimate
                    .zip(measurement)
                    .map(|(e, m)| source_root_distance(&e, m));
                let state = if s.demobilized().is_some() {
                    SourceState::Demobilized
                } else if !s.is_reachable() {
                    SourceState::Unreachable
                } else {
                    match role {
                        Some(SelectionRole::Selected) => SourceState::Selected,
                        Some(SelectionRole::Combined) => SourceState::Combined,
                        Some(SelectionRole::Candidate) => SourceState::Candidate,
                        Some(SelectionRole::Falseticker) => SourceState::Falseticker,
                        None if estimate.is_some()
                            && root_distance.is_some_and(|d| d >= self.config.max_distance)
                            && s.sample_count() >= crate::filter::FILTER_STAGES =>
                        {
                            SourceState::Unusable
                        }
                        None if estimate.is_some() || measurement.is_none() => {
                            SourceState::Initializing
                        }
                        None => SourceState::Unusable,
                    }
                };
                SourceStatus {
                    id: s.id(),
                    name: s.config().name.clone(),
                    address: s.config().address,
                    state,
                    reach: s.reach(),
                    poll: s.poll_exponent(),
                    unanswered: s.unanswered(),
                    stratum: measurement.map(|m| m.stratum),
                    offset: estimate.map(|e| e.uncorrected_offset - correction + smear_target),
                    delay: estimate.map(|e| e.delay),
                    jitter: estimate.map(|e| e.jitter),
                    frequency_ppm: estimate.map(|e| e.frequency_ppm),
                    skew_ppm: estimate.map(|e| e.skew_ppm),
                    root_distance,
                    samples: s.sample_count(),
                    residual_runs: estimate.map(|e| e.residual_runs),
                    span: estimate.map(|e| e.span),
                }
            })
            .collect();
        let vars = self.vars;
        let root_dispersion = vars.map_or(16.0, |v| self.root_dispersion_at(&v, now));
        let root_delay = vars.map_or(0.0, |v| v.root_delay);
        let synchronized = self.is_synchronized(now);
        let drift = self.discipline.drift();
        SystemState {
            synchronized,
            offset: vars.map_or(0.0, |v| self.current_offset(&v, now)),
            frequency_ppm: drift.frequency_ppm,
            frequency_error_ppm: drift.error_ppm,
            stratum: match vars {
                Some(v) if synchronized => v.stratum,
                _ => UNSYNCHRONIZED_STRATUM,
            },
            reference_id: vars.map_or(ReferenceId(*b"INIT"), |v| v.reference_id),
            root_delay,
            root_dispersion,
            root_distance: root_delay / 2.0 + root_dispersion,
            jitter: vars.map_or(0.0, |v| v.jitter),
            leap: if synchronized {
                self.leap.indicator()
            } else {
                LeapIndicator::Unknown
            },
            leap_scheduled: self.leap.scheduled(),
            smearing: self.leap.smearing(now),
            system_peer: self.system_peer,
            steps: self.discipline.steps(),
            last_step: self
                .discipline
                .last_step()
                .map(|(at, offset)| LastStep { at, offset }),
            refusal: self.discipline.refusal(),
            select_error: self.select_error,
            last_update: vars.map(|v| v.updated_at),
            sources,
        }
    }

    /// Whether the clock counts as synchronized at `now` (an accepted update, no refusal, and
    /// root distance below `max_distance`).
    pub fn synchronized(&self, now: ClockTime) -> bool {
        self.is_synchronized(now)
    }

    /// Root delay / 2 + root dispersion (grown to `now`), once there was an update.
    pub fn root_distance(&self, now: ClockTime) -> Option<f64> {
        self.vars
            .map(|vars| vars.root_delay / 2.0 + self.root_dispersion_at(&vars, now))
    }

    /// Selection role of each source at the last selection.
    pub fn roles(&self) -> &[(SourceId, SelectionRole)] {
        &self.roles
    }

    /// Leap seconds that took effect while this system scheduled them.
    pub fn leaps_applied(&self) -> u32 {
        self.leap.applied()
    }
}
