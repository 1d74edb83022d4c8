//! Behaviour of the `System` facade the agent drives: reconfiguration, KoD, meddling,
//! minSources, status serialization.
#![allow(clippy::unwrap_used)]

use stratum_ntp::packet::{KissCode, LeapIndicator, Packet, ReferenceId};
use stratum_ntp::select::SelectError;
use stratum_ntp::server::{ServerClockState, build_reply};
use stratum_ntp::sim::{Scenario, scenarios};
use stratum_ntp::source::SourceConfig;
use stratum_ntp::system::{SourceState, System, SystemConfig};
use stratum_ntp::time::{ClockTime, NtpTimestamp};

fn source(i: u8) -> SourceConfig {
    SourceConfig::new(format!("s{i}"), format!("192.0.2.{i}:123").parse().unwrap())
}

/// A stratum-1 server's reply to `request`, received and sent at `at_server`.
fn perfect_reply(request: &[u8], at_server: ClockTime) -> [u8; 48] {
    let view = Packet::parse(request).unwrap();
    let state = ServerClockState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        precision: -20,
        root_delay: 0.0,
        root_dispersion: 1e-5,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(at_server),
        updated_at: at_server,
    };
    let mut out = [0u8; 48];
    build_reply(&view, at_server, at_server, &state, None, &mut out).unwrap();
    out
}

/// Answers every due request from a perfect server 1 ms away, `rounds` times, 2 s apart.
fn exchange(system: &mut System, mut now: ClockTime, rounds: usize) -> ClockTime {
    for _ in 0..rounds {
        while let Some(request) = system.poll_due(now) {
            let out = perfect_reply(&request.bytes, now.add_secs(0.0005));
            let rx = now.add_secs(0.001);
            system.handle_response(request.source, &out, rx, rx);
        }
        now = now.add_secs(2.0);
    }
    now
}

#[test]
fn reconfigure_keeps_samples_of_unchanged_sources_and_adds_new_ones() {
    let start = ClockTime::from_unix_secs(1_750_000_000);
    let config = SystemConfig {
        sources: vec![source(1), source(2), source(3)],
        ..SystemConfig::default()
    };
    let mut system = System::new(config.clone(), start, [1; 32]).unwrap();
    let now = exchange(&mut system, start, 4);
    let kept: Vec<_> = system.sources()[1..]
        .iter()
        .map(|s| (s.id(), s.sample_count()))
        .collect();
    assert!(kept.iter().all(|(_, n)| *n == 4));

    let mut changed = config;
    changed.sources = vec![source(2), source(3), source(4)];
    changed.sources[1].max_poll = 8;
    system.reconfigure(changed, now).unwrap();
    let after: Vec<_> = system
        .sources()
        .iter()
        .map(|s| (s.id(), s.sample_count()))
        .collect();
    assert_eq!(&after[..2], &kept[..]);
    assert_eq!(after[2].1, 0);
    assert!(system.sources().iter().all(|s| s.config().name != "s1"));
    assert!(system.synchronized(now));
}

#[test]
fn invalid_configuration_is_a_typed_error() {
    let config = SystemConfig {
        sources: vec![source(1), source(1)],
        ..SystemConfig::default()
    };
    assert!(System::new(config, ClockTime::EPOCH, [0; 32]).is_err());
}

#[test]
fn too_few_agreeing_sources_never_steer_the_clock() {
    let mut scenario = Scenario::new("two-sources", 2);
    scenario.clock.initial_offset = 0.3;
    scenario.system.discipline.make_step_threshold = 0.1;
    scenario.duration = 600.0;
    let trace = scenario.run();
    assert!(trace.steps.is_empty());
    assert!(trace.points.iter().all(|p| !p.synchronized));
    let state = trace.final_state.unwrap();
    assert_eq!(
        state.select_error,
        Some(SelectError::TooFewSources {
            agreeing: 2,
            required: 3
        })
    );
}

#[test]
fn kod_deny_demobilizes_only_that_source() {
    let mut scenario = Scenario::new("deny", 4);
    scenario.servers[0].kiss = Some(KissCode::Deny);
    scenario.duration = 600.0;
    let trace = scenario.run();
    let state = trace.final_state.clone().unwrap();
    assert_eq!(state.sources[0].state, SourceState::Demobilized);
    assert!(state.synchronized);
    // No more requests once demobilized: a handful at most before the DENY came back.
    assert!(trace.max_abs_error(60.0, 600.0) < 1e-3);
}

#[test]
fn kod_rate_slows_polling_to_the_servers_interval() {
    let mut scenario = Scenario::new("rate", 4);
    scenario.servers[0].kiss = Some(KissCode::Rate);
    scenario.duration = 600.0;
    let trace = scenario.run();
    let state = trace.final_state.unwrap();
    // build_kod echoes the request's poll (2^4) clamped; the source backs off beyond it.
    assert!(state.sources[0].poll > 4, "poll {}", state.sources[0].poll);
    assert!(state.synchronized);
}

#[test]
fn an_external_clock_step_after_start_up_is_followed_not_stepped_back() {
    let mut scenario = Scenario::new("meddling", 4);
    scenario.duration = 1800.0;
    scenario.external_steps = vec![(600.0, 30.0)];
    let trace = scenario.run();
    assert_eq!(trace.meddling_detected.len(), 1);
    assert!((trace.meddling_detected[0].1 - 30.0).abs() < 1e-3);
    // Someone else stepped the clock; the agent does not fight it with a step of its own.
    assert!(
        trace.steps.iter().all(|(at, _)| *at < 600.0),
        "stepped after the external step: {:?}",
        trace.steps
    );
    // The clock is where the other party put it, give or take what slewing has taken back
    // (at most 500 ppm × 1200 s = 0.6 s).
    let error = trace.max_abs_error(700.0, 1800.0);
    assert!((29.0..=30.1).contains(&error), "error {error}");
}

#[test]
fn status_snapshot_serializes_for_the_status_endpoint() {
    let trace = scenarios::falsetickers().run();
    let state = trace.final_state.unwrap();
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"synchronized\":true"));
    assert!(json.contains("Falseticker"));
}

/// The reported offset is the clock's offset *now*: after the initial step it no longer shows
/// the stepped amount, and between updates it follows the slew instead of the base frequency.
#[test]
fn reported_offset_tracks_the_clock_after_a_step_and_between_updates() {
    use stratum_ntp::clock::{Clock, SimulatedClock, SimulatedClockConfig, apply_action};
    let start = ClockTime::from_unix_secs(1_750_000_000);
    let mut clock = SimulatedClock::new(
        start,
        SimulatedClockConfig {
            initial_offset: 0.3,
            frequency_error_ppm: 50.0,
            ..SimulatedClockConfig::default()
        },
    );
    let config = SystemConfig {
        sources: vec![source(1), source(2), source(3), source(4)],
        ..SystemConfig::default()
    };
    let mut system = System::new(config, clock.now(), [7; 32]).unwrap();
    let mut worst_after_sync: f64 = 0.0;
    for step in 0..2_000u32 {
        // 0.5 s of true time per turn, 1000 s in all.
        let true_now = start.add_secs(f64::from(step) * 0.5);
        clock.advance_to(true_now);
        let local = clock.now();
        for action in system.on_timer(local) {
            apply_action(&mut clock, &action).unwrap();
        }
        while let Some(request) = system.poll_due(clock.now()) {
            // True time at the server, 0.5 ms each way; local clock barely moves meanwhile.
            let out = perfect_reply(&request.bytes, true_now.add_secs(0.0005));
            let rx = clock.now().add_secs(0.001);
            let outcome = system.handle_response(request.source, &out, rx, rx);
            for action in &outcome.actions {
                apply_action(&mut clock, action).unwrap();
            }
        }
        let now = clock.now();
        let state = system.state(now);
        if state.synchronized && step > 40 {
            // θ is true − local; the clock's offset is local − true.
            let error = (state.offset + clock.offset()).abs();
            worst_after_sync = worst_after_sync.max(error);
        }
    }
    assert!(
        worst_after_sync < 200e-6,
        "reported offset strayed {worst_after_sync} s from the clock's real offset"
    );
}
