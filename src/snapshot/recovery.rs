//! Start-up: what becomes of captures a crash interrupted.
//!
//! A snapshot left `pending` by a crash becomes `error` (its capture cannot resume
//! yet); the blocks its capture set held go back to its volume's dirty map first, so
//! the volume's next snapshot still holds every change since the last completed one.
//! Entries an interrupted or failed capture committed are removed. Then the files in
//! `captures/` are accounted for one by one:
//!
//! | file | its snapshot | action |
//! |---|---|---|
//! | `.set` | completed | removed (its bits were captured) |
//! | `.set` | pending, or never recorded (crash before the record committed) | merged into the volume's dirty map, then removed |
//! | `.set` | any, volume deleted | removed (the database records the deletion) |
//! | `.set` | damaged | moved to `lost+found/`; the volume compares every block next time |
//! | `.cow` | not pending any more | removed (preserved pages of a capture that ended) |
//! | other | | moved to `lost+found/` |

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::sync::Arc;

use log::{info, warn};

use crate::layout::{CaptureFile, parse_capture_file};
use crate::namespace::{SnapshotId, SnapshotStatus, VolumeId};
use crate::storage::Storage;
use crate::volume::Volume;
use crate::volume::dirty::DirtyMap;

use super::settle::{SETTLE_BATCH, Settle};
use super::{SnapshotEngine, SnapshotError, SnapshotResult};

const INTERRUPTED: &str = "capture interrupted: the daemon stopped before it completed";

impl<S: Storage> SnapshotEngine<S> {
    /// Recovers after a crash (a no-op after a clean stop). `volumes` are the volumes
    /// that opened; volumes in the catalog but missing from it are damaged, and their
    /// capture files are left where they are.
    pub fn recover(&self, volumes: &HashMap<VolumeId, Arc<Volume<S>>>) -> SnapshotResult<()> {
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
        let unfinished: Vec<(VolumeId, SnapshotId)> = view
            .snapshots
            .values()
            .filter(|s| !s.is_captured())
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
                .filter(|s| s.is_capturing())
                .cloned()
                .collect();
            for mut record in interrupted {
                warn!(
                    "snapshot {} was interrupted by a restart: marking it as error",
                    record.name()
                );
                record.status = SnapshotStatus::Error;
                record.error = Some(INTERRUPTED.into());
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
        // Only now, with every record final, are these files garbage.
        for name in leftovers {
            let path = dir.join(&name);
            self.storage
                .remove_file(&path)
                .map_err(|e| io_error(format!("removing {}", path.display()), e))?;
        }
        Ok(())
    }
}

fn io_error(what: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { what, source }
}
