//! Must-show 2: five sources, two lying (+1 h and −50 ms, disagreeing with each other).
use stratum_ntp::sim::scenarios;
use stratum_ntp::system::SourceState;

#[test]
fn falseticker_minority_is_never_selected_and_clock_stays_within_a_millisecond() {
    let trace = scenarios::falsetickers().run();
    let liars = [trace.source_ids[1], trace.source_ids[3]];
    assert!(
        trace.ever_used.iter().all(|id| !liars.contains(id)),
        "a liar was selected or combined: {:?}",
        trace.ever_used
    );
    let worst = trace.max_abs_error(0.0, f64::INFINITY);
    assert!(worst < 1e-3, "max |offset| {worst}");
    let state = trace.final_state.expect("final state");
    assert_eq!(state.sources[1].state, SourceState::Falseticker);
    assert_eq!(state.sources[3].state, SourceState::Falseticker);
    assert!(trace.steps.is_empty());
}
