//! Must-show 1 and 5: convergence from +0.5 s / +100 ppm, with and without a drift file.
use stratum_ntp::sim::scenarios;

#[test]
fn startup_steps_once_in_the_burst_and_holds_sub_millisecond_then_tens_of_microseconds() {
    let trace = scenarios::startup().run();
    assert_eq!(trace.steps.len(), 1, "steps: {:?}", trace.steps);
    let (step_time, step) = trace.steps[0];
    // The iburst is 8 packets 2 s apart.
    assert!(step_time < 16.0, "stepped at {step_time} s");
    assert!((step + 0.5).abs() < 1e-3, "step of {step} s");
    let settled = trace.settled_below(1e-3).expect("settles below 1 ms");
    assert!(settled <= 10.0, "|offset| < 1 ms only from {settled} s");
    let rms = trace.rms_error(3600.0, 3.0 * 3600.0);
    assert!(rms <= 50e-6, "steady-state RMS {rms}");
    assert!(trace.points.last().is_some_and(|p| p.synchronized));
}

#[test]
fn restoring_a_saved_drift_shortens_convergence() {
    let without = scenarios::startup().run();
    let with = scenarios::startup_with_drift().run();
    for bound in [100e-6, 50e-6] {
        let slow = without
            .settled_below(bound)
            .expect("converges without drift");
        let fast = with.settled_below(bound).expect("converges with drift");
        assert!(
            fast < slow,
            "below {bound}: with drift {fast} s, without {slow} s"
        );
    }
}

#[test]
fn exported_drift_matches_the_oscillator_error() {
    let trace = scenarios::startup().run();
    let state = trace.final_state.expect("final state");
    // The simulated oscillator runs 100 ppm fast (plus a little wander).
    assert!(
        (state.frequency_ppm + 100.0).abs() < 0.5,
        "{}",
        state.frequency_ppm
    );
    assert!(state.frequency_error_ppm < 0.5);
}
