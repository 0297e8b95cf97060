//! Snapshot policies (`[[policy]]`) run through the core with a fake clock: runs on
//! schedule, one catch-up run after downtime, a busy volume tried again, pruning that
//! keeps the newest, locked and other snapshots, and a restart that remembers the last
//! run from the snapshots themselves.

mod core_support;

use std::ffi::OsStr;

use core_support::{CoreOps, root, settings, start};
use ebsfs::fs::XattrFlags;
use ebsfs::fs::inode::SNAPSHOTS_DIR;
use ebsfs::namespace::Timestamp;
use ebsfs::policy::{LOCK_XATTR, LabelPattern, Policy, Volumes};
use ebsfs::storage::memory::MemStorage;

const HOUR: i64 = 3600;
/// 2030-01-01T00:00:00Z: the fake clock's start.
const T0: i64 = 1_893_456_000;

fn at(secs: i64) -> Timestamp {
    Timestamp(secs * 1_000_000_000)
}

fn label(secs: i64) -> String {
    let p = LabelPattern::parse("auto-%Y%m%d-%H%M%S").unwrap();
    format!("db@{}", p.render(at(secs)))
}

fn policy_settings() -> ebsfs::config::Settings {
    let mut s = settings();
    s.policies = vec![Policy {
        name: "auto".into(),
        volumes: Volumes::Named(vec!["db".into()]),
        every_secs: HOUR as u64,
        keep: Some(2),
        keep_for_secs: None,
        label: LabelPattern::parse("auto-%Y%m%d-%H%M%S").unwrap(),
    }];
    s
}

#[test]
fn policies_snapshot_on_schedule_and_prune_all_but_the_kept_and_locked() {
    let storage = MemStorage::new();
    let settings = policy_settings();
    let core = start(&storage, &settings).expect("start");
    core.new_volume("db").unwrap();
    core.new_volume("other").unwrap();
    core.write_volume("db", 0, b"hello").unwrap();
    core.snapshot_now("db@manual");

    // First pass: a run at once, on db only.
    let pass = core.run_policies(at(T0));
    assert_eq!(pass.created, [label(T0)]);
    assert_eq!(pass.next, Some(at(T0 + HOUR)));
    // Its snapshot still pending counts as the last run.
    assert!(core.run_policies(at(T0 + 60)).created.is_empty());
    core.engine().run_queued();

    for hour in 1..=2 {
        let pass = core.run_policies(at(T0 + hour * HOUR));
        assert_eq!(pass.created, [label(T0 + hour * HOUR)]);
        assert!(pass.pruned.is_empty(), "pending ones are not counted");
        core.engine().run_queued();
    }
    // Three completed, keep = 2: the oldest goes; the manual snapshot stays.
    let pass = core.run_policies(at(T0 + 2 * HOUR + 1));
    assert!(pass.created.is_empty());
    assert_eq!(pass.pruned, [label(T0)]);
    assert_eq!(core.status(&label(T0)), None);
    assert_eq!(core.status("db@manual").as_deref(), Some("completed"));

    // A locked snapshot is never pruned.
    let locked = label(T0 + HOUR);
    let dir = core
        .lookup(SNAPSHOTS_DIR, OsStr::new(&locked))
        .expect("snapshot")
        .ino;
    core.setxattr(
        dir,
        OsStr::new(LOCK_XATTR),
        Some(b"2200-01-01T00:00:00Z"),
        XattrFlags::default(),
        &root(),
    )
    .expect("lock");
    for hour in 3..=4 {
        core.run_policies(at(T0 + hour * HOUR));
        core.engine().run_queued();
    }
    let pass = core.run_policies(at(T0 + 4 * HOUR + 1));
    assert_eq!(pass.pruned, [label(T0 + 2 * HOUR)]);
    assert_eq!(core.status(&locked).as_deref(), Some("completed"));

    // Ten hours of downtime: one catch-up run, not ten.
    let back = T0 + 14 * HOUR + 30;
    assert_eq!(core.run_policies(at(back)).created, [label(back)]);
    core.engine().run_queued();
    let pass = core.run_policies(at(back + 1));
    assert!(pass.created.is_empty());
    assert_eq!(pass.next, Some(at(back + HOUR)));

    // A volume busy with another snapshot is tried again soon.
    core.snapshot("db@by-hand").unwrap();
    let due = back + HOUR;
    let pass = core.run_policies(at(due));
    assert!(pass.created.is_empty());
    assert_eq!(pass.next, Some(at(due + 5)));
    core.engine().run_queued();
    assert_eq!(core.run_policies(at(due + 5)).created, [label(due + 5)]);
    core.engine().run_queued();

    // After a restart, the last run is the newest snapshot's label.
    core.shutdown();
    drop(core);
    let core = start(&storage, &settings).expect("restart");
    let pass = core.run_policies(at(due + 10));
    assert!(pass.created.is_empty());
    assert_eq!(pass.next, Some(at(due + 5 + HOUR)));
    let names: Vec<String> = core
        .readdir(SNAPSHOTS_DIR)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let auto: Vec<&String> = names.iter().filter(|n| n.starts_with("db@auto-")).collect();
    assert_eq!(auto.len(), 3, "two kept and the locked one: {names:?}");
    assert!(auto.contains(&&locked));
    assert!(!names.iter().any(|n| n.starts_with("other@")), "{names:?}");
}

#[test]
fn a_star_policy_covers_volumes_made_later_and_keep_for_prunes_by_age() {
    let storage = MemStorage::new();
    let mut settings = settings();
    settings.policies = vec![Policy {
        name: "daily".into(),
        volumes: Volumes::All,
        every_secs: 86_400,
        keep: None,
        keep_for_secs: Some(3 * 86_400),
        label: LabelPattern::parse("daily-%Y-%m-%d").unwrap(),
    }];
    let core = start(&storage, &settings).expect("start");
    // No volume: nothing to do, nothing due.
    let pass = core.run_policies(at(T0));
    assert!(pass.created.is_empty() && pass.next.is_none());
    core.new_volume("a").unwrap();
    let mut pruned = Vec::new();
    for day in 0..6 {
        let pass = core.run_policies(at(T0 + day * 86_400 + 7 * HOUR));
        assert_eq!(pass.created.len(), 1, "day {day}: {pass:?}");
        pruned.extend(pass.pruned);
        core.engine().run_queued();
    }
    // Each run at 07:00 is recorded as its day's midnight: by January 6th at 07:00,
    // only January 4th's, 5th's and 6th's are younger than three days.
    assert_eq!(
        pruned,
        [
            "a@daily-2030-01-01",
            "a@daily-2030-01-02",
            "a@daily-2030-01-03"
        ]
    );
    let pass = core.run_policies(at(T0 + 5 * 86_400 + 8 * HOUR));
    assert!(
        pass.created.is_empty() && pass.pruned.is_empty(),
        "{pass:?}"
    );
    // A daily label records its day: the next run is the next midnight.
    assert_eq!(pass.next, Some(at(T0 + 6 * 86_400)));
    // A volume made later gets its first run at once.
    core.new_volume("b").unwrap();
    assert_eq!(
        core.run_policies(at(T0 + 5 * 86_400 + 9 * HOUR)).created,
        ["b@daily-2030-01-06"]
    );
}
