//! The clock discipline: turns the combined estimate into clock actions.
//!
//! # The loop we chose, and why
//!
//! A chrony-style design, not the RFC 5905 PLL/FLL: frequency comes from a weighted linear
//! regression per source (see `filter`), combined across survivors by inverse skew²; phase is
//! corrected by a proportional slew that removes the whole measured offset within a short
//! correction time. The PI-PLL's time constant ties phase and frequency together, so from a
//! 100 ppm error it needs hours to converge and overshoots; the regression gets the frequency
//! to within a few ppm from the iburst samples alone, and the phase correction can then be
//! quick without fighting a frequency loop. A Kalman filter (ntpd-rs) would do as well but
//! needs noise models we would have to tune; the regression has none.
//!
//! The regression needs samples that are comparable across our own corrections, so the
//! discipline keeps a [`CorrectionLedger`]: A(t) = Σ steps + ∫ commanded frequency dt
//! (excluding the leap smear's feed-forward). An "uncorrected offset" u = θ + A(t) is what the
//! offset would be had we never touched the clock; its slope is the oscillator error.
//!
//! Commanded frequency = base (regression estimate, |·| ≤ 500 ppm, optionally blended with the
//! drift file's prior by inverse variance) + slew (θ / correction time, |·| ≤ `max_slew_ppm`)
//! + smear feed-forward. When the slew's duration ends the frequency falls back to base.
//!
//! # Steps, panics and why time never goes backwards
//!
//! Steps happen only during the first `make_step_limit` updates, when |θ| exceeds
//! `make_step_threshold`, and never beyond the startup panic thresholds (default: any forward
//! step, at most 86 400 s backward). After that window every correction is a slew: a frequency
//! change bounded by `max_slew_ppm` (≤ 500 ppm by default, far below the 10⁶ ppm that would
//! stop the clock), so local time is strictly increasing. Offsets beyond the run-time panic
//! threshold (1000 s) are refused and reported; offsets beyond `offset_tolerance` are ignored
//! until seen in `offset_confirmations` consecutive updates (chrony's `maxchange` idea), so one
//! implausible upstream correction cannot drag the clock. External steps (someone else setting
//! the clock) are found by comparing realtime − monotonic with our own steps; they are
//! absorbed into the ledger and re-open the step window.

use crate::clock::{ClockAction, Refusal};
use crate::time::ClockTime;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest base frequency correction, ppm (RFC 5905 MAXFREQ; the Linux ADJ_FREQUENCY limit).
pub const MAX_FREQUENCY_PPM: f64 = 500.0;
/// Offsets are slewed over this many update intervals.
pub const CORRECTION_TIME_RATIO: f64 = 1.0;
/// Upper bound of the correction time derived from the update interval, seconds.
const MAX_CORRECTION_TIME: f64 = 1024.0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DisciplineConfig {
    /// Step when |offset| exceeds this during the step window, seconds.
    pub make_step_threshold: f64,
    /// Number of initial updates during which stepping is allowed.
    pub make_step_limit: u32,
    /// Bound on the phase-correction rate added to the base frequency, ppm. The backend may
    /// need ADJ_TICK to realise base + slew beyond ±500 ppm.
    pub max_slew_ppm: f64,
    /// Refuse any correction larger than this after the step window, seconds.
    pub panic_runtime: Option<f64>,
    /// Refuse startup steps forward larger than this, seconds (None: unlimited).
    pub panic_startup_forward: Option<f64>,
    /// Refuse startup steps backward larger than this, seconds.
    pub panic_startup_backward: Option<f64>,
    /// After the step window, offsets above this are ignored until confirmed, seconds.
    pub offset_tolerance: f64,
    /// Consecutive updates needed to accept an offset above the tolerance.
    pub offset_confirmations: u32,
    /// An unexplained jump of realtime − monotonic above this is external meddling, seconds.
    pub meddling_threshold: f64,
    /// Shortest time over which a measured offset is slewed away, seconds. The actual time is
    /// `CORRECTION_TIME_RATIO` × the expected interval between updates when that is longer
    /// (chrony's `corrtimeratio` idea: smooth corrections, no slew spikes from noise), and
    /// longer still when `max_slew_ppm` binds.
    pub correction_time: f64,
}

impl Default for DisciplineConfig {
    fn default() -> Self {
        Self {
            make_step_threshold: 1.0,
            make_step_limit: 3,
            max_slew_ppm: 500.0,
            panic_runtime: Some(1000.0),
            panic_startup_forward: None,
            panic_startup_backward: Some(86_400.0),
            offset_tolerance: 0.128,
            offset_confirmations: 3,
            meddling_threshold: 5.0,
            correction_time: 2.0,
        }
    }
}

/// Frequency state persisted in the drift file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftState {
    /// Frequency correction that cancels the oscillator error, ppm.
    pub frequency_ppm: f64,
    /// One-sigma uncertainty of `frequency_ppm`, ppm.
    pub error_ppm: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum DriftError {
    #[error("drift {0} ppm is outside ±{MAX_FREQUENCY_PPM} ppm")]
    OutOfRange(f64),
    #[error("drift error {0} ppm is not a positive finite number")]
    BadError(f64),
}

/// What the combined estimate says at the moment of an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DisciplineInput {
    /// θ (true − local) minus the smear target, seconds.
    pub offset: f64,
    /// Frequency correction suggested by the survivors, ppm.
    pub frequency_ppm: f64,
    pub skew_ppm: f64,
    /// Expected seconds until the next update (the system peer's poll interval).
    pub update_interval: f64,
}

/// Σ steps + ∫ commanded control frequency, as a function of step-free local time.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CorrectionLedger {
    anchor: ClockTime,
    value_at_anchor: f64,
    rate_ppm: f64,
}

impl CorrectionLedger {
    pub fn value_at(&self, axis_time: ClockTime) -> f64 {
        self.value_at_anchor + self.rate_ppm * 1e-6 * axis_time.secs_since(self.anchor)
    }

    fn set_rate(&mut self, axis_time: ClockTime, rate_ppm: f64) {
        self.value_at_anchor = self.value_at(axis_time);
        self.anchor = axis_time;
        self.rate_ppm = rate_ppm;
    }

    fn add_jump(&mut self, axis_time: ClockTime, jump: f64) {
        self.value_at_anchor = self.value_at(axis_time) + jump;
        self.anchor = axis_time;
    }
}

/// Result of one update, for reporting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum UpdateOutcome {
    Stepped { offset: f64 },
    Slewing { offset: f64, until: ClockTime },
    Refused(Refusal),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discipline {
    config: DisciplineConfig,
    updates: u32,
    ledger: CorrectionLedger,
    /// Sum of all clock jumps we know of (ours and detected external ones): realtime minus
    /// this is the step-free axis.
    jumps_total: f64,
    base_ppm: f64,
    prior: Option<DriftState>,
    skew_ppm: f64,
    slew_ppm: f64,
    slew_until: Option<ClockTime>,
    feed_forward_ppm: f64,
    unconfirmed: u32,
    refusal: Option<Refusal>,
    steps: u32,
    last_step: Option<(ClockTime, f64)>,
    meddling_baseline: Option<f64>,
}

impl Discipline {
    pub fn new(config: DisciplineConfig) -> Self {
        Self {
            config,
            updates: 0,
            ledger: CorrectionLedger::default(),
            jumps_total: 0.0,
            base_ppm: 0.0,
            prior: None,
            skew_ppm: f64::INFINITY,
            slew_ppm: 0.0,
            slew_until: None,
            feed_forward_ppm: 0.0,
            unconfirmed: 0,
            refusal: None,
            steps: 0,
            last_step: None,
            meddling_baseline: None,
        }
    }

    pub fn config(&self) -> &DisciplineConfig {
        &self.config
    }

    pub fn reconfigure(&mut self, config: DisciplineConfig) {
        self.config = config;
    }

    /// Step-free local time: realtime with every known jump removed.
    pub fn axis(&self, realtime: ClockTime) -> ClockTime {
        realtime.add_secs(-self.jumps_total)
    }

    pub fn ledger(&self) -> &CorrectionLedger {
        &self.ledger
    }

    pub fn updates(&self) -> u32 {
        self.updates
    }

    pub fn base_frequency_ppm(&self) -> f64 {
        self.base_ppm
    }

    /// Total frequency currently commanded (base + slew + smear feed-forward), ppm.
    pub fn commanded_ppm(&self) -> f64 {
        self.base_ppm + self.slew_ppm + self.feed_forward_ppm
    }

    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    pub fn steps(&self) -> u32 {
        self.steps
    }

    pub fn last_step(&self) -> Option<(ClockTime, f64)> {
        self.last_step
    }

    /// Frequency and its uncertainty for the drift file.
    pub fn drift(&self) -> DriftState {
        let error = if self.skew_ppm.is_finite() {
            self.skew_ppm
        } else {
            self.prior.map_or(MAX_FREQUENCY_PPM, |p| p.error_ppm)
        };
        DriftState {
            frequency_ppm: self.base_ppm,
            error_ppm: error,
        }
    }

    /// Loads a saved drift as the frequency prior and applies it at once.
    pub fn import_drift(
        &mut self,
        drift: DriftState,
        now: ClockTime,
    ) -> Result<Vec<ClockAction>, DriftError> {
        if !drift.frequency_ppm.is_finite() || drift.frequency_ppm.abs() > MAX_FREQUENCY_PPM {
            return Err(DriftError::OutOfRange(drift.frequency_ppm));
        }
        if !drift.error_ppm.is_finite() || drift.error_ppm <= 0.0 {
            return Err(DriftError::BadError(drift.error_ppm));
        }
        self.prior = Some(drift);
        self.base_ppm = drift.frequency_ppm;
        Ok(vec![self.command(now)])
    }

    fn command(&mut self, realtime: ClockTime) -> ClockAction {
        let axis = self.axis(realtime);
        self.ledger.set_rate(axis, self.base_ppm + self.slew_ppm);
        ClockAction::SetFrequency {
            ppm: self.commanded_ppm(),
        }
    }

    /// Changes the smear feed-forward; returns the frequency action if it changed.
    pub fn set_feed_forward(&mut self, now: ClockTime, ppm: f64) -> Option<ClockAction> {
        if (ppm - self.feed_forward_ppm).abs() < 1e-12 {
            return None;
        }
        self.feed_forward_ppm = ppm;
        Some(self.command(now))
    }

    /// When the current slew ends.
    pub fn next_deadline(&self) -> Option<ClockTime> {
        self.slew_until
    }

    /// Ends a finished slew.
    pub fn on_timer(&mut self, now: ClockTime) -> Option<ClockAction> {
        match self.slew_until {
            Some(until) if now >= until => {
                self.slew_until = None;
                self.slew_ppm = 0.0;
                Some(self.command(now))
            }
            _ => None,
        }
    }

    /// Compares realtime − monotonic with the jumps we know about. Returns the size of an
    /// external jump when one above the threshold is found; it is absorbed into the ledger
    /// (so samples stay comparable) and the step window re-opens.
    pub fn observe_clock(&mut self, realtime: ClockTime, monotonic: ClockTime) -> Option<f64> {
        let gap = realtime.secs_since(monotonic) - self.jumps_total;
        let Some(baseline) = self.meddling_baseline else {
            self.meddling_baseline = Some(gap);
            return None;
        };
        let jump = gap - baseline;
        if jump.abs() <= self.config.meddling_threshold {
            // Small changes (a kernel leap second) are left to the filters to follow.
            self.meddling_baseline = Some(gap);
            return None;
        }
        self.jumps_total += jump;
        let axis = self.axis(realtime);
        self.ledger.add_jump(axis, jump);
        self.unconfirmed = 0;
        // During start-up the window starts over: the step is part of bringing the clock in.
        // After it the jump is followed, not fought: no step undoes it, and what the sources
        // then disagree by is slewed (or refused beyond panicRuntime) like any other offset.
        if self.in_step_window() {
            self.updates = 0;
        }
        Some(jump)
    }

    fn in_step_window(&self) -> bool {
        self.updates < self.config.make_step_limit
    }

    fn blended_frequency(&self, input: &DisciplineInput) -> (f64, f64) {
        let measured = (input.frequency_ppm, input.skew_ppm);
        let (frequency, skew) = match self.prior {
            Some(prior) if measured.1.is_finite() => {
                let wp = prior.error_ppm.powi(-2);
                let wm = measured.1.max(1e-6).powi(-2);
                (
                    (prior.frequency_ppm * wp + measured.0 * wm) / (wp + wm),
                    (wp + wm).powf(-0.5),
                )
            }
            Some(prior) => (prior.frequency_ppm, prior.error_ppm),
            None if measured.1.is_finite() => measured,
            None => (self.base_ppm, f64::INFINITY),
        };
        (frequency.clamp(-MAX_FREQUENCY_PPM, MAX_FREQUENCY_PPM), skew)
    }

    /// One update with the survivors' combined estimate.
    pub fn update(
        &mut self,
        now: ClockTime,
        input: DisciplineInput,
    ) -> (UpdateOutcome, Vec<ClockAction>) {
        let offset = input.offset;
        if self.in_step_window() {
            if offset.abs() > self.config.make_step_threshold {
                let limit = if offset > 0.0 {
                    self.config.panic_startup_forward
                } else {
                    self.config.panic_startup_backward
                };
                if let Some(threshold) = limit.filter(|t| offset.abs() > *t) {
                    return self.refuse(Refusal::PanicThreshold { offset, threshold });
                }
                return self.step(now, input);
            }
        } else {
            if let Some(threshold) = self.config.panic_runtime.filter(|t| offset.abs() > *t) {
                return self.refuse(Refusal::PanicThreshold { offset, threshold });
            }
            if offset.abs() > self.config.offset_tolerance {
                self.unconfirmed += 1;
                if self.unconfirmed < self.config.offset_confirmations {
                    return self.refuse(Refusal::ImplausibleOffset {
                        offset,
                        confirmations: self.unconfirmed,
                        needed: self.config.offset_confirmations,
                    });
                }
            }
        }
        self.slew(now, input)
    }

    fn refuse(&mut self, refusal: Refusal) -> (UpdateOutcome, Vec<ClockAction>) {
        self.refusal = Some(refusal);
        (
            UpdateOutcome::Refused(refusal),
            vec![ClockAction::Refuse(refusal)],
        )
    }

    fn step(
        &mut self,
        now: ClockTime,
        input: DisciplineInput,
    ) -> (UpdateOutcome, Vec<ClockAction>) {
        let offset = input.offset;
        let axis = self.axis(now);
        self.ledger.add_jump(axis, offset);
        self.jumps_total += offset;
        let after = now.add_secs(offset);
        self.updates += 1;
        self.steps += 1;
        self.last_step = Some((after, offset));
        self.refusal = None;
        self.unconfirmed = 0;
        (self.base_ppm, self.skew_ppm) = self.blended_frequency(&input);
        self.slew_ppm = 0.0;
        self.slew_until = None;
        let actions = vec![ClockAction::Step { offset }, self.command(after)];
        (UpdateOutcome::Stepped { offset }, actions)
    }

    fn slew(
        &mut self,
        now: ClockTime,
        input: DisciplineInput,
    ) -> (UpdateOutcome, Vec<ClockAction>) {
        let offset = input.offset;
        self.updates = self.updates.saturating_add(1);
        self.refusal = None;
        self.unconfirmed = 0;
        (self.base_ppm, self.skew_ppm) = self.blended_frequency(&input);
        let smooth = (CORRECTION_TIME_RATIO * input.update_interval).min(MAX_CORRECTION_TIME);
        let max_rate = self.config.max_slew_ppm.max(1e-3) * 1e-6;
        let duration = (offset.abs() / max_rate)
            .max(self.config.correction_time.max(1e-3))
            .max(smooth);
        self.slew_ppm = offset / duration * 1e6;
        let until = now.add_secs(duration);
        self.slew_until = Some(until);
        let action = self.command(now);
        (UpdateOutcome::Slewing { offset, until }, vec![action])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(offset: f64) -> DisciplineInput {
        DisciplineInput {
            offset,
            frequency_ppm: 0.0,
            skew_ppm: 1.0,
            update_interval: 1.0,
        }
    }

    fn t(secs: f64) -> ClockTime {
        ClockTime::from_secs_f64(1.7e9 + secs)
    }

    #[test]
    fn steps_only_inside_the_make_step_window() {
        let mut d = Discipline::new(DisciplineConfig::default());
        let (outcome, actions) = d.update(t(0.0), input(2.0));
        assert_eq!(outcome, UpdateOutcome::Stepped { offset: 2.0 });
        assert!(matches!(actions[0], ClockAction::Step { offset } if offset == 2.0));
        d.update(t(10.0), input(0.0));
        d.update(t(20.0), input(0.0));
        // Window over: a 0.2 s offset (above the tolerance) is ignored twice, then slewed.
        assert!(matches!(
            d.update(t(30.0), input(0.2)).0,
            UpdateOutcome::Refused(_)
        ));
        assert!(matches!(
            d.update(t(40.0), input(0.2)).0,
            UpdateOutcome::Refused(_)
        ));
        let (outcome, actions) = d.update(t(50.0), input(0.2));
        assert!(matches!(outcome, UpdateOutcome::Slewing { .. }));
        let ClockAction::SetFrequency { ppm } = actions[0] else {
            panic!("expected a frequency change");
        };
        assert!(
            (ppm - 500.0).abs() < 1e-9,
            "slew limited to max_slew_ppm, got {ppm}"
        );
    }

    #[test]
    fn runtime_panic_threshold_refuses_large_offsets() {
        let mut d = Discipline::new(DisciplineConfig {
            make_step_limit: 0,
            ..DisciplineConfig::default()
        });
        let (outcome, _) = d.update(t(0.0), input(3600.0));
        assert_eq!(
            outcome,
            UpdateOutcome::Refused(Refusal::PanicThreshold {
                offset: 3600.0,
                threshold: 1000.0
            })
        );
        assert!(d.refusal().is_some());
    }

    #[test]
    fn startup_backward_step_beyond_a_day_is_refused() {
        let mut d = Discipline::new(DisciplineConfig::default());
        assert!(matches!(
            d.update(t(0.0), input(-100_000.0)).0,
            UpdateOutcome::Refused(_)
        ));
        assert!(matches!(
            d.update(t(1.0), input(100_000.0)).0,
            UpdateOutcome::Stepped { .. }
        ));
    }

    #[test]
    fn slew_ends_at_its_deadline_and_returns_to_base_frequency() {
        let mut d = Discipline::new(DisciplineConfig {
            make_step_limit: 0,
            ..DisciplineConfig::default()
        });
        let (_, actions) = d.update(t(0.0), input(0.0001));
        assert_eq!(actions, vec![ClockAction::SetFrequency { ppm: 50.0 }]);
        assert_eq!(d.next_deadline(), Some(t(2.0)));
        assert_eq!(
            d.on_timer(t(2.0)),
            Some(ClockAction::SetFrequency { ppm: 0.0 })
        );
        // The ledger remembers the 100 µs applied.
        assert!((d.ledger().value_at(t(100.0)) - 0.0001).abs() < 1e-9);
        // With 64 s between updates the correction is spread over 64 s.
        let slow = DisciplineInput {
            update_interval: 64.0,
            ..input(0.0001)
        };
        d.update(t(64.0), slow);
        assert_eq!(d.next_deadline(), Some(t(64.0 + 64.0)));
    }

    #[test]
    fn an_external_step_restarts_the_step_window_only_during_start_up() {
        let mut d = Discipline::new(DisciplineConfig::default());
        assert_eq!(d.observe_clock(t(0.0), t(0.0)), None);
        d.update(t(0.0), input(0.0));
        assert_eq!(d.observe_clock(t(10.0 + 60.0), t(10.0)), Some(60.0));
        assert_eq!(d.updates(), 0, "inside the window: it starts over");
        for i in 0..3 {
            d.update(t(70.0 + f64::from(i)), input(0.0));
        }
        // Outside the window: the jump is recorded, the window stays closed, and an offset
        // the sources then report is not stepped away.
        assert_eq!(d.observe_clock(t(100.0 + 120.0), t(100.0)), Some(60.0));
        assert_eq!(d.updates(), 3);
        assert!((d.ledger().value_at(d.axis(t(220.0))) - 120.0).abs() < 1e-9);
        let (outcome, actions) = d.update(t(221.0), input(-60.0));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, ClockAction::Step { .. })),
            "{outcome:?} {actions:?}"
        );
    }

    #[test]
    fn drift_import_rejects_out_of_range_values() {
        let mut d = Discipline::new(DisciplineConfig::default());
        let bad = DriftState {
            frequency_ppm: 900.0,
            error_ppm: 1.0,
        };
        assert_eq!(
            d.import_drift(bad, t(0.0)),
            Err(DriftError::OutOfRange(900.0))
        );
        let good = DriftState {
            frequency_ppm: -12.5,
            error_ppm: 0.5,
        };
        assert_eq!(
            d.import_drift(good, t(0.0)),
            Ok(vec![ClockAction::SetFrequency { ppm: -12.5 }])
        );
    }
}
