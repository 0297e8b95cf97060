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
//!   hydration never overwrites a write, and two partial writes never both copy;
//! - in memory the limit never lies past the volume's size, and blocks past the
//!   limit are never read from the snapshot: bytes the copy did not take from the
//!   snapshot never show its data. In the file the limit may lie past the size after
//!   a crash (see [`Volume::extend_copy`](super::Volume::extend_copy)); the next
//!   open lowers it to the size.
//!
//! The limit falls with a shrink, and rises only when a copy by reference of the
//! same snapshot continues past the volume's end ([`Volume::extend_copy`](super::Volume::extend_copy)):
//! the kernel cuts one `copy_file_range` into requests of at most 4 GiB − 4 KiB, so
//! a larger copy arrives as several. Everything that writes the data file or hydrates
//! holds the *limit lock* shared; a resize and a rise hold it exclusively, so none of
//! them sees the size and the limit change under it. Locks are taken in this order:
//! the limit lock, blocks' hydration locks, the volume's freeze barrier.
//!
//! Background hydration walks the snapshot once, in windows of [`LIST_WINDOW`]
//! blocks: it asks [`SnapshotBlocks::data_blocks`] for each window once, marks the
//! window's other blocks present at once (they are zeros: nothing to copy), and
//! copies its data blocks a few at a time (consecutive ones with one write, up to
//! [`HYDRATE_RUN`]), keeping its place between batches (a
//! cursor in [`Source`]). The work is linear in the snapshot's size.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use crate::storage::{Storage, StorageFile};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{
    Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, lock, read, write,
};

use super::dirty::DirtyMap;

/// Blocks of the snapshot background hydration lists at a time (a multiple of 64:
/// windows start on a word of the present map).
pub const LIST_WINDOW: u64 = 16 * 1024;

/// Most blocks background hydration copies with one write.
const HYDRATE_RUN: usize = 16;

/// Locks over hydration; a block always uses the same one.
const SHARDS: usize = 64;

/// The blocks of the snapshot a volume was made from: all a volume needs of it.
///
/// Both methods may be called from several threads at once, and only for blocks
/// within the snapshot's size. An error fails the read or write that needed the block
/// (`EIO`) or pauses background hydration; nothing is marked present on an error.
pub trait SnapshotBlocks: Send + Sync {
    /// Reads block `block` of the snapshot into `buf` (one block long). A block the
    /// snapshot never wrote reads as zeros.
    fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The blocks within `blocks` that may hold anything but zeros, in increasing
    /// order, each once.
    ///
    /// A block left out must read as zeros: background hydration marks it present
    /// without reading it. Listing a block of zeros is allowed (it is read, and
    /// nothing is written). Hydration asks for consecutive windows of at most
    /// [`LIST_WINDOW`] blocks, each about once, so the cost of a call should follow
    /// the size of its window (or the entries in it), not the snapshot's.
    fn data_blocks(&self, blocks: Range<u64>) -> io::Result<Vec<u64>>;

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
    /// Shared by whatever writes the data file or hydrates, exclusive to resize the
    /// volume or raise the limit (see the module documentation).
    limit_lock: RwLock<()>,
    /// Times the limit was raised: hydration that finds every block present checks
    /// that none was raised since it last looked.
    raises: AtomicU64,
    /// Every block below the limit is present: the snapshot is no longer read.
    hydrated: AtomicBool,
    /// Where background hydration stands.
    cursor: Mutex<Cursor>,
}

/// Background hydration's place: the blocks below `next` were listed; those of
/// them holding data and not copied yet wait in `listed`, in order.
#[derive(Default)]
struct Cursor {
    next: u64,
    listed: VecDeque<u64>,
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
            limit_lock: RwLock::new(()),
            raises: AtomicU64::new(0),
            hydrated: AtomicBool::new(false),
            cursor: Mutex::new(Cursor::default()),
        }
    }

    pub fn is_hydrated(&self) -> bool {
        self.hydrated.load(Ordering::Acquire)
    }

    pub fn set_hydrated(&self) {
        self.hydrated.store(true, Ordering::Release);
    }

    /// The volume reads blocks from the snapshot again (the limit is about to rise
    /// past blocks it does not hold). Its record must say so first.
    pub(super) fn clear_hydrated(&self) {
        self.hydrated.store(false, Ordering::Release);
    }

    /// The limit lock, shared: the limit does not rise, nor does the volume's size
    /// change by a resize, while it is held.
    pub fn limit_shared(&self) -> RwLockReadGuard<'_, ()> {
        read(&self.limit_lock)
    }

    /// The limit lock, exclusive: nothing writes the data file or hydrates.
    pub(super) fn limit_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        write(&self.limit_lock)
    }

    /// Times the limit was raised so far.
    pub fn raises(&self) -> u64 {
        self.raises.load(Ordering::Acquire)
    }

    pub(super) fn note_raised(&self) {
        self.raises.fetch_add(1, Ordering::AcqRel);
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
    /// volume's size) and marks it present. The caller holds the limit lock (shared
    /// or exclusive) and the block's lock.
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
    pub fn hydrate(&self, data: &S::File, block: u64) -> io::Result<()> {
        let _limit = self.limit_shared();
        let (_guards, missing) = self.lock_missing(block, block);
        if missing.is_empty() {
            return Ok(());
        }
        // The size under the block's lock: the bytes past it are not copied.
        self.hydrate_locked(data, block, data.len()?)
    }

    /// Hydrates the blocks of `first..=last` that are not present (background
    /// hydration): each stretch of consecutive missing blocks is read from the
    /// snapshot and written with one request (blocks of zeros left out: their region
    /// stays a hole), then marked present, all under the blocks' locks.
    pub fn hydrate_run(&self, data: &S::File, first: u64, last: u64) -> io::Result<()> {
        let _limit = self.limit_shared();
        let (_guards, missing) = self.lock_missing(first, last);
        if missing.is_empty() {
            return Ok(());
        }
        // The size under the blocks' locks: the bytes past it are not copied.
        let size_bytes = data.len()?;
        let bs = self.block_size as usize;
        let mut buf = vec![0u8; missing.len() * bs];
        let mut i = 0;
        while i < missing.len() {
            let mut j = i + 1;
            while j < missing.len() && missing[j] == missing[j - 1] + 1 {
                j += 1;
            }
            let (start_block, end_block) = (missing[i], missing[j - 1]);
            let start = start_block * self.block_size;
            let end = ((end_block + 1) * self.block_size).min(size_bytes);
            if end > start {
                let len = (end - start) as usize;
                let stretch = &mut buf[..(j - i) * bs];
                for (k, block) in (start_block..=end_block).enumerate() {
                    self.blocks
                        .read_block(block, &mut stretch[k * bs..(k + 1) * bs])?;
                }
                // Write the non-zero blocks, consecutive ones together.
                let mut from: Option<usize> = None;
                let mut at = 0;
                while at < len {
                    let to = (at + bs).min(len);
                    let zero = stretch[at..to].iter().all(|&b| b == 0);
                    match (zero, from) {
                        (false, None) => from = Some(at),
                        (true, Some(f)) => {
                            data.write_all_at(&stretch[f..at], start + f as u64)?;
                            from = None;
                        }
                        _ => {}
                    }
                    at = to;
                }
                if let Some(f) = from {
                    data.write_all_at(&stretch[f..len], start + f as u64)?;
                }
            }
            self.present.mark(start_block, end_block)?;
            i = j;
        }
        Ok(())
    }

    /// Background hydration: copies up to `budget` blocks still missing, stopping
    /// early when `yield_now` says volume I/O wants the disk, and goes on from there
    /// at the next call. Returns whether every block below the limit is present.
    ///
    /// Each window of [`LIST_WINDOW`] blocks is listed once (see the module
    /// documentation). Should a block below the cursor be missing when it reaches
    /// the limit (the limit fell below it, then rose again), the walk starts over.
    pub fn hydrate_some(
        &self,
        data: &S::File,
        budget: usize,
        yield_now: impl Fn() -> bool,
    ) -> io::Result<bool> {
        let mut cursor = lock(&self.cursor);
        let mut done = 0;
        let mut rewound = false;
        loop {
            while let Some(&block) = cursor.listed.front() {
                if done >= budget || yield_now() {
                    return Ok(false);
                }
                // Fetches ahead when the snapshot is read from a bucket (else nothing).
                self.blocks.prefetch(cursor.listed.make_contiguous());
                // The blocks listed right after it, as one write.
                let mut run = 1;
                while run < HYDRATE_RUN
                    && done + run < budget
                    && cursor.listed.get(run) == Some(&(block + run as u64))
                {
                    run += 1;
                }
                self.hydrate_run(data, block, block + run as u64 - 1)?;
                cursor.listed.drain(..run);
                done += run;
            }
            let limit = self.limit_blocks();
            if cursor.next >= limit {
                if self.all_present() {
                    return Ok(true);
                }
                if rewound {
                    return Ok(false);
                }
                rewound = true;
                cursor.next = 0;
                continue;
            }
            if done >= budget || yield_now() {
                return Ok(false);
            }
            let window_end = ((cursor.next / LIST_WINDOW + 1) * LIST_WINDOW).min(limit);
            let window = cursor.next..window_end;
            let listed = self.blocks.data_blocks(window.clone())?;
            self.mark_zero_blocks(window.clone(), &listed)?;
            cursor.listed.extend(listed);
            cursor.next = window.end;
        }
    }

    /// Marks the blocks of `window` that are still missing and are not in `listed`
    /// (the window's data blocks, in order) present, without copying anything: they
    /// are zeros in the snapshot. A word of the present map at a time, one write per
    /// run of such blocks.
    fn mark_zero_blocks(&self, window: Range<u64>, listed: &[u64]) -> io::Result<()> {
        let mut first = window.start;
        while first < window.end {
            let last = (first | 63).min(window.end - 1);
            let _limit = self.limit_shared();
            let (_guards, missing) = self.lock_missing(first, last);
            let zero = missing
                .into_iter()
                .filter(|b| listed.binary_search(b).is_err());
            let mut run: Option<(u64, u64)> = None;
            for block in zero {
                run = match run {
                    Some((start, end)) if end + 1 == block => Some((start, block)),
                    Some((start, end)) => {
                        self.present.mark(start, end)?;
                        Some((block, block))
                    }
                    None => Some((block, block)),
                };
            }
            if let Some((start, end)) = run {
                self.present.mark(start, end)?;
            }
            first = last + 1;
        }
        Ok(())
    }

    /// Whether every block below the limit is present.
    pub fn all_present(&self) -> bool {
        let limit = self.limit_blocks();
        self.present.count_in(0..limit) == limit
    }

    /// Blocks present so far and blocks in all (below the limit).
    pub fn progress(&self) -> (u64, u64) {
        let limit = self.limit_blocks();
        if self.is_hydrated() {
            return (limit, limit);
        }
        (self.present.count_in(0..limit), limit)
    }
}
