//! Table keys: encoded so that byte order is the natural order (big-endian integers, raw UUID bytes,
//! UTF-8 strings). Never bincode: its varints do not sort.

use uuid::Uuid;

/// A value usable as a table key.
pub trait Key: Sized {
    fn encode_key(&self) -> Vec<u8>;
    fn decode_key(bytes: &[u8]) -> Option<Self>;
}

impl Key for String {
    fn encode_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Key for Uuid {
    fn encode_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok()
    }
}

impl Key for u64 {
    fn encode_key(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// `(time, id)`: sorts by time first, e.g. an expiry index.
impl Key for (u64, Uuid) {
    fn encode_key(&self) -> Vec<u8> {
        let mut k = self.0.to_be_bytes().to_vec();
        k.extend_from_slice(self.1.as_bytes());
        k
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 24 {
            return None;
        }
        let t = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        Some((t, Uuid::from_slice(&bytes[8..]).ok()?))
    }
}

/// `(id, n)`: several records per id, in id order (e.g. an order's outbox entries).
impl Key for (Uuid, u64) {
    fn encode_key(&self) -> Vec<u8> {
        let mut k = self.0.as_bytes().to_vec();
        k.extend_from_slice(&self.1.to_be_bytes());
        k
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 24 {
            return None;
        }
        Some((Uuid::from_slice(&bytes[..16]).ok()?, u64::from_be_bytes(bytes[16..].try_into().ok()?)))
    }
}

/// `(name, id)`: several ids per name, in id order (e.g. a customer's orders). The name is
/// length-prefixed (u16, big-endian), so one name's keys form one contiguous prefix
/// ([`name_prefix`]) whatever bytes names hold.
impl Key for (String, Uuid) {
    fn encode_key(&self) -> Vec<u8> {
        let mut k = name_prefix(&self.0);
        k.extend_from_slice(self.1.as_bytes());
        k
    }
    fn decode_key(bytes: &[u8]) -> Option<Self> {
        let len = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(bytes.get(2..2 + len)?).ok()?.to_string();
        let id = Uuid::from_slice(bytes.get(2 + len..)?).ok()?;
        Some((name, id))
    }
}

/// The encoded prefix every `(name, _)` key shares. Names longer than `u16::MAX` bytes are cut.
pub fn name_prefix(name: &str) -> Vec<u8> {
    let bytes = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
    let mut k = (bytes.len() as u16).to_be_bytes().to_vec();
    k.extend_from_slice(bytes);
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn u64_keys_sort_like_numbers(a: u64, b: u64) {
            prop_assert_eq!(a.cmp(&b), a.encode_key().cmp(&b.encode_key()));
            prop_assert_eq!(u64::decode_key(&a.encode_key()), Some(a));
        }

        #[test]
        fn name_id_keys_round_trip_and_group_by_name(a in ".{0,20}", b in ".{0,20}", x: u128, y: u128) {
            let (ka, kb) = ((a.clone(), Uuid::from_u128(x)), (b.clone(), Uuid::from_u128(y)));
            prop_assert_eq!(<(String, Uuid)>::decode_key(&ka.encode_key()), Some(ka.clone()));
            prop_assert!(ka.encode_key().starts_with(&name_prefix(&a)));
            if a != b {
                prop_assert!(!kb.encode_key().starts_with(&name_prefix(&a)));
            } else {
                prop_assert_eq!(ka.1.cmp(&kb.1), ka.encode_key().cmp(&kb.encode_key()));
            }
        }

        #[test]
        fn time_id_keys_sort_by_time(a: u64, b: u64, x: u128, y: u128) {
            let (ka, kb) = ((a, Uuid::from_u128(x)), (b, Uuid::from_u128(y)));
            prop_assert_eq!(ka.cmp(&kb), ka.encode_key().cmp(&kb.encode_key()));
            prop_assert_eq!(<(u64, Uuid)>::decode_key(&ka.encode_key()), Some(ka));
        }
    }
}
