//! Committed consumer-group offsets, kept durably in the internal compacted topic
//! `__consumer_offsets` (created, through the controller, at a group's first FindCoordinator)
//! and cached in memory. A group's coordinator is the broker that leads its partition of the
//! topic; each broker loads the partitions it opens.
//!
//! Record formats (Cairn's own, versioned by the key's first field; a reader skips versions it
//! does not know; strings are `u16 len, UTF-8`, byte strings `u32 len, bytes`):
//! - A committed offset, one record per group, topic and partition:
//!   key `u16 1 | group | topic | u32 partition`,
//!   value `u16 1 | i64 offset | i32 leader epoch | i64 commit time ms | metadata`.
//! - A group's membership (as Kafka's GroupMetadata record), written when a rebalance completes
//!   (before its members get their assignments), so that a coordinator that takes the group over
//!   serves the same generation without a rebalance:
//!   key `u16 2 | group`,
//!   value `u16 1 | protocol type | i32 generation | protocol | leader | u32 n, n x (member id |
//!   u8 has instance id, [instance id] | client id | u32 session ms | u32 rebalance ms |
//!   subscription bytes | assignment bytes)`; a tombstone when the group empties.
//!
//! A null value (tombstone) forgets the entry.
//!
//! The group's partition of the topic is `murmur2(group) % partitions`, so one group's commits are
//! ordered in one log. A commit is answered only after its batch is durable (as with acks=all);
//! the cache keeps, per entry, the log offset it came from and never goes back to an older one, so
//! concurrent commits settle on the one appended last.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cairn_protocol::Offset;
use cairn_protocol::batch::{BatchBuilder, Batches, Compression};
use cairn_protocol::native::ErrorCode;

use crate::error::BrokerError;
use crate::manager::TopicManager;
use crate::partition::Partition;

/// The internal topic's name, as Kafka's.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
const KEY_VERSION: u16 = 1;
const VALUE_VERSION: u16 = 1;
/// The key version of a group's membership record.
const GROUP_KEY_VERSION: u16 = 2;
const GROUP_VALUE_VERSION: u16 = 1;

/// (group, topic, partition).
pub type OffsetKey = (String, String, u32);

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The next offset to consume.
    pub offset: i64,
    /// The leader epoch of the record before it, or -1.
    pub leader_epoch: i32,
    /// The client's metadata string.
    pub metadata: String,
    /// When it was committed, Unix ms.
    pub commit_ms: i64,
    /// The `__consumer_offsets` offset it was read from or written at.
    log_offset: u64,
}

/// A group's membership as stored: the generation its rebalance completed, with every member's
/// subscription (for the chosen protocol) and assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredGroup {
    /// "consumer" for consumer groups.
    pub protocol_type: String,
    /// The generation.
    pub generation: i32,
    /// The chosen assignor.
    pub protocol: String,
    /// The leader's member id.
    pub leader: String,
    /// The members, by member id.
    pub members: Vec<StoredMember>,
}

/// One member of a [`StoredGroup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMember {
    /// Its member id.
    pub id: String,
    /// Its static instance id (KIP-345).
    pub instance_id: Option<String>,
    /// Its client id.
    pub client_id: String,
    /// Its session timeout, ms.
    pub session_ms: u32,
    /// Its rebalance timeout, ms.
    pub rebalance_ms: u32,
    /// Its subscription metadata for the chosen protocol.
    pub subscription: Bytes,
    /// Its assignment.
    pub assignment: Bytes,
}

/// What a record's key names.
enum Key {
    /// A committed offset.
    Offset(OffsetKey),
    /// A group's membership.
    Group(String),
}

/// Group memberships read from a partition's log: the last record of each group (`None`: a
/// tombstone).
pub type StoredGroups = HashMap<String, Option<StoredGroup>>;

/// A group record's outcome: (group, the record, whether it is durable).
pub type GroupStored = (String, Option<StoredGroup>, Result<(), (ErrorCode, String)>);

type Cache = HashMap<String, BTreeMap<(String, u32), Committed>>;

/// Loads what one partition of `__consumer_offsets` holds into `cache`, and its group
/// memberships into `groups` if given (blocking).
fn load_into(cache: &mut Cache, mut groups: Option<&mut StoredGroups>, partition: &Partition) {
    let log = partition.log();
    let mut n = 0usize;
    let mut at = log.log_start_offset();
    let end = log.log_end_offset();
    while at < end {
        let Ok(fetched) = log.read(at, 8 << 20) else {
            break;
        };
        if fetched.bytes.is_empty() {
            break;
        }
        for batch in Batches::new(fetched.bytes, u32::MAX) {
            let Ok(batch) = batch else { break };
            at = Offset(batch.header().last_offset().max(0) as u64 + 1);
            let Ok(records) = batch.records(cairn_protocol::limits::DECOMPRESSED_BYTES_MAX) else {
                continue;
            };
            for record in records {
                match record.key.and_then(decode_any_key) {
                    Some(Key::Offset(key)) => {
                        let log_offset = record.offset.max(0) as u64;
                        match record.value.and_then(|v| decode_value(v, log_offset)) {
                            Some(committed) => cache_insert(cache, key, committed),
                            None => cache_remove(cache, &key),
                        }
                    }
                    Some(Key::Group(group)) => {
                        if let Some(groups) = groups.as_deref_mut() {
                            groups.insert(group, record.value.and_then(decode_group));
                        }
                    }
                    None => continue,
                }
                n += 1;
            }
        }
    }
    tracing::info!(
        partition = partition.index(),
        records = n,
        groups = cache.len(),
        "committed offsets loaded"
    );
}

fn cache_insert(cache: &mut Cache, key: OffsetKey, committed: Committed) {
    let (group, topic, partition) = key;
    cache
        .entry(group)
        .or_default()
        .insert((topic, partition), committed);
}

fn cache_remove(cache: &mut Cache, key: &OffsetKey) {
    if let Some(entries) = cache.get_mut(&key.0) {
        entries.remove(&(key.1.clone(), key.2));
        if entries.is_empty() {
            cache.remove(&key.0);
        }
    }
}

/// The offset store.
#[derive(Debug)]
pub struct OffsetStore {
    partitions: u32,
    /// Per group, per (topic, partition).
    cache: RwLock<Cache>,
    /// The offsets partitions this broker leads whose groups are loaded: index -> the leader
    /// epoch they were loaded at. A leader not (yet) in here is still loading.
    loaded: std::sync::Mutex<HashMap<u32, u32>>,
}

fn put_str(out: &mut BytesMut, text: &str) {
    let bytes = text.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.put_u16(len as u16);
    out.put_slice(bytes.get(..len).unwrap_or_default());
}

fn get_str(buf: &mut Bytes) -> Option<String> {
    if buf.remaining() < 2 {
        return None;
    }
    let len = buf.get_u16() as usize;
    if buf.remaining() < len {
        return None;
    }
    String::from_utf8(buf.split_to(len).to_vec()).ok()
}

fn encode_key(key: &OffsetKey) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u16(KEY_VERSION);
    put_str(&mut out, &key.0);
    put_str(&mut out, &key.1);
    out.put_u32(key.2);
    out.freeze()
}

fn decode_any_key(mut buf: Bytes) -> Option<Key> {
    if buf.remaining() < 2 {
        return None;
    }
    match buf.get_u16() {
        KEY_VERSION => {
            let group = get_str(&mut buf)?;
            let topic = get_str(&mut buf)?;
            if buf.remaining() < 4 {
                return None;
            }
            Some(Key::Offset((group, topic, buf.get_u32())))
        }
        GROUP_KEY_VERSION => Some(Key::Group(get_str(&mut buf)?)),
        _ => None,
    }
}

#[cfg(test)]
fn decode_key(buf: Bytes) -> Option<OffsetKey> {
    match decode_any_key(buf)? {
        Key::Offset(key) => Some(key),
        Key::Group(_) => None,
    }
}

fn encode_group_key(group: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u16(GROUP_KEY_VERSION);
    put_str(&mut out, group);
    out.freeze()
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn get_bytes(buf: &mut Bytes) -> Option<Bytes> {
    if buf.remaining() < 4 {
        return None;
    }
    let len = buf.get_u32() as usize;
    (buf.remaining() >= len).then(|| buf.split_to(len))
}

fn get_u32(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32())
}

fn encode_group(group: &StoredGroup) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u16(GROUP_VALUE_VERSION);
    put_str(&mut out, &group.protocol_type);
    out.put_i32(group.generation);
    put_str(&mut out, &group.protocol);
    put_str(&mut out, &group.leader);
    out.put_u32(group.members.len() as u32);
    for m in &group.members {
        put_str(&mut out, &m.id);
        match &m.instance_id {
            Some(id) => {
                out.put_u8(1);
                put_str(&mut out, id);
            }
            None => out.put_u8(0),
        }
        put_str(&mut out, &m.client_id);
        out.put_u32(m.session_ms);
        out.put_u32(m.rebalance_ms);
        put_bytes(&mut out, &m.subscription);
        put_bytes(&mut out, &m.assignment);
    }
    out.freeze()
}

/// The smallest encoded member: empty strings and byte strings, no instance id.
const STORED_MEMBER_BYTES_MIN: usize = 2 + 1 + 2 + 4 + 4 + 4 + 4;

fn decode_group(mut buf: Bytes) -> Option<StoredGroup> {
    if buf.remaining() < 2 || buf.get_u16() != GROUP_VALUE_VERSION {
        return None;
    }
    let protocol_type = get_str(&mut buf)?;
    let generation = get_u32(&mut buf)? as i32;
    let protocol = get_str(&mut buf)?;
    let leader = get_str(&mut buf)?;
    let n = get_u32(&mut buf)? as usize;
    // Bounded by what the record holds before anything is allocated for it.
    if n > buf.remaining() / STORED_MEMBER_BYTES_MIN {
        return None;
    }
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        let id = get_str(&mut buf)?;
        if buf.remaining() < 1 {
            return None;
        }
        let instance_id = match buf.get_u8() {
            0 => None,
            1 => Some(get_str(&mut buf)?),
            _ => return None,
        };
        members.push(StoredMember {
            id,
            instance_id,
            client_id: get_str(&mut buf)?,
            session_ms: get_u32(&mut buf)?,
            rebalance_ms: get_u32(&mut buf)?,
            subscription: get_bytes(&mut buf)?,
            assignment: get_bytes(&mut buf)?,
        });
    }
    Some(StoredGroup {
        protocol_type,
        generation,
        protocol,
        leader,
        members,
    })
}

fn encode_value(c: &Committed) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u16(VALUE_VERSION);
    out.put_i64(c.offset);
    out.put_i32(c.leader_epoch);
    out.put_i64(c.commit_ms);
    put_str(&mut out, &c.metadata);
    out.freeze()
}

fn decode_value(mut buf: Bytes, log_offset: u64) -> Option<Committed> {
    if buf.remaining() < 2 + 8 + 4 + 8 || buf.get_u16() != VALUE_VERSION {
        return None;
    }
    let offset = buf.get_i64();
    let leader_epoch = buf.get_i32();
    let commit_ms = buf.get_i64();
    let metadata = get_str(&mut buf)?;
    Some(Committed {
        offset,
        leader_epoch,
        metadata,
        commit_ms,
        log_offset,
    })
}

impl OffsetStore {
    /// An empty store; [`OffsetStore::load`] fills it as the broker opens the topic's
    /// partitions.
    pub fn new(partitions: u32) -> OffsetStore {
        OffsetStore {
            partitions,
            cache: RwLock::new(HashMap::new()),
            loaded: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The partitions the offsets topic is created with (`offsets_topic_partitions`).
    pub fn n_partitions(&self) -> u32 {
        self.partitions
    }

    /// Loads what one partition of `__consumer_offsets` holds (blocking).
    pub fn load(&self, partition: &Partition) {
        let mut cache = self.write();
        load_into(&mut cache, None, partition);
    }

    /// Replaces the cached offsets of every group of this partition of `__consumer_offsets` by
    /// what its log holds (blocking): when this broker becomes the partition's leader (its
    /// groups' coordinator), its cache may lack commits it copied as a follower. Returns the
    /// memberships stored there, for the coordinator to take over; the caller marks the
    /// partition loaded ([`OffsetStore::set_loaded`]) once it has.
    pub fn reload(&self, partition: &Partition, n_partitions: u32) -> Vec<(String, StoredGroup)> {
        let mut cache = self.write();
        cache.retain(|group, _| {
            cairn_protocol::partitioner::partition_for_key(group.as_bytes(), n_partitions)
                != partition.index()
        });
        let mut groups = StoredGroups::new();
        load_into(&mut cache, Some(&mut groups), partition);
        let mut live: Vec<(String, StoredGroup)> = groups
            .into_iter()
            .filter_map(|(name, group)| Some((name, group?)))
            .collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        live
    }

    fn loaded_map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u32>> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the groups of offsets partition `index` are loaded at leader `epoch`
    /// (`None`: this broker no longer leads it).
    pub fn set_loaded(&self, index: u32, epoch: Option<u32>) {
        let mut loaded = self.loaded_map();
        match epoch {
            Some(epoch) => loaded.insert(index, epoch),
            None => loaded.remove(&index),
        };
    }

    /// The leader epoch at which offsets partition `index`'s groups were loaded here, if they
    /// are.
    pub fn loaded_epoch(&self, index: u32) -> Option<u32> {
        self.loaded_map().get(&index).copied()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The partition of the offsets topic that holds `group`'s commits, if the topic exists:
    /// `murmur2(group) % partitions`, as Kafka (its leader is the group's coordinator).
    pub fn partition_of(manager: &TopicManager, group: &str) -> Option<(u32, u32)> {
        let image = manager.image();
        let topic = image.topic(OFFSETS_TOPIC)?;
        let n = topic.partitions.len() as u32;
        let index = cairn_protocol::partitioner::partition_for_key(group.as_bytes(), n);
        Some((index, n))
    }

    /// The index of `group`'s partition of the offsets topic, or why there is none yet.
    fn index_of(manager: &TopicManager, group: &str) -> Result<u32, (ErrorCode, String)> {
        OffsetStore::partition_of(manager, group)
            .map(|(index, _)| index)
            .ok_or((
                ErrorCode::COORDINATOR_NOT_AVAILABLE,
                "the offsets topic does not exist yet: FindCoordinator creates it".to_string(),
            ))
    }

    /// Appends `builder`'s records to partition `index` of the offsets topic and syncs them
    /// (blocking); returns where they went.
    fn append_durably(
        &self,
        manager: &TopicManager,
        index: u32,
        builder: BatchBuilder,
    ) -> Result<crate::partition::Appended, (ErrorCode, String)> {
        let not_coordinator = |why: String| (ErrorCode::NOT_COORDINATOR, why);
        let topic = manager.topic(OFFSETS_TOPIC).ok_or((
            ErrorCode::COORDINATOR_NOT_AVAILABLE,
            "the offsets topic is not open here yet".to_string(),
        ))?;
        let partition = topic
            .partition(index, manager.host().node_id)
            .map_err(|e| not_coordinator(e.to_string()))?;
        let mut batch = builder
            .build()
            .map_err(|e| (ErrorCode::UNKNOWN_SERVER_ERROR, e.to_string()))?
            .to_vec();
        let refused = |e: BrokerError| match e {
            BrokerError::NotLeaderOrFollower { .. } => not_coordinator(e.to_string()),
            e => (e.code(), e.to_string()),
        };
        let appended = partition
            .append_as_leader(&mut batch, true)
            .map_err(refused)?
            .ok_or((
                ErrorCode::UNKNOWN_SERVER_ERROR,
                "a blocking append did nothing".to_string(),
            ))?;
        let end = Offset(appended.last.0 + 1);
        if topic.replication_factor > 1 {
            // Committed like an acks=all write: once every in-sync replica holds it.
            let min_insync = topic.config.min_insync_replicas(topic.replication_factor);
            let committed = partition.wait_committed(end, appended.leader_epoch, min_insync);
            let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                (
                    ErrorCode::UNKNOWN_SERVER_ERROR,
                    "no runtime to wait for replication".to_string(),
                )
            })?;
            handle
                .block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(10), committed).await
                })
                .map_err(|_| {
                    (
                        ErrorCode::REQUEST_TIMED_OUT,
                        "the commit was not replicated within 10 s".to_string(),
                    )
                })?
                .map_err(refused)?;
        } else {
            partition.flush_blocking(end).map_err(refused)?;
        }
        Ok(appended)
    }

    /// Commits offsets for `group` durably (blocking): one batch in the group's partition of
    /// the offsets topic, synced before this returns.
    pub fn commit(
        &self,
        manager: &TopicManager,
        group: &str,
        entries: Vec<((String, u32), i64, i32, String)>,
        now_ms: i64,
    ) -> Result<(), (ErrorCode, String)> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut builder = BatchBuilder::new(Compression::None);
        let mut pending = Vec::with_capacity(entries.len());
        for ((topic_name, p), offset, leader_epoch, metadata) in entries {
            let key = (group.to_string(), topic_name, p);
            let committed = Committed {
                offset,
                leader_epoch,
                metadata,
                commit_ms: now_ms,
                log_offset: 0,
            };
            builder.push(
                now_ms,
                Some(&encode_key(&key)),
                Some(&encode_value(&committed)),
                &[],
            );
            pending.push((key, committed));
        }
        let info = self.append_durably(manager, OffsetStore::index_of(manager, group)?, builder)?;
        let mut cache = self.write();
        for (i, (key, mut committed)) in pending.into_iter().enumerate() {
            committed.log_offset = info.base.0 + i as u64;
            let newer = cache
                .get(&key.0)
                .and_then(|entries| entries.get(&(key.1.clone(), key.2)))
                .is_none_or(|old| old.log_offset < committed.log_offset);
            if newer {
                cache_insert(&mut cache, key, committed);
            }
        }
        Ok(())
    }

    /// Forgets every offset of `group` (blocking): tombstones in its partition of the offsets
    /// topic, synced, then the cache. Returns whether the group had any.
    pub fn delete_group(
        &self,
        manager: &TopicManager,
        group: &str,
        now_ms: i64,
    ) -> Result<bool, (ErrorCode, String)> {
        let keys: Vec<OffsetKey> = self.read().get(group).map_or_else(Vec::new, |entries| {
            entries
                .keys()
                .map(|(t, p)| (group.to_string(), t.clone(), *p))
                .collect()
        });
        if keys.is_empty() {
            return Ok(false);
        }
        let mut builder = BatchBuilder::new(Compression::None);
        for key in &keys {
            builder.push(now_ms, Some(&encode_key(key)), None, &[]);
        }
        let info = self.append_durably(manager, OffsetStore::index_of(manager, group)?, builder)?;
        let mut cache = self.write();
        for key in keys {
            // A commit appended after the tombstones stays.
            let older = cache
                .get(&key.0)
                .and_then(|entries| entries.get(&(key.1.clone(), key.2)))
                .is_some_and(|c| c.log_offset < info.base.0);
            if older {
                cache_remove(&mut cache, &key);
            }
        }
        Ok(true)
    }

    /// Writes group memberships (`None`: a tombstone) durably (blocking): one batch per offsets
    /// partition. Returns each group's outcome, in no particular order.
    pub fn store_groups(
        &self,
        manager: &TopicManager,
        records: Vec<(String, Option<StoredGroup>)>,
        now_ms: i64,
    ) -> Vec<GroupStored> {
        let mut by_partition: BTreeMap<u32, Vec<(String, Option<StoredGroup>)>> = BTreeMap::new();
        let mut outcomes = Vec::with_capacity(records.len());
        for (group, record) in records {
            match OffsetStore::index_of(manager, &group) {
                Ok(index) => by_partition.entry(index).or_default().push((group, record)),
                Err(e) => outcomes.push((group, record, Err(e))),
            }
        }
        for (index, records) in by_partition {
            let mut builder = BatchBuilder::new(Compression::None);
            for (group, record) in &records {
                let value = record.as_ref().map(encode_group);
                builder.push(
                    now_ms,
                    Some(&encode_group_key(group)),
                    value.as_deref(),
                    &[],
                );
            }
            let appended = self.append_durably(manager, index, builder).map(|_| ());
            outcomes.extend(
                records
                    .into_iter()
                    .map(|(group, record)| (group, record, appended.clone())),
            );
        }
        outcomes
    }

    /// The committed offset of one partition.
    pub fn fetch(&self, group: &str, topic: &str, partition: u32) -> Option<Committed> {
        self.read()
            .get(group)?
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    /// Whether `group` has committed offsets.
    pub fn has_group(&self, group: &str) -> bool {
        self.read().contains_key(group)
    }

    /// Every group with committed offsets.
    pub fn groups(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// Every (topic, partition) the group committed, with its offset, in order.
    pub fn fetch_all(&self, group: &str) -> Vec<((String, u32), Committed)> {
        self.read().get(group).map_or_else(Vec::new, |entries| {
            entries
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_ignored() {
        let key = ("g".to_string(), "orders".to_string(), 7);
        assert_eq!(decode_key(encode_key(&key)), Some(key));
        let committed = Committed {
            offset: 42,
            leader_epoch: 3,
            metadata: "m".into(),
            commit_ms: 99,
            log_offset: 5,
        };
        assert_eq!(decode_value(encode_value(&committed), 5), Some(committed));
        assert_eq!(decode_key(Bytes::from_static(&[0, 1, 0, 200, 1])), None);
        assert_eq!(decode_value(Bytes::from_static(&[0, 1, 0]), 0), None);
    }

    #[test]
    fn group_records_round_trip_and_truncations_are_refused() {
        let group = StoredGroup {
            protocol_type: "consumer".into(),
            generation: 7,
            protocol: "range".into(),
            leader: "a-1".into(),
            members: vec![
                StoredMember {
                    id: "a-1".into(),
                    instance_id: None,
                    client_id: "a".into(),
                    session_ms: 45_000,
                    rebalance_ms: 300_000,
                    subscription: Bytes::from_static(b"sub-a"),
                    assignment: Bytes::from_static(b"asg-a"),
                },
                StoredMember {
                    id: "b-2".into(),
                    instance_id: Some("static-b".into()),
                    client_id: "b".into(),
                    session_ms: 10_000,
                    rebalance_ms: 10_000,
                    subscription: Bytes::new(),
                    assignment: Bytes::from_static(b"asg-b"),
                },
            ],
        };
        let value = encode_group(&group);
        assert_eq!(decode_group(value.clone()), Some(group));
        // Every truncation is refused, none panics.
        for len in 0..value.len() {
            assert_eq!(decode_group(value.slice(..len)), None, "truncated to {len}");
        }
        // A member count beyond what the record holds allocates nothing.
        let mut huge = BytesMut::from(&value[..]);
        let at = 2 + 2 + 8 + 4 + 2 + 5 + 2 + 3;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_group(huge.freeze()), None);
        match decode_any_key(encode_group_key("g")) {
            Some(Key::Group(name)) => assert_eq!(name, "g"),
            _ => panic!("a group key is read back as one"),
        }
        assert_eq!(decode_key(encode_group_key("g")), None);
    }
}
