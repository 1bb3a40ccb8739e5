//! The leader's side: followers' progress, divergence checks, the high watermark and ISR
//! changes.

use std::collections::BTreeMap;

use crate::{DivergingEpoch, Durability, FetchPosition, NodeId, PartitionView, ReplicaLog};

/// How a leader decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Which position of a replica counts for the high watermark.
    pub durability: Durability,
    /// A follower that has not caught up with the leader's log end for this long leaves the ISR
    /// (`replica.lag.time.max.ms`).
    pub replica_lag_max_ms: i64,
    /// A deliberately broken rule for negative controls: the high watermark follows the leader's
    /// own log end, whatever the followers hold (acks=all acknowledged by the leader alone).
    /// Tests turn it on to prove they catch lost records; nothing else may.
    #[doc(hidden)]
    pub broken_high_watermark_on_leader_alone: bool,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            durability: Durability::Flushed,
            replica_lag_max_ms: 10_000,
            broken_high_watermark_on_leader_alone: false,
        }
    }
}

/// The leader's answer to a follower's fetch position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchCheck {
    /// The follower's log agrees with the leader's: serve records from `offset`.
    Read {
        /// Where to read.
        offset: u64,
    },
    /// The follower's log diverges: it truncates and fetches again.
    Diverging(DivergingEpoch),
    /// The fetch offset is outside the leader's log.
    OutOfRange {
        /// The leader's log start.
        log_start: u64,
        /// The leader's log end.
        log_end: u64,
    },
    /// The fetching node is not a replica of the partition.
    NotReplica,
}

/// An ISR change the leader proposes to the controller (Kafka's AlterPartition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrChange {
    /// The leader epoch it was decided in.
    pub leader_epoch: u32,
    /// The partition epoch it was decided on: the controller refuses it if the state moved.
    pub partition_epoch: u32,
    /// The new ISR.
    pub isr: Vec<NodeId>,
}

/// What the leader knows of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Whether it fetched since this leadership began (before that its position is unknown and
    /// counts as nothing).
    known: bool,
    /// Its log end.
    log_end: u64,
    /// Its durable offset.
    flushed: u64,
    /// The last time it was caught up with the leader's log end.
    last_caught_up_ms: i64,
    /// Its previous fetch: when, and the leader's log end then.
    last_fetch_ms: i64,
    last_fetch_leader_end: u64,
}

/// One partition's leader.
#[derive(Debug, Clone)]
pub struct LeaderState {
    node: NodeId,
    leader_epoch: u32,
    partition_epoch: u32,
    replicas: Vec<NodeId>,
    isr: Vec<NodeId>,
    pending: Option<IsrChange>,
    /// The log end when this leadership began: records from here on are of this epoch.
    epoch_start: u64,
    followers: BTreeMap<NodeId, Progress>,
    high_watermark: u64,
    config: LeaderConfig,
}

impl LeaderState {
    /// `node` begins to lead at `view`'s epoch over `log`, with the high watermark it knew as a
    /// follower (it never goes back). Every follower gets a full lag window to fetch before it can
    /// leave the ISR.
    pub fn new(
        node: NodeId,
        view: &PartitionView,
        high_watermark: u64,
        log: &impl ReplicaLog,
        now_ms: i64,
        config: LeaderConfig,
    ) -> LeaderState {
        let mut state = LeaderState {
            node,
            leader_epoch: view.leader_epoch,
            partition_epoch: view.partition_epoch,
            replicas: view.replicas.clone(),
            isr: view.isr.clone(),
            pending: None,
            epoch_start: log.log_end(),
            followers: BTreeMap::new(),
            high_watermark: high_watermark.min(log.log_end()),
            config,
        };
        state.track_replicas(now_ms);
        state.update(log);
        state
    }

    fn track_replicas(&mut self, now_ms: i64) {
        let node = self.node;
        let replicas = &self.replicas;
        self.followers.retain(|f, _| replicas.contains(f));
        for &f in replicas.iter().filter(|r| **r != node) {
            self.followers.entry(f).or_insert(Progress {
                known: false,
                log_end: 0,
                flushed: 0,
                last_caught_up_ms: now_ms,
                last_fetch_ms: now_ms,
                last_fetch_leader_end: 0,
            });
        }
    }

    /// The leader epoch.
    pub fn leader_epoch(&self) -> u32 {
        self.leader_epoch
    }

    /// The partition epoch of the last state the controller committed.
    pub fn partition_epoch(&self) -> u32 {
        self.partition_epoch
    }

    /// Where this leadership's records begin.
    pub fn epoch_start(&self) -> u64 {
        self.epoch_start
    }

    /// The committed ISR (what min.insync.replicas is checked against).
    pub fn isr(&self) -> &[NodeId] {
        &self.isr
    }

    /// The replicas.
    pub fn replicas(&self) -> &[NodeId] {
        &self.replicas
    }

    /// The ISR the high watermark waits for: the committed one and a proposed one together.
    pub fn maximal_isr(&self) -> Vec<NodeId> {
        let mut isr = self.isr.clone();
        if let Some(pending) = &self.pending {
            isr.extend(pending.isr.iter().filter(|n| !self.isr.contains(n)));
        }
        isr
    }

    /// The ISR change proposed and not yet committed or refused.
    pub fn pending(&self) -> Option<&IsrChange> {
        self.pending.as_ref()
    }

    /// The high watermark.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// Followers' lag behind the leader's log end, in offsets (unknown followers lag by the whole
    /// log).
    pub fn follower_lags(&self, log_end: u64) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.followers
            .iter()
            .map(move |(f, p)| (*f, log_end.saturating_sub(p.log_end)))
    }

    /// How long each follower has not been caught up, in ms.
    pub fn follower_lag_ms(&self, now_ms: i64) -> impl Iterator<Item = (NodeId, i64)> + '_ {
        self.followers
            .iter()
            .map(move |(f, p)| (*f, now_ms.saturating_sub(p.last_caught_up_ms).max(0)))
    }

    /// Adopts a newer state of the same leadership from the controller (an ISR or replica
    /// change committed). Returns false if `view` is another leadership: the caller ends this one.
    pub fn update_view(&mut self, view: &PartitionView, now_ms: i64) -> bool {
        if view.leader != Some(self.node) || view.leader_epoch != self.leader_epoch {
            return false;
        }
        if view.partition_epoch > self.partition_epoch {
            self.partition_epoch = view.partition_epoch;
            self.replicas = view.replicas.clone();
            self.isr = view.isr.clone();
            // Committed or overtaken: either way the proposal is settled.
            self.pending = None;
            self.track_replicas(now_ms);
        }
        true
    }

    /// The controller refused the proposed change while the state it was decided on is still
    /// current (so it will never apply): decide again. A change whose outcome is unknown (no
    /// answer, or refused as stale) stays pending until a newer state arrives
    /// ([`LeaderState::update_view`]); the caller may send it again.
    pub fn isr_change_refused(&mut self) {
        self.pending = None;
    }

    /// The newest epoch at or below `epoch` held here and where it ends.
    fn end_offset_for(&self, epoch: u32, log: &impl ReplicaLog) -> Option<(u32, u64)> {
        log.end_offset_for_epoch(epoch)
    }

    /// Checks a follower's fetch position against the log and, if it agrees, records the
    /// follower's progress and moves the high watermark.
    pub fn on_fetch(
        &mut self,
        follower: NodeId,
        position: FetchPosition,
        log: &impl ReplicaLog,
        now_ms: i64,
    ) -> FetchCheck {
        if follower == self.node || !self.replicas.contains(&follower) {
            return FetchCheck::NotReplica;
        }
        let (log_start, log_end) = (log.log_start(), log.log_end());
        if let Some(epoch) = position.last_fetched_epoch
            && position.offset > log_start
        {
            match self.end_offset_for(epoch, log) {
                Some((found, end)) if found == epoch && end >= position.offset => {}
                Some((found, end)) => {
                    return FetchCheck::Diverging(DivergingEpoch {
                        epoch: Some(found),
                        end_offset: end,
                    });
                }
                None => {
                    return FetchCheck::Diverging(DivergingEpoch {
                        epoch: None,
                        end_offset: log_start,
                    });
                }
            }
        }
        if position.offset < log_start || position.offset > log_end {
            return FetchCheck::OutOfRange { log_start, log_end };
        }
        if let Some(progress) = self.followers.get_mut(&follower) {
            // Kafka's rule: caught up if it asked for the log end, or for at least what the log
            // end was at its previous fetch (it holds everything that was there then).
            if position.offset >= log_end {
                progress.last_caught_up_ms = progress.last_caught_up_ms.max(now_ms);
            } else if progress.known && position.offset >= progress.last_fetch_leader_end {
                progress.last_caught_up_ms = progress.last_caught_up_ms.max(progress.last_fetch_ms);
            }
            progress.known = true;
            progress.log_end = position.offset;
            progress.flushed = position.flushed.min(position.offset);
            progress.last_fetch_ms = now_ms;
            progress.last_fetch_leader_end = log_end;
        }
        self.update(log);
        FetchCheck::Read {
            offset: position.offset,
        }
    }

    /// A replica's position for the high watermark.
    fn position(&self, log_end: u64, flushed: u64) -> u64 {
        match self.config.durability {
            Durability::Flushed => flushed.min(log_end),
            Durability::InMemory => log_end,
        }
    }

    /// Recomputes the high watermark (after an append, a flush or a fetch). Returns whether it
    /// moved.
    pub fn update(&mut self, log: &impl ReplicaLog) -> bool {
        let log_end = log.log_end();
        let mut hw = if self.config.broken_high_watermark_on_leader_alone {
            log_end
        } else {
            self.position(log_end, log.flushed())
        };
        if !self.config.broken_high_watermark_on_leader_alone {
            for member in self.maximal_isr() {
                if member == self.node {
                    continue;
                }
                let position = match self.followers.get(&member) {
                    Some(p) if p.known => self.position(p.log_end, p.flushed),
                    _ => 0,
                };
                hw = hw.min(position);
            }
        }
        let hw = hw.min(log_end);
        if hw > self.high_watermark {
            self.high_watermark = hw;
            true
        } else {
            false
        }
    }

    /// The ISR change to propose now, if any (one at a time): followers that have not caught up
    /// within the lag limit leave; followers that hold everything up to the high watermark (and
    /// this leadership's first offset; durably, under [`Durability::Flushed`]) return.
    pub fn isr_change(&mut self, now_ms: i64) -> Option<IsrChange> {
        if self.pending.is_some() {
            return None;
        }
        let lag_max = self.config.replica_lag_max_ms;
        let lagging = |f: &NodeId| {
            self.followers
                .get(f)
                .is_some_and(|p| now_ms.saturating_sub(p.last_caught_up_ms) > lag_max)
        };
        let mut isr: Vec<NodeId> = self
            .isr
            .iter()
            .copied()
            .filter(|f| *f == self.node || !lagging(f))
            .collect();
        if isr.len() == self.isr.len() {
            let hw = self.high_watermark;
            let joining = self.replicas.iter().copied().filter(|r| {
                !self.isr.contains(r)
                    && self.followers.get(r).is_some_and(|p| {
                        p.known
                            && p.log_end >= hw
                            && p.log_end >= self.epoch_start
                            && self.position(p.log_end, p.flushed) >= hw
                            && !lagging(r)
                    })
            });
            isr.extend(joining);
        }
        if !isr.contains(&self.node) {
            isr.insert(0, self.node);
        }
        if isr == self.isr {
            return None;
        }
        let change = IsrChange {
            leader_epoch: self.leader_epoch,
            partition_epoch: self.partition_epoch,
            isr,
        };
        self.pending = Some(change.clone());
        Some(change)
    }
}
