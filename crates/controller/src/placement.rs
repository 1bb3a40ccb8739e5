//! The controller's decisions, as pure functions: where a new partition's replicas go, and who
//! leads a partition when brokers come and go. No I/O, no clock: the active controller calls
//! them with the current image and proposes what they return.

use std::collections::{BTreeMap, BTreeSet};

use crate::records::{NodeId, PartitionState, PartitionTarget};

/// A broker that may receive replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub node_id: NodeId,
    /// Its rack (brokers without one count as one rack of their own).
    pub rack: Option<String>,
}

/// Why replicas could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replication factor {rf} needs {rf} live brokers; {n_brokers} are live")]
pub struct NotEnoughBrokers {
    /// Asked for.
    pub rf: u16,
    /// Available.
    pub n_brokers: usize,
}

/// Replicas for `n_partitions` new partitions numbered from `first_partition`, `rf` each, as
/// Kafka places them: partition p's first replica (its preferred leader) is broker
/// `(p + start) mod n` of a rack-alternating order of the brokers, so leaders spread evenly; the
/// other replicas follow at a shift that changes every n partitions, so followers spread too; and
/// a partition uses as many racks as there are before it uses a rack twice. `start` and `shift`
/// are random in the controller (tests fix them).
pub fn assign_replicas(
    first_partition: u32,
    n_partitions: u32,
    rf: u16,
    brokers: &[Candidate],
    start: usize,
    shift: usize,
) -> Result<Vec<Vec<NodeId>>, NotEnoughBrokers> {
    let n = brokers.len();
    if rf == 0 || usize::from(rf) > n {
        return Err(NotEnoughBrokers { rf, n_brokers: n });
    }
    let arranged = rack_alternated(brokers);
    let rack_of: BTreeMap<NodeId, Option<&str>> = brokers
        .iter()
        .map(|b| (b.node_id, b.rack.as_deref()))
        .collect();
    let n_racks = rack_of.values().collect::<BTreeSet<_>>().len();
    let start = start % n;
    let mut next_shift = shift % n;
    let mut assignments = Vec::with_capacity(n_partitions as usize);
    let at = |i: usize| arranged.get(i % n).copied().unwrap_or_default();
    let rack = |node: NodeId| rack_of.get(&node).copied().flatten();
    for p in first_partition..first_partition.saturating_add(n_partitions) {
        let p = p as usize;
        if p > 0 && p.is_multiple_of(n) {
            next_shift += 1;
        }
        let first = (p + start) % n;
        let leader = at(first);
        let mut replicas = vec![leader];
        let mut racks = BTreeSet::from([rack(leader)]);
        let mut k = 0usize;
        while replicas.len() < usize::from(rf) {
            let candidate = at(replica_index(first, next_shift * n_racks.max(1), k, n));
            k += 1;
            let rack = rack(candidate);
            let rack_ok = !racks.contains(&rack) || racks.len() == n_racks;
            // Within n rounds every broker has been tried once under each rule; after that any
            // broker not yet chosen will do (never loops forever).
            if replicas.contains(&candidate) || (!rack_ok && k <= n * n) {
                continue;
            }
            racks.insert(rack);
            replicas.push(candidate);
        }
        assignments.push(replicas);
    }
    Ok(assignments)
}

/// Kafka's follower position: `shift` in 1..n from the first replica.
fn replica_index(first: usize, shift: usize, k: usize, n: usize) -> usize {
    if n == 1 {
        return first;
    }
    let step = 1 + (shift + k) % (n - 1);
    (first + step) % n
}

/// The brokers ordered so that consecutive ones are on different racks where possible: one from
/// each rack in turn (racks and brokers in id order), as Kafka's `getRackAlternatedBrokerList`.
fn rack_alternated(brokers: &[Candidate]) -> Vec<NodeId> {
    let mut by_rack: BTreeMap<Option<&str>, Vec<NodeId>> = BTreeMap::new();
    for b in brokers {
        by_rack
            .entry(b.rack.as_deref())
            .or_default()
            .push(b.node_id);
    }
    for ids in by_rack.values_mut() {
        ids.sort_unstable();
    }
    let mut out = Vec::with_capacity(brokers.len());
    for round in 0.. {
        let before = out.len();
        out.extend(by_rack.values().filter_map(|ids| ids.get(round)));
        if out.len() == before {
            break;
        }
    }
    out
}

/// The leader to elect: the first replica, in preference order, that is in the ISR and live.
pub fn elect_leader(state: &PartitionState, live: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    state
        .replicas
        .iter()
        .copied()
        .find(|r| state.isr.contains(r) && live(*r))
}

/// What fencing `node` does to a partition: it leaves the ISR (unless it is the last member, who
/// is kept so that only it may lead again: no unclean election), and if it led, the first live
/// ISR member leads, or nobody. `live` answers for the other brokers. `None`: nothing changes.
pub fn on_fenced(
    state: &PartitionState,
    node: NodeId,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if !state.isr.contains(&node) && state.leader != Some(node) {
        return None;
    }
    let others: Vec<NodeId> = state.isr.iter().copied().filter(|r| *r != node).collect();
    let isr = if others.is_empty() {
        state.isr.clone()
    } else {
        others
    };
    let leader = if state.leader == Some(node) || state.leader.is_none() {
        let without = PartitionState {
            isr: isr.clone(),
            ..state.clone()
        };
        elect_leader(&without, |r| r != node && live(r))
    } else {
        state.leader
    };
    target_if_changed(state, isr, leader)
}

/// What unfencing `node` does to a partition: an offline partition whose ISR holds `node` gets a
/// leader again. `live` answers for every broker, `node` included.
pub fn on_unfenced(
    state: &PartitionState,
    node: NodeId,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if state.leader.is_some() || !state.isr.contains(&node) {
        return None;
    }
    let leader = elect_leader(state, live);
    target_if_changed(state, state.isr.clone(), leader)
}

/// Leadership back to the preferred replica (the first), if it is live, in the ISR and does not
/// lead already (Kafka's preferred leader election).
pub fn preferred_leader(
    state: &PartitionState,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    let preferred = *state.replicas.first()?;
    if state.leader == Some(preferred) || !state.isr.contains(&preferred) || !live(preferred) {
        return None;
    }
    target_if_changed(state, state.isr.clone(), Some(preferred))
}

/// Starts moving a partition to `target` replicas (KIP-455): the new replicas are added (they
/// copy the log and join the ISR), the old ones stay until then; the target's first replica is
/// the new preferred leader. `Ok(None)`: the partition already has exactly these replicas.
pub fn start_reassignment(
    state: &PartitionState,
    target: &[NodeId],
) -> Result<Option<PartitionTarget>, String> {
    let mut distinct = target.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if target.is_empty() || distinct.len() != target.len() {
        return Err(format!("replicas {target:?} are not distinct node ids"));
    }
    if state.reassigning() {
        return Err("a reassignment is under way: cancel it first".into());
    }
    if target == state.replicas.as_slice() {
        return Ok(None);
    }
    let adding: Vec<NodeId> = target
        .iter()
        .copied()
        .filter(|r| !state.replicas.contains(r))
        .collect();
    let removing: Vec<NodeId> = state
        .replicas
        .iter()
        .copied()
        .filter(|r| !target.contains(r))
        .collect();
    let mut replicas = target.to_vec();
    replicas.extend(&removing);
    Ok(Some(PartitionTarget {
        replicas,
        isr: state.isr.clone(),
        leader: state.leader,
        adding,
        removing,
    }))
}

/// Completes a reassignment whose target replicas are all in sync: the removed replicas go
/// (from the ISR too), and leadership moves into the target if it was outside.
pub fn complete_reassignment(
    state: &PartitionState,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if !state.reassigning() {
        return None;
    }
    let target = state.target_replicas();
    if !target.iter().all(|r| state.isr.contains(r)) {
        return None;
    }
    let isr: Vec<NodeId> = state
        .isr
        .iter()
        .copied()
        .filter(|r| target.contains(r))
        .collect();
    let leader = match state.leader {
        Some(leader) if target.contains(&leader) => Some(leader),
        _ => target.iter().copied().find(|r| isr.contains(r) && live(*r)),
    };
    Some(PartitionTarget {
        replicas: target,
        isr,
        leader,
        adding: Vec::new(),
        removing: Vec::new(),
    })
}

/// Cancels a reassignment: the replicas being added go, the original ones stay.
pub fn cancel_reassignment(
    state: &PartitionState,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if !state.reassigning() {
        return None;
    }
    let original: Vec<NodeId> = state
        .replicas
        .iter()
        .copied()
        .filter(|r| !state.adding.contains(r))
        .collect();
    let isr: Vec<NodeId> = state
        .isr
        .iter()
        .copied()
        .filter(|r| original.contains(r))
        .collect();
    if isr.is_empty() {
        return None;
    }
    let leader = match state.leader {
        Some(leader) if original.contains(&leader) => Some(leader),
        _ => original
            .iter()
            .copied()
            .find(|r| isr.contains(r) && live(*r)),
    };
    Some(PartitionTarget {
        replicas: original,
        isr,
        leader,
        adding: Vec::new(),
        removing: Vec::new(),
    })
}

/// A clean election for an offline partition: the first live replica of its ISR.
pub fn on_unfenced_any(
    state: &PartitionState,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if state.leader.is_some() {
        return None;
    }
    let leader = elect_leader(state, &live)?;
    target_if_changed(state, state.isr.clone(), Some(leader))
}

/// An unclean election: an offline partition none of whose in-sync replicas is live gets the
/// first live replica as leader, and the ISR becomes that replica alone. Records the ISR had and
/// it lacks are lost; only topics with `unclean.leader.election.enable` take it.
pub fn elect_unclean(
    state: &PartitionState,
    live: impl Fn(NodeId) -> bool,
) -> Option<PartitionTarget> {
    if state.leader.is_some() || state.isr.iter().any(|r| live(*r)) {
        return None;
    }
    let leader = state.replicas.iter().copied().find(|r| live(*r))?;
    target_if_changed(state, vec![leader], Some(leader))
}

fn target_if_changed(
    state: &PartitionState,
    isr: Vec<NodeId>,
    leader: Option<NodeId>,
) -> Option<PartitionTarget> {
    (isr != state.isr || leader != state.leader).then(|| state.with(isr, leader))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brokers(racks: &[Option<&str>]) -> Vec<Candidate> {
        racks
            .iter()
            .enumerate()
            .map(|(i, r)| Candidate {
                node_id: i as NodeId + 1,
                rack: r.map(str::to_string),
            })
            .collect()
    }

    #[test]
    fn leadership_returns_to_the_preferred_replica_only_when_it_is_in_sync() {
        let state = PartitionState {
            replicas: vec![1, 2, 3],
            isr: vec![2, 3],
            leader: Some(2),
            leader_epoch: 4,
            partition_epoch: 7,
            ..Default::default()
        };
        assert_eq!(preferred_leader(&state, |_| true), None, "1 is not in sync");
        let synced = PartitionState {
            isr: vec![2, 3, 1],
            ..state.clone()
        };
        let target = preferred_leader(&synced, |_| true).unwrap();
        assert_eq!((target.leader, target.isr), (Some(1), vec![2, 3, 1]));
        assert_eq!(preferred_leader(&synced, |r| r != 1), None, "1 is fenced");
    }

    #[test]
    fn a_reassignment_adds_first_and_removes_once_the_target_is_in_sync() {
        let state = PartitionState {
            replicas: vec![1, 2, 3],
            isr: vec![1, 2, 3],
            leader: Some(1),
            ..Default::default()
        };
        let started = start_reassignment(&state, &[2, 3, 4]).unwrap().unwrap();
        assert_eq!(started.replicas, vec![2, 3, 4, 1]);
        assert_eq!(
            (started.adding.clone(), started.removing.clone()),
            (vec![4], vec![1])
        );
        let moving = crate::image::changed(&state, &started);
        assert_eq!(
            complete_reassignment(&moving, |_| true),
            None,
            "4 is not in sync yet"
        );
        assert!(start_reassignment(&moving, &[4]).is_err(), "one at a time");
        let synced = PartitionState {
            isr: vec![1, 2, 3, 4],
            ..moving.clone()
        };
        let done = complete_reassignment(&synced, |_| true).unwrap();
        assert_eq!(
            (done.replicas, done.isr, done.leader),
            (vec![2, 3, 4], vec![2, 3, 4], Some(2))
        );
        assert!(done.adding.is_empty() && done.removing.is_empty());
        let cancelled = cancel_reassignment(&moving, |_| true).unwrap();
        assert_eq!(
            (cancelled.replicas, cancelled.leader),
            (vec![2, 3, 1], Some(1))
        );
        assert_eq!(start_reassignment(&state, &[1, 2, 3]), Ok(None));
        assert!(start_reassignment(&state, &[1, 1]).is_err());
    }

    #[test]
    fn an_unclean_election_takes_a_live_replica_outside_the_isr() {
        let offline = PartitionState {
            replicas: vec![1, 2, 3],
            isr: vec![1],
            leader: None,
            leader_epoch: 4,
            partition_epoch: 7,
            ..Default::default()
        };
        assert_eq!(
            elect_unclean(&offline, |_| true),
            None,
            "1 is live: a clean election"
        );
        let target = elect_unclean(&offline, |r| r != 1).unwrap();
        assert_eq!((target.leader, target.isr), (Some(2), vec![2]));
        assert_eq!(elect_unclean(&offline, |_| false), None);
    }

    #[test]
    fn replicas_and_leaders_spread_evenly() {
        let b = brokers(&[None, None, None]);
        let a = assign_replicas(0, 12, 3, &b, 0, 0).unwrap();
        let mut leaders = BTreeMap::new();
        let mut replicas = BTreeMap::new();
        for r in &a {
            assert_eq!(r.len(), 3);
            let distinct: BTreeSet<_> = r.iter().collect();
            assert_eq!(distinct.len(), 3, "{r:?}");
            *leaders.entry(r[0]).or_insert(0) += 1;
            for n in r {
                *replicas.entry(*n).or_insert(0) += 1;
            }
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), [4, 4, 4]);
        assert_eq!(replicas.values().copied().collect::<Vec<_>>(), [12, 12, 12]);
        assert!(assign_replicas(0, 1, 4, &b, 0, 0).is_err());
        assert!(assign_replicas(0, 1, 0, &b, 0, 0).is_err());
    }

    #[test]
    fn racks_are_used_before_any_is_used_twice() {
        let b = brokers(&[
            Some("a"),
            Some("a"),
            Some("b"),
            Some("b"),
            Some("c"),
            Some("c"),
        ]);
        let rack = |n: NodeId| b[(n - 1) as usize].rack.clone();
        for start in 0..6 {
            for shift in 0..6 {
                for r in assign_replicas(0, 24, 3, &b, start, shift).unwrap() {
                    let racks: BTreeSet<_> = r.iter().map(|n| rack(*n)).collect();
                    assert_eq!(racks.len(), 3, "{r:?} start {start} shift {shift}");
                }
                for r in assign_replicas(0, 24, 5, &b, start, shift).unwrap() {
                    let distinct: BTreeSet<_> = r.iter().collect();
                    assert_eq!(distinct.len(), 5);
                }
            }
        }
        // Two racks, RF 3: both racks used, one twice.
        let b = brokers(&[Some("a"), Some("b"), Some("a"), Some("b")]);
        for r in assign_replicas(0, 8, 3, &b, 1, 2).unwrap() {
            let racks: BTreeSet<_> = r
                .iter()
                .map(|n| b[(*n - 1) as usize].rack.clone())
                .collect();
            assert_eq!(racks.len(), 2);
        }
    }

    #[test]
    fn fencing_moves_leadership_within_the_isr_and_never_empties_it() {
        let state = PartitionState {
            replicas: vec![1, 2, 3],
            isr: vec![1, 2, 3],
            leader: Some(1),
            leader_epoch: 4,
            partition_epoch: 9,
            ..Default::default()
        };
        let all = |_| true;
        let t = on_fenced(&state, 1, all).unwrap();
        assert_eq!((t.leader, t.isr.clone()), (Some(2), vec![2, 3]));
        // A follower leaves the ISR; the leader stays.
        let t = on_fenced(&state, 3, all).unwrap();
        assert_eq!((t.leader, t.isr), (Some(1), vec![1, 2]));
        // The last ISR member is kept and the partition goes offline.
        let lone = PartitionState {
            isr: vec![1],
            ..state.clone()
        };
        let t = on_fenced(&lone, 1, all).unwrap();
        assert_eq!((t.leader, t.isr.clone()), (None, vec![1]));
        let offline = crate::image::changed(&lone, &t);
        assert_eq!(on_fenced(&offline, 1, all), None, "nothing more to do");
        // Only an ISR member may lead again: 2 coming back does nothing, 1 does.
        assert_eq!(on_unfenced(&offline, 2, all), None);
        let t = on_unfenced(&offline, 1, all).unwrap();
        assert_eq!(t.leader, Some(1));
        // Not in the ISR, not the leader: nothing.
        assert_eq!(on_fenced(&lone, 2, all), None);
    }
}
