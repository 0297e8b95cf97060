//! Garbage collection in the bucket: removes what no snapshot, no host's lease and no
//! capture in progress can need any more. docs/FORMAT.md, section 6.1, has the
//! argument; the order of the steps below is part of it.
//!
//! 1. Renew this host's lease: the server's time of that write is T0.
//! 2. List the tombstones, then the roots. Live roots: those without a tombstone.
//! 3. List and read the leases. A fresh one (written after T0 − lease) protects its
//!    roots, deleted or not, and, while it says a capture is in progress, holds the
//!    cutoff back to when that capture began. Cutoff: T0 − grace, or earlier.
//! 4. Read every live or protected root, every deleted one still in its grace, and
//!    each of their pages: these and the packs they name are reachable. Anything
//!    unreadable ends the collection with nothing deleted.
//! 5. List pages and packs: the unreachable ones older than the cutoff go, and so do
//!    deleted snapshots that no fresh lease protects and whose tombstone is older than
//!    the grace (metadata, then root, then tombstone: never a root without its
//!    tombstone), and tombstones whose root is already gone. Roots go before pages,
//!    pages before packs; if a root that should go stays, no page or pack goes.
//! 6. Stop deleting once a quarter of the lease's life has passed since step 1, less
//!    the longest a request (with its retries) can take.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};

use super::client::{Job, request_bound};
use super::format::{FormatError, Lease, Page};
use super::{BucketError, Listed, RemoteError, RemoteResult, RemoteStore};
use crate::config::ByteSize;

/// A number of objects and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.objects, ByteSize(self.bytes))
    }
}

/// What a collection did (a dry run: what it would have deleted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Roots of deleted snapshots.
    pub roots_deleted: Tally,
    pub pages_deleted: Tally,
    pub packs_deleted: Tally,
    /// Tombstones, of the roots deleted now or of roots already gone.
    pub tombstones_deleted: u64,
    /// Metadata objects of the roots deleted now.
    pub metas_deleted: u64,
    /// Live roots, and deleted ones a fresh lease protects.
    pub roots_kept: Tally,
    /// Pages and packs a live or protected root, or a deleted one in its grace, reaches.
    pub pages_kept: Tally,
    pub packs_kept: Tally,
    /// Unreachable pages and packs younger than the cutoff, and unprotected deleted
    /// roots (or tombstones, once their root is gone) whose tombstone is younger than
    /// the grace: left for a later collection.
    pub too_young: Tally,
    /// Deletions the bucket refused (logged); the next collection tries again.
    pub failed: u64,
    /// The collection stopped deleting when a quarter of the lease's life (less the
    /// longest a request can take) had passed (never in a dry run).
    pub stopped_early: bool,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: roots {}, pages {}, packs {}, tombstones {}; kept: roots {}, pages {}, \
             packs {}; too young: {}",
            if self.dry_run {
                "would delete"
            } else {
                "deleted"
            },
            self.roots_deleted,
            self.pages_deleted,
            self.packs_deleted,
            self.tombstones_deleted,
            self.roots_kept,
            self.pages_kept,
            self.packs_kept,
            self.too_young,
        )?;
        if self.failed > 0 {
            write!(f, "; {} deletions failed", self.failed)?;
        }
        if self.stopped_early {
            write!(
                f,
                "; stopped early (a quarter of the lease's life had passed)"
            )?;
        }
        Ok(())
    }
}

/// Collects the bucket's garbage (see the module's documentation). With `dry_run`,
/// deletes nothing and reports what it would delete. Fails, having deleted nothing,
/// when a live or protected snapshot's root or page cannot be read.
pub fn collect(store: &RemoteStore, dry_run: bool) -> RemoteResult<GcReport> {
    let start = Instant::now();
    let clock = Clock {
        elapsed: &move || start.elapsed(),
        aged: &|_| Duration::ZERO,
    };
    collect_with(store, dry_run, &clock)
}

/// Time as a collection sees it.
struct Clock<'a> {
    /// Time since the collection began, by this host's clock.
    elapsed: &'a (dyn Fn() -> Duration + Sync),
    /// How much older an object is than its `LastModified` says (tests age objects).
    aged: &'a dyn Fn(&str) -> Duration,
}

fn collect_with(store: &RemoteStore, dry_run: bool, clock: &Clock) -> RemoteResult<GcReport> {
    let names = store.names();
    let ttl = store.lease_ttl();
    let grace = Duration::from_secs(store.settings.gc_grace_seconds);

    // 1. T0, the server's time now.
    let t0 = renew_lease(store)?;
    let before = |age: Duration| t0.checked_sub(age).unwrap_or(UNIX_EPOCH);

    // 2. Tombstones before roots: a tombstone is written after its root, so every
    // tombstone seen has its root seen too, unless that root is deleted.
    let tombstones = listing(store, "deleted/", clock)?;
    let roots = listing(store, "snapshots/", clock)?;
    let live: BTreeSet<&String> = roots
        .keys()
        .filter(|root| !tombstones.contains_key(&names.tombstone_of(root)))
        .collect();

    // 3. Leases, after the tombstones.
    let mut protected = BTreeSet::new();
    let mut capturing_since: Option<u64> = None;
    let mut fresh = Vec::new();
    for (name, listed) in listing(store, "hosts/", clock)? {
        if listed.modified <= before(ttl) {
            continue;
        }
        let lease = read_lease(store, &name)?.ok_or_else(|| {
            damaged(
                store,
                &name,
                "the lease vanished while the collection read it",
            )
        })?;
        protected.extend(lease.roots);
        if let Some(since) = lease.capturing_since {
            capturing_since = Some(capturing_since.map_or(since, |c| c.min(since)));
        }
        fresh.push(lease.host);
    }
    let mut cutoff = before(grace);
    if let Some(since) = capturing_since {
        cutoff = cutoff.min(UNIX_EPOCH + Duration::from_secs(since));
    }
    debug!(
        "snapshot store {}: collection: {} roots ({} live), {} tombstones, fresh leases of {:?}, \
         {} protected roots, cutoff {} s since the epoch",
        store.bucket.shown,
        roots.len(),
        live.len(),
        tombstones.len(),
        fresh,
        protected.len(),
        cutoff
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    );

    // Deleted snapshots no fresh lease protects go once their tombstone is older than
    // the grace; until then they keep what they reach, as protected ones do.
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let mut doomed_roots = Vec::new();
    let mut doomed_tombstones = Vec::new();
    let mut lingering = Vec::new();
    for root in &live {
        report.roots_kept.add(roots[*root].size);
    }
    for (tombstone, marked) in &tombstones {
        let root = names.root_of_tombstone(tombstone);
        let listed = roots.get(&root);
        if protected.contains(&root) {
            if let Some(listed) = listed {
                report.roots_kept.add(listed.size);
            }
        } else if marked.modified >= before(grace) {
            report.too_young.add(listed.map_or(marked.size, |r| r.size));
            if listed.is_some() {
                lingering.push(root);
            }
        } else if let Some(listed) = listed {
            doomed_roots.push((listed.clone(), tombstone.clone()));
        } else {
            doomed_tombstones.push((root, tombstone.clone()));
        }
    }

    // 4. What the live, protected and lingering roots reach. A protected root may be
    // one committed since step 2, so each is read rather than looked up in the listing.
    let wanted: Vec<String> = live
        .iter()
        .map(|r| r.to_string())
        .chain(protected.iter().cloned())
        .chain(lingering)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut reachable_pages = BTreeSet::new();
    for (name, root) in wanted
        .iter()
        .zip(read_all(store, &wanted, |s, n| s.root(n)))
    {
        match root? {
            Some(root) => reachable_pages.extend(root.pages.into_iter().map(|(_, p)| p)),
            None if live.contains(name) => {
                return Err(damaged(
                    store,
                    name,
                    "the root was listed but is gone (deleted by another collection?)",
                ));
            }
            // A deleted root already collected: it reaches nothing.
            None => debug!("protected or lingering root {name} does not exist"),
        }
    }
    let reachable_pages: Vec<String> = reachable_pages.into_iter().collect();
    let mut reachable_packs = BTreeSet::new();
    for packs in read_all(store, &reachable_pages, packs_of_page) {
        reachable_packs.extend(packs?);
    }
    let reachable_pages: BTreeSet<String> = reachable_pages.into_iter().collect();

    // 5. Unreachable pages and packs older than the cutoff.
    let mut doomed_pages = Vec::new();
    for page in listing(store, "pages/", clock)?.into_values() {
        if reachable_pages.contains(&page.name) {
            report.pages_kept.add(page.size);
        } else if page.modified < cutoff {
            doomed_pages.push(page);
        } else {
            report.too_young.add(page.size);
        }
    }
    let mut doomed_packs = Vec::new();
    for pack in listing(store, "packs/", clock)?.into_values() {
        if reachable_packs.contains(&pack.name) {
            report.packs_kept.add(pack.size);
        } else if pack.modified < cutoff {
            doomed_packs.push(pack);
        } else {
            report.too_young.add(pack.size);
        }
    }

    // 6. Deletions: roots before the pages they name, pages before the packs they name.
    // Every deletion must be over, retries and all, a quarter of the lease after step 1.
    let limit = (ttl / 4).saturating_sub(request_bound(Duration::from_secs(
        store.settings.request_timeout_seconds,
    )));
    if limit.is_zero() && !dry_run {
        warn!(
            "snapshot store {}: collection: a quarter of lease_seconds is not longer than a \
             request and its retries (request_timeout_seconds): nothing can be deleted",
            store.bucket.shown
        );
    }
    let deleter = Deleter {
        store,
        dry_run,
        elapsed: clock.elapsed,
        limit,
        stopped: AtomicBool::new(false),
    };
    let concurrency = store.settings.upload_concurrency;
    let jobs: Vec<Job<'_, RootOutcome>> = doomed_roots
        .iter()
        .map(|(root, tombstone)| -> Job<'_, RootOutcome> {
            let deleter = &deleter;
            Box::new(move |_| Ok(deleter.root(root, tombstone)))
        })
        .chain(
            doomed_tombstones
                .iter()
                .map(|(root, tombstone)| -> Job<'_, RootOutcome> {
                    let deleter = &deleter;
                    Box::new(move |_| Ok(deleter.orphan_tombstone(root, tombstone)))
                }),
        )
        .collect();
    let mut roots_stay = false;
    for outcome in store
        .bucket
        .parallel(concurrency, jobs)
        .into_iter()
        .flatten()
    {
        roots_stay |= outcome.root_stays;
        report.metas_deleted += u64::from(outcome.meta);
        report.tombstones_deleted += u64::from(outcome.tombstone);
        report.failed += u64::from(outcome.failed);
        if let Some(size) = outcome.root {
            report.roots_deleted.add(size);
        }
    }
    if roots_stay {
        // What they name may be theirs: no page or pack goes while they are there.
        if !deleter.stopped.load(Ordering::Relaxed) {
            warn!(
                "snapshot store {}: collection: roots of deleted snapshots could not be deleted; \
             pages and packs wait for the next collection",
                store.bucket.shown
            );
        }
        doomed_pages.clear();
        doomed_packs.clear();
    }
    for (objects, tally) in [
        (doomed_pages, &mut report.pages_deleted),
        (doomed_packs, &mut report.packs_deleted),
    ] {
        let jobs: Vec<Job<'_, Option<bool>>> = objects
            .iter()
            .map(|listed| -> Job<'_, Option<bool>> {
                let deleter = &deleter;
                Box::new(move |_| Ok(deleter.delete(&listed.name)))
            })
            .collect();
        let done = store.bucket.parallel(concurrency, jobs);
        for (listed, gone) in objects.iter().zip(done) {
            match gone {
                Ok(Some(true)) => tally.add(listed.size),
                Ok(Some(false)) => {}
                Ok(None) | Err(_) => report.failed += 1,
            }
        }
    }
    report.stopped_early = deleter.stopped.load(Ordering::Relaxed);
    info!(
        "snapshot store {}: garbage collection: {report}",
        store.bucket.shown
    );
    Ok(report)
}

fn bucket_error(store: &RemoteStore, source: BucketError) -> RemoteError {
    RemoteError::Bucket {
        store: store.bucket.shown.clone(),
        source,
    }
}

/// `what` in `store` is damaged, for `reason`.
pub(crate) fn damaged(store: &RemoteStore, what: &str, reason: &str) -> RemoteError {
    RemoteError::Damaged {
        store: store.bucket.shown.clone(),
        source: FormatError {
            what: what.to_string(),
            reason: reason.to_string(),
        },
    }
}

/// Rewrites this host's lease as it last wrote it (else as the bucket has it, else
/// empty); returns the server's time of the write.
fn renew_lease(store: &RemoteStore) -> RemoteResult<SystemTime> {
    let lease = match store.last_lease() {
        Some(lease) => lease,
        None => read_lease(store, &store.names().lease(&store.host))?.unwrap_or_else(|| Lease {
            host: store.host.clone(),
            ..Lease::default()
        }),
    };
    store.write_lease(lease)
}

/// A lease as the bucket has it; `None` if missing.
pub(crate) fn read_lease(store: &RemoteStore, name: &str) -> RemoteResult<Option<Lease>> {
    let Some(bytes) = store.get_object(name)? else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| toml::from_str(text).ok())
        .map(Some)
        .ok_or_else(|| damaged(store, name, "it is not a lease"))
}

/// The objects whose names start with `prefix`, by name.
fn listing(
    store: &RemoteStore,
    prefix: &str,
    clock: &Clock,
) -> RemoteResult<BTreeMap<String, Listed>> {
    Ok(store
        .bucket
        .list(prefix)
        .map_err(|e| bucket_error(store, e))?
        .into_iter()
        .filter(|l| l.name.starts_with(prefix))
        .map(|mut l| {
            let age = (clock.aged)(&l.name);
            l.modified = l.modified.checked_sub(age).unwrap_or(UNIX_EPOCH);
            (l.name.clone(), l)
        })
        .collect())
}

/// `read` of each name, several at once (`download_concurrency` of them).
pub(crate) fn read_all<T: Send + 'static>(
    store: &RemoteStore,
    names: &[String],
    read: fn(&RemoteStore, &str) -> RemoteResult<T>,
) -> Vec<RemoteResult<T>> {
    let jobs: Vec<Job<'_, RemoteResult<T>>> = names
        .iter()
        .map(|name| -> Job<'_, RemoteResult<T>> { Box::new(move |_| Ok(read(store, name))) })
        .collect();
    store
        .bucket
        .parallel(store.settings.download_concurrency, jobs)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| Err(bucket_error(store, e))))
        .collect()
}

/// The packs a page names. Read from the bucket, not through the page cache: a
/// collection reads every page once, and checks what the bucket holds.
fn packs_of_page(store: &RemoteStore, name: &str) -> RemoteResult<Vec<String>> {
    let bytes = store
        .get_object(name)?
        .ok_or_else(|| damaged(store, name, "the page is missing"))?;
    if store.names().page(&bytes) != name {
        return Err(damaged(store, name, "its contents do not match its name"));
    }
    let page = Page::decode(&bytes, name).map_err(|source| RemoteError::Damaged {
        store: store.bucket.shown.clone(),
        source,
    })?;
    let mut packs: Vec<String> = page.entries.into_iter().map(|(_, c)| c.pack).collect();
    packs.sort_unstable();
    packs.dedup();
    Ok(packs)
}

/// What became of a deleted snapshot.
#[derive(Default)]
struct RootOutcome {
    meta: bool,
    /// The root's size, if it was deleted.
    root: Option<u64>,
    tombstone: bool,
    failed: bool,
    /// The root is still there: out of time, or the bucket refused.
    root_stays: bool,
}

struct Deleter<'a> {
    store: &'a RemoteStore,
    dry_run: bool,
    elapsed: &'a (dyn Fn() -> Duration + Sync),
    limit: Duration,
    stopped: AtomicBool,
}

impl Deleter<'_> {
    /// Deletes an object unless the collection is out of time: `Some(true)` if it is
    /// gone (or would be, in a dry run), `Some(false)` if out of time, `None` if the
    /// bucket refused.
    fn delete(&self, name: &str) -> Option<bool> {
        if self.dry_run {
            debug!("collection would delete {name}");
            return Some(true);
        }
        if self.stopped.load(Ordering::Relaxed) || (self.elapsed)() >= self.limit {
            self.stopped.store(true, Ordering::Relaxed);
            return Some(false);
        }
        match self.store.bucket.delete(name) {
            Ok(()) => {
                debug!("collection deleted {name}");
                Some(true)
            }
            Err(e) => {
                warn!(
                    "snapshot store {}: collection: cannot delete {name}: {e}",
                    self.store.bucket.shown
                );
                None
            }
        }
    }

    /// A deleted snapshot: its metadata (found through its root, whose facts name it),
    /// then its root, then its tombstone; each only once the one before is gone.
    fn root(&self, root: &Listed, tombstone: &str) -> RootOutcome {
        let mut outcome = RootOutcome {
            root_stays: true,
            ..RootOutcome::default()
        };
        let names = self.store.names();
        match self.store.root(&root.name) {
            Ok(Some(_)) => match self.delete(&names.meta_of(&root.name)) {
                Some(true) => outcome.meta = true,
                Some(false) => return outcome,
                None => {
                    outcome.failed = true;
                    return outcome;
                }
            },
            // Gone since the listing: another collection took it.
            Ok(None) => return self.orphan_tombstone(&root.name, tombstone),
            Err(RemoteError::Damaged { .. } | RemoteError::WrongKey(_)) => warn!(
                "snapshot store {}: collection: deleted root {} is damaged; its metadata stays",
                self.store.bucket.shown, root.name
            ),
            Err(e) => {
                warn!(
                    "snapshot store {}: collection: cannot read deleted root {}: {e}",
                    self.store.bucket.shown, root.name
                );
                outcome.failed = true;
                return outcome;
            }
        }
        match self.delete(&root.name) {
            Some(true) => {
                outcome.root = Some(root.size);
                outcome.root_stays = false;
            }
            Some(false) => return outcome,
            None => {
                outcome.failed = true;
                return outcome;
            }
        }
        self.delete_tombstone(tombstone, outcome)
    }

    /// Deletes `tombstone`, its root being gone, and adds that to `outcome`.
    fn delete_tombstone(&self, tombstone: &str, mut outcome: RootOutcome) -> RootOutcome {
        match self.delete(tombstone) {
            Some(true) => outcome.tombstone = true,
            Some(false) => {}
            None => outcome.failed = true,
        }
        outcome
    }

    /// The tombstone of a root already gone (checked again first: a tombstone must
    /// never go while its root is there).
    fn orphan_tombstone(&self, root: &str, tombstone: &str) -> RootOutcome {
        let mut outcome = RootOutcome::default();
        match self.store.bucket.head(root) {
            Ok(None) => {}
            Ok(Some(_)) => {
                outcome.root_stays = true;
                return outcome;
            }
            Err(e) => {
                outcome.root_stays = true;
                warn!(
                    "snapshot store {}: collection: cannot look for {root}: {e}",
                    self.store.bucket.shown
                );
                outcome.failed = true;
                return outcome;
            }
        }
        self.delete_tombstone(tombstone, outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use object_store::memory::InMemory;

    use super::*;
    use crate::config::StoreSettings;
    use crate::remote::Bucket;
    use crate::remote::crypto::Crypto;
    use crate::remote::format::RemoteChunk;
    use crate::remote::test_support::{self, commit};
    use crate::store::codec::{ChunkHash, Codec};

    const KEYS: [Option<[u8; 32]>; 2] = [None, Some([7; 32])];
    const HOUR: Duration = Duration::from_secs(3600);

    /// A store of `host` over `memory` whose collections use `grace_seconds` and a
    /// one-hour lease (so that nothing in a test goes stale or runs out of time unless
    /// the test says so).
    fn store_with(
        memory: &Arc<InMemory>,
        host: &str,
        key: Option<[u8; 32]>,
        grace_seconds: u64,
    ) -> RemoteStore {
        let settings = StoreSettings {
            gc_grace_seconds: grace_seconds,
            lease_seconds: 3600,
            ..test_support::settings()
        };
        let bucket = Bucket::with_store(memory.clone(), "p", "memory://test/p".into()).unwrap();
        RemoteStore::open(bucket, host, key.map(Crypto::new), settings).unwrap()
    }

    fn store(memory: &Arc<InMemory>, host: &str, key: Option<[u8; 32]>) -> RemoteStore {
        store_with(memory, host, key, 0)
    }

    /// A collection that sees each object `aged(name)` older than the bucket says,
    /// with no time passing while it runs.
    fn collect_aged(store: &RemoteStore, aged: &dyn Fn(&str) -> Duration) -> GcReport {
        let clock = Clock {
            elapsed: &|| Duration::ZERO,
            aged,
        };
        collect_with(store, false, &clock).unwrap()
    }

    /// A collection `later` than now, with no time passing while it runs.
    fn collect_later(store: &RemoteStore, later: Duration) -> RemoteResult<GcReport> {
        let clock = Clock {
            elapsed: &|| Duration::ZERO,
            aged: &|_| later,
        };
        collect_with(store, false, &clock)
    }

    fn collect_now(store: &RemoteStore) -> GcReport {
        collect_later(store, Duration::ZERO).unwrap()
    }

    /// Uploads pack `n` of `store`'s host with one chunk of `seed` bytes.
    fn pack(store: &RemoteStore, n: u64, seed: u8) -> RemoteChunk {
        let payload = vec![seed; 1000 + usize::from(seed)];
        let chunk = (
            ChunkHash::of(&payload),
            Codec::Raw,
            payload.len() as u32,
            payload,
        );
        store.put_pack(n, &[chunk]).unwrap().remove(0)
    }

    /// Uploads a page naming `chunks` (blocks 0, 1, ...); returns its name.
    fn page(store: &RemoteStore, chunks: &[&RemoteChunk]) -> String {
        let mut page = Page::default();
        for (block, chunk) in chunks.iter().enumerate() {
            page.set(block as u16, Some((*chunk).clone()));
        }
        store.put_page(&page).unwrap()
    }

    fn delete_snapshot(store: &RemoteStore, root: &str) {
        store
            .put_object(&store.names().tombstone_of(root), b"")
            .unwrap();
    }

    fn meta_of(store: &RemoteStore, id: u64) -> String {
        store.names().meta_of(&store.names().root(&store.host, id))
    }

    fn exists(store: &RemoteStore, name: &str) -> bool {
        store.bucket.head(name).unwrap().is_some()
    }

    fn size(store: &RemoteStore, name: &str) -> u64 {
        store.bucket.head(name).unwrap().unwrap().size
    }

    fn now_secs() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn unreferenced_pages_and_packs_go_and_referenced_ones_stay() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = store(&memory, "a", key);
            let used = pack(&a, 1, 1);
            let used_page = page(&a, &[&used]);
            let root = commit(&a, 1, &[&used_page]);
            // A page no root names, and the pack only it names; a pack nothing names.
            let orphan = pack(&a, 2, 2);
            let orphan_page = page(&a, &[&orphan]);
            let stray = pack(&a, 3, 3);
            let sizes = (
                size(&a, &orphan_page),
                size(&a, &orphan.pack) + size(&a, &stray.pack),
            );

            let report = collect_now(&store(&memory, "c", key));

            for name in [&root, &used_page, &used.pack, &meta_of(&a, 1)] {
                assert!(exists(&a, name), "{name} was deleted");
            }
            for name in [&orphan_page, &orphan.pack, &stray.pack] {
                assert!(!exists(&a, name), "{name} was kept");
            }
            assert_eq!(
                report.pages_deleted,
                Tally {
                    objects: 1,
                    bytes: sizes.0
                }
            );
            assert_eq!(
                report.packs_deleted,
                Tally {
                    objects: 2,
                    bytes: sizes.1
                }
            );
            assert_eq!(report.roots_kept.objects, 1);
            assert_eq!(report.pages_kept.objects, 1);
            assert_eq!(report.packs_kept.objects, 1);
            assert_eq!(report.roots_deleted.objects, 0);
            assert!(!report.stopped_early && report.failed == 0);
        }
    }

    #[test]
    fn a_deleted_snapshot_takes_only_what_no_live_snapshot_shares() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = store(&memory, "a", key);
            let shared = pack(&a, 1, 1);
            let own1 = pack(&a, 2, 2);
            let own2 = pack(&a, 3, 3);
            let shared_page = page(&a, &[&shared]);
            // A page of the deleted snapshot naming a pack the live one reaches too.
            let mixed_page = page(&a, &[&own1, &shared]);
            let live_page = page(&a, &[&own2, &shared]);
            let gone = commit(&a, 1, &[&shared_page, &mixed_page]);
            let live = commit(&a, 2, &[&shared_page, &live_page]);
            delete_snapshot(&a, &gone);
            let gone_size = size(&a, &gone);

            let report = collect_now(&store(&memory, "c", key));

            for name in [
                &live,
                &meta_of(&a, 2),
                &shared_page,
                &live_page,
                &shared.pack,
                &own2.pack,
            ] {
                assert!(exists(&a, name), "{name} was deleted");
            }
            for name in [
                &gone,
                &a.names().tombstone_of(&gone),
                &meta_of(&a, 1),
                &mixed_page,
                &own1.pack,
            ] {
                assert!(!exists(&a, name), "{name} was kept");
            }
            assert_eq!(
                report.roots_deleted,
                Tally {
                    objects: 1,
                    bytes: gone_size
                }
            );
            assert_eq!((report.tombstones_deleted, report.metas_deleted), (1, 1));
            assert_eq!(report.pages_deleted.objects, 1);
            assert_eq!(report.packs_deleted.objects, 1);
            assert_eq!(report.roots_kept.objects, 1);

            // Nothing is left to collect.
            let again = collect_now(&store(&memory, "c", key));
            assert_eq!(again.roots_deleted.objects + again.tombstones_deleted, 0);
            assert_eq!(again.pages_deleted.objects + again.packs_deleted.objects, 0);
        }
    }

    #[test]
    fn a_fresh_lease_protects_a_deleted_snapshot_and_a_stale_one_does_not() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = store(&memory, "a", key);
            let chunk = pack(&a, 1, 1);
            let kept_page = page(&a, &[&chunk]);
            let root = commit(&a, 1, &[&kept_page]);
            // Host b still reads snapshot 1, which a deletes.
            let b = store(&memory, "b", key);
            b.write_lease(Lease {
                host: "b".into(),
                roots: vec![root.clone()],
                capturing_since: None,
            })
            .unwrap();
            delete_snapshot(&a, &root);
            let c = store(&memory, "c", key);

            let report = collect_now(&c);
            for name in [&root, &kept_page, &chunk.pack, &meta_of(&a, 1)] {
                assert!(exists(&a, name), "{name} was deleted");
            }
            assert!(exists(&a, &a.names().tombstone_of(&root)));
            assert_eq!(report.roots_kept.objects, 1);
            assert_eq!(report.pages_kept.objects, 1);
            assert_eq!(report.packs_kept.objects, 1);
            assert_eq!(
                report.pages_deleted.objects + report.packs_deleted.objects,
                0
            );

            // Two hours later b's lease is stale (b is gone): it protects nothing.
            let report = collect_later(&c, 2 * HOUR).unwrap();
            for name in [
                &root,
                &a.names().tombstone_of(&root),
                &kept_page,
                &chunk.pack,
                &meta_of(&a, 1),
            ] {
                assert!(!exists(&a, name), "{name} was kept");
            }
            assert_eq!(report.roots_deleted.objects, 1);
            assert_eq!(report.pages_deleted.objects, 1);
            assert_eq!(report.packs_deleted.objects, 1);
        }
    }

    #[test]
    fn a_capture_in_progress_keeps_what_it_wrote_since_it_began() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let b = store(&memory, "b", key);
            let capturing = |since: u64| Lease {
                host: "b".into(),
                roots: Vec::new(),
                capturing_since: Some(since),
            };
            // b's capture began a minute ago; its objects have no root yet.
            b.write_lease(capturing(now_secs() - 60)).unwrap();
            let chunk = pack(&b, 1, 1);
            let new_page = page(&b, &[&chunk]);
            let c = store(&memory, "c", key);

            let report = collect_now(&c);
            assert!(exists(&b, &chunk.pack) && exists(&b, &new_page));
            assert_eq!(report.too_young.objects, 2);
            assert_eq!(
                report.pages_deleted.objects + report.packs_deleted.objects,
                0
            );

            // A capture that began after they were written does not hold them.
            b.write_lease(capturing(now_secs() + 3600)).unwrap();
            let report = collect_now(&c);
            assert!(!exists(&b, &chunk.pack) && !exists(&b, &new_page));
            assert_eq!(report.too_young.objects, 0);
            assert_eq!(
                report.pages_deleted.objects + report.packs_deleted.objects,
                2
            );
        }
    }

    #[test]
    fn a_crashed_capture_leaves_garbage_that_goes_once_its_lease_is_stale() {
        let memory = Arc::new(InMemory::new());
        let b = store(&memory, "b", None);
        b.write_lease(Lease {
            host: "b".into(),
            roots: Vec::new(),
            capturing_since: Some(now_secs() - 60),
        })
        .unwrap();
        let chunk = pack(&b, 1, 1);
        let c = store(&memory, "c", None);
        assert_eq!(collect_now(&c).too_young.objects, 1);
        assert!(exists(&b, &chunk.pack));
        // b never renews its lease.
        let report = collect_later(&c, 2 * HOUR).unwrap();
        assert_eq!(report.packs_deleted.objects, 1);
        assert!(!exists(&b, &chunk.pack));
    }

    #[test]
    fn the_grace_keeps_young_garbage_and_young_deleted_snapshots() {
        let memory = Arc::new(InMemory::new());
        let a = store(&memory, "a", None);
        let chunk = pack(&a, 1, 1);
        let gone_page = page(&a, &[&chunk]);
        let root = commit(&a, 1, &[&gone_page]);
        delete_snapshot(&a, &root);
        let stray = pack(&a, 2, 2);
        let c = store_with(&memory, "c", None, 3600);

        let report = collect_now(&c);
        for name in [&root, &gone_page, &chunk.pack, &stray.pack] {
            assert!(exists(&a, name), "{name} was deleted");
        }
        // The deleted root, and the stray pack; the root keeps its page and pack.
        assert_eq!(report.too_young.objects, 2);
        assert_eq!(
            (report.pages_kept.objects, report.packs_kept.objects),
            (1, 1)
        );

        let report = collect_later(&c, 2 * HOUR).unwrap();
        for name in [&root, &gone_page, &chunk.pack, &stray.pack] {
            assert!(!exists(&a, name), "{name} was kept");
        }
        assert_eq!(report.too_young.objects, 0);
        assert_eq!(report.roots_deleted.objects, 1);
    }

    #[test]
    fn a_recently_deleted_snapshot_keeps_its_old_data_until_it_goes() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = store(&memory, "a", key);
            let chunk = pack(&a, 1, 1);
            let old_page = page(&a, &[&chunk]);
            let root = commit(&a, 1, &[&old_page]);
            let stray = pack(&a, 2, 2);
            delete_snapshot(&a, &root);
            let tombstone = a.names().tombstone_of(&root);
            let c = store_with(&memory, "c", key, 3600);
            // Everything was written three hours ago, but the tombstone just now.
            let report = collect_aged(&c, &|name| {
                if name == tombstone {
                    Duration::ZERO
                } else {
                    3 * HOUR
                }
            });
            for name in [&root, &tombstone, &old_page, &chunk.pack] {
                assert!(exists(&a, name), "{name} was deleted");
            }
            assert!(!exists(&a, &stray.pack));
            assert_eq!(report.packs_deleted.objects, 1);
            assert_eq!(report.too_young.objects, 1);

            // Once the tombstone is older than the grace, the snapshot goes whole.
            let report = collect_aged(&c, &|_| 2 * HOUR);
            for name in [&root, &tombstone, &old_page, &chunk.pack, &meta_of(&a, 1)] {
                assert!(!exists(&a, name), "{name} was kept");
            }
            assert_eq!(report.roots_deleted.objects, 1);
        }
    }

    #[test]
    fn a_damaged_root_or_page_of_a_live_snapshot_stops_the_collection() {
        for key in KEYS {
            for damage in ["flip a page byte", "remove the page", "flip a root byte"] {
                let memory = Arc::new(InMemory::new());
                let a = store(&memory, "a", key);
                let chunk = pack(&a, 1, 1);
                let live_page = page(&a, &[&chunk]);
                let root = commit(&a, 1, &[&live_page]);
                let stray = pack(&a, 2, 2);
                let gone_page = page(&a, &[&stray]);
                let gone = commit(&a, 2, &[&gone_page]);
                delete_snapshot(&a, &gone);
                let victim = if damage.contains("root") {
                    &root
                } else {
                    &live_page
                };
                if damage.starts_with("remove") {
                    a.bucket.delete(victim).unwrap();
                } else {
                    // The first byte: a root's or page's magic, or a sealed one's nonce.
                    let mut bytes = a.bucket.get(victim).unwrap().unwrap();
                    bytes[0] ^= 0x40;
                    a.bucket.put(victim, bytes).unwrap();
                }

                let error =
                    collect_later(&store(&memory, "c", key), Duration::ZERO).expect_err(damage);
                assert!(
                    matches!(error, RemoteError::Damaged { .. }),
                    "{damage}: {error}"
                );
                let reason = match (damage, key) {
                    ("flip a page byte", None) => "do not match its name",
                    ("remove the page", _) => "the page is missing",
                    ("flip a root byte", None) => "bad magic",
                    _ => "does not decrypt",
                };
                assert!(error.to_string().contains(reason), "{damage}: {error}");
                for name in [&gone, &gone_page, &stray.pack, &chunk.pack, &meta_of(&a, 2)] {
                    assert!(exists(&a, name), "{damage}: {name} was deleted");
                }
            }
        }
    }

    #[test]
    fn a_dry_run_deletes_nothing_and_reports_what_a_collection_deletes() {
        for key in KEYS {
            let memory = Arc::new(InMemory::new());
            let a = store(&memory, "a", key);
            let chunk = pack(&a, 1, 1);
            let gone_page = page(&a, &[&chunk]);
            let gone = commit(&a, 1, &[&gone_page]);
            delete_snapshot(&a, &gone);
            let stray = pack(&a, 2, 2);
            let everything = |s: &RemoteStore| {
                let mut names: Vec<String> = s
                    .bucket
                    .list("")
                    .unwrap()
                    .into_iter()
                    .map(|l| l.name)
                    .filter(|n| !n.starts_with("hosts/"))
                    .collect();
                names.sort();
                names
            };
            let c = store(&memory, "c", key);
            let before = everything(&c);

            let dry = collect(&c, true).unwrap();
            assert_eq!(everything(&c), before);
            assert!(dry.dry_run);
            let shown = dry.to_string();
            assert!(shown.starts_with("would delete: roots 1 ("), "{shown}");

            let real = collect(&c, false).unwrap();
            assert_eq!(
                GcReport {
                    dry_run: true,
                    ..real.clone()
                },
                dry
            );
            assert_eq!(real.roots_deleted.objects, 1);
            assert_eq!(real.packs_deleted.objects, 2);
            for name in [&gone, &gone_page, &chunk.pack, &stray.pack] {
                assert!(!exists(&a, name), "{name} was kept");
            }
        }
    }

    #[test]
    fn a_collection_stops_deleting_after_a_quarter_of_the_lease() {
        let memory = Arc::new(InMemory::new());
        let a = store(&memory, "a", None);
        let chunk = pack(&a, 1, 1);
        let gone_page = page(&a, &[&chunk]);
        let gone = commit(&a, 1, &[&gone_page]);
        delete_snapshot(&a, &gone);
        let tombstone = a.names().tombstone_of(&gone);
        let c = store(&memory, "c", None);
        // The clock passes a quarter of the lease after two deletions.
        let calls = AtomicUsize::new(0);
        let elapsed = || {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Duration::ZERO
            } else {
                c.lease_ttl() / 4 + Duration::from_secs(1)
            }
        };

        let clock = Clock {
            elapsed: &elapsed,
            aged: &|_| Duration::ZERO,
        };
        let report = collect_with(&c, false, &clock).unwrap();
        assert!(report.stopped_early);
        // Metadata and root went; the tombstone stays (never a root without it), and
        // so does what the root named.
        assert!(!exists(&a, &meta_of(&a, 1)) && !exists(&a, &gone));
        for name in [&tombstone, &gone_page, &chunk.pack] {
            assert!(exists(&a, name), "{name} was deleted");
        }
        assert_eq!((report.metas_deleted, report.roots_deleted.objects), (1, 1));
        assert_eq!(report.tombstones_deleted, 0);
        assert_eq!(
            report.pages_deleted.objects + report.packs_deleted.objects,
            0
        );

        // The next collection finishes: the tombstone of a root already gone, then the rest.
        let report = collect_now(&c);
        assert!(!report.stopped_early);
        assert_eq!(report.tombstones_deleted, 1);
        for name in [&tombstone, &gone_page, &chunk.pack] {
            assert!(!exists(&a, name), "{name} was kept");
        }
    }

    #[test]
    fn a_lease_shorter_than_four_requests_lets_nothing_be_deleted() {
        let memory = Arc::new(InMemory::new());
        let a = store(&memory, "a", None);
        let stray = pack(&a, 1, 1);
        // An 8 s lease: its quarter is shorter than a 5 s request with its retries.
        let c = test_support::store(&memory, "c", None).unwrap();
        let report = collect_now(&c);
        assert!(report.stopped_early);
        assert_eq!(report.packs_deleted.objects, 0);
        assert!(exists(&a, &stray.pack));
    }

    #[test]
    fn the_collectors_own_lease_is_renewed_with_what_it_protects() {
        let memory = Arc::new(InMemory::new());
        let a = store(&memory, "a", None);
        let chunk = pack(&a, 1, 1);
        let kept_page = page(&a, &[&chunk]);
        let root = commit(&a, 1, &[&kept_page]);
        let lease = Lease {
            host: "a".into(),
            roots: vec![root.clone()],
            capturing_since: None,
        };
        a.write_lease(lease.clone()).unwrap();
        delete_snapshot(&a, &root);

        // The host itself, and another process of it that never wrote the lease.
        for collector in [a, store(&memory, "a", None)] {
            let report = collect_now(&collector);
            assert_eq!(report.roots_kept.objects, 1);
            for name in [&root, &kept_page, &chunk.pack] {
                assert!(exists(&collector, name), "{name} was deleted");
            }
            let written = collector
                .get_object(&collector.names().lease("a"))
                .unwrap()
                .unwrap();
            let written: Lease = toml::from_str(std::str::from_utf8(&written).unwrap()).unwrap();
            assert_eq!(written, lease);
        }
    }
}
