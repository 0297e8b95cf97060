//! Snapshots: the engine that creates, captures, completes, deletes, reads and
//! recovers them. Each concern has its own module; this one holds what they share.
//!
//! - [`lifecycle`]: the state machine of a snapshot — `pending → completed | error`,
//!   and deletion (hidden while something still needs it, then gone);
//! - [`capture`]: turning a frozen volume into chunks and manifest entries;
//! - [`diff`]: the byte ranges in which a snapshot differs from its parent;
//! - [`manifest`]: which chunk each block of each snapshot holds;
//! - [`read`]: reading images, and pins that keep an open image readable after `rmdir`;
//! - [`settle`]: merging and dropping deleted snapshots in bounded transactions;
//! - [`stream`]: send streams, one snapshot as a self-verifying byte stream;
//! - [`recovery`]: what start-up does with captures a crash interrupted.
//!
//! Every record change goes through the [`Namespace`] service (stage → commit →
//! publish under its lock); the engine never opens a metadata transaction itself.

pub mod capture;
pub mod diff;
pub mod lifecycle;
pub mod manifest;
pub mod read;
pub mod recovery;
pub mod settle;
pub mod stream;
pub mod upload;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::layout::Layout;
use crate::namespace::{Namespace, NamespaceError, SnapshotId, Timestamp};
use crate::storage::Storage;
use crate::store::{ChunkStore, StoreError};
use crate::volume::VolumeError;
use capture::{CaptureJob, CaptureProgress};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0} already exists")]
    Exists(String),
    #[error(
        "snapshot {0} is in the recycle bin, and its name stays taken until it is \
         restored (mv recycle-bin/{0} snapshots/) or purged (rmdir recycle-bin/{0})"
    )]
    InBin(String),
    #[error("no snapshot named {0}")]
    NotFound(String),
    #[error("no volume named {0}")]
    NoVolume(String),
    #[error("volume {0} already has a snapshot pending; wait for it to complete")]
    Busy(String),
    #[error("snapshot {0} is still pending; its image is readable once it completes")]
    NotReady(String),
    #[error("capture cancelled")]
    Cancelled,
    #[error("snapshot {name} is locked until {until}: it cannot be deleted before then")]
    Locked { name: String, until: String },
    #[error("capture failed: {0}")]
    CaptureFailed(String),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type SnapshotResult<T> = Result<T, SnapshotError>;

/// How background work (captures, settling deletions) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// On background threads at low priority: what a mount does.
    Threads,
    /// Only when the owner asks ([`SnapshotEngine::run_queued`]), on its thread:
    /// deterministic, for in-process model tests.
    Manual,
}

pub struct SnapshotEngine<S: Storage> {
    pub ns: Arc<Namespace>,
    pub store: Arc<ChunkStore<S>>,
    storage: S,
    layout: Layout,
    capture_threads: usize,
    scheduling: Scheduling,
    /// Captures not ended yet: their progress, and what their pending images read.
    running: Mutex<HashMap<SnapshotId, Running<S>>>,
    /// Captures waiting for [`SnapshotEngine::run_queued`] (manual scheduling).
    queued: Mutex<Vec<CaptureJob<S>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Wakes the settler thread: deleted snapshots are left to settle, or the engine
    /// is gone. Shared with the thread, which holds no reference to the engine while
    /// it waits, so dropping the engine ends it.
    settle_signal: Arc<SettleSignal>,
    /// The settler thread, joined at shutdown.
    settler_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Open images per snapshot: a deleted snapshot stays whole while pinned.
    pins: Mutex<HashMap<SnapshotId, usize>>,
    /// With a snapshot store: uploads and the rest of this host's bucket work.
    remote: Option<Arc<upload::Uploader>>,
}

/// A capture not ended yet: its progress, and the freeze its pending image reads.
type Running<S> = (Arc<CaptureProgress>, read::Frozen<S>);

/// Extended attribute of a snapshot holding the time (RFC 3339, UTC) until which it
/// cannot be deleted, by anyone: `setfattr -n user.ebsfs.lock -v 2027-01-01T00:00:00Z`.
pub const LOCK_XATTR: &str = "user.ebsfs.lock";

/// Extended attribute of a received snapshot: the identity it had where it was taken
/// ([`stream::Identity`], 64 hex digits), which `ebsfs snapshot send` sends it with
/// and an incremental receive checks its base by. Set once, by its owner; never
/// changed or removed; volumes refuse it like every `user.ebsfs.*` name, so a volume
/// made from a received snapshot does not pass it on.
pub const ORIGIN_XATTR: &str = "user.ebsfs.origin";

/// Until when `record` is locked against deletion, if it is now.
pub fn locked_until(record: &crate::namespace::SnapshotRecord) -> Option<Timestamp> {
    let text = record.xattrs.get(LOCK_XATTR)?;
    let until = Timestamp::parse_rfc3339(std::str::from_utf8(&text).ok()?)?;
    (until > Timestamp::now()).then_some(until)
}

/// What the settler thread waits for.
#[derive(Default)]
struct SettleSignal {
    state: Mutex<SettleState>,
    changed: Condvar,
}

#[derive(Default)]
struct SettleState {
    pending: bool,
    stopped: bool,
}

impl<S: Storage> Drop for SnapshotEngine<S> {
    fn drop(&mut self) {
        lock(&self.settle_signal.state).stopped = true;
        self.settle_signal.changed.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Nice value of capture and settling threads: under load, volume I/O gets the CPU
/// first, and background work still progresses.
const BACKGROUND_NICE: libc::c_int = 10;

/// `ioprio_set(2)` value for the idle I/O class: the block layer serves the disk
/// reads of background threads after everyone else's (mq-deadline and bfq age them,
/// so they are delayed, never starved).
const IOPRIO_IDLE: libc::c_long = 3 << 13;
const IOPRIO_WHO_PROCESS: libc::c_long = 1;

/// Lowers the calling thread's CPU and I/O priority. Best effort: it only tunes speed.
pub(crate) fn lower_thread_priority() {
    // SAFETY: gettid, setpriority and ioprio_set take integers only; on Linux, a
    // thread id with PRIO_PROCESS / IOPRIO_WHO_PROCESS changes that thread alone.
    let (nice, io) = unsafe {
        let tid = libc::gettid();
        (
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE),
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                tid as libc::c_long,
                IOPRIO_IDLE,
            ),
        )
    };
    if nice != 0 || io != 0 {
        log::debug!(
            "cannot lower background thread priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl<S: Storage> SnapshotEngine<S> {
    pub fn new(
        storage: &S,
        layout: &Layout,
        ns: Arc<Namespace>,
        store: Arc<ChunkStore<S>>,
        capture_threads: usize,
        scheduling: Scheduling,
        remote: Option<Arc<upload::Uploader>>,
    ) -> SnapshotEngine<S> {
        SnapshotEngine {
            ns,
            store,
            storage: storage.clone(),
            layout: layout.clone(),
            capture_threads,
            scheduling,
            running: Mutex::new(HashMap::new()),
            queued: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            settle_signal: Arc::new(SettleSignal::default()),
            settler_thread: Mutex::new(None),
            pins: Mutex::new(HashMap::new()),
            remote,
        }
    }

    pub fn progress(&self, snapshot: SnapshotId) -> Option<Arc<CaptureProgress>> {
        lock(&self.running).get(&snapshot).map(|(p, _)| p.clone())
    }

    /// Registers a capture about to start: its progress and its freeze.
    fn register(&self, job: &CaptureJob<S>) {
        let frozen = read::Frozen {
            volume: job.volume.clone(),
            freeze: job.freeze.clone(),
        };
        lock(&self.running).insert(job.snapshot, (job.progress.clone(), frozen));
    }

    /// Runs every queued capture to its end on the calling thread (manual
    /// scheduling); returns how many ran.
    pub fn run_queued(&self) -> usize {
        let jobs = std::mem::take(&mut *lock(&self.queued));
        let count = jobs.len();
        for job in jobs {
            self.capture(job);
        }
        count
    }

    /// Waits for every running capture (used at unmount).
    pub fn wait_all(&self) {
        let pending: Vec<_> = lock(&self.running)
            .values()
            .map(|(p, _)| p.clone())
            .collect();
        if !pending.is_empty() {
            log::info!(
                "waiting for {} snapshot capture(s) to finish",
                pending.len()
            );
        }
        if self.scheduling == Scheduling::Manual {
            self.run_queued();
        }
        for progress in pending {
            progress.wait();
        }
        for handle in lock(&self.threads).drain(..) {
            let _ = handle.join();
        }
    }
}
