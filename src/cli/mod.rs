//! Command line: `ebsfs mount`, `ebsfs snapshot …`, and the `mount -t fuse.ebsfs`
//! helper form (`ebsfs DATA_DIR MOUNTPOINT -o OPTIONS`).
//!
//! Every subcommand but `mount` is a thin layer over the mounted filesystem: anything
//! it does can be done with `mkdir`, `cat` and `rmdir`.

pub mod mount;
pub mod snapshot;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "ebsfs",
    version,
    about = "EBS-style block volumes and snapshots as plain files, over FUSE"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount the filesystem (in the foreground; Ctrl-C or SIGTERM unmounts).
    Mount(mount::MountArgs),
    /// Create, list, wait for and delete snapshots of a mounted ebsfs.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

/// Where to find the mount: `--mount DIR`, else the config's mountpoint.
#[derive(clap::Args, Debug, Clone)]
pub struct MountLocation {
    /// The ebsfs mount point (default: `mountpoint` from the config).
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    /// Config file to take the mount point from (default: ./config.toml if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl MountLocation {
    pub fn resolve(&self) -> Result<PathBuf, String> {
        if let Some(dir) = &self.mount {
            return Ok(dir.clone());
        }
        Settings::discover(self.config.as_deref())
            .map(|s| s.mountpoint)
            .map_err(|e| e.to_string())
    }
}

/// Runs the command line; returns the process exit code.
pub fn run(args: Vec<OsString>) -> i32 {
    if let Some(helper) = mount::HelperArgs::detect(&args) {
        return mount::run_helper(helper);
    }
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Mount(args) => mount::run(args),
        Command::Snapshot(cmd) => snapshot::run(cmd),
    }
}
