//! Must-show 1 (access half) and the served clock: who gets an answer on which tenant port,
//! over IPv4 and IPv6, and that answers carry the agent's clock rather than the host's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use stratum_agent::clock::{Timescale, host_realtime};
use stratum_ntp::packet::{Mode, Packet};
use stratum_ntp::time::NtpTimestamp;

const PATIENCE: Duration = Duration::from_millis(1500);
/// Long enough that a datagram which would be answered surely is, on a loaded machine.
const SILENCE: Duration = Duration::from_millis(700);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::new(ip("127.0.0.1"), port)
}

#[test]
fn allowed_clients_are_served_and_strangers_get_nothing_without_kod() {
    let port = free_udp_port();
    let _server = start_server(
        2,
        &serving(vec![tenant("ns/a", port, &["127.10.0.0/16"], false)]),
    );
    let reply = ask(ip("127.10.0.5"), at(port), PATIENCE).expect("allowed client answered");
    let header = Packet::parse(&reply).unwrap().header;
    assert_eq!(header.mode, Mode::Server);
    assert_eq!(header.stratum, 2);
    assert_eq!(reply.len(), 48);
    assert!(ask(ip("127.11.0.5"), at(port), SILENCE).is_none());
}

#[test]
fn strangers_get_kod_deny_when_the_tenant_enables_kod() {
    let port = free_udp_port();
    let _server = start_server(
        1,
        &serving(vec![tenant("ns/a", port, &["127.10.0.0/16"], true)]),
    );
    let reply = ask(ip("127.12.0.5"), at(port), PATIENCE).expect("KoD DENY");
    let header = Packet::parse(&reply).unwrap().header;
    assert_eq!(header.stratum, 0);
    assert_eq!(&header.reference_id.0, b"DENY");
}

#[test]
fn each_tenant_refuses_the_other_tenants_clients() {
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let _server = start_server(
        2,
        &serving(vec![
            tenant("team-a/ntp", port_a, &["127.21.0.0/16"], false),
            tenant("team-b/ntp", port_b, &["127.22.0.0/16"], true),
        ]),
    );
    let (client_a, client_b) = (ip("127.21.0.9"), ip("127.22.0.9"));
    assert!(ask(client_a, at(port_a), PATIENCE).is_some());
    assert!(ask(client_b, at(port_b), PATIENCE).is_some());
    assert!(
        ask(client_b, at(port_a), SILENCE).is_none(),
        "B's client on A's port (no KoD) gets nothing"
    );
    let kod = ask(client_a, at(port_b), PATIENCE).expect("A's client on B's port gets KoD DENY");
    assert_eq!(&kod[12..16], b"DENY");
}

#[test]
fn ipv6_and_ipv4_clients_share_the_dual_stack_port() {
    let port = free_udp_port();
    let _server = start_server(
        2,
        &serving(vec![tenant(
            "ns/a",
            port,
            &["::1/128", "127.0.0.0/8"],
            false,
        )]),
    );
    let v6 = ask(ip("::1"), SocketAddr::new(ip("::1"), port), PATIENCE).expect("IPv6 client");
    assert_eq!(Packet::parse(&v6).unwrap().header.stratum, 2);
    assert!(ask(ip("127.0.0.1"), at(port), PATIENCE).is_some());
}

#[test]
fn answers_carry_the_served_clock_not_the_host_clock() {
    let port = free_udp_port();
    let server = start_server(
        1,
        &serving(vec![tenant("ns/a", port, &["127.0.0.0/8"], false)]),
    );
    // The disciplined clock runs 5 s ahead of the host clock.
    let now = host_realtime();
    server.publish_clock(
        synchronized_state(),
        Timescale {
            host_ref: now,
            clock_ref: now.add_secs(5.0),
            rate: 0.0,
        },
    );
    let reply = ask(ip("127.0.0.1"), at(port), PATIENCE).unwrap();
    let header = Packet::parse(&reply).unwrap().header;
    let host = host_realtime();
    let receive = header.receive_timestamp.to_clock_time_near(host);
    let transmit = header.transmit_timestamp.to_clock_time_near(host);
    assert!(
        (receive.secs_since(host) - 5.0).abs() < 0.5,
        "receive {receive:?} host {host:?}"
    );
    assert!(transmit >= receive, "transmit stamped after receive");
    assert_ne!(header.transmit_timestamp, NtpTimestamp::ZERO);
}

#[test]
fn control_mode_queries_are_never_answered() {
    let port = free_udp_port();
    let _server = start_server(
        1,
        &serving(vec![tenant("ns/a", port, &["127.0.0.0/8"], true)]),
    );
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(SILENCE)).unwrap();
    for mode in [6u8, 7] {
        let mut query = [0u8; 48];
        query[0] = (2 << 3) | mode;
        socket.send_to(&query, at(port)).unwrap();
    }
    let mut buf = [0u8; 512];
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "mode 6/7 must get no reply"
    );
}
