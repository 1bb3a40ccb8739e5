//! The broker's typed error. Broker operations (produce, fetch, list offsets, topic
//! administration) fail with a [`BrokerError`]; each protocol maps it to its wire error code and
//! message at its edge ([`BrokerError::code`], `Display`), and nowhere else.

use cairn_protocol::Offset;
use cairn_protocol::native::ErrorCode;
use thiserror::Error;

/// Why a broker operation on a topic or partition failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The topic or partition does not exist.
    #[error("{topic}-{partition} does not exist")]
    UnknownTopicOrPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The topic does not exist.
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    /// This broker is not the partition's leader (or not a replica of it at all).
    #[error("broker {node} does not lead {topic}-{partition}")]
    NotLeaderOrFollower {
        /// This broker.
        node: u32,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The request named a leader epoch older than the partition's.
    #[error("leader epoch {given} is older than the current epoch {current}")]
    FencedLeaderEpoch {
        /// The epoch the client sent.
        given: u32,
        /// The partition's.
        current: u32,
    },
    /// The request named a leader epoch newer than the partition's (this broker has not
    /// caught up with the metadata yet).
    #[error("leader epoch {given} is newer than the current epoch {current}")]
    UnknownLeaderEpoch {
        /// The epoch the client sent.
        given: u32,
        /// The partition's.
        current: u32,
    },
    /// The offset is outside the log.
    #[error("offset {offset} is out of range {log_start}..={log_end}")]
    OffsetOutOfRange {
        /// Asked for.
        offset: i64,
        /// First offset stored.
        log_start: Offset,
        /// Next offset to be written.
        log_end: Offset,
    },
    /// acks is not 0, 1 or -1.
    #[error("acks {0} is not 0, 1 or -1")]
    InvalidRequiredAcks(i8),
    /// A batch breaks a broker rule (transactional, control, keyless in a compacted topic,
    /// several idempotent batches).
    #[error("{0}")]
    InvalidRecord(String),
    /// A batch failed validation.
    #[error("{0}")]
    CorruptMessage(String),
    /// A batch is larger than the topic allows.
    #[error("batch of {n_bytes} bytes exceeds max.message.bytes = {max}")]
    MessageTooLarge {
        /// The batch's size.
        n_bytes: u64,
        /// The limit.
        max: u32,
    },
    /// An idempotent producer's batch is out of sequence.
    #[error("{0}")]
    OutOfOrderSequence(String),
    /// An idempotent producer's epoch is stale.
    #[error("{0}")]
    InvalidProducerEpoch(String),
    /// The partition's log failed (it is offline until reopened), or metadata could not be
    /// stored.
    #[error("{0}")]
    Storage(String),
    /// The operation did not complete in time.
    #[error("{0}")]
    Timeout(String),
    /// Too few in-sync replicas to accept the write.
    #[error("{0}")]
    NotEnoughReplicas(String),
    /// The write was appended, but the ISR shrank below min.insync.replicas before it was
    /// committed: it may or may not survive (the producer retries).
    #[error("{0}")]
    NotEnoughReplicasAfterAppend(String),
    /// A broker's registration epoch is not its current one.
    #[error("{0}")]
    StaleBrokerEpoch(String),
    /// The topic name is not valid.
    #[error("{0}")]
    InvalidTopic(String),
    /// A topic of this name exists.
    #[error("topic {0:?} already exists")]
    TopicAlreadyExists(String),
    /// The partition count is not valid.
    #[error("{0}")]
    InvalidPartitions(String),
    /// The replication factor is not valid.
    #[error("{0}")]
    InvalidReplicationFactor(String),
    /// A topic config key or value is not valid.
    #[error("{0}")]
    InvalidConfig(String),
    /// The request breaks a protocol rule.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request breaks a broker limit.
    #[error("{0}")]
    PolicyViolation(String),
    /// The controller quorum could not be reached or could not commit.
    #[error("{0}")]
    Unavailable(String),
    /// The broker failed in a way it cannot classify (a task panicked).
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// The wire error code (the same numbers on both protocols).
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::UnknownTopicOrPartition { .. } | BrokerError::UnknownTopic(_) => {
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
            }
            BrokerError::NotLeaderOrFollower { .. } => ErrorCode::NOT_LEADER_OR_FOLLOWER,
            BrokerError::FencedLeaderEpoch { .. } => ErrorCode::FENCED_LEADER_EPOCH,
            BrokerError::UnknownLeaderEpoch { .. } => ErrorCode::UNKNOWN_LEADER_EPOCH,
            BrokerError::OffsetOutOfRange { .. } => ErrorCode::OFFSET_OUT_OF_RANGE,
            BrokerError::InvalidRequiredAcks(_) => ErrorCode::INVALID_REQUIRED_ACKS,
            BrokerError::InvalidRecord(_) => ErrorCode::INVALID_RECORD,
            BrokerError::CorruptMessage(_) => ErrorCode::CORRUPT_MESSAGE,
            BrokerError::MessageTooLarge { .. } => ErrorCode::MESSAGE_TOO_LARGE,
            BrokerError::OutOfOrderSequence(_) => ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER,
            BrokerError::InvalidProducerEpoch(_) => ErrorCode::INVALID_PRODUCER_EPOCH,
            BrokerError::Storage(_) => ErrorCode::KAFKA_STORAGE_ERROR,
            BrokerError::Timeout(_) => ErrorCode::REQUEST_TIMED_OUT,
            BrokerError::NotEnoughReplicas(_) => ErrorCode::NOT_ENOUGH_REPLICAS,
            BrokerError::NotEnoughReplicasAfterAppend(_) => {
                ErrorCode::NOT_ENOUGH_REPLICAS_AFTER_APPEND
            }
            BrokerError::StaleBrokerEpoch(_) => ErrorCode::STALE_BROKER_EPOCH,
            BrokerError::InvalidTopic(_) => ErrorCode::INVALID_TOPIC_EXCEPTION,
            BrokerError::TopicAlreadyExists(_) => ErrorCode::TOPIC_ALREADY_EXISTS,
            BrokerError::InvalidPartitions(_) => ErrorCode::INVALID_PARTITIONS,
            BrokerError::InvalidReplicationFactor(_) => ErrorCode::INVALID_REPLICATION_FACTOR,
            BrokerError::InvalidConfig(_) => ErrorCode::INVALID_CONFIG,
            BrokerError::InvalidRequest(_) => ErrorCode::INVALID_REQUEST,
            BrokerError::PolicyViolation(_) => ErrorCode::POLICY_VIOLATION,
            BrokerError::Unavailable(_) => ErrorCode::REQUEST_TIMED_OUT,
            BrokerError::Internal(_) => ErrorCode::UNKNOWN_SERVER_ERROR,
        }
    }

    /// A storage failure, with its causes on one line.
    pub fn storage(err: &dyn std::error::Error) -> BrokerError {
        BrokerError::Storage(error_chain(err))
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_a_documented_code() {
        let errors = [
            BrokerError::UnknownTopic("t".into()),
            BrokerError::NotLeaderOrFollower {
                node: 2,
                topic: "t".into(),
                partition: 0,
            },
            BrokerError::FencedLeaderEpoch {
                given: 1,
                current: 2,
            },
            BrokerError::UnknownLeaderEpoch {
                given: 3,
                current: 2,
            },
            BrokerError::Storage("disk".into()),
            BrokerError::Internal("panic".into()),
        ];
        for err in errors {
            let code = err.code();
            assert!(ErrorCode::ALL.contains(&code), "{err}: {code:?}");
            assert_ne!(code, ErrorCode::NONE);
        }
    }
}
