//! The namespace service: owner of the metadata database, the namespace lock and the
//! catalog of records.
//!
//! Every change goes one way: **stage → commit → publish**. A caller takes the
//! namespace lock ([`Namespace::lock`]), decides against the published records, and
//! calls [`Namespace::change`]: the closure writes rows in one redb transaction and
//! stages the matching record changes on a private copy of the catalog; the
//! transaction commits (durable: redb syncs before it returns); only then is the copy
//! published, by swapping one pointer. Readers ([`Namespace::view`]) never wait for a
//! commit and never see a change a crash could take back.
//!
//! Writes that touch no records (a capture's manifest batches, chunk references, pack
//! lengths) use [`Namespace::change_data`] without the namespace lock; redb itself
//! serialises write transactions.

pub mod catalog;
pub mod records;
pub mod tables;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::storage::Storage;
pub use catalog::{Chain, Records, RemoteParent, SnapshotRef};
pub use records::{
    Owner, SnapshotId, SnapshotRecord, SnapshotStatus, Timestamp, VolumeId, VolumeRecord, Xattrs,
};
use records::{decode_record, encode_record};
use tables::*;

/// Page cache of the metadata database: enough for the manifests in daily use,
/// bounded so the daemon's memory stays predictable.
const METADATA_CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("metadata record {what} is damaged: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the metadata database is missing or empty")]
    Missing,
    #[error(
        "the metadata database has schema version {found}; this ebsfs reads up to {supported}: \
         use a newer ebsfs"
    )]
    NewerSchema { found: u64, supported: u64 },
    #[error("the metadata database has no schema version: it was not written by this ebsfs")]
    Unversioned,
    #[error("opening the metadata database: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for NamespaceError {
            fn from(e: $t) -> Self {
                NamespaceError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type NsResult<T> = Result<T, NamespaceError>;

/// Proof that the caller holds the namespace lock.
pub struct NsGuard<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

pub struct Namespace {
    db: Database,
    lock: Mutex<()>,
    published: RwLock<Arc<Records>>,
}

/// One namespace change in progress: the write transaction and the staged catalog.
pub struct Change<'a> {
    txn: WriteTransaction,
    base: &'a Arc<Records>,
    staged: Option<Records>,
}

/// A write transaction for tables other than the records.
pub struct DataTxn {
    txn: WriteTransaction,
}

impl Namespace {
    /// Opens the database at `path`. A missing or empty database is an error unless
    /// `allow_init`, in which case a new one is initialised.
    pub fn open<S: Storage>(storage: &S, path: &Path, allow_init: bool) -> NsResult<Namespace> {
        let len = storage.file_len(path)?;
        if !allow_init && len.unwrap_or(0) == 0 {
            return Err(NamespaceError::Missing);
        }
        let backend = storage.open_database(path, allow_init)?;
        let db = Database::builder()
            .set_cache_size(METADATA_CACHE_BYTES)
            .create_with_backend(backend)?;
        let fresh = {
            let txn = db.begin_read()?;
            txn.list_tables()?.next().is_none()
        };
        if fresh {
            if !allow_init {
                return Err(NamespaceError::Missing);
            }
            init_schema(&db)?;
            // redb syncs the file, not the directory: make the new name durable too.
            storage.sync_dir(crate::storage::parent_of(path))?;
        }
        check_schema(&db)?;
        upgrade_schema(&db)?;
        let records = load_records(&db)?;
        Ok(Namespace {
            db,
            lock: Mutex::new(()),
            published: RwLock::new(Arc::new(records)),
        })
    }

    /// The published records: an immutable view, cheap to take.
    pub fn view(&self) -> Arc<Records> {
        self.published
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The namespace lock: changes to records are decided and made under it.
    pub fn lock(&self) -> NsGuard<'_> {
        NsGuard(self.lock.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stages, commits and publishes one change (see the module documentation).
    /// Nothing is published unless the transaction committed.
    pub fn change<T, E: From<NamespaceError>>(
        &self,
        _guard: &NsGuard<'_>,
        f: impl FnOnce(&mut Change<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let base = self.view();
        let mut change = Change {
            txn: self.db.begin_write().map_err(NamespaceError::from)?,
            base: &base,
            staged: None,
        };
        let value = f(&mut change)?;
        let Change { txn, staged, .. } = change;
        txn.commit().map_err(NamespaceError::from)?;
        if let Some(records) = staged {
            *self.published.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(records);
        }
        Ok(value)
    }

    /// Commits a change to tables other than the records, without the namespace lock.
    pub fn change_data<T, E: From<NamespaceError>>(
        &self,
        f: impl FnOnce(&DataTxn) -> Result<T, E>,
    ) -> Result<T, E> {
        let data = DataTxn {
            txn: self.db.begin_write().map_err(NamespaceError::from)?,
        };
        let value = f(&data)?;
        data.txn.commit().map_err(NamespaceError::from)?;
        Ok(value)
    }

    /// A consistent read-only view of every table.
    pub fn read(&self) -> NsResult<ReadTransaction> {
        Ok(self.db.begin_read()?)
    }

    /// Committed length of every pack.
    pub fn packs(&self) -> NsResult<Vec<(u32, u64)>> {
        let txn = self.read()?;
        let table = txn.open_table(PACKS)?;
        let mut out = Vec::new();
        for row in table.range::<u32>(..)? {
            let (id, len) = row?;
            out.push((id.value(), len.value()));
        }
        Ok(out)
    }

    /// Volumes deleted by a committed transaction (their files may remain after a crash).
    pub fn deleted_volumes(&self) -> NsResult<BTreeSet<VolumeId>> {
        let txn = self.read()?;
        let table = txn.open_table(DELETED_VOLUMES)?;
        let mut out = BTreeSet::new();
        for row in table.range::<u64>(..)? {
            out.insert(VolumeId(row?.0.value()));
        }
        Ok(out)
    }

    /// This database's instance number (see `tables`).
    pub fn instance(&self) -> NsResult<u64> {
        let txn = self.read()?;
        let table = txn.open_table(FORMAT)?;
        Ok(table.get(INSTANCE_KEY)?.map_or(0, |v| v.value()))
    }

    /// The next id a counter will hand out (ids at or past it were never committed).
    pub fn next_id(&self, counter: &str) -> NsResult<u64> {
        let txn = self.read()?;
        let table = txn.open_table(COUNTERS)?;
        Ok(table.get(counter)?.map_or(1, |v| v.value()))
    }
}

fn init_schema(db: &Database) -> NsResult<()> {
    let txn = db.begin_write()?;
    {
        txn.open_table(FORMAT)?.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
        txn.open_table(VOLUMES)?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(COUNTERS)?;
        txn.open_table(CHUNKS)?;
        txn.open_table(MANIFEST)?;
        txn.open_table(SNAPSHOT_BLOCKS)?;
        txn.open_table(PACKS)?;
        txn.open_table(DELETED_VOLUMES)?;
        txn.open_table(LINEAGE_PARENTS)?;
    }
    txn.commit()?;
    upgrade_schema(db)
}

/// Forgets where an unfinished upload of snapshot `id` put its chunks (the rows of
/// `uploaded`): once the snapshot completed, failed or went, nothing reuses them,
/// and while any row is left the bucket thread keeps protecting what uploads wrote
/// by its age (`capturing_since` in the lease).
pub fn clear_uploaded(txn: &WriteTransaction, id: SnapshotId) -> NsResult<()> {
    let mut table = txn.open_table(UPLOADED)?;
    let keys: Vec<[u8; 32]> = table
        .range((id.0, &[0u8; 32])..=(id.0, &[0xffu8; 32]))?
        .map(|row| row.map(|(k, _)| *k.value().1))
        .collect::<Result<_, _>>()?;
    for hash in keys {
        table.remove((id.0, &hash))?;
    }
    Ok(())
}

/// Brings a database of an older schema to [`SCHEMA_VERSION`] in one transaction
/// (a crash leaves it as it was): version 2 added the snapshot store's tables and the
/// instance number.
fn upgrade_schema(db: &Database) -> NsResult<()> {
    let txn = db.begin_write()?;
    {
        let mut format = txn.open_table(FORMAT)?;
        let version = format.get(SCHEMA_KEY)?.map_or(0, |v| v.value());
        let instance = format.get(INSTANCE_KEY)?.map(|v| v.value());
        if version >= SCHEMA_VERSION && instance.is_some() {
            return Ok(());
        }
        txn.open_table(REMOTE_PARENTS)?;
        txn.open_table(UPLOADED)?;
        txn.open_table(TOMBSTONES_DUE)?;
        if instance.is_none() {
            format.insert(INSTANCE_KEY, random_u64())?;
        }
        format.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
    }
    txn.commit()?;
    Ok(())
}

/// A random number from the kernel (`getrandom(2)`), else from the clock and pid.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got == bytes.len() as isize {
        return u64::from_le_bytes(bytes);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
}

fn check_schema(db: &Database) -> NsResult<()> {
    let txn = db.begin_read()?;
    let version = match txn.open_table(FORMAT) {
        Ok(table) => table.get(SCHEMA_KEY)?.map(|v| v.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    match version {
        None => Err(NamespaceError::Unversioned),
        Some(found) if found > SCHEMA_VERSION => Err(NamespaceError::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        }),
        Some(_) => Ok(()),
    }
}

fn load_records(db: &Database) -> NsResult<Records> {
    let txn = db.begin_read()?;
    let mut volumes = Vec::new();
    for row in txn.open_table(VOLUMES)?.range::<u64>(..)? {
        let (id, text) = row?;
        volumes.push(decode_record(
            &format!("volume {}", id.value()),
            text.value(),
        )?);
    }
    let mut snapshots = Vec::new();
    for row in txn.open_table(SNAPSHOTS)?.range::<u64>(..)? {
        let (id, text) = row?;
        snapshots.push(decode_record(
            &format!("snapshot {}", id.value()),
            text.value(),
        )?);
    }
    let mut parents = std::collections::BTreeMap::new();
    for row in txn.open_table(LINEAGE_PARENTS)?.range::<u64>(..)? {
        let (child, parent) = row?;
        let (lineage, snapshot) = parent.value();
        parents.insert(
            VolumeId(child.value()),
            SnapshotRef {
                lineage: VolumeId(lineage),
                snapshot: SnapshotId(snapshot),
            },
        );
    }
    let mut remote_parents = std::collections::BTreeMap::new();
    for row in txn.open_table(REMOTE_PARENTS)?.range::<u64>(..)? {
        let (child, text) = row?;
        remote_parents.insert(
            VolumeId(child.value()),
            decode_record(
                &format!("remote parent of volume {}", child.value()),
                text.value(),
            )?,
        );
    }
    Ok(Records::new(volumes, snapshots, parents, remote_parents))
}

fn next_counter(txn: &WriteTransaction, name: &str) -> NsResult<u64> {
    let mut table = txn.open_table(COUNTERS)?;
    let next = table.get(name)?.map_or(1, |v| v.value());
    table.insert(name, next + 1)?;
    Ok(next)
}

impl Change<'_> {
    /// The records as this change has staged them so far.
    pub fn records(&self) -> &Records {
        self.staged.as_ref().unwrap_or(self.base)
    }

    fn staged(&mut self) -> &mut Records {
        let base = self.base;
        self.staged.get_or_insert_with(|| Records::clone(base))
    }

    /// The underlying transaction, for the manifest and chunk tables.
    pub fn txn(&self) -> &WriteTransaction {
        &self.txn
    }

    pub fn next_volume_id(&mut self) -> NsResult<VolumeId> {
        next_counter(&self.txn, NEXT_VOLUME_ID).map(VolumeId)
    }

    /// Makes sure the counter never hands out `id` or anything below it (for records
    /// rebuilt with the ids their files already carry).
    pub fn reserve_volume_id(&mut self, id: VolumeId) -> NsResult<()> {
        let mut table = self.txn.open_table(COUNTERS)?;
        let next = table.get(NEXT_VOLUME_ID)?.map_or(1, |v| v.value());
        if next <= id.0 {
            table.insert(NEXT_VOLUME_ID, id.0 + 1)?;
        }
        Ok(())
    }

    pub fn next_snapshot_id(&mut self) -> NsResult<SnapshotId> {
        next_counter(&self.txn, NEXT_SNAPSHOT_ID).map(SnapshotId)
    }

    pub fn put_volume(&mut self, record: VolumeRecord) -> NsResult<()> {
        self.txn
            .open_table(VOLUMES)?
            .insert(record.id.0, encode_record(&record).as_str())?;
        self.staged().upsert_volume(record);
        Ok(())
    }

    /// Removes a volume's record and remembers that its files are garbage.
    pub fn remove_volume(&mut self, id: VolumeId) -> NsResult<()> {
        self.txn.open_table(VOLUMES)?.remove(id.0)?;
        self.txn.open_table(DELETED_VOLUMES)?.insert(id.0, ())?;
        self.staged().remove_volume(id);
        Ok(())
    }

    /// Forgets deleted volumes whose files are gone.
    pub fn forget_deleted_volumes(&mut self, ids: &[VolumeId]) -> NsResult<()> {
        let mut table = self.txn.open_table(DELETED_VOLUMES)?;
        for id in ids {
            table.remove(id.0)?;
        }
        Ok(())
    }

    pub fn put_snapshot(&mut self, record: SnapshotRecord) -> NsResult<()> {
        self.txn
            .open_table(SNAPSHOTS)?
            .insert(record.id.0, encode_record(&record).as_str())?;
        self.staged().upsert_snapshot(record);
        Ok(())
    }

    /// Removes snapshot `id`'s record, and with it what an unfinished upload of it
    /// recorded (see [`clear_uploaded`]).
    pub fn remove_snapshot(&mut self, id: SnapshotId) -> NsResult<()> {
        self.txn.open_table(SNAPSHOTS)?.remove(id.0)?;
        clear_uploaded(&self.txn, id)?;
        self.staged().remove_snapshot(id);
        Ok(())
    }

    /// Records that lineage `child` was made from `parent`.
    pub fn put_lineage_parent(&mut self, child: VolumeId, parent: SnapshotRef) -> NsResult<()> {
        self.txn
            .open_table(LINEAGE_PARENTS)?
            .insert(child.0, (parent.lineage.0, parent.snapshot.0))?;
        self.staged().lineage_parents.insert(child, parent);
        Ok(())
    }

    /// Records that volume `child` was made from a snapshot in the bucket.
    pub fn put_remote_parent(&mut self, child: VolumeId, parent: RemoteParent) -> NsResult<()> {
        self.txn
            .open_table(REMOTE_PARENTS)?
            .insert(child.0, encode_record(&parent).as_str())?;
        self.staged().remote_parents.insert(child, parent);
        Ok(())
    }

    /// Forgets volume `child`'s snapshot in the bucket.
    pub fn remove_remote_parent(&mut self, child: VolumeId) -> NsResult<()> {
        self.txn.open_table(REMOTE_PARENTS)?.remove(child.0)?;
        self.staged().remote_parents.remove(&child);
        Ok(())
    }

    /// Forgets lineage `child`'s parent (the lineage is gone).
    pub fn remove_lineage_parent(&mut self, child: VolumeId) -> NsResult<()> {
        self.txn.open_table(LINEAGE_PARENTS)?.remove(child.0)?;
        self.staged().lineage_parents.remove(&child);
        Ok(())
    }

    /// Records a pack's committed length (see [`DataTxn::set_pack_len`]).
    pub fn set_pack_len(&self, pack: u32, len: u64) -> NsResult<()> {
        set_pack_len(&self.txn, pack, len)
    }
}

fn set_pack_len(txn: &WriteTransaction, pack: u32, len: u64) -> NsResult<()> {
    txn.open_table(PACKS)?.insert(pack, len)?;
    Ok(())
}

impl DataTxn {
    pub fn txn(&self) -> &WriteTransaction {
        &self.txn
    }

    pub fn next_pack_id(&self) -> NsResult<u32> {
        let id = next_counter(&self.txn, NEXT_PACK_ID)?;
        u32::try_from(id).map_err(|_| NamespaceError::Corrupt {
            what: "counters".into(),
            reason: format!("pack id {id} out of range"),
        })
    }

    /// Records that pack `pack` holds committed data up to `len` bytes.
    pub fn set_pack_len(&self, pack: u32, len: u64) -> NsResult<()> {
        set_pack_len(&self.txn, pack, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::{CrashMode, MemStorage};

    fn volume(id: VolumeId, name: &str) -> VolumeRecord {
        VolumeRecord {
            id,
            name: name.into(),
            block_size: 65536,
            created: Timestamp::now(),
            owner: Owner {
                uid: 1,
                gid: 2,
                mode: 0o644,
            },
            xattrs: Xattrs::default(),
            base_snapshot: None,
            full_compare: false,
            high_water_bytes: 0,
            hydrated: false,
        }
    }

    fn storage() -> MemStorage {
        let storage = MemStorage::new();
        storage.create_dir_all(Path::new("/d")).unwrap();
        storage
    }

    #[test]
    fn changes_are_published_only_after_commit_and_survive_a_restart() {
        let storage = storage();
        let path = Path::new("/d/ns.redb");
        let ns = Namespace::open(&storage, path, true).unwrap();
        let guard = ns.lock();
        let id = ns
            .change(&guard, |c| -> NsResult<VolumeId> {
                let id = c.next_volume_id()?;
                c.put_volume(volume(id, "db"))?;
                assert!(c.records().volume_id("db").is_some());
                Ok(id)
            })
            .unwrap();
        assert_eq!(ns.view().volume_id("db"), Some(id));
        // A change that fails publishes nothing.
        let failed: NsResult<()> = ns.change(&guard, |c| {
            c.put_volume(volume(VolumeId(99), "lost"))?;
            Err(NamespaceError::Missing)
        });
        assert!(failed.is_err());
        assert_eq!(ns.view().volume_id("lost"), None);
        drop(guard);
        drop(ns);
        let storage = storage.restart(CrashMode::PowerLoss);
        let ns = Namespace::open(&storage, path, false).unwrap();
        assert_eq!(ns.view().volume_id("db"), Some(id));
        assert_eq!(ns.view().volume_id("lost"), None);
    }

    #[test]
    fn a_missing_or_empty_database_is_never_taken_as_new() {
        let storage = storage();
        let path = Path::new("/d/ns.redb");
        assert!(matches!(
            Namespace::open(&storage, path, false),
            Err(NamespaceError::Missing)
        ));
        storage
            .open(path, crate::storage::OpenOptions::CREATE)
            .unwrap();
        assert!(matches!(
            Namespace::open(&storage, path, false),
            Err(NamespaceError::Missing)
        ));
        drop(Namespace::open(&storage, path, true).unwrap());
        Namespace::open(&storage, path, false).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let storage = storage();
        let path = Path::new("/d/ns.redb");
        let ns = Namespace::open(&storage, path, true).unwrap();
        ns.change_data(|d| -> NsResult<()> {
            d.txn()
                .open_table(FORMAT)?
                .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)?;
            Ok(())
        })
        .unwrap();
        drop(ns);
        assert!(matches!(
            Namespace::open(&storage, path, false),
            Err(NamespaceError::NewerSchema { .. })
        ));
    }
}
