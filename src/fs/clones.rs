//! Volumes from snapshots.
//!
//! `cp snapshots/db@x/volume.img volumes/new.img` reaches the daemon as
//! `copy_file_range` requests from the image to the new volume, at equal offsets on
//! both sides. A request the volume can take by reference copies nothing: the volume
//! becomes a copy of the snapshot *by reference* (its lineage's parent is the
//! snapshot, see `namespace::catalog`), or such a copy grows, in constant time
//! whatever the size. Its blocks read from the snapshot until written or hydrated
//! (`volume::source`); a background thread hydrates the rest, yielding to volume I/O.
//!
//! A request for `[offset, end)` is taken by reference when
//! - the volume is blank and the image holds no data before `offset`: the volume
//!   becomes a copy of the snapshot up to `end` (its *source limit*);
//! - the volume is such a copy and the range is untouched (below the limit, no
//!   block written or hydrated over): nothing to do;
//! - the volume is such a copy ending (size and limit) at or before `offset`, with
//!   only holes of the snapshot in between: the limit and the size rise to `end`
//!   (`Volume::extend_copy`).
//!
//! `end` is cut to a block boundary unless it is the image's end, and the reply says
//! how much was taken: the caller asks again for the rest. That is how `cp` arrives:
//! requests from 0 in increasing order, each at most 4 GiB − 4 KiB (the kernel cuts a
//! longer `copy_file_range`; images report their full size as allocated, so `cp`
//! does not look for holes). A tool that skips holes (`SEEK_DATA`/`SEEK_HOLE`)
//! copies one run of data after another, in increasing order too. Anything
//! else (another source, unequal offsets, data of the snapshot before the range that
//! the copy did not take, a range written over, a copy found hydrated whole when
//! the daemon started) is copied byte by byte.
//!
//! Order of the first request taken by reference, and what a crash leaves:
//! 1. `volumes/<id>.present` written whole (empty, source limit = the request's end):
//!    a stray file of a volume that is not a copy (replaced by the next attempt);
//! 2. under the volume's freeze barrier (no write races it), its dirty map's
//!    low-water size lowered to the limit (harmless alone), then one commit:
//!    the lineage parent and the volume record (base = the snapshot, so its first
//!    snapshot is incremental against it): a copy of size 0, whose limit the next
//!    start lowers to 0;
//! 3. in memory: the source attached; then the data file's size set: the copy.
//!
//! A later request that extends the copy writes no record (unless the copy had been
//! hydrated: then one commit says it reads the snapshot again); its steps, and what
//! a crash after each leaves, are in `Volume::extend_copy`: at worst the copy as it
//! was before the request, never bytes of the snapshot the copy did not take.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{FsCore, FsError, FsResult, Handle, VolumeSlot};
use crate::layout::VolumeFile;
use crate::namespace::{NsGuard, Records, SnapshotRef, SnapshotStatus, VolumeId, VolumeRecord};
use crate::remote::reader::RemoteBlocks;
use crate::snapshot::SnapshotEngine;
use crate::snapshot::read::{ChainBlocks, OpenImage};
use crate::storage::Storage;
use crate::volume::Volume;
use crate::volume::dirty::DirtyMap;
use crate::volume::source::{SnapshotBlocks, Source};

/// Bytes moved per step of a copy that cannot share blocks.
const COPY_STEP: usize = 1 << 20;

/// Blocks hydrated between looks at whether volume I/O wants the disk.
const HYDRATE_BATCH: usize = 16;

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

/// What sharing needs to know of the snapshot image a copy request reads.
pub(super) struct ImageShape<'a> {
    pub size: u64,
    pub block_size: u64,
    /// `SEEK_DATA` from an offset: the first byte at or past it in a block of the
    /// image that may hold data; `None` if there is none.
    pub next_data: &'a dyn Fn(u64) -> FsResult<Option<u64>>,
}

impl ImageShape<'_> {
    /// Whether the image holds only zeros in `[from, to)`.
    fn holes_only(&self, from: u64, to: u64) -> FsResult<bool> {
        Ok(from >= to || (self.next_data)(from)?.is_none_or(|at| at >= to))
    }

    /// How far a request ending at `end` may share: to a block boundary, unless it
    /// ends with the image. The tail of a shared block would read the snapshot's
    /// bytes, not zeros, once the volume grows; the kernel (or `cp`) asks again for
    /// the rest.
    fn shared_end(&self, end: u64) -> u64 {
        if end < self.size {
            end - end % self.block_size
        } else {
            end
        }
    }

    /// For a blank volume, the source limit of a copy by reference for a request
    /// `[offset, end)`: the volume reads whole blocks from the snapshot from the
    /// first on, so only if the image holds no data before `offset` (whose bytes
    /// must stay zeros). `None`: copy instead.
    pub(super) fn first_share(&self, offset: u64, end: u64) -> FsResult<Option<u64>> {
        let end = self.shared_end(end);
        if end <= offset || !self.holes_only(0, offset)? {
            return Ok(None);
        }
        Ok(Some(end))
    }
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

    fn data_blocks(&self, _blocks: std::ops::Range<u64>) -> std::io::Result<Vec<u64>> {
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
    /// the volume is blank, already a copy of that snapshot untouched in the range, or
    /// a copy of it that ends before `offset` with only holes of the snapshot in
    /// between (see [`FsCore::share_more`]). `None`: not possible here, copy instead.
    fn share_blocks(
        &self,
        volume: &Arc<Volume<S>>,
        image: &OpenImage<S>,
        offset: u64,
        len: u64,
    ) -> FsResult<Option<u64>> {
        let snapshot = &image.record;
        let next_data = |at| Ok(image.seek(at, true)?);
        let shape = ImageShape {
            size: snapshot.size_bytes,
            block_size: u64::from(snapshot.block_size),
            next_data: &next_data,
        };
        let end = offset.saturating_add(len).min(shape.size);
        if offset >= end {
            return Ok(Some(0));
        }
        let guard = self.ns.lock();
        let view = self.ns.view();
        let Some(record) = view.volumes.get(&volume.id).cloned() else {
            return Ok(None);
        };
        // A pending snapshot's image reads through its volume's freeze: only a
        // completed one's blocks are all in its entries.
        let completed = view
            .snapshots
            .get(&snapshot.id)
            .is_some_and(|s| s.status == SnapshotStatus::Completed);
        if !completed {
            return Ok(None);
        }
        let end = match view.lineage_parents.get(&volume.id) {
            Some(parent) if parent.snapshot == snapshot.id => {
                let base_is_source = record.base_snapshot == Some(snapshot.id);
                let shared = self.share_more(
                    &guard,
                    volume,
                    &record,
                    &shape,
                    (offset, end),
                    base_is_source,
                )?;
                let Some(end) = shared else {
                    return Ok(None);
                };
                end
            }
            Some(_) => return Ok(None),
            None => {
                if !blank_copy_target(&view, &record, snapshot.block_size) {
                    return Ok(None);
                }
                let Some(end) = shape.first_share(offset, end)? else {
                    return Ok(None);
                };
                let bs = shape.block_size;
                let present_path = self.layout.volume_file(volume.id, VolumeFile::Present);
                // The source limit: the end of this request. The next one raises it.
                let present = DirtyMap::create(&self.storage, &present_path, end).map_err(
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
                let converted = volume.become_copy_of(source, || {
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
                    "volume {} is now a copy of snapshot {} ({end} of its {} bytes so far, \
                     shared, nothing copied)",
                    record.name,
                    snapshot.name(),
                    snapshot.size_bytes
                );
                end
            }
        };
        drop(guard);
        self.shared(volume, offset, end)
    }

    /// For `volume`, already a copy by reference of the image's snapshot (local or in
    /// the bucket): shares `[offset, end)` too, if it is untouched (every block below
    /// the source limit and never written or hydrated over), or if the copy ends at
    /// or before `offset` with only holes of the snapshot in between: then the copy
    /// extends to `end` (cut to a block boundary unless the snapshot's end) by
    /// reference ([`Volume::extend_copy`]), the bytes in between reading the
    /// snapshot's holes: the kernel's pieces of at most 4 GiB − 4 KiB of one long
    /// request, or the runs of data of a copy that skips holes. Returns the end of
    /// the part shared, or `None`: copy instead.
    pub(super) fn share_more(
        &self,
        guard: &NsGuard,
        volume: &Volume<S>,
        record: &VolumeRecord,
        shape: &ImageShape,
        (offset, end): (u64, u64),
        base_is_source: bool,
    ) -> FsResult<Option<u64>> {
        let bs = shape.block_size;
        // Only blocks still read from the snapshot (below its limit, never written)
        // already hold the snapshot's bytes.
        let untouched = volume.active_source().is_some_and(|source| {
            end.div_ceil(bs) <= source.limit_blocks()
                && (offset / bs..end.div_ceil(bs)).all(|b| !source.is_own(b))
        });
        if untouched {
            return Ok(Some(end));
        }
        let from = volume.size()?;
        let end = shape.shared_end(end);
        if offset < from || end <= offset || !shape.holes_only(from, offset)? {
            return Ok(None);
        }
        let extended = volume.extend_copy(from, end, base_is_source, || {
            self.ns.change(guard, |c| -> FsResult<()> {
                let mut record = record.clone();
                record.hydrated = false;
                Ok(c.put_volume(record)?)
            })
        })?;
        if !extended {
            return Ok(None);
        }
        debug!(
            "volume {}: bytes {from}..{end} shared with its snapshot too",
            record.name
        );
        Ok(Some(end))
    }

    /// The end of a request whose `[offset, end)` is the volume's now: grows the
    /// volume to it and wakes the hydrator. Returns the bytes copied.
    pub(super) fn shared(
        &self,
        volume: &Volume<S>,
        offset: u64,
        end: u64,
    ) -> FsResult<Option<u64>> {
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
        let raises = source.raises();
        let complete = source
            .hydrate_some(volume.data_file(), budget, yield_now)
            .map_err(super::io_error(format!("hydrating volume {}", volume.id)))?;
        if !complete {
            return Ok(true);
        }
        self.finish_hydration(&volume, raises)?;
        Ok(true)
    }

    /// Records that a volume holds every block itself, if it still does once the
    /// blocks are synced and no copy request can raise its limit (under the
    /// namespace lock): `raises` is how many times the limit had been raised when
    /// hydration last found blocks missing.
    fn finish_hydration(&self, volume: &Arc<Volume<S>>, raises: u64) -> FsResult<()> {
        let Some(source) = volume.active_source() else {
            return Ok(());
        };
        if !source.all_present() {
            return Ok(());
        }
        // The blocks must be durable before the record says the snapshot is not needed.
        volume.sync(true)?;
        let guard = self.ns.lock();
        // A copy request may have raised the limit past blocks the sync did not see.
        if source.raises() != raises || !source.all_present() {
            return Ok(());
        }
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

/// Wakes a background thread (the hydrator, the policy thread), and tells it when
/// the core is gone.
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
    pub(super) fn wait(&self, timeout: Duration) -> bool {
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
