//! The per-upstream association: poll scheduling (adaptive interval, iburst), the 8-bit
//! reachability register, the request it sends (random transmit timestamp as an anti-spoof
//! cookie) and validation of the response into a [`Measurement`] (RFC 5905 §8 tests, KoD).

use crate::filter::{ClockFilter, FilterSample, FilterVerdict, SourceEstimate};
use crate::packet::{HEADER_LEN, KissCode, LeapIndicator, Mode, Packet, ReferenceId};
use crate::time::{ClockTime, NtpTimestamp, PHI};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Largest poll exponent accepted in configuration (RFC 5905 MAXPOLL). KoD RATE never pushes
/// a source beyond its own configured `max_poll`: a kiss from a pool member or an on-path
/// attacker must not silence a source for a day and a half.
pub const MAX_POLL_LIMIT: i8 = 17;
/// Smallest poll exponent accepted in configuration (2 s; for own LAN servers).
pub const MIN_POLL_LIMIT: i8 = 1;
/// Accepted samples at one poll interval before trying the next longer one.
const POLL_INCREASE_AFTER: u32 = 4;
/// A sample predicted within this many jitters counts towards a longer poll.
const POLL_INCREASE_RATIO: f64 = 1.0;
/// A sample missing its prediction by more than this many jitters shortens the poll.
const POLL_DECREASE_RATIO: f64 = 2.5;

/// Stable identity of a source inside one `System`, kept across reconfiguration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SourceId(pub u32);

/// One upstream server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceConfig {
    /// Display name (host name as configured, or the address).
    pub name: String,
    /// Resolved address to send requests to (the agent resolves and re-resolves names).
    pub address: SocketAddr,
    #[serde(default = "default_true")]
    pub iburst: bool,
    /// Packets per burst at start and while unreachable.
    #[serde(default = "default_burst_count")]
    pub burst_count: u8,
    /// Seconds between burst packets (shorter for LAN sources).
    #[serde(default = "default_burst_interval")]
    pub burst_interval: f64,
    /// log2 seconds.
    #[serde(default = "default_min_poll")]
    pub min_poll: i8,
    /// log2 seconds.
    #[serde(default = "default_max_poll")]
    pub max_poll: i8,
}

fn default_true() -> bool {
    true
}
fn default_burst_count() -> u8 {
    8
}
fn default_burst_interval() -> f64 {
    2.0
}
fn default_min_poll() -> i8 {
    6
}
fn default_max_poll() -> i8 {
    10
}

impl SourceConfig {
    /// A source with the defaults (iburst, 8 packets 2 s apart, poll 2^6–2^10 s).
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        Self {
            name: name.into(),
            address,
            iburst: true,
            burst_count: default_burst_count(),
            burst_interval: default_burst_interval(),
            min_poll: default_min_poll(),
            max_poll: default_max_poll(),
        }
    }
}

/// A request to send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollRequest {
    pub source: SourceId,
    pub address: SocketAddr,
    pub bytes: [u8; HEADER_LEN],
}

/// Why a response was not turned into a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IgnoreReason {
    Malformed,
    NotServerMode,
    /// Same transmit timestamp as the last accepted response.
    Duplicate,
    /// No request outstanding, or origin ≠ our last transmit (spoofed or stale).
    BogusOrigin,
    /// LI = 3 or stratum ≥ 16.
    ServerUnsynchronized,
    /// Zero transmit/receive timestamps or inconsistent on-wire times.
    BogusTimestamps,
    /// The server's own root distance exceeds the limit.
    RootDistanceTooLarge,
    /// KoD with a code we do not act on.
    UnknownKiss,
    Demobilized,
}

/// Outcome of handling a response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SourceEvent {
    Measurement(Measurement),
    Ignored(IgnoreReason),
    /// KoD RATE: polling slowed to `poll` (log2 s).
    RateLimited {
        poll: i8,
    },
    /// KoD DENY/RSTR: the association is stopped until reconfigured.
    Demobilized(KissCode),
}

/// A validated on-wire measurement (RFC 5905 §8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// θ = ((T2−T1)+(T3−T4))/2, seconds.
    pub offset: f64,
    /// δ = (T4−T1)−(T3−T2), seconds, clamped to ≥ 0.
    pub delay: f64,
    /// ε = server precision + our precision + PHI·(T4−T1), seconds.
    pub dispersion: f64,
    /// T4 on the local clock.
    pub received_at: ClockTime,
    pub leap: LeapIndicator,
    pub stratum: u8,
    pub reference_id: ReferenceId,
    pub root_delay: f64,
    pub root_dispersion: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    transmit: NtpTimestamp,
    sent_at: ClockTime,
}

/// Per-upstream state machine.
#[derive(Debug, Clone)]
pub struct Source {
    id: SourceId,
    config: SourceConfig,
    reach: u8,
    poll: i8,
    /// Raised by KoD RATE; never below the configured minimum nor above the maximum.
    min_poll: i8,
    /// The poll exponent before a run of KoD RATE, returned to step by step once the server
    /// answers normally again.
    rate_limited_from: Option<i8>,
    next_poll: ClockTime,
    outstanding: Option<Outstanding>,
    burst_remaining: u8,
    good_streak: u32,
    unanswered: u32,
    last_server_transmit: Option<NtpTimestamp>,
    demobilized: Option<KissCode>,
    filter: ClockFilter,
    last_measurement: Option<Measurement>,
}

impl Source {
    /// A new association whose first poll (or burst) is due at `now`.
    pub fn new(id: SourceId, config: SourceConfig, now: ClockTime) -> Self {
        let min_poll = config.min_poll;
        let burst = if config.iburst { config.burst_count } else { 0 };
        Self {
            id,
            config,
            reach: 0,
            poll: min_poll,
            min_poll,
            rate_limited_from: None,
            next_poll: now,
            outstanding: None,
            burst_remaining: burst,
            good_streak: 0,
            unanswered: 0,
            last_server_transmit: None,
            demobilized: None,
            filter: ClockFilter::new(),
            last_measurement: None,
        }
    }

    pub fn id(&self) -> SourceId {
        self.id
    }

    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    pub fn reach(&self) -> u8 {
        self.reach
    }

    pub fn is_reachable(&self) -> bool {
        self.reach != 0
    }

    pub fn poll_exponent(&self) -> i8 {
        self.poll
    }

    /// Seconds between this source's polls at the moment (burst or regular).
    pub fn current_interval(&self) -> f64 {
        if self.burst_remaining > 0 {
            self.config.burst_interval
        } else {
            poll_secs(self.poll)
        }
    }

    pub fn unanswered(&self) -> u32 {
        self.unanswered
    }

    pub fn demobilized(&self) -> Option<KissCode> {
        self.demobilized
    }

    pub fn next_poll(&self) -> Option<ClockTime> {
        self.demobilized.is_none().then_some(self.next_poll)
    }

    pub fn last_measurement(&self) -> Option<&Measurement> {
        self.last_measurement.as_ref()
    }

    /// Samples in the frequency regression.
    pub fn sample_count(&self) -> usize {
        self.filter.sample_count()
    }

    pub fn estimate(&self, axis_now: ClockTime) -> Option<SourceEstimate> {
        self.filter.estimate(axis_now)
    }

    /// Drops all samples (after external clock changes).
    pub fn clear_samples(&mut self) {
        self.filter.clear();
    }

    /// Applies a changed configuration in place, keeping samples and reachability.
    pub fn update_config(&mut self, config: SourceConfig) {
        let max_poll = config.max_poll.max(config.min_poll);
        self.min_poll = self.min_poll.clamp(config.min_poll, max_poll);
        self.poll = self.poll.clamp(config.min_poll, max_poll);
        self.config = config;
    }

    /// The request to send if a poll is due at `now`.
    pub fn poll_due(&mut self, now: ClockTime, rng: &mut impl rand::Rng) -> Option<PollRequest> {
        if self.demobilized.is_some() || now < self.next_poll {
            return None;
        }
        if self.outstanding.is_some() {
            self.unanswered = self.unanswered.saturating_add(1);
        }
        let was_reachable = self.reach != 0;
        self.reach <<= 1;
        if self.config.iburst && self.burst_remaining == 0 && self.reach == 0 && was_reachable {
            // Just became unreachable: probe with a burst to reacquire quickly.
            self.burst_remaining = self.config.burst_count;
        }
        self.burst_remaining = self.burst_remaining.saturating_sub(1);
        let interval = if self.burst_remaining > 0 {
            self.config.burst_interval
        } else {
            poll_secs(self.poll)
        };
        self.next_poll = now.add_secs(interval);

        let transmit = NtpTimestamp::random(rng);
        self.outstanding = Some(Outstanding {
            transmit,
            sent_at: now,
        });
        let request = Packet::client_request(self.poll, transmit);
        Some(PollRequest {
            source: self.id,
            address: self.config.address,
            bytes: request.to_bytes(),
        })
    }

    /// Validates a response received at local time `received_at` (kernel timestamp when
    /// available). `now` schedules follow-up polls; `local_precision` is ours in seconds.
    pub fn handle_response(
        &mut self,
        now: ClockTime,
        bytes: &[u8],
        received_at: ClockTime,
        local_precision: f64,
        max_root_distance: f64,
    ) -> SourceEvent {
        if self.demobilized.is_some() {
            return SourceEvent::Ignored(IgnoreReason::Demobilized);
        }
        let Ok(view) = Packet::parse(bytes) else {
            return SourceEvent::Ignored(IgnoreReason::Malformed);
        };
        let packet = view.header;
        if packet.mode != Mode::Server {
            return SourceEvent::Ignored(IgnoreReason::NotServerMode);
        }
        // A zero transmit timestamp is no identity: Kiss-o'-Death replies carry none (ours
        // and ntpd-rs'), and a second KoD must not be taken for a replay of the first. Zero
        // never yields a sample (BogusTimestamps below).
        if !packet.transmit_timestamp.is_zero()
            && self.last_server_transmit == Some(packet.transmit_timestamp)
        {
            return SourceEvent::Ignored(IgnoreReason::Duplicate);
        }
        let Some(outstanding) = self.outstanding else {
            return SourceEvent::Ignored(IgnoreReason::BogusOrigin);
        };
        if packet.origin_timestamp != outstanding.transmit {
            return SourceEvent::Ignored(IgnoreReason::BogusOrigin);
        }
        // From here the response provably answers our request.
        self.outstanding = None;
        self.last_server_transmit = Some(packet.transmit_timestamp);

        if let Some(code) = packet.kiss_code() {
            return self.handle_kiss(now, code, packet.poll);
        }
        self.reach |= 1;
        self.unanswered = 0;
        self.recover_from_rate_limit();
        if packet.leap == LeapIndicator::Unknown || packet.stratum >= 16 {
            return SourceEvent::Ignored(IgnoreReason::ServerUnsynchronized);
        }
        if packet.transmit_timestamp.is_zero() || packet.receive_timestamp.is_zero() {
            return SourceEvent::Ignored(IgnoreReason::BogusTimestamps);
        }
        if packet.root_distance() >= max_root_distance {
            return SourceEvent::Ignored(IgnoreReason::RootDistanceTooLarge);
        }
        let t1 = outstanding.sent_at;
        let t2 = packet.receive_timestamp.to_clock_time_near(t1);
        let t3 = packet.transmit_timestamp.to_clock_time_near(t1);
        let t4 = received_at;
        let round_trip = t4.secs_since(t1);
        let server_time = t3.secs_since(t2);
        if round_trip < 0.0 || server_time < 0.0 || server_time > round_trip + 1.0 {
            return SourceEvent::Ignored(IgnoreReason::BogusTimestamps);
        }
        let offset = (t2.secs_since(t1) + t3.secs_since(t4)) / 2.0;
        let delay = (round_trip - server_time).max(local_precision);
        let dispersion = log2_secs(packet.precision) + local_precision + PHI * round_trip;
        let measurement = Measurement {
            offset,
            delay,
            dispersion,
            received_at,
            leap: packet.leap,
            stratum: packet.stratum,
            reference_id: packet.reference_id,
            root_delay: packet.root_delay.to_secs_f64(),
            root_dispersion: packet.root_dispersion.to_secs_f64(),
        };
        self.last_measurement = Some(measurement);
        SourceEvent::Measurement(measurement)
    }

    fn handle_kiss(&mut self, now: ClockTime, code: KissCode, server_poll: i8) -> SourceEvent {
        match code {
            KissCode::Rate => {
                // Honour the server's poll field and back off one step more, but only up to
                // the configured maximum: the operator chose how stale a source may get.
                let max_poll = self.config.max_poll.max(self.config.min_poll);
                self.rate_limited_from.get_or_insert(self.poll);
                self.poll = (self.poll + 1).max(server_poll).min(max_poll);
                self.min_poll = self.min_poll.max(self.poll);
                self.good_streak = 0;
                self.burst_remaining = 0;
                self.next_poll = now.add_secs(poll_secs(self.poll));
                SourceEvent::RateLimited { poll: self.poll }
            }
            KissCode::Deny | KissCode::Rstr => {
                self.demobilized = Some(code);
                SourceEvent::Demobilized(code)
            }
            KissCode::Ntsn | KissCode::Other(_) => SourceEvent::Ignored(IgnoreReason::UnknownKiss),
        }
    }

    /// One step back towards the poll interval before KoD RATE per normal reply, so a
    /// server that stopped limiting us is polled normally again within a few polls, without a
    /// jump back to the rate that provoked the kiss.
    fn recover_from_rate_limit(&mut self) {
        let Some(before) = self.rate_limited_from else {
            return;
        };
        self.poll = (self.poll - 1).max(before);
        self.min_poll = self.poll.min(self.min_poll).max(self.config.min_poll);
        // The adaptive rule earns longer polls again from here, not from before the kiss.
        self.good_streak = 0;
        if self.poll <= before {
            self.rate_limited_from = None;
            self.min_poll = self.config.min_poll;
        }
    }

    /// Feeds a measurement (converted to the uncorrected space by the caller) through the
    /// filter and adapts the poll interval: longer after a run of clean samples, shorter
    /// after outliers.
    pub fn add_sample(&mut self, sample: FilterSample) -> FilterVerdict {
        let verdict = self.filter.add(sample);
        if self.burst_remaining > 0 {
            return verdict;
        }
        // Poll longer only while the model predicts the next sample within its jitter; when
        // predictions miss by more (wander, path change), poll faster again.
        let ratio = self.filter.last_residual_ratio().unwrap_or(0.0);
        match verdict {
            FilterVerdict::Accepted if ratio > POLL_DECREASE_RATIO => {
                self.good_streak = 0;
                self.poll = (self.poll - 1).max(self.min_poll);
            }
            FilterVerdict::Accepted => {
                if ratio <= POLL_INCREASE_RATIO {
                    self.good_streak += 1;
                }
                if self.good_streak >= POLL_INCREASE_AFTER && self.poll < self.config.max_poll {
                    self.poll += 1;
                    self.good_streak = 0;
                }
            }
            FilterVerdict::Spike
            | FilterVerdict::JumpFollowed
            | FilterVerdict::PathHeld
            | FilterVerdict::PathCalibrated
            | FilterVerdict::Restarted => {
                self.good_streak = 0;
                self.poll = (self.poll - 1).max(self.min_poll);
            }
        }
        verdict
    }
}

/// 2^exponent seconds.
pub fn poll_secs(exponent: i8) -> f64 {
    2f64.powi(i32::from(exponent))
}

fn log2_secs(exponent: i8) -> f64 {
    2f64.powi(i32::from(exponent.clamp(-32, 8)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::time::NtpShort;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn start() -> ClockTime {
        ClockTime::from_unix_secs(1_700_000_000)
    }

    fn source(iburst: bool) -> Source {
        let mut config = SourceConfig::new("a", "192.0.2.1:123".parse().unwrap());
        config.iburst = iburst;
        Source::new(SourceId(0), config, start())
    }

    fn reply_to(request: &[u8; 48], stratum: u8, refid: [u8; 4], server: ClockTime) -> [u8; 48] {
        let req = Packet::parse(request).unwrap().header;
        Packet {
            leap: LeapIndicator::NoWarning,
            version: 4,
            mode: Mode::Server,
            stratum,
            poll: 12,
            precision: -20,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id: ReferenceId(refid),
            reference_timestamp: NtpTimestamp::ZERO,
            origin_timestamp: req.transmit_timestamp,
            receive_timestamp: NtpTimestamp::from_clock_time(server),
            transmit_timestamp: NtpTimestamp::from_clock_time(server.add_secs(1e-5)),
        }
        .to_bytes()
    }

    #[test]
    fn request_carries_random_transmit_and_only_matching_origin_is_accepted() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut s = source(false);
        let request = s.poll_due(start(), &mut rng).unwrap();
        let header = Packet::parse(&request.bytes).unwrap().header;
        assert_eq!(header.mode, Mode::Client);
        assert!(!header.transmit_timestamp.is_zero());

        let mut forged = reply_to(&request.bytes, 2, *b"GPS\0", start().add_secs(0.2));
        forged[24] ^= 1;
        let rx = start().add_secs(0.001);
        assert_eq!(
            s.handle_response(rx, &forged, rx, 1e-6, 1.5),
            SourceEvent::Ignored(IgnoreReason::BogusOrigin)
        );
        let genuine = reply_to(&request.bytes, 2, *b"GPS\0", start().add_secs(0.2));
        let SourceEvent::Measurement(m) = s.handle_response(rx, &genuine, rx, 1e-6, 1.5) else {
            panic!("genuine reply rejected");
        };
        assert!((m.offset - 0.2).abs() < 1e-3);
        // A replay of the same reply is a duplicate.
        assert_eq!(
            s.handle_response(rx, &genuine, rx, 1e-6, 1.5),
            SourceEvent::Ignored(IgnoreReason::Duplicate)
        );
        assert_eq!(s.reach(), 1);
    }

    #[test]
    fn iburst_sends_burst_then_regular_polls() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut s = source(true);
        let mut t = start();
        for _ in 0..8 {
            assert!(s.poll_due(t, &mut rng).is_some());
            assert!(s.poll_due(t.add_secs(1.0), &mut rng).is_none());
            t = t.add_secs(2.0);
        }
        // Burst exhausted: the next poll is at 2^6 s after the last burst packet.
        assert_eq!(s.next_poll(), Some(t.add_secs(62.0)));
    }

    #[test]
    fn eight_missed_polls_make_a_source_unreachable_and_restart_the_burst() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut s = source(false);
        let request = s.poll_due(start(), &mut rng).unwrap();
        let reply = reply_to(&request.bytes, 2, *b"GPS\0", start());
        s.handle_response(start(), &reply, start(), 1e-6, 1.5);
        assert!(s.is_reachable());
        s.config.iburst = true;
        let mut t = start();
        for _ in 0..8 {
            t = s.next_poll().unwrap();
            s.poll_due(t, &mut rng).unwrap();
        }
        assert!(!s.is_reachable());
        assert_eq!(s.unanswered(), 7);
        assert_eq!(s.next_poll(), Some(t.add_secs(2.0)));
    }

    #[test]
    fn kod_rate_backs_off_to_the_servers_poll_but_never_beyond_max_poll_and_deny_demobilizes() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut s = source(false);
        let request = s.poll_due(start(), &mut rng).unwrap();
        // The server asks for 2^12 s; the configured maximum is 2^10 s.
        let kod = reply_to(&request.bytes, 0, *b"RATE", start());
        assert_eq!(
            s.handle_response(start(), &kod, start(), 1e-6, 1.5),
            SourceEvent::RateLimited { poll: 10 }
        );
        assert_eq!(s.next_poll(), Some(start().add_secs(1024.0)));

        let request = s.poll_due(start().add_secs(1024.0), &mut rng).unwrap();
        let kod = reply_to(&request.bytes, 0, *b"DENY", start().add_secs(1.0));
        assert_eq!(
            s.handle_response(start(), &kod, start(), 1e-6, 1.5),
            SourceEvent::Demobilized(KissCode::Deny)
        );
        assert_eq!(s.poll_due(start().add_secs(1e6), &mut rng), None);
    }

    #[test]
    fn timeless_kods_in_a_row_are_each_acted_on_not_taken_for_replays() {
        // Our server's KoDs carry zero transmit timestamps; the second must not be dropped as
        // a duplicate of the first (which would leave the request counted as unanswered).
        let mut rng = StdRng::seed_from_u64(5);
        let mut s = source(false);
        let mut t = start();
        for _ in 0..2 {
            let request = s.poll_due(t, &mut rng).unwrap();
            let view = Packet::parse(&request.bytes).unwrap();
            let mut kod = [0u8; 48];
            crate::server::build_kod(&view, KissCode::Rate, &mut kod).unwrap();
            assert!(matches!(
                s.handle_response(t, &kod, t, 1e-6, 1.5),
                SourceEvent::RateLimited { .. }
            ));
            t = s.next_poll().unwrap();
        }
    }

    #[test]
    fn kod_rate_recovers_one_step_per_normal_reply_to_the_poll_before_the_kiss() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut s = source(false);
        let mut t = start();
        let mut exchange = |s: &mut Source, t: ClockTime, refid: &[u8; 4], stratum: u8| {
            let request = s.poll_due(t, &mut rng).unwrap();
            let reply = reply_to(&request.bytes, stratum, *refid, t);
            s.handle_response(t, &reply, t, 1e-6, 1.5)
        };
        // Three kisses in a row: 2^7, 2^8 ... never past 2^10 whatever the server asks.
        for _ in 0..6 {
            exchange(&mut s, t, b"RATE", 0);
            assert!(s.poll_exponent() <= 10);
            t = s.next_poll().unwrap();
        }
        assert_eq!(s.poll_exponent(), 10);
        // Normal replies: one step down each, back to 2^6 and the configured floor.
        let mut polls = Vec::new();
        for _ in 0..5 {
            exchange(&mut s, t, b"GPS\0", 2);
            polls.push(s.poll_exponent());
            t = s.next_poll().unwrap();
        }
        assert_eq!(polls, vec![9, 8, 7, 6, 6]);
        assert_eq!(s.min_poll, 6);
    }

    #[test]
    fn unknown_kiss_codes_and_unsynchronized_servers_yield_no_sample() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut s = source(false);
        let request = s.poll_due(start(), &mut rng).unwrap();
        let kod = reply_to(&request.bytes, 0, *b"ABCD", start());
        assert_eq!(
            s.handle_response(start(), &kod, start(), 1e-6, 1.5),
            SourceEvent::Ignored(IgnoreReason::UnknownKiss)
        );
        let request = s.poll_due(start().add_secs(64.0), &mut rng).unwrap();
        let unsynced = reply_to(&request.bytes, 16, *b"INIT", start().add_secs(1.0));
        assert_eq!(
            s.handle_response(start(), &unsynced, start(), 1e-6, 1.5),
            SourceEvent::Ignored(IgnoreReason::ServerUnsynchronized)
        );
    }
}
