//! `cairn`: run a broker, manage topics, produce and consume from the shell. The binary is
//! `src/main.rs`; everything else is here so integration tests can build the same command.
#![forbid(unsafe_code)]

mod bench;
mod broker;
mod cluster;
mod consume;
mod group;
mod partition;
mod produce;
mod topic;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Cairn: a partitioned event log broker.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    /// Broker addresses of the native protocol, comma-separated (any one that answers will do).
    #[arg(
        long,
        global = true,
        env = "CAIRN_BOOTSTRAP",
        default_value = "127.0.0.1:9192"
    )]
    bootstrap: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// PEM CA certificates to trust: client commands connect over TLS (docs/security.md); for
    /// `cairn broker`, the CAs of the other brokers it fetches from.
    #[arg(long, global = true, env = "CAIRN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM certificate chain: a client's for mutual TLS (with --tls-ca), the broker's own for
    /// `cairn broker` (its listeners then speak TLS only).
    #[arg(long, global = true, env = "CAIRN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "CAIRN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How the client commands reach the cluster: its bootstrap addresses, and TLS.
#[derive(Debug, Clone)]
pub(crate) struct Brokers {
    pub(crate) bootstrap: String,
    pub(crate) tls: Option<cairn_client::ClientTls>,
}

impl Brokers {
    /// From the global flags: TLS when --tls-ca is given (with --tls-cert and --tls-key, mutual).
    fn from_cli(cli: &Cli) -> anyhow::Result<Brokers> {
        let tls = match (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) {
            (None, None, _) => None,
            (None, Some(_), _) => {
                anyhow::bail!(
                    "--tls-cert needs --tls-ca: the CA that signed the broker's certificate"
                )
            }
            (Some(ca), cert, key) => Some(
                cairn_client::ClientTls::from_pem_files(ca, cert.as_deref().zip(key.as_deref()))
                    .context("--tls-ca, --tls-cert, --tls-key")?,
            ),
        };
        Ok(Brokers {
            bootstrap: cli.bootstrap.clone(),
            tls,
        })
    }

    /// An admin client of the cluster.
    pub(crate) async fn admin(&self) -> anyhow::Result<cairn_client::Admin> {
        cairn_client::Admin::connect_tls(&self.bootstrap, self.tls.clone())
            .await
            .with_context(|| format!("connecting to {}", self.bootstrap))
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// One JSON document (or one per line for streams).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker (flags > CAIRN_* env > TOML config file > defaults).
    Broker(broker::BrokerArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one record per line of stdin.
    Produce(produce::ProduceArgs),
    /// Print records of a topic (alone, or as a member of a consumer group).
    Consume(consume::ConsumeArgs),
    /// List, describe, reset and delete consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Measure produce, consume or end-to-end performance beside this machine's baseline.
    Bench(bench::BenchArgs),
    /// The cluster: brokers, controller quorum, partition health.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Partition replicas: reassignments.
    #[command(subcommand)]
    Partition(partition::PartitionCommand),
    /// Partition leadership: elections.
    #[command(subcommand)]
    Leader(cluster::LeaderCommand),
    /// Development tools: a local cluster in one command.
    #[command(subcommand)]
    Dev(cluster::DevCommand),
}

/// Runs the `cairn` command with the process arguments; returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // openraft narrates every election and replication step, and repeats an error every half
    // second while a voter is down: Cairn logs leader changes and unreachable voters itself.
    let default_level = if matches!(cli.command, Command::Broker(_) | Command::Dev(_)) {
        "info,openraft=off"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cairn: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        // The broker's own certificate is its listeners' (`cairn broker` reads it itself).
        let brokers = match &cli.command {
            Command::Broker(args) if args.action.is_none() => None,
            Command::Dev(_) => None,
            _ => Some(Brokers::from_cli(&cli)?),
        };
        let brokers = || {
            brokers
                .clone()
                .ok_or_else(|| anyhow::anyhow!("no broker to connect to"))
        };
        match cli.command {
            Command::Broker(args) => match args.action {
                Some(broker::BrokerAction::Decommission { node }) => {
                    partition::decommission(&brokers()?, cli.output, node).await
                }
                None => broker::run(args, cli.tls_ca, cli.tls_cert, cli.tls_key).await,
            },
            Command::Partition(command) => partition::run(&brokers()?, cli.output, command).await,
            Command::Topic(command) => topic::run(&brokers()?, cli.output, command).await,
            Command::Produce(args) => produce::run(&brokers()?, cli.output, args).await,
            Command::Consume(args) => consume::run(&brokers()?, cli.output, args).await,
            Command::Group(command) => group::run(&brokers()?, cli.output, command).await,
            Command::Bench(args) => bench::run(&brokers()?, cli.output, args).await,
            Command::Cluster(cluster::ClusterCommand::Status) => {
                cluster::status(&brokers()?, cli.output).await
            }
            Command::Leader(cluster::LeaderCommand::Elect(args)) => {
                cluster::elect(&brokers()?, cli.output, args).await
            }
            Command::Dev(cluster::DevCommand::Cluster(args)) => cluster::dev_cluster(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`cairn consume t | head`) is a normal way to stop.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cairn: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--acks`: 0, 1 or all.
pub(crate) fn parse_acks(text: &str) -> anyhow::Result<cairn_client::Acks> {
    match text {
        "0" => Ok(cairn_client::Acks::None),
        "1" => Ok(cairn_client::Acks::Leader),
        "all" | "-1" => Ok(cairn_client::Acks::All),
        other => anyhow::bail!("--acks {other:?}: use 0, 1 or all"),
    }
}

/// `--compression`: none, gzip, snappy, lz4 or zstd.
pub(crate) fn parse_compression(text: &str) -> anyhow::Result<cairn_client::Compression> {
    cairn_client::Compression::from_name(text).ok_or_else(|| {
        anyhow::anyhow!("--compression {text:?}: use none, gzip, snappy, lz4 or zstd")
    })
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
