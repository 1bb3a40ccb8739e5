//! Golden vectors of the native protocol. Each expected frame payload is built here field by field
//! from `protocol/SPEC.md` with a plain byte builder that shares no code with the codec, compared
//! with what the codec encodes, decoded back, and compared with the checked-in hex file in
//! `protocol/vectors/native/` (regenerate with `CAIRN_WRITE_VECTORS=1`). Also: hostile inputs
//! (huge counts and lengths, truncation, trailing bytes) are rejected without allocating.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;

use bytes::Bytes;
use cairn_protocol::native::*;

/// A byte builder following the spec's primitive types.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i8(self, v: i8) -> Self {
        self.u8(v as u8)
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn string(self, s: &str) -> Self {
        let b = self.u16(s.len() as u16);
        b.raw(s.as_bytes())
    }
    fn bytes(self, v: &[u8]) -> Self {
        let b = self.u32(v.len() as u32);
        b.raw(v)
    }
    fn count(self, n: u32) -> Self {
        self.u32(n)
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    fn req(api: u16, corr: u32) -> Self {
        B::default().u16(api).u16(0).u32(corr).string("golden")
    }
    fn resp(corr: u32) -> Self {
        B::default().u32(corr).i16(0).string("")
    }
}

fn check(name: &str, codec: Vec<u8>, spec: B) {
    assert_eq!(hex(&codec), hex(&spec.0), "{name}: codec and spec disagree");
    let path = manifest_dir().join(format!("../../protocol/vectors/native/{name}.hex"));
    if std::env::var_os("CAIRN_WRITE_VECTORS").is_some() {
        std::fs::write(&path, hex(&codec) + "\n").unwrap();
    }
    let stored =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        stored.trim(),
        hex(&codec),
        "{name}: checked-in vector differs"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn round_trip_request(payload: &[u8], expect: &Request) {
    let mut buf = Bytes::copy_from_slice(payload);
    let header = RequestHeader::decode(&mut buf, "header").unwrap();
    let api = ApiKey::from_u16(header.api_key).unwrap();
    assert_eq!(&Request::decode_body(api, buf).unwrap(), expect);
}

fn round_trip_response<T: Wire + PartialEq + std::fmt::Debug>(payload: &[u8], expect: &T) {
    let mut buf = Bytes::copy_from_slice(payload);
    let header = ResponseHeader::decode(&mut buf, "header").unwrap();
    assert_eq!(header.error_code, 0);
    assert_eq!(&decode_exact::<T>(buf).unwrap(), expect);
}

#[test]
fn api_versions() {
    let req = Request::ApiVersions(ApiVersionsRequest {});
    let payload = encode_request(1, "golden", &req);
    check("api_versions_request", payload.clone(), B::req(0, 1));
    round_trip_request(&payload, &req);
    let resp = ApiVersionsResponse {
        apis: vec![ApiVersion {
            api_key: 5,
            min_version: 0,
            max_version: 0,
        }],
        broker_version: "0.0.0".into(),
    };
    let payload = encode_response(1, &resp);
    check(
        "api_versions_response",
        payload.clone(),
        B::resp(1).count(1).u16(5).u16(0).u16(0).string("0.0.0"),
    );
    round_trip_response(&payload, &resp);
}

#[test]
fn metadata() {
    let req = Request::Metadata(MetadataRequest {
        topics: vec!["orders".into()],
        allow_auto_create: true,
    });
    let payload = encode_request(2, "golden", &req);
    check(
        "metadata_request",
        payload.clone(),
        B::req(1, 2).count(1).string("orders").u8(1),
    );
    round_trip_request(&payload, &req);
    let resp = MetadataResponse {
        brokers: vec![BrokerMetadata {
            node_id: 1,
            host: "127.0.0.1".into(),
            port: 9192,
            rack: "eu-1a".into(),
        }],
        controller_id: 1,
        topics: vec![TopicMetadata {
            error_code: 0,
            name: "orders".into(),
            partitions: vec![PartitionMetadata {
                partition: 0,
                error_code: 0,
                leader: 1,
                leader_epoch: 4,
                replicas: vec![1, 2],
                isr: vec![1],
                offline_replicas: vec![2],
            }],
        }],
    };
    let payload = encode_response(2, &resp);
    let spec = B::resp(2)
        .count(1)
        .u32(1)
        .string("127.0.0.1")
        .u16(9192)
        .string("eu-1a")
        .u32(1)
        .count(1)
        .i16(0)
        .string("orders")
        .count(1)
        .u32(0)
        .i16(0)
        .u32(1)
        .u32(4)
        .count(2)
        .u32(1)
        .u32(2)
        .count(1)
        .u32(1)
        .count(1)
        .u32(2);
    check("metadata_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn create_and_delete_topics() {
    let req = Request::CreateTopics(CreateTopicsRequest {
        topics: vec![CreatableTopic {
            name: "orders".into(),
            partitions: 3,
            replication_factor: -1,
            configs: vec![ConfigEntry {
                key: "retention.ms".into(),
                value: "60000".into(),
            }],
        }],
        validate_only: false,
    });
    let payload = encode_request(3, "golden", &req);
    let spec = B::req(2, 3)
        .count(1)
        .string("orders")
        .u32(3)
        .i16(-1)
        .count(1)
        .string("retention.ms")
        .string("60000")
        .u8(0);
    check("create_topics_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = CreateTopicsResponse {
        topics: vec![TopicResult {
            name: "orders".into(),
            error_code: 36,
            error_message: "exists".into(),
        }],
    };
    let payload = encode_response(3, &resp);
    check(
        "create_topics_response",
        payload.clone(),
        B::resp(3)
            .count(1)
            .string("orders")
            .i16(36)
            .string("exists"),
    );
    round_trip_response(&payload, &resp);

    let req = Request::DeleteTopics(DeleteTopicsRequest {
        names: vec!["orders".into()],
    });
    let payload = encode_request(4, "golden", &req);
    check(
        "delete_topics_request",
        payload.clone(),
        B::req(3, 4).count(1).string("orders"),
    );
    round_trip_request(&payload, &req);
    let resp = DeleteTopicsResponse {
        topics: vec![TopicResult {
            name: "orders".into(),
            error_code: 0,
            error_message: String::new(),
        }],
    };
    let payload = encode_response(4, &resp);
    check(
        "delete_topics_response",
        payload.clone(),
        B::resp(4).count(1).string("orders").i16(0).string(""),
    );
    round_trip_response(&payload, &resp);
}

#[test]
fn describe_topics() {
    let req = Request::DescribeTopics(DescribeTopicsRequest { names: vec![] });
    let payload = encode_request(5, "golden", &req);
    check(
        "describe_topics_request",
        payload.clone(),
        B::req(4, 5).count(0),
    );
    round_trip_request(&payload, &req);
    let resp = DescribeTopicsResponse {
        topics: vec![DescribedTopic {
            name: "orders".into(),
            error_code: 0,
            error_message: String::new(),
            configs: vec![DescribedConfig {
                key: "cleanup.policy".into(),
                value: "delete".into(),
                is_default: true,
            }],
            partitions: vec![DescribedPartition {
                partition: 0,
                error_code: 0,
                leader: 1,
                leader_epoch: 0,
                replicas: vec![1, 3],
                isr: vec![1, 3],
                log_start_offset: 0,
                log_end_offset: 42,
                high_watermark: 42,
                size_bytes: 4096,
                n_segments: 1,
            }],
        }],
    };
    let payload = encode_response(5, &resp);
    let spec = B::resp(5)
        .count(1)
        .string("orders")
        .i16(0)
        .string("")
        .count(1)
        .string("cleanup.policy")
        .string("delete")
        .u8(1)
        .count(1)
        .u32(0)
        .i16(0)
        .u32(1)
        .u32(0)
        .count(2)
        .u32(1)
        .u32(3)
        .count(2)
        .u32(1)
        .u32(3)
        .u64(0)
        .u64(42)
        .u64(42)
        .u64(4096)
        .u32(1);
    check("describe_topics_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn produce() {
    let records = Bytes::from_static(b"<a record batch>");
    let req = Request::Produce(ProduceRequest {
        acks: -1,
        timeout_ms: 30_000,
        topics: vec![ProduceTopic {
            name: "orders".into(),
            partitions: vec![ProducePartition {
                partition: 2,
                records: records.clone(),
            }],
        }],
    });
    let payload = encode_request(6, "golden", &req);
    let spec = B::req(5, 6)
        .i8(-1)
        .u32(30_000)
        .count(1)
        .string("orders")
        .count(1)
        .u32(2)
        .bytes(&records);
    check("produce_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = ProduceResponse {
        topics: vec![ProduceTopicResponse {
            name: "orders".into(),
            partitions: vec![ProducePartitionResponse {
                partition: 2,
                error_code: 0,
                error_message: String::new(),
                base_offset: 1000,
                log_append_time: -1,
                log_start_offset: 0,
            }],
        }],
    };
    let payload = encode_response(6, &resp);
    let spec = B::resp(6)
        .count(1)
        .string("orders")
        .count(1)
        .u32(2)
        .i16(0)
        .string("")
        .u64(1000)
        .i64(-1)
        .u64(0);
    check("produce_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn fetch() {
    let req = Request::Fetch(FetchRequest {
        max_wait_ms: 500,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![FetchTopic {
            name: "orders".into(),
            partitions: vec![FetchPartition {
                partition: 0,
                fetch_offset: 7,
                partition_max_bytes: 65536,
                current_leader_epoch: 3,
            }],
        }],
    });
    let payload = encode_request(7, "golden", &req);
    let spec = B::req(6, 7)
        .u32(500)
        .u32(1)
        .u32(1 << 20)
        .count(1)
        .string("orders")
        .count(1)
        .u32(0)
        .u64(7)
        .u32(65536)
        .i32(3);
    check("fetch_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = FetchResponse {
        topics: vec![FetchTopicResponse {
            name: "orders".into(),
            partitions: vec![FetchPartitionResponse {
                partition: 0,
                error_code: 0,
                high_watermark: 9,
                log_start_offset: 0,
                records: Bytes::from_static(b"batches"),
            }],
        }],
    };
    let payload = encode_response(7, &resp);
    let spec = B::resp(7)
        .count(1)
        .string("orders")
        .count(1)
        .u32(0)
        .i16(0)
        .u64(9)
        .u64(0)
        .bytes(b"batches");
    check("fetch_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn list_offsets() {
    let req = Request::ListOffsets(ListOffsetsRequest {
        topics: vec![ListOffsetsTopic {
            name: "orders".into(),
            partitions: vec![ListOffsetsPartition {
                partition: 1,
                timestamp: EARLIEST_TIMESTAMP,
                current_leader_epoch: -1,
            }],
        }],
    });
    let payload = encode_request(8, "golden", &req);
    check(
        "list_offsets_request",
        payload.clone(),
        B::req(7, 8)
            .count(1)
            .string("orders")
            .count(1)
            .u32(1)
            .i64(-2)
            .i32(-1),
    );
    round_trip_request(&payload, &req);
    let resp = ListOffsetsResponse {
        topics: vec![ListOffsetsTopicResponse {
            name: "orders".into(),
            partitions: vec![ListOffsetsPartitionResponse {
                partition: 1,
                error_code: 0,
                timestamp: -1,
                offset: 0,
            }],
        }],
    };
    let payload = encode_response(8, &resp);
    check(
        "list_offsets_response",
        payload.clone(),
        B::resp(8)
            .count(1)
            .string("orders")
            .count(1)
            .u32(1)
            .i16(0)
            .i64(-1)
            .u64(0),
    );
    round_trip_response(&payload, &resp);
}

/// Checks one request/response pair of the group API `api` against its spec bytes.
#[allow(clippy::too_many_arguments)]
fn group_pair<T: Wire + PartialEq + std::fmt::Debug>(
    name: &str,
    api: u16,
    corr: u32,
    req: Request,
    req_spec: impl FnOnce(B) -> B,
    resp: T,
    resp_spec: impl FnOnce(B) -> B,
) {
    assert_eq!(req.api_key() as u16, api);
    let payload = encode_request(corr, "golden", &req);
    check(
        &format!("{name}_request"),
        payload.clone(),
        req_spec(B::req(api, corr)),
    );
    round_trip_request(&payload, &req);
    let payload = encode_response(corr, &resp);
    check(
        &format!("{name}_response"),
        payload.clone(),
        resp_spec(B::resp(corr)),
    );
    round_trip_response(&payload, &resp);
}

#[test]
fn group_membership() {
    group_pair(
        "find_coordinator",
        8,
        20,
        Request::FindCoordinator(FindCoordinatorRequest {
            group_id: "billing".into(),
        }),
        |b| b.string("billing"),
        FindCoordinatorResponse {
            error_code: 0,
            node_id: 1,
            host: "127.0.0.1".into(),
            port: 9192,
        },
        |b| b.i16(0).u32(1).string("127.0.0.1").u16(9192),
    );
    group_pair(
        "join_group",
        9,
        21,
        Request::JoinGroup(JoinGroupRequest {
            group_id: "billing".into(),
            member_id: "m-1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 300_000,
            protocol_type: "consumer".into(),
            protocols: vec![JoinProtocol {
                name: "range".into(),
                metadata: Bytes::from_static(b"sub"),
            }],
        }),
        |b| {
            b.string("billing")
                .string("m-1")
                .u32(10_000)
                .u32(300_000)
                .string("consumer")
                .count(1)
                .string("range")
                .bytes(b"sub")
        },
        JoinGroupResponse {
            error_code: 0,
            generation: 3,
            protocol_name: "range".into(),
            leader: "m-1".into(),
            member_id: "m-1".into(),
            members: vec![JoinMember {
                member_id: "m-1".into(),
                metadata: Bytes::from_static(b"sub"),
            }],
        },
        |b| {
            b.i16(0)
                .i32(3)
                .string("range")
                .string("m-1")
                .string("m-1")
                .count(1)
                .string("m-1")
                .bytes(b"sub")
        },
    );
    group_pair(
        "sync_group",
        10,
        22,
        Request::SyncGroup(SyncGroupRequest {
            group_id: "billing".into(),
            generation: 3,
            member_id: "m-1".into(),
            assignments: vec![SyncAssignment {
                member_id: "m-1".into(),
                assignment: Bytes::from_static(b"asg"),
            }],
        }),
        |b| {
            b.string("billing")
                .i32(3)
                .string("m-1")
                .count(1)
                .string("m-1")
                .bytes(b"asg")
        },
        SyncGroupResponse {
            error_code: 0,
            assignment: Bytes::from_static(b"asg"),
        },
        |b| b.i16(0).bytes(b"asg"),
    );
    group_pair(
        "heartbeat",
        11,
        23,
        Request::Heartbeat(HeartbeatRequest {
            group_id: "billing".into(),
            generation: 3,
            member_id: "m-1".into(),
            max_wait_ms: 3_000,
        }),
        |b| b.string("billing").i32(3).string("m-1").u32(3_000),
        HeartbeatResponse { error_code: 27 },
        |b| b.i16(27),
    );
    group_pair(
        "leave_group",
        12,
        24,
        Request::LeaveGroup(LeaveGroupRequest {
            group_id: "billing".into(),
            member_id: "m-1".into(),
        }),
        |b| b.string("billing").string("m-1"),
        LeaveGroupResponse { error_code: 0 },
        |b| b.i16(0),
    );
}

#[test]
fn group_offsets_and_admin() {
    group_pair(
        "offset_commit",
        13,
        30,
        Request::OffsetCommit(OffsetCommitRequest {
            group_id: "billing".into(),
            generation: -1,
            member_id: String::new(),
            topics: vec![CommitTopic {
                name: "orders".into(),
                partitions: vec![CommitPartition {
                    partition: 2,
                    offset: 42,
                    metadata: "m".into(),
                }],
            }],
        }),
        |b| {
            b.string("billing")
                .i32(-1)
                .string("")
                .count(1)
                .string("orders")
                .count(1)
                .u32(2)
                .u64(42)
                .string("m")
        },
        OffsetCommitResponse {
            topics: vec![TopicPartitionErrors {
                name: "orders".into(),
                partitions: vec![PartitionError {
                    partition: 2,
                    error_code: 0,
                }],
            }],
        },
        |b| b.count(1).string("orders").count(1).u32(2).i16(0),
    );
    group_pair(
        "offset_fetch",
        14,
        31,
        Request::OffsetFetch(OffsetFetchRequest {
            group_id: "billing".into(),
            topics: vec![OffsetFetchTopic {
                name: "orders".into(),
                partitions: vec![2, 3],
            }],
        }),
        |b| {
            b.string("billing")
                .count(1)
                .string("orders")
                .count(2)
                .u32(2)
                .u32(3)
        },
        OffsetFetchResponse {
            error_code: 0,
            topics: vec![FetchedOffsetTopic {
                name: "orders".into(),
                partitions: vec![
                    FetchedOffset {
                        partition: 2,
                        offset: 42,
                        metadata: "m".into(),
                        error_code: 0,
                    },
                    FetchedOffset {
                        partition: 3,
                        offset: -1,
                        metadata: String::new(),
                        error_code: 0,
                    },
                ],
            }],
        },
        |b| {
            b.i16(0)
                .count(1)
                .string("orders")
                .count(2)
                .u32(2)
                .i64(42)
                .string("m")
                .i16(0)
                .u32(3)
                .i64(-1)
                .string("")
                .i16(0)
        },
    );
    group_pair(
        "list_groups",
        15,
        32,
        Request::ListGroups(ListGroupsRequest {}),
        |b| b,
        ListGroupsResponse {
            groups: vec![ListedGroup {
                group_id: "billing".into(),
                protocol_type: "consumer".into(),
                state: "Stable".into(),
            }],
        },
        |b| {
            b.count(1)
                .string("billing")
                .string("consumer")
                .string("Stable")
        },
    );
    group_pair(
        "describe_groups",
        16,
        33,
        Request::DescribeGroups(DescribeGroupsRequest {
            groups: vec!["billing".into()],
        }),
        |b| b.count(1).string("billing"),
        DescribeGroupsResponse {
            groups: vec![DescribedGroup {
                group_id: "billing".into(),
                error_code: 0,
                state: "Stable".into(),
                protocol_type: "consumer".into(),
                protocol: "range".into(),
                generation: 3,
                members: vec![DescribedMember {
                    member_id: "m-1".into(),
                    client_id: "app".into(),
                    metadata: Bytes::from_static(b"sub"),
                    assignment: Bytes::from_static(b"asg"),
                }],
            }],
        },
        |b| {
            b.count(1)
                .string("billing")
                .i16(0)
                .string("Stable")
                .string("consumer")
                .string("range")
                .i32(3)
                .count(1)
                .string("m-1")
                .string("app")
                .bytes(b"sub")
                .bytes(b"asg")
        },
    );
    group_pair(
        "delete_groups",
        17,
        34,
        Request::DeleteGroups(DeleteGroupsRequest {
            groups: vec!["billing".into()],
        }),
        |b| b.count(1).string("billing"),
        DeleteGroupsResponse {
            results: vec![GroupResult {
                group_id: "billing".into(),
                error_code: 68,
            }],
        },
        |b| b.count(1).string("billing").i16(68),
    );
}

#[test]
fn error_response() {
    let payload = encode_error_response(
        9,
        ErrorCode::UNSUPPORTED_VERSION,
        "produce v9 is not supported",
    );
    check(
        "error_response",
        payload,
        B::default()
            .u32(9)
            .i16(35)
            .string("produce v9 is not supported"),
    );
}

#[test]
fn hostile_inputs_are_rejected_without_allocating() {
    // An array count of 2^32-1 with nothing behind it.
    let body = B::default().count(u32::MAX).u8(0).0;
    let err = Request::decode_body(ApiKey::Metadata, Bytes::from(body)).unwrap_err();
    assert!(matches!(err, DecodeError::CountTooLarge { .. }), "{err}");
    // A bytes length far past the frame.
    let body = B::default()
        .i8(1)
        .u32(0)
        .count(1)
        .string("t")
        .count(1)
        .u32(0)
        .u32(u32::MAX)
        .0;
    let err = Request::decode_body(ApiKey::Produce, Bytes::from(body)).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }), "{err}");
    // Trailing bytes, truncation, bad UTF-8, bad bool.
    let err = Request::decode_body(ApiKey::ApiVersions, Bytes::from_static(&[0])).unwrap_err();
    assert!(matches!(err, DecodeError::TrailingBytes { n_bytes: 1 }));
    let err = Request::decode_body(ApiKey::Fetch, Bytes::from_static(&[0, 0])).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }));
    let body = B::default().count(1).u16(2).raw(&[0xff, 0xfe]).u8(0).0;
    assert!(matches!(
        Request::decode_body(ApiKey::Metadata, Bytes::from(body)),
        Err(DecodeError::Utf8 { .. })
    ));
    let body = B::default().count(0).u8(7).0;
    assert!(matches!(
        Request::decode_body(ApiKey::CreateTopics, Bytes::from(body)),
        Err(DecodeError::InvalidValue { .. })
    ));
}

#[test]
fn describe_cluster() {
    let req = Request::DescribeCluster(DescribeClusterRequest {});
    let payload = encode_request(21, "golden", &req);
    check("describe_cluster_request", payload.clone(), B::req(18, 21));
    round_trip_request(&payload, &req);
    let resp = DescribeClusterResponse {
        controller_id: 2,
        term: 7,
        metadata_offset: 130,
        brokers: vec![DescribedBroker {
            node_id: 1,
            host: "10.0.0.1".into(),
            port: 9192,
            kafka: "10.0.0.1:9092".into(),
            rack: String::new(),
            fenced: true,
            broker_epoch: 41,
        }],
        voters: vec![
            QuorumVoter { node_id: 2, lag: 0 },
            QuorumVoter {
                node_id: 3,
                lag: -1,
            },
        ],
    };
    let payload = encode_response(21, &resp);
    let spec = B::resp(21)
        .u32(2)
        .u64(7)
        .u64(130)
        .count(1)
        .u32(1)
        .string("10.0.0.1")
        .u16(9192)
        .string("10.0.0.1:9092")
        .string("")
        .u8(1)
        .u64(41)
        .count(2)
        .u32(2)
        .i64(0)
        .u32(3)
        .i64(-1);
    check("describe_cluster_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn create_partitions() {
    let req = Request::CreatePartitions(CreatePartitionsRequest {
        topics: vec![PartitionsToCreate {
            name: "orders".into(),
            count: 12,
        }],
        validate_only: false,
    });
    let payload = encode_request(22, "golden", &req);
    let spec = B::req(19, 22).count(1).string("orders").u32(12).u8(0);
    check("create_partitions_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = CreatePartitionsResponse {
        topics: vec![TopicResult {
            name: "orders".into(),
            error_code: 37,
            error_message: "orders has 12 partitions".into(),
        }],
    };
    let payload = encode_response(22, &resp);
    let spec = B::resp(22)
        .count(1)
        .string("orders")
        .i16(37)
        .string("orders has 12 partitions");
    check("create_partitions_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn replica_fetch() {
    let req = Request::ReplicaFetch(ReplicaFetchRequest {
        replica_id: 2,
        broker_epoch: 41,
        max_wait_ms: 500,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![ReplicaFetchTopic {
            name: "orders".into(),
            partitions: vec![ReplicaFetchPartition {
                partition: 3,
                current_leader_epoch: 7,
                fetch_offset: 1200,
                last_fetched_epoch: 6,
                flushed_offset: 1100,
                partition_max_bytes: 65536,
            }],
        }],
    });
    let payload = encode_request(23, "golden", &req);
    let spec = B::req(20, 23)
        .u32(2)
        .u64(41)
        .u32(500)
        .u32(1)
        .u32(1 << 20)
        .count(1)
        .string("orders")
        .count(1)
        .u32(3)
        .u32(7)
        .u64(1200)
        .i32(6)
        .u64(1100)
        .u32(65536);
    check("replica_fetch_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = ReplicaFetchResponse {
        topics: vec![ReplicaFetchTopicResponse {
            name: "orders".into(),
            partitions: vec![
                ReplicaFetchPartitionResponse {
                    partition: 3,
                    error_code: 0,
                    high_watermark: 1150,
                    log_start_offset: 0,
                    log_end_offset: 1300,
                    diverging: true,
                    diverging_epoch: 5,
                    diverging_end_offset: 1180,
                    records: Bytes::new(),
                },
                ReplicaFetchPartitionResponse {
                    partition: 4,
                    error_code: 74,
                    high_watermark: 0,
                    log_start_offset: 0,
                    log_end_offset: 0,
                    diverging: false,
                    diverging_epoch: -1,
                    diverging_end_offset: 0,
                    records: Bytes::from_static(b"abc"),
                },
            ],
        }],
    };
    let payload = encode_response(23, &resp);
    let spec = B::resp(23)
        .count(1)
        .string("orders")
        .count(2)
        .u32(3)
        .i16(0)
        .u64(1150)
        .u64(0)
        .u64(1300)
        .u8(1)
        .i32(5)
        .u64(1180)
        .bytes(b"")
        .u32(4)
        .i16(74)
        .u64(0)
        .u64(0)
        .u64(0)
        .u8(0)
        .i32(-1)
        .u64(0)
        .bytes(b"abc");
    check("replica_fetch_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn elect_leaders() {
    let req = Request::ElectLeaders(ElectLeadersRequest {
        election_type: 0,
        topics: vec![ElectTopic {
            name: "orders".into(),
            partitions: vec![0, 2],
        }],
    });
    let payload = encode_request(24, "golden", &req);
    let spec = B::req(21, 24)
        .u8(0)
        .count(1)
        .string("orders")
        .count(2)
        .u32(0)
        .u32(2);
    check("elect_leaders_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = ElectLeadersResponse {
        topics: vec![ElectedTopic {
            name: "orders".into(),
            partitions: vec![
                ElectedPartition {
                    partition: 0,
                    error_code: 0,
                    error_message: String::new(),
                },
                ElectedPartition {
                    partition: 2,
                    error_code: 84,
                    error_message: "orders-2: its preferred replica leads".into(),
                },
            ],
        }],
    };
    let payload = encode_response(24, &resp);
    let spec = B::resp(24)
        .count(1)
        .string("orders")
        .count(2)
        .u32(0)
        .i16(0)
        .string("")
        .u32(2)
        .i16(84)
        .string("orders-2: its preferred replica leads");
    check("elect_leaders_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn partition_reassignments() {
    let req = Request::AlterPartitionReassignments(AlterPartitionReassignmentsRequest {
        reassignments: vec![Reassignment {
            topic: "orders".into(),
            partition: 1,
            replicas: vec![2, 3, 4],
            cancel: false,
        }],
    });
    let payload = encode_request(25, "golden", &req);
    let spec = B::req(22, 25)
        .count(1)
        .string("orders")
        .u32(1)
        .count(3)
        .u32(2)
        .u32(3)
        .u32(4)
        .u8(0);
    check(
        "alter_partition_reassignments_request",
        payload.clone(),
        spec,
    );
    round_trip_request(&payload, &req);
    let resp = AlterPartitionReassignmentsResponse {
        results: vec![ReassignmentResult {
            topic: "orders".into(),
            partition: 1,
            error_code: 60,
            error_message: "busy".into(),
        }],
    };
    let payload = encode_response(25, &resp);
    let spec = B::resp(25)
        .count(1)
        .string("orders")
        .u32(1)
        .i16(60)
        .string("busy");
    check(
        "alter_partition_reassignments_response",
        payload.clone(),
        spec,
    );
    round_trip_response(&payload, &resp);
    let req = Request::ListPartitionReassignments(ListPartitionReassignmentsRequest {
        topics: vec!["orders".into()],
    });
    let payload = encode_request(26, "golden", &req);
    let spec = B::req(23, 26).count(1).string("orders");
    check(
        "list_partition_reassignments_request",
        payload.clone(),
        spec,
    );
    round_trip_request(&payload, &req);
    let resp = ListPartitionReassignmentsResponse {
        reassignments: vec![OngoingReassignment {
            topic: "orders".into(),
            partition: 1,
            replicas: vec![2, 3, 4, 1],
            adding: vec![4],
            removing: vec![1],
        }],
    };
    let payload = encode_response(26, &resp);
    let spec = B::resp(26)
        .count(1)
        .string("orders")
        .u32(1)
        .count(4)
        .u32(2)
        .u32(3)
        .u32(4)
        .u32(1)
        .count(1)
        .u32(4)
        .count(1)
        .u32(1);
    check(
        "list_partition_reassignments_response",
        payload.clone(),
        spec,
    );
    round_trip_response(&payload, &resp);
}

#[test]
fn init_producer_id() {
    let req = Request::InitProducerId(InitProducerIdRequest {
        producer_id: 4096,
        producer_epoch: 2,
    });
    let payload = encode_request(27, "golden", &req);
    let spec = B::req(24, 27).i64(4096).i16(2);
    check("init_producer_id_request", payload.clone(), spec);
    round_trip_request(&payload, &req);
    let resp = InitProducerIdResponse {
        error_code: 0,
        error_message: String::new(),
        producer_id: 4096,
        producer_epoch: 3,
    };
    let payload = encode_response(27, &resp);
    let spec = B::resp(27).i16(0).string("").i64(4096).i16(3);
    check("init_producer_id_response", payload.clone(), spec);
    round_trip_response(&payload, &resp);
}

#[test]
fn every_error_code_is_named() {
    for code in ErrorCode::ALL {
        assert_ne!(code.name(), "UNKNOWN_ERROR_CODE");
    }
    assert!(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.is_retriable());
    assert!(!ErrorCode::CORRUPT_MESSAGE.is_retriable());
}

#[test]
fn chunked_encoding_equals_plain_encoding() {
    let big = Bytes::from(vec![9u8; 100_000]);
    let resp = FetchResponse {
        topics: vec![FetchTopicResponse {
            name: "t".into(),
            partitions: vec![
                FetchPartitionResponse {
                    partition: 0,
                    error_code: 0,
                    high_watermark: 1,
                    log_start_offset: 0,
                    records: big.clone(),
                },
                FetchPartitionResponse {
                    partition: 1,
                    error_code: 0,
                    high_watermark: 1,
                    log_start_offset: 0,
                    records: Bytes::from_static(b"small"),
                },
            ],
        }],
    };
    let chunks = encode_response_chunks(3, &resp);
    assert!(
        chunks.iter().any(|c| c.as_ptr() == big.as_ptr()),
        "large records are passed by reference"
    );
    assert_eq!(chunks.concat(), encode_response(3, &resp));
}

/// This package's directory, as the test runner says at run time (a build cache shared by
/// clones at different paths may hold a binary compiled in another clone, with that clone's
/// path baked in by `env!`).
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
