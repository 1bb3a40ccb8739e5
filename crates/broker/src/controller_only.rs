//! A controller-only node (`roles = ["controller"]`): a voter of the metadata quorum that leads
//! no partitions and serves no clients. It keeps the metadata log in its data directory, answers
//! its peers and the brokers on its controller listener, and reports the controller metrics and
//! `/ready` (a quorum leader is known) over HTTP. Large Kafka clusters run their controllers so,
//! away from the brokers' load; Cairn's default is combined nodes.

use std::net::SocketAddr;
use std::sync::Arc;

use cairn_controller::ControllerNode;
use cairn_storage::{Fs, StdFs};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metadata_log::MetadataLog;
use crate::metrics::ClusterMetrics;
use crate::server::{self, HttpState};
use crate::{BrokerBuilder, BrokerConfig, ConfigError, StartError};

/// A running controller-only node. Call [`RunningController::shutdown`] to stop it cleanly.
#[derive(Debug)]
pub struct RunningController {
    node: ControllerNode,
    metadata_log: Arc<MetadataLog>,
    controller_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    _dir_lock: Box<dyn std::any::Any + Send + Sync>,
}

/// What the controller-only node's HTTP endpoint reports.
struct ControllerHttp {
    node: ControllerNode,
    registry: Registry,
    metrics: ClusterMetrics,
}

impl HttpState for ControllerHttp {
    fn metrics(&self) -> String {
        let image = self.node.image();
        self.metrics.update(&image, image.offset, Some(&self.node));
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %err, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        self.node.leader().is_some()
    }
}

impl BrokerBuilder {
    /// Starts a controller-only node: `roles` must be `["controller"]`, the node a voter of
    /// `controller_quorum` with a `controller_listen` address. The client listeners of the
    /// config are not opened.
    pub async fn start_controller(self) -> Result<RunningController, StartError> {
        let config: BrokerConfig = self.config;
        config.validate()?;
        if config.is_broker() {
            return Err(StartError::Config(ConfigError::Invalid {
                field: "roles",
                why: "start_controller starts a node whose only role is controller".into(),
            }));
        }
        let fs: Arc<dyn Fs> = self.fs.unwrap_or_else(|| Arc::new(StdFs));
        let started = std::time::Instant::now();
        let dir_lock = crate::open_data_dir(&*fs, &config)?;
        // validate() saw to it that a controller-only node has a controller listener.
        let listen = config.controller_listen.ok_or(ConfigError::Invalid {
            field: "controller_listen",
            why: "a controller-only node needs one".into(),
        })?;
        let (listener, controller_addr) = crate::bind(listen, "controller").await?;
        let http = crate::bind_optional(config.http_listen, "HTTP").await?;
        let voters = config.voters().map_err(|why| ConfigError::Invalid {
            field: "controller_quorum",
            why,
        })?;
        crate::node_identity(&*fs, &config)?;
        let data_dir = config.data_dir.clone();
        let log = tokio::task::spawn_blocking(move || MetadataLog::open(fs, &data_dir))
            .await
            .map_err(|e| StartError::Io {
                what: "opening the metadata log".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| StartError::MetadataLog { source })?;
        let metadata_log = Arc::new(log);
        let node = ControllerNode::start(
            crate::controller_config(&config, &voters),
            Arc::clone(&metadata_log) as Arc<dyn cairn_controller::RaftStore>,
            Some(listener),
        )
        .await?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let http_addr = match http {
            Some((listener, addr)) => {
                let registry = Registry::new();
                let metrics = ClusterMetrics::new(&registry)?;
                let state = ControllerHttp {
                    node: node.clone(),
                    registry,
                    metrics,
                };
                tracker.spawn(server::serve_http(
                    listener,
                    Arc::new(state),
                    shutdown.clone(),
                ));
                Some(addr)
            }
            None => None,
        };
        tracing::info!(
            controller = %controller_addr,
            http = ?http_addr,
            data_dir = %config.data_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "controller started"
        );
        Ok(RunningController {
            node,
            metadata_log,
            controller_addr,
            http_addr,
            shutdown,
            tracker,
            _dir_lock: dir_lock,
        })
    }
}

impl RunningController {
    /// The controller listener's bound address.
    pub fn controller_addr(&self) -> SocketAddr {
        self.controller_addr
    }

    /// The HTTP listener's bound address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The controller (its image, status and leader).
    pub fn node(&self) -> &ControllerNode {
        &self.node
    }

    /// Stops Raft and closes the metadata log cleanly.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.shutdown.cancel();
        self.tracker.close();
        self.node.shutdown().await;
        let log = self.metadata_log;
        match tokio::task::spawn_blocking(move || log.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "closing the metadata log"),
            Err(_) => tracing::error!("closing the metadata log panicked"),
        }
        tracing::info!("shut down");
    }
}
