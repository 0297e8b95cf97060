//! Volumes made from a snapshot: a block the volume has not written (or copied) yet
//! is read from the snapshot, so the volume is usable the instant it is made.
//!
//! A *present map* (`volumes/<id>.present`, the dirty-map file format) records which
//! blocks live in the volume's own data file; its low-water size is the *source
//! limit*: blocks at or past it (beyond the snapshot's size, or cut off by a shrink
//! since) never come from the snapshot. Every other block reads from the snapshot
//! until it is *hydrated*: its snapshot contents copied into the data file, then its
//! bit set. Hydration happens on the first partial write (the untouched part must
//! hold the snapshot's bytes), and in the background.
//!
//! What stays true:
//! - the data-file region of a block that is not present is a hole, or holds exactly
//!   the snapshot's bytes (a hydration a crash cut short before its bit);
//! - a block's bit is set only after its data is in the data file, and a write that
//!   needed it is acknowledged only after the bit is in the map's file (the dirty
//!   map's rule, for the same reason: see `dirty`);
//! - hydrating a block and writing it are serialised by the block's lock, so a
//!   hydration never overwrites a write, and two partial writes never both copy.

use std::io;
use std::sync::Arc;

use crate::storage::{Storage, StorageFile};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Mutex, MutexGuard, lock};

use super::dirty::DirtyMap;

/// Locks over hydration; a block always uses the same one.
const SHARDS: usize = 64;

/// Blocks of the snapshot a volume was made from.
pub trait SnapshotBlocks: Send + Sync {
    /// Reads block `block` of the snapshot into `buf` (one block long).
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The blocks holding anything but zeros, below `limit`, in order.
    fn data_blocks(&self, limit: u64) -> io::Result<Vec<u64>>;
    /// The blocks about to be read, in order: a source that can fetch ahead (from a
    /// bucket) brings in as many of them as its memory allows. Only a hint: errors
    /// are left for the reads themselves.
    fn prefetch(&self, _blocks: &[u64]) {}
}

pub struct Source<S: Storage> {
    pub blocks: Arc<dyn SnapshotBlocks>,
    /// Blocks whose contents live in the data file.
    pub present: DirtyMap<S>,
    block_size: u64,
    locks: Vec<Mutex<()>>,
    /// Every block below the limit is present: the snapshot is no longer read.
    hydrated: AtomicBool,
    /// Every data block below this one was found present by background hydration,
    /// which looks on from here. Present blocks stay present (bits are only ever
    /// set, the limit only ever falls), so this never skips one that is not.
    hydrated_below: AtomicU64,
}

impl<S: Storage> Source<S> {
    pub fn new(
        blocks: Arc<dyn SnapshotBlocks>,
        present: DirtyMap<S>,
        block_size: u64,
    ) -> Source<S> {
        Source {
            blocks,
            present,
            block_size,
            locks: (0..SHARDS).map(|_| Mutex::new(())).collect(),
            hydrated: AtomicBool::new(false),
            hydrated_below: AtomicU64::new(0),
        }
    }

    pub fn is_hydrated(&self) -> bool {
        self.hydrated.load(Ordering::Acquire)
    }

    pub fn set_hydrated(&self) {
        self.hydrated.store(true, Ordering::Release);
    }

    /// Where background hydration looks on from (see `hydrated_below`).
    pub fn hydrated_below(&self) -> u64 {
        self.hydrated_below.load(Ordering::Acquire)
    }

    /// Notes that every data block below `block` is present.
    pub fn note_hydrated_below(&self, block: u64) {
        self.hydrated_below.fetch_max(block, Ordering::AcqRel);
    }

    /// Blocks at or past this index never come from the snapshot.
    pub fn limit_blocks(&self) -> u64 {
        self.present.low_water().div_ceil(self.block_size)
    }

    /// Whether block `block` reads from the data file (in memory: for reads).
    pub fn is_own(&self, block: u64) -> bool {
        self.is_hydrated() || block >= self.limit_blocks() || self.present.is_set(block)
    }

    /// Whether block `block` is present in the map's file: a write may then go on
    /// without its lock.
    fn is_own_in_file(&self, block: u64) -> bool {
        self.is_hydrated() || block >= self.limit_blocks() || self.present.is_set_in_file(block)
    }

    /// The locks of the blocks in `first..=last` that are not present yet, taken in
    /// shard order; returns the guards and those blocks (rechecked under the locks).
    pub fn lock_missing(&self, first: u64, last: u64) -> (Vec<MutexGuard<'_, ()>>, Vec<u64>) {
        let missing: Vec<u64> = (first..=last)
            .filter(|&b| !self.is_own_in_file(b))
            .collect();
        if missing.is_empty() {
            return (Vec::new(), missing);
        }
        let mut shards: Vec<usize> = missing
            .iter()
            .map(|b| (b % SHARDS as u64) as usize)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let guards = shards.into_iter().map(|s| lock(&self.locks[s])).collect();
        let missing = missing
            .into_iter()
            .filter(|&b| !self.is_own_in_file(b))
            .collect();
        (guards, missing)
    }

    /// Copies block `block`'s snapshot contents into `data` (up to `size_bytes`, the
    /// volume's size) and marks it present. The caller holds the block's lock.
    pub fn hydrate_locked(&self, data: &S::File, block: u64, size_bytes: u64) -> io::Result<()> {
        let start = block * self.block_size;
        let end = (start + self.block_size).min(size_bytes);
        if end > start {
            let mut buf = vec![0u8; self.block_size as usize];
            self.blocks.read_block(block, &mut buf)?;
            let len = (end - start) as usize;
            // Zeros need no copy: the region of a block not present is a hole.
            if buf[..len].iter().any(|&b| b != 0) {
                data.write_all_at(&buf[..len], start)?;
            }
        }
        self.present.mark(block, block)
    }

    /// Hydrates block `block` unless it is present (background hydration).
    pub fn hydrate(&self, data: &S::File, block: u64, size_bytes: u64) -> io::Result<()> {
        let (_guards, missing) = self.lock_missing(block, block);
        if missing.is_empty() {
            return Ok(());
        }
        self.hydrate_locked(data, block, size_bytes)
    }

    /// Marks the blocks of `words` (64-block words) that are still missing and hold
    /// zeros in the snapshot as present, without copying anything.
    pub fn mark_zero_blocks(&self, first: u64, last: u64, data_blocks: &[u64]) -> io::Result<()> {
        let (_guards, missing) = self.lock_missing(first, last);
        for block in missing {
            if data_blocks.binary_search(&block).is_err() {
                self.present.mark(block, block)?;
            }
        }
        Ok(())
    }

    /// Blocks present so far and blocks in all (below the limit).
    pub fn progress(&self) -> (u64, u64) {
        let limit = self.limit_blocks();
        if self.is_hydrated() {
            return (limit, limit);
        }
        (self.present.count().min(limit), limit)
    }
}
