//! The group consumer: members of a consumer group share the partitions of the topics they
//! subscribe to, commit what they processed, and take over the partitions of members that leave
//! or die.
//!
//! Membership runs on two connections of its own (responses come in request order, and the
//! broker holds JoinGroup, SyncGroup and heartbeats): one for join, sync and commits, driven by
//! [`GroupConsumer::poll`], and one for a background task that sends long-poll heartbeats, so a
//! member learns of a rebalance within milliseconds and stays alive while the application
//! processes a batch. Rebalances happen inside `poll`, between batches, as in Kafka's consumer:
//! the application never sees records of a partition it no longer owns after `poll` returns.
//!
//! Delivery is at least once: with automatic commits, `poll` commits the positions of the
//! records returned by earlier calls (processed, since the application called again), and so do
//! rebalances (before partitions are given up) and `close`.

pub mod assignor;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_protocol::native::*;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, Connector};
use crate::connection::Connection;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Position};
use crate::error::ClientError;
use assignor::{Assignment, Assignor, Subscription, TopicPartition};

/// Group consumer settings.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The group.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Assignors this member supports, most preferred first; the group uses the first of the
    /// leader's list that every member supports.
    pub assignors: Vec<Assignor>,
    /// The member is removed if the broker does not hear from it for this long (a dead member's
    /// partitions move after it).
    pub session_timeout: Duration,
    /// Longest a heartbeat is held by the broker (heartbeats are long polls: a rebalance is
    /// learned of at once); at most half the session timeout.
    pub heartbeat_interval: Duration,
    /// How long a rebalance waits for members to rejoin, so how long the application may take
    /// between two `poll` calls during a rebalance (Kafka's `max.poll.interval.ms`).
    pub rebalance_timeout: Duration,
    /// Commit the positions of returned records automatically.
    pub auto_commit: bool,
    /// How often automatic commits happen (also at every rebalance and at `close`).
    pub auto_commit_interval: Duration,
    /// Where to start a partition the group has no committed offset for (or whose committed
    /// offset is no longer stored): `Earliest` or `Latest`.
    pub reset: Position,
    /// How often the group's leader checks the subscribed topics' partition counts; a change
    /// (a subscribed topic created, or given more partitions) makes it rejoin so the group
    /// reassigns (Kafka's `metadata.max.age.ms`, shorter).
    pub metadata_refresh: Duration,
    /// Fetch settings (and the client id).
    pub consumer: ConsumerConfig,
}

impl GroupConfig {
    /// Defaults for `group_id` consuming `topics`: range then cooperative-sticky assignors
    /// (Kafka's default list), 10 s session, 3 s heartbeat, 5 min rebalance timeout, automatic
    /// commits every 5 s, new partitions from the latest offset, the leader checking the topics
    /// every 30 s.
    pub fn new(group_id: impl Into<String>, topics: &[&str]) -> GroupConfig {
        GroupConfig {
            group_id: group_id.into(),
            topics: topics.iter().map(|t| (*t).to_string()).collect(),
            assignors: vec![Assignor::Range, Assignor::CooperativeSticky],
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            rebalance_timeout: Duration::from_secs(300),
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            reset: Position::Latest,
            metadata_refresh: Duration::from_secs(30),
            consumer: ConsumerConfig {
                client_id: "cairn-group-consumer".into(),
                ..ConsumerConfig::default()
            },
        }
    }
}

/// A change of the partitions a member owns, handed to the rebalance listener inside `poll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebalance<'a> {
    /// Partitions newly assigned (their positions are set: committed offset or the reset).
    Assigned(&'a [TopicPartition]),
    /// Partitions given up in an orderly rebalance; their positions were committed first (with
    /// automatic commits), and no other member reads them before this returns.
    Revoked(&'a [TopicPartition]),
    /// Partitions lost: the member was dropped from the group (session expired, broker
    /// restarted); another member may already own them, so commits for them are refused.
    Lost(&'a [TopicPartition]),
}

type Listener = Box<dyn FnMut(Rebalance<'_>) + Send>;

/// What the heartbeat task and `poll` share.
#[derive(Debug)]
struct Shared {
    /// (member id, generation) to heartbeat for; `None` while (re)joining.
    membership: watch::Sender<Option<(String, i32)>>,
    /// A heartbeat said: rejoin.
    rejoin: AtomicBool,
    /// A heartbeat said the membership is gone (unknown member or stale generation).
    lost: AtomicBool,
    /// Wakes a `poll` waiting on a fetch.
    wake: Notify,
}

/// A member of a consumer group.
pub struct GroupConsumer {
    config: GroupConfig,
    cluster: Cluster,
    fetcher: Consumer,
    coordinator: Connection,
    shared: Arc<Shared>,
    heartbeat: JoinHandle<()>,
    member_id: String,
    generation: i32,
    owned: BTreeSet<TopicPartition>,
    /// The last offset committed per partition (commits skip partitions that did not move).
    committed: BTreeMap<TopicPartition, u64>,
    /// Rejoin at the next `poll` (first join; second round of a cooperative rebalance).
    rejoin: bool,
    last_commit: Instant,
    listener: Option<Listener>,
    /// As the leader: the topics it assigned and their partition counts then.
    led: Option<(BTreeSet<String>, BTreeMap<String, u32>)>,
    last_metadata: Instant,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group_id", &self.config.group_id)
            .field("member_id", &self.member_id)
            .field("generation", &self.generation)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Tries of a call to a coordinator whose connection broke (each after finding it again).
const COORDINATOR_ATTEMPTS: u32 = 3;

fn membership_gone(code: ErrorCode) -> bool {
    code == ErrorCode::UNKNOWN_MEMBER_ID || code == ErrorCode::ILLEGAL_GENERATION
}

impl GroupConsumer {
    /// Joins `config.group_id` through the cluster at `bootstrap` (one or more `host:port`,
    /// comma-separated; the group is joined at the first `poll`).
    pub async fn connect(
        bootstrap: &str,
        config: GroupConfig,
    ) -> Result<GroupConsumer, ClientError> {
        let cluster = Cluster::connect_tls(
            bootstrap,
            &config.consumer.client_id,
            config.consumer.tls.clone(),
        )
        .await?;
        GroupConsumer::with_cluster(cluster, config).await
    }

    /// A group consumer whose connections come from `connect` (an embedded broker provides
    /// in-process ones).
    pub async fn with_connector(
        connect: Connector,
        config: GroupConfig,
    ) -> Result<GroupConsumer, ClientError> {
        let cluster = Cluster::with_connector(connect, &config.consumer.client_id);
        GroupConsumer::with_cluster(cluster, config).await
    }

    /// A group consumer of `cluster`: its group calls go to the group's coordinator (found
    /// again when it moves), its fetches to each partition's leader.
    pub async fn with_cluster(
        cluster: Cluster,
        config: GroupConfig,
    ) -> Result<GroupConsumer, ClientError> {
        if config.topics.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no topics to subscribe to".into(),
            ));
        }
        if config.heartbeat_interval.is_zero()
            || config.heartbeat_interval * 2 > config.session_timeout
        {
            return Err(ClientError::InvalidArgument(
                "the heartbeat interval must be above zero and at most half the session timeout"
                    .into(),
            ));
        }
        let coordinator = find_coordinator(&cluster, &config.group_id).await?;
        let fetcher = Consumer::with_cluster(cluster.clone(), config.consumer.clone());
        let shared = Arc::new(Shared {
            membership: watch::Sender::new(None),
            rejoin: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let heartbeat = tokio::spawn(heartbeats(
            cluster.clone(),
            config.group_id.clone(),
            config.heartbeat_interval,
            Arc::clone(&shared),
        ));
        Ok(GroupConsumer {
            config,
            cluster,
            fetcher,
            coordinator,
            shared,
            heartbeat,
            member_id: String::new(),
            generation: -1,
            owned: BTreeSet::new(),
            committed: BTreeMap::new(),
            rejoin: true,
            last_commit: Instant::now(),
            listener: None,
            led: None,
            last_metadata: Instant::now(),
        })
    }

    /// Calls `listener` inside `poll` whenever partitions are assigned, revoked or lost.
    pub fn on_rebalance(&mut self, listener: impl FnMut(Rebalance<'_>) + Send + 'static) {
        self.listener = Some(Box::new(listener));
    }

    /// The partitions this member owns.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().cloned().collect()
    }

    /// This member's id (empty before it joined).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The group generation this member belongs to (-1 before it joined).
    pub fn generation(&self) -> i32 {
        self.generation
    }

    /// The next offset to be returned from a partition this member owns.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.fetcher.position(topic, partition)
    }

    /// Moves an owned partition's position (the next `poll` reads from there; the next commit
    /// commits it).
    pub async fn seek(
        &mut self,
        topic: &str,
        partition: u32,
        to: Position,
    ) -> Result<u64, ClientError> {
        if !self.owned.contains(&(topic.to_string(), partition)) {
            return Err(ClientError::InvalidArgument(format!(
                "{topic}-{partition} is not assigned to this member"
            )));
        }
        self.fetcher.seek(topic, partition, to).await
    }

    /// The next records of the member's partitions (possibly none, after the fetch wait). Joins
    /// the group on the first call and rebalances when the group does; with automatic commits,
    /// commits the positions of the records returned by earlier calls when the interval passed.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>, ClientError> {
        loop {
            if self.rejoin || self.shared.rejoin.swap(false, Ordering::AcqRel) {
                // Cleared by a rebalance that completes: a `poll` cancelled midway (a `select!`
                // on a shutdown signal) rejoins at the next call.
                self.rejoin = true;
                if let Err(err) = self.rebalance().await {
                    // Try again at the next poll, reading nothing the member does not own
                    // meanwhile (heartbeats stay paused until a rebalance succeeds).
                    for (topic, p) in self.fetcher.assignment() {
                        if !self.owned.contains(&(topic.clone(), p)) {
                            self.fetcher.unassign(&topic, p);
                        }
                    }
                    return Err(err);
                }
                continue;
            }
            if self.topics_changed().await {
                self.rejoin = true;
                continue;
            }
            if self.config.auto_commit
                && self.last_commit.elapsed() >= self.config.auto_commit_interval
                && let Err(err) = self.commit().await
            {
                tracing::warn!(group = %self.config.group_id, error = %err, "automatic commit failed");
            }
            let shared = Arc::clone(&self.shared);
            let woken = shared.wake.notified();
            if self.owned.is_empty() {
                tokio::select! {
                    () = woken => continue,
                    () = tokio::time::sleep(self.config.consumer.fetch_max_wait) => return Ok(Vec::new()),
                }
            }
            let fetched = tokio::select! {
                biased;
                () = woken => continue,
                fetched = self.fetcher.poll() => fetched,
            };
            match fetched {
                Ok(records) => return Ok(records),
                Err(ClientError::Connection { addr, message }) => {
                    // The fetcher opens a new connection at its next poll.
                    tracing::warn!(%addr, %message, "fetch connection lost; reconnecting");
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
                Err(err) if err.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE) => {
                    let owned: Vec<TopicPartition> = self.owned.iter().cloned().collect();
                    self.reset_out_of_range(&owned).await?;
                }
                Err(err) if err.is_retriable() => {
                    tracing::debug!(error = %err, "fetch failed; retrying");
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Commits the positions of every owned partition: everything returned by `poll` so far
    /// counts as processed. Durable when this returns.
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        let owned = self.owned.clone();
        self.commit_partitions(&owned).await
    }

    /// Leaves the group: commits (with automatic commits), revokes, and tells the coordinator,
    /// so the others rebalance at once instead of after the session timeout.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let mut result = Ok(());
        if self.config.auto_commit && !self.member_id.is_empty() {
            // A coordinator that just died is replaced (and has loaded the group) within a
            // session timeout or so: the final commit waits for that (as Kafka's close does,
            // within its timeout).
            let deadline = Instant::now() + self.config.session_timeout;
            result = self.commit().await;
            while result.as_ref().is_err_and(ClientError::is_retriable) && Instant::now() < deadline
            {
                tokio::time::sleep(RETRY_BACKOFF).await;
                result = self.commit().await;
            }
        }
        let owned: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
        self.notify(Rebalance::Revoked(&owned));
        self.heartbeat.abort();
        if !self.member_id.is_empty() {
            let left: LeaveGroupResponse = self
                .call_coordinator(
                    &Request::LeaveGroup(LeaveGroupRequest {
                        group_id: self.config.group_id.clone(),
                        member_id: self.member_id.clone(),
                    }),
                    |r: &LeaveGroupResponse| r.error_code,
                )
                .await?;
            if left.error_code != 0 && result.is_ok() {
                result = Err(ClientError::broker(
                    "leave group",
                    left.error_code,
                    String::new(),
                ));
            }
        }
        result
    }

    fn notify(&mut self, event: Rebalance<'_>) {
        let empty = match event {
            Rebalance::Assigned(p) | Rebalance::Revoked(p) | Rebalance::Lost(p) => p.is_empty(),
        };
        // Kafka calls the assignment callback even when empty (a member learns it has none).
        if empty && !matches!(event, Rebalance::Assigned(_)) {
            return;
        }
        if let Some(listener) = self.listener.as_mut() {
            listener(event);
        }
    }

    async fn commit_partitions(
        &mut self,
        partitions: &BTreeSet<TopicPartition>,
    ) -> Result<(), ClientError> {
        self.last_commit = Instant::now();
        let mut sent = Vec::new();
        for (topic, p) in partitions {
            let Some(position) = self.fetcher.position(topic, *p) else {
                continue;
            };
            if self.committed.get(&(topic.clone(), *p)) != Some(&position) {
                sent.push(((topic.clone(), *p), position));
            }
        }
        let topics = commit_topics(sent.iter().map(|((t, p), o)| (t.as_str(), *p, *o)));
        if topics.is_empty() {
            return Ok(());
        }
        let response: OffsetCommitResponse = self
            .call_coordinator(
                &Request::OffsetCommit(OffsetCommitRequest {
                    group_id: self.config.group_id.clone(),
                    generation: self.generation,
                    member_id: self.member_id.clone(),
                    topics,
                }),
                // Per-partition codes are handled below.
                |_: &OffsetCommitResponse| 0,
            )
            .await?;
        let mut first_error = None;
        for topic in response.topics {
            for p in topic.partitions {
                if p.error_code != 0 {
                    let code = ErrorCode(p.error_code);
                    if membership_gone(code) || code == ErrorCode::REBALANCE_IN_PROGRESS {
                        // The group moved on: rejoin at the next poll.
                        self.rejoin = true;
                        if membership_gone(code) {
                            self.shared.lost.store(true, Ordering::Release);
                        }
                    }
                    let err = ClientError::broker(
                        format!("commit {}-{}", topic.name, p.partition),
                        p.error_code,
                        String::new(),
                    );
                    if first_error.is_none() && coordinator_moved(&err) {
                        // The next commit goes to the new coordinator.
                        self.reconnect_coordinator().await;
                    }
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        self.committed.extend(sent);
        Ok(())
    }

    /// Gives up every owned partition: lost (no commit) or revoked (committed first).
    async fn give_up_all(&mut self, lost: bool) {
        if self.owned.is_empty() {
            return;
        }
        if !lost
            && self.config.auto_commit
            && let Err(err) = self.commit().await
        {
            tracing::warn!(group = %self.config.group_id, error = %err, "commit before revocation failed");
        }
        let owned: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
        for (topic, p) in &owned {
            self.fetcher.unassign(topic, *p);
            self.committed.remove(&(topic.clone(), *p));
        }
        self.notify(if lost {
            Rebalance::Lost(&owned)
        } else {
            Rebalance::Revoked(&owned)
        });
    }

    /// Joins (or rejoins) the group and takes up the new assignment.
    async fn rebalance(&mut self) -> Result<(), ClientError> {
        self.shared.membership.send_replace(None);
        if self.shared.lost.swap(false, Ordering::AcqRel) {
            self.give_up_all(true).await;
        }
        // As Kafka: the rebalance is cooperative only if every assignor of this member is; eager
        // members give up everything (committing first) before they rejoin.
        let cooperative = self.config.assignors.iter().all(|a| a.is_cooperative());
        if !cooperative {
            self.give_up_all(false).await;
        }
        let assignment = loop {
            let subscription = Subscription {
                topics: self.config.topics.clone(),
                owned: self.owned.iter().cloned().collect(),
            }
            .encode();
            let joined: Result<JoinGroupResponse, ClientError> = self
                .coordinator
                .call(&Request::JoinGroup(JoinGroupRequest {
                    group_id: self.config.group_id.clone(),
                    member_id: self.member_id.clone(),
                    session_timeout_ms: millis(self.config.session_timeout),
                    rebalance_timeout_ms: millis(self.config.rebalance_timeout),
                    protocol_type: "consumer".into(),
                    protocols: self
                        .config
                        .assignors
                        .iter()
                        .map(|a| JoinProtocol {
                            name: a.name().into(),
                            metadata: subscription.clone(),
                        })
                        .collect(),
                }))
                .await;
            let joined = match joined {
                Ok(joined) => joined,
                Err(err) => {
                    self.retry_after(&err).await?;
                    continue;
                }
            };
            match ErrorCode(joined.error_code) {
                ErrorCode::NONE => {}
                ErrorCode::MEMBER_ID_REQUIRED => {
                    self.member_id = joined.member_id;
                    continue;
                }
                ErrorCode::UNKNOWN_MEMBER_ID | ErrorCode::ILLEGAL_GENERATION => {
                    self.member_id.clear();
                    self.give_up_all(true).await;
                    continue;
                }
                code if code == ErrorCode::REBALANCE_IN_PROGRESS || code.is_retriable() => {
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
                _ => {
                    return Err(ClientError::broker(
                        format!("join group {}", self.config.group_id),
                        joined.error_code,
                        String::new(),
                    ));
                }
            }
            self.member_id = joined.member_id.clone();
            self.generation = joined.generation;
            let Some(chosen) = Assignor::from_name(&joined.protocol_name) else {
                return Err(ClientError::InvalidArgument(format!(
                    "the group chose assignor {:?}, which this client does not have",
                    joined.protocol_name
                )));
            };
            if joined.leader != self.member_id {
                self.led = None;
            }
            let assignments = if joined.leader == self.member_id {
                match self.lead(chosen, &joined.members).await {
                    Ok(assignments) => assignments,
                    Err(err) => {
                        self.retry_after(&err).await?;
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            let synced: Result<SyncGroupResponse, ClientError> = self
                .coordinator
                .call(&Request::SyncGroup(SyncGroupRequest {
                    group_id: self.config.group_id.clone(),
                    generation: self.generation,
                    member_id: self.member_id.clone(),
                    assignments,
                }))
                .await;
            let synced = match synced {
                Ok(synced) => synced,
                Err(err) => {
                    self.retry_after(&err).await?;
                    continue;
                }
            };
            match ErrorCode(synced.error_code) {
                ErrorCode::NONE => break Assignment::decode(synced.assignment)?,
                ErrorCode::UNKNOWN_MEMBER_ID => {
                    self.member_id.clear();
                    self.give_up_all(true).await;
                }
                code if code == ErrorCode::REBALANCE_IN_PROGRESS
                    || code == ErrorCode::ILLEGAL_GENERATION
                    || code.is_retriable() => {}
                _ => {
                    return Err(ClientError::broker(
                        format!("sync group {}", self.config.group_id),
                        synced.error_code,
                        String::new(),
                    ));
                }
            }
        };
        let new: BTreeSet<TopicPartition> = assignment
            .partitions
            .into_iter()
            .filter(|(t, _)| self.config.topics.contains(t))
            .collect();
        let revoked: BTreeSet<TopicPartition> = self.owned.difference(&new).cloned().collect();
        let revoked_any = !revoked.is_empty();
        if revoked_any {
            // Cooperative: commit and give up only what moves, then rejoin so that its new
            // owner gets it in the next round.
            if self.config.auto_commit
                && let Err(err) = self.commit_partitions(&revoked).await
            {
                tracing::warn!(error = %err, "commit before revocation failed");
            }
            for (topic, p) in &revoked {
                self.fetcher.unassign(topic, *p);
                self.owned.remove(&(topic.clone(), *p));
                self.committed.remove(&(topic.clone(), *p));
            }
            let revoked: Vec<TopicPartition> = revoked.into_iter().collect();
            self.notify(Rebalance::Revoked(&revoked));
        }
        let added: Vec<TopicPartition> = new.difference(&self.owned).cloned().collect();
        self.take_up(&added).await?;
        self.owned.extend(added.iter().cloned());
        self.notify(Rebalance::Assigned(&added));
        // A "membership gone" seen by a commit during this rebalance is about the old one.
        self.shared.lost.store(false, Ordering::Release);
        self.shared
            .membership
            .send_replace(Some((self.member_id.clone(), self.generation)));
        // Done, unless partitions moved away (cooperative): rejoin so their new owner gets them.
        self.rejoin = revoked_any;
        Ok(())
    }

    /// As the leader, every `metadata_refresh`: whether the subscribed topics' partition counts
    /// differ from those it assigned (a topic created or grown since).
    async fn topics_changed(&mut self) -> bool {
        if self.last_metadata.elapsed() < self.config.metadata_refresh {
            return false;
        }
        self.last_metadata = Instant::now();
        let Some((wanted, counts)) = self.led.clone() else {
            return false;
        };
        match self.partition_counts(wanted).await {
            Ok(now) if now != counts => {
                tracing::info!(group = %self.config.group_id, "subscribed topics changed; rebalancing");
                true
            }
            Ok(_) => false,
            Err(err) => {
                tracing::debug!(error = %err, "metadata refresh failed");
                false
            }
        }
    }

    /// Partition counts of the `wanted` topics that exist.
    async fn partition_counts(
        &self,
        wanted: BTreeSet<String>,
    ) -> Result<BTreeMap<String, u32>, ClientError> {
        let metadata: MetadataResponse = self
            .coordinator
            .call(&Request::Metadata(MetadataRequest {
                topics: wanted.into_iter().collect(),
                allow_auto_create: false,
            }))
            .await?;
        Ok(metadata
            .topics
            .into_iter()
            .filter(|t| t.error_code == 0)
            .map(|t| (t.name, t.partitions.len() as u32))
            .collect())
    }

    /// The leader's part: everyone's subscriptions in, an assignment per member out.
    async fn lead(
        &mut self,
        assignor: Assignor,
        members: &[JoinMember],
    ) -> Result<Vec<SyncAssignment>, ClientError> {
        let mut subscriptions = BTreeMap::new();
        for member in members {
            let subscription = Subscription::decode(member.metadata.clone()).unwrap_or_else(|err| {
                tracing::warn!(member = %member.member_id, error = %err, "undecodable subscription");
                Subscription::default()
            });
            subscriptions.insert(member.member_id.clone(), subscription);
        }
        let wanted: BTreeSet<String> = subscriptions
            .values()
            .flat_map(|s| s.topics.iter().cloned())
            .collect();
        let topics = self.partition_counts(wanted.clone()).await?;
        self.led = Some((wanted, topics.clone()));
        self.last_metadata = Instant::now();
        Ok(assignor
            .assign(&subscriptions, &topics)
            .into_iter()
            .map(|(member_id, partitions)| SyncAssignment {
                member_id,
                assignment: Assignment {
                    partitions: partitions.into_iter().collect(),
                }
                .encode(),
            })
            .collect())
    }

    /// Starts reading newly assigned partitions at the group's committed offsets (or the reset
    /// position).
    async fn take_up(&mut self, added: &[TopicPartition]) -> Result<(), ClientError> {
        if added.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (topic, p) in added {
            by_topic.entry(topic).or_default().push(*p);
        }
        let request = Request::OffsetFetch(OffsetFetchRequest {
            group_id: self.config.group_id.clone(),
            topics: by_topic
                .iter()
                .map(|(name, partitions)| OffsetFetchTopic {
                    name: (*name).to_string(),
                    partitions: partitions.clone(),
                })
                .collect(),
        });
        let fetched: OffsetFetchResponse = self
            .call_coordinator(&request, |r: &OffsetFetchResponse| r.error_code)
            .await?;
        let committed: BTreeMap<TopicPartition, u64> =
            match fetched_offsets(&self.config.group_id, fetched) {
                Ok(committed) => committed.into_iter().map(|(t, p, o)| ((t, p), o)).collect(),
                Err(err) => {
                    // Still moving or loading after the retries: the rebalance is tried again
                    // at the next poll, at the coordinator found again.
                    if coordinator_moved(&err) {
                        self.reconnect_coordinator().await;
                    }
                    return Err(err);
                }
            };
        for (topic, p) in added {
            let key = (topic.clone(), *p);
            let from = committed
                .get(&key)
                .map_or(self.config.reset, |offset| Position::Offset(*offset));
            self.fetcher.assign(topic, Some(vec![*p]), from).await?;
            if let Some(offset) = committed.get(&key) {
                self.committed.insert(key, *offset);
            }
        }
        // A committed offset below the log start (retention) or above its end: reset.
        let resumed: Vec<TopicPartition> = committed.into_keys().collect();
        self.reset_out_of_range(&resumed).await
    }

    /// Moves partitions whose position is outside the log to the reset position.
    async fn reset_out_of_range(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), ClientError> {
        for (topic, p) in partitions {
            let (topic, p) = (topic.clone(), *p);
            let Some(position) = self.fetcher.position(&topic, p) else {
                continue;
            };
            let start = self.fetcher.start_offset(&topic, p).await?;
            let end = self.fetcher.end_offset(&topic, p).await?;
            if position < start || position > end {
                tracing::info!(%topic, partition = p, position, start, end, "position out of range; resetting");
                self.fetcher.seek(&topic, p, self.config.reset).await?;
            }
        }
        Ok(())
    }

    /// After a failed group call: reconnect if the connection broke, back off, and say whether
    /// to try again.
    async fn retry_after(&mut self, err: &ClientError) -> Result<(), ClientError> {
        if !err.is_retriable() {
            return Err(err.clone());
        }
        tracing::debug!(group = %self.config.group_id, error = %err, "group call failed; retrying");
        tokio::time::sleep(RETRY_BACKOFF).await;
        if coordinator_moved(err) {
            self.reconnect_coordinator().await;
        }
        Ok(())
    }

    /// A call to the group's coordinator, tried again (a few times, after [`Self::retry_after`])
    /// when its connection broke or the response's `code_of` says the coordinator moved or is
    /// still loading the group, as Kafka's clients do; other error codes are the caller's.
    async fn call_coordinator<T: cairn_protocol::native::Wire + Send + 'static>(
        &mut self,
        request: &Request,
        code_of: impl Fn(&T) -> i16,
    ) -> Result<T, ClientError> {
        let mut attempts = 1;
        loop {
            let result = self.coordinator.call::<T>(request).await;
            let failed = match &result {
                Ok(response) => {
                    let code = ErrorCode(code_of(response));
                    [
                        ErrorCode::NOT_COORDINATOR,
                        ErrorCode::COORDINATOR_NOT_AVAILABLE,
                        ErrorCode::COORDINATOR_LOAD_IN_PROGRESS,
                    ]
                    .contains(&code)
                    .then(|| {
                        ClientError::broker(
                            format!(
                                "{} of group {}",
                                request.api_key().name(),
                                self.config.group_id
                            ),
                            code.0,
                            String::new(),
                        )
                    })
                }
                Err(err) => Some(err.clone()).filter(coordinator_moved),
            };
            match failed {
                Some(err) if attempts < COORDINATOR_ATTEMPTS => {
                    attempts += 1;
                    self.retry_after(&err).await?;
                }
                _ => return result,
            }
        }
    }

    /// Finds the group's coordinator again (it moves with its offsets partition's leader) and
    /// connects to it.
    async fn reconnect_coordinator(&mut self) {
        match find_coordinator(&self.cluster, &self.config.group_id).await {
            Ok(conn) => self.coordinator = conn,
            Err(err) => tracing::debug!(error = %err, "coordinator reconnect failed"),
        }
    }
}

/// Whether an error says to look for the coordinator again: its connection broke, or the broker
/// no longer coordinates the group.
fn coordinator_moved(err: &ClientError) -> bool {
    matches!(err, ClientError::Connection { .. })
        || err.code() == Some(ErrorCode::NOT_COORDINATOR)
        || err.code() == Some(ErrorCode::COORDINATOR_NOT_AVAILABLE)
}

/// A connection of its own to `group`'s coordinator, found through any broker.
async fn find_coordinator(cluster: &Cluster, group: &str) -> Result<Connection, ClientError> {
    let found: FindCoordinatorResponse = cluster
        .any()
        .await?
        .call(&Request::FindCoordinator(FindCoordinatorRequest {
            group_id: group.to_string(),
        }))
        .await
        .inspect_err(|e| {
            if matches!(e, ClientError::Connection { .. }) {
                cluster.forget(u32::MAX);
            }
        })?;
    if found.error_code != 0 {
        return Err(ClientError::broker(
            format!("find the coordinator of group {group}"),
            found.error_code,
            String::new(),
        ));
    }
    if cluster.is_routed() {
        let addr = if found.host.contains(':') {
            format!("[{}]:{}", found.host, found.port)
        } else {
            format!("{}:{}", found.host, found.port)
        };
        cluster.dial(&addr).await
    } else {
        cluster.dedicated(found.node_id).await
    }
}

/// The OffsetCommit topics for `(topic, partition, offset)` entries, grouped by topic in order of
/// first appearance.
pub(crate) fn commit_topics<'a>(
    entries: impl IntoIterator<Item = (&'a str, u32, u64)>,
) -> Vec<CommitTopic> {
    let mut topics: Vec<CommitTopic> = Vec::new();
    for (topic, partition, offset) in entries {
        let entry = CommitPartition {
            partition,
            offset,
            metadata: String::new(),
        };
        match topics.iter_mut().find(|t| t.name == topic) {
            Some(t) => t.partitions.push(entry),
            None => topics.push(CommitTopic {
                name: topic.to_string(),
                partitions: vec![entry],
            }),
        }
    }
    topics
}

/// The committed offsets of an OffsetFetch response, as `(topic, partition, offset)`; partitions
/// without one are left out; a group-level error is an error.
pub(crate) fn fetched_offsets(
    group: &str,
    response: OffsetFetchResponse,
) -> Result<Vec<(String, u32, u64)>, ClientError> {
    if response.error_code != 0 {
        return Err(ClientError::broker(
            format!("committed offsets of {group}"),
            response.error_code,
            String::new(),
        ));
    }
    Ok(response
        .topics
        .into_iter()
        .flat_map(|t| {
            let name = t.name;
            t.partitions.into_iter().filter_map(move |p| {
                u64::try_from(p.offset)
                    .ok()
                    .map(|offset| (name.clone(), p.partition, offset))
            })
        })
        .collect())
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The heartbeat task: long-poll heartbeats for the current membership; tells `poll` to rejoin
/// when the group rebalances or the membership is gone; reconnects when the connection breaks.
async fn heartbeats(cluster: Cluster, group_id: String, interval: Duration, shared: Arc<Shared>) {
    let mut conn: Option<Connection> = None;
    let mut membership = shared.membership.subscribe();
    loop {
        let current = match membership.wait_for(Option::is_some).await {
            Ok(current) => current.clone(),
            Err(_) => return,
        };
        let Some((member_id, generation)) = current else {
            continue;
        };
        let connection = match &conn {
            Some(c) => c.clone(),
            None => match find_coordinator(&cluster, &group_id).await {
                Ok(c) => {
                    conn = Some(c.clone());
                    c
                }
                Err(_) => {
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
            },
        };
        let answer: Result<HeartbeatResponse, ClientError> = connection
            .call(&Request::Heartbeat(HeartbeatRequest {
                group_id: group_id.clone(),
                generation,
                member_id: member_id.clone(),
                max_wait_ms: millis(interval),
            }))
            .await;
        let still_current = *shared.membership.borrow() == Some((member_id.clone(), generation));
        match answer {
            Ok(r) if r.error_code == 0 => {}
            Ok(r)
                if coordinator_moved(&ClientError::broker(
                    "heartbeat",
                    r.error_code,
                    String::new(),
                )) =>
            {
                // The coordinator moved: find it and heartbeat there.
                conn = None;
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            Ok(r) if still_current => {
                let code = ErrorCode(r.error_code);
                if membership_gone(code) {
                    shared.lost.store(true, Ordering::Release);
                }
                shared.rejoin.store(true, Ordering::Release);
                shared.wake.notify_one();
                // Keep the session alive until `poll` rejoins (the application may be busy).
                let _ = tokio::time::timeout(interval, membership.changed()).await;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %err, "heartbeat failed");
                if matches!(err, ClientError::Connection { .. }) {
                    conn = None;
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
        }
    }
}
