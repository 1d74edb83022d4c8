//! Another time daemon on the node, for real: a chronyd (`-x`: serves, never adjusts) with its
//! command port and the NTP port, and the agent binary beside it, both in a network namespace
//! this test makes (so the agent's view of "the node's sockets" is that namespace's, and
//! nothing here touches the machine's own ports). The agent reports what it sees in
//! `/status`, in the NodeClock conditions it would write and in its metrics, and counts its
//! own tenant port on 123 as its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use stratum_api::AgentConfig;

/// A network namespace with only loopback up; deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Self> {
        let name = format!("stratum-t-hd-{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .ok()?;
        if !made.success() {
            return skip("cannot create a network namespace (needs root and ip netns)");
        }
        let ns = Netns(name);
        assert!(
            ns.exec(&["ip", "link", "set", "lo", "up"])
                .status()
                .unwrap()
                .success()
        );
        Some(ns)
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    /// `GET http://127.0.0.1:{port}{path}` inside the namespace.
    fn http_get(&self, port: u16, path: &str) -> Option<String> {
        let out = self
            .exec(&["curl", "-fsS", "--max-time", "2"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_chronyd_beside_the_agent_is_reported_with_its_evidence() {
    let Some(chronyd) = find_program("chronyd", &[]).or_else(|| skip("chronyd not installed"))
    else {
        return;
    };
    if find_program("curl", &[]).is_none() {
        skip::<()>("curl not installed");
        return;
    }
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = TempDir::new("hostdaemons");
    // chronyd as a node runs it: NTP on 123, its command port 323 on loopback, following an
    // upstream (a second chronyd on 11123), so its tracking report holds real figures.
    std::fs::write(
        dir.path("upstream.conf"),
        format!(
            "port 11123\ncmdport 0\nlocal stratum 1\nallow 127.0.0.0/8\npidfile {}\n",
            dir.path("upstream.pid").display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path("chrony.conf"),
        format!(
            "port 123\nlocal stratum 2\nallow 127.0.0.0/8\nbindcmdaddress 127.0.0.1\n\
             server 127.0.0.1 port 11123 iburst minpoll 0 maxpoll 0\npidfile {}\n",
            dir.path("chronyd.pid").display()
        ),
    )
    .unwrap();
    let chrony_path = chronyd.to_string_lossy().into_owned();
    let chronyd_with = |conf: &str| {
        let conf = dir.path(conf).to_string_lossy().into_owned();
        Child(
            ns.exec(&[
                "setpriv",
                "--bounding-set=-sys_time",
                "--inh-caps=-sys_time",
            ])
            .args([&chrony_path, "-x", "-d", "-u", "root", "-f", &conf])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chronyd"),
        )
    };
    let _upstream = chronyd_with("upstream.conf");
    let _chronyd = chronyd_with("chrony.conf");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let out = ns.exec(&["ss", "-ulnH"]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            text.contains("127.0.0.1:323") && text.contains(":123")
        }),
        "chronyd did not bind its ports"
    );

    // The agent syncs from that chronyd and serves a tenant on port 124.
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    config.upstreams[0].host = "127.0.0.1".into();
    config.upstreams[0].port = 123;
    config.serving.tenants = vec![tenant("ns/a", 124, &["127.0.0.0/8"], false)];
    let config_path = dir.path("agent.json");
    std::fs::write(&config_path, config.to_json()).unwrap();
    let agent_bin = env!("CARGO_BIN_EXE_stratum-agent");
    let config_arg = config_path.to_string_lossy().into_owned();
    let state = dir.path("state").to_string_lossy().into_owned();
    let _agent = Child(
        ns.exec(&[
            agent_bin,
            "run",
            "--node-name",
            "test",
            "--clock",
            "simulated",
        ])
        .args([
            "--no-report",
            "--server-workers",
            "1",
            "--config",
            &config_arg,
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:9123",
            "--status-addr",
            "127.0.0.1:9124",
        ])
        .args(["--state-dir", &state])
        .env("STRATUM_DENY_SYSTEM_CLOCK", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the agent"),
    );
    let mut status = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            status = ns
                .http_get(9124, "/status")
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            !status["identity"]["configRevision"].is_null()
                && !status["identity"]["configRevision"]
                    .as_str()
                    .unwrap_or("")
                    .is_empty()
        }),
        "the agent never published a status"
    );
    let seen = status["tracking"]["otherTimeDaemon"]
        .as_str()
        .unwrap_or_else(|| panic!("no other daemon reported: {status}"));
    eprintln!("reported: {seen}");
    assert!(
        seen.contains("127.0.0.1:323") && seen.contains("chronyd's command port"),
        "{seen}"
    );
    assert!(seen.contains(":123 is bound by another program"), "{seen}");
    // Its own tenant port is not evidence, and a simulated clock yields nothing.
    assert!(!seen.contains(":124"), "{seen}");
    assert!(status["tracking"]["clockYielded"].is_null(), "{status}");

    // chronyd's own view, read on its command port, beside the agent's; the same report
    // `chronyc tracking` prints (its CSV form: reference id, name, stratum, reference time,
    // system time, ...).
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = ns
                .http_get(9124, "/status")
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            !status["tracking"]["hostDaemon"].is_null()
        }),
        "the agent never read chronyd's view: {status}"
    );
    // The agent reads chronyd every 15 s: wait for a read after chronyd took its upstream.
    assert!(
        wait_until(Duration::from_secs(40), || {
            status = ns
                .http_get(9124, "/status")
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            status["tracking"]["hostDaemon"]["reference"] == "127.0.0.1"
        }),
        "the agent never read chronyd following its upstream: {}",
        status["tracking"]["hostDaemon"]
    );
    let view = &status["tracking"]["hostDaemon"];
    assert_eq!(view["daemon"], "chronyd", "{status}");
    assert_eq!(view["synchronized"], true, "{view}");
    assert!(view["error"].is_null(), "{view}");
    let chronyc = ns
        .exec(&["chronyc", "-h", "127.0.0.1", "-c", "tracking"])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&chronyc.stdout).into_owned();
    let fields: Vec<&str> = csv.trim().split(',').collect();
    assert!(fields.len() >= 13, "chronyc -c tracking: {csv:?}");
    eprintln!("agent read chronyd: {view}\nchronyc -c tracking now: {csv}");
    assert_eq!(fields[1], "127.0.0.1", "{csv}");
    // chronyc's "System time" (field 4) is the correction still to apply: the clock's offset
    // is its negation. chronyd updates every second and the agent's read is up to 15 s old,
    // so the two agree to the microseconds that loopback allows, not exactly; a field read
    // from the wrong place (the frequency in ppm, the update interval of 1 s) would not.
    let chrony_offset = -fields[4].parse::<f64>().unwrap();
    let read = view["offsetSeconds"].as_f64().unwrap();
    assert!(
        (read - chrony_offset).abs() <= 50e-6,
        "agent read {read}, chronyc says {chrony_offset}"
    );
    // Root delay / 2 + root dispersion (fields 10 and 11).
    let root_distance =
        fields[10].parse::<f64>().unwrap() / 2.0 + fields[11].parse::<f64>().unwrap();
    let bound = view["errorBoundSeconds"].as_f64().unwrap();
    assert!(
        bound > 0.0 && (bound - root_distance).abs() <= 100e-6,
        "agent read {bound}, chronyc's root distance {root_distance}"
    );

    // `stratumctl tracking` sets chronyd's view beside the agent's.
    let tracking = ns
        .exec(&[env!("CARGO_BIN_EXE_stratumctl"), "tracking"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tracking.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("Host daemon"))
        .unwrap_or_else(|| panic!("no host daemon line:\n{text}"));
    assert!(
        line.contains("chronyd says ")
            && line.contains("following 127.0.0.1")
            && line.contains("agent − chronyd: "),
        "{line}"
    );

    let metrics = ns.http_get(9123, "/metrics").unwrap();
    // The kernel's state is the machine's, whatever the namespace: expect what it is.
    let kernel = stratum_agent::clock::system::kernel_state().unwrap();
    for (evidence, value) in [
        ("chrony_command_port", 1),
        ("ntp_port", 1),
        ("kernel_pll", i32::from(kernel.pll)),
        ("kernel_fll", i32::from(kernel.fll)),
    ] {
        let series = format!("stratum_agent_other_time_daemon{{evidence=\"{evidence}\"}} {value}");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    assert!(
        metrics.contains("stratum_agent_host_daemon_offset_seconds{daemon=\"chronyd\"}"),
        "chronyd's offset missing:\n{metrics}"
    );
}
