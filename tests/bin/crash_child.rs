//! The child process of the kill -9 test: appends tagged batches to a log with fsync on every
//! append and prints `base last` for each acknowledged append, until it is killed (or, so that it
//! always stops by itself, after `CAIRN_CHILD_MAX_SECS` seconds).
//!
//! Usage: `cairn-crash-child DIR SEED`
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::{Duration, Instant};

use cairn_storage::{FlushPolicy, Log, LogConfig};

fn main() {
    if let Err(err) = run() {
        eprintln!("cairn-crash-child: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: cairn-crash-child DIR SEED")?;
    let seed: u64 = args
        .next()
        .ok_or("usage: cairn-crash-child DIR SEED")?
        .parse()?;
    let max_secs: u64 = std::env::var("CAIRN_CHILD_MAX_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        preallocate_bytes: 16 * 1024,
        flush: FlushPolicy::EveryAppend,
        ..LogConfig::default()
    };
    let log = Log::open(&dir, config)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {}", log.log_end_offset())?;
    out.flush()?;
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut state = seed | 1;
    while Instant::now() < deadline {
        // xorshift: sizes vary without a dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let tag = log.log_end_offset().0;
        let n_records = 1 + (state % 8) as usize;
        let value_bytes = 16 + (state >> 8) as usize % 2000;
        let mut batch = cairn_testkit::tagged_batch(tag, n_records, value_bytes, 0);
        let info = log.append(&mut batch, 0)?;
        writeln!(out, "{} {}", info.base_offset, info.last_offset)?;
        out.flush()?;
    }
    Ok(())
}
