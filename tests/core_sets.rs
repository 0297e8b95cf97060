//! Crash-consistent sets of snapshots (`setfattr -n user.ebsfs.snapshot -v a,b@L
//! snapshots`), in-process: a writer stamps increasing numbers into volume `a`, then
//! the same number into `b`, while sets of both are taken and captured. In every set,
//! `b`'s snapshot may hold a number only if `a`'s holds it too (its write to `a`
//! completed first), and `a`'s is at most one ahead.

mod core_support;

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};

use core_support::{CoreOps, root, settings, start};
use ebsfs::fs::inode::SNAPSHOTS_DIR;
use ebsfs::fs::{SNAPSHOT_SET_XATTR, XattrFlags};
use ebsfs::storage::memory::MemStorage;

const SLOT: u64 = 4096;
const SLOTS: u64 = 48;

/// The largest number stamped in an image.
fn newest(image: &[u8]) -> u64 {
    image
        .chunks(SLOT as usize)
        .map(|slot| u64::from_le_bytes(slot[..8].try_into().expect("8 bytes")))
        .max()
        .unwrap_or(0)
}

#[test]
fn a_set_never_holds_a_write_without_the_writes_that_preceded_it() {
    let storage = MemStorage::new();
    let core = start(&storage, &settings()).expect("start");
    for v in ["a", "b"] {
        core.new_volume(v).expect("create");
        core.write_volume(v, 0, &vec![0u8; (SLOTS * SLOT) as usize])
            .expect("zero");
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let offset = (n % SLOTS) * SLOT;
                core.write_volume("a", offset, &n.to_le_bytes())
                    .expect("write a");
                core.write_volume("b", offset, &n.to_le_bytes())
                    .expect("write b");
            }
            n
        });
        for round in 0..40 {
            let spec = format!("a,b@set{round}");
            core.core()
                .setxattr(
                    SNAPSHOTS_DIR,
                    OsStr::new(SNAPSHOT_SET_XATTR),
                    Some(spec.as_bytes()),
                    XattrFlags::default(),
                    &root(),
                )
                .unwrap_or_else(|e| panic!("set {spec}: {e}"));
            // Captured while the writer goes on: what it overwrites is preserved.
            core.core().engine().run_queued();
            let a = core.read_image(&format!("a@set{round}")).expect("a");
            let b = core.read_image(&format!("b@set{round}")).expect("b");
            let (in_a, in_b) = (newest(&a), newest(&b));
            assert!(
                in_b <= in_a && in_a <= in_b + 1,
                "set {round}: a holds writes up to {in_a}, b up to {in_b}"
            );
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().expect("writer");
        assert!(written > 40, "the writer hardly ran: {written} writes");
    });
    // All or nothing: one busy or unknown volume refuses the whole set.
    let refused = core.core().setxattr(
        SNAPSHOTS_DIR,
        OsStr::new(SNAPSHOT_SET_XATTR),
        Some(b"a,nope@late"),
        XattrFlags::default(),
        &root(),
    );
    assert_eq!(refused.map_err(|e| e.errno()), Err(libc::ENOENT));
    assert_eq!(core.status("a@late"), None, "a set that failed left a@late");
    let twice = core.core().setxattr(
        SNAPSHOTS_DIR,
        OsStr::new(SNAPSHOT_SET_XATTR),
        Some(b"a,a@twice"),
        XattrFlags::default(),
        &root(),
    );
    assert_eq!(
        twice.map_err(|e| e.errno()),
        Err(libc::EINVAL),
        "a set naming one volume twice"
    );
    assert_eq!(core.status("a@twice"), None);
}
