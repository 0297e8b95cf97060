//! Snapshots of other hosts (and of earlier data directories of this one), as found
//! in the bucket: every root without a tombstone that this data directory did not
//! write itself. Listed every `store.poll_seconds`; shown as
//! `<volume>@<label>@<host>` (the name a host's own snapshot has, with the host after
//! it: labels hold no `@`, so these never clash with local names). Two roots that
//! would get the same name (a host id reused by a new data directory that made the
//! same snapshot names again) are told apart by `~<n>` after the later one.
//!
//! Each gets an id from a range local ids never reach ([`FOREIGN_IDS`]), kept for as
//! long as the daemon runs, so inode numbers stay stable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use log::{info, warn};

use super::format::{Root, SnapshotMeta};
use super::{RemoteResult, RemoteStore};
use crate::namespace::{Owner, SnapshotId, SnapshotRecord, SnapshotStatus, VolumeId, Xattrs};

/// Ids of other hosts' snapshots start here.
pub const FOREIGN_IDS: u64 = 1 << 52;

/// A snapshot in the bucket that this data directory did not write.
pub struct Foreign {
    pub id: SnapshotId,
    /// `<volume>@<label>@<host>`.
    pub name: String,
    pub root_name: String,
    pub root: Arc<Root>,
    pub meta: SnapshotMeta,
    meta_modified: Option<SystemTime>,
}

impl Foreign {
    /// The snapshot as the file system shows it.
    pub fn record(&self) -> SnapshotRecord {
        let facts = &self.root.facts;
        let (volume, label) = self
            .name
            .split_once('@')
            .map_or((self.name.clone(), String::new()), |(v, l)| {
                (v.to_string(), l.to_string())
            });
        SnapshotRecord {
            id: self.id,
            volume,
            label,
            lineage: VolumeId(u64::MAX),
            size_bytes: facts.size_bytes,
            block_size: facts.block_size,
            created: facts.created,
            completed: Some(facts.completed),
            status: SnapshotStatus::Completed,
            hidden: false,
            parent: facts.parent.as_ref().map(|p| format!("{p}@{}", facts.host)),
            changed_blocks: facts.changed_blocks,
            stored_bytes: facts.stored_bytes,
            owner: self.meta.owner,
            description: self.meta.description.clone(),
            xattrs: self.meta.xattrs.clone(),
            error: None,
            captured: false,
            remote_root: Some(self.root_name.clone()),
            reexamine: None,
            binned: None,
        }
    }

    pub fn host(&self) -> &str {
        &self.root.facts.host
    }
}

#[derive(Default)]
struct State {
    by_id: BTreeMap<SnapshotId, Arc<Foreign>>,
    by_name: HashMap<String, SnapshotId>,
    by_root: HashMap<String, SnapshotId>,
    next: u64,
    /// Roots that could not be read, with when that was last logged.
    unreadable: HashSet<String>,
}

#[derive(Default)]
pub struct Catalog {
    state: RwLock<State>,
}

impl Catalog {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: SnapshotId) -> Option<Arc<Foreign>> {
        self.read().by_id.get(&id).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Foreign>> {
        let state = self.read();
        state.by_id.get(state.by_name.get(name)?).cloned()
    }

    pub fn by_root(&self, root: &str) -> Option<Arc<Foreign>> {
        let state = self.read();
        state.by_id.get(state.by_root.get(root)?).cloned()
    }

    /// Every snapshot of other hosts, in the order found.
    pub fn list(&self) -> Vec<Arc<Foreign>> {
        self.read().by_id.values().cloned().collect()
    }

    /// Lists the bucket again. `local_roots`: roots this data directory wrote (its own
    /// snapshots, shown under their local names). Returns how many snapshots appeared.
    pub fn refresh(
        &self,
        store: &RemoteStore,
        local_roots: &HashSet<String>,
    ) -> RemoteResult<usize> {
        let err = |source| super::RemoteError::Bucket {
            store: store.bucket.shown.clone(),
            source,
        };
        let roots = store.bucket.list("snapshots/").map_err(err)?;
        let tombstones: HashSet<String> = store
            .bucket
            .list("deleted/")
            .map_err(err)?
            .into_iter()
            .map(|l| store.names().root_of_tombstone(&l.name))
            .collect();
        let metas: HashMap<String, SystemTime> = store
            .bucket
            .list("meta/")
            .map_err(err)?
            .into_iter()
            .map(|l| (l.name, l.modified))
            .collect();
        let wanted: Vec<String> = roots
            .into_iter()
            .map(|l| l.name)
            .filter(|name| !tombstones.contains(name) && !local_roots.contains(name))
            .collect();
        let wanted_set: HashSet<&String> = wanted.iter().collect();
        // Read what is new or whose metadata changed, outside the lock.
        let known: HashMap<String, Arc<Foreign>> = {
            let state = self.read();
            state
                .by_root
                .iter()
                .filter_map(|(root, id)| Some((root.clone(), state.by_id.get(id)?.clone())))
                .collect()
        };
        let mut fresh: Vec<(String, Arc<Root>, SnapshotMeta, Option<SystemTime>)> = Vec::new();
        for name in &wanted {
            let meta_name = store.names().meta_of(name);
            let meta_modified = metas.get(&meta_name).copied();
            if let Some(old) = known.get(name)
                && old.meta_modified == meta_modified
            {
                continue;
            }
            let root = match known.get(name) {
                Some(old) => old.root.clone(),
                None => match store.root(name) {
                    Ok(Some(root)) => Arc::new(root),
                    Ok(None) => continue,
                    Err(e) => {
                        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                        if state.unreadable.insert(name.clone()) {
                            warn!("snapshot store: cannot read snapshot root {name}: {e}");
                        }
                        continue;
                    }
                },
            };
            let meta = match meta_modified {
                Some(_) => store
                    .get_object(&meta_name)
                    .ok()
                    .flatten()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|t| toml::from_str::<SnapshotMeta>(&t).ok()),
                None => None,
            };
            // A snapshot whose metadata cannot be read is private to root.
            let meta = meta.unwrap_or(SnapshotMeta {
                owner: Owner {
                    uid: 0,
                    gid: 0,
                    mode: 0o700,
                },
                description: String::new(),
                xattrs: Xattrs::default(),
            });
            fresh.push((name.clone(), root, meta, meta_modified));
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        // Gone: deleted (tombstoned), collected, or now known as local.
        let gone: Vec<(String, SnapshotId)> = state
            .by_root
            .iter()
            .filter(|(root, _)| !wanted_set.contains(root))
            .map(|(r, id)| (r.clone(), *id))
            .collect();
        for (root, id) in gone {
            state.by_root.remove(&root);
            if let Some(old) = state.by_id.remove(&id) {
                state.by_name.remove(&old.name);
                info!(
                    "snapshot {} of host {} is gone from the bucket",
                    old.name,
                    old.host()
                );
            }
        }
        let mut appeared = 0;
        for (root_name, root, meta, meta_modified) in fresh {
            let existing = state.by_root.get(&root_name).copied();
            let (id, name) = match existing.and_then(|id| state.by_id.get(&id)) {
                Some(old) => (old.id, old.name.clone()),
                None => {
                    state.next += 1;
                    let id = SnapshotId(FOREIGN_IDS + state.next);
                    let facts = &root.facts;
                    let mut name = format!("{}@{}@{}", facts.volume, facts.label, facts.host);
                    if state.by_name.contains_key(&name) {
                        name = format!("{name}~{}", state.next);
                    }
                    appeared += 1;
                    info!("snapshot {name} appeared in the bucket");
                    (id, name)
                }
            };
            state.by_root.insert(root_name.clone(), id);
            state.by_name.insert(name.clone(), id);
            state.by_id.insert(
                id,
                Arc::new(Foreign {
                    id,
                    name,
                    root_name,
                    root,
                    meta,
                    meta_modified,
                }),
            );
        }
        Ok(appeared)
    }
}
