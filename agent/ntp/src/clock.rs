//! The [`Clock`] trait every backend implements, the [`ClockAction`] values the core emits,
//! and [`SimulatedClock`], a software clock with injected offset, frequency error and wander.

use crate::time::{ClockTime, next_midnight};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What the kernel should do at the end of the current UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum LeapDirective {
    #[default]
    None,
    Insert,
    Delete,
}

/// Synchronization status to publish to the kernel (maxerror/esterror, STA_UNSYNC).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ClockStatus {
    pub synchronized: bool,
    /// Upper bound of the clock error (root distance), seconds.
    pub max_error: f64,
    /// Estimated error, seconds.
    pub est_error: f64,
}

/// Why the discipline refused to act on a measurement; the agent surfaces it as an event,
/// a metric and NotReady, and keeps serving as unsynchronized.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Refusal {
    /// A correction beyond the panic threshold (startup or run time).
    PanicThreshold { offset: f64, threshold: f64 },
    /// An implausible upstream jump that is not (yet) confirmed.
    ImplausibleOffset {
        offset: f64,
        confirmations: u32,
        needed: u32,
    },
}

/// An instruction for the clock backend (or, for `Refuse`, a report for the operator).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ClockAction {
    /// Jump the clock by `offset` seconds (positive: forward).
    Step { offset: f64 },
    /// Set the absolute frequency correction in ppm (positive: the clock runs faster).
    SetFrequency { ppm: f64 },
    /// Arm or disarm the kernel leap second at the end of the UTC day.
    SetLeap(LeapDirective),
    /// Publish synchronization status.
    SetStatus(ClockStatus),
    /// Nothing to apply; report the refusal.
    Refuse(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClockError {
    #[error("clock backend is read-only")]
    ReadOnly,
    #[error("clock adjustment rejected: {0}")]
    Rejected(String),
}

/// A clock the core can read and steer. Object safe so backends can be chosen at run time.
pub trait Clock {
    /// Current time on the disciplined (realtime) clock.
    fn now(&self) -> ClockTime;
    /// A clock that is never stepped (CLOCK_MONOTONIC-like, same frequency corrections);
    /// comparing it with `now` reveals steps made by anyone.
    fn monotonic(&self) -> ClockTime;
    fn step(&mut self, offset: f64) -> Result<(), ClockError>;
    fn set_frequency(&mut self, ppm: f64) -> Result<(), ClockError>;
    fn set_leap(&mut self, leap: LeapDirective) -> Result<(), ClockError>;
    fn set_status(&mut self, status: ClockStatus) -> Result<(), ClockError>;
}

/// Applies one action to a clock; `Refuse` has nothing to apply.
pub fn apply_action(clock: &mut dyn Clock, action: &ClockAction) -> Result<(), ClockError> {
    match *action {
        ClockAction::Step { offset } => clock.step(offset),
        ClockAction::SetFrequency { ppm } => clock.set_frequency(ppm),
        ClockAction::SetLeap(leap) => clock.set_leap(leap),
        ClockAction::SetStatus(status) => clock.set_status(status),
        ClockAction::Refuse(_) => Ok(()),
    }
}

/// Parameters of a [`SimulatedClock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedClockConfig {
    /// Initial local − true time, seconds.
    pub initial_offset: f64,
    /// Oscillator frequency error, ppm (positive: runs fast).
    pub frequency_error_ppm: f64,
    /// Random-walk frequency wander, ppm per √s.
    pub wander_ppm_per_sqrt_s: f64,
    pub seed: u64,
}

impl Default for SimulatedClockConfig {
    fn default() -> Self {
        Self {
            initial_offset: 0.0,
            frequency_error_ppm: 0.0,
            wander_ppm_per_sqrt_s: 0.0,
            seed: 1,
        }
    }
}

/// A software clock driven by a true timescale that the simulation advances.
///
/// Local time = true time + offset, where the offset integrates the oscillator error plus the
/// frequency correction, and jumps on steps and on kernel leap seconds.
#[derive(Debug, Clone)]
pub struct SimulatedClock {
    true_time: ClockTime,
    offset: f64,
    frequency_error_ppm: f64,
    correction_ppm: f64,
    wander_ppm_per_sqrt_s: f64,
    rng: StdRng,
    armed_leap: LeapDirective,
    /// Sum of all jumps (ours, external, leap), so `monotonic` can exclude them.
    jumps_total: f64,
    status: ClockStatus,
    /// Observations for tests.
    pub stats: SimulatedClockStats,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimulatedClockStats {
    pub steps: u32,
    pub backward_steps: u32,
    pub last_step: Option<(ClockTime, f64)>,
    pub leaps_applied: u32,
    pub frequency_sets: u32,
}

impl SimulatedClock {
    pub fn new(start: ClockTime, config: SimulatedClockConfig) -> Self {
        Self {
            true_time: start,
            offset: config.initial_offset,
            frequency_error_ppm: config.frequency_error_ppm,
            correction_ppm: 0.0,
            wander_ppm_per_sqrt_s: config.wander_ppm_per_sqrt_s,
            rng: StdRng::seed_from_u64(config.seed),
            armed_leap: LeapDirective::None,
            jumps_total: 0.0,
            status: ClockStatus::default(),
            stats: SimulatedClockStats::default(),
        }
    }

    /// The true (continuous) time the simulation is at.
    pub fn true_time(&self) -> ClockTime {
        self.true_time
    }

    /// Local − true, seconds.
    pub fn offset(&self) -> f64 {
        self.offset
    }

    pub fn correction_ppm(&self) -> f64 {
        self.correction_ppm
    }

    pub fn frequency_error_ppm(&self) -> f64 {
        self.frequency_error_ppm
    }

    /// Effective rate error (oscillator + correction), ppm.
    pub fn effective_rate_ppm(&self) -> f64 {
        self.frequency_error_ppm + self.correction_ppm
    }

    pub fn status(&self) -> ClockStatus {
        self.status
    }

    pub fn armed_leap(&self) -> LeapDirective {
        self.armed_leap
    }

    /// Someone else (not the discipline) steps the clock.
    pub fn external_step(&mut self, offset: f64) {
        self.offset += offset;
        self.jumps_total += offset;
    }

    /// Moves true time forward, integrating frequency error, correction and wander, and
    /// applying an armed leap second when local time crosses UTC midnight.
    pub fn advance_to(&mut self, true_time: ClockTime) {
        let dt = true_time.secs_since(self.true_time);
        if dt <= 0.0 {
            return;
        }
        let local_before = self.now();
        self.offset += (self.frequency_error_ppm + self.correction_ppm) * 1e-6 * dt;
        if self.wander_ppm_per_sqrt_s > 0.0 {
            self.frequency_error_ppm +=
                self.wander_ppm_per_sqrt_s * dt.sqrt() * standard_normal(&mut self.rng);
        }
        self.true_time = true_time;
        let midnight = next_midnight(local_before);
        if self.armed_leap != LeapDirective::None && self.now() >= midnight {
            let jump = match self.armed_leap {
                LeapDirective::Insert => -1.0,
                LeapDirective::Delete => 1.0,
                LeapDirective::None => 0.0,
            };
            self.offset += jump;
            self.jumps_total += jump;
            self.armed_leap = LeapDirective::None;
            self.stats.leaps_applied += 1;
        }
    }
}

impl Clock for SimulatedClock {
    fn now(&self) -> ClockTime {
        self.true_time.add_secs(self.offset)
    }

    fn monotonic(&self) -> ClockTime {
        self.true_time.add_secs(self.offset - self.jumps_total)
    }

    fn step(&mut self, offset: f64) -> Result<(), ClockError> {
        self.offset += offset;
        self.jumps_total += offset;
        self.stats.steps += 1;
        if offset < 0.0 {
            self.stats.backward_steps += 1;
        }
        self.stats.last_step = Some((self.true_time, offset));
        Ok(())
    }

    fn set_frequency(&mut self, ppm: f64) -> Result<(), ClockError> {
        self.correction_ppm = ppm;
        self.stats.frequency_sets += 1;
        Ok(())
    }

    fn set_leap(&mut self, leap: LeapDirective) -> Result<(), ClockError> {
        self.armed_leap = leap;
        Ok(())
    }

    fn set_status(&mut self, status: ClockStatus) -> Result<(), ClockError> {
        self.status = status;
        Ok(())
    }
}

/// A standard normal deviate (Box–Muller); rand 0.9 alone has no normal distribution.
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frequency_error_accumulates_as_offset() {
        let start = ClockTime::from_unix_secs(1_700_000_000);
        let mut clock = SimulatedClock::new(
            start,
            SimulatedClockConfig {
                frequency_error_ppm: 100.0,
                ..SimulatedClockConfig::default()
            },
        );
        clock.advance_to(start.add_secs(10.0));
        assert!((clock.offset() - 1e-3).abs() < 1e-9);
        clock.set_frequency(-100.0).unwrap();
        clock.advance_to(start.add_secs(20.0));
        assert!((clock.offset() - 1e-3).abs() < 1e-9);
    }

    #[test]
    fn armed_leap_second_is_inserted_once_at_midnight() {
        let before_midnight = ClockTime::from_unix_secs(1_483_228_790);
        let mut clock = SimulatedClock::new(before_midnight, SimulatedClockConfig::default());
        clock.set_leap(LeapDirective::Insert).unwrap();
        clock.advance_to(before_midnight.add_secs(20.0));
        clock.advance_to(before_midnight.add_secs(86_400.0 + 20.0));
        assert_eq!(clock.stats.leaps_applied, 1);
        assert!((clock.offset() + 1.0).abs() < 1e-9);
        // Monotonic time ignores the leap.
        assert_eq!(clock.monotonic(), clock.true_time());
    }
}
