//! The server's pure hot path: who gets an answer ([`ServerPolicy::decide`]) and what the
//! answer is ([`build_reply`], [`build_kod`]). Sockets, timestamps and threads live in the
//! agent.
//!
//! Design: each tenant is served on its own port, so the question is "may `src` use tenant
//! T's port". A [`ServerPolicy`] is an immutable snapshot (share it lock-free, e.g. behind an
//! `ArcSwap`) holding, per tenant, a deny trie, an allow trie (NetworkPolicy ipBlocks with
//! `except` become longest-prefix allow/deny entries) and the rate-limit settings. The
//! mutable part, [`RateLimiter`], is separate: one per worker thread needs no lock (each
//! worker then enforces the per-client limit on its share of traffic), or one shared behind a
//! mutex for exact limits. Nothing on this path allocates.
//!
//! Order (ntpd-rs): deny list → allow list → per-client rate limit → tenant budget. A refusal
//! (KoD DENY or RATE) is then sent only within the tenant's [`RefusalLimit`]; otherwise the
//! request is dropped. Refusals carry no time ([`build_kod`]), so a spoofed source's victim
//! gets nothing it could use, and the budget keeps what it gets small.

pub mod ratelimit;
pub mod trie;

pub use ratelimit::{ClientRateLimit, RateLimiter, RateVerdict, RefusalLimit, TenantBudget};
pub use trie::PrefixTrie;

use crate::packet::{HEADER_LEN, KissCode, LeapIndicator, Mode, Packet, PacketView, ReferenceId};
use crate::system::UNSYNCHRONIZED_STRATUM;
use crate::time::{ClockTime, NtpShort, NtpTimestamp, PHI};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Small integer naming a tenant (its index in the policy).
pub type TenantId = u32;

/// Action for a matching deny-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DenyAction {
    /// Drop silently.
    Ignore,
    /// Answer with KoD DENY.
    Kod,
}

/// One tenant's serving rules, as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantConfig {
    pub name: String,
    /// Prefixes allowed on this tenant's port.
    pub allow: Vec<IpNet>,
    /// Holes in `allow` (NetworkPolicy `except`).
    #[serde(default)]
    pub allow_except: Vec<IpNet>,
    #[serde(default)]
    pub deny: Vec<(IpNet, DenyAction)>,
    /// Answer clients outside the allow list with KoD DENY instead of dropping.
    #[serde(default)]
    pub kod_not_allowed: bool,
    #[serde(default)]
    pub client_rate_limit: Option<ClientRateLimit>,
    #[serde(default)]
    pub budget: Option<TenantBudget>,
    /// Above this root distance the tenant is answered "unsynchronized", seconds.
    #[serde(default)]
    pub max_root_distance: Option<f64>,
    /// How many KoD DENY/RATE replies this tenant's port may send; the rest are dropped.
    #[serde(default)]
    pub refusals: RefusalLimit,
}

#[derive(Debug, Clone)]
struct TenantPolicy {
    deny: PrefixTrie<DenyAction>,
    allow: PrefixTrie<bool>,
    kod_not_allowed: bool,
    client_rate_limit: Option<ClientRateLimit>,
    budget: Option<TenantBudget>,
    max_root_distance: Option<f64>,
    refusals: RefusalLimit,
}

/// Why a request gets no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DropReason {
    UnknownTenant,
    Denied,
    NotAllowed,
    RateLimited,
    TenantBudget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Serve,
    Drop(DropReason),
    /// Answer with a Kiss-o'-Death (RATE or DENY).
    Kod(KissCode),
}

/// Per-tenant packet counters, kept by the caller (e.g. one set per worker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantCounters {
    pub received: u64,
    pub served: u64,
    pub denied: u64,
    pub ignored: u64,
    pub rate_limited: u64,
    pub kod_sent: u64,
}

impl TenantCounters {
    pub fn record(&mut self, decision: Decision) {
        self.received += 1;
        match decision {
            Decision::Serve => self.served += 1,
            Decision::Drop(DropReason::Denied | DropReason::NotAllowed) => self.denied += 1,
            Decision::Drop(DropReason::RateLimited | DropReason::TenantBudget) => {
                self.rate_limited += 1;
            }
            Decision::Drop(DropReason::UnknownTenant) => self.ignored += 1,
            Decision::Kod(code) => {
                self.kod_sent += 1;
                if code == KissCode::Rate {
                    self.rate_limited += 1;
                } else {
                    self.denied += 1;
                }
            }
        }
    }
}

/// Immutable serving policy for all tenants.
#[derive(Debug, Clone, Default)]
pub struct ServerPolicy {
    tenants: Vec<TenantPolicy>,
}

fn address_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl ServerPolicy {
    /// Builds the tries; tenant ids are indices into `tenants`.
    pub fn new(tenants: &[TenantConfig]) -> Self {
        let tenants = tenants
            .iter()
            .map(|config| {
                let mut deny = PrefixTrie::with_expected_len(config.deny.len());
                for (net, action) in &config.deny {
                    deny.insert(*net, *action);
                }
                let mut allow =
                    PrefixTrie::with_expected_len(config.allow.len() + config.allow_except.len());
                for net in &config.allow {
                    allow.insert(*net, true);
                }
                for net in &config.allow_except {
                    allow.insert(*net, false);
                }
                TenantPolicy {
                    deny,
                    allow,
                    kod_not_allowed: config.kod_not_allowed,
                    client_rate_limit: config.client_rate_limit,
                    budget: config.budget,
                    max_root_distance: config.max_root_distance,
                    refusals: config.refusals,
                }
            })
            .collect();
        Self { tenants }
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// Whether `src` may use `tenant`'s port at all (deny and allow lists only).
    pub fn allowed(&self, tenant: TenantId, src: IpAddr) -> bool {
        self.tenants.get(tenant as usize).is_some_and(|policy| {
            policy.deny.lookup(src).is_none() && policy.allow.lookup(src) == Some(true)
        })
    }

    /// The tenant's accuracy requirement, if any.
    pub fn max_root_distance(&self, tenant: TenantId) -> Option<f64> {
        self.tenants
            .get(tenant as usize)
            .and_then(|p| p.max_root_distance)
    }

    /// Whether a refusal that comes after [`ServerPolicy::decide`] said serve may be sent:
    /// an authentication refusal (NTS NAK, crypto-NAK, KoD DENY for a request without the
    /// authentication the tenant requires). It spends the same refusal budget as the KoDs of
    /// `decide`, since a forged MAC or cookie costs a spoofer no more than a forged source.
    pub fn allow_refusal(
        &self,
        limiter: &mut RateLimiter,
        tenant: TenantId,
        src: IpAddr,
        now: ClockTime,
    ) -> bool {
        self.tenants.get(tenant as usize).is_some_and(|policy| {
            limiter.check_refusal(tenant, address_key(src), now, &policy.refusals)
        })
    }

    /// Decides what to do with a request from `src` on `tenant`'s port at `now`.
    pub fn decide(
        &self,
        limiter: &mut RateLimiter,
        tenant: TenantId,
        src: IpAddr,
        now: ClockTime,
    ) -> Decision {
        let Some(policy) = self.tenants.get(tenant as usize) else {
            return Decision::Drop(DropReason::UnknownTenant);
        };
        let key = address_key(src);
        // A refusal within the tenant's refusal budget, else silence for the same reason.
        let refuse = |limiter: &mut RateLimiter, code, silent| {
            if limiter.check_refusal(tenant, key, now, &policy.refusals) {
                Decision::Kod(code)
            } else {
                Decision::Drop(silent)
            }
        };
        match policy.deny.lookup(src) {
            Some(DenyAction::Ignore) => return Decision::Drop(DropReason::Denied),
            Some(DenyAction::Kod) => return refuse(limiter, KissCode::Deny, DropReason::Denied),
            None => {}
        }
        if policy.allow.lookup(src) != Some(true) {
            return if policy.kod_not_allowed {
                refuse(limiter, KissCode::Deny, DropReason::NotAllowed)
            } else {
                Decision::Drop(DropReason::NotAllowed)
            };
        }
        // Only sources past the deny and allow lists reach the rate table, so strangers can
        // never take an allowed client's entry.
        if let Some(limit) = &policy.client_rate_limit
            && let RateVerdict::Limited { kod } = limiter.check_client(tenant, key, now, limit)
        {
            return if kod {
                refuse(limiter, KissCode::Rate, DropReason::RateLimited)
            } else {
                Decision::Drop(DropReason::RateLimited)
            };
        }
        if let Some(budget) = &policy.budget
            && !limiter.check_tenant(tenant, now, budget)
        {
            return Decision::Drop(DropReason::TenantBudget);
        }
        Decision::Serve
    }
}

/// What the server publishes, mirrored from the client side (`System::server_state`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerClockState {
    pub synchronized: bool,
    pub leap: LeapIndicator,
    pub stratum: u8,
    pub precision: i8,
    pub root_delay: f64,
    /// Root dispersion at `updated_at`; replies add PHI · elapsed.
    pub root_dispersion: f64,
    pub reference_id: ReferenceId,
    pub reference_time: NtpTimestamp,
    pub updated_at: ClockTime,
}

impl ServerClockState {
    pub fn unsynchronized(precision: i8) -> Self {
        Self {
            synchronized: false,
            leap: LeapIndicator::Unknown,
            stratum: UNSYNCHRONIZED_STRATUM,
            precision,
            root_delay: 0.0,
            root_dispersion: 0.0,
            reference_id: ReferenceId(*b"INIT"),
            reference_time: NtpTimestamp::ZERO,
            updated_at: ClockTime::EPOCH,
        }
    }

    /// Root dispersion grown to `now`.
    pub fn root_dispersion_at(&self, now: ClockTime) -> f64 {
        self.root_dispersion + PHI * now.secs_since(self.updated_at).max(0.0)
    }

    pub fn root_distance_at(&self, now: ClockTime) -> f64 {
        self.root_delay / 2.0 + self.root_dispersion_at(now)
    }
}

fn answerable(request: &PacketView<'_>) -> bool {
    request.header.mode == Mode::Client && matches!(request.header.version, 3 | 4)
}

/// Builds the reply to a client request into `out`; `None` when the request must not be
/// answered (not mode 3, not version 3/4) or `out` is too small. The reply is 48 bytes, never
/// longer than the request. Unsynchronized state, or a root distance above the tenant's
/// `max_root_distance`, is answered with LI = 3 and stratum 16.
pub fn build_reply(
    request: &PacketView<'_>,
    received_at: ClockTime,
    transmit_at: ClockTime,
    state: &ServerClockState,
    max_root_distance: Option<f64>,
    out: &mut [u8],
) -> Option<usize> {
    if !answerable(request) || request.wire_len() < HEADER_LEN {
        return None;
    }
    let within_requirement =
        max_root_distance.is_none_or(|limit| state.root_distance_at(received_at) <= limit);
    let synchronized = state.synchronized && within_requirement;
    let header = Packet {
        leap: if synchronized {
            state.leap
        } else {
            LeapIndicator::Unknown
        },
        version: request.header.version,
        mode: Mode::Server,
        stratum: if synchronized {
            state.stratum
        } else {
            UNSYNCHRONIZED_STRATUM
        },
        poll: request.header.poll.clamp(4, 17),
        precision: state.precision,
        root_delay: NtpShort::from_secs_f64(state.root_delay),
        root_dispersion: NtpShort::from_secs_f64(state.root_dispersion_at(received_at)),
        reference_id: state.reference_id,
        reference_timestamp: state.reference_time,
        origin_timestamp: request.header.transmit_timestamp,
        receive_timestamp: NtpTimestamp::from_clock_time(received_at),
        transmit_timestamp: NtpTimestamp::from_clock_time(transmit_at),
    };
    header.encode_into(out).ok()
}

/// Builds a Kiss-o'-Death reply: stratum 0, the kiss code as reference id, the request's
/// transmit timestamp as origin (so the client can match it), and no time at all (reference,
/// receive and transmit timestamps zero, root delay and dispersion zero). A refusal is
/// advice, never a sample: clients must not (and RFC 5905 clients cannot, with T2 = T3 = 0)
/// take time from it, and a spoofed source's victim learns nothing from it.
pub fn build_kod(request: &PacketView<'_>, code: KissCode, out: &mut [u8]) -> Option<usize> {
    if !answerable(request) {
        return None;
    }
    let header = Packet {
        leap: LeapIndicator::Unknown,
        version: request.header.version,
        mode: Mode::Server,
        stratum: 0,
        poll: request.header.poll.clamp(4, 17),
        precision: 0,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort::ZERO,
        reference_id: code.to_reference_id(),
        reference_timestamp: NtpTimestamp::ZERO,
        origin_timestamp: request.header.transmit_timestamp,
        receive_timestamp: NtpTimestamp::ZERO,
        transmit_timestamp: NtpTimestamp::ZERO,
    };
    header.encode_into(out).ok()
}

/// Offset of the stratum byte in an NTP header.
const STRATUM_OFFSET: usize = 1;

/// Overwrites the transmit timestamp of an already built reply (to set it as late as
/// possible, just before sending). A Kiss-o'-Death (stratum 0) is left as built, without
/// time, so a sender may patch every reply of a batch blindly. `true` when patched.
pub fn patch_transmit_timestamp(reply: &mut [u8], transmit_at: ClockTime) -> bool {
    if reply
        .get(STRATUM_OFFSET)
        .is_none_or(|&stratum| stratum == 0)
    {
        return false;
    }
    match reply.get_mut(40..48) {
        Some(field) => {
            field.copy_from_slice(
                &NtpTimestamp::from_clock_time(transmit_at)
                    .to_bits()
                    .to_be_bytes(),
            );
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tenant(allow: &[&str]) -> TenantConfig {
        TenantConfig {
            name: "t".into(),
            allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
            allow_except: vec!["10.1.0.0/16".parse().unwrap()],
            deny: vec![("10.2.0.0/16".parse().unwrap(), DenyAction::Kod)],
            kod_not_allowed: false,
            client_rate_limit: Some(ClientRateLimit {
                leak_log2: 0,
                kod: true,
                burst: 2,
                ..ClientRateLimit::default()
            }),
            budget: None,
            max_root_distance: Some(0.01),
            refusals: RefusalLimit::default(),
        }
    }

    fn now() -> ClockTime {
        ClockTime::from_unix_secs(1_700_000_000)
    }

    #[test]
    fn deny_then_allow_with_except_then_rate_limit() {
        let policy = ServerPolicy::new(&[tenant(&["10.0.0.0/8"])]);
        let mut limiter = RateLimiter::new(128, 1);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("10.2.3.4"), now()),
            Decision::Kod(KissCode::Deny)
        );
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("10.1.3.4"), now()),
            Decision::Drop(DropReason::NotAllowed)
        );
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("192.0.2.1"), now()),
            Decision::Drop(DropReason::NotAllowed)
        );
        assert_eq!(
            policy.decide(&mut limiter, 1, ip("10.3.0.1"), now()),
            Decision::Drop(DropReason::UnknownTenant)
        );
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("10.3.0.1"), now()),
            Decision::Serve
        );
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("10.3.0.1"), now()),
            Decision::Serve
        );
        assert_eq!(
            policy.decide(&mut limiter, 0, ip("10.3.0.1"), now()),
            Decision::Kod(KissCode::Rate)
        );
        assert!(policy.allowed(0, ip("10.3.0.1")));
    }

    fn request(mode: u8, version: u8, extra: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; 48 + extra];
        bytes[0] = (version << 3) | mode;
        bytes[2] = 6;
        bytes[40..48].copy_from_slice(&0xDEAD_BEEF_0000_0001u64.to_be_bytes());
        bytes
    }

    fn synced_state() -> ServerClockState {
        ServerClockState {
            synchronized: true,
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            precision: -20,
            root_delay: 0.002,
            root_dispersion: 0.001,
            reference_id: ReferenceId([192, 0, 2, 1]),
            reference_time: NtpTimestamp::from_clock_time(now()),
            updated_at: now(),
        }
    }

    #[test]
    fn reply_copies_origin_keeps_version_and_is_never_longer_than_request() {
        let bytes = request(3, 3, 0);
        let view = Packet::parse(&bytes).unwrap();
        let mut out = [0u8; 512];
        let len = build_reply(&view, now(), now(), &synced_state(), None, &mut out).unwrap();
        assert!(len <= bytes.len());
        let reply = Packet::parse(&out[..len]).unwrap().header;
        assert_eq!(reply.version, 3);
        assert_eq!(reply.mode, Mode::Server);
        assert_eq!(reply.stratum, 2);
        assert_eq!(reply.origin_timestamp.to_bits(), 0xDEAD_BEEF_0000_0001);
    }

    #[test]
    fn kod_echoes_origin_and_carries_no_time_even_when_patched() {
        let bytes = request(3, 4, 0);
        let view = Packet::parse(&bytes).unwrap();
        let mut out = [0u8; 48];
        assert_eq!(build_kod(&view, KissCode::Deny, &mut out), Some(48));
        assert!(!patch_transmit_timestamp(&mut out, now()));
        let kod = Packet::parse(&out).unwrap().header;
        assert_eq!(kod.kiss_code(), Some(KissCode::Deny));
        assert_eq!(kod.origin_timestamp.to_bits(), 0xDEAD_BEEF_0000_0001);
        assert!(kod.receive_timestamp.is_zero() && kod.transmit_timestamp.is_zero());
        assert!(kod.reference_timestamp.is_zero());
    }

    #[test]
    fn refusals_beyond_the_budget_are_silent() {
        let mut config = tenant(&["10.0.0.0/8"]);
        config.refusals = RefusalLimit {
            per_second: 0.0,
            burst: 2.0,
            source_interval: 0.0,
        };
        let policy = ServerPolicy::new(&[config]);
        let mut limiter = RateLimiter::new(128, 1);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let decisions: Vec<_> = ["10.2.0.1", "10.2.1.1", "10.2.2.1"]
            .iter()
            .map(|s| policy.decide(&mut limiter, 0, ip(s), now()))
            .collect();
        assert_eq!(
            decisions,
            [
                Decision::Kod(KissCode::Deny),
                Decision::Kod(KissCode::Deny),
                Decision::Drop(DropReason::Denied)
            ]
        );
    }

    #[test]
    fn control_and_symmetric_modes_are_never_answered() {
        let mut out = [0u8; 512];
        for mode in [0, 1, 2, 4, 5, 6, 7] {
            let bytes = request(mode, 4, 0);
            let view = Packet::parse(&bytes).unwrap();
            assert_eq!(
                build_reply(&view, now(), now(), &synced_state(), None, &mut out),
                None
            );
        }
    }

    #[test]
    fn unsynchronized_or_too_distant_for_the_tenant_answers_li3_stratum16() {
        let bytes = request(3, 4, 0);
        let view = Packet::parse(&bytes).unwrap();
        let mut out = [0u8; 48];
        let far = now().add_secs(1000.0); // dispersion grew by 15 ms
        build_reply(&view, far, far, &synced_state(), Some(0.01), &mut out).unwrap();
        let reply = Packet::parse(&out).unwrap().header;
        assert_eq!(reply.leap, LeapIndicator::Unknown);
        assert_eq!(reply.stratum, 16);
        let unsynced = ServerClockState::unsynchronized(-20);
        build_reply(&view, now(), now(), &unsynced, None, &mut out).unwrap();
        assert_eq!(Packet::parse(&out).unwrap().header.stratum, 16);
    }
}
