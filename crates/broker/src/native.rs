//! The native listener's request handling: a native frame is decoded, translated to the broker's
//! operations (`ops.rs`, served by `handler.rs`, the same ones the Kafka listener uses) and
//! answered in the native format. Errors become wire codes here and nowhere else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_protocol::limits::CLIENT_ID_BYTES_MAX;
use cairn_protocol::native::*;

use crate::error::BrokerError;
use crate::handler::{Deferred, Handler, Outcome, ready};
use crate::ops::{self, PerPartition};
use crate::partition::Isolation;

/// A result's wire code and message.
fn code_of<T>(result: &Result<T, BrokerError>) -> (i16, String) {
    match result {
        Ok(_) => (0, String::new()),
        Err(err) => (err.code().0, err.to_string()),
    }
}

impl Handler {
    /// Handles one frame payload (header and body) from start to response.
    pub async fn handle(self: &Arc<Self>, frame: Bytes) -> Outcome {
        self.begin(frame).await.await
    }

    /// The ordered part of handling a frame: decoding, appends, topic changes. A connection awaits
    /// this before it starts the next request, so requests take effect in the order they were
    /// sent (a pipelining producer's batches land in order). What follows (waiting for commits,
    /// long-poll fetches) is returned as a future that may run alongside later requests.
    pub async fn begin(self: &Arc<Self>, mut frame: Bytes) -> Deferred {
        let started = Instant::now();
        let header = match RequestHeader::decode(&mut frame, "header") {
            Ok(header) => header,
            Err(err) => return ready(Outcome::Close(format!("undecodable request header: {err}"))),
        };
        let corr = header.correlation_id;
        let Some(api) = ApiKey::from_u16(header.api_key) else {
            self.count_error("unknown", ErrorCode::UNSUPPORTED_VERSION);
            let message = format!("unknown api key {}", header.api_key);
            return ready(Outcome::Respond(encode_error_response(
                corr,
                ErrorCode::UNSUPPORTED_VERSION,
                &message,
            )));
        };
        let error = |code: ErrorCode, message: String| {
            self.count_error(api.name(), code);
            ready(Outcome::Respond(encode_error_response(
                corr, code, &message,
            )))
        };
        let (min, max) = api.versions();
        if !(min..=max).contains(&header.api_version) {
            let message = format!(
                "{} v{} is not supported (v{min}..=v{max})",
                api.name(),
                header.api_version
            );
            return error(ErrorCode::UNSUPPORTED_VERSION, message);
        }
        if header.client_id.len() > CLIENT_ID_BYTES_MAX {
            return error(
                ErrorCode::INVALID_REQUEST,
                format!("client id longer than {CLIENT_ID_BYTES_MAX} bytes"),
            );
        }
        let request = match Request::decode_body(api, frame) {
            Ok(request) => request,
            Err(err) => {
                return error(
                    ErrorCode::INVALID_REQUEST,
                    format!("{} request: {err}", api.name()),
                );
            }
        };
        let this = Arc::clone(self);
        let finish = move |outcome: Outcome| {
            this.metrics.requests.with_label_values(&[api.name()]).inc();
            this.metrics
                .request_seconds
                .with_label_values(&[api.name()])
                .observe(started.elapsed().as_secs_f64());
            outcome
        };
        let respond = move |body: &dyn ErasedResponse| Outcome::Respond(body.response(corr));
        match request {
            Request::Produce(r) => {
                let acks = r.acks;
                let appended = self.produce_append(produce_op(r)).await;
                let this = Arc::clone(self);
                Box::pin(async move {
                    let produced = this.produce_finish(appended).await;
                    finish(if acks == 0 {
                        Outcome::Silent
                    } else {
                        respond(&produce_response(produced))
                    })
                })
            }
            Request::Fetch(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let fetched = this.fetch(fetch_op(r)).await;
                    finish(Outcome::RespondChunks(encode_response_chunks(
                        corr,
                        &fetch_response(fetched),
                    )))
                })
            }
            Request::FindCoordinator(_)
            | Request::JoinGroup(_)
            | Request::SyncGroup(_)
            | Request::Heartbeat(_)
            | Request::LeaveGroup(_)
            | Request::OffsetCommit(_)
            | Request::OffsetFetch(_)
            | Request::ListGroups(_)
            | Request::DescribeGroups(_)
            | Request::DeleteGroups(_) => {
                self.begin_native_group(corr, header.client_id, request, finish)
            }
            Request::ApiVersions(_) => ready(finish(respond(&api_versions()))),
            Request::Metadata(r) => {
                let names = (!r.topics.is_empty()).then_some(r.topics);
                let view = self.metadata(names, r.allow_auto_create).await;
                ready(finish(respond(&metadata_response(view))))
            }
            Request::CreateTopics(r) => {
                let topics = r
                    .topics
                    .into_iter()
                    .map(|t| ops::NewTopic {
                        name: t.name,
                        partitions: (t.partitions != 0).then_some(t.partitions),
                        replication_factor: u16::try_from(t.replication_factor).ok(),
                        configs: t.configs.into_iter().map(|c| (c.key, c.value)).collect(),
                    })
                    .collect();
                let results = self.create_topics(topics, r.validate_only).await;
                ready(finish(respond(&CreateTopicsResponse {
                    topics: topic_results(results),
                })))
            }
            Request::DeleteTopics(r) => {
                let results = self.delete_topics(r.names).await;
                ready(finish(respond(&DeleteTopicsResponse {
                    topics: topic_results(results),
                })))
            }
            Request::DescribeTopics(r) => ready(finish(respond(&self.describe_topics(r)))),
            Request::ListOffsets(r) => {
                let listed = self.list_offsets(list_offsets_op(r));
                ready(finish(respond(&list_offsets_response(listed))))
            }
            Request::CreatePartitions(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let mut results = Vec::with_capacity(r.topics.len());
                    for topic in r.topics {
                        let result = this
                            .create_partitions(&topic.name, topic.count, r.validate_only)
                            .await;
                        if let Err(err) = &result {
                            this.count_error("create_partitions", err.code());
                        }
                        results.push((topic.name, result));
                    }
                    finish(respond(&CreatePartitionsResponse {
                        topics: topic_results(results),
                    }))
                })
            }
            Request::ElectLeaders(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let partitions = (!r.topics.is_empty()).then(|| {
                        r.topics
                            .iter()
                            .flat_map(|t| t.partitions.iter().map(|p| (t.name.clone(), *p)))
                            .collect()
                    });
                    let outcome = match this.elect_leaders(r.election_type == 1, partitions).await {
                        Ok(results) => respond(&elected_response(results)),
                        Err(err) => Outcome::Respond(encode_error_response(
                            corr,
                            err.code(),
                            &err.to_string(),
                        )),
                    };
                    finish(outcome)
                })
            }
            Request::AlterPartitionReassignments(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let asked = r
                        .reassignments
                        .into_iter()
                        .map(|a| (a.topic, a.partition, (!a.cancel).then_some(a.replicas)))
                        .collect();
                    let outcome = match this.reassign(asked).await {
                        Ok(results) => respond(&AlterPartitionReassignmentsResponse {
                            results: results
                                .into_iter()
                                .map(|(topic, partition, result)| {
                                    let (error_code, error_message) = match result {
                                        Ok(()) => (0, String::new()),
                                        Err((code, message)) => (code.0, message),
                                    };
                                    ReassignmentResult {
                                        topic,
                                        partition,
                                        error_code,
                                        error_message,
                                    }
                                })
                                .collect(),
                        }),
                        Err(err) => Outcome::Respond(encode_error_response(
                            corr,
                            err.code(),
                            &err.to_string(),
                        )),
                    };
                    finish(outcome)
                })
            }
            Request::InitProducerId(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let current = Some((r.producer_id, r.producer_epoch));
                    let response = match this.init_producer_id(current).await {
                        Ok((producer_id, producer_epoch)) => InitProducerIdResponse {
                            error_code: 0,
                            error_message: String::new(),
                            producer_id,
                            producer_epoch,
                        },
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot allocate a producer id");
                            InitProducerIdResponse {
                                error_code: err.code().0,
                                error_message: err.to_string(),
                                producer_id: -1,
                                producer_epoch: -1,
                            }
                        }
                    };
                    finish(respond(&response))
                })
            }
            Request::ListPartitionReassignments(r) => {
                let reassignments = self
                    .reassignments(&r.topics)
                    .into_iter()
                    .map(|(topic, partition, state)| OngoingReassignment {
                        topic,
                        partition,
                        replicas: state.replicas,
                        adding: state.adding,
                        removing: state.removing,
                    })
                    .collect();
                ready(finish(respond(&ListPartitionReassignmentsResponse {
                    reassignments,
                })))
            }
            Request::ReplicaFetch(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let fetched = this.replica_fetch(r).await;
                    finish(Outcome::RespondChunks(encode_response_chunks(
                        corr, &fetched,
                    )))
                })
            }
            Request::DescribeCluster(_) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    let described = this.describe_cluster().await;
                    finish(respond(&described))
                })
            }
        }
    }

    fn describe_topics(&self, request: DescribeTopicsRequest) -> DescribeTopicsResponse {
        let names = self.requested_or_all(request.names);
        let defaults = self.manager.defaults();
        let topics = names
            .into_iter()
            .map(|name| match self.manager.topic(&name) {
                None => DescribedTopic {
                    error_code: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                    error_message: format!("topic {name:?} does not exist"),
                    name,
                    ..DescribedTopic::default()
                },
                Some(topic) => DescribedTopic {
                    name,
                    error_code: 0,
                    error_message: String::new(),
                    configs: topic
                        .config
                        .describe(defaults, topic.replication_factor)
                        .into_iter()
                        .map(|(key, value, is_default)| DescribedConfig {
                            key,
                            value,
                            is_default,
                        })
                        .collect(),
                    partitions: (0..topic.n_partitions())
                        .map(|index| self.describe_partition(&topic, index))
                        .collect(),
                },
            })
            .collect();
        DescribeTopicsResponse { topics }
    }
}

/// ElectLeaders' answer, grouped by topic in the order the results came.
fn elected_response(results: Vec<crate::handler::Elected>) -> ElectLeadersResponse {
    let mut topics: Vec<ElectedTopic> = Vec::new();
    for (topic, partition, result) in results {
        let (error_code, error_message) = match result {
            Ok(()) => (ErrorCode::NONE.0, String::new()),
            Err((code, message)) => (code.0, message),
        };
        let elected = ElectedPartition {
            partition,
            error_code,
            error_message,
        };
        match topics.last_mut().filter(|t| t.name == topic) {
            Some(t) => t.partitions.push(elected),
            None => topics.push(ElectedTopic {
                name: topic,
                partitions: vec![elected],
            }),
        }
    }
    ElectLeadersResponse { topics }
}

impl Handler {
    /// One partition as DescribeTopics reports it: its replica state from the metadata, and
    /// its log's offsets and size if this broker hosts it (NOT_LEADER_OR_FOLLOWER otherwise:
    /// ask its leader).
    fn describe_partition(&self, topic: &crate::manager::Topic, index: u32) -> DescribedPartition {
        let image = self.manager.image();
        let state = image.partition(&topic.name, index);
        let mut described = DescribedPartition {
            partition: index,
            leader: state.and_then(|s| s.leader).unwrap_or(u32::MAX),
            leader_epoch: state.map_or(0, |s| s.leader_epoch),
            replicas: state.map(|s| s.replicas.clone()).unwrap_or_default(),
            isr: state.map(|s| s.isr.clone()).unwrap_or_default(),
            ..DescribedPartition::default()
        };
        match topic.partition(index, self.config.node_id) {
            Ok(p) => {
                described.log_start_offset = p.log_start_offset().0;
                described.log_end_offset = p.log_end_offset().0;
                described.high_watermark = p.high_watermark().0;
                described.size_bytes = p.size_bytes();
                described.n_segments = p.n_segments() as u32;
            }
            Err(err) => described.error_code = err.code().0,
        }
        described
    }
}

impl Handler {
    /// Every registered broker, the active controller and the quorum's voters (their lag as
    /// the active controller sees it).
    async fn describe_cluster(&self) -> DescribeClusterResponse {
        let image = self.manager.image();
        let client = &self.cluster.client;
        let quorum = client
            .describe_quorum(std::time::Duration::from_millis(500))
            .await;
        let leader_view = quorum
            .iter()
            .find(|q| q.leader == Some(q.node_id))
            .or_else(|| quorum.first());
        let last = leader_view.and_then(|q| q.last_log_index);
        let voters = match leader_view {
            Some(view) => view
                .voters
                .iter()
                .map(|(id, matched)| QuorumVoter {
                    node_id: *id,
                    lag: match (last, matched) {
                        (Some(last), Some(matched)) => {
                            i64::try_from(last.saturating_sub(*matched)).unwrap_or(i64::MAX)
                        }
                        // The leader's own entry: no lag.
                        _ if Some(*id) == view.leader => 0,
                        _ => -1,
                    },
                })
                .collect(),
            None => Vec::new(),
        };
        DescribeClusterResponse {
            controller_id: client.leader().unwrap_or(u32::MAX),
            term: leader_view.map_or(0, |q| q.term),
            metadata_offset: image.offset,
            brokers: image
                .brokers
                .values()
                .map(|b| DescribedBroker {
                    node_id: b.info.node_id,
                    host: b.info.native.host.clone(),
                    port: b.info.native.port,
                    kafka: b
                        .info
                        .kafka
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    rack: b.info.rack.clone().unwrap_or_default(),
                    fenced: b.fenced,
                    broker_epoch: b.epoch,
                })
                .collect(),
            voters,
        }
    }
}

fn api_versions() -> ApiVersionsResponse {
    ApiVersionsResponse {
        apis: ApiKey::ALL
            .iter()
            .map(|api| {
                let (min_version, max_version) = api.versions();
                ApiVersion {
                    api_key: *api as u16,
                    min_version,
                    max_version,
                }
            })
            .collect(),
        broker_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn produce_op(r: ProduceRequest) -> ops::Produce {
    ops::Produce {
        acks: r.acks,
        timeout: Duration::from_millis(r.timeout_ms.into()),
        topics: r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| (p.partition, p.records))
                    .collect();
                (t.name, partitions)
            })
            .collect(),
    }
}

fn produce_response(produced: PerPartition<ops::Produced>) -> ProduceResponse {
    ProduceResponse {
        topics: produced
            .into_iter()
            .map(|(name, partitions)| ProduceTopicResponse {
                name,
                partitions: partitions
                    .into_iter()
                    .map(|(partition, result)| {
                        let (error_code, error_message) = code_of(&result);
                        let ok = result.ok();
                        ProducePartitionResponse {
                            partition,
                            error_code,
                            error_message,
                            base_offset: ok.map_or(0, |p| p.base_offset.0),
                            log_append_time: -1,
                            log_start_offset: ok.map_or(0, |p| p.log_start_offset.0),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn fetch_op(r: FetchRequest) -> ops::Fetch {
    ops::Fetch {
        replica_id: None,
        isolation: Isolation::HighWatermark,
        max_wait: Duration::from_millis(r.max_wait_ms.into()),
        min_bytes: r.min_bytes,
        max_bytes: r.max_bytes,
        topics: r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| ops::FetchPartition {
                        partition: p.partition,
                        // Past i64::MAX is out of range, as it should be.
                        fetch_offset: i64::try_from(p.fetch_offset).unwrap_or(-1),
                        partition_max_bytes: p.partition_max_bytes,
                        current_leader_epoch: u32::try_from(p.current_leader_epoch).ok(),
                        last_fetched_epoch: None,
                    })
                    .collect();
                (t.name, partitions)
            })
            .collect(),
    }
}

fn fetch_response(fetched: PerPartition<ops::FetchedPartition>) -> FetchResponse {
    FetchResponse {
        topics: fetched
            .into_iter()
            .map(|(name, partitions)| FetchTopicResponse {
                name,
                partitions: partitions
                    .into_iter()
                    .map(|(partition, result)| {
                        let (error_code, _) = code_of(&result);
                        let data = result.unwrap_or_default();
                        FetchPartitionResponse {
                            partition,
                            error_code,
                            high_watermark: data.high_watermark.0,
                            log_start_offset: data.log_start_offset.0,
                            records: data.records,
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn list_offsets_op(r: ListOffsetsRequest) -> ops::ListOffsets {
    ops::ListOffsets {
        isolation: Isolation::HighWatermark,
        topics: r
            .topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .into_iter()
                    .map(|p| {
                        let epoch = u32::try_from(p.current_leader_epoch).ok();
                        (p.partition, epoch, p.timestamp)
                    })
                    .collect();
                (t.name, partitions)
            })
            .collect(),
    }
}

fn list_offsets_response(listed: PerPartition<ops::ListedOffset>) -> ListOffsetsResponse {
    ListOffsetsResponse {
        topics: listed
            .into_iter()
            .map(|(name, partitions)| ListOffsetsTopicResponse {
                name,
                partitions: partitions
                    .into_iter()
                    .map(|(partition, result)| {
                        let (error_code, _) = code_of(&result);
                        let found = result.ok();
                        ListOffsetsPartitionResponse {
                            partition,
                            error_code,
                            timestamp: found.map_or(-1, |f| f.timestamp),
                            offset: found.map_or(0, |f| f.offset.0),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn metadata_response(view: ops::MetadataView) -> MetadataResponse {
    MetadataResponse {
        brokers: view
            .brokers
            .into_iter()
            .map(|b| BrokerMetadata {
                node_id: b.node_id,
                host: b.native.0,
                port: b.native.1,
                rack: b.rack.unwrap_or_default(),
            })
            .collect(),
        controller_id: view.controller_id,
        topics: view
            .topics
            .into_iter()
            .map(|(name, result)| {
                let (error_code, _) = code_of(&result);
                TopicMetadata {
                    error_code,
                    name,
                    partitions: result
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| PartitionMetadata {
                            partition: p.partition,
                            error_code: if p.leader.is_some() {
                                0
                            } else {
                                ErrorCode::LEADER_NOT_AVAILABLE.0
                            },
                            leader: p.leader.unwrap_or(u32::MAX),
                            leader_epoch: p.leader_epoch,
                            replicas: p.replicas,
                            isr: p.isr,
                            offline_replicas: p.offline,
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn topic_results(results: Vec<(String, Result<(), BrokerError>)>) -> Vec<TopicResult> {
    results
        .into_iter()
        .map(|(name, result)| {
            let (error_code, error_message) = code_of(&result);
            TopicResult {
                name,
                error_code,
                error_message,
            }
        })
        .collect()
}

/// A response body of any message type (requests answer with different types).
pub(crate) trait ErasedResponse {
    fn response(&self, corr: u32) -> Vec<u8>;
}

impl<T: Wire> ErasedResponse for T {
    fn response(&self, corr: u32) -> Vec<u8> {
        encode_response(corr, self)
    }
}
