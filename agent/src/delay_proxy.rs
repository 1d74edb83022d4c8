//! A UDP relay that holds back, and sometimes drops, each datagram by a seeded plan
//! (`stratumctl delay-proxy`; `make bench`'s accuracy comparison). Each client under test
//! gets a relay of its own with the same scenario and seed, so every client meets the same
//! sequence of path delays, request by request, in front of the same upstream.
//!
//! The plan (sans-IO, [`DelayPlan`]) draws each direction from its own seeded generator, so
//! the n-th request's delay does not depend on how a client interleaves requests and
//! replies. The relay (IO, [`relay`]) is three threads: one reading each socket, one sending
//! what is due; delays are kept to a timer's precision (tens of microseconds), far below
//! the scenarios' jitter.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One network path's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// 1 ms each way, 0–100 µs of jitter.
    Symmetric,
    /// 1 ms out, 3 ms back, 0–100 µs of jitter: every client is off by the 1 ms half-difference,
    /// which no NTP client can see.
    Asymmetric,
    /// 1 ms each way plus jitter from 100 µs up, exponential with a 1 ms mean, capped at 5 ms.
    Jitter,
    /// As `Symmetric`, with 1% of the datagrams lost each way.
    Loss,
    /// As `Symmetric` until the route changes, then 20 ms more on the way back.
    RouteChange,
}

impl Scenario {
    /// Every scenario, in the order the benchmark reports them.
    pub const ALL: [Self; 5] = [
        Self::Symmetric,
        Self::Asymmetric,
        Self::Jitter,
        Self::Loss,
        Self::RouteChange,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Symmetric => "symmetric",
            Self::Asymmetric => "asymmetric",
            Self::Jitter => "jitter",
            Self::Loss => "loss",
            Self::RouteChange => "route-change",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|c| c.name()).collect();
                format!("unknown scenario {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Which way a datagram travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// Client → upstream.
    Out,
    /// Upstream → client.
    Back,
}

const BASE: Duration = Duration::from_millis(1);
const ASYMMETRIC_BACK: Duration = Duration::from_millis(3);
const SMALL_JITTER: Duration = Duration::from_micros(100);
const JITTER_FLOOR: Duration = Duration::from_micros(100);
const JITTER_MEAN: f64 = 1e-3;
const JITTER_CAP: Duration = Duration::from_millis(5);
const LOSS: f64 = 0.01;
const ROUTE_CHANGE: Duration = Duration::from_millis(20);

/// The delays of one relay: the same scenario and seed give the same sequence per direction.
#[derive(Debug)]
pub struct DelayPlan {
    scenario: Scenario,
    route_change_after: Duration,
    out: StdRng,
    back: StdRng,
}

impl DelayPlan {
    /// A plan; for `RouteChange`, the route changes `route_change_after` the relay started.
    pub fn new(scenario: Scenario, seed: u64, route_change_after: Duration) -> Self {
        Self {
            scenario,
            route_change_after,
            out: StdRng::seed_from_u64(seed),
            back: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// How long to hold the next datagram going `direction`, received `since_start` after
    /// the relay started; `None`: drop it. Every call draws the same amount of randomness,
    /// so a dropped datagram does not shift the delays of the ones after it.
    pub fn next(&mut self, direction: Direction, since_start: Duration) -> Option<Duration> {
        let rng = match direction {
            Direction::Out => &mut self.out,
            Direction::Back => &mut self.back,
        };
        let (jitter_draw, loss_draw): (f64, f64) = (rng.random(), rng.random());
        let base = match (self.scenario, direction) {
            (Scenario::Asymmetric, Direction::Back) => ASYMMETRIC_BACK,
            (Scenario::RouteChange, Direction::Back) if since_start >= self.route_change_after => {
                BASE + ROUTE_CHANGE
            }
            _ => BASE,
        };
        let jitter = match self.scenario {
            Scenario::Jitter => {
                let exponential = -JITTER_MEAN * (1.0 - jitter_draw).ln();
                (JITTER_FLOOR + Duration::from_secs_f64(exponential)).min(JITTER_CAP)
            }
            _ => SMALL_JITTER.mul_f64(jitter_draw),
        };
        if self.scenario == Scenario::Loss && loss_draw < LOSS {
            return None;
        }
        Some(base + jitter)
    }
}

/// What a relay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayStats {
    /// Datagrams passed on, client → upstream.
    pub out: u64,
    /// Datagrams passed on, upstream → client.
    pub back: u64,
    /// Datagrams dropped by the plan.
    pub dropped: u64,
}

struct Pending {
    due: Instant,
    direction: Direction,
    datagram: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.due.cmp(&other.due)
    }
}

struct Shared {
    queue: Mutex<(BinaryHeap<Reverse<Pending>>, DelayPlan)>,
    ready: Condvar,
    client: Mutex<Option<SocketAddr>>,
    started: Instant,
    dropped: AtomicU64,
}

/// Relays between clients on `listen` and `upstream` by `plan` until `stop` is set. Replies
/// go to the client that last sent (one client per relay, as the benchmark uses it).
pub fn relay(
    listen: SocketAddr,
    upstream: SocketAddr,
    plan: DelayPlan,
    stop: &AtomicBool,
) -> io::Result<RelayStats> {
    let client_side = UdpSocket::bind(listen)?;
    let unspecified: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream_side = UdpSocket::bind(unspecified)?;
    upstream_side.connect(upstream)?;
    // How often the readers look at `stop`.
    for socket in [&client_side, &upstream_side] {
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    }
    let shared = Arc::new(Shared {
        queue: Mutex::new((BinaryHeap::new(), plan)),
        ready: Condvar::new(),
        client: Mutex::new(None),
        started: Instant::now(),
        dropped: AtomicU64::new(0),
    });
    std::thread::scope(|scope| {
        let from_clients = {
            let (socket, shared) = (client_side.try_clone()?, shared.clone());
            scope.spawn(move || read_side(&socket, Direction::Out, &shared, stop))
        };
        let from_upstream = {
            let (socket, shared) = (upstream_side.try_clone()?, shared.clone());
            scope.spawn(move || read_side(&socket, Direction::Back, &shared, stop))
        };
        let sent = send_due(&client_side, &upstream_side, &shared, stop);
        for reader in [from_clients, from_upstream] {
            reader
                .join()
                .map_err(|_| io::Error::other("a relay thread panicked"))??;
        }
        let (out, back) = sent?;
        Ok(RelayStats {
            out,
            back,
            dropped: shared.dropped.load(Ordering::Relaxed),
        })
    })
}

fn read_side(
    socket: &UdpSocket,
    direction: Direction,
    shared: &Shared,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let (length, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // A reply to a client that went away (ICMP port unreachable): keep relaying.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        if direction == Direction::Out {
            *shared.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        }
        let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        let (pending, plan) = &mut *queue;
        match plan.next(direction, now - shared.started) {
            Some(delay) => {
                pending.push(Reverse(Pending {
                    due: now + delay,
                    direction,
                    datagram: buffer[..length].to_vec(),
                }));
                shared.ready.notify_one();
            }
            None => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    shared.ready.notify_one();
    Ok(())
}

fn send_due(
    client_side: &UdpSocket,
    upstream_side: &UdpSocket,
    shared: &Shared,
    stop: &AtomicBool,
) -> io::Result<(u64, u64)> {
    let (mut out, mut back) = (0u64, 0u64);
    let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = match queue.0.peek() {
            Some(Reverse(next)) if next.due <= now => None,
            Some(Reverse(next)) => Some(next.due - now),
            None => Some(Duration::from_millis(100)),
        };
        if let Some(wait) = wait {
            queue = shared
                .ready
                .wait_timeout(queue, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let Some(Reverse(due)) = queue.0.pop() else {
            continue;
        };
        drop(queue);
        match due.direction {
            Direction::Out => {
                // A refused send (the upstream is not up yet) is a lost datagram, as on a path.
                if upstream_side.send(&due.datagram).is_ok() {
                    out += 1;
                }
            }
            Direction::Back => {
                let client = *shared.client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(client) = client
                    && client_side.send_to(&due.datagram, client).is_ok()
                {
                    back += 1;
                }
            }
        }
        queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    }
    Ok((out, back))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(scenario: Scenario, seed: u64, n: usize) -> Vec<Option<Duration>> {
        let mut plan = DelayPlan::new(scenario, seed, Duration::from_secs(60));
        (0..n)
            .map(|i| plan.next(Direction::Out, Duration::from_secs(i as u64)))
            .collect()
    }

    #[test]
    fn the_same_seed_gives_every_relay_the_same_delays_whatever_the_other_direction_does() {
        let mut a = DelayPlan::new(Scenario::Jitter, 7, Duration::ZERO);
        let mut b = DelayPlan::new(Scenario::Jitter, 7, Duration::ZERO);
        let mut from_a = Vec::new();
        let mut from_b = Vec::new();
        for i in 0..100 {
            from_a.push(a.next(Direction::Out, Duration::ZERO));
            // b's replies come in between: its requests' delays must not move.
            if i % 3 == 0 {
                b.next(Direction::Back, Duration::ZERO);
            }
            from_b.push(b.next(Direction::Out, Duration::ZERO));
        }
        assert_eq!(from_a, from_b);
        assert_ne!(
            draws(Scenario::Jitter, 7, 50),
            draws(Scenario::Jitter, 8, 50)
        );
    }

    #[test]
    fn each_scenario_keeps_its_delays_within_its_bounds() {
        for delay in draws(Scenario::Symmetric, 1, 1000).into_iter().flatten() {
            assert!((BASE..=BASE + SMALL_JITTER).contains(&delay), "{delay:?}");
        }
        let jitter: Vec<_> = draws(Scenario::Jitter, 1, 10_000)
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(jitter.len(), 10_000);
        assert!(
            jitter
                .iter()
                .all(|d| (BASE + JITTER_FLOOR..=BASE + JITTER_CAP).contains(d))
        );
        // Exponential with a 1 ms mean, floored at 100 µs and capped: the mean is ≈ 2 ms.
        let mean = jitter.iter().map(Duration::as_secs_f64).sum::<f64>() / jitter.len() as f64;
        assert!((1.9e-3..2.2e-3).contains(&mean), "{mean}");
        let mut plan = DelayPlan::new(Scenario::Asymmetric, 1, Duration::ZERO);
        let back = plan
            .next(Direction::Back, Duration::ZERO)
            .unwrap_or_default();
        assert!((ASYMMETRIC_BACK..=ASYMMETRIC_BACK + SMALL_JITTER).contains(&back));
    }

    #[test]
    fn loss_drops_about_one_in_a_hundred_and_only_in_the_loss_scenario() {
        let lost = draws(Scenario::Loss, 3, 20_000)
            .iter()
            .filter(|d| d.is_none())
            .count();
        assert!((140..=260).contains(&lost), "{lost} of 20000");
        assert!(
            draws(Scenario::Jitter, 3, 20_000)
                .iter()
                .all(Option::is_some)
        );
    }

    #[test]
    fn the_route_changes_the_way_back_only_and_only_after_its_time() {
        let mut plan = DelayPlan::new(Scenario::RouteChange, 5, Duration::from_secs(60));
        let before = plan
            .next(Direction::Back, Duration::from_secs(59))
            .unwrap_or_default();
        let after = plan
            .next(Direction::Back, Duration::from_secs(60))
            .unwrap_or_default();
        let out = plan
            .next(Direction::Out, Duration::from_secs(600))
            .unwrap_or_default();
        assert!(before <= BASE + SMALL_JITTER);
        assert!(after >= BASE + ROUTE_CHANGE);
        assert!(out <= BASE + SMALL_JITTER);
    }

    #[test]
    fn scenario_names_round_trip_and_a_typo_lists_the_choices() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.to_string().parse::<Scenario>(), Ok(scenario));
        }
        let error = "jiter".parse::<Scenario>().expect_err("a typo");
        assert!(error.contains("route-change"), "{error}");
    }

    #[test]
    fn a_relay_holds_each_datagram_for_its_planned_delay_each_way() {
        let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
        upstream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let listen = probe.local_addr().expect("addr");
        drop(probe);
        let stop = AtomicBool::new(false);
        let upstream_addr = upstream.local_addr().expect("addr");
        std::thread::scope(|scope| {
            let relayed = scope.spawn(|| {
                relay(
                    listen,
                    upstream_addr,
                    DelayPlan::new(Scenario::Asymmetric, 1, Duration::ZERO),
                    &stop,
                )
            });
            let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
            client
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut buffer = [0u8; 64];
            // The relay binds on its own thread: resend until the upstream hears one.
            let sent_at = (0..50)
                .find_map(|_| {
                    let at = Instant::now();
                    client.send_to(b"ping", listen).ok()?;
                    upstream
                        .set_read_timeout(Some(Duration::from_millis(100)))
                        .ok()?;
                    upstream
                        .recv_from(&mut buffer)
                        .ok()
                        .map(|(_, from)| (at, from))
                })
                .expect("the relay never passed a datagram on");
            let out_took = sent_at.0.elapsed();
            upstream.send_to(b"pong", sent_at.1).expect("send");
            let back_from = Instant::now();
            let (length, _) = client.recv_from(&mut buffer).expect("the reply came back");
            let back_took = back_from.elapsed();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(&buffer[..length], b"pong");
            assert!(out_took >= BASE, "{out_took:?}");
            assert!(back_took >= ASYMMETRIC_BACK, "{back_took:?}");
            let stats = relayed.join().expect("relay thread").expect("relay");
            assert!(stats.out >= 1 && stats.back == 1, "{stats:?}");
        });
    }
}
