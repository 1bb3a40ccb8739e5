//! The metadata image: the cluster's state after applying the records of the metadata log up to
//! an offset. Applying is deterministic and reads nothing but the image and the record (no clock,
//! no randomness), so every node that applies the same log holds the same image, and replaying
//! from a snapshot gives what replaying from the start gives.
//!
//! Images are values: a node publishes each as an `Arc<MetadataImage>` and never changes a
//! published one. Topics sit behind `Arc`s of their own, so the next image shares every topic a
//! record did not touch.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_protocol::native::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::records::{
    BrokerInfo, MetadataRecord, NodeId, PartitionState, PartitionTarget, Proposal,
};

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerState {
    /// What it said about itself.
    pub info: BrokerInfo,
    /// Its broker epoch: the offset of its registration.
    pub epoch: u64,
    /// Whether it may not lead (it has not caught up since registering, or went silent).
    pub fenced: bool,
    /// The offset of the record that fenced it last (its registration, or a fence): it is
    /// unfenced only once it has applied that record, so it never leads on metadata older than
    /// the leadership changes its fencing made.
    #[serde(default)]
    pub fenced_at: u64,
}

/// A topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicImage {
    /// Its id: the offset of the record that created it (unique in the cluster's history, so a
    /// topic created again under the same name is another topic).
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Config overrides, as Kafka spells them.
    pub config: BTreeMap<String, String>,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Partitions, by index.
    pub partitions: Vec<PartitionState>,
}

/// Why a proposal was not applied. Nothing of it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Rejected {
    /// The error code (Kafka's numbers).
    pub code: i16,
    /// Human text.
    pub message: String,
}

impl Rejected {
    /// A refusal with `code` and why.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Rejected {
        Rejected {
            code: code.0,
            message: message.into(),
        }
    }

    /// The error code.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode(self.code)
    }
}

/// The cluster's metadata at one offset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataImage {
    /// One past the index of the last applied entry of the metadata log: a broker whose image
    /// has this offset has seen every record below it.
    pub offset: u64,
    /// Registered brokers.
    pub brokers: BTreeMap<NodeId, BrokerState>,
    /// Topics by name.
    pub topics: BTreeMap<String, Arc<TopicImage>>,
    /// The next producer id the cluster has not handed out.
    pub next_producer_id: i64,
    /// Leader elections the log records: partition changes that gave a partition a leader
    /// other than the one it had (including its first after being offline).
    #[serde(default)]
    pub leader_elections: u64,
    /// The unclean ones among them: the new leader was not in the ISR (records may be lost).
    #[serde(default)]
    pub unclean_leader_elections: u64,
}

impl MetadataImage {
    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<&Arc<TopicImage>> {
        self.topics.get(name)
    }

    /// A partition's state.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionState> {
        self.topics.get(topic)?.partitions.get(partition as usize)
    }

    /// Brokers that may lead: registered and not fenced.
    pub fn live_brokers(&self) -> impl Iterator<Item = &BrokerState> {
        self.brokers.values().filter(|b| !b.fenced)
    }

    /// Whether `node` is registered and not fenced.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.brokers.get(&node).is_some_and(|b| !b.fenced)
    }

    /// Every partition, as (topic, index, state).
    pub fn partitions(&self) -> impl Iterator<Item = (&str, u32, &PartitionState)> {
        self.topics.values().flat_map(|t| {
            t.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| (t.name.as_str(), i as u32, p))
        })
    }

    /// Brokers registered but fenced.
    pub fn fenced_brokers(&self) -> usize {
        self.brokers.values().filter(|b| b.fenced).count()
    }

    /// Partitions without a leader.
    pub fn offline_partitions(&self) -> usize {
        self.partitions()
            .filter(|(_, _, p)| p.leader.is_none())
            .count()
    }

    /// How many partitions the cluster has.
    pub fn n_partitions(&self) -> u64 {
        self.topics
            .values()
            .map(|t| t.partitions.len() as u64)
            .sum()
    }

    /// Applies the proposal of the entry at `index`: all its records, or none (the error says
    /// why). The offset moves past `index` either way.
    pub fn apply(&mut self, index: u64, proposal: &Proposal) -> Result<(), Rejected> {
        let mut next = self.clone();
        let result = proposal
            .records
            .iter()
            .try_for_each(|record| next.apply_record(index, record));
        if result.is_ok() {
            *self = next;
        }
        self.advance(index);
        result
    }

    /// Moves the offset past `index` (entries without records: Raft's own).
    pub fn advance(&mut self, index: u64) {
        self.offset = self.offset.max(index.saturating_add(1));
    }

    fn apply_record(&mut self, index: u64, record: &MetadataRecord) -> Result<(), Rejected> {
        match record {
            MetadataRecord::BrokerRegistered { broker } => {
                self.brokers.insert(
                    broker.node_id,
                    BrokerState {
                        info: broker.clone(),
                        epoch: index,
                        fenced: true,
                        fenced_at: index,
                    },
                );
                Ok(())
            }
            MetadataRecord::BrokerFenced {
                node_id,
                broker_epoch,
            } => self.set_fenced(*node_id, *broker_epoch, Some(index)),
            MetadataRecord::BrokerUnfenced {
                node_id,
                broker_epoch,
            } => self.set_fenced(*node_id, *broker_epoch, None),
            MetadataRecord::TopicCreated {
                name,
                config,
                created_ms,
                partitions,
            } => {
                if self.topics.contains_key(name) {
                    return Err(Rejected::new(
                        ErrorCode::TOPIC_ALREADY_EXISTS,
                        format!("topic {name:?} already exists"),
                    ));
                }
                if partitions.is_empty() {
                    return Err(Rejected::new(
                        ErrorCode::INVALID_PARTITIONS,
                        "a topic needs at least one partition",
                    ));
                }
                for state in partitions {
                    check_state(name, state)?;
                }
                self.topics.insert(
                    name.clone(),
                    Arc::new(TopicImage {
                        id: index,
                        name: name.clone(),
                        config: config.clone(),
                        created_ms: *created_ms,
                        partitions: partitions.clone(),
                    }),
                );
                Ok(())
            }
            MetadataRecord::PartitionsCreated {
                topic,
                expected_count,
                partitions,
            } => {
                let found = self.topic_mut(topic)?;
                if found.partitions.len() != *expected_count as usize {
                    return Err(Rejected::new(
                        ErrorCode::INVALID_UPDATE_VERSION,
                        format!(
                            "{topic} has {} partitions, the decision saw {expected_count}",
                            found.partitions.len()
                        ),
                    ));
                }
                for state in partitions {
                    check_state(topic, state)?;
                }
                found.partitions.extend(partitions.iter().cloned());
                Ok(())
            }
            MetadataRecord::PartitionChanged {
                topic,
                partition,
                expected_partition_epoch,
                target,
            } => {
                let found = self.topic_mut(topic)?;
                let Some(state) = found.partitions.get_mut(*partition as usize) else {
                    return Err(Rejected::new(
                        ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                        format!("{topic}-{partition} does not exist"),
                    ));
                };
                if state.partition_epoch != *expected_partition_epoch {
                    return Err(Rejected::new(
                        ErrorCode::INVALID_UPDATE_VERSION,
                        format!(
                            "{topic}-{partition} is at partition epoch {}, the change expected {}",
                            state.partition_epoch, expected_partition_epoch
                        ),
                    ));
                }
                let next = changed(state, target);
                check_state(topic, &next)?;
                let elected = next.leader.is_some() && next.leader != state.leader;
                let unclean = next.leader.is_some_and(|l| !state.isr.contains(&l));
                *state = next;
                self.leader_elections += u64::from(elected);
                self.unclean_leader_elections += u64::from(elected && unclean);
                Ok(())
            }
            MetadataRecord::TopicDeleted { name, topic_id } => match self.topics.get(name) {
                Some(topic) if topic.id == *topic_id => {
                    self.topics.remove(name);
                    Ok(())
                }
                _ => Err(Rejected::new(
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    format!("topic {name:?} (id {topic_id}) does not exist"),
                )),
            },
            MetadataRecord::TopicConfigChanged { name, config } => {
                self.topic_mut(name)?.config = config.clone();
                Ok(())
            }
            MetadataRecord::ProducerIdsAllocated {
                node_id: _,
                first,
                count,
            } => {
                if *first != self.next_producer_id {
                    return Err(Rejected::new(
                        ErrorCode::INVALID_UPDATE_VERSION,
                        format!(
                            "producer ids from {first} were asked for; the next free is {}",
                            self.next_producer_id
                        ),
                    ));
                }
                self.next_producer_id = first
                    .checked_add(i64::from(*count))
                    .filter(|n| *n < i64::MAX)
                    .ok_or_else(|| {
                        Rejected::new(ErrorCode::INVALID_REQUEST, "producer ids exhausted")
                    })?;
                Ok(())
            }
        }
    }

    /// Fences (at the record of offset `fenced_at`) or, with `None`, unfences a registration.
    fn set_fenced(
        &mut self,
        node: NodeId,
        epoch: u64,
        fenced_at: Option<u64>,
    ) -> Result<(), Rejected> {
        match self.brokers.get_mut(&node) {
            Some(broker) if broker.epoch == epoch => {
                broker.fenced = fenced_at.is_some();
                if let Some(at) = fenced_at {
                    broker.fenced_at = at;
                }
                Ok(())
            }
            _ => Err(Rejected::new(
                ErrorCode::STALE_BROKER_EPOCH,
                format!("broker {node} has no registration with epoch {epoch}"),
            )),
        }
    }

    fn topic_mut(&mut self, name: &str) -> Result<&mut TopicImage, Rejected> {
        self.topics.get_mut(name).map(Arc::make_mut).ok_or_else(|| {
            Rejected::new(
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("topic {name:?} does not exist"),
            )
        })
    }
}

/// The state after `target` is applied to `state`: the leader epoch rises when the leader
/// changes, the partition epoch at every change.
pub fn changed(state: &PartitionState, target: &PartitionTarget) -> PartitionState {
    let leader_changed = state.leader != target.leader;
    PartitionState {
        replicas: target.replicas.clone(),
        isr: target.isr.clone(),
        leader: target.leader,
        leader_epoch: state.leader_epoch + u32::from(leader_changed),
        partition_epoch: state.partition_epoch + 1,
        adding: target.adding.clone(),
        removing: target.removing.clone(),
    }
}

/// A partition's state must make sense: distinct replicas, a non-empty ISR among them, a leader
/// (if any) in the ISR.
fn check_state(topic: &str, state: &PartitionState) -> Result<(), Rejected> {
    let invalid = |why: String| Err(Rejected::new(ErrorCode::INVALID_REQUEST, why));
    let mut seen = state.replicas.clone();
    seen.sort_unstable();
    seen.dedup();
    if state.replicas.is_empty() || seen.len() != state.replicas.len() {
        return invalid(format!(
            "{topic}: replicas {:?} are not distinct node ids",
            state.replicas
        ));
    }
    if state.isr.is_empty() || state.isr.iter().any(|n| !state.replicas.contains(n)) {
        return invalid(format!(
            "{topic}: ISR {:?} is not a non-empty subset of the replicas {:?}",
            state.isr, state.replicas
        ));
    }
    let moving = state.adding.iter().chain(&state.removing);
    if moving.clone().any(|r| !state.replicas.contains(r))
        || state.adding.iter().any(|r| state.removing.contains(r))
    {
        return invalid(format!(
            "{topic}: reassignment adding {:?}, removing {:?} does not fit the replicas {:?}",
            state.adding, state.removing, state.replicas
        ));
    }
    if let Some(leader) = state.leader
        && !state.isr.contains(&leader)
    {
        return invalid(format!(
            "{topic}: leader {leader} is not in the ISR {:?}",
            state.isr
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Endpoint;

    fn broker(id: NodeId) -> MetadataRecord {
        MetadataRecord::BrokerRegistered {
            broker: BrokerInfo {
                node_id: id,
                incarnation: format!("inc-{id}"),
                dir_id: format!("dir-{id}"),
                native: Endpoint {
                    host: "127.0.0.1".into(),
                    port: 9000 + id as u16,
                },
                kafka: None,
                rack: None,
            },
        }
    }

    fn one(record: MetadataRecord) -> Proposal {
        Proposal {
            records: vec![record],
        }
    }

    #[test]
    fn records_apply_with_their_preconditions() {
        let mut image = MetadataImage::default();
        image.apply(3, &one(broker(1))).unwrap();
        assert_eq!(image.offset, 4);
        assert!(image.brokers[&1].fenced);
        assert_eq!(image.brokers[&1].epoch, 3);
        // A stale broker epoch changes nothing.
        let stale = MetadataRecord::BrokerUnfenced {
            node_id: 1,
            broker_epoch: 2,
        };
        assert_eq!(
            image.apply(4, &one(stale)).unwrap_err().error_code(),
            ErrorCode::STALE_BROKER_EPOCH
        );
        assert_eq!(image.offset, 5, "the offset moves past a rejected entry");
        image
            .apply(
                5,
                &one(MetadataRecord::BrokerUnfenced {
                    node_id: 1,
                    broker_epoch: 3,
                }),
            )
            .unwrap();
        assert!(image.is_live(1));
        let create = MetadataRecord::TopicCreated {
            name: "t".into(),
            config: BTreeMap::new(),
            created_ms: 7,
            partitions: vec![PartitionState::new(vec![1], Some(1))],
        };
        image.apply(6, &one(create.clone())).unwrap();
        assert_eq!(image.topic("t").unwrap().id, 6);
        assert_eq!(
            image.apply(7, &one(create)).unwrap_err().error_code(),
            ErrorCode::TOPIC_ALREADY_EXISTS
        );
        let change = |epoch, leader| MetadataRecord::PartitionChanged {
            topic: "t".into(),
            partition: 0,
            expected_partition_epoch: epoch,
            target: PartitionTarget {
                replicas: vec![1],
                isr: vec![1],
                leader,
                ..Default::default()
            },
        };
        image.apply(8, &one(change(0, None))).unwrap();
        let state = image.partition("t", 0).unwrap();
        assert_eq!(
            (state.leader, state.leader_epoch, state.partition_epoch),
            (None, 1, 1)
        );
        assert_eq!(
            image
                .apply(9, &one(change(0, Some(1))))
                .unwrap_err()
                .error_code(),
            ErrorCode::INVALID_UPDATE_VERSION
        );
        image.apply(10, &one(change(1, Some(1)))).unwrap();
        let state = image.partition("t", 0).unwrap();
        assert_eq!(
            (state.leader, state.leader_epoch, state.partition_epoch),
            (Some(1), 2, 2)
        );
    }

    #[test]
    fn a_proposal_applies_whole_or_not_at_all() {
        let mut image = MetadataImage::default();
        let proposal = Proposal {
            records: vec![
                broker(1),
                MetadataRecord::BrokerFenced {
                    node_id: 9,
                    broker_epoch: 0,
                },
            ],
        };
        assert!(image.apply(0, &proposal).is_err());
        assert!(image.brokers.is_empty(), "the first record was not applied");
        assert_eq!(image.offset, 1);
    }

    #[test]
    fn invalid_partition_states_are_refused() {
        let mut image = MetadataImage::default();
        for (replicas, isr, leader) in [
            (vec![], vec![], None),
            (vec![1, 1], vec![1], Some(1)),
            (vec![1, 2], vec![3], Some(3)),
            (vec![1, 2], vec![1], Some(2)),
            (vec![1], vec![], None),
        ] {
            let record = MetadataRecord::TopicCreated {
                name: "t".into(),
                config: BTreeMap::new(),
                created_ms: 0,
                partitions: vec![PartitionState {
                    replicas,
                    isr,
                    leader,
                    leader_epoch: 0,
                    partition_epoch: 0,
                    ..Default::default()
                }],
            };
            assert_eq!(
                image.apply(0, &one(record)).unwrap_err().error_code(),
                ErrorCode::INVALID_REQUEST
            );
        }
    }

    #[test]
    fn producer_id_blocks_follow_one_another() {
        let mut image = MetadataImage::default();
        let alloc = |first| {
            one(MetadataRecord::ProducerIdsAllocated {
                node_id: 1,
                first,
                count: 1000,
            })
        };
        image.apply(0, &alloc(0)).unwrap();
        assert!(
            image.apply(1, &alloc(0)).is_err(),
            "a block is handed out once"
        );
        image.apply(2, &alloc(1000)).unwrap();
        assert_eq!(image.next_producer_id, 2000);
    }
}
