//! Async clients for Cairn's native protocol: [`Producer`], [`Consumer`] and [`Admin`].
//!
//! ```no_run
//! use cairn_client::{Admin, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord};
//!
//! # async fn run() -> Result<(), cairn_client::ClientError> {
//! let admin = Admin::connect("127.0.0.1:9192").await?;
//! admin.create_topic("orders", 3, &[]).await?;
//!
//! let producer = Producer::connect("127.0.0.1:9192", ProducerConfig::default()).await?;
//! let delivery = producer.send(ProducerRecord::new("orders", "order #1").key("customer-7")).await?;
//! let metadata = delivery.await?;
//! println!("stored at {}-{} offset {:?}", metadata.topic, metadata.partition, metadata.offset);
//! producer.close().await?;
//!
//! let mut consumer = Consumer::connect("127.0.0.1:9192", ConsumerConfig::default()).await?;
//! consumer.assign("orders", None, Position::Earliest).await?;
//! for record in consumer.poll().await? {
//!     println!("{}-{}@{}: {:?}", record.topic, record.partition, record.offset, record.value);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod admin;
mod cluster;
mod connection;
mod consumer;
mod error;
mod group;
mod partitioner;
mod producer;
mod tls;

pub use admin::{
    Admin, CommittedOffset, GroupInfo, PartitionInfo, TopicInfo, TopicPartitionReplicas,
};
pub use cairn_protocol::batch::Compression;
pub use cairn_protocol::native::ErrorCode;
pub use cluster::{Cluster, Connector, Route, tcp_connector};
pub use connection::{Connection, Dialect, Reply, Transport};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, Position};
pub use error::ClientError;
pub use group::assignor::{Assignment, Assignor, Subscription, TopicPartition};
pub use group::{GroupConfig, GroupConsumer, Rebalance};
pub use partitioner::{Partitioner, murmur2, partition_for_key};
pub use producer::{
    Acks, BatchFuture, BatchMetadata, BatchRecord, DeliveryFuture, IntoTopic, Producer,
    ProducerConfig, ProducerRecord, RecordMetadata,
};
pub use tls::{ClientTls, pem};
