//! `ebsfs` binary: everything is in the library; this only hands over the arguments.

fn main() {
    std::process::exit(ebsfs::cli::run(std::env::args_os().collect()));
}
