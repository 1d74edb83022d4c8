//! Leap-second handling: turning the survivors' majority vote into one scheduled leap at
//! the end of the UTC month, arming the kernel on the last day (kernel mode), or computing the
//! linear smear the discipline follows instead (smear mode).
//!
//! Smear: a leap of sign s (+1 insert, −1 delete) is spread linearly over a window of W
//! seconds centred on the leap (Google's noon-to-noon with the default 24 h). Before the leap
//! the local clock should be behind UTC by s·S(t), S rising 0 → 1 over the window; after UTC
//! has taken the leap the target offset is s·(S(t) − 1). The discipline subtracts this target
//! from measured offsets and adds the smear rate −s/W as a feed-forward frequency, so the clock
//! never steps and its rate moves by exactly 1/W (11.6 ppm for 24 h).

use crate::clock::{ClockAction, LeapDirective};
use crate::packet::LeapIndicator;
use crate::time::{CivilDate, ClockTime, SECS_PER_DAY, next_midnight};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LeapMode {
    /// Arm the kernel (STA_INS/STA_DEL); it inserts or deletes the second at midnight.
    #[default]
    Kernel,
    /// Slew the leap away linearly over the smear window; never step.
    Smear,
    /// Do nothing; the ordinary discipline corrects the 1 s error afterwards.
    Ignore,
}

/// A leap second that a majority of survivors announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledLeap {
    /// UTC midnight (pre-leap POSIX scale) at which the leap takes effect.
    pub at: ClockTime,
    pub direction: LeapDirective,
}

/// Leap state machine owned by the `System`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeapState {
    mode: LeapMode,
    smear_window: f64,
    scheduled: Option<ScheduledLeap>,
    kernel_armed: bool,
    applied: u32,
    /// Votes before this instant are stale announcements of the leap just taken.
    quiet_until: Option<ClockTime>,
}

impl LeapState {
    pub fn new(mode: LeapMode, smear_window: f64) -> Self {
        Self {
            mode,
            smear_window: smear_window.max(1.0),
            scheduled: None,
            kernel_armed: false,
            applied: 0,
            quiet_until: None,
        }
    }

    pub fn reconfigure(&mut self, mode: LeapMode, smear_window: f64) {
        self.mode = mode;
        self.smear_window = smear_window.max(1.0);
    }

    pub fn scheduled(&self) -> Option<ScheduledLeap> {
        self.scheduled
    }

    /// Leaps that took effect while scheduled here.
    pub fn applied(&self) -> u32 {
        self.applied
    }

    /// Leap indicator to publish downstream (suppressed while smearing).
    pub fn indicator(&self) -> LeapIndicator {
        match (self.mode, self.scheduled) {
            (LeapMode::Smear, _) | (_, None) => LeapIndicator::NoWarning,
            (_, Some(leap)) => match leap.direction {
                LeapDirective::Insert => LeapIndicator::Insert,
                LeapDirective::Delete => LeapIndicator::Delete,
                LeapDirective::None => LeapIndicator::NoWarning,
            },
        }
    }

    /// Whether a smear is in progress at local time `now`.
    pub fn smearing(&self, now: ClockTime) -> bool {
        self.smear_rate_ppm(now) != 0.0
    }

    /// Records the survivors' vote at local time `now` and returns kernel actions.
    pub fn update(&mut self, now: ClockTime, vote: LeapIndicator) -> Vec<ClockAction> {
        let mut actions = Vec::new();
        let direction = match vote {
            LeapIndicator::Insert => LeapDirective::Insert,
            LeapIndicator::Delete => LeapDirective::Delete,
            LeapIndicator::NoWarning | LeapIndicator::Unknown => LeapDirective::None,
        };
        match (self.scheduled, direction) {
            (None, LeapDirective::Insert | LeapDirective::Delete) => {
                let at = end_of_month(now);
                // A vote just after a leap is the servers still announcing the old one.
                if self.quiet_until.is_none_or(|quiet| now >= quiet) {
                    self.scheduled = Some(ScheduledLeap { at, direction });
                }
            }
            (Some(leap), LeapDirective::None) if now < leap.at.add_secs(-self.smear_half()) => {
                // The majority withdrew the announcement before anything happened.
                self.scheduled = None;
                if self.kernel_armed {
                    self.kernel_armed = false;
                    actions.push(ClockAction::SetLeap(LeapDirective::None));
                }
            }
            _ => {}
        }
        actions.extend(self.on_timer(now));
        actions
    }

    /// Arms the kernel on the last day and retires the leap once it is past.
    pub fn on_timer(&mut self, now: ClockTime) -> Vec<ClockAction> {
        let mut actions = Vec::new();
        let Some(leap) = self.scheduled else {
            return actions;
        };
        if self.mode == LeapMode::Kernel
            && !self.kernel_armed
            && now >= leap.at.add_secs(-(SECS_PER_DAY as f64))
            && now < leap.at
        {
            self.kernel_armed = true;
            actions.push(ClockAction::SetLeap(leap.direction));
        }
        let retire_at = leap.at.add_secs(self.smear_half().max(1.0) + 1.0);
        if now >= retire_at {
            self.scheduled = None;
            self.kernel_armed = false;
            self.applied += 1;
            self.quiet_until = Some(now.add_secs(SECS_PER_DAY as f64));
        }
        actions
    }

    /// The next instant `on_timer` has something to do.
    pub fn next_deadline(&self) -> Option<ClockTime> {
        let leap = self.scheduled?;
        let arm_at = leap.at.add_secs(-(SECS_PER_DAY as f64));
        let retire_at = leap.at.add_secs(self.smear_half().max(1.0) + 1.0);
        Some(
            if self.mode == LeapMode::Kernel && !self.kernel_armed && arm_at < leap.at {
                arm_at
            } else {
                retire_at
            },
        )
    }

    fn smear_half(&self) -> f64 {
        if self.mode == LeapMode::Smear {
            self.smear_window / 2.0
        } else {
            0.0
        }
    }

    fn sign_and_progress(&self, now: ClockTime) -> Option<(f64, f64, ScheduledLeap)> {
        if self.mode != LeapMode::Smear {
            return None;
        }
        let leap = self.scheduled?;
        let sign = match leap.direction {
            LeapDirective::Insert => 1.0,
            LeapDirective::Delete => -1.0,
            LeapDirective::None => return None,
        };
        let start = leap.at.add_secs(-self.smear_half());
        // Unclamped, so callers can tell "at the start" from "before the window".
        let progress = now.secs_since(start) / self.smear_window;
        Some((sign, progress, leap))
    }

    /// Offset (true − local, seconds) the smear wants at local time `now`.
    pub fn smear_target(&self, now: ClockTime) -> f64 {
        let Some((sign, progress, leap)) = self.sign_and_progress(now) else {
            return 0.0;
        };
        let progress = progress.clamp(0.0, 1.0);
        // UTC has taken the leap once local time plus the smear offset reaches midnight.
        let utc_estimate = now.add_secs(sign * progress);
        let taken = if utc_estimate >= leap.at { 1.0 } else { 0.0 };
        sign * (progress - taken)
    }

    /// Feed-forward frequency of the smear at `now`, ppm.
    pub fn smear_rate_ppm(&self, now: ClockTime) -> f64 {
        match self.sign_and_progress(now) {
            Some((sign, progress, _)) if (0.0..1.0).contains(&progress) => {
                -sign * 1e6 / self.smear_window
            }
            _ => 0.0,
        }
    }

    /// Boundaries where the smear rate changes (start and end of the window).
    pub fn smear_edges(&self) -> Option<(ClockTime, ClockTime)> {
        let leap = self.scheduled?;
        (self.mode == LeapMode::Smear).then(|| {
            (
                leap.at.add_secs(-self.smear_half()),
                leap.at.add_secs(self.smear_half()),
            )
        })
    }
}

/// The UTC midnight that ends the month containing `now`.
pub fn end_of_month(now: ClockTime) -> ClockTime {
    let mut midnight = next_midnight(now);
    // At most 31 iterations; walks day by day to the last day of the month.
    while !CivilDate::of(midnight.add_secs(-1.0)).is_last_day_of_month() {
        midnight = midnight.add_secs(SECS_PER_DAY as f64);
    }
    midnight
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2016-12-31T00:00:00Z, the last day before a real leap second.
    const LAST_DAY: i64 = 1_483_142_400;

    #[test]
    fn announcement_schedules_the_leap_at_the_end_of_the_month() {
        let mid_month = ClockTime::from_unix_secs(LAST_DAY - 10 * 86_400);
        let mut leap = LeapState::new(LeapMode::Kernel, 86_400.0);
        assert!(leap.update(mid_month, LeapIndicator::Insert).is_empty());
        assert_eq!(
            leap.scheduled().map(|l| l.at),
            Some(ClockTime::from_unix_secs(LAST_DAY + 86_400))
        );
        let actions = leap.on_timer(ClockTime::from_unix_secs(LAST_DAY + 60));
        assert_eq!(actions, vec![ClockAction::SetLeap(LeapDirective::Insert)]);
        assert!(
            leap.on_timer(ClockTime::from_unix_secs(LAST_DAY + 120))
                .is_empty()
        );
    }

    #[test]
    fn smear_target_is_continuous_and_ends_at_zero() {
        let mut leap = LeapState::new(LeapMode::Smear, 86_400.0);
        let noon = ClockTime::from_unix_secs(LAST_DAY + 43_200);
        leap.update(noon.add_secs(-3600.0), LeapIndicator::Insert);
        assert_eq!(leap.smear_target(noon), 0.0);
        let midnight = ClockTime::from_unix_secs(LAST_DAY + 86_400);
        let before = leap.smear_target(midnight.add_secs(-0.6));
        let after = leap.smear_target(midnight.add_secs(-0.4));
        assert!((before - 0.5).abs() < 1e-3);
        assert!((after + 0.5).abs() < 1e-3);
        assert!(leap.smear_target(midnight.add_secs(43_200.0)).abs() < 1e-9);
        assert!((leap.smear_rate_ppm(midnight) + 1e6 / 86_400.0).abs() < 1e-9);
    }
}
