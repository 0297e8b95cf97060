//! The metadata database (`ebsfs.redb`): volumes, snapshots, manifests, the chunk index.
//!
//! Every change that must be all-or-nothing (a snapshot completing with its manifest
//! and chunk references, a deletion moving entries and freeing chunks) is one redb
//! write transaction. Volume and snapshot records are stored as TOML text: they are
//! small, rarely written, and readable when debugging. The high-volume tables use fixed
//! binary tuples.
//!
//! Tables (the names are part of the on-disk format):
//! - `volumes`:   volume id → [`VolumeRecord`] (TOML)
//! - `snapshots`: snapshot id → [`SnapshotRecord`] (TOML)
//! - `counters`:  name → next id to hand out
//! - `chunks`:    chunk hash → (pack, offset, stored len, plain len, codec, references)
//! - `manifest`:  (lineage, block index, snapshot id) → chunk hash, or [`ZERO_BLOCK`]
//! - `packs`:     pack id → committed length in bytes
//! - `snapshot_blocks`: (snapshot id, block index) → (), the reverse of `manifest`

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

pub const VOLUMES: TableDefinition<u64, &str> = TableDefinition::new("volumes");
pub const SNAPSHOTS: TableDefinition<u64, &str> = TableDefinition::new("snapshots");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// (pack id, offset, stored length, plain length, codec, reference count)
pub type ChunkRow = (u32, u64, u32, u32, u8, u64);
pub const CHUNKS: TableDefinition<&[u8; 32], ChunkRow> = TableDefinition::new("chunks");
pub const MANIFEST: TableDefinition<(u64, u64, u64), &[u8; 32]> = TableDefinition::new("manifest");
pub const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");
/// (snapshot id, block index) → (): which blocks a snapshot's own manifest entries
/// cover, so deleting a snapshot visits only its entries.
pub const SNAPSHOT_BLOCKS: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("snapshot_blocks");

/// Manifest value meaning "this block is all zeros": no chunk is stored for it.
pub const ZERO_BLOCK: [u8; 32] = [0; 32];

/// Page cache of the metadata database: enough for the manifests in daily use,
/// bounded so the daemon's memory stays predictable.
const METADATA_CACHE_BYTES: usize = 64 << 20;

const NEXT_VOLUME_ID: &str = "next_volume_id";
const NEXT_SNAPSHOT_ID: &str = "next_snapshot_id";
const NEXT_PACK_ID: &str = "next_pack_id";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    #[error("metadata record {what} is damaged: {reason}")]
    Corrupt { what: String, reason: String },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Db(e.into())
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

pub type MetaResult<T> = Result<T, MetaError>;

/// Wall-clock time as nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since.as_nanos().min(i64::MAX as u128) as i64)
    }

    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_nanos(self.0.max(0) as u64)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-25T08:40:00.123Z`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0.div_euclid(1_000_000_000);
        let millis = self.0.rem_euclid(1_000_000_000) / 1_000_000;
        let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            day_secs / 3600,
            day_secs / 60 % 60,
            day_secs % 60
        )
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's method).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Extended attributes of a volume or snapshot (`user.*` only), values hex-encoded so
/// arbitrary bytes survive the TOML text form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Xattrs(BTreeMap<String, String>);

impl Xattrs {
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name).and_then(|hex| decode_hex(hex))
    }

    pub fn set(&mut self, name: &str, value: &[u8]) {
        self.0.insert(name.to_string(), encode_hex(value));
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.0.remove(name).is_some()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Ownership and permission bits of a volume or snapshot directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Never reused; also the volume's manifest lineage.
    pub id: u64,
    pub name: String,
    pub block_size: u32,
    pub created: Timestamp,
    pub owner: Owner,
    #[serde(default)]
    pub xattrs: Xattrs,
    /// The snapshot the next capture is incremental against: the latest completed one,
    /// possibly already deleted by the user and kept hidden for this purpose.
    pub base_snapshot: Option<u64>,
    /// Set when the dirty map cannot be trusted (after a host crash): the next capture
    /// compares every block with `base_snapshot` instead.
    #[serde(default)]
    pub full_compare: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Pending,
    Completed,
    Error,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Pending => "pending",
            SnapshotStatus::Completed => "completed",
            SnapshotStatus::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Never reused and increasing: also the snapshot's position in its lineage.
    pub id: u64,
    pub volume: String,
    pub label: String,
    pub lineage: u64,
    pub size_bytes: u64,
    pub block_size: u32,
    pub created: Timestamp,
    pub completed: Option<Timestamp>,
    pub status: SnapshotStatus,
    /// Deleted by the user but kept, invisible, because its volume's next snapshot
    /// will be incremental against it.
    #[serde(default)]
    pub hidden: bool,
    /// Name of the snapshot this one is incremental against.
    pub parent: Option<String>,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
    pub owner: Owner,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub xattrs: Xattrs,
    pub error: Option<String>,
}

impl SnapshotRecord {
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.label)
    }
}

fn encode_record<T: Serialize>(record: &T) -> String {
    // Records hold only strings, integers, booleans and maps: serialization cannot fail.
    toml::to_string(record).unwrap_or_else(|e| panic!("record serialization: {e}"))
}

fn decode_record<T: for<'de> Deserialize<'de>>(what: &str, text: &str) -> MetaResult<T> {
    toml::from_str(text).map_err(|e| MetaError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

pub struct Meta {
    pub db: Database,
}

impl Meta {
    pub fn open(path: &Path) -> MetaResult<Meta> {
        let db = Database::builder()
            .set_cache_size(METADATA_CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(VOLUMES)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(MANIFEST)?;
            txn.open_table(PACKS)?;
            txn.open_table(SNAPSHOT_BLOCKS)?;
        }
        txn.commit()?;
        Ok(Meta { db })
    }

    pub fn begin_write(&self) -> MetaResult<WriteTransaction> {
        Ok(self.db.begin_write()?)
    }

    pub fn begin_read(&self) -> MetaResult<redb::ReadTransaction> {
        Ok(self.db.begin_read()?)
    }

    pub fn load_volumes(&self) -> MetaResult<Vec<VolumeRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VOLUMES)?;
        let mut out = Vec::new();
        for row in table.range::<u64>(..)? {
            let (id, text) = row?;
            out.push(decode_record(
                &format!("volume {}", id.value()),
                text.value(),
            )?);
        }
        Ok(out)
    }

    pub fn load_snapshots(&self) -> MetaResult<Vec<SnapshotRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for row in table.range::<u64>(..)? {
            let (id, text) = row?;
            out.push(decode_record(
                &format!("snapshot {}", id.value()),
                text.value(),
            )?);
        }
        Ok(out)
    }

    pub fn load_packs(&self) -> MetaResult<BTreeMap<u32, u64>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PACKS)?;
        let mut out = BTreeMap::new();
        for row in table.range::<u32>(..)? {
            let (id, len) = row?;
            out.insert(id.value(), len.value());
        }
        Ok(out)
    }
}

pub fn put_volume(txn: &WriteTransaction, record: &VolumeRecord) -> MetaResult<()> {
    txn.open_table(VOLUMES)?
        .insert(record.id, encode_record(record).as_str())?;
    Ok(())
}

pub fn delete_volume(txn: &WriteTransaction, id: u64) -> MetaResult<()> {
    txn.open_table(VOLUMES)?.remove(id)?;
    Ok(())
}

pub fn put_snapshot(txn: &WriteTransaction, record: &SnapshotRecord) -> MetaResult<()> {
    txn.open_table(SNAPSHOTS)?
        .insert(record.id, encode_record(record).as_str())?;
    Ok(())
}

pub fn delete_snapshot(txn: &WriteTransaction, id: u64) -> MetaResult<()> {
    txn.open_table(SNAPSHOTS)?.remove(id)?;
    Ok(())
}

fn next_counter(txn: &WriteTransaction, name: &str) -> MetaResult<u64> {
    let mut table = txn.open_table(COUNTERS)?;
    let next = table.get(name)?.map_or(1, |v| v.value());
    table.insert(name, next + 1)?;
    Ok(next)
}

pub fn next_volume_id(txn: &WriteTransaction) -> MetaResult<u64> {
    next_counter(txn, NEXT_VOLUME_ID)
}

pub fn next_snapshot_id(txn: &WriteTransaction) -> MetaResult<u64> {
    next_counter(txn, NEXT_SNAPSHOT_ID)
}

pub fn next_pack_id(txn: &WriteTransaction) -> MetaResult<u32> {
    let id = next_counter(txn, NEXT_PACK_ID)?;
    u32::try_from(id).map_err(|_| MetaError::Corrupt {
        what: "counters".into(),
        reason: format!("pack id {id} out of range"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        // 2026-11-25T08:40:00.123Z
        let t = Timestamp(1_795_596_000_123_000_000);
        assert_eq!(t.to_rfc3339(), "2026-11-25T08:40:00.123Z");
        assert_eq!(
            Timestamp(951_782_400 * 1_000_000_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn xattr_values_survive_any_bytes() {
        let mut x = Xattrs::default();
        x.set("user.bin", &[0, 255, 10, 13]);
        let text = encode_record(&x);
        let back: Xattrs = decode_record("x", &text).unwrap();
        assert_eq!(back.get("user.bin").unwrap(), vec![0, 255, 10, 13]);
        assert!(back.names().eq(["user.bin"]));
    }

    #[test]
    fn records_round_trip_through_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("m.redb")).unwrap();
        let txn = meta.begin_write().unwrap();
        let id = next_volume_id(&txn).unwrap();
        assert_eq!(next_volume_id(&txn).unwrap(), id + 1);
        let record = VolumeRecord {
            id,
            name: "db".into(),
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
        };
        put_volume(&txn, &record).unwrap();
        txn.commit().unwrap();
        assert_eq!(meta.load_volumes().unwrap(), vec![record]);
    }
}
