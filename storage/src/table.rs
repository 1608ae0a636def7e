//! A typed view of one table: a one-byte prefix in the store's tree, typed keys, versioned values.

use std::marker::PhantomData;
use std::ops::Bound;

use crate::key::Key;
use crate::store::{Batch, Store, StoreError};
use bulkhead_codec::{decode, encode, Record};

/// A table of `K -> V`. Declare one as a `const` per table in the capability's store module.
pub struct Table<K, V> {
    id: u8,
    name: &'static str,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for Table<K, V> {}

impl<K: Key, V: Record> Table<K, V> {
    pub const fn new(id: u8, name: &'static str) -> Self {
        Self { id, name, _types: PhantomData }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A raw record of this table in today's layout: `Some(bytes)` when `raw_key` is this table's
    /// and `raw_value` holds an older version of its record (re-encoded as this build writes it),
    /// `None` otherwise. Two replicas that applied one command under two builds wrote the same
    /// record in two layouts; compared through this, they agree.
    pub fn canonical(&self, raw_key: &[u8], raw_value: &[u8]) -> Option<Vec<u8>> {
        if raw_key.first() != Some(&self.id) || raw_value.first().is_none_or(|v| *v >= V::VERSION) {
            return None;
        }
        decode::<V>(raw_value).ok().map(|v| crate::encode(&v))
    }

    pub(crate) fn raw_key(&self, key: &K) -> Vec<u8> {
        let mut raw = Vec::with_capacity(17);
        raw.push(self.id);
        raw.extend_from_slice(&key.encode_key());
        raw
    }

    /// The end of a range that runs to `to`, or to the end of the table.
    fn end(&self, to: Option<&K>) -> Bound<Vec<u8>> {
        match to {
            Some(to) => Bound::Excluded(self.raw_key(to)),
            None => crate::overlay::prefix_end(&[self.id]),
        }
    }

    /// A raw record of this table, its table id first, as a typed key and value.
    fn decode_record(&self, (k, v): (Vec<u8>, Vec<u8>)) -> Result<(K, V), StoreError> {
        let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
        Ok((key, self.decode_value(&v)?))
    }

    fn decode_value(&self, raw: &[u8]) -> Result<V, StoreError> {
        decode(raw).map_err(|source| StoreError::Corrupt { table: self.name, source })
    }

    /// Reads one record (sees every write already applied, flushed, folded or not).
    pub fn get(&self, store: &Store, key: &K) -> Result<Option<V>, StoreError> {
        match store.get_raw(&self.raw_key(key))? {
            Some(raw) => Ok(Some(self.decode_value(&raw)?)),
            None => Ok(None),
        }
    }

    /// Reads one record as it will be once `batch` is applied: the batch's own write of `key` if it
    /// has one, else the store's. For a replicated state machine that applies many entries in one
    /// atomic batch, each entry seeing the ones before it.
    pub fn get_through(&self, store: &Store, batch: &Batch, key: &K) -> Result<Option<V>, StoreError> {
        let raw = self.raw_key(key);
        match batch.lookup(&raw) {
            Some(Some(value)) => Ok(Some(self.decode_value(value)?)),
            Some(None) => Ok(None),
            None => self.get(store, key),
        }
    }

    /// Queues an insert/overwrite in `batch`.
    pub fn put(&self, batch: &mut Batch, key: &K, value: &V) {
        batch.insert(self.raw_key(key), encode(value));
    }

    /// Queues a removal in `batch`.
    pub fn remove(&self, batch: &mut Batch, key: &K) {
        batch.remove(self.raw_key(key));
    }

    /// Inserts `value` only if `key` is absent, at once (compare-and-swap); returns the record
    /// already there otherwise. The caller still awaits [`Store::sync`] before acknowledging.
    pub fn insert_if_absent(&self, store: &Store, key: &K, value: &V) -> Result<Option<V>, StoreError> {
        match store.compare_and_swap(self.raw_key(key), None, Some(encode(value)))? {
            Ok(()) => Ok(None),
            Err(Some(raw)) => Ok(Some(self.decode_value(&raw)?)),
            Err(None) => Ok(None),
        }
    }

    /// Removes `key` only if it still holds `expected` (compare-and-swap); true if removed.
    pub fn remove_if_unchanged(&self, store: &Store, key: &K, expected: &V) -> Result<bool, StoreError> {
        Ok(store.compare_and_swap(self.raw_key(key), Some(encode(expected)), None)?.is_ok())
    }

    /// All records in key order. A record that does not decode is an error, never skipped silently.
    pub fn iter<'a>(&'a self, store: &Store) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        self.iter_from(store, None)
    }

    /// Records with key < `end` (in byte order), in key order: e.g. everything expired by now.
    pub fn iter_before<'a>(&'a self, store: &Store, end: &K) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        self.iter_from(store, Some(self.raw_key(end)))
    }

    /// Records whose encoded key starts with `prefix` (e.g. every `"<order>/..."` key), in key order.
    pub fn iter_prefix<'a>(
        &'a self,
        store: &Store,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        let mut start = vec![self.id];
        start.extend_from_slice(prefix);
        store.scan_prefix(&start, false).map(move |item| self.decode_record(item?))
    }

    /// Records with `from` <= key < `to` (or to the end of the table), in key order: e.g. a slice of a log.
    pub fn iter_range<'a>(
        &'a self,
        store: &Store,
        from: &K,
        to: Option<&K>,
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        store.scan(Bound::Included(self.raw_key(from)), self.end(to), false).map(move |item| self.decode_record(item?))
    }

    /// Keys with `from` <= key < `to` (or to the end of the table), in key order, without decoding
    /// the values (sled still reads them): e.g. the entries of a log to purge.
    pub fn keys_range<'a>(
        &'a self,
        store: &Store,
        from: &K,
        to: Option<&K>,
    ) -> impl Iterator<Item = Result<K, StoreError>> + 'a {
        store.scan(Bound::Included(self.raw_key(from)), self.end(to), false).map(move |item| {
            let (k, _) = item?;
            K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })
        })
    }

    /// Records with `from` <= key < `to`, greatest key first (e.g. newest first by a UUIDv7 id).
    pub fn iter_range_rev<'a>(
        &'a self,
        store: &Store,
        from: &K,
        to: &K,
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        store
            .scan(Bound::Included(self.raw_key(from)), Bound::Excluded(self.raw_key(to)), true)
            .map(move |item| self.decode_record(item?))
    }

    /// The record with the greatest key, if any.
    pub fn last(&self, store: &Store) -> Result<Option<(K, V)>, StoreError> {
        store.scan_prefix(&[self.id], true).next().map(|item| self.decode_record(item?)).transpose()
    }

    fn iter_from<'a>(
        &'a self,
        store: &Store,
        end: Option<Vec<u8>>,
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        let end = end.map_or_else(|| crate::overlay::prefix_end(&[self.id]), Bound::Excluded);
        store.scan(Bound::Included(vec![self.id]), end, false).map(move |item| self.decode_record(item?))
    }

    /// Number of records (a full scan of this table's keys; for tests and start-up figures).
    pub fn len(&self, store: &Store) -> usize {
        store.scan_prefix(&[self.id], false).count()
    }

    pub fn is_empty(&self, store: &Store) -> bool {
        self.len(store) == 0
    }
}
