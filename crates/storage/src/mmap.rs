//! Read-only memory maps of segment and index files: the one module in Cairn that uses `unsafe`.
//!
//! # The mmap contract
//!
//! Every `// SAFETY:` comment in this module cites these rules. The rest of the storage crate
//! upholds them; this module relies on them to hand out `&[u8]` and `Bytes` over mapped memory.
//!
//! 1. **Maps are read-only.** They are created with `PROT_READ` (`MmapRaw` read-only); appends go
//!    through positional writes (`pwrite`) into the file, never through a map. A reader is only
//!    handed bytes below the segment's *published end*, and bytes below the published end are
//!    never written again.
//! 2. **One process owns a log directory.** The log takes an exclusive lock on its directory at
//!    open, so no other cooperating process writes to the mapped files.
//! 3. **A handed-out range is never truncated or rewritten while mapped.** Recovery trims a torn
//!    tail before the file is first mapped. Truncation for replication copies the kept prefix into
//!    a new file and renames it over the old name, so existing maps keep the old inode. Retention
//!    unlinks files; an unlinked inode stays alive while any map of it exists. Trimming a sealed
//!    segment's preallocated tail only removes bytes past the published end, which no reader was
//!    ever given. (Truncating bytes a reader holds would raise `SIGBUS` on access.)
//! 4. **Mapped bytes are untrusted input.** The disk may hold anything: callers check lengths and
//!    CRCs before interpreting the bytes, exactly as for bytes from a socket.
//!
//! A process outside the lock (an operator's `dd`, a second tool ignoring the lock) can break
//! rules 1-3; that is outside what any mmap-based storage engine can defend against, and is why the
//! pread reader (`ReadMode::Pread`) exists as a fallback.
#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

/// A read-only map of a file's first `len` bytes, shared by every `Bytes` cut from it.
#[derive(Clone)]
pub struct MappedFile {
    map: Arc<MmapRaw>,
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.map.len())
            .finish()
    }
}

impl MappedFile {
    /// Maps the first `len` bytes of `file` read-only. `len` must not exceed the file's length at
    /// this moment (the caller maps only allocated bytes).
    pub(crate) fn map(file: &File, len: u64) -> io::Result<MappedFile> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        let map = MmapOptions::new().len(len).map_raw_read_only(file)?;
        Ok(MappedFile { map: Arc::new(map) })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped (never true: empty files are not mapped).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Borrows `start..end` of the map, or `None` if the range is not inside it.
    ///
    /// The caller must only ask for published bytes (contract rule 1): bytes below a segment's
    /// published end, or a sealed index file.
    pub(crate) fn slice(&self, start: usize, end: usize) -> Option<&[u8]> {
        if start > end || end > self.map.len() {
            return None;
        }
        // SAFETY: `start..end` lies inside the live map (checked above), which stays mapped while
        // `self` borrows it. The bytes are published, so by contract rules 1-3 nothing writes or
        // truncates them while the map exists: an immutable borrow of them is sound. Rule 4: the
        // caller treats the contents as untrusted.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), end - start) })
    }

    /// A zero-copy `Bytes` of `start..end` that keeps the map alive, or `None` if the range is not
    /// inside the map. Same caller obligation as [`MappedFile::slice`].
    pub(crate) fn bytes(&self, start: usize, end: usize) -> Option<Bytes> {
        self.slice(start, end)?;
        Some(Bytes::from_owner(MappedRange {
            map: Arc::clone(&self.map),
            start,
            end,
        }))
    }
}

/// The owner behind a `Bytes` cut from a map: it keeps the map alive and names the range.
struct MappedRange {
    map: Arc<MmapRaw>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        // INVARIANT: `MappedFile::bytes` checked `start..end` against the map before building
        // this owner, and neither the map nor the range changes afterwards.
        // SAFETY: the range is inside the map, which `self.map` keeps alive for as long as the
        // returned borrow of `self`. The bytes were published when the range was cut, so by
        // contract rules 1-3 they are never written or truncated while this map exists.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start), self.end - self.start)
        }
    }
}
