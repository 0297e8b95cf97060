//! [`Records`]: the in-memory catalog of volume and snapshot records.
//!
//! The database is the truth; a `Records` value is an immutable view of it, replaced
//! as a whole after each committed change (see [`super::Namespace`]), so readers never
//! see a state that a crash could take back. Name indexes hold only what users can
//! see: a hidden snapshot (deleted, kept as the base of its volume's next capture or
//! for readers that still have it open) has no name, and one in the recycle bin is
//! named in an index of its own (its name stays taken: see
//! [`Records::name_taken`]).

use std::collections::{BTreeMap, HashMap};

use super::records::{SnapshotId, SnapshotRecord, SnapshotStatus, VolumeId, VolumeRecord};

/// A point in a lineage: what snapshot `snapshot` of lineage `lineage` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    pub lineage: VolumeId,
    pub snapshot: SnapshotId,
}

/// The snapshot in the bucket a volume was made from: it reads, for every block it
/// does not hold itself, what that snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteParent {
    /// The root object's name.
    pub root: String,
    /// The name it was shown as (`<volume>@<label>@<host>`).
    pub name: String,
}

/// Where to look for a block, in order: each lineage up to a snapshot, falling back
/// to the next when it has no entry for the block (see `snapshot::manifest`).
pub type Chain = Vec<SnapshotRef>;

#[derive(Clone, Default, Debug)]
pub struct Records {
    pub volumes: BTreeMap<VolumeId, VolumeRecord>,
    pub snapshots: BTreeMap<SnapshotId, SnapshotRecord>,
    /// Lineages made from a snapshot (volumes from snapshots) → that snapshot.
    pub lineage_parents: BTreeMap<VolumeId, SnapshotRef>,
    /// Volumes made from a snapshot in the bucket → that snapshot.
    pub remote_parents: BTreeMap<VolumeId, RemoteParent>,
    volume_names: HashMap<String, VolumeId>,
    snapshot_names: HashMap<String, SnapshotId>,
    binned_names: HashMap<String, SnapshotId>,
}

impl Records {
    pub fn new(
        volumes: Vec<VolumeRecord>,
        snapshots: Vec<SnapshotRecord>,
        lineage_parents: BTreeMap<VolumeId, SnapshotRef>,
        remote_parents: BTreeMap<VolumeId, RemoteParent>,
    ) -> Records {
        let mut records = Records {
            lineage_parents,
            remote_parents,
            ..Records::default()
        };
        for v in volumes {
            records.upsert_volume(v);
        }
        for s in snapshots {
            records.upsert_snapshot(s);
        }
        records
    }

    pub fn volume_id(&self, name: &str) -> Option<VolumeId> {
        self.volume_names.get(name).copied()
    }

    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.get(&self.volume_id(name)?)
    }

    /// The visible snapshot named `name`.
    pub fn snapshot_id(&self, name: &str) -> Option<SnapshotId> {
        self.snapshot_names.get(name).copied()
    }

    /// The snapshot named `name` in the recycle bin.
    pub fn binned_id(&self, name: &str) -> Option<SnapshotId> {
        self.binned_names.get(name).copied()
    }

    /// Whether a new snapshot may not be called `name`: a visible snapshot or one in
    /// the recycle bin has it (a restore must find its name free).
    pub fn name_taken(&self, name: &str) -> bool {
        self.snapshot_names.contains_key(name) || self.binned_names.contains_key(name)
    }

    pub fn upsert_volume(&mut self, record: VolumeRecord) {
        if let Some(old) = self.volumes.get(&record.id) {
            self.volume_names.remove(&old.name);
        }
        self.volume_names.insert(record.name.clone(), record.id);
        self.volumes.insert(record.id, record);
    }

    pub fn remove_volume(&mut self, id: VolumeId) -> Option<VolumeRecord> {
        let old = self.volumes.remove(&id)?;
        self.volume_names.remove(&old.name);
        Some(old)
    }

    pub fn upsert_snapshot(&mut self, record: SnapshotRecord) {
        let name = record.name();
        self.unname(&name, record.id);
        if record.binned.is_some() && !record.hidden {
            self.binned_names.insert(name, record.id);
        } else if record.is_visible() {
            self.snapshot_names.insert(name, record.id);
        }
        self.snapshots.insert(record.id, record);
    }

    pub fn remove_snapshot(&mut self, id: SnapshotId) -> Option<SnapshotRecord> {
        let old = self.snapshots.remove(&id)?;
        self.unname(&old.name(), id);
        Some(old)
    }

    /// Drops `name` from the name indexes where it names snapshot `id`.
    fn unname(&mut self, name: &str, id: SnapshotId) {
        for names in [&mut self.snapshot_names, &mut self.binned_names] {
            if names.get(name) == Some(&id) {
                names.remove(name);
            }
        }
    }

    /// Visible snapshots, in creation order.
    pub fn visible_snapshots(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots.values().filter(|s| s.is_visible())
    }

    /// Snapshots in the recycle bin, in creation order.
    pub fn binned_snapshots(&self) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(|s| s.binned.is_some() && !s.hidden)
    }

    /// Name of the newest visible, completed snapshot of `lineage` older than `id`, or
    /// else the snapshot the lineage's volume was made from: what a user sees as the
    /// parent of snapshot `id`. One in the recycle bin counts: it may come back, and
    /// until it is purged the chain is as it was.
    pub fn visible_parent(&self, lineage: VolumeId, id: SnapshotId) -> Option<String> {
        let own = self
            .lineage(lineage)
            .filter(|s| s.id < id && !s.hidden && s.status == SnapshotStatus::Completed)
            .last()
            .map(SnapshotRecord::name);
        own.or_else(|| {
            let source = self.lineage_parents.get(&lineage)?;
            self.snapshots
                .get(&source.snapshot)
                .filter(|s| !s.hidden)
                .map(SnapshotRecord::name)
        })
    }

    /// Snapshots of a lineage, in order, hidden ones included.
    pub fn lineage(&self, lineage: VolumeId) -> impl Iterator<Item = &SnapshotRecord> {
        self.snapshots
            .values()
            .filter(move |s| s.lineage == lineage)
    }

    /// The lineages to read through for snapshot `snapshot` of `lineage` (or for the
    /// live contents of a lineage's volume, with `SnapshotId(u64::MAX)`).
    pub fn chain(&self, lineage: VolumeId, snapshot: SnapshotId) -> Chain {
        let mut chain = vec![SnapshotRef { lineage, snapshot }];
        let mut at = lineage;
        while let Some(&parent) = self.lineage_parents.get(&at) {
            chain.push(parent);
            at = parent.lineage;
        }
        chain
    }

    /// The chain of snapshot `id`, by its record.
    pub fn chain_of(&self, id: SnapshotId) -> Option<Chain> {
        let record = self.snapshots.get(&id)?;
        Some(self.chain(record.lineage, id))
    }

    /// Where the next capture of volume `volume` compares its blocks: the chain of its
    /// base snapshot (empty without one).
    pub fn capture_base(&self, volume: VolumeId) -> Chain {
        self.volumes
            .get(&volume)
            .and_then(|vol| vol.base_snapshot)
            .and_then(|base| self.chain_of(base))
            .unwrap_or_default()
    }

    /// Whether lineage `lineage` still has a volume or any snapshot (hidden ones too).
    pub fn lineage_alive(&self, lineage: VolumeId) -> bool {
        self.volumes.contains_key(&lineage) || self.lineage(lineage).next().is_some()
    }

    /// Whether a living lineage was made from snapshot `snapshot` of `lineage`: its
    /// entries must then stay exactly where they are.
    pub fn has_dependents(&self, lineage: VolumeId, snapshot: SnapshotId) -> bool {
        let point = SnapshotRef { lineage, snapshot };
        self.lineage_parents
            .iter()
            .any(|(&child, &parent)| parent == point && self.lineage_alive(child))
    }

    /// The snapshot of `lineage` being captured, if any (one captured and still
    /// uploading does not count).
    pub fn pending_in(&self, lineage: VolumeId) -> Option<&SnapshotRecord> {
        self.lineage(lineage).find(|s| s.is_capturing())
    }
}
