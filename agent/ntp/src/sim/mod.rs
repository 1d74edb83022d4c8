//! A deterministic, seeded network simulator and scenario runner.
//!
//! The world has a continuous true timescale τ (UTC before any leap second; after an inserted
//! leap, UTC = τ − 1). Simulated servers answer with this crate's own `server::build_reply`
//! from their (possibly wrong, stepping or leap-announcing) clocks; the network adds a base
//! delay, exponential jitter per leg, asymmetry and loss. A [`SimulatedClock`] is disciplined
//! by a real [`System`]. Everything is event driven (polls, arrivals, timers, trace samples),
//! so a simulated day costs milliseconds.

use crate::clock::{Clock, LeapDirective};
use crate::clock::{ClockAction, Refusal, SimulatedClock, SimulatedClockConfig, apply_action};
use crate::discipline::DriftState;
use crate::packet::{KissCode, LeapIndicator, Packet, ReferenceId};
use crate::select::SelectionRole;
use crate::server::{ServerClockState, build_kod, build_reply};
use crate::source::{SourceConfig, SourceId};
use crate::system::{System, SystemConfig};
use crate::time::{ClockTime, NtpTimestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Network path characteristics (per leg unless noted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkSpec {
    /// Round-trip base delay, seconds (split evenly between the legs).
    pub round_trip: f64,
    /// Mean of the exponential queueing delay added to each leg, seconds.
    pub jitter: f64,
    /// Extra delay on the request leg, seconds (biases the offset by half of it).
    pub asymmetry: f64,
    /// Probability that a request or its reply is lost.
    pub loss: f64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            round_trip: 1e-3,
            jitter: 1e-4,
            asymmetry: 0.0,
            loss: 0.0,
        }
    }
}

/// One simulated upstream server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    /// Constant error of this server's clock (a falseticker when large), seconds.
    pub offset: f64,
    /// (seconds after start, jump) steps of this server's clock.
    pub steps: Vec<(f64, f64)>,
    pub stratum: u8,
    pub root_delay: f64,
    pub root_dispersion: f64,
    /// Whether it announces the world's leap second.
    pub announces_leap: bool,
    /// Answers every request with this kiss code instead of time.
    pub kiss: Option<KissCode>,
    pub network: NetworkSpec,
    /// (seconds after start, path) changes of the network path, in time order: a route
    /// change replaces `network` from that moment on.
    pub network_changes: Vec<(f64, NetworkSpec)>,
}

impl ServerSpec {
    pub fn honest(name: &str, network: NetworkSpec) -> Self {
        Self {
            name: name.to_string(),
            offset: 0.0,
            steps: Vec::new(),
            stratum: 1,
            root_delay: 0.0,
            root_dispersion: 1e-5,
            announces_leap: true,
            kiss: None,
            network,
            network_changes: Vec::new(),
        }
    }

    fn network_at(&self, since_start: f64) -> NetworkSpec {
        self.network_changes
            .iter()
            .rev()
            .find(|(at, _)| since_start >= *at)
            .map_or(self.network, |(_, path)| *path)
    }

    fn offset_at(&self, since_start: f64) -> f64 {
        self.offset
            + self
                .steps
                .iter()
                .filter(|(at, _)| since_start >= *at)
                .map(|(_, jump)| jump)
                .sum::<f64>()
    }
}

/// A leap second in the simulated world.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorldLeap {
    /// The UTC midnight at which the leap happens.
    pub at: ClockTime,
    pub direction: LeapDirective,
    /// Servers with `announces_leap` set LI from this instant until the leap.
    pub announce_from: ClockTime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub start: ClockTime,
    /// Simulated seconds.
    pub duration: f64,
    pub clock: SimulatedClockConfig,
    /// Sources are generated from `servers` using `source_template`.
    pub system: SystemConfig,
    pub source_template: SourceConfig,
    pub servers: Vec<ServerSpec>,
    pub leap: Option<WorldLeap>,
    /// (from, until) seconds after start during which every packet is lost.
    pub outage: Option<(f64, f64)>,
    /// (seconds after start, jump) steps of the local clock made by someone else.
    pub external_steps: Vec<(f64, f64)>,
    pub drift: Option<DriftState>,
    /// Seconds between trace points.
    pub sample_interval: f64,
    pub seed: u64,
}

/// One trace point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TracePoint {
    /// Seconds since start (true time).
    pub t: f64,
    /// Local − UTC, seconds.
    pub error: f64,
    pub synchronized: bool,
    pub root_distance: f64,
    /// Local clock rate error (oscillator + correction), ppm.
    pub rate_ppm: f64,
}

/// Everything a scenario produced.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub points: Vec<TracePoint>,
    /// (seconds since start, offset) of every step the discipline made.
    pub steps: Vec<(f64, f64)>,
    pub refusals: Vec<(f64, Refusal)>,
    /// (seconds since start, size) each time local time went backwards other than by a
    /// kernel leap second or an injected external step.
    pub backward_jumps: Vec<(f64, f64)>,
    pub leaps_applied: u32,
    /// Sources that were ever Selected or Combined.
    pub ever_used: Vec<SourceId>,
    pub source_ids: Vec<SourceId>,
    pub final_state: Option<crate::system::SystemState>,
    /// What the server would answer with at the end.
    pub final_server_state: Option<crate::server::ServerClockState>,
    pub requests_sent: u64,
    pub responses_delivered: u64,
    pub meddling_detected: Vec<(f64, f64)>,
}

impl Trace {
    /// First time after which |error| stays below `bound` until the end.
    pub fn settled_below(&self, bound: f64) -> Option<f64> {
        let last_violation = self.points.iter().rposition(|p| p.error.abs() >= bound);
        match last_violation {
            None => self.points.first().map(|p| p.t),
            Some(i) => self.points.get(i + 1).map(|p| p.t),
        }
    }

    /// First time |error| is below `bound`.
    pub fn first_below(&self, bound: f64) -> Option<f64> {
        self.points
            .iter()
            .find(|p| p.error.abs() < bound)
            .map(|p| p.t)
    }

    pub fn rms_error(&self, from: f64, to: f64) -> f64 {
        let window: Vec<f64> = self
            .points
            .iter()
            .filter(|p| p.t >= from && p.t <= to)
            .map(|p| p.error)
            .collect();
        if window.is_empty() {
            return f64::NAN;
        }
        (window.iter().map(|e| e * e).sum::<f64>() / window.len() as f64).sqrt()
    }

    pub fn max_abs_error(&self, from: f64, to: f64) -> f64 {
        self.points
            .iter()
            .filter(|p| p.t >= from && p.t <= to)
            .map(|p| p.error.abs())
            .fold(0.0, f64::max)
    }
}

struct InFlight {
    arrival: ClockTime,
    source: SourceId,
    bytes: [u8; 48],
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    if mean <= 0.0 {
        return 0.0;
    }
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    -mean * u.ln()
}

fn address_of(index: usize) -> SocketAddr {
    let last = u8::try_from(index % 250).unwrap_or(0) + 1;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), 123)
}

impl Scenario {
    /// A scenario with `servers` honest servers on the default network.
    pub fn new(name: &str, servers: usize) -> Self {
        let network = NetworkSpec::default();
        let mut template = SourceConfig::new("template", address_of(0));
        template.min_poll = 4;
        template.max_poll = 6;
        Self {
            name: name.to_string(),
            start: ClockTime::from_unix_secs(1_750_000_000),
            duration: 3600.0,
            clock: SimulatedClockConfig::default(),
            system: SystemConfig::default(),
            source_template: template,
            servers: (0..servers)
                .map(|i| ServerSpec::honest(&format!("s{i}"), network))
                .collect(),
            leap: None,
            outage: None,
            external_steps: Vec::new(),
            drift: None,
            sample_interval: 1.0,
            seed: 1,
        }
    }

    fn utc_at(&self, true_time: ClockTime) -> ClockTime {
        match self.leap {
            Some(leap) if true_time >= leap.at => match leap.direction {
                LeapDirective::Insert => true_time.add_secs(-1.0),
                LeapDirective::Delete => true_time.add_secs(1.0),
                LeapDirective::None => true_time,
            },
            _ => true_time,
        }
    }

    fn system_config(&self) -> SystemConfig {
        let mut config = self.system.clone();
        config.sources = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, server)| SourceConfig {
                name: server.name.clone(),
                address: address_of(i),
                ..self.source_template.clone()
            })
            .collect();
        config
    }

    /// The server's reply to `request` arriving at true time `at`, or `None` if dropped.
    fn serve(&self, server: &ServerSpec, request: &[u8; 48], at: ClockTime) -> Option<[u8; 48]> {
        let view = Packet::parse(request).ok()?;
        let since_start = at.secs_since(self.start);
        let server_time = self.utc_at(at).add_secs(server.offset_at(since_start));
        let transmit_time = server_time.add_secs(1e-5);
        let mut out = [0u8; 48];
        if let Some(code) = server.kiss {
            build_kod(&view, code, &mut out)?;
            return Some(out);
        }
        let announcing = self.leap.filter(|leap| {
            server.announces_leap && at >= leap.announce_from && self.utc_at(at) < leap.at
        });
        let leap = match announcing.map(|l| l.direction) {
            Some(LeapDirective::Insert) => LeapIndicator::Insert,
            Some(LeapDirective::Delete) => LeapIndicator::Delete,
            _ => LeapIndicator::NoWarning,
        };
        let state = ServerClockState {
            synchronized: true,
            leap,
            stratum: server.stratum,
            precision: -20,
            root_delay: server.root_delay,
            root_dispersion: server.root_dispersion,
            reference_id: ReferenceId(*b"GPS\0"),
            reference_time: NtpTimestamp::from_clock_time(server_time),
            updated_at: server_time,
        };
        build_reply(&view, server_time, transmit_time, &state, None, &mut out)?;
        Some(out)
    }

    fn in_outage(&self, at: ClockTime) -> bool {
        let t = at.secs_since(self.start);
        self.outage
            .is_some_and(|(from, until)| t >= from && t < until)
    }

    /// Runs the scenario to completion.
    pub fn run(&self) -> Trace {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut clock = SimulatedClock::new(self.start, self.clock);
        let mut trace = Trace::default();
        let mut seed = [0u8; 32];
        rng.fill(&mut seed);
        let Ok(mut system) = System::new(self.system_config(), clock.now(), seed) else {
            return trace;
        };
        trace.source_ids = system.sources().iter().map(|s| s.id()).collect();
        let apply = |clock: &mut SimulatedClock, actions: &[ClockAction], trace: &mut Trace| {
            for action in actions {
                match action {
                    ClockAction::Step { offset } => {
                        trace
                            .steps
                            .push((clock.true_time().secs_since(self.start), *offset));
                    }
                    ClockAction::Refuse(refusal) => {
                        trace
                            .refusals
                            .push((clock.true_time().secs_since(self.start), *refusal));
                    }
                    _ => {}
                }
                // The simulated clock accepts every action.
                let _ = apply_action(clock, action);
            }
        };
        if let Some(drift) = self.drift
            && let Ok(actions) = system.import_drift(drift, clock.now())
        {
            apply(&mut clock, &actions, &mut trace);
        }
        system.observe_clock(clock.now(), clock.monotonic());

        let end = self.start.add_secs(self.duration);
        let mut in_flight: BinaryHeap<Reverse<(ClockTime, usize)>> = BinaryHeap::new();
        let mut packets: Vec<Option<InFlight>> = Vec::new();
        let mut next_sample = self.start;
        let mut external_steps = self.external_steps.clone();
        external_steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut external_steps = external_steps.into_iter().peekable();
        let mut last_local = clock.now();
        let mut last_leaps = 0;
        let mut used = vec![false; trace.source_ids.len()];

        while clock.true_time() < end {
            let now_local = clock.now();
            let deadline_local = system.next_deadline(now_local);
            let until_deadline = deadline_local.secs_since(now_local).max(0.0);
            let deadline_true = clock.true_time().add_secs(until_deadline);
            let mut next = deadline_true.min(next_sample).min(end);
            if let Some(Reverse((arrival, _))) = in_flight.peek() {
                next = next.min(*arrival);
            }
            if let Some((at, _)) = external_steps.peek() {
                next = next.min(self.start.add_secs(*at));
            }
            let next = next.max(clock.true_time());
            clock.advance_to(next);

            if clock.stats.leaps_applied != last_leaps {
                last_leaps = clock.stats.leaps_applied;
                last_local = clock.now();
            }
            if let Some((at, jump)) = external_steps.peek().copied()
                && clock.true_time() >= self.start.add_secs(at)
            {
                external_steps.next();
                clock.external_step(jump);
                last_local = clock.now();
            }
            if let Some(jump) = system.observe_clock(clock.now(), clock.monotonic()) {
                trace
                    .meddling_detected
                    .push((clock.true_time().secs_since(self.start), jump));
            }

            while let Some(Reverse((arrival, index))) = in_flight.peek().copied() {
                if arrival > clock.true_time() {
                    break;
                }
                in_flight.pop();
                let Some(packet) = packets.get_mut(index).and_then(Option::take) else {
                    continue;
                };
                debug_assert_eq!(packet.arrival, arrival);
                let now = clock.now();
                let outcome = system.handle_response(packet.source, &packet.bytes, now, now);
                trace.responses_delivered += 1;
                apply(&mut clock, &outcome.actions, &mut trace);
                for (id, role) in system.roles() {
                    if matches!(role, SelectionRole::Selected | SelectionRole::Combined)
                        && let Some(i) = trace.source_ids.iter().position(|s| s == id)
                    {
                        used[i] = true;
                    }
                }
            }

            let now = clock.now();
            if now >= deadline_local || clock.true_time() >= deadline_true {
                let actions = system.on_timer(now);
                apply(&mut clock, &actions, &mut trace);
                while let Some(request) = system.poll_due(clock.now()) {
                    trace.requests_sent += 1;
                    let index = system
                        .sources()
                        .iter()
                        .position(|s| s.id() == request.source)
                        .unwrap_or(0);
                    let Some(server) = self.servers.get(index) else {
                        continue;
                    };
                    let sent = clock.true_time();
                    let net = server.network_at(sent.secs_since(self.start));
                    let up =
                        net.round_trip / 2.0 + net.asymmetry + exponential(&mut rng, net.jitter);
                    let down = net.round_trip / 2.0 + exponential(&mut rng, net.jitter);
                    let lost = rng.random::<f64>() < net.loss || self.in_outage(sent);
                    let at_server = sent.add_secs(up);
                    if lost {
                        continue;
                    }
                    if let Some(reply) = self.serve(server, &request.bytes, at_server) {
                        let arrival = at_server.add_secs(1e-5 + down);
                        packets.push(Some(InFlight {
                            arrival,
                            source: request.source,
                            bytes: reply,
                        }));
                        in_flight.push(Reverse((arrival, packets.len() - 1)));
                    }
                }
            }

            let local = clock.now();
            if local < last_local {
                trace.backward_jumps.push((
                    clock.true_time().secs_since(self.start),
                    local.secs_since(last_local),
                ));
            }
            last_local = local;

            if clock.true_time() >= next_sample {
                let state_now = clock.now();
                let utc = self.utc_at(clock.true_time());
                let root_distance = system.root_distance(state_now).unwrap_or(f64::INFINITY);
                trace.points.push(TracePoint {
                    t: clock.true_time().secs_since(self.start),
                    error: clock.now().secs_since(utc),
                    synchronized: system.synchronized(state_now),
                    root_distance,
                    rate_ppm: clock.effective_rate_ppm(),
                });
                next_sample = next_sample.add_secs(self.sample_interval);
            }
        }
        trace.leaps_applied = clock.stats.leaps_applied;
        trace.ever_used = trace
            .source_ids
            .iter()
            .zip(&used)
            .filter(|(_, u)| **u)
            .map(|(id, _)| *id)
            .collect();
        trace.final_state = Some(system.state(clock.now()));
        trace.final_server_state = Some(system.server_state(clock.now()));
        trace
    }
}

pub mod scenarios;
