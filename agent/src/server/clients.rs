//! A bounded log of the clients one tenant port has seen, for `stratumctl clients` (chrony's
//! `clients`): requests, drops and KoDs per address, and when it was last seen.
//!
//! Fixed memory whatever the number of sources: a 4-way set-associative table indexed by a
//! keyed hash. Admission protects clients with history: a newcomer takes, in order, a free
//! slot, the least recently seen row of a single request, a row idle for over [`STALE_NANOS`],
//! and only then the row with the fewest requests. A spoofed flood (each source seen once)
//! therefore churns through single-request rows and leaves up to three returning clients per
//! set in place. Only allowed sources are recorded (see `path`).

use std::net::{IpAddr, Ipv6Addr};

use serde::{Deserialize, Serialize};

const WAYS: usize = 4;

/// A row idle this long may give way to a newcomer: longer than the longest NTP poll
/// interval in use (2^10 s by default, 2^12 s here for margin), so a client still polling
/// is never stale.
pub const STALE_NANOS: i64 = 4096 * 1_000_000_000;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// The address as a 128-bit key (IPv4 as IPv4-mapped); `requests == 0` marks a free slot.
    address: u128,
    requests: u64,
    dropped: u64,
    kod: u64,
    last_seen_ns: i64,
}

/// What happened to one request, as far as the log cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Answered (synchronized or not).
    Answered,
    /// Not answered (rate limited, over the tenant budget, or a refusal over its budget).
    Dropped,
    /// Answered with a Kiss-o'-Death RATE.
    Kod,
}

/// One row of `stratumctl clients`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientRow {
    /// Client address (IPv4 shown as IPv4).
    pub address: IpAddr,
    /// Requests seen while in the log.
    pub requests: u64,
    /// Requests not answered.
    pub dropped: u64,
    /// Kiss-o'-Death RATE replies sent (strangers, and so DENY, are never logged).
    pub kod: u64,
    /// Last request, nanoseconds since the Unix epoch on the served clock.
    pub last_seen_unix_nanos: i64,
}

/// The bounded client log of one port.
#[derive(Clone, Debug)]
pub struct ClientLog {
    entries: Box<[Entry]>,
    set_mask: usize,
    key: u64,
}

/// IPv4 as IPv4-mapped IPv6, so both families share one key space.
pub fn address_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn address_of(key: u128) -> IpAddr {
    let v6 = Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl ClientLog {
    /// A log of at least `capacity` clients (rounded up to a power of two); `seed` keys the
    /// hash so sources cannot be chosen to collide.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let sets = (capacity.max(WAYS) / WAYS).next_power_of_two();
        Self {
            entries: vec![Entry::default(); sets * WAYS].into_boxed_slice(),
            set_mask: sets - 1,
            key: seed | 1,
        }
    }

    /// Client slots.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    fn set_of(&self, address: u128) -> usize {
        let folded = (address as u64) ^ ((address >> 64) as u64).rotate_left(17);
        let mixed = u128::from(folded ^ self.key) * 0x9E37_79B9_7F4A_7C15_u128;
        ((mixed as u64) ^ ((mixed >> 64) as u64)) as usize & self.set_mask
    }

    /// The way a newcomer takes (see the module's first lines).
    fn victim(ways: &[Entry], now_ns: i64) -> usize {
        let class = |e: &Entry| -> (u8, u64, i64) {
            if e.requests == 0 {
                (0, 0, 0)
            } else if e.requests == 1 {
                (1, 0, e.last_seen_ns)
            } else if now_ns.saturating_sub(e.last_seen_ns) > STALE_NANOS {
                (2, 0, e.last_seen_ns)
            } else {
                (3, e.requests, e.last_seen_ns)
            }
        };
        ways.iter()
            .enumerate()
            .min_by_key(|(_, e)| class(e))
            .map_or(0, |(i, _)| i)
    }

    /// Counts one request from `address` at `now_ns`.
    pub fn record(&mut self, address: u128, now_ns: i64, outcome: ClientOutcome) {
        let set = self.set_of(address);
        let ways = &mut self.entries[set * WAYS..set * WAYS + WAYS];
        let index = match ways
            .iter()
            .position(|e| e.requests > 0 && e.address == address)
        {
            Some(i) => i,
            None => {
                let victim = Self::victim(ways, now_ns);
                ways[victim] = Entry {
                    address,
                    ..Entry::default()
                };
                victim
            }
        };
        let entry = &mut ways[index];
        entry.requests = entry.requests.saturating_add(1);
        entry.last_seen_ns = entry.last_seen_ns.max(now_ns);
        match outcome {
            ClientOutcome::Answered => {}
            ClientOutcome::Dropped => entry.dropped += 1,
            ClientOutcome::Kod => entry.kod += 1,
        }
    }

    /// Clients in the log.
    pub fn occupied(&self) -> usize {
        self.entries.iter().filter(|e| e.requests > 0).count()
    }

    /// The `limit` clients with the most requests (ties: most recent first).
    pub fn top(&self, limit: usize) -> Vec<ClientRow> {
        let mut rows: Vec<&Entry> = self.entries.iter().filter(|e| e.requests > 0).collect();
        rows.sort_by(|a, b| {
            b.requests
                .cmp(&a.requests)
                .then(b.last_seen_ns.cmp(&a.last_seen_ns))
        });
        rows.into_iter()
            .take(limit)
            .map(|e| ClientRow {
                address: address_of(e.address),
                requests: e.requests,
                dropped: e.dropped,
                kod: e.kod,
                last_seen_unix_nanos: e.last_seen_ns,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> u128 {
        address_key(s.parse().unwrap())
    }

    #[test]
    fn top_clients_are_ordered_by_requests_and_show_ipv4_as_ipv4() {
        let mut log = ClientLog::new(64, 3);
        for _ in 0..5 {
            log.record(key("10.0.0.1"), 10, ClientOutcome::Answered);
        }
        log.record(key("10.0.0.1"), 11, ClientOutcome::Dropped);
        log.record(key("fd00::2"), 12, ClientOutcome::Kod);
        let top = log.top(10);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].address, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((top[0].requests, top[0].dropped), (6, 1));
        assert_eq!(top[1].address, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(top[1].kod, 1);
    }

    #[test]
    fn a_flood_of_one_off_sources_never_evicts_a_returning_client() {
        let mut log = ClientLog::new(64, 5);
        let real = key("10.0.0.1");
        log.record(real, 0, ClientOutcome::Answered);
        for i in 0..100_000u32 {
            let t = i64::from(i) * 1_000;
            log.record(
                address_key(IpAddr::V4((0x0B00_0000 + i).into())),
                t,
                ClientOutcome::Answered,
            );
            if i % 10_000 == 0 {
                log.record(real, t, ClientOutcome::Answered);
            }
        }
        let row = log
            .top(64)
            .into_iter()
            .find(|r| r.address == address_of(real));
        assert_eq!(
            row.map(|r| r.requests),
            Some(11),
            "every request of the real client counted"
        );
    }

    #[test]
    fn a_flood_of_sources_never_grows_the_log() {
        let mut log = ClientLog::new(256, 9);
        for i in 0..100_000u32 {
            log.record(
                address_key(IpAddr::V4(i.into())),
                i64::from(i),
                ClientOutcome::Dropped,
            );
        }
        assert_eq!(log.capacity(), 256);
        assert!(log.occupied() <= 256);
    }
}
