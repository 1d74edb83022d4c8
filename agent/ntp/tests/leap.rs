//! Must-show 4: a leap second announced by a majority is inserted exactly once; in smear
//! mode nothing steps and the clock's rate stays within the smear's.
use stratum_ntp::leap::LeapMode;
use stratum_ntp::sim::scenarios;

const LEAP_AT: f64 = 14.0 * 3600.0;

#[test]
fn leap_announced_by_a_majority_is_inserted_exactly_once() {
    let trace = scenarios::leap(LeapMode::Kernel, 3).run();
    assert_eq!(trace.leaps_applied, 1);
    assert!(trace.steps.is_empty());
    // Before and after the leap the clock tracks UTC (the sample exactly at midnight falls
    // in the microseconds between UTC's leap and the local clock's).
    let worst = trace
        .points
        .iter()
        .filter(|p| (p.t - LEAP_AT).abs() > 1.0 && p.t > 60.0)
        .map(|p| p.error.abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-3, "max |offset| {worst}");
}

#[test]
fn leap_announced_by_a_minority_is_not_applied() {
    let trace = scenarios::leap(LeapMode::Kernel, 1).run();
    assert_eq!(trace.leaps_applied, 0);
}

#[test]
fn smeared_leap_never_steps_and_keeps_the_rate_within_the_smear() {
    let trace = scenarios::leap(LeapMode::Smear, 4).run();
    assert!(trace.steps.is_empty(), "{:?}", trace.steps);
    assert_eq!(trace.leaps_applied, 0, "the kernel must not also insert it");
    assert!(trace.backward_jumps.is_empty());
    let smear_ppm = 1e6 / 86_400.0;
    let max_rate = trace
        .points
        .iter()
        .filter(|p| p.t > 600.0)
        .map(|p| p.rate_ppm.abs())
        .fold(0.0, f64::max);
    // The smear itself plus the ordinary discipline's sub-ppm corrections.
    assert!(max_rate <= smear_ppm + 1.5, "rate {max_rate} ppm");
    // Half-way (at the leap) the clock is half a second behind the pre-leap UTC.
    let at_leap = trace
        .points
        .iter()
        .find(|p| p.t >= LEAP_AT - 10.0)
        .expect("trace");
    assert!((at_leap.error + 0.5).abs() < 1e-2, "{}", at_leap.error);
    // After the window the clock is back on UTC.
    let after = trace.max_abs_error(27.0 * 3600.0, 28.0 * 3600.0);
    assert!(after < 1e-3, "{after}");
}
