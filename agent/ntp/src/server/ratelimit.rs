//! Bounded per-client rate limiting, per-tenant budgets and the refusal budget for the server
//! hot path.
//!
//! The client table is a fixed array of 4-way buckets indexed by a keyed hash of
//! (tenant, address): memory is set at construction and never grows, whatever the number of
//! source addresses. Admission protects clients with history, so a flood of spoofed sources
//! (each seen once) cannot reset an established client's bucket: a miss evicts, in order, a
//! free slot, the least recently seen entry seen only once, an entry whose bucket has refilled
//! (evicting it changes no verdict), and only then the established entry with the fewest
//! requests. So up to three busy clients per set survive any flood of newcomers. Over-limit
//! packets are still answered with probability 2^-leak (chrony's leak), so an attacker who
//! spoofs a victim's address cannot silence the victim completely.
//!
//! Refusals (KoD DENY and RATE) are budgeted apart from answers, because a refusal to a
//! spoofed source is reflection toward a victim: each tenant has a token bucket of refusals
//! ([`RefusalLimit`]), and each source prefix (IPv4 /24, IPv6 /64, so a victim's network
//! counts once however many addresses are forged in it) gets at most one refusal per
//! `source_interval`. Beyond either, the request is dropped silently.

use crate::time::ClockTime;
use serde::{Deserialize, Serialize};

const WAYS: usize = 4;

/// Refusal slots per limiter (16 bytes each). A slot holds one prefix's last refusal; with
/// the default budget at most `burst + per_second × source_interval` = 80 slots are fresh at
/// once, so a legitimate refusal rarely finds its slot taken (and then is only silent).
const REFUSAL_SLOTS: usize = 512;

/// Source prefix that shares one refusal allowance: IPv4 /24 (as IPv4-mapped, /120).
const REFUSAL_PREFIX_V4_MASK: u128 = !0u128 << 8;
/// IPv6 /64: a site's or host's whole interface-id space.
const REFUSAL_PREFIX_V6_MASK: u128 = !0u128 << 64;

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

/// How many refusals (KoD DENY and RATE, and the authentication refusals: NTS NAK,
/// crypto-NAK, DENY for a request without required authentication) a tenant's port may send.
/// A refusal beyond it is dropped silently: refusals are advice, and every one sent to a
/// spoofed source lands on someone else.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RefusalLimit {
    /// Sustained refusals per second for the tenant.
    pub per_second: f64,
    /// Refusals that may go back to back.
    pub burst: f64,
    /// Minimum seconds between two refusals to one source prefix (IPv4 /24, IPv6 /64).
    pub source_interval: f64,
}

impl Default for RefusalLimit {
    /// 20/s with a burst of 40 per tenant, one per 2 s per prefix: enough to tell every
    /// misconfigured or over-eager client within seconds, while a spoofed flood of any size
    /// reflects at most 20 small packets a second from a port, and at most one per 2 s
    /// toward any one network.
    fn default() -> Self {
        Self {
            per_second: 20.0,
            burst: 40.0,
            source_interval: 2.0,
        }
    }
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
    /// Requests charged since the entry was admitted (saturating): 1 means "seen once",
    /// which is all a spoofed source ever is.
    hits: u32,
}

impl Entry {
    /// Tokens the bucket would hold at `now_ns`, uncapped.
    fn tokens_at(&self, now_ns: i64, interval: f64) -> f64 {
        let elapsed = now_ns.saturating_sub(self.last_seen_ns).max(0) as f64 * 1e-9;
        f64::from(self.tokens) + elapsed / interval
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct RefusalSlot {
    /// Hash of (tenant, source prefix); 0 marks an empty slot.
    tag: u64,
    last_ns: i64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ns: i64,
}

impl Bucket {
    /// Refills at `rate` per second up to `burst` (a new bucket starts full), then takes one
    /// token if there is one.
    fn take(slot: &mut Option<Bucket>, now_ns: i64, rate: f64, burst: f64) -> bool {
        let bucket = slot.get_or_insert(Bucket {
            tokens: burst,
            last_ns: now_ns,
        });
        let elapsed = now_ns.saturating_sub(bucket.last_ns).max(0) as f64 * 1e-9;
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last_ns = bucket.last_ns.max(now_ns);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Mutable rate-limit state; one per server worker (or shared behind a lock).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    entries: Box<[Entry]>,
    set_mask: usize,
    key: [u64; 2],
    rng_state: u64,
    tenants: Vec<Option<Bucket>>,
    refusal_slots: Box<[RefusalSlot]>,
    refusal_buckets: Vec<Option<Bucket>>,
}

fn fold_mix(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// The refusal allowance a source shares: its /24 (IPv4-mapped keys) or /64.
fn refusal_prefix(address: u128) -> u128 {
    // ::ffff:a.b.c.d: the 96-bit prefix ::ffff:0:0/96 above the IPv4 address.
    const MAPPED_PREFIX: u128 = 0xffff;
    if address >> 32 == MAPPED_PREFIX {
        address & REFUSAL_PREFIX_V4_MASK
    } else {
        address & REFUSAL_PREFIX_V6_MASK
    }
}

/// Grows `buckets` to hold `tenant` (with the number of configured tenants, never with
/// traffic) and returns its slot.
fn tenant_slot(buckets: &mut Vec<Option<Bucket>>, tenant: u32) -> &mut Option<Bucket> {
    let index = tenant as usize;
    if buckets.len() <= index {
        buckets.resize(index + 1, None);
    }
    &mut buckets[index]
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
            refusal_slots: vec![RefusalSlot::default(); REFUSAL_SLOTS].into_boxed_slice(),
            refusal_buckets: Vec::new(),
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

    /// The way a newcomer takes: free, else seen once (least recent), else refilled (least
    /// recent), else the established entry with the fewest requests (least recent on ties).
    fn victim(ways: &[Entry], now_ns: i64, limit: &ClientRateLimit) -> usize {
        let interval = limit.interval.max(1e-3);
        let burst = f64::from(limit.burst.max(1));
        let class = |e: &Entry| -> (u8, u32, i64) {
            if e.tag == 0 {
                (0, 0, 0)
            } else if e.hits <= 1 {
                (1, 0, e.last_seen_ns)
            } else if e.tokens_at(now_ns, interval) >= burst {
                (2, 0, e.last_seen_ns)
            } else {
                (3, e.hits, e.last_seen_ns)
            }
        };
        ways.iter()
            .enumerate()
            .min_by_key(|(_, e)| class(e))
            .map_or(0, |(i, _)| i)
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
                let victim = Self::victim(ways, now_ns, limit);
                ways[victim] = Entry {
                    tag,
                    last_seen_ns: now_ns,
                    last_kod_ns: i64::MIN,
                    tokens: burst,
                    hits: 0,
                };
                victim
            }
        };
        let entry = &mut ways[index];
        let refill = entry.tokens_at(now_ns, limit.interval.max(1e-3)) - f64::from(entry.tokens);
        entry.tokens = (entry.tokens + refill as f32).min(burst);
        entry.last_seen_ns = entry.last_seen_ns.max(now_ns);
        entry.hits = entry.hits.saturating_add(1);
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
        Bucket::take(
            tenant_slot(&mut self.tenants, tenant),
            now.unix_nanos(),
            budget.packets_per_second,
            budget.burst,
        )
    }

    /// Whether a refusal (KoD) to `address` on `tenant` is within `limit` at `now`; if so it
    /// is charged to the tenant's refusal bucket and to the source's prefix. `false` means
    /// "stay silent".
    pub fn check_refusal(
        &mut self,
        tenant: u32,
        address: u128,
        now: ClockTime,
        limit: &RefusalLimit,
    ) -> bool {
        let now_ns = now.unix_nanos();
        let tag = self.hash(tenant, refusal_prefix(address));
        let slot_index = (tag as usize) & (REFUSAL_SLOTS - 1);
        let interval_ns = (limit.source_interval.max(0.0) * 1e9) as i64;
        let slot = self.refusal_slots[slot_index];
        // A slot refused recently (to this prefix, or to another that shares it) means
        // silence: collisions can only make refusals rarer, never more frequent.
        if slot.tag != 0 && now_ns.saturating_sub(slot.last_ns) < interval_ns {
            return false;
        }
        let within_budget = Bucket::take(
            tenant_slot(&mut self.refusal_buckets, tenant),
            now_ns,
            limit.per_second,
            limit.burst,
        );
        if within_budget {
            self.refusal_slots[slot_index] = RefusalSlot {
                tag,
                last_ns: now_ns,
            };
        }
        within_budget
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
    fn an_established_client_outlives_a_flood_of_newcomers_seen_once() {
        let mut limiter = RateLimiter::new(64, 21);
        let limit = ClientRateLimit {
            burst: 2,
            leak_log2: 0,
            ..ClientRateLimit::default()
        };
        let victim = 0xffff_0a00_0001;
        for _ in 0..2 {
            assert_eq!(
                limiter.check_client(0, victim, t(0.0), &limit),
                RateVerdict::Allow
            );
        }
        // 100 000 one-off sources within the victim's refill time (8 s per token).
        for i in 0..100_000u64 {
            let _ = limiter.check_client(0, 1 << 80 | u128::from(i), t(i as f64 * 1e-5), &limit);
        }
        assert_eq!(
            limiter.check_client(0, victim, t(1.0), &limit),
            RateVerdict::Limited { kod: false },
            "the victim's spent burst was kept, not reset by eviction"
        );
    }

    #[test]
    fn refusals_stay_within_the_tenant_bucket_and_one_per_prefix_interval() {
        let mut limiter = RateLimiter::new(64, 17);
        let limit = RefusalLimit {
            per_second: 10.0,
            burst: 5.0,
            source_interval: 2.0,
        };
        let v4 = |a: u32| 0xffff_0000_0000 | u128::from(a);
        // One prefix: the first refusal, then silence for 2 s whatever the address in the /24.
        assert!(limiter.check_refusal(0, v4(0xC000_0201), t(0.0), &limit));
        assert!(!limiter.check_refusal(0, v4(0xC000_0202), t(1.9), &limit));
        assert!(limiter.check_refusal(0, v4(0xC000_02FE), t(2.0), &limit));
        // IPv6 counts per /64.
        let v6 = 0x2001_0db8_0000_0001_0000_0000_0000_0001u128;
        assert!(limiter.check_refusal(0, v6, t(3.0), &limit));
        assert!(!limiter.check_refusal(0, v6 ^ 0xFFFF, t(3.0), &limit));
        // Distinct prefixes: the tenant's bucket (5 + 10/s) is the bound.
        let granted = (0..10_000u32)
            .filter(|i| {
                let at = t(10.0 + f64::from(*i) * 1e-4); // 1 s
                limiter.check_refusal(1, v4(i << 8), at, &limit)
            })
            .count();
        assert!((14..=15).contains(&granted), "granted {granted}");
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
