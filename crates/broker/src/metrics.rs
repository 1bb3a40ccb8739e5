//! Prometheus metrics, with the names operators know from Kafka exporters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use cairn_controller::{ControllerNode, MetadataImage};

use crate::handler::Handler;

/// Every metric of the broker.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct Metrics {
    pub registry: Registry,
    pub bytes_in: IntCounterVec,
    pub records_in: IntCounterVec,
    pub bytes_out: IntCounterVec,
    pub records_out: IntCounterVec,
    pub requests: IntCounterVec,
    pub request_errors: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub connections: IntGauge,
    pub connections_rejected: IntCounter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshakes_failed: IntCounter,
    pub duplicate_batches: IntCounter,
    /// Record bytes sent to followers.
    pub replica_fetch_bytes: IntCounter,
    pub compaction_bytes_removed: IntCounter,
    pub compaction_records_removed: IntCounter,
    pub fsync_seconds: Histogram,
    pub log_start_offset: IntGaugeVec,
    pub log_end_offset: IntGaugeVec,
    pub log_size_bytes: IntGaugeVec,
    pub log_segments: IntGaugeVec,
    pub under_replicated_partitions: IntGauge,
    pub under_min_isr_partitions: IntGauge,
    pub offline_partitions: IntGauge,
    pub isr_shrinks: IntCounter,
    pub isr_expands: IntCounter,
    pub replica_max_lag: IntGauge,
    pub replica_max_lag_seconds: prometheus::Gauge,
    /// Record bytes this broker fetched as a follower.
    pub follower_fetch_bytes: IntCounter,
    pub group_lag: IntGaugeVec,
    pub group_members: IntGaugeVec,
    pub group_generation: IntGaugeVec,
    /// Completed rebalances, all groups.
    pub group_rebalances: IntCounter,
    pub cluster: ClusterMetrics,
    /// One render at a time: a render resets gauges and tops counters up to a total, which two
    /// concurrent scrapes would interleave (a reset under another's encoding, a double top-up).
    render_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// The metadata and controller metrics: a broker's and a controller-only node's.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub struct ClusterMetrics {
    pub metadata_applied_offset: IntGauge,
    pub controller_active: IntGauge,
    pub raft_term: IntGauge,
    pub raft_commit_index: IntGauge,
    pub fenced_brokers: IntGauge,
    pub offline_partitions: IntGauge,
    pub leader_elections: IntCounter,
    pub unclean_leader_elections: IntCounter,
    /// One update at a time (the election counter is topped up to the image's total).
    update_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let metric = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let bytes_in = counter_vec(
            "cairn_topic_bytes_in_total",
            "Record batch bytes appended, by topic.",
            &["topic"],
        )?;
        let records_in = counter_vec(
            "cairn_topic_messages_in_total",
            "Records appended, by topic.",
            &["topic"],
        )?;
        let bytes_out = counter_vec(
            "cairn_topic_bytes_out_total",
            "Record batch bytes fetched, by topic.",
            &["topic"],
        )?;
        let records_out = counter_vec(
            "cairn_topic_messages_out_total",
            "Records fetched, by topic.",
            &["topic"],
        )?;
        let requests = counter_vec(
            "cairn_requests_total",
            "Requests handled, by API.",
            &["api"],
        )?;
        let request_errors = counter_vec(
            "cairn_request_errors_total",
            "Errors returned, by API and error.",
            &["api", "error"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cairn_request_duration_seconds",
                "Time from reading a request to its response, by API.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        )?;
        registry.register(Box::new(request_seconds.clone()))?;
        let connections = IntGauge::new("cairn_connections_active", "Open client connections.")?;
        registry.register(Box::new(connections.clone()))?;
        let connections_rejected = IntCounter::new(
            "cairn_connections_rejected_total",
            "Connections closed at once because connections_max was reached.",
        )?;
        registry.register(Box::new(connections_rejected.clone()))?;
        let tls_handshakes_failed = IntCounter::new(
            "cairn_tls_handshakes_failed_total",
            "TLS handshakes on the native and Kafka listeners that failed or timed out.",
        )?;
        registry.register(Box::new(tls_handshakes_failed.clone()))?;
        let duplicate_batches = IntCounter::new(
            "cairn_producer_duplicate_batches_total",
            "Idempotent producers' retried batches answered with their original offsets, not written again.",
        )?;
        registry.register(Box::new(duplicate_batches.clone()))?;
        let replica_fetch_bytes = IntCounter::new(
            "cairn_replica_fetch_bytes_total",
            "Record bytes this broker sent to its followers (leader side of replication).",
        )?;
        registry.register(Box::new(replica_fetch_bytes.clone()))?;
        let compaction_bytes_removed = IntCounter::new(
            "cairn_log_cleaner_bytes_removed_total",
            "Bytes compaction removed from compacted topics.",
        )?;
        registry.register(Box::new(compaction_bytes_removed.clone()))?;
        let compaction_records_removed = IntCounter::new(
            "cairn_log_cleaner_records_removed_total",
            "Superseded records and expired tombstones compaction removed.",
        )?;
        registry.register(Box::new(compaction_records_removed.clone()))?;
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cairn_log_flush_duration_seconds",
                "Time of flushes requested by acks=all produces.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(fsync_seconds.clone()))?;
        let labels = &["topic", "partition"];
        let log_start_offset = gauge_vec(
            "cairn_partition_log_start_offset",
            "First offset of the partition.",
            labels,
        )?;
        let log_end_offset = gauge_vec(
            "cairn_partition_log_end_offset",
            "Next offset of the partition.",
            labels,
        )?;
        let log_size_bytes = gauge_vec(
            "cairn_partition_size_bytes",
            "Bytes of the partition's segments.",
            labels,
        )?;
        let log_segments = gauge_vec(
            "cairn_partition_segments",
            "Segment files of the partition.",
            labels,
        )?;
        let under_replicated_partitions = IntGauge::new(
            "cairn_under_replicated_partitions",
            "Partitions with fewer in-sync replicas than replicas.",
        )?;
        registry.register(Box::new(under_replicated_partitions.clone()))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let under_min_isr_partitions = gauge(
            "cairn_under_min_isr_partitions",
            "Partitions this broker leads whose ISR is smaller than min.insync.replicas (acks=all writes are refused).",
        )?;
        let offline_partitions = gauge(
            "cairn_offline_partitions",
            "Partitions of the cluster without a leader, as this broker's metadata says.",
        )?;
        let isr_shrinks = counter(
            "cairn_isr_shrinks_total",
            "ISR shrinks this broker's leaderships committed (a follower fell behind).",
        )?;
        let isr_expands = counter(
            "cairn_isr_expands_total",
            "ISR expansions this broker's leaderships committed (a follower caught up).",
        )?;
        let replica_max_lag = gauge(
            "cairn_replica_max_lag",
            "The largest lag, in offsets, of a follower behind a partition this broker leads.",
        )?;
        let replica_max_lag_seconds = prometheus::Gauge::new(
            "cairn_replica_max_lag_seconds",
            "The longest time a follower of a partition this broker leads has not been caught up.",
        )?;
        registry.register(Box::new(replica_max_lag_seconds.clone()))?;
        let follower_fetch_bytes = counter(
            "cairn_follower_fetch_bytes_total",
            "Record bytes this broker copied from leaders as a follower.",
        )?;
        let group_lag = gauge_vec(
            "cairn_consumergroup_lag",
            "Log end offset minus the group's committed offset (Kafka exporters' kafka_consumergroup_lag).",
            &["group", "topic", "partition"],
        )?;
        let group_members = gauge_vec(
            "cairn_consumergroup_members",
            "Members of the group.",
            &["group"],
        )?;
        let group_generation = gauge_vec(
            "cairn_consumergroup_generation",
            "The group's generation: it grows by one per completed rebalance.",
            &["group"],
        )?;
        let group_rebalances = IntCounter::new(
            "cairn_consumergroup_rebalances_total",
            "Completed group rebalances (join phases that handed out a new generation), all groups.",
        )?;
        registry.register(Box::new(group_rebalances.clone()))?;
        let cluster = ClusterMetrics::new(&registry)?;
        Ok(Metrics {
            registry,
            bytes_in,
            records_in,
            bytes_out,
            records_out,
            requests,
            request_errors,
            request_seconds,
            connections,
            connections_rejected,
            tls_handshakes_failed,
            duplicate_batches,
            replica_fetch_bytes,
            compaction_bytes_removed,
            compaction_records_removed,
            fsync_seconds,
            log_start_offset,
            log_end_offset,
            log_size_bytes,
            log_segments,
            under_replicated_partitions,
            under_min_isr_partitions,
            offline_partitions,
            isr_shrinks,
            isr_expands,
            replica_max_lag,
            replica_max_lag_seconds,
            follower_fetch_bytes,
            group_lag,
            group_members,
            group_generation,
            group_rebalances,
            cluster,
            render_lock: Default::default(),
        })
    }

    /// Counts a request that ended with `code` (nothing for NONE), under an API label.
    pub fn count_error(&self, api: &str, code: cairn_protocol::native::ErrorCode) {
        if code != cairn_protocol::native::ErrorCode::NONE {
            self.request_errors
                .with_label_values(&[api, code.name()])
                .inc();
        }
    }

    /// The text exposition of every metric, partition, group and cluster gauges refreshed from
    /// the broker's state.
    pub(crate) fn render(&self, handler: &Handler) -> String {
        let _one = self
            .render_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (manager, offsets, groups) = (&handler.manager, &handler.offsets, &handler.groups);
        self.render_cluster(handler);
        self.group_lag.reset();
        self.group_members.reset();
        self.group_generation.reset();
        for group in offsets.groups() {
            for ((topic, partition), committed) in offsets.fetch_all(&group) {
                let Some(p) = manager.partition(&topic, partition) else {
                    continue;
                };
                let end = p.log_end_offset().0 as i64;
                let index = partition.to_string();
                self.group_lag
                    .with_label_values(&[group.as_str(), topic.as_str(), index.as_str()])
                    .set((end - committed.offset).max(0));
            }
        }
        self.group_rebalances.inc_by(
            groups
                .rebalances()
                .saturating_sub(self.group_rebalances.get()),
        );
        for (group, _, _) in groups.list() {
            if let Some(info) = groups.describe(&group) {
                self.group_members
                    .with_label_values(&[group.as_str()])
                    .set(info.members.len() as i64);
                self.group_generation
                    .with_label_values(&[group.as_str()])
                    .set(i64::from(info.generation));
            }
        }
        self.log_start_offset.reset();
        self.log_end_offset.reset();
        self.log_size_bytes.reset();
        self.log_segments.reset();
        for topic in manager.topics() {
            for partition in topic.local() {
                let index = partition.index().to_string();
                let labels = [&*topic.name, index.as_str()];
                let log = partition.log();
                self.log_start_offset
                    .with_label_values(&labels)
                    .set(log.log_start_offset().0 as i64);
                self.log_end_offset
                    .with_label_values(&labels)
                    .set(log.log_end_offset().0 as i64);
                self.log_size_bytes
                    .with_label_values(&labels)
                    .set(log.size_bytes() as i64);
                self.log_segments
                    .with_label_values(&labels)
                    .set(log.n_segments() as i64);
            }
        }
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %err, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// This broker's under-replicated and under-min-ISR partitions (those it leads with a
    /// replica out of the ISR, or fewer in sync than min.insync.replicas), its followers' largest
    /// lag, and the cluster gauges.
    fn render_cluster(&self, handler: &Handler) {
        let image = handler.manager.image();
        let node = handler.config.node_id;
        let under_replicated = image
            .partitions()
            .filter(|(_, _, p)| p.leader == Some(node) && p.isr.len() < p.replicas.len())
            .count();
        self.under_replicated_partitions
            .set(i64::try_from(under_replicated).unwrap_or(i64::MAX));
        self.offline_partitions
            .set(i64::try_from(image.offline_partitions()).unwrap_or(i64::MAX));
        let (mut under_min_isr, mut max_lag, mut max_lag_ms) = (0i64, 0u64, 0i64);
        for topic in handler.manager.topics() {
            let min_insync = topic.config.min_insync_replicas(topic.replication_factor);
            for partition in topic.local() {
                if partition.role() != crate::partition::Role::Leader {
                    continue;
                }
                if partition.isr_len() < min_insync {
                    under_min_isr += 1;
                }
                for (_, offsets, ms) in partition.follower_lags() {
                    max_lag = max_lag.max(offsets);
                    max_lag_ms = max_lag_ms.max(ms);
                }
            }
        }
        self.under_min_isr_partitions.set(under_min_isr);
        self.replica_max_lag
            .set(i64::try_from(max_lag).unwrap_or(i64::MAX));
        self.replica_max_lag_seconds.set(max_lag_ms as f64 / 1000.0);
        let applied = *handler.manager.applied().borrow();
        self.cluster
            .update(&image, applied, handler.cluster.client.local_node());
    }
}

impl ClusterMetrics {
    /// Registers the metadata and controller metrics in `registry`.
    pub fn new(registry: &Registry) -> Result<ClusterMetrics, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let metadata_applied_offset = gauge(
            "cairn_metadata_applied_offset",
            "The metadata log offset this broker has applied (every record below it).",
        )?;
        let controller_active = gauge(
            "cairn_controller_active",
            "1 on the active controller, 0 elsewhere: the sum over the cluster should be 1 (Kafka's ActiveControllerCount).",
        )?;
        let raft_term = gauge(
            "cairn_controller_raft_term",
            "The controller quorum's Raft term as this voter knows it (0 on a node that is not a voter).",
        )?;
        let raft_commit_index = gauge(
            "cairn_controller_raft_commit_index",
            "The last metadata log index this voter knows committed and applied.",
        )?;
        let fenced_brokers = gauge(
            "cairn_controller_fenced_brokers",
            "Registered brokers that are fenced; reported by the active controller, 0 elsewhere.",
        )?;
        let offline_partitions = gauge(
            "cairn_controller_offline_partitions",
            "Partitions without a leader; reported by the active controller, 0 elsewhere.",
        )?;
        let leader_elections = IntCounter::new(
            "cairn_controller_leader_elections_total",
            "Partition leader elections in the metadata log; reported by the active controller.",
        )?;
        registry.register(Box::new(leader_elections.clone()))?;
        let unclean_leader_elections = IntCounter::new(
            "cairn_controller_unclean_leader_elections_total",
            "Leader elections that took a replica outside the ISR (topics with unclean.leader.election.enable): records may have been lost.",
        )?;
        registry.register(Box::new(unclean_leader_elections.clone()))?;
        Ok(ClusterMetrics {
            metadata_applied_offset,
            controller_active,
            raft_term,
            raft_commit_index,
            fenced_brokers,
            offline_partitions,
            leader_elections,
            unclean_leader_elections,
            update_lock: Default::default(),
        })
    }

    /// Refreshes every gauge: `applied` is the metadata offset this node has applied,
    /// `controller` its voter if it is one. Cluster-wide counts come from the active controller
    /// only (as Kafka's controller metrics do), so that summing over the cluster counts once.
    pub fn update(&self, image: &MetadataImage, applied: u64, controller: Option<&ControllerNode>) {
        let _one = self
            .update_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metadata_applied_offset.set(as_i64(applied));
        let status = controller.map(ControllerNode::status);
        let active = status.as_ref().is_some_and(|s| s.leader == Some(s.node_id));
        self.controller_active.set(i64::from(active));
        self.raft_term
            .set(status.as_ref().map_or(0, |s| as_i64(s.term)));
        self.raft_commit_index
            .set(status.as_ref().and_then(|s| s.committed).map_or(0, as_i64));
        let count = |n: usize| if active { as_i64(n as u64) } else { 0 };
        self.fenced_brokers.set(count(image.fenced_brokers()));
        self.offline_partitions
            .set(count(image.offline_partitions()));
        if active {
            self.leader_elections.inc_by(
                image
                    .leader_elections
                    .saturating_sub(self.leader_elections.get()),
            );
            self.unclean_leader_elections.inc_by(
                image
                    .unclean_leader_elections
                    .saturating_sub(self.unclean_leader_elections.get()),
            );
        }
    }
}
