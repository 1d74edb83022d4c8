//! Per-source sample processing: the RFC 5905 8-stage clock filter (minimum-delay pick,
//! peer dispersion, popcorn-spike gate) and a weighted linear regression that turns the
//! accepted samples into an offset prediction, a frequency estimate and its skew.
//!
//! Offsets handed to the filter are *uncorrected* offsets: the measured offset plus every
//! correction the discipline has applied so far (see `discipline::CorrectionLedger`). In that
//! space a source's samples lie on a straight line whose slope is the oscillator's frequency
//! error, whatever steps and slews happened in between, so old samples stay useful after a
//! correction and the regression slope is directly the frequency correction to apply.

use crate::time::{ClockTime, PHI};
use serde::{Deserialize, Serialize};

/// Number of clock-filter stages (RFC 5905 NSTAGE).
pub const FILTER_STAGES: usize = 8;
/// Number of samples kept for the frequency regression.
pub const REGRESSION_POINTS: usize = 16;
/// Popcorn-spike gate in multiples of the jitter (RFC 5905 SGATE).
pub const SPIKE_GATE: f64 = 3.0;
/// Dispersion of an empty stage (RFC 5905 MAXDISP), seconds.
pub const MAX_DISPERSION: f64 = 16.0;
/// The runs test never trims the regression below this many points.
const MIN_POINTS_AFTER_TRIM: usize = 6;
/// Noise floor so a perfectly quiet source does not get infinite weight.
const OFFSET_NOISE_FLOOR: f64 = 1e-6;

/// One measurement as the filter sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FilterSample {
    /// Receive time on the step-free local axis.
    pub time: ClockTime,
    /// Measured offset plus all corrections applied so far, seconds.
    pub uncorrected_offset: f64,
    /// Round-trip delay, seconds (already clamped to be non-negative).
    pub delay: f64,
    /// Dispersion at measurement time (ε: precisions + PHI·round trip), seconds.
    pub dispersion: f64,
}

/// What the filter did with a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterVerdict {
    Accepted,
    /// Discarded as a popcorn spike (kept aside in case the next sample confirms it).
    Spike,
    /// Confirmed by a second consecutive outlier: history was reset to follow the jump.
    JumpFollowed,
}

/// The source's state estimate derived from its samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SourceEstimate {
    /// Predicted uncorrected offset at the query time, seconds.
    pub uncorrected_offset: f64,
    /// Regression slope: the frequency correction this source suggests, ppm.
    pub frequency_ppm: f64,
    /// Standard error of `frequency_ppm`, ppm (infinite with fewer than two samples).
    pub skew_ppm: f64,
    /// Standard error of the offset prediction, seconds.
    pub offset_error: f64,
    /// Delay of the minimum-delay stage, seconds.
    pub delay: f64,
    /// Peer dispersion at the query time, seconds.
    pub dispersion: f64,
    /// RMS residual of the samples around the regression line, seconds.
    pub jitter: f64,
    /// Samples in the regression.
    pub samples: usize,
    /// Time of the newest accepted sample.
    pub last_sample: ClockTime,
}

#[derive(Debug, Clone, Default)]
pub struct ClockFilter {
    /// Newest first.
    stages: Vec<FilterSample>,
    /// Oldest first, at most `REGRESSION_POINTS`.
    points: Vec<FilterSample>,
    pending_spike: Option<FilterSample>,
    jitter: f64,
    /// |prediction error| of the last sample in units of jitter (how well the model held
    /// over the last poll interval).
    last_residual_ratio: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Fit {
    mean_x: f64,
    mean_y: f64,
    slope: f64,
    sum_w: f64,
    sxx: f64,
    residual_scale: f64,
    jitter: f64,
}

impl ClockFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything (after external clock meddling or a reconfiguration).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn sample_count(&self) -> usize {
        self.points.len()
    }

    /// How far the last sample fell from the prediction, in units of jitter.
    pub fn last_residual_ratio(&self) -> Option<f64> {
        self.last_residual_ratio
    }

    /// Feeds one sample; returns whether it was used.
    pub fn add(&mut self, sample: FilterSample) -> FilterVerdict {
        self.stages.insert(0, sample);
        self.stages.truncate(FILTER_STAGES);

        self.last_residual_ratio = None;
        if let Some(fit) = self.fit() {
            let predicted = fit.predict(sample.time, self.reference_time());
            let residual = sample.uncorrected_offset - predicted;
            if self.points.len() >= 3 {
                self.last_residual_ratio =
                    Some(residual.abs() / fit.jitter.max(self.noise_floor()));
            }
            let excess = (sample.delay - self.min_delay()).max(0.0);
            let gate = SPIKE_GATE * fit.jitter.max(self.noise_floor()) + excess / 2.0;
            if residual.abs() > gate && self.points.len() >= 3 {
                return self.handle_outlier(sample, fit);
            }
        }
        self.pending_spike = None;
        self.push_point(sample);
        FilterVerdict::Accepted
    }

    /// A first outlier is held back; a second that agrees with it is a genuine jump
    /// (upstream step, or our clock was changed), so history restarts from the two of them.
    fn handle_outlier(&mut self, sample: FilterSample, fit: Fit) -> FilterVerdict {
        match self.pending_spike.take() {
            Some(previous) => {
                let drift = fit.slope * sample.time.secs_since(previous.time);
                let disagreement =
                    (sample.uncorrected_offset - previous.uncorrected_offset - drift).abs();
                let tolerance = SPIKE_GATE * fit.jitter.max(self.noise_floor())
                    + (sample.delay.max(previous.delay) - self.min_delay()).max(0.0);
                if disagreement <= tolerance {
                    // A phase jump leaves the frequency alone: shift history by the jump
                    // instead of discarding it, so the slope survives.
                    let jump = previous.uncorrected_offset
                        - fit.predict(previous.time, self.reference_time());
                    for point in &mut self.points {
                        point.uncorrected_offset += jump;
                    }
                    self.push_point(previous);
                    self.push_point(sample);
                    FilterVerdict::JumpFollowed
                } else {
                    self.pending_spike = Some(sample);
                    FilterVerdict::Spike
                }
            }
            None => {
                self.pending_spike = Some(sample);
                FilterVerdict::Spike
            }
        }
    }

    fn push_point(&mut self, sample: FilterSample) {
        if self.points.len() == REGRESSION_POINTS {
            self.points.remove(0);
        }
        self.points.push(sample);
        // Wander makes old points lie off today's line: when the residuals' signs come in
        // too few runs to be noise (Wald–Wolfowitz runs test, as chrony does), the oldest
        // points no longer fit and are dropped.
        while self.points.len() > MIN_POINTS_AFTER_TRIM && self.residuals_trend() {
            self.points.remove(0);
        }
        if let Some(fit) = self.fit() {
            self.jitter = fit.jitter;
        }
    }

    /// Whether the residual signs form significantly fewer runs than random noise would.
    fn residuals_trend(&self) -> bool {
        let Some(fit) = self.fit() else {
            return false;
        };
        let reference = self.reference_time();
        let mut positive = 0usize;
        let mut negative = 0usize;
        let mut runs = 0usize;
        let mut last_sign = None;
        for p in &self.points {
            let sign = p.uncorrected_offset >= fit.predict(p.time, reference);
            if sign {
                positive += 1;
            } else {
                negative += 1;
            }
            if last_sign != Some(sign) {
                runs += 1;
                last_sign = Some(sign);
            }
        }
        if positive == 0 || negative == 0 {
            return self.points.len() >= 8;
        }
        let n = (positive + negative) as f64;
        let (np, nn) = (positive as f64, negative as f64);
        let expected = 2.0 * np * nn / n + 1.0;
        let variance = (expected - 1.0) * (expected - 2.0) / (n - 1.0);
        (runs as f64) < expected - 2.0 * variance.max(0.0).sqrt()
    }

    fn min_delay(&self) -> f64 {
        self.stages
            .iter()
            .map(|s| s.delay)
            .fold(f64::INFINITY, f64::min)
    }

    /// Offset noise expected from delay asymmetry: a twentieth of the minimum round trip.
    fn noise_floor(&self) -> f64 {
        let min_delay = self.min_delay();
        if min_delay.is_finite() {
            (min_delay / 20.0).max(OFFSET_NOISE_FLOOR)
        } else {
            OFFSET_NOISE_FLOOR
        }
    }

    fn reference_time(&self) -> ClockTime {
        self.points.last().map_or(ClockTime::EPOCH, |p| p.time)
    }

    /// Weight of a sample: samples whose delay exceeds the minimum carry up to half the excess
    /// as asymmetry error, so they count for less.
    fn weight(&self, sample: &FilterSample, min_delay: f64) -> f64 {
        let sigma =
            self.noise_floor() + sample.dispersion + (sample.delay - min_delay).max(0.0) / 2.0;
        1.0 / (sigma * sigma)
    }

    fn fit(&self) -> Option<Fit> {
        let reference = self.reference_time();
        let min_delay = self
            .points
            .iter()
            .map(|p| p.delay)
            .fold(f64::INFINITY, f64::min);
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let mut sum_w = 0.0;
        let mut sum_wx = 0.0;
        let mut sum_wy = 0.0;
        for p in &self.points {
            let w = self.weight(p, min_delay);
            sum_w += w;
            sum_wx += w * p.time.secs_since(reference);
            sum_wy += w * p.uncorrected_offset;
        }
        let mean_x = sum_wx / sum_w;
        let mean_y = sum_wy / sum_w;
        let mut sxx = 0.0;
        let mut sxy = 0.0;
        for p in &self.points {
            let w = self.weight(p, min_delay);
            let dx = p.time.secs_since(reference) - mean_x;
            sxx += w * dx * dx;
            sxy += w * dx * (p.uncorrected_offset - mean_y);
        }
        let slope = if n >= 2 && sxx > 0.0 { sxy / sxx } else { 0.0 };
        let mut weighted_sq = 0.0;
        let mut plain_sq = 0.0;
        for p in &self.points {
            let w = self.weight(p, min_delay);
            let r =
                p.uncorrected_offset - (mean_y + slope * (p.time.secs_since(reference) - mean_x));
            weighted_sq += w * r * r;
            plain_sq += r * r;
        }
        let (residual_scale, jitter) = if n > 2 {
            let dof = (n - 2) as f64;
            (
                (weighted_sq / dof).max(0.25),
                (plain_sq / dof).sqrt().max(self.noise_floor()),
            )
        } else {
            (1.0, self.noise_floor())
        };
        Some(Fit {
            mean_x,
            mean_y,
            slope,
            sum_w,
            sxx,
            residual_scale,
            jitter,
        })
    }

    /// Peer dispersion: the RFC 5905 weighting Σ ε_i / 2^(i+1) over stages sorted by delay,
    /// each grown by PHI since it was taken, normalised over the stages present. RFC 5905
    /// counts missing stages as MAXDISP so that a young source is unusable; here a young
    /// source's uncertainty is carried by the regression's prediction error instead
    /// (`offset_error`), which lets three agreeing first samples outvote a liar at once.
    fn peer_dispersion(&self, now: ClockTime) -> f64 {
        let mut sorted: Vec<&FilterSample> = self.stages.iter().collect();
        sorted.sort_by(|a, b| a.delay.total_cmp(&b.delay));
        let mut dispersion = 0.0;
        let mut total_weight = 0.0;
        let mut factor = 0.5;
        for stage in sorted {
            let grown = stage.dispersion + PHI * now.secs_since(stage.time).max(0.0);
            dispersion += grown.min(MAX_DISPERSION) * factor;
            total_weight += factor;
            factor /= 2.0;
        }
        if total_weight > 0.0 {
            dispersion / total_weight
        } else {
            MAX_DISPERSION
        }
    }

    /// The estimate at `now` (step-free local axis), or `None` before the first sample.
    pub fn estimate(&self, now: ClockTime) -> Option<SourceEstimate> {
        let fit = self.fit()?;
        let reference = self.reference_time();
        let x_now = now.secs_since(reference);
        let n = self.points.len();
        let skew = if n >= 2 && fit.sxx > 0.0 {
            (fit.residual_scale / fit.sxx).sqrt() * 1e6
        } else {
            f64::INFINITY
        };
        let mut offset_var = fit.residual_scale / fit.sum_w;
        if fit.sxx > 0.0 {
            offset_var += fit.residual_scale * (x_now - fit.mean_x).powi(2) / fit.sxx;
        } else {
            // One sample: the frequency is unknown, so the prediction may drift at up to the
            // largest frequency error we correct.
            offset_var += (crate::discipline::MAX_FREQUENCY_PPM * 1e-6 * x_now).powi(2);
        }
        let pick = self
            .stages
            .iter()
            .min_by(|a, b| a.delay.total_cmp(&b.delay))?;
        Some(SourceEstimate {
            uncorrected_offset: fit.predict(now, reference),
            frequency_ppm: fit.slope * 1e6,
            skew_ppm: skew,
            offset_error: offset_var.sqrt(),
            delay: pick.delay,
            dispersion: self.peer_dispersion(now),
            jitter: self.jitter.max(fit.jitter),
            samples: n,
            last_sample: reference,
        })
    }
}

impl Fit {
    fn predict(&self, time: ClockTime, reference: ClockTime) -> f64 {
        self.mean_y + self.slope * (time.secs_since(reference) - self.mean_x)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample(t: f64, offset: f64, delay: f64) -> FilterSample {
        FilterSample {
            time: ClockTime::from_secs_f64(1000.0 + t),
            uncorrected_offset: offset,
            delay,
            dispersion: 1e-6,
        }
    }

    #[test]
    fn regression_slope_recovers_frequency_error() {
        let mut filter = ClockFilter::new();
        for i in 0..10 {
            let t = f64::from(i) * 16.0;
            assert_eq!(
                filter.add(sample(t, 0.01 - 50e-6 * t, 1e-3)),
                FilterVerdict::Accepted
            );
        }
        let est = filter
            .estimate(ClockTime::from_secs_f64(1000.0 + 160.0))
            .unwrap();
        assert!((est.frequency_ppm + 50.0).abs() < 1e-6);
        assert!((est.uncorrected_offset - (0.01 - 50e-6 * 160.0)).abs() < 1e-9);
    }

    #[test]
    fn single_popcorn_spike_is_dropped_but_a_confirmed_jump_is_followed() {
        let mut filter = ClockFilter::new();
        for i in 0..8 {
            filter.add(sample(f64::from(i) * 16.0, 1e-5 * f64::from(i % 2), 1e-3));
        }
        assert_eq!(
            filter.add(sample(8.0 * 16.0, 0.2, 1e-3)),
            FilterVerdict::Spike
        );
        assert_eq!(
            filter.add(sample(9.0 * 16.0, 0.0, 1e-3)),
            FilterVerdict::Accepted
        );
        assert_eq!(
            filter.add(sample(10.0 * 16.0, 0.2, 1e-3)),
            FilterVerdict::Spike
        );
        assert_eq!(
            filter.add(sample(11.0 * 16.0, 0.2, 1e-3)),
            FilterVerdict::JumpFollowed
        );
        let est = filter
            .estimate(ClockTime::from_secs_f64(1000.0 + 11.0 * 16.0))
            .unwrap();
        assert!((est.uncorrected_offset - 0.2).abs() < 1e-6);
    }

    #[test]
    fn dispersion_grows_at_phi_while_no_samples_arrive() {
        let mut filter = ClockFilter::new();
        for i in 0..8 {
            filter.add(sample(f64::from(i), 0.0, 1e-3));
        }
        let fresh = filter.estimate(ClockTime::from_secs_f64(1007.0)).unwrap();
        let later = filter
            .estimate(ClockTime::from_secs_f64(1007.0 + 1000.0))
            .unwrap();
        assert!(fresh.dispersion < 1e-4);
        assert!((later.dispersion - fresh.dispersion - PHI * 1000.0).abs() < 1e-6);
        assert!(later.offset_error > fresh.offset_error);
    }
}
