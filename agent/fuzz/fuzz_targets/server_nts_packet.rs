//! The per-packet path of an NTS tenant's port on arbitrary datagrams: the allow list and rate
//! limits first, then the NTS fields. Never panics; every answer is at most as long as its
//! request (no amplification, NTS replies included); a NAK is a KoD NTSN echoing the request's
//! identifier; a reply is sealed only for a request that authenticated under the session keys
//! the test's cookies carry, and then it verifies under them; a plain request is never served
//! when the tenant requires NTS.
//!
//! The ports have symmetric keys too (a tenant may offer both): a reply is signed only for a
//! request whose MAC verified, with the same key, and verifies under it; a failed MAC gets a
//! crypto-NAK (no time) and never a plain answer.
//!
//! Half the inputs are datagrams as they come; in the other half the input chooses how to
//! build a valid NTS request (whose cookie: this tenant's, another tenant's, a retired key's;
//! how many placeholders) or a signed one (whose key: this tenant's, a wrong one, an unknown
//! id) and which byte of it to flip, so the checks past the authenticator and the MAC are
//! reached without a seed corpus.
#![no_main]

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use stratum_agent::server::path::{PortPolicy, PortState, Request, handle_request_sealing};
use stratum_agent::server::stats::{Outcome, TenantStats};
use stratum_agent::server::path::Seal;
use stratum_agent::server::tenants::{PortNts, PortRules, PortSymmetric, core_tenant};
use stratum_api::agent_config::{RateLimitConfig, TenantConfig, Unauthenticated};
use stratum_ntp::nts::ef::verify_response;
use stratum_ntp::nts::{AeadKey, CookieKeys, MasterKey, SessionKeys};
use stratum_ntp::packet::{KissCode, LeapIndicator, Packet, ReferenceId};
use stratum_ntp::server::ServerClockState;
use stratum_ntp::symmetric::{MacCheck, SymmetricKeys, is_crypto_nak};
use stratum_ntp::time::{ClockTime, NtpTimestamp};

/// The session keys every cookie of the corpus carries.
fn session() -> SessionKeys {
    SessionKeys {
        c2s: AeadKey::from_bytes([0x11; 32]),
        s2c: AeadKey::from_bytes([0x22; 32]),
    }
}

fn keys() -> CookieKeys {
    CookieKeys::new(
        MasterKey {
            id: 2,
            key: AeadKey::from_bytes([0x33; 32]),
        },
        Some(MasterKey {
            id: 1,
            key: AeadKey::from_bytes([0x44; 32]),
        }),
    )
}

/// The tenant's symmetric keys.
const TENANT_KEYS: &str = "1 AES128 HEX:000102030405060708090a0b0c0d0e0f\n2 SHA1 ASCII:sha1-key\n3 MD5 ASCII:md5-key\n";

fn tenant_keys() -> SymmetricKeys {
    SymmetricKeys::parse(TENANT_KEYS).expect("static")
}

fn port(unauthenticated: Unauthenticated) -> PortPolicy {
    let config = TenantConfig {
        id: "ns/fuzz".into(),
        port: 12300,
        allowed: vec!["10.0.0.0/8".parse().expect("static")],
        allowed_sets: vec![],
        denied: vec!["10.2.0.0/16".parse().expect("static")],
        rate_limit: RateLimitConfig {
            client_interval_seconds: 1.0,
            client_burst: 4,
            tenant_requests_per_second: Some(1000),
            tenant_burst: Some(2000),
            kiss_of_death: true,
        },
        max_root_distance_seconds: None,
        nts: None,
        symmetric_keys: None,
    };
    PortPolicy::with_rules(
        PortRules {
            core: core_tenant(&config),
            nts: Some(PortNts {
                keys: Some(Arc::new(keys().bound_to(b"ns/fuzz"))),
                unauthenticated,
            }),
            symmetric: Some(PortSymmetric {
                keys: Some(Arc::new(tenant_keys())),
                unauthenticated,
                crypto_nak: true,
            }),
        },
        Arc::new(TenantStats::new("ns/fuzz".into(), 1)),
    )
}

fn ports() -> &'static [PortPolicy; 3] {
    static PORTS: OnceLock<[PortPolicy; 3]> = OnceLock::new();
    PORTS.get_or_init(|| {
        [
            port(Unauthenticated::Serve),
            port(Unauthenticated::Deny),
            port(Unauthenticated::Ignore),
        ]
    })
}

thread_local! {
    static STATE: RefCell<PortState> = RefCell::new(PortState::new(64, 7));
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (meta, rest) = data.split_at(4);
    let built;
    let datagram = if meta[0] & 0x80 == 0 {
        rest
    } else if meta[0] & 0x40 == 0 {
        built = build_request(rest);
        built.as_slice()
    } else {
        built = build_signed(rest);
        built.as_slice()
    };
    let (which, unauthenticated) = match meta[0] % 3 {
        0 => (0, Unauthenticated::Serve),
        1 => (1, Unauthenticated::Deny),
        _ => (2, Unauthenticated::Ignore),
    };
    // Mostly allowed sources (10.x), sometimes a stranger.
    let source = IpAddr::V4(Ipv4Addr::new(if meta[1] < 240 { 10 } else { 192 }, meta[1], meta[2], meta[3]));
    let now = ClockTime::from_unix_secs(1_700_000_000);
    let clock = ServerClockState {
        synchronized: true,
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        precision: -20,
        root_delay: 0.001,
        root_dispersion: 0.001,
        reference_id: ReferenceId(*b"GPS\0"),
        reference_time: NtpTimestamp::from_clock_time(now),
        updated_at: now,
    };
    let request = Request { source, bytes: datagram, truncated: false, received_at: now };
    let mut out = [0u8; 1024];
    let mut seal = None;
    let (outcome, len) = STATE.with(|state| {
        handle_request_sealing(&ports()[which], &mut state.borrow_mut(), &clock, request, &mut out, &mut seal)
    });
    assert!(len <= datagram.len(), "answer {len} longer than request {}", datagram.len());
    if !outcome.answered() {
        assert_eq!(len, 0);
        assert!(seal.is_none());
        return;
    }
    Packet::parse(datagram).expect("only parseable requests are answered");
    match outcome {
        Outcome::NtsNak => {
            let nak = Packet::parse(&out[..len]).expect("a NAK parses").header;
            assert_eq!((nak.stratum, nak.kiss_code()), (0, Some(KissCode::Ntsn)));
        }
        Outcome::MacNak => {
            assert!(is_crypto_nak(&out[..len]), "a crypto-NAK is a header and a zero key id");
            let header = Packet::parse(&out[..len]).expect("a NAK parses").header;
            assert_eq!(header.stratum, 0, "a crypto-NAK carries no time");
        }
        Outcome::Served | Outcome::ServedUnsynchronized => match seal {
            Some(seal) => {
                let header: [u8; 48] = out[..48].try_into().expect("a header");
                let sealed = seal.seal(&header, &mut rand::rng()).expect("a reply seals");
                assert!(sealed.len() <= datagram.len(), "sealed reply amplifies");
                match &seal {
                    Seal::Nts(nts) => {
                        verify_response(&sealed, &nts.request.unique_id, &session().s2c)
                            .expect("a sealed reply verifies under the session's keys");
                    }
                    Seal::Mac(mac) => {
                        let request = Packet::parse(datagram).expect("parsed");
                        assert_eq!(
                            tenant_keys().check(datagram, request.mac),
                            MacCheck::Valid { key_id: mac.key_id },
                            "signed a reply to a request whose MAC did not verify"
                        );
                        let reply = Packet::parse(&sealed).expect("a signed reply parses");
                        assert_eq!(
                            tenant_keys().check(&sealed, reply.mac),
                            MacCheck::Valid { key_id: mac.key_id },
                            "a signed reply does not verify under the request's key"
                        );
                    }
                }
            }
            None => {
                assert_eq!(unauthenticated, Unauthenticated::Serve, "served without NTS where it is required");
                assert!(!has_nts_fields(datagram), "an NTS request answered without NTS");
                let mac = Packet::parse(datagram).expect("parsed").mac;
                assert!(mac.is_none(), "a request with a MAC answered unsigned");
            }
        },
        Outcome::Unauthenticated { kod: true } => assert_eq!(unauthenticated, Unauthenticated::Deny),
        _ => {}
    }
});

/// Whether `datagram` carries any NTS field (what makes a request an NTS one).
fn has_nts_fields(datagram: &[u8]) -> bool {
    use stratum_ntp::nts::ef::field_type;
    Packet::parse(datagram).is_ok_and(|view| {
        view.extension_fields().any(|f| {
            matches!(
                f.field_type,
                field_type::UNIQUE_IDENTIFIER
                    | field_type::COOKIE
                    | field_type::COOKIE_PLACEHOLDER
                    | field_type::AUTHENTICATOR
            )
        })
    })
}

/// A signed request as `input` chooses it (the tenant's key 1-3, a wrong key under id 1, an id
/// the tenant lacks), then one byte flipped if it says so.
fn build_signed(input: &[u8]) -> Vec<u8> {
    let byte = |i: usize| input.get(i).copied().unwrap_or(0);
    let (keys, id) = match byte(0) % 5 {
        0 => (tenant_keys(), 1),
        1 => (tenant_keys(), 2),
        2 => (tenant_keys(), 3),
        3 => (SymmetricKeys::parse("1 AES128 HEX:ffffffffffffffffffffffffffffffff").expect("static"), 1),
        _ => (SymmetricKeys::parse("9 MD5 ASCII:other").expect("static"), 9),
    };
    let mut buffer = [0u8; 72];
    buffer[0] = 0x23;
    for (i, slot) in buffer[40..48].iter_mut().enumerate() {
        *slot = byte(1 + i);
    }
    let len = keys.sign(id, &mut buffer, 48).expect("the key exists");
    let mut datagram = buffer[..len].to_vec();
    if byte(9) & 1 == 1 {
        let at = usize::from(byte(10)) % datagram.len();
        datagram[at] ^= byte(11) | 1;
    }
    datagram
}

/// A valid NTS request as `input` chooses it, then one byte flipped if it says so.
fn build_request(input: &[u8]) -> Vec<u8> {
    use rand::SeedableRng;
    use stratum_ntp::nts::CookieJar;
    use stratum_ntp::nts::ef::ClientRequest;
    let byte = |i: usize| input.get(i).copied().unwrap_or(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(byte(0)));
    let cookie_keys = match byte(1) % 4 {
        0 | 1 => keys().bound_to(b"ns/fuzz"),
        2 => keys().bound_to(b"ns/other"),
        _ => CookieKeys::new(
            MasterKey {
                id: 9,
                key: AeadKey::from_bytes([0x99; 32]),
            },
            None,
        )
        .bound_to(b"ns/fuzz"),
    };
    // Fewer cookies in the jar asks for placeholders.
    let cookies = 1 + usize::from(byte(2) % 8);
    let mut jar = CookieJar::new(
        session(),
        (0..cookies).map(|_| cookie_keys.seal(&session(), &mut rng)).collect(),
    );
    let mut header = Packet::parse(&[0x23; 48]).expect("static").header;
    header.transmit_timestamp = NtpTimestamp::from_bits(u64::from_be_bytes([
        byte(3), byte(4), byte(5), byte(6), byte(7), byte(8), byte(9), byte(10),
    ]));
    let mut datagram = ClientRequest::build(&header, &mut jar, &mut rng)
        .expect("a cookie in the jar")
        .datagram;
    if byte(11) & 1 == 1 {
        let at = usize::from(u16::from_be_bytes([byte(12), byte(13)])) % datagram.len();
        datagram[at] ^= byte(14) | 1;
    }
    datagram
}
