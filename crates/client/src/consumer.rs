//! Reading assigned partitions from chosen positions, with one fetch prefetched.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_protocol::batch::Batches;
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use cairn_protocol::native::*;
use tokio::task::JoinHandle;

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
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            client_id: "cairn-consumer".into(),
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_max_bytes: 50 * 1024 * 1024,
            partition_max_bytes: 1024 * 1024,
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

/// Reads records from assigned partitions.
#[derive(Debug)]
pub struct Consumer {
    conn: Connection,
    config: ConsumerConfig,
    assigned: Vec<Assignment>,
    prefetch: Option<JoinHandle<Result<FetchResponse, ClientError>>>,
}

impl Consumer {
    /// Connects to a broker.
    pub async fn connect(bootstrap: &str, config: ConsumerConfig) -> Result<Consumer, ClientError> {
        let conn = Connection::connect(bootstrap, &config.client_id).await?;
        Ok(Consumer {
            conn,
            config,
            assigned: Vec::new(),
            prefetch: None,
        })
    }

    /// A consumer over an existing connection (for example an embedded broker's).
    pub fn with_connection(conn: Connection, config: ConsumerConfig) -> Consumer {
        Consumer {
            conn,
            config,
            assigned: Vec::new(),
            prefetch: None,
        }
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
                let metadata: MetadataResponse = self
                    .conn
                    .call(&Request::Metadata(MetadataRequest {
                        topics: vec![topic.to_string()],
                        allow_auto_create: false,
                    }))
                    .await?;
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
        let request = Request::ListOffsets(ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.to_string(),
                partitions: vec![ListOffsetsPartition {
                    partition,
                    timestamp,
                }],
            }],
        });
        let response: ListOffsetsResponse = self.conn.call(&request).await?;
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

    fn cancel_prefetch(&mut self) {
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.abort();
        }
    }

    fn start_fetch(&mut self) {
        let mut topics: Vec<FetchTopic> = Vec::new();
        for a in &self.assigned {
            let part = FetchPartition {
                partition: a.partition,
                fetch_offset: a.next_offset,
                partition_max_bytes: self.config.partition_max_bytes,
            };
            match topics.iter_mut().find(|t| t.name == *a.topic) {
                Some(t) => t.partitions.push(part),
                None => topics.push(FetchTopic {
                    name: a.topic.to_string(),
                    partitions: vec![part],
                }),
            }
        }
        let request = Request::Fetch(FetchRequest {
            max_wait_ms: self.config.fetch_max_wait.as_millis() as u32,
            min_bytes: self.config.fetch_min_bytes,
            max_bytes: self.config.fetch_max_bytes,
            topics,
        });
        self.prefetch = Some(tokio::spawn(self.conn.call::<FetchResponse>(&request)));
    }

    /// The next records (possibly none, after `fetch_max_wait`). A fetch for the following call
    /// is sent before this returns.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        if self.assigned.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no partitions assigned".into(),
            ));
        }
        if self.prefetch.is_none() {
            self.start_fetch();
        }
        let Some(prefetch) = self.prefetch.take() else {
            return Ok(Vec::new());
        };
        let response = prefetch.await.map_err(|_| ClientError::Closed)??;
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
                    first_error.get_or_insert(ClientError::broker(
                        format!("fetch {}-{}", topic.name, part.partition),
                        part.error_code,
                        String::new(),
                    ));
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
        if let Some(err) = first_error
            && records.is_empty()
        {
            return Err(err);
        }
        self.start_fetch();
        Ok(records)
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
