//! The producer: batches records per partition (up to `batch_bytes`, waiting at most `linger`),
//! sends them with bounded requests in flight, retries retriable errors with exponential backoff
//! and jitter, and resolves a future per record with its offset.
//!
//! Idempotence (on by default with `Acks::All`, as in Kafka): the producer gets a producer id from
//! the cluster (InitProducerId) and numbers each partition's batches. A batch retried after a lost
//! answer or a leader change is recognised by the leader (which keeps the state of the batches it
//! replicated) and answered with its first offsets: every record is written once and, with up to
//! [`IN_FLIGHT_MAX`] requests in flight, in order. A batch that fails for good (its error is not
//! retriable, or its retries ran out) leaves a gap in the numbering: once nothing is in flight the
//! producer bumps its epoch (KIP-360) and renumbers what is still queued from 0. A retried batch
//! the leader answers OUT_OF_ORDER_SEQUENCE_NUMBER although a later batch was already
//! acknowledged was most likely written (its answer lost, the leader past it): it resolves with
//! an "outcome unknown" error and is never sent again, since under a new epoch it would be new.
//!
//! Without idempotence (`Acks::Leader`, `Acks::None`, or `idempotent: false`) records of one
//! partition are still sent in order, but with `max_in_flight > 1` a retried batch can land after a
//! later one and a retry can write a batch twice; set `max_in_flight = 1` for strict per-partition
//! order under failures.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cairn_protocol::batch::{BATCH_HEADER_BYTES, BatchBuilder, Compression, restamp_producer};
use cairn_protocol::native::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{Notify, oneshot};

use crate::cluster::Cluster;
use crate::connection::Connection;
use crate::error::ClientError;
use crate::partitioner::{Partitioner, PartitionerState, partition_for_key};

/// When the broker acknowledges a produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Fire and forget: no response; futures resolve when the request is sent (offset unknown).
    None,
    /// Once the leader appended the records.
    Leader,
    /// Once the records are durable (fsynced; replicated when replication exists).
    #[default]
    All,
}

impl Acks {
    fn wire(self) -> i8 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Name in broker logs.
    pub client_id: String,
    /// Acknowledgement level.
    pub acks: Acks,
    /// How long a batch may wait for more records.
    pub linger: Duration,
    /// A partition's batch is sent once it reaches this size.
    pub batch_bytes: usize,
    /// Batch compression.
    pub compression: Compression,
    /// Produce requests in flight at once.
    pub max_in_flight: usize,
    /// Attempts after the first for a batch that failed with a retriable error.
    pub retries: u32,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`, with jitter.
    pub retry_backoff: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// How long the broker may take to make a batch durable.
    pub request_timeout: Duration,
    /// Partition choice for records without one.
    pub partitioner: Partitioner,
    /// Records buffered before `send` waits (backpressure).
    pub buffer_records_max: usize,
    /// Most record bytes one produce request carries for one partition (consecutive ready
    /// batches are sent together up to this; an idempotent producer sends one batch per partition
    /// per request, as the broker requires).
    pub request_bytes_max: usize,
    /// Exactly-once, in-order delivery per partition across retries and leader changes (see the
    /// module documentation). Applies with `Acks::All` (Kafka turns idempotence off for lower
    /// acks); needs `max_in_flight <= IN_FLIGHT_MAX` (16), the batches a broker remembers per
    /// producer and partition.
    pub idempotent: bool,
    /// TLS for every connection (`None`: plain TCP).
    pub tls: Option<crate::ClientTls>,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            client_id: "cairn-producer".into(),
            acks: Acks::All,
            linger: Duration::from_millis(5),
            batch_bytes: 64 * 1024,
            compression: Compression::None,
            max_in_flight: 5,
            retries: 10,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            partitioner: Partitioner::default(),
            buffer_records_max: 65_536,
            request_bytes_max: 1024 * 1024,
            idempotent: true,
            tls: None,
        }
    }
}

/// A topic name as a [`ProducerRecord`] holds it: from a string (one allocation), or an
/// `Arc<str>` the caller keeps (no allocation per record).
pub trait IntoTopic {
    /// The shared name.
    fn into_topic(self) -> Arc<str>;
}

impl IntoTopic for Arc<str> {
    fn into_topic(self) -> Arc<str> {
        self
    }
}

impl IntoTopic for &Arc<str> {
    fn into_topic(self) -> Arc<str> {
        Arc::clone(self)
    }
}

impl IntoTopic for &str {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl IntoTopic for String {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self)
    }
}

impl IntoTopic for &String {
    fn into_topic(self) -> Arc<str> {
        Arc::from(self.as_str())
    }
}

/// A record to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Destination topic (shared: a producer sending many records to one topic clones an
    /// `Arc`, not a string, per record).
    pub topic: Arc<str>,
    /// Destination partition; `None` lets the partitioner choose.
    pub partition: Option<u32>,
    /// Key (used by the partitioner).
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Timestamp (Unix ms); `None` is now.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value.
    pub fn new(topic: impl IntoTopic, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into_topic(),
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    /// Sets the timestamp.
    pub fn timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
}

/// Where a record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset (`None` with `Acks::None`).
    pub offset: Option<u64>,
}

/// A record of a batch sent with [`Producer::send_batch`] (its topic and partition are the
/// batch's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchRecord {
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Timestamp (Unix ms); `None` is when the batch is sent.
    pub timestamp: Option<i64>,
}

impl BatchRecord {
    /// A record with a value.
    pub fn new(value: impl Into<Bytes>) -> BatchRecord {
        BatchRecord {
            value: Some(value.into()),
            ..BatchRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// Where a batch sent with [`Producer::send_batch`] landed: its records hold consecutive
/// offsets from `base_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// The first record's offset (`None` with `Acks::None`).
    pub base_offset: Option<u64>,
    /// How many records the batch held.
    pub records: u32,
}

/// What became of one wire batch: set once, when it is acknowledged or fails for good, and read
/// by the future of every record in it (one allocation per batch, none per record).
#[derive(Debug)]
struct Fate {
    topic: Arc<str>,
    partition: u32,
    state: Mutex<FateState>,
}

#[derive(Debug, Default)]
struct FateState {
    /// The batch's first offset (`None` with acks=0), or why it failed.
    outcome: Option<Result<Option<u64>, ClientError>>,
    /// Tasks waiting for the outcome.
    wakers: Vec<Waker>,
}

impl Fate {
    fn lock(&self) -> MutexGuard<'_, FateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the outcome if none is set yet, and wakes who waits for it.
    fn set(&self, outcome: Result<Option<u64>, ClientError>) -> bool {
        let wakers = {
            let mut state = self.lock();
            if state.outcome.is_some() {
                return false;
            }
            state.outcome = Some(outcome);
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
        true
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u64>, ClientError>> {
        let mut state = self.lock();
        match &state.outcome {
            Some(outcome) => Poll::Ready(outcome.clone()),
            None => {
                if !state.wakers.last().is_some_and(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// The sender's side of a [`Fate`]: resolves it once and gives its records' room in the buffer
/// back; dropped unresolved (the producer stopped), it resolves it as closed.
#[derive(Debug)]
struct Resolver {
    fate: Arc<Fate>,
    room: Arc<Room>,
    records: u32,
}

impl Resolver {
    fn new(topic: Arc<str>, partition: u32, room: &Arc<Room>) -> Resolver {
        Resolver {
            fate: Arc::new(Fate {
                topic,
                partition,
                state: Mutex::default(),
            }),
            room: Arc::clone(room),
            records: 0,
        }
    }

    fn resolve(self, outcome: Result<Option<u64>, ClientError>) {
        if self.fate.set(outcome) {
            self.room.release(self.records as usize);
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if self.fate.set(Err(ClientError::Closed)) {
            self.room.release(self.records as usize);
        }
    }
}

/// Records buffered in the producer (accepted, not yet resolved), bounded by
/// `buffer_records_max`: `send` waits for room.
#[derive(Debug)]
struct Room {
    buffered: AtomicUsize,
    freed: Notify,
    max: usize,
}

impl Room {
    /// Takes room for `n` records, waiting while the buffer is full (a batch larger than the
    /// whole buffer goes once the buffer is empty).
    async fn take(&self, n: usize) {
        loop {
            let freed = self.freed.notified();
            let buffered = self.buffered.load(Ordering::Acquire);
            if buffered == 0 || buffered + n <= self.max {
                self.buffered.fetch_add(n, Ordering::AcqRel);
                return;
            }
            freed.await;
        }
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.buffered.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }
}

/// Resolves when the record is acknowledged (or failed for good).
#[derive(Debug)]
pub struct DeliveryFuture(Delivery);

#[derive(Debug)]
enum Delivery {
    /// Record `index` of a batch.
    Pending { fate: Arc<Fate>, index: u32 },
    /// Refused before it joined a batch.
    Failed(Option<ClientError>),
}

impl DeliveryFuture {
    fn failed(err: ClientError) -> DeliveryFuture {
        DeliveryFuture(Delivery::Failed(Some(err)))
    }
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Delivery::Pending { fate, index } => fate.poll(cx).map(|outcome| {
                outcome.map(|base| RecordMetadata {
                    topic: Arc::clone(&fate.topic),
                    partition: fate.partition,
                    offset: base.map(|base| base + u64::from(*index)),
                })
            }),
            Delivery::Failed(err) => Poll::Ready(Err(err.take().unwrap_or(ClientError::Closed))),
        }
    }
}

/// Resolves when a batch sent with [`Producer::send_batch`] is acknowledged (or failed for
/// good).
#[derive(Debug)]
pub struct BatchFuture {
    fate: Arc<Fate>,
    records: u32,
}

impl Future for BatchFuture {
    type Output = Result<BatchMetadata, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let records = self.records;
        self.fate.poll(cx).map(|outcome| {
            outcome.map(|base_offset| BatchMetadata {
                topic: Arc::clone(&self.fate.topic),
                partition: self.fate.partition,
                base_offset,
                records,
            })
        })
    }
}

/// What `send` and the sender task share: the open batches records are appended to (by the
/// caller's task, under one short lock, with no allocation or channel hop per record), and the
/// sealed ones waiting for the sender.
struct Shared {
    config: ProducerConfig,
    cluster: Cluster,
    acc: Mutex<Accumulator>,
    /// Wakes the sender: a batch opened (its linger starts) or sealed, a flush, closing.
    work: Notify,
    room: Arc<Room>,
    /// Buffers of acknowledged batches, for new ones (as Kafka's producer pools `batch.size`
    /// buffers): fresh memory costs a page fault per 4 KiB on first touch.
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// The first size of a batch buffer that is not recycled.
const BUFFER_BYTES_FIRST: usize = 16 * 1024;

/// Most recycled batch buffers a producer keeps.
const BUFFERS_KEPT: usize = 8;

impl Shared {
    /// A buffer for a new batch whose first record takes `first` bytes: a recycled full-size
    /// one if there is one (no reallocation as it fills), else a small one that grows (records
    /// spread over thousands of partitions make batches of a record or two: a full-size buffer
    /// each would fault in `batch_bytes` of fresh memory per record).
    fn buffer(&self, first: usize) -> Vec<u8> {
        let recycled = self
            .buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match recycled {
            Some(mut buffer) => {
                buffer.clear();
                buffer.reserve(first);
                buffer
            }
            None => Vec::with_capacity(first.max(BUFFER_BYTES_FIRST.min(self.config.batch_bytes))),
        }
    }

    /// Keeps an acknowledged batch's buffer for a later batch, if nothing else holds it and it
    /// is of the usual size.
    fn recycle(&self, bytes: Bytes) {
        let Ok(bytes) = bytes.try_into_mut() else {
            return;
        };
        let buffer = Vec::from(bytes);
        let usual = self.config.batch_bytes..=self.config.batch_bytes.saturating_mul(2);
        if !usual.contains(&buffer.capacity()) {
            return;
        }
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        if buffers.len() < BUFFERS_KEPT {
            buffers.push(buffer);
        }
    }
}

#[derive(Default)]
struct Accumulator {
    /// Per topic: its partitions and their open batches (one lookup per record, by borrowed
    /// name).
    topics: HashMap<String, TopicState>,
    round_robin: PartitionerState,
    /// Sealed batches, in seal order, for the sender to number, encode and send.
    sealed: Vec<Batch>,
    flushes: Vec<oneshot::Sender<()>>,
    closing: bool,
}

/// What the producer knows of one topic.
#[derive(Default)]
struct TopicState {
    /// Its partition count.
    partitions: u32,
    /// The count must be asked again (a broker said the topic or partition is unknown).
    stale: bool,
    /// The sticky partitioner's current partition for unkeyed records.
    sticky: Option<u32>,
    /// The open batch of each partition, by index.
    open: Vec<Option<Batch>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Accumulator> {
        self.acc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A topic's partition count, asked of the cluster (with retries) if not known yet.
    async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        if let Some(t) = self.lock().topics.get(topic).filter(|t| !t.stale) {
            return Ok(t.partitions);
        }
        let mut backoff = self.config.retry_backoff;
        for attempt in 0..=self.config.retries {
            let response = self.cluster.metadata(&[topic.to_string()], true).await;
            let error = match response {
                Ok(metadata) => match metadata.topics.into_iter().find(|t| t.name == topic) {
                    Some(t) if t.error_code == 0 && !t.partitions.is_empty() => {
                        let n = t.partitions.len() as u32;
                        let mut acc = self.lock();
                        let state = acc.topics.entry(topic.to_string()).or_default();
                        // Partitions only grow; batches of any beyond `n` are sent anyway (and
                        // fail or retry there).
                        state.partitions = n;
                        state.stale = false;
                        let slots = state.open.len().max(n as usize);
                        state.open.resize_with(slots, || None);
                        return Ok(n);
                    }
                    Some(t) => ClientError::broker(
                        format!("metadata for {topic}"),
                        t.error_code,
                        String::new(),
                    ),
                    None => ClientError::broker(
                        format!("metadata for {topic}"),
                        ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                        String::new(),
                    ),
                },
                Err(err) => err,
            };
            if !error.is_retriable() || attempt == self.config.retries {
                return Err(error);
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(self.config.retry_backoff_max);
        }
        Err(ClientError::Timeout(format!("metadata for {topic}")))
    }
}

/// Encodes a record into a batch (no allocation unless it has headers).
fn push_record(
    builder: &mut BatchBuilder,
    timestamp: i64,
    (key, value): (Option<&[u8]>, Option<&[u8]>),
    headers: &[(String, Option<Bytes>)],
) {
    let headers: Vec<(&str, Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    builder.push(timestamp, key, value, &headers);
}

/// A record's encoded size in a batch, at most: its fields and the longest varints of its
/// length prefixes and deltas, so a batch sealed by this count never exceeds `batch_bytes`
/// (the broker refuses batches over its `max.message.bytes`).
fn record_bytes(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[(String, Option<Bytes>)],
) -> usize {
    // Length (varint), attributes, timestamp delta (varlong), offset delta, key and value
    // lengths, header count.
    const OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    let headers: usize = headers
        .iter()
        .map(|(k, v)| 5 + k.len() + 5 + v.as_ref().map_or(0, Bytes::len))
        .sum();
    OVERHEAD + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + headers
}

impl TopicState {
    /// The partition a record goes to, or why none.
    fn choose_partition(
        &mut self,
        record: &ProducerRecord,
        partitioner: Partitioner,
        round_robin: &mut PartitionerState,
    ) -> Result<u32, ClientError> {
        let n_partitions = self.partitions;
        Ok(match (record.partition, &record.key, partitioner) {
            (Some(p), _, _) if p < n_partitions => p,
            (Some(p), _, _) => {
                return Err(ClientError::InvalidArgument(format!(
                    "partition {p} of {} does not exist ({n_partitions} partitions)",
                    record.topic
                )));
            }
            (None, Some(key), Partitioner::Murmur2Sticky) => partition_for_key(key, n_partitions),
            (None, None, Partitioner::Murmur2Sticky) => *self
                .sticky
                .get_or_insert_with(|| rand::rng().random_range(0..n_partitions)),
            (None, _, Partitioner::RoundRobin) => round_robin.round_robin(n_partitions),
        })
    }

    /// Appends a record to its partition's open batch (sealing the batch first if the record
    /// would not fit, and after if it is full). Returns the record's delivery and whether the
    /// sender must look (a batch opened or sealed).
    fn append(
        &mut self,
        shared: &Shared,
        sealed: &mut Vec<Batch>,
        record: &ProducerRecord,
        partition: u32,
    ) -> (DeliveryFuture, bool) {
        let config = &shared.config;
        let size = record_bytes(
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
        );
        let mut wake = false;
        let index = partition as usize;
        let full = self
            .open
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|b| b.builder.uncompressed_bytes() + size > config.batch_bytes);
        if full {
            self.seal(partition, sealed);
            wake = true;
        }
        if self.open.len() <= index {
            self.open.resize_with(index + 1, || None);
        }
        let Some(slot) = self.open.get_mut(index) else {
            return (DeliveryFuture::failed(ClientError::Closed), wake);
        };
        let batch = slot.get_or_insert_with(|| {
            wake = true;
            Batch::new(Arc::clone(&record.topic), partition, shared, size)
        });
        push_record(
            &mut batch.builder,
            record.timestamp.unwrap_or_else(now_ms),
            (record.key.as_deref(), record.value.as_deref()),
            &record.headers,
        );
        let index = batch.resolver.records;
        batch.resolver.records += 1;
        let delivery = DeliveryFuture(Delivery::Pending {
            fate: Arc::clone(&batch.resolver.fate),
            index,
        });
        if batch.builder.uncompressed_bytes() >= config.batch_bytes {
            self.seal(partition, sealed);
            wake = true;
        }
        (delivery, wake)
    }

    /// Moves a partition's open batch to `sealed`.
    fn seal(&mut self, partition: u32, sealed: &mut Vec<Batch>) {
        let Some(batch) = self.open.get_mut(partition as usize).and_then(Option::take) else {
            return;
        };
        // A sealed unkeyed batch moves the sticky partition on (KIP-480).
        let n = self.partitions;
        if self.sticky == Some(partition) && n > 1 {
            self.sticky = Some((partition + 1 + rand::rng().random_range(0..n - 1)) % n);
        }
        sealed.push(batch);
    }
}

impl Accumulator {
    fn open_batches(&self) -> impl Iterator<Item = &Batch> {
        self.topics
            .values()
            .flat_map(|t| t.open.iter().filter_map(Option::as_ref))
    }

    /// Seals the open batches `due` picks.
    fn seal_where(&mut self, due: impl Fn(&Batch) -> bool) {
        for topic in self.topics.values_mut() {
            for partition in 0..topic.open.len() as u32 {
                if topic
                    .open
                    .get(partition as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(&due)
                {
                    topic.seal(partition, &mut self.sealed);
                }
            }
        }
    }

    /// Seals a topic's partition's open batch, if any.
    fn seal(&mut self, topic: &str, partition: u32) {
        if let Some(state) = self.topics.get_mut(topic) {
            state.seal(partition, &mut self.sealed);
        }
    }
}

/// Sends records to Cairn.
#[derive(Debug)]
pub struct Producer {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// Most requests in flight for an idempotent producer: the batches a Cairn broker remembers per
/// producer and partition to recognise a retry. Apache Kafka remembers 5: through the Kafka
/// dialect to a Kafka broker, keep `max_in_flight` at 5 or below.
pub const IN_FLIGHT_MAX: usize = 16;

impl Producer {
    /// Connects to a cluster through `bootstrap` (one or more `host:port`, comma-separated):
    /// each partition's batches go to its leader.
    pub async fn connect(bootstrap: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let cluster =
            Cluster::connect_tls(bootstrap, &config.client_id, config.tls.clone()).await?;
        Producer::with_cluster(cluster, config)
    }

    /// A producer over an existing connection (for example an embedded broker's): every batch
    /// goes through it.
    pub fn with_connection(
        conn: Connection,
        config: ProducerConfig,
    ) -> Result<Producer, ClientError> {
        Producer::with_cluster(Cluster::with_connection(conn), config)
    }

    /// A producer routing through `cluster`.
    pub fn with_cluster(cluster: Cluster, config: ProducerConfig) -> Result<Producer, ClientError> {
        if config.batch_bytes == 0 || config.max_in_flight == 0 || config.buffer_records_max == 0 {
            return Err(ClientError::InvalidArgument(
                "batch_bytes, max_in_flight and buffer_records_max must be positive".into(),
            ));
        }
        if config.idempotent && config.acks == Acks::All && config.max_in_flight > IN_FLIGHT_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "an idempotent producer allows at most {IN_FLIGHT_MAX} requests in flight \
                 (max_in_flight is {}); set idempotent: false for more",
                config.max_in_flight
            )));
        }
        let shared = Arc::new(Shared {
            room: Arc::new(Room {
                buffered: AtomicUsize::new(0),
                freed: Notify::new(),
                max: config.buffer_records_max,
            }),
            config,
            cluster,
            acc: Mutex::default(),
            work: Notify::new(),
            buffers: Mutex::default(),
        });
        let task = tokio::spawn(Sender::new(Arc::clone(&shared)).run());
        Ok(Producer {
            shared,
            task: Some(task),
        })
    }

    fn check_open(&self) -> Result<(), ClientError> {
        match &self.task {
            Some(task) if !task.is_finished() => Ok(()),
            _ => Err(ClientError::Closed),
        }
    }

    /// Queues a record; the returned future resolves when it is acknowledged. Waits if
    /// `buffer_records_max` records are already queued.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture, ClientError> {
        self.check_open()?;
        let shared = &self.shared;
        shared.room.take(1).await;
        loop {
            let appended = {
                let mut guard = shared.lock();
                let acc = &mut *guard;
                match acc.topics.get_mut(&*record.topic) {
                    Some(topic) if !topic.stale => topic
                        .choose_partition(&record, shared.config.partitioner, &mut acc.round_robin)
                        .map(|partition| topic.append(shared, &mut acc.sealed, &record, partition))
                        .map_err(Some),
                    _ => Err(None),
                }
            };
            match appended {
                Ok((delivery, wake)) => {
                    if wake {
                        shared.work.notify_one();
                    }
                    return Ok(delivery);
                }
                Err(Some(err)) => {
                    shared.room.release(1);
                    return Ok(DeliveryFuture::failed(err));
                }
                // The topic's partition count is not known yet: asked, then appended.
                Err(None) => {
                    if let Err(err) = shared.partition_count(&record.topic).await {
                        shared.room.release(1);
                        return Ok(DeliveryFuture::failed(err));
                    }
                }
            }
        }
    }

    /// Sends `records` to one partition as one batch (one future for all of them; they get
    /// consecutive offsets). Records already queued for the partition go first. The values are
    /// not copied before they are encoded into the batch. Fails with `InvalidArgument` if
    /// `records` is empty, the partition does not exist, or the encoded batch exceeds
    /// `request_bytes_max`.
    pub async fn send_batch(
        &self,
        topic: &str,
        partition: u32,
        records: &[BatchRecord],
    ) -> Result<BatchFuture, ClientError> {
        self.check_open()?;
        let shared = &self.shared;
        let n_partitions = shared.partition_count(topic).await?;
        if partition >= n_partitions {
            return Err(ClientError::InvalidArgument(format!(
                "partition {partition} of {topic} does not exist ({n_partitions} partitions)"
            )));
        }
        let n = u32::try_from(records.len())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!(
                    "a batch holds 1 to {} records, not {}",
                    u32::MAX,
                    records.len()
                ))
            })?;
        let size: usize = records
            .iter()
            .map(|r| record_bytes(r.key.as_deref(), r.value.as_deref(), &r.headers))
            .sum();
        let mut batch = Batch::new(Arc::from(topic), partition, shared, size);
        let now = now_ms();
        for record in records {
            push_record(
                &mut batch.builder,
                record.timestamp.unwrap_or(now),
                (record.key.as_deref(), record.value.as_deref()),
                &record.headers,
            );
        }
        if batch.builder.uncompressed_bytes() > shared.config.request_bytes_max {
            return Err(ClientError::InvalidArgument(format!(
                "a batch of {} bytes exceeds request_bytes_max ({}); send it in parts",
                batch.builder.uncompressed_bytes(),
                shared.config.request_bytes_max
            )));
        }
        shared.room.take(n as usize).await;
        batch.resolver.records = n;
        let fate = Arc::clone(&batch.resolver.fate);
        {
            let mut acc = shared.lock();
            acc.seal(topic, partition);
            acc.sealed.push(batch);
        }
        shared.work.notify_one();
        Ok(BatchFuture { fate, records: n })
    }

    /// Sends everything queued now, without waiting for `linger`, and waits until it is
    /// acknowledged or failed.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.check_open()?;
        let (tx, rx) = oneshot::channel();
        {
            let mut acc = self.shared.lock();
            acc.seal_where(|_| true);
            acc.flushes.push(tx);
        }
        self.shared.work.notify_one();
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Flushes and stops.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.stop();
        match self.task.take() {
            Some(task) => task.await.map_err(|_| ClientError::Closed),
            None => Ok(()),
        }
    }

    /// Tells the sender to finish what is queued and end.
    fn stop(&self) {
        {
            let mut acc = self.shared.lock();
            acc.seal_where(|_| true);
            acc.closing = true;
        }
        self.shared.work.notify_one();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A batch being filled, or sealed and waiting for the sender.
struct Batch {
    builder: BatchBuilder,
    /// Its records' fate (which names its topic and partition), and how many it holds.
    resolver: Resolver,
    created: Instant,
}

impl Batch {
    /// An empty batch with room for at least its first record (see [`Shared::buffer`]).
    fn new(topic: Arc<str>, partition: u32, shared: &Shared, first_record: usize) -> Batch {
        let capacity = first_record + BATCH_HEADER_BYTES;
        Batch {
            resolver: Resolver::new(topic, partition, &shared.room),
            builder: BatchBuilder::with_buffer(shared.config.compression, shared.buffer(capacity)),
            created: Instant::now(),
        }
    }
}

/// An idempotent batch's place in its producer's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    /// The producer id and epoch it carries.
    id: (i64, i16),
    /// Its first sequence, not wrapped (the wire carries it modulo 2^31).
    seq: u64,
}

struct Ready {
    topic: Arc<str>,
    partition: u32,
    bytes: Bytes,
    resolver: Resolver,
    attempts: u32,
    not_before: Instant,
    /// Seal order (over every partition): a partition's batches keep it in the queue.
    ordinal: u64,
    /// Set when the batch carries an idempotent producer's id and sequence.
    stamp: Option<Stamp>,
}

impl Ready {
    fn n_records(&self) -> u64 {
        u64::from(self.resolver.records)
    }
}

type AskId = Pin<Box<dyn Future<Output = Result<(i64, i16), ClientError>> + Send>>;

/// An idempotent producer's identity and numbering.
#[derive(Default)]
struct Idempotence {
    /// The producer id and epoch, once a broker gave them.
    id: Option<(i64, i16)>,
    /// Per topic and partition under `id`: the next batch's first sequence, and the sequence after
    /// the last acknowledged batch.
    seqs: HashMap<String, HashMap<u32, Seqs>>,
    /// A batch failed for good: its sequence is a gap, so once nothing is in flight the epoch is
    /// bumped and the queued batches are renumbered.
    bump: bool,
    /// The InitProducerId request under way.
    asking: Option<AskId>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Seqs {
    next: u64,
    acked: u64,
}

impl Idempotence {
    fn seqs(&mut self, topic: &str, partition: u32) -> &mut Seqs {
        if !self.seqs.contains_key(topic) {
            self.seqs.insert(topic.to_string(), HashMap::new());
        }
        self.seqs
            .get_mut(topic)
            .map(|by_partition| by_partition.entry(partition).or_default())
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// The stamp for the next `n` records of a partition, if the producer has its id and is not
    /// about to renumber.
    fn next_stamp(&mut self, topic: &str, partition: u32, n: u64) -> Option<Stamp> {
        let id = self.id.filter(|_| !self.bump)?;
        let seqs = self.seqs(topic, partition);
        let seq = seqs.next;
        seqs.next += n;
        Some(Stamp { id, seq })
    }
}

/// A leader's connection, as `dispatch` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Usable {
    Open,
    /// Not open yet: being opened.
    Closed,
    /// It failed lately: the metadata is asked again.
    Avoided,
}

/// A partition's place in the request `dispatch` is building.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Its batches are in this run.
    Run(usize),
    /// A batch of it was left behind: the later ones wait too.
    Blocked,
}

/// The wire form of a sequence (Kafka's wraps at 2^31).
fn wire_seq(seq: u64) -> i32 {
    (seq % (1 << 31)) as i32
}

/// The broker a request went to, its runs of batches per partition, and the request's result.
type Sent = (
    u32,
    Vec<Vec<Ready>>,
    Result<Option<ProduceResponse>, ClientError>,
);
type InFlight = Pin<Box<dyn Future<Output = Sent> + Send>>;

/// Routing work: a topic's metadata refresh, or a connection to a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RoutingKey {
    Refresh(String),
    Connect(u32),
}

/// The task that numbers, encodes and sends sealed batches, retries, and resolves their fates.
struct Sender {
    shared: Arc<Shared>,
    /// A clone of `shared.cluster`, for brevity.
    cluster: Cluster,
    ready: VecDeque<Ready>,
    in_flight: FuturesUnordered<InFlight>,
    flushes: Vec<oneshot::Sender<()>>,
    /// Metadata refreshes and connections being opened, for batches waiting on them; each
    /// answers with its key.
    routing: FuturesUnordered<Pin<Box<dyn Future<Output = RoutingKey> + Send>>>,
    /// What `routing` is doing, so nothing is asked twice.
    routing_for: std::collections::HashSet<RoutingKey>,
    /// Set for an idempotent producer.
    idempotence: Option<Idempotence>,
    /// The next sealed batch's `Ready::ordinal`.
    next_ordinal: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Sender {
        let config = &shared.config;
        Sender {
            cluster: shared.cluster.clone(),
            ready: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            flushes: Vec::new(),
            routing: FuturesUnordered::new(),
            routing_for: std::collections::HashSet::new(),
            idempotence: (config.idempotent && config.acks == Acks::All).then(Idempotence::default),
            next_ordinal: 0,
            shared,
        }
    }

    async fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        loop {
            // What the callers sealed, asked and opened since the last look.
            let (sealed, closing, emptied, linger_until) = {
                let mut acc = shared.lock();
                self.flushes.append(&mut acc.flushes);
                let linger = shared.config.linger;
                (
                    std::mem::take(&mut acc.sealed),
                    acc.closing,
                    acc.open_batches().next().is_none(),
                    acc.open_batches().map(|b| b.created + linger).min(),
                )
            };
            for batch in sealed {
                self.seal(batch);
            }
            self.dispatch();
            if (!self.flushes.is_empty() || closing)
                && emptied
                && self.ready.is_empty()
                && self.in_flight.is_empty()
            {
                for flush in self.flushes.drain(..) {
                    let _ = flush.send(());
                }
                if closing {
                    return;
                }
            }
            let wake = self.next_wake(linger_until);
            tokio::select! {
                () = shared.work.notified() => {}
                Some((node, sent, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => self.complete(node, sent, result),
                Some(key) = self.routing.next(), if !self.routing.is_empty() => {
                    self.routing_for.remove(&key);
                }
                id = ask_id(&mut self.idempotence) => self.got_producer_id(id),
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    shared.lock().seal_where(|batch| batch.created + shared.config.linger <= now);
                }
            }
        }
    }

    /// When to wake without news: the first open batch's linger, or a retry's backoff.
    fn next_wake(&self, linger_until: Option<Instant>) -> Instant {
        let now = Instant::now();
        // Batches waiting with nothing under way that would wake the sender (no request, no
        // routing answer, no producer id asked): a missed wake-up must not strand them, so look
        // again after a backoff.
        let nothing_pending = self.in_flight.is_empty()
            && self.routing.is_empty()
            && self
                .idempotence
                .as_ref()
                .is_none_or(|idem| idem.asking.is_none());
        let far = if nothing_pending && !self.ready.is_empty() {
            now + self.shared.config.retry_backoff
        } else {
            now + Duration::from_secs(3600)
        };
        // Only retries still backing off: a batch already due was offered to `dispatch` just
        // now and waits for something with its own wake-up (a routing answer, a request
        // completing, the producer id); waking for it would spin.
        let retry = self
            .ready
            .iter()
            .map(|r| r.not_before)
            .filter(|at| *at > now)
            .min()
            .unwrap_or(far);
        linger_until.unwrap_or(far).min(retry)
    }

    /// Numbers (if idempotent) and encodes a sealed batch, and queues it.
    fn seal(&mut self, batch: Batch) {
        let Batch {
            builder, resolver, ..
        } = batch;
        let (topic, partition) = (Arc::clone(&resolver.fate.topic), resolver.fate.partition);
        let n = u64::from(resolver.records);
        let stamp = self
            .idempotence
            .as_mut()
            .and_then(|idem| idem.next_stamp(&topic, partition, n));
        let builder = match stamp {
            Some(Stamp { id, seq }) => builder.producer(id.0, id.1, wire_seq(seq)),
            None => builder,
        };
        match builder.build() {
            Ok(bytes) => {
                self.ready.push_back(Ready {
                    topic,
                    partition,
                    bytes,
                    resolver,
                    attempts: 0,
                    not_before: Instant::now(),
                    ordinal: self.next_ordinal,
                    stamp,
                });
                self.next_ordinal += 1;
            }
            Err(err) => {
                // The numbers it took are handed back: no gap.
                if let (Some(idem), Some(_)) = (self.idempotence.as_mut(), stamp) {
                    idem.seqs(&topic, partition).next -= n;
                }
                resolver.resolve(Err(ClientError::InvalidArgument(format!(
                    "building a batch: {err}"
                ))));
            }
        }
    }

    /// Sends ready batches while requests may be added. A request goes to one broker and
    /// carries, per partition it leads, a run of consecutive ready batches, at most
    /// `request_bytes_max` in all (Kafka's `max.request.size`), so batches that became ready
    /// while earlier requests waited (for example for an fsync) share the next append and sync.
    /// A batch whose leader is not known, or whose leader's connection is not open yet, waits
    /// while that is found out. Linear in the ready batches looked at.
    fn dispatch(&mut self) {
        if !self.numbering_ready() {
            return;
        }
        let one_batch_per_partition = self.idempotence.is_some();
        let request_max = self.shared.config.request_bytes_max;
        let now = Instant::now();
        while self.in_flight.len() < self.shared.config.max_in_flight {
            // Runs by partition, in the order their first batch was taken; per partition its
            // run, or that a batch of it was left behind (its later batches wait too: order).
            let mut runs: Vec<(u32, Vec<Ready>)> = Vec::new();
            let mut slots: HashMap<(Arc<str>, u32), Slot> = HashMap::new();
            // Each leader's connection, looked at once per pass.
            let mut usable: Vec<(u32, Usable)> = Vec::new();
            let mut rest: VecDeque<Ready> = VecDeque::new();
            let mut target: Option<u32> = None;
            let mut request_bytes = 0usize;
            while let Some(ready) = self.ready.pop_front() {
                if request_bytes >= request_max {
                    // Full: the rest waits for the next request, in its order.
                    self.ready.push_front(ready);
                    break;
                }
                let slot = slots.entry((Arc::clone(&ready.topic), ready.partition));
                let found = match &slot {
                    std::collections::hash_map::Entry::Occupied(o) => Some(*o.get()),
                    std::collections::hash_map::Entry::Vacant(_) => None,
                };
                let leader = if found == Some(Slot::Blocked) || ready.not_before > now {
                    None
                } else {
                    self.leader_of(&ready.topic, ready.partition, &mut usable)
                };
                // One request goes to one broker: the first ready batch's leader. A batch joins
                // its partition's run if idempotence allows (one batch per partition) and the
                // request has room (a first batch always goes, even if larger).
                let len = ready.bytes.len();
                let fits = request_bytes == 0 || request_bytes + len <= request_max;
                let joins = match (leader, found) {
                    (Some(node), _) if target.is_some_and(|t| t != node) => None,
                    (Some(_), Some(_)) if one_batch_per_partition || !fits => None,
                    (Some(_), None) if !fits => None,
                    (Some(node), found) => Some((node, found)),
                    (None, _) => None,
                };
                match joins {
                    Some((node, Some(Slot::Run(i)))) => {
                        target = Some(node);
                        request_bytes += len;
                        if let Some((_, run)) = runs.get_mut(i) {
                            run.push(ready);
                        }
                    }
                    Some((node, _)) => {
                        target = Some(node);
                        request_bytes += len;
                        slot.insert_entry(Slot::Run(runs.len()));
                        runs.push((node, vec![ready]));
                    }
                    None => {
                        slot.insert_entry(Slot::Blocked);
                        rest.push_back(ready);
                    }
                }
            }
            // What was left behind goes back ahead of what was not looked at.
            while let Some(ready) = rest.pop_back() {
                self.ready.push_front(ready);
            }
            let Some(node) = target else {
                return;
            };
            let Some(conn) = self.cluster.cached(node) else {
                // Dropped since leader_of saw it open (a metadata refresh on another task that
                // no longer lists the broker, or a failure): opened again in the background, and
                // the runs wait for it. (Before, nothing woke them: with no other send coming,
                // a producer kept 32 sends unresolved for 77 s until it was closed.)
                self.open_connection(node);
                for (_, run) in runs.into_iter().rev() {
                    for ready in run.into_iter().rev() {
                        self.ready.push_front(ready);
                    }
                }
                return;
            };
            let runs: Vec<Vec<Ready>> = runs.into_iter().map(|(_, run)| run).collect();
            let mut topics: Vec<ProduceTopic> = Vec::new();
            for run in &runs {
                let Some(first) = run.first() else { continue };
                let records = match run.as_slice() {
                    [only] => only.bytes.clone(),
                    many => {
                        let mut joined =
                            BytesMut::with_capacity(many.iter().map(|r| r.bytes.len()).sum());
                        for ready in many {
                            joined.extend_from_slice(&ready.bytes);
                        }
                        joined.freeze()
                    }
                };
                let part = ProducePartition {
                    partition: first.partition,
                    records,
                };
                match topics.iter_mut().find(|t| *t.name == *first.topic) {
                    Some(topic) => topic.partitions.push(part),
                    None => topics.push(ProduceTopic {
                        name: first.topic.to_string(),
                        partitions: vec![part],
                    }),
                }
            }
            let acks = self.shared.config.acks;
            let request = Request::Produce(ProduceRequest {
                acks: acks.wire(),
                timeout_ms: self
                    .shared
                    .config
                    .request_timeout
                    .as_millis()
                    .min(u32::MAX as u128) as u32,
                topics,
            });
            // The broker answers by `timeout_ms` itself (REQUEST_TIMED_OUT); a second more is
            // for the network. Past that the broker is down or paused: its connection goes.
            let deadline = self.shared.config.request_timeout + Duration::from_secs(1);
            // Submitted now, in dispatch order: the broker applies requests in that order.
            let future: InFlight = match acks {
                Acks::None => {
                    let sent = conn.send_only(&request);
                    Box::pin(async move { (node, runs, sent.await.map(|()| None)) })
                }
                _ => {
                    let response = conn.call::<ProduceResponse>(&request);
                    Box::pin(async move {
                        let result = match tokio::time::timeout(deadline, response).await {
                            Ok(result) => result.map(Some),
                            Err(_) => Err(ClientError::Timeout("produce".into())),
                        };
                        (node, runs, result)
                    })
                }
            };
            self.in_flight.push(future);
        }
    }

    /// Whether batches may be sent: an idempotent producer needs its id first, and renumbers
    /// under a new epoch only once nothing is in flight (so no batch of the old numbering can
    /// land after one of the new). Starts asking for the id when it is needed.
    fn numbering_ready(&mut self) -> bool {
        let Some(idem) = self.idempotence.as_mut() else {
            return true;
        };
        if idem.id.is_some() && !idem.bump {
            return true;
        }
        if idem.asking.is_none() && self.in_flight.is_empty() && !self.ready.is_empty() {
            let current = idem.id.filter(|_| idem.bump);
            idem.asking = Some(ask_producer_id(
                self.cluster.clone(),
                current,
                self.shared.config.retry_backoff,
                self.shared.config.request_timeout,
            ));
        }
        false
    }

    /// The answer to InitProducerId: every queued batch is numbered under the new id, in queue
    /// order (which is each partition's order); nothing is in flight.
    fn got_producer_id(&mut self, result: Result<(i64, i16), ClientError>) {
        let Some(idem) = self.idempotence.as_mut() else {
            return;
        };
        idem.asking = None;
        let id = match result {
            Ok(id) => id,
            Err(err) if err.is_retriable() => {
                // Asked again at the next dispatch (the request already waited a backoff).
                tracing::debug!(error = %err, "no producer id yet");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot get a producer id");
                for ready in std::mem::take(&mut self.ready) {
                    ready.resolver.resolve(Err(err.clone()));
                }
                return;
            }
        };
        tracing::debug!(
            producer_id = id.0,
            epoch = id.1,
            "idempotent producer numbering"
        );
        idem.id = Some(id);
        idem.bump = false;
        idem.seqs.clear();
        for ready in &mut self.ready {
            let stamp = idem.next_stamp(&ready.topic, ready.partition, ready.n_records());
            if let Some(stamp) = stamp {
                let mut bytes = BytesMut::from(&ready.bytes[..]);
                let (pid, epoch) = stamp.id;
                match restamp_producer(&mut bytes, pid, epoch, wire_seq(stamp.seq)) {
                    Ok(()) => {
                        ready.bytes = bytes.freeze();
                        ready.stamp = Some(stamp);
                    }
                    // A batch this producer built always has its header.
                    Err(err) => tracing::error!(error = %err, "cannot number a batch"),
                }
            }
        }
    }

    /// Opens the connection to `node` in the background (once), waking the sender when done.
    fn open_connection(&mut self, node: u32) {
        let key = RoutingKey::Connect(node);
        if self.routing_for.insert(key.clone()) {
            let cluster = self.cluster.clone();
            let backoff = self.shared.config.retry_backoff;
            self.routing.push(Box::pin(async move {
                if let Err(err) = cluster.connection(node).await {
                    tracing::debug!(node, error = %err, "cannot connect to a leader");
                    // A broker that just died: its metadata will change; look again.
                    cluster.forget(node);
                    tokio::time::sleep(backoff).await;
                }
                key
            }));
        }
    }

    /// The leader of a partition if it is known and its connection open; otherwise starts
    /// finding out (a metadata refresh, or opening the connection) and answers `None`.
    /// `usable` remembers, within one dispatch pass, what each leader's connection was.
    fn leader_of(
        &mut self,
        topic: &str,
        partition: u32,
        usable: &mut Vec<(u32, Usable)>,
    ) -> Option<u32> {
        let leader = self
            .cluster
            .route(topic, partition)
            .and_then(|route| route.leader);
        let state = leader.map(|node| match usable.iter().find(|(n, _)| *n == node) {
            Some((_, state)) => *state,
            None => {
                let state = if self.cluster.avoid(node) {
                    Usable::Avoided
                } else if self.cluster.cached(node).is_some() {
                    Usable::Open
                } else {
                    Usable::Closed
                };
                usable.push((node, state));
                state
            }
        });
        match (leader, state) {
            (Some(node), Some(Usable::Open)) => Some(node),
            (Some(node), Some(Usable::Closed)) => {
                self.open_connection(node);
                None
            }
            _ => {
                let key = RoutingKey::Refresh(topic.to_string());
                if self.routing_for.insert(key.clone()) {
                    let (cluster, topic) = (self.cluster.clone(), topic.to_string());
                    let backoff = self.shared.config.retry_backoff;
                    self.routing.push(Box::pin(async move {
                        let refreshed = cluster.refresh(std::slice::from_ref(&topic)).await;
                        if let Err(err) = &refreshed {
                            tracing::debug!(error = %err, "metadata refresh failed");
                        }
                        // Still no leader (an election under way), a leader that just failed
                        // to answer, or no answer: ask again after a backoff, not in a tight
                        // loop.
                        let usable = cluster
                            .route(&topic, partition)
                            .and_then(|route| route.leader)
                            .is_some_and(|node| !cluster.avoid(node));
                        if refreshed.is_err() || !usable {
                            tokio::time::sleep(backoff).await;
                        }
                        key
                    }));
                }
                None
            }
        }
    }

    fn complete(
        &mut self,
        node: u32,
        sent: Vec<Vec<Ready>>,
        result: Result<Option<ProduceResponse>, ClientError>,
    ) {
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                if matches!(
                    err,
                    ClientError::Connection { .. } | ClientError::Timeout(_)
                ) {
                    self.cluster.forget(node);
                }
                for run in sent {
                    self.retry_or_fail_run(run, &err);
                }
                return;
            }
        };
        // Each partition's answer, looked up by hash: a request may carry thousands.
        let answers: HashMap<(&str, u32), &ProducePartitionResponse> = response
            .iter()
            .flat_map(|r| r.topics.iter())
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| ((t.name.as_str(), p.partition), p))
            })
            .collect();
        for run in sent {
            let Some(first) = run.first() else { continue };
            let (topic, partition) = (first.topic.clone(), first.partition);
            if response.is_none() {
                // acks=0: sent is all we know.
                for ready in run {
                    ready.resolver.resolve(Ok(None));
                }
                continue;
            }
            let found = answers.get(&(&*topic, partition)).copied();
            match found {
                Some(p) if p.error_code == 0 => {
                    // The run's batches were appended back to back: offsets follow one another.
                    let mut offset = p.base_offset;
                    for ready in run {
                        if let (Some(idem), Some(stamp)) = (self.idempotence.as_mut(), ready.stamp)
                            && idem.id == Some(stamp.id)
                        {
                            let seqs = idem.seqs(&topic, partition);
                            seqs.acked = seqs.acked.max(stamp.seq + ready.n_records());
                        }
                        let n = ready.n_records();
                        ready.resolver.resolve(Ok(Some(offset)));
                        self.shared.recycle(ready.bytes);
                        offset += n;
                    }
                }
                Some(p) => {
                    let err = ClientError::broker(
                        format!("produce to {topic}-{partition}"),
                        p.error_code,
                        p.error_message.clone(),
                    );
                    self.retry_or_fail_run(run, &err);
                }
                None => {
                    let err = ClientError::InvalidArgument(format!(
                        "{topic}-{partition} missing from the produce response"
                    ));
                    self.retry_or_fail_run(run, &err);
                }
            }
        }
    }

    fn retry_or_fail_run(&mut self, run: Vec<Ready>, err: &ClientError) {
        for ready in run {
            self.retry_or_fail(ready, err.clone());
        }
    }

    /// Puts a batch back in the queue ahead of every other batch, except its partition's earlier
    /// ones: a partition's batches stay in seal order.
    fn requeue(&mut self, ready: Ready) {
        let same = |r: &Ready| r.topic == ready.topic && r.partition == ready.partition;
        let at = match self
            .ready
            .iter()
            .position(|r| same(r) && r.ordinal > ready.ordinal)
        {
            Some(later) => later,
            None => self.ready.iter().rposition(same).map_or(0, |last| last + 1),
        };
        self.ready.insert(at, ready);
    }

    fn retry_or_fail(&mut self, mut ready: Ready, err: ClientError) {
        if err.code() == Some(ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER)
            && let (Some(idem), Some(stamp)) = (self.idempotence.as_mut(), ready.stamp)
            && idem.id == Some(stamp.id)
        {
            let acked = idem.seqs(&ready.topic, ready.partition).acked;
            if stamp.seq < acked {
                // A later batch of this numbering was acknowledged, so the leader has moved
                // past this one, which it no longer remembers among the last batches it keeps:
                // most likely it was written and its answer lost, but a leader that lost the
                // producer's state takes any sequence, so that is not certain. Its outcome is
                // unknown: reported as such, never sent again (under a new epoch it could be
                // written twice), and the numbering goes on (nothing is missing from it).
                tracing::debug!(topic = %ready.topic, partition = ready.partition, "a retried batch's outcome is unknown");
                let unknown = ClientError::broker(
                    format!("produce to {}-{}", ready.topic, ready.partition),
                    ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER.0,
                    "outcome unknown: the leader no longer remembers this retried batch and \
                     took later ones (it was most likely written)"
                        .to_string(),
                );
                ready.resolver.resolve(Err(unknown));
                return;
            }
            if stamp.seq > acked {
                // An earlier batch of the partition is still on its way (retried after a leader
                // change): this one goes again after it, without spending an attempt.
                ready.not_before = Instant::now() + jitter(self.shared.config.retry_backoff);
            } else {
                // The leader refuses the very batch it should take next: it does not know the
                // batches before it (its producer state is gone: an unclean election, or
                // expired): renumber under a new epoch.
                tracing::debug!(topic = %ready.topic, partition = ready.partition, error = %err, "renumbering");
                idem.bump = true;
            }
            self.requeue(ready);
            return;
        }
        if err.is_retriable() && ready.attempts < self.shared.config.retries {
            let backoff = self
                .shared
                .config
                .retry_backoff
                .saturating_mul(1 << ready.attempts.min(16))
                .min(self.shared.config.retry_backoff_max);
            ready.attempts += 1;
            ready.not_before = Instant::now() + jitter(backoff);
            tracing::debug!(topic = %ready.topic, partition = ready.partition, attempt = ready.attempts, error = %err, "retrying batch");
            if err.code() == Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)
                && let Some(topic) = self.shared.lock().topics.get_mut(&*ready.topic)
            {
                topic.stale = true;
            }
            if err.is_stale_metadata() {
                self.cluster.invalidate(&ready.topic);
            }
            self.requeue(ready);
        } else {
            // A gap in the numbering: later batches would be refused as out of sequence.
            if let (Some(idem), Some(_)) = (self.idempotence.as_mut(), ready.stamp) {
                idem.bump = true;
            }
            ready.resolver.resolve(Err(err));
        }
    }
}

/// Waits for the InitProducerId answer under way, if any (never resolves otherwise).
async fn ask_id(idempotence: &mut Option<Idempotence>) -> Result<(i64, i16), ClientError> {
    match idempotence.as_mut().and_then(|idem| idem.asking.as_mut()) {
        Some(asking) => asking.await,
        None => std::future::pending().await,
    }
}

/// Asks any broker for a producer id (`current`: the next epoch of that one). A failure waits a
/// backoff before it is reported, so asking again is not a tight loop.
fn ask_producer_id(
    cluster: Cluster,
    current: Option<(i64, i16)>,
    backoff: Duration,
    timeout: Duration,
) -> AskId {
    Box::pin(async move {
        let (producer_id, producer_epoch) = current.unwrap_or((-1, -1));
        let request = Request::InitProducerId(InitProducerIdRequest {
            producer_id,
            producer_epoch,
        });
        let result = async {
            let response: InitProducerIdResponse = cluster.call_any(&request, timeout).await?;
            if response.error_code != 0 {
                return Err(ClientError::broker(
                    "InitProducerId",
                    response.error_code,
                    response.error_message,
                ));
            }
            Ok((response.producer_id, response.producer_epoch))
        }
        .await;
        if result.is_err() {
            tokio::time::sleep(jitter(backoff)).await;
        }
        result
    })
}

/// `base` scaled by a random factor in [0.5, 1.5): retries from many producers spread out.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}
