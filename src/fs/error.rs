//! [`FsError`]: every failure the filesystem reports, and its one errno mapping.
//!
//! Subsystem errors convert into an `FsError` that keeps their message (for the log
//! line) and picks the errno a user's tool will see. I/O errors keep the errno the
//! kernel gave us (so a full data disk is `ENOSPC`, not `EIO`).

use std::io;

use crate::layout::FormatError;
use crate::names::NameError;
use crate::namespace::NamespaceError;
use crate::snapshot::SnapshotError;
use crate::store::StoreError;
use crate::volume::VolumeError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    NotPermitted(String),
    #[error("permission denied: {0}")]
    AccessDenied(String),
    #[error("{0} is read-only")]
    ReadOnly(String),
    #[error("{0} is a directory")]
    IsDir(String),
    #[error("{0} is not a directory")]
    NotDir(String),
    #[error("{0} is busy")]
    Busy(String),
    #[error("{0}")]
    Again(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no attribute {0}")]
    NoAttribute(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("attribute value does not fit the buffer")]
    Range,
    #[error("{0}")]
    PastEnd(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    TooBig(String),
    /// A volume whose files are missing or damaged: served as damaged until repaired.
    #[error("volume {name} is damaged ({reason}); run `ebsfs check` on the data directory")]
    Damaged { name: String, reason: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The snapshot store (bucket) failed or refused.
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("data directory {data_dir} is in use by another ebsfs ({holder})")]
    DataDirInUse { data_dir: String, holder: String },
    /// The data directory holds data but its metadata database is gone or empty.
    #[error(
        "{data_dir}: the metadata database ebsfs.redb is {state}, but the directory holds \
         volume data or snapshot chunks: refusing to start as if it were empty. \
         Run `ebsfs check --repair {data_dir}` to rebuild what can be rebuilt"
    )]
    DatabaseLost { data_dir: String, state: String },
}

pub type FsResult<T> = Result<T, FsError>;

fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound(_) => libc::ENOENT,
            FsError::Exists(_) => libc::EEXIST,
            FsError::Name(NameError::TooLong(_)) => libc::ENAMETOOLONG,
            FsError::Name(_) => libc::EINVAL,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::AccessDenied(_) => libc::EACCES,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::IsDir(_) => libc::EISDIR,
            FsError::NotDir(_) => libc::ENOTDIR,
            FsError::Busy(_) => libc::EBUSY,
            FsError::Again(_) => libc::EAGAIN,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoAttribute(_) => libc::ENODATA,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::Range => libc::ERANGE,
            FsError::PastEnd(_) => libc::ENXIO,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::TooBig(_) => libc::E2BIG,
            FsError::Damaged { .. } => libc::EIO,
            FsError::Volume(e) => volume_errno(e),
            FsError::Snapshot(e) => match e {
                SnapshotError::Exists(_) | SnapshotError::InBin(_) => libc::EEXIST,
                SnapshotError::NotFound(_) | SnapshotError::NoVolume(_) => libc::ENOENT,
                SnapshotError::Busy(_) => libc::EBUSY,
                SnapshotError::Locked { .. } => libc::EPERM,
                SnapshotError::NotReady(_) => libc::EAGAIN,
                SnapshotError::Cancelled => libc::ECANCELED,
                SnapshotError::Volume(v) => volume_errno(v),
                SnapshotError::Io { source, .. } => io_errno(source),
                SnapshotError::Store(s) => store_errno(s),
                SnapshotError::CaptureFailed(_) | SnapshotError::Namespace(_) => libc::EIO,
            },
            FsError::Store(s) => store_errno(s),
            FsError::Namespace(_) | FsError::Format(_) | FsError::DatabaseLost { .. } => libc::EIO,
            FsError::Io { source, .. } => io_errno(source),
            FsError::DataDirInUse { .. } => libc::EBUSY,
            FsError::Remote(_) => libc::EIO,
        }
    }

    /// Failures users cause in normal use (a name that does not exist, `SEEK_DATA`
    /// at the end of a file) are not worth a warning in the log; everything else is.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            FsError::NotFound(_) | FsError::NoAttribute(_) | FsError::PastEnd(_)
        )
    }
}

fn store_errno(e: &StoreError) -> i32 {
    match e {
        // Damage reads as EIO, whatever the underlying error (a pack cut short says
        // "unexpected end of file", which has no errno of its own).
        StoreError::Io { source, .. } if source.kind() != io::ErrorKind::UnexpectedEof => {
            io_errno(source)
        }
        _ => libc::EIO,
    }
}

fn volume_errno(e: &VolumeError) -> i32 {
    match e {
        VolumeError::Io { source, .. } => io_errno(source),
        VolumeError::TooLarge { .. } => libc::EFBIG,
        VolumeError::CaptureInProgress { .. } => libc::EBUSY,
        VolumeError::UnsupportedMode { .. } => libc::EOPNOTSUPP,
        VolumeError::DataMissing { .. } | VolumeError::DirtyMap { .. } => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::VolumeId;

    #[test]
    fn io_errors_keep_their_errno() {
        let full = FsError::Volume(VolumeError::Io {
            volume: VolumeId(1),
            op: "write",
            offset: 0,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(full.errno(), libc::ENOSPC);
        let nested = FsError::Snapshot(SnapshotError::Volume(VolumeError::TooLarge {
            volume: VolumeId(1),
            requested: 2,
            max: 1,
        }));
        assert_eq!(nested.errno(), libc::EFBIG);
        let cut_short = FsError::Store(StoreError::Io {
            path: "pack".into(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "short"),
        });
        assert_eq!(cut_short.errno(), libc::EIO);
    }

    #[test]
    fn names_map_to_einval_or_enametoolong() {
        assert_eq!(
            FsError::Name(NameError::TooLong("x".into())).errno(),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            FsError::Name(NameError::Invalid("..".into())).errno(),
            libc::EINVAL
        );
        assert_eq!(FsError::Name(NameError::NotUtf8).errno(), libc::EINVAL);
    }

    #[test]
    fn seeking_past_the_end_is_enxio_and_routine() {
        let past_end = FsError::PastEnd("offset 10 is past the end (5)".into());
        assert_eq!(past_end.errno(), libc::ENXIO);
        assert!(past_end.is_routine());
        let other_io = FsError::Volume(VolumeError::Io {
            volume: VolumeId(1),
            op: "seek",
            offset: 0,
            source: io::Error::from_raw_os_error(libc::EIO),
        });
        assert!(!other_io.is_routine());
    }
}
