//! Every message of the native protocol, version 0. The layout of each is its fields in order;
//! `protocol/SPEC.md` is the normative description.

use bytes::Bytes;

use super::error::ErrorCode;
use super::group_messages::*;
use super::wire::{DecodeError, Wire, wire_struct};

/// The APIs, by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ApiKey {
    /// Version negotiation.
    ApiVersions = 0,
    /// Brokers, topics and partitions.
    Metadata = 1,
    /// Create topics.
    CreateTopics = 2,
    /// Delete topics.
    DeleteTopics = 3,
    /// Topic configs and partition offsets.
    DescribeTopics = 4,
    /// Append record batches.
    Produce = 5,
    /// Read record batches.
    Fetch = 6,
    /// Offsets by time (earliest, latest, first at or after a timestamp).
    ListOffsets = 7,
    /// The coordinator of a group.
    FindCoordinator = 8,
    /// Join a group (or rejoin it for a rebalance).
    JoinGroup = 9,
    /// Hand out (leader) or receive an assignment.
    SyncGroup = 10,
    /// Keep a membership alive; learn of rebalances.
    Heartbeat = 11,
    /// Leave a group.
    LeaveGroup = 12,
    /// Commit consumed offsets.
    OffsetCommit = 13,
    /// Read committed offsets.
    OffsetFetch = 14,
    /// Every group.
    ListGroups = 15,
    /// Group state, members and assignments.
    DescribeGroups = 16,
    /// Delete groups' committed offsets.
    DeleteGroups = 17,
    /// Brokers (fenced or not), the active controller and the controller quorum.
    DescribeCluster = 18,
    /// Grow topics to more partitions.
    CreatePartitions = 19,
    /// A follower broker copies its leader's log.
    ReplicaFetch = 20,
    /// Elect partition leaders (preferred replicas, or unclean for offline partitions).
    ElectLeaders = 21,
    /// Move partitions' replicas to other brokers (or cancel a move).
    AlterPartitionReassignments = 22,
    /// Reassignments under way.
    ListPartitionReassignments = 23,
    /// A producer id (and epoch) for an idempotent producer.
    InitProducerId = 24,
}

impl ApiKey {
    /// All APIs.
    pub const ALL: [ApiKey; 25] = [
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::DescribeTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::SyncGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroups,
        ApiKey::DeleteGroups,
        ApiKey::DescribeCluster,
        ApiKey::CreatePartitions,
        ApiKey::ReplicaFetch,
        ApiKey::ElectLeaders,
        ApiKey::AlterPartitionReassignments,
        ApiKey::ListPartitionReassignments,
        ApiKey::InitProducerId,
    ];

    /// The API with this key.
    pub fn from_u16(key: u16) -> Option<ApiKey> {
        ApiKey::ALL.into_iter().find(|api| *api as u16 == key)
    }

    /// The API's name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ApiKey::ApiVersions => "api_versions",
            ApiKey::Metadata => "metadata",
            ApiKey::CreateTopics => "create_topics",
            ApiKey::DeleteTopics => "delete_topics",
            ApiKey::DescribeTopics => "describe_topics",
            ApiKey::Produce => "produce",
            ApiKey::Fetch => "fetch",
            ApiKey::ListOffsets => "list_offsets",
            ApiKey::FindCoordinator => "find_coordinator",
            ApiKey::JoinGroup => "join_group",
            ApiKey::SyncGroup => "sync_group",
            ApiKey::Heartbeat => "heartbeat",
            ApiKey::LeaveGroup => "leave_group",
            ApiKey::OffsetCommit => "offset_commit",
            ApiKey::OffsetFetch => "offset_fetch",
            ApiKey::ListGroups => "list_groups",
            ApiKey::DescribeGroups => "describe_groups",
            ApiKey::DeleteGroups => "delete_groups",
            ApiKey::DescribeCluster => "describe_cluster",
            ApiKey::CreatePartitions => "create_partitions",
            ApiKey::ReplicaFetch => "replica_fetch",
            ApiKey::ElectLeaders => "elect_leaders",
            ApiKey::AlterPartitionReassignments => "alter_partition_reassignments",
            ApiKey::ListPartitionReassignments => "list_partition_reassignments",
            ApiKey::InitProducerId => "init_producer_id",
        }
    }

    /// The versions of this API this implementation speaks.
    pub fn versions(self) -> (u16, u16) {
        (0, 0)
    }
}

wire_struct! {
    /// Precedes every request body.
    pub struct RequestHeader {
        /// `ApiKey` as a number.
        pub api_key: u16,
        /// The API version the body is encoded in.
        pub api_version: u16,
        /// Echoed in the response; lets a client match pipelined responses.
        pub correlation_id: u32,
        /// Free-form client name for logs (at most `CLIENT_ID_BYTES_MAX` bytes).
        pub client_id: String,
    }
}

wire_struct! {
    /// Precedes every response body. A non-zero `error_code` replaces the body (the request as a
    /// whole failed: unsupported API or version, malformed request).
    pub struct ResponseHeader {
        /// The request's correlation id.
        pub correlation_id: u32,
        /// Top-level error; `NONE` means the body follows.
        pub error_code: i16,
        /// Human text for a top-level error; empty otherwise.
        pub error_message: String,
    }
}

wire_struct! {
    /// ApiVersions request: no fields.
    pub struct ApiVersionsRequest {}
}

wire_struct! {
    /// One supported API.
    pub struct ApiVersion {
        /// `ApiKey` as a number.
        pub api_key: u16,
        /// Oldest version.
        pub min_version: u16,
        /// Newest version.
        pub max_version: u16,
    }
}

wire_struct! {
    /// ApiVersions response.
    pub struct ApiVersionsResponse {
        /// Every API the broker serves.
        pub apis: Vec<ApiVersion>,
        /// The broker's software version, for humans.
        pub broker_version: String,
    }
}

wire_struct! {
    /// Metadata request.
    pub struct MetadataRequest {
        /// Topics wanted; empty means all.
        pub topics: Vec<String>,
        /// Create requested topics that do not exist, if the broker allows auto-creation
        /// (producers set it; consumers and admin tools do not).
        pub allow_auto_create: bool,
    }
}

wire_struct! {
    /// A broker.
    pub struct BrokerMetadata {
        /// Its id.
        pub node_id: u32,
        /// Its advertised host.
        pub host: String,
        /// Its advertised native-protocol port.
        pub port: u16,
        /// Its rack; empty if none.
        pub rack: String,
    }
}

wire_struct! {
    /// A partition in a Metadata response.
    pub struct PartitionMetadata {
        /// Partition index.
        pub partition: u32,
        /// Per-partition error.
        pub error_code: i16,
        /// Node id of the leader; `u32::MAX` while there is none (then `error_code` is
        /// LEADER_NOT_AVAILABLE).
        pub leader: u32,
        /// Current leader epoch.
        pub leader_epoch: u32,
        /// Node ids of the replicas, the preferred leader first.
        pub replicas: Vec<u32>,
        /// Node ids of the in-sync replicas.
        pub isr: Vec<u32>,
        /// Node ids of the replicas whose broker is offline (fenced or not registered).
        pub offline_replicas: Vec<u32>,
    }
}

wire_struct! {
    /// A topic in a Metadata response.
    pub struct TopicMetadata {
        /// Per-topic error (`UNKNOWN_TOPIC_OR_PARTITION` for a missing requested topic).
        pub error_code: i16,
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<PartitionMetadata>,
    }
}

wire_struct! {
    /// Metadata response.
    pub struct MetadataResponse {
        /// Live brokers.
        pub brokers: Vec<BrokerMetadata>,
        /// The active controller's node id (`u32::MAX` if unknown).
        pub controller_id: u32,
        /// Requested (or all) topics.
        pub topics: Vec<TopicMetadata>,
    }
}

wire_struct! {
    /// A topic config entry.
    pub struct ConfigEntry {
        /// Key, as in Kafka (`retention.ms`, ...).
        pub key: String,
        /// Value, as text.
        pub value: String,
    }
}

wire_struct! {
    /// A topic to create.
    pub struct CreatableTopic {
        /// Name.
        pub name: String,
        /// Partition count; 0 means the broker default.
        pub partitions: u32,
        /// Replicas per partition; -1 means the broker default (`min(3, live brokers)`).
        pub replication_factor: i16,
        /// Config overrides.
        pub configs: Vec<ConfigEntry>,
    }
}

wire_struct! {
    /// CreateTopics request.
    pub struct CreateTopicsRequest {
        /// Topics to create.
        pub topics: Vec<CreatableTopic>,
        /// Only validate, create nothing.
        pub validate_only: bool,
    }
}

wire_struct! {
    /// The outcome for one topic.
    pub struct TopicResult {
        /// Topic name.
        pub name: String,
        /// Error for this topic.
        pub error_code: i16,
        /// Human text for the error; empty on success.
        pub error_message: String,
    }
}

wire_struct! {
    /// CreateTopics response.
    pub struct CreateTopicsResponse {
        /// One result per requested topic.
        pub topics: Vec<TopicResult>,
    }
}

wire_struct! {
    /// DeleteTopics request.
    pub struct DeleteTopicsRequest {
        /// Names to delete.
        pub names: Vec<String>,
    }
}

wire_struct! {
    /// DeleteTopics response.
    pub struct DeleteTopicsResponse {
        /// One result per requested name.
        pub topics: Vec<TopicResult>,
    }
}

wire_struct! {
    /// DescribeTopics request.
    pub struct DescribeTopicsRequest {
        /// Names; empty means all.
        pub names: Vec<String>,
    }
}

wire_struct! {
    /// A config entry with whether it is the default.
    pub struct DescribedConfig {
        /// Key.
        pub key: String,
        /// Value.
        pub value: String,
        /// Whether the value is the broker default rather than a topic override.
        pub is_default: bool,
    }
}

wire_struct! {
    /// A partition's state.
    pub struct DescribedPartition {
        /// Partition index.
        pub partition: u32,
        /// Per-partition error.
        pub error_code: i16,
        /// Leader node id (`u32::MAX`: none).
        pub leader: u32,
        /// Leader epoch.
        pub leader_epoch: u32,
        /// Replicas, the preferred leader first.
        pub replicas: Vec<u32>,
        /// In-sync replicas.
        pub isr: Vec<u32>,
        /// First offset (the offsets and sizes are this broker's; zero with
        /// NOT_LEADER_OR_FOLLOWER where another broker hosts the partition).
        pub log_start_offset: u64,
        /// Next offset to be written.
        pub log_end_offset: u64,
        /// Offset below which consumers may read.
        pub high_watermark: u64,
        /// Bytes on disk.
        pub size_bytes: u64,
        /// Segment files.
        pub n_segments: u32,
    }
}

wire_struct! {
    /// A described topic.
    pub struct DescribedTopic {
        /// Name.
        pub name: String,
        /// Per-topic error.
        pub error_code: i16,
        /// Human text for the error.
        pub error_message: String,
        /// Effective configs.
        pub configs: Vec<DescribedConfig>,
        /// Partitions.
        pub partitions: Vec<DescribedPartition>,
    }
}

wire_struct! {
    /// DescribeTopics response.
    pub struct DescribeTopicsResponse {
        /// Topics.
        pub topics: Vec<DescribedTopic>,
    }
}

wire_struct! {
    /// Records for one partition.
    pub struct ProducePartition {
        /// Partition index.
        pub partition: u32,
        /// One or more RecordBatch v2 batches, back to back.
        pub records: Bytes,
    }
}

wire_struct! {
    /// Records for one topic.
    pub struct ProduceTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ProducePartition>,
    }
}

wire_struct! {
    /// Produce request.
    pub struct ProduceRequest {
        /// 0: no response; 1: after the leader appended; -1: after the append is durable.
        pub acks: i8,
        /// How long to wait for durability before `REQUEST_TIMED_OUT`.
        pub timeout_ms: u32,
        /// Records by topic and partition.
        pub topics: Vec<ProduceTopic>,
    }
}

wire_struct! {
    /// The outcome for one partition.
    pub struct ProducePartitionResponse {
        /// Partition index.
        pub partition: u32,
        /// Error.
        pub error_code: i16,
        /// Human text for the error.
        pub error_message: String,
        /// Offset of the first appended record.
        pub base_offset: u64,
        /// Broker time of the append (Unix ms).
        pub log_append_time: i64,
        /// The partition's log start offset.
        pub log_start_offset: u64,
    }
}

wire_struct! {
    /// Outcomes for one topic.
    pub struct ProduceTopicResponse {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ProducePartitionResponse>,
    }
}

wire_struct! {
    /// Produce response (not sent for acks=0).
    pub struct ProduceResponse {
        /// By topic.
        pub topics: Vec<ProduceTopicResponse>,
    }
}

wire_struct! {
    /// One partition to fetch.
    pub struct FetchPartition {
        /// Partition index.
        pub partition: u32,
        /// Offset to read from.
        pub fetch_offset: u64,
        /// Most bytes for this partition (at least one batch is returned regardless).
        pub partition_max_bytes: u32,
        /// The leader epoch the client believes current (from Metadata), or -1: an older one is
        /// refused with FENCED_LEADER_EPOCH, a newer one with UNKNOWN_LEADER_EPOCH.
        pub current_leader_epoch: i32,
    }
}

wire_struct! {
    /// Partitions of one topic to fetch.
    pub struct FetchTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<FetchPartition>,
    }
}

wire_struct! {
    /// Fetch request.
    pub struct FetchRequest {
        /// Longest wait for `min_bytes` to accumulate.
        pub max_wait_ms: u32,
        /// Answer as soon as this many bytes are available.
        pub min_bytes: u32,
        /// Most bytes in the whole response.
        pub max_bytes: u32,
        /// What to fetch.
        pub topics: Vec<FetchTopic>,
    }
}

wire_struct! {
    /// Data for one partition.
    pub struct FetchPartitionResponse {
        /// Partition index.
        pub partition: u32,
        /// Error.
        pub error_code: i16,
        /// Consumers may read below this offset.
        pub high_watermark: u64,
        /// First offset of the log.
        pub log_start_offset: u64,
        /// Whole batches, back to back (empty if none).
        pub records: Bytes,
    }
}

wire_struct! {
    /// Data for one topic.
    pub struct FetchTopicResponse {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<FetchPartitionResponse>,
    }
}

wire_struct! {
    /// Fetch response.
    pub struct FetchResponse {
        /// By topic.
        pub topics: Vec<FetchTopicResponse>,
    }
}

wire_struct! {
    /// One partition a follower copies.
    pub struct ReplicaFetchPartition {
        /// Partition index.
        pub partition: u32,
        /// The leader epoch the follower follows: the leader refuses another one.
        pub current_leader_epoch: u32,
        /// The follower's log end: where to read.
        pub fetch_offset: u64,
        /// The epoch of the last batch the follower holds, or -1 (an empty log).
        pub last_fetched_epoch: i32,
        /// The offset below which the follower's log is durable.
        pub flushed_offset: u64,
        /// Most bytes for this partition (at least one batch is returned regardless).
        pub partition_max_bytes: u32,
    }
}

wire_struct! {
    /// Partitions of one topic a follower copies.
    pub struct ReplicaFetchTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ReplicaFetchPartition>,
    }
}

wire_struct! {
    /// ReplicaFetch request: a follower's long poll to its leader.
    pub struct ReplicaFetchRequest {
        /// The follower's node id.
        pub replica_id: u32,
        /// The follower's broker epoch (its registration).
        pub broker_epoch: u64,
        /// Longest wait for `min_bytes` to accumulate.
        pub max_wait_ms: u32,
        /// Answer as soon as this many bytes are available.
        pub min_bytes: u32,
        /// Most bytes in the whole response.
        pub max_bytes: u32,
        /// What to fetch.
        pub topics: Vec<ReplicaFetchTopic>,
    }
}

wire_struct! {
    /// The leader's answer for one partition.
    pub struct ReplicaFetchPartitionResponse {
        /// Partition index.
        pub partition: u32,
        /// Error.
        pub error_code: i16,
        /// The leader's high watermark.
        pub high_watermark: u64,
        /// The leader's log start.
        pub log_start_offset: u64,
        /// The leader's log end.
        pub log_end_offset: u64,
        /// Whether the follower's log diverges from the leader's: truncate before fetching again.
        pub diverging: bool,
        /// If diverging: the newest epoch at or below the follower's last fetched epoch that the
        /// leader holds, or -1 (none).
        pub diverging_epoch: i32,
        /// If diverging: where that epoch ends on the leader.
        pub diverging_end_offset: u64,
        /// Whole batches from `fetch_offset`, with their offsets and epochs (empty if none, or
        /// if diverging).
        pub records: Bytes,
    }
}

wire_struct! {
    /// The leader's answer for one topic.
    pub struct ReplicaFetchTopicResponse {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ReplicaFetchPartitionResponse>,
    }
}

wire_struct! {
    /// ReplicaFetch response.
    pub struct ReplicaFetchResponse {
        /// By topic.
        pub topics: Vec<ReplicaFetchTopicResponse>,
    }
}

wire_struct! {
    /// Partitions of one topic to elect leaders for.
    pub struct ElectTopic {
        /// Topic name.
        pub name: String,
        /// Partition indexes.
        pub partitions: Vec<u32>,
    }
}

wire_struct! {
    /// ElectLeaders request.
    pub struct ElectLeadersRequest {
        /// 0: preferred (the first replica, where live and in sync); 1: unclean (any live
        /// replica, for partitions without a leader).
        pub election_type: u8,
        /// The partitions; empty: every partition.
        pub topics: Vec<ElectTopic>,
    }
}

wire_struct! {
    /// One partition's election.
    pub struct ElectedPartition {
        /// Partition index.
        pub partition: u32,
        /// NONE, ELECTION_NOT_NEEDED, PREFERRED_LEADER_NOT_AVAILABLE,
        /// ELIGIBLE_LEADERS_NOT_AVAILABLE, UNKNOWN_TOPIC_OR_PARTITION, ...
        pub error_code: i16,
        /// Human text for an error.
        pub error_message: String,
    }
}

wire_struct! {
    /// One topic's elections.
    pub struct ElectedTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ElectedPartition>,
    }
}

wire_struct! {
    /// ElectLeaders response.
    pub struct ElectLeadersResponse {
        /// By topic.
        pub topics: Vec<ElectedTopic>,
    }
}

wire_struct! {
    /// One partition to move.
    pub struct Reassignment {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// The target replicas, the new preferred leader first (ignored when cancelling).
        pub replicas: Vec<u32>,
        /// Cancel the reassignment under way instead.
        pub cancel: bool,
    }
}

wire_struct! {
    /// AlterPartitionReassignments request.
    pub struct AlterPartitionReassignmentsRequest {
        /// The partitions to move.
        pub reassignments: Vec<Reassignment>,
    }
}

wire_struct! {
    /// One partition's outcome.
    pub struct ReassignmentResult {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// Error.
        pub error_code: i16,
        /// Human text for an error.
        pub error_message: String,
    }
}

wire_struct! {
    /// AlterPartitionReassignments response.
    pub struct AlterPartitionReassignmentsResponse {
        /// Per reassignment, in request order.
        pub results: Vec<ReassignmentResult>,
    }
}

wire_struct! {
    /// ListPartitionReassignments request.
    pub struct ListPartitionReassignmentsRequest {
        /// Topics to look at; empty: all.
        pub topics: Vec<String>,
    }
}

wire_struct! {
    /// A reassignment under way.
    pub struct OngoingReassignment {
        /// Topic name.
        pub topic: String,
        /// Partition index.
        pub partition: u32,
        /// Every replica now (the target's first).
        pub replicas: Vec<u32>,
        /// Replicas being added.
        pub adding: Vec<u32>,
        /// Replicas being removed.
        pub removing: Vec<u32>,
    }
}

wire_struct! {
    /// ListPartitionReassignments response.
    pub struct ListPartitionReassignmentsResponse {
        /// The reassignments under way.
        pub reassignments: Vec<OngoingReassignment>,
    }
}

wire_struct! {
    /// InitProducerId request: a new producer id, or the next epoch of a known one (KIP-360).
    pub struct InitProducerIdRequest {
        /// The producer's current id, or -1 for a new one.
        pub producer_id: i64,
        /// The producer's current epoch, or -1 for a new id.
        pub producer_epoch: i16,
    }
}

wire_struct! {
    /// InitProducerId response.
    pub struct InitProducerIdResponse {
        /// Error.
        pub error_code: i16,
        /// Human text for an error.
        pub error_message: String,
        /// The producer id to stamp on batches (-1 on error).
        pub producer_id: i64,
        /// Its epoch (-1 on error).
        pub producer_epoch: i16,
    }
}

/// `ListOffsetsPartition::timestamp` asking for the log end offset.
pub const LATEST_TIMESTAMP: i64 = -1;
/// `ListOffsetsPartition::timestamp` asking for the log start offset.
pub const EARLIEST_TIMESTAMP: i64 = -2;

wire_struct! {
    /// One partition to look up.
    pub struct ListOffsetsPartition {
        /// Partition index.
        pub partition: u32,
        /// `LATEST_TIMESTAMP`, `EARLIEST_TIMESTAMP`, or Unix ms.
        pub timestamp: i64,
        /// The leader epoch the client believes current, or -1 (as in a fetch).
        pub current_leader_epoch: i32,
    }
}

wire_struct! {
    /// Partitions of one topic to look up.
    pub struct ListOffsetsTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ListOffsetsPartition>,
    }
}

wire_struct! {
    /// ListOffsets request.
    pub struct ListOffsetsRequest {
        /// What to look up.
        pub topics: Vec<ListOffsetsTopic>,
    }
}

wire_struct! {
    /// The answer for one partition.
    pub struct ListOffsetsPartitionResponse {
        /// Partition index.
        pub partition: u32,
        /// Error.
        pub error_code: i16,
        /// Timestamp of the record found (-1 for earliest/latest or none found).
        pub timestamp: i64,
        /// The offset: first record at or after the time, or the log end if none.
        pub offset: u64,
    }
}

wire_struct! {
    /// Answers for one topic.
    pub struct ListOffsetsTopicResponse {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<ListOffsetsPartitionResponse>,
    }
}

wire_struct! {
    /// ListOffsets response.
    pub struct ListOffsetsResponse {
        /// By topic.
        pub topics: Vec<ListOffsetsTopicResponse>,
    }
}

wire_struct! {
    /// DescribeCluster request: no fields.
    pub struct DescribeClusterRequest {}
}

wire_struct! {
    /// A registered broker.
    pub struct DescribedBroker {
        /// Node id.
        pub node_id: u32,
        /// Native listener host.
        pub host: String,
        /// Native listener port.
        pub port: u16,
        /// Kafka listener `host:port`; empty if none.
        pub kafka: String,
        /// Rack; empty if none.
        pub rack: String,
        /// Whether it is fenced (may not lead).
        pub fenced: bool,
        /// Its registration's epoch.
        pub broker_epoch: u64,
    }
}

wire_struct! {
    /// A voter of the controller quorum.
    pub struct QuorumVoter {
        /// Node id.
        pub node_id: u32,
        /// Entries it lags behind the active controller's log; -1 if unknown.
        pub lag: i64,
    }
}

wire_struct! {
    /// DescribeCluster response.
    pub struct DescribeClusterResponse {
        /// The active controller's node id (`u32::MAX` if unknown).
        pub controller_id: u32,
        /// The Raft term.
        pub term: u64,
        /// The metadata offset the answering broker has applied.
        pub metadata_offset: u64,
        /// Registered brokers.
        pub brokers: Vec<DescribedBroker>,
        /// The controller quorum.
        pub voters: Vec<QuorumVoter>,
    }
}

wire_struct! {
    /// A topic to grow.
    pub struct PartitionsToCreate {
        /// Topic name.
        pub name: String,
        /// The new partition count.
        pub count: u32,
    }
}

wire_struct! {
    /// CreatePartitions request.
    pub struct CreatePartitionsRequest {
        /// The topics.
        pub topics: Vec<PartitionsToCreate>,
        /// Check only.
        pub validate_only: bool,
    }
}

wire_struct! {
    /// CreatePartitions response.
    pub struct CreatePartitionsResponse {
        /// Per topic, in request order.
        pub topics: Vec<TopicResult>,
    }
}

/// A decoded request body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Request {
    ApiVersions(ApiVersionsRequest),
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    DescribeTopics(DescribeTopicsRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    FindCoordinator(FindCoordinatorRequest),
    JoinGroup(JoinGroupRequest),
    SyncGroup(SyncGroupRequest),
    Heartbeat(HeartbeatRequest),
    LeaveGroup(LeaveGroupRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    ListGroups(ListGroupsRequest),
    DescribeGroups(DescribeGroupsRequest),
    DeleteGroups(DeleteGroupsRequest),
    DescribeCluster(DescribeClusterRequest),
    CreatePartitions(CreatePartitionsRequest),
    ReplicaFetch(ReplicaFetchRequest),
    ElectLeaders(ElectLeadersRequest),
    AlterPartitionReassignments(AlterPartitionReassignmentsRequest),
    ListPartitionReassignments(ListPartitionReassignmentsRequest),
    InitProducerId(InitProducerIdRequest),
}

impl Request {
    /// The request's API.
    pub fn api_key(&self) -> ApiKey {
        match self {
            Request::ApiVersions(_) => ApiKey::ApiVersions,
            Request::Metadata(_) => ApiKey::Metadata,
            Request::CreateTopics(_) => ApiKey::CreateTopics,
            Request::DeleteTopics(_) => ApiKey::DeleteTopics,
            Request::DescribeTopics(_) => ApiKey::DescribeTopics,
            Request::Produce(_) => ApiKey::Produce,
            Request::Fetch(_) => ApiKey::Fetch,
            Request::ListOffsets(_) => ApiKey::ListOffsets,
            Request::FindCoordinator(_) => ApiKey::FindCoordinator,
            Request::JoinGroup(_) => ApiKey::JoinGroup,
            Request::SyncGroup(_) => ApiKey::SyncGroup,
            Request::Heartbeat(_) => ApiKey::Heartbeat,
            Request::LeaveGroup(_) => ApiKey::LeaveGroup,
            Request::OffsetCommit(_) => ApiKey::OffsetCommit,
            Request::OffsetFetch(_) => ApiKey::OffsetFetch,
            Request::ListGroups(_) => ApiKey::ListGroups,
            Request::DescribeGroups(_) => ApiKey::DescribeGroups,
            Request::DeleteGroups(_) => ApiKey::DeleteGroups,
            Request::DescribeCluster(_) => ApiKey::DescribeCluster,
            Request::CreatePartitions(_) => ApiKey::CreatePartitions,
            Request::ReplicaFetch(_) => ApiKey::ReplicaFetch,
            Request::ElectLeaders(_) => ApiKey::ElectLeaders,
            Request::AlterPartitionReassignments(_) => ApiKey::AlterPartitionReassignments,
            Request::ListPartitionReassignments(_) => ApiKey::ListPartitionReassignments,
            Request::InitProducerId(_) => ApiKey::InitProducerId,
        }
    }

    /// Encodes the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Request::ApiVersions(r) => r.encode(out),
            Request::Metadata(r) => r.encode(out),
            Request::CreateTopics(r) => r.encode(out),
            Request::DeleteTopics(r) => r.encode(out),
            Request::DescribeTopics(r) => r.encode(out),
            Request::Produce(r) => r.encode(out),
            Request::Fetch(r) => r.encode(out),
            Request::ListOffsets(r) => r.encode(out),
            Request::FindCoordinator(r) => r.encode(out),
            Request::JoinGroup(r) => r.encode(out),
            Request::SyncGroup(r) => r.encode(out),
            Request::Heartbeat(r) => r.encode(out),
            Request::LeaveGroup(r) => r.encode(out),
            Request::OffsetCommit(r) => r.encode(out),
            Request::OffsetFetch(r) => r.encode(out),
            Request::ListGroups(r) => r.encode(out),
            Request::DescribeGroups(r) => r.encode(out),
            Request::DeleteGroups(r) => r.encode(out),
            Request::DescribeCluster(r) => r.encode(out),
            Request::CreatePartitions(r) => r.encode(out),
            Request::ReplicaFetch(r) => r.encode(out),
            Request::ElectLeaders(r) => r.encode(out),
            Request::AlterPartitionReassignments(r) => r.encode(out),
            Request::ListPartitionReassignments(r) => r.encode(out),
            Request::InitProducerId(r) => r.encode(out),
        }
    }

    /// Decodes the body of `api` (version 0) from exactly `body`.
    pub fn decode_body(api: ApiKey, body: Bytes) -> Result<Request, DecodeError> {
        use super::wire::decode_exact as d;
        Ok(match api {
            ApiKey::ApiVersions => Request::ApiVersions(d(body)?),
            ApiKey::Metadata => Request::Metadata(d(body)?),
            ApiKey::CreateTopics => Request::CreateTopics(d(body)?),
            ApiKey::DeleteTopics => Request::DeleteTopics(d(body)?),
            ApiKey::DescribeTopics => Request::DescribeTopics(d(body)?),
            ApiKey::Produce => Request::Produce(d(body)?),
            ApiKey::Fetch => Request::Fetch(d(body)?),
            ApiKey::ListOffsets => Request::ListOffsets(d(body)?),
            ApiKey::FindCoordinator => Request::FindCoordinator(d(body)?),
            ApiKey::JoinGroup => Request::JoinGroup(d(body)?),
            ApiKey::SyncGroup => Request::SyncGroup(d(body)?),
            ApiKey::Heartbeat => Request::Heartbeat(d(body)?),
            ApiKey::LeaveGroup => Request::LeaveGroup(d(body)?),
            ApiKey::OffsetCommit => Request::OffsetCommit(d(body)?),
            ApiKey::OffsetFetch => Request::OffsetFetch(d(body)?),
            ApiKey::ListGroups => Request::ListGroups(d(body)?),
            ApiKey::DescribeGroups => Request::DescribeGroups(d(body)?),
            ApiKey::DeleteGroups => Request::DeleteGroups(d(body)?),
            ApiKey::DescribeCluster => Request::DescribeCluster(d(body)?),
            ApiKey::CreatePartitions => Request::CreatePartitions(d(body)?),
            ApiKey::ReplicaFetch => Request::ReplicaFetch(d(body)?),
            ApiKey::ElectLeaders => Request::ElectLeaders(d(body)?),
            ApiKey::AlterPartitionReassignments => Request::AlterPartitionReassignments(d(body)?),
            ApiKey::ListPartitionReassignments => Request::ListPartitionReassignments(d(body)?),
            ApiKey::InitProducerId => Request::InitProducerId(d(body)?),
        })
    }
}

/// Encodes a whole request frame payload (header then body; the length prefix is added by the
/// framing codec).
pub fn encode_request(correlation_id: u32, client_id: &str, request: &Request) -> Vec<u8> {
    let api = request.api_key();
    let header = RequestHeader {
        api_key: api as u16,
        api_version: api.versions().1,
        correlation_id,
        client_id: client_id.to_string(),
    };
    let mut out = Vec::new();
    header.encode(&mut out);
    request.encode_body(&mut out);
    out
}

/// Encodes a request frame payload as chunks: a produce request's records by reference (the
/// client writes its batches to the socket without copying them into a frame).
pub fn encode_request_chunks(
    correlation_id: u32,
    client_id: &str,
    request: &Request,
) -> Vec<Bytes> {
    let api = request.api_key();
    let mut out = super::wire::Chunks::default();
    RequestHeader {
        api_key: api as u16,
        api_version: api.versions().1,
        correlation_id,
        client_id: client_id.to_string(),
    }
    .encode(out.buf());
    match request {
        Request::Produce(r) => r.encode_chunks(&mut out),
        other => other.encode_body(out.buf()),
    }
    out.finish()
}

/// Encodes a successful response frame payload.
pub fn encode_response<T: Wire>(correlation_id: u32, body: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ResponseHeader {
        correlation_id,
        error_code: ErrorCode::NONE.0,
        error_message: String::new(),
    }
    .encode(&mut out);
    body.encode(&mut out);
    out
}

/// Encodes a successful response frame payload as chunks: large record fields by reference.
pub fn encode_response_chunks<T: Wire>(correlation_id: u32, body: &T) -> Vec<Bytes> {
    let mut out = super::wire::Chunks::default();
    ResponseHeader {
        correlation_id,
        error_code: ErrorCode::NONE.0,
        error_message: String::new(),
    }
    .encode(out.buf());
    body.encode_chunks(&mut out);
    out.finish()
}

/// Encodes a top-level error response frame payload.
pub fn encode_error_response(correlation_id: u32, error: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    ResponseHeader {
        correlation_id,
        error_code: error.0,
        error_message: message.to_string(),
    }
    .encode(&mut out);
    out
}
