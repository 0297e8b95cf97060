//! The records the namespace keeps: volumes and snapshots, their owners and
//! attributes, and the ids that name them.
//!
//! Records are stored as TOML text (see [`super::tables`]): they are small, rarely
//! written, and readable when debugging. Ids are never reused, so an id (and the inode
//! number derived from it) always means the same object.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::NamespaceError;

/// A volume's id; also the id of its snapshots' manifest lineage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VolumeId(pub u64);

/// A snapshot's id: increasing, so it also orders snapshots within a lineage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Wall-clock time as nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since.as_nanos().min(i64::MAX as u128) as i64)
    }

    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_nanos(self.0.max(0) as u64)
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-25T08:40:00.123Z`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0.div_euclid(1_000_000_000);
        let millis = self.0.rem_euclid(1_000_000_000) / 1_000_000;
        let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            day_secs / 3600,
            day_secs / 60 % 60,
            day_secs % 60
        )
    }
}

impl Timestamp {
    /// Parses RFC 3339 in UTC: `2027-01-01T00:00:00Z`, with optional fractional
    /// seconds, `Z` or `+00:00`. `None` for anything else.
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let text = text.trim();
        let body = text
            .strip_suffix('Z')
            .or_else(|| text.strip_suffix("+00:00"))?;
        let (date, time) = body.split_once('T')?;
        let mut d = date.split('-');
        let (year, month, day): (i64, u32, u32) = (
            d.next()?.parse().ok()?,
            d.next()?.parse().ok()?,
            d.next()?.parse().ok()?,
        );
        let (hms, fraction) = match time.split_once('.') {
            Some((hms, f)) if !f.is_empty() && f.len() <= 9 => (hms, f),
            Some(_) => return None,
            None => (time, ""),
        };
        let mut t = hms.split(':');
        let (hour, minute, second): (i64, i64, i64) = (
            t.next()?.parse().ok()?,
            t.next()?.parse().ok()?,
            t.next()?.parse().ok()?,
        );
        if d.next().is_some()
            || t.next().is_some()
            || !(1..=12).contains(&month)
            || day == 0
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let days = days_from_civil(year, month, day);
        if civil_from_days(days) != (year, month, day) {
            return None; // 31 April and the like
        }
        let nanos: i64 = if fraction.is_empty() {
            0
        } else {
            format!("{fraction:0<9}").parse().ok()?
        };
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
        secs.checked_mul(1_000_000_000)?
            .checked_add(nanos)
            .map(Timestamp)
    }
}

/// (year, month, day) → days since 1970-01-01 (the inverse of [`civil_from_days`]).
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's method).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Extended attributes of a volume or snapshot: `user.*` attributes and POSIX ACLs
/// (`system.posix_acl_*`, in the kernel's xattr form), values hex-encoded so
/// arbitrary bytes survive the TOML text form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Xattrs(BTreeMap<String, String>);

impl Xattrs {
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.0.get(name).and_then(|hex| decode_hex(hex))
    }

    pub fn set(&mut self, name: &str, value: &[u8]) {
        self.0.insert(name.to_string(), encode_hex(value));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.0.remove(name).is_some()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The `user.*` attributes only: what a snapshot inherits from its volume (an ACL
    /// guards the one object it is set on; a snapshot starts private).
    pub fn user_only(&self) -> Xattrs {
        Xattrs(
            self.0
                .iter()
                .filter(|(name, _)| name.starts_with("user."))
                .map(|(name, hex)| (name.clone(), hex.clone()))
                .collect(),
        )
    }

    /// Each attribute's name and the length of its value in bytes.
    pub fn sizes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.0
            .iter()
            .map(|(name, hex)| (name.as_str(), hex.len() / 2))
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of hex `text` (either case); `None` if it is not hex.
pub(crate) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Ownership and permission bits of a volume or snapshot directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub block_size: u32,
    pub created: Timestamp,
    pub owner: Owner,
    #[serde(default)]
    pub xattrs: Xattrs,
    /// The snapshot the next capture is incremental against: the latest completed one,
    /// possibly already deleted by the user and kept hidden for this purpose.
    pub base_snapshot: Option<SnapshotId>,
    /// Set when the dirty map cannot be trusted (after a host crash): the next capture
    /// compares every block with `base_snapshot` instead.
    #[serde(default)]
    pub full_compare: bool,
    /// The largest size any completed snapshot of the volume ever had, deleted ones
    /// included: blocks a shrink cut off below it may still show through from older
    /// entries (a deleted snapshot's entries move to its successor), so captures
    /// re-examine them.
    #[serde(default)]
    pub high_water_bytes: u64,
    /// A volume made from a snapshot (see `lineage_parents`) that holds every block
    /// itself and no longer reads the snapshot.
    #[serde(default)]
    pub hydrated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Pending,
    Completed,
    Error,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Pending => "pending",
            SnapshotStatus::Completed => "completed",
            SnapshotStatus::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub volume: String,
    pub label: String,
    /// The volume it was taken of (the volume may be gone).
    pub lineage: VolumeId,
    pub size_bytes: u64,
    pub block_size: u32,
    pub created: Timestamp,
    pub completed: Option<Timestamp>,
    pub status: SnapshotStatus,
    /// Deleted by the user but kept, invisible, because its volume's next snapshot
    /// will be incremental against it.
    #[serde(default)]
    pub hidden: bool,
    /// Name of the snapshot this one is incremental against.
    pub parent: Option<String>,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
    pub owner: Owner,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub xattrs: Xattrs,
    pub error: Option<String>,
    /// With a snapshot store: the capture is durable in the data directory and the
    /// snapshot stays `pending` only until its upload completes.
    #[serde(default)]
    pub captured: bool,
    /// With a snapshot store: the name of its root in the bucket, once uploaded.
    #[serde(default)]
    pub remote_root: Option<String>,
    /// While captured: the blocks its capture re-examines besides its capture set
    /// (`[start, end)`), so that a capture a restart interrupted resumes alike.
    #[serde(default)]
    pub reexamine: Option<[u64; 2]>,
    /// Deleted into the recycle bin at this time: shown in `recycle-bin/`, not in
    /// `snapshots/`, kept whole until restored or purged. Its name stays taken.
    #[serde(default)]
    pub binned: Option<Timestamp>,
}

impl SnapshotRecord {
    pub fn name(&self) -> String {
        format!("{}@{}", self.volume, self.label)
    }

    /// Whether its manifest entries are final: completed, or captured (uploading, or
    /// whose upload failed for good: later snapshots may be incremental against it).
    pub fn is_captured(&self) -> bool {
        self.status == SnapshotStatus::Completed || self.captured
    }

    /// Whether it is shown in `snapshots/`: neither hidden (deleted, kept as a base)
    /// nor in the recycle bin.
    pub fn is_visible(&self) -> bool {
        !self.hidden && self.binned.is_none()
    }

    /// Whether a capture is still reading its volume.
    pub fn is_capturing(&self) -> bool {
        self.status == SnapshotStatus::Pending && !self.captured
    }
}

pub(super) fn encode_record<T: Serialize>(record: &T) -> String {
    // Records hold only strings, integers, booleans and maps: serialization cannot fail.
    toml::to_string(record).unwrap_or_else(|e| panic!("record serialization: {e}"))
}

pub(super) fn decode_record<T: for<'de> Deserialize<'de>>(
    what: &str,
    text: &str,
) -> Result<T, NamespaceError> {
    toml::from_str(text).map_err(|e| NamespaceError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn rfc3339_parses_back_what_it_prints_and_refuses_nonsense() {
        for t in [0i64, 1_798_761_600_123_000_000, 951_782_400_000_000_000] {
            let ts = Timestamp(t);
            assert_eq!(Timestamp::parse_rfc3339(&ts.to_rfc3339()), Some(ts));
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2027-01-01T00:00:00Z"),
            Some(Timestamp(1_798_761_600_000_000_000))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2027-01-01T00:00:00+00:00"),
            Timestamp::parse_rfc3339("2027-01-01T00:00:00.000Z")
        );
        for bad in [
            "2027-01-01",
            "2027-01-01T00:00:00",
            "2027-13-01T00:00:00Z",
            "2027-04-31T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:00:00+02:00",
            "tomorrow",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        // 2026-11-25T08:40:00.123Z
        let t = Timestamp(1_795_596_000_123_000_000);
        assert_eq!(t.to_rfc3339(), "2026-11-25T08:40:00.123Z");
        assert_eq!(
            Timestamp(951_782_400 * 1_000_000_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn xattr_values_survive_any_bytes() {
        let mut x = Xattrs::default();
        x.set("user.bin", &[0, 255, 10, 13]);
        let text = encode_record(&x);
        let back: Xattrs = decode_record("x", &text).unwrap();
        assert_eq!(back.get("user.bin").unwrap(), vec![0, 255, 10, 13]);
        assert!(back.names().eq(["user.bin"]));
    }

    #[test]
    fn only_user_attributes_are_inherited() {
        let mut x = Xattrs::default();
        x.set("user.tag", b"a");
        x.set("system.posix_acl_access", &[2, 0, 0, 0]);
        x.set("system.posix_acl_default", &[2, 0, 0, 0]);
        let inherited = x.user_only();
        assert!(inherited.names().eq(["user.tag"]));
        assert_eq!(inherited.get("user.tag").unwrap(), b"a");
    }
}
