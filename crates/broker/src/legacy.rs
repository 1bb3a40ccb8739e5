//! The metadata of a single node from before the controller existed: `cluster-metadata.json`
//! (topics, their configs and leader epochs) and `producer-ids` (the end of the last reserved
//! block), both checkpoint files in the data directory. At the first start with a metadata log
//! they are imported as records, and renamed `*.imported` once the records are committed.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use cairn_controller::{MetadataRecord, PartitionState};
use cairn_storage::{Fs, checkpoint};
use serde::Deserialize;

const METADATA_FILE: &str = "cluster-metadata.json";
const PRODUCER_IDS_FILE: &str = "producer-ids";

#[derive(Debug, Deserialize)]
struct TopicRecord {
    partitions: u32,
    config: TopicConfig,
    leader_epoch: u32,
    created_ms: i64,
}

#[derive(Debug, Deserialize)]
struct TopicConfig {
    overrides: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ClusterMetadata {
    topics: BTreeMap<String, TopicRecord>,
}

/// The records that recreate what the legacy files hold, on `node` (`None`: nothing to
/// import). Producer ids continue after `next_producer_id` and the legacy block's end.
pub(crate) fn records(
    fs: &dyn Fs,
    data_dir: &Path,
    node: u32,
    next_producer_id: i64,
) -> io::Result<Option<Vec<MetadataRecord>>> {
    let Some(lines) = checkpoint::read(fs, data_dir, METADATA_FILE, "cluster-metadata")? else {
        return Ok(None);
    };
    let metadata: ClusterMetadata = serde_json::from_str(&lines.join("\n"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut records: Vec<MetadataRecord> = metadata
        .topics
        .into_iter()
        .map(|(name, topic)| MetadataRecord::TopicCreated {
            name,
            config: topic.config.overrides,
            created_ms: topic.created_ms,
            partitions: (0..topic.partitions)
                .map(|_| PartitionState {
                    leader_epoch: topic.leader_epoch,
                    ..PartitionState::new(vec![node], Some(node))
                })
                .collect(),
        })
        .collect();
    let reserved = checkpoint::read(fs, data_dir, PRODUCER_IDS_FILE, "producer-ids")?
        .and_then(|lines| lines.first()?.parse::<i64>().ok())
        .unwrap_or(0);
    if reserved > next_producer_id {
        records.push(MetadataRecord::ProducerIdsAllocated {
            node_id: node,
            first: next_producer_id,
            count: u32::try_from(reserved - next_producer_id).unwrap_or(u32::MAX),
        });
    }
    Ok(Some(records))
}

/// Renames the legacy files once their records are committed.
pub(crate) fn mark_imported(fs: &dyn Fs, data_dir: &Path) -> io::Result<()> {
    for name in [METADATA_FILE, PRODUCER_IDS_FILE] {
        let path = data_dir.join(name);
        if fs.exists(&path)? {
            fs.rename(&path, &data_dir.join(format!("{name}.imported")))?;
        }
    }
    fs.sync_dir(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legacy_data_directory_becomes_records() {
        let dir = tempfile::tempdir().unwrap();
        let fs = cairn_storage::StdFs;
        assert!(records(&fs, dir.path(), 1, 0).unwrap().is_none());
        let json = r#"{"topics":{"orders":{"partitions":2,"config":{"overrides":{"retention.ms":"1000"}},"leader_epoch":3,"created_ms":7}}}"#;
        checkpoint::write(
            &fs,
            dir.path(),
            METADATA_FILE,
            "cluster-metadata",
            &[json.into()],
        )
        .unwrap();
        checkpoint::write(
            &fs,
            dir.path(),
            PRODUCER_IDS_FILE,
            "producer-ids",
            &["2000".into()],
        )
        .unwrap();
        let records = records(&fs, dir.path(), 1, 0).unwrap().unwrap();
        let MetadataRecord::TopicCreated {
            name,
            partitions,
            config,
            ..
        } = &records[0]
        else {
            panic!("{records:?}")
        };
        assert_eq!(name, "orders");
        assert_eq!(config["retention.ms"], "1000");
        assert_eq!(partitions.len(), 2);
        assert_eq!(partitions[1].leader_epoch, 3);
        assert_eq!(
            records[1],
            MetadataRecord::ProducerIdsAllocated {
                node_id: 1,
                first: 0,
                count: 2000
            }
        );
        mark_imported(&fs, dir.path()).unwrap();
        assert!(super::records(&fs, dir.path(), 1, 0).unwrap().is_none());
    }
}
