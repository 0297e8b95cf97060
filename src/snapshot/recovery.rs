//! Start-up: what becomes of captures a crash interrupted.
//!
//! After a daemon crash (kill -9, OOM, panic) a snapshot left `pending` resumes its
//! capture: its capture set (`.set`) and preserved pages (`.cow`, each slot checked by
//! its own header) are intact in the page cache even though neither was fsynced, and
//! so are the volume's data file and the entries committed so far. The freeze is
//! reopened from them ([`crate::volume::Volume::resume_freeze`]); the blocks whose
//! entries are committed are done, and the capture reads the rest exactly as at the
//! freeze, so the snapshot completes with its point in time. After a host crash
//! neither file can be trusted (a data write may have reached the disk while the page
//! it overwrote never reached `.cow`), and a snapshot that cannot resume for another
//! reason (an old record without its re-examined range, a missing `.cow`, a damaged
//! set) becomes `error` with the reason: the blocks its capture set held go back to
//! its volume's dirty map first, so the volume's next snapshot still holds every
//! change since the last completed one, and the entries it committed are removed.
//! Then the files in `captures/` are accounted for one by one:
//!
//! | file | its snapshot | action |
//! |---|---|---|
//! | `.set`, `.cow` | pending, capture resumed | kept (the capture removes them when it ends) |
//! | `.set` | completed | removed (its bits were captured) |
//! | `.set` | pending, not resumable, or never recorded (crash before the record committed) | merged into the volume's dirty map, then removed |
//! | `.set` | any, volume deleted | removed (the database records the deletion) |
//! | `.set` | damaged | moved to `lost+found/`; the volume compares every block next time |
//! | `.cow` | not resumed | removed (preserved pages of a capture that ended) |
//! | other | | moved to `lost+found/` |

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::sync::Arc;

use log::{info, warn};

use crate::layout::{CaptureFile, parse_capture_file};
use crate::namespace::{SnapshotId, SnapshotRecord, SnapshotStatus, VolumeId};
use crate::storage::Storage;
use crate::volume::Volume;
use crate::volume::dirty::DirtyMap;

use super::capture::{CaptureJob, CaptureProgress};
use super::settle::{SETTLE_BATCH, Settle};
use super::{SnapshotEngine, SnapshotError, SnapshotResult, manifest};

const INTERRUPTED: &str = "capture interrupted: the daemon stopped before it completed";
const HOST_CRASH: &str = "capture interrupted by a host crash: the pages it preserved may not \
                          have reached the disk, so its point in time cannot be rebuilt";

/// Captures [`SnapshotEngine::recover`] reopened, to start with
/// [`SnapshotEngine::start_resumed`] once start-up has finished its repairs.
pub struct Resumed<S: Storage> {
    jobs: Vec<CaptureJob<S>>,
}

impl<S: Storage> SnapshotEngine<S> {
    /// Recovers after a crash (a no-op after a clean stop). `volumes` are the volumes
    /// that opened; volumes in the catalog but missing from it are damaged, and their
    /// capture files are left where they are. `resume`: whether interrupted captures
    /// may resume (not after a host crash).
    pub fn recover(
        &self,
        volumes: &HashMap<VolumeId, Arc<Volume<S>>>,
        resume: bool,
    ) -> SnapshotResult<Resumed<S>> {
        let dir = self.layout.captures_dir();
        self.storage
            .create_dir_all(&dir)
            .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        let view = self.ns.view();
        let deleted = self.ns.deleted_volumes()?;
        let names = self
            .storage
            .list_dir(&dir)
            .map_err(|e| io_error(format!("listing {}", dir.display()), e))?;
        let mut full_compare = BTreeSet::new();
        let mut leftovers: Vec<OsString> = Vec::new();
        let mut jobs: Vec<CaptureJob<S>> = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let Some((volume_id, snapshot_id, kind)) = parse_capture_file(&name) else {
                self.layout
                    .move_to_lost_found(&self.storage, &path, "not a capture file")
                    .map_err(|e| io_error(format!("moving {}", path.display()), e))?;
                continue;
            };
            let captured = view
                .snapshots
                .get(&snapshot_id)
                .is_some_and(|s| s.is_captured());
            if kind == CaptureFile::Cow || captured {
                leftovers.push(name);
                continue;
            }
            let Some(volume) = volumes.get(&volume_id) else {
                if deleted.contains(&volume_id) {
                    leftovers.push(name);
                } else if !view.volumes.contains_key(&volume_id) {
                    self.layout
                        .move_to_lost_found(&self.storage, &path, "its volume is unknown")
                        .map_err(|e| io_error(format!("moving {}", path.display()), e))?;
                }
                continue;
            };
            let capturing = view
                .snapshots
                .get(&snapshot_id)
                .filter(|s| s.is_capturing());
            if resume && let Some(record) = capturing {
                match self.resume_capture(volume, record) {
                    Ok(Some(job)) => {
                        jobs.push(job);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => warn!("snapshot {}: its capture cannot resume: {e}", record.name()),
                }
            }
            match DirtyMap::open(&self.storage, &path) {
                Ok(set) => {
                    volume.absorb_dirty(&set)?;
                    info!(
                        "volume {volume_id}: {} blocks of interrupted snapshot {snapshot_id} \
                         returned to its dirty map",
                        set.count()
                    );
                    leftovers.push(name);
                }
                Err(e) => {
                    self.layout
                        .move_to_lost_found(
                            &self.storage,
                            &path,
                            &format!("damaged capture set: {e}"),
                        )
                        .map_err(|e| io_error(format!("moving {}", path.display()), e))?;
                    warn!("volume {volume_id}: its next snapshot compares every block");
                    full_compare.insert(volume_id);
                }
            }
        }
        // Interrupted captures, and failed ones whose clean-up a crash cut short, may
        // have committed entries: none may outlive them.
        let resumed: HashSet<SnapshotId> = jobs.iter().map(|job| job.snapshot).collect();
        let unfinished: Vec<(VolumeId, SnapshotId)> = view
            .snapshots
            .values()
            .filter(|s| !s.is_captured() && !resumed.contains(&s.id))
            .map(|s| (s.lineage, s.id))
            .collect();
        for &(lineage, id) in &unfinished {
            self.drop_entries(lineage, id)?;
        }
        let guard = self.ns.lock();
        let pins = HashSet::new();
        let settle = self.ns.change(&guard, |c| -> SnapshotResult<Settle> {
            let mut settle = Settle::new(SETTLE_BATCH);
            let interrupted: Vec<_> = c
                .records()
                .snapshots
                .values()
                .filter(|s| s.is_capturing() && !resumed.contains(&s.id))
                .cloned()
                .collect();
            for mut record in interrupted {
                warn!(
                    "snapshot {} was interrupted by a restart: marking it as error",
                    record.name()
                );
                record.status = SnapshotStatus::Error;
                record.error = Some(if resume { INTERRUPTED } else { HOST_CRASH }.into());
                c.put_snapshot(record)?;
            }
            for id in &full_compare {
                if let Some(mut volume) = c.records().volumes.get(id).cloned() {
                    volume.full_compare = true;
                    c.put_volume(volume)?;
                }
            }
            let hidden: BTreeSet<VolumeId> = c
                .records()
                .snapshots
                .values()
                .filter(|s| s.hidden)
                .map(|s| s.lineage)
                .collect();
            for lineage in hidden {
                settle.collect_hidden(c, lineage, &pins)?;
            }
            Ok(settle)
        })?;
        drop(guard);
        self.settled(settle);
        // Only now, with every record final, are these files garbage; a resumed
        // capture's preserved pages are not.
        for name in leftovers {
            if parse_capture_file(&name).is_some_and(|(_, id, _)| resumed.contains(&id)) {
                continue;
            }
            let path = dir.join(&name);
            self.storage
                .remove_file(&path)
                .map_err(|e| io_error(format!("removing {}", path.display()), e))?;
        }
        Ok(Resumed { jobs })
    }

    /// Reopens the freeze of `record`, a snapshot whose capture a daemon crash
    /// interrupted, and rebuilds its job: the blocks whose entries are committed are
    /// done, the capture goes on with the rest. `None`: the record predates resuming.
    fn resume_capture(
        &self,
        volume: &Arc<Volume<S>>,
        record: &SnapshotRecord,
    ) -> SnapshotResult<Option<CaptureJob<S>>> {
        let Some([start, end]) = record.reexamine else {
            return Ok(None);
        };
        let committed = manifest::committed_blocks(&self.ns.read()?, record.id)?;
        let committed_before = committed.len() as u64;
        let freeze = volume.resume_freeze(record.id, start..end, record.size_bytes, committed)?;
        let base = self.ns.view().capture_base(record.lineage);
        info!(
            "snapshot {} resumes its capture: {committed_before} entries were committed \
             before the restart",
            record.name()
        );
        Ok(Some(CaptureJob {
            snapshot: record.id,
            lineage: record.lineage,
            base,
            volume: volume.clone(),
            freeze,
            progress: Arc::new(CaptureProgress::default()),
            committed_before,
        }))
    }

    /// Starts the captures [`SnapshotEngine::recover`] reopened.
    pub fn start_resumed(self: &Arc<Self>, resumed: Resumed<S>) -> SnapshotResult<()> {
        for job in resumed.jobs {
            self.register(&job);
            self.start_capture(job)?;
        }
        Ok(())
    }
}

fn io_error(what: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { what, source }
}
