//! Running the snapshot policies of `config.toml` (`[[policy]]`, see
//! [`crate::policy`]): a thread wakes when a run is due, snapshots through `mkdir`
//! and prunes through `rmdir`, as the daemon's own user (with the recycle bin on,
//! pruned snapshots go to the bin like any other `rmdir`). The same thread purges
//! the recycle bin (see [`super::recycle_bin`]).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use log::{info, warn};

use super::inode;
use super::{Caller, FsCore, FsError};
use crate::namespace::{SnapshotStatus, Timestamp};
use crate::policy::{Snap, locked_until};
use crate::snapshot::SnapshotError;
use crate::storage::Storage;

/// The longest the policy thread sleeps: volumes made meanwhile (a `"*"` policy) get
/// their first snapshot within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How soon a run that found its volume busy (a snapshot pending) is tried again.
const BUSY_RETRY_SECS: u64 = 5;

/// What one pass over the policies did.
#[derive(Debug, Default)]
pub struct PolicyPass {
    /// Snapshots started (`volume@label`).
    pub created: Vec<String>,
    /// Snapshots deleted.
    pub pruned: Vec<String>,
    /// When the next run is due, if any policy has a volume.
    pub next: Option<Timestamp>,
}

impl<S: Storage> FsCore<S> {
    /// This host's snapshots as policies see them.
    fn policy_snaps(&self) -> Vec<Snap> {
        self.ns
            .view()
            .visible_snapshots()
            .map(|s| Snap {
                volume: s.volume.clone(),
                label: s.label.clone(),
                completed: s.status == SnapshotStatus::Completed,
                failed: s.status == SnapshotStatus::Error,
                locked_until: locked_until(&s.xattrs),
            })
            .collect()
    }

    /// The daemon, as the caller of the `mkdir`s and `rmdir`s policies make.
    fn daemon_caller(&self) -> Caller {
        Caller::with_groups(self.owner_ids.0, self.owner_ids.1, vec![])
    }

    /// Takes the snapshots due at `now` and prunes what the policies no longer keep.
    /// The policy thread calls this with the wall clock; tests with their own.
    pub fn run_policies(&self, now: Timestamp) -> PolicyPass {
        let mut pass = PolicyPass::default();
        let policies = &self.settings.policies;
        if policies.is_empty() {
            return pass;
        }
        let caller = self.daemon_caller();
        let volumes: Vec<String> = self
            .ns
            .view()
            .volumes
            .values()
            .map(|v| v.name.to_string())
            .collect();
        let mut retry_at: Option<Timestamp> = None;
        for policy in policies {
            let snaps = self.policy_snaps();
            for volume in policy.due(&volumes, &snaps, now) {
                let name = format!("{volume}@{}", policy.label_at(now));
                match self.mkdir(inode::SNAPSHOTS_DIR, OsStr::new(&name), &caller) {
                    Ok(_) => {
                        info!("policy {}: snapshot {name} started", policy.name);
                        pass.created.push(name);
                    }
                    Err(e) => {
                        let soon = match &e {
                            FsError::Snapshot(SnapshotError::Busy(_)) => {
                                BUSY_RETRY_SECS.min(policy.every_secs)
                            }
                            _ => {
                                warn!("policy {}: cannot snapshot {name}: {e}", policy.name);
                                policy.every_secs.min(MAX_SLEEP.as_secs())
                            }
                        };
                        let at = Timestamp(now.0.saturating_add(soon as i64 * 1_000_000_000));
                        retry_at = Some(retry_at.map_or(at, |r| r.min(at)));
                    }
                }
            }
            for snap in policy.prune(&self.policy_snaps(), now) {
                let name = snap.name();
                match self.rmdir(inode::SNAPSHOTS_DIR, OsStr::new(&name), &caller) {
                    Ok(()) => {
                        info!("policy {}: deleted snapshot {name}", policy.name);
                        pass.pruned.push(name);
                    }
                    Err(e) => warn!("policy {}: cannot delete snapshot {name}: {e}", policy.name),
                }
            }
        }
        let snaps = self.policy_snaps();
        pass.next = policies
            .iter()
            .flat_map(|p| {
                volumes
                    .iter()
                    .filter(|v| p.volumes.covers(v))
                    .map(|v| p.next_run(v, &snaps, now))
                    .filter(|&t| t > now)
                    .collect::<Vec<_>>()
            })
            .chain(retry_at)
            .min();
        pass
    }

    /// Starts the lifecycle thread (a mount with `[[policy]]` tables or a recycle
    /// bin): it runs the policies and purges the bin when due. It stops when the core
    /// shuts down or is dropped.
    pub fn start_policies(self: &Arc<Self>) {
        if self.settings.policies.is_empty() && self.settings.recycle_bin_secs.is_none() {
            return;
        }
        let core = Arc::downgrade(self);
        let signal = self.policy_signal.clone();
        let spawned = std::thread::Builder::new()
            .name("lifecycle".into())
            .spawn(move || {
                loop {
                    let Some(strong) = core.upgrade() else {
                        return;
                    };
                    if strong.stopped.load(Ordering::Acquire) {
                        return;
                    }
                    let now = Timestamp::now();
                    let pass = strong.run_policies(now);
                    let bin = strong.purge_recycle_bin(now);
                    drop(strong);
                    let next = match (pass.next, bin.next) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let sleep = next
                        .map(|t| Duration::from_nanos(t.0.saturating_sub(now.0).max(0) as u64))
                        .unwrap_or(MAX_SLEEP)
                        .clamp(Duration::from_millis(50), MAX_SLEEP);
                    if !signal.wait(sleep) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(
                "cannot start the lifecycle thread: {e}; [[policy]] snapshots are not taken \
                 and the recycle bin is not purged"
            );
        }
    }
}
