//! Topic names and topic configs, with Kafka's config keys.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_protocol::limits::{BATCH_BYTES_MAX, TOPIC_NAME_BYTES_MAX};
use cairn_storage::{FlushPolicy, LogConfig, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Broker-wide defaults for topic configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    /// Partitions of a topic created without a count (Kafka `num.partitions`).
    pub partitions: u32,
    /// `retention.ms`; -1 keeps everything.
    pub retention_ms: i64,
    /// `retention.bytes` per partition; -1 keeps everything.
    pub retention_bytes: i64,
    /// `segment.bytes`.
    pub segment_bytes: u32,
    /// `segment.ms`.
    pub segment_ms: u64,
    /// `max.message.bytes`: the largest batch.
    pub max_message_bytes: u32,
    /// `flush.ms`: sync at least this often; -1 leaves it to the OS (acks=all still syncs).
    pub flush_ms: i64,
    /// Memory of a compaction pass's key map (Kafka `log.cleaner.dedupe.buffer.size`; passes
    /// run one at a time): about 2 million keys per 128 MiB; more keys take several passes.
    pub compaction_key_map_bytes: u64,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            partitions: 1,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            segment_bytes: 128 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            max_message_bytes: 1024 * 1024 + 12,
            flush_ms: -1,
            compaction_key_map_bytes: 128 << 20,
        }
    }
}

/// `delete.retention.ms` by default: one day, as Kafka.
pub const TOMBSTONE_RETENTION_MS_DEFAULT: i64 = 24 * 3600 * 1000;

/// `min.cleanable.dirty.ratio` by default, as Kafka.
pub const MIN_CLEANABLE_DIRTY_RATIO_DEFAULT: f64 = 0.5;

/// Most partitions one topic may have.
pub const PARTITIONS_PER_TOPIC_MAX: u32 = 10_000;

impl TopicDefaults {
    /// Checks the defaults by resolving an override-free topic config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = cairn_protocol::limits::check_limit;
        range(
            "topic_defaults.partitions",
            self.partitions.into(),
            1,
            PARTITIONS_PER_TOPIC_MAX.into(),
        )?;
        range(
            "topic_defaults.segment_bytes",
            self.segment_bytes.into(),
            SEGMENT_BYTES_MIN.into(),
            SEGMENT_BYTES_MAX.into(),
        )?;
        range(
            "topic_defaults.segment_ms",
            self.segment_ms,
            1,
            u64::MAX >> 2,
        )?;
        range(
            "topic_defaults.compaction_key_map_bytes",
            self.compaction_key_map_bytes,
            1 << 20,
            1 << 40,
        )?;
        range(
            "topic_defaults.max_message_bytes",
            self.max_message_bytes.into(),
            cairn_protocol::batch::BATCH_HEADER_BYTES as u64,
            BATCH_BYTES_MAX.into(),
        )?;
        Ok(())
    }
}

/// The config keys a topic accepts, as Kafka spells them.
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "delete.retention.ms",
    "flush.messages",
    "flush.ms",
    "max.message.bytes",
    "min.cleanable.dirty.ratio",
    "min.insync.replicas",
    "replication.durability",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
    "segment.ms",
    "unclean.leader.election.enable",
];

/// `min.insync.replicas` of a topic without the override: two copies where there are two
/// (Kafka's default is one, which lets acks=all be acknowledged by a lone leader).
pub fn min_insync_replicas_default(replication_factor: usize) -> usize {
    replication_factor.clamp(1, 2)
}

/// Whether `name` is a legal topic name: 1..=249 bytes of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!("topic names are 1 to {TOPIC_NAME_BYTES_MAX} bytes"));
    }
    if name == "." || name == ".." {
        return Err("'.' and '..' are not topic names".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {bad:?} is not allowed: use [a-zA-Z0-9._-]"
        ));
    }
    Ok(())
}

/// A topic's config: the overrides it was given, resolved against the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Overrides, as given.
    pub overrides: BTreeMap<String, String>,
}

impl TopicConfig {
    /// Checks `overrides` (keys and values) and keeps them.
    pub fn new(
        overrides: BTreeMap<String, String>,
        defaults: &TopicDefaults,
    ) -> Result<TopicConfig, String> {
        let config = TopicConfig { overrides };
        config.resolve(defaults)?;
        Ok(config)
    }

    /// `min.insync.replicas`: how many in-sync replicas an acks=all produce needs.
    pub fn min_insync_replicas(&self, replication_factor: usize) -> usize {
        self.overrides
            .get("min.insync.replicas")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| min_insync_replicas_default(replication_factor))
    }

    /// `replication.durability` (Cairn's own key): `fsync`, the default, counts each replica's
    /// fsynced offset for the high watermark (an acknowledged acks=all record survives a power
    /// loss of every replica); `memory` counts its log end, as Kafka does.
    pub fn durability(&self) -> cairn_replication::Durability {
        match self
            .overrides
            .get("replication.durability")
            .map(|v| v.trim())
        {
            Some("memory") => cairn_replication::Durability::InMemory,
            _ => cairn_replication::Durability::Flushed,
        }
    }

    /// Every key with its effective value and whether it is the default, for a topic with
    /// `replication_factor` replicas per partition.
    pub fn describe(
        &self,
        defaults: &TopicDefaults,
        replication_factor: usize,
    ) -> Vec<(String, String, bool)> {
        let default_of = |key: &str| -> String {
            match key {
                "cleanup.policy" => "delete".into(),
                "delete.retention.ms" => TOMBSTONE_RETENTION_MS_DEFAULT.to_string(),
                "min.cleanable.dirty.ratio" => MIN_CLEANABLE_DIRTY_RATIO_DEFAULT.to_string(),
                "flush.messages" => i64::MAX.to_string(),
                "flush.ms" => defaults.flush_ms.to_string(),
                "max.message.bytes" => defaults.max_message_bytes.to_string(),
                "retention.bytes" => defaults.retention_bytes.to_string(),
                "retention.ms" => defaults.retention_ms.to_string(),
                "segment.bytes" => defaults.segment_bytes.to_string(),
                "segment.ms" => defaults.segment_ms.to_string(),
                "min.insync.replicas" => {
                    min_insync_replicas_default(replication_factor).to_string()
                }
                "replication.durability" => "fsync".into(),
                "unclean.leader.election.enable" => "false".into(),
                _ => String::new(),
            }
        };
        TOPIC_CONFIG_KEYS
            .iter()
            .map(|key| match self.overrides.get(*key) {
                Some(value) => (key.to_string(), value.clone(), false),
                None => (key.to_string(), default_of(key), true),
            })
            .collect()
    }

    /// The storage config this topic's partitions use.
    pub fn resolve(&self, defaults: &TopicDefaults) -> Result<LogConfig, String> {
        for key in self.overrides.keys() {
            if !TOPIC_CONFIG_KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "unknown topic config {key:?}; known: {}",
                    TOPIC_CONFIG_KEYS.join(", ")
                ));
            }
        }
        let int = |key: &str, default: i64, min: i64, max: i64| -> Result<i64, String> {
            let Some(text) = self.overrides.get(key) else {
                return Ok(default);
            };
            let value: i64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{key} must be an integer, not {text:?}"))?;
            if !(min..=max).contains(&value) {
                return Err(format!("{key} = {value} is outside {min}..={max}"));
            }
            Ok(value)
        };
        let (compact, delete) = match self
            .overrides
            .get("cleanup.policy")
            .map(|p| p.replace(' ', ""))
            .as_deref()
        {
            None | Some("delete") => (false, true),
            Some("compact") => (true, false),
            Some("compact,delete" | "delete,compact") => (true, true),
            Some(other) => {
                return Err(format!(
                    "cleanup.policy {other:?} is not one of delete, compact, compact,delete"
                ));
            }
        };
        let tombstone_ms = int(
            "delete.retention.ms",
            TOMBSTONE_RETENTION_MS_DEFAULT,
            0,
            i64::MAX,
        )?;
        let dirty_ratio = match self.overrides.get("min.cleanable.dirty.ratio") {
            None => MIN_CLEANABLE_DIRTY_RATIO_DEFAULT,
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("min.cleanable.dirty.ratio {text:?} is not a number from 0 to 1")
                })?,
        };
        // Retention deletes segments only under the delete policy.
        let (retention_ms, retention_bytes) = if delete {
            (
                int("retention.ms", defaults.retention_ms, -1, i64::MAX)?,
                int("retention.bytes", defaults.retention_bytes, -1, i64::MAX)?,
            )
        } else {
            (-1, -1)
        };
        let segment_bytes = int(
            "segment.bytes",
            defaults.segment_bytes.into(),
            SEGMENT_BYTES_MIN.into(),
            SEGMENT_BYTES_MAX.into(),
        )?;
        let segment_ms = int("segment.ms", defaults.segment_ms as i64, 1, i64::MAX)?;
        let max_message_bytes = int(
            "max.message.bytes",
            defaults.max_message_bytes.into(),
            cairn_protocol::batch::BATCH_HEADER_BYTES as i64,
            BATCH_BYTES_MAX.into(),
        )?;
        int("min.insync.replicas", 1, 1, i64::from(i16::MAX))?;
        if let Some(unclean) = self.overrides.get("unclean.leader.election.enable")
            && !matches!(
                unclean.trim().to_ascii_lowercase().as_str(),
                "true" | "false"
            )
        {
            return Err(format!(
                "unclean.leader.election.enable {unclean:?} is not true or false"
            ));
        }
        if let Some(durability) = self.overrides.get("replication.durability")
            && !matches!(durability.trim(), "fsync" | "memory")
        {
            return Err(format!(
                "replication.durability {durability:?} is not one of fsync, memory"
            ));
        }
        let flush_ms = int("flush.ms", defaults.flush_ms, -1, i64::MAX)?;
        let flush_messages = int("flush.messages", i64::MAX, 1, i64::MAX)?;
        if flush_messages != 1 && flush_messages != i64::MAX {
            return Err("flush.messages supports 1 (sync every append) or unset".into());
        }
        let flush = if flush_messages == 1 {
            FlushPolicy::EveryAppend
        } else if flush_ms >= 0 {
            FlushPolicy::Interval(Duration::from_millis(flush_ms as u64))
        } else {
            FlushPolicy::Os
        };
        Ok(LogConfig {
            segment_bytes: segment_bytes as u32,
            segment_age: Some(Duration::from_millis(segment_ms as u64)),
            batch_bytes_max: max_message_bytes as u32,
            retention_bytes: u64::try_from(retention_bytes).ok(),
            retention_age: u64::try_from(retention_ms).ok().map(Duration::from_millis),
            flush,
            compacted: compact,
            tombstone_retention: Duration::from_millis(tombstone_ms as u64),
            min_cleanable_dirty_ratio: dirty_ratio,
            compaction_key_map_bytes: usize::try_from(defaults.compaction_key_map_bytes)
                .unwrap_or(usize::MAX),
            ..LogConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_topic_name("orders.v1_eu-west").is_ok());
        for bad in ["", ".", "..", "a/b", "ü", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn configs_resolve_and_reject() {
        let defaults = TopicDefaults::default();
        let mut overrides = BTreeMap::new();
        overrides.insert("retention.ms".to_string(), "60000".to_string());
        overrides.insert("flush.messages".to_string(), "1".to_string());
        let config = TopicConfig::new(overrides, &defaults).unwrap();
        let log = config.resolve(&defaults).unwrap();
        assert_eq!(log.retention_age, Some(Duration::from_secs(60)));
        assert_eq!(log.flush, FlushPolicy::EveryAppend);
        let described = config.describe(&defaults, 3);
        assert!(described.contains(&("min.insync.replicas".into(), "2".into(), true)));
        assert_eq!(config.min_insync_replicas(1), 1);
        assert_eq!(config.min_insync_replicas(5), 2);
        let overrides = BTreeMap::from([("min.insync.replicas".to_string(), "3".to_string())]);
        let safety = TopicConfig::new(overrides, &defaults).unwrap();
        assert_eq!(safety.min_insync_replicas(5), 3);
        assert!(described.contains(&("retention.ms".into(), "60000".into(), false)));
        assert!(described.contains(&("cleanup.policy".into(), "delete".into(), true)));
        let ratio = BTreeMap::from([("min.cleanable.dirty.ratio".to_string(), "0.1".to_string())]);
        let log = TopicConfig::new(ratio, &defaults)
            .unwrap()
            .resolve(&defaults)
            .unwrap();
        assert_eq!(log.min_cleanable_dirty_ratio, 0.1);
        for (policy, compacted, retained) in [
            ("compact", true, false),
            ("compact,delete", true, true),
            ("delete", false, true),
        ] {
            let overrides = BTreeMap::from([
                ("cleanup.policy".to_string(), policy.to_string()),
                ("retention.ms".to_string(), "1000".to_string()),
            ]);
            let log = TopicConfig::new(overrides, &defaults)
                .unwrap()
                .resolve(&defaults)
                .unwrap();
            assert_eq!(log.compacted, compacted, "{policy}");
            assert_eq!(log.retention_age.is_some(), retained, "{policy}");
        }
        for (key, value) in [
            ("nope", "1"),
            ("segment.bytes", "10"),
            ("retention.ms", "soon"),
            ("min.insync.replicas", "0"),
            ("cleanup.policy", "compacted"),
            ("delete.retention.ms", "-5"),
            ("min.cleanable.dirty.ratio", "1.5"),
            ("min.cleanable.dirty.ratio", "NaN"),
        ] {
            let overrides = BTreeMap::from([(key.to_string(), value.to_string())]);
            assert!(
                TopicConfig::new(overrides, &defaults).is_err(),
                "{key}={value}"
            );
        }
    }
}
