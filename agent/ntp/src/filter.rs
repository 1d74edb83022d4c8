//! Per-source sample processing: the RFC 5905 8-stage clock filter (minimum-delay pick,
//! peer dispersion, popcorn-spike gate) and a weighted linear regression that turns the
//! accepted samples into an offset prediction, a frequency estimate and its skew.
//!
//! Offsets handed to the filter are *uncorrected* offsets: the measured offset plus every
//! correction the discipline has applied so far (see `discipline::CorrectionLedger`). In that
//! space a source's samples lie on a straight line whose slope is the oscillator's frequency
//! error, whatever steps and slews happened in between, so old samples stay useful after a
//! correction and the regression slope is directly the frequency correction to apply.
//!
//! # Path changes are calibrated, not followed
//!
//! A route change that lengthens one direction by Δ moves every later measured offset by
//! Δ/2 although no clock moved. The delay says so: it steps by Δ at the same moment. When
//! [`PATH_CONFIRMATIONS`] consecutive samples agree on a new delay level and on an offset
//! shift that the delay step can explain (|shift| ≤ |Δ|/2), the filter records the new path
//! with its shift as that path's asymmetry and removes it from the path's samples, instead of
//! following the jump as it would an upstream step (which leaves the delay alone). The slope,
//! and so the frequency, keeps being tracked through the new path; when the old route comes
//! back its samples need no correction. NTP cannot know a path's absolute asymmetry; what it
//! can do is not let a change of route move the clock. The samples in between are held, so a
//! lone queueing spike (the same signature, but not repeated) is dropped.

use crate::time::{ClockTime, PHI};
use serde::{Deserialize, Serialize};

/// Number of clock-filter stages (RFC 5905 NSTAGE).
pub const FILTER_STAGES: usize = 8;
/// Number of samples kept for the frequency regression.
pub const REGRESSION_POINTS: usize = 32;
/// Popcorn-spike gate in multiples of the jitter (RFC 5905 SGATE).
pub const SPIKE_GATE: f64 = 3.0;
/// Dispersion of an empty stage (RFC 5905 MAXDISP), seconds.
pub const MAX_DISPERSION: f64 = 16.0;
/// The runs test never trims the regression below this many points.
const MIN_POINTS_AFTER_TRIM: usize = 6;
/// Noise floor so a perfectly quiet source does not get infinite weight.
const OFFSET_NOISE_FLOOR: f64 = 1e-6;
/// Consecutive refused samples after which the model, not the samples, is taken to be wrong.
pub const MAX_REJECTED_RUN: usize = FILTER_STAGES / 2;
/// Consecutive samples that must agree on a new path before it is calibrated.
pub const PATH_CONFIRMATIONS: usize = 3;
/// A delay further than this many median absolute deviations from the path's typical delay
/// is off the path.
const PATH_DELAY_GATE: f64 = 8.0;
/// ... and further than this fraction of the typical delay (loopback-quiet paths have a
/// deviation of microseconds)...
const PATH_DELAY_GATE_RATIO: f64 = 0.25;
/// ... and at least this far, seconds.
const MIN_PATH_STEP: f64 = 100e-6;
/// Calibrated paths remembered besides the base path (least recently seen forgotten first).
const MAX_PATHS: usize = 4;
/// Accepted points needed before the filter judges paths: the typical delay needs a few.
const MIN_POINTS_FOR_PATHS: usize = 6;
/// Recent points whose delays make the typical delay.
const TYPICAL_DELAY_POINTS: usize = 8;

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
    /// Off every known path, with an offset shift its delay change could explain: held
    /// until the next samples confirm a new path (or dropped, as a queueing spike).
    PathHeld,
    /// Confirmed a new path: its asymmetry was calibrated and the held samples used.
    PathCalibrated,
    /// [`MAX_REJECTED_RUN`] samples in a row missed the model but agreed with each other:
    /// history restarted from them.
    Restarted,
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
    /// Runs of residuals of one sign around the regression line (chronyc's NR): few runs for
    /// many samples mean the line no longer fits them.
    pub residual_runs: usize,
    /// Seconds from the oldest to the newest sample in the regression.
    pub span: f64,
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
    /// Consecutive samples refused as spikes or held as off-path, oldest first.
    rejected_run: Vec<FilterSample>,
    jitter: f64,
    /// |prediction error| of the last sample in units of jitter (how well the model held
    /// over the last poll interval).
    last_residual_ratio: Option<f64>,
    /// Calibrated paths other than the base path.
    paths: Vec<PathLevel>,
    /// Samples off every known path, with their raw residuals, newest last.
    path_candidates: Vec<(FilterSample, f64)>,
}

/// A route that differs from the base path: how much longer its round trip is, and the
/// offset shift (its asymmetry relative to the base path) removed from its samples.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PathLevel {
    delay_shift: f64,
    bias: f64,
    last_seen: ClockTime,
}

/// How the residuals' signs fall: counts and runs of one sign.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ResidualSigns {
    positive: usize,
    negative: usize,
    runs: usize,
}

/// The base path's usual round trip and how far it wanders, from recent accepted points.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TypicalDelay {
    median: f64,
    /// How far a delay may be from `median` and still be on the same path.
    gate: f64,
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
    pub fn add(&mut self, raw: FilterSample) -> FilterVerdict {
        let verdict = self.judge(raw);
        if !matches!(verdict, FilterVerdict::Spike | FilterVerdict::PathHeld) {
            self.rejected_run.clear();
            return verdict;
        }
        self.rejected_run.push(raw);
        if self.rejected_run.len() < MAX_REJECTED_RUN {
            return verdict;
        }
        if !self.rejected_run_is_consistent() {
            // A burst of noise: keep refusing it, and keep judging the newest run.
            self.rejected_run.remove(0);
            return verdict;
        }
        // When recent samples agree with each other but every one misses the model, the model
        // is what is wrong (a wild slope from a noisy burst, a change nothing above explains):
        // start again from them.
        let restart_from = std::mem::take(&mut self.rejected_run);
        let stages = std::mem::take(&mut self.stages);
        *self = Self::default();
        self.stages = stages;
        for sample in restart_from {
            self.push_point(sample);
        }
        FilterVerdict::Restarted
    }

    /// Whether the refused run lies on a line of its own, within the jitter the source has
    /// shown so far.
    fn rejected_run_is_consistent(&self) -> bool {
        let Some(first) = self.rejected_run.first() else {
            return false;
        };
        let xyw: Vec<(f64, f64, f64)> = self
            .rejected_run
            .iter()
            .map(|s| (s.time.secs_since(first.time), s.uncorrected_offset, 1.0))
            .collect();
        let line = Line::through(&xyw);
        let rms = (line.plain_sq / (xyw.len() as f64 - 2.0).max(1.0)).sqrt();
        rms <= SPIKE_GATE * self.jitter.max(self.noise_floor())
    }

    fn judge(&mut self, raw: FilterSample) -> FilterVerdict {
        self.stages.insert(0, raw);
        self.stages.truncate(FILTER_STAGES);

        self.last_residual_ratio = None;
        let Some(fit) = self.fit() else {
            self.push_point(raw);
            return FilterVerdict::Accepted;
        };
        let predicted = fit.predict(raw.time, self.reference_time());
        let typical = self.typical_delay();
        let sample = match typical {
            Some(typical) => self.onto_known_path(raw, typical),
            None => raw,
        };
        let residual = sample.uncorrected_offset - predicted;
        let scale = fit.jitter.max(self.noise_floor());
        if self.points.len() >= 3 {
            self.last_residual_ratio = Some(residual.abs() / scale);
        }
        if let Some(typical) = typical {
            let raw_residual = raw.uncorrected_offset - predicted;
            if let Some(verdict) = self.judge_path(raw, sample, raw_residual, typical, scale) {
                return verdict;
            }
        }
        // The gate counts the prediction's own uncertainty: three iburst samples seconds
        // apart fix the slope only to hundreds of ppm, and a gate of sample jitter alone would
        // then refuse every later sample as a spike, for ever.
        let excess = (sample.delay - self.min_delay()).max(0.0);
        let spread = scale.hypot(fit.prediction_error(raw.time, self.reference_time()));
        let gate = SPIKE_GATE * spread + excess / 2.0;
        if residual.abs() > gate && self.points.len() >= 3 {
            return self.handle_outlier(sample, fit);
        }
        self.pending_spike = None;
        self.push_point(sample);
        FilterVerdict::Accepted
    }

    /// The base path's typical delay, once there are enough points to know it.
    fn typical_delay(&self) -> Option<TypicalDelay> {
        if self.points.len() < MIN_POINTS_FOR_PATHS {
            return None;
        }
        let recent = &self.points[self.points.len().saturating_sub(TYPICAL_DELAY_POINTS)..];
        let mut delays: Vec<f64> = recent.iter().map(|p| p.delay).collect();
        let typical = median(&mut delays);
        let mut deviations: Vec<f64> = delays.iter().map(|d| (d - typical).abs()).collect();
        let deviation = median(&mut deviations);
        let gate = (PATH_DELAY_GATE * deviation)
            .max(PATH_DELAY_GATE_RATIO * typical)
            .max(MIN_PATH_STEP);
        Some(TypicalDelay {
            median: typical,
            gate,
        })
    }

    /// The sample as seen on the base path: if its delay puts it on a calibrated path (nearer
    /// that path's delay than the base path's), that path's asymmetry is removed from its
    /// offset and its delay counts only by how much it exceeds that path's usual delay.
    fn onto_known_path(&mut self, raw: FilterSample, typical: TypicalDelay) -> FilterSample {
        let base_distance = (raw.delay - typical.median).abs();
        let nearest = self
            .paths
            .iter_mut()
            .map(|path| {
                let distance = (raw.delay - typical.median - path.delay_shift).abs();
                (path, distance)
            })
            .filter(|(_, distance)| *distance <= typical.gate && *distance < base_distance)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        match nearest {
            Some((path, _)) => {
                path.last_seen = raw.time;
                FilterSample {
                    uncorrected_offset: raw.uncorrected_offset - path.bias,
                    delay: typical.median
                        + (raw.delay - typical.median - path.delay_shift).max(0.0),
                    ..raw
                }
            }
            None => raw,
        }
    }

    /// Holds samples that are off every known path with an offset shift their delay change
    /// explains, and calibrates a new path once [`PATH_CONFIRMATIONS`] of them agree.
    /// `None`: the sample is for the ordinary gate.
    fn judge_path(
        &mut self,
        raw: FilterSample,
        sample: FilterSample,
        raw_residual: f64,
        typical: TypicalDelay,
        scale: f64,
    ) -> Option<FilterVerdict> {
        let delay_step = raw.delay - typical.median;
        let off_path = (sample.delay - typical.median).abs() > typical.gate;
        let shifted = raw_residual.abs() > SPIKE_GATE * scale;
        let explained = raw_residual.abs() <= delay_step.abs() / 2.0 + SPIKE_GATE * scale;
        if !(off_path && shifted && explained) {
            self.path_candidates.clear();
            return None;
        }
        self.path_candidates.push((raw, raw_residual));
        // Only a run that agrees on the delay and the shift counts as one new path.
        while self.path_candidates.len() > 1 && !self.newest_candidates_agree(typical, scale) {
            self.path_candidates.remove(0);
        }
        if self.path_candidates.len() < PATH_CONFIRMATIONS {
            return Some(FilterVerdict::PathHeld);
        }
        let held = std::mem::take(&mut self.path_candidates);
        let count = held.len() as f64;
        let delay_shift = held.iter().map(|(c, _)| c.delay).sum::<f64>() / count - typical.median;
        let bias = held.iter().map(|(_, r)| r).sum::<f64>() / count;
        self.remember_path(
            PathLevel {
                delay_shift,
                bias,
                last_seen: raw.time,
            },
            typical,
        );
        self.pending_spike = None;
        for (candidate, _) in held {
            let normalised = self.onto_known_path(candidate, typical);
            self.push_point(normalised);
        }
        Some(FilterVerdict::PathCalibrated)
    }

    /// Whether every held candidate agrees with the newest on delay and offset shift.
    fn newest_candidates_agree(&self, typical: TypicalDelay, scale: f64) -> bool {
        let Some(&(newest, newest_residual)) = self.path_candidates.last() else {
            return true;
        };
        self.path_candidates.iter().all(|(c, r)| {
            let delay_gap = (c.delay - newest.delay).abs();
            delay_gap <= typical.gate
                && (r - newest_residual).abs() <= 2.0 * SPIKE_GATE * scale + delay_gap / 2.0
        })
    }

    /// Records a calibrated path, replacing one at the same delay, forgetting the least
    /// recently seen when there are too many.
    fn remember_path(&mut self, path: PathLevel, typical: TypicalDelay) {
        self.paths
            .retain(|known| (known.delay_shift - path.delay_shift).abs() > typical.gate);
        self.paths.push(path);
        if self.paths.len() > MAX_PATHS
            && let Some(oldest) = self
                .paths
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.last_seen)
                .map(|(i, _)| i)
        {
            self.paths.remove(oldest);
        }
    }

    /// A first outlier is held back; a second that agrees with it is a genuine jump
    /// (upstream step, or our clock was changed), so history restarts from the two of them.
    fn handle_outlier(&mut self, sample: FilterSample, fit: Fit) -> FilterVerdict {
        match self.pending_spike.take() {
            Some(previous) => {
                let elapsed = sample.time.secs_since(previous.time);
                let drift = fit.slope * elapsed;
                let disagreement =
                    (sample.uncorrected_offset - previous.uncorrected_offset - drift).abs();
                let tolerance = SPIKE_GATE
                    * fit
                        .jitter
                        .max(self.noise_floor())
                        .hypot(fit.slope_error() * elapsed.abs())
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
        let ResidualSigns {
            positive,
            negative,
            runs,
        } = self.residual_signs(&fit);
        if positive == 0 || negative == 0 {
            return self.points.len() >= 8;
        }
        let n = (positive + negative) as f64;
        let (np, nn) = (positive as f64, negative as f64);
        let expected = 2.0 * np * nn / n + 1.0;
        let variance = (expected - 1.0) * (expected - 2.0) / (n - 1.0);
        (runs as f64) < expected - 2.0 * variance.max(0.0).sqrt()
    }

    /// The residuals' signs around `fit`, oldest point first.
    fn residual_signs(&self, fit: &Fit) -> ResidualSigns {
        let reference = self.reference_time();
        let mut signs = ResidualSigns::default();
        let mut last_sign = None;
        for p in &self.points {
            let sign = p.uncorrected_offset >= fit.predict(p.time, reference);
            if sign {
                signs.positive += 1;
            } else {
                signs.negative += 1;
            }
            if last_sign != Some(sign) {
                signs.runs += 1;
                last_sign = Some(sign);
            }
        }
        signs
    }

    /// The smallest delay on the base path over the last [`FILTER_STAGES`] accepted points
    /// (calibrated paths' delays counted as the base path's), or of the stages before there
    /// are any.
    fn min_delay(&self) -> f64 {
        let samples = if self.points.is_empty() {
            &self.stages[..]
        } else {
            &self.points[self.points.len().saturating_sub(FILTER_STAGES)..]
        };
        samples
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
        let xyw: Vec<(f64, f64, f64)> = self
            .points
            .iter()
            .map(|p| {
                (
                    p.time.secs_since(reference),
                    p.uncorrected_offset,
                    self.weight(p, min_delay),
                )
            })
            .collect();
        let Line {
            mean_x,
            mean_y,
            slope,
            sum_w,
            sxx,
            weighted_sq,
            plain_sq,
        } = Line::through(&xyw);
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
        let n = self.points.len();
        let skew = if n >= 2 && fit.sxx > 0.0 {
            fit.slope_error() * 1e6
        } else {
            f64::INFINITY
        };
        let pick = self
            .stages
            .iter()
            .min_by(|a, b| a.delay.total_cmp(&b.delay))?;
        Some(SourceEstimate {
            uncorrected_offset: fit.predict(now, reference),
            frequency_ppm: fit.slope * 1e6,
            skew_ppm: skew,
            offset_error: fit.prediction_error(now, reference),
            delay: pick.delay,
            dispersion: self.peer_dispersion(now),
            jitter: self.jitter.max(fit.jitter),
            samples: n,
            residual_runs: self.residual_signs(&fit).runs,
            span: self
                .points
                .first()
                .map_or(0.0, |oldest| reference.secs_since(oldest.time)),
            last_sample: reference,
        })
    }
}

/// Median of a slice (sorted in place); 0 when empty.
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// A weighted least-squares line through `(x, y, weight)` points, with its residuals' sums
/// of squares (weighted and plain). The slope is 0 below two points.
#[derive(Debug, Clone, Copy)]
struct Line {
    mean_x: f64,
    mean_y: f64,
    slope: f64,
    sum_w: f64,
    sxx: f64,
    weighted_sq: f64,
    plain_sq: f64,
}

impl Line {
    fn through(points: &[(f64, f64, f64)]) -> Self {
        let mut sum_w = 0.0;
        let mut sum_wx = 0.0;
        let mut sum_wy = 0.0;
        for &(x, y, w) in points {
            sum_w += w;
            sum_wx += w * x;
            sum_wy += w * y;
        }
        let mean_x = sum_wx / sum_w;
        let mean_y = sum_wy / sum_w;
        let mut sxx = 0.0;
        let mut sxy = 0.0;
        for &(x, y, w) in points {
            let dx = x - mean_x;
            sxx += w * dx * dx;
            sxy += w * dx * (y - mean_y);
        }
        let slope = if points.len() >= 2 && sxx > 0.0 {
            sxy / sxx
        } else {
            0.0
        };
        let mut weighted_sq = 0.0;
        let mut plain_sq = 0.0;
        for &(x, y, w) in points {
            let r = y - (mean_y + slope * (x - mean_x));
            weighted_sq += w * r * r;
            plain_sq += r * r;
        }
        Self {
            mean_x,
            mean_y,
            slope,
            sum_w,
            sxx,
            weighted_sq,
            plain_sq,
        }
    }
}

impl Fit {
    fn predict(&self, time: ClockTime, reference: ClockTime) -> f64 {
        self.mean_y + self.slope * (time.secs_since(reference) - self.mean_x)
    }

    /// Standard error of the slope, seconds per second (infinite with one sample).
    fn slope_error(&self) -> f64 {
        if self.sxx > 0.0 {
            (self.residual_scale / self.sxx).sqrt()
        } else {
            f64::INFINITY
        }
    }

    /// Standard error of [`Fit::predict`] at `time`, seconds.
    fn prediction_error(&self, time: ClockTime, reference: ClockTime) -> f64 {
        let x = time.secs_since(reference);
        let mut variance = self.residual_scale / self.sum_w;
        if self.sxx > 0.0 {
            variance += self.residual_scale * (x - self.mean_x).powi(2) / self.sxx;
        } else {
            // One sample: the frequency is unknown, so the prediction may drift at up to the
            // largest frequency error we correct.
            variance += (crate::discipline::MAX_FREQUENCY_PPM * 1e-6 * x).powi(2);
        }
        variance.sqrt()
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

    /// Ten quiet samples 4 s apart on a 1 ms path, offset 0 and no frequency error.
    fn settled() -> ClockFilter {
        let mut filter = ClockFilter::new();
        for i in 0..10 {
            let jitter = 2e-6 * f64::from(i % 3) - 2e-6;
            filter.add(sample(
                f64::from(i) * 4.0,
                jitter,
                1e-3 + 1e-5 * f64::from(i % 2),
            ));
        }
        filter
    }

    fn offset_at(filter: &ClockFilter, t: f64) -> f64 {
        filter
            .estimate(ClockTime::from_secs_f64(1000.0 + t))
            .unwrap()
            .uncorrected_offset
    }

    #[test]
    fn a_lone_sample_on_a_longer_path_with_a_shift_is_held_then_dropped() {
        let mut filter = settled();
        // 20 ms more on the way back: −10 ms of apparent offset.
        assert_eq!(
            filter.add(sample(40.0, -0.010, 0.021)),
            FilterVerdict::PathHeld
        );
        assert_eq!(
            filter.add(sample(44.0, 1e-6, 1e-3)),
            FilterVerdict::Accepted
        );
        assert!(offset_at(&filter, 44.0).abs() < 10e-6);
        assert_eq!(filter.sample_count(), 11);
    }

    #[test]
    fn a_new_path_confirmed_by_three_samples_is_calibrated_not_followed() {
        let mut filter = settled();
        let verdicts: Vec<_> = (0..3)
            .map(|i| filter.add(sample(40.0 + 4.0 * f64::from(i), -0.010, 0.021)))
            .collect();
        assert_eq!(
            verdicts,
            [
                FilterVerdict::PathHeld,
                FilterVerdict::PathHeld,
                FilterVerdict::PathCalibrated
            ]
        );
        assert!(
            offset_at(&filter, 48.0).abs() < 10e-6,
            "{}",
            offset_at(&filter, 48.0)
        );
        // Later samples on the new path are used, corrected by its asymmetry...
        assert_eq!(
            filter.add(sample(52.0, -0.010 + 3e-6, 0.021)),
            FilterVerdict::Accepted
        );
        assert!(offset_at(&filter, 52.0).abs() < 10e-6);
        // ...and so are samples on the old path when the route comes back.
        assert_eq!(filter.add(sample(56.0, 0.0, 1e-3)), FilterVerdict::Accepted);
        assert!(offset_at(&filter, 56.0).abs() < 10e-6);
        // The reported delay is the path's real one, for the root distance.
        let estimate = filter.estimate(ClockTime::from_secs_f64(1056.0)).unwrap();
        assert!(estimate.delay <= 1.01e-3, "{}", estimate.delay);
    }

    #[test]
    fn a_shift_the_delay_step_cannot_explain_is_a_jump_not_a_path() {
        let mut filter = settled();
        // 2 ms longer, but 50 ms of shift: at most 1 ms could come from the path.
        assert_eq!(filter.add(sample(40.0, 0.050, 0.003)), FilterVerdict::Spike);
        assert_eq!(
            filter.add(sample(44.0, 0.050, 0.003)),
            FilterVerdict::JumpFollowed
        );
        assert!((offset_at(&filter, 44.0) - 0.050).abs() < 1e-4);
    }

    #[test]
    fn samples_that_disagree_on_the_new_path_never_calibrate_it() {
        let mut filter = settled();
        // Queueing spikes: long delays, shifts of either sign, never the same twice.
        let spikes = [
            (-0.004, 0.012),
            (0.006, 0.020),
            (-0.009, 0.030),
            (0.002, 0.009),
        ];
        for (i, (offset, delay)) in spikes.into_iter().enumerate() {
            let verdict = filter.add(sample(40.0 + 4.0 * i as f64, offset, delay));
            assert_ne!(verdict, FilterVerdict::PathCalibrated, "spike {i}");
        }
        assert!(offset_at(&filter, 52.0).abs() < 50e-6);
    }

    #[test]
    fn an_iburst_with_a_wild_slope_does_not_wedge_the_filter() {
        let mut filter = ClockFilter::new();
        // Three samples 1 s apart with 2 ms of noise: a slope of about +2000 ppm.
        for (t, offset) in [(0.0, 0.0), (1.0, 0.002), (2.0, 0.004)] {
            filter.add(sample(t, offset, 0.02));
        }
        // The truth is a flat line; samples a minute apart must be taken, not refused for
        // ever against the wild prediction.
        let verdicts: Vec<_> = (1..=6)
            .map(|i| filter.add(sample(64.0 * f64::from(i), 0.001, 0.02)))
            .collect();
        let restarted = verdicts
            .iter()
            .position(|v| *v == FilterVerdict::Restarted)
            .expect("restarts");
        assert!(restarted < MAX_REJECTED_RUN, "{verdicts:?}");
        assert!(
            verdicts[restarted + 1..]
                .iter()
                .all(|v| *v == FilterVerdict::Accepted),
            "{verdicts:?}"
        );
        let estimate = filter
            .estimate(ClockTime::from_secs_f64(1000.0 + 384.0))
            .unwrap();
        assert!(
            estimate.frequency_ppm.abs() < 1.0,
            "{}",
            estimate.frequency_ppm
        );
    }
}
