//! ebsfs: EBS-style block volumes and snapshots as plain files, over FUSE.
//!
//! Data flows one way: [`fuse`] (the thin kernel adapter) → [`fs`] (namespace and
//! control files, no FUSE types) → [`volume`] (live data, dirty tracking, freezes) and
//! [`snapshot`] (capture, manifests, deletion) → [`store`] (content-addressed chunks)
//! and [`namespace`] (the metadata database and the catalog). Every byte is kept
//! through a [`storage::Storage`]: the data directory on a mount, memory in tests.
//! [`layout`] names every file of the data directory; [`check`] verifies one offline;
//! [`policy`] decides when `[[policy]]` tables snapshot and what they delete.

pub mod check;
pub mod cli;
pub mod config;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod names;
pub mod namespace;
pub mod policy;
pub mod remote;
pub mod snapshot;
pub mod storage;
pub mod store;
pub mod sync;
pub mod volume;
