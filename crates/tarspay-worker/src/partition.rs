//! Partitions: how a deployment's keys are split so Redis Cluster can spread them over nodes.
//!
//! A deployment has `P` partitions (`TARSPAY_PARTITIONS`, fixed when its keys are first
//! written). Each has its own hash tag and holds everything that changes atomically with an
//! order: its payout queue, delayed set, ledger records, batches' members, outcome stream and
//! webhook queue. A payout's partition is [`of_order`] of its `mchOrderNo`, so every reader
//! (status, callbacks, the API) finds it without an index. One Redis runs the same layout.

/// The most partitions a deployment may have.
pub const MAX_PARTITIONS: usize = 1024;

/// The slots of Redis Cluster.
const SLOTS: u32 = 16_384;

/// The partition of an order: CRC-32 (IEEE 802.3, as zlib's `crc32`) of its `mchOrderNo`'s
/// UTF-8 bytes, modulo `count`. Stable across processes, versions and languages.
pub fn of_order(mch_order_no: &str, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    crc32fast::hash(mch_order_no.as_bytes()) as usize % count
}

/// The queue name of partition `index` of `count`, which with the prefix makes its hash tag
/// `{prefix:name}`.
///
/// One partition keeps the layout every deployment had before partitions (`payouts`). With
/// several, partition `i` is `payouts:i:s` with the smallest `s` whose tag's slot lies in the
/// `i`-th of `count` equal slot ranges: partitions spread evenly over the slots, and so over a
/// cluster's masters, which own contiguous ranges.
pub fn queue_name(prefix: &str, base: &str, index: usize, count: usize) -> String {
    if count <= 1 {
        return base.to_owned();
    }
    let width = SLOTS as usize / count.min(MAX_PARTITIONS);
    let wanted = index * width..(index + 1) * width;
    (0u32..)
        .map(|salt| format!("{base}:{index}:{salt}"))
        .find(|name| wanted.contains(&(slot(&format!("{{{prefix}:{name}}}")) as usize)))
        .unwrap_or_else(|| format!("{base}:{index}"))
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (or of the whole key without
/// one), modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    (crc16::State::<crc16::XMODEM>::calculate(hashed) as u32 % SLOTS) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on redis-server 7.0.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("{user1000}.following"), 3443);
        assert_eq!(slot("{}x"), slot("{}x"));
        assert_eq!(slot("123456789"), 12739);
    }

    #[test]
    fn orders_hash_like_zlib_crc32() {
        // zlib.crc32(b"ORD-1") == 0x7be28065 (Python 3).
        assert_eq!(crc32fast::hash(b"ORD-1"), 0x7be2_8065);
        assert_eq!(of_order("ORD-1", 1), 0);
        assert_eq!(of_order("ORD-1", 4), 0x7be2_8065 % 4);
    }

    #[test]
    fn one_partition_keeps_the_old_layout() {
        assert_eq!(queue_name("tarspay", "payouts", 0, 1), "payouts");
    }

    #[test]
    fn partitions_take_one_slot_range_each() {
        for count in [2, 3, 4, 16, 64] {
            let width = 16_384 / count;
            let mut names = std::collections::HashSet::new();
            for index in 0..count {
                let name = queue_name("tp", "payouts", index, count);
                let slot = slot(&format!("{{tp:{name}}}")) as usize;
                assert_eq!(slot / width, index, "{name} of {count} is in slot {slot}");
                assert!(names.insert(name));
            }
        }
    }

    #[test]
    fn orders_spread_over_partitions() {
        let mut counts = [0usize; 8];
        for n in 0..8_000 {
            counts[of_order(&format!("PAY-{n}"), 8)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
