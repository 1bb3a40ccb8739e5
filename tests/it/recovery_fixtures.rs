//! Recovery fixtures on real files. A template log is written and left without a clean shutdown;
//! each case copies it, damages the last segment in one precise way, and opens it:
//! - cut at every byte position across its last two batches: recovery keeps exactly the batches
//!   that end at or before the cut;
//! - every byte of the last two batches' headers flipped: recovery drops exactly the damaged batch
//!   and what follows it, except `partitionLeaderEpoch`, which a leader stamps outside the CRC and
//!   nothing can check (a damaged `baseOffset`, also outside the CRC, breaks the offset sequence).
//!
//! After each open, `Log::verify` checks the rebuilt indexes against a linear scan, and the
//! contents are compared batch by batch with the template.

use std::path::Path;

use cairn_protocol::Offset;
use cairn_protocol::batch::field;
use cairn_storage::{Log, LogConfig, ReadMode};
use cairn_testkit::tagged_batch;

use crate::support::{flip_byte, read_all};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 8 * 1024,
        index_interval_bytes: 256,
        preallocate_bytes: 4 * 1024,
        read_mode: ReadMode::Mmap,
        ..LogConfig::default()
    }
}

struct Template {
    dir: tempfile::TempDir,
    /// (base offset, bytes) of every batch.
    batches: Vec<(u64, Vec<u8>)>,
    last_segment: String,
    /// Position in the last segment of each of its batches, and the data end.
    positions: Vec<u32>,
    data_end: u32,
}

fn template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    for idx in 0..120u64 {
        let tag = log.log_end_offset().0;
        let mut batch = tagged_batch(
            tag,
            1 + (idx % 3) as usize,
            20 + (idx % 7) as usize * 9,
            idx as i64,
        );
        log.append(&mut batch, 1).unwrap();
    }
    let active = log.active_segment_base().0;
    let batches: Vec<(u64, Vec<u8>)> = read_all(&log, Offset(0))
        .into_iter()
        .map(|b| (b.header().base_offset as u64, b.bytes().to_vec()))
        .collect();
    let mut positions = Vec::new();
    let mut pos = 0u32;
    for (base, bytes) in &batches {
        if *base >= active {
            positions.push(pos);
            pos += bytes.len() as u32;
        }
    }
    assert!(
        positions.len() >= 3,
        "the active segment holds a few batches"
    );
    log.flush_all().unwrap();
    drop(log); // no clean shutdown: the next open scans
    Template {
        dir,
        batches,
        last_segment: format!("{active:020}.log"),
        positions,
        data_end: pos,
    }
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
    }
    to
}

/// Opens a damaged copy and checks it holds exactly the template's first `n_kept` batches.
fn check(t: &Template, damage: impl FnOnce(&Path), n_kept: usize, case: &str) {
    let want: Vec<Vec<u8>> = t.batches[..n_kept].iter().map(|(_, b)| b.clone()).collect();
    check_exact(t, damage, want, case);
}

/// Opens a damaged copy and checks it holds exactly `want`.
fn check_exact(t: &Template, damage: impl FnOnce(&Path), want: Vec<Vec<u8>>, case: &str) {
    let n_kept = want.len();
    let copy = copy_dir(t.dir.path());
    damage(&copy.path().join(&t.last_segment));
    let log =
        Log::open(copy.path(), config()).unwrap_or_else(|e| panic!("{case}: open failed: {e}"));
    log.verify().unwrap_or_else(|e| panic!("{case}: {e}"));
    let got: Vec<Vec<u8>> = read_all(&log, Offset(0))
        .iter()
        .map(|b| b.bytes().to_vec())
        .collect();
    assert_eq!(got.len(), want.len(), "{case}: batch count");
    assert!(got == want, "{case}: contents differ");
    let expected_end = t.batches.get(n_kept).map_or_else(
        || {
            t.batches
                .last()
                .map_or(0, |(base, b)| base + batch_records(b))
        },
        |(base, _)| *base,
    );
    assert_eq!(
        log.log_end_offset(),
        Offset(expected_end),
        "{case}: log end"
    );
    // Appending continues cleanly after the repaired end, at an epoch no older than the log's
    // latest, as any leader's. Recovery takes the epochs of the batches it scans into the
    // leader-epoch cache (as Kafka's does: the checkpoint is written lazily, by flushes), so a
    // batch whose epoch field was flipped (outside the CRC, undetectable) raises the latest.
    let epoch = log.leader_epochs().last().map_or(1, |e| e.epoch.max(1));
    let mut batch = tagged_batch(expected_end, 2, 10, 0);
    log.append(&mut batch, epoch).unwrap();
    log.verify()
        .unwrap_or_else(|e| panic!("{case} after append: {e}"));
}

fn batch_records(bytes: &[u8]) -> u64 {
    let header = cairn_protocol::batch::BatchHeader::parse(bytes).unwrap();
    header.last_offset_delta as u64 + 1
}

#[test]
fn cut_at_every_byte_of_the_last_two_batches() {
    let t = template();
    let n = t.batches.len();
    let second_last = t.positions[t.positions.len() - 2];
    for cut in second_last..=t.data_end {
        // Batches wholly below the cut survive.
        let n_kept = n - t
            .positions
            .iter()
            .rev()
            .take(2)
            .filter(|&&p| {
                let idx = t.positions.iter().position(|&q| q == p).unwrap();
                let end = t.positions.get(idx + 1).copied().unwrap_or(t.data_end);
                end > cut
            })
            .count();
        check(
            &t,
            |path| {
                let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                file.set_len(cut.into()).unwrap();
            },
            n_kept,
            &format!("cut at {cut}"),
        );
    }
}

#[test]
fn flip_every_header_byte_of_the_last_two_batches() {
    let t = template();
    let n = t.batches.len();
    for (rank, &pos) in t.positions.iter().rev().take(2).enumerate() {
        let damaged_idx = n - 1 - rank;
        for byte in 0..61u32 {
            // The leader epoch is outside the CRC and nothing can check it: the batch survives.
            // A damaged base offset breaks the offset sequence and is caught.
            let survives =
                (field::PARTITION_LEADER_EPOCH as u32..field::MAGIC as u32).contains(&byte);
            let mut want: Vec<Vec<u8>> = t.batches.iter().map(|(_, b)| b.clone()).collect();
            if survives {
                want[damaged_idx][byte as usize] ^= 0xff;
            } else {
                want.truncate(damaged_idx);
            }
            check_exact(
                &t,
                |path| flip_byte(path, (pos + byte).into(), 0xff),
                want,
                &format!("batch {damaged_idx} header byte {byte}"),
            );
        }
    }
}

#[test]
fn garbage_after_the_data_is_cut_off() {
    let t = template();
    check(
        &t,
        |path| {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.write_all_at(
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 7, 7],
                t.data_end.into(),
            )
            .unwrap();
        },
        t.batches.len(),
        "zeros then garbage after the data",
    );
}
