//! The files of volumes and captures, and files nothing accounts for.
//!
//! A volume needs its data file and its dirty map. A capture set of a snapshot that
//! did not complete is needed too: the next mount returns its blocks to the volume's
//! dirty map. Everything else in `volumes/`, `captures/` and `chunks/` that no record
//! accounts for is an orphan: the repair moves it to `lost+found/`, never deletes it.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;

use crate::config::ByteSize;
use crate::layout::{
    CaptureFile, VolumeFile, parse_capture_file, parse_pack_file, parse_volume_file,
};
use crate::namespace::{
    Namespace, NamespaceError, Records, SnapshotStatus, VolumeId, VolumeRecord,
};
use crate::storage::Storage;
use crate::volume::dirty::{DirtyMap, NEVER_SHRUNK};

use super::{CheckError, Checker, Problem, Severity, io_error};

/// What a file found in the data directory is.
enum Verdict {
    Needed,
    /// Needed, but it does not open: why.
    Damaged(String),
    Orphan(&'static str),
}

impl<S: Storage> Checker<'_, S> {
    /// Counts the records and checks each volume's files and base snapshot.
    pub(super) fn check_records(&mut self, ns: &Namespace) -> Result<(), CheckError> {
        let view = ns.view();
        let totals = &mut self.report.totals;
        totals.volumes = view.volumes.len();
        totals.snapshots = view.visible_snapshots().count();
        totals.hidden_snapshots = view.snapshots.len() - totals.snapshots;
        for s in view.snapshots.values() {
            if s.status == SnapshotStatus::Pending {
                self.note(format!(
                    "snapshot {} was being captured when the daemon stopped: the next mount \
                     marks it as error, and the volume's next snapshot holds its changes",
                    s.name()
                ));
            }
        }
        if self
            .storage
            .file_len(&self.layout.session())
            .ok()
            .flatten()
            .is_some()
        {
            self.note("the last mount did not stop cleanly: the next mount recovers");
        }
        for record in view.volumes.values() {
            self.check_volume(ns, &view, record)?;
        }
        Ok(())
    }

    fn check_volume(
        &mut self,
        ns: &Namespace,
        view: &Records,
        record: &VolumeRecord,
    ) -> Result<(), CheckError> {
        let subject = format!("volume {} (id {})", record.name, record.id);
        let data = self.layout.volume_file(record.id, VolumeFile::Data);
        let data_len = self
            .storage
            .file_len(&data)
            .map_err(io_error(format!("reading {}", data.display())))?;
        if data_len.is_none() {
            let problem = Problem::new(
                Severity::Corruption,
                subject.clone(),
                format!("its data file {} is missing", self.shown(&data)),
            )
            .with(self.cannot_fix(
                "the volume's data is gone; it is served as damaged (EIO) until deleted with rm",
            ));
            self.push(problem);
        }
        self.check_dirty_map(ns, record.id, &subject);
        if let Some(base) = record.base_snapshot
            && !view.snapshots.contains_key(&base)
        {
            let outcome = self.fix(|| -> Result<String, NamespaceError> {
                update_volume(ns, record.id, |v| {
                    v.base_snapshot = None;
                    v.full_compare = true;
                })?;
                Ok("base cleared: the next snapshot stores every block".into())
            });
            self.push(
                Problem::new(
                    Severity::Corruption,
                    subject,
                    format!(
                        "its next snapshot would be incremental against snapshot id {base}, \
                         which does not exist, and miss blocks"
                    ),
                )
                .with(outcome),
            );
        }
        Ok(())
    }

    fn check_dirty_map(&mut self, ns: &Namespace, volume: VolumeId, subject: &str) {
        let dirty = self.layout.volume_file(volume, VolumeFile::Dirty);
        let Err(e) = DirtyMap::open(self.storage, &dirty) else {
            return;
        };
        let fresh = self.layout.volume_file(volume, VolumeFile::DirtyNew);
        if e.is_missing() && DirtyMap::open(self.storage, &fresh).is_ok() {
            self.note(format!(
                "{subject}: a snapshot's freeze was interrupted; the next mount puts its fresh \
                 dirty map in place"
            ));
            return;
        }
        let state = match e.is_missing() {
            true => "missing".to_string(),
            false => format!("damaged ({e})"),
        };
        let outcome = self.fix(|| self.replace_dirty_map(ns, volume, !e.is_missing()));
        self.push(
            Problem::new(
                Severity::Corruption,
                subject,
                format!(
                    "its dirty map is {state}: the volume cannot be opened, and which blocks \
                     changed since its last snapshot is unknown"
                ),
            )
            .with(outcome),
        );
    }

    /// Puts an empty dirty map in place of a missing or damaged one (which moves to
    /// `lost+found/`), and has the volume's next snapshot compare every block.
    fn replace_dirty_map(
        &self,
        ns: &Namespace,
        volume: VolumeId,
        exists: bool,
    ) -> Result<String, String> {
        let path = self.layout.volume_file(volume, VolumeFile::Dirty);
        let mut done = String::new();
        if exists {
            let moved = self
                .to_lost_found(&path, "damaged dirty map")
                .map_err(|e| e.to_string())?;
            done = format!("the damaged map {moved}; ");
        }
        update_volume(ns, volume, |v| v.full_compare = true).map_err(|e| e.to_string())?;
        DirtyMap::create(self.storage, &path, NEVER_SHRUNK).map_err(|e| e.to_string())?;
        Ok(format!(
            "{done}an empty map is in place and the volume's next snapshot compares every block"
        ))
    }

    /// Accounts for every file in `volumes/`, `captures/` and `chunks/`.
    pub(super) fn check_orphans(&mut self, ns: &Namespace) -> Result<(), CheckError> {
        let view = ns.view();
        let deleted = ns.deleted_volumes()?;
        let packs: BTreeSet<u32> = ns.packs()?.into_iter().map(|(id, _)| id).collect();
        for dir in [
            self.layout.volumes_dir(),
            self.layout.captures_dir(),
            self.layout.chunks_dir(),
        ] {
            let names = match self.storage.list_dir(&dir) {
                Ok(names) => names,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(format!("listing {}", dir.display()))(e)),
            };
            for name in names {
                let path = dir.join(&name);
                let verdict = if dir == self.layout.volumes_dir() {
                    self.volume_file_verdict(&view, &deleted, &name)
                } else if dir == self.layout.captures_dir() {
                    self.capture_file_verdict(&view, &path, &name)
                } else if parse_pack_file(&name).is_some_and(|id| packs.contains(&id)) {
                    Verdict::Needed
                } else {
                    Verdict::Orphan("no pack of this name was ever committed")
                };
                match verdict {
                    Verdict::Needed => {}
                    Verdict::Damaged(why) => self.report_damaged_capture_set(ns, &path, &name, why),
                    Verdict::Orphan(why) => self.report_orphan(&path, why),
                }
            }
        }
        Ok(())
    }

    fn volume_file_verdict(
        &self,
        view: &Records,
        deleted: &BTreeSet<VolumeId>,
        name: &OsStr,
    ) -> Verdict {
        let Some((id, kind)) = parse_volume_file(name) else {
            return Verdict::Orphan("not a volume file");
        };
        if !view.volumes.contains_key(&id) {
            return Verdict::Orphan(if deleted.contains(&id) {
                "its volume was deleted"
            } else {
                "it belongs to no volume"
            });
        }
        match kind {
            VolumeFile::Data | VolumeFile::Dirty | VolumeFile::Present => Verdict::Needed,
            // Needed only while the map it replaces is missing (an interrupted freeze).
            VolumeFile::DirtyNew => {
                let dirty = self.layout.volume_file(id, VolumeFile::Dirty);
                match DirtyMap::open(self.storage, &dirty) {
                    Err(e) if e.is_missing() => Verdict::Needed,
                    _ => Verdict::Orphan("a fresh dirty map a freeze never used"),
                }
            }
        }
    }

    fn capture_file_verdict(&self, view: &Records, path: &Path, name: &OsStr) -> Verdict {
        let Some((volume, snapshot, kind)) = parse_capture_file(name) else {
            return Verdict::Orphan("not a capture file");
        };
        if !view.volumes.contains_key(&volume) {
            return Verdict::Orphan("its volume is gone");
        }
        let completed = view
            .snapshots
            .get(&snapshot)
            .is_some_and(|s| s.status == SnapshotStatus::Completed);
        match kind {
            CaptureFile::Cow => Verdict::Orphan("pages preserved for a capture that ended"),
            CaptureFile::Set if completed => {
                Verdict::Orphan("the capture set of a completed snapshot")
            }
            // Its blocks go back to the volume's dirty map at the next mount.
            CaptureFile::Set => match DirtyMap::open(self.storage, path) {
                Ok(_) => Verdict::Needed,
                Err(e) => Verdict::Damaged(e.to_string()),
            },
        }
    }

    fn report_damaged_capture_set(
        &mut self,
        ns: &Namespace,
        path: &Path,
        name: &OsStr,
        why: String,
    ) {
        let volume = parse_capture_file(name).map(|(v, _, _)| v);
        let outcome = self.fix(|| -> Result<String, String> {
            let moved = self
                .to_lost_found(path, "damaged capture set")
                .map_err(|e| e.to_string())?;
            if let Some(volume) = volume {
                update_volume(ns, volume, |v| v.full_compare = true).map_err(|e| e.to_string())?;
            }
            Ok(format!(
                "{moved}; the volume's next snapshot compares every block"
            ))
        });
        self.push(
            Problem::new(
                Severity::Corruption,
                self.shown(path),
                format!(
                    "the capture set of an unfinished snapshot is damaged ({why}): the blocks \
                     it recorded as changed are unknown"
                ),
            )
            .with(outcome),
        );
    }

    fn report_orphan(&mut self, path: &Path, why: &str) {
        let size = self.storage.file_len(path).ok().flatten();
        let outcome = self.fix(|| self.to_lost_found(path, why));
        let detail = match size {
            Some(bytes) => format!("{why} ({})", ByteSize(bytes)),
            None => why.to_string(),
        };
        self.push(Problem::new(Severity::Leak, self.shown(path), detail).with(outcome));
    }
}

/// Changes volume `id`'s record, if it still has one.
fn update_volume(
    ns: &Namespace,
    id: VolumeId,
    change: impl FnOnce(&mut VolumeRecord),
) -> Result<(), NamespaceError> {
    let guard = ns.lock();
    ns.change(&guard, |c| -> Result<(), NamespaceError> {
        if let Some(mut volume) = c.records().volumes.get(&id).cloned() {
            change(&mut volume);
            c.put_volume(volume)?;
        }
        Ok(())
    })
}
