//! Must-show 3: after the step window a 200 ms upstream jump is slewed, never stepped, time
//! never goes backwards; a 1 h jump beyond the run-time panic threshold is refused.
use stratum_ntp::clock::Refusal;
use stratum_ntp::sim::scenarios;

#[test]
fn upstream_jumps_after_the_step_window_are_slewed_or_refused_never_stepped() {
    let trace = scenarios::upstream_jumps().run();
    // Only the startup step (−0.3 s) in the first seconds.
    assert_eq!(trace.steps.len(), 1, "{:?}", trace.steps);
    assert!(trace.steps[0].0 < 16.0);
    assert!(
        trace.backward_jumps.iter().all(|(t, _)| *t < 16.0),
        "time went backwards after start: {:?}",
        trace.backward_jumps
    );

    // The 200 ms jump at 1 h: slewed at no more than max_slew_ppm (500) plus the base
    // frequency, and followed within 0.2 s / 500 ppm = 400 s plus confirmation.
    let slewing: Vec<_> = trace
        .points
        .iter()
        .filter(|p| p.t > 3600.0 && p.t < 3.0 * 3600.0)
        .collect();
    let max_rate = slewing.iter().map(|p| p.rate_ppm.abs()).fold(0.0, f64::max);
    assert!(max_rate <= 501.0, "slew rate {max_rate} ppm");
    let followed = slewing
        .iter()
        .find(|p| (p.error - 0.2).abs() < 1e-3)
        .map(|p| p.t - 3600.0)
        .expect("follows the 200 ms jump");
    assert!(followed < 900.0, "took {followed} s");
    assert!(trace.max_abs_error(2.0 * 3600.0, 3.0 * 3600.0) < 0.2 + 1e-3);
    // Waiting for confirmation of the jump is not a loss of synchronization.
    assert!(slewing.iter().all(|p| p.synchronized));

    // The 1 h jump at 3 h: refused and reported, clock untouched, unsynchronized.
    let refusal = trace
        .refusals
        .iter()
        .find(|(t, _)| *t > 3.0 * 3600.0)
        .map(|(_, r)| *r);
    assert!(
        matches!(refusal, Some(Refusal::PanicThreshold { threshold, .. }) if threshold == 1000.0),
        "{refusal:?}"
    );
    let end = trace.points.last().expect("trace");
    assert!((end.error - 0.2).abs() < 0.01, "clock moved: {}", end.error);
    assert!(!end.synchronized);
    let state = trace.final_state.expect("state");
    assert!(state.refusal.is_some());
}
