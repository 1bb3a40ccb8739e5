//! Choosing a partition for a record.

use std::sync::atomic::{AtomicU32, Ordering};

pub use cairn_protocol::partitioner::{murmur2, partition_for_key};

/// How the producer picks a partition for a record without an explicit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// Kafka's default: keyed records go to `murmur2(key) % partitions` (the same partition as
    /// with a Java or librdkafka "murmur2_random" producer); records without a key stick to one
    /// partition until its batch is sent, then move on (KIP-480).
    #[default]
    Murmur2Sticky,
    /// Every record to the next partition in turn, keys ignored.
    RoundRobin,
}

/// Round-robin and sticky state.
#[derive(Debug, Default)]
pub(crate) struct PartitionerState {
    next: AtomicU32,
}

impl PartitionerState {
    pub(crate) fn round_robin(&self, n_partitions: u32) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed) % n_partitions.max(1)
    }
}
