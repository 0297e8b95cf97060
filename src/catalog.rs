//! [`Catalog`]: the in-memory mirror of the volume and snapshot records.
//!
//! The metadata database is the truth; the catalog is updated only after the
//! transaction that changed the truth has committed, so readers never see a state
//! that a crash could take back. Name indexes hold only what users can see: a hidden
//! snapshot (deleted, kept as the base of its volume's next capture) has no name.

use std::collections::{BTreeMap, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::meta::{SnapshotRecord, VolumeRecord};

#[derive(Clone, Default)]
pub struct Records {
    pub volumes: BTreeMap<u64, VolumeRecord>,
    pub snapshots: BTreeMap<u64, SnapshotRecord>,
    volume_names: HashMap<String, u64>,
    snapshot_names: HashMap<String, u64>,
}

impl Records {
    pub fn volume_id(&self, name: &str) -> Option<u64> {
        self.volume_names.get(name).copied()
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.get(&self.volume_id(name)?)
    }

    pub fn snapshot_id(&self, name: &str) -> Option<u64> {
        self.snapshot_names.get(name).copied()
    }

    pub fn upsert_volume(&mut self, record: VolumeRecord) {
        if let Some(old) = self.volumes.get(&record.id) {
            self.volume_names.remove(&old.name);
        }
        self.volume_names.insert(record.name.clone(), record.id);
        self.volumes.insert(record.id, record);
    }

    pub fn remove_volume(&mut self, id: u64) -> Option<VolumeRecord> {
        let old = self.volumes.remove(&id)?;
        self.volume_names.remove(&old.name);
        Some(old)
    }

    pub fn upsert_snapshot(&mut self, record: SnapshotRecord) {
        let name = record.name();
        if self.snapshot_names.get(&name) == Some(&record.id) {
            self.snapshot_names.remove(&name);
        }
        if !record.hidden {
            self.snapshot_names.insert(name, record.id);
        }
        self.snapshots.insert(record.id, record);
    }

    pub fn remove_snapshot(&mut self, id: u64) -> Option<SnapshotRecord> {
        let old = self.snapshots.remove(&id)?;
        let name = old.name();
        if self.snapshot_names.get(&name) == Some(&id) {
            self.snapshot_names.remove(&name);
        }
        Some(old)
    }

    /// Visible snapshots, in creation order.
    pub fn visible_snapshots(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots.values().filter(|s| !s.hidden)
    }

    /// Name of the newest visible, completed snapshot of `lineage` older than `id`:
    /// what a user sees as the parent of snapshot `id`.
    pub fn visible_parent(&self, lineage: u64, id: u64) -> Option<String> {
        self.lineage(lineage)
            .filter(|s| {
                s.id < id && !s.hidden && s.status == crate::meta::SnapshotStatus::Completed
            })
            .last()
            .map(SnapshotRecord::name)
    }

    /// Snapshots of a lineage, in order, hidden ones included.
    pub fn lineage(&self, lineage: u64) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(move |s| s.lineage == lineage)
    }
}

#[derive(Default)]
pub struct Catalog {
    records: RwLock<Records>,
}

impl Catalog {
    pub fn new(volumes: Vec<VolumeRecord>, snapshots: Vec<SnapshotRecord>) -> Catalog {
        let mut records = Records::default();
        for v in volumes {
            records.upsert_volume(v);
        }
        for s in snapshots {
            records.upsert_snapshot(s);
        }
        Catalog {
            records: RwLock::new(records),
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Records> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Records> {
        self.records.write().unwrap_or_else(|p| p.into_inner())
    }
}
