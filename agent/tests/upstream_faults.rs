//! Issue 15, "agent survives faults", on simulated time: the run loop's handlers
//! ([`Driver`]) driven by a simulated clock, simulated DNS (answers that change over time,
//! failures, slow lookups) and simulated NTP servers (honest, false, kissing). Nothing here
//! touches a socket, a resolver or this machine's clock.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use stratum_agent::driver::{Driver, DriverEvent, Fault, Now, REJECT_FOR};
use stratum_agent::resolver::{LookupRequest, Resolution, ResolveError};
use stratum_api::agent_config::{AgentConfig, UpstreamConfig, UpstreamKind};
use stratum_ntp::clock::{Clock, SimulatedClock, SimulatedClockConfig, apply_action};
use stratum_ntp::packet::{KissCode, LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::{ServerClockState, build_kod, build_reply};
use stratum_ntp::source::SourceId;
use stratum_ntp::system::SourceState;
use stratum_ntp::time::{ClockTime, NtpTimestamp};

/// Round trip to every simulated server.
const ROUND_TRIP: f64 = 0.002;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn addr(last: u8) -> SocketAddr {
    SocketAddr::new(ip(last), 123)
}

/// A simulated server: a clock `offset` from true time, and optionally a kiss code it sends
/// instead of time between two instants (seconds after start), with the poll it asks for.
#[derive(Clone, Debug, Default)]
struct SimServer {
    offset: f64,
    kiss: Option<(KissCode, f64, f64, i8)>,
    /// Answers nothing from this instant (seconds after start) on.
    gone_from: Option<f64>,
}

impl SimServer {
    fn honest() -> Self {
        Self::default()
    }
    fn off_by(offset: f64) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }
    fn kissing(code: KissCode, from: f64, until: f64, poll: i8) -> Self {
        Self {
            kiss: Some((code, from, until, poll)),
            ..Self::default()
        }
    }
    fn gone_from(at: f64) -> Self {
        Self {
            gone_from: Some(at),
            ..Self::default()
        }
    }
}

/// A name's answers over time: from each instant (seconds after start) on, the addresses
/// or a failure; and how long a lookup takes.
#[derive(Clone, Debug, Default)]
struct SimName {
    answers: Vec<(f64, Option<Vec<IpAddr>>)>,
    latency: f64,
}

struct World {
    start: ClockTime,
    clock: SimulatedClock,
    driver: Driver,
    dns: BTreeMap<String, SimName>,
    servers: BTreeMap<IpAddr, SimServer>,
    /// (true arrival, source, reply)
    arrivals: Vec<(ClockTime, SourceId, [u8; 48])>,
    /// (true completion, request)
    lookups: Vec<(ClockTime, LookupRequest)>,
    /// (seconds, address, poll exponent when sent)
    sent: Vec<(f64, SocketAddr, i8)>,
    /// (seconds, key, succeeded)
    resolved: Vec<(f64, String, bool)>,
    events: Vec<(f64, DriverEvent)>,
    first_sync: Option<f64>,
}

fn upstream(host: &str, kind: UpstreamKind, max_sources: u8) -> UpstreamConfig {
    UpstreamConfig {
        host: host.into(),
        kind,
        port: 123,
        iburst: true,
        min_poll: 4,
        max_poll: 6,
        max_sources,
        nts: false,
        nts_port: None,
        key: None,
    }
}

fn config(upstreams: Vec<UpstreamConfig>, min_sources: u8) -> AgentConfig {
    let mut config = AgentConfig::from_json(include_str!("data/agent-config.json")).unwrap();
    config.upstreams = upstreams;
    config.selection.min_sources = min_sources;
    config
}

impl World {
    fn new(
        config: AgentConfig,
        dns: BTreeMap<String, SimName>,
        servers: BTreeMap<IpAddr, SimServer>,
    ) -> Self {
        let start = ClockTime::from_unix_secs(1_750_000_000);
        let clock = SimulatedClock::new(
            start,
            SimulatedClockConfig {
                initial_offset: 0.05,
                frequency_error_ppm: 10.0,
                wander_ppm_per_sqrt_s: 0.0,
                seed: 3,
            },
        );
        let driver = Driver::new("node-a", config, Now::read(&clock), [7; 32]).unwrap();
        Self {
            start,
            clock,
            driver,
            dns,
            servers,
            arrivals: Vec::new(),
            lookups: Vec::new(),
            sent: Vec::new(),
            resolved: Vec::new(),
            events: Vec::new(),
            first_sync: None,
        }
    }

    fn t(&self) -> f64 {
        self.clock.true_time().secs_since(self.start)
    }

    fn answer(&self, request: &LookupRequest) -> Result<Vec<SocketAddr>, ResolveError> {
        let t = self.t();
        let answer = self.dns.get(&request.host).and_then(|name| {
            name.answers
                .iter()
                .rev()
                .find(|(from, _)| *from <= t)
                .and_then(|(_, a)| a.clone())
        });
        match answer {
            Some(ips) => Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, request.port))
                .collect()),
            None => Err(ResolveError::Lookup {
                host: request.host.clone(),
                source: std::io::Error::other("simulated SERVFAIL"),
            }),
        }
    }

    fn serve(&self, address: SocketAddr, request: &[u8; 48]) -> Option<[u8; 48]> {
        let server = self.servers.get(&address.ip())?;
        let view = Packet::parse(request).ok()?;
        let t = self.t();
        if server.gone_from.is_some_and(|from| t >= from) {
            return None;
        }
        let mut out = [0u8; 48];
        if let Some((code, from, until, poll)) = server.kiss
            && t >= from
            && t < until
        {
            // As our own server kisses (and as RFC 5905 allows): no usable time.
            build_kod(&view, code, &mut out)?;
            out[2] = poll.to_be_bytes()[0];
            return Some(out);
        }
        let server_time = self
            .clock
            .true_time()
            .add_secs(ROUND_TRIP / 2.0 + server.offset);
        let transmit = server_time.add_secs(1e-5);
        let state = ServerClockState {
            synchronized: true,
            leap: LeapIndicator::NoWarning,
            stratum: 1,
            precision: -20,
            root_delay: 0.0,
            root_dispersion: 1e-5,
            reference_id: ReferenceId(*b"GPS\0"),
            reference_time: NtpTimestamp::from_clock_time(server_time),
            updated_at: server_time,
        };
        build_reply(&view, server_time, transmit, &state, None, &mut out)?;
        Some(out)
    }

    fn apply(&mut self, actions: &[stratum_ntp::clock::ClockAction]) {
        for action in actions {
            apply_action(&mut self.clock, action).unwrap();
        }
    }

    /// Runs the loop's turn structure until `until` seconds after start.
    fn run_until(&mut self, until: f64) {
        let end = self.start.add_secs(until);
        loop {
            let now = Now::read(&self.clock);
            let true_now = self.clock.true_time();
            for request in self.driver.lookups_due(now) {
                let latency = self.dns.get(&request.host).map_or(0.0, |n| n.latency);
                self.lookups.push((true_now.add_secs(latency), request));
            }
            while let Some(request) = self.driver.poll_due(self.clock.now()) {
                let poll = self
                    .driver
                    .system()
                    .source(request.source)
                    .map_or(0, |s| s.poll_exponent());
                self.sent.push((self.t(), request.address, poll));
                if let Some(reply) = self.serve(request.address, &request.bytes) {
                    self.arrivals
                        .push((true_now.add_secs(ROUND_TRIP), request.source, reply));
                }
            }
            let wake = self.driver.next_wake(now);
            let mut next = true_now.add_secs(wake.max(1e-4));
            for (at, ..) in &self.arrivals {
                next = next.min(*at);
            }
            for (at, _) in &self.lookups {
                next = next.min(*at);
            }
            if next > end {
                break;
            }
            self.clock.advance_to(next.max(true_now));

            let mut due: Vec<_> = Vec::new();
            self.arrivals.retain(|a| {
                let keep = a.0 > next;
                if !keep {
                    due.push(*a);
                }
                keep
            });
            for (_, source, reply) in due {
                let now = Now::read(&self.clock);
                let outcome = self.driver.on_reply(source, &reply, now.clock, now);
                self.apply(&outcome.actions);
            }
            let mut finished = Vec::new();
            self.lookups.retain(|l| {
                let keep = l.0 > next;
                if !keep {
                    finished.push(l.1.clone());
                }
                keep
            });
            for request in finished {
                let result = self.answer(&request);
                self.resolved
                    .push((self.t(), request.key.clone(), result.is_ok()));
                let events = self.driver.on_resolution(
                    Resolution {
                        key: request.key,
                        result,
                    },
                    Now::read(&self.clock),
                );
                let t = self.t();
                self.events.extend(events.into_iter().map(|e| (t, e)));
            }
            let now = Now::read(&self.clock);
            let actions = self.driver.on_timer(now);
            self.apply(&actions);
            let events = self.driver.housekeeping(Now::read(&self.clock));
            let t = self.t();
            self.events.extend(events.into_iter().map(|e| (t, e)));
            if self.first_sync.is_none() && self.driver.system().synchronized(self.clock.now()) {
                self.first_sync = Some(t);
            }
        }
    }

    fn members(&self, key: &str) -> Vec<SocketAddr> {
        self.driver.members().get(key).cloned().unwrap_or_default()
    }

    fn usable(&self, address: SocketAddr) -> bool {
        let state = self.driver.system().state(self.clock.now());
        state.sources.iter().any(|s| {
            s.address == address
                && matches!(
                    s.state,
                    SourceState::Selected | SourceState::Combined | SourceState::Candidate
                )
        })
    }
}

fn name(answers: Vec<(f64, Option<Vec<IpAddr>>)>, latency: f64) -> SimName {
    SimName { answers, latency }
}

#[test]
fn a_name_that_fails_for_a_minute_then_resolves_is_synced_to_within_one_poll() {
    let dns = BTreeMap::from([(
        "time.example".to_string(),
        name(vec![(0.0, None), (60.0, Some(vec![ip(1)]))], 0.05),
    )]);
    let servers = BTreeMap::from([(ip(1), SimServer::honest())]);
    let mut world = World::new(
        config(vec![upstream("time.example", UpstreamKind::Server, 1)], 1),
        dns,
        servers,
    );
    world.run_until(600.0);
    let attempts: Vec<f64> = world.resolved.iter().map(|r| r.0).collect();
    let first_ok = world
        .resolved
        .iter()
        .find(|r| r.2)
        .map(|r| r.0)
        .expect("the name resolved once DNS answered");
    let synced = world.first_sync.expect("the agent synchronized");
    println!(
        "lookups at {attempts:.1?}; resolved at {first_ok:.1} s, synchronized at {synced:.1} s \
         ({:.1} s after DNS recovered, {:.1} s after the answer)",
        synced - 60.0,
        synced - first_ok
    );
    // Backoff doubles from 2 s, so it is never more than one doubling behind the outage.
    assert!(attempts.len() >= 5, "retried, not dropped: {attempts:?}");
    assert!((60.0..=60.0 + 64.0 * 1.2).contains(&first_ok), "{first_ok}");
    // One poll at minPoll 2^4 s.
    assert!(
        synced - first_ok <= 16.0,
        "synced {synced} after resolving at {first_ok}"
    );
}

#[test]
fn a_thirty_second_lookup_does_not_delay_the_polls_of_other_sources() {
    let dns = BTreeMap::from([(
        "slow.example".to_string(),
        name(vec![(0.0, Some(vec![ip(2)]))], 30.0),
    )]);
    let servers = BTreeMap::from([(ip(1), SimServer::honest()), (ip(2), SimServer::honest())]);
    let mut world = World::new(
        config(
            vec![
                upstream("192.0.2.1", UpstreamKind::Server, 1),
                upstream("slow.example", UpstreamKind::Server, 1),
            ],
            1,
        ),
        dns,
        servers,
    );
    world.run_until(120.0);
    let fast: Vec<f64> = world
        .sent
        .iter()
        .filter(|s| s.1 == addr(1))
        .map(|s| s.0)
        .collect();
    let slow_first = world.sent.iter().find(|s| s.1 == addr(2)).map(|s| s.0);
    println!("polls of the literal: {fast:.2?}; first poll of slow.example at {slow_first:?}");
    // The burst of eight, 0.5 s apart (minPoll 2^4: a LAN-class source), then one poll
    // 16 s later, all on time while the lookup was outstanding.
    let in_lookup: Vec<f64> = fast.iter().copied().filter(|t| *t < 30.0).collect();
    assert_eq!(in_lookup.len(), 9, "{fast:?}");
    for (i, t) in in_lookup.iter().take(8).enumerate() {
        assert!((t - 0.5 * i as f64).abs() < 0.01, "poll {i} at {t}");
    }
    assert!(
        (in_lookup[8] - in_lookup[7] - 16.0).abs() < 0.05,
        "{in_lookup:?}"
    );
    let slow_first = slow_first.expect("the slow name was polled once resolved");
    assert!((30.0..31.0).contains(&slow_first), "{slow_first}");
    assert!(world.first_sync.is_some_and(|t| t < 30.0));
}

fn pool_world(bad: SimServer) -> (World, Vec<SocketAddr>) {
    // The pool answers six addresses; the first four taken hold two bad ones.
    let order = [1, 11, 2, 12, 3, 4];
    let dns = BTreeMap::from([(
        "pool.example".to_string(),
        name(
            vec![(0.0, Some(order.iter().map(|l| ip(*l)).collect()))],
            0.05,
        ),
    )]);
    let mut servers = BTreeMap::new();
    for last in [1, 2, 3, 4] {
        servers.insert(ip(last), SimServer::honest());
    }
    servers.insert(ip(11), bad.clone());
    let mut second = bad;
    second.offset = if second.offset != 0.0 { -0.05 } else { 0.0 };
    servers.insert(ip(12), second);
    let world = World::new(
        config(vec![upstream("pool.example", UpstreamKind::Pool, 4)], 3),
        dns,
        servers,
    );
    (world, vec![addr(1), addr(2), addr(3), addr(4)])
}

fn sorted(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    v.sort();
    v
}

#[test]
fn a_pool_with_two_falsetickers_of_four_ends_with_four_good_members() {
    let (mut world, good) = pool_world(SimServer::off_by(3600.0));
    world.run_until(30.0);
    assert_eq!(
        sorted(world.members("pool.example:123")),
        vec![addr(1), addr(2), addr(11), addr(12)]
    );
    world.run_until(1800.0);
    let members = sorted(world.members("pool.example:123"));
    let drops: Vec<_> = world
        .events
        .iter()
        .filter_map(|(t, e)| match e {
            DriverEvent::Dropped {
                address,
                fault,
                replacement,
                ..
            } => Some((*t, *address, *fault, *replacement)),
            _ => None,
        })
        .collect();
    println!("drops: {drops:?}; first sync {:?}", world.first_sync);
    assert_eq!(members, good, "{drops:?}");
    assert!(good.iter().all(|a| world.usable(*a)), "all four agree");
    assert!(world.driver.system().synchronized(world.clock.now()));
    // No majority among 2 + 2: the farthest out went first, then the remaining falseticker.
    assert_eq!(drops.len(), 2);
    assert_eq!((drops[0].1, drops[0].2), (addr(11), Fault::Outlier));
    assert_eq!((drops[1].1, drops[1].2), (addr(12), Fault::Falseticker));
}

#[test]
fn a_pool_whose_members_deny_replaces_them_and_does_not_take_them_back() {
    let (mut world, good) = pool_world(SimServer::kissing(KissCode::Deny, 0.0, f64::MAX, 4));
    world.run_until(120.0);
    assert_eq!(sorted(world.members("pool.example:123")), good);
    let denied: Vec<SocketAddr> = world
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            DriverEvent::Dropped {
                address,
                fault: Fault::Denied(KissCode::Deny),
                ..
            } => Some(*address),
            _ => None,
        })
        .collect();
    assert_eq!(sorted(denied), vec![addr(11), addr(12)]);
    // Denied addresses were asked once each, never again.
    let asked = |w: &World, a: SocketAddr| w.sent.iter().filter(|s| s.1 == a).count();
    assert_eq!((asked(&world, addr(11)), asked(&world, addr(12))), (1, 1));
    assert!(world.driver.system().synchronized(world.clock.now()));
    // Still remembered as denied half an hour later.
    world.run_until(REJECT_FOR / 2.0);
    assert_eq!(sorted(world.members("pool.example:123")), good);
    assert_eq!((asked(&world, addr(11)), asked(&world, addr(12))), (1, 1));
}

#[test]
fn kod_rate_never_pushes_the_poll_past_max_poll_and_it_recovers() {
    let dns = BTreeMap::new();
    // Kisses from 300 s to 900 s asking for 2^17 s.
    let servers = BTreeMap::from([(ip(1), SimServer::kissing(KissCode::Rate, 300.0, 900.0, 17))]);
    let mut up = upstream("192.0.2.1", UpstreamKind::Server, 1);
    up.max_poll = 8;
    let mut world = World::new(config(vec![up], 1), dns, servers);
    world.run_until(4000.0);
    let polls: Vec<(f64, i8)> = world.sent.iter().map(|s| (s.0.round(), s.2)).collect();
    println!("polls (s, exponent): {polls:?}");
    assert!(polls.iter().all(|(_, p)| *p <= 8), "{polls:?}");
    let before = polls
        .iter()
        .rfind(|(t, _)| *t < 300.0)
        .map(|p| p.1)
        .unwrap();
    assert!(
        polls
            .iter()
            .any(|(t, p)| (300.0..900.0).contains(t) && *p == 8),
        "backed off to maxPoll while kissed"
    );
    // After the kisses end the interval steps back down to where it was, one step per
    // normal reply.
    let after: Vec<i8> = polls
        .iter()
        .filter(|(t, _)| *t >= 900.0)
        .map(|p| p.1)
        .collect();
    assert_eq!(
        after.get(..3),
        Some(&[8, 7, before][..]),
        "before {before}, after {after:?}"
    );
    assert!(world.driver.system().synchronized(world.clock.now()));
}

#[test]
fn a_denied_server_is_asked_again_only_after_the_long_backoff() {
    // Denies for the first 20 minutes, then serves.
    let servers = BTreeMap::from([(ip(1), SimServer::kissing(KissCode::Deny, 0.0, 1200.0, 4))]);
    let mut world = World::new(
        config(vec![upstream("192.0.2.1", UpstreamKind::Server, 1)], 1),
        BTreeMap::new(),
        servers,
    );
    world.run_until(REJECT_FOR + 60.0);
    let asked: Vec<f64> = world.sent.iter().map(|s| s.0).collect();
    assert_eq!(asked.first().copied(), Some(0.0));
    let again = asked.get(1).copied().expect("asked again");
    println!("denied at 0 s, asked again at {again:.1} s");
    assert!((REJECT_FOR..REJECT_FOR + 1.0).contains(&again), "{asked:?}");
    assert!(world.driver.system().synchronized(world.clock.now()));
}

#[test]
fn a_pool_member_that_never_answers_is_replaced_after_eight_polls() {
    // 192.0.2.13 has no server behind it.
    let dns = BTreeMap::from([(
        "pool.example".to_string(),
        name(vec![(0.0, Some(vec![ip(1), ip(13), ip(2), ip(3)]))], 0.05),
    )]);
    let servers = BTreeMap::from([
        (ip(1), SimServer::honest()),
        (ip(2), SimServer::honest()),
        (ip(3), SimServer::honest()),
    ]);
    let mut world = World::new(
        config(vec![upstream("pool.example", UpstreamKind::Pool, 3)], 2),
        dns,
        servers,
    );
    world.run_until(120.0);
    let dropped: Vec<_> = world
        .events
        .iter()
        .filter_map(|(t, e)| match e {
            DriverEvent::Dropped {
                address,
                fault,
                replacement,
                ..
            } => Some((*t, *address, *fault, *replacement)),
            _ => None,
        })
        .collect();
    println!("dropped: {dropped:?}");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(
        (dropped[0].1, dropped[0].2, dropped[0].3),
        (addr(13), Fault::Unreachable, Some(addr(3)))
    );
    let silent_polls = world.sent.iter().filter(|s| s.1 == addr(13)).count();
    assert_eq!(silent_polls, 9, "the eighth unanswered poll is the last");
    assert_eq!(
        sorted(world.members("pool.example:123")),
        vec![addr(1), addr(2), addr(3)]
    );
}

#[test]
fn outside_the_egress_tier_the_upstreams_are_polled_once_no_egress_agent_answered_for_the_grace() {
    let mut config = config(vec![upstream("192.0.2.1", UpstreamKind::Server, 1)], 1);
    config.egress = Some(stratum_api::agent_config::EgressConfig {
        nodes: vec!["edge".into()],
        // No server behind the egress agent's address.
        tier_upstreams: vec![upstream("192.0.2.50", UpstreamKind::Server, 1)],
        fallback_to_upstreams: true,
    });
    let servers = BTreeMap::from([(ip(1), SimServer::honest())]);
    let mut world = World::new(config, BTreeMap::new(), servers);
    world.run_until(120.0);
    let fallback_at = world
        .events
        .iter()
        .find(|(_, e)| *e == DriverEvent::Fallback(true))
        .map(|(t, _)| *t)
        .expect("fell back");
    let first_upstream_poll = world.sent.iter().find(|s| s.1 == addr(1)).map(|s| s.0);
    println!("fell back at {fallback_at:.1} s; upstream first polled at {first_upstream_poll:?}");
    assert!((30.0..31.0).contains(&fallback_at), "{fallback_at}");
    assert_eq!(first_upstream_poll, Some(fallback_at));
    assert!(
        world
            .sent
            .iter()
            .any(|s| s.1 == addr(50) && s.0 > fallback_at),
        "the tier is still polled"
    );
    assert!(world.driver.system().synchronized(world.clock.now()));
}

#[test]
fn a_server_whose_name_moved_is_followed_once_the_old_address_stops_answering() {
    // time.example moves from .1 to .2 at 100 s; .1 goes silent then.
    let dns = BTreeMap::from([(
        "time.example".to_string(),
        name(
            vec![(0.0, Some(vec![ip(1)])), (100.0, Some(vec![ip(2)]))],
            0.05,
        ),
    )]);
    let servers = BTreeMap::from([
        (ip(1), SimServer::gone_from(100.0)),
        (ip(2), SimServer::honest()),
    ]);
    let mut world = World::new(
        config(vec![upstream("time.example", UpstreamKind::Server, 1)], 1),
        dns,
        servers,
    );
    world.run_until(900.0);
    let moved = world
        .events
        .iter()
        .find_map(|(t, e)| match e {
            DriverEvent::Dropped {
                address,
                fault: Fault::Unreachable,
                replacement: Some(r),
                ..
            } if *address == addr(1) && *r == addr(2) => Some(*t),
            _ => None,
        })
        .expect("followed the name");
    println!("moved to the new address at {moved:.1} s");
    assert_eq!(world.members("time.example:123"), vec![addr(2)]);
    assert!(world.usable(addr(2)));
}
