//! An in-memory file system that models what survives a power loss.
//!
//! Every file keeps its *durable* contents (as of its last sync) apart from the *pending*
//! operations since then; every directory keeps its durable entries apart from pending creations,
//! renames and removals. [`FaultFs::crash`] keeps, for each file, the durable contents plus a random
//! prefix of its pending operations, the last of which may be torn part-way, and for the
//! directories a random prefix of the pending entry changes. That is the contract `fsync` and
//! directory `fsync` give on Linux file systems such as ext4 and xfs; it is harsher than most real
//! crashes, which is the point.
//!
//! [`FaultFs::kill_process`] models the other kind of crash, where only the process dies and the
//! page cache (unsynced writes included) lives on.
//!
//! Faults on demand: syncs that silently do nothing (the negative control of a power-loss test),
//! `EIO` from writes or syncs (to test poisoning), and a full file system (`ENOSPC`).
//!
//! Simplifications: directories themselves are durable once created; there is no mmap (logs on
//! this file system read with `pread`).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use cairn_storage::{Fs, FsFile, MappedFile, OpenMode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Faults to inject.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Syncs report success but make nothing durable.
    pub sync_is_noop: bool,
    /// Syncs fail with `EIO`.
    pub fail_sync: bool,
    /// Writes fail with `EIO`.
    pub fail_write: bool,
    /// The file system is full: allocations that would grow a file fail with `ENOSPC`, and it
    /// says it has no bytes available.
    pub no_space: bool,
}

#[derive(Debug)]
enum FileOp {
    Write { pos: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link { path: PathBuf, inode: u64 },
    Unlink { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

impl DirOp {
    fn touches(&self, dir: &Path) -> bool {
        let parent = |p: &PathBuf| p.parent() == Some(dir);
        match self {
            DirOp::Link { path, .. } | DirOp::Unlink { path } => parent(path),
            DirOp::Rename { from, to } => parent(from) || parent(to),
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Link { path, inode } => {
                names.insert(path.clone(), *inode);
            }
            DirOp::Unlink { path } => {
                names.remove(path);
            }
            DirOp::Rename { from, to } => {
                if let Some(inode) = names.remove(from) {
                    names.insert(to.clone(), inode);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    live: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    pending_dir_ops: Vec<DirOp>,
    dirs: BTreeSet<PathBuf>,
    locks: BTreeSet<PathBuf>,
    /// Bumped by every crash: handles from before it are dead.
    generation: u64,
    faults: Faults,
    /// Mutating operations left before the process "dies" (every later one fails with EIO).
    ops_left: Option<u64>,
}

impl State {
    /// Counts one mutating operation against `ops_left`.
    fn tick(&mut self, what: &str) -> io::Result<()> {
        match &mut self.ops_left {
            Some(0) => Err(io::Error::other(format!("the process died before {what}"))),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// The fault-injecting file system. Clones share one state.
#[derive(Debug, Clone, Default)]
pub struct FaultFs {
    state: Arc<Mutex<State>>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO on {what}"))
}

impl FaultFs {
    /// An empty file system.
    pub fn new() -> FaultFs {
        FaultFs::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the faults to inject from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Lets `n` more mutating operations (writes, length changes, syncs, creations, renames,
    /// removals) succeed, then fails every later one, as if the process died right there; follow
    /// with [`FaultFs::crash`] or [`FaultFs::kill_process`], which clear it. `None` clears it.
    pub fn die_after(&self, n: Option<u64>) {
        self.lock().ops_left = n;
    }

    /// Simulates a power loss: see the module docs. Open handles and locks die with it.
    pub fn crash(&self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut state = self.lock();
        let state = &mut *state;
        let n_dir_ops = rng.random_range(0..=state.pending_dir_ops.len());
        for op in state.pending_dir_ops.drain(..).take(n_dir_ops) {
            op.apply(&mut state.durable);
        }
        state.live = state.durable.clone();
        for inode in state.inodes.values_mut() {
            let mut contents = std::mem::take(&mut inode.durable);
            let n_ops = rng.random_range(0..=inode.pending.len());
            for (idx, op) in inode.pending.drain(..).enumerate() {
                if idx > n_ops {
                    break;
                }
                match op {
                    FileOp::SetLen(len) if idx < n_ops => contents.resize(len as usize, 0),
                    FileOp::Write { pos, data } => {
                        // The op just past the kept prefix may be torn: some of its bytes land.
                        let n = if idx < n_ops {
                            data.len()
                        } else {
                            rng.random_range(0..=data.len())
                        };
                        let end = pos as usize + n;
                        if contents.len() < end {
                            contents.resize(end, 0);
                        }
                        contents[pos as usize..end].copy_from_slice(&data[..n]);
                    }
                    FileOp::SetLen(_) => {}
                }
            }
            inode.live = contents.clone();
            inode.durable = contents;
        }
        let linked: BTreeSet<u64> = state.live.values().copied().collect();
        state.inodes.retain(|inode, _| linked.contains(inode));
        state.locks.clear();
        state.generation += 1;
        state.ops_left = None;
    }

    /// Simulates the process dying (`kill -9`) while the machine stays up: open handles and locks
    /// die, but every write already made is still in the page cache, synced or not, and may still
    /// be lost by a later [`FaultFs::crash`].
    pub fn kill_process(&self) {
        let mut state = self.lock();
        state.locks.clear();
        state.generation += 1;
        state.ops_left = None;
    }

    /// Flips bits of a byte of a file, durably: media corruption.
    pub fn corrupt(&self, path: &Path, pos: u64, xor: u8) {
        let mut state = self.lock();
        let inode = state.live[path];
        let file = state.inodes.get_mut(&inode).unwrap();
        if let Some(byte) = file.live.get_mut(pos as usize) {
            *byte ^= xor;
        }
        if let Some(byte) = file.durable.get_mut(pos as usize) {
            *byte ^= xor;
        }
    }

    /// The live contents of a file.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let inode = state.live.get(path)?;
        Some(state.inodes[inode].live.clone())
    }

    /// Names of live files in `dir`.
    pub fn files(&self, dir: &Path) -> Vec<String> {
        self.list_dir(dir).unwrap_or_default()
    }
}

#[derive(Debug)]
struct FaultFile {
    fs: FaultFs,
    inode: u64,
    generation: u64,
}

impl FaultFile {
    fn with<T>(&self, f: impl FnOnce(&mut Inode, Faults) -> io::Result<T>) -> io::Result<T> {
        self.with_op(None, f)
    }

    /// As `with`, counting a mutating operation named `op` (see [`FaultFs::die_after`]).
    fn with_op<T>(
        &self,
        op: Option<&str>,
        f: impl FnOnce(&mut Inode, Faults) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.fs.lock();
        if state.generation != self.generation {
            return Err(io::Error::other("file handle from before a crash"));
        }
        if let Some(op) = op {
            state.tick(op)?;
        }
        let faults = state.faults;
        let inode = state
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| io::Error::other("inode gone"))?;
        f(inode, faults)
    }
}

impl FsFile for FaultFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.with(|inode, _| {
            let end = pos as usize + buf.len();
            let src = inode
                .live
                .get(pos as usize..end)
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.with_op(Some("write"), |inode, faults| {
            if faults.fail_write {
                return Err(eio("write"));
            }
            let end = pos as usize + buf.len();
            if inode.live.len() < end {
                inode.live.resize(end, 0);
            }
            inode.live[pos as usize..end].copy_from_slice(buf);
            inode.pending.push(FileOp::Write {
                pos,
                data: buf.to_vec(),
            });
            Ok(())
        })
    }

    fn file_len(&self) -> io::Result<u64> {
        self.with(|inode, _| Ok(inode.live.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_op(Some("set_len"), |inode, faults| {
            if faults.fail_write {
                return Err(eio("set_len"));
            }
            inode.live.resize(len as usize, 0);
            inode.pending.push(FileOp::SetLen(len));
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.file_len()? < len {
            if self.with(|_, faults| Ok(faults.no_space))? {
                return Err(io::ErrorKind::StorageFull.into());
            }
            self.set_len(len)?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with_op(Some("fsync"), |inode, faults| {
            if faults.fail_sync {
                return Err(eio("fsync"));
            }
            if !faults.sync_is_noop {
                inode.durable = inode.live.clone();
                inode.pending.clear();
            }
            Ok(())
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn map(&self, _len: u64) -> Option<io::Result<MappedFile>> {
        None
    }
}

#[derive(Debug)]
struct LockGuard {
    fs: FaultFs,
    path: PathBuf,
    generation: u64,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut state = self.fs.lock();
        if state.generation == self.generation {
            state.locks.remove(&self.path);
        }
    }
}

impl Fs for FaultFs {
    fn available_bytes(&self, _path: &Path) -> io::Result<u64> {
        Ok(if self.lock().faults.no_space {
            0
        } else {
            u64::MAX
        })
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        for ancestor in path.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        if !state.dirs.contains(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(state
            .live
            .keys()
            .chain(state.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if !path.parent().is_some_and(|p| state.dirs.contains(p)) {
            return Err(io::ErrorKind::NotFound.into());
        }
        if mode == OpenMode::Truncate || !state.live.contains_key(path) {
            state.tick("create")?;
        }
        let inode = match (state.live.get(path).copied(), mode) {
            (Some(inode), OpenMode::Existing | OpenMode::Create) => inode,
            (Some(inode), OpenMode::Truncate) => {
                if state.faults.fail_write {
                    return Err(eio("truncate"));
                }
                let file = state
                    .inodes
                    .get_mut(&inode)
                    .ok_or_else(|| io::Error::other("inode gone"))?;
                file.live.clear();
                file.pending.push(FileOp::SetLen(0));
                inode
            }
            (None, OpenMode::Existing) => return Err(io::ErrorKind::NotFound.into()),
            (None, OpenMode::Create | OpenMode::Truncate) => {
                if state.faults.fail_write {
                    return Err(eio("create"));
                }
                state.next_inode += 1;
                let inode = state.next_inode;
                state.inodes.insert(inode, Inode::default());
                state.live.insert(path.to_path_buf(), inode);
                state.pending_dir_ops.push(DirOp::Link {
                    path: path.to_path_buf(),
                    inode,
                });
                inode
            }
        };
        Ok(Arc::new(FaultFile {
            fs: self.clone(),
            inode,
            generation: state.generation,
        }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        Ok(self.lock().live.contains_key(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.tick("rename")?;
        if state.dirs.contains(from) {
            // Directories are durable once created (see the module docs), and so is their move:
            // their files move with them, durable and live alike.
            let moved = |p: &PathBuf| p.strip_prefix(from).ok().map(|rest| to.join(rest));
            let dirs: Vec<PathBuf> = state.dirs.iter().filter_map(moved).collect();
            state.dirs.retain(|d| !d.starts_with(from));
            state.dirs.extend(dirs);
            for names in [&mut state.live, &mut state.durable] {
                let files: Vec<(PathBuf, u64)> = names
                    .iter()
                    .filter_map(|(p, inode)| Some((moved(p)?, *inode)))
                    .collect();
                names.retain(|p, _| !p.starts_with(from));
                names.extend(files);
            }
            return Ok(());
        }
        let inode = state.live.remove(from).ok_or(io::ErrorKind::NotFound)?;
        state.live.insert(to.to_path_buf(), inode);
        state.pending_dir_ops.push(DirOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick("remove")?;
        state.live.remove(path).ok_or(io::ErrorKind::NotFound)?;
        state.pending_dir_ops.push(DirOp::Unlink {
            path: path.to_path_buf(),
        });
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.tick("remove directory")?;
        if !state.dirs.contains(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        // Like `rename` of a directory, durable at once (a simplification on the safe side for
        // the callers, which rename a directory aside before removing it).
        state.dirs.retain(|d| !d.starts_with(path));
        state.live.retain(|p, _| !p.starts_with(path));
        state.durable.retain(|p, _| !p.starts_with(path));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.tick("directory fsync")?;
        if state.faults.fail_sync {
            return Err(eio("directory fsync"));
        }
        if state.faults.sync_is_noop {
            return Ok(());
        }
        let (now, later): (Vec<DirOp>, Vec<DirOp>) = state
            .pending_dir_ops
            .drain(..)
            .partition(|op| op.touches(path));
        for op in &now {
            op.apply(&mut state.durable);
        }
        state.pending_dir_ops = later;
        Ok(())
    }

    fn lock_dir(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let mut state = self.lock();
        if !state.locks.insert(path.to_path_buf()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(Box::new(LockGuard {
            fs: self.clone(),
            path: path.to_path_buf(),
            generation: state.generation,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_may_not() {
        let fs = FaultFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = fs.open(&dir.join("a"), OpenMode::Create).unwrap();
        file.write_all_at(b"durable", 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        file.write_all_at(b"-maybe", 7).unwrap();
        fs.crash(1);
        let contents = fs.read_file(&dir.join("a")).unwrap();
        assert!(contents.starts_with(b"durable"));
        assert!(b"durable-maybe".starts_with(&contents));
        assert!(file.file_len().is_err(), "handles die with the crash");
    }

    #[test]
    fn unsynced_directory_entries_can_vanish() {
        let lost = (0..32).any(|seed| {
            let fs = FaultFs::new();
            let dir = Path::new("/d");
            fs.create_dir_all(dir).unwrap();
            let file = fs.open(&dir.join("a"), OpenMode::Create).unwrap();
            file.write_all_at(b"x", 0).unwrap();
            file.sync_data().unwrap();
            fs.crash(seed);
            fs.read_file(&dir.join("a")).is_none()
        });
        assert!(lost);
    }

    #[test]
    fn noop_sync_can_lose_synced_data() {
        let lost = (0..32).any(|seed| {
            let fs = FaultFs::new();
            let dir = Path::new("/d");
            fs.create_dir_all(dir).unwrap();
            let file = fs.open(&dir.join("a"), OpenMode::Create).unwrap();
            fs.sync_dir(dir).unwrap();
            fs.set_faults(Faults {
                sync_is_noop: true,
                ..Faults::default()
            });
            file.write_all_at(&[7u8; 100], 0).unwrap();
            file.sync_data().unwrap();
            fs.crash(seed);
            fs.read_file(&dir.join("a")).unwrap().len() < 100
        });
        assert!(lost);
    }
}
