//! Tenant port allocation. A pure function of all tenants of one TimeService, so every pass and
//! every operator restart computes the same assignment: a tenant keeps the port recorded in its
//! status while that port is still in range and nobody older holds it; collisions go to the
//! oldest tenant (creationTimestamp, then namespace/name); everyone else gets the lowest free
//! port, in the same age order.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::jiff::Timestamp;

/// `(namespace, name)` of a TenantTimePolicy.
pub type TenantKey = (String, String);

/// What allocation needs to know about one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortClaim {
    /// The tenant.
    pub key: TenantKey,
    /// Its creationTimestamp (absent counts as newest).
    pub created: Option<Timestamp>,
    /// The port recorded in its status, if any.
    pub current: Option<i32>,
}

/// Age order: oldest first; claims without a timestamp after every timestamped one.
type Age = (bool, Option<Timestamp>, TenantKey);

fn age(claim: &PortClaim) -> Age {
    (claim.created.is_none(), claim.created, claim.key.clone())
}

/// Allocates a port in `start..=end` (minus `reserved`) to every claim; `None` when the range is
/// exhausted.
pub fn allocate(
    start: i32,
    end: i32,
    reserved: Option<u16>,
    claims: &[PortClaim],
) -> BTreeMap<TenantKey, Option<u16>> {
    Allocation::with_claims(start, end, reserved, claims).ports
}

/// The allocation of one TimeService's range, kept up to date claim by claim. The result is
/// always what [`allocate`] computes from all claims; the common changes (a restart listing
/// tenants with their recorded ports, a new tenant, the operator recording a port) cost
/// O(log n), anything else a full O(n log n) recomputation.
#[derive(Clone, Debug)]
pub struct Allocation {
    start: i32,
    end: i32,
    reserved: Option<u16>,
    /// Recorded port of every claim, in age order.
    claims: BTreeMap<Age, Option<i32>>,
    ages: HashMap<TenantKey, Age>,
    /// The result.
    ports: BTreeMap<TenantKey, Option<u16>>,
    /// Every assigned port and its holder.
    holders: HashMap<u16, TenantKey>,
    /// Ports kept from status (the first pass), as opposed to handed out.
    kept: HashMap<u16, TenantKey>,
    /// Claims whose in-range recorded port is each port.
    claimants: HashMap<u16, usize>,
    /// Every free port below this is handed out; the next new claim starts looking here.
    cursor: i32,
    /// Some claim got no port.
    exhausted: bool,
}

impl Allocation {
    /// An empty allocation of `start..=end` minus `reserved`.
    pub fn new(start: i32, end: i32, reserved: Option<u16>) -> Self {
        Self {
            start,
            end,
            reserved,
            claims: BTreeMap::new(),
            ages: HashMap::new(),
            ports: BTreeMap::new(),
            holders: HashMap::new(),
            kept: HashMap::new(),
            claimants: HashMap::new(),
            cursor: start.max(1),
            exhausted: false,
        }
    }

    /// The allocation of `claims`, computed at once.
    pub fn with_claims(start: i32, end: i32, reserved: Option<u16>, claims: &[PortClaim]) -> Self {
        let mut allocation = Self::new(start, end, reserved);
        allocation.rebuild(claims.iter().map(|c| (age(c), c.current)).collect());
        allocation
    }

    /// Port of every claim.
    pub fn ports(&self) -> &BTreeMap<TenantKey, Option<u16>> {
        &self.ports
    }

    fn in_range(&self, p: i32) -> Option<u16> {
        let port = u16::try_from(p).ok()?;
        (p >= self.start && p <= self.end && port != 0 && Some(port) != self.reserved)
            .then_some(port)
    }

    /// Adds or changes a claim; returns the tenants whose port changed (a new tenant counts).
    pub fn upsert(&mut self, claim: &PortClaim) -> BTreeSet<TenantKey> {
        let new_age = age(claim);
        let wanted = claim.current.and_then(|p| self.in_range(p));
        match self.ages.get(&claim.key) {
            Some(old_age) if *old_age == new_age => {
                let old_current = self.claims.get(old_age).copied().flatten();
                if old_current == claim.current {
                    return BTreeSet::new();
                }
                // The operator recording the port it handed out changes nobody's port.
                let assigned = self.ports.get(&claim.key).copied().flatten();
                if wanted.is_some()
                    && wanted == assigned
                    && old_current.and_then(|p| self.in_range(p)).is_none()
                    && let Some(port) = wanted
                    && !self.kept.contains_key(&port)
                {
                    self.claims.insert(new_age, claim.current);
                    self.kept.insert(port, claim.key.clone());
                    *self.claimants.entry(port).or_default() += 1;
                    return BTreeSet::new();
                }
            }
            Some(_) => {}
            None => {
                // A port nobody holds: kept without disturbing anyone (every free port below
                // the cursor is held, so it lies above everything handed out).
                if let Some(port) = wanted
                    && !self.holders.contains_key(&port)
                {
                    self.insert(new_age, claim.current, Some(port), true);
                    return BTreeSet::from([claim.key.clone()]);
                }
                // The youngest without a keepable port takes the next free one.
                let keepable = wanted.is_some_and(|p| !self.kept.contains_key(&p));
                if !keepable
                    && self
                        .claims
                        .keys()
                        .next_back()
                        .is_none_or(|last| *last < new_age)
                {
                    let port = self.next_free();
                    self.insert(new_age, claim.current, port, false);
                    return BTreeSet::from([claim.key.clone()]);
                }
            }
        }
        let mut claims = self.all_claims();
        if let Some(old) = self.ages.get(&claim.key) {
            claims.remove(old);
        }
        claims.insert(new_age, claim.current);
        self.recompute(claims)
    }

    /// Removes a claim; returns the other tenants whose port changed.
    pub fn remove(&mut self, key: &TenantKey) -> BTreeSet<TenantKey> {
        let Some(old_age) = self.ages.get(key).cloned() else {
            return BTreeSet::new();
        };
        let port = self.ports.get(key).copied().flatten();
        let is_kept = port.is_some_and(|p| self.kept.get(&p) == Some(key));
        let youngest = self.claims.keys().next_back() == Some(&old_age);
        let simple = !self.exhausted
            && match port {
                // Nobody waits for a kept port above everything handed out.
                Some(p) if is_kept => {
                    self.claimants.get(&p) == Some(&1) && i32::from(p) >= self.cursor
                }
                // The youngest handed-out port returns to the pool.
                Some(p) => youngest && self.claimants.get(&p).is_none_or(|n| *n == 0),
                None => false,
            };
        if simple {
            let current = self.claims.remove(&old_age).flatten();
            self.ages.remove(key);
            self.ports.remove(key);
            if let Some(p) = current.and_then(|c| self.in_range(c)) {
                self.uncount(p);
            }
            if let Some(p) = port {
                self.holders.remove(&p);
                if is_kept {
                    self.kept.remove(&p);
                } else {
                    self.cursor = i32::from(p);
                }
            }
            return BTreeSet::new();
        }
        let mut claims = self.all_claims();
        claims.remove(&old_age);
        let mut changed = self.recompute(claims);
        changed.remove(key);
        changed
    }

    fn uncount(&mut self, port: u16) {
        if let Some(n) = self.claimants.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.claimants.remove(&port);
            }
        }
    }

    fn all_claims(&self) -> BTreeMap<Age, Option<i32>> {
        self.claims.clone()
    }

    fn insert(&mut self, age: Age, current: Option<i32>, port: Option<u16>, kept: bool) {
        let key = age.2.clone();
        if let Some(p) = current.and_then(|c| self.in_range(c)) {
            *self.claimants.entry(p).or_default() += 1;
        }
        if let Some(p) = port {
            self.holders.insert(p, key.clone());
            if kept {
                self.kept.insert(p, key.clone());
            }
        }
        self.ports.insert(key.clone(), port);
        self.ages.insert(key, age.clone());
        self.claims.insert(age, current);
    }

    /// The lowest port from the cursor on that nobody holds, advancing the cursor past it.
    fn next_free(&mut self) -> Option<u16> {
        while self.cursor <= self.end {
            let candidate = self.cursor;
            self.cursor += 1;
            if let Some(port) = self.in_range(candidate)
                && !self.holders.contains_key(&port)
            {
                return Some(port);
            }
        }
        self.exhausted = true;
        None
    }

    /// Recomputes from `claims` and returns every tenant whose port differs (added or removed
    /// ones included).
    fn recompute(&mut self, claims: BTreeMap<Age, Option<i32>>) -> BTreeSet<TenantKey> {
        let before = std::mem::take(&mut self.ports);
        self.rebuild(claims);
        let mut changed = BTreeSet::new();
        for (key, port) in &self.ports {
            if before.get(key) != Some(port) {
                changed.insert(key.clone());
            }
        }
        for key in before.keys() {
            if !self.ports.contains_key(key) {
                changed.insert(key.clone());
            }
        }
        changed
    }

    /// The whole allocation: a tenant keeps its recorded port unless an older one holds it;
    /// the others get the lowest free ports in age order.
    fn rebuild(&mut self, claims: BTreeMap<Age, Option<i32>>) {
        *self = Self::new(self.start, self.end, self.reserved);
        let mut unkept = Vec::new();
        for (age, current) in claims {
            match current.and_then(|p| self.in_range(p)) {
                Some(port) if !self.kept.contains_key(&port) => {
                    self.insert(age, current, Some(port), true)
                }
                _ => unkept.push((age, current)),
            }
        }
        for (age, current) in unkept {
            let port = self.next_free();
            self.insert(age, current, port, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, created_secs: i64, current: Option<i32>) -> PortClaim {
        PortClaim {
            key: ("ns".into(), name.into()),
            created: Timestamp::from_second(created_secs).ok(),
            current,
        }
    }

    fn port(map: &BTreeMap<TenantKey, Option<u16>>, name: &str) -> Option<u16> {
        map.get(&("ns".to_string(), name.to_string()))
            .copied()
            .flatten()
    }

    #[test]
    fn new_tenants_get_the_lowest_free_ports_in_age_order() {
        let got = allocate(
            100,
            110,
            None,
            &[
                claim("b", 2, None),
                claim("a", 1, None),
                claim("c", 3, Some(100)),
            ],
        );
        assert_eq!(port(&got, "c"), Some(100), "a recorded port is kept");
        assert_eq!(port(&got, "a"), Some(101));
        assert_eq!(port(&got, "b"), Some(102));
    }

    #[test]
    fn a_restart_recomputes_the_same_ports_from_recorded_status() {
        let first = allocate(
            100,
            110,
            None,
            &[
                claim("a", 1, None),
                claim("b", 2, None),
                claim("c", 3, None),
            ],
        );
        // The operator restarts after writing status; "a" was deleted meanwhile and "d" added.
        let restarted = allocate(
            100,
            110,
            None,
            &[
                claim("b", 2, port(&first, "b").map(i32::from)),
                claim("c", 3, port(&first, "c").map(i32::from)),
                claim("d", 4, None),
            ],
        );
        assert_eq!(port(&restarted, "b"), port(&first, "b"));
        assert_eq!(port(&restarted, "c"), port(&first, "c"));
        assert_eq!(port(&restarted, "d"), Some(100), "the freed port is reused");
        // And the same input always gives the same output, in any order.
        let again = allocate(
            100,
            110,
            None,
            &[
                claim("d", 4, None),
                claim("c", 3, Some(102)),
                claim("b", 2, Some(101)),
            ],
        );
        assert_eq!(again, restarted);
    }

    #[test]
    fn on_a_collision_the_oldest_keeps_the_port_and_the_other_moves() {
        let got = allocate(
            100,
            110,
            None,
            &[claim("young", 5, Some(105)), claim("old", 1, Some(105))],
        );
        assert_eq!(port(&got, "old"), Some(105));
        assert_eq!(port(&got, "young"), Some(100));
    }

    #[test]
    fn equal_timestamps_are_ordered_by_name() {
        let got = allocate(
            100,
            110,
            None,
            &[claim("b", 1, Some(104)), claim("a", 1, Some(104))],
        );
        assert_eq!(port(&got, "a"), Some(104));
        assert_eq!(port(&got, "b"), Some(100));
    }

    #[test]
    fn ports_outside_a_shrunk_range_or_reserved_are_reassigned() {
        let got = allocate(
            100,
            101,
            Some(101),
            &[claim("a", 1, Some(150)), claim("b", 2, Some(101))],
        );
        assert_eq!(port(&got, "a"), Some(100));
        assert_eq!(
            port(&got, "b"),
            None,
            "the range is exhausted once the peer port is reserved"
        );
    }

    /// The incremental allocation always equals the allocation computed at once, and reports
    /// exactly the tenants whose port changed; over random add/change/delete sequences with
    /// collisions, equal timestamps, a reserved port and an exhausted range.
    #[test]
    fn incremental_updates_match_the_full_allocation() {
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..300 {
            let mut allocation = Allocation::new(100, 108, Some(104));
            let mut claims: BTreeMap<String, PortClaim> = BTreeMap::new();
            for _ in 0..40 {
                let name = format!("t{}", next(12));
                let before = allocation.ports().clone();
                let changed = if next(4) == 0 {
                    claims.remove(&name);
                    allocation.remove(&("ns".to_string(), name.clone()))
                } else {
                    let current = match next(4) {
                        0 => None,
                        // Often the port it holds, as the operator records it.
                        1 => port(&before, &name).map(i32::from),
                        _ => Some(98 + next(13) as i32),
                    };
                    let keep_age = next(5) != 0;
                    let fresh = Timestamp::from_second(next(6) as i64).ok();
                    let created = claims
                        .get(&name)
                        .filter(|_| keep_age)
                        .map_or(fresh, |c| c.created);
                    let c = PortClaim {
                        key: ("ns".into(), name.clone()),
                        created,
                        current,
                    };
                    claims.insert(name.clone(), c.clone());
                    allocation.upsert(&c)
                };
                let all: Vec<PortClaim> = claims.values().cloned().collect();
                let expected = allocate(100, 108, Some(104), &all);
                assert_eq!(allocation.ports(), &expected, "after {name}");
                let mut differs: BTreeSet<TenantKey> = before
                    .keys()
                    .chain(expected.keys())
                    .filter(|k| before.get(*k) != expected.get(*k))
                    .cloned()
                    .collect();
                if !claims.contains_key(&name) {
                    differs.remove(&("ns".to_string(), name.clone()));
                }
                assert_eq!(changed, differs, "after {name}");
            }
        }
    }

    #[test]
    fn a_restart_listing_recorded_ports_takes_the_fast_path_for_each() {
        let mut allocation = Allocation::new(20_000, 29_999, None);
        for i in 0..1000 {
            let changed = allocation.upsert(&PortClaim {
                key: ("ns".into(), format!("t{i}")),
                created: Timestamp::from_second(1000 - i64::from(i)).ok(),
                current: Some(20_000 + (i * 7919) % 10_000),
            });
            assert_eq!(changed.len(), 1, "only the listed tenant itself");
        }
        assert_eq!(allocation.ports().values().flatten().count(), 1000);
    }
}
