//! Where a controller keeps its Raft log, its vote and its snapshot: a small trait the broker
//! implements over the storage engine (the controller never depends on storage), and an
//! in-memory implementation for tests and simulation.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

/// The controller's persistence. Entries are opaque bytes at a log index.
///
/// Blocking: the controller calls these on the blocking pool.
///
/// To ensure correctness, implementations:
/// - make `append`, `truncate` and `save` durable before they return (a power loss keeps them);
/// - keep entries in index order; after `truncate(i)` nothing at or above `i` is returned, and
///   an `append` may then continue at `i`;
/// - accept an `append` that starts past the last entry after a `purge` covered everything
///   (a follower that installed a snapshot continues from the snapshot's index);
/// - never return a torn or damaged entry (check it, and stop the log before it).
pub trait RaftStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends `entries` (index, bytes), in order, durably.
    ///
    /// # Errors
    /// An I/O failure; the store may refuse every later call after one.
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> io::Result<()>;
    /// Removes every entry at or above `index`, durably.
    ///
    /// # Errors
    /// An I/O failure.
    fn truncate(&self, index: u64) -> io::Result<()>;
    /// May remove entries at or below `index` (a snapshot holds their effect).
    ///
    /// # Errors
    /// An I/O failure.
    fn purge(&self, index: u64) -> io::Result<()>;
    /// The entries with index in `from..to`, in order; fewer if the log ends first or starts
    /// after `from` (purged).
    ///
    /// # Errors
    /// An I/O failure or damaged data.
    fn read(&self, from: u64, to: u64) -> io::Result<Vec<(u64, Vec<u8>)>>;
    /// The last entry, if any.
    ///
    /// # Errors
    /// An I/O failure or damaged data.
    fn last(&self) -> io::Result<Option<(u64, Vec<u8>)>>;
    /// Replaces the named blob (`vote`, `purged`, `snapshot`) durably.
    ///
    /// # Errors
    /// An I/O failure.
    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// The named blob, if saved.
    ///
    /// # Errors
    /// An I/O failure or damaged data.
    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
}

/// A store in memory (tests, simulation): everything is "durable" at once.
#[derive(Debug, Default)]
pub struct MemStore {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    log: BTreeMap<u64, Vec<u8>>,
    blobs: BTreeMap<String, Vec<u8>>,
}

impl MemStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RaftStore for MemStore {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> io::Result<()> {
        let mut state = self.lock();
        for (index, bytes) in entries {
            state.log.insert(*index, bytes.clone());
        }
        Ok(())
    }

    fn truncate(&self, index: u64) -> io::Result<()> {
        self.lock().log.split_off(&index);
        Ok(())
    }

    fn purge(&self, index: u64) -> io::Result<()> {
        let mut state = self.lock();
        let kept = state.log.split_off(&index.saturating_add(1));
        state.log = kept;
        Ok(())
    }

    fn read(&self, from: u64, to: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
        Ok(self
            .lock()
            .log
            .range(from..to)
            .map(|(i, b)| (*i, b.clone()))
            .collect())
    }

    fn last(&self) -> io::Result<Option<(u64, Vec<u8>)>> {
        Ok(self
            .lock()
            .log
            .last_key_value()
            .map(|(i, b)| (*i, b.clone())))
    }

    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.lock().blobs.insert(name.to_string(), bytes.to_vec());
        Ok(())
    }

    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock().blobs.get(name).cloned())
    }
}
