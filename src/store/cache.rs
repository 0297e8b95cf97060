//! Bounded cache of decompressed, verified chunks, keyed by content hash.
//!
//! CLOCK (second-chance) eviction: a hit only sets a flag, so lookups stay cheap under
//! the lock; the hand sweeps slots and evicts the first one not used since its last
//! pass. Because keys are content hashes, an entry can never be stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::codec::ChunkHash;

struct Slot {
    hash: ChunkHash,
    data: Arc<Vec<u8>>,
    referenced: bool,
}

struct Clock {
    slots: Vec<Slot>,
    index: HashMap<ChunkHash, usize>,
    hand: usize,
    used_bytes: u64,
}

pub struct BlockCache {
    capacity_bytes: u64,
    inner: Mutex<Clock>,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> BlockCache {
        BlockCache {
            capacity_bytes,
            inner: Mutex::new(Clock {
                slots: Vec::new(),
                index: HashMap::new(),
                hand: 0,
                used_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clock> {
        // A panic while holding the lock cannot leave the map inconsistent with the
        // slots in a way that matters for correctness: entries are immutable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, hash: &ChunkHash) -> Option<Arc<Vec<u8>>> {
        let mut clock = self.lock();
        let idx = *clock.index.get(hash)?;
        let slot = &mut clock.slots[idx];
        slot.referenced = true;
        Some(slot.data.clone())
    }

    pub fn insert(&self, hash: ChunkHash, data: Arc<Vec<u8>>) {
        let size = data.len() as u64;
        if size > self.capacity_bytes {
            return;
        }
        let mut clock = self.lock();
        if clock.index.contains_key(&hash) {
            return;
        }
        while clock.used_bytes + size > self.capacity_bytes && !clock.slots.is_empty() {
            clock.evict_one();
        }
        clock.used_bytes += size;
        let idx = clock.slots.len();
        clock.slots.push(Slot {
            hash,
            data,
            referenced: false,
        });
        clock.index.insert(hash, idx);
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }
}

impl Clock {
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if slot.referenced {
                slot.referenced = false;
                self.hand += 1;
                continue;
            }
            let victim = self.slots.swap_remove(self.hand);
            self.index.remove(&victim.hash);
            self.used_bytes -= victim.data.len() as u64;
            if let Some(moved) = self.slots.get(self.hand) {
                self.index.insert(moved.hash, self.hand);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> (ChunkHash, Arc<Vec<u8>>) {
        let data = Arc::new(vec![n; 100]);
        (ChunkHash::of(&data), data)
    }

    #[test]
    fn stays_within_capacity_and_keeps_hot_entries() {
        let cache = BlockCache::new(300);
        let (h0, d0) = entry(0);
        cache.insert(h0, d0);
        for n in 1..10 {
            assert!(cache.get(&h0).is_some(), "hot entry evicted at {n}");
            let (h, d) = entry(n);
            cache.insert(h, d);
            assert!(cache.used_bytes() <= 300);
        }
        let (h9, _) = entry(9);
        assert_eq!(&*cache.get(&h9).unwrap(), &[9u8; 100][..]);
        let (h1, _) = entry(1);
        assert!(cache.get(&h1).is_none());
    }
}
