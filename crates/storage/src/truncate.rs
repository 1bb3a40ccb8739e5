//! Truncation for replication: dropping the log's suffix from an offset on.
//!
//! Bytes a reader was handed must never change (mmap contract rule 3), so a segment is not cut in
//! place: its kept prefix is copied to `<base>.log.swap`, synced, and renamed over `<base>.log`.
//! Readers of the old inode keep it alive until they finish. A crash before the rename leaves the
//! old file intact and a `.swap` that recovery deletes; the follower then truncates again.

use std::io;
use std::path::PathBuf;

use crate::fs::OpenMode;
use crate::log::{Log, State};
use crate::segment::{self, Segment};

type IoFailure = (&'static str, PathBuf, io::Error);

/// Bytes copied at a time.
const COPY_CHUNK_BYTES: usize = 1024 * 1024;

pub(crate) fn truncate_locked(log: &Log, state: &mut State, offset: u64) -> Result<(), IoFailure> {
    let (fs, dir, config) = (&*log.fs, &log.dir, &log.config);
    let doomed: Vec<u64> = state.segments.range(offset..).map(|(b, _)| *b).collect();
    for base in doomed.into_iter().rev() {
        if let Some(segment) = state.segments.remove(&base) {
            segment
                .remove_files(fs, dir)
                .map_err(|e| ("delete segment", segment.log_path(dir), e))?;
        }
    }
    let Some(last) = state.segments.values_mut().next_back() else {
        // Everything went (the offset is at or below the log start): start afresh there.
        let segment = Segment::create(fs, dir, offset, config).map_err(|e| {
            (
                "create segment",
                dir.join(segment::file_name(offset, segment::LOG_SUFFIX)),
                e,
            )
        })?;
        fs.sync_dir(dir)
            .map_err(|e| ("sync directory", dir.clone(), e))?;
        state.segments.insert(offset, segment);
        state.log_start = offset;
        state.log_end = offset;
        return Ok(());
    };
    let path = last.log_path(dir);
    let cut = find_cut(last, offset).map_err(|e| ("read segment", path.clone(), e))?;
    if cut < last.size {
        let swap = dir.join(format!(
            "{}.swap",
            segment::file_name(last.base_offset, segment::LOG_SUFFIX)
        ));
        let copy = fs
            .open(&swap, OpenMode::Truncate)
            .map_err(|e| ("create swap file", swap.clone(), e))?;
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let mut pos = 0u32;
        while pos < cut {
            let n = (cut - pos).min(COPY_CHUNK_BYTES as u32) as usize;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            last.file
                .read_exact_at(chunk, pos.into())
                .map_err(|e| ("read segment", path.clone(), e))?;
            copy.write_all_at(chunk, pos.into())
                .map_err(|e| ("write swap file", swap.clone(), e))?;
            pos += n as u32;
        }
        // The copy must be complete on disk before its name replaces the original.
        copy.sync_all()
            .map_err(|e| ("sync swap file", swap.clone(), e))?;
        fs.rename(&swap, &path)
            .map_err(|e| ("rename swap file", path.clone(), e))?;
        last.replace_file(copy)
            .map_err(|e| ("stat segment", path.clone(), e))?;
    }
    last.reactivate(fs, dir, config)
        .map_err(|e| ("reactivate segment", path.clone(), e))?;
    state.log_end = last.next_offset;
    fs.sync_dir(dir)
        .map_err(|e| ("sync directory", dir.clone(), e))
}

/// The position of the first batch whose last offset is at or above `offset`, or the segment size.
fn find_cut(segment: &Segment, offset: u64) -> io::Result<u32> {
    let reader = segment.pread_reader();
    let mut pos = 0u32;
    while let Some(header) = segment::read_header(&*reader, pos, segment.size)? {
        if header.last_offset() as u64 >= offset {
            return Ok(pos);
        }
        pos += header.total_bytes() as u32;
    }
    Ok(segment.size)
}
