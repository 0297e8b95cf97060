//! Crash detection and the repairs that follow.
//!
//! While mounted, the data directory holds a `session` file naming the host's boot
//! id; a clean unmount removes it. Finding it at start-up means the last session
//! ended abruptly:
//! - same boot id: only the daemon died (`kill -9`). The page cache survived, so the
//!   dirty maps are trustworthy (their bits are written before the data);
//! - different boot id: the host crashed. Dirty maps may have lost bits that the
//!   data files kept, so every volume's next snapshot compares all of its blocks.
//!
//! Either way, chunk space freed by a commit whose clean-up never ran is reclaimed.

use std::fs;
use std::path::{Path, PathBuf};

use log::{info, warn};

use super::{FsError, FsResult, io_error};
use crate::catalog::Catalog;
use crate::meta::{self, Meta, MetaError};
use crate::store::ChunkStore;

const SESSION_FILE: &str = "session";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastStop {
    Clean,
    DaemonCrash,
    HostCrash,
}

pub struct Session {
    path: PathBuf,
    pub last_stop: LastStop,
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Session {
    pub fn begin(data_dir: &Path) -> FsResult<Session> {
        let path = data_dir.join(SESSION_FILE);
        let current_boot = boot_id();
        let last_stop = match fs::read_to_string(&path) {
            Ok(text) => {
                let previous_boot = text
                    .lines()
                    .find_map(|l| l.strip_prefix("boot_id="))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                if previous_boot == current_boot && !current_boot.is_empty() {
                    LastStop::DaemonCrash
                } else {
                    LastStop::HostCrash
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LastStop::Clean,
            Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
        };
        let tmp = data_dir.join(format!("{SESSION_FILE}.tmp"));
        fs::write(
            &tmp,
            format!("pid={}\nboot_id={current_boot}\n", std::process::id()),
        )
        .and_then(|_| fs::rename(&tmp, &path))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS | libc::EACCES | libc::EPERM) => FsError::Io {
                what: format!("data directory {} is not writable", data_dir.display()),
                source: e,
            },
            _ => io_error(format!("writing {}", path.display()))(e),
        })?;
        Ok(Session { path, last_stop })
    }

    /// Records a clean stop.
    pub fn end(&self) {
        if let Err(e) = fs::remove_file(&self.path) {
            warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

pub fn after_crash(
    session: &Session,
    meta: &Meta,
    catalog: &Catalog,
    store: &ChunkStore,
) -> FsResult<()> {
    match session.last_stop {
        LastStop::Clean => return Ok(()),
        LastStop::DaemonCrash => warn!("the previous session did not stop cleanly; recovering"),
        LastStop::HostCrash => {
            warn!(
                "the host crashed during the previous session: next snapshots compare every block"
            );
            let mut records = catalog.write();
            let txn = meta.begin_write()?;
            let mut updated = Vec::new();
            for volume in records.volumes.values() {
                let mut volume = volume.clone();
                volume.full_compare = true;
                meta::put_volume(&txn, &volume)?;
                updated.push(volume);
            }
            txn.commit().map_err(MetaError::from)?;
            for volume in updated {
                records.upsert_volume(volume);
            }
        }
    }
    let punched = store.reclaim_unreferenced(meta)?;
    if punched > 0 {
        info!("reclaimed {punched} bytes of unreferenced chunk space");
    }
    Ok(())
}
