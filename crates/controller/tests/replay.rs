//! The metadata state machine without I/O: any sequence of proposals (valid, stale, conflicting)
//! applies to the same image on every node, an image survives its snapshot encoding, and
//! replaying from a snapshot taken anywhere gives the image replaying from the start gives.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use cairn_controller::image::MetadataImage;
use cairn_controller::records::{
    BrokerInfo, Endpoint, MetadataRecord, PartitionState, PartitionTarget, Proposal,
};
use proptest::prelude::*;

const TOPICS: [&str; 3] = ["a", "b", "c"];

fn record() -> impl Strategy<Value = MetadataRecord> {
    let node = 1u32..5;
    let topic = (0usize..3).prop_map(|i| TOPICS[i].to_string());
    let replicas = proptest::sample::subsequence(vec![1u32, 2, 3, 4], 1..4);
    prop_oneof![
        (node.clone(), 0u8..3).prop_map(|(node_id, inc)| MetadataRecord::BrokerRegistered {
            broker: BrokerInfo {
                node_id,
                incarnation: format!("i{inc}"),
                dir_id: String::new(),
                native: Endpoint {
                    host: "h".into(),
                    port: 1
                },
                kafka: None,
                rack: None,
            },
        }),
        (node.clone(), 0u64..40).prop_map(|(node_id, broker_epoch)| {
            MetadataRecord::BrokerFenced {
                node_id,
                broker_epoch,
            }
        }),
        (node.clone(), 0u64..40).prop_map(|(node_id, broker_epoch)| {
            MetadataRecord::BrokerUnfenced {
                node_id,
                broker_epoch,
            }
        }),
        (
            topic.clone(),
            proptest::collection::vec(replicas.clone(), 1..4)
        )
            .prop_map(|(name, parts)| MetadataRecord::TopicCreated {
                name,
                config: BTreeMap::new(),
                created_ms: 0,
                partitions: parts
                    .into_iter()
                    .map(|r| {
                        let leader = r.first().copied();
                        PartitionState::new(r, leader)
                    })
                    .collect(),
            }),
        (
            topic.clone(),
            0u32..3,
            0u32..4,
            replicas.clone(),
            any::<bool>()
        )
            .prop_map(|(topic, partition, epoch, replicas, lead)| {
                MetadataRecord::PartitionChanged {
                    topic,
                    partition,
                    expected_partition_epoch: epoch,
                    target: PartitionTarget {
                        isr: replicas[..1].to_vec(),
                        leader: lead.then(|| replicas[0]),
                        replicas,
                        ..Default::default()
                    },
                }
            }),
        (topic.clone(), 0u64..40)
            .prop_map(|(name, topic_id)| MetadataRecord::TopicDeleted { name, topic_id }),
        (topic, 0u32..4, replicas).prop_map(|(topic, expected_count, r)| {
            MetadataRecord::PartitionsCreated {
                topic,
                expected_count,
                partitions: vec![PartitionState::new(r.clone(), r.first().copied())],
            }
        }),
        (node, 0i64..3000).prop_map(|(node_id, first)| MetadataRecord::ProducerIdsAllocated {
            node_id,
            first: first / 1000 * 1000,
            count: 1000,
        }),
    ]
}

fn proposals() -> impl Strategy<Value = Vec<Proposal>> {
    proptest::collection::vec(
        proptest::collection::vec(record(), 1..3).prop_map(|records| Proposal { records }),
        1..60,
    )
}

fn replay(image: &mut MetadataImage, from: u64, proposals: &[Proposal]) -> Vec<bool> {
    proposals
        .iter()
        .enumerate()
        .map(|(i, p)| image.apply(from + i as u64, p).is_ok())
        .collect()
}

proptest! {
    #[test]
    fn every_node_and_every_snapshot_point_reaches_the_same_image(
        proposals in proposals(),
        cut in 0usize..60,
    ) {
        let cut = cut.min(proposals.len());
        let mut a = MetadataImage::default();
        let mut b = MetadataImage::default();
        let outcomes_a = replay(&mut a, 0, &proposals);
        let outcomes_b = replay(&mut b, 0, &proposals);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&outcomes_a, &outcomes_b);
        prop_assert_eq!(a.offset, proposals.len() as u64);

        // A snapshot at `cut`, encoded as stored, then the rest.
        let mut first = MetadataImage::default();
        let mut outcomes = replay(&mut first, 0, &proposals[..cut]);
        let bytes = serde_json::to_vec(&first).unwrap();
        let mut restored: MetadataImage = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&restored, &first);
        outcomes.extend(replay(&mut restored, cut as u64, &proposals[cut..]));
        prop_assert_eq!(&restored, &a);
        prop_assert_eq!(outcomes, outcomes_a);
    }

    #[test]
    fn every_applied_partition_state_is_consistent(proposals in proposals()) {
        let mut image = MetadataImage::default();
        replay(&mut image, 0, &proposals);
        for (_, _, state) in image.partitions() {
            prop_assert!(!state.replicas.is_empty());
            prop_assert!(!state.isr.is_empty());
            prop_assert!(state.isr.iter().all(|r| state.replicas.contains(r)));
            if let Some(leader) = state.leader {
                prop_assert!(state.isr.contains(&leader));
            }
        }
    }
}

/// The generator must exercise acceptance as well as rejection, or the properties above say
/// little: over many sequences, every kind of record is applied at least once.
#[test]
fn the_generator_reaches_accepted_records_of_every_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut accepted = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let proposals = proposals().new_tree(&mut runner).unwrap().current();
        let mut image = MetadataImage::default();
        for (i, p) in proposals.iter().enumerate() {
            if image.apply(i as u64, p).is_ok() {
                for r in &p.records {
                    let kind = format!("{r:?}");
                    accepted.insert(kind.split([' ', '{']).next().unwrap_or("").to_string());
                }
            }
        }
    }
    for kind in [
        "BrokerRegistered",
        "BrokerFenced",
        "BrokerUnfenced",
        "TopicCreated",
        "PartitionChanged",
        "TopicDeleted",
        "PartitionsCreated",
        "ProducerIdsAllocated",
    ] {
        assert!(
            accepted.contains(kind),
            "{kind} never accepted: {accepted:?}"
        );
    }
}
