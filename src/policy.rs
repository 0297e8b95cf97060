//! Snapshot policies (`[[policy]]` in `config.toml`): which volumes to snapshot, how
//! often, how many or how long to keep, and how to label the snapshots.
//!
//! Everything here is pure: the time is always passed in, so the schedule is tested
//! with a fake clock. The daemon ([`crate::fs::FsCore::run_policies`]) and
//! `ebsfs policy list` feed it the snapshots they see.
//!
//! **Where the last run is kept.** Nowhere new: a run's time is the one its label
//! records (the pattern holds the date and, as finely as it goes, the time), and a
//! policy's last run on a volume is that of the volume's newest snapshot whose label
//! matches the policy's pattern. The snapshots are the record of the runs, so the two cannot
//! disagree after a crash (a run whose `mkdir` failed left no snapshot and is tried
//! again; one that succeeded is remembered however the daemon stopped), and deleting
//! a policy's snapshots by hand makes it run again, as it should: nothing of it is
//! left.
//!
//! **Missed runs.** A run is due `every` after the last one. After downtime (or a
//! new volume, or a policy seen for the first time) a due volume gets one snapshot at
//! once, labelled with the time it is taken, and the next run is `every` after that:
//! the runs missed while the daemon was stopped are not made up one by one.

use std::fmt;

use crate::names::MAX_NAME_LEN;
use crate::namespace::records::days_from_civil;
use crate::namespace::{Timestamp, Xattrs};

const NANOS: i64 = 1_000_000_000;

/// The extended attribute that locks a snapshot against deletion until an RFC 3339
/// time; pruning never deletes a locked snapshot.
pub use crate::snapshot::LOCK_XATTR;

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub volumes: Volumes,
    pub every_secs: u64,
    /// Keep at least this many of the newest completed snapshots (per volume).
    pub keep: Option<usize>,
    /// Keep every completed snapshot younger than this.
    pub keep_for_secs: Option<u64>,
    pub label: LabelPattern,
}

/// Which volumes a policy snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Volumes {
    /// `"*"`: every volume, also those made later.
    All,
    Named(Vec<String>),
}

impl Volumes {
    pub fn covers(&self, volume: &str) -> bool {
        match self {
            Volumes::All => true,
            Volumes::Named(names) => names.iter().any(|n| n == volume),
        }
    }

    /// Whether some volume is covered by both.
    pub fn overlaps(&self, other: &Volumes) -> bool {
        match (self, other) {
            (Volumes::All, _) | (_, Volumes::All) => true,
            (Volumes::Named(names), other) => names.iter().any(|n| other.covers(n)),
        }
    }
}

impl fmt::Display for Volumes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Volumes::All => f.write_str("*"),
            Volumes::Named(names) => f.write_str(&names.join(",")),
        }
    }
}

/// A snapshot as policies see it (its time is the one its label records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snap {
    pub volume: String,
    pub label: String,
    pub completed: bool,
    /// Its capture failed (status `error`).
    pub failed: bool,
    /// Locked against deletion until then (see [`locked_until`]).
    pub locked_until: Option<Timestamp>,
}

impl Snap {
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.label)
    }
}

impl Policy {
    /// Whether `snap` is one of this policy's: of its volumes, its label matching.
    pub fn owns(&self, snap: &Snap) -> bool {
        self.run_time(snap).is_some()
    }

    /// When the run that took `snap` was, if `snap` is one of this policy's.
    fn run_time(&self, snap: &Snap) -> Option<Timestamp> {
        if !self.volumes.covers(&snap.volume) {
            return None;
        }
        self.label.time_of(&snap.label)
    }

    fn every(&self) -> i64 {
        secs_to_nanos(self.every_secs)
    }

    /// When this policy next snapshots `volume`: `every` after its last run, or `now`
    /// if it never ran (or a run is overdue: one catch-up run, see the module doc).
    pub fn next_run(&self, volume: &str, snaps: &[Snap], now: Timestamp) -> Timestamp {
        let last = snaps
            .iter()
            .filter(|s| s.volume == volume)
            .filter_map(|s| self.run_time(s))
            .max();
        match last {
            // A clock set back leaves a "last run" in the future: wait `every` from now
            // at the most, not from that future time.
            Some(last) => Timestamp(last.0.min(now.0).saturating_add(self.every())),
            None => now,
        }
    }

    /// The volumes (of `volumes`, those that exist) this policy snapshots now.
    pub fn due<'a>(&self, volumes: &'a [String], snaps: &[Snap], now: Timestamp) -> Vec<&'a str> {
        volumes
            .iter()
            .filter(|v| self.volumes.covers(v) && self.next_run(v, snaps, now) <= now)
            .map(String::as_str)
            .collect()
    }

    /// The label of a run at `now`.
    pub fn label_at(&self, now: Timestamp) -> String {
        self.label.render(now)
    }

    /// The snapshots this policy deletes at `now`, oldest first. Per volume, of its
    /// own completed snapshots, newest first, one is kept when it is among the `keep`
    /// newest, or younger than `keep_for`, or locked; the rest go. Pending snapshots
    /// are neither counted nor deleted. A failed one is not counted, and goes once a
    /// later one of the volume has completed (it is kept until then, with its
    /// reason in `info`), unless locked.
    pub fn prune<'a>(&self, snaps: &'a [Snap], now: Timestamp) -> Vec<&'a Snap> {
        let mut own: Vec<(&Snap, Timestamp)> = snaps
            .iter()
            .filter(|s| s.completed)
            .filter_map(|s| Some((s, self.run_time(s)?)))
            .collect();
        let superseded: Vec<(Timestamp, &Snap)> = snaps
            .iter()
            .filter(|s| s.failed && s.locked_until.is_none_or(|t| t <= now))
            .filter_map(|s| Some((self.run_time(s)?, s)))
            .filter(|&(time, failed)| {
                own.iter()
                    .any(|&(s, t)| s.volume == failed.volume && t > time)
            })
            .collect();
        // Newest first per volume; ties by label, so the order never depends on input.
        own.sort_by(|(a, at), (b, bt)| (&a.volume, bt, &b.label).cmp(&(&b.volume, at, &a.label)));
        let young_after = self
            .keep_for_secs
            .map(|d| Timestamp(now.0.saturating_sub(secs_to_nanos(d))));
        let mut pruned = superseded;
        let mut rank = 0;
        for (i, &(snap, time)) in own.iter().enumerate() {
            rank = if i > 0 && own[i - 1].0.volume == snap.volume {
                rank + 1
            } else {
                0
            };
            let kept_by_count = self.keep.is_some_and(|k| rank < k);
            let kept_by_age = young_after.is_some_and(|t| time > t);
            let locked = snap.locked_until.is_some_and(|t| t > now);
            if !(kept_by_count || kept_by_age || locked) {
                pruned.push((time, snap));
            }
        }
        pruned.sort_by_key(|&(time, s)| (time, s.name()));
        pruned.into_iter().map(|(_, s)| s).collect()
    }
}

fn secs_to_nanos(secs: u64) -> i64 {
    (secs as i64).saturating_mul(NANOS)
}

/// Parses `"90s"`, `"15m"`, `"1h"`, `"7d"`, `"2w"`, or a sum such as `"1h30m"`;
/// returns seconds (more than zero).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration (such as \"30s\", \"15m\", \"1h\", \"7d\")");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = &rest[digits..digits + 1];
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(bad()),
        };
        total = number
            .checked_mul(scale)
            .and_then(|n| total.checked_add(n))
            .filter(|&n| n <= (i64::MAX / NANOS) as u64)
            .ok_or_else(|| format!("`{text}` is too long a duration"))?;
        rest = &rest[digits + 1..];
    }
    if total == 0 {
        return Err(format!("`{text}` must be more than zero"));
    }
    Ok(total)
}

/// Shows seconds the way [`parse_duration`] reads them: `"1h30m"`, `"2s"`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, scale) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= scale {
            out.push_str(&format!("{}{unit}", rest / scale));
            rest %= scale;
        }
    }
    out
}

/// A time field of a label pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
}

impl Field {
    fn width(self) -> usize {
        if self == Field::Year { 4 } else { 2 }
    }

    /// The span of time one value of the field stands for, when the fields coarser
    /// than it are there too.
    fn resolution_secs(self) -> u64 {
        match self {
            Field::Year | Field::Month | Field::Day => 86_400,
            Field::Hour => 3600,
            Field::Minute => 60,
            Field::Second => 1,
        }
    }

    /// From coarsest to finest.
    const ALL: [Field; 6] = [
        Field::Year,
        Field::Month,
        Field::Day,
        Field::Hour,
        Field::Minute,
        Field::Second,
    ];
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A label pattern: label characters (`A-Za-z0-9._-`) and the UTC time fields `%Y`
/// (4 digits), `%m`, `%d`, `%H`, `%M`, `%S` (2 digits each). It holds the date (`%Y`,
/// `%m`, `%d`) and may add the hour, then the minute, then the second, each once, so
/// that a label tells the time of its run to the finest field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelPattern {
    text: String,
    parts: Vec<Part>,
}

impl fmt::Display for LabelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl LabelPattern {
    pub fn parse(text: &str) -> Result<LabelPattern, String> {
        let mut parts = Vec::new();
        let mut chars = text.chars();
        let mut literal = String::new();
        while let Some(c) = chars.next() {
            if c == '%' {
                let field = match chars.next() {
                    Some('Y') => Field::Year,
                    Some('m') => Field::Month,
                    Some('d') => Field::Day,
                    Some('H') => Field::Hour,
                    Some('M') => Field::Minute,
                    Some('S') => Field::Second,
                    Some(other) => {
                        return Err(format!(
                            "label `{text}`: unknown field %{other} (use %Y %m %d %H %M %S)"
                        ));
                    }
                    None => return Err(format!("label `{text}` ends with a lone %")),
                };
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Field(field));
            } else if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                literal.push(c);
            } else {
                return Err(format!(
                    "label `{text}`: {c:?} cannot be in a snapshot label (use A-Z a-z 0-9 . _ -)"
                ));
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        let pattern = LabelPattern {
            text: text.to_string(),
            parts,
        };
        let fields: Vec<Field> = pattern
            .parts
            .iter()
            .filter_map(|p| match p {
                Part::Field(f) => Some(*f),
                Part::Text(_) => None,
            })
            .collect();
        let once = Field::ALL
            .iter()
            .all(|f| fields.iter().filter(|g| *g == f).count() <= 1);
        let prefix = Field::ALL[..fields.len().min(6)]
            .iter()
            .all(|f| fields.contains(f));
        if !once || !prefix || fields.len() < 3 {
            return Err(format!(
                "label `{text}` must hold the date (%Y %m %d) and may add %H, then %M, then %S, \
                 each once: the label records when its snapshot was taken"
            ));
        }
        let len: usize = pattern
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                Part::Field(f) => f.width(),
            })
            .sum();
        if len > MAX_NAME_LEN {
            return Err(format!(
                "label `{text}` makes labels of {len} characters, more than {MAX_NAME_LEN}"
            ));
        }
        Ok(pattern)
    }

    /// How far apart runs must be for their labels to differ; `None` without fields.
    pub fn resolution_secs(&self) -> Option<u64> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Field(f) => Some(f.resolution_secs()),
                Part::Text(_) => None,
            })
            .min()
    }

    /// The label of a run at `at` (UTC).
    pub fn render(&self, at: Timestamp) -> String {
        let secs = at.0.div_euclid(NANOS);
        let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = crate::namespace::records::civil_from_days(days);
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(Field::Year) => out.push_str(&format!("{:04}", year.clamp(0, 9999))),
                Part::Field(Field::Month) => out.push_str(&format!("{month:02}")),
                Part::Field(Field::Day) => out.push_str(&format!("{day:02}")),
                Part::Field(Field::Hour) => out.push_str(&format!("{:02}", day_secs / 3600)),
                Part::Field(Field::Minute) => out.push_str(&format!("{:02}", day_secs / 60 % 60)),
                Part::Field(Field::Second) => out.push_str(&format!("{:02}", day_secs % 60)),
            }
        }
        out
    }

    /// Whether `label` is one this pattern renders.
    pub fn matches(&self, label: &str) -> bool {
        self.time_of(label).is_some()
    }

    /// The time a label of this pattern records (its run's, down to the finest
    /// field); `None` if the pattern does not render `label`: other text, or fields
    /// that are not digits of their width or not a valid date and time.
    pub fn time_of(&self, label: &str) -> Option<Timestamp> {
        let mut rest = label;
        // Year, month, day, hour, minute, second.
        let mut values = [1970i64, 1, 1, 0, 0, 0];
        for part in &self.parts {
            match part {
                Part::Text(t) => rest = rest.strip_prefix(t.as_str())?,
                Part::Field(f) => {
                    let w = f.width();
                    let digits = rest.get(..w)?;
                    if !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    let slot = Field::ALL.iter().position(|g| g == f)?;
                    values[slot] = digits.parse().ok()?;
                    rest = &rest[w..];
                }
            }
        }
        let [year, month, day, hour, minute, second] = values;
        let valid = rest.is_empty()
            && (1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60;
        if !valid {
            return None;
        }
        let days = days_from_civil(year, month as u32, day as u32);
        Some(Timestamp(
            (days * 86_400 + hour * 3600 + minute * 60 + second) * NANOS,
        ))
    }
}

/// Until when a snapshot with these extended attributes is locked against deletion
/// ([`LOCK_XATTR`], an RFC 3339 time). A lock that cannot be read counts as locked
/// for ever: pruning errs on the side of keeping.
pub fn locked_until(xattrs: &Xattrs) -> Option<Timestamp> {
    xattrs.get(LOCK_XATTR).map(|value| lock_expiry(&value))
}

/// The time a [`LOCK_XATTR`] value locks until; for ever if it is not RFC 3339.
pub fn lock_expiry(value: &[u8]) -> Timestamp {
    std::str::from_utf8(value)
        .ok()
        .and_then(Timestamp::parse_rfc3339)
        .unwrap_or(Timestamp(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: seconds since the epoch.
    fn at(secs: i64) -> Timestamp {
        Timestamp(secs * NANOS)
    }

    const T0: i64 = 1_795_000_000; // 2026-11-18

    fn policy(every: &str, keep: Option<usize>, keep_for: Option<&str>) -> Policy {
        Policy {
            name: "auto".into(),
            volumes: Volumes::Named(vec!["db".into(), "log".into()]),
            every_secs: parse_duration(every).unwrap(),
            keep,
            keep_for_secs: keep_for.map(|d| parse_duration(d).unwrap()),
            label: LabelPattern::parse("auto-%Y%m%d-%H%M%S").unwrap(),
        }
    }

    fn snap(p: &Policy, volume: &str, secs: i64) -> Snap {
        Snap {
            volume: volume.into(),
            label: p.label_at(at(secs)),
            completed: true,
            failed: false,
            locked_until: None,
        }
    }

    /// The time a snapshot's label records.
    fn time(p: &Policy, s: &Snap) -> Timestamp {
        p.label.time_of(&s.label).unwrap()
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("2s"), Ok(2));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400));
        assert_eq!(parse_duration("1w"), Ok(7 * 86_400));
        for bad in ["", "0s", "1", "h", "1x", "1.5h", "-1h", "1 h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(2), "2s");
    }

    #[test]
    fn labels_render_in_utc_and_match_only_their_shape() {
        let p = LabelPattern::parse("auto-%Y%m%d-%H%M%S").unwrap();
        // 2026-11-25T08:40:00Z
        let label = p.render(Timestamp(1_795_596_000_123_000_000));
        assert_eq!(label, "auto-20261125-084000");
        assert_eq!(p.time_of(&label), Some(at(1_795_596_000)));
        assert!(crate::names::SnapshotName::parse(&format!("db@{label}")).is_ok());
        for other in [
            "auto-20261125-08400",
            "auto-20261125-0840000",
            "auto-2026112x-084000",
            "manual-20261125-084000",
            "auto-20261125-084000.keep",
            "auto-20261325-084000",
            "auto-20261125-246000",
        ] {
            assert!(!p.matches(other), "{other}");
        }
        assert_eq!(p.resolution_secs(), Some(1));
        let daily = LabelPattern::parse("daily.%Y-%m-%d").unwrap();
        assert_eq!(daily.resolution_secs(), Some(86_400));
        // A day's label records the day: its run counts from midnight UTC.
        assert_eq!(daily.time_of("daily.2026-11-25"), Some(at(1_795_564_800)));
        let any_order = LabelPattern::parse("%H%M-%d.%m.%Y").unwrap();
        assert_eq!(
            any_order.time_of("0840-25.11.2026"),
            Some(at(1_795_596_000))
        );
    }

    #[test]
    fn bad_label_patterns_are_refused() {
        for bad in [
            "plain",
            "x-%H%M%S",
            "%Y%m%d-%M",
            "%Y%m%d%d",
            "a/%S",
            "a %S",
            "%Q",
            "x%",
            &format!("{}%Y%m%d", "a".repeat(57)),
        ] {
            assert!(LabelPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(LabelPattern::parse(&format!("{}%Y%m%d", "a".repeat(56))).is_ok());
    }

    #[test]
    fn a_policy_runs_every_interval() {
        let p = policy("1h", Some(3), None);
        let volumes = vec!["db".to_string(), "log".to_string(), "other".to_string()];
        // Never ran: due at once, on its volumes only.
        assert_eq!(p.due(&volumes, &[], at(T0)), ["db", "log"]);
        let snaps = vec![snap(&p, "db", T0), snap(&p, "log", T0)];
        assert!(p.due(&volumes, &snaps, at(T0 + 3599)).is_empty());
        assert_eq!(p.next_run("db", &snaps, at(T0 + 10)), at(T0 + 3600));
        assert_eq!(p.due(&volumes, &snaps, at(T0 + 3600)), ["db", "log"]);
        // Snapshots of other labels do not count as runs.
        let mut manual = snap(&p, "db", T0 + 3000);
        manual.label = format!("x{}", manual.label);
        let with_manual = [snaps.clone(), vec![manual]].concat();
        assert_eq!(p.next_run("db", &with_manual, at(T0)), at(T0 + 3600));
    }

    #[test]
    fn downtime_makes_one_catch_up_run_not_a_burst() {
        let p = policy("1h", Some(24), None);
        let volumes = vec!["db".to_string()];
        let mut snaps = vec![snap(&p, "db", T0)];
        // The daemon was down for ten hours: one run is due now...
        let back = T0 + 10 * 3600 + 123;
        assert_eq!(p.due(&volumes, &snaps, at(back)), ["db"]);
        snaps.push(snap(&p, "db", back));
        // ...and once it is taken, nothing more until an interval after it.
        assert!(p.due(&volumes, &snaps, at(back + 1)).is_empty());
        assert_eq!(p.next_run("db", &snaps, at(back + 1)), at(back + 3600));
        // A clock set back does not postpone runs by more than an interval.
        assert_eq!(p.next_run("db", &snaps, at(T0 - 7200)), at(T0 - 3600));
    }

    #[test]
    fn a_pending_run_counts_as_the_last_run() {
        let p = policy("1m", Some(1), None);
        let mut pending = snap(&p, "db", T0);
        pending.completed = false;
        let volumes = vec!["db".to_string()];
        assert!(p.due(&volumes, &[pending], at(T0 + 30)).is_empty());
    }

    #[test]
    fn prune_keeps_the_newest_and_never_locked_or_pending_ones() {
        let p = policy("1h", Some(2), None);
        let mut snaps: Vec<Snap> = (0..5).map(|i| snap(&p, "db", T0 + i * 3600)).collect();
        snaps.push(snap(&p, "log", T0));
        let now = at(T0 + 5 * 3600);
        let names = |v: Vec<&Snap>| v.into_iter().map(|s| time(&p, s)).collect::<Vec<_>>();
        // db: the three oldest go; log has one, under keep.
        assert_eq!(
            names(p.prune(&snaps, now)),
            [at(T0), at(T0 + 3600), at(T0 + 7200)]
        );
        // A locked one stays (and still counts as one of the oldest).
        snaps[1].locked_until = Some(at(T0 + 100 * 3600));
        assert_eq!(names(p.prune(&snaps, now)), [at(T0), at(T0 + 7200)]);
        // A lock that has run out does not keep it.
        snaps[1].locked_until = Some(at(T0));
        assert_eq!(p.prune(&snaps, now).len(), 3);
        // Pending snapshots are neither deleted nor counted among those kept.
        snaps[4].completed = false;
        assert_eq!(
            names(p.prune(&snaps, now)),
            [at(T0), at(T0 + 3600)],
            "the two newest completed (2 and 3) are kept"
        );
        // Another label, or another volume, is not the policy's to delete.
        let mut other = snap(&p, "db", T0 - 9999);
        other.label = "manual".into();
        let mut foreign = snap(&p, "other", T0 - 9999);
        foreign.volume = "other".into();
        snaps.extend([other, foreign]);
        assert_eq!(p.prune(&snaps, now).len(), 2);
    }

    #[test]
    fn a_failed_snapshot_goes_once_a_later_one_completed() {
        let p = policy("1h", Some(5), None);
        let mut snaps: Vec<Snap> = (0..3).map(|i| snap(&p, "db", T0 + i * 3600)).collect();
        snaps.push(snap(&p, "log", T0));
        for s in &mut snaps[1..] {
            s.completed = false;
            s.failed = true;
        }
        let now = at(T0 + 3 * 3600);
        // db@1h failed and nothing completed after it yet: kept, with its reason.
        assert!(p.prune(&snaps, now).is_empty());
        snaps.push(snap(&p, "db", T0 + 3 * 3600));
        let pruned: Vec<String> = p.prune(&snaps, now).iter().map(|s| s.name()).collect();
        assert_eq!(
            pruned,
            [snaps[1].name(), snaps[2].name()],
            "not log's, nor the kept"
        );
        // A locked one stays.
        snaps[1].locked_until = Some(at(T0 + 100 * 3600));
        assert_eq!(p.prune(&snaps, now).len(), 1);
    }

    #[test]
    fn keep_for_keeps_what_is_young_and_keep_is_then_a_minimum() {
        let snaps_of =
            |p: &Policy| -> Vec<Snap> { (0..10).map(|i| snap(p, "db", T0 + i * 86_400)).collect() };
        let now = at(T0 + 10 * 86_400);
        // Only keep_for: the last three days (created after now - 3d).
        let p = policy("1d", None, Some("3d"));
        let snaps = snaps_of(&p);
        assert_eq!(p.prune(&snaps, now).len(), 8);
        // keep_for with keep = 5: five stay although only two are young.
        let p = policy("1d", Some(5), Some("3d"));
        assert_eq!(p.prune(&snaps, now).len(), 5);
        // keep = 0 with keep_for: age alone.
        let p = policy("1d", Some(0), Some("3d"));
        assert_eq!(p.prune(&snaps, now).len(), 8);
    }

    #[test]
    fn locks_are_read_from_the_extended_attribute() {
        let mut xattrs = Xattrs::default();
        assert_eq!(locked_until(&xattrs), None);
        xattrs.set(LOCK_XATTR, b"2026-11-25T08:40:00.123Z");
        assert_eq!(
            locked_until(&xattrs),
            Some(Timestamp(1_795_596_000_123_000_000))
        );
        // Unreadable (setting the attribute refuses such values): kept for ever.
        xattrs.set(LOCK_XATTR, b"next tuesday");
        assert_eq!(locked_until(&xattrs), Some(Timestamp(i64::MAX)));
    }
}
