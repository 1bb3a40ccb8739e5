//! Topics and their partitions over the storage engine. Blocking (file I/O): async callers use
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_protocol::native::ErrorCode;
use cairn_storage::{Log, LogConfig, OpenError};
use tokio::sync::watch;

use crate::metadata::{ClusterMetadata, MetadataError, MetadataStore, TopicRecord};
use crate::producers::ProducerStates;
use crate::topic::{PARTITIONS_PER_TOPIC_MAX, TopicConfig, TopicDefaults, validate_topic_name};

/// One partition: its log and a channel that announces its log end offset to long-polling
/// fetchers.
#[derive(Debug)]
pub struct Partition {
    /// The topic's name.
    pub topic: Arc<str>,
    /// The partition index.
    pub index: u32,
    /// The log.
    pub log: Log,
    /// Current leader epoch.
    pub leader_epoch: u32,
    /// Idempotent producers' recent batches; held across the check and the append.
    pub producers: Mutex<ProducerStates>,
    log_end: watch::Sender<u64>,
}

impl Partition {
    /// Announces appends to waiting fetchers.
    pub fn notify_appended(&self) {
        let end = self.log.log_end_offset().0;
        self.log_end.send_if_modified(|current| {
            let changed = *current != end;
            *current = end;
            changed
        });
    }

    /// A receiver that changes whenever the log end moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.log_end.subscribe()
    }
}

/// A topic.
#[derive(Debug)]
pub struct Topic {
    /// Its name.
    pub name: Arc<str>,
    /// Its config overrides.
    pub config: TopicConfig,
    /// Its partitions, by index.
    pub partitions: Vec<Arc<Partition>>,
    /// Creation time, Unix ms.
    pub created_ms: i64,
}

/// Why a topic operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError {
    /// The protocol error.
    pub code: ErrorCode,
    /// Human text.
    pub message: String,
}

impl TopicError {
    fn new(code: ErrorCode, message: impl Into<String>) -> TopicError {
        TopicError {
            code,
            message: message.into(),
        }
    }
}

/// Opening the topics at start failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// Metadata could not be read.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
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

/// All topics of this broker.
#[derive(Debug)]
pub struct TopicManager {
    data_dir: PathBuf,
    defaults: TopicDefaults,
    partitions_max: u32,
    store: Box<dyn MetadataStore>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes creations and deletions (metadata read-modify-write).
    admin: Mutex<()>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn partition_dir(data_dir: &Path, topic: &str, index: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

impl TopicManager {
    /// Opens every topic recorded in `store` (recovering their logs).
    pub fn open(
        data_dir: &Path,
        defaults: TopicDefaults,
        partitions_max: u32,
        store: Box<dyn MetadataStore>,
    ) -> Result<TopicManager, ManagerError> {
        remove_deleted_dirs(data_dir);
        let metadata = store.load()?;
        let mut topics = BTreeMap::new();
        for (name, record) in &metadata.topics {
            let log_config = record.config.resolve(&defaults).unwrap_or_else(|err| {
                tracing::warn!(topic = %name, error = %err, "stored topic config no longer valid; using defaults");
                LogConfig::default()
            });
            let topic = open_topic(data_dir, name, record, &log_config)?;
            topics.insert(name.clone(), Arc::new(topic));
        }
        tracing::info!(n_topics = topics.len(), "topics opened");
        Ok(TopicManager {
            data_dir: data_dir.to_path_buf(),
            defaults,
            partitions_max,
            store,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
        })
    }

    /// Broker-wide topic defaults.
    pub fn defaults(&self) -> &TopicDefaults {
        &self.defaults
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// A partition by topic name and index.
    pub fn partition(&self, topic: &str, index: u32) -> Option<Arc<Partition>> {
        self.topic(topic)?.partitions.get(index as usize).cloned()
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

    fn n_partitions(&self) -> u64 {
        self.topics()
            .iter()
            .map(|t| t.partitions.len() as u64)
            .sum()
    }

    /// Creates a topic (`partitions = 0`: the default count).
    pub fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<(), TopicError> {
        validate_topic_name(name)
            .map_err(|m| TopicError::new(ErrorCode::INVALID_TOPIC_EXCEPTION, m))?;
        let partitions = if partitions == 0 {
            self.defaults.partitions
        } else {
            partitions
        };
        if partitions > PARTITIONS_PER_TOPIC_MAX {
            return Err(TopicError::new(
                ErrorCode::INVALID_PARTITIONS,
                format!(
                    "{partitions} partitions; a topic may have at most {PARTITIONS_PER_TOPIC_MAX}"
                ),
            ));
        }
        let config = TopicConfig::new(overrides, &self.defaults)
            .map_err(|m| TopicError::new(ErrorCode::INVALID_CONFIG, m))?;
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.topic(name).is_some() {
            return Err(TopicError::new(
                ErrorCode::TOPIC_ALREADY_EXISTS,
                format!("topic {name:?} already exists"),
            ));
        }
        let total = self.n_partitions() + u64::from(partitions);
        if total > u64::from(self.partitions_max) {
            return Err(TopicError::new(
                ErrorCode::POLICY_VIOLATION,
                format!(
                    "{total} partitions would exceed partitions_max = {}",
                    self.partitions_max
                ),
            ));
        }
        if validate_only {
            return Ok(());
        }
        let record = TopicRecord {
            partitions,
            config,
            leader_epoch: 0,
            created_ms: now_ms(),
        };
        let log_config = record
            .config
            .resolve(&self.defaults)
            .map_err(|m| TopicError::new(ErrorCode::INVALID_CONFIG, m))?;
        // Partitions first, then the metadata that makes them visible: a crash in between leaves
        // directories no metadata names, which are ignored.
        let topic = open_topic(&self.data_dir, name, &record, &log_config)
            .map_err(|err| TopicError::new(ErrorCode::KAFKA_STORAGE_ERROR, error_chain(&err)))?;
        self.commit(|topics| {
            topics.insert(name.to_string(), Arc::new(topic));
        })?;
        tracing::info!(topic = %name, partitions, "topic created");
        Ok(())
    }

    /// Deletes a topic and its data.
    pub fn delete_topic(&self, name: &str) -> Result<(), TopicError> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(topic) = self.topic(name) else {
            return Err(TopicError::new(
                ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                format!("topic {name:?} does not exist"),
            ));
        };
        self.commit(|topics| {
            topics.remove(name);
        })?;
        // Readers may still hold the logs: rename the directories out of the way (a recreated
        // topic gets fresh ones) and remove them; open maps keep their unlinked files alive.
        for partition in &topic.partitions {
            let dir = partition_dir(&self.data_dir, name, partition.index);
            let doomed =
                self.data_dir
                    .join(format!("{name}-{}.{}.deleted", partition.index, now_ms()));
            match std::fs::rename(&dir, &doomed) {
                Ok(()) => {
                    if let Err(err) = std::fs::remove_dir_all(&doomed) {
                        tracing::warn!(dir = %doomed.display(), error = %err, "could not remove deleted partition; removed at next start");
                    }
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "could not move deleted partition aside")
                }
            }
        }
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Applies `change` to a copy of the topics, saves the resulting metadata durably, and only
    /// then makes the change visible. Callers hold `admin`.
    fn commit(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Arc<Topic>>),
    ) -> Result<(), TopicError> {
        let mut topics = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        change(&mut topics);
        let metadata = ClusterMetadata {
            topics: topics
                .iter()
                .map(|(name, topic)| {
                    let record = TopicRecord {
                        partitions: topic.partitions.len() as u32,
                        config: topic.config.clone(),
                        leader_epoch: topic.partitions.first().map_or(0, |p| p.leader_epoch),
                        created_ms: topic.created_ms,
                    };
                    (name.clone(), record)
                })
                .collect(),
        };
        self.store
            .save(&metadata)
            .map_err(|err| TopicError::new(ErrorCode::KAFKA_STORAGE_ERROR, error_chain(&err)))?;
        *self.topics.write().unwrap_or_else(|e| e.into_inner()) = topics;
        Ok(())
    }

    /// Closes every log cleanly (the next start scans nothing). Logs still shared with in-flight
    /// requests are flushed instead and recovered at the next start.
    pub fn close_all(&self) {
        let topics = std::mem::take(&mut *self.topics.write().unwrap_or_else(|e| e.into_inner()));
        let mut n_clean = 0;
        let mut n_flushed = 0;
        for (_, topic) in topics {
            let Ok(topic) = Arc::try_unwrap(topic) else {
                continue;
            };
            for partition in topic.partitions {
                match Arc::try_unwrap(partition) {
                    Ok(partition) => match partition.log.close() {
                        Ok(()) => n_clean += 1,
                        Err(err) => tracing::error!(error = %err, "closing partition log"),
                    },
                    Err(shared) => {
                        if let Err(err) = shared.log.flush_all() {
                            tracing::error!(error = %err, "flushing partition log");
                        }
                        n_flushed += 1;
                    }
                }
            }
        }
        tracing::info!(n_clean, n_flushed, "logs closed");
    }
}

fn open_topic(
    data_dir: &Path,
    name: &str,
    record: &TopicRecord,
    log_config: &LogConfig,
) -> Result<Topic, ManagerError> {
    let topic_name: Arc<str> = Arc::from(name);
    let mut partitions = Vec::with_capacity(record.partitions as usize);
    for index in 0..record.partitions {
        let log = Log::open(partition_dir(data_dir, name, index), log_config.clone()).map_err(
            |source| ManagerError::Open {
                topic: name.to_string(),
                partition: index,
                source,
            },
        )?;
        let (log_end, _) = watch::channel(log.log_end_offset().0);
        let producers = Mutex::new(rebuild_producers(&log));
        partitions.push(Arc::new(Partition {
            topic: Arc::clone(&topic_name),
            index,
            log,
            leader_epoch: record.leader_epoch,
            producers,
            log_end,
        }));
    }
    Ok(Topic {
        name: topic_name,
        config: record.config.clone(),
        partitions,
        created_ms: record.created_ms,
    })
}

/// Idempotent producers' state from the batch headers of the active segment (a retry arrives
/// within the producer's delivery timeout, long before its batch leaves the active segment).
fn rebuild_producers(log: &Log) -> ProducerStates {
    let mut states = ProducerStates::default();
    let mut offset = log.active_segment_base();
    let end = log.log_end_offset();
    while offset < end {
        let Ok(fetched) = log.read(offset, 8 * 1024 * 1024) else {
            break;
        };
        if fetched.bytes.is_empty() {
            break;
        }
        states.rebuild(&fetched.bytes, now_ms());
        match last_offset_of(&fetched.bytes) {
            Some(last) if last >= offset.0 => offset = cairn_protocol::Offset(last + 1),
            _ => break,
        }
    }
    states
}

/// The last offset of the last whole batch in `bytes`.
fn last_offset_of(mut bytes: &[u8]) -> Option<u64> {
    let mut last = None;
    while let Ok(header) = cairn_protocol::batch::BatchHeader::parse(bytes) {
        last = Some(header.last_offset().max(0) as u64);
        bytes = bytes.get(header.total_bytes()..).unwrap_or_default();
    }
    last
}

fn remove_deleted_dirs(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(".deleted")
            && let Err(err) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(dir = %entry.path().display(), error = %err, "could not remove deleted partition");
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
