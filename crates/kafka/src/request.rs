//! Kafka requests: the header, the APIs Cairn serves and their versions, and a bounded decoder
//! for each request body at every version advertised (layouts from Apache Kafka's
//! `clients/src/main/resources/common/message/*Request.json`, cross-checked in the tests against
//! the `kafka-protocol` crate's encoders).

use bytes::Bytes;

use crate::read::{DecodeError, Reader, error};

/// An API Cairn serves on the Kafka listener, with the versions it advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Api {
    /// The Kafka API key.
    pub key: i16,
    /// Its name in Kafka's message definitions.
    pub name: &'static str,
    /// Its metrics label, `kafka:<name>`.
    pub label: &'static str,
    /// Lowest version advertised.
    pub min: i16,
    /// Highest version advertised.
    pub max: i16,
    /// Lowest version actually served: below it the request is refused (Produce is advertised
    /// from v0 because librdkafka derives its feature set from the advertised minimum, but
    /// message formats before v2, that is Produce before v3, are not served).
    pub served_from: i16,
    /// First version using the flexible encoding (compact lengths, tagged fields).
    pub flexible_from: i16,
}

macro_rules! apis {
    ($($const:ident = $key:literal, $name:literal, $min:literal..=$max:literal, served from $served:literal, flexible from $flex:literal;)*) => {
        impl Api {
            $(
                #[doc = concat!("`", $name, "` (key ", $key, ").")]
                pub const $const: Api = Api {
                    key: $key, name: $name, label: concat!("kafka:", $name), min: $min, max: $max,
                    served_from: $served, flexible_from: $flex,
                };
            )*
            /// Every API served, by key.
            pub const ALL: &'static [Api] = &[$(Api::$const,)*];
        }
    };
}

apis! {
    PRODUCE = 0, "Produce", 0..=9, served from 3, flexible from 9;
    FETCH = 1, "Fetch", 4..=12, served from 4, flexible from 12;
    LIST_OFFSETS = 2, "ListOffsets", 1..=6, served from 1, flexible from 6;
    METADATA = 3, "Metadata", 0..=9, served from 0, flexible from 9;
    OFFSET_COMMIT = 8, "OffsetCommit", 2..=8, served from 2, flexible from 8;
    OFFSET_FETCH = 9, "OffsetFetch", 1..=7, served from 1, flexible from 6;
    FIND_COORDINATOR = 10, "FindCoordinator", 0..=4, served from 0, flexible from 3;
    JOIN_GROUP = 11, "JoinGroup", 0..=7, served from 0, flexible from 6;
    HEARTBEAT = 12, "Heartbeat", 0..=4, served from 0, flexible from 4;
    LEAVE_GROUP = 13, "LeaveGroup", 0..=4, served from 0, flexible from 4;
    SYNC_GROUP = 14, "SyncGroup", 0..=5, served from 0, flexible from 4;
    DESCRIBE_GROUPS = 15, "DescribeGroups", 0..=5, served from 0, flexible from 5;
    LIST_GROUPS = 16, "ListGroups", 0..=4, served from 0, flexible from 3;
    API_VERSIONS = 18, "ApiVersions", 0..=3, served from 0, flexible from 3;
    CREATE_TOPICS = 19, "CreateTopics", 2..=6, served from 2, flexible from 5;
    DELETE_TOPICS = 20, "DeleteTopics", 1..=5, served from 1, flexible from 4;
    INIT_PRODUCER_ID = 22, "InitProducerId", 0..=4, served from 0, flexible from 2;
    OFFSET_FOR_LEADER_EPOCH = 23, "OffsetForLeaderEpoch", 2..=4, served from 2, flexible from 4;
    DESCRIBE_CONFIGS = 32, "DescribeConfigs", 1..=4, served from 1, flexible from 4;
    CREATE_PARTITIONS = 37, "CreatePartitions", 0..=3, served from 0, flexible from 2;
    DELETE_GROUPS = 42, "DeleteGroups", 0..=2, served from 0, flexible from 2;
    ELECT_LEADERS = 43, "ElectLeaders", 0..=2, served from 0, flexible from 2;
    ALTER_PARTITION_REASSIGNMENTS = 45, "AlterPartitionReassignments", 0..=1, served from 0, flexible from 0;
    LIST_PARTITION_REASSIGNMENTS = 46, "ListPartitionReassignments", 0..=0, served from 0, flexible from 0;
    DESCRIBE_CLUSTER = 60, "DescribeCluster", 0..=1, served from 0, flexible from 0;
}

impl Api {
    /// The API with this key, if served.
    pub fn from_key(key: i16) -> Option<Api> {
        Api::ALL.iter().copied().find(|api| api.key == key)
    }

    /// Whether `version` uses the flexible encoding.
    pub fn is_flexible(self, version: i16) -> bool {
        version >= self.flexible_from
    }

    /// Whether `version` is served (advertised and not refused).
    pub fn serves(self, version: i16) -> bool {
        (self.served_from.max(self.min)..=self.max).contains(&version)
    }
}

/// A request header (v1, or v2 with tagged fields for flexible versions; v0 without a client
/// id is not used by any client Cairn serves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    /// API key.
    pub api_key: i16,
    /// API version.
    pub api_version: i16,
    /// Echoed in the response.
    pub correlation_id: i32,
    /// The client's id (`client.id`), possibly null.
    pub client_id: Option<String>,
}

/// The fixed prefix of every request header: enough to answer an unknown API or version.
pub fn peek_header(frame: &[u8]) -> Option<(i16, i16, i32)> {
    let b = frame.get(..8)?;
    let (key, rest) = b.split_at(2);
    let (version, corr) = rest.split_at(2);
    Some((
        i16::from_be_bytes(key.try_into().ok()?),
        i16::from_be_bytes(version.try_into().ok()?),
        i32::from_be_bytes(corr.try_into().ok()?),
    ))
}

/// A decoded request, its header included.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The header.
    pub header: RequestHeader,
    /// The body.
    pub request: Request,
}

/// The request bodies Cairn serves.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Request {
    ApiVersions(ApiVersionsRequest),
    Metadata(MetadataRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    FindCoordinator(FindCoordinatorRequest),
    JoinGroup(JoinGroupRequest),
    Heartbeat(HeartbeatRequest),
    LeaveGroup(LeaveGroupRequest),
    SyncGroup(SyncGroupRequest),
    DescribeGroups(DescribeGroupsRequest),
    ListGroups(ListGroupsRequest),
    DeleteGroups(DeleteGroupsRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    DescribeConfigs(DescribeConfigsRequest),
    InitProducerId(InitProducerIdRequest),
    OffsetForLeaderEpoch(OffsetForLeaderEpochRequest),
    CreatePartitions(CreatePartitionsRequest),
    ElectLeaders(ElectLeadersRequest),
    AlterPartitionReassignments(AlterPartitionReassignmentsRequest),
    ListPartitionReassignments(ListPartitionReassignmentsRequest),
    DescribeCluster(DescribeClusterRequest),
}

/// OffsetForLeaderEpoch: where each named epoch ends in a partition's log (clients use it to
/// find out whether the log they read was truncated after a leader change, KIP-320).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetForLeaderEpochRequest {
    /// v3+: the asking replica, -1 for a consumer.
    pub replica_id: i32,
    /// Per topic: (name, partitions).
    pub topics: Vec<(String, Vec<EpochQuery>)>,
}

/// (partition, current leader epoch (-1: not sent), the leader epoch whose end is asked for).
pub type EpochQuery = (i32, i32, i32);

/// CreatePartitions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreatePartitionsRequest {
    /// Per topic: (name, new total count, whether manual assignments were given).
    pub topics: Vec<(String, i32, bool)>,
    /// How long to wait.
    pub timeout_ms: i32,
    /// Check only.
    pub validate_only: bool,
}

/// ElectLeaders.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElectLeadersRequest {
    /// 0: preferred, 1: unclean (v1+; v0 is preferred).
    pub election_type: i8,
    /// Per topic, its partitions; `None`: every partition.
    pub topics: Option<Vec<(String, Vec<i32>)>>,
    /// How long to wait.
    pub timeout_ms: i32,
}

/// AlterPartitionReassignments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlterPartitionReassignmentsRequest {
    /// How long to wait.
    pub timeout_ms: i32,
    /// Per topic: (name, its partitions).
    pub topics: Vec<(String, Vec<PartitionMove>)>,
}

/// A partition and its target replicas (`None`: cancel its reassignment).
pub type PartitionMove = (i32, Option<Vec<i32>>);

/// ListPartitionReassignments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPartitionReassignmentsRequest {
    /// How long to wait.
    pub timeout_ms: i32,
    /// Per topic, the partitions asked about; `None`: all.
    pub topics: Option<Vec<(String, Vec<i32>)>>,
}

/// DescribeCluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeClusterRequest {
    /// Whether authorized operations were asked for (not served: answered with none).
    pub include_cluster_authorized_operations: bool,
    /// v1+: which endpoints (1: brokers; 2: controllers, not served).
    pub endpoint_type: i8,
}

/// ApiVersions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiVersionsRequest {
    /// v3+: the client library's name.
    pub client_software_name: String,
    /// v3+: its version.
    pub client_software_version: String,
}

/// Metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataRequest {
    /// Topic names; `None` is every topic (v1+; in v0 an empty list means every topic).
    pub topics: Option<Vec<String>>,
    /// v4+: create missing topics (earlier versions always may).
    pub allow_auto_topic_creation: bool,
}

/// Produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceRequest {
    /// Transactions are not served; a non-null id is refused.
    pub transactional_id: Option<String>,
    /// 0, 1 or -1.
    pub acks: i16,
    /// Time to wait for acks=all.
    pub timeout_ms: i32,
    /// Per topic.
    pub topics: Vec<ProduceTopic>,
}

/// One topic of a produce request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceTopic {
    /// Topic name.
    pub name: String,
    /// (partition, record batches).
    pub partitions: Vec<(i32, Option<Bytes>)>,
}

/// Fetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchRequest {
    /// -1 for consumers.
    pub replica_id: i32,
    /// Long-poll bound.
    pub max_wait_ms: i32,
    /// Bytes to wait for.
    pub min_bytes: i32,
    /// Response size bound.
    pub max_bytes: i32,
    /// 0 read uncommitted, 1 read committed (the same without transactions).
    pub isolation_level: i8,
    /// v7+ fetch session (KIP-227); Cairn answers without sessions.
    pub session_id: i32,
    /// v7+.
    pub session_epoch: i32,
    /// Per topic.
    pub topics: Vec<FetchTopic>,
    /// v11+.
    pub rack_id: String,
}

/// One topic of a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchTopic {
    /// Topic name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<FetchPartition>,
}

/// One partition of a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchPartition {
    /// Partition index.
    pub partition: i32,
    /// v9+: the client's idea of the leader epoch (-1 unknown).
    pub current_leader_epoch: i32,
    /// First offset wanted.
    pub fetch_offset: i64,
    /// v12+: the epoch of the fetcher's last batch (followers, KIP-595; -1 unknown).
    pub last_fetched_epoch: i32,
    /// v5+: the fetcher's log start offset (followers; -1 for consumers).
    pub log_start_offset: i64,
    /// Bound for this partition.
    pub partition_max_bytes: i32,
}

/// ListOffsets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListOffsetsRequest {
    /// -1 for consumers.
    pub replica_id: i32,
    /// v2+.
    pub isolation_level: i8,
    /// Per topic: (name, partitions).
    pub topics: Vec<(String, Vec<ListOffsetsPartition>)>,
}

/// (partition, current leader epoch, timestamp: -1 latest, -2 earliest, -3 max timestamp).
pub type ListOffsetsPartition = (i32, i32, i64);

/// FindCoordinator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FindCoordinatorRequest {
    /// 0: a consumer group, 1: a transactional id.
    pub key_type: i8,
    /// The groups (or transactional ids) asked about: one before v4, any number from v4.
    pub keys: Vec<String>,
    /// Whether the response is the batched (v4+) form.
    pub batched: bool,
}

/// JoinGroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JoinGroupRequest {
    /// The group.
    pub group_id: String,
    /// A member not heard from for this long is removed.
    pub session_timeout_ms: i32,
    /// v1+: how long a rebalance waits for members to rejoin (v0: the session timeout).
    pub rebalance_timeout_ms: i32,
    /// Empty for a new member.
    pub member_id: String,
    /// v5+: static membership id.
    pub group_instance_id: Option<String>,
    /// "consumer" for consumers.
    pub protocol_type: String,
    /// (assignor name, its metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
}

/// Heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeartbeatRequest {
    /// The group.
    pub group_id: String,
    /// The member's generation.
    pub generation_id: i32,
    /// The member.
    pub member_id: String,
    /// Its static instance id (v3+).
    pub group_instance_id: Option<String>,
}

/// LeaveGroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaveGroupRequest {
    /// The group.
    pub group_id: String,
    /// The members leaving (one before v3): member id (empty when named by instance id) and
    /// static instance id.
    pub members: Vec<(String, Option<String>)>,
    /// Whether the response lists members (v3+).
    pub batched: bool,
}

/// SyncGroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncGroupRequest {
    /// The group.
    pub group_id: String,
    /// The member's generation.
    pub generation_id: i32,
    /// The member.
    pub member_id: String,
    /// Its static instance id (v3+).
    pub group_instance_id: Option<String>,
    /// The leader's assignment: (member id, assignment); empty from followers.
    pub assignments: Vec<(String, Bytes)>,
}

/// DescribeGroups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeGroupsRequest {
    /// The groups.
    pub groups: Vec<String>,
}

/// DeleteGroups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteGroupsRequest {
    /// The groups.
    pub groups: Vec<String>,
}

/// ListGroups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListGroupsRequest {
    /// v4+: only groups in these states (empty: all).
    pub states_filter: Vec<String>,
}

/// OffsetCommit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetCommitRequest {
    /// The group.
    pub group_id: String,
    /// The member's generation; -1 for a commit outside group membership.
    pub generation_id: i32,
    /// The member id; empty outside group membership.
    pub member_id: String,
    /// v7+: static membership id.
    pub group_instance_id: Option<String>,
    /// Per topic: (name, [(partition, offset, leader epoch, metadata)]).
    pub topics: Vec<(String, Vec<CommittedPartition>)>,
}

/// One committed partition: (partition, offset, leader epoch or -1, metadata).
pub type CommittedPartition = (i32, i64, i32, Option<String>);

/// OffsetFetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetFetchRequest {
    /// The group.
    pub group_id: String,
    /// Per topic, the partitions asked for; `None`: every partition the group committed.
    pub topics: Option<Vec<(String, Vec<i32>)>>,
}

/// CreateTopics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateTopicsRequest {
    /// Topics to create.
    pub topics: Vec<CreatableTopic>,
    /// Time to wait.
    pub timeout_ms: i32,
    /// Check only.
    pub validate_only: bool,
}

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreatableTopic {
    /// Name.
    pub name: String,
    /// -1: the broker default.
    pub num_partitions: i32,
    /// -1: the broker default.
    pub replication_factor: i16,
    /// Manual assignments (partition, broker ids); refused when non-empty.
    pub assignments: Vec<(i32, Vec<i32>)>,
    /// Config overrides (a null value means the default).
    pub configs: Vec<(String, Option<String>)>,
}

/// DeleteTopics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTopicsRequest {
    /// Names.
    pub names: Vec<String>,
    /// Time to wait.
    pub timeout_ms: i32,
}

/// DescribeConfigs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeConfigsRequest {
    /// (resource type, name, keys or all).
    pub resources: Vec<(i8, String, Option<Vec<String>>)>,
    /// v1+.
    pub include_synonyms: bool,
    /// v3+.
    pub include_documentation: bool,
}

/// InitProducerId.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InitProducerIdRequest {
    /// Transactions are not served; a non-null id is refused.
    pub transactional_id: Option<String>,
    /// Transaction timeout.
    pub transaction_timeout_ms: i32,
    /// v3+: the producer's current id, or -1.
    pub producer_id: i64,
    /// v3+: its current epoch, or -1.
    pub producer_epoch: i16,
}

/// Why a frame could not be decoded, with what is known of its header for the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Shorter than a header's fixed part.
    #[error("frame of {0} bytes is too short for a request header")]
    Truncated(usize),
    /// The API key is not served.
    #[error("API key {api_key} is not served")]
    UnknownApi {
        /// Key.
        api_key: i16,
        /// Version.
        api_version: i16,
        /// For the reply.
        correlation_id: i32,
    },
    /// The version is not served.
    #[error("{} v{api_version} is not served (v{}..=v{})", api.name, api.served_from.max(api.min), api.max)]
    UnsupportedVersion {
        /// The API.
        api: Api,
        /// Version asked for.
        api_version: i16,
        /// For the reply.
        correlation_id: i32,
    },
    /// The header or body is malformed.
    #[error("{api} v{api_version}: {source}")]
    Malformed {
        /// API name.
        api: &'static str,
        /// Version.
        api_version: i16,
        /// For the reply.
        correlation_id: i32,
        /// The field at fault.
        source: DecodeError,
    },
}

/// Decodes a whole request frame (without its length prefix).
pub fn decode(frame: Bytes) -> Result<Decoded, RequestError> {
    let (api_key, api_version, correlation_id) =
        peek_header(&frame).ok_or(RequestError::Truncated(frame.len()))?;
    let api = Api::from_key(api_key).ok_or(RequestError::UnknownApi {
        api_key,
        api_version,
        correlation_id,
    })?;
    if !api.serves(api_version) {
        return Err(RequestError::UnsupportedVersion {
            api,
            api_version,
            correlation_id,
        });
    }
    let malformed = |source| RequestError::Malformed {
        api: api.name,
        api_version,
        correlation_id,
        source,
    };
    let flexible = api.is_flexible(api_version);
    let mut r = Reader::new(frame.slice(8..), flexible);
    let client_id = r.classic_nullable_string("client_id").map_err(malformed)?;
    r.tagged_fields("header tagged fields").map_err(malformed)?;
    let request = decode_body(api, api_version, &mut r).map_err(malformed)?;
    r.tagged_fields("tagged fields").map_err(malformed)?;
    // Bytes after the last field are ignored, as Kafka's own parser does: librdkafka 2.x sends
    // a Metadata v9+ request for all topics with a 4-byte placeholder where a one-byte compact
    // null belongs, which Kafka reads as a null, three booleans and a tagged field, with one byte
    // left over. Refusing it would refuse every librdkafka client.
    Ok(Decoded {
        header: RequestHeader {
            api_key,
            api_version,
            correlation_id,
            client_id,
        },
        request,
    })
}

fn decode_body(api: Api, v: i16, r: &mut Reader) -> Result<Request, DecodeError> {
    Ok(match api.key {
        0 => Request::Produce(produce(r)?),
        1 => Request::Fetch(fetch(v, r)?),
        2 => Request::ListOffsets(list_offsets(v, r)?),
        3 => Request::Metadata(metadata(v, r)?),
        8 => Request::OffsetCommit(offset_commit(v, r)?),
        9 => Request::OffsetFetch(offset_fetch(v, r)?),
        10 => Request::FindCoordinator(find_coordinator(v, r)?),
        11 => Request::JoinGroup(join_group(v, r)?),
        12 => Request::Heartbeat(heartbeat(v, r)?),
        13 => Request::LeaveGroup(leave_group(v, r)?),
        14 => Request::SyncGroup(sync_group(v, r)?),
        15 => {
            let min = string_min(r);
            let groups = r.array("groups", min, |r| r.string("groups"))?;
            if v >= 3 {
                r.bool("include_authorized_operations")?;
            }
            Request::DescribeGroups(DescribeGroupsRequest { groups })
        }
        42 => {
            let min = string_min(r);
            Request::DeleteGroups(DeleteGroupsRequest {
                groups: r.array("groups_names", min, |r| r.string("groups_names"))?,
            })
        }
        16 => {
            let min = string_min(r);
            let states_filter = if v >= 4 {
                r.array("states_filter", min, |r| r.string("states_filter"))?
            } else {
                Vec::new()
            };
            Request::ListGroups(ListGroupsRequest { states_filter })
        }
        18 => Request::ApiVersions(api_versions(v, r)?),
        19 => Request::CreateTopics(create_topics(r)?),
        20 => {
            let min = string_min(r);
            Request::DeleteTopics(DeleteTopicsRequest {
                names: r.array("topic_names", min, |r| r.string("topic_names"))?,
                timeout_ms: r.i32("timeout_ms")?,
            })
        }
        22 => Request::InitProducerId(init_producer_id(v, r)?),
        23 => Request::OffsetForLeaderEpoch(offset_for_leader_epoch(v, r)?),
        32 => Request::DescribeConfigs(describe_configs(v, r)?),
        37 => Request::CreatePartitions(create_partitions(r)?),
        43 => Request::ElectLeaders(elect_leaders(v, r)?),
        45 => {
            let timeout_ms = r.i32("timeout_ms")?;
            if v >= 1 {
                r.bool("allow_replication_factor_change")?;
            }
            let partition_min = 4 + array_min(r) + tags_min(r);
            let topic_min = string_min(r) + array_min(r) + tags_min(r);
            let topics = r.array("topics", topic_min, |r| {
                let name = r.string("topics.name")?;
                let partitions = r.array("partitions", partition_min, |r| {
                    let index = r.i32("partition_index")?;
                    let replicas = r.nullable_array("replicas", 4, |r| r.i32("replica"))?;
                    r.tagged_fields("partitions")?;
                    Ok((index, replicas))
                })?;
                r.tagged_fields("topics")?;
                Ok((name, partitions))
            })?;
            Request::AlterPartitionReassignments(AlterPartitionReassignmentsRequest {
                timeout_ms,
                topics,
            })
        }
        46 => {
            let timeout_ms = r.i32("timeout_ms")?;
            let topic_min = string_min(r) + array_min(r) + tags_min(r);
            let topics = r.nullable_array("topics", topic_min, |r| {
                let name = r.string("topics.name")?;
                let partitions = r.array("partition_indexes", 4, |r| r.i32("partition_index"))?;
                r.tagged_fields("topics")?;
                Ok((name, partitions))
            })?;
            Request::ListPartitionReassignments(ListPartitionReassignmentsRequest {
                timeout_ms,
                topics,
            })
        }
        60 => {
            let include = r.bool("include_cluster_authorized_operations")?;
            let endpoint_type = if v >= 1 { r.i8("endpoint_type")? } else { 1 };
            Request::DescribeCluster(DescribeClusterRequest {
                include_cluster_authorized_operations: include,
                endpoint_type,
            })
        }
        other => return Err(error("api_key", format!("{other} has no decoder"))),
    })
}

/// The smallest encoding of a string (length prefix only).
fn string_min(r: &Reader) -> usize {
    if r.flexible() { 1 } else { 2 }
}

/// The smallest encoding of an array or bytes field (length prefix only).
fn array_min(r: &Reader) -> usize {
    if r.flexible() { 1 } else { 4 }
}

/// The smallest encoding of a struct's tagged-field section.
fn tags_min(r: &Reader) -> usize {
    usize::from(r.flexible())
}

fn api_versions(v: i16, r: &mut Reader) -> Result<ApiVersionsRequest, DecodeError> {
    let mut request = ApiVersionsRequest::default();
    if v >= 3 {
        request.client_software_name = r.string("client_software_name")?;
        request.client_software_version = r.string("client_software_version")?;
    }
    Ok(request)
}

fn metadata(v: i16, r: &mut Reader) -> Result<MetadataRequest, DecodeError> {
    let min = string_min(r) + tags_min(r);
    let topics = r.nullable_array("topics", min, |r| {
        let name = r.string("topics.name")?;
        r.tagged_fields("topics")?;
        Ok(name)
    })?;
    let topics = match (v, topics) {
        (0, Some(names)) if names.is_empty() => None,
        (0, None) => return Err(error("topics", "null in v0")),
        (_, topics) => topics,
    };
    let allow_auto_topic_creation = if v >= 4 {
        r.bool("allow_auto_topic_creation")?
    } else {
        true
    };
    if (8..=10).contains(&v) {
        r.bool("include_cluster_authorized_operations")?;
    }
    if v >= 8 {
        r.bool("include_topic_authorized_operations")?;
    }
    Ok(MetadataRequest {
        topics,
        allow_auto_topic_creation,
    })
}

fn produce(r: &mut Reader) -> Result<ProduceRequest, DecodeError> {
    let transactional_id = r.nullable_string("transactional_id")?;
    let acks = r.i16("acks")?;
    let timeout_ms = r.i32("timeout_ms")?;
    let partition_min = 4 + array_min(r) + tags_min(r);
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.array("topic_data", topic_min, |r| {
        let name = r.string("topic_data.name")?;
        let partitions = r.array("partition_data", partition_min, |r| {
            let index = r.i32("partition_data.index")?;
            let records = r.nullable_bytes("partition_data.records")?;
            r.tagged_fields("partition_data")?;
            Ok((index, records))
        })?;
        r.tagged_fields("topic_data")?;
        Ok(ProduceTopic { name, partitions })
    })?;
    Ok(ProduceRequest {
        transactional_id,
        acks,
        timeout_ms,
        topics,
    })
}

fn fetch(v: i16, r: &mut Reader) -> Result<FetchRequest, DecodeError> {
    let mut request = FetchRequest {
        replica_id: r.i32("replica_id")?,
        max_wait_ms: r.i32("max_wait_ms")?,
        min_bytes: r.i32("min_bytes")?,
        max_bytes: r.i32("max_bytes")?,
        isolation_level: r.i8("isolation_level")?,
        session_epoch: -1,
        ..FetchRequest::default()
    };
    if v >= 7 {
        request.session_id = r.i32("session_id")?;
        request.session_epoch = r.i32("session_epoch")?;
    }
    let partition_min = 4
        + if v >= 9 { 4 } else { 0 }
        + 8
        + if v >= 12 { 4 } else { 0 }
        + if v >= 5 { 8 } else { 0 }
        + 4
        + tags_min(r);
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    request.topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.topic")?;
        let partitions = r.array("partitions", partition_min, |r| {
            let partition = r.i32("partition")?;
            let current_leader_epoch = if v >= 9 {
                r.i32("current_leader_epoch")?
            } else {
                -1
            };
            let fetch_offset = r.i64("fetch_offset")?;
            let last_fetched_epoch = if v >= 12 {
                r.i32("last_fetched_epoch")?
            } else {
                -1
            };
            let log_start_offset = if v >= 5 {
                r.i64("log_start_offset")?
            } else {
                -1
            };
            let partition_max_bytes = r.i32("partition_max_bytes")?;
            r.tagged_fields("partitions")?;
            Ok(FetchPartition {
                partition,
                current_leader_epoch,
                fetch_offset,
                last_fetched_epoch,
                log_start_offset,
                partition_max_bytes,
            })
        })?;
        r.tagged_fields("topics")?;
        Ok(FetchTopic { name, partitions })
    })?;
    if v >= 7 {
        // Fetch sessions are not kept, so forgotten topics have nothing to forget; read and
        // check them all the same.
        let min = string_min(r) + array_min(r) + tags_min(r);
        r.array("forgotten_topics_data", min, |r| {
            r.string("forgotten_topics_data.topic")?;
            r.array("forgotten_topics_data.partitions", 4, |r| {
                r.i32("partition")
            })?;
            r.tagged_fields("forgotten_topics_data")
        })?;
    }
    if v >= 11 {
        request.rack_id = r.string("rack_id")?;
    }
    Ok(request)
}

fn list_offsets(v: i16, r: &mut Reader) -> Result<ListOffsetsRequest, DecodeError> {
    let replica_id = r.i32("replica_id")?;
    let isolation_level = if v >= 2 { r.i8("isolation_level")? } else { 0 };
    let partition_min = 4 + if v >= 4 { 4 } else { 0 } + 8 + tags_min(r);
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.name")?;
        let partitions = r.array("partitions", partition_min, |r| {
            let partition = r.i32("partition_index")?;
            let epoch = if v >= 4 {
                r.i32("current_leader_epoch")?
            } else {
                -1
            };
            let timestamp = r.i64("timestamp")?;
            r.tagged_fields("partitions")?;
            Ok((partition, epoch, timestamp))
        })?;
        r.tagged_fields("topics")?;
        Ok((name, partitions))
    })?;
    Ok(ListOffsetsRequest {
        replica_id,
        isolation_level,
        topics,
    })
}

fn find_coordinator(v: i16, r: &mut Reader) -> Result<FindCoordinatorRequest, DecodeError> {
    if v >= 4 {
        let key_type = r.i8("key_type")?;
        let min = string_min(r);
        let keys = r.array("coordinator_keys", min, |r| r.string("coordinator_keys"))?;
        return Ok(FindCoordinatorRequest {
            key_type,
            keys,
            batched: true,
        });
    }
    let key = r.string("key")?;
    let key_type = if v >= 1 { r.i8("key_type")? } else { 0 };
    Ok(FindCoordinatorRequest {
        key_type,
        keys: vec![key],
        batched: false,
    })
}

fn join_group(v: i16, r: &mut Reader) -> Result<JoinGroupRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    let session_timeout_ms = r.i32("session_timeout_ms")?;
    let rebalance_timeout_ms = if v >= 1 {
        r.i32("rebalance_timeout_ms")?
    } else {
        session_timeout_ms
    };
    let member_id = r.string("member_id")?;
    let group_instance_id = if v >= 5 {
        r.nullable_string("group_instance_id")?
    } else {
        None
    };
    let protocol_type = r.string("protocol_type")?;
    let min = string_min(r) + array_min(r) + tags_min(r);
    let protocols = r.array("protocols", min, |r| {
        let name = r.string("protocols.name")?;
        let metadata = r.nullable_bytes("protocols.metadata")?.unwrap_or_default();
        r.tagged_fields("protocols")?;
        Ok((name, metadata))
    })?;
    Ok(JoinGroupRequest {
        group_id,
        session_timeout_ms,
        rebalance_timeout_ms,
        member_id,
        group_instance_id,
        protocol_type,
        protocols,
    })
}

fn heartbeat(v: i16, r: &mut Reader) -> Result<HeartbeatRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    let generation_id = r.i32("generation_id")?;
    let member_id = r.string("member_id")?;
    let group_instance_id = if v >= 3 {
        r.nullable_string("group_instance_id")?
    } else {
        None
    };
    Ok(HeartbeatRequest {
        group_id,
        generation_id,
        member_id,
        group_instance_id,
    })
}

fn leave_group(v: i16, r: &mut Reader) -> Result<LeaveGroupRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    if v < 3 {
        let member_id = r.string("member_id")?;
        return Ok(LeaveGroupRequest {
            group_id,
            members: vec![(member_id, None)],
            batched: false,
        });
    }
    let min = 2 * string_min(r) + tags_min(r);
    let members = r.array("members", min, |r| {
        let id = r.string("members.member_id")?;
        let instance = r.nullable_string("members.group_instance_id")?;
        r.tagged_fields("members")?;
        Ok((id, instance))
    })?;
    Ok(LeaveGroupRequest {
        group_id,
        members,
        batched: true,
    })
}

fn sync_group(v: i16, r: &mut Reader) -> Result<SyncGroupRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    let generation_id = r.i32("generation_id")?;
    let member_id = r.string("member_id")?;
    let group_instance_id = if v >= 3 {
        r.nullable_string("group_instance_id")?
    } else {
        None
    };
    if v >= 5 {
        r.nullable_string("protocol_type")?;
        r.nullable_string("protocol_name")?;
    }
    let min = string_min(r) + array_min(r) + tags_min(r);
    let assignments = r.array("assignments", min, |r| {
        let id = r.string("assignments.member_id")?;
        let assignment = r
            .nullable_bytes("assignments.assignment")?
            .unwrap_or_default();
        r.tagged_fields("assignments")?;
        Ok((id, assignment))
    })?;
    Ok(SyncGroupRequest {
        group_id,
        generation_id,
        member_id,
        group_instance_id,
        assignments,
    })
}

fn offset_commit(v: i16, r: &mut Reader) -> Result<OffsetCommitRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    let generation_id = r.i32("generation_id")?;
    let member_id = r.string("member_id")?;
    let group_instance_id = if v >= 7 {
        r.nullable_string("group_instance_id")?
    } else {
        None
    };
    if v <= 4 {
        r.i64("retention_time_ms")?;
    }
    let partition_min = 4 + 8 + if v >= 6 { 4 } else { 0 } + string_min(r) + tags_min(r);
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.name")?;
        let partitions = r.array("partitions", partition_min, |r| {
            let partition = r.i32("partition_index")?;
            let offset = r.i64("committed_offset")?;
            let epoch = if v >= 6 {
                r.i32("committed_leader_epoch")?
            } else {
                -1
            };
            let metadata = r.nullable_string("committed_metadata")?;
            r.tagged_fields("partitions")?;
            Ok((partition, offset, epoch, metadata))
        })?;
        r.tagged_fields("topics")?;
        Ok((name, partitions))
    })?;
    Ok(OffsetCommitRequest {
        group_id,
        generation_id,
        member_id,
        group_instance_id,
        topics,
    })
}

fn offset_fetch(v: i16, r: &mut Reader) -> Result<OffsetFetchRequest, DecodeError> {
    let group_id = r.string("group_id")?;
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.nullable_array("topics", topic_min, |r| {
        let name = r.string("topics.name")?;
        let partitions = r.array("partition_indexes", 4, |r| r.i32("partition_index"))?;
        r.tagged_fields("topics")?;
        Ok((name, partitions))
    })?;
    if v >= 7 {
        r.bool("require_stable")?;
    }
    // Before v2 the topic list cannot be null.
    let topics = match (v, topics) {
        (1, None) => return Err(error("topics", "null before v2")),
        (_, topics) => topics,
    };
    Ok(OffsetFetchRequest { group_id, topics })
}

fn create_topics(r: &mut Reader) -> Result<CreateTopicsRequest, DecodeError> {
    let assignment_min = 4 + array_min(r) + tags_min(r);
    let config_min = 2 * string_min(r) + tags_min(r);
    let topic_min = string_min(r) + 6 + 2 * array_min(r) + tags_min(r);
    let topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.name")?;
        let num_partitions = r.i32("num_partitions")?;
        let replication_factor = r.i16("replication_factor")?;
        let assignments = r.array("assignments", assignment_min, |r| {
            let partition = r.i32("assignments.partition_index")?;
            let brokers = r.array("assignments.broker_ids", 4, |r| r.i32("broker_id"))?;
            r.tagged_fields("assignments")?;
            Ok((partition, brokers))
        })?;
        let configs = r.array("configs", config_min, |r| {
            let name = r.string("configs.name")?;
            let value = r.nullable_string("configs.value")?;
            r.tagged_fields("configs")?;
            Ok((name, value))
        })?;
        r.tagged_fields("topics")?;
        Ok(CreatableTopic {
            name,
            num_partitions,
            replication_factor,
            assignments,
            configs,
        })
    })?;
    Ok(CreateTopicsRequest {
        topics,
        timeout_ms: r.i32("timeout_ms")?,
        validate_only: r.bool("validate_only")?,
    })
}

fn describe_configs(v: i16, r: &mut Reader) -> Result<DescribeConfigsRequest, DecodeError> {
    let min = 1 + string_min(r) + array_min(r) + tags_min(r);
    let resources = r.array("resources", min, |r| {
        let resource_type = r.i8("resource_type")?;
        let name = r.string("resource_name")?;
        let key_min = string_min(r);
        let keys = r.nullable_array("configuration_keys", key_min, |r| {
            r.string("configuration_keys")
        })?;
        r.tagged_fields("resources")?;
        Ok((resource_type, name, keys))
    })?;
    Ok(DescribeConfigsRequest {
        resources,
        include_synonyms: r.bool("include_synonyms")?,
        include_documentation: if v >= 3 {
            r.bool("include_documentation")?
        } else {
            false
        },
    })
}

fn offset_for_leader_epoch(
    v: i16,
    r: &mut Reader,
) -> Result<OffsetForLeaderEpochRequest, DecodeError> {
    let replica_id = if v >= 3 { r.i32("replica_id")? } else { -1 };
    let partition_min = 4 + if v >= 2 { 4 } else { 0 } + 4 + tags_min(r);
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.topic")?;
        let partitions = r.array("partitions", partition_min, |r| {
            let partition = r.i32("partition")?;
            let current = if v >= 2 {
                r.i32("current_leader_epoch")?
            } else {
                -1
            };
            let epoch = r.i32("leader_epoch")?;
            r.tagged_fields("partitions")?;
            Ok((partition, current, epoch))
        })?;
        r.tagged_fields("topics")?;
        Ok((name, partitions))
    })?;
    Ok(OffsetForLeaderEpochRequest { replica_id, topics })
}

fn create_partitions(r: &mut Reader) -> Result<CreatePartitionsRequest, DecodeError> {
    let assignment_min = array_min(r) + tags_min(r);
    let topic_min = string_min(r) + 4 + array_min(r) + tags_min(r);
    let topics = r.array("topics", topic_min, |r| {
        let name = r.string("topics.name")?;
        let count = r.i32("count")?;
        let assignments = r.nullable_array("assignments", assignment_min, |r| {
            let brokers = r.array("broker_ids", 4, |r| r.i32("broker_id"))?;
            r.tagged_fields("assignments")?;
            Ok(brokers)
        })?;
        r.tagged_fields("topics")?;
        Ok((name, count, assignments.is_some()))
    })?;
    Ok(CreatePartitionsRequest {
        topics,
        timeout_ms: r.i32("timeout_ms")?,
        validate_only: r.bool("validate_only")?,
    })
}

fn elect_leaders(v: i16, r: &mut Reader) -> Result<ElectLeadersRequest, DecodeError> {
    let election_type = if v >= 1 { r.i8("election_type")? } else { 0 };
    let topic_min = string_min(r) + array_min(r) + tags_min(r);
    let topics = r.nullable_array("topic_partitions", topic_min, |r| {
        let name = r.string("topic_partitions.topic")?;
        let partitions = r.array("partitions", 4, |r| r.i32("partition"))?;
        r.tagged_fields("topic_partitions")?;
        Ok((name, partitions))
    })?;
    Ok(ElectLeadersRequest {
        election_type,
        topics,
        timeout_ms: r.i32("timeout_ms")?,
    })
}

fn init_producer_id(v: i16, r: &mut Reader) -> Result<InitProducerIdRequest, DecodeError> {
    let mut request = InitProducerIdRequest {
        transactional_id: r.nullable_string("transactional_id")?,
        transaction_timeout_ms: r.i32("transaction_timeout_ms")?,
        producer_id: -1,
        producer_epoch: -1,
    };
    if v >= 3 {
        request.producer_id = r.i64("producer_id")?;
        request.producer_epoch = r.i16("producer_epoch")?;
    }
    Ok(request)
}
