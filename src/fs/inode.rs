//! Inode numbers: derived from volume and snapshot ids, which are never reused, so an
//! inode number always means the same object and needs no table or generation.
//!
//! Layout: the top 8 bits are the node kind, the low 56 bits the object id.

use crate::namespace::{SnapshotId, VolumeId};

pub const ROOT: u64 = 1;
pub const VOLUMES_DIR: u64 = 2;
pub const SNAPSHOTS_DIR: u64 = 3;
pub const RECYCLE_BIN_DIR: u64 = 4;

/// The recycle bin's name at the top of the mount.
pub const RECYCLE_BIN: &str = "recycle-bin";

const KIND_SHIFT: u32 = 56;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// The files inside every `snapshots/<name>/` directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotFile {
    Status,
    Progress,
    Image,
    Info,
    /// Byte ranges that differ from the parent snapshot.
    Changed,
}

impl SnapshotFile {
    pub const ALL: [SnapshotFile; 5] = [
        SnapshotFile::Status,
        SnapshotFile::Progress,
        SnapshotFile::Image,
        SnapshotFile::Info,
        SnapshotFile::Changed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SnapshotFile::Status => "status",
            SnapshotFile::Progress => "progress",
            SnapshotFile::Image => "volume.img",
            SnapshotFile::Info => "info",
            SnapshotFile::Changed => "changed",
        }
    }

    pub fn from_name(name: &str) -> Option<SnapshotFile> {
        SnapshotFile::ALL.into_iter().find(|f| f.name() == name)
    }

    fn kind(self) -> u64 {
        match self {
            SnapshotFile::Status => 3,
            SnapshotFile::Progress => 4,
            SnapshotFile::Image => 5,
            SnapshotFile::Info => 6,
            SnapshotFile::Changed => 7,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Root,
    VolumesDir,
    SnapshotsDir,
    /// `recycle-bin/`: deleted snapshots kept for a while (a [`Node::SnapshotDir`]
    /// each, under the same inode number as before: a snapshot is in one place at a
    /// time).
    RecycleBinDir,
    Volume(VolumeId),
    SnapshotDir(SnapshotId),
    SnapshotFile(SnapshotId, SnapshotFile),
}

impl Node {
    pub fn ino(self) -> u64 {
        let tagged = |kind: u64, id: u64| (kind << KIND_SHIFT) | (id & ID_MASK);
        match self {
            Node::Root => ROOT,
            Node::VolumesDir => VOLUMES_DIR,
            Node::SnapshotsDir => SNAPSHOTS_DIR,
            Node::RecycleBinDir => RECYCLE_BIN_DIR,
            Node::Volume(id) => tagged(1, id.0),
            Node::SnapshotDir(id) => tagged(2, id.0),
            Node::SnapshotFile(id, file) => tagged(file.kind(), id.0),
        }
    }

    pub fn from_ino(ino: u64) -> Option<Node> {
        let (kind, id) = (ino >> KIND_SHIFT, ino & ID_MASK);
        Some(match (kind, ino) {
            (0, ROOT) => Node::Root,
            (0, VOLUMES_DIR) => Node::VolumesDir,
            (0, SNAPSHOTS_DIR) => Node::SnapshotsDir,
            (0, RECYCLE_BIN_DIR) => Node::RecycleBinDir,
            (1, _) => Node::Volume(VolumeId(id)),
            (2, _) => Node::SnapshotDir(SnapshotId(id)),
            _ => Node::SnapshotFile(
                SnapshotId(id),
                SnapshotFile::ALL.into_iter().find(|f| f.kind() == kind)?,
            ),
        })
    }

    pub fn is_dir(self) -> bool {
        matches!(
            self,
            Node::Root
                | Node::VolumesDir
                | Node::SnapshotsDir
                | Node::RecycleBinDir
                | Node::SnapshotDir(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        let nodes = [
            Node::Root,
            Node::VolumesDir,
            Node::SnapshotsDir,
            Node::RecycleBinDir,
            Node::Volume(VolumeId(1)),
            Node::Volume(VolumeId(ID_MASK)),
            Node::SnapshotDir(SnapshotId(7)),
            Node::SnapshotFile(SnapshotId(7), SnapshotFile::Status),
            Node::SnapshotFile(SnapshotId(7), SnapshotFile::Image),
            Node::SnapshotFile(SnapshotId(9), SnapshotFile::Info),
            Node::SnapshotFile(SnapshotId(9), SnapshotFile::Progress),
            Node::SnapshotFile(SnapshotId(9), SnapshotFile::Changed),
        ];
        for node in nodes {
            assert_eq!(Node::from_ino(node.ino()), Some(node));
        }
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(99 << KIND_SHIFT), None);
    }
}
