//! The controller and replication together in a seeded simulation: three replicas of one
//! partition over in-memory logs; the controller's own decisions (`cairn_controller::decide`:
//! registration, fencing, unfencing once a broker applied its fence, AlterPartition checked
//! against the leader, its broker epoch and the partition epoch) committed to the controller's
//! own metadata image (`MetadataImage::apply`, which refuses a stale decision), the brokers
//! following that image as it reaches them; a network that delays, reorders and drops every
//! message; producers with acks=all and min.insync.replicas 2; and faults: process crashes, power
//! losses (a log keeps only what was flushed), EIO from fsync (the log is poisoned: no more
//! appends or flushes, and the broker asks to be fenced until it restarts; what was not synced
//! may be gone, as after Linux's fsync errors), false suspicion by the controller, isolated
//! nodes, and failovers of the active controller (messages to it lost for a while; the committed image
//! kept, as Raft keeps it). Raft itself is openraft's, tested by its authors; what is simulated
//! here is everything Cairn decides on top of it.
//!
//! Invariants checked after every step: no acknowledged record is missing from the current
//! leader's log; every replica's log below its high watermark equals the committed log; a
//! replica's high watermark never goes back within one life; one leader per epoch. After the
//! faults heal, every replica's log equals the leader's and each acknowledged record is there
//! once.
//!
//! A failure names its seed; replay one with
//! `CAIRN_SIM_SEED=<seed> CAIRN_SIM_MODE=<mode> cargo test -p cairn-replication --test simulation replay -- --nocapture`.
//! `CAIRN_SIM_SEEDS=<n>` runs more seeds (the soak script does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};

use cairn_controller::decide;
use cairn_controller::image::MetadataImage;
use cairn_controller::records::{BrokerInfo, Endpoint, MetadataRecord, PartitionState, Proposal};
use cairn_protocol::native::ErrorCode;
use cairn_replication::memlog::MemLog;
use cairn_replication::{
    DivergingEpoch, Durability, FetchCheck, FetchPosition, FollowerState, IsrChange, LeaderConfig,
    LeaderState, NodeId, PartitionView, ReplicaLog,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NODES: [NodeId; 3] = [1, 2, 3];
const CONTROLLER: NodeId = 0;
const MIN_ISR: usize = 2;
const FAULT_MS: i64 = 2500;
const TOTAL_MS: i64 = 5000;
const FETCH_MAX: usize = 4;
const TOPIC: &str = "t";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    durability: Durability,
    /// Crashes may be power losses (unflushed records lost), several nodes at once.
    power_loss: bool,
    /// The negative control: the high watermark on the leader's log end alone.
    broken_hw: bool,
    /// The negative control: followers claim their log ends in the leader's epoch, so they
    /// never truncate where they diverge.
    broken_truncation: bool,
}

impl Options {
    fn mode(&self) -> &'static str {
        if self.broken_truncation {
            return "no-truncation";
        }
        match (self.durability, self.power_loss, self.broken_hw) {
            (_, _, true) => "leader-alone",
            (Durability::Flushed, _, _) => "durable",
            (Durability::InMemory, false, _) => "in-memory",
            (Durability::InMemory, true, _) => "in-memory-power-loss",
        }
    }

    fn from_mode(mode: &str) -> Options {
        let (durability, power_loss, broken_hw) = match mode {
            "durable" => (Durability::Flushed, true, false),
            "in-memory" => (Durability::InMemory, false, false),
            "in-memory-power-loss" => (Durability::InMemory, true, false),
            "leader-alone" => (Durability::Flushed, false, true),
            "no-truncation" => (Durability::Flushed, false, false),
            other => panic!("unknown mode {other}"),
        };
        Options {
            durability,
            power_loss,
            broken_hw,
            broken_truncation: mode == "no-truncation",
        }
    }
}

#[derive(Debug, Clone)]
enum Response {
    Records { records: Vec<(u32, u64)>, hw: u64 },
    Diverging(DivergingEpoch),
    OutOfRange { log_end: u64 },
    Refused,
}

#[derive(Debug, Clone)]
enum Msg {
    Fetch {
        from: NodeId,
        epoch: u32,
        seq: u64,
        position: FetchPosition,
    },
    FetchResponse {
        from: NodeId,
        epoch: u32,
        seq: u64,
        response: Response,
    },
    Alter {
        from: NodeId,
        broker_epoch: u64,
        change: IsrChange,
    },
    /// The controller's answer: applied, or refused (`definitive`: the state it was decided on
    /// is still current, so it will not be applied).
    AlterResponse { definitive_refusal: bool },
    /// The partition's state in the controller's image, and the image's offset.
    View(PartitionView, u64),
    /// The controller lost sight of a node (its connection closed, or it went silent).
    Down(NodeId),
    /// A node's heartbeat: its registration and the metadata it has applied.
    Heartbeat {
        node: NodeId,
        broker_epoch: u64,
        offset: u64,
        /// It cannot write (its log is poisoned): fence it.
        want_fence: bool,
    },
    /// The heartbeat's registration is unknown: register again.
    StaleRegistration,
    /// A (re)started node registers, as incarnation `life`: whatever it led moves to a new
    /// epoch, it is fenced until it has applied that, and it follows only states from that
    /// epoch on.
    Register(NodeId, u32),
    Registered {
        broker_epoch: u64,
        leader_epoch: u32,
    },
}

struct Envelope {
    at: i64,
    to: NodeId,
    from: NodeId,
    msg: Msg,
}

enum Role {
    Leader(LeaderState),
    Follower(FollowerState),
    None { hw: u64 },
}

struct Node {
    id: NodeId,
    alive: bool,
    life: u32,
    log: MemLog,
    view: Option<PartitionView>,
    role: Role,
    /// The outstanding fetch: its sequence number and when it was sent.
    fetching: Option<(u64, i64)>,
    /// The ISR change in flight: when it was (last) sent.
    altering: Option<i64>,
    /// Until when it is cut off from everyone.
    isolated_until: i64,
    /// The oldest leader epoch it may act on (`None`: restarted, not registered yet).
    registered: Option<u32>,
    /// Its registration (`None`: not registered yet).
    broker_epoch: Option<u64>,
    /// The controller image's offset it has applied.
    metadata_offset: u64,
    /// An fsync failed (EIO): the log takes no more appends or flushes until the node restarts.
    poisoned: bool,
    last_hw: u64,
}

impl Node {
    fn hw(&self) -> u64 {
        match &self.role {
            Role::Leader(s) => s.high_watermark(),
            Role::Follower(f) => f.high_watermark(),
            Role::None { hw } => *hw,
        }
    }
}

/// The active controller: its committed metadata image (Raft's state machine) and the next
/// Raft index.
struct Controller {
    image: MetadataImage,
    index: u64,
    /// Until when the active controller is away (a failover under way): messages to it are lost.
    away_until: i64,
}

/// What node `node` says about itself when it registers as incarnation `life`.
fn broker_info(node: NodeId, life: u32) -> BrokerInfo {
    BrokerInfo {
        node_id: node,
        incarnation: format!("{node}-{life}"),
        dir_id: format!("dir-{node}"),
        native: Endpoint {
            host: "sim".into(),
            port: node as u16,
        },
        kafka: None,
        rack: None,
    }
}

struct Sim {
    rng: SmallRng,
    options: Options,
    now: i64,
    nodes: BTreeMap<NodeId, Node>,
    controller: Controller,
    net: Vec<Envelope>,
    seq: u64,
    next_value: u64,
    /// Produced, not yet answered: (node, life, epoch, offset, value).
    pending: Vec<(NodeId, u32, u32, u64, u64)>,
    acked: BTreeMap<u64, u64>,
    committed: Vec<(u32, u64)>,
    leaders: BTreeMap<u32, NodeId>,
    stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    acked: u64,
    elections: u64,
    truncations: u64,
    isr_changes: u64,
    crashes: u64,
    controller_failovers: u64,
    /// fsync failures injected, and fences they led to.
    eio: u64,
    fenced_for_eio: u64,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64, options: Options) -> Sim {
        let nodes = NODES
            .iter()
            .map(|&id| {
                (
                    id,
                    Node {
                        id,
                        alive: true,
                        life: 0,
                        log: MemLog::default(),
                        view: None,
                        role: Role::None { hw: 0 },
                        fetching: None,
                        altering: None,
                        isolated_until: 0,
                        registered: Some(0),
                        broker_epoch: None,
                        metadata_offset: 0,
                        poisoned: false,
                        last_hw: 0,
                    },
                )
            })
            .collect();
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(seed),
            options,
            now: 0,
            nodes,
            controller: Controller {
                image: MetadataImage::default(),
                index: 0,
                away_until: 0,
            },
            net: Vec::new(),
            seq: 0,
            next_value: 1,
            pending: Vec::new(),
            acked: BTreeMap::new(),
            committed: Vec::new(),
            leaders: BTreeMap::new(),
            stats: Stats::default(),
        };
        // Three brokers registered and unfenced, the topic created with one replica in sync.
        for id in NODES {
            let epoch = sim
                .commit_image(decide::register(&sim.controller.image, broker_info(id, 0)))
                .unwrap();
            sim.commit_image(vec![MetadataRecord::BrokerUnfenced {
                node_id: id,
                broker_epoch: epoch,
            }])
            .unwrap();
            sim.nodes.get_mut(&id).unwrap().broker_epoch = Some(epoch);
        }
        sim.commit_image(vec![MetadataRecord::TopicCreated {
            name: TOPIC.into(),
            config: Default::default(),
            created_ms: 0,
            partitions: vec![PartitionState {
                isr: vec![1],
                ..PartitionState::new(NODES.to_vec(), Some(1))
            }],
        }])
        .unwrap();
        sim.broadcast_view();
        sim
    }

    fn faulty(&self) -> bool {
        self.now < FAULT_MS
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        let cut = |n: NodeId| {
            self.nodes
                .get(&n)
                .is_some_and(|node| node.isolated_until > self.now)
        };
        if self.faulty() && (cut(from) || cut(to) || self.rng.random_bool(0.05)) {
            return;
        }
        let delay = if self.faulty() {
            self.rng.random_range(0..30)
        } else {
            self.rng.random_range(0..3)
        };
        self.net.push(Envelope {
            at: self.now + delay,
            to,
            from,
            msg,
        });
    }

    fn leader_config(&self) -> LeaderConfig {
        LeaderConfig {
            durability: self.options.durability,
            replica_lag_max_ms: 300,
            broken_high_watermark_on_leader_alone: self.options.broken_hw,
        }
    }

    // ---- the controller ----

    /// Partition 0 as the controller's image has it, and the image's offset.
    fn view(&self) -> (PartitionView, u64) {
        let image = &self.controller.image;
        let state = image.partition(TOPIC, 0).expect("the partition exists");
        let view = PartitionView {
            leader: state.leader,
            leader_epoch: state.leader_epoch,
            partition_epoch: state.partition_epoch,
            replicas: state.replicas.clone(),
            isr: state.isr.clone(),
        };
        (view, image.offset)
    }

    fn broadcast_view(&mut self) {
        let (view, offset) = self.view();
        for id in NODES {
            self.send(CONTROLLER, id, Msg::View(view.clone(), offset));
        }
    }

    /// Applies one Raft entry of `records` to the image (all or none: a decision made on a
    /// state that changed since is refused); returns its index.
    fn commit_image(&mut self, records: Vec<MetadataRecord>) -> Result<u64, String> {
        let index = self.controller.index;
        self.controller.index += 1;
        self.controller
            .image
            .apply(index, &Proposal { records })
            .map_err(|r| r.message)?;
        Ok(index)
    }

    /// [`Sim::commit_image`], then the brokers hear of what changed.
    fn commit(&mut self, records: Vec<MetadataRecord>) -> Result<u64, String> {
        let before = self.view().0;
        let index = self.commit_image(records)?;
        let after = self.view().0;
        if after.leader != before.leader && after.leader.is_some() {
            self.stats.elections += 1;
        }
        self.broadcast_view();
        Ok(index)
    }

    fn controller_receive(&mut self, from: NodeId, msg: Msg) {
        if self.now < self.controller.away_until {
            return; // the active controller is moving: lost
        }
        let image = &self.controller.image;
        match msg {
            Msg::Down(node) => {
                if let Some(broker) = image.brokers.get(&node).filter(|b| !b.fenced) {
                    let records = decide::fence(image, node, broker.epoch);
                    let _ = self.commit(records);
                }
            }
            Msg::Heartbeat {
                node,
                broker_epoch,
                offset,
                want_fence,
            } => match decide::heartbeat(image, node, broker_epoch, offset, false, want_fence) {
                Err(_) => self.send(CONTROLLER, node, Msg::StaleRegistration),
                Ok(decide::Heartbeat::Fence(records) | decide::Heartbeat::Unfence(records)) => {
                    if want_fence {
                        self.stats.fenced_for_eio += 1;
                    }
                    let _ = self.commit(records);
                }
                Ok(decide::Heartbeat::Unchanged { .. }) => {}
            },
            Msg::Register(node, life) => {
                let info = broker_info(node, life);
                let broker_epoch = match decide::existing_registration(image, &info) {
                    Some(epoch) => epoch, // a retry of a registration that took effect
                    None => {
                        let records = decide::register(image, info);
                        match self.commit(records) {
                            Ok(epoch) => epoch,
                            Err(_) => return,
                        }
                    }
                };
                let leader_epoch = self.view().0.leader_epoch;
                self.send(
                    CONTROLLER,
                    node,
                    Msg::Registered {
                        broker_epoch,
                        leader_epoch,
                    },
                );
            }
            Msg::Alter {
                from: leader,
                broker_epoch,
                change,
            } => {
                let decided = decide::alter_partition(
                    image,
                    leader,
                    broker_epoch,
                    TOPIC,
                    0,
                    (change.leader_epoch, change.partition_epoch),
                    &change.isr,
                );
                let definitive_refusal = match decided {
                    Ok(record) => {
                        let applied = self.commit(vec![record]);
                        assert!(applied.is_ok(), "decided on the current image: {applied:?}");
                        self.stats.isr_changes += 1;
                        false
                    }
                    // Decided on a state that is no longer current: the leader learns the new
                    // one and decides again. An ineligible replica stays refused.
                    Err(rejected) => ErrorCode(rejected.code) == ErrorCode::INELIGIBLE_REPLICA,
                };
                self.send(CONTROLLER, from, Msg::AlterResponse { definitive_refusal });
                // The leader may be behind: tell it the current state.
                let (view, offset) = self.view();
                self.send(CONTROLLER, from, Msg::View(view, offset));
            }
            _ => {}
        }
    }

    // ---- the nodes ----

    fn adopt_view(&mut self, id: NodeId, view: PartitionView, offset: u64) {
        let config = self.leader_config();
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        node.metadata_offset = node.metadata_offset.max(offset);
        if node.registered.is_none_or(|e| view.leader_epoch < e) {
            return;
        }
        if let Some(current) = &node.view
            && (view.leader_epoch, view.partition_epoch)
                <= (current.leader_epoch, current.partition_epoch)
        {
            return;
        }
        let hw = node.hw();
        node.view = Some(view.clone());
        match view.leader {
            Some(leader) if leader == id => {
                if let Role::Leader(state) = &mut node.role
                    && state.update_view(&view, now)
                {
                    return;
                }
                node.role = Role::Leader(LeaderState::new(id, &view, hw, &node.log, now, config));
                node.altering = None;
            }
            Some(leader) => {
                if let Role::Follower(f) = &node.role
                    && f.leader() == leader
                    && f.leader_epoch() == view.leader_epoch
                {
                    return;
                }
                node.role = Role::Follower(FollowerState::new(leader, view.leader_epoch, hw));
                node.fetching = None;
            }
            None => node.role = Role::None { hw },
        }
    }

    fn node_receive(&mut self, id: NodeId, from: NodeId, msg: Msg) -> Check {
        let now = self.now;
        match msg {
            Msg::View(view, offset) => self.adopt_view(id, view, offset),
            Msg::Registered {
                broker_epoch,
                leader_epoch,
            } => {
                let node = self.nodes.get_mut(&id).unwrap();
                if node.registered.is_none() {
                    node.registered = Some(leader_epoch);
                    node.broker_epoch = Some(broker_epoch);
                }
            }
            Msg::StaleRegistration => {
                let node = self.nodes.get_mut(&id).unwrap();
                node.registered = None;
                node.broker_epoch = None;
            }
            Msg::Fetch {
                from: follower,
                epoch,
                seq,
                position,
            } => {
                let node = self.nodes.get_mut(&id).unwrap();
                let response = match &mut node.role {
                    Role::Leader(state) if state.leader_epoch() == epoch => {
                        match state.on_fetch(follower, position, &node.log, now) {
                            FetchCheck::Read { offset } => Response::Records {
                                records: (offset..node.log.log_end())
                                    .take(FETCH_MAX)
                                    .map(|o| node.log.get(o).unwrap())
                                    .collect(),
                                hw: state.high_watermark(),
                            },
                            FetchCheck::Diverging(d) => Response::Diverging(d),
                            FetchCheck::OutOfRange { log_end, .. } => {
                                Response::OutOfRange { log_end }
                            }
                            FetchCheck::NotReplica => Response::Refused,
                        }
                    }
                    _ => Response::Refused,
                };
                self.send(
                    id,
                    follower,
                    Msg::FetchResponse {
                        from: id,
                        epoch,
                        seq,
                        response,
                    },
                );
            }
            Msg::FetchResponse {
                from: leader,
                epoch,
                seq,
                response,
            } => {
                let node = self.nodes.get_mut(&id).unwrap();
                let Role::Follower(f) = &mut node.role else {
                    return Ok(());
                };
                if f.leader() != leader
                    || f.leader_epoch() != epoch
                    || node.fetching.map(|(s, _)| s) != Some(seq)
                {
                    return Ok(());
                }
                node.fetching = None;
                if node.poisoned {
                    return Ok(()); // its appends fail
                }
                match response {
                    Response::Records { records, hw } => {
                        for (epoch, value) in records {
                            node.log.push(epoch, value);
                        }
                        f.on_high_watermark(hw, &node.log);
                    }
                    Response::Diverging(d) => {
                        let to = f.truncation_offset(d, &node.log);
                        node.log.truncate(to);
                        f.on_truncated(&node.log);
                        self.stats.truncations += 1;
                    }
                    Response::OutOfRange { log_end } => {
                        if node.log.log_end() > log_end {
                            node.log.truncate(log_end);
                            f.on_truncated(&node.log);
                        }
                    }
                    Response::Refused => {}
                }
            }
            Msg::AlterResponse { definitive_refusal } => {
                let node = self.nodes.get_mut(&id).unwrap();
                node.altering = None;
                if let Role::Leader(state) = &mut node.role
                    && definitive_refusal
                {
                    state.isr_change_refused();
                }
            }
            _ => {}
        }
        let _ = from;
        Ok(())
    }

    /// A node's own work each millisecond: followers fetch, leaders recompute and propose ISR
    /// changes (resending one not answered).
    fn node_tick(&mut self, id: NodeId) {
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
        if !node.alive {
            return;
        }
        let mut out = Vec::new();
        match &mut node.role {
            Role::Follower(f) => {
                let stale = node.fetching.is_none_or(|(_, at)| now - at > 100);
                if stale {
                    self.seq += 1;
                    node.fetching = Some((self.seq, now));
                    let mut position = f.position(&node.log);
                    if self.options.broken_truncation && position.last_fetched_epoch.is_some() {
                        position.last_fetched_epoch = Some(f.leader_epoch());
                    }
                    out.push((
                        f.leader(),
                        Msg::Fetch {
                            from: id,
                            epoch: f.leader_epoch(),
                            seq: self.seq,
                            position,
                        },
                    ));
                }
            }
            Role::Leader(state) => {
                state.update(&node.log);
                let Some(broker_epoch) = node.broker_epoch else {
                    return;
                };
                if node.altering.is_some_and(|at| now - at > 100) {
                    node.altering = None;
                    if let Some(change) = state.pending() {
                        out.push((
                            CONTROLLER,
                            Msg::Alter {
                                from: id,
                                broker_epoch,
                                change: change.clone(),
                            },
                        ));
                        node.altering = Some(now);
                    }
                } else if node.altering.is_none()
                    && let Some(change) = state.isr_change(now)
                {
                    out.push((
                        CONTROLLER,
                        Msg::Alter {
                            from: id,
                            broker_epoch,
                            change,
                        },
                    ));
                    node.altering = Some(now);
                }
            }
            Role::None { .. } => {}
        }
        for (to, msg) in out {
            self.send(id, to, msg);
        }
    }

    fn produce(&mut self) {
        let leaders: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.alive && matches!(n.role, Role::Leader(_)))
            .map(|n| n.id)
            .collect();
        if leaders.is_empty() {
            return;
        }
        let id = leaders[self.rng.random_range(0..leaders.len())];
        let value = self.next_value;
        self.next_value += 1;
        let node = self.nodes.get_mut(&id).unwrap();
        let Role::Leader(state) = &mut node.role else {
            return;
        };
        if node.poisoned {
            return; // KAFKA_STORAGE_ERROR
        }
        if state.isr().len() < MIN_ISR {
            return; // NOT_ENOUGH_REPLICAS
        }
        let offset = node.log.log_end();
        node.log.push(state.leader_epoch(), value);
        state.update(&node.log);
        self.pending
            .push((id, node.life, state.leader_epoch(), offset, value));
    }

    fn answer_producers(&mut self) {
        let nodes = &self.nodes;
        let mut acked = Vec::new();
        self.pending.retain(|&(id, life, epoch, offset, value)| {
            let node = &nodes[&id];
            let Role::Leader(state) = &node.role else {
                return false; // unknown outcome
            };
            if !node.alive || node.life != life || state.leader_epoch() != epoch {
                return false;
            }
            if state.high_watermark() > offset {
                if state.isr().len() >= MIN_ISR {
                    acked.push((offset, value));
                } // else NOT_ENOUGH_REPLICAS_AFTER_APPEND
                return false;
            }
            true
        });
        for (offset, value) in acked {
            self.stats.acked += 1;
            self.acked.insert(offset, value);
        }
    }

    fn crash(&mut self, id: NodeId, power: bool) {
        let node = self.nodes.get_mut(&id).unwrap();
        if !node.alive {
            return;
        }
        self.stats.crashes += 1;
        node.alive = false;
        node.life += 1;
        node.role = Role::None { hw: 0 };
        node.view = None;
        node.fetching = None;
        node.altering = None;
        node.last_hw = 0;
        node.registered = None;
        node.broker_epoch = None;
        node.metadata_offset = 0;
        // After an fsync error the page cache may have dropped what was not synced.
        if power || node.poisoned {
            node.log.lose_unflushed();
        }
        node.poisoned = false;
        // A dead process closes its connections: the controller notices soon.
        self.net.retain(|e| e.to != id);
        let delay = self.rng.random_range(1..40);
        self.net.push(Envelope {
            at: self.now + delay,
            to: CONTROLLER,
            from: id,
            msg: Msg::Down(id),
        });
    }

    fn restart(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).unwrap();
        if node.alive {
            return;
        }
        node.alive = true;
        let life = node.life;
        self.send(id, CONTROLLER, Msg::Register(id, life));
    }

    fn faults(&mut self) {
        if !self.faulty() {
            return;
        }
        let id = NODES[self.rng.random_range(0..NODES.len())];
        let roll: f64 = self.rng.random();
        if roll < 0.002 {
            // Crash; under power loss sometimes every node at once.
            if self.options.power_loss && self.rng.random_bool(0.2) {
                for n in NODES {
                    self.crash(n, true);
                }
            } else {
                let power = self.options.power_loss && self.rng.random_bool(0.5);
                self.crash(id, power);
            }
        } else if roll < 0.006 {
            self.restart(id);
        } else if roll < 0.007 {
            // The controller suspects a live node (it is fenced), then its heartbeats unfence
            // it once it has applied the fence.
            self.net.push(Envelope {
                at: self.now,
                to: CONTROLLER,
                from: id,
                msg: Msg::Down(id),
            });
        } else if roll < 0.008 {
            // Cut off from everyone for a while: the controller fences it; once back, its
            // heartbeats unfence it.
            let until = self.now + self.rng.random_range(50..600);
            let node = self.nodes.get_mut(&id).unwrap();
            if node.alive {
                node.isolated_until = until;
                self.net.push(Envelope {
                    at: self.now + 30,
                    to: CONTROLLER,
                    from: id,
                    msg: Msg::Down(id),
                });
            }
        } else if roll < 0.0085 {
            // The active controller fails over: what was on its way to it is lost, and it
            // hears nothing for a while; the committed image survives (Raft).
            self.controller.away_until = self.now + self.rng.random_range(50..300);
            self.net.retain(|e| e.to != CONTROLLER);
            self.stats.controller_failovers += 1;
        } else if roll < 0.009 && self.options.power_loss {
            // An fsync fails (EIO): the node's log is poisoned until it restarts, and what it
            // had not synced may be gone then: a power loss of its own as far as the data goes,
            // so only where power losses are simulated (Kafka's in-memory rule does not survive
            // them, by design).
            let node = self.nodes.get_mut(&id).unwrap();
            if node.alive && !node.poisoned {
                node.poisoned = true;
                self.stats.eio += 1;
            }
        }
    }

    fn step(&mut self) -> Check {
        // Deliver what is due, in random order (reordering).
        let mut due: Vec<Envelope> = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= self.now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            let e = due.swap_remove(self.rng.random_range(0..due.len()));
            if e.to == CONTROLLER {
                self.controller_receive(e.from, e.msg);
            } else if self.nodes[&e.to].alive {
                self.node_receive(e.to, e.from, e.msg)?;
            }
        }
        if self.now % 100 == 0 {
            // The metadata feed, and heartbeats (which also correct a controller that took a
            // restarted node's old death for news).
            self.broadcast_view();
            for id in NODES {
                let node = &self.nodes[&id];
                if node.alive {
                    let msg = match node.broker_epoch {
                        Some(broker_epoch) => Msg::Heartbeat {
                            node: id,
                            broker_epoch,
                            offset: node.metadata_offset,
                            want_fence: node.poisoned,
                        },
                        // Its registration was lost: again.
                        None => Msg::Register(id, node.life),
                    };
                    self.send(id, CONTROLLER, msg);
                }
            }
        }
        for id in NODES {
            if self.rng.random_bool(0.05) {
                let node = self.nodes.get_mut(&id).unwrap();
                if node.alive && !node.poisoned {
                    node.log.flush();
                }
            }
            self.node_tick(id);
        }
        if self.now < TOTAL_MS - 1500 && self.rng.random_bool(0.3) {
            self.produce();
        }
        self.faults();
        if !self.faulty() {
            // Healing: everyone back; a node with a poisoned log is restarted (its supervisor,
            // or an operator, after the disk is dealt with).
            for id in NODES {
                if self.nodes[&id].poisoned {
                    self.crash(id, false);
                }
                if !self.nodes[&id].alive {
                    self.restart(id);
                }
            }
        }
        self.answer_producers();
        self.check()
    }

    fn check(&mut self) -> Check {
        let controller_epoch = self.view().0.leader_epoch;
        for node in self.nodes.values_mut() {
            if !node.alive {
                continue;
            }
            let hw = node.hw();
            if hw < node.last_hw {
                return Err(format!(
                    "node {}: high watermark went back from {} to {hw}",
                    node.id, node.last_hw
                ));
            }
            node.last_hw = hw;
            if let Role::Leader(state) = &node.role {
                let epoch = state.leader_epoch();
                if let Some(other) = self.leaders.insert(epoch, node.id)
                    && other != node.id
                {
                    return Err(format!("epoch {epoch} led by {other} and {}", node.id));
                }
                // The committed log grows from every leader's high watermark.
                for o in self.committed.len() as u64..hw {
                    self.committed.push(node.log.get(o).unwrap());
                }
                if epoch == controller_epoch {
                    for (&offset, &value) in &self.acked {
                        if node.log.get(offset).map(|(_, v)| v) != Some(value) {
                            return Err(format!(
                                "acknowledged record {value} at offset {offset} is not in leader {}'s log ({:?})",
                                node.id,
                                node.log.get(offset)
                            ));
                        }
                    }
                }
            }
            for o in 0..hw.min(self.committed.len() as u64) {
                if node.log.get(o) != Some(self.committed[o as usize]) {
                    return Err(format!(
                        "node {} holds {:?} at offset {o} below its high watermark {hw}; committed: {:?}",
                        node.id,
                        node.log.get(o),
                        self.committed[o as usize]
                    ));
                }
            }
        }
        Ok(())
    }

    fn run(mut self) -> Result<Stats, String> {
        while self.now < TOTAL_MS {
            self.step()
                .map_err(|e| format!("at {} ms: {e}", self.now))?;
            self.now += 1;
        }
        // Healed and quiet: every replica equals the leader, and each acknowledged record is
        // there once.
        let leader = self
            .nodes
            .values()
            .find(|n| matches!(&n.role, Role::Leader(s) if s.leader_epoch() == self.view().0.leader_epoch))
            .ok_or("no leader after healing")?;
        for node in self.nodes.values() {
            if node.log.records != leader.log.records {
                return Err(format!(
                    "after healing node {} holds {} records, leader {} holds {}",
                    node.id,
                    node.log.records.len(),
                    leader.id,
                    leader.log.records.len()
                ));
            }
        }
        if leader.hw() != leader.log.log_end() {
            return Err(format!(
                "after healing the high watermark is {}, the log end {}",
                leader.hw(),
                leader.log.log_end()
            ));
        }
        let mut seen = BTreeSet::new();
        for (_, value) in &leader.log.records {
            if !seen.insert(*value) {
                return Err(format!("record {value} is in the log twice"));
            }
        }
        for (offset, value) in &self.acked {
            if leader.log.get(*offset).map(|(_, v)| v) != Some(*value) {
                return Err(format!(
                    "acknowledged record {value} lost at offset {offset}"
                ));
            }
        }
        Ok(self.stats)
    }
}

fn seeds(default: u64) -> u64 {
    std::env::var("CAIRN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run_seeds(options: Options, n: u64) -> (Stats, Vec<(u64, String)>) {
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in 0..n {
        match Sim::new(seed, options).run() {
            Ok(stats) => {
                total.acked += stats.acked;
                total.elections += stats.elections;
                total.truncations += stats.truncations;
                total.isr_changes += stats.isr_changes;
                total.crashes += stats.crashes;
                total.controller_failovers += stats.controller_failovers;
                total.eio += stats.eio;
                total.fenced_for_eio += stats.fenced_for_eio;
            }
            Err(err) => failures.push((seed, err)),
        }
    }
    (total, failures)
}

fn must_pass(options: Options, n: u64) {
    let (stats, failures) = run_seeds(options, n);
    if let Some((seed, err)) = failures.first() {
        panic!(
            "{} of {n} seeds failed; first: seed {seed}: {err}\nreplay: CAIRN_SIM_SEED={seed} CAIRN_SIM_MODE={} cargo test -p cairn-replication --test simulation replay -- --nocapture",
            failures.len(),
            options.mode()
        );
    }
    println!("{}: {n} seeds, {stats:?}", options.mode());
    assert!(
        stats.acked > n * 100,
        "the workload acknowledged records: {stats:?}"
    );
    assert!(stats.elections > n, "leaders changed: {stats:?}");
    assert!(stats.truncations > 0, "some follower diverged: {stats:?}");
    assert!(stats.isr_changes > n, "the ISR changed: {stats:?}");
    assert!(
        stats.controller_failovers > n / 2,
        "the active controller failed over: {stats:?}"
    );
    assert!(
        !options.power_loss || (stats.eio > n / 4 && stats.fenced_for_eio > 0),
        "fsyncs failed and brokers asked to be fenced: {stats:?}"
    );
}

#[test]
fn durable_replication_loses_nothing_acknowledged_even_under_power_loss() {
    must_pass(Options::from_mode("durable"), seeds(1000));
}

#[test]
fn kafkas_in_memory_rule_loses_nothing_acknowledged_under_process_crashes() {
    must_pass(Options::from_mode("in-memory"), seeds(500));
}

fn must_fail(options: Options, n: u64) {
    let (_, failures) = run_seeds(options, n);
    assert!(
        !failures.is_empty(),
        "negative control {}: no seed of {n} found a violation",
        options.mode()
    );
    println!(
        "negative control {}: {} of {n} seeds caught, e.g. seed {}: {}",
        options.mode(),
        failures.len(),
        failures[0].0,
        failures[0].1
    );
}

#[test]
fn negative_control_a_high_watermark_on_the_leader_alone_loses_acknowledged_records() {
    must_fail(Options::from_mode("leader-alone"), 50);
}

#[test]
fn negative_control_followers_that_never_truncate_break_the_committed_log() {
    must_fail(Options::from_mode("no-truncation"), 100);
}

#[test]
fn negative_control_the_in_memory_rule_loses_acknowledged_records_in_a_power_loss() {
    must_fail(Options::from_mode("in-memory-power-loss"), 100);
}

#[test]
fn replay() {
    let Some(seed) = std::env::var("CAIRN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    let mode = std::env::var("CAIRN_SIM_MODE").unwrap_or_else(|_| "durable".into());
    match Sim::new(seed, Options::from_mode(&mode)).run() {
        Ok(stats) => println!("seed {seed} ({mode}) passed: {stats:?}"),
        Err(err) => panic!("seed {seed} ({mode}): {err}"),
    }
}
