//! Topic administration.

use cairn_protocol::native::*;

use crate::connection::Connection;
use crate::error::ClientError;

/// A partition's state as the broker describes it.
pub type PartitionInfo = DescribedPartition;
/// A topic's configs and partitions as the broker describes them.
pub type TopicInfo = DescribedTopic;

/// Creates, deletes, lists and describes topics.
#[derive(Debug, Clone)]
pub struct Admin {
    conn: Connection,
}

impl Admin {
    /// Connects to a broker.
    pub async fn connect(bootstrap: &str) -> Result<Admin, ClientError> {
        Ok(Admin {
            conn: Connection::connect(bootstrap, "cairn-admin").await?,
        })
    }

    /// An admin client over an existing connection (for example an embedded broker's).
    pub fn with_connection(conn: Connection) -> Admin {
        Admin { conn }
    }

    /// Creates a topic with `partitions` (0: the broker default) and config overrides.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<(), ClientError> {
        let request = Request::CreateTopics(CreateTopicsRequest {
            topics: vec![CreatableTopic {
                name: name.to_string(),
                partitions,
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
        let response: CreateTopicsResponse = self.conn.call(&request).await?;
        first_result(response.topics, &format!("create topic {name}"))
    }

    /// Deletes a topic.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteTopics(DeleteTopicsRequest {
            names: vec![name.to_string()],
        });
        let response: DeleteTopicsResponse = self.conn.call(&request).await?;
        first_result(response.topics, &format!("delete topic {name}"))
    }

    /// Names of all topics.
    pub async fn list_topics(&self) -> Result<Vec<String>, ClientError> {
        let response: MetadataResponse = self
            .conn
            .call(&Request::Metadata(MetadataRequest {
                topics: vec![],
                allow_auto_create: false,
            }))
            .await?;
        Ok(response.topics.into_iter().map(|t| t.name).collect())
    }

    /// Describes topics (all if `names` is empty); a missing topic is an error.
    pub async fn describe_topics(&self, names: &[String]) -> Result<Vec<TopicInfo>, ClientError> {
        let request = Request::DescribeTopics(DescribeTopicsRequest {
            names: names.to_vec(),
        });
        let response: DescribeTopicsResponse = self.conn.call(&request).await?;
        for topic in &response.topics {
            if topic.error_code != 0 {
                return Err(ClientError::broker(
                    format!("describe topic {}", topic.name),
                    topic.error_code,
                    topic.error_message.clone(),
                ));
            }
        }
        Ok(response.topics)
    }

    /// The broker's metadata for `topics` (all if empty).
    pub async fn metadata(&self, topics: &[String]) -> Result<MetadataResponse, ClientError> {
        self.conn
            .call(&Request::Metadata(MetadataRequest {
                topics: topics.to_vec(),
                allow_auto_create: false,
            }))
            .await
    }
}

/// A group as the coordinator describes it.
pub type GroupInfo = DescribedGroup;

/// A committed offset: (topic, partition, offset).
pub type CommittedOffset = (String, u32, u64);

impl Admin {
    /// Every group with members or committed offsets: (group id, protocol type, state).
    pub async fn list_groups(&self) -> Result<Vec<ListedGroup>, ClientError> {
        let response: ListGroupsResponse = self
            .conn
            .call(&Request::ListGroups(ListGroupsRequest {}))
            .await?;
        Ok(response.groups)
    }

    /// A group's state, members and their assignments (state "Dead" if unknown).
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo, ClientError> {
        let response: DescribeGroupsResponse = self
            .conn
            .call(&Request::DescribeGroups(DescribeGroupsRequest {
                groups: vec![group.to_string()],
            }))
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
        let response: OffsetFetchResponse = self
            .conn
            .call(&Request::OffsetFetch(OffsetFetchRequest {
                group_id: group.to_string(),
                topics: Vec::new(),
            }))
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
        let response: OffsetCommitResponse = self
            .conn
            .call(&Request::OffsetCommit(OffsetCommitRequest {
                group_id: group.to_string(),
                generation: -1,
                member_id: String::new(),
                topics,
            }))
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
    /// end if none).
    pub async fn list_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
        timestamp: i64,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        let response: ListOffsetsResponse = self
            .conn
            .call(&Request::ListOffsets(ListOffsetsRequest {
                topics: vec![ListOffsetsTopic {
                    name: topic.to_string(),
                    partitions: partitions
                        .iter()
                        .map(|&partition| ListOffsetsPartition {
                            partition,
                            timestamp,
                        })
                        .collect(),
                }],
            }))
            .await?;
        let mut out = Vec::with_capacity(partitions.len());
        for p in response.topics.into_iter().flat_map(|t| t.partitions) {
            if p.error_code != 0 {
                return Err(ClientError::broker(
                    format!("list offsets {topic}-{}", p.partition),
                    p.error_code,
                    String::new(),
                ));
            }
            out.push((p.partition, p.offset));
        }
        Ok(out)
    }

    /// Deletes a group without members (its committed offsets).
    pub async fn delete_group(&self, group: &str) -> Result<(), ClientError> {
        let response: DeleteGroupsResponse = self
            .conn
            .call(&Request::DeleteGroups(DeleteGroupsRequest {
                groups: vec![group.to_string()],
            }))
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
