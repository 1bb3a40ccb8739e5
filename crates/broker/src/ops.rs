//! The broker's operations, independent of the protocol a request came over. Each listener
//! decodes its wire format into these, calls the core in `handler.rs`, and encodes the result in
//! its own format, mapping every [`BrokerError`] to its wire code at that edge. Fields a protocol
//! does not carry take their neutral value (`None`: not sent).

use std::time::Duration;

use bytes::Bytes;
use cairn_protocol::Offset;

use crate::error::BrokerError;
use crate::partition::Isolation;

/// Appends producer batches.
#[derive(Debug, Clone)]
pub struct Produce {
    /// 0 (no response), 1 (the leader appended), -1 (committed); anything else is refused per
    /// partition with INVALID_REQUIRED_ACKS.
    pub acks: i8,
    /// How long an acks=-1 produce may wait for the commit.
    pub timeout: Duration,
    /// Per topic, per partition, the batches.
    pub topics: Vec<(String, Vec<(u32, Bytes)>)>,
}

/// Where a partition's batches went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    /// Offset of the first record.
    pub base_offset: Offset,
    /// The log start offset after the append.
    pub log_start_offset: Offset,
}

/// Per topic, per partition, in request order.
pub type PerPartition<T> = Vec<(String, Vec<(u32, Result<T, BrokerError>)>)>;

/// Reads batches.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// The fetching replica's node id (a follower), or `None` for a consumer.
    pub replica_id: Option<u32>,
    /// How far reads may go; a follower's fetch reads to the log end.
    pub isolation: Isolation,
    /// Longest wait for `min_bytes`.
    pub max_wait: Duration,
    /// Bytes to wait for.
    pub min_bytes: u32,
    /// Response size bound.
    pub max_bytes: u32,
    /// The partitions.
    pub topics: Vec<(String, Vec<FetchPartition>)>,
}

/// One partition of a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPartition {
    /// Partition index.
    pub partition: u32,
    /// First offset wanted (a negative one is out of range).
    pub fetch_offset: i64,
    /// Bound for this partition.
    pub partition_max_bytes: u32,
    /// The leader epoch the client believes current, if it sent one.
    pub current_leader_epoch: Option<u32>,
    /// The epoch of the last batch the fetcher has (followers, KIP-595), if sent.
    pub last_fetched_epoch: Option<u32>,
}

/// One partition's fetched batches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchedPartition {
    /// The high watermark.
    pub high_watermark: Offset,
    /// The log start offset.
    pub log_start_offset: Offset,
    /// Whole batches (zero-copy slices of the log).
    pub records: Bytes,
}

/// Offsets by time.
#[derive(Debug, Clone)]
pub struct ListOffsets {
    /// Consumers read below the high watermark; a replica to the log end.
    pub isolation: Isolation,
    /// Per topic, the partitions.
    pub topics: Vec<(String, Vec<ListOffsetsPartition>)>,
}

/// (partition, current leader epoch if sent, timestamp: -1 latest, -2 earliest, or a time).
pub type ListOffsetsPartition = (u32, Option<u32>, i64);

/// A found offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffset {
    /// The offset.
    pub offset: Offset,
    /// The timestamp of the record found (-1 for latest/earliest).
    pub timestamp: i64,
    /// The partition's leader epoch.
    pub leader_epoch: u32,
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    /// Its name.
    pub name: String,
    /// Partitions; `None`: the broker's default.
    pub partitions: Option<u32>,
    /// Replicas of each partition; `None`: the broker's default.
    pub replication_factor: Option<u16>,
    /// Config overrides, as Kafka spells them.
    pub configs: Vec<(String, String)>,
}

/// A broker, as Metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerView {
    /// Node id.
    pub node_id: u32,
    /// Where native clients connect.
    pub native: (String, u16),
    /// Where Kafka clients connect (`None`: no Kafka listener).
    pub kafka: Option<(String, u16)>,
    /// Rack, if configured.
    pub rack: Option<String>,
}

/// A partition, as Metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// Index.
    pub partition: u32,
    /// The leader, or `None` while offline (LEADER_NOT_AVAILABLE).
    pub leader: Option<u32>,
    /// Leader epoch.
    pub leader_epoch: u32,
    /// Replicas.
    pub replicas: Vec<u32>,
    /// In-sync replicas.
    pub isr: Vec<u32>,
    /// Replicas whose broker is offline.
    pub offline: Vec<u32>,
}

/// The cluster as Metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataView {
    /// Live brokers.
    pub brokers: Vec<BrokerView>,
    /// The active controller's node id.
    pub controller_id: u32,
    /// Per topic asked for, its partitions or why not.
    pub topics: Vec<(String, Result<Vec<PartitionView>, BrokerError>)>,
}
