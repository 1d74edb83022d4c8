//! Tenant port allocation. A pure function of all tenants of one TimeService, so every pass and
//! every operator restart computes the same assignment: a tenant keeps the port recorded in its
//! status while that port is still in range and nobody older holds it; collisions go to the
//! oldest tenant (creationTimestamp, then namespace/name); everyone else gets the lowest free
//! port, in the same age order.

use std::collections::{BTreeMap, BTreeSet};

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

/// Allocates a port in `start..=end` (minus `reserved`) to every claim; `None` when the range is
/// exhausted.
pub fn allocate(
    start: i32,
    end: i32,
    reserved: Option<u16>,
    claims: &[PortClaim],
) -> BTreeMap<TenantKey, Option<u16>> {
    let mut order: Vec<&PortClaim> = claims.iter().collect();
    // Oldest first; claims without a timestamp sort after every timestamped one.
    order.sort_by(|a, b| {
        (a.created.is_none(), a.created, &a.key).cmp(&(b.created.is_none(), b.created, &b.key))
    });
    let in_range = |p: i32| -> Option<u16> {
        let port = u16::try_from(p).ok()?;
        (p >= start && p <= end && port != 0 && Some(port) != reserved).then_some(port)
    };
    let mut taken = BTreeSet::new();
    let mut result: BTreeMap<TenantKey, Option<u16>> = BTreeMap::new();
    for claim in &order {
        let kept = claim
            .current
            .and_then(in_range)
            .filter(|p| taken.insert(*p));
        result.insert(claim.key.clone(), kept);
    }
    let mut next = start.max(1);
    for claim in &order {
        if result.get(&claim.key).copied().flatten().is_some() {
            continue;
        }
        let mut assigned = None;
        while next <= end {
            let candidate = next;
            next += 1;
            if let Some(port) = in_range(candidate)
                && !taken.contains(&port)
            {
                taken.insert(port);
                assigned = Some(port);
                break;
            }
        }
        result.insert(claim.key.clone(), assigned);
    }
    result
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
}
