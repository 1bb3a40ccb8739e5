//! Cairn's controller: the cluster metadata as a replicated log of records (KRaft's idea) on a
//! Raft quorum (openraft). Committed proposals are applied, in log order, into an immutable
//! [`MetadataImage`] that every node publishes as a feed; brokers act on the image (open the
//! partitions they host, lead the ones they lead) and report the offset they applied.
//!
//! - [`records`]: the records and proposals; [`image`]: the image and the deterministic apply.
//! - [`placement`]: replica placement and leader elections, pure; [`decide`]: the records the
//!   active controller commits for registrations, fencing and ISR changes, pure.
//! - [`raft`]: openraft's log storage and state machine, over a [`RaftStore`] the broker
//!   implements on the storage engine (this crate never depends on storage).
//! - [`node`]: a voter: Raft, the controller wire, and the active controller's duties (commands,
//!   heartbeats, fencing). [`client`]: a broker's handle on the quorum.
//! - [`rpc`], [`network`]: the controller wire (length-prefixed JSON frames over TCP).
//!
//! ```
//! use cairn_controller::image::MetadataImage;
//! use cairn_controller::records::{MetadataRecord, PartitionState, Proposal};
//!
//! let mut image = MetadataImage::default();
//! let create = MetadataRecord::TopicCreated {
//!     name: "orders".into(),
//!     config: Default::default(),
//!     created_ms: 0,
//!     partitions: vec![PartitionState::new(vec![1], Some(1))],
//! };
//! image.apply(0, &Proposal { records: vec![create.clone()] }).unwrap();
//! assert_eq!(image.offset, 1);
//! // The same record again is refused, and changes nothing but the offset.
//! assert!(image.apply(1, &Proposal { records: vec![create] }).is_err());
//! assert_eq!(image.topics.len(), 1);
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod client;
pub mod decide;
pub mod image;
pub mod network;
pub mod node;
pub mod placement;
pub mod raft;
pub mod records;
pub mod rpc;
pub mod store;

pub use client::ControllerClient;
pub use image::{BrokerState, MetadataImage, Rejected, TopicImage};
pub use node::{ControllerConfig, ControllerNode, StartError};
pub use records::{BrokerInfo, Endpoint, MetadataRecord, NodeId, PartitionState, Proposal};
pub use rpc::{Command, CommandError, QuorumStatus, Reply, TopicSpec};
pub use store::{MemStore, RaftStore};
