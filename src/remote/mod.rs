//! Snapshots in an S3-compatible bucket shared by many hosts.
//!
//! A host keeps capturing into its data directory as without a bucket; with a
//! `[store]` configured, a snapshot then becomes `completed` only once every object it
//! needs is durable in the bucket, its root written last (`upload`). Every host lists
//! the roots of all hosts (`catalog`), shows other hosts' snapshots as
//! `<volume>@<label>@<host>`, reads them with ranged GETs through bounded caches, and
//! makes volumes from them. Objects are immutable; deleting a snapshot writes a
//! tombstone, and garbage collection (`gc`) removes what nothing can need any more,
//! never what a host's lease says it still reads or what a capture in progress may
//! reference. docs/FORMAT.md, section 6, has the layout and the argument.

pub mod catalog;
pub mod client;
pub mod crypto;
pub mod format;
pub mod gc;
pub mod reader;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use log::info;

use crate::config::StoreSettings;
use crate::namespace::records::{decode_hex, encode_hex};
use crate::store::codec::{self, ChunkHash, Codec};
pub use client::{Bucket, BucketError, Listed};
use crypto::Crypto;
use format::{FormatError, Lease, Names, Page, RemoteChunk, Root, STORE_FORMAT, StoreFormat};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("snapshot store {store}: {source}")]
    Bucket {
        store: String,
        #[source]
        source: BucketError,
    },
    #[error(
        "snapshot store {0}: the key does not open this store (a different key_file than the \
         one it was created with?)"
    )]
    WrongKey(String),
    #[error("snapshot store {store}: {reason}")]
    Setup { store: String, reason: String },
    #[error("snapshot store {store}: {source}")]
    Damaged {
        store: String,
        #[source]
        source: FormatError,
    },
    #[error("snapshot store {store}: chunk {hash} in {pack}: {reason}")]
    BadChunk {
        store: String,
        hash: ChunkHash,
        pack: String,
        reason: String,
    },
}

pub type RemoteResult<T> = Result<T, RemoteError>;

/// Target size of a pack object: large enough for cheap requests, small enough that a
/// failed upload costs little to redo.
pub const PACK_OBJECT_BYTES: usize = 32 << 20;

/// Multipart uploads go in parts of this size.
const PART_BYTES: usize = 8 << 20;

/// Objects up to this size go up in one PUT, larger ones in parts: a pack object is
/// one request (a multipart upload costs two more requests, and a server such as
/// s3s-fs writes every byte twice, once per part and once joined).
const SINGLE_PUT_BYTES: usize = 2 * PACK_OBJECT_BYTES;

pub struct RemoteStore {
    pub bucket: Bucket,
    pub host: String,
    crypto: Option<Crypto>,
    pub settings: StoreSettings,
    pages: Mutex<PageCache>,
    /// Chunks read from the bucket, decoded (see `reader`).
    pub chunks: Mutex<reader::ChunkCache>,
    /// Target size of this store's pack objects ([`PACK_OBJECT_BYTES`]; tests use less).
    pub pack_bytes: std::sync::atomic::AtomicUsize,
    /// `<host>/<instance>`: names this data directory's packs and roots apart from
    /// those of any other data directory (set once its database is open).
    owner_key: std::sync::OnceLock<String>,
    /// The last lease this host wrote, and when (this host's clock).
    lease: Mutex<Option<(Lease, Instant)>>,
    /// Buffers of packs whose PUT ended, for the next packs of an upload.
    pack_buffers: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A pack's bytes on their way to the bucket; the buffer goes back to the store's
/// pool once the PUT (and every retry of it) is done with them. Reusing buffers
/// spares the kernel faulting in and zeroing fresh memory for every pack.
struct PooledPack {
    bytes: Vec<u8>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Most buffers the pool keeps.
    keep: usize,
}

impl AsRef<[u8]> for PooledPack {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for PooledPack {
    fn drop(&mut self) {
        let mut pool = lock(&self.pool);
        if pool.len() < self.keep {
            let mut bytes = std::mem::take(&mut self.bytes);
            bytes.clear();
            pool.push(bytes);
        }
    }
}

/// Decoded pages, bounded by count (each is at most ~100 KiB).
struct PageCache {
    pages: HashMap<String, Arc<Page>>,
    order: std::collections::VecDeque<String>,
    limit: usize,
}

impl PageCache {
    fn get(&self, name: &str) -> Option<Arc<Page>> {
        self.pages.get(name).cloned()
    }

    fn insert(&mut self, name: &str, page: Arc<Page>) {
        if self.pages.insert(name.to_string(), page).is_none() {
            self.order.push_back(name.to_string());
        }
        while self.order.len() > self.limit {
            if let Some(old) = self.order.pop_front() {
                self.pages.remove(&old);
            }
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl RemoteStore {
    /// Connects to the bucket and checks it: reachable, credentials accepted, its format
    /// one this ebsfs reads, the key right. A new store gets its format object. Fails
    /// within the request timeout and its bounded retries, with a message saying what
    /// is wrong.
    pub fn connect(settings: &StoreSettings, host: &str) -> RemoteResult<RemoteStore> {
        let bucket = Bucket::connect(settings).map_err(|reason| RemoteError::Setup {
            store: format!("s3://{}/{}", settings.bucket, settings.prefix),
            reason,
        })?;
        let crypto = match &settings.key_file {
            Some(path) => Some(Crypto::from_key_file(path).map_err(|e| RemoteError::Setup {
                store: bucket.shown.clone(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        RemoteStore::open(bucket, host, crypto, settings.clone())
    }

    /// A store over an already made bucket (tests use an in-memory one).
    pub fn open(
        bucket: Bucket,
        host: &str,
        crypto: Option<Crypto>,
        settings: StoreSettings,
    ) -> RemoteResult<RemoteStore> {
        let store = RemoteStore {
            bucket,
            host: host.to_string(),
            crypto,
            pages: Mutex::new(PageCache {
                pages: HashMap::new(),
                order: Default::default(),
                limit: (settings.cache_size_bytes / (64 << 10)).clamp(64, 65_536) as usize,
            }),
            chunks: Mutex::new(reader::ChunkCache::new(settings.cache_size_bytes)),
            settings,
            owner_key: std::sync::OnceLock::new(),
            pack_bytes: std::sync::atomic::AtomicUsize::new(PACK_OBJECT_BYTES),
            lease: Mutex::new(None),
            pack_buffers: Arc::default(),
        };
        store.check_format()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(BucketError) -> RemoteError + '_ {
        move |source| RemoteError::Bucket {
            store: self.bucket.shown.clone(),
            source,
        }
    }

    fn damaged(&self, source: FormatError) -> RemoteError {
        RemoteError::Damaged {
            store: self.bucket.shown.clone(),
            source,
        }
    }

    pub fn names(&self) -> Names<'_> {
        Names {
            crypto: self.crypto.as_ref(),
        }
    }

    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// Sets the key naming this data directory's objects (its database's instance).
    pub fn set_instance(&self, instance: u64) {
        let _ = self.owner_key.set(format!("{}/{instance:016x}", self.host));
    }

    /// `<host>/<instance>`, or just the host before [`RemoteStore::set_instance`].
    pub fn owner_key(&self) -> &str {
        self.owner_key.get().map_or(&self.host, String::as_str)
    }

    /// The name of this data directory's snapshot `id`'s root.
    pub fn root_name(&self, id: u64) -> String {
        self.names().root(self.owner_key(), id)
    }

    /// Reads the store's format object, writing it for a new store.
    fn check_format(&self) -> RemoteResult<()> {
        let name = self.names().format();
        let encryption = if self.crypto.is_some() {
            "xchacha20poly1305"
        } else {
            "none"
        };
        let Some(bytes) = self.bucket.get(&name).map_err(self.err())? else {
            let format = StoreFormat {
                format: STORE_FORMAT,
                encryption: encryption.to_string(),
                key_check: self
                    .crypto
                    .as_ref()
                    .map(|c| encode_hex(&c.seal(format::KEY_CHECK_TEXT)))
                    .unwrap_or_default(),
            };
            let text = toml::to_string(&format).unwrap_or_default();
            self.bucket
                .put(&name, text.into_bytes())
                .map_err(self.err())?;
            info!(
                "snapshot store {}: created ({encryption})",
                self.bucket.shown
            );
            return Ok(());
        };
        let shown = self.bucket.shown.clone();
        let format: StoreFormat = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| toml::from_str(t).ok())
            .ok_or_else(|| RemoteError::Setup {
                store: shown.clone(),
                reason: format!("{name} is not an ebsfs store's format object"),
            })?;
        if format.format > STORE_FORMAT {
            return Err(RemoteError::Setup {
                store: shown,
                reason: format!(
                    "the store has format {}; this ebsfs reads format {STORE_FORMAT}: use a newer ebsfs",
                    format.format
                ),
            });
        }
        match (&self.crypto, format.encryption.as_str()) {
            (None, "none") => Ok(()),
            (Some(crypto), "xchacha20poly1305") => {
                let opened = decode_hex(&format.key_check).and_then(|sealed| crypto.open(&sealed));
                if opened.as_deref() == Some(format::KEY_CHECK_TEXT) {
                    Ok(())
                } else {
                    Err(RemoteError::WrongKey(shown))
                }
            }
            (None, _) => Err(RemoteError::Setup {
                store: shown,
                reason: "the store is encrypted: set store.key_file to its key".into(),
            }),
            (Some(_), other) => Err(RemoteError::Setup {
                store: shown,
                reason: format!(
                    "the store is not encrypted ({other}) but store.key_file is set: remove it, or use another prefix"
                ),
            }),
        }
    }

    /// Writes a whole object, sealed when the store is encrypted.
    pub fn put_object(&self, name: &str, plain: &[u8]) -> RemoteResult<()> {
        let bytes = match &self.crypto {
            Some(crypto) => crypto.seal(plain),
            None => plain.to_vec(),
        };
        self.bucket
            .put_multipart(name, bytes, SINGLE_PUT_BYTES, PART_BYTES)
            .map_err(self.err())
    }

    /// Reads a whole object, opened when the store is encrypted; `None` if missing.
    pub fn get_object(&self, name: &str) -> RemoteResult<Option<Vec<u8>>> {
        let Some(bytes) = self.bucket.get(name).map_err(self.err())? else {
            return Ok(None);
        };
        match &self.crypto {
            Some(crypto) => crypto.open(&bytes).map(Some).ok_or_else(|| {
                self.damaged(FormatError {
                    what: name.to_string(),
                    reason: "it does not decrypt (damaged, or written with another key)".into(),
                })
            }),
            None => Ok(Some(bytes)),
        }
    }

    /// A snapshot's root.
    pub fn root(&self, name: &str) -> RemoteResult<Option<Root>> {
        match self.get_object(name)? {
            Some(bytes) => Root::decode(&bytes, name)
                .map(Some)
                .map_err(|e| self.damaged(e)),
            None => Ok(None),
        }
    }

    /// A page of a block map, through the page cache.
    pub fn page(&self, name: &str) -> RemoteResult<Arc<Page>> {
        let cached = lock(&self.pages).get(name);
        if let Some(page) = cached {
            return Ok(page);
        }
        let bytes = self.get_object(name)?.ok_or_else(|| {
            self.damaged(FormatError {
                what: name.to_string(),
                reason: "the page is missing".into(),
            })
        })?;
        if self.names().page(&bytes) != name {
            return Err(self.damaged(FormatError {
                what: name.to_string(),
                reason: "its contents do not match its name".into(),
            }));
        }
        let page = Arc::new(Page::decode(&bytes, name).map_err(|e| self.damaged(e))?);
        lock(&self.pages).insert(name, page.clone());
        Ok(page)
    }

    /// Uploads a page (content-addressed: a page already there is the same page).
    /// Returns its name.
    pub fn put_page(&self, page: &Page) -> RemoteResult<String> {
        let plain = page.encode();
        let name = self.names().page(&plain);
        self.put_object(&name, &plain)?;
        lock(&self.pages).insert(&name, Arc::new(page.clone()));
        Ok(name)
    }

    /// Builds and uploads pack object `pack` of this host from chunk payloads (as
    /// stored locally: compressed or raw), each sealed alone when encrypting. Returns
    /// where each chunk went.
    pub fn put_pack(
        &self,
        pack: u64,
        chunks: &[(ChunkHash, Codec, u32, Vec<u8>)],
    ) -> RemoteResult<Vec<RemoteChunk>> {
        let mut builder = self.pack_builder(pack, chunks.iter().map(|c| c.3.len()).sum());
        for (hash, codec, plain_len, payload) in chunks {
            builder.push(*hash, *codec, *plain_len, payload);
        }
        builder.finish()
    }

    /// A pack object being built in memory (one buffer: payloads are appended as
    /// they are read), uploaded by [`PackBuilder::finish`].
    pub fn pack_builder(&self, pack: u64, capacity: usize) -> PackBuilder<'_> {
        let capacity = capacity + capacity / 64;
        let mut bytes = lock(&self.pack_buffers).pop().unwrap_or_default();
        bytes.reserve(capacity);
        PackBuilder {
            store: self,
            name: self.names().pack(self.owner_key(), pack),
            bytes,
            placed: Vec::new(),
        }
    }

    /// Frees the buffers kept for packs (an upload is over).
    pub fn release_pack_buffers(&self) {
        lock(&self.pack_buffers).clear();
    }

    /// Reads, opens, decompresses and verifies chunks of one pack object, in
    /// ascending order of offset (back to back, or with gaps read through), with a
    /// single ranged GET; hands each one's plain bytes to `sink`.
    pub fn read_chunks(
        &self,
        chunks: &[RemoteChunk],
        mut sink: impl FnMut(usize, &[u8]),
    ) -> RemoteResult<()> {
        let (Some(first), Some(last)) = (chunks.first(), chunks.last()) else {
            return Ok(());
        };
        let end = last.offset + u64::from(last.stored_len);
        let bytes = self
            .bucket
            .get_range(&first.pack, first.offset..end)
            .map_err(self.err())?;
        for (i, chunk) in chunks.iter().enumerate() {
            let at = (chunk.offset - first.offset) as usize;
            let stored = bytes
                .get(at..at + chunk.stored_len as usize)
                .ok_or_else(|| self.bad_chunk(chunk, "the pack is shorter than its pages say"))?;
            let opened;
            let payload = match &self.crypto {
                Some(crypto) => {
                    opened = crypto
                        .open(stored)
                        .ok_or_else(|| self.bad_chunk(chunk, "it does not decrypt"))?;
                    &opened[..]
                }
                None => stored,
            };
            let plain = codec::decode(payload, chunk.codec, chunk.plain_len as usize, chunk.hash)
                .map_err(|e| self.bad_chunk(chunk, &e.to_string()))?;
            sink(i, &plain);
        }
        Ok(())
    }

    fn bad_chunk(&self, chunk: &RemoteChunk, reason: &str) -> RemoteError {
        RemoteError::BadChunk {
            store: self.bucket.shown.clone(),
            hash: chunk.hash,
            pack: chunk.pack.clone(),
            reason: reason.to_string(),
        }
    }

    /// Writes this host's lease; returns the server's time of the write.
    pub fn write_lease(&self, lease: Lease) -> RemoteResult<SystemTime> {
        let name = self.names().lease(&self.host);
        let text = toml::to_string(&lease).unwrap_or_default();
        self.put_object(&name, text.as_bytes())?;
        let written = self
            .bucket
            .head(&name)
            .map_err(self.err())?
            .map_or_else(SystemTime::now, |l| l.modified);
        *lock(&self.lease) = Some((lease, Instant::now()));
        Ok(written)
    }

    /// Removes this host's lease: for a collection from the command line, whose lease
    /// protects nothing and is not needed once it is over.
    pub fn remove_lease(&self) -> RemoteResult<()> {
        self.bucket
            .delete(&self.names().lease(&self.host))
            .map_err(self.err())?;
        *lock(&self.lease) = None;
        Ok(())
    }

    /// Whether this host's lease was renewed recently enough that no collection can
    /// have counted it as gone (half the lease's life, by this host's clock).
    pub fn lease_is_fresh(&self) -> bool {
        lock(&self.lease)
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < self.lease_ttl() / 2)
    }

    /// After how long without renewal a lease counts as gone.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.lease_seconds)
    }

    /// How often a host renews its lease.
    pub fn lease_renew(&self) -> Duration {
        self.lease_ttl() / 8
    }

    /// The lease this host last wrote.
    pub fn last_lease(&self) -> Option<Lease> {
        lock(&self.lease).as_ref().map(|(l, _)| l.clone())
    }
}

/// See [`RemoteStore::pack_builder`].
pub struct PackBuilder<'a> {
    store: &'a RemoteStore,
    name: String,
    bytes: Vec<u8>,
    placed: Vec<RemoteChunk>,
}

impl PackBuilder<'_> {
    /// Appends a chunk's payload (sealed alone when the store is encrypted).
    pub fn push(&mut self, hash: ChunkHash, codec: Codec, plain_len: u32, payload: &[u8]) {
        let offset = self.bytes.len() as u64;
        match &self.store.crypto {
            Some(crypto) => self.bytes.extend_from_slice(&crypto.seal(payload)),
            None => self.bytes.extend_from_slice(payload),
        }
        self.placed.push(RemoteChunk {
            hash,
            pack: self.name.clone(),
            offset,
            stored_len: (self.bytes.len() as u64 - offset) as u32,
            plain_len,
            codec,
        });
    }

    /// Uploads the pack; returns where each chunk went.
    pub fn finish(self) -> RemoteResult<Vec<RemoteChunk>> {
        let bytes = Bytes::from_owner(PooledPack {
            bytes: self.bytes,
            pool: self.store.pack_buffers.clone(),
            keep: self.store.settings.upload_concurrency + 1,
        });
        self.store
            .bucket
            .put_multipart(&self.name, bytes, SINGLE_PUT_BYTES, PART_BYTES)
            .map_err(self.store.err())?;
        Ok(self.placed)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn settings() -> StoreSettings {
        StoreSettings {
            bucket: "test".into(),
            prefix: "p".into(),
            endpoint: None,
            region: "us-east-1".into(),
            path_style: true,
            credentials_file: None,
            profile: None,
            upload_concurrency: 2,
            download_concurrency: 2,
            cache_size_bytes: 8 << 20,
            poll_seconds: 1,
            key_file: None,
            gc_grace_seconds: 0,
            request_timeout_seconds: 5,
            lease_seconds: 8,
            payload_checksum: crate::config::PayloadChecksum::Crc64Nvme,
        }
    }

    /// An in-memory bucket that fails on demand: every request while `down`, and
    /// writes once `writes_left` reaches 0 (negative: never).
    #[derive(Debug)]
    pub struct Faulty {
        pub inner: Arc<object_store::memory::InMemory>,
        pub down: std::sync::atomic::AtomicBool,
        pub writes_left: std::sync::atomic::AtomicI64,
    }

    impl Faulty {
        pub fn new(inner: Arc<object_store::memory::InMemory>) -> Arc<Faulty> {
            Arc::new(Faulty {
                inner,
                down: false.into(),
                writes_left: (-1).into(),
            })
        }

        fn check(&self, write: bool) -> object_store::Result<()> {
            use std::sync::atomic::Ordering;
            let refused = self.down.load(Ordering::SeqCst)
                || (write
                    && self
                        .writes_left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n > 0).then_some(n - 1).or((n < 0).then_some(n))
                        })
                        .is_err());
            if refused {
                return Err(object_store::Error::Generic {
                    store: "faulty",
                    source: "connection refused (test)".into(),
                });
            }
            Ok(())
        }
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "faulty")
        }
    }

    use futures::StreamExt;
    use object_store::path::Path as P;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &P,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.check(true)?;
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &P,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.check(true)?;
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &P,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.check(false)?;
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<P>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<P>> {
            if let Err(e) = self.check(true) {
                return futures::stream::once(async move { Err(e) }).boxed();
            }
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&P>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            if let Err(e) = self.check(false) {
                return futures::stream::once(async move { Err(e) }).boxed();
            }
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&P>,
        ) -> object_store::Result<ListResult> {
            self.check(false)?;
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &P,
            to: &P,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.check(true)?;
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// Commits snapshot `id` of volume `db` of `store`'s host (label `s<id>`) with
    /// `pages` (page 0, 1, …) as an upload does: its metadata, then its root. Returns
    /// the root's name.
    pub fn commit(store: &RemoteStore, id: u64, pages: &[&str]) -> String {
        let names = store.names();
        let root = Root {
            facts: format::RootFacts {
                host: store.host.clone(),
                snapshot: id,
                volume: "db".into(),
                label: format!("s{id}"),
                size_bytes: 1 << 30,
                block_size: 65536,
                created: crate::namespace::Timestamp(1),
                completed: crate::namespace::Timestamp(2),
                parent: None,
                changed_blocks: pages.len() as u64,
                stored_bytes: 4096,
            },
            pages: pages
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p.to_string()))
                .collect(),
        };
        let name = names.root(&store.host, id);
        let meta = format::SnapshotMeta {
            owner: crate::namespace::Owner {
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
            description: String::new(),
            xattrs: Default::default(),
        };
        let meta = toml::to_string(&meta).expect("metadata");
        store
            .put_object(&names.meta_of(&name), meta.as_bytes())
            .unwrap();
        store.put_object(&name, &root.encode()).unwrap();
        name
    }

    /// A store over a faulty bucket.
    pub fn faulty_store(bucket: &Arc<Faulty>, host: &str) -> RemoteResult<RemoteStore> {
        let bucket =
            Bucket::with_store(bucket.clone(), "p", "faulty://test/p".into()).expect("bucket");
        RemoteStore::open(bucket, host, None, settings())
    }

    /// A store over `memory` (an `object_store` in-memory bucket shared by "hosts").
    pub fn store(
        memory: &Arc<object_store::memory::InMemory>,
        host: &str,
        key: Option<[u8; 32]>,
    ) -> RemoteResult<RemoteStore> {
        let bucket =
            Bucket::with_store(memory.clone(), "p", "memory://test/p".into()).expect("bucket");
        RemoteStore::open(bucket, host, key.map(Crypto::new), settings())
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::store;
    use super::*;

    #[test]
    fn a_store_checks_its_key_and_refuses_a_wrong_one() {
        let memory = Arc::new(object_store::memory::InMemory::new());
        store(&memory, "a", Some([1; 32])).unwrap();
        store(&memory, "b", Some([1; 32])).unwrap();
        let wrong = store(&memory, "b", Some([2; 32])).err().unwrap();
        assert!(matches!(wrong, RemoteError::WrongKey(_)), "{wrong}");
        assert!(wrong.to_string().contains("key"));
        let none = store(&memory, "b", None).err().unwrap();
        assert!(none.to_string().contains("key_file"), "{none}");
    }

    #[test]
    fn chunks_go_up_in_packs_and_come_back_verified() {
        for key in [None, Some([5; 32])] {
            let memory = Arc::new(object_store::memory::InMemory::new());
            let s = store(&memory, "a", key).unwrap();
            let plain: Vec<Vec<u8>> = (0..3u8).map(|n| vec![n; 5000]).collect();
            let chunks: Vec<_> = plain
                .iter()
                .map(|p| (ChunkHash::of(p), Codec::Raw, p.len() as u32, p.clone()))
                .collect();
            let placed = s.put_pack(1, &chunks).unwrap();
            let mut back = Vec::new();
            s.read_chunks(&placed, |_, bytes| back.push(bytes.to_vec()))
                .unwrap();
            assert_eq!(back, plain);
            let mut page = Page::default();
            page.set(0, Some(placed[1].clone()));
            let name = s.put_page(&page).unwrap();
            assert_eq!(*s.page(&name).unwrap(), page);
            // A chunk whose bytes changed in the bucket is refused, never returned.
            let pack = &placed[0].pack;
            let mut bytes = s.bucket.get(pack).unwrap().unwrap();
            bytes[30] ^= 1;
            s.bucket.put(pack, bytes).unwrap();
            assert!(s.read_chunks(&placed[..1], |_, _| {}).is_err());
        }
    }
}
