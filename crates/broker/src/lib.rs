//! The Cairn broker as a library: topics over the storage engine, the native-protocol listener,
//! Prometheus metrics, health endpoints and graceful shutdown. The `cairn broker` command is a thin
//! wrapper; a service can embed the same broker:
//!
//! ```no_run
//! # async fn run() -> Result<(), cairn_broker::StartError> {
//! let broker = cairn_broker::Broker::builder()
//!     .data_dir("./cairn-data")
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .start()
//!     .await?;
//! println!("serving on {}", broker.native_addr());
//! // In the same process, without TCP:
//! let admin = cairn_client::Admin::with_connection(broker.connection("my-service"));
//! admin.create_topic("events", 3, &[]).await.unwrap();
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod clock;
mod cluster;
mod config;
mod controller_only;
pub mod controls;
pub mod disk;
mod embedded;
mod error;
mod group_api;
mod groups;
mod handler;
mod kafka;
mod legacy;
mod manager;
mod metadata_log;
mod metrics;
mod native;
pub mod offsets;
pub mod ops;
mod partition;
pub mod producers;
mod replica;
use producers::ProducerIds;
mod server;
mod tls;
mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{BrokerConfig, ConfigError, NodeRole};
pub use controller_only::RunningController;
pub use error::{BrokerError, error_chain};
pub use handler::{Handler, Outcome};
pub use manager::{Host, ManagerError, Topic, TopicManager};
pub use metadata_log::{METADATA_LOG_DIR, MetadataLog};
pub use metrics::{ClusterMetrics, Metrics};
pub use partition::{Appended, Isolation, Partition, ReplicaState, Role};
pub use topic::{TOPIC_CONFIG_KEYS, TopicConfig, TopicDefaults, validate_topic_name};

use cairn_storage::{Fs, StdFs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Starting the broker failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is outside its limits.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// Another broker uses the data directory.
    #[error("data directory {} is in use by another broker (lock held on {}/.lock)", dir.display(), dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The data directory or a listener could not be set up.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metadata log could not be opened.
    #[error("opening the metadata log")]
    MetadataLog {
        /// Why.
        #[source]
        source: cairn_storage::OpenError,
    },
    /// The controller did not start.
    #[error("starting the controller")]
    Controller(#[from] cairn_controller::StartError),
    /// The metadata of a single node from before the controller could not be imported.
    #[error("importing legacy metadata: {0}")]
    Import(String),
    /// The data directory belongs to another node id.
    #[error("data directory {} belongs to node {found}, not to node {configured} (--node-id)", dir.display())]
    WrongNode {
        /// The directory.
        dir: PathBuf,
        /// The node id it was created for.
        found: u32,
        /// The node id configured.
        configured: u32,
    },
    /// A broker alone could not register with its own controller in time.
    #[error("the broker did not become ready (registered, unfenced) within 30 s")]
    NotReady,
    /// Metrics could not be registered.
    #[error("registering metrics")]
    Metrics(#[from] prometheus::Error),
}

/// Entry point for embedding: `Broker::builder()...start().await`.
#[derive(Debug)]
pub struct Broker;

impl Broker {
    /// A builder with the defaults of `cairn broker`.
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder {
            config: BrokerConfig::default(),
            fs: None,
            clock: None,
        }
    }
}

/// Configures a broker before it starts.
#[derive(Debug, Clone)]
pub struct BrokerBuilder {
    config: BrokerConfig,
    fs: Option<Arc<dyn Fs>>,
    clock: Option<Arc<dyn Clock>>,
}

impl BrokerBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: BrokerConfig) -> Self {
        self.config = config;
        self
    }

    /// Where data lives.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = dir.into();
        self
    }

    /// The native listener's address (port 0 picks a free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// The HTTP listener's address; `None` disables it.
    pub fn http_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.config.http_listen = addr;
        self
    }

    /// The Kafka listener's address; `None` disables it.
    pub fn kafka_listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.config.kafka_listen = addr;
        self
    }

    /// The file system the data directory lives on (tests pass a fault-injecting one); the
    /// real one by default.
    pub fn fs(mut self, fs: Arc<dyn Fs>) -> Self {
        self.fs = Some(fs);
        self
    }

    /// The clock (tests pass a manual one); the system's by default.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Opens the data directory (recovering its logs), binds the listeners and starts serving.
    pub async fn start(self) -> Result<RunningBroker, StartError> {
        let config = self.config;
        config.validate()?;
        let (tls, server_cert) = match tls::acceptor(&config)? {
            Some((acceptor, cert)) => (Some(acceptor), Some(cert)),
            None => (None, None),
        };
        let peer_tls = tls::to_peers(&config)?;
        if tls.is_none() {
            tracing::warn!(
                "no TLS and no authentication: anyone who can reach the listeners can read, write \
                 and delete everything (docs/security.md)"
            );
        }
        let fs = self.fs.unwrap_or_else(|| Arc::new(StdFs));
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let started = Instant::now();
        if !config.is_broker() {
            return Err(StartError::Config(ConfigError::Invalid {
                field: "roles",
                why: "a controller-only node starts with BrokerBuilder::start_controller".into(),
            }));
        }
        let dir_lock = open_data_dir(&*fs, &config)?;
        let (listener, native_addr) = bind(config.listen, "native").await?;
        let kafka = bind_optional(config.kafka_listen, "Kafka").await?;
        let http = bind_optional(config.http_listen, "HTTP").await?;
        let controller_listener = match config.controller_listen {
            Some(addr) if config.is_controller() => Some(bind(addr, "controller").await?.0),
            _ => None,
        };
        let voters = config.voters().map_err(|why| ConfigError::Invalid {
            field: "controller_quorum",
            why,
        })?;
        let dir_id = node_identity(&*fs, &config)?;
        let lease = Arc::new(manager::Lease::default());
        let host = Host {
            fs: Arc::clone(&fs),
            clock: Arc::clone(&clock),
            node_id: config.node_id,
            lease: Arc::clone(&lease),
            replica_lag_max_ms: i64::try_from(config.replica_lag_time_max_ms).unwrap_or(i64::MAX),
            negative_control: config.negative_control(),
            disk: Some(Arc::new(disk::DiskGuard::new(
                Arc::clone(&fs),
                config.data_dir.clone(),
                config.storage_min_free_bytes,
            ))),
        };
        if let Some(control) = host.negative_control {
            tracing::error!(
                ?control,
                "NEGATIVE CONTROL ON: this broker breaks a safety rule on purpose (test builds only)"
            );
        }
        let (data_dir, defaults) = (config.data_dir.clone(), config.topic_defaults.clone());
        let (manager, metadata_log) = {
            let (host, fs) = (host.clone(), Arc::clone(&fs));
            let voter = voters.contains_key(&config.node_id);
            tokio::task::spawn_blocking(move || {
                let manager = TopicManager::new(host, &data_dir, defaults);
                // Only voters keep the metadata log; brokers follow a voter's image.
                let log = voter
                    .then(|| metadata_log::MetadataLog::open(fs, &data_dir))
                    .transpose();
                (manager, log)
            })
            .await
            .map_err(|e| StartError::Io {
                what: "opening the data directory".into(),
                source: std::io::Error::other(e),
            })?
        };
        let metadata_log = metadata_log.map_err(|source| StartError::MetadataLog { source })?;
        let manager = Arc::new(manager);
        let controller_config = controller_config(&config, &voters);
        let metadata_log = metadata_log.map(Arc::new);
        let (controller, client) = match &metadata_log {
            Some(log) => {
                let node = cairn_controller::ControllerNode::start(
                    controller_config,
                    Arc::clone(log) as Arc<dyn cairn_controller::RaftStore>,
                    controller_listener,
                )
                .await?;
                let client = cairn_controller::ControllerClient::local(
                    node.clone(),
                    config.controller_frame_bytes_max,
                );
                (Some(node), client)
            }
            None => (
                None,
                cairn_controller::ControllerClient::remote(
                    &voters,
                    config.controller_frame_bytes_max,
                ),
            ),
        };
        let alone = voters.len() == 1 && controller.is_some();
        if let (true, Some(node)) = (alone, &controller) {
            import_legacy(node, &fs, &config).await?;
        }
        let offsets = Arc::new(offsets::OffsetStore::new(config.offsets_topic_partitions));
        let (advertised_host, advertised_port) =
            advertised(config.advertised.as_deref(), native_addr);
        let kafka_addr = kafka.as_ref().map(|(_, addr)| *addr);
        let (kafka_advertised_host, kafka_advertised_port) = advertised(
            config.kafka_advertised.as_deref(),
            kafka_addr.unwrap_or(native_addr),
        );
        let info = cairn_controller::BrokerInfo {
            node_id: config.node_id,
            incarnation: incarnation(),
            dir_id,
            native: cairn_controller::Endpoint {
                host: advertised_host,
                port: advertised_port,
            },
            kafka: kafka_addr.map(|_| cairn_controller::Endpoint {
                host: kafka_advertised_host,
                port: kafka_advertised_port,
            }),
            rack: config.rack.clone(),
        };
        let cluster = Arc::new(cluster::Cluster::new(
            client.clone(),
            info,
            lease,
            std::time::Duration::from_millis(config.broker_session_timeout_ms),
            std::time::Duration::from_millis(config.broker_heartbeat_interval_ms),
        ));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let groups = Arc::new(groups::Coordinator::new(
            Arc::clone(&clock),
            std::time::Duration::from_millis(config.group_initial_rebalance_delay_ms),
            groups::GroupLimits {
                groups_max: config.groups_max,
                members_max: config.group_members_max,
                member_bytes_max: config.group_member_bytes_max,
                total_bytes_max: config.groups_bytes_max,
            },
        ));
        tasks.spawn(cluster::apply_images(
            client.clone(),
            Arc::clone(&manager),
            Arc::clone(&offsets),
            Arc::clone(&groups),
            shutdown.clone(),
        ));
        let metrics = Metrics::new()?;
        tasks.spawn(replica::run_fetchers(
            Arc::clone(&manager),
            Arc::clone(&cluster),
            metrics.clone(),
            replica::FetcherConfig {
                node_id: config.node_id,
                wait_max: std::time::Duration::from_millis(config.replica_fetch_wait_max_ms),
                partition_max_bytes: config.replica_fetch_max_bytes,
                response_max_bytes: config.replica_fetch_response_max_bytes,
                tls: peer_tls.clone(),
            },
            shutdown.clone(),
        ));
        tasks.spawn(replica::run_isr_changes(
            Arc::clone(&manager),
            Arc::clone(&cluster),
            metrics.clone(),
            shutdown.clone(),
        ));
        let killed = CancellationToken::new();
        tasks.spawn(Arc::clone(&cluster).run(
            Arc::clone(&manager),
            shutdown.clone(),
            killed.clone(),
        ));
        if alone {
            // A node alone needs nobody else: it is fully up when start() returns.
            let mut ready = cluster.ready();
            let up = ready.wait_for(|ready| *ready);
            if tokio::time::timeout(std::time::Duration::from_secs(30), up)
                .await
                .is_err()
            {
                return Err(StartError::NotReady);
            }
        }
        let handler = Arc::new(Handler {
            config: config.clone(),
            clock: Arc::clone(&clock),
            manager,
            metrics,
            shutdown: shutdown.clone(),
            producer_ids: Arc::new(ProducerIds::new(config.node_id, client)),
            offsets,
            groups,
            cluster: Arc::clone(&cluster),
        });
        let tracker = TaskTracker::new();
        let ready = Arc::new(AtomicBool::new(false));
        tasks.spawn(mirror_ready(
            cluster.ready(),
            Arc::clone(&ready),
            shutdown.clone(),
        ));
        let limits = server::SharedLimits::new(&config);
        tracker.spawn(server::serve(
            listener,
            server::Protocol::Native,
            tls.clone(),
            Arc::clone(&handler),
            Arc::clone(&limits),
            tracker.clone(),
            shutdown.clone(),
        ));
        if let Some((listener, _)) = kafka {
            tracker.spawn(server::serve(
                listener,
                server::Protocol::Kafka,
                tls,
                Arc::clone(&handler),
                limits,
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        let http_addr = http.map(|(listener, addr)| {
            let state = server::BrokerHttp {
                handler: Arc::clone(&handler),
                ready: Arc::clone(&ready),
            };
            tracker.spawn(server::serve_http(
                listener,
                Arc::new(state),
                shutdown.clone(),
            ));
            addr
        });
        let background = tokio::spawn(background(Arc::clone(&handler), shutdown.clone()));
        let compaction = tokio::spawn(compaction(Arc::clone(&handler), shutdown.clone()));
        tokio::spawn(group_timer(Arc::clone(&handler), shutdown.clone()));
        handler.groups.enable_store();
        tokio::spawn(group_store(Arc::clone(&handler), shutdown.clone()));
        tracing::info!(
            native = %native_addr,
            kafka = ?kafka_addr,
            http = ?http_addr,
            data_dir = %config.data_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            config = %serde_json::to_string(&config).unwrap_or_default(),
            "broker started"
        );
        Ok(RunningBroker {
            handler,
            native_addr,
            kafka_addr,
            http_addr,
            shutdown,
            tracker,
            tasks,
            killed,
            controller,
            metadata_log,
            ready,
            background,
            compaction,
            server_cert,
            _dir_lock: dir_lock,
        })
    }
}

/// Creates and locks the data directory; the lock lives as long as the returned value.
fn open_data_dir(
    fs: &dyn Fs,
    config: &BrokerConfig,
) -> Result<Box<dyn std::any::Any + Send + Sync>, StartError> {
    let dir = &config.data_dir;
    fs.create_dir_all(dir).map_err(|source| StartError::Io {
        what: format!("creating data directory {}", dir.display()),
        source,
    })?;
    match fs.lock_dir(dir) {
        Ok(lock) => Ok(lock),
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
            Err(StartError::Locked { dir: dir.clone() })
        }
        Err(source) => Err(StartError::Io {
            what: format!("locking {}", dir.display()),
            source,
        }),
    }
}

/// Binds a listener (`what` names it in errors); returns it with its bound address.
async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let bound = async {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok::<_, std::io::Error>((listener, local))
    };
    bound.await.map_err(|source| StartError::Io {
        what: format!("binding the {what} listener {addr}"),
        source,
    })
}

/// Binds an optional listener.
async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &str,
) -> Result<Option<(TcpListener, SocketAddr)>, StartError> {
    match addr {
        Some(addr) => Ok(Some(bind(addr, what).await?)),
        None => Ok(None),
    }
}

/// The controller's settings from the node's.
fn controller_config(
    config: &BrokerConfig,
    voters: &std::collections::BTreeMap<u32, String>,
) -> cairn_controller::ControllerConfig {
    cairn_controller::ControllerConfig {
        node_id: config.node_id,
        voters: voters.clone(),
        broker_session_timeout: std::time::Duration::from_millis(config.broker_session_timeout_ms),
        frame_bytes_max: config.controller_frame_bytes_max,
        frame_read_timeout: std::time::Duration::from_millis(config.frame_read_timeout_ms),
        connection_idle_timeout: std::time::Duration::from_millis(
            config.connection_idle_timeout_ms,
        ),
        partitions_max: config.partitions_max,
        partitions_per_topic_max: topic::PARTITIONS_PER_TOPIC_MAX,
        leader_rebalance_interval: config
            .auto_leader_rebalance_enable
            .then(|| std::time::Duration::from_millis(config.leader_imbalance_check_interval_ms)),
        ..cairn_controller::ControllerConfig::default()
    }
}

/// 128 random bits, as hex.
fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!("{:016x}{:016x}", random(), random())
}

/// A random id for this process's life.
fn incarnation() -> String {
    random_id()
}

/// The data directory's identity (`<data_dir>/node-identity`, created with the directory): the
/// node id it belongs to, and a random directory id the controller uses to tell this node
/// restarted (same directory) from a second process claiming its id (another directory). A
/// directory of another node id is refused: its partitions are another broker's.
fn node_identity(fs: &dyn Fs, config: &BrokerConfig) -> Result<String, StartError> {
    const FILE: &str = "node-identity";
    let dir = &config.data_dir;
    let found =
        cairn_storage::checkpoint::read(fs, dir, FILE, "node-identity").map_err(|source| {
            StartError::Io {
                what: format!("reading {}/{FILE}", dir.display()),
                source,
            }
        })?;
    if let Some(lines) = found {
        let field = |name: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(name).map(str::to_string))
        };
        let node = field("node_id ").and_then(|n| n.parse::<u32>().ok());
        let dir_id = field("dir_id ").unwrap_or_default();
        return match node {
            Some(node) if node == config.node_id && !dir_id.is_empty() => Ok(dir_id),
            Some(node) => Err(StartError::WrongNode {
                dir: dir.clone(),
                found: node,
                configured: config.node_id,
            }),
            None => Err(StartError::Io {
                what: format!("{}/{FILE} names no node", dir.display()),
                source: std::io::ErrorKind::InvalidData.into(),
            }),
        };
    }
    let dir_id = random_id();
    cairn_storage::checkpoint::write(
        fs,
        dir,
        FILE,
        "node-identity",
        &[
            format!("node_id {}", config.node_id),
            format!("dir_id {dir_id}"),
        ],
    )
    .map_err(|fatal| StartError::Io {
        what: format!("writing {}/{FILE}", dir.display()),
        source: std::io::Error::other(fatal),
    })?;
    Ok(dir_id)
}

/// Keeps the HTTP `/ready` flag equal to the cluster's readiness.
async fn mirror_ready(
    mut cluster: tokio::sync::watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        ready.store(*cluster.borrow_and_update(), Ordering::Relaxed);
        tokio::select! {
            changed = cluster.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Imports a single node's metadata from before the controller (once; the files are renamed
/// after their records are committed).
async fn import_legacy(
    node: &cairn_controller::ControllerNode,
    fs: &Arc<dyn Fs>,
    config: &BrokerConfig,
) -> Result<(), StartError> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !node.is_active() {
        if Instant::now() > deadline {
            return Err(StartError::NotReady);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let image = node.image();
    let (fs2, dir, id, next) = (
        Arc::clone(fs),
        config.data_dir.clone(),
        config.node_id,
        image.next_producer_id,
    );
    let io = |what: &str| {
        let what = what.to_string();
        move |source| StartError::Io { what, source }
    };
    let records = tokio::task::spawn_blocking(move || legacy::records(&*fs2, &dir, id, next))
        .await
        .map_err(|e| StartError::Io {
            what: "reading legacy metadata".into(),
            source: std::io::Error::other(e),
        })?
        .map_err(io("reading cluster-metadata.json"))?;
    let Some(records) = records else {
        return Ok(());
    };
    // Topics already in the log were imported by an earlier start that died before renaming.
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| match r {
            cairn_controller::MetadataRecord::TopicCreated { name, .. } => {
                image.topic(name).is_none()
            }
            _ => true,
        })
        .collect();
    let n = records.len();
    if n > 0 {
        node.import(records)
            .await
            .map_err(|e| StartError::Import(e.to_string()))?;
    }
    let (fs2, dir) = (Arc::clone(fs), config.data_dir.clone());
    tokio::task::spawn_blocking(move || legacy::mark_imported(&*fs2, &dir))
        .await
        .map_err(|e| StartError::Io {
            what: "renaming legacy metadata".into(),
            source: std::io::Error::other(e),
        })?
        .map_err(io("renaming legacy metadata"))?;
    tracing::info!(
        n_records = n,
        "legacy single-node metadata imported into the metadata log"
    );
    Ok(())
}

fn advertised(configured: Option<&str>, bound: SocketAddr) -> (String, u16) {
    if let Some(text) = configured
        && let Some((host, port)) = text.rsplit_once(':')
        && let Ok(port) = port.parse()
    {
        return (host.trim_matches(['[', ']']).to_string(), port);
    }
    (bound.ip().to_string(), bound.port())
}

/// Periodic work: retention, recovery-point checkpoints, interval flushes.
async fn background(handler: Arc<Handler>, shutdown: CancellationToken) {
    let mut retention = tokio::time::interval(handler.config.retention_check_interval());
    let mut checkpoint = tokio::time::interval(handler.config.checkpoint_interval());
    let mut flush = tokio::time::interval(std::time::Duration::from_millis(100));
    for timer in [&mut retention, &mut checkpoint, &mut flush] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let job: fn(&Handler) = tokio::select! {
            _ = retention.tick() => |h| h.apply_retention(),
            _ = checkpoint.tick() => |h| for_each_partition(h, "checkpoint", |p| p.log().checkpoint()),
            _ = flush.tick() => |h| for_each_partition(h, "flush", |p| {
                p.log().flush_if_due(h.clock.now())?;
                p.publish_committed();
                Ok(())
            }),
            () = shutdown.cancelled() => return,
        };
        let handler = Arc::clone(&handler);
        if tokio::task::spawn_blocking(move || job(&handler))
            .await
            .is_err()
        {
            tracing::error!("background task panicked");
        }
    }
}

/// Group sessions and rebalance deadlines, checked every 100 ms.
async fn group_timer(handler: Arc<Handler>, shutdown: CancellationToken) {
    let mut timer = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = timer.tick() => handler.groups.tick(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Writes group memberships to `__consumer_offsets` as rebalances complete (tombstones as groups
/// empty), and reports each outcome to the coordinator, whose SyncGroups wait for it. One write
/// at a time: whatever queues meanwhile goes in the next, one batch per offsets partition.
async fn group_store(handler: Arc<Handler>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = handler.groups.records_ready() => {}
            () = shutdown.cancelled() => return,
        }
        let records = handler.groups.take_records();
        if records.is_empty() {
            continue;
        }
        let (offsets, manager) = (Arc::clone(&handler.offsets), Arc::clone(&handler.manager));
        let now = handler.clock.unix_ms();
        let outcomes =
            tokio::task::spawn_blocking(move || offsets.store_groups(&manager, records, now)).await;
        let Ok(outcomes) = outcomes else {
            tracing::error!("the group store task panicked");
            continue;
        };
        for (group, record, outcome) in outcomes {
            match record {
                Some(record) => handler.groups.stored(&group, record.generation, outcome),
                None => {
                    if let Err((_, message)) = outcome {
                        tracing::warn!(%group, error = %message, "the tombstone of an emptied group was not stored");
                    }
                }
            }
        }
    }
}

/// Compaction passes, on their own timer so that a long pass never delays interval flushes.
async fn compaction(handler: Arc<Handler>, shutdown: CancellationToken) {
    let mut timer = tokio::time::interval(std::time::Duration::from_millis(
        handler.config.compaction_interval_ms,
    ));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let handler = Arc::clone(&handler);
        if tokio::task::spawn_blocking(move || handler.apply_compaction())
            .await
            .is_err()
        {
            tracing::error!("compaction task panicked");
        }
    }
}

fn for_each_partition(
    handler: &Handler,
    what: &str,
    f: impl Fn(&Partition) -> Result<(), cairn_storage::Fatal>,
) {
    for topic in handler.manager.topics() {
        for partition in topic.local() {
            if let Err(err) = f(partition) {
                tracing::error!(topic = %topic.name, partition = partition.index(), error = %err, "{what} failed");
            }
        }
    }
}

/// A running broker. Dropping it without [`RunningBroker::shutdown`] stops nothing cleanly: call
/// `shutdown` (the `cairn` binary does on SIGTERM and SIGINT).
#[derive(Debug)]
pub struct RunningBroker {
    handler: Arc<Handler>,
    native_addr: SocketAddr,
    kafka_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The cluster membership and image tasks.
    tasks: TaskTracker,
    /// Cancelled by [`RunningBroker::kill`]: stop without telling anyone.
    killed: CancellationToken,
    controller: Option<cairn_controller::ControllerNode>,
    metadata_log: Option<Arc<MetadataLog>>,
    ready: Arc<AtomicBool>,
    background: tokio::task::JoinHandle<()>,
    compaction: tokio::task::JoinHandle<()>,
    /// The listeners' certificate, with TLS.
    server_cert: Option<Arc<tls::ServerCert>>,
    _dir_lock: Box<dyn std::any::Any + Send + Sync>,
}

impl RunningBroker {
    /// Reads the listeners' TLS certificate and key files again (`cairn broker` on SIGHUP): new
    /// connections get the new certificate, open ones keep theirs. Without TLS, nothing to do.
    /// On error (an unreadable file, a key that is not the certificate's) the current ones stay.
    pub fn reload_tls(&self) -> Result<(), ConfigError> {
        match &self.server_cert {
            Some(cert) => cert.reload(),
            None => Ok(()),
        }
    }

    /// The native listener's bound address.
    pub fn native_addr(&self) -> SocketAddr {
        self.native_addr
    }

    /// The HTTP listener's bound address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The Kafka listener's bound address.
    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        self.kafka_addr
    }

    /// The topics (for in-process use and tests).
    pub fn topics(&self) -> &Arc<TopicManager> {
        &self.handler.manager
    }

    /// An in-process client connection that skips TCP: hand it to
    /// `cairn_client::Producer::with_connection`, `Consumer::with_connection` or
    /// `Admin::with_connection`.
    pub fn connection(&self, client_id: &str) -> cairn_client::Connection {
        let transport =
            embedded::LocalTransport::new(Arc::clone(&self.handler), self.shutdown.clone());
        cairn_client::Connection::from_transport(Arc::new(transport), client_id)
    }

    /// A source of in-process connections for `cairn_client::GroupConsumer::with_connector`
    /// (a group consumer opens several: fetches, group calls, heartbeats).
    pub fn connector(&self, client_id: &str) -> cairn_client::Connector {
        let (handler, shutdown, client_id) = (
            Arc::clone(&self.handler),
            self.shutdown.clone(),
            client_id.to_string(),
        );
        Arc::new(move || {
            let transport = embedded::LocalTransport::new(Arc::clone(&handler), shutdown.clone());
            let conn = cairn_client::Connection::from_transport(Arc::new(transport), &client_id);
            Box::pin(std::future::ready(Ok(conn)))
        })
    }

    /// The request handler, for in-process transports that skip TCP.
    pub fn handler(&self) -> &Arc<Handler> {
        &self.handler
    }

    /// Stops at once, as a process killed with SIGKILL would in the middle of its work: no
    /// controlled shutdown, no flush, no clean close of the logs (the next start recovers them).
    /// For tests and simulations of crashes inside one process.
    pub async fn kill(self) {
        tracing::warn!("killed");
        self.ready.store(false, Ordering::Relaxed);
        self.killed.cancel();
        self.shutdown.cancel();
        self.handler.groups.close();
        self.background.abort();
        self.compaction.abort();
        self.tracker.close();
        self.tasks.close();
        if let Some(controller) = self.controller {
            controller.shutdown().await;
        }
        // The logs are dropped, not closed: unsynced data is in the page cache only.
    }

    /// Stops accepting, lets in-flight requests finish (up to `shutdown_timeout_ms`), flushes and
    /// closes every log cleanly, so the next start scans nothing.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Relaxed);
        // The membership task asks the controller to move this broker's leaderships first
        // (controlled shutdown), then stops.
        self.shutdown.cancel();
        // Group requests waiting for a rebalance are answered now, not at the timeout.
        self.handler.groups.close();
        self.tracker.close();
        self.tasks.close();
        let timeout = self.handler.config.shutdown_timeout();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish in time; closing anyway");
        }
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("cluster tasks did not finish in time");
        }
        let _ = self.background.await;
        // A compaction pass under way finishes first (it holds partitions the close needs).
        let _ = self.compaction.await;
        let manager = Arc::clone(&self.handler.manager);
        drop(self.handler);
        if tokio::task::spawn_blocking(move || manager.close_all())
            .await
            .is_err()
        {
            tracing::error!("closing logs panicked");
        }
        if let Some(controller) = self.controller {
            controller.shutdown().await;
        }
        if let Some(log) = self.metadata_log {
            match tokio::task::spawn_blocking(move || log.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "closing the metadata log"),
                Err(_) => tracing::error!("closing the metadata log panicked"),
            }
        }
        tracing::info!("shut down");
    }
}
