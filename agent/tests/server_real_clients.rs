//! Must-show 1: real NTP clients get correct time from an allowed tenant port, and nothing
//! from a port whose allow list excludes them. chronyd runs with `-Q` (measure, never set),
//! ntpdig without `-s`/`-S`, ntpd-rs as `ntp-ctl force-sync` answered "no" (its daemon
//! refuses to start without CAP_SYS_TIME); none of them has CAP_SYS_TIME. Each test skips
//! with a message when its program is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::process::Command;

use common::*;

/// The served clock is the host clock here, so a client must measure (almost) no offset.
const MAX_OFFSET_SECS: f64 = 0.05;

/// Runs chronyd -Q against 127.0.0.1:`port`; the measured offset, or None without an answer.
fn chronyd_measure(chronyd: &std::path::Path, port: u16) -> Option<f64> {
    let dir = TempDir::new("chronyq");
    chronyd_query(
        &[],
        chronyd,
        &dir.0,
        &format!("server 127.0.0.1 port {port} iburst maxsamples 4\n"),
    )
}

#[test]
fn chronyd_query_only_measures_our_time_and_gets_nothing_when_not_allowed() {
    let Some(chronyd) = find_program("chronyd", &[]).or_else(|| skip("chronyd not installed"))
    else {
        return;
    };
    let (allowed_port, other_port) = (free_udp_port(), free_udp_port());
    let _server = start_server(
        2,
        &serving(vec![
            tenant("ns/allowed", allowed_port, &["127.0.0.0/8"], false),
            tenant("ns/elsewhere", other_port, &["10.0.0.0/8"], false),
        ]),
    );
    let offset = chronyd_measure(&chronyd, allowed_port).expect("chronyd got an answer");
    assert!(
        offset.abs() < MAX_OFFSET_SECS,
        "chronyd measured {offset} s"
    );
    assert_eq!(
        chronyd_measure(&chronyd, other_port),
        None,
        "a client outside the allow list must get no usable answer"
    );
}

#[test]
fn ntpdig_gets_our_time_on_port_123_of_a_loopback_address() {
    let Some(ntpdig) = find_program("ntpdig", &[]).or_else(|| skip("ntpdig not installed")) else {
        return;
    };
    // ntpdig only speaks to port 123: serve it on an address of our own so nothing else on
    // the host that uses port 123 is disturbed.
    let address: std::net::IpAddr = "127.77.0.1".parse().unwrap();
    let _server = start_server_on(
        address,
        1,
        &serving(vec![tenant("ns/a", 123, &["127.0.0.0/8"], false)]),
    );
    let output = Command::new(ntpdig)
        .args(["-j", "-t", "3", "127.77.0.1"])
        .output()
        .expect("running ntpdig");
    let text = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "ntpdig printed {text:?} ({e}); stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let offset = report["offset"].as_f64().expect("offset in ntpdig's JSON");
    assert!(
        offset.abs() < MAX_OFFSET_SECS,
        "ntpdig measured {offset} s: {report}"
    );
    assert_eq!(report["stratum"].as_i64(), Some(2), "{report}");
}

/// `ntp-ctl force-sync` with one plain source, 127.0.0.1:`port`; what it printed.
fn ntpd_rs_measure(ctl: &std::path::Path, port: u16) -> String {
    ntp_ctl_force_sync(
        ctl,
        &format!(
            "[observability]\nlog-level = \"warn\"\n\n[[source]]\nmode = \"server\"\naddress = \"127.0.0.1:{port}\"\n\n[synchronization]\nminimum-agreeing-sources = 1\n"
        ),
    )
}

#[test]
fn ntpd_rs_client_without_cap_sys_time_measures_our_time() {
    let Some(daemon) = ntpd_rs().or_else(|| skip("ntpd-rs not installed")) else {
        return;
    };
    if find_program("script", &[]).is_none() {
        skip::<()>("script (util-linux) not installed");
        return;
    }
    let ctl = daemon.with_file_name("ntp-ctl");
    let port = free_udp_port();
    let server = start_server(
        1,
        &serving(vec![tenant("ns/a", port, &["127.0.0.0/8"], false)]),
    );
    let on_time = ntpd_rs_measure(&ctl, port);
    assert!(
        on_time.contains("already within 1s of the correct time"),
        "ntpd-rs said: {on_time}"
    );
    // Serve a clock 5 s ahead of this host: ntpd-rs must see this host as behind by 5 s.
    let now = stratum_agent::clock::host_realtime();
    server.publish_clock(
        synchronized_state(),
        stratum_agent::clock::Timescale {
            host_ref: now,
            clock_ref: now.add_secs(5.0),
            rate: 0.0,
        },
    );
    let shifted = ntpd_rs_measure(&ctl, port);
    assert!(shifted.contains("behind by"), "ntpd-rs said: {shifted}");
    assert!(
        shifted.contains("Time not updated"),
        "ntpd-rs said: {shifted}"
    );
}
