//! The leader/follower rules on hand-made logs, including the log-divergence cases of KIP-101 and
//! KIP-279 (back-to-back leader changes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::memlog::MemLog;
use crate::*;

fn view(leader: NodeId, leader_epoch: u32, replicas: &[NodeId], isr: &[NodeId]) -> PartitionView {
    PartitionView {
        leader: Some(leader),
        leader_epoch,
        partition_epoch: 0,
        replicas: replicas.to_vec(),
        isr: isr.to_vec(),
    }
}

fn config(durability: Durability) -> LeaderConfig {
    LeaderConfig {
        durability,
        replica_lag_max_ms: 1000,
        ..LeaderConfig::default()
    }
}

/// Runs fetches until the follower's log agrees with the leader's; returns the truncations made.
fn reconcile(
    leader: &mut LeaderState,
    leader_log: &MemLog,
    node: NodeId,
    log: &mut MemLog,
) -> Vec<u64> {
    let follower = FollowerState::new(1, leader.leader_epoch(), 0);
    let mut truncations = Vec::new();
    for _ in 0..10 {
        match leader.on_fetch(node, follower.position(log), leader_log, 0) {
            FetchCheck::Read { offset } => {
                for o in offset..leader_log.log_end() {
                    let (epoch, value) = leader_log.get(o).unwrap();
                    log.push(epoch, value);
                }
                return truncations;
            }
            FetchCheck::Diverging(diverging) => {
                let to = follower.truncation_offset(diverging, log);
                truncations.push(to);
                log.truncate(to);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no agreement after 10 fetches");
}

#[test]
fn kip_101_a_follower_does_not_truncate_to_its_high_watermark() {
    // A led epoch 0 and wrote m0, m1; B fetched both but knew high watermark 1 only. B restarts
    // and follows A again: it keeps m1 (truncating to its high watermark would lose it once A
    // dies and B leads).
    let a_log = MemLog::with_epochs(&[0, 0]);
    let mut b_log = MemLog::with_epochs(&[0, 0]);
    let mut a = LeaderState::new(
        1,
        &view(1, 0, &[1, 2], &[1, 2]),
        1,
        &a_log,
        0,
        config(Durability::InMemory),
    );
    assert_eq!(reconcile(&mut a, &a_log, 2, &mut b_log), Vec::<u64>::new());
    assert_eq!(b_log, a_log);
}

#[test]
fn kip_101_a_diverged_follower_truncates_where_the_leaders_epoch_ends() {
    // A (epoch 0) wrote m0, m1; B holds m0. Both lose power; B comes back first, leads epoch 1
    // and writes m2 at offset 1. A returns as B's follower: its m1 diverges and goes.
    let mut b_log = MemLog::with_epochs(&[0]);
    b_log.push(1, 100);
    let mut a_log = MemLog::with_epochs(&[0, 0]);
    let mut b = LeaderState::new(
        2,
        &view(2, 1, &[1, 2], &[2]),
        1,
        &b_log,
        0,
        config(Durability::InMemory),
    );
    assert_eq!(reconcile(&mut b, &b_log, 1, &mut a_log), vec![1]);
    assert_eq!(
        a_log,
        MemLog {
            flushed: 1,
            ..b_log.clone()
        }
    );
}

#[test]
fn kip_279_back_to_back_leader_changes_converge() {
    // A led epoch 1: m0, m1 at offsets 0, 1; B got m0. A died; B led epoch 2 and wrote m2 at
    // offset 1; B died; A came back and leads epoch 3 (writes m3 at 2). B returns: its offset 1
    // (epoch 2) must go although A's log also has an offset 1, and B ends equal to A.
    let mut a_log = MemLog::with_epochs(&[1, 1]);
    a_log.push(3, 300);
    let mut b_log = MemLog::with_epochs(&[1]);
    b_log.push(2, 200);
    let mut a = LeaderState::new(
        1,
        &view(1, 3, &[1, 2], &[1]),
        0,
        &a_log,
        0,
        config(Durability::InMemory),
    );
    assert_eq!(reconcile(&mut a, &a_log, 2, &mut b_log), vec![1]);
    assert_eq!(b_log.records, a_log.records);
}

#[test]
fn kip_279_the_new_leader_has_not_written_in_its_epoch_yet() {
    // As above, but A has not written in epoch 3 yet: B's epoch-2 record still goes.
    let a_log = MemLog::with_epochs(&[1, 1]);
    let mut b_log = MemLog::with_epochs(&[1]);
    b_log.push(2, 200);
    let mut a = LeaderState::new(
        1,
        &view(1, 3, &[1, 2], &[1]),
        0,
        &a_log,
        0,
        config(Durability::InMemory),
    );
    assert_eq!(reconcile(&mut a, &a_log, 2, &mut b_log), vec![1]);
    assert_eq!(b_log.records, a_log.records);
}

#[test]
fn a_follower_with_only_newer_epochs_loses_everything() {
    // The leader's log holds epoch 5 only from offset 0; the follower holds epoch 7 records the
    // leader never had (an unclean history): they all go.
    let a_log = MemLog::with_epochs(&[5, 5, 5]);
    let mut b_log = MemLog::with_epochs(&[7, 7]);
    let mut a = LeaderState::new(
        1,
        &view(1, 8, &[1, 2], &[1]),
        0,
        &a_log,
        0,
        config(Durability::InMemory),
    );
    let truncations = reconcile(&mut a, &a_log, 2, &mut b_log);
    assert_eq!(truncations, vec![0]);
    assert_eq!(b_log.records, a_log.records);
}

#[test]
fn the_high_watermark_is_the_smallest_durable_position_of_the_isr() {
    let mut log = MemLog::with_epochs(&[0; 10]);
    log.flushed = 8;
    let v = view(1, 0, &[1, 2, 3], &[1, 2, 3]);
    let mut durable = LeaderState::new(1, &v, 0, &log, 0, config(Durability::Flushed));
    let mut memory = LeaderState::new(1, &v, 0, &log, 0, config(Durability::InMemory));
    assert_eq!(
        durable.high_watermark(),
        0,
        "followers not heard from count as nothing"
    );
    let at = |offset, flushed| FetchPosition {
        offset,
        last_fetched_epoch: Some(0),
        flushed,
    };
    for leader in [&mut durable, &mut memory] {
        leader.on_fetch(2, at(10, 6), &log, 1);
        leader.on_fetch(3, at(9, 9), &log, 1);
    }
    assert_eq!(
        durable.high_watermark(),
        6,
        "min(leader 8, follower 6, follower 9)"
    );
    assert_eq!(
        memory.high_watermark(),
        9,
        "min(leader 10, follower 10, follower 9)"
    );
    // It never goes back, even when a follower reports less (after a restart).
    durable.on_fetch(2, at(3, 3), &log, 2);
    assert_eq!(durable.high_watermark(), 6);
    // The negative control: the leader alone.
    let mut broken = LeaderState::new(
        1,
        &v,
        0,
        &log,
        0,
        LeaderConfig {
            broken_high_watermark_on_leader_alone: true,
            ..config(Durability::Flushed)
        },
    );
    broken.update(&log);
    assert_eq!(broken.high_watermark(), 10);
}

#[test]
fn a_lagging_follower_leaves_the_isr_and_returns_once_it_caught_up() {
    let mut log = MemLog::with_epochs(&[0; 4]);
    let v = view(1, 0, &[1, 2, 3], &[1, 2, 3]);
    let mut leader = LeaderState::new(1, &v, 0, &log, 0, config(Durability::Flushed));
    let at = |offset| FetchPosition {
        offset,
        last_fetched_epoch: Some(0),
        flushed: offset,
    };
    // Follower 2 keeps up, follower 3 fetches once and then stops.
    leader.on_fetch(3, at(2), &log, 10);
    for t in (100..=1500).step_by(100) {
        log.push(0, t as u64);
        log.flush();
        leader.on_fetch(2, at(log.log_end()), &log, t);
        leader.update(&log);
    }
    assert_eq!(leader.isr_change(500), None, "within the lag window");
    let change = leader.isr_change(1500).expect("3 leaves");
    assert_eq!(
        (change.partition_epoch, change.isr.clone()),
        (0, vec![1, 2])
    );
    assert_eq!(
        leader.isr_change(1600),
        None,
        "one change in flight at a time"
    );
    assert_eq!(
        leader.maximal_isr(),
        vec![1, 2, 3],
        "until committed, 3 still counts"
    );
    let hw_before = leader.high_watermark();
    log.push(0, 9999);
    log.flush();
    leader.on_fetch(2, at(log.log_end()), &log, 1600);
    assert_eq!(
        leader.high_watermark(),
        hw_before.min(2),
        "3 holds back the high watermark"
    );
    // The controller commits it.
    let mut committed = v.clone();
    committed.partition_epoch = 1;
    committed.isr = vec![1, 2];
    assert!(leader.update_view(&committed, 1600));
    leader.update(&log);
    assert_eq!(leader.high_watermark(), log.log_end());
    // 3 catches up: it returns (only once durable up to the high watermark).
    leader.on_fetch(
        3,
        FetchPosition {
            flushed: 2,
            ..at(log.log_end())
        },
        &log,
        1700,
    );
    assert_eq!(
        leader.isr_change(1700),
        None,
        "not yet durable up to the high watermark"
    );
    leader.on_fetch(3, at(log.log_end()), &log, 1800);
    let change = leader.isr_change(1800).expect("3 returns");
    assert_eq!((change.partition_epoch, change.isr), (1, vec![1, 2, 3]));
    // A view of another leadership ends this one.
    assert!(!leader.update_view(&view(2, 1, &[1, 2, 3], &[2, 3]), 1900));
}

#[test]
fn fetches_outside_the_log_or_from_strangers_are_refused() {
    let mut log = MemLog::with_epochs(&[0; 4]);
    log.start = 2;
    log.records.truncate(2);
    let mut leader = LeaderState::new(
        1,
        &view(1, 0, &[1, 2], &[1, 2]),
        0,
        &log,
        0,
        LeaderConfig::default(),
    );
    let at = |offset| FetchPosition {
        offset,
        last_fetched_epoch: None,
        flushed: 0,
    };
    assert_eq!(
        leader.on_fetch(2, at(1), &log, 0),
        FetchCheck::OutOfRange {
            log_start: 2,
            log_end: 4
        }
    );
    assert_eq!(leader.on_fetch(9, at(2), &log, 0), FetchCheck::NotReplica);
    assert_eq!(leader.on_fetch(1, at(2), &log, 0), FetchCheck::NotReplica);
    assert_eq!(
        leader.on_fetch(2, at(2), &log, 0),
        FetchCheck::Read { offset: 2 }
    );
}
