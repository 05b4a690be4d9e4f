//! The relay's bounded memory of recent objects.
//!
//! Objects enter as they arrive verified and written to the node's tree, compressed exactly as
//! the upstream sent them; the oldest leave when the bytes held would pass the cap. A reader
//! asking for an object learns whether it is in memory, only on disk (arrived, since evicted),
//! or absent: not wanted by this node at all, or not arrived within the reader's wait. A reader
//! waits on a condition, never on a queue: nothing here grows with the number of readers.

use si_proto::Digest;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where an object is, as [`Buffer::get`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// In memory: the uncompressed length and the compressed bytes.
    Memory(u32, Arc<[u8]>),
    /// Arrived and written to the tree, no longer in memory.
    Disk,
    /// Not here: this node does not want it, or it did not arrive within the wait.
    Absent,
}

#[derive(Default)]
struct State {
    mem: HashMap<Digest, (u32, Arc<[u8]>)>,
    order: VecDeque<Digest>,
    bytes: usize,
    have: HashSet<Digest>,
    /// What this node will fetch (None until its manifest is known).
    wanted: Option<HashSet<Digest>>,
    /// No more objects will arrive (the node's fetch ended, well or not).
    closed: bool,
}

pub struct Buffer {
    cap: usize,
    state: Mutex<State>,
    arrived: Condvar,
}

impl Buffer {
    /// A buffer that holds at most `cap` bytes of compressed objects.
    pub fn new(cap: usize) -> Buffer {
        Buffer {
            cap,
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the state itself stays consistent (every
        // update is one step), so carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The objects this node will have once its fetch is done: a reader asking for another
    /// one is told Absent at once.
    pub fn expect(&self, wanted: impl IntoIterator<Item = Digest>) {
        let mut s = self.lock();
        s.wanted = Some(wanted.into_iter().collect());
        drop(s);
        self.arrived.notify_all();
    }

    /// An object arrived, was verified and is written to the tree.
    pub fn put(&self, d: Digest, raw_len: u32, z: &[u8]) {
        let mut s = self.lock();
        if !s.have.insert(d) {
            return;
        }
        if z.len() <= self.cap {
            while s.bytes + z.len() > self.cap {
                let Some(old) = s.order.pop_front() else {
                    break;
                };
                if let Some((_, b)) = s.mem.remove(&old) {
                    s.bytes -= b.len();
                }
            }
            s.bytes += z.len();
            s.order.push_back(d);
            s.mem.insert(d, (raw_len, Arc::from(z)));
        }
        drop(s);
        self.arrived.notify_all();
    }

    /// Objects already in the node's tree (a finished node serving its installed version):
    /// found on disk, never in memory.
    pub fn on_disk(&self, ds: impl IntoIterator<Item = Digest>) {
        self.lock().have.extend(ds);
        self.arrived.notify_all();
    }

    /// No more objects will arrive: waiting readers are answered now.
    pub fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
    }

    /// Where `d` is, waiting up to `wait` for it to arrive when this node still expects it.
    pub fn get(&self, d: &Digest, wait: Duration) -> Found {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        loop {
            if s.have.contains(d) {
                return match s.mem.get(d) {
                    Some((raw, z)) => Found::Memory(*raw, z.clone()),
                    None => Found::Disk,
                };
            }
            if s.closed || s.wanted.as_ref().is_some_and(|w| !w.contains(d)) {
                return Found::Absent;
            }
            let now = Instant::now();
            if now >= deadline {
                return Found::Absent;
            }
            s = self
                .arrived
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The object if it is in memory now (no waiting).
    pub fn in_memory(&self, d: &Digest) -> Option<(u32, Arc<[u8]>)> {
        self.lock().mem.get(d).map(|(raw, z)| (*raw, z.clone()))
    }

    /// Compressed bytes held in memory now.
    pub fn held(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> Digest {
        Digest::of(&[i])
    }

    /// The bytes held never pass the cap: the oldest object leaves first and is then found on
    /// disk; an object larger than the whole cap is never held but is on disk.
    #[test]
    fn bounded_and_evicts_oldest_to_disk() {
        let b = Buffer::new(1000);
        b.expect((0..10).map(d));
        for i in 0..4 {
            b.put(d(i), 400, &[i; 300]);
            assert!(b.held() <= 1000, "{}", b.held());
        }
        assert_eq!(b.held(), 900);
        assert_eq!(b.get(&d(0), Duration::ZERO), Found::Disk);
        assert_eq!(
            b.get(&d(3), Duration::ZERO),
            Found::Memory(400, Arc::from(&[3u8; 300][..]))
        );
        b.put(d(5), 5000, &[5; 1001]);
        assert_eq!(b.held(), 900);
        assert_eq!(b.get(&d(5), Duration::ZERO), Found::Disk);
        // A second arrival of the same object changes nothing.
        b.put(d(3), 400, &[3; 300]);
        assert_eq!(b.held(), 900);
    }

    /// A reader waits for an object this node still expects and gets it when it arrives; an
    /// object the node does not want, or one that does not come within the wait, is Absent.
    #[test]
    fn waits_for_what_is_expected_and_no_longer() {
        let b = Arc::new(Buffer::new(1 << 20));
        // Before the manifest is known, a reader waits too.
        let t = Instant::now();
        assert_eq!(b.get(&d(1), Duration::from_millis(200)), Found::Absent);
        assert!(t.elapsed() >= Duration::from_millis(200));
        b.expect([d(1), d(2)]);
        let t = Instant::now();
        assert_eq!(b.get(&d(9), Duration::from_secs(30)), Found::Absent);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let reader = {
            let b = b.clone();
            std::thread::spawn(move || b.get(&d(1), Duration::from_secs(30)))
        };
        // The reader is waiting (it cannot have the object before it is put).
        b.put(d(1), 3, b"abc");
        assert_eq!(
            reader.join().unwrap(),
            Found::Memory(3, Arc::from(&b"abc"[..]))
        );
        // Closed: a reader waiting for d(2) is answered at once.
        let reader = {
            let b = b.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                (b.get(&d(2), Duration::from_secs(30)), t.elapsed())
            })
        };
        b.close();
        let (found, took) = reader.join().unwrap();
        assert_eq!(found, Found::Absent);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
