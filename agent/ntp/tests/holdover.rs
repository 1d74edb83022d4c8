//! Must-show 6: with every source lost, root dispersion grows at 15 ppm and synchronized
//! turns false when the root distance crosses maxDistance (1.5 s).
use stratum_ntp::sim::scenarios;

#[test]
fn losing_all_sources_grows_root_dispersion_until_unsynchronized() {
    let trace = scenarios::holdover().run();
    let at_loss = trace
        .points
        .iter()
        .find(|p| p.t >= 3600.0)
        .expect("trace")
        .root_distance;
    assert!(at_loss < 0.01);
    let later = trace
        .points
        .iter()
        .find(|p| p.t >= 3600.0 + 10.0 * 3600.0)
        .expect("trace")
        .root_distance;
    let growth = (later - at_loss) / (10.0 * 3600.0);
    assert!((growth - 15e-6).abs() < 1e-6, "growth {growth} s/s");

    let lost = trace
        .points
        .iter()
        .find(|p| p.t > 3600.0 && !p.synchronized)
        .expect("loses sync");
    assert!(lost.root_distance >= 1.5 - 1e-3);
    let expected = 3600.0 + (1.5 - at_loss) / 15e-6;
    assert!(
        (lost.t - expected).abs() < 2.0 * 3600.0,
        "lost at {} s",
        lost.t
    );
    assert!(
        trace
            .points
            .iter()
            .filter(|p| p.t > 3600.0 && p.t < lost.t - 120.0)
            .all(|p| p.synchronized)
    );
    let state = trace.final_state.expect("state");
    assert_eq!(state.stratum, 16);
}

/// A scenario that loses every source at 1 h with a 10-minute holdover configured.
fn with_holdover(holdover: f64, local_stratum: Option<u8>) -> stratum_ntp::sim::Scenario {
    let mut s = scenarios::holdover();
    s.duration = 2.0 * 3600.0;
    s.system.holdover = Some(holdover);
    s.system.local_stratum = local_stratum;
    s.sample_interval = 5.0;
    s
}

const LOSS: f64 = 3600.0;

fn first_unsynchronized_after_loss(trace: &stratum_ntp::sim::Trace) -> f64 {
    trace
        .points
        .iter()
        .find(|p| p.t > LOSS && !p.synchronized)
        .expect("loses sync")
        .t
}

#[test]
fn holdover_ends_synchronization_long_before_the_distance_limit() {
    let trace = with_holdover(600.0, None).run();
    // The last update came at most one poll interval (2^6 s) before the loss.
    let lost = first_unsynchronized_after_loss(&trace);
    assert!(
        (LOSS + 600.0 - 64.0..=LOSS + 600.0 + 5.0).contains(&lost),
        "lost at {lost} s"
    );
    assert!(
        trace
            .points
            .iter()
            .filter(|p| p.t > 60.0 && p.t < LOSS + 600.0 - 64.0)
            .all(|p| p.synchronized)
    );
    // Root distance is still far below maxDistance: holdover, not distance, ended it.
    let at_lost = trace.points.iter().find(|p| p.t >= lost).expect("trace");
    assert!(at_lost.root_distance < 0.1);
    let state = trace.final_state.expect("state");
    assert!(!state.synchronized);
    assert_eq!(state.stratum, 16);
    let served = trace.final_server_state.expect("server state");
    assert!(!served.synchronized);
    assert_eq!(served.stratum, 16);
}

#[test]
fn holdover_is_never_shorter_than_four_poll_intervals() {
    // maxPoll is 2^6 s: a 1 s holdover is raised to four poll intervals (256 s), so a healthy
    // source is never called lost between its polls.
    let trace = with_holdover(1.0, None).run();
    assert!(
        trace
            .points
            .iter()
            .filter(|p| p.t > 60.0 && p.t < LOSS)
            .all(|p| p.synchronized),
        "flapped while every source answered"
    );
    let lost = first_unsynchronized_after_loss(&trace);
    assert!(
        (LOSS + 256.0 - 64.0..=LOSS + 256.0 + 5.0).contains(&lost),
        "lost at {lost} s"
    );
}

#[test]
fn local_stratum_serves_the_free_running_clock_after_holdover() {
    let trace = with_holdover(600.0, Some(10)).run();
    let state = trace.final_state.expect("state");
    // Not synchronized (status, NodeClock, readiness) ...
    assert!(!state.synchronized);
    // ... but answered at the local stratum with a LOCL reference, not LI=3.
    let served = trace.final_server_state.expect("server state");
    assert!(served.synchronized);
    assert_eq!(served.stratum, 10);
    assert_eq!(&served.reference_id.0, b"LOCL");
    assert_ne!(served.leap, stratum_ntp::packet::LeapIndicator::Unknown);
}

#[test]
fn holdover_and_local_stratum_are_validated() {
    let mut config = stratum_ntp::system::SystemConfig {
        holdover: Some(-1.0),
        ..Default::default()
    };
    assert!(config.validate().is_err());
    config.holdover = Some(f64::NAN);
    assert!(config.validate().is_err());
    config.holdover = Some(0.0);
    assert!(config.validate().is_ok());
    config.local_stratum = Some(16);
    assert!(config.validate().is_err());
    config.local_stratum = Some(0);
    assert!(config.validate().is_err());
    config.local_stratum = Some(15);
    assert!(config.validate().is_ok());
}

#[test]
fn sources_coming_back_after_holdover_resynchronize_without_a_step() {
    let mut s = with_holdover(600.0, None);
    s.outage = Some((LOSS, LOSS + 1200.0));
    let trace = s.run();
    let lost = first_unsynchronized_after_loss(&trace);
    assert!(lost < LOSS + 1200.0, "lost at {lost} s");
    let regained = trace
        .points
        .iter()
        .find(|p| p.t > LOSS + 1200.0 && p.synchronized)
        .expect("resynchronizes")
        .t;
    assert!(regained < LOSS + 1200.0 + 300.0, "regained at {regained} s");
    // The clock ran free for 20 min only: slewed back, never stepped after the start.
    assert!(
        trace.steps.iter().all(|(t, _)| *t < 60.0),
        "{:?}",
        trace.steps
    );
}
