//! Live volume data: one sparse file per volume, read and written in place.
//!
//! The hot path is a positioned read or write of `volumes/<id>.raw`, plus one atomic
//! bit test per block touched. Every change goes through [`Volume::modify`], which
//! keeps the two invariants snapshots rely on:
//! 1. a changed block's bit is in the dirty map *file* before its bytes reach the data
//!    file (see [`dirty`]);
//! 2. while a snapshot is being captured, the pages it still needs are preserved
//!    before their bytes change (see [`freeze`]).
//!
//! The [`Epoch`] lock is the freeze barrier: changes hold it shared; a snapshot's
//! freeze holds it exclusively for the few microseconds it takes to swap dirty maps.

pub mod bitmap;
pub mod dirty;
pub mod freeze;
#[cfg(all(test, feature = "shuttle"))]
mod shuttle_tests;
pub mod source;

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use crate::layout::{CaptureFile, Layout, VolumeFile};
use crate::namespace::{SnapshotId, VolumeId};
use crate::storage::{Allocate, FileTimes, OpenOptions, Storage, StorageFile};
use crate::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, read, write};

use dirty::{DirtyMap, DirtyMapError, NEVER_SHRUNK};
use freeze::{Freeze, LiveRead};
use source::Source;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {op} at offset {offset}: {source}")]
    Io {
        volume: VolumeId,
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("volume {volume}: size {requested} exceeds max_volume_size {max}")]
    TooLarge {
        volume: VolumeId,
        requested: u64,
        max: u64,
    },
    #[error("volume {volume}: a snapshot of it is still being captured")]
    CaptureInProgress { volume: VolumeId },
    #[error("volume {volume}: unsupported fallocate mode {mode:#x}")]
    UnsupportedMode { volume: VolumeId, mode: i32 },
    #[error("volume {volume}: its data file is missing")]
    DataMissing { volume: VolumeId },
    #[error("volume {volume}: {source}")]
    DirtyMap {
        volume: VolumeId,
        #[source]
        source: DirtyMapError,
    },
}

pub type VolumeResult<T> = Result<T, VolumeError>;

/// Which blocks a freeze captures besides those marked dirty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescan {
    /// Every block: the dirty map cannot be trusted (after a host crash).
    All,
    /// Blocks cut off by a shrink since the last snapshot, below the largest size any
    /// earlier snapshot of the volume had (past that, nothing older can show through).
    ShrunkBelow(u64),
}

/// What changes go through: the current dirty map and the capture in progress, if any.
pub struct Epoch<S: Storage> {
    pub dirty: DirtyMap<S>,
    pub freeze: Option<Arc<Freeze<S>>>,
}

pub struct Volume<S: Storage> {
    pub id: VolumeId,
    pub block_size: u64,
    max_size: u64,
    storage: S,
    layout: Layout,
    data: S::File,
    epoch: RwLock<Epoch<S>>,
    /// The snapshot a volume made from one reads its unwritten blocks from.
    source: OnceLock<Source<S>>,
}

/// The `fallocate(2)` modes FUSE forwards.
const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;

impl<S: Storage> Volume<S> {
    /// Creates the files of a new volume `id`: an empty data file and an empty dirty
    /// map (created whole), with the directory synced so both names are durable.
    pub fn create(
        storage: &S,
        layout: &Layout,
        id: VolumeId,
        block_size: u64,
        max_size: u64,
    ) -> VolumeResult<Volume<S>> {
        let io_err = |source| VolumeError::Io {
            volume: id,
            op: "create",
            offset: 0,
            source,
        };
        let data_path = layout.volume_file(id, VolumeFile::Data);
        storage
            .open(&data_path, OpenOptions::TRUNCATE)
            .map_err(io_err)?;
        DirtyMap::create(
            storage,
            &layout.volume_file(id, VolumeFile::Dirty),
            NEVER_SHRUNK,
        )
        .map_err(io_err)?;
        Volume::open(storage, layout, id, block_size, max_size)
    }

    /// Opens the files of volume `id`. Missing or damaged files are errors: nothing
    /// is recreated, so nothing is invented.
    pub fn open(
        storage: &S,
        layout: &Layout,
        id: VolumeId,
        block_size: u64,
        max_size: u64,
    ) -> VolumeResult<Volume<S>> {
        let data = match storage.open(
            &layout.volume_file(id, VolumeFile::Data),
            OpenOptions::EXISTING.direct(),
        ) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::DataMissing { volume: id });
            }
            Err(source) => {
                return Err(VolumeError::Io {
                    volume: id,
                    op: "open",
                    offset: 0,
                    source,
                });
            }
        };
        let dirty = DirtyMap::open(storage, &layout.volume_file(id, VolumeFile::Dirty))
            .map_err(|source| VolumeError::DirtyMap { volume: id, source })?;
        Ok(Volume {
            id,
            block_size,
            max_size,
            storage: storage.clone(),
            layout: layout.clone(),
            data,
            epoch: RwLock::new(Epoch {
                dirty,
                freeze: None,
            }),
            source: OnceLock::new(),
        })
    }

    /// Makes this volume, opened after a restart, read its unwritten blocks from a
    /// snapshot again. A source limit past the size (a shrink a crash cut short
    /// before the limit followed it, or a copy's extension cut short before the size
    /// followed the limit: see [`Volume::extend_copy`]) is lowered to the size here.
    ///
    /// The dirty map's low-water size is lowered to the limit too, when past it:
    /// after a power loss the data file's size and the dirty map may be durable
    /// with a copy's extension while the present map is not (its limit is the old
    /// one), and blocks past the limit, reading zeros, must be compared at the next
    /// capture, not taken for the snapshot's.
    pub fn reattach_source(&self, source: Source<S>) -> VolumeResult<()> {
        let size = self.size()?;
        let limit = source.present.low_water().min(size);
        if self.epoch_shared().dirty.low_water() > limit {
            // Blocks past the limit read zeros: the next capture must compare them
            // with the snapshot's lineage, as after any shrink.
            self.epoch_shared()
                .dirty
                .note_shrink(limit)
                .map_err(self.io_err("record shrink", limit))?;
        }
        if source.present.low_water() > size {
            source
                .present
                .note_shrink(size)
                .map_err(self.io_err("record shrink", size))?;
        }
        self.attach_source(source)
    }

    fn attach_source(&self, source: Source<S>) -> VolumeResult<()> {
        if self.source.set(source).is_err() {
            return Err(VolumeError::Io {
                volume: self.id,
                op: "attach source",
                offset: 0,
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "already made from a snapshot",
                ),
            });
        }
        Ok(())
    }

    /// Makes a blank volume (size 0; that it was never snapshotted, the caller
    /// checks) read its unwritten blocks from a snapshot, up to the source limit its
    /// present map holds (the end of the part shared): `commit` records that
    /// durably, then the source is attached. All under the freeze barrier, so no
    /// write races the change. Returns false, doing nothing, if the volume is not
    /// blank. Blocks past the limit that the volume grows into read zeros, where the
    /// snapshot may hold data: the next capture re-examines them (the dirty map's
    /// low-water size is lowered to the limit).
    pub fn become_copy_of<E: From<VolumeError>>(
        &self,
        source: Source<S>,
        commit: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let epoch = self.epoch_exclusive();
        if self.size()? != 0 || self.source.get().is_some() {
            return Ok(false);
        }
        // Before the commit: a crash between the two only costs the first capture a
        // wider re-examination.
        epoch
            .dirty
            .note_shrink(source.present.low_water())
            .map_err(self.io_err("record change", 0))?;
        commit()?;
        drop(epoch);
        self.attach_source(source)?;
        Ok(true)
    }

    /// Continues this volume's copy by reference of its snapshot: bytes `[from, to)`
    /// become the snapshot's, read from it like the rest, without a byte read or
    /// written. Only when the copy ends at `from` now (the volume's size and its
    /// source limit, on a block boundary) and no block past it is present; returns
    /// false, doing nothing, otherwise. `to` is a block boundary or the snapshot's
    /// end (the caller checks).
    ///
    /// `unhydrate` runs only if the volume had hydrated everything below `from` (and
    /// no longer reads the snapshot): it must record durably that the volume reads
    /// it again. `base_is_source`: the volume's next capture is incremental against
    /// that same snapshot, so blocks `[from, to)` are unchanged since it.
    ///
    /// Steps, under the limit lock and the freeze barrier (no write, hydration,
    /// resize or freeze runs meanwhile), and what a `kill -9` after each leaves:
    /// 1. `unhydrate`, if needed: the copy as it was, the hydrator finishes it again;
    /// 2. the present map's limit raised to `to`, in its file: a limit past the size,
    ///    which the next open lowers to the size ([`Volume::reattach_source`]): the
    ///    copy as it was;
    /// 3. if nothing was captured since the copy was made and the dirty map's
    ///    low-water size is `from`, that raised to `to` (blocks `[from, to)` need no
    ///    re-examination: they are the snapshot's): the same, also lowered at the
    ///    next open;
    /// 4. the data file's size set to `to`: the copy up to `to`.
    ///
    /// The limit rises before the size in memory too: a read meanwhile stops at the
    /// old size. None of it is synced (like a write): after a power loss the size may
    /// be an older one (the limit is lowered to it) or, if synced without the present
    /// map, `to` with the limit still `from`: the blocks past `from` then read zeros,
    /// never snapshot data the copy did not take, and the next open lowers the dirty
    /// map's low-water size to the limit whatever it says, so the next capture
    /// compares those blocks instead of taking them for the snapshot's.
    pub fn extend_copy<E: From<VolumeError>>(
        &self,
        from: u64,
        to: u64,
        base_is_source: bool,
        unhydrate: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        self.check_size(to)?;
        let Some(source) = self.source.get() else {
            return Ok(false);
        };
        let bs = self.block_size;
        let _limit = source.limit_exclusive();
        let epoch = self.epoch_exclusive();
        let (first, end_block) = (from / bs, to.div_ceil(bs));
        let continues = to > from
            && from.is_multiple_of(bs)
            && self.size()? == from
            && source.present.low_water() == from
            && source.present.count_in(first..end_block) == 0;
        if !continues {
            return Ok(false);
        }
        if source.is_hydrated() {
            if source.present.count_in(0..first) != first {
                return Ok(false);
            }
            unhydrate()?;
            source.clear_hydrated();
        }
        let undo = |e: io::Error, op| {
            // Lowering is always safe; the next open lowers them anyway.
            let _ = source.present.note_shrink(from);
            let _ = epoch.dirty.note_shrink(from);
            VolumeError::Io {
                volume: self.id,
                op,
                offset: from,
                source: e,
            }
        };
        source
            .present
            .raise_low_water(to)
            .map_err(|e| undo(e, "raise the source limit"))?;
        if base_is_source && epoch.freeze.is_none() && epoch.dirty.low_water() == from {
            epoch
                .dirty
                .raise_low_water(to)
                .map_err(|e| undo(e, "record change"))?;
        }
        self.data.set_len(to).map_err(|e| undo(e, "truncate"))?;
        source.note_raised();
        Ok(true)
    }

    /// The snapshot source, while blocks are still read from it.
    pub fn active_source(&self) -> Option<&Source<S>> {
        self.source.get().filter(|s| !s.is_hydrated())
    }

    /// The snapshot source, hydrated or not.
    pub fn source(&self) -> Option<&Source<S>> {
        self.source.get()
    }

    fn io_err(&self, op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> VolumeError {
        let volume = self.id;
        move |source| VolumeError::Io {
            volume,
            op,
            offset,
            source,
        }
    }

    pub fn data_file(&self) -> &S::File {
        &self.data
    }

    fn epoch_shared(&self) -> RwLockReadGuard<'_, Epoch<S>> {
        read(&self.epoch)
    }

    /// The freeze barrier: waits for changes in flight, blocks new ones while held.
    pub fn epoch_exclusive(&self) -> RwLockWriteGuard<'_, Epoch<S>> {
        write(&self.epoch)
    }

    pub fn size(&self) -> VolumeResult<u64> {
        self.data.len().map_err(self.io_err("stat", 0))
    }

    /// Bytes of storage the data file really occupies.
    pub fn allocated_bytes(&self) -> VolumeResult<u64> {
        self.data.allocated_bytes().map_err(self.io_err("stat", 0))
    }

    pub fn times(&self) -> VolumeResult<FileTimes> {
        self.data.times().map_err(self.io_err("stat", 0))
    }

    pub fn set_times(
        &self,
        accessed: Option<SystemTime>,
        modified: Option<SystemTime>,
    ) -> VolumeResult<()> {
        self.data
            .set_times(accessed, modified)
            .map_err(self.io_err("set times", 0))
    }

    /// Reads at `offset`; returns fewer bytes only at the end of the volume.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> VolumeResult<usize> {
        self.read_live(buf, offset)
            .map_err(self.io_err("read", offset))
    }

    /// Reads a volume made from a snapshot: runs of present blocks from the data file,
    /// the others from the snapshot.
    fn read_through(&self, source: &Source<S>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.data.len()?;
        let end = offset.saturating_add(buf.len() as u64).min(size);
        if offset >= end {
            return Ok(0);
        }
        let bs = self.block_size;
        let mut block_buf = Vec::new();
        let mut pos = offset;
        while pos < end {
            let own = source.is_own(pos / bs);
            let mut run_end = ((pos / bs + 1) * bs).min(end);
            while run_end < end && source.is_own(run_end / bs) == own {
                run_end = (run_end + bs).min(end);
            }
            let at = (pos - offset) as usize;
            let piece = &mut buf[at..at + (run_end - pos) as usize];
            if own {
                let n = self.data.read_at(piece, pos)?;
                piece[n..].fill(0);
            } else {
                if block_buf.is_empty() {
                    // `vec!` of zeros allocates zeroed pages at once, where
                    // `resize` writes every byte (slow in unoptimised builds).
                    block_buf = vec![0; bs as usize];
                }
                let mut filled = 0;
                while filled < piece.len() {
                    let at_pos = pos + filled as u64;
                    let block = at_pos / bs;
                    source.blocks.read_block(block, &mut block_buf)?;
                    let within = (at_pos - block * bs) as usize;
                    let take = (bs as usize - within).min(piece.len() - filled);
                    piece[filled..filled + take].copy_from_slice(&block_buf[within..within + take]);
                    filled += take;
                }
            }
            pos = run_end;
        }
        Ok((end - offset) as usize)
    }

    /// Runs `change` over bytes `[start, end)`, which it rewrites. In a volume made
    /// from a snapshot, blocks not present yet are first hydrated where `change`
    /// covers them only in part, and marked present after it where it covers them
    /// whole (their regions are punched back to holes if it fails).
    fn own_blocks<T>(
        &self,
        start: u64,
        end: u64,
        change: impl FnOnce() -> VolumeResult<T>,
    ) -> VolumeResult<T> {
        // Even a hydrated volume's: a copy's extension may make it read its snapshot
        // again, and must not race a write past its end.
        let Some(source) = self.source.get() else {
            return change();
        };
        let _limit = source.limit_shared();
        self.own_blocks_held(source, start, end, change)
    }

    /// [`Volume::own_blocks`], the caller holding `source`'s limit lock.
    fn own_blocks_held<T>(
        &self,
        source: &Source<S>,
        start: u64,
        end: u64,
        change: impl FnOnce() -> VolumeResult<T>,
    ) -> VolumeResult<T> {
        if source.is_hydrated() || end <= start {
            return change();
        }
        let bs = self.block_size;
        let (guards, missing) = source.lock_missing(start / bs, (end - 1) / bs);
        if missing.is_empty() {
            return change();
        }
        let size = self.size()?;
        let mut whole = Vec::new();
        for block in missing {
            if start <= block * bs && end >= (block + 1) * bs {
                whole.push(block);
            } else {
                source
                    .hydrate_locked(&self.data, block, size)
                    .map_err(self.io_err("hydrate", block * bs))?;
            }
        }
        let result = change();
        for &block in &whole {
            let marked = match &result {
                Ok(_) => source
                    .present
                    .mark(block, block)
                    .map_err(self.io_err("record hydration", block * bs)),
                Err(_) => self
                    .data
                    .allocate(Allocate::PunchHole, block * bs, bs)
                    .map_err(self.io_err("undo a failed write", block * bs)),
            };
            if let Err(e) = marked {
                return Err(result.err().unwrap_or(e));
            }
        }
        drop(guards);
        result
    }

    fn check_size(&self, end: u64) -> VolumeResult<()> {
        if end > self.max_size {
            return Err(VolumeError::TooLarge {
                volume: self.id,
                requested: end,
                max: self.max_size,
            });
        }
        Ok(())
    }

    /// Runs `change` on bytes `[start, end)` after recording the blocks as dirty and
    /// taking them for a capture in progress.
    fn modify<T>(
        &self,
        start: u64,
        end: u64,
        change: impl FnOnce(&S::File) -> VolumeResult<T>,
    ) -> VolumeResult<T> {
        let epoch = self.epoch_shared();
        if end > start {
            let (first, last) = (start / self.block_size, (end - 1) / self.block_size);
            if let Some(freeze) = &epoch.freeze {
                freeze.protect(self, start, end);
            }
            epoch
                .dirty
                .mark(first, last)
                .map_err(self.io_err("record change", start))?;
        }
        change(&self.data)
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> VolumeResult<usize> {
        let end = offset.saturating_add(data.len() as u64);
        self.check_size(end)?;
        self.own_blocks(offset, end, || {
            self.modify(offset, end, |file| {
                file.write_all_at(data, offset)
                    .map_err(self.io_err("write", offset))?;
                Ok(data.len())
            })
        })
    }

    /// Grows or shrinks the volume. Shrinking frees the tail; growing exposes zeros.
    /// A volume made from a snapshot hydrates the block its new end falls in first,
    /// and after the cut stops reading anything past it from the snapshot (a crash
    /// between the two is completed at the next open).
    pub fn set_size(&self, new_size: u64) -> VolumeResult<()> {
        self.check_size(new_size)?;
        let Some(source) = self.source.get() else {
            return self.resize(new_size);
        };
        // No hydration, write or copy extension while the size and the limit change.
        let _limit = source.limit_exclusive();
        let old_size = self.size()?;
        if new_size < old_size && !new_size.is_multiple_of(self.block_size) {
            self.own_blocks_held(source, new_size, new_size + 1, || self.resize(new_size))?;
        } else {
            self.resize(new_size)?;
        }
        // Hydrated or not: a copy's extension starts from the size.
        if new_size < source.present.low_water() {
            source
                .present
                .note_shrink(new_size)
                .map_err(self.io_err("record shrink", new_size))?;
        }
        Ok(())
    }

    fn resize(&self, new_size: u64) -> VolumeResult<()> {
        let epoch = self.epoch_shared();
        let old_size = self.size()?;
        if new_size < old_size {
            let bs = self.block_size;
            if let Some(freeze) = &epoch.freeze {
                freeze.protect(self, new_size, old_size);
            }
            // The block holding the new end keeps a zeroed tail: a change like any
            // other. Blocks wholly past it are covered by the low-water size.
            if !new_size.is_multiple_of(bs) {
                let block = new_size / bs;
                epoch
                    .dirty
                    .mark(block, block)
                    .map_err(self.io_err("record change", new_size))?;
            }
            epoch
                .dirty
                .note_shrink(new_size)
                .map_err(self.io_err("record change", new_size))?;
        }
        self.data
            .set_len(new_size)
            .map_err(self.io_err("truncate", new_size))
    }

    /// `fallocate(2)` with the modes FUSE forwards: plain allocation (optionally
    /// keeping the size), punching holes and zeroing ranges. Any range reaching past
    /// `max_volume_size` is refused, whether or not the size would change.
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> VolumeResult<()> {
        let end = offset.saturating_add(len);
        let how = match mode {
            0 => Allocate::Reserve { keep_size: false },
            KEEP => Allocate::Reserve { keep_size: true },
            PUNCH => Allocate::PunchHole,
            ZERO => Allocate::ZeroRange { keep_size: false },
            m if m == ZERO | KEEP => Allocate::ZeroRange { keep_size: true },
            _ => {
                return Err(VolumeError::UnsupportedMode {
                    volume: self.id,
                    mode,
                });
            }
        };
        if how != Allocate::PunchHole {
            self.check_size(end)?;
        }
        let apply = |file: &S::File| {
            file.allocate(how, offset, len)
                .map_err(self.io_err("fallocate", offset))
        };
        match how {
            Allocate::Reserve { .. } => {
                // It may grow the volume: not while a copy's extension runs.
                let _limit = self.source.get().map(Source::limit_shared);
                apply(&self.data)
            }
            Allocate::PunchHole | Allocate::ZeroRange { .. } => {
                let size = self.size()?;
                let end = end.min(size.max(offset));
                self.own_blocks(offset, end, || self.modify(offset, end, apply))
            }
        }
    }

    /// `SEEK_DATA`: the first data at or after `offset`, `None` if only holes follow.
    /// A volume still reading from its snapshot reports no holes (allowed: holes are
    /// an optimisation, and the data file's holes do not show where its data is).
    pub fn seek_data(&self, offset: u64) -> VolumeResult<Option<u64>> {
        if self.active_source().is_some() {
            return Ok((offset < self.size()?).then_some(offset));
        }
        self.data
            .seek_data(offset)
            .map_err(self.io_err("seek", offset))
    }

    /// `SEEK_HOLE`: the first hole at or after `offset` (the end of the volume at worst).
    pub fn seek_hole(&self, offset: u64) -> VolumeResult<u64> {
        if self.active_source().is_some() {
            return Ok(self.size()?.max(offset));
        }
        self.data
            .seek_hole(offset)
            .map_err(self.io_err("seek", offset))
    }

    /// Makes acknowledged writes durable: the data, then which blocks it holds.
    pub fn sync(&self, data_only: bool) -> VolumeResult<()> {
        let result = if data_only {
            self.data.sync_data()
        } else {
            self.data.sync_all()
        };
        result.map_err(self.io_err("fsync", 0))?;
        if let Some(source) = self.active_source() {
            source.present.sync().map_err(self.io_err("fsync", 0))?;
        }
        Ok(())
    }

    /// Freezes the volume for snapshot `snapshot`: the dirty map becomes the capture
    /// set (renamed into `captures/`), and a fresh empty map takes its place.
    ///
    /// Files, in order (docs/FORMAT.md has what a crash at each step leaves):
    /// 1. outside the barrier: `volumes/<id>.dirty.new` written whole and synced, and
    ///    an empty `captures/<id>-<snap>.cow`;
    /// 2. under the barrier: `<id>.dirty` renamed to `captures/<id>-<snap>.set`, then
    ///    `<id>.dirty.new` renamed to `<id>.dirty`;
    /// 3. after it: both directories synced.
    pub fn freeze(&self, snapshot: SnapshotId, rescan: Rescan) -> VolumeResult<Arc<Freeze<S>>> {
        let prepared = self.prepare_freeze(snapshot)?;
        let freeze = self.freeze_under_barrier(&mut self.epoch_exclusive(), prepared, rescan)?;
        self.sync_freeze_dirs()?;
        Ok(freeze)
    }

    /// Freezes several volumes at one instant, for a crash-consistent set of
    /// snapshots: every volume's barrier is held (taken in volume id order) while each
    /// is frozen, so a write that completed before another began — whichever volumes
    /// they went to — is never missing from a snapshot that holds the later one. On
    /// an error no volume stays frozen.
    pub fn freeze_together(
        volumes: &[(&Volume<S>, SnapshotId, Rescan)],
    ) -> VolumeResult<Vec<Arc<Freeze<S>>>> {
        let mut prepared = Vec::with_capacity(volumes.len());
        for (volume, snapshot, _) in volumes {
            prepared.push(Some(volume.prepare_freeze(*snapshot)?));
        }
        let mut order: Vec<usize> = (0..volumes.len()).collect();
        order.sort_by_key(|&i| volumes[i].0.id);
        let mut frozen: Vec<Option<Arc<Freeze<S>>>> = vec![None; volumes.len()];
        let failure = {
            let mut barriers: Vec<_> = order
                .iter()
                .map(|&i| (i, volumes[i].0.epoch_exclusive()))
                .collect();
            let mut failure = None;
            for (i, epoch) in &mut barriers {
                let (volume, _, rescan) = &volumes[*i];
                let prepared = prepared[*i].take().expect("prepared once");
                match volume.freeze_under_barrier(epoch, prepared, *rescan) {
                    Ok(freeze) => frozen[*i] = Some(freeze),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            failure
        };
        let result = match failure {
            Some(e) => Err(e),
            None => volumes
                .iter()
                .try_for_each(|(volume, _, _)| volume.sync_freeze_dirs()),
        };
        if let Err(e) = result {
            for (i, freeze) in frozen.iter().enumerate() {
                if freeze.is_some() {
                    volumes[i].0.thaw(true)?;
                }
            }
            return Err(e);
        }
        Ok(frozen.into_iter().flatten().collect())
    }

    /// The files of a freeze, made before the barrier (step 1 of [`Volume::freeze`]).
    fn prepare_freeze(&self, snapshot: SnapshotId) -> VolumeResult<PreparedFreeze<S>> {
        let cow_path = self
            .layout
            .capture_file(self.id, snapshot, CaptureFile::Cow);
        let fresh_path = self.layout.volume_file(self.id, VolumeFile::DirtyNew);
        let cow = self
            .storage
            .open(&cow_path, OpenOptions::TRUNCATE)
            .map_err(self.io_err("freeze", 0))?;
        let fresh = DirtyMap::create_unpublished(&self.storage, &fresh_path, self.size()?)
            .map_err(self.io_err("freeze", 0))?;
        Ok(PreparedFreeze {
            snapshot,
            cow,
            cow_path,
            fresh,
        })
    }

    /// Step 2 of [`Volume::freeze`], with the barrier held.
    fn freeze_under_barrier(
        &self,
        epoch: &mut Epoch<S>,
        prepared: PreparedFreeze<S>,
        rescan: Rescan,
    ) -> VolumeResult<Arc<Freeze<S>>> {
        let PreparedFreeze {
            snapshot,
            cow,
            cow_path,
            fresh,
        } = prepared;
        let set_path = self
            .layout
            .capture_file(self.id, snapshot, CaptureFile::Set);
        let dirty_path = self.layout.volume_file(self.id, VolumeFile::Dirty);
        if epoch.freeze.is_some() {
            return Err(VolumeError::CaptureInProgress { volume: self.id });
        }
        let size = self.size()?;
        fresh.note_shrink(size).map_err(self.io_err("freeze", 0))?;
        let reexamine = self.reexamine_range(&epoch.dirty, size, rescan);
        epoch
            .dirty
            .rename(&self.storage, &set_path)
            .map_err(self.io_err("freeze", 0))?;
        if let Err(e) = fresh.rename(&self.storage, &dirty_path) {
            // Put the map back: the volume must keep tracking changes.
            let _ = epoch.dirty.rename(&self.storage, &dirty_path);
            return Err(self.io_err("freeze", 0)(e));
        }
        let captured = std::mem::replace(&mut epoch.dirty, fresh);
        let freeze = Arc::new(Freeze::new(
            captured,
            reexamine,
            size,
            self.block_size,
            cow,
            &cow_path,
        ));
        epoch.freeze = Some(freeze.clone());
        Ok(freeze)
    }

    /// Step 3 of [`Volume::freeze`].
    fn sync_freeze_dirs(&self) -> VolumeResult<()> {
        for dir in [self.layout.volumes_dir(), self.layout.captures_dir()] {
            self.storage
                .sync_dir(&dir)
                .map_err(self.io_err("freeze", 0))?;
        }
        Ok(())
    }

    /// Puts back the freeze of snapshot `snapshot`'s capture that a `kill -9`
    /// interrupted, from its capture set and preservation file (see `freeze`), before
    /// the volume takes any write. `done`: blocks whose entries are committed.
    pub fn resume_freeze(
        &self,
        snapshot: SnapshotId,
        reexamine: std::ops::Range<u64>,
        size_bytes: u64,
        done: impl IntoIterator<Item = u64>,
    ) -> VolumeResult<Arc<Freeze<S>>> {
        let set_path = self
            .layout
            .capture_file(self.id, snapshot, CaptureFile::Set);
        let cow_path = self
            .layout
            .capture_file(self.id, snapshot, CaptureFile::Cow);
        let set = DirtyMap::open(&self.storage, &set_path).map_err(|e| VolumeError::Io {
            volume: self.id,
            op: "resume",
            offset: 0,
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let cow = self
            .storage
            .open(&cow_path, OpenOptions::EXISTING)
            .map_err(self.io_err("resume", 0))?;
        let freeze = Arc::new(
            Freeze::reopen(
                set,
                reexamine,
                size_bytes,
                self.block_size,
                cow,
                &cow_path,
                done,
            )
            .map_err(self.io_err("resume", 0))?,
        );
        let mut epoch = self.epoch_exclusive();
        if epoch.freeze.is_some() {
            return Err(VolumeError::CaptureInProgress { volume: self.id });
        }
        epoch.freeze = Some(freeze.clone());
        Ok(freeze)
    }

    /// The freeze of the capture in progress, if any.
    pub fn active_freeze(&self) -> Option<Arc<Freeze<S>>> {
        self.epoch_shared().freeze.clone()
    }

    /// Reads `block` as `freeze` shows it, holding off the end of the capture
    /// meanwhile; `None` if that freeze is over (the capture committed every entry).
    pub fn read_frozen_block(
        &self,
        freeze: &Arc<Freeze<S>>,
        block: u64,
        buf: &mut Vec<u8>,
    ) -> Option<io::Result<()>> {
        let epoch = self.epoch_shared();
        match &epoch.freeze {
            Some(active) if Arc::ptr_eq(active, freeze) => Some(freeze.take_into(self, block, buf)),
            _ => None,
        }
    }

    fn reexamine_range(
        &self,
        dirty: &DirtyMap<S>,
        size: u64,
        rescan: Rescan,
    ) -> std::ops::Range<u64> {
        let blocks_now = size.div_ceil(self.block_size);
        match rescan {
            Rescan::All => 0..blocks_now,
            Rescan::ShrunkBelow(high_water_bytes) => {
                let low_water = dirty.low_water();
                let start = if low_water == NEVER_SHRUNK {
                    blocks_now
                } else {
                    low_water / self.block_size
                };
                let end = blocks_now.min(high_water_bytes.div_ceil(self.block_size));
                start..end.max(start)
            }
        }
    }

    /// Ends a capture. When it failed, its blocks go back into the dirty map so the
    /// next snapshot still captures every change since the last completed one.
    pub fn thaw(&self, failed: bool) -> VolumeResult<()> {
        let mut epoch = self.epoch_exclusive();
        let Some(freeze) = epoch.freeze.take() else {
            return Ok(());
        };
        if failed {
            epoch
                .dirty
                .merge(&freeze.blocks)
                .map_err(self.io_err("record change", 0))?;
            // Re-examined blocks need nothing: the merge brought the low-water size
            // back, and a full comparison stays requested until a capture completes.
        }
        Ok(())
    }

    /// Adds blocks to the dirty map (those of a capture a crash interrupted).
    pub fn absorb_dirty(&self, blocks: &DirtyMap<S>) -> VolumeResult<()> {
        self.epoch_shared()
            .dirty
            .merge(blocks)
            .map_err(self.io_err("record change", 0))
    }

    /// Number of blocks changed since the last freeze.
    pub fn dirty_blocks(&self) -> u64 {
        self.epoch_shared().dirty.count()
    }

    /// Makes the dirty map durable (before a clean stop).
    pub fn sync_dirty_map(&self) -> VolumeResult<()> {
        self.epoch_shared()
            .dirty
            .sync()
            .map_err(self.io_err("sync dirty map", 0))
    }
}

/// The files of a freeze made before its barrier.
struct PreparedFreeze<S: Storage> {
    snapshot: SnapshotId,
    cow: S::File,
    cow_path: std::path::PathBuf,
    fresh: DirtyMap<S>,
}

impl<S: Storage> LiveRead for Volume<S> {
    fn read_live(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.active_source() {
            Some(source) => self.read_through(source, buf, offset),
            None => self.data.read_at(buf, offset),
        }
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;
    use crate::storage::memory::{CrashMode, MemStorage};

    const BS: u64 = 4096;

    fn setup() -> (MemStorage, Layout) {
        let storage = MemStorage::new();
        let layout = Layout::new("/data");
        layout.create_dirs(&storage).unwrap();
        (storage, layout)
    }

    fn volume(storage: &MemStorage, layout: &Layout) -> Volume<MemStorage> {
        Volume::open(storage, layout, VolumeId(1), BS, 1 << 30).unwrap()
    }

    fn new_volume(storage: &MemStorage, layout: &Layout) -> Volume<MemStorage> {
        Volume::create(storage, layout, VolumeId(1), BS, 1 << 30).unwrap()
    }

    #[test]
    fn unaligned_writes_read_back_and_holes_are_zero() {
        let (storage, layout) = setup();
        let v = new_volume(&storage, &layout);
        v.write_at(b"hello", 10_000).unwrap();
        assert_eq!(v.size().unwrap(), 10_005);
        let mut buf = vec![1u8; 20];
        assert_eq!(v.read_at(&mut buf, 9_990).unwrap(), 15);
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(&buf[10..15], b"hello");
        assert_eq!(v.dirty_blocks(), 1);
    }

    #[test]
    fn size_limit_is_enforced_for_every_mode() {
        let (storage, layout) = setup();
        let v = new_volume(&storage, &layout);
        assert!(matches!(
            v.write_at(b"x", 1 << 30),
            Err(VolumeError::TooLarge { .. })
        ));
        assert!(matches!(
            v.write_at(b"x", 1 << 62),
            Err(VolumeError::TooLarge { .. })
        ));
        assert!(matches!(
            v.set_size((1 << 30) + 1),
            Err(VolumeError::TooLarge { .. })
        ));
        // Keeping the size does not make a range past the limit acceptable.
        for mode in [0, KEEP, ZERO, ZERO | KEEP] {
            assert!(
                matches!(
                    v.fallocate(mode, (1 << 30) - 4096, 8192),
                    Err(VolumeError::TooLarge { .. })
                ),
                "mode {mode:#x}"
            );
        }
        assert_eq!(v.allocated_bytes().unwrap(), 0);
        v.set_size(1 << 30).unwrap();
        assert_eq!(v.allocated_bytes().unwrap(), 0);
    }

    #[test]
    fn missing_files_are_reported_not_recreated() {
        let (storage, layout) = setup();
        drop(new_volume(&storage, &layout));
        storage
            .remove_file(&layout.volume_file(VolumeId(1), VolumeFile::Dirty))
            .unwrap();
        assert!(matches!(
            Volume::open(&storage, &layout, VolumeId(1), BS, 1 << 30),
            Err(VolumeError::DirtyMap { .. })
        ));
        storage
            .remove_file(&layout.volume_file(VolumeId(1), VolumeFile::Data))
            .unwrap();
        assert!(matches!(
            Volume::open(&storage, &layout, VolumeId(1), BS, 1 << 30),
            Err(VolumeError::DataMissing { .. })
        ));
        assert_eq!(
            storage
                .file_len(&layout.volume_file(VolumeId(1), VolumeFile::Data))
                .unwrap(),
            None
        );
    }

    #[test]
    fn shrink_marks_the_tail_dirty_and_punch_frees_space() {
        let (storage, layout) = setup();
        let v = new_volume(&storage, &layout);
        v.write_at(&vec![7u8; 8 * BS as usize], 0).unwrap();
        v.sync(true).unwrap();
        let freeze = v.freeze(SnapshotId(1), Rescan::ShrunkBelow(0)).unwrap();
        assert_eq!(freeze.blocks.count(), 8);
        assert!(matches!(
            v.freeze(SnapshotId(2), Rescan::ShrunkBelow(0)),
            Err(VolumeError::CaptureInProgress { .. })
        ));
        v.set_size(5 * BS).unwrap();
        v.fallocate(PUNCH, 0, 2 * BS).unwrap();
        // The frozen view still holds the old bytes of every changed block.
        for b in 0..8 {
            assert_eq!(
                freeze.take(v.data_file(), b).unwrap(),
                vec![7u8; BS as usize]
            );
        }
        v.thaw(false).unwrap();
        // The punch marked two blocks; the shrink is recorded as a low-water size.
        assert_eq!(v.dirty_blocks(), 2);
        let freeze = v
            .freeze(SnapshotId(3), Rescan::ShrunkBelow(8 * BS))
            .unwrap();
        assert_eq!(
            freeze.reexamine,
            5..5,
            "nothing to re-examine until the volume grows back"
        );
        v.thaw(true).unwrap();
        v.set_size(8 * BS).unwrap();
        let freeze = v
            .freeze(SnapshotId(4), Rescan::ShrunkBelow(8 * BS))
            .unwrap();
        assert_eq!(freeze.reexamine, 5..8);
        for b in 5..8 {
            assert_eq!(
                freeze.take(v.data_file(), b).unwrap(),
                vec![0u8; BS as usize]
            );
        }
        assert!(v.allocated_bytes().unwrap() <= 3 * BS);
        assert_eq!(v.seek_data(0).unwrap(), Some(2 * BS));
    }

    #[test]
    fn failed_capture_returns_its_blocks_to_the_dirty_map() {
        let (storage, layout) = setup();
        let v = new_volume(&storage, &layout);
        v.write_at(b"a", 0).unwrap();
        v.freeze(SnapshotId(1), Rescan::ShrunkBelow(0)).unwrap();
        v.write_at(b"b", 5 * BS).unwrap();
        v.thaw(true).unwrap();
        assert_eq!(v.dirty_blocks(), 2);
        drop(v);
        // The merged map is on disk too.
        assert_eq!(volume(&storage, &layout).dirty_blocks(), 2);
    }

    /// A snapshot whose block `b` is filled with byte `b + 1`, except block 3 (zeros).
    struct FakeSnapshot {
        reads: std::sync::atomic::AtomicU64,
    }

    impl source::SnapshotBlocks for FakeSnapshot {
        fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            buf.fill(if block == 3 { 0 } else { block as u8 + 1 });
            Ok(())
        }

        fn data_blocks(&self, blocks: std::ops::Range<u64>) -> io::Result<Vec<u64>> {
            Ok(blocks.filter(|&b| b != 3).collect())
        }
    }

    /// A volume of 6 blocks made from [`FakeSnapshot`].
    fn clone_volume(
        storage: &MemStorage,
        layout: &Layout,
    ) -> (Volume<MemStorage>, Arc<FakeSnapshot>) {
        let v = new_volume(storage, layout);
        v.set_size(6 * BS).unwrap();
        let present = DirtyMap::create(
            storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
            6 * BS,
        )
        .unwrap();
        let snapshot = Arc::new(FakeSnapshot {
            reads: std::sync::atomic::AtomicU64::new(0),
        });
        v.reattach_source(Source::new(snapshot.clone(), present, BS))
            .unwrap();
        (v, snapshot)
    }

    fn read_all(v: &Volume<MemStorage>) -> Vec<u8> {
        let mut buf = vec![0u8; v.size().unwrap() as usize];
        assert_eq!(v.read_at(&mut buf, 0).unwrap(), buf.len());
        buf
    }

    fn expected_clone() -> Vec<u8> {
        (0..6u64)
            .flat_map(|b| vec![if b == 3 { 0 } else { b as u8 + 1 }; BS as usize])
            .collect()
    }

    #[test]
    fn a_clone_reads_its_snapshot_until_written() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        assert_eq!(read_all(&v), expected_clone());
        assert_eq!(v.allocated_bytes().unwrap(), 0, "nothing copied");
        // A partial write keeps the rest of its block from the snapshot.
        v.write_at(b"xy", BS + 10).unwrap();
        let mut expected = expected_clone();
        expected[BS as usize + 10..BS as usize + 12].copy_from_slice(b"xy");
        assert_eq!(read_all(&v), expected);
        assert!(v.source().unwrap().present.is_set_in_file(1));
        drop(v);
        // After a restart, the present map says which blocks the data file holds.
        let v = volume(&storage, &layout);
        let present = DirtyMap::open(
            &storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
        )
        .unwrap();
        let snapshot = Arc::new(FakeSnapshot {
            reads: std::sync::atomic::AtomicU64::new(0),
        });
        v.reattach_source(Source::new(snapshot, present, BS))
            .unwrap();
        assert_eq!(read_all(&v), expected);
    }

    #[test]
    fn a_whole_block_write_to_a_clone_copies_nothing_first() {
        let (storage, layout) = setup();
        let (v, snapshot) = clone_volume(&storage, &layout);
        v.write_at(&vec![9u8; BS as usize], 2 * BS).unwrap();
        assert_eq!(snapshot.reads.load(std::sync::atomic::Ordering::Relaxed), 0);
        let mut expected = expected_clone();
        expected[2 * BS as usize..3 * BS as usize].fill(9);
        assert_eq!(read_all(&v), expected);
    }

    fn present_limit_in_file(storage: &MemStorage, layout: &Layout) -> u64 {
        DirtyMap::open(
            storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
        )
        .unwrap()
        .low_water()
    }

    fn not_hydrated() -> Result<(), VolumeError> {
        panic!("the volume was not hydrated")
    }

    #[test]
    fn a_copy_extends_only_from_its_end_over_blocks_it_does_not_hold() {
        let (storage, layout) = setup();
        let (v, snapshot) = clone_volume(&storage, &layout);
        v.set_size(2 * BS).unwrap();
        assert_eq!(v.active_source().unwrap().limit_blocks(), 2);
        // Not from the end, not on a block boundary, nothing to add: refused.
        for (from, to) in [(BS, 4 * BS), (2 * BS + 1, 4 * BS), (2 * BS, 2 * BS)] {
            assert!(!v.extend_copy(from, to, true, not_hydrated).unwrap());
        }
        assert_eq!(v.size().unwrap(), 2 * BS);
        assert!(v.extend_copy(2 * BS, 4 * BS, true, not_hydrated).unwrap());
        assert_eq!(read_all(&v), expected_clone()[..4 * BS as usize]);
        assert_eq!(v.allocated_bytes().unwrap(), 0, "nothing copied");
        // Read from the snapshot, blocks 0 to 3.
        assert_eq!(snapshot.reads.load(std::sync::atomic::Ordering::Relaxed), 4);
        // The limit is in the file; the dirty map's low-water size rose with it (the
        // blocks added are the snapshot's: nothing to re-examine).
        assert_eq!(present_limit_in_file(&storage, &layout), 4 * BS);
        assert_eq!(v.epoch_shared().dirty.low_water(), 4 * BS);
        assert_eq!(v.source().unwrap().raises(), 1);

        // Block 3 hydrated by a partial write, then cut off: its bit stays, and a
        // copy can no longer extend over it (the data file does not hold it now).
        v.write_at(b"x", 3 * BS).unwrap();
        v.set_size(3 * BS).unwrap();
        assert!(!v.extend_copy(3 * BS, 5 * BS, true, not_hydrated).unwrap());
        assert_eq!(v.size().unwrap(), 3 * BS);
        // Grown otherwise, it reads zeros past the cut.
        v.set_size(5 * BS).unwrap();
        let mut expected = expected_clone()[..5 * BS as usize].to_vec();
        expected[3 * BS as usize..].fill(0);
        assert_eq!(read_all(&v), expected);
    }

    #[test]
    fn a_copy_extended_during_a_capture_or_after_one_keeps_its_low_water_size() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        v.set_size(2 * BS).unwrap();
        let low_water = v.epoch_shared().dirty.low_water();
        // A capture in progress: its fresh dirty map stays as it is.
        v.freeze(SnapshotId(1), Rescan::ShrunkBelow(0)).unwrap();
        assert!(v.extend_copy(2 * BS, 3 * BS, true, not_hydrated).unwrap());
        assert_eq!(v.epoch_shared().dirty.low_water(), 2 * BS);
        v.thaw(true).unwrap();
        assert_eq!(v.epoch_shared().dirty.low_water(), low_water.min(2 * BS));
        // Incremental against something else than the snapshot: the same.
        assert!(v.extend_copy(3 * BS, 4 * BS, false, not_hydrated).unwrap());
        assert!(v.epoch_shared().dirty.low_water() <= 3 * BS);
        assert_eq!(read_all(&v), expected_clone()[..4 * BS as usize]);
        assert_eq!(present_limit_in_file(&storage, &layout), 4 * BS);
    }

    #[test]
    fn a_hydrated_copy_reads_its_snapshot_again_once_extended() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        v.set_size(2 * BS).unwrap();
        let source = v.active_source().unwrap();
        assert!(
            source
                .hydrate_some(v.data_file(), usize::MAX, || false)
                .unwrap()
        );
        source.set_hydrated();
        assert!(v.active_source().is_none());
        let mut unhydrated = 0;
        let extended = v
            .extend_copy(2 * BS, 4 * BS, true, || -> Result<(), VolumeError> {
                unhydrated += 1;
                Ok(())
            })
            .unwrap();
        assert!(extended && unhydrated == 1);
        let source = v.active_source().expect("reads its snapshot again");
        assert_eq!(source.progress(), (2, 4));
        assert_eq!(read_all(&v), expected_clone()[..4 * BS as usize]);
        assert_eq!(
            v.allocated_bytes().unwrap(),
            2 * BS,
            "only what hydration copied"
        );
    }

    #[test]
    fn a_power_loss_keeping_an_extension_s_size_but_not_its_limit_reads_and_compares_zeros() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        v.set_size(2 * BS).unwrap();
        v.sync(false).unwrap();
        v.sync_dirty_map().unwrap();
        assert!(v.extend_copy(2 * BS, 4 * BS, true, not_hydrated).unwrap());
        assert_eq!(v.epoch_shared().dirty.low_water(), 4 * BS);
        // The size and the dirty map reach the disk, the present map does not.
        v.data.sync_all().unwrap();
        v.sync_dirty_map().unwrap();
        drop(v);
        let storage = storage.restart(CrashMode::PowerLoss);
        let v = volume(&storage, &layout);
        assert_eq!(v.size().unwrap(), 4 * BS);
        let present = DirtyMap::open(
            &storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
        )
        .unwrap();
        assert_eq!(present.low_water(), 2 * BS, "the limit was not synced");
        let snapshot = Arc::new(FakeSnapshot {
            reads: std::sync::atomic::AtomicU64::new(0),
        });
        v.reattach_source(Source::new(snapshot, present, BS))
            .unwrap();
        let mut expected = expected_clone()[..4 * BS as usize].to_vec();
        expected[2 * BS as usize..].fill(0);
        assert_eq!(read_all(&v), expected);
        // The next capture compares the blocks past the limit.
        assert_eq!(v.epoch_shared().dirty.low_water(), 2 * BS);
    }

    #[test]
    fn a_shrunk_and_regrown_clone_reads_zeros_past_the_cut() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        v.set_size(2 * BS + 100).unwrap();
        v.set_size(6 * BS).unwrap();
        let mut expected = expected_clone();
        expected[2 * BS as usize + 100..].fill(0);
        assert_eq!(read_all(&v), expected);
    }

    #[test]
    fn a_freeze_of_a_clone_sees_the_snapshot_under_unwritten_blocks() {
        let (storage, layout) = setup();
        let (v, _) = clone_volume(&storage, &layout);
        v.write_at(b"a", 0).unwrap();
        let freeze = v.freeze(SnapshotId(1), Rescan::ShrunkBelow(0)).unwrap();
        // Written after the freeze, before the capture: the old bytes come from the
        // snapshot, preserved before the write.
        v.write_at(&[7u8; 100], 0).unwrap();
        let mut block = vec![1u8; BS as usize];
        block[0] = b'a';
        assert_eq!(freeze.take(&v, 0).unwrap(), block);
    }

    /// A snapshot whose every fifth block holds data (block `b` filled with `b % 251 +
    /// 1`), the rest zeros; counts what `data_blocks` is asked and lists.
    struct CountingSnapshot {
        calls: std::sync::atomic::AtomicU64,
        listed: std::sync::atomic::AtomicU64,
    }

    impl CountingSnapshot {
        fn byte(block: u64) -> u8 {
            if block.is_multiple_of(5) {
                (block % 251) as u8 + 1
            } else {
                0
            }
        }
    }

    impl source::SnapshotBlocks for CountingSnapshot {
        fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(CountingSnapshot::byte(block));
            Ok(())
        }

        fn data_blocks(&self, blocks: std::ops::Range<u64>) -> io::Result<Vec<u64>> {
            let blocks: Vec<u64> = blocks.filter(|b| b.is_multiple_of(5)).collect();
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.listed
                .fetch_add(blocks.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(blocks)
        }
    }

    #[test]
    fn hydration_lists_each_block_of_the_snapshot_once() {
        // Fault: every batch of 16 blocks listed all of the snapshot's data blocks
        // again, so hydrating a copy took time quadratic in its size.
        let (storage, layout) = setup();
        let v = Volume::create(&storage, &layout, VolumeId(1), BS, 1 << 40).unwrap();
        let blocks = 2 * source::LIST_WINDOW + 100;
        v.set_size(blocks * BS).unwrap();
        let present = DirtyMap::create(
            &storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
            blocks * BS,
        )
        .unwrap();
        let snapshot = Arc::new(CountingSnapshot {
            calls: std::sync::atomic::AtomicU64::new(0),
            listed: std::sync::atomic::AtomicU64::new(0),
        });
        v.reattach_source(Source::new(snapshot.clone(), present, BS))
            .unwrap();
        let source = v.active_source().unwrap();
        let mut steps = 0;
        while !source.hydrate_some(v.data_file(), 16, || false).unwrap() {
            steps += 1;
            assert!(steps < blocks, "hydration does not end");
        }
        let data_blocks = blocks.div_ceil(5);
        assert!(steps >= data_blocks / 16, "{steps} steps of 16 blocks");
        let listed = snapshot.listed.load(std::sync::atomic::Ordering::Relaxed);
        let calls = snapshot.calls.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "{data_blocks} data blocks in {blocks}: {calls} listings, {listed} blocks listed"
        );
        assert_eq!(listed, data_blocks, "blocks listed ({calls} listings)");
        assert_eq!(calls, blocks.div_ceil(source::LIST_WINDOW), "listings");
        assert_eq!(source.progress(), (blocks, blocks));
        // Only the data blocks were copied, and they read back.
        assert_eq!(v.allocated_bytes().unwrap(), data_blocks * BS);
        let mut buf = vec![0u8; BS as usize];
        for block in [0, 1, 5, LIST_WINDOW_LAST, blocks - 1] {
            let block = block.min(blocks - 1);
            v.data_file().read_at(&mut buf, block * BS).unwrap();
            assert!(
                buf.iter().all(|&b| b == CountingSnapshot::byte(block)),
                "block {block} in the data file"
            );
        }
    }

    const LIST_WINDOW_LAST: u64 = source::LIST_WINDOW - 1;

    /// Every block listed as data; blocks 3, 10, 17, ... read as zeros.
    struct RunSnapshot;

    impl RunSnapshot {
        fn byte(block: u64) -> u8 {
            if block % 7 == 3 {
                0
            } else {
                (block % 250) as u8 + 1
            }
        }
    }

    impl source::SnapshotBlocks for RunSnapshot {
        fn read_block(&self, block: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(RunSnapshot::byte(block));
            Ok(())
        }

        fn data_blocks(&self, blocks: std::ops::Range<u64>) -> io::Result<Vec<u64>> {
            Ok(blocks.collect())
        }
    }

    #[test]
    fn hydration_in_runs_copies_data_skips_zeros_and_present_blocks_and_stops_at_the_size() {
        let (storage, layout) = setup();
        let v = Volume::create(&storage, &layout, VolumeId(1), BS, 1 << 40).unwrap();
        // 40 blocks and a half: the last block is cut by the volume's size.
        let blocks = 41;
        let size = 40 * BS + BS / 2;
        v.set_size(size).unwrap();
        let present = DirtyMap::create(
            &storage,
            &layout.volume_file(VolumeId(1), VolumeFile::Present),
            size,
        )
        .unwrap();
        // Blocks 5 and 20 are the volume's own already (written, or hydrated before).
        for block in [5u64, 20] {
            v.data_file()
                .write_all_at(&vec![0xEE; BS as usize], block * BS)
                .unwrap();
            present.mark(block, block).unwrap();
        }
        v.reattach_source(Source::new(Arc::new(RunSnapshot), present, BS))
            .unwrap();
        let source = v.active_source().unwrap();
        let mut steps = 0;
        while !source.hydrate_some(v.data_file(), 16, || false).unwrap() {
            steps += 1;
            assert!(steps < blocks, "hydration does not end");
        }
        assert_eq!(source.progress(), (blocks, blocks));
        let mut buf = vec![0u8; BS as usize];
        for block in 0..blocks {
            let n = v.data_file().read_at(&mut buf, block * BS).unwrap();
            let want = if block == 5 || block == 20 {
                0xEE
            } else {
                RunSnapshot::byte(block)
            };
            let len = if block == blocks - 1 {
                BS as usize / 2
            } else {
                BS as usize
            };
            assert!(n >= len, "block {block}: {n} bytes");
            assert!(
                buf[..len].iter().all(|&b| b == want),
                "block {block} in the data file"
            );
        }
        assert_eq!(
            v.data_file().len().unwrap(),
            size,
            "nothing written past the size"
        );
        // Zero blocks stay holes: only the others take space.
        let zero_blocks = (0..blocks).filter(|&b| RunSnapshot::byte(b) == 0).count() as u64;
        assert!(
            v.allocated_bytes().unwrap() <= (blocks - zero_blocks) * BS,
            "{} bytes allocated",
            v.allocated_bytes().unwrap()
        );
    }

    #[test]
    fn a_freeze_moves_the_map_aside_and_puts_a_fresh_one_in_place() {
        let (storage, layout) = setup();
        let v = new_volume(&storage, &layout);
        v.write_at(b"a", 0).unwrap();
        let freeze = v.freeze(SnapshotId(9), Rescan::ShrunkBelow(0)).unwrap();
        let set = layout.capture_file(VolumeId(1), SnapshotId(9), CaptureFile::Set);
        assert_eq!(freeze.blocks.path(), set);
        assert_eq!(DirtyMap::open(&storage, &set).unwrap().count(), 1);
        let names = storage.list_dir(&layout.volumes_dir()).unwrap();
        assert_eq!(names, ["1.dirty", "1.raw"]);
        v.write_at(b"b", 3 * BS).unwrap();
        drop(v);
        assert_eq!(volume(&storage, &layout).dirty_blocks(), 1);
    }
}
