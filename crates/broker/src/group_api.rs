//! Group operations shared by both protocols (committed offsets, listing, describing and deleting
//! groups), and the native protocol's group messages on top of them. `kafka.rs` translates the
//! Kafka requests to the same operations, so a group behaves the same whichever listener its
//! members and tools use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::limits::{GROUP_ID_BYTES_MAX, OFFSET_METADATA_BYTES_MAX};
use cairn_protocol::native::*;

use bytes::Bytes;

use crate::groups::{GroupInfo, Join, JoinResult, SyncResult};
use crate::handler::{Deferred, Handler, Outcome};
use crate::native::ErasedResponse;
use crate::offsets::Committed;

/// One partition's offset to commit, whichever protocol it came over.
#[derive(Debug, Clone)]
pub(crate) struct OffsetToCommit {
    /// As sent (Kafka's are signed): out of range is UNKNOWN_TOPIC_OR_PARTITION.
    pub partition: i64,
    /// The next offset to consume.
    pub offset: i64,
    /// Kafka's committed leader epoch, or -1.
    pub leader_epoch: i32,
    /// Client metadata.
    pub metadata: String,
}

/// A group's coordinator and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Coordinator {
    /// Its node id.
    pub node_id: u32,
    /// Its native listener.
    pub native: (String, u16),
    /// Its Kafka listener.
    pub kafka: Option<(String, u16)>,
}

/// What is known of a group.
#[derive(Debug)]
pub(crate) enum GroupView {
    /// It has members (or is rebalancing).
    Live(GroupInfo),
    /// Only committed offsets: an Empty consumer group.
    OffsetsOnly,
    /// Unknown: Dead, as Kafka says.
    Dead,
}

/// Offsets by topic, as requested or as stored.
pub(crate) type TopicOffsets = Vec<(String, Vec<(i64, Option<Committed>)>)>;

fn valid_group_id(group: &str) -> bool {
    !group.is_empty() && group.len() <= GROUP_ID_BYTES_MAX
}

impl Handler {
    /// Commits offsets: from a member of the group's current generation (identified by
    /// generation, member id and, for static members, instance id), or from outside group
    /// membership (generation -1, no member id: tools, consumers assigning partitions themselves)
    /// while the group has no members. Durable before this returns. Per topic and partition, in
    /// request order, the outcome.
    pub(crate) async fn commit_offsets(
        &self,
        label: &str,
        group: &str,
        (generation, member_id, instance_id): (i32, &str, Option<&str>),
        topics: Vec<(String, Vec<OffsetToCommit>)>,
    ) -> Vec<(String, Vec<(i64, ErrorCode)>)> {
        let refusal = if !valid_group_id(group) {
            Some(ErrorCode::INVALID_GROUP_ID)
        } else if let Err(code) = self.check_coordinator(group) {
            Some(code)
        } else if generation >= 0 || !member_id.is_empty() || instance_id.is_some() {
            Some(
                self.groups
                    .check_commit(group, generation, (member_id, instance_id)),
            )
            .filter(|code| *code != ErrorCode::NONE)
        } else if self.groups.has_members(group) {
            // A commit from outside an active group would race its members.
            Some(ErrorCode::UNKNOWN_MEMBER_ID)
        } else {
            None
        };
        // Per partition: the error, or None if it is to be committed.
        type Pending = Vec<(i64, Option<ErrorCode>)>;
        let mut outcomes: Vec<(String, Pending)> = Vec::new();
        let mut entries = Vec::new();
        for (name, partitions) in topics {
            let topic = self.manager.topic(&name);
            let mut results = Vec::with_capacity(partitions.len());
            for p in partitions {
                let index = u32::try_from(p.partition)
                    .ok()
                    .filter(|i| topic.as_ref().is_some_and(|t| *i < t.n_partitions()));
                let code = match (refusal, index) {
                    (Some(code), _) => Some(code),
                    (None, None) => Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION),
                    (None, Some(_)) if p.metadata.len() > OFFSET_METADATA_BYTES_MAX => {
                        Some(ErrorCode::OFFSET_METADATA_TOO_LARGE)
                    }
                    (None, Some(index)) => {
                        entries.push(((name.clone(), index), p.offset, p.leader_epoch, p.metadata));
                        None
                    }
                };
                results.push((p.partition, code));
            }
            outcomes.push((name, results));
        }
        let stored = if entries.is_empty() {
            Ok(())
        } else {
            let (offsets, manager, group_id) = (
                Arc::clone(&self.offsets),
                Arc::clone(&self.manager),
                group.to_string(),
            );
            let now = self.clock.unix_ms();
            tokio::task::spawn_blocking(move || offsets.commit(&manager, &group_id, entries, now))
                .await
                .unwrap_or_else(|_| {
                    Err((ErrorCode::UNKNOWN_SERVER_ERROR, "commit task failed".into()))
                })
        };
        if let Err((_, message)) = &stored {
            tracing::warn!(%group, error = %message, "offset commit failed");
        }
        outcomes
            .into_iter()
            .map(|(name, partitions)| {
                let partitions = partitions
                    .into_iter()
                    .map(|(p, code)| {
                        let code = code.unwrap_or(match &stored {
                            Ok(()) => ErrorCode::NONE,
                            Err((code, _)) => *code,
                        });
                        self.metrics.count_error(label, code);
                        (p, code)
                    })
                    .collect();
                (name, partitions)
            })
            .collect()
    }

    /// Committed offsets of `group`: of the partitions asked for (None where nothing is
    /// committed), or with `None`, every committed one by topic.
    pub(crate) fn committed_offsets(
        &self,
        group: &str,
        wanted: Option<Vec<(String, Vec<i64>)>>,
    ) -> TopicOffsets {
        match wanted {
            Some(topics) => topics
                .into_iter()
                .map(|(name, partitions)| {
                    let found = partitions
                        .into_iter()
                        .map(|p| {
                            let committed = u32::try_from(p)
                                .ok()
                                .and_then(|i| self.offsets.fetch(group, &name, i));
                            (p, committed)
                        })
                        .collect();
                    (name, found)
                })
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<(i64, Option<Committed>)>> = BTreeMap::new();
                for ((name, p), c) in self.offsets.fetch_all(group) {
                    by_topic
                        .entry(name)
                        .or_default()
                        .push((i64::from(p), Some(c)));
                }
                by_topic.into_iter().collect()
            }
        }
    }

    /// Every group with members or committed offsets: (name, protocol type, state), by name.
    pub(crate) fn all_groups(&self) -> Vec<(String, String, &'static str)> {
        let mut groups: BTreeMap<String, (String, &'static str)> = self
            .groups
            .list()
            .into_iter()
            .map(|(name, kind, state)| (name, (kind, state)))
            .collect();
        for name in self.offsets.groups() {
            groups
                .entry(name)
                .or_insert_with(|| ("consumer".to_string(), "Empty"));
        }
        groups
            .into_iter()
            .map(|(name, (kind, state))| (name, kind, state))
            .collect()
    }

    /// What is known of one group.
    pub(crate) fn view_group(&self, group: &str) -> GroupView {
        match self.groups.describe(group) {
            Some(info) => GroupView::Live(info),
            None if self.offsets.has_group(group) => GroupView::OffsetsOnly,
            None => GroupView::Dead,
        }
    }

    /// Deletes groups without members (their committed offsets, durably): per group, NONE,
    /// NON_EMPTY_GROUP or GROUP_ID_NOT_FOUND.
    pub(crate) async fn delete_groups(
        &self,
        label: &str,
        names: Vec<String>,
    ) -> Vec<(String, ErrorCode)> {
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            let code = if self.groups.has_members(&name) {
                ErrorCode::NON_EMPTY_GROUP
            } else {
                let (offsets, manager, group) = (
                    Arc::clone(&self.offsets),
                    Arc::clone(&self.manager),
                    name.clone(),
                );
                let now_ms = self.clock.unix_ms();
                match tokio::task::spawn_blocking(move || {
                    offsets.delete_group(&manager, &group, now_ms)
                })
                .await
                {
                    Ok(Ok(true)) => {
                        self.groups.forget_if_empty(&name);
                        ErrorCode::NONE
                    }
                    Ok(Ok(false)) => ErrorCode::GROUP_ID_NOT_FOUND,
                    Ok(Err((code, _))) => code,
                    Err(_) => ErrorCode::UNKNOWN_SERVER_ERROR,
                }
            };
            self.metrics.count_error(label, code);
            results.push((name, code));
        }
        results
    }

    /// The coordinator of `group`: the broker that leads its partition of the offsets topic
    /// (the topic is created now, through the controller, if it does not exist yet, as Kafka
    /// does at a group's first lookup). Errors: INVALID_GROUP_ID, COORDINATOR_NOT_AVAILABLE.
    pub(crate) async fn find_coordinator(&self, group: &str) -> Result<Coordinator, ErrorCode> {
        if !valid_group_id(group) {
            return Err(ErrorCode::INVALID_GROUP_ID);
        }
        if crate::offsets::OffsetStore::partition_of(&self.manager, group).is_none() {
            let command = cairn_controller::Command::CreateTopics {
                topics: vec![cairn_controller::TopicSpec {
                    name: crate::offsets::OFFSETS_TOPIC.into(),
                    partitions: self.offsets.n_partitions(),
                    replication_factor: None,
                    config: BTreeMap::from([
                        ("cleanup.policy".to_string(), "compact".to_string()),
                        ("segment.bytes".to_string(), (16 << 20).to_string()),
                    ]),
                }],
                validate_only: false,
            };
            match self.command(command, crate::offsets::OFFSETS_TOPIC).await {
                Ok(cairn_controller::Reply::Topics(results)) => {
                    if let Some((_, Err(rejected))) = results.first()
                        && rejected.error_code() != ErrorCode::TOPIC_ALREADY_EXISTS
                    {
                        tracing::warn!(error = %rejected, "cannot create the offsets topic");
                        return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot create the offsets topic");
                    return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE);
                }
            }
        }
        let image = self.manager.image();
        let (index, _) = crate::offsets::OffsetStore::partition_of(&self.manager, group)
            .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
        let leader = image
            .partition(crate::offsets::OFFSETS_TOPIC, index)
            .and_then(|p| p.leader)
            .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
        let broker = image
            .brokers
            .get(&leader)
            .filter(|b| !b.fenced)
            .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
        Ok(Coordinator {
            node_id: leader,
            native: (broker.info.native.host.clone(), broker.info.native.port),
            kafka: broker.info.kafka.as_ref().map(|e| (e.host.clone(), e.port)),
        })
    }

    /// NOT_COORDINATOR if another broker coordinates `group` (leads its offsets partition);
    /// COORDINATOR_LOAD_IN_PROGRESS while this broker, its new coordinator, still loads its
    /// offsets and membership (clients retry, as with Kafka). COORDINATOR_NOT_AVAILABLE while
    /// this broker knows of no offsets topic: none was created yet (FindCoordinator creates it),
    /// or this broker has not caught up with the metadata since it restarted; serving then would
    /// answer members of a group stored elsewhere as unknown (after every broker was killed at
    /// once, a group's members were told UNKNOWN_MEMBER_ID by a broker that had just restarted).
    pub(crate) fn check_coordinator(&self, group: &str) -> Result<(), ErrorCode> {
        let Some((index, _)) = crate::offsets::OffsetStore::partition_of(&self.manager, group)
        else {
            return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE);
        };
        match self.manager.partition(crate::offsets::OFFSETS_TOPIC, index) {
            Some(p) if p.role() == crate::partition::Role::Leader => {
                if self.offsets.loaded_epoch(index) == Some(p.leader_epoch()) {
                    Ok(())
                } else {
                    Err(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS)
                }
            }
            _ => Err(ErrorCode::NOT_COORDINATOR),
        }
    }

    /// [`Handler::check_coordinator`] for a Heartbeat, which Kafka answers NONE while the group
    /// loads (`Err(NONE)`): its member is not known here yet and must not rejoin for that.
    pub(crate) fn check_heartbeat_coordinator(&self, group: &str) -> Result<(), ErrorCode> {
        self.check_coordinator(group).map_err(|code| match code {
            ErrorCode::COORDINATOR_LOAD_IN_PROGRESS => ErrorCode::NONE,
            code => code,
        })
    }

    /// A JoinGroup from either listener: the coordinator takes it now (in the connection's
    /// order), the returned future has its answer (at once, or when the rebalance completes);
    /// `label` names the API in metrics.
    pub(crate) fn join_group(
        self: &Arc<Self>,
        label: &'static str,
        join: Join,
    ) -> impl std::future::Future<Output = JoinResult> + Send + 'static {
        let answer = self.check_coordinator(&join.group_id).map(|()| {
            let committed = self.offsets.has_group(&join.group_id);
            self.groups.join_group(join, committed)
        });
        let this = Arc::clone(self);
        async move {
            let result = match answer {
                Ok(answer) => {
                    answer
                        .get(|| JoinResult {
                            error: ErrorCode::UNKNOWN_MEMBER_ID,
                            generation: -1,
                            ..JoinResult::default()
                        })
                        .await
                }
                Err(error) => JoinResult {
                    error,
                    generation: -1,
                    ..JoinResult::default()
                },
            };
            this.metrics.count_error(label, result.error);
            result
        }
    }

    /// A SyncGroup from either listener, taken now; the future has the answer (when the leader's
    /// assignment arrives, or at once); `label` names the API in metrics.
    pub(crate) fn sync_group(
        self: &Arc<Self>,
        label: &'static str,
        (group, generation): (&str, i32),
        member: (&str, Option<&str>),
        assignments: Vec<(String, Bytes)>,
    ) -> impl std::future::Future<Output = SyncResult> + Send + 'static {
        let answer = self
            .check_coordinator(group)
            .map(|()| self.groups.sync(group, generation, member, assignments));
        let this = Arc::clone(self);
        async move {
            let result = match answer {
                Ok(answer) => {
                    answer
                        .get(|| SyncResult {
                            error: ErrorCode::REBALANCE_IN_PROGRESS,
                            ..SyncResult::default()
                        })
                        .await
                }
                Err(error) => SyncResult {
                    error,
                    ..SyncResult::default()
                },
            };
            this.metrics.count_error(label, result.error);
            result
        }
    }

    /// The native protocol's group requests (keys 8 to 17). `finish` records the request's
    /// metrics.
    pub(crate) fn begin_native_group(
        self: &Arc<Self>,
        corr: u32,
        client_id: String,
        request: Request,
        finish: impl FnOnce(Outcome) -> Outcome + Send + 'static,
    ) -> Deferred {
        let api = request.api_key();
        let this = Arc::clone(self);
        let respond =
            move |body: &dyn ErasedResponse| finish(Outcome::Respond(body.response(corr)));
        Box::pin(async move {
            let name = api.name();
            match request {
                Request::FindCoordinator(r) => {
                    let found = this.find_coordinator(&r.group_id).await;
                    let code = found.as_ref().err().copied().unwrap_or(ErrorCode::NONE);
                    this.metrics.count_error(name, code);
                    let (node_id, (host, port)) = match found {
                        Ok(c) => (c.node_id, c.native),
                        Err(_) => (u32::MAX, (String::new(), 0)),
                    };
                    respond(&FindCoordinatorResponse {
                        error_code: code.0,
                        node_id,
                        host,
                        port,
                    })
                }
                Request::JoinGroup(r) => {
                    let join = Join {
                        group_id: r.group_id,
                        member_id: r.member_id,
                        instance_id: None,
                        client_id,
                        protocol_type: r.protocol_type,
                        protocols: r
                            .protocols
                            .into_iter()
                            .map(|p| (p.name, p.metadata))
                            .collect(),
                        session_ms: i32::try_from(r.session_timeout_ms).unwrap_or(i32::MAX),
                        rebalance_ms: i32::try_from(r.rebalance_timeout_ms).unwrap_or(i32::MAX),
                        require_known_member_id: true,
                    };
                    let result = this.join_group(name, join).await;
                    respond(&JoinGroupResponse {
                        error_code: result.error.0,
                        generation: result.generation,
                        protocol_name: result.protocol_name.unwrap_or_default(),
                        leader: result.leader,
                        member_id: result.member_id,
                        members: result
                            .members
                            .into_iter()
                            .map(|(member_id, _, metadata)| JoinMember {
                                member_id,
                                metadata,
                            })
                            .collect(),
                    })
                }
                Request::SyncGroup(r) => {
                    let assignments = r
                        .assignments
                        .into_iter()
                        .map(|a| (a.member_id, a.assignment))
                        .collect();
                    let result = this
                        .sync_group(
                            name,
                            (&r.group_id, r.generation),
                            (&r.member_id, None),
                            assignments,
                        )
                        .await;
                    respond(&SyncGroupResponse {
                        error_code: result.error.0,
                        assignment: result.assignment,
                    })
                }
                Request::Heartbeat(r) => {
                    let wait = Duration::from_millis(u64::from(r.max_wait_ms));
                    let code = match this.check_heartbeat_coordinator(&r.group_id) {
                        Err(code) => code,
                        Ok(()) => tokio::select! {
                            code = this.groups.heartbeat_wait(&r.group_id, r.generation, &r.member_id, wait) => code,
                            () = this.shutdown.cancelled() => ErrorCode::COORDINATOR_NOT_AVAILABLE,
                        },
                    };
                    this.metrics.count_error(name, code);
                    respond(&HeartbeatResponse { error_code: code.0 })
                }
                Request::LeaveGroup(r) => {
                    let code = match this.check_coordinator(&r.group_id) {
                        Err(code) => code,
                        Ok(()) => this
                            .groups
                            .leave(&r.group_id, &[(r.member_id, None)])
                            .first()
                            .copied()
                            .unwrap_or(ErrorCode::UNKNOWN_MEMBER_ID),
                    };
                    this.metrics.count_error(name, code);
                    respond(&LeaveGroupResponse { error_code: code.0 })
                }
                Request::OffsetCommit(r) => {
                    let topics = r
                        .topics
                        .into_iter()
                        .map(|t| {
                            let partitions = t
                                .partitions
                                .into_iter()
                                .map(|p| OffsetToCommit {
                                    partition: i64::from(p.partition),
                                    offset: i64::try_from(p.offset).unwrap_or(i64::MAX),
                                    leader_epoch: -1,
                                    metadata: p.metadata,
                                })
                                .collect();
                            (t.name, partitions)
                        })
                        .collect();
                    let outcomes = this
                        .commit_offsets(
                            name,
                            &r.group_id,
                            (r.generation, &r.member_id, None),
                            topics,
                        )
                        .await;
                    respond(&OffsetCommitResponse {
                        topics: outcomes
                            .into_iter()
                            .map(|(name, partitions)| TopicPartitionErrors {
                                name,
                                partitions: partitions
                                    .into_iter()
                                    .map(|(p, code)| PartitionError {
                                        partition: p as u32,
                                        error_code: code.0,
                                    })
                                    .collect(),
                            })
                            .collect(),
                    })
                }
                Request::OffsetFetch(r) => {
                    if !valid_group_id(&r.group_id) {
                        this.metrics.count_error(name, ErrorCode::INVALID_GROUP_ID);
                        return respond(&OffsetFetchResponse {
                            error_code: ErrorCode::INVALID_GROUP_ID.0,
                            topics: Vec::new(),
                        });
                    }
                    if let Err(code) = this.check_coordinator(&r.group_id) {
                        this.metrics.count_error(name, code);
                        return respond(&OffsetFetchResponse {
                            error_code: code.0,
                            topics: Vec::new(),
                        });
                    }
                    let wanted = (!r.topics.is_empty()).then(|| {
                        r.topics
                            .into_iter()
                            .map(|t| (t.name, t.partitions.into_iter().map(i64::from).collect()))
                            .collect()
                    });
                    let topics = this
                        .committed_offsets(&r.group_id, wanted)
                        .into_iter()
                        .map(|(name, partitions)| FetchedOffsetTopic {
                            name,
                            partitions: partitions
                                .into_iter()
                                .map(|(p, c)| FetchedOffset {
                                    partition: p as u32,
                                    offset: c.as_ref().map_or(-1, |c| c.offset),
                                    metadata: c.map(|c| c.metadata).unwrap_or_default(),
                                    error_code: 0,
                                })
                                .collect(),
                        })
                        .collect();
                    respond(&OffsetFetchResponse {
                        error_code: 0,
                        topics,
                    })
                }
                Request::ListGroups(_) => respond(&ListGroupsResponse {
                    groups: this
                        .all_groups()
                        .into_iter()
                        .map(|(group_id, protocol_type, state)| ListedGroup {
                            group_id,
                            protocol_type,
                            state: state.to_string(),
                        })
                        .collect(),
                }),
                Request::DescribeGroups(r) => {
                    let groups = r
                        .groups
                        .into_iter()
                        .map(|group_id| {
                            let mut described = DescribedGroup {
                                group_id,
                                ..DescribedGroup::default()
                            };
                            match this.view_group(&described.group_id) {
                                GroupView::Live(info) => {
                                    described.state = info.state.to_string();
                                    described.protocol_type = info.protocol_type;
                                    described.protocol = info.protocol;
                                    described.generation = info.generation;
                                    described.members = info
                                        .members
                                        .into_iter()
                                        .map(|(member_id, _, client_id, metadata, assignment)| {
                                            DescribedMember {
                                                member_id,
                                                client_id,
                                                metadata,
                                                assignment,
                                            }
                                        })
                                        .collect();
                                }
                                GroupView::OffsetsOnly => {
                                    described.state = "Empty".into();
                                    described.protocol_type = "consumer".into();
                                }
                                GroupView::Dead => described.state = "Dead".into(),
                            }
                            described
                        })
                        .collect();
                    respond(&DescribeGroupsResponse { groups })
                }
                Request::DeleteGroups(r) => {
                    let results = this
                        .delete_groups(name, r.groups)
                        .await
                        .into_iter()
                        .map(|(group_id, code)| GroupResult {
                            group_id,
                            error_code: code.0,
                        })
                        .collect();
                    respond(&DeleteGroupsResponse { results })
                }
                other => finish_unexpected(other),
            }
        })
    }
}

fn finish_unexpected(request: Request) -> Outcome {
    Outcome::Close(format!(
        "{} is not a group request",
        request.api_key().name()
    ))
}
