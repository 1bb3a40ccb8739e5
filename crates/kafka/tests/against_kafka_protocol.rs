//! Our bounded request decoders against the `kafka-protocol` crate's encoders, at every served
//! version; our zero-copy Fetch encoder against its Fetch encoder. An independent implementation
//! of the same message definitions is the oracle for field order and version conditions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::{Bytes, BytesMut};
use cairn_kafka::request::{CreatableTopic, FetchTopic, ProduceTopic, RequestError, decode};
use cairn_kafka::{Api, Decoded, Request, response};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, HeaderVersion, StrBytes};

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

fn topic(text: &str) -> TopicName {
    TopicName(s(text))
}

/// A whole request frame as `kafka-protocol` encodes it.
fn frame<M: Encodable + HeaderVersion>(api: Api, version: i16, body: &M) -> Bytes {
    let header = kafka_protocol::messages::RequestHeader::default()
        .with_request_api_key(api.key)
        .with_request_api_version(version)
        .with_correlation_id(0x0102_0304)
        .with_client_id(Some(s("client-1")));
    let mut buf = BytesMut::new();
    header.encode(&mut buf, M::header_version(version)).unwrap();
    body.encode(&mut buf, version).unwrap();
    buf.freeze()
}

fn decoded(api: Api, version: i16, bytes: Bytes) -> Request {
    let d = decode(bytes).unwrap_or_else(|e| panic!("{} v{version}: {e}", api.name));
    assert_eq!(d.header.api_key, api.key);
    assert_eq!(d.header.api_version, version);
    assert_eq!(d.header.correlation_id, 0x0102_0304);
    assert_eq!(d.header.client_id.as_deref(), Some("client-1"));
    d.request
}

fn served(api: Api) -> impl Iterator<Item = i16> {
    api.served_from.max(api.min)..=api.max
}

#[test]
fn produce_at_every_served_version() {
    for v in served(Api::PRODUCE) {
        let records = Bytes::from_static(b"not parsed by the decoder");
        let body = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(1500)
            .with_topic_data(vec![
                produce_request::TopicProduceData::default()
                    .with_name(topic("orders"))
                    .with_partition_data(vec![
                        produce_request::PartitionProduceData::default()
                            .with_index(3)
                            .with_records(Some(records.clone())),
                        produce_request::PartitionProduceData::default()
                            .with_index(4)
                            .with_records(None),
                    ]),
            ]);
        let Request::Produce(got) = decoded(Api::PRODUCE, v, frame(Api::PRODUCE, v, &body)) else {
            panic!()
        };
        assert_eq!(
            got,
            cairn_kafka::request::ProduceRequest {
                transactional_id: None,
                acks: -1,
                timeout_ms: 1500,
                topics: vec![ProduceTopic {
                    name: "orders".into(),
                    partitions: vec![(3, Some(records)), (4, None)],
                }],
            },
            "v{v}"
        );
    }
}

#[test]
fn fetch_at_every_served_version() {
    for v in served(Api::FETCH) {
        let mut body = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(500)
            .with_min_bytes(1)
            .with_max_bytes(52_428_800)
            .with_isolation_level(1)
            .with_topics(vec![
                fetch_request::FetchTopic::default()
                    .with_topic(topic("orders"))
                    .with_partitions(vec![
                        fetch_request::FetchPartition::default()
                            .with_partition(2)
                            .with_fetch_offset(1234)
                            .with_partition_max_bytes(1_048_576)
                            .with_current_leader_epoch(if v >= 9 { 7 } else { -1 })
                            .with_last_fetched_epoch(if v >= 12 { 6 } else { -1 })
                            .with_log_start_offset(if v >= 5 { 5 } else { -1 }),
                    ]),
            ]);
        if v >= 7 {
            body = body
                .with_session_id(0)
                .with_session_epoch(-1)
                .with_forgotten_topics_data(vec![
                    fetch_request::ForgottenTopic::default()
                        .with_topic(topic("old"))
                        .with_partitions(vec![1, 2]),
                ]);
        }
        if v >= 11 {
            body = body.with_rack_id(s("rack-a"));
        }
        let Request::Fetch(got) = decoded(Api::FETCH, v, frame(Api::FETCH, v, &body)) else {
            panic!()
        };
        assert_eq!(got.max_wait_ms, 500);
        assert_eq!(got.min_bytes, 1);
        assert_eq!(got.max_bytes, 52_428_800);
        assert_eq!(got.isolation_level, 1);
        assert_eq!(got.rack_id, if v >= 11 { "rack-a" } else { "" });
        assert_eq!(
            got.topics,
            vec![FetchTopic {
                name: "orders".into(),
                partitions: vec![cairn_kafka::request::FetchPartition {
                    partition: 2,
                    current_leader_epoch: if v >= 9 { 7 } else { -1 },
                    fetch_offset: 1234,
                    last_fetched_epoch: if v >= 12 { 6 } else { -1 },
                    log_start_offset: if v >= 5 { 5 } else { -1 },
                    partition_max_bytes: 1_048_576,
                }],
            }],
            "v{v}"
        );
    }
}

#[test]
fn list_offsets_at_every_served_version() {
    for v in served(Api::LIST_OFFSETS) {
        let body = ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![
                list_offsets_request::ListOffsetsTopic::default()
                    .with_name(topic("orders"))
                    .with_partitions(vec![
                        list_offsets_request::ListOffsetsPartition::default()
                            .with_partition_index(1)
                            .with_timestamp(-2)
                            .with_current_leader_epoch(if v >= 4 { 3 } else { -1 }),
                        list_offsets_request::ListOffsetsPartition::default()
                            .with_partition_index(2)
                            .with_timestamp(1_700_000_000_000),
                    ]),
            ]);
        let Request::ListOffsets(got) =
            decoded(Api::LIST_OFFSETS, v, frame(Api::LIST_OFFSETS, v, &body))
        else {
            panic!()
        };
        assert_eq!(
            got.topics,
            vec![(
                "orders".to_string(),
                vec![
                    (1, if v >= 4 { 3 } else { -1 }, -2),
                    (2, -1, 1_700_000_000_000)
                ]
            )],
            "v{v}"
        );
    }
}

#[test]
fn metadata_at_every_served_version() {
    for v in served(Api::METADATA) {
        let named = MetadataRequest::default()
            .with_topics(Some(vec![
                metadata_request::MetadataRequestTopic::default().with_name(Some(topic("a"))),
                metadata_request::MetadataRequestTopic::default().with_name(Some(topic("b"))),
            ]))
            .with_allow_auto_topic_creation(v < 4);
        let Request::Metadata(got) = decoded(Api::METADATA, v, frame(Api::METADATA, v, &named))
        else {
            panic!()
        };
        assert_eq!(got.topics, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(got.allow_auto_topic_creation, v < 4, "v{v}");
        // Every topic: an empty list in v0, null from v1.
        let all = MetadataRequest::default().with_topics(if v == 0 { Some(vec![]) } else { None });
        let Request::Metadata(got) = decoded(Api::METADATA, v, frame(Api::METADATA, v, &all))
        else {
            panic!()
        };
        assert_eq!(got.topics, None, "v{v}");
        if v >= 1 {
            let none = MetadataRequest::default().with_topics(Some(vec![]));
            let Request::Metadata(got) = decoded(Api::METADATA, v, frame(Api::METADATA, v, &none))
            else {
                panic!()
            };
            assert_eq!(got.topics, Some(vec![]), "v{v}");
        }
    }
}

#[test]
fn api_versions_at_every_served_version() {
    for v in served(Api::API_VERSIONS) {
        let body = ApiVersionsRequest::default()
            .with_client_software_name(s("librdkafka"))
            .with_client_software_version(s("2.0.2"));
        let body = if v >= 3 {
            body
        } else {
            ApiVersionsRequest::default()
        };
        let Request::ApiVersions(got) =
            decoded(Api::API_VERSIONS, v, frame(Api::API_VERSIONS, v, &body))
        else {
            panic!()
        };
        if v >= 3 {
            assert_eq!(got.client_software_name, "librdkafka");
            assert_eq!(got.client_software_version, "2.0.2");
        }
    }
}

#[test]
fn create_delete_topics_at_every_served_version() {
    for v in served(Api::CREATE_TOPICS) {
        let body = CreateTopicsRequest::default()
            .with_timeout_ms(5000)
            .with_validate_only(true)
            .with_topics(vec![
                create_topics_request::CreatableTopic::default()
                    .with_name(topic("t1"))
                    .with_num_partitions(6)
                    .with_replication_factor(1)
                    .with_configs(vec![
                        create_topics_request::CreatableTopicConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("1000"))),
                        create_topics_request::CreatableTopicConfig::default()
                            .with_name(s("cleanup.policy"))
                            .with_value(None),
                    ]),
            ]);
        let Request::CreateTopics(got) =
            decoded(Api::CREATE_TOPICS, v, frame(Api::CREATE_TOPICS, v, &body))
        else {
            panic!()
        };
        assert_eq!(
            got,
            cairn_kafka::request::CreateTopicsRequest {
                topics: vec![CreatableTopic {
                    name: "t1".into(),
                    num_partitions: 6,
                    replication_factor: 1,
                    assignments: vec![],
                    configs: vec![
                        ("retention.ms".into(), Some("1000".into())),
                        ("cleanup.policy".into(), None)
                    ],
                }],
                timeout_ms: 5000,
                validate_only: true,
            },
            "v{v}"
        );
    }
    for v in served(Api::DELETE_TOPICS) {
        let body = DeleteTopicsRequest::default()
            .with_topic_names(vec![topic("t1"), topic("t2")])
            .with_timeout_ms(3000);
        let Request::DeleteTopics(got) =
            decoded(Api::DELETE_TOPICS, v, frame(Api::DELETE_TOPICS, v, &body))
        else {
            panic!()
        };
        assert_eq!(got.names, vec!["t1".to_string(), "t2".to_string()], "v{v}");
        assert_eq!(got.timeout_ms, 3000);
    }
}

#[test]
fn describe_configs_and_init_producer_id_at_every_served_version() {
    for v in served(Api::DESCRIBE_CONFIGS) {
        let body = DescribeConfigsRequest::default()
            .with_include_synonyms(true)
            .with_resources(vec![
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("orders"))
                    .with_configuration_keys(Some(vec![s("retention.ms")])),
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("all"))
                    .with_configuration_keys(None),
            ]);
        let Request::DescribeConfigs(got) = decoded(
            Api::DESCRIBE_CONFIGS,
            v,
            frame(Api::DESCRIBE_CONFIGS, v, &body),
        ) else {
            panic!()
        };
        assert!(got.include_synonyms);
        assert_eq!(
            got.resources,
            vec![
                (2, "orders".into(), Some(vec!["retention.ms".into()])),
                (2, "all".into(), None)
            ],
            "v{v}"
        );
    }
    for v in served(Api::INIT_PRODUCER_ID) {
        let mut body = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000);
        if v >= 3 {
            body = body.with_producer_id(ProducerId(77)).with_producer_epoch(4);
        }
        let Request::InitProducerId(got) = decoded(
            Api::INIT_PRODUCER_ID,
            v,
            frame(Api::INIT_PRODUCER_ID, v, &body),
        ) else {
            panic!()
        };
        assert_eq!(got.transactional_id, None);
        assert_eq!(got.transaction_timeout_ms, 60_000);
        let want = if v >= 3 { (77, 4) } else { (-1, -1) };
        assert_eq!((got.producer_id, got.producer_epoch), want, "v{v}");
    }
}

#[test]
fn cluster_apis_at_every_served_version() {
    for v in served(Api::OFFSET_FOR_LEADER_EPOCH) {
        let mut body = OffsetForLeaderEpochRequest::default().with_topics(vec![
            offset_for_leader_epoch_request::OffsetForLeaderTopic::default()
                .with_topic(topic("orders"))
                .with_partitions(vec![
                    offset_for_leader_epoch_request::OffsetForLeaderPartition::default()
                        .with_partition(3)
                        .with_current_leader_epoch(if v >= 2 { 9 } else { -1 })
                        .with_leader_epoch(7),
                ]),
        ]);
        if v >= 3 {
            body = body.with_replica_id(BrokerId(-1));
        }
        let Request::OffsetForLeaderEpoch(got) = decoded(
            Api::OFFSET_FOR_LEADER_EPOCH,
            v,
            frame(Api::OFFSET_FOR_LEADER_EPOCH, v, &body),
        ) else {
            panic!()
        };
        assert_eq!(got.replica_id, -1);
        let current = if v >= 2 { 9 } else { -1 };
        assert_eq!(
            got.topics,
            vec![("orders".to_string(), vec![(3, current, 7)])],
            "v{v}"
        );
    }
    for v in served(Api::CREATE_PARTITIONS) {
        let body = CreatePartitionsRequest::default()
            .with_topics(vec![
                create_partitions_request::CreatePartitionsTopic::default()
                    .with_name(topic("orders"))
                    .with_count(12)
                    .with_assignments(None),
                create_partitions_request::CreatePartitionsTopic::default()
                    .with_name(topic("manual"))
                    .with_count(4)
                    .with_assignments(Some(vec![
                        create_partitions_request::CreatePartitionsAssignment::default()
                            .with_broker_ids(vec![BrokerId(1), BrokerId(2)]),
                    ])),
            ])
            .with_timeout_ms(5_000)
            .with_validate_only(true);
        let Request::CreatePartitions(got) = decoded(
            Api::CREATE_PARTITIONS,
            v,
            frame(Api::CREATE_PARTITIONS, v, &body),
        ) else {
            panic!()
        };
        assert_eq!(
            got.topics,
            vec![
                ("orders".to_string(), 12, false),
                ("manual".to_string(), 4, true)
            ],
            "v{v}"
        );
        assert_eq!((got.timeout_ms, got.validate_only), (5_000, true));
    }
    for v in served(Api::DESCRIBE_CLUSTER) {
        let mut body =
            DescribeClusterRequest::default().with_include_cluster_authorized_operations(true);
        if v >= 1 {
            body = body.with_endpoint_type(1);
        }
        let Request::DescribeCluster(got) = decoded(
            Api::DESCRIBE_CLUSTER,
            v,
            frame(Api::DESCRIBE_CLUSTER, v, &body),
        ) else {
            panic!()
        };
        assert!(got.include_cluster_authorized_operations);
        assert_eq!(got.endpoint_type, 1, "v{v}");
    }
}

#[test]
fn replication_admin_apis_at_every_served_version() {
    for v in served(Api::ELECT_LEADERS) {
        let body = ElectLeadersRequest::default()
            .with_election_type(if v >= 1 { 1 } else { 0 })
            .with_topic_partitions(Some(vec![
                elect_leaders_request::TopicPartitions::default()
                    .with_topic(topic("orders"))
                    .with_partitions(vec![0, 2]),
            ]))
            .with_timeout_ms(5_000);
        let Request::ElectLeaders(got) =
            decoded(Api::ELECT_LEADERS, v, frame(Api::ELECT_LEADERS, v, &body))
        else {
            panic!()
        };
        assert_eq!(got.election_type, if v >= 1 { 1 } else { 0 }, "v{v}");
        assert_eq!(got.topics, Some(vec![("orders".to_string(), vec![0, 2])]));
        let all = ElectLeadersRequest::default().with_topic_partitions(None);
        let Request::ElectLeaders(got) =
            decoded(Api::ELECT_LEADERS, v, frame(Api::ELECT_LEADERS, v, &all))
        else {
            panic!()
        };
        assert_eq!(got.topics, None, "v{v}: null means every partition");
    }
    for v in served(Api::ALTER_PARTITION_REASSIGNMENTS) {
        let body = AlterPartitionReassignmentsRequest::default()
            .with_timeout_ms(7_000)
            .with_topics(vec![
                alter_partition_reassignments_request::ReassignableTopic::default()
                    .with_name(topic("orders"))
                    .with_partitions(vec![
                        alter_partition_reassignments_request::ReassignablePartition::default()
                            .with_partition_index(1)
                            .with_replicas(Some(vec![BrokerId(2), BrokerId(3), BrokerId(4)])),
                        alter_partition_reassignments_request::ReassignablePartition::default()
                            .with_partition_index(2)
                            .with_replicas(None),
                    ]),
            ]);
        let api = Api::ALTER_PARTITION_REASSIGNMENTS;
        let Request::AlterPartitionReassignments(got) = decoded(api, v, frame(api, v, &body))
        else {
            panic!()
        };
        assert_eq!(got.timeout_ms, 7_000);
        assert_eq!(
            got.topics,
            vec![(
                "orders".to_string(),
                vec![(1, Some(vec![2, 3, 4])), (2, None)]
            )],
            "v{v}"
        );
    }
    for v in served(Api::LIST_PARTITION_REASSIGNMENTS) {
        let body = ListPartitionReassignmentsRequest::default()
            .with_timeout_ms(1_000)
            .with_topics(Some(vec![
                list_partition_reassignments_request::ListPartitionReassignmentsTopics::default()
                    .with_name(topic("orders"))
                    .with_partition_indexes(vec![1]),
            ]));
        let api = Api::LIST_PARTITION_REASSIGNMENTS;
        let Request::ListPartitionReassignments(got) = decoded(api, v, frame(api, v, &body)) else {
            panic!()
        };
        assert_eq!(
            got.topics,
            Some(vec![("orders".to_string(), vec![1])]),
            "v{v}"
        );
    }
}

#[test]
fn unserved_apis_and_versions_are_reported_with_their_correlation_id() {
    let body = MetadataRequest::default();
    let mut bytes = BytesMut::from(&frame(Api::METADATA, 9, &body)[..]);
    bytes[3] = 10; // Metadata v10 is not served (topic ids)
    match decode(bytes.freeze()) {
        Err(RequestError::UnsupportedVersion {
            correlation_id: 0x0102_0304,
            api_version: 10,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut bytes = BytesMut::from(&frame(Api::METADATA, 1, &body)[..]);
    bytes[1] = 57; // UpdateFeatures: not served
    assert!(matches!(
        decode(bytes.freeze()),
        Err(RequestError::UnknownApi { api_key: 57, .. })
    ));
    // Produce v2 is advertised (for librdkafka's feature detection) but not served.
    assert!(!Api::PRODUCE.serves(2) && Api::PRODUCE.serves(3));
    assert!(matches!(
        decode(Bytes::from_static(&[0, 3, 0])),
        Err(RequestError::Truncated(3))
    ));
}

#[test]
fn truncation_is_malformed_and_trailing_bytes_are_ignored_as_kafka_does() {
    let body = MetadataRequest::default().with_topics(None);
    let good = frame(Api::METADATA, 9, &body);
    let mut long = BytesMut::from(&good[..]);
    long.extend_from_slice(&[0]);
    assert!(decode(long.freeze()).is_ok());
    // What librdkafka 2.x sends for "all topics" at Metadata v9: a 4-byte placeholder where the
    // compact null belongs.
    let librdkafka = Bytes::from_static(&[
        0, 3, 0, 9, 0, 0, 0, 3, 0, 7, b'r', b'd', b'k', b'a', b'f', b'k', b'a', 0, 0, 0, 0, 0, 1,
        0, 0, 0,
    ]);
    let Ok(Decoded {
        request: Request::Metadata(metadata),
        ..
    }) = decode(librdkafka)
    else {
        panic!()
    };
    assert_eq!(metadata.topics, None);
    for cut in 8..good.len() {
        assert!(
            matches!(
                decode(good.slice(..cut)),
                Err(RequestError::Malformed { .. })
            ),
            "cut at {cut}"
        );
    }
}

#[test]
fn zero_copy_fetch_encoder_matches_kafka_protocol_at_every_served_version() {
    for v in served(Api::FETCH) {
        let partition = |index: i32, records: Option<Bytes>| {
            fetch_response::PartitionData::default()
                .with_partition_index(index)
                .with_error_code(if records.is_some() { 0 } else { 1 })
                .with_high_watermark(100)
                .with_last_stable_offset(100)
                .with_log_start_offset(if v >= 5 { 3 } else { -1 })
                .with_aborted_transactions(Some(vec![]))
                .with_preferred_read_replica(BrokerId(-1))
                .with_records(records)
        };
        let response = FetchResponse::default()
            .with_session_id(0)
            .with_responses(vec![
                fetch_response::FetchableTopicResponse::default()
                    .with_topic(topic("orders"))
                    .with_partitions(vec![
                        partition(0, Some(Bytes::from(vec![7u8; 300]))),
                        partition(1, Some(Bytes::new())),
                        partition(2, None),
                    ]),
            ]);
        let ours: Vec<u8> = response::encode_fetch(42, v, &response).unwrap().concat();
        let theirs = response::encode("FetchResponse", 42, v, &response).unwrap();
        assert_eq!(ours, theirs, "Fetch v{v}");
    }
}

#[test]
fn api_versions_response_header_is_never_flexible() {
    let encoded =
        response::encode("ApiVersionsResponse", 9, 3, &response::api_versions(0)).unwrap();
    // correlation id, then directly the error code (no tagged-field byte in the header).
    assert_eq!(&encoded[..6], &[0, 0, 0, 9, 0, 0]);
}

#[test]
fn group_offset_apis_at_every_served_version() {
    use cairn_kafka::request::OffsetFetchRequest as Fetch;
    for v in served(Api::FIND_COORDINATOR) {
        let body = if v >= 4 {
            FindCoordinatorRequest::default()
                .with_key_type(0)
                .with_coordinator_keys(vec![s("g1"), s("g2")])
        } else {
            FindCoordinatorRequest::default()
                .with_key(s("g1"))
                .with_key_type(0)
        };
        let Request::FindCoordinator(got) = decoded(
            Api::FIND_COORDINATOR,
            v,
            frame(Api::FIND_COORDINATOR, v, &body),
        ) else {
            panic!()
        };
        let want: Vec<String> = if v >= 4 {
            vec!["g1".into(), "g2".into()]
        } else {
            vec!["g1".into()]
        };
        assert_eq!((got.keys, got.batched), (want, v >= 4), "v{v}");
    }
    for v in served(Api::OFFSET_COMMIT) {
        let mut body = OffsetCommitRequest::default()
            .with_group_id(GroupId(s("group-a")))
            .with_generation_id_or_member_epoch(-1)
            .with_member_id(s(""))
            .with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(topic("orders"))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(3)
                            .with_committed_offset(1234)
                            .with_committed_leader_epoch(if v >= 6 { 2 } else { -1 })
                            .with_committed_metadata(Some(s("meta"))),
                    ]),
            ]);
        if v >= 7 {
            body = body.with_group_instance_id(None);
        }
        let Request::OffsetCommit(got) =
            decoded(Api::OFFSET_COMMIT, v, frame(Api::OFFSET_COMMIT, v, &body))
        else {
            panic!()
        };
        assert_eq!(got.group_id, "group-a");
        assert_eq!(got.generation_id, -1);
        assert_eq!(
            got.topics,
            vec![(
                "orders".to_string(),
                vec![(
                    3,
                    1234,
                    if v >= 6 { 2 } else { -1 },
                    Some("meta".to_string())
                )]
            )],
            "v{v}"
        );
    }
    for v in served(Api::OFFSET_FETCH) {
        let body = OffsetFetchRequest::default()
            .with_group_id(GroupId(s("group-a")))
            .with_topics(Some(vec![
                offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(topic("orders"))
                    .with_partition_indexes(vec![0, 3]),
            ]));
        let Request::OffsetFetch(got) =
            decoded(Api::OFFSET_FETCH, v, frame(Api::OFFSET_FETCH, v, &body))
        else {
            panic!()
        };
        assert_eq!(
            got,
            Fetch {
                group_id: "group-a".into(),
                topics: Some(vec![("orders".into(), vec![0, 3])]),
            },
            "v{v}"
        );
        if v >= 2 {
            let all = OffsetFetchRequest::default()
                .with_group_id(GroupId(s("group-a")))
                .with_topics(None);
            let Request::OffsetFetch(got) =
                decoded(Api::OFFSET_FETCH, v, frame(Api::OFFSET_FETCH, v, &all))
            else {
                panic!()
            };
            assert_eq!(got.topics, None, "v{v}");
        }
    }
}

#[test]
fn group_membership_apis_at_every_served_version() {
    for v in served(Api::JOIN_GROUP) {
        let body = JoinGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_session_timeout_ms(6000)
            .with_rebalance_timeout_ms(if v >= 1 { 30_000 } else { -1 })
            .with_member_id(s("m-1"))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![
                join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(Bytes::from_static(b"subscription")),
            ]);
        let Request::JoinGroup(got) = decoded(Api::JOIN_GROUP, v, frame(Api::JOIN_GROUP, v, &body))
        else {
            panic!()
        };
        assert_eq!(
            (
                got.group_id.as_str(),
                got.session_timeout_ms,
                got.member_id.as_str()
            ),
            ("g", 6000, "m-1")
        );
        assert_eq!(
            got.rebalance_timeout_ms,
            if v >= 1 { 30_000 } else { 6000 },
            "v{v}"
        );
        assert_eq!(
            got.protocols,
            vec![("range".to_string(), Bytes::from_static(b"subscription"))]
        );
    }
    for v in served(Api::SYNC_GROUP) {
        let instance = (v >= 3).then(|| s("pod-1"));
        let body = SyncGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id(3)
            .with_member_id(s("m-1"))
            .with_group_instance_id(instance.clone())
            .with_assignments(vec![
                sync_group_request::SyncGroupRequestAssignment::default()
                    .with_member_id(s("m-2"))
                    .with_assignment(Bytes::from_static(b"parts")),
            ]);
        let Request::SyncGroup(got) = decoded(Api::SYNC_GROUP, v, frame(Api::SYNC_GROUP, v, &body))
        else {
            panic!()
        };
        assert_eq!((got.generation_id, got.member_id.as_str()), (3, "m-1"));
        assert_eq!(
            got.group_instance_id,
            instance.map(|i| i.to_string()),
            "v{v}"
        );
        assert_eq!(
            got.assignments,
            vec![("m-2".to_string(), Bytes::from_static(b"parts"))],
            "v{v}"
        );
    }
    for v in served(Api::HEARTBEAT) {
        let instance = (v >= 3).then(|| s("pod-1"));
        let body = HeartbeatRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_generation_id(4)
            .with_member_id(s("m-1"))
            .with_group_instance_id(instance.clone());
        let Request::Heartbeat(got) = decoded(Api::HEARTBEAT, v, frame(Api::HEARTBEAT, v, &body))
        else {
            panic!()
        };
        assert_eq!(
            (got.generation_id, got.member_id.as_str()),
            (4, "m-1"),
            "v{v}"
        );
        assert_eq!(
            got.group_instance_id,
            instance.map(|i| i.to_string()),
            "v{v}"
        );
    }
    for v in served(Api::LEAVE_GROUP) {
        let body = if v >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s("g")))
                .with_members(vec![
                    leave_group_request::MemberIdentity::default().with_member_id(s("m-1")),
                    leave_group_request::MemberIdentity::default()
                        .with_member_id(s(""))
                        .with_group_instance_id(Some(s("pod-2"))),
                ])
        } else {
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s("g")))
                .with_member_id(s("m-1"))
        };
        let Request::LeaveGroup(got) =
            decoded(Api::LEAVE_GROUP, v, frame(Api::LEAVE_GROUP, v, &body))
        else {
            panic!()
        };
        let want: Vec<(String, Option<String>)> = if v >= 3 {
            vec![("m-1".into(), None), (String::new(), Some("pod-2".into()))]
        } else {
            vec![("m-1".into(), None)]
        };
        assert_eq!(got.members, want, "v{v}");
    }
}
