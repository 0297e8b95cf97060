//! Live volume data: one sparse file per volume, read and written in place.
//!
//! The hot path is `pread`/`pwrite` on `volumes/<id>.raw`, plus one atomic bit test per
//! block touched. Every change goes through [`Volume::modify`], which keeps the two
//! invariants snapshots rely on:
//! 1. a changed block is in the dirty map before its bytes reach the data file;
//! 2. while a snapshot is being captured, the pages it still needs are preserved
//!    before their bytes change.
//!
//! The [`Epoch`] lock is the freeze barrier: changes hold it shared; a snapshot's
//! freeze holds it exclusively for the few microseconds it takes to swap dirty maps.

pub mod bitmap;
pub mod direct;
pub mod dirty;
pub mod freeze;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use direct::DirectFile;
use dirty::{DirtyMap, NEVER_SHRUNK};
use freeze::Freeze;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {op} at offset {offset}: {source}")]
    Io {
        volume: u64,
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("volume {volume}: size {requested} exceeds max_volume_size {max}")]
    TooLarge {
        volume: u64,
        requested: u64,
        max: u64,
    },
    #[error("volume {volume}: a snapshot of it is still being captured")]
    CaptureInProgress { volume: u64 },
    #[error("volume {volume}: unsupported fallocate mode {mode:#x}")]
    UnsupportedMode { volume: u64, mode: i32 },
}

pub type VolumeResult<T> = Result<T, VolumeError>;

/// Reads this large (or larger) go direct when aligned; smaller ones go through the
/// page cache, whose readahead serves sequential readers with small requests. Measured
/// on a 1 GiB volume, cold: `dd bs=4K` 70 MB/s direct vs 179 MB/s buffered; 1 MiB
/// reads at QD8 from a loop device 1.2-2.5 GB/s direct vs ~0.95 GB/s buffered;
/// 4 KiB random reads the same either way.
const DIRECT_READ_MIN_BYTES: usize = 256 << 10;

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
pub struct Epoch {
    pub dirty: DirtyMap,
    pub freeze: Option<Arc<Freeze>>,
}

pub struct Volume {
    pub id: u64,
    pub block_size: u64,
    max_size: u64,
    data: File,
    /// The same file for aligned requests, bypassing the page cache.
    direct: DirectFile,
    epoch: RwLock<Epoch>,
}

/// Paths of a volume's files inside the data directory's `volumes/`.
pub fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.raw"))
}

pub fn dirty_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.dirty"))
}

impl Volume {
    /// Opens (creating if needed) the files of volume `id` in `dir`.
    pub fn open(dir: &Path, id: u64, block_size: u64, max_size: u64) -> io::Result<Volume> {
        let path = data_path(dir, id);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let direct = DirectFile::open(&path);
        let dirty = DirtyMap::open(&dirty_path(dir, id))?;
        Ok(Volume {
            id,
            block_size,
            max_size,
            data,
            direct,
            epoch: RwLock::new(Epoch {
                dirty,
                freeze: None,
            }),
        })
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

    pub fn data_file(&self) -> &File {
        &self.data
    }

    fn epoch_shared(&self) -> RwLockReadGuard<'_, Epoch> {
        self.epoch.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The freeze barrier: waits for changes in flight, blocks new ones while held.
    pub fn epoch_exclusive(&self) -> RwLockWriteGuard<'_, Epoch> {
        self.epoch.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn size(&self) -> VolumeResult<u64> {
        Ok(self.data.metadata().map_err(self.io_err("stat", 0))?.len())
    }

    /// Bytes of storage the data file really occupies.
    pub fn allocated_bytes(&self) -> VolumeResult<u64> {
        Ok(self
            .data
            .metadata()
            .map_err(self.io_err("stat", 0))?
            .blocks()
            * 512)
    }

    /// Reads at `offset`; returns fewer bytes only at the end of the volume.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> VolumeResult<usize> {
        let direct = if buf.len() >= DIRECT_READ_MIN_BYTES {
            self.direct
                .read_at(buf, offset)
                .map_err(self.io_err("read", offset))?
        } else {
            None
        };
        match direct {
            Some(n) => Ok(n),
            None => {
                freeze::read_full_at(&self.data, buf, offset).map_err(self.io_err("read", offset))
            }
        }
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
        change: impl FnOnce(&File) -> VolumeResult<T>,
    ) -> VolumeResult<T> {
        let epoch = self.epoch_shared();
        if end > start {
            let (first, last) = (start / self.block_size, (end - 1) / self.block_size);
            if let Some(freeze) = &epoch.freeze {
                freeze.protect(&self.data, start, end);
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
        self.modify(offset, end, |file| {
            let written = self
                .direct
                .write_at(data, offset)
                .map_err(self.io_err("write", offset))?;
            if !written {
                file.write_all_at(data, offset)
                    .map_err(self.io_err("write", offset))?;
            }
            Ok(data.len())
        })
    }

    /// Grows or shrinks the volume. Shrinking frees the tail; growing exposes zeros.
    pub fn set_size(&self, new_size: u64) -> VolumeResult<()> {
        self.check_size(new_size)?;
        let epoch = self.epoch_shared();
        let old_size = self.size()?;
        if new_size < old_size {
            let bs = self.block_size;
            if let Some(freeze) = &epoch.freeze {
                freeze.protect(&self.data, new_size, old_size);
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
    /// keeping the size), punching holes and zeroing ranges.
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> VolumeResult<()> {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        let end = offset.saturating_add(len);
        let changes_contents = match mode {
            0 | KEEP => false,
            PUNCH | ZERO => true,
            m if m == ZERO | KEEP => true,
            _ => {
                return Err(VolumeError::UnsupportedMode {
                    volume: self.id,
                    mode,
                });
            }
        };
        if mode & KEEP == 0 {
            self.check_size(end)?;
        }
        let apply = |file: &File| {
            // SAFETY: fallocate reads only its integer arguments; the fd is owned.
            let rc = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(self.io_err("fallocate", offset)(io::Error::last_os_error()))
            }
        };
        if changes_contents {
            let size = self.size()?;
            self.modify(offset, end.min(size.max(offset)), apply)
        } else {
            apply(&self.data)
        }
    }

    /// `lseek` with `SEEK_DATA`/`SEEK_HOLE`, answered by the data file itself.
    pub fn seek(&self, offset: u64, whence: i32) -> VolumeResult<u64> {
        // SAFETY: lseek on an owned fd has no memory effects; the offset is not shared
        // because every other access uses positioned I/O.
        let rc = unsafe { libc::lseek(self.data.as_raw_fd(), offset as libc::off_t, whence) };
        if rc < 0 {
            Err(self.io_err("seek", offset)(io::Error::last_os_error()))
        } else {
            Ok(rc as u64)
        }
    }

    /// Makes acknowledged writes durable.
    pub fn sync(&self, data_only: bool) -> VolumeResult<()> {
        let result = if data_only {
            self.data.sync_data()
        } else {
            self.data.sync_all()
        };
        result.map_err(self.io_err("fsync", 0))
    }

    /// Freezes the volume for a snapshot: the dirty map becomes the capture set,
    /// renamed to `set_path`, and a fresh empty map starts.
    pub fn freeze(
        &self,
        set_path: &Path,
        cow_path: &Path,
        rescan: Rescan,
    ) -> VolumeResult<Arc<Freeze>> {
        let mut epoch = self.epoch_exclusive();
        if epoch.freeze.is_some() {
            return Err(VolumeError::CaptureInProgress { volume: self.id });
        }
        let size = self.size()?;
        let blocks_now = size.div_ceil(self.block_size);
        let reexamine = match rescan {
            Rescan::All => 0..blocks_now,
            Rescan::ShrunkBelow(high_water_bytes) => {
                let low_water = epoch.dirty.low_water();
                let start = if low_water == NEVER_SHRUNK {
                    blocks_now
                } else {
                    low_water / self.block_size
                };
                let end = blocks_now.min(high_water_bytes.div_ceil(self.block_size));
                start..end.max(start)
            }
        };
        let cow = Freeze::create_cow_file(cow_path).map_err(self.io_err("freeze", 0))?;
        let dirty_file = epoch.dirty.path();
        epoch
            .dirty
            .rename(set_path)
            .map_err(self.io_err("freeze", 0))?;
        let fresh = match DirtyMap::create(&dirty_file, size) {
            Ok(fresh) => fresh,
            Err(e) => {
                // Put the map back: the volume must keep tracking changes.
                let _ = epoch.dirty.rename(&dirty_file);
                return Err(self.io_err("freeze", 0)(e));
            }
        };
        let captured = std::mem::replace(&mut epoch.dirty, fresh);
        let freeze = Freeze::new(captured, reexamine, size, self.block_size, cow, cow_path);
        let freeze = Arc::new(freeze);
        epoch.freeze = Some(freeze.clone());
        Ok(freeze)
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
        }
        Ok(())
    }

    /// Adds blocks to the dirty map (those of a capture a crash interrupted).
    pub fn absorb_dirty(&self, blocks: &DirtyMap) -> VolumeResult<()> {
        self.epoch_shared()
            .dirty
            .merge(blocks)
            .map_err(self.io_err("record change", 0))
    }

    /// Number of blocks changed since the last freeze.
    pub fn dirty_blocks(&self) -> u64 {
        self.epoch_shared().dirty.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4096;

    fn volume(dir: &Path) -> Volume {
        Volume::open(dir, 1, BS, 1 << 30).unwrap()
    }

    #[test]
    fn unaligned_writes_read_back_and_holes_are_zero() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(dir.path());
        v.write_at(b"hello", 10_000).unwrap();
        assert_eq!(v.size().unwrap(), 10_005);
        let mut buf = vec![1u8; 20];
        assert_eq!(v.read_at(&mut buf, 9_990).unwrap(), 15);
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(&buf[10..15], b"hello");
        assert_eq!(v.dirty_blocks(), 1);
    }

    #[test]
    fn size_limit_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(dir.path());
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
        v.set_size(1 << 30).unwrap();
        assert_eq!(v.allocated_bytes().unwrap(), 0);
    }

    #[test]
    fn shrink_marks_the_tail_dirty_and_punch_frees_space() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(dir.path());
        v.write_at(&vec![7u8; 8 * BS as usize], 0).unwrap();
        v.sync(true).unwrap();
        let freeze = v
            .freeze(
                &dir.path().join("s"),
                &dir.path().join("c"),
                Rescan::ShrunkBelow(0),
            )
            .unwrap();
        assert_eq!(freeze.blocks.count(), 8);
        assert!(matches!(
            v.freeze(
                &dir.path().join("s2"),
                &dir.path().join("c2"),
                Rescan::ShrunkBelow(0)
            ),
            Err(VolumeError::CaptureInProgress { .. })
        ));
        v.set_size(5 * BS).unwrap();
        v.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            2 * BS,
        )
        .unwrap();
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
            .freeze(
                &dir.path().join("s3"),
                &dir.path().join("c3"),
                Rescan::ShrunkBelow(8 * BS),
            )
            .unwrap();
        assert_eq!(
            freeze.reexamine,
            5..5,
            "nothing to re-examine until the volume grows back"
        );
        v.thaw(true).unwrap();
        v.set_size(8 * BS).unwrap();
        let freeze = v
            .freeze(
                &dir.path().join("s4"),
                &dir.path().join("c4"),
                Rescan::ShrunkBelow(8 * BS),
            )
            .unwrap();
        assert_eq!(freeze.reexamine, 5..8);
        assert_eq!(freeze.block_count(), 2 + 3);
        for b in 5..8 {
            assert_eq!(
                freeze.take(v.data_file(), b).unwrap(),
                vec![0u8; BS as usize]
            );
        }
        assert!(v.allocated_bytes().unwrap() <= 3 * BS);
        assert_eq!(v.seek(0, libc::SEEK_DATA).unwrap(), 2 * BS);
    }

    #[test]
    fn failed_capture_returns_its_blocks_to_the_dirty_map() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(dir.path());
        v.write_at(b"a", 0).unwrap();
        v.freeze(
            &dir.path().join("s"),
            &dir.path().join("c"),
            Rescan::ShrunkBelow(0),
        )
        .unwrap();
        v.write_at(b"b", 5 * BS).unwrap();
        v.thaw(true).unwrap();
        assert_eq!(v.dirty_blocks(), 2);
        drop(v);
        // The merged map is on disk too.
        assert_eq!(volume(dir.path()).dirty_blocks(), 2);
    }
}
