//! Cluster metadata (topics, their partitions, configs and leader epochs) behind one interface.
//! Today a file in the data directory; a later issue replaces it with a Raft-replicated controller
//! log, and a single node becomes a cluster of one on the same code path.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

/// Metadata in `<data_dir>/cluster-metadata.json`: JSON, then a `crc32` line.
#[derive(Debug)]
pub struct FileMetadataStore {
    dir: PathBuf,
}

const FILE_NAME: &str = "cluster-metadata.json";

impl FileMetadataStore {
    /// A store in `dir`.
    pub fn new(dir: &Path) -> FileMetadataStore {
        FileMetadataStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }
}

impl MetadataStore for FileMetadataStore {
    fn load(&self) -> Result<ClusterMetadata, MetadataError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Ok(ClusterMetadata::default());
            }
            Err(source) => {
                return Err(MetadataError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        let corrupt = |reason: &str| MetadataError::Corrupt {
            path: path.clone(),
            reason: reason.into(),
        };
        let body_end = text
            .trim_end()
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| corrupt("no crc line"))?;
        let (body, crc_line) = text.split_at(body_end);
        let stored = crc_line
            .trim()
            .strip_prefix("crc32 ")
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or_else(|| corrupt("bad crc line"))?;
        if stored != crc32fast::hash(body.as_bytes()) {
            return Err(corrupt("crc mismatch"));
        }
        serde_json::from_str(body).map_err(|err| corrupt(&err.to_string()))
    }

    fn save(&self, metadata: &ClusterMetadata) -> Result<(), MetadataError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| MetadataError::Io { op, path, source }
        };
        let mut body =
            serde_json::to_string_pretty(metadata).map_err(|err| MetadataError::Corrupt {
                path: path.clone(),
                reason: err.to_string(),
            })?;
        body.push('\n');
        let crc = crc32fast::hash(body.as_bytes());
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        file.write_all(body.as_bytes())
            .map_err(io("writing", &tmp))?;
        file.write_all(format!("crc32 {crc:08x}\n").as_bytes())
            .map_err(io("writing", &tmp))?;
        // The rename must not publish contents that are not on disk yet.
        file.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
        // And the rename itself is durable only once the directory is synced.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileMetadataStore::new(dir.path());
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
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("orders", "orderz");
        fs::write(&path, text).unwrap();
        assert!(matches!(store.load(), Err(MetadataError::Corrupt { .. })));
    }
}
