//! Partition assignment, computed by the group's leader: the assignors (`range`, `roundrobin`,
//! `cooperative-sticky`) and the subscription and assignment bytes members exchange through the
//! coordinator, in Kafka's consumer-protocol layout (version 1) so the same bytes mean the same
//! thing to Kafka clients.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes};

use crate::error::ClientError;

/// A topic and a partition.
pub type TopicPartition = (String, u32);

/// A partition assignment strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignor {
    /// Per topic, consecutive ranges of partitions to members in member-id order (Kafka's
    /// default): members subscribed to the same topics get the same partition numbers of each.
    Range,
    /// Every partition of every topic dealt in turn to the members subscribed to its topic.
    RoundRobin,
    /// Balanced, keeps each member's partitions where it can, and rebalances incrementally:
    /// members give up only the partitions that move and keep consuming the others.
    CooperativeSticky,
}

impl Assignor {
    /// The protocol name on the wire (Kafka's names).
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        }
    }

    /// The assignor with this wire name.
    pub fn from_name(name: &str) -> Option<Assignor> {
        [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    /// Whether members keep the partitions they still own through a rebalance.
    pub fn is_cooperative(self) -> bool {
        self == Assignor::CooperativeSticky
    }

    /// Assigns the partitions of `topics` (name -> partition count) to `members` (member id ->
    /// subscription). Every partition of a subscribed topic goes to exactly one member
    /// subscribed to it, except, for the cooperative assignor, a partition still owned by
    /// another member: it is left out until that member gave it up and rejoined.
    pub fn assign(
        self,
        members: &BTreeMap<String, Subscription>,
        topics: &BTreeMap<String, u32>,
    ) -> BTreeMap<String, BTreeSet<TopicPartition>> {
        let mut out: BTreeMap<String, BTreeSet<TopicPartition>> = members
            .keys()
            .map(|id| (id.clone(), BTreeSet::new()))
            .collect();
        let subscribers = |topic: &str| -> Vec<&String> {
            members
                .iter()
                .filter(|(_, s)| s.topics.iter().any(|t| t == topic))
                .map(|(id, _)| id)
                .collect()
        };
        match self {
            Assignor::Range => {
                for (topic, &count) in topics {
                    let ids = subscribers(topic);
                    if ids.is_empty() {
                        continue;
                    }
                    let (per, extra) = (count / ids.len() as u32, count % ids.len() as u32);
                    let mut next = 0;
                    for (i, id) in ids.into_iter().enumerate() {
                        let n = per + u32::from((i as u32) < extra);
                        if let Some(set) = out.get_mut(id) {
                            set.extend((next..next + n).map(|p| (topic.clone(), p)));
                        }
                        next += n;
                    }
                }
            }
            Assignor::RoundRobin => {
                let ids: Vec<&String> = members.keys().collect();
                let mut turn = 0usize;
                for (topic, &count) in topics {
                    let subscribed = subscribers(topic);
                    if subscribed.is_empty() {
                        continue;
                    }
                    let n = ids.len();
                    for p in 0..count {
                        // The next member in the circle subscribed to this topic.
                        let next = (0..n).find_map(|k| {
                            let i = (turn + k) % n;
                            ids.get(i)
                                .filter(|id| subscribed.contains(id))
                                .map(|id| (i, *id))
                        });
                        if let Some((i, id)) = next {
                            if let Some(set) = out.get_mut(id) {
                                set.insert((topic.clone(), p));
                            }
                            turn = i + 1;
                        }
                    }
                }
            }
            Assignor::CooperativeSticky => sticky(members, topics, &mut out),
        }
        out
    }
}

/// The sticky assignment: owned partitions stay; free ones go to the eligible member with the
/// fewest; then single partitions move from the fullest to the emptiest eligible member until no
/// move makes the counts more even. Partitions that change owner are withheld from their new
/// owner while another member still owns them (the cooperative protocol's second round).
fn sticky(
    members: &BTreeMap<String, Subscription>,
    topics: &BTreeMap<String, u32>,
    out: &mut BTreeMap<String, BTreeSet<TopicPartition>>,
) {
    let eligible = |id: &str, topic: &str| {
        members
            .get(id)
            .is_some_and(|s| s.topics.iter().any(|t| t == topic))
    };
    let exists = |(topic, p): &TopicPartition| topics.get(topic).is_some_and(|n| p < n);
    let mut taken = BTreeSet::new();
    let mut owner: BTreeMap<TopicPartition, String> = BTreeMap::new();
    for (id, subscription) in members {
        for tp in &subscription.owned {
            if exists(tp) && eligible(id, &tp.0) && taken.insert(tp.clone()) {
                owner.insert(tp.clone(), id.clone());
                if let Some(set) = out.get_mut(id) {
                    set.insert(tp.clone());
                }
            }
        }
    }
    for (topic, &count) in topics {
        for p in 0..count {
            let tp = (topic.clone(), p);
            if taken.contains(&tp) {
                continue;
            }
            let fewest = out
                .iter_mut()
                .filter(|(id, _)| eligible(id, topic))
                .min_by_key(|(_, set)| set.len());
            if let Some((_, set)) = fewest {
                set.insert(tp);
            }
        }
    }
    // Each move lowers the sum of squared counts, so this ends; the bound is a backstop.
    let bound = topics.values().map(|n| *n as usize).sum::<usize>() * members.len().max(1);
    for _ in 0..bound {
        let mut by_count: Vec<(String, usize)> = out
            .iter()
            .map(|(id, set)| (id.clone(), set.len()))
            .collect();
        by_count.sort_by_key(|(id, n)| (std::cmp::Reverse(*n), id.clone()));
        let mut moved = None;
        'search: for (from, n_from) in &by_count {
            for (to, n_to) in by_count.iter().rev() {
                if n_from <= &(n_to + 1) {
                    break;
                }
                let candidate = out
                    .get(from)
                    .and_then(|set| set.iter().rev().find(|tp| eligible(to, &tp.0)).cloned());
                if let Some(tp) = candidate {
                    moved = Some((from.clone(), to.clone(), tp));
                    break 'search;
                }
            }
        }
        let Some((from, to, tp)) = moved else { break };
        if let Some(set) = out.get_mut(&from) {
            set.remove(&tp);
        }
        if let Some(set) = out.get_mut(&to) {
            set.insert(tp);
        }
    }
    for (id, set) in out.iter_mut() {
        set.retain(|tp| owner.get(tp).is_none_or(|o| o == id));
    }
}

/// What a member sends when it joins: its topics and the partitions it owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Subscribed topics.
    pub topics: Vec<String>,
    /// Partitions the member owns now (cooperative rebalancing).
    pub owned: Vec<TopicPartition>,
}

/// What a member is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Its partitions.
    pub partitions: Vec<TopicPartition>,
}

const VERSION: i16 = 1;

/// A classic string (topic names are at most 249 bytes; anything longer is cut at the
/// format's limit).
fn put_string(out: &mut Vec<u8>, s: &str) {
    let bytes = s
        .as_bytes()
        .get(..i16::MAX as usize)
        .unwrap_or(s.as_bytes());
    out.put_i16(bytes.len() as i16);
    out.extend_from_slice(bytes);
}

/// Topic partitions grouped by topic: `[topic string, partitions [i32]]`.
fn put_partitions(out: &mut Vec<u8>, partitions: &[TopicPartition]) {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, p) in partitions {
        by_topic.entry(topic).or_default().push(*p);
    }
    out.put_i32(by_topic.len() as i32);
    for (topic, ps) in by_topic {
        put_string(out, topic);
        out.put_i32(ps.len() as i32);
        for p in ps {
            out.put_i32(p as i32);
        }
    }
}

/// A bounded reader of the consumer-protocol layout: every length and count is checked against
/// the bytes left before anything is allocated.
struct Reader(Bytes);

impl Reader {
    fn bad(what: &str) -> ClientError {
        ClientError::Corrupt(format!("group member data: {what}"))
    }
    fn i16(&mut self) -> Result<i16, ClientError> {
        if self.0.remaining() < 2 {
            return Err(Reader::bad("truncated"));
        }
        Ok(self.0.get_i16())
    }
    fn i32(&mut self) -> Result<i32, ClientError> {
        if self.0.remaining() < 4 {
            return Err(Reader::bad("truncated"));
        }
        Ok(self.0.get_i32())
    }
    fn count(&mut self, min_item: usize) -> Result<usize, ClientError> {
        let n = self.i32()?;
        let n = usize::try_from(n).map_err(|_| Reader::bad("negative count"))?;
        if n > self.0.remaining() / min_item {
            return Err(Reader::bad("count larger than the data"));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, ClientError> {
        let len = usize::try_from(self.i16()?).map_err(|_| Reader::bad("null string"))?;
        if len > self.0.remaining() {
            return Err(Reader::bad("string longer than the data"));
        }
        String::from_utf8(self.0.split_to(len).to_vec()).map_err(|_| Reader::bad("not UTF-8"))
    }
    fn skip_nullable_bytes(&mut self) -> Result<(), ClientError> {
        let len = self.i32()?;
        if let Ok(len) = usize::try_from(len) {
            if len > self.0.remaining() {
                return Err(Reader::bad("bytes longer than the data"));
            }
            self.0.advance(len);
        }
        Ok(())
    }
    fn partitions(&mut self) -> Result<Vec<TopicPartition>, ClientError> {
        let mut out = Vec::new();
        for _ in 0..self.count(6)? {
            let topic = self.string()?;
            for _ in 0..self.count(4)? {
                let p =
                    u32::try_from(self.i32()?).map_err(|_| Reader::bad("negative partition"))?;
                out.push((topic.clone(), p));
            }
        }
        Ok(out)
    }
}

impl Subscription {
    /// `version i16 (1), topics [string], user_data nullable bytes (null), owned [topic,
    /// [partition]]`.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        out.put_i16(VERSION);
        out.put_i32(self.topics.len() as i32);
        for topic in &self.topics {
            put_string(&mut out, topic);
        }
        out.put_i32(-1);
        put_partitions(&mut out, &self.owned);
        Bytes::from(out)
    }

    /// Decodes versions 0 and up (fields of later versions are ignored).
    pub fn decode(data: Bytes) -> Result<Subscription, ClientError> {
        let mut r = Reader(data);
        let version = r.i16()?;
        if version < 0 {
            return Err(Reader::bad("negative version"));
        }
        let mut topics = Vec::new();
        for _ in 0..r.count(2)? {
            topics.push(r.string()?);
        }
        r.skip_nullable_bytes()?;
        let owned = if version >= 1 {
            r.partitions()?
        } else {
            Vec::new()
        };
        Ok(Subscription { topics, owned })
    }
}

impl Assignment {
    /// `version i16 (1), assigned [topic, [partition]], user_data nullable bytes (null)`.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        out.put_i16(VERSION);
        put_partitions(&mut out, &self.partitions);
        out.put_i32(-1);
        Bytes::from(out)
    }

    /// Decodes versions 0 and up; an empty buffer is an empty assignment (Kafka's coordinator
    /// hands one to members the leader left out).
    pub fn decode(data: Bytes) -> Result<Assignment, ClientError> {
        if data.is_empty() {
            return Ok(Assignment::default());
        }
        let mut r = Reader(data);
        if r.i16()? < 0 {
            return Err(Reader::bad("negative version"));
        }
        Ok(Assignment {
            partitions: r.partitions()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (member id, topics, owned partitions).
    type Spec<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, u32)]);

    fn members(specs: &[Spec<'_>]) -> BTreeMap<String, Subscription> {
        specs
            .iter()
            .map(|(id, topics, owned)| {
                (
                    (*id).to_string(),
                    Subscription {
                        topics: topics.iter().map(|t| (*t).to_string()).collect(),
                        owned: owned.iter().map(|(t, p)| ((*t).to_string(), *p)).collect(),
                    },
                )
            })
            .collect()
    }

    fn topics(specs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        specs.iter().map(|(t, n)| ((*t).to_string(), *n)).collect()
    }

    fn counts(a: &BTreeMap<String, BTreeSet<TopicPartition>>) -> Vec<usize> {
        a.values().map(BTreeSet::len).collect()
    }

    /// Every partition of `topics` exactly once.
    fn covers_once(a: &BTreeMap<String, BTreeSet<TopicPartition>>, topics: &BTreeMap<String, u32>) {
        let all: Vec<&TopicPartition> = a.values().flatten().collect();
        let unique: BTreeSet<&TopicPartition> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "a partition assigned twice: {a:?}");
        assert_eq!(all.len() as u32, topics.values().sum::<u32>(), "{a:?}");
    }

    #[test]
    fn range_gives_consecutive_ranges_per_topic() {
        let m = members(&[("a", &["t", "u"], &[]), ("b", &["t", "u"], &[])]);
        let t = topics(&[("t", 3), ("u", 2)]);
        let a = Assignor::Range.assign(&m, &t);
        covers_once(&a, &t);
        let expect_a: BTreeSet<TopicPartition> = [("t", 0), ("t", 1), ("u", 0)]
            .map(|(t, p)| (t.into(), p))
            .into();
        assert_eq!(a["a"], expect_a);
    }

    #[test]
    fn round_robin_deals_to_subscribers_only() {
        let m = members(&[
            ("a", &["t"], &[]),
            ("b", &["t", "u"], &[]),
            ("c", &["t"], &[]),
        ]);
        let t = topics(&[("t", 6), ("u", 2)]);
        let a = Assignor::RoundRobin.assign(&m, &t);
        covers_once(&a, &t);
        assert!(a["b"].contains(&("u".into(), 0)) && a["b"].contains(&("u".into(), 1)));
        assert_eq!(counts(&a), vec![2, 4, 2]);
    }

    #[test]
    fn sticky_keeps_owned_partitions_and_balances() {
        // Three members own 4 of 12 partitions each; a fourth joins.
        let owned = |from: u32| -> Vec<(&'static str, u32)> {
            (from..from + 4).map(|p| ("t", p)).collect()
        };
        let (oa, ob, oc) = (owned(0), owned(4), owned(8));
        let m = members(&[
            ("a", &["t"], &oa),
            ("b", &["t"], &ob),
            ("c", &["t"], &oc),
            ("d", &["t"], &[]),
        ]);
        let t = topics(&[("t", 12)]);
        // First round: the members keep 3 of theirs; the moving ones are withheld from d.
        let first = Assignor::CooperativeSticky.assign(&m, &t);
        assert_eq!(counts(&first), vec![3, 3, 3, 0]);
        for (id, from) in [("a", 0), ("b", 4), ("c", 8)] {
            assert!(first[id].iter().all(|(_, p)| (from..from + 4).contains(p)));
        }
        // Second round: they rejoin owning 3 each; d gets the three freed partitions.
        let owned_now: Vec<Vec<(&str, u32)>> = ["a", "b", "c"]
            .iter()
            .map(|id| first[*id].iter().map(|(_, p)| ("t", *p)).collect())
            .collect();
        let m = members(&[
            ("a", &["t"], &owned_now[0]),
            ("b", &["t"], &owned_now[1]),
            ("c", &["t"], &owned_now[2]),
            ("d", &["t"], &[]),
        ]);
        let second = Assignor::CooperativeSticky.assign(&m, &t);
        covers_once(&second, &t);
        assert_eq!(counts(&second), vec![3, 3, 3, 3]);
        for id in ["a", "b", "c"] {
            assert_eq!(second[id], first[id], "{id} lost a partition it kept");
        }
    }

    #[test]
    fn sticky_spreads_a_departed_members_partitions() {
        let m = members(&[
            ("a", &["t"], &[("t", 0), ("t", 1)]),
            ("b", &["t"], &[("t", 2), ("t", 3)]),
        ]);
        let t = topics(&[("t", 6)]);
        let a = Assignor::CooperativeSticky.assign(&m, &t);
        covers_once(&a, &t);
        assert_eq!(counts(&a), vec![3, 3]);
        assert!(a["a"].contains(&("t".into(), 0)) && a["b"].contains(&("t".into(), 3)));
    }

    #[test]
    fn bytes_round_trip_and_hostile_bytes_are_errors() {
        let s = Subscription {
            topics: vec!["t".into(), "u".into()],
            owned: vec![("t".into(), 1), ("u".into(), 0)],
        };
        assert_eq!(Subscription::decode(s.encode()).unwrap(), s);
        let a = Assignment {
            partitions: vec![("t".into(), 0), ("t".into(), 5)],
        };
        assert_eq!(Assignment::decode(a.encode()).unwrap(), a);
        assert_eq!(
            Assignment::decode(Bytes::new()).unwrap(),
            Assignment::default()
        );
        // A count of 2^31-1 in 8 bytes, a truncated string, a negative partition.
        for bad in [
            &[0u8, 1, 0x7f, 0xff, 0xff, 0xff, 0, 0][..],
            &[0, 1, 0, 0, 0, 1, 0, 9, b'x'][..],
        ] {
            assert!(Subscription::decode(Bytes::copy_from_slice(bad)).is_err());
            assert!(Assignment::decode(Bytes::copy_from_slice(bad)).is_err());
        }
        let negative = [
            0u8, 1, 0, 0, 0, 1, 0, 1, b't', 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(Assignment::decode(Bytes::copy_from_slice(&negative)).is_err());
    }
}
