//! Bounded per-client rate limiting and per-tenant budgets for the server hot path.
//!
//! The client table is a fixed array of 4-way buckets indexed by a keyed hash of
//! (tenant, address): memory is set at construction and never grows, whatever the number of
//! source addresses. A miss evicts the bucket's least recently seen entry, so a flood of
//! spoofed sources can only make victims look new (full burst), never block them. Over-limit
//! packets are still answered with probability 2^-leak (chrony's leak), so an attacker who
//! spoofs a victim's address cannot silence the victim completely.

use crate::time::ClockTime;
use serde::{Deserialize, Serialize};

const WAYS: usize = 4;

/// Token bucket per client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ClientRateLimit {
    /// Average seconds between answered requests (chrony `interval`, default 2^3 s).
    pub interval: f64,
    /// Requests answered back to back (chrony `burst`).
    pub burst: u16,
    /// Answer 1 in 2^leak over-limit requests anyway (chrony `leak`, default 2).
    pub leak_log2: u8,
    /// Send KoD RATE (at most once per interval per client) instead of dropping silently.
    pub kod: bool,
}

impl Default for ClientRateLimit {
    fn default() -> Self {
        Self {
            interval: 8.0,
            burst: 8,
            leak_log2: 2,
            kod: false,
        }
    }
}

/// Token bucket for a whole tenant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TenantBudget {
    pub packets_per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    Allow,
    /// Over the client's limit and not leaked; `kod` when a KoD RATE is due.
    Limited {
        kod: bool,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    /// Hash of (tenant, address); 0 marks an empty slot (a real 0 hash is remapped).
    tag: u64,
    last_seen_ns: i64,
    last_kod_ns: i64,
    tokens: f32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ns: i64,
}

/// Mutable rate-limit state; one per server worker (or shared behind a lock).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    entries: Box<[Entry]>,
    set_mask: usize,
    key: [u64; 2],
    rng_state: u64,
    tenants: Vec<Option<Bucket>>,
}

fn fold_mix(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl RateLimiter {
    /// A table of at least `capacity` clients (rounded up to a power of two, min 4 × 1).
    /// `seed` keys the hash so attackers cannot aim collisions at a victim.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let sets = (capacity.max(WAYS) / WAYS).next_power_of_two();
        Self {
            entries: vec![Entry::default(); sets * WAYS].into_boxed_slice(),
            set_mask: sets - 1,
            key: [
                fold_mix(seed ^ 0x9E37_79B9_7F4A_7C15, 0xD6E8_FEB8_6659_FD93),
                fold_mix(
                    seed.rotate_left(29) ^ 0xA076_1D64_78BD_642F,
                    0xE703_7ED1_A0B4_28DB,
                ),
            ],
            rng_state: seed | 1,
            tenants: Vec::new(),
        }
    }

    /// Client slots (fixed for the table's life).
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Slots currently holding a client.
    pub fn occupied(&self) -> usize {
        self.entries.iter().filter(|e| e.tag != 0).count()
    }

    fn hash(&self, tenant: u32, address: u128) -> u64 {
        let high = fold_mix((address >> 64) as u64 ^ self.key[0], 0x9E37_79B9_7F4A_7C15);
        let low = fold_mix(
            address as u64 ^ self.key[1] ^ u64::from(tenant),
            0xC2B2_AE3D_27D4_EB4F,
        );
        fold_mix(high ^ low.rotate_left(32), self.key[0] | 1).max(1)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap, and only decides which over-limit packets leak.
        let mut x = self.rng_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng_state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Charges one request from `address` on `tenant` at `now` against its bucket.
    pub fn check_client(
        &mut self,
        tenant: u32,
        address: u128,
        now: ClockTime,
        limit: &ClientRateLimit,
    ) -> RateVerdict {
        let tag = self.hash(tenant, address);
        let set = (tag as usize) & self.set_mask;
        let ways = &mut self.entries[set * WAYS..set * WAYS + WAYS];
        let now_ns = now.unix_nanos();
        let burst = f32::from(limit.burst.max(1));
        let index = match ways.iter().position(|e| e.tag == tag) {
            Some(i) => i,
            None => {
                let victim = ways
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| if e.tag == 0 { i64::MIN } else { e.last_seen_ns })
                    .map_or(0, |(i, _)| i);
                ways[victim] = Entry {
                    tag,
                    last_seen_ns: now_ns,
                    last_kod_ns: i64::MIN,
                    tokens: burst,
                };
                victim
            }
        };
        let entry = &mut ways[index];
        let elapsed = (now_ns.saturating_sub(entry.last_seen_ns)).max(0) as f64 * 1e-9;
        let refill = (elapsed / limit.interval.max(1e-3)) as f32;
        entry.tokens = (entry.tokens + refill).min(burst);
        entry.last_seen_ns = now_ns;
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            return RateVerdict::Allow;
        }
        // The leak is decided first: a leaked request is answered normally, so it must not
        // spend the interval's KoD, which belongs to the next request actually refused.
        let leak_mask = (1u64 << limit.leak_log2.min(63)) - 1;
        if limit.leak_log2 > 0 && self.next_random() & leak_mask == 0 {
            return RateVerdict::Allow;
        }
        let entry = &mut self.entries[set * WAYS + index];
        let interval_ns = (limit.interval * 1e9) as i64;
        let kod_due = limit.kod && now_ns.saturating_sub(entry.last_kod_ns) >= interval_ns;
        if kod_due {
            entry.last_kod_ns = now_ns;
        }
        RateVerdict::Limited { kod: kod_due }
    }

    /// Charges one packet against the tenant's budget; `true` when within budget.
    pub fn check_tenant(&mut self, tenant: u32, now: ClockTime, budget: &TenantBudget) -> bool {
        let index = tenant as usize;
        if self.tenants.len() <= index {
            // Grows with the number of configured tenants only, never with traffic.
            self.tenants.resize(index + 1, None);
        }
        let now_ns = now.unix_nanos();
        let bucket = self.tenants[index].get_or_insert(Bucket {
            tokens: budget.burst,
            last_ns: now_ns,
        });
        let elapsed = now_ns.saturating_sub(bucket.last_ns).max(0) as f64 * 1e-9;
        bucket.tokens = (bucket.tokens + elapsed * budget.packets_per_second).min(budget.burst);
        bucket.last_ns = now_ns;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: f64) -> ClockTime {
        ClockTime::from_secs_f64(1000.0 + secs)
    }

    #[test]
    fn burst_is_answered_then_the_client_is_limited_and_recovers() {
        let mut limiter = RateLimiter::new(64, 9);
        let limit = ClientRateLimit {
            leak_log2: 0,
            ..ClientRateLimit::default()
        };
        for _ in 0..8 {
            assert_eq!(
                limiter.check_client(0, 42, t(0.0), &limit),
                RateVerdict::Allow
            );
        }
        assert_eq!(
            limiter.check_client(0, 42, t(0.0), &limit),
            RateVerdict::Limited { kod: false }
        );
        assert_eq!(
            limiter.check_client(0, 42, t(8.0), &limit),
            RateVerdict::Allow
        );
    }

    #[test]
    fn leak_answers_about_a_quarter_of_over_limit_requests() {
        let mut limiter = RateLimiter::new(64, 11);
        let limit = ClientRateLimit::default();
        let answered = (0..4000)
            .filter(|_| limiter.check_client(0, 7, t(0.0), &limit) == RateVerdict::Allow)
            .count();
        assert!((900..1200).contains(&answered), "answered {answered}");
    }

    #[test]
    fn kod_rate_is_sent_at_most_once_per_interval() {
        let mut limiter = RateLimiter::new(64, 5);
        let limit = ClientRateLimit {
            burst: 1,
            leak_log2: 0,
            kod: true,
            ..ClientRateLimit::default()
        };
        assert_eq!(
            limiter.check_client(1, 3, t(0.0), &limit),
            RateVerdict::Allow
        );
        assert_eq!(
            limiter.check_client(1, 3, t(0.1), &limit),
            RateVerdict::Limited { kod: true }
        );
        assert_eq!(
            limiter.check_client(1, 3, t(0.2), &limit),
            RateVerdict::Limited { kod: false }
        );
    }

    #[test]
    fn a_leaked_answer_does_not_use_up_the_intervals_kod() {
        // With leak on, an over-limit request may be answered anyway; that answer must not
        // spend the interval's KoD RATE, or about a quarter of the intervals of a limited
        // client would end without one. Intervals are 10 s apart (> the 8 s KoD interval),
        // each with 20 over-limit requests: every interval must carry exactly one KoD.
        let mut limiter = RateLimiter::new(64, 13);
        let limit = ClientRateLimit {
            burst: 1,
            leak_log2: 2,
            kod: true,
            ..ClientRateLimit::default()
        };
        let (mut kods, mut leaked, mut over_limit) = (0, 0, 0);
        for interval in 0..200 {
            for i in 0..20 {
                let now = t(f64::from(interval) * 10.0 + f64::from(i) * 1e-3);
                match limiter.check_client(1, 9, now, &limit) {
                    RateVerdict::Limited { kod } => kods += usize::from(kod),
                    // The refilled token answers the first request of each interval.
                    RateVerdict::Allow if i == 0 => continue,
                    RateVerdict::Allow => leaked += 1,
                }
                over_limit += 1;
            }
        }
        assert_eq!(kods, 200, "one KoD RATE per interval");
        // The leak still answers about 1 in 4 of the over-limit requests.
        let fraction = f64::from(leaked) / f64::from(over_limit);
        assert!((0.2..0.3).contains(&fraction), "leaked {fraction}");
    }

    #[test]
    fn tenant_budget_caps_the_aggregate_rate() {
        let mut limiter = RateLimiter::new(64, 5);
        let budget = TenantBudget {
            packets_per_second: 10.0,
            burst: 10.0,
        };
        let served = (0..100)
            .filter(|i| limiter.check_tenant(2, t(f64::from(*i) * 0.01), &budget))
            .count();
        // 10 of burst plus ~10/s over one second.
        assert!((18..=21).contains(&served), "served {served}");
    }
}
