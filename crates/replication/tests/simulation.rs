//! Replication in a seeded simulation: three replicas of one partition over in-memory logs, a
//! model controller (ISR-only elections, AlterPartition with the partition epoch, fencing of
//! brokers it cannot see), a network that delays, reorders and drops every message, producers
//! with acks=all and min.insync.replicas 2, and faults: process crashes, power losses (a log keeps
//! only what was flushed), false suspicion by the controller, and isolated nodes.
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
        change: IsrChange,
    },
    /// The controller's answer: applied, or refused (`definitive`: the state it was decided on
    /// is still current, so it will not be applied).
    AlterResponse {
        definitive_refusal: bool,
    },
    View(PartitionView),
    /// The controller lost (or regained) sight of a node.
    Down(NodeId),
    Up(NodeId),
    /// A restarted node registers: whatever it led moves to a new epoch, and it follows only
    /// states from that epoch on (the broker's registration and fencing).
    Register(NodeId),
    Registered {
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

struct Controller {
    view: PartitionView,
    live: BTreeSet<NodeId>,
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
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64, options: Options) -> Sim {
        let view = PartitionView {
            leader: Some(1),
            leader_epoch: 0,
            partition_epoch: 0,
            replicas: NODES.to_vec(),
            isr: vec![1],
        };
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
                view,
                live: NODES.iter().copied().collect(),
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

    fn broadcast_view(&mut self) {
        let view = self.controller.view.clone();
        for id in NODES {
            self.send(CONTROLLER, id, Msg::View(view.clone()));
        }
    }

    fn change_view(&mut self, isr: Vec<NodeId>, leader: Option<NodeId>) {
        let view = &mut self.controller.view;
        if isr == view.isr && leader == view.leader {
            return;
        }
        if leader != view.leader {
            view.leader_epoch += 1;
            if leader.is_some() {
                self.stats.elections += 1;
            }
        }
        view.partition_epoch += 1;
        view.isr = isr;
        view.leader = leader;
        self.broadcast_view();
    }

    fn elect(&self, isr: &[NodeId], exclude: Option<NodeId>) -> Option<NodeId> {
        let view = &self.controller.view;
        view.replicas
            .iter()
            .copied()
            .find(|r| isr.contains(r) && Some(*r) != exclude && self.controller.live.contains(r))
    }

    fn controller_receive(&mut self, from: NodeId, msg: Msg) {
        match msg {
            Msg::Down(node) => {
                if !self.controller.live.remove(&node) {
                    return;
                }
                let view = self.controller.view.clone();
                let mut isr: Vec<NodeId> =
                    view.isr.iter().copied().filter(|r| *r != node).collect();
                if isr.is_empty() {
                    isr = view.isr.clone();
                }
                let leader = if view.leader == Some(node) || view.leader.is_none() {
                    self.elect(&isr, Some(node))
                } else {
                    view.leader
                };
                self.change_view(isr, leader);
            }
            Msg::Up(node) => {
                if !self.controller.live.insert(node) {
                    return;
                }
                let view = self.controller.view.clone();
                if view.leader.is_none() {
                    let leader = self.elect(&view.isr, None);
                    self.change_view(view.isr.clone(), leader);
                }
            }
            Msg::Register(node) => {
                // A new incarnation: fenced (leadership moves, even back to it, in a new
                // epoch), then live.
                self.controller.live.insert(node);
                self.controller_receive(node, Msg::Down(node));
                self.controller_receive(node, Msg::Up(node));
                let leader_epoch = self.controller.view.leader_epoch;
                self.send(CONTROLLER, node, Msg::Registered { leader_epoch });
            }
            Msg::Alter {
                from: leader,
                change,
            } => {
                let view = self.controller.view.clone();
                let stale = view.leader != Some(leader)
                    || view.leader_epoch != change.leader_epoch
                    || view.partition_epoch != change.partition_epoch;
                let valid = change.isr.contains(&leader)
                    && change
                        .isr
                        .iter()
                        .all(|r| view.isr.contains(r) || self.controller.live.contains(r));
                if stale || !valid {
                    self.send(
                        CONTROLLER,
                        from,
                        Msg::AlterResponse {
                            definitive_refusal: !stale,
                        },
                    );
                    // The leader may be behind: tell it the current state.
                    self.send(CONTROLLER, from, Msg::View(view));
                    return;
                }
                self.stats.isr_changes += 1;
                self.change_view(change.isr, view.leader);
                self.send(
                    CONTROLLER,
                    from,
                    Msg::AlterResponse {
                        definitive_refusal: false,
                    },
                );
            }
            _ => {}
        }
    }

    // ---- the nodes ----

    fn adopt_view(&mut self, id: NodeId, view: PartitionView) {
        let config = self.leader_config();
        let now = self.now;
        let node = self.nodes.get_mut(&id).unwrap();
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
            Msg::View(view) => self.adopt_view(id, view),
            Msg::Registered { leader_epoch } => {
                let node = self.nodes.get_mut(&id).unwrap();
                if node.registered.is_none() {
                    node.registered = Some(leader_epoch);
                }
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
                if node.altering.is_some_and(|at| now - at > 100) {
                    node.altering = None;
                    if let Some(change) = state.pending() {
                        out.push((
                            CONTROLLER,
                            Msg::Alter {
                                from: id,
                                change: change.clone(),
                            },
                        ));
                        node.altering = Some(now);
                    }
                } else if node.altering.is_none()
                    && let Some(change) = state.isr_change(now)
                {
                    out.push((CONTROLLER, Msg::Alter { from: id, change }));
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
        if power {
            node.log.lose_unflushed();
        }
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
        self.send(id, CONTROLLER, Msg::Register(id));
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
            // The controller suspects a live node, then hears from it again.
            self.net.push(Envelope {
                at: self.now,
                to: CONTROLLER,
                from: id,
                msg: Msg::Down(id),
            });
            let back = self.now + self.rng.random_range(50..400);
            self.net.push(Envelope {
                at: back,
                to: CONTROLLER,
                from: id,
                msg: Msg::Up(id),
            });
        } else if roll < 0.008 {
            // Cut off from everyone for a while (the controller fences it, then sees it again).
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
                self.net.push(Envelope {
                    at: until,
                    to: CONTROLLER,
                    from: id,
                    msg: Msg::Up(id),
                });
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
                    let msg = if node.registered.is_some() {
                        Msg::Up(id)
                    } else {
                        Msg::Register(id) // its registration was lost: again
                    };
                    self.send(id, CONTROLLER, msg);
                }
            }
        }
        for id in NODES {
            if self.rng.random_bool(0.05) {
                let node = self.nodes.get_mut(&id).unwrap();
                if node.alive {
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
            // Healing: everyone back.
            for id in NODES {
                if !self.nodes[&id].alive {
                    self.restart(id);
                }
            }
        }
        self.answer_producers();
        self.check()
    }

    fn check(&mut self) -> Check {
        let controller_epoch = self.controller.view.leader_epoch;
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
            .find(|n| matches!(&n.role, Role::Leader(s) if s.leader_epoch() == self.controller.view.leader_epoch))
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
