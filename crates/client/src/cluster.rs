//! The client's view of a cluster: a metadata cache (the brokers, each partition's leader and
//! leader epoch) and one shared connection per broker, opened on first use and again after it
//! broke. Producers, consumers and admin clients route each request to the broker that leads
//! its partition and refresh the cache when a broker says it does not (NOT_LEADER_OR_FOLLOWER,
//! FENCED_LEADER_EPOCH, ...) or a connection breaks.
//!
//! A cluster reached through one given connection (an embedded broker's) sends everything over
//! it: there is nothing to route.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_protocol::native::*;
use futures::future::BoxFuture;

use crate::connection::{Connection, Dialect};
use crate::error::ClientError;
use crate::tls::ClientTls;

/// Makes a new connection (an embedded broker gives in-process ones).
pub type Connector =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Connection, ClientError>> + Send + Sync>;

/// A connector to `addr` over TCP.
pub fn tcp_connector(addr: &str, client_id: &str) -> Connector {
    let (addr, client_id) = (addr.to_string(), client_id.to_string());
    Arc::new(move || {
        let (addr, client_id) = (addr.clone(), client_id.clone());
        Box::pin(async move { Connection::connect(&addr, &client_id).await })
    })
}

/// Where one partition is led.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The leader's node id, `None` while the partition has no leader.
    pub leader: Option<u32>,
    /// The leader epoch the metadata gave.
    pub leader_epoch: u32,
}

/// How connections are made.
enum Mode {
    /// To brokers by address, learnt from the metadata, starting from a bootstrap list.
    Routed {
        bootstrap: Vec<String>,
        dialect: Option<Arc<dyn Dialect>>,
        tls: Option<ClientTls>,
    },
    /// Every request through connections from one connector: one broker, nothing to route.
    Fixed(Connector),
}

#[derive(Default)]
struct State {
    /// Node id to `host:port`.
    brokers: HashMap<u32, String>,
    /// Shared connections by node id (`u32::MAX`: the bootstrap or fixed connection).
    conns: HashMap<u32, Connection>,
    /// Partitions by topic.
    topics: HashMap<String, Vec<Route>>,
    /// Topics whose routes are known to be stale.
    stale: std::collections::HashSet<String>,
    controller_id: Option<u32>,
    /// Addresses that recently failed to answer, and when: asked last for a while.
    failing: HashMap<String, std::time::Instant>,
}

/// How long an address that failed to answer is asked last.
const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// How long requests avoid a leader whose broker just failed to answer, refreshing the metadata
/// instead: a paused or cut-off leader is replaced within its session, and the metadata a client
/// fetches right after its request timed out may still name it.
const AVOID_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Any connection: the bootstrap one or a fixed one.
const ANY: u32 = u32::MAX;

/// How long a broker may take to answer a metadata request before another is asked (metadata is
/// small and served from memory: a broker that does not answer in this time is down or paused).
const METADATA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A cluster as a client sees it. Cheap to clone; clones share the cache and connections.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    client_id: String,
    mode: Mode,
    state: Mutex<State>,
    /// One metadata refresh at a time; others wait for it instead of sending their own.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Cluster")
            .field("client_id", &self.inner.client_id)
            .field("brokers", &state.brokers)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster reached through `bootstrap`: one or more `host:port`, comma-separated (any
    /// one that answers will do).
    pub async fn connect(bootstrap: &str, client_id: &str) -> Result<Cluster, ClientError> {
        Cluster::connect_routed(bootstrap, client_id, None, None).await
    }

    /// As [`Cluster::connect`], every connection over TLS when `tls` is given.
    pub async fn connect_tls(
        bootstrap: &str,
        client_id: &str,
        tls: Option<ClientTls>,
    ) -> Result<Cluster, ClientError> {
        Cluster::connect_routed(bootstrap, client_id, None, tls).await
    }

    /// As [`Cluster::connect`], speaking `dialect` instead of the native protocol.
    pub async fn connect_with_dialect(
        bootstrap: &str,
        client_id: &str,
        dialect: Arc<dyn Dialect>,
    ) -> Result<Cluster, ClientError> {
        Cluster::connect_routed(bootstrap, client_id, Some(dialect), None).await
    }

    async fn connect_routed(
        bootstrap: &str,
        client_id: &str,
        dialect: Option<Arc<dyn Dialect>>,
        tls: Option<ClientTls>,
    ) -> Result<Cluster, ClientError> {
        let bootstrap: Vec<String> = bootstrap
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if bootstrap.is_empty() {
            return Err(ClientError::InvalidArgument("no bootstrap address".into()));
        }
        let cluster = Cluster::new(
            client_id,
            Mode::Routed {
                bootstrap,
                dialect,
                tls,
            },
        );
        // Fail now, with the reason, if no bootstrap broker answers.
        cluster.any().await?;
        Ok(cluster)
    }

    /// A cluster reached through one connection: every request goes over it.
    pub fn with_connection(conn: Connection) -> Cluster {
        let client_id = conn.client_id().to_string();
        Cluster::new(
            &client_id,
            Mode::Fixed(Arc::new(move || {
                let conn = conn.clone();
                Box::pin(std::future::ready(Ok(conn)))
            })),
        )
    }

    /// A cluster reached through connections from `connector`, every request through them.
    pub fn with_connector(connector: Connector, client_id: &str) -> Cluster {
        Cluster::new(client_id, Mode::Fixed(connector))
    }

    fn new(client_id: &str, mode: Mode) -> Cluster {
        Cluster {
            inner: Arc::new(Inner {
                client_id: client_id.to_string(),
                mode,
                state: Mutex::new(State::default()),
                refreshing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client id connections are opened with.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Whether requests are routed to partition leaders (false: one broker takes everything).
    pub fn is_routed(&self) -> bool {
        matches!(self.inner.mode, Mode::Routed { .. })
    }

    /// A new connection to `addr` (a fixed cluster ignores the address).
    pub async fn dial(&self, addr: &str) -> Result<Connection, ClientError> {
        match &self.inner.mode {
            Mode::Routed { dialect, tls, .. } => {
                Connection::connect_with(addr, &self.inner.client_id, dialect.clone(), tls.as_ref())
                    .await
            }
            Mode::Fixed(connector) => connector().await,
        }
    }

    /// A new connection of its own to broker `node` (for long polls that must not hold up a
    /// shared connection: group heartbeats).
    pub async fn dedicated(&self, node: u32) -> Result<Connection, ClientError> {
        let addr = self.state().brokers.get(&node).cloned();
        match (addr, &self.inner.mode) {
            (_, Mode::Fixed(connector)) => connector().await,
            (Some(addr), _) => self.dial(&addr).await,
            (None, _) => Err(ClientError::InvalidArgument(format!(
                "broker {node} is not in the metadata"
            ))),
        }
    }

    /// A connection to any broker: for metadata and requests any broker answers.
    pub async fn any(&self) -> Result<Connection, ClientError> {
        self.any_but(&[]).await
    }

    /// A connection to any broker whose address is not in `avoid` (brokers that just failed to
    /// answer), or to any at all if every one is.
    async fn any_but(&self, avoid: &[String]) -> Result<Connection, ClientError> {
        let mut avoid = avoid.to_vec();
        {
            let mut state = self.state();
            state.failing.retain(|_, at| at.elapsed() < FAILING_FOR);
            avoid.extend(state.failing.keys().cloned());
        }
        let cached = {
            let state = self.state();
            let mut conns: Vec<Connection> = state.conns.values().cloned().collect();
            conns.sort_by_key(|c| avoid.iter().any(|a| a == c.addr()));
            conns.into_iter().next()
        };
        if let Some(conn) = cached.filter(|c| !avoid.iter().any(|a| a == c.addr())) {
            return Ok(conn);
        }
        let candidates: Vec<String> = match &self.inner.mode {
            Mode::Fixed(_) => vec![String::new()],
            Mode::Routed { bootstrap, .. } => {
                let known: Vec<String> = self.state().brokers.values().cloned().collect();
                let mut all: Vec<String> =
                    known.into_iter().chain(bootstrap.iter().cloned()).collect();
                // Brokers that just failed last.
                all.sort_by_key(|a| avoid.contains(a));
                all
            }
        };
        let mut last = None;
        for addr in candidates {
            match self.dial(&addr).await {
                Ok(conn) => {
                    self.state().conns.insert(ANY, conn.clone());
                    return Ok(conn);
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::InvalidArgument("no broker to connect to".into())))
    }

    /// The shared connection to broker `node`, opened if need be.
    pub async fn connection(&self, node: u32) -> Result<Connection, ClientError> {
        if !self.is_routed() {
            return self.any().await;
        }
        if let Some(conn) = self.cached(node) {
            return Ok(conn);
        }
        let addr = self.state().brokers.get(&node).cloned();
        let Some(addr) = addr else {
            self.refresh(&[]).await?;
            return Box::pin(self.connection_known(node)).await;
        };
        let conn = self.dial(&addr).await?;
        Ok(self.state().conns.entry(node).or_insert(conn).clone())
    }

    async fn connection_known(&self, node: u32) -> Result<Connection, ClientError> {
        let addr = self.state().brokers.get(&node).cloned().ok_or_else(|| {
            ClientError::InvalidArgument(format!("broker {node} is not in the metadata"))
        })?;
        let conn = self.dial(&addr).await?;
        Ok(self.state().conns.entry(node).or_insert(conn).clone())
    }

    /// The shared connection to `node` if it is open (no I/O).
    pub fn cached(&self, node: u32) -> Option<Connection> {
        let state = self.state();
        if !self.is_routed() {
            return state.conns.get(&ANY).cloned();
        }
        state.conns.get(&node).cloned()
    }

    /// Drops the connection to `node` after it broke (the next use opens another), and marks
    /// every route stale.
    pub fn forget(&self, node: u32) {
        let mut state = self.state();
        if let Some(conn) = state.conns.remove(&node) {
            // The same broker may also be the connection for requests any broker answers.
            let addr = conn.addr().to_string();
            state.conns.retain(|_, c| c.addr() != addr);
            state.failing.insert(addr, std::time::Instant::now());
        }
        if !self.is_routed() {
            state.conns.remove(&ANY);
        }
        let topics: Vec<String> = state.topics.keys().cloned().collect();
        state.stale.extend(topics);
    }

    /// Whether broker `node` failed to answer within the last second: its partitions' requests
    /// wait for fresher metadata rather than go to it again at once.
    pub fn avoid(&self, node: u32) -> bool {
        let state = self.state();
        state
            .brokers
            .get(&node)
            .and_then(|addr| state.failing.get(addr))
            .is_some_and(|at| at.elapsed() < AVOID_FOR)
    }

    /// Marks `topic`'s routes stale: the next lookup refreshes them.
    pub fn invalidate(&self, topic: &str) {
        self.state().stale.insert(topic.to_string());
    }

    /// Where `topic`'s partition leads, from the cache (no I/O): `None` if unknown or stale.
    pub fn route(&self, topic: &str, partition: u32) -> Option<Route> {
        let state = self.state();
        if state.stale.contains(topic) {
            return None;
        }
        state.topics.get(topic)?.get(partition as usize).copied()
    }

    /// How many partitions `topic` has, from the cache (no I/O).
    pub fn n_partitions(&self, topic: &str) -> Option<u32> {
        self.state().topics.get(topic).map(|p| p.len() as u32)
    }

    /// The active controller's id as of the last refresh.
    pub fn controller_id(&self) -> Option<u32> {
        self.state().controller_id
    }

    /// The brokers as of the last refresh: node id to `host:port`.
    pub fn brokers(&self) -> Vec<(u32, String)> {
        let mut brokers: Vec<(u32, String)> = self
            .state()
            .brokers
            .iter()
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        brokers.sort();
        brokers
    }

    /// Asks any broker for the metadata of `topics` (empty: all) and caches it.
    pub async fn metadata(
        &self,
        topics: &[String],
        allow_auto_create: bool,
    ) -> Result<MetadataResponse, ClientError> {
        let request = Request::Metadata(MetadataRequest {
            topics: topics.to_vec(),
            allow_auto_create,
        });
        let metadata: MetadataResponse = self.call_any(&request, METADATA_TIMEOUT).await?;
        self.cache(&metadata);
        Ok(metadata)
    }

    /// Sends `request`, which any broker answers, to one broker after another until one answers
    /// within `timeout` (at most three): a broker that just died, or is paused (it accepts
    /// connections but never answers), is dropped and asked last for a while.
    pub async fn call_any<T: Wire + Send + 'static>(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut last = None;
        let mut failed = Vec::new();
        for _ in 0..3 {
            let conn = self.any_but(&failed).await?;
            let answer = tokio::time::timeout(timeout, conn.call::<T>(request));
            let err = match answer.await {
                Ok(Ok(answer)) => {
                    self.state().failing.remove(conn.addr());
                    return Ok(answer);
                }
                Ok(Err(err @ ClientError::Connection { .. })) => err,
                Ok(Err(err)) => return Err(err),
                Err(_) => ClientError::Timeout(format!(
                    "{} from {}",
                    request.api_key().name(),
                    conn.addr()
                )),
            };
            {
                let mut state = self.state();
                state.conns.retain(|_, c| c.addr() != conn.addr());
                state
                    .failing
                    .insert(conn.addr().to_string(), std::time::Instant::now());
            }
            failed.push(conn.addr().to_string());
            last = Some(err);
        }
        Err(last.unwrap_or(ClientError::Closed))
    }

    /// Refreshes the cache for `topics` (and the broker list); callers that arrive while a
    /// refresh is under way wait for it.
    pub async fn refresh(&self, topics: &[String]) -> Result<(), ClientError> {
        let started = Instant::now();
        let _one = self.inner.refreshing.lock().await;
        // Another refresh finished while this one waited: it is fresh enough unless a topic is
        // still unknown or stale.
        if started.elapsed() > Duration::from_millis(1) {
            let state = self.state();
            if topics
                .iter()
                .all(|t| state.topics.contains_key(t) && !state.stale.contains(t))
            {
                return Ok(());
            }
        }
        self.metadata(topics, false).await.map(|_| ())
    }

    /// The leader of `topic`'s partition and its leader epoch, refreshing the cache once if the
    /// route is unknown or stale; LEADER_NOT_AVAILABLE while the partition has no leader.
    pub async fn leader(&self, topic: &str, partition: u32) -> Result<(u32, u32), ClientError> {
        if self.route(topic, partition).is_none() {
            self.refresh(&[topic.to_string()]).await?;
        }
        match self.route(topic, partition) {
            Some(Route {
                leader: Some(node),
                leader_epoch,
            }) => Ok((node, leader_epoch)),
            Some(Route { leader: None, .. }) => Err(ClientError::broker(
                format!("{topic}-{partition}"),
                ErrorCode::LEADER_NOT_AVAILABLE.0,
                "no leader right now".into(),
            )),
            None => Err(ClientError::broker(
                format!("{topic}-{partition}"),
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                String::new(),
            )),
        }
    }

    fn cache(&self, metadata: &MetadataResponse) {
        let mut state = self.state();
        if !metadata.brokers.is_empty() {
            state.brokers = metadata
                .brokers
                .iter()
                .map(|b| (b.node_id, join_host_port(&b.host, b.port)))
                .collect();
            // Connections to brokers no longer listed are dropped.
            let known: std::collections::HashSet<u32> = state.brokers.keys().copied().collect();
            state.conns.retain(|id, _| *id == ANY || known.contains(id));
        }
        state.controller_id =
            (metadata.controller_id != u32::MAX).then_some(metadata.controller_id);
        for topic in &metadata.topics {
            state.stale.remove(&topic.name);
            if topic.error_code != 0 {
                state.topics.remove(&topic.name);
                continue;
            }
            let mut routes = vec![
                Route {
                    leader: None,
                    leader_epoch: 0
                };
                topic.partitions.len()
            ];
            for p in &topic.partitions {
                if let Some(route) = routes.get_mut(p.partition as usize) {
                    *route = Route {
                        leader: (p.leader != u32::MAX && p.error_code == 0).then_some(p.leader),
                        leader_epoch: p.leader_epoch,
                    };
                }
            }
            state.topics.insert(topic.name.clone(), routes);
        }
    }
}

/// `host:port`, with brackets around an IPv6 host.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl ClientError {
    /// Whether the error says the client's view of the cluster is out of date: the broker is
    /// not (or no longer) the leader or coordinator, or a connection broke. The operation is
    /// retried after a metadata refresh.
    pub fn is_stale_metadata(&self) -> bool {
        match self {
            ClientError::Connection { .. } => true,
            ClientError::Broker { code, .. } => [
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                ErrorCode::LEADER_NOT_AVAILABLE,
                ErrorCode::NOT_LEADER_OR_FOLLOWER,
                ErrorCode::FENCED_LEADER_EPOCH,
                ErrorCode::UNKNOWN_LEADER_EPOCH,
                ErrorCode::NOT_COORDINATOR,
                ErrorCode::COORDINATOR_NOT_AVAILABLE,
            ]
            .contains(code),
            _ => false,
        }
    }
}
