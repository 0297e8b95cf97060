//! Volumes on a real mount, driven with real tools (issue: volumes as loop-mountable files).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// Runs a python3 script with arguments and returns what it printed.
fn python(script: &str, args: &[&Path]) -> String {
    let mut argv = vec![Path::new("-c"), Path::new(script)];
    argv.extend_from_slice(args);
    String::from_utf8_lossy(&run("python3", &argv).stdout).into_owned()
}

/// Reads `len` bytes at `offset` of `path` (a volume), panicking on a short read.
fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, offset))
        .unwrap_or_else(|e| panic!("reading {len} bytes at {offset} of {}: {e}", path.display()));
    buf
}

/// Writes `data` at `offset` of a volume (created if missing) and fsyncs it.
fn write_range(path: &Path, offset: u64, data: &[u8]) {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open volume");
    file.write_all_at(data, offset).expect("write volume");
    file.sync_all().expect("fsync volume");
}

fn size_of(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// The first byte in `data` that is not zero, as an offset.
fn first_nonzero(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b != 0)
}

/// mkfs.ext4 on a volume, loop-mount, write random files, remount everything:
/// checksums match and e2fsck is clean.
#[test]
fn ext4_on_a_volume_survives_remount() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("disk");
    run("truncate", &["-s", "1G", img.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    let dir = fs.loop_mount(&img, "ext4", "");
    let mut sums = Vec::new();
    for i in 0..4u64 {
        let path = dir.join(format!("file{i}"));
        std::fs::write(&path, pattern(3 << 20 | (i as usize * 4097), i)).unwrap();
        sums.push((format!("file{i}"), sha256(&path)));
    }
    fs.loop_unmount(&dir);
    fs.stop();
    fs.restart();
    let out = try_run("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dir = fs.loop_mount(&img, "ext4", "");
    for (name, sum) in sums {
        assert_eq!(
            sha256(&dir.join(&name)),
            sum,
            "{name} changed across remount"
        );
    }
}

/// `losetup --direct-io=on`: the loop device really does direct I/O to the volume, and
/// what goes through it with O_DIRECT reads back through it and through the volume file.
#[test]
fn direct_io_loop_device_reads_back_what_it_wrote() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("dio");
    run("truncate", &["-s", "64M", img.to_str().unwrap()]);
    let lo = LoopDevice::attach(&img, true);
    assert!(
        lo.direct_io(),
        "{} was attached without direct I/O",
        lo.dev.display()
    );
    let dev = lo.dev.to_str().unwrap().to_string();

    // 16 MiB written at 4 MiB through the loop device, O_DIRECT.
    let data = pattern(16 * MIB as usize, 7);
    let src = fs.write_scratch("src", &data);
    sh(&format!(
        "dd if={} of={dev} bs=1M seek=4 oflag=direct conv=fsync,notrunc status=none",
        src.display()
    ));
    let back = fs.scratch("back");
    sh(&format!(
        "dd if={dev} of={} bs=1M skip=4 count=16 iflag=direct status=none",
        back.display()
    ));
    assert!(
        fs::read(&back).unwrap() == data,
        "loop device read back different bytes"
    );
    // The volume file sees the writes while the device is still attached.
    assert!(
        read_range(&img, 4 * MIB, data.len()) == data,
        "volume file differs from what the loop device wrote"
    );
    assert_eq!(
        first_nonzero(&read_range(&img, 0, 4 * MIB as usize)),
        None,
        "bytes before the write changed"
    );

    // And the other way: a write to the volume file is what the device reads next.
    let other = pattern(MIB as usize, 8);
    write_range(&img, 40 * MIB, &other);
    sh(&format!(
        "dd if={dev} of={} bs=1M skip=40 count=1 iflag=direct status=none",
        back.display()
    ));
    assert!(
        fs::read(&back).unwrap() == other,
        "loop device read stale bytes after a write to the volume file"
    );

    lo.detach();
    let out = run("losetup", &["-j", img.to_str().unwrap()]);
    assert!(
        out.stdout.is_empty(),
        "still attached: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(size_of(&img), 64 * MIB);
}

/// A raw image with data and holes, imported with `dd` (and `cp`), reads back equal;
/// `dd conv=sparse` and `cp --sparse=always` keep the holes, in and out of the mount.
#[test]
fn raw_image_import_and_sparse_copy_out() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    // 48 MiB: data at the start, an unaligned run in the middle, a hole at the end.
    let src = fs.scratch("disk.raw");
    let chunks = [
        (0u64, MIB as usize + 777, 1u64),
        (10 * MIB + 4096 + 13, 3 * MIB as usize, 2),
        (30 * MIB, 512 * 1024, 3),
    ];
    {
        let file = fs::File::create(&src).unwrap();
        file.set_len(48 * MIB).unwrap();
        for (offset, len, seed) in chunks {
            file.write_all_at(&pattern(len, seed), offset).unwrap();
        }
    }
    let data_bytes: u64 = chunks.iter().map(|c| c.1 as u64).sum();

    let plain = fs.volume("plain");
    sh(&format!(
        "dd if={} of={} bs=1M conv=fsync status=none",
        src.display(),
        plain.display()
    ));
    run("cmp", &[&src, &plain]);
    assert_eq!(size_of(&plain), 48 * MIB);

    let sparse = fs.volume("sparse");
    sh(&format!(
        "dd if={} of={} bs=64K conv=sparse,fsync status=none",
        src.display(),
        sparse.display()
    ));
    run("cmp", &[&src, &sparse]);
    assert_eq!(size_of(&sparse), 48 * MIB);
    let du = du_bytes(&sparse);
    assert!(
        du < data_bytes + 4 * MIB,
        "dd conv=sparse import uses {du} bytes for {data_bytes} bytes of data"
    );

    let copied = fs.volume("copied");
    run("cp", &[&src, &copied]);
    run("cmp", &[&src, &copied]);
    assert_eq!(size_of(&copied), 48 * MIB);

    // Out of the mount: the copy keeps the holes.
    let out = fs.scratch("out.raw");
    run("cp", &[Path::new("--sparse=always"), &sparse, &out]);
    run("cmp", &[&src, &out]);
    assert_eq!(size_of(&out), 48 * MIB);
    let du = du_bytes(&out);
    assert!(
        du < data_bytes + 4 * MIB,
        "cp --sparse=always copy uses {du} bytes for {data_bytes} bytes of data"
    );
}

/// `du` of a volume is what it occupies in the data directory, and `fstrim` of an
/// ext4 on it gives deleted files' space back.
#[test]
fn du_is_honest_and_fstrim_frees_space() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("trim");
    run("truncate", &["-s", "256M", img.to_str().unwrap()]);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            img.to_str().unwrap(),
        ],
    );
    let dir = fs.loop_mount(&img, "ext4", "");
    let volumes_dir = fs.data.join("volumes");
    // What the volume shows must be what its data file takes (plus its tiny dirty map).
    let assert_honest = |when: &str| {
        let (shown, stored) = (du_bytes(&img), du_bytes(&volumes_dir));
        assert!(
            shown <= stored && stored - shown <= MIB,
            "{when}: du of the volume is {shown}, its files in the data directory take {stored}"
        );
    };
    run("sync", &[] as &[&str]);
    assert_honest("after mkfs");
    let empty = du_bytes(&img);

    let big = dir.join("big");
    fs::write(&big, pattern(96 * MIB as usize, 11)).unwrap();
    run("sync", &[] as &[&str]);
    let (vol_full, data_full) = (du_bytes(&img), du_bytes(&fs.data));
    assert!(
        vol_full >= empty + 90 * MIB,
        "du of the volume went from {empty} to {vol_full} after writing 96 MiB"
    );
    assert_honest("after writing");

    fs::remove_file(&big).unwrap();
    run("sync", &[] as &[&str]);
    run("fstrim", &[&dir]);
    let (vol_trimmed, data_trimmed) = (du_bytes(&img), du_bytes(&fs.data));
    assert!(
        vol_trimmed + 80 * MIB <= vol_full,
        "fstrim freed too little: du of the volume {vol_full} -> {vol_trimmed}"
    );
    assert!(
        data_trimmed + 80 * MIB <= data_full,
        "fstrim freed too little: du of the data directory {data_full} -> {data_trimmed}"
    );
    assert_honest("after fstrim");
    assert_eq!(size_of(&img), 256 * MIB, "fstrim changed the volume's size");
    fs.loop_unmount(&dir);
    let out = try_run("e2fsck", &["-fn", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "e2fsck after fstrim: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `fallocate -p` frees the range's space and it reads as zeros; the rest is intact.
#[test]
fn punch_hole_frees_space_and_reads_zeros() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("punch");
    let data = pattern(16 * MIB as usize, 21);
    write_range(&img, 0, &data);
    let before = du_bytes(&img);
    assert!(
        before >= 16 * MIB,
        "a fully written 16 MiB volume takes {before} bytes"
    );

    run(
        "fallocate",
        &["-p", "-o", "4MiB", "-l", "8MiB", img.to_str().unwrap()],
    );
    let after = du_bytes(&img);
    assert!(
        after + 8 * MIB <= before,
        "punching 8 MiB took du from {before} to {after}"
    );
    assert_eq!(size_of(&img), 16 * MIB, "punching changed the size");
    let all = fs::read(&img).unwrap();
    let (start, end) = (4 * MIB as usize, 12 * MIB as usize);
    assert!(
        all[..start] == data[..start],
        "bytes before the hole changed"
    );
    assert_eq!(
        first_nonzero(&all[start..end]).map(|i| i + start),
        None,
        "punched range is not zeros"
    );
    assert!(all[end..] == data[end..], "bytes after the hole changed");
}

/// Plain `fallocate -l` grows a volume with allocated zeros and keeps its data.
#[test]
fn fallocate_allocates_and_grows() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("alloc");
    let head = pattern(MIB as usize, 31);
    fs::write(&img, &head).unwrap();
    run("fallocate", &["-l", "32MiB", img.to_str().unwrap()]);
    assert_eq!(size_of(&img), 32 * MIB);
    let du = du_bytes(&img);
    assert!(
        du >= 32 * MIB,
        "fallocate -l 32MiB left only {du} bytes allocated"
    );
    let all = fs::read(&img).unwrap();
    assert!(all[..head.len()] == head, "fallocate changed existing data");
    assert_eq!(
        first_nonzero(&all[head.len()..]),
        None,
        "allocated space does not read as zeros"
    );

    // On a new volume, too.
    let fresh = fs.volume("fresh");
    run("fallocate", &["-l", "8MiB", fresh.to_str().unwrap()]);
    assert_eq!(size_of(&fresh), 8 * MIB);
    assert!(du_bytes(&fresh) >= 8 * MIB);
}

/// `lseek(SEEK_DATA/SEEK_HOLE)` on a volume reports its real holes.
#[test]
fn seek_data_and_seek_hole_report_real_holes() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("holes");
    run("truncate", &["-s", "64M", img.to_str().unwrap()]);
    write_range(&img, 8 * MIB, &pattern(MIB as usize, 41));
    write_range(&img, 40 * MIB, &pattern(2 * MIB as usize, 42));
    // Prints "data hole" pairs walking the file, then what SEEK_DATA says past the
    // last data and SEEK_HOLE at the end's hole.
    let script = r#"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
pos = 0
while pos < size:
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        print("end", errno.errorcode[e.errno])
        break
    hole = os.lseek(fd, data, os.SEEK_HOLE)
    print(data, hole)
    pos = hole
print("hole_at_end", os.lseek(fd, 50 << 20, os.SEEK_HOLE))
try:
    print("data_past_end", os.lseek(fd, size, os.SEEK_DATA))
except OSError as e:
    print("data_past_end", errno.errorcode[e.errno])
"#;
    let out = python(script, &[&img]);
    let expected = format!(
        "{} {}\n{} {}\nend ENXIO\nhole_at_end {}\ndata_past_end ENXIO\n",
        8 * MIB,
        9 * MIB,
        40 * MIB,
        42 * MIB,
        50 * MIB
    );
    assert_eq!(
        out, expected,
        "SEEK_DATA/SEEK_HOLE walk of a volume with data at 8-9 MiB and 40-42 MiB"
    );
}

/// `cp --sparse=always` of a volume ends with `SEEK_DATA` at or past the last data
/// (ENXIO): routine, so the daemon logs it at debug, not as a warning.
#[test]
fn sparse_copy_logs_no_lseek_warning() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start();
    let img = fs.volume("sparse");
    write_range(&img, 0, &pattern(MIB as usize, 43));
    write_range(&img, 4 * MIB, &pattern(MIB as usize, 44));
    run("truncate", &["-s", "16M", img.to_str().unwrap()]);
    let out = fs.scratch("out.raw");
    run("cp", &[Path::new("--sparse=always"), &img, &out]);
    run("cmp", &[&img, &out]);
    let log = fs.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("lseek"))
        .collect();
    assert!(
        warnings.is_empty(),
        "the end of a sparse copy was logged as a warning:\n{}",
        warnings.join("\n")
    );
}

/// A write acknowledged by fsync survives `kill -9` of the daemon and a restart.
#[test]
fn fsync_acknowledged_writes_survive_kill9() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let img = fs.volume("durable");
    let first = pattern(8 * MIB as usize + 4097, 51);
    let src = fs.write_scratch("first", &first);
    sh(&format!(
        "dd if={} of={} bs=1M conv=fsync status=none",
        src.display(),
        img.display()
    ));
    let second = pattern(3 * MIB as usize, 52);
    let second_src = fs.write_scratch("second", &second);
    let script = r#"
import os, sys
data = open(sys.argv[2], "rb").read()
fd = os.open(sys.argv[1], os.O_WRONLY)
assert os.pwrite(fd, data, 20 << 20) == len(data)
os.fsync(fd)
print("synced")
"#;
    assert_eq!(python(script, &[&img, &second_src]), "synced\n");
    fs.kill9();
    fs.restart();
    assert_eq!(size_of(&img), 23 * MIB);
    assert!(
        read_range(&img, 0, first.len()) == first,
        "dd conv=fsync data lost across kill -9"
    );
    assert!(
        read_range(&img, 20 * MIB, second.len()) == second,
        "os.fsync'd data lost across kill -9"
    );
    let gap = read_range(&img, first.len() as u64, (20 * MIB) as usize - first.len());
    assert_eq!(
        first_nonzero(&gap),
        None,
        "the gap between the writes is not zeros"
    );
    // The restarted daemon takes writes again.
    write_range(&img, 0, b"again");
    assert_eq!(read_range(&img, 0, 5), b"again");
}

/// Volumes created, sized, renamed and deleted just before `kill -9` are as they were
/// after a restart.
#[test]
fn namespace_changes_survive_kill9() {
    if !require_fuse() {
        return;
    }
    let mut fs = Ebsfs::start();
    let sized = fs.volume("sized");
    run("truncate", &["-s", "40M", sized.to_str().unwrap()]);
    let empty = fs.volume("empty");
    fs::File::create(&empty).unwrap();
    let (old, new) = (fs.volume("old"), fs.volume("new"));
    fs::write(&old, b"renamed").unwrap();
    fs::rename(&old, &new).unwrap();
    let doomed = fs.volume("doomed");
    fs::write(&doomed, b"x").unwrap();
    fs::remove_file(&doomed).unwrap();
    fs.kill9();
    fs.restart();

    assert_eq!(
        fs.names_in("volumes"),
        ["empty.img", "new.img", "sized.img"]
    );
    assert_eq!(size_of(&sized), 40 * MIB);
    assert_eq!(
        first_nonzero(&read_range(&sized, 39 * MIB, MIB as usize)),
        None
    );
    assert_eq!(size_of(&empty), 0);
    assert_eq!(fs::read(&new).unwrap(), b"renamed");
}

/// `ebsfs volume create --from` of a snapshot larger than one copy request shares
/// all of it: the data directory does not grow by the image's size.
#[test]
fn volume_create_from_a_large_snapshot_copies_nothing() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with("hydrate = false\n");
    let src = fs.volume("src");
    run("truncate", &["-s", "3G", src.to_str().unwrap()]);
    let marks = [0, 1536 * MIB, 3072 * MIB - MIB];
    for (i, &at) in marks.iter().enumerate() {
        write_range(&src, at, &pattern(MIB as usize, 40 + i as u64));
    }
    fs::create_dir(fs.snapshot("src@a")).unwrap();
    assert_eq!(fs.wait_snapshot("src@a"), "completed");
    run("sync", &[] as &[&str]);
    let before = du_bytes(&fs.data);
    let mnt = fs.mnt.to_str().unwrap();
    run(
        BIN,
        &[
            "volume", "create", "copy", "--from", "src@a", "--mount", mnt,
        ],
    );
    run("sync", &[] as &[&str]);
    let grown = du_bytes(&fs.data).saturating_sub(before);
    assert!(
        grown < 16 * MIB,
        "the data directory grew by {grown} bytes: the copy was not shared"
    );
    let copy = fs.volume("copy");
    assert_eq!(size_of(&copy), 3072 * MIB);
    for (i, &at) in marks.iter().enumerate() {
        assert_eq!(
            read_range(&copy, at, MIB as usize),
            pattern(MIB as usize, 40 + i as u64),
            "the copy differs at {at}"
        );
    }
}
