//! The group coordinator: Kafka's classic group protocol (JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup), for the groups this broker coordinates (those whose `__consumer_offsets`
//! partition it leads).
//!
//! A group moves Empty -> PreparingRebalance (members join; existing members learn of it from
//! their heartbeat and rejoin) -> CompletingRebalance (every member got its JoinGroup answer,
//! the leader with everyone's subscriptions; all wait in SyncGroup) -> Stable (the leader's
//! SyncGroup carried the assignments, handed to every member). A member not heard from within its
//! session timeout, or not rejoining within the rebalance timeout, is removed and the others
//! rebalance. JoinGroup and SyncGroup answers wait on channels, so the connection's other requests
//! go on meanwhile; a timer (`tick`) drives timeouts and delayed joins.
//!
//! Membership lives in memory and, as in Kafka, in `__consumer_offsets` (`offsets.rs`): when a
//! rebalance completes, the group's membership (generation, members, subscriptions,
//! assignments) is written there before the members get their assignments (the `Outbox`, drained
//! by the broker's group store task, which reports back through [`Coordinator::stored`]); when a
//! group empties, a tombstone. A broker that becomes a group's coordinator (a failover, a
//! restart) restores the stored generation ([`Coordinator::restore`]): its members go on
//! heartbeating and committing without a rebalance.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_protocol::native::ErrorCode;
use tokio::sync::{Notify, oneshot, watch};

use crate::offsets::{StoredGroup, StoredMember};

/// An answer now, or one that comes when the group gets there.
#[derive(Debug)]
pub enum Answer<T> {
    /// Answered at once.
    Ready(T),
    /// Answered when the rebalance (or the leader's assignment) completes.
    Later(oneshot::Receiver<T>),
}

impl<T> Answer<T> {
    /// Waits for the answer; `lost` stands in if the group dropped the request.
    pub async fn get(self, lost: impl FnOnce() -> T) -> T {
        match self {
            Answer::Ready(answer) => answer,
            Answer::Later(rx) => rx.await.unwrap_or_else(|_| lost()),
        }
    }
}

/// A JoinGroup, as the coordinator needs it (whichever protocol it came over).
#[derive(Debug, Clone, Default)]
pub struct Join {
    /// The group.
    pub group_id: String,
    /// Empty for a new member.
    pub member_id: String,
    /// Static membership id (KIP-345): a restart with it takes the old membership over.
    pub instance_id: Option<String>,
    /// The client's id.
    pub client_id: String,
    /// "consumer" for consumers.
    pub protocol_type: String,
    /// (assignor, subscription metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    /// Session timeout.
    pub session_ms: i32,
    /// Rebalance timeout.
    pub rebalance_ms: i32,
    /// A new member first gets MEMBER_ID_REQUIRED with its id (KIP-394, JoinGroup v4+).
    pub require_known_member_id: bool,
}

/// What a JoinGroup is answered with.
#[derive(Debug, Clone, Default)]
pub struct JoinResult {
    /// Error, or NONE.
    pub error: ErrorCode,
    /// The new generation.
    pub generation: i32,
    /// The group's protocol type ("consumer").
    pub protocol_type: Option<String>,
    /// The chosen assignor.
    pub protocol_name: Option<String>,
    /// The leader's member id.
    pub leader: String,
    /// This member's id.
    pub member_id: String,
    /// For the leader: every member (id, instance id, metadata for the chosen assignor).
    pub members: Vec<(String, Option<String>, Bytes)>,
}

/// What a SyncGroup is answered with.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    /// Error, or NONE.
    pub error: ErrorCode,
    /// The group's protocol type.
    pub protocol_type: Option<String>,
    /// The chosen assignor.
    pub protocol_name: Option<String>,
    /// This member's assignment.
    pub assignment: Bytes,
}

/// A group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members.
    Empty,
    /// Waiting for members to (re)join.
    PreparingRebalance,
    /// Waiting for the leader's assignment.
    CompletingRebalance,
    /// Everyone has an assignment.
    Stable,
}

/// A group as DescribeGroups reports it.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// Kafka's name of the state.
    pub state: &'static str,
    /// "consumer" for consumer groups.
    pub protocol_type: String,
    /// The chosen assignor.
    pub protocol: String,
    /// The generation (one more per completed rebalance).
    pub generation: i32,
    /// (member id, instance id, client id, subscription metadata, assignment).
    pub members: Vec<(String, Option<String>, String, Bytes, Bytes)>,
}

impl GroupState {
    /// Kafka's name of the state.
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// Bytes counted in the coordinator's `held` total for as long as this lives (a group, a member,
/// a member id handed out), so that the total bounds the coordinator's memory whatever clients
/// send and however an entry goes away.
#[derive(Debug)]
struct Charge {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Charge {
    fn new(held: &Arc<AtomicUsize>, bytes: usize) -> Charge {
        held.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            held: Arc::clone(held),
            bytes,
        }
    }

    fn set(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            self.held.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.held.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What a group costs beyond its name (its state, channels, maps), what a member costs beyond
/// its strings and subscriptions, what a member id handed out costs beyond the id: generous
/// estimates, so that the total is an upper bound.
const GROUP_OVERHEAD: usize = 1_024;
const MEMBER_OVERHEAD: usize = 512;
const PENDING_OVERHEAD: usize = 128;

#[derive(Debug)]
struct Member {
    instance_id: Option<String>,
    client_id: String,
    session: Duration,
    rebalance: Duration,
    protocols: Vec<(String, Bytes)>,
    last_seen: Instant,
    join: Option<oneshot::Sender<JoinResult>>,
    sync: Option<oneshot::Sender<SyncResult>>,
    assignment: Bytes,
    /// Everything but subscriptions and assignment: overhead, ids, protocol type.
    fixed: usize,
    /// `fixed` plus subscriptions and assignment, in the coordinator's total.
    charge: Charge,
}

fn protocol_bytes(protocols: &[(String, Bytes)]) -> usize {
    protocols.iter().map(|(n, m)| n.len() + m.len()).sum()
}

/// A member's bytes besides subscriptions and assignment: its member id (which contains the
/// client id), client id, instance id (also a key of the static-member map) and protocol type.
fn member_fixed(client_id: &str, instance_id: Option<&str>, protocol_type: &str) -> usize {
    MEMBER_OVERHEAD
        + 2 * (client_id.len() + 32)
        + 2 * instance_id.map_or(0, str::len)
        + protocol_type.len()
}

impl Member {
    fn recount(&mut self) {
        self.charge
            .set(self.fixed + protocol_bytes(&self.protocols) + self.assignment.len());
    }

    fn set_protocols(&mut self, protocols: Vec<(String, Bytes)>) {
        self.protocols = protocols;
        self.recount();
    }

    fn set_assignment(&mut self, assignment: Bytes) {
        self.assignment = assignment;
        self.recount();
    }

    /// A member with no subscriptions or assignment yet, seen `now`, charged to `held`.
    fn new(
        (client_id, instance_id): (String, Option<String>),
        (session, rebalance): (Duration, Duration),
        fixed: usize,
        now: Instant,
        held: &Arc<AtomicUsize>,
    ) -> Member {
        Member {
            instance_id,
            client_id,
            session,
            rebalance,
            protocols: Vec::new(),
            last_seen: now,
            join: None,
            sync: None,
            assignment: Bytes::new(),
            fixed,
            charge: Charge::new(held, 0),
        }
    }

    /// Its subscription metadata for `protocol` (empty if it does not support it).
    fn subscription(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }
}

/// What a group costs in the coordinator's total: its overhead and its name, held twice (the
/// map's key and the group's own copy).
fn group_cost(name: &str) -> usize {
    GROUP_OVERHEAD + 2 * name.len()
}

/// Group records waiting to be written to `__consumer_offsets`: per group, the membership to
/// store (`Some`) or a tombstone (`None`); a later record replaces one not yet taken.
#[derive(Debug, Default)]
struct Outbox {
    /// Off (unit tests, tools): rebalances complete without storing anything.
    enabled: std::sync::atomic::AtomicBool,
    pending: Mutex<HashMap<String, Option<StoredGroup>>>,
    ready: Notify,
}

impl Outbox {
    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn put(&self, group: &str, record: Option<StoredGroup>) {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(group.to_string(), record);
        self.ready.notify_one();
    }
}

#[derive(Debug)]
struct Group {
    /// The group's id (records in the outbox are keyed by it).
    name: String,
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, not joined yet: when, and their charge.
    pending: BTreeMap<String, (Instant, Charge)>,
    /// Static members (KIP-345): instance id -> current member id.
    statics: HashMap<String, String>,
    /// When a rebalance gives up on members that did not rejoin.
    deadline: Instant,
    /// A new group waits this long for more members before its first generation.
    not_before: Instant,
    /// Counts rebalances begun; heartbeats held by `heartbeat_wait` watch it.
    rebalances: watch::Sender<u64>,
    /// The coordinator's count of completed rebalances (for the metric).
    completed: Arc<AtomicU64>,
    /// Where the group's membership records go.
    outbox: Arc<Outbox>,
    /// A membership record of this group may be in the log (so emptying it writes a tombstone).
    persisted: bool,
    /// The leader's assignment is being stored: SyncGroups are answered once it is.
    storing: bool,
    /// The group's own bytes (name, state) in the coordinator's total.
    _charge: Charge,
}

/// What bounds the coordinator's memory (broker config `groups_max`, `group_members_max`,
/// `group_member_bytes_max`, `groups_bytes_max`).
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    /// Groups with members (or member ids handed out).
    pub groups_max: u32,
    /// Members (and member ids handed out) per group.
    pub members_max: u32,
    /// Bytes of one member's subscriptions, and of one member's assignment.
    pub member_bytes_max: u32,
    /// Bytes of all groups: their members (subscriptions, assignments, ids) and member ids
    /// handed out.
    pub total_bytes_max: u64,
}

/// The coordinator of every group on this node.
#[derive(Debug)]
pub struct Coordinator {
    clock: Arc<dyn crate::clock::Clock>,
    groups: Mutex<HashMap<String, Group>>,
    initial_delay: Duration,
    groups_max: usize,
    members_max: usize,
    member_bytes_max: usize,
    total_bytes_max: usize,
    /// Bytes held by every group, member and member id handed out (see `Charge`).
    held: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// Rebalances completed (join phases that handed out a generation with members).
    completed: Arc<AtomicU64>,
    /// Membership records on their way to `__consumer_offsets`.
    outbox: Arc<Outbox>,
}

/// Session timeouts accepted (Kafka `group.min/max.session.timeout.ms`, with a lower minimum).
const SESSION_MS: std::ops::RangeInclusive<i32> = 1_000..=1_800_000;

fn fail_join(error: ErrorCode, member_id: String) -> JoinResult {
    JoinResult {
        error,
        generation: -1,
        member_id,
        ..JoinResult::default()
    }
}

fn fail_sync(error: ErrorCode) -> SyncResult {
    SyncResult {
        error,
        ..SyncResult::default()
    }
}

impl Group {
    fn new(
        name: &str,
        now: Instant,
        (completed, outbox): (Arc<AtomicU64>, Arc<Outbox>),
        charge: Charge,
    ) -> Group {
        Group {
            name: name.to_string(),
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: BTreeMap::new(),
            statics: HashMap::new(),
            deadline: now,
            not_before: now,
            rebalances: watch::Sender::new(0),
            completed,
            outbox,
            persisted: false,
            storing: false,
            _charge: charge,
        }
    }

    /// The group has no members left: Empty, and a tombstone for its stored membership.
    fn emptied(&mut self) {
        self.state = GroupState::Empty;
        self.protocol = None;
        self.leader = None;
        self.storing = false;
        if self.persisted && self.outbox.enabled() {
            self.outbox.put(&self.name, None);
        }
        self.persisted = false;
    }

    /// The membership to store: the current generation with every member's subscription for the
    /// chosen protocol and assignment.
    fn snapshot(&self) -> StoredGroup {
        let protocol = self.protocol.clone().unwrap_or_default();
        StoredGroup {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: protocol.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            members: self
                .members
                .iter()
                .map(|(id, m)| StoredMember {
                    id: id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    session_ms: m.session.as_millis().try_into().unwrap_or(u32::MAX),
                    rebalance_ms: m.rebalance.as_millis().try_into().unwrap_or(u32::MAX),
                    subscription: m.subscription(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }

    /// The leader's assignment is in (and stored, if the coordinator stores): Stable, and every
    /// member waiting in SyncGroup gets its assignment.
    fn stabilize(&mut self) {
        self.state = GroupState::Stable;
        self.storing = false;
        for member in self.members.values_mut() {
            if let Some(sync) = member.sync.take() {
                let _ = sync.send(SyncResult {
                    error: ErrorCode::NONE,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: self.protocol.clone(),
                    assignment: member.assignment.clone(),
                });
            }
        }
    }

    /// Starts a rebalance (members learn of it from JoinGroup or their next heartbeat).
    fn prepare(&mut self, now: Instant, initial_delay: Duration) {
        if self.state == GroupState::PreparingRebalance {
            return;
        }
        // A store under way completes for nothing: this rebalance supersedes its generation.
        self.storing = false;
        // Members waiting in SyncGroup must rejoin.
        for member in self.members.values_mut() {
            if let Some(sync) = member.sync.take() {
                let _ = sync.send(fail_sync(ErrorCode::REBALANCE_IN_PROGRESS));
            }
        }
        let rebalance = self
            .members
            .values()
            .map(|m| m.rebalance)
            .max()
            .unwrap_or(Duration::from_secs(60));
        if self.state == GroupState::Empty {
            self.not_before = now + initial_delay.min(rebalance);
        }
        self.deadline = now + rebalance;
        self.state = GroupState::PreparingRebalance;
        self.rebalances.send_modify(|n| *n += 1);
    }

    /// Completes the join phase if every member rejoined (and a new group waited its initial
    /// delay), or if the rebalance timed out (dropping members that did not rejoin).
    fn maybe_complete_join(&mut self, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.join.is_some());
        let timed_out = now >= self.deadline;
        if !(timed_out || (all_joined && now >= self.not_before)) {
            return;
        }
        if timed_out {
            self.members.retain(|_, m| m.join.is_some());
            let members = &self.members;
            self.statics.retain(|_, id| members.contains_key(id));
        }
        self.generation += 1;
        if self.members.is_empty() {
            self.emptied();
            return;
        }
        // The first assignor of the leader's list that every member supports.
        let leader = self
            .leader
            .clone()
            .filter(|l| self.members.contains_key(l))
            .or_else(|| self.members.keys().next().cloned())
            .unwrap_or_default();
        let candidates: Vec<String> = self
            .members
            .get(&leader)
            .map(|m| m.protocols.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        let chosen = candidates.into_iter().find(|name| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(n, _)| n == name))
        });
        let Some(chosen) = chosen else {
            for (id, mut member) in std::mem::take(&mut self.members) {
                if let Some(join) = member.join.take() {
                    let _ = join.send(fail_join(ErrorCode::INCONSISTENT_GROUP_PROTOCOL, id));
                }
            }
            self.statics.clear();
            self.emptied();
            return;
        };
        self.protocol = Some(chosen.clone());
        self.leader = Some(leader.clone());
        self.state = GroupState::CompletingRebalance;
        self.completed.fetch_add(1, Ordering::Relaxed);
        let roster = self.roster(&chosen);
        for (id, member) in &mut self.members {
            member.last_seen = now;
            member.set_assignment(Bytes::new());
            if let Some(join) = member.join.take() {
                let _ = join.send(JoinResult {
                    error: ErrorCode::NONE,
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: Some(chosen.clone()),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        roster.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
    }

    /// Whether `instance_id` (a static member's, as a request carries it) now names a member
    /// other than `member_id`: the sender is a stale incarnation (FENCED_INSTANCE_ID).
    fn fences(&self, member_id: &str, instance_id: Option<&str>) -> bool {
        instance_id
            .and_then(|iid| self.statics.get(iid))
            .is_some_and(|current| current != member_id)
    }

    /// Every member with its subscription for `protocol`: what the leader assigns from.
    fn roster(&self, protocol: &str) -> Vec<(String, Option<String>, Bytes)> {
        self.members
            .iter()
            .map(|(id, m)| (id.clone(), m.instance_id.clone(), m.subscription(protocol)))
            .collect()
    }

    /// A restarted static member takes over its old membership (`old`) under the id `new`:
    /// requests still waiting for the old one are fenced. Returns the JoinGroup answer when the
    /// others need not rebalance: the group is stable and the member's subscriptions are the
    /// same (its SyncGroup then gets its assignment back). A restarted leader gets the members as
    /// usual (clients without KIP-814 assign again); in a stable group the coordinator keeps the
    /// current assignments and ignores that SyncGroup's.
    fn take_over(
        &mut self,
        old: &str,
        new: &str,
        instance_id: &str,
        protocols: &[(String, Bytes)],
        now: Instant,
    ) -> Option<JoinResult> {
        let Some(mut member) = self.members.remove(old) else {
            self.statics.remove(instance_id);
            return None;
        };
        if let Some(join) = member.join.take() {
            let _ = join.send(fail_join(ErrorCode::FENCED_INSTANCE_ID, old.to_string()));
        }
        if let Some(sync) = member.sync.take() {
            let _ = sync.send(fail_sync(ErrorCode::FENCED_INSTANCE_ID));
        }
        let unchanged = member.protocols.len() == protocols.len()
            && member
                .protocols
                .iter()
                .zip(protocols)
                .all(|((n1, m1), (n2, m2))| n1 == n2 && m1 == m2);
        member.last_seen = now;
        self.members.insert(new.to_string(), member);
        self.statics
            .insert(instance_id.to_string(), new.to_string());
        let was_leader = self.leader.as_deref() == Some(old);
        if was_leader {
            self.leader = Some(new.to_string());
        }
        let protocol = self.protocol.clone()?;
        (self.state == GroupState::Stable && unchanged).then(|| JoinResult {
            error: ErrorCode::NONE,
            generation: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: Some(protocol.clone()),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: new.to_string(),
            members: if was_leader {
                self.roster(&protocol)
            } else {
                Vec::new()
            },
        })
    }

    fn remove(&mut self, id: &str, now: Instant, initial_delay: Duration) {
        self.statics.retain(|_, member| member != id);
        if let Some(mut member) = self.members.remove(id) {
            if let Some(join) = member.join.take() {
                let _ = join.send(fail_join(ErrorCode::UNKNOWN_MEMBER_ID, id.to_string()));
            }
            if let Some(sync) = member.sync.take() {
                let _ = sync.send(fail_sync(ErrorCode::UNKNOWN_MEMBER_ID));
            }
            if self.members.is_empty() {
                self.generation += 1;
                self.emptied();
            } else {
                self.prepare(now, initial_delay);
                self.maybe_complete_join(now);
            }
        }
    }
}

impl Coordinator {
    /// A coordinator; a new group waits `initial_delay` for more members before its first
    /// generation (Kafka `group.initial.rebalance.delay.ms`); memory bounded by `limits`.
    pub fn new(
        clock: Arc<dyn crate::clock::Clock>,
        initial_delay: Duration,
        limits: GroupLimits,
    ) -> Coordinator {
        Coordinator {
            clock,
            groups: Mutex::new(HashMap::new()),
            initial_delay,
            groups_max: limits.groups_max as usize,
            members_max: limits.members_max as usize,
            member_bytes_max: limits.member_bytes_max as usize,
            total_bytes_max: usize::try_from(limits.total_bytes_max).unwrap_or(usize::MAX),
            held: Arc::default(),
            next_id: AtomicU64::new(1),
            completed: Arc::default(),
            outbox: Arc::default(),
        }
    }

    /// From now on, memberships are stored in `__consumer_offsets` as rebalances complete:
    /// whoever calls this drains [`Coordinator::take_records`] and reports each outcome to
    /// [`Coordinator::stored`].
    pub fn enable_store(&self) {
        self.outbox.enabled.store(true, Ordering::Relaxed);
    }

    /// Waits until records are waiting to be stored.
    pub async fn records_ready(&self) {
        self.outbox.ready.notified().await;
    }

    /// Takes the records waiting to be stored.
    pub fn take_records(&self) -> Vec<(String, Option<StoredGroup>)> {
        let mut pending = self
            .outbox
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.drain().collect()
    }

    /// A stored membership's outcome. If the group still waits for it (same generation, no
    /// rebalance since), its members get their assignments. If this broker no longer leads the
    /// group's offsets partition, they get NOT_COORDINATOR and the group rebalances (as Kafka);
    /// any other failure (too few in-sync replicas, a timeout, a record too large) is logged and
    /// the group goes on from memory.
    pub fn stored(
        &self,
        group_id: &str,
        generation: i32,
        outcome: Result<(), (ErrorCode, String)>,
    ) {
        let now = self.clock.now();
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return;
        };
        if !group.storing
            || group.generation != generation
            || group.state != GroupState::CompletingRebalance
        {
            return;
        }
        let error = match outcome {
            Ok(()) => None,
            Err((code, message)) => {
                tracing::warn!(group = %group_id, generation, error = %message, "storing the group's membership failed");
                // Only a broker that no longer leads the offsets partition refuses the group;
                // otherwise (too few in-sync replicas, a replication timeout, a record too
                // large) the group goes on from memory, as it did before memberships were
                // stored, rather than rebalancing until the offsets partition heals: a
                // coordinator move meanwhile makes its members rejoin.
                (code == ErrorCode::NOT_COORDINATOR).then_some(code)
            }
        };
        match error {
            None => group.stabilize(),
            Some(code) => {
                for member in group.members.values_mut() {
                    if let Some(sync) = member.sync.take() {
                        let _ = sync.send(fail_sync(code));
                    }
                }
                group.prepare(now, Duration::ZERO);
            }
        }
    }

    /// Takes over groups whose memberships a newly led offsets partition stores (after
    /// [`Coordinator::unload`] forgot what was in memory): each is Stable at its stored
    /// generation, its members' sessions starting now. A group already here is left alone.
    pub fn restore(&self, stored: Vec<(String, StoredGroup)>) {
        let now = self.clock.now();
        let mut groups = self.lock();
        for (name, record) in stored {
            if groups.contains_key(&name) || record.members.is_empty() {
                continue;
            }
            let mut group = Group::new(
                &name,
                now,
                (Arc::clone(&self.completed), Arc::clone(&self.outbox)),
                Charge::new(&self.held, group_cost(&name)),
            );
            group.state = GroupState::Stable;
            group.generation = record.generation;
            group.protocol = Some(record.protocol.clone());
            group.leader = Some(record.leader);
            group.protocol_type = Some(record.protocol_type.clone());
            group.persisted = true;
            for m in record.members {
                if let Some(iid) = &m.instance_id {
                    group.statics.insert(iid.clone(), m.id.clone());
                }
                let fixed = member_fixed(
                    &m.client_id,
                    m.instance_id.as_deref(),
                    &record.protocol_type,
                );
                let mut member = Member::new(
                    (m.client_id, m.instance_id),
                    (
                        Duration::from_millis(u64::from(m.session_ms)),
                        Duration::from_millis(u64::from(m.rebalance_ms)),
                    ),
                    fixed,
                    now,
                    &self.held,
                );
                member.protocols = vec![(record.protocol.clone(), m.subscription)];
                member.set_assignment(m.assignment);
                group.members.insert(m.id, member);
            }
            tracing::info!(group = %name, generation = group.generation, members = group.members.len(), "group taken over from its stored membership");
            groups.insert(name, group);
        }
    }

    /// Whether replacing `old` held bytes by `new` ones stays within the total.
    fn affordable(&self, old: usize, new: usize) -> bool {
        self.held.load(Ordering::Relaxed).saturating_sub(old) + new <= self.total_bytes_max
    }

    /// A new member id: the client id, a counter and a little entropy.
    fn fresh_id(&self, client_id: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{client_id}-{n:016x}-{:08x}", rand_u32(n))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A JoinGroup for a group without committed offsets (tests).
    #[cfg(test)]
    pub fn join(&self, request: Join) -> Answer<JoinResult> {
        self.join_group(request, false)
    }

    /// A JoinGroup: an immediate answer (an error, or MEMBER_ID_REQUIRED with a new id), or a
    /// channel answered when the rebalance completes. `committed`: the group has committed
    /// offsets here. If this coordinator holds no members for it, the group is not forming for
    /// the first time (every member restarted, or its coordinator moved here while its
    /// membership could not be stored) and it rebalances without the initial delay: waiting 3 s
    /// after each coordinator move kept a group from ever settling while its coordinator was
    /// killed every few seconds.
    pub fn join_group(&self, request: Join, committed: bool) -> Answer<JoinResult> {
        let Join {
            group_id,
            member_id,
            instance_id,
            client_id,
            protocol_type,
            protocols,
            session_ms,
            rebalance_ms,
            require_known_member_id,
        } = request;
        let (group_id, member_id, client_id, protocol_type) = (
            group_id.as_str(),
            member_id.as_str(),
            client_id.as_str(),
            protocol_type.as_str(),
        );
        if group_id.is_empty() || group_id.len() > cairn_protocol::limits::GROUP_ID_BYTES_MAX {
            return Answer::Ready(fail_join(ErrorCode::INVALID_GROUP_ID, member_id.into()));
        }
        if !SESSION_MS.contains(&session_ms) {
            return Answer::Ready(fail_join(
                ErrorCode::INVALID_SESSION_TIMEOUT,
                member_id.into(),
            ));
        }
        let now = self.clock.now();
        let mut groups = self.lock();
        let group_cost = group_cost(group_id);
        if !groups.contains_key(group_id)
            && (groups.len() >= self.groups_max || !self.affordable(0, group_cost))
        {
            return Answer::Ready(fail_join(ErrorCode::POLICY_VIOLATION, member_id.into()));
        }
        let group = groups.entry(group_id.to_string()).or_insert_with(|| {
            Group::new(
                group_id,
                now,
                (Arc::clone(&self.completed), Arc::clone(&self.outbox)),
                Charge::new(&self.held, group_cost),
            )
        });
        // Static membership (KIP-345): a member with a known instance id and no member id is
        // that member restarted; one with another member's id is a zombie.
        let static_current = instance_id
            .as_deref()
            .and_then(|iid| group.statics.get(iid).cloned());
        if let Some(current) = &static_current
            && !member_id.is_empty()
            && current != member_id
        {
            return Answer::Ready(fail_join(ErrorCode::FENCED_INSTANCE_ID, member_id.into()));
        }
        let takeover = static_current.filter(|_| member_id.is_empty());
        let known = takeover.is_some()
            || group.members.contains_key(member_id)
            || group.pending.contains_key(member_id);
        if !known && group.members.len() + group.pending.len() >= self.members_max {
            return Answer::Ready(fail_join(
                ErrorCode::GROUP_MAX_SIZE_REACHED,
                member_id.into(),
            ));
        }
        if protocols.is_empty()
            || group
                .protocol_type
                .as_deref()
                .is_some_and(|t| t != protocol_type && !group.members.is_empty())
        {
            return Answer::Ready(fail_join(
                ErrorCode::INCONSISTENT_GROUP_PROTOCOL,
                member_id.into(),
            ));
        }
        let subscriptions = protocol_bytes(&protocols);
        let fixed = member_fixed(client_id, instance_id.as_deref(), protocol_type);
        let already = group
            .members
            .get(takeover.as_deref().unwrap_or(member_id))
            .map_or(0, |m| m.charge.bytes);
        if subscriptions > self.member_bytes_max || !self.affordable(already, fixed + subscriptions)
        {
            tracing::warn!(group = %group_id, bytes = subscriptions, "join refused: over the coordinator's byte limits");
            return Answer::Ready(fail_join(ErrorCode::POLICY_VIOLATION, member_id.into()));
        }
        let mut member_id = member_id.to_string();
        if let (Some(old), Some(iid)) = (takeover, instance_id.as_deref()) {
            let new = self.fresh_id(client_id);
            if let Some(answer) = group.take_over(&old, &new, iid, &protocols, now) {
                if self.outbox.enabled() {
                    // The new member id replaces the old one in the stored membership too.
                    group.persisted = true;
                    self.outbox.put(group_id, Some(group.snapshot()));
                }
                tracing::info!(group = %group_id, instance = %iid, member = %new, "static member rejoined without a rebalance");
                return Answer::Ready(answer);
            }
            member_id = new;
        }
        let member_id = if member_id.is_empty() {
            let id = self.fresh_id(client_id);
            // KIP-394, except for static members (their instance id names them).
            if require_known_member_id && instance_id.is_none() {
                // KIP-394: the client rejoins with this id.
                let cost = PENDING_OVERHEAD + id.len();
                if !self.affordable(0, cost) {
                    return Answer::Ready(fail_join(ErrorCode::POLICY_VIOLATION, String::new()));
                }
                group
                    .pending
                    .insert(id.clone(), (now, Charge::new(&self.held, cost)));
                return Answer::Ready(fail_join(ErrorCode::MEMBER_ID_REQUIRED, id));
            }
            id
        } else if group.members.contains_key(&member_id)
            || group.pending.remove(&member_id).is_some()
        {
            member_id
        } else {
            return Answer::Ready(fail_join(ErrorCode::UNKNOWN_MEMBER_ID, member_id));
        };
        if let Some(iid) = &instance_id {
            group.statics.insert(iid.clone(), member_id.clone());
        }
        let (tx, rx) = oneshot::channel();
        let session = Duration::from_millis(session_ms as u64);
        let rebalance = Duration::from_millis(rebalance_ms.max(session_ms) as u64);
        let member = group.members.entry(member_id).or_insert_with(|| {
            Member::new(
                (client_id.to_string(), None),
                (session, rebalance),
                fixed,
                now,
                &self.held,
            )
        });
        member.instance_id = instance_id;
        member.fixed = fixed;
        // Own copies: slices of the request frame would keep the whole frame alive as long as
        // the member (a small subscription in a large frame would pin the frame).
        member.set_protocols(
            protocols
                .into_iter()
                .map(|(name, metadata)| (name, Bytes::copy_from_slice(&metadata)))
                .collect(),
        );
        member.session = session;
        member.rebalance = rebalance;
        member.last_seen = now;
        if let Some(old) = member.join.replace(tx) {
            let _ = old.send(fail_join(ErrorCode::REBALANCE_IN_PROGRESS, String::new()));
        }
        group.protocol_type = Some(protocol_type.to_string());
        let initial_delay = if committed {
            Duration::ZERO
        } else {
            self.initial_delay
        };
        group.prepare(now, initial_delay);
        group.maybe_complete_join(now);
        Answer::Later(rx)
    }

    /// A SyncGroup: an immediate answer, or a channel answered when the leader's assignment
    /// arrives.
    pub fn sync(
        &self,
        group_id: &str,
        generation: i32,
        (member_id, instance_id): (&str, Option<&str>),
        assignments: Vec<(String, Bytes)>,
    ) -> Answer<SyncResult> {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return Answer::Ready(fail_sync(ErrorCode::UNKNOWN_MEMBER_ID));
        };
        if group.fences(member_id, instance_id) {
            return Answer::Ready(fail_sync(ErrorCode::FENCED_INSTANCE_ID));
        }
        if !group.members.contains_key(member_id) {
            return Answer::Ready(fail_sync(ErrorCode::UNKNOWN_MEMBER_ID));
        }
        if generation != group.generation {
            return Answer::Ready(fail_sync(ErrorCode::ILLEGAL_GENERATION));
        }
        let (protocol_type, protocol_name) = (group.protocol_type.clone(), group.protocol.clone());
        let answer = |assignment: Bytes| SyncResult {
            error: ErrorCode::NONE,
            protocol_type: protocol_type.clone(),
            protocol_name: protocol_name.clone(),
            assignment,
        };
        match group.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                Answer::Ready(fail_sync(ErrorCode::REBALANCE_IN_PROGRESS))
            }
            GroupState::Stable => Answer::Ready(answer(
                group
                    .members
                    .get(member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default(),
            )),
            GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                if let Some(member) = group.members.get_mut(member_id) {
                    member.sync = Some(tx);
                    member.last_seen = self.clock.now();
                }
                if group.leader.as_deref() == Some(member_id) && !group.storing {
                    if assignments
                        .iter()
                        .any(|(_, a)| a.len() > self.member_bytes_max)
                    {
                        // Refused: the group rebalances again (the others' syncs are answered
                        // REBALANCE_IN_PROGRESS by `prepare`).
                        if let Some(member) = group.members.get_mut(member_id) {
                            member.sync = None;
                        }
                        group.prepare(self.clock.now(), self.initial_delay);
                        return Answer::Ready(fail_sync(ErrorCode::INVALID_REQUEST));
                    }
                    for (id, assignment) in assignments {
                        if let Some(member) = group.members.get_mut(&id) {
                            member.set_assignment(Bytes::copy_from_slice(&assignment));
                        }
                    }
                    if self.outbox.enabled() {
                        // Stored first (Kafka's order): a coordinator taking the group over
                        // serves no generation its members were not told of.
                        group.storing = true;
                        group.persisted = true;
                        self.outbox.put(group_id, Some(group.snapshot()));
                    } else {
                        group.stabilize();
                    }
                }
                Answer::Later(rx)
            }
        }
    }

    /// A Heartbeat from (member id, static instance id).
    pub fn heartbeat(
        &self,
        group_id: &str,
        generation: i32,
        member: (&str, Option<&str>),
    ) -> ErrorCode {
        self.heartbeat_watch(group_id, generation, member, true).0
    }

    /// A heartbeat, and on success a watch of the group's rebalances (subscribed under the same
    /// lock, so a rebalance begun after this check is seen) and the member's session. `alive`:
    /// the member is heard from now (false for the check at the end of a held heartbeat, whose
    /// sender may have died while it was held).
    fn heartbeat_watch(
        &self,
        group_id: &str,
        generation: i32,
        (member_id, instance_id): (&str, Option<&str>),
        alive: bool,
    ) -> (ErrorCode, Option<(watch::Receiver<u64>, Duration)>) {
        let mut groups = self.lock();
        let Some(member_group) = groups.get_mut(group_id) else {
            return (ErrorCode::UNKNOWN_MEMBER_ID, None);
        };
        if member_group.fences(member_id, instance_id) {
            return (ErrorCode::FENCED_INSTANCE_ID, None);
        }
        let state = member_group.state;
        let current = member_group.generation;
        let Some(member) = member_group.members.get_mut(member_id) else {
            return (ErrorCode::UNKNOWN_MEMBER_ID, None);
        };
        if alive {
            member.last_seen = self.clock.now();
        }
        let session = member.session;
        if state == GroupState::PreparingRebalance {
            return (ErrorCode::REBALANCE_IN_PROGRESS, None);
        }
        if generation != current {
            return (ErrorCode::ILLEGAL_GENERATION, None);
        }
        (
            ErrorCode::NONE,
            Some((member_group.rebalances.subscribe(), session)),
        )
    }

    /// A long-poll heartbeat (native protocol): answered at once if there is something to
    /// report, else held until a rebalance begins, the group goes away, or `max_wait` (capped at
    /// half the member's session timeout) passes; then checked again. The member counts as
    /// alive when the heartbeat arrives, not when it is answered: a member killed while its
    /// heartbeat is held expires one session after that heartbeat arrived.
    pub async fn heartbeat_wait(
        &self,
        group_id: &str,
        generation: i32,
        member_id: &str,
        max_wait: Duration,
    ) -> ErrorCode {
        let (code, watch) = self.heartbeat_watch(group_id, generation, (member_id, None), true);
        let Some((mut rebalances, session)) = watch else {
            return code;
        };
        if max_wait.is_zero() {
            return code;
        }
        // Err (the group is gone) also ends the wait.
        let _ = tokio::time::timeout(max_wait.min(session / 2), rebalances.changed()).await;
        self.heartbeat_watch(group_id, generation, (member_id, None), false)
            .0
    }

    /// A LeaveGroup of (member id, static instance id) pairs (a static member may be named by
    /// its instance id alone): per member, NONE, UNKNOWN_MEMBER_ID or FENCED_INSTANCE_ID.
    pub fn leave(&self, group_id: &str, members: &[(String, Option<String>)]) -> Vec<ErrorCode> {
        let now = self.clock.now();
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return vec![ErrorCode::UNKNOWN_MEMBER_ID; members.len()];
        };
        members
            .iter()
            .map(|(id, instance)| {
                let current = instance
                    .as_deref()
                    .and_then(|iid| group.statics.get(iid).cloned());
                let id = match (current, instance) {
                    (Some(current), _) if id.is_empty() || *id == current => current,
                    (Some(_), _) => return ErrorCode::FENCED_INSTANCE_ID,
                    (None, Some(_)) if id.is_empty() => return ErrorCode::UNKNOWN_MEMBER_ID,
                    _ => id.clone(),
                };
                if group.members.contains_key(&id) {
                    group.remove(&id, now, self.initial_delay);
                    ErrorCode::NONE
                } else {
                    ErrorCode::UNKNOWN_MEMBER_ID
                }
            })
            .collect()
    }

    /// Whether a member (member id, static instance id) may commit offsets for `group_id` at
    /// `generation`: it must belong to the current generation.
    pub fn check_commit(
        &self,
        group_id: &str,
        generation: i32,
        (member_id, instance_id): (&str, Option<&str>),
    ) -> ErrorCode {
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return ErrorCode::UNKNOWN_MEMBER_ID;
        };
        if group.fences(member_id, instance_id) {
            return ErrorCode::FENCED_INSTANCE_ID;
        }
        if !group.members.contains_key(member_id) {
            return ErrorCode::UNKNOWN_MEMBER_ID;
        }
        if generation != group.generation {
            return ErrorCode::ILLEGAL_GENERATION;
        }
        // As Kafka: members of the current generation may commit while the group prepares a
        // rebalance (consumers commit as their partitions are revoked), not while it waits for
        // the leader's new assignment.
        if group.state == GroupState::CompletingRebalance {
            return ErrorCode::REBALANCE_IN_PROGRESS;
        }
        ErrorCode::NONE
    }

    /// Whether the group has members (commits outside membership are refused then).
    pub fn has_members(&self, group_id: &str) -> bool {
        self.lock()
            .get(group_id)
            .is_some_and(|g| !g.members.is_empty())
    }

    /// Forgets a group without members (DeleteGroups), so that it is Dead at once rather than
    /// Empty until the next tick; member ids handed out but not joined go with it.
    pub fn forget_if_empty(&self, group_id: &str) {
        let mut groups = self.lock();
        if groups.get(group_id).is_some_and(|g| g.members.is_empty()) {
            groups.remove(group_id);
        }
    }

    /// Answers every JoinGroup and SyncGroup still waiting (at shutdown) with
    /// COORDINATOR_NOT_AVAILABLE, so that clients look for the coordinator again instead of
    /// holding the shutdown up until its timeout.
    pub fn close(&self) {
        let mut groups = self.lock();
        for group in groups.values_mut() {
            for (id, member) in &mut group.members {
                if let Some(join) = member.join.take() {
                    let _ = join.send(fail_join(ErrorCode::COORDINATOR_NOT_AVAILABLE, id.clone()));
                }
                if let Some(sync) = member.sync.take() {
                    let _ = sync.send(fail_sync(ErrorCode::COORDINATOR_NOT_AVAILABLE));
                }
            }
        }
        groups.clear();
    }

    /// Forgets the groups `moved` names (their coordinator moved to another broker, or came
    /// back here and must not serve an old membership): waiting JoinGroups and SyncGroups get
    /// NOT_COORDINATOR, so their members find the coordinator again.
    pub fn unload(&self, moved: impl Fn(&str) -> bool) {
        let mut groups = self.lock();
        groups.retain(|name, group| {
            if !moved(name) {
                return true;
            }
            for (id, member) in &mut group.members {
                if let Some(join) = member.join.take() {
                    let _ = join.send(fail_join(ErrorCode::NOT_COORDINATOR, id.clone()));
                }
                if let Some(sync) = member.sync.take() {
                    let _ = sync.send(fail_sync(ErrorCode::NOT_COORDINATOR));
                }
            }
            tracing::info!(group = %name, "group unloaded: its coordinator moved");
            false
        });
    }

    /// Expires members past their session timeout and completes due rebalances.
    pub fn tick(&self) {
        let now = self.clock.now();
        let mut groups = self.lock();
        for (name, group) in groups.iter_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| m.join.is_none() && now.duration_since(m.last_seen) > m.session)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(group = %name, member = %id, "member session expired");
                group.remove(&id, now, self.initial_delay);
            }
            group
                .pending
                .retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(300));
            group.maybe_complete_join(now);
        }
        groups.retain(|_, g| g.state != GroupState::Empty || !g.pending.is_empty());
    }
}

impl Coordinator {
    /// Bytes held for all groups, members and member ids handed out.
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Rebalances completed since the broker started, all groups.
    pub fn rebalances(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Every group with members: (name, protocol type, state).
    pub fn list(&self) -> Vec<(String, String, &'static str)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(name, g)| {
                (
                    name.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state.name(),
                )
            })
            .collect();
        all.sort();
        all
    }

    /// One group's state and members, if it has any state here.
    pub fn describe(&self, group_id: &str) -> Option<GroupInfo> {
        let groups = self.lock();
        let g = groups.get(group_id)?;
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(GroupInfo {
            state: g.state.name(),
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: protocol.clone(),
            generation: g.generation,
            members: g
                .members
                .iter()
                .map(|(id, m)| {
                    (
                        id.clone(),
                        m.instance_id.clone(),
                        m.client_id.clone(),
                        m.subscription(&protocol),
                        m.assignment.clone(),
                    )
                })
                .collect(),
        })
    }
}

/// A little entropy for member ids (unique by the counter already; this only makes them hard to
/// guess across restarts).
fn rand_u32(n: u64) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    crc32fast::hash(&[n.to_le_bytes(), u64::from(nanos).to_le_bytes()].concat())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A consumer's JoinGroup for `group` with the range assignor.
    fn consumer(group: &str, member_id: &str, require_known_member_id: bool) -> Join {
        Join {
            group_id: group.into(),
            member_id: member_id.into(),
            client_id: "client".into(),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"meta"))],
            session_ms: 10_000,
            rebalance_ms: 10_000,
            require_known_member_id,
            ..Join::default()
        }
    }

    fn limits(groups_max: u32, members_max: u32) -> GroupLimits {
        GroupLimits {
            groups_max,
            members_max,
            member_bytes_max: 1 << 20,
            total_bytes_max: 8 << 20,
        }
    }

    /// A coordinator whose 100 ms initial delay lets members starting together into the first
    /// generation, and a task ticking it as the broker's timer does (abort it at the end).
    fn ticking() -> (std::sync::Arc<Coordinator>, tokio::task::JoinHandle<()>) {
        ticking_with(Duration::from_millis(100))
    }

    /// A coordinator with this initial delay, ticked every 10 ms.
    fn ticking_with(
        initial_delay: Duration,
    ) -> (std::sync::Arc<Coordinator>, tokio::task::JoinHandle<()>) {
        let c = std::sync::Arc::new(Coordinator::new(
            std::sync::Arc::new(crate::clock::SystemClock),
            initial_delay,
            limits(10, 10),
        ));
        let ticker = {
            let c = std::sync::Arc::clone(&c);
            tokio::spawn(async move {
                loop {
                    c.tick();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        (c, ticker)
    }

    fn join(c: &Coordinator, id: &str) -> Answer<JoinResult> {
        c.join(consumer("g", id, true))
    }

    #[tokio::test]
    async fn close_answers_waiting_joins() {
        // A long initial delay keeps the first join waiting.
        let c = Coordinator::new(
            std::sync::Arc::new(crate::clock::SystemClock),
            Duration::from_secs(60),
            limits(10, 10),
        );
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let waiting = c.join(consumer("g", "", false));
        c.close();
        assert_eq!(
            waiting.get(lost).await.error,
            ErrorCode::COORDINATOR_NOT_AVAILABLE
        );
    }

    #[tokio::test]
    async fn groups_and_members_are_bounded() {
        let c = Coordinator::new(
            std::sync::Arc::new(crate::clock::SystemClock),
            Duration::ZERO,
            limits(2, 2),
        );
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let join_group = |g: &str| c.join(consumer(g, "", true));
        assert_eq!(
            join_group("a").get(lost).await.error,
            ErrorCode::MEMBER_ID_REQUIRED
        );
        assert_eq!(
            join_group("a").get(lost).await.error,
            ErrorCode::MEMBER_ID_REQUIRED
        );
        assert_eq!(
            join_group("a").get(lost).await.error,
            ErrorCode::GROUP_MAX_SIZE_REACHED
        );
        assert_eq!(
            join_group("b").get(lost).await.error,
            ErrorCode::MEMBER_ID_REQUIRED
        );
        assert_eq!(
            join_group("c").get(lost).await.error,
            ErrorCode::POLICY_VIOLATION
        );
    }

    /// A group with committed offsets but no members here (its coordinator moved) forms at
    /// once; a new group waits the initial delay.
    #[tokio::test]
    async fn a_group_with_committed_offsets_skips_the_initial_delay() {
        let (c, ticker) = ticking_with(Duration::from_secs(3));
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        for (group, committed) in [("moved", true), ("new", false)] {
            let started = std::time::Instant::now();
            let first = c.join_group(consumer(group, "", false), committed);
            let joined = first.get(lost).await;
            assert_eq!(joined.error, ErrorCode::NONE, "{group}");
            let took = started.elapsed();
            if committed {
                assert!(took < Duration::from_secs(1), "{group}: {took:?}");
            } else {
                assert!(took >= Duration::from_millis(2900), "{group}: {took:?}");
            }
        }
        ticker.abort();
    }

    /// The SyncGroups of a follower and of a leader assigning "L" to itself and "F" to the
    /// follower (the follower's first): (the leader's answer, the follower's).
    fn sync_both(
        c: &Coordinator,
        leader: &JoinResult,
        follower: &JoinResult,
    ) -> (Answer<SyncResult>, Answer<SyncResult>) {
        let fs = c.sync(
            "g",
            follower.generation,
            (&follower.member_id, None),
            vec![],
        );
        let ls = c.sync(
            "g",
            leader.generation,
            (&leader.member_id, None),
            vec![
                (leader.member_id.clone(), Bytes::from_static(b"L")),
                (follower.member_id.clone(), Bytes::from_static(b"F")),
            ],
        );
        (ls, fs)
    }

    #[tokio::test]
    async fn two_members_join_sync_and_rebalance_when_one_leaves() {
        let (c, ticker) = ticking();
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let a = join(&c, "").get(lost).await;
        assert_eq!(a.error, ErrorCode::MEMBER_ID_REQUIRED);
        let b = join(&c, "").get(lost).await;
        let ja = join(&c, &a.member_id);
        let jb = join(&c, &b.member_id);
        let (ja, jb) = (ja.get(lost).await, jb.get(lost).await);
        assert_eq!((ja.error, jb.error), (ErrorCode::NONE, ErrorCode::NONE));
        assert_eq!(ja.generation, jb.generation);
        let leader = if ja.members.is_empty() { &jb } else { &ja };
        assert_eq!(leader.members.len(), 2);
        let follower = if ja.members.is_empty() { &ja } else { &jb };
        let lost_sync = || fail_sync(ErrorCode::UNKNOWN_MEMBER_ID);
        let (ls, fs) = sync_both(&c, leader, follower);
        assert_eq!(&ls.get(lost_sync).await.assignment[..], b"L");
        assert_eq!(&fs.get(lost_sync).await.assignment[..], b"F");
        assert_eq!(
            c.heartbeat("g", leader.generation, (&leader.member_id, None)),
            ErrorCode::NONE
        );
        // The follower leaves: the leader hears of a rebalance and rejoins alone.
        assert_eq!(
            c.leave("g", &[(follower.member_id.clone(), None)]),
            vec![ErrorCode::NONE]
        );
        assert_eq!(
            c.heartbeat("g", leader.generation, (&leader.member_id, None)),
            ErrorCode::REBALANCE_IN_PROGRESS
        );
        let again = join(&c, &leader.member_id).get(lost).await;
        assert_eq!(again.generation, leader.generation + 1);
        assert_eq!(again.members.len(), 1);
        assert_eq!(
            c.heartbeat("g", leader.generation, (&leader.member_id, None)),
            ErrorCode::ILLEGAL_GENERATION
        );
        ticker.abort();
    }

    /// Two members through their first generation on `c` (storing on): the leader's assignment
    /// is stored before either SyncGroup is answered. Returns (leader, follower) JoinResults
    /// and the stored record.
    async fn stored_generation(c: &Coordinator) -> (JoinResult, JoinResult, StoredGroup) {
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let a = join(c, "").get(lost).await;
        let b = join(c, "").get(lost).await;
        let (ja, jb) = (join(c, &a.member_id), join(c, &b.member_id));
        let (ja, jb) = (ja.get(lost).await, jb.get(lost).await);
        let (leader, follower) = if ja.members.is_empty() {
            (jb, ja)
        } else {
            (ja, jb)
        };
        let (ls, fs) = sync_both(c, &leader, &follower);
        let mut records = c.take_records();
        assert_eq!(records.len(), 1, "one membership record to store");
        let (name, record) = records.pop().unwrap();
        let record = record.unwrap();
        assert_eq!((name.as_str(), record.generation), ("g", leader.generation));
        assert_eq!(record.members.len(), 2);
        // Nobody has an assignment before it is stored.
        let (Answer::Later(mut ls), Answer::Later(mut fs)) = (ls, fs) else {
            panic!("SyncGroups answered before the membership was stored");
        };
        assert!(ls.try_recv().is_err() && fs.try_recv().is_err());
        c.stored("g", record.generation, Ok(()));
        assert_eq!(&ls.await.unwrap().assignment[..], b"L");
        assert_eq!(&fs.await.unwrap().assignment[..], b"F");
        (leader, follower, record)
    }

    #[tokio::test]
    async fn a_stored_membership_is_taken_over_by_a_new_coordinator_without_a_rebalance() {
        let (c, ticker) = ticking();
        c.enable_store();
        let (leader, follower, record) = stored_generation(&c).await;
        // The coordinator moves: another broker restores what was stored.
        let (moved, moved_ticker) = ticking();
        moved.enable_store();
        moved.restore(vec![("g".to_string(), record)]);
        let info = moved.describe("g").unwrap();
        assert_eq!((info.state, info.generation), ("Stable", leader.generation));
        for m in [&leader, &follower] {
            assert_eq!(
                moved.heartbeat("g", m.generation, (&m.member_id, None)),
                ErrorCode::NONE
            );
            assert_eq!(
                moved.check_commit("g", m.generation, (&m.member_id, None)),
                ErrorCode::NONE
            );
        }
        // A follower asking for its assignment again gets the stored one.
        let again = moved
            .sync(
                "g",
                follower.generation,
                (&follower.member_id, None),
                vec![],
            )
            .get(|| fail_sync(ErrorCode::UNKNOWN_MEMBER_ID))
            .await;
        assert_eq!(&again.assignment[..], b"F");
        assert_eq!(moved.rebalances(), 0, "taking the group over rebalanced it");
        // Both leave: the group empties and its stored membership gets a tombstone.
        moved.leave(
            "g",
            &[
                (leader.member_id.clone(), None),
                (follower.member_id.clone(), None),
            ],
        );
        let records = moved.take_records();
        assert_eq!(records, vec![("g".to_string(), None)]);
        ticker.abort();
        moved_ticker.abort();
    }

    /// The lone member `joined` syncs with assignment "L", and its membership's write ends
    /// with `outcome`: the SyncGroup's answer.
    async fn sync_stored_as(
        c: &Coordinator,
        joined: &JoinResult,
        outcome: Result<(), (ErrorCode, String)>,
    ) -> SyncResult {
        let sync = c.sync(
            "g",
            joined.generation,
            (&joined.member_id, None),
            vec![(joined.member_id.clone(), Bytes::from_static(b"L"))],
        );
        let (name, record) = c.take_records().pop().unwrap();
        c.stored(&name, record.unwrap().generation, outcome);
        sync.get(|| fail_sync(ErrorCode::UNKNOWN_MEMBER_ID)).await
    }

    #[tokio::test]
    async fn a_coordinator_that_lost_its_partition_fails_the_syncs_and_other_store_failures_go_on_in_memory()
     {
        let (c, ticker) = ticking();
        c.enable_store();
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let a = join(&c, "").get(lost).await;
        let ja = join(&c, &a.member_id).get(lost).await;
        let moved = Err((ErrorCode::NOT_COORDINATOR, "no longer the leader".into()));
        let answer = sync_stored_as(&c, &ja, moved).await;
        assert_eq!(answer.error, ErrorCode::NOT_COORDINATOR);
        assert_eq!(
            c.heartbeat("g", ja.generation, (&ja.member_id, None)),
            ErrorCode::REBALANCE_IN_PROGRESS
        );
        // A late outcome for a generation the group left behind changes nothing.
        c.stored("g", ja.generation, Ok(()));
        assert_eq!(c.describe("g").unwrap().state, "PreparingRebalance");
        // Too few in-sync replicas for the write: the group goes on in memory.
        let again = join(&c, &ja.member_id).get(lost).await;
        let too_few = Err((ErrorCode::NOT_ENOUGH_REPLICAS, "too few replicas".into()));
        let answer = sync_stored_as(&c, &again, too_few).await;
        assert_eq!(
            (answer.error, &answer.assignment[..]),
            (ErrorCode::NONE, &b"L"[..])
        );
        ticker.abort();
    }

    #[tokio::test]
    async fn subscription_bytes_are_bounded_per_member_and_in_total_and_given_back() {
        // What a one-letter group (its name held twice: as the map's key and by the group) and
        // a member with an n-byte "range" subscription cost.
        let group = GROUP_OVERHEAD + 2;
        let member = |n: usize| member_fixed("client", None, "consumer") + "range".len() + n;
        let c = Coordinator::new(
            std::sync::Arc::new(crate::clock::SystemClock),
            Duration::ZERO,
            GroupLimits {
                groups_max: 100,
                members_max: 100,
                member_bytes_max: 1_000,
                // Room for three groups and two members of 900 bytes, not a third.
                total_bytes_max: (3 * group + 2 * member(900) + member(900) / 2) as u64,
            },
        );
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let with_bytes = |group: &str, id: &str, n: usize| {
            let mut j = consumer(group, id, false);
            j.protocols = vec![("range".into(), Bytes::from(vec![0u8; n]))];
            c.join(j)
        };
        // Over the per-member bound (the group stays until the timer's sweep).
        assert_eq!(
            with_bytes("a", "", 1_001).get(lost).await.error,
            ErrorCode::POLICY_VIOLATION
        );
        assert_eq!(c.held_bytes(), group);
        // Two members of 900 fit; a third goes over the total.
        let first = with_bytes("a", "", 900);
        let second = with_bytes("b", "", 900);
        assert_eq!(c.held_bytes(), 2 * group + 2 * member(900));
        assert_eq!(
            with_bytes("c", "", 900).get(lost).await.error,
            ErrorCode::POLICY_VIOLATION
        );
        let (first, second) = (first.get(lost).await, second.get(lost).await);
        assert_eq!(
            (first.error, second.error),
            (ErrorCode::NONE, ErrorCode::NONE)
        );
        // Rejoining with a smaller subscription counts the difference; leaving gives it back.
        let again = with_bytes("a", &first.member_id, 100);
        assert_eq!(c.held_bytes(), 3 * group + member(100) + member(900));
        assert_eq!(
            c.leave("a", &[(first.member_id.clone(), None)]),
            vec![ErrorCode::NONE]
        );
        drop(again);
        assert_eq!(c.held_bytes(), 3 * group + member(900));
        // A member id handed out (KIP-394) is charged too.
        let handed = c.join(consumer("b", "", true)).get(lost).await;
        assert_eq!(handed.error, ErrorCode::MEMBER_ID_REQUIRED);
        assert_eq!(
            c.held_bytes(),
            3 * group + member(900) + PENDING_OVERHEAD + handed.member_id.len()
        );
        c.close();
        assert_eq!(c.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_restarted_static_member_takes_its_place_back_without_a_rebalance() {
        let (c, ticker) = ticking();
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let lost_sync = || fail_sync(ErrorCode::UNKNOWN_MEMBER_ID);
        let static_join = |id: &str, instance: &str| {
            let mut j = consumer("g", id, true);
            j.instance_id = Some(instance.into());
            c.join(j)
        };
        // Static members get their id at once (no MEMBER_ID_REQUIRED round).
        let a = static_join("", "pod-a");
        let b = static_join("", "pod-b");
        let (a, b) = (a.get(lost).await, b.get(lost).await);
        assert_eq!((a.error, b.error), (ErrorCode::NONE, ErrorCode::NONE));
        let (leader, follower) = if a.members.is_empty() { (b, a) } else { (a, b) };
        let (ls, fs) = sync_both(&c, &leader, &follower);
        assert_eq!(&fs.get(lost_sync).await.assignment[..], b"F");
        assert_eq!(&ls.get(lost_sync).await.assignment[..], b"L");
        let info = c.describe("g").unwrap();
        let follower_iid = info
            .members
            .iter()
            .find(|m| m.0 == follower.member_id)
            .and_then(|m| m.1.clone())
            .unwrap();
        // The follower restarts: it gets a new id, the same generation, and its assignment back;
        // the leader sees no rebalance.
        let again = static_join("", &follower_iid).get(lost).await;
        assert_eq!(again.error, ErrorCode::NONE);
        assert_eq!(again.generation, follower.generation);
        assert_ne!(again.member_id, follower.member_id);
        let synced = c.sync("g", again.generation, (&again.member_id, None), vec![]);
        assert_eq!(&synced.get(lost_sync).await.assignment[..], b"F");
        assert_eq!(
            c.heartbeat("g", leader.generation, (&leader.member_id, None)),
            ErrorCode::NONE
        );
        // The old incarnation is gone; its requests carrying the instance id are fenced.
        let stale = (follower.member_id.as_str(), Some(follower_iid.as_str()));
        assert_eq!(
            c.heartbeat("g", follower.generation, stale),
            ErrorCode::FENCED_INSTANCE_ID
        );
        assert_eq!(
            c.check_commit("g", follower.generation, stale),
            ErrorCode::FENCED_INSTANCE_ID
        );
        assert_eq!(
            c.sync("g", follower.generation, stale, vec![])
                .get(lost_sync)
                .await
                .error,
            ErrorCode::FENCED_INSTANCE_ID
        );
        assert_eq!(
            c.heartbeat(
                "g",
                again.generation,
                (&again.member_id, Some(follower_iid.as_str()))
            ),
            ErrorCode::NONE
        );
        assert_eq!(
            c.heartbeat("g", follower.generation, (&follower.member_id, None)),
            ErrorCode::UNKNOWN_MEMBER_ID
        );
        assert_eq!(
            static_join(&follower.member_id, &follower_iid)
                .get(lost)
                .await
                .error,
            ErrorCode::FENCED_INSTANCE_ID
        );
        // The leader restarts: no rebalance either; it gets the members (it assigns again, as
        // clients without KIP-814 do) but the group keeps its assignments.
        let leader_iid = info
            .members
            .iter()
            .find(|m| m.0 == leader.member_id)
            .and_then(|m| m.1.clone())
            .unwrap();
        let restarted = static_join("", &leader_iid).get(lost).await;
        assert_eq!(restarted.error, ErrorCode::NONE);
        assert_eq!(restarted.generation, leader.generation);
        assert_eq!(restarted.leader, restarted.member_id);
        assert_eq!(restarted.members.len(), 2);
        let resynced = c.sync(
            "g",
            restarted.generation,
            (&restarted.member_id, None),
            vec![(again.member_id.clone(), Bytes::from_static(b"X"))],
        );
        assert_eq!(&resynced.get(lost_sync).await.assignment[..], b"L");
        assert_eq!(
            c.heartbeat("g", again.generation, (&again.member_id, None)),
            ErrorCode::NONE
        );
        assert_eq!(
            &c.sync("g", again.generation, (&again.member_id, None), vec![])
                .get(lost_sync)
                .await
                .assignment[..],
            b"F"
        );
        // Leaving by instance id alone: the others rebalance.
        assert_eq!(
            c.leave("g", &[(String::new(), Some(follower_iid.clone()))]),
            vec![ErrorCode::NONE]
        );
        assert_eq!(
            c.heartbeat("g", restarted.generation, (&restarted.member_id, None)),
            ErrorCode::REBALANCE_IN_PROGRESS
        );
        ticker.abort();
    }

    #[tokio::test]
    async fn a_held_heartbeat_is_answered_when_a_rebalance_begins() {
        let c = std::sync::Arc::new(Coordinator::new(
            std::sync::Arc::new(crate::clock::SystemClock),
            Duration::ZERO,
            limits(10, 10),
        ));
        let lost = || fail_join(ErrorCode::UNKNOWN_MEMBER_ID, String::new());
        let id = join(&c, "").get(lost).await.member_id;
        let joined = join(&c, &id).get(lost).await;
        assert_eq!(joined.error, ErrorCode::NONE);
        let synced = c.sync(
            "g",
            joined.generation,
            (&id, None),
            vec![(id.clone(), Bytes::new())],
        );
        let lost_sync = || fail_sync(ErrorCode::UNKNOWN_MEMBER_ID);
        assert_eq!(synced.get(lost_sync).await.error, ErrorCode::NONE);
        // Nothing to report: held for the wait.
        let started = Instant::now();
        let code = c
            .heartbeat_wait("g", joined.generation, &id, Duration::from_millis(200))
            .await;
        assert_eq!(code, ErrorCode::NONE);
        assert!(started.elapsed() >= Duration::from_millis(200));
        // A second member joins while a heartbeat is held: answered at once.
        let held = {
            let (c, id) = (std::sync::Arc::clone(&c), id.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let code = c
                    .heartbeat_wait("g", joined.generation, &id, Duration::from_secs(4))
                    .await;
                (code, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let newcomer = join(&c, "").get(lost).await;
        assert_eq!(newcomer.error, ErrorCode::MEMBER_ID_REQUIRED);
        let _waiting = join(&c, &newcomer.member_id);
        let (code, waited) = held.await.unwrap();
        assert_eq!(code, ErrorCode::REBALANCE_IN_PROGRESS);
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }
}
