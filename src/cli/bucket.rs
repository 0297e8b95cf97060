//! `ebsfs bucket gc`: one garbage collection of the snapshot store, now
//! ([`crate::remote::gc::collect`]). The daemon collects on its own (hourly and after
//! deletions); this is for a host that is not mounted, or to see what a collection
//! would do (`--dry-run`).
//!
//! A collection renews the collecting host's lease and takes the server's time of that
//! write as its clock. Under the daemon's host id it would rewrite the daemon's lease
//! as read a moment before, and could drop what the daemon added since (a root it
//! began reading, an upload it began): this command collects as host `<host_id>.gc`,
//! a lease of its own that protects nothing and that nothing else writes, removed
//! when the collection is over.

use std::path::PathBuf;

use clap::Subcommand;

use crate::check::bucket::{self, Opened};
use crate::config::Settings;
use crate::remote::gc;

/// Exit status: the collection did not finish (deletions refused, or out of time).
const EXIT_UNFINISHED: i32 = 3;

const GC_AFTER_HELP: &str = "\
A collection removes what no snapshot, no host's lease and no capture in progress
can need any more: pages and packs no kept snapshot reaches, once older than
gc_grace_seconds, and deleted snapshots once their tombstone is older than that
and no host's lease names them. It is safe while other hosts upload, read and
collect (docs/FORMAT.md, section 6.1). It runs as host <host_id>.gc, with a lease
of its own (written even with --dry-run; it protects nothing, and is removed at the
end), so that it never rewrites the lease of this host's daemon.

Exit status:
  0  the collection ran to its end (with --dry-run: nothing deleted)
  1  it could not run, and deleted nothing: no [store] in the config, the bucket
     unreachable, its credentials refused, the wrong key, or a snapshot root, page
     or lease that cannot be read (`ebsfs check --bucket-only` says which)
  2  a usage error
  3  it stopped before its end: the bucket refused some deletions, or a quarter of
     lease_seconds had passed; run it again to go on";

#[derive(Subcommand, Debug)]
pub enum BucketCommand {
    /// Collect the snapshot store's garbage now: objects no snapshot, lease or upload
    /// in progress needs (the daemon also does this hourly and after deletions).
    #[command(after_help = GC_AFTER_HELP)]
    Gc {
        /// Delete nothing; print what a collection would delete.
        #[arg(long)]
        dry_run: bool,
        /// Config file with the [store] table and host_id (default: ./config.toml if
        /// present).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: BucketCommand) -> i32 {
    super::init_logging("warn", None);
    match cmd {
        BucketCommand::Gc { dry_run, config } => match collect(config, dry_run) {
            Ok(code) => code,
            Err(message) => {
                eprintln!("ebsfs bucket gc: {message}");
                crate::check::EXIT_ERROR
            }
        },
    }
}

/// The lease name a collection from the command line uses.
pub fn gc_host(host_id: &str) -> String {
    format!("{host_id}.gc")
}

fn collect(config: Option<PathBuf>, dry_run: bool) -> Result<i32, String> {
    let settings = Settings::discover(config.as_deref()).map_err(|e| e.to_string())?;
    let Some(store_settings) = &settings.store else {
        return Err(format!(
            "{} has no [store] table: there is no snapshot store to collect (--config FILE \
             names another config)",
            config.map_or("the config".to_string(), |c| c.display().to_string())
        ));
    };
    let host = gc_host(&settings.host_id);
    let store = match bucket::connect(store_settings, &host).map_err(|e| e.to_string())? {
        Opened::Store(store) => store,
        Opened::Empty(report) => {
            return Err(format!(
                "{}: no ebsfs store there (no object under the prefix): nothing to collect",
                report.store
            ));
        }
        Opened::Unusable(report) => {
            print!("{report}");
            return Err(format!(
                "{}: the store's format object cannot be read: nothing is collected",
                report.store
            ));
        }
    };
    println!(
        "snapshot store {}: {}collection as host {host}",
        store.bucket.shown,
        if dry_run { "dry-run " } else { "" }
    );
    let report = gc::collect(&store, dry_run);
    // Its lease protected nothing; it is not left behind.
    if let Err(e) = store.remove_lease() {
        eprintln!("ebsfs bucket gc: cannot remove the lease of host {host}: {e}");
    }
    let report = report.map_err(|e| {
        format!("{e}; nothing was deleted (`ebsfs check --bucket-only` lists what is damaged)")
    })?;
    println!("{report}");
    if report.failed > 0 || report.stopped_early {
        println!("the collection did not finish: run it again to go on");
        return Ok(EXIT_UNFINISHED);
    }
    Ok(crate::check::EXIT_CLEAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn bucket_gc_parses_and_collects_under_a_name_of_its_own() {
        let cli =
            Cli::try_parse_from(["ebsfs", "bucket", "gc", "--dry-run", "--config", "c"]).unwrap();
        match cli.command {
            Command::Bucket(BucketCommand::Gc { dry_run, config }) => {
                assert!(dry_run);
                assert_eq!(config, Some(PathBuf::from("c")));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["ebsfs", "bucket", "gc", "extra"]).is_err());
        assert!(Cli::try_parse_from(["ebsfs", "bucket"]).is_err());
        assert_eq!(gc_host("db-host-1"), "db-host-1.gc");
    }

    #[test]
    fn bucket_gc_without_a_store_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "data_dir = \"./d\"\n").unwrap();
        let err = collect(Some(config), true).unwrap_err();
        assert!(err.contains("no [store]"), "{err}");
    }
}
