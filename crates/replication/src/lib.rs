//! Partition replication as sans-IO state machines (Kafka's model, design.md section 5).
//!
//! A partition has a leader and followers. Followers fetch from the leader with a long poll,
//! telling it where their log ends ([`FetchPosition`]: the fetch offset, the epoch of the last
//! batch they hold, and the offset below which their log is durable). The leader
//!
//! - checks that the follower's log agrees with its own ([`LeaderState::on_fetch`]); if not it
//!   answers with where the follower's last epoch ends on the leader ([`DivergingEpoch`], as in
//!   KIP-595) and the follower truncates there ([`FollowerState::truncation_offset`]);
//! - keeps each follower's progress, and from it the **high watermark**: the smallest position of
//!   every in-sync replica, where a position is the durable (fsynced) offset by default
//!   ([`Durability::Flushed`]) or the log end under Kafka's rule ([`Durability::InMemory`]);
//! - decides ISR changes ([`LeaderState::isr_change`]): a follower that has not caught up within
//!   the lag limit leaves, one that reached the high watermark returns. The leader only proposes
//!   them: the controller commits them with the partition epoch (Kafka's AlterPartition), and
//!   until it has, the leader counts the larger of the two sets (an ISR shrink cannot let the high
//!   watermark pass a record a removed follower lacks, an expansion counts the new member at once).
//!
//! Nothing here does I/O or reads a clock: callers pass the log ([`ReplicaLog`]) and the time,
//! and carry out what the state machines answer (truncate, append, send). The broker runs them
//! over its partitions; `tests/simulation.rs` runs them over in-memory logs and a seeded,
//! lossy network.

#![forbid(unsafe_code)]

mod follower;
mod leader;
#[doc(hidden)]
pub mod memlog;
#[cfg(test)]
mod tests;

pub use follower::FollowerState;
pub use leader::{FetchCheck, IsrChange, LeaderConfig, LeaderState};

/// A node's id.
pub type NodeId = u32;

/// What the state machines read of a replica's log.
pub trait ReplicaLog {
    /// The first offset held.
    fn log_start(&self) -> u64;
    /// The offset the next record will get.
    fn log_end(&self) -> u64;
    /// The offset below which the log is durable (fsynced).
    fn flushed(&self) -> u64;
    /// The epoch of the newest batch held, if any.
    fn latest_epoch(&self) -> Option<u32>;
    /// The newest epoch at or below `epoch` that the log holds, and the offset where it ends
    /// (the next epoch's first offset, or the log end): Kafka's OffsetsForLeaderEpoch. `None` if
    /// the log holds no epoch at or below `epoch`.
    fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, u64)>;
}

/// Which position of a replica counts for the high watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The offset below which the replica's log is fsynced: an acknowledged acks=all record
    /// survives a power loss of every replica at once. Cairn's default.
    #[default]
    Flushed,
    /// The replica's log end (Kafka's rule): a record is committed once every in-sync replica
    /// holds it in memory; a simultaneous power loss of them all can lose it.
    InMemory,
}

/// Where a follower's log ends, as its fetch tells the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPosition {
    /// The next offset the follower wants (its log end).
    pub offset: u64,
    /// The epoch of the last batch it holds (`None`: an empty log).
    pub last_fetched_epoch: Option<u32>,
    /// The offset below which its log is durable.
    pub flushed: u64,
}

impl FetchPosition {
    /// The position of `log`.
    pub fn of(log: &impl ReplicaLog) -> FetchPosition {
        FetchPosition {
            offset: log.log_end(),
            last_fetched_epoch: log.latest_epoch(),
            flushed: log.flushed().min(log.log_end()),
        }
    }
}

/// The leader's answer to a follower whose log diverges from its own: the newest epoch at or
/// below the follower's last fetched epoch that the leader holds, and where it ends there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DivergingEpoch {
    /// The epoch (`None`: the leader holds no epoch at or below the follower's).
    pub epoch: Option<u32>,
    /// Where it ends on the leader.
    pub end_offset: u64,
}

/// What the controller says about a partition (the part replication reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// The leader.
    pub leader: Option<NodeId>,
    /// The leadership generation.
    pub leader_epoch: u32,
    /// The generation of the whole state.
    pub partition_epoch: u32,
    /// The replicas.
    pub replicas: Vec<NodeId>,
    /// The in-sync replicas.
    pub isr: Vec<NodeId>,
}
