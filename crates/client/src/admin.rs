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
