//! Tenants' symmetric keys (RFC 8573 AES-CMAC, legacy SHA1 and MD5) against real clients:
//! chronyd from Debian (`-Q`: measures, never sets the clock, without CAP_SYS_TIME) with a
//! keyfile, and ntpsec's ntpdig with `-k`/`-a`. The agent's real server (workers, sockets)
//! and its key file loader run in this process on loopback. Each client is tried with the
//! right key, a wrong key under a right id, an id the tenant does not have, and another
//! tenant's key: only the first is ever answered, and then signed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use stratum_agent::server::Server;
use stratum_agent::server::stats::TenantTotals;
use stratum_agent::symmetric_keys::SymmetricKeyFiles;
use stratum_api::agent_config::{
    ServingConfig, TenantConfig, TenantSymmetricKeysConfig, Unauthenticated,
};
use stratum_ntp::packet::Packet;
use stratum_ntp::symmetric::{MacCheck, SymmetricKeys, is_crypto_nak};

/// The served clock is the host clock here, so a client must measure (almost) no offset.
const MAX_OFFSET_SECS: f64 = 0.05;

/// Tenant a's keys, in the spellings chrony and ntpsec read too (test keys, not secrets).
const TENANT_A_KEYS: &str = "\
1 AES128 HEX:8c1f0b7e6d5a4938271605f4e3d2c1b0
2 SHA1 HEX:1f2e3d4c5b6a79880796a5b4c3d2e1f001234567
3 MD5 HEX:00112233445566778899aabbccddeeff
";
/// Tenant b's: key 1 exists there too, with another value.
const TENANT_B_KEYS: &str = "1 AES128 HEX:0f0e0d0c0b0a09080706050403020100\n";

fn keyed_tenant(
    id: &str,
    port: u16,
    keys_file: &Path,
    unauthenticated: Unauthenticated,
) -> TenantConfig {
    TenantConfig {
        symmetric_keys: Some(TenantSymmetricKeysConfig {
            keys_file: keys_file.display().to_string(),
            unauthenticated,
        }),
        // kiss_of_death: failed MACs get a crypto-NAK, so a client learns fast.
        ..tenant(id, port, &["127.0.0.0/8"], true)
    }
}

/// The server on `bind` with the key files of `serving` read as the agent reads them.
fn keyed_server(bind: IpAddr, serving: &ServingConfig) -> Server {
    let server = start_server_on(bind, 1, serving);
    let mut files = SymmetricKeyFiles::new();
    assert!(files.apply(&stratum_agent::symmetric_keys::tenant_key_files(serving)));
    assert_eq!(
        files.failed().count(),
        0,
        "{:?}",
        files.failed().collect::<Vec<_>>()
    );
    server.set_symmetric_keys(files.loaded(), serving);
    server
}

fn totals(server: &Server, id: &str) -> TenantTotals {
    server
        .stats()
        .tenants
        .into_iter()
        .find(|t| t.tenant == id)
        .map(|t| t.totals)
        .unwrap_or_default()
}

/// chronyd -Q against 127.0.0.1:`port` signing with key `key_id` of the chrony keyfile
/// `keys` (one line per key, chrony's spelling), its requests sent from `source` (a loopback
/// address; each /24 has a refusal budget of its own).
fn chronyd_with_key(
    chronyd: &Path,
    source: &str,
    port: u16,
    keys: &str,
    key_id: u32,
) -> Option<f64> {
    let dir = TempDir::new("chronyq-keys");
    let keyfile = dir.path("chrony.keys");
    std::fs::write(&keyfile, keys).unwrap();
    chronyd_query(
        &[],
        chronyd,
        &dir.0,
        &format!(
            "keyfile {}\nbindacqaddress {source}\n\
             server 127.0.0.1 port {port} key {key_id} iburst maxsamples 4\n",
            keyfile.display()
        ),
    )
}

#[test]
fn chronyd_with_each_key_type_gets_signed_time_and_wrong_keys_get_none() {
    let Some(chronyd) = find_program("chronyd", &[]).or_else(|| skip("chronyd not installed"))
    else {
        return;
    };
    let dir = TempDir::new("symkeys-chrony");
    let (a_file, b_file) = (dir.path("tenant-a.keys"), dir.path("tenant-b.keys"));
    std::fs::write(&a_file, TENANT_A_KEYS).unwrap();
    std::fs::write(&b_file, TENANT_B_KEYS).unwrap();
    let (a_port, b_port) = (free_udp_port(), free_udp_port());
    let serving = serving(vec![
        keyed_tenant("team-a/devices", a_port, &a_file, Unauthenticated::Deny),
        keyed_tenant("team-b/devices", b_port, &b_file, Unauthenticated::Deny),
    ]);
    let server = keyed_server("127.0.0.1".parse().unwrap(), &serving);

    // Every key type, each through chronyd's own MAC code (it drops replies that do not
    // verify, so an offset means the reply was signed with the same key).
    for key_id in [1, 2, 3] {
        let offset = chronyd_with_key(&chronyd, "127.0.0.1", a_port, TENANT_A_KEYS, key_id)
            .unwrap_or_else(|| {
                panic!(
                    "chronyd with key {key_id} got no time: {:?}",
                    totals(&server, "team-a/devices")
                )
            });
        assert!(
            offset.abs() < MAX_OFFSET_SECS,
            "key {key_id}: chronyd measured {offset} s"
        );
    }
    let served = totals(&server, "team-a/devices");
    assert!(served.mac_authenticated >= 3, "{served:?}");
    assert_eq!(
        served.mac_authenticated, served.served,
        "every answer signed: {served:?}"
    );

    // What must not work, side by side (each waits out chronyd's timeout).
    let wrong_value = TENANT_A_KEYS.replace("8c1f0b7e", "8c1f0b7f");
    let unknown_id = "7 AES128 HEX:8c1f0b7e6d5a4938271605f4e3d2c1b0\n";
    // Each from a /24 of its own: refusals are budgeted per network, and clients sharing one
    // would take each other's crypto-NAKs (then silence, which is right but shows less).
    let cases: Vec<(&str, &str, u16, String, u32)> = vec![
        ("wrong key under id 1", "127.0.10.1", a_port, wrong_value, 1),
        (
            "key id 7, unknown to the tenant",
            "127.0.11.1",
            a_port,
            unknown_id.to_owned(),
            7,
        ),
        (
            "tenant a's key 1 at tenant b",
            "127.0.12.1",
            b_port,
            TENANT_A_KEYS.to_owned(),
            1,
        ),
        (
            "no key where the tenant requires one",
            "127.0.13.1",
            a_port,
            String::new(),
            0,
        ),
    ];
    let results: Vec<(&str, Option<f64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(what, source, port, keys, id)| {
                let chronyd = &chronyd;
                scope.spawn(move || {
                    let offset = if *id == 0 {
                        let dir = TempDir::new("chronyq-plain");
                        chronyd_query(
                            &[],
                            chronyd,
                            &dir.0,
                            &format!(
                                "bindacqaddress {source}\n\
                                 server 127.0.0.1 port {port} iburst maxsamples 4\n"
                            ),
                        )
                    } else {
                        chronyd_with_key(chronyd, source, *port, keys, *id)
                    };
                    (*what, offset)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (what, offset) in results {
        assert_eq!(offset, None, "{what}: chronyd got time");
    }
    let a = totals(&server, "team-a/devices");
    let b = totals(&server, "team-b/devices");
    // Every forged MAC refused: the wrong key and the unknown id each get a crypto-NAK (their
    // networks' budgets are their own), repeats beyond the budget silence.
    assert!(
        a.mac_nak >= 2,
        "wrong key and unknown id get crypto-NAKs: {a:?}"
    );
    assert!(
        a.unauthenticated >= 1,
        "the plain request was refused: {a:?}"
    );
    assert!(
        b.mac_nak >= 1 && b.served == 0,
        "tenant b served nothing: {b:?}"
    );
    assert_eq!(
        a.mac_authenticated, served.mac_authenticated,
        "no further signed answers: {a:?}"
    );
}

/// ntpdig with `-k keyfile -a id`; its JSON report, or what it said instead.
fn ntpdig_with_key(
    ntpdig: &Path,
    address: &str,
    keys: &str,
    key_id: u32,
) -> Result<serde_json::Value, String> {
    let dir = TempDir::new("ntpdig-keys");
    let keyfile = dir.path("ntp.keys");
    std::fs::write(&keyfile, keys).unwrap();
    let output = Command::new("setpriv")
        .args(["--bounding-set=-sys_time", "--inh-caps=-sys_time"])
        .arg(ntpdig)
        .args(["-j", "-t", "2", "-k"])
        .arg(&keyfile)
        .args(["-a", &key_id.to_string(), address])
        .output()
        .expect("running ntpdig");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str::<serde_json::Value>(stdout.trim())
        .ok()
        .filter(|report| report["offset"].is_f64())
        .ok_or_else(|| format!("{stdout} {}", String::from_utf8_lossy(&output.stderr)))
}

#[test]
fn ntpdig_with_a_keyfile_is_served_signed_and_wrong_keys_are_not() {
    let Some(ntpdig) = find_program("ntpdig", &[]).or_else(|| skip("ntpdig not installed")) else {
        return;
    };
    // ntpdig only speaks to port 123: serve it on an address of our own.
    let address = "127.79.0.1";
    let dir = TempDir::new("symkeys-ntpdig");
    let file = dir.path("tenant-a.keys");
    std::fs::write(&file, TENANT_A_KEYS).unwrap();
    let serving = serving(vec![keyed_tenant(
        "team-a/devices",
        123,
        &file,
        Unauthenticated::Ignore,
    )]);
    let server = keyed_server(address.parse().unwrap(), &serving);

    // ntpsec's spelling of the same keys: AES for AES-128-CMAC, bare hex.
    let ntpsec_keys = "1 AES 8c1f0b7e6d5a4938271605f4e3d2c1b0\n2 SHA1 1f2e3d4c5b6a79880796a5b4c3d2e1f001234567\n3 MD5 00112233445566778899aabbccddeeff\n";
    for key_id in [1, 2, 3] {
        let report = ntpdig_with_key(&ntpdig, address, ntpsec_keys, key_id)
            .unwrap_or_else(|said| panic!("ntpdig with key {key_id} got no time: {said}"));
        let offset = report["offset"].as_f64().unwrap();
        assert!(offset.abs() < MAX_OFFSET_SECS, "key {key_id}: {report}");
    }
    let served = totals(&server, "team-a/devices");
    assert_eq!(served.mac_authenticated, 3, "{served:?}");

    let wrong = ntpsec_keys.replace("8c1f0b7e", "8c1f0b7f");
    assert!(
        ntpdig_with_key(&ntpdig, address, &wrong, 1).is_err(),
        "a wrong key got time"
    );
    let unknown = "9 AES 8c1f0b7e6d5a4938271605f4e3d2c1b0\n";
    assert!(
        ntpdig_with_key(&ntpdig, address, unknown, 9).is_err(),
        "an unknown key id got time"
    );
    let after = totals(&server, "team-a/devices");
    assert_eq!(after.mac_authenticated, 3, "{after:?}");
    // Both refused; the second crypto-NAK only if 2 s passed since the first (one refusal
    // per network per 2 s, the tenant's refusal budget).
    assert_eq!(after.mac_nak + after.mac_failed, 2, "{after:?}");
    assert!(after.mac_nak >= 1, "{after:?}");
}

/// `datagram` from `source` to `target`, and the answer that echoes its transmit timestamp,
/// if one comes within 2 s.
fn exchange_from(source: IpAddr, target: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(datagram, target).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        let (n, from) = socket.recv_from(&mut buf).ok()?;
        if from == target && n >= 48 && buf[24..32] == datagram[40..48] {
            return Some(buf[..n].to_vec());
        }
    }
}

/// A client request signed with key `key_id` of `keys`.
fn signed_request(keys: &SymmetricKeys, key_id: u32, cookie: u64) -> Vec<u8> {
    let mut buf = [0u8; 48 + stratum_ntp::packet::MAX_MAC_LEN];
    buf[..48].copy_from_slice(&client_request(cookie));
    let len = keys.sign(key_id, &mut buf, 48).unwrap();
    buf[..len].to_vec()
}

/// A spoofed flood of forged MACs from many networks on tenant a spends a's refusal budget,
/// and only a's: tenant b's device with a wrong key still gets its crypto-NAK at once, and
/// a's own device, signing with its key, is answered signed through the flood.
#[test]
fn a_forged_mac_flood_on_one_tenant_silences_only_that_tenants_refusals() {
    let dir = TempDir::new("symkeys-flood");
    let (a_file, b_file) = (dir.path("tenant-a.keys"), dir.path("tenant-b.keys"));
    std::fs::write(&a_file, TENANT_A_KEYS).unwrap();
    std::fs::write(&b_file, TENANT_B_KEYS).unwrap();
    let (a_port, b_port) = (free_udp_port(), free_udp_port());
    let serving = serving(vec![
        keyed_tenant("team-a/devices", a_port, &a_file, Unauthenticated::Deny),
        keyed_tenant("team-b/devices", b_port, &b_file, Unauthenticated::Deny),
    ]);
    let server = keyed_server("127.0.0.1".parse().unwrap(), &serving);
    let a_keys = SymmetricKeys::parse(TENANT_A_KEYS).unwrap();
    let forger = SymmetricKeys::parse("1 AES128 HEX:ffffffffffffffffffffffffffffffff\n").unwrap();
    let a_target = SocketAddr::from(([127, 0, 0, 1], a_port));

    // 500 forgeries from 250 networks (127.1.n.1; loopback is allowed): the refusal budget
    // (a burst of 40, then 20/s, one per network per 2 s) is spent many times over.
    const NETWORKS: u32 = 250;
    const PER_NETWORK: u32 = 2;
    for n in 0..NETWORKS {
        let source = IpAddr::from([127, 1, n as u8, 1]);
        let socket = UdpSocket::bind(SocketAddr::new(source, 0)).unwrap();
        for i in 0..PER_NETWORK {
            let forged = signed_request(&forger, 1, u64::from(n * PER_NETWORK + i));
            socket.send_to(&forged, a_target).unwrap();
        }
    }
    let refused = || {
        let a = totals(&server, "team-a/devices");
        a.mac_nak + a.mac_failed
    };
    assert!(
        wait_until(Duration::from_secs(10), || refused()
            >= u64::from(NETWORKS * PER_NETWORK)),
        "{:?}",
        totals(&server, "team-a/devices")
    );
    let a = totals(&server, "team-a/devices");
    assert!(
        a.mac_failed > a.mac_nak && a.mac_nak <= 40 + 20 * 10,
        "the flood spent a's refusal budget, most forgeries got silence: {a:?}"
    );
    assert_eq!(a.served, 0, "{a:?}");
    eprintln!(
        "{} forged MACs on tenant a: {} crypto-NAKs sent, {} silenced",
        NETWORKS * PER_NETWORK,
        a.mac_nak,
        a.mac_failed
    );

    // Tenant b, same agent, same moment: a wrong key still earns its crypto-NAK.
    let wrong_at_b = signed_request(&a_keys, 1, 0xB0B);
    let reply = exchange_from(
        "127.2.0.1".parse().unwrap(),
        SocketAddr::from(([127, 0, 0, 1], b_port)),
        &wrong_at_b,
    )
    .expect("tenant b's crypto-NAK, a's flood notwithstanding");
    assert!(is_crypto_nak(&reply), "{reply:?}");
    // The worker counts a batch after sending it: the count may trail the reply.
    assert!(
        wait_until(Duration::from_secs(2), || totals(&server, "team-b/devices")
            .mac_nak
            == 1),
        "{:?}",
        totals(&server, "team-b/devices")
    );

    // Tenant a's real device is served, signed with its key, after the flood.
    let good = signed_request(&a_keys, 1, 0xD0D);
    let reply = exchange_from("127.3.0.1".parse().unwrap(), a_target, &good)
        .expect("tenant a's device served through its flood");
    let view = Packet::parse(&reply).unwrap();
    assert_eq!(
        a_keys.check(&reply, view.mac),
        MacCheck::Valid { key_id: 1 }
    );
}
