//! Uploading captured snapshots to the bucket, and everything else this host tells
//! the bucket: its lease, tombstones of deleted snapshots, garbage collection.
//!
//! With a snapshot store, a capture ends with its entries committed in the data
//! directory as usual, but the snapshot stays `pending` (`captured`): the volume is
//! thawed and the next snapshot may start, and the capture is durable locally. One
//! background thread then uploads captured snapshots in id order:
//!
//! 1. the lease is written, listing the roots this upload reads (its base) and the
//!    server time the upload began (`capturing_since`): no collection removes an
//!    object younger than that, or reachable from a root in the lease;
//! 2. the chunks the snapshot references and the bucket lacks go up in pack objects:
//!    while this thread walks the pages and lists the chunks of the next packs,
//!    `upload_concurrency` workers read, build and PUT the packs listed before (at
//!    most that many packs in memory); as each PUT returns, the data directory
//!    records where its chunks went (`uploaded` table), so a resumed upload sends
//!    nothing twice, and a page is written only once all its chunks are recorded;
//! 3. the snapshot's block map goes up page by page: an incremental upload rewrites
//!    only the pages holding blocks changed since its base (the newest earlier
//!    snapshot of the volume already in the bucket) and reuses the base's other pages;
//! 4. its `meta` object (owner, mode, attributes), then its root — the commit point,
//!    written last, under `commit` so that no `rmdir` runs between the last check
//!    and the record — and only then is the snapshot `completed` locally.
//!
//! While a capture runs, the chunks of each batch it commits may already go up
//! (`send_ahead`): the bucket thread sends them in full packs on the same workers and
//! records them in `uploaded` under the snapshot, so its upload finds them placed as
//! a resumed upload does. Until a root names them, these packs (like those of an
//! upload that failed and waits for its retry) are protected by their age:
//! `capturing_since` is cleared only when `uploaded` records nothing.
//!
//! Crash or kill -9 at any point: before the root, the snapshot is still `pending`
//! and captured; the next start resumes the upload, reusing the packs recorded in
//! `uploaded` (a pack written but not recorded is sent again; the stray copy is
//! garbage a collection removes). After the root and before the local commit, the
//! resumed upload writes the same root again (same name, same contents up to the
//! completion time). Failures of the store (unreachable, throttled, refused) leave
//! the snapshot `pending` with the reason in `info` (`upload_error`); it is retried
//! with backoff (1 s doubling to 5 min) until it succeeds, and resumes after a
//! restart. A failure of local data (a chunk that does not verify) is final: the
//! snapshot becomes `error`.
//!
//! If this host's lease may have lapsed (a renewal came more than half its length
//! after the previous one, or the daemon was down), an upload cannot know that a
//! collection spared the objects it reuses: before the root it renews the lease,
//! waits a quarter of the lease's length (the longest a collection acts on what it
//! listed) and checks that every page and pack the root names exists; if one does
//! not, the upload starts over without reusing anything. docs/FORMAT.md, section 6,
//! has the whole argument.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::namespace::tables::{CHUNKS, MANIFEST, SNAPSHOT_BLOCKS, TOMBSTONES_DUE, UPLOADED};
use crate::namespace::{
    NamespaceError, Records, SnapshotId, SnapshotRecord, SnapshotStatus, Timestamp,
};
use crate::remote::catalog::Catalog;
use crate::remote::format::{Lease, PAGE_BLOCKS, Page, RemoteChunk, Root, RootFacts, SnapshotMeta};
use crate::remote::{RemoteError, RemoteStore, gc};
use crate::storage::Storage;
use crate::store::ChunkLocation;
use crate::store::codec::ChunkHash;
use crate::store::index;

use super::manifest::{self, BlockContent};
use super::settle::{SETTLE_BATCH, Settle};
use super::{Scheduling, SnapshotEngine, lock, lower_thread_priority};

/// How an upload attempt ended short of completing.
#[derive(Debug)]
pub enum UploadFailure {
    /// The store failed: retried later.
    Retry(String),
    /// Local data is wrong: the snapshot becomes `error`.
    Fatal(String),
    /// The daemon is stopping: resumed at the next start.
    Stopped,
}

impl From<RemoteError> for UploadFailure {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::WrongKey(_) | RemoteError::Setup { .. } => {
                UploadFailure::Retry(e.to_string())
            }
            _ => UploadFailure::Retry(e.to_string()),
        }
    }
}

impl From<NamespaceError> for UploadFailure {
    fn from(e: NamespaceError) -> Self {
        UploadFailure::Retry(format!("metadata database: {e}"))
    }
}

impl From<redb::Error> for UploadFailure {
    fn from(e: redb::Error) -> Self {
        UploadFailure::from(NamespaceError::from(e))
    }
}

macro_rules! redb_into {
    ($($t:ty),*) => {$(
        impl From<$t> for UploadFailure {
            fn from(e: $t) -> Self {
                UploadFailure::from(NamespaceError::from(e))
            }
        }
    )*};
}
redb_into!(
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::TransactionError
);

type UploadResult<T> = Result<T, UploadFailure>;

/// First wait before retrying a failed upload, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Most chunks waiting to be sent ahead of their upload (8 MiB of hashes, 16 GiB of
/// 64 KiB blocks); further ones wait for the upload.
const AHEAD_MAX: usize = 1 << 18;

/// How long the bucket thread waits for more chunks of a capture it follows before
/// checking for other work.
const AHEAD_POLL: Duration = Duration::from_millis(200);

/// How often a host collects garbage in the bucket, besides after deletions.
const GC_EVERY: Duration = Duration::from_secs(3600);

/// This host's side of the bucket.
pub struct Uploader {
    pub store: Arc<RemoteStore>,
    state: Mutex<WorkerState>,
    changed: Condvar,
    /// Held from an upload's last check of its record to its local commit, and by
    /// `rmdir` of a snapshot still uploading.
    pub(super) commit: Mutex<()>,
    /// Roots read outside the records (an upload's base, open images of other
    /// hosts' snapshots), with how many readers each: listed in the lease.
    extra_roots: Mutex<BTreeMap<String, usize>>,
    /// The lease has been renewed in time ever since the daemon started (and the
    /// first write came in time after the previous daemon's last one).
    lease_continuous: AtomicBool,
    /// When the lease was last written (this host's clock).
    last_renewal: Mutex<Option<Instant>>,
    /// Roots this host completed lately, kept in the lease for one lease length: a
    /// collection that listed the roots before one was written still finds it there
    /// (it reads the roots leases name), after `capturing_since` went.
    recent_roots: Mutex<Vec<(String, Instant)>>,
    /// Server time the upload at hand began, if any.
    capturing_since: Mutex<Option<u64>>,
    /// Why the last attempt at uploading a snapshot failed, and how many did.
    errors: Mutex<HashMap<SnapshotId, (String, u32)>>,
    /// Pages done and pages to do, of the upload at hand.
    progress: Mutex<HashMap<SnapshotId, (u64, u64)>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    last_gc: Mutex<Option<Instant>>,
    /// Bytes of chunks uploaded (for the log and the benchmarks).
    pub uploaded_bytes: AtomicU64,
    /// Other hosts' snapshots.
    pub catalog: Catalog,
    poller: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct WorkerState {
    /// Snapshots waiting for an upload attempt, with when it may start.
    queue: BTreeMap<SnapshotId, Instant>,
    /// Deletions to tell the bucket, or a collection to run.
    tombstones: bool,
    /// Uploaded snapshots whose sharing changed: their `meta` objects to rewrite.
    meta: BTreeSet<SnapshotId>,
    /// Chunks that batches of running captures committed, by snapshot, not sent
    /// yet: they go up ahead of the snapshot's upload (see `send_ahead`).
    ahead: BTreeMap<SnapshotId, Vec<ChunkHash>>,
    /// Chunks in `ahead`, at most [`AHEAD_MAX`].
    ahead_len: usize,
    /// Captures whose chunks are no longer sent ahead (sending failed): their
    /// upload sends everything.
    ahead_off: BTreeSet<SnapshotId>,
    stopped: bool,
}

impl WorkerState {
    /// The first queued upload whose attempt may start now.
    fn due_upload(&self) -> Option<SnapshotId> {
        let now = Instant::now();
        self.queue
            .iter()
            .find(|(_, at)| **at <= now)
            .map(|(id, _)| *id)
    }
}

/// A root listed in the lease while this guard lives.
struct RootGuard<'a> {
    uploader: &'a Uploader,
    roots: Vec<String>,
}

impl Drop for RootGuard<'_> {
    fn drop(&mut self) {
        let mut extra = lock(&self.uploader.extra_roots);
        for root in &self.roots {
            if let Some(n) = extra.get_mut(root) {
                *n -= 1;
                if *n == 0 {
                    extra.remove(root);
                }
            }
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Uploader {
    pub fn new(store: Arc<RemoteStore>) -> Uploader {
        Uploader {
            store,
            state: Mutex::new(WorkerState::default()),
            changed: Condvar::new(),
            commit: Mutex::new(()),
            extra_roots: Mutex::new(BTreeMap::new()),
            lease_continuous: AtomicBool::new(false),
            last_renewal: Mutex::new(None),
            capturing_since: Mutex::new(None),
            recent_roots: Mutex::new(Vec::new()),
            errors: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            thread: Mutex::new(None),
            last_gc: Mutex::new(None),
            uploaded_bytes: AtomicU64::new(0),
            catalog: Catalog::default(),
            poller: Mutex::new(None),
        }
    }

    /// Why the last upload attempt of `id` failed, if it did.
    pub fn upload_error(&self, id: SnapshotId) -> Option<String> {
        lock(&self.errors)
            .get(&id)
            .map(|(reason, _)| reason.clone())
    }

    /// Percent of `id`'s upload done, if it is uploading.
    pub fn upload_percent(&self, id: SnapshotId) -> Option<u64> {
        lock(&self.progress)
            .get(&id)
            .map(|&(done, total)| (done * 100).checked_div(total).unwrap_or(0))
    }

    /// Lists `roots` in the lease until the guard drops (the caller writes the lease).
    fn protect(&self, roots: impl IntoIterator<Item = String>) -> RootGuard<'_> {
        let roots: Vec<String> = roots.into_iter().collect();
        let mut extra = lock(&self.extra_roots);
        for root in &roots {
            *extra.entry(root.clone()).or_insert(0) += 1;
        }
        RootGuard {
            uploader: self,
            roots,
        }
    }

    /// Starts reading root `root` of another host (an open image, a volume made
    /// from it): listed in the lease, which is written before this returns; fails
    /// if the snapshot was deleted meanwhile (its tombstone exists), since a
    /// collection may then already be removing its objects.
    pub fn begin_reading(&self, view: &Records, root: &str) -> Result<(), RemoteError> {
        *lock(&self.extra_roots).entry(root.to_string()).or_insert(0) += 1;
        let checked = self.write_lease(view).and_then(|()| {
            let tombstone = self.store.names().tombstone_of(root);
            match self.store.bucket.head(&tombstone) {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(RemoteError::Setup {
                    store: self.store.bucket.shown.clone(),
                    reason: format!("snapshot {root} was deleted"),
                }),
                Err(source) => Err(RemoteError::Bucket {
                    store: self.store.bucket.shown.clone(),
                    source,
                }),
            }
        });
        if checked.is_err() {
            self.end_reading(root);
        }
        checked
    }

    /// Stops reading root `root` (it leaves the lease at the next renewal).
    pub fn end_reading(&self, root: &str) {
        let mut extra = lock(&self.extra_roots);
        if let Some(n) = extra.get_mut(root) {
            *n -= 1;
            if *n == 0 {
                extra.remove(root);
            }
        }
    }

    /// The roots this host still reads: deleted snapshots kept as bases, the
    /// snapshots its volumes were made from (until hydrated and uploaded once), and
    /// the extra roots.
    fn lease_roots(&self, view: &Records) -> Vec<String> {
        let mut roots: BTreeSet<String> = view
            .snapshots
            .values()
            .filter(|s| s.hidden)
            .filter_map(|s| s.remote_root.clone())
            .collect();
        for (volume, parent) in &view.remote_parents {
            let uploaded_since = view
                .lineage(*volume)
                .any(|s| s.status == SnapshotStatus::Completed && s.remote_root.is_some());
            let hydrated = view.volumes.get(volume).is_some_and(|v| v.hydrated);
            if !(hydrated && uploaded_since) {
                roots.insert(parent.root.clone());
            }
        }
        roots.extend(lock(&self.extra_roots).keys().cloned());
        let ttl = self.store.lease_ttl();
        let mut recent = lock(&self.recent_roots);
        recent.retain(|(_, at)| at.elapsed() < ttl);
        roots.extend(recent.iter().map(|(root, _)| root.clone()));
        roots.into_iter().collect()
    }

    /// Writes this host's lease now; tracks whether it stayed continuous.
    pub fn write_lease(&self, view: &Records) -> Result<(), RemoteError> {
        let lease = Lease {
            host: self.store.host.clone(),
            roots: self.lease_roots(view),
            capturing_since: *lock(&self.capturing_since),
        };
        let half = self.store.lease_ttl() / 2;
        let previous = *lock(&self.last_renewal);
        let started = Instant::now();
        self.store.write_lease(lease)?;
        // A write that took long may have landed late: judge by when it began.
        let in_time = previous.is_some_and(|p| started.duration_since(p) < half);
        if !in_time && previous.is_some() && self.lease_continuous.swap(false, Ordering::AcqRel) {
            {
                warn!(
                    "snapshot store {}: this host's lease was not renewed in time; uploads \
                     check what they reuse before completing",
                    self.store.bucket.shown
                );
            }
        }
        *lock(&self.last_renewal) = Some(started);
        Ok(())
    }

    /// First lease of this daemon: continuous with the previous daemon's if that one
    /// was written less than half a lease ago (server time), keeping its
    /// `capturing_since` then (an upload it had begun resumes now).
    pub fn first_lease(&self, view: &Records) -> Result<(), RemoteError> {
        let name = self.store.names().lease(&self.store.host);
        let old = self
            .store
            .bucket
            .head(&name)
            .map_err(|source| RemoteError::Bucket {
                store: self.store.bucket.shown.clone(),
                source,
            })?;
        let old_lease: Option<Lease> = match &old {
            Some(_) => self
                .store
                .get_object(&name)?
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| toml::from_str(&t).ok()),
            None => None,
        };
        if let Some(since) = old_lease.as_ref().and_then(|l| l.capturing_since) {
            *lock(&self.capturing_since) = Some(since);
        }
        self.write_lease(view)?;
        let now = self
            .store
            .bucket
            .head(&name)
            .ok()
            .flatten()
            .map(|l| l.modified);
        let continuous = match (old, now) {
            (Some(old), Some(now)) => now
                .duration_since(old.modified)
                .is_ok_and(|gap| gap < self.store.lease_ttl() / 2),
            // No earlier lease: nothing was ever protected by it.
            (None, _) => true,
            _ => false,
        };
        if !continuous {
            *lock(&self.capturing_since) = None;
            self.write_lease(view)?;
            warn!(
                "snapshot store {}: this host's lease had lapsed; uploads check what they \
                 reuse before completing",
                self.store.bucket.shown
            );
        }
        self.lease_continuous.store(continuous, Ordering::Release);
        Ok(())
    }

    /// Before an upload writes anything: `capturing_since` in the lease, unless an
    /// unfinished upload already set it earlier. The lease is written twice: first to
    /// learn the server's time now (nothing the upload writes is older), then with
    /// that time.
    fn begin_uploading(&self, view: &Records) -> Result<(), RemoteError> {
        self.write_lease(view)?;
        let now = self
            .store
            .bucket
            .head(&self.store.names().lease(&self.store.host))
            .map_err(|source| RemoteError::Bucket {
                store: self.store.bucket.shown.clone(),
                source,
            })?
            .map(|l| secs(l.modified))
            .unwrap_or_else(|| secs(SystemTime::now()));
        {
            let mut since = lock(&self.capturing_since);
            if since.is_none() {
                // One second early: the server's times may be whole seconds.
                *since = Some(now.saturating_sub(1));
            }
        }
        self.write_lease(view)
    }

    fn pack_bytes(&self) -> u64 {
        self.store.pack_bytes.load(Ordering::Relaxed) as u64
    }

    /// An upload waits for the bucket thread (not one retried later).
    fn upload_due(&self) -> bool {
        lock(&self.state).due_upload().is_some()
    }

    /// Forgets the chunks waiting to be sent ahead for snapshot `id`.
    fn drop_ahead(&self, id: SnapshotId, off: bool) {
        let mut state = lock(&self.state);
        if let Some(hashes) = state.ahead.remove(&id) {
            state.ahead_len -= hashes.len();
        }
        if off {
            state.ahead_off.insert(id);
        } else {
            state.ahead_off.remove(&id);
        }
    }

    fn renewal_due(&self) -> bool {
        lock(&self.last_renewal).is_none_or(|at| at.elapsed() >= self.store.lease_renew())
    }

    fn stopped(&self) -> bool {
        lock(&self.state).stopped
    }

    fn wake(&self) {
        self.changed.notify_all();
    }
}

/// The packs of an upload on their way: a producer (the upload thread, walking the
/// pages) hands lists of chunks, one pack each, to `upload_concurrency` workers that
/// read the payloads from the local packs, build the pack object and PUT it. At most
/// [`PACKS_QUEUED`] lists wait for a worker; only a worker holds a pack's bytes, so
/// memory stays within `upload_concurrency` packs. Results come back in the order the
/// PUTs end; the producer records each in `uploaded` before any page names its chunks.
struct Packs<'a> {
    jobs: std::sync::mpsc::Sender<Vec<(ChunkHash, ChunkLocation)>>,
    results: std::sync::mpsc::Receiver<UploadResult<Vec<RemoteChunk>>>,
    /// Set on the first failure or a stop: workers skip the lists still queued.
    abort: &'a AtomicBool,
    /// Lists sent to the workers whose result has not come back.
    in_flight: usize,
    /// Most lists on their way or queued at once.
    limit: usize,
    /// The pack being filled, and its stored bytes.
    current: Vec<(ChunkHash, ChunkLocation)>,
    bytes: u64,
    /// Chunks in `current` or on their way (not placed yet).
    queued: HashSet<ChunkHash>,
}

/// Pack lists waiting for a worker besides those being built and sent.
const PACKS_QUEUED: usize = 2;

impl Packs<'_> {
    /// Adds a chunk to the pack being filled; returns the pack once it holds
    /// `pack_bytes`.
    fn add(
        &mut self,
        hash: ChunkHash,
        loc: ChunkLocation,
        pack_bytes: u64,
    ) -> Option<Vec<(ChunkHash, ChunkLocation)>> {
        self.bytes += u64::from(loc.stored_len);
        self.current.push((hash, loc));
        if self.bytes < pack_bytes {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut self.current))
    }

    /// Hands a pack's list to the workers (the caller made room: see `collect_packs`).
    fn send(&mut self, pack: Vec<(ChunkHash, ChunkLocation)>) -> UploadResult<()> {
        self.jobs
            .send(pack)
            .map_err(|_| UploadFailure::Retry("the upload workers are gone".into()))?;
        self.in_flight += 1;
        Ok(())
    }
}

/// Starts `concurrency` workers in `scope` that take jobs from `queue` until its
/// sending end is dropped, and send `work(job)` back on `results` (a worker stops
/// early once nobody takes results). A worker holds the queue's lock only while it
/// takes a job: `while let Ok(job) = lock(queue).recv()` would keep the guard through
/// the loop body and run one job at a time.
fn spawn_workers<'scope, 'env, J: Send, R: Send + 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    concurrency: usize,
    queue: &'env Mutex<Receiver<J>>,
    results: &Sender<R>,
    work: &'env (dyn Fn(J) -> R + Sync),
) {
    for _ in 0..concurrency {
        let results = results.clone();
        scope.spawn(move || {
            loop {
                let next = lock(queue).recv();
                let Ok(job) = next else {
                    return;
                };
                if results.send(work(job)).is_err() {
                    return;
                }
            }
        });
    }
}

/// A page waiting for chunks still on their way.
struct WaitingPage {
    page: Page,
    /// (block in page, chunk hash) still without a place in the bucket.
    missing: Vec<(u16, ChunkHash)>,
}

impl<S: Storage> SnapshotEngine<S> {
    /// The bucket side of this engine, if a store is configured.
    pub fn uploader(&self) -> Option<&Arc<Uploader>> {
        self.remote.as_ref()
    }

    /// Queues snapshot `id`'s upload (also the ones a restart found captured).
    pub(super) fn queue_upload(&self, id: SnapshotId) {
        if let Some(up) = &self.remote {
            lock(&up.state).queue.insert(id, Instant::now());
            up.wake();
        }
    }

    /// Queues every captured snapshot still pending, and tombstones still due
    /// (at start-up), then writes the first lease.
    pub fn resume_uploads(&self) -> Result<(), RemoteError> {
        let Some(up) = &self.remote else {
            return Ok(());
        };
        self.sweep_uploaded().map_err(remote_ns)?;
        let view = self.ns.view();
        up.first_lease(&view)?;
        for s in view
            .snapshots
            .values()
            .filter(|s| s.captured && s.status == SnapshotStatus::Pending)
        {
            info!("snapshot {}: resuming its upload", s.name());
            self.queue_upload(s.id);
        }
        lock(&up.state).tombstones = true;
        up.wake();
        Ok(())
    }

    /// Starts the thread that talks to the bucket (threads scheduling).
    pub fn start_remote_worker(self: &Arc<Self>) {
        let Some(up) = &self.remote else {
            return;
        };
        if self.scheduling == Scheduling::Manual {
            return;
        }
        let engine: Weak<SnapshotEngine<S>> = Arc::downgrade(self);
        let up = up.clone();
        let handle = std::thread::Builder::new()
            .name("bucket".into())
            .spawn(move || {
                lower_thread_priority();
                remote_worker(engine, up)
            });
        match handle {
            Ok(handle) => *lock(&self.remote.as_ref().expect("checked").thread) = Some(handle),
            Err(e) => error!("cannot start the bucket thread: {e}"),
        }
    }

    /// Lists the bucket for other hosts' snapshots now.
    pub fn refresh_catalog(&self) -> Result<usize, RemoteError> {
        let Some(up) = &self.remote else {
            return Ok(0);
        };
        let local: HashSet<String> = self
            .ns
            .view()
            .snapshots
            .values()
            .filter_map(|s| s.remote_root.clone())
            .collect();
        up.catalog.refresh(&up.store, &local)
    }

    /// Starts the thread that lists other hosts' snapshots every `poll_seconds`.
    pub fn start_catalog_poller(self: &Arc<Self>) {
        let Some(up) = &self.remote else {
            return;
        };
        if self.scheduling == Scheduling::Manual {
            return;
        }
        let engine: Weak<SnapshotEngine<S>> = Arc::downgrade(self);
        let up2 = up.clone();
        let every = Duration::from_secs(up.store.settings.poll_seconds);
        let handle = std::thread::Builder::new()
            .name("bucket-list".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    {
                        let Some(engine) = engine.upgrade() else {
                            return;
                        };
                        match engine.refresh_catalog() {
                            Ok(_) if failing => {
                                info!("snapshot store: listing works again");
                                failing = false;
                            }
                            Ok(_) => {}
                            Err(e) if !failing => {
                                warn!("snapshot store: cannot list other hosts' snapshots: {e}");
                                failing = true;
                            }
                            Err(_) => {}
                        }
                    }
                    // Other work wakes the same condition: wait out the period.
                    let until = Instant::now() + every;
                    let mut state = lock(&up2.state);
                    loop {
                        if state.stopped {
                            return;
                        }
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        state = up2
                            .changed
                            .wait_timeout(state, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            });
        match handle {
            Ok(handle) => *lock(&up.poller) = Some(handle),
            Err(e) => error!("cannot start the bucket listing thread: {e}"),
        }
    }

    /// Stops the bucket thread: an upload at hand stops at its next step and resumes
    /// at the next start.
    pub fn stop_remote_worker(&self) {
        let Some(up) = &self.remote else {
            return;
        };
        lock(&up.state).stopped = true;
        up.wake();
        let handles = [lock(&up.thread).take(), lock(&up.poller).take()];
        for handle in handles.into_iter().flatten() {
            if handle.join().is_err() {
                error!("a bucket thread panicked");
            }
        }
    }

    /// One round of bucket work on the calling thread (manual scheduling, tests):
    /// every due tombstone, then every queued upload once. Returns the uploads that
    /// completed.
    pub fn run_remote_work(&self) -> usize {
        let Some(up) = self.remote.clone() else {
            return 0;
        };
        if let Err(e) = up.write_lease(&self.ns.view()) {
            warn!("renewing the lease: {e}");
        }
        if let Err(e) = self.send_tombstones(&up) {
            warn!("sending tombstones: {e}");
        }
        self.send_meta(&up);
        let queued: Vec<SnapshotId> = lock(&up.state).queue.keys().copied().collect();
        let mut done = 0;
        for id in queued {
            if self.attempt_upload(&up, id) {
                done += 1;
            }
        }
        done
    }

    /// Runs a collection of the bucket's garbage now.
    pub fn collect_bucket_garbage(&self) -> Result<gc::GcReport, RemoteError> {
        let Some(up) = &self.remote else {
            return Err(RemoteError::Setup {
                store: String::new(),
                reason: "no snapshot store is configured".into(),
            });
        };
        up.write_lease(&self.ns.view())?;
        let report = gc::collect(&up.store, false);
        *lock(&up.last_gc) = Some(Instant::now());
        report
    }

    /// Tells the bucket about deleted snapshots: the lease first (so that a root this
    /// host still reads is protected before its tombstone can be seen), then each
    /// tombstone, then forgets it locally. Runs a collection if any went.
    fn send_tombstones(&self, up: &Uploader) -> Result<usize, RemoteError> {
        let due: Vec<String> = {
            let txn = self.ns.read().map_err(remote_ns)?;
            let table = txn
                .open_table(TOMBSTONES_DUE)
                .map_err(|e| remote_ns(e.into()))?;
            let mut due = Vec::new();
            for row in table.range::<&str>(..).map_err(|e| remote_ns(e.into()))? {
                due.push(row.map_err(|e| remote_ns(e.into()))?.0.value().to_string());
            }
            due
        };
        if due.is_empty() {
            return Ok(0);
        }
        up.write_lease(&self.ns.view())?;
        for root in &due {
            let tombstone = up.store.names().tombstone_of(root);
            up.store.put_object(&tombstone, b"")?;
            self.ns
                .change_data(|d| -> Result<(), NamespaceError> {
                    d.txn().open_table(TOMBSTONES_DUE)?.remove(root.as_str())?;
                    Ok(())
                })
                .map_err(remote_ns)?;
            info!("snapshot store: tombstone written for {root}");
        }
        Ok(due.len())
    }

    /// One attempt at uploading `id`; true if it completed (or needs nothing more).
    fn attempt_upload(&self, up: &Uploader, id: SnapshotId) -> bool {
        match self.upload(up, id) {
            Ok(()) => {
                lock(&up.state).queue.remove(&id);
                lock(&up.errors).remove(&id);
                true
            }
            Err(UploadFailure::Stopped) => false,
            Err(UploadFailure::Retry(reason)) => {
                let tries = {
                    let mut errors = lock(&up.errors);
                    let entry = errors.entry(id).or_insert_with(|| (String::new(), 0));
                    let first_of_its_kind = entry.0 != reason;
                    entry.0 = reason.clone();
                    entry.1 += 1;
                    if first_of_its_kind {
                        warn!("snapshot {id}: upload failed, will retry: {reason}");
                    }
                    entry.1
                };
                let wait = RETRY_FIRST
                    .saturating_mul(1 << tries.saturating_sub(1).min(16))
                    .min(RETRY_MAX);
                lock(&up.state).queue.insert(id, Instant::now() + wait);
                false
            }
            Err(UploadFailure::Fatal(reason)) => {
                lock(&up.state).queue.remove(&id);
                error!("snapshot {id}: upload failed for good: {reason}");
                if let Err(e) = self.fail_upload(id, &reason) {
                    error!("snapshot {id}: cannot record the failure: {e}");
                }
                false
            }
        }
    }

    /// A snapshot whose upload cannot succeed: `error`. Its entries stay (a later
    /// snapshot of the volume may be incremental against them) until it is deleted.
    fn fail_upload(&self, id: SnapshotId, reason: &str) -> super::SnapshotResult<()> {
        let Some(record) = self.ns.view().snapshots.get(&id).cloned() else {
            return Ok(());
        };
        self.finish_failed(
            record.lineage,
            id,
            &format!("upload failed: {reason}"),
            false,
        )
    }

    fn clear_uploaded(&self, id: SnapshotId) -> Result<(), NamespaceError> {
        self.ns
            .change_data(|d| crate::namespace::clear_uploaded(d.txn(), id))
    }

    /// Uploads snapshot `id` (see the module documentation).
    fn upload(&self, up: &Uploader, id: SnapshotId) -> UploadResult<()> {
        let view = self.ns.view();
        let Some(record) = view
            .snapshots
            .get(&id)
            .filter(|s| s.captured && s.status == SnapshotStatus::Pending)
            .cloned()
        else {
            self.clear_uploaded(id)?;
            return Ok(());
        };
        let started = Instant::now();
        let root_name = up.store.root_name(id.0);
        let writes_before = up.store.bucket.writes.load(Ordering::Relaxed);
        let bytes_before = up.uploaded_bytes.load(Ordering::Relaxed);
        let bs = u64::from(record.block_size);
        let blocks = record.size_bytes.div_ceil(bs);
        let page_count = blocks.div_ceil(PAGE_BLOCKS);
        // The newest earlier snapshot of the volume in the bucket.
        let base = view
            .lineage(record.lineage)
            .filter(|s| s.id < id && s.status == SnapshotStatus::Completed)
            .filter_map(|s| Some((s.id, s.remote_root.clone()?)))
            .last();
        // Chunks of the snapshot the volume was made from need no upload.
        let source_root = view
            .remote_parents
            .get(&record.lineage)
            .map(|p| p.root.clone());
        let _guard = up.protect(base.iter().map(|b| b.1.clone()).chain(source_root.clone()));
        up.begin_uploading(&view)?;
        let continuous_from_start = up.lease_continuous.load(Ordering::Acquire);
        let base_root = match &base {
            Some((_, name)) => match up.store.root(name) {
                Ok(Some(root)) => Some(root),
                Ok(None) | Err(_) => {
                    warn!(
                        "snapshot {}: its base {name} cannot be read; uploading it whole",
                        record.name()
                    );
                    None
                }
            },
            None => None,
        };
        let source = match (&source_root, &base_root) {
            (Some(name), None) => up.store.root(name).ok().flatten(),
            _ => None,
        };
        // Blocks to write into pages: those changed since the base, or all.
        let changed: Vec<u64> = match (&base, &base_root) {
            (Some((base_id, _)), Some(_)) => {
                let txn = self.ns.read()?;
                let table = txn.open_table(SNAPSHOT_BLOCKS)?;
                let mut set = BTreeSet::new();
                for s in view
                    .lineage(record.lineage)
                    .filter(|s| s.id > *base_id && s.id <= id)
                {
                    for row in table.range((s.id.0, 0)..=(s.id.0, u64::MAX))? {
                        let block = row?.0.value().1;
                        if block < blocks {
                            set.insert(block);
                        }
                    }
                }
                set.into_iter().collect()
            }
            _ => {
                let txn = self.ns.read()?;
                let table = txn.open_table(MANIFEST)?;
                manifest::nonzero_blocks(&table, &view.chain(record.lineage, id), 0..blocks)?
            }
        };
        let chain = view.chain(record.lineage, id);
        // Where chunks already went: this upload's earlier attempts, and packs sent
        // while the snapshot was being captured.
        let mut placed = self.placed_chunks(id)?;
        let resumed = placed.len();
        // Pages: the base's, then the rebuilt ones.
        let mut pages: BTreeMap<u64, String> = base_root
            .as_ref()
            .map(|root| {
                root.pages
                    .iter()
                    .filter(|(index, _)| *index < page_count)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut touched: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for block in changed {
            touched.entry(block / PAGE_BLOCKS).or_default().push(block);
        }
        // A base page cut by a shrink is rewritten without the blocks past the end.
        if blocks % PAGE_BLOCKS != 0 && pages.contains_key(&(page_count - 1)) {
            touched.entry(page_count - 1).or_default();
        }
        let total = touched.len() as u64;
        lock(&up.progress).insert(id, (0, total));
        let mut waiting: BTreeMap<u64, WaitingPage> = BTreeMap::new();
        let mut done_pages = 0;
        self.with_pack_workers(up, id, &mut placed, |packs, placed| {
            for (index, page_blocks) in touched {
                if up.stopped() {
                    return Err(UploadFailure::Stopped);
                }
                let mut page = match pages.get(&index) {
                    Some(name) => (*up.store.page(name)?).clone(),
                    None => Page::default(),
                };
                page.entries
                    .retain(|(b, _)| index * PAGE_BLOCKS + u64::from(*b) < blocks);
                let source_page = match source.as_ref().and_then(|r| r.page(index)) {
                    Some(name) => up.store.page(name).ok(),
                    None => None,
                };
                let mut missing = Vec::new();
                let mut full = Vec::new();
                {
                    let txn = self.ns.read()?;
                    let manifest_table = txn.open_table(MANIFEST)?;
                    let chunks_table = txn.open_table(CHUNKS)?;
                    let mut by_hash: HashMap<ChunkHash, RemoteChunk> = HashMap::new();
                    for (_, c) in page
                        .entries
                        .iter()
                        .chain(source_page.iter().flat_map(|p| p.entries.iter()))
                    {
                        by_hash.insert(c.hash, c.clone());
                    }
                    for block in page_blocks {
                        let within = (block % PAGE_BLOCKS) as u16;
                        match manifest::resolve_chain(&manifest_table, &chain, block)? {
                            BlockContent::Zero => page.set(within, None),
                            BlockContent::Chunk(hash) => {
                                if let Some(c) =
                                    placed.get(&hash).or_else(|| by_hash.get(&hash))
                                {
                                    page.set(within, Some(c.clone()));
                                    continue;
                                }
                                missing.push((within, hash));
                                if packs.queued.insert(hash) {
                                    let loc = index::lookup(&chunks_table, &hash)?
                                        .ok_or_else(|| {
                                            UploadFailure::Fatal(format!(
                                                "block {block} names chunk {hash}, which is not stored"
                                            ))
                                        })?
                                        .0;
                                    full.extend(packs.add(hash, loc, up.pack_bytes()));
                                }
                            }
                        }
                    }
                }
                waiting.insert(index, WaitingPage { page, missing });
                for pack in full {
                    // Room for one more: wait for a result if as many as allowed
                    // are on their way.
                    self.collect_packs(up, id, packs, placed, packs.limit - 1)?;
                    packs.send(pack)?;
                }
                self.collect_packs(up, id, packs, placed, usize::MAX)?;
                done_pages +=
                    self.finish_pages(up, &mut waiting, placed, &mut pages, false)?;
                lock(&up.progress).insert(id, (done_pages, total));
                if up.renewal_due() {
                    up.write_lease(&self.ns.view())?;
                }
            }
            let last = std::mem::take(&mut packs.current);
            if !last.is_empty() {
                self.collect_packs(up, id, packs, placed, packs.limit - 1)?;
                packs.send(last)?;
            }
            self.collect_packs(up, id, packs, placed, 0)
        })?;
        self.finish_pages(up, &mut waiting, &placed, &mut pages, true)?;
        lock(&up.progress).insert(id, (total, total));
        let root = Root {
            facts: RootFacts {
                host: up.store.host.clone(),
                snapshot: id.0,
                volume: record.volume.clone(),
                label: record.label.clone(),
                size_bytes: record.size_bytes,
                block_size: record.block_size,
                created: record.created,
                completed: Timestamp::now(),
                parent: record.parent.clone(),
                changed_blocks: record.changed_blocks,
                stored_bytes: record.stored_bytes,
            },
            pages: pages.into_iter().collect(),
        };
        if !(continuous_from_start && up.lease_continuous.load(Ordering::Acquire)) {
            self.verify_reused(
                up,
                &root,
                resumed > 0 || base_root.is_some() || source.is_some(),
            )?;
        }
        up.store
            .put_object(&up.store.names().meta_of(&root_name), &meta_of(&record))?;
        if up.renewal_due() {
            up.write_lease(&self.ns.view())?;
        }
        // The commit point.
        let commit = lock(&up.commit);
        let still = self
            .ns
            .view()
            .snapshots
            .get(&id)
            .is_some_and(|s| s.captured && s.status == SnapshotStatus::Pending);
        if !still {
            // Deleted meanwhile (kept hidden as its volume's base, not uploaded).
            drop(commit);
            self.clear_uploaded(id)?;
            return Ok(());
        }
        up.store.put_object(&root_name, &root.encode())?;
        let settle = self.commit_upload(id, &root_name)?;
        drop(commit);
        self.settled(settle);
        self.clear_uploaded(id)?;
        lock(&up.progress).remove(&id);
        // The same lease write that stops protecting what the upload wrote by its age
        // names the root that now references it.
        lock(&up.recent_roots).push((root_name.clone(), Instant::now()));
        // Other snapshots' chunks recorded in `uploaded` (an attempt that failed, a
        // capture whose chunks went ahead) are referenced by no root yet: they stay
        // protected by their age until their own upload completes.
        if !self.uploads_unfinished()? {
            *lock(&up.capturing_since) = None;
        }
        up.write_lease(&self.ns.view())?;
        let elapsed = started.elapsed().as_secs_f64();
        let bytes = up.uploaded_bytes.load(Ordering::Relaxed) - bytes_before;
        info!(
            "snapshot {} completed in the bucket: {} pages rewritten, {bytes} bytes of chunks \
             sent in {} write requests ({:.1} MB/s, {:.2}s){}",
            record.name(),
            total,
            up.store.bucket.writes.load(Ordering::Relaxed) - writes_before,
            bytes as f64 / 1e6 / elapsed.max(1e-6),
            elapsed,
            if resumed > 0 {
                format!(", {resumed} chunks sent by an earlier attempt")
            } else {
                String::new()
            }
        );
        Ok(())
    }

    /// Whether `uploaded` records chunks of any snapshot (uploads begun and not
    /// completed).
    fn uploads_unfinished(&self) -> UploadResult<bool> {
        let txn = self.ns.read()?;
        Ok(redb::ReadableTable::first(&txn.open_table(UPLOADED)?)?.is_some())
    }

    /// At start-up: forgets the upload records of snapshots no longer pending (left
    /// by a crash between their end and the records' removal, or by versions that
    /// kept them).
    fn sweep_uploaded(&self) -> Result<(), NamespaceError> {
        let view = self.ns.view();
        let stale: BTreeSet<SnapshotId> = {
            let txn = self.ns.read()?;
            let table = txn.open_table(UPLOADED)?;
            let mut ids = BTreeSet::new();
            for row in redb::ReadableTable::iter(&table)? {
                ids.insert(SnapshotId(row?.0.value().0));
            }
            ids.retain(|id| {
                view.snapshots
                    .get(id)
                    .is_none_or(|s| s.status != SnapshotStatus::Pending)
            });
            ids
        };
        for id in stale {
            self.clear_uploaded(id)?;
        }
        Ok(())
    }

    /// A capture committed a batch holding these new chunks: they may go up before
    /// the capture ends (see [`Self::send_ahead`]).
    pub(super) fn committed_chunks(&self, id: SnapshotId, hashes: Vec<ChunkHash>) {
        let Some(up) = &self.remote else {
            return;
        };
        if self.scheduling == Scheduling::Manual || hashes.is_empty() {
            return;
        }
        let mut state = lock(&up.state);
        if state.ahead_off.contains(&id) || state.ahead_len + hashes.len() > AHEAD_MAX {
            return;
        }
        state.ahead_len += hashes.len();
        state.ahead.entry(id).or_default().extend(hashes);
        drop(state);
        up.wake();
    }

    /// Whether snapshot `id` is still being captured.
    fn capturing(&self, id: SnapshotId) -> bool {
        self.ns
            .view()
            .snapshots
            .get(&id)
            .is_some_and(|s| s.status == SnapshotStatus::Pending && !s.captured)
    }

    /// Sends the chunks that committed batches of a running capture hold ahead of
    /// its upload, in full packs, on the upload's workers; as each PUT returns, its
    /// chunks are recorded in `uploaded` under the snapshot, exactly as the upload
    /// records its own, so the upload (or one resumed after a crash) finds them
    /// placed and sends only the rest. `capturing_since` is set first: until a root
    /// names them, these packs are protected by their age. Goes on while the
    /// capture of the first snapshot with chunks waiting runs and no upload is due;
    /// chunks short of a full pack when it stops are left to the upload. A failure
    /// stops sending ahead for that capture, with no other effect: its upload
    /// retries and reports as usual.
    fn send_ahead(&self, up: &Uploader) {
        let Some(id) = lock(&up.state).ahead.keys().next().copied() else {
            return;
        };
        if !self.capturing(id) {
            up.drop_ahead(id, false);
            return;
        }
        let before = up.uploaded_bytes.load(Ordering::Relaxed);
        let sent = (|| -> UploadResult<()> {
            up.begin_uploading(&self.ns.view())?;
            let mut placed = self.placed_chunks(id)?;
            self.with_pack_workers(up, id, &mut placed, |packs, placed| {
                loop {
                    if up.stopped() {
                        return Err(UploadFailure::Stopped);
                    }
                    let hashes = {
                        let mut state = lock(&up.state);
                        let hashes = state.ahead.get_mut(&id).map(std::mem::take);
                        let hashes = hashes.unwrap_or_default();
                        state.ahead_len -= hashes.len();
                        hashes
                    };
                    let mut full = Vec::new();
                    if !hashes.is_empty() {
                        let txn = self.ns.read()?;
                        let chunks = txn.open_table(CHUNKS)?;
                        for hash in hashes {
                            if placed.contains_key(&hash) || !packs.queued.insert(hash) {
                                continue;
                            }
                            // Gone if the capture was cancelled meanwhile.
                            if let Some((loc, _)) = index::lookup(&chunks, &hash)? {
                                full.extend(packs.add(hash, loc, up.pack_bytes()));
                            }
                        }
                    }
                    let idle = full.is_empty();
                    for pack in full {
                        self.collect_packs(up, id, packs, placed, packs.limit - 1)?;
                        packs.send(pack)?;
                    }
                    self.collect_packs(up, id, packs, placed, usize::MAX)?;
                    if up.renewal_due() {
                        up.write_lease(&self.ns.view())?;
                    }
                    if !self.capturing(id) || up.upload_due() {
                        break;
                    }
                    if idle {
                        let state = lock(&up.state);
                        if state.ahead.get(&id).is_none_or(Vec::is_empty) && !state.stopped {
                            drop(up.changed.wait_timeout(state, AHEAD_POLL));
                        }
                    }
                }
                self.collect_packs(up, id, packs, placed, 0)
            })
        })();
        let bytes = up.uploaded_bytes.load(Ordering::Relaxed) - before;
        // A capture that failed or was cancelled while its packs were on their way
        // had its records dropped before these came back.
        let pending = self
            .ns
            .view()
            .snapshots
            .get(&id)
            .is_some_and(|s| s.status == SnapshotStatus::Pending);
        if !pending && let Err(e) = self.clear_uploaded(id) {
            warn!("snapshot {id}: cannot forget where its chunks went: {e}");
        }
        match sent {
            Ok(()) | Err(UploadFailure::Stopped) => {
                if bytes > 0 {
                    info!("snapshot {id}: {bytes} bytes of chunks sent while it was captured");
                }
                if !self.capturing(id) {
                    up.drop_ahead(id, false);
                }
            }
            Err(UploadFailure::Retry(reason) | UploadFailure::Fatal(reason)) => {
                info!(
                    "snapshot {id}: chunks are no longer sent while it is captured ({reason}); \
                     its upload sends them"
                );
                up.drop_ahead(id, true);
            }
        }
    }

    /// Where earlier attempts at uploading snapshot `id` (and its packs sent ahead)
    /// put its chunks, from the `uploaded` table.
    fn placed_chunks(&self, id: SnapshotId) -> UploadResult<HashMap<ChunkHash, RemoteChunk>> {
        let mut placed = HashMap::new();
        let txn = self.ns.read()?;
        let table = txn.open_table(UPLOADED)?;
        for row in table.range((id.0, &[0u8; 32])..=(id.0, &[0xffu8; 32]))? {
            let (key, value) = row?;
            let hash = ChunkHash(*key.value().1);
            match RemoteChunk::decode(value.value(), "uploaded chunk") {
                Ok(chunk) => {
                    placed.insert(hash, chunk);
                }
                Err(e) => warn!("snapshot {id}: ignoring a damaged upload record: {e}"),
            }
        }
        Ok(placed)
    }

    /// Runs `body` with `upload_concurrency` pack workers (see [`Packs`]) for
    /// snapshot `id`. If `body` fails, what is already on its way is still recorded
    /// in `placed` and `uploaded`; the packs still queued are skipped.
    fn with_pack_workers<T>(
        &self,
        up: &Uploader,
        id: SnapshotId,
        placed: &mut HashMap<ChunkHash, RemoteChunk>,
        body: impl FnOnce(&mut Packs<'_>, &mut HashMap<ChunkHash, RemoteChunk>) -> UploadResult<T>,
    ) -> UploadResult<T> {
        let concurrency = up.store.settings.upload_concurrency.max(1);
        let abort = AtomicBool::new(false);
        let (jobs, job_queue) = std::sync::mpsc::channel::<Vec<(ChunkHash, ChunkLocation)>>();
        let job_queue = Mutex::new(job_queue);
        let send = |pack: Vec<(ChunkHash, ChunkLocation)>| {
            if abort.load(Ordering::Acquire) {
                return Err(UploadFailure::Stopped);
            }
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.send_pack(up, &pack)))
                .unwrap_or_else(|_| Err(UploadFailure::Retry("upload thread panicked".into())))
        };
        let done = std::thread::scope(|scope| -> UploadResult<T> {
            let (results_in, results) = std::sync::mpsc::channel();
            spawn_workers(scope, concurrency, &job_queue, &results_in, &send);
            drop(results_in);
            let mut packs = Packs {
                jobs,
                results,
                abort: &abort,
                in_flight: 0,
                limit: concurrency + PACKS_QUEUED,
                current: Vec::new(),
                bytes: 0,
                queued: HashSet::new(),
            };
            let done = body(&mut packs, placed);
            if done.is_err() {
                // Record what is already on its way, skip the rest.
                abort.store(true, Ordering::Release);
                let _ = self.collect_packs(up, id, &mut packs, placed, 0);
            }
            done
        });
        up.store.release_pack_buffers();
        done
    }

    /// Reads one pack's chunk payloads from the local packs (verifying each), builds
    /// the pack object and uploads it; returns where each chunk went (a worker of
    /// [`Packs`]).
    fn send_pack(
        &self,
        up: &Uploader,
        pack: &[(ChunkHash, ChunkLocation)],
    ) -> UploadResult<Vec<RemoteChunk>> {
        let size = pack.iter().map(|(_, loc)| loc.stored_len as usize).sum();
        let mut builder = up.store.pack_builder(crate::namespace::random_u64(), size);
        self.store
            .read_payloads(pack, |i, payload| {
                let (hash, loc) = pack[i];
                builder.push(hash, loc.codec, loc.plain_len, payload);
            })
            .map_err(|e| UploadFailure::Fatal(e.to_string()))?;
        Ok(builder.finish()?)
    }

    /// Takes the results of the packs that came back, waiting until at most `keep`
    /// are still on their way, and records where their chunks went, durably, before
    /// any page names them. The first failure is returned once what did go up is
    /// recorded; the workers then skip the packs still queued.
    fn collect_packs(
        &self,
        up: &Uploader,
        id: SnapshotId,
        packs: &mut Packs<'_>,
        placed: &mut HashMap<ChunkHash, RemoteChunk>,
        keep: usize,
    ) -> UploadResult<()> {
        let mut sent = Vec::new();
        let mut failed: Option<UploadFailure> = None;
        while packs.in_flight > 0 {
            let result = if packs.in_flight > keep {
                packs.results.recv().ok()
            } else {
                packs.results.try_recv().ok()
            };
            let Some(result) = result else {
                break;
            };
            packs.in_flight -= 1;
            match result {
                Ok(chunks) => sent.extend(chunks),
                Err(e) => {
                    packs.abort.store(true, Ordering::Release);
                    if failed
                        .as_ref()
                        .is_none_or(|f| matches!(f, UploadFailure::Stopped))
                    {
                        failed = Some(e);
                    }
                }
            }
        }
        if !sent.is_empty() {
            self.ns.change_data(|d| -> Result<(), NamespaceError> {
                let mut table = d.txn().open_table(UPLOADED)?;
                for chunk in &sent {
                    table.insert((id.0, &chunk.hash.0), chunk.encode().as_slice())?;
                }
                Ok(())
            })?;
            let bytes: u64 = sent.iter().map(|c| u64::from(c.stored_len)).sum();
            up.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
            for chunk in sent {
                packs.queued.remove(&chunk.hash);
                placed.insert(chunk.hash, chunk);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Uploads the waiting pages whose chunks all have a place (all of them with
    /// `all`); returns how many went.
    fn finish_pages(
        &self,
        up: &Uploader,
        waiting: &mut BTreeMap<u64, WaitingPage>,
        placed: &HashMap<ChunkHash, RemoteChunk>,
        pages: &mut BTreeMap<u64, String>,
        all: bool,
    ) -> UploadResult<u64> {
        let ready: Vec<u64> = waiting
            .iter()
            .filter(|(_, w)| all || w.missing.iter().all(|(_, h)| placed.contains_key(h)))
            .map(|(&index, _)| index)
            .collect();
        for index in &ready {
            let mut w = waiting.remove(index).expect("listed");
            for (within, hash) in w.missing.drain(..) {
                let chunk = placed
                    .get(&hash)
                    .ok_or_else(|| UploadFailure::Retry(format!("chunk {hash} was not sent")))?;
                w.page.set(within, Some(chunk.clone()));
            }
            if w.page.entries.is_empty() {
                pages.remove(index);
            } else {
                let name = up.store.put_page(&w.page)?;
                pages.insert(*index, name);
            }
        }
        Ok(ready.len() as u64)
    }

    /// After the lease may have lapsed: waits out any collection that may have
    /// missed it, then checks that every object the root names exists. A missing
    /// one restarts the upload from nothing.
    fn verify_reused(&self, up: &Uploader, root: &Root, reuses: bool) -> UploadResult<()> {
        if !reuses {
            return Ok(());
        }
        up.write_lease(&self.ns.view())?;
        info!(
            "snapshot {}: the lease may have lapsed; checking what the upload reuses",
            root.facts.snapshot
        );
        let wait = up.store.lease_ttl() / 4;
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if up.stopped() {
                return Err(UploadFailure::Stopped);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut packs = BTreeSet::new();
        let head = |name: &str| -> UploadResult<bool> {
            up.store
                .bucket
                .head(name)
                .map(|h| h.is_some())
                .map_err(|e| UploadFailure::Retry(e.to_string()))
        };
        for (_, name) in &root.pages {
            if !head(name)? {
                return Err(self.restart_upload(root, name));
            }
            for (_, chunk) in &up.store.page(name)?.entries {
                packs.insert(chunk.pack.clone());
            }
        }
        for pack in &packs {
            if !head(pack)? {
                return Err(self.restart_upload(root, pack));
            }
        }
        up.lease_continuous.store(true, Ordering::Release);
        Ok(())
    }

    fn restart_upload(&self, root: &Root, missing: &str) -> UploadFailure {
        let id = SnapshotId(root.facts.snapshot);
        warn!("snapshot {id}: {missing} is gone from the bucket; uploading the snapshot again");
        if let Err(e) = self.clear_uploaded(id) {
            return UploadFailure::Retry(e.to_string());
        }
        UploadFailure::Retry(format!("{missing} was collected; starting the upload over"))
    }

    /// The local commit of an upload: `completed`, with its root.
    fn commit_upload(&self, id: SnapshotId, root: &str) -> UploadResult<Settle> {
        let guard = self.ns.lock();
        let pins = self.pinned();
        let settle = self
            .ns
            .change(&guard, |c| -> Result<Settle, super::SnapshotError> {
                let mut settle = Settle::new(SETTLE_BATCH);
                let Some(mut record) = c.records().snapshots.get(&id).cloned() else {
                    return Ok(settle);
                };
                record.status = SnapshotStatus::Completed;
                record.completed = Some(Timestamp::now());
                record.remote_root = Some(root.to_string());
                record.parent = c.records().visible_parent(record.lineage, id);
                let lineage = record.lineage;
                c.put_snapshot(record)?;
                settle.collect_hidden(c, lineage, &pins)?;
                Ok(settle)
            });
        settle.map_err(|e| UploadFailure::Retry(e.to_string()))
    }
}

/// A snapshot's `meta` object: who may read it.
fn meta_of(record: &SnapshotRecord) -> Vec<u8> {
    let meta = SnapshotMeta {
        owner: record.owner,
        description: record.description.clone(),
        xattrs: record.xattrs.clone(),
    };
    toml::to_string(&meta).unwrap_or_default().into_bytes()
}

fn remote_ns(e: NamespaceError) -> RemoteError {
    RemoteError::Setup {
        store: String::new(),
        reason: format!("metadata database: {e}"),
    }
}

/// The bucket thread: renews the lease, sends tombstones, uploads, collects.
fn remote_worker<S: Storage>(engine: Weak<SnapshotEngine<S>>, up: Arc<Uploader>) {
    loop {
        let next_upload = {
            let state = lock(&up.state);
            if state.stopped {
                return;
            }
            let now = Instant::now();
            let ready = state.due_upload();
            let wait = if ready.is_some()
                || state.tombstones
                || !state.meta.is_empty()
                || !state.ahead.is_empty()
            {
                Duration::ZERO
            } else {
                let next_retry = state
                    .queue
                    .values()
                    .min()
                    .map(|at| at.saturating_duration_since(now));
                let renew = lock(&up.last_renewal).map_or(Duration::ZERO, |at| {
                    up.store.lease_renew().saturating_sub(at.elapsed())
                });
                next_retry.map_or(renew, |r| r.min(renew))
            };
            if !wait.is_zero() {
                let (state, _) = up
                    .changed
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner());
                if state.stopped {
                    return;
                }
                None
            } else {
                ready
            }
        };
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if up.renewal_due()
            && let Err(e) = up.write_lease(&engine.ns.view())
        {
            warn!("renewing this host's lease in the snapshot store: {e}");
        }
        let tombstones = std::mem::take(&mut lock(&up.state).tombstones);
        let mut collect = lock(&up.last_gc).is_none_or(|at| at.elapsed() >= GC_EVERY);
        if tombstones {
            match engine.send_tombstones(&up) {
                Ok(0) => {}
                Ok(_) => collect = true,
                Err(e) => {
                    warn!("sending tombstones to the snapshot store: {e}");
                    lock(&up.state).tombstones = true;
                    std::thread::sleep(RETRY_FIRST);
                }
            }
        }
        engine.send_meta(&up);
        if let Some(id) = next_upload {
            engine.attempt_upload(&up, id);
        } else {
            engine.send_ahead(&up);
        }
        if collect && lock(&up.state).queue.is_empty() {
            *lock(&up.last_gc) = Some(Instant::now());
            match engine.collect_bucket_garbage() {
                Ok(report) => info!("snapshot store: {report}"),
                Err(e) => warn!("collecting garbage in the snapshot store: {e}"),
            }
        }
    }
}

impl<S: Storage> SnapshotEngine<S> {
    /// Records that a deleted snapshot's root must get a tombstone (in the caller's
    /// change), and wakes the bucket thread after the commit.
    pub(super) fn tombstone_due(
        c: &crate::namespace::Change<'_>,
        record: &SnapshotRecord,
    ) -> Result<(), NamespaceError> {
        if let Some(root) = &record.remote_root {
            c.txn()
                .open_table(TOMBSTONES_DUE)?
                .insert(root.as_str(), ())?;
        }
        Ok(())
    }

    /// Has snapshot `id`'s `meta` object rewritten (its sharing changed).
    pub fn meta_due(&self, id: SnapshotId) {
        if let Some(up) = &self.remote {
            lock(&up.state).meta.insert(id);
            up.wake();
        }
    }

    /// Rewrites the `meta` objects due; those that fail stay due.
    fn send_meta(&self, up: &Uploader) {
        let due = std::mem::take(&mut lock(&up.state).meta);
        for id in due {
            let view = self.ns.view();
            let Some(record) = view.snapshots.get(&id) else {
                continue;
            };
            let Some(root) = &record.remote_root else {
                continue;
            };
            if let Err(e) = up
                .store
                .put_object(&up.store.names().meta_of(root), &meta_of(record))
            {
                warn!(
                    "snapshot {}: cannot update its sharing in the bucket: {e}",
                    record.name()
                );
                lock(&up.state).meta.insert(id);
            }
        }
    }

    pub(super) fn wake_tombstones(&self) {
        if let Some(up) = &self.remote {
            lock(&up.state).tombstones = true;
            up.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With one job per worker, every job must be running before any may finish:
    /// each waits (up to 10 s) until all have started.
    #[test]
    fn workers_run_as_many_jobs_at_once_as_there_are_workers() {
        const WORKERS: usize = 3;
        let (jobs, queue) = std::sync::mpsc::channel();
        let queue = Mutex::new(queue);
        let (started, all_started) = (Mutex::new(0usize), Condvar::new());
        let work = |job: usize| -> (usize, bool) {
            let mut count = lock(&started);
            *count += 1;
            all_started.notify_all();
            let (_count, wait) = all_started
                .wait_timeout_while(count, Duration::from_secs(10), |n| *n < WORKERS)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (job, !wait.timed_out())
        };
        let (results_in, results) = std::sync::mpsc::channel();
        let mut done = std::thread::scope(|scope| {
            spawn_workers(scope, WORKERS, &queue, &results_in, &work);
            drop(results_in);
            for job in 0..WORKERS {
                jobs.send(job).unwrap();
            }
            drop(jobs);
            results.iter().collect::<Vec<_>>()
        });
        done.sort();
        let all_at_once: Vec<_> = (0..WORKERS).map(|job| (job, true)).collect();
        assert_eq!(
            done, all_at_once,
            "each job (number, whether it saw all {WORKERS} running) must run alongside the others"
        );
    }
}
