//! The stable hash: 64-bit FNV-1a, the same on every build and platform (std's hasher is not
//! promised to be), for values that are stored or compared across nodes.

/// 64-bit FNV-1a: a stable, fast, non-cryptographic hash (shard placement, config fingerprints,
/// legacy body hashes). Never where a client could gain by a collision.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers, so the hash cannot change under a stored claim or a placement.
    #[test]
    fn known_answers() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
