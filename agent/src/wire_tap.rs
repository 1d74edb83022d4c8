//! In-server latency seen on the wire (`stratumctl bench --in-server`, `make bench`): a packet
//! tap on loopback timestamps every request on its way into the server and every reply on
//! its way out, and pairs them.
//!
//! Why a tap and not the servers' own counters: it measures every server the same way, with
//! no cooperation, including chronyd and ntpd-rs. The kernel stamps a loopback packet once,
//! when it enters the receive path (`netif_rx`); a request's stamp is the very timestamp the
//! server's socket reports as its receive time (its T2), and a reply's stamp is taken inside
//! the server's send call, where a software transmit timestamp would be. The difference is
//! what a client's T2 → T3 interval sees: the server's wake-up, its work and its send.
//!
//! A request and its reply are paired by the client's address and port and the request's
//! transmit timestamp, which every NTP server returns as the reply's origin timestamp (and
//! a raw echo returns unchanged).
//! Requests without a reply (lost, refused silently) stay unpaired and are counted; the
//! table of unpaired requests is bounded.

use std::collections::HashMap;
use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType,
    recvmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

use crate::loadgen::{LatencyHistogram, LatencySummary};

/// Requests waiting for their reply, at most: a 40k/s run of a few seconds needs far fewer;
/// beyond it new requests are not tracked (counted in `untracked`).
const MAX_PENDING: usize = 1 << 20;
/// `PACKET_HOST`: a packet addressed to this host, the one copy a loopback packet makes.
const PACKET_HOST: u8 = 0;
/// UDP and the NTP header offsets used for pairing.
const IPPROTO_UDP: u8 = 17;
const ORIGIN: std::ops::Range<usize> = 24..32;
const TRANSMIT: std::ops::Range<usize> = 40..48;

/// What the tap saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapReport {
    /// Requests seen going to the server.
    pub requests: u64,
    /// Replies paired with their request.
    pub paired: u64,
    /// Replies whose request the tap had not seen.
    pub unpaired_replies: u64,
    /// Requests never answered (or answered after the tap stopped).
    pub unanswered: u64,
    /// Requests not tracked because the pending table was full.
    pub untracked: u64,
    /// Request in → reply out, for the paired ones.
    pub latency: LatencySummary,
}

/// One request's identity on the wire.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Exchange {
    client: SocketAddr,
    stamp: [u8; 8],
}

/// Pairs requests and replies of one server (sans-IO: fed packets and their kernel stamps).
#[derive(Debug)]
pub struct Pairing {
    server_port: u16,
    pending: HashMap<Exchange, i128>,
    histogram: LatencyHistogram,
    report: TapReport,
}

impl Pairing {
    /// Pairs traffic to and from UDP port `server_port`.
    pub fn new(server_port: u16) -> Self {
        Self {
            server_port,
            pending: HashMap::new(),
            histogram: LatencyHistogram::default(),
            report: TapReport::default(),
        }
    }

    /// One IP packet (no link header) stamped `at_ns` by the kernel. Anything that is not a
    /// 48-byte-or-longer NTP datagram to or from the server's port is ignored.
    pub fn observe(&mut self, packet: &[u8], at_ns: i128) {
        let Some((source, destination, payload)) = udp_datagram(packet) else {
            return;
        };
        if payload.len() < 48 {
            return;
        }
        if destination.port() == self.server_port && source.port() != self.server_port {
            self.report.requests += 1;
            let exchange = Exchange {
                client: source,
                stamp: stamp(&payload[TRANSMIT]),
            };
            if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&exchange) {
                self.report.untracked += 1;
                return;
            }
            self.pending.insert(exchange, at_ns);
        } else if source.port() == self.server_port {
            // An NTP server returns the request's transmit stamp as the origin; a raw echo
            // (the benchmark's ceiling) returns it where it was.
            let answered = |field: std::ops::Range<usize>| Exchange {
                client: destination,
                stamp: stamp(&payload[field]),
            };
            let request_at = self
                .pending
                .remove(&answered(ORIGIN))
                .or_else(|| self.pending.remove(&answered(TRANSMIT)));
            match request_at {
                Some(request_at) => {
                    self.report.paired += 1;
                    // A reply never precedes its request; clamp a reordered stamp to 0.
                    let took = u64::try_from(at_ns - request_at).unwrap_or(0);
                    self.histogram.record(took);
                }
                None => self.report.unpaired_replies += 1,
            }
        }
    }

    /// The figures so far; requests still pending count as unanswered.
    pub fn report(&self) -> TapReport {
        TapReport {
            unanswered: self.pending.len() as u64,
            latency: self.histogram.summary(),
            ..self.report.clone()
        }
    }
}

fn stamp(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(bytes);
    out
}

/// Source, destination and payload of an IPv4 or IPv6 UDP datagram (IPv6 without extension
/// headers, which loopback NTP traffic never carries). Truncated or malformed packets and
/// fragments give `None`.
fn udp_datagram(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let (source, destination, udp) = match packet.first()? >> 4 {
        4 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]);
            // More-fragments set or a non-zero offset: not a whole datagram.
            if header_len < 20 || packet.get(9)? != &IPPROTO_UDP || fragment & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            let source = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            let destination = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
            (
                IpAddr::V4(source),
                IpAddr::V4(destination),
                packet.get(header_len..total.min(packet.len()))?,
            )
        }
        6 => {
            if packet.get(6)? != &IPPROTO_UDP {
                return None;
            }
            let source = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
            let destination = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
            (
                IpAddr::V6(source),
                IpAddr::V6(destination),
                packet.get(40..)?,
            )
        }
        _ => return None,
    };
    let source_port = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let destination_port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let length = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let payload = udp.get(8..length.min(udp.len()))?;
    Some((
        SocketAddr::new(source, source_port),
        SocketAddr::new(destination, destination_port),
        payload,
    ))
}

/// A running tap on the loopback interface.
#[derive(Debug)]
pub struct Tap {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<TapReport>>,
}

impl Tap {
    /// Starts tapping loopback for traffic of UDP port `server_port`, on a thread of its own
    /// (which inherits the caller's CPU affinity: `make bench` keeps it on the load
    /// generator's core, off the server's). Needs CAP_NET_RAW.
    pub fn start(server_port: u16) -> io::Result<Self> {
        let (socket, loopback) = open_loopback_tap()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wire-tap".into())
                .spawn(move || {
                    let mut pairing = Pairing::new(server_port);
                    read_loopback(&socket, loopback, &stop, |packet, at_ns| {
                        pairing.observe(packet, at_ns);
                    })?;
                    Ok(pairing.report())
                })?
        };
        Ok(Self { stop, thread })
    }

    /// Stops the tap after it has read what the kernel already queued, and reports.
    pub fn finish(self) -> io::Result<TapReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the tap thread panicked"))?
    }
}

/// One UDP datagram seen on loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub payload: Vec<u8>,
}

/// Most datagrams a [`Recorder`] keeps; later ones are counted, not kept.
const MAX_RECORDED: usize = 100_000;

/// Records the UDP datagrams to or from some ports on loopback, for tests that assert on
/// what went over the wire (an NTS upstream is never polled in the clear). Needs CAP_NET_RAW.
#[derive(Debug)]
pub struct Recorder {
    stop: Arc<AtomicBool>,
    /// Datagrams matched so far (kept or not), for tests that wait on traffic.
    seen: Arc<AtomicUsize>,
    thread: JoinHandle<io::Result<(Vec<Datagram>, usize)>>,
}

impl Recorder {
    /// Starts recording datagrams whose source or destination port is one of `ports`.
    pub fn start(ports: &[u16]) -> io::Result<Self> {
        let (socket, loopback) = open_loopback_tap()?;
        let ports = ports.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let seen = seen.clone();
            std::thread::Builder::new()
                .name("wire-recorder".into())
                .spawn(move || {
                    let mut kept = Vec::new();
                    let mut dropped = 0;
                    read_loopback(&socket, loopback, &stop, |packet, _| {
                        let Some((source, destination, payload)) = udp_datagram(packet) else {
                            return;
                        };
                        if !ports.contains(&source.port()) && !ports.contains(&destination.port()) {
                            return;
                        }
                        seen.fetch_add(1, Ordering::Relaxed);
                        if kept.len() < MAX_RECORDED {
                            kept.push(Datagram {
                                source,
                                destination,
                                payload: payload.to_vec(),
                            });
                        } else {
                            dropped += 1;
                        }
                    })?;
                    Ok((kept, dropped))
                })?
        };
        Ok(Self { stop, seen, thread })
    }

    /// How many matching datagrams were seen so far.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::Relaxed)
    }

    /// Stops after reading what the kernel already queued: the datagrams in the order seen,
    /// and how many more were seen than kept.
    pub fn finish(self) -> io::Result<(Vec<Datagram>, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the recorder thread panicked"))?
    }
}

/// A packet socket seeing every IP packet on loopback once, with kernel timestamps, and the
/// loopback interface index.
fn open_loopback_tap() -> io::Result<(OwnedFd, usize)> {
    let loopback = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)? as usize;
    let socket = socket(
        AddressFamily::Packet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .map_err(|e| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cannot open a packet socket (needs CAP_NET_RAW): {e}"),
        )
    })?;
    setsockopt(&socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)?;
    // A few seconds of 40k/s each way fit; without FORCE (no CAP_NET_ADMIN) the kernel
    // caps it at rmem_max, and any loss shows as unanswered requests.
    if setsockopt(&socket, sockopt::RcvBufForce, &(64 << 20)).is_err() {
        setsockopt(&socket, sockopt::RcvBuf, &(64 << 20)).map_err(io::Error::from)?;
    }
    setsockopt(
        &socket,
        sockopt::ReceiveTimeout,
        &TimeVal::new(0, 50_000), // how often the stop flag is looked at
    )
    .map_err(io::Error::from)?;
    Ok((socket, loopback))
}

/// Hands every packet addressed to loopback (IP header on, no link header) and its kernel
/// timestamp to `observe`, until `stop` is set and the queue is drained.
fn read_loopback(
    socket: &OwnedFd,
    loopback: usize,
    stop: &AtomicBool,
    mut observe: impl FnMut(&[u8], i128),
) -> io::Result<()> {
    // Room for an NTS datagram with the largest cookies.
    let mut buffer = [0u8; 4096];
    let mut control = nix::cmsg_space!(nix::sys::time::TimeSpec);
    loop {
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let received = recvmsg::<LinkAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::empty(),
        );
        let message = match received {
            Ok(message) => message,
            // The receive timeout: stop once the queue is drained and the run is over.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let on_loopback = message
            .address
            .is_some_and(|a| a.ifindex() == loopback && a.pkttype() == PACKET_HOST);
        let at_ns = message.cmsgs().ok().and_then(|mut cmsgs| {
            cmsgs.find_map(|c| match c {
                ControlMessageOwned::ScmTimestampns(ts) => {
                    Some(i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec()))
                }
                _ => None,
            })
        });
        let length = message.bytes;
        if let (true, Some(at_ns)) = (on_loopback, at_ns) {
            observe(&buffer[..length.min(buffer.len())], at_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp(source: SocketAddr, destination: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (source.ip(), destination.ip()) else {
            panic!("IPv4 only");
        };
        let total = 20 + 8 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        p.extend_from_slice(&source.port().to_be_bytes());
        p.extend_from_slice(&destination.port().to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn request(transmit: u64) -> [u8; 48] {
        let mut r = [0u8; 48];
        r[0] = 0x23;
        r[TRANSMIT].copy_from_slice(&transmit.to_be_bytes());
        r
    }

    fn reply(origin: u64) -> [u8; 48] {
        let mut r = [0u8; 48];
        r[0] = 0x24;
        r[ORIGIN].copy_from_slice(&origin.to_be_bytes());
        r[TRANSMIT].copy_from_slice(&(origin + 99).to_be_bytes());
        r
    }

    const SERVER: &str = "127.0.0.1:4123";

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a test address")
    }

    #[test]
    fn a_reply_is_paired_with_its_own_request_by_client_and_stamp() {
        let server = addr(SERVER);
        let a = addr("127.0.0.10:5000");
        let b = addr("127.0.0.11:5000");
        let mut pairing = Pairing::new(4123);
        // Same stamp from two clients (one batch of the generator), answered out of order.
        pairing.observe(&ipv4_udp(a, server, &request(7)), 1_000);
        pairing.observe(&ipv4_udp(b, server, &request(7)), 1_100);
        pairing.observe(&ipv4_udp(server, b, &reply(7)), 1_150); // b: 50 ns
        pairing.observe(&ipv4_udp(server, a, &reply(7)), 9_000); // a: 8000 ns
        let report = pairing.report();
        assert_eq!(
            (report.requests, report.paired, report.unanswered),
            (2, 2, 0)
        );
        assert_eq!(report.latency.max_ns, 8_000);
        // b paired with its own request (50 ns, within one ~6% bucket), not with a's.
        assert!(report.latency.p50_ns < 60, "{report:?}");
    }

    #[test]
    fn an_echo_is_paired_by_the_stamp_it_returns_in_place() {
        let server = addr(SERVER);
        let client = addr("127.0.0.10:5000");
        let mut pairing = Pairing::new(4123);
        pairing.observe(&ipv4_udp(client, server, &request(5)), 100);
        pairing.observe(&ipv4_udp(server, client, &request(5)), 350);
        let report = pairing.report();
        assert_eq!((report.paired, report.unanswered), (1, 0));
        assert_eq!(report.latency.max_ns, 250);
    }

    #[test]
    fn unanswered_requests_stray_replies_and_other_traffic_are_counted_apart() {
        let server = addr(SERVER);
        let client = addr("127.0.0.10:5000");
        let other = addr("127.0.0.1:9999");
        let mut pairing = Pairing::new(4123);
        pairing.observe(&ipv4_udp(client, server, &request(1)), 10);
        pairing.observe(&ipv4_udp(server, client, &reply(2)), 20); // answers nothing seen
        pairing.observe(&ipv4_udp(client, other, &request(3)), 30); // another port
        pairing.observe(&ipv4_udp(client, server, &[0u8; 12]), 40); // too short for NTP
        pairing.observe(&[0x45, 0, 0], 50); // truncated
        let report = pairing.report();
        assert_eq!(report.requests, 1);
        assert_eq!(report.paired, 0);
        assert_eq!(report.unpaired_replies, 1);
        assert_eq!(report.unanswered, 1);
    }

    #[test]
    fn fragments_and_lies_about_lengths_are_not_read_past_the_packet() {
        let server = addr(SERVER);
        let client = addr("127.0.0.10:5000");
        let mut fragment = ipv4_udp(client, server, &request(1));
        fragment[6] = 0x20; // more fragments
        assert!(udp_datagram(&fragment).is_none());
        let mut long_claim = ipv4_udp(client, server, &request(1));
        long_claim[24..26].copy_from_slice(&u16::MAX.to_be_bytes()); // UDP length
        let (_, _, payload) = udp_datagram(&long_claim).expect("a whole datagram");
        assert_eq!(payload.len(), 48);
        let mut bad_header = ipv4_udp(client, server, &request(1));
        bad_header[0] = 0x4f; // 60-byte header in a 76-byte packet
        assert!(udp_datagram(&bad_header).is_none_or(|(_, _, p)| p.len() < 48));
    }
}
