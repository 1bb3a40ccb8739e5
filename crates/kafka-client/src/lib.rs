//! The Kafka protocol as a [`cairn_client::Dialect`]: Cairn's producer, consumer and admin
//! client speak it to any Kafka-compatible broker (`cairn bench --protocol kafka`). Requests are
//! encoded at fixed versions every broker since Kafka 2.5 serves (Metadata v9, Produce v9, Fetch
//! v12, ListOffsets v6, CreateTopics v5, DeleteTopics v4, InitProducerId v3); responses are decoded by
//! `kafka-protocol` straight into the native response types (fetched records stay slices of the
//! response frame).
//!
//! A crate of its own so that `cairn-kafka`, the broker's codec, stays free of client code.
//!
//! Against Apache Kafka, keep the producer's `request_bytes_max` at or below its `batch_bytes`:
//! Kafka accepts one batch per partition per Produce request, Cairn any number.
#![forbid(unsafe_code)]

use std::any::Any;

use bytes::{BufMut, Bytes};
use cairn_client::{ClientError, Dialect};
use cairn_protocol::native::{self as native, ApiKey, Request};
use kafka_protocol::messages as kp;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// Versions used per API.
const METADATA: i16 = 9;
const PRODUCE: i16 = 9;
const FETCH: i16 = 12;
const LIST_OFFSETS: i16 = 6;
const CREATE_TOPICS: i16 = 5;
const DELETE_TOPICS: i16 = 4;
const INIT_PRODUCER_ID: i16 = 3;

/// The Kafka wire protocol for Cairn's clients.
#[derive(Debug, Default, Clone, Copy)]
pub struct KafkaDialect;

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

fn topic(text: &str) -> kp::TopicName {
    kp::TopicName(s(text))
}

fn unsupported(api: ApiKey) -> ClientError {
    ClientError::InvalidArgument(format!(
        "{} is not available over the Kafka protocol",
        api.name()
    ))
}

fn decode_error(api: ApiKey, err: impl std::fmt::Display) -> ClientError {
    ClientError::Connection {
        addr: "kafka".into(),
        message: format!("undecodable {} response: {err}", api.name()),
    }
}

fn encode<M: Encodable + HeaderVersion>(
    api_key: i16,
    version: i16,
    correlation_id: u32,
    client_id: &str,
    body: &M,
) -> Result<Vec<u8>, ClientError> {
    let fail = |e: &dyn std::fmt::Display| ClientError::InvalidArgument(e.to_string());
    let size = body.compute_size(version).map_err(|e| fail(&e))?;
    // Straight into the Vec the transport sends: the records are copied once.
    let mut buf: Vec<u8> = Vec::with_capacity(size + 16 + client_id.len());
    buf.put_i16(api_key);
    buf.put_i16(version);
    buf.put_i32(correlation_id as i32);
    let id = client_id.as_bytes();
    buf.put_i16(i16::try_from(id.len()).map_err(|e| fail(&e))?);
    buf.put_slice(id);
    if M::header_version(version) >= 2 {
        buf.put_u8(0); // no tagged fields
    }
    body.encode(&mut buf, version).map_err(|e| fail(&e))?;
    Ok(buf)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Dialect for KafkaDialect {
    fn encode_request(
        &self,
        correlation_id: u32,
        client_id: &str,
        request: &Request,
    ) -> Result<Vec<u8>, ClientError> {
        let (c, id) = (correlation_id, client_id);
        match request {
            Request::Metadata(r) => {
                let topics = (!r.topics.is_empty()).then(|| {
                    r.topics
                        .iter()
                        .map(|name| {
                            kp::metadata_request::MetadataRequestTopic::default()
                                .with_name(Some(topic(name)))
                        })
                        .collect()
                });
                let body = kp::MetadataRequest::default()
                    .with_topics(topics)
                    .with_allow_auto_topic_creation(r.allow_auto_create);
                encode(3, METADATA, c, id, &body)
            }
            Request::CreateTopics(r) => {
                let body = kp::CreateTopicsRequest::default()
                    .with_timeout_ms(30_000)
                    .with_validate_only(r.validate_only)
                    .with_topics(
                        r.topics
                            .iter()
                            .map(|t| {
                                kp::create_topics_request::CreatableTopic::default()
                                    .with_name(topic(&t.name))
                                    .with_num_partitions(if t.partitions == 0 {
                                        -1
                                    } else {
                                        i32::try_from(t.partitions).unwrap_or(i32::MAX)
                                    })
                                    .with_replication_factor(t.replication_factor)
                                    .with_configs(
                                        t.configs
                                            .iter()
                                            .map(|c| {
                                                kp::create_topics_request::CreatableTopicConfig::default()
                                                    .with_name(s(&c.key))
                                                    .with_value(Some(s(&c.value)))
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    );
                encode(19, CREATE_TOPICS, c, id, &body)
            }
            Request::DeleteTopics(r) => {
                let body = kp::DeleteTopicsRequest::default()
                    .with_timeout_ms(30_000)
                    .with_topic_names(r.names.iter().map(|n| topic(n)).collect());
                encode(20, DELETE_TOPICS, c, id, &body)
            }
            Request::Produce(r) => {
                let body = kp::ProduceRequest::default()
                    .with_transactional_id(None)
                    .with_acks(i16::from(r.acks))
                    .with_timeout_ms(i32::try_from(r.timeout_ms).unwrap_or(i32::MAX))
                    .with_topic_data(
                        r.topics
                            .iter()
                            .map(|t| {
                                kp::produce_request::TopicProduceData::default()
                                    .with_name(topic(&t.name))
                                    .with_partition_data(
                                        t.partitions
                                            .iter()
                                            .map(|p| {
                                                kp::produce_request::PartitionProduceData::default()
                                                    .with_index(p.partition as i32)
                                                    .with_records(Some(p.records.clone()))
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    );
                encode(0, PRODUCE, c, id, &body)
            }
            Request::Fetch(r) => {
                let clamp = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
                let body = kp::FetchRequest::default()
                    .with_replica_id(kp::BrokerId(-1))
                    .with_max_wait_ms(clamp(r.max_wait_ms))
                    .with_min_bytes(clamp(r.min_bytes))
                    .with_max_bytes(clamp(r.max_bytes))
                    .with_session_id(0)
                    .with_session_epoch(-1)
                    .with_topics(
                        r.topics
                            .iter()
                            .map(|t| {
                                kp::fetch_request::FetchTopic::default()
                                    .with_topic(topic(&t.name))
                                    .with_partitions(
                                        t.partitions
                                            .iter()
                                            .map(|p| {
                                                kp::fetch_request::FetchPartition::default()
                                                    .with_partition(p.partition as i32)
                                                    .with_fetch_offset(
                                                        i64::try_from(p.fetch_offset)
                                                            .unwrap_or(i64::MAX),
                                                    )
                                                    .with_partition_max_bytes(clamp(
                                                        p.partition_max_bytes,
                                                    ))
                                                    .with_current_leader_epoch(
                                                        p.current_leader_epoch,
                                                    )
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    );
                encode(1, FETCH, c, id, &body)
            }
            Request::ListOffsets(r) => {
                let body = kp::ListOffsetsRequest::default()
                    .with_replica_id(kp::BrokerId(-1))
                    .with_topics(
                        r.topics
                            .iter()
                            .map(|t| {
                                kp::list_offsets_request::ListOffsetsTopic::default()
                                    .with_name(topic(&t.name))
                                    .with_partitions(
                                        t.partitions
                                            .iter()
                                            .map(|p| {
                                                kp::list_offsets_request::ListOffsetsPartition::default()
                                                    .with_partition_index(p.partition as i32)
                                                    .with_timestamp(p.timestamp)
                                                    .with_current_leader_epoch(
                                                        p.current_leader_epoch,
                                                    )
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    );
                encode(2, LIST_OFFSETS, c, id, &body)
            }
            Request::InitProducerId(r) => {
                let body = kp::InitProducerIdRequest::default()
                    .with_transactional_id(None)
                    .with_transaction_timeout_ms(-1)
                    .with_producer_id(kp::ProducerId(r.producer_id))
                    .with_producer_epoch(r.producer_epoch);
                encode(22, INIT_PRODUCER_ID, c, id, &body)
            }
            // Group membership and administration are not translated (the group consumer speaks
            // the native protocol, whose heartbeats are long polls).
            _ => Err(unsupported(request.api_key())),
        }
    }

    fn decode_response(
        &self,
        api: ApiKey,
        correlation_id: u32,
        mut payload: Bytes,
    ) -> Result<Box<dyn Any + Send>, ClientError> {
        // Every version used is flexible: response header v1.
        let header =
            kp::ResponseHeader::decode(&mut payload, 1).map_err(|e| decode_error(api, e))?;
        if header.correlation_id as u32 != correlation_id {
            return Err(decode_error(
                api,
                format!(
                    "correlation id {} where {correlation_id} was expected",
                    header.correlation_id
                ),
            ));
        }
        let p = &mut payload;
        let err = |e| decode_error(api, e);
        let topic_result =
            |name: String, code: i16, message: Option<StrBytes>| native::TopicResult {
                name,
                error_code: code,
                error_message: message.map(|m| m.to_string()).unwrap_or_default(),
            };
        Ok(match api {
            ApiKey::Metadata => {
                let r = kp::MetadataResponse::decode(p, METADATA).map_err(err)?;
                Box::new(native::MetadataResponse {
                    brokers: r
                        .brokers
                        .into_iter()
                        .map(|b| native::BrokerMetadata {
                            node_id: b.node_id.0 as u32,
                            host: b.host.to_string(),
                            port: u16::try_from(b.port).unwrap_or(0),
                            rack: b.rack.map(|r| r.to_string()).unwrap_or_default(),
                        })
                        .collect(),
                    controller_id: u32::try_from(r.controller_id.0).unwrap_or(u32::MAX),
                    topics: r
                        .topics
                        .into_iter()
                        .map(|t| native::TopicMetadata {
                            error_code: t.error_code,
                            name: t.name.map(|n| n.0.to_string()).unwrap_or_default(),
                            partitions: t
                                .partitions
                                .into_iter()
                                .map(|p| native::PartitionMetadata {
                                    partition: p.partition_index as u32,
                                    error_code: p.error_code,
                                    leader: u32::try_from(p.leader_id.0).unwrap_or(u32::MAX),
                                    leader_epoch: p.leader_epoch.max(0) as u32,
                                    replicas: p.replica_nodes.iter().map(|r| r.0 as u32).collect(),
                                    isr: p.isr_nodes.iter().map(|r| r.0 as u32).collect(),
                                    offline_replicas: p
                                        .offline_replicas
                                        .iter()
                                        .map(|r| r.0 as u32)
                                        .collect(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
            }
            ApiKey::CreateTopics => {
                let r = kp::CreateTopicsResponse::decode(p, CREATE_TOPICS).map_err(err)?;
                Box::new(native::CreateTopicsResponse {
                    topics: r
                        .topics
                        .into_iter()
                        .map(|t| topic_result(t.name.0.to_string(), t.error_code, t.error_message))
                        .collect(),
                })
            }
            ApiKey::DeleteTopics => {
                let r = kp::DeleteTopicsResponse::decode(p, DELETE_TOPICS).map_err(err)?;
                Box::new(native::DeleteTopicsResponse {
                    topics: r
                        .responses
                        .into_iter()
                        .map(|t| {
                            let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
                            topic_result(name, t.error_code, t.error_message)
                        })
                        .collect(),
                })
            }
            ApiKey::Produce => {
                let r = kp::ProduceResponse::decode(p, PRODUCE).map_err(err)?;
                Box::new(native::ProduceResponse {
                    topics: r
                        .responses
                        .into_iter()
                        .map(|t| native::ProduceTopicResponse {
                            name: t.name.0.to_string(),
                            partitions: t
                                .partition_responses
                                .into_iter()
                                .map(|p| native::ProducePartitionResponse {
                                    partition: p.index as u32,
                                    error_code: p.error_code,
                                    error_message: p
                                        .error_message
                                        .map(|m| m.to_string())
                                        .unwrap_or_default(),
                                    base_offset: u(p.base_offset),
                                    log_append_time: p.log_append_time_ms,
                                    log_start_offset: u(p.log_start_offset),
                                })
                                .collect(),
                        })
                        .collect(),
                })
            }
            ApiKey::Fetch => {
                let r = kp::FetchResponse::decode(p, FETCH).map_err(err)?;
                if r.error_code != 0 {
                    return Err(ClientError::broker("Fetch", r.error_code, String::new()));
                }
                Box::new(native::FetchResponse {
                    topics: r
                        .responses
                        .into_iter()
                        .map(|t| native::FetchTopicResponse {
                            name: t.topic.0.to_string(),
                            partitions: t
                                .partitions
                                .into_iter()
                                .map(|p| native::FetchPartitionResponse {
                                    partition: p.partition_index as u32,
                                    error_code: p.error_code,
                                    high_watermark: u(p.high_watermark),
                                    log_start_offset: u(p.log_start_offset),
                                    records: p.records.unwrap_or_default(),
                                })
                                .collect(),
                        })
                        .collect(),
                })
            }
            ApiKey::ListOffsets => {
                let r = kp::ListOffsetsResponse::decode(p, LIST_OFFSETS).map_err(err)?;
                Box::new(native::ListOffsetsResponse {
                    topics: r
                        .topics
                        .into_iter()
                        .map(|t| native::ListOffsetsTopicResponse {
                            name: t.name.0.to_string(),
                            partitions: t
                                .partitions
                                .into_iter()
                                .map(|p| native::ListOffsetsPartitionResponse {
                                    partition: p.partition_index as u32,
                                    error_code: p.error_code,
                                    timestamp: p.timestamp,
                                    offset: u(p.offset),
                                })
                                .collect(),
                        })
                        .collect(),
                })
            }
            ApiKey::InitProducerId => {
                let r = kp::InitProducerIdResponse::decode(p, INIT_PRODUCER_ID).map_err(err)?;
                Box::new(native::InitProducerIdResponse {
                    error_code: r.error_code,
                    error_message: String::new(),
                    producer_id: r.producer_id.0,
                    producer_epoch: r.producer_epoch,
                })
            }
            _ => return Err(unsupported(api)),
        })
    }
}

/// Connects to a Kafka-protocol listener at `addr` (`host:port`).
pub async fn connect(addr: &str, client_id: &str) -> Result<cairn_client::Connection, ClientError> {
    cairn_client::Connection::connect_with_dialect(
        addr,
        client_id,
        std::sync::Arc::new(KafkaDialect),
    )
    .await
}
