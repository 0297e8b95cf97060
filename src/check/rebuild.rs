//! Rebuilding after the loss of the metadata database (missing, empty, or not a
//! database) while data exists.
//!
//! Volume data files are whole disk images by themselves: each `volumes/<id>.raw`
//! becomes volume `recovered-<id>` (same id, owner root, mode 0600, the default block
//! size) with a fresh dirty map and a full comparison at its next snapshot. Snapshots
//! cannot come back: their manifests and the chunk index were in the database. Their
//! packs, and every other file the new database does not account for, move to
//! `lost+found/`; the old database too. Nothing is deleted.

use crate::config::Settings;
use crate::layout::{VolumeFile, parse_volume_file};
use crate::namespace::{
    Namespace, NamespaceError, Owner, Timestamp, VolumeId, VolumeRecord, Xattrs,
};
use crate::storage::Storage;
use crate::volume::dirty::{DirtyMap, NEVER_SHRUNK};

use super::{CheckError, Checker, Outcome, Problem, Severity, counted, io_error};

/// Owner and mode of recovered volumes: nobody but root until root says otherwise.
const RECOVERED_OWNER: Owner = Owner {
    uid: 0,
    gid: 0,
    mode: 0o600,
};

impl<S: Storage> Checker<'_, S> {
    /// Reports the lost database (`state` says how it is lost) and, when repairing,
    /// rebuilds it. Returns whether a new database is in place.
    pub(super) fn rebuild_database(&mut self, state: &str) -> Result<bool, CheckError> {
        let volumes = self.list(&self.layout.volumes_dir())?;
        let data_files = volumes
            .iter()
            .filter(|n| parse_volume_file(n).is_some_and(|(_, k)| k == VolumeFile::Data))
            .count();
        let packs = self.list(&self.layout.chunks_dir())?;
        let outcome = self.fix(|| self.rebuild());
        let rebuilt = matches!(outcome, Some(Outcome::Repaired(_)));
        self.push(
            Problem::new(
                Severity::Corruption,
                "metadata database ebsfs.redb",
                format!(
                    "it is {state}, but the directory holds {} and {} in chunks/: a mount \
                     refuses it",
                    counted(data_files as u64, "volume data file"),
                    counted(packs.len() as u64, "file")
                ),
            )
            .with(outcome),
        );
        if !packs.is_empty() {
            let why = if rebuilt {
                "without the database they cannot be read; the packs were moved to lost+found/, \
                 never deleted"
            } else {
                "without the database they cannot be read"
            };
            let problem = Problem::new(
                Severity::Corruption,
                "snapshots",
                format!(
                    "their manifests and chunk index were in the lost database: the chunks in {} \
                     in chunks/ belong to no snapshot any more",
                    counted(packs.len() as u64, "file")
                ),
            )
            .with(self.cannot_fix(why));
            self.push(problem);
        }
        Ok(rebuilt)
    }

    fn list(&self, dir: &std::path::Path) -> Result<Vec<std::ffi::OsString>, CheckError> {
        match self.storage.list_dir(dir) {
            Ok(names) => Ok(names),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_error(format!("listing {}", dir.display()))(e)),
        }
    }

    /// Moves the old database aside, creates a new one and recovers every volume data
    /// file in it; says what it did.
    fn rebuild(&self) -> Result<String, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let db = self.layout.database();
        let mut done = Vec::new();
        if self.storage.file_len(&db).map_err(|e| err(&e))?.is_some() {
            let moved = self
                .to_lost_found(&db, "lost metadata database")
                .map_err(|e| err(&e))?;
            done.push(format!("the old database {moved}"));
        }
        let mut recovered = Vec::new();
        let volumes_dir = self.layout.volumes_dir();
        for name in self.list(&volumes_dir).map_err(|e| err(&e))? {
            match parse_volume_file(&name) {
                Some((id, VolumeFile::Data)) => recovered.push(id),
                _ => {
                    self.to_lost_found(
                        &volumes_dir.join(&name),
                        "the database that knew it was lost",
                    )
                    .map_err(|e| err(&e))?;
                }
            }
        }
        let mut moved = 0;
        for dir in [self.layout.captures_dir(), self.layout.chunks_dir()] {
            for name in self.list(&dir).map_err(|e| err(&e))? {
                self.to_lost_found(&dir.join(&name), "the database that knew it was lost")
                    .map_err(|e| err(&e))?;
                moved += 1;
            }
        }
        if moved > 0 {
            done.push(format!(
                "{moved} capture and pack files moved to lost+found/"
            ));
        }
        self.layout.create_dirs(self.storage).map_err(|e| err(&e))?;
        let ns = Namespace::open(self.storage, &db, true).map_err(|e| err(&e))?;
        let names = self.recover_volumes(&ns, &recovered).map_err(|e| err(&e))?;
        done.insert(
            0,
            format!(
                "a new database holds {}{}",
                counted(names.len() as u64, "recovered volume"),
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", names.join(", "))
                }
            ),
        );
        Ok(done.join("; "))
    }

    /// Gives each volume data file a fresh dirty map and a record; returns the names.
    fn recover_volumes(&self, ns: &Namespace, ids: &[VolumeId]) -> Result<Vec<String>, CheckError> {
        let block_size = Settings::embedded().block_size_bytes;
        let mut records = Vec::new();
        for &id in ids {
            let dirty = self.layout.volume_file(id, VolumeFile::Dirty);
            DirtyMap::create(self.storage, &dirty, NEVER_SHRUNK)
                .map_err(io_error(format!("creating {}", dirty.display())))?;
            records.push(VolumeRecord {
                id,
                name: format!("recovered-{id}"),
                block_size,
                created: Timestamp::now(),
                owner: RECOVERED_OWNER,
                xattrs: Xattrs::default(),
                base_snapshot: None,
                full_compare: true,
                high_water_bytes: 0,
                hydrated: false,
            });
        }
        let guard = ns.lock();
        ns.change(&guard, |c| -> Result<(), NamespaceError> {
            for record in &records {
                c.reserve_volume_id(record.id)?;
                c.put_volume(record.clone())?;
            }
            Ok(())
        })?;
        Ok(records.into_iter().map(|r| r.name).collect())
    }
}
