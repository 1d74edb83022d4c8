//! Source selection (RFC 5905 §11.2), as pure functions over candidates: the intersection
//! (Marzullo) step that needs a strict majority and at least `min_sources` agreeing sources,
//! cluster pruning, the weighted combine of offset and frequency, the system peer with
//! hysteresis, and the leap-second vote.

use crate::packet::LeapIndicator;
use crate::source::SourceId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Survivors below which cluster pruning stops (RFC 5905 NMIN).
pub const CLUSTER_MIN: usize = 3;
/// Distance units per stratum when ranking the system peer (RFC 5905 MAXDIST).
const STRATUM_WEIGHT: f64 = 1.0;

/// One usable source as selection sees it (offsets on the corrected, current scale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: SourceId,
    /// Current offset estimate θ (true − local), seconds.
    pub offset: f64,
    /// Half-width λ of the correctness interval: root distance + jitter, seconds.
    pub root_distance: f64,
    /// Peer jitter, seconds.
    pub jitter: f64,
    pub stratum: u8,
    pub frequency_ppm: f64,
    pub skew_ppm: f64,
    pub leap: LeapIndicator,
}

/// Role of a candidate after selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectionRole {
    /// Outside the majority intersection.
    Falseticker,
    /// Truechimer pruned by clustering.
    Candidate,
    /// Survivor contributing to the combined estimate.
    Combined,
    /// The survivor chosen as system peer.
    Selected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum SelectError {
    #[error("{agreeing} sources agree but at least {required} are required")]
    TooFewSources { agreeing: usize, required: usize },
    #[error("no interval is agreed by a strict majority of {candidates} candidates")]
    NoMajority { candidates: usize },
}

/// The combined estimate of the survivors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Combined {
    pub offset: f64,
    pub frequency_ppm: f64,
    pub skew_ppm: f64,
    /// RFC 5905 system jitter: selection jitter and the peer's jitter, combined.
    pub jitter: f64,
    pub system_peer: SourceId,
    pub survivors: usize,
    /// Leap announced by a strict majority of survivors.
    pub leap: LeapIndicator,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Role of every input candidate, in input order.
    pub roles: Vec<(SourceId, SelectionRole)>,
    pub result: Result<Combined, SelectError>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectParams {
    pub min_sources: usize,
    /// Keep the previous system peer unless another is better by more than this, seconds.
    pub reselect_distance: f64,
}

/// Runs intersection, cluster and combine over `candidates`.
pub fn select(
    candidates: &[Candidate],
    params: SelectParams,
    previous_peer: Option<SourceId>,
) -> Selection {
    let mut roles: Vec<(SourceId, SelectionRole)> = candidates
        .iter()
        .map(|c| (c.id, SelectionRole::Falseticker))
        .collect();
    let truechimers = match intersect(candidates, params.min_sources) {
        Ok(indices) => indices,
        Err(error) => {
            return Selection {
                roles,
                result: Err(error),
            };
        }
    };
    for &i in &truechimers {
        roles[i].1 = SelectionRole::Candidate;
    }
    let survivors = cluster(candidates, truechimers);
    for &i in &survivors {
        roles[i].1 = SelectionRole::Combined;
    }
    let peer_index = choose_peer(
        candidates,
        &survivors,
        previous_peer,
        params.reselect_distance,
    );
    roles[peer_index].1 = SelectionRole::Selected;
    let combined = combine(candidates, &survivors, peer_index);
    Selection {
        roles,
        result: Ok(combined),
    }
}

/// Marzullo's sweep: the region covered by the most correctness intervals. Returns the
/// indices of the intervals covering it, if they are a strict majority and enough.
fn intersect(candidates: &[Candidate], min_sources: usize) -> Result<Vec<usize>, SelectError> {
    let n = candidates.len();
    // (value, edge) with lower edges sorting before upper edges at equal values so that
    // touching intervals count as overlapping.
    let mut edges: Vec<(f64, i8)> = Vec::with_capacity(2 * n);
    for c in candidates {
        edges.push((c.offset - c.root_distance, -1));
        edges.push((c.offset + c.root_distance, 1));
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut depth = 0usize;
    let mut best = 0usize;
    let mut regions: Vec<(f64, f64)> = Vec::new();
    for (i, &(value, edge)) in edges.iter().enumerate() {
        if edge < 0 {
            depth += 1;
            if depth > best {
                best = depth;
                regions.clear();
            }
            if depth == best {
                let end = edges.get(i + 1).map_or(value, |e| e.0);
                regions.push((value, end));
            }
        } else {
            depth = depth.saturating_sub(1);
        }
    }
    if 2 * best <= n {
        return Err(SelectError::NoMajority { candidates: n });
    }
    // With a strict majority, two disjoint maximal regions cannot both exist unless some
    // intervals span both; refuse rather than guess.
    let (low, high) = match regions.as_slice() {
        [only] => *only,
        _ => return Err(SelectError::NoMajority { candidates: n }),
    };
    if best < min_sources {
        return Err(SelectError::TooFewSources {
            agreeing: best,
            required: min_sources,
        });
    }
    Ok((0..n)
        .filter(|&i| {
            let c = &candidates[i];
            c.offset - c.root_distance <= low && c.offset + c.root_distance >= high
        })
        .collect())
}

/// RFC 5905 cluster algorithm: drop the survivor with the largest selection jitter while
/// more than `CLUSTER_MIN` remain and that jitter exceeds the smallest peer jitter.
fn cluster(candidates: &[Candidate], mut survivors: Vec<usize>) -> Vec<usize> {
    while survivors.len() > CLUSTER_MIN {
        let worst = survivors
            .iter()
            .map(|&i| (i, selection_jitter(candidates, &survivors, i)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let min_peer_jitter = survivors
            .iter()
            .map(|&i| candidates[i].jitter)
            .fold(f64::INFINITY, f64::min);
        match worst {
            Some((index, jitter)) if jitter > min_peer_jitter => {
                survivors.retain(|&i| i != index);
            }
            _ => break,
        }
    }
    survivors
}

fn selection_jitter(candidates: &[Candidate], survivors: &[usize], of: usize) -> f64 {
    if survivors.len() < 2 {
        return 0.0;
    }
    let theta = candidates[of].offset;
    let sum: f64 = survivors
        .iter()
        .map(|&j| (candidates[j].offset - theta).powi(2))
        .sum();
    (sum / (survivors.len() - 1) as f64).sqrt()
}

fn peer_rank(c: &Candidate) -> f64 {
    f64::from(c.stratum) * STRATUM_WEIGHT + c.root_distance
}

fn choose_peer(
    candidates: &[Candidate],
    survivors: &[usize],
    previous: Option<SourceId>,
    reselect_distance: f64,
) -> usize {
    let best = survivors
        .iter()
        .copied()
        .min_by(|&a, &b| peer_rank(&candidates[a]).total_cmp(&peer_rank(&candidates[b])))
        .unwrap_or_default();
    let kept = previous.and_then(|id| survivors.iter().copied().find(|&i| candidates[i].id == id));
    match kept {
        Some(i)
            if peer_rank(&candidates[i]) <= peer_rank(&candidates[best]) + reselect_distance =>
        {
            i
        }
        _ => best,
    }
}

fn combine(candidates: &[Candidate], survivors: &[usize], peer: usize) -> Combined {
    let mut offset_num = 0.0;
    let mut offset_den = 0.0;
    let mut freq_num = 0.0;
    let mut freq_den = 0.0;
    let mut any_finite_skew = false;
    for &i in survivors {
        let c = &candidates[i];
        let w = 1.0 / c.root_distance.max(1e-9);
        offset_num += w * c.offset;
        offset_den += w;
        if c.skew_ppm.is_finite() {
            any_finite_skew = true;
            let wf = 1.0 / c.skew_ppm.max(1e-6).powi(2);
            freq_num += wf * c.frequency_ppm;
            freq_den += wf;
        }
    }
    let offset = offset_num / offset_den;
    let (frequency_ppm, skew_ppm) = if any_finite_skew {
        (freq_num / freq_den, (1.0 / freq_den).sqrt())
    } else {
        (0.0, f64::INFINITY)
    };
    let sel_jitter = selection_jitter(candidates, survivors, peer);
    let jitter = (sel_jitter.powi(2) + candidates[peer].jitter.powi(2)).sqrt();
    Combined {
        offset,
        frequency_ppm,
        skew_ppm,
        jitter,
        system_peer: candidates[peer].id,
        survivors: survivors.len(),
        leap: leap_vote(candidates, survivors),
    }
}

fn leap_vote(candidates: &[Candidate], survivors: &[usize]) -> LeapIndicator {
    let count = |leap| {
        survivors
            .iter()
            .filter(|&&i| candidates[i].leap == leap)
            .count()
    };
    let majority = |votes: usize| 2 * votes > survivors.len();
    if majority(count(LeapIndicator::Insert)) {
        LeapIndicator::Insert
    } else if majority(count(LeapIndicator::Delete)) {
        LeapIndicator::Delete
    } else {
        LeapIndicator::NoWarning
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: u32, offset: f64, distance: f64) -> Candidate {
        Candidate {
            id: SourceId(id),
            offset,
            root_distance: distance,
            jitter: 1e-4,
            stratum: 2,
            frequency_ppm: 0.0,
            skew_ppm: 1.0,
            leap: LeapIndicator::NoWarning,
        }
    }

    const PARAMS: SelectParams = SelectParams {
        min_sources: 3,
        reselect_distance: 1e-4,
    };

    #[test]
    fn falseticker_minority_is_never_selected() {
        let candidates = [
            candidate(0, 0.001, 0.01),
            candidate(1, 3600.0, 0.01),
            candidate(2, -0.001, 0.01),
            candidate(3, -0.05, 0.01),
            candidate(4, 0.0, 0.01),
        ];
        let selection = select(&candidates, PARAMS, None);
        let combined = selection.result.unwrap_or_else(|e| panic!("{e}"));
        assert!(combined.offset.abs() < 0.002);
        assert_eq!(selection.roles[1].1, SelectionRole::Falseticker);
        assert_eq!(selection.roles[3].1, SelectionRole::Falseticker);
        assert_eq!(combined.survivors, 3);
    }

    #[test]
    fn fewer_agreeing_sources_than_min_sources_refuses_to_steer() {
        let candidates = [candidate(0, 0.0, 0.01), candidate(1, 0.001, 0.01)];
        let selection = select(&candidates, PARAMS, None);
        assert_eq!(
            selection.result,
            Err(SelectError::TooFewSources {
                agreeing: 2,
                required: 3
            })
        );
    }

    #[test]
    fn split_without_strict_majority_is_refused() {
        let candidates = [
            candidate(0, 0.0, 0.01),
            candidate(1, 0.001, 0.01),
            candidate(2, 1.0, 0.01),
            candidate(3, 1.001, 0.01),
        ];
        let params = SelectParams {
            min_sources: 1,
            ..PARAMS
        };
        assert_eq!(
            select(&candidates, params, None).result,
            Err(SelectError::NoMajority { candidates: 4 })
        );
    }

    #[test]
    fn cluster_prunes_the_outlier_among_truechimers() {
        let candidates = [
            candidate(0, 0.0, 0.5),
            candidate(1, 0.0001, 0.5),
            candidate(2, -0.0001, 0.5),
            candidate(3, -0.05, 0.5),
        ];
        let selection = select(&candidates, PARAMS, None);
        assert_eq!(selection.roles[3].1, SelectionRole::Candidate);
        let combined = selection.result.unwrap_or_else(|e| panic!("{e}"));
        assert!(combined.offset.abs() < 1e-4);
    }

    #[test]
    fn system_peer_sticks_within_reselect_distance() {
        let candidates = [
            candidate(0, 0.0, 0.01),
            candidate(1, 0.0, 0.01005),
            candidate(2, 0.0, 0.0101),
        ];
        let selection = select(&candidates, PARAMS, Some(SourceId(1)));
        assert_eq!(selection.roles[1].1, SelectionRole::Selected);
        let selection = select(&candidates, PARAMS, Some(SourceId(2)));
        assert_eq!(selection.roles[2].1, SelectionRole::Selected);
        let selection = select(&candidates, PARAMS, None);
        assert_eq!(selection.roles[0].1, SelectionRole::Selected);
    }

    #[test]
    fn leap_is_voted_by_strict_majority_of_survivors() {
        let mut candidates = [
            candidate(0, 0.0, 0.01),
            candidate(1, 0.0, 0.01),
            candidate(2, 0.0, 0.01),
        ];
        candidates[0].leap = LeapIndicator::Insert;
        let one = select(&candidates, PARAMS, None).result.map(|c| c.leap);
        assert_eq!(one, Ok(LeapIndicator::NoWarning));
        candidates[1].leap = LeapIndicator::Insert;
        let two = select(&candidates, PARAMS, None).result.map(|c| c.leap);
        assert_eq!(two, Ok(LeapIndicator::Insert));
    }
}
