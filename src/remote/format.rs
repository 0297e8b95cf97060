//! What ebsfs keeps in a bucket: object names and formats (docs/FORMAT.md, section 6).
//!
//! ```text
//! <prefix>/ebsfs-store                 the store's format: version, encryption, key check
//! <prefix>/hosts/<host>                a host's lease: what it still needs, if it captures
//! <prefix>/packs/<host>/<inst>/<n>     chunk payloads, back to back (immutable)
//! <prefix>/pages/<hash>                one page of a snapshot's block map (immutable,
//!                                      content-addressed: shared by every snapshot that
//!                                      has the same page)
//! <prefix>/snapshots/<host>/<inst>/<id> a snapshot's root: its facts and its pages. Written
//!                                      last: the commit point readers trust (immutable)
//! <prefix>/meta/<host>/<inst>/<id>     who may read it (owner, mode, ACL), rewritten when
//!                                      that changes
//! <prefix>/deleted/<host>/<inst>/<id>  a deleted snapshot's tombstone
//! ```
//!
//! With encryption the names after the first `/` are keyed hashes (`Names`), and every
//! object (every chunk, in packs) is sealed (see `super::crypto`).

use serde::{Deserialize, Serialize};

use super::crypto::Crypto;
use crate::namespace::{Owner, Timestamp, Xattrs};
use crate::store::codec::{ChunkHash, Codec};

/// Version of the bucket layout.
pub const STORE_FORMAT: u64 = 1;

/// Blocks one page of a block map covers.
pub const PAGE_BLOCKS: u64 = 1024;

const PAGE_MAGIC: &[u8; 8] = b"EBSPAGE1";
const ROOT_MAGIC: &[u8; 8] = b"EBSROOT1";

#[derive(Debug, thiserror::Error)]
#[error("{what} is damaged: {reason}")]
pub struct FormatError {
    pub what: String,
    pub reason: String,
}

fn damaged(what: &str, reason: impl Into<String>) -> FormatError {
    FormatError {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Object names, in the clear or hashed with the name key.
pub struct Names<'a> {
    pub crypto: Option<&'a Crypto>,
}

impl Names<'_> {
    fn hidden(&self, kind: &str, clear: &str) -> String {
        match self.crypto {
            Some(crypto) => format!(
                "{kind}/{}",
                crypto.name(format!("{kind}/{clear}").as_bytes())
            ),
            None => format!("{kind}/{clear}"),
        }
    }

    pub fn format(&self) -> String {
        "ebsfs-store".to_string()
    }

    pub fn lease(&self, host: &str) -> String {
        self.hidden("hosts", host)
    }

    pub fn pack(&self, host: &str, pack: u64) -> String {
        self.hidden("packs", &format!("{host}/{pack}"))
    }

    pub fn root(&self, host: &str, snapshot: u64) -> String {
        self.hidden("snapshots", &format!("{host}/{snapshot}"))
    }

    /// The metadata object of the snapshot whose root is `root`.
    pub fn meta_of(&self, root: &str) -> String {
        format!("meta/{}", root.strip_prefix("snapshots/").unwrap_or(root))
    }

    /// The tombstone of the snapshot whose root is `root`.
    pub fn tombstone_of(&self, root: &str) -> String {
        format!(
            "deleted/{}",
            root.strip_prefix("snapshots/").unwrap_or(root)
        )
    }

    /// The root a tombstone stands for.
    pub fn root_of_tombstone(&self, tombstone: &str) -> String {
        format!(
            "snapshots/{}",
            tombstone.strip_prefix("deleted/").unwrap_or(tombstone)
        )
    }

    /// A page's name: the (keyed) hash of its contents.
    pub fn page(&self, plain: &[u8]) -> String {
        match self.crypto {
            Some(crypto) => format!("pages/{}", crypto.name(plain)),
            None => format!("pages/{}", blake3::hash(plain).to_hex()),
        }
    }
}

/// The store's format object.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoreFormat {
    pub format: u64,
    /// `none` or `xchacha20poly1305`.
    pub encryption: String,
    /// A known text sealed with the key: proves the key right before anything is read.
    #[serde(default)]
    pub key_check: String,
}

pub const KEY_CHECK_TEXT: &[u8] = b"ebsfs store key check";

/// Where a chunk lives in the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteChunk {
    pub hash: ChunkHash,
    /// The pack object's name.
    pub pack: String,
    pub offset: u64,
    /// Bytes in the pack (sealed, when encrypted).
    pub stored_len: u32,
    pub plain_len: u32,
    pub codec: Codec,
}

impl RemoteChunk {
    /// Compact bytes (for the data directory's record of an upload's progress).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.pack.len());
        out.push(self.codec as u8);
        out.extend_from_slice(&self.hash.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.plain_len.to_le_bytes());
        put_string(&mut out, &self.pack);
        out
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<RemoteChunk, FormatError> {
        let mut r = Reader { bytes, at: 0, what };
        let codec = Codec::from_u8(r.u8()?).ok_or_else(|| damaged(what, "unknown codec"))?;
        let chunk = RemoteChunk {
            codec,
            hash: ChunkHash(r.hash()?),
            offset: r.u64()?,
            stored_len: r.u32()?,
            plain_len: r.u32()?,
            pack: r.string()?,
        };
        r.end()?;
        Ok(chunk)
    }
}

/// One page of a snapshot's block map: the non-zero blocks in
/// `[index * PAGE_BLOCKS, (index + 1) * PAGE_BLOCKS)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// (block within the page, chunk), sorted by block.
    pub entries: Vec<(u16, RemoteChunk)>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| damaged(self.what, "cut short"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn hash(&mut self) -> Result<[u8; 32], FormatError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }

    fn string(&mut self) -> Result<String, FormatError> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| damaged(self.what, "a name is not UTF-8"))
    }

    fn magic(&mut self, magic: &[u8; 8]) -> Result<(), FormatError> {
        if self.take(8)? != magic {
            return Err(damaged(self.what, "bad magic"));
        }
        Ok(())
    }

    fn end(&self) -> Result<(), FormatError> {
        if self.at != self.bytes.len() {
            return Err(damaged(self.what, "trailing bytes"));
        }
        Ok(())
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

impl Page {
    /// The page's bytes (before any sealing). Identical pages encode identically.
    pub fn encode(&self) -> Vec<u8> {
        let mut packs: Vec<&str> = self.entries.iter().map(|(_, c)| c.pack.as_str()).collect();
        packs.sort_unstable();
        packs.dedup();
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        out.extend_from_slice(PAGE_MAGIC);
        out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
        for pack in &packs {
            put_string(&mut out, pack);
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (block, chunk) in &self.entries {
            let pack = packs.binary_search(&chunk.pack.as_str()).expect("listed") as u32;
            out.extend_from_slice(&block.to_le_bytes());
            out.push(chunk.codec as u8);
            out.extend_from_slice(&chunk.hash.0);
            out.extend_from_slice(&pack.to_le_bytes());
            out.extend_from_slice(&chunk.offset.to_le_bytes());
            out.extend_from_slice(&chunk.stored_len.to_le_bytes());
            out.extend_from_slice(&chunk.plain_len.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Page, FormatError> {
        let mut r = Reader { bytes, at: 0, what };
        r.magic(PAGE_MAGIC)?;
        let packs = (0..r.u32()?)
            .map(|_| r.string())
            .collect::<Result<Vec<_>, _>>()?;
        let count = r.u32()? as usize;
        let mut entries = Vec::with_capacity(count.min(PAGE_BLOCKS as usize));
        for _ in 0..count {
            let block = r.u16()?;
            let codec = Codec::from_u8(r.u8()?).ok_or_else(|| damaged(what, "unknown codec"))?;
            let hash = ChunkHash(r.hash()?);
            let pack = packs
                .get(r.u32()? as usize)
                .ok_or_else(|| damaged(what, "pack index out of range"))?
                .clone();
            entries.push((
                block,
                RemoteChunk {
                    hash,
                    pack,
                    offset: r.u64()?,
                    stored_len: r.u32()?,
                    plain_len: r.u32()?,
                    codec,
                },
            ));
        }
        r.end()?;
        if entries.windows(2).any(|w| w[0].0 >= w[1].0)
            || entries.iter().any(|e| u64::from(e.0) >= PAGE_BLOCKS)
        {
            return Err(damaged(what, "entries out of order or out of range"));
        }
        Ok(Page { entries })
    }

    pub fn get(&self, block_in_page: u16) -> Option<&RemoteChunk> {
        self.entries
            .binary_search_by_key(&block_in_page, |(b, _)| *b)
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Sets (`Some`) or clears (`None`: zeros) a block.
    pub fn set(&mut self, block_in_page: u16, chunk: Option<RemoteChunk>) {
        match (
            self.entries
                .binary_search_by_key(&block_in_page, |(b, _)| *b),
            chunk,
        ) {
            (Ok(i), Some(c)) => self.entries[i].1 = c,
            (Ok(i), None) => {
                self.entries.remove(i);
            }
            (Err(i), Some(c)) => self.entries.insert(i, (block_in_page, c)),
            (Err(_), None) => {}
        }
    }
}

/// The facts of a snapshot, fixed when it completed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFacts {
    pub host: String,
    pub snapshot: u64,
    pub volume: String,
    pub label: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub created: Timestamp,
    pub completed: Timestamp,
    pub parent: Option<String>,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
}

/// A snapshot's root: its facts and the names of its non-empty pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub facts: RootFacts,
    /// (page index, page object name), sorted by index.
    pub pages: Vec<(u64, String)>,
}

impl Root {
    pub fn encode(&self) -> Vec<u8> {
        let facts = toml::to_string(&self.facts).unwrap_or_else(|e| panic!("root facts: {e}"));
        let mut out = Vec::with_capacity(32 + facts.len() + self.pages.len() * 80);
        out.extend_from_slice(ROOT_MAGIC);
        out.extend_from_slice(&(facts.len() as u32).to_le_bytes());
        out.extend_from_slice(facts.as_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for (index, name) in &self.pages {
            out.extend_from_slice(&index.to_le_bytes());
            put_string(&mut out, name);
        }
        out
    }

    pub fn decode(bytes: &[u8], what: &str) -> Result<Root, FormatError> {
        let mut r = Reader { bytes, at: 0, what };
        r.magic(ROOT_MAGIC)?;
        let facts_len = r.u32()? as usize;
        let facts = std::str::from_utf8(r.take(facts_len)?)
            .map_err(|_| damaged(what, "facts are not UTF-8"))?;
        let facts: RootFacts = toml::from_str(facts).map_err(|e| damaged(what, e.to_string()))?;
        let count = r.u64()?;
        let mut pages = Vec::new();
        for _ in 0..count {
            let index = r.u64()?;
            pages.push((index, r.string()?));
        }
        r.end()?;
        if pages.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(damaged(what, "pages out of order"));
        }
        Ok(Root { facts, pages })
    }

    /// The name of page `index`, if it has any data.
    pub fn page(&self, index: u64) -> Option<&str> {
        self.pages
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|i| self.pages[i].1.as_str())
    }
}

/// Who may read a snapshot, and what it carries: rewritten by its host when it changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub owner: Owner,
    #[serde(default)]
    pub description: String,
    /// `user.*` attributes and the POSIX access ACL of the snapshot directory.
    #[serde(default)]
    pub xattrs: Xattrs,
}

/// A host's lease: what of the bucket it still needs, renewed every few minutes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub host: String,
    /// Roots this host still reads through: bases of its next uploads, roots of deleted
    /// snapshots it keeps, and the snapshots its volumes were made from.
    pub roots: Vec<String>,
    /// Uploading a snapshot since this server time (seconds since the epoch, from the
    /// `LastModified` of the lease written when the upload began): no object written
    /// after it may be collected while the lease is fresh.
    #[serde(default)]
    pub capturing_since: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, pack: &str) -> RemoteChunk {
        RemoteChunk {
            hash: ChunkHash::of(&[n]),
            pack: pack.to_string(),
            offset: u64::from(n) * 4096,
            stored_len: 100,
            plain_len: 65536,
            codec: Codec::Zstd,
        }
    }

    #[test]
    fn pages_round_trip_and_equal_pages_encode_equally() {
        let mut page = Page::default();
        page.set(7, Some(chunk(1, "packs/a/1")));
        page.set(3, Some(chunk(2, "packs/b/9")));
        page.set(9, Some(chunk(3, "packs/a/1")));
        page.set(9, None);
        let bytes = page.encode();
        let back = Page::decode(&bytes, "page").unwrap();
        assert_eq!(back, page);
        assert_eq!(back.get(3).unwrap().pack, "packs/b/9");
        assert!(back.get(9).is_none());
        let mut same = Page::default();
        same.set(3, Some(chunk(2, "packs/b/9")));
        same.set(7, Some(chunk(1, "packs/a/1")));
        assert_eq!(same.encode(), bytes);
        assert!(Page::decode(&bytes[..bytes.len() - 1], "page").is_err());
    }

    #[test]
    fn chunk_locations_round_trip() {
        let c = chunk(4, "packs/h/i/7");
        assert_eq!(RemoteChunk::decode(&c.encode(), "c").unwrap(), c);
        assert!(RemoteChunk::decode(&c.encode()[1..], "c").is_err());
    }

    #[test]
    fn roots_round_trip() {
        let root = Root {
            facts: RootFacts {
                host: "a".into(),
                snapshot: 4,
                volume: "db".into(),
                label: "nightly".into(),
                size_bytes: 1 << 30,
                block_size: 65536,
                created: Timestamp(1),
                completed: Timestamp(2),
                parent: Some("db@before".into()),
                changed_blocks: 3,
                stored_bytes: 4096,
            },
            pages: vec![(0, "pages/x".into()), (12, "pages/y".into())],
        };
        let back = Root::decode(&root.encode(), "root").unwrap();
        assert_eq!(back, root);
        assert_eq!(back.page(12), Some("pages/y"));
        assert_eq!(back.page(1), None);
    }

    #[test]
    fn encrypted_names_hide_hosts_and_ids() {
        let crypto = Crypto::new([3; 32]);
        let clear = Names { crypto: None };
        let hidden = Names {
            crypto: Some(&crypto),
        };
        assert_eq!(clear.root("db-host", 7), "snapshots/db-host/7");
        let name = hidden.root("db-host", 7);
        assert!(name.starts_with("snapshots/") && !name.contains("db-host"));
        assert_eq!(hidden.root_of_tombstone(&hidden.tombstone_of(&name)), name);
    }
}
