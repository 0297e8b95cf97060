//! Command line: `ebsfs mount`, `ebsfs snapshot …`, `ebsfs volume …`, `ebsfs check`,
//! `ebsfs scrub`, `ebsfs bucket gc`, `ebsfs policy list`, `ebsfs recycle-bin …`, and the `mount -t fuse.ebsfs` helper form
//! (`ebsfs DATA_DIR MOUNTPOINT -o OPTIONS`).
//!
//! `snapshot` (with `send` and `receive`), `volume` and `scrub` are thin layers over the mounted filesystem:
//! anything they do can be done with `mkdir`, `cat`, `rmdir`, `cp` and `dd`. `check`
//! works on a stopped data directory through [`crate::check`], and reads the snapshot
//! store's bucket (if configured) through [`crate::check::bucket`]; `bucket gc` runs
//! one collection of that bucket ([`crate::remote::gc`]).

pub mod bucket;
pub mod check;
pub mod mount;
pub mod policy;
pub mod recycle_bin;
pub mod scrub;
pub mod send;
pub mod snapshot;
pub mod volume;

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
    /// Create volumes (also from snapshots, instantly) and list them.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Verify a stopped data directory (every chunk's hash, every reference, every
    /// file) and, with --repair, fix what is safe to fix; with a [store], also verify
    /// the snapshot store's bucket (read only).
    Check(check::CheckArgs),
    /// Read every snapshot image of a mounted ebsfs in full, verifying every chunk.
    Scrub(scrub::ScrubArgs),
    /// The snapshot store's bucket ([store] in the config): garbage collection.
    #[command(subcommand)]
    Bucket(bucket::BucketCommand),
    /// Scheduled snapshots ([[policy]] in the config): next runs and what they prune.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Deleted snapshots kept for a while (recycle_bin in the config): list, restore,
    /// purge.
    #[command(subcommand, name = "recycle-bin")]
    RecycleBin(recycle_bin::BinCommand),
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

    /// The mount, checked to be an ebsfs mount.
    pub fn resolve_mount(&self) -> Result<PathBuf, String> {
        let mnt = self.resolve()?;
        if !mnt.join("snapshots").is_dir() {
            return Err(format!(
                "{} is not an ebsfs mount (no snapshots/ directory); pass --mount DIR",
                mnt.display()
            ));
        }
        Ok(mnt)
    }
}

/// Runs the command line; returns the process exit code.
pub fn run(args: Vec<OsString>) -> i32 {
    if let Some(helper) = mount::HelperArgs::detect(&args) {
        return mount::run_helper(helper);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return usage_exit_code(&e, &args);
        }
    };
    match cli.command {
        Command::Mount(args) => mount::run(args),
        Command::Snapshot(cmd) => snapshot::run(cmd),
        Command::Volume(cmd) => volume::run(cmd),
        Command::Check(args) => check::run(args),
        Command::Scrub(args) => scrub::run(args),
        Command::Bucket(cmd) => bucket::run(cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::RecycleBin(cmd) => recycle_bin::run(cmd),
    }
}

/// `--help` and `--version` exit 0; usage errors 2, except for `check` and `scrub`,
/// whose 2 means corruption: theirs exit 1, like every failure to run.
fn usage_exit_code(e: &clap::Error, args: &[OsString]) -> i32 {
    if !e.use_stderr() {
        return 0;
    }
    match args.get(1).and_then(|a| a.to_str()) {
        Some("check" | "scrub") => crate::check::EXIT_ERROR,
        _ => 2,
    }
}

/// Logs to stderr (or `target`), filtered by `RUST_LOG`, else by `default_filter`.
pub(crate) fn init_logging(default_filter: &str, target: Option<std::fs::File>) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    if let Some(file) = target {
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    let _ = builder.try_init();
}
