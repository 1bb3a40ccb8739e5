//! The controller's Raft log on the storage engine: `<data_dir>/__cluster_metadata-0/` is a log
//! like any partition's (segments of CRC-checked batches, recovered the same way after a crash),
//! holding one batch per Raft entry at the entry's index, with the vote, the purge point and the
//! snapshot in checkpoint files beside it. Everything goes through the broker's `Fs`, so the
//! fault-injecting file system reaches the metadata log too.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_controller::RaftStore;
use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchBuilder, Batches, Compression};
use cairn_protocol::limits::{BATCH_BYTES_MAX, DECOMPRESSED_BYTES_MAX};
use cairn_storage::{FlushPolicy, Fs, Log, LogConfig, OpenError, checkpoint};

/// The directory of the metadata log inside the data directory (KRaft's name).
pub const METADATA_LOG_DIR: &str = "__cluster_metadata-0";

/// Bytes read per storage read while collecting entries.
const READ_CHUNK_BYTES: u32 = 4 << 20;

/// The Raft store of a broker's controller.
#[derive(Debug)]
pub struct MetadataLog {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    /// `None` once closed.
    log: std::sync::RwLock<Option<Log>>,
}

fn other(err: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(err)
}

impl MetadataLog {
    /// Opens (creating, recovering) the metadata log in `data_dir` (blocking).
    pub fn open(fs: Arc<dyn Fs>, data_dir: &Path) -> Result<MetadataLog, OpenError> {
        let dir = data_dir.join(METADATA_LOG_DIR);
        let config = LogConfig {
            segment_bytes: 64 << 20,
            batch_bytes_max: BATCH_BYTES_MAX,
            preallocate_bytes: 1 << 20,
            // Synced by `append` itself, before it returns.
            flush: FlushPolicy::Os,
            // After a snapshot arrives from the leader the log continues past a gap: a gap is
            // what a compacted log may have.
            compacted: true,
            ..LogConfig::default()
        };
        let log = Log::open_with(Arc::clone(&fs), &dir, config)?;
        Ok(MetadataLog {
            fs,
            dir,
            log: std::sync::RwLock::new(Some(log)),
        })
    }

    /// Closes the log cleanly (the next open scans nothing); every later call fails. Blocking.
    pub fn close(&self) -> Result<(), cairn_storage::Fatal> {
        let log = self
            .log
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match log {
            Some(log) => log.close(),
            None => Ok(()),
        }
    }

    fn with_log<T>(&self, f: impl FnOnce(&Log) -> io::Result<T>) -> io::Result<T> {
        let log = self
            .log
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match log.as_ref() {
            Some(log) => f(log),
            None => Err(io::Error::other("the metadata log is closed")),
        }
    }

    /// Entries from the batches in `bytes`, those with index in `from..to`.
    fn entries(bytes: Bytes, from: u64, to: u64, out: &mut Vec<(u64, Vec<u8>)>) -> io::Result<u64> {
        let mut next = from;
        for found in Batches::new(bytes, BATCH_BYTES_MAX) {
            let found = found.map_err(other)?;
            let index = u64::try_from(found.header().base_offset).map_err(other)?;
            next = index + 1;
            if index < from || index >= to {
                continue;
            }
            let records = found.records(DECOMPRESSED_BYTES_MAX).map_err(other)?;
            let value = records
                .into_iter()
                .next()
                .and_then(|r| r.value)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty entry"))?;
            out.push((index, value.to_vec()));
        }
        Ok(next)
    }
}

impl RaftStore for MetadataLog {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> io::Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let mut batches = Vec::new();
        for (index, bytes) in entries {
            let mut builder = BatchBuilder::new(Compression::None);
            builder.push(0, None, Some(bytes), &[]);
            let mut one = builder.build().map_err(other)?.to_vec();
            let base = i64::try_from(*index).map_err(other)?;
            batch::stamp(&mut one, base, 0).map_err(other)?;
            batches.extend_from_slice(&one);
        }
        self.with_log(|log| {
            log.append_replicated(&batches).map_err(other)?;
            // Raft counts an entry only once it is durable.
            log.flush(Offset(last.0 + 1)).map_err(other)
        })
    }

    fn truncate(&self, index: u64) -> io::Result<()> {
        self.with_log(|log| log.truncate_to(Offset(index)).map(|_| ()).map_err(other))
    }

    fn purge(&self, index: u64) -> io::Result<()> {
        self.with_log(|log| {
            log.delete_before(Offset(index.saturating_add(1)))
                .map(|_| ())
                .map_err(other)
        })
    }

    fn read(&self, from: u64, to: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        self.with_log(|log| {
            let mut out = Vec::new();
            let mut at = from.max(log.log_start_offset().0);
            let end = to.min(log.log_end_offset().0);
            while at < end {
                let fetched = log.read(Offset(at), READ_CHUNK_BYTES).map_err(other)?;
                if fetched.bytes.is_empty() {
                    break;
                }
                let next = MetadataLog::entries(fetched.bytes, at, end, &mut out)?;
                if next <= at {
                    break;
                }
                at = next;
            }
            Ok(out)
        })
    }

    fn last(&self) -> io::Result<Option<(u64, Vec<u8>)>> {
        let (start, end) =
            self.with_log(|log| Ok((log.log_start_offset().0, log.log_end_offset().0)))?;
        if end <= start {
            return Ok(None);
        }
        Ok(self.read(end - 1, end)?.pop())
    }

    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(bytes)
            .ok()
            .filter(|t| !t.contains('\n'))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "blob is not one line"))?;
        checkpoint::write(&*self.fs, &self.dir, name, name, &[text.to_string()]).map_err(other)
    }

    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let lines = checkpoint::read(&*self.fs, &self.dir, name, name)?;
        Ok(lines.map(|lines| lines.concat().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_truncate_purge_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Fs> = Arc::new(cairn_storage::StdFs);
        let log = MetadataLog::open(Arc::clone(&fs), dir.path()).unwrap();
        assert_eq!(log.last().unwrap(), None);
        let entries: Vec<(u64, Vec<u8>)> = (0..10).map(|i| (i, format!("e{i}").into())).collect();
        log.append(&entries).unwrap();
        assert_eq!(log.read(3, 6).unwrap(), entries[3..6].to_vec());
        assert_eq!(log.last().unwrap(), Some((9, b"e9".to_vec())));
        log.truncate(7).unwrap();
        assert_eq!(log.last().unwrap(), Some((6, b"e6".to_vec())));
        log.append(&[(7, b"x7".to_vec())]).unwrap();
        // After a snapshot up to 20 arrives, the log continues past the gap.
        log.purge(20).unwrap();
        log.append(&[(21, b"y21".to_vec())]).unwrap();
        log.save("raft-vote", b"{\"term\":3}").unwrap();
        drop(log);
        let log = MetadataLog::open(fs, dir.path()).unwrap();
        assert_eq!(log.last().unwrap(), Some((21, b"y21".to_vec())));
        assert_eq!(log.read(0, 8).unwrap().last(), Some(&(7, b"x7".to_vec())));
        assert_eq!(
            log.load("raft-vote").unwrap(),
            Some(b"{\"term\":3}".to_vec())
        );
        assert_eq!(log.load("raft-snapshot").unwrap(), None);
        assert!(log.save("x", b"two\nlines").is_err());
        log.close().unwrap();
        assert!(log.last().is_err(), "closed");
        let log = MetadataLog::open(Arc::new(cairn_storage::StdFs), dir.path()).unwrap();
        assert!(log.with_log(|l| Ok(l.recovery_report().clean)).unwrap());
    }
}
