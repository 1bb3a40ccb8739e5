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
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cairn_protocol::batch::{BatchBuilder, Compression, restamp_producer};
use cairn_protocol::native::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::Cluster;
use crate::cluster::Route;
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
        }
    }
}

/// A record to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Destination topic.
    pub topic: String,
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
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
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
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset (`None` with `Acks::None`).
    pub offset: Option<u64>,
}

type Delivery = oneshot::Sender<Result<RecordMetadata, ClientError>>;

/// Resolves when the record is acknowledged (or failed for good).
#[derive(Debug)]
pub struct DeliveryFuture(oneshot::Receiver<Result<RecordMetadata, ClientError>>);

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

enum Command {
    Send(ProducerRecord, Delivery),
    Flush(oneshot::Sender<()>),
}

/// Sends records to Cairn.
#[derive(Debug)]
pub struct Producer {
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Send(..) => "Send",
            Command::Flush(_) => "Flush",
        })
    }
}

/// Most queued commands the sender takes in one go before dispatching.
const COMMANDS_PER_WAKE: usize = 1024;

/// Most requests in flight for an idempotent producer: the batches a Cairn broker remembers per
/// producer and partition to recognise a retry. Apache Kafka remembers 5: through the Kafka
/// dialect to a Kafka broker, keep `max_in_flight` at 5 or below.
pub const IN_FLIGHT_MAX: usize = 16;

impl Producer {
    /// Connects to a cluster through `bootstrap` (one or more `host:port`, comma-separated):
    /// each partition's batches go to its leader.
    pub async fn connect(bootstrap: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let cluster = Cluster::connect(bootstrap, &config.client_id).await?;
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
        let (commands, rx) = mpsc::channel(config.buffer_records_max);
        let task = tokio::spawn(Sender::new(cluster, config).run(rx));
        Ok(Producer { commands, task })
    }

    /// Queues a record; the returned future resolves when it is acknowledged. Waits if
    /// `buffer_records_max` records are already queued.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Send(record, tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(DeliveryFuture(rx))
    }

    /// Sends everything queued now, without waiting for `linger`, and waits until it is
    /// acknowledged or failed.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Flushes and stops.
    pub async fn close(self) -> Result<(), ClientError> {
        self.flush().await?;
        drop(self.commands);
        self.task.await.map_err(|_| ClientError::Closed)
    }
}

struct Batch {
    topic: String,
    partition: u32,
    builder: BatchBuilder,
    deliveries: Vec<Delivery>,
    created: Instant,
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
    topic: String,
    partition: u32,
    bytes: Bytes,
    deliveries: Vec<Delivery>,
    attempts: u32,
    not_before: Instant,
    /// Seal order (over every partition): a partition's batches keep it in the queue.
    ordinal: u64,
    /// Set when the batch carries an idempotent producer's id and sequence.
    stamp: Option<Stamp>,
}

impl Ready {
    fn n_records(&self) -> u64 {
        self.deliveries.len() as u64
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

struct Sender {
    cluster: Cluster,
    config: ProducerConfig,
    partitions: HashMap<String, u32>,
    sticky: HashMap<String, u32>,
    round_robin: PartitionerState,
    /// Open batches by topic, then partition: a record's lookup borrows its topic name.
    open: HashMap<String, HashMap<u32, Batch>>,
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
    fn new(cluster: Cluster, config: ProducerConfig) -> Sender {
        Sender {
            cluster,
            partitions: HashMap::new(),
            sticky: HashMap::new(),
            round_robin: PartitionerState::default(),
            open: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            flushes: Vec::new(),
            routing: FuturesUnordered::new(),
            routing_for: std::collections::HashSet::new(),
            idempotence: (config.idempotent && config.acks == Acks::All).then(Idempotence::default),
            config,
            next_ordinal: 0,
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut closing = false;
        loop {
            self.dispatch();
            if self.flushes.len() + usize::from(closing) > 0
                && self.open_batches().next().is_none()
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
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv(), if !closing => {
                    closing = self.handle(command).await;
                    // Take what else is queued before the next dispatch: the per-iteration work
                    // (clock reads, batch scans) is paid once per burst, not once per record.
                    for _ in 0..COMMANDS_PER_WAKE {
                        if closing {
                            break;
                        }
                        match commands.try_recv() {
                            Ok(command) => closing = self.handle(Some(command)).await,
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                closing = self.handle(None).await;
                            }
                        }
                    }
                },
                Some((node, sent, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => self.complete(node, sent, result),
                Some(key) = self.routing.next(), if !self.routing.is_empty() => {
                    self.routing_for.remove(&key);
                }
                id = ask_id(&mut self.idempotence) => self.got_producer_id(id),
                () = tokio::time::sleep_until(wake.into()) => self.seal_lingering(),
            }
        }
    }

    /// Handles one command; `None` (every handle dropped) starts closing. Returns whether the
    /// sender is closing.
    async fn handle(&mut self, command: Option<Command>) -> bool {
        match command {
            Some(Command::Send(record, delivery)) => {
                self.accept(record, delivery).await;
                false
            }
            Some(Command::Flush(done)) => {
                self.seal_all();
                self.flushes.push(done);
                false
            }
            None => {
                self.seal_all();
                true
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let linger = self
            .open_batches()
            .map(|b| b.created + self.config.linger)
            .min()
            .unwrap_or(far);
        // Only retries still backing off: a batch already due was offered to `dispatch` just
        // now and waits for something with its own wake-up (a routing answer, a request
        // completing, the producer id); waking for it would spin.
        let now = Instant::now();
        let retry = self
            .ready
            .iter()
            .map(|r| r.not_before)
            .filter(|at| *at > now)
            .min()
            .unwrap_or(far);
        linger.min(retry)
    }

    async fn partition_count(&mut self, topic: &str) -> Result<u32, ClientError> {
        if let Some(&n) = self.partitions.get(topic) {
            return Ok(n);
        }
        let mut backoff = self.config.retry_backoff;
        for attempt in 0..=self.config.retries {
            let response = self.cluster.metadata(&[topic.to_string()], true).await;
            let error = match response {
                Ok(metadata) => match metadata.topics.into_iter().find(|t| t.name == topic) {
                    Some(t) if t.error_code == 0 && !t.partitions.is_empty() => {
                        let n = t.partitions.len() as u32;
                        self.partitions.insert(topic.to_string(), n);
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

    async fn accept(&mut self, record: ProducerRecord, delivery: Delivery) {
        let n_partitions = match self.partition_count(&record.topic).await {
            Ok(n) => n,
            Err(err) => {
                let _ = delivery.send(Err(err));
                return;
            }
        };
        let partition = match (record.partition, &record.key, self.config.partitioner) {
            (Some(p), _, _) if p < n_partitions => p,
            (Some(p), _, _) => {
                let _ = delivery.send(Err(ClientError::InvalidArgument(format!(
                    "partition {p} of {} does not exist ({n_partitions} partitions)",
                    record.topic
                ))));
                return;
            }
            (None, Some(key), Partitioner::Murmur2Sticky) => partition_for_key(key, n_partitions),
            (None, None, Partitioner::Murmur2Sticky) => {
                match self.sticky.get(record.topic.as_str()) {
                    Some(&p) => p,
                    None => {
                        let p = rand::rng().random_range(0..n_partitions);
                        self.sticky.insert(record.topic.clone(), p);
                        p
                    }
                }
            }
            (None, _, Partitioner::RoundRobin) => self.round_robin.round_robin(n_partitions),
        };
        // No allocation when the partition already has an open batch (the common case).
        if !self.open.contains_key(record.topic.as_str()) {
            self.open.insert(record.topic.clone(), HashMap::new());
        }
        let compression = self.config.compression;
        let Some(batches) = self.open.get_mut(record.topic.as_str()) else {
            return;
        };
        let batch = batches.entry(partition).or_insert_with(|| Batch {
            topic: record.topic.clone(),
            partition,
            builder: BatchBuilder::new(compression),
            deliveries: Vec::new(),
            created: Instant::now(),
        });
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        batch.builder.push(
            record.timestamp.unwrap_or_else(now_ms),
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        batch.deliveries.push(delivery);
        if batch.builder.uncompressed_bytes() >= self.config.batch_bytes {
            self.seal(&record.topic, partition);
        }
    }

    /// The open batches, every topic and partition.
    fn open_batches(&self) -> impl Iterator<Item = &Batch> {
        self.open.values().flat_map(HashMap::values)
    }

    fn seal(&mut self, topic: &str, partition: u32) {
        let Some(batch) = self
            .open
            .get_mut(topic)
            .and_then(|batches| batches.remove(&partition))
        else {
            return;
        };
        // A sealed unkeyed batch moves the sticky partition on (KIP-480).
        if self.sticky.get(&batch.topic) == Some(&batch.partition)
            && let Some(&n) = self.partitions.get(&batch.topic)
            && n > 1
        {
            let next = (batch.partition + 1 + rand::rng().random_range(0..n - 1)) % n;
            self.sticky.insert(batch.topic.clone(), next);
        }
        let n = batch.deliveries.len() as u64;
        let stamp = self
            .idempotence
            .as_mut()
            .and_then(|idem| idem.next_stamp(&batch.topic, batch.partition, n));
        let builder = match stamp {
            Some(Stamp { id, seq }) => batch.builder.producer(id.0, id.1, wire_seq(seq)),
            None => batch.builder,
        };
        match builder.build() {
            Ok(bytes) => {
                self.ready.push_back(Ready {
                    topic: batch.topic,
                    partition: batch.partition,
                    bytes,
                    deliveries: batch.deliveries,
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
                    idem.seqs(&batch.topic, batch.partition).next -= n;
                }
                for delivery in batch.deliveries {
                    let _ = delivery.send(Err(ClientError::InvalidArgument(format!(
                        "building a batch: {err}"
                    ))));
                }
            }
        }
    }

    fn seal_all(&mut self) {
        self.seal_where(|_| true);
    }

    fn seal_lingering(&mut self) {
        let (now, linger) = (Instant::now(), self.config.linger);
        self.seal_where(|batch| batch.created + linger <= now);
    }

    fn seal_where(&mut self, due: impl Fn(&Batch) -> bool) {
        let keys: Vec<(String, u32)> = self
            .open_batches()
            .filter(|b| due(b))
            .map(|b| (b.topic.clone(), b.partition))
            .collect();
        for (topic, partition) in keys {
            self.seal(&topic, partition);
        }
    }

    /// Sends ready batches while requests may be added. A request goes to one broker and
    /// carries, per partition it leads, a run of consecutive ready batches (up to
    /// `request_bytes_max`), so batches that became ready while earlier requests waited (for
    /// example for an fsync) share the next append and sync. A batch whose leader is not known,
    /// or whose leader's connection is not open yet, waits while that is found out.
    fn dispatch(&mut self) {
        if !self.numbering_ready() {
            return;
        }
        let one_batch_per_partition = self.idempotence.is_some();
        let now = Instant::now();
        while self.in_flight.len() < self.config.max_in_flight {
            // Runs by leader.
            let mut runs: Vec<(u32, Vec<Ready>)> = Vec::new();
            let mut rest: VecDeque<Ready> = VecDeque::new();
            let mut target: Option<u32> = None;
            while let Some(ready) = self.ready.pop_front() {
                let same = |r: &Ready| r.topic == ready.topic && r.partition == ready.partition;
                // A partition's batches go in order: nothing may jump an earlier one left behind.
                let blocked = rest.iter().any(same) || ready.not_before > now;
                let leader = if blocked {
                    None
                } else {
                    self.leader_of(&ready.topic, ready.partition)
                };
                // One request goes to one broker: the first ready batch's leader.
                let node = match leader {
                    Some(node) if target.is_none_or(|t| t == node) => node,
                    _ => {
                        rest.push_back(ready);
                        continue;
                    }
                };
                target = Some(node);
                let run = runs
                    .iter_mut()
                    .find(|(_, run)| run.first().is_some_and(same));
                let fits = |run: &Vec<Ready>| {
                    !one_batch_per_partition
                        && run.iter().map(|r| r.bytes.len()).sum::<usize>() + ready.bytes.len()
                            <= self.config.request_bytes_max
                };
                match run {
                    Some((_, run)) if fits(run) => run.push(ready),
                    Some(_) => rest.push_back(ready),
                    None => runs.push((node, vec![ready])),
                }
            }
            self.ready = rest;
            let Some(node) = target else {
                return;
            };
            let Some(conn) = self.cluster.cached(node) else {
                // Opened in the background (leader_of asked for it); the runs wait.
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
                match topics.iter_mut().find(|t| t.name == first.topic) {
                    Some(topic) => topic.partitions.push(part),
                    None => topics.push(ProduceTopic {
                        name: first.topic.clone(),
                        partitions: vec![part],
                    }),
                }
            }
            let acks = self.config.acks;
            let request = Request::Produce(ProduceRequest {
                acks: acks.wire(),
                timeout_ms: self
                    .config
                    .request_timeout
                    .as_millis()
                    .min(u32::MAX as u128) as u32,
                topics,
            });
            // The broker answers by `timeout_ms` itself (REQUEST_TIMED_OUT); a second more is
            // for the network. Past that the broker is down or paused: its connection goes.
            let deadline = self.config.request_timeout + Duration::from_secs(1);
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
                self.config.retry_backoff,
                self.config.request_timeout,
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
                    for delivery in ready.deliveries {
                        let _ = delivery.send(Err(err.clone()));
                    }
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

    /// The leader of a partition if it is known and its connection open; otherwise starts
    /// finding out (a metadata refresh, or opening the connection) and answers `None`.
    fn leader_of(&mut self, topic: &str, partition: u32) -> Option<u32> {
        match self.cluster.route(topic, partition) {
            Some(Route {
                leader: Some(node), ..
            }) if !self.cluster.avoid(node) => {
                if self.cluster.cached(node).is_some() {
                    return Some(node);
                }
                let key = RoutingKey::Connect(node);
                if self.routing_for.insert(key.clone()) {
                    let cluster = self.cluster.clone();
                    let backoff = self.config.retry_backoff;
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
                None
            }
            _ => {
                let key = RoutingKey::Refresh(topic.to_string());
                if self.routing_for.insert(key.clone()) {
                    let (cluster, topic) = (self.cluster.clone(), topic.to_string());
                    let backoff = self.config.retry_backoff;
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
        for run in sent {
            let Some(first) = run.first() else { continue };
            let (topic, partition) = (first.topic.clone(), first.partition);
            let Some(response) = &response else {
                // acks=0: sent is all we know.
                for ready in run {
                    for delivery in ready.deliveries {
                        let _ = delivery.send(Ok(RecordMetadata {
                            topic: topic.clone(),
                            partition,
                            offset: None,
                        }));
                    }
                }
                continue;
            };
            let found = response
                .topics
                .iter()
                .filter(|t| t.name == topic)
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == partition);
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
                        for delivery in ready.deliveries {
                            let _ = delivery.send(Ok(RecordMetadata {
                                topic: topic.clone(),
                                partition,
                                offset: Some(offset),
                            }));
                            offset += 1;
                        }
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
                for delivery in ready.deliveries {
                    let _ = delivery.send(Err(unknown.clone()));
                }
                return;
            }
            if stamp.seq > acked {
                // An earlier batch of the partition is still on its way (retried after a leader
                // change): this one goes again after it, without spending an attempt.
                ready.not_before = Instant::now() + jitter(self.config.retry_backoff);
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
        if err.is_retriable() && ready.attempts < self.config.retries {
            let backoff = self
                .config
                .retry_backoff
                .saturating_mul(1 << ready.attempts.min(16))
                .min(self.config.retry_backoff_max);
            ready.attempts += 1;
            ready.not_before = Instant::now() + jitter(backoff);
            tracing::debug!(topic = %ready.topic, partition = ready.partition, attempt = ready.attempts, error = %err, "retrying batch");
            if err.code() == Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION) {
                self.partitions.remove(&ready.topic);
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
            for delivery in ready.deliveries {
                let _ = delivery.send(Err(err.clone()));
            }
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
