//! Idempotency records: "this key was first used with this request, and produced this result".
//! Claimed inside a replicated state machine's batch (the first committed claim wins, later ones
//! read the winner's record), kept for [`IDEMPOTENCY_RETENTION_MS`], then swept by a command that
//! names the entries to forget.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{decode_payload, fnv1a, unknown_version, Batch, CodecError, Record, Store, StoreError, Table};

/// 24 hours, as the API promises.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// A time-index entry and the key it points at: what a sweep names to forget.
pub type IdemIndexEntry = ((u64, uuid::Uuid), String);

/// What a key was first used for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// The request body's hash: the same key with another body is refused.
    pub body: BodyHash,
    /// What the first request produced (e.g. the order id), as bytes the caller understands.
    pub result: Vec<u8>,
    pub created_ms: u64,
}

impl Record for IdemRecord {
    /// 2: the body's hash is SHA-256 (`BodyHash`); version 1's FNV-1a reads as `BodyHash::Fnv64`.
    const VERSION: u8 = 2;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<IdemRecordV1>(payload).map(Into::into),
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// [`IdemRecord`] version 1 (fc3c059 to this change): the body's hash was a 64-bit FNV-1a.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct IdemRecordV1 {
    pub body_hash: u64,
    pub result: Vec<u8>,
    pub created_ms: u64,
}

impl From<IdemRecordV1> for IdemRecord {
    fn from(old: IdemRecordV1) -> Self {
        Self { body: BodyHash::Fnv64(old.body_hash), result: old.result, created_ms: old.created_ms }
    }
}

/// The hash a key's claim keeps of the body it was first used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyHash {
    /// FNV-1a, as builds before SHA-256 claimed: not collision-resistant (a client could craft a
    /// second body that passes for the first), so only read, never written, and gone from every
    /// store 24 hours after the upgrade ([`IDEMPOTENCY_RETENTION_MS`]).
    Fnv64(u64),
    Sha256([u8; 32]),
}

/// A request body's fingerprint as a request or command carries it: the SHA-256 a new claim keeps,
/// and the FNV-1a of the same bytes that a claim made by an older build is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyFingerprint {
    /// `None` only in a command an older build proposed (replayed from the log after an upgrade).
    pub sha256: Option<[u8; 32]>,
    pub fnv64: u64,
}

impl BodyFingerprint {
    pub fn of(body: &[u8]) -> Self {
        Self { sha256: Some(Sha256::digest(body).into()), fnv64: fnv1a(body) }
    }

    /// What a new claim keeps: SHA-256 where there is one.
    pub fn claim(&self) -> BodyHash {
        match self.sha256 {
            Some(h) => BodyHash::Sha256(h),
            None => BodyHash::Fnv64(self.fnv64),
        }
    }

    /// Whether a key claimed with `claimed` was claimed with this body. A SHA-256 claim is matched
    /// only by SHA-256: a fingerprint without one (an older build's command) never matches it.
    pub fn matches(&self, claimed: &BodyHash) -> bool {
        match claimed {
            BodyHash::Sha256(h) => self.sha256.as_ref() == Some(h),
            BodyHash::Fnv64(h) => self.fnv64 == *h,
        }
    }
}

/// An idempotency table plus its time index (for sweeping), at the given table ids.
#[derive(Clone, Copy)]
pub struct Idempotency {
    records: Table<String, IdemRecord>,
    by_time: Table<(u64, uuid::Uuid), IdemKeyRef>,
}

/// Time-index entry pointing back at a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemKeyRef(pub String);
impl Record for IdemKeyRef {
    const VERSION: u8 = 1;
}

impl Idempotency {
    pub const fn new(records_id: u8, index_id: u8) -> Self {
        Self { records: Table::new(records_id, "idempotency"), by_time: Table::new(index_id, "idempotency_by_time") }
    }

    /// Claims `key` for `record` inside `batch` (a replicated state machine's apply): reads through
    /// the batch, so two claims of one key in one batch see each other. `tiebreak` orders the time
    /// index (the caller's deterministic id, e.g. the order id); returns the earlier claim, if any.
    pub fn claim_in(
        &self,
        store: &Store,
        batch: &mut Batch,
        key: &str,
        record: &IdemRecord,
        tiebreak: uuid::Uuid,
    ) -> Result<Option<IdemRecord>, StoreError> {
        let key = key.to_string();
        if let Some(existing) = self.records.get_through(store, batch, &key)? {
            return Ok(Some(existing));
        }
        self.records.put(batch, &key, record);
        self.by_time.put(batch, &(record.created_ms, tiebreak), &IdemKeyRef(key));
        Ok(None)
    }

    /// At most `max` time-index entries older than the retention at `now_ms`, oldest first: what
    /// a replicated sweep proposes (the entries travel in the command, so every replica removes
    /// exactly these, whatever its batches hold).
    pub fn expired(&self, store: &Store, now_ms: u64, max: usize) -> Result<Vec<IdemIndexEntry>, StoreError> {
        let cutoff = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS);
        self.by_time
            .iter_before(store, &(cutoff, uuid::Uuid::nil()))
            .take(max)
            .map(|r| r.map(|(k, v)| (k, v.0)))
            .collect()
    }

    /// Removes the given [`Idempotency::expired`] entries into `batch` if they are still older than
    /// the retention at `now_ms` (a record claimed again since keeps its key); returns how many.
    pub fn forget_in(
        &self,
        store: &Store,
        batch: &mut Batch,
        entries: &[IdemIndexEntry],
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS);
        let mut n = 0;
        for (at, key) in entries.iter().filter(|(at, _)| at.0 < cutoff) {
            self.by_time.remove(batch, at);
            let key = key.to_string();
            if self.records.get_through(store, batch, &key)?.is_some_and(|r| r.created_ms == at.0) {
                self.records.remove(batch, &key);
                n += 1;
            }
        }
        Ok(n)
    }

    /// A raw record of these tables in today's layout, if it is in an older one ([`Table::canonical`]).
    pub fn canonical(&self, raw_key: &[u8], raw_value: &[u8]) -> Option<Vec<u8>> {
        self.records.canonical(raw_key, raw_value).or_else(|| self.by_time.canonical(raw_key, raw_value))
    }

    pub fn get(&self, store: &Store, key: &str) -> Result<Option<IdemRecord>, StoreError> {
        self.records.get(store, &key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreOptions;

    #[tokio::test]
    async fn claim_then_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "orders", &StoreOptions::default()).unwrap();
        let idem = Idempotency::new(10, 11);
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let rec = IdemRecord { body: BodyHash::Fnv64(1), result: vec![1], created_ms: 1_000 };
        let mut batch = Batch::new();
        assert_eq!(idem.claim_in(&s, &mut batch, "k", &rec, a).unwrap(), None);
        let other = IdemRecord { body: BodyFingerprint::of(b"x").claim(), result: vec![2], created_ms: 1_001 };
        assert_eq!(idem.claim_in(&s, &mut batch, "k", &other, b).unwrap(), Some(rec.clone()), "seen through the batch");
        s.apply(batch).unwrap();
        assert!(idem.expired(&s, 1_000 + IDEMPOTENCY_RETENTION_MS, 10).unwrap().is_empty());
        let due = idem.expired(&s, 1_001 + IDEMPOTENCY_RETENTION_MS, 10).unwrap();
        assert_eq!(due, vec![((1_000, a), "k".to_string())]);
        let mut batch = Batch::new();
        // Not yet expired at this time: kept.
        assert_eq!(idem.forget_in(&s, &mut batch, &due, 1_000 + IDEMPOTENCY_RETENTION_MS).unwrap(), 0);
        assert_eq!(idem.forget_in(&s, &mut batch, &due, 1_001 + IDEMPOTENCY_RETENTION_MS).unwrap(), 1);
        s.apply(batch).unwrap();
        assert_eq!(idem.get(&s, "k").unwrap(), None);
        assert!(idem.expired(&s, u64::MAX, 10).unwrap().is_empty());
    }

    /// One claim written by two builds (version 1 before the upgrade, 2 after) reads as one
    /// record in today's layout; records of another table, or already current, are left alone.
    #[test]
    fn a_claim_in_the_old_layout_reads_as_todays_bytes() {
        let idem = Idempotency::new(10, 11);
        let key = idem.records.raw_key(&"k".to_string());
        let mut old = vec![1u8];
        old.extend(bulkhead_codec::encode_payload(&IdemRecordV1 { body_hash: 7, result: vec![1], created_ms: 5 }));
        let today = crate::encode(&IdemRecord { body: BodyHash::Fnv64(7), result: vec![1], created_ms: 5 });
        assert_eq!(idem.canonical(&key, &old), Some(today.clone()));
        assert_eq!(idem.canonical(&key, &today), None, "already current");
        let mut elsewhere = key.clone();
        elsewhere[0] = 12;
        assert_eq!(idem.canonical(&elsewhere, &old), None, "another table's record");
    }

    #[test]
    fn a_body_matches_its_own_claim_and_an_old_build_claim_by_its_fnv() {
        let (a, b) = (BodyFingerprint::of(br#"{"a":1}"#), BodyFingerprint::of(br#"{"a":2}"#));
        assert!(a.matches(&a.claim()) && !b.matches(&a.claim()));
        assert!(matches!(a.claim(), BodyHash::Sha256(_)), "new claims are SHA-256");
        // A claim an older build made keeps FNV-1a for its 24 hours; the same body still matches it.
        let legacy = BodyHash::Fnv64(fnv1a(br#"{"a":1}"#));
        assert!(a.matches(&legacy) && !b.matches(&legacy));
        // An older build's command (no SHA-256) claims by FNV and never matches a SHA-256 claim.
        let old = BodyFingerprint { sha256: None, ..a };
        assert_eq!(old.claim(), legacy);
        assert!(!old.matches(&a.claim()));
        // Known answers, so the hash cannot change under a stored claim.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let abc = BodyFingerprint::of(b"abc").sha256.unwrap();
        assert_eq!(abc[..4], [0xba, 0x78, 0x16, 0xbf], "SHA-256(abc) starts ba7816bf");
    }
}
