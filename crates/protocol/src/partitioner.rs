//! Kafka's default partitioner hash, shared by the client (choosing partitions) and the broker
//! (placing a group's committed offsets), so both pick the partition a Java or librdkafka
//! producer would.

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut rest = data;
    while let Some((word, tail)) = rest.split_first_chunk::<4>() {
        let mut k = u32::from_le_bytes(*word);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
        rest = tail;
    }
    // Kafka's switch falls through: byte 2, then 1, then 0 and the multiply.
    if let Some(&b2) = rest.get(2) {
        h ^= u32::from(b2) << 16;
    }
    if let Some(&b1) = rest.get(1) {
        h ^= u32::from(b1) << 8;
    }
    if let Some(&b0) = rest.first() {
        h ^= u32::from(b0);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key`.
pub fn partition_for_key(key: &[u8], n_partitions: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % n_partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: &[(&str, i32)] = &[
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for &(input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "{input}");
        }
    }
}
