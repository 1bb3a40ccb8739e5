//! Topics and their partitions as this broker sees them: every topic of the cluster (from the
//! metadata image), and the partitions this broker hosts (a replica of), each over its log.
//! The image drives it: [`TopicManager::apply`] opens the partitions newly assigned here, gives
//! every hosted partition its replica state (leader, epochs, ISR), and closes and deletes what
//! no longer belongs here. Blocking (file I/O): async callers use `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use cairn_controller::{MetadataImage, TopicImage};
use cairn_storage::{Fs, Log, LogConfig, OpenError, checkpoint};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::error::BrokerError;
use crate::partition::{Partition, ReplicaState, ReplicationConfig, Role};
use crate::topic::{TopicConfig, TopicDefaults};

/// What every partition of this broker shares.
#[derive(Debug, Clone)]
pub struct Host {
    /// The file system the logs live on.
    pub fs: Arc<dyn Fs>,
    /// The broker's clock.
    pub clock: Arc<dyn Clock>,
    /// This broker's node id.
    pub node_id: u32,
    /// Whether this broker may act as a leader: it is registered, unfenced, and has heard from
    /// the controller within its session. While not, every partition answers
    /// NOT_LEADER_OR_FOLLOWER instead of serving a leadership the cluster may have moved.
    pub lease: Arc<Lease>,
    /// `replica_lag_time_max_ms`: a follower not caught up for this long leaves the ISR.
    pub replica_lag_max_ms: i64,
    /// A safety rule broken on purpose (test builds only: `controls.rs`).
    pub negative_control: Option<crate::controls::NegativeControl>,
    /// The data directory's free space (`storage_min_free_bytes`); `None`: unguarded.
    pub disk: Option<Arc<crate::disk::DiskGuard>>,
}

impl Host {
    /// Whether `control` is on.
    pub(crate) fn breaks(&self, control: crate::controls::NegativeControl) -> bool {
        cfg!(feature = "negative-controls") && self.negative_control == Some(control)
    }
}

impl Host {
    /// Admits an append of `n_bytes` if the data directory has room for it above
    /// `storage_min_free_bytes` ([`crate::disk`]).
    pub(crate) fn admit_append(&self, n_bytes: u64) -> Result<(), BrokerError> {
        match &self.disk {
            Some(disk) => disk.admit(n_bytes),
            None => Ok(()),
        }
    }

    /// Tells the disk guard how an append went: one that found no space (the file system full
    /// although the margin admitted it, or the margin is off) makes the broker ask to be fenced
    /// until an append succeeds again.
    pub(crate) fn note_append<T>(&self, result: &Result<T, cairn_storage::AppendError>) {
        if let Some(disk) = &self.disk {
            match result {
                Err(cairn_storage::AppendError::NoSpace { .. }) => disk.note_no_space(),
                Ok(_) => disk.note_written(),
                Err(_) => {}
            }
        }
    }

    /// Whether this broker may lead now.
    pub fn may_lead(&self) -> bool {
        self.lease.valid()
    }
}

/// The right to lead, granted by the controller's answer to a heartbeat until one session after
/// that heartbeat was sent (the controller fences a broker one session after it last heard from
/// it, which is later). Checked against the time at every use: a process that was paused past
/// its session (SIGSTOP, a VM freeze, a long GC-like stall) holds no lease when it resumes, even
/// before its next heartbeat is answered, so it cannot serve the leadership its stale metadata
/// names. Real time (`std::time::Instant`), as the controller's session is.
#[derive(Debug)]
pub struct Lease {
    granted: AtomicBool,
    /// Nanoseconds after `origin` until which the grant holds.
    until: std::sync::atomic::AtomicU64,
    origin: std::time::Instant,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            granted: AtomicBool::new(false),
            until: std::sync::atomic::AtomicU64::new(0),
            origin: std::time::Instant::now(),
        }
    }
}

impl Lease {
    fn nanos(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Grants the lease until `until`.
    pub fn grant_until(&self, until: std::time::Instant) {
        self.until.store(self.nanos(until), Ordering::Release);
        self.granted.store(true, Ordering::Release);
    }

    /// Takes it away (fenced, shutting down, registering again).
    pub fn revoke(&self) {
        self.granted.store(false, Ordering::Release);
    }

    /// Whether it is granted (however old the grant).
    pub fn granted(&self) -> bool {
        self.granted.load(Ordering::Acquire)
    }

    /// Whether it is granted and has not run out.
    pub fn valid(&self) -> bool {
        self.granted() && self.nanos(std::time::Instant::now()) < self.until.load(Ordering::Acquire)
    }
}

/// A topic: the cluster's facts about it, and the partitions hosted here.
#[derive(Debug)]
pub struct Topic {
    /// Its name.
    pub name: Arc<str>,
    /// Its id (the metadata offset that created it).
    pub id: u64,
    /// Its config overrides.
    pub config: TopicConfig,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Replicas per partition (its first partition's, as Kafka reports it).
    pub replication_factor: usize,
    /// Every partition by index: hosted here, or elsewhere (`None`).
    partitions: Vec<Option<Arc<Partition>>>,
}

impl Topic {
    /// How many partitions the topic has (in the cluster).
    pub fn n_partitions(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// The partitions hosted here.
    pub fn local(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.partitions.iter().flatten()
    }

    /// Partition `index` if hosted here: NOT_LEADER_OR_FOLLOWER if another broker hosts it,
    /// UNKNOWN_TOPIC_OR_PARTITION if the topic has no such partition.
    pub fn partition(&self, index: u32, node: u32) -> Result<&Arc<Partition>, BrokerError> {
        match self.partitions.get(index as usize) {
            Some(Some(partition)) => Ok(partition),
            Some(None) => Err(BrokerError::NotLeaderOrFollower {
                node,
                topic: self.name.to_string(),
                partition: index,
            }),
            None => Err(BrokerError::UnknownTopicOrPartition {
                topic: self.name.to_string(),
                partition: index,
            }),
        }
    }
}

/// Opening a partition's log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// A partition's log could not be opened.
    #[error("opening partition {topic}-{partition}")]
    Open {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Why.
        #[source]
        source: OpenError,
    },
}

/// All topics of the cluster, and the partitions of this broker.
#[derive(Debug)]
pub struct TopicManager {
    host: Host,
    data_dir: PathBuf,
    defaults: TopicDefaults,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    image: RwLock<Arc<MetadataImage>>,
    /// The offset of the last image applied here.
    applied: watch::Sender<u64>,
    /// Applies one image at a time.
    applying: Mutex<()>,
}

/// The file in a partition's directory naming the topic it belongs to (Kafka's
/// `partition.metadata`): a topic deleted and created again while this broker was down leaves a
/// directory of the old topic, which must not be taken for the new one's.
const PARTITION_METADATA: &str = "partition.metadata";

fn partition_dir(data_dir: &Path, topic: &str, index: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

impl TopicManager {
    /// A manager of no topics yet; removes directories of deletions interrupted by a crash.
    pub fn new(host: Host, data_dir: &Path, defaults: TopicDefaults) -> TopicManager {
        remove_deleted_dirs(&*host.fs, data_dir);
        let (applied, _) = watch::channel(0);
        TopicManager {
            host,
            data_dir: data_dir.to_path_buf(),
            defaults,
            topics: RwLock::new(BTreeMap::new()),
            image: RwLock::new(Arc::new(MetadataImage::default())),
            applied,
            applying: Mutex::new(()),
        }
    }

    /// What every partition shares.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Broker-wide topic defaults.
    pub fn defaults(&self) -> &TopicDefaults {
        &self.defaults
    }

    /// The last image applied.
    pub fn image(&self) -> Arc<MetadataImage> {
        Arc::clone(&self.image.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The offset of the last image applied, as a feed.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// A partition hosted here, by topic name and index.
    pub fn partition(&self, topic: &str, index: u32) -> Option<Arc<Partition>> {
        self.topic(topic)?
            .partition(index, self.host.node_id)
            .ok()
            .cloned()
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Makes this broker's topics what `image` says (blocking): opens newly assigned partitions,
    /// updates replica states, removes what is gone. Returns the partitions opened. A partition
    /// that cannot be opened is left out (logged) and tried again at the next image.
    pub fn apply(&self, image: Arc<MetadataImage>) -> Vec<Arc<Partition>> {
        let _one = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        let node = self.host.node_id;
        let old = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Removals first: a topic deleted and created again under its name gets directories of
        // the same names, which must not be removed after they were opened for the new topic.
        let hosted_in_image = |name: &str, id: u64, index: u32| {
            image
                .topic(name)
                .filter(|t| t.id == id)
                .and_then(|t| t.partitions.get(index as usize))
                .is_some_and(|p| p.replicas.contains(&node))
        };
        for topic in old.values() {
            let gone = image.topic(&topic.name).is_none_or(|t| t.id != topic.id);
            for partition in topic.local() {
                if !hosted_in_image(&topic.name, topic.id, partition.index()) {
                    partition.retire();
                    self.delete_partition_dir(&topic.name, partition.index());
                }
            }
            if gone {
                tracing::info!(topic = %topic.name, "topic deleted");
            }
        }
        let mut next = BTreeMap::new();
        let mut opened = Vec::new();
        let mut changes = RoleChanges::default();
        for (name, found) in &image.topics {
            let existing = old.get(name).filter(|t| t.id == found.id);
            let topic = self.topic_from_image(found, existing, node, &mut opened, &mut changes);
            next.insert(name.clone(), Arc::new(topic));
        }
        for partition in &opened {
            changes.note(partition, None);
        }
        changes.log();
        log_opened(&opened, started.elapsed());
        *self.topics.write().unwrap_or_else(|e| e.into_inner()) = next;
        *self.image.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&image);
        self.applied.send_replace(image.offset);
        opened
    }

    fn topic_from_image(
        &self,
        found: &TopicImage,
        existing: Option<&Arc<Topic>>,
        node: u32,
        opened: &mut Vec<Arc<Partition>>,
        changes: &mut RoleChanges,
    ) -> Topic {
        let config = TopicConfig {
            overrides: found.config.clone(),
        };
        let log_config = config.resolve(&self.defaults).unwrap_or_else(|err| {
            tracing::warn!(topic = %found.name, error = %err, "topic config not valid here; using defaults");
            LogConfig::default()
        });
        let name: Arc<str> =
            existing.map_or_else(|| Arc::from(found.name.as_str()), |t| Arc::clone(&t.name));
        let replication = ReplicationConfig {
            durability: config.durability(),
            replica_lag_max_ms: self.host.replica_lag_max_ms,
        };
        let mut to_open = Vec::new();
        let mut partitions: Vec<Option<Arc<Partition>>> = found
            .partitions
            .iter()
            .enumerate()
            .map(|(index, state)| {
                let index = index as u32;
                if !state.replicas.contains(&node) {
                    return None;
                }
                let replica = ReplicaState {
                    leader: state.leader,
                    leader_epoch: state.leader_epoch,
                    partition_epoch: state.partition_epoch,
                    replicas: state.replicas.clone(),
                    isr: state.isr.clone(),
                };
                if let Some(Some(partition)) =
                    existing.and_then(|t| t.partitions.get(index as usize))
                {
                    let before = partition.role();
                    partition.set_replica_state(replica);
                    changes.note(partition, Some(before));
                    return Some(Arc::clone(partition));
                }
                to_open.push((index, replica));
                None
            })
            .collect();
        // Opening a log is a few file-system calls and fsyncs: thousands of partitions (a
        // start, a large topic) open side by side.
        let results = parallel_map(to_open, OPEN_THREADS, |(index, replica)| {
            let result =
                self.open_partition(&name, found.id, index, &log_config, replica, replication);
            (index, result)
        });
        for (index, result) in results {
            match result {
                Ok(partition) => {
                    let partition = Arc::new(partition);
                    opened.push(Arc::clone(&partition));
                    if let Some(slot) = partitions.get_mut(index as usize) {
                        *slot = Some(partition);
                    }
                }
                Err(err) => {
                    tracing::error!(topic = %found.name, partition = index, error = %crate::error::error_chain(&err), "cannot open partition");
                }
            }
        }
        Topic {
            name,
            id: found.id,
            config,
            created_ms: found.created_ms,
            replication_factor: found.partitions.first().map_or(1, |p| p.replicas.len()),
            partitions,
        }
    }

    fn open_partition(
        &self,
        topic: &Arc<str>,
        topic_id: u64,
        index: u32,
        config: &LogConfig,
        replica: ReplicaState,
        replication: ReplicationConfig,
    ) -> Result<Partition, ManagerError> {
        let fs = &*self.host.fs;
        let dir = partition_dir(&self.data_dir, topic, index);
        let open_error = |source| ManagerError::Open {
            topic: topic.to_string(),
            partition: index,
            source,
        };
        let owner = checkpoint::read(fs, &dir, PARTITION_METADATA, "partition")
            .ok()
            .flatten()
            .and_then(|lines| {
                lines
                    .first()?
                    .strip_prefix("topic_id ")?
                    .parse::<u64>()
                    .ok()
            });
        if owner.is_some_and(|id| id != topic_id) {
            tracing::warn!(dir = %dir.display(), old = ?owner, new = topic_id, "partition directory of a deleted topic; removing it");
            self.delete_partition_dir(topic, index);
        }
        let log =
            // The broker's data-directory lock covers every partition directory.
            Log::open_in_locked_dir(Arc::clone(&self.host.fs), &dir, config.clone())
                .map_err(open_error)?;
        if owner != Some(topic_id)
            && let Err(err) = checkpoint::write(
                fs,
                &dir,
                PARTITION_METADATA,
                "partition",
                &[format!("topic_id {topic_id}")],
            )
        {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot write partition.metadata");
        }
        Ok(Partition::new(
            Arc::clone(topic),
            index,
            self.host.clone(),
            log,
            replica,
            replication,
        ))
    }

    /// Moves a partition's directory aside and removes it (readers holding its maps keep their
    /// bytes: unlinked files live until unmapped).
    fn delete_partition_dir(&self, topic: &str, index: u32) {
        let fs = &*self.host.fs;
        let dir = partition_dir(&self.data_dir, topic, index);
        let now_ms = self.host.clock.unix_ms();
        let doomed = self
            .data_dir
            .join(format!("{topic}-{index}.{now_ms}.deleted"));
        match fs.rename(&dir, &doomed) {
            Ok(()) => {
                if let Err(err) = fs.remove_dir_all(&doomed) {
                    tracing::warn!(dir = %doomed.display(), error = %err, "could not remove deleted partition; removed at next start");
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "could not move deleted partition aside")
            }
        }
    }

    /// Closes every log cleanly (the next start scans nothing). Logs still shared with in-flight
    /// requests are flushed instead and recovered at the next start. A clean close is a few
    /// fsyncs per log, so [`CLOSE_THREADS`] threads close logs side by side (one after another,
    /// 10,000 partitions took 19 s to stop).
    pub fn close_all(&self) {
        let topics = std::mem::take(&mut *self.topics.write().unwrap_or_else(|e| e.into_inner()));
        // A topic still shared with a request: its partitions are flushed, not skipped.
        let partitions: Vec<Arc<Partition>> = topics
            .into_values()
            .flat_map(|topic| match Arc::try_unwrap(topic) {
                Ok(topic) => topic.partitions.into_iter().flatten().collect::<Vec<_>>(),
                Err(shared) => shared.partitions.iter().flatten().cloned().collect(),
            })
            .collect();
        // Per log: closed cleanly, or flushed (still shared with a request), or failed.
        let closed = parallel_map(
            partitions,
            CLOSE_THREADS,
            |partition| match Arc::try_unwrap(partition) {
                Ok(partition) => match partition.into_log().close() {
                    Ok(()) => Some(true),
                    Err(err) => {
                        tracing::error!(error = %err, "closing partition log");
                        None
                    }
                },
                Err(shared) => {
                    if let Err(err) = shared.log().flush_all() {
                        tracing::error!(error = %err, "flushing partition log");
                    }
                    Some(false)
                }
            },
        );
        let n_clean = closed.iter().filter(|c| **c == Some(true)).count();
        let n_flushed = closed.iter().filter(|c| **c == Some(false)).count();
        tracing::info!(n_clean, n_flushed, "logs closed");
    }
}

/// Threads closing logs at shutdown: closing waits on fsyncs, which overlap.
const CLOSE_THREADS: usize = 16;

/// Threads opening logs: opening waits on the file system (and fsyncs for new ones).
const OPEN_THREADS: usize = 8;

/// `work` applied to each item, on up to `threads` scoped threads taking items in turn (inline
/// for a single item); the results in the items' order.
fn parallel_map<T: Send, R: Send>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    if items.len() <= 1 {
        return items.into_iter().map(work).collect();
    }
    let n = items.len();
    let threads = threads.min(n);
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let done = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some((i, item)) = next else { return };
                    let result = work(item);
                    done.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, result));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, result)| result).collect()
}

fn remove_deleted_dirs(fs: &dyn Fs, data_dir: &Path) {
    let Ok(names) = fs.list_dir(data_dir) else {
        return;
    };
    for name in names.iter().filter(|n| n.ends_with(".deleted")) {
        let dir = data_dir.join(name);
        if let Err(err) = fs.remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %err, "could not remove deleted partition");
        }
    }
}

/// One INFO line for the partitions an image opened here (at start, all of them): how many, of
/// how many topics, their bytes, how long opening them took, and what recovering their logs took
/// (each log's own line is DEBUG unless recovery scanned or cut bytes). `clean` is whether every
/// log that held data was closed cleanly.
fn log_opened(opened: &[Arc<Partition>], took: std::time::Duration) {
    if opened.is_empty() {
        return;
    }
    let (mut unclean, mut scanned, mut truncated, mut bytes) = (0usize, 0u64, 0u64, 0u64);
    let mut topics = std::collections::HashSet::new();
    for partition in opened {
        topics.insert(partition.topic());
        let log = partition.log();
        bytes += log.size_bytes();
        let report = log.recovery_report();
        if !report.clean && report.n_bytes_scanned > 0 {
            unclean += 1;
        }
        scanned += report.n_bytes_scanned;
        truncated += report.n_bytes_truncated;
    }
    tracing::info!(
        opened = opened.len(),
        topics = topics.len(),
        bytes,
        elapsed_ms = took.as_millis() as u64,
        clean = unclean == 0,
        unclean,
        n_bytes_scanned = scanned,
        n_bytes_truncated = truncated,
        "partitions opened"
    );
}

/// The partitions whose role here changed while one image was applied: one INFO line per image
/// (naming them when there are few), not one per partition (a broker opening 10,000 partitions
/// logs one line). Each change is also logged at DEBUG by the partition.
#[derive(Default)]
struct RoleChanges {
    leading: usize,
    following: usize,
    offline: usize,
    named: Vec<String>,
}

/// How many changed partitions the INFO line names.
const ROLE_CHANGES_NAMED: usize = 8;

impl RoleChanges {
    /// Counts `partition` if its role differs from `before` (`None`: just opened).
    fn note(&mut self, partition: &Partition, before: Option<Role>) {
        let now = partition.role();
        if before == Some(now) {
            return;
        }
        match now {
            Role::Leader => self.leading += 1,
            Role::Follower => self.following += 1,
            Role::None => self.offline += 1,
        }
        if self.named.len() < ROLE_CHANGES_NAMED {
            self.named.push(format!(
                "{}-{}:{now:?}",
                partition.topic(),
                partition.index()
            ));
        }
    }

    fn log(&self) {
        let total = self.leading + self.following + self.offline;
        if total == 0 {
            return;
        }
        let more = total.saturating_sub(self.named.len());
        tracing::info!(
            leading = self.leading,
            following = self.following,
            offline = self.offline,
            partitions = %self.named.join(" "),
            more,
            "partition roles changed"
        );
    }
}
