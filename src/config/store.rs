//! The `[store]` table of `config.toml` and `host_id`: where snapshots live.
//!
//! Without a `[store]` table (the embedded default), snapshot chunks stay in the data
//! directory. With one, snapshots are also kept in an S3-compatible bucket shared by
//! many hosts (see `crate::remote`).

use std::path::PathBuf;

use serde::Deserialize;

use super::ByteSize;

/// Settings of the S3-compatible snapshot store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSettings {
    pub bucket: String,
    /// Key prefix of every object ebsfs writes (may be empty); no leading or trailing `/`.
    pub prefix: String,
    /// `http(s)://host:port`; `None` means AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// An AWS shared credentials file (used when `AWS_ACCESS_KEY_ID` is not set).
    pub credentials_file: Option<PathBuf>,
    /// The profile in that file (default: `AWS_PROFILE`, else `default`).
    pub profile: Option<String>,
    pub upload_concurrency: usize,
    pub download_concurrency: usize,
    /// Memory for pieces of snapshots read from the bucket.
    pub cache_size_bytes: u64,
    /// How often other hosts' snapshots are looked for.
    pub poll_seconds: u64,
    /// A 32-byte key (raw or 64 hex digits): encrypts everything in the bucket.
    pub key_file: Option<PathBuf>,
    /// Unreferenced objects younger than this are never deleted.
    pub gc_grace_seconds: u64,
    /// One request's time limit, and the bound on its retries.
    pub request_timeout_seconds: u64,
    /// A host's lease counts as gone this long after its last renewal (renewed every
    /// eighth of it). Every host sharing a bucket must use the same value.
    pub lease_seconds: u64,
    /// How the server checks that the body of each write arrived intact.
    pub payload_checksum: PayloadChecksum,
}

/// How a write's body is protected on its way to the server, which checks it and
/// refuses the write on a mismatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadChecksum {
    /// A CRC-64/NVME of the body in a signed header (`x-amz-checksum-crc64nvme`);
    /// the body itself is not signed (`UNSIGNED-PAYLOAD`). Cheap on both sides.
    Crc64Nvme,
    /// The SHA-256 of the body in the request's signature, for servers that do
    /// not know CRC-64/NVME checksums.
    Sha256,
}

/// `[store]` as written in a file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreTable {
    url: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    credentials_file: Option<PathBuf>,
    profile: Option<String>,
    upload_concurrency: Option<usize>,
    download_concurrency: Option<usize>,
    cache_size: Option<ByteSize>,
    poll_seconds: Option<u64>,
    key_file: Option<PathBuf>,
    gc_grace_seconds: Option<u64>,
    request_timeout_seconds: Option<u64>,
    lease_seconds: Option<u64>,
    payload_checksum: Option<String>,
}

/// Parses `s3://bucket[/prefix]`.
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{url}` is not an s3://bucket/prefix URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if !valid_bucket {
        return Err(format!(
            "bucket `{bucket}` is not a valid bucket name (3-63 of a-z 0-9 . -)"
        ));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl StoreTable {
    /// Validates the table; `resolve` makes relative paths relative to the config file.
    /// Errors name the key (without the `store.` prefix).
    pub(super) fn settings(
        self,
        resolve: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<StoreSettings, (&'static str, String)> {
        let url = self
            .url
            .ok_or(("url", "is required in [store]".to_string()))?;
        let (bucket, prefix) = parse_url(&url).map_err(|e| ("url", e))?;
        let positive = |key: &'static str, value: Option<usize>, default: usize| match value {
            Some(0) => Err((key, "must be at least 1".to_string())),
            Some(v) if v > 256 => Err((key, format!("{v} is more than 256"))),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err((
                "endpoint",
                format!("`{endpoint}` must start with http:// or https://"),
            ));
        }
        let cache_size_bytes = self.cache_size.map_or(256 << 20, |b| b.0);
        if cache_size_bytes < 1 << 20 {
            return Err((
                "cache_size",
                format!("{cache_size_bytes} is below the 1MiB minimum"),
            ));
        }
        let payload_checksum = match self.payload_checksum.as_deref() {
            None | Some("crc64nvme") => PayloadChecksum::Crc64Nvme,
            Some("sha256") => PayloadChecksum::Sha256,
            Some(other) => {
                return Err((
                    "payload_checksum",
                    format!("`{other}` is neither \"crc64nvme\" nor \"sha256\""),
                ));
            }
        };
        Ok(StoreSettings {
            bucket,
            prefix,
            endpoint: self.endpoint,
            region: self.region.unwrap_or_else(|| "us-east-1".to_string()),
            path_style: self.path_style.unwrap_or(true),
            credentials_file: self.credentials_file.map(&resolve),
            profile: self.profile,
            upload_concurrency: positive("upload_concurrency", self.upload_concurrency, 4)?,
            download_concurrency: positive("download_concurrency", self.download_concurrency, 16)?,
            cache_size_bytes,
            poll_seconds: self.poll_seconds.unwrap_or(30).max(1),
            key_file: self.key_file.map(&resolve),
            gc_grace_seconds: self.gc_grace_seconds.unwrap_or(6 * 3600),
            request_timeout_seconds: self.request_timeout_seconds.unwrap_or(30).max(1),
            lease_seconds: match self.lease_seconds {
                Some(s) if s < 4 => {
                    return Err((
                        "lease_seconds",
                        format!("{s} is below the 4 second minimum"),
                    ));
                }
                Some(s) => s,
                None => 900,
            },
            payload_checksum,
        })
    }
}

/// Host ids name the host in other hosts' snapshot names: 1-64 of `[A-Za-z0-9._-]`.
pub fn check_host_id(id: &str) -> Result<(), String> {
    crate::names::VolumeName::parse(id)
        .map(|_| ())
        .map_err(|_| format!("`{id}` is not a host id: use 1-64 of A-Z a-z 0-9 . _ -"))
}

/// The default host id: the first 12 hex digits of the machine id, else the host name.
pub fn default_host_id() -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|id| id.trim().chars().take(12).collect::<String>())
        .filter(|id| check_host_id(id).is_ok());
    machine.unwrap_or_else(|| {
        let mut name = [0u8; 256];
        // SAFETY: gethostname writes at most `name.len()` bytes into the buffer.
        let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let host = String::from_utf8_lossy(&name[..end]).into_owned();
        if rc == 0 && check_host_id(&host).is_ok() {
            host
        } else {
            "host".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(
            parse_url("s3://ebsfs/prod/a/").unwrap(),
            ("ebsfs".to_string(), "prod/a".to_string())
        );
        assert_eq!(parse_url("s3://ebsfs").unwrap().1, "");
        assert!(parse_url("http://x/y").is_err());
        assert!(parse_url("s3://Bad_Bucket/x").is_err());
    }

    #[test]
    fn host_ids_follow_the_name_rules() {
        assert!(check_host_id("host-a.1").is_ok());
        assert!(check_host_id("a/b").is_err());
        assert!(check_host_id(&default_host_id()).is_ok());
    }
}
