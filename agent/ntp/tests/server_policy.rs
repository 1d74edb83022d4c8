//! Must-show 7: the prefix trie agrees with a brute-force oracle on 100k prefixes, and the
//! client table stays bounded under 10^6 distinct sources.
#![allow(clippy::unwrap_used)]

use ipnet::IpNet;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use stratum_ntp::server::{
    ClientRateLimit, Decision, DropReason, PrefixTrie, RateLimiter, RefusalLimit, ServerPolicy,
    TenantConfig,
};
use stratum_ntp::time::ClockTime;

fn random_prefix(rng: &mut StdRng) -> IpNet {
    if rng.random_bool(0.7) {
        let len = if rng.random_bool(0.05) {
            rng.random_range(0..8)
        } else {
            rng.random_range(8..=32)
        };
        IpNet::new(IpAddr::V4(Ipv4Addr::from(rng.random::<u32>())), len)
            .unwrap()
            .trunc()
    } else {
        let len = if rng.random_bool(0.05) {
            rng.random_range(0..16)
        } else {
            rng.random_range(16..=128)
        };
        IpNet::new(IpAddr::V6(Ipv6Addr::from(rng.random::<u128>())), len)
            .unwrap()
            .trunc()
    }
}

/// An address inside `net` with random host bits.
fn address_in(net: &IpNet, rng: &mut StdRng) -> IpAddr {
    match net {
        IpNet::V4(v4) => {
            let host_bits = 32 - u32::from(v4.prefix_len());
            let host = if host_bits == 0 {
                0
            } else {
                rng.random::<u32>() >> (32 - host_bits)
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4.network()) | host))
        }
        IpNet::V6(v6) => {
            let host_bits = 128 - u32::from(v6.prefix_len());
            let host = if host_bits == 0 {
                0
            } else {
                rng.random::<u128>() >> (128 - host_bits)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6.network()) | host))
        }
    }
}

/// The oracle: try every prefix length from longest to shortest in a map of exact prefixes.
fn oracle(map: &HashMap<IpNet, u32>, addr: IpAddr) -> Option<u32> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (0..=max)
        .rev()
        .find_map(|len| map.get(&IpNet::new(addr, len).unwrap().trunc()).copied())
}

fn check_against_oracle(
    seed: u64,
    prefixes: usize,
    queries: usize,
    wide_root: bool,
) -> Result<(), TestCaseError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut trie = if wide_root {
        PrefixTrie::with_expected_len(prefixes.max(stratum_ntp::server::trie::WIDE_ROOT_THRESHOLD))
    } else {
        PrefixTrie::new()
    };
    let mut map = HashMap::new();
    let mut inserted = Vec::with_capacity(prefixes);
    for value in 0..prefixes as u32 {
        let net = random_prefix(&mut rng);
        trie.insert(net, value);
        map.insert(net, value);
        inserted.push(net);
    }
    for _ in 0..queries {
        let addr = if rng.random_bool(0.5) {
            let net = inserted[rng.random_range(0..inserted.len())];
            address_in(&net, &mut rng)
        } else if rng.random_bool(0.7) {
            IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
        } else {
            IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
        };
        prop_assert_eq!(trie.lookup(addr), oracle(&map, addr), "address {}", addr);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2, ..ProptestConfig::default() })]

    #[test]
    fn trie_with_100k_prefixes_matches_the_brute_force_oracle(seed in any::<u64>()) {
        check_against_oracle(seed, 100_000, 5_000, true)?;
    }
}

proptest! {
    #[test]
    fn small_tries_match_the_oracle(
        seed in any::<u64>(),
        prefixes in 1usize..300,
        wide_root in any::<bool>(),
    ) {
        check_against_oracle(seed, prefixes, 300, wide_root)?;
    }
}

fn open_tenant(limit: ClientRateLimit) -> TenantConfig {
    TenantConfig {
        name: "open".into(),
        allow: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        allow_except: Vec::new(),
        deny: Vec::new(),
        kod_not_allowed: false,
        client_rate_limit: Some(limit),
        budget: None,
        max_root_distance: None,
        refusals: RefusalLimit::default(),
    }
}

#[test]
fn client_table_never_grows_past_its_bound_under_a_million_sources() {
    let policy = ServerPolicy::new(&[open_tenant(ClientRateLimit::default())]);
    let mut limiter = RateLimiter::new(4096, 42);
    let capacity = limiter.capacity();
    let start = ClockTime::from_unix_secs(1_700_000_000);
    let mut served = 0u32;
    for i in 0..1_000_000u32 {
        let src = if i % 4 == 0 {
            IpAddr::V6(Ipv6Addr::from(
                u128::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))
        };
        let now = start.add_nanos(i64::from(i) * 1_000);
        if policy.decide(&mut limiter, 0, src, now) == Decision::Serve {
            served += 1;
        }
    }
    assert_eq!(limiter.capacity(), capacity);
    assert!(limiter.occupied() <= capacity);
    // Every source is new, so every first request is within its burst.
    assert_eq!(served, 1_000_000);
}

#[test]
fn spoofed_flood_cannot_fully_block_the_victim() {
    let limit = ClientRateLimit::default();
    let policy = ServerPolicy::new(&[open_tenant(limit)]);
    let mut limiter = RateLimiter::new(4096, 3);
    let victim: IpAddr = "192.0.2.10".parse().unwrap();
    let start = ClockTime::from_unix_secs(1_700_000_000);
    let mut victim_served = 0;
    let mut victim_requests = 0;
    for ms in 0..200_000i64 {
        let now = start.add_nanos(ms * 1_000_000);
        // The attacker spoofs the victim at 1000 packets per second ...
        let _ = policy.decide(&mut limiter, 0, victim, now);
        // ... while the victim itself polls every 16 s.
        if ms % 16_000 == 0 {
            victim_requests += 1;
            if policy.decide(&mut limiter, 0, victim, now) == Decision::Serve {
                victim_served += 1;
            }
        }
    }
    assert!(
        victim_served >= 1,
        "victim served {victim_served} of {victim_requests}"
    );
    let flood_served = (0..1000)
        .filter(|i| {
            policy.decide(
                &mut limiter,
                0,
                victim,
                start.add_secs(300.0 + f64::from(*i) * 1e-3),
            ) == Decision::Serve
        })
        .count();
    // Leak answers about 1 in 4 over-limit requests, no more.
    assert!((150..=350).contains(&flood_served), "{flood_served}");
}

#[test]
fn unknown_tenant_port_is_ignored() {
    let policy = ServerPolicy::new(&[open_tenant(ClientRateLimit::default())]);
    let mut limiter = RateLimiter::new(64, 1);
    let src: IpAddr = "192.0.2.1".parse().unwrap();
    assert_eq!(
        policy.decide(&mut limiter, 9, src, ClockTime::EPOCH),
        Decision::Drop(DropReason::UnknownTenant)
    );
}
