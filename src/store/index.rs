//! The chunk index: content hash → where the chunk lives and how many manifest
//! entries reference it. Rows live in the `chunks` table of the metadata database and
//! change only inside the caller's write transaction, together with the manifest
//! entries that account for the references.

use std::collections::BTreeMap;

use log::error;
use redb::{ReadableTable, Table};

use super::codec::{ChunkHash, Codec};
use super::pack::align_up;
use crate::namespace::tables::ChunkRow;
use crate::namespace::{NamespaceError, NsResult};

/// Where a chunk's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: u32,
    pub offset: u64,
    pub stored_len: u32,
    pub plain_len: u32,
    pub codec: Codec,
}

fn row_of(loc: ChunkLocation, refs: u64) -> ChunkRow {
    (
        loc.pack,
        loc.offset,
        loc.stored_len,
        loc.plain_len,
        loc.codec as u8,
        refs,
    )
}

/// A row's location (its codec checked) and reference count.
pub fn decode_row(hash: &ChunkHash, row: ChunkRow) -> NsResult<(ChunkLocation, u64)> {
    let (pack, offset, stored_len, plain_len, codec, refs) = row;
    let codec = Codec::from_u8(codec).ok_or_else(|| NamespaceError::Corrupt {
        what: format!("chunk {hash}"),
        reason: format!("unknown codec {codec}"),
    })?;
    Ok((
        ChunkLocation {
            pack,
            offset,
            stored_len,
            plain_len,
            codec,
        },
        refs,
    ))
}

/// The chunk's location and reference count, if it is stored.
pub fn lookup(
    table: &impl ReadableTable<&'static [u8; 32], ChunkRow>,
    hash: &ChunkHash,
) -> NsResult<Option<(ChunkLocation, u64)>> {
    match table.get(&hash.0)? {
        Some(row) => decode_row(hash, row.value()).map(Some),
        None => Ok(None),
    }
}

/// Where each pack's indexed chunks lie: per pack, sorted `(start, end)` byte ranges,
/// each widened to the page the next payload starts on (what freeing it would punch).
pub fn live_extents(
    table: &impl ReadableTable<&'static [u8; 32], ChunkRow>,
) -> NsResult<BTreeMap<u32, Vec<(u64, u64)>>> {
    let mut live: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for row in table.range::<&[u8; 32]>(..)? {
        let (_, row) = row?;
        let (pack, offset, stored_len, ..) = row.value();
        live.entry(pack)
            .or_default()
            .push((offset, align_up(offset + u64::from(stored_len))));
    }
    for extents in live.values_mut() {
        extents.sort_unstable();
    }
    Ok(live)
}

/// Sets a chunk's reference count as it is, codec unchecked (for `ebsfs check
/// --repair`, which counts the entries); at zero the row goes. The caller frees the
/// space once its transaction has committed.
pub fn set_refs(
    table: &mut Table<'_, &'static [u8; 32], ChunkRow>,
    hash: &ChunkHash,
    refs: u64,
) -> NsResult<()> {
    let row = table.get(&hash.0)?.map(|row| row.value());
    match row {
        Some(_) if refs == 0 => {
            table.remove(&hash.0)?;
        }
        Some((pack, offset, stored_len, plain_len, codec, _)) => {
            table.insert(&hash.0, (pack, offset, stored_len, plain_len, codec, refs))?;
        }
        None => {}
    }
    Ok(())
}

/// How [`add_refs`] treats a row that already exists at another location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// The existing row wins (the new copy is a duplicate to free).
    Keep,
    /// The new copy replaces it: the existing copy was found damaged.
    Replace,
}

/// Adds `count` references to a chunk, inserting its row at `loc` if it has none.
/// Returns the location the index holds afterwards.
pub fn add_refs(
    table: &mut Table<'_, &'static [u8; 32], ChunkRow>,
    hash: &ChunkHash,
    loc: ChunkLocation,
    count: u64,
    existing: Existing,
) -> NsResult<ChunkLocation> {
    let (kept, refs) = match lookup(table, hash)? {
        Some((_, refs)) if existing == Existing::Replace => (loc, refs),
        Some(found) => found,
        None => (loc, 0),
    };
    table.insert(&hash.0, row_of(kept, refs + count))?;
    Ok(kept)
}

/// Drops one reference. Returns the location when that was the last one: the row is
/// gone and the caller frees the space once its transaction has committed.
///
/// An entry naming a chunk that has no row (damage `ebsfs check` reports as a dangling
/// reference) holds nothing to drop: its entry can still go. Refusing would make the
/// snapshot undeletable, and fail every capture and start-up that settles it.
pub fn drop_ref(
    table: &mut Table<'_, &'static [u8; 32], ChunkRow>,
    hash: &ChunkHash,
) -> NsResult<Option<ChunkLocation>> {
    let Some((loc, refs)) = lookup(table, hash)? else {
        error!(
            "chunk {hash} is named by a manifest entry but not in the index (run `ebsfs check`)"
        );
        return Ok(None);
    };
    if refs <= 1 {
        table.remove(&hash.0)?;
        Ok(Some(loc))
    } else {
        table.insert(&hash.0, row_of(loc, refs - 1))?;
        Ok(None)
    }
}
