//! `ebsfs check DATA_DIR [--repair]`: prints the report of [`crate::check`] and exits
//! with its status.

use std::path::PathBuf;

use crate::check::{EXIT_ERROR, check_data_dir};
use crate::layout::Layout;
use crate::storage::linux::LinuxStorage;

const AFTER_HELP: &str = "\
Exit status:
  0  no problems (with --repair: none left)
  1  the check could not run: the directory is in use by a running ebsfs (use
     `ebsfs scrub` on a mounted filesystem), unreadable, or a usage error
  2  corruption: data lost or damaged (a chunk failing its hash, a missing or
     truncated pack, a manifest entry naming a missing chunk, a reference count
     below its entries, a volume's missing data file, a damaged dirty map, a lost
     database, a missing format marker); leaks may be present too
  3  leaks only: space or files that can be reclaimed without touching anything a
     snapshot or volume needs (unreferenced pack ranges, uncommitted pack tails,
     reference counts above their entries, entries of snapshots that no longer
     exist, orphan files)

--repair fixes what is safe and never deletes what a snapshot or volume may need:
it punches unreferenced pack ranges, cuts uncommitted pack tails, sets reference
counts to their entries, moves entries of deleted snapshots to the snapshot that
still reads them (or drops them), moves orphan files to lost+found/, replaces a
damaged dirty map by an empty one (the volume's next snapshot compares every
block), and rebuilds a lost database with every volume data file as volume
recovered-<id> (snapshots cannot be recovered without it; their packs move to
lost+found/). Damaged or lost chunks cannot be repaired and stay reported.";

#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct CheckArgs {
    /// Data directory of a stopped ebsfs.
    data_dir: PathBuf,
    /// Fix what is safe to fix, and print what each repair did.
    #[arg(long)]
    repair: bool,
}

pub fn run(args: CheckArgs) -> i32 {
    super::init_logging("error", None);
    match check_data_dir(&LinuxStorage, &Layout::new(args.data_dir), args.repair) {
        Ok(report) => {
            print!("{report}");
            report.exit_code()
        }
        Err(e) => {
            eprintln!("ebsfs check: {e}");
            EXIT_ERROR
        }
    }
}
