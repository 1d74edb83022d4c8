//! Clock backends behind the core's [`Clock`] trait, and the one place a backend is chosen.
//!
//! - `system` steers the kernel clock ([`system`]); the only backend that changes a clock.
//! - `readonly` measures the kernel clock and never adjusts it: the discipline steers a
//!   software clock layered on the kernel clock, so the agent still converges, serves correct
//!   time and reports how far the *kernel* clock is off.
//! - `simulated` is a software clock with injected offset and frequency error whose true time
//!   is this host's clock, for tests, e2e and demos.

pub mod system;

use std::sync::Mutex;

use stratum_api::agent_config::ClockBackend;
use stratum_ntp::clock::{
    Clock, ClockError, ClockStatus, LeapDirective, SimulatedClock, SimulatedClockConfig,
};
use stratum_ntp::time::ClockTime;

/// Set (to anything) to make opening the `system` backend fail before any syscall. The
/// Makefile sets it for tests, e2e, benchmarks and the demo: a second fence after running
/// them without CAP_SYS_TIME.
pub const DENY_SYSTEM_CLOCK_ENV: &str = "STRATUM_DENY_SYSTEM_CLOCK";

/// Whether this process may open the system backend at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemClockPolicy {
    /// Allowed (a real node).
    Allowed,
    /// Refused before any syscall.
    Denied,
}

impl SystemClockPolicy {
    /// Denied when [`DENY_SYSTEM_CLOCK_ENV`] is set.
    pub fn from_env() -> Self {
        if std::env::var_os(DENY_SYSTEM_CLOCK_ENV).is_some() {
            Self::Denied
        } else {
            Self::Allowed
        }
    }
}

/// Injected errors of the simulated backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimulationParams {
    /// Initial offset from true time, seconds.
    pub initial_offset: f64,
    /// Oscillator frequency error, ppm.
    pub frequency_error_ppm: f64,
    /// Random-walk wander, ppm per √s.
    pub wander_ppm_per_sqrt_s: f64,
    /// Seed of the wander.
    pub seed: u64,
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The deny variable is set.
    #[error(
        "the system clock backend is denied by {DENY_SYSTEM_CLOCK_ENV} (tests, e2e and demos never steer this machine's clock)"
    )]
    SystemDenied,
    /// The kernel refused (no CAP_SYS_TIME, or a seccomp profile).
    #[error("cannot take control of the system clock: {0}")]
    System(#[source] ClockError),
}

/// An open clock backend.
pub enum Backend {
    /// The kernel clock.
    System(system::SystemClock),
    /// A software clock over the kernel clock.
    Readonly(HostDriven),
    /// A software clock with injected errors.
    Simulated(HostDriven),
}

impl Backend {
    /// Opens the backend `kind`; the only constructor of the system backend.
    pub fn open(
        kind: ClockBackend,
        rtc_sync: bool,
        sim: SimulationParams,
        policy: SystemClockPolicy,
    ) -> Result<Self, OpenError> {
        match kind {
            ClockBackend::System => {
                if policy == SystemClockPolicy::Denied {
                    return Err(OpenError::SystemDenied);
                }
                system::SystemClock::new(rtc_sync)
                    .map(Backend::System)
                    .map_err(OpenError::System)
            }
            ClockBackend::Readonly => Ok(Backend::Readonly(HostDriven::new(SimulationParams {
                initial_offset: 0.0,
                frequency_error_ppm: 0.0,
                wander_ppm_per_sqrt_s: 0.0,
                seed: 0,
            }))),
            ClockBackend::Simulated => Ok(Backend::Simulated(HostDriven::new(sim))),
        }
    }

    /// Which backend this is.
    pub fn kind(&self) -> ClockBackend {
        match self {
            Backend::System(_) => ClockBackend::System,
            Backend::Readonly(_) => ClockBackend::Readonly,
            Backend::Simulated(_) => ClockBackend::Simulated,
        }
    }

    /// The current time on the clock the core steers.
    pub fn now(&self) -> ClockTime {
        match self {
            Backend::System(c) => c.now(),
            Backend::Readonly(c) | Backend::Simulated(c) => c.now(),
        }
    }

    /// The clock to hand to the core.
    pub fn clock(&mut self) -> &mut dyn Clock {
        match self {
            Backend::System(c) => c,
            Backend::Readonly(c) | Backend::Simulated(c) => c,
        }
    }

    /// How to read the steered clock from a host-realtime instant right now: identity for the
    /// kernel clock, the software layer's offset and rate for `readonly` and `simulated`. The
    /// server applies it to kernel receive timestamps and late transmit readings, so replies
    /// carry the disciplined clock without taking this backend's lock per packet.
    pub fn timescale(&self) -> Timescale {
        match self {
            Backend::System(_) => Timescale::IDENTITY,
            Backend::Readonly(c) | Backend::Simulated(c) => c.timescale(),
        }
    }

    /// The `simulated` clock's actual offset from true time (the host's clock); `None` for
    /// the other backends, whose true time nobody here knows.
    pub fn simulated_error(&self) -> Option<f64> {
        match self {
            Backend::Simulated(c) => Some(c.layer_offset()),
            Backend::System(_) | Backend::Readonly(_) => None,
        }
    }

    /// Offset of the *node's* clock from true time, given the core's estimate of the offset of
    /// the clock it steers. For `readonly` the steered clock is a software layer, so the
    /// kernel clock's offset is the estimate minus that layer's correction.
    pub fn node_offset(&self, estimated: f64) -> f64 {
        match self {
            Backend::System(_) | Backend::Simulated(_) => estimated,
            Backend::Readonly(c) => estimated - c.layer_offset(),
        }
    }
}

/// A software clock whose true time is this host's realtime clock: every reading first
/// advances the simulation to the host's current time.
pub struct HostDriven {
    inner: Mutex<SimulatedClock>,
}

impl HostDriven {
    fn new(p: SimulationParams) -> Self {
        let config = SimulatedClockConfig {
            initial_offset: p.initial_offset,
            frequency_error_ppm: p.frequency_error_ppm,
            wander_ppm_per_sqrt_s: p.wander_ppm_per_sqrt_s,
            seed: p.seed,
        };
        Self {
            inner: Mutex::new(SimulatedClock::new(host_realtime(), config)),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut SimulatedClock) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update; the clock state is still a
        // consistent value, so keep using it.
        let mut clock = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        clock.advance_to(host_realtime());
        f(&mut clock)
    }

    /// The layer as a linear map from host realtime, valid until the next step or frequency
    /// change (the run loop republishes it every turn).
    pub fn timescale(&self) -> Timescale {
        let mut clock = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let host = host_realtime();
        clock.advance_to(host);
        Timescale {
            host_ref: host,
            clock_ref: clock.now(),
            rate: clock.effective_rate_ppm() * 1e-6,
        }
    }

    /// The software layer's offset from the host clock, seconds.
    pub fn layer_offset(&self) -> f64 {
        self.with(|c| c.offset())
    }

    /// The frequency correction the discipline applied to the layer, ppm.
    pub fn correction_ppm(&self) -> f64 {
        self.with(|c| c.correction_ppm())
    }
}

impl Clock for HostDriven {
    fn now(&self) -> ClockTime {
        self.with(|c| c.now())
    }
    fn monotonic(&self) -> ClockTime {
        self.with(|c| c.monotonic())
    }
    fn step(&mut self, offset: f64) -> Result<(), ClockError> {
        self.with(|c| c.step(offset))
    }
    fn set_frequency(&mut self, ppm: f64) -> Result<(), ClockError> {
        self.with(|c| c.set_frequency(ppm))
    }
    fn set_leap(&mut self, leap: LeapDirective) -> Result<(), ClockError> {
        self.with(|c| c.set_leap(leap))
    }
    fn set_status(&mut self, status: ClockStatus) -> Result<(), ClockError> {
        self.with(|c| c.set_status(status))
    }
}

/// A linear map from this host's realtime clock onto a steered clock: `clock_ref` at
/// `host_ref`, advancing `1 + rate` seconds per host second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timescale {
    /// Host realtime at the reference point.
    pub host_ref: ClockTime,
    /// The steered clock's reading at the reference point.
    pub clock_ref: ClockTime,
    /// Fractional rate of the steered clock relative to the host clock (1e-6 = 1 ppm fast).
    pub rate: f64,
}

impl Timescale {
    /// The steered clock is the host clock.
    pub const IDENTITY: Self = Self {
        host_ref: ClockTime::EPOCH,
        clock_ref: ClockTime::EPOCH,
        rate: 0.0,
    };

    /// The steered clock's reading at host instant `host`.
    pub fn to_clock(&self, host: ClockTime) -> ClockTime {
        let elapsed = host.nanos_since(self.host_ref);
        // Integer nanoseconds for the bulk, f64 only for the (small) rate term.
        let drift = (elapsed as f64 * self.rate).round() as i64;
        self.clock_ref.add_nanos(elapsed.saturating_add(drift))
    }
}

/// This host's realtime clock.
pub fn host_realtime() -> ClockTime {
    system::read_clock(nix::time::ClockId::CLOCK_REALTIME)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn no_sim() -> SimulationParams {
        SimulationParams {
            initial_offset: 0.0,
            frequency_error_ppm: 0.0,
            wander_ppm_per_sqrt_s: 0.0,
            seed: 1,
        }
    }

    #[test]
    fn system_backend_is_refused_before_any_syscall_when_denied() {
        let opened = Backend::open(
            ClockBackend::System,
            true,
            no_sim(),
            SystemClockPolicy::Denied,
        );
        assert!(matches!(opened, Err(OpenError::SystemDenied)));
    }

    /// Under `make test` (which sets the deny variable) the test process must also lack
    /// CAP_SYS_TIME, so nothing in it could change the clock even by mistake.
    #[test]
    fn test_runs_under_make_have_no_cap_sys_time() {
        if SystemClockPolicy::from_env() == SystemClockPolicy::Allowed {
            return; // a bare `cargo test`: the variable and the capability drop come from make
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .unwrap()
            .trim();
        let bounding = u64::from_str_radix(cap_eff, 16).unwrap();
        const CAP_SYS_TIME: u64 = 25;
        assert_eq!(
            bounding & (1 << CAP_SYS_TIME),
            0,
            "CAP_SYS_TIME is in the bounding set"
        );
    }

    #[test]
    fn simulated_backend_starts_at_the_injected_offset_from_the_host_clock() {
        let backend = Backend::open(
            ClockBackend::Simulated,
            true,
            SimulationParams {
                initial_offset: 0.3,
                frequency_error_ppm: 50.0,
                wander_ppm_per_sqrt_s: 0.0,
                seed: 1,
            },
            SystemClockPolicy::Denied,
        )
        .unwrap();
        let Backend::Simulated(clock) = &backend else {
            panic!("wrong backend")
        };
        let offset = clock.now().secs_since(host_realtime());
        assert!((offset - 0.3).abs() < 0.01, "offset {offset}");
    }

    #[test]
    fn timescale_maps_host_instants_onto_the_simulated_clock() {
        let mut backend = Backend::open(
            ClockBackend::Simulated,
            true,
            SimulationParams {
                initial_offset: 0.3,
                frequency_error_ppm: 100.0,
                wander_ppm_per_sqrt_s: 0.0,
                seed: 1,
            },
            SystemClockPolicy::Denied,
        )
        .unwrap();
        let scale = backend.timescale();
        let host = host_realtime();
        let mapped = scale.to_clock(host);
        let direct = backend.clock().now();
        assert!(direct.secs_since(mapped).abs() < 0.01);
        // 100 ppm fast: 10 host seconds later the clock is 1 ms further ahead.
        let later = scale.to_clock(host.add_secs(10.0));
        assert!((later.secs_since(mapped) - 10.001).abs() < 1e-6);
        assert_eq!(
            Timescale::IDENTITY.to_clock(host),
            host,
            "the kernel clock maps to itself"
        );
    }

    #[test]
    fn readonly_backend_reports_the_kernel_clock_offset_not_its_own_layer() {
        let mut backend = Backend::open(
            ClockBackend::Readonly,
            true,
            no_sim(),
            SystemClockPolicy::Denied,
        )
        .unwrap();
        backend.clock().step(0.25).unwrap();
        // The core measured its (stepped) layer as on time: the kernel clock is 0.25 s behind.
        assert!((backend.node_offset(0.0) + 0.25).abs() < 1e-6);
    }
}
