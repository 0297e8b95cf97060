//! [`Bucket`]: blocking access to an S3-compatible bucket through `object_store`.
//!
//! The rest of ebsfs is synchronous (FUSE threads, capture threads); requests run on a
//! small tokio runtime owned here. Every request is bounded: a connect timeout, a
//! request timeout, and a bounded number of retries with exponential backoff for
//! failures worth retrying (timeouts, 5xx and 503 throttling, connection resets), after
//! which the error reaches the caller. Nothing here waits forever.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::config::{PayloadChecksum, StoreSettings};

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("the bucket refused access ({0}): check the credentials and the bucket's policy")]
    Denied(String),
    #[error("the S3 endpoint cannot be reached: {0}")]
    Unreachable(String),
    #[error("S3 request for {object} failed: {reason}")]
    Failed { object: String, reason: String },
}

impl BucketError {
    fn of(object: &str, e: object_store::Error) -> BucketError {
        let text = error_chain(&e);
        let lower = text.to_lowercase();
        match e {
            object_store::Error::NotFound { .. } => BucketError::NotFound(object.to_string()),
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => BucketError::Denied(text),
            _ if text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("AccessDenied")
                || text.contains("403 Forbidden") =>
            {
                BucketError::Denied(text)
            }
            _ if lower.contains("connect")
                || lower.contains("timed out")
                || lower.contains("dns") =>
            {
                BucketError::Unreachable(text)
            }
            _ => BucketError::Failed {
                object: object.to_string(),
                reason: text,
            },
        }
    }
}

/// An error and its causes: `object_store` shows only the outermost (an endpoint that
/// refuses connections is "error sending request"; "Connection refused" is a cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let shown = c.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = c.source();
    }
    text
}

pub type BucketResult<T> = Result<T, BucketError>;

/// One request of [`Bucket::parallel`].
pub type Job<'a, T> = Box<dyn FnOnce(&Bucket) -> BucketResult<T> + Send + 'a>;

/// An object's name and when the server says it was last written.
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// The longest wait between two attempts of a request.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest one request can take, retries included, with `timeout` as
/// `request_timeout_seconds`: attempts begin until three timeouts have passed, each
/// after at most `MAX_BACKOFF`, and last at most a timeout (see `Bucket::connect`).
pub fn request_bound(timeout: Duration) -> Duration {
    timeout * 4 + MAX_BACKOFF
}

pub struct Bucket {
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    /// `prefix/` or empty.
    prefix: String,
    /// What the user calls it, for messages.
    pub shown: String,
    /// Write requests made (PUTs, and each multipart upload's parts and completion).
    pub writes: std::sync::atomic::AtomicU64,
}

fn credentials(
    settings: &StoreSettings,
) -> Result<Option<(String, String, Option<String>)>, String> {
    if let (Ok(id), Ok(secret)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        return Ok(Some((id, secret, std::env::var("AWS_SESSION_TOKEN").ok())));
    }
    let Some(path) = &settings.credentials_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
    let profile = settings
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".to_string());
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !in_profile {
            continue;
        }
        let value = value.trim().to_string();
        match key.trim() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok(Some((id, secret, token))),
        _ => Err(format!(
            "credentials file {} has no aws_access_key_id and aws_secret_access_key in profile [{profile}]",
            path.display()
        )),
    }
}

impl Bucket {
    /// Connects to the bucket `settings` names (no request is made yet).
    pub fn connect(settings: &StoreSettings) -> Result<Bucket, String> {
        let timeout = Duration::from_secs(settings.request_timeout_seconds);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_virtual_hosted_style_request(!settings.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5).min(timeout))
                    .with_timeout(timeout)
                    .with_allow_http(true),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: MAX_BACKOFF,
                    base: 2.0,
                },
                max_retries: 5,
                retry_timeout: timeout * 3,
            });
        builder = match settings.payload_checksum {
            PayloadChecksum::Crc64Nvme => builder
                .with_checksum_algorithm(Checksum::CRC64NVME)
                .with_unsigned_payload(true),
            PayloadChecksum::Sha256 => builder.with_unsigned_payload(false),
        };
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        match credentials(settings)? {
            Some((id, secret, token)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = token {
                    builder = builder.with_token(token);
                }
            }
            None => {
                return Err(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a \
                     credentials file with store.credentials_file"
                        .to_string(),
                );
            }
        }
        let store = builder.build().map_err(|e| e.to_string())?;
        let shown = format!(
            "s3://{}/{}{}",
            settings.bucket,
            settings.prefix,
            settings
                .endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default()
        );
        Bucket::with_store(Arc::new(store), &settings.prefix, shown)
    }

    /// A bucket over any `object_store` backend (the in-memory one in tests).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        shown: String,
    ) -> Result<Bucket, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the S3 client's runtime: {e}"))?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(Bucket {
            runtime,
            store,
            prefix,
            shown,
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn path(&self, name: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{name}", self.prefix))
    }

    fn count_writes(&self, n: usize) {
        self.writes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn put(&self, name: &str, bytes: impl Into<Bytes>) -> BucketResult<()> {
        self.count_writes(1);
        let path = self.path(name);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes.into())))
            .map(|_| ())
            .map_err(|e| BucketError::of(name, e))
    }

    /// Uploads an object in one PUT if it has at most `single` bytes, else in parts
    /// of `part` bytes (several in flight).
    pub fn put_multipart(
        &self,
        name: &str,
        bytes: impl Into<Bytes>,
        single: usize,
        part: usize,
    ) -> BucketResult<()> {
        let bytes: Bytes = bytes.into();
        if bytes.len() <= single.max(part) {
            return self.put(name, bytes);
        }
        // Create, the parts, complete.
        self.count_writes(2 + bytes.len().div_ceil(part));
        let path = self.path(name);
        self.runtime
            .block_on(async {
                let mut upload = object_store::WriteMultipart::new_with_chunk_size(
                    self.store.put_multipart(&path).await?,
                    part,
                );
                let mut at = 0;
                while at < bytes.len() {
                    upload.wait_for_capacity(4).await?;
                    let end = (at + part).min(bytes.len());
                    upload.put(bytes.slice(at..end));
                    at = end;
                }
                upload.finish().await
            })
            .map(|_| ())
            .map_err(|e| BucketError::of(name, e))
    }

    /// The whole object, `None` if it does not exist.
    pub fn get(&self, name: &str) -> BucketResult<Option<Vec<u8>>> {
        let path = self.path(name);
        let result = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            got.bytes().await
        });
        match result {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BucketError::of(name, e)),
        }
    }

    pub fn get_range(&self, name: &str, range: Range<u64>) -> BucketResult<Bytes> {
        let path = self.path(name);
        self.runtime
            .block_on(self.store.get_range(&path, range))
            .map_err(|e| BucketError::of(name, e))
    }

    /// Whether the object exists, and when it was written.
    pub fn head(&self, name: &str) -> BucketResult<Option<Listed>> {
        let path = self.path(name);
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(meta) => Ok(Some(Listed {
                name: name.to_string(),
                size: meta.size,
                modified: meta.last_modified.into(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(BucketError::of(name, e)),
        }
    }

    /// Every object whose name starts with `prefix` (names without the bucket prefix).
    pub fn list(&self, prefix: &str) -> BucketResult<Vec<Listed>> {
        let path = self.path(prefix.trim_end_matches('/'));
        let strip = self.prefix.clone();
        self.runtime
            .block_on(async {
                let metas: Vec<_> = self.store.list(Some(&path)).try_collect().await?;
                Ok(metas)
            })
            .map(|metas: Vec<object_store::ObjectMeta>| {
                metas
                    .into_iter()
                    .map(|m| Listed {
                        name: m
                            .location
                            .as_ref()
                            .strip_prefix(&strip)
                            .unwrap_or(m.location.as_ref())
                            .to_string(),
                        size: m.size,
                        modified: m.last_modified.into(),
                    })
                    .collect()
            })
            .map_err(|e| BucketError::of(prefix, e))
    }

    /// Deletes an object; one that does not exist is not an error.
    pub fn delete(&self, name: &str) -> BucketResult<()> {
        let path = self.path(name);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BucketError::of(name, e)),
        }
    }

    /// Runs several requests at once (at most `concurrency`), returning their results
    /// in order.
    pub fn parallel<T: Send + 'static>(
        &self,
        concurrency: usize,
        jobs: Vec<Job<'_, T>>,
    ) -> Vec<BucketResult<T>> {
        let mut results: Vec<Option<BucketResult<T>>> = (0..jobs.len()).map(|_| None).collect();
        let jobs: std::sync::Mutex<Vec<(usize, _)>> =
            std::sync::Mutex::new(jobs.into_iter().enumerate().rev().collect());
        let done = std::sync::Mutex::new(&mut results);
        std::thread::scope(|scope| {
            for _ in 0..concurrency.max(1) {
                scope.spawn(|| {
                    loop {
                        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).pop();
                        let Some((i, job)) = job else {
                            return;
                        };
                        let result = job(self);
                        done.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(result);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|r| r.expect("every job ran"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that shows only its own text, with a cause.
    #[derive(Debug)]
    struct Outer(&'static str, std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    fn generic(outer: &'static str, cause: std::io::Error) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: Box::new(Outer(outer, cause)),
        }
    }

    #[test]
    fn an_endpoint_refusing_connections_cannot_be_reached_whatever_its_port() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = BucketError::of(
            "ebsfs-store",
            generic(
                "Error performing GET http://127.0.0.1:40312/b/ebsfs-store - HTTP error: \
                 error sending request",
                refused(),
            ),
        );
        assert!(matches!(e, BucketError::Unreachable(_)), "{e:?}");
        let shown = e.to_string();
        assert!(shown.contains("cannot be reached"), "{shown}");
        assert!(shown.contains("connection refused"), "{shown}");
    }

    #[test]
    fn a_refusal_of_the_credentials_is_denied() {
        let e = BucketError::of(
            "ebsfs-store",
            generic(
                "Server returned non-2xx status code: 403 Forbidden: SignatureDoesNotMatch",
                std::io::Error::other("response"),
            ),
        );
        assert!(matches!(e, BucketError::Denied(_)), "{e:?}");
    }
}
