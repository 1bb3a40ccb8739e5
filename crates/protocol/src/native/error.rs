//! Error codes of the native protocol: Kafka's numbers, so one table serves both listeners.

use std::fmt;

/// A protocol error code (`int16`). `0` is success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorCode(pub i16);

macro_rules! codes {
    ($($name:ident = $value:expr, $retriable:expr, $text:expr;)*) => {
        impl ErrorCode {
            $(
                #[doc = $text]
                pub const $name: ErrorCode = ErrorCode($value);
            )*

            /// Whether a client should retry the request as is (after a backoff).
            pub fn is_retriable(self) -> bool {
                match self {
                    $(ErrorCode::$name => $retriable,)*
                    _ => false,
                }
            }

            /// The code's name, as in Kafka.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => stringify!($name),)*
                    _ => "UNKNOWN_ERROR_CODE",
                }
            }

            /// What the code means.
            pub fn description(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    _ => "an error code this client does not know",
                }
            }

            /// Every code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];
        }
    };
}

codes! {
    UNKNOWN_SERVER_ERROR = -1, false, "the broker failed in a way it could not classify";
    NONE = 0, false, "success";
    OFFSET_OUT_OF_RANGE = 1, false, "the offset is outside the partition's log start..=log end";
    CORRUPT_MESSAGE = 2, false, "a record batch failed validation (length, magic, CRC, record count)";
    UNKNOWN_TOPIC_OR_PARTITION = 3, true, "the topic or partition does not exist (yet)";
    LEADER_NOT_AVAILABLE = 5, true, "the partition has no leader right now (an election is under way, or every replica is offline)";
    NOT_LEADER_OR_FOLLOWER = 6, true, "this broker does not lead the partition: refresh metadata and go to the leader";
    REQUEST_TIMED_OUT = 7, true, "the request did not complete within its timeout";
    MESSAGE_TOO_LARGE = 10, false, "a batch is larger than the topic's max.message.bytes";
    OFFSET_METADATA_TOO_LARGE = 12, false, "a committed offset's metadata exceeds 4096 bytes";
    NETWORK_EXCEPTION = 13, true, "the connection failed before a response";
    COORDINATOR_LOAD_IN_PROGRESS = 14, true, "the coordinator is loading the group (it just took the group over): retry shortly";
    COORDINATOR_NOT_AVAILABLE = 15, true, "the group coordinator is not available (yet)";
    NOT_COORDINATOR = 16, true, "this broker is not the group's coordinator: find it again";
    INVALID_TOPIC_EXCEPTION = 17, false, "the topic name is not valid";
    RECORD_LIST_TOO_LARGE = 18, false, "the request's records exceed the frame limit";
    NOT_ENOUGH_REPLICAS = 19, true, "too few in-sync replicas to accept the write";
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20, true, "the write was appended but too few in-sync replicas remained to acknowledge it";
    INVALID_REQUIRED_ACKS = 21, false, "acks must be 0, 1 or -1 (all)";
    ILLEGAL_GENERATION = 22, false, "the member's generation is not the group's current one: rejoin";
    INCONSISTENT_GROUP_PROTOCOL = 23, false, "the member's protocol type or assignors do not match the group's";
    INVALID_GROUP_ID = 24, false, "the group id is empty or not valid";
    UNKNOWN_MEMBER_ID = 25, false, "the member is not in the group's current generation";
    INVALID_SESSION_TIMEOUT = 26, false, "the session timeout is outside 1 s ..= 30 min";
    REBALANCE_IN_PROGRESS = 27, false, "the group is rebalancing: rejoin";
    UNSUPPORTED_VERSION = 35, false, "the broker does not support this API version";
    TOPIC_ALREADY_EXISTS = 36, false, "a topic with this name exists";
    INVALID_PARTITIONS = 37, false, "the partition count is not valid";
    INVALID_REPLICATION_FACTOR = 38, false, "the replication factor is not valid (one node: 1 or -1)";
    INVALID_CONFIG = 40, false, "a topic config key or value is not valid";
    NOT_CONTROLLER = 41, true, "this node is not the active controller: ask the one Metadata names";
    INVALID_REQUEST = 42, false, "the request is malformed or breaks a protocol rule";
    POLICY_VIOLATION = 44, false, "the request breaks a broker limit (for example partitions_max)";
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45, false, "an idempotent producer's batch is not the next in its sequence";
    INVALID_PRODUCER_EPOCH = 47, false, "an idempotent producer's epoch is older than the current one";
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53, false, "transactions are not supported";
    KAFKA_STORAGE_ERROR = 56, true, "the partition's log is offline after an I/O error";
    NON_EMPTY_GROUP = 68, false, "the group has members: it cannot be deleted";
    GROUP_ID_NOT_FOUND = 69, false, "no such group";
    INVALID_REPLICA_ASSIGNMENT = 39, false, "the replica list is not valid (empty, duplicated, or naming unknown brokers)";
    REASSIGNMENT_IN_PROGRESS = 60, false, "a reassignment of the partition is under way: cancel it first";
    NO_REASSIGNMENT_IN_PROGRESS = 85, false, "no reassignment of the partition is under way";
    PREFERRED_LEADER_NOT_AVAILABLE = 80, true, "the preferred replica is not live or not in sync: it cannot lead now";
    ELIGIBLE_LEADERS_NOT_AVAILABLE = 83, true, "no live replica can lead the partition";
    ELECTION_NOT_NEEDED = 84, false, "the partition already has the leader the election would give it";
    FENCED_LEADER_EPOCH = 74, true, "the request's leader epoch is older than the partition's: refresh metadata";
    UNKNOWN_LEADER_EPOCH = 75, true, "the request's leader epoch is newer than this broker knows: retry after a backoff";
    STALE_BROKER_EPOCH = 77, false, "the broker's registration epoch is not its current one: it must register again";
    MEMBER_ID_REQUIRED = 79, false, "a new member must rejoin with the member id it was given (KIP-394)";
    GROUP_MAX_SIZE_REACHED = 81, false, "the group already has group_members_max members";
    FENCED_INSTANCE_ID = 82, false, "another member joined with this static instance id (KIP-345)";
    INVALID_RECORD = 87, false, "a batch breaks a broker rule (transactional or control batch, several idempotent batches)";
    INVALID_UPDATE_VERSION = 95, true, "a partition change was decided on a stale partition epoch: decide again";
    DUPLICATE_BROKER_REGISTRATION = 101, true, "another incarnation of this node id is registered and alive";
    INELIGIBLE_REPLICA = 107, false, "a replica may not join the ISR (its broker is fenced or not registered)";

}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.0, self.description())
    }
}
