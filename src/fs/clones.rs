//! Volumes from snapshots.
//!
//! `cp snapshots/db@x/volume.img volumes/new.img` reaches the daemon as
//! `copy_file_range` from the image to the new volume. When the volume is blank and
//! the range starts at 0 on both sides, nothing is copied: the volume
//! becomes a copy of the snapshot *by reference* (its lineage's parent is the
//! snapshot, see `namespace::catalog`), in constant time whatever the size. Its
//! blocks read from the snapshot until written or hydrated (`volume::source`); a
//! background thread hydrates the rest, yielding to volume I/O. Anything else
//! (another source, other offsets, a volume with data) is copied byte by byte.
//!
//! Order of a copy by reference, and what a crash leaves:
//! 1. `volumes/<id>.present` written whole (empty, source limit = snapshot size):
//!    a stray file of a volume that is not a copy (replaced by the next attempt);
//! 2. under the volume's freeze barrier (no write races it), its dirty map's
//!    low-water size lowered to the snapshot's size (harmless alone), then one commit:
//!    the lineage parent and the volume record (base = the snapshot, so its first
//!    snapshot is incremental against it);
//! 3. in memory only: the source attached, the size set.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::{FsCore, FsError, FsResult, Handle, VolumeSlot};
use crate::layout::VolumeFile;
use crate::namespace::{Records, SnapshotRef, VolumeId, VolumeRecord};
use crate::remote::reader::RemoteBlocks;
use crate::snapshot::SnapshotEngine;
use crate::snapshot::read::{ChainBlocks, OpenImage};
use crate::storage::Storage;
use crate::volume::Volume;
use crate::volume::dirty::DirtyMap;
use crate::volume::source::{SnapshotBlocks, Source};

/// Bytes moved per step of a copy that cannot share blocks.
const COPY_STEP: usize = 1 << 20;

/// Most blocks one step of the hydrator copies (it steps aside for volume I/O before
/// each one).
const HYDRATE_BATCH: usize = 256;

/// How long the hydrator waits after volume I/O before going on.
const HYDRATE_BACKOFF: Duration = Duration::from_millis(20);

/// What a volume made from a snapshot reads its unwritten blocks from.
pub(super) fn source_blocks<S: Storage>(
    engine: &Arc<SnapshotEngine<S>>,
    view: &Records,
    record: &VolumeRecord,
) -> Option<Arc<dyn SnapshotBlocks>> {
    if record.hydrated {
        return None;
    }
    if let Some(parent) = view.remote_parents.get(&record.id) {
        return Some(remote_source(engine, &parent.root));
    }
    let parent = view.lineage_parents.get(&record.id)?;
    Some(Arc::new(ChainBlocks::new(
        engine.clone(),
        view.chain(parent.lineage, parent.snapshot),
        u64::from(record.block_size),
    )))
}

/// Whether `record`'s volume may become a copy of a snapshot by reference: made
/// from no snapshot, never snapshotted, and of the snapshot's block size (whether
/// it holds data, `Volume::become_copy_of` decides).
pub(super) fn blank_copy_target(view: &Records, record: &VolumeRecord, block_size: u32) -> bool {
    record.block_size == block_size
        && view.lineage(record.id).next().is_none()
        && !view.lineage_parents.contains_key(&record.id)
        && !view.remote_parents.contains_key(&record.id)
}

/// The blocks of the snapshot in the bucket a volume was made from. If its root
/// cannot be read now, the volume still opens: its blocks not hydrated yet read as
/// errors (`EIO`, logged) until a restart finds the root again.
fn remote_source<S: Storage>(
    engine: &Arc<SnapshotEngine<S>>,
    root: &str,
) -> Arc<dyn SnapshotBlocks> {
    let Some(up) = engine.uploader() else {
        return Arc::new(Unreadable(format!(
            "it was made from snapshot {root} in a bucket, and no [store] is configured"
        )));
    };
    match RemoteBlocks::open(up.store.clone(), root) {
        Ok(blocks) => Arc::new(blocks),
        Err(e) => {
            log::error!("the snapshot a volume was made from cannot be read: {e}");
            Arc::new(Unreadable(e.to_string()))
        }
    }
}

/// A source that cannot be read: every block fails with the reason.
struct Unreadable(String);

impl SnapshotBlocks for Unreadable {
    fn read_block(&self, _block: u64, _buf: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(self.0.clone()))
    }

    fn data_blocks(&self, _limit: u64) -> std::io::Result<Vec<u64>> {
        Err(std::io::Error::other(self.0.clone()))
    }
}

impl<S: Storage> FsCore<S> {
    /// `copy_file_range(2)` into a volume: shares the snapshot's blocks when it can
    /// (see the module documentation), copies otherwise. Returns the bytes copied.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let volume = self.volume_for(ino_out, Some(fh_out))?;
        let source =
            self.handles.get(&fh_in).map(|h| h.clone()).ok_or_else(|| {
                FsError::Invalid(format!("copy from unknown file handle {fh_in}"))
            })?;
        if let Handle::Image(image) = &source
            && offset_in == offset_out
            && let Some(shared) = self.share_blocks(&volume, image, offset_out, len)?
        {
            return Ok(shared);
        }
        if let Handle::Remote(image) = &source
            && offset_in == offset_out
            && let Some(shared) = self.share_remote_blocks(&volume, image, offset_out, len)?
        {
            return Ok(shared);
        }
        self.copy_bytes(&source, offset_in, &volume, offset_out, len)
    }

    /// Copies by reading and writing, a step at a time; stops at the source's end.
    fn copy_bytes(
        &self,
        source: &Handle<S>,
        offset_in: u64,
        volume: &Volume<S>,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        let mut buf = vec![0u8; COPY_STEP.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let at = offset_in + done;
            let n = match source {
                Handle::Image(image) => image.read(&mut buf[..want], at)?,
                Handle::Remote(image) => image.read(&mut buf[..want], at)?,
                Handle::Volume(v) => v.read_at(&mut buf[..want], at)?,
                Handle::Text(text) => {
                    let start = (at as usize).min(text.len());
                    let n = (text.len() - start).min(want);
                    buf[..n].copy_from_slice(&text[start..start + n]);
                    n
                }
            };
            if n == 0 {
                break;
            }
            volume.write_at(&buf[..n], offset_out + done)?;
            done += n as u64;
        }
        Ok(done)
    }

    /// Makes `[offset, offset + len)` of `volume` the snapshot's bytes by reference, if
    /// the volume is blank or already a copy of that snapshot untouched in the range.
    /// `None`: not possible here, copy instead.
    fn share_blocks(
        &self,
        volume: &Arc<Volume<S>>,
        image: &OpenImage<S>,
        offset: u64,
        len: u64,
    ) -> FsResult<Option<u64>> {
        let snapshot = &image.record;
        let mut end = offset.saturating_add(len).min(snapshot.size_bytes);
        if offset >= end {
            return Ok(Some(0));
        }
        let bs = u64::from(snapshot.block_size);
        let guard = self.ns.lock();
        let view = self.ns.view();
        let Some(record) = view.volumes.get(&volume.id).cloned() else {
            return Ok(None);
        };
        match view.lineage_parents.get(&volume.id) {
            Some(parent) if parent.snapshot == snapshot.id => {
                // Only blocks still read from the snapshot (below its limit, never
                // written) already hold the snapshot's bytes.
                let untouched = volume.active_source().is_some_and(|source| {
                    end.div_ceil(bs) <= source.limit_blocks()
                        && (offset / bs..end.div_ceil(bs)).all(|b| !source.is_own(b))
                });
                if !untouched {
                    return Ok(None);
                }
            }
            Some(_) => return Ok(None),
            None => {
                if !blank_copy_target(&view, &record, snapshot.block_size) {
                    return Ok(None);
                }
                // The volume reads whole blocks from the snapshot, from the first on:
                // a copy that starts past 0 (whose head must stay zeros) is made byte
                // by byte, and one that ends inside a block shares up to that block
                // (the tail of a shared block would read the snapshot's bytes, not
                // zeros, once the volume grows). The kernel asks again for the rest.
                if end < snapshot.size_bytes {
                    end -= end % bs;
                }
                if offset != 0 || end == 0 {
                    return Ok(None);
                }
                let present_path = self.layout.volume_file(volume.id, VolumeFile::Present);
                let present =
                    DirtyMap::create(&self.storage, &present_path, snapshot.size_bytes).map_err(
                        super::io_error(format!("creating {}", present_path.display())),
                    )?;
                let point = SnapshotRef {
                    lineage: snapshot.lineage,
                    snapshot: snapshot.id,
                };
                let blocks: Arc<dyn SnapshotBlocks> = Arc::new(ChainBlocks::new(
                    self.engine.clone(),
                    view.chain(point.lineage, point.snapshot),
                    bs,
                ));
                let source = Source::new(blocks, present, bs);
                let converted = volume.become_copy_of(source, snapshot.size_bytes, || {
                    self.ns.change(&guard, |c| -> FsResult<()> {
                        c.put_lineage_parent(volume.id, point)?;
                        let mut record = record.clone();
                        record.base_snapshot = Some(snapshot.id);
                        // Older entries of the source's lineages may lie past its end:
                        // every block a copy grows into is compared at its captures.
                        record.high_water_bytes = u64::MAX;
                        record.hydrated = false;
                        Ok(c.put_volume(record)?)
                    })
                })?;
                if !converted {
                    return Ok(None);
                }
                info!(
                    "volume {} is now a copy of snapshot {} ({} bytes, shared, nothing copied)",
                    record.name,
                    snapshot.name(),
                    snapshot.size_bytes
                );
            }
        }
        drop(guard);
        if volume.size()? < end {
            volume.set_size(end)?;
        }
        self.wake_hydrator();
        Ok(Some(end - offset))
    }

    /// `user.ebsfs.source` and `user.ebsfs.hydrated` of a volume made from a
    /// snapshot: the snapshot's name and how much the volume holds itself.
    pub(super) fn copy_info(&self, id: VolumeId) -> Option<(String, String)> {
        let view = self.ns.view();
        let source = view.remote_parents.get(&id).map(|r| r.name.clone());
        let parent = match source {
            Some(_) => None,
            None => Some(*view.lineage_parents.get(&id)?),
        };
        let source = source.unwrap_or_else(|| {
            let parent = parent.expect("local parent");
            view.snapshots
                .get(&parent.snapshot)
                .filter(|s| !s.hidden)
                .map_or_else(
                    || format!("(deleted snapshot {})", parent.snapshot),
                    |s| s.name(),
                )
        });
        let record = view.volumes.get(&id)?;
        let percent = if record.hydrated {
            100
        } else {
            match self.volumes.get(&id).map(|slot| slot.clone()) {
                Some(VolumeSlot::Live(volume)) => match volume.source() {
                    Some(source) => {
                        let (present, total) = source.progress();
                        (present * 100).checked_div(total).unwrap_or(100)
                    }
                    None => 100,
                },
                _ => 0,
            }
        };
        Some((source, format!("{percent}%")))
    }

    /// Asks the hydrator to look for work.
    pub(super) fn wake_hydrator(&self) {
        self.hydrate_signal.notify();
    }

    /// Hydrates every volume made from a snapshot to the end, on the calling thread
    /// (manual scheduling, and tests).
    pub fn hydrate_all(&self) -> FsResult<()> {
        while self.hydrate_step(usize::MAX, || false)? {}
        Ok(())
    }

    /// Hydrates up to `budget` blocks of one volume still reading from its snapshot,
    /// stopping early when `yield_now` says volume I/O wants the disk. Returns
    /// whether work is left.
    fn hydrate_step(&self, budget: usize, yield_now: impl Fn() -> bool) -> FsResult<bool> {
        let Some(volume) = self.volumes.iter().find_map(|slot| match slot.value() {
            VolumeSlot::Live(v) if v.active_source().is_some() => Some(v.clone()),
            _ => None,
        }) else {
            return Ok(false);
        };
        let Some(source) = volume.active_source() else {
            return Ok(true);
        };
        let size = volume.size()?;
        let limit = source.limit_blocks();
        let data_blocks = source
            .blocks
            .data_blocks(limit)
            .map_err(super::io_error("listing the blocks of a volume's snapshot"))?;
        let from = data_blocks.partition_point(|&b| b < source.hydrated_below());
        let missing: Vec<u64> = data_blocks[from..]
            .iter()
            .copied()
            .filter(|&b| !source.is_own(b))
            .collect();
        for (done, &block) in missing.iter().enumerate() {
            if done >= budget || yield_now() {
                return Ok(true);
            }
            // Fetches ahead when the source reads from a bucket (a no-op otherwise).
            source.blocks.prefetch(&missing[done..]);
            source
                .hydrate(volume.data_file(), block, size)
                .map_err(super::io_error(format!(
                    "hydrating block {block} of volume {}",
                    volume.id
                )))?;
            source.note_hydrated_below(block + 1);
        }
        // The rest reads zeros in the snapshot: marking them present copies nothing.
        let mut word = 0;
        while word * 64 < limit {
            let (first, last) = (word * 64, (word * 64 + 63).min(limit - 1));
            source
                .mark_zero_blocks(first, last, &data_blocks)
                .map_err(super::io_error(format!("hydrating volume {}", volume.id)))?;
            word += 1;
        }
        self.finish_hydration(&volume)?;
        Ok(true)
    }

    /// Records that a volume holds every block itself.
    fn finish_hydration(&self, volume: &Arc<Volume<S>>) -> FsResult<()> {
        let Some(source) = volume.active_source() else {
            return Ok(());
        };
        let (present, total) = source.progress();
        if present < total {
            return Ok(());
        }
        // The blocks must be durable before the record says the snapshot is not needed.
        volume.sync(true)?;
        let guard = self.ns.lock();
        let Some(mut record) = self.ns.view().volumes.get(&volume.id).cloned() else {
            return Ok(());
        };
        record.hydrated = true;
        let name = record.name.clone();
        self.ns.change(&guard, |c| c.put_volume(record))?;
        source.set_hydrated();
        info!("volume {name}: hydrated, it no longer reads its snapshot");
        Ok(())
    }

    /// Starts the background hydrator (threaded scheduling). It works while volume
    /// I/O is quiet, at idle priority, and stops when the core is dropped.
    pub fn start_hydrator(self: &Arc<Self>) {
        if !self.settings.hydrate {
            return;
        }
        let core = Arc::downgrade(self);
        let signal = self.hydrate_signal.clone();
        let spawned = std::thread::Builder::new()
            .name("hydrator".into())
            .spawn(move || {
                crate::snapshot::lower_thread_priority();
                loop {
                    if !signal.wait(Duration::from_secs(5)) {
                        return;
                    }
                    loop {
                        let Some(core) = core.upgrade() else {
                            return;
                        };
                        if core.stopped.load(Ordering::Acquire) {
                            return;
                        }
                        let quiet = || core.io_quiet(HYDRATE_BACKOFF);
                        match core.hydrate_step(HYDRATE_BATCH, || !quiet()) {
                            Ok(true) => {
                                if !quiet() {
                                    drop(core);
                                    std::thread::sleep(HYDRATE_BACKOFF);
                                }
                            }
                            Ok(false) => break,
                            Err(e) => {
                                warn!("hydrating volumes: {e}");
                                break;
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(
                "cannot start the hydrator thread: {e}; volumes made from snapshots keep reading them"
            );
        }
    }

    /// Whether no volume I/O happened for `quiet_for`.
    fn io_quiet(&self, quiet_for: Duration) -> bool {
        let last = self.last_io.load(Ordering::Relaxed);
        let now = self.epoch_start.elapsed().as_millis() as u64;
        now.saturating_sub(last) >= quiet_for.as_millis() as u64
    }

    /// Notes volume I/O (the hydrator steps aside).
    pub(super) fn note_io(&self) {
        let now = self.epoch_start.elapsed().as_millis() as u64;
        self.last_io.store(now, Ordering::Relaxed);
    }
}

/// Wakes the hydrator thread, and tells it when the core is gone.
#[derive(Default)]
pub(super) struct HydrateSignal {
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl HydrateSignal {
    pub(super) fn notify(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        self.changed.notify_all();
    }

    pub(super) fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }

    /// Waits for work (or `timeout`); false once stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !state.0 && !state.1 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.0 = false;
        !state.1
    }
}
