//! The active controller's decisions as pure functions of the committed image: the records a
//! broker's registration, a fence, an unfence or a leader's ISR change commit. [`crate::node`]
//! runs them on its image and commits the records through Raft (the image's `apply` checks each
//! record against the state it was decided on: a stale decision changes nothing). The
//! replication simulation (`crates/replication/tests/simulation.rs`) runs these same functions
//! and the same `apply` with the replication state machines, so the controller's rules and the
//! replication protocol are tested together, under one seeded scheduler.

use cairn_protocol::native::ErrorCode;

use crate::image::{MetadataImage, Rejected, TopicImage};
use crate::placement;
use crate::records::{BrokerInfo, MetadataRecord, NodeId, PartitionState, PartitionTarget};

/// A `PartitionChanged` record for every partition `decide` wants to change.
pub fn partition_changes(
    image: &MetadataImage,
    decide: impl Fn(&PartitionState) -> Option<PartitionTarget>,
) -> Vec<MetadataRecord> {
    partition_changes_by_topic(image, |_, state| decide(state))
}

/// As [`partition_changes`], deciding with the partition's topic at hand (its config).
pub fn partition_changes_by_topic(
    image: &MetadataImage,
    decide: impl Fn(&TopicImage, &PartitionState) -> Option<PartitionTarget>,
) -> Vec<MetadataRecord> {
    image
        .topics
        .values()
        .flat_map(|topic| {
            topic
                .partitions
                .iter()
                .enumerate()
                .filter_map(|(partition, state)| {
                    Some(MetadataRecord::PartitionChanged {
                        topic: topic.name.clone(),
                        partition: partition as u32,
                        expected_partition_epoch: state.partition_epoch,
                        target: decide(topic, state)?,
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The broker epoch of `info`'s registration if this very incarnation is registered already (a
/// retry of a registration that took effect: answered again, nothing committed).
pub fn existing_registration(image: &MetadataImage, info: &BrokerInfo) -> Option<u64> {
    image
        .brokers
        .get(&info.node_id)
        .filter(|b| b.info.incarnation == info.incarnation)
        .map(|b| b.epoch)
}

/// A broker (a new incarnation, or one restarted) registers: it starts fenced, and whatever its
/// node led or was in sync for moves now (the new process may have lost what the old one had).
pub fn register(image: &MetadataImage, info: BrokerInfo) -> Vec<MetadataRecord> {
    let node = info.node_id;
    with_leaderships_lost(
        image,
        node,
        MetadataRecord::BrokerRegistered { broker: info },
    )
}

/// Fencing `node`'s registration `epoch`: the record and every leadership and ISR membership it
/// loses.
pub fn fence(image: &MetadataImage, node: NodeId, epoch: u64) -> Vec<MetadataRecord> {
    let fenced = MetadataRecord::BrokerFenced {
        node_id: node,
        broker_epoch: epoch,
    };
    with_leaderships_lost(image, node, fenced)
}

/// `record`, then every leadership and ISR membership `node` loses by it.
fn with_leaderships_lost(
    image: &MetadataImage,
    node: NodeId,
    record: MetadataRecord,
) -> Vec<MetadataRecord> {
    let mut records = vec![record];
    records.extend(partition_changes(image, |state| {
        placement::on_fenced(state, node, |r| r != node && image.is_live(r))
    }));
    records
}

/// A fenced broker heartbeats having applied the metadata up to `metadata_offset`: it is
/// unfenced (and offline partitions it can lead get it as leader) once it has applied the record
/// that fenced it, so that it never leads on metadata older than the leadership changes its
/// fencing made. `None`: nothing to change.
pub fn unfence(
    image: &MetadataImage,
    node: NodeId,
    broker_epoch: u64,
    metadata_offset: u64,
) -> Option<Vec<MetadataRecord>> {
    let broker = image
        .brokers
        .get(&node)
        .filter(|b| b.epoch == broker_epoch)?;
    if !broker.fenced || metadata_offset <= broker.fenced_at.max(broker_epoch) {
        return None;
    }
    let mut records = vec![MetadataRecord::BrokerUnfenced {
        node_id: node,
        broker_epoch,
    }];
    records.extend(partition_changes(image, |state| {
        placement::on_unfenced(state, node, |r| r == node || image.is_live(r))
    }));
    Some(records)
}

/// What a broker's heartbeat decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heartbeat {
    /// Fence it (it is shutting down, or cannot write): commit these records.
    Fence(Vec<MetadataRecord>),
    /// It has caught up with its fence: unfence it with these records.
    Unfence(Vec<MetadataRecord>),
    /// Nothing to commit; it stays fenced or not.
    Unchanged {
        /// Whether it is fenced.
        fenced: bool,
    },
}

/// A heartbeat of `node`'s registration `broker_epoch`, having applied the metadata up to
/// `metadata_offset`. `shutting_down`: fence it now (controlled shutdown). `want_fence`: it
/// cannot write (a full disk, a log an I/O error poisoned: Kafka's `WantFence`); fenced too,
/// but only if another broker is live to take its leaderships (alone, it had better keep
/// serving reads). Refused if the registration is not the current one.
pub fn heartbeat(
    image: &MetadataImage,
    node: NodeId,
    broker_epoch: u64,
    metadata_offset: u64,
    shutting_down: bool,
    want_fence: bool,
) -> Result<Heartbeat, Rejected> {
    let Some(broker) = image.brokers.get(&node).filter(|b| b.epoch == broker_epoch) else {
        return Err(Rejected::new(
            ErrorCode::STALE_BROKER_EPOCH,
            format!("broker {node} has no registration with epoch {broker_epoch}"),
        ));
    };
    let others = image.live_brokers().any(|b| b.info.node_id != node);
    if shutting_down || (want_fence && others) {
        return Ok(if broker.fenced {
            Heartbeat::Unchanged { fenced: true }
        } else {
            Heartbeat::Fence(fence(image, node, broker_epoch))
        });
    }
    // Caught up once it has applied the record that fenced it (its registration, or the fence
    // with the leadership changes that came with it): a broker fenced while cut off must not
    // lead again on the metadata it had then.
    Ok(match unfence(image, node, broker_epoch, metadata_offset) {
        Some(records) => Heartbeat::Unfence(records),
        None => Heartbeat::Unchanged {
            fenced: broker.fenced,
        },
    })
}

/// A partition leader's ISR change (Kafka's AlterPartition), decided in `(leader_epoch,
/// partition_epoch)`: accepted only from the live registration of the current leader, on the
/// current partition epoch, and adding only live brokers (a replica may leave the ISR whatever
/// its state; it may join only while its broker is live).
pub fn alter_partition(
    image: &MetadataImage,
    node: NodeId,
    broker_epoch: u64,
    topic: &str,
    partition: u32,
    (leader_epoch, partition_epoch): (u32, u32),
    isr: &[NodeId],
) -> Result<MetadataRecord, Rejected> {
    if image
        .brokers
        .get(&node)
        .is_none_or(|b| b.epoch != broker_epoch || b.fenced)
    {
        return Err(Rejected::new(
            ErrorCode::STALE_BROKER_EPOCH,
            format!("broker {node} has no live registration with epoch {broker_epoch}"),
        ));
    }
    let Some(state) = image.partition(topic, partition) else {
        return Err(Rejected::new(
            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
            format!("{topic}-{partition} does not exist"),
        ));
    };
    if state.leader != Some(node) || state.leader_epoch != leader_epoch {
        return Err(Rejected::new(
            ErrorCode::FENCED_LEADER_EPOCH,
            format!(
                "{topic}-{partition} is led by {:?} in epoch {}, not by {node} in epoch {leader_epoch}",
                state.leader, state.leader_epoch
            ),
        ));
    }
    if state.partition_epoch != partition_epoch {
        return Err(Rejected::new(
            ErrorCode::INVALID_UPDATE_VERSION,
            format!(
                "{topic}-{partition} is at partition epoch {}, the change was decided on {partition_epoch}",
                state.partition_epoch
            ),
        ));
    }
    if let Some(ineligible) = isr
        .iter()
        .find(|r| !state.isr.contains(r) && !image.is_live(**r))
    {
        return Err(Rejected::new(
            ErrorCode::INELIGIBLE_REPLICA,
            format!("replica {ineligible} of {topic}-{partition} is not a live broker"),
        ));
    }
    Ok(MetadataRecord::PartitionChanged {
        topic: topic.to_string(),
        partition,
        expected_partition_epoch: partition_epoch,
        target: state.with(isr.to_vec(), Some(node)),
    })
}
