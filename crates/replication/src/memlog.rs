//! A replica log in memory, one record per batch: for unit tests and the simulation.

use crate::ReplicaLog;

/// A log of `(epoch, value)` records at offsets `start..`, durable below `flushed`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemLog {
    /// The first offset held.
    pub start: u64,
    /// The records, by offset from `start`: (epoch, value).
    pub records: Vec<(u32, u64)>,
    /// The offset below which the log is durable.
    pub flushed: u64,
}

impl MemLog {
    /// A log of records with these epochs (values = offsets).
    pub fn with_epochs(epochs: &[u32]) -> MemLog {
        MemLog {
            start: 0,
            records: epochs
                .iter()
                .enumerate()
                .map(|(i, e)| (*e, i as u64))
                .collect(),
            flushed: epochs.len() as u64,
        }
    }

    /// Appends one record.
    pub fn push(&mut self, epoch: u32, value: u64) {
        self.records.push((epoch, value));
    }

    /// The record at `offset`.
    pub fn get(&self, offset: u64) -> Option<(u32, u64)> {
        let i = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.records.get(i).copied()
    }

    /// Removes every record at or above `offset`.
    pub fn truncate(&mut self, offset: u64) {
        let keep = offset.saturating_sub(self.start) as usize;
        self.records.truncate(keep);
        self.flushed = self.flushed.min(self.log_end());
    }

    /// Makes everything durable.
    pub fn flush(&mut self) {
        self.flushed = self.log_end();
    }

    /// What a power loss leaves: the durable prefix.
    pub fn lose_unflushed(&mut self) {
        let flushed = self.flushed;
        self.truncate(flushed);
    }
}

impl ReplicaLog for MemLog {
    fn log_start(&self) -> u64 {
        self.start
    }

    fn log_end(&self) -> u64 {
        self.start + self.records.len() as u64
    }

    fn flushed(&self) -> u64 {
        self.flushed
    }

    fn latest_epoch(&self) -> Option<u32> {
        self.records.last().map(|(e, _)| *e)
    }

    fn end_offset_for_epoch(&self, epoch: u32) -> Option<(u32, u64)> {
        let floor = self
            .records
            .iter()
            .rev()
            .map(|(e, _)| *e)
            .find(|e| *e <= epoch)?;
        let end = self
            .records
            .iter()
            .position(|(e, _)| *e > floor)
            .map_or(self.log_end(), |i| self.start + i as u64);
        Some((floor, end))
    }
}
