//! The broker's configuration: every limit named, with a default and a range, checked by
//! [`BrokerConfig::validate`]. Binaries fill it from flags, `CAIRN_*` env and a TOML file; the
//! library never reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cairn_protocol::limits::FRAME_BYTES_MAX;
use serde::{Deserialize, Serialize};

use crate::topic::TopicDefaults;

/// A role a node plays in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Leads and follows partitions, serves clients.
    Broker,
    /// A voter of the controller quorum.
    Controller,
}

impl std::str::FromStr for NodeRole {
    type Err = String;

    fn from_str(s: &str) -> Result<NodeRole, String> {
        match s.trim() {
            "broker" => Ok(NodeRole::Broker),
            "controller" => Ok(NodeRole::Controller),
            other => Err(format!("{other:?} is not a role (broker or controller)")),
        }
    }
}

/// Everything a broker needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where partitions and metadata live.
    pub data_dir: PathBuf,
    /// Native-protocol listener.
    pub listen: SocketAddr,
    /// HTTP listener for `/metrics`, `/health`, `/ready`; `None` disables it.
    pub http_listen: Option<SocketAddr>,
    /// Host and port clients are told to connect to (Metadata); defaults to `listen`.
    pub advertised: Option<String>,
    /// Kafka-protocol listener; `None` disables it.
    pub kafka_listen: Option<SocketAddr>,
    /// Host and port Kafka clients are told to connect to (Kafka's `advertised.listeners`);
    /// defaults to `kafka_listen`.
    pub kafka_advertised: Option<String>,
    /// This broker's node id.
    pub node_id: u32,
    /// The controller quorum's voters, `id@host:port,...` (Kafka's `controller.quorum.voters`).
    /// Empty: this node alone, a quorum of one with no controller listener. A node whose id is
    /// in the list is a controller too (combined); the others are brokers that follow it.
    pub controller_quorum: String,
    /// What this node is (Kafka's `process.roles`): `["broker"]`, `["controller"]` or both.
    /// Empty (the default): a controller too when its id is in `controller_quorum`, a broker
    /// always. A controller-only node keeps the metadata log and votes, but leads no partitions
    /// and serves no clients (dedicated controllers, as large Kafka clusters run them).
    pub roles: Vec<NodeRole>,
    /// Where this node's controller listens for its peers and for brokers (it must be its own
    /// address in `controller_quorum`); `None` with a quorum of one.
    pub controller_listen: Option<SocketAddr>,
    /// This broker's rack, for rack-aware replica placement.
    pub rack: Option<String>,
    /// PEM certificate chain: with `tls_key`, the native and Kafka listeners speak TLS (1.2 or
    /// 1.3) only. In a cluster, brokers fetch from each other over TLS too (`tls_ca`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: with it, clients must present a certificate it signed (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA certificates this broker trusts when it connects to other brokers' TLS listeners
    /// (replica fetches); required with TLS in a cluster of more than one node.
    pub tls_ca: Option<PathBuf>,
    /// A broker whose heartbeats stop for this long is fenced and its leaderships move; one that
    /// hears nothing from the controller for this long stops leading (Kafka
    /// `broker.session.timeout.ms`), in milliseconds.
    pub broker_session_timeout_ms: u64,
    /// How often a broker heartbeats to the active controller, in milliseconds (Kafka
    /// `broker.heartbeat.interval.ms`); at most a third of the session.
    pub broker_heartbeat_interval_ms: u64,
    /// A follower that has not caught up with its leader's log end for this long leaves the ISR
    /// (Kafka `replica.lag.time.max.ms`), in milliseconds.
    pub replica_lag_time_max_ms: u64,
    /// Longest a leader holds a follower's fetch when there is nothing new (Kafka
    /// `replica.fetch.wait.max.ms`), in milliseconds.
    pub replica_fetch_wait_max_ms: u64,
    /// Most bytes a follower fetches per partition in one fetch (at least one batch regardless;
    /// Kafka `replica.fetch.max.bytes`).
    pub replica_fetch_max_bytes: u32,
    /// Most bytes in one fetch response to a follower (Kafka
    /// `replica.fetch.response.max.bytes`); at most the protocol's fetch limit.
    pub replica_fetch_response_max_bytes: u32,
    /// Whether the controller moves leadership back to each partition's preferred replica once
    /// it is in sync again (Kafka `auto.leader.rebalance.enable`).
    pub auto_leader_rebalance_enable: bool,
    /// How often it does, in milliseconds (Kafka `leader.imbalance.check.interval.seconds`,
    /// 300 s there; 30 s here: a restarted Cairn broker catches up in seconds).
    pub leader_imbalance_check_interval_ms: u64,
    /// Largest frame on the controller wire (Raft entries and snapshot chunks).
    pub controller_frame_bytes_max: u32,
    /// Largest request frame accepted; a larger one closes the connection.
    pub frame_bytes_max: u32,
    /// Most open client connections; further ones are closed at once.
    pub connections_max: u32,
    /// Most requests one connection may have in flight before the broker stops reading from it.
    pub inflight_requests_per_connection_max: u32,
    /// Most request bytes held in memory across all connections before the broker stops
    /// reading requests (backpressure instead of allocation).
    pub inflight_bytes_max: u64,
    /// A connection with no request for this long is closed, in milliseconds (Kafka
    /// `connections.max.idle.ms`).
    pub connection_idle_timeout_ms: u64,
    /// A frame whose bytes started arriving must be complete within this, in milliseconds; a
    /// stalled frame (slow-loris) closes the connection.
    pub frame_read_timeout_ms: u64,
    /// Most partitions across all topics.
    pub partitions_max: u32,
    /// While less than this is available on the data directory's file system, appends are
    /// refused with KAFKA_STORAGE_ERROR (retriable) and nothing is written; 0 turns the guard
    /// off (Redpanda `storage_min_free_bytes`). See `disk.rs`.
    pub storage_min_free_bytes: u64,
    /// Partitions of the internal `__consumer_offsets` topic, fixed when it is first created
    /// (Kafka `offsets.topic.num.partitions`).
    pub offsets_topic_partitions: u32,
    /// A new group waits this long for more members before its first generation, in
    /// milliseconds (Kafka `group.initial.rebalance.delay.ms`).
    pub group_initial_rebalance_delay_ms: u64,
    /// Most consumer groups with members (or member ids handed out) at once; a JoinGroup for
    /// another group gets POLICY_VIOLATION.
    pub groups_max: u32,
    /// Most members (and member ids handed out) per group (Kafka `group.max.size`); a further
    /// JoinGroup gets GROUP_MAX_SIZE_REACHED.
    pub group_members_max: u32,
    /// Most bytes of subscriptions (every assignor's metadata) one member may send, and most
    /// bytes of one member's assignment; more: POLICY_VIOLATION (join) or INVALID_REQUEST (the
    /// leader's sync, and the group rebalances again).
    pub group_member_bytes_max: u32,
    /// Most bytes of subscriptions and assignments the coordinator keeps for all groups; joins
    /// that would go beyond get POLICY_VIOLATION.
    pub groups_bytes_max: u64,
    /// An idempotent producer that wrote nothing to a partition for this long is forgotten there,
    /// in milliseconds (Kafka `producer.id.expiration.ms`); it bounds the producer state kept.
    pub producer_id_expiration_ms: u64,
    /// Create a topic when a client asks for its metadata or produces to it.
    pub auto_create_topics: bool,
    /// Defaults for topic configs.
    pub topic_defaults: TopicDefaults,
    /// How often retention runs, in milliseconds (Kafka `log.retention.check.interval.ms`).
    pub retention_check_interval_ms: u64,
    /// How often compacted topics are compacted, in milliseconds (Kafka
    /// `log.cleaner.backoff.ms`); a pass reads every sealed segment of a compacted partition.
    pub compaction_interval_ms: u64,
    /// How often recovery points are checkpointed, in milliseconds.
    pub checkpoint_interval_ms: u64,
    /// How long shutdown waits for in-flight requests, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// A safety rule to break on purpose, for the test suite's negative controls; exists only
    /// in builds with the `negative-controls` feature.
    #[cfg(feature = "negative-controls")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negative_control: Option<crate::controls::NegativeControl>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("cairn-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9192)),
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9644))),
            advertised: None,
            kafka_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9092))),
            kafka_advertised: None,
            node_id: 1,
            controller_quorum: String::new(),
            roles: Vec::new(),
            controller_listen: None,
            rack: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_ca: None,
            broker_session_timeout_ms: 6_000,
            broker_heartbeat_interval_ms: 1_000,
            replica_lag_time_max_ms: 10_000,
            replica_fetch_wait_max_ms: 500,
            replica_fetch_max_bytes: 1 << 20,
            replica_fetch_response_max_bytes: 10 << 20,
            auto_leader_rebalance_enable: true,
            leader_imbalance_check_interval_ms: 30_000,
            controller_frame_bytes_max: 64 << 20,
            frame_bytes_max: 16 * 1024 * 1024,
            connections_max: 10_000,
            inflight_requests_per_connection_max: 64,
            inflight_bytes_max: 256 * 1024 * 1024,
            connection_idle_timeout_ms: 600_000,
            frame_read_timeout_ms: 30_000,
            partitions_max: 10_000,
            storage_min_free_bytes: 256 << 20,
            offsets_topic_partitions: 8,
            group_initial_rebalance_delay_ms: 3_000,
            groups_max: 10_000,
            group_members_max: 1_000,
            group_member_bytes_max: 1 << 20,
            groups_bytes_max: 256 << 20,
            producer_id_expiration_ms: 86_400_000,
            auto_create_topics: true,
            topic_defaults: TopicDefaults::default(),
            retention_check_interval_ms: 300_000,
            compaction_interval_ms: 15_000,
            checkpoint_interval_ms: 60_000,
            shutdown_timeout_ms: 10_000,
            #[cfg(feature = "negative-controls")]
            negative_control: None,
        }
    }
}

/// A configuration value that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A number outside its range.
    #[error(transparent)]
    Limit(#[from] cairn_protocol::limits::LimitError),
    /// A value that does not parse or does not fit the others.
    #[error("{field}: {why}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl BrokerConfig {
    /// The negative control this broker runs with (always `None` without the feature).
    pub fn negative_control(&self) -> Option<crate::controls::NegativeControl> {
        #[cfg(feature = "negative-controls")]
        {
            self.negative_control
        }
        #[cfg(not(feature = "negative-controls"))]
        {
            None
        }
    }

    /// Checks every limit, topic defaults included.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = cairn_protocol::limits::check_limit;
        check(
            "frame_bytes_max",
            self.frame_bytes_max.into(),
            1024,
            FRAME_BYTES_MAX.into(),
        )?;
        check("connections_max", self.connections_max.into(), 1, 1_000_000)?;
        check(
            "inflight_requests_per_connection_max",
            self.inflight_requests_per_connection_max.into(),
            1,
            10_000,
        )?;
        check(
            "inflight_bytes_max",
            self.inflight_bytes_max,
            self.frame_bytes_max.into(),
            1 << 40,
        )?;
        check("partitions_max", self.partitions_max.into(), 1, 1_000_000)?;
        check(
            "group_initial_rebalance_delay_ms",
            self.group_initial_rebalance_delay_ms,
            0,
            300_000,
        )?;
        check("groups_max", self.groups_max.into(), 1, 1_000_000)?;
        check(
            "group_members_max",
            self.group_members_max.into(),
            1,
            100_000,
        )?;
        check(
            "group_member_bytes_max",
            self.group_member_bytes_max.into(),
            1_024,
            self.frame_bytes_max.into(),
        )?;
        check(
            "groups_bytes_max",
            self.groups_bytes_max,
            self.group_member_bytes_max.into(),
            1 << 40,
        )?;
        check(
            "offsets_topic_partitions",
            self.offsets_topic_partitions.into(),
            1,
            1_000,
        )?;
        check(
            "producer_id_expiration_ms",
            self.producer_id_expiration_ms,
            1_000,
            30 * 86_400_000,
        )?;
        check(
            "connection_idle_timeout_ms",
            self.connection_idle_timeout_ms,
            100,
            86_400_000,
        )?;
        check(
            "frame_read_timeout_ms",
            self.frame_read_timeout_ms,
            100,
            3_600_000,
        )?;
        check(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
            10,
            86_400_000,
        )?;
        check(
            "compaction_interval_ms",
            self.compaction_interval_ms,
            10,
            86_400_000,
        )?;
        check(
            "checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            10,
            86_400_000,
        )?;
        check(
            "shutdown_timeout_ms",
            self.shutdown_timeout_ms,
            0,
            3_600_000,
        )?;
        check(
            "broker_session_timeout_ms",
            self.broker_session_timeout_ms,
            500,
            600_000,
        )?;
        check(
            "broker_heartbeat_interval_ms",
            self.broker_heartbeat_interval_ms,
            50,
            self.broker_session_timeout_ms / 3,
        )?;
        check(
            "leader_imbalance_check_interval_ms",
            self.leader_imbalance_check_interval_ms,
            100,
            86_400_000,
        )?;
        check(
            "replica_lag_time_max_ms",
            self.replica_lag_time_max_ms,
            100,
            3_600_000,
        )?;
        check(
            "replica_fetch_wait_max_ms",
            self.replica_fetch_wait_max_ms,
            1,
            60_000,
        )?;
        check(
            "replica_fetch_max_bytes",
            self.replica_fetch_max_bytes.into(),
            1024,
            self.replica_fetch_response_max_bytes.into(),
        )?;
        check(
            "replica_fetch_response_max_bytes",
            self.replica_fetch_response_max_bytes.into(),
            1024,
            cairn_protocol::limits::FETCH_BYTES_MAX.into(),
        )?;
        check(
            "controller_frame_bytes_max",
            self.controller_frame_bytes_max.into(),
            1 << 20,
            1 << 30,
        )?;
        let voters = self.voters().map_err(|why| ConfigError::Invalid {
            field: "controller_quorum",
            why,
        })?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "tls_key",
                    why: "tls_cert needs its key".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "tls_cert",
                    why: "tls_key needs its certificate".into(),
                });
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(ConfigError::Invalid {
                    field: "tls_client_ca",
                    why: "client certificates need TLS: set tls_cert and tls_key".into(),
                });
            }
            (Some(_), Some(_)) if voters.len() > 1 && self.tls_ca.is_none() => {
                return Err(ConfigError::Invalid {
                    field: "tls_ca",
                    why: "in a cluster with TLS listeners, brokers fetch from each other over \
                          TLS: set tls_ca to the CA that signed their certificates"
                        .into(),
                });
            }
            _ => {}
        }
        let voter = voters.contains_key(&self.node_id);
        let says_controller = self.roles.contains(&NodeRole::Controller);
        if !self.roles.is_empty() && voter != says_controller {
            return Err(ConfigError::Invalid {
                field: "roles",
                why: if voter {
                    format!(
                        "node {} is a voter in controller_quorum: its roles must include controller",
                        self.node_id
                    )
                } else {
                    format!(
                        "node {} has the controller role but is not in controller_quorum",
                        self.node_id
                    )
                },
            });
        }
        if !self.is_broker() && self.controller_listen.is_none() {
            return Err(ConfigError::Invalid {
                field: "controller_listen",
                why: format!(
                    "node {} is a controller only: brokers reach it at its controller listener",
                    self.node_id
                ),
            });
        }
        if voters.len() > 1 && voter && self.controller_listen.is_none() {
            return Err(ConfigError::Invalid {
                field: "controller_listen",
                why: format!(
                    "node {} is a voter of a quorum of {}: it needs a controller listener",
                    self.node_id,
                    voters.len()
                ),
            });
        }
        self.topic_defaults.validate()
    }

    /// The voters of the controller quorum, id to `host:port`; a quorum of one (this node, no
    /// address) when `controller_quorum` is empty.
    pub fn voters(&self) -> Result<BTreeMap<u32, String>, String> {
        let text = self.controller_quorum.trim();
        if text.is_empty() {
            return Ok(BTreeMap::from([(self.node_id, String::new())]));
        }
        let mut voters = BTreeMap::new();
        for voter in text.split(',') {
            let (id, addr) = voter
                .trim()
                .split_once('@')
                .ok_or_else(|| format!("{voter:?} is not ID@HOST:PORT"))?;
            let id: u32 = id
                .parse()
                .map_err(|_| format!("{id:?} in {voter:?} is not a node id"))?;
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(format!("{addr:?} in {voter:?} is not HOST:PORT"));
            }
            if voters.insert(id, addr.to_string()).is_some() {
                return Err(format!("node {id} is listed twice"));
            }
        }
        Ok(voters)
    }

    /// Whether this node is a voter of the controller quorum.
    pub fn is_controller(&self) -> bool {
        self.voters()
            .map(|v| v.contains_key(&self.node_id))
            .unwrap_or(false)
    }

    /// Whether this node is a broker (every node is, unless `roles` says otherwise).
    pub fn is_broker(&self) -> bool {
        self.roles.is_empty() || self.roles.contains(&NodeRole::Broker)
    }

    /// `retention_check_interval_ms` as a duration.
    pub fn retention_check_interval(&self) -> Duration {
        Duration::from_millis(self.retention_check_interval_ms)
    }

    /// `checkpoint_interval_ms` as a duration.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(self.checkpoint_interval_ms)
    }

    /// `shutdown_timeout_ms` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u32, quorum: &str, roles: &[NodeRole], listen: bool) -> BrokerConfig {
        BrokerConfig {
            node_id: id,
            controller_quorum: quorum.into(),
            roles: roles.to_vec(),
            controller_listen: listen.then(|| SocketAddr::from(([127, 0, 0, 1], 9093))),
            ..BrokerConfig::default()
        }
    }

    fn invalid_field(config: &BrokerConfig) -> Option<&'static str> {
        match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn roles_follow_the_quorum_unless_set() {
        let quorum = "1@127.0.0.1:9093,2@127.0.0.1:9094,3@127.0.0.1:9095";
        let combined = node(1, quorum, &[], true);
        assert!(combined.validate().is_ok());
        assert!(combined.is_controller() && combined.is_broker());
        let follower = node(4, quorum, &[], false);
        assert!(follower.validate().is_ok());
        assert!(!follower.is_controller() && follower.is_broker());
        let dedicated = node(2, quorum, &[NodeRole::Controller], true);
        assert!(dedicated.validate().is_ok());
        assert!(dedicated.is_controller() && !dedicated.is_broker());
        // A voter must say it is a controller; a controller must be a voter.
        assert_eq!(
            invalid_field(&node(1, quorum, &[NodeRole::Broker], true)),
            Some("roles")
        );
        assert_eq!(
            invalid_field(&node(4, quorum, &[NodeRole::Controller], true)),
            Some("roles")
        );
        // Voters of a real quorum, and controller-only nodes, need a controller listener.
        assert_eq!(
            invalid_field(&node(1, quorum, &[], false)),
            Some("controller_listen")
        );
        assert_eq!(
            invalid_field(&node(1, "", &[NodeRole::Controller], false)),
            Some("controller_listen")
        );
        // The zero-configuration default: a quorum of one, combined.
        let alone = BrokerConfig::default();
        assert!(alone.validate().is_ok());
        assert!(alone.is_controller() && alone.is_broker());
    }

    #[test]
    fn quorum_text_is_checked() {
        for bad in ["1@nohost", "x@127.0.0.1:1", "1@a:1,1@b:2", "127.0.0.1:9093"] {
            assert_eq!(
                invalid_field(&node(1, bad, &[], true)),
                Some("controller_quorum"),
                "{bad}"
            );
        }
        let roles: Result<Vec<NodeRole>, _> =
            "broker, controller".split(',').map(str::parse).collect();
        assert_eq!(roles, Ok(vec![NodeRole::Broker, NodeRole::Controller]));
        assert!("leader".parse::<NodeRole>().is_err());
        let parsed: BrokerConfig = serde_json::from_str(r#"{"roles": ["controller"]}"#).unwrap();
        assert_eq!(parsed.roles, [NodeRole::Controller]);
    }
}
