//! Power loss: a log on the fault-injecting file system (`cairn_testkit::FaultFs`), appended to
//! with a mix of flushes, rolls and retention, then crashed: every file keeps its synced bytes plus
//! a random prefix of what came after (the last write possibly torn), and every directory a random
//! prefix of its unsynced changes. Each seed runs several cycles, each ending in a power loss or in
//! the death of the process alone (the page cache survives, so the next recovery sees unsynced
//! data that a later power loss can still take away).
//!
//! The promise checked: every record acknowledged as durable (a flush returned, or the recovered
//! log end after a reopen) is there after the crash, at its offset, with its bytes; nothing else is
//! there but a prefix of what was appended after it.
//!
//! Negative control: the same workload with syncs that silently do nothing must lose acknowledged
//! records for some seeds, or this test could not fail; the test checks that it does.

use std::path::Path;
use std::sync::Arc;

use cairn_protocol::Offset;
use cairn_storage::{FlushPolicy, Log, LogConfig, ReadMode};
use cairn_testkit::{FaultFs, Faults, tagged_batch, tagged_value};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use cairn_protocol::limits::DECOMPRESSED_BYTES_MAX;

use crate::support::try_read_all;

/// Seeds per run; `CAIRN_SOAK_SEEDS` raises it for on-demand soak runs (scripts/soak.sh).
fn n_seeds() -> u64 {
    std::env::var("CAIRN_SOAK_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}
const CYCLES_PER_SEED: usize = 6;

fn config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 512,
        preallocate_bytes: 2048,
        read_mode: ReadMode::Pread,
        retention_bytes: Some(12 * 1024),
        flush,
        ..LogConfig::default()
    }
}

/// Runs one seed; returns a description of the first lost acknowledged record, if any.
fn run_seed(seed: u64, faults: Faults) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let fs = FaultFs::new();
    let dir = Path::new("/data/topic-0");
    let flush = if rng.random_bool(0.5) {
        FlushPolicy::EveryAppend
    } else {
        FlushPolicy::Os
    };
    let config = config(flush);
    // Offsets below `durable` were acknowledged as durable.
    let mut durable = 0u64;
    for cycle in 0..CYCLES_PER_SEED {
        let log = Log::open_with(Arc::new(fs.clone()), dir, config.clone())
            .map_err(|e| format!("seed {seed} cycle {cycle}: open failed: {e:#}"))?;
        check_contents(&log, durable).map_err(|e| format!("seed {seed} cycle {cycle}: {e}"))?;
        log.verify()
            .map_err(|e| format!("seed {seed} cycle {cycle}: {e}"))?;
        // What recovery serves is durable: it synced it before serving.
        durable = log.log_end_offset().0;
        fs.set_faults(faults);
        // Some cycles append nothing: a reopen straight into another crash checks that recovery
        // made what it serves durable, and that recovering twice equals recovering once.
        let n_appends = if rng.random_bool(0.25) {
            0
        } else {
            rng.random_range(1..60)
        };
        for _ in 0..n_appends {
            let tag = log.log_end_offset().0;
            let n_records = rng.random_range(1..6);
            let mut batch = tagged_batch(tag, n_records, rng.random_range(8..120), tag as i64);
            let info = log
                .append(&mut batch, 0)
                .map_err(|e| format!("seed {seed}: append: {e}"))?;
            if flush == FlushPolicy::EveryAppend {
                durable = info.last_offset.0 + 1;
            }
            match rng.random_range(0..20) {
                0..=2 => {
                    log.flush(Offset(info.last_offset.0 + 1))
                        .map_err(|e| e.to_string())?;
                    durable = info.last_offset.0 + 1;
                }
                3 => log.roll().map_err(|e| e.to_string())?,
                4 => {
                    log.apply_retention(0).map_err(|e| e.to_string())?;
                }
                _ => {}
            }
        }
        drop(log);
        fs.set_faults(Faults::default());
        if rng.random_bool(0.5) {
            fs.crash(seed.wrapping_mul(1000).wrapping_add(cycle as u64));
        } else {
            // Only the process dies: unsynced writes live on in the page cache, where recovery
            // will find them. It must sync them before it counts them as durable.
            fs.kill_process();
        }
    }
    Ok(())
}

/// The log holds records `log_start..log_end`, each with its tagged value, and reaches `durable`.
fn check_contents(log: &Log, durable: u64) -> Result<(), String> {
    let end = log.log_end_offset().0;
    if end < durable {
        return Err(format!("acknowledged up to {durable}, log ends at {end}"));
    }
    let start = log.log_start_offset();
    let values: Vec<(u64, bytes::Bytes)> = try_read_all(log, start)?
        .iter()
        .flat_map(|b| b.records(DECOMPRESSED_BYTES_MAX).unwrap_or_default())
        .map(|r| (r.offset as u64, r.value.unwrap_or_default()))
        .collect();
    for (idx, (offset, value)) in values.iter().enumerate() {
        let expected_offset = start.0 + idx as u64;
        if *offset != expected_offset {
            return Err(format!("offset {offset} where {expected_offset} belongs"));
        }
        if value.len() < 8 || value[..] != tagged_value(*offset, value.len())[..] {
            return Err(format!("wrong value at offset {offset}"));
        }
    }
    if start.0 + values.len() as u64 != end {
        return Err(format!(
            "read {} records from {start} but the log ends at {end}",
            values.len()
        ));
    }
    Ok(())
}

#[test]
fn acknowledged_records_survive_power_loss() {
    for seed in 0..n_seeds() {
        if let Err(err) = run_seed(seed, Faults::default()) {
            panic!("{err}\nreplay: cargo nextest run -p cairn-tests power_loss (seed {seed})");
        }
    }
}

#[test]
fn negative_control_without_fsync_loses_acknowledged_records() {
    let n_seeds = n_seeds();
    let lost: Vec<String> = (0..n_seeds)
        .filter_map(|seed| {
            run_seed(
                seed,
                Faults {
                    sync_is_noop: true,
                    ..Faults::default()
                },
            )
            .err()
        })
        .collect();
    println!(
        "negative control: with fsync disabled, {} of {n_seeds} seeds lost acknowledged records, as they must; first: {}",
        lost.len(),
        lost.first().map_or("none", String::as_str)
    );
    assert!(
        !lost.is_empty(),
        "with fsync disabled no seed lost anything: this power-loss test cannot detect a missing fsync"
    );
}
