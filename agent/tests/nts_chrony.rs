//! NTS against a real server: chronyd from Debian (`-x`, never adjusting the clock) with an NTS
//! certificate signed by a CA made in the test. Stratum's key exchange (TLS 1.3 over rustls,
//! the RFC 8915 records, the exporter) and its NTS extension fields must interoperate with
//! chrony's own implementation, byte for byte, or these fail. The agent binary then syncs
//! through NTS, and a packet capture on loopback shows that nothing it sends to or receives
//! from the server is plain NTP, even when the key exchange fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "pki/mod.rs"]
mod pki;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use common::{Agent, Proc, TempDir, agent_config, chronyd_with, free_udp_port, wait_for};
use pki::{Pki, make_pki};
use stratum_agent::nts_ke::{KeError, client_config, key_exchange, roots_from_pem_file};
use stratum_agent::wire_tap::Recorder;
use stratum_ntp::nts::ef::{ClientRequest, ResponseError, field_type, verify_response};
use stratum_ntp::nts::{AeadKey, CookieJar, SessionKeys};
use stratum_ntp::packet::{LeapIndicator, Mode, Packet, ReferenceId};
use stratum_ntp::time::{NtpShort, NtpTimestamp};

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn free_tcp_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chronyd `-x` serving NTP on `ntp_port` and NTS-KE on `ke_port` with `pki`'s certificate.
fn chronyd_nts(dir: &Path, pki: &Pki, ntp_port: u16, ke_port: u16) -> Proc {
    let nts = format!(
        "ntsport {ke_port}\nntsserverkey {}\nntsservercert {}\n",
        pki.key.display(),
        pki.cert.display()
    );
    let proc = chronyd_with(dir, LOOPBACK, ntp_port, None, &nts);
    wait_for(Duration::from_secs(10), "chronyd's NTS-KE port", || {
        TcpStream::connect((LOOPBACK, ke_port)).is_ok()
    });
    proc
}

fn client_header(transmit: u64) -> Packet {
    Packet {
        leap: LeapIndicator::Unknown,
        version: 4,
        mode: Mode::Client,
        stratum: 0,
        poll: 4,
        precision: -20,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort::ZERO,
        reference_id: ReferenceId([0; 4]),
        reference_timestamp: NtpTimestamp::ZERO,
        origin_timestamp: NtpTimestamp::ZERO,
        receive_timestamp: NtpTimestamp::ZERO,
        transmit_timestamp: NtpTimestamp::from_bits(transmit),
    }
}

/// Sends one datagram and returns the answer, if any comes within a second.
fn exchange_udp(server: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind((LOOPBACK, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    socket.send_to(datagram, server).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stratum_exchanges_keys_with_chronyd_and_its_time_authenticates_under_them() {
    let dir = TempDir::new("nts-chrony");
    let pki = make_pki(dir.path(), "good");
    let (ntp_port, ke_port) = (free_udp_port(LOOPBACK), free_tcp_port());
    let chrony = chronyd_nts(dir.path(), &pki, ntp_port, ke_port);

    let config = client_config(roots_from_pem_file(&pki.ca).unwrap()).unwrap();
    let exchange = key_exchange("127.0.0.1", ke_port, config, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("key exchange: {e}\n{}", chrony.log_text()));
    let agreement = &exchange.agreement;
    assert_eq!(agreement.cookies.len(), 8, "chrony hands out eight cookies");
    assert_eq!(
        agreement.ntp_port,
        Some(ntp_port),
        "chrony names its non-default NTP port"
    );
    let server = SocketAddr::from((LOOPBACK, agreement.ntp_port.unwrap_or(123)));

    let mut jar = CookieJar::new(exchange.keys.clone(), agreement.cookies.clone());
    let mut rng = rand::rng();
    // More requests than cookies: each response must refill the jar, or this runs dry.
    for round in 0..12u64 {
        let transmit = 0xe000_0000_0000_0000 | round;
        let request = ClientRequest::build(&client_header(transmit), &mut jar, &mut rng)
            .unwrap_or_else(|| panic!("jar empty at round {round}"));
        let response = exchange_udp(server, &request.datagram)
            .unwrap_or_else(|| panic!("no answer at round {round}\n{}", chrony.log_text()));
        let verified = verify_response(&response, &request.unique_id, &exchange.keys.s2c)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(verified.header.mode, Mode::Server);
        assert_eq!(verified.header.origin_timestamp.to_bits(), transmit);
        assert_eq!(verified.header.stratum, 2);
        assert!(
            !verified.cookies.is_empty(),
            "round {round} brought no cookie"
        );
        jar.add(verified.cookies);
        assert_eq!(jar.len(), 8, "round {round} did not refill the jar");
    }

    // A request under the wrong C2S key (the cookie itself is chrony's) is not answered with
    // time: chrony drops it, and nothing it might send would verify.
    let forged_keys = SessionKeys {
        c2s: AeadKey::from_bytes([0x5a; 32]),
        s2c: exchange.keys.s2c.clone(),
    };
    let mut forged_jar = CookieJar::new(forged_keys, vec![jar.take().unwrap()]);
    let request = ClientRequest::build(&client_header(7), &mut forged_jar, &mut rng).unwrap();
    if let Some(answer) = exchange_udp(server, &request.datagram) {
        let verdict = verify_response(&answer, &request.unique_id, &exchange.keys.s2c);
        assert!(verdict.is_err(), "a forged request got authenticated time");
    }

    // A cookie chrony never issued gets its NTS NAK, which the client recognizes.
    let mut stranger = CookieJar::new(exchange.keys.clone(), vec![vec![0x42; 100]]);
    let request = ClientRequest::build(&client_header(8), &mut stranger, &mut rng).unwrap();
    let answer = exchange_udp(server, &request.datagram).expect("chrony answers a bad cookie");
    assert_eq!(
        verify_response(&answer, &request.unique_id, &exchange.keys.s2c),
        Err(ResponseError::Nak)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_the_trust_anchors_do_not_vouch_for_gives_no_keys() {
    let dir = TempDir::new("nts-chrony-untrusted");
    let served = make_pki(dir.path(), "served");
    let other = make_pki(dir.path(), "other");
    let (ntp_port, ke_port) = (free_udp_port(LOOPBACK), free_tcp_port());
    let _chrony = chronyd_nts(dir.path(), &served, ntp_port, ke_port);

    let config = client_config(roots_from_pem_file(&other.ca).unwrap()).unwrap();
    let error = key_exchange("127.0.0.1", ke_port, config, Duration::from_secs(10))
        .await
        .expect_err("a certificate from an untrusted CA was accepted");
    assert!(matches!(error, KeError::Tls { .. }), "{error}");
    assert_eq!(error.metric_label(), "tls");

    // A bundle without certificates is an error, not an empty trust store that fails later.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    assert!(roots_from_pem_file(&empty).is_err());
}

/// The agent's config for one NTS upstream: the KE server on `ke_port`, trust from `ca`.
fn nts_agent_config(dir: &Path, ke_port: u16, ca: &Path) -> serde_json::Value {
    let mut config = agent_config("nts-1", &[SocketAddr::from((LOOPBACK, 123))], 1, dir);
    let upstream = &mut config["upstreams"][0];
    upstream["nts"] = true.into();
    upstream["ntsPort"] = ke_port.into();
    config["ntsCaBundle"] = std::fs::read_to_string(ca).unwrap().into();
    config
}

/// Whether a datagram is an NTS packet: NTPv4 with a unique identifier and an authenticator.
fn carries_nts(payload: &[u8]) -> bool {
    Packet::parse(payload).is_ok_and(|view| {
        let types: Vec<u16> = view.extension_fields().map(|f| f.field_type).collect();
        types.contains(&field_type::UNIQUE_IDENTIFIER)
            && types.last() == Some(&field_type::AUTHENTICATOR)
    })
}

fn metric_line(agent: &Agent, prefix: &str) -> Option<f64> {
    let (_, body) = agent.get_metrics_port("/metrics")?;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_agent_syncs_from_chronyd_through_nts_and_every_packet_on_the_wire_is_authenticated() {
    let dir = TempDir::new("nts-agent");
    let pki = make_pki(dir.path(), "good");
    let (ntp_port, ke_port) = (free_udp_port(LOOPBACK), free_tcp_port());
    let chrony = chronyd_nts(dir.path(), &pki, ntp_port, ke_port);
    let wire = Recorder::start(&[ntp_port, 123]).expect("packet capture (needs CAP_NET_RAW)");

    let agent = Agent::start(
        dir.path(),
        41,
        &nts_agent_config(dir.path(), ke_port, &pki.ca),
        0.2,
        20.0,
    );
    // Synchronized, and the initial burst's samples in: more exchanges than one cookie jar's
    // worth would show a jar that does not refill.
    wait_for(
        Duration::from_secs(60),
        "the agent synchronized over NTS with four samples",
        || {
            agent.status().is_some_and(|s| {
                s["tracking"]["synchronized"] == true
                    && s["sources"][0]["samples"].as_u64() >= Some(4)
            })
        },
    );
    eprintln!(
        "synchronized through NTS, four samples in, {:.3} s after start",
        agent.started.elapsed().as_secs_f64()
    );
    let key_exchanges = metric_line(
        &agent,
        r#"stratum_agent_nts_key_exchanges_total{result="ok",source="127.0.0.1"}"#,
    );
    assert!(
        key_exchanges >= Some(1.0),
        "{key_exchanges:?}\n{}",
        agent.proc.log_text()
    );
    let cookies = metric_line(&agent, r#"stratum_agent_nts_cookies{source="127.0.0.1"}"#);
    assert_eq!(cookies, Some(8.0), "each response refills the jar");
    let status = agent.status().unwrap_or_default();
    // Shown as authenticated: the status, and `stratumctl sources`' `A` mark.
    assert_eq!(status["sources"][0]["authentication"], "NTS", "{status:#}");
    let table = String::from_utf8_lossy(&agent.ctl(&["sources"]).stdout).into_owned();
    assert!(
        table.lines().skip(1).all(|l| l
            .split_whitespace()
            .next()
            .is_some_and(|m| m.ends_with('A'))),
        "{table}"
    );
    drop(agent);

    let (datagrams, dropped) = wire.finish().unwrap();
    assert_eq!(dropped, 0);
    let to_chrony: Vec<_> = datagrams
        .iter()
        .filter(|d| d.destination.port() == ntp_port)
        .collect();
    let from_chrony = datagrams
        .iter()
        .filter(|d| d.source.port() == ntp_port)
        .count();
    assert!(
        to_chrony.len() >= 4,
        "only {} requests seen: {datagrams:?}\n{status:#}",
        to_chrony.len()
    );
    for d in &to_chrony {
        assert!(carries_nts(&d.payload), "a plain request went out: {d:?}");
    }
    for d in datagrams.iter().filter(|d| d.source.port() == ntp_port) {
        assert!(
            carries_nts(&d.payload),
            "chronyd answered without NTS: {d:?}"
        );
    }
    assert!(from_chrony >= 4, "{}", chrony.log_text());
    assert!(
        datagrams.iter().all(|d| d.destination.port() != 123),
        "something polled port 123, which the key exchange did not name"
    );
}

#[test]
fn without_a_trusted_key_exchange_the_agent_never_polls_the_upstream_in_the_clear() {
    let dir = TempDir::new("nts-agent-refused");
    let served = make_pki(dir.path(), "served");
    let other = make_pki(dir.path(), "other");
    let (ntp_port, ke_port) = (free_udp_port(LOOPBACK), free_tcp_port());
    let _chrony = chronyd_nts(dir.path(), &served, ntp_port, ke_port);
    let closed_ke_port = free_tcp_port();
    let wire = Recorder::start(&[ntp_port, 123]).expect("packet capture (needs CAP_NET_RAW)");

    // An untrusted certificate, and no NTS-KE server at all: each is retried with backoff
    // (the second attempt comes ~2 s after the first), and neither ever sends NTP.
    let cases = [
        ("tls", nts_agent_config(dir.path(), ke_port, &other.ca), 42),
        (
            "connect",
            nts_agent_config(dir.path(), closed_ke_port, &served.ca),
            43,
        ),
    ];
    for (failure, config, block) in cases {
        let agent = Agent::start(dir.path(), block, &config, 0.2, 20.0);
        let series = format!(
            r#"stratum_agent_nts_key_exchanges_total{{result="{failure}",source="127.0.0.1"}}"#
        );
        wait_for(
            Duration::from_secs(30),
            &format!("two failed key exchanges ({failure})"),
            || metric_line(&agent, &series) >= Some(2.0),
        );
        let status = agent.status().unwrap();
        assert_eq!(status["tracking"]["synchronized"], false, "{status}");
        drop(agent);
    }
    let (datagrams, _) = wire.finish().unwrap();
    assert!(
        datagrams.is_empty(),
        "NTP went out without a key exchange: {datagrams:?}"
    );
}

/// `chronyd -Q` as an NTS client of `127.0.0.1:port` through `ke_port`, trusting `ca`; the
/// offset it measured, or `None` without authenticated time.
fn chronyd_nts_client(dir: &Path, port: u16, ke_port: u16, ca: &Path) -> Option<f64> {
    common::chronyd_query(
        &[],
        &common::require("chronyd"),
        dir,
        &format!(
            "server 127.0.0.1 port {port} nts ntsport {ke_port} iburst maxsamples 4\n\
             ntstrustedcerts {}\n",
            ca.display()
        ),
    )
}

#[test]
fn the_agent_binary_serves_a_tenant_over_nts_and_picks_up_rotated_cookie_keys() {
    let dir = TempDir::new("nts-tenant-agent");
    let pki = make_pki(dir.path(), "tenant");
    let upstream_port = free_udp_port(LOOPBACK);
    let _upstream = common::chronyd(dir.path(), LOOPBACK, upstream_port, None);
    let (tenant_port, ke_port) = (free_udp_port(LOOPBACK), free_tcp_port());
    let keys = dir.path().join("cookie-keys.json");
    let write_keys = |current: u8, previous: Option<u8>| {
        let entry = |id: u8| serde_json::json!({"id": id, "key": format!("{id:02x}").repeat(32)});
        let mut doc = serde_json::json!({"current": entry(current)});
        if let Some(previous) = previous {
            doc["previous"] = entry(previous);
        }
        let tmp = keys.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).unwrap();
        std::fs::rename(&tmp, &keys).unwrap();
    };
    write_keys(1, None);
    let mut config = agent_config(
        "nts-tenant",
        &[SocketAddr::from((LOOPBACK, upstream_port))],
        1,
        dir.path(),
    );
    config["serving"]["ntsCookieKeysFile"] = keys.display().to_string().into();
    config["serving"]["tenants"] = serde_json::json!([{
        "id": "team-a/ntp", "port": tenant_port, "allowed": ["127.0.0.0/8"],
        "rateLimit": {"clientIntervalSeconds": 0.001, "clientBurst": 100, "kissOfDeath": true},
        "nts": {"kePort": ke_port, "certificateFile": pki.cert.display().to_string(),
                "keyFile": pki.key.display().to_string(), "ntpPort": tenant_port,
                "unauthenticated": "Deny"}
    }]);
    let agent = Agent::start(dir.path(), 44, &config, 0.0, 0.0);
    wait_for(Duration::from_secs(60), "the agent synchronized", || {
        agent
            .status()
            .is_some_and(|s| s["tracking"]["synchronized"] == true)
    });

    let offset = chronyd_nts_client(dir.path(), tenant_port, ke_port, &pki.ca);
    eprintln!("chronyd -Q through the agent binary's NTS endpoint: offset {offset:?}");
    assert!(
        offset.is_some_and(|o| o.abs() < 0.05),
        "{offset:?}\n{}",
        agent.proc.log_text()
    );
    let authenticated = r#"stratum_agent_tenant_nts_authenticated_total{tenant="team-a/ntp"}"#;
    assert!(metric_line(&agent, authenticated) >= Some(1.0));
    assert_eq!(
        metric_line(&agent, "stratum_agent_nts_cookie_keys_loaded"),
        Some(1.0)
    );
    assert_eq!(
        metric_line(&agent, "stratum_agent_nts_cookie_key_id"),
        Some(1.0)
    );
    // `stratumctl serverstats` adds the authentication table for the tenant: NTS answers,
    // nothing refused, no symmetric keys.
    let table = String::from_utf8_lossy(&agent.ctl(&["serverstats"]).stdout).into_owned();
    let nts_row = table
        .split("Authenticating tenant")
        .nth(1)
        .and_then(|rest| rest.lines().find(|l| l.starts_with("team-a/ntp")))
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>());
    assert!(
        nts_row
            .as_ref()
            .is_some_and(|r| r[0] != "0" && r[1..] == ["0", "0", "0", "0", "0", "0"]),
        "{table}"
    );

    // Two rotations, as the operator writes them: the run loop re-reads the file, and a new
    // client is served under the new keys (its cookies sealed with key 3).
    write_keys(2, Some(1));
    write_keys(3, Some(2));
    wait_for(Duration::from_secs(10), "the rotated keys loaded", || {
        metric_line(&agent, "stratum_agent_nts_cookie_key_id") == Some(3.0)
    });
    let offset = chronyd_nts_client(dir.path(), tenant_port, ke_port, &pki.ca);
    assert!(offset.is_some(), "{}", agent.proc.log_text());
    for id in 1..=3u8 {
        assert!(
            !agent
                .proc
                .log_text()
                .contains(&format!("{id:02x}").repeat(32)),
            "key material in the log"
        );
    }
    // A plain request is refused (the tenant requires NTS).
    let plain = UdpSocket::bind((LOOPBACK, 0)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    plain
        .send_to(&client_header(7).to_bytes(), (LOOPBACK, tenant_port))
        .unwrap();
    let mut buf = [0u8; 1024];
    let (n, _) = plain.recv_from(&mut buf).expect("a KoD");
    assert_eq!((n, &buf[12..16], buf[1]), (48, &b"DENY"[..], 0));
}
