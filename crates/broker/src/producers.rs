//! Idempotent produce: producer ids, and per partition the last batches of each producer, so a
//! retried batch is answered with its original offsets instead of being written twice, and a
//! batch out of sequence is refused (Kafka's rules, `ProducerStateManager`/`ProducerAppendInfo`).
//!
//! The state lives in memory next to each partition's log and is rebuilt at open from the batch
//! headers of the active segment (see [`ProducerStates::rebuild`]); batches older than that are
//! not needed to detect a retry, which arrives within the producer's delivery timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::error::BrokerError;
use cairn_protocol::batch::BatchHeader;

/// How many batches per producer and partition are remembered: the most requests an idempotent
/// producer may have in flight. Kafka remembers 5 (its clients' limit, which they keep here);
/// Cairn's client may pipeline up to 16 (`cairn_client::producer::IN_FLIGHT_MAX`), for
/// replicated acks=all writes whose round trip includes the followers' fetches and fsyncs.
pub const BATCHES_REMEMBERED: usize = 16;

/// One remembered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchMeta {
    first_seq: i32,
    last_seq: i32,
    base_offset: u64,
    last_offset: u64,
}

#[derive(Debug)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMeta>,
    last_write_ms: i64,
}

/// What to do with an idempotent batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append it.
    Append,
    /// Already appended at these offsets: answer with them, append nothing.
    Duplicate {
        /// Its first offset.
        base_offset: u64,
        /// Its last offset.
        last_offset: u64,
    },
    /// Refuse it with this error.
    Reject(BrokerError),
}

/// The producers of one partition.
#[derive(Debug, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
}

fn last_seq(header: &BatchHeader) -> i32 {
    // Sequences wrap at i32::MAX to 0.
    ((i64::from(header.base_sequence) + i64::from(header.last_offset_delta))
        % (i64::from(i32::MAX) + 1)) as i32
}

fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX { 0 } else { seq + 1 }
}

impl ProducerStates {
    /// Checks an idempotent batch (producer id >= 0) against the producer's state.
    pub fn check(&self, header: &BatchHeader) -> SequenceCheck {
        let Some(entry) = self.producers.get(&header.producer_id) else {
            // Unknown producer (new, or its state expired): any sequence is accepted, as Kafka
            // does when it has no entry.
            return SequenceCheck::Append;
        };
        let epoch = header.producer_epoch;
        if epoch < entry.epoch {
            return SequenceCheck::Reject(BrokerError::InvalidProducerEpoch(format!(
                "producer {} epoch {epoch} is older than the current epoch {}",
                header.producer_id, entry.epoch
            )));
        }
        let first = header.base_sequence;
        let last = last_seq(header);
        if epoch == entry.epoch
            && let Some(dup) = entry
                .batches
                .iter()
                .find(|b| b.first_seq == first && b.last_seq == last)
        {
            return SequenceCheck::Duplicate {
                base_offset: dup.base_offset,
                last_offset: dup.last_offset,
            };
        }
        if epoch > entry.epoch {
            if first != 0 {
                return SequenceCheck::Reject(BrokerError::OutOfOrderSequence(format!(
                    "producer {} new epoch {epoch} must start at sequence 0, got {first}",
                    header.producer_id
                )));
            }
            return SequenceCheck::Append;
        }
        let expected = entry.batches.back().map_or(0, |b| next_seq(b.last_seq));
        if first != expected {
            return SequenceCheck::Reject(BrokerError::OutOfOrderSequence(format!(
                "producer {} epoch {epoch}: expected sequence {expected}, got {first}",
                header.producer_id
            )));
        }
        SequenceCheck::Append
    }

    /// Records an appended idempotent batch.
    pub fn record(
        &mut self,
        header: &BatchHeader,
        base_offset: u64,
        last_offset: u64,
        now_ms: i64,
    ) {
        let entry = self
            .producers
            .entry(header.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: header.producer_epoch,
                batches: VecDeque::with_capacity(BATCHES_REMEMBERED),
                last_write_ms: now_ms,
            });
        if header.producer_epoch != entry.epoch {
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == BATCHES_REMEMBERED {
            entry.batches.pop_front();
        }
        entry.batches.push_back(BatchMeta {
            first_seq: header.base_sequence,
            last_seq: last_seq(header),
            base_offset,
            last_offset,
        });
        entry.last_write_ms = now_ms;
    }

    /// Forgets producers idle for longer than `max_idle_ms` (Kafka
    /// `producer.id.expiration.ms`); returns how many remain.
    pub fn expire(&mut self, now_ms: i64, max_idle_ms: i64) -> usize {
        self.producers
            .retain(|_, e| now_ms.saturating_sub(e.last_write_ms) <= max_idle_ms);
        self.producers.len()
    }

    /// Rebuilds the state from a run of whole batches (the active segment's), oldest first.
    pub fn rebuild(&mut self, mut batches: &[u8], now_ms: i64) {
        while let Ok(header) = BatchHeader::parse(batches) {
            if header.producer_id >= 0 && !header.is_control() {
                let base = header.base_offset.max(0) as u64;
                let last = base + header.last_offset_delta.max(0) as u64;
                self.record(&header, base, last, now_ms);
            }
            batches = batches.get(header.total_bytes()..).unwrap_or_default();
        }
    }
}

/// Hands out producer ids, unique in the cluster: the controller hands each broker blocks of
/// ids (Kafka's AllocateProducerIds), recorded in the metadata log, so no two brokers, and no
/// two lives of one broker, ever hand out the same id.
#[derive(Debug)]
pub struct ProducerIds {
    node_id: u32,
    client: cairn_controller::ControllerClient,
    /// (next id, end of the block).
    block: Mutex<(i64, i64)>,
}

impl ProducerIds {
    /// An allocator with no block yet.
    pub fn new(node_id: u32, client: cairn_controller::ControllerClient) -> ProducerIds {
        ProducerIds {
            node_id,
            client,
            block: Mutex::new((0, 0)),
        }
    }

    fn take(&self) -> Option<i64> {
        let mut block = self.block.lock().unwrap_or_else(|e| e.into_inner());
        let (next, end) = *block;
        (next < end).then(|| {
            block.0 = next + 1;
            next
        })
    }

    /// The next producer id (asks the controller for a block when this one is used up).
    pub async fn allocate(&self) -> Result<i64, BrokerError> {
        if let Some(id) = self.take() {
            return Ok(id);
        }
        let command = cairn_controller::Command::AllocateProducerIds {
            node_id: self.node_id,
        };
        match self.client.execute(command).await {
            Ok(cairn_controller::Reply::ProducerIds { first, count }) => {
                let mut block = self.block.lock().unwrap_or_else(|e| e.into_inner());
                // Another caller may have refilled it meanwhile: the newer block wins; ids of
                // the other are simply never used.
                *block = (first + 1, first + i64::from(count));
                Ok(first)
            }
            Ok(other) => Err(BrokerError::Internal(format!(
                "unexpected answer to a producer id allocation: {other:?}"
            ))),
            Err(err) => Err(BrokerError::Unavailable(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, n: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 0,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: n - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: n,
        }
    }

    #[test]
    fn duplicates_return_original_offsets_and_gaps_are_refused() {
        let mut s = ProducerStates::default();
        assert_eq!(s.check(&header(7, 0, 0, 10)), SequenceCheck::Append);
        s.record(&header(7, 0, 0, 10), 100, 109, 0);
        s.record(&header(7, 0, 10, 5), 110, 114, 0);
        assert_eq!(
            s.check(&header(7, 0, 0, 10)),
            SequenceCheck::Duplicate {
                base_offset: 100,
                last_offset: 109
            }
        );
        assert_eq!(s.check(&header(7, 0, 15, 1)), SequenceCheck::Append);
        assert!(matches!(
            s.check(&header(7, 0, 16, 1)),
            SequenceCheck::Reject(BrokerError::OutOfOrderSequence(_))
        ));
        // Older epoch: fenced. Newer epoch: must restart at 0.
        s.record(&header(7, 1, 0, 1), 115, 115, 0);
        assert!(matches!(
            s.check(&header(7, 0, 15, 1)),
            SequenceCheck::Reject(BrokerError::InvalidProducerEpoch(_))
        ));
        assert!(matches!(
            s.check(&header(7, 2, 3, 1)),
            SequenceCheck::Reject(BrokerError::OutOfOrderSequence(_))
        ));
        assert_eq!(s.check(&header(7, 2, 0, 1)), SequenceCheck::Append);
    }

    #[test]
    fn only_the_last_batches_are_remembered_and_sequences_wrap() {
        let mut s = ProducerStates::default();
        let n = BATCHES_REMEMBERED as i32 + 2;
        for i in 0..n {
            s.record(&header(1, 0, i, 1), i as u64, i as u64, 0);
        }
        assert!(matches!(
            s.check(&header(1, 0, 2, 1)),
            SequenceCheck::Duplicate { .. }
        ));
        assert!(matches!(
            s.check(&header(1, 0, 1, 1)),
            SequenceCheck::Reject(..)
        ));
        let mut s = ProducerStates::default();
        s.record(&header(1, 0, i32::MAX - 1, 2), 0, 1, 0);
        assert_eq!(s.check(&header(1, 0, 0, 1)), SequenceCheck::Append);
        assert_eq!(s.expire(10, 5), 0);
    }
}
