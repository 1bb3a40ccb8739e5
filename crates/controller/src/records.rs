//! The metadata records: the cluster's state changes, in the order the Raft log commits them
//! (KRaft's idea). A Raft entry carries one [`Proposal`]: records applied together or not at all.
//! A record may state a precondition (the partition epoch it expects, the broker epoch it names):
//! applying checks it against the image, so two controllers' decisions made from the same state
//! cannot both take effect.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id (broker and controller ids share one space: a combined node has one id).
pub type NodeId = u32;

/// Where a listener is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Host name or address, as clients should use it.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What a broker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// Its node id.
    pub node_id: NodeId,
    /// A random id of this process's life: a restarted broker has a new one.
    pub incarnation: String,
    /// The id of its data directory (created with it, kept in it): a new incarnation with the
    /// same directory is the node restarted (one process holds a directory at a time), one with
    /// another directory is a second process claiming the node id.
    pub dir_id: String,
    /// The native-protocol listener.
    pub native: Endpoint,
    /// The Kafka-protocol listener, if any.
    pub kafka: Option<Endpoint>,
    /// Its rack, for rack-aware placement.
    pub rack: Option<String>,
}

/// A partition's replicas, leader and in-sync replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartitionState {
    /// The replicas, the preferred leader first.
    pub replicas: Vec<NodeId>,
    /// The in-sync replicas: never empty (when the last one is lost the partition goes offline
    /// and keeps it, so that only it can lead again).
    pub isr: Vec<NodeId>,
    /// The leader, `None` while offline.
    pub leader: Option<NodeId>,
    /// The leadership generation: +1 at every leader change.
    pub leader_epoch: u32,
    /// The state's generation: +1 at every change (leader, ISR or replicas).
    pub partition_epoch: u32,
    /// A reassignment under way (KIP-455): replicas being added (they copy the log and join the
    /// ISR; `replicas` already lists them).
    #[serde(default)]
    pub adding: Vec<NodeId>,
    /// Replicas to drop once every target replica is in sync (`replicas` still lists them).
    #[serde(default)]
    pub removing: Vec<NodeId>,
}

impl PartitionState {
    /// A new partition on `replicas`, led by `leader`. Every replica starts in sync (their
    /// logs are all empty), as in Kafka; the high watermark moves once they have fetched.
    pub fn new(replicas: Vec<NodeId>, leader: Option<NodeId>) -> PartitionState {
        let isr = replicas.clone();
        PartitionState {
            replicas,
            isr,
            leader,
            leader_epoch: 0,
            partition_epoch: 0,
            adding: Vec::new(),
            removing: Vec::new(),
        }
    }
}

/// The state a partition should move to (the epochs follow from the change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTarget {
    /// The replicas.
    pub replicas: Vec<NodeId>,
    /// The in-sync replicas.
    pub isr: Vec<NodeId>,
    /// The leader.
    pub leader: Option<NodeId>,
    /// Replicas being added by a reassignment.
    #[serde(default)]
    pub adding: Vec<NodeId>,
    /// Replicas being removed by a reassignment.
    #[serde(default)]
    pub removing: Vec<NodeId>,
}

impl PartitionState {
    /// The target replicas of a reassignment under way, or the replicas.
    pub fn target_replicas(&self) -> Vec<NodeId> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.removing.contains(r))
            .collect()
    }

    /// Whether a reassignment is under way.
    pub fn reassigning(&self) -> bool {
        !self.adding.is_empty() || !self.removing.is_empty()
    }

    /// This state as a target with another ISR and leader (the reassignment kept).
    pub fn with(&self, isr: Vec<NodeId>, leader: Option<NodeId>) -> PartitionTarget {
        PartitionTarget {
            replicas: self.replicas.clone(),
            isr,
            leader,
            adding: self.adding.clone(),
            removing: self.removing.clone(),
        }
    }
}

/// One change of the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MetadataRecord {
    /// A broker registered (or registered again, as a new incarnation): fenced until it has
    /// caught up with the metadata. Its broker epoch is the offset of this record.
    BrokerRegistered {
        /// What it said about itself.
        broker: BrokerInfo,
    },
    /// A broker may no longer lead (silent past its session, or shut down).
    BrokerFenced {
        /// The broker.
        node_id: NodeId,
        /// Its registration the decision was about; another one is left alone.
        broker_epoch: u64,
    },
    /// A broker caught up and heartbeats: it may lead.
    BrokerUnfenced {
        /// The broker.
        node_id: NodeId,
        /// Its registration.
        broker_epoch: u64,
    },
    /// A topic was created. Its id is the offset of this record.
    TopicCreated {
        /// Name.
        name: String,
        /// Config overrides, as Kafka spells them.
        config: BTreeMap<String, String>,
        /// Creation time, Unix ms.
        created_ms: i64,
        /// Its partitions, by index.
        partitions: Vec<PartitionState>,
    },
    /// Partitions were added to a topic (Kafka's CreatePartitions).
    PartitionsCreated {
        /// The topic.
        topic: String,
        /// The partition count the decision saw: the new partitions follow it.
        expected_count: u32,
        /// The new partitions.
        partitions: Vec<PartitionState>,
    },
    /// A partition's leader, ISR or replicas changed (Kafka's AlterPartition, elections).
    PartitionChanged {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The partition epoch the decision saw; another one means it is stale.
        expected_partition_epoch: u32,
        /// The new state.
        target: PartitionTarget,
    },
    /// A topic was deleted.
    TopicDeleted {
        /// Name.
        name: String,
        /// Its id, so a topic created again under the name is not deleted by a stale record.
        topic_id: u64,
    },
    /// A topic's config overrides were replaced.
    TopicConfigChanged {
        /// The topic.
        name: String,
        /// The new overrides.
        config: BTreeMap<String, String>,
    },
    /// A block of producer ids was handed to a broker (Kafka's AllocateProducerIds): ids are
    /// unique cluster-wide.
    ProducerIdsAllocated {
        /// The broker.
        node_id: NodeId,
        /// The first id of the block: the next id the cluster had not handed out.
        first: i64,
        /// How many.
        count: u32,
    },
}

/// Records applied together or not at all: one Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The records, in order.
    pub records: Vec<MetadataRecord>,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} records", self.records.len())
    }
}
