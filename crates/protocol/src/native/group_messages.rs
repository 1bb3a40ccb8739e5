//! The consumer-group messages of the native protocol (keys 8 to 17): coordinator lookup,
//! membership (join, sync, heartbeat, leave), committed offsets and group administration.
//! `protocol/SPEC.md` is the normative description.

use bytes::Bytes;

use super::wire::wire_struct;

wire_struct! {
    /// FindCoordinator request.
    pub struct FindCoordinatorRequest {
        /// The group whose coordinator is wanted.
        pub group_id: String,
    }
}

wire_struct! {
    /// FindCoordinator response.
    pub struct FindCoordinatorResponse {
        /// Error (INVALID_GROUP_ID, COORDINATOR_NOT_AVAILABLE) or NONE.
        pub error_code: i16,
        /// The coordinator's node id.
        pub node_id: u32,
        /// Its advertised host.
        pub host: String,
        /// Its advertised native-protocol port.
        pub port: u16,
    }
}

wire_struct! {
    /// An assignor a member supports, with its subscription for that assignor.
    pub struct JoinProtocol {
        /// Assignor name ("range", "roundrobin", "cooperative-sticky").
        pub name: String,
        /// Subscription, opaque to the broker.
        pub metadata: Bytes,
    }
}

wire_struct! {
    /// JoinGroup request.
    pub struct JoinGroupRequest {
        /// The group.
        pub group_id: String,
        /// Empty for a new member, which gets MEMBER_ID_REQUIRED and its id, and joins again.
        pub member_id: String,
        /// The member is removed if not heard from for this long.
        pub session_timeout_ms: u32,
        /// How long a rebalance waits for members to rejoin.
        pub rebalance_timeout_ms: u32,
        /// "consumer" for consumers; every member of a group uses the same.
        pub protocol_type: String,
        /// Supported assignors, most preferred first.
        pub protocols: Vec<JoinProtocol>,
    }
}

wire_struct! {
    /// A member as the leader sees it.
    pub struct JoinMember {
        /// Member id.
        pub member_id: String,
        /// Its subscription for the chosen assignor.
        pub metadata: Bytes,
    }
}

wire_struct! {
    /// JoinGroup response, sent when the rebalance's join phase completes.
    pub struct JoinGroupResponse {
        /// Error or NONE.
        pub error_code: i16,
        /// The new generation (-1 on error).
        pub generation: i32,
        /// The assignor chosen for this generation.
        pub protocol_name: String,
        /// The leader's member id.
        pub leader: String,
        /// This member's id (also with MEMBER_ID_REQUIRED).
        pub member_id: String,
        /// Every member, for the leader only; empty for the others.
        pub members: Vec<JoinMember>,
    }
}

wire_struct! {
    /// One member's assignment, from the leader.
    pub struct SyncAssignment {
        /// Member id.
        pub member_id: String,
        /// Its assignment, opaque to the broker.
        pub assignment: Bytes,
    }
}

wire_struct! {
    /// SyncGroup request.
    pub struct SyncGroupRequest {
        /// The group.
        pub group_id: String,
        /// The generation the member joined.
        pub generation: i32,
        /// Member id.
        pub member_id: String,
        /// The leader's assignments for every member; empty from the others.
        pub assignments: Vec<SyncAssignment>,
    }
}

wire_struct! {
    /// SyncGroup response, sent once the leader's assignments arrived.
    pub struct SyncGroupResponse {
        /// Error or NONE.
        pub error_code: i16,
        /// This member's assignment.
        pub assignment: Bytes,
    }
}

wire_struct! {
    /// Heartbeat request.
    pub struct HeartbeatRequest {
        /// The group.
        pub group_id: String,
        /// The member's generation.
        pub generation: i32,
        /// Member id.
        pub member_id: String,
        /// Long poll: the broker holds the answer up to this long (at most half the session
        /// timeout) unless a rebalance begins, so members learn of one at once.
        pub max_wait_ms: u32,
    }
}

wire_struct! {
    /// Heartbeat response.
    pub struct HeartbeatResponse {
        /// NONE, or REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION / UNKNOWN_MEMBER_ID (rejoin).
        pub error_code: i16,
    }
}

wire_struct! {
    /// LeaveGroup request.
    pub struct LeaveGroupRequest {
        /// The group.
        pub group_id: String,
        /// Member id.
        pub member_id: String,
    }
}

wire_struct! {
    /// LeaveGroup response.
    pub struct LeaveGroupResponse {
        /// Error or NONE.
        pub error_code: i16,
    }
}

wire_struct! {
    /// A partition's offset to commit.
    pub struct CommitPartition {
        /// Partition index.
        pub partition: u32,
        /// The next offset to consume (one past the last processed record).
        pub offset: u64,
        /// Free-form text stored with the offset (at most 4096 bytes).
        pub metadata: String,
    }
}

wire_struct! {
    /// Offsets of one topic to commit.
    pub struct CommitTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<CommitPartition>,
    }
}

wire_struct! {
    /// OffsetCommit request.
    pub struct OffsetCommitRequest {
        /// The group.
        pub group_id: String,
        /// The member's generation, or -1 from outside the group (allowed while it has no
        /// members: tools resetting offsets).
        pub generation: i32,
        /// Member id, or empty from outside the group.
        pub member_id: String,
        /// Offsets by topic.
        pub topics: Vec<CommitTopic>,
    }
}

wire_struct! {
    /// The outcome for one partition.
    pub struct PartitionError {
        /// Partition index.
        pub partition: u32,
        /// Error or NONE.
        pub error_code: i16,
    }
}

wire_struct! {
    /// Outcomes for one topic.
    pub struct TopicPartitionErrors {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<PartitionError>,
    }
}

wire_struct! {
    /// OffsetCommit response.
    pub struct OffsetCommitResponse {
        /// By topic, in request order.
        pub topics: Vec<TopicPartitionErrors>,
    }
}

wire_struct! {
    /// Partitions of one topic whose committed offsets are wanted.
    pub struct OffsetFetchTopic {
        /// Topic name.
        pub name: String,
        /// Partition indexes.
        pub partitions: Vec<u32>,
    }
}

wire_struct! {
    /// OffsetFetch request.
    pub struct OffsetFetchRequest {
        /// The group.
        pub group_id: String,
        /// What to look up; empty means every committed offset of the group.
        pub topics: Vec<OffsetFetchTopic>,
    }
}

wire_struct! {
    /// A committed offset.
    pub struct FetchedOffset {
        /// Partition index.
        pub partition: u32,
        /// The committed offset, or -1 if none.
        pub offset: i64,
        /// Its metadata.
        pub metadata: String,
        /// Error or NONE.
        pub error_code: i16,
    }
}

wire_struct! {
    /// Committed offsets of one topic.
    pub struct FetchedOffsetTopic {
        /// Topic name.
        pub name: String,
        /// Its partitions.
        pub partitions: Vec<FetchedOffset>,
    }
}

wire_struct! {
    /// OffsetFetch response.
    pub struct OffsetFetchResponse {
        /// Group-level error or NONE.
        pub error_code: i16,
        /// By topic.
        pub topics: Vec<FetchedOffsetTopic>,
    }
}

wire_struct! {
    /// ListGroups request: no fields.
    pub struct ListGroupsRequest {}
}

wire_struct! {
    /// A group known to the coordinator.
    pub struct ListedGroup {
        /// Group id.
        pub group_id: String,
        /// "consumer" for consumer groups.
        pub protocol_type: String,
        /// Empty, PreparingRebalance, CompletingRebalance or Stable.
        pub state: String,
    }
}

wire_struct! {
    /// ListGroups response.
    pub struct ListGroupsResponse {
        /// Every group with members or committed offsets, by name.
        pub groups: Vec<ListedGroup>,
    }
}

wire_struct! {
    /// DescribeGroups request.
    pub struct DescribeGroupsRequest {
        /// Group ids.
        pub groups: Vec<String>,
    }
}

wire_struct! {
    /// A member of a described group.
    pub struct DescribedMember {
        /// Member id.
        pub member_id: String,
        /// The client id it connected with.
        pub client_id: String,
        /// Its subscription for the chosen assignor.
        pub metadata: Bytes,
        /// Its current assignment.
        pub assignment: Bytes,
    }
}

wire_struct! {
    /// A described group.
    pub struct DescribedGroup {
        /// Group id.
        pub group_id: String,
        /// Error or NONE.
        pub error_code: i16,
        /// Group state; "Dead" if the group is unknown.
        pub state: String,
        /// "consumer" for consumer groups.
        pub protocol_type: String,
        /// The chosen assignor.
        pub protocol: String,
        /// The current generation.
        pub generation: i32,
        /// Members.
        pub members: Vec<DescribedMember>,
    }
}

wire_struct! {
    /// DescribeGroups response.
    pub struct DescribeGroupsResponse {
        /// In request order.
        pub groups: Vec<DescribedGroup>,
    }
}

wire_struct! {
    /// DeleteGroups request.
    pub struct DeleteGroupsRequest {
        /// Group ids.
        pub groups: Vec<String>,
    }
}

wire_struct! {
    /// The outcome for one group.
    pub struct GroupResult {
        /// Group id.
        pub group_id: String,
        /// NONE, NON_EMPTY_GROUP or GROUP_ID_NOT_FOUND.
        pub error_code: i16,
    }
}

wire_struct! {
    /// DeleteGroups response.
    pub struct DeleteGroupsResponse {
        /// In request order.
        pub results: Vec<GroupResult>,
    }
}
