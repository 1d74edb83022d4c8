//! Time representations: the local timescale ([`ClockTime`]) and the two NTP wire formats
//! ([`NtpTimestamp`], era-aware, and [`NtpShort`]).
//!
//! Representation choice: instants are `ClockTime`, signed 64-bit nanoseconds since the Unix
//! epoch (POSIX/UTC scale, ±292 years). Integer nanoseconds keep timestamp arithmetic exact at
//! the protocol boundary. Offsets, delays and frequencies inside the estimators are `f64`
//! seconds (or ppm): they are small numbers, so `f64` keeps sub-nanosecond precision there, and
//! statistics read naturally.

use serde::{Deserialize, Serialize};

/// Seconds from the NTP prime epoch (1900-01-01) to the Unix epoch (1970-01-01).
pub const NTP_UNIX_OFFSET_SECS: i64 = 2_208_988_800;
/// Frequency tolerance (RFC 5905 PHI): dispersion grows 15 µs per second.
pub const PHI: f64 = 15e-6;
/// Seconds in a nominal UTC day.
pub const SECS_PER_DAY: i64 = 86_400;

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// An instant on the local (or simulated) clock: nanoseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ClockTime(i64);

impl ClockTime {
    /// The Unix epoch.
    pub const EPOCH: Self = Self(0);

    pub const fn from_unix_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    pub const fn from_unix_secs(secs: i64) -> Self {
        Self(secs.saturating_mul(NANOS_PER_SEC))
    }

    /// Converts from `f64` seconds since the epoch (rounded to the nearest nanosecond).
    pub fn from_secs_f64(secs: f64) -> Self {
        Self(secs_to_nanos(secs))
    }

    pub const fn unix_nanos(self) -> i64 {
        self.0
    }

    /// Whole seconds since the epoch, rounded towards negative infinity.
    pub const fn unix_secs_floor(self) -> i64 {
        self.0.div_euclid(NANOS_PER_SEC)
    }

    /// Seconds since the epoch; loses sub-microsecond precision for present-day dates.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }

    /// This instant moved by `secs` seconds (saturating at the representable range).
    #[must_use]
    pub fn add_secs(self, secs: f64) -> Self {
        Self(self.0.saturating_add(secs_to_nanos(secs)))
    }

    #[must_use]
    pub const fn add_nanos(self, nanos: i64) -> Self {
        Self(self.0.saturating_add(nanos))
    }

    /// `self - earlier` in seconds, computed exactly in nanoseconds before conversion.
    pub fn secs_since(self, earlier: Self) -> f64 {
        self.nanos_since(earlier) as f64 / NANOS_PER_SEC as f64
    }

    pub const fn nanos_since(self, earlier: Self) -> i64 {
        self.0.saturating_sub(earlier.0)
    }
}

fn secs_to_nanos(secs: f64) -> i64 {
    let nanos = (secs * NANOS_PER_SEC as f64).round();
    // `as` saturates for out-of-range floats and maps NaN to 0, which is what we want.
    nanos as i64
}

/// A 64-bit NTP timestamp as carried on the wire (32-bit seconds, 32-bit fraction).
///
/// The era (which 136-year cycle) is not on the wire; [`NtpTimestamp::to_clock_time_near`]
/// resolves it by choosing the instant closest to a local reference, which is what keeps the
/// 2036 rollover invisible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NtpTimestamp(u64);

impl NtpTimestamp {
    pub const ZERO: Self = Self(0);

    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    pub const fn to_bits(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The wire representation of an instant (the era number is dropped).
    pub fn from_clock_time(time: ClockTime) -> Self {
        let nanos = time.unix_nanos();
        let secs_1900 = nanos.div_euclid(NANOS_PER_SEC) + NTP_UNIX_OFFSET_SECS;
        let sub_nanos = nanos.rem_euclid(NANOS_PER_SEC) as u64;
        // Rounded to the nearest 2^-32 s; cannot reach 2^32 for sub_nanos < 10^9.
        let fraction = ((u128::from(sub_nanos) << 32) + 500_000_000) / 1_000_000_000;
        let secs_field = secs_1900.rem_euclid(1 << 32) as u64;
        Self((secs_field << 32) | fraction as u64)
    }

    /// Resolves the era by picking the instant within ±68 years of `pivot`.
    pub fn to_clock_time_near(self, pivot: ClockTime) -> ClockTime {
        let pivot_wire = Self::from_clock_time(pivot);
        // Signed 32.32 fixed-point distance from the pivot, wrapping across eras.
        let delta_fixed = self.0.wrapping_sub(pivot_wire.0) as i64;
        let delta_nanos = (i128::from(delta_fixed) * i128::from(NANOS_PER_SEC)) >> 32;
        pivot.add_nanos(delta_nanos as i64)
    }

    /// Random timestamps for the client's transmit field (anti-spoofing cookie).
    pub fn random(rng: &mut impl rand::Rng) -> Self {
        Self(rng.random())
    }
}

/// NTP short format: unsigned 16.16 fixed-point seconds (root delay, root dispersion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NtpShort(u32);

impl NtpShort {
    pub const ZERO: Self = Self(0);
    pub const MAX: Self = Self(u32::MAX);

    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    pub const fn to_bits(self) -> u32 {
        self.0
    }

    /// Saturates at 0 and at 65536 s, rounding up so published error bounds never shrink.
    pub fn from_secs_f64(secs: f64) -> Self {
        if secs.is_nan() || secs <= 0.0 {
            return Self::ZERO;
        }
        let fixed = (secs * 65_536.0).ceil();
        if fixed >= u32::MAX as f64 {
            Self::MAX
        } else {
            Self(fixed as u32)
        }
    }

    pub fn to_secs_f64(self) -> f64 {
        f64::from(self.0) / 65_536.0
    }
}

/// A civil UTC date, used to decide when a leap second may take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilDate {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

impl CivilDate {
    /// The civil date of the day containing `time` (proleptic Gregorian, days-from-civil
    /// inverse after H. Hinnant's public-domain algorithm description).
    pub fn of(time: ClockTime) -> Self {
        let days = time.unix_secs_floor().div_euclid(SECS_PER_DAY);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self { year, month, day }
    }

    /// Whether this is the last day of its month (when leap seconds may be inserted).
    pub fn is_last_day_of_month(self) -> bool {
        let leap_year = (self.year % 4 == 0 && self.year % 100 != 0) || self.year % 400 == 0;
        let days_in_month = match self.month {
            2 if leap_year => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        self.day == days_in_month
    }
}

/// The next UTC midnight strictly after `time`.
pub fn next_midnight(time: ClockTime) -> ClockTime {
    let day = time.unix_secs_floor().div_euclid(SECS_PER_DAY);
    ClockTime::from_unix_secs((day + 1) * SECS_PER_DAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unix_epoch_maps_to_ntp_seconds_2208988800() {
        let wire = NtpTimestamp::from_clock_time(ClockTime::EPOCH);
        assert_eq!(wire.to_bits() >> 32, 2_208_988_800);
        assert_eq!(wire.to_bits() & 0xffff_ffff, 0);
    }

    #[test]
    fn timestamps_after_2036_rollover_resolve_to_era_one() {
        // 2036-02-07T06:28:16Z is NTP era 1 second 0.
        let rollover = ClockTime::from_unix_secs(2_085_978_496);
        let just_after = rollover.add_secs(10.0);
        let wire = NtpTimestamp::from_clock_time(just_after);
        assert_eq!(wire.to_bits() >> 32, 10);
        let pivot_before = rollover.add_secs(-100.0);
        assert_eq!(wire.to_clock_time_near(pivot_before), just_after);
    }

    #[test]
    fn short_format_rounds_up_and_saturates() {
        assert_eq!(NtpShort::from_secs_f64(1.0).to_bits(), 65_536);
        assert_eq!(NtpShort::from_secs_f64(-3.0), NtpShort::ZERO);
        assert_eq!(NtpShort::from_secs_f64(1e9), NtpShort::MAX);
        assert!(NtpShort::from_secs_f64(1e-6).to_secs_f64() >= 1e-6);
    }

    #[test]
    fn civil_date_knows_month_ends() {
        // 2016-12-31 had a leap second.
        let t = ClockTime::from_unix_secs(1_483_228_799);
        let date = CivilDate::of(t);
        assert_eq!((date.year, date.month, date.day), (2016, 12, 31));
        assert!(date.is_last_day_of_month());
        assert_eq!(next_midnight(t), ClockTime::from_unix_secs(1_483_228_800));
        let leap_day = CivilDate::of(ClockTime::from_unix_secs(951_782_400)); // 2000-02-29
        assert_eq!((leap_day.month, leap_day.day), (2, 29));
        assert!(leap_day.is_last_day_of_month());
    }

    proptest! {
        #[test]
        fn wire_round_trip_is_within_one_nanosecond_of_any_nearby_pivot(
            nanos in -4_000_000_000_000_000_000i64..6_000_000_000_000_000_000i64,
            pivot_shift in -2_000_000_000i64..2_000_000_000i64,
        ) {
            let time = ClockTime::from_unix_nanos(nanos);
            let pivot = time.add_nanos(pivot_shift.saturating_mul(1_000_000_000));
            let back = NtpTimestamp::from_clock_time(time).to_clock_time_near(pivot);
            prop_assert!((back.unix_nanos() - nanos).abs() <= 1);
        }
    }
}
