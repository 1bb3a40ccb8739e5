//! Free space on the data directory: a full disk refuses appends cleanly instead of failing them
//! halfway.
//!
//! A write that meets ENOSPC in the middle of a segment roll poisons the log (the storage
//! engine cannot tell a half-made segment from a broken disk), and a poisoned log refuses every
//! append until the broker restarts. So the broker keeps a margin, as Redpanda does
//! (`storage_min_free_bytes`): while less than `storage_min_free_bytes` is available on the data
//! directory's file system, leader and follower appends are refused with KAFKA_STORAGE_ERROR
//! (retriable: producers back off and retry, a follower falls behind and leaves the ISR) and
//! nothing is written; once space is freed (retention, an operator), appends resume by
//! themselves. Reads are served throughout.
//!
//! The check costs a `statvfs` at most every [`RECHECK_MS`]; between checks each admitted append
//! is subtracted from the last figure, so a burst cannot run far past the margin unseen.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use cairn_storage::Fs;

use crate::error::BrokerError;

/// Free bytes that end an out-of-space episode without a successful append: a segment's full
/// preallocation step.
pub const OUT_OF_SPACE_RESUME_BYTES: u64 = 16 << 20;

/// How often the file system is asked, at most, while there is room.
pub const RECHECK_MS: u64 = 100;

/// The data directory's free space, as appends see it.
#[derive(Debug)]
pub struct DiskGuard {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    min_free: u64,
    origin: Instant,
    /// When `free` was last read from the file system (ms since `origin`; `u64::MAX`: never).
    checked_at_ms: AtomicU64,
    /// Available bytes at the last check, less what was admitted since.
    free: AtomicU64,
    /// Whether appends are being refused (logged once per episode).
    low: AtomicBool,
    /// An append found the file system full (ENOSPC reserving its room) and none has succeeded
    /// since: the broker asks to be fenced even with the margin off.
    out_of_space: AtomicBool,
}

impl DiskGuard {
    /// Guards `dir` (on `fs`), keeping `min_free` bytes free; 0 turns the guard off.
    pub fn new(fs: Arc<dyn Fs>, dir: PathBuf, min_free: u64) -> DiskGuard {
        DiskGuard {
            fs,
            dir,
            min_free,
            origin: Instant::now(),
            checked_at_ms: AtomicU64::new(u64::MAX),
            free: AtomicU64::new(0),
            low: AtomicBool::new(false),
            out_of_space: AtomicBool::new(false),
        }
    }

    /// Admits an append of `n_bytes`, or refuses it (KAFKA_STORAGE_ERROR) while the disk is
    /// below the margin.
    pub fn admit(&self, n_bytes: u64) -> Result<(), BrokerError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let now = self.origin.elapsed().as_millis() as u64;
        let checked = self.checked_at_ms.load(Ordering::Relaxed);
        let fresh = checked != u64::MAX && now.saturating_sub(checked) < RECHECK_MS;
        let needed = self.min_free.saturating_add(n_bytes);
        let mut free = if fresh {
            self.free.load(Ordering::Relaxed)
        } else {
            self.refresh(now)
        };
        if free < needed && fresh {
            // Space may have been freed since the last look: ask again before refusing.
            free = self.refresh(now);
        }
        if free < needed {
            if !self.low.swap(true, Ordering::Relaxed) {
                tracing::warn!(dir = %self.dir.display(), free, min_free = self.min_free, "disk almost full: appends refused until space is freed (storage_min_free_bytes)");
            }
            return Err(BrokerError::Storage(format!(
                "disk almost full: {free} bytes available in {}, below storage_min_free_bytes \
                 ({}); appends resume once space is freed",
                self.dir.display(),
                self.min_free
            )));
        }
        if self.low.swap(false, Ordering::Relaxed) {
            tracing::info!(dir = %self.dir.display(), free, "disk space freed: appends accepted again");
        }
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(n_bytes))
            });
        Ok(())
    }

    /// Whether the data directory is below the margin now (asks the file system if the last
    /// figure is stale): the broker then asks the controller to fence it, so that its
    /// leaderships move to replicas that can write.
    pub fn below_margin(&self) -> bool {
        self.admit(0).is_err()
    }

    /// Whether the broker should ask the controller to fence it: below the margin, or an append
    /// found the file system full and none has succeeded since. Its leaderships then move to
    /// replicas that can write; as a follower it keeps copying, and the first append that
    /// succeeds (space was freed) ends it.
    pub fn wants_fence(&self) -> bool {
        if self.out_of_space.load(Ordering::Relaxed) {
            // A partition with nothing to copy appends nothing: room for a full preallocation
            // step ends it too.
            let now = self.origin.elapsed().as_millis() as u64;
            if self.refresh(now) < OUT_OF_SPACE_RESUME_BYTES {
                return true;
            }
            self.note_written();
        }
        self.below_margin()
    }

    /// An append failed for want of space.
    pub fn note_no_space(&self) {
        if !self.out_of_space.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.dir.display(), "the file system is full: an append found no space; asking to be fenced until an append succeeds");
        }
    }

    /// An append succeeded.
    pub fn note_written(&self) {
        if self.out_of_space.load(Ordering::Relaxed)
            && self.out_of_space.swap(false, Ordering::Relaxed)
        {
            tracing::info!(dir = %self.dir.display(), "appends succeed again");
        }
    }

    /// Bytes available at the last check (less what was admitted since).
    pub fn available(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    fn refresh(&self, now: u64) -> u64 {
        let free = match self.fs.available_bytes(&self.dir) {
            Ok(free) => free,
            Err(err) => {
                // Unknown: do not refuse appends for want of a figure; the storage engine still
                // reports a real failure.
                tracing::debug!(dir = %self.dir.display(), error = %err, "statvfs failed");
                u64::MAX
            }
        };
        self.free.store(free, Ordering::Relaxed);
        self.checked_at_ms.store(now, Ordering::Relaxed);
        free
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A file system whose free space the test sets.
    #[derive(Debug)]
    struct Sized(Mutex<u64>);

    impl Fs for Sized {
        fn create_dir_all(&self, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
        fn list_dir(&self, _: &std::path::Path) -> std::io::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn open(
            &self,
            _: &std::path::Path,
            _: cairn_storage::OpenMode,
        ) -> std::io::Result<Arc<dyn cairn_storage::FsFile>> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
        fn exists(&self, _: &std::path::Path) -> std::io::Result<bool> {
            Ok(false)
        }
        fn rename(&self, _: &std::path::Path, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
        fn remove_dir_all(&self, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
        fn remove_file(&self, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
        fn sync_dir(&self, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
        fn lock_dir(
            &self,
            _: &std::path::Path,
        ) -> std::io::Result<Box<dyn std::any::Any + Send + Sync>> {
            Ok(Box::new(()))
        }
        fn available_bytes(&self, _: &std::path::Path) -> std::io::Result<u64> {
            Ok(*self.0.lock().unwrap())
        }
    }

    #[test]
    fn appends_are_refused_below_the_margin_and_resume_once_space_is_freed() {
        let fs = Arc::new(Sized(Mutex::new(1000)));
        let guard = DiskGuard::new(Arc::clone(&fs) as Arc<dyn Fs>, "data".into(), 600);
        guard.admit(300).unwrap();
        assert_eq!(
            guard.available(),
            700,
            "the last figure less what was admitted"
        );
        // Written: the file system says so too; 150 more would cross the margin.
        *fs.0.lock().unwrap() = 700;
        let err = guard.admit(150).unwrap_err();
        assert_eq!(
            err.code(),
            cairn_protocol::native::ErrorCode::KAFKA_STORAGE_ERROR
        );
        assert!(err.to_string().contains("storage_min_free_bytes"), "{err}");
        // Freed: the refusal looks again at once.
        *fs.0.lock().unwrap() = 10_000;
        guard.admit(150).unwrap();
        assert_eq!(guard.available(), 9_850);
        // Off.
        let off = DiskGuard::new(fs as Arc<dyn Fs>, "data".into(), 0);
        off.admit(u64::MAX).unwrap();
    }
}
