//! A typed view of one table: a one-byte prefix in the store's tree, typed keys, versioned values.

use std::marker::PhantomData;

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

    fn decode_value(&self, raw: &[u8]) -> Result<V, StoreError> {
        decode(raw).map_err(|source| StoreError::Corrupt { table: self.name, source })
    }

    /// Reads one record (sees every write already applied, flushed or not).
    pub fn get(&self, store: &Store, key: &K) -> Result<Option<V>, StoreError> {
        match store.tree().get(self.raw_key(key))? {
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
        let raw = (self.raw_key(key), encode(value));
        match store.write_op(1, || Ok(store.tree().compare_and_swap(raw.0, None as Option<&[u8]>, Some(raw.1))?))? {
            Ok(()) => Ok(None),
            Err(cas) => match cas.current {
                Some(raw) => Ok(Some(self.decode_value(&raw)?)),
                None => Ok(None),
            },
        }
    }

    /// Removes `key` only if it still holds `expected` (compare-and-swap); true if removed.
    pub fn remove_if_unchanged(&self, store: &Store, key: &K, expected: &V) -> Result<bool, StoreError> {
        let raw = (self.raw_key(key), encode(expected));
        let swapped =
            store.write_op(1, || Ok(store.tree().compare_and_swap(raw.0, Some(raw.1), None as Option<&[u8]>)?))?;
        Ok(swapped.is_ok())
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
        store.tree().scan_prefix(start).map(move |item| {
            let (k, v) = item?;
            let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
            Ok((key, self.decode_value(&v)?))
        })
    }

    /// Records with `from` <= key < `to` (or to the end of the table), in key order: e.g. a slice of a log.
    pub fn iter_range<'a>(
        &'a self,
        store: &Store,
        from: &K,
        to: Option<&K>,
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        let start = self.raw_key(from);
        let end = match to {
            Some(to) => self.raw_key(to),
            None => vec![self.id + 1],
        };
        store.tree().range(start..end).map(move |item| {
            let (k, v) = item?;
            let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
            Ok((key, self.decode_value(&v)?))
        })
    }

    /// Keys with `from` <= key < `to` (or to the end of the table), in key order, without decoding
    /// the values (sled still reads them): e.g. the entries of a log to purge.
    pub fn keys_range<'a>(
        &'a self,
        store: &Store,
        from: &K,
        to: Option<&K>,
    ) -> impl Iterator<Item = Result<K, StoreError>> + 'a {
        let start = self.raw_key(from);
        let end = match to {
            Some(to) => self.raw_key(to),
            None => vec![self.id + 1],
        };
        store.tree().range(start..end).keys().map(move |k| {
            let k = k?;
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
        store.tree().range(self.raw_key(from)..self.raw_key(to)).rev().map(move |item| {
            let (k, v) = item?;
            let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
            Ok((key, self.decode_value(&v)?))
        })
    }

    /// The record with the greatest key, if any.
    pub fn last(&self, store: &Store) -> Result<Option<(K, V)>, StoreError> {
        match store.tree().scan_prefix([self.id]).next_back() {
            Some(item) => {
                let (k, v) = item?;
                let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
                Ok(Some((key, self.decode_value(&v)?)))
            }
            None => Ok(None),
        }
    }

    fn iter_from<'a>(
        &'a self,
        store: &Store,
        end: Option<Vec<u8>>,
    ) -> impl Iterator<Item = Result<(K, V), StoreError>> + 'a {
        let start = vec![self.id];
        let range = match end {
            Some(end) => store.tree().range(start..end),
            None => store.tree().scan_prefix(start),
        };
        range.map(move |item| {
            let (k, v) = item?;
            let key = K::decode_key(&k[1..]).ok_or(StoreError::BadKey { table: self.name })?;
            Ok((key, self.decode_value(&v)?))
        })
    }

    /// Number of records (a full scan of this table's keys; for tests and start-up figures).
    pub fn len(&self, store: &Store) -> usize {
        store.tree().scan_prefix([self.id]).keys().count()
    }

    pub fn is_empty(&self, store: &Store) -> bool {
        self.len(store) == 0
    }
}
