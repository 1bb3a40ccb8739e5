//! This broker's membership in the cluster: it registers with the active controller (as a new
//! incarnation at every start), heartbeats, holds its lease to lead (lost when fenced or when the
//! controller has not answered for a session), applies every new metadata image to its topics,
//! and at shutdown asks the controller to move its leaderships first.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_controller::{BrokerInfo, Command, CommandError, ControllerClient, Reply};
use cairn_protocol::native::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::manager::{Lease, TopicManager};
use crate::offsets::{OFFSETS_TOPIC, OffsetStore};

/// The broker's side of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The controller quorum.
    pub client: ControllerClient,
    /// What this broker registers as.
    pub info: BrokerInfo,
    lease: Arc<Lease>,
    session_timeout: Duration,
    heartbeat_interval: Duration,
    /// The current registration's broker epoch.
    epoch: Mutex<Option<u64>>,
    /// Registered, caught up and unfenced: the broker serves as the metadata says.
    ready: watch::Sender<bool>,
}

impl Cluster {
    /// A member that has not registered yet (no lease).
    pub fn new(
        client: ControllerClient,
        info: BrokerInfo,
        lease: Arc<Lease>,
        session_timeout: Duration,
        heartbeat_interval: Duration,
    ) -> Cluster {
        lease.revoke();
        let (ready, _) = watch::channel(false);
        Cluster {
            client,
            info,
            lease,
            session_timeout,
            heartbeat_interval,
            epoch: Mutex::new(None),
            ready,
        }
    }

    /// The current registration's broker epoch, once registered.
    pub fn broker_epoch(&self) -> Option<u64> {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the broker is registered, caught up and unfenced.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Grants the lease for one session from `sent` (when the answered heartbeat was sent), or
    /// revokes it.
    fn set_lease(&self, may_lead: bool, sent: Instant) {
        let was = self.lease.granted();
        if may_lead {
            self.lease
                .grant_until(sent.into_std() + self.session_timeout);
        } else {
            self.lease.revoke();
        }
        if was != may_lead {
            tracing::info!(
                node = self.info.node_id,
                may_lead,
                "leadership lease changed"
            );
        }
        self.ready.send_if_modified(|ready| {
            let changed = *ready != may_lead;
            *ready = may_lead;
            changed
        });
    }

    /// Registers, then heartbeats until `shutdown`; registers again if the controller no longer
    /// knows this registration. At shutdown, a last heartbeat asks the controller to move this
    /// broker's leaderships (controlled shutdown).
    pub async fn run(
        self: Arc<Self>,
        manager: Arc<TopicManager>,
        shutdown: CancellationToken,
        killed: CancellationToken,
    ) {
        let applied = manager.applied();
        'register: loop {
            let broker_epoch = tokio::select! {
                epoch = self.register() => epoch,
                () = shutdown.cancelled() => return,
            };
            *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(broker_epoch);
            let mut last_ok = Instant::now();
            let mut tick = tokio::time::interval(self.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut applied = applied.clone();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    // Caught up: say so at once (unfencing waits for it).
                    _ = applied.changed(), if !self.lease.granted() => {}
                    () = shutdown.cancelled() => {
                        if !killed.is_cancelled() {
                            self.controlled_shutdown(broker_epoch, &manager).await;
                        }
                        return;
                    }
                }
                let sent = Instant::now();
                // A broker that cannot write asks to be fenced: its leaderships move to
                // replicas that can, until its disk has room again (or, for a log an I/O
                // error poisoned, until it restarts: Kafka's offline log directory).
                let want_fence = manager
                    .host()
                    .disk
                    .as_ref()
                    .is_some_and(|disk| disk.wants_fence())
                    || manager
                        .topics()
                        .iter()
                        .any(|topic| topic.local().any(|p| p.log().is_poisoned()));
                let heartbeat = Command::Heartbeat {
                    node_id: self.info.node_id,
                    broker_epoch,
                    metadata_offset: *applied.borrow(),
                    shutting_down: false,
                    want_fence,
                };
                let answer =
                    tokio::time::timeout(self.session_timeout, self.client.execute(heartbeat));
                match answer.await {
                    Ok(Ok(Reply::Heartbeat { fenced })) => {
                        last_ok = sent;
                        self.set_lease(!fenced, sent);
                    }
                    Ok(Err(CommandError::Rejected(rejected)))
                        if rejected.error_code() == ErrorCode::STALE_BROKER_EPOCH =>
                    {
                        tracing::warn!(
                            node = self.info.node_id,
                            "registration no longer known; registering again"
                        );
                        self.set_lease(false, sent);
                        continue 'register;
                    }
                    Ok(other) => {
                        tracing::debug!(answer = ?other, "heartbeat failed");
                    }
                    Err(_) => tracing::debug!("heartbeat timed out"),
                }
                if last_ok.elapsed() >= self.session_timeout && self.lease.granted() {
                    // The controller may have fenced us and moved our leaderships: stop serving
                    // them rather than acknowledge writes a new leader will not have.
                    tracing::warn!(
                        node = self.info.node_id,
                        silent_ms = last_ok.elapsed().as_millis() as u64,
                        "no heartbeat answered within the session: no longer leading"
                    );
                    self.set_lease(false, sent);
                }
            }
        }
    }

    /// Registers until it succeeds (the quorum may not be up yet).
    async fn register(&self) -> u64 {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self
                .client
                .execute(Command::Register(self.info.clone()))
                .await
            {
                Ok(Reply::Registered { broker_epoch }) => {
                    tracing::info!(node = self.info.node_id, broker_epoch, incarnation = %self.info.incarnation, "registered with the controller");
                    return broker_epoch;
                }
                Ok(other) => tracing::warn!(answer = ?other, "unexpected answer to a registration"),
                Err(err) => tracing::warn!(error = %err, "registration failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn controlled_shutdown(&self, broker_epoch: u64, manager: &TopicManager) {
        let heartbeat = Command::Heartbeat {
            node_id: self.info.node_id,
            broker_epoch,
            metadata_offset: *manager.applied().borrow(),
            shutting_down: true,
            want_fence: false,
        };
        self.set_lease(false, Instant::now());
        let answer = tokio::time::timeout(Duration::from_secs(2), self.client.execute(heartbeat));
        match answer.await {
            Ok(Ok(_)) => tracing::info!(node = self.info.node_id, "leaderships moved for shutdown"),
            Ok(Err(err)) => tracing::warn!(error = %err, "controlled shutdown refused"),
            Err(_) => tracing::warn!("controlled shutdown timed out"),
        }
    }
}

/// Applies every new metadata image to the topics (on the blocking pool), and loads the
/// committed offsets of the offsets-topic partitions it opens.
pub(crate) async fn apply_images(
    client: ControllerClient,
    manager: Arc<TopicManager>,
    offsets: Arc<OffsetStore>,
    groups: Arc<crate::groups::Coordinator>,
    shutdown: CancellationToken,
) {
    let mut feed = client.subscribe();
    loop {
        let image = Arc::clone(&feed.borrow_and_update());
        if image.offset > *manager.applied().borrow() || image.offset == 0 {
            let (manager, offsets) = (Arc::clone(&manager), Arc::clone(&offsets));
            let groups = Arc::clone(&groups);
            let applied = tokio::task::spawn_blocking(move || {
                for partition in manager.apply(image) {
                    if &**partition.topic() == OFFSETS_TOPIC {
                        offsets.load(&partition);
                    }
                }
                // A group's coordinator moved here: its commits copied as a follower and its
                // stored membership are loaded before it serves the group (until then it answers
                // COORDINATOR_LOAD_IN_PROGRESS, heartbeats NONE).
                let Some(topic) = manager.topic(OFFSETS_TOPIC) else {
                    return;
                };
                let n = topic.n_partitions();
                let of = |index: u32| {
                    move |group: &str| {
                        cairn_protocol::partitioner::partition_for_key(group.as_bytes(), n) == index
                    }
                };
                let node = manager.host().node_id;
                for partition in topic.local() {
                    // Named leader by the image, whether or not this broker holds its lease yet
                    // (at a restart the images come first): the partition's role flips to
                    // leader with the lease, without a new image, and must find it loaded.
                    let state = partition.replica_state();
                    let (index, epoch) = (partition.index(), state.leader_epoch);
                    let leads = state.leader == Some(node);
                    let loaded = offsets.loaded_epoch(index);
                    if leads && loaded != Some(epoch) {
                        groups.unload(of(index));
                        groups.restore(offsets.reload(partition, n));
                        offsets.set_loaded(index, Some(epoch));
                    } else if !leads && loaded.is_some() {
                        offsets.set_loaded(index, None);
                        groups.unload(of(index));
                    }
                }
            });
            if applied.await.is_err() {
                tracing::error!("applying a metadata image panicked");
            }
        }
        tokio::select! {
            changed = feed.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}
