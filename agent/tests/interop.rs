//! The agent against real NTP servers on loopback: chronyd from Debian (`-x`: serves, never
//! adjusts), one of them shifted by libfaketime to play a falseticker. The agent drives a
//! simulated clock started 0.3 s and 50 ppm off; this machine's clock is never touched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;

fn servers(dir: &std::path::Path, block: u8, n: u8) -> (Vec<Proc>, Vec<SocketAddr>) {
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 1..=n {
        let ip = Ipv4Addr::new(127, block, 0, i);
        let port = free_udp_port(ip);
        procs.push(chronyd(dir, ip, port, None));
        addrs.push(SocketAddr::from((ip, port)));
    }
    (procs, addrs)
}

#[test]
fn agent_converges_on_four_chronyd_and_becomes_ready() {
    let dir = TempDir::new("converge");
    let (_servers, addrs) = servers(dir.path(), 21, 4);
    let agent = Agent::start(
        dir.path(),
        21,
        &agent_config("r1", &addrs, 3, dir.path()),
        0.3,
        50.0,
    );
    wait_for(Duration::from_secs(30), "agent ready", || agent.ready());
    // Reported, not asserted: benchmarks make performance claims, tests pin behaviour.
    eprintln!(
        "start-to-ready against 4 chronyd sources: {:.3} s",
        agent.started.elapsed().as_secs_f64()
    );

    // Converged: the node clock's offset (simulated: 0.3 s off at start) is now tiny, and the
    // frequency correction cancels the injected +50 ppm.
    wait_for(
        Duration::from_secs(60),
        "offset below 1 ms and frequency near -50 ppm",
        || {
            let s = agent.status().unwrap_or_default();
            let offset = s["tracking"]["offsetSeconds"].as_f64().unwrap_or(1.0);
            let freq = s["tracking"]["frequencyPpm"].as_f64().unwrap_or(0.0);
            offset.abs() < 1e-3 && (freq + 50.0).abs() < 5.0
        },
    );
    let s = agent.status().unwrap();
    // Not only the estimate: the simulated clock itself is within 1 ms of true time (the
    // host's clock, which the four chronyd serve).
    let truth = s["tracking"]["simulatedErrorSeconds"]
        .as_f64()
        .expect("a simulated clock reports its actual error");
    assert!(truth.abs() < 1e-3, "actual error {truth} s");
    assert_eq!(
        s["tracking"]["steps"], 1,
        "exactly one step, in the initial burst"
    );
    assert_eq!(
        s["tracking"]["stratum"], 3,
        "one below chronyd's local stratum 2"
    );
    let states = source_states(&s);
    assert_eq!(states.len(), 4);
    assert_eq!(states.iter().filter(|(_, st)| st == "selected").count(), 1);

    // The ops surface agrees.
    let (code, metrics) = agent.get_metrics_port("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("stratum_agent_synchronized 1"));
    assert!(
        metrics.contains("clock=\"simulated\""),
        "the system clock backend is never used in tests"
    );
    // The last update is recent on the host's clock, which is what alerts compare it with.
    let last_update: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stratum_agent_last_update_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("stratum_agent_last_update_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (0.0..120.0).contains(&(now - last_update)),
        "last update {last_update}, now {now}"
    );
    assert_eq!(agent.get_metrics_port("/healthz").unwrap().0, 200);
}

#[test]
fn falseticker_server_is_marked_and_never_selected() {
    let dir = TempDir::new("falseticker");
    let (_servers, mut addrs) = servers(dir.path(), 22, 3);
    let liar_ip = Ipv4Addr::new(127, 22, 0, 9);
    let liar_port = free_udp_port(liar_ip);
    let _liar = chronyd(dir.path(), liar_ip, liar_port, Some("+10s"));
    let liar = SocketAddr::from((liar_ip, liar_port)).to_string();
    addrs.push(liar.parse().unwrap());
    let agent = Agent::start(
        dir.path(),
        22,
        &agent_config("r1", &addrs, 3, dir.path()),
        0.3,
        50.0,
    );

    // Watch every status until the liar is marked: it must never be selected or combined.
    wait_for(
        Duration::from_secs(30),
        "the +10 s server marked falseticker",
        || {
            let Some(s) = agent.status() else {
                return false;
            };
            let states = source_states(&s);
            let liar_state = states
                .iter()
                .find(|(a, _)| *a == liar)
                .map(|(_, st)| st.clone())
                .unwrap_or_default();
            assert!(
                liar_state != "selected" && liar_state != "combined",
                "falseticker used: {states:?}"
            );
            liar_state == "falseticker" && s["tracking"]["synchronized"] == true
        },
    );
    // And it stays so: checked again after each of the next two samples from any source (the
    // sources' view changes only with a sample, so re-reading it in between shows nothing new).
    let mut seen = agent.status().unwrap()["sources"].clone();
    for _ in 0..2 {
        wait_for(Duration::from_secs(40), "a new sample", || {
            agent.status().is_some_and(|s| s["sources"] != seen)
        });
        let s = agent.status().unwrap();
        let liar_state = source_states(&s)
            .into_iter()
            .find(|(a, _)| *a == liar)
            .unwrap()
            .1;
        assert_eq!(liar_state, "falseticker");
        let offset = s["tracking"]["offsetSeconds"].as_f64().unwrap();
        assert!(offset.abs() < 0.01, "the liar pulled the clock: {offset}");
        seen = s["sources"].clone();
    }
    let (_, metrics) = agent.get_metrics_port("/metrics").unwrap();
    // Labelled by the configured name and a member index, not the address.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stratum_agent_source_state{")
                && l.contains(&format!("source=\"{liar_ip}\""))
                && l.contains("member=\"0\"")
                && l.contains("state=\"falseticker\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&liar),
        "no series names an address: {metrics}"
    );
}

#[test]
fn stratumctl_views_and_query_agree_with_chrony_and_ntpsec() {
    let dir = TempDir::new("ctl");
    let (_servers, addrs) = servers(dir.path(), 23, 3);
    let agent = Agent::start(
        dir.path(),
        23,
        &agent_config("r1", &addrs, 3, dir.path()),
        0.3,
        50.0,
    );
    wait_for(Duration::from_secs(30), "agent ready", || agent.ready());

    let tracking = agent.ctl(&["tracking"]);
    let text = String::from_utf8_lossy(&tracking.stdout);
    assert!(tracking.status.success(), "{text}");
    assert!(text.contains("Synchronized    : yes"), "{text}");
    assert!(text.contains("Stratum         : 3"), "{text}");
    // The JSON view names what it is of, beside the figures.
    let tracking: serde_json::Value =
        serde_json::from_slice(&agent.ctl(&["--json", "tracking"]).stdout).unwrap();
    assert_eq!(tracking["configRevision"], "r1", "{tracking}");
    assert!(tracking["node"].is_string() && tracking["timeService"].is_string());
    assert_eq!(tracking["synchronized"], true);
    // Every view in JSON and YAML carries the same identity beside its figures (`--json` is
    // the old spelling of `-o json`).
    let sources: serde_json::Value =
        serde_json::from_slice(&agent.ctl(&["-o", "json", "sources"]).stdout).unwrap();
    for view in [
        "tracking",
        "sources",
        "sourcestats",
        "serverstats",
        "clients",
    ] {
        let yaml = agent.ctl(&[view, "-o", "yaml"]);
        assert!(yaml.status.success(), "{view} -o yaml");
        let parsed: serde_json::Value =
            serde_yaml::from_slice(&yaml.stdout).unwrap_or_else(|e| panic!("{view} -o yaml: {e}"));
        for field in ["node", "timeService", "version", "clock"] {
            assert_eq!(parsed[field], sources[field], "{view} -o yaml: {field}");
        }
        assert_eq!(parsed["configRevision"], "r1", "{view} -o yaml");
        let json: serde_json::Value =
            serde_json::from_slice(&agent.ctl(&["--json", view]).stdout).unwrap();
        assert_eq!(json["configRevision"], "r1", "{view} --json");
    }
    let sources = sources["sources"].clone();
    assert_eq!(sources.as_array().unwrap().len(), 3);
    // `-o wide`: the configured name and the address in columns of their own, plus the
    // regression's samples; tracking adds root distance, last update and agent lines.
    let wide = String::from_utf8_lossy(&agent.ctl(&["sources", "-o", "wide"]).stdout).to_string();
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header[..2], ["Name", "Address"], "{wide}");
    assert!(header.contains(&"NP"), "{wide}");
    for source in sources.as_array().unwrap() {
        let address = source["address"].as_str().unwrap();
        let row: Vec<&str> = wide
            .lines()
            .find(|l| l.contains(address))
            .unwrap_or_else(|| panic!("no row for {address}: {wide}"))
            .split_whitespace()
            .collect();
        assert!(row.contains(&address) && row.contains(&source["name"].as_str().unwrap()));
    }
    let tracking_wide =
        String::from_utf8_lossy(&agent.ctl(&["tracking", "-o", "wide"]).stdout).to_string();
    for line in [
        "Root distance   : ",
        "Last update     : ",
        "Agent           : version ",
    ] {
        assert!(
            tracking_wide.contains(line),
            "{line:?} in:\n{tracking_wide}"
        );
    }
    assert!(
        !text.contains("Root distance"),
        "text stays as it was: {text}"
    );
    let table = String::from_utf8_lossy(&agent.ctl(&["sources"]).stdout).to_string();
    assert!(
        table.lines().any(|l| l.starts_with('*')),
        "a selected source is marked: {table}"
    );
    // sourcestats: every source's regression, its sample count in the JSON and the table.
    let stats = agent.ctl(&["sourcestats"]);
    let stats_table = String::from_utf8_lossy(&stats.stdout).to_string();
    assert!(stats.status.success(), "{stats_table}");
    assert!(stats_table.starts_with("Source "), "{stats_table}");
    for source in sources.as_array().unwrap() {
        let samples = source["samples"].as_u64().unwrap();
        assert!(samples >= 1, "{source}");
        let address = source["address"].as_str().unwrap();
        let row = stats_table
            .lines()
            .find(|l| l.contains(address))
            .unwrap_or_else(|| panic!("no row for {address}: {stats_table}"));
        let np: u64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(np, samples, "{row}");
        assert!(source["residualRuns"].as_u64().unwrap() >= 1, "{source}");
    }

    // `query` agrees with ntpsec's ntpdig and chronyd -Q on the same server within their
    // combined error (all on loopback: tens of microseconds). ntpdig only speaks to port 123,
    // so this server gets its own loopback address on 123.
    let reference_ip = Ipv4Addr::new(127, 23, 0, 123);
    let _reference = chronyd(dir.path(), reference_ip, 123, None);
    let server = SocketAddr::from((reference_ip, 123));
    let query = || -> Option<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stratumctl"))
            .args([
                "--json",
                "query",
                "--timeout",
                "1",
                &reference_ip.to_string(),
            ])
            .output()
            .ok()?;
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        answer["offsetSeconds"].is_f64().then_some(answer)
    };
    // chronyd binds its port a moment after it starts.
    wait_for(
        Duration::from_secs(10),
        "the reference chronyd answering",
        || query().is_some(),
    );
    let ours = query().expect("the reference chronyd stopped answering");
    let our_offset = ours["offsetSeconds"].as_f64().unwrap();
    // Every party reads this host's clock, so each one-shot offset is off by at most its
    // round-trip delay (asymmetry, scheduling on a busy machine); the bound below is that
    // delay plus 500 µs for the other tool's own delay and timestamping.
    let tolerance = 500e-6 + ours["delaySeconds"].as_f64().unwrap();
    assert_eq!(ours["stratum"], 2);
    assert_eq!(ours["leap"], "none");
    assert_eq!(ours["server"], server.to_string());

    // ntpdig (Python) takes its own timestamps around the exchange; on a busy machine one of
    // them can land milliseconds late, which its error bound (`precision`: half its delay plus
    // dispersion) then shows. Of three one-shot queries the tightest counts, as NTP's clock
    // filter keeps the least-delayed sample, and its own bound widens the tolerance.
    let ntpdig = (0..3)
        .map(|_| {
            let out = std::process::Command::new(require("ntpdig"))
                .args(["-j", "-t", "2", &reference_ip.to_string()])
                .output()
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "ntpdig output: {e}: {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
        })
        .min_by(|a, b| {
            let bound = |v: &serde_json::Value| v["precision"].as_f64().unwrap_or(f64::MAX);
            bound(a).total_cmp(&bound(b))
        })
        .unwrap();
    let ntpdig_offset = ntpdig["offset"].as_f64().unwrap();
    let ntpdig_bound = ntpdig["precision"].as_f64().unwrap();
    assert_eq!(ntpdig["stratum"], 2);
    assert!(
        (our_offset - ntpdig_offset).abs() < tolerance + ntpdig_bound,
        "stratumctl query {our_offset} vs ntpdig {ntpdig_offset} ± {ntpdig_bound} (tolerance \
         {tolerance})"
    );

    let chrony_q = std::process::Command::new(require("chronyd"))
        .args([
            "-Q",
            "-t",
            "10",
            &format!("server {} port {} iburst", server.ip(), server.port()),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&chrony_q.stderr).to_string()
        + &String::from_utf8_lossy(&chrony_q.stdout);
    // "System clock wrong by -0.000012 seconds (ignored)": local − server, opposite sign to ours.
    let chrony_offset: f64 = out
        .split("wrong by ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected chronyd -Q output: {out}"));
    assert!(
        (our_offset + chrony_offset).abs() < tolerance,
        "stratumctl query {our_offset} vs chronyd -Q {chrony_offset} (tolerance {tolerance})"
    );
}

#[test]
fn config_reload_adds_and_removes_upstreams_without_restart_and_rejects_bad_config() {
    let dir = TempDir::new("reload");
    let (_servers, addrs) = servers(dir.path(), 24, 4);
    let agent = Agent::start(
        dir.path(),
        24,
        &agent_config("r1", &addrs[..3], 2, dir.path()),
        0.0,
        0.0,
    );
    wait_for(Duration::from_secs(30), "agent ready", || agent.ready());
    let pid = agent.pid();

    // Add the fourth upstream.
    write_config(&agent.config, &agent_config("r2", &addrs, 2, dir.path()));
    wait_for(
        Duration::from_secs(10),
        "four sources after adding one",
        || {
            agent.status().is_some_and(|s| {
                s["identity"]["configRevision"] == "r2" && source_states(&s).len() == 4
            })
        },
    );
    // Remove the first; the others keep their samples (still selected/combined, no re-burst).
    write_config(
        &agent.config,
        &agent_config("r3", &addrs[1..], 2, dir.path()),
    );
    wait_for(
        Duration::from_secs(10),
        "three sources after removing one",
        || {
            agent.status().is_some_and(|s| {
                let states = source_states(&s);
                s["identity"]["configRevision"] == "r3"
                    && states.len() == 3
                    && !states.iter().any(|(a, _)| *a == addrs[0].to_string())
            })
        },
    );
    assert!(agent.ready(), "reload kept the agent synchronized");

    // An invalid config is rejected; r3 stays in force and the reason is visible.
    let mut bad = agent_config("r4", &addrs[1..], 2, dir.path());
    bad["upstreams"][0]["minPoll"] = 12.into();
    bad["upstreams"][0]["maxPoll"] = 6.into();
    write_config(&agent.config, &bad);
    wait_for(Duration::from_secs(10), "the bad config reported", || {
        agent.status().is_some_and(|s| {
            s["identity"]["configError"]
                .as_str()
                .is_some_and(|e| e.contains("minPoll"))
        })
    });
    let s = agent.status().unwrap();
    assert_eq!(s["identity"]["configRevision"], "r3");
    assert_eq!(source_states(&s).len(), 3);
    let (_, metrics) = agent.get_metrics_port("/metrics").unwrap();
    assert!(
        metrics.contains("stratum_agent_config_reloads_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert_eq!(agent.pid(), pid, "no restart");
    assert!(agent.proc.child.id() == pid && agent.ready());

    // The gzip form (what the operator writes into binaryData) is read too; a corrupt one is
    // rejected with the reason, and the config in force stays.
    let gz = stratum_api::agent_config::gzip(
        agent_config("r5", &addrs[1..], 2, dir.path())
            .to_string()
            .as_bytes(),
    );
    write_bytes(&agent.config, &gz);
    wait_for(
        Duration::from_secs(10),
        "the gzipped config applied",
        || {
            agent
                .status()
                .is_some_and(|s| s["identity"]["configRevision"] == "r5")
        },
    );
    write_bytes(&agent.config, &gz[..gz.len() / 2]);
    wait_for(Duration::from_secs(10), "the corrupt gzip reported", || {
        agent.status().is_some_and(|s| {
            s["identity"]["configError"]
                .as_str()
                .is_some_and(|e| e.contains("gzip"))
        })
    });
    let s = agent.status().unwrap();
    assert_eq!(s["identity"]["configRevision"], "r5");
    assert_eq!(source_states(&s).len(), 3);
    assert!(agent.ready(), "still serving the last good config");
}

fn write_bytes(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn the_configs_log_level_is_applied_at_start_and_on_every_reload() {
    let dir = TempDir::new("loglevel");
    // An upstream nobody answers: the agent logs each unanswered request at debug.
    let ip = Ipv4Addr::new(127, 25, 0, 1);
    let silent = SocketAddr::from((ip, free_udp_port(ip)));
    let mut config = agent_config("r1", &[silent], 1, dir.path());
    config["logLevel"] = "debug".into();
    let agent = Agent::start(dir.path(), 25, &config, 0.0, 0.0);
    let reloads = |n: u32| {
        agent.get_metrics_port("/metrics").is_some_and(|(_, body)| {
            body.contains(&format!(
                "stratum_agent_config_reloads_total{{result=\"applied\"}} {n}"
            ))
        })
    };
    wait_for(Duration::from_secs(20), "debug lines in the log", || {
        agent.proc.log_text().contains("DEBUG")
    });
    // Written to a file, the text log carries no colour codes.
    assert!(
        !agent.proc.log_text().contains('\x1b'),
        "ANSI escapes in a log file"
    );
    // At info a reload is logged ("config applied"); at error it is not.
    for (n, level, logged) in [(2, "info", 1), (3, "error", 1)] {
        config["logLevel"] = level.into();
        config["revision"] = format!("r{n}").into();
        write_config(&agent.config, &config);
        wait_for(Duration::from_secs(20), "the new config applied", || {
            reloads(n)
        });
        let log = agent.proc.log_text();
        assert_eq!(
            log.matches("config applied").count(),
            logged,
            "logLevel {level}: {log}"
        );
    }
}
