//! The life of a snapshot, in one place.
//!
//! ```text
//!            mkdir                    capture committed
//!   (none) ─────────► pending ────────────────────────► completed ◄─────┐ mv (restore)
//!                        │  capture failed / interrupted      │ rmdir   │
//!                        ├──────────────────────────► error   ├────► binned (recycle
//!                        │ rmdir (cancel)              │      ▼         │  bin on)
//!                        │                             │    hidden ◄────┘ rmdir, or
//!                        ▼                      rmdir  ▼      │ merged   retention ran out
//!                      (gone) ◄──────────────────── (gone) ◄──┘ or dropped (settle)
//! ```
//!
//! Rules kept here:
//! - one capture per volume at a time: a second `mkdir` while one is pending is `EBUSY`;
//! - `mkdir` returns once the pending record is committed; the freeze happened under
//!   the same namespace lock, so the snapshot holds exactly the writes acknowledged
//!   before it returned;
//! - a snapshot becomes `completed` only in the transaction that commits the last
//!   batch of its manifest, after its chunks are durable;
//! - a failed or interrupted capture returns its blocks to the volume's dirty map, so
//!   the next snapshot still holds every change since the last completed one, and the
//!   entries it committed are removed before it is marked `error`;
//! - a deleted snapshot stays, hidden, while it is the base of its volume's next
//!   capture or while an open image pins it (see [`super::read`]), then settles;
//! - with the recycle bin on, `rmdir` of a completed snapshot only marks its record
//!   `binned` (one transaction: a crash leaves it either visible or in the bin, whole
//!   either way); its name stays taken, so a restore always finds it free; a purge is
//!   the deletion above. Locked snapshots cannot be deleted, so never reach the bin.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::layout::CaptureFile;
use crate::names::SnapshotName;
use crate::namespace::{
    NsGuard, Owner, Records, SnapshotId, SnapshotRecord, SnapshotStatus, Timestamp, VolumeId,
};
use crate::storage::Storage;
use crate::store::pack::PackWriter;
use crate::volume::{Rescan, Volume};

use super::capture::{self, CaptureJob, CaptureProgress};
use super::settle::{SETTLE_BATCH, Settle};
use super::{
    Scheduling, SnapshotEngine, SnapshotError, SnapshotResult, lock, lower_thread_priority,
    manifest,
};

impl<S: Storage> SnapshotEngine<S> {
    /// `mkdir snapshots/<vol>@<label>`: freezes the volume and starts the capture.
    /// Returns as soon as the pending record is durable.
    pub fn create(
        self: &Arc<Self>,
        name: &SnapshotName,
        volume: &Arc<Volume<S>>,
        owner: Owner,
    ) -> SnapshotResult<SnapshotRecord> {
        let mut records = self.create_set(&[(name.clone(), volume.clone())], owner)?;
        Ok(records.remove(0))
    }

    /// Snapshots of several volumes at one instant (a crash-consistent set): every
    /// volume is frozen under its barrier while all the barriers are held (see
    /// [`Volume::freeze_together`]), and every pending record commits in one
    /// transaction. All or nothing: any refusal (a name taken, a volume busy or
    /// unknown, one volume twice) creates none.
    pub fn create_set(
        self: &Arc<Self>,
        members: &[(SnapshotName, Arc<Volume<S>>)],
        owner: Owner,
    ) -> SnapshotResult<Vec<SnapshotRecord>> {
        let guard = self.ns.lock();
        let view = self.ns.view();
        let mut vols = Vec::with_capacity(members.len());
        for (name, _) in members {
            if view.binned_id(&name.to_string()).is_some() {
                return Err(SnapshotError::InBin(name.to_string()));
            }
            if view.name_taken(&name.to_string()) {
                return Err(SnapshotError::Exists(name.to_string()));
            }
            let Some(vol) = view.volume_by_name(name.volume().as_str()).cloned() else {
                return Err(SnapshotError::NoVolume(name.volume().to_string()));
            };
            if view.pending_in(vol.id).is_some() {
                return Err(SnapshotError::Busy(vol.name.clone()));
            }
            if vols
                .iter()
                .any(|v: &crate::namespace::VolumeRecord| v.id == vol.id)
            {
                return Err(SnapshotError::CaptureFailed(format!(
                    "volume {} appears twice in one set",
                    vol.name
                )));
            }
            vols.push(vol);
        }
        let rescans: Vec<Rescan> = vols
            .iter()
            .map(|vol| {
                // The largest image any earlier snapshot of the volume held: blocks
                // past it cannot show through from older entries.
                let high_water = view
                    .lineage(vol.id)
                    .filter(|s| s.status == SnapshotStatus::Completed)
                    .map(|s| s.size_bytes)
                    .fold(vol.high_water_bytes, u64::max);
                if vol.full_compare {
                    Rescan::All
                } else {
                    Rescan::ShrunkBelow(high_water)
                }
            })
            .collect();
        let mut frozen: Vec<(SnapshotId, Arc<crate::volume::freeze::Freeze<S>>)> = Vec::new();
        let committed = self
            .ns
            .change(&guard, |c| -> SnapshotResult<Vec<SnapshotRecord>> {
                let mut ids = Vec::with_capacity(members.len());
                for _ in members {
                    ids.push(c.next_snapshot_id()?);
                }
                let set: Vec<(&Volume<S>, SnapshotId, Rescan)> = members
                    .iter()
                    .zip(&ids)
                    .zip(&rescans)
                    .map(|(((_, volume), id), rescan)| (&**volume, *id, *rescan))
                    .collect();
                let freezes = Volume::freeze_together(&set)?;
                frozen = ids.iter().copied().zip(freezes).collect();
                let mut records = Vec::with_capacity(members.len());
                for (((name, _), vol), (id, freeze)) in members.iter().zip(&vols).zip(&frozen) {
                    let record = SnapshotRecord {
                        id: *id,
                        volume: vol.name.clone(),
                        label: name.label().to_string(),
                        lineage: vol.id,
                        size_bytes: freeze.size_bytes,
                        block_size: vol.block_size,
                        created: Timestamp::now(),
                        completed: None,
                        status: SnapshotStatus::Pending,
                        hidden: false,
                        parent: c.records().visible_parent(vol.id, *id),
                        changed_blocks: 0,
                        stored_bytes: 0,
                        owner,
                        description: vol
                            .xattrs
                            .get("user.description")
                            .map(|d| String::from_utf8_lossy(&d).into_owned())
                            .unwrap_or_default(),
                        xattrs: vol.xattrs.user_only(),
                        error: None,
                        captured: false,
                        remote_root: None,
                        reexamine: Some([freeze.reexamine.start, freeze.reexamine.end]),
                        binned: None,
                    };
                    c.put_snapshot(record.clone())?;
                    records.push(record);
                }
                Ok(records)
            });
        let records = match committed {
            Ok(records) => records,
            Err(e) => {
                // Nothing was promised yet: undo the freezes, keep every change tracked.
                // (`frozen` is empty if freezing failed: that undid its own.)
                for (((_, volume), vol), (id, _)) in members.iter().zip(&vols).zip(&frozen) {
                    volume.thaw(true)?;
                    self.remove_capture_files(vol.id, *id);
                }
                return Err(e);
            }
        };
        let mut jobs = Vec::with_capacity(members.len());
        for (((_, volume), vol), (id, freeze)) in members.iter().zip(&vols).zip(frozen) {
            let job = CaptureJob {
                snapshot: id,
                lineage: vol.id,
                base: view.capture_base(vol.id),
                volume: volume.clone(),
                freeze,
                progress: Arc::new(CaptureProgress::default()),
                committed_before: 0,
            };
            self.register(&job);
            jobs.push(job);
        }
        drop(guard);
        for job in jobs {
            self.start_capture(job)?;
        }
        for record in &records {
            info!("snapshot {} (id {}) started", record.name(), record.id);
        }
        Ok(records)
    }

    pub(super) fn start_capture(self: &Arc<Self>, job: CaptureJob<S>) -> SnapshotResult<()> {
        if self.scheduling == Scheduling::Manual {
            lock(&self.queued).push(job);
            return Ok(());
        }
        let engine = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("capture-{}", job.snapshot))
            .spawn(move || {
                // Its workers inherit the priority.
                lower_thread_priority();
                engine.capture(job)
            })
            .map_err(|e| SnapshotError::Io {
                what: "starting capture thread".into(),
                source: e,
            })?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
        Ok(())
    }

    /// Runs a capture to its end: completed, error, or cancelled.
    pub(super) fn capture(&self, job: CaptureJob<S>) {
        self.store.begin_capture();
        match self.store.checkout_writer(&self.ns) {
            Err(e) => self.fail(&job, e.into(), &capture::Batch::default()),
            Ok(writer) => {
                let started = Instant::now();
                let committed = |hashes| self.committed_chunks(job.snapshot, hashes);
                let (result, captured) = capture::run(
                    &job,
                    &self.ns,
                    &self.store,
                    &writer,
                    self.capture_threads,
                    &committed,
                );
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
        // Only now, with the record final, are the capture's files garbage.
        self.remove_capture_files(job.lineage, job.snapshot);
        self.store.end_capture(&self.ns);
        let running = lock(&self.running).remove(&job.snapshot);
        if let Some((progress, _)) = running {
            progress.finish();
        }
    }

    /// Makes a capture durable and visible: chunks first, then one transaction.
    fn complete(
        &self,
        job: &CaptureJob<S>,
        writer: &PackWriter<S>,
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
            let guard = self.ns.lock();
            // An rmdir may have cancelled the capture while it waited for the lock.
            if job.progress.cancelled.load(Ordering::Relaxed) {
                return Err(SnapshotError::Cancelled);
            }
            let pins = self.pinned();
            let committed = self.ns.change(&guard, |c| {
                let mut settle = Settle::new(SETTLE_BATCH);
                settle.freed.extend(capture::commit_entries(
                    c.txn(),
                    job,
                    &captured.last,
                    &self.store,
                )?);
                c.set_pack_len(writer.pack.id, writer.end())?;
                let Some(mut record) = c.records().snapshots.get(&job.snapshot).cloned() else {
                    return Err(SnapshotError::Cancelled);
                };
                if self.remote.is_some() {
                    // Completed once uploaded (see `upload`).
                    record.captured = true;
                } else {
                    record.status = SnapshotStatus::Completed;
                    record.completed = Some(Timestamp::now());
                }
                record.parent = c.records().visible_parent(job.lineage, job.snapshot);
                record.changed_blocks = captured.changed_blocks;
                record.stored_bytes = captured.stored_bytes;
                c.put_snapshot(record.clone())?;
                if let Some(mut volume) = c.records().volumes.get(&job.lineage).cloned() {
                    volume.base_snapshot = Some(job.snapshot);
                    volume.full_compare = false;
                    volume.high_water_bytes = volume.high_water_bytes.max(record.size_bytes);
                    c.put_volume(volume)?;
                }
                settle.collect_hidden(c, job.lineage, &pins)?;
                Ok((record, settle))
            })?;
            // Still under the namespace lock: the next mkdir must find the volume thawed.
            job.volume.thaw(false)?;
            committed
        };
        self.settled(settle);
        self.queue_upload(record.id);
        info!(
            "snapshot {} {}: {} blocks changed, {} bytes stored \
             (capture {:.2}s, fsync {:.2}s, commit {:.2}s)",
            record.name(),
            if record.captured {
                "captured, uploading"
            } else {
                "completed"
            },
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
    fn fail(&self, job: &CaptureJob<S>, reason: SnapshotError, leftover: &capture::Batch) {
        // First, before the freeze ends and writes stop being preserved: without its
        // preserved pages, a capture a crash interrupts from here on cannot resume
        // with a wrong point in time (see `recovery`); the open handle still reads.
        let cow = self
            .layout
            .capture_file(job.lineage, job.snapshot, CaptureFile::Cow);
        if let Err(e) = self.storage.remove_file(&cow)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            error!("cannot remove {}: {e}", cow.display());
        }
        if let Err(e) = job.volume.thaw(true) {
            error!(
                "snapshot {}: cannot return blocks to the dirty map: {e}",
                job.snapshot
            );
        }
        self.store.release(&self.ns, leftover.unreferenced());
        if let Err(e) = self.drop_entries(job.lineage, job.snapshot) {
            error!(
                "snapshot {}: cannot remove what its capture stored ({e}); the next start retries",
                job.snapshot
            );
            return;
        }
        let cancelled = matches!(reason, SnapshotError::Cancelled);
        let result = self.finish_failed(job.lineage, job.snapshot, &reason.to_string(), cancelled);
        match (result, cancelled) {
            (Err(e), _) => error!(
                "snapshot {}: cannot record failure ({reason}): {e}",
                job.snapshot
            ),
            (Ok(()), true) => info!("snapshot {} cancelled", job.snapshot),
            (Ok(()), false) => warn!("snapshot {} failed: {reason}", job.snapshot),
        }
    }

    /// Marks a snapshot whose capture ended without completing as `error` with
    /// `reason`, or removes its record when it was cancelled.
    pub(super) fn finish_failed(
        &self,
        lineage: VolumeId,
        snapshot: SnapshotId,
        reason: &str,
        cancelled: bool,
    ) -> SnapshotResult<()> {
        let guard = self.ns.lock();
        let pins = self.pinned();
        let settle = self.ns.change(&guard, |c| -> SnapshotResult<Settle> {
            let mut settle = Settle::new(SETTLE_BATCH);
            let Some(mut record) = c.records().snapshots.get(&snapshot).cloned() else {
                return Ok(settle);
            };
            if cancelled {
                c.remove_snapshot(record.id)?;
            } else {
                record.status = SnapshotStatus::Error;
                record.error = Some(reason.to_string());
                crate::namespace::clear_uploaded(c.txn(), record.id)?;
                c.put_snapshot(record)?;
            }
            settle.collect_hidden(c, lineage, &pins)?;
            Ok(settle)
        })?;
        drop(guard);
        self.settled(settle);
        Ok(())
    }

    /// Removes the manifest entries a capture that will never complete committed,
    /// in bounded transactions.
    pub(super) fn drop_entries(
        &self,
        lineage: VolumeId,
        snapshot: SnapshotId,
    ) -> SnapshotResult<()> {
        loop {
            let (done, freed) = self.ns.change_data(|d| -> SnapshotResult<_> {
                let step =
                    manifest::remove_snapshot(d.txn(), lineage, snapshot, None, SETTLE_BATCH)?;
                Ok((step.done, step.freed))
            })?;
            self.store.release(&self.ns, freed);
            if done {
                return Ok(());
            }
        }
    }

    /// `rmdir snapshots/<name>` with the recycle bin on: moves a completed snapshot
    /// into the bin (one change of its record; nothing else moves, so its chain, its
    /// copy in the bucket and every volume made from it stay as they are). Returns
    /// `false`, changing nothing, for one that is not completed (pending, uploading,
    /// failed): [`SnapshotEngine::delete`] is for those.
    pub fn bin(&self, name: &str) -> SnapshotResult<bool> {
        self.move_binned(name, false, |record| {
            if let Some(until) = super::locked_until(record) {
                return Err(SnapshotError::Locked {
                    name: name.to_string(),
                    until: until.to_rfc3339(),
                });
            }
            Ok(record.status == SnapshotStatus::Completed)
        })
    }

    /// `mv recycle-bin/<name> snapshots/`: the snapshot is back as it was.
    pub fn restore(&self, name: &str) -> SnapshotResult<()> {
        self.move_binned(name, true, |_| Ok(true)).map(|_| ())
    }

    /// Moves snapshot `name` into the recycle bin, or out of it (`from_bin`), in one
    /// commit of its record, if `check` says so (`false`: nothing is changed).
    fn move_binned(
        &self,
        name: &str,
        from_bin: bool,
        check: impl FnOnce(&SnapshotRecord) -> SnapshotResult<bool>,
    ) -> SnapshotResult<bool> {
        let guard = self.ns.lock();
        let view = self.ns.view();
        let id = match from_bin {
            true => view.binned_id(name),
            false => view.snapshot_id(name),
        };
        let Some(mut record) = id.and_then(|id| view.snapshots.get(&id).cloned()) else {
            return Err(SnapshotError::NotFound(match from_bin {
                true => format!("recycle-bin/{name}"),
                false => name.to_string(),
            }));
        };
        if !check(&record)? {
            return Ok(false);
        }
        record.binned = (!from_bin).then(Timestamp::now);
        self.ns.change(&guard, |c| c.put_snapshot(record))?;
        match from_bin {
            true => info!("snapshot {name} restored from the recycle bin"),
            false => info!("snapshot {name} moved to the recycle bin"),
        }
        Ok(true)
    }

    /// `rmdir recycle-bin/<name>`, or its retention ran out: deleted for good, as
    /// [`SnapshotEngine::delete`] deletes a snapshot.
    pub fn purge(&self, name: &str) -> SnapshotResult<()> {
        self.delete_found(name, |view| view.binned_id(name))
    }

    /// `rmdir snapshots/<name>`. A pending snapshot is cancelled first.
    pub fn delete(&self, name: &str) -> SnapshotResult<()> {
        self.delete_found(name, |view| view.snapshot_id(name))
    }

    /// Deletes the snapshot `find` names (`name`, for messages).
    fn delete_found(
        &self,
        name: &str,
        find: impl Fn(&Records) -> Option<SnapshotId>,
    ) -> SnapshotResult<()> {
        // No upload may put a root between the look at the record and the deletion.
        let _commit = self.remote.as_ref().map(|up| lock(&up.commit));
        let mut cancelled = false;
        let (guard, id, record) = loop {
            let guard = self.ns.lock();
            let view = self.ns.view();
            let found = find(&view).and_then(|id| Some((id, view.snapshots.get(&id)?.clone())));
            let Some((id, record)) = found else {
                // A cancelled capture removes its own record.
                return if cancelled {
                    Ok(())
                } else {
                    Err(SnapshotError::NotFound(name.to_string()))
                };
            };
            if let Some(until) = super::locked_until(&record) {
                return Err(SnapshotError::Locked {
                    name: name.to_string(),
                    until: until.to_rfc3339(),
                });
            }
            if !record.is_capturing() {
                break (guard, id, record);
            }
            let queued = {
                let mut queue = lock(&self.queued);
                queue
                    .iter()
                    .position(|job| job.snapshot == id)
                    .map(|at| queue.remove(at))
            };
            drop(guard);
            if let Some(job) = queued {
                // Manual scheduling: the capture never started; end it here.
                job.progress.cancelled.store(true, Ordering::Relaxed);
                self.fail(&job, SnapshotError::Cancelled, &capture::Batch::default());
                self.remove_capture_files(job.lineage, job.snapshot);
                let running = lock(&self.running).remove(&id);
                if let Some((progress, _)) = running {
                    progress.finish();
                }
            } else if let Some(progress) = self.progress(id) {
                progress.cancelled.store(true, Ordering::Relaxed);
                progress.wait();
            } else {
                // Pending with no capture left to cancel: its end could not be
                // recorded (the failure is logged); the next start marks it.
                return Err(SnapshotError::CaptureFailed(format!(
                    "snapshot {name} was cancelled but its record could not be updated; \
                     it is cleaned up at the next start"
                )));
            }
            // It may have completed before the cancel took effect: look again.
            cancelled = true;
        };
        let pins = self.pinned();
        let settle = self.ns.change(&guard, |c| -> SnapshotResult<Settle> {
            let mut settle = Settle::new(SETTLE_BATCH);
            if !record.is_captured() {
                c.remove_snapshot(id)?;
                return Ok(settle);
            }
            let mut hidden = record.clone();
            hidden.hidden = true;
            // One still uploading stops: it is kept only as the volume's base.
            hidden.status = SnapshotStatus::Completed;
            Self::tombstone_due(c, &hidden)?;
            c.put_snapshot(hidden)?;
            let successor = c
                .records()
                .lineage(record.lineage)
                .find(|s| s.id > id && s.is_captured())
                .cloned();
            if let Some(mut successor) = successor {
                successor.parent = record.parent.clone();
                c.put_snapshot(successor)?;
            }
            settle.collect_hidden(c, record.lineage, &pins)?;
            Ok(settle)
        })?;
        drop(guard);
        self.settled(settle);
        self.wake_tombstones();
        info!("snapshot {name} deleted");
        Ok(())
    }

    /// Deletes a volume's record; the caller holds the namespace lock, deals with
    /// the volume's files, and passes the returned [`Settle`] to
    /// [`SnapshotEngine::settled`] once it has let go of the lock. Deleted snapshots
    /// kept only as the volume's base can go.
    pub fn delete_volume_record(
        &self,
        guard: &NsGuard<'_>,
        id: VolumeId,
    ) -> SnapshotResult<Settle> {
        let pins = self.pinned();
        self.ns.change(guard, |c| -> SnapshotResult<Settle> {
            let mut settle = Settle::new(SETTLE_BATCH);
            c.remove_volume(id)?;
            // Its snapshots hold every block themselves (its first capture compared
            // them all): the snapshot in the bucket it was made from is not needed.
            if c.records().remote_parents.contains_key(&id) {
                c.remove_remote_parent(id)?;
            }
            settle.collect_hidden(c, id, &pins)?;
            Ok(settle)
        })
    }

    pub(super) fn remove_capture_files(&self, volume: VolumeId, snapshot: SnapshotId) {
        for kind in [CaptureFile::Set, CaptureFile::Cow] {
            let path = self.layout.capture_file(volume, snapshot, kind);
            if let Err(e) = self.storage.remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}
