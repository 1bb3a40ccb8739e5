//! The file operations the log uses, behind a small trait so that a fault-injecting implementation
//! (in `cairn-testkit`) can drop or tear unsynced writes on a simulated power loss.
//!
//! [`StdFs`] is the real thing: positional reads and writes, `fdatasync`, `fallocate`, directory
//! fsync, an exclusive `flock` and read-only memory maps.

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::mmap::MappedFile;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read and write an existing file.
    Existing,
    /// Create the file if missing, keep its contents if present.
    Create,
    /// Create the file, or empty it if present.
    Truncate,
}

/// An open file.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Fills `buf` from byte `pos`; `UnexpectedEof` if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()>;
    /// Writes all of `buf` at byte `pos`.
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;
    /// The file's length.
    fn file_len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends the file to at least `len` bytes with blocks reserved, so later writes below `len`
    /// cannot fail for want of space and the bytes past the data read as zeros.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's data and metadata, its length included, durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// A read-only memory map of the first `len` bytes, or `None` if this file system cannot map.
    fn map(&self, len: u64) -> Option<io::Result<MappedFile>>;
}

/// Directory and file-opening operations.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>>;
    /// Whether a file exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Atomically replaces `to` with `from` (a file, or a directory and everything in it).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it. Open handles and memory maps of its files stay
    /// valid. Not atomic: rename a directory aside first if a crash must not leave half of it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Unlinks a file. Open handles and memory maps of it stay valid.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on the directory, held until the returned guard drops;
    /// `WouldBlock` if another holder has it.
    fn lock_dir(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>>;
    /// Bytes an unprivileged writer may still allocate on the file system holding `path`
    /// (`statvfs`'s available blocks). A file system that cannot say answers `u64::MAX`.
    fn available_bytes(&self, path: &Path) -> io::Result<u64> {
        let _ = path;
        Ok(u64::MAX)
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

/// The file a [`StdFs::lock_dir`] guard holds locked.
pub const LOCK_FILE_NAME: &str = ".lock";

#[derive(Debug)]
struct StdFile(File);

impl FsFile for StdFile {
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, pos)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(buf, pos)
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.file_len()? >= len {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Some file systems cannot preallocate; a sparse extension still reads as zeros, and
            // since we never write through a map, a full disk shows up as a write error, not SIGBUS.
            Err(rustix::io::Errno::OPNOTSUPP) => self.0.set_len(len),
            Err(errno) => Err(errno.into()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn map(&self, len: u64) -> Option<io::Result<MappedFile>> {
        Some(MappedFile::map(&self.0, len))
    }
}

impl Fs for StdFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        match mode {
            OpenMode::Existing => {}
            OpenMode::Create => {
                options.create(true);
            }
            OpenMode::Truncate => {
                options.create(true).truncate(true);
            }
        }
        Ok(Arc::new(StdFile(options.open(path)?)))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn lock_dir(&self, path: &Path) -> io::Result<Box<dyn Any + Send + Sync>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE_NAME))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(std::fs::TryLockError::Error(err)) => Err(err),
        }
    }

    fn available_bytes(&self, path: &Path) -> io::Result<u64> {
        let stat = rustix::fs::statvfs(path)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}
