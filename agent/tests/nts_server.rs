//! Tenants' NTS endpoints against real clients: chronyd from Debian as an NTS client (`-Q`:
//! measures, never sets the clock, without CAP_SYS_TIME) with the test CA, and Stratum's own
//! NTS-KE client. The agent's real server (workers, sockets) and its real KE endpoints run in
//! this process on loopback; what a tenant may not do is tried as well as what it may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;
#[path = "pki/mod.rs"]
mod pki;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pki::{Pki, make_pki};
use stratum_agent::agent::Shared;
use stratum_agent::metrics::Metrics;
use stratum_agent::nts_ke::{client_config, key_exchange, roots_from_pem_file};
use stratum_agent::nts_server::{KE_DEADLINE, MAX_SESSIONS, NtsEndpoints};
use stratum_agent::server::{ServerOptions, ServerStats};
use stratum_api::agent_config::{ServingConfig, TenantConfig, TenantNtsConfig, Unauthenticated};
use stratum_ntp::nts::CookieJar;
use stratum_ntp::nts::ef::{ClientRequest, verify_response};
use stratum_ntp::nts::{ResponseError, VerifiedResponse};
use stratum_ntp::packet::Packet;

/// The served clock is the host clock here, so a client must measure (almost) no offset.
const MAX_OFFSET_SECS: f64 = 0.05;

/// A cookie key file as the operator writes it: `current` and optionally `previous` key ids,
/// each key 32 bytes of its id (test keys, not secrets).
fn write_keys(path: &Path, current: u32, previous: Option<u32>) {
    let entry =
        |id: u32| serde_json::json!({"id": id, "key": format!("{:02x}", id as u8).repeat(32)});
    let mut doc = serde_json::json!({"current": entry(current)});
    if let Some(previous) = previous {
        doc["previous"] = entry(previous);
    }
    // Atomically, as a Secret volume's symlink swap is.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, doc.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Tenant `id` on UDP `port` with an NTS-KE endpoint on `ke_port`, allowed from `allowed`.
fn nts_tenant(
    id: &str,
    port: u16,
    ke_port: u16,
    allowed: &[&str],
    pki: &Pki,
    unauthenticated: Unauthenticated,
) -> TenantConfig {
    TenantConfig {
        nts: Some(TenantNtsConfig {
            ke_port,
            certificate_file: pki.cert.display().to_string(),
            key_file: pki.key.display().to_string(),
            ntp_server: None,
            // The Service's port in a cluster; here the agent's own tenant port.
            ntp_port: Some(port),
            unauthenticated,
        }),
        ..tenant(id, port, allowed, true)
    }
}

/// One agent's server and NTS endpoints on `bind`, synchronized to the host clock.
struct NtsAgent {
    shared: Arc<Shared>,
    endpoints: NtsEndpoints,
}

impl NtsAgent {
    fn start(bind: IpAddr, serving: &ServingConfig) -> Self {
        let agent = Self::start_as_it_goes(bind, serving);
        assert!(
            agent.endpoints.failed().is_empty(),
            "{:?}",
            agent.endpoints.failed()
        );
        agent
    }

    /// [`Self::start`] that lets endpoints fail (to be looked at by the test).
    fn start_as_it_goes(bind: IpAddr, serving: &ServingConfig) -> Self {
        let shared = Shared::with_server(
            Metrics::new().unwrap(),
            ServerOptions {
                workers: 1,
                bind,
                ..ServerOptions::default()
            },
        );
        shared.server.publish_clock(
            synchronized_state(),
            stratum_agent::clock::Timescale::IDENTITY,
        );
        let report = shared.server.apply(serving);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let mut endpoints = NtsEndpoints::new(shared.clone());
        endpoints.apply(serving);
        Self { shared, endpoints }
    }

    fn stats(&self) -> ServerStats {
        self.shared.server.stats()
    }

    fn tenant_totals(&self, id: &str) -> stratum_agent::server::stats::TenantTotals {
        self.stats()
            .tenants
            .into_iter()
            .find(|t| t.tenant == id)
            .map(|t| t.totals)
            .unwrap_or_default()
    }

    fn key_exchanges(&self, tenant: &str, result: &str) -> u64 {
        self.shared
            .metrics
            .tenant_nts_key_exchanges
            .with_label_values(&[tenant, result])
            .get()
    }
}

fn serving_with_keys(tenants: Vec<TenantConfig>, keys: &Path) -> ServingConfig {
    ServingConfig {
        nts_cookie_keys_file: Some(keys.display().to_string()),
        ..serving(tenants)
    }
}

/// Tenant `team-a/ntp` (loopback allowed, NTS required) with its PKI, key file (key 1) and
/// ports: what most tests here serve.
struct TeamA {
    dir: TempDir,
    pki: Pki,
    keys: std::path::PathBuf,
    port: u16,
    ke: u16,
    serving: ServingConfig,
}

/// A temporary directory with the test PKI and a cookie key file (key 1): what every test
/// here starts from.
struct Material {
    dir: TempDir,
    pki: Pki,
    keys: std::path::PathBuf,
}

impl Material {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let pki = make_pki(&dir.0, "tenant");
        let keys = dir.path("cookie-keys.json");
        write_keys(&keys, 1, None);
        Self { dir, pki, keys }
    }
}

impl TeamA {
    fn new(tag: &str) -> Self {
        let Material { dir, pki, keys } = Material::new(tag);
        let (port, ke) = (free_udp_port(), free_tcp_port());
        let serving = serving_with_keys(
            vec![nts_tenant(
                "team-a/ntp",
                port,
                ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            )],
            &keys,
        );
        Self {
            dir,
            pki,
            keys,
            port,
            ke,
            serving,
        }
    }
}

/// chronyd -Q against `127.0.0.1:port`, with NTS through `ke_port` and `ca` when given.
fn chronyd_measure(chronyd: &Path, port: u16, nts: Option<(u16, &Path)>) -> Option<f64> {
    let dir = TempDir::new("chronyq-nts");
    let config = match nts {
        Some((ke_port, ca)) => format!(
            "server 127.0.0.1 port {port} nts ntsport {ke_port} iburst maxsamples 4\n\
             ntstrustedcerts {}\n",
            ca.display()
        ),
        None => format!("server 127.0.0.1 port {port} iburst maxsamples 4\n"),
    };
    chronyd_query(&[], chronyd, &dir.0, &config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chronyd_gets_authenticated_time_and_is_refused_where_the_tenant_says_so() {
    let Some(chronyd) = find_program("chronyd", &[]).or_else(|| skip("chronyd not installed"))
    else {
        return;
    };
    let Material {
        dir: _dir,
        pki,
        keys,
    } = Material::new("nts-server");
    let (a_port, a_ke) = (free_udp_port(), free_tcp_port());
    let (b_port, b_ke) = (free_udp_port(), free_tcp_port());
    let (open_port, open_ke) = (free_udp_port(), free_tcp_port());
    let serving = serving_with_keys(
        vec![
            nts_tenant(
                "team-a/ntp",
                a_port,
                a_ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            ),
            // Team b's clients are elsewhere: loopback is a stranger to it.
            nts_tenant(
                "team-b/ntp",
                b_port,
                b_ke,
                &["10.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            ),
            // NTS offered, not required.
            nts_tenant(
                "team-c/ntp",
                open_port,
                open_ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Serve,
            ),
        ],
        &keys,
    );
    let agent = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);

    let run = |port, nts: Option<(u16, &Path)>| {
        let chronyd = chronyd.clone();
        let nts = nts.map(|(p, ca)| (p, ca.to_path_buf()));
        tokio::task::spawn_blocking(move || {
            chronyd_measure(
                &chronyd,
                port,
                nts.as_ref().map(|(p, ca)| (*p, ca.as_path())),
            )
        })
    };
    let offset = run(a_port, Some((a_ke, &pki.ca))).await.unwrap();
    let totals = agent.tenant_totals("team-a/ntp");
    eprintln!("chronyd through NTS: offset {offset:?}, tenant a {totals:?}");
    let offset = offset.expect("chronyd got authenticated time");
    assert!(
        offset.abs() < MAX_OFFSET_SECS,
        "chronyd measured {offset} s"
    );
    assert_eq!(agent.key_exchanges("team-a/ntp", "ok"), 1);
    assert!(totals.authenticated >= 1, "{totals:?}");
    assert_eq!(
        totals.authenticated, totals.served,
        "every answer authenticated"
    );

    // Without NTS, tenant a (which requires it) answers DENY: chronyd gets no time.
    assert_eq!(run(a_port, None).await.unwrap(), None);
    assert!(agent.tenant_totals("team-a/ntp").unauthenticated >= 1);
    // Tenant c offers NTS without requiring it: both work.
    assert!(run(open_port, None).await.unwrap().is_some());
    assert!(
        run(open_port, Some((open_ke, &pki.ca)))
            .await
            .unwrap()
            .is_some()
    );
    assert!(agent.tenant_totals("team-c/ntp").authenticated >= 1);

    // Loopback is outside tenant b's allow list: refused at the key exchange (before any TLS)
    // and at NTP, though the certificate and the keys are the same as tenant a's.
    assert_eq!(run(b_port, Some((b_ke, &pki.ca))).await.unwrap(), None);
    assert!(agent.key_exchanges("team-b/ntp", "not_allowed") >= 1);
    assert_eq!(agent.key_exchanges("team-b/ntp", "ok"), 0);
    let b = agent.tenant_totals("team-b/ntp");
    assert_eq!((b.served, b.authenticated), (0, 0), "{b:?}");
}

/// A key exchange with Stratum's own client at `ke`, trusting `ca`.
async fn cookies_from(ke: SocketAddr, ca: &Path) -> CookieJar {
    let trust = client_config(roots_from_pem_file(ca).unwrap()).unwrap();
    let exchange = key_exchange(
        &ke.ip().to_string(),
        ke.port(),
        trust,
        Duration::from_secs(5),
    )
    .await
    .expect("key exchange");
    CookieJar::new(exchange.keys, exchange.agreement.cookies)
}

/// One NTS request spending a cookie of `jar` at `server`, from `source`.
fn nts_exchange(
    jar: &mut CookieJar,
    source: IpAddr,
    server: SocketAddr,
) -> Result<VerifiedResponse, ResponseError> {
    let header = Packet::parse(&client_request(0x1234)).unwrap().header;
    let request = ClientRequest::build(&header, jar, &mut rand::rng()).expect("a cookie left");
    let socket = UdpSocket::bind((source, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(&request.datagram, server).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).expect("an answer");
    verify_response(&buf[..n], &request.unique_id, &jar.keys().s2c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_from_one_agent_works_at_another_for_one_rotation_then_gets_the_nak() {
    // Two agents of the TimeService, on their own loopback addresses, behind one Service in a
    // cluster: same tenant, same port numbers, same key file.
    let TeamA {
        dir: _dir,
        pki,
        keys,
        port,
        ke,
        serving,
        ..
    } = TeamA::new("nts-rotation");
    let mut agent_1 = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);
    let mut agent_2 = NtsAgent::start("127.0.0.2".parse().unwrap(), &serving);
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    let at_2 = SocketAddr::from(([127, 0, 0, 2], port));

    let mut jar = cookies_from(SocketAddr::from(([127, 0, 0, 1], ke)), &pki.ca).await;
    assert_eq!(jar.len(), 8);
    let answer = nts_exchange(&mut jar, client, at_2).expect("agent 2 took agent 1's cookie");
    assert_eq!(answer.cookies.len(), 1, "and gave one back");
    // A worker counts a request just after sending its reply: wait for the count.
    assert!(wait_until(Duration::from_secs(2), || agent_2
        .tenant_totals("team-a/ntp")
        .authenticated
        == 1));

    // A rotation: key 2 seals, key 1 still opens. Cookies from before keep working.
    write_keys(&keys, 2, Some(1));
    agent_1.endpoints.check_files(&serving);
    agent_2.endpoints.check_files(&serving);
    nts_exchange(&mut jar, client, at_2).expect("a cookie of key 1 after one rotation");
    // A second rotation retires key 1: the NAK, which the client takes as "exchange keys again".
    write_keys(&keys, 3, Some(2));
    agent_1.endpoints.check_files(&serving);
    agent_2.endpoints.check_files(&serving);
    assert_eq!(
        nts_exchange(&mut jar, client, at_2).map(|_| ()),
        Err(ResponseError::Nak)
    );
    assert!(wait_until(Duration::from_secs(2), || agent_2
        .tenant_totals("team-a/ntp")
        .nts_nak
        >= 1));
    // A fresh key exchange works again, at either agent.
    let mut fresh = cookies_from(SocketAddr::from(([127, 0, 0, 2], ke)), &pki.ca).await;
    nts_exchange(&mut fresh, client, SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("new cookies after the rotation");

    // A key file that does not parse leaves the keys in force.
    std::fs::write(&keys, "{ half written").unwrap();
    agent_1.endpoints.check_files(&serving);
    nts_exchange(&mut fresh, client, SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("the last good keys still in force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_the_key_exchange_lose_their_slot_and_never_block_others() {
    let TeamA {
        dir: _dir,
        pki,
        ke,
        serving,
        ..
    } = TeamA::new("nts-stall");
    let agent = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);
    let endpoint = SocketAddr::from(([127, 0, 0, 1], ke));

    // Twenty connections that never send a byte (a TLS handshake that never starts).
    let stalled: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(endpoint).unwrap())
        .collect();
    let started = Instant::now();
    // An honest client is served meanwhile.
    let jar = cookies_from(endpoint, &pki.ca).await;
    assert_eq!(jar.len(), 8);
    let served_after = started.elapsed();
    // Each stalled connection is closed by the endpoint at its deadline.
    let closed = tokio::task::spawn_blocking(move || {
        stalled
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(KE_DEADLINE * 3)).unwrap();
                let mut buf = [0u8; 16];
                // EOF or a reset: the endpoint closed it. A read timeout is the test's own
                // patience running out, not a close.
                match s.read(&mut buf) {
                    Ok(0) => true,
                    Err(e) => !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    Ok(_) => false,
                }
            })
            .filter(|closed| *closed)
            .count()
    })
    .await
    .unwrap();
    let waited = started.elapsed();
    eprintln!(
        "honest key exchange done {:.3} s into 20 stalled ones; those closed after {:.1} s",
        served_after.as_secs_f64(),
        waited.as_secs_f64()
    );
    assert_eq!(
        closed, 20,
        "every stalled connection closed by the endpoint"
    );
    // Counted as the slot is given back, just after the close the client saw.
    assert!(wait_until(Duration::from_secs(2), || agent
        .key_exchanges("team-a/ntp", "timeout")
        == 20));
    assert_eq!(agent.key_exchanges("team-a/ntp", "ok"), 1);
}

/// `ntp-ctl force-sync` with one NTS source: the key exchange at `127.0.0.1:ke_port`,
/// trusting `ca`; what it printed.
fn ntpd_rs_nts_measure(ctl: &Path, ke_port: u16, ca: &Path) -> String {
    ntp_ctl_force_sync(
        ctl,
        &format!(
            "[observability]\nlog-level = \"warn\"\n\n[[source]]\nmode = \"nts\"\n\
             address = \"127.0.0.1:{ke_port}\"\ncertificate-authority = \"{}\"\n\n\
             [synchronization]\nminimum-agreeing-sources = 1\n",
            ca.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ntpd_rs_gets_authenticated_time_from_a_tenants_nts_endpoint() {
    let Some(daemon) = ntpd_rs().or_else(|| skip("ntpd-rs not installed")) else {
        return;
    };
    if find_program("script", &[]).is_none() {
        skip::<()>("script (util-linux) not installed");
        return;
    }
    let ctl = daemon.with_file_name("ntp-ctl");
    let TeamA {
        dir: _dir,
        pki,
        ke,
        serving,
        ..
    } = TeamA::new("nts-ntpd-rs");
    let agent = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);
    let ca = pki.ca.clone();
    let said = tokio::task::spawn_blocking(move || ntpd_rs_nts_measure(&ctl, ke, &ca))
        .await
        .unwrap();
    let totals = agent.tenant_totals("team-a/ntp");
    eprintln!("ntpd-rs through NTS: {said:?}; tenant a {totals:?}");
    assert!(
        said.contains("already within 1s of the correct time"),
        "ntpd-rs said: {said}"
    );
    assert_eq!(agent.key_exchanges("team-a/ntp", "ok"), 1);
    assert!(totals.authenticated >= 1, "{totals:?}");
    assert_eq!(totals.unauthenticated, 0, "ntpd-rs never asked without NTS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_generator_loads_an_nts_port_with_requests_that_authenticate() {
    let TeamA {
        dir: _dir,
        pki,
        port,
        ke,
        serving,
        ..
    } = TeamA::new("nts-load");
    let agent = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);
    let jar = cookies_from(SocketAddr::from(([127, 0, 0, 1], ke)), &pki.ca).await;
    let spec = stratum_agent::loadgen::LoadSpec {
        target: SocketAddr::from(([127, 0, 0, 1], port)),
        rate: 2000.0,
        duration: Duration::from_millis(500),
        max_requests: 1000,
        sources: stratum_agent::loadgen::source_addresses("127.0.0.0/16".parse().unwrap(), 64),
        wait: Duration::from_millis(500),
    };
    let report =
        tokio::task::spawn_blocking(move || stratum_agent::loadgen::run_nts(&spec, jar, |_| {}))
            .await
            .unwrap()
            .unwrap();
    assert!(report.sent >= 900, "{report:?}");
    assert_eq!(report.answered, report.sent, "{report:?}");
    // Every answer was an authenticated one: none refused as plain, none NAKed or dropped.
    assert!(wait_until(Duration::from_secs(2), || agent
        .tenant_totals("team-a/ntp")
        .authenticated
        == report.sent));
    let totals = agent.tenant_totals("team-a/ntp");
    assert_eq!(
        (totals.unauthenticated, totals.nts_nak, totals.nts_failed),
        (0, 0, 0),
        "{totals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_certificate_is_missing_fails_alone_and_starts_once_it_is_there() {
    let Material { dir, pki, keys } = Material::new("nts-missing-cert");
    let (a_port, a_ke) = (free_udp_port(), free_tcp_port());
    let (b_port, b_ke) = (free_udp_port(), free_tcp_port());
    // Team b's Secret has not reached the node yet: its certificate file is missing.
    let b_pki = Pki {
        cert: dir.path("b.pem"),
        key: dir.path("b.key"),
        ca: pki.ca.clone(),
    };
    let serving = serving_with_keys(
        vec![
            nts_tenant(
                "team-a/ntp",
                a_port,
                a_ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            ),
            nts_tenant(
                "team-b/ntp",
                b_port,
                b_ke,
                &["127.0.0.0/8"],
                &b_pki,
                Unauthenticated::Deny,
            ),
        ],
        &keys,
    );
    let mut agent = NtsAgent::start_as_it_goes("127.0.0.1".parse().unwrap(), &serving);
    let failed: Vec<u16> = agent.endpoints.failed().keys().copied().collect();
    assert_eq!(failed, [b_ke], "only team b's endpoint fails");
    // Team a is served through NTS meanwhile; team b's NTP port still refuses plain requests.
    let mut jar = cookies_from(SocketAddr::from(([127, 0, 0, 1], a_ke)), &pki.ca).await;
    nts_exchange(
        &mut jar,
        "127.0.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], a_port)),
    )
    .expect("team a served");
    let answer = ask(
        "127.0.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], b_port)),
        Duration::from_secs(1),
    )
    .expect("a KoD");
    assert_eq!(
        &answer[12..16],
        b"DENY",
        "team b requires NTS, certificate or not"
    );
    // The Secret arrives: the next check starts team b's endpoint.
    std::fs::copy(&pki.cert, &b_pki.cert).unwrap();
    std::fs::copy(&pki.key, &b_pki.key).unwrap();
    agent.endpoints.check_files(&serving);
    assert!(
        agent.endpoints.failed().is_empty(),
        "{:?}",
        agent.endpoints.failed()
    );
    let mut jar = cookies_from(SocketAddr::from(([127, 0, 0, 1], b_ke)), &pki.ca).await;
    nts_exchange(
        &mut jar,
        "127.0.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], b_port)),
    )
    .expect("team b served once its certificate is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_exchange_flood_on_one_tenant_is_refused_there_and_never_reaches_another() {
    let Material {
        dir: _dir,
        pki,
        keys,
    } = Material::new("nts-ke-flood");
    let (a_port, a_ke) = (free_udp_port(), free_tcp_port());
    let (b_port, b_ke) = (free_udp_port(), free_tcp_port());
    let serving = serving_with_keys(
        vec![
            nts_tenant(
                "team-a/ntp",
                a_port,
                a_ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            ),
            nts_tenant(
                "team-b/ntp",
                b_port,
                b_ke,
                &["127.0.0.0/8"],
                &pki,
                Unauthenticated::Deny,
            ),
        ],
        &keys,
    );
    let agent = NtsAgent::start("127.0.0.1".parse().unwrap(), &serving);
    // A noisy client of team a opens 300 connections and never speaks: the first 64 hold the
    // sessions, and every other one is refused, busy or (past the burst) over budget.
    const FLOOD: u64 = 300;
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| TcpStream::connect(("127.0.0.1", a_ke)).unwrap())
        .collect();
    let counted = |result: &str| agent.key_exchanges("team-a/ntp", result);
    assert!(
        wait_until(Duration::from_secs(5), || {
            counted("busy") + counted("rate_limited") + MAX_SESSIONS as u64 >= FLOOD
        }),
        "busy {} rate_limited {}",
        counted("busy"),
        counted("rate_limited")
    );
    // Which of the two refuses a given connection depends on how fast the flood arrives (the
    // budget refills at 100/s while it does); the budget's own arithmetic is pinned on a
    // simulated clock by `the_handshake_budget_allows_its_burst_then_its_rate`.
    assert!(counted("busy") >= 1, "the session bound never refused");
    // Team b's endpoint, same agent, same certificate: untouched.
    let mut jar = cookies_from(SocketAddr::from(([127, 0, 0, 1], b_ke)), &pki.ca).await;
    nts_exchange(
        &mut jar,
        "127.0.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], b_port)),
    )
    .expect("team b served during team a's flood");
    assert_eq!(agent.key_exchanges("team-b/ntp", "ok"), 1);
    // Team a recovers: the flood's sessions end as its connections close, and the budget
    // refills.
    drop(flood);
    let ended = || ["tls", "io", "timeout"].map(counted).iter().sum::<u64>();
    assert!(
        wait_until(KE_DEADLINE * 2, || ended() >= MAX_SESSIONS as u64),
        "{} of the flood's sessions ended",
        ended()
    );
    // A client retries a refused key exchange; the budget the flood emptied refills at 100/s,
    // so within a second at most. The retries are the shared condition poll's.
    let trust = client_config(roots_from_pem_file(&pki.ca).unwrap()).unwrap();
    let mut exchange = None;
    let recovered = tokio::task::block_in_place(|| {
        let runtime = tokio::runtime::Handle::current();
        wait_until(Duration::from_secs(2), || {
            let attempt = key_exchange("127.0.0.1", a_ke, trust.clone(), Duration::from_secs(5));
            exchange = runtime.block_on(attempt).ok();
            exchange.is_some()
        })
    });
    let exchange = exchange.filter(|_| recovered).unwrap_or_else(|| {
        panic!(
            "team a never recovered from its flood: busy {} rate_limited {}",
            counted("busy"),
            counted("rate_limited")
        )
    });
    let mut jar = CookieJar::new(exchange.keys, exchange.agreement.cookies);
    nts_exchange(
        &mut jar,
        "127.0.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], a_port)),
    )
    .expect("team a served after its flood");
}
