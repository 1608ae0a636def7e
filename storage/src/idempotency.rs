//! Idempotency records: "this key was first used with this request, and produced this result".
//! Claimed inside a replicated state machine's batch (the first committed claim wins, later ones
//! read the winner's record), kept for [`IDEMPOTENCY_RETENTION_MS`], then swept by a command that
//! names the entries to forget.

use serde::{Deserialize, Serialize};

use crate::{Batch, Record, Store, StoreError, Table};

/// 24 hours, as the API promises.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// A time-index entry and the key it points at: what a sweep names to forget.
pub type IdemIndexEntry = ((u64, uuid::Uuid), String);

/// What a key was first used for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// A hash of the request body: the same key with another body is refused.
    pub body_hash: u64,
    /// What the first request produced (e.g. the order id), as bytes the caller understands.
    pub result: Vec<u8>,
    pub created_ms: u64,
}

impl Record for IdemRecord {
    const VERSION: u8 = 1;
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
        let rec = IdemRecord { body_hash: 1, result: vec![1], created_ms: 1_000 };
        let mut batch = Batch::new();
        assert_eq!(idem.claim_in(&s, &mut batch, "k", &rec, a).unwrap(), None);
        let other = IdemRecord { body_hash: 2, result: vec![2], created_ms: 1_001 };
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
}
