//! A real process appending with fsync on every append is killed with SIGKILL at random moments,
//! 50 times, and the log is reopened after each kill. Every append the child acknowledged (printed
//! after `append` returned) must be there exactly once, in order, with its bytes; the log may also
//! hold appends that completed but were not yet printed, and nothing else. While the child runs,
//! opening its log from this process fails with `OpenError::Locked`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_protocol::Offset;
use cairn_storage::{Log, LogConfig, OpenError};
use cairn_testkit::tagged_value;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::support::read_values;

/// Kills per run; `CAIRN_SOAK_KILLS` raises it for on-demand soak runs (scripts/soak.sh).
fn n_kills() -> u64 {
    std::env::var("CAIRN_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("topic-0");
    let seed: u64 = std::env::var("CAIRN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b696c6c);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut acked_end = 0u64;
    let mut total_acks = 0usize;
    let n_kills = n_kills();
    for round in 0..n_kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-crash-child"))
            .arg(&log_dir)
            .arg((seed + round).to_string())
            .env("CAIRN_CHILD_MAX_SECS", "20")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        // Wait for the child to open the log (its recovery is part of what is tested), then
        // let it append for a random while before killing it mid-stream.
        let mut first = [0u8; 6];
        stdout.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"ready ", "round {round}");
        if round == 0 {
            // The child owns the directory now: another process is refused with a clear error.
            let err = Log::open(&log_dir, LogConfig::default()).unwrap_err();
            assert!(matches!(err, OpenError::Locked { .. }), "{err}");
            assert!(
                err.to_string().contains("locked by another process"),
                "{err}"
            );
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(1..40)));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child must die by the signal"
        );
        let mut output = String::new();
        stdout.read_to_string(&mut output).unwrap();
        // Only whole lines were acknowledged; a line cut by the kill was not.
        let complete = &output[..output.rfind('\n').map_or(0, |i| i + 1)];
        let mut lines = complete.lines();
        let ready_end: u64 = lines.next().unwrap().trim().parse().unwrap();
        assert!(
            ready_end >= acked_end,
            "round {round}: the child reopened at {ready_end}, below acknowledged {acked_end}"
        );
        for line in lines {
            let (_, last) = line.split_once(' ').unwrap();
            acked_end = last.parse::<u64>().unwrap() + 1;
            total_acks += 1;
        }

        let started = Instant::now();
        let log = Log::open(&log_dir, LogConfig::default()).unwrap();
        assert!(
            !log.recovery_report().clean,
            "round {round}: a killed process cannot have closed cleanly"
        );
        let values = read_values(&log, Offset(0));
        assert!(
            values.len() as u64 >= acked_end,
            "round {round}: {} records, {acked_end} acknowledged",
            values.len()
        );
        assert_eq!(log.log_end_offset().0, values.len() as u64);
        for (idx, (offset, value)) in values.iter().enumerate() {
            assert_eq!(
                *offset, idx as u64,
                "round {round}: offsets run in order without gaps"
            );
            assert_eq!(
                value.as_ref(),
                tagged_value(*offset, value.len()).as_slice(),
                "round {round}: bytes of offset {offset}"
            );
        }
        log.verify().unwrap();
        drop(log); // another unclean stop: the child recovers it again
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    println!(
        "kill -9: {n_kills} kills, {total_acks} acknowledged appends, final log end {acked_end}+"
    );
    assert!(
        total_acks > n_kills as usize,
        "the child must make progress between kills"
    );
}
