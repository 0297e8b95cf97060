//! Name rules for volumes and snapshots (DESIGN.md section 2).
//!
//! A volume name or snapshot label is 1–64 characters of `[A-Za-z0-9._-]` and does not
//! start with `.`. A volume appears as `volumes/<name>.img`; a snapshot as
//! `snapshots/<volume>@<label>`. Parsing is the only way to obtain a [`VolumeName`] or
//! [`SnapshotName`], so everything past the FUSE edge holds names already checked.

use std::ffi::OsStr;
use std::fmt;

/// Longest volume name or snapshot label, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The suffix every volume file carries in `volumes/`.
pub const VOLUME_SUFFIX: &str = ".img";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is not valid UTF-8")]
    NotUtf8,
    #[error("name `{0}` is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    #[error(
        "name `{0}` is invalid: use 1-{MAX_NAME_LEN} of A-Z a-z 0-9 . _ - and do not start with `.`"
    )]
    Invalid(String),
    #[error("volume file `{0}` must be named <volume>.img")]
    MissingImgSuffix(String),
    #[error("snapshot `{0}` must be named <volume>@<label>")]
    MissingAt(String),
}

/// A checked volume name (without the `.img` suffix).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

/// A checked snapshot name: `<volume>@<label>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName {
    volume: VolumeName,
    label: String,
}

fn check_component(text: &str) -> Result<(), NameError> {
    if text.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(text.to_string()));
    }
    let valid_chars = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if text.is_empty() || text.starts_with('.') || !valid_chars {
        return Err(NameError::Invalid(text.to_string()));
    }
    Ok(())
}

fn utf8(name: &OsStr) -> Result<&str, NameError> {
    name.to_str().ok_or(NameError::NotUtf8)
}

impl VolumeName {
    pub fn parse(text: &str) -> Result<VolumeName, NameError> {
        check_component(text)?;
        Ok(VolumeName(text.to_string()))
    }

    /// Parses a directory entry of `volumes/`: `<name>.img`.
    pub fn from_file_name(file_name: &OsStr) -> Result<VolumeName, NameError> {
        let text = utf8(file_name)?;
        match text.strip_suffix(VOLUME_SUFFIX) {
            Some(stem) => VolumeName::parse(stem),
            None if text.len() > MAX_NAME_LEN + VOLUME_SUFFIX.len() => {
                Err(NameError::TooLong(text.to_string()))
            }
            None => Err(NameError::MissingImgSuffix(text.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn file_name(&self) -> String {
        format!("{}{VOLUME_SUFFIX}", self.0)
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl SnapshotName {
    pub fn new(volume: VolumeName, label: &str) -> Result<SnapshotName, NameError> {
        check_component(label)?;
        Ok(SnapshotName {
            volume,
            label: label.to_string(),
        })
    }

    pub fn parse(text: &str) -> Result<SnapshotName, NameError> {
        let Some((volume, label)) = text.split_once('@') else {
            return Err(if text.len() > 2 * MAX_NAME_LEN + 1 {
                NameError::TooLong(text.to_string())
            } else {
                NameError::MissingAt(text.to_string())
            });
        };
        SnapshotName::new(VolumeName::parse(volume)?, label)
    }

    pub fn from_file_name(file_name: &OsStr) -> Result<SnapshotName, NameError> {
        SnapshotName::parse(utf8(file_name)?)
    }

    pub fn volume(&self) -> &VolumeName {
        &self.volume
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "db", "db-1.prod_A", "A9", &"x".repeat(64)] {
            assert_eq!(VolumeName::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", "a@b", "a\0b"] {
            assert!(
                matches!(VolumeName::parse(bad), Err(NameError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            VolumeName::parse(&"x".repeat(65)),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn volume_files_need_the_img_suffix() {
        let name = VolumeName::from_file_name(OsStr::new("db.img")).unwrap();
        assert_eq!(name.as_str(), "db");
        assert_eq!(name.file_name(), "db.img");
        assert_eq!(
            VolumeName::from_file_name(OsStr::new("a.img.img"))
                .unwrap()
                .as_str(),
            "a.img"
        );
        assert!(matches!(
            VolumeName::from_file_name(OsStr::new("db")),
            Err(NameError::MissingImgSuffix(_))
        ));
        assert!(matches!(
            VolumeName::from_file_name(OsStr::new(".img")),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            VolumeName::from_file_name(OsStr::from_bytes(b"\xff.img")),
            Err(NameError::NotUtf8)
        ));
        let long = format!("{}.img", "v".repeat(65));
        assert!(matches!(
            VolumeName::from_file_name(OsStr::new(&long)),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn snapshot_names_split_on_at() {
        let name = SnapshotName::parse("db@nightly-1").unwrap();
        assert_eq!(name.volume().as_str(), "db");
        assert_eq!(name.label(), "nightly-1");
        assert_eq!(name.to_string(), "db@nightly-1");
        for bad in ["db", "@x", "db@", "db@a@b", "db@.x", "../x@y"] {
            assert!(SnapshotName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            SnapshotName::parse("db"),
            Err(NameError::MissingAt(_))
        ));
        let long = format!("db@{}", "l".repeat(65));
        assert!(matches!(
            SnapshotName::parse(&long),
            Err(NameError::TooLong(_))
        ));
    }
}
