//! A cap on what one source address may hold at once (connections, transfers), shared by every
//! listener of the master: a single host cannot take every slot of a service, whatever the
//! service's global cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts what each source address holds; [`PerSource::try_take`] hands out a slot that gives
/// itself back when dropped.
#[derive(Debug)]
pub struct PerSource {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot held by one source; dropping it frees the slot.
#[derive(Debug)]
pub struct SourceSlot {
    owner: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    /// At most `max` slots per address (`0` is taken as 1: a cap of nothing would refuse all).
    pub fn new(max: usize) -> Arc<PerSource> {
        Arc::new(PerSource {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for `ip`, or `None` when it already holds `max`. IPv4-mapped IPv6 addresses count
    /// as their IPv4 address.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// What `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
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
    fn slots_are_capped_per_address_and_given_back() {
        let p = PerSource::new(2);
        let a: IpAddr = "10.213.0.5".parse().unwrap();
        let b: IpAddr = "10.213.0.6".parse().unwrap();
        let s1 = p.try_take(a).unwrap();
        let _s2 = p.try_take(a).unwrap();
        assert!(p.try_take(a).is_none());
        // The mapped form is the same host.
        assert!(p.try_take("::ffff:10.213.0.5".parse().unwrap()).is_none());
        let _t = p.try_take(b).unwrap();
        drop(s1);
        assert_eq!(p.held(a), 1);
        assert!(p.try_take(a).is_some());
        assert_eq!(p.held(a), 1, "the slot taken above was dropped at once");
    }
}
