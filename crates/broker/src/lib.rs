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
mod config;
mod embedded;
mod error;
mod group_api;
mod groups;
mod handler;
mod kafka;
mod manager;
mod metadata;
mod metrics;
mod native;
pub mod offsets;
pub mod ops;
mod partition;
pub mod producers;
use producers::ProducerIds;
mod server;
mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{BrokerConfig, ConfigError};
pub use error::{BrokerError, error_chain};
pub use handler::{Handler, Outcome};
pub use manager::{Host, ManagerError, Topic, TopicManager};
pub use metadata::{ClusterMetadata, FileMetadataStore, MetadataError, MetadataStore, TopicRecord};
pub use metrics::Metrics;
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
    /// Topics could not be opened.
    #[error("opening topics")]
    Topics(#[from] ManagerError),
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
        let fs = self.fs.unwrap_or_else(|| Arc::new(StdFs));
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let started = Instant::now();
        let io = |what: String| move |source| StartError::Io { what, source };
        fs.create_dir_all(&config.data_dir).map_err(io(format!(
            "creating data directory {}",
            config.data_dir.display()
        )))?;
        let dir_lock = match fs.lock_dir(&config.data_dir) {
            Ok(lock) => lock,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(StartError::Locked {
                    dir: config.data_dir.clone(),
                });
            }
            Err(source) => {
                return Err(StartError::Io {
                    what: format!("locking {}", config.data_dir.display()),
                    source,
                });
            }
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(io(format!("binding {}", config.listen)))?;
        let native_addr = listener
            .local_addr()
            .map_err(io("reading the listener address".into()))?;
        let kafka = match config.kafka_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding Kafka {addr}")))?;
                let addr = listener
                    .local_addr()
                    .map_err(io("reading the Kafka listener address".into()))?;
                Some((listener, addr))
            }
            None => None,
        };
        let http = match config.http_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding HTTP {addr}")))?;
                let addr = listener
                    .local_addr()
                    .map_err(io("reading the HTTP address".into()))?;
                Some((listener, addr))
            }
            None => None,
        };
        let store = Box::new(FileMetadataStore::new(Arc::clone(&fs), &config.data_dir));
        let host = Host {
            fs: Arc::clone(&fs),
            clock: Arc::clone(&clock),
            node_id: config.node_id,
        };
        let (data_dir, defaults, partitions_max) = (
            config.data_dir.clone(),
            config.topic_defaults.clone(),
            config.partitions_max,
        );
        let manager = tokio::task::spawn_blocking(move || {
            TopicManager::open(host, &data_dir, defaults, partitions_max, store)
        })
        .await
        .map_err(|e| StartError::Io {
            what: "opening topics".into(),
            source: std::io::Error::other(e),
        })??;
        let manager = Arc::new(manager);
        let offsets = {
            let (manager, n) = (Arc::clone(&manager), config.offsets_topic_partitions);
            tokio::task::spawn_blocking(move || offsets::OffsetStore::open(&manager, n))
                .await
                .map_err(|e| StartError::Io {
                    what: "loading committed offsets".into(),
                    source: std::io::Error::other(e),
                })?
        };
        let (advertised_host, advertised_port) =
            advertised(config.advertised.as_deref(), native_addr);
        let kafka_addr = kafka.as_ref().map(|(_, addr)| *addr);
        let (kafka_advertised_host, kafka_advertised_port) = advertised(
            config.kafka_advertised.as_deref(),
            kafka_addr.unwrap_or(native_addr),
        );
        let producer_ids = ProducerIds::open(Arc::clone(&fs), &config.data_dir).map_err(io(
            format!("reading {}/producer-ids", config.data_dir.display()),
        ))?;
        let shutdown = CancellationToken::new();
        let handler = Arc::new(Handler {
            config: config.clone(),
            clock: Arc::clone(&clock),
            manager,
            metrics: Metrics::new()?,
            shutdown: shutdown.clone(),
            advertised_host,
            advertised_port,
            kafka_advertised_host,
            kafka_advertised_port,
            producer_ids: Arc::new(producer_ids),
            offsets: Arc::new(offsets),
            groups: Arc::new(groups::Coordinator::new(
                Arc::clone(&clock),
                std::time::Duration::from_millis(config.group_initial_rebalance_delay_ms),
                groups::GroupLimits {
                    groups_max: config.groups_max,
                    members_max: config.group_members_max,
                    member_bytes_max: config.group_member_bytes_max,
                    total_bytes_max: config.groups_bytes_max,
                },
            )),
        });
        let tracker = TaskTracker::new();
        let ready = Arc::new(AtomicBool::new(true));
        let limits = server::SharedLimits::new(&config);
        tracker.spawn(server::serve(
            listener,
            server::Protocol::Native,
            Arc::clone(&handler),
            Arc::clone(&limits),
            tracker.clone(),
            shutdown.clone(),
        ));
        if let Some((listener, _)) = kafka {
            tracker.spawn(server::serve(
                listener,
                server::Protocol::Kafka,
                Arc::clone(&handler),
                limits,
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        let http_addr = http.map(|(listener, addr)| {
            tracker.spawn(server::serve_http(
                listener,
                Arc::clone(&handler),
                Arc::clone(&ready),
                shutdown.clone(),
            ));
            addr
        });
        let background = tokio::spawn(background(Arc::clone(&handler), shutdown.clone()));
        let compaction = tokio::spawn(compaction(Arc::clone(&handler), shutdown.clone()));
        tokio::spawn(group_timer(Arc::clone(&handler), shutdown.clone()));
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
            ready,
            background,
            compaction,
            _dir_lock: dir_lock,
        })
    }
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
        for partition in &topic.partitions {
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
    ready: Arc<AtomicBool>,
    background: tokio::task::JoinHandle<()>,
    compaction: tokio::task::JoinHandle<()>,
    _dir_lock: Box<dyn std::any::Any + Send + Sync>,
}

impl RunningBroker {
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

    /// Stops accepting, lets in-flight requests finish (up to `shutdown_timeout_ms`), flushes and
    /// closes every log cleanly, so the next start scans nothing.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Relaxed);
        self.shutdown.cancel();
        // Group requests waiting for a rebalance are answered now, not at the timeout.
        self.handler.groups.close();
        self.tracker.close();
        if tokio::time::timeout(self.handler.config.shutdown_timeout(), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish in time; closing anyway");
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
        tracing::info!("shut down");
    }
}
