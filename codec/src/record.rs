//! The versioned record codec: one version byte, then the record's bincode 2 encoding.
//!
//! bincode is not self-describing, so a record type can never change shape silently. When a type
//! grows, bump its [`Record::VERSION`] and teach [`Record::upgrade`] (the type's "decode version N"
//! hook) to read the older layouts. Every crate checks in the bytes of every version of each of its
//! record types (`<crate>/tests/fixtures/records.txt`, read by [`crate::fixtures`]) and a test that
//! decodes them all, so yesterday's bytes are proved to decode, and a bump without a fixture fails.

use serde::{de::DeserializeOwned, Serialize};

/// Why bytes could not be turned back into a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty record (no version byte)")]
    Empty,
    #[error("record version {found} is newer than this build understands (up to {known})")]
    UnknownVersion { found: u8, known: u8 },
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Well-formed bytes of an older version whose meaning this build no longer has (a request of a
    /// protocol that is gone): refused by name rather than guessed at.
    #[error("record version {version} {what}: no longer understood")]
    Retired { version: u8, what: &'static str },
}

/// A type stored or sent with the versioned codec.
pub trait Record: Serialize + DeserializeOwned {
    /// The version written by this build. Start at 1; bump when the layout changes.
    const VERSION: u8;

    /// Decodes a payload written with `version` (never above [`Record::VERSION`]: [`decode`] refuses
    /// those first). The default reads only the current version; a type that has grown overrides
    /// this to read each older layout into the current type, with defaults for what it lacked, and
    /// answers any other version with [`unknown_version`].
    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        if version == Self::VERSION {
            decode_payload(payload)
        } else {
            Err(unknown_version::<Self>(version))
        }
    }
}

/// The error for a version `T` has never had (0, or a number skipped).
pub fn unknown_version<T: Record>(version: u8) -> CodecError {
    CodecError::UnknownVersion { found: version, known: T::VERSION }
}

/// Decodes a payload of a version whose layout changed without a new number (a mistake the
/// fixtures now catch, but some versions shipped two layouts): the later layout first, then the
/// earlier one. bincode is not self-describing; when the later layout appends fields the two
/// cannot be confused (read as the other, one runs out of bytes and the other leaves trailing
/// bytes); when it inserts one mid-way only contrived contents could be. The later layout's error
/// is the one reported.
pub fn decode_either<T, Later, Earlier>(payload: &[u8]) -> Result<T, CodecError>
where
    Later: DeserializeOwned + Into<T>,
    Earlier: DeserializeOwned + Into<T>,
{
    match decode_payload::<Later>(payload) {
        Ok(v) => Ok(v.into()),
        Err(e) => decode_payload::<Earlier>(payload).map(Into::into).map_err(|_| e),
    }
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The most one decode of bytes from the network may claim, in bytes. bincode counts what it
/// decodes against a limit (a `u64` counts 8 whatever its varint's length, a string its claimed
/// length *before* it is allocated), so under the limit a length prefix can no longer make it
/// allocate without bound: without it, a prefix of 2^40 in a peer's message made the node ask for
/// a terabyte and abort (`tests/wire_decoders.rs` found it). 64 MiB: eight times a cluster frame
/// (`MAX_FRAME`, 8 MiB), what a frame full of one-byte varints would count. Records read back from
/// our own disk (a whole snapshot, an apply's intent) are decoded without it: they can be larger,
/// and they are ours.
pub const WIRE_DECODE_LIMIT: usize = 64 * 1024 * 1024;

thread_local! {
    /// Set while [`decode_wire`] runs: [`decode_payload`] (which `Record::upgrade` hooks call)
    /// then decodes under [`WIRE_DECODE_LIMIT`].
    static WIRE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Decodes bytes that came from the network (written by [`encode`], of this or an older version)
/// under [`WIRE_DECODE_LIMIT`].
pub fn decode_wire<T: Record>(bytes: &[u8]) -> Result<T, CodecError> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WIRE.with(|w| w.set(self.0));
        }
    }
    let _restore = Restore(WIRE.with(|w| w.replace(true)));
    decode::<T>(bytes)
}

/// Decodes a bare bincode payload (no version byte); for [`Record::upgrade`] implementations.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let decoded = if WIRE.with(|w| w.get()) {
        bincode::serde::decode_from_slice(payload, config().with_limit::<WIRE_DECODE_LIMIT>())
    } else {
        bincode::serde::decode_from_slice(payload, config())
    };
    let (value, used) = decoded.map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Malformed(format!("{} trailing bytes after the record", payload.len() - used)));
    }
    Ok(value)
}

/// Encodes a record as `[VERSION][bincode payload]`.
pub fn encode<T: Record>(value: &T) -> Vec<u8> {
    let mut out = vec![T::VERSION];
    // Encoding into a Vec only fails for types serde cannot represent (e.g. maps with non-string
    // keys in some formats); bincode supports every type we define, so this is a programming error.
    bincode::serde::encode_into_std_write(value, &mut out, config()).expect("bincode can encode every record type");
    out
}

/// The bincode payload alone (no version byte): how [`crate::fixtures`] and tests write the bytes
/// of an older layout. Records are written with [`encode`].
pub fn encode_payload<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config()).expect("bincode can encode every record type")
}

/// Decodes bytes written by [`encode`], of this or an older version.
pub fn decode<T: Record>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, payload) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version > T::VERSION {
        return Err(CodecError::UnknownVersion { found: version, known: T::VERSION });
    }
    T::upgrade(version, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Big(Vec<u64>);
    impl Record for Big {
        const VERSION: u8 = 1;
    }

    #[test]
    fn our_own_large_records_decode_and_the_network_limit_refuses_a_huge_claim() {
        // A record whose decode counts past the network limit (each `u64` counts 8 bytes, as
        // one-byte varints here): read back from our own disk, it decodes whole.
        let big = Big(vec![1; WIRE_DECODE_LIMIT / 8 + 1024]);
        let bytes = encode(&big);
        assert_eq!(decode::<Big>(&bytes).unwrap(), big);
        // The same bytes from a peer: over the limit, refused (and nothing allocated for it).
        assert!(matches!(decode_wire::<Big>(&bytes), Err(CodecError::Malformed(_))));
        // A string claiming 2^40 bytes: refused before it is allocated.
        let mut claim = vec![1u8, 253];
        claim.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_wire::<V1>(&[&[1u8, 5][..], &claim[1..]].concat()).is_err());
        // The flag does not outlive the call.
        assert_eq!(decode::<Big>(&bytes).unwrap(), big);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        a: u32,
        b: String,
    }
    impl Record for V1 {
        const VERSION: u8 = 1;
    }

    /// The same record after it grew a field: version 2 reads version-1 bytes.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V2 {
        a: u32,
        b: String,
        c: Option<u64>,
    }
    impl Record for V2 {
        const VERSION: u8 = 2;
        fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
            match version {
                1 => {
                    let old: V1 = decode_payload(payload)?;
                    Ok(V2 { a: old.a, b: old.b, c: None })
                }
                2 => decode_payload(payload),
                v => Err(unknown_version::<Self>(v)),
            }
        }
    }

    #[test]
    fn fixture_v1_bytes_are_stable() {
        let bytes = encode(&V1 { a: 7, b: "hi".into() });
        // version 1, varint 7, length 2, "hi"
        assert_eq!(bytes, vec![1, 7, 2, b'h', b'i']);
    }

    #[test]
    fn old_version_upgrades() {
        let old = encode(&V1 { a: 300, b: "x".into() });
        let new: V2 = decode(&old).unwrap();
        assert_eq!(new, V2 { a: 300, b: "x".into(), c: None });
    }

    #[test]
    fn newer_version_is_refused_not_misread() {
        let newer = encode(&V2 { a: 1, b: String::new(), c: Some(3) });
        assert_eq!(decode::<V1>(&newer), Err(CodecError::UnknownVersion { found: 2, known: 1 }));
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(decode::<V1>(&[]), Err(CodecError::Empty));
        assert!(matches!(decode::<V1>(&[1, 0xff, 0xff]), Err(CodecError::Malformed(_))));
        assert!(matches!(decode::<V1>(&[1, 7, 2, b'h', b'i', 0]), Err(CodecError::Malformed(_))));
    }
}
