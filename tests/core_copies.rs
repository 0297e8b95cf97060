//! Copies of snapshot images into volumes, in-process on in-memory storage (no root,
//! no FUSE), arriving the way the kernel hands them to the daemon: one
//! `copy_file_range` of more than 4 GiB − 4 KiB comes as several requests, each at
//! most that long and starting where the last one ended. Here blocks are 16 KiB and a
//! request at most [`PIECE`] bytes, 5 blocks less 4 KiB, so that each ends inside a
//! block as 4 GiB − 4 KiB does with 64 KiB blocks. A copy that skips holes comes as
//! one request per run of data (found with `SEEK_DATA`/`SEEK_HOLE`), in increasing
//! order.

mod core_support;

use std::ffi::OsStr;

use core_support::{CoreOps, pattern, root, settings, start};
use ebsfs::fs::{FsCore, FsError, SetAttr};
use ebsfs::storage::memory::{CrashMode, MemStorage};

const BLOCK: u64 = 16 << 10;
/// The longest request: 5 blocks less 4 KiB.
const PIECE: u64 = 5 * BLOCK - 4096;
/// The snapshot's size: 23 blocks and a part of one.
const SIZE: u64 = 23 * BLOCK + 1000;
/// What a hydrated copy's data file occupies: 7 whole blocks of data and the 4 KiB
/// page holding the last 1000 bytes.
const DATA_BYTES: u64 = 7 * BLOCK + 4096;

/// A data directory with volume `src` of [`SIZE`] bytes (data in blocks 0–1, 9–12,
/// 22 and the partial last one; holes elsewhere) and its completed snapshot `src@s`.
fn with_snapshot(storage: &MemStorage) -> FsCore<MemStorage> {
    let core = start(storage, &settings()).expect("start");
    core.new_volume("src").expect("create src");
    for (block, blocks, seed) in [(0, 2, 1), (9, 4, 2), (22, 1, 3)] {
        core.write_volume(
            "src",
            block * BLOCK,
            &pattern((blocks * BLOCK) as usize, seed),
        )
        .expect("write src");
    }
    core.write_volume("src", 23 * BLOCK, &pattern(1000, 4))
        .expect("write the partial last block");
    core.snapshot_now("src@s");
    core
}

fn ino(core: &FsCore<MemStorage>, v: &str) -> u64 {
    core.volume_ino(v)
        .unwrap_or_else(|| panic!("volume {v} exists"))
}

/// Creates volume `v` and copies image `snapshot` into it with `copy`, which is
/// handed a function making one request (offset, length; the same offset on both
/// sides) and returning what it returned. Runs `between` after each request that
/// took anything. Returns what each of those returned.
fn copy_with(
    core: &FsCore<MemStorage>,
    snapshot: &str,
    v: &str,
    mut between: impl FnMut(&FsCore<MemStorage>),
    copy: impl FnOnce(&mut dyn FnMut(u64, u64) -> Result<u64, FsError>) -> Result<(), FsError>,
) -> Result<Vec<u64>, FsError> {
    core.new_volume(v)?;
    let image = core
        .snapshot_file(snapshot, "volume.img")
        .expect("snapshot exists");
    let volume = ino(core, v);
    let (fh_in, _) = core.open(image, false)?;
    let (fh_out, _) = core.open(volume, true)?;
    let mut pieces = Vec::new();
    let result = copy(&mut |at, len| {
        let n = core.copy_range(fh_in, at, volume, fh_out, at, len)?;
        if n > 0 {
            pieces.push(n);
            between(core);
        }
        Ok(n)
    });
    core.release(fh_in);
    core.release(fh_out);
    result.map(|()| pieces)
}

/// Copies image `snapshot` into the new volume `v` from offset 0, as `cp` does: asks
/// for all that is left in requests of at most `piece` bytes (the kernel's cut),
/// until one returns 0. Runs `between` after each request. Returns what each request
/// returned.
fn copy_in_pieces(
    core: &FsCore<MemStorage>,
    snapshot: &str,
    v: &str,
    piece: u64,
    between: impl FnMut(&FsCore<MemStorage>),
) -> Result<Vec<u64>, FsError> {
    copy_with(core, snapshot, v, between, |request| {
        let mut done = 0;
        loop {
            match request(done, piece)? {
                0 => return Ok(()),
                n => done += n,
            }
        }
    })
}

/// The runs of data of the image of [`with_snapshot`], as `SEEK_DATA`/`SEEK_HOLE`
/// report them: (offset, length).
const RUNS: [(u64, u64); 3] = [
    (0, 2 * BLOCK),
    (9 * BLOCK, 4 * BLOCK),
    (22 * BLOCK, SIZE - 22 * BLOCK),
];

/// Copies image `snapshot` into the new volume `v` skipping holes: one request per
/// run of `runs` (repeated for what a request did not take). Runs
/// `between` after each request. Returns what each request returned.
fn copy_runs(
    core: &FsCore<MemStorage>,
    snapshot: &str,
    v: &str,
    runs: &[(u64, u64)],
    between: impl FnMut(&FsCore<MemStorage>),
) -> Result<Vec<u64>, FsError> {
    copy_with(core, snapshot, v, between, |request| {
        for &(offset, len) in runs {
            let mut done = 0;
            while done < len {
                let n = request(offset + done, len - done)?;
                assert!(n > 0, "a request at {} copied nothing", offset + done);
                done += n;
            }
        }
        Ok(())
    })
}

/// Bytes the volume's data file occupies.
fn allocated(core: &FsCore<MemStorage>, v: &str) -> u64 {
    core.getattr(ino(core, v)).expect("getattr").blocks * 512
}

fn hydrated(core: &FsCore<MemStorage>, v: &str) -> String {
    let value = core
        .getxattr(ino(core, v), OsStr::new("user.ebsfs.hydrated"))
        .expect("user.ebsfs.hydrated");
    String::from_utf8_lossy(&value).into_owned()
}

fn truncate(core: &FsCore<MemStorage>, v: &str, size: u64) {
    let changes = SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    core.setattr(ino(core, v), changes, &root())
        .unwrap_or_else(|e| panic!("truncate {v} to {size}: {e}"));
}

/// Every request but the last ended on a block boundary, short of what was asked:
/// each shared whole blocks. (A copy made by reading and writing returns all it was
/// asked for.)
fn assert_shared(pieces: &[u64]) {
    let (last, rest) = pieces.split_last().expect("at least one request");
    assert!(
        rest.len() >= 4,
        "{pieces:?}: the copy took {} requests",
        pieces.len()
    );
    for &n in rest {
        assert!(
            n.is_multiple_of(BLOCK) && n < PIECE,
            "{pieces:?}: a request was not shared"
        );
    }
    assert_eq!(*last, SIZE - rest.iter().sum::<u64>(), "{pieces:?}");
}

/// Volume `copy` is `image` by reference: equal, nothing written into it, not
/// hydrated; its first snapshot is incremental against src@s with nothing changed;
/// hydrated, it holds the snapshot's data blocks (and nothing else).
fn assert_copy_by_reference(core: &FsCore<MemStorage>, image: &[u8]) {
    assert!(
        core.read_volume("copy").expect("read") == image,
        "copy differs"
    );
    assert_eq!(allocated(core, "copy"), 0, "bytes written into the copy");
    assert_eq!(hydrated(core, "copy"), "0%");
    core.snapshot_now("copy@s");
    let info = core.info("copy@s");
    assert_eq!(info["changed_blocks"].as_integer(), Some(0), "{info:?}");
    assert_eq!(info["parent"].as_str(), Some("src@s"), "{info:?}");
    assert!(core.read_image("copy@s").expect("read") == image);
    core.hydrate_all().expect("hydrate");
    assert_eq!(hydrated(core, "copy"), "100%");
    assert!(core.read_volume("copy").expect("read") == image);
    assert_eq!(allocated(core, "copy"), DATA_BYTES);
}

/// The copy's bytes past `len` (after growing it by truncate) are zeros, and a
/// snapshot of it reads exactly what it reads.
fn assert_grows_with_zeros_and_snapshots_whole(core: &FsCore<MemStorage>, v: &str, len: u64) {
    truncate(core, v, SIZE + BLOCK);
    let bytes = core.read_volume(v).expect("read the copy");
    let first_nonzero = bytes[len as usize..].iter().position(|&b| b != 0);
    assert_eq!(
        first_nonzero, None,
        "{v} grown from {len} bytes shows data past them"
    );
    let name = format!("{v}@grown");
    core.snapshot_now(&name);
    assert!(
        core.read_image(&name).expect("read the snapshot") == bytes,
        "snapshot of {v} (grown from {len} bytes) differs from it"
    );
}

#[test]
fn a_copy_in_kernel_sized_requests_is_made_by_reference() {
    // Fault: after the first request, the new volume's size (the end of that
    // request) was taken for a shrink, which lowered the copy's source limit: every
    // later request was copied byte by byte, writing every byte of the rest.
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let image = core.read_image("src@s").expect("read src@s");
    assert_eq!(image.len() as u64, SIZE);
    let pieces = copy_in_pieces(&core, "src@s", "copy", PIECE, |_| {}).expect("copy");
    eprintln!("requests returned {pieces:?}");
    assert_shared(&pieces);
    assert_copy_by_reference(&core, &image);
    assert_grows_with_zeros_and_snapshots_whole(&core, "copy", SIZE);
}

#[test]
fn a_copy_the_hydrator_catches_up_with_between_requests_stays_by_reference() {
    // Between two requests the hydrator may finish the part shared so far and
    // record the copy as hydrated; the next request must still share.
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let image = core.read_image("src@s").expect("read src@s");
    let mut states = Vec::new();
    let pieces = copy_in_pieces(&core, "src@s", "copy", PIECE, |core| {
        core.hydrate_all().expect("hydrate");
        states.push((hydrated(core, "copy"), allocated(core, "copy")));
    })
    .expect("copy");
    eprintln!("requests returned {pieces:?}, after each hydration: {states:?}");
    assert_shared(&pieces);
    assert!(states.iter().all(|(percent, _)| percent == "100%"));
    assert!(
        core.read_volume("copy").expect("read") == image,
        "copy differs"
    );
    // Only hydration wrote: the snapshot's data blocks.
    assert_eq!(allocated(&core, "copy"), DATA_BYTES);
    assert_grows_with_zeros_and_snapshots_whole(&core, "copy", SIZE);
}

#[test]
fn a_partial_copy_grown_by_truncate_reads_and_snapshots_zeros_past_it() {
    // Only the first request: the copy ends there. Grown, it must read zeros past
    // it, and so must its snapshot (which is incremental against src@s, whose data
    // lies there).
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let mut first = None;
    core.new_volume("part").expect("create");
    let image_ino = core.snapshot_file("src@s", "volume.img").expect("image");
    let volume = ino(&core, "part");
    let (fh_in, _) = core.open(image_ino, false).expect("open image");
    let (fh_out, _) = core.open(volume, true).expect("open volume");
    if let Ok(n) = core.copy_range(fh_in, 0, volume, fh_out, 0, 10 * BLOCK + 5) {
        first = Some(n);
    }
    core.release(fh_in);
    core.release(fh_out);
    assert_eq!(
        first,
        Some(10 * BLOCK),
        "the first request shares whole blocks"
    );
    assert_grows_with_zeros_and_snapshots_whole(&core, "part", 10 * BLOCK);
}

#[test]
fn a_sparse_image_copied_run_by_run_is_made_by_reference() {
    // A copy that skips holes: each request after the first starts past the
    // copy's end, over holes of the snapshot.
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let image = core.read_image("src@s").expect("read src@s");
    let pieces = copy_runs(&core, "src@s", "copy", &RUNS, |_| {}).expect("copy");
    assert_eq!(
        pieces,
        RUNS.iter().map(|&(_, len)| len).collect::<Vec<_>>(),
        "one request a run"
    );
    assert_copy_by_reference(&core, &image);
}

#[test]
fn runs_after_data_the_copy_did_not_take_are_copied_byte_by_byte() {
    // The middle run first: the snapshot's data before it (blocks 0–1) must not
    // show, so it is copied; so is everything after, into a volume with data.
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let image = core.read_image("src@s").expect("read src@s");
    let runs = [RUNS[1], RUNS[0], RUNS[2]];
    let pieces = copy_runs(&core, "src@s", "copy", &runs, |_| {}).expect("copy");
    assert_eq!(pieces, runs.iter().map(|&(_, len)| len).collect::<Vec<_>>());
    assert!(
        core.read_volume("copy").expect("read") == image,
        "copy differs"
    );
    assert_eq!(
        core.getxattr(ino(&core, "copy"), OsStr::new("user.ebsfs.source"))
            .ok(),
        None,
        "a copy made byte by byte names no source"
    );
    assert!(allocated(&core, "copy") >= DATA_BYTES);

    // A request over a copy by reference's own blocks is copied too.
    let pieces = copy_runs(&core, "src@s", "again", &RUNS[..1], |_| {}).expect("copy");
    assert_eq!(pieces, [RUNS[0].1]);
    core.write_volume("again", 9 * BLOCK, b"written")
        .expect("write");
    truncate(&core, "again", 9 * BLOCK);
    let volume = ino(&core, "again");
    let image_ino = core.snapshot_file("src@s", "volume.img").expect("image");
    let (fh_in, _) = core.open(image_ino, false).expect("open image");
    let (fh_out, _) = core.open(volume, true).expect("open volume");
    let n = core
        .copy_range(fh_in, 9 * BLOCK, volume, fh_out, 9 * BLOCK, 4 * BLOCK)
        .expect("copy");
    core.release(fh_in);
    core.release(fh_out);
    assert_eq!(n, 4 * BLOCK);
    assert!(core.read_volume("again").expect("read") == image[..13 * BLOCK as usize]);
}

#[test]
fn a_pending_snapshot_s_image_is_copied_byte_by_byte() {
    // Its blocks are not all in its entries yet: it is read through its volume's
    // freeze, and a copy takes its bytes.
    let storage = MemStorage::new();
    let core = with_snapshot(&storage);
    let image = core.read_image("src@s").expect("read src@s");
    core.snapshot("src@p").expect("mkdir src@p");
    core.write_volume("src", 0, b"after the freeze")
        .expect("write src");
    let pieces = copy_in_pieces(&core, "src@p", "copy", PIECE, |_| {}).expect("copy");
    core.engine().run_queued();
    assert!(pieces[..pieces.len() - 1].iter().all(|&n| n == PIECE));
    assert!(
        core.read_volume("copy").expect("read") == image,
        "copy differs from the snapshot's point in time"
    );
    assert!(
        core.getxattr(ino(&core, "copy"), OsStr::new("user.ebsfs.source"))
            .is_err(),
        "a copy made byte by byte names no source"
    );
}

/// Every crash point of the requests after the first (`runs`: a copy that skips
/// holes; else the kernel's pieces): after a restart the copy is the
/// snapshot's first bytes up to the end of a request (the last one done or the one
/// cut short), never more, and grows with zeros.
fn crash_during_later_requests(mode: CrashMode, runs: bool) {
    let mut crash_at = 1;
    loop {
        let storage = MemStorage::new();
        let core = with_snapshot(&storage);
        let image = core.read_image("src@s").expect("read src@s");
        let mut requests = 0;
        let between = |_: &FsCore<MemStorage>| {
            requests += 1;
            if requests == 1 {
                storage.crash_after(crash_at);
            }
        };
        let copied = if runs {
            copy_runs(&core, "src@s", "copy", &RUNS, between)
        } else {
            copy_in_pieces(&core, "src@s", "copy", PIECE, between)
        };
        if !storage.has_crashed() {
            let pieces = copied.expect("no crash: the copy succeeds");
            if !runs {
                assert_shared(&pieces);
            }
            assert!(crash_at > 3, "a request after the first stores nothing?");
            eprintln!("{mode:?}: {} crash points", crash_at - 1);
            return;
        }
        core.shutdown();
        drop(core);
        let storage = storage.restart(mode);
        let core = start(&storage, &settings())
            .unwrap_or_else(|e| panic!("crash at {crash_at}: restart: {e}"));
        let bytes = core
            .read_volume("copy")
            .unwrap_or_else(|e| panic!("crash at {crash_at}: read the copy: {e}"));
        let len = bytes.len() as u64;
        // Each of the kernel's pieces shares 4 blocks (5 less 4 KiB, cut to a block
        // boundary); each request of a copy that skips holes a run.
        let request_end = if runs {
            len == 0 || RUNS.iter().any(|&(offset, run)| offset + run == len)
        } else {
            len.is_multiple_of(4 * BLOCK) || len == SIZE
        };
        assert!(
            request_end,
            "crash at {crash_at} ({mode:?}): the copy is {len} bytes, not the end of a request"
        );
        if mode == CrashMode::Process {
            assert!(len > 0, "crash at {crash_at}: the first request lost");
        }
        assert!(
            bytes == image[..len as usize],
            "crash at {crash_at} ({mode:?}): the copy's {len} bytes differ from the snapshot's"
        );
        assert_grows_with_zeros_and_snapshots_whole(&core, "copy", len);
        crash_at += 1;
    }
}

#[test]
fn a_copy_cut_short_by_a_kill_is_the_snapshot_up_to_a_request_end() {
    crash_during_later_requests(CrashMode::Process, false);
}

#[test]
fn a_copy_cut_short_by_a_power_loss_is_the_snapshot_up_to_a_request_end() {
    crash_during_later_requests(CrashMode::PowerLoss, false);
}

#[test]
fn a_sparse_copy_cut_short_by_a_kill_is_the_snapshot_up_to_a_request_end() {
    crash_during_later_requests(CrashMode::Process, true);
}

#[test]
fn a_sparse_copy_cut_short_by_a_power_loss_is_the_snapshot_up_to_a_request_end() {
    crash_during_later_requests(CrashMode::PowerLoss, true);
}
