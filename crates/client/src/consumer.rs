//! Reading assigned partitions from chosen positions: one fetch in flight per partition leader,
//! sent before `poll` returns, so the next records are on their way while the caller works.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_protocol::batch::Batches;
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use cairn_protocol::native::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::connection::Connection;
use crate::error::ClientError;

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The first offset still stored.
    Earliest,
    /// The next offset to be written: only new records.
    Latest,
    /// A specific offset.
    Offset(u64),
    /// The first record at or after this Unix-ms timestamp.
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Name in broker logs.
    pub client_id: String,
    /// Longest a fetch waits for data.
    pub fetch_max_wait: Duration,
    /// A fetch returns once this many bytes are available.
    pub fetch_min_bytes: u32,
    /// Most bytes per fetch.
    pub fetch_max_bytes: u32,
    /// Most bytes per partition per fetch.
    pub partition_max_bytes: u32,
    /// TLS for every connection (`None`: plain TCP).
    pub tls: Option<crate::ClientTls>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            client_id: "cairn-consumer".into(),
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_max_bytes: 50 * 1024 * 1024,
            partition_max_bytes: 1024 * 1024,
            tls: None,
        }
    }
}

/// One record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp, Unix ms.
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
}

#[derive(Debug, Clone)]
struct Assignment {
    topic: Arc<str>,
    partition: u32,
    next_offset: u64,
    high_watermark: u64,
}

/// A fetch to one leader, on a task of its own: which broker, and its response.
type InFlightFetch = JoinHandle<(u32, Result<FetchResponse, ClientError>)>;

/// Reads records from assigned partitions.
pub struct Consumer {
    cluster: Cluster,
    config: ConsumerConfig,
    assigned: Vec<Assignment>,
    /// One fetch per leader, each for the assigned partitions it leads.
    fetches: FuturesUnordered<InFlightFetch>,
    /// The partitions those fetches cover, each with the leader its fetch went to: when that
    /// fetch ends, however it ends, they are free to be fetched again.
    fetching: HashMap<(Arc<str>, u32), u32>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("assigned", &self.assigned)
            .field("fetching", &self.fetching.len())
            .finish_non_exhaustive()
    }
}

/// How many times an offset lookup follows a moved leader.
const LEADER_RETRIES: usize = 5;

impl Consumer {
    /// Connects to a cluster through `bootstrap` (one or more `host:port`, comma-separated):
    /// each partition is read from its leader.
    pub async fn connect(bootstrap: &str, config: ConsumerConfig) -> Result<Consumer, ClientError> {
        let cluster =
            Cluster::connect_tls(bootstrap, &config.client_id, config.tls.clone()).await?;
        Ok(Consumer::with_cluster(cluster, config))
    }

    /// A consumer over an existing connection (for example an embedded broker's).
    pub fn with_connection(conn: Connection, config: ConsumerConfig) -> Consumer {
        Consumer::with_cluster(Cluster::with_connection(conn), config)
    }

    /// A consumer reading through `cluster`.
    pub fn with_cluster(cluster: Cluster, config: ConsumerConfig) -> Consumer {
        Consumer {
            cluster,
            config,
            assigned: Vec::new(),
            fetches: FuturesUnordered::new(),
            fetching: HashMap::new(),
        }
    }

    /// The cluster this consumer reads from.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Assigns partitions of `topic` (all if `None`) starting at `from`.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: Option<Vec<u32>>,
        from: Position,
    ) -> Result<Vec<u32>, ClientError> {
        let partitions = match partitions {
            Some(partitions) => partitions,
            None => {
                let metadata = self.cluster.metadata(&[topic.to_string()], false).await?;
                let Some(found) = metadata.topics.into_iter().find(|t| t.name == topic) else {
                    return Err(ClientError::InvalidArgument(format!(
                        "topic {topic} not in metadata"
                    )));
                };
                if found.error_code != 0 {
                    return Err(ClientError::broker(
                        format!("metadata for {topic}"),
                        found.error_code,
                        String::new(),
                    ));
                }
                found.partitions.iter().map(|p| p.partition).collect()
            }
        };
        for &partition in &partitions {
            self.assigned
                .retain(|a| !(&*a.topic == topic && a.partition == partition));
            self.assigned.push(Assignment {
                topic: Arc::from(topic),
                partition,
                next_offset: 0,
                high_watermark: 0,
            });
            self.seek(topic, partition, from).await?;
        }
        Ok(partitions)
    }

    /// Moves a partition's position.
    pub async fn seek(
        &mut self,
        topic: &str,
        partition: u32,
        to: Position,
    ) -> Result<u64, ClientError> {
        self.cancel_prefetch();
        let offset = match to {
            Position::Offset(offset) => offset,
            Position::Earliest => {
                self.list_offset(topic, partition, EARLIEST_TIMESTAMP)
                    .await?
            }
            Position::Latest => self.list_offset(topic, partition, LATEST_TIMESTAMP).await?,
            Position::Timestamp(ts) => self.list_offset(topic, partition, ts.max(0)).await?,
        };
        match self
            .assigned
            .iter_mut()
            .find(|a| &*a.topic == topic && a.partition == partition)
        {
            Some(assignment) => assignment.next_offset = offset,
            None => {
                return Err(ClientError::InvalidArgument(format!(
                    "{topic}-{partition} is not assigned"
                )));
            }
        }
        Ok(offset)
    }

    /// The offset of a partition's log end (asked of the broker).
    pub async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, ClientError> {
        self.list_offset(topic, partition, LATEST_TIMESTAMP).await
    }

    /// The first offset still stored in a partition (asked of the broker).
    pub async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, ClientError> {
        self.list_offset(topic, partition, EARLIEST_TIMESTAMP).await
    }

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        self.cancel_prefetch();
        self.assigned
            .retain(|a| !(&*a.topic == topic && a.partition == partition));
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.assigned
            .iter()
            .map(|a| (a.topic.to_string(), a.partition))
            .collect()
    }

    async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
    ) -> Result<u64, ClientError> {
        list_offset(&self.cluster, topic, partition, timestamp).await
    }

    /// The next offset to be read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assigned
            .iter()
            .find(|a| &*a.topic == topic && a.partition == partition)
            .map(|a| a.next_offset)
    }

    /// The high watermark of a partition as of the last fetch.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assigned
            .iter()
            .find(|a| &*a.topic == topic && a.partition == partition)
            .map(|a| a.high_watermark)
    }

    /// Drops the fetches in flight (their answers would be for old positions).
    fn cancel_prefetch(&mut self) {
        for fetch in self.fetches.iter() {
            fetch.abort();
        }
        self.fetches = FuturesUnordered::new();
        self.fetching.clear();
    }

    /// Sends a fetch to each leader of assigned partitions no fetch covers yet. Partitions
    /// whose leader is unknown (or whose leader has no open connection yet) are looked up
    /// first; those still without one wait for the next call.
    async fn start_fetches(&mut self) {
        let unrouted: Vec<String> = self
            .assigned
            .iter()
            .filter(|a| {
                !self
                    .fetching
                    .contains_key(&(Arc::clone(&a.topic), a.partition))
            })
            // Unknown, stale, or without a leader when last asked (offline for an election):
            // ask again, or a partition offline once would be left unfetched for good.
            .filter(|a| {
                self.cluster
                    .route(&a.topic, a.partition)
                    .is_none_or(|r| r.leader.is_none())
            })
            .map(|a| a.topic.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unrouted.is_empty()
            && let Err(err) = self.cluster.refresh(&unrouted).await
        {
            tracing::debug!(error = %err, "metadata refresh failed");
        }
        let mut by_leader: std::collections::BTreeMap<u32, Vec<FetchTopic>> =
            std::collections::BTreeMap::new();
        for a in &self.assigned {
            let key = (Arc::clone(&a.topic), a.partition);
            if self.fetching.contains_key(&key) {
                continue;
            }
            let Some(crate::cluster::Route {
                leader: Some(leader),
                leader_epoch,
            }) = self.cluster.route(&a.topic, a.partition)
            else {
                continue;
            };
            let part = FetchPartition {
                partition: a.partition,
                fetch_offset: a.next_offset,
                partition_max_bytes: self.config.partition_max_bytes,
                current_leader_epoch: i32::try_from(leader_epoch).unwrap_or(-1),
            };
            let topics = by_leader.entry(leader).or_default();
            match topics.iter_mut().find(|t| t.name == *a.topic) {
                Some(t) => t.partitions.push(part),
                None => topics.push(FetchTopic {
                    name: a.topic.to_string(),
                    partitions: vec![part],
                }),
            }
        }
        for (leader, topics) in by_leader {
            let conn = match self.cluster.connection(leader).await {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::debug!(leader, error = %err, "cannot connect to a leader");
                    self.cluster.forget(leader);
                    continue;
                }
            };
            for topic in &topics {
                let name: Arc<str> = Arc::from(topic.name.as_str());
                for p in &topic.partitions {
                    self.fetching
                        .insert((Arc::clone(&name), p.partition), leader);
                }
            }
            let request = Request::Fetch(FetchRequest {
                max_wait_ms: self.config.fetch_max_wait.as_millis() as u32,
                min_bytes: self.config.fetch_min_bytes,
                max_bytes: self.config.fetch_max_bytes,
                topics,
            });
            // Queued on the connection now; awaited at a later poll.
            let response = conn.call::<FetchResponse>(&request);
            self.fetches
                .push(tokio::spawn(async move { (leader, response.await) }));
        }
    }

    /// The next records (possibly none, after about `fetch_max_wait`). Fetches for the
    /// following call are sent before this returns.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        if self.assigned.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no partitions assigned".into(),
            ));
        }
        let deadline = Instant::now() + self.config.fetch_max_wait + Duration::from_millis(100);
        loop {
            self.start_fetches().await;
            let next = if self.fetches.is_empty() {
                None
            } else {
                tokio::time::timeout_at(deadline.into(), self.fetches.next())
                    .await
                    .ok()
                    .flatten()
            };
            let next = match next {
                Some(Ok(done)) => Some(done),
                // Aborted (a seek) or panicked: treat as nothing arrived.
                Some(Err(_)) => continue,
                None => None,
            };
            let Some((leader, result)) = next else {
                if Instant::now() >= deadline {
                    return Ok(Vec::new());
                }
                // No leader known for anything: wait a little for an election.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // That leader's fetch is over: its partitions may be fetched again (from whoever
            // leads them by then). Routes are not the key: a broken connection marks them all
            // stale, and a stale route names no leader.
            self.fetching.retain(|_, l| *l != leader);
            let response = match result {
                Ok(response) => response,
                Err(err) => {
                    // The leader's connection broke: every partition it led is looked up
                    // again at the next round.
                    tracing::debug!(leader, error = %err, "fetch failed");
                    self.cluster.forget(leader);
                    if !err.is_retriable() {
                        return Err(err);
                    }
                    if Instant::now() >= deadline {
                        return Ok(Vec::new());
                    }
                    continue;
                }
            };
            let (records, error) = self.take(response)?;
            if !records.is_empty() {
                self.start_fetches().await;
                return Ok(records);
            }
            if let Some(err) = error {
                return Err(err);
            }
            if Instant::now() >= deadline {
                self.start_fetches().await;
                return Ok(records);
            }
        }
    }

    /// The records of a fetch response, moving the positions past them; the first error that
    /// is not a moved leader (those only send the partition's next fetch to the new one).
    fn take(
        &mut self,
        response: FetchResponse,
    ) -> Result<(Vec<ConsumerRecord>, Option<ClientError>), ClientError> {
        let mut records = Vec::new();
        let mut first_error = None;
        for topic in response.topics {
            for part in topic.partitions {
                let Some(assignment) = self
                    .assigned
                    .iter_mut()
                    .find(|a| *a.topic == topic.name && a.partition == part.partition)
                else {
                    continue;
                };
                if part.error_code != 0 {
                    let err = ClientError::broker(
                        format!("fetch {}-{}", topic.name, part.partition),
                        part.error_code,
                        String::new(),
                    );
                    if err.is_stale_metadata() {
                        self.cluster.invalidate(&topic.name);
                    } else {
                        first_error.get_or_insert(err);
                    }
                    continue;
                }
                assignment.high_watermark = part.high_watermark;
                for batch in Batches::new(part.records, BATCH_BYTES_MAX) {
                    let corrupt = |e: &dyn std::fmt::Display| {
                        ClientError::Corrupt(format!(
                            "batch from {}-{}: {e}",
                            topic.name, part.partition
                        ))
                    };
                    let batch = batch.map_err(|e| corrupt(&e))?;
                    for record in batch
                        .records(DECOMPRESSED_BYTES_MAX)
                        .map_err(|e| corrupt(&e))?
                    {
                        let offset = record.offset as u64;
                        // A fetch starts at the batch holding the offset: skip what came before.
                        if offset < assignment.next_offset {
                            continue;
                        }
                        assignment.next_offset = offset + 1;
                        records.push(ConsumerRecord {
                            topic: Arc::clone(&assignment.topic),
                            partition: assignment.partition,
                            offset,
                            timestamp: record.timestamp,
                            key: record.key,
                            value: record.value,
                            headers: record
                                .headers
                                .into_iter()
                                .map(|h| (h.key, h.value))
                                .collect(),
                        });
                    }
                    // Batches may end with records removed by compaction: move past the batch.
                    let after = batch.header().last_offset() as u64 + 1;
                    assignment.next_offset = assignment.next_offset.max(after);
                }
            }
        }
        Ok((records, first_error))
    }
}

/// The offset of `topic`'s partition at `timestamp` (latest, earliest, or a time), asked of its
/// leader; follows a moved leader a few times.
pub(crate) async fn list_offset(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
    timestamp: i64,
) -> Result<u64, ClientError> {
    let mut attempt = 0;
    loop {
        let result = async {
            let (leader, epoch) = cluster.leader(topic, partition).await?;
            let conn = cluster.connection(leader).await?;
            let request = Request::ListOffsets(ListOffsetsRequest {
                topics: vec![ListOffsetsTopic {
                    name: topic.to_string(),
                    partitions: vec![ListOffsetsPartition {
                        partition,
                        timestamp,
                        current_leader_epoch: i32::try_from(epoch).unwrap_or(-1),
                    }],
                }],
            });
            let response: ListOffsetsResponse = conn.call(&request).await.inspect_err(|e| {
                if matches!(e, ClientError::Connection { .. }) {
                    cluster.forget(leader);
                }
            })?;
            let found = response
                .topics
                .into_iter()
                .flat_map(|t| t.partitions)
                .find(|p| p.partition == partition);
            match found {
                Some(p) if p.error_code == 0 => Ok(p.offset),
                Some(p) => Err(ClientError::broker(
                    format!("list offsets {topic}-{partition}"),
                    p.error_code,
                    String::new(),
                )),
                None => Err(ClientError::InvalidArgument(format!(
                    "{topic}-{partition} missing from the response"
                ))),
            }
        }
        .await;
        match result {
            Err(err) if err.is_stale_metadata() && attempt < LEADER_RETRIES => {
                attempt += 1;
                cluster.invalidate(topic);
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
            }
            done => return done,
        }
    }
}

impl Consumer {
    /// The records as a stream: each item is the next record, or the error that stopped it.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<ConsumerRecord, ClientError>> + Send {
        futures::stream::unfold(
            (self, std::collections::VecDeque::new(), false),
            |(mut consumer, mut buffered, failed)| async move {
                if failed {
                    return None;
                }
                loop {
                    if let Some(record) = buffered.pop_front() {
                        return Some((Ok(record), (consumer, buffered, false)));
                    }
                    match consumer.poll().await {
                        Ok(records) => buffered.extend(records),
                        Err(err) => return Some((Err(err), (consumer, buffered, true))),
                    }
                }
            },
        )
    }
}
