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
    /// Count an IPv6 client by its /64 ([`PerAddress::by_client`]).
    by_64: bool,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One address's slot; given back on drop.
#[derive(Debug)]
pub struct AddressSlot {
    caps: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// Per address (an IPv4-mapped IPv6 address counts as its IPv4): for the cluster port, whose
    /// peers may well share one IPv6 /64 on their LAN.
    pub fn new(limit: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress { limit, by_64: false, held: Mutex::new(HashMap::new()) })
    }

    /// Per client, an IPv6 one counted by its /64 (one host is handed a whole /64 and may use any
    /// address in it): for the API's edge.
    pub fn by_client(limit: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress { limit, by_64: true, held: Mutex::new(HashMap::new()) })
    }

    /// A slot for `ip`, or `None` if it (its client, see the constructors) holds `limit` already.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let ip = client_of(ip, self.by_64);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot { caps: self.clone(), ip })
    }

    /// Slots `ip` (its client, as [`PerAddress::try_take`] counts) holds now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&client_of(ip, self.by_64)).copied().unwrap_or(0)
    }
}

/// The client an address stands for: IPv4 as is, IPv4-mapped IPv6 as its IPv4, other IPv6 as is
/// or (`by_64`) by its /64 prefix.
fn client_of(ip: IpAddr, by_64: bool) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if !by_64 => ip,
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
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

    #[test]
    fn an_api_client_on_ipv6_counts_by_its_64_a_peer_by_its_address_a_mapped_ipv4_as_itself() {
        let caps = PerAddress::by_client(1);
        let _a = caps.try_take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(caps.try_take("2001:db8:1:2::ffff:7".parse().unwrap()).is_none(), "same /64");
        assert!(caps.try_take("2001:db8:1:3::1".parse().unwrap()).is_some(), "another /64");
        let _b = caps.try_take("10.0.0.9".parse().unwrap()).unwrap();
        assert!(caps.try_take("::ffff:10.0.0.9".parse().unwrap()).is_none(), "the same IPv4 client");
        // The cluster port's caps count each address: peers on one LAN share a /64.
        let peers = PerAddress::new(1);
        let _n2 = peers.try_take("2001:db8:1:2::2".parse().unwrap()).unwrap();
        assert!(peers.try_take("2001:db8:1:2::3".parse().unwrap()).is_some(), "another peer, same /64");
    }
}
