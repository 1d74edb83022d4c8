//! The per-packet path, free of IO so tests and the fuzz target drive exactly what workers
//! run: parse → mode/version → deny list → allow trie → client rate limit → tenant budget →
//! accuracy requirement → reply, or a KoD within the tenant's refusal budget, or nothing.
//! Nothing here allocates.
//!
//! Only sources past the deny and allow lists are logged for `stratumctl clients` (and only
//! they reach the rate table): strangers, spoofed or not, are counted in the tenant's
//! `denied` counter and nowhere else, so they cannot push real clients out of either table.
//!
//! On an NTS or symmetric-key tenant's port the NTS fields and the MAC are checked only after
//! the allow list and the rate limits, so a stranger or a flood costs no AES work. A request
//! that authenticates is answered with its plain header and a [`Seal`]: the worker seals it
//! after stamping the transmit time, which the authenticator (or MAC) covers. That branch
//! allocates (AES-SIV, cookies, the signed copy); plain requests still do not.

use std::net::IpAddr;
use std::sync::Arc;

use stratum_api::agent_config::Unauthenticated;
use stratum_ntp::nts::ef::{AuthenticatedRequest, build_nak, build_response, verify_request_with};
use stratum_ntp::nts::{CookieError, CookieKeys, ServerVerdict};
use stratum_ntp::packet::{HEADER_LEN, KissCode, Mode, Packet, PacketView};
use stratum_ntp::server::{
    Decision, DropReason, RateLimiter, ServerClockState, ServerPolicy, TenantConfig, build_kod,
    build_reply,
};
use stratum_ntp::symmetric::{CRYPTO_NAK_KISS, MacCheck, SymmetricKeys, crypto_nak};
use stratum_ntp::time::ClockTime;

use super::clients::{ClientLog, ClientOutcome, address_key};
use super::stats::AuthMethod;
use super::stats::{Outcome, TenantStats};
use super::tenants::{PortNts, PortRules, PortSymmetric};
use crate::clock::Timescale;

/// The only tenant of a port's policy: each port serves exactly one tenant.
const PORT_TENANT: u32 = 0;

/// What every worker reads per batch for the clock: the state to publish and how to read the
/// served clock from host timestamps. Replaced whole by the run loop each turn.
#[derive(Clone, Copy, Debug)]
pub struct ClockSnapshot {
    /// Stratum, leap, root delay/dispersion, reference: what replies say.
    pub state: ServerClockState,
    /// Host realtime → served (disciplined) clock.
    pub timescale: Timescale,
}

impl ClockSnapshot {
    /// Before the first publication: unsynchronized, on the host clock.
    pub fn initial() -> Self {
        Self {
            state: ServerClockState::unsynchronized(-20),
            timescale: Timescale::IDENTITY,
        }
    }
}

/// One generation of one port's rules: immutable, swapped whole on a tenant change.
#[derive(Debug)]
pub struct PortPolicy {
    /// The tenant's counters (kept across generations and port moves).
    pub stats: Arc<TenantStats>,
    /// The rules as configured, to tell whether a new config changes them.
    pub rules: PortRules,
    policy: ServerPolicy,
}

impl PortPolicy {
    /// Builds the tries for `config`, a port without NTS.
    pub fn new(config: TenantConfig, stats: Arc<TenantStats>) -> Self {
        Self::with_rules(PortRules::plain(config), stats)
    }

    /// Builds the tries for `rules`.
    pub fn with_rules(rules: PortRules, stats: Arc<TenantStats>) -> Self {
        let policy = ServerPolicy::new(std::slice::from_ref(&rules.core));
        Self {
            stats,
            rules,
            policy,
        }
    }

    /// The tenant's core rules.
    pub fn config(&self) -> &TenantConfig {
        &self.rules.core
    }

    /// Whether `source` passes the deny and allow lists (the NTS-KE endpoint's gate).
    pub fn allowed(&self, source: IpAddr) -> bool {
        self.policy.allowed(PORT_TENANT, source.to_canonical())
    }
}

/// An authenticated NTS request whose reply the worker seals once the transmit time is in.
#[derive(Debug)]
pub struct NtsSeal {
    /// The request's identifier, session keys and how many cookies it asked for.
    pub request: AuthenticatedRequest,
    /// The keys the fresh cookies are sealed with (the port's, bound to its tenant).
    pub cookie_keys: Arc<CookieKeys>,
}

impl NtsSeal {
    /// The datagram to send: `reply`, the finished 48-byte header, with the NTS fields.
    pub fn seal(&self, reply: &[u8; HEADER_LEN], rng: &mut impl rand::CryptoRng) -> Vec<u8> {
        build_response(reply, &self.request, &self.cookie_keys, rng)
    }
}

/// A request that authenticated with a symmetric key: its reply is signed with the same key.
#[derive(Debug)]
pub struct MacSeal {
    /// The key the request's MAC verified with.
    pub key_id: u32,
    /// The port's keys (holding `key_id`).
    pub keys: Arc<SymmetricKeys>,
}

/// What an authenticated reply still needs once its transmit time is stamped.
#[derive(Debug)]
pub enum Seal {
    /// NTS extension fields.
    Nts(NtsSeal),
    /// A MAC.
    Mac(MacSeal),
}

impl Seal {
    /// The datagram to send: `reply`, the finished 48-byte header, authenticated. `None` only
    /// if the key vanished, which [`MacSeal`] holding the keys rules out.
    pub fn seal(
        &self,
        reply: &[u8; HEADER_LEN],
        rng: &mut impl rand::CryptoRng,
    ) -> Option<Vec<u8>> {
        match self {
            Seal::Nts(nts) => Some(nts.seal(reply, rng)),
            Seal::Mac(mac) => {
                let mut datagram = [0u8; HEADER_LEN + stratum_ntp::packet::MAX_MAC_LEN];
                datagram[..HEADER_LEN].copy_from_slice(reply);
                let len = mac.keys.sign(mac.key_id, &mut datagram, HEADER_LEN)?;
                Some(datagram[..len].to_vec())
            }
        }
    }

    /// How the reply is authenticated, for the counters.
    pub fn method(&self) -> AuthMethod {
        match self {
            Seal::Nts(_) => AuthMethod::Nts,
            Seal::Mac(_) => AuthMethod::SymmetricKey,
        }
    }
}

/// A port's mutable state: the rate-limit table and the client log, both bounded.
#[derive(Debug)]
pub struct PortState {
    /// Per-client token buckets and the tenant budget.
    pub limiter: RateLimiter,
    /// Who asked, for `stratumctl clients`.
    pub clients: ClientLog,
}

impl PortState {
    /// Tables of `capacity` clients, keyed by `seed`.
    pub fn new(capacity: usize, seed: u64) -> Self {
        Self {
            limiter: RateLimiter::new(capacity, seed),
            clients: ClientLog::new(capacity, seed.rotate_left(32)),
        }
    }
}

/// One datagram as the path sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Sender (IPv4-mapped IPv6 is treated as IPv4).
    pub source: IpAddr,
    /// The datagram.
    pub bytes: &'a [u8],
    /// It was longer than the receive buffer.
    pub truncated: bool,
    /// Kernel receive time on the served clock.
    pub received_at: ClockTime,
}

/// Handles one request. Writes the answer, if any, into `out` and returns its length with the
/// outcome. A served reply's transmit timestamp is provisional (the receive time): the worker
/// overwrites it just before sending with `patch_transmit_timestamp`, which leaves KoDs
/// (`Denied { kod: true }`, `RateLimited { kod: true }`) without time. For an authenticated
/// request `seal` is set: the worker seals the reply after that ([`Seal::seal`]). `out` must
/// hold the request's length for an NTS port's NAK; a plain reply needs 48 bytes, a
/// crypto-NAK 52.
pub fn handle_request(
    port: &PortPolicy,
    state: &mut PortState,
    clock: &ServerClockState,
    request: Request<'_>,
    out: &mut [u8],
) -> (Outcome, usize) {
    handle_request_sealing(port, state, clock, request, out, &mut None)
}

/// [`handle_request`] that also hands back what an authenticated reply needs sealed.
pub fn handle_request_sealing(
    port: &PortPolicy,
    state: &mut PortState,
    clock: &ServerClockState,
    request: Request<'_>,
    out: &mut [u8],
    seal: &mut Option<Seal>,
) -> (Outcome, usize) {
    let Request {
        source,
        received_at,
        ..
    } = request;
    let (outcome, len) = decide_and_build(port, state, clock, request, out, seal);
    let logged = match outcome {
        // Denied covers the deny list and sources outside the allow list: not clients.
        Outcome::Malformed | Outcome::Ignored | Outcome::Denied { .. } => None,
        Outcome::Served | Outcome::ServedUnsynchronized | Outcome::NtsNak | Outcome::MacNak => {
            Some(ClientOutcome::Answered)
        }
        Outcome::Unauthenticated { kod: true } => Some(ClientOutcome::Kod),
        Outcome::NtsFailed | Outcome::MacFailed | Outcome::Unauthenticated { kod: false } => {
            Some(ClientOutcome::Dropped)
        }
        Outcome::RateLimited { kod: true } => Some(ClientOutcome::Kod),
        Outcome::RateLimited { kod: false } => Some(ClientOutcome::Dropped),
    };
    if let Some(logged) = logged {
        state.clients.record(
            address_key(source.to_canonical()),
            received_at.unix_nanos(),
            logged,
        );
    }
    (outcome, len)
}

fn decide_and_build(
    port: &PortPolicy,
    state: &mut PortState,
    clock: &ServerClockState,
    request: Request<'_>,
    out: &mut [u8],
    seal: &mut Option<Seal>,
) -> (Outcome, usize) {
    let Request {
        source,
        bytes,
        truncated,
        received_at,
    } = request;
    if truncated {
        return (Outcome::Malformed, 0);
    }
    let Ok(view) = Packet::parse(bytes) else {
        return (Outcome::Malformed, 0);
    };
    // Only client requests of NTPv3/v4 are ever answered: control (6/7), symmetric and
    // broadcast packets stop here, before they can touch the rate table or earn a KoD.
    if view.header.mode != Mode::Client || !matches!(view.header.version, 3 | 4) {
        return (Outcome::Ignored, 0);
    }
    let source = source.to_canonical();
    let decision = port
        .policy
        .decide(&mut state.limiter, PORT_TENANT, source, received_at);
    match decision {
        Decision::Serve => {
            // A MAC is the client's choice of symmetric keys; NTS fields or none, the port's
            // NTS (which refuses plain requests as the tenant chose) decides.
            let step = match (&port.rules.symmetric, &port.rules.nts) {
                (Some(symmetric), _) if view.mac.is_some() => {
                    mac_step(symmetric, &view, bytes, out)
                }
                (_, Some(nts)) => nts_step(nts, &view, bytes, out),
                (Some(symmetric), None) => unauthenticated(symmetric.unauthenticated, &view, out),
                (None, None) => AuthStep::Answer(None),
            };
            match step {
                AuthStep::Answer(sealing) => *seal = sealing,
                // Anything written back here is a refusal: within the refusal budget only.
                AuthStep::Done(outcome, len) if len > 0 => {
                    let allowed = port.policy.allow_refusal(
                        &mut state.limiter,
                        PORT_TENANT,
                        source,
                        received_at,
                    );
                    return if allowed {
                        (outcome, len)
                    } else {
                        (outcome.silenced(), 0)
                    };
                }
                AuthStep::Done(outcome, len) => return (outcome, len),
            }
            match build_reply(
                &view,
                received_at,
                received_at,
                clock,
                port.rules.core.max_root_distance,
                out,
            ) {
                Some(len) => {
                    // LI = 3 is how build_reply says "unsynchronized" (or too far for this
                    // tenant's requirement).
                    let unsynchronized = out[0] >> 6 == 3;
                    let outcome = if unsynchronized {
                        Outcome::ServedUnsynchronized
                    } else {
                        Outcome::Served
                    };
                    (outcome, len)
                }
                None => {
                    *seal = None;
                    (Outcome::Ignored, 0)
                }
            }
        }
        Decision::Kod(code) => {
            let outcome = match code {
                KissCode::Rate => Outcome::RateLimited { kod: true },
                _ => Outcome::Denied { kod: true },
            };
            match build_kod(&view, code, out) {
                Some(len) => (outcome, len),
                None => (Outcome::Ignored, 0),
            }
        }
        Decision::Drop(DropReason::Denied | DropReason::NotAllowed) => {
            (Outcome::Denied { kod: false }, 0)
        }
        Decision::Drop(DropReason::RateLimited | DropReason::TenantBudget) => {
            (Outcome::RateLimited { kod: false }, 0)
        }
        Decision::Drop(DropReason::UnknownTenant) => (Outcome::Ignored, 0),
    }
}

/// What authentication makes of an allowed, in-rate request.
enum AuthStep {
    /// Answer with the served clock; sealed when `Some`.
    Answer(Option<Seal>),
    /// Already decided (and written into `out` when answered).
    Done(Outcome, usize),
}

/// A request without authentication on a port that has it.
fn unauthenticated(policy: Unauthenticated, view: &PacketView<'_>, out: &mut [u8]) -> AuthStep {
    match policy {
        Unauthenticated::Serve => AuthStep::Answer(None),
        Unauthenticated::Ignore => AuthStep::Done(Outcome::Unauthenticated { kod: false }, 0),
        Unauthenticated::Deny => match build_kod(view, KissCode::Deny, out) {
            Some(len) => AuthStep::Done(Outcome::Unauthenticated { kod: true }, len),
            None => AuthStep::Done(Outcome::Ignored, 0),
        },
    }
}

fn mac_step(
    symmetric: &PortSymmetric,
    view: &PacketView<'_>,
    bytes: &[u8],
    out: &mut [u8],
) -> AuthStep {
    let check = match &symmetric.keys {
        Some(keys) => keys.check(bytes, view.mac),
        None => MacCheck::Malformed,
    };
    match (check, &symmetric.keys) {
        (MacCheck::Valid { key_id }, Some(keys)) => AuthStep::Answer(Some(Seal::Mac(MacSeal {
            key_id,
            keys: keys.clone(),
        }))),
        (MacCheck::Absent, _) => unauthenticated(symmetric.unauthenticated, view, out),
        // Unknown key id, a digest that does not verify, keys not read yet: never served.
        _ if symmetric.crypto_nak => {
            let mut header = [0u8; HEADER_LEN];
            match build_kod(view, CRYPTO_NAK_KISS, &mut header) {
                Some(HEADER_LEN) => match crypto_nak(&header, out) {
                    Some(len) => AuthStep::Done(Outcome::MacNak, len),
                    None => AuthStep::Done(Outcome::MacFailed, 0),
                },
                _ => AuthStep::Done(Outcome::Ignored, 0),
            }
        }
        _ => AuthStep::Done(Outcome::MacFailed, 0),
    }
}

fn nts_step(nts: &PortNts, view: &PacketView<'_>, bytes: &[u8], out: &mut [u8]) -> AuthStep {
    // Without the TimeService's keys no cookie opens: the NAK, never a plain answer.
    let verdict = verify_request_with(bytes, |cookie| match &nts.keys {
        Some(keys) => keys.open(cookie),
        None => Err(CookieError::NoKeys),
    });
    match verdict {
        ServerVerdict::Plain => unauthenticated(nts.unauthenticated, view, out),
        // Authenticated implies a cookie opened, so the keys are there; fail closed anyway.
        ServerVerdict::Authenticated(request) => match nts.keys.clone() {
            Some(cookie_keys) => AuthStep::Answer(Some(Seal::Nts(NtsSeal {
                request,
                cookie_keys,
            }))),
            None => AuthStep::Done(Outcome::NtsFailed, 0),
        },
        ServerVerdict::Nak { unique_id, .. } => {
            let mut kod = [0u8; HEADER_LEN];
            match build_kod(view, KissCode::Ntsn, &mut kod) {
                Some(HEADER_LEN) => {
                    let nak = build_nak(&kod, &unique_id);
                    // Never longer than the request (its identifier came from it), and `out`
                    // holds a whole request.
                    match out.get_mut(..nak.len()) {
                        Some(slot) if nak.len() <= bytes.len() => {
                            slot.copy_from_slice(&nak);
                            AuthStep::Done(Outcome::NtsNak, nak.len())
                        }
                        _ => AuthStep::Done(Outcome::NtsFailed, 0),
                    }
                }
                _ => AuthStep::Done(Outcome::Ignored, 0),
            }
        }
        ServerVerdict::Drop(_) => AuthStep::Done(Outcome::NtsFailed, 0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stratum_ntp::packet::{LeapIndicator, ReferenceId};
    use stratum_ntp::server::{ClientRateLimit, DenyAction, RefusalLimit};
    use stratum_ntp::time::NtpTimestamp;

    fn now() -> ClockTime {
        ClockTime::from_unix_secs(1_700_000_000)
    }

    fn port(kod: bool) -> PortPolicy {
        PortPolicy::new(
            TenantConfig {
                name: "ns/a".into(),
                allow: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
                allow_except: vec![],
                deny: vec![("10.9.0.0/16".parse().unwrap(), DenyAction::Ignore)],
                kod_not_allowed: kod,
                client_rate_limit: Some(ClientRateLimit {
                    interval: 1.0,
                    burst: 2,
                    leak_log2: 0,
                    kod,
                }),
                budget: None,
                max_root_distance: Some(0.5),
                refusals: RefusalLimit::default(),
            },
            Arc::new(TenantStats::new("ns/a".into(), 1)),
        )
    }

    fn synced() -> ServerClockState {
        ServerClockState {
            synchronized: true,
            leap: LeapIndicator::NoWarning,
            stratum: 3,
            precision: -20,
            root_delay: 0.001,
            root_dispersion: 0.001,
            reference_id: ReferenceId([127, 0, 0, 1]),
            reference_time: NtpTimestamp::from_clock_time(now()),
            updated_at: now(),
        }
    }

    fn request(first_byte: u8) -> [u8; 48] {
        let mut r = [0u8; 48];
        r[0] = first_byte;
        r[40..48].copy_from_slice(&7u64.to_be_bytes());
        r
    }

    fn req<'a>(src: &str, bytes: &'a [u8], truncated: bool) -> Request<'a> {
        Request {
            source: src.parse().unwrap(),
            bytes,
            truncated,
            received_at: now(),
        }
    }

    const V4_CLIENT: u8 = (4 << 3) | 3;

    fn run(port: &PortPolicy, state: &mut PortState, src: &str, bytes: &[u8]) -> Outcome {
        let mut out = [0u8; 48];
        handle_request(port, state, &synced(), req(src, bytes, false), &mut out).0
    }

    #[test]
    fn allowed_client_is_served_and_ipv4_mapped_sources_match_ipv4_prefixes() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        assert_eq!(
            run(&port, &mut state, "10.1.2.3", &request(V4_CLIENT)),
            Outcome::Served
        );
        assert_eq!(
            run(&port, &mut state, "::ffff:10.1.2.4", &request(V4_CLIENT)),
            Outcome::Served
        );
        let logged: Vec<IpAddr> = state.clients.top(5).iter().map(|c| c.address).collect();
        assert!(
            logged.contains(&"10.1.2.4".parse().unwrap()),
            "mapped source logged as IPv4"
        );
    }

    #[test]
    fn control_modes_are_ignored_before_policy_and_garbage_is_malformed() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        for mode in [6u8, 7] {
            assert_eq!(
                run(&port, &mut state, "192.0.2.1", &request((2 << 3) | mode)),
                Outcome::Ignored,
                "mode {mode} from a stranger must not even earn a KoD"
            );
        }
        assert_eq!(
            run(&port, &mut state, "10.0.0.1", &[0u8; 12]),
            Outcome::Malformed
        );
        assert_eq!(state.clients.occupied(), 0);
    }

    #[test]
    fn strangers_get_kod_deny_only_when_the_tenant_enables_kod() {
        let mut state = PortState::new(64, 1);
        assert_eq!(
            run(&port(false), &mut state, "192.0.2.1", &request(V4_CLIENT)),
            Outcome::Denied { kod: false }
        );
        let mut out = [0u8; 48];
        let (outcome, len) = handle_request(
            &port(true),
            &mut state,
            &synced(),
            req("192.0.2.1", &request(V4_CLIENT), false),
            &mut out,
        );
        assert_eq!(outcome, Outcome::Denied { kod: true });
        assert_eq!(&out[12..16], b"DENY");
        assert_eq!((len, out[1]), (48, 0), "KoD: 48 bytes, stratum 0");
        assert_eq!(
            run(&port(true), &mut state, "10.9.1.1", &request(V4_CLIENT)),
            Outcome::Denied { kod: false },
            "the deny list says ignore"
        );
    }

    #[test]
    fn strangers_never_enter_the_rate_table_or_the_client_log() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        for i in 0..1000u32 {
            // Outside the allow list, and on the deny list.
            for base in [0xC000_0200u32, 0x0A09_0000] {
                let source = IpAddr::V4((base + i).into());
                let mut out = [0u8; 48];
                let request = Request {
                    source,
                    bytes: &request(V4_CLIENT),
                    truncated: false,
                    received_at: now().add_nanos(i64::from(i) * 1_000_000),
                };
                let (outcome, _) = handle_request(&port, &mut state, &synced(), request, &mut out);
                assert!(matches!(outcome, Outcome::Denied { .. }), "{source}");
            }
        }
        assert_eq!(state.limiter.occupied(), 0);
        assert_eq!(state.clients.occupied(), 0);
    }

    #[test]
    fn a_client_over_its_burst_is_limited_and_others_are_not() {
        let port = port(true);
        let mut state = PortState::new(64, 1);
        let outcomes: Vec<_> = (0..4)
            .map(|_| run(&port, &mut state, "10.0.0.1", &request(V4_CLIENT)))
            .collect();
        assert_eq!(outcomes[..2], [Outcome::Served, Outcome::Served]);
        assert_eq!(outcomes[2], Outcome::RateLimited { kod: true });
        assert_eq!(outcomes[3], Outcome::RateLimited { kod: false });
        assert_eq!(
            run(&port, &mut state, "10.0.0.2", &request(V4_CLIENT)),
            Outcome::Served
        );
    }

    #[test]
    fn unsynchronized_clock_is_served_with_li3_stratum16() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        let mut out = [0u8; 48];
        let (outcome, _) = handle_request(
            &port,
            &mut state,
            &ServerClockState::unsynchronized(-20),
            req("10.0.0.1", &request(V4_CLIENT), false),
            &mut out,
        );
        assert_eq!(outcome, Outcome::ServedUnsynchronized);
        assert_eq!((out[0] >> 6, out[1]), (3, 16));
    }

    #[test]
    fn truncated_datagrams_are_malformed() {
        let port = port(false);
        let mut state = PortState::new(64, 1);
        let mut out = [0u8; 48];
        let (outcome, len) = handle_request(
            &port,
            &mut state,
            &synced(),
            req("10.0.0.1", &request(V4_CLIENT), true),
            &mut out,
        );
        assert_eq!((outcome, len), (Outcome::Malformed, 0));
    }

    mod nts {
        use super::*;
        use crate::server::tenants::PortNts;
        use rand::SeedableRng;
        use rand::rngs::StdRng;
        use stratum_ntp::nts::ef::{ClientRequest, verify_response};
        use stratum_ntp::nts::{AeadKey, CookieJar, MasterKey, ResponseError, SessionKeys};

        fn master(id: u32) -> MasterKey {
            MasterKey {
                id,
                key: AeadKey::from_bytes([id as u8; 32]),
            }
        }

        fn session() -> SessionKeys {
            SessionKeys {
                c2s: AeadKey::from_bytes([1; 32]),
                s2c: AeadKey::from_bytes([2; 32]),
            }
        }

        /// Tenant `ns/a`'s port (allow 10/8, kod on) with NTS under `keys`.
        fn nts_port(keys: Option<&CookieKeys>, unauthenticated: Unauthenticated) -> PortPolicy {
            let plain = port(true);
            PortPolicy::with_rules(
                PortRules {
                    core: plain.rules.core.clone(),
                    nts: Some(PortNts {
                        keys: keys.map(|k| Arc::new(k.bound_to(b"ns/a"))),
                        unauthenticated,
                    }),
                    symmetric: None,
                },
                plain.stats.clone(),
            )
        }

        /// What a client holds after a key exchange with tenant `tenant` under `keys`.
        fn jar(keys: &CookieKeys, tenant: &[u8], rng: &mut StdRng) -> CookieJar {
            let bound = keys.bound_to(tenant);
            CookieJar::new(
                session(),
                (0..8).map(|_| bound.seal(&session(), rng)).collect(),
            )
        }

        fn client_header() -> Packet {
            Packet::parse(&request(V4_CLIENT)).unwrap().header
        }

        struct Answer {
            outcome: Outcome,
            datagram: Vec<u8>,
            sealed: bool,
        }

        /// Runs one request through the path and, as the worker does, seals the reply.
        fn ask(port: &PortPolicy, state: &mut PortState, src: &str, bytes: &[u8]) -> Answer {
            let mut out = [0u8; 1024];
            let mut seal = None;
            let (outcome, len) = handle_request_sealing(
                port,
                state,
                &synced(),
                req(src, bytes, false),
                &mut out,
                &mut seal,
            );
            let mut rng = StdRng::seed_from_u64(9);
            let sealed = seal.is_some();
            let datagram = match seal {
                Some(seal) => seal.seal(out[..48].try_into().unwrap(), &mut rng).unwrap(),
                None => out[..len].to_vec(),
            };
            Answer {
                outcome,
                datagram,
                sealed,
            }
        }

        #[test]
        fn an_nts_request_is_answered_authenticated_with_fresh_cookies() {
            let keys = CookieKeys::new(master(1), None);
            let port = nts_port(Some(&keys), Unauthenticated::Deny);
            let mut state = PortState::new(64, 1);
            let mut rng = StdRng::seed_from_u64(1);
            let mut jar = jar(&keys, b"ns/a", &mut rng);
            let request = ClientRequest::build(&client_header(), &mut jar, &mut rng).unwrap();
            let answer = ask(&port, &mut state, "10.0.0.1", &request.datagram);
            assert_eq!(answer.outcome, Outcome::Served);
            assert!(answer.sealed);
            assert!(
                answer.datagram.len() <= request.datagram.len(),
                "no amplification"
            );
            let verified =
                verify_response(&answer.datagram, &request.unique_id, &session().s2c).unwrap();
            assert_eq!(verified.cookies.len(), 1, "one back for the one spent");
            // The new cookie opens on this tenant's port: it authenticates the next request.
            jar.add(verified.cookies);
            let next = ClientRequest::build(&client_header(), &mut jar, &mut rng).unwrap();
            assert_eq!(
                ask(&port, &mut state, "10.0.0.1", &next.datagram).outcome,
                Outcome::Served
            );
        }

        #[test]
        fn a_tenant_that_requires_nts_refuses_plain_requests_with_deny_or_silence() {
            let keys = CookieKeys::new(master(1), None);
            let mut state = PortState::new(64, 1);
            let deny = ask(
                &nts_port(Some(&keys), Unauthenticated::Deny),
                &mut state,
                "10.0.0.2",
                &request(V4_CLIENT),
            );
            assert_eq!(deny.outcome, Outcome::Unauthenticated { kod: true });
            assert_eq!(
                (&deny.datagram[12..16], deny.datagram[1]),
                (&b"DENY"[..], 0)
            );
            let silent = ask(
                &nts_port(Some(&keys), Unauthenticated::Ignore),
                &mut state,
                "10.0.0.3",
                &request(V4_CLIENT),
            );
            assert_eq!(
                (silent.outcome, silent.datagram.len()),
                (Outcome::Unauthenticated { kod: false }, 0)
            );
            let offered = ask(
                &nts_port(Some(&keys), Unauthenticated::Serve),
                &mut state,
                "10.0.0.4",
                &request(V4_CLIENT),
            );
            assert_eq!((offered.outcome, offered.sealed), (Outcome::Served, false));
        }

        #[test]
        fn another_tenants_cookie_an_expired_key_or_no_keys_get_the_nak() {
            let keys = CookieKeys::new(master(1), None);
            let mut rng = StdRng::seed_from_u64(2);
            // A client per request, each in a network of its own: the port allows a burst of
            // two per client, and a refusal (the NAK) to one network every 2 s.
            let mut state = PortState::new(64, 1);
            // Tenant b's cookie, same TimeService keys, presented on tenant a's port.
            let mut foreign = jar(&keys, b"ns/b", &mut rng);
            let request = ClientRequest::build(&client_header(), &mut foreign, &mut rng).unwrap();
            let answer = ask(
                &nts_port(Some(&keys), Unauthenticated::Deny),
                &mut state,
                "10.5.1.1",
                &request.datagram,
            );
            assert_eq!(answer.outcome, Outcome::NtsNak);
            assert_eq!(&answer.datagram[12..16], b"NTSN");
            assert_eq!(
                verify_response(&answer.datagram, &request.unique_id, &session().s2c),
                Err(ResponseError::Nak),
                "the client reads it as a NAK and re-keys"
            );
            // Two rotations later the cookie's key is gone.
            let mut old = jar(&keys, b"ns/a", &mut rng);
            let rotated_twice = CookieKeys::new(master(3), Some(master(2)));
            let request = ClientRequest::build(&client_header(), &mut old, &mut rng).unwrap();
            let port = nts_port(Some(&rotated_twice), Unauthenticated::Deny);
            assert_eq!(
                ask(&port, &mut state, "10.5.2.1", &request.datagram).outcome,
                Outcome::NtsNak
            );
            // One rotation later it still works.
            let rotated_once = CookieKeys::new(master(2), Some(master(1)));
            let request = ClientRequest::build(&client_header(), &mut old, &mut rng).unwrap();
            let port = nts_port(Some(&rotated_once), Unauthenticated::Deny);
            assert_eq!(
                ask(&port, &mut state, "10.5.3.1", &request.datagram).outcome,
                Outcome::Served
            );
            // Keys not loaded: a NAK, never an unauthenticated answer.
            let request = ClientRequest::build(&client_header(), &mut old, &mut rng).unwrap();
            let answer = ask(
                &nts_port(None, Unauthenticated::Serve),
                &mut state,
                "10.5.4.1",
                &request.datagram,
            );
            assert_eq!((answer.outcome, answer.sealed), (Outcome::NtsNak, false));
        }

        #[test]
        fn a_flood_of_valid_nts_requests_from_strangers_or_over_the_rate_opens_no_cookie() {
            let keys = CookieKeys::new(master(1), None);
            let port = nts_port(Some(&keys), Unauthenticated::Deny);
            let mut state = PortState::new(64, 1);
            let mut rng = StdRng::seed_from_u64(4);
            let mut jar = jar(&keys, b"ns/a", &mut rng);
            let request = ClientRequest::build(&client_header(), &mut jar, &mut rng).unwrap();
            // Spoofed sources outside the allow list: denied, no table entry, no log row.
            for i in 0..1000u32 {
                let source = IpAddr::V4((0xC000_0200u32 + i).into()).to_string();
                let answer = ask(&port, &mut state, &source, &request.datagram);
                assert!(matches!(answer.outcome, Outcome::Denied { .. }), "{source}");
                assert!(!answer.sealed);
            }
            assert_eq!((state.limiter.occupied(), state.clients.occupied()), (0, 0));
            // One allowed client replaying its request: its burst (2) is served, the rest is
            // rate limited before the NTS fields are looked at.
            let outcomes: Vec<(Outcome, bool)> = (0..6)
                .map(|_| {
                    let a = ask(&port, &mut state, "10.0.9.1", &request.datagram);
                    (a.outcome, a.sealed)
                })
                .collect();
            assert_eq!(outcomes[..2], [(Outcome::Served, true); 2]);
            assert!(
                outcomes[2..]
                    .iter()
                    .all(|(o, sealed)| matches!(o, Outcome::RateLimited { .. }) && !sealed),
                "{outcomes:?}"
            );
        }

        #[test]
        fn tampered_requests_are_dropped_and_strangers_never_reach_the_crypto() {
            let keys = CookieKeys::new(master(1), None);
            let port = nts_port(Some(&keys), Unauthenticated::Deny);
            let mut state = PortState::new(64, 1);
            let mut rng = StdRng::seed_from_u64(3);
            let mut jar = jar(&keys, b"ns/a", &mut rng);
            let request = ClientRequest::build(&client_header(), &mut jar, &mut rng).unwrap();
            let mut tampered = request.datagram.clone();
            tampered[47] ^= 1; // the transmit timestamp, covered by the authenticator
            let answer = ask(&port, &mut state, "10.0.0.6", &tampered);
            assert_eq!(
                (answer.outcome, answer.datagram.len()),
                (Outcome::NtsFailed, 0)
            );
            // A valid NTS request from outside the allow list is denied like any other: the
            // cookie is never opened (a DENY KoD without the NTS fields, as kod is on).
            let request = ClientRequest::build(&client_header(), &mut jar, &mut rng).unwrap();
            let answer = ask(&port, &mut state, "192.0.2.9", &request.datagram);
            assert_eq!(
                (answer.outcome, answer.sealed),
                (Outcome::Denied { kod: true }, false)
            );
            assert_eq!(answer.datagram.len(), 48);
        }
    }

    mod symmetric {
        use super::*;
        use stratum_ntp::symmetric::{CRYPTO_NAK_KISS, is_crypto_nak};

        const KEYS: &str = "\
1 AES128 HEX:000102030405060708090a0b0c0d0e0f
2 SHA1 ASCII:switch-secret
3 MD5 ASCII:old-device
";

        /// Tenant `ns/a`'s port (allow 10/8; `kod` sends KoDs and crypto-NAKs) with `keys`.
        fn mac_port(keys: Option<&str>, unauthenticated: Unauthenticated, kod: bool) -> PortPolicy {
            let plain = port(kod);
            PortPolicy::with_rules(
                PortRules {
                    core: plain.rules.core.clone(),
                    nts: None,
                    symmetric: Some(PortSymmetric {
                        keys: keys.map(|k| Arc::new(SymmetricKeys::parse(k).unwrap())),
                        unauthenticated,
                        crypto_nak: kod,
                    }),
                },
                plain.stats.clone(),
            )
        }

        /// A v4 client request signed with key `id` of `keys`.
        fn signed(keys: &str, id: u32) -> Vec<u8> {
            let keys = SymmetricKeys::parse(keys).unwrap();
            let mut buffer = [0u8; 72];
            buffer[..48].copy_from_slice(&request(V4_CLIENT));
            let len = keys.sign(id, &mut buffer, 48).unwrap();
            buffer[..len].to_vec()
        }

        /// Runs one request as the worker does: decide, stamp, seal.
        fn ask(
            port: &PortPolicy,
            state: &mut PortState,
            src: &str,
            bytes: &[u8],
        ) -> (Outcome, Vec<u8>) {
            let mut out = [0u8; 1024];
            let mut seal = None;
            let (outcome, len) = handle_request_sealing(
                port,
                state,
                &synced(),
                req(src, bytes, false),
                &mut out,
                &mut seal,
            );
            let datagram = match seal {
                Some(seal) => {
                    assert_eq!(seal.method(), AuthMethod::SymmetricKey);
                    let header: [u8; 48] = out[..48].try_into().unwrap();
                    seal.seal(&header, &mut rand::rng()).unwrap()
                }
                None => out[..len].to_vec(),
            };
            (outcome, datagram)
        }

        #[test]
        fn a_request_signed_with_any_tenant_key_is_answered_signed_with_that_key() {
            let port = mac_port(Some(KEYS), Unauthenticated::Deny, true);
            let keys = SymmetricKeys::parse(KEYS).unwrap();
            let mut state = PortState::new(64, 1);
            for (n, id) in [1u32, 2, 3].into_iter().enumerate() {
                let source = format!("10.0.0.{}", n + 1);
                let (outcome, reply) = ask(&port, &mut state, &source, &signed(KEYS, id));
                assert_eq!(outcome, Outcome::Served);
                let view = Packet::parse(&reply).unwrap();
                assert_eq!(view.header.mode, Mode::Server);
                assert_eq!(keys.check(&reply, view.mac), MacCheck::Valid { key_id: id });
            }
        }

        #[test]
        fn wrong_keys_and_unknown_ids_get_a_crypto_nak_or_silence_never_time() {
            let other = "1 AES128 HEX:ffffffffffffffffffffffffffffffff\n9 MD5 ASCII:x\n";
            for kod in [true, false] {
                let port = mac_port(Some(KEYS), Unauthenticated::Serve, kod);
                let mut state = PortState::new(64, 1);
                for (source, forged) in [
                    ("10.1.1.1", signed(other, 1)),
                    ("10.1.2.1", signed(other, 9)),
                ] {
                    let (outcome, reply) = ask(&port, &mut state, source, &forged);
                    if kod {
                        assert_eq!(outcome, Outcome::MacNak);
                        assert!(is_crypto_nak(&reply), "{reply:?}");
                        let header = Packet::parse(&reply).unwrap().header;
                        assert_eq!(header.kiss_code(), Some(CRYPTO_NAK_KISS));
                        assert_eq!(header.transmit_timestamp.to_bits(), 0, "no time in a NAK");
                    } else {
                        assert_eq!((outcome, reply.len()), (Outcome::MacFailed, 0));
                    }
                }
            }
            // Keys not read yet: every MAC fails; the tenant's devices are never served plain.
            let port = mac_port(None, Unauthenticated::Serve, false);
            let mut state = PortState::new(64, 1);
            let (outcome, _) = ask(&port, &mut state, "10.0.1.3", &signed(KEYS, 1));
            assert_eq!(outcome, Outcome::MacFailed);
        }

        #[test]
        fn requests_without_a_mac_get_what_the_tenant_chose() {
            let mut state = PortState::new(64, 1);
            let plain = request(V4_CLIENT);
            let (outcome, _) = ask(
                &mac_port(Some(KEYS), Unauthenticated::Serve, true),
                &mut state,
                "10.0.2.1",
                &plain,
            );
            assert_eq!(outcome, Outcome::Served);
            let (outcome, reply) = ask(
                &mac_port(Some(KEYS), Unauthenticated::Deny, true),
                &mut state,
                "10.0.2.2",
                &plain,
            );
            assert_eq!(outcome, Outcome::Unauthenticated { kod: true });
            assert_eq!(
                Packet::parse(&reply).unwrap().header.kiss_code(),
                Some(KissCode::Deny)
            );
            let (outcome, reply) = ask(
                &mac_port(Some(KEYS), Unauthenticated::Ignore, true),
                &mut state,
                "10.0.2.3",
                &plain,
            );
            assert_eq!(
                (outcome, reply.len()),
                (Outcome::Unauthenticated { kod: false }, 0)
            );
        }

        /// Isolation: another tenant's key does not open this port, a stranger's signed
        /// request is refused before any MAC work, and a flood of forgeries is rate limited
        /// like any traffic (so a crypto-NAK never amplifies).
        #[test]
        fn strangers_and_floods_are_stopped_before_the_mac() {
            let port = mac_port(Some(KEYS), Unauthenticated::Deny, true);
            let mut state = PortState::new(64, 1);
            let (outcome, reply) = ask(&port, &mut state, "192.0.2.9", &signed(KEYS, 1));
            assert_eq!(outcome, Outcome::Denied { kod: true });
            assert_eq!(
                reply.len(),
                48,
                "a plain DENY: the stranger learns nothing of the keys"
            );
            let forged = signed("1 AES128 HEX:ffffffffffffffffffffffffffffffff", 1);
            let outcomes: Vec<Outcome> = (0..4)
                .map(|_| ask(&port, &mut state, "10.0.3.1", &forged).0)
                .collect();
            // A burst of 2 within the client's rate, but one refusal per network per 2 s:
            // the second crypto-NAK is withheld.
            assert_eq!(
                outcomes[..2],
                [Outcome::MacNak, Outcome::MacFailed],
                "burst of 2, one crypto-NAK"
            );
            assert!(
                outcomes[2..]
                    .iter()
                    .all(|o| matches!(o, Outcome::RateLimited { .. })),
                "{outcomes:?}"
            );
            // A crypto-NAK is never longer than the forged request that caused it.
            assert!(stratum_ntp::symmetric::CRYPTO_NAK_LEN < forged.len());
        }

        /// A spoofer forging MACs (and plain requests, on a port that requires keys) from
        /// 96,000 allowed addresses over 60 s: every forgery is refused, the
        /// crypto-NAKs and DENYs it earns stay within the tenant's refusal budget (so the
        /// port reflects no more than 20 a second, whatever the flood), and a real device
        /// signing with the right key every second is served signed throughout.
        #[test]
        fn a_spoofed_flood_earns_refusals_only_within_the_budget_and_a_device_stays_served() {
            let port = mac_port(Some(KEYS), Unauthenticated::Deny, true);
            let mut state = PortState::new(1 << 12, 1);
            let forged = signed("1 AES128 HEX:ffffffffffffffffffffffffffffffff", 1);
            let plain = request(V4_CLIENT);
            let good = signed(KEYS, 2);
            let keys = SymmetricKeys::parse(KEYS).unwrap();
            let limit = RefusalLimit::default();
            let window = 60.0;
            let floods = 96_000u32;
            let mut refusals = 0u32;
            let mut per_network: std::collections::HashMap<[u8; 3], Vec<f64>> = Default::default();
            let mut device_served = 0;
            let mut mac_refused = 0u32;
            for i in 0..floods {
                let at = window * f64::from(i) / f64::from(floods);
                let received_at = now().add_nanos((at * 1e9) as i64);
                // 10.16.0.0/12 and up: allowed, never the deny list's 10.9/16.
                let octets = (0x0A10_0000u32 + i * 7).to_be_bytes();
                let source = std::net::Ipv4Addr::from(octets).to_string();
                let bytes = if i % 2 == 0 { &forged[..] } else { &plain[..] };
                let mut out = [0u8; 1024];
                let mut seal = None;
                let request = Request {
                    source: source.parse().unwrap(),
                    bytes,
                    truncated: false,
                    received_at,
                };
                let (outcome, len) = handle_request_sealing(
                    &port,
                    &mut state,
                    &synced(),
                    request,
                    &mut out,
                    &mut seal,
                );
                assert!(seal.is_none(), "a forgery was sealed: {outcome:?}");
                if matches!(outcome, Outcome::MacNak | Outcome::MacFailed) {
                    mac_refused += 1;
                }
                assert!(
                    matches!(
                        outcome,
                        Outcome::MacNak | Outcome::MacFailed | Outcome::Unauthenticated { .. }
                    ),
                    "{outcome:?}"
                );
                if len > 0 {
                    refusals += 1;
                    per_network
                        .entry([octets[0], octets[1], octets[2]])
                        .or_default()
                        .push(at);
                }
                // The device, once a second.
                if i % (floods / 60) == 0 {
                    let request = Request {
                        source: "10.0.7.7".parse().unwrap(),
                        bytes: &good,
                        truncated: false,
                        received_at,
                    };
                    let mut seal = None;
                    let (outcome, len) = handle_request_sealing(
                        &port,
                        &mut state,
                        &synced(),
                        request,
                        &mut out,
                        &mut seal,
                    );
                    assert_eq!(outcome, Outcome::Served, "the device at {at:.1} s");
                    let Some(Seal::Mac(mac)) = seal else {
                        panic!("the device's reply is not signed");
                    };
                    let len = mac.keys.sign(mac.key_id, &mut out, len).unwrap();
                    let view = Packet::parse(&out[..len]).unwrap();
                    assert_eq!(
                        keys.check(&out[..len], view.mac),
                        MacCheck::Valid { key_id: 2 }
                    );
                    device_served += 1;
                }
            }
            assert_eq!(device_served, 60);
            let budget = limit.burst + limit.per_second * window;
            assert!(
                f64::from(refusals) <= budget && refusals > 0,
                "{refusals} refusals, budget {budget}"
            );
            for (network, times) in &per_network {
                for pair in times.windows(2) {
                    assert!(
                        pair[1] - pair[0] >= limit.source_interval - 1e-6,
                        "two refusals to {network:?} within {} s",
                        limit.source_interval
                    );
                }
            }
            assert_eq!(mac_refused, floods / 2, "every forged MAC refused");
            eprintln!(
                "{floods} forgeries in {window} s: {refusals} refusals sent (budget {budget}), \
                 the device served {device_served} times"
            );
        }
    }
}
