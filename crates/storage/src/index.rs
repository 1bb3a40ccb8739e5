//! Sparse indexes of a segment, as bytes: the same functions serve the active segment's growing
//! `Vec<u8>` and a sealed segment's mapped file.
//!
//! - Offset index (`.index`): entries of 8 bytes, `relative offset u32 | position u32`, big-endian.
//!   The relative offset is a batch's base offset minus the segment's base offset; the position is
//!   the batch's byte position in the `.log`. One entry per `index_interval_bytes` of log.
//! - Time index (`.timeindex`): entries of 12 bytes, `timestamp i64 | relative offset u32`. The
//!   timestamp is the largest seen so far in the segment and the offset is the last offset of the
//!   batch that was appended when the entry was written, so every record at or below that offset
//!   has a timestamp at or below the entry's. Entries are strictly increasing in both fields.
//!
//! Indexes are derived data: after an unclean shutdown they are rebuilt from the log, and a sealed
//! index that fails [`offset_index_is_sane`] is rebuilt too.

/// Bytes of one offset-index entry.
pub(crate) const OFFSET_ENTRY_BYTES: usize = 8;
/// Bytes of one time-index entry.
pub(crate) const TIME_ENTRY_BYTES: usize = 12;

fn u32_at(buf: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_be_bytes(*buf.get(pos..)?.first_chunk()?))
}

fn i64_at(buf: &[u8], pos: usize) -> Option<i64> {
    Some(i64::from_be_bytes(*buf.get(pos..)?.first_chunk()?))
}

/// Entry `idx` of an offset index: (relative offset, position).
pub(crate) fn offset_entry(buf: &[u8], idx: usize) -> Option<(u32, u32)> {
    let at = idx.checked_mul(OFFSET_ENTRY_BYTES)?;
    Some((u32_at(buf, at)?, u32_at(buf, at + 4)?))
}

/// Entry `idx` of a time index: (timestamp, relative offset).
pub(crate) fn time_entry(buf: &[u8], idx: usize) -> Option<(i64, u32)> {
    let at = idx.checked_mul(TIME_ENTRY_BYTES)?;
    Some((i64_at(buf, at)?, u32_at(buf, at + 8)?))
}

pub(crate) fn push_offset_entry(buf: &mut Vec<u8>, relative_offset: u32, position: u32) {
    buf.extend_from_slice(&relative_offset.to_be_bytes());
    buf.extend_from_slice(&position.to_be_bytes());
}

pub(crate) fn push_time_entry(buf: &mut Vec<u8>, timestamp: i64, relative_offset: u32) {
    buf.extend_from_slice(&timestamp.to_be_bytes());
    buf.extend_from_slice(&relative_offset.to_be_bytes());
}

/// Number of whole entries of `entry_bytes` in `buf`.
fn n_entries(buf: &[u8], entry_bytes: usize) -> usize {
    buf.len() / entry_bytes
}

/// The position to start scanning from for `relative_offset`: that of the last entry at or below
/// it, or 0.
pub(crate) fn lookup_position(buf: &[u8], relative_offset: u32) -> u32 {
    let n = n_entries(buf, OFFSET_ENTRY_BYTES);
    let first_above = partition_point(n, |idx| {
        offset_entry(buf, idx).is_some_and(|(rel, _)| rel <= relative_offset)
    });
    first_above
        .checked_sub(1)
        .and_then(|idx| offset_entry(buf, idx))
        .map_or(0, |(_, pos)| pos)
}

/// The last offset whose records are all older than `timestamp`, as a relative offset: from the
/// last time-index entry strictly below `timestamp`. `None` if no entry is below it.
pub(crate) fn lookup_time(buf: &[u8], timestamp: i64) -> Option<u32> {
    let n = n_entries(buf, TIME_ENTRY_BYTES);
    let first_at_or_above = partition_point(n, |idx| {
        time_entry(buf, idx).is_some_and(|(ts, _)| ts < timestamp)
    });
    first_at_or_above
        .checked_sub(1)
        .and_then(|idx| time_entry(buf, idx))
        .map(|(_, rel)| rel)
}

pub(crate) fn last_offset_entry(buf: &[u8]) -> Option<(u32, u32)> {
    offset_entry(buf, n_entries(buf, OFFSET_ENTRY_BYTES).checked_sub(1)?)
}

pub(crate) fn last_time_entry(buf: &[u8]) -> Option<(i64, u32)> {
    time_entry(buf, n_entries(buf, TIME_ENTRY_BYTES).checked_sub(1)?)
}

/// Whether an offset index read from disk is plausible for a segment of `segment_bytes`: whole
/// entries, strictly increasing offsets and positions, positions inside the segment. O(entries),
/// done once when a sealed index is first loaded.
pub(crate) fn offset_index_is_sane(buf: &[u8], segment_bytes: u32) -> bool {
    if !buf.len().is_multiple_of(OFFSET_ENTRY_BYTES) {
        return false;
    }
    let mut previous: Option<(u32, u32)> = None;
    for idx in 0..n_entries(buf, OFFSET_ENTRY_BYTES) {
        let Some((rel, pos)) = offset_entry(buf, idx) else {
            return false;
        };
        if pos >= segment_bytes || previous.is_some_and(|(r, p)| rel <= r || pos <= p) {
            return false;
        }
        previous = Some((rel, pos));
    }
    true
}

/// Whether a time index read from disk is plausible: whole entries, strictly increasing.
pub(crate) fn time_index_is_sane(buf: &[u8]) -> bool {
    if !buf.len().is_multiple_of(TIME_ENTRY_BYTES) {
        return false;
    }
    let mut previous: Option<(i64, u32)> = None;
    for idx in 0..n_entries(buf, TIME_ENTRY_BYTES) {
        let Some((ts, rel)) = time_entry(buf, idx) else {
            return false;
        };
        if previous.is_some_and(|(t, r)| ts <= t || rel <= r) {
            return false;
        }
        previous = Some((ts, rel));
    }
    true
}

/// The first `idx` in `0..n` for which `below(idx)` is false, given `below` is true then false.
fn partition_point(n: usize, below: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// File suffix of the offset index.
pub(crate) const INDEX: &str = ".index";
/// File suffix of the time index.
pub(crate) const TIME_INDEX: &str = ".timeindex";

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(entries: &[(u32, u32)]) -> Vec<u8> {
        let mut buf = Vec::new();
        for &(rel, pos) in entries {
            push_offset_entry(&mut buf, rel, pos);
        }
        buf
    }

    #[test]
    fn position_lookup() {
        let buf = offsets(&[(0, 0), (10, 4096), (25, 8200)]);
        let cases = [
            (0, 0),
            (9, 0),
            (10, 4096),
            (24, 4096),
            (25, 8200),
            (1000, 8200),
        ];
        for (target, expect) in cases {
            assert_eq!(lookup_position(&buf, target), expect, "target {target}");
        }
        assert_eq!(lookup_position(&[], 5), 0);
        // A torn trailing entry is ignored.
        assert_eq!(lookup_position(&buf[..buf.len() - 3], 30), 4096);
    }

    #[test]
    fn time_lookup_is_strictly_below() {
        let mut buf = Vec::new();
        push_time_entry(&mut buf, 100, 4);
        push_time_entry(&mut buf, 200, 9);
        push_time_entry(&mut buf, 300, 15);
        assert_eq!(lookup_time(&buf, 100), None);
        assert_eq!(lookup_time(&buf, 101), Some(4));
        assert_eq!(lookup_time(&buf, 200), Some(4));
        assert_eq!(lookup_time(&buf, 301), Some(15));
        assert_eq!(last_time_entry(&buf), Some((300, 15)));
    }

    #[test]
    fn last_entry_and_sanity() {
        let mut buf = offsets(&[(0, 0), (10, 4096), (25, 8200)]);
        assert!(offset_index_is_sane(&buf, 9000));
        assert!(!offset_index_is_sane(&buf, 8200));
        assert!(!offset_index_is_sane(&buf[..5], 9000));
        assert!(!offset_index_is_sane(&offsets(&[(0, 0), (0, 10)]), 100));
        assert_eq!(last_offset_entry(&buf), Some((25, 8200)));
        buf.truncate(5);
        assert_eq!(last_offset_entry(&buf), None);
    }
}
