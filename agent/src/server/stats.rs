//! Per-tenant packet counters: each worker thread owns one cache-line-sized slot of atomics
//! and adds a batch's tally to it once per batch; a scrape sums the slots. No counter is
//! shared between threads, so counting costs no contention on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What happened to one packet received on a tenant port (the `outcome` label of
/// `stratum_agent_tenant_requests_total`), plus the KoD code when one was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered with the served clock, synchronized.
    Served,
    /// Answered with LI=3 / stratum 16 (not synchronized, or above the tenant's maximum root
    /// distance).
    ServedUnsynchronized,
    /// Deny list or outside the allow list; `kod` when answered with KoD DENY.
    Denied { kod: bool },
    /// Over the client's rate or the tenant's budget; `kod` when answered with KoD RATE.
    RateLimited { kod: bool },
    /// Not an NTP packet (too short, truncated, bad extension fields, unknown version).
    Malformed,
    /// An NTP packet we never answer: modes other than client (6/7 control included), or a
    /// version other than 3 and 4.
    Ignored,
    /// NTS port: the cookie did not open (expired master key, another tenant's or cluster's
    /// cookie, keys not loaded); answered with the NTS NAK (KoD NTSN) so the client re-keys.
    NtsNak,
    /// NTS port: NTS fields that are malformed or do not authenticate; not answered.
    NtsFailed,
    /// Port that requires authentication (NTS or a symmetric key): a request without it;
    /// `kod` when answered with KoD DENY.
    Unauthenticated { kod: bool },
    /// Symmetric-key port: a MAC naming an unknown key id or not verifying, answered with a
    /// crypto-NAK (the tenant sends KoDs).
    MacNak,
    /// Symmetric-key port: a MAC that fails as for [`Outcome::MacNak`], not answered.
    MacFailed,
}

impl Outcome {
    /// The same outcome with its refusal withheld (over the tenant's refusal budget): a
    /// crypto-NAK becomes a dropped MAC, an NTS NAK a dropped NTS request, a DENY silence.
    pub fn silenced(self) -> Outcome {
        match self {
            Outcome::MacNak => Outcome::MacFailed,
            Outcome::NtsNak => Outcome::NtsFailed,
            Outcome::Unauthenticated { .. } => Outcome::Unauthenticated { kod: false },
            Outcome::Denied { .. } => Outcome::Denied { kod: false },
            Outcome::RateLimited { .. } => Outcome::RateLimited { kod: false },
            other => other,
        }
    }

    /// Whether a datagram goes back.
    pub fn answered(self) -> bool {
        matches!(
            self,
            Outcome::Served
                | Outcome::ServedUnsynchronized
                | Outcome::Denied { kod: true }
                | Outcome::RateLimited { kod: true }
                | Outcome::NtsNak
                | Outcome::Unauthenticated { kod: true }
                | Outcome::MacNak
        )
    }
}

/// The `outcome` label values, in export order.
pub const OUTCOME_LABELS: [&str; 11] = [
    "served",
    "served_unsynchronized",
    "denied",
    "rate_limited",
    "malformed",
    "ignored",
    "nts_nak",
    "nts_failed",
    "unauthenticated",
    "mac_nak",
    "mac_failed",
];

/// Outcomes whose series every tenant has from the start, at 0: the first six. The
/// authentication ones after them (only an NTS or symmetric-key tenant's port has them)
/// appear with their first count, so tenants without authentication keep eight series.
pub const ALWAYS_EXPORTED_OUTCOMES: usize = 6;

/// The `code` label values of `stratum_agent_tenant_kod_sent_total`.
pub const KOD_LABELS: [&str; 2] = ["RATE", "DENY"];

const SERVED: usize = 0;
const SERVED_UNSYNC: usize = 1;
const DENIED: usize = 2;
const RATE_LIMITED: usize = 3;
const MALFORMED: usize = 4;
const IGNORED: usize = 5;
const NTS_NAK: usize = 6;
const NTS_FAILED: usize = 7;
const UNAUTHENTICATED: usize = 8;
const MAC_NAK: usize = 9;
const MAC_FAILED: usize = 10;
/// Slots from here on count again packets already counted in an outcome slot.
const KOD_RATE: usize = 11;
const KOD_DENY: usize = 12;
/// Served replies (synchronized or not) that were NTS-authenticated.
const AUTHENTICATED: usize = 13;
/// Served replies (synchronized or not) signed with a symmetric key.
const MAC_AUTHENTICATED: usize = 14;
const SLOTS: usize = 15;

/// How a served reply was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// NTS (RFC 8915).
    Nts,
    /// A symmetric key (RFC 8573 or a legacy digest).
    SymmetricKey,
}

/// A worker's running tally for one batch (plain integers, flushed once per batch).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally([u64; SLOTS]);

impl Tally {
    /// Counts one packet.
    pub fn record(&mut self, outcome: Outcome) {
        let (slot, kod) = match outcome {
            Outcome::Served => (SERVED, None),
            Outcome::ServedUnsynchronized => (SERVED_UNSYNC, None),
            Outcome::Denied { kod } => (DENIED, kod.then_some(KOD_DENY)),
            Outcome::RateLimited { kod } => (RATE_LIMITED, kod.then_some(KOD_RATE)),
            Outcome::Malformed => (MALFORMED, None),
            Outcome::Ignored => (IGNORED, None),
            Outcome::NtsNak => (NTS_NAK, None),
            Outcome::NtsFailed => (NTS_FAILED, None),
            Outcome::Unauthenticated { kod } => (UNAUTHENTICATED, kod.then_some(KOD_DENY)),
            Outcome::MacNak => (MAC_NAK, None),
            Outcome::MacFailed => (MAC_FAILED, None),
        };
        self.0[slot] += 1;
        if let Some(kod) = kod {
            self.0[kod] += 1;
        }
    }

    /// Counts one served reply as authenticated too (it was counted as served already).
    pub fn record_authenticated(&mut self, method: AuthMethod) {
        let slot = match method {
            AuthMethod::Nts => AUTHENTICATED,
            AuthMethod::SymmetricKey => MAC_AUTHENTICATED,
        };
        self.0[slot] += 1;
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }
}

/// One worker's counters; aligned so two workers never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerCounters([AtomicU64; SLOTS]);

impl WorkerCounters {
    /// Adds a batch's tally and clears it.
    pub fn flush(&self, tally: &mut Tally) {
        for (counter, n) in self.0.iter().zip(tally.0.iter_mut()) {
            if *n > 0 {
                counter.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
    }
}

/// Totals of one tenant across workers, as `stratumctl serverstats` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantTotals {
    /// Every packet received on the tenant's port.
    pub received: u64,
    /// Answered, synchronized.
    pub served: u64,
    /// Answered with LI=3 / stratum 16.
    pub served_unsynchronized: u64,
    /// Deny list or not allowed.
    pub denied: u64,
    /// Over a rate limit.
    pub rate_limited: u64,
    /// Not NTP.
    pub malformed: u64,
    /// NTP we never answer (control modes, symmetric, broadcast).
    pub ignored: u64,
    /// KoD RATE sent.
    pub kod_rate: u64,
    /// KoD DENY sent.
    pub kod_deny: u64,
    /// NTS NAKs sent (cookie not accepted).
    #[serde(default)]
    pub nts_nak: u64,
    /// NTS requests dropped: malformed NTS fields or a failed authenticator.
    #[serde(default)]
    pub nts_failed: u64,
    /// Requests without NTS refused by a tenant that requires it.
    #[serde(default)]
    pub unauthenticated: u64,
    /// Served replies that were NTS-authenticated (part of `served` and
    /// `servedUnsynchronized`).
    #[serde(default)]
    pub authenticated: u64,
    /// Crypto-NAKs sent (a MAC with an unknown key id or that did not verify).
    #[serde(default)]
    pub mac_nak: u64,
    /// Requests with such a MAC, not answered.
    #[serde(default)]
    pub mac_failed: u64,
    /// Served replies signed with a symmetric key (part of `served` and
    /// `servedUnsynchronized`).
    #[serde(default)]
    pub mac_authenticated: u64,
}

impl TenantTotals {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &TenantTotals) {
        self.received += other.received;
        self.served += other.served;
        self.served_unsynchronized += other.served_unsynchronized;
        self.denied += other.denied;
        self.rate_limited += other.rate_limited;
        self.malformed += other.malformed;
        self.ignored += other.ignored;
        self.kod_rate += other.kod_rate;
        self.kod_deny += other.kod_deny;
        self.nts_nak += other.nts_nak;
        self.nts_failed += other.nts_failed;
        self.unauthenticated += other.unauthenticated;
        self.authenticated += other.authenticated;
        self.mac_nak += other.mac_nak;
        self.mac_failed += other.mac_failed;
        self.mac_authenticated += other.mac_authenticated;
    }

    /// Values in [`OUTCOME_LABELS`] order.
    pub fn outcomes(&self) -> [u64; 11] {
        [
            self.served,
            self.served_unsynchronized,
            self.denied,
            self.rate_limited,
            self.malformed,
            self.ignored,
            self.nts_nak,
            self.nts_failed,
            self.unauthenticated,
            self.mac_nak,
            self.mac_failed,
        ]
    }

    /// Values in [`KOD_LABELS`] order.
    pub fn kods(&self) -> [u64; 2] {
        [self.kod_rate, self.kod_deny]
    }
}

/// The counters of one tenant: one slot per worker thread.
#[derive(Debug)]
pub struct TenantStats {
    /// Tenant id (`namespace/name`, or the peer pseudo-tenant).
    pub id: String,
    workers: Box<[WorkerCounters]>,
}

impl TenantStats {
    /// Counters for `workers` worker threads.
    pub fn new(id: String, workers: usize) -> Self {
        Self {
            id,
            workers: (0..workers.max(1))
                .map(|_| WorkerCounters::default())
                .collect(),
        }
    }

    /// Worker `index`'s slot (indices past the end share the last slot).
    pub fn worker(&self, index: usize) -> &WorkerCounters {
        let last = self.workers.len() - 1;
        &self.workers[index.min(last)]
    }

    /// Sums every worker's slot.
    pub fn totals(&self) -> TenantTotals {
        let mut sum = [0u64; SLOTS];
        for worker in self.workers.iter() {
            for (total, counter) in sum.iter_mut().zip(worker.0.iter()) {
                *total += counter.load(Ordering::Relaxed);
            }
        }
        TenantTotals {
            received: sum[..KOD_RATE].iter().sum(),
            served: sum[SERVED],
            served_unsynchronized: sum[SERVED_UNSYNC],
            denied: sum[DENIED],
            rate_limited: sum[RATE_LIMITED],
            malformed: sum[MALFORMED],
            ignored: sum[IGNORED],
            kod_rate: sum[KOD_RATE],
            kod_deny: sum[KOD_DENY],
            nts_nak: sum[NTS_NAK],
            nts_failed: sum[NTS_FAILED],
            unauthenticated: sum[UNAUTHENTICATED],
            authenticated: sum[AUTHENTICATED],
            mac_nak: sum[MAC_NAK],
            mac_failed: sum[MAC_FAILED],
            mac_authenticated: sum[MAC_AUTHENTICATED],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_counts_once_as_received_and_kods_also_by_code() {
        let stats = TenantStats::new("ns/t".into(), 2);
        let mut tally = Tally::default();
        for outcome in [
            Outcome::Served,
            Outcome::ServedUnsynchronized,
            Outcome::Denied { kod: true },
            Outcome::Denied { kod: false },
            Outcome::RateLimited { kod: true },
            Outcome::Malformed,
            Outcome::Ignored,
            Outcome::NtsNak,
            Outcome::NtsFailed,
            Outcome::Unauthenticated { kod: true },
            Outcome::Unauthenticated { kod: false },
            Outcome::MacNak,
            Outcome::MacFailed,
        ] {
            tally.record(outcome);
        }
        stats.worker(0).flush(&mut tally);
        assert!(tally.is_empty());
        tally.record(Outcome::Served);
        tally.record_authenticated(AuthMethod::Nts);
        tally.record(Outcome::Served);
        tally.record_authenticated(AuthMethod::SymmetricKey);
        stats.worker(1).flush(&mut tally);
        let totals = stats.totals();
        assert_eq!(totals.received, 15, "authenticated is not a second receipt");
        assert_eq!(totals.outcomes(), [3, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]);
        assert_eq!(totals.kods(), [1, 2], "a DENY for a missing NTS is a DENY");
        assert_eq!((totals.authenticated, totals.mac_authenticated), (1, 1));
        assert!(Outcome::MacNak.answered() && !Outcome::MacFailed.answered());
    }
}
