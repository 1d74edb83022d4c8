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
