//! One member of a consumer group, as a process of its own, for tests/it/groups.rs: Cairn's
//! `GroupConsumer` with default settings (except: new partitions from the earliest offset), so
//! delivery is at least once with automatic commits. Prints JSON lines with a wall-clock time:
//! `joining`, every `assigned` / `revoked` / `lost` partition list (from the rebalance listener)
//! and every record processed (`p`, `o`). Leaves the group (committing) when stdin closes.
//!
//!     cairn-group-member BOOTSTRAP TOPIC GROUP NAME
//!
//! `CAIRN_GROUP_ASSIGNOR` (comma-separated names) replaces the default assignor list.
#![forbid(unsafe_code)]

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_client::{Assignor, GroupConfig, GroupConsumer, Position, Rebalance};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn say(name: &str, mut event: Value) {
    if let Some(map) = event.as_object_mut() {
        map.insert("name".into(), json!(name));
        map.insert("t".into(), json!(now()));
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout (the test is gone) ends the member at its next write.
    if writeln!(out, "{event}").is_err() {
        std::process::exit(0);
    }
}

fn partitions(list: &[(String, u32)]) -> Vec<u32> {
    list.iter().map(|(_, p)| *p).collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, group, name] = args.as_slice() else {
        return Err("usage: cairn-group-member BOOTSTRAP TOPIC GROUP NAME".into());
    };
    let mut config = GroupConfig::new(group.as_str(), &[topic.as_str()]);
    config.reset = Position::Earliest;
    config.consumer.client_id = name.clone();
    if let Ok(list) = std::env::var("CAIRN_GROUP_ASSIGNOR") {
        config.assignors = list
            .split(',')
            .map(|n| Assignor::from_name(n).ok_or(format!("unknown assignor {n}")))
            .collect::<Result<_, _>>()?;
    }
    let mut consumer = GroupConsumer::connect(bootstrap, config).await?;
    let me = name.clone();
    consumer.on_rebalance(move |event| match event {
        Rebalance::Assigned(p) => say(&me, json!({"assigned": partitions(p)})),
        Rebalance::Revoked(p) => say(&me, json!({"revoked": partitions(p)})),
        Rebalance::Lost(p) => say(&me, json!({"lost": partitions(p)})),
    });
    let mut stdin_closed = tokio::spawn(async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    });
    say(name, json!({"joining": true}));
    loop {
        tokio::select! {
            records = consumer.poll() => {
                for record in records? {
                    say(name, json!({"p": record.partition, "o": record.offset}));
                }
            }
            _ = &mut stdin_closed => break,
        }
    }
    consumer.close().await?;
    say(name, json!({"closed": true}));
    Ok(())
}
