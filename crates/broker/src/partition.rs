//! One partition on this broker: its log, its idempotent producers, and its replica state (role,
//! leader epoch, partition epoch, replicas, in-sync replicas) and high watermark. Every rule about
//! who may append, how far a reader may read and when a write is committed lives here, so produce
//! (acks), fetch (the upper bound) and Metadata read them from one place.
//!
//! Blocking: the log's file work. The `*_nonblocking` operations only write into or read from
//! the page cache and answer `None` when they would need more (a segment roll, a sync, loading
//! index files); callers on async workers then repeat them on the blocking pool.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchError};
use cairn_storage::{AppendError, AppendInfo, Fetched, Log, LogConfig, ReadError, RecoveryReport};
use tokio::sync::watch;

use crate::error::{BrokerError, error_chain};
use crate::manager::Host;
use crate::producers::{ProducerStates, SequenceCheck};

/// This broker's part in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It leads: producers append here, consumers read here.
    Leader,
    /// It copies the leader's log.
    Follower,
    /// Neither (the partition is offline, or this broker is not one of its replicas).
    None,
}

/// What the cluster metadata says about a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// The leader's node id; `None` while the partition is offline.
    pub leader: Option<u32>,
    /// The leadership generation: it rises at every leader change.
    pub leader_epoch: u32,
    /// The generation of the whole state (leader, replicas or ISR changed).
    pub partition_epoch: u32,
    /// The replicas, preferred leader first.
    pub replicas: Vec<u32>,
    /// The in-sync replicas.
    pub isr: Vec<u32>,
}

impl ReplicaState {
    /// A partition with one replica, on `node`, led by it.
    pub fn single(node: u32, leader_epoch: u32) -> ReplicaState {
        ReplicaState {
            leader: Some(node),
            leader_epoch,
            partition_epoch: 0,
            replicas: vec![node],
            isr: vec![node],
        }
    }
}

/// How far a read may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// To the log end: followers copying the leader.
    LogEnd,
    /// To the high watermark: consumers (with or without read_committed: there are no
    /// transactions, so the last stable offset is the high watermark).
    HighWatermark,
}

/// Where a producer's append went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// First offset.
    pub base: Offset,
    /// Last offset.
    pub last: Offset,
    /// Whether anything was written (false: an idempotent producer's retry of a batch already
    /// in the log, answered with its original offsets).
    pub written: bool,
}

/// One partition.
#[derive(Debug)]
pub struct Partition {
    topic: Arc<str>,
    index: u32,
    host: Host,
    log: Log,
    /// Idempotent producers' recent batches; held across the sequence check and the append.
    producers: Mutex<ProducerStates>,
    state: RwLock<ReplicaState>,
    /// The log end offset, announced to long-polling fetchers.
    log_end: watch::Sender<u64>,
    /// The offset below which records are committed (acks=all may be answered). With one
    /// replica: below which the log is durable on this broker.
    committed: watch::Sender<u64>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

impl Partition {
    /// A partition over an opened `log`; idempotent producers' state is rebuilt from the active
    /// segment (blocking).
    pub(crate) fn new(
        topic: Arc<str>,
        index: u32,
        host: Host,
        log: Log,
        state: ReplicaState,
    ) -> Partition {
        let producers = Mutex::new(rebuild_producers(&log, host.clock.unix_ms()));
        let (log_end, _) = watch::channel(log.log_end_offset().0);
        let (committed, _) = watch::channel(log.flushed_offset().0);
        Partition {
            topic,
            index,
            host,
            log,
            producers,
            state: RwLock::new(state),
            log_end,
            committed,
        }
    }

    /// The topic's name.
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// The partition index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The log (crate-internal: every write goes through the operations below).
    pub(crate) fn log(&self) -> &Log {
        &self.log
    }

    /// What the cluster metadata says about this partition.
    pub fn replica_state(&self) -> ReplicaState {
        read(&self.state).clone()
    }

    /// This broker's role. A broker without a valid lease (fenced, or out of touch with the
    /// controller past its session) leads nothing, whatever its last image says.
    pub fn role(&self) -> Role {
        let node = self.host.node_id;
        let state = read(&self.state);
        match state.leader {
            Some(leader) if leader == node && self.host.may_lead() => Role::Leader,
            _ if state.replicas.contains(&node) => Role::Follower,
            _ => Role::None,
        }
    }

    /// The current leader epoch.
    pub fn leader_epoch(&self) -> u32 {
        read(&self.state).leader_epoch
    }

    /// Adopts a new replica state from the cluster metadata. A state older than the current one
    /// (by leader epoch, then partition epoch) is ignored; returns whether it was adopted.
    pub fn set_replica_state(&self, new: ReplicaState) -> bool {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if (new.leader_epoch, new.partition_epoch) < (state.leader_epoch, state.partition_epoch) {
            return false;
        }
        *state = new;
        true
    }

    /// The first offset stored.
    pub fn log_start_offset(&self) -> Offset {
        self.log.log_start_offset()
    }

    /// The offset the next record will get.
    pub fn log_end_offset(&self) -> Offset {
        self.log.log_end_offset()
    }

    /// The offset below which consumers may read. One replica: every appended record (the
    /// replication issue bounds it by what the in-sync replicas hold).
    pub fn high_watermark(&self) -> Offset {
        self.log.log_end_offset()
    }

    /// Bytes stored.
    pub fn size_bytes(&self) -> u64 {
        self.log.size_bytes()
    }

    /// Segments stored.
    pub fn n_segments(&self) -> usize {
        self.log.n_segments()
    }

    /// The storage config.
    pub fn config(&self) -> &LogConfig {
        self.log.config()
    }

    /// What opening the log found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        self.log.recovery_report()
    }

    /// The newest epoch at or below `epoch` this log holds, and the offset where it ends (the
    /// next epoch's start, or the log end): Kafka's OffsetsForLeaderEpoch. `None` if the log
    /// holds no epoch at or below it.
    pub fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, Offset)> {
        self.log.end_offset_for_epoch(epoch)
    }

    /// Refuses a request that must go to the leader, or whose leader epoch (if it sent one:
    /// Kafka clients from Fetch v9 and ListOffsets v4) is not the current one.
    pub fn check_leader(&self, current_leader_epoch: Option<u32>) -> Result<(), BrokerError> {
        let state = read(&self.state);
        if let Some(given) = current_leader_epoch {
            let current = state.leader_epoch;
            if given < current {
                return Err(BrokerError::FencedLeaderEpoch { given, current });
            }
            if given > current {
                return Err(BrokerError::UnknownLeaderEpoch { given, current });
            }
        }
        if state.leader != Some(self.host.node_id) || !self.host.may_lead() {
            return Err(BrokerError::NotLeaderOrFollower {
                node: self.host.node_id,
                topic: self.topic.to_string(),
                partition: self.index,
            });
        }
        Ok(())
    }

    /// Appends a producer's batches as the leader: no transactional or control batches
    /// (transactions are not served), keys on every record of a compacted topic, and for an
    /// idempotent producer's batch (exactly one per partition, as Kafka requires) its sequence,
    /// checked under the partition's producer lock so that the check and the append are one
    /// step. With `may_block` false, `Ok(None)` means the append needs blocking file work: call
    /// again on the blocking pool.
    pub(crate) fn append_as_leader(
        &self,
        buf: &mut [u8],
        may_block: bool,
    ) -> Result<Option<Appended>, BrokerError> {
        let epoch = {
            self.check_leader(None)?;
            self.leader_epoch()
        };
        let n_bytes = buf.len() as u64;
        // One pass over the batch headers (the log validates the batches themselves).
        let (mut first, mut n_batches) = (None, 0usize);
        let mut rest: &[u8] = buf;
        while let Ok(header) = batch::BatchHeader::parse(rest) {
            if header.is_transactional() || header.is_control() {
                return Err(BrokerError::InvalidRecord(
                    "transactional and control batches are not accepted (transactions are not \
                     supported)"
                        .into(),
                ));
            }
            rest = rest.get(header.total_bytes()..).unwrap_or_default();
            n_batches += 1;
            first.get_or_insert(header);
        }
        if self.log.config().compacted {
            require_keys(buf, self.log.config().batch_bytes_max)?;
        }
        let log = &self.log;
        let append = |buf: &mut [u8]| -> Result<Option<AppendInfo>, BrokerError> {
            let result = if may_block {
                log.append(buf, epoch).map(Some)
            } else {
                log.append_nonblocking(buf, epoch)
            };
            result.map_err(|err| append_error(err, n_bytes))
        };
        let written = |info: AppendInfo| Appended {
            base: info.base_offset,
            last: info.last_offset,
            written: true,
        };
        let Some(header) = first.filter(|h| h.producer_id >= 0) else {
            let appended = append(buf)?.map(written);
            if appended.is_some() {
                self.notify_appended();
            }
            return Ok(appended);
        };
        if n_batches != 1 {
            return Err(BrokerError::InvalidRecord(format!(
                "an idempotent produce carries one batch per partition, this one {n_batches}"
            )));
        }
        let mut producers = self
            .producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match producers.check(&header) {
            SequenceCheck::Duplicate {
                base_offset,
                last_offset,
            } => Ok(Some(Appended {
                base: Offset(base_offset),
                last: Offset(last_offset),
                written: false,
            })),
            SequenceCheck::Reject(err) => Err(err),
            SequenceCheck::Append => {
                let Some(info) = append(buf)? else {
                    return Ok(None);
                };
                producers.record(
                    &header,
                    info.base_offset.0,
                    info.last_offset.0,
                    self.host.clock.unix_ms(),
                );
                drop(producers);
                self.notify_appended();
                Ok(Some(written(info)))
            }
        }
    }

    /// Appends batches that already carry their offsets and epochs (a follower copying its
    /// leader; the replication issue uses it). Blocking.
    pub fn append_as_follower(&self, batches: &[u8]) -> Result<AppendInfo, BrokerError> {
        let n_bytes = batches.len() as u64;
        let info = self
            .log
            .append_replicated(batches)
            .map_err(|err| append_error(err, n_bytes))?;
        self.notify_appended();
        Ok(info)
    }

    /// Whole batches from `offset`, up to `max_bytes` (at least one batch), never past the bound
    /// `isolation` sets, with the high watermark as of the read (every record returned to a
    /// consumer is below it). `Ok(None)`: the read needs index files loaded first; read again on
    /// the blocking pool with `may_block`.
    pub fn read(
        &self,
        offset: Offset,
        max_bytes: u32,
        isolation: Isolation,
        may_block: bool,
    ) -> Result<Option<(Fetched, Offset)>, BrokerError> {
        let high_watermark = self.high_watermark();
        let upper = match isolation {
            Isolation::LogEnd => Offset(u64::MAX),
            Isolation::HighWatermark => high_watermark,
        };
        let result = if may_block {
            self.log.read_until(offset, max_bytes, upper).map(Some)
        } else {
            self.log.read_until_nonblocking(offset, max_bytes, upper)
        };
        let result = result.map(|read| read.map(|fetched| (fetched, high_watermark)));
        result.map_err(|err| match err {
            ReadError::OffsetOutOfRange {
                offset,
                log_start,
                log_end,
            } => BrokerError::OffsetOutOfRange {
                offset: offset.0 as i64,
                log_start,
                log_end,
            },
            err => BrokerError::storage(&err),
        })
    }

    /// Waits until every offset below `end` is committed, so that an acks=all produce may be
    /// answered. One replica: committed means durable here, and this triggers the flush (group
    /// commit: concurrent waiters share one fsync). Cancel safety: dropping the future leaves the
    /// flush to finish on the blocking pool.
    pub async fn wait_committed(self: &Arc<Self>, end: Offset) -> Result<(), BrokerError> {
        let mut committed = self.committed.subscribe();
        if *committed.borrow_and_update() >= end.0 {
            return Ok(());
        }
        let this = Arc::clone(self);
        match tokio::task::spawn_blocking(move || this.log.flush(end)).await {
            Ok(Ok(())) => self.publish_committed(),
            Ok(Err(err)) => return Err(BrokerError::storage(&err)),
            Err(_) => return Err(BrokerError::Internal("flush task failed".into())),
        }
        committed
            .wait_for(|c| *c >= end.0)
            .await
            .map(|_| ())
            .map_err(|_| BrokerError::Internal("partition closed".into()))
    }

    /// Makes every offset below `end` durable here and announces it (blocking; the internal
    /// offsets topic's commits, which already run on the blocking pool).
    pub(crate) fn flush_blocking(&self, end: Offset) -> Result<(), BrokerError> {
        self.log
            .flush(end)
            .map_err(|err| BrokerError::storage(&err))?;
        self.publish_committed();
        Ok(())
    }

    /// Announces the durable offset to acks=all waiters (after any flush).
    pub(crate) fn publish_committed(&self) {
        let flushed = self.log.flushed_offset().0;
        self.committed.send_if_modified(|current| {
            let moved = flushed > *current;
            *current = (*current).max(flushed);
            moved
        });
    }

    /// Announces appends to waiting fetchers.
    fn notify_appended(&self) {
        let end = self.log.log_end_offset().0;
        self.log_end.send_if_modified(|current| {
            let changed = *current != end;
            *current = end;
            changed
        });
    }

    /// A receiver that changes whenever the log end moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.log_end.subscribe()
    }

    /// Forgets idempotent producers idle for longer than `max_idle_ms`.
    pub(crate) fn expire_producers(&self, now_ms: i64, max_idle_ms: i64) {
        self.producers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(now_ms, max_idle_ms);
    }

    /// Gives the log back for a clean close, if nothing else holds the partition.
    pub(crate) fn into_log(self) -> Log {
        self.log
    }
}

/// Idempotent producers' state from the batch headers of the active segment (a retry arrives
/// within the producer's delivery timeout, long before its batch leaves the active segment).
fn rebuild_producers(log: &Log, now_ms: i64) -> ProducerStates {
    let mut states = ProducerStates::default();
    let mut offset = log.active_segment_base();
    let end = log.log_end_offset();
    while offset < end {
        let Ok(fetched) = log.read(offset, 8 * 1024 * 1024) else {
            break;
        };
        if fetched.bytes.is_empty() {
            break;
        }
        states.rebuild(&fetched.bytes, now_ms);
        match last_offset_of(&fetched.bytes) {
            Some(last) if last >= offset.0 => offset = Offset(last + 1),
            _ => break,
        }
    }
    states
}

/// The last offset of the last whole batch in `bytes`.
fn last_offset_of(mut bytes: &[u8]) -> Option<u64> {
    let mut last = None;
    while let Ok(header) = batch::BatchHeader::parse(bytes) {
        last = Some(header.last_offset().max(0) as u64);
        bytes = bytes.get(header.total_bytes()..).unwrap_or_default();
    }
    last
}

/// A compacted topic keeps the latest record per key, so every record needs one (Kafka refuses
/// keyless records there the same way). Decodes (and decompresses) the batches: only compacted
/// topics pay for it.
fn require_keys(buf: &[u8], batch_bytes_max: u32) -> Result<(), BrokerError> {
    let batches = batch::Batches::new(Bytes::copy_from_slice(buf), batch_bytes_max);
    for batch in batches {
        // Invalid batches are refused by the log's own validation with the right error.
        let Ok(batch) = batch else { return Ok(()) };
        let Ok(records) = batch.records(cairn_protocol::limits::DECOMPRESSED_BYTES_MAX) else {
            return Ok(());
        };
        if let Some(record) = records.iter().find(|r| r.key.is_none()) {
            return Err(BrokerError::InvalidRecord(format!(
                "record at offset delta {} has no key: a compacted topic needs one per record",
                // Client-sent base offsets may be anything: no overflow.
                record.offset.wrapping_sub(batch.header().base_offset)
            )));
        }
    }
    Ok(())
}

/// The broker error for a failed append of `n_bytes`.
fn append_error(err: AppendError, n_bytes: u64) -> BrokerError {
    match err {
        // Too large only if the batch really is: a length field claiming more than was sent is
        // corruption.
        AppendError::InvalidBatch(BatchError::TooLarge {
            n_bytes: claimed,
            max,
        }) if claimed <= n_bytes => BrokerError::MessageTooLarge {
            n_bytes: claimed,
            max,
        },
        AppendError::Fatal(err) => BrokerError::storage(&err),
        err @ AppendError::Empty => BrokerError::InvalidRequest(error_chain(&err)),
        err => BrokerError::CorruptMessage(error_chain(&err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyless_record_is_refused_whatever_base_offset_the_client_sent() {
        let mut builder = batch::BatchBuilder::new(batch::Compression::None);
        builder.push(0, Some(b"k"), Some(b"v"), &[]);
        builder.push(0, None, Some(b"v"), &[]);
        let mut bytes = builder.build().unwrap().to_vec();
        // The broker stamps the real base offset after this check: the client's may be extreme.
        batch::stamp(&mut bytes, i64::MAX, 0).unwrap();
        let err = require_keys(&bytes, 1 << 20).unwrap_err();
        assert_eq!(
            err.code(),
            cairn_protocol::native::ErrorCode::INVALID_RECORD
        );
        assert!(err.to_string().contains("offset delta 1"), "{err}");
    }
}
