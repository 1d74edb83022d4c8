//! The must-show scenarios of issue 3, shared by the scenario tests and `examples/sim.rs`.
//!
//! Common ground: true start 2025-06-15, 1 ms round trip with 100 µs mean exponential jitter
//! per leg, sources polled 2^4–2^6 s (LAN-class upstreams; the defaults 2^6–2^10 apply to
//! public pools). Where a scenario must step at start it uses the RFC 5905 step threshold of
//! 0.128 s instead of the 1 s default, because the start offset is 0.5 s.

use super::{NetworkSpec, Scenario, ServerSpec, WorldLeap};
use crate::clock::{LeapDirective, SimulatedClockConfig};
use crate::discipline::DriftState;
use crate::leap::LeapMode;
use crate::time::ClockTime;

/// RFC 5905 STEPT.
pub const STEP_THRESHOLD: f64 = 0.128;
/// 2016-12-31T23:59:60Z was a real inserted leap second; this is the following midnight.
pub const LEAP_MIDNIGHT: i64 = 1_483_228_800;

/// Must-show 1: +0.5 s and +100 ppm, four sources.
pub fn startup() -> Scenario {
    let mut s = Scenario::new("startup", 4);
    s.duration = 3.0 * 3600.0;
    s.clock = SimulatedClockConfig {
        initial_offset: 0.5,
        frequency_error_ppm: 100.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 11,
    };
    s.system.discipline.make_step_threshold = STEP_THRESHOLD;
    s.seed = 101;
    s
}

/// Must-show 5 baseline: the startup of must-show 1 against public-pool-like sources polled
/// at the default 2^6–2^10 s, where the frequency learnt during the burst matters most.
pub fn startup_default_poll() -> Scenario {
    let mut s = startup();
    s.name = "startup-default-poll".into();
    s.source_template.min_poll = 6;
    s.source_template.max_poll = 10;
    s
}

/// Must-show 5: the start of must-show 1 with a drift file saying −100 ppm ± 0.1 ppm.
pub fn startup_with_drift() -> Scenario {
    let mut s = startup();
    s.name = "startup-drift".into();
    s.drift = Some(DriftState {
        frequency_ppm: -100.0,
        error_ppm: 0.1,
    });
    s
}

/// Must-show 2: five sources, two lying (+1 h and −50 ms).
pub fn falsetickers() -> Scenario {
    let mut s = Scenario::new("falsetickers", 5);
    s.duration = 2.0 * 3600.0;
    s.clock = SimulatedClockConfig {
        initial_offset: 0.0,
        frequency_error_ppm: 20.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 12,
    };
    s.servers[1].offset = 3600.0;
    s.servers[3].offset = -0.05;
    s.seed = 102;
    s
}

/// Must-show 3: after the step window every upstream jumps +200 ms (at 1 h), then +1 h more
/// (at 3 h), beyond the run-time panic threshold.
pub fn upstream_jumps() -> Scenario {
    let mut s = Scenario::new("upstream-jumps", 4);
    s.duration = 4.0 * 3600.0;
    s.clock = SimulatedClockConfig {
        initial_offset: 0.3,
        frequency_error_ppm: -30.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 13,
    };
    s.system.discipline.make_step_threshold = STEP_THRESHOLD;
    for server in &mut s.servers {
        server.steps = vec![(3600.0, 0.2), (3.0 * 3600.0, 3600.0)];
    }
    s.seed = 103;
    s
}

/// Must-show 4: a leap second announced by `announcing` of four sources, in `mode`.
pub fn leap(mode: LeapMode, announcing: usize) -> Scenario {
    let mut s = Scenario::new("leap", 4);
    let midnight = ClockTime::from_unix_secs(LEAP_MIDNIGHT);
    // Start before the smear window (noon) opens and end after it closes.
    s.start = midnight.add_secs(-14.0 * 3600.0);
    s.duration = 28.0 * 3600.0;
    s.clock = SimulatedClockConfig {
        initial_offset: 0.0,
        frequency_error_ppm: 15.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 14,
    };
    s.system.leap_mode = mode;
    s.sample_interval = 10.0;
    for (i, server) in s.servers.iter_mut().enumerate() {
        server.announces_leap = i < announcing;
    }
    s.leap = Some(WorldLeap {
        at: midnight,
        direction: LeapDirective::Insert,
        announce_from: s.start,
    });
    s.seed = 104;
    s
}

/// Must-show 6: every source is lost after 1 h, for 30 h.
pub fn holdover() -> Scenario {
    let mut s = Scenario::new("holdover", 4);
    s.duration = 31.0 * 3600.0;
    s.clock = SimulatedClockConfig {
        initial_offset: 0.0,
        frequency_error_ppm: 10.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 16,
    };
    s.outage = Some((3600.0, f64::INFINITY));
    s.sample_interval = 60.0;
    s.seed = 106;
    s
}

/// [`rough_network`] with its network and clock seeded by `n`: the many-seed robustness
/// check (`tests/path_changes.rs`) and `make sim`'s figure use the same family of runs.
pub fn rough_network_seeded(n: u64) -> Scenario {
    let mut s = rough_network();
    s.seed = 3000 + n;
    s.clock.seed = 4000 + n;
    s
}

/// A lossy, asymmetric, jittery path (not a must-show; used to check robustness).
pub fn rough_network() -> Scenario {
    let mut s = Scenario::new("rough-network", 4);
    s.duration = 3.0 * 3600.0;
    let network = NetworkSpec {
        round_trip: 20e-3,
        jitter: 2e-3,
        asymmetry: 0.0,
        loss: 0.2,
    };
    s.servers = (0..4)
        .map(|i| ServerSpec::honest(&format!("s{i}"), network))
        .collect();
    s.clock = SimulatedClockConfig {
        initial_offset: -2.0,
        frequency_error_ppm: -200.0,
        wander_ppm_per_sqrt_s: 1e-3,
        seed: 17,
    };
    s.source_template.min_poll = 6;
    s.source_template.max_poll = 10;
    s.seed = 107;
    s
}

/// The delay proxy's route change (issue 19, Q1) on simulated time: one source polled every
/// 4 s over a 1 ms loopback-like path; at 180 s the way back gains 20 ms, which biases every
/// later measured offset by −10 ms. Nothing happened to anybody's clock, so a good client
/// keeps its time. `restore_at` puts the old route back.
pub fn route_change(restore_at: Option<f64>) -> Scenario {
    let mut s = Scenario::new("route-change", 1);
    s.duration = 600.0;
    let before = NetworkSpec {
        round_trip: 1e-3,
        jitter: 20e-6,
        asymmetry: 0.0,
        loss: 0.0,
    };
    // `asymmetry` lengthens the request leg; 40 ms more round trip minus 20 ms on the way
    // out leaves the request leg as it was and puts all 20 ms on the way back.
    let after = NetworkSpec {
        round_trip: before.round_trip + 40e-3,
        asymmetry: -20e-3,
        ..before
    };
    s.servers[0].network = before;
    s.servers[0].network_changes.push((180.0, after));
    if let Some(at) = restore_at {
        s.servers[0].network_changes.push((at, before));
    }
    s.clock = SimulatedClockConfig {
        initial_offset: 0.0,
        frequency_error_ppm: 30.0,
        wander_ppm_per_sqrt_s: 0.01,
        seed: 19,
    };
    s.system.min_sources = 1;
    s.source_template.min_poll = 2;
    s.source_template.max_poll = 2;
    s.sample_interval = 1.0;
    s.seed = 119;
    s
}
