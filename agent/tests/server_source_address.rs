//! Issue 15: a reply leaves from the address its request was sent to. The test builds two
//! network namespaces of its own joined by a veth pair (nothing else: no link to the host's
//! namespace, so no packet can leave the machine): the server's has two IPv4 and two IPv6
//! addresses on one interface, the client's one of each. On a wildcard-bound socket the
//! kernel would answer a client that asked the second address from the first (the route's
//! preferred source), and a client whose socket is connected to the address it asked never
//! sees that answer.
//!
//! Checked with a connected UDP socket in Rust (it only receives from the connected
//! address) and with `chronyd -Q` (which also drops replies from another source), for every
//! address. A naive server answering with a plain `send_to` is run first, in the same
//! namespaces, to show the setup does catch a wrong source.
//!
//! Needs CAP_SYS_ADMIN for `ip netns` and `setns`: skipped, with a message, without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "server_common/mod.rs"]
mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sched::CloneFlags;

const SERVER_ADDRESSES: [&str; 4] = ["10.77.1.1", "10.77.1.2", "fd77::1", "fd77::2"];
const CLIENT_V4: &str = "10.77.1.100";
const CLIENT_V6: &str = "fd77::100";
const PORT: u16 = 12300;
const NAIVE_PORT: u16 = 12301;

/// Two namespaces joined by a veth pair, deleted on drop (with them the veth pair).
struct Namespaces {
    server: String,
    client: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The namespaces, or `None` (with a message) where `ip netns` is not permitted.
fn namespaces() -> Option<Namespaces> {
    let tag = std::process::id() % 100_000;
    let server = format!("stratum-srcaddr-s{tag}");
    let client = format!("stratum-srcaddr-c{tag}");
    if let Err(e) = ip(&["netns", "add", &server]) {
        eprintln!("SKIPPED: cannot create a network namespace ({e}); needs CAP_SYS_ADMIN");
        return None;
    }
    let namespaces = Namespaces {
        server,
        client: client.clone(),
    };
    ip(&["netns", "add", &client]).unwrap();
    let (s, c) = (namespaces.server.as_str(), client.as_str());
    let (veth_s, veth_c) = (format!("st{tag}s"), format!("st{tag}c"));
    ip(&[
        "link", "add", &veth_s, "netns", s, "type", "veth", "peer", "name", &veth_c, "netns", c,
    ])
    .unwrap();
    for (ns, dev, addresses) in [
        (s, &veth_s, &SERVER_ADDRESSES[..]),
        (c, &veth_c, &[CLIENT_V4, CLIENT_V6][..]),
    ] {
        ip(&["-n", ns, "link", "set", "lo", "up"]).unwrap();
        for address in addresses {
            let prefix = if address.contains(':') { 64 } else { 24 };
            // nodad: usable at once, no duplicate address detection to wait for.
            let cidr = format!("{address}/{prefix}");
            let mut args = vec!["-n", ns, "addr", "add", &cidr, "dev", dev.as_str()];
            if prefix == 64 {
                args.push("nodad");
            }
            ip(&args).unwrap();
        }
        ip(&["-n", ns, "link", "set", dev, "up"]).unwrap();
    }
    Some(namespaces)
}

/// Runs `f` on a thread that entered namespace `ns`; sockets it opens (and threads it
/// starts) stay there.
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let handle = std::fs::File::open(&path).expect("opening the namespace");
        nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET).expect("entering the namespace");
        f()
    })
    .join()
    .unwrap()
}

/// A client socket in the client namespace, on its address of `target`'s family, connected
/// to `target` when `connect` (then it receives only what `target` sends).
fn client_socket(namespaces: &Namespaces, target: SocketAddr, connect: bool) -> UdpSocket {
    in_namespace(&namespaces.client, move || {
        let local: IpAddr = if target.is_ipv4() {
            CLIENT_V4
        } else {
            CLIENT_V6
        }
        .parse()
        .unwrap();
        let socket = UdpSocket::bind(SocketAddr::new(local, 0)).unwrap();
        if connect {
            socket.connect(target).unwrap();
        }
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket
    })
}

/// Whether one request on a socket connected to `target` is answered.
fn answered_by(namespaces: &Namespaces, target: SocketAddr) -> bool {
    let socket = client_socket(namespaces, target, true);
    socket.send(&client_request(0x5EED)).unwrap();
    let mut buf = [0u8; 1024];
    matches!(socket.recv(&mut buf), Ok(n) if n >= 48)
}

/// Where the answer to a request for `target` comes from, as an unconnected socket sees it.
fn answer_source(namespaces: &Namespaces, target: SocketAddr) -> Option<SocketAddr> {
    let socket = client_socket(namespaces, target, false);
    socket.send_to(&client_request(0x5EED), target).unwrap();
    let mut buf = [0u8; 1024];
    socket.recv_from(&mut buf).ok().map(|(_, from)| from)
}

fn targets(port: u16) -> Vec<SocketAddr> {
    SERVER_ADDRESSES
        .iter()
        .map(|a| SocketAddr::new(a.parse().unwrap(), port))
        .collect()
}

/// A server that answers with `send_to` and lets the kernel choose the source.
fn start_naive_server(namespaces: &Namespaces) -> UdpSocket {
    let socket = in_namespace(&namespaces.server, || {
        UdpSocket::bind(("::", NAIVE_PORT)).unwrap()
    });
    let serving = socket.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok((n, from)) = serving.recv_from(&mut buf) {
            if n == 0 || serving.send_to(&buf[..n], from).is_err() {
                return;
            }
        }
    });
    socket
}

/// chronyd -Q in the client namespace against `target`: the measured offset, or None
/// without an accepted answer.
fn chronyd_measure(
    chronyd: &std::path::Path,
    namespaces: &Namespaces,
    target: SocketAddr,
) -> Option<f64> {
    let dir = TempDir::new("srcaddr");
    chronyd_query(
        &["ip", "netns", "exec", &namespaces.client],
        chronyd,
        &dir.0,
        &format!(
            "server {} port {} iburst maxsamples 1\n",
            target.ip(),
            target.port()
        ),
    )
}

#[test]
fn replies_leave_from_the_address_each_client_asked_on_a_node_with_two_addresses() {
    let Some(namespaces) = namespaces() else {
        return;
    };

    // The setup catches a wrong source: a naive wildcard server fails at least one address
    // of each family (the one that is not the route's preferred source).
    let naive = start_naive_server(&namespaces);
    let naive_answered: Vec<(SocketAddr, bool)> = targets(NAIVE_PORT)
        .into_iter()
        .map(|t| (t, answered_by(&namespaces, t)))
        .collect();
    let _ = naive.send_to(&[], naive.local_addr().unwrap());
    for family_v4 in [true, false] {
        assert!(
            naive_answered
                .iter()
                .any(|(t, ok)| t.is_ipv4() == family_v4 && !ok),
            "the naive server answered every {} address from the right source, so this \
             setup would not catch a wrong one: {naive_answered:?}",
            if family_v4 { "IPv4" } else { "IPv6" }
        );
    }
    eprintln!("naive wildcard server, answered per address: {naive_answered:?}");

    let config = serving(vec![tenant(
        "ns/multi",
        PORT,
        &["10.77.0.0/16", "fd77::/16"],
        false,
    )]);
    let server = in_namespace(&namespaces.server, move || start_server(2, &config));

    for target in targets(PORT) {
        assert_eq!(
            answer_source(&namespaces, target),
            Some(target),
            "the answer to a request for {target} came from elsewhere"
        );
        assert!(
            answered_by(&namespaces, target),
            "a client connected to {target} got no answer"
        );
    }

    match find_program("chronyd", &[]) {
        None => eprintln!("SKIPPED (chronyd part): chronyd not installed"),
        Some(chronyd) => {
            for target in targets(PORT) {
                let offset = chronyd_measure(&chronyd, &namespaces, target);
                eprintln!("chronyd -Q via {target}: offset {offset:?}");
                assert!(
                    offset.is_some_and(|o| o.abs() < 0.05),
                    "chronyd got no usable answer from {target}: {offset:?}"
                );
            }
        }
    }
    drop(server);
}
