//! The recycle bin (`recycle_bin = "7d"` in config): `rmdir snapshots/X` of a
//! completed snapshot moves it to `recycle-bin/X`, where it stays whole for the
//! period; `mv recycle-bin/X snapshots/` restores it, `rmdir recycle-bin/X` purges it
//! at once, and the lifecycle thread purges it when the period has run out.
//!
//! Moving in and out is one change of the snapshot's record (see
//! [`crate::snapshot::SnapshotEngine::bin`]), so a crash leaves it in one place or
//! the other, whole. A purge is the ordinary deletion. While a snapshot is in the bin
//! its name stays taken, its files are readable as before (its owner may check what
//! a restore gives back), and nothing about it can be changed but its place.

use std::ffi::OsStr;

use log::{info, warn};

use super::inode;
use super::{Attr, Caller, FsCore, FsError, FsResult};
use crate::namespace::{SnapshotId, Timestamp};
use crate::snapshot::SnapshotError;
use crate::storage::Storage;

const NANOS: i64 = 1_000_000_000;

/// How soon a purge that failed is tried again.
const RETRY_SECS: i64 = 60;

/// What one pass over the recycle bin did.
#[derive(Debug, Default)]
pub struct BinPass {
    /// Snapshots purged (`volume@label`).
    pub purged: Vec<String>,
    /// When the next one is due, if any is in the bin.
    pub next: Option<Timestamp>,
}

impl<S: Storage> FsCore<S> {
    /// Whether `recycle-bin/` is shown: the bin is on, or holds snapshots (kept from
    /// when it was on: they are purged only by hand then).
    pub(super) fn recycle_bin_shown(&self) -> bool {
        self.settings.recycle_bin_secs.is_some()
            || self.ns.view().binned_snapshots().next().is_some()
    }

    /// When a snapshot moved to the bin at `binned` is purged, with the bin on.
    pub(super) fn purge_time(&self, binned: Timestamp) -> Option<Timestamp> {
        let secs = self.settings.recycle_bin_secs?;
        Some(Timestamp(
            binned.0.saturating_add((secs as i64).saturating_mul(NANOS)),
        ))
    }

    pub(super) fn lookup_binned(&self, name: &OsStr) -> FsResult<Attr> {
        let id = self.binned_by_name(name)?;
        self.snapshot_dir_attr(id)
    }

    fn binned_by_name(&self, name: &OsStr) -> FsResult<SnapshotId> {
        name.to_str()
            .and_then(|n| self.ns.view().binned_id(n))
            .ok_or_else(|| {
                FsError::NotFound(format!("{}/{}", inode::RECYCLE_BIN, name.to_string_lossy()))
            })
    }

    /// `rmdir snapshots/X` with the bin on: `true` once X is in the bin, `false` for
    /// a snapshot that is deleted outright (pending, uploading or failed).
    pub(super) fn move_to_bin(&self, name: &str) -> FsResult<bool> {
        if self.settings.recycle_bin_secs.is_none() {
            return Ok(false);
        }
        let binned = self.engine.bin(name)?;
        if binned {
            // The lifecycle thread may be asleep with nothing due: its purge is now.
            self.policy_signal.notify();
        }
        Ok(binned)
    }

    /// The snapshot `recycle-bin/<name>`, if `caller` owns it (only its owner may
    /// `verb` it).
    fn owned_binned(&self, name: &OsStr, caller: &Caller, verb: &str) -> FsResult<String> {
        let record = self.snapshot_record(self.binned_by_name(name)?)?;
        if !caller.owns(&record.owner) {
            return Err(FsError::NotPermitted(format!(
                "{}/{}: only its owner may {verb} it",
                inode::RECYCLE_BIN,
                record.name()
            )));
        }
        Ok(record.name())
    }

    /// `rmdir recycle-bin/X`: purges X now; only its owner may.
    pub(super) fn purge_binned(&self, name: &OsStr, caller: &Caller) -> FsResult<()> {
        let name = self.owned_binned(name, caller, "purge")?;
        self.engine.purge(&name)?;
        Ok(())
    }

    /// `mv recycle-bin/X snapshots/`: X is back under its own name; only its owner
    /// may restore it.
    pub(super) fn restore_binned(
        &self,
        name: &OsStr,
        new_name: &OsStr,
        caller: &Caller,
    ) -> FsResult<()> {
        let name = self.owned_binned(name, caller, "restore")?;
        if OsStr::new(&name) != new_name {
            return Err(FsError::Invalid(format!(
                "{}/{name}: a snapshot is restored under its own name (mv {0}/{name} \
                 snapshots/)",
                inode::RECYCLE_BIN,
            )));
        }
        self.engine.restore(&name)?;
        Ok(())
    }

    /// Refuses a change to a snapshot in the bin: only its place may change.
    pub(super) fn refuse_binned(&self, id: SnapshotId, what: &str) -> FsResult<()> {
        match self.ns.view().snapshots.get(&id) {
            Some(record) if record.binned.is_some() => Err(FsError::NotPermitted(format!(
                "snapshot {} is in the recycle bin: restore it (mv {}/{} snapshots/) to {what} it",
                record.name(),
                inode::RECYCLE_BIN,
                record.name()
            ))),
            _ => Ok(()),
        }
    }

    /// Purges what has been in the bin for its whole period at `now`. The lifecycle
    /// thread calls this with the wall clock; tests with their own. With the bin off,
    /// nothing is purged: what it still holds waits for `rmdir`.
    pub fn purge_recycle_bin(&self, now: Timestamp) -> BinPass {
        let mut pass = BinPass::default();
        let due: Vec<(String, Timestamp)> = self
            .ns
            .view()
            .binned_snapshots()
            .filter_map(|s| Some((s.name(), self.purge_time(s.binned?)?)))
            .collect();
        for (name, at) in due {
            if at > now {
                pass.next = Some(pass.next.map_or(at, |n| n.min(at)));
                continue;
            }
            match self.engine.purge(&name) {
                Ok(()) => {
                    info!("recycle bin: snapshot {name} purged, its period over");
                    pass.purged.push(name);
                }
                // Restored or purged by hand meanwhile.
                Err(SnapshotError::NotFound(_)) => {}
                Err(e) => {
                    warn!("recycle bin: cannot purge snapshot {name}: {e}");
                    let retry = Timestamp(now.0.saturating_add(RETRY_SECS * NANOS));
                    pass.next = Some(pass.next.map_or(retry, |n| n.min(retry)));
                }
            }
        }
        pass
    }
}
