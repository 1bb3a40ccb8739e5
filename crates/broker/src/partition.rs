//! One partition on this broker: its log, its idempotent producers, and its replica state (role,
//! leader epoch, partition epoch, replicas, in-sync replicas) and high watermark. Every rule about
//! who may append, how far a reader may read and when a write is committed lives here, so produce
//! (acks), fetch (the upper bound) and Metadata read them from one place.
//!
//! Blocking: the log's file work. The `*_nonblocking` operations only write into or read from
//! the page cache and answer `None` when they would need more (a segment roll, a sync, loading
//! index files); callers on async workers then repeat them on the blocking pool.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchError};
use cairn_replication::{
    DivergingEpoch, Durability, FetchCheck, FetchPosition, FollowerState, IsrChange, LeaderConfig,
    LeaderState, PartitionView, ReplicaLog,
};
use cairn_storage::{AppendError, AppendInfo, Fetched, Log, LogConfig, ReadError, RecoveryReport};
use tokio::sync::watch;

use crate::controls::NegativeControl;
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
    /// The leader epoch it was appended in.
    pub leader_epoch: u32,
}

/// This broker's replication state machine for a partition (`cairn-replication`).
#[derive(Debug)]
enum Replica {
    Leader(LeaderState),
    Follower(FollowerState),
    None { high_watermark: u64 },
}

impl Replica {
    fn high_watermark(&self) -> u64 {
        match self {
            Replica::Leader(s) => s.high_watermark(),
            Replica::Follower(f) => f.high_watermark(),
            Replica::None { high_watermark } => *high_watermark,
        }
    }
}

/// How replication treats a partition (its topic's config and the broker's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Which position of a replica counts for the high watermark (`replication.durability`).
    pub durability: Durability,
    /// `replica_lag_time_max_ms`.
    pub replica_lag_max_ms: i64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            durability: Durability::Flushed,
            replica_lag_max_ms: 10_000,
        }
    }
}

/// A follower's part of a leader's ReplicaFetch answer.
#[derive(Debug, Clone)]
pub(crate) enum Fetched4Follower {
    /// Records (possibly none) and the leader's high watermark.
    Records { records: Bytes, high_watermark: u64 },
    /// The log diverges from the leader's.
    Diverging(DivergingEpoch),
    /// The fetch offset is past the leader's log end.
    PastEnd { leader_log_end: u64 },
    /// The fetch offset is below the leader's log start: the records this replica needs next
    /// are gone (retention), so it starts over, empty, at the leader's log start.
    BeforeStart { leader_log_start: u64 },
}

/// The storage log as the replication state machines read it.
struct LogView<'a>(&'a Log);

impl ReplicaLog for LogView<'_> {
    fn log_start(&self) -> u64 {
        self.0.log_start_offset().0
    }

    fn log_end(&self) -> u64 {
        self.0.log_end_offset().0
    }

    fn flushed(&self) -> u64 {
        self.0.flushed_offset().0
    }

    fn latest_epoch(&self) -> Option<u32> {
        self.0.latest_epoch()
    }

    fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, u64)> {
        match self.0.end_offset_for_epoch(epoch) {
            Some((found, end)) => Some((found, end.0)),
            // Newer than any epoch the log holds: the newest one ends at the log end.
            None => self
                .latest_epoch()
                .filter(|latest| *latest < epoch)
                .map(|latest| (latest, self.log_end())),
        }
    }
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
    /// The offset below which records are committed (acks=all may be answered): the high
    /// watermark of a replicated partition; with one replica, the offset below which the log is
    /// durable here. Sent (even unchanged) when a leadership ends, so waiters see it.
    committed: watch::Sender<u64>,
    /// The replication state machine.
    replica: Mutex<Replica>,
    replication: ReplicationConfig,
    /// A flush of the leader's log is scheduled or running (durable replication).
    flush_scheduled: AtomicBool,
    /// When the pending ISR change was last sent to the controller (Unix ms).
    isr_sent_ms: AtomicI64,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An ISR change to send to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IsrProposal {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) change: IsrChange,
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
        replication: ReplicationConfig,
    ) -> Partition {
        let producers = Mutex::new(rebuild_producers(&log, host.clock.unix_ms()));
        let (log_end, _) = watch::channel(log.log_end_offset().0);
        let start = log.log_start_offset().0;
        // One replica's meaning; set_replica_state below switches it to the high watermark if
        // the partition is replicated.
        let (committed, _) = watch::channel(log.flushed_offset().0);
        let partition = Partition {
            topic,
            index,
            host,
            log,
            producers,
            state: RwLock::new(ReplicaState::single(0, 0)),
            log_end,
            committed,
            replica: Mutex::new(Replica::None {
                high_watermark: start,
            }),
            replication,
            flush_scheduled: AtomicBool::new(false),
            isr_sent_ms: AtomicI64::new(0),
        };
        partition.set_replica_state(state);
        partition
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
    /// (by leader epoch, then partition epoch) is ignored; returns whether it was adopted. The
    /// replication state machine follows: a new leadership starts from the high watermark known
    /// so far, a new leader to follow starts a follower, and a leadership that ends wakes its
    /// acks=all waiters (they answer NOT_LEADER_OR_FOLLOWER).
    pub fn set_replica_state(&self, new: ReplicaState) -> bool {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if (new.leader_epoch, new.partition_epoch) < (state.leader_epoch, state.partition_epoch) {
            return false;
        }
        let node = self.host.node_id;
        let now_ms = self.host.clock.unix_ms();
        let view = PartitionView {
            leader: new.leader,
            leader_epoch: new.leader_epoch,
            partition_epoch: new.partition_epoch,
            replicas: new.replicas.clone(),
            isr: new.isr.clone(),
        };
        let mut replica = lock(&self.replica);
        let hw = replica.high_watermark().max(self.log.log_start_offset().0);
        let mut ended = false;
        match new.leader {
            Some(leader) if leader == node => {
                let same = match &mut *replica {
                    Replica::Leader(s) => s.update_view(&view, now_ms),
                    _ => false,
                };
                if !same {
                    ended = matches!(*replica, Replica::Leader(_));
                    let config = LeaderConfig {
                        durability: self.replication.durability,
                        replica_lag_max_ms: self.replication.replica_lag_max_ms,
                        ..LeaderConfig::default()
                    };
                    *replica = Replica::Leader(LeaderState::new(
                        node,
                        &view,
                        hw,
                        &LogView(&self.log),
                        now_ms,
                        config,
                    ));
                    self.isr_sent_ms.store(0, Ordering::Relaxed);
                    tracing::debug!(topic = %self.topic, partition = self.index, leader_epoch = new.leader_epoch, log_end = self.log.log_end_offset().0, high_watermark = hw, isr = ?new.isr, "leading");
                }
            }
            Some(leader) => {
                let same = matches!(&*replica, Replica::Follower(f) if f.leader() == leader && f.leader_epoch() == new.leader_epoch);
                if !same {
                    ended = matches!(*replica, Replica::Leader(_));
                    *replica = Replica::Follower(FollowerState::new(leader, new.leader_epoch, hw));
                    tracing::debug!(topic = %self.topic, partition = self.index, leader, leader_epoch = new.leader_epoch, log_end = self.log.log_end_offset().0, high_watermark = hw, "following");
                }
            }
            None => {
                ended = matches!(*replica, Replica::Leader(_));
                *replica = Replica::None { high_watermark: hw };
            }
        }
        let replicated = new.replicas.len() > 1;
        let was_replicated = state.replicas.len() > 1;
        *state = new;
        drop(state);
        if replicated != was_replicated {
            // The meaning of "committed" changed (the partition gained or lost followers).
            let committed = if replicated {
                replica.high_watermark()
            } else {
                self.log.flushed_offset().0
            };
            self.committed.send_replace(committed);
        }
        if replicated {
            let hw = replica.high_watermark();
            drop(replica);
            self.publish_high_watermark(hw, ended);
        }
        true
    }

    /// This broker no longer hosts the partition (its replica moved to another broker, or its
    /// topic was deleted): whatever role it had ends, and everyone waiting on it (acks=all
    /// produces, long-poll fetches) wakes at once and finds it gone (NOT_LEADER_OR_FOLLOWER)
    /// instead of waiting for a watermark that will never move here (a producer waited out its
    /// 30 s request timeout).
    pub(crate) fn retire(&self) {
        let mut replica = lock(&self.replica);
        let hw = replica.high_watermark();
        *replica = Replica::None { high_watermark: hw };
        drop(replica);
        self.committed.send_modify(|_| {});
    }

    /// Whether other brokers hold copies: then the high watermark comes from replication; with
    /// one replica it is the log end, and acks=all waits for the local flush.
    fn replicated(&self) -> bool {
        read(&self.state).replicas.len() > 1
    }

    /// Announces a replicated partition's high watermark to acks=all waiters and consumers;
    /// `always`: even unchanged (a leadership ended: waiters must look).
    fn publish_high_watermark(&self, hw: u64, always: bool) {
        self.committed.send_if_modified(|current| {
            let moved = hw > *current;
            *current = (*current).max(hw);
            moved || always
        });
    }

    /// Recomputes the leader's high watermark (after an append or a flush) and announces it.
    fn update_high_watermark(&self) {
        let mut replica = lock(&self.replica);
        if let Replica::Leader(state) = &mut *replica
            && state.update(&LogView(&self.log))
        {
            let hw = state.high_watermark();
            drop(replica);
            if self.replicated() {
                self.publish_high_watermark(hw, false);
            }
        }
    }

    /// The committed ISR's size as the leader knows it.
    pub fn isr_len(&self) -> usize {
        match &*lock(&self.replica) {
            Replica::Leader(state) => state.isr().len(),
            _ => read(&self.state).isr.len(),
        }
    }

    /// Refuses an acks=all write when fewer than `min_insync` replicas are in sync
    /// (NOT_ENOUGH_REPLICAS): it could not be committed without them.
    pub fn check_min_insync(&self, min_insync: usize) -> Result<(), BrokerError> {
        let isr = self.isr_len();
        if isr < min_insync {
            return Err(BrokerError::NotEnoughReplicas(format!(
                "{}-{} has {isr} in-sync replicas; min.insync.replicas is {min_insync}",
                self.topic, self.index
            )));
        }
        Ok(())
    }

    /// The first offset stored.
    pub fn log_start_offset(&self) -> Offset {
        self.log.log_start_offset()
    }

    /// The offset the next record will get.
    pub fn log_end_offset(&self) -> Offset {
        self.log.log_end_offset()
    }

    /// The offset below which consumers may read: with one replica every appended record;
    /// replicated, what every in-sync replica holds (durably, under durable replication).
    pub fn high_watermark(&self) -> Offset {
        if !self.replicated() {
            return self.log.log_end_offset();
        }
        Offset(lock(&self.replica).high_watermark())
    }

    /// The followers' lag behind this leader: (node, offsets, ms since caught up). Empty unless
    /// this broker leads.
    pub fn follower_lags(&self) -> Vec<(u32, u64, i64)> {
        let now_ms = self.host.clock.unix_ms();
        let log_end = self.log.log_end_offset().0;
        match &*lock(&self.replica) {
            Replica::Leader(state) => state
                .follower_lags(log_end)
                .zip(state.follower_lag_ms(now_ms))
                .map(|((node, offsets), (_, ms))| (node, offsets, ms))
                .collect(),
            _ => Vec::new(),
        }
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
        self.host.admit_append(n_bytes)?;
        let log = &self.log;
        let append = |buf: &mut [u8]| -> Result<Option<AppendInfo>, BrokerError> {
            let result = if may_block {
                log.append(buf, epoch).map(Some)
            } else {
                log.append_nonblocking(buf, epoch)
            };
            self.host.note_append(&result);
            result.map_err(|err| append_error(err, n_bytes))
        };
        let written = |info: AppendInfo| Appended {
            base: info.base_offset,
            last: info.last_offset,
            written: true,
            leader_epoch: epoch,
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
                leader_epoch: epoch,
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

    /// After a leader's append: a replicated partition's high watermark may move (the leader's
    /// own position counts), and under durable replication the leader's log is flushed soon
    /// (group commit on the blocking pool), whatever the producer's acks.
    pub(crate) fn after_leader_append(self: &Arc<Self>) {
        if !self.replicated() {
            return;
        }
        self.update_high_watermark();
        if self.replication.durability == Durability::Flushed {
            self.schedule_flush();
        }
    }

    /// Flushes the log to its end on the blocking pool, one flush at a time; appends made
    /// meanwhile are covered by the next round.
    fn schedule_flush(self: &Arc<Self>) {
        if self.flush_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let run = move || {
            loop {
                let end = this.log.log_end_offset();
                let flushed = this.log.flush(end);
                this.flush_scheduled.store(false, Ordering::Release);
                if let Err(err) = flushed {
                    tracing::error!(topic = %this.topic, partition = this.index, error = %err, "flushing the log failed");
                    return;
                }
                this.update_high_watermark();
                if this.log.flushed_offset() >= this.log.log_end_offset()
                    || this.flush_scheduled.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Appends batches that already carry their offsets and epochs (a follower copying its
    /// leader), and keeps the idempotent producers' state from them, so that a producer's retry
    /// reaching this broker once it leads is recognised. Blocking.
    pub fn append_as_follower(&self, batches: &[u8]) -> Result<AppendInfo, BrokerError> {
        let n_bytes = batches.len() as u64;
        self.host.admit_append(n_bytes)?;
        let mut producers = lock(&self.producers);
        let result = self.log.append_replicated(batches);
        self.host.note_append(&result);
        let info = result.map_err(|err| append_error(err, n_bytes))?;
        if !self.host.breaks(NegativeControl::FollowersForgetProducers) {
            producers.rebuild(batches, self.host.clock.unix_ms());
        }
        drop(producers);
        self.notify_appended();
        Ok(info)
    }

    /// What this broker's next ReplicaFetch says for the partition, if it follows a leader:
    /// (leader, leader epoch, position).
    pub(crate) fn follower_position(&self) -> Option<(u32, u32, FetchPosition)> {
        match &*lock(&self.replica) {
            Replica::Follower(f) => {
                let mut position = f.position(&LogView(&self.log));
                if position.last_fetched_epoch.is_some()
                    && self
                        .host
                        .breaks(NegativeControl::FollowersKeepDivergentLogs)
                {
                    position.last_fetched_epoch = Some(f.leader_epoch());
                }
                Some((f.leader(), f.leader_epoch(), position))
            }
            _ => None,
        }
    }

    /// Carries out the leader's answer to this follower's fetch made in `leader_epoch`
    /// (blocking: appends or truncates the log). Ignored if the partition no longer follows that
    /// epoch, or the log moved since the fetch (`fetched_at` was its log end then). Returns
    /// whether records were appended.
    pub(crate) fn apply_fetched(
        &self,
        leader_epoch: u32,
        fetched_at: u64,
        fetched: Fetched4Follower,
    ) -> Result<bool, BrokerError> {
        let following = |replica: &Replica| matches!(replica, Replica::Follower(f) if f.leader_epoch() == leader_epoch);
        if !following(&lock(&self.replica)) || self.log.log_end_offset().0 != fetched_at {
            return Ok(false);
        }
        let truncate_to = match fetched {
            Fetched4Follower::Records {
                records,
                high_watermark,
            } => {
                let appended = !records.is_empty();
                if appended {
                    self.append_as_follower(&records)?;
                    // Durable replication: the next fetch reports these records as durable
                    // (group commit: one fsync per fetched chunk).
                    if self.replication.durability == Durability::Flushed {
                        self.log
                            .flush(self.log.log_end_offset())
                            .map_err(|err| BrokerError::storage(&err))?;
                    }
                }
                if let Replica::Follower(f) = &mut *lock(&self.replica) {
                    f.on_high_watermark(high_watermark, &LogView(&self.log));
                }
                return Ok(appended);
            }
            Fetched4Follower::Diverging(diverging) => match &*lock(&self.replica) {
                Replica::Follower(f) => f.truncation_offset(diverging, &LogView(&self.log)),
                _ => return Ok(false),
            },
            Fetched4Follower::PastEnd { leader_log_end } => leader_log_end,
            Fetched4Follower::BeforeStart { leader_log_start } => {
                self.reset_as_follower(Offset(leader_log_start))?;
                return Ok(true);
            }
        };
        self.truncate_as_follower(Offset(truncate_to))?;
        Ok(false)
    }

    /// Empties the log and starts it at the leader's log start (blocking): what this replica
    /// would fetch next was deleted on the leader. Nothing it drops is needed: a follower's
    /// records below the leader's log start are past every retention the leader applied, and
    /// none of them is above the high watermark the leader knows.
    fn reset_as_follower(&self, leader_log_start: Offset) -> Result<(), BrokerError> {
        self.rewrite_as_follower(|log| log.reset_to(leader_log_start))?;
        tracing::info!(topic = %self.topic, partition = self.index, log_start = leader_log_start.0, "follower log emptied: it starts again at the leader's log start");
        Ok(())
    }

    /// Removes what the leader does not have (blocking), and rebuilds the idempotent producers'
    /// state from what stays.
    fn truncate_as_follower(&self, offset: Offset) -> Result<(), BrokerError> {
        let end = self.rewrite_as_follower(|log| log.truncate_to(offset))?;
        tracing::info!(topic = %self.topic, partition = self.index, to = offset.0, log_end = end.0, "follower log truncated to the leader's");
        Ok(())
    }

    /// Changes the log's past as a follower (blocking): `rewrite` under the producers' lock,
    /// then the idempotent producers' state rebuilt from what stays and the follower's position
    /// moved to the new log end.
    fn rewrite_as_follower<T>(
        &self,
        rewrite: impl FnOnce(&Log) -> Result<T, cairn_storage::Fatal>,
    ) -> Result<T, BrokerError> {
        let mut producers = lock(&self.producers);
        let done = rewrite(&self.log).map_err(|err| BrokerError::storage(&err))?;
        *producers = rebuild_producers(&self.log, self.host.clock.unix_ms());
        drop(producers);
        if let Replica::Follower(f) = &mut *lock(&self.replica) {
            f.on_truncated(&LogView(&self.log));
        }
        self.notify_appended();
        Ok(done)
    }

    /// The leader's side of a follower's fetch: checks the leader epoch and the follower's
    /// log against this one, records its progress (the high watermark may move) and says where
    /// to read.
    pub(crate) fn on_replica_fetch(
        &self,
        replica: u32,
        current_leader_epoch: u32,
        position: FetchPosition,
    ) -> Result<FetchCheck, BrokerError> {
        self.check_leader(Some(current_leader_epoch))?;
        let now_ms = self.host.clock.unix_ms();
        let mut guard = lock(&self.replica);
        let Replica::Leader(state) = &mut *guard else {
            return Err(self.not_leader());
        };
        let before = state.high_watermark();
        let check = state.on_fetch(replica, position, &LogView(&self.log), now_ms);
        let hw = state.high_watermark();
        drop(guard);
        if hw > before && self.replicated() {
            self.publish_high_watermark(hw, false);
        }
        match check {
            FetchCheck::NotReplica => Err(BrokerError::NotLeaderOrFollower {
                node: self.host.node_id,
                topic: self.topic.to_string(),
                partition: self.index,
            }),
            check => Ok(check),
        }
    }

    /// The ISR change to send to the controller now, if this broker leads: a new one, or the
    /// pending one again once `resend_ms` passed without its outcome arriving.
    pub(crate) fn isr_proposal(&self, resend_ms: i64) -> Option<IsrProposal> {
        let now_ms = self.host.clock.unix_ms();
        let mut guard = lock(&self.replica);
        let Replica::Leader(state) = &mut *guard else {
            return None;
        };
        if !self.host.may_lead() {
            return None;
        }
        let change = match state.isr_change(now_ms) {
            Some(change) => change,
            None => {
                let pending = state.pending()?;
                let sent = self.isr_sent_ms.load(Ordering::Relaxed);
                if now_ms.saturating_sub(sent) < resend_ms {
                    return None;
                }
                pending.clone()
            }
        };
        self.isr_sent_ms.store(now_ms, Ordering::Relaxed);
        Some(IsrProposal {
            topic: Arc::clone(&self.topic),
            partition: self.index,
            change,
        })
    }

    /// Negative control only: takes a proposed ISR change as if the controller had committed
    /// it, so a leader cut off from the cluster can shrink its ISR to itself.
    pub(crate) fn adopt_isr_unilaterally(&self, change: &IsrChange) {
        if !self
            .host
            .breaks(NegativeControl::IsrShrinkWithoutController)
        {
            return;
        }
        let now_ms = self.host.clock.unix_ms();
        if let Replica::Leader(state) = &mut *lock(&self.replica) {
            let view = PartitionView {
                leader: Some(self.host.node_id),
                leader_epoch: change.leader_epoch,
                partition_epoch: change.partition_epoch + 1,
                replicas: state.replicas().to_vec(),
                isr: change.isr.clone(),
            };
            state.update_view(&view, now_ms);
            tracing::error!(topic = %self.topic, partition = self.index, isr = ?change.isr, "NEGATIVE CONTROL: ISR changed without the controller");
        }
        self.update_high_watermark();
    }

    /// The controller refused the pending ISR change for good: decide again.
    pub(crate) fn isr_change_refused(&self) {
        if let Replica::Leader(state) = &mut *lock(&self.replica) {
            state.isr_change_refused();
        }
    }

    fn not_leader(&self) -> BrokerError {
        BrokerError::NotLeaderOrFollower {
            node: self.host.node_id,
            topic: self.topic.to_string(),
            partition: self.index,
        }
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

    /// Waits until every offset below `end` (appended in `leader_epoch`) is committed, so that
    /// an acks=all produce may be answered. Replicated: until the high watermark passes it, while
    /// this broker still leads in that epoch (else NOT_LEADER_OR_FOLLOWER), and then only if the
    /// ISR still has `min_insync` members (else NOT_ENOUGH_REPLICAS_AFTER_APPEND). One replica:
    /// committed means durable here, and this triggers the flush (group commit: concurrent
    /// waiters share one fsync). Cancel safety: dropping the future leaves the flush to finish
    /// on the blocking pool.
    pub async fn wait_committed(
        self: &Arc<Self>,
        end: Offset,
        leader_epoch: u32,
        min_insync: usize,
    ) -> Result<(), BrokerError> {
        let mut committed = self.committed.subscribe();
        if self.replicated() {
            if self.replication.durability == Durability::Flushed {
                self.schedule_flush();
            }
            loop {
                let hw = *committed.borrow_and_update();
                let leads = self.leader_epoch() == leader_epoch
                    && matches!(&*lock(&self.replica), Replica::Leader(s) if s.leader_epoch() == leader_epoch);
                if !leads {
                    return Err(self.not_leader());
                }
                if hw >= end.0 || self.host.breaks(NegativeControl::AcksOnLogEnd) {
                    let isr = self.isr_len();
                    if isr < min_insync {
                        return Err(BrokerError::NotEnoughReplicasAfterAppend(format!(
                            "{}-{}: the ISR shrank to {isr}, below min.insync.replicas {min_insync}",
                            self.topic, self.index
                        )));
                    }
                    return Ok(());
                }
                if committed.changed().await.is_err() {
                    return Err(BrokerError::Internal("partition closed".into()));
                }
            }
        }
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

    /// Announces the durable offset to acks=all waiters (after any flush); replicated, the high
    /// watermark moves instead.
    pub(crate) fn publish_committed(&self) {
        if self.replicated() {
            self.update_high_watermark();
            return;
        }
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

    /// A receiver that changes whenever the bound of `isolation` may have moved: the log end
    /// (followers), or the high watermark (consumers; with one replica the log end).
    pub fn subscribe(&self, isolation: Isolation) -> watch::Receiver<u64> {
        match isolation {
            Isolation::HighWatermark if self.replicated() => self.committed.subscribe(),
            _ => self.log_end.subscribe(),
        }
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
        err @ AppendError::NoSpace { .. } => BrokerError::storage(&err),
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
