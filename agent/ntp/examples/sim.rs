//! Runs the must-show scenarios of issue 3 on simulated time and prints their figures.
//!
//!     cargo run -p stratum-ntp --release --example sim
//!
//! Every figure here is also asserted (with margins) by the tests in `tests/`.

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;
use stratum_ntp::leap::LeapMode;
use stratum_ntp::server::{
    ClientRateLimit, PrefixTrie, RateLimiter, RefusalLimit, ServerPolicy, TenantConfig,
};
use stratum_ntp::sim::{Trace, scenarios};
use stratum_ntp::time::ClockTime;

fn us(seconds: f64) -> String {
    format!("{:.1} µs", seconds * 1e6)
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "never".to_string(), |v| format!("{v:.1} s"))
}

fn pair(trace: &Trace, from: f64, to: f64) -> String {
    format!(
        "{} / {}",
        us(trace.rms_error(from, to)),
        us(trace.max_abs_error(from, to))
    )
}

fn row(figure: &str, value: String) {
    println!("  {figure:<58} {value}");
}

fn main() {
    let wall = Instant::now();

    println!("1. start at +0.5 s / +100 ppm, 4 sources, 1 ms RTT, 100 µs jitter");
    let startup = scenarios::startup().run();
    row("steps (time, size)", format!("{:?}", startup.steps));
    row("first |offset| < 1 ms", secs(startup.first_below(1e-3)));
    row(
        "|offset| < 1 ms from then on",
        secs(startup.settled_below(1e-3)),
    );
    row(
        "steady-state RMS offset (1 h .. 3 h)",
        us(startup.rms_error(3600.0, 10_800.0)),
    );
    row(
        "steady-state max |offset| (1 h .. 3 h)",
        us(startup.max_abs_error(3600.0, 10_800.0)),
    );
    if let Some(state) = &startup.final_state {
        row(
            "final frequency correction",
            format!("{:.3} ppm (true −100 ± wander)", state.frequency_ppm),
        );
    }

    println!("2. five sources, two lying (+1 h, −50 ms)");
    let liars = scenarios::falsetickers().run();
    let liar_ids = [liars.source_ids[1], liars.source_ids[3]];
    row(
        "liars ever selected or combined",
        format!(
            "{}",
            liars
                .ever_used
                .iter()
                .filter(|id| liar_ids.contains(id))
                .count()
        ),
    );
    row(
        "max |offset| over the whole run",
        us(liars.max_abs_error(0.0, f64::INFINITY)),
    );
    if let Some(state) = &liars.final_state {
        let marks: Vec<String> = state
            .sources
            .iter()
            .map(|s| format!("{}={:?}", s.name, s.state))
            .collect();
        row("final source states", marks.join(" "));
    }

    println!("3. upstream jumps after the step window: +200 ms at 1 h, +1 h at 3 h");
    let jumps = scenarios::upstream_jumps().run();
    row("steps (time, size)", format!("{:?}", jumps.steps));
    row(
        "local time went backwards (all, incl. startup step)",
        format!("{:?}", jumps.backward_jumps),
    );
    row(
        "...after the step window",
        format!(
            "{} times",
            jumps
                .backward_jumps
                .iter()
                .filter(|(t, _)| *t > 60.0)
                .count()
        ),
    );
    let followed = jumps
        .points
        .iter()
        .find(|p| p.t > 3600.0 && (p.error - 0.2).abs() < 1e-3)
        .map(|p| p.t - 3600.0);
    row("200 ms jump slewed to within 1 ms after", secs(followed));
    let slew_rate = jumps
        .points
        .iter()
        .filter(|p| p.t > 3600.0 && p.t < 3.0 * 3600.0)
        .map(|p| p.rate_ppm.abs())
        .fold(0.0, f64::max);
    row(
        "max |clock rate error| while slewing",
        format!("{slew_rate:.1} ppm"),
    );
    let panic = jumps.refusals.iter().find(|(t, _)| *t > 3.0 * 3600.0);
    row("1 h jump", format!("{panic:?}"));
    if let Some(state) = &jumps.final_state {
        row(
            "after the 1 h jump: synchronized / refusal",
            format!("{} / {:?}", state.synchronized, state.refusal.is_some()),
        );
    }

    println!("4. leap second (inserted 2016-12-31T23:59:60Z)");
    let kernel = scenarios::leap(LeapMode::Kernel, 3).run();
    row(
        "kernel mode, 3 of 4 announce: leaps applied",
        format!("{}", kernel.leaps_applied),
    );
    // Trace points are 10 s apart; the one at midnight itself falls in the few µs when UTC has
    // leapt and the local clock (a few µs behind) not yet, so it is left out.
    let around: Vec<f64> = kernel
        .points
        .iter()
        .filter(|p| (p.t - 14.0 * 3600.0).abs() <= 3600.0 && (p.t - 14.0 * 3600.0).abs() > 1.0)
        .map(|p| p.error.abs())
        .collect();
    row(
        "kernel mode: max |offset| within ±1 h of the leap",
        us(around.iter().copied().fold(0.0, f64::max)),
    );
    let minority = scenarios::leap(LeapMode::Kernel, 1).run();
    row(
        "kernel mode, 1 of 4 announce: leaps applied",
        format!("{}", minority.leaps_applied),
    );
    let smear = scenarios::leap(LeapMode::Smear, 4).run();
    row(
        "smear mode: steps / leaps applied by kernel",
        format!("{} / {}", smear.steps.len(), smear.leaps_applied),
    );
    let smear_rate = 1e6 / 86_400.0;
    let max_rate = smear
        .points
        .iter()
        .filter(|p| p.t > 600.0)
        .map(|p| p.rate_ppm.abs())
        .fold(0.0, f64::max);
    row(
        "smear mode: max |clock rate vs UTC| (smear rate 11.574 ppm)",
        format!("{max_rate:.3} ppm"),
    );
    row(
        "smear mode: |offset| after the window",
        us(smear.max_abs_error(27.0 * 3600.0, 28.0 * 3600.0)),
    );
    let _ = smear_rate;

    println!("5. drift file (start as in 1; the file says −100 ppm ± 0.1 ppm)");
    let with_drift = scenarios::startup_with_drift().run();
    for bound in [100e-6, 50e-6] {
        row(
            &format!("|offset| < {} for good, without drift file", us(bound)),
            secs(startup.settled_below(bound)),
        );
        row(
            &format!("|offset| < {} for good, with drift file", us(bound)),
            secs(with_drift.settled_below(bound)),
        );
    }
    row(
        "max |offset| 1 s .. 60 s, without drift file",
        us(startup.max_abs_error(1.0, 60.0)),
    );
    row(
        "max |offset| 1 s .. 60 s, with drift file",
        us(with_drift.max_abs_error(1.0, 60.0)),
    );
    // One seed of a slow-polling scenario says little (a handful of samples an hour), so
    // this figure is the median over 20 seeds.
    let mut public: Vec<(f64, f64)> = (0..20u64)
        .map(|seed| {
            let mut scenario = scenarios::startup_default_poll();
            scenario.seed = 1000 + seed;
            scenario.clock.seed = 2000 + seed;
            let trace = scenario.run();
            (
                trace.rms_error(3600.0, 10_800.0),
                trace.max_abs_error(3600.0, 10_800.0),
            )
        })
        .collect();
    public.sort_by(|a, b| a.0.total_cmp(&b.0));
    row(
        "(extra) default polls 2^6..2^10, 20 seeds: median RMS / its max",
        format!("{} / {}", us(public[10].0), us(public[10].1)),
    );

    println!("6. all sources lost after 1 h");
    let holdover = scenarios::holdover().run();
    print_holdover(&holdover);

    println!("6b. route change: 20 ms more on the way back at 180 s (one source, poll 2^2 s)");
    let route = scenarios::route_change(None).run();
    row(
        "RMS / max |offset| 60 s .. 180 s",
        pair(&route, 60.0, 180.0),
    );
    row(
        "RMS / max |offset| 180 s .. 600 s",
        pair(&route, 180.0, 600.0),
    );
    let restored = scenarios::route_change(Some(400.0)).run();
    row(
        "...route restored at 400 s: 400 s .. 600 s",
        pair(&restored, 400.0, 600.0),
    );
    println!("6c. rough network (20 ms, 2 ms jitter, 20 % loss), 48 seeds");
    let rms: Vec<f64> = (0..48u64)
        .map(|seed| {
            scenarios::rough_network_seeded(seed)
                .run()
                .rms_error(3600.0, 10_800.0)
        })
        .collect();
    let mut sorted = rms.clone();
    sorted.sort_by(f64::total_cmp);
    row(
        "RMS offset 1 h .. 3 h: median / worst seed",
        format!(
            "{} / {}",
            us(sorted[sorted.len() / 2]),
            us(sorted[sorted.len() - 1])
        ),
    );

    println!(
        "(scenarios 1-6 simulated in {:.2} s of wall time)",
        wall.elapsed().as_secs_f64()
    );

    println!("7. server policy");
    server_figures();
    println!("8. codec fuzzing: see agent/ntp/fuzz/README.md (`make fuzz`)");
}

fn print_holdover(trace: &Trace) {
    let at_loss = trace.points.iter().find(|p| p.t >= 3600.0);
    if let Some(p) = at_loss {
        row("root distance at loss", us(p.root_distance));
    }
    for hours in [2.0, 6.0, 12.0, 24.0] {
        if let Some(p) = trace.points.iter().find(|p| p.t >= 3600.0 * (1.0 + hours)) {
            row(
                &format!("root distance {hours} h after loss"),
                format!("{:.3} s", p.root_distance),
            );
        }
    }
    let lost = trace
        .points
        .iter()
        .find(|p| p.t > 3600.0 && !p.synchronized)
        .map(|p| (p.t - 3600.0) / 3600.0);
    row(
        "synchronized turned false after",
        lost.map_or("never".into(), |h| format!("{h:.2} h")),
    );
    row(
        "offset when sync was lost",
        us(trace
            .points
            .iter()
            .find(|p| p.t > 3600.0 && !p.synchronized)
            .map_or(f64::NAN, |p| p.error)),
    );
}

fn server_figures() {
    let mut rng = StdRng::seed_from_u64(7);
    let prefixes: Vec<IpNet> = (0..100_000)
        .map(|_| {
            if rng.random_bool(0.7) {
                let addr = IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()));
                IpNet::new(addr, rng.random_range(8..=32)).map(|n| n.trunc())
            } else {
                let addr = IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()));
                IpNet::new(addr, rng.random_range(16..=128)).map(|n| n.trunc())
            }
        })
        .filter_map(Result::ok)
        .collect();
    let built = Instant::now();
    let mut trie = PrefixTrie::with_expected_len(prefixes.len());
    for (i, net) in prefixes.iter().enumerate() {
        trie.insert(*net, i as u32);
    }
    let build_ms = built.elapsed().as_secs_f64() * 1e3;
    row(
        "100k-prefix trie build time",
        format!(
            "{build_ms:.1} ms ({} nodes, {:.1} MiB)",
            trie.node_count(),
            trie.node_count() as f64 * 128.0 / 1048576.0
        ),
    );
    let queries: Vec<IpAddr> = (0..1_000_000)
        .map(|i| {
            if i % 3 == 0 {
                IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            }
        })
        .collect();
    let looked = Instant::now();
    let mut hits = 0usize;
    for q in &queries {
        hits += usize::from(black_box(trie.lookup(*q)).is_some());
    }
    let per_lookup = looked.elapsed().as_secs_f64() / queries.len() as f64;
    row(
        "trie lookup (1M random v4/v6 addresses)",
        format!("{:.0} ns each ({hits} hits)", per_lookup * 1e9),
    );

    let tenant = TenantConfig {
        name: "open".into(),
        allow: vec![
            "0.0.0.0/0".parse().expect("prefix"),
            "::/0".parse().expect("prefix"),
        ],
        allow_except: Vec::new(),
        deny: Vec::new(),
        kod_not_allowed: false,
        client_rate_limit: Some(ClientRateLimit::default()),
        budget: None,
        max_root_distance: None,
        refusals: RefusalLimit::default(),
    };
    let policy = ServerPolicy::new(&[tenant]);
    let mut limiter = RateLimiter::new(4096, 1);
    let start = ClockTime::from_unix_secs(1_700_000_000);
    let decided = Instant::now();
    for i in 0..1_000_000u32 {
        let src = IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)));
        black_box(policy.decide(&mut limiter, 0, src, start.add_nanos(i64::from(i) * 1000)));
    }
    let per_decision = decided.elapsed().as_secs_f64() / 1e6;
    row(
        "client table after 10^6 distinct sources",
        format!(
            "{} of {} slots (fixed)",
            limiter.occupied(),
            limiter.capacity()
        ),
    );
    row(
        "policy decision (allow trie + rate table)",
        format!("{:.0} ns each", per_decision * 1e9),
    );
}
