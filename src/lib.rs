//! ebsfs: EBS-style block volumes and snapshots as plain files, over FUSE.
//!
//! Data flows one way: [`fuse`] (the thin kernel adapter) → [`fs`] (namespace and
//! control files, no FUSE types) → [`volume`] (live data, dirty tracking, freezes) and
//! [`snapshot`] (capture, manifests, deletion) → [`store`] (content-addressed chunks)
//! and [`meta`] (the metadata database).

pub mod catalog;
pub mod cli;
pub mod config;
pub mod fs;
pub mod fuse;
pub mod meta;
pub mod names;
pub mod snapshot;
pub mod store;
pub mod volume;
