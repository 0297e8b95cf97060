//! `ebsfs check`: verifies a stopped data directory and repairs what is safe to repair.
//!
//! What is verified, in order: the format marker and the metadata database; every
//! volume's files; every pack (header, length against its committed length) and
//! every chunk (read from its pack, decoded, its hash checked); every manifest entry
//! (its snapshot exists, its chunk row exists), every reference count (equal to the
//! entries naming the chunk) and the `snapshot_blocks` index; then pack space and
//! files nothing accounts for.
//!
//! Every problem is *corruption* (data lost or damaged, or bound to be) or a *leak*
//! (space, files or metadata that can go without touching anything a snapshot or a
//! volume needs). Repairs keep three promises:
//! - what any existing snapshot reads stays exactly as it was (an entry of a snapshot
//!   that no longer exists but that a later snapshot still reads moves to that one);
//! - no file is deleted: doubtful ones move to `lost+found/`;
//! - afterwards the directory mounts, and a second check finds no leaks.
//!
//! The module is generic over [`Storage`], so it runs on memory in unit tests. It
//! holds the data directory's lock throughout: a running daemon makes it refuse.
//!
//! With a snapshot store configured, [`bucket`] checks the bucket too: it only reads
//! it, so it runs beside mounted hosts, and its problems are reported, never repaired.

pub mod bucket;
mod chunks;
mod files;
mod rebuild;
mod references;
mod report;
pub mod scrub;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;

use crate::layout::{ClaimError, FormatError, Layout};
use crate::namespace::{Namespace, NamespaceError};
use crate::storage::Storage;
pub use report::{
    EXIT_CLEAN, EXIT_CORRUPTION, EXIT_ERROR, EXIT_LEAKS, Outcome, Problem, Report, Severity,
    Totals, counted,
};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error(
        "data directory {dir} is in use by a running ebsfs ({holder}): `ebsfs check` works \
         on a stopped filesystem only; to verify a mounted one, run `ebsfs scrub --mount \
         MOUNTPOINT`"
    )]
    InUse { dir: String, holder: String },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The snapshot store could not be checked: unreachable, credentials refused, a
    /// wrong key, a newer format, or a request failing after its retries.
    #[error(transparent)]
    Store(crate::remote::RemoteError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckError {
    let what = what.into();
    move |source| CheckError::Io { what, source }
}

/// What one run of the check works with.
struct Checker<'a, S: Storage> {
    storage: &'a S,
    layout: &'a Layout,
    repair: bool,
    report: Report,
}

impl<S: Storage> Checker<'_, S> {
    fn push(&mut self, problem: Problem) {
        self.report.problems.push(problem);
    }

    fn note(&mut self, note: impl Into<String>) {
        self.report.notes.push(note.into());
    }

    /// Runs `fix` when repairing; its `Ok` says what it did.
    fn fix<E: fmt::Display>(&self, fix: impl FnOnce() -> Result<String, E>) -> Option<Outcome> {
        self.repair.then(|| match fix() {
            Ok(done) => Outcome::Repaired(done),
            Err(e) => Outcome::Failed(e.to_string()),
        })
    }

    /// When repairing: why this is left as it is.
    fn cannot_fix(&self, why: impl Into<String>) -> Option<Outcome> {
        self.repair.then(|| Outcome::NotRepaired(why.into()))
    }

    /// `path` relative to the data directory, for messages.
    fn shown(&self, path: &Path) -> String {
        path.strip_prefix(self.layout.root())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Moves `path` to `lost+found/`; says where it went.
    fn to_lost_found(&self, path: &Path, reason: &str) -> std::io::Result<String> {
        let moved = self.layout.move_to_lost_found(self.storage, path, reason)?;
        Ok(format!("moved to {}", self.shown(&moved)))
    }
}

/// What became of the metadata database.
enum Database {
    Open(Namespace),
    /// None, and no data to lose: a mount starts a new one.
    Fresh,
    /// Missing or damaged while data exists; `rebuilt` when a repair made a new one.
    Lost {
        rebuilt: bool,
    },
}

/// The state of the format marker.
enum Marker {
    Present,
    Missing,
    Damaged(String),
}

/// Checks the data directory at `layout` (and repairs it when `repair`). Takes the
/// directory's lock for the whole run: a running daemon makes it fail with
/// [`CheckError::InUse`].
pub fn check_data_dir<S: Storage>(
    storage: &S,
    layout: &Layout,
    repair: bool,
) -> Result<Report, CheckError> {
    let dir = layout.root().display().to_string();
    if !storage.is_dir(layout.root()) {
        return Err(CheckError::NotADirectory(dir));
    }
    let _lock = layout.claim(storage).map_err(|e| match e {
        ClaimError::InUse { holder } => CheckError::InUse {
            dir: dir.clone(),
            holder,
        },
        ClaimError::Io(source) => CheckError::Io {
            what: format!("locking {}", layout.lock_file().display()),
            source,
        },
    })?;
    let mut checker = Checker {
        storage,
        layout,
        repair,
        report: Report {
            data_dir: layout.root().to_path_buf(),
            repair,
            totals: Totals::default(),
            notes: Vec::new(),
            problems: Vec::new(),
        },
    };
    let marker = match layout.read_format(storage) {
        Ok(Some(_)) => Marker::Present,
        Ok(None) => Marker::Missing,
        Err(FormatError::BadMarker { reason, .. }) => Marker::Damaged(reason),
        Err(e) => return Err(e.into()),
    };
    let found = layout
        .ebsfs_files(storage)
        .map_err(io_error(format!("listing {dir}")))?;
    if matches!(marker, Marker::Missing) && found.is_empty() {
        checker.note("no ebsfs files: the directory is empty (a mount initialises it)");
        return Ok(checker.report);
    }
    let ns = match checker.open_database()? {
        Database::Open(ns) => ns,
        Database::Fresh => {
            checker.check_marker(&marker, true);
            return Ok(checker.report);
        }
        Database::Lost { rebuilt } => {
            checker.check_marker(&marker, rebuilt);
            return Ok(checker.report);
        }
    };
    checker.check_marker(&marker, true);
    checker.check_records(&ns)?;
    let mut packs = checker.inspect_packs(&ns)?;
    let chunk_scan = checker.verify_chunks(&ns, &packs)?;
    let references = checker.check_references(&ns, &chunk_scan)?;
    checker.report_damaged_chunks(&ns, &mut packs, &chunk_scan, &references);
    checker.check_pack_space(&ns, &packs, &chunk_scan)?;
    checker.check_orphans(&ns)?;
    Ok(checker.report)
}

impl<S: Storage> Checker<'_, S> {
    /// Opens the metadata database. A lost one (missing, empty or not a database) is
    /// reported, and rebuilt when repairing.
    fn open_database(&mut self) -> Result<Database, CheckError> {
        let path = self.layout.database();
        let len = self
            .storage
            .file_len(&path)
            .map_err(io_error(format!("reading {}", path.display())))?;
        let state = match Namespace::open(self.storage, &path, false) {
            Ok(ns) => return Ok(Database::Open(ns)),
            Err(NamespaceError::Missing) => match len {
                None => "missing".to_string(),
                Some(0) => "empty".to_string(),
                Some(_) => "a database with no tables".to_string(),
            },
            Err(e) if database_damaged(&e) => format!("damaged ({e})"),
            Err(e @ NamespaceError::Corrupt { .. }) => {
                // A valid database with a record that does not decode: rebuilding would
                // throw away every snapshot for one record, so that is left to the user.
                let problem = Problem::new(
                    Severity::Corruption,
                    "metadata database ebsfs.redb",
                    format!("{e}: a mount refuses the directory"),
                )
                .with(self.cannot_fix(
                    "a damaged record is not rebuilt automatically; moving ebsfs.redb aside \
                     and running `ebsfs check --repair` again recovers the volumes (not the \
                     snapshots)",
                ));
                self.push(problem);
                return Ok(Database::Lost { rebuilt: false });
            }
            Err(e) => return Err(e.into()),
        };
        let has_data = self
            .layout
            .has_data_files(self.storage)
            .map_err(io_error("listing the data directory"))?;
        if len.unwrap_or(0) == 0 && !has_data {
            self.note(format!(
                "the metadata database is {state}, and no volume data or chunks exist: \
                 a mount starts a new one"
            ));
            return Ok(Database::Fresh);
        }
        let rebuilt = self.rebuild_database(&state)?;
        Ok(Database::Lost { rebuilt })
    }

    /// A missing or damaged format marker is written anew when repairing, provided the
    /// database is (now) valid: `database_valid`.
    fn check_marker(&mut self, marker: &Marker, database_valid: bool) {
        let detail = match marker {
            Marker::Present => return,
            Marker::Missing => "missing: a mount refuses the directory".to_string(),
            Marker::Damaged(reason) => format!("damaged ({reason}): a mount refuses the directory"),
        };
        let path = self.layout.marker();
        let outcome = if database_valid {
            self.fix(|| -> std::io::Result<String> {
                let mut done = String::new();
                if matches!(marker, Marker::Damaged(_)) {
                    done = format!("{}; ", self.to_lost_found(&path, "damaged format marker")?);
                }
                self.layout.write_marker(self.storage)?;
                Ok(format!("{done}written anew"))
            })
        } else {
            self.cannot_fix("the metadata database is not valid")
        };
        self.push(
            Problem::new(Severity::Corruption, "format marker ebsfs.format", detail).with(outcome),
        );
    }
}

/// Whether opening the database failed because the file is not a (valid) ebsfs
/// database, as opposed to an I/O error or a newer schema.
fn database_damaged(e: &NamespaceError) -> bool {
    match e {
        NamespaceError::Unversioned => true,
        NamespaceError::Db(redb::Error::Corrupted(_)) => true,
        NamespaceError::Db(redb::Error::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}
