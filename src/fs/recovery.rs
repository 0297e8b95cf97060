//! Crash detection and the repairs that follow.
//!
//! While mounted, the data directory holds a `session` file naming the host's boot
//! id; a clean unmount removes it. Finding it at start-up means the last session
//! ended abruptly:
//! - same boot id: only the daemon died (`kill -9`). The page cache survived, so the
//!   dirty maps are trustworthy (their bits reach the file before the data does);
//! - different boot id: the host crashed. Dirty maps may have lost bits that the
//!   data files kept, so every volume's next snapshot compares all of its blocks.
//!
//! Either way, chunk space freed by a commit whose clean-up never ran is reclaimed
//! (the database proves it unreferenced).

use log::{info, warn};

use super::{FsError, FsResult};
use crate::layout::Layout;
use crate::namespace::Namespace;
use crate::storage::{Storage, publish_file};
use crate::store::ChunkStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastStop {
    Clean,
    DaemonCrash,
    HostCrash,
}

pub struct Session {
    layout: Layout,
    pub last_stop: LastStop,
}

/// Turns an I/O error writing into the data directory into an error that says so
/// when the directory is read-only or forbidden.
pub(super) fn data_dir_io_error(
    layout: &Layout,
    what: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> FsError {
    let what = what.into();
    let dir = layout.root().display().to_string();
    move |source| match source.raw_os_error() {
        Some(libc::EROFS | libc::EACCES | libc::EPERM) => FsError::Io {
            what: format!("data directory {dir} is not writable"),
            source,
        },
        _ => FsError::Io { what, source },
    }
}

impl Session {
    /// Reads how the last session ended (writes nothing: see [`Session::record`]).
    pub fn last<S: Storage>(storage: &S, layout: &Layout) -> FsResult<Session> {
        let path = layout.session();
        let current_boot = storage.boot_id();
        let text = crate::storage::read_file(storage, &path)
            .map_err(super::io_error(format!("reading {}", path.display())))?;
        let last_stop = match text {
            None => LastStop::Clean,
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let previous_boot = text
                    .lines()
                    .find_map(|l| l.strip_prefix("boot_id="))
                    .unwrap_or_default()
                    .trim();
                if previous_boot == current_boot && !current_boot.is_empty() {
                    LastStop::DaemonCrash
                } else {
                    LastStop::HostCrash
                }
            }
        };
        Ok(Session {
            layout: layout.clone(),
            last_stop,
        })
    }

    /// Marks the directory as in use by this session, durably.
    pub fn record<S: Storage>(&self, storage: &S) -> FsResult<()> {
        let path = self.layout.session();
        let text = format!(
            "pid={}\nboot_id={}\n",
            std::process::id(),
            storage.boot_id()
        );
        publish_file(storage, &path, text.as_bytes()).map_err(data_dir_io_error(
            &self.layout,
            format!("writing {}", path.display()),
        ))
    }

    /// Records a clean stop.
    pub fn end<S: Storage>(&self, storage: &S) {
        let path = self.layout.session();
        if let Err(e) = storage
            .remove_file(&path)
            .and_then(|()| storage.sync_dir(self.layout.root()))
        {
            warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Repairs after an abrupt stop: after a host crash every volume's next snapshot
/// compares all blocks; leaked chunk space is reclaimed either way.
pub fn after_crash<S: Storage>(
    session: &Session,
    ns: &Namespace,
    store: &ChunkStore<S>,
) -> FsResult<()> {
    match session.last_stop {
        LastStop::Clean => return Ok(()),
        LastStop::DaemonCrash => warn!("the previous session did not stop cleanly; recovering"),
        LastStop::HostCrash => {
            warn!(
                "the host crashed during the previous session: next snapshots compare every block"
            );
            let guard = ns.lock();
            ns.change(&guard, |c| -> FsResult<()> {
                let volumes: Vec<_> = c.records().volumes.values().cloned().collect();
                for mut volume in volumes {
                    volume.full_compare = true;
                    c.put_volume(volume)?;
                }
                Ok(())
            })?;
        }
    }
    let punched = store.reclaim_unreferenced(ns)?;
    if punched > 0 {
        info!("reclaimed {punched} bytes of unreferenced chunk space");
    }
    Ok(())
}
