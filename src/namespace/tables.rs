//! The tables of the metadata database (`ebsfs.redb`). Their names and key/value
//! types are part of the on-disk format (docs/FORMAT.md); [`SCHEMA_VERSION`] changes
//! whenever they do.
//!
//! - `format`:    "schema" → schema version of this database
//! - `volumes`:   volume id → [`super::VolumeRecord`] (TOML)
//! - `snapshots`: snapshot id → [`super::SnapshotRecord`] (TOML)
//! - `counters`:  name → next id to hand out
//! - `chunks`:    chunk hash → (pack, offset, stored len, plain len, codec, references)
//! - `manifest`:  (lineage, block index, snapshot id) → chunk hash, or [`ZERO_BLOCK`]
//! - `snapshot_blocks`: (snapshot id, block index) → (), the reverse of `manifest`
//! - `packs`:     pack id → committed length in bytes
//! - `deleted_volumes`: volume id → (): volumes whose record is gone, so that files
//!   left behind by a crash during the deletion are known to be garbage
//! - `lineage_parents`: lineage id → (parent lineage, parent snapshot): a volume made
//!   from a snapshot reads, for every block its own lineage has no entry for, what
//!   that snapshot holds
//! - `remote_parents`: volume id → [`super::RemoteParent`] (TOML): a volume made
//!   from a snapshot in the bucket
//! - `uploaded`:  (snapshot id, chunk hash) → where the chunk went in the bucket
//!   ([`crate::remote::format::RemoteChunk`], encoded): an upload's progress, so a
//!   resumed upload sends nothing twice; dropped once the snapshot completed
//! - `tombstones_due`: root name → (): deleted snapshots whose tombstone the bucket
//!   has not received yet
//!
//! `format` also holds "instance", a random number drawn when the database was
//! made: it keeps the names of objects this data directory writes to a bucket apart
//! from those of an earlier data directory of the same host.

use redb::TableDefinition;

/// Version of the table layout this build reads and writes.
pub const SCHEMA_VERSION: u64 = 2;

pub const FORMAT: TableDefinition<&str, u64> = TableDefinition::new("format");
pub const SCHEMA_KEY: &str = "schema";
pub const INSTANCE_KEY: &str = "instance";
pub const VOLUMES: TableDefinition<u64, &str> = TableDefinition::new("volumes");
pub const SNAPSHOTS: TableDefinition<u64, &str> = TableDefinition::new("snapshots");
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// (pack id, offset, stored length, plain length, codec, reference count)
pub type ChunkRow = (u32, u64, u32, u32, u8, u64);
pub const CHUNKS: TableDefinition<&[u8; 32], ChunkRow> = TableDefinition::new("chunks");
pub const MANIFEST: TableDefinition<(u64, u64, u64), &[u8; 32]> = TableDefinition::new("manifest");
/// (snapshot id, block index) → (): which blocks a snapshot's own manifest entries
/// cover, so deleting a snapshot visits only its entries.
pub const SNAPSHOT_BLOCKS: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("snapshot_blocks");
pub const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");
pub const DELETED_VOLUMES: TableDefinition<u64, ()> = TableDefinition::new("deleted_volumes");
pub const LINEAGE_PARENTS: TableDefinition<u64, (u64, u64)> =
    TableDefinition::new("lineage_parents");
pub const REMOTE_PARENTS: TableDefinition<u64, &str> = TableDefinition::new("remote_parents");
pub const UPLOADED: TableDefinition<(u64, &[u8; 32]), &[u8]> = TableDefinition::new("uploaded");
pub const TOMBSTONES_DUE: TableDefinition<&str, ()> = TableDefinition::new("tombstones_due");

/// Manifest value meaning "this block is all zeros": no chunk is stored for it.
pub const ZERO_BLOCK: [u8; 32] = [0; 32];

pub const NEXT_VOLUME_ID: &str = "next_volume_id";
pub const NEXT_SNAPSHOT_ID: &str = "next_snapshot_id";
pub const NEXT_PACK_ID: &str = "next_pack_id";
