//! The `system` backend: the node's kernel clock through `clock_adjtime(2)`. The only code in
//! Stratum that changes a clock, and the only module with `unsafe` (two FFI calls, each
//! passing a pointer to a stack-allocated, zero-initialised `timex`).
//!
//! Frequency is set directly with the kernel PLL/FLL disabled; beyond the ±500 ppm the
//! frequency field allows, the tick length carries whole 100 ppm steps (USER_HZ = 100, so one
//! microsecond of tick is 100 ppm). Steps use ADJ_SETOFFSET, which is atomic in the kernel.
//! STA_UNSYNC is cleared only while synchronized *and* rtcSync is wanted, which is what makes
//! the kernel copy system time to the RTC every 11 minutes (chrony's `rtcsync`).
#![allow(unsafe_code)]

use nix::time::{ClockId, clock_gettime};
use stratum_ntp::clock::{Clock, ClockError, ClockStatus, LeapDirective};
use stratum_ntp::time::ClockTime;

/// Nominal tick in microseconds for USER_HZ = 100.
const NOMINAL_TICK_US: i64 = 10_000;
/// The kernel's frequency field is ppm scaled by 2^16 and limited to ±500 ppm.
const FREQ_SCALE: f64 = 65_536.0;
const MAX_FREQ_FIELD_PPM: f64 = 500.0;

/// The kernel clock, steered.
pub struct SystemClock {
    rtc_sync: bool,
}

impl SystemClock {
    /// Takes over the kernel clock: switches the kernel PLL/FLL off so only we steer it.
    /// Fails without CAP_SYS_TIME.
    pub fn new(rtc_sync: bool) -> Result<Self, ClockError> {
        let clock = Self { rtc_sync };
        clock.update_status(|s| {
            s & !(libc::STA_PLL | libc::STA_FLL | libc::STA_PPSFREQ | libc::STA_PPSTIME)
        })?;
        Ok(clock)
    }

    fn update_status(&self, change: impl FnOnce(i32) -> i32) -> Result<(), ClockError> {
        let current = read_timex()?;
        let mut tx = zeroed_timex();
        tx.modes = libc::ADJ_STATUS;
        tx.status = change(current.status);
        adjtime(&mut tx)
    }
}

/// Splits a frequency correction into a tick adjustment (whole 100 ppm steps) and the
/// remainder for the frequency field, which must stay within ±500 ppm.
pub fn split_frequency(ppm: f64) -> (i64, f64) {
    if ppm.abs() <= MAX_FREQ_FIELD_PPM {
        return (NOMINAL_TICK_US, ppm);
    }
    let tick_steps = (ppm / 100.0).round();
    (
        NOMINAL_TICK_US + tick_steps as i64,
        ppm - tick_steps * 100.0,
    )
}

impl Clock for SystemClock {
    fn now(&self) -> ClockTime {
        read_clock(ClockId::CLOCK_REALTIME)
    }

    fn monotonic(&self) -> ClockTime {
        read_clock(ClockId::CLOCK_MONOTONIC)
    }

    fn step(&mut self, offset: f64) -> Result<(), ClockError> {
        let nanos = (offset * 1e9).round() as i64;
        let mut tx = zeroed_timex();
        tx.modes = libc::ADJ_SETOFFSET | libc::ADJ_NANO;
        tx.time.tv_sec = nanos.div_euclid(1_000_000_000);
        tx.time.tv_usec = nanos.rem_euclid(1_000_000_000);
        adjtime(&mut tx)
    }

    fn set_frequency(&mut self, ppm: f64) -> Result<(), ClockError> {
        let (tick, field_ppm) = split_frequency(ppm);
        let mut tx = zeroed_timex();
        tx.modes = libc::ADJ_FREQUENCY | libc::ADJ_TICK;
        tx.freq = (field_ppm * FREQ_SCALE).round() as libc::c_long;
        tx.tick = tick as libc::c_long;
        adjtime(&mut tx)
    }

    fn set_leap(&mut self, leap: LeapDirective) -> Result<(), ClockError> {
        self.update_status(|s| {
            let cleared = s & !(libc::STA_INS | libc::STA_DEL);
            match leap {
                LeapDirective::None => cleared,
                LeapDirective::Insert => cleared | libc::STA_INS,
                LeapDirective::Delete => cleared | libc::STA_DEL,
            }
        })
    }

    fn set_status(&mut self, status: ClockStatus) -> Result<(), ClockError> {
        let mut tx = zeroed_timex();
        tx.modes = libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
        tx.maxerror = (status.max_error * 1e6).clamp(0.0, 16e6) as libc::c_long;
        tx.esterror = (status.est_error * 1e6).clamp(0.0, 16e6) as libc::c_long;
        adjtime(&mut tx)?;
        let unsync = !(status.synchronized && self.rtc_sync);
        self.update_status(|s| {
            if unsync {
                s | libc::STA_UNSYNC
            } else {
                s & !libc::STA_UNSYNC
            }
        })
    }
}

/// The kernel's discipline state, read without changing anything (modes = 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClockState {
    /// Frequency field, ppm.
    pub frequency_ppm: i64,
    /// Tick length, µs.
    pub tick_us: i64,
    /// Whether the kernel's own PLL is on (STA_PLL: a daemon steering through it).
    pub pll: bool,
    /// Whether the kernel's FLL is on (STA_FLL).
    pub fll: bool,
    /// Whether STA_UNSYNC is clear (someone claims synchronization).
    pub claims_sync: bool,
    /// The phase correction the kernel PLL still has to apply, ns (positive: the clock is
    /// behind and will be advanced); a daemon steering through the PLL sets it.
    pub pending_offset_nanos: i64,
    /// The estimated error a daemon set, µs.
    pub estimated_error_us: i64,
}

/// Reads the kernel clock state; works without CAP_SYS_TIME.
pub fn kernel_state() -> Result<KernelClockState, ClockError> {
    let tx = read_timex()?;
    Ok(KernelClockState {
        frequency_ppm: (tx.freq as f64 / FREQ_SCALE).round() as i64,
        tick_us: tx.tick,
        pll: tx.status & libc::STA_PLL != 0,
        fll: tx.status & libc::STA_FLL != 0,
        claims_sync: tx.status & libc::STA_UNSYNC == 0,
        // In µs unless the daemon switched the kernel to ns (STA_NANO).
        pending_offset_nanos: if tx.status & libc::STA_NANO != 0 {
            tx.offset
        } else {
            tx.offset.saturating_mul(1000)
        },
        estimated_error_us: tx.esterror,
    })
}

pub(crate) fn read_clock(id: ClockId) -> ClockTime {
    // clock_gettime on REALTIME/MONOTONIC cannot fail on Linux with a valid clock id.
    match clock_gettime(id) {
        Ok(ts) => ClockTime::from_unix_nanos(ts.tv_sec() * 1_000_000_000 + ts.tv_nsec()),
        Err(_) => ClockTime::EPOCH,
    }
}

fn zeroed_timex() -> libc::timex {
    // SAFETY: `timex` is a plain C struct of integers; all-zero is a valid value and means
    // "modes = 0", i.e. read only.
    unsafe { std::mem::zeroed() }
}

fn read_timex() -> Result<libc::timex, ClockError> {
    let mut tx = zeroed_timex();
    // SAFETY: `tx` is a valid, exclusively borrowed timex for the duration of the call; with
    // modes = 0 the kernel only writes the current state into it.
    let rc = unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, &mut tx) };
    if rc < 0 {
        return Err(ClockError::Rejected(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(tx)
}

fn adjtime(tx: &mut libc::timex) -> Result<(), ClockError> {
    // SAFETY: as in `read_timex`; `tx` is fully initialised and its `modes` select only the
    // fields this module set.
    let rc = unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, tx) };
    if rc < 0 {
        return Err(ClockError::Rejected(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_within_500_ppm_use_only_the_frequency_field() {
        assert_eq!(split_frequency(0.0), (10_000, 0.0));
        assert_eq!(split_frequency(-499.5), (10_000, -499.5));
    }

    #[test]
    fn large_frequencies_move_whole_100_ppm_steps_into_the_tick() {
        let (tick, rest) = split_frequency(1234.5);
        assert_eq!(tick, 10_012);
        assert!((rest - 34.5).abs() < 1e-9);
        let (tick, rest) = split_frequency(-83_333.0);
        assert_eq!(tick, 10_000 - 833);
        assert!((rest + 33.0).abs() < 1e-9);
        assert!(rest.abs() <= MAX_FREQ_FIELD_PPM);
    }

    #[test]
    fn reading_the_kernel_state_needs_no_privilege_and_changes_nothing() {
        let before = kernel_state().expect("adjtimex read");
        let after = kernel_state().expect("adjtimex read");
        assert_eq!(before, after);
    }
}
