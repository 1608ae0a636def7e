//! The store's write-behind memory: what replicated applies wrote that sled has not been given yet.
//!
//! Why it exists: an apply is cheap, its sled writes are not. Each sled `insert`/`remove` costs
//! 10-15 µs of CPU (copy-on-write nodes, its log reservation), and an order's applies rewrite the
//! same few records again and again: the order record at every step of its saga, an outbox entry
//! written and removed a few milliseconds later, the group's applied id and time at every apply.
//! Held here, those writes cost a map insert each, and sled is given only the last value of each
//! key, a few thousand keys at a time ("a fold", `Store::fold`), in one atomic batch.
//!
//! Nothing here needs to survive a crash: the Raft log is the durability. What an apply wrote
//! reaches sled in the same atomic fold as the applied id that covers it, so after a crash the
//! tables and the applied id still agree and the group applies the rest again from its log; and
//! the log is purged only after `Store::sync`, which folds first.
//!
//! Pure: a map, and the merge of an ordered view of it with an ordered iterator over the store.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// A key's pending value: `None` is a removal.
pub(crate) type Pending = Option<Vec<u8>>;

/// One raw key and its pending value, as [`Overlay::range`] lists them.
pub(crate) type PendingRecord = (Vec<u8>, Pending);

/// Writes not yet in sled: the `active` map takes new ones; `folding` is the map a fold is
/// writing to sled right now (still read from, until sled has all of it).
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    active: BTreeMap<Vec<u8>, Pending>,
    folding: Option<Arc<BTreeMap<Vec<u8>, Pending>>>,
    /// Writes taken into `active` since it was last frozen: hot keys rewritten over and over keep
    /// `active` small, and this bounds how many applies a crash can make the group replay.
    writes: u64,
}

/// When a fold is due: after this many distinct keys, or this many writes, in `active`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FoldAt {
    pub keys: usize,
    pub writes: u64,
}

impl Overlay {
    pub(crate) fn write(&mut self, key: Vec<u8>, value: Pending) {
        self.active.insert(key, value);
        self.writes += 1;
    }

    /// The pending value of `key`: `Some(None)` if it is pending removal, `None` if nothing is
    /// pending (sled has its latest value).
    pub(crate) fn lookup(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        if let Some(v) = self.active.get(key) {
            return Some(v.as_deref());
        }
        self.folding.as_ref().and_then(|f| f.get(key)).map(|v| v.as_deref())
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub(crate) fn keys(&self) -> usize {
        self.active.len()
    }

    pub(crate) fn due(&self, at: FoldAt) -> bool {
        self.active.len() >= at.keys || self.writes >= at.writes
    }

    /// Moves `active` to `folding` for a fold to write, and returns it; `None` when nothing is
    /// pending. The caller (one fold at a time) calls [`Overlay::folded`] once sled holds it all.
    pub(crate) fn freeze(&mut self) -> Option<Arc<BTreeMap<Vec<u8>, Pending>>> {
        debug_assert!(self.folding.is_none(), "two folds at once");
        if self.active.is_empty() {
            self.writes = 0;
            return None;
        }
        let frozen = Arc::new(std::mem::take(&mut self.active));
        self.folding = Some(frozen.clone());
        self.writes = 0;
        Some(frozen)
    }

    /// Sled holds everything the fold took: reads go to sled for those keys from now on.
    pub(crate) fn folded(&mut self) {
        self.folding = None;
    }

    /// Every pending key within `(lo, hi)`, in key order (`active` over `folding`); none for an
    /// empty or inverted range (as sled answers one, where a `BTreeMap` would panic).
    pub(crate) fn range(&self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Vec<PendingRecord> {
        if is_empty_range(lo, hi) {
            return Vec::new();
        }
        let mut out: BTreeMap<&[u8], &Pending> = BTreeMap::new();
        if let Some(f) = &self.folding {
            out.extend(f.range::<[u8], _>((lo, hi)).map(|(k, v)| (k.as_slice(), v)));
        }
        out.extend(self.active.range::<[u8], _>((lo, hi)).map(|(k, v)| (k.as_slice(), v)));
        out.into_iter().map(|(k, v)| (k.to_vec(), v.clone())).collect()
    }
}

/// A range no key can be in: its start above its end, or one key excluded at both ends.
fn is_empty_range(lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> bool {
    match (lo, hi) {
        (Bound::Excluded(l), Bound::Excluded(h)) => l >= h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) => l > h,
        _ => false,
    }
}

/// The end of the range of every key that starts with `prefix`: the prefix with its last byte
/// below 0xFF incremented (and what follows it dropped); unbounded if every byte is 0xFF.
pub(crate) fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// An ordered iterator over the store's records merged with the pending writes of the same range
/// (in the same order): a pending value replaces the store's, a pending removal hides it.
pub(crate) struct Merge<I, E> {
    store: I,
    /// The store's next record, taken from `store` and not yet yielded.
    held: Option<(Vec<u8>, Vec<u8>)>,
    pending: std::iter::Peekable<std::vec::IntoIter<PendingRecord>>,
    /// Greatest key first.
    rev: bool,
    done: bool,
    _e: std::marker::PhantomData<fn() -> E>,
}

impl<I, E> Merge<I, E>
where
    I: Iterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
{
    /// `pending` must be in the order `store` yields (ascending, or descending if `rev`).
    pub(crate) fn new(store: I, pending: Vec<PendingRecord>, rev: bool) -> Self {
        Self { store, held: None, pending: pending.into_iter().peekable(), rev, done: false, _e: Default::default() }
    }
}

impl<I, E> Iterator for Merge<I, E>
where
    I: Iterator<Item = Result<(Vec<u8>, Vec<u8>), E>>,
{
    type Item = Result<(Vec<u8>, Vec<u8>), E>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.held.is_none() && !self.done {
                match self.store.next() {
                    Some(Ok(record)) => self.held = Some(record),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => self.done = true,
                }
            }
            let order = match (&self.held, self.pending.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((stored, _)), Some((pending, _))) => {
                    let o = stored.cmp(pending);
                    if self.rev {
                        o.reverse()
                    } else {
                        o
                    }
                }
            };
            if order == Ordering::Less {
                return self.held.take().map(Ok);
            }
            if order == Ordering::Equal {
                // The pending write replaces (or removes) the stored record.
                self.held = None;
            }
            if let Some((key, Some(value))) = self.pending.next() {
                return Some(Ok((key, value)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    fn merged(
        stored: &Model,
        overlay: &Overlay,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        // sled answers an inverted range with nothing, as the overlay does.
        let mut from_store: Vec<_> = if is_empty_range(lo, hi) {
            Vec::new()
        } else {
            stored.range::<[u8], _>((lo, hi)).map(|(k, v)| Ok::<_, ()>((k.clone(), v.clone()))).collect()
        };
        let mut pending = overlay.range(lo, hi);
        if rev {
            from_store.reverse();
            pending.reverse();
        }
        Merge::new(from_store.into_iter(), pending, rev).collect::<Result<_, _>>().unwrap()
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2), Just(0xFF)], 0..3)
    }

    proptest! {
        /// Writes spread over the store, a folding map and the active map read back exactly as
        /// one map that took every write in order would, forwards and backwards, in any range.
        #[test]
        fn reads_see_the_latest_write_of_each_key(
            writes in prop::collection::vec((key(), prop::option::of(any::<u8>()), 0u8..3), 0..60),
            lo in key(), hi in key(), rev in any::<bool>(),
        ) {
            let (mut stored, mut overlay, mut model) = (Model::new(), Overlay::default(), Model::new());
            for (k, v, at) in writes {
                let v = v.map(|b| vec![b]);
                match &v { Some(v) => { model.insert(k.clone(), v.clone()); } None => { model.remove(&k); } }
                match at {
                    // Straight into the store (what a fold did earlier).
                    0 if overlay.folding.is_none() && overlay.is_empty() => {
                        match v { Some(v) => { stored.insert(k, v); } None => { stored.remove(&k); } }
                    }
                    // Freeze what is pending, then write to the new active map.
                    1 if overlay.folding.is_none() => { overlay.freeze(); overlay.write(k, v); }
                    _ => overlay.write(k, v),
                }
            }
            for k in model.keys().chain(stored.keys()) {
                let seen = match overlay.lookup(k) { Some(v) => v.map(<[u8]>::to_vec), None => stored.get(k).cloned() };
                prop_assert_eq!(seen, model.get(k).cloned());
            }
            let (lo, hi) = (Bound::Included(lo.as_slice()), Bound::Excluded(hi.as_slice()));
            let mut want: Vec<_> = if !is_empty_range(lo, hi) {
                model.range::<[u8], _>((lo, hi)).map(|(k, v)| (k.clone(), v.clone())).collect()
            } else {
                Vec::new()
            };
            if rev { want.reverse(); }
            prop_assert_eq!(merged(&stored, &overlay, lo, hi, rev), want);
            // A fold that writes the frozen map into the store changes nothing a reader sees.
            if let Some(frozen) = overlay.folding.clone() {
                for (k, v) in frozen.iter() {
                    match v { Some(v) => { stored.insert(k.clone(), v.clone()); } None => { stored.remove(k); } }
                }
                overlay.folded();
                let all = merged(&stored, &overlay, Bound::Unbounded, Bound::Unbounded, false);
                prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn a_store_error_is_yielded_once_and_ends_the_merge() {
        let store = vec![Ok((vec![1], vec![1])), Err("broken"), Ok((vec![3], vec![3]))];
        let got: Vec<_> = Merge::new(store.into_iter(), vec![(vec![2], Some(vec![2]))], false).collect();
        assert_eq!(got, vec![Ok((vec![1], vec![1])), Err("broken"), Ok((vec![2], vec![2]))]);
    }

    #[test]
    fn the_end_of_a_prefix_is_its_successor() {
        assert_eq!(prefix_end(&[1, 2]), Bound::Excluded(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Bound::Excluded(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), Bound::Unbounded);
        assert_eq!(prefix_end(&[]), Bound::Unbounded);
    }

    #[test]
    fn a_fold_is_due_after_enough_keys_or_enough_writes() {
        let at = FoldAt { keys: 2, writes: 3 };
        let mut o = Overlay::default();
        o.write(vec![1], None);
        assert!(!o.due(at));
        o.write(vec![1], Some(vec![1]));
        o.write(vec![1], Some(vec![2]));
        assert!(o.due(at), "three writes of one hot key");
        assert!(o.freeze().is_some());
        assert!(!o.due(at));
        o.write(vec![1], None);
        o.write(vec![2], None);
        assert!(o.due(at), "two keys");
    }
}
