//! The snapshot store's part of `ebsfs check`: verifies what the bucket holds, and
//! never changes it (no request it makes writes or deletes).
//!
//! What is verified (docs/FORMAT.md, section 6, has the layout; 6.5 this check):
//! - the store's format object, then the key ([`open`]);
//! - every snapshot's root decodes; every page a root names exists, matches its name
//!   and decodes; every pack a page names exists and is long enough for the chunks the
//!   page places in it (its listed size against offset + length); the first chunk of
//!   each pack, and with `deep` every chunk a page names, is read, opened (decrypted
//!   and authenticated), decompressed and its hash checked;
//! - every live snapshot has a metadata object that decodes, every lease decodes;
//! - tombstones whose root is gone, and metadata objects whose root is gone, are leaks.
//!
//! What a collection would remove (pages and packs no kept snapshot reaches, deleted
//! snapshots past their grace) is reported as notes, not problems: garbage within its
//! grace is normal in a bucket that hosts write to. The figures follow `remote::gc`'s
//! rules, with this host's clock standing in for the server's.
//!
//! Hosts keep writing while the check runs. Objects are immutable and written in an
//! order (packs and pages, then metadata, then the root; a tombstone after its root),
//! and the listings below follow it, so a check never mistakes an upload in progress
//! for damage. A collection running at the same time may remove a deleted snapshot
//! between the listing and the reads: every snapshot found damaged is looked for again
//! at the end, and one that is gone by then is not reported.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::CheckError;
use super::report::{EXIT_CLEAN, EXIT_CORRUPTION, EXIT_LEAKS, Problem, Severity, counted};
use crate::config::{ByteSize, StoreSettings};
use crate::remote::client::Job;
use crate::remote::crypto::Crypto;
use crate::remote::format::{Names, Page, RemoteChunk, Root, SnapshotMeta, StoreFormat};
use crate::remote::gc::{damaged, read_all, read_lease};
use crate::remote::{Bucket, Listed, RemoteError, RemoteResult, RemoteStore};

/// Most bytes one ranged GET of a deep check spans.
const READ_SPAN_BYTES: u64 = 8 << 20;

/// What [`open`] found at the store's URL.
pub enum Opened {
    /// A store, its format and key checked.
    Store(Box<RemoteStore>),
    /// No object at all under the prefix: nothing to check.
    Empty(BucketReport),
    /// Objects, but no readable format object: nothing can be read safely.
    Unusable(BucketReport),
}

/// Connects to the store `settings` names, as host `host`, without writing to it.
pub fn connect(settings: &StoreSettings, host: &str) -> Result<Opened, CheckError> {
    let shown = format!("s3://{}/{}", settings.bucket, settings.prefix);
    let setup = |reason: String| {
        CheckError::Store(RemoteError::Setup {
            store: shown.clone(),
            reason,
        })
    };
    let bucket = Bucket::connect(settings).map_err(setup)?;
    let crypto = match &settings.key_file {
        Some(path) => Some(Crypto::from_key_file(path).map_err(|e| setup(e.to_string()))?),
        None => None,
    };
    open(bucket, host, crypto, settings.clone())
}

/// Opens the store in `bucket` for checking. Unlike `RemoteStore::connect`, never
/// creates a store: a prefix without a format object is reported, not initialised.
/// An unreachable endpoint, refused credentials, a wrong key or a newer format fail.
pub fn open(
    bucket: Bucket,
    host: &str,
    crypto: Option<Crypto>,
    settings: StoreSettings,
) -> Result<Opened, CheckError> {
    let shown = bucket.shown.clone();
    let failed = |source| {
        CheckError::Store(RemoteError::Bucket {
            store: shown.clone(),
            source,
        })
    };
    let name = Names { crypto: None }.format();
    let empty_report = || BucketReport::new(&shown, crypto.is_some(), false);
    match bucket.get(&name).map_err(failed)? {
        Some(bytes) => {
            let format = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| toml::from_str::<StoreFormat>(t).ok());
            if format.is_none() {
                let mut report = empty_report();
                report.problems.push(Problem::new(
                    Severity::Corruption,
                    format!("format object {name}"),
                    "damaged (not an ebsfs store's format object): no host can open the \
                     store, and nothing in it can be checked",
                ));
                return Ok(Opened::Unusable(report));
            }
        }
        None => {
            let objects = bucket.list("").map_err(failed)?;
            let mut report = empty_report();
            if objects.is_empty() {
                report.notes.push(
                    "no ebsfs store here (no object under the prefix): nothing to check; the \
                     first mount with this [store] creates it (check store.url if one \
                     should be there)"
                        .to_string(),
                );
                return Ok(Opened::Empty(report));
            }
            report.problems.push(Problem::new(
                Severity::Corruption,
                format!("format object {name}"),
                format!(
                    "missing, though the prefix holds {}: whether the store is encrypted is \
                     unknown, so nothing in it can be checked (the next mount with this \
                     [store] writes a new format object, with its own key_file setting)",
                    counted(objects.len() as u64, "object")
                ),
            ));
            return Ok(Opened::Unusable(report));
        }
    }
    // The format object exists, so opening only reads it (and checks the key).
    RemoteStore::open(bucket, host, crypto, settings)
        .map(|store| Opened::Store(Box::new(store)))
        .map_err(CheckError::Store)
}

/// What the check saw in the bucket.
#[derive(Clone, Debug, Default)]
pub struct BucketTotals {
    /// Snapshots whose root exists and has no tombstone.
    pub snapshots: usize,
    /// Deleted snapshots (with a tombstone) whose root is still there.
    pub deleted: usize,
    /// Hosts whose snapshots are there.
    pub hosts: usize,
    pub pages: usize,
    pub packs: usize,
    pub pack_bytes: u64,
    pub leases: usize,
    /// Leases renewed within the lease length.
    pub fresh_leases: usize,
    /// Distinct chunks the pages name.
    pub chunks: u64,
    /// Chunks read back and verified (with `deep` all, else the first of each pack),
    /// and their stored and plain bytes.
    pub chunks_verified: u64,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
}

/// How much of a snapshot cannot be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// Its root is damaged: nothing of it can be read, and other hosts do not show it.
    pub root: bool,
    /// Blocks whose chunk is missing, cut short or fails verification.
    pub blocks: u64,
    /// Pages (of up to 1024 blocks each) that are missing or damaged.
    pub pages: u64,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.root {
            return write!(f, "nothing can be read (its root is damaged)");
        }
        let mut parts = Vec::new();
        if self.blocks > 0 {
            parts.push(format!("{} cannot be read", counted(self.blocks, "block")));
        }
        if self.pages > 0 {
            parts.push(format!(
                "no block of {} can be read",
                counted(self.pages, "damaged or missing page")
            ));
        }
        write!(f, "{}", parts.join("; "))
    }
}

#[derive(Clone, Debug)]
pub struct BucketReport {
    /// The store, as configured (`s3://bucket/prefix at endpoint`).
    pub store: String,
    pub encrypted: bool,
    pub deep: bool,
    pub totals: BucketTotals,
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
    /// Snapshots that cannot be read in full, by name, and how much of each.
    pub damaged: BTreeMap<String, Damage>,
    /// The store's contents were checked (not so when [`open`] found no store).
    pub checked: bool,
}

impl BucketReport {
    fn new(store: &str, encrypted: bool, deep: bool) -> BucketReport {
        BucketReport {
            store: store.to_string(),
            encrypted,
            deep,
            totals: BucketTotals::default(),
            notes: Vec::new(),
            problems: Vec::new(),
            damaged: BTreeMap::new(),
            checked: false,
        }
    }

    /// The worst problem found (none is ever repaired: the check only reads).
    pub fn worst(&self) -> Option<Severity> {
        self.problems.iter().map(|p| p.severity).max()
    }

    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            None => EXIT_CLEAN,
            Some(Severity::Leak) => EXIT_LEAKS,
            Some(Severity::Corruption) => EXIT_CORRUPTION,
        }
    }

    /// The lines of counts, after the first.
    fn fmt_totals(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        let deleted = match t.deleted {
            0 => String::new(),
            n => format!(" (and {n} deleted)"),
        };
        writeln!(
            f,
            "  {}{deleted} of {}, {}, {} ({}), {} ({} fresh)",
            counted(t.snapshots as u64, "snapshot"),
            counted(t.hosts as u64, "host"),
            counted(t.pages as u64, "page"),
            counted(t.packs as u64, "pack"),
            ByteSize(t.pack_bytes),
            counted(t.leases as u64, "lease"),
            t.fresh_leases
        )?;
        writeln!(
            f,
            "  {} named, {} read and verified{}: {} stored, {} plain",
            counted(t.chunks, "chunk"),
            t.chunks_verified,
            if self.deep {
                ""
            } else {
                " (the first of each pack; --deep reads every one)"
            },
            ByteSize(t.stored_bytes),
            ByteSize(t.plain_bytes)
        )?;
        Ok(())
    }

    fn count(&self, severity: Severity) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == severity)
            .count()
    }
}

impl fmt::Display for BucketReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "snapshot store {}{}",
            self.store,
            if self.encrypted { " (encrypted)" } else { "" }
        )?;
        if self.checked {
            self.fmt_totals(f)?;
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        for (name, damage) in &self.damaged {
            writeln!(f, "damaged snapshot {name}: {damage}")?;
        }
        let (corrupt, leaks) = (self.count(Severity::Corruption), self.count(Severity::Leak));
        if corrupt + leaks == 0 {
            return writeln!(f, "no problems found in the bucket");
        }
        writeln!(
            f,
            "not repaired: `ebsfs check` only reads the bucket (with --repair too); a \
             snapshot's own host still has its local copy unless it was deleted there"
        )?;
        writeln!(
            f,
            "{} and {} in the bucket (exit status {})",
            counted(corrupt as u64, "corruption problem"),
            counted(leaks as u64, "leak"),
            self.exit_code()
        )
    }
}

/// Checks the store (see the module's documentation); `deep` reads and verifies every
/// chunk, not only the first of each pack. Fails only when the bucket cannot be read
/// (a request failing after its retries); damage is reported.
pub fn check_bucket(store: &RemoteStore, deep: bool) -> Result<BucketReport, CheckError> {
    check_bucket_at(store, deep, SystemTime::now())
}

/// One snapshot root found in the listing.
struct Snap {
    /// The root object's name.
    object: String,
    /// As the mount shows it: `<volume>@<label>@<host>` (and ` (deleted)`).
    name: String,
    /// When its tombstone was written, if it is deleted.
    tombstone: Option<SystemTime>,
    deleted: bool,
    /// `None`: damaged.
    root: Option<Root>,
    /// Gone when read, or when looked for again: deleted by a collection meanwhile.
    vanished: bool,
}

/// A page as read: its entries, or why it cannot be read.
type PageState = Result<Page, String>;

/// Why a chunk cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    /// Its pack is missing or too short (the pack's name).
    Pack(String),
    /// The chunk itself fails (pack, offset).
    Chunk(String, u64),
}

/// A chunk's identity within its pack.
type ChunkKey = (String, u64, u32, [u8; 32]);

fn key(chunk: &RemoteChunk) -> ChunkKey {
    (
        chunk.pack.clone(),
        chunk.offset,
        chunk.stored_len,
        chunk.hash.0,
    )
}

pub(crate) fn check_bucket_at(
    store: &RemoteStore,
    deep: bool,
    now: SystemTime,
) -> Result<BucketReport, CheckError> {
    let mut report = BucketReport::new(&store.bucket.shown, store.encrypted(), deep);
    report.checked = true;
    let names = store.names();
    let ttl = store.lease_ttl();
    let grace = Duration::from_secs(store.settings.gc_grace_seconds);
    let before = |age: Duration| now.checked_sub(age).unwrap_or(UNIX_EPOCH);

    // Tombstones before roots (a tombstone is written after its root), roots before
    // metadata (written before its root) and leases.
    let tombstones = listing(store, "deleted/")?;
    let roots = listing(store, "snapshots/")?;
    let metas = listing(store, "meta/")?;
    let leases = listing(store, "hosts/")?;

    // Leases: what they protect, and whether collections can read them.
    let lease_names: Vec<String> = leases.keys().cloned().collect();
    let mut protected = BTreeSet::new();
    let mut capturing_since: Option<u64> = None;
    let mut gc_blocked = Vec::new();
    report.totals.leases = leases.len();
    for (name, lease) in lease_names
        .iter()
        .zip(read_all(store, &lease_names, read_lease))
    {
        let fresh = leases[name].modified > before(ttl);
        report.totals.fresh_leases += usize::from(fresh);
        match readable(store, lease)? {
            Ok(None) => {}
            Ok(Some(lease)) if fresh => {
                protected.extend(lease.roots);
                if let Some(since) = lease.capturing_since {
                    capturing_since = Some(capturing_since.map_or(since, |c| c.min(since)));
                }
            }
            Ok(Some(_)) => {}
            Err(reason) if fresh => {
                gc_blocked.push(format!("lease {name}"));
                report.problems.push(Problem::new(
                    Severity::Corruption,
                    format!("lease {name}"),
                    format!(
                        "damaged ({reason}): every collection fails while it is there; its \
                         host writes it anew at its next renewal"
                    ),
                ));
            }
            Err(reason) => report.problems.push(Problem::new(
                Severity::Leak,
                format!("lease {name}"),
                format!("damaged ({reason}) and stale: no collection reads or removes it"),
            )),
        }
    }

    // Roots.
    let root_names: Vec<String> = roots.keys().cloned().collect();
    let mut snaps = Vec::with_capacity(root_names.len());
    for (object, root) in root_names
        .iter()
        .zip(read_all(store, &root_names, |s, n| s.root(n)))
    {
        let tombstone = tombstones
            .get(&names.tombstone_of(object))
            .map(|t| t.modified);
        let deleted = tombstone.is_some();
        let (root, vanished) = match readable(store, root)? {
            Ok(Some(root)) => (Some(root), false),
            Ok(None) => (None, true),
            Err(reason) => {
                report.problems.push(root_problem(object, &reason, deleted));
                (None, false)
            }
        };
        snaps.push(Snap {
            object: object.clone(),
            name: String::new(),
            tombstone,
            deleted,
            root,
            vanished,
        });
    }
    name_snapshots(&mut snaps);
    let present = |s: &&Snap| !s.vanished;
    report.totals.snapshots = snaps.iter().filter(present).filter(|s| !s.deleted).count();
    report.totals.deleted = snaps.iter().filter(present).filter(|s| s.deleted).count();
    report.totals.hosts = snaps
        .iter()
        .filter_map(|s| s.root.as_ref().map(|r| r.facts.host.as_str()))
        .collect::<BTreeSet<_>>()
        .len();

    // Pages, each read once, with the snapshots that name it.
    let mut page_users: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (i, snap) in snaps.iter().enumerate() {
        for (_, page) in snap.root.iter().flat_map(|r| &r.pages) {
            page_users.entry(page.clone()).or_default().insert(i);
        }
    }
    let page_names: Vec<String> = page_users.keys().cloned().collect();
    let mut pages: HashMap<String, PageState> = HashMap::new();
    for (name, page) in page_names
        .iter()
        .zip(read_all(store, &page_names, read_page))
    {
        let state = match readable(store, page)? {
            Ok(Some(page)) => Ok(page),
            Ok(None) => Err("missing".to_string()),
            Err(reason) => Err(format!("damaged ({reason})")),
        };
        pages.insert(name.clone(), state);
    }

    // Packs: each must reach the end of the last chunk a page places in it.
    let mut needed: BTreeMap<String, u64> = BTreeMap::new();
    let mut chunks: BTreeSet<ChunkKey> = BTreeSet::new();
    for page in pages.values().flatten() {
        for (_, chunk) in &page.entries {
            let end = chunk.offset + u64::from(chunk.stored_len);
            let at = needed.entry(chunk.pack.clone()).or_default();
            *at = (*at).max(end);
            chunks.insert(key(chunk));
        }
    }
    report.totals.chunks = chunks.len() as u64;
    let packs = listing(store, "packs/")?;
    let page_listing = listing(store, "pages/")?;
    report.totals.pages = page_listing.len();
    report.totals.packs = packs.len();
    report.totals.pack_bytes = packs.values().map(|l| l.size).sum();
    // Size of each needed pack; `None`: missing.
    let mut pack_size: HashMap<String, Option<u64>> = HashMap::new();
    for pack in needed.keys() {
        let size = match packs.get(pack) {
            Some(listed) => Some(listed.size),
            // Not listed: look again (a listing may lag behind a write).
            None => store
                .bucket
                .head(pack)
                .map_err(|e| bucket_error(store, e))?
                .map(|l| l.size),
        };
        pack_size.insert(pack.clone(), size);
    }

    // Chunks read and verified: with `deep` every one whose pack holds it, else the
    // first of each pack (a sample that catches a pack written with another key, or
    // damaged from its start).
    let mut bad_chunks: HashMap<ChunkKey, String> = HashMap::new();
    {
        let mut all: BTreeMap<String, Vec<RemoteChunk>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for page in pages.values().flatten() {
            for (_, chunk) in &page.entries {
                let fits = pack_size
                    .get(&chunk.pack)
                    .copied()
                    .flatten()
                    .is_some_and(|size| chunk.offset + u64::from(chunk.stored_len) <= size);
                if fits && seen.insert(key(chunk)) {
                    all.entry(chunk.pack.clone())
                        .or_default()
                        .push(chunk.clone());
                }
            }
        }
        for chunk_list in all.values_mut() {
            chunk_list.sort_by_key(|c| (c.offset, c.stored_len));
            if !deep {
                chunk_list.truncate(1);
            }
        }
        let runs = spans(all.into_values());
        let jobs: Vec<Job<'_, RemoteResult<Vec<Option<String>>>>> = runs
            .iter()
            .map(|run| -> Job<'_, RemoteResult<Vec<Option<String>>>> {
                Box::new(move |_| Ok(verify_run(store, run)))
            })
            .collect();
        let results = store
            .bucket
            .parallel(store.settings.download_concurrency, jobs);
        for (run, result) in runs.iter().zip(results) {
            let verified = result
                .map_err(|e| bucket_error(store, e))?
                .map_err(CheckError::Store)?;
            for (chunk, fault) in run.iter().zip(verified) {
                match fault {
                    None => {
                        report.totals.chunks_verified += 1;
                        report.totals.stored_bytes += u64::from(chunk.stored_len);
                        report.totals.plain_bytes += u64::from(chunk.plain_len);
                    }
                    Some(reason) => {
                        bad_chunks.insert(key(chunk), reason);
                    }
                }
            }
        }
    }

    // What each fault makes unreadable.
    let fault_of = |chunk: &RemoteChunk| -> Option<Fault> {
        match pack_size.get(&chunk.pack).copied().flatten() {
            None => Some(Fault::Pack(chunk.pack.clone())),
            Some(size) if chunk.offset + u64::from(chunk.stored_len) > size => {
                Some(Fault::Pack(chunk.pack.clone()))
            }
            Some(_) if bad_chunks.contains_key(&key(chunk)) => {
                Some(Fault::Chunk(chunk.pack.clone(), chunk.offset))
            }
            Some(_) => None,
        }
    };
    let mut fault_users: BTreeMap<Fault, BTreeSet<usize>> = BTreeMap::new();
    let mut fault_chunk: HashMap<Fault, RemoteChunk> = HashMap::new();
    let mut bad_blocks_of_page: HashMap<&str, u64> = HashMap::new();
    for (name, users) in &page_users {
        let Some(Ok(page)) = pages.get(name) else {
            continue;
        };
        for (_, chunk) in &page.entries {
            if let Some(fault) = fault_of(chunk) {
                *bad_blocks_of_page.entry(name).or_default() += 1;
                fault_chunk
                    .entry(fault.clone())
                    .or_insert_with(|| chunk.clone());
                fault_users.entry(fault).or_default().extend(users);
            }
        }
    }

    // Snapshots found damaged: any still there at the end is reported.
    let mut damage: BTreeMap<usize, Damage> = BTreeMap::new();
    for (i, snap) in snaps.iter().enumerate() {
        let Some(root) = &snap.root else {
            if !snap.vanished {
                damage.insert(
                    i,
                    Damage {
                        root: true,
                        ..Damage::default()
                    },
                );
            }
            continue;
        };
        let mut d = Damage::default();
        for (_, page) in &root.pages {
            match pages.get(page) {
                Some(Ok(_)) => d.blocks += bad_blocks_of_page.get(page.as_str()).unwrap_or(&0),
                _ => d.pages += 1,
            }
        }
        if d != Damage::default() {
            damage.insert(i, d);
        }
    }
    for (&i, _) in damage.iter() {
        let snap = &mut snaps[i];
        if !snap.vanished
            && store
                .bucket
                .head(&snap.object)
                .map_err(|e| bucket_error(store, e))?
                .is_none()
        {
            snap.vanished = true;
        }
    }
    damage.retain(|&i, _| !snaps[i].vanished);
    // A problem is reported if a snapshot still there reads what it concerns.
    let affected = |users: &BTreeSet<usize>| -> Option<Vec<String>> {
        let names: Vec<String> = users
            .iter()
            .filter(|&&i| !snaps[i].vanished)
            .map(|&i| snaps[i].name.clone())
            .collect();
        (!names.is_empty()).then_some(names)
    };
    for (name, users) in &page_users {
        if let Some(Err(reason)) = pages.get(name)
            && let Some(readers) = affected(users)
        {
            if users.iter().any(|&i| !snaps[i].deleted) {
                gc_blocked.push(format!("page {name}"));
            }
            report.problems.push(
                Problem::new(
                    Severity::Corruption,
                    format!("page {name}"),
                    format!("{reason}: none of its blocks can be read"),
                )
                .affecting(readers),
            );
        }
    }
    for (fault, users) in &fault_users {
        let Some(readers) = affected(users) else {
            continue;
        };
        let (subject, detail) = match fault {
            Fault::Pack(pack) => match pack_size.get(pack).copied().flatten() {
                None => (format!("pack {pack}"), "missing".to_string()),
                Some(size) => (
                    format!("pack {pack}"),
                    format!(
                        "cut short: {size} bytes, but its chunks need {}",
                        needed[pack]
                    ),
                ),
            },
            Fault::Chunk(pack, offset) => {
                let chunk = &fault_chunk[fault];
                (
                    format!("chunk {} (pack {pack}, offset {offset})", chunk.hash),
                    format!("fails verification: {}", bad_chunks[&key(chunk)]),
                )
            }
        };
        report
            .problems
            .push(Problem::new(Severity::Corruption, subject, detail).affecting(readers));
    }
    for (i, d) in damage {
        report.damaged.insert(snaps[i].name.clone(), d);
    }
    for snap in snaps
        .iter()
        .filter(|s| s.root.is_none() && !s.vanished && !s.deleted)
    {
        gc_blocked.push(format!("root {}", snap.object));
    }

    // Metadata of live snapshots; metadata and tombstones whose root is gone.
    let live_metas: Vec<(String, String)> = snaps
        .iter()
        .filter(|s| !s.deleted && !s.vanished && s.root.is_some())
        .map(|s| (names.meta_of(&s.object), s.name.clone()))
        .collect();
    let meta_names: Vec<String> = live_metas
        .iter()
        .filter(|(meta, _)| metas.contains_key(meta))
        .map(|(meta, _)| meta.clone())
        .collect();
    let mut meta_state: HashMap<String, Result<(), String>> = HashMap::new();
    for (name, meta) in meta_names
        .iter()
        .zip(read_all(store, &meta_names, read_meta))
    {
        let state = match readable(store, meta)? {
            Ok(Some(())) => Ok(()),
            Ok(None) => Err("missing".to_string()),
            Err(reason) => Err(format!("damaged ({reason})")),
        };
        meta_state.insert(name.clone(), state);
    }
    for (meta, snapshot) in &live_metas {
        let state = meta_state
            .remove(meta)
            .unwrap_or_else(|| Err("missing".to_string()));
        if let Err(reason) = state {
            report.problems.push(
                Problem::new(
                    Severity::Corruption,
                    format!("metadata {meta}"),
                    format!(
                        "{reason}: other hosts show the snapshot as private to root; its \
                         host writes it anew when the snapshot's sharing changes"
                    ),
                )
                .affecting([snapshot.clone()]),
            );
        }
    }
    for tombstone in tombstones.keys() {
        if !roots.contains_key(&names.root_of_tombstone(tombstone)) {
            report.problems.push(Problem::new(
                Severity::Leak,
                format!("tombstone {tombstone}"),
                "its snapshot's root is gone: a collection removes it",
            ));
        }
    }
    // Metadata is written before its root: a young one may be an upload's in progress.
    let settled = before(ttl.max(grace));
    for (meta, listed) in &metas {
        let root = format!("snapshots/{}", meta.strip_prefix("meta/").unwrap_or(meta));
        if roots.contains_key(&root) || listed.modified > settled {
            continue;
        }
        if store
            .bucket
            .head(&root)
            .map_err(|e| bucket_error(store, e))?
            .is_none()
        {
            report.problems.push(Problem::new(
                Severity::Leak,
                format!("metadata {meta}"),
                "its snapshot's root is gone (an upload that never completed, or a snapshot \
                 collected before): no collection removes it",
            ));
        }
    }

    // What a collection would do.
    if !gc_blocked.is_empty() {
        report.notes.push(format!(
            "garbage collection deletes nothing while {} cannot be read: it cannot tell what \
             the snapshot store still needs",
            gc_blocked.join(", ")
        ));
    } else {
        let mut cutoff = before(grace);
        if let Some(since) = capturing_since {
            cutoff = cutoff.min(UNIX_EPOCH + Duration::from_secs(since));
        }
        collectable(
            &mut report,
            &snaps,
            &protected,
            &pages,
            (&page_listing, &packs),
            (before(grace), cutoff),
        );
    }
    Ok(report)
}

/// Names each snapshot as the mount does, `<volume>@<label>@<host>`; when two roots
/// would get the same name, each gets its root's name after it. Deleted ones get
/// ` (deleted)`; damaged roots are named by their object.
fn name_snapshots(snaps: &mut [Snap]) {
    let plain = |s: &Snap| {
        s.root.as_ref().map(|r| {
            let f = &r.facts;
            format!("{}@{}@{}", f.volume, f.label, f.host)
        })
    };
    let mut uses: HashMap<String, usize> = HashMap::new();
    for s in snaps.iter() {
        if let Some(name) = plain(s) {
            *uses.entry(name).or_default() += 1;
        }
    }
    for s in snaps.iter_mut() {
        let mut name = match plain(s) {
            Some(name) if uses[&name] > 1 => format!("{name} [{}]", s.object),
            Some(name) => name,
            None => format!("[{}]", s.object),
        };
        if s.deleted {
            name.push_str(" (deleted)");
        }
        s.name = name;
    }
}

fn root_problem(object: &str, reason: &str, deleted: bool) -> Problem {
    let consequence = if deleted {
        "the deleted snapshot cannot be read by hosts still using it"
    } else {
        "the snapshot cannot be read at all (other hosts do not show it), and every \
         collection fails while it is there"
    };
    Problem::new(
        Severity::Corruption,
        format!("snapshot root {object}"),
        format!("damaged ({reason}): {consequence}"),
    )
}

/// Counts, as notes, what a collection now would remove or keep for later.
fn collectable(
    report: &mut BucketReport,
    snaps: &[Snap],
    protected: &BTreeSet<String>,
    pages: &HashMap<String, PageState>,
    (page_listing, packs): (&BTreeMap<String, Listed>, &BTreeMap<String, Listed>),
    (graced, cutoff): (SystemTime, SystemTime),
) {
    let (mut doomed, mut in_grace, mut read) = (Vec::new(), 0, 0);
    let mut kept_pages = BTreeSet::new();
    for s in snaps.iter().filter(|s| !s.vanished) {
        let kept = if !s.deleted {
            true
        } else if protected.contains(&s.object) {
            read += 1;
            true
        } else if s.tombstone.is_some_and(|t| t >= graced) {
            in_grace += 1;
            true
        } else {
            doomed.push(s.name.clone());
            false
        };
        if kept && let Some(root) = &s.root {
            kept_pages.extend(root.pages.iter().map(|(_, p)| p.as_str()));
        }
    }
    let kept_packs: BTreeSet<&str> = kept_pages
        .iter()
        .filter_map(|p| pages.get(*p)?.as_ref().ok())
        .flat_map(|page| page.entries.iter().map(|(_, c)| c.pack.as_str()))
        .collect();
    if !doomed.is_empty() || in_grace + read > 0 {
        let mut parts = Vec::new();
        if !doomed.is_empty() {
            parts.push(format!("{} can go now", doomed.len()));
        }
        if in_grace > 0 {
            parts.push(format!(
                "{in_grace} within gc_grace_seconds of their deletion"
            ));
        }
        if read > 0 {
            parts.push(format!("{read} still read by a host (its lease names it)"));
        }
        let waiting = doomed.len() + in_grace + read;
        report.notes.push(format!(
            "{} {} for a collection: {}",
            counted(waiting as u64, "deleted snapshot"),
            if waiting == 1 { "waits" } else { "wait" },
            parts.join(", ")
        ));
    }
    let mut now = (0u64, 0u64, 0u64);
    let mut later = (0u64, 0u64);
    for (listed, is_page) in page_listing
        .values()
        .filter(|l| !kept_pages.contains(l.name.as_str()))
        .map(|l| (l, true))
        .chain(
            packs
                .values()
                .filter(|l| !kept_packs.contains(l.name.as_str()))
                .map(|l| (l, false)),
        )
    {
        if listed.modified < cutoff {
            if is_page {
                now.0 += 1;
            } else {
                now.1 += 1;
            }
            now.2 += listed.size;
        } else {
            later.0 += 1;
            later.1 += listed.size;
        }
    }
    if now.0 + now.1 + later.0 > 0 {
        report.notes.push(format!(
            "unreferenced (no kept snapshot reaches them): {} and {} ({}) a collection \
             removes now, {} ({}) once older than gc_grace_seconds or once a capture in \
             progress ends",
            counted(now.0, "page"),
            counted(now.1, "pack"),
            ByteSize(now.2),
            counted(later.0, "object"),
            ByteSize(later.1),
        ));
    }
}

/// A run of chunks of one pack, read with one ranged GET.
type Run = Vec<RemoteChunk>;

/// Cuts each pack's chunks (sorted by offset) into runs spanning at most
/// [`READ_SPAN_BYTES`] (a larger chunk alone).
fn spans(packs: impl Iterator<Item = Vec<RemoteChunk>>) -> Vec<Run> {
    let mut runs = Vec::new();
    for chunks in packs {
        let mut run: Run = Vec::new();
        for chunk in chunks {
            let end = chunk.offset + u64::from(chunk.stored_len);
            if let Some(first) = run.first()
                && end.saturating_sub(first.offset) > READ_SPAN_BYTES
            {
                runs.push(std::mem::take(&mut run));
            }
            run.push(chunk);
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    runs
}

/// Reads and verifies a run; returns why each chunk fails, if it does. A run that
/// fails is read again one chunk at a time, from the first that failed, to tell
/// which ones do.
fn verify_run(store: &RemoteStore, run: &[RemoteChunk]) -> RemoteResult<Vec<Option<String>>> {
    let mut faults = vec![None; run.len()];
    let mut done = vec![false; run.len()];
    match store.read_chunks(run, |i, _| done[i] = true) {
        Ok(()) => return Ok(faults),
        Err(RemoteError::BadChunk { .. }) => {}
        Err(e) => return Err(e),
    }
    for (i, chunk) in run.iter().enumerate().filter(|(i, _)| !done[*i]) {
        match store.read_chunks(std::slice::from_ref(chunk), |_, _| {}) {
            Ok(()) => {}
            Err(RemoteError::BadChunk { reason, .. }) => faults[i] = Some(reason),
            Err(e) => return Err(e),
        }
    }
    Ok(faults)
}

fn bucket_error(store: &RemoteStore, source: crate::remote::BucketError) -> CheckError {
    CheckError::Store(RemoteError::Bucket {
        store: store.bucket.shown.clone(),
        source,
    })
}

/// Splits a read's outcome: `Ok(Ok(_))` read, `Ok(Err(reason))` damaged, `Err` the
/// bucket failed (the check stops).
fn readable<T>(
    store: &RemoteStore,
    result: RemoteResult<T>,
) -> Result<Result<T, String>, CheckError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(RemoteError::Damaged { source, .. }) => Ok(Err(source.reason)),
        Err(RemoteError::BadChunk { reason, .. }) => Ok(Err(reason)),
        Err(RemoteError::Bucket { source, .. }) => Err(bucket_error(store, source)),
        Err(e) => Err(CheckError::Store(e)),
    }
}

/// The objects whose names start with `prefix`, by name.
fn listing(store: &RemoteStore, prefix: &str) -> Result<BTreeMap<String, Listed>, CheckError> {
    Ok(store
        .bucket
        .list(prefix)
        .map_err(|e| bucket_error(store, e))?
        .into_iter()
        .filter(|l| l.name.starts_with(prefix))
        .map(|l| (l.name.clone(), l))
        .collect())
}

/// A page, read from the bucket (not through the page cache), checked against its name.
fn read_page(store: &RemoteStore, name: &str) -> RemoteResult<Option<Page>> {
    let Some(bytes) = store.get_object(name)? else {
        return Ok(None);
    };
    if store.names().page(&bytes) != name {
        return Err(damaged(store, name, "its contents do not match its name"));
    }
    Page::decode(&bytes, name)
        .map(Some)
        .map_err(|e| damaged(store, name, &e.reason))
}

fn read_meta(store: &RemoteStore, name: &str) -> RemoteResult<Option<()>> {
    let Some(bytes) = store.get_object(name)? else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| toml::from_str::<SnapshotMeta>(text).ok())
        .map(|_| Some(()))
        .ok_or_else(|| damaged(store, name, "it is not a snapshot's metadata"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;
    use crate::remote::crypto::Crypto;
    use crate::remote::test_support;
    use crate::store::codec::{ChunkHash, Codec};

    const KEYS: [Option<[u8; 32]>; 2] = [None, Some([7; 32])];

    fn bucket(memory: &Arc<InMemory>) -> Bucket {
        Bucket::with_store(memory.clone(), "p", "memory://test/p".into()).unwrap()
    }

    /// Uploads snapshot `id` of volume `db` (label `s<id>`) as `store`'s host, in the
    /// order hosts write it: pack `id` with `blocks` chunks, the page naming them, the
    /// metadata, the root. Returns the root's name and the chunks.
    fn upload(store: &RemoteStore, id: u64, blocks: u8) -> (String, Vec<RemoteChunk>) {
        let chunks: Vec<_> = (0..blocks)
            .map(|n| {
                let plain = vec![n ^ id as u8; 3000 + usize::from(n)];
                (ChunkHash::of(&plain), Codec::Raw, plain.len() as u32, plain)
            })
            .collect();
        let placed = store.put_pack(id, &chunks).unwrap();
        let mut page = Page::default();
        for (block, chunk) in placed.iter().enumerate() {
            page.set(block as u16, Some(chunk.clone()));
        }
        let page = store.put_page(&page).unwrap();
        (test_support::commit(store, id, &[&page]), placed)
    }

    /// Flips a byte of object `name` at `at` (from its end when negative).
    fn flip(memory: &Arc<InMemory>, name: &str, at: isize) {
        let bucket = bucket(memory);
        let mut bytes = bucket.get(name).unwrap().unwrap();
        let at = if at < 0 {
            bytes.len() - at.unsigned_abs()
        } else {
            at as usize
        };
        bytes[at] ^= 0x20;
        bucket.put(name, bytes).unwrap();
    }

    fn subjects(report: &BucketReport) -> Vec<String> {
        report.problems.iter().map(|p| p.subject.clone()).collect()
    }

    #[test]
    fn a_clean_bucket_has_no_problems_and_exits_0() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = test_support::store(&memory, "a", key).unwrap();
            let b = test_support::store(&memory, "b", key).unwrap();
            upload(&a, 1, 3);
            upload(&a, 2, 2);
            upload(&b, 1, 4);
            for deep in [false, true] {
                let report = check_bucket(&a, deep).unwrap();
                assert!(report.problems.is_empty(), "{report}");
                assert!(report.damaged.is_empty(), "{report}");
                assert_eq!(report.exit_code(), EXIT_CLEAN);
                let t = &report.totals;
                assert_eq!((t.snapshots, t.deleted, t.hosts), (3, 0, 2), "{report}");
                assert_eq!((t.pages, t.packs, t.chunks), (3, 3, 9), "{report}");
                // The first chunk of each pack, or every chunk with `deep`.
                assert_eq!(t.chunks_verified, if deep { 9 } else { 3 }, "{report}");
                assert_eq!(report.encrypted, key.is_some());
                let text = report.to_string();
                assert!(text.contains("3 snapshots of 2 hosts"), "{text}");
                assert!(
                    text.ends_with("no problems found in the bucket\n"),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn a_missing_pack_is_corruption_naming_the_snapshots_that_read_it() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = test_support::store(&memory, "a", key).unwrap();
            upload(&a, 1, 3);
            let (_, chunks) = upload(&a, 2, 2);
            a.bucket.delete(&chunks[0].pack).unwrap();
            let report = check_bucket(&a, false).unwrap();
            assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
            assert_eq!(report.problems.len(), 1, "{report}");
            let problem = &report.problems[0];
            assert_eq!(problem.subject, format!("pack {}", chunks[0].pack));
            assert_eq!(problem.detail, "missing");
            assert_eq!(problem.affects, ["db@s2@a"]);
            assert_eq!(
                report.damaged.get("db@s2@a"),
                Some(&Damage {
                    root: false,
                    blocks: 2,
                    pages: 0
                }),
                "{report}"
            );
            assert!(!report.damaged.contains_key("db@s1@a"), "{report}");
            let text = report.to_string();
            assert!(
                text.contains(&format!(
                    "corruption: pack {}: missing; read by db@s2@a",
                    chunks[0].pack
                )),
                "{text}"
            );
            assert!(text.contains("damaged snapshot db@s2@a: 2 blocks cannot be read"));
            assert!(text.contains("(exit status 2)"), "{text}");
            // What a collection would remove is a note, not a problem.
            assert!(
                !text.contains("garbage collection deletes nothing"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_pack_cut_short_is_corruption() {
        let memory = Arc::new(InMemory::new());
        let a = test_support::store(&memory, "a", None).unwrap();
        let (_, chunks) = upload(&a, 1, 3);
        let pack = &chunks[0].pack;
        let mut bytes = a.bucket.get(pack).unwrap().unwrap();
        bytes.truncate(bytes.len() - 10);
        a.bucket.put(pack, bytes).unwrap();
        let report = check_bucket(&a, false).unwrap();
        assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
        assert_eq!(subjects(&report), [format!("pack {pack}")]);
        assert!(
            report.problems[0].detail.starts_with("cut short"),
            "{report}"
        );
        // Only the last chunk reaches past the end.
        assert_eq!(report.damaged["db@s1@a"].blocks, 1, "{report}");
    }

    #[test]
    fn a_damaged_chunk_is_found_by_its_sample_or_by_a_deep_check() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = test_support::store(&memory, "a", key).unwrap();
            let (_, chunks) = upload(&a, 1, 3);
            // The last chunk's last byte: only a deep check reads it.
            flip(&memory, &chunks[2].pack, -1);
            let shallow = check_bucket(&a, false).unwrap();
            assert_eq!(shallow.exit_code(), EXIT_CLEAN, "{shallow}");
            let deep = check_bucket(&a, true).unwrap();
            assert_eq!(deep.exit_code(), EXIT_CORRUPTION, "{deep}");
            assert_eq!(deep.problems.len(), 1, "{deep}");
            let problem = &deep.problems[0];
            assert_eq!(
                problem.subject,
                format!(
                    "chunk {} (pack {}, offset {})",
                    chunks[2].hash, chunks[2].pack, chunks[2].offset
                )
            );
            assert!(problem.detail.starts_with("fails verification"), "{deep}");
            if key.is_some() {
                assert!(problem.detail.contains("does not decrypt"), "{deep}");
            }
            assert_eq!(deep.damaged["db@s1@a"].blocks, 1, "{deep}");
            assert_eq!(deep.totals.chunks_verified, 2, "{deep}");

            // The first chunk is the sample of its pack: found without `deep`.
            flip(&memory, &chunks[0].pack, 0);
            let shallow = check_bucket(&a, false).unwrap();
            assert_eq!(shallow.exit_code(), EXIT_CORRUPTION, "{shallow}");
            assert!(
                subjects(&shallow)[0].starts_with(&format!("chunk {}", chunks[0].hash)),
                "{shallow}"
            );
        }
    }

    #[test]
    fn a_damaged_page_or_root_is_reported_with_what_it_makes_unreadable() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = test_support::store(&memory, "a", key).unwrap();
            let (root1, _) = upload(&a, 1, 3);
            let (root2, _) = upload(&a, 2, 2);
            let page = a.root(&root1).unwrap().unwrap().pages[0].1.clone();
            flip(&memory, &page, 5);
            flip(&memory, &root2, 0);
            let report = check_bucket(&a, false).unwrap();
            assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
            let subjects = subjects(&report);
            assert!(
                subjects.contains(&format!("snapshot root {root2}")),
                "{report}"
            );
            assert!(subjects.contains(&format!("page {page}")), "{report}");
            assert_eq!(subjects.len(), 2, "{report}");
            assert_eq!(report.damaged["db@s1@a"].pages, 1, "{report}");
            assert!(report.damaged[&format!("[{root2}]")].root, "{report}");
            let text = report.to_string();
            assert!(text.contains("damaged ("), "{text}");
            assert!(
                text.contains("garbage collection deletes nothing while"),
                "{text}"
            );
        }
    }

    #[test]
    fn missing_metadata_is_corruption_and_an_orphan_tombstone_a_leak() {
        let memory = Arc::new(InMemory::new());
        let a = test_support::store(&memory, "a", None).unwrap();
        let (root1, _) = upload(&a, 1, 1);
        upload(&a, 2, 1);
        let names = a.names();
        a.bucket.delete(&names.meta_of(&root1)).unwrap();
        let ghost = names.root("a", 9);
        a.put_object(&names.tombstone_of(&ghost), b"").unwrap();
        let report = check_bucket(&a, false).unwrap();
        assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
        let meta = report
            .problems
            .iter()
            .find(|p| p.subject == format!("metadata {}", names.meta_of(&root1)))
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(meta.severity, Severity::Corruption);
        assert_eq!(meta.affects, ["db@s1@a"]);
        let tombstone = report
            .problems
            .iter()
            .find(|p| p.subject == format!("tombstone {}", names.tombstone_of(&ghost)))
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(tombstone.severity, Severity::Leak);

        // A leak alone exits 3.
        a.put_object(
            &names.meta_of(&root1),
            b"[owner]\nuid = 0\ngid = 0\nmode = 384\n",
        )
        .unwrap();
        let report = check_bucket(&a, false).unwrap();
        assert_eq!(report.exit_code(), EXIT_LEAKS, "{report}");
    }

    #[test]
    fn a_wrong_or_missing_key_is_a_clear_error_not_damage() {
        let memory = Arc::new(InMemory::new());
        let a = test_support::store(&memory, "a", Some([7; 32])).unwrap();
        upload(&a, 1, 2);
        let settings = test_support::settings();
        let wrong = open(
            bucket(&memory),
            "check",
            Some(Crypto::new([8; 32])),
            settings.clone(),
        )
        .err()
        .expect("a wrong key opens the store");
        assert!(
            matches!(wrong, CheckError::Store(RemoteError::WrongKey(_))),
            "{wrong}"
        );
        assert!(
            wrong
                .to_string()
                .contains("the key does not open this store"),
            "{wrong}"
        );
        let none = open(bucket(&memory), "check", None, settings.clone())
            .err()
            .expect("an encrypted store opens without a key");
        assert!(none.to_string().contains("key_file"), "{none}");
        // The right key opens it, and the check writes nothing.
        let before = bucket(&memory).list("").unwrap().len();
        let Opened::Store(store) = open(
            bucket(&memory),
            "check",
            Some(Crypto::new([7; 32])),
            settings,
        )
        .unwrap() else {
            panic!("the store was not opened");
        };
        assert_eq!(check_bucket(&store, true).unwrap().exit_code(), EXIT_CLEAN);
        assert_eq!(bucket(&memory).list("").unwrap().len(), before);
    }

    #[test]
    fn an_empty_prefix_is_not_created_and_one_without_format_is_unusable() {
        let memory = Arc::new(InMemory::new());
        let settings = test_support::settings();
        let Opened::Empty(report) = open(bucket(&memory), "c", None, settings.clone()).unwrap()
        else {
            panic!("an empty prefix is not Empty");
        };
        assert_eq!(report.exit_code(), EXIT_CLEAN);
        let text = report.to_string();
        assert!(text.contains("no ebsfs store here"), "{text}");
        assert!(
            !text.contains("snapshots of"),
            "counts of nothing checked: {text}"
        );
        assert!(bucket(&memory).list("").unwrap().is_empty(), "created");
        bucket(&memory).put("packs/x", vec![1, 2, 3]).unwrap();
        let Opened::Unusable(report) = open(bucket(&memory), "c", None, settings).unwrap() else {
            panic!("a prefix without a format object is usable");
        };
        assert_eq!(report.exit_code(), EXIT_CORRUPTION, "{report}");
        assert!(
            report
                .to_string()
                .contains("missing, though the prefix holds 1 object")
        );
    }
}
