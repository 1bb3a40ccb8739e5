//! Request handling: one decoded request in, one response payload out. Transport-agnostic, so the
//! TCP listener and an in-process client share it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchError};
use cairn_protocol::limits::{CLIENT_ID_BYTES_MAX, FETCH_BYTES_MAX};
use cairn_protocol::native::*;
use cairn_storage::{AppendError, FlushPolicy, ReadError};
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::manager::{Partition, Topic, TopicManager, error_chain};
use crate::metrics::Metrics;
use crate::producers::SequenceCheck;

/// What to do after handling a frame.
#[derive(Debug)]
pub enum Outcome {
    /// Send this response payload.
    Respond(Vec<u8>),
    /// Send this response payload, given as chunks written back to back (fetched records go
    /// from the memory map to the socket without a copy).
    RespondChunks(Vec<Bytes>),
    /// Send nothing (acks=0 produce).
    Silent,
    /// The frame cannot be answered (its header does not decode): close the connection.
    Close(String),
}

/// The part of a request that may run alongside later requests of its connection.
pub type Deferred = Pin<Box<dyn Future<Output = Outcome> + Send>>;

fn ready(outcome: Outcome) -> Deferred {
    Box::pin(std::future::ready(outcome))
}

/// A partition to make durable before answering: (topic index, partition index, partition, last
/// appended offset) in the response.
type DurableWait = (usize, usize, Arc<Partition>, Offset);

/// A produce request after its appends.
pub(crate) struct Appended {
    response: ProduceResponse,
    durable_waits: Vec<DurableWait>,
    timeout_ms: u32,
}

/// The broker's request handler.
#[derive(Debug)]
pub struct Handler {
    pub(crate) config: BrokerConfig,
    pub(crate) manager: Arc<TopicManager>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) advertised_host: String,
    pub(crate) advertised_port: u16,
    pub(crate) kafka_advertised_host: String,
    pub(crate) kafka_advertised_port: u16,
    pub(crate) producer_ids: Arc<crate::producers::ProducerIds>,
    pub(crate) offsets: Arc<crate::offsets::OffsetStore>,
    pub(crate) groups: Arc<crate::groups::Coordinator>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Handler {
    /// Handles one frame payload (header and body) from start to response.
    pub async fn handle(self: &Arc<Self>, frame: Bytes) -> Outcome {
        self.begin(frame).await.await
    }

    /// The ordered part of handling a frame: decoding, appends, topic changes. A connection awaits
    /// this before it starts the next request, so requests take effect in the order they were
    /// sent (a pipelining producer's batches land in order). What follows (waiting for durability,
    /// long-poll fetches) is returned as a future that may run alongside later requests.
    pub async fn begin(self: &Arc<Self>, mut frame: Bytes) -> Deferred {
        let started = Instant::now();
        let header = match RequestHeader::decode(&mut frame, "header") {
            Ok(header) => header,
            Err(err) => return ready(Outcome::Close(format!("undecodable request header: {err}"))),
        };
        let corr = header.correlation_id;
        let Some(api) = ApiKey::from_u16(header.api_key) else {
            self.metrics
                .count_error("unknown", ErrorCode::UNSUPPORTED_VERSION);
            let message = format!("unknown api key {}", header.api_key);
            return ready(Outcome::Respond(encode_error_response(
                corr,
                ErrorCode::UNSUPPORTED_VERSION,
                &message,
            )));
        };
        let error = |code: ErrorCode, message: String| {
            self.metrics.count_error(api.name(), code);
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
        match request {
            Request::Produce(r) => {
                let acks = r.acks;
                let appended = self.produce_append(r).await;
                let this = Arc::clone(self);
                Box::pin(async move {
                    let response = this.produce_finish(appended).await;
                    finish(if acks == 0 {
                        Outcome::Silent
                    } else {
                        Outcome::Respond(encode_response(corr, &response))
                    })
                })
            }
            Request::Fetch(r) => {
                let this = Arc::clone(self);
                Box::pin(async move {
                    finish(Outcome::RespondChunks(encode_response_chunks(
                        corr,
                        &this.fetch(r).await,
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
            request => {
                let outcome = match request {
                    Request::ApiVersions(_) => {
                        Outcome::Respond(encode_response(corr, &self.api_versions()))
                    }
                    Request::Metadata(r) => {
                        Outcome::Respond(encode_response(corr, &self.metadata(r).await))
                    }
                    Request::CreateTopics(r) => {
                        Outcome::Respond(encode_response(corr, &self.create_topics(r).await))
                    }
                    Request::DeleteTopics(r) => {
                        Outcome::Respond(encode_response(corr, &self.delete_topics(r).await))
                    }
                    Request::DescribeTopics(r) => {
                        Outcome::Respond(encode_response(corr, &self.describe_topics(r)))
                    }
                    Request::ListOffsets(r) => {
                        Outcome::Respond(encode_response(corr, &self.list_offsets(r)))
                    }
                    _ => Outcome::Close("unreachable dispatch".into()),
                };
                ready(finish(outcome))
            }
        }
    }

    fn count_error(&self, api: ApiKey, code: ErrorCode) {
        self.metrics.count_error(api.name(), code);
    }

    fn api_versions(&self) -> ApiVersionsResponse {
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

    /// Runs blocking topic administration off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&TopicManager) -> T + Send + 'static,
    ) -> Option<T> {
        let manager = Arc::clone(&self.manager);
        tokio::task::spawn_blocking(move || f(&manager)).await.ok()
    }

    /// The topic named `name`; if it does not exist and `create` is set and the broker
    /// auto-creates topics, it is created first.
    async fn topic_or_create(&self, name: &str, create: bool) -> Option<Arc<Topic>> {
        if let Some(topic) = self.manager.topic(name) {
            return Some(topic);
        }
        // The internal offsets topic is created by the offset store, with its own config.
        if !create || !self.config.auto_create_topics || name == crate::offsets::OFFSETS_TOPIC {
            return None;
        }
        let owned = name.to_string();
        let result = self
            .blocking(move |m| m.create_topic(&owned, 0, BTreeMap::new(), false))
            .await;
        match result {
            // Ok, or another request created it meanwhile.
            Some(Ok(())) => {}
            Some(Err(err)) if err.code == ErrorCode::TOPIC_ALREADY_EXISTS => {}
            Some(Err(err)) => {
                tracing::debug!(topic = %name, error = %err.message, "auto-create refused");
                return None;
            }
            None => return None,
        }
        self.manager.topic(name)
    }

    /// The requested names, or every topic's when none were named.
    fn requested_or_all(&self, names: Vec<String>) -> Vec<String> {
        if !names.is_empty() {
            return names;
        }
        self.manager
            .topics()
            .iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    pub(crate) async fn metadata(&self, request: MetadataRequest) -> MetadataResponse {
        let auto_create = request.allow_auto_create;
        let names = self.requested_or_all(request.topics);
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            let Some(topic) = self.topic_or_create(&name, auto_create).await else {
                let code = if crate::topic::validate_topic_name(&name).is_err() {
                    ErrorCode::INVALID_TOPIC_EXCEPTION
                } else {
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
                };
                self.count_error(ApiKey::Metadata, code);
                topics.push(TopicMetadata {
                    error_code: code.0,
                    name,
                    partitions: vec![],
                });
                continue;
            };
            topics.push(TopicMetadata {
                error_code: 0,
                name,
                partitions: topic
                    .partitions
                    .iter()
                    .map(|p| PartitionMetadata {
                        partition: p.index,
                        error_code: 0,
                        leader: self.config.node_id,
                        leader_epoch: p.leader_epoch,
                        replicas: vec![self.config.node_id],
                    })
                    .collect(),
            });
        }
        MetadataResponse {
            brokers: vec![BrokerMetadata {
                node_id: self.config.node_id,
                host: self.advertised_host.clone(),
                port: self.advertised_port,
            }],
            controller_id: self.config.node_id,
            topics,
        }
    }

    pub(crate) async fn create_topics(&self, request: CreateTopicsRequest) -> CreateTopicsResponse {
        let mut results = Vec::with_capacity(request.topics.len());
        for topic in request.topics {
            let overrides: BTreeMap<String, String> = topic
                .configs
                .into_iter()
                .map(|c| (c.key, c.value))
                .collect();
            let name = topic.name.clone();
            let validate_only = request.validate_only;
            let (code, message) = if name == crate::offsets::OFFSETS_TOPIC {
                (
                    ErrorCode::INVALID_REQUEST,
                    format!("{name} is internal: the broker creates it on the first commit"),
                )
            } else {
                let result = self
                    .blocking(move |m| {
                        m.create_topic(&name, topic.partitions, overrides, validate_only)
                    })
                    .await;
                topic_outcome(result)
            };
            self.count_error(ApiKey::CreateTopics, code);
            results.push(TopicResult {
                name: topic.name,
                error_code: code.0,
                error_message: message,
            });
        }
        CreateTopicsResponse { topics: results }
    }

    pub(crate) async fn delete_topics(&self, request: DeleteTopicsRequest) -> DeleteTopicsResponse {
        let mut results = Vec::with_capacity(request.names.len());
        for name in request.names {
            let owned = name.clone();
            let (code, message) = if name == crate::offsets::OFFSETS_TOPIC {
                (
                    ErrorCode::INVALID_REQUEST,
                    format!("{name} is internal: delete groups instead"),
                )
            } else {
                topic_outcome(self.blocking(move |m| m.delete_topic(&owned)).await)
            };
            self.count_error(ApiKey::DeleteTopics, code);
            results.push(TopicResult {
                name,
                error_code: code.0,
                error_message: message,
            });
        }
        DeleteTopicsResponse { topics: results }
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
                        .describe(defaults)
                        .into_iter()
                        .map(|(key, value, is_default)| DescribedConfig {
                            key,
                            value,
                            is_default,
                        })
                        .collect(),
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|p| {
                            let end = p.log.log_end_offset().0;
                            DescribedPartition {
                                partition: p.index,
                                error_code: 0,
                                leader: self.config.node_id,
                                leader_epoch: p.leader_epoch,
                                log_start_offset: p.log.log_start_offset().0,
                                log_end_offset: end,
                                high_watermark: end,
                                size_bytes: p.log.size_bytes(),
                                n_segments: p.log.n_segments() as u32,
                            }
                        })
                        .collect(),
                },
            })
            .collect();
        DescribeTopicsResponse { topics }
    }

    /// Appends every partition's batches, in request order.
    pub(crate) async fn produce_append(&self, request: ProduceRequest) -> Appended {
        let ProduceRequest {
            acks,
            timeout_ms,
            topics,
        } = request;
        let acks_valid = (-1..=1).contains(&acks);
        let mut durable_waits: Vec<DurableWait> = Vec::new();
        let mut response = ProduceResponse {
            topics: Vec::with_capacity(topics.len()),
        };
        for topic in topics {
            let found = if acks_valid {
                self.topic_or_create(&topic.name, true).await
            } else {
                None
            };
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for part in topic.partitions {
                let mut result = ProducePartitionResponse {
                    partition: part.partition,
                    log_append_time: -1,
                    ..Default::default()
                };
                let outcome = if !acks_valid {
                    Err((
                        ErrorCode::INVALID_REQUIRED_ACKS,
                        format!("acks {acks} is not 0, 1 or -1"),
                    ))
                } else {
                    match found
                        .as_ref()
                        .and_then(|t| t.partitions.get(part.partition as usize))
                    {
                        None => Err((
                            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                            format!("{}-{} does not exist", topic.name, part.partition),
                        )),
                        Some(partition) => self
                            .append(partition, part.records)
                            .await
                            .map(|base| (Arc::clone(partition), base)),
                    }
                };
                match outcome {
                    Ok((partition, (base, last))) => {
                        result.base_offset = base.0;
                        result.log_start_offset = partition.log.log_start_offset().0;
                        if acks == -1 {
                            durable_waits.push((
                                response.topics.len(),
                                partitions.len(),
                                partition,
                                last,
                            ));
                        }
                    }
                    Err((code, message)) => {
                        self.count_error(ApiKey::Produce, code);
                        result.error_code = code.0;
                        result.error_message = message;
                    }
                }
                partitions.push(result);
            }
            response.topics.push(ProduceTopicResponse {
                name: topic.name,
                partitions,
            });
        }
        Appended {
            response,
            durable_waits,
            timeout_ms,
        }
    }

    /// For acks=all, waits until every appended partition is durable.
    pub(crate) async fn produce_finish(&self, appended: Appended) -> ProduceResponse {
        let Appended {
            mut response,
            durable_waits,
            timeout_ms,
        } = appended;
        // acks=all: every appended partition durable (group commit: concurrent producers share
        // the fsync), within the request's timeout.
        // One deadline for the whole request, however many partitions it touched.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms.into());
        for (t, p, partition, last) in durable_waits {
            let started = Instant::now();
            let flush =
                tokio::task::spawn_blocking(move || partition.log.flush(Offset(last.0 + 1)));
            let failure = match tokio::time::timeout_at(deadline, flush).await {
                Ok(Ok(Ok(()))) => {
                    self.metrics
                        .fsync_seconds
                        .observe(started.elapsed().as_secs_f64());
                    None
                }
                Ok(Ok(Err(err))) => Some((ErrorCode::KAFKA_STORAGE_ERROR, error_chain(&err))),
                Ok(Err(_)) => Some((
                    ErrorCode::UNKNOWN_SERVER_ERROR,
                    "flush task failed".to_string(),
                )),
                Err(_) => Some((
                    ErrorCode::REQUEST_TIMED_OUT,
                    format!("not durable within {timeout_ms} ms"),
                )),
            };
            if let (Some((code, message)), Some(result)) = (
                failure,
                response
                    .topics
                    .get_mut(t)
                    .and_then(|topic| topic.partitions.get_mut(p)),
            ) {
                self.count_error(ApiKey::Produce, code);
                result.error_code = code.0;
                result.error_message = message;
            }
        }
        response
    }

    /// Appends producer batches; returns the first and last offsets (an idempotent producer's
    /// retried batch returns its original offsets and is not written again).
    async fn append(
        &self,
        partition: &Arc<Partition>,
        records: Bytes,
    ) -> Result<(Offset, Offset), (ErrorCode, String)> {
        let n_bytes = records.len() as u64;
        // Stamp in place when this request holds the only reference to the bytes; else copy.
        let mut buf = records
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        let result = if partition.log.config().flush == FlushPolicy::EveryAppend {
            // The append itself syncs: keep it off the async threads.
            let owned = Arc::clone(partition);
            match tokio::task::spawn_blocking(move || append_checked(&owned, &mut buf)).await {
                Ok(result) => result,
                Err(_) => {
                    return Err((ErrorCode::UNKNOWN_SERVER_ERROR, "append task failed".into()));
                }
            }
        } else {
            // A positional write into the page cache: microseconds.
            append_checked(partition, &mut buf)
        };
        let (base, last, appended) = result?;
        if !appended {
            self.metrics.duplicate_batches.inc();
        }
        if appended {
            partition.notify_appended();
            self.metrics
                .bytes_in
                .with_label_values(&[&*partition.topic])
                .inc_by(n_bytes);
            self.metrics
                .records_in
                .with_label_values(&[&*partition.topic])
                .inc_by(last.0 - base.0 + 1);
        }
        Ok((base, last))
    }

    pub(crate) async fn fetch(&self, request: FetchRequest) -> FetchResponse {
        let deadline = Instant::now() + Duration::from_millis(request.max_wait_ms.into());
        let max_bytes = request.max_bytes.clamp(1, FETCH_BYTES_MAX);
        // Each requested partition, looked up once for the whole (possibly long-polled) fetch.
        let partitions: Vec<Vec<Option<Arc<Partition>>>> = request
            .topics
            .iter()
            .map(|topic| {
                let found = self.manager.topic(&topic.name);
                topic
                    .partitions
                    .iter()
                    .map(|part| {
                        found
                            .as_ref()
                            .and_then(|t| t.partitions.get(part.partition as usize))
                            .cloned()
                    })
                    .collect()
            })
            .collect();
        let min_bytes = u64::from(request.min_bytes.max(1));
        let mut watches = Vec::new();
        loop {
            let (response, n_bytes, any_error) = self.fetch_once(&request, &partitions, max_bytes);
            let satisfied = n_bytes >= min_bytes || any_error;
            if satisfied || Instant::now() >= deadline || self.shutdown.is_cancelled() {
                self.account_fetch(&response);
                return response;
            }
            if watches.is_empty() {
                // About to wait: subscribe, then read once more, so an append between the read
                // above and the subscription is not missed.
                watches = partitions
                    .iter()
                    .flatten()
                    .flatten()
                    .map(|p| p.subscribe())
                    .collect();
                if watches.is_empty() {
                    self.account_fetch(&response);
                    return response;
                }
                continue;
            }
            let changed =
                futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            tokio::select! {
                _ = changed => {}
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }

    fn fetch_once(
        &self,
        request: &FetchRequest,
        partitions: &[Vec<Option<Arc<Partition>>>],
        max_bytes: u32,
    ) -> (FetchResponse, u64, bool) {
        let mut remaining = max_bytes;
        let mut total = 0u64;
        let mut any_error = false;
        let mut topics = Vec::with_capacity(request.topics.len());
        for (topic, found) in request.topics.iter().zip(partitions) {
            let mut results = Vec::with_capacity(topic.partitions.len());
            for (part, partition) in topic.partitions.iter().zip(found) {
                let mut result = FetchPartitionResponse {
                    partition: part.partition,
                    ..Default::default()
                };
                match partition {
                    None => result.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                    Some(partition) => {
                        let log = &partition.log;
                        // One node: everything appended is committed, so the high watermark is the
                        // log end. Replication will bound reads by the real high watermark here.
                        let high_watermark = log.log_end_offset();
                        result.high_watermark = high_watermark.0;
                        result.log_start_offset = log.log_start_offset().0;
                        // Never more than the response has left; a read still returns at least one
                        // whole batch, so the first partition progresses past an oversized batch
                        // (KIP-74) without the client choosing the size of a buffer.
                        let limit = if total == 0 {
                            part.partition_max_bytes.min(remaining).max(1)
                        } else {
                            part.partition_max_bytes.min(remaining)
                        };
                        if limit > 0 {
                            match log.read_until(Offset(part.fetch_offset), limit, high_watermark) {
                                Ok(fetched) => {
                                    total += fetched.bytes.len() as u64;
                                    remaining =
                                        remaining.saturating_sub(fetched.bytes.len() as u32);
                                    result.high_watermark = fetched.log_end.0;
                                    result.records = fetched.bytes;
                                }
                                Err(ReadError::OffsetOutOfRange { .. }) => {
                                    result.error_code = ErrorCode::OFFSET_OUT_OF_RANGE.0
                                }
                                Err(_) => result.error_code = ErrorCode::KAFKA_STORAGE_ERROR.0,
                            }
                        }
                    }
                }
                if result.error_code != 0 {
                    any_error = true;
                    self.count_error(ApiKey::Fetch, ErrorCode(result.error_code));
                }
                results.push(result);
            }
            topics.push(FetchTopicResponse {
                name: topic.name.clone(),
                partitions: results,
            });
        }
        (FetchResponse { topics }, total, any_error)
    }

    fn account_fetch(&self, response: &FetchResponse) {
        for topic in &response.topics {
            let bytes: u64 = topic
                .partitions
                .iter()
                .map(|p| p.records.len() as u64)
                .sum();
            if bytes == 0 {
                continue;
            }
            let records: u64 = topic
                .partitions
                .iter()
                .map(|p| count_records(&p.records))
                .sum();
            self.metrics
                .bytes_out
                .with_label_values(&[&topic.name])
                .inc_by(bytes);
            self.metrics
                .records_out
                .with_label_values(&[&topic.name])
                .inc_by(records);
        }
    }

    pub(crate) fn list_offsets(&self, request: ListOffsetsRequest) -> ListOffsetsResponse {
        let topics = request
            .topics
            .into_iter()
            .map(|topic| {
                let partitions = topic
                    .partitions
                    .into_iter()
                    .map(|part| {
                        let mut result = ListOffsetsPartitionResponse {
                            partition: part.partition,
                            timestamp: -1,
                            ..Default::default()
                        };
                        match self.manager.partition(&topic.name, part.partition) {
                            None => result.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                            Some(partition) => {
                                let log = &partition.log;
                                match part.timestamp {
                                    LATEST_TIMESTAMP => result.offset = log.log_end_offset().0,
                                    EARLIEST_TIMESTAMP => result.offset = log.log_start_offset().0,
                                    ts if ts < 0 => {
                                        result.error_code = ErrorCode::INVALID_REQUEST.0
                                    }
                                    ts => match log.offset_for_timestamp(ts) {
                                        Ok(Some((offset, found))) => {
                                            result.offset = offset.0;
                                            result.timestamp = found;
                                        }
                                        Ok(None) => result.offset = log.log_end_offset().0,
                                        Err(_) => {
                                            result.error_code = ErrorCode::KAFKA_STORAGE_ERROR.0
                                        }
                                    },
                                }
                            }
                        }
                        self.count_error(ApiKey::ListOffsets, ErrorCode(result.error_code));
                        result
                    })
                    .collect();
                ListOffsetsTopicResponse {
                    name: topic.name,
                    partitions,
                }
            })
            .collect();
        ListOffsetsResponse { topics }
    }

    /// Runs one compaction pass on every compacted partition (blocking); stops early at
    /// shutdown.
    pub(crate) fn apply_compaction(&self) {
        let now = now_ms();
        let stopping = || self.shutdown.is_cancelled();
        for topic in self.manager.topics() {
            for partition in topic.partitions.iter().filter(|p| p.log.config().compacted) {
                if stopping() {
                    return;
                }
                match partition.log.compact_unless(now, &stopping) {
                    Ok(report) => {
                        self.metrics
                            .compaction_bytes_removed
                            .inc_by(report.n_bytes_before.saturating_sub(report.n_bytes_after));
                        self.metrics
                            .compaction_records_removed
                            .inc_by(report.n_records_superseded + report.n_tombstones_dropped);
                    }
                    Err(err) => {
                        tracing::error!(topic = %topic.name, partition = partition.index, error = %err, "compaction failed");
                    }
                }
            }
        }
    }

    /// Runs retention on every partition, and forgets idle idempotent producers (blocking).
    pub(crate) fn apply_retention(&self) {
        let now = now_ms();
        let idle_max = i64::try_from(self.config.producer_id_expiration_ms).unwrap_or(i64::MAX);
        for topic in self.manager.topics() {
            for partition in &topic.partitions {
                partition
                    .producers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .expire(now, idle_max);
                if let Err(err) = partition.log.apply_retention(now) {
                    tracing::error!(topic = %topic.name, partition = partition.index, error = %err, "retention failed");
                }
            }
        }
    }
}

/// Appends `buf` to the partition after the checks every producer batch gets: no transactional
/// or control batches (transactions are not served), and for an idempotent producer's batch
/// (exactly one per partition, as Kafka requires) its sequence, under the partition's producer
/// lock so that the check and the append are one step. Returns (first, last, whether appended).
fn append_checked(
    partition: &Partition,
    buf: &mut [u8],
) -> Result<(Offset, Offset, bool), (ErrorCode, String)> {
    let n_bytes = buf.len() as u64;
    // One pass over the batch headers (the log validates the batches themselves).
    let (mut first, mut n_batches) = (None, 0usize);
    let mut rest: &[u8] = buf;
    while let Ok(header) = batch::BatchHeader::parse(rest) {
        if header.is_transactional() || header.is_control() {
            return Err((
                ErrorCode::INVALID_RECORD,
                "transactional and control batches are not accepted (transactions are not \
                 supported)"
                    .into(),
            ));
        }
        rest = rest.get(header.total_bytes()..).unwrap_or_default();
        n_batches += 1;
        first.get_or_insert(header);
    }
    if partition.log.config().compacted {
        require_keys(buf, partition.log.config().batch_bytes_max)?;
    }
    let epoch = partition.leader_epoch;
    let map = |result: Result<cairn_storage::AppendInfo, AppendError>| {
        result
            .map(|info| (info.base_offset, info.last_offset, true))
            .map_err(|err| append_error(err, n_bytes))
    };
    let Some(header) = first.filter(|h| h.producer_id >= 0) else {
        return map(partition.log.append(buf, epoch));
    };
    if n_batches != 1 {
        return Err((
            ErrorCode::INVALID_RECORD,
            format!("an idempotent produce carries one batch per partition, this one {n_batches}"),
        ));
    }
    let mut producers = partition
        .producers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match producers.check(&header) {
        SequenceCheck::Duplicate {
            base_offset,
            last_offset,
        } => Ok((Offset(base_offset), Offset(last_offset), false)),
        SequenceCheck::Reject(code, message) => Err((code, message)),
        SequenceCheck::Append => {
            let appended = map(partition.log.append(buf, epoch))?;
            producers.record(&header, appended.0.0, appended.1.0, now_ms());
            Ok(appended)
        }
    }
}

/// A compacted topic keeps the latest record per key, so every record needs one (Kafka refuses
/// keyless records there the same way). Decodes (and decompresses) the batches: only compacted
/// topics pay for it.
fn require_keys(buf: &[u8], batch_bytes_max: u32) -> Result<(), (ErrorCode, String)> {
    let batches = batch::Batches::new(Bytes::copy_from_slice(buf), batch_bytes_max);
    for batch in batches {
        // Invalid batches are refused by the log's own validation with the right error.
        let Ok(batch) = batch else { return Ok(()) };
        let Ok(records) = batch.records(cairn_protocol::limits::DECOMPRESSED_BYTES_MAX) else {
            return Ok(());
        };
        if let Some(record) = records.iter().find(|r| r.key.is_none()) {
            return Err((
                ErrorCode::INVALID_RECORD,
                format!(
                    "record at offset delta {} has no key: a compacted topic needs one per record",
                    // Client-sent base offsets may be anything: no overflow.
                    record.offset.wrapping_sub(batch.header().base_offset)
                ),
            ));
        }
    }
    Ok(())
}

/// The Kafka error for a failed append.
fn append_error(err: AppendError, n_bytes: u64) -> (ErrorCode, String) {
    match err {
        // Too large only if the batch really is: a length field claiming more than was sent is
        // corruption.
        AppendError::InvalidBatch(BatchError::TooLarge {
            n_bytes: claimed,
            max,
        }) if claimed <= n_bytes => (
            ErrorCode::MESSAGE_TOO_LARGE,
            format!("batch of {claimed} bytes exceeds max.message.bytes = {max}"),
        ),
        AppendError::Fatal(err) => (ErrorCode::KAFKA_STORAGE_ERROR, error_chain(&err)),
        err @ AppendError::Empty => (ErrorCode::INVALID_REQUEST, error_chain(&err)),
        err => (ErrorCode::CORRUPT_MESSAGE, error_chain(&err)),
    }
}

/// The error code and message of a topic operation run on the blocking pool.
fn topic_outcome(result: Option<Result<(), crate::manager::TopicError>>) -> (ErrorCode, String) {
    match result {
        Some(Ok(())) => (ErrorCode::NONE, String::new()),
        Some(Err(err)) => (err.code, err.message),
        None => (
            ErrorCode::UNKNOWN_SERVER_ERROR,
            "the topic operation panicked".into(),
        ),
    }
}

/// Records in a buffer of whole batches, from their headers.
fn count_records(bytes: &[u8]) -> u64 {
    let mut n = 0u64;
    let mut rest = bytes;
    while let Ok(header) = batch::BatchHeader::parse(rest) {
        n += header.records_count.max(0) as u64;
        rest = rest.get(header.total_bytes()..).unwrap_or_default();
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_keyless_record_is_refused_whatever_base_offset_the_client_sent() {
        let mut builder = batch::BatchBuilder::new(batch::Compression::None);
        builder.push(0, Some(b"k"), Some(b"v"), &[]);
        builder.push(0, None, Some(b"v"), &[]);
        let mut bytes = builder.build().unwrap().to_vec();
        // The broker stamps the real base offset after this check: the client's may be extreme.
        batch::stamp(&mut bytes, i64::MAX, 0).unwrap();
        let (code, message) = require_keys(&bytes, 1 << 20).unwrap_err();
        assert_eq!(code, ErrorCode::INVALID_RECORD);
        assert!(message.contains("offset delta 1"), "{message}");
    }
}
