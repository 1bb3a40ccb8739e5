//! The Kafka listener's request handling: each Kafka request is decoded by `cairn-kafka`'s
//! bounded decoders, translated to the broker's own operations (the same ones the native protocol
//! uses: one topic manager, one append path, one fetch path) and answered in the Kafka response
//! format of the request's version. Record batches pass through as bytes both ways.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_kafka::kp::messages as kp;
use cairn_kafka::kp::protocol::StrBytes;
use cairn_kafka::request::{self as kreq, Api, RequestError};
use cairn_kafka::{Request, response};
use cairn_protocol::native::ErrorCode;

use crate::error::BrokerError;
use crate::group_api::{GroupView, OffsetToCommit};
use crate::handler::{Deferred, Handler, Outcome, ready};
use crate::ops::{self, PerPartition};
use crate::partition::Isolation;

/// Kafka's ConfigResource types.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's ConfigSource values.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;

fn s(text: impl Into<String>) -> StrBytes {
    StrBytes::from_string(text.into())
}

fn topic_name(text: impl Into<String>) -> kp::TopicName {
    kp::TopicName(s(text))
}

/// Kafka partition indexes are i32; a negative one names no partition.
fn partition_index(p: i32) -> u32 {
    u32::try_from(p).unwrap_or(u32::MAX)
}

fn clamp_u32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// A leader epoch as Kafka sends it: -1 (or any negative) is "not sent".
fn epoch(v: i32) -> Option<u32> {
    u32::try_from(v).ok()
}

/// A result's error code (0 on success).
fn code_of<T>(result: &Result<T, BrokerError>) -> i16 {
    result.as_ref().map_or_else(|err| err.code().0, |_| 0)
}

impl Handler {
    /// As [`Handler::begin`], for a frame from the Kafka listener.
    pub async fn begin_kafka(self: &Arc<Self>, frame: Bytes) -> Deferred {
        let started = Instant::now();
        let decoded = match kreq::decode(frame) {
            Ok(decoded) => decoded,
            Err(err) => return ready(self.kafka_refusal(err)),
        };
        let corr = decoded.header.correlation_id;
        let version = decoded.header.api_version;
        let api = Api::from_key(decoded.header.api_key).unwrap_or(Api::API_VERSIONS);
        let this = Arc::clone(self);
        let finish = move |result: Result<Outcome, response::EncodeError>| {
            this.metrics.requests.with_label_values(&[api.label]).inc();
            this.metrics
                .request_seconds
                .with_label_values(&[api.label])
                .observe(started.elapsed().as_secs_f64());
            result.unwrap_or_else(|err| {
                tracing::error!(error = %err, "cannot encode a Kafka response");
                Outcome::Close(err.to_string())
            })
        };
        let respond = move |what, message: &dyn KafkaResponse| {
            message
                .encode_with(what, corr, version)
                .map(Outcome::Respond)
        };
        match decoded.request {
            Request::Produce(r) => {
                let acks = r.acks;
                if let Some(id) = &r.transactional_id {
                    let response = self.refuse_transactional_produce(&r, id);
                    return ready(finish(if acks == 0 {
                        Ok(Outcome::Silent)
                    } else {
                        respond("ProduceResponse", &response)
                    }));
                }
                let appended = self.produce_append(produce_op(r)).await;
                let this = Arc::clone(self);
                Box::pin(async move {
                    let response = kafka_produce(this.produce_finish(appended).await);
                    finish(if acks == 0 {
                        Ok(Outcome::Silent)
                    } else {
                        respond("ProduceResponse", &response)
                    })
                })
            }
            Request::Fetch(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let response = kafka_fetch(this.fetch(fetch_op(r)).await);
                    finish(
                        response::encode_fetch(corr, version, &response)
                            .map(Outcome::RespondChunks),
                    )
                })
            }
            Request::ApiVersions(_) => ready(finish(respond(
                "ApiVersionsResponse",
                &response::api_versions(0),
            ))),
            Request::Metadata(r) => {
                let response = self.kafka_metadata(r).await;
                ready(finish(respond("MetadataResponse", &response)))
            }
            Request::ListOffsets(r) => {
                let response = self.kafka_list_offsets(r, version);
                ready(finish(respond("ListOffsetsResponse", &response)))
            }
            Request::CreateTopics(r) => {
                let response = self.kafka_create_topics(r).await;
                ready(finish(respond("CreateTopicsResponse", &response)))
            }
            Request::DeleteTopics(r) => {
                let response = kp::DeleteTopicsResponse::default().with_responses(
                    self.delete_topics(r.names)
                        .await
                        .into_iter()
                        .map(|(name, result)| {
                            kp::delete_topics_response::DeletableTopicResult::default()
                                .with_name(Some(topic_name(name)))
                                .with_error_code(code_of(&result))
                                .with_error_message(
                                    result
                                        .err()
                                        .filter(|_| version >= 5)
                                        .map(|err| s(err.to_string())),
                                )
                        })
                        .collect(),
                );
                ready(finish(respond("DeleteTopicsResponse", &response)))
            }
            Request::DescribeConfigs(r) => {
                let response = self.kafka_describe_configs(r, version);
                ready(finish(respond("DescribeConfigsResponse", &response)))
            }
            Request::FindCoordinator(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let response = this.kafka_find_coordinator(r).await;
                    finish(respond("FindCoordinatorResponse", &response))
                })
            }
            Request::JoinGroup(r) => {
                let join = crate::groups::Join {
                    group_id: r.group_id,
                    member_id: r.member_id,
                    instance_id: r.group_instance_id,
                    client_id: decoded.header.client_id.unwrap_or_default(),
                    protocol_type: r.protocol_type,
                    protocols: r.protocols,
                    session_ms: r.session_timeout_ms,
                    rebalance_ms: r.rebalance_timeout_ms,
                    require_known_member_id: version >= 4,
                };
                let joined = self.join_group(Api::JOIN_GROUP.label, join);
                Box::pin(async move {
                    let result = joined.await;
                    let response = kp::JoinGroupResponse::default()
                        .with_error_code(result.error.0)
                        .with_generation_id(result.generation)
                        .with_protocol_type(result.protocol_type.map(s))
                        .with_protocol_name(Some(s(result.protocol_name.unwrap_or_default())))
                        .with_leader(s(result.leader))
                        .with_member_id(s(result.member_id))
                        .with_members(
                            result
                                .members
                                .into_iter()
                                .map(|(id, instance, metadata)| {
                                    kp::join_group_response::JoinGroupResponseMember::default()
                                        .with_member_id(s(id))
                                        .with_group_instance_id(instance.map(s))
                                        .with_metadata(metadata)
                                })
                                .collect(),
                        );
                    finish(respond("JoinGroupResponse", &response))
                })
            }
            Request::SyncGroup(r) => {
                let synced = self.sync_group(
                    Api::SYNC_GROUP.label,
                    (&r.group_id, r.generation_id),
                    (&r.member_id, r.group_instance_id.as_deref()),
                    r.assignments,
                );
                Box::pin(async move {
                    let result = synced.await;
                    let response = kp::SyncGroupResponse::default()
                        .with_error_code(result.error.0)
                        .with_protocol_type(result.protocol_type.map(s))
                        .with_protocol_name(result.protocol_name.map(s))
                        .with_assignment(result.assignment);
                    finish(respond("SyncGroupResponse", &response))
                })
            }
            Request::ListGroups(r) => {
                let response = kp::ListGroupsResponse::default().with_groups(
                    self.all_groups()
                        .into_iter()
                        .filter(|(_, _, state)| {
                            r.states_filter.is_empty()
                                || r.states_filter
                                    .iter()
                                    .any(|f| f.eq_ignore_ascii_case(state))
                        })
                        .map(|(name, kind, state)| {
                            kp::list_groups_response::ListedGroup::default()
                                .with_group_id(kp::GroupId(s(name)))
                                .with_protocol_type(s(kind))
                                .with_group_state(s(state))
                        })
                        .collect(),
                );
                ready(finish(respond("ListGroupsResponse", &response)))
            }
            Request::DescribeGroups(r) => {
                let described = r
                    .groups
                    .into_iter()
                    .map(|name| {
                        let group = kp::describe_groups_response::DescribedGroup::default()
                            .with_group_id(kp::GroupId(s(name.clone())));
                        match self.view_group(&name) {
                            GroupView::Live(info) => group
                                .with_group_state(s(info.state))
                                .with_protocol_type(s(info.protocol_type))
                                .with_protocol_data(s(info.protocol))
                                .with_members(
                                    info.members
                                        .into_iter()
                                        .map(|(id, instance, client, metadata, assignment)| {
                                            kp::describe_groups_response::DescribedGroupMember::default()
                                                .with_member_id(s(id))
                                                .with_group_instance_id(instance.map(s))
                                                .with_client_id(s(client))
                                                .with_client_host(s(""))
                                                .with_member_metadata(metadata)
                                                .with_member_assignment(assignment)
                                        })
                                        .collect(),
                                ),
                            // Offsets only: Empty; unknown: Dead (as Kafka).
                            GroupView::OffsetsOnly => group
                                .with_group_state(s("Empty"))
                                .with_protocol_type(s("consumer")),
                            GroupView::Dead => group.with_group_state(s("Dead")),
                        }
                    })
                    .collect();
                let response = kp::DescribeGroupsResponse::default().with_groups(described);
                ready(finish(respond("DescribeGroupsResponse", &response)))
            }
            Request::DeleteGroups(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let results = this
                        .delete_groups(Api::DELETE_GROUPS.label, r.groups)
                        .await
                        .into_iter()
                        .map(|(name, code)| {
                            kp::delete_groups_response::DeletableGroupResult::default()
                                .with_group_id(kp::GroupId(s(name)))
                                .with_error_code(code.0)
                        })
                        .collect();
                    let response = kp::DeleteGroupsResponse::default().with_results(results);
                    finish(respond("DeleteGroupsResponse", &response))
                })
            }
            Request::Heartbeat(r) => {
                let code = match self.check_heartbeat_coordinator(&r.group_id) {
                    Err(code) => code,
                    Ok(()) => self.groups.heartbeat(
                        &r.group_id,
                        r.generation_id,
                        (&r.member_id, r.group_instance_id.as_deref()),
                    ),
                };
                self.metrics.count_error(Api::HEARTBEAT.label, code);
                let response = kp::HeartbeatResponse::default().with_error_code(code.0);
                ready(finish(respond("HeartbeatResponse", &response)))
            }
            Request::LeaveGroup(r) => {
                let codes = match self.check_coordinator(&r.group_id) {
                    Err(code) => vec![code; r.members.len().max(1)],
                    Ok(()) => self.groups.leave(&r.group_id, &r.members),
                };
                let mut response = kp::LeaveGroupResponse::default();
                if r.batched {
                    response.members = r
                        .members
                        .iter()
                        .zip(&codes)
                        .map(|((id, instance), code)| {
                            kp::leave_group_response::MemberResponse::default()
                                .with_member_id(s(id.clone()))
                                .with_group_instance_id(instance.clone().map(s))
                                .with_error_code(code.0)
                        })
                        .collect();
                } else {
                    response.error_code = codes.first().map_or(0, |c| c.0);
                }
                for code in codes {
                    self.metrics.count_error(Api::LEAVE_GROUP.label, code);
                }
                ready(finish(respond("LeaveGroupResponse", &response)))
            }
            Request::OffsetCommit(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let response = this.kafka_offset_commit(r).await;
                    finish(respond("OffsetCommitResponse", &response))
                })
            }
            Request::OffsetFetch(r) => {
                let response = self.kafka_offset_fetch(r);
                ready(finish(respond("OffsetFetchResponse", &response)))
            }
            Request::InitProducerId(r) => {
                let response = self.kafka_init_producer_id(r).await;
                ready(finish(respond("InitProducerIdResponse", &response)))
            }
            Request::OffsetForLeaderEpoch(r) => {
                let response = self.kafka_offset_for_leader_epoch(r);
                ready(finish(respond("OffsetForLeaderEpochResponse", &response)))
            }
            Request::CreatePartitions(r) => {
                let response = self.kafka_create_partitions(r).await;
                ready(finish(respond("CreatePartitionsResponse", &response)))
            }
            Request::ElectLeaders(r) => {
                let response = self.kafka_elect_leaders(r).await;
                ready(finish(respond("ElectLeadersResponse", &response)))
            }
            Request::AlterPartitionReassignments(r) => {
                let response = self.kafka_alter_reassignments(r).await;
                ready(finish(respond(
                    "AlterPartitionReassignmentsResponse",
                    &response,
                )))
            }
            Request::ListPartitionReassignments(r) => {
                let response = self.kafka_list_reassignments(r);
                ready(finish(respond(
                    "ListPartitionReassignmentsResponse",
                    &response,
                )))
            }
            Request::DescribeCluster(r) => {
                let response = self.kafka_describe_cluster(&r);
                ready(finish(respond("DescribeClusterResponse", &response)))
            }
        }
    }

    /// The answer to a frame that did not decode: ApiVersions of an unknown version gets the v0
    /// response with UNSUPPORTED_VERSION and the versions served (so the client retries with
    /// one); anything else cannot be answered in a format the client expects, so the connection
    /// closes, as Kafka's does.
    fn kafka_refusal(&self, err: RequestError) -> Outcome {
        let label = match &err {
            RequestError::UnknownApi { .. } | RequestError::Truncated(_) => "kafka:unknown",
            RequestError::UnsupportedVersion { api, .. } if *api == Api::API_VERSIONS => {
                "kafka:ApiVersions"
            }
            RequestError::UnsupportedVersion { .. } => "kafka:unsupported",
            RequestError::Malformed { .. } => "kafka:malformed",
        };
        let code = match &err {
            RequestError::UnsupportedVersion { .. } | RequestError::UnknownApi { .. } => {
                ErrorCode::UNSUPPORTED_VERSION
            }
            _ => ErrorCode::INVALID_REQUEST,
        };
        self.metrics.count_error(label, code);
        if let RequestError::UnsupportedVersion {
            api,
            correlation_id,
            ..
        } = &err
            && *api == Api::API_VERSIONS
        {
            let response = response::api_versions(ErrorCode::UNSUPPORTED_VERSION.0);
            return match response::encode("ApiVersionsResponse", *correlation_id, 0, &response) {
                Ok(bytes) => Outcome::Respond(bytes),
                Err(err) => Outcome::Close(err.to_string()),
            };
        }
        tracing::debug!(error = %err, "Kafka request refused");
        Outcome::Close(err.to_string())
    }

    fn refuse_transactional_produce(
        &self,
        r: &kreq::ProduceRequest,
        id: &str,
    ) -> kp::ProduceResponse {
        let code = ErrorCode::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
        self.metrics.count_error("kafka:Produce", code);
        tracing::debug!(transactional_id = %id, "transactional produce refused");
        kp::ProduceResponse::default().with_responses(
            r.topics
                .iter()
                .map(|t| {
                    kp::produce_response::TopicProduceResponse::default()
                        .with_name(topic_name(t.name.clone()))
                        .with_partition_responses(
                            t.partitions
                                .iter()
                                .map(|(p, _)| {
                                    kp::produce_response::PartitionProduceResponse::default()
                                        .with_index(*p)
                                        .with_error_code(code.0)
                                        .with_base_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    async fn kafka_metadata(&self, r: kreq::MetadataRequest) -> kp::MetadataResponse {
        // Null asks for every topic; v1+ an empty list for none (only brokers).
        let view = self.metadata(r.topics, r.allow_auto_topic_creation).await;
        let ids = |nodes: Vec<u32>| -> Vec<kp::BrokerId> {
            nodes.into_iter().map(|n| kp::BrokerId(n as i32)).collect()
        };
        kp::MetadataResponse::default()
            .with_brokers(
                view.brokers
                    .into_iter()
                    .filter_map(|b| {
                        let (host, port) = b.kafka?;
                        Some(
                            kp::metadata_response::MetadataResponseBroker::default()
                                .with_node_id(kp::BrokerId(b.node_id as i32))
                                .with_host(s(host))
                                .with_port(i32::from(port))
                                .with_rack(b.rack.map(s)),
                        )
                    })
                    .collect(),
            )
            .with_cluster_id(Some(s("cairn")))
            .with_controller_id(kp::BrokerId(self.kafka_controller_id(view.controller_id)))
            .with_topics(
                view.topics
                    .into_iter()
                    .map(|(name, result)| {
                        kp::metadata_response::MetadataResponseTopic::default()
                            .with_is_internal(name == crate::offsets::OFFSETS_TOPIC)
                            .with_error_code(code_of(&result))
                            .with_name(Some(topic_name(name)))
                            .with_partitions(
                                result
                                    .unwrap_or_default()
                                    .into_iter()
                                    .map(|p| {
                                        kp::metadata_response::MetadataResponsePartition::default()
                                            .with_error_code(if p.leader.is_some() {
                                                0
                                            } else {
                                                ErrorCode::LEADER_NOT_AVAILABLE.0
                                            })
                                            .with_partition_index(p.partition as i32)
                                            .with_leader_id(kp::BrokerId(
                                                p.leader.map_or(-1, |l| l as i32),
                                            ))
                                            .with_leader_epoch(p.leader_epoch as i32)
                                            .with_replica_nodes(ids(p.replicas))
                                            .with_isr_nodes(ids(p.isr))
                                            .with_offline_replicas(ids(p.offline))
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
    }

    fn kafka_list_offsets(
        &self,
        r: kreq::ListOffsetsRequest,
        version: i16,
    ) -> kp::ListOffsetsResponse {
        let request = ops::ListOffsets {
            isolation: Isolation::HighWatermark,
            topics: r
                .topics
                .into_iter()
                .map(|(name, partitions)| {
                    let partitions = partitions
                        .into_iter()
                        .map(|(p, leader_epoch, timestamp)| {
                            (partition_index(p), epoch(leader_epoch), timestamp)
                        })
                        .collect();
                    (name, partitions)
                })
                .collect(),
        };
        kp::ListOffsetsResponse::default().with_topics(
            self.list_offsets(request)
                .into_iter()
                .map(|(name, partitions)| {
                    kp::list_offsets_response::ListOffsetsTopicResponse::default()
                        .with_name(topic_name(name))
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|(p, result)| {
                                    let partition = kp::list_offsets_response::ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p as i32)
                                        .with_error_code(code_of(&result));
                                    match result {
                                        Ok(found) => partition
                                            .with_timestamp(found.timestamp)
                                            .with_offset(found.offset.0 as i64)
                                            // v4+ (KIP-320).
                                            .with_leader_epoch(if version >= 4 {
                                                found.leader_epoch as i32
                                            } else {
                                                -1
                                            }),
                                        Err(_) => partition.with_timestamp(-1).with_offset(-1),
                                    }
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    async fn kafka_create_topics(&self, r: kreq::CreateTopicsRequest) -> kp::CreateTopicsResponse {
        let mut results = Vec::with_capacity(r.topics.len());
        for topic in r.topics {
            let refusal = if !topic.assignments.is_empty() {
                Some(BrokerError::InvalidRequest(
                    "manual replica assignment is not supported".to_string(),
                ))
            } else if topic.replication_factor == 0 || topic.replication_factor < -1 {
                Some(BrokerError::InvalidReplicationFactor(format!(
                    "replication factor {}",
                    topic.replication_factor
                )))
            } else if topic.num_partitions == 0 || topic.num_partitions < -1 {
                Some(BrokerError::InvalidPartitions(format!(
                    "{} partitions",
                    topic.num_partitions
                )))
            } else {
                None
            };
            let result = match refusal {
                Some(refusal) => {
                    self.metrics
                        .count_error("kafka:CreateTopics", refusal.code());
                    Err(refusal)
                }
                None => {
                    let request = ops::NewTopic {
                        name: topic.name.clone(),
                        // -1: the broker's default.
                        partitions: u32::try_from(topic.num_partitions).ok(),
                        replication_factor: u16::try_from(topic.replication_factor).ok(),
                        configs: topic
                            .configs
                            .into_iter()
                            .filter_map(|(key, value)| value.map(|value| (key, value)))
                            .collect(),
                    };
                    self.create_topics(vec![request], r.validate_only)
                        .await
                        .into_iter()
                        .next()
                        .map_or_else(
                            || Err(BrokerError::Internal("no result".into())),
                            |(_, result)| result,
                        )
                }
            };
            let image = self.manager.image();
            let created = image
                .topic(&topic.name)
                .filter(|_| result.is_ok())
                .map(|t| {
                    let replicas = t.partitions.first().map_or(1, |p| p.replicas.len());
                    (t.partitions.len() as i32, replicas as i16)
                });
            let (partitions, replication_factor) = match (&result, created) {
                (Ok(()), Some(found)) => found,
                // validate_only: what would have been created.
                (Ok(()), None) => (topic.num_partitions, topic.replication_factor.max(1)),
                (Err(_), _) => (-1, -1),
            };
            results.push(
                kp::create_topics_response::CreatableTopicResult::default()
                    .with_name(topic_name(topic.name))
                    .with_error_code(code_of(&result))
                    .with_error_message(result.err().map(|err| s(err.to_string())))
                    .with_num_partitions(partitions)
                    .with_replication_factor(replication_factor)
                    .with_configs(None),
            );
        }
        kp::CreateTopicsResponse::default().with_topics(results)
    }

    fn kafka_describe_configs(
        &self,
        r: kreq::DescribeConfigsRequest,
        version: i16,
    ) -> kp::DescribeConfigsResponse {
        use kp::describe_configs_response::{DescribeConfigsResourceResult, DescribeConfigsResult};
        let entry = |key: String, value: String, source: i8, read_only: bool| {
            DescribeConfigsResourceResult::default()
                .with_name(s(key))
                .with_value(Some(s(value)))
                .with_read_only(read_only)
                .with_config_source(if version >= 1 { source } else { -1 })
                .with_is_sensitive(false)
        };
        let results = r
            .resources
            .into_iter()
            .map(|(resource_type, name, keys)| {
                let wanted = |key: &str| keys.as_ref().is_none_or(|k| k.iter().any(|w| w == key));
                let result = DescribeConfigsResult::default()
                    .with_resource_type(resource_type)
                    .with_resource_name(s(name.clone()));
                match resource_type {
                    RESOURCE_TOPIC => match self.manager.topic(&name) {
                        None => result
                            .with_error_code(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0)
                            .with_error_message(Some(s(format!("topic {name:?} does not exist")))),
                        Some(topic) => result.with_configs(
                            topic
                                .config
                                .describe(self.manager.defaults(), topic.replication_factor)
                                .into_iter()
                                .filter(|(key, _, _)| wanted(key))
                                .map(|(key, value, is_default)| {
                                    let source = if is_default {
                                        SOURCE_DEFAULT
                                    } else {
                                        SOURCE_TOPIC
                                    };
                                    entry(key, value, source, false)
                                })
                                .collect(),
                        ),
                    },
                    RESOURCE_BROKER => result.with_configs(
                        self.broker_configs()
                            .into_iter()
                            .filter(|(key, _)| wanted(key))
                            .map(|(key, value)| entry(key, value, SOURCE_STATIC_BROKER, true))
                            .collect(),
                    ),
                    other => result
                        .with_error_code(ErrorCode::INVALID_REQUEST.0)
                        .with_error_message(Some(s(format!(
                            "resource type {other} is not described (topics: 2, brokers: 4)"
                        )))),
                }
            })
            .collect();
        kp::DescribeConfigsResponse::default().with_results(results)
    }

    /// The broker settings a Kafka admin client may ask about, under Kafka's names.
    fn broker_configs(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let d = &c.topic_defaults;
        vec![
            (
                "auto.create.topics.enable".into(),
                c.auto_create_topics.to_string(),
            ),
            ("broker.id".into(), c.node_id.to_string()),
            ("log.dirs".into(), c.data_dir.display().to_string()),
            ("log.retention.bytes".into(), d.retention_bytes.to_string()),
            ("log.retention.ms".into(), d.retention_ms.to_string()),
            ("log.segment.bytes".into(), d.segment_bytes.to_string()),
            ("message.max.bytes".into(), d.max_message_bytes.to_string()),
            ("num.partitions".into(), d.partitions.to_string()),
            (
                "socket.request.max.bytes".into(),
                c.frame_bytes_max.to_string(),
            ),
        ]
    }

    async fn kafka_find_coordinator(
        &self,
        r: kreq::FindCoordinatorRequest,
    ) -> kp::FindCoordinatorResponse {
        // Each group's coordinator leads its partition of the offsets topic (created at the
        // first lookup); transactions are not served.
        let mut found = Vec::with_capacity(r.keys.len().max(1));
        for key in r
            .keys
            .iter()
            .map(String::as_str)
            .chain(r.keys.is_empty().then_some(""))
        {
            found.push(if r.key_type != 0 {
                Err(ErrorCode::TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
            } else {
                self.find_coordinator(key).await.and_then(|c| {
                    let node = c.node_id;
                    c.kafka
                        .map(|(host, port)| (node, host, port))
                        .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)
                })
            });
        }
        let outcome = |i: usize| -> (ErrorCode, Option<String>, (i32, String, i32)) {
            let none = (-1, String::new(), -1);
            match found
                .get(i)
                .cloned()
                .unwrap_or(Err(ErrorCode::INVALID_GROUP_ID))
            {
                Ok((node, host, port)) => {
                    (ErrorCode::NONE, None, (node as i32, host, i32::from(port)))
                }
                Err(code) if code == ErrorCode::TRANSACTIONAL_ID_AUTHORIZATION_FAILED => {
                    (code, Some("transactions are not supported".into()), none)
                }
                Err(code) if code == ErrorCode::INVALID_GROUP_ID => {
                    (code, Some("invalid group id".into()), none)
                }
                Err(code) => (code, Some("the coordinator is not available".into()), none),
            }
        };
        let mut response = kp::FindCoordinatorResponse::default();
        if r.batched {
            response.coordinators = r
                .keys
                .iter()
                .enumerate()
                .map(|(i, key)| {
                    let (code, message, (node, host, port)) = outcome(i);
                    self.metrics.count_error("kafka:FindCoordinator", code);
                    kp::find_coordinator_response::Coordinator::default()
                        .with_key(s(key.clone()))
                        .with_node_id(kp::BrokerId(node))
                        .with_host(s(host))
                        .with_port(port)
                        .with_error_code(code.0)
                        .with_error_message(message.map(s))
                })
                .collect();
            return response;
        }
        let (code, message, (node, host, port)) = outcome(0);
        self.metrics.count_error("kafka:FindCoordinator", code);
        response
            .with_error_code(code.0)
            .with_error_message(message.map(s))
            .with_node_id(kp::BrokerId(node))
            .with_host(s(host))
            .with_port(port)
    }

    async fn kafka_offset_commit(&self, r: kreq::OffsetCommitRequest) -> kp::OffsetCommitResponse {
        let topics = r
            .topics
            .into_iter()
            .map(|(name, partitions)| {
                let partitions = partitions
                    .into_iter()
                    .map(|(p, offset, leader_epoch, metadata)| OffsetToCommit {
                        partition: i64::from(p),
                        offset,
                        leader_epoch,
                        metadata: metadata.unwrap_or_default(),
                    })
                    .collect();
                (name, partitions)
            })
            .collect();
        let outcomes = self
            .commit_offsets(
                Api::OFFSET_COMMIT.label,
                &r.group_id,
                (
                    r.generation_id,
                    &r.member_id,
                    r.group_instance_id.as_deref(),
                ),
                topics,
            )
            .await;
        kp::OffsetCommitResponse::default().with_topics(
            outcomes
                .into_iter()
                .map(|(name, partitions)| {
                    kp::offset_commit_response::OffsetCommitResponseTopic::default()
                        .with_name(topic_name(name))
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|(p, code)| {
                                    kp::offset_commit_response::OffsetCommitResponsePartition::default()
                                        .with_partition_index(p as i32)
                                        .with_error_code(code.0)
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    fn kafka_offset_fetch(&self, r: kreq::OffsetFetchRequest) -> kp::OffsetFetchResponse {
        use kp::offset_fetch_response::{OffsetFetchResponsePartition, OffsetFetchResponseTopic};
        let response = kp::OffsetFetchResponse::default();
        if r.group_id.is_empty() {
            return response.with_error_code(ErrorCode::INVALID_GROUP_ID.0);
        }
        // Only the coordinator answers, once it has loaded the group: top-level error for v2+,
        // per partition for v0-1 (which have no top-level code).
        let refused = self.check_coordinator(&r.group_id).err();
        let partition = |p: i32, committed: Option<crate::offsets::Committed>| {
            let answer = match committed {
                Some(c) => OffsetFetchResponsePartition::default()
                    .with_partition_index(p)
                    .with_committed_offset(c.offset)
                    .with_committed_leader_epoch(c.leader_epoch)
                    .with_metadata(Some(s(c.metadata))),
                None => OffsetFetchResponsePartition::default()
                    .with_partition_index(p)
                    .with_committed_offset(-1)
                    .with_committed_leader_epoch(-1)
                    .with_metadata(Some(s(""))),
            };
            answer.with_error_code(refused.map_or(0, |code| code.0))
        };
        let wanted: Option<Vec<(String, Vec<i64>)>> = r.topics.map(|topics| {
            topics
                .into_iter()
                .map(|(name, partitions)| (name, partitions.into_iter().map(i64::from).collect()))
                .collect()
        });
        let found = match refused {
            Some(_) => wanted
                .unwrap_or_default()
                .into_iter()
                .map(|(name, partitions)| {
                    (name, partitions.into_iter().map(|p| (p, None)).collect())
                })
                .collect(),
            None => self.committed_offsets(&r.group_id, wanted),
        };
        let topics: Vec<OffsetFetchResponseTopic> = found
            .into_iter()
            .map(|(name, partitions)| {
                OffsetFetchResponseTopic::default()
                    .with_name(topic_name(name))
                    .with_partitions(
                        partitions
                            .into_iter()
                            .map(|(p, c)| partition(p as i32, c))
                            .collect(),
                    )
            })
            .collect();
        response
            .with_error_code(refused.map_or(0, |code| code.0))
            .with_topics(topics)
    }

    /// Where each asked-for leader epoch ends in each partition's log, as its leader knows it
    /// (KIP-320: a consumer or follower finds out whether the log it read was truncated).
    fn kafka_offset_for_leader_epoch(
        &self,
        r: kreq::OffsetForLeaderEpochRequest,
    ) -> kp::OffsetForLeaderEpochResponse {
        use kp::offset_for_leader_epoch_response::{EpochEndOffset, OffsetForLeaderTopicResult};
        let topics = r
            .topics
            .into_iter()
            .map(|(name, partitions)| {
                let topic = self.manager.topic(&name);
                let partitions = partitions
                    .into_iter()
                    .map(|(p, current, asked)| {
                        let found = self
                            .lookup(topic.as_deref(), &name, partition_index(p))
                            .and_then(|partition| {
                                partition.check_leader(epoch(current))?;
                                Ok(u32::try_from(asked)
                                    .ok()
                                    .and_then(|e| partition.end_offset_for_epoch(e)))
                            });
                        let result = EpochEndOffset::default().with_partition(p);
                        match found {
                            Ok(Some((epoch, end))) => result
                                .with_leader_epoch(epoch as i32)
                                .with_end_offset(end.0 as i64),
                            // Unknown to this log (newer than any it holds): undefined.
                            Ok(None) => result.with_leader_epoch(-1).with_end_offset(-1),
                            Err(err) => {
                                self.metrics
                                    .count_error(Api::OFFSET_FOR_LEADER_EPOCH.label, err.code());
                                result
                                    .with_error_code(err.code().0)
                                    .with_leader_epoch(-1)
                                    .with_end_offset(-1)
                            }
                        }
                    })
                    .collect();
                OffsetForLeaderTopicResult::default()
                    .with_topic(topic_name(name))
                    .with_partitions(partitions)
            })
            .collect();
        kp::OffsetForLeaderEpochResponse::default().with_topics(topics)
    }

    async fn kafka_elect_leaders(&self, r: kreq::ElectLeadersRequest) -> kp::ElectLeadersResponse {
        let partitions = r.topics.map(|topics| {
            topics
                .into_iter()
                .flat_map(|(name, partitions)| {
                    partitions
                        .into_iter()
                        .map(move |p| (name.clone(), partition_index(p)))
                })
                .collect()
        });
        let mut results: Vec<kp::elect_leaders_response::ReplicaElectionResult> = Vec::new();
        match self.elect_leaders(r.election_type == 1, partitions).await {
            Ok(elected) => {
                for (topic, partition, result) in elected {
                    let (code, message) = match result {
                        Ok(()) => (0, None),
                        Err((code, message)) => (code.0, Some(s(message))),
                    };
                    let part = kp::elect_leaders_response::PartitionResult::default()
                        .with_partition_id(partition as i32)
                        .with_error_code(code)
                        .with_error_message(message);
                    match results.last_mut().filter(|t| *t.topic == *topic) {
                        Some(t) => t.partition_result.push(part),
                        None => results.push(
                            kp::elect_leaders_response::ReplicaElectionResult::default()
                                .with_topic(topic_name(topic))
                                .with_partition_result(vec![part]),
                        ),
                    }
                }
                kp::ElectLeadersResponse::default().with_replica_election_results(results)
            }
            Err(err) => {
                self.metrics
                    .count_error(Api::ELECT_LEADERS.label, err.code());
                kp::ElectLeadersResponse::default().with_error_code(err.code().0)
            }
        }
    }

    async fn kafka_alter_reassignments(
        &self,
        r: kreq::AlterPartitionReassignmentsRequest,
    ) -> kp::AlterPartitionReassignmentsResponse {
        use kp::alter_partition_reassignments_response as resp;
        let mut asked = Vec::new();
        let mut invalid = Vec::new();
        for (topic, partitions) in r.topics {
            for (index, replicas) in partitions {
                let replicas = replicas.map(|rs| {
                    rs.into_iter()
                        .map(u32::try_from)
                        .collect::<Result<Vec<u32>, _>>()
                });
                match replicas {
                    Some(Err(_)) => invalid.push((topic.clone(), index)),
                    Some(Ok(rs)) => asked.push((topic.clone(), partition_index(index), Some(rs))),
                    None => asked.push((topic.clone(), partition_index(index), None)),
                }
            }
        }
        let mut topics: Vec<resp::ReassignableTopicResponse> = Vec::new();
        let mut push = |topic: String, index: i32, code: i16, message: Option<String>| {
            let part = resp::ReassignablePartitionResponse::default()
                .with_partition_index(index)
                .with_error_code(code)
                .with_error_message(message.map(s));
            match topics.iter_mut().find(|t| *t.name == *topic) {
                Some(t) => t.partitions.push(part),
                None => topics.push(
                    resp::ReassignableTopicResponse::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![part]),
                ),
            }
        };
        for (topic, index) in invalid {
            let message = "a replica id is negative".to_string();
            push(
                topic,
                index,
                ErrorCode::INVALID_REPLICA_ASSIGNMENT.0,
                Some(message),
            );
        }
        match self.reassign(asked).await {
            Ok(results) => {
                for (topic, partition, result) in results {
                    let (code, message) = match result {
                        Ok(()) => (0, None),
                        Err((code, message)) => (code.0, Some(message)),
                    };
                    push(topic, partition as i32, code, message);
                }
                kp::AlterPartitionReassignmentsResponse::default().with_responses(topics)
            }
            Err(err) => kp::AlterPartitionReassignmentsResponse::default()
                .with_error_code(err.code().0)
                .with_error_message(Some(s(err.to_string()))),
        }
    }

    fn kafka_list_reassignments(
        &self,
        r: kreq::ListPartitionReassignmentsRequest,
    ) -> kp::ListPartitionReassignmentsResponse {
        use kp::list_partition_reassignments_response as resp;
        let names: Vec<String> = r
            .topics
            .iter()
            .flatten()
            .map(|(name, _)| name.clone())
            .collect();
        let wanted = |topic: &str, partition: u32| match &r.topics {
            None => true,
            Some(topics) => topics
                .iter()
                .any(|(t, ps)| t == topic && ps.contains(&(partition as i32))),
        };
        let ids = |v: &[u32]| {
            v.iter()
                .map(|r| kp::BrokerId(*r as i32))
                .collect::<Vec<_>>()
        };
        let mut topics: Vec<resp::OngoingTopicReassignment> = Vec::new();
        for (topic, partition, state) in self.reassignments(&names) {
            if !wanted(&topic, partition) {
                continue;
            }
            let part = resp::OngoingPartitionReassignment::default()
                .with_partition_index(partition as i32)
                .with_replicas(ids(&state.replicas))
                .with_adding_replicas(ids(&state.adding))
                .with_removing_replicas(ids(&state.removing));
            match topics.iter_mut().find(|t| *t.name == *topic) {
                Some(t) => t.partitions.push(part),
                None => topics.push(
                    resp::OngoingTopicReassignment::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![part]),
                ),
            }
        }
        kp::ListPartitionReassignmentsResponse::default().with_topics(topics)
    }

    async fn kafka_create_partitions(
        &self,
        r: kreq::CreatePartitionsRequest,
    ) -> kp::CreatePartitionsResponse {
        let mut results = Vec::with_capacity(r.topics.len());
        for (name, count, assigned) in r.topics {
            let result = if assigned {
                Err(BrokerError::InvalidRequest(
                    "manual replica assignment is not supported".into(),
                ))
            } else {
                match u32::try_from(count) {
                    Ok(count) => self.create_partitions(&name, count, r.validate_only).await,
                    Err(_) => Err(BrokerError::InvalidPartitions(format!(
                        "{count} partitions"
                    ))),
                }
            };
            if let Err(err) = &result {
                self.metrics
                    .count_error(Api::CREATE_PARTITIONS.label, err.code());
            }
            results.push(
                kp::create_partitions_response::CreatePartitionsTopicResult::default()
                    .with_name(topic_name(name))
                    .with_error_code(code_of(&result))
                    .with_error_message(result.err().map(|e| s(e.to_string()))),
            );
        }
        kp::CreatePartitionsResponse::default().with_results(results)
    }

    /// The controller id Kafka clients are told: older clients send CreateTopics and the like
    /// to it, so it must be a broker they can reach. Any broker carries such requests to the
    /// active controller (as KRaft brokers forward them), so: the active controller when it is a
    /// live broker, else this broker.
    fn kafka_controller_id(&self, active: u32) -> i32 {
        let node = if self.manager.image().is_live(active) {
            active
        } else {
            self.config.node_id
        };
        i32::try_from(node).unwrap_or(-1)
    }

    fn kafka_describe_cluster(
        &self,
        r: &kreq::DescribeClusterRequest,
    ) -> kp::DescribeClusterResponse {
        let image = self.manager.image();
        let response = kp::DescribeClusterResponse::default()
            .with_cluster_id(s("cairn"))
            .with_controller_id(kp::BrokerId(
                self.kafka_controller_id(self.cluster.client.leader().unwrap_or(u32::MAX)),
            ))
            .with_cluster_authorized_operations(i32::MIN)
            .with_endpoint_type(r.endpoint_type);
        if r.endpoint_type != 1 {
            return response
                .with_error_code(ErrorCode::INVALID_REQUEST.0)
                .with_error_message(Some(s("only broker endpoints (type 1) are served")));
        }
        response.with_brokers(
            image
                .live_brokers()
                .filter_map(|b| {
                    let kafka = b.info.kafka.as_ref()?;
                    Some(
                        kp::describe_cluster_response::DescribeClusterBroker::default()
                            .with_broker_id(kp::BrokerId(b.info.node_id as i32))
                            .with_host(s(kafka.host.clone()))
                            .with_port(i32::from(kafka.port))
                            .with_rack(b.info.rack.clone().map(s)),
                    )
                })
                .collect(),
        )
    }

    async fn kafka_init_producer_id(
        &self,
        r: kreq::InitProducerIdRequest,
    ) -> kp::InitProducerIdResponse {
        let response = kp::InitProducerIdResponse::default();
        if r.transactional_id.is_some() {
            let code = ErrorCode::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
            self.metrics.count_error("kafka:InitProducerId", code);
            return response
                .with_error_code(code.0)
                .with_producer_id(kp::ProducerId(-1))
                .with_producer_epoch(-1);
        }
        match self
            .init_producer_id(Some((r.producer_id, r.producer_epoch)))
            .await
        {
            Ok((id, epoch)) => response
                .with_producer_id(kp::ProducerId(id))
                .with_producer_epoch(epoch),
            Err(err) => {
                tracing::warn!(error = %err, "cannot allocate a producer id");
                response
                    .with_error_code(err.code().0)
                    .with_producer_id(kp::ProducerId(-1))
                    .with_producer_epoch(-1)
            }
        }
    }
}

fn produce_op(r: kreq::ProduceRequest) -> ops::Produce {
    ops::Produce {
        // Outside -1..=1 stays invalid: the append path answers INVALID_REQUIRED_ACKS.
        acks: i8::try_from(r.acks).unwrap_or(i8::MAX),
        timeout: Duration::from_millis(clamp_u32(r.timeout_ms).into()),
        topics: r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .into_iter()
                    // Null records: an empty append, refused as INVALID_REQUEST.
                    .map(|(p, records)| (partition_index(p), records.unwrap_or_default()))
                    .collect();
                (t.name, partitions)
            })
            .collect(),
    }
}

fn kafka_produce(produced: PerPartition<ops::Produced>) -> kp::ProduceResponse {
    kp::ProduceResponse::default().with_responses(
        produced
            .into_iter()
            .map(|(name, partitions)| {
                kp::produce_response::TopicProduceResponse::default()
                    .with_name(topic_name(name))
                    .with_partition_responses(
                        partitions
                            .into_iter()
                            .map(|(p, result)| {
                                let response =
                                    kp::produce_response::PartitionProduceResponse::default()
                                        .with_index(p as i32)
                                        .with_error_code(code_of(&result))
                                        .with_log_append_time_ms(-1);
                                match result {
                                    Ok(produced) => response
                                        .with_base_offset(produced.base_offset.0 as i64)
                                        .with_log_start_offset(produced.log_start_offset.0 as i64),
                                    Err(err) => response
                                        .with_base_offset(-1)
                                        .with_log_start_offset(-1)
                                        .with_error_message(Some(s(err.to_string()))),
                                }
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

fn fetch_op(r: kreq::FetchRequest) -> ops::Fetch {
    let replica_id = u32::try_from(r.replica_id).ok();
    ops::Fetch {
        replica_id,
        // Consumers (read_uncommitted or read_committed: without transactions the same) read
        // below the high watermark. So does anything claiming a replica id here: Cairn's
        // followers copy with ReplicaFetch on the native listener, and a Kafka client must not
        // see records that are not committed.
        isolation: Isolation::HighWatermark,
        max_wait: Duration::from_millis(clamp_u32(r.max_wait_ms).into()),
        min_bytes: clamp_u32(r.min_bytes),
        max_bytes: clamp_u32(r.max_bytes),
        topics: r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| ops::FetchPartition {
                        partition: partition_index(p.partition),
                        fetch_offset: p.fetch_offset,
                        partition_max_bytes: clamp_u32(p.partition_max_bytes),
                        current_leader_epoch: epoch(p.current_leader_epoch),
                        last_fetched_epoch: epoch(p.last_fetched_epoch),
                    })
                    .collect();
                (t.name, partitions)
            })
            .collect(),
    }
}

fn kafka_fetch(fetched: PerPartition<ops::FetchedPartition>) -> kp::FetchResponse {
    kp::FetchResponse::default().with_responses(
        fetched
            .into_iter()
            .map(|(name, partitions)| {
                kp::fetch_response::FetchableTopicResponse::default()
                    .with_topic(topic_name(name))
                    .with_partitions(
                        partitions
                            .into_iter()
                            .map(|(p, result)| {
                                let code = code_of(&result);
                                let (hw, log_start, records) = match result {
                                    Ok(data) => (
                                        data.high_watermark.0 as i64,
                                        data.log_start_offset.0 as i64,
                                        data.records,
                                    ),
                                    Err(_) => (-1, -1, Bytes::new()),
                                };
                                kp::fetch_response::PartitionData::default()
                                    .with_partition_index(p as i32)
                                    .with_error_code(code)
                                    .with_high_watermark(hw)
                                    .with_last_stable_offset(hw)
                                    .with_log_start_offset(log_start)
                                    .with_aborted_transactions(Some(Vec::new()))
                                    .with_preferred_read_replica(kp::BrokerId(-1))
                                    .with_records(Some(records))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

/// A `kafka-protocol` response, encodable behind a `dyn`.
trait KafkaResponse {
    fn encode_with(
        &self,
        what: &'static str,
        correlation_id: i32,
        version: i16,
    ) -> Result<Vec<u8>, response::EncodeError>;
}

impl<M: cairn_kafka::kp::protocol::Encodable + cairn_kafka::kp::protocol::HeaderVersion>
    KafkaResponse for M
{
    fn encode_with(
        &self,
        what: &'static str,
        correlation_id: i32,
        version: i16,
    ) -> Result<Vec<u8>, response::EncodeError> {
        response::encode(what, correlation_id, version, self)
    }
}
