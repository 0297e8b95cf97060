//! `ebsfs policy list`: the `[[policy]]` tables of the config, with each one's next
//! run and the snapshots it would delete now, from the mount's `info` files.

use std::fs;
use std::io::Write;
use std::path::Path;

use clap::Subcommand;

use super::MountLocation;
use super::snapshot::{get_xattr, info_value, read_field, snapshot_dir, snapshot_names};
use crate::config::Settings;
use crate::names::VOLUME_SUFFIX;
use crate::namespace::Timestamp;
use crate::policy::{LOCK_XATTR, Policy, Snap, format_duration, lock_expiry};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Show each policy: its volumes, interval, retention, next run per volume, and
    /// the snapshots it would delete now.
    List {
        #[command(flatten)]
        location: MountLocation,
    },
}

pub fn run(cmd: PolicyCommand) -> i32 {
    let PolicyCommand::List { location } = cmd;
    let result = Settings::discover(location.config.as_deref())
        .map_err(|e| e.to_string())
        .and_then(|settings| {
            let mnt = location.resolve_mount()?;
            let (volumes, snaps) = read_mount(&mnt)?;
            let text = render(&settings.policies, &volumes, &snaps, Timestamp::now());
            let _ = std::io::stdout().write_all(text.as_bytes());
            Ok(())
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ebsfs policy list: {e}");
            1
        }
    }
}

/// The mount's volumes and this host's snapshots (not other hosts', which no policy
/// here deletes).
fn read_mount(mnt: &Path) -> Result<(Vec<String>, Vec<Snap>), String> {
    let mut volumes: Vec<String> = fs::read_dir(mnt.join("volumes"))
        .map_err(|e| format!("listing volumes: {e}"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(VOLUME_SUFFIX)
                .map(str::to_string)
        })
        .collect();
    volumes.sort();
    let mut snaps = Vec::new();
    for name in snapshot_names(mnt).map_err(|e| format!("listing snapshots: {e}"))? {
        let dir = snapshot_dir(mnt, &name);
        // A snapshot deleted meanwhile is simply not there.
        let Some(info) = read_field(&dir, "info")
            .ok()
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        else {
            continue;
        };
        if info_value(&info, "location") == "bucket" {
            continue;
        }
        let Some((_, label)) = name.split_once('@') else {
            continue;
        };
        let locked_until = get_xattr(&dir, LOCK_XATTR)
            .ok()
            .flatten()
            .map(|v| lock_expiry(&v));
        snaps.push(Snap {
            volume: info_value(&info, "volume"),
            label: label.to_string(),
            completed: info_value(&info, "status") == "completed",
            failed: info_value(&info, "status") == "error",
            locked_until,
        });
    }
    Ok((volumes, snaps))
}

/// What `policy list` prints.
fn render(policies: &[Policy], volumes: &[String], snaps: &[Snap], now: Timestamp) -> String {
    if policies.is_empty() {
        return "no policies: add [[policy]] tables to config.toml\n".into();
    }
    let mut out = String::new();
    for p in policies {
        let keep = [
            p.keep.map(|k| format!("keep {k}")),
            p.keep_for_secs
                .map(|d| format!("keep_for {}", format_duration(d))),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        out.push_str(&format!(
            "policy {}: volumes {}, every {}, {keep}, label {}\n",
            p.name,
            p.volumes,
            format_duration(p.every_secs),
            p.label
        ));
        let covered: Vec<&String> = volumes.iter().filter(|v| p.volumes.covers(v)).collect();
        if covered.is_empty() {
            out.push_str("  next run: none (no such volume yet)\n");
        }
        for v in covered {
            let next = p.next_run(v, snaps, now);
            let when = if next <= now {
                "now".to_string()
            } else {
                next.to_rfc3339()
            };
            out.push_str(&format!("  next run: {v} {when}\n"));
        }
        let pruned = p.prune(snaps, now);
        if pruned.is_empty() {
            out.push_str("  would delete: nothing\n");
        }
        for s in pruned {
            out.push_str(&format!("  would delete: {}\n", s.name()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LabelPattern, Volumes};

    #[test]
    fn list_shows_next_runs_and_what_would_go() {
        let p = Policy {
            name: "hourly".into(),
            volumes: Volumes::Named(vec!["db".into(), "new".into()]),
            every_secs: 3600,
            keep: Some(1),
            keep_for_secs: None,
            label: LabelPattern::parse("h-%Y%m%d-%H%M%S").unwrap(),
        };
        let t0 = Timestamp(1_795_596_000_000_000_000); // 2026-11-25T08:40:00Z
        let snap = |secs: i64| Snap {
            volume: "db".into(),
            label: p.label_at(Timestamp(t0.0 + secs * 1_000_000_000)),
            completed: true,
            failed: false,
            locked_until: None,
        };
        let snaps = vec![snap(0), snap(3600)];
        let volumes = vec!["db".to_string(), "new".to_string(), "x".to_string()];
        let text = render(
            std::slice::from_ref(&p),
            &volumes,
            &snaps,
            Timestamp(t0.0 + 4000 * 1_000_000_000),
        );
        assert_eq!(
            text,
            "policy hourly: volumes db,new, every 1h, keep 1, label h-%Y%m%d-%H%M%S\n  \
             next run: db 2026-11-25T10:40:00.000Z\n  next run: new now\n  \
             would delete: db@h-20261125-084000\n"
        );
        assert!(render(&[], &volumes, &snaps, t0).starts_with("no policies"));
    }
}
