//! Runs the must-show scenarios on simulated time and prints their figures.
//! `cargo run -p stratum-ntp --release --example sim`
use stratum_ntp::sim::scenarios;

fn main() {
    let t = scenarios::startup().run();
    println!("startup steps {:?}", t.steps);
    println!(
        "first<1ms {:?} settled<1ms {:?} settled<100us {:?}",
        t.first_below(1e-3),
        t.settled_below(1e-3),
        t.settled_below(1e-4)
    );
    println!(
        "rms 1h-3h {:.1} us max {:.1} us",
        t.rms_error(3600.0, 10800.0) * 1e6,
        t.max_abs_error(3600.0, 10800.0) * 1e6
    );
    for p in t
        .points
        .iter()
        .filter(|p| p.t < 40.0 || (p.t as u64).is_multiple_of(600))
    {
        println!(
            "{:8.1} err {:10.1} us rate {:8.3} sync {}",
            p.t,
            p.error * 1e6,
            p.rate_ppm,
            p.synchronized
        );
    }
    if let Some(s) = &t.final_state {
        for src in &s.sources {
            println!(
                "{:?} {:?} poll {} reach {:o} off {:?} jit {:?} skew {:?}",
                src.name, src.state, src.poll, src.reach, src.offset, src.jitter, src.skew_ppm
            );
        }
    }
}
