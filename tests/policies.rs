//! Snapshot policies on a real mount: with `every = "2s"` and `keep = 2`, snapshots
//! appear on their own, old ones are deleted, a locked one survives, and `ebsfs
//! policy list` shows the schedule.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// The names of the policy's snapshots of `db` now on the mount.
fn auto_snapshots(fs: &Ebsfs) -> Vec<String> {
    fs.names_in("snapshots")
        .into_iter()
        .filter(|n| n.starts_with("db@auto-"))
        .collect()
}

#[test]
fn policies_take_snapshots_and_prune_all_but_the_kept_and_locked() {
    if !require_fuse() {
        return;
    }
    let fs = Ebsfs::start_with(
        "[[policy]]\nname = \"auto\"\nvolumes = [\"db\"]\nevery = \"2s\"\nkeep = 2\nlabel = \"auto-%Y%m%d-%H%M%S\"\n",
    );
    fs::write(fs.volume("db"), pattern(1 << 20, 1)).unwrap();
    fs::write(fs.volume("other"), pattern(1 << 16, 2)).unwrap();
    // The policy snapshots db as soon as it exists: a snapshot by hand waits its turn.
    wait_until("a snapshot by hand", Duration::from_secs(60), || {
        fs::create_dir(fs.snapshot("db@manual")).is_ok()
    });

    wait_until(
        "the policy's first snapshot",
        Duration::from_secs(60),
        || !auto_snapshots(&fs).is_empty(),
    );
    let first = auto_snapshots(&fs)[0].clone();
    let out = run(
        "setfattr",
        &[
            "-n",
            "user.ebsfs.lock",
            "-v",
            "2200-01-01T00:00:00Z",
            fs.snapshot(&first).to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe_output(&out));

    // Snapshots keep coming; the unlocked old ones go.
    let mut seen = std::collections::BTreeSet::new();
    wait_until(
        "five policy snapshots taken and the old ones pruned",
        Duration::from_secs(120),
        || {
            let now = auto_snapshots(&fs);
            seen.extend(now.iter().cloned());
            seen.len() >= 5 && now.len() <= 4
        },
    );
    let now = auto_snapshots(&fs);
    assert!(now.contains(&first), "the locked one survives: {now:?}");
    assert!(
        fs.snapshot("db@manual").is_dir(),
        "not the policy's to delete"
    );
    assert!(
        !fs::read_dir(fs.mnt.join("snapshots"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("other@")),
        "other is not the policy's volume"
    );

    let out = run(
        env!("CARGO_BIN_EXE_ebsfs"),
        &[
            "policy",
            "list",
            "--config",
            fs.config.to_str().unwrap(),
            "--mount",
            fs.mnt.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        text.contains("policy auto: volumes db, every 2s, keep 2") && text.contains("next run: db"),
        "{text}"
    );
    assert!(!text.contains(&format!("would delete: {first}")), "{text}");
}
