//! The metadata log on openraft: the type configuration, the log storage over a [`RaftStore`],
//! and the state machine that applies committed proposals into the [`MetadataImage`] and
//! publishes each new image.
// openraft's `StorageError` is large; its trait methods return it, so their helpers do too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::image::{MetadataImage, Rejected};
use crate::records::Proposal;
use crate::store::RaftStore;

/// What applying a committed proposal gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The metadata offset after it (one past its entry's index).
    pub offset: u64,
    /// Whether its records took effect.
    pub result: Result<(), Rejected>,
}

openraft::declare_raft_types!(
    /// Cairn's Raft types: entries carry [`Proposal`]s, nodes are known by their controller
    /// listener's address.
    pub TypeConfig:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a controller.
pub type Raft = openraft::Raft<TypeConfig>;

type StorageResult<T> = Result<T, StorageError<u64>>;

const VOTE: &str = "raft-vote";
const PURGED: &str = "raft-purged";
const SNAPSHOT: &str = "raft-snapshot";

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::io::Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn encode<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(std::io::Error::other)
}

/// The Raft log over a [`RaftStore`].
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<dyn RaftStore>,
}

impl LogStore {
    /// The log in `store`.
    pub fn new(store: Arc<dyn RaftStore>) -> LogStore {
        LogStore { store }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let store = Arc::clone(&self.store);
        let raw = blocking(move || store.read(from, to))
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter()
            .map(|(_, bytes)| decode(bytes).map_err(|e| StorageIOError::read_logs(&e).into()))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let store = Arc::clone(&self.store);
        let (last, purged) = blocking(move || Ok((store.last()?, store.load(PURGED)?)))
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_purged_log_id: Option<LogId<u64>> = match purged {
            Some(bytes) => decode(&bytes).map_err(|e| StorageIOError::read_logs(&e))?,
            None => None,
        };
        let last_log_id = match last {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> =
                    decode(&bytes).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let bytes = encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let store = Arc::clone(&self.store);
        blocking(move || store.save(VOTE, &bytes))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        let store = Arc::clone(&self.store);
        match blocking(move || store.load(VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e))?
        {
            Some(bytes) => Ok(Some(
                decode(&bytes).map_err(|e| StorageIOError::read_vote(&e))?,
            )),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e)?)))
            .collect::<std::io::Result<_>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let store = Arc::clone(&self.store);
        // Durable before the callback: the entries may count toward a commit only then.
        let result = blocking(move || store.append(&encoded)).await;
        let failed = result.as_ref().err().map(StorageIOError::write_logs);
        callback.log_io_completed(result);
        match failed {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let store = Arc::clone(&self.store);
        blocking(move || store.truncate(log_id.index))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let bytes = encode(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        let store = Arc::clone(&self.store);
        // The purge point first: a crash between the two leaves entries that are merely
        // redundant, never a log that claims entries it no longer has.
        blocking(move || {
            store.save(PURGED, &bytes)?;
            store.purge(log_id.index)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// A snapshot as stored: its metadata and the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    image: MetadataImage,
}

/// The state machine: the image, the Raft bookkeeping, and the last snapshot.
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<tokio::sync::Mutex<MachineState>>,
    image: watch::Sender<Arc<MetadataImage>>,
    store: Arc<dyn RaftStore>,
}

#[derive(Debug)]
struct MachineState {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    image: MetadataImage,
    snapshot: Option<SnapshotFile>,
    n_snapshots: u64,
}

impl StateMachine {
    /// The state machine, restored from the store's snapshot if it has one (blocking).
    pub fn open(store: Arc<dyn RaftStore>) -> std::io::Result<StateMachine> {
        let snapshot: Option<SnapshotFile> = match store.load(SNAPSHOT)? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        };
        let (last_applied, membership, image) = match &snapshot {
            Some(s) => (
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
                s.image.clone(),
            ),
            None => (None, StoredMembership::default(), MetadataImage::default()),
        };
        let (image_tx, _) = watch::channel(Arc::new(image.clone()));
        Ok(StateMachine {
            inner: Arc::new(tokio::sync::Mutex::new(MachineState {
                last_applied,
                membership,
                image,
                snapshot,
                n_snapshots: 0,
            })),
            image: image_tx,
            store,
        })
    }

    /// The image after every applied entry, as a feed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetadataImage>> {
        self.image.subscribe()
    }

    /// The current image.
    pub fn image(&self) -> Arc<MetadataImage> {
        Arc::clone(&self.image.borrow())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let mut state = self.inner.lock().await;
        state.n_snapshots += 1;
        let snapshot_id = match state.last_applied {
            Some(last) => format!("{}-{}-{}", last.leader_id, last.index, state.n_snapshots),
            None => format!("--{}", state.n_snapshots),
        };
        let file = SnapshotFile {
            meta: SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id,
            },
            image: state.image.clone(),
        };
        let bytes = encode(&file).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let store = Arc::clone(&self.store);
        let saved = bytes.clone();
        // Stored before the log is purged up to it (openraft purges after a snapshot).
        blocking(move || store.save(SNAPSHOT, &saved))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = file.meta.clone();
        state.snapshot = Some(file);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>)> {
        let state = self.inner.lock().await;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut state = self.inner.lock().await;
        let mut results = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            state.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Normal(proposal) => {
                    let result = state.image.apply(index, &proposal);
                    if let Err(err) = &result {
                        tracing::debug!(index, error = %err, "proposal rejected");
                    }
                    result
                }
                EntryPayload::Membership(membership) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    state.image.advance(index);
                    Ok(())
                }
                EntryPayload::Blank => {
                    state.image.advance(index);
                    Ok(())
                }
            };
            results.push(Applied {
                offset: state.image.offset,
                result,
            });
        }
        self.image.send_replace(Arc::new(state.image.clone()));
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let mut file: SnapshotFile = decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        file.meta = meta.clone();
        let store = Arc::clone(&self.store);
        let saved = encode(&file).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        blocking(move || store.save(SNAPSHOT, &saved))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let mut state = self.inner.lock().await;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.image = file.image.clone();
        state.snapshot = Some(file);
        self.image.send_replace(Arc::new(state.image.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let state = self.inner.lock().await;
        let Some(file) = &state.snapshot else {
            return Ok(None);
        };
        let bytes = encode(file).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta: file.meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}
