//! Topic, group and cluster administration. Topic changes go to any broker (it forwards them to
//! the active controller); what a partition's leader or a group's coordinator knows is asked of
//! it.

use std::time::Duration;

use cairn_protocol::native::*;

use crate::cluster::Cluster;
use crate::connection::Connection;
use crate::error::ClientError;

/// A partition's state as the broker describes it.
pub type PartitionInfo = DescribedPartition;
/// A topic's configs and partitions as the broker describes them.
pub type TopicInfo = DescribedTopic;

/// Creates, deletes, lists and describes topics and groups; describes the cluster.
#[derive(Debug, Clone)]
pub struct Admin {
    cluster: Cluster,
}

/// How many times a request follows a moved leader or coordinator.
const ROUTE_RETRIES: u32 = 5;

impl Admin {
    /// Connects to a cluster through `bootstrap` (one or more `host:port`, comma-separated).
    pub async fn connect(bootstrap: &str) -> Result<Admin, ClientError> {
        Admin::connect_tls(bootstrap, None).await
    }

    /// As [`Admin::connect`], over TLS when `tls` is given.
    pub async fn connect_tls(
        bootstrap: &str,
        tls: Option<crate::ClientTls>,
    ) -> Result<Admin, ClientError> {
        Ok(Admin {
            cluster: Cluster::connect_tls(bootstrap, "cairn-admin", tls).await?,
        })
    }

    /// An admin client over an existing connection (for example an embedded broker's).
    pub fn with_connection(conn: Connection) -> Admin {
        Admin {
            cluster: Cluster::with_connection(conn),
        }
    }

    /// An admin client of `cluster`.
    pub fn with_cluster(cluster: Cluster) -> Admin {
        Admin { cluster }
    }

    /// The cluster this client talks to.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Calls any broker, trying another if the first one's connection breaks.
    async fn call_any<T: Wire + Send + 'static>(
        &self,
        request: &Request,
    ) -> Result<T, ClientError> {
        let mut attempt = 0;
        loop {
            let conn = self.cluster.any().await?;
            match conn.call::<T>(request).await {
                Err(ClientError::Connection { .. }) if attempt < ROUTE_RETRIES => {
                    attempt += 1;
                    self.cluster.forget(u32::MAX);
                }
                done => return done,
            }
        }
    }

    /// Creates a topic with `partitions` (0: the broker default) and config overrides, its
    /// partitions replicated as the broker's default says (`min(3, brokers)`).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        self.create_topic_replicated(name, partitions, None, configs)
            .await
    }

    /// Creates a topic with `partitions` (0: the broker default), `replication_factor` replicas
    /// each (`None`: the broker default) and config overrides.
    pub async fn create_topic_replicated(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: Option<u16>,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        let replication_factor = match replication_factor {
            Some(rf) => i16::try_from(rf).map_err(|_| {
                ClientError::InvalidArgument(format!("replication factor {rf} is too large"))
            })?,
            None => -1,
        };
        let request = Request::CreateTopics(CreateTopicsRequest {
            topics: vec![CreatableTopic {
                name: name.to_string(),
                partitions,
                replication_factor,
                configs: configs
                    .iter()
                    .map(|(key, value)| ConfigEntry {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            }],
            validate_only: false,
        });
        let response: CreateTopicsResponse = self.call_any(&request).await?;
        first_result(response.topics, &format!("create topic {name}"))
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteTopics(DeleteTopicsRequest {
            names: vec![name.to_string()],
        });
        let response: DeleteTopicsResponse = self.call_any(&request).await?;
        first_result(response.topics, &format!("delete topic {name}"))
    }

    /// Grows a topic to `count` partitions.
    pub async fn create_partitions(&self, name: &str, count: u32) -> Result<(), ClientError> {
        let request = Request::CreatePartitions(CreatePartitionsRequest {
            topics: vec![PartitionsToCreate {
                name: name.to_string(),
                count,
            }],
            validate_only: false,
        });
        let response: CreatePartitionsResponse = self.call_any(&request).await?;
        first_result(response.topics, &format!("create partitions of {name}"))?;
        // New partitions: the next routes must come from fresh metadata.
        self.cluster.invalidate(name);
        Ok(())
    }

    /// Leader elections: preferred (leadership to each partition's first replica where it is
    /// live and in sync) or unclean (any live replica, for partitions without a leader). `None`
    /// asks for every partition; per partition the outcome (NONE, ELECTION_NOT_NEEDED,
    /// PREFERRED_LEADER_NOT_AVAILABLE, ELIGIBLE_LEADERS_NOT_AVAILABLE, ...).
    pub async fn elect_leaders(
        &self,
        unclean: bool,
        partitions: Option<&[(String, u32)]>,
    ) -> Result<Vec<(String, u32, ErrorCode, String)>, ClientError> {
        let mut topics: Vec<ElectTopic> = Vec::new();
        for (name, partition) in partitions.unwrap_or_default() {
            match topics.iter_mut().find(|t| &t.name == name) {
                Some(t) => t.partitions.push(*partition),
                None => topics.push(ElectTopic {
                    name: name.clone(),
                    partitions: vec![*partition],
                }),
            }
        }
        let request = Request::ElectLeaders(ElectLeadersRequest {
            election_type: u8::from(unclean),
            topics,
        });
        let response: ElectLeadersResponse = self.call_any(&request).await?;
        for topic in &response.topics {
            self.cluster.invalidate(&topic.name);
        }
        Ok(response
            .topics
            .into_iter()
            .flat_map(|t| {
                t.partitions.into_iter().map(move |p| {
                    (
                        t.name.clone(),
                        p.partition,
                        ErrorCode(p.error_code),
                        p.error_message,
                    )
                })
            })
            .collect())
    }

    /// Starts (replicas given) or cancels (`None`) partition reassignments; per reassignment,
    /// in order: (topic, partition, error code, message).
    pub async fn reassign(
        &self,
        reassignments: &[(String, u32, Option<Vec<u32>>)],
    ) -> Result<Vec<(String, u32, ErrorCode, String)>, ClientError> {
        let request = Request::AlterPartitionReassignments(AlterPartitionReassignmentsRequest {
            reassignments: reassignments
                .iter()
                .map(|(topic, partition, replicas)| Reassignment {
                    topic: topic.clone(),
                    partition: *partition,
                    replicas: replicas.clone().unwrap_or_default(),
                    cancel: replicas.is_none(),
                })
                .collect(),
        });
        let response: AlterPartitionReassignmentsResponse = self.call_any(&request).await?;
        for (topic, _, _) in reassignments {
            self.cluster.invalidate(topic);
        }
        Ok(response
            .results
            .into_iter()
            .map(|r| {
                (
                    r.topic,
                    r.partition,
                    ErrorCode(r.error_code),
                    r.error_message,
                )
            })
            .collect())
    }

    /// The reassignments under way, of `topics` (all if empty).
    pub async fn list_reassignments(
        &self,
        topics: &[String],
    ) -> Result<Vec<OngoingReassignment>, ClientError> {
        let request = Request::ListPartitionReassignments(ListPartitionReassignmentsRequest {
            topics: topics.to_vec(),
        });
        let response: ListPartitionReassignmentsResponse = self.call_any(&request).await?;
        Ok(response.reassignments)
    }

    /// Names of all topics.
    pub async fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        let response = self.metadata(&[]).await?;
        Ok(response.topics.into_iter().map(|t| t.name).collect())
    }

    /// Describes topics (all if `names` is empty); a missing topic is an error. Each
    /// partition's offsets and size come from its leader (the broker that holds its log).
    pub async fn describe_topics(&self, names: &[String]) -> Result<Vec<TopicInfo>, ClientError> {
        let request = Request::DescribeTopics(DescribeTopicsRequest {
            names: names.to_vec(),
        });
        let mut response: DescribeTopicsResponse = self.call_any(&request).await?;
        for topic in &response.topics {
            if topic.error_code != 0 {
                return Err(ClientError::broker(
                    format!("describe topic {}", topic.name),
                    topic.error_code,
                    topic.error_message.clone(),
                ));
            }
        }
        if !self.cluster.is_routed() {
            return Ok(response.topics);
        }
        // Each partition as its leader sees it (the answering broker may host only a follower,
        // whose log end and high watermark lag): ask each leader once.
        let leaders: std::collections::BTreeSet<u32> = response
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .filter(|p| p.leader != u32::MAX)
            .map(|p| p.leader)
            .collect();
        for leader in leaders {
            let ask = async {
                let conn = self.cluster.connection(leader).await.ok()?;
                conn.call::<DescribeTopicsResponse>(&request).await.ok()
            };
            let Ok(Some(theirs)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), ask).await
            else {
                continue;
            };
            for (mine, theirs) in response.topics.iter_mut().zip(theirs.topics) {
                for (p, q) in mine.partitions.iter_mut().zip(theirs.partitions) {
                    if p.leader == leader && q.error_code == 0 && q.partition == p.partition {
                        *p = q;
                    }
                }
            }
        }
        Ok(response.topics)
    }

    /// Each replica's log end offset for `topic`'s partitions, asking every broker that hosts
    /// one: (partition, node) to log end. Replicas whose broker does not answer are left out.
    pub async fn replica_log_ends(
        &self,
        topic: &str,
        partitions: &[TopicPartitionReplicas],
    ) -> std::collections::BTreeMap<(u32, u32), u64> {
        let request = Request::DescribeTopics(DescribeTopicsRequest {
            names: vec![topic.to_string()],
        });
        let nodes: std::collections::BTreeSet<u32> = partitions
            .iter()
            .flat_map(|(_, r)| r.iter().copied())
            .collect();
        let mut ends = std::collections::BTreeMap::new();
        for node in nodes {
            // A broker that is down or paused must not hold the answer up.
            let ask = async {
                let conn = self.cluster.connection(node).await.ok()?;
                conn.call::<DescribeTopicsResponse>(&request).await.ok()
            };
            let Ok(Some(theirs)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), ask).await
            else {
                continue;
            };
            for p in theirs.topics.iter().flat_map(|t| &t.partitions) {
                if p.error_code == 0 && p.replicas.contains(&node) {
                    ends.insert((p.partition, node), p.log_end_offset);
                }
            }
        }
        ends
    }

    /// The metadata for `topics` (all if empty): brokers, the active controller, partitions
    /// with their leaders, replicas and ISR.
    pub async fn metadata(&self, topics: &[String]) -> Result<MetadataResponse, ClientError> {
        self.cluster.metadata(topics, false).await
    }

    /// The brokers (fenced ones too), the active controller and the controller quorum.
    pub async fn describe_cluster(&self) -> Result<DescribeClusterResponse, ClientError> {
        self.call_any(&Request::DescribeCluster(DescribeClusterRequest {}))
            .await
    }
}

/// A group as the coordinator describes it.
pub type GroupInfo = DescribedGroup;

/// A committed offset: (topic, partition, offset).
pub type CommittedOffset = (String, u32, u64);

/// A partition and its replicas.
pub type TopicPartitionReplicas = (u32, Vec<u32>);

impl Admin {
    /// A connection to `group`'s coordinator (the broker that leads its offsets partition).
    async fn coordinator(&self, group: &str) -> Result<Connection, ClientError> {
        let found: FindCoordinatorResponse = self
            .call_any(&Request::FindCoordinator(FindCoordinatorRequest {
                group_id: group.to_string(),
            }))
            .await?;
        if found.error_code != 0 {
            return Err(ClientError::broker(
                format!("find the coordinator of group {group}"),
                found.error_code,
                String::new(),
            ));
        }
        self.cluster.connection(found.node_id).await
    }

    /// Calls `group`'s coordinator, finding it again if it moved.
    async fn call_coordinator<T: Wire + Send + 'static>(
        &self,
        group: &str,
        request: &Request,
        code_of: impl Fn(&T) -> i16,
    ) -> Result<T, ClientError> {
        let mut attempt = 0;
        loop {
            let result = async {
                let conn = self.coordinator(group).await?;
                conn.call::<T>(request).await
            }
            .await;
            let moved = match &result {
                Ok(response) => {
                    let code = ErrorCode(code_of(response));
                    code == ErrorCode::NOT_COORDINATOR
                        || code == ErrorCode::COORDINATOR_NOT_AVAILABLE
                        || code == ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
                }
                Err(err) => err.is_stale_metadata(),
            };
            if !moved || attempt >= ROUTE_RETRIES {
                return result;
            }
            attempt += 1;
            self.cluster.forget(u32::MAX);
            tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
        }
    }

    /// Every group with members or committed offsets: (group id, protocol type, state). Each
    /// broker lists the groups it coordinates.
    pub async fn list_groups(&self) -> Result<Vec<ListedGroup>, ClientError> {
        let request = Request::ListGroups(ListGroupsRequest {});
        if !self.cluster.is_routed() {
            let response: ListGroupsResponse = self.call_any(&request).await?;
            return Ok(response.groups);
        }
        self.cluster.refresh(&[]).await?;
        let mut groups = std::collections::BTreeMap::new();
        for (node, _) in self.cluster.brokers() {
            let conn = self.cluster.connection(node).await?;
            let response: ListGroupsResponse = conn.call(&request).await?;
            for group in response.groups {
                groups.entry(group.group_id.clone()).or_insert(group);
            }
        }
        Ok(groups.into_values().collect())
    }

    /// A group's state, members and their assignments (state "Dead" if unknown).
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo, ClientError> {
        let request = Request::DescribeGroups(DescribeGroupsRequest {
            groups: vec![group.to_string()],
        });
        let response: DescribeGroupsResponse = self
            .call_coordinator(group, &request, |r: &DescribeGroupsResponse| {
                r.groups.first().map_or(0, |g| g.error_code)
            })
            .await?;
        let described =
            response.groups.into_iter().next().ok_or_else(|| {
                ClientError::InvalidArgument("describe group: empty response".into())
            })?;
        if described.error_code != 0 {
            return Err(ClientError::broker(
                format!("describe group {group}"),
                described.error_code,
                String::new(),
            ));
        }
        Ok(described)
    }

    /// Every offset the group committed, by topic and partition.
    pub async fn committed_offsets(
        &self,
        group: &str,
    ) -> Result<Vec<CommittedOffset>, ClientError> {
        let request = Request::OffsetFetch(OffsetFetchRequest {
            group_id: group.to_string(),
            topics: Vec::new(),
        });
        let response: OffsetFetchResponse = self
            .call_coordinator(group, &request, |r: &OffsetFetchResponse| r.error_code)
            .await?;
        crate::group::fetched_offsets(group, response)
    }

    /// Sets a group's committed offsets from outside the group (refused with
    /// UNKNOWN_MEMBER_ID while the group has members: stop its consumers first).
    pub async fn commit_offsets(
        &self,
        group: &str,
        offsets: &[CommittedOffset],
    ) -> Result<(), ClientError> {
        let topics =
            crate::group::commit_topics(offsets.iter().map(|(t, p, o)| (t.as_str(), *p, *o)));
        let request = Request::OffsetCommit(OffsetCommitRequest {
            group_id: group.to_string(),
            generation: -1,
            member_id: String::new(),
            topics,
        });
        let response: OffsetCommitResponse = self
            .call_coordinator(group, &request, |r: &OffsetCommitResponse| {
                r.topics
                    .iter()
                    .flat_map(|t| &t.partitions)
                    .map(|p| p.error_code)
                    .find(|c| *c != 0)
                    .unwrap_or(0)
            })
            .await?;
        for topic in response.topics {
            for p in topic.partitions {
                if p.error_code != 0 {
                    return Err(ClientError::broker(
                        format!("commit {group} {}-{}", topic.name, p.partition),
                        p.error_code,
                        String::new(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Offsets of `partitions` of `topic` by `timestamp`: `LATEST_TIMESTAMP` (log end),
    /// `EARLIEST_TIMESTAMP` (log start), or Unix ms (the first record at or after it; the log
    /// end if none). Each asked of the partition's leader.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
        timestamp: i64,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let mut out = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let offset =
                crate::consumer::list_offset(&self.cluster, topic, partition, timestamp).await?;
            out.push((partition, offset));
        }
        Ok(out)
    }

    /// Deletes a group without members (its committed offsets).
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let request = Request::DeleteGroups(DeleteGroupsRequest {
            groups: vec![group.to_string()],
        });
        let response: DeleteGroupsResponse = self
            .call_coordinator(group, &request, |r: &DeleteGroupsResponse| {
                r.results.first().map_or(0, |g| g.error_code)
            })
            .await?;
        match response.results.into_iter().next() {
            Some(r) if r.error_code == 0 => Ok(()),
            Some(r) => Err(ClientError::broker(
                format!("delete group {group}"),
                r.error_code,
                String::new(),
            )),
            None => Err(ClientError::InvalidArgument(
                "delete group: empty response".into(),
            )),
        }
    }
}

fn first_result(results: Vec<TopicResult>, context: &str) -> Result<(), ClientError> {
    match results.into_iter().next() {
        Some(result) if result.error_code == 0 => Ok(()),
        Some(result) => Err(ClientError::broker(
            context,
            result.error_code,
            result.error_message,
        )),
        None => Err(ClientError::InvalidArgument(format!(
            "{context}: empty response"
        ))),
    }
}
