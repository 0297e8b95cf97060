//! Snapshots: creation (freeze + pending record), capture in the background,
//! completion, deletion, reading images, and recovery after a crash.
//!
//! Rules kept here:
//! - one capture per volume at a time: a second `mkdir` while one is pending is `EBUSY`;
//! - a snapshot is `completed` only in the transaction that commits the last batch
//!   of its manifest, after its chunks are durable;
//! - a failed or interrupted capture returns its blocks to the volume's dirty map, so
//!   the next snapshot of the volume still holds every change since the last
//!   completed one, and the entries it committed are removed before anything else;
//! - a deleted snapshot that is still the base of its volume's next capture stays,
//!   hidden, until a newer snapshot completes or the volume is deleted.

pub mod capture;
pub mod manifest;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use redb::WriteTransaction;

use crate::catalog::{Catalog, Records};
use crate::meta::{
    self, CHUNKS, MANIFEST, Meta, MetaError, Owner, SnapshotRecord, SnapshotStatus, Timestamp,
};
use crate::names::SnapshotName;
use crate::store::codec::ChunkHash;
use crate::store::{ChunkLocation, ChunkStore, StoreError, index};
use crate::volume::dirty::DirtyMap;
use crate::volume::{Rescan, Volume, VolumeError};
use capture::{CaptureJob, CaptureProgress};
use manifest::BlockContent;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} already exists")]
    Exists(String),
    #[error("no snapshot named {0}")]
    NotFound(String),
    #[error("no volume named {0}")]
    NoVolume(String),
    #[error("volume {0} already has a snapshot pending; wait for it to complete")]
    Busy(String),
    #[error("snapshot {0} is still pending; its image is readable once it completes")]
    NotReady(String),
    #[error("capture cancelled")]
    Cancelled,
    #[error("capture failed: {0}")]
    CaptureFailed(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type SnapshotResult<T> = Result<T, SnapshotError>;

/// Where a capture's files live: `captures/<volume>-<snapshot>.set` / `.cow`.
fn capture_file(dir: &Path, volume: u64, snapshot: u64, ext: &str) -> PathBuf {
    dir.join(format!("{volume}-{snapshot}.{ext}"))
}

fn parse_capture_file(name: &str) -> Option<(u64, u64, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let (volume, snapshot) = stem.split_once('-')?;
    Some((volume.parse().ok()?, snapshot.parse().ok()?, ext))
}

pub struct SnapshotEngine {
    pub meta: Arc<Meta>,
    pub store: Arc<ChunkStore>,
    pub catalog: Arc<Catalog>,
    captures_dir: PathBuf,
    capture_threads: usize,
    /// Serialises changes to the namespace (creating and deleting volumes and
    /// snapshots, committing captures): each checks the catalog, commits, then
    /// updates the catalog, and must not interleave with another.
    ns_lock: Mutex<()>,
    running: Mutex<HashMap<u64, Arc<CaptureProgress>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set (and signalled) when hidden snapshots are left for the settler.
    settle_signal: (Mutex<bool>, Condvar),
}

/// Nice value of capture and settling threads: under load, volume I/O gets the CPU
/// first, and background work still progresses.
const BACKGROUND_NICE: libc::c_int = 10;

/// `ioprio_set(2)` value for the idle I/O class: the block layer serves the disk
/// reads of background threads after everyone else's (mq-deadline and bfq age them,
/// so they are delayed, never starved).
const IOPRIO_IDLE: libc::c_long = 3 << 13;
const IOPRIO_WHO_PROCESS: libc::c_long = 1;

/// Lowers the calling thread's CPU and I/O priority. Best effort: it only tunes speed.
pub(crate) fn lower_thread_priority() {
    // SAFETY: gettid, setpriority and ioprio_set take integers only; on Linux, a
    // thread id with PRIO_PROCESS / IOPRIO_WHO_PROCESS changes that thread alone.
    let (nice, io) = unsafe {
        let tid = libc::gettid();
        (
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE),
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                tid as libc::c_long,
                IOPRIO_IDLE,
            ),
        )
    };
    if nice != 0 || io != 0 {
        log::debug!(
            "cannot lower background thread priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl SnapshotEngine {
    pub fn new(
        meta: Arc<Meta>,
        store: Arc<ChunkStore>,
        catalog: Arc<Catalog>,
        captures_dir: PathBuf,
        capture_threads: usize,
    ) -> SnapshotEngine {
        SnapshotEngine {
            meta,
            store,
            catalog,
            captures_dir,
            capture_threads,
            ns_lock: Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            settle_signal: (Mutex::new(false), Condvar::new()),
        }
    }

    pub fn namespace_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.ns_lock)
    }

    pub fn progress(&self, snapshot: u64) -> Option<Arc<CaptureProgress>> {
        lock(&self.running).get(&snapshot).cloned()
    }

    /// `mkdir snapshots/<vol>@<label>`: freezes the volume and starts the capture.
    /// Returns as soon as the pending record is durable.
    pub fn create(
        self: &Arc<Self>,
        name: &SnapshotName,
        volume: &Arc<Volume>,
        owner: Owner,
    ) -> SnapshotResult<SnapshotRecord> {
        let _ns = self.namespace_lock();
        let (vol_record, parent, high_water) = {
            let records = self.catalog.read();
            if records.snapshot_id(&name.to_string()).is_some() {
                return Err(SnapshotError::Exists(name.to_string()));
            }
            let Some(vol) = records.volume_by_name(name.volume().as_str()).cloned() else {
                return Err(SnapshotError::NoVolume(name.volume().to_string()));
            };
            if records
                .lineage(vol.id)
                .any(|s| s.status == SnapshotStatus::Pending)
            {
                return Err(SnapshotError::Busy(vol.name.clone()));
            }
            let parent = records.visible_parent(vol.id, u64::MAX);
            // The largest image any earlier snapshot of the volume holds: blocks past
            // it cannot show through from older snapshots.
            let high_water = records
                .lineage(vol.id)
                .filter(|s| s.status == SnapshotStatus::Completed)
                .map(|s| s.size_bytes)
                .max()
                .unwrap_or(0);
            (vol, parent, high_water)
        };
        let txn = self.meta.begin_write()?;
        let id = meta::next_snapshot_id(&txn)?;
        let set_path = capture_file(&self.captures_dir, vol_record.id, id, "set");
        let cow_path = capture_file(&self.captures_dir, vol_record.id, id, "cow");
        let rescan = if vol_record.full_compare {
            Rescan::All
        } else {
            Rescan::ShrunkBelow(high_water)
        };
        let freeze = volume.freeze(&set_path, &cow_path, rescan)?;
        let record = SnapshotRecord {
            id,
            volume: vol_record.name.clone(),
            label: name.label().to_string(),
            lineage: vol_record.id,
            size_bytes: freeze.size_bytes,
            block_size: vol_record.block_size,
            created: Timestamp::now(),
            completed: None,
            status: SnapshotStatus::Pending,
            hidden: false,
            parent,
            changed_blocks: 0,
            stored_bytes: 0,
            owner,
            description: vol_record
                .xattrs
                .get("user.description")
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default(),
            xattrs: vol_record.xattrs.clone(),
            error: None,
        };
        let committed =
            meta::put_snapshot(&txn, &record).and_then(|_| txn.commit().map_err(MetaError::from));
        if let Err(e) = committed {
            // Nothing was promised yet: undo the freeze, keep every change tracked.
            volume.thaw(true)?;
            remove_capture_files(&set_path, &cow_path);
            return Err(e.into());
        }
        self.catalog.write().upsert_snapshot(record.clone());
        let progress = Arc::new(CaptureProgress::default());
        lock(&self.running).insert(id, progress.clone());
        let job = CaptureJob {
            snapshot: id,
            lineage: vol_record.id,
            base: vol_record.base_snapshot,
            volume: volume.clone(),
            freeze,
            progress,
        };
        let engine = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("capture-{id}"))
            .spawn(move || engine.capture(job))
            .map_err(|e| SnapshotError::Io {
                what: "starting capture thread".into(),
                source: e,
            })?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        info!("snapshot {name} (id {id}) started");
        Ok(record)
    }

    fn capture(&self, job: CaptureJob) {
        // Its workers inherit the priority.
        lower_thread_priority();
        self.store.begin_capture();
        match self.store.checkout_writer(&self.meta) {
            Err(e) => self.fail(&job, e.into(), &capture::Batch::default()),
            Ok(writer) => {
                let started = Instant::now();
                let (result, captured) =
                    capture::run(&job, &self.meta, &self.store, &writer, self.capture_threads);
                let result = result
                    .and_then(|()| self.complete(&job, &writer, &captured, started.elapsed()));
                if let Err(e) = result {
                    self.fail(&job, e, &captured.last);
                }
                // Committed batches may live in the pack whatever the outcome: it is
                // never cut back; what nothing references is punched out instead.
                self.store.return_writer(writer);
            }
        }
        remove_capture_files(job.freeze.blocks.path().as_path(), job.freeze.cow_path());
        self.store.end_capture(&self.meta);
        if let Some(progress) = lock(&self.running).remove(&job.snapshot) {
            progress.finish();
        }
    }

    /// Makes a capture durable and visible: chunks first, then one transaction.
    fn complete(
        &self,
        job: &CaptureJob,
        writer: &crate::store::pack::PackWriter,
        captured: &capture::Captured,
        read_time: Duration,
    ) -> SnapshotResult<()> {
        let sync_started = Instant::now();
        writer.pack.sync_data().map_err(|e| {
            SnapshotError::CaptureFailed(format!("syncing pack {}: {e}", writer.pack.id))
        })?;
        let sync_time = sync_started.elapsed();
        let commit_started = Instant::now();
        let (record, settle) = {
            let _ns = self.namespace_lock();
            // An rmdir may have cancelled the capture while it waited for the lock.
            if job.progress.cancelled.load(Ordering::Relaxed) {
                return Err(SnapshotError::Cancelled);
            }
            let committed = self.transact(|txn, staged, settle| {
                settle
                    .freed
                    .extend(capture::commit_entries(txn, job, &captured.last)?);
                capture::record_pack_length(txn, writer)?;
                let Some(mut record) = staged.snapshots.get(&job.snapshot).cloned() else {
                    return Err(SnapshotError::Cancelled);
                };
                record.status = SnapshotStatus::Completed;
                record.completed = Some(Timestamp::now());
                record.parent = staged.visible_parent(job.lineage, job.snapshot);
                record.changed_blocks = captured.changed_blocks;
                record.stored_bytes = captured.stored_bytes;
                meta::put_snapshot(txn, &record)?;
                staged.upsert_snapshot(record.clone());
                if let Some(mut volume) = staged.volumes.get(&job.lineage).cloned() {
                    volume.base_snapshot = Some(job.snapshot);
                    volume.full_compare = false;
                    meta::put_volume(txn, &volume)?;
                    staged.upsert_volume(volume);
                }
                collect_hidden(txn, staged, job.lineage, settle)?;
                Ok(record)
            })?;
            // Still under the namespace lock: the next mkdir must find the volume thawed.
            job.volume.thaw(false)?;
            committed
        };
        self.settled(settle);
        info!(
            "snapshot {} completed: {} blocks changed, {} bytes stored \
             (capture {:.2}s, fsync {:.2}s, commit {:.2}s)",
            record.name(),
            record.changed_blocks,
            record.stored_bytes,
            read_time.as_secs_f64(),
            sync_time.as_secs_f64(),
            commit_started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Records a failed capture (or forgets a cancelled one) and gives its blocks
    /// back to the volume's dirty map. What it stored goes: the uncommitted `leftover`
    /// batch at once, committed batches entry by entry.
    fn fail(&self, job: &CaptureJob, reason: SnapshotError, leftover: &capture::Batch) {
        if let Err(e) = job.volume.thaw(true) {
            error!(
                "snapshot {}: cannot return blocks to the dirty map: {e}",
                job.snapshot
            );
        }
        self.store.release(&self.meta, leftover.unreferenced());
        if let Err(e) = self.drop_entries(job.lineage, job.snapshot) {
            error!(
                "snapshot {}: cannot remove what its capture stored ({e}); the next start retries",
                job.snapshot
            );
            return;
        }
        let cancelled = matches!(reason, SnapshotError::Cancelled);
        let result = {
            let _ns = self.namespace_lock();
            self.transact(|txn, staged, settle| {
                let Some(mut record) = staged.snapshots.get(&job.snapshot).cloned() else {
                    return Ok(());
                };
                if cancelled {
                    meta::delete_snapshot(txn, record.id)?;
                    staged.remove_snapshot(record.id);
                } else {
                    record.status = SnapshotStatus::Error;
                    record.error = Some(reason.to_string());
                    meta::put_snapshot(txn, &record)?;
                    staged.upsert_snapshot(record);
                }
                collect_hidden(txn, staged, job.lineage, settle)
            })
        };
        let result = result.map(|((), settle)| self.settled(settle));
        match (result, cancelled) {
            (Err(e), _) => error!(
                "snapshot {}: cannot record failure ({reason}): {e}",
                job.snapshot
            ),
            (Ok(()), true) => info!("snapshot {} cancelled", job.snapshot),
            (Ok(()), false) => warn!("snapshot {} failed: {reason}", job.snapshot),
        }
    }

    /// Removes the manifest entries a capture that will never complete committed,
    /// in bounded transactions.
    fn drop_entries(&self, lineage: u64, snapshot: u64) -> SnapshotResult<()> {
        loop {
            let (done, settle) = {
                let _ns = self.namespace_lock();
                self.transact(|txn, _, settle| {
                    let step =
                        manifest::remove_snapshot(txn, lineage, snapshot, None, SETTLE_BATCH)?;
                    settle.freed.extend(step.freed);
                    Ok(step.done)
                })?
            };
            self.settled(settle);
            if done {
                return Ok(());
            }
        }
    }

    /// `rmdir snapshots/<name>`. A pending snapshot is cancelled first.
    pub fn delete(&self, name: &str) -> SnapshotResult<()> {
        let mut cancelled = false;
        let (ns, id, record) = loop {
            let ns = self.namespace_lock();
            let found = {
                let records = self.catalog.read();
                records
                    .snapshot_id(name)
                    .and_then(|id| Some((id, records.snapshots.get(&id)?.clone())))
            };
            let Some((id, record)) = found else {
                // A cancelled capture removes its own record.
                return if cancelled {
                    Ok(())
                } else {
                    Err(SnapshotError::NotFound(name.to_string()))
                };
            };
            match self.progress(id) {
                Some(progress) if record.status == SnapshotStatus::Pending => {
                    progress.cancelled.store(true, Ordering::Relaxed);
                    drop(ns);
                    progress.wait();
                    // It may have completed before the cancel took effect: look again.
                    cancelled = true;
                }
                _ => break (ns, id, record),
            }
        };
        let ((), settle) = self.transact(|txn, staged, settle| {
            if record.status != SnapshotStatus::Completed {
                meta::delete_snapshot(txn, id)?;
                staged.remove_snapshot(id);
                return Ok(());
            }
            let mut hidden = record.clone();
            hidden.hidden = true;
            meta::put_snapshot(txn, &hidden)?;
            staged.upsert_snapshot(hidden);
            let successor = staged
                .lineage(record.lineage)
                .find(|s| s.id > id && s.status == SnapshotStatus::Completed)
                .cloned();
            if let Some(mut successor) = successor {
                successor.parent = record.parent.clone();
                meta::put_snapshot(txn, &successor)?;
                staged.upsert_snapshot(successor);
            }
            collect_hidden(txn, staged, record.lineage, settle)
        })?;
        drop(ns);
        self.settled(settle);
        info!("snapshot {name} deleted");
        Ok(())
    }

    /// Deletes a volume's record (the caller holds the namespace lock and deals with
    /// its files). Hidden snapshots kept only as its base can go.
    pub fn delete_volume_record(&self, id: u64) -> SnapshotResult<Settle> {
        let ((), settle) = self.transact(|txn, staged, settle| {
            meta::delete_volume(txn, id)?;
            staged.remove_volume(id);
            collect_hidden(txn, staged, id, settle)
        })?;
        Ok(settle)
    }

    /// Runs `change` in one write transaction on a staged copy of the catalog, which
    /// replaces the catalog once the transaction has committed. The caller holds the
    /// namespace lock, and passes the returned [`Settle`] to [`SnapshotEngine::settled`]
    /// after dropping it.
    fn transact<T>(
        &self,
        change: impl FnOnce(&WriteTransaction, &mut Records, &mut Settle) -> SnapshotResult<T>,
    ) -> SnapshotResult<(T, Settle)> {
        let mut records = self.catalog.write();
        let mut staged = records.clone();
        let mut settle = Settle::new(SETTLE_BATCH);
        let txn = self.meta.begin_write()?;
        let value = change(&txn, &mut staged, &mut settle)?;
        txn.commit().map_err(MetaError::from)?;
        *records = staged;
        Ok((value, settle))
    }

    /// Frees the space a committed transaction released, and hands hidden snapshots
    /// it had no budget left for to the settler. Called without the namespace lock.
    pub fn settled(&self, settle: Settle) {
        self.store.release(&self.meta, settle.freed);
        if settle.more {
            let (pending, signal) = &self.settle_signal;
            *lock(pending) = true;
            signal.notify_one();
        }
    }

    /// Starts the thread that settles large deletions in the background, one bounded
    /// transaction at a time, so that no deletion holds up other snapshots for long.
    pub fn start_settler(self: &Arc<Self>) {
        let engine = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("settler".into())
            .spawn(move || {
                lower_thread_priority();
                loop {
                    let Some(engine) = engine.upgrade() else {
                        return;
                    };
                    {
                        let (pending, signal) = &engine.settle_signal;
                        let mut pending = lock(pending);
                        while !*pending {
                            pending = signal.wait(pending).unwrap_or_else(|p| p.into_inner());
                        }
                        *pending = false;
                    }
                    if let Err(e) = engine.settle_all() {
                        error!("settling deleted snapshots: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            error!(
                "cannot start the settler thread: {e}; deleted snapshots settle at the next start"
            );
        }
    }

    /// Settles hidden snapshots until none can progress, a batch at a time.
    fn settle_all(&self) -> SnapshotResult<()> {
        loop {
            let ((), settle) = {
                let _ns = self.namespace_lock();
                self.transact(|txn, staged, settle| {
                    let lineages: BTreeSet<u64> = staged
                        .snapshots
                        .values()
                        .filter(|s| s.hidden)
                        .map(|s| s.lineage)
                        .collect();
                    for lineage in lineages {
                        collect_hidden(txn, staged, lineage, settle)?;
                    }
                    Ok(())
                })?
            };
            let more = settle.more;
            self.store.release(&self.meta, settle.freed);
            if !more {
                return Ok(());
            }
        }
    }

    /// Reads `buf.len()` bytes of a completed snapshot's image at `offset`.
    pub fn read_image(
        &self,
        record: &SnapshotRecord,
        buf: &mut [u8],
        offset: u64,
    ) -> SnapshotResult<usize> {
        if record.status != SnapshotStatus::Completed {
            return Err(SnapshotError::NotReady(record.name()));
        }
        let end = (offset + buf.len() as u64).min(record.size_bytes);
        if offset >= end {
            return Ok(0);
        }
        let bs = u64::from(record.block_size);
        let txn = self.meta.begin_read()?;
        let manifest_table = txn.open_table(MANIFEST).map_err(MetaError::from)?;
        let chunk_table = txn.open_table(CHUNKS).map_err(MetaError::from)?;
        // Resolve every block first, then read the chunks together.
        let mut pieces = Vec::new();
        let mut chunks = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let take = ((bs - within as u64).min(end - pos)) as usize;
            let at = (pos - offset) as usize;
            match manifest::resolve(&manifest_table, record.lineage, block, record.id)? {
                BlockContent::Zero => buf[at..at + take].fill(0),
                BlockContent::Chunk(hash) => {
                    let Some((loc, _)) = index::lookup(&chunk_table, &hash)? else {
                        return Err(MetaError::Corrupt {
                            what: format!("snapshot {}", record.name()),
                            reason: format!(
                                "block {block} names chunk {hash}, which is not stored"
                            ),
                        }
                        .into());
                    };
                    chunks.push((hash, loc));
                    pieces.push((at, within, take));
                }
            }
            pos += take as u64;
        }
        // Blocks only partly read are likely to be read again (a filesystem mounted
        // from the image reads small pieces): keep those decoded.
        let partial = |i: usize| pieces[i].2 < bs as usize;
        self.store.read_chunks(&chunks, partial, |i, plain| {
            let (at, within, take) = pieces[i];
            buf[at..at + take].copy_from_slice(&plain[within..within + take]);
        })?;
        Ok((end - offset) as usize)
    }

    /// Waits for every running capture (used at unmount).
    pub fn wait_all(&self) {
        let pending: Vec<_> = lock(&self.running).values().cloned().collect();
        if !pending.is_empty() {
            info!(
                "waiting for {} snapshot capture(s) to finish",
                pending.len()
            );
        }
        for progress in pending {
            progress.wait();
        }
        for handle in lock(&self.threads).drain(..) {
            let _ = handle.join();
        }
    }

    /// Start-up: snapshots left pending by a crash become `error`; blocks their
    /// captures held go back to their volumes' dirty maps.
    pub fn recover(&self, volumes: &HashMap<u64, Arc<Volume>>) -> SnapshotResult<()> {
        let (interrupted, completed): (Vec<SnapshotRecord>, HashSet<u64>) = {
            let records = self.catalog.read();
            (
                records
                    .snapshots
                    .values()
                    .filter(|s| s.status == SnapshotStatus::Pending)
                    .cloned()
                    .collect(),
                records
                    .snapshots
                    .values()
                    .filter(|s| s.status == SnapshotStatus::Completed)
                    .map(|s| s.id)
                    .collect(),
            )
        };
        fs::create_dir_all(&self.captures_dir).map_err(|e| SnapshotError::Io {
            what: format!("creating {}", self.captures_dir.display()),
            source: e,
        })?;
        for entry in fs::read_dir(&self.captures_dir).map_err(|e| SnapshotError::Io {
            what: format!("listing {}", self.captures_dir.display()),
            source: e,
        })? {
            let entry = entry.map_err(|e| SnapshotError::Io {
                what: "listing captures".into(),
                source: e,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A capture set whose snapshot completed was merely not cleaned up; any
            // other (pending, or never recorded) goes back to its volume.
            if let Some((volume_id, snapshot_id, "set")) = parse_capture_file(&name)
                && !completed.contains(&snapshot_id)
                && let Some(volume) = volumes.get(&volume_id)
            {
                let set = DirtyMap::open(&entry.path()).map_err(|e| SnapshotError::Io {
                    what: format!("reading {name}"),
                    source: e,
                })?;
                volume.absorb_dirty(&set)?;
                info!(
                    "volume {volume_id}: {} blocks of interrupted snapshot {snapshot_id} returned to its dirty map",
                    set.count()
                );
            }
            fs::remove_file(entry.path()).map_err(|e| SnapshotError::Io {
                what: format!("removing {name}"),
                source: e,
            })?;
        }
        // Interrupted captures, and failed ones whose clean-up a crash cut short, may
        // have committed entries: none may outlive them.
        let failed: Vec<(u64, u64)> = self
            .catalog
            .read()
            .snapshots
            .values()
            .filter(|s| s.status != SnapshotStatus::Completed)
            .map(|s| (s.lineage, s.id))
            .collect();
        for (lineage, id) in failed {
            self.drop_entries(lineage, id)?;
        }
        let _ns = self.namespace_lock();
        let ((), settle) = self.transact(|txn, staged, settle| {
            for mut record in interrupted {
                warn!(
                    "snapshot {} was interrupted by a restart: marking it as error",
                    record.name()
                );
                record.status = SnapshotStatus::Error;
                record.error =
                    Some("capture interrupted: the daemon stopped before it completed".into());
                meta::put_snapshot(txn, &record)?;
                staged.upsert_snapshot(record);
            }
            let hidden: BTreeSet<u64> = staged
                .snapshots
                .values()
                .filter(|s| s.hidden)
                .map(|s| s.lineage)
                .collect();
            for lineage in hidden {
                collect_hidden(txn, staged, lineage, settle)?;
            }
            Ok(())
        })?;
        drop(_ns);
        self.settled(settle);
        Ok(())
    }
}

fn remove_capture_files(set: &Path, cow: &Path) {
    for path in [set, cow] {
        if let Err(e) = fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Manifest entries one transaction moves or drops while settling deletions: bounds
/// how long a deletion holds up other namespace changes.
const SETTLE_BATCH: usize = 16_384;

/// What settling hidden snapshots left to do after a transaction.
pub struct Settle {
    /// Chunks no entry references any more, to free once the transaction committed.
    pub freed: Vec<(ChunkHash, ChunkLocation)>,
    budget: usize,
    /// Hidden snapshots still have entries to settle.
    pub more: bool,
}

impl Settle {
    fn new(budget: usize) -> Settle {
        Settle {
            freed: Vec::new(),
            budget,
            more: false,
        }
    }
}

/// Settles the hidden snapshots of `lineage`, within `settle`'s budget: one with a
/// completed successor merges into it; one whose volume is gone (and with no capture
/// pending) is dropped. A hidden snapshot's record goes once it has no entries left.
fn collect_hidden(
    txn: &WriteTransaction,
    staged: &mut Records,
    lineage: u64,
    settle: &mut Settle,
) -> SnapshotResult<()> {
    let volume_alive = staged.volumes.contains_key(&lineage);
    let snapshots: Vec<SnapshotRecord> = staged.lineage(lineage).cloned().collect();
    let pending = snapshots
        .iter()
        .any(|s| s.status == SnapshotStatus::Pending);
    for hidden in snapshots.iter().filter(|s| s.hidden) {
        let successor = snapshots
            .iter()
            .find(|s| s.id > hidden.id && s.status == SnapshotStatus::Completed)
            .map(|s| s.id);
        if successor.is_none() && (volume_alive || pending) {
            continue;
        }
        if settle.budget == 0 {
            settle.more = true;
            return Ok(());
        }
        let step = manifest::remove_snapshot(txn, lineage, hidden.id, successor, settle.budget)?;
        settle.budget = settle.budget.saturating_sub(step.processed);
        settle.freed.extend(step.freed);
        if step.done {
            meta::delete_snapshot(txn, hidden.id)?;
            staged.remove_snapshot(hidden.id);
        } else {
            settle.budget = 0;
            settle.more = true;
            return Ok(());
        }
    }
    Ok(())
}
