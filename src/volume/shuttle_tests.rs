//! Concurrency model checking of the dirty map and freeze paths with
//! [shuttle](https://docs.rs/shuttle): its scheduler runs the threads below in many
//! interleavings (probabilistic concurrency testing), preempting at every lock and
//! atomic of the volume, its dirty map, its freeze and the in-memory storage.
//!
//! Run with `cargo nextest run --features shuttle --lib shuttle`; the default build
//! does not include them (the primitives are swapped crate-wide, see `crate::sync`).

use std::path::Path;
use std::sync::Arc;

use shuttle::thread;

use super::dirty::DirtyMap;
use super::{Rescan, Volume};
use crate::layout::{Layout, VolumeFile};
use crate::namespace::{SnapshotId, VolumeId};
use crate::storage::memory::MemStorage;

const BS: u64 = 16 << 10;
const PAGE: usize = 4096;
const ITERATIONS: usize = 3000;

fn setup() -> (MemStorage, Layout, Arc<Volume<MemStorage>>) {
    let storage = MemStorage::new();
    let layout = Layout::new("/data");
    layout.create_dirs(&storage).expect("dirs");
    let volume = Volume::create(&storage, &layout, VolumeId(1), BS, 1 << 30).expect("volume");
    (storage, layout, Arc::new(volume))
}

/// The blocks whose bits are set in a dirty map file's contents.
fn bits_in_file(bytes: &[u8]) -> Vec<u64> {
    let words = &bytes[super::dirty::HEADER_BYTES as usize..];
    let mut out = Vec::new();
    for (w, chunk) in words.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        for bit in 0..64 {
            if word & (1 << bit) != 0 {
                out.push(w as u64 * 64 + bit);
            }
        }
    }
    out
}

/// Fault this found: a second writer to a block whose bit another thread had just
/// set in memory, but not yet written, went on to write its data; a `kill -9` then
/// left changed data with no bit in the file, and snapshots missed it for good.
///
/// Two writers hit different pages of block 0 while an observer takes, at a random
/// moment, what a `kill -9` would leave (the data file and the dirty map file, at one
/// instant): any block with data must have its bit in the dirty map file.
#[test]
fn shuttle_no_write_reaches_the_data_file_before_its_bit() {
    shuttle::check_pct(
        || {
            let (storage, layout, volume) = setup();
            let writers: Vec<_> = (0..2u8)
                .map(|t| {
                    let volume = volume.clone();
                    thread::spawn(move || {
                        let data = vec![t + 1; PAGE];
                        volume
                            .write_at(&data, u64::from(t) * PAGE as u64)
                            .expect("write");
                    })
                })
                .collect();
            let data_path = layout.volume_file(VolumeId(1), VolumeFile::Data);
            let dirty_path = layout.volume_file(VolumeId(1), VolumeFile::Dirty);
            let observer = thread::spawn(move || {
                storage.inspect(&[&data_path, &dirty_path], |files| {
                    let data = files[0].as_deref().unwrap_or_default();
                    let bits = bits_in_file(files[1].as_deref().expect("dirty map file"));
                    let written = data.iter().any(|&b| b != 0);
                    assert!(
                        !written || bits.contains(&0),
                        "block 0 holds written data but its bit is not in the dirty map file"
                    );
                });
            });
            for w in writers {
                w.join().expect("writer");
            }
            observer.join().expect("observer");
        },
        ITERATIONS,
        3,
    );
}

/// Across a freeze, no write is lost or doubled: a write the frozen view shows is in
/// the capture set; a write it does not show is marked in the fresh dirty map (the
/// next snapshot's). The capture worker takes the block while the writer runs.
#[test]
fn shuttle_every_write_lands_in_exactly_one_snapshot() {
    shuttle::check_pct(
        || {
            let (storage, layout, volume) = setup();
            volume
                .write_at(&vec![7u8; BS as usize], 0)
                .expect("seed block");
            let writer = {
                let volume = volume.clone();
                thread::spawn(move || volume.write_at(&[9u8; PAGE], PAGE as u64).expect("write"))
            };
            let freeze = volume
                .freeze(SnapshotId(1), Rescan::ShrunkBelow(0))
                .expect("freeze");
            let frozen = freeze.take(volume.data_file(), 0).expect("take");
            writer.join().expect("writer");
            let fresh = DirtyMap::open(
                &storage,
                &layout.volume_file(VolumeId(1), VolumeFile::Dirty),
            )
            .expect("fresh map");
            let shows_write = frozen[PAGE] == 9;
            let untouched = frozen[..PAGE].iter().all(|&b| b == 7)
                && frozen[2 * PAGE..].iter().all(|&b| b == 7)
                && frozen[PAGE..2 * PAGE].iter().all(|&b| b == frozen[PAGE]);
            assert!(untouched, "the frozen block mixes writes");
            assert!(freeze.blocks.is_set(0), "block 0 left the capture set");
            assert!(
                shows_write || fresh.is_set(0),
                "a write after the freeze is in no snapshot"
            );
            assert_eq!(
                storage
                    .contents(Path::new("/data/volumes/1.raw"))
                    .expect("data")[PAGE],
                9
            );
        },
        ITERATIONS,
        3,
    );
}
