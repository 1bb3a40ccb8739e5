//! `cairn-check HISTORY.jsonl`: checks a workload's history and prints the verdict as JSON.
//! Exit status: 0 no anomaly, 1 anomalies found, 2 the history cannot be read.
#![forbid(unsafe_code)]

use std::io::{BufReader, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: cairn-check HISTORY.jsonl   (- reads standard input)");
        return ExitCode::from(2);
    };
    let verdict = if path == "-" {
        cairn_check::check_reader(std::io::stdin().lock())
    } else {
        match std::fs::File::open(path) {
            Ok(file) => cairn_check::check_reader(BufReader::with_capacity(1 << 20, file)),
            Err(err) => {
                eprintln!("cairn-check: {path}: {err}");
                return ExitCode::from(2);
            }
        }
    };
    let verdict = match verdict {
        Ok(verdict) => verdict,
        Err(err) => {
            eprintln!("cairn-check: {path}: {err}");
            return ExitCode::from(2);
        }
    };
    let text = serde_json::to_string_pretty(&verdict).unwrap_or_else(|e| format!("{e}"));
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").is_err() {
        return ExitCode::from(2);
    }
    if verdict.valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
