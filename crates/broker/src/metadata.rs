//! Cluster metadata (topics, their partitions, configs and leader epochs) behind one interface.
//! Today a file in the data directory; a later issue replaces it with a Raft-replicated controller
//! log, and a single node becomes a cluster of one on the same code path.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_storage::{Fatal, Fs, checkpoint};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::topic::TopicConfig;

/// One topic's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    /// Partition count.
    pub partitions: u32,
    /// Config overrides.
    pub config: TopicConfig,
    /// Leader epoch of every partition (one broker leads them all for now).
    pub leader_epoch: u32,
    /// Creation time, Unix ms.
    pub created_ms: i64,
}

/// All cluster metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Topics by name.
    pub topics: BTreeMap<String, TopicRecord>,
}

/// Metadata could not be read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// I/O on the metadata file failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is damaged.
    #[error("metadata file {} is damaged: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where cluster metadata is kept.
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// The current metadata.
    fn load(&self) -> Result<ClusterMetadata, MetadataError>;
    /// Replaces the metadata durably: when this returns, a crash keeps the new version.
    fn save(&self, metadata: &ClusterMetadata) -> Result<(), MetadataError>;
}

/// Metadata in `<data_dir>/cluster-metadata.json`: a storage checkpoint file (header line, the
/// JSON, a `crc32` line).
#[derive(Debug)]
pub struct FileMetadataStore {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
}

const FILE_NAME: &str = "cluster-metadata.json";

impl FileMetadataStore {
    /// A store in `dir`.
    pub fn new(fs: Arc<dyn Fs>, dir: &Path) -> FileMetadataStore {
        FileMetadataStore {
            fs,
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }
}

const KIND: &str = "cluster-metadata";

impl MetadataStore for FileMetadataStore {
    fn load(&self) -> Result<ClusterMetadata, MetadataError> {
        let corrupt = |reason: String| MetadataError::Corrupt {
            path: self.path(),
            reason,
        };
        match checkpoint::read(&*self.fs, &self.dir, FILE_NAME, KIND) {
            Ok(None) => Ok(ClusterMetadata::default()),
            Ok(Some(lines)) => {
                serde_json::from_str(&lines.join("\n")).map_err(|err| corrupt(err.to_string()))
            }
            Err(err) if err.kind() == io::ErrorKind::InvalidData => Err(corrupt(err.to_string())),
            Err(source) => Err(MetadataError::Io {
                op: "reading",
                path: self.path(),
                source,
            }),
        }
    }

    fn save(&self, metadata: &ClusterMetadata) -> Result<(), MetadataError> {
        let json =
            serde_json::to_string_pretty(metadata).map_err(|err| MetadataError::Corrupt {
                path: self.path(),
                reason: err.to_string(),
            })?;
        let lines: Vec<String> = json.lines().map(str::to_string).collect();
        // The same atomic, CRC-checked file as the logs' checkpoints: tmp, fsync, rename, fsync dir.
        checkpoint::write(&*self.fs, &self.dir, FILE_NAME, KIND, &lines).map_err(
            |fatal| match fatal {
                Fatal::Io { op, path, source } => MetadataError::Io { op, path, source },
                other => MetadataError::Io {
                    op: "writing",
                    path: self.path(),
                    source: io::Error::other(other.to_string()),
                },
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileMetadataStore::new(Arc::new(cairn_storage::StdFs), dir.path());
        assert_eq!(store.load().unwrap(), ClusterMetadata::default());
        let mut metadata = ClusterMetadata::default();
        metadata.topics.insert(
            "orders".into(),
            TopicRecord {
                partitions: 3,
                config: TopicConfig {
                    overrides: BTreeMap::new(),
                },
                leader_epoch: 0,
                created_ms: 1,
            },
        );
        store.save(&metadata).unwrap();
        assert_eq!(store.load().unwrap(), metadata);
        let path = dir.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("orders", "orderz");
        std::fs::write(&path, text).unwrap();
        assert!(matches!(store.load(), Err(MetadataError::Corrupt { .. })));
    }
}
