//! The leader-epoch cache: for each leader epoch, the first offset written in it. Replication uses
//! it to answer "where does epoch E end?" (Kafka's OffsetsForLeaderEpoch, KIP-101 and KIP-279), so
//! a follower truncates exactly the records a failed-over leader never had.

/// One epoch and the first offset its leader wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// The leader epoch.
    pub epoch: u32,
    /// Its first offset.
    pub start_offset: u64,
}

/// Epochs in increasing order of both epoch and start offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderEpochCache {
    entries: Vec<EpochEntry>,
}

impl LeaderEpochCache {
    /// A cache of these entries, dropping any that break the ordering.
    pub fn from_entries(entries: impl IntoIterator<Item = EpochEntry>) -> LeaderEpochCache {
        let mut cache = LeaderEpochCache::default();
        for entry in entries {
            cache.assign(entry.epoch, entry.start_offset);
        }
        cache
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch.
    pub fn latest(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// Records that `epoch` starts at `start_offset`; returns whether anything changed. As in
    /// Kafka, entries that conflict (an epoch at or above `epoch`, or a start at or above
    /// `start_offset`) are replaced, so the cache stays ordered.
    pub fn assign(&mut self, epoch: u32, start_offset: u64) -> bool {
        if let Some(latest) = self.latest()
            && latest.epoch == epoch
            && latest.start_offset <= start_offset
        {
            return false;
        }
        self.entries
            .retain(|e| e.epoch < epoch && e.start_offset < start_offset);
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        true
    }

    /// The epoch at or below `epoch` and the offset where it ends (the next epoch's start, or
    /// `log_end` for the newest), as Kafka's `endOffsetFor`. `None` if `epoch` is newer than any
    /// known or the cache is empty.
    pub fn end_offset_for(&self, epoch: u32, log_end: u64) -> Option<(u32, u64)> {
        let latest = self.latest()?;
        if epoch == latest.epoch {
            return Some((epoch, log_end));
        }
        let higher = self.entries.iter().find(|e| e.epoch > epoch)?;
        let floor = self.entries.iter().rev().find(|e| e.epoch <= epoch);
        Some((floor.map_or(epoch, |e| e.epoch), higher.start_offset))
    }

    /// Forgets epochs that start at or after `log_end` (after truncation).
    pub fn truncate_from_end(&mut self, log_end: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < log_end);
        before != self.entries.len()
    }

    /// Forgets epochs wholly before `log_start`, moving the one that spans it to start there.
    pub fn truncate_from_start(&mut self, log_start: u64) -> bool {
        let spanning = self
            .entries
            .iter()
            .rposition(|e| e.start_offset <= log_start);
        let Some(idx) = spanning else {
            return false;
        };
        let changed = idx > 0
            || self
                .entries
                .first()
                .is_some_and(|e| e.start_offset != log_start);
        self.entries.drain(..idx);
        if let Some(first) = self.entries.first_mut() {
            first.start_offset = log_start;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(entries: &[(u32, u64)]) -> LeaderEpochCache {
        LeaderEpochCache::from_entries(entries.iter().map(|&(epoch, start_offset)| EpochEntry {
            epoch,
            start_offset,
        }))
    }

    #[test]
    fn end_offsets_follow_kafka() {
        let c = cache(&[(1, 0), (3, 100), (4, 250)]);
        assert_eq!(c.end_offset_for(4, 300), Some((4, 300)));
        assert_eq!(c.end_offset_for(3, 300), Some((3, 250)));
        assert_eq!(c.end_offset_for(2, 300), Some((1, 100)));
        assert_eq!(c.end_offset_for(0, 300), Some((0, 0)));
        assert_eq!(c.end_offset_for(5, 300), None);
        assert_eq!(LeaderEpochCache::default().end_offset_for(1, 0), None);
    }

    #[test]
    fn assign_replaces_conflicts() {
        let mut c = cache(&[(1, 0), (3, 100)]);
        assert!(!c.assign(3, 120));
        assert!(c.assign(2, 50));
        assert_eq!(c, cache(&[(1, 0), (2, 50)]));
    }

    #[test]
    fn truncation_both_ends() {
        let mut c = cache(&[(1, 0), (3, 100), (4, 250)]);
        assert!(c.truncate_from_end(250));
        assert_eq!(c, cache(&[(1, 0), (3, 100)]));
        assert!(c.truncate_from_start(120));
        assert_eq!(
            c.entries(),
            &[EpochEntry {
                epoch: 3,
                start_offset: 120
            }]
        );
        assert!(!c.truncate_from_start(50));
    }
}
