//! Per-address caps: how many of a bounded resource (open API connections, cluster handshakes in
//! progress) one client address may hold at once.
//!
//! A global cap alone lets one flooding address take every slot, so that a real peer restarting
//! meanwhile, or a real client, finds none. With a per-address cap a single address holds at most
//! its share, and the rest stays for everyone else. (A flood from many addresses still meets the
//! global cap; that is what it is for.)
//!
//! [`PerAddress::try_take`] gives an [`AddressSlot`] that gives its place back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Slots held per address, with at most `limit` each.
#[derive(Debug)]
pub struct PerAddress {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One address's slot; given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    caps: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    pub fn new(limit: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress { limit, held: Mutex::new(HashMap::new()) })
    }

    /// A slot for `ip`, or `None` if it holds `limit` already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot { caps: self.clone(), ip })
    }

    /// Slots `ip` holds now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.caps.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            // Forget an address that holds nothing: the map stays as small as the live set.
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_share_and_gives_it_back() {
        let caps = PerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let s1 = caps.try_take(a).unwrap();
        let s2 = caps.try_take(a).unwrap();
        assert!(caps.try_take(a).is_none(), "a third slot for the same address");
        let other = caps.try_take(b);
        assert!(other.is_some(), "another address is not held up");
        drop(s1);
        assert_eq!(caps.held_by(a), 1);
        let _s3 = caps.try_take(a).unwrap();
        drop(s2);
        drop(other);
        assert_eq!(caps.held_by(b), 0);
        assert_eq!(caps.held.lock().unwrap().len(), 1, "addresses that hold nothing are forgotten");
    }
}
