//! The follower's side: what to fetch, where to truncate, how far the high watermark is known.

use crate::{DivergingEpoch, FetchPosition, NodeId, ReplicaLog};

/// One partition's follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerState {
    leader: NodeId,
    leader_epoch: u32,
    high_watermark: u64,
}

impl FollowerState {
    /// Follows `leader` at `leader_epoch`, with the high watermark known so far.
    pub fn new(leader: NodeId, leader_epoch: u32, high_watermark: u64) -> FollowerState {
        FollowerState {
            leader,
            leader_epoch,
            high_watermark,
        }
    }

    /// The leader.
    pub fn leader(&self) -> NodeId {
        self.leader
    }

    /// The leader epoch it follows.
    pub fn leader_epoch(&self) -> u32 {
        self.leader_epoch
    }

    /// The high watermark as far as this follower knows it.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// What the next fetch says.
    pub fn position(&self, log: &impl ReplicaLog) -> FetchPosition {
        FetchPosition::of(log)
    }

    /// Where to truncate after the leader said the log diverges (Kafka's
    /// `getOffsetTruncationState`): if this log holds the leader's epoch, to the smaller of the
    /// two ends of that epoch; if it holds only older epochs, to the end of the newest of them
    /// (the next fetch checks again); if none, everything goes.
    pub fn truncation_offset(&self, diverging: DivergingEpoch, log: &impl ReplicaLog) -> u64 {
        let offset = match diverging.epoch {
            None => diverging.end_offset,
            Some(epoch) => match log.end_offset_for_epoch(epoch) {
                Some((mine, end)) if mine == epoch => end.min(diverging.end_offset),
                Some((_, end)) => end,
                None => log.log_start(),
            },
        };
        offset.min(log.log_end())
    }

    /// The leader's high watermark arrived with a fetch response: the follower's is the smaller
    /// of it and its own log end, and never goes back.
    pub fn on_high_watermark(&mut self, leader_hw: u64, log: &impl ReplicaLog) {
        self.high_watermark = self.high_watermark.max(leader_hw.min(log.log_end()));
    }

    /// After a truncation, the high watermark is at most the log end.
    pub fn on_truncated(&mut self, log: &impl ReplicaLog) {
        self.high_watermark = self.high_watermark.min(log.log_end());
    }
}
