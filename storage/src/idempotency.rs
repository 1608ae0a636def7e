//! Idempotency records: "this key was first used with this request, and produced this result".
//! Inserted with compare-and-swap (the first writer wins, later ones read the winner's record),
//! kept for [`IDEMPOTENCY_RETENTION_MS`], then swept.

use serde::{Deserialize, Serialize};

use crate::{Batch, Record, Store, StoreError, Table};

/// 24 hours, as the API promises.
pub const IDEMPOTENCY_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

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

    /// Claims `key` for `record`; returns `None` if claimed now, or the earlier claim.
    /// Durable only after the caller's next [`Store::sync`].
    pub fn claim(&self, store: &Store, key: &str, record: &IdemRecord) -> Result<Option<IdemRecord>, StoreError> {
        let existing = self.records.insert_if_absent(store, &key.to_string(), record)?;
        if existing.is_none() {
            let mut b = Batch::new();
            self.by_time.put(&mut b, &(record.created_ms, uuid::Uuid::new_v4()), &IdemKeyRef(key.to_string()));
            store.apply(b)?;
        }
        Ok(existing)
    }

    pub fn get(&self, store: &Store, key: &str) -> Result<Option<IdemRecord>, StoreError> {
        self.records.get(store, &key.to_string())
    }

    /// Replaces the result of a claimed key (e.g. once the order id is known).
    pub fn set(&self, batch: &mut Batch, key: &str, record: &IdemRecord) {
        self.records.put(batch, &key.to_string(), record);
    }

    /// Removes records older than the retention; returns how many.
    pub fn sweep(&self, store: &Store, now_ms: u64) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS);
        let mut b = Batch::new();
        let mut n = 0;
        for item in self.by_time.iter_before(store, &(cutoff, uuid::Uuid::nil())) {
            let (k, IdemKeyRef(key)) = item?;
            self.by_time.remove(&mut b, &k);
            self.records.remove(&mut b, &key);
            n += 1;
        }
        store.apply(b)?;
        Ok(n)
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
        let rec = IdemRecord { body_hash: 1, result: vec![1], created_ms: 1_000 };
        assert_eq!(idem.claim(&s, "k", &rec).unwrap(), None);
        let other = IdemRecord { body_hash: 2, result: vec![2], created_ms: 1_001 };
        assert_eq!(idem.claim(&s, "k", &other).unwrap(), Some(rec.clone()));
        assert_eq!(idem.sweep(&s, 1_000 + IDEMPOTENCY_RETENTION_MS).unwrap(), 0);
        assert_eq!(idem.sweep(&s, 1_001 + IDEMPOTENCY_RETENTION_MS).unwrap(), 1);
        assert_eq!(idem.get(&s, "k").unwrap(), None);
    }
}
