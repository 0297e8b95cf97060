//! [`FsError`]: every failure the filesystem reports, and its one errno mapping.
//!
//! Subsystem errors convert into an `FsError` that keeps their message (for the log
//! line) and picks the errno a user's tool will see. I/O errors keep the errno the
//! kernel gave us (so a full data disk is `ENOSPC`, not `EIO`).

use std::io;

use crate::meta::MetaError;
use crate::names::NameError;
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
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
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
            FsError::Volume(e) => volume_errno(e),
            FsError::Snapshot(e) => match e {
                SnapshotError::Exists(_) => libc::EEXIST,
                SnapshotError::NotFound(_) | SnapshotError::NoVolume(_) => libc::ENOENT,
                SnapshotError::Busy(_) => libc::EBUSY,
                SnapshotError::NotReady(_) => libc::EAGAIN,
                SnapshotError::Cancelled => libc::ECANCELED,
                SnapshotError::Volume(v) => volume_errno(v),
                SnapshotError::Io { source, .. } => io_errno(source),
                SnapshotError::Store(StoreError::Io { source, .. }) => io_errno(source),
                SnapshotError::CaptureFailed(_)
                | SnapshotError::Meta(_)
                | SnapshotError::Store(_) => libc::EIO,
            },
            FsError::Store(StoreError::Io { source, .. }) => io_errno(source),
            FsError::Meta(_) | FsError::Store(_) => libc::EIO,
            FsError::Io { source, .. } => io_errno(source),
        }
    }

    /// Failures users cause in normal use (a name that does not exist) are not worth
    /// a warning in the log; everything else is.
    pub fn is_routine(&self) -> bool {
        matches!(self, FsError::NotFound(_) | FsError::NoAttribute(_))
    }
}

fn volume_errno(e: &VolumeError) -> i32 {
    match e {
        VolumeError::Io { source, .. } => io_errno(source),
        VolumeError::TooLarge { .. } => libc::EFBIG,
        VolumeError::CaptureInProgress { .. } => libc::EBUSY,
        VolumeError::UnsupportedMode { .. } => libc::EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_their_errno() {
        let full = FsError::Volume(VolumeError::Io {
            volume: 1,
            op: "write",
            offset: 0,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(full.errno(), libc::ENOSPC);
        let nested = FsError::Snapshot(SnapshotError::Volume(VolumeError::TooLarge {
            volume: 1,
            requested: 2,
            max: 1,
        }));
        assert_eq!(nested.errno(), libc::EFBIG);
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
}
