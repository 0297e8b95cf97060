//! `ebsfs check [DATA_DIR]`: prints the report of [`crate::check`] on the data
//! directory, then, when the config has a `[store]`, the report of
//! [`crate::check::bucket`] on the bucket, and exits with the worse status of the two.

use std::path::PathBuf;

use crate::check::bucket::{self, BucketReport, Opened};
use crate::check::{
    CheckError, EXIT_CLEAN, EXIT_CORRUPTION, EXIT_ERROR, EXIT_LEAKS, Report, check_data_dir,
};
use crate::config::{Settings, StoreSettings};
use crate::layout::Layout;
use crate::storage::linux::LinuxStorage;

const AFTER_HELP: &str = "\
Exit status:
  0  no problems (with --repair: none left)
  1  the check could not run: the directory is in use by a running ebsfs (use
     `ebsfs scrub` on a mounted filesystem, and --bucket-only for the bucket),
     unreadable, the bucket unreachable, its credentials refused, the wrong key,
     or a usage error
  2  corruption: data lost or damaged (a chunk failing its hash, a missing or
     truncated pack, a manifest entry naming a missing chunk, a reference count
     below its entries, a volume's missing data file, a damaged dirty map, a lost
     database, a missing format marker; in the bucket: a damaged snapshot root, a
     missing or damaged page, a missing or short pack, a chunk failing
     verification (the first of each pack; with --deep, every one), a live
     snapshot's missing metadata, a damaged lease); leaks may be present too
  3  leaks only: space or files that can be reclaimed without touching anything a
     snapshot or volume needs (unreferenced pack ranges, uncommitted pack tails,
     reference counts above their entries, entries of snapshots that no longer
     exist, orphan files; in the bucket: tombstones and metadata whose snapshot is
     gone)
With a [store], the worse of the data directory's and the bucket's status is the
exit status (corruption, then could not run, then leaks).

--repair fixes what is safe and never deletes what a snapshot or volume may need:
it punches unreferenced pack ranges, cuts uncommitted pack tails, sets reference
counts to their entries, moves entries of deleted snapshots to the snapshot that
still reads them (or drops them), moves orphan files to lost+found/, replaces a
damaged dirty map by an empty one (the volume's next snapshot compares every
block), and rebuilds a lost database with every volume data file as volume
recovered-<id> (snapshots cannot be recovered without it; their packs move to
lost+found/). Damaged or lost chunks cannot be repaired and stay reported.

The bucket is only read, never changed, with --repair too: its problems are
reported with the snapshots they make unreadable. Objects no snapshot needs any
more are garbage, listed as notes: a collection removes them once they are older
than gc_grace_seconds (`ebsfs bucket gc` runs one now).";

#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct CheckArgs {
    /// Data directory of a stopped ebsfs (default: data_dir from the config).
    data_dir: Option<PathBuf>,
    /// Fix what is safe to fix in the data directory, and print what each repair did
    /// (the bucket is never changed).
    #[arg(long)]
    repair: bool,
    /// Config file: its data_dir, and its [store], whose bucket is checked too
    /// (default: ./config.toml if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Read and verify every chunk in the bucket, not only the first of each pack (the
    /// data directory's chunks are always all read).
    #[arg(long)]
    deep: bool,
    /// Check the bucket of the config's [store] only, not the data directory: runs
    /// while ebsfs is mounted.
    #[arg(long, conflicts_with_all = ["data_dir", "repair", "no_bucket"])]
    bucket_only: bool,
    /// Check the data directory only, not the bucket.
    #[arg(long, conflicts_with = "deep")]
    no_bucket: bool,
}

pub fn run(args: CheckArgs) -> i32 {
    super::init_logging("error", None);
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("ebsfs check: {message}");
            return EXIT_ERROR;
        }
    };
    let mut codes = Vec::new();
    if !args.bucket_only {
        let data_dir = match (&args.data_dir, &settings) {
            (Some(dir), _) => dir.clone(),
            (None, Some(settings)) => settings.data_dir.clone(),
            (None, None) => unreachable!("settings are loaded when no DATA_DIR is given"),
        };
        codes.push(reported(
            check_data_dir(&LinuxStorage, &Layout::new(data_dir), args.repair),
            Report::exit_code,
        ));
    }
    let store = settings
        .as_ref()
        .and_then(|s| s.store.as_ref().map(|store| (store, s.host_id.as_str())));
    match store {
        Some(_) if args.no_bucket => {}
        Some((store, host)) => {
            if !args.bucket_only {
                println!();
            }
            codes.push(check_store(store, host, args.deep));
        }
        None if args.bucket_only || args.deep => {
            let config = args
                .config
                .as_ref()
                .map_or("the config".to_string(), |c| c.display().to_string());
            let flag = if args.bucket_only {
                "--bucket-only"
            } else {
                "--deep"
            };
            eprintln!(
                "ebsfs check: {flag} checks the snapshot store, but {config} has no [store] \
                 table (--config FILE names another)"
            );
            codes.push(EXIT_ERROR);
        }
        None => {}
    }
    worst_exit(&codes)
}

/// The config: `--config FILE`, else `./config.toml` if present, else the defaults.
/// With a DATA_DIR and no `--config`, an unreadable `./config.toml` only means that no
/// bucket is checked.
fn settings(args: &CheckArgs) -> Result<Option<Settings>, String> {
    match (&args.config, &args.data_dir) {
        (Some(path), _) => Settings::load(path).map(Some).map_err(|e| e.to_string()),
        (None, Some(_)) if !args.bucket_only => match Settings::discover(None) {
            Ok(settings) => Ok(Some(settings)),
            Err(e) => {
                eprintln!("ebsfs check: ignoring the config ({e}): the bucket is not checked");
                Ok(None)
            }
        },
        (None, _) => Settings::discover(None)
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// Checks the bucket; prints its report, returns its exit status.
fn check_store(settings: &StoreSettings, host: &str, deep: bool) -> i32 {
    let store = match bucket::connect(settings, host) {
        Ok(Opened::Store(store)) => store,
        Ok(Opened::Empty(report) | Opened::Unusable(report)) => {
            print!("{report}");
            return report.exit_code();
        }
        Err(e) => {
            eprintln!("ebsfs check: {e}");
            return EXIT_ERROR;
        }
    };
    reported(bucket::check_bucket(&store, deep), BucketReport::exit_code)
}

/// Prints a check's report and returns its exit status, or says why it could not run.
fn reported<R: std::fmt::Display>(
    result: Result<R, CheckError>,
    exit_code: impl FnOnce(&R) -> i32,
) -> i32 {
    match result {
        Ok(report) => {
            print!("{report}");
            exit_code(&report)
        }
        Err(e) => {
            eprintln!("ebsfs check: {e}");
            EXIT_ERROR
        }
    }
}

/// The exit status of several checks: corruption first, then a check that could not
/// run, then leaks.
fn worst_exit(codes: &[i32]) -> i32 {
    let rank = |code: i32| match code {
        EXIT_CLEAN => 0,
        EXIT_LEAKS => 1,
        EXIT_ERROR => 2,
        EXIT_CORRUPTION => 3,
        _ => 2,
    };
    codes
        .iter()
        .copied()
        .max_by_key(|&c| rank(c))
        .unwrap_or(EXIT_CLEAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<CheckArgs, clap::Error> {
        let mut argv = vec!["ebsfs", "check"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Check(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn check_takes_an_optional_data_dir_and_the_bucket_flags() {
        let args = parse(&["/data", "--repair"]).unwrap();
        assert_eq!(
            args.data_dir.as_deref(),
            Some(std::path::Path::new("/data"))
        );
        assert!(args.repair && !args.deep && !args.bucket_only && !args.no_bucket);
        let args = parse(&["--bucket-only", "--deep", "--config", "c.toml"]).unwrap();
        assert!(args.bucket_only && args.deep && args.data_dir.is_none());
        assert_eq!(args.config.as_deref(), Some(std::path::Path::new("c.toml")));
        assert!(parse(&[]).unwrap().data_dir.is_none());
        for refused in [
            &["--bucket-only", "/data"][..],
            &["--bucket-only", "--repair"],
            &["--bucket-only", "--no-bucket"],
            &["--no-bucket", "--deep"],
            &["/data", "/other"],
        ] {
            assert!(parse(refused).is_err(), "{refused:?} was accepted");
        }
    }

    #[test]
    fn usage_errors_of_check_exit_1_as_it_cannot_run() {
        let code = crate::cli::run(
            ["ebsfs", "check", "--bucket-only", "--repair"]
                .iter()
                .map(Into::into)
                .collect(),
        );
        assert_eq!(code, EXIT_ERROR);
    }

    #[test]
    fn the_worst_status_wins_corruption_first_then_failure_then_leaks() {
        assert_eq!(worst_exit(&[]), EXIT_CLEAN);
        assert_eq!(worst_exit(&[EXIT_CLEAN, EXIT_CLEAN]), EXIT_CLEAN);
        assert_eq!(worst_exit(&[EXIT_CLEAN, EXIT_LEAKS]), EXIT_LEAKS);
        assert_eq!(worst_exit(&[EXIT_LEAKS, EXIT_ERROR]), EXIT_ERROR);
        assert_eq!(worst_exit(&[EXIT_CORRUPTION, EXIT_ERROR]), EXIT_CORRUPTION);
        assert_eq!(worst_exit(&[EXIT_ERROR, EXIT_CORRUPTION]), EXIT_CORRUPTION);
        assert_eq!(worst_exit(&[EXIT_LEAKS, EXIT_CLEAN]), EXIT_LEAKS);
    }

    #[test]
    fn bucket_only_without_a_store_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "data_dir = \"./d\"\n").unwrap();
        let code = run(parse(&["--bucket-only", "--config", config.to_str().unwrap()]).unwrap());
        assert_eq!(code, EXIT_ERROR);
    }
}
