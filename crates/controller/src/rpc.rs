//! The controller's wire: length-prefixed frames (a big-endian `u32`, then JSON) over TCP,
//! carrying Raft's RPCs between controllers and the brokers' commands to the active controller.
//! Every frame length is checked against `frame_bytes_max` before anything is allocated; a peer
//! that breaks the framing is disconnected.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::image::{MetadataImage, Rejected};
use crate::raft::TypeConfig;
use crate::records::{BrokerInfo, NodeId};

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Replicas per partition; `None`: `min(3, live brokers)`.
    pub replication_factor: Option<u16>,
    /// Config overrides (checked by the broker that took the request).
    pub config: BTreeMap<String, String>,
}

/// What a broker asks of the active controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register (again, as a new incarnation): answered with the broker epoch.
    Register(BrokerInfo),
    /// I am alive, and have applied the metadata up to `metadata_offset`.
    Heartbeat {
        /// The broker.
        node_id: NodeId,
        /// Its registration.
        broker_epoch: u64,
        /// Its image's offset.
        metadata_offset: u64,
        /// It is shutting down: move its leaderships away now.
        shutting_down: bool,
        /// It cannot write (its data directory is below `storage_min_free_bytes`, or an I/O
        /// error poisoned one of its logs): fence it and
        /// move its leaderships away, and keep it fenced while it asks (Kafka's BrokerHeartbeat
        /// `WantFence`). Absent from older brokers' heartbeats: false.
        #[serde(default)]
        want_fence: bool,
    },
    /// Create topics (each on its own: one may fail while another is created).
    CreateTopics {
        /// The topics.
        topics: Vec<TopicSpec>,
        /// Check only.
        validate_only: bool,
    },
    /// Delete topics.
    DeleteTopics {
        /// Names.
        names: Vec<String>,
    },
    /// Grow a topic to `count` partitions.
    CreatePartitions {
        /// The topic.
        topic: String,
        /// The new total.
        count: u32,
        /// Check only.
        validate_only: bool,
    },
    /// A block of producer ids for `node_id`.
    AllocateProducerIds {
        /// The broker.
        node_id: NodeId,
    },
    /// Leader elections an operator asked for (Kafka's ElectLeaders): the preferred replica
    /// where it is live and in sync, or (unclean) any live replica for partitions with no leader.
    ElectLeaders {
        /// Unclean (any live replica, for offline partitions) rather than preferred.
        unclean: bool,
        /// The partitions; `None`: every partition.
        partitions: Option<Vec<(String, u32)>>,
    },
    /// Start (replicas given) or cancel (`None`) partition reassignments (Kafka's
    /// AlterPartitionReassignments, KIP-455).
    AlterPartitionReassignments {
        /// (topic, partition, target replicas or `None` to cancel).
        reassignments: Vec<(String, u32, Option<Vec<NodeId>>)>,
    },
    /// A partition leader's ISR change (Kafka's AlterPartition): applied only if the leader and
    /// both epochs are still current, and every replica joining the ISR is a live broker.
    AlterPartition {
        /// The leader asking.
        node_id: NodeId,
        /// Its registration.
        broker_epoch: u64,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The leader epoch the change was decided in.
        leader_epoch: u32,
        /// The partition epoch it was decided on.
        partition_epoch: u32,
        /// The new ISR.
        isr: Vec<NodeId>,
    },
}

/// Where a created topic landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicCreated {
    /// Partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: u16,
}

/// The active controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Registered with this broker epoch.
    Registered {
        /// The epoch.
        broker_epoch: u64,
    },
    /// A heartbeat's answer.
    Heartbeat {
        /// Whether the broker is (still) fenced.
        fenced: bool,
    },
    /// Per topic, in request order.
    Topics(Vec<(String, Result<TopicCreated, Rejected>)>),
    /// Per topic, in request order.
    Deleted(Vec<(String, Result<(), Rejected>)>),
    /// Partitions created (or would be).
    PartitionsCreated,
    /// Per partition asked for (or, for all, per partition that was elected or failed), in
    /// order: what happened.
    Elected(Vec<(String, u32, Result<(), Rejected>)>),
    /// Per reassignment asked for, in order: whether it started (or was cancelled).
    Reassignments(Vec<(String, u32, Result<(), Rejected>)>),
    /// The partition's state after an AlterPartition.
    PartitionChanged {
        /// Its new partition epoch.
        partition_epoch: u32,
    },
    /// A block of producer ids.
    ProducerIds {
        /// The first.
        first: i64,
        /// How many.
        count: u32,
    },
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// This node is not the active controller; the leader, if known (id, address).
    #[error("not the active controller (leader: {leader:?})")]
    NotController {
        /// The active controller, if this node knows it.
        leader: Option<(NodeId, String)>,
    },
    /// The command was refused.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The quorum could not commit it.
    #[error("the controller quorum is unavailable: {0}")]
    Unavailable(String),
}

/// The Raft and quorum view of one controller, for `cairn cluster status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumStatus {
    /// The node answering.
    pub node_id: NodeId,
    /// The active controller, if known.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// The last log index.
    pub last_log_index: Option<u64>,
    /// The committed index.
    pub committed: Option<u64>,
    /// The applied metadata offset.
    pub applied_offset: u64,
    /// Voters, with how far each has replicated (known on the leader only).
    pub voters: Vec<(NodeId, Option<u64>)>,
}

/// A request frame.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Raft: replicate entries.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft: ask for a vote.
    Vote(VoteRequest<u64>),
    /// Raft: a snapshot chunk.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A broker's command.
    Command(Command),
    /// The image, once its offset passes `after` (long poll up to `max_wait_ms`).
    FetchMetadata {
        /// The asker's offset.
        after: u64,
        /// Longest wait.
        max_wait_ms: u64,
    },
    /// The quorum's state.
    DescribeQuorum,
}

/// A response frame.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Response {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// To `Command`: the reply and the active controller's metadata offset after it (the asker
    /// waits until its own image has reached it: it reads its own writes).
    Command(Result<(Reply, u64), CommandError>),
    /// To `FetchMetadata`: the image if it moved past the asker's offset.
    Metadata(Option<MetadataImage>),
    /// To `DescribeQuorum`.
    Quorum(QuorumStatus),
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Connecting, reading or writing failed.
    #[error("controller connection to {addr}: {source}")]
    Io {
        /// The peer.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("controller call to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The peer.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// The peer sent something that is not an answer.
    #[error("controller peer {addr} sent a malformed frame: {why}")]
    Malformed {
        /// The peer.
        addr: String,
        /// What was wrong.
        why: String,
    },
}

/// Bytes a frame's buffer starts with; it grows only as bytes arrive, so a length claimed by a
/// peer that then sends nothing costs nothing.
const FRAME_BUFFER_START: usize = 64 * 1024;

/// Reads one frame, refusing lengths above `max` before reading the body. Waiting for a frame
/// may take any time (an idle connection); once its first byte has arrived the whole frame must
/// arrive within `stall` (a peer that stalls mid-frame, or trickles it, is cut off instead of holding a
/// connection and a buffer). The body's buffer grows as bytes arrive, never to a claimed length.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut (impl AsyncReadExt + Unpin),
    max: u32,
    stall: Duration,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    if stream.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    let body = async {
        stream.read_exact(&mut len[1..]).await?;
        let len = u32::from_be_bytes(len);
        if len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds {max}"),
            ));
        }
        let mut buf = Vec::with_capacity((len as usize).min(FRAME_BUFFER_START));
        (&mut *stream)
            .take(u64::from(len))
            .read_to_end(&mut buf)
            .await?;
        if buf.len() != len as usize {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    };
    let buf = tokio::time::timeout(stall, body).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a frame did not complete within {stall:?}"),
        )
    })??;
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    stream: &mut (impl AsyncWriteExt + Unpin),
    value: &T,
    max: u32,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len <= max)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds {max}", body.len()),
            )
        })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// One connection to a controller, opened on first use and again after any failure; calls go
/// one at a time.
#[derive(Debug)]
pub struct RpcClient {
    addr: String,
    frame_bytes_max: u32,
    conn: tokio::sync::Mutex<Option<TcpStream>>,
}

impl RpcClient {
    /// A client of the controller at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>, frame_bytes_max: u32) -> RpcClient {
        RpcClient {
            addr: addr.into(),
            frame_bytes_max,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends `request` and waits up to `timeout` for its response.
    pub async fn call(&self, request: &Request, timeout: Duration) -> Result<Response, RpcError> {
        let mut conn = self.conn.lock().await;
        let io = |source| RpcError::Io {
            addr: self.addr.clone(),
            source,
        };
        let attempt = async {
            if conn.is_none() {
                let stream = TcpStream::connect(&self.addr).await.map_err(io)?;
                stream.set_nodelay(true).map_err(io)?;
                *conn = Some(stream);
            }
            let Some(stream) = conn.as_mut() else {
                return Err(io(std::io::ErrorKind::NotConnected.into()));
            };
            write_frame(stream, request, self.frame_bytes_max)
                .await
                .map_err(io)?;
            match read_frame(stream, self.frame_bytes_max, timeout).await {
                Ok(Some(response)) => Ok(response),
                Ok(None) => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
                Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                    Err(RpcError::Malformed {
                        addr: self.addr.clone(),
                        why: err.to_string(),
                    })
                }
                Err(err) => Err(io(err)),
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::Timeout {
                addr: self.addr.clone(),
                timeout,
            }),
        };
        if result.is_err() {
            // A half-done exchange leaves the stream out of step: start afresh next time.
            *conn = None;
        }
        result
    }
}
