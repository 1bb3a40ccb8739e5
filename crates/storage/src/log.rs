//! The partition log: an ordered set of segments with one append point.
//!
//! Concurrency: all methods take `&self`. One mutex guards the segment list and offsets; appends,
//! rolls and truncation hold it while they write. Reads hold it only to find the segment and a
//! reader, then walk and slice the published bytes without it. `flush` holds a second mutex while
//! it syncs (never the state mutex), so appends continue during an fsync and every caller waiting
//! on the flush mutex is covered by one sync when it gets its turn: group commit.
//!
//! Lock order: `flush_lock` before `state`.

use std::any::Any;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use cairn_protocol::Offset;
use cairn_protocol::batch::{self, BatchHeader};
use cairn_protocol::limits::DECOMPRESSED_BYTES_MAX;

use crate::checkpoint;
use crate::config::{FlushPolicy, LogConfig};
use crate::epoch::{EpochEntry, LeaderEpochCache};
use crate::error::{AppendError, Fatal, OpenError, ReadError};
use crate::fs::{Fs, OpenMode, StdFs};
use crate::segment::{self, Segment};

pub(crate) const RECOVERY_POINT_FILE: &str = "recovery-point-offset-checkpoint";
pub(crate) const LEADER_EPOCH_FILE: &str = "leader-epoch-checkpoint";
pub(crate) const CLEAN_SHUTDOWN_FILE: &str = ".clean-shutdown";

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the first record appended.
    pub base_offset: Offset,
    /// Offset of the last record appended.
    pub last_offset: Offset,
    /// Largest `maxTimestamp` of the appended batches.
    pub max_timestamp: i64,
}

/// Whole batches read from the log.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Batches, back to back; empty at the log end. Zero-copy in mmap mode.
    pub bytes: Bytes,
    /// First offset of the log when read.
    pub log_start: Offset,
    /// Log end offset when read.
    pub log_end: Offset,
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub n_segments: usize,
    /// Bytes deleted.
    pub n_bytes: u64,
}

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The log was closed cleanly, so nothing was scanned but the active segment's tail.
    pub clean: bool,
    /// Segments validated batch by batch.
    pub n_segments_scanned: usize,
    /// Bytes validated.
    pub n_bytes_scanned: u64,
    /// Bytes cut off as invalid (torn writes, corruption).
    pub n_bytes_truncated: u64,
    /// Segments deleted because they followed an invalid batch.
    pub n_segments_deleted: usize,
}

pub(crate) struct State {
    pub(crate) segments: BTreeMap<u64, Segment>,
    pub(crate) log_start: u64,
    pub(crate) log_end: u64,
    /// Every offset below this is durable.
    pub(crate) flushed: u64,
    pub(crate) epochs: LeaderEpochCache,
    pub(crate) poisoned: Option<String>,
    pub(crate) last_flush: Instant,
    /// A segment file was created since the directory was last synced.
    pub(crate) dir_unsynced: bool,
    /// The leader-epoch cache gained an epoch that its checkpoint does not hold yet. The next
    /// flush writes it (off the append path, without the state lock); recovery after an unclean
    /// stop adds the epochs of the batches it scans, so a lost checkpoint write loses nothing.
    pub(crate) epochs_unsynced: bool,
}

/// A partition log in a directory of its own.
pub struct Log {
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) state: Mutex<State>,
    flush_lock: Mutex<()>,
    /// Compaction passes run one at a time.
    /// Held by a compaction pass (one at a time); holds the cleaner checkpoint: below it the
    /// log holds at most one record per key (in memory: 0, the whole log, after an open).
    pub(crate) compaction_lock: Mutex<u64>,
    /// Data syncs (`fdatasync` of the active segment) done by `flush`.
    n_syncs: AtomicU64,
    pub(crate) recovery: RecoveryReport,
    _dir_lock: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("dir", &self.dir).finish()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; the state is still the last consistent one because
    // every mutation publishes last.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    /// Opens (creating if needed) the log in `dir` on the real file system, recovering it if it
    /// was not closed cleanly.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, OpenError> {
        Log::open_with(Arc::new(StdFs), dir.as_ref(), config)
    }

    /// Opens the log through `fs` (tests pass a fault-injecting one).
    pub fn open_with(fs: Arc<dyn Fs>, dir: &Path, config: LogConfig) -> Result<Log, OpenError> {
        Log::open_locking(fs, dir, config, true)
    }

    /// Opens the log through `fs` without locking its directory: for a caller that holds a lock
    /// covering it (a broker locks its data directory, so its thousands of logs do not each
    /// hold a lock file open). Two logs on one directory would corrupt it.
    pub fn open_in_locked_dir(
        fs: Arc<dyn Fs>,
        dir: &Path,
        config: LogConfig,
    ) -> Result<Log, OpenError> {
        Log::open_locking(fs, dir, config, false)
    }

    fn open_locking(
        fs: Arc<dyn Fs>,
        dir: &Path,
        config: LogConfig,
        lock: bool,
    ) -> Result<Log, OpenError> {
        config.validate()?;
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError::Io { op, path, source }
        };
        fs.create_dir_all(dir)
            .map_err(io_err("create directory", dir))?;
        let locked = if lock {
            fs.lock_dir(dir)
        } else {
            Ok(Box::new(()) as Box<dyn Any + Send + Sync>)
        };
        let dir_lock = match locked {
            Ok(guard) => guard,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                return Err(OpenError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(OpenError::Io {
                    op: "lock directory",
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let (state, recovery) = crate::recovery::recover(&*fs, dir, &config)?;
        // A broker opens thousands of logs: INFO only for those recovery had to scan or cut.
        macro_rules! opened {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    dir = %dir.display(),
                    clean = recovery.clean,
                    log_start = state.log_start,
                    log_end = state.log_end,
                    n_segments = state.segments.len(),
                    n_segments_scanned = recovery.n_segments_scanned,
                    n_bytes_scanned = recovery.n_bytes_scanned,
                    n_bytes_truncated = recovery.n_bytes_truncated,
                    "log opened"
                )
            };
        }
        if recovery.n_bytes_scanned > 0 || recovery.n_bytes_truncated > 0 {
            opened!(tracing::Level::INFO);
        } else {
            opened!(tracing::Level::DEBUG);
        }
        Ok(Log {
            dir: dir.to_path_buf(),
            config,
            fs,
            state: Mutex::new(state),
            flush_lock: Mutex::new(()),
            compaction_lock: Mutex::new(0),
            n_syncs: AtomicU64::new(0),
            recovery,
            _dir_lock: dir_lock,
        })
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's configuration.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// What opening the log found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The first offset in the log.
    pub fn log_start_offset(&self) -> Offset {
        Offset(lock(&self.state).log_start)
    }

    /// The offset the next record will get.
    pub fn log_end_offset(&self) -> Offset {
        Offset(lock(&self.state).log_end)
    }

    /// How many data syncs flushes have done since the log opened. With group commit this grows
    /// slower than the number of durable appends when producers are concurrent.
    pub fn n_syncs(&self) -> u64 {
        self.n_syncs.load(Ordering::Relaxed)
    }

    /// Every offset below this is durable.
    pub fn flushed_offset(&self) -> Offset {
        Offset(lock(&self.state).flushed)
    }

    /// Bytes of all segments' data.
    pub fn size_bytes(&self) -> u64 {
        lock(&self.state)
            .segments
            .values()
            .map(|s| u64::from(s.size))
            .sum()
    }

    /// Number of segments.
    pub fn n_segments(&self) -> usize {
        lock(&self.state).segments.len()
    }

    /// The leader-epoch cache.
    pub fn leader_epochs(&self) -> Vec<EpochEntry> {
        lock(&self.state).epochs.entries().to_vec()
    }

    /// The epoch of the newest batch, if the log records any.
    pub fn latest_epoch(&self) -> Option<u32> {
        lock(&self.state).epochs.latest().map(|e| e.epoch)
    }

    /// The epoch at or below `epoch` and its end offset (Kafka's OffsetsForLeaderEpoch).
    pub fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, Offset)> {
        let state = lock(&self.state);
        state
            .epochs
            .end_offset_for(epoch, state.log_end)
            .map(|(e, o)| (e, Offset(o)))
    }

    /// Maps an I/O error reading `segment` (not a write: nothing is poisoned) to `Fatal::Io`.
    /// The path is only built if there is an error: this sits on the read path.
    fn io_fatal(
        &self,
        op: &'static str,
        segment: &Segment,
    ) -> impl FnOnce(io::Error) -> Fatal + '_ {
        let base_offset = segment.base_offset;
        move |source| Fatal::Io {
            op,
            path: self
                .dir
                .join(segment::file_name(base_offset, segment::LOG_SUFFIX)),
            source,
        }
    }

    /// Whether an I/O failure has poisoned the log (it refuses appends until reopened).
    pub fn is_poisoned(&self) -> bool {
        lock(&self.state).poisoned.is_some()
    }

    pub(crate) fn check_poisoned(&self, state: &State) -> Result<(), Fatal> {
        match &state.poisoned {
            Some(cause) => Err(Fatal::PreviousIo {
                dir: self.dir.clone(),
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Records the first I/O failure; from now on every call fails.
    pub(crate) fn poison(
        &self,
        state: &mut State,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    ) -> Fatal {
        let fatal = Fatal::Io { op, path, source };
        if state.poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), error = %fatal, "log poisoned: no further appends until it is reopened");
            state.poisoned = Some(fatal.to_string());
        }
        fatal
    }

    /// Appends one or more producer batches (back to back in `batches`), assigning offsets from
    /// the log end and stamping `leader_epoch`. All batches are validated before any is written:
    /// either all are appended or none. With [`FlushPolicy::EveryAppend`] the batches are durable
    /// when this returns.
    pub fn append(&self, batches: &mut [u8], leader_epoch: u32) -> Result<AppendInfo, AppendError> {
        let info = self.append_inner(batches, leader_epoch, true)?;
        info.ok_or(AppendError::Empty)
    }

    /// As [`Log::append`], for callers that must not block (an async runtime's worker): the
    /// append happens only if it is a positional write into the page cache. If it would first
    /// have to roll a segment (create, preallocate and seal files) or sync (the flush policy),
    /// nothing is written or stamped and `Ok(None)` says to call [`Log::append`] where blocking
    /// is allowed.
    pub fn append_nonblocking(
        &self,
        batches: &mut [u8],
        leader_epoch: u32,
    ) -> Result<Option<AppendInfo>, AppendError> {
        self.append_inner(batches, leader_epoch, false)
    }

    fn append_inner(
        &self,
        batches: &mut [u8],
        leader_epoch: u32,
        may_block: bool,
    ) -> Result<Option<AppendInfo>, AppendError> {
        let epoch = i32::try_from(leader_epoch).map_err(|_| AppendError::Overflow)?;
        let headers = self.validate_batches(batches, true)?;
        let info = {
            let mut state = lock(&self.state);
            self.check_poisoned(&state)?;
            if !may_block && self.append_would_block(&state, batches.len(), &headers) {
                return Ok(None);
            }
            if let Some(latest) = state.epochs.latest()
                && latest.epoch > leader_epoch
            {
                return Err(AppendError::StaleLeaderEpoch {
                    epoch: leader_epoch,
                    latest: latest.epoch,
                });
            }
            self.reserve_active(&mut state, batches.len(), &headers, false)?;
            let base_offset = state.log_end;
            // All offsets must fit an i64 before anything is written.
            headers
                .iter()
                .try_fold(base_offset, |next, h| {
                    next.checked_add(h.last_offset_delta as u64 + 1)
                })
                .filter(|&end| end <= i64::MAX as u64)
                .ok_or(AppendError::Overflow)?;
            let mut pos = 0;
            let mut next = base_offset;
            let mut max_timestamp = i64::MIN;
            for header in &headers {
                let end = pos + header.total_bytes();
                let bytes = batches.get_mut(pos..end).ok_or(AppendError::Empty)?;
                batch::stamp(bytes, next as i64, epoch)?;
                let header = BatchHeader {
                    base_offset: next as i64,
                    partition_leader_epoch: epoch,
                    ..*header
                };
                self.append_batch(&mut state, bytes, &header)?;
                next = header.last_offset() as u64 + 1;
                max_timestamp = max_timestamp.max(header.max_timestamp);
                pos = end;
            }
            if state.epochs.latest().is_none_or(|e| e.epoch < leader_epoch) {
                state.epochs.assign(leader_epoch, base_offset);
                state.epochs_unsynced = true;
            }
            AppendInfo {
                base_offset: Offset(base_offset),
                last_offset: Offset(next - 1),
                max_timestamp,
            }
        };
        if may_block {
            self.flush_after_append(info.last_offset)?;
        }
        Ok(Some(info))
    }

    /// Reserves room for `n_bytes` of batches in the active segment before any is written, when
    /// they all go there (no roll): a full file system then fails the append whole, with nothing
    /// written and the log still usable ([`AppendError::NoSpace`]), where a failure halfway
    /// would poison it (`stamped` as for [`Log::any_rolls`]). An append that rolls reserves as it
    /// goes (a failure there poisons the log; the broker's free-space margin keeps it from
    /// happening).
    fn reserve_active(
        &self,
        state: &mut State,
        n_bytes: usize,
        headers: &[BatchHeader],
        stamped: bool,
    ) -> Result<(), AppendError> {
        let Ok(reserve) = u32::try_from(n_bytes) else {
            return Ok(()); // beyond any segment: it rolls
        };
        if self.any_rolls(state, n_bytes, headers, stamped) {
            return Ok(());
        }
        let (dir, config) = (&self.dir, &self.config);
        let Some(active) = state.segments.values_mut().next_back() else {
            return Ok(());
        };
        match active.reserve(reserve, config) {
            Ok(()) => Ok(()),
            Err(source)
                if matches!(
                    source.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                ) =>
            {
                Err(AppendError::NoSpace {
                    path: active.log_path(dir),
                    source,
                })
            }
            Err(source) => {
                let path = active.log_path(dir);
                Err(self.poison(state, "reserve", path, source).into())
            }
        }
    }

    /// Whether appending `headers` (`n_bytes` in all) would roll a segment or sync: work that
    /// blocks on the disk. The last header bounds every check (timestamps are per batch, so the
    /// first and last are checked for the segment's age).
    fn append_would_block(&self, state: &State, n_bytes: usize, headers: &[BatchHeader]) -> bool {
        let sync_due = match self.config.flush {
            FlushPolicy::EveryAppend => true,
            FlushPolicy::Interval(interval) => {
                Instant::now().saturating_duration_since(state.last_flush) >= interval
            }
            FlushPolicy::Os => false,
        };
        sync_due || self.any_rolls(state, n_bytes, headers, false)
    }

    /// Whether appending `headers` (`n_bytes` in all) rolls a segment. `stamped`: the headers
    /// carry their final offsets (a replica's); else they are judged at the log end.
    fn any_rolls(
        &self,
        state: &State,
        n_bytes: usize,
        headers: &[BatchHeader],
        stamped: bool,
    ) -> bool {
        headers.iter().any(|header| {
            let at = if stamped {
                *header
            } else {
                BatchHeader {
                    base_offset: state.log_end as i64,
                    ..*header
                }
            };
            self.should_roll(state, n_bytes, &at)
        })
    }

    /// Appends batches that already carry their offsets and leader epochs (a follower copying its
    /// leader). Offsets must continue from the log end, exactly unless the log is
    /// [`LogConfig::compacted`].
    pub fn append_replicated(&self, batches: &[u8]) -> Result<AppendInfo, AppendError> {
        let headers = self.validate_batches(batches, false)?;
        let info = {
            let mut state = lock(&self.state);
            self.check_poisoned(&state)?;
            let (Some(first), Some(last)) = (headers.first(), headers.last()) else {
                return Err(AppendError::Empty);
            };
            let mut expected = state.log_end;
            for header in &headers {
                let gap = header.base_offset as u64 != expected;
                if header.base_offset < 0
                    || (header.base_offset as u64) < expected
                    || (gap && !self.config.compacted)
                {
                    return Err(AppendError::OffsetNotMonotonic {
                        got: header.base_offset,
                        log_end: Offset(state.log_end),
                    });
                }
                expected = header.last_offset() as u64 + 1;
            }
            self.reserve_active(&mut state, batches.len(), &headers, true)?;
            let mut pos = 0;
            let mut max_timestamp = i64::MIN;
            for header in &headers {
                let end = pos + header.total_bytes();
                let bytes = batches.get(pos..end).ok_or(AppendError::Empty)?;
                self.append_batch(&mut state, bytes, header)?;
                if let Ok(epoch) = u32::try_from(header.partition_leader_epoch)
                    && state.epochs.latest().is_none_or(|e| e.epoch < epoch)
                {
                    state.epochs.assign(epoch, header.base_offset as u64);
                    state.epochs_unsynced = true;
                }
                max_timestamp = max_timestamp.max(header.max_timestamp);
                pos = end;
            }
            AppendInfo {
                base_offset: Offset(first.base_offset as u64),
                last_offset: Offset(last.last_offset() as u64),
                max_timestamp,
            }
        };
        self.flush_after_append(info.last_offset)?;
        Ok(info)
    }

    fn active_base(&self, state: &State) -> u64 {
        state
            .segments
            .last_key_value()
            .map_or(state.log_end, |(base, _)| *base)
    }

    fn validate_batches(
        &self,
        batches: &[u8],
        producer: bool,
    ) -> Result<Vec<BatchHeader>, AppendError> {
        let mut headers = Vec::new();
        let mut rest = batches;
        while !rest.is_empty() {
            let header = batch::validate(rest, self.config.batch_bytes_max)?;
            if producer
                && (header.records_count < 1
                    || i64::from(header.records_count) != i64::from(header.last_offset_delta) + 1)
            {
                return Err(AppendError::RecordCountMismatch {
                    records_count: header.records_count,
                    last_offset_delta: header.last_offset_delta,
                });
            }
            rest = rest.get(header.total_bytes()..).unwrap_or_default();
            headers.push(header);
        }
        if headers.is_empty() {
            return Err(AppendError::Empty);
        }
        Ok(headers)
    }

    /// Writes one validated batch with its final offsets, rolling first if it does not belong in
    /// the active segment.
    fn append_batch(
        &self,
        state: &mut State,
        bytes: &[u8],
        header: &BatchHeader,
    ) -> Result<(), Fatal> {
        if self.should_roll(state, bytes.len(), header) {
            // The new segment starts at the batch (past a gap, for a replica of a compacted log).
            self.roll_locked(state, header.base_offset as u64)?;
        }
        let dir = &self.dir;
        let config = &self.config;
        let result = match state.segments.values_mut().next_back() {
            Some(active) => active
                .append(bytes, header, config)
                .map_err(|e| (active.log_path(dir), e)),
            None => Err((dir.clone(), io::Error::other("log has no active segment"))),
        };
        match result {
            Ok(()) => {
                state.log_end = header.last_offset() as u64 + 1;
                Ok(())
            }
            Err((path, source)) => Err(self.poison(state, "append", path, source)),
        }
    }

    fn should_roll(&self, state: &State, n_bytes: usize, header: &BatchHeader) -> bool {
        let Some(active) = state.segments.values().next_back() else {
            return false;
        };
        // Offsets relative to the segment base must fit the index's u32, even in an empty
        // segment (a replica's batch may start far past it).
        let rel_last = (header.last_offset() as u64).saturating_sub(active.base_offset);
        if rel_last > u64::from(u32::MAX) {
            return true;
        }
        if active.size == 0 {
            return false;
        }
        let too_big =
            u64::from(active.size) + n_bytes as u64 > u64::from(self.config.segment_bytes);
        let too_old = match (self.config.segment_age, active.first_batch_timestamp) {
            (Some(age), Some(first)) => {
                let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                header.max_timestamp.saturating_sub(first) > age_ms
            }
            _ => false,
        };
        too_big || too_old
    }

    /// Seals the active segment and starts a new one at the log end (no-op if the active segment
    /// is empty).
    pub fn roll(&self) -> Result<(), Fatal> {
        let mut state = lock(&self.state);
        self.check_poisoned(&state)?;
        let log_end = state.log_end;
        self.roll_locked(&mut state, log_end)
    }

    /// Seals the active segment and starts one at `base` (the log end, or past it for a batch
    /// after a gap). An empty active segment is sealed only if it is at the wrong base, in which
    /// case it is replaced.
    fn roll_locked(&self, state: &mut State, base: u64) -> Result<(), Fatal> {
        let dir = &self.dir;
        let fs = &*self.fs;
        if let Some(active) = state.segments.values_mut().next_back() {
            if active.size == 0 && active.base_offset == base {
                return Ok(());
            }
            if active.size == 0 {
                let empty = active.base_offset;
                if let Some(segment) = state.segments.remove(&empty)
                    && let Err(source) = segment.remove_files(fs, dir)
                {
                    return Err(self.poison(
                        state,
                        "remove empty segment",
                        segment.log_path(dir),
                        source,
                    ));
                }
            } else if let Err(source) = active.seal(fs, dir) {
                // No fsync here: the next flush syncs the sealed files before it counts them
                // durable.
                let path = active.log_path(dir);
                return Err(self.poison(state, "seal segment", path, source));
            }
        }
        let segment = self.create_segment(state, base)?;
        // A record acknowledged in the new segment must not vanish because the file's directory
        // entry never reached the disk: the next flush syncs the directory too.
        state.dir_unsynced = true;
        tracing::info!(dir = %dir.display(), base_offset = base, "segment rolled");
        state.segments.insert(base, segment);
        if state.segments.len() == 1 {
            // The replaced empty segment was the whole log: it now starts here, as a reopen
            // would find.
            state.log_start = base;
        }
        Ok(())
    }

    /// A new empty segment at `base`; a failure poisons the log.
    fn create_segment(&self, state: &mut State, base: u64) -> Result<Segment, Fatal> {
        Segment::create(&*self.fs, &self.dir, base, &self.config).map_err(|source| {
            let path = self.dir.join(segment::file_name(base, segment::LOG_SUFFIX));
            self.poison(state, "create segment", path, source)
        })
    }

    /// Writes the flushed offset as the recovery point. Callers hold `flush_lock` (one writer of
    /// the checkpoint at a time) but not the state lock (the write syncs three times).
    fn checkpoint_flushed(&self) -> Result<(), Fatal> {
        let flushed = lock(&self.state).flushed;
        let lines = [flushed.to_string()];
        checkpoint::write(
            &*self.fs,
            &self.dir,
            RECOVERY_POINT_FILE,
            "recovery-point",
            &lines,
        )
        .map_err(|fatal| {
            let mut state = lock(&self.state);
            self.poison_fatal(&mut state, fatal)
        })
    }

    fn write_epochs(&self, state: &mut State) -> Result<(), Fatal> {
        state.epochs_unsynced = false;
        let lines = crate::recovery::epoch_lines(&state.epochs);
        checkpoint::write(
            &*self.fs,
            &self.dir,
            LEADER_EPOCH_FILE,
            "leader-epochs",
            &lines,
        )
        .map_err(|fatal| self.poison_fatal(state, fatal))
    }

    fn poison_fatal(&self, state: &mut State, fatal: Fatal) -> Fatal {
        match fatal {
            Fatal::Io { op, path, source } => self.poison(state, op, path, source),
            other => other,
        }
    }

    fn flush_after_append(&self, last_offset: Offset) -> Result<(), Fatal> {
        match self.config.flush {
            FlushPolicy::EveryAppend => self.flush(Offset(last_offset.0 + 1)),
            FlushPolicy::Interval(_) => self.flush_if_due(Instant::now()),
            FlushPolicy::Os => Ok(()),
        }
    }

    /// Makes every offset below `up_to` durable. Concurrent callers share syncs: a caller that
    /// waited while another synced returns at once if that sync covered it. Syncs, in order: files
    /// of segments sealed since the last flush (data, trimmed length, indexes), the active segment's
    /// data, then the directory if segments were created. Once sealed segments were synced, the
    /// recovery point is checkpointed, so an unclean restart rescans at most about one segment.
    pub fn flush(&self, up_to: Offset) -> Result<(), Fatal> {
        if lock(&self.state).flushed >= up_to.0 {
            return Ok(());
        }
        let _one_sync_at_a_time = lock(&self.flush_lock);
        let (sealed, active, sync_dir, log_end, epochs) = {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            self.check_poisoned(state)?;
            if state.flushed >= up_to.0 {
                return Ok(());
            }
            let mut sealed = Vec::new();
            for segment in state.segments.values_mut() {
                if !segment.unsynced.is_empty() {
                    sealed.push((
                        segment.log_path(&self.dir),
                        std::mem::take(&mut segment.unsynced),
                    ));
                }
            }
            let active = state
                .segments
                .values()
                .next_back()
                .map(|s| (Arc::clone(&s.file), s.base_offset));
            let sync_dir = std::mem::take(&mut state.dir_unsynced);
            let epochs = std::mem::take(&mut state.epochs_unsynced)
                .then(|| crate::recovery::epoch_lines(&state.epochs));
            (sealed, active, sync_dir, state.log_end, epochs)
        };
        let started = Instant::now();
        let fail = |op, path, source| {
            let mut state = lock(&self.state);
            self.poison(&mut state, op, path, source)
        };
        for (path, files) in &sealed {
            for file in files {
                file.sync_all()
                    .map_err(|source| fail("fsync sealed segment", path.clone(), source))?;
            }
        }
        if let Some((file, base_offset)) = active {
            self.n_syncs.fetch_add(1, Ordering::Relaxed);
            file.sync_data().map_err(|source| {
                let path = self
                    .dir
                    .join(segment::file_name(base_offset, segment::LOG_SUFFIX));
                fail("fdatasync", path, source)
            })?;
        }
        if sync_dir {
            self.fs
                .sync_dir(&self.dir)
                .map_err(|source| fail("sync directory", self.dir.clone(), source))?;
        }
        if let Some(lines) = epochs {
            // Appends go on meanwhile: a newer epoch they add marks the cache unsynced again.
            // INVARIANT: truncation, the one change that removes newer epochs, takes the flush
            // lock and writes the checkpoint itself, so this write never resurrects an epoch.
            checkpoint::write(
                &*self.fs,
                &self.dir,
                LEADER_EPOCH_FILE,
                "leader-epochs",
                &lines,
            )
            .map_err(|fatal| {
                let mut state = lock(&self.state);
                self.poison_fatal(&mut state, fatal)
            })?;
        }
        {
            let mut state = lock(&self.state);
            state.flushed = state.flushed.max(log_end);
            state.last_flush = Instant::now();
        }
        tracing::trace!(
            flushed = log_end,
            elapsed_us = started.elapsed().as_micros() as u64,
            "log flushed"
        );
        if sealed.is_empty() {
            Ok(())
        } else {
            self.checkpoint_flushed()
        }
    }

    /// Flushes everything appended so far.
    pub fn flush_all(&self) -> Result<(), Fatal> {
        let log_end = lock(&self.state).log_end;
        self.flush(Offset(log_end))
    }

    /// Flushes if the policy is [`FlushPolicy::Interval`] and the interval has passed.
    pub fn flush_if_due(&self, now: Instant) -> Result<(), Fatal> {
        let FlushPolicy::Interval(interval) = self.config.flush else {
            return Ok(());
        };
        let due = {
            let state = lock(&self.state);
            state.flushed < state.log_end
                && now.saturating_duration_since(state.last_flush) >= interval
        };
        if due { self.flush_all() } else { Ok(()) }
    }

    /// Writes the recovery point (the flushed offset) so an unclean restart scans less.
    pub fn checkpoint(&self) -> Result<(), Fatal> {
        let _one_writer = lock(&self.flush_lock);
        self.check_poisoned(&lock(&self.state))?;
        self.checkpoint_flushed()
    }

    /// Whole batches from the one containing `offset`, up to `max_bytes` (but always at least one
    /// batch, so a consumer can make progress past a batch larger than its limit), all from one
    /// segment so they are one contiguous zero-copy slice. Empty at the log end.
    pub fn read(&self, offset: Offset, max_bytes: u32) -> Result<Fetched, ReadError> {
        self.read_until(offset, max_bytes, Offset(u64::MAX))
    }

    /// As [`Log::read`], but never returns a batch whose last offset is at or above `upper` (for
    /// example the high watermark).
    pub fn read_until(
        &self,
        offset: Offset,
        max_bytes: u32,
        upper: Offset,
    ) -> Result<Fetched, ReadError> {
        let fetched = self.read_inner(offset, max_bytes, upper, true)?;
        // INVARIANT: a read that may block always returns a result.
        debug_assert!(fetched.is_some());
        Ok(fetched.unwrap_or_else(|| Fetched {
            bytes: Bytes::new(),
            log_start: offset,
            log_end: offset,
        }))
    }

    /// As [`Log::read_until`], for callers that must not block on file work other than page
    /// faults on mapped bytes: if the segment to read has not loaded its index files yet (a
    /// sealed segment read for the first time since the log opened, whose indexes may even need
    /// rebuilding from the log), `Ok(None)` says to read where blocking is allowed.
    pub fn read_until_nonblocking(
        &self,
        offset: Offset,
        max_bytes: u32,
        upper: Offset,
    ) -> Result<Option<Fetched>, ReadError> {
        self.read_inner(offset, max_bytes, upper, false)
    }

    fn read_inner(
        &self,
        offset: Offset,
        max_bytes: u32,
        upper: Offset,
        may_block: bool,
    ) -> Result<Option<Fetched>, ReadError> {
        let mut from = offset.0;
        loop {
            let (reader, start_pos, end_pos, log_start, log_end, next_base) = {
                let mut guard = lock(&self.state);
                let state = &mut *guard;
                self.check_poisoned(state)?;
                let (log_start, log_end) = (state.log_start, state.log_end);
                if offset.0 < log_start || offset.0 > log_end {
                    return Err(ReadError::OffsetOutOfRange {
                        offset,
                        log_start: Offset(log_start),
                        log_end: Offset(log_end),
                    });
                }
                let empty = Fetched {
                    bytes: Bytes::new(),
                    log_start: Offset(log_start),
                    log_end: Offset(log_end),
                };
                if from >= log_end {
                    return Ok(Some(empty));
                }
                let next_base = state
                    .segments
                    .range(from + 1..)
                    .next()
                    .map(|(base, _)| *base);
                let Some((_, segment)) = state.segments.range_mut(..=from).next_back() else {
                    return Ok(Some(empty));
                };
                if !may_block && !segment.indexes_loaded() {
                    return Ok(None);
                }
                let on_error = self.io_fatal("read segment", segment);
                let found = segment
                    .position_for(&*self.fs, &self.dir, &self.config, from)
                    .and_then(|pos| Ok((pos, segment.reader(self.config.read_mode)?)));
                match found {
                    Ok((pos, reader)) => (reader, pos, segment.size, log_start, log_end, next_base),
                    Err(source) => return Err(ReadError::Fatal(on_error(source))),
                }
            };
            let fetched = |bytes| Fetched {
                bytes,
                log_start: Offset(log_start),
                log_end: Offset(log_end),
            };
            match walk(&*reader, start_pos, end_pos, from, max_bytes, upper.0) {
                Ok(Some(bytes)) => return Ok(Some(fetched(bytes))),
                Ok(None) => match next_base {
                    // The offset is past this segment's data (a gap): continue in the next one.
                    Some(base) => from = base,
                    None => return Ok(Some(fetched(Bytes::new()))),
                },
                Err(source) => {
                    return Err(ReadError::Fatal(Fatal::Io {
                        op: "read batches",
                        path: self.dir.clone(),
                        source,
                    }));
                }
            }
        }
    }

    /// The first offset whose record timestamp is at or after `timestamp`, with that record's
    /// timestamp (Kafka's ListOffsets by time). `None` if every record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(Offset, i64)>, ReadError> {
        let candidates: Vec<u64> = {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            self.check_poisoned(state)?;
            let mut bases = Vec::new();
            for segment in state.segments.values_mut() {
                let max = segment
                    .max_timestamp(&*self.fs, &self.dir, &self.config)
                    .map_err(self.io_fatal("read time index", segment))?;
                if max >= timestamp {
                    bases.push(segment.base_offset);
                }
            }
            bases
        };
        for base in candidates {
            let start = {
                let mut state = lock(&self.state);
                let log_start = state.log_start;
                let Some(segment) = state.segments.get_mut(&base) else {
                    continue;
                };
                let after = segment
                    .offset_before_timestamp(&*self.fs, &self.dir, &self.config, timestamp)
                    .map_err(self.io_fatal("read time index", segment))?;
                after.map_or(base, |o| o + 1).max(log_start)
            };
            let mut from = start;
            loop {
                let fetched = match self.read(Offset(from), 1) {
                    Ok(fetched) => fetched,
                    // Retention removed it meanwhile: look in later segments.
                    Err(ReadError::OffsetOutOfRange { .. }) => break,
                    Err(err) => return Err(err),
                };
                let Some(Ok(found)) = batch::Batches::new(fetched.bytes, u32::MAX).next() else {
                    break;
                };
                let header = *found.header();
                if header.max_timestamp >= timestamp {
                    let records =
                        found
                            .records(DECOMPRESSED_BYTES_MAX)
                            .map_err(|err| Fatal::Io {
                                op: "decode batch",
                                path: self.dir.clone(),
                                source: io::Error::new(io::ErrorKind::InvalidData, err),
                            })?;
                    if let Some(record) = records
                        .iter()
                        .find(|r| r.timestamp >= timestamp && r.offset as u64 >= from)
                    {
                        return Ok(Some((Offset(record.offset as u64), record.timestamp)));
                    }
                }
                from = header.last_offset() as u64 + 1;
                if from >= fetched.log_end.0 {
                    break;
                }
            }
        }
        Ok(None)
    }

    /// Deletes the oldest sealed segments past the retention limits: while the log without the
    /// segment would still hold at least `retention_bytes`, and while a segment's newest record is
    /// older than `now_ms - retention_age`. The active segment is never deleted.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionReport, Fatal> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        let mut total: u64 = state.segments.values().map(|s| u64::from(s.size)).sum();
        let mut doomed = Vec::new();
        let n_sealed = state.segments.len().saturating_sub(1);
        for segment in state.segments.values_mut().take(n_sealed) {
            let size = u64::from(segment.size);
            let by_bytes = self
                .config
                .retention_bytes
                .is_some_and(|limit| total - size >= limit);
            let by_age = match self.config.retention_age {
                Some(age) => {
                    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                    let newest = segment
                        .max_timestamp(&*self.fs, &self.dir, &self.config)
                        .map_err(self.io_fatal("read time index", segment))?;
                    newest < now_ms.saturating_sub(age_ms)
                }
                None => false,
            };
            if !(by_bytes || by_age) {
                break;
            }
            total -= size;
            doomed.push(segment.base_offset);
        }
        self.delete_oldest(state, doomed, "retention deleted segments")
    }

    /// Deletes the sealed segments that hold only offsets below `offset` (a Raft log purging
    /// what a snapshot covers). The log may still start below `offset`: whole segments go.
    pub fn delete_before(&self, offset: Offset) -> Result<RetentionReport, Fatal> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        let bases: Vec<u64> = state.segments.keys().copied().collect();
        let doomed = bases
            .windows(2)
            .filter_map(|pair| match *pair {
                [base, next] if next <= offset.0 => Some(base),
                _ => None,
            })
            .collect();
        self.delete_oldest(state, doomed, "segments before a purge point deleted")
    }

    /// Deletes the segments based at `doomed` (the oldest, never the active one), syncs the
    /// directory and moves the log start.
    fn delete_oldest(
        &self,
        state: &mut State,
        doomed: Vec<u64>,
        what: &'static str,
    ) -> Result<RetentionReport, Fatal> {
        if doomed.is_empty() {
            return Ok(RetentionReport::default());
        }
        let mut report = RetentionReport::default();
        for base in doomed {
            if let Some(segment) = state.segments.remove(&base) {
                report.n_segments += 1;
                report.n_bytes += u64::from(segment.size);
                if let Err(source) = segment.remove_files(&*self.fs, &self.dir) {
                    return Err(self.poison(
                        state,
                        "delete segment",
                        segment.log_path(&self.dir),
                        source,
                    ));
                }
            }
        }
        if let Some(first) = state.segments.keys().next() {
            state.log_start = state.log_start.max(*first);
        }
        if let Err(source) = self.fs.sync_dir(&self.dir) {
            return Err(self.poison(state, "sync directory", self.dir.clone(), source));
        }
        if state.epochs.truncate_from_start(state.log_start) {
            // Written by the next flush: a checkpoint still naming epochs below the log start
            // is trimmed at open.
            state.epochs_unsynced = true;
        }
        tracing::info!(
            dir = %self.dir.display(),
            n_segments = report.n_segments,
            n_bytes = report.n_bytes,
            log_start = state.log_start,
            "{what}"
        );
        Ok(report)
    }

    /// Removes every batch with an offset at or above `offset` (a follower discarding what its
    /// new leader never had). A batch containing `offset` is removed whole, so the new log end may
    /// be below `offset`; it is returned. Readers holding earlier results keep valid bytes: the kept
    /// prefix of the cut segment is copied to a new file that replaces the old name.
    pub fn truncate_to(&self, offset: Offset) -> Result<Offset, Fatal> {
        // No compaction pass meanwhile (lock order: compaction, flush, state); the compaction
        // checkpoint must not lie past what stays (records appended there later are new).
        let mut compaction_checkpoint = lock(&self.compaction_lock);
        *compaction_checkpoint = (*compaction_checkpoint).min(offset.0);
        let _no_flush_in_flight = lock(&self.flush_lock);
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        if offset.0 >= state.log_end {
            return Ok(Offset(state.log_end));
        }
        crate::truncate::truncate_locked(self, state, offset.0)
            .map_err(|(op, path, source)| self.poison(state, op, path, source))?;
        state.flushed = state.flushed.min(state.log_end);
        if state.epochs.truncate_from_end(state.log_end) {
            self.write_epochs(state)?;
        }
        let log_end = state.log_end;
        tracing::info!(dir = %self.dir.display(), log_end, "log truncated");
        drop(guard);
        // The old recovery point may lie past the new end.
        self.checkpoint_flushed()?;
        Ok(Offset(log_end))
    }

    /// Empties the log and starts it again, empty, at `offset` (Kafka's `truncateFullyAndStartAt`):
    /// a follower so far behind its leader that the leader has deleted the records it would need
    /// next, or a new replica of a partition whose beginning retention removed. Every segment
    /// goes, then one empty segment is created at `offset`; the log start, end and recovery point
    /// move there and the leader-epoch cache is emptied (the next batches bring their epochs).
    /// Readers holding earlier results keep valid bytes (their maps outlive the unlinked files).
    /// A crash midway leaves an empty log or one that starts at `offset`: either way the follower
    /// asks its leader again.
    pub fn reset_to(&self, offset: Offset) -> Result<(), Fatal> {
        // No compaction pass meanwhile; below `offset` there is nothing left to clean.
        let mut compaction_checkpoint = lock(&self.compaction_lock);
        *compaction_checkpoint = offset.0;
        let _no_flush_in_flight = lock(&self.flush_lock);
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        let (dir, fs) = (&self.dir, &*self.fs);
        while let Some((_, segment)) = state.segments.pop_first() {
            if let Err(source) = segment.remove_files(fs, dir) {
                let path = segment.log_path(dir);
                return Err(self.poison(state, "delete segment", path, source));
            }
        }
        let segment = self.create_segment(state, offset.0)?;
        state.segments.insert(offset.0, segment);
        state.log_start = offset.0;
        state.log_end = offset.0;
        state.flushed = offset.0;
        if let Err(source) = fs.sync_dir(dir) {
            return Err(self.poison(state, "sync directory", dir.clone(), source));
        }
        state.dir_unsynced = false;
        state.epochs = LeaderEpochCache::default();
        self.write_epochs(state)?;
        tracing::info!(dir = %dir.display(), offset = offset.0, "log emptied and restarted");
        drop(guard);
        self.checkpoint_flushed()
    }

    /// The base offsets of all segments, oldest first.
    pub fn segment_bases(&self) -> Vec<Offset> {
        lock(&self.state)
            .segments
            .keys()
            .map(|b| Offset(*b))
            .collect()
    }

    /// The base offset of the active (last) segment.
    pub fn active_segment_base(&self) -> Offset {
        let state = lock(&self.state);
        Offset(self.active_base(&state))
    }

    /// Checks every segment against a linear scan of its batches (see the storage docs' list of
    /// invariants) and that the log end follows the last batch. O(data): for tests and offline
    /// checks; returns the first violation found.
    pub fn verify(&self) -> Result<(), String> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let mut next = state.log_start;
        for segment in state.segments.values_mut() {
            next = segment.verify(&*self.fs, &self.dir, &self.config, next)?;
        }
        if next != state.log_end {
            return Err(format!(
                "log end is {} but the last batch ends at {next}",
                state.log_end
            ));
        }
        Ok(())
    }

    /// Shuts the log down cleanly: syncs everything, trims the active segment, writes its indexes,
    /// the recovery point and the clean-shutdown marker, so the next open scans nothing.
    pub fn close(self) -> Result<(), Fatal> {
        self.flush_all()?;
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        self.check_poisoned(state)?;
        let fs = &*self.fs;
        if let Some(active) = state.segments.values_mut().next_back() {
            let path = active.log_path(&self.dir);
            if let Err(source) = active.trim_and_write_indexes(fs, &self.dir) {
                return Err(self.poison(state, "close segment", path, source));
            }
        }
        // The marker vouches for every segment's length and indexes, including segments sealed
        // after the last flush (which returns early when no data is pending).
        for segment in state.segments.values_mut() {
            if let Err(source) = segment.sync_unsynced() {
                let path = segment.log_path(&self.dir);
                return Err(self.poison(state, "sync segment", path, source));
            }
        }
        if state.epochs_unsynced {
            self.write_epochs(state)?;
        }
        state.flushed = state.log_end;
        let log_end = state.log_end;
        drop(guard);
        self.checkpoint_flushed()?;
        let marker = self.dir.join(CLEAN_SHUTDOWN_FILE);
        let result = fs
            .open(&marker, OpenMode::Truncate)
            .and_then(|file| file.sync_all())
            // The marker promises that sizes and indexes are exact: it must be durable only after
            // them, and it is only durable once the directory is synced.
            .and_then(|()| fs.sync_dir(&self.dir));
        if let Err(source) = result {
            let mut state = lock(&self.state);
            return Err(self.poison(&mut state, "write clean-shutdown marker", marker, source));
        }
        tracing::debug!(dir = %self.dir.display(), log_end, "log closed cleanly");
        Ok(())
    }
}

/// Walks batch headers from `pos` to `end` in one segment, skipping batches below `from`, and cuts
/// whole batches up to `max_bytes` (at least one) whose last offset is below `upper`. `None` if no
/// batch at or after `from` is in this segment.
fn walk(
    reader: &dyn crate::segment::SegmentReader,
    mut pos: u32,
    end: u32,
    from: u64,
    max_bytes: u32,
    upper: u64,
) -> io::Result<Option<Bytes>> {
    let start = loop {
        let Some(header) = segment::read_header(reader, pos, end)? else {
            return Ok(None);
        };
        if header.last_offset() as u64 >= from {
            break pos;
        }
        pos += header.total_bytes() as u32;
    };
    let mut cut = start;
    while let Some(header) = segment::read_header(reader, cut, end)? {
        let n_bytes = header.total_bytes() as u32;
        if header.last_offset() as u64 >= upper {
            break;
        }
        if cut > start && u64::from(cut - start) + u64::from(n_bytes) > u64::from(max_bytes) {
            break;
        }
        cut += n_bytes;
    }
    Ok(Some(reader.read(start, cut - start)?))
}
