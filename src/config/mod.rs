//! `config.toml` → typed [`Settings`].
//!
//! The repository's `config.toml` is compiled in as the defaults; a user file only
//! needs the keys it changes, and command-line values override both. Every error names
//! the file, the line and the key, so a typo never turns into a silent default.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod policy;
pub mod store;

pub use store::{PayloadChecksum, StoreSettings};

/// The defaults, exactly as shipped in the repository's `config.toml`.
pub const EMBEDDED_CONFIG: &str = include_str!("../../config.toml");

const MIN_BLOCK_SIZE: u64 = 4096;
const MAX_BLOCK_SIZE: u64 = 4 << 20;

/// Validated settings for one mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub mountpoint: PathBuf,
    pub block_size_bytes: u32,
    pub max_volume_size_bytes: u64,
    pub compression_level: i32,
    pub capture_threads: usize,
    pub fuse_threads: usize,
    pub cache_size_bytes: u64,
    pub allow_other: bool,
    /// Copy the snapshot's blocks into volumes made from snapshots in the background.
    pub hydrate: bool,
    /// Refuse making snapshots public, and hide what already is (EBS's "block public
    /// access for snapshots").
    pub block_public_access: bool,
    /// This host's name in a bucket shared with others.
    pub host_id: String,
    /// The S3-compatible snapshot store, if any (`[store]`).
    pub store: Option<StoreSettings>,
    /// Scheduled snapshots and their retention (`[[policy]]` tables).
    pub policies: Vec<crate::policy::Policy>,
    /// With a recycle bin: how long a deleted snapshot is kept there, in seconds.
    pub recycle_bin_secs: Option<u64>,
}

/// One config file's keys, all optional so a file may override only some.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    block_size: Option<ByteSize>,
    max_volume_size: Option<ByteSize>,
    compression_level: Option<i32>,
    capture_threads: Option<usize>,
    fuse_threads: Option<usize>,
    cache_size: Option<ByteSize>,
    allow_other: Option<bool>,
    hydrate: Option<bool>,
    block_public_access: Option<bool>,
    host_id: Option<String>,
    store: Option<store::StoreTable>,
    policy: Option<Vec<policy::PolicyTable>>,
    recycle_bin: Option<String>,
}

/// What went wrong with a config file, and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl Settings {
    /// The embedded defaults, with relative paths taken from the current directory.
    pub fn embedded() -> Settings {
        let mut settings = Settings::placeholder();
        // The embedded file is part of the binary and covered by a unit test.
        apply_text(
            &mut settings,
            EMBEDDED_CONFIG,
            Path::new("<embedded config.toml>"),
            Path::new("."),
        )
        .unwrap_or_else(|e| panic!("embedded config.toml is invalid: {e}"));
        settings.host_id = store::default_host_id();
        settings
    }

    /// The embedded defaults overridden by the file at `path`.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut settings = Settings::embedded();
        apply_text(&mut settings, &text, path, base)?;
        Ok(settings)
    }

    /// `--config FILE` when given, else `./config.toml` when present, else the defaults.
    pub fn discover(explicit: Option<&Path>) -> Result<Settings, ConfigError> {
        match explicit {
            Some(path) => Settings::load(path),
            None if Path::new("config.toml").is_file() => Settings::load(Path::new("config.toml")),
            None => Ok(Settings::embedded()),
        }
    }

    fn placeholder() -> Settings {
        Settings {
            data_dir: PathBuf::new(),
            mountpoint: PathBuf::new(),
            block_size_bytes: 0,
            max_volume_size_bytes: 0,
            compression_level: 0,
            capture_threads: 0,
            fuse_threads: 0,
            cache_size_bytes: 0,
            allow_other: false,
            hydrate: false,
            block_public_access: false,
            host_id: String::new(),
            store: None,
            policies: Vec::new(),
            recycle_bin_secs: None,
        }
    }
}

fn apply_text(
    settings: &mut Settings,
    text: &str,
    path: &Path,
    base: &Path,
) -> Result<(), ConfigError> {
    let invalid = |line: usize, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        message,
    };
    let file: ConfigFile = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| line_of_offset(text, span.start))
            .unwrap_or(1);
        let message = e.message().trim_end();
        match key_on_line(text, line) {
            Some(key) if !message.contains(&format!("`{key}`")) => {
                invalid(line, format!("key `{key}`: {message}"))
            }
            _ => invalid(line, message.to_string()),
        }
    })?;
    let check = |key: &str, ok: bool, what: String| {
        if ok {
            Ok(())
        } else {
            Err(invalid(
                line_of_key(text, key),
                format!("key `{key}`: {what}"),
            ))
        }
    };
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

    if let Some(dir) = file.data_dir {
        check(
            "data_dir",
            !dir.as_os_str().is_empty(),
            "must not be empty".into(),
        )?;
        settings.data_dir = resolve(dir);
    }
    if let Some(dir) = file.mountpoint {
        check(
            "mountpoint",
            !dir.as_os_str().is_empty(),
            "must not be empty".into(),
        )?;
        settings.mountpoint = resolve(dir);
    }
    if let Some(ByteSize(size)) = file.block_size {
        check(
            "block_size",
            size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size),
            format!("{size} is not a power of two between 4KiB and 4MiB"),
        )?;
        settings.block_size_bytes = size as u32;
    }
    if let Some(ByteSize(size)) = file.max_volume_size {
        check(
            "max_volume_size",
            size > 0 && size <= i64::MAX as u64,
            format!("{size} must be between 1 byte and 8EiB"),
        )?;
        settings.max_volume_size_bytes = size;
    }
    if let Some(level) = file.compression_level {
        check(
            "compression_level",
            (1..=19).contains(&level),
            format!("{level} is not between 1 and 19"),
        )?;
        settings.compression_level = level;
    }
    if let Some(threads) = file.capture_threads {
        check(
            "capture_threads",
            (1..=64).contains(&threads),
            format!("{threads} is not between 1 and 64"),
        )?;
        settings.capture_threads = threads;
    }
    if let Some(threads) = file.fuse_threads {
        check(
            "fuse_threads",
            (1..=64).contains(&threads),
            format!("{threads} is not between 1 and 64"),
        )?;
        settings.fuse_threads = threads;
    }
    if let Some(ByteSize(size)) = file.cache_size {
        check(
            "cache_size",
            size >= 1 << 20,
            format!("{size} is below the 1MiB minimum"),
        )?;
        settings.cache_size_bytes = size;
    }
    if let Some(allow) = file.allow_other {
        settings.allow_other = allow;
    }
    if let Some(hydrate) = file.hydrate {
        settings.hydrate = hydrate;
    }
    if let Some(block) = file.block_public_access {
        settings.block_public_access = block;
    }
    if let Some(id) = file.host_id {
        store::check_host_id(&id)
            .map_err(|e| invalid(line_of_key(text, "host_id"), format!("key `host_id`: {e}")))?;
        settings.host_id = id;
    }
    if let Some(table) = file.store {
        let store = table.settings(resolve).map_err(|(key, what)| {
            invalid(line_of_key(text, key), format!("key `store.{key}`: {what}"))
        })?;
        settings.store = Some(store);
    }
    if let Some(period) = file.recycle_bin {
        let secs = crate::policy::parse_duration(&period).map_err(|e| {
            invalid(
                line_of_key(text, "recycle_bin"),
                format!("key `recycle_bin`: {e}"),
            )
        })?;
        settings.recycle_bin_secs = Some(secs);
    }
    if let Some(tables) = file.policy {
        let mut policies: Vec<crate::policy::Policy> = Vec::new();
        for (index, table) in tables.into_iter().enumerate() {
            let at = |key: &str| line_of_table_key(text, "[[policy]]", index, key);
            let policy = table
                .policy()
                .map_err(|(key, what)| invalid(at(key), format!("key `policy.{key}`: {what}")))?;
            if policies.iter().any(|p| p.name == policy.name) {
                return Err(invalid(
                    at("name"),
                    format!(
                        "key `policy.name`: two policies are named `{}`",
                        policy.name
                    ),
                ));
            }
            if let Some(other) = policies
                .iter()
                .find(|p| p.label == policy.label && p.volumes.overlaps(&policy.volumes))
            {
                return Err(invalid(
                    at("label"),
                    format!(
                        "key `policy.label`: policies `{}` and `{}` make the same labels for \
                         the same volumes, so each would count and prune the other's \
                         snapshots: give one another label",
                        other.name, policy.name
                    ),
                ));
            }
            policies.push(policy);
        }
        settings.policies = policies;
    }
    Ok(())
}

/// The line on which `key` is assigned in the `index`th (0-based) `header` table, or
/// the header's own line when the key is not written there.
fn line_of_table_key(text: &str, header: &str, index: usize, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(index)
        .map(|(i, _)| i)
    else {
        return 1;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |p| start + 1 + p);
    lines[start + 1..end]
        .iter()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(start + 1, |p| start + 2 + p)
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The key assigned on line `line` (1-based), if that line is a `key = value`.
fn key_on_line(text: &str, line: usize) -> Option<&str> {
    let (key, _) = text.lines().nth(line.checked_sub(1)?)?.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    bare.then_some(key)
}

/// The line on which `key` is assigned, for errors found after parsing.
fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(1, |idx| idx + 1)
}

/// A byte count written as a number or as a string with a binary unit ("64KiB").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses "4096", "64K", "64KiB", "1.5GiB" style sizes (binary multiples).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            "p" | "pb" | "pib" => 1 << 50,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size"))?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("`{text}` is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) if n >= 0 => Ok(ByteSize(n as u64)),
            Raw::Number(n) => Err(serde::de::Error::custom(format!("size {n} is negative"))),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Settings, ConfigError> {
        let mut settings = Settings::embedded();
        apply_text(
            &mut settings,
            text,
            Path::new("test.toml"),
            Path::new("/base"),
        )
        .map(|_| settings)
    }

    /// Asserts that `text` is refused with an error that starts with its file and
    /// `line` and names `key`.
    fn assert_refused_at(text: &str, line: usize, key: &str) {
        let err = load_text(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("test.toml:{line}:")) && err.contains(key),
            "{text:?}: {err}"
        );
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let s = Settings::embedded();
        assert_eq!(s.data_dir, Path::new("./data"));
        assert_eq!(s.mountpoint, Path::new("./mnt"));
        assert_eq!(s.block_size_bytes, 64 * 1024);
        assert_eq!(s.max_volume_size_bytes, 16 << 40);
        assert!(!s.allow_other);
        assert!(!s.block_public_access);
        assert!(s.store.is_none(), "the local store is the default");
        assert!(!s.host_id.is_empty());
    }

    #[test]
    fn the_store_table_selects_a_bucket_and_names_bad_keys() {
        let s = load_text(
            "host_id = \"a\"\n[store]\nurl = \"s3://ebsfs/prod\"\nendpoint = \"http://127.0.0.1:9000\"\nkey_file = \"k\"\n",
        )
        .unwrap();
        let store = s.store.unwrap();
        assert_eq!(
            (store.bucket.as_str(), store.prefix.as_str()),
            ("ebsfs", "prod")
        );
        assert_eq!(store.key_file.unwrap(), Path::new("/base/k"));
        assert_eq!(store.payload_checksum, PayloadChecksum::Crc64Nvme);
        assert_eq!(s.host_id, "a");
        let signed = load_text("[store]\nurl = \"s3://ebsfs\"\npayload_checksum = \"sha256\"\n");
        assert_eq!(
            signed.unwrap().store.unwrap().payload_checksum,
            PayloadChecksum::Sha256
        );
        assert_refused_at(
            "[store]\nurl = \"s3://ebsfs\"\npayload_checksum = \"md5\"\n",
            3,
            "store.payload_checksum",
        );
        assert_refused_at(
            "[store]\nurl = \"s3://ebsfs\"\nendpoint = \"ftp://x\"\n",
            3,
            "store.endpoint",
        );
        let err = load_text("[store]\nregion = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url"), "{err}");
        assert_refused_at("host_id = \"a b\"\n", 1, "host_id");
    }

    #[test]
    fn file_overrides_only_its_keys_and_resolves_paths() {
        let s = load_text("data_dir = \"d\"\nblock_size = 8192\n").unwrap();
        assert_eq!(s.data_dir, Path::new("/base/d"));
        assert_eq!(s.block_size_bytes, 8192);
        assert_eq!(s.mountpoint, Path::new("./mnt"));
    }

    #[test]
    fn the_recycle_bin_is_off_by_default_and_takes_a_period() {
        assert_eq!(Settings::embedded().recycle_bin_secs, None);
        assert_eq!(
            load_text("recycle_bin = \"7d\"\n")
                .unwrap()
                .recycle_bin_secs,
            Some(7 * 86_400)
        );
        assert_refused_at("hydrate = true\nrecycle_bin = \"soon\"\n", 2, "recycle_bin");
    }

    #[test]
    fn block_public_access_is_read() {
        assert!(
            load_text("block_public_access = true\n")
                .unwrap()
                .block_public_access
        );
        assert_refused_at("block_public_access = \"yes\"\n", 1, "block_public_access");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        assert_refused_at("data_dir = \"d\"\n\nblok_size = 3\n", 3, "blok_size");
    }

    #[test]
    fn invalid_value_names_file_line_and_key() {
        assert_refused_at("# c\nblock_size = \"3KiB\"\n", 2, "block_size");
        let err = load_text("compression_level = 40").unwrap_err().to_string();
        assert!(
            err.contains("test.toml:1: key `compression_level`"),
            "{err}"
        );
    }

    #[test]
    fn value_and_syntax_errors_name_the_key() {
        for text in [
            "# c\n\n\nmax_volume_size = \"lots\"\n",
            "# c\n\n\nmax_volume_size = 1GiB\n",
        ] {
            let err = load_text(text).unwrap_err().to_string();
            assert!(
                err.starts_with("test.toml:4: key `max_volume_size`"),
                "{err}"
            );
        }
        let err = load_text("a = 1\ncache_size = \"64MiB\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml:2") && err.contains("cache_size"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = load_text("a = 1\nb = [\n").unwrap_err().to_string();
        assert!(err.starts_with("test.toml:"), "{err}");
    }

    #[test]
    fn policies_are_read_and_bad_ones_refused_with_their_line() {
        let s = load_text(
            "[[policy]]\nname = \"hourly\"\nvolumes = [\"db\", \"log\"]\nevery = \"1h\"\nkeep = 24\n\n[[policy]]\nname = \"daily\"\nvolumes = \"*\"\nevery = \"1d\"\nkeep_for = \"30d\"\nlabel = \"day-%Y-%m-%d\"\n",
        )
        .unwrap();
        assert_eq!(s.policies.len(), 2);
        let hourly = &s.policies[0];
        assert_eq!(hourly.every_secs, 3600);
        assert_eq!(hourly.keep, Some(24));
        assert!(hourly.volumes.covers("log") && !hourly.volumes.covers("x"));
        assert_eq!(hourly.label.to_string(), "hourly-%Y%m%d-%H%M%S");
        let daily = &s.policies[1];
        assert!(daily.volumes.covers("anything"));
        assert_eq!(daily.keep_for_secs, Some(30 * 86_400));
        assert!(Settings::embedded().policies.is_empty());

        let head = "[[policy]]\nname = \"ok\"\nvolumes = \"*\"\nevery = \"1h\"\nkeep = 1\n[[policy]]\nname = \"p\"\nvolumes = [\"db\"]\n";
        for (rest, line, key) in [
            ("every = \"soon\"\nkeep = 2\n", 9, "policy.every"),
            ("every = \"1h\"\nkeep = 0\n", 10, "policy.keep"),
            ("every = \"1h\"\n", 6, "policy.keep"),
            (
                "every = \"1h\"\nkeep = 2\nlabel = \"a/%S\"\n",
                11,
                "policy.label",
            ),
            (
                "every = \"1h\"\nkeep = 2\nlabel = \"day-%Y%m%d\"\n",
                11,
                "policy.label",
            ),
            (
                "every = \"1h\"\nkeep = 2\nkeep_for = \"1y\"\n",
                11,
                "policy.keep_for",
            ),
        ] {
            assert_refused_at(&format!("{head}{rest}"), line, key);
        }
        let err = load_text(&format!(
            "{head}every = \"1h\"\nkeep = 0\nkeep_for = \"1d\"\n"
        ))
        .map(|s| s.policies.len());
        assert_eq!(err.unwrap(), 2, "keep = 0 with keep_for is age alone");
        let err = load_text(&head.replace("\"p\"", "\"ok\"").replace(
            "volumes = [\"db\"]\n",
            "volumes = [\"db\"]\nevery = \"1h\"\nkeep = 1\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("two policies"), "{err}");
        let same_label = "[[policy]]\nname = \"a\"\nvolumes = [\"db\", \"log\"]\nevery = \"1h\"\nkeep = 1\nlabel = \"x-%Y%m%d-%H\"\n\
                          [[policy]]\nname = \"b\"\nvolumes = [\"log\"]\nevery = \"1h\"\nkeep = 2\nlabel = \"x-%Y%m%d-%H\"\n";
        assert_refused_at(same_label, 12, "same labels");
        let apart = same_label.replace("[\"log\"]\nevery", "[\"web\"]\nevery");
        assert_eq!(load_text(&apart).unwrap().policies.len(), 2);
        let err = load_text(
            "[[policy]]\nname = \"p\"\nvolumes = [\"db\"]\nevery = \"1h\"\nkeep = 1\nwhen = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("when"), "{err}");
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("64KiB"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("1.5 GiB"), Ok(ByteSize(3 << 29)));
        assert_eq!(ByteSize::parse("16T"), Ok(ByteSize(16 << 40)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("lots").is_err());
    }
}
