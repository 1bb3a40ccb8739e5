//! Partition replication on this broker, over the state machines of `cairn-replication`:
//!
//! - the leader's side of ReplicaFetch ([`Handler::replica_fetch`]): each follower's position is
//!   checked against the log (divergence), counted for the high watermark, and answered with the
//!   segment bytes from there (zero-copy, as for consumers), long-polling for new records;
//! - the follower's side ([`run_fetchers`]): one task per leader this broker follows
//!   partitions of, fetching them all in one long poll, appending what arrives with the storage
//!   engine's replicated append (offsets and epochs kept), truncating where the leader says the
//!   log diverges, and (under durable replication) fsyncing before the next fetch, which reports
//!   the durable offset;
//! - ISR changes ([`run_isr_changes`]): each leader's proposals sent to the controller
//!   (AlterPartition), sent again while their outcome is unknown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_client::Connection;
use cairn_controller::{Command, CommandError, Reply};
use cairn_protocol::Offset;
use cairn_protocol::limits::FETCH_BYTES_MAX;
use cairn_protocol::native::{
    ErrorCode, ReplicaFetchPartition, ReplicaFetchPartitionResponse, ReplicaFetchRequest,
    ReplicaFetchResponse, ReplicaFetchTopic, ReplicaFetchTopicResponse, Request,
};
use cairn_replication::{DivergingEpoch, FetchCheck, FetchPosition};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::error::BrokerError;
use crate::handler::Handler;
use crate::manager::TopicManager;
use crate::metrics::Metrics;
use crate::partition::{Fetched4Follower, Isolation, Partition};

/// One partition's answer before encoding.
struct Answer {
    partition: u32,
    result: Result<ReplicaFetchPartitionResponse, BrokerError>,
}

impl Handler {
    /// A follower's fetch: answered when `min_bytes` of records are there, a partition errs or
    /// diverges, or the wait ends.
    pub(crate) async fn replica_fetch(&self, request: ReplicaFetchRequest) -> ReplicaFetchResponse {
        let replica = request.replica_id;
        let image = self.manager.image();
        // A fetch from an older registration of the replica (a process that restarted since).
        let stale = image
            .brokers
            .get(&replica)
            .is_some_and(|b| b.epoch > request.broker_epoch);
        let wait = Duration::from_millis(u64::from(request.max_wait_ms).min(60_000));
        let deadline = Instant::now() + wait;
        let max_bytes = request.max_bytes.clamp(1, FETCH_BYTES_MAX);
        let min_bytes = u64::from(request.min_bytes.max(1));
        let partitions: Vec<Vec<Result<Arc<Partition>, BrokerError>>> = request
            .topics
            .iter()
            .map(|t| {
                let found = self.manager.topic(&t.name);
                t.partitions
                    .iter()
                    .map(|p| {
                        if stale {
                            return Err(BrokerError::StaleBrokerEpoch(format!(
                                "broker {replica} fetched with broker epoch {}, not its current one",
                                request.broker_epoch
                            )));
                        }
                        self.lookup(found.as_deref(), &t.name, p.partition)
                    })
                    .collect()
            })
            .collect();
        let mut watches = Vec::new();
        loop {
            let mut remaining = max_bytes;
            let mut total = 0u64;
            let mut done = false;
            let mut needs_io = Vec::new();
            let mut topics = Vec::with_capacity(request.topics.len());
            for (t, found) in request.topics.iter().zip(&partitions) {
                let mut answers = Vec::with_capacity(t.partitions.len());
                for (p, partition) in t.partitions.iter().zip(found) {
                    let result = partition
                        .as_ref()
                        .map_err(Clone::clone)
                        .and_then(|partition| {
                            let limit = if total == 0 {
                                p.partition_max_bytes.min(remaining).max(1)
                            } else {
                                p.partition_max_bytes.min(remaining)
                            };
                            let answer = answer_follower(partition, replica, p, limit)?;
                            match &answer {
                                None => needs_io.push((Arc::clone(partition), p.fetch_offset)),
                                Some(a) if a.diverging => done = true,
                                Some(a) => {
                                    total += a.records.len() as u64;
                                    remaining = remaining.saturating_sub(a.records.len() as u32);
                                }
                            }
                            Ok(answer.unwrap_or_else(|| empty_answer(partition, p.partition)))
                        });
                    if let Err(err) = &result {
                        done = true;
                        self.count_error("replica_fetch", err.code());
                    }
                    answers.push(Answer {
                        partition: p.partition,
                        result,
                    });
                }
                topics.push((t.name.clone(), answers));
            }
            if !needs_io.is_empty() {
                let loaded = tokio::task::spawn_blocking(move || {
                    for (partition, offset) in needs_io {
                        let _ = partition.read(Offset(offset), 1, Isolation::LogEnd, true);
                    }
                });
                if loaded.await.is_err() {
                    tracing::error!("loading segment indexes panicked");
                }
                continue;
            }
            if done
                || total >= min_bytes
                || Instant::now() >= deadline
                || self.shutdown.is_cancelled()
            {
                self.metrics.replica_fetch_bytes.inc_by(total);
                return encode(topics);
            }
            if watches.is_empty() {
                // Subscribe, then look once more: an append in between is not missed.
                watches = partitions
                    .iter()
                    .flatten()
                    .filter_map(|p| p.as_ref().ok())
                    .map(|p| p.subscribe(Isolation::LogEnd))
                    .collect();
                if watches.is_empty() {
                    return encode(topics);
                }
                continue;
            }
            self.wait_for_change(&mut watches, deadline).await;
        }
    }
}

fn encode(topics: Vec<(String, Vec<Answer>)>) -> ReplicaFetchResponse {
    ReplicaFetchResponse {
        topics: topics
            .into_iter()
            .map(|(name, answers)| ReplicaFetchTopicResponse {
                name,
                partitions: answers
                    .into_iter()
                    .map(|a| match a.result {
                        Ok(answer) => answer,
                        Err(err) => ReplicaFetchPartitionResponse {
                            partition: a.partition,
                            error_code: err.code().0,
                            ..failed(a.partition)
                        },
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// A partition's answer with nothing in it (no divergence, no records).
fn failed(partition: u32) -> ReplicaFetchPartitionResponse {
    ReplicaFetchPartitionResponse {
        partition,
        diverging_epoch: -1,
        ..ReplicaFetchPartitionResponse::default()
    }
}

fn empty_answer(partition: &Partition, index: u32) -> ReplicaFetchPartitionResponse {
    ReplicaFetchPartitionResponse {
        high_watermark: partition.high_watermark().0,
        log_start_offset: partition.log_start_offset().0,
        log_end_offset: partition.log_end_offset().0,
        ..failed(index)
    }
}

/// The leader's answer for one partition; `Ok(None)`: the read needs index files loaded first.
fn answer_follower(
    partition: &Partition,
    replica: u32,
    p: &ReplicaFetchPartition,
    limit: u32,
) -> Result<Option<ReplicaFetchPartitionResponse>, BrokerError> {
    let position = FetchPosition {
        offset: p.fetch_offset,
        last_fetched_epoch: u32::try_from(p.last_fetched_epoch).ok(),
        flushed: p.flushed_offset,
    };
    let check = partition.on_replica_fetch(replica, p.current_leader_epoch, position)?;
    let base = empty_answer(partition, p.partition);
    match check {
        FetchCheck::Read { offset } => {
            if limit == 0 {
                return Ok(Some(base));
            }
            let Some((read, _)) =
                partition.read(Offset(offset), limit, Isolation::LogEnd, false)?
            else {
                return Ok(None);
            };
            Ok(Some(ReplicaFetchPartitionResponse {
                records: read.bytes,
                ..base
            }))
        }
        FetchCheck::Diverging(d) => Ok(Some(ReplicaFetchPartitionResponse {
            diverging: true,
            diverging_epoch: d.epoch.map_or(-1, |e| e as i32),
            diverging_end_offset: d.end_offset,
            ..base
        })),
        // With the leader's log start and end, so the follower knows where to go: truncate to
        // the end, or start over at the start.
        FetchCheck::OutOfRange { log_start, log_end } => Ok(Some(ReplicaFetchPartitionResponse {
            error_code: ErrorCode::OFFSET_OUT_OF_RANGE.0,
            log_start_offset: log_start,
            log_end_offset: log_end,
            ..base
        })),
        FetchCheck::NotReplica => Err(BrokerError::NotLeaderOrFollower {
            node: replica,
            topic: partition.topic().to_string(),
            partition: p.partition,
        }),
    }
}

/// Settings of the follower fetchers.
#[derive(Debug, Clone)]
pub(crate) struct FetcherConfig {
    pub(crate) node_id: u32,
    pub(crate) wait_max: Duration,
    pub(crate) partition_max_bytes: u32,
    pub(crate) response_max_bytes: u32,
    /// TLS to the leaders' listeners (when this cluster's listeners speak TLS).
    pub(crate) tls: Option<cairn_client::ClientTls>,
}

/// Runs one fetcher task per leader this broker follows partitions of, starting and stopping
/// them as the metadata changes.
pub(crate) async fn run_fetchers(
    manager: Arc<TopicManager>,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    config: FetcherConfig,
    shutdown: CancellationToken,
) {
    let mut applied = manager.applied();
    let mut running: BTreeMap<u32, CancellationToken> = BTreeMap::new();
    loop {
        let leaders: BTreeSet<u32> = followed(&manager).into_keys().collect();
        running.retain(|leader, stop| {
            let keep = leaders.contains(leader);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for leader in leaders {
            running.entry(leader).or_insert_with(|| {
                let stop = shutdown.child_token();
                tokio::spawn(fetch_from(
                    leader,
                    Arc::clone(&manager),
                    Arc::clone(&cluster),
                    metrics.clone(),
                    config.clone(),
                    stop.clone(),
                ));
                stop
            });
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// The partitions this broker follows, by leader: (partition, leader epoch, position).
fn followed(manager: &TopicManager) -> BTreeMap<u32, Vec<(Arc<Partition>, u32, FetchPosition)>> {
    let mut by_leader: BTreeMap<u32, Vec<_>> = BTreeMap::new();
    for topic in manager.topics() {
        for partition in topic.local() {
            if let Some((leader, epoch, position)) = partition.follower_position() {
                by_leader
                    .entry(leader)
                    .or_default()
                    .push((Arc::clone(partition), epoch, position));
            }
        }
    }
    by_leader
}

/// How long a follower waits for its leader to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Copies every partition led by `leader` that this broker follows, until `stop`.
async fn fetch_from(
    leader: u32,
    manager: Arc<TopicManager>,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    config: FetcherConfig,
    stop: CancellationToken,
) {
    let mut connection: Option<Connection> = None;
    let mut backoff = Duration::from_millis(50);
    while !stop.is_cancelled() {
        let parts = followed(&manager).remove(&leader).unwrap_or_default();
        if parts.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                () = stop.cancelled() => return,
            }
        }
        let conn = match &connection {
            Some(conn) => conn,
            None => {
                let image = manager.image();
                let Some(addr) = image
                    .brokers
                    .get(&leader)
                    .map(|b| b.info.native.to_string())
                else {
                    sleep_or_stop(&mut backoff, &stop).await;
                    continue;
                };
                let client_id = format!("replica-{}", config.node_id);
                // Bounded: a leader behind a network cut drops the SYNs, and the kernel would
                // retry them for minutes.
                let connect = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    Connection::connect_with(&addr, &client_id, None, config.tls.as_ref()),
                );
                let connected = tokio::select! {
                    connected = connect => connected.unwrap_or_else(|_| {
                        Err(cairn_client::ClientError::Timeout(format!("connecting to {addr}")))
                    }),
                    () = stop.cancelled() => return,
                };
                match connected {
                    Ok(conn) => connection.insert(conn),
                    Err(err) => {
                        tracing::debug!(leader, %addr, error = %err, "cannot reach the leader");
                        sleep_or_stop(&mut backoff, &stop).await;
                        continue;
                    }
                }
            }
        };
        let request = fetch_request(&parts, &cluster, &config);
        let call = conn.call::<ReplicaFetchResponse>(&Request::ReplicaFetch(request));
        let response = tokio::select! {
            response = tokio::time::timeout(config.wait_max + Duration::from_secs(10), call) => response,
            () = stop.cancelled() => return,
        };
        let response = match response {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                tracing::debug!(leader, error = %err, "replica fetch failed");
                connection = None;
                sleep_or_stop(&mut backoff, &stop).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(leader, "replica fetch timed out");
                connection = None;
                continue;
            }
        };
        let bytes: usize = response
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.records.len())
            .sum();
        metrics.follower_fetch_bytes.inc_by(bytes as u64);
        let progressed = apply_response(&parts, response).await;
        if progressed {
            backoff = Duration::from_millis(50);
        } else {
            sleep_or_stop(&mut backoff, &stop).await;
        }
    }
}

async fn sleep_or_stop(backoff: &mut Duration, stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        () = stop.cancelled() => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
}

fn fetch_request(
    parts: &[(Arc<Partition>, u32, FetchPosition)],
    cluster: &Cluster,
    config: &FetcherConfig,
) -> ReplicaFetchRequest {
    let mut topics: BTreeMap<&str, Vec<ReplicaFetchPartition>> = BTreeMap::new();
    for (partition, epoch, position) in parts {
        topics
            .entry(&**partition.topic())
            .or_default()
            .push(ReplicaFetchPartition {
                partition: partition.index(),
                current_leader_epoch: *epoch,
                fetch_offset: position.offset,
                last_fetched_epoch: position
                    .last_fetched_epoch
                    .map_or(-1, |e| i32::try_from(e).unwrap_or(i32::MAX)),
                flushed_offset: position.flushed,
                partition_max_bytes: config.partition_max_bytes,
            });
    }
    ReplicaFetchRequest {
        replica_id: config.node_id,
        broker_epoch: cluster.broker_epoch().unwrap_or(0),
        max_wait_ms: u32::try_from(config.wait_max.as_millis()).unwrap_or(u32::MAX),
        min_bytes: 1,
        max_bytes: config.response_max_bytes,
        topics: topics
            .into_iter()
            .map(|(name, partitions)| ReplicaFetchTopic {
                name: name.to_string(),
                partitions,
            })
            .collect(),
    }
}

/// Carries out a leader's answer (on the blocking pool, partitions concurrently). Returns
/// whether any partition moved (appended or truncated) or is caught up without errors.
async fn apply_response(
    parts: &[(Arc<Partition>, u32, FetchPosition)],
    response: ReplicaFetchResponse,
) -> bool {
    let by_key: BTreeMap<(&str, u32), &(Arc<Partition>, u32, FetchPosition)> = parts
        .iter()
        .map(|part| ((&**part.0.topic(), part.0.index()), part))
        .collect();
    let mut work = Vec::new();
    let mut any_ok = false;
    for topic in response.topics {
        for answer in topic.partitions {
            let Some((partition, epoch, position)) = by_key
                .get(&(topic.name.as_str(), answer.partition))
                .copied()
            else {
                continue;
            };
            let code = ErrorCode(answer.error_code);
            let fetched = if code == ErrorCode::NONE {
                any_ok = true;
                if answer.diverging {
                    Fetched4Follower::Diverging(DivergingEpoch {
                        epoch: u32::try_from(answer.diverging_epoch).ok(),
                        end_offset: answer.diverging_end_offset,
                    })
                } else {
                    Fetched4Follower::Records {
                        records: answer.records,
                        high_watermark: answer.high_watermark,
                    }
                }
            } else if code == ErrorCode::OFFSET_OUT_OF_RANGE
                && position.offset > answer.log_end_offset
            {
                Fetched4Follower::PastEnd {
                    leader_log_end: answer.log_end_offset,
                }
            } else if code == ErrorCode::OFFSET_OUT_OF_RANGE
                && position.offset < answer.log_start_offset
            {
                Fetched4Follower::BeforeStart {
                    leader_log_start: answer.log_start_offset,
                }
            } else {
                tracing::debug!(topic = %topic.name, partition = answer.partition, error = %code, "replica fetch refused");
                continue;
            };
            let (partition, epoch, at) = (Arc::clone(partition), *epoch, position.offset);
            work.push(tokio::task::spawn_blocking(move || {
                let result = partition.apply_fetched(epoch, at, fetched);
                if let Err(err) = &result {
                    tracing::error!(topic = %partition.topic(), partition = partition.index(), error = %err, "applying fetched records failed");
                }
                result
            }));
        }
    }
    for done in futures::future::join_all(work).await {
        if !matches!(done, Ok(Ok(_))) {
            any_ok = false;
        }
    }
    any_ok
}

/// Sends the ISR changes this broker's leaderships decide to the controller, every 200 ms.
pub(crate) async fn run_isr_changes(
    manager: Arc<TopicManager>,
    cluster: Arc<Cluster>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(broker_epoch) = cluster.broker_epoch() else {
            continue;
        };
        for topic in manager.topics() {
            for partition in topic.local() {
                let Some(proposal) = partition.isr_proposal(1000) else {
                    continue;
                };
                partition.adopt_isr_unilaterally(&proposal.change);
                let command = Command::AlterPartition {
                    node_id: cluster.info.node_id,
                    broker_epoch,
                    topic: proposal.topic.to_string(),
                    partition: proposal.partition,
                    leader_epoch: proposal.change.leader_epoch,
                    partition_epoch: proposal.change.partition_epoch,
                    isr: proposal.change.isr.clone(),
                };
                let (cluster, partition) = (Arc::clone(&cluster), Arc::clone(partition));
                let before = partition.isr_len();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    match cluster.client.execute(command).await {
                        Ok(Reply::PartitionChanged { .. }) => {
                            if proposal.change.isr.len() < before {
                                metrics.isr_shrinks.inc();
                            } else {
                                metrics.isr_expands.inc();
                            }
                            tracing::info!(topic = %proposal.topic, partition = proposal.partition, isr = ?proposal.change.isr, "ISR change committed");
                        }
                        Err(CommandError::Rejected(rejected))
                            if [
                                ErrorCode::INELIGIBLE_REPLICA,
                                ErrorCode::INVALID_REQUEST,
                                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                            ]
                            .contains(&rejected.error_code()) =>
                        {
                            tracing::debug!(topic = %proposal.topic, partition = proposal.partition, error = %rejected, "ISR change refused");
                            partition.isr_change_refused();
                        }
                        // Stale or unknown: the image will tell, or it is sent again.
                        other => {
                            tracing::debug!(topic = %proposal.topic, partition = proposal.partition, answer = ?other, "ISR change not confirmed");
                        }
                    }
                });
            }
        }
    }
}
