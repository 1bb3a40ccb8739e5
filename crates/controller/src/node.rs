//! A controller: one voter of the metadata quorum. It runs Raft, serves the controller wire
//! (peers' Raft RPCs, brokers' commands), and while it leads it is the *active controller*: it
//! carries out commands (registrations, topics, producer ids) by proposing records, tracks
//! brokers' heartbeats, fences brokers silent past their session (moving their leaderships) and
//! gives offline partitions a leader again when one of their ISR comes back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use rand::Rng;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use cairn_protocol::native::ErrorCode;

use crate::decide;
use crate::image::{MetadataImage, Rejected};
use crate::placement::{self, Candidate};
use crate::raft::{Applied, LogStore, Raft, StateMachine};
use crate::records::{MetadataRecord, NodeId, PartitionState, Proposal};
use crate::rpc::{
    Command, CommandError, QuorumStatus, Reply, Request, Response, TopicCreated, read_frame,
    write_frame,
};
use crate::store::RaftStore;

/// How a controller runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// The voters (id to controller address `host:port`), this node among them. A quorum of one
    /// needs no address.
    pub voters: BTreeMap<NodeId, String>,
    /// A broker silent for this long is fenced (Kafka `broker.session.timeout.ms`).
    pub broker_session_timeout: Duration,
    /// Raft's heartbeat interval.
    pub raft_heartbeat: Duration,
    /// Raft's election timeout range: a follower that hears no leader for a random time in it
    /// starts an election.
    pub raft_election_timeout: (Duration, Duration),
    /// Largest frame on the controller wire.
    pub frame_bytes_max: u32,
    /// Most connections the controller listener serves at once.
    pub connections_max: u32,
    /// A frame whose first byte arrived must be complete within this (a stalled or trickled
    /// frame closes the connection).
    pub frame_read_timeout: Duration,
    /// A connection with no request for this long is closed (its peer reconnects when it needs
    /// to), so idle connections cannot hold every one of `connections_max`.
    pub connection_idle_timeout: Duration,
    /// A snapshot is taken after this many entries (it bounds the log and replay at start).
    pub snapshot_entries: u64,
    /// Most partitions in the cluster.
    pub partitions_max: u32,
    /// Most partitions per topic.
    pub partitions_per_topic_max: u32,
    /// Producer ids handed to a broker at a time.
    pub producer_id_block: u32,
    /// How long a proposal may wait for the quorum.
    pub commit_timeout: Duration,
    /// How often leadership moves back to each partition's preferred replica (the first) where
    /// it is live and in sync (Kafka's auto leader rebalance); `None` turns it off.
    pub leader_rebalance_interval: Option<Duration>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_id: 1,
            voters: BTreeMap::from([(1, String::new())]),
            broker_session_timeout: Duration::from_secs(6),
            raft_heartbeat: Duration::from_millis(100),
            raft_election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            frame_bytes_max: 64 << 20,
            connections_max: 1024,
            frame_read_timeout: Duration::from_secs(30),
            connection_idle_timeout: Duration::from_secs(600),
            snapshot_entries: 10_000,
            partitions_max: 10_000,
            partitions_per_topic_max: 10_000,
            producer_id_block: 1000,
            commit_timeout: Duration::from_millis(2500),
            leader_rebalance_interval: Some(Duration::from_secs(30)),
        }
    }
}

/// Starting a controller failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The Raft configuration is not valid.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// The store could not be read.
    #[error("reading the metadata log")]
    Store(#[source] std::io::Error),
    /// Raft did not start.
    #[error("starting Raft: {0}")]
    Raft(String),
}

/// When each broker was last heard from, and the term this controller started leading in.
#[derive(Debug, Default)]
struct Liveness {
    /// The term whose leadership the table belongs to (reset at every new term).
    term: u64,
    /// When this controller took up that term's duties: a broker not heard from since is
    /// counted as heard then (every broker gets a full session from a new leadership).
    term_started: Option<Instant>,
    /// Per broker: (broker epoch, last heartbeat).
    seen: HashMap<NodeId, (u64, Instant)>,
    /// Per broker: the controller connection its last heartbeat came on.
    via: HashMap<NodeId, u64>,
    /// Brokers (node, broker epoch) whose heartbeat connection closed and that have not
    /// heartbeated since, with the term it closed in: fenced at the next duty tick instead of
    /// after their session.
    disconnected: HashMap<(NodeId, u64), u64>,
    /// Brokers heard from (a heartbeat or registration), with the term they were heard in.
    heard: HashMap<NodeId, u64>,
}

/// How long a voter the active controller cannot replicate to, whose broker it has not heard from
/// in its term, waits before that broker is fenced: a node that held both roles and died (its
/// connections closed on a controller that died with it) is fenced in about this time, not after
/// a whole session.
const DEAD_VOTER_FENCE: Duration = Duration::from_millis(1000);

/// A running controller. Cheap to clone.
#[derive(Clone)]
pub struct ControllerNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControllerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerNode")
            .field("node_id", &self.inner.config.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ControllerConfig,
    raft: Raft,
    machine: StateMachine,
    liveness: Mutex<Liveness>,
    /// Numbers the controller wire's connections.
    next_connection: std::sync::atomic::AtomicU64,
    /// The last term in which this node, leading, had applied every entry of its log (see
    /// [`ControllerNode::caught_up`]).
    caught_up_term: std::sync::atomic::AtomicU64,
    stopped: watch::Sender<bool>,
}

fn rejected(code: ErrorCode, message: impl Into<String>) -> CommandError {
    CommandError::Rejected(Rejected {
        code: code.0,
        message: message.into(),
    })
}

impl ControllerNode {
    /// Opens the store, starts Raft (forming the quorum if the store is new: every voter
    /// proposes the same membership, which is safe) and, with a listener, serves the controller
    /// wire on it.
    pub async fn start(
        config: ControllerConfig,
        store: Arc<dyn RaftStore>,
        listener: Option<TcpListener>,
    ) -> Result<ControllerNode, StartError> {
        let machine = {
            let store = Arc::clone(&store);
            tokio::task::spawn_blocking(move || StateMachine::open(store))
                .await
                .map_err(|e| StartError::Store(std::io::Error::other(e)))?
                .map_err(StartError::Store)?
        };
        let raft_config = openraft::Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: millis(config.raft_heartbeat),
            election_timeout_min: millis(config.raft_election_timeout.0),
            election_timeout_max: millis(config.raft_election_timeout.1),
            max_payload_entries: 64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
            max_in_snapshot_log_to_keep: 1000,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let network = crate::network::Network {
            frame_bytes_max: config.frame_bytes_max,
            voters: config.voters.clone(),
        };
        let raft = Raft::new(
            u64::from(config.node_id),
            Arc::new(raft_config),
            network,
            LogStore::new(store),
            machine.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let members: BTreeMap<u64, BasicNode> = config
            .voters
            .iter()
            .map(|(id, addr)| (u64::from(*id), BasicNode { addr: addr.clone() }))
            .collect();
        let formed = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if formed {
            // The quorum is static: its voters are fixed when it forms. Their addresses come
            // from the configuration (a voter may move), their ids must not change.
            let stored: Vec<u64> = raft
                .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
            let configured: Vec<u64> = members.keys().copied().collect();
            if stored != configured {
                let _ = raft.shutdown().await;
                return Err(StartError::Config(format!(
                    "controller_quorum lists voters {configured:?}, but the quorum in the metadata \
                     log was formed with {stored:?}; the voters cannot change"
                )));
            }
        } else {
            match raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(node_id = config.node_id, voters = ?config.voters.keys(), "metadata quorum formed")
                }
                // Another voter's entries reached this one first.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(err) => return Err(StartError::Raft(err.to_string())),
            }
        }
        let (stopped, _) = watch::channel(false);
        let node = ControllerNode {
            inner: Arc::new(Inner {
                config,
                raft,
                machine,
                liveness: Mutex::new(Liveness::default()),
                next_connection: std::sync::atomic::AtomicU64::new(0),
                caught_up_term: std::sync::atomic::AtomicU64::new(u64::MAX),
                stopped,
            }),
        };
        if let Some(listener) = listener {
            tokio::spawn(node.clone().serve(listener));
        }
        tokio::spawn(node.clone().duties());
        Ok(node)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// The image after every applied entry, as a feed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.inner.machine.subscribe()
    }

    /// The current image.
    pub fn image(&self) -> Arc<MetadataImage> {
        self.inner.machine.image()
    }

    /// The active controller, as far as this node knows.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .current_leader
            .and_then(|l| NodeId::try_from(l).ok())
    }

    /// Whether this node is the active controller.
    pub fn is_active(&self) -> bool {
        self.leader() == Some(self.node_id())
    }

    /// The leader's id and controller address, if known.
    fn leader_hint(&self) -> Option<(NodeId, String)> {
        let leader = self.leader()?;
        let addr = self.inner.config.voters.get(&leader).cloned()?;
        Some((leader, addr))
    }

    /// The Raft state of this node.
    pub fn status(&self) -> QuorumStatus {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let replication = metrics.replication.unwrap_or_default();
        QuorumStatus {
            node_id: self.node_id(),
            leader: metrics
                .current_leader
                .and_then(|l| NodeId::try_from(l).ok()),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index,
            committed: metrics.last_applied.map(|l| l.index),
            applied_offset: self.image().offset,
            voters: metrics
                .membership_config
                .voter_ids()
                .filter_map(|id| {
                    let matched = replication.get(&id).cloned().flatten().map(|l| l.index);
                    Some((NodeId::try_from(id).ok()?, matched))
                })
                .collect(),
        }
    }

    /// Stops Raft and this node's tasks.
    pub async fn shutdown(&self) {
        self.inner.stopped.send_replace(true);
        if let Err(err) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %err, "Raft did not shut down cleanly");
        }
    }

    /// Proposes records and waits until they are committed and applied here.
    async fn propose(&self, records: Vec<MetadataRecord>) -> Result<Applied, CommandError> {
        let write = self.inner.raft.client_write(Proposal { records });
        match tokio::time::timeout(self.inner.config.commit_timeout, write).await {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward)))) => {
                Err(CommandError::NotController {
                    leader: forward.leader_id.and_then(|id| {
                        let id = NodeId::try_from(id).ok()?;
                        Some((id, self.inner.config.voters.get(&id)?.clone()))
                    }),
                })
            }
            Ok(Err(err)) => Err(CommandError::Unavailable(err.to_string())),
            Err(_) => Err(CommandError::Unavailable(format!(
                "not committed within {:?}",
                self.inner.config.commit_timeout
            ))),
        }
    }

    /// Proposes and turns a rejection into an error; returns the entry's offset.
    async fn commit(&self, records: Vec<MetadataRecord>) -> Result<u64, CommandError> {
        let applied = self.propose(records).await?;
        applied.result?;
        Ok(applied.offset)
    }

    /// Commits `records` as they are, on the active controller: for importing the metadata of a
    /// single node from before the controller existed. Returns the metadata offset after them.
    pub async fn import(&self, records: Vec<MetadataRecord>) -> Result<u64, CommandError> {
        self.commit(records).await
    }

    /// Carries out a broker's command, if this node is the active controller.
    pub async fn execute(&self, command: Command) -> Result<Reply, CommandError> {
        if !self.is_active() {
            return Err(CommandError::NotController {
                leader: self.leader_hint(),
            });
        }
        // A leader new to its term answers on its image once that holds everything committed
        // before.
        self.until_caught_up().await?;
        match command {
            Command::Register(info) => self.register(info).await,
            Command::Heartbeat {
                node_id,
                broker_epoch,
                metadata_offset,
                shutting_down,
                want_fence,
            } => {
                self.heartbeat(
                    node_id,
                    broker_epoch,
                    metadata_offset,
                    (shutting_down, want_fence),
                )
                .await
            }
            Command::CreateTopics {
                topics,
                validate_only,
            } => {
                let mut results = Vec::with_capacity(topics.len());
                for spec in topics {
                    let name = spec.name.clone();
                    let result = match self.create_topic(spec, validate_only).await {
                        Ok(created) => Ok(created),
                        Err(CommandError::Rejected(rejected)) => Err(rejected),
                        Err(other) => return Err(other),
                    };
                    results.push((name, result));
                }
                Ok(Reply::Topics(results))
            }
            Command::DeleteTopics { names } => {
                let mut results = Vec::with_capacity(names.len());
                for name in names {
                    let image = self.image();
                    let result = match image.topic(&name) {
                        None => Err(Rejected {
                            code: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                            message: format!("topic {name:?} does not exist"),
                        }),
                        Some(topic) => {
                            let record = MetadataRecord::TopicDeleted {
                                name: name.clone(),
                                topic_id: topic.id,
                            };
                            match self.commit(vec![record]).await {
                                Ok(_) => Ok(()),
                                Err(CommandError::Rejected(rejected)) => Err(rejected),
                                Err(other) => return Err(other),
                            }
                        }
                    };
                    results.push((name, result));
                }
                Ok(Reply::Deleted(results))
            }
            Command::CreatePartitions {
                topic,
                count,
                validate_only,
            } => self.create_partitions(&topic, count, validate_only).await,
            Command::ElectLeaders {
                unclean,
                partitions,
            } => self.elect_leaders(unclean, partitions).await,
            Command::AlterPartitionReassignments { reassignments } => {
                let mut results = Vec::with_capacity(reassignments.len());
                for (topic, partition, target) in reassignments {
                    let result = match self.reassign(&topic, partition, target).await {
                        Ok(()) => Ok(()),
                        Err(CommandError::Rejected(rejected)) => Err(rejected),
                        Err(other) => return Err(other),
                    };
                    results.push((topic, partition, result));
                }
                Ok(Reply::Reassignments(results))
            }
            Command::AlterPartition {
                node_id,
                broker_epoch,
                topic,
                partition,
                leader_epoch,
                partition_epoch,
                isr,
            } => {
                self.alter_partition(
                    node_id,
                    broker_epoch,
                    &topic,
                    partition,
                    (leader_epoch, partition_epoch),
                    isr,
                )
                .await
            }
            Command::AllocateProducerIds { node_id } => {
                // Two allocations decided on the same image: the second is refused as stale
                // and decided again.
                for _ in 0..10 {
                    let first = self.image().next_producer_id;
                    let count = self.inner.config.producer_id_block;
                    let record = MetadataRecord::ProducerIdsAllocated {
                        node_id,
                        first,
                        count,
                    };
                    match self.commit(vec![record]).await {
                        Ok(_) => return Ok(Reply::ProducerIds { first, count }),
                        Err(CommandError::Rejected(r))
                            if r.error_code() == ErrorCode::INVALID_UPDATE_VERSION => {}
                        Err(other) => return Err(other),
                    }
                }
                Err(CommandError::Unavailable(
                    "producer id allocation kept conflicting".into(),
                ))
            }
        }
    }

    fn last_seen(&self, node: NodeId, epoch: u64) -> Option<Instant> {
        let liveness = self.liveness();
        liveness
            .seen
            .get(&node)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, at)| *at)
    }

    fn liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.inner
            .liveness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn saw(&self, node: NodeId, epoch: u64) {
        let term = self.inner.raft.metrics().borrow().current_term;
        let mut liveness = self.liveness();
        liveness.seen.insert(node, (epoch, Instant::now()));
        liveness.heard.insert(node, term);
        liveness.disconnected.retain(|(n, _), _| *n != node);
    }

    /// A broker's command succeeded on connection `connection`: its heartbeats come there.
    fn carried(&self, node: NodeId, connection: u64) {
        self.liveness().via.insert(node, connection);
    }

    /// Connection `connection` closed: the brokers whose heartbeats came on it are fenced at
    /// once (a process that died closed its sockets), unless they heartbeat again first on
    /// another connection.
    fn closed(&self, connection: u64) {
        if !self.is_active() {
            return;
        }
        let image = self.image();
        let term = self.inner.raft.metrics().borrow().current_term;
        let mut liveness = self.liveness();
        let gone: Vec<NodeId> = liveness
            .via
            .iter()
            .filter(|(_, c)| **c == connection)
            .map(|(n, _)| *n)
            .collect();
        for node in gone {
            liveness.via.remove(&node);
            if let Some(broker) = image.brokers.get(&node).filter(|b| !b.fenced) {
                tracing::info!(node, "broker's controller connection closed");
                liveness.disconnected.insert((node, broker.epoch), term);
            }
        }
    }

    async fn register(&self, info: crate::records::BrokerInfo) -> Result<Reply, CommandError> {
        let node = info.node_id;
        let image = self.image();
        if let Some(broker_epoch) = decide::existing_registration(&image, &info) {
            // A retry of a registration that took effect.
            self.saw(node, broker_epoch);
            return Ok(Reply::Registered { broker_epoch });
        }
        if let Some(existing) = image.brokers.get(&node) {
            let session = self.inner.config.broker_session_timeout;
            let restarted = !info.dir_id.is_empty() && existing.info.dir_id == info.dir_id;
            let alive = !existing.fenced
                && self
                    .last_seen(node, existing.epoch)
                    .is_some_and(|at| at.elapsed() < session);
            if alive && !restarted {
                return Err(rejected(
                    ErrorCode::DUPLICATE_BROKER_REGISTRATION,
                    format!(
                        "broker {node} is registered by a live incarnation ({}); a second process \
                         with the same node id is refused",
                        existing.info.incarnation
                    ),
                ));
            }
        }
        let offset = self.commit(decide::register(&image, info)).await?;
        let broker_epoch = offset.saturating_sub(1);
        self.saw(node, broker_epoch);
        tracing::info!(node, broker_epoch, "broker registered");
        Ok(Reply::Registered { broker_epoch })
    }

    async fn heartbeat(
        &self,
        node: NodeId,
        broker_epoch: u64,
        metadata_offset: u64,
        (shutting_down, want_fence): (bool, bool),
    ) -> Result<Reply, CommandError> {
        let image = self.image();
        let decided = decide::heartbeat(
            &image,
            node,
            broker_epoch,
            metadata_offset,
            shutting_down,
            want_fence,
        )
        .map_err(CommandError::Rejected)?;
        self.saw(node, broker_epoch);
        match decided {
            decide::Heartbeat::Fence(records) => {
                self.commit(records).await?;
                tracing::info!(
                    node,
                    shutting_down,
                    want_fence,
                    "broker asked to be fenced (shutting down, or it cannot write): fenced, \
                     leaderships moved"
                );
                Ok(Reply::Heartbeat { fenced: true })
            }
            decide::Heartbeat::Unfence(records) => {
                self.commit(records).await?;
                tracing::info!(node, broker_epoch, "broker unfenced");
                Ok(Reply::Heartbeat { fenced: false })
            }
            decide::Heartbeat::Unchanged { fenced } => {
                // Nothing to commit: confirm with a quorum that this node still leads before
                // the answer grants a lease. A deposed controller that does not know it yet
                // (paused, cut off) would otherwise answer from its stale image, and a broker,
                // itself included, would lead on it.
                self.confirm_leadership().await?;
                Ok(Reply::Heartbeat { fenced })
            }
        }
    }

    /// Whether this node, leading, has an image that holds every record committed before its
    /// leadership: once in its term it applied every entry of its log (a leader's log holds every
    /// committed entry). Until then its image may lack brokers, topics and leaders committed
    /// before: a newly elected leader has not committed its blank entry yet, and one restarted
    /// straight back into its own term (openraft restores it as leader, appending nothing) applies
    /// its log only as a quorum confirms it again.
    fn caught_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        let term = metrics.current_term;
        if self.inner.caught_up_term.load(Ordering::Acquire) == term {
            return true;
        }
        let applied = metrics.last_applied.map(|id| id.index);
        let leading = metrics.current_leader == Some(u64::from(self.node_id()));
        if leading && applied >= metrics.last_log_index {
            self.inner.caught_up_term.store(term, Ordering::Release);
            return true;
        }
        false
    }

    /// Waits until [`ControllerNode::caught_up`] (at most the commit timeout).
    async fn until_caught_up(&self) -> Result<(), CommandError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.commit_timeout;
        let mut metrics = self.inner.raft.metrics();
        while !self.caught_up() {
            if !self.is_active() {
                return Err(CommandError::NotController {
                    leader: self.leader_hint(),
                });
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(CommandError::Unavailable("controller stopped".into())),
                Err(_) => {
                    return Err(CommandError::Unavailable(
                        "the new active controller has not applied its log yet".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks with a quorum of voters that this node is still the leader.
    async fn confirm_leadership(&self) -> Result<(), CommandError> {
        let check = self.inner.raft.ensure_linearizable();
        match tokio::time::timeout(self.inner.config.commit_timeout, check).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(CommandError::NotController {
                leader: self.leader_hint(),
            }),
            Err(_) => Err(CommandError::Unavailable(
                "leadership not confirmed by a quorum in time".into(),
            )),
        }
    }

    /// Starts or cancels one partition's reassignment. A reassignment that only removes or
    /// reorders in-sync replicas completes at once; one that adds replicas completes (in the
    /// duty loop) once they are all in sync.
    async fn reassign(
        &self,
        topic: &str,
        partition: u32,
        target: Option<Vec<NodeId>>,
    ) -> Result<(), CommandError> {
        let image = self.image();
        let Some(state) = image.partition(topic, partition) else {
            return Err(rejected(
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("{topic}-{partition} does not exist"),
            ));
        };
        let live = |r: NodeId| image.is_live(r);
        let change = match target {
            None => placement::cancel_reassignment(state, live).ok_or_else(|| {
                rejected(
                    ErrorCode::NO_REASSIGNMENT_IN_PROGRESS,
                    format!("{topic}-{partition} is not being reassigned"),
                )
            })?,
            Some(target) => {
                if let Some(unknown) = target.iter().find(|r| !image.brokers.contains_key(r)) {
                    return Err(rejected(
                        ErrorCode::INVALID_REPLICA_ASSIGNMENT,
                        format!("broker {unknown} is not registered"),
                    ));
                }
                let started = placement::start_reassignment(state, &target).map_err(|why| {
                    let code = if state.reassigning() {
                        ErrorCode::REASSIGNMENT_IN_PROGRESS
                    } else {
                        ErrorCode::INVALID_REPLICA_ASSIGNMENT
                    };
                    rejected(code, format!("{topic}-{partition}: {why}"))
                })?;
                let Some(started) = started else {
                    return Ok(());
                };
                // Nothing to add: it may complete in the same step.
                let next = crate::image::changed(state, &started);
                placement::complete_reassignment(&next, live).unwrap_or(started)
            }
        };
        let record = MetadataRecord::PartitionChanged {
            topic: topic.to_string(),
            partition,
            expected_partition_epoch: state.partition_epoch,
            target: change,
        };
        self.commit(vec![record]).await?;
        tracing::info!(topic, partition, "reassignment changed");
        Ok(())
    }

    /// Elections an operator asked for, each committed on its own (one may fail while another
    /// succeeds). Asking for every partition reports only those that were elected or could not
    /// be (partitions already led as asked are skipped).
    async fn elect_leaders(
        &self,
        unclean: bool,
        partitions: Option<Vec<(String, u32)>>,
    ) -> Result<Reply, CommandError> {
        let image = self.image();
        let all = partitions.is_none();
        let wanted: Vec<(String, u32)> = partitions.unwrap_or_else(|| {
            image
                .partitions()
                .map(|(t, p, _)| (t.to_string(), p))
                .collect()
        });
        let mut results = Vec::with_capacity(wanted.len());
        for (topic, partition) in wanted {
            let image = self.image();
            let Some(state) = image.partition(&topic, partition) else {
                results.push((
                    topic.clone(),
                    partition,
                    Err(Rejected {
                        code: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                        message: format!("{topic}-{partition} does not exist"),
                    }),
                ));
                continue;
            };
            let live = |r: NodeId| image.is_live(r);
            let target = if unclean {
                match state.leader {
                    Some(_) => Err((ErrorCode::ELECTION_NOT_NEEDED, "it has a leader")),
                    None => placement::on_unfenced_any(state, live)
                        .or_else(|| placement::elect_unclean(state, live))
                        .ok_or((
                            ErrorCode::ELIGIBLE_LEADERS_NOT_AVAILABLE,
                            "no replica is live",
                        )),
                }
            } else if state.replicas.first().copied() == state.leader {
                Err((
                    ErrorCode::ELECTION_NOT_NEEDED,
                    "its preferred replica leads",
                ))
            } else {
                placement::preferred_leader(state, live).ok_or((
                    ErrorCode::PREFERRED_LEADER_NOT_AVAILABLE,
                    "its preferred replica is not live and in sync",
                ))
            };
            let result = match target {
                Err((code, _)) if all && code == ErrorCode::ELECTION_NOT_NEEDED => continue,
                Err((code, why)) => Err(Rejected {
                    code: code.0,
                    message: format!("{topic}-{partition}: {why}"),
                }),
                Ok(target) => {
                    let record = MetadataRecord::PartitionChanged {
                        topic: topic.clone(),
                        partition,
                        expected_partition_epoch: state.partition_epoch,
                        target,
                    };
                    match self.commit(vec![record]).await {
                        Ok(_) => Ok(()),
                        Err(CommandError::Rejected(rejected)) => Err(rejected),
                        Err(other) => return Err(other),
                    }
                }
            };
            results.push((topic, partition, result));
        }
        Ok(Reply::Elected(results))
    }

    /// A leader's ISR change: refused if the leader, its registration or either epoch is no
    /// longer current (the leader learns the current state from its image: INVALID_UPDATE_VERSION,
    /// FENCED_LEADER_EPOCH, STALE_BROKER_EPOCH), or if a joining replica's broker is not live
    /// (INELIGIBLE_REPLICA: only live brokers enter the ISR, KIP-841).
    async fn alter_partition(
        &self,
        node: NodeId,
        broker_epoch: u64,
        topic: &str,
        partition: u32,
        (leader_epoch, partition_epoch): (u32, u32),
        isr: Vec<NodeId>,
    ) -> Result<Reply, CommandError> {
        let image = self.image();
        let record = decide::alter_partition(
            &image,
            node,
            broker_epoch,
            topic,
            partition,
            (leader_epoch, partition_epoch),
            &isr,
        )
        .map_err(CommandError::Rejected)?;
        self.commit(vec![record]).await?;
        tracing::info!(topic, partition, ?isr, "ISR changed");
        Ok(Reply::PartitionChanged {
            partition_epoch: partition_epoch + 1,
        })
    }

    async fn create_topic(
        &self,
        spec: crate::rpc::TopicSpec,
        validate_only: bool,
    ) -> Result<TopicCreated, CommandError> {
        let image = self.image();
        let config = &self.inner.config;
        if image.topic(&spec.name).is_some() {
            return Err(rejected(
                ErrorCode::TOPIC_ALREADY_EXISTS,
                format!("topic {:?} already exists", spec.name),
            ));
        }
        if spec.partitions == 0 || spec.partitions > config.partitions_per_topic_max {
            return Err(rejected(
                ErrorCode::INVALID_PARTITIONS,
                format!(
                    "{} partitions; a topic has 1 to {}",
                    spec.partitions, config.partitions_per_topic_max
                ),
            ));
        }
        let total = image.n_partitions() + u64::from(spec.partitions);
        if total > u64::from(config.partitions_max) {
            return Err(rejected(
                ErrorCode::POLICY_VIOLATION,
                format!(
                    "{total} partitions would exceed partitions_max = {}",
                    config.partitions_max
                ),
            ));
        }
        let candidates = candidates(&image);
        let rf = spec
            .replication_factor
            .unwrap_or_else(|| default_replication_factor(candidates.len()));
        let replicas = self.place(0, spec.partitions, rf, &candidates)?;
        let created = TopicCreated {
            partitions: spec.partitions,
            replication_factor: rf,
        };
        if validate_only {
            return Ok(created);
        }
        let record = MetadataRecord::TopicCreated {
            name: spec.name.clone(),
            config: spec.config,
            created_ms: unix_ms(),
            partitions: replicas
                .into_iter()
                .map(|r| {
                    let leader = r.first().copied();
                    PartitionState::new(r, leader)
                })
                .collect(),
        };
        self.commit(vec![record]).await?;
        tracing::info!(topic = %spec.name, partitions = spec.partitions, replication_factor = rf, "topic created");
        Ok(created)
    }

    async fn create_partitions(
        &self,
        topic: &str,
        count: u32,
        validate_only: bool,
    ) -> Result<Reply, CommandError> {
        let image = self.image();
        let Some(found) = image.topic(topic) else {
            return Err(rejected(
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("topic {topic:?} does not exist"),
            ));
        };
        let current = found.partitions.len() as u32;
        if count <= current || count > self.inner.config.partitions_per_topic_max {
            return Err(rejected(
                ErrorCode::INVALID_PARTITIONS,
                format!(
                    "{topic} has {current} partitions; it can grow to at most {}, not to {count}",
                    self.inner.config.partitions_per_topic_max
                ),
            ));
        }
        let total = image.n_partitions() + u64::from(count - current);
        if total > u64::from(self.inner.config.partitions_max) {
            return Err(rejected(
                ErrorCode::POLICY_VIOLATION,
                format!(
                    "{total} partitions would exceed partitions_max = {}",
                    self.inner.config.partitions_max
                ),
            ));
        }
        let rf = found
            .partitions
            .first()
            .map_or(1, |p| p.replicas.len() as u16);
        let replicas = self.place(current, count - current, rf, &candidates(&image))?;
        if validate_only {
            return Ok(Reply::PartitionsCreated);
        }
        let record = MetadataRecord::PartitionsCreated {
            topic: topic.to_string(),
            expected_count: current,
            partitions: replicas
                .into_iter()
                .map(|r| {
                    let leader = r.first().copied();
                    PartitionState::new(r, leader)
                })
                .collect(),
        };
        self.commit(vec![record]).await?;
        Ok(Reply::PartitionsCreated)
    }

    fn place(
        &self,
        first: u32,
        n: u32,
        rf: u16,
        candidates: &[Candidate],
    ) -> Result<Vec<Vec<NodeId>>, CommandError> {
        let (start, shift) = {
            let mut rng = rand::rng();
            let n = candidates.len().max(1);
            (rng.random_range(0..n), rng.random_range(0..n))
        };
        placement::assign_replicas(first, n, rf, candidates, start, shift)
            .map_err(|e| rejected(ErrorCode::INVALID_REPLICATION_FACTOR, e.to_string()))
    }

    /// The active controller's periodic work: fence brokers silent past their session, and give
    /// offline partitions a leader when a live ISR member can take it.
    async fn duties(self) {
        let mut stopped = self.inner.stopped.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_leader = None;
        let mut unreachable_since: BTreeMap<u64, Instant> = BTreeMap::new();
        let mut rebalanced = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.changed() => return,
            }
            let metrics = self.inner.raft.metrics().borrow().clone();
            if metrics.current_leader != seen_leader {
                seen_leader = metrics.current_leader;
                tracing::info!(node = self.node_id(), term = metrics.current_term, leader = ?seen_leader, "active controller changed");
            }
            // A voter the leader cannot replicate to, reported once per outage.
            for (voter, matched) in metrics.replication.iter().flatten() {
                let behind = matched.map(|m| m.index) < metrics.last_log_index;
                if behind {
                    let since = unreachable_since.entry(*voter).or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_secs(2)
                        && since.elapsed() < Duration::from_millis(2250)
                    {
                        tracing::warn!(voter, "controller voter not keeping up (down or cut off?)");
                    }
                } else if unreachable_since
                    .remove(voter)
                    .is_some_and(|s| s.elapsed() >= Duration::from_secs(2))
                {
                    tracing::info!(voter, "controller voter caught up");
                }
            }
            // A new leader decides nothing before its image holds everything committed before
            // its term (seen: a controller restarted straight back into leadership fenced a
            // broker its image did not list yet, 250 ms after taking over).
            if !self.is_active() || !self.caught_up() {
                continue;
            }
            let term = self.inner.raft.metrics().borrow().current_term;
            let image = self.image();
            let expired = {
                let mut liveness = self.liveness();
                if liveness.term != term {
                    // A new leadership knows no heartbeat from before it: every broker gets a
                    // full session from now. Heartbeats and closes this term already saw (before
                    // this first tick, while it caught up) count.
                    liveness.term = term;
                    liveness.term_started = Some(Instant::now());
                    liveness.disconnected.retain(|_, t| *t == term);
                    liveness.heard.retain(|_, t| *t == term);
                }
                let session = self.inner.config.broker_session_timeout;
                let term_started = liveness.term_started.unwrap_or_else(Instant::now);
                // A voter this controller cannot reach, whose broker has not spoken to it in
                // this term: the whole node is down (it may have been the previous controller,
                // so no closed connection told anyone).
                let node_down = |node: NodeId| {
                    !liveness.heard.contains_key(&node)
                        && unreachable_since
                            .get(&u64::from(node))
                            .is_some_and(|since| since.elapsed() >= DEAD_VOTER_FENCE)
                };
                image
                    .live_brokers()
                    .filter(|b| {
                        node_down(b.info.node_id)
                            || liveness
                                .disconnected
                                .contains_key(&(b.info.node_id, b.epoch))
                            || liveness
                                .seen
                                .get(&b.info.node_id)
                                .filter(|(epoch, _)| *epoch == b.epoch)
                                .map_or(term_started, |(_, at)| (*at).max(term_started))
                                .elapsed()
                                >= session
                    })
                    .map(|b| (b.info.node_id, b.epoch))
                    .collect::<Vec<_>>()
            };
            for (node, epoch) in expired {
                let image = self.image();
                let why = if self
                    .liveness()
                    .disconnected
                    .remove(&(node, epoch))
                    .is_some()
                {
                    "its controller connection closed"
                } else if unreachable_since.contains_key(&u64::from(node)) {
                    "its node is unreachable and silent since this controller took over"
                } else {
                    "silent past its session"
                };
                match self.commit(decide::fence(&image, node, epoch)).await {
                    Ok(_) => tracing::warn!(node, why, "broker fenced"),
                    Err(err) => tracing::debug!(node, error = %err, "fencing failed; retrying"),
                }
            }
            let image = self.image();
            let elections = decide::partition_changes_by_topic(&image, |topic, state| {
                if state.leader.is_some() {
                    return None;
                }
                match placement::elect_leader(state, |r| image.is_live(r)) {
                    Some(leader) => placement::on_unfenced(state, leader, |r| image.is_live(r)),
                    // No live in-sync replica: only a topic that allows it takes another.
                    None if unclean_allowed(topic) => {
                        placement::elect_unclean(state, |r| image.is_live(r))
                    }
                    None => None,
                }
            });
            if !elections.is_empty()
                && let Err(err) = self.commit(elections).await
            {
                tracing::debug!(error = %err, "electing leaders failed; retrying");
            }
            // Reassignments whose new replicas are all in sync complete.
            let image = self.image();
            let completed = decide::partition_changes(&image, |state| {
                placement::complete_reassignment(state, |r| image.is_live(r))
            });
            if !completed.is_empty() {
                let n = completed.len();
                match self.commit(completed).await {
                    Ok(_) => tracing::info!(partitions = n, "reassignments completed"),
                    Err(err) => tracing::debug!(error = %err, "completing reassignments failed"),
                }
            }
            if let Some(interval) = self.inner.config.leader_rebalance_interval
                && rebalanced.elapsed() >= interval
            {
                rebalanced = Instant::now();
                let image = self.image();
                let moves = decide::partition_changes(&image, |state| {
                    placement::preferred_leader(state, |r| image.is_live(r))
                });
                let n = moves.len();
                if n > 0 {
                    match self.commit(moves).await {
                        Ok(_) => tracing::info!(
                            partitions = n,
                            "leadership moved back to preferred replicas"
                        ),
                        Err(err) => {
                            tracing::debug!(error = %err, "preferred leader election failed")
                        }
                    }
                }
            }
        }
    }

    async fn serve(self, listener: TcpListener) {
        let permits = Arc::new(Semaphore::new(self.inner.config.connections_max as usize));
        let mut stopped = self.inner.stopped.subscribe();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "controller listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                tracing::warn!(%peer, "controller connection refused: connections_max reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let node = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(err) = node.connection(stream).await {
                    tracing::debug!(%peer, error = %err, "controller connection closed");
                }
            });
        }
    }

    async fn connection(&self, stream: tokio::net::TcpStream) -> std::io::Result<()> {
        let id = self
            .inner
            .next_connection
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut stopped = self.inner.stopped.subscribe();
        let result = tokio::select! {
            result = self.exchange(stream, id) => result,
            _ = stopped.changed() => return Ok(()),
        };
        self.closed(id);
        result
    }

    /// Requests and responses on connection `id` until it closes.
    async fn exchange(&self, mut stream: tokio::net::TcpStream, id: u64) -> std::io::Result<()> {
        let (max, stall) = (
            self.inner.config.frame_bytes_max,
            self.inner.config.frame_read_timeout,
        );
        let idle = self.inner.config.connection_idle_timeout;
        loop {
            let next = read_frame::<Request>(&mut stream, max, stall);
            let Ok(request) = tokio::time::timeout(idle, next).await else {
                return Ok(()); // idle: closed
            };
            let Some(request) = request? else {
                return Ok(());
            };
            let broker = match &request {
                Request::Command(Command::Heartbeat { node_id, .. }) => Some(*node_id),
                Request::Command(Command::Register(info)) => Some(info.node_id),
                _ => None,
            };
            let response = self.handle(request).await;
            if let (Some(node), Response::Command(Ok(_))) = (broker, &response) {
                self.carried(node, id);
            }
            write_frame(&mut stream, &response, max).await?;
        }
    }

    async fn handle(&self, request: Request) -> Response {
        let raft = &self.inner.raft;
        match request {
            Request::AppendEntries(rpc) => Response::AppendEntries(raft.append_entries(rpc).await),
            Request::Vote(rpc) => Response::Vote(raft.vote(rpc).await),
            Request::InstallSnapshot(rpc) => {
                Response::InstallSnapshot(raft.install_snapshot(rpc).await)
            }
            Request::Command(command) => Response::Command(
                self.execute(command)
                    .await
                    .map(|reply| (reply, self.image().offset)),
            ),
            Request::FetchMetadata { after, max_wait_ms } => {
                let mut feed = self.subscribe();
                let wait = Duration::from_millis(max_wait_ms.min(60_000));
                let moved = feed.wait_for(|image| image.offset > after);
                let image = match tokio::time::timeout(wait, moved).await {
                    Ok(Ok(image)) => Some((**image).clone()),
                    _ => None,
                };
                Response::Metadata(image)
            }
            Request::DescribeQuorum => Response::Quorum(self.status()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `min(3, brokers)`: three copies where there are three brokers (Kafka's default is 1; a
/// broker's loss should not lose data by default).
fn default_replication_factor(n_live: usize) -> u16 {
    u16::try_from(n_live.clamp(1, 3)).unwrap_or(1)
}

fn candidates(image: &MetadataImage) -> Vec<Candidate> {
    image
        .live_brokers()
        .map(|b| Candidate {
            node_id: b.info.node_id,
            rack: b.info.rack.clone(),
        })
        .collect()
}

/// Whether a topic allows electing a replica outside the ISR when no in-sync replica is live
/// (`unclean.leader.election.enable`, off by default: it can lose acknowledged records).
fn unclean_allowed(topic: &crate::image::TopicImage) -> bool {
    topic
        .config
        .get("unclean.leader.election.enable")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}
