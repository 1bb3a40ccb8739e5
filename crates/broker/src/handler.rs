//! The broker's core: the operations of `ops.rs` over the topics and their partitions, shared by
//! both listeners (`native.rs` and `kafka.rs` only translate wire formats to and from these).
//! Transport-agnostic, so the TCP listeners and an in-process client share it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use cairn_protocol::Offset;
use cairn_protocol::batch;
use cairn_protocol::limits::FETCH_BYTES_MAX;
use cairn_protocol::native::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::manager::{Topic, TopicManager};
use crate::metrics::Metrics;
use crate::ops::*;
use crate::partition::{Appended as PartitionAppended, Isolation, Partition};

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

pub(crate) fn ready(outcome: Outcome) -> Deferred {
    Box::pin(std::future::ready(outcome))
}

/// One partition's election: topic, partition, and the outcome (an error code and why).
pub(crate) type Elected = (String, u32, Result<(), (ErrorCode, String)>);

/// The controller's per-partition outcomes with its refusals as wire codes and messages.
fn outcomes(results: Vec<(String, u32, Result<(), cairn_controller::Rejected>)>) -> Vec<Elected> {
    results
        .into_iter()
        .map(|(topic, partition, result)| {
            let result = result.map_err(|r| (r.error_code(), r.message));
            (topic, partition, result)
        })
        .collect()
}

/// A produce request after its appends, waiting for its commits (acks=-1).
pub(crate) struct Appended {
    results: PerPartition<Produced>,
    /// (topic index, partition index, partition, end offset to be committed, the leader epoch
    /// it was appended in, min.insync.replicas).
    commit_waits: Vec<(usize, usize, Arc<Partition>, Offset, u32, usize)>,
    timeout: std::time::Duration,
}

/// The broker's request handler.
#[derive(Debug)]
pub struct Handler {
    pub(crate) config: BrokerConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) manager: Arc<TopicManager>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) producer_ids: Arc<crate::producers::ProducerIds>,
    pub(crate) offsets: Arc<crate::offsets::OffsetStore>,
    pub(crate) groups: Arc<crate::groups::Coordinator>,
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
}

impl Handler {
    pub(crate) fn count_error(&self, api: &str, code: ErrorCode) {
        self.metrics.count_error(api, code);
    }

    /// The topic named `name`; if it does not exist and `create` is set and the broker
    /// auto-creates topics, it is created first (with the default partitions and replication).
    pub(crate) async fn topic_or_create(&self, name: &str, create: bool) -> Option<Arc<Topic>> {
        if let Some(topic) = self.manager.topic(name) {
            return Some(topic);
        }
        // The internal offsets topic is created at a group's first FindCoordinator.
        if !create || !self.config.auto_create_topics || name == crate::offsets::OFFSETS_TOPIC {
            return None;
        }
        let spec = NewTopic {
            name: name.to_string(),
            partitions: None,
            replication_factor: None,
            configs: Vec::new(),
        };
        match self.create_topic(spec, false).await {
            // Ok, or another request created it meanwhile.
            Ok(()) | Err(BrokerError::TopicAlreadyExists(_)) => {}
            Err(err) => {
                tracing::debug!(topic = %name, error = %err, "auto-create refused");
                return None;
            }
        }
        self.manager.topic(name)
    }

    /// Creates one topic through the active controller and waits until this broker has applied
    /// it (so a request that follows sees it).
    pub(crate) async fn create_topic(
        &self,
        topic: NewTopic,
        validate_only: bool,
    ) -> Result<(), BrokerError> {
        crate::topic::validate_topic_name(&topic.name).map_err(BrokerError::InvalidTopic)?;
        let mut overrides: BTreeMap<String, String> = topic.configs.into_iter().collect();
        if self
            .manager
            .host()
            .breaks(crate::controls::NegativeControl::UncleanElectionByDefault)
        {
            overrides
                .entry("unclean.leader.election.enable".into())
                .or_insert_with(|| "true".into());
        }
        let config = crate::topic::TopicConfig::new(overrides, self.manager.defaults())
            .map_err(BrokerError::InvalidConfig)?;
        let partitions = topic
            .partitions
            .unwrap_or(self.manager.defaults().partitions);
        let command = cairn_controller::Command::CreateTopics {
            topics: vec![cairn_controller::TopicSpec {
                name: topic.name.clone(),
                partitions,
                replication_factor: topic.replication_factor,
                config: config.overrides,
            }],
            validate_only,
        };
        match self.command(command, &topic.name).await? {
            cairn_controller::Reply::Topics(results) => match results.into_iter().next() {
                Some((_, result)) => result.map(|_| ()).map_err(|r| rejected(r, &topic.name)),
                None => Err(BrokerError::Internal("no result for the topic".into())),
            },
            other => Err(BrokerError::Internal(format!(
                "unexpected answer to CreateTopics: {other:?}"
            ))),
        }
    }

    /// Carries out a command about `topic` at the active controller, then waits until this
    /// broker's topics reflect at least the metadata the controller had when it answered.
    pub(crate) async fn command(
        &self,
        command: cairn_controller::Command,
        topic: &str,
    ) -> Result<cairn_controller::Reply, BrokerError> {
        let reply = self
            .cluster
            .client
            .execute(command)
            .await
            .map_err(|err| match err {
                cairn_controller::CommandError::Rejected(r) => rejected(r, topic),
                other => BrokerError::Unavailable(other.to_string()),
            })?;
        let target = self.cluster.client.image().offset;
        let mut applied = self.manager.applied();
        let caught_up = applied.wait_for(|offset| *offset >= target);
        if tokio::time::timeout(std::time::Duration::from_secs(10), caught_up)
            .await
            .is_err()
        {
            tracing::warn!(
                offset = target,
                "topics did not catch up with the metadata in time"
            );
        }
        Ok(reply)
    }

    /// The requested names, or every topic's when none were named.
    pub(crate) fn requested_or_all(&self, names: Vec<String>) -> Vec<String> {
        if !names.is_empty() {
            return names;
        }
        self.manager
            .topics()
            .iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    /// The brokers, the controller and, per topic named (`None`: every topic), its partitions.
    pub(crate) async fn metadata(
        &self,
        names: Option<Vec<String>>,
        auto_create: bool,
    ) -> MetadataView {
        let names = match names {
            Some(names) => names,
            None => self.manager.image().topics.keys().cloned().collect(),
        };
        let mut topics = Vec::with_capacity(names.len());
        for name in names {
            if self.manager.image().topic(&name).is_none() {
                self.topic_or_create(&name, auto_create).await;
            }
            let image = self.manager.image();
            let found = match image.topic(&name) {
                Some(topic) => Ok(topic
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(index, state)| PartitionView {
                        partition: index as u32,
                        leader: state.leader,
                        leader_epoch: state.leader_epoch,
                        replicas: state.replicas.clone(),
                        isr: state.isr.clone(),
                        offline: state
                            .replicas
                            .iter()
                            .copied()
                            .filter(|r| !image.is_live(*r))
                            .collect(),
                    })
                    .collect()),
                None => Err(match crate::topic::validate_topic_name(&name) {
                    Err(why) => BrokerError::InvalidTopic(why),
                    Ok(()) => BrokerError::UnknownTopic(name.clone()),
                }),
            };
            if let Err(err) = &found {
                self.count_error("metadata", err.code());
            }
            topics.push((name, found));
        }
        let image = self.manager.image();
        let endpoint = |e: &cairn_controller::Endpoint| (e.host.clone(), e.port);
        MetadataView {
            brokers: image
                .live_brokers()
                .map(|b| BrokerView {
                    node_id: b.info.node_id,
                    native: endpoint(&b.info.native),
                    kafka: b.info.kafka.as_ref().map(endpoint),
                    rack: b.info.rack.clone(),
                })
                .collect(),
            controller_id: self.cluster.client.leader().unwrap_or(u32::MAX),
            topics,
        }
    }

    /// Grows `topic` to `count` partitions through the active controller (placed as new
    /// topics' are), and waits until this broker has applied it.
    pub(crate) async fn create_partitions(
        &self,
        topic: &str,
        count: u32,
        validate_only: bool,
    ) -> Result<(), BrokerError> {
        if topic == crate::offsets::OFFSETS_TOPIC {
            return Err(BrokerError::InvalidRequest(format!(
                "{topic} is internal: its partition count is fixed"
            )));
        }
        let command = cairn_controller::Command::CreatePartitions {
            topic: topic.to_string(),
            count,
            validate_only,
        };
        self.command(command, topic).await.map(|_| ())
    }

    /// A producer id and epoch for an idempotent producer: the next epoch of `current` when the
    /// producer knows its id (KIP-360: it bumps its epoch to restart its sequences after a batch
    /// failed for good), otherwise a new id from this broker's block.
    pub(crate) async fn init_producer_id(
        &self,
        current: Option<(i64, i16)>,
    ) -> Result<(i64, i16), BrokerError> {
        match current {
            Some((id, epoch)) if id >= 0 && (0..i16::MAX - 1).contains(&epoch) => {
                Ok((id, epoch + 1))
            }
            _ => Ok((self.producer_ids.allocate().await?, 0)),
        }
    }

    /// Leader elections (Kafka's ElectLeaders) through the active controller: per partition,
    /// in the controller's order, whether it was elected and why not. `partitions` `None`: all.
    pub(crate) async fn elect_leaders(
        &self,
        unclean: bool,
        partitions: Option<Vec<(String, u32)>>,
    ) -> Result<Vec<Elected>, BrokerError> {
        let command = cairn_controller::Command::ElectLeaders {
            unclean,
            partitions,
        };
        match self.command(command, "").await? {
            cairn_controller::Reply::Elected(results) => Ok(outcomes(results)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer to ElectLeaders: {other:?}"
            ))),
        }
    }

    /// Starts or cancels partition reassignments through the active controller: per
    /// reassignment, in order, the outcome.
    pub(crate) async fn reassign(
        &self,
        reassignments: Vec<(String, u32, Option<Vec<u32>>)>,
    ) -> Result<Vec<Elected>, BrokerError> {
        let command = cairn_controller::Command::AlterPartitionReassignments { reassignments };
        match self.command(command, "").await? {
            cairn_controller::Reply::Reassignments(results) => Ok(outcomes(results)),
            other => Err(BrokerError::Internal(format!(
                "unexpected answer to AlterPartitionReassignments: {other:?}"
            ))),
        }
    }

    /// The reassignments under way (of `topics`, or all): topic, partition and its state
    /// (replicas, adding, removing).
    pub(crate) fn reassignments(
        &self,
        topics: &[String],
    ) -> Vec<(String, u32, cairn_controller::PartitionState)> {
        let image = self.manager.image();
        image
            .partitions()
            .filter(|(t, _, p)| {
                p.reassigning() && (topics.is_empty() || topics.iter().any(|n| n == t))
            })
            .map(|(t, i, p)| (t.to_string(), i, p.clone()))
            .collect()
    }

    /// Creates topics; per topic, in request order, the outcome.
    pub(crate) async fn create_topics(
        &self,
        topics: Vec<NewTopic>,
        validate_only: bool,
    ) -> Vec<(String, Result<(), BrokerError>)> {
        let mut results = Vec::with_capacity(topics.len());
        for topic in topics {
            let name = topic.name.clone();
            let result = if name == crate::offsets::OFFSETS_TOPIC {
                Err(BrokerError::InvalidRequest(format!(
                    "{name} is internal: the broker creates it for the first group"
                )))
            } else {
                self.create_topic(topic, validate_only).await
            };
            if let Err(err) = &result {
                self.count_error("create_topics", err.code());
            }
            results.push((name, result));
        }
        results
    }

    /// Deletes topics; per topic, in request order, the outcome.
    pub(crate) async fn delete_topics(
        &self,
        names: Vec<String>,
    ) -> Vec<(String, Result<(), BrokerError>)> {
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            let result = if name == crate::offsets::OFFSETS_TOPIC {
                Err(BrokerError::InvalidRequest(format!(
                    "{name} is internal: delete groups instead"
                )))
            } else {
                let command = cairn_controller::Command::DeleteTopics {
                    names: vec![name.clone()],
                };
                match self.command(command, &name).await {
                    Ok(cairn_controller::Reply::Deleted(results)) => {
                        match results.into_iter().next() {
                            Some((_, result)) => result.map_err(|r| rejected(r, &name)),
                            None => Err(BrokerError::Internal("no result for the topic".into())),
                        }
                    }
                    Ok(other) => Err(BrokerError::Internal(format!(
                        "unexpected answer to DeleteTopics: {other:?}"
                    ))),
                    Err(err) => Err(err),
                }
            };
            if let Err(err) = &result {
                self.count_error("delete_topics", err.code());
            }
            results.push((name, result));
        }
        results
    }

    /// Appends every partition's batches, in request order: the ordered part of a produce.
    pub(crate) async fn produce_append(&self, request: Produce) -> Appended {
        let Produce {
            acks,
            timeout,
            topics,
        } = request;
        let acks_valid = (-1..=1).contains(&acks);
        let mut commit_waits = Vec::new();
        let mut results = Vec::with_capacity(topics.len());
        for (name, partitions) in topics {
            let found = if acks_valid {
                self.topic_or_create(&name, true).await
            } else {
                None
            };
            let mut outcomes = Vec::with_capacity(partitions.len());
            for (index, records) in partitions {
                let partition = match &found {
                    _ if !acks_valid => Err(BrokerError::InvalidRequiredAcks(acks)),
                    None => Err(BrokerError::UnknownTopicOrPartition {
                        topic: name.clone(),
                        partition: index,
                    }),
                    Some(topic) => topic.partition(index, self.config.node_id),
                };
                let min_insync = found.as_ref().map_or(1, |topic| {
                    topic.config.min_insync_replicas(topic.replication_factor)
                });
                let partition = partition.and_then(|partition| {
                    if acks == -1 {
                        partition.check_min_insync(min_insync)?;
                    }
                    Ok(partition)
                });
                let outcome = match partition {
                    Err(err) => Err(err),
                    Ok(partition) => self.append(partition, records).await.map(|appended| {
                        if acks == -1 {
                            commit_waits.push((
                                results.len(),
                                outcomes.len(),
                                Arc::clone(partition),
                                Offset(appended.last.0 + 1),
                                appended.leader_epoch,
                                min_insync,
                            ));
                        }
                        Produced {
                            base_offset: appended.base,
                            log_start_offset: partition.log_start_offset(),
                        }
                    }),
                };
                if let Err(err) = &outcome {
                    self.count_error("produce", err.code());
                }
                outcomes.push((index, outcome));
            }
            results.push((name, outcomes));
        }
        Appended {
            results,
            commit_waits,
            timeout,
        }
    }

    /// For acks=-1, waits until every appended partition's records are committed, all at once,
    /// within the request's timeout.
    pub(crate) async fn produce_finish(&self, appended: Appended) -> PerPartition<Produced> {
        let Appended {
            mut results,
            commit_waits,
            timeout,
        } = appended;
        let deadline = tokio::time::Instant::now() + timeout;
        let waits =
            commit_waits
                .into_iter()
                .map(|(t, p, partition, end, epoch, min_insync)| async move {
                    let started = Instant::now();
                    let committed = partition.wait_committed(end, epoch, min_insync);
                    let outcome = match tokio::time::timeout_at(deadline, committed).await {
                        Ok(Ok(())) => {
                            self.metrics
                                .fsync_seconds
                                .observe(started.elapsed().as_secs_f64());
                            Ok(())
                        }
                        Ok(Err(err)) => Err(err),
                        Err(_) => Err(BrokerError::Timeout(format!(
                            "not committed within {} ms",
                            timeout.as_millis()
                        ))),
                    };
                    (t, p, outcome)
                });
        for (t, p, outcome) in futures::future::join_all(waits).await {
            if let (Err(err), Some((_, result))) = (
                outcome,
                results.get_mut(t).and_then(|(_, parts)| parts.get_mut(p)),
            ) {
                self.count_error("produce", err.code());
                *result = Err(err);
            }
        }
        results
    }

    /// Appends producer batches to `partition` as its leader; returns the first and last offsets
    /// (an idempotent producer's retried batch returns its original offsets and is not written
    /// again). The append runs here if it only writes into the page cache, on the blocking pool
    /// if it must roll a segment or sync.
    async fn append(
        &self,
        partition: &Arc<Partition>,
        records: Bytes,
    ) -> Result<PartitionAppended, BrokerError> {
        let n_bytes = records.len() as u64;
        // Stamp in place when this request holds the only reference to the bytes; else copy.
        let mut buf = records
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        let appended = match partition.append_as_leader(&mut buf, false)? {
            Some(appended) => appended,
            None => {
                let owned = Arc::clone(partition);
                tokio::task::spawn_blocking(move || owned.append_as_leader(&mut buf, true))
                    .await
                    .map_err(|_| BrokerError::Internal("append task failed".into()))??
                    .ok_or_else(|| BrokerError::Internal("a blocking append did nothing".into()))?
            }
        };
        if !appended.written {
            self.metrics.duplicate_batches.inc();
            return Ok(appended);
        }
        partition.after_leader_append();
        self.metrics
            .bytes_in
            .with_label_values(&[&**partition.topic()])
            .inc_by(n_bytes);
        self.metrics
            .records_in
            .with_label_values(&[&**partition.topic()])
            .inc_by(appended.last.0 - appended.base.0 + 1);
        Ok(appended)
    }

    /// Reads batches, long-polling until `min_bytes` are there, an error occurs, the wait ends
    /// or the broker shuts down.
    pub(crate) async fn fetch(&self, request: Fetch) -> PerPartition<FetchedPartition> {
        let deadline = Instant::now() + request.max_wait;
        let max_bytes = request.max_bytes.clamp(1, FETCH_BYTES_MAX);
        // Each requested partition, looked up once for the whole (possibly long-polled) fetch.
        let partitions: Vec<Vec<Result<Arc<Partition>, BrokerError>>> = request
            .topics
            .iter()
            .map(|(name, parts)| {
                let found = self.manager.topic(name);
                parts
                    .iter()
                    .map(|part| self.lookup(found.as_deref(), name, part.partition))
                    .collect()
            })
            .collect();
        let min_bytes = u64::from(request.min_bytes.max(1));
        let mut watches = Vec::new();
        loop {
            let (response, n_bytes, any_error, needs_io) =
                self.fetch_once(&request, &partitions, max_bytes);
            if !needs_io.is_empty() {
                // Load what the reads need (index files) on the blocking pool, then read again.
                let loaded = tokio::task::spawn_blocking(move || {
                    for (partition, offset, isolation) in needs_io {
                        let _ = partition.read(offset, 1, isolation, true);
                    }
                });
                if loaded.await.is_err() {
                    tracing::error!("loading segment indexes panicked");
                }
                continue;
            }
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
                    .filter_map(|p| p.as_ref().ok())
                    .map(|p| p.subscribe(request.isolation))
                    .collect();
                if watches.is_empty() {
                    self.account_fetch(&response);
                    return response;
                }
                continue;
            }
            self.wait_for_change(&mut watches, deadline).await;
        }
    }

    /// A long poll's wait: until one of `watches` changes, the deadline, or shutdown.
    pub(crate) async fn wait_for_change(
        &self,
        watches: &mut [tokio::sync::watch::Receiver<u64>],
        deadline: Instant,
    ) {
        let changed =
            futures::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
        tokio::select! {
            _ = changed => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// One pass over the fetch's partitions: the response, its record bytes, whether any
    /// partition failed, and the reads that need blocking work first.
    #[allow(clippy::type_complexity)]
    fn fetch_once(
        &self,
        request: &Fetch,
        partitions: &[Vec<Result<Arc<Partition>, BrokerError>>],
        max_bytes: u32,
    ) -> (
        PerPartition<FetchedPartition>,
        u64,
        bool,
        Vec<(Arc<Partition>, Offset, Isolation)>,
    ) {
        let mut remaining = max_bytes;
        let mut total = 0u64;
        let mut any_error = false;
        let mut needs_io = Vec::new();
        let mut topics = Vec::with_capacity(request.topics.len());
        for ((name, parts), found) in request.topics.iter().zip(partitions) {
            let mut results = Vec::with_capacity(parts.len());
            for (part, partition) in parts.iter().zip(found) {
                let result = match partition {
                    Err(err) => Err(err.clone()),
                    Ok(partition) => {
                        // Never more than the response has left; a read still returns at least
                        // one whole batch, so the first partition progresses past an oversized
                        // batch (KIP-74) without the client choosing the size of a buffer.
                        let limit = if total == 0 {
                            part.partition_max_bytes.min(remaining).max(1)
                        } else {
                            part.partition_max_bytes.min(remaining)
                        };
                        self.fetch_partition(partition, part, limit, request.isolation)
                            .map(|read| match read {
                                Some(fetched) => {
                                    total += fetched.records.len() as u64;
                                    remaining =
                                        remaining.saturating_sub(fetched.records.len() as u32);
                                    fetched
                                }
                                None => {
                                    needs_io.push((
                                        Arc::clone(partition),
                                        Offset(part.fetch_offset.max(0) as u64),
                                        request.isolation,
                                    ));
                                    FetchedPartition::default()
                                }
                            })
                    }
                };
                if let Err(err) = &result {
                    any_error = true;
                    self.count_error("fetch", err.code());
                }
                results.push((part.partition, result));
            }
            topics.push((name.clone(), results));
        }
        (topics, total, any_error, needs_io)
    }

    /// One partition's part of a fetch, up to `limit` bytes (none if 0). `Ok(None)`: the read
    /// needs blocking work first.
    fn fetch_partition(
        &self,
        partition: &Partition,
        part: &FetchPartition,
        limit: u32,
        isolation: Isolation,
    ) -> Result<Option<FetchedPartition>, BrokerError> {
        partition.check_leader(part.current_leader_epoch)?;
        let offset =
            u64::try_from(part.fetch_offset).map_err(|_| BrokerError::OffsetOutOfRange {
                offset: part.fetch_offset,
                log_start: partition.log_start_offset(),
                log_end: partition.log_end_offset(),
            })?;
        if limit == 0 {
            // The response is full: this partition reports its offsets, no records.
            return Ok(Some(FetchedPartition {
                high_watermark: partition.high_watermark(),
                log_start_offset: partition.log_start_offset(),
                records: Bytes::new(),
            }));
        }
        let Some((read, high_watermark)) =
            partition.read(Offset(offset), limit, isolation, false)?
        else {
            return Ok(None);
        };
        Ok(Some(FetchedPartition {
            high_watermark,
            log_start_offset: read.log_start,
            records: read.bytes,
        }))
    }

    fn account_fetch(&self, response: &PerPartition<FetchedPartition>) {
        for (name, partitions) in response {
            let ok = || partitions.iter().filter_map(|(_, r)| r.as_ref().ok());
            let bytes: u64 = ok().map(|p| p.records.len() as u64).sum();
            if bytes == 0 {
                continue;
            }
            let records: u64 = ok().map(|p| count_records(&p.records)).sum();
            self.metrics
                .bytes_out
                .with_label_values(&[name.as_str()])
                .inc_by(bytes);
            self.metrics
                .records_out
                .with_label_values(&[name.as_str()])
                .inc_by(records);
        }
    }

    /// Offsets by time: latest (-1), earliest (-2), or the first record at or after a time.
    pub(crate) fn list_offsets(&self, request: ListOffsets) -> PerPartition<ListedOffset> {
        request
            .topics
            .into_iter()
            .map(|(name, parts)| {
                let topic = self.manager.topic(&name);
                let results = parts
                    .into_iter()
                    .map(|(index, current_leader_epoch, timestamp)| {
                        let result = self.lookup(topic.as_deref(), &name, index).and_then(|p| {
                            self.list_offset(&p, current_leader_epoch, timestamp, request.isolation)
                        });
                        if let Err(err) = &result {
                            self.count_error("list_offsets", err.code());
                        }
                        (index, result)
                    })
                    .collect();
                (name, results)
            })
            .collect()
    }

    /// Partition `index` of `topic` if this broker hosts it; why not otherwise.
    pub(crate) fn lookup(
        &self,
        topic: Option<&Topic>,
        name: &str,
        index: u32,
    ) -> Result<Arc<Partition>, BrokerError> {
        match topic {
            Some(topic) => topic.partition(index, self.config.node_id).cloned(),
            None => Err(BrokerError::UnknownTopicOrPartition {
                topic: name.to_string(),
                partition: index,
            }),
        }
    }

    fn list_offset(
        &self,
        partition: &Partition,
        current_leader_epoch: Option<u32>,
        timestamp: i64,
        isolation: Isolation,
    ) -> Result<ListedOffset, BrokerError> {
        partition.check_leader(current_leader_epoch)?;
        let end = match isolation {
            Isolation::HighWatermark => partition.high_watermark(),
            Isolation::LogEnd => partition.log_end_offset(),
        };
        let found = |offset: Offset, timestamp: i64| ListedOffset {
            offset,
            timestamp,
            leader_epoch: partition.leader_epoch(),
        };
        match timestamp {
            cairn_protocol::native::LATEST_TIMESTAMP => Ok(found(end, -1)),
            cairn_protocol::native::EARLIEST_TIMESTAMP => {
                Ok(found(partition.log_start_offset(), -1))
            }
            ts if ts < 0 => Err(BrokerError::InvalidRequest(format!(
                "timestamp {ts} is not -1 (latest), -2 (earliest) or a time"
            ))),
            ts => match partition.log().offset_for_timestamp(ts) {
                Ok(Some((offset, at))) if offset < end => Ok(found(offset, at)),
                Ok(_) => Ok(found(end, -1)),
                Err(err) => Err(BrokerError::storage(&err)),
            },
        }
    }

    /// Runs one compaction pass on every compacted partition (blocking); stops early at
    /// shutdown.
    pub(crate) fn apply_compaction(&self) {
        let now = self.clock.unix_ms();
        let stopping = || self.shutdown.is_cancelled();
        for topic in self.manager.topics() {
            for partition in topic.local().filter(|p| p.config().compacted) {
                if stopping() {
                    return;
                }
                match partition.log().compact_unless(now, &stopping) {
                    Ok(report) => {
                        self.metrics
                            .compaction_bytes_removed
                            .inc_by(report.n_bytes_before.saturating_sub(report.n_bytes_after));
                        self.metrics
                            .compaction_records_removed
                            .inc_by(report.n_records_superseded + report.n_tombstones_dropped);
                    }
                    Err(err) => {
                        tracing::error!(topic = %topic.name, partition = partition.index(), error = %err, "compaction failed");
                    }
                }
            }
        }
    }

    /// Runs retention on every partition, and forgets idle idempotent producers (blocking).
    pub(crate) fn apply_retention(&self) {
        let now = self.clock.unix_ms();
        let idle_max = i64::try_from(self.config.producer_id_expiration_ms).unwrap_or(i64::MAX);
        for topic in self.manager.topics() {
            for partition in topic.local() {
                partition.expire_producers(now, idle_max);
                if let Err(err) = partition.log().apply_retention(now) {
                    tracing::error!(topic = %topic.name, partition = partition.index(), error = %err, "retention failed");
                }
            }
        }
    }
}

/// The broker error of a refusal by the controller.
pub(crate) fn rejected(rejected: cairn_controller::Rejected, topic: &str) -> BrokerError {
    let message = rejected.message.clone();
    match rejected.error_code() {
        ErrorCode::TOPIC_ALREADY_EXISTS => BrokerError::TopicAlreadyExists(topic.to_string()),
        ErrorCode::INVALID_PARTITIONS => BrokerError::InvalidPartitions(message),
        ErrorCode::INVALID_REPLICATION_FACTOR => BrokerError::InvalidReplicationFactor(message),
        ErrorCode::POLICY_VIOLATION => BrokerError::PolicyViolation(message),
        ErrorCode::UNKNOWN_TOPIC_OR_PARTITION => BrokerError::UnknownTopic(topic.to_string()),
        ErrorCode::INVALID_CONFIG => BrokerError::InvalidConfig(message),
        ErrorCode::INVALID_TOPIC_EXCEPTION => BrokerError::InvalidTopic(message),
        _ => BrokerError::InvalidRequest(message),
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
