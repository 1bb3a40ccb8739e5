//! `cairn broker`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cairn_broker::{Broker, BrokerConfig};
use clap::{Args, Subcommand};

/// What `cairn broker` does besides running a broker.
#[derive(Debug, Subcommand)]
pub enum BrokerAction {
    /// Move every replica off broker N (to the least loaded live brokers), so that it can be
    /// stopped; watch `cairn partition reassignments` until they complete.
    Decommission {
        /// The broker's node id.
        node: u32,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BrokerArgs {
    /// An operation on a broker of the cluster (`--bootstrap` names the cluster) instead of
    /// running one.
    #[command(subcommand)]
    pub action: Option<BrokerAction>,
    /// Data directory [default: ./cairn-data].
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Native-protocol listen address [default: 127.0.0.1:9192].
    #[arg(long, env = "CAIRN_LISTEN")]
    listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics, /health, /ready [default: 127.0.0.1:9644]; "off" disables it.
    #[arg(long, env = "CAIRN_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// host:port clients are told to connect to [default: the listen address].
    #[arg(long, env = "CAIRN_ADVERTISED")]
    advertised: Option<String>,
    /// Kafka-protocol listen address [default: 127.0.0.1:9092]; "off" disables it.
    #[arg(long, env = "CAIRN_KAFKA_LISTEN")]
    kafka_listen: Option<String>,
    /// host:port Kafka clients are told to connect to [default: the Kafka listen address].
    #[arg(long, env = "CAIRN_KAFKA_ADVERTISED")]
    kafka_advertised: Option<String>,
    /// This node's id [default: 1].
    #[arg(long, env = "CAIRN_NODE_ID")]
    node_id: Option<u32>,
    /// The controller quorum's voters, ID@HOST:PORT,... [default: this node alone]. A node
    /// whose id is listed is a controller too; the others follow the quorum as brokers.
    #[arg(long, env = "CAIRN_CONTROLLER_QUORUM")]
    controller_quorum: Option<String>,
    /// Where this node's controller listens (its own address in --controller-quorum).
    #[arg(long, env = "CAIRN_CONTROLLER_LISTEN")]
    controller_listen: Option<SocketAddr>,
    /// This node's roles: broker, controller, or broker,controller [default: a controller too
    /// when its id is in --controller-quorum, a broker always].
    #[arg(long, env = "CAIRN_ROLES", value_delimiter = ',')]
    roles: Option<Vec<cairn_broker::NodeRole>>,
    /// This broker's rack, for rack-aware replica placement.
    #[arg(long, env = "CAIRN_RACK")]
    rack: Option<String>,
    /// PEM CA certificates: clients must present a certificate signed by one (mutual TLS;
    /// needs the global --tls-cert and --tls-key, this broker's own).
    #[arg(long, env = "CAIRN_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// TOML config file; flags and CAIRN_* variables override it.
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
}

/// Raises this process's open-file limit to its hard limit, as brokers do: every partition
/// holds its active segment and its directory lock open (two descriptors), so the common soft
/// limit of 1,024 would stop a broker near 500 partitions. Returns the limit in force.
fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's nr_open (1,048,576 by default).
    let target = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|current| current < target) {
        limit.current = Some(target);
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %err, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Runs a broker; `tls_cert` and `tls_key` (the global flags) are its listeners' certificate,
/// `tls_ca` the CAs it trusts when it connects to other brokers.
pub async fn run(
    args: BrokerArgs,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(limit) = raise_open_files_limit() {
        tracing::debug!(limit, "open-file limit");
    }
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<BrokerConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => BrokerConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if let Some(quorum) = args.controller_quorum {
        config.controller_quorum = quorum;
    }
    if let Some(addr) = args.controller_listen {
        config.controller_listen = Some(addr);
    }
    if let Some(roles) = args.roles {
        config.roles = roles;
    }
    if let Some(rack) = args.rack {
        config.rack = Some(rack);
    }
    if let Some(ca) = tls_ca {
        config.tls_ca = Some(ca);
    }
    if let Some(cert) = tls_cert {
        config.tls_cert = Some(cert);
    }
    if let Some(key) = tls_key {
        config.tls_key = Some(key);
    }
    if let Some(ca) = args.tls_client_ca {
        config.tls_client_ca = Some(ca);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(http) = args.http_listen {
        config.http_listen = optional_addr("--http-listen", &http)?;
    }
    if let Some(kafka) = args.kafka_listen {
        config.kafka_listen = optional_addr("--kafka-listen", &kafka)?;
    }
    if let Some(advertised) = args.advertised {
        config.advertised = Some(advertised);
    }
    if let Some(advertised) = args.kafka_advertised {
        config.kafka_advertised = Some(advertised);
    }
    if !config.is_broker() {
        let controller = Broker::builder()
            .config(config)
            .start_controller()
            .await
            .context("starting the controller")?;
        eprintln!(
            "cairn controller listening on {} (controller){}",
            controller.controller_addr(),
            controller
                .http_addr()
                .map(|a| format!(", http://{a}/metrics"))
                .unwrap_or_default()
        );
        wait_for_signal().await?;
        controller.shutdown().await;
        return Ok(());
    }
    let broker = Broker::builder()
        .config(config)
        .start()
        .await
        .context("starting the broker")?;
    eprintln!(
        "cairn broker listening on {} (native){}{}",
        broker.native_addr(),
        broker
            .kafka_addr()
            .map(|a| format!(", {a} (kafka)"))
            .unwrap_or_default(),
        broker
            .http_addr()
            .map(|a| format!(", http://{a}/metrics"))
            .unwrap_or_default()
    );
    // SIGHUP reloads the TLS certificate and key; SIGTERM or SIGINT stops.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            stopped = &mut stop => {
                stopped?;
                break;
            }
            _ = hangup.recv() => match broker.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(err) => tracing::error!(error = %err, "SIGHUP: TLS certificate not reloaded; the current one stays"),
            },
        }
    }
    broker.shutdown().await;
    Ok(())
}

/// An address flag that "off" (or "none", or empty) disables.
fn optional_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        "off" | "none" | "" => Ok(None),
        addr => {
            Ok(Some(addr.parse().with_context(|| {
                format!("{flag} {addr:?} is not an address")
            })?))
        }
    }
}

pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
