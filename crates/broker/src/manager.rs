//! Topics and their partitions over the storage engine. Blocking (file I/O): async callers use
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use cairn_storage::{Fs, Log, LogConfig, OpenError};

use crate::clock::Clock;
use crate::error::BrokerError;
use crate::metadata::{ClusterMetadata, MetadataError, MetadataStore, TopicRecord};
use crate::partition::{Partition, ReplicaState};
use crate::topic::{PARTITIONS_PER_TOPIC_MAX, TopicConfig, TopicDefaults, validate_topic_name};

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

/// What every partition of this broker shares.
#[derive(Debug, Clone)]
pub struct Host {
    /// The file system the logs live on.
    pub fs: Arc<dyn Fs>,
    /// The broker's clock.
    pub clock: Arc<dyn Clock>,
    /// This broker's node id.
    pub node_id: u32,
}

/// All topics of this broker.
#[derive(Debug)]
pub struct TopicManager {
    host: Host,
    data_dir: PathBuf,
    defaults: TopicDefaults,
    partitions_max: u32,
    store: Box<dyn MetadataStore>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes creations and deletions (metadata read-modify-write).
    admin: Mutex<()>,
}

fn partition_dir(data_dir: &Path, topic: &str, index: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

impl TopicManager {
    /// Opens every topic recorded in `store` (recovering their logs).
    pub fn open(
        host: Host,
        data_dir: &Path,
        defaults: TopicDefaults,
        partitions_max: u32,
        store: Box<dyn MetadataStore>,
    ) -> Result<TopicManager, ManagerError> {
        remove_deleted_dirs(&*host.fs, data_dir);
        let metadata = store.load()?;
        let mut topics = BTreeMap::new();
        for (name, record) in &metadata.topics {
            let log_config = record.config.resolve(&defaults).unwrap_or_else(|err| {
                tracing::warn!(topic = %name, error = %err, "stored topic config no longer valid; using defaults");
                LogConfig::default()
            });
            let topic = open_topic(&host, data_dir, name, record, &log_config)?;
            topics.insert(name.clone(), Arc::new(topic));
        }
        tracing::info!(n_topics = topics.len(), "topics opened");
        Ok(TopicManager {
            host,
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
    ) -> Result<(), BrokerError> {
        validate_topic_name(name).map_err(BrokerError::InvalidTopic)?;
        let partitions = if partitions == 0 {
            self.defaults.partitions
        } else {
            partitions
        };
        if partitions > PARTITIONS_PER_TOPIC_MAX {
            return Err(BrokerError::InvalidPartitions(format!(
                "{partitions} partitions; a topic may have at most {PARTITIONS_PER_TOPIC_MAX}"
            )));
        }
        let config =
            TopicConfig::new(overrides, &self.defaults).map_err(BrokerError::InvalidConfig)?;
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.topic(name).is_some() {
            return Err(BrokerError::TopicAlreadyExists(name.to_string()));
        }
        let total = self.n_partitions() + u64::from(partitions);
        if total > u64::from(self.partitions_max) {
            return Err(BrokerError::PolicyViolation(format!(
                "{total} partitions would exceed partitions_max = {}",
                self.partitions_max
            )));
        }
        if validate_only {
            return Ok(());
        }
        let record = TopicRecord {
            partitions,
            config,
            leader_epoch: 0,
            created_ms: self.host.clock.unix_ms(),
        };
        let log_config = record
            .config
            .resolve(&self.defaults)
            .map_err(BrokerError::InvalidConfig)?;
        // Partitions first, then the metadata that makes them visible: a crash in between leaves
        // directories no metadata names, which are ignored.
        let topic = open_topic(&self.host, &self.data_dir, name, &record, &log_config)
            .map_err(|err| BrokerError::storage(&err))?;
        self.commit(|topics| {
            topics.insert(name.to_string(), Arc::new(topic));
        })?;
        tracing::info!(topic = %name, partitions, "topic created");
        Ok(())
    }

    /// Deletes a topic and its data.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(topic) = self.topic(name) else {
            return Err(BrokerError::UnknownTopic(name.to_string()));
        };
        self.commit(|topics| {
            topics.remove(name);
        })?;
        // Readers may still hold the logs: rename the directories out of the way (a recreated
        // topic gets fresh ones) and remove them; open maps keep their unlinked files alive.
        let fs = &*self.host.fs;
        let now_ms = self.host.clock.unix_ms();
        for partition in &topic.partitions {
            let dir = partition_dir(&self.data_dir, name, partition.index());
            let doomed = self
                .data_dir
                .join(format!("{name}-{}.{now_ms}.deleted", partition.index()));
            match fs.rename(&dir, &doomed) {
                Ok(()) => {
                    if let Err(err) = fs.remove_dir_all(&doomed) {
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
    ) -> Result<(), BrokerError> {
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
                        leader_epoch: topic.partitions.first().map_or(0, |p| p.leader_epoch()),
                        created_ms: topic.created_ms,
                    };
                    (name.clone(), record)
                })
                .collect(),
        };
        self.store
            .save(&metadata)
            .map_err(|err| BrokerError::storage(&err))?;
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
                    Ok(partition) => match partition.into_log().close() {
                        Ok(()) => n_clean += 1,
                        Err(err) => tracing::error!(error = %err, "closing partition log"),
                    },
                    Err(shared) => {
                        if let Err(err) = shared.log().flush_all() {
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
    host: &Host,
    data_dir: &Path,
    name: &str,
    record: &TopicRecord,
    log_config: &LogConfig,
) -> Result<Topic, ManagerError> {
    let topic_name: Arc<str> = Arc::from(name);
    let mut partitions = Vec::with_capacity(record.partitions as usize);
    for index in 0..record.partitions {
        let dir = partition_dir(data_dir, name, index);
        let log =
            Log::open_with(Arc::clone(&host.fs), &dir, log_config.clone()).map_err(|source| {
                ManagerError::Open {
                    topic: name.to_string(),
                    partition: index,
                    source,
                }
            })?;
        partitions.push(Arc::new(Partition::new(
            Arc::clone(&topic_name),
            index,
            host.node_id,
            log,
            ReplicaState::single(host.node_id, record.leader_epoch),
            Arc::clone(&host.clock),
        )));
    }
    Ok(Topic {
        name: topic_name,
        config: record.config.clone(),
        partitions,
        created_ms: record.created_ms,
    })
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
